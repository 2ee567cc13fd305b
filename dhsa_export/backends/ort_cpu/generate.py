"""Greedy generation from a built ONNX Runtime artifact: DHSA prefill graph, dense decode graph.

The manifest is verified (every file's sha256) before the custom-op library is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ...artifact import read_manifest, require_ort_cpu
from ...errors import DHSAError


def session_with_library(model_path: Path, library: Path, threads: int | None = None):
    """An ORT CPU session with the dhsa custom-op library registered."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    if threads:
        options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own pybind types
        raise DHSAError(f"ONNX Runtime could not load {model_path.name}: {str(exc).splitlines()[0]}; rebuild the artifact") from None


@dataclass
class ArtifactSessions:
    folder: Path
    manifest: dict
    prefill: object
    decode: object
    tokenizer: object

    @property
    def layers(self) -> int:
        return int(self.manifest["model"]["layers"])


def open_artifact(folder: str | Path, threads: int | None = None, verify: bool = True) -> ArtifactSessions:
    """Verify the manifest, then build both sessions and the tokenizer."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    manifest = read_manifest(folder, verify=verify)
    require_ort_cpu(folder, manifest, "run")
    library = folder / manifest["library"]
    prefill = session_with_library(folder / manifest["graphs"]["prefill"], library, threads)
    decode = session_with_library(folder / manifest["graphs"]["decode"], library, threads)
    tokenizer = AutoTokenizer.from_pretrained(str(folder / manifest["tokenizer"]))
    return ArtifactSessions(folder, manifest, prefill, decode, tokenizer)


def generate_tokens(
    sessions: ArtifactSessions,
    input_ids: list[int],
    max_new_tokens: int,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """Greedy decode: one prefill call, then one decode call per new token; stops at EOS."""
    max_length = int(sessions.manifest["model"]["max_length"])
    if len(input_ids) + max_new_tokens > max_length:
        raise DHSAError(
            f"prompt of {len(input_ids)} tokens plus {max_new_tokens} new tokens exceeds the "
            f"{max_length}-token context of {sessions.manifest['model']['name']}; shorten the prompt"
        )
    eos = set(sessions.manifest["model"]["eos_token_id"])
    ids = np.asarray([input_ids], dtype=np.int64)
    logits, *present = sessions.prefill.run(None, {"input_ids": ids})
    past_names = [port.name for port in sessions.decode.get_inputs()[1:]]
    generated: list[int] = []
    for _ in range(max_new_tokens):
        token = int(np.argmax(logits[0, -1]))
        if token in eos:
            break
        generated.append(token)
        if on_token is not None:
            on_token(token)
        feeds = {"input_ids": np.asarray([[token]], dtype=np.int64), **dict(zip(past_names, present))}
        logits, *present = sessions.decode.run(None, feeds)
    return generated
