"""Dynamic key-chunk boundaries for the ``dynamic`` pattern: rule, labels and learned predictor.

A *chunker* maps one sequence's layer-0 key states ``keys [Hkv, L, D]`` (post-RoPE, exactly what
transformers hands to the attention function of layer 0) to int64 chunk offsets ``[nC + 1]``
(``0 = o_0 < o_1 < ... < o_nC = L``); the chunks are shared by all layers (DESIGN.md section 2).

Conventions used throughout this module:

- **Candidate** ``c`` is the gap between tokens ``c`` and ``c + 1``. "A boundary at candidate
  ``c``" means a chunk ends with token ``c`` and the next chunk starts at offset ``c + 1``.
- With window ``w`` the candidate's *left window* is tokens ``[c-w+1, c]`` and its *right window*
  tokens ``[c+1, c+w]``. Per-candidate arrays have length ``L`` and are indexed by ``c``.

Three sources of boundaries:

- :func:`similarity_boundaries`: training-free rule on key similarity (see its docstring).
- :func:`boundary_labels`: the legacy DHSA attention-mass labels, re-derived so that they run:
  :func:`accumulate_label_masses` gives per-layer left/right masses without storing any layer's
  attention, a caller sums them over layers.
- :class:`BoundaryPredictor`: the small network trained on those labels (see
  :mod:`dhsa_export.train.boundaries`), saved as safetensors with JSON metadata and loaded (and
  validated) by :func:`load_predictor`.

Every proposal goes through :func:`enforce_chunk_limits`, which makes the chunk lengths respect
``[min_chunk, max_chunk]``.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import BOUNDARY_WINDOW, DHSAConfig
from ..errors import DHSAError
from .layout import fixed_offsets

Chunker = Callable[[torch.Tensor], torch.Tensor]

PREDICTOR_FORMAT = "dhsa-boundary-predictor"
PREDICTOR_VERSION = 1
METADATA_KEY = "dhsa_boundary_predictor"
DEFAULT_WINDOW = BOUNDARY_WINDOW
DEFAULT_RATIO = 2.0


# --------------------------------------------------------------------------- chunk limits


def enforce_chunk_limits(
    proposals: torch.Tensor | np.ndarray | list,
    length: int,
    min_chunk: int,
    max_chunk: int,
    scores: torch.Tensor | np.ndarray | None = None,
) -> torch.Tensor:
    """Turn proposed chunk starts into offsets whose chunk lengths lie in ``[min_chunk, max_chunk]``.

    Args:
        proposals: proposed chunk start offsets (``c + 1`` for a boundary at candidate ``c``);
            any order, values outside ``(0, length)`` ignored.
        length: sequence length ``L``.
        scores: optional ``[L]`` score per candidate (higher = better boundary); used to place a
            forced cut when no proposal lies in the allowed range.

    Greedy left to right from ``start = 0``: the first proposal in
    ``[start + min_chunk, start + max_chunk]`` that leaves at least ``min_chunk`` tokens after it is
    taken; proposals closer than ``min_chunk`` are dropped. If the rest of the sequence fits in one
    chunk (``L - start <= max_chunk``) and no such proposal exists, the last chunk ends at ``L``.
    Otherwise a cut is forced at the best-scoring start in
    ``[start + min_chunk, min(start + max_chunk, L - min_chunk)]`` (the latest of equal scores;
    the latest start without scores). Only when ``L`` leaves no choice (``L < min_chunk``, or
    ``max_chunk < 2 min_chunk - 1`` and the remainder cannot be split) is the last chunk shorter
    than ``min_chunk``.
    The loop runs once per chunk on numpy data: ~L / min_chunk steps, milliseconds at 128K.
    """
    length = int(length)
    if length <= 0:
        return torch.zeros(1, dtype=torch.long)
    props = np.unique(np.asarray(_to_numpy(proposals), dtype=np.int64).reshape(-1))
    props = props[(props > 0) & (props < length)].tolist()
    start_scores = None  # start p = c + 1 carries the score of candidate c
    if scores is not None:
        cand = np.asarray(_to_numpy(scores), dtype=np.float64).reshape(-1)
        start_scores = np.full(length + 1, -np.inf)
        count = min(length - 1, cand.shape[0])
        start_scores[1 : count + 1] = cand[:count]
        start_scores[~np.isfinite(start_scores)] = -np.inf
    offsets = [0]
    start = 0
    while True:
        lo, hi = start + min_chunk, start + max_chunk
        upper = min(hi, length - min_chunk)  # leave a legal last chunk
        index = bisect.bisect_left(props, lo)
        if index < len(props) and props[index] <= upper:
            chosen = props[index]
        elif length - start <= max_chunk:
            break
        else:
            cut_hi = upper if upper >= lo else min(hi, length - 1)  # remainder cannot split legally
            chosen = cut_hi
            if start_scores is not None:
                window = start_scores[lo : cut_hi + 1]
                if window.size and np.isfinite(window.max()):  # ties: the latest start (longer chunk)
                    chosen = cut_hi - int(np.argmax(window[::-1]))
        offsets.append(chosen)
        start = chosen
    offsets.append(length)
    return torch.tensor(offsets, dtype=torch.long)


def _to_numpy(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return x


def check_offsets(offsets: torch.Tensor, length: int) -> None:
    """Raise ``ValueError`` unless ``offsets`` start at 0, end at ``length`` and strictly increase."""
    if offsets.ndim != 1 or int(offsets[0]) != 0 or int(offsets[-1]) != length:
        raise ValueError(f"chunk offsets {offsets.tolist()[:8]}... do not span [0, {length}]")
    if length > 0 and not bool((offsets[1:] > offsets[:-1]).all()):
        raise ValueError("chunk offsets are not strictly increasing")


# --------------------------------------------------------------------------- training-free rule


def token_features(keys: torch.Tensor) -> torch.Tensor:
    """Per-token features from key states ``[Hkv, L, D]``: KV heads concatenated, ``[L, Hkv * D]`` fp32."""
    if keys.ndim != 3:
        raise ValueError(f"keys must be [Hkv, L, D], got shape {tuple(keys.shape)}")
    return keys.float().permute(1, 0, 2).reshape(keys.shape[1], keys.shape[0] * keys.shape[2])


def window_sums(features: torch.Tensor, window: int) -> torch.Tensor:
    """``m[j] = sum of features[j : j + window]``, ``[L - window + 1, F]`` (shifted adds, no prefix sum)."""
    length = features.shape[0]
    sums = features[: length - window + 1].clone()
    for shift in range(1, window):
        sums += features[shift : length - window + 1 + shift]
    return sums


def similarity_scores(keys: torch.Tensor, window: int = DEFAULT_WINDOW) -> tuple[torch.Tensor, torch.Tensor]:
    """Dissimilarity ``d[c] = 1 - cos(mean left window, mean right window)`` per candidate, and ``valid``.

    Features are the layer-0 keys with KV heads concatenated. ``valid [L]`` marks the candidates
    whose two windows lie inside the sequence (``w - 1 <= c <= L - w - 1``); others get ``d = 0``.
    """
    features = token_features(keys)
    length = features.shape[0]
    c = torch.arange(length, device=features.device)
    valid = (c >= window - 1) & (c + window <= length - 1)
    d = torch.zeros(length, dtype=torch.float32, device=features.device)
    count = length - 2 * window + 1  # valid candidates c = w-1 .. L-w-1
    if count > 0:
        sums = window_sums(features, window)
        left, right = sums[:count], sums[window:]  # left window of c starts at c-w+1, right at c+1
        dot = (left * right).sum(-1)
        norms = left.square().sum(-1).sqrt() * right.square().sum(-1).sqrt()
        d[window - 1 : window - 1 + count] = 1.0 - dot / norms.clamp(min=1e-12)
    return d, valid


def similarity_proposals(keys: torch.Tensor, window: int = DEFAULT_WINDOW) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates the similarity rule proposes (bool ``[L]``) and their scores ``d`` (``[L]``).

    A candidate is proposed when ``d[c]`` is a local maximum (``d[c] >= d[c-1]`` and
    ``d[c] > d[c+1]``) and exceeds ``mean(d) + std(d)`` over the valid candidates of the sequence.
    """
    d, valid = similarity_scores(keys, window)
    length = d.shape[0]
    if int(valid.sum()) < 2:
        return torch.zeros(length, dtype=torch.bool, device=d.device), d
    vals = d[valid]
    threshold = vals.mean() + vals.std()
    prev = F.pad(d, (1, 0), value=-math.inf)[:-1]
    nxt = F.pad(d, (0, 1), value=-math.inf)[1:]
    peaks = (d >= prev) & (d > nxt) & (d > threshold) & valid
    return peaks, d


