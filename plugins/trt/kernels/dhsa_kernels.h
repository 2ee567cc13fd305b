/*
 * dhsa_kernels.h - C ABI of the DHSA CUDA kernels (no TensorRT, no PyTorch).
 *
 * One set of functions serves every caller: the TensorRT plugin (IPluginV3 enqueue) and Python
 * (ctypes, dhsa_export/backends/torch_cuda). No C++ exception crosses this boundary: every function
 * returns an int status (DHSA_STATUS_*); dhsa_last_error_message() says what failed, with the values.
 *
 * Op: dhsa::BlockSparseAttention (DESIGN.md section 4)
 *   q   [B, Hq,  Lq, D]   contiguous, fp16 or bf16
 *   k   [B, Hkv, Lk, D]   contiguous, same dtype
 *   v   [B, Hkv, Lk, D]   contiguous, same dtype (Dv == D)
 *   block_index int32 [B, Hr, nQ, K]   ascending chunk ids, padded (entries >= count are ignored)
 *   block_count int32 [B, Hr, nQ]
 *   key_chunk_offsets int32 [B, nC + 1]  optional: variable chunks [off[c], off[c+1]); without it
 *                                        chunk c is keys [c*k_block, min((c+1)*k_block, Lk)).
 *   out [B, Hq, Lq, D]
 * nQ = ceil(Lq / q_block); query head h uses routing head h / (Hq / Hr); query t sits at key position
 * Lk - Lq + t; with causal, key position > query position is masked token by token. Rows with no key
 * produce zeros.
 *
 * Indices are validated on the device: a count outside [0, K], a chunk id outside [0, nC), a list
 * that is not strictly ascending, or chunk offsets that are not within [0, Lk] and non-overlapping
 * set bits of an error flag held in the workspace (DHSA_FLAG_*); the offending row is then computed
 * as if empty (zeros), nothing is read out of bounds. The flag is read with dhsa_bsa_read_error_flag
 * (synchronizes the stream) or by copying the first int32 of the workspace.
 */
#ifndef DHSA_KERNELS_H
#define DHSA_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#if defined(__GNUC__)
#define DHSA_API __attribute__((visibility("default")))
#else
#define DHSA_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define DHSA_ABI_VERSION 4 /* 2: dhsa_route_*, 3: dhsa_chunk_offsets_*, 4: dhsa_chunk_offsets_pack */

/* Status codes returned by every function. */
#define DHSA_STATUS_OK 0
#define DHSA_STATUS_INVALID_ARGUMENT 1 /* null pointer, bad shape, misaligned pointer, ... */
#define DHSA_STATUS_UNSUPPORTED 2      /* valid but not implemented (head_dim, dtype, group) */
#define DHSA_STATUS_WORKSPACE 3        /* workspace missing or too small */
#define DHSA_STATUS_CUDA_ERROR 4       /* a CUDA call failed (launch, memset, copy) */
#define DHSA_STATUS_INDEX_ERROR 5      /* dhsa_bsa_read_error_flag: the device flagged bad indices */

/* Bits of the device error flag. */
#define DHSA_FLAG_BAD_COUNT 1         /* block_count outside [0, K] */
#define DHSA_FLAG_BAD_INDEX 2         /* chunk id outside [0, nC) */
#define DHSA_FLAG_NOT_ASCENDING 4     /* chunk ids not strictly ascending */
#define DHSA_FLAG_BAD_CHUNK_OFFSETS 8 /* chunk offsets outside [0, Lk], decreasing or overlapping */

/* Element types. */
#define DHSA_DTYPE_FP16 0
#define DHSA_DTYPE_BF16 1

/* Kernel variants (tile shapes); 0 picks one from the shape and the device. */
#define DHSA_VARIANT_AUTO 0
#define DHSA_VARIANT_M64 1  /* 4 warps, 64 query rows per CTA */
#define DHSA_VARIANT_M128 2 /* 8 warps, 128 query rows per CTA */
#define DHSA_VARIANT_M128_W4 3 /* 4 warps x 32 rows, 128 query rows per CTA */
#define DHSA_VARIANT_M256 4 /* 8 warps x 32 rows, 256 query rows per CTA */
/* Hopper (sm_90a builds on compute capability 9.0 only; DHSA_STATUS_UNSUPPORTED elsewhere): wgmma,
 * 128 query rows (2 consumer warpgroups x 64) and 128 gathered keys per tile, 3 K/V stages. */
