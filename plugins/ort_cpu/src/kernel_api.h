// Plain-data interface between the ONNX Runtime glue and the vectorized kernels.
//
// The kernels (kernels.inc) are compiled once per instruction set (generic x86-64, AVX2+FMA,
// AVX-512) into separate translation units with different flags; the glue picks one table at
// run time (dispatch.cpp). This header holds only plain structs and declarations, no inline code,
// so nothing compiled with wide-vector flags can leak into the baseline code through the linker.
#pragma once

#include <cstddef>
#include <cstdint>

namespace dhsa {

// Largest key tile of any kernel build (one online-softmax step; 32 or 64 keys): sizes scratch.
constexpr int kMaxKeyTile = 64;

// One (batch, KV group, query block) tile of BlockSparseAttention in fp32.
struct AttentionTile {
  int64_t head_dim;       // D
  int64_t value_dim;      // Dv
  int64_t q_len;          // query rows of this block (per head)
  int64_t q_pos0;         // key position of the block's first query (may be negative)
  int causal;             // 1: query at position p sees keys <= p
  float scale_log2;       // softmax scale * log2(e)
  int num_heads;          // query heads of the KV group handled together
  const float* const* q;  // [num_heads] -> [q_len, D] rows (contiguous)
  float* const* out;      // [num_heads] -> [q_len, Dv] rows (contiguous), written by the tile
  const float* k;         // KV head: [Lk, D]
  const float* v;         // KV head: [Lk, Dv]
  int64_t num_chunks;     // nC
  const int64_t* chunk_offsets;  // [nC + 1], validated: 0 = o_0 <= ... <= o_nC = Lk
  const unsigned char* selected; // [num_heads, nC] chunk flags per head (deduplicated)
  float* row_max;         // scratch [num_heads * q_len]
  float* row_sum;         // scratch [num_heads * q_len]
  float* key_t;           // scratch [D * kMaxKeyTile] (transposed key tile)
  float* probs;           // scratch [kMaxKeyTile * 16] (probabilities of a row block)
};

struct KernelTable {
  const char* name;
  // Exact online-softmax attention of one tile (see AttentionTile).
  void (*attention_tile)(const AttentionTile* tile);
  // out[r * ldo + j] = dot(q[r * ldq .. + D], k[j * ldk .. + D]) for r < rows, j < keys (fp32);
  // key_t is scratch of D * kMaxKeyTile floats.
  void (*dot_rows)(const float* q, int64_t ldq, int64_t rows, const float* k, int64_t ldk,
                   int64_t keys, int64_t head_dim, float* out, int64_t ldo, float* key_t);
  // In place x[j] = softmax(x * scale)[j] over j < n (n >= 1; vectorized exp, sum in float lanes).
  void (*softmax)(float* x, int64_t n, float scale);
};

namespace generic { extern const KernelTable kTable; }
namespace avx2 { extern const KernelTable kTable; }
#if defined(DHSA_WITH_AVX512)
namespace avx512 { extern const KernelTable kTable; }
#endif

// The best table the CPU supports, capped by `requested` ("generic", "avx2", "avx512" or
// empty/null for the best). Never returns a table the CPU cannot run.
const KernelTable& select_kernels(const char* requested);

}  // namespace dhsa
