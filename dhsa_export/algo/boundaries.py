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

from ..config import DHSAConfig
from ..errors import DHSAError
from .layout import fixed_offsets

Chunker = Callable[[torch.Tensor], torch.Tensor]

PREDICTOR_FORMAT = "dhsa-boundary-predictor"
PREDICTOR_VERSION = 1
METADATA_KEY = "dhsa_boundary_predictor"
DEFAULT_WINDOW = 4
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
    ``[start + min_chunk, min(start + max_chunk, L - min_chunk)]`` (``start + max_chunk`` without
    scores). Only when ``L`` leaves no choice (``L < min_chunk``, or ``max_chunk < 2 min_chunk - 1``
    and the remainder cannot be split) is the last chunk shorter than ``min_chunk``.
    The loop runs once per chunk on numpy data: ~L / min_chunk steps, milliseconds at 128K.
    """
    length = int(length)
    if length <= 0:
        return torch.zeros(1, dtype=torch.long)
    props = np.unique(np.asarray(_to_numpy(proposals), dtype=np.int64).reshape(-1))
    props = props[(props > 0) & (props < length)].tolist()
    # start-position scores: start p corresponds to candidate p - 1
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
                if window.size and np.isfinite(window.max()):
                    chosen = lo + int(np.argmax(window))
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


def window_means(features: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean feature of the left and right window of every candidate ``c``: ``[L, F]`` each.

    Also returns ``valid [L]``: candidates whose two windows lie fully inside the sequence
    (``w - 1 <= c <= L - w - 1``); invalid rows hold zeros.
    """
    length = features.shape[0]
    prefix = F.pad(features.cumsum(dim=0), (0, 0, 1, 0))  # prefix[i] = sum of tokens < i
    c = torch.arange(length, device=features.device)
    valid = (c >= window - 1) & (c + window <= length - 1)
    left_lo = (c - window + 1).clamp(0, length)
    right_hi = (c + window + 1).clamp(0, length)
    mid = (c + 1).clamp(0, length)
    left = (prefix[mid] - prefix[left_lo]) / window
    right = (prefix[right_hi] - prefix[mid]) / window
    zero = torch.zeros_like(left)
    return torch.where(valid[:, None], left, zero), torch.where(valid[:, None], right, zero), valid