#define DHSA_VARIANT_WGMMA 5         /* + a producer warpgroup (mbarriers); S_j issued with
                                        P_{j-1} V_{j-1}, consumer ping-pong. AUTO's choice on sm_90.
                                        Fixed chunks with k_block % 8 == 0 dividing 128: the
                                        producer copies K/V blocks with bulk tensor copies (TMA);
                                        otherwise it gathers rows with cp.async */
#define DHSA_VARIANT_WGMMA_SERIAL 6  /* no producer: S, softmax, P V in turn */
#define DHSA_VARIANT_WGMMA_OVERLAP 7 /* no producer: S_j with P_{j-1} V_{j-1}, ping-pong */
#define DHSA_VARIANT_WGMMA_SPLIT 8   /* as WGMMA_OVERLAP with K loaded two tiles ahead, V one */
#define DHSA_VARIANT_WGMMA_CPASYNC 9 /* as WGMMA with the cp.async producer in every case */

typedef struct DhsaBsaParams {
    const void* q;                    /* [B, Hq, Lq, D] */
    const void* k;                    /* [B, Hkv, Lk, D] */
    const void* v;                    /* [B, Hkv, Lk, D] */
    void* out;                        /* [B, Hq, Lq, D] */
    const int32_t* block_index;       /* [B, Hr, nQ, K] */
    const int32_t* block_count;       /* [B, Hr, nQ] */
    const int32_t* key_chunk_offsets; /* [B, nC + 1] or NULL (fixed k_block chunks) */
    int32_t batch;
    int32_t num_q_heads;     /* Hq */
    int32_t num_kv_heads;    /* Hkv */
    int32_t num_route_heads; /* Hr; head_group = Hq / Hr must divide Hq / Hkv */
    int32_t q_len;           /* Lq */
    int32_t k_len;           /* Lk */
    int32_t head_dim;        /* D: 64 or 128 */
    int32_t index_width;     /* K */
    int32_t num_chunks;      /* nC: with key_chunk_offsets, its row length - 1; else ignored */
    int32_t q_block;
    int32_t k_block;         /* fixed chunk length (ignored with key_chunk_offsets) */
    float scale;             /* softmax scale, e.g. 1/sqrt(D) */
    int32_t causal;          /* 0 or 1 */
    int32_t dtype;           /* DHSA_DTYPE_* */
    int32_t variant;         /* DHSA_VARIANT_* */
} DhsaBsaParams;

/* ABI version of the loaded library (DHSA_ABI_VERSION of the build). */
DHSA_API int dhsa_abi_version(void);

/* Human-readable name of a status code. */
DHSA_API const char* dhsa_status_string(int status);

/* Message of the last failing call on this host thread ("" if none). */
DHSA_API const char* dhsa_last_error_message(void);

/* Bytes of device workspace dhsa_bsa_forward needs for these parameters (shapes and attributes
 * only: buffer pointers may be NULL; key_chunk_offsets != NULL says the chunks are variable). */
DHSA_API int dhsa_bsa_workspace_size(const DhsaBsaParams* params, size_t* bytes);

/* Validate the parameters (host side), clear the error flag, validate the indices and run the
 * attention on `stream`. Asynchronous: index errors are reported through the workspace flag. */
DHSA_API int dhsa_bsa_forward(const DhsaBsaParams* params, void* workspace, size_t workspace_bytes,
                     cudaStream_t stream);

/* Copy the error flag out of the workspace and synchronize `stream`. Returns DHSA_STATUS_OK when
 * the flag is 0, DHSA_STATUS_INDEX_ERROR (flag bits in *flag) otherwise. `flag` may be NULL. */
