// dhsa::Route on fp32 buffers: a C++ transcription of dhsa_export.algo.routing.
//
// Every step follows the PyTorch reference, including where rounding decides ties:
// - block/chunk means are differences of prefix sums accumulated in double and stored as float
//   (what torch.cumsum does on CPU), divided by the (clamped) length in float;
// - group means sum the heads in float in order and divide by the group size;
// - line scores are differences of float prefix sums, so blocks crossed by the same selected lines
//   get bit-identical scores and ties fall to the lower chunk index as in the stable argsort;
// - selection takes forced chunks first (counted once), then candidates in descending rank with the
//   lower index first on ties, while forced + chosen cost <= budget (integers, as in the reference).
// Values computed with a different summation order (dot products, softmax) can differ from the
// reference in the last bits, which changes a selection only when two candidates are within that
// rounding of each other.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ops.h"

namespace dhsa {

namespace {

const char* const kPatterns[] = {"topk", "ashape", "vslash", "vslash_blockwise", "dynamic"};

bool known_pattern(const std::string& p) {
  for (const char* name : kPatterns)
    if (p == name) return true;
  return false;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// DHSAConfig.budget_blocks: max(1, floor(density * ceil(Lk / k_block) + 1e-3)).
int64_t budget_blocks(const RouteAttrs& a, int64_t k_len) {
  const int64_t key_blocks = ceil_div(k_len, a.k_block);
  const double blocks = std::floor(a.density * static_cast<double>(key_blocks) + 1e-3);
  return std::max<int64_t>(1, static_cast<int64_t>(blocks));
}

struct Grid {
  int64_t nq = 0, nc = 0, q_offset = 0;
  std::vector<int64_t> qo, co;  // [nQ + 1], [nC + 1]
  int64_t first(int64_t i) const { return qo[i] + q_offset; }
  int64_t last(int64_t i) const { return qo[i + 1] - 1 + q_offset; }
  int64_t start(int64_t c) const { return co[c]; }
  int64_t end(int64_t c) const { return co[c + 1]; }
  bool causal(int64_t i, int64_t c) const { return co[c] <= last(i); }
  bool diagonal(int64_t i, int64_t c) const { return co[c + 1] > first(i) && co[c] <= last(i); }
  bool covering(int64_t i, int64_t c, int64_t lo, int64_t hi) const {
    return co[c + 1] > lo && co[c] <= hi && causal(i, c);
  }
  bool sink(int64_t i, int64_t c, int64_t tokens) const { return co[c] < std::max<int64_t>(1, tokens) && causal(i, c); }
  bool local(int64_t i, int64_t c, int64_t tokens) const {
    return covering(i, c, std::max<int64_t>(0, first(i) - tokens), last(i));
  }
};

// Candidate a ranks before b: larger rank first (NaN as the largest, like torch.sort), then lower index.
inline bool ranks_before(const float* rank, int32_t a, int32_t b) {
  const float x = rank[a], y = rank[b];
  const bool nx = x != x, ny = y != y;
  if (nx != ny) return nx;
  if (!nx && x != y) return x > y;
  return a < b;
}

// select_under_budget for one row. `weights` null means one budget unit per chunk.
void select_row(const Grid& g, int64_t i, const float* rank, const unsigned char* forced,
                const int64_t* weights, int64_t budget, bool dense, std::vector<int32_t>& candidates,
                unsigned char* mask) {
  const int64_t nc = g.nc;
  if (dense) {
    for (int64_t c = 0; c < nc; ++c) mask[c] = g.causal(i, c);
    return;
  }
  int64_t spent = 0;
  candidates.clear();
  for (int64_t c = 0; c < nc; ++c) {
    const bool causal = g.causal(i, c);
    mask[c] = causal && forced[c];
    if (mask[c]) spent += weights ? weights[c] : 1;
    else if (causal) candidates.push_back(static_cast<int32_t>(c));
  }
  auto before = [rank](int32_t a, int32_t b) { return ranks_before(rank, a, b); };
  if (weights == nullptr) {
    const int64_t room = budget - spent;
    if (room <= 0) return;
    if (static_cast<int64_t>(candidates.size()) > room) {
      std::nth_element(candidates.begin(), candidates.begin() + room, candidates.end(), before);
      candidates.resize(static_cast<size_t>(room));
    }
    for (int32_t c : candidates) mask[c] = 1;
    return;
  }
  std::sort(candidates.begin(), candidates.end(), before);
  int64_t cumulative = 0;
  for (int32_t c : candidates) {
    cumulative += weights[c];
    if (spent + cumulative > budget) break;  // later ones cannot fit either (weights >= 0)
    mask[c] = 1;
  }
}

// top_lines_mask: the `count` largest entries (positive ones only); ties to the lower index.
std::vector<unsigned char> top_lines(const std::vector<float>& scores, int64_t count) {
  const int64_t n = static_cast<int64_t>(scores.size());
  count = std::max<int64_t>(0, std::min(count, n));
  std::vector<unsigned char> mask(static_cast<size_t>(n), 0);
  std::vector<int32_t> positive;
  for (int64_t j = 0; j < n; ++j)
    if (scores[j] > 0.f) positive.push_back(static_cast<int32_t>(j));
  if (static_cast<int64_t>(positive.size()) > count) {
    const float* s = scores.data();
    std::nth_element(positive.begin(), positive.begin() + count, positive.end(),
                     [s](int32_t a, int32_t b) { return s[a] != s[b] ? s[a] > s[b] : a < b; });
    positive.resize(static_cast<size_t>(count));
  }
  for (int32_t j : positive) mask[j] = 1;
  return mask;
}

// float prefix sums of x (length n) accumulated in double: out[0] = 0, out[t] = x[0] + ... + x[t-1].
std::vector<float> prefix_sums(const std::vector<float>& x) {
  std::vector<float> out(x.size() + 1, 0.f);
  double acc = 0.0;
  for (size_t t = 0; t < x.size(); ++t) {
    acc += x[t];
    out[t + 1] = static_cast<float>(acc);
  }
  return out;
}

// segment_means of one head x [L, D] over `bounds` (nondecreasing, within [0, L]) -> [n, D].
void segment_means(const float* x, int64_t head_dim, const std::vector<int64_t>& bounds, float* out) {
  const int64_t n = static_cast<int64_t>(bounds.size()) - 1;
  std::vector<double> acc(static_cast<size_t>(head_dim), 0.0);
  std::vector<float> prev(static_cast<size_t>(head_dim), 0.f), cur(static_cast<size_t>(head_dim));
  int64_t pos = 0;
  for (int64_t s = 0; s < n; ++s) {
    for (; pos < bounds[s + 1]; ++pos) {
      const float* row = x + pos * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) acc[d] += row[d];
    }
    for (int64_t d = 0; d < head_dim; ++d) cur[d] = static_cast<float>(acc[d]);
    const float len = static_cast<float>(std::max<int64_t>(1, bounds[s + 1] - bounds[s]));
    for (int64_t d = 0; d < head_dim; ++d) out[s * head_dim + d] = (cur[d] - prev[d]) / len;
    prev.swap(cur);
  }
}

float sigmoid(float x) { return static_cast<float>(1.0 / (1.0 + std::exp(-static_cast<double>(x)))); }

struct Task {
  const RouteAttrs& a;
  const RouteProblem& p;
  const RouteShape& shape;
  const Grid& grid;
  const KernelTable& kernels;
  int64_t b, r, head_group, kv;
};

// group_mean(segment_means(q)) for routing head r: [nQ, D], the heads summed in order, / group.
std::vector<float> routed_query_means(const Task& t) {
  const Grid& g = t.grid;
  const RouteProblem& p = t.p;
  const int64_t D = p.head_dim;
  std::vector<float> q_routed(static_cast<size_t>(g.nq * D), 0.f), means(static_cast<size_t>(g.nq * D));
  for (int64_t j = 0; j < t.head_group; ++j) {
    const int64_t h = t.r * t.head_group + j;
    segment_means(p.query + ((t.b * p.q_heads + h) * p.q_len) * D, D, g.qo, means.data());
    for (size_t e = 0; e < means.size(); ++e) q_routed[e] += means[e];
  }
  if (t.head_group > 1) {
    const float n = static_cast<float>(t.head_group);
    for (float& v : q_routed) v /= n;
  }
  return q_routed;
}

// block_scores for routing head r: [nQ, nC] = mean(q block) . rep(k chunk) / sqrt(D).
std::vector<float> block_scores(const Task& t, bool length_normalized) {
  const Grid& g = t.grid;
  const RouteProblem& p = t.p;
  const int64_t D = p.head_dim;
  const std::vector<float> q_routed = routed_query_means(t);
  std::vector<float> k_rep(static_cast<size_t>(g.nc * D));
  segment_means(p.key + ((t.b * p.kv_heads + t.kv) * p.k_len) * D, D, g.co, k_rep.data());
  if (length_normalized) {
    for (int64_t c = 0; c < g.nc; ++c) {
      const float w = std::sqrt(static_cast<float>(g.end(c) - g.start(c)));
      for (int64_t d = 0; d < D; ++d) k_rep[c * D + d] *= w;
    }
  }
  std::vector<float> score(static_cast<size_t>(g.nq * g.nc));
  std::vector<float> key_t(static_cast<size_t>(D * kMaxKeyTile));
  t.kernels.dot_rows(q_routed.data(), D, g.nq, k_rep.data(), D, g.nc, D, score.data(), g.nc, key_t.data());
  const float root = static_cast<float>(std::sqrt(static_cast<double>(D)));
  for (float& v : score) v /= root;
  return score;
}

// chunk_mass_scores for routing head r: [nQ, nC] =
// log mean_{j in chunk c} exp(mean(q block i) . k_j / sqrt(D)), as torch computes it: the token
// logits divided by sqrt(D), a logsumexp per chunk (max, then log of the summed exp(x - max), plus the
// max; an infinite max counts as 0) minus log(max(1, length)). Empty chunks score -inf.
// Logits are computed for a tile of query blocks at a time (about 2^22 floats of scratch).
std::vector<float> mass_scores(const Task& t) {
  const Grid& g = t.grid;
  const RouteProblem& p = t.p;
  const int64_t D = p.head_dim, Lk = p.k_len, nq = g.nq, nc = g.nc;
  const std::vector<float> q_routed = routed_query_means(t);
  std::vector<float> score(static_cast<size_t>(nq * nc), -std::numeric_limits<float>::infinity());
  if (Lk == 0 || nq == 0) return score;
  std::vector<float> log_len(static_cast<size_t>(nc));
  for (int64_t c = 0; c < nc; ++c) log_len[c] = std::log(static_cast<float>(std::max<int64_t>(1, g.end(c) - g.start(c))));
  const float root = static_cast<float>(std::sqrt(static_cast<double>(D)));
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(nq, (int64_t{1} << 22) / Lk));
  std::vector<float> logits(static_cast<size_t>(rows * Lk)), key_t(static_cast<size_t>(D * kMaxKeyTile));
  const float* keys = p.key + ((t.b * p.kv_heads + t.kv) * Lk) * D;
  for (int64_t i0 = 0; i0 < nq; i0 += rows) {
    const int64_t n = std::min(rows, nq - i0);
    t.kernels.dot_rows(q_routed.data() + i0 * D, D, n, keys, D, Lk, D, logits.data(), Lk, key_t.data());
    for (int64_t i = 0; i < n; ++i) {
      float* x = logits.data() + i * Lk;
      for (int64_t j = 0; j < Lk; ++j) x[j] /= root;
      for (int64_t c = 0; c < nc; ++c) {
        const int64_t s = g.start(c), e = g.end(c);
        if (e <= s) continue;  // empty chunk: -inf
        float peak = x[s];
        for (int64_t j = s + 1; j < e; ++j) peak = std::max(peak, x[j]);
        if (std::isinf(peak)) peak = 0.f;
        double total = 0.0;
        for (int64_t j = s; j < e; ++j) total += static_cast<double>(std::exp(x[j] - peak));  // float exp, as torch
        score[(i0 + i) * nc + c] = (std::log(static_cast<float>(total)) + peak) - log_len[c];
      }
    }
  }
  return score;
}

std::vector<unsigned char> vslash_dense_rows(const Task& t) {
  const int64_t budget_tokens = budget_blocks(t.a, t.p.k_len) * t.a.k_block;
  std::vector<unsigned char> rows(static_cast<size_t>(t.grid.nq), 0);
  const int64_t first = std::min(t.grid.nq, ceil_div(budget_tokens, t.a.q_block));
  for (int64_t i = 0; i < first; ++i) rows[i] = 1;
  if (t.grid.nq > 0) rows[t.grid.nq - 1] = 1;
  return rows;
}

// line_rank: blocks hit by a selected line rank by 1 + mass, the others by the fallback in [0, 0.999].
inline float line_rank(float line, float fallback) {
  if (line > 0.f) return 1.0f + line;
  return std::min(std::max(fallback, 0.f), 0.999f);
}

// vslash: exact softmax of the last q_block queries against all keys -> vertical and slash lines.
std::vector<float> vslash_rank(const Task& t) {
  const Grid& g = t.grid;
  const RouteProblem& p = t.p;
  const int64_t Lq = p.q_len, Lk = p.k_len, D = p.head_dim;
  const int64_t n_last = std::min(t.a.q_block, Lq);
  const float root = static_cast<float>(std::sqrt(static_cast<double>(D)));
  std::vector<double> vertical_acc(static_cast<size_t>(Lk), 0.0), slash_acc(static_cast<size_t>(Lk), 0.0);
  // Query rows per batch, all heads of the routing group stacked (about 128 rows per dot_rows call),
  // so each transposed key tile serves many rows.
  const int64_t hg = t.head_group;
  const int64_t kRows = std::max<int64_t>(16, 128 / hg);
  std::vector<float> stacked(static_cast<size_t>(hg * kRows * D));
  std::vector<float> logits(static_cast<size_t>(hg * kRows * Lk)), probs(static_cast<size_t>(kRows * Lk));
  std::vector<float> key_t(static_cast<size_t>(D * kMaxKeyTile));
  const float* keys = p.key + ((t.b * p.kv_heads + t.kv) * Lk) * D;
  for (int64_t j0 = 0; j0 < n_last; j0 += kRows) {
    const int64_t rows = std::min(kRows, n_last - j0);
    for (int64_t hj = 0; hj < hg; ++hj) {
      const int64_t h = t.r * hg + hj;
      const float* q = p.query + ((t.b * p.q_heads + h) * Lq + (Lq - n_last + j0)) * D;
      std::copy(q, q + rows * D, stacked.begin() + hj * rows * D);
    }
    t.kernels.dot_rows(stacked.data(), D, hg * rows, keys, D, Lk, D, logits.data(), Lk, key_t.data());
    std::fill(probs.begin(), probs.begin() + rows * Lk, 0.f);
    for (int64_t hj = 0; hj < hg; ++hj) {  // group mean: heads summed in order (then / hg below)
      for (int64_t j = 0; j < rows; ++j) {
        const int64_t position = Lk - n_last + j0 + j;  // q_offset + query index
        const int64_t visible = std::min(Lk, position + 1);
        float* x = logits.data() + (hj * rows + j) * Lk;
        t.kernels.softmax(x, visible, 1.0f / root);
        float* acc = probs.data() + j * Lk;
        for (int64_t k = 0; k < visible; ++k) acc[k] += x[k];
      }
    }
    for (int64_t j = 0; j < rows; ++j) {
      const int64_t position = Lk - n_last + j0 + j;
      const int64_t visible = std::min(Lk, position + 1);
      float* pr = probs.data() + j * Lk;
      if (t.head_group > 1) {
        const float n = static_cast<float>(t.head_group);
        for (int64_t k = 0; k < visible; ++k) pr[k] /= n;
      }
      for (int64_t k = 0; k < visible; ++k) {
        vertical_acc[k] += pr[k];
        slash_acc[position - k] += pr[k];
      }
    }
  }
  std::vector<float> vertical(vertical_acc.begin(), vertical_acc.end());
  std::vector<float> slash(slash_acc.begin(), slash_acc.end());
  const int64_t budget_tokens = budget_blocks(t.a, Lk) * t.a.k_block;
  const int64_t n_vertical = budget_tokens / 2;
  const auto v_mask = top_lines(vertical, n_vertical);
  const auto s_mask = top_lines(slash, budget_tokens - n_vertical);
  for (int64_t k = 0; k < Lk; ++k) {
    if (!v_mask[k]) vertical[k] = 0.f;
    if (!s_mask[k]) slash[k] = 0.f;
  }
  const std::vector<float> v_prefix = prefix_sums(vertical), s_prefix = prefix_sums(slash);
  const std::vector<float> score = block_scores(t, false);
  std::vector<float> rank(static_cast<size_t>(g.nq * g.nc));
  const int64_t max_offset = Lk - 1;
  for (int64_t i = 0; i < g.nq; ++i) {
    for (int64_t c = 0; c < g.nc; ++c) {
      const int64_t s = g.start(c), e = g.end(c);
      const float v_block = v_prefix[e] - v_prefix[s];
      const int64_t o_min = std::min(std::max<int64_t>(g.first(i) - (e - 1), 0), max_offset + 1);
      const int64_t o_max = std::min(std::max<int64_t>(g.last(i) - s, -1), max_offset);
      float s_block = 0.f;
      if (o_max >= o_min) s_block = s_prefix[std::max<int64_t>(o_max + 1, 0)] - s_prefix[std::min(o_min, max_offset + 1)];
      const float lines = v_block + s_block;
      rank[i * g.nc + c] = line_rank(lines, sigmoid(score[i * g.nc + c]));
    }
  }
  return rank;
}

// vslash_blockwise: the same lines predicted from block-level probabilities only.
std::vector<float> vslash_blockwise_rank(const Task& t) {
  const Grid& g = t.grid;
  const int64_t nq = g.nq, nc = g.nc;
  std::vector<float> probs = block_scores(t, false);
  std::vector<int64_t> diag(static_cast<size_t>(nq));
  for (int64_t i = 0; i < nq; ++i) {
    // searchsorted(chunk ends, last(i), right=True): chunks whose end <= last(i)
    diag[i] = std::upper_bound(g.co.begin() + 1, g.co.end(), g.last(i)) - (g.co.begin() + 1);
  }
  for (int64_t i = 0; i < nq; ++i) {
    float* row = probs.data() + i * nc;
    int64_t visible = 0;
    while (visible < nc && g.causal(i, visible)) ++visible;  // causal chunks are a prefix
    t.kernels.softmax(row, visible, 1.0f);
    for (int64_t c = visible; c < nc; ++c) row[c] = 0.f;
  }
  std::vector<double> v_acc(static_cast<size_t>(nc), 0.0), s_acc(static_cast<size_t>(nc), 0.0);
  for (int64_t i = 0; i < nq; ++i) {
    for (int64_t c = 0; c < nc; ++c) {
      const float pr = probs[i * nc + c];
      v_acc[c] += pr;
      if (g.causal(i, c)) s_acc[std::max<int64_t>(0, diag[i] - c)] += pr;
    }
  }
  std::vector<float> vertical(v_acc.begin(), v_acc.end()), slash(s_acc.begin(), s_acc.end());
  const int64_t budget = budget_blocks(t.a, t.p.k_len);
  const int64_t n_vertical = budget / 2;
  const auto v_mask = top_lines(vertical, n_vertical);
  const auto s_mask = top_lines(slash, budget - n_vertical);
  for (int64_t c = 0; c < nc; ++c) {
    if (!v_mask[c]) vertical[c] = 0.f;
    if (!s_mask[c]) slash[c] = 0.f;
  }
  std::vector<float> rank(static_cast<size_t>(nq * nc));
  for (int64_t i = 0; i < nq; ++i) {
    for (int64_t c = 0; c < nc; ++c) {
      const float band = g.causal(i, c) ? slash[std::max<int64_t>(0, diag[i] - c)] : 0.f;
      rank[i * nc + c] = line_rank(vertical[c] + band, probs[i * nc + c]);
    }
  }
  return rank;
}

void route_one(const Task& t, int32_t* index, int32_t* count) {
  const Grid& g = t.grid;
  const RouteAttrs& a = t.a;
  const std::string& pattern = t.shape.pattern;
  const int64_t nq = g.nq, nc = g.nc;

  std::vector<float> rank;
  std::vector<unsigned char> dense(static_cast<size_t>(nq), 0);
  std::vector<int64_t> weights;
  int64_t budget = budget_blocks(a, t.p.k_len);
  bool sink_local = false;  // forced = sink(sink_tokens) | local window, else sink(k_block) | diagonal
  if (pattern == "topk") {
    rank = block_scores(t, false);
  } else if (pattern == "ashape") {
    rank = block_scores(t, false);
    sink_local = true;
  } else if (pattern == "vslash") {
    rank = vslash_rank(t);
    dense = vslash_dense_rows(t);
  } else if (pattern == "vslash_blockwise") {
    rank = vslash_blockwise_rank(t);
    dense = vslash_dense_rows(t);
  } else {  // dynamic
    rank = a.chunk_score == "mass" ? mass_scores(t) : block_scores(t, true);
    sink_local = true;
    weights.resize(static_cast<size_t>(nc));
    for (int64_t c = 0; c < nc; ++c) weights[c] = g.end(c) - g.start(c);
    budget *= a.k_block;  // budget_tokens
    for (int64_t i = 0; i < nq; ++i) dense[i] = g.qo[i + 1] > t.p.q_len - a.instruction_tokens;
  }

  std::vector<unsigned char> forced(static_cast<size_t>(nc)), mask(static_cast<size_t>(nc));
  std::vector<int32_t> candidates;
  candidates.reserve(static_cast<size_t>(nc));
  for (int64_t i = 0; i < nq; ++i) {
    for (int64_t c = 0; c < nc; ++c) {
      forced[c] = sink_local ? (g.sink(i, c, a.sink_tokens) || g.local(i, c, a.local_tokens))
                             : (g.sink(i, c, a.k_block) || g.diagonal(i, c));
    }
    select_row(g, i, rank.data() + i * nc, forced.data(), weights.empty() ? nullptr : weights.data(), budget,
               dense[i] != 0, candidates, mask.data());
    int32_t* out = index + i * nc;
    int32_t n = 0;
    for (int64_t c = 0; c < nc; ++c)
      if (mask[c]) out[n++] = static_cast<int32_t>(c);
    count[i] = n;
    for (int64_t c = n; c < nc; ++c) out[c] = -1;
  }
}

}  // namespace

