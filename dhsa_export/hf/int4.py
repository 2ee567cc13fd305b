"""Weight-only INT4 for torch models (any device): packed weights, dequantized on the fly.

Scheme: symmetric, block-wise along the input dimension. Each block of ``block_size`` weights of
one output row gets one bf16 scale ``max|w| / 7``; a weight is stored as ``round(w / scale)`` in
[-7, 7], offset by 8 into a nibble, two nibbles per byte (even input index in the low nibble, as
ONNX Runtime's MatMulNBits stores them). The error of every weight is at most half its block's
scale. Rows whose input size is not a multiple of the block are zero-padded at the end.

Compute: prefill dequantizes and multiplies with cuBLAS (transient: one weight at a time, or one
MLP while :func:`dequantized_weights` holds it; the output projection in slabs of rows). Decode on
CUDA (at most a few rows) runs a Triton kernel that reads the packed weights directly
(:mod:`dhsa_export.backends.torch_cuda.int4_triton`), since dequantizing writes and re-reads a bf16
copy of every weight per token. torch's own ``_weight_int4pack_mm`` (tinygemm, present in torch 2.11
and 2.13) was not used: it takes an opaque tiled layout that cannot serve the prefill products, so it
would need a second copy of every weight, which a 24 GiB budget cannot hold.

- :class:`Int4Linear` replaces ``nn.Linear``; :class:`Int4Embedding` replaces ``nn.Embedding``
  (rows are gathered packed, then dequantized).
- :func:`quantize_model` converts a loaded model in place.
- :func:`materialize_int4` turns a model built on the meta device into an INT4 model with seeded
  random weights, one weight at a time, so full-precision weights of the whole model never exist
  (used for the 8B-shaped memory benchmark; random weights are fine for memory and speed).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DHSAError

INT4_BLOCK_SIZES = (16, 32, 64, 128, 256)
QMAX = 7  # symmetric range [-7, 7]: the bound |w - w_q| <= scale / 2 holds for every weight
OFFSET = 8  # stored nibble = q + 8
SCALE_DTYPE = torch.bfloat16
# Largest weight slab (elements) quantized or dequantized at once: 64M elements is 128 MiB in
# bf16, so neither the output projection (525M elements at LLaMA-3 8B shape) nor a random weight
# being created ever needs a full-precision copy of itself.
SLAB_ELEMENTS = 1 << 26


@dataclass
class PackedInt4:
    """One quantized ``[out_features, in_features]`` weight: ``packed`` uint8
    ``[out, padded_in / 2]`` and ``scales`` bf16 ``[out, padded_in / block_size]``."""

    packed: torch.Tensor
    scales: torch.Tensor
    in_features: int
    block_size: int

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scales.numel() * self.scales.element_size()


def check_block_size(block_size: int) -> None:
    if block_size not in INT4_BLOCK_SIZES:
        raise DHSAError(f"int4 block size {block_size} is not supported; use one of "
                        f"{', '.join(map(str, INT4_BLOCK_SIZES))}")


def padded_size(in_features: int, block_size: int) -> int:
    return math.ceil(in_features / block_size) * block_size


def quantize_int4(weight: torch.Tensor, block_size: int = 32) -> PackedInt4:
    """Quantize a 2-D weight (on its own device) in slabs of rows; see the module docstring."""
    check_block_size(block_size)
    if weight.dim() != 2:
        raise DHSAError(f"int4 quantization takes 2-D weights, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    width = padded_size(cols, block_size)
    packed = torch.empty(rows, width // 2, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(rows, width // block_size, dtype=SCALE_DTYPE, device=weight.device)
    step = max(1, SLAB_ELEMENTS // width)
    for start in range(0, rows, step):
        end = min(rows, start + step)
        packed[start:end], scales[start:end] = _quantize_rows(weight[start:end], block_size, width)
    return PackedInt4(packed, scales, cols, block_size)


def _quantize_rows(rows: torch.Tensor, block_size: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed nibbles and bf16 scales of a slab of rows (computed in fp32)."""
    w = rows.float()
    if width != w.shape[1]:
        w = F.pad(w, (0, width - w.shape[1]))
    blocks = w.view(w.shape[0], width // block_size, block_size)
    # times the fp32 reciprocal (not a division): CUDA divides by a scalar that way, so CPU and
    # GPU give bit-identical scales
    scales = (blocks.abs().amax(dim=-1) * (1.0 / QMAX)).to(SCALE_DTYPE)
    # quantize with the stored (rounded) scale, so dequantization reproduces the grid exactly;
    # an all-zero block keeps scale 0 and quantizes to zeros
    divisor = torch.where(scales == 0, torch.ones_like(scales), scales).float()
    q = torch.round(blocks / divisor[..., None]).clamp_(-OFFSET, QMAX).to(torch.int16) + OFFSET
    nibbles = q.view(w.shape[0], width).to(torch.uint8)
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4), scales