DHSA_API int dhsa_bsa_read_error_flag(const void* workspace, cudaStream_t stream, int32_t* flag);

/* ------------------------------------------------------------------------------------------------
 * Op: dhsa::Route (DESIGN.md section 4; dhsa_export/onnx/registry.py is the contract)
 *   q   [B, Hq,  Lq, D]   contiguous, fp16, bf16 or fp32 (DHSA_DTYPE_*), D in [1, 256]
 *   k   [B, Hkv, Lk, D]   contiguous, same dtype; Lq <= Lk (query t sits at key position Lk - Lq + t)
 *   key_chunk_offsets int32 [B, W]  optional: variable chunks of the dynamic pattern (row b: 0, then
 *                                   non-decreasing, ending at Lk; W = nC + 1). Validated on the
 *                                   device: a bad row sets DHSA_FLAG_BAD_CHUNK_OFFSETS in the
 *                                   workspace flag and that batch entry's outputs are written empty.
 *   block_index int32 [B, Hr, nQ, nC]  out: selected chunk ids ascending, padded with -1
 *   block_count int32 [B, Hr, nQ]      out
 * Hr = Hq / head_group (head_group 1 = per query head, Hq / Hkv = per KV group), nQ = ceil(Lq /
 * q_block), nC = W - 1 with variable chunks (pattern dynamic and offsets given), else
 * ceil(Lk / k_block). vslash becomes vslash_blockwise when vslash_blockwise_above > 0 and
 * Lk > vslash_blockwise_above. The attribute fields mirror the registry's Route attributes one to
 * one (same names; pattern and chunk_score as the enums below).
 * ------------------------------------------------------------------------------------------------ */

/* Element type fp32 (Route only; BlockSparseAttention takes fp16 / bf16). */
#define DHSA_DTYPE_FP32 2

/* Route patterns (registry attribute `pattern`, in the order of dhsa_export.config.PATTERNS). */
#define DHSA_ROUTE_PATTERN_TOPK 0
#define DHSA_ROUTE_PATTERN_ASHAPE 1
#define DHSA_ROUTE_PATTERN_VSLASH 2
#define DHSA_ROUTE_PATTERN_VSLASH_BLOCKWISE 3
#define DHSA_ROUTE_PATTERN_DYNAMIC 4

/* Route chunk scores of the dynamic pattern (registry attribute `chunk_score`, order of
 * dhsa_export.config.CHUNK_SCORES). */
#define DHSA_ROUTE_CHUNK_SCORE_MASS 0 /* log mean_{j in c} exp(mean(q of block) . k_j / sqrt(D)) */
#define DHSA_ROUTE_CHUNK_SCORE_MEAN 1 /* mean(q of block) . mean(k of c) x sqrt(len c) / sqrt(D) */

typedef struct DhsaRouteParams {
    const void* q;                    /* [B, Hq, Lq, D] */
    const void* k;                    /* [B, Hkv, Lk, D] */
    const int32_t* key_chunk_offsets; /* [B, offsets_width] or NULL */
    int32_t* block_index;             /* [B, Hr, nQ, nC] */
    int32_t* block_count;             /* [B, Hr, nQ] */
    int32_t batch;
    int32_t num_q_heads;   /* Hq */
    int32_t num_kv_heads;  /* Hkv */
    int32_t q_len;         /* Lq */
    int32_t k_len;         /* Lk */
    int32_t head_dim;      /* D */
    int32_t offsets_width; /* W of key_chunk_offsets (0 without) */
    int32_t dtype;         /* DHSA_DTYPE_* */
    /* Route attributes (registry order) */
    int32_t q_block;
    int32_t k_block;
    int32_t pattern;                /* DHSA_ROUTE_PATTERN_* */
    double density;                 /* (0, 1]: budget_blocks = max(1, floor(density * ceil(Lk / k_block) + 1e-3)) */
    int32_t head_group;             /* 1 or Hq / Hkv */
    int32_t sink_tokens;
    int32_t local_tokens;
    int32_t instruction_tokens;
    int32_t vslash_blockwise_above;
    int32_t chunk_score;            /* DHSA_ROUTE_CHUNK_SCORE_* */
} DhsaRouteParams;

