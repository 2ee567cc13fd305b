// dhsa::Route on the GPU: chunk selection per (routing head, query block) for every pattern
// (topk, ashape, vslash, vslash_blockwise, dynamic), a CUDA transcription of
// dhsa_export/algo/routing.py (the same semantics as plugins/ort_cpu/src/route.cpp).
//
// Kernels, in launch order (dhsa_kernels.cu launches them; all fp32 arithmetic):
//   route_check_offsets   key_chunk_offsets rows validated; a bad row flags its batch entry, whose
//                         outputs are then written empty (count 0, indices -1); nothing out of bounds.
//   route_query_means     qm [B, Hr, nQ, D]: block means of the queries, averaged over the head group.
//   route_key_means       km [B, Hkv, nC, D]: chunk means of the keys (x sqrt(length) for dynamic/mean).
//   vslash:       route_vslash_stats + _merge (row max / sum of the exact softmax of the last q_block
//                 queries, split over key ranges of kStatsSplit, merged in split order),
//                 route_vslash_lines (vertical sums per key, slash sums per offset in windows per key
//                 tile), route_vslash_slash_reduce, route_top_lines (top lines + prefix sums).
//   vslash_blockwise: route_blockwise_lines (block-level softmax per row, vertical / slash partial
//                 sums per tile of rows), route_blockwise_reduce, route_top_lines.
//   route_select          one CTA per (batch, routing head, select_rows query blocks; 1 but for
//                         dynamic/mass): the rows' ranks in shared memory, forced chunks, the budget filled in rank order by a radix select
//                         (ties to the lower chunk index, as the stable sort of the reference), then
//                         the ascending indices compacted with a block scan.
// Every reduction has a fixed order (no float atomics), so the output is deterministic.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "block_sparse_attention.cuh"  // dhsa::Mma (mma.sync m16n8k16)

namespace dhsa {
namespace route {

constexpr int kPatternTopk = 0, kPatternAshape = 1, kPatternVslash = 2, kPatternBlockwise = 3,
              kPatternDynamic = 4;
constexpr int kScoreMass = 0, kScoreMean = 1;
constexpr int kMaxHeadDim = 256;
constexpr int kSelectThreads = 256;
constexpr int kTile = 64;           // rows / keys of a logits tile (vslash)
constexpr int kBlockwiseRows = 16;  // query blocks per CTA of route_blockwise_lines
constexpr int kStatsSplit = 1024;   // keys per CTA of route_vslash_stats
constexpr int kMaxSelectRows = 8;   // query blocks per CTA of route_select (dynamic / mass)
constexpr int kFlagBadOffsets = 8;  // DHSA_FLAG_BAD_CHUNK_OFFSETS

struct RouteArgs {
    const void* q;             // [B, Hq, Lq, D]
    const void* k;             // [B, Hkv, Lk, D]
    const int32_t* offsets;    // [B, w] or null
    int32_t* block_index;      // [B, Hr, nQ, nC]
    int32_t* block_count;      // [B, Hr, nQ]
    int32_t* flag;             // device error flag (DHSA_FLAG_*)
    int32_t* bad_batch;        // [B]: 1 when the batch entry's offsets are invalid
    float* qm;                 // [B, Hr, nQ, D]
    float* km;                 // [B, Hkv, nC, D]
    float* row_m;              // vslash [B, Hq, n_last], blockwise [B, Hr, nQ]
    float* row_l;
    float* vertical;           // [B, Hr, line_len]
    float* slash;              // [B, Hr, line_len]
    float* slash_part;         // vslash [B, Hr, n_kt, n_last + 63], blockwise [B, Hr, tiles, nC]
    float* vert_part;          // blockwise [B, Hr, tiles, nC]
    float* v_prefix;           // vslash [B, Hr, Lk + 1]
    float* s_prefix;
    float* stats_part;         // vslash [B, Hq, n_last, n_split, 2]
    int batch, hq, hkv, hr, lq, lk, d, nq, nc, w;
    int q_block, k_block, head_group, kv_ratio, q_offset;
    int pattern, chunk_score, variable, length_normalized;
    int sink_tokens, local_tokens, instruction_tokens;
    long long budget;   // blocks, or tokens for dynamic
    long long dense_first;  // vslash: rows < dense_first are dense
    int n_last, n_vertical, n_slash, line_len, n_kt, row_tiles, n_split;
    int select_rows;    // query blocks per CTA of route_select
    float root;         // (float)sqrt(D)
};

// ------------------------------------------------------------------------------ element loads
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

// ------------------------------------------------------------------------------ grid geometry
struct Geo {
    const int32_t* off;  // offsets row of this batch entry, or null (fixed k_block chunks)
    int k_block, lk, lq, q_block, q_offset;
    __device__ long long start(int c) const {
        return off ? (long long)off[c] : min((long long)c * k_block, (long long)lk);
    }
    __device__ long long end(int c) const {
        return off ? (long long)off[c + 1] : min((long long)(c + 1) * k_block, (long long)lk);
    }
    __device__ long long first(int i) const { return (long long)i * q_block + q_offset; }
    __device__ long long last(int i) const {
        return min((long long)(i + 1) * q_block, (long long)lq) - 1 + q_offset;
    }
    __device__ bool causal(int i, int c) const { return start(c) <= last(i); }
    __device__ bool diagonal(int i, int c) const {
        return end(c) > first(i) && start(c) <= last(i);
    }
    __device__ bool sink(int i, int c, long long tokens) const {
        return start(c) < max(1ll, tokens) && causal(i, c);
    }
    __device__ bool local(int i, int c, long long tokens) const {
        const long long lo = max(0ll, first(i) - tokens);
        return end(c) > lo && start(c) <= last(i) && causal(i, c);
    }
};

__device__ __forceinline__ Geo make_geo(const RouteArgs& a, int b) {
    Geo g;
    g.off = a.variable ? a.offsets + (long long)b * a.w : nullptr;
    g.k_block = a.k_block;
    g.lk = a.lk;
    g.lq = a.lq;
    g.q_block = a.q_block;
    g.q_offset = a.q_offset;
    return g;
}

// Chunks whose start (ENDS = false) or end (ENDS = true) is <= pos; both never decrease. Starts: the
// causal chunks of a row are the prefix [0, count). Ends: searchsorted(chunk ends, pos, right=True).
template <bool ENDS>
__device__ int count_bounds_le(const Geo& g, int nc, long long pos) {
    int lo = 0, hi = nc;
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if ((ENDS ? g.end(mid) : g.start(mid)) <= pos) lo = mid + 1; else hi = mid;
    }
    return lo;
}

__device__ __forceinline__ int count_starts_le(const Geo& g, int nc, long long pos) {
    return count_bounds_le<false>(g, nc, pos);
}

__device__ __forceinline__ int count_ends_le(const Geo& g, int nc, long long pos) {
    return count_bounds_le<true>(g, nc, pos);
}

// ------------------------------------------------------------------------------ block helpers
// Order-preserving key of a float for a descending selection: larger key = ranked first. NaN ranks
// first (as in torch.sort), -0.0 equals +0.0 (equal values tie and fall to the lower index).
__device__ __forceinline__ uint32_t order_key(float f) {
    if (f != f) return 0xFFFFFFFFu;
    if (f == 0.f) f = 0.f;
    const uint32_t u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Inclusive scan of an int over the block; *total = block sum. All threads must call.
__device__ int block_scan_incl(int v, int* total) {
    __shared__ int warp_sums[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
    int x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) warp_sums[warp] = x;
    __syncthreads();
    if (warp == 0) {
        int s = lane < nwarps ? warp_sums[lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, s, o);
            if (lane >= o) s += y;
        }
        warp_sums[lane] = s;
    }
    __syncthreads();
    if (warp > 0) x += warp_sums[warp - 1];
    *total = warp_sums[nwarps - 1];
    __syncthreads();
    return x;
}

// Fixed-order block reductions (float): a warp tree, then warp 0 over the warp results.
template <bool MAX>
__device__ float block_reduce(float v) {
    __shared__ float parts[32];
    __shared__ float result;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float y = __shfl_xor_sync(0xffffffffu, v, o);
        v = MAX ? fmaxf(v, y) : v + y;
    }
    if (lane == 0) parts[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float s = lane < nwarps ? parts[lane] : (MAX ? -INFINITY : 0.f);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float y = __shfl_xor_sync(0xffffffffu, s, o);
            s = MAX ? fmaxf(s, y) : s + y;
        }
        if (lane == 0) result = s;
    }
    __syncthreads();
    const float r = result;
    __syncthreads();
    return r;
}

