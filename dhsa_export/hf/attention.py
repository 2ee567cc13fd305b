"""The ``"dhsa"`` attention function for transformers, registered through its attention registry.

``enable_dhsa(model, cfg)`` registers the function (and the SDPA mask builder under the same
name, so padded batches get a boolean mask), switches the model's ``_attn_implementation`` to
``"dhsa"`` and gives every attention module a shared :class:`DHSARuntime`. No module is patched:
LlamaForCausalLM, Qwen2ForCausalLM and MistralForCausalLM all call the registered function.

Prefill (more than one query) is sparse; decode (one query) is dense over the KV cache. For the
``dynamic`` pattern the key chunks are predicted once per forward pass from layer 0's key states
and shared by all layers (DESIGN.md section 2).

Backends (:func:`select_backend`): ``"reference"`` runs the per-block reference attention of
:mod:`dhsa_export.algo.attention` (any device); ``"torch-gather"`` the same attention computed on
the gathered selected keys only (any device, equal to the reference within 1e-5 in fp32);
``"torch-cuda"`` runs the CUDA block-sparse kernel (:mod:`dhsa_export.backends.torch_cuda`) after
the same torch routing on the GPU (replayed from CUDA graphs kept per model,
:attr:`DHSARuntime.routing_graphs`); ``"auto"`` (the default) takes the kernel for CUDA fp16/bf16
tensors when its library loads, ``"torch-gather"`` on the CPU, and the reference otherwise.
Padding, decode and the ``dynamic`` chunks behave the same in all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..algo.attention import BACKENDS, RoutingStats, dhsa_attention
from ..config import DHSAConfig
from ..errors import DHSAError

ATTENTION_NAME = "dhsa"
BACKEND_CHOICES = ("auto",) + BACKENDS

# A chunker maps one sequence's real layer-0 keys [Hkv, L, D] to chunk offsets [nC + 1].
Chunker = Callable[[torch.Tensor], torch.Tensor]


def select_backend(device, requested: str = "auto", dtype: torch.dtype | None = None) -> str:
    """The attention backend for tensors on ``device`` (of ``dtype``): "reference", "torch-gather"
    or "torch-cuda".

    ``"auto"`` picks "torch-cuda" when the CUDA kernel can serve them (CUDA device, fp16/bf16,
    kernel library loads or builds), "torch-gather" on the CPU (exact, computes only the selected
    keys) and "reference" otherwise; an explicit "torch-cuda" that
    cannot run raises :class:`DHSAError` saying why, instead of silently running the slow path.
    """
    _check_backend_name(requested)
    if requested in ("reference", "torch-gather"):
        return requested
    on_cuda = torch.device(device).type == "cuda"
    if not on_cuda:
        reason = f"the model runs on {torch.device(device)}; the CUDA kernel needs a CUDA device"
    else:
        from ..backends.torch_cuda import unavailable_reason

        reason = unavailable_reason(device, dtype)
    if reason is None:
        return "torch-cuda"
    if requested == "torch-cuda":
        raise DHSAError(f"DHSA backend 'torch-cuda' cannot run: {reason}; use backend='reference' or 'auto'")
    # On the CPU the gathered attention gives the reference's result (1e-5, tested) on the selected
    # keys only, 3-5x faster than the per-block masked loop; elsewhere the reference stays.
    return "reference" if on_cuda else "torch-gather"


def _check_backend_name(requested: str) -> None:
    if requested not in BACKEND_CHOICES:
        raise DHSAError(f"unknown DHSA backend {requested!r}; use one of {', '.join(BACKEND_CHOICES)}")


@dataclass
class DHSARuntime:
    """State shared by the attention modules of one model.

    ``requested_backend`` is what the user asked for ("auto", "reference", "torch-gather", "torch-cuda");
    ``backend`` is what the last prefill ran (resolved by :func:`select_backend` per device and
    dtype, cached).
    """

    cfg: DHSAConfig
    chunker: Chunker | None = None
    stats: RoutingStats = field(default_factory=RoutingStats)
    chunk_offsets: list | None = None
    requested_backend: str = "auto"
    backend: str = "reference"
    _resolved: dict = field(default_factory=dict, repr=False)
    _routing_graphs: object = field(default=None, repr=False)

    @property
    def routing_graphs(self):
        """This model's captured routing graphs (torch-cuda backend; created on first use, freed
        with the runtime, i.e. with the model or :func:`disable_dhsa`)."""
        if self._routing_graphs is None:
            from ..backends.torch_cuda.routing_graph import RoutingGraphCache

            self._routing_graphs = RoutingGraphCache()
        return self._routing_graphs

    def reset_stats(self) -> None:
        self.stats = RoutingStats()

    def backend_for(self, tensor: torch.Tensor) -> str:
        """The backend for tensors like ``tensor`` (resolved once per device and dtype)."""
        key = (tensor.device, tensor.dtype)
        if key not in self._resolved:
            self._resolved[key] = select_backend(tensor.device, self.requested_backend, tensor.dtype)
        self.backend = self._resolved[key]
        return self.backend


def register_dhsa_attention() -> None:
    """Register ``"dhsa"`` in transformers' attention and mask registries (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, dhsa_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)


def attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention modules (those with a ``layer_idx`` and q/k/v projections)."""
    return [
        module for module in model.modules()
        if hasattr(module, "layer_idx") and hasattr(module, "q_proj") and hasattr(module, "k_proj")
    ]


def enable_dhsa(model, cfg: DHSAConfig, chunker: Chunker | None = None,
                backend: str = "auto") -> DHSARuntime:
    """Switch ``model`` to DHSA prefill attention; returns the runtime (stats live there).

    ``backend``: "auto" (CUDA kernel where it can run, the gathered attention on the CPU, else
    the reference), "reference", "torch-gather" or "torch-cuda" (see :func:`select_backend`). It is resolved for the model's current device
    now (so an impossible "torch-cuda" fails here) and again if the model moves.
    """
    _check_backend_name(backend)
    register_dhsa_attention()
    if cfg.pattern == "dynamic" and chunker is None:
        from ..algo.boundaries import make_chunker

        chunker = make_chunker(cfg)
    runtime = DHSARuntime(cfg, chunker, requested_backend=backend)
    parameter = next(iter(model.parameters()), None)
    if parameter is not None:
        runtime.backend_for(parameter)
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention modules DHSA can serve")
    for module in modules:
        module.dhsa_runtime = runtime
    _set_attn_implementation(model, ATTENTION_NAME)
    return runtime


def disable_dhsa(model) -> None:
    """Back to dense SDPA attention."""
    for module in attention_modules(model):
        module.__dict__.pop("dhsa_runtime", None)
    _set_attn_implementation(model, "sdpa")


def _set_attn_implementation(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # older transformers
        model.config._attn_implementation = name


def boolean_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """transformers' 4D mask as booleans (True = attend); additive float masks are converted."""
    if attention_mask is None or attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2


def dhsa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``[B, H, L, D]`` inputs, ``[B, L, H, Dv]`` output."""
    runtime: DHSARuntime | None = getattr(module, "dhsa_runtime", None)
    if runtime is None:
        raise RuntimeError("dhsa attention called on a module without a runtime; use enable_dhsa(model, cfg)")
    mask = boolean_mask(attention_mask)
    if mask is not None and mask.shape[-1] != key.shape[-2]:
        mask = mask[..., : key.shape[-2]]
    offsets = None
    if runtime.cfg.pattern == "dynamic" and query.shape[-2] > 1:
        if getattr(module, "layer_idx", 0) == 0 or runtime.chunk_offsets is None:
            runtime.chunk_offsets = _predict_chunks(runtime, key, mask)
        offsets = runtime.chunk_offsets
    backend = runtime.backend_for(query) if query.shape[-2] > 1 else "reference"  # decode: dense in both
    graphs = runtime.routing_graphs if backend == "torch-cuda" else None
    output = dhsa_attention(query, key, value, runtime.cfg, scaling, mask, offsets, runtime.stats, backend,
                            routing_graphs=graphs)
    return output.transpose(1, 2).contiguous(), None


def _predict_chunks(runtime: DHSARuntime, key: torch.Tensor, mask: torch.Tensor | None) -> list:
    """Chunk offsets per batch item over that item's real keys (padding removed)."""
    offsets = []
    for b in range(key.shape[0]):
        keys = key[b]
        if mask is not None:
            real = mask[b].any(dim=0).any(dim=0).nonzero().squeeze(1)
            keys = keys[:, real]
        offsets.append(runtime.chunker(keys))
    return offsets