/* Output geometry: routing heads Hr, query blocks nQ, chunks nC (= the index width). This and
 * dhsa_route_workspace_size read shapes and attributes only (buffer pointers may be NULL; the
 * offsets count as given when offsets_width > 0). */
DHSA_API int dhsa_route_output_shape(const DhsaRouteParams* params, int32_t* routing_heads,
                                     int32_t* q_blocks, int32_t* chunks);

/* Bytes of device workspace dhsa_route_forward needs for these parameters (shapes only). */
DHSA_API int dhsa_route_workspace_size(const DhsaRouteParams* params, size_t* bytes);

/* Validate the parameters (host side), then route on `stream` (asynchronous). The workspace's first
 * int32 is the device error flag (bad key_chunk_offsets), read with dhsa_route_read_error_flag. */
DHSA_API int dhsa_route_forward(const DhsaRouteParams* params, void* workspace,
                                size_t workspace_bytes, cudaStream_t stream);

/* As dhsa_bsa_read_error_flag, for a Route workspace. */
DHSA_API int dhsa_route_read_error_flag(const void* workspace, cudaStream_t stream, int32_t* flag);

/*
 * Op: dhsa::ChunkOffsets (registry ChunkOffsets: the dynamic pattern's variable key chunks)
 *   key             [B, Hkv, L, D]  contiguous, dtype fp16 / bf16 / fp32 (read by the similarity rule)
 *   boundary_probs  float32 [B, L] or NULL: the predictor's probability per candidate c (a chunk
 *                   may start at c + 1 when it is >= threshold); NULL: the similarity rule on key
 *   offsets         int32 [B, L + 1] (output): row b holds its offsets 0 = o_0 < ... < o_nC = L,
 *                   then L up to the end of the row
 *   counts          int32 [B] (output): nC_b + 1, the offsets of row b
 * Chunk lengths are kept in [min_chunk, max_chunk] wherever L allows (forced cuts at the best
 * score), as dhsa_export.algo.boundaries.enforce_chunk_limits. The registry's output is
 * offsets[:, :max(counts)] (rows padded with L).
 */
typedef struct DhsaChunkOffsetsParams {
    const void* key;             /* [B, Hkv, L, D] */
    const float* boundary_probs; /* [B, L] or NULL */
    int32_t* offsets;            /* [B, L + 1] */
    int32_t* counts;             /* [B] */
    int32_t batch;
    int32_t num_kv_heads;
    int32_t length;              /* L */
    int32_t head_dim;
    int32_t dtype;               /* DHSA_DTYPE_* of key */
    /* ChunkOffsets attributes (registry order) */
    int32_t min_chunk;
    int32_t max_chunk;
    int32_t window;              /* similarity rule: tokens per side of a candidate */
    double threshold;            /* predictor: probability from which a candidate is proposed */
} DhsaChunkOffsetsParams;

/* Bytes of device workspace dhsa_chunk_offsets_forward needs (shapes and attributes only). */
DHSA_API int dhsa_chunk_offsets_workspace_size(const DhsaChunkOffsetsParams* params, size_t* bytes);

/* Validate (host side) and compute offsets and counts on `stream` (asynchronous). */
DHSA_API int dhsa_chunk_offsets_forward(const DhsaChunkOffsetsParams* params, void* workspace,
                                        size_t workspace_bytes, cudaStream_t stream);

/* Pack the padded rows `offsets` [B, L + 1] (as dhsa_chunk_offsets_forward wrote them, with its
 * `counts` [B]) into `packed` [B, S], S = max(counts), the registry's output, and store S in
 * `*width` (device int64): the TensorRT plugin's data-dependent output and its size tensor, with
 * no host synchronization. `packed` must hold B * (L + 1) int32. (ABI 4) */
DHSA_API int dhsa_chunk_offsets_pack(const int32_t* offsets, const int32_t* counts, int32_t batch,
                                     int32_t length, int32_t* packed, int64_t* width,
                                     cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* DHSA_KERNELS_H */
