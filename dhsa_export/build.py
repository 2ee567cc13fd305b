"""``build``: model -> ONNX prefill + decode graphs -> (INT4) -> artifact folder with manifest.

Each stage is a function from artifact to artifact (:mod:`.onnx.export`, :mod:`.onnx.quantize`,
the backend's library build); this module strings them together inside a staging folder that is
renamed into place only when everything succeeded.
"""

from __future__ import annotations

import gc

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .artifact import staged_folder, write_manifest
from .config import DHSAConfig
from .errors import DHSAError

BACKENDS = ("ort-cpu", "trt")
DEFAULT_TRT_MAX_TOKENS = 32768
LIBRARY_DIR = "lib"
TOKENIZER_DIR = "tokenizer"
PREDICTOR_FILE = "boundary_predictor.safetensors"


@dataclass
class BuildOptions:
    model_spec: str | None = None
    layers: int | None = None
    backend: str = "ort-cpu"
    int4: bool = False
    int4_block_size: int = 32
    int4_lm_head: bool = False
    cfg: DHSAConfig = field(default_factory=DHSAConfig)
    out: Path = Path("dhsa-artifact")
    force: bool = False
    progress: bool = True
    # backend trt: graph dtype, the engines' longest prompt (default: the model's maximum, at most
    # 32768) and the CUDA architectures of the kernels (default: the visible GPUs, else 80,86,89,90)
    dtype: str | None = None
    max_tokens: int | None = None
    cuda_archs: tuple[str, ...] | None = None

    @property
    def graph_dtype(self) -> str:
        return self.dtype or ("float16" if self.backend == "trt" else "float32")


def validate(options: BuildOptions) -> None:
    """Everything that can be checked before minutes of work is checked first."""
    if options.backend not in BACKENDS:
        raise DHSAError(f"unknown backend {options.backend!r}; use one of {', '.join(BACKENDS)}")
    if options.backend == "trt":
        from .backends.trt.artifact import validate as validate_trt

        validate_trt(options.graph_dtype, options.max_tokens, options.cuda_archs)
    elif options.dtype not in (None, "float32"):
        raise DHSAError(f"--dtype {options.dtype} applies to --backend trt; the ort-cpu graphs are float32 "
                        "(use --int4 to shrink them)")
    elif options.max_tokens is not None or options.cuda_archs:
        raise DHSAError("--max-tokens and --cuda-arch apply to --backend trt (its engines and kernels); drop them")
    if options.int4:
        from .onnx.quantize import SUPPORTED_BLOCK_SIZES

        if options.int4_block_size not in SUPPORTED_BLOCK_SIZES:
            raise DHSAError(
                f"int4 block size {options.int4_block_size} is not supported; use one of "
                f"{', '.join(map(str, SUPPORTED_BLOCK_SIZES))}"
            )
    if options.cfg.boundary_predictor:
        from .algo.boundaries import check_predictor_option

        check_predictor_option(options.cfg)
    from .hf.models import validate_model_spec

    validate_model_spec(options.model_spec)
    out = Path(options.out)
    if out.exists() and not out.is_dir():
        raise DHSAError(f"output path {str(out)!r} is a file; pass a folder with -o")
    if out.exists() and any(out.iterdir()) and not options.force:
        raise DHSAError(f"output folder {str(out)!r} exists and is not empty; pass --force or another -o")


def manifest_config(folder: Path, manifest: dict) -> DHSAConfig:
    """The artifact's DHSA config, its boundary predictor resolved inside the artifact folder."""
    values = dict(manifest["dhsa"])
    if values.get("boundary_predictor"):
        values["boundary_predictor"] = str(Path(folder) / values["boundary_predictor"])
    return DHSAConfig(**values)


def build(options: BuildOptions) -> Path:
    """Build the artifact folder ``options.out``; returns its path."""
    from tqdm import tqdm

    from .hf.models import load_model

    validate(options)
    stages = ["load model", "build custom-op library", "export prefill", "export decode"]
    stages += ["quantize int4"] if options.int4 else []
    stages += ["share weights"]
    stages += ["engine prefill", "engine decode"] if options.backend == "trt" else []
    stages += ["tokenizer + manifest"]
    bar = tqdm(total=len(stages), desc="build", unit="stage", disable=not options.progress)

    def step(name: str) -> None:
        bar.set_postfix_str(name)

    with staged_folder(Path(options.out), force=options.force) as staging:
        step(stages[0])
        loaded = load_model(options.model_spec, layers=options.layers, dtype=options.graph_dtype)
        bar.update()
        step(stages[1])
        library = _backend_library(options, staging)
        bar.update()
        graphs = _export_graphs(loaded, options, staging, step, bar)
        model_info, tokenizer = _model_info(loaded, options), loaded.tokenizer
        del loaded  # the torch weights (6 GB for the LLaMA-8B shape at 2 layers) are done with
        gc.collect()
        step("share weights")
        from .onnx.export import share_weights

        shared = share_weights(graphs["prefill"], graphs["decode"])
        if options.cfg.boundary_predictor:
            shutil.copy2(options.cfg.boundary_predictor, staging / PREDICTOR_FILE)
        bar.update()
        engines = None
        if options.backend == "trt":
            from .backends.trt.artifact import build_engines

            max_tokens = options.max_tokens or min(model_info["max_length"], DEFAULT_TRT_MAX_TOKENS)
            engines = build_engines(staging, graphs, library, model_info, max_tokens, step=step, advance=bar.update)
        step("tokenizer + manifest")
        tokenizer.save_pretrained(str(staging / TOKENIZER_DIR))
        write_manifest(staging, _manifest_info(model_info, options, library, shared, staging, engines))
        bar.update()
    bar.close()
    return Path(options.out).resolve()