// Radix select of the selection rule: among the items with item(c, &key, &weight) == true, the
// prefix of the order (key descending, index ascending) whose cumulative weight stays <= room.
// Afterwards: *all = every candidate fits; else items with key > *thr are taken, and items with key
// == *thr in index order while their cumulative weight stays <= *rem. room < 0 selects nothing.
struct Cut {
    bool all, none;
    uint32_t thr;
    long long rem;
};

template <typename Item>
__device__ Cut radix_cut(Item item, int n, long long room) {
    __shared__ long long hist[256];
    __shared__ long long s_rem;
    __shared__ uint32_t s_digit;
    Cut cut{false, false, 0u, 0};
    if (room < 0) {
        cut.none = true;
        return cut;
    }
    long long local = 0;
    for (int c = threadIdx.x; c < n; c += blockDim.x) {
        uint32_t key;
        long long wgt;
        if (item(c, &key, &wgt)) local += wgt;
    }
    // total weight (int64 block sum through the histogram slot 0)
    if (threadIdx.x == 0) hist[0] = 0;
    __syncthreads();
    atomicAdd(reinterpret_cast<unsigned long long*>(&hist[0]), (unsigned long long)local);
    __syncthreads();
    const long long total = hist[0];
    __syncthreads();
    if (total <= room) {
        cut.all = true;
        return cut;
    }
    uint32_t prefix = 0, pmask = 0;
    long long rem = room;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int t = threadIdx.x; t < 256; t += blockDim.x) hist[t] = 0;
        __syncthreads();
        // Warp-aggregated: the lanes of a warp that fall in one bin add their weights first and one
        // lane adds the sum (the keys of a row share their top bits, so per-lane shared atomics on
        // a few bins serialized; GPU_NOTES "Route in CUDA C++"). A group's weights are distinct
        // chunks' lengths (or 1s), so their sum is at most L < 2^31: 32-bit lanes sums suffice.
        for (int c0 = 0; c0 < n; c0 += blockDim.x) {  // every lane of a warp iterates together
            const int c = c0 + (int)threadIdx.x;
            uint32_t key = 0;
            long long wgt = 0;
            const bool in = c < n && item(c, &key, &wgt) && (key & pmask) == prefix && wgt != 0;
            const unsigned active = __ballot_sync(0xffffffffu, in);
            if (in) {
                const uint32_t bin = (key >> shift) & 255u;
                const unsigned group = __match_any_sync(active, bin);
                const unsigned sum = __reduce_add_sync(group, (unsigned)wgt);
                if ((int)(threadIdx.x & 31) == __ffs(group) - 1)
                    atomicAdd(reinterpret_cast<unsigned long long*>(&hist[bin]), (unsigned long long)sum);
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            long long cum = 0;
            uint32_t digit = 0;
            for (int bkt = 255; bkt >= 0; --bkt) {
                if (cum + hist[bkt] > rem) {
                    digit = (uint32_t)bkt;
                    break;
                }
                cum += hist[bkt];
            }
            s_digit = digit;
            s_rem = rem - cum;
        }
        __syncthreads();
        prefix |= s_digit << shift;
        pmask |= 0xFFu << shift;
        rem = s_rem;
        __syncthreads();
    }
    cut.thr = prefix;
    cut.rem = rem;
    return cut;
}

// (m, l) <- the merge of two (max, sum of exp(x - max)) pairs; m == -inf is an empty pair.
__device__ __forceinline__ void merge_max_sum(float& m, float& l, float m2, float l2) {
    const float mn = fmaxf(m, m2);
    const float s1 = m == -INFINITY ? 0.f : l * expf(m - mn);
    const float s2 = m2 == -INFINITY ? 0.f : l2 * expf(m2 - mn);
    m = mn;
    l = s1 + s2;
}

