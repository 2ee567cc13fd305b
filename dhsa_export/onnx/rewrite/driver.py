"""``rewrite_model``: run every rule over a foreign dense decoder and write the DHSA prefill graph.

Loading keeps external data working (tensors are read from beside the input; a model that had
external data, or whose weights pass half the 2 GB protobuf limit, is saved with one external data
file ``OUT.onnx.data``). The result is checked (ONNX checker and strict shape inference, whenever
the input passes them; the builder's graphs use ORT-only ops the checker rejects), written into a
temporary folder beside the output and renamed into place only then, so a failure leaves no
half-written output.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from ...config import DHSAConfig
from ...errors import DHSAError
from ..registry import BLOCK_SPARSE_ATTENTION
from .common import Rule, RuleResult
from .dynamic_chunks import add_dynamic_chunks
from .graph import Graph, validation_error
from .group_query_attention import GroupQueryAttentionRule
from .matmul_softmax import MatMulSoftmaxRule
from .onnx_attention import OnnxAttentionRule

RULES: tuple[Rule, ...] = (GroupQueryAttentionRule(), OnnxAttentionRule(), MatMulSoftmaxRule())
PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_THRESHOLD = 1024  # bytes; smaller tensors stay inside the .onnx file


@dataclass
class RewriteReport:
    """Per-rule change counts and reasons, the inputs that dropped out, where the graph went."""

    source: str
    output: Path | None
    results: list[RuleResult]
    dropped_inputs: list[str] = field(default_factory=list)
    external_data: bool = False
    model: onnx.ModelProto | None = field(default=None, repr=False)  # only when not saved
    validated: bool = False  # ONNX checker + strict shape inference passed on the result
    chunked_layers: int = 0  # dynamic pattern: Route nodes reading the one ChunkOffsets node

    @property
    def total(self) -> int:
        return sum(r.changed for r in self.results)

    def counts(self) -> dict[str, int]:
        return {r.rule: r.changed for r in self.results}

    def lines(self, verbose: bool = False) -> list[str]:
        out = []
        for result in self.results:
            out.append(f"{result.rule}: {result.changed} changed, {len(result.rejected)} left alone "
                       f"({result.pattern})")
            if verbose:
                out.extend(f"  {name}: {reason}" for name, reason in result.rejected)
        return out

    def tried(self) -> str:
        """One line naming every pattern tried and what each found (for the zero-match error)."""
        parts = []
        for result in self.results:
            if not result.rejected:
                parts.append(f"{result.rule} [{result.pattern}]: no candidate node")
            else:
                name, reason = result.rejected[0]
                more = f" (+{len(result.rejected) - 1} more)" if len(result.rejected) > 1 else ""
                parts.append(f"{result.rule} [{result.pattern}]: {reason}{more}")
        return "; ".join(parts)


def rewrite_model(model_or_path, out_path: str | os.PathLike | None, cfg: DHSAConfig,
                  rules: tuple[Rule, ...] = RULES) -> RewriteReport:
    """Rewrite every dense causal attention of ``model_or_path`` into ``dhsa::Route`` +
    ``dhsa::BlockSparseAttention`` and save the result to ``out_path`` (None: rewrite in memory only,
    the report's ``model`` holds the result). Raises :class:`DHSAError` when nothing matched,
    naming the patterns tried and why their candidates were left alone."""
    if cfg.boundary_predictor:
        from ...algo.boundaries import check_predictor_option

        check_predictor_option(cfg)
    model, source, external = _load(model_or_path)
    input_error = validation_error(model)
    graph = Graph(model)
    results = [rule.run(graph, cfg) for rule in rules]
    report = RewriteReport(source, None, results, external_data=external)
    if report.total == 0:
        done = len(graph.find(BLOCK_SPARSE_ATTENTION.name, BLOCK_SPARSE_ATTENTION.domain))
        hint = f" (it already holds {done} {BLOCK_SPARSE_ATTENTION.qualified_name} nodes)" if done else ""
        raise DHSAError(f"no attention to rewrite in {source}{hint}: tried {report.tried()}")
    report.dropped_inputs = graph.finish()
    if cfg.pattern == "dynamic" and (cfg.boundary_predictor or cfg.boundary_rule != "fixed"):
        report.chunked_layers = add_dynamic_chunks(graph, cfg)
        graph.finish()
    if input_error is None:  # a foreign graph the checker already rejects (e.g. ORT-only ops) is not re-checked
        output_error = validation_error(model)
        if output_error is not None:
            raise DHSAError(f"the rewritten graph fails the ONNX checker or shape inference ({output_error}); "
                            "this is a bug in a rewrite rule, please report it with the input model")
    report.validated = input_error is None
    if out_path is None:
        report.model = model
    else:
        report.external_data = external or _weight_bytes(model) > PROTOBUF_LIMIT // 2
        report.output = save_atomically(model, Path(out_path), report.external_data)
    return report


def _load(model_or_path) -> tuple[onnx.ModelProto, str, bool]:
    if isinstance(model_or_path, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(model_or_path)
        return model, "the given model", _has_external(model)
    path = Path(model_or_path)
    if not path.is_file():
        raise DHSAError(f"input model {str(path)!r} does not exist; pass the path of an .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError, RuntimeWarning, ...
        raise DHSAError(f"{str(path)!r} is not an ONNX model ({type(exc).__name__}); pass an .onnx file") from None
    if not model.graph.node or not model.opset_import:
        raise DHSAError(f"{str(path)!r} is not an ONNX model (no graph nodes); pass an .onnx file")
    external = _has_external(model)
    if external:
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError) as exc:
            raise DHSAError(f"the external data of {str(path)!r} cannot be read ({exc}); keep the data "
                            "file(s) beside the model") from None
    return model, repr(str(path)), external


def _has_external(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _weight_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def save_atomically(model: onnx.ModelProto, out: Path, external: bool) -> Path:
    """Write ``out`` (and ``out.data`` when ``external``) via a temporary folder beside it."""
    if not out.parent.is_dir():
        raise DHSAError(f"output folder {str(out.parent)!r} does not exist; create it first")
    data_name = f"{out.name}.data"
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        staged = staging / out.name
        if external:
            onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=EXTERNAL_THRESHOLD)
        else:
            onnx.save_model(model, str(staged))
        if external:
            os.replace(staging / data_name, out.parent / data_name)
        os.replace(staged, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