def dequantize_int4(weight: PackedInt4, dtype: torch.dtype = torch.float32,
                    rows: slice | None = None) -> torch.Tensor:
    """``[out, in]`` (or the ``rows`` slice of it) in ``dtype``: ``(nibble - 8) * scale``.

    In bf16 the product rounds once (the int4 error is ~100x larger); in fp32 it is exact.
    """
    packed = weight.packed if rows is None else weight.packed[rows]
    scales = weight.scales if rows is None else weight.scales[rows]
    count = packed.shape[0]
    nibbles = torch.stack((packed & 0x0F, packed >> 4), dim=-1).view(count, -1)
    values = nibbles.to(dtype).sub_(OFFSET)
    values = values.view(count, scales.shape[1], -1).mul_(scales.to(dtype)[..., None]).view(count, -1)
    return values[:, : weight.in_features] if values.shape[1] != weight.in_features else values


class Int4Linear(nn.Module):
    """``nn.Linear`` with an INT4 weight: ``y = x @ dequant(W).T + b`` in the input's dtype.

    The weight is dequantized per call (transient) unless a :func:`dequantized_weights` block
    holds it for repeated calls (e.g. the chunks of one MLP); on CUDA, inputs of a few rows
    (decode) go through a kernel that reads the packed weight directly.
    """

    def __init__(self, weight: PackedInt4, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.block_size = weight.in_features, weight.block_size
        self.out_features = weight.out_features
        self.register_buffer("packed", weight.packed)
        self.register_buffer("scales", weight.scales)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self._hold = 0
        self._held: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 32) -> "Int4Linear":
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(quantize_int4(linear.weight.detach(), block_size), bias)

    @property
    def weight_int4(self) -> PackedInt4:
        return PackedInt4(self.packed, self.scales, self.in_features, self.block_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int4(self.weight_int4, dtype)

    def hold(self) -> None:
        self._hold += 1

    def release(self) -> None:
        self._hold = max(0, self._hold - 1)
        if self._hold == 0:
            self._held = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if self._hold:
            if self._held is None or self._held.dtype != x.dtype:
                self._held = self.dequantize(x.dtype)
            return F.linear(x, self._held, bias)
        if x.is_cuda and _rows_kernel_ready(x, self.block_size):
            from ..backends.torch_cuda.int4_triton import int4_rows_matmul

            out = int4_rows_matmul(x, self.packed, self.scales, self.in_features, self.block_size)
            return out + bias if bias is not None else out
        step = max(1, SLAB_ELEMENTS // self.packed.shape[1] // 2)
        if step >= self.out_features:
            return F.linear(x, self.dequantize(x.dtype), bias)
        out = x.new_empty(*x.shape[:-1], self.out_features)
        for start in range(0, self.out_features, step):
            rows = slice(start, min(self.out_features, start + step))
            out[..., rows] = F.linear(x, dequantize_int4(self.weight_int4, x.dtype, rows),
                                      bias[rows] if bias is not None else None)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, block_size={self.block_size}")


def _rows_kernel_ready(x: torch.Tensor, block_size: int) -> bool:
    """Whether the CUDA kernel for a few rows (decode) serves ``x``: it reads the packed weights
    once instead of writing and reading a bf16 copy (:mod:`dhsa_export.backends.torch_cuda.int4_triton`)."""
    from ..backends.torch_cuda import int4_triton

    return int4_triton.supports(x, block_size) and int4_triton.ready(x.device)


class Int4Embedding(nn.Module):
    """``nn.Embedding`` with INT4 rows: the packed rows of the ids are gathered, then dequantized
    to ``dtype`` (the model's activation dtype)."""

    def __init__(self, weight: PackedInt4, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.out_features, weight.in_features
        self.block_size, self.dtype = weight.block_size, dtype
        self.register_buffer("packed", weight.packed)
        self.register_buffer("scales", weight.scales)

    @property
    def weight_int4(self) -> PackedInt4:
        return PackedInt4(self.packed, self.scales, self.embedding_dim, self.block_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = PackedInt4(self.packed[flat], self.scales[flat], self.embedding_dim, self.block_size)
        return dequantize_int4(rows, self.dtype).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, block_size={self.block_size}, dtype={self.dtype}"


@contextmanager
def dequantized_weights(module: nn.Module) -> Iterator[None]:
    """Inside the block every :class:`Int4Linear` under ``module`` dequantizes once and reuses
    the result (freed on exit): repeated calls on chunks of a sequence pay one dequantization."""
    linears = [m for m in module.modules() if isinstance(m, Int4Linear)]
    for linear in linears:
        linear.hold()
    try:
        yield
    finally:
        for linear in linears:
            linear.release()


def quantize_model(model: nn.Module, block_size: int = 32, embeddings: bool = True,
                   lm_head: bool = True) -> int:
    """Replace the decoder's ``nn.Linear`` layers (and, by default, the input embedding and the
    output projection) with INT4 modules, in place; returns how many modules were replaced.

    Tied input/output embeddings stay tied: both modules share one packed copy.
    """
    check_block_size(block_size)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if _tied_output(model) and embeddings != lm_head:
        raise DHSAError("the model ties its input and output embeddings; quantize both or neither")
    shared: dict[int, PackedInt4] = {}
    replaced = 0
    for parent, name, child in list(_named_children(model)):
        if (child is head and not lm_head) or (child is embed and not embeddings):
            continue
        if isinstance(child, (nn.Linear, nn.Embedding)):
            key = id(child.weight)
            if key not in shared:
                shared[key] = quantize_int4(child.weight.detach(), block_size)
            setattr(parent, name, _int4_module(child, shared[key]))
            replaced += 1
    return replaced


def _named_children(model: nn.Module):
    for parent in model.modules():
        for name, child in parent.named_children():
            yield parent, name, child


def _int4_module(module: nn.Module, weight: PackedInt4) -> nn.Module:
    if isinstance(module, nn.Embedding):
        return Int4Embedding(weight, module.weight.dtype)
    bias = module.bias.detach() if module.bias is not None else None
    return Int4Linear(weight, bias)


# A weight initializer: (rows, cols, generator, device, dtype) -> a [rows, cols] slab of weights.
WeightInit = Callable[[int, int, torch.Generator, torch.device, torch.dtype], torch.Tensor]


def normal_init(std: float) -> WeightInit:
    """Normal(0, std) slabs, as transformers initializes Linear and Embedding weights."""

    def init(rows: int, cols: int, generator: torch.Generator, device, dtype) -> torch.Tensor:
        return torch.randn(rows, cols, generator=generator, device=device, dtype=dtype).mul_(std)

    return init


def random_int4(rows: int, cols: int, block_size: int, generator: torch.Generator, device,
                init: WeightInit, dtype: torch.dtype = torch.bfloat16) -> PackedInt4:
    """A random weight created and quantized slab by slab (no full-precision copy of it exists)."""
    width = padded_size(cols, block_size)
    packed = torch.empty(rows, width // 2, dtype=torch.uint8, device=device)
    scales = torch.empty(rows, width // block_size, dtype=SCALE_DTYPE, device=device)
    step = max(1, SLAB_ELEMENTS // width)
    for start in range(0, rows, step):
        end = min(rows, start + step)
        slab = init(end - start, cols, generator, device, dtype)
        packed[start:end], scales[start:end] = _quantize_rows(slab, block_size, width)
    return PackedInt4(packed, scales, cols, block_size)


def materialize_int4(model: nn.Module, device, block_size: int = 32, seed: int = 0,
                     init: WeightInit | None = None, dtype: torch.dtype = torch.bfloat16) -> int:
    """Turn a model built on the meta device into an INT4 model on ``device``, in place.

    Every ``nn.Linear`` and ``nn.Embedding`` becomes an INT4 module with seeded random weights
    (``init``, default Normal(0, config.initializer_range)); other parameters are created on
    ``device`` (norm weights one, biases zero); the rotary embedding is rebuilt there. Modules are
    handled in order, so at most one weight slab exists in full precision at any time.
    Returns the number of INT4 modules.
    """
    check_block_size(block_size)
    device = torch.device(device)
    std = float(getattr(getattr(model, "config", None), "initializer_range", 0.02))
    init = init or normal_init(std)
    generator = torch.Generator(device=device).manual_seed(seed)
    tied = _tied_output(model)
    shared: dict[int, PackedInt4] = {}
    count = 0
    for parent, name, child in list(_named_children(model)):
        if isinstance(child, (nn.Linear, nn.Embedding)):
            key = id(child.weight)
            if key not in shared:
                rows, cols = child.weight.shape
                shared[key] = random_int4(rows, cols, block_size, generator, device, init, dtype)
            module = _int4_module(child, shared[key])
            if getattr(module, "bias", None) is not None:
                module.bias = nn.Parameter(torch.zeros(module.out_features, device=device, dtype=dtype),
                                           requires_grad=False)
            setattr(parent, name, module)
            count += 1
    _materialize_rest(model, device, dtype)
    if tied:
        _check_tied(model)
    return count


def _tied_output(model: nn.Module) -> bool:
    if not (hasattr(model, "get_output_embeddings") and hasattr(model, "get_input_embeddings")):
        return False
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embed is not None and head.weight is embed.weight


def _check_tied(model: nn.Module) -> None:
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head.packed is not embed.packed:
        raise DHSAError("tied embeddings lost their sharing during int4 materialization")


def _materialize_rest(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Create the remaining meta parameters (norm weights = 1, others 0) and rebuild rotary
    embeddings, whose non-persistent frequency buffers cannot be created on the meta device."""
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "config"):
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                value = torch.ones if "norm" in type(module).__name__.lower() else torch.zeros
                setattr(module, name, nn.Parameter(value(param.shape, device=device, dtype=dtype),
                                                   requires_grad=False))
    for parent, name, child in list(_named_children(model)):
        if type(child).__name__.endswith("RotaryEmbedding") and hasattr(child, "config"):
            with torch.device(device):  # every tensor it makes (also plain attributes) lands there
                setattr(parent, name, type(child)(config=child.config))
    leftover = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise DHSAError(f"int4 materialization left meta tensors {leftover[:5]}; this architecture "
                        "is not supported by the random int4 builder")


def int4_nbytes(model: nn.Module) -> int:
    """Bytes of packed weights and scales held by the model's INT4 modules (shared ones once)."""
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, (Int4Linear, Int4Embedding)) and module.packed.data_ptr() not in seen:
            seen.add(module.packed.data_ptr())
            total += module.weight_int4.nbytes
    return total