// merge_max_sum over the lanes that differ in the bits of FIRST, FIRST / 2, ..., 1 (xor tree).
template <int FIRST>
__device__ __forceinline__ void warp_merge_max_sum(float& m, float& l) {
#pragma unroll
    for (int o = FIRST; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
        const float l2 = __shfl_xor_sync(0xffffffffu, l, o);
        merge_max_sum(m, l, m2, l2);
    }
}

// Warp dot product of a shared fp32 row with a global fp32 row (lanes over D, fixed tree).
__device__ __forceinline__ float warp_dot(const float* qs, const float* row, int d) {
    const int lane = threadIdx.x & 31;
    float acc = 0.f;
    for (int e = lane; e < d; e += 32) acc = fmaf(qs[e], row[e], acc);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    return acc;
}

// ------------------------------------------------------------------------------ preprocessing
__global__ void route_check_offsets_kernel(RouteArgs a) {
    const int b = blockIdx.x;
    int bad = 0;
    if (a.offsets != nullptr) {
        const int32_t* row = a.offsets + (long long)b * a.w;
        for (int c = threadIdx.x; c < a.w; c += blockDim.x) {
            const int32_t v = row[c];
            if (c == 0 && v != 0) bad = 1;
            if (c > 0 && v < row[c - 1]) bad = 1;
            if (c == a.w - 1 && v != a.lk) bad = 1;
            if (v < 0 || v > a.lk) bad = 1;
        }
    }
    bad = __syncthreads_or(bad);
    if (threadIdx.x == 0) {
        a.bad_batch[b] = bad;
        if (bad) atomicOr(a.flag, kFlagBadOffsets);
    }
}

// qm[b, r, i, :] = (1 / hg) sum_h mean_{t in block i} q[b, h, t, :]  (heads r*hg .. r*hg + hg - 1)
template <typename T>
__global__ void route_query_means_kernel(RouteArgs a) {
    const int i = blockIdx.x, r = blockIdx.y, b = blockIdx.z;
    const T* q = static_cast<const T*>(a.q);
    const long long t0 = (long long)i * a.q_block;
    const long long t1 = min(t0 + a.q_block, (long long)a.lq);
    const float len = (float)max(1ll, t1 - t0);
    float* out = a.qm + (((long long)b * a.hr + r) * a.nq + i) * a.d;
    for (int e = threadIdx.x; e < a.d; e += blockDim.x) {
        float group = 0.f;
        for (int j = 0; j < a.head_group; ++j) {
            const int h = r * a.head_group + j;
            const T* src = q + (((long long)b * a.hq + h) * a.lq) * a.d + e;
            float s = 0.f;
            for (long long t = t0; t < t1; ++t) s += to_f(src[t * a.d]);
            group += s / len;
        }
        out[e] = a.head_group > 1 ? group / (float)a.head_group : group;
    }
}

// km[b, kv, c, :] = mean of the keys of chunk c (x sqrt(length) when length_normalized).
template <typename T>
__global__ void route_key_means_kernel(RouteArgs a) {
    const int c = blockIdx.x, kv = blockIdx.y, b = blockIdx.z;
    float* out = a.km + (((long long)b * a.hkv + kv) * a.nc + c) * a.d;
    if (a.bad_batch[b]) {
        for (int e = threadIdx.x; e < a.d; e += blockDim.x) out[e] = 0.f;
        return;
    }
    const Geo g = make_geo(a, b);
    const long long s0 = g.start(c), s1 = g.end(c);
    const long long len = s1 > s0 ? s1 - s0 : 0;
    const float scale = a.length_normalized ? sqrtf((float)len) : 1.f;
    const T* k = static_cast<const T*>(a.k) + (((long long)b * a.hkv + kv) * a.lk) * a.d;
    for (int e = threadIdx.x; e < a.d; e += blockDim.x) {
        float s = 0.f;
        for (long long t = s0; t < s1; ++t) s += to_f(k[t * a.d + e]);
        out[e] = s / (float)max(1ll, len) * scale;
    }
}

// ------------------------------------------------------------------------------ vslash lines
// 64 x 64 logits tiles (query rows x keys, fp32 results) for 256 threads, two ways:
//  - CUDA cores (any dtype, any D): thread (ty, tx) of 16 x 16 holds rows ty*4 + r, keys tx*4 + c;
//  - tensor cores (fp16 / bf16, D % 16 == 0, 16-byte aligned rows): mma.sync m16n8k16, warp w holds
//    rows (w >> 1) * 16 + g (+ 8), keys (w & 1) * 32 + nb * 8 + 2 t (+ 1), g = lane / 4, t = lane % 4.
// Either way a thread holds 16 values v[i]; tile_row / tile_col say where value i sits.
struct TileSmem {
    float a[32][kTile + 4];
    float b[32][kTile + 4];
};

struct MmaTileSmem {
    uint16_t q[kTile][72];  // 64 halves of D + 8 of padding: fragment loads hit 32 distinct banks
    uint16_t k[kTile][72];
};

template <bool MMA>
__device__ __forceinline__ int tile_row(int i) {
    const int tid = threadIdx.x, lane = tid & 31;
    return MMA ? (tid >> 6) * 16 + (lane >> 2) + 8 * ((i >> 1) & 1) : (tid >> 4) * 4 + (i >> 2);
}

template <bool MMA>
__device__ __forceinline__ int tile_col(int i) {
    const int tid = threadIdx.x, lane = tid & 31;
    return MMA ? ((tid >> 5) & 1) * 32 + (i >> 2) * 8 + 2 * (lane & 3) + (i & 1) : (tid & 15) * 4 + (i & 3);
}

// Row slot of value i among the thread's rows (4 rows on CUDA cores, 2 on tensor cores).
template <bool MMA>
__device__ __forceinline__ int tile_slot(int i) { return MMA ? (i >> 1) & 1 : i >> 2; }

template <typename T>
__device__ void logits_tile_fp32(const T* qrows, int nrows, const T* krows, int nkeys, int d,
                                 TileSmem& sm, float (&v)[16]) {
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
#pragma unroll
    for (int i = 0; i < 16; ++i) v[i] = 0.f;
    for (int d0 = 0; d0 < d; d0 += 32) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int e = tid + 256 * j, row = e >> 5, dk = e & 31, dd = d0 + dk;
            sm.a[dk][row] = (row < nrows && dd < d) ? to_f(qrows[(long long)row * d + dd]) : 0.f;
            sm.b[dk][row] = (row < nkeys && dd < d) ? to_f(krows[(long long)row * d + dd]) : 0.f;
        }
        __syncthreads();
