// dhsa::ChunkOffsets on fp32 buffers: a C++ transcription of dhsa_export.algo.boundaries
// (similarity_proposals, the predictor's thresholding and enforce_chunk_limits).
//
// Conventions as there: candidate c is the gap after token c; a boundary at c starts a chunk at
// offset c + 1. Window sums are added in the reference's order (token j, then j + 1, ...), so the
// similarity scores differ from torch's only by the order of the feature reductions.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ops.h"

namespace dhsa {

namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// Candidates per similarity task (one (sequence, tile) pair).
constexpr int64_t kCandidateTile = 2048;

// Per-candidate similarity dissimilarity d[c] = 1 - cos(sum of the left window, sum of the right
// window) over the tokens' features (KV heads concatenated), for candidates c0 <= c < c1 of the
// valid range [w - 1, L - w - 1]; other entries are left alone (0).
void similarity_scores(const ChunkOffsetsProblem& p, int64_t b, int64_t window, int64_t c0, int64_t c1,
                       float* d) {
  const int64_t L = p.length, D = p.head_dim, H = p.kv_heads;
  const float* key = p.key + b * H * L * D;
  std::vector<float> left(static_cast<size_t>(H * D)), right(static_cast<size_t>(H * D));
  // window_sums(features, w)[j] = f[j] + f[j + 1] + ... + f[j + w - 1], added in that order
  auto window_sum = [&](int64_t first, float* out) {
    for (int64_t h = 0; h < H; ++h) {
      const float* rows = key + (h * L + first) * D;
      float* o = out + h * D;
      for (int64_t e = 0; e < D; ++e) o[e] = rows[e];
      for (int64_t s = 1; s < window; ++s)
        for (int64_t e = 0; e < D; ++e) o[e] += rows[s * D + e];
    }
  };
  for (int64_t c = c0; c < c1; ++c) {
    window_sum(c - window + 1, left.data());
    window_sum(c + 1, right.data());
    double dot = 0.0, left_sq = 0.0, right_sq = 0.0;
    for (size_t e = 0; e < left.size(); ++e) {
      dot += static_cast<double>(left[e] * right[e]);
      left_sq += static_cast<double>(left[e] * left[e]);
      right_sq += static_cast<double>(right[e] * right[e]);
    }
    const float norms = std::sqrt(static_cast<float>(left_sq)) * std::sqrt(static_cast<float>(right_sq));
    d[c] = 1.0f - static_cast<float>(dot) / std::max(norms, 1e-12f);
  }
}

// similarity_proposals: local maxima of d (d[c] >= d[c-1], d[c] > d[c+1]) above mean + std
// (unbiased) of the valid candidates; returns chunk starts c + 1, ascending.
std::vector<int64_t> similarity_starts(const std::vector<float>& d, int64_t window) {
  const int64_t L = static_cast<int64_t>(d.size());
  const int64_t first = window - 1, last = L - window - 1;  // valid candidates, inclusive
  std::vector<int64_t> starts;
  const int64_t n = last - first + 1;
  if (n < 2) return starts;
  double sum = 0.0;
  for (int64_t c = first; c <= last; ++c) sum += d[c];
  const float mean = static_cast<float>(sum / static_cast<double>(n));
  double squares = 0.0;
  for (int64_t c = first; c <= last; ++c) {
    const double dev = static_cast<double>(d[c]) - static_cast<double>(mean);
    squares += dev * dev;
  }
  const float threshold = mean + static_cast<float>(std::sqrt(squares / static_cast<double>(n - 1)));
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t c = first; c <= last; ++c) {
    const float prev = c > 0 ? d[c - 1] : neg_inf;
    const float next = c + 1 < L ? d[c + 1] : neg_inf;
    if (d[c] >= prev && d[c] > next && d[c] > threshold) starts.push_back(c + 1);
  }
  return starts;
}