void RouteAttrs::validate() const {
  const char* op = "Route";
  if (q_block < 1) throw Error(cat(op, ": attribute q_block = ", q_block, " must be >= 1"));
  if (k_block < 1) throw Error(cat(op, ": attribute k_block = ", k_block, " must be >= 1"));
  if (!known_pattern(pattern))
    throw Error(cat(op, ": attribute pattern = '", pattern, "' is unknown; use topk, ashape, vslash, vslash_blockwise or dynamic"));
  if (!(density > 0.0 && density <= 1.0)) throw Error(cat(op, ": attribute density = ", density, " is outside (0, 1]"));
  if (head_group < 1) throw Error(cat(op, ": attribute head_group = ", head_group, " must be >= 1"));
  if (sink_tokens < 0) throw Error(cat(op, ": attribute sink_tokens = ", sink_tokens, " must be >= 0"));
  if (local_tokens < 0) throw Error(cat(op, ": attribute local_tokens = ", local_tokens, " must be >= 0"));
  if (instruction_tokens < 0) throw Error(cat(op, ": attribute instruction_tokens = ", instruction_tokens, " must be >= 0"));
  if (chunk_score != "mass" && chunk_score != "mean")
    throw Error(cat(op, ": attribute chunk_score = '", chunk_score, "' is unknown; use mass or mean"));
  if (vslash_blockwise_above < 0)
    throw Error(cat(op, ": attribute vslash_blockwise_above = ", vslash_blockwise_above, " must be >= 0"));
}