def similarity_boundaries(
    keys: torch.Tensor, min_chunk: int, max_chunk: int, window: int = DEFAULT_WINDOW
) -> torch.Tensor:
    """Training-free chunk offsets from drops in key similarity: int64 ``[nC + 1]``.

    Rule: per token take the layer-0 key states with the KV heads concatenated (``Hkv * D``
    features, fp32). For every candidate ``c`` (gap after token ``c``) compare the mean feature of
    the left window ``[c-w+1, c]`` with the mean of the right window ``[c+1, c+w]``: the
    dissimilarity is ``d[c] = 1 - cos(left, right)``. Candidates whose ``d`` is a local maximum and
    above the per-sequence threshold ``mean(d) + std(d)`` are proposed boundaries (a chunk starts
    at ``c + 1``); :func:`enforce_chunk_limits` then keeps the chunk lengths in
    ``[min_chunk, max_chunk]``, placing forced cuts at the largest ``d``. Prefix sums make it one
    pass over the keys (O(L x Hkv x D)), fast at 128K tokens.
    """
    length = keys.shape[1]
    peaks, d = similarity_proposals(keys, window)
    proposals = peaks.nonzero().squeeze(1) + 1
    return enforce_chunk_limits(proposals, length, min_chunk, max_chunk, d).to(keys.device)