#pragma unroll 8
        for (int dk = 0; dk < 32; ++dk) {
            const float4 x = *reinterpret_cast<const float4*>(&sm.a[dk][ty * 4]);
            const float4 y = *reinterpret_cast<const float4*>(&sm.b[dk][tx * 4]);
            const float xa[4] = {x.x, x.y, x.z, x.w}, ya[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
            for (int r = 0; r < 4; ++r)
#pragma unroll
                for (int c = 0; c < 4; ++c) v[r * 4 + c] = fmaf(xa[r], ya[c], v[r * 4 + c]);
        }
        __syncthreads();
    }
}

template <typename T>
__device__ void logits_tile_mma(const T* qrows, int nrows, const T* krows, int nkeys, int d,
                                MmaTileSmem& sm, float (&v)[16]) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const int wr = warp >> 1, wc = warp & 1;
#pragma unroll
    for (int i = 0; i < 16; ++i) v[i] = 0.f;
    for (int d0 = 0; d0 < d; d0 += 64) {
        const int dw = min(64, d - d0);  // a multiple of 16
#pragma unroll
        for (int j = 0; j < 2; ++j) {  // 64 rows x 8 chunks of 16 bytes, for q and for k
            const int e = tid + 256 * j, row = e >> 3, ch = e & 7;
            uint4 qv = make_uint4(0, 0, 0, 0), kv = make_uint4(0, 0, 0, 0);
            if (ch * 8 < dw) {
                if (row < nrows) qv = *reinterpret_cast<const uint4*>(qrows + (long long)row * d + d0 + ch * 8);
                if (row < nkeys) kv = *reinterpret_cast<const uint4*>(krows + (long long)row * d + d0 + ch * 8);
            }
            *reinterpret_cast<uint4*>(&sm.q[row][ch * 8]) = qv;
            *reinterpret_cast<uint4*>(&sm.k[row][ch * 8]) = kv;
        }
        __syncthreads();
        for (int ks = 0; ks < dw; ks += 16) {
            uint32_t a[4];
            a[0] = *reinterpret_cast<const uint32_t*>(&sm.q[wr * 16 + g][ks + 2 * t]);
            a[1] = *reinterpret_cast<const uint32_t*>(&sm.q[wr * 16 + g + 8][ks + 2 * t]);
            a[2] = *reinterpret_cast<const uint32_t*>(&sm.q[wr * 16 + g][ks + 2 * t + 8]);
            a[3] = *reinterpret_cast<const uint32_t*>(&sm.q[wr * 16 + g + 8][ks + 2 * t + 8]);
#pragma unroll
            for (int nb = 0; nb < 4; ++nb) {
                const int n = wc * 32 + nb * 8 + g;
                const uint32_t b0 = *reinterpret_cast<const uint32_t*>(&sm.k[n][ks + 2 * t]);
                const uint32_t b1 = *reinterpret_cast<const uint32_t*>(&sm.k[n][ks + 2 * t + 8]);
                float c[4] = {v[nb * 4], v[nb * 4 + 1], v[nb * 4 + 2], v[nb * 4 + 3]};
                Mma<T>::run(c, a, b0, b1);
                v[nb * 4] = c[0];
                v[nb * 4 + 1] = c[1];
                v[nb * 4 + 2] = c[2];
                v[nb * 4 + 3] = c[3];
            }
        }
        __syncthreads();
    }
}

template <typename T, bool MMA>
struct LogitsTile {
    using Smem = TileSmem;
    __device__ static void run(const T* q, int nrows, const T* k, int nkeys, int d, Smem& sm, float (&v)[16]) {
        logits_tile_fp32(q, nrows, k, nkeys, d, sm, v);
    }
};

template <typename T>
struct LogitsTile<T, true> {
    using Smem = MmaTileSmem;
    __device__ static void run(const T* q, int nrows, const T* k, int nkeys, int d, Smem& sm, float (&v)[16]) {
        logits_tile_mma(q, nrows, k, nkeys, d, sm, v);
    }
};

// Row max / sum of exp of the causal softmax of the last n_last queries of every query head, over one
// split of kStatsSplit keys: partial (max, sum) pairs in stats_part [B, Hq, n_last, n_split].
// grid (row_tiles * n_split, Hq, B), 256 threads.
template <typename T, bool MMA>
__global__ void __launch_bounds__(256, 2) route_vslash_stats_kernel(RouteArgs a) {
    using Tile = LogitsTile<T, MMA>;
    constexpr int kSlots = MMA ? 2 : 4;
    __shared__ typename Tile::Smem sm;
    __shared__ float merge_ml[2][kTile][2];
    const int row_tiles = (a.n_last + kTile - 1) / kTile;
    const int rt = blockIdx.x % row_tiles, split = blockIdx.x / row_tiles;
    const int h = blockIdx.y, b = blockIdx.z, j0 = rt * kTile;
    const int kv = h / a.kv_ratio;
    const int rows = min(kTile, a.n_last - j0);
    const T* q = static_cast<const T*>(a.q) + (((long long)b * a.hq + h) * a.lq + (a.lq - a.n_last + j0)) * a.d;
    const T* kbase = static_cast<const T*>(a.k) + (((long long)b * a.hkv + kv) * a.lk) * a.d;
    const long long pos0 = (long long)a.lk - a.n_last + j0;  // key position of row j0
    const long long pos_max = pos0 + rows - 1;
    const long long k_begin = (long long)split * kStatsSplit;
    const long long k_end = min(min(k_begin + kStatsSplit, (long long)a.lk), pos_max + 1);
    float m[kSlots], l[kSlots];
#pragma unroll
    for (int r = 0; r < kSlots; ++r) { m[r] = -INFINITY; l[r] = 0.f; }
    float v[16];
    for (long long k0 = k_begin; k0 < k_end; k0 += kTile) {
        const int nkeys = (int)min((long long)kTile, k_end - k0);
        Tile::run(q, rows, kbase + k0 * a.d, nkeys, a.d, sm, v);
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const int jr = tile_row<MMA>(i);
            const long long key = k0 + tile_col<MMA>(i);
            const bool ok = jr < rows && key < k_end && key <= pos0 + jr;
            v[i] = ok ? v[i] / a.root : -INFINITY;
        }
#pragma unroll
        for (int sl = 0; sl < kSlots; ++sl) {
            float tm = -INFINITY;
#pragma unroll
            for (int i = 0; i < 16; ++i)
                if (tile_slot<MMA>(i) == sl) tm = fmaxf(tm, v[i]);
            if (tm == -INFINITY) continue;
            const float mn = fmaxf(m[sl], tm);
            float sum = l[sl] * expf(m[sl] - mn);
#pragma unroll
            for (int i = 0; i < 16; ++i)
                if (tile_slot<MMA>(i) == sl && v[i] != -INFINITY) sum += expf(v[i] - mn);
            l[sl] = sum;
            m[sl] = mn;
        }
    }
    // merge the threads of a row: 16 lanes (CUDA cores); 4 lanes, then the 2 warps (tensor cores)