def _export_graphs(loaded, options: BuildOptions, staging: Path, step, bar) -> dict[str, Path]:
    from .onnx.export import export_decode, export_prefill

    step("export prefill")
    prefill = export_prefill(loaded.model, options.cfg, staging / "prefill.onnx")
    bar.update()
    step("export decode")
    decode = export_decode(loaded.model, options.cfg, staging / "decode.onnx")
    bar.update()
    if options.int4:
        from .onnx.quantize import quantize_int4

        step("quantize int4")
        for path in (prefill, decode):
            quantize_int4(path, options.int4_block_size, include_lm_head=options.int4_lm_head,
                          form="qdq" if options.backend == "trt" else "matmulnbits")
        bar.update()
    return {"prefill": prefill, "decode": decode}


def _backend_library(options: BuildOptions, staging: Path) -> Path:
    """Build (or reuse the cached) custom-op library / TensorRT plugin and copy it into the artifact."""
    if options.backend == "trt":
        from .backends.trt.artifact import copy_plugin

        return copy_plugin(staging, options.cuda_archs)["plugin"]
    from .backends.ort_cpu import build_library

    built = Path(build_library())
    target = staging / LIBRARY_DIR / built.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(built, target)
    return target


def _predictor_info(cfg: DHSAConfig, staging: Path) -> dict | None:
    """The manifest's record of the learned boundary predictor (its weights are also initializers
    ``boundary_predictor.*`` of prefill.onnx; the copy beside it serves ``check``'s reference)."""
    if not cfg.boundary_predictor:
        return None
    from .algo.boundaries import read_predictor_metadata
    from .artifact import sha256_file

    meta = read_predictor_metadata(staging / PREDICTOR_FILE)
    return {"file": PREDICTOR_FILE, "sha256": sha256_file(staging / PREDICTOR_FILE),
            "source": str(Path(cfg.boundary_predictor).resolve()), "threshold": meta["threshold"],
            "input_features": meta["input_features"], "in_graph": "prefill.onnx"}


def _model_info(loaded, options: BuildOptions) -> dict:
    """The manifest's model section (taken before the torch weights are released)."""
    config = loaded.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    eos = config.eos_token_id if config.eos_token_id is not None else loaded.tokenizer.eos_token_id
    return {
        "name": loaded.name, "source": loaded.source, "spec": options.model_spec,
        "layers": config.num_hidden_layers, "architecture": type(loaded.model).__name__,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads, "head_dim": head_dim,
        "vocab_size": config.vocab_size, "max_length": loaded.max_length,
        "eos_token_id": eos if isinstance(eos, list) else [eos],
    }


def _manifest_info(model_info: dict, options: BuildOptions, library: Path, shared: int, staging: Path,
                   engines: dict | None = None) -> dict:
    predictor = _predictor_info(options.cfg, staging)
    trt = {"engines": engines, "kernels": f"{LIBRARY_DIR}/libdhsa_kernels.so",
           "cuda_archs": list(options.cuda_archs or ())} if engines else {}
    return {
        "backend": options.backend,
        "dtype": options.graph_dtype,
        **trt,
        "model": model_info,
        "dhsa": {**options.cfg.to_dict(), **({"boundary_predictor": PREDICTOR_FILE} if predictor else {})},
        "boundary_predictor": predictor,
        "quantization": {"int4": options.int4, "block_size": options.int4_block_size,
                         "lm_head": options.int4_lm_head,
                         "form": "qdq" if options.backend == "trt" else "matmulnbits"} if options.int4 else None,
        "graphs": {"prefill": "prefill.onnx", "decode": "decode.onnx", "weights": "weights.bin",
                   "shared_initializers": shared},
        "library": str(library.relative_to(staging)),
        "tokenizer": TOKENIZER_DIR,
    }
