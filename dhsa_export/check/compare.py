"""``check``: Polygraphy comparison of a built artifact against the PyTorch reference.

Two runners go into Polygraphy's ``Comparator``: an ``OnnxrtRunner`` whose session loads the
artifact's custom-op library (Polygraphy's ``--onnxrt`` CLI cannot), and
:class:`TorchReferenceRunner`, the PyTorch DHSA reference (the same wrapper module the graph was
exported from, run eagerly). Inputs are generated prompts of several lengths. Per output we report
the max absolute and relative error and pass/fail against stated tolerances.

Saved outputs use Polygraphy's RunResults JSON, so ``polygraphy inspect data FILE`` reads them.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..artifact import read_manifest, require_ort_cpu
from ..errors import DHSAError

DEFAULT_LENGTHS = (96, 700, 1500)


@dataclass(frozen=True)
class Tolerances:
    """|ort - ref| <= atol + rtol * |ref| elementwise (Polygraphy's simple comparison)."""

    atol: float
    rtol: float


FP32_TOLERANCES = Tolerances(atol=2e-3, rtol=2e-3)
# INT4 weights against the fp32 reference: quantization error, not a kernel error, dominates.
INT4_TOLERANCES = Tolerances(atol=5.0, rtol=1.0)


def _torch_runner_class():
    from polygraphy.backend.base import BaseRunner

    class TorchReferenceRunner(BaseRunner):
        """Polygraphy runner for the PyTorch reference prefill graph (CPU, fp32)."""

        def __init__(self, wrapper, output_names, name="torch-reference"):
            super().__init__(name=name, prefix="torch-reference")
            self.wrapper, self._output_names = wrapper, output_names

        def activate_impl(self):
            pass

        def deactivate_impl(self):
            pass

        def get_input_metadata_impl(self):
            from polygraphy.common import TensorMetadata

            return TensorMetadata().add("input_ids", np.int64, (1, -1))

        def infer_impl(self, feed_dict):
            import torch

            ids = torch.from_numpy(np.asarray(feed_dict["input_ids"], dtype=np.int64))
            start = time.perf_counter()
            with torch.no_grad():
                outputs = self.wrapper(ids)
            self.inference_time = time.perf_counter() - start
            return OrderedDict((n, o.numpy()) for n, o in zip(self._output_names, outputs))

    return TorchReferenceRunner


def graph_output_names(path: Path) -> list[str]:
    """Output names read from the graph alone (no weights loaded, no session built)."""
    import onnx

    return [output.name for output in onnx.load(str(path), load_external_data=False).graph.output]


def generated_prompts(tokenizer, lengths, seed: int = 0) -> list[dict]:
    """Token sequences of the given lengths from a deterministic text (no data files needed)."""
    from ..eval.haystack import default_haystack_text

    text = default_haystack_text()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) < max(lengths):
        ids = ids + ids
    rng = np.random.default_rng(seed)
    feeds = []
    for length in lengths:
        start = int(rng.integers(0, len(ids) - length + 1))
        feeds.append({"input_ids": np.asarray([ids[start:start + length]], dtype=np.int64)})
    return feeds


def check_artifact(folder: str | Path, lengths=DEFAULT_LENGTHS, json_path: str | None = None,
                   save_outputs: str | None = None, threads: int | None = None) -> dict:
    """Compare ONNX Runtime against the PyTorch reference on generated prompts."""
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR  # our own report is printed instead of per-run dumps

    from ..backends.ort_cpu.generate import session_with_library
    from ..build import manifest_config
    from ..hf.models import load_model
    from ..onnx.export import PrefillGraph, install_export_attention

    folder = Path(folder)
    manifest = read_manifest(folder, verify=True)
    require_ort_cpu(folder, manifest, "check")
    model_info = manifest["model"]
    cfg = manifest_config(folder, manifest)
    tolerances = INT4_TOLERANCES if manifest.get("quantization") else FP32_TOLERANCES
    too_long = [n for n in lengths if n > model_info["max_length"]]
    if too_long:
        raise DHSAError(f"check lengths {too_long} exceed the model's {model_info['max_length']} tokens")

    loaded = load_model(model_info["spec"], layers=model_info["layers"])
    wrapper = PrefillGraph(loaded.model, install_export_attention(loaded.model, cfg)).eval()
    prefill_path = folder / manifest["graphs"]["prefill"]
    library = folder / manifest["library"]
    ort_runner = OnnxrtRunner(lambda: session_with_library(prefill_path, library, threads), name="onnxruntime")
    output_names = graph_output_names(prefill_path)
    torch_runner = _torch_runner_class()(wrapper, output_names)
    feeds = generated_prompts(loaded.tokenizer, lengths)

    results = Comparator.run([ort_runner, torch_runner], data_loader=feeds, save_outputs_path=save_outputs)
    compare = SimpleCompareFunc(atol=tolerances.atol, rtol=tolerances.rtol, check_shapes=True)
    accuracy = Comparator.compare_accuracy(results, compare_func=compare)
    report = _report(results, tolerances, bool(accuracy), lengths, manifest)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2))
    return report


def _report(results, tolerances: Tolerances, polygraphy_passed: bool, lengths, manifest) -> dict:
    ort_name, torch_name = [name for name, _ in results]
    ort_iterations, torch_iterations = results[ort_name], results[torch_name]
    outputs: dict[str, dict] = {}
    for got, want in zip(ort_iterations, torch_iterations):
        for name in want.keys():
            a, b = np.asarray(got[name], dtype=np.float64), np.asarray(want[name], dtype=np.float64)
            diff = np.abs(a - b)
            entry = outputs.setdefault(name, {"name": name, "max_abs_error": 0.0, "max_rel_error": 0.0, "passed": True})
            entry["max_abs_error"] = max(entry["max_abs_error"], float(diff.max()))
            entry["max_rel_error"] = max(entry["max_rel_error"], float((diff / (np.abs(b) + 1e-6)).max()))
            entry["passed"] &= bool(np.all(diff <= tolerances.atol + tolerances.rtol * np.abs(b)))
    rows = list(outputs.values())
    return {
        "passed": polygraphy_passed and all(r["passed"] for r in rows),
        "tolerances": {"atol": tolerances.atol, "rtol": tolerances.rtol},
        "prompt_lengths": list(lengths),
        "model": manifest["model"]["name"],
        "quantization": manifest.get("quantization"),
        "dhsa": manifest["dhsa"],
        "outputs": rows,
    }