RouteShape route_shape(const RouteAttrs& a, const RouteProblem& p) {
  const char* op = "Route";
  if (p.q_heads % p.kv_heads != 0)
    throw Error(cat(op, ": query heads ", p.q_heads, " are not a multiple of key heads ", p.kv_heads));
  const int64_t ratio = p.q_heads / p.kv_heads;
  if (a.head_group != 1 && a.head_group != ratio)
    throw Error(cat(op, ": attribute head_group = ", a.head_group, " must be 1 (per head) or Hq/Hkv = ", ratio,
                    " (per KV group)"));
  if (p.q_len > p.k_len)
    throw Error(cat(op, ": query length ", p.q_len, " exceeds key length ", p.k_len,
                    "; queries must be the last Lq of the Lk key positions"));
  RouteShape s;
  s.routing_heads = p.q_heads / a.head_group;
  s.q_blocks = ceil_div(p.q_len, a.q_block);
  s.pattern = a.pattern;
  if (s.pattern == "vslash" && a.vslash_blockwise_above > 0 && p.k_len > a.vslash_blockwise_above)
    s.pattern = "vslash_blockwise";
  if (p.chunk_offsets != nullptr) {
    if (p.offsets_width < 1) throw Error(cat(op, ": key_chunk_offsets needs at least one column (got 0)"));
    validate_offsets(op, p.chunk_offsets, p.batch, p.offsets_width, p.k_len);
  }
  s.variable_chunks = s.pattern == "dynamic" && p.chunk_offsets != nullptr;
  s.chunks = s.variable_chunks ? p.offsets_width - 1 : ceil_div(p.k_len, a.k_block);
  return s;
}

