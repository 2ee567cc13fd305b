"""The TensorRT side of ``dhsa-export build --backend trt``: plugin libraries into the artifact, then
one engine per graph.

Artifact (besides the ONNX graphs, weights, tokenizer and manifest every backend writes):

- ``lib/libdhsa_trt_plugin.so`` + ``lib/libdhsa_kernels.so``: the IPluginV3 plugins and the CUDA
  kernels they call, for the CUDA architectures given (``--cuda-arch``);
- ``prefill.engine``: the DHSA prefill graph, one optimization profile over the prompt length
  ``1 .. max_tokens``;
- ``decode.engine``: the dense decode graph, one new token over a KV cache of ``1 .. max_tokens``.

Engines are built by the TensorRT found in this Python (``tensorrt``, else TensorRT-RTX) and run only
with that TensorRT, on the GPUs it supports; the ONNX graphs stay in the artifact so an engine can be
rebuilt on the target (``trtexec --onnx=prefill.onnx --dynamicPlugins=lib/libdhsa_trt_plugin.so``).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from ...errors import DHSAError
from .engine import TENSORRT_MODULES, ShapeRange, engine_from_onnx

DTYPES = ("float16", "bfloat16")
LIBRARY_DIR = "lib"
ENGINES = {"prefill": "prefill.engine", "decode": "decode.engine"}


def installed_tensorrt() -> str | None:
    """Name of the TensorRT module an engine build would use (not imported here), or None."""
    for name in TENSORRT_MODULES:
        if importlib.util.find_spec(name) is not None:
            return name
    return None


def validate(dtype: str, max_tokens: int | None, cuda_archs) -> None:
    """What ``build --backend trt`` checks before any work."""
    if dtype not in DTYPES:
        raise DHSAError(f"--dtype {dtype} is not supported by the TensorRT plugins; use one of {', '.join(DTYPES)}")
    if max_tokens is not None and max_tokens < 2:
        raise DHSAError(f"--max-tokens {max_tokens} must be at least 2 (the engines' prompt-length range)")
    if installed_tensorrt() is None:
        raise DHSAError(
            "--backend trt builds engines with TensorRT, and no TensorRT Python module is installed (tried "
            f"{', '.join(TENSORRT_MODULES)}); pip install tensorrt (or tensorrt-rtx-cu13-libs "
            "tensorrt-rtx-cu13-bindings)"
        )
    from ..torch_cuda.build import find_nvcc, gencode_flags

    find_nvcc()  # the plugin and its kernels are compiled at build time
    if cuda_archs:
        gencode_flags(cuda_archs)


def copy_plugin(staging: Path, cuda_archs=None) -> dict[str, Path]:
    """Build (or reuse) the plugin and its kernel library for ``cuda_archs``; copy both into the artifact."""
    from ..torch_cuda.build import LIBRARY_NAME as KERNELS_NAME
    from ..torch_cuda.build import build_library
    from .plugin import PLUGIN_NAME, build_plugin

    plugin = build_plugin(build_library(tuple(cuda_archs) if cuda_archs else None))
    folder = staging / LIBRARY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    copied = {}
    for name, key in ((PLUGIN_NAME, "plugin"), (KERNELS_NAME, "kernels")):
        shutil.copy2(plugin.parent / name, folder / name)
        copied[key] = folder / name
    return copied


def engine_shapes(graph: str, model_info: dict, max_tokens: int) -> dict[str, ShapeRange]:
    """The one optimization profile of each graph: prompt length (prefill) or cache length (decode)."""
    opt = min(max_tokens, 2048)
    if graph == "prefill":
        return {"input_ids": ShapeRange((1, 1), (1, opt), (1, max_tokens))}
    heads, head_dim = model_info["num_key_value_heads"], model_info["head_dim"]
    shapes = {"input_ids": ShapeRange((1, 1), (1, 1), (1, 1))}
    for layer in range(model_info["layers"]):
        for kind in ("key", "value"):
            shapes[f"past_key_values.{layer}.{kind}"] = ShapeRange(
                (1, heads, 1, head_dim), (1, heads, opt, head_dim), (1, heads, max_tokens - 1, head_dim))
    return shapes


def build_engines(staging: Path, graphs: dict[str, Path], plugin: Path, model_info: dict,
                  max_tokens: int, step=None, advance=None) -> dict:
    """One engine per graph (``ENGINES``); returns the manifest's ``engines`` section. ``step(name)``
    and ``advance()`` report progress before and after each engine."""
    from importlib import metadata

    module = installed_tensorrt()
    for graph, file in ENGINES.items():
        if step is not None:
            step(f"engine {graph}")
        engine_from_onnx(graphs[graph], plugin, staging / file, engine_shapes(graph, model_info, max_tokens))
        if advance is not None:
            advance()
    # the installed distribution that provides the module (tensorrt-cu12, tensorrt-rtx-cu13-bindings, ...)
    distributions = metadata.packages_distributions().get(module, [])
    version = metadata.version(distributions[0]) if distributions else None
    return {**ENGINES, "tensorrt_module": module, "tensorrt_version": version, "max_tokens": max_tokens,
            "profiles": {"prefill": "input_ids [1, 1..max_tokens]",
                         "decode": "input_ids [1, 1], past [1, Hkv, 1..max_tokens-1, D]"}}