#pragma unroll
    for (int sl = 0; sl < kSlots; ++sl) warp_merge_max_sum<MMA ? 2 : 8>(m[sl], l[sl]);
    auto store = [&](int jr, float mm, float ll) {
        if (jr < rows) {
            const long long o = (((long long)b * a.hq + h) * a.n_last + j0 + jr) * a.n_split + split;
            a.stats_part[2 * o] = mm;
            a.stats_part[2 * o + 1] = ll;
        }
    };
    if (!MMA) {
        if ((threadIdx.x & 15) == 0)
#pragma unroll
            for (int sl = 0; sl < kSlots; ++sl) store(tile_row<MMA>(sl * 4), m[sl], l[sl]);
        return;
    }
    const int wc = (threadIdx.x >> 5) & 1;
    if ((threadIdx.x & 3) == 0)
#pragma unroll
        for (int sl = 0; sl < kSlots; ++sl) {
            merge_ml[wc][tile_row<MMA>(sl * 2)][0] = m[sl];
            merge_ml[wc][tile_row<MMA>(sl * 2)][1] = l[sl];
        }
    __syncthreads();
    if (threadIdx.x < kTile) {
        const int jr = threadIdx.x;
        float mm = merge_ml[0][jr][0], ll = merge_ml[0][jr][1];
        merge_max_sum(mm, ll, merge_ml[1][jr][0], merge_ml[1][jr][1]);
        store(jr, mm, ll);
    }
}

// Merge the key splits' (max, sum) pairs of every row in split order -> row_m, row_l.
__global__ void route_vslash_stats_merge_kernel(RouteArgs a) {
    const long long row = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= (long long)a.batch * a.hq * a.n_last) return;
    float m = -INFINITY, l = 0.f;
    for (int s = 0; s < a.n_split; ++s) {
        merge_max_sum(m, l, a.stats_part[2 * (row * a.n_split + s)], a.stats_part[2 * (row * a.n_split + s) + 1]);
    }
    a.row_m[row] = m;
    a.row_l[row] = l;
}

// Vertical sums per key and slash sums per offset (window of n_last + 63 offsets per key tile) of
// the group-mean probabilities. grid (n_kt, Hr, B), 256 threads, dynamic smem: window floats.
template <typename T, bool MMA>
__global__ void __launch_bounds__(256, 2) route_vslash_lines_kernel(RouteArgs a) {
    using Tile = LogitsTile<T, MMA>;
    __shared__ typename Tile::Smem sm;
    __shared__ float ptile[kTile][kTile + 1];
    extern __shared__ float window[];  // n_last + 63
    const int tile = blockIdx.x, r = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x;
    const long long k0 = (long long)tile * kTile;
    const int nkeys = (int)min((long long)kTile, a.lk - k0);
    const int wlen = a.n_last + kTile - 1;
    const int kv = (r * a.head_group) / a.kv_ratio;
    for (int w = tid; w < wlen; w += blockDim.x) window[w] = 0.f;
    float vsum = 0.f;
    const T* kbase = static_cast<const T*>(a.k) + (((long long)b * a.hkv + kv) * a.lk + k0) * a.d;
    __syncthreads();
    float v[16], p[16];
    for (int j0 = 0; j0 < a.n_last; j0 += kTile) {
        const long long pos0 = (long long)a.lk - a.n_last + j0;
        const int rows = min(kTile, a.n_last - j0);
        if (k0 > pos0 + rows - 1) continue;  // the whole tile is in these queries' future (uniform)
#pragma unroll
        for (int i = 0; i < 16; ++i) p[i] = 0.f;
        for (int j = 0; j < a.head_group; ++j) {
            const int h = r * a.head_group + j;
            const T* q = static_cast<const T*>(a.q) + (((long long)b * a.hq + h) * a.lq + (a.lq - a.n_last + j0)) * a.d;
            Tile::run(q, rows, kbase, nkeys, a.d, sm, v);
#pragma unroll
            for (int i = 0; i < 16; ++i) {
                const int jr = tile_row<MMA>(i);
                const long long key = k0 + tile_col<MMA>(i);
                if (jr < rows && key < a.lk && key <= pos0 + jr) {
                    const long long o = ((long long)b * a.hq + h) * a.n_last + j0 + jr;
                    p[i] += expf(v[i] / a.root - a.row_m[o]) / a.row_l[o];
                }
            }
        }
#pragma unroll
        for (int i = 0; i < 16; ++i)
            ptile[tile_row<MMA>(i)][tile_col<MMA>(i)] = a.head_group > 1 ? p[i] / (float)a.head_group : p[i];
        __syncthreads();
        if (tid < kTile)
            for (int jr = 0; jr < kTile; ++jr) vsum += ptile[jr][tid];
        if (tid < 2 * kTile - 1 && j0 + tid < wlen) {  // later diagonals only hold rows >= n_last
            // local diagonal u = jr - kk + 63: offset (pos0 + jr) - (k0 + kk), window index j0 + u
            float s = 0.f;
            for (int jr = 0; jr < kTile; ++jr) {
                const int kk = jr + kTile - 1 - tid;
                if (kk >= 0 && kk < kTile) s += ptile[jr][kk];
            }
            window[j0 + tid] += s;
        }
        __syncthreads();
    }
    const long long line = ((long long)b * a.hr + r);
    if (tid < nkeys) a.vertical[line * a.line_len + k0 + tid] = vsum;
    float* part = a.slash_part + (line * a.n_kt + tile) * (long long)wlen;
    for (int w = tid; w < wlen; w += blockDim.x) part[w] = window[w];
}