// enforce_chunk_limits: greedy from start 0; the first proposal in [start + min, min(start + max,
// L - min)] is taken; otherwise the rest ends the sequence when it fits one chunk; otherwise a cut is
// forced at the best-scoring start (the latest of equal scores; the latest start without scores).
// `starts` ascending, unique; scores[c] belongs to start c + 1 (null: none; non-finite: -inf).
std::vector<int64_t> enforce_chunk_limits(const std::vector<int64_t>& starts, int64_t L, int64_t min_chunk,
                                          int64_t max_chunk, const float* scores, int64_t score_count) {
  std::vector<int64_t> offsets{0};
  if (L <= 0) return offsets;
  std::vector<double> start_scores;
  if (scores != nullptr) {
    start_scores.assign(static_cast<size_t>(L + 1), kNegInf);
    const int64_t count = std::min(L - 1, score_count);
    for (int64_t c = 0; c < count; ++c) {
      const double v = static_cast<double>(scores[c]);
      start_scores[c + 1] = std::isfinite(v) ? v : kNegInf;
    }
  }
  int64_t start = 0;
  size_t next = 0;  // first proposal not yet passed
  while (true) {
    const int64_t lo = start + min_chunk, hi = start + max_chunk;
    const int64_t upper = std::min(hi, L - min_chunk);
    while (next < starts.size() && starts[next] < lo) ++next;
    int64_t chosen;
    if (next < starts.size() && starts[next] <= upper) {
      chosen = starts[next];
    } else if (L - start <= max_chunk) {
      break;
    } else {
      const int64_t cut_hi = upper >= lo ? upper : std::min(hi, L - 1);
      chosen = cut_hi;
      if (!start_scores.empty() && cut_hi >= lo) {
        double best = kNegInf;
        int64_t best_at = -1;
        for (int64_t s = cut_hi; s >= lo; --s)  // from the latest: the first maximum wins ties
          if (start_scores[s] > best) {
            best = start_scores[s];
            best_at = s;
          }
        if (best_at >= 0) chosen = best_at;
      }
    }
    offsets.push_back(chosen);
    start = chosen;
  }
  offsets.push_back(L);
  return offsets;
}

}  // namespace

void ChunkOffsetsAttrs::validate() const {
  const char* op = "ChunkOffsets";
  if (min_chunk < 1) throw Error(cat(op, ": attribute min_chunk = ", min_chunk, " must be >= 1"));
  if (max_chunk < min_chunk)
    throw Error(cat(op, ": attribute max_chunk = ", max_chunk, " must be >= min_chunk = ", min_chunk));
  if (window < 1) throw Error(cat(op, ": attribute window = ", window, " must be >= 1"));
  if (!std::isfinite(threshold)) throw Error(cat(op, ": attribute threshold = ", threshold, " must be finite"));
}

std::vector<std::vector<int64_t>> chunk_offsets(const ChunkOffsetsAttrs& a, const ChunkOffsetsProblem& p,
                                                const Parallel& parallel) {
  const int64_t B = p.batch, L = p.length;
  std::vector<std::vector<int64_t>> result(static_cast<size_t>(B));
  if (p.probs != nullptr) {
    const float threshold = static_cast<float>(a.threshold);
    parallel.run(static_cast<size_t>(B), [&](size_t b) {
      const float* probs = p.probs + static_cast<int64_t>(b) * L;
      std::vector<int64_t> starts;
      for (int64_t c = 0; c + 1 < L; ++c)
        if (probs[c] >= threshold) starts.push_back(c + 1);
      result[b] = enforce_chunk_limits(starts, L, a.min_chunk, a.max_chunk, probs, L);
    });
    return result;
  }
  // Similarity rule: d over candidate tiles in parallel, then proposals and limits per sequence.
  const int64_t first = a.window - 1, end = L - a.window;  // valid candidates [first, end)
  const int64_t tiles = end > first ? (end - first + kCandidateTile - 1) / kCandidateTile : 0;
  std::vector<std::vector<float>> d(static_cast<size_t>(B), std::vector<float>(static_cast<size_t>(L), 0.f));
  parallel.run(static_cast<size_t>(B * tiles), [&](size_t task) {
    const int64_t b = static_cast<int64_t>(task) / tiles, tile = static_cast<int64_t>(task) % tiles;
    const int64_t c0 = first + tile * kCandidateTile;
    similarity_scores(p, b, a.window, c0, std::min(end, c0 + kCandidateTile), d[b].data());
  });
  parallel.run(static_cast<size_t>(B), [&](size_t b) {
    const std::vector<int64_t> starts = similarity_starts(d[b], a.window);
    result[b] = enforce_chunk_limits(starts, L, a.min_chunk, a.max_chunk, d[b].data(), L);
  });
  return result;
}

}  // namespace dhsa
