// dhsa::BlockSparseAttention on fp32 buffers: validation, tiling over (batch, KV group, query
// block), one kernel call per tile. All query heads of a KV group are processed together, so each
// selected key/value tile is loaded (and transposed) once per group.
#include <algorithm>
#include <cmath>
#include <vector>

#include "ops.h"

namespace dhsa {

void AttentionAttrs::validate() const {
  if (q_block < 1) throw Error(cat("BlockSparseAttention: attribute q_block = ", q_block, " must be >= 1"));
  if (k_block < 1) throw Error(cat("BlockSparseAttention: attribute k_block = ", k_block, " must be >= 1"));
  if (!std::isfinite(scale)) throw Error(cat("BlockSparseAttention: attribute scale = ", scale, " must be finite (0 means 1/sqrt(D))"));
  if (causal != 0 && causal != 1) throw Error(cat("BlockSparseAttention: attribute causal = ", causal, " must be 0 or 1"));
}

void validate_offsets(const char* op, const int32_t* offsets, int64_t batch, int64_t width, int64_t k_len) {
  for (int64_t b = 0; b < batch; ++b) {
    const int32_t* row = offsets + b * width;
    if (row[0] != 0)
      throw Error(cat(op, ": key_chunk_offsets[", b, ", 0] = ", row[0], " must be 0"));
    for (int64_t c = 1; c < width; ++c)
      if (row[c] < row[c - 1])
        throw Error(cat(op, ": key_chunk_offsets[", b, ", ", c, "] = ", row[c], " is smaller than key_chunk_offsets[",
                        b, ", ", c - 1, "] = ", row[c - 1], "; offsets must not decrease"));
    if (row[width - 1] != k_len)
      throw Error(cat(op, ": key_chunk_offsets[", b, ", ", width - 1, "] = ", row[width - 1],
                      " must equal the key length ", k_len));
  }
}

namespace {

struct Scratch {
  std::vector<unsigned char> selected;
  std::vector<float> row_max, row_sum, key_t, probs;
};

Scratch& thread_scratch() {
  static thread_local Scratch scratch;
  return scratch;
}

}  // namespace

void block_sparse_attention(const AttentionAttrs& attrs, const AttentionProblem& p, float* output,
                            const Parallel& parallel, const KernelTable& kernels) {
  const char* op = "BlockSparseAttention";
  const int64_t B = p.batch, Hq = p.q_heads, Hkv = p.kv_heads, Lq = p.q_len, Lk = p.k_len;
  const int64_t D = p.head_dim, Dv = p.value_dim, Hr = p.routing_heads, nQ = p.q_blocks, K = p.width;

  // Geometry of the key chunks: fixed k_block blocks, or variable chunks per sequence.
  int64_t nC;
  std::vector<int64_t> offsets;
  if (p.chunk_offsets != nullptr) {
    if (p.offsets_width < 1) throw Error(cat(op, ": key_chunk_offsets needs at least one column (got 0)"));
    validate_offsets(op, p.chunk_offsets, B, p.offsets_width, Lk);
    nC = p.offsets_width - 1;
    offsets.assign(p.chunk_offsets, p.chunk_offsets + B * p.offsets_width);
  } else {
    nC = (Lk + attrs.k_block - 1) / attrs.k_block;
    offsets.resize(static_cast<size_t>(B * (nC + 1)));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c <= nC; ++c) offsets[b * (nC + 1) + c] = std::min(c * attrs.k_block, Lk);
  }

  // Counts in [0, K]; the first `count` indices of a row in [0, nC).
  for (int64_t row = 0; row < B * Hr * nQ; ++row) {
    const int32_t count = p.block_count[row];
    const int64_t b = row / (Hr * nQ), r = (row / nQ) % Hr, i = row % nQ;
    if (count < 0 || count > K)
      throw Error(cat(op, ": block_count[", b, ", ", r, ", ", i, "] = ", count, " is outside [0, ", K,
                      "] (block_index has ", K, " columns)"));
    const int32_t* index = p.block_index + row * K;
    for (int32_t j = 0; j < count; ++j)
      if (index[j] < 0 || index[j] >= nC)
        throw Error(cat(op, ": block_index[", b, ", ", r, ", ", i, ", ", j, "] = ", index[j], " is outside [0, ", nC,
                        ") (", nC, " key chunks", p.chunk_offsets ? " from key_chunk_offsets" : "", ")"));
  }

  const int64_t ratio = Hq / Hkv;       // query heads per KV head
  const int64_t head_group = Hq / Hr;   // query heads per routing head
  const double scale = attrs.scale != 0.0 ? attrs.scale : 1.0 / std::sqrt(static_cast<double>(D));
  const float scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  const int64_t q_offset = Lk - Lq;
  const int64_t groups = B * Hkv;
  const size_t tiles = static_cast<size_t>(groups * nQ);

  parallel.run(tiles, [&](size_t t) {
    // Latest query blocks (the most keys) first, so the tail of the loop is cheap.
    const int64_t i = nQ - 1 - static_cast<int64_t>(t) / groups;
    const int64_t b = (static_cast<int64_t>(t) % groups) / Hkv;
    const int64_t g = static_cast<int64_t>(t) % Hkv;
    const int64_t q0 = i * attrs.q_block;
    const int64_t rows = std::min(attrs.q_block, Lq - q0);

    Scratch& s = thread_scratch();
    s.selected.assign(static_cast<size_t>(ratio * nC), 0);
    s.row_max.resize(static_cast<size_t>(ratio * rows));
    s.row_sum.resize(static_cast<size_t>(ratio * rows));
    s.key_t.resize(static_cast<size_t>(D * kMaxKeyTile));
    s.probs.resize(static_cast<size_t>(kMaxKeyTile * 16));

    std::vector<const float*> q_rows(static_cast<size_t>(ratio));
    std::vector<float*> out_rows(static_cast<size_t>(ratio));
    for (int64_t t_h = 0; t_h < ratio; ++t_h) {
      const int64_t h = g * ratio + t_h;
      q_rows[t_h] = p.query + ((b * Hq + h) * Lq + q0) * D;
      out_rows[t_h] = output + ((b * Hq + h) * Lq + q0) * Dv;
      const int64_t r = h / head_group;
      const int64_t row = (b * Hr + r) * nQ + i;
      const int32_t* index = p.block_index + row * K;
      unsigned char* flags = s.selected.data() + t_h * nC;
      for (int32_t j = 0; j < p.block_count[row]; ++j) flags[index[j]] = 1;  // duplicates count once
    }

    AttentionTile tile;
    tile.head_dim = D;
    tile.value_dim = Dv;
    tile.q_len = rows;
    tile.q_pos0 = q_offset + q0;
    tile.causal = static_cast<int>(attrs.causal);
    tile.scale_log2 = scale_log2;
    tile.num_heads = static_cast<int>(ratio);
    tile.q = q_rows.data();
    tile.out = out_rows.data();
    tile.k = p.key + (b * Hkv + g) * Lk * D;
    tile.v = p.value + (b * Hkv + g) * Lk * Dv;
    tile.num_chunks = nC;
    tile.chunk_offsets = offsets.data() + b * (nC + 1);
    tile.selected = s.selected.data();
    tile.row_max = s.row_max.data();
    tile.row_sum = s.row_sum.data();
    tile.key_t = s.key_t.data();
    tile.probs = s.probs.data();
    kernels.attention_tile(&tile);
  });
}

}  // namespace dhsa