def similarity_scores(keys: torch.Tensor, window: int = DEFAULT_WINDOW) -> tuple[torch.Tensor, torch.Tensor]:
    """Dissimilarity ``d[c] = 1 - cos(mean left window, mean right window)`` per candidate, and ``valid``.

    Features are the layer-0 keys with KV heads concatenated; invalid candidates get ``d = 0``.
    """
    left, right, valid = window_means(token_features(keys), window)
    d = 1.0 - F.cosine_similarity(left, right, dim=-1, eps=1e-6)
    return torch.where(valid, d, torch.zeros_like(d)), valid


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
    ``j in [c+1, c+w]``; zero outside :func:`label_candidates`. A reverse cumulative sum over rows
    gives every candidate's later-row mass at once.
    """
    summed = probs.float().sum(0) if probs.ndim == 3 else probs.float()
    length = summed.shape[-1]
    # tail[t, j] = sum_{i >= t} summed[i, j], with a zero row at t = L
    tail = F.pad(summed.flip(0).cumsum(0).flip(0), (0, 0, 0, 1))
    return _window_masses(tail, length, window)


def _window_masses(tail: torch.Tensor, length: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    device = tail.device
    valid = label_candidates(length, window, device)
    c = torch.arange(length, device=device)
    rows = (c + window + 1).clamp(max=length)[:, None]  # first row strictly after the right window
    left_cols = (c[:, None] + torch.arange(-window + 1, 1, device=device)[None]).clamp(0, length - 1)
    right_cols = (c[:, None] + torch.arange(1, window + 1, device=device)[None]).clamp(0, length - 1)
    left = tail[rows, left_cols].sum(-1)
    right = tail[rows, right_cols].sum(-1)
    zero = torch.zeros_like(left)
    return torch.where(valid, left, zero), torch.where(valid, right, zero)


def accumulate_label_masses(
    q: torch.Tensor,
    k: torch.Tensor,
    scaling: float | None = None,
    window: int = DEFAULT_WINDOW,
    head_chunk: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left/right label masses of one layer from its post-RoPE ``q [Hq, L, D]`` and ``k [Hkv, L, D]``.

    Computes the causal softmax a few heads at a time, sums the probabilities over heads into one
    ``[L, L]`` matrix and reduces it to per-candidate masses (see :func:`masses_from_probs`), so
    memory stays O(head_chunk x L^2) and no layer's attention is kept. Sum the results of all
    layers and pass ``(left, right)`` to :func:`boundary_labels`. Meant for L of a few thousand.
    """
    num_heads, length, dim = q.shape
    if num_heads % k.shape[0]:
        raise ValueError(f"query heads {num_heads} not a multiple of KV heads {k.shape[0]}")
    scale = scaling if scaling is not None else 1.0 / math.sqrt(dim)
    group = num_heads // k.shape[0]
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    summed = torch.zeros(length, length, dtype=torch.float32, device=q.device)
    for first in range(0, num_heads, head_chunk):
        heads = torch.arange(first, min(first + head_chunk, num_heads), device=q.device)
        logits = torch.einsum("hld,hmd->hlm", q[heads].float(), k[heads // group].float()) * scale
        summed += logits.masked_fill(~causal, -math.inf).softmax(dim=-1).sum(0)
    tail = F.pad(summed.flip(0).cumsum(0).flip(0), (0, 0, 0, 1))
    return _window_masses(tail, length, window)


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
        self.attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
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

    def head(self, normalized_windows: torch.Tensor) -> torch.Tensor:
        """Logits ``[N]`` from standardized windows ``[N, 2w, input_features]``."""
        x = self.input_proj(normalized_windows) + self.position
        attended, _ = self.attn(x, x, x, need_weights=False)
        x = self.norm(x + attended)
        left, right = x[:, : self.window].mean(1), x[:, self.window :].mean(1)
        cos = F.cosine_similarity(left, right, dim=-1, eps=1e-6)[:, None]
        feats = torch.cat([left, right, (left - right).abs(), left * right, cos], dim=-1)
        return self.mlp(feats).squeeze(-1)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """Logits ``[N]`` for raw token-feature windows ``[N, 2w, input_features]`` (tokens c-w+1 .. c+w)."""
        return self.head(self.normalize(windows))

    def sequence_logits(self, keys: torch.Tensor, batch: int = 8192) -> torch.Tensor:
        """Logit of every candidate ``c`` of one sequence, ``[L]``, from layer-0 keys ``[Hkv, L, D]``.

        Token features are standardized, zero-padded at the edges (w - 1 tokens before, w after) and
        unfolded into one window per candidate; windows are scored ``batch`` at a time.
        """
        features = token_features(keys)
        if features.shape[1] != self.input_features:
            raise ValueError(
                f"keys give {features.shape[1]} features per token, the predictor expects {self.input_features}"
            )
        length, w = features.shape[0], self.window
        padded = F.pad(self.normalize(features), (0, 0, w - 1, w))
        windows = padded.unfold(0, 2 * w, 1).transpose(1, 2)  # [L, 2w, F] (a view)
        if length == 0:
            return features.new_zeros(0)
        return torch.cat([self.head(windows[i : i + batch]) for i in range(0, length, batch)])

    @torch.no_grad()
    def boundaries(self, keys: torch.Tensor, min_chunk: int, max_chunk: int) -> torch.Tensor:
        """Chunk offsets ``[nC + 1]``: candidates with probability >= threshold, then chunk limits."""
        was_training = self.training
        self.eval()
        try:
            probs = torch.sigmoid(self.sequence_logits(keys))
        finally:
            self.train(was_training)
        length = keys.shape[1]
        proposals = (probs[: max(0, length - 1)] >= self.threshold).nonzero().squeeze(1) + 1
        return enforce_chunk_limits(proposals, length, min_chunk, max_chunk, probs).to(keys.device)


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
            features = keys.shape[0] * keys.shape[2]
            if features != predictor.input_features:
                raise DHSAError(
                    f"boundary predictor {path} expects {predictor.input_features} key features per token "
                    f"but this model's layer-0 keys give {features} ({keys.shape[0]} KV heads x "
                    f"{keys.shape[2]} dims); train a predictor for this model with train_boundaries"
                )
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


def _copy_to(predictor: BoundaryPredictor, device) -> BoundaryPredictor:
    import copy

    moved = copy.deepcopy(predictor).to(device)
    moved.eval()
    return moved


def _check_keys(keys: torch.Tensor) -> None:
    if keys.ndim != 3:
        raise ValueError(f"a chunker takes one sequence's keys [Hkv, L, D], got shape {tuple(keys.shape)}")
