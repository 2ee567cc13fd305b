"""ONNX graph with dhsa nodes -> serialized TensorRT engine, with the dhsa plugin library loaded.

The ONNX parser maps each ``dhsa::<Op>`` node to the plugin of the same name in namespace ``dhsa``
(the node's domain) and version ``1``; the node's attributes become plugin fields. Networks are
strongly typed (TensorRT 11 requires it; TensorRT-RTX builds them): the graph's own dtypes run, so
the attention plugin needs fp16 or bf16 query/key/value in the graph.

Which TensorRT: the ``tensorrt`` module where installed, else TensorRT-RTX (``tensorrt_rtx``, or
``tensorrt_rtx_bindings`` as the PyPI bindings wheel names it). TensorRT-RTX builds engines on a
machine without a GPU, which is how the build path is tested here; its runtime supports compute
capabilities 8.0, 8.6, 8.9 and 12.x (not 9.0), and full TensorRT is not installable here, so no
engine built here has been executed (docs/TENSORRT.md).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ...errors import DHSAError

TENSORRT_MODULES = ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings")
PLUGIN_LOG_PREFIX = "[dhsa trt plugin] "  # what the plugin prints where TensorRT gave it no logger


def import_tensorrt():
    """The first importable TensorRT Python module of :data:`TENSORRT_MODULES`."""
    problems = []
    for name in TENSORRT_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            problems.append(f"{name}: {exc}")
    raise DHSAError(
        "no TensorRT Python module is installed (tried " + "; ".join(problems) + "); install TensorRT "
        "(pip install tensorrt) or TensorRT-RTX (pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings)"
    )


@dataclass(frozen=True)
class ShapeRange:
    """One dynamic input's optimization-profile shapes."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def _collecting_logger(trt):
    """A TensorRT logger that keeps errors (for the one-line DHSAError) and prints nothing below."""

    class Collecting(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(str(msg))

    return Collecting()


_LOADED: dict[tuple[str, str], object] = {}


def load_plugin_library(trt, plugin: str | Path) -> None:
    """Register the dhsa plugin creators with ``trt``'s plugin registry (once per process)."""
    key = (trt.__name__, str(Path(plugin).resolve()))
    if key in _LOADED:
        return
    registry = trt.get_plugin_registry()
    handle = registry.load_library(str(plugin))
    if handle is None:
        raise DHSAError(f"{trt.__name__} refused the plugin library {plugin} (already registered by another "
                        "library, or not a TensorRT plugin library); rebuild it with build_plugin()")
    _LOADED[key] = handle


def _network_flags(trt) -> int:
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:
        flags |= 1 << int(strongly_typed)
    return flags


def engine_from_onnx(onnx_path: str | Path, plugin: str | Path, output: str | Path,
                     shapes: dict[str, ShapeRange] | None = None, workspace_mb: int | None = None) -> Path:
    """Parse ``onnx_path`` (external data found next to it), build a strongly typed engine
    with one optimization profile over ``shapes`` and write it to ``output`` (atomically).

    The build runs in a child process: a TensorRT abort cannot take the caller down, and the child
    gets the library search path TensorRT-RTX's wheels need (their ONNX parser loads
    ``libtensorrt_rtx.so`` by its unversioned name, which the wheel does not ship: a symlink in the
    cache provides it)."""
    onnx_path, plugin, output = Path(onnx_path), Path(plugin), Path(output)
    for label, path in (("ONNX graph", onnx_path), ("plugin library", plugin)):
        if not path.is_file():
            raise DHSAError(f"{label} {path} does not exist")
    request = {"onnx": str(onnx_path.resolve()), "plugin": str(plugin.resolve()), "output": str(output.resolve()),
               "shapes": {name: [list(r.min), list(r.opt), list(r.max)] for name, r in (shapes or {}).items()},
               "workspace_mb": workspace_mb}
    with tempfile.TemporaryDirectory(prefix="dhsa-trt-build-") as folder:
        request_file, result_file = Path(folder) / "request.json", Path(folder) / "result.json"
        request["result"] = str(result_file)
        request_file.write_text(json.dumps(request))
        proc = subprocess.run([sys.executable, "-m", __name__, str(request_file)], env=_child_env(),
                              capture_output=True, text=True)
        result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    if proc.returncode == 0 and result.get("engine"):
        return Path(result["engine"])
    if result.get("error"):
        # the plugin's own message (it names the attribute or shape) comes first; TensorRT's after it
        plugin_lines = [line.split("] ", 1)[1] for line in (proc.stderr or "").splitlines()
                        if line.startswith(PLUGIN_LOG_PREFIX)]
        raise DHSAError(" | ".join([*dict.fromkeys(plugin_lines), result["error"]]))
    tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
    raise DHSAError(f"the TensorRT build of {onnx_path} died (exit {proc.returncode}) before reporting: {tail}")


def _child_env() -> dict:
    """The build process's environment: a ``libtensorrt_rtx.so`` shim on LD_LIBRARY_PATH if needed."""
    env = dict(os.environ)
    shim = _rtx_library_shim()
    if shim is not None:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(shim), env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def _rtx_library_shim() -> Path | None:
    """A folder holding ``libtensorrt_rtx.so`` -> the wheel's ``libtensorrt_rtx.so.1``, where the
    TensorRT-RTX libs wheel is installed without the unversioned name (None otherwise)."""
    spec = importlib.util.find_spec("tensorrt_rtx_libs")
    if spec is None or not spec.submodule_search_locations:
        return None
    libs = Path(list(spec.submodule_search_locations)[0])
    versioned = sorted(libs.glob("libtensorrt_rtx.so.*"))
    if (libs / "libtensorrt_rtx.so").exists() or not versioned:
        return None
    from .headers import cache_root

    folder = cache_root() / "trt-rtx-shim" / hashlib.sha256(str(libs).encode()).hexdigest()[:12]
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "libtensorrt_rtx.so"
    if not link.exists():
        tmp = folder / f".link-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(versioned[0])
        os.replace(tmp, link)
    return folder


def with_size_outputs(onnx_path: Path) -> bytes:
    """The graph as TensorRT must see it: each ``dhsa::ChunkOffsets`` node with a second output, the
    size tensor of its data-dependent width (the plugin declares it; the op contract has one output).
    External data stays where it is (the parser finds it from ``onnx_path``)."""
    import onnx

    from ...onnx.registry import CHUNK_OFFSETS

    model = onnx.load(str(onnx_path), load_external_data=False)
    for node in model.graph.node:
        if node.domain == CHUNK_OFFSETS.domain and node.op_type == CHUNK_OFFSETS.name and len(node.output) == 1:
            node.output.append(f"{node.output[0]}__width")
    return model.SerializeToString()


def _build(onnx_path: Path, plugin: Path, output: Path, shapes: dict[str, ShapeRange],
           workspace_mb: int | None) -> Path:
    """The build itself (in the child process)."""
    trt = import_tensorrt()
    logger = _collecting_logger(trt)
    load_plugin_library(trt, plugin)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(with_size_outputs(onnx_path), str(onnx_path)):
        errors = logger.errors + [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise DHSAError(f"{trt.__name__} could not parse {onnx_path}: {' | '.join(errors)}")
    config = builder.create_builder_config()
    if workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    _add_profile(builder, network, config, shapes)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DHSAError(f"{trt.__name__} could not build an engine from {onnx_path}: "
                        f"{' | '.join(logger.errors) or 'no error message'}")
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", dir=output.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(memoryview(serialized))
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the engine from the service that runs it
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return output


def _child_main(request_file: str) -> int:
    request = json.loads(Path(request_file).read_text())
    result_file = Path(request["result"])
    shapes = {name: ShapeRange(*(tuple(s) for s in spec)) for name, spec in request["shapes"].items()}
    try:
        engine = _build(Path(request["onnx"]), Path(request["plugin"]), Path(request["output"]), shapes,
                        request["workspace_mb"])
    except DHSAError as exc:
        result_file.write_text(json.dumps({"error": str(exc)}))
        return 1
    result_file.write_text(json.dumps({"engine": str(engine)}))
    return 0


def _add_profile(builder, network, config, shapes: dict[str, ShapeRange]) -> None:
    """One optimization profile: every dynamic input must have a range in ``shapes``."""
    dynamic = [network.get_input(i) for i in range(network.num_inputs)
               if any(d < 0 for d in network.get_input(i).shape)]
    if not dynamic:
        return
    missing = [t.name for t in dynamic if t.name not in shapes]
    if missing:
        raise DHSAError(f"dynamic inputs {', '.join(missing)} have no shape range; pass shapes={{name: "
                        "ShapeRange(min, opt, max)}} for each")
    profile = builder.create_optimization_profile()
    for tensor in dynamic:
        spec = shapes[tensor.name]
        profile.set_shape(tensor.name, spec.min, spec.opt, spec.max)
    config.add_optimization_profile(profile)


if __name__ == "__main__":
    raise SystemExit(_child_main(sys.argv[1]))