// slash[o] = sum over key tiles (ascending) of their window entries for offset o.
__global__ void route_vslash_slash_reduce_kernel(RouteArgs a) {
    const long long o = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int r = blockIdx.y, b = blockIdx.z;
    if (o >= a.lk) return;
    const long long line = ((long long)b * a.hr + r);
    const int wlen = a.n_last + kTile - 1;
    // tile t covers offsets [base_t, base_t + wlen), base_t = Lk - n_last - 64 t - 63
    const long long lo_num = (long long)a.lk - a.n_last - (kTile - 1) - o;  // 64 t >= lo_num
    long long t_lo = lo_num <= 0 ? 0 : (lo_num + kTile - 1) / kTile;
    long long t_hi = ((long long)a.lk - 1 - o) / kTile;  // base_t <= o  <=>  64 t >= ..., t <= ...
    if (t_hi > a.n_kt - 1) t_hi = a.n_kt - 1;
    float s = 0.f;
    for (long long t = t_lo; t <= t_hi; ++t) {
        const long long base = (long long)a.lk - a.n_last - kTile * t - (kTile - 1);
        const long long w = o - base;
        if (w >= 0 && w < wlen) s += a.slash_part[(line * a.n_kt + t) * wlen + w];
    }
    a.slash[line * a.line_len + o] = s;
}

// ------------------------------------------------------------------------------ blockwise lines
// Block-level softmax over the causal chunks of every row (row max / sum kept for route_select);
// vertical partial sums per chunk and slash partial sums per block diagonal over kBlockwiseRows rows.
// grid (row_tiles, Hr, B), 256 threads, dynamic smem 3 x nC floats.
__global__ void route_blockwise_lines_kernel(RouteArgs a) {
    extern __shared__ float smem[];
    __shared__ float qs[kMaxHeadDim];
    const int tile = blockIdx.x, r = blockIdx.y, b = blockIdx.z;
    const int nc = a.nc, tid = threadIdx.x, warp = tid >> 5, nwarps = blockDim.x >> 5;
    float* srow = smem;
    float* vpart = smem + nc;
    float* spart = smem + 2 * nc;
    const Geo g = make_geo(a, b);
    const int kv = (r * a.head_group) / a.kv_ratio;
    const float* km = a.km + (((long long)b * a.hkv + kv) * nc) * a.d;
    const long long line = (long long)b * a.hr + r;
    for (int c = tid; c < nc; c += blockDim.x) vpart[c] = spart[c] = 0.f;
    const int i_end = min(a.nq, (tile + 1) * kBlockwiseRows);
    for (int i = tile * kBlockwiseRows; i < i_end; ++i) {
        __syncthreads();
        for (int e = tid; e < a.d; e += blockDim.x) qs[e] = a.qm[(line * a.nq + i) * a.d + e];
        __syncthreads();
        const long long last = g.last(i);
        const int vis = count_starts_le(g, nc, last);
        for (int c = warp; c < vis; c += nwarps) {
            const float s = warp_dot(qs, km + (long long)c * a.d, a.d) / a.root;
            if ((tid & 31) == 0) srow[c] = s;
        }
        __syncthreads();
        float mx = -INFINITY;
        for (int c = tid; c < vis; c += blockDim.x) mx = fmaxf(mx, srow[c]);
        mx = block_reduce<true>(mx);
        float sum = 0.f;
        for (int c = tid; c < vis; c += blockDim.x) sum += expf(srow[c] - mx);
        sum = block_reduce<false>(sum);
        if (tid == 0) {
            a.row_m[line * a.nq + i] = mx;
            a.row_l[line * a.nq + i] = sum;
        }
        for (int c = tid; c < vis; c += blockDim.x) {
            const float p = expf(srow[c] - mx) / sum;
            srow[c] = p;
            vpart[c] += p;
        }
        __syncthreads();
        const int diag = count_ends_le(g, nc, last);
        for (int dd = tid; dd < nc; dd += blockDim.x) {
            float add = 0.f;
            const long long c = (long long)diag - dd;
            if (c >= 0 && c < vis) add = srow[c];
            if (dd == 0)  // causal chunks past the diagonal count on offset 0 (max(0, diag - c))
                for (int c2 = diag + 1; c2 < vis; ++c2) add += srow[c2];
            spart[dd] += add;
        }
    }
    __syncthreads();
    const long long base = (line * a.row_tiles + tile) * nc;
    for (int c = tid; c < nc; c += blockDim.x) {
        a.vert_part[base + c] = vpart[c];
        a.slash_part[base + c] = spart[c];
    }
}

__global__ void route_blockwise_reduce_kernel(RouteArgs a) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x, r = blockIdx.y, b = blockIdx.z;
    if (c >= a.nc) return;
    const long long line = (long long)b * a.hr + r;
    float v = 0.f, s = 0.f;
    for (int t = 0; t < a.row_tiles; ++t) {
        v += a.vert_part[(line * a.row_tiles + t) * a.nc + c];
        s += a.slash_part[(line * a.row_tiles + t) * a.nc + c];
    }
    a.vertical[line * a.line_len + c] = v;
    a.slash[line * a.line_len + c] = s;
}

