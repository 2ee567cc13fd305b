"""Train the chunk-boundary predictor of the ``dynamic`` pattern with the backbone frozen.

Pipeline (:func:`train_boundaries`):

1. Load the model (``dhsa_export.hf.models.load_model``, offline) and read ``*.txt`` documents.
2. Split by document into train / validation (about 20 % of the documents, seeded), tokenize and
   cut every document into ``seq_len`` windows; take windows round-robin over the documents of each
   split until ``max_tokens`` (about 20 % of them for validation).
3. Run the frozen model once per window with a temporary attention function registered through
   transformers' ``AttentionInterface``: at every layer it reduces the post-RoPE ``q``/``k`` to
   per-candidate left/right attention masses (:func:`~dhsa_export.algo.boundaries.accumulate_label_masses`,
   summed over heads and layers) and keeps layer 0's keys, then calls the normal SDPA attention.
4. Labels: :func:`~dhsa_export.algo.boundaries.boundary_labels` (left mass >= 2 x right mass).
5. Train :class:`~dhsa_export.algo.boundaries.BoundaryPredictor` with focal BCE (gamma 2, alpha =
   1 - positive rate) and Adam; choose the probability threshold maximizing validation F1; save as
   safetensors with metadata (written to a temporary file and renamed into place).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..algo.boundaries import (
    DEFAULT_RATIO,
    DEFAULT_WINDOW,
    BoundaryPredictor,
    accumulate_label_masses,
    boundary_labels,
    label_candidates,
    save_predictor,
    similarity_proposals,
    token_features,
)
from ..errors import DHSAError

CAPTURE_ATTENTION = "dhsa_label_capture"
VAL_FRACTION = 0.2


@dataclass
class Window:
    """One tokenized window of a document, with what the frozen model told about it."""

    doc: str
    ids: list[int]
    features: torch.Tensor | None = None  # [L, Hkv * D] layer-0 keys, heads concatenated
    keys: torch.Tensor | None = None  # [Hkv, L, D] (kept for the rule baseline on validation)
    labels: torch.Tensor | None = None  # bool [L]


@dataclass
class _Recorder:
    """Per-window state of the label capture: layer-0 keys and masses summed over layers."""

    window: int
    layer0_keys: torch.Tensor | None = None
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None
    layers: set = field(default_factory=set)

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: torch.Tensor | None, scaling: float | None) -> torch.Tensor:
        """Record layer ``layer`` and return its attention output ``[Hq, L, Dv]``."""
        if layer == 0:
            self.layer0_keys = key.detach().float().clone()
        left, right, out = accumulate_label_masses(
            query, key, scaling, self.window, v=value, mask=mask
        )
        self.left = left if self.left is None else self.left + left
        self.right = right if self.right is None else self.right + right
        self.layers.add(layer)
        return out


def train_boundaries(
    model_spec: str | None,
    data_dir: str,
    out: str,
    *,
    max_tokens: int = 65536,
    seq_len: int = 1024,
    epochs: int = 5,
    seed: int = 0,
    progress: bool = True,
    threads: int | None = None,
) -> dict:
    """Train a boundary predictor for ``model_spec`` on the ``*.txt`` files of ``data_dir``; save to ``out``.

    Returns metrics: validation F1 / precision / recall at the chosen threshold, the threshold,
    positive rates, window / sample / document counts, baselines (training-free rule, all
    positive) and seconds per stage. Raises :class:`DHSAError` for unusable inputs.

    ``threads``: torch CPU threads for the run (restored afterwards). ``None`` times the first
    windows with torch's current thread count and with one thread and keeps the faster: on a busy
    machine one thread is often several times faster than two fighting over the cores.
    """
    from ..hf.models import load_model

    _check_args(max_tokens, seq_len, epochs)
    start = time.perf_counter()
    torch.manual_seed(seed)
    texts = _read_documents(data_dir)
    loaded = load_model(model_spec)
    window = DEFAULT_WINDOW
    min_len = min(seq_len, max(64, 4 * window + 2))
    train_windows, val_windows, split = _make_windows(
        loaded.tokenizer, texts, seq_len, max_tokens, min_len, seed
    )
    original_threads = torch.get_num_threads()
    try:
        t_capture = time.perf_counter()
        chosen_threads = _capture_all(loaded.model, train_windows + val_windows, window, threads, progress)
        capture_seconds = time.perf_counter() - t_capture
        metrics = _train_and_save(
            loaded, train_windows, val_windows, split, window, epochs, seed, progress, out,
            dict(seq_len=seq_len, max_tokens=max_tokens, data_dir=str(data_dir)),
        )
    finally:
        torch.set_num_threads(original_threads)
    metrics["threads"] = chosen_threads
    metrics["capture_seconds"] = round(capture_seconds, 1)
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    return metrics


def _capture_all(model, windows: list[Window], window: int, threads: int | None, progress: bool) -> int:
    """Label capture of every window; returns the thread count used (see ``threads``)."""
    from tqdm.auto import tqdm

    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    trials = [] if threads is not None or torch.get_num_threads() == 1 else [torch.get_num_threads(), 1]
    rates: dict[int, float] = {}
    bar = tqdm(windows, desc="labels (frozen model)", unit="window", disable=not progress)
    for index, item in enumerate(bar):
        if index < len(trials):
            torch.set_num_threads(trials[index])
        began = time.perf_counter()
        _capture(model, item, window)
        if index < len(trials):
            rates[trials[index]] = (time.perf_counter() - began) / len(item.ids)
            if index == len(trials) - 1:
                torch.set_num_threads(min(rates, key=rates.get))
                bar.set_postfix(threads=torch.get_num_threads())
    bar.close()
    return torch.get_num_threads()


def _train_and_save(loaded, train_windows, val_windows, split, window, epochs, seed, progress, out,
                    run_info: dict) -> dict:
    t_train = time.perf_counter()
    train_set = _samples(train_windows, window)
    val_set = _samples(val_windows, window)
    positives = int(train_set.labels.sum())
    if positives == 0:
        raise DHSAError(
            f"no boundary labels were positive in {len(train_windows)} training windows of "
            f"{run_info['data_dir']}; "
            "pass more text (a larger max_tokens or data_dir)"
        )
    pos_rate = positives / train_set.labels.numel()
    alpha = min(0.99, max(0.01, 1.0 - pos_rate))
    predictor = BoundaryPredictor(train_set.features.shape[1], window=window)
    mean, std = train_set.features.mean(0), train_set.features.std(0)
    predictor.set_feature_stats(mean, std)
    history = _fit(predictor, train_set, val_set, epochs, alpha, seed, progress)
    val_probs = _predict(predictor, val_set)
    threshold, precision, recall, f1 = best_threshold(val_probs, val_set.labels)
    predictor.threshold = threshold
    train_seconds = time.perf_counter() - t_train

    rule = _rule_baseline(val_windows, window)
    val_pos_rate = float(val_set.labels.float().mean()) if val_set.labels.numel() else 0.0
    chunk_length = _mean_chunk_length(predictor, val_windows)
    metrics = {
        "val_f1": f1,
        "val_precision": precision,
        "val_recall": recall,
        "threshold": threshold,
        "train_positive_rate": pos_rate,
        "val_positive_rate": val_pos_rate,
        "val_rule_f1": rule["f1"],
        "val_rule_precision": rule["precision"],
        "val_rule_recall": rule["recall"],
        "val_all_positive_f1": 2 * val_pos_rate / (1 + val_pos_rate) if val_pos_rate else 0.0,
        "val_mean_chunk_length": chunk_length,
        "train_samples": int(train_set.labels.numel()),
        "val_samples": int(val_set.labels.numel()),
        "train_windows": len(train_windows),
        "val_windows": len(val_windows),
        "train_documents": len({w.doc for w in train_windows}),
        "val_documents": len({w.doc for w in val_windows}),
        "split": split,
        "tokens": sum(len(w.ids) for w in train_windows + val_windows),
        "epochs": epochs,
        "epoch_history": history,
        "focal_alpha": alpha,
        "focal_gamma": 2.0,
        "model": loaded.name,
        "train_seconds": round(train_seconds, 1),
    }
    info = {
        "model": loaded.name,
        "model_source": loaded.source,
        "label_window": window,
        "label_ratio": DEFAULT_RATIO,
        "val_f1": f1,
        "val_precision": precision,
        "val_recall": recall,
        "train_samples": metrics["train_samples"],
        "val_samples": metrics["val_samples"],
        "train_positive_rate": pos_rate,
        **run_info,
        "epochs": epochs,
        "seed": seed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = save_predictor(predictor, out, info)
    metrics["out"] = str(path)
    return metrics


# --------------------------------------------------------------------------- data


def _check_args(max_tokens: int, seq_len: int, epochs: int) -> None:
    for name, value in (("max_tokens", max_tokens), ("seq_len", seq_len), ("epochs", epochs)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DHSAError(f"{name} {value!r} must be a positive integer")
    if seq_len < 4 * DEFAULT_WINDOW + 2:
        raise DHSAError(f"seq_len {seq_len} is too short for boundary labels; pass seq_len >= {4 * DEFAULT_WINDOW + 2}")


def _read_documents(data_dir: str) -> dict[str, str]:
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise DHSAError(f"data folder {data_dir!r} does not exist; pass a folder holding *.txt documents")
    files = sorted(folder.glob("*.txt"))
    texts = {}
    for file in files:
        text = file.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            texts[file.name] = text
    if not texts:
        raise DHSAError(f"data folder {data_dir!r} holds no non-empty *.txt files; add plain-text documents")
    return texts


def _make_windows(tokenizer, texts: dict[str, str], seq_len: int, max_tokens: int, min_len: int,
                  seed: int) -> tuple[list[Window], list[Window], str]:
    """Train / validation windows, split by document (by window when there is one document)."""
    per_doc: dict[str, list[Window]] = {}
    for name, text in texts.items():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        pieces = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
        pieces = [p for p in pieces if len(p) >= min_len]
        if pieces:
            per_doc[name] = [Window(name, p) for p in pieces]
    if not per_doc:
        raise DHSAError(f"no document gives a window of at least {min_len} tokens; add longer documents")
    names = sorted(per_doc)
    random.Random(seed).shuffle(names)
    val_budget = max(1, round(VAL_FRACTION * max_tokens))
    if len(names) >= 2:
        n_val = max(1, round(VAL_FRACTION * len(names)))
        val = _round_robin([per_doc[n] for n in names[:n_val]], val_budget)
        train = _round_robin([per_doc[n] for n in names[n_val:]], max(1, max_tokens - _tokens(val)))
        split = "document"
    else:
        windows = per_doc[names[0]]
        if len(windows) < 2:
            raise DHSAError("one document with a single window cannot be split into train and validation; "
                            "add documents or lower seq_len")
        n_val = max(1, round(VAL_FRACTION * len(windows)))
        val = _round_robin([windows[-n_val:]], val_budget)
        train = _round_robin([windows[:-n_val]], max(1, max_tokens - _tokens(val)))
        split = "window (single document)"
    return train, val, split


def _tokens(windows: list[Window]) -> int:
    return sum(len(w.ids) for w in windows)


def _round_robin(groups: list[list[Window]], budget: int) -> list[Window]:
    """Windows taken one per document in turn until ``budget`` tokens (at least one window)."""
    order = [g[r] for r in range(max(len(g) for g in groups)) for g in groups if r < len(g)]
    chosen, total = [], 0
    for item in order:
        if chosen and total + len(item.ids) > budget:
            continue
        chosen.append(item)
        total += len(item.ids)
    return chosen


# --------------------------------------------------------------------------- labels from the frozen model


def _capture(model, item: Window, window: int) -> None:
    """One frozen forward pass: layer-0 keys and label masses summed over heads and layers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    recorder = _Recorder(window)

    def capture_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        """Exact attention (eval, no dropout) computed from the same probabilities the labels use."""
        if query.shape[0] != 1:
            raise RuntimeError("label capture runs one window at a time")
        mask = None
        if attention_mask is not None:
            mask = attention_mask if attention_mask.dtype == torch.bool else \
                attention_mask > torch.finfo(attention_mask.dtype).min / 2
            mask = mask[0].any(dim=0)[:, : key.shape[-2]]
        out = recorder.attend(
            int(getattr(module, "layer_idx", 0)), query[0], key[0], value[0], mask, scaling
        )
        return out.to(query.dtype).transpose(0, 1)[None].contiguous(), None

    AttentionInterface.register(CAPTURE_ATTENTION, capture_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(CAPTURE_ATTENTION, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE_ATTENTION)
    try:
        with torch.inference_mode():
            ids = torch.tensor([item.ids], device=model.device)
            model.base_model(input_ids=ids, use_cache=False)  # the LM head is not needed
    finally:
        model.set_attn_implementation(previous)
    num_layers = model.config.num_hidden_layers
    if recorder.layer0_keys is None or len(recorder.layers) != num_layers:
        raise DHSAError(
            f"label capture saw layers {sorted(recorder.layers)} of {num_layers}; the model does not call "
            "transformers' attention interface at every layer"
        )
    item.keys = recorder.layer0_keys
    item.features = token_features(recorder.layer0_keys)
    item.labels = boundary_labels((recorder.left, recorder.right), window, DEFAULT_RATIO)


# --------------------------------------------------------------------------- samples and training


@dataclass
class _SampleSet:
    features: torch.Tensor  # [T, F] all tokens of the windows
    index: torch.Tensor  # [N, 2w] token rows of every sample's window
    labels: torch.Tensor  # [N] float


def _samples(windows: list[Window], window: int) -> _SampleSet:
    feats, index, labels, base = [], [], [], 0
    span = torch.arange(-window + 1, window + 1)
    for item in windows:
        length = item.features.shape[0]
        cands = label_candidates(length, window).nonzero().squeeze(1)
        feats.append(item.features)
        index.append(base + cands[:, None] + span[None])
        labels.append(item.labels[cands].float())
        base += length
    width = windows[0].features.shape[1] if windows else 0
    return _SampleSet(
        torch.cat(feats) if feats else torch.zeros(0, width),
        torch.cat(index) if index else torch.zeros(0, 2 * window, dtype=torch.long),
        torch.cat(labels) if labels else torch.zeros(0),
    )


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float = 2.0) -> torch.Tensor:
    """Focal binary cross-entropy (Lin et al.): ``alpha_t (1 - p_t)^gamma BCE``, mean over samples."""
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    prob = torch.sigmoid(logits)
    p_t = prob * targets + (1 - prob) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * (1 - p_t).pow(gamma) * bce).mean()


