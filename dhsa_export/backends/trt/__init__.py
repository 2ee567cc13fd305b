"""TensorRT backend: the dhsa IPluginV3 plugin library and engines built with it.

- :func:`build_plugin`: ``libdhsa_trt_plugin.so`` (``plugins/trt/plugin``) over the CUDA kernels'
  C ABI, compiled against the TensorRT headers (:func:`fetch_headers`), no TensorRT library linked.
- :func:`plugin_contract` / :func:`plugin_creators`: what the library registers, to compare with
  :func:`dhsa_export.onnx.registry.contract_json` without TensorRT.
- :func:`engine_from_onnx`: ONNX with dhsa nodes -> serialized engine (TensorRT or TensorRT-RTX).

``tensorrt`` is imported only inside :mod:`.engine`, when an engine is built.
"""

from .engine import ShapeRange, engine_from_onnx, import_tensorrt, load_plugin_library
from .headers import fetch_headers
from .plugin import PLUGIN_NAME, build_plugin, plugin_contract, plugin_creators, plugin_source_dir

__all__ = [
    "PLUGIN_NAME", "ShapeRange", "build_plugin", "engine_from_onnx", "fetch_headers", "import_tensorrt",
    "load_plugin_library", "plugin_contract", "plugin_creators", "plugin_source_dir",
]
