"""Triton kernel for INT4 matrix-vector products (decode) straight from the packed weights.

Decode multiplies one token by every weight: it is memory-bound, and the dequantize-then-matmul
path of :class:`dhsa_export.hf.int4.Int4Linear` writes and re-reads a bf16 copy of each weight
(about 12 bytes of traffic per weight instead of 0.56). Measured on an H200 for one
``[14336, 4096]`` weight and one token: 0.56 ms that way, 0.03 ms for torch's tinygemm kernel,
which needs its own tiled layout (a second copy of the weights, more than a 24 GiB budget leaves).
This kernel reads the layout :func:`dhsa_export.hf.int4.quantize_int4` writes (two nibbles per
byte, even input index low, one bf16 scale per block) once per row of ``x``:

    y[m, n] = sum over blocks g of scale[n, g] * sum over k in g of (nibble[n, k] - 8) * x[m, k]

with fp32 accumulation. It serves inputs of at most :data:`MAX_ROWS` rows (decode steps); prefill
keeps dequantize + cuBLAS. The first use on a device checks the kernel against the dequantize
path on a small problem; a mismatch or a failure warns once and turns it off for the process.
``DHSA_INT4_TRITON=0`` turns it off.
"""

from __future__ import annotations

import os
import warnings

import torch

try:  # Triton is optional: without it INT4 layers always dequantize
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - ImportError, or a broken install
    triton = None
    tl = None

ENV_SWITCH = "DHSA_INT4_TRITON"
MAX_ROWS = 8  # the weights are read once per row: beyond a few rows dequantize + cuBLAS wins
BLOCK_N = 32
BYTES_PER_STEP = 128  # packed bytes of one row read per loop step (256 weights)
_STATE: dict = {}  # device -> True (checked) | str (why it is off)


def enabled() -> bool:
    return triton is not None and os.environ.get(ENV_SWITCH, "1") != "0"


def supports(x: torch.Tensor, block_size: int) -> bool:
    """Inputs the kernel takes: CUDA (or the interpreter), fp16/bf16/fp32, few rows, a block of
    at least 2 whose half divides the step."""
    on_device = x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (enabled() and on_device and 1 <= rows <= MAX_ROWS and BYTES_PER_STEP % (block_size // 2) == 0
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32))


if triton is not None:

    @triton.jit
    def _int4_rows_kernel(X, P, S, Y, n_out, k_in, n_groups,
                          stride_xm, stride_pn, stride_sn, stride_ym,
                          HALF: tl.constexpr, GROUPS: tl.constexpr, BLOCK: tl.constexpr):
        """BLOCK outputs of one row of x: GROUPS quantization blocks (HALF packed bytes each) per step."""
        pid = tl.program_id(0)
        m = tl.program_id(1)
        offs_n = pid * BLOCK + tl.arange(0, BLOCK)
        offs_g = tl.arange(0, GROUPS)
        offs_j = tl.arange(0, HALF)
        n_ok = offs_n < n_out
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for step in range(0, tl.cdiv(n_groups, GROUPS)):
            groups = step * GROUPS + offs_g
            g_ok = groups < n_groups
            byte = groups[:, None] * HALF + offs_j[None, :]  # [GROUPS, HALF]
            packed = tl.load(P + offs_n[:, None, None] * stride_pn + byte[None, :, :],
                             mask=n_ok[:, None, None] & g_ok[None, :, None], other=0x88)
            low = (packed & 0xF).to(tl.float32) - 8.0
            high = (packed >> 4).to(tl.float32) - 8.0
            k_even = byte * 2
            x_even = tl.load(X + m * stride_xm + k_even, mask=g_ok[:, None] & (k_even < k_in), other=0.0)
            x_odd = tl.load(X + m * stride_xm + k_even + 1, mask=g_ok[:, None] & (k_even + 1 < k_in), other=0.0)
            part = tl.sum(low * x_even.to(tl.float32)[None, :, :] + high * x_odd.to(tl.float32)[None, :, :], axis=2)
            scale = tl.load(S + offs_n[:, None] * stride_sn + groups[None, :],
                            mask=n_ok[:, None] & g_ok[None, :], other=0.0)
            acc += tl.sum(part * scale.to(tl.float32), axis=1)
        tl.store(Y + m * stride_ym + offs_n, acc.to(Y.dtype.element_ty), mask=n_ok)


def int4_rows_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, in_features: int,
                     block_size: int) -> torch.Tensor:
    """``x [..., in_features]`` times the INT4 weight's transpose -> ``[..., out_features]`` (no bias)."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    n_out = packed.shape[0]
    out = torch.empty(rows.shape[0], n_out, dtype=x.dtype, device=x.device)
    half = block_size // 2
    grid = (triton.cdiv(n_out, BLOCK_N), rows.shape[0])
    _int4_rows_kernel[grid](rows, packed, scales, out, n_out, in_features, scales.shape[1],
                            rows.stride(0), packed.stride(0), scales.stride(0), out.stride(0),
                            HALF=half, GROUPS=BYTES_PER_STEP // half, BLOCK=BLOCK_N)
    return out.view(*x.shape[:-1], n_out)


def ready(device: torch.device) -> bool:
    """Whether the kernel is on for ``device``: checked once against dequantize + matmul."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = str(device)
    if key not in _STATE:
        _STATE[key] = _self_check(device)
        if _STATE[key] is not True:
            warnings.warn(f"INT4 Triton kernel off on {key}: {_STATE[key]}; decode dequantizes instead",
                          stacklevel=2)
    return _STATE[key] is True


def status() -> dict:
    """Per device the kernel was asked for: True (on) or the reason it is off."""
    return dict(_STATE)


def _self_check(device: torch.device):
    from ...hf.int4 import dequantize_int4, quantize_int4

    try:
        gen = torch.Generator(device=device).manual_seed(0)
        for block_size, (n_out, k_in) in ((32, (100, 300)), (128, (64, 1024))):
            weight = quantize_int4(torch.randn(n_out, k_in, generator=gen, device=device), block_size)
            x = torch.randn(3, k_in, generator=gen, device=device)
            want = x @ dequantize_int4(weight, torch.float32).t()
            got = int4_rows_matmul(x, weight.packed, weight.scales, k_in, block_size)
            err = float((got - want).norm() / want.norm())
            if not err < 1e-4:
                return f"relative error {err:.2e} against dequantize + matmul (block {block_size})"
    except Exception as exc:  # noqa: BLE001 - any failure means: do not use the kernel
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return True