def _fit(predictor: BoundaryPredictor, train: _SampleSet, val: _SampleSet, epochs: int, alpha: float,
         seed: int, progress: bool, batch: int = 256, lr: float = 1e-3) -> list[dict]:
    from tqdm.auto import tqdm

    optimizer = torch.optim.Adam(predictor.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    steps = math.ceil(train.labels.numel() / batch)
    history = []
    bar = tqdm(total=epochs * steps, desc="train predictor", unit="step", disable=not progress)
    for epoch in range(epochs):
        predictor.train()
        order = torch.randperm(train.labels.numel(), generator=generator)
        total = 0.0
        for step in range(steps):
            rows = order[step * batch : (step + 1) * batch]
            logits = predictor(train.features[train.index[rows]])
            loss = focal_loss(logits, train.labels[rows], alpha)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * rows.numel()
            bar.update(1)
        record = {"epoch": epoch + 1, "train_loss": total / max(1, train.labels.numel())}
        if val.labels.numel():
            probs = _predict(predictor, val)
            record["val_f1"] = best_threshold(probs, val.labels)[3]
        history.append(record)
        bar.set_postfix({k: round(v, 4) for k, v in record.items() if k != "epoch"})
    bar.close()
    return history


@torch.no_grad()
def _predict(predictor: BoundaryPredictor, data: _SampleSet, batch: int = 4096) -> torch.Tensor:
    predictor.eval()
    out = [torch.sigmoid(predictor(data.features[data.index[i : i + batch]]))
           for i in range(0, data.labels.numel(), batch)]
    return torch.cat(out) if out else torch.zeros(0)


def best_threshold(probs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, float, float]:
    """Probability threshold maximizing F1 of ``probs >= threshold``: ``(threshold, P, R, F1)``."""
    labels = labels.bool()
    positives = int(labels.sum())
    if probs.numel() == 0 or positives == 0:
        return 0.5, 0.0, 0.0, 0.0
    order = probs.argsort(descending=True)
    sorted_probs, sorted_labels = probs[order], labels[order].float()
    tp = sorted_labels.cumsum(0)
    predicted = torch.arange(1, probs.numel() + 1, dtype=torch.float32)
    precision, recall = tp / predicted, tp / positives
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    # only cut between distinct probabilities (a threshold keeps all ties)
    cut = torch.ones_like(f1, dtype=torch.bool)
    cut[:-1] = sorted_probs[:-1] > sorted_probs[1:]
    f1 = torch.where(cut, f1, torch.full_like(f1, -1.0))
    best = int(f1.argmax())
    return float(sorted_probs[best]), float(precision[best]), float(recall[best]), float(f1[best])


def _prf(predicted: torch.Tensor, labels: torch.Tensor) -> dict:
    tp = int((predicted & labels).sum())
    precision = tp / max(1, int(predicted.sum()))
    recall = tp / max(1, int(labels.sum()))
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def _rule_baseline(windows: list[Window], window: int) -> dict:
    """Precision / recall / F1 of the training-free rule's proposals against the labels."""
    predicted, labels = [], []
    for item in windows:
        cands = label_candidates(item.features.shape[0], window)
        peaks, _ = similarity_proposals(item.keys, window)
        predicted.append(peaks[cands])
        labels.append(item.labels[cands])
    if not predicted:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    return _prf(torch.cat(predicted), torch.cat(labels))


def _mean_chunk_length(predictor: BoundaryPredictor, windows: list[Window]) -> float:
    from ..config import DHSAConfig

    cfg = DHSAConfig()
    lengths = [
        (int(item.keys.shape[1]), predictor.boundaries(item.keys, cfg.min_chunk, cfg.max_chunk).numel() - 1)
        for item in windows
    ]
    chunks = sum(n for _, n in lengths)
    return sum(length for length, _ in lengths) / chunks if chunks else 0.0
