// The dhsa ops on fp32 buffers, independent of ONNX Runtime (ort_ops.cpp adapts them).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common.h"
#include "kernel_api.h"

namespace dhsa {

struct RouteAttrs {
  int64_t q_block = 128;
  int64_t k_block = 32;
  std::string pattern = "vslash";
  double density = 0.125;
  int64_t head_group = 1;
  int64_t sink_tokens = 32;
  int64_t local_tokens = 128;
  int64_t instruction_tokens = 128;
  int64_t vslash_blockwise_above = 65536;
  std::string chunk_score = "mass";  // dynamic: "mass" (log mean exp of token logits) or "mean"

  void validate() const;  // throws Error naming the bad attribute
};

struct AttentionAttrs {
  int64_t q_block = 128;
  int64_t k_block = 32;
  double scale = 0.0;
  int64_t causal = 1;

  void validate() const;
};

struct RouteProblem {
  const float* query = nullptr;  // [B, Hq, Lq, D]
  const float* key = nullptr;    // [B, Hkv, Lk, D]
  int64_t batch = 0, q_heads = 0, kv_heads = 0, q_len = 0, k_len = 0, head_dim = 0;
  const int32_t* chunk_offsets = nullptr;  // [B, offsets_width] or null
  int64_t offsets_width = 0;
};

struct RouteShape {
  int64_t routing_heads = 0;  // Hr
  int64_t q_blocks = 0;       // nQ
  int64_t chunks = 0;         // nC (output width)
  std::string pattern;        // effective pattern
  bool variable_chunks = false;
};

// Validates the problem against the attributes (shapes, head grouping, offsets) and returns the
// output geometry. Throws Error.
RouteShape route_shape(const RouteAttrs& attrs, const RouteProblem& problem);

// block_index [B, Hr, nQ, nC] (ascending, -1 padded), block_count [B, Hr, nQ].
void route(const RouteAttrs& attrs, const RouteProblem& problem, const RouteShape& shape,
           int32_t* block_index, int32_t* block_count, const Parallel& parallel,
           const KernelTable& kernels);

struct AttentionProblem {
  const float* query = nullptr;  // [B, Hq, Lq, D]
  const float* key = nullptr;    // [B, Hkv, Lk, D]
  const float* value = nullptr;  // [B, Hkv, Lk, Dv]
  int64_t batch = 0, q_heads = 0, kv_heads = 0, q_len = 0, k_len = 0, head_dim = 0, value_dim = 0;
  const int32_t* block_index = nullptr;  // [B, Hr, nQ, K]
  const int32_t* block_count = nullptr;  // [B, Hr, nQ]
  int64_t routing_heads = 0, q_blocks = 0, width = 0;
  const int32_t* chunk_offsets = nullptr;  // [B, nC + 1] or null
  int64_t offsets_width = 0;
};

// Validates counts, indices and offsets, then computes output [B, Hq, Lq, Dv]. Throws Error.
void block_sparse_attention(const AttentionAttrs& attrs, const AttentionProblem& problem, float* output,
                            const Parallel& parallel, const KernelTable& kernels);

struct ChunkOffsetsAttrs {
  int64_t min_chunk = 8;
  int64_t max_chunk = 32;
  int64_t window = 4;
  double threshold = 0.5;

  void validate() const;
};

struct ChunkOffsetsProblem {
  const float* key = nullptr;    // [B, Hkv, L, D] layer-0 key states
  int64_t batch = 0, kv_heads = 0, length = 0, head_dim = 0;
  const float* probs = nullptr;  // [B, L] predictor probabilities, or null for the similarity rule
};

// Chunk offsets of every sequence (0 = o_0 < ... < o_nC = L, lengths in [min_chunk, max_chunk]
// wherever L allows): the similarity rule on the keys, or the predictor's probabilities
// thresholded; then the chunk limits (dhsa_export.algo.boundaries.enforce_chunk_limits).
std::vector<std::vector<int64_t>> chunk_offsets(const ChunkOffsetsAttrs& attrs, const ChunkOffsetsProblem& problem,
                                                const Parallel& parallel);

// Shared validation of key_chunk_offsets [B, W] (W >= 1): row b starts at 0, never decreases and
// ends at k_len. `op` names the op in messages.
void validate_offsets(const char* op, const int32_t* offsets, int64_t batch, int64_t width, int64_t k_len);

}  // namespace dhsa