void route(const RouteAttrs& a, const RouteProblem& p, const RouteShape& s, int32_t* block_index,
           int32_t* block_count, const Parallel& parallel, const KernelTable& kernels) {
  const int64_t B = p.batch, Hr = s.routing_heads, nQ = s.q_blocks, nC = s.chunks;
  std::vector<Grid> grids(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    Grid& g = grids[b];
    g.nq = nQ;
    g.nc = nC;
    g.q_offset = p.k_len - p.q_len;
    g.qo.resize(static_cast<size_t>(nQ + 1));
    for (int64_t i = 0; i <= nQ; ++i) g.qo[i] = std::min(i * a.q_block, p.q_len);
    g.co.resize(static_cast<size_t>(nC + 1));
    for (int64_t c = 0; c <= nC; ++c)
      g.co[c] = s.variable_chunks ? p.chunk_offsets[b * p.offsets_width + c] : std::min(c * a.k_block, p.k_len);
  }
  const int64_t kv_per_routing = Hr / p.kv_heads;  // routing heads per KV head (Hr is a multiple of Hkv)
  parallel.run(static_cast<size_t>(B * Hr), [&](size_t task) {
    const int64_t b = static_cast<int64_t>(task) / Hr, r = static_cast<int64_t>(task) % Hr;
    const Task t{a, p, s, grids[b], kernels, b, r, a.head_group, r / kv_per_routing};
    route_one(t, block_index + (b * Hr + r) * nQ * nC, block_count + (b * Hr + r) * nQ);
  });
}

}  // namespace dhsa
