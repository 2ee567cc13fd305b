"""INT4 weight-only quantization of the exported graphs, in the form each runtime takes.

- ``matmulnbits`` (ONNX Runtime): linear weights become ``com.microsoft.MatMulNBits`` with 4-bit
  blocks (block size 32 by default, symmetric, ``accuracy_level`` 4 so the CPU kernel uses int8
  activations).
- ``qdq`` (TensorRT): each linear weight becomes an int4 initializer + a block-wise
  ``DequantizeLinear`` (opset 21 ``block_size`` along the input dimension, symmetric: no zero
  point, which TensorRT rejects) feeding the unchanged ``MatMul``; scales in the graph's dtype.

Both come from ONNX Runtime's ``MatMulNBitsQuantizer`` with the same symmetric block scheme, so the
two forms hold the same 4-bit weights. The output projection (lm_head) and the embedding stay in
the graph's precision unless asked for: on small models they are a large share of the weights and
the most sensitive to rounding.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

from ..errors import DHSAError

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128, 256)
FORMATS = ("matmulnbits", "qdq")


def quantize_int4(path: Path, block_size: int = 32, include_lm_head: bool = False,
                  accuracy_level: int = 4, form: str = "matmulnbits") -> int:
    """Quantize the MatMul weights of ``path`` in place (``form``: see the module doc); returns how
    many MatMuls were quantized."""
    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise DHSAError(
            f"int4 block size {block_size} is not supported; use one of {', '.join(map(str, SUPPORTED_BLOCK_SIZES))}"
        )
    if form not in FORMATS:
        raise DHSAError(f"int4 form {form!r} is not one of {', '.join(FORMATS)}")
    model = onnx.load(str(path), load_external_data=True)
    exclude = [] if include_lm_head else _lm_head_nodes(model)
    before = _count(model, "MatMul"), _count(model, "DequantizeLinear")
    if form == "qdq":
        quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=True,
                                         nodes_to_exclude=exclude, quant_format=QuantFormat.QDQ)
    else:
        quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=True,
                                         accuracy_level=accuracy_level, nodes_to_exclude=exclude)
    with _quiet("onnxruntime.quantization.matmul_nbits_quantizer"):  # an INFO line per node otherwise
        quantizer.process()
    quantized = quantizer.model.model
    onnx.save(quantized, str(path), save_as_external_data=True, location=path.name + ".data",
              size_threshold=1024)
    if form == "qdq":  # every quantized MatMul gets one DequantizeLinear on its weight
        return _count(quantized, "DequantizeLinear") - before[1]
    return before[0] - _count(quantized, "MatMul")


@contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _count(model, op_type: str) -> int:
    return sum(node.op_type == op_type and node.domain in ("", "ai.onnx") for node in model.graph.node)


def _lm_head_nodes(model) -> list[str]:
    """The MatMul that produces the ``logits`` output (possibly through a Reshape/Cast)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    node = producers.get("logits")
    while node is not None and node.op_type != "MatMul":
        node = producers.get(node.input[0]) if node.op_type in ("Reshape", "Cast", "Identity") else None
    return [node.name] if node is not None else []