// ------------------------------------------------------------------------------ top lines
// keep_top_lines in place: the `count` largest positive entries stay (ties to the lower index), the
// others become 0; with `prefix`, also prefix sums accumulated in double: prefix[0] = 0,
// prefix[t] = x[0] + ... + x[t-1]. grid (2 = vertical | slash, Hr, B), 1024 threads.
__global__ void route_top_lines_kernel(RouteArgs a) {
    const int which = blockIdx.x, r = blockIdx.y, b = blockIdx.z;
    const long long line = (long long)b * a.hr + r;
    const int n = a.line_len;
    float* x = (which == 0 ? a.vertical : a.slash) + line * n;
    const long long count = which == 0 ? a.n_vertical : a.n_slash;
    auto item = [&](int c, uint32_t* key, long long* wgt) {
        const float v = x[c];
        *key = order_key(v);
        *wgt = 1;
        return v > 0.f;
    };
    const Cut cut = radix_cut(item, n, count);
    // tie prefix in index order, then zero the unselected entries
    long long carry = 0;
    for (int base = 0; base < n; base += blockDim.x) {
        const int c = base + threadIdx.x;
        float v = 0.f;
        uint32_t key = 0;
        bool cand = false;
        if (c < n) {
            v = x[c];
            key = order_key(v);
            cand = v > 0.f;
        }
        const bool tie = cand && !cut.all && !cut.none && key == cut.thr;
        int total;
        const int incl = block_scan_incl(tie ? 1 : 0, &total);
        const bool keep = cand && !cut.none && (cut.all || key > cut.thr || (tie && carry + incl <= cut.rem));
        if (c < n && !keep) x[c] = 0.f;
        carry += total;
    }
    __syncthreads();
    float* prefix = a.v_prefix ? (which == 0 ? a.v_prefix : a.s_prefix) + line * (long long)(n + 1) : nullptr;
    if (prefix == nullptr) return;
    __shared__ double part[1024];
    const int per = (n + blockDim.x - 1) / blockDim.x;
    const int t0 = threadIdx.x * per, t1 = min(n, t0 + per);
    double s = 0.0;
    for (int t = t0; t < t1; ++t) s += (double)x[t];
    part[threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.x == 0) {  // exclusive scan of the thread sums (1024 adds)
        double run = 0.0;
        for (int t = 0; t < (int)blockDim.x; ++t) {
            const double v = part[t];
            part[t] = run;
            run += v;
        }
    }
    __syncthreads();
    double acc = part[threadIdx.x];
    if (threadIdx.x == 0) prefix[0] = 0.f;
    for (int t = t0; t < t1; ++t) {
        acc += (double)x[t];
        prefix[t + 1] = (float)acc;
    }
}

// ------------------------------------------------------------------------------ selection
__device__ __forceinline__ float line_rank(float lines, float fallback) {
    return lines > 0.f ? 1.0f + lines : fminf(fmaxf(fallback, 0.f), 0.999f);
}

// dynamic / mass: rank[rr][c] = log mean_{j in c} exp(qm_rr . k_j / sqrt(D)) for the CTA's rows
// (qs [kMaxSelectRows][kMaxHeadDim], unused rows zero) and the chunks c < vis: a warp per chunk,
// lanes over the chunk's tokens, every key row loaded once for all the rows.
template <typename T>
__device__ void mass_rank_rows(const RouteArgs& a, const Geo& g, const T* kb,
                               const float (*qs)[kMaxHeadDim], int nrows, int vis, float* rank) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const int d4 = a.d & ~3;
    for (int c = warp; c < vis; c += nwarps) {
        const long long s0 = g.start(c), s1 = g.end(c);
        float m[kMaxSelectRows], l[kMaxSelectRows];
#pragma unroll
        for (int r = 0; r < kMaxSelectRows; ++r) { m[r] = -INFINITY; l[r] = 0.f; }
        for (long long t = s0 + lane; t < s1; t += 32) {
            const T* row = kb + t * a.d;
            float acc[kMaxSelectRows];
#pragma unroll
            for (int r = 0; r < kMaxSelectRows; ++r) acc[r] = 0.f;
            for (int e = 0; e < d4; e += 4) {
                const float k0 = to_f(row[e]), k1 = to_f(row[e + 1]), k2 = to_f(row[e + 2]), k3 = to_f(row[e + 3]);
#pragma unroll
                for (int r = 0; r < kMaxSelectRows; ++r) {
                    const float4 qv = *reinterpret_cast<const float4*>(&qs[r][e]);
                    acc[r] = fmaf(qv.x, k0, acc[r]);
                    acc[r] = fmaf(qv.y, k1, acc[r]);
                    acc[r] = fmaf(qv.z, k2, acc[r]);
                    acc[r] = fmaf(qv.w, k3, acc[r]);
                }
            }
            for (int e = d4; e < a.d; ++e) {
                const float kx = to_f(row[e]);
#pragma unroll
                for (int r = 0; r < kMaxSelectRows; ++r) acc[r] = fmaf(qs[r][e], kx, acc[r]);
            }
#pragma unroll
            for (int r = 0; r < kMaxSelectRows; ++r) {
                const float x = acc[r] / a.root;
                const float mn = fmaxf(m[r], x);
                l[r] = (m[r] == -INFINITY ? 0.f : l[r] * expf(m[r] - mn)) + expf(x - mn);
                m[r] = mn;
            }
        }
#pragma unroll
        for (int r = 0; r < kMaxSelectRows; ++r) warp_merge_max_sum<16>(m[r], l[r]);
        if (lane == 0) {
            const long long len = s1 - s0;
#pragma unroll
            for (int r = 0; r < kMaxSelectRows; ++r)
                if (r < nrows)
                    rank[(long long)r * a.nc + c] = len <= 0 ? -INFINITY : (logf(l[r]) + m[r]) - logf((float)len);
        }
    }
}