# --------------------------------------------------------------------------- labels


def label_candidates(length: int, window: int = DEFAULT_WINDOW, device=None) -> torch.Tensor:
    """bool ``[L]``: candidates that can carry a label: ``w <= c <= L - w - 2``.

    Both windows lie inside the sequence, at least one later row ``i > c + w`` exists, and the left
    window does not contain token 0 (the attention sink, whose mass would make ``c = w - 1`` a
    boundary in every sequence).
    """
    c = torch.arange(length, device=device)
    return (c >= window) & (c <= length - window - 2)


def masses_from_probs(probs: torch.Tensor, window: int = DEFAULT_WINDOW) -> tuple[torch.Tensor, torch.Tensor]:
    """Left/right label masses from attention probabilities ``[H, L, L]`` (or ``[L, L]``), summed over heads.

    ``left[c] = sum_h sum_{i > c+w} sum_{j in [c-w+1, c]} P[h, i, j]`` and ``right[c]`` the same over
    ``j in [c+1, c+w]``; zero outside :func:`label_candidates`.
    """
    summed = probs.float().sum(0) if probs.ndim == 3 else probs.float()
    return _masses_from_summed(summed, window)


def _masses_from_summed(summed: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-candidate masses from head-summed causal probabilities ``S [L, L]`` without any L x L pass
    beyond one column sum.

    The mass rows ``i > c + w`` put on key ``j`` is the column total minus the rows ``j <= i <= c + w``
    (causality: rows above ``j`` put nothing on it). Those rows lie within ``2w - 1`` of the diagonal,
    so ``tail(c, j) = colsum[j] - sum_{d=0}^{c+w-j} S[j + d, j]`` needs only ``2w`` sub-diagonals.
    """
    length = summed.shape[-1]
    device = summed.device
    colsum = summed.sum(0, dtype=torch.float64)  # [L]
    band = torch.zeros(2 * window, length, dtype=torch.float64, device=device)  # band[d, j] = S[j+d, j]
    for d in range(min(2 * window, length)):
        band[d, : length - d] = summed.diagonal(-d)
    band = band.cumsum(0)  # band[d, j] = sum_{d' <= d} S[j+d', j]
    valid = label_candidates(length, window, device)
    c = torch.arange(length, device=device)
    offsets = torch.arange(-window + 1, window + 1, device=device)  # j = c + offset, left then right
    cols = (c[:, None] + offsets[None]).clamp(0, length - 1)  # [L, 2w]
    depth = (window - offsets).clamp(0, 2 * window - 1)[None].expand_as(cols)  # c + w - j
    tail = colsum[cols] - band[depth, cols]
    left = tail[:, :window].sum(-1).float()
    right = tail[:, window:].sum(-1).float()
    zero = torch.zeros_like(left)
    return torch.where(valid, left, zero), torch.where(valid, right, zero)


def accumulate_label_masses(
    q: torch.Tensor,
    k: torch.Tensor,
    scaling: float | None = None,
    window: int = DEFAULT_WINDOW,
    head_chunk: int | None = None,
    *,
    v: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Left/right label masses of one layer from its post-RoPE ``q [Hq, L, D]`` and ``k [Hkv, L, D]``.

    Computes the softmax ``head_chunk`` heads at a time (by default as many as fit in about 256 MB),
    sums the probabilities over heads into one ``[L, L]`` matrix and reduces it to per-candidate
    masses (see :func:`masses_from_probs`), so no layer's attention is kept. Sum the results of all
    layers and pass ``(left, right)`` to :func:`boundary_labels`. Meant for L of a few thousand.

    Args:
        mask: optional boolean ``[L, L]`` (True = attend) replacing the causal rule (e.g. a
            sliding window); rows without any key contribute nothing.
        v: optional values ``[Hkv, L, Dv]``; then the attention output ``[Hq, L, Dv]`` computed from
            the same probabilities is returned as a third element (the label capture uses it as
            the layer's output instead of running the attention twice).
    """
    num_heads, length, dim = q.shape
    num_kv = k.shape[0]
    if num_heads % num_kv:
        raise ValueError(f"query heads {num_heads} not a multiple of KV heads {num_kv}")
    scale = scaling if scaling is not None else 1.0 / math.sqrt(dim)
    group = num_heads // num_kv
    if head_chunk is None:  # about 256 MB of probabilities at a time
        head_chunk = max(1, min(num_heads, (64 << 20) // max(1, length * length)))

    def per_head(x: torch.Tensor) -> torch.Tensor:  # [Hkv, L, X] -> [Hq, L, X] (a view)
        return x[:, None].expand(num_kv, group, *x.shape[1:]).reshape(num_heads, *x.shape[1:])

    keys = per_head(k.float())
    values = per_head(v.float()) if v is not None else None
    if mask is None:
        blocked = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
    else:
        blocked = ~mask.bool()
    summed = torch.zeros(length, length, dtype=torch.float32, device=q.device)
    out = None if v is None else q.new_zeros(num_heads, length, v.shape[-1], dtype=torch.float32)
    for first in range(0, num_heads, head_chunk):
        last = min(first + head_chunk, num_heads)
        logits = torch.bmm(q[first:last].float(), keys[first:last].transpose(1, 2)).mul_(scale)
        probs = logits.masked_fill_(blocked, -math.inf).softmax(dim=-1)
        if mask is not None:  # rows with no key are NaN
            probs.nan_to_num_(0.0)
        summed += probs.sum(0)
        if out is not None:
            out[first:last] = torch.bmm(probs, values[first:last])
    left, right = _masses_from_summed(summed, window)
    return (left, right) if out is None else (left, right, out)


def boundary_labels(
    attention: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    window: int = DEFAULT_WINDOW,
    ratio: float = DEFAULT_RATIO,
) -> torch.Tensor:
    """Legacy DHSA boundary labels, bool ``[L]``: ``labels[c]`` means a new chunk starts at ``c + 1``.

    Args:
        attention: causal attention probabilities ``[H, L, L]`` / ``[L, L]``, or accumulated
            ``(left, right)`` masses ``[L]`` each (e.g. :func:`accumulate_label_masses` summed over
            layers).
        window: ``w``; ratio: the mass ratio threshold.

    Definition: for candidate ``c`` with ``w <= c <= L - w - 2`` let ``left`` be the attention mass
    that the later rows ``i > c + w`` put on keys ``[c-w+1, c]`` and ``right`` the mass they put on
    ``[c+1, c+w]`` (summed over heads, and over layers when accumulated). ``labels[c]`` is True iff
    ``left > 0`` and ``left >= ratio * right``, i.e. the ratio is taken on probability masses (the
    published code thresholded logits). Other positions are False.
    """
    if isinstance(attention, (tuple, list)):
        left, right = attention
    else:
        left, right = masses_from_probs(attention, window)
    valid = label_candidates(left.shape[0], window, left.device)
    return valid & (left > 0) & (left >= ratio * right)


# --------------------------------------------------------------------------- predictor


class WindowAttention(nn.Module):
    """Multi-head self-attention inside a window, split so projections can be shared across windows.

    Equivalent to ``nn.MultiheadAttention`` (fused q/k/v projection, output projection), but the
    q/k/v projection is applied by the caller: the projection of a token is the same in each of
    the ``2w`` windows that contain it, so :meth:`BoundaryPredictor.sequence_logits` computes it
    once per token.
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """``qkv [N, S, 3d]`` (already projected) -> output ``[N, S, d]`` (output projection applied)."""
        n, size, width = qkv.shape
        d = width // 3
        q, k, v = qkv.view(n, size, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out(out.transpose(1, 2).reshape(n, size, d))


class BoundaryPredictor(nn.Module):
    """Boundary classifier on the layer-0 key states (DESIGN.md section 2).

    Per token the KV heads are concatenated (``input_features = Hkv * D``), standardized with
    statistics of the training data and projected to ``d_model``. For candidate ``c`` the 8-token
    window ``c-3 .. c+4`` (``2 * window`` tokens) plus a learned position embedding goes through one
    multi-head self-attention layer with a residual and LayerNorm; ``l`` is the mean of the left
    ``window`` outputs, ``r`` of the right ones; ``[l, r, |l-r|, l*r, cos(l, r)]`` feeds an MLP
    (``hidden`` = 256) that gives one logit. ``threshold`` (a probability, chosen on validation to
    maximize F1) turns probabilities into proposed boundaries.
    """

    def __init__(
        self,
        input_features: int,
        d_model: int = 128,
        num_heads: int = 4,
        hidden: int = 256,
        window: int = DEFAULT_WINDOW,
        dropout: float = 0.1,
        threshold: float = 0.5,
    ) -> None:
        super().__init__()
        self.arch = dict(
            input_features=int(input_features), d_model=int(d_model), num_heads=int(num_heads),
            hidden=int(hidden), window=int(window), dropout=float(dropout),
        )
        self.window = int(window)
        self.threshold = float(threshold)
        self.register_buffer("feature_mean", torch.zeros(input_features))
        self.register_buffer("feature_std", torch.ones(input_features))
        self.input_proj = nn.Linear(input_features, d_model)
        self.position = nn.Parameter(torch.randn(2 * window, d_model) * 0.02)
        self.attn = WindowAttention(d_model, num_heads, dropout)
        self.norm = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(4 * d_model + 1, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1)
        )

    @property
    def input_features(self) -> int:
        return self.arch["input_features"]

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.feature_mean.copy_(mean.float())
        self.feature_std.copy_(std.float().clamp(min=1e-6))

    def normalize(self, features: torch.Tensor) -> torch.Tensor:
        return (features.float() - self.feature_mean) / self.feature_std

    def _head(self, x: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        """Logits ``[N]`` from window embeddings ``x [N, 2w, d]`` (positions added) and their q/k/v."""
        h = self.norm(x + self.attn.attend(qkv))
        left, right = h[:, : self.window].mean(1), h[:, self.window :].mean(1)
        cos = F.cosine_similarity(left, right, dim=-1, eps=1e-6)[:, None]
        feats = torch.cat([left, right, (left - right).abs(), left * right, cos], dim=-1)
        return self.mlp(feats).squeeze(-1)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """Logits ``[N]`` for raw token-feature windows ``[N, 2w, input_features]`` (tokens c-w+1 .. c+w)."""
        x = self.input_proj(self.normalize(windows)) + self.position
        return self._head(x, self.attn.qkv(x))

    def sequence_logits(self, keys: torch.Tensor, batch: int = 16384) -> torch.Tensor:
        """Logit of every candidate ``c`` of one sequence, ``[L]``, from layer-0 keys ``[Hkv, L, D]``.

        Standardized token features are zero-padded at the edges (w - 1 tokens before, w after)
        and unfolded into one window per candidate. The input and q/k/v projections are linear,
        so they are computed once per token and the per-slot position terms added to the windows;
        the result equals :meth:`forward` on the unfolded windows.
        """
        features = token_features(keys)
        if features.shape[1] != self.input_features:
            raise ValueError(
                f"keys give {features.shape[1]} features per token, the predictor expects {self.input_features}"
            )
        length, w = features.shape[0], self.window
        if length == 0:
            return features.new_zeros(0)
        padded = F.pad(self.normalize(features), (0, 0, w - 1, w))
        tokens = self.input_proj(padded)  # [L + 2w - 1, d]
        token_qkv = F.linear(tokens, self.attn.qkv.weight)  # bias added with the position term
        slot_qkv = self.attn.qkv(self.position)  # [2w, 3d]
        logits = []
        for first in range(0, length, batch):
            last = min(length, first + batch)
            span = slice(first, last + 2 * w - 1)
            x = tokens[span].unfold(0, 2 * w, 1).transpose(1, 2) + self.position
            qkv = token_qkv[span].unfold(0, 2 * w, 1).transpose(1, 2) + slot_qkv
            logits.append(self._head(x, qkv))
        return torch.cat(logits)

    @torch.no_grad()
    def boundaries(self, keys: torch.Tensor, min_chunk: int, max_chunk: int) -> torch.Tensor:
        """Chunk offsets ``[nC + 1]``: candidates with probability >= threshold, then chunk limits."""
        was_training = self.training
        self.eval()
        try:
            probs = torch.sigmoid(self.sequence_logits(keys))
        finally:
            self.train(was_training)
        return threshold_boundaries(probs, self.threshold, min_chunk, max_chunk).to(keys.device)

    def batch_probabilities(self, keys: torch.Tensor) -> torch.Tensor:
        """Boundary probabilities ``[B, L]`` from layer-0 keys ``[B, Hkv, L, D]`` without loops or
        data-dependent shapes, so ``torch.onnx.export`` traces it into standard ONNX ops.

        The same computation as ``sigmoid(sequence_logits(keys[b]))``: the windows are gathered as
        ``2w`` shifted slices of the padded per-token projections instead of ``unfold``.
        """
        batch, heads, length, dim = keys.shape
        w = self.window
        features = keys.float().permute(0, 2, 1, 3).reshape(batch, length, heads * dim)
        padded = F.pad(self.normalize(features), (0, 0, w - 1, w))  # [B, L + 2w - 1, F]
        tokens = self.input_proj(padded)
        token_qkv = F.linear(tokens, self.attn.qkv.weight)
        slot_qkv = self.attn.qkv(self.position)
        x = torch.stack([tokens[:, s : s + length] for s in range(2 * w)], dim=2) + self.position
        qkv = torch.stack([token_qkv[:, s : s + length] for s in range(2 * w)], dim=2) + slot_qkv
        logits = self._head(x.reshape(batch * length, 2 * w, -1), qkv.reshape(batch * length, 2 * w, -1))
        return torch.sigmoid(logits).reshape(batch, length)


def threshold_boundaries(probs: torch.Tensor, threshold: float, min_chunk: int, max_chunk: int) -> torch.Tensor:
    """Offsets ``[nC + 1]`` from one sequence's boundary probabilities ``[L]``: candidates ``c < L - 1``
    with ``probs[c] >= threshold`` are proposed, then :func:`enforce_chunk_limits` (forced cuts at the
    highest probability). The learned predictor's rule; ``dhsa::ChunkOffsets`` with ``boundary_probs``."""
    length = probs.shape[0]
    proposals = (probs[: max(0, length - 1)] >= threshold).nonzero().squeeze(1) + 1
    return enforce_chunk_limits(proposals, length, min_chunk, max_chunk, probs)


def save_predictor(predictor: BoundaryPredictor, path: str | os.PathLike, info: dict | None = None) -> Path:
    """Save weights + JSON metadata (architecture, threshold, ``info``) as safetensors, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {
        "format": PREDICTOR_FORMAT,
        "version": PREDICTOR_VERSION,
        "architecture": dict(predictor.arch),
        "input_features": predictor.input_features,
        "threshold": predictor.threshold,
        "window": predictor.window,
    }
    meta.update(info or {})
    tensors = {name: t.detach().cpu().contiguous() for name, t in predictor.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_predictor_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata of a saved predictor (validated like :func:`load_predictor`)."""
    return _read_file(Path(path))[1]


def load_predictor(path: str | os.PathLike) -> BoundaryPredictor:
    """Load and validate a predictor saved by :func:`save_predictor`; ``DHSAError`` if unusable.

    The returned module is in eval mode and carries ``metadata`` (the saved JSON dict).
    """
    path = Path(path)
    tensors, meta = _read_file(path)
    fix = _retrain_hint(path)
    arch = meta.get("architecture")
    try:
        predictor = BoundaryPredictor(**arch, threshold=float(meta["threshold"]))
    except (TypeError, KeyError, ValueError, AssertionError) as exc:
        raise DHSAError(f"boundary predictor {path} has an incompatible architecture {arch!r} ({exc}); {fix}") from None
    expected = predictor.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(n for n in expected if n in tensors and tuple(tensors[n].shape) != tuple(expected[n].shape))
    if missing or unexpected or wrong:
        raise DHSAError(
            f"boundary predictor {path} does not match its architecture (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]}); {fix}"
        )
    predictor.load_state_dict(tensors)
    if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
        raise DHSAError(f"boundary predictor {path} holds non-finite weights; {fix}")
    predictor.eval()
    predictor.metadata = meta
    return predictor


def _retrain_hint(path: Path) -> str:
    return (
        f"retrain it with dhsa_export.train.boundaries.train_boundaries(model, data_dir, '{path}') "
        "or leave boundary_predictor empty to use the training-free rule"
    )


def _read_file(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    fix = _retrain_hint(path)
    if not path.is_file():
        raise DHSAError(f"boundary predictor file {path} does not exist; {fix}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # safetensors raises several types for damaged files
        raise DHSAError(
            f"boundary predictor file {path} is not a readable safetensors file ({type(exc).__name__}: "
            f"{str(exc)[:120]}); {fix}"
        ) from None
    if raw is None:
        raise DHSAError(f"boundary predictor file {path} has no '{METADATA_KEY}' metadata; {fix}")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise DHSAError(f"boundary predictor file {path} has corrupt metadata (not JSON); {fix}") from None
    if not isinstance(meta, dict) or meta.get("format") != PREDICTOR_FORMAT:
        raise DHSAError(f"{path} is not a DHSA boundary predictor (format {meta.get('format')!r}); {fix}")
    if meta.get("version") != PREDICTOR_VERSION:
        raise DHSAError(
            f"boundary predictor {path} has format version {meta.get('version')!r}, this dhsa-export "
            f"reads version {PREDICTOR_VERSION}; {fix}"
        )
    return tensors, meta


_PREDICTOR_CACHE: dict[str, tuple[tuple, BoundaryPredictor]] = {}


def cached_predictor(path: str | os.PathLike) -> BoundaryPredictor:
    """:func:`load_predictor` cached by resolved path (reloaded when the file changes)."""
    resolved = Path(path).expanduser().resolve()
    try:
        stat = resolved.stat()
        key = (stat.st_size, stat.st_mtime_ns)
    except OSError:
        key = None
    hit = _PREDICTOR_CACHE.get(str(resolved))
    if hit is not None and key is not None and hit[0] == key:
        return hit[1]
    predictor = load_predictor(resolved)
    _PREDICTOR_CACHE[str(resolved)] = (key, predictor)
    return predictor


# --------------------------------------------------------------------------- chunker


def make_chunker(cfg: DHSAConfig) -> Chunker:
    """The chunker of ``cfg``: the predictor at ``cfg.boundary_predictor`` if set, else ``cfg.boundary_rule``.

    The predictor is loaded (and validated) here, so a bad path fails when DHSA is enabled. The
    chunker maps one sequence's layer-0 keys ``[Hkv, L, D]`` to int64 offsets ``[nC + 1]`` on the
    keys' device.
    """
    if cfg.boundary_predictor:
        path = str(cfg.boundary_predictor)
        predictor = cached_predictor(path)
        per_device: dict[str, BoundaryPredictor] = {}

        def predictor_chunker(keys: torch.Tensor) -> torch.Tensor:
            _check_keys(keys)
            check_predictor_features(predictor, keys.shape[0], keys.shape[2], path)
            device = str(keys.device)
            if device not in per_device:
                per_device[device] = predictor if device == "cpu" else _copy_to(predictor, keys.device)
            return per_device[device].boundaries(keys, cfg.min_chunk, cfg.max_chunk)

        return predictor_chunker
    if cfg.boundary_rule == "fixed":
        def fixed_chunker(keys: torch.Tensor) -> torch.Tensor:
            _check_keys(keys)
            return fixed_offsets(keys.shape[1], cfg.k_block, keys.device)

        return fixed_chunker

    def similarity_chunker(keys: torch.Tensor) -> torch.Tensor:
        _check_keys(keys)
        return similarity_boundaries(keys, cfg.min_chunk, cfg.max_chunk)

    return similarity_chunker


def check_predictor_option(cfg: DHSAConfig) -> None:
    """For exporters: a boundary predictor serves the dynamic pattern only and must load
    (``DHSAError`` naming the problem otherwise)."""
    if not cfg.boundary_predictor:
        return
    if cfg.pattern != "dynamic":
        raise DHSAError(f"--boundary-predictor is used by --pattern dynamic only (pattern is {cfg.pattern!r}); "
                        "drop it or pass --pattern dynamic")
    cached_predictor(cfg.boundary_predictor)


def check_predictor_features(predictor: BoundaryPredictor, num_kv_heads: int, head_dim: int, path) -> None:
    """``DHSAError`` unless the predictor reads ``num_kv_heads x head_dim`` key features per token."""
    features = num_kv_heads * head_dim
    if features != predictor.input_features:
        raise DHSAError(
            f"boundary predictor {path} expects {predictor.input_features} key features per token "
            f"but this model's layer-0 keys give {features} ({num_kv_heads} KV heads x "
            f"{head_dim} dims); train a predictor for this model with train_boundaries"
        )


def _copy_to(predictor: BoundaryPredictor, device) -> BoundaryPredictor:
    import copy

    moved = copy.deepcopy(predictor).to(device)
    moved.eval()
    return moved


def _check_keys(keys: torch.Tensor) -> None:
    if keys.ndim != 3:
        raise ValueError(f"a chunker takes one sequence's keys [Hkv, L, D], got shape {tuple(keys.shape)}")
