"""Rewrite foreign dense ONNX decoders into the DHSA prefill graph (``dhsa-export rewrite``).

One rule per foreign attention form, each a module with pattern / check / rewrite:

- :mod:`.group_query_attention`: ``com.microsoft.GroupQueryAttention`` (onnxruntime-genai model builder;
  packed or separate QKV, rotary inside or outside the op);
- :mod:`.onnx_attention`: the ONNX ``Attention`` op (torch.onnx at opset 23);
- :mod:`.matmul_softmax`: ``MatMul -> scale -> causal mask -> Softmax -> MatMul`` (torch.onnx eager
  attention, decomposed SDPA).

Every matched attention becomes ``dhsa::Route`` + ``dhsa::BlockSparseAttention`` built from the op
registry exactly as :mod:`dhsa_export.onnx.export` emits them (with the ``dynamic`` pattern,
:mod:`.dynamic_chunks` then adds the one ``dhsa::ChunkOffsets`` node on layer 0's keys that every
pair reads). :func:`rewrite_model` runs the rules,
reports per-rule counts and the reason for every candidate left alone, and fails when nothing matched.
"""

from .common import Rule, RuleResult
from .driver import RULES, RewriteReport, rewrite_model

__all__ = ["RULES", "RewriteReport", "Rule", "RuleResult", "rewrite_model"]