// One CTA per (select_rows query blocks from i0, routing head r, batch b); dynamic smem:
// select_rows x nC floats (the rank rows). Ranks of all the rows first, then row by row: forced
// chunks, the budget by radix select, ascending indices.
template <typename T>
__global__ void route_select_kernel(RouteArgs a) {
    extern __shared__ float rank_rows[];
    __shared__ __align__(16) float qs[kMaxSelectRows][kMaxHeadDim];
    const int r = blockIdx.y, b = blockIdx.z;
    const int i0 = blockIdx.x * a.select_rows, nrows = min(a.select_rows, a.nq - i0);
    const int nc = a.nc, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
    const long long line = (long long)b * a.hr + r;
    if (a.bad_batch[b]) {
        for (int rr = 0; rr < nrows; ++rr) {
            int32_t* out = a.block_index + (line * a.nq + i0 + rr) * (long long)nc;
            for (int c = tid; c < nc; c += blockDim.x) out[c] = -1;
            if (tid == 0) a.block_count[line * a.nq + i0 + rr] = 0;
        }
        return;
    }
    const Geo g = make_geo(a, b);
    const int kv = (r * a.head_group) / a.kv_ratio;
    const int pattern = a.pattern;
    for (int e = tid; e < kMaxSelectRows * kMaxHeadDim; e += blockDim.x) {
        const int rr = e / kMaxHeadDim, dd = e % kMaxHeadDim;
        qs[rr][dd] = (rr < nrows && dd < a.d) ? a.qm[(line * a.nq + i0 + rr) * a.d + dd] : 0.f;
    }
    __syncthreads();

    // ---- raw scores of the causal chunks of every row
    if (pattern == kPatternDynamic && a.chunk_score == kScoreMass) {
        const T* kb = static_cast<const T*>(a.k) + (((long long)b * a.hkv + kv) * a.lk) * a.d;
        const int vis_max = count_starts_le(g, nc, g.last(i0 + nrows - 1));
        mass_rank_rows<T>(a, g, kb, qs, nrows, vis_max, rank_rows);
    } else {
        const float* km = a.km + (((long long)b * a.hkv + kv) * nc) * a.d;
        for (int rr = 0; rr < nrows; ++rr) {
            const int vis = count_starts_le(g, nc, g.last(i0 + rr));
            for (int c = warp; c < vis; c += nwarps) {
                const float s = warp_dot(qs[rr], km + (long long)c * a.d, a.d) / a.root;
                if (lane == 0) rank_rows[(long long)rr * nc + c] = s;
            }
        }
    }
    __syncthreads();

    for (int rr = 0; rr < nrows; ++rr) {
        const int i = i0 + rr;
        float* rank = rank_rows + (long long)rr * nc;
        int32_t* out = a.block_index + (line * a.nq + i) * (long long)nc;
        int32_t* out_count = a.block_count + line * a.nq + i;
        const long long last = g.last(i);
        const int vis = count_starts_le(g, nc, last);  // causal chunks: [0, vis)

        // ---- rank of the line patterns from the raw scores
        if (pattern == kPatternVslash) {
            const float* vp = a.v_prefix + line * (long long)(a.lk + 1);
            const float* sp = a.s_prefix + line * (long long)(a.lk + 1);
            const long long max_offset = (long long)a.lk - 1;
            const long long first = g.first(i);
            for (int c = tid; c < vis; c += blockDim.x) {
                const long long s = g.start(c), e = g.end(c);
                const float v_block = vp[e] - vp[s];
                const long long o_min = min(max(first - (e - 1), 0ll), max_offset + 1);
                const long long o_max = min(max(last - s, -1ll), max_offset);
                float s_block = 0.f;
                if (o_max >= o_min) s_block = sp[max(o_max + 1, 0ll)] - sp[min(o_min, max_offset + 1)];
                const float sig = 1.f / (1.f + expf(-rank[c]));
                rank[c] = line_rank(v_block + s_block, sig);
            }
        } else if (pattern == kPatternBlockwise) {
            const float mx = a.row_m[line * a.nq + i], sum = a.row_l[line * a.nq + i];
            const int diag = count_ends_le(g, nc, last);
            const float* vert = a.vertical + line * a.line_len;
            const float* sl = a.slash + line * a.line_len;
            for (int c = tid; c < vis; c += blockDim.x) {
                const float p = expf(rank[c] - mx) / sum;
                rank[c] = line_rank(vert[c] + sl[max(0, diag - c)], p);
            }
        }
        __syncthreads();

        // ---- forced chunks, dense rows, budget
        const bool sink_local = pattern == kPatternAshape || pattern == kPatternDynamic;
        const bool weighted = pattern == kPatternDynamic;
        bool dense = false;
        if (pattern == kPatternVslash || pattern == kPatternBlockwise)
            dense = (long long)i < a.dense_first || i == a.nq - 1;
        else if (pattern == kPatternDynamic)
            dense = min((long long)(i + 1) * a.q_block, (long long)a.lq) > (long long)a.lq - a.instruction_tokens;
        auto forced = [&](int c) {
            return sink_local ? (g.sink(i, c, a.sink_tokens) || g.local(i, c, a.local_tokens))
                              : (g.sink(i, c, a.k_block) || g.diagonal(i, c));
        };
        auto weight = [&](int c) -> long long { return weighted ? g.end(c) - g.start(c) : 1; };
        Cut cut{true, false, 0u, 0};
        if (!dense) {
            long long spent = 0;
            for (int c = tid; c < vis; c += blockDim.x)
                if (forced(c)) spent += weight(c);
            __shared__ unsigned long long s_spent;
            if (tid == 0) s_spent = 0;
            __syncthreads();
            atomicAdd(&s_spent, (unsigned long long)spent);
            __syncthreads();
            const long long room = a.budget - (long long)s_spent;
            auto item = [&](int c, uint32_t* key, long long* wgt) {
                if (forced(c)) return false;
                *key = order_key(rank[c]);
                *wgt = weight(c);
                return true;
            };
            cut = radix_cut(item, vis, room);
        }

        // ---- compaction: ascending chunk ids, -1 padding
        long long tie_carry = 0;
        int out_carry = 0;
        for (int base = 0; base < nc; base += blockDim.x) {
            const int c = base + tid;
            bool chosen = false, tie = false;
            long long w = 0;
            uint32_t key = 0;
            if (c < vis) {
                if (dense) {
                    chosen = true;
                } else if (forced(c)) {
                    chosen = true;
                } else if (!cut.none) {
                    key = order_key(rank[c]);
                    w = weight(c);
                    if (cut.all || key > cut.thr) chosen = true;
                    else if (key == cut.thr) tie = true;
                }
            }
            // tie weights in index order (int64 carried across tiles; a tile's sum fits an int)
            int tie_total;
            const int tie_incl = block_scan_incl(tie ? (int)w : 0, &tie_total);
            if (tie && tie_carry + tie_incl <= cut.rem) chosen = true;
            tie_carry += tie_total;
            int total;
            const int pos = block_scan_incl(chosen ? 1 : 0, &total) - 1 + out_carry;
            if (chosen) out[pos] = c;
            out_carry += total;
        }
        for (int c = out_carry + tid; c < nc; c += blockDim.x) out[c] = -1;
        if (tid == 0) *out_count = out_carry;
        __syncthreads();
    }
}

}  // namespace route
}  // namespace dhsa
