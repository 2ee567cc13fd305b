"""INT4 weight-only quantization of the exported graphs (ONNX Runtime's MatMulNBits).

Linear weights become ``com.microsoft.MatMulNBits`` with 4-bit blocks (block size 32 by default,
symmetric, ``accuracy_level`` 4 so the CPU kernel uses int8 activations). The output projection
(lm_head) and the embedding stay fp32 unless asked for: on small models they are a large share
of the weights and the most sensitive to rounding.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DHSAError

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128, 256)


def quantize_int4(path: Path, block_size: int = 32, include_lm_head: bool = False,
                  accuracy_level: int = 4) -> int:
    """Quantize the MatMuls of ``path`` in place; returns how many MatMuls were replaced."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise DHSAError(
            f"int4 block size {block_size} is not supported; use one of {', '.join(map(str, SUPPORTED_BLOCK_SIZES))}"
        )
    model = onnx.load(str(path), load_external_data=True)
    exclude = [] if include_lm_head else _lm_head_nodes(model)
    before = sum(node.op_type == "MatMul" for node in model.graph.node)
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=True,
                                     accuracy_level=accuracy_level, nodes_to_exclude=exclude)
    quantizer.process()
    quantized = quantizer.model.model
    after = sum(node.op_type == "MatMul" for node in quantized.graph.node)
    onnx.save(quantized, str(path), save_as_external_data=True, location=path.name + ".data",
              size_threshold=1024)
    return before - after


def _lm_head_nodes(model) -> list[str]:
    """The MatMul that produces the ``logits`` output (possibly through a Reshape/Cast)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    node = producers.get("logits")
    while node is not None and node.op_type != "MatMul":
        node = producers.get(node.input[0]) if node.op_type in ("Reshape", "Cast", "Identity") else None
    return [node.name] if node is not None else []
