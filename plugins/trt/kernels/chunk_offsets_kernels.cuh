// dhsa::ChunkOffsets on the GPU: the dynamic pattern's variable key chunks, a CUDA transcription of
// plugins/ort_cpu/src/chunks.cpp (itself dhsa_export.algo.boundaries: similarity_proposals, the
// predictor's thresholding, enforce_chunk_limits).
//
// Kernels, in launch order (dhsa_kernels.cu launches them):
//   co_similarity   (similarity rule only) d[b, c] = 1 - cos(left window sum, right window sum) over
//                   the KV heads' concatenated features, one warp per candidate c of the valid range
//                   [window - 1, L - window - 1]; window sums added token by token in float as the
//                   reference does, the dot / squared norms accumulated in double (the CPU kernel's
//                   types; only the order of those double sums differs).
//   co_threshold    (similarity rule only) per sequence: mean + unbiased std of the valid d, double
//                   block reductions in a fixed order.
//   co_limits       per sequence: one thread walks the chunks (proposals tested on the fly: the local
//                   maxima of d above the threshold, or probs >= threshold) exactly as
//                   enforce_chunk_limits does, then the block pads the row with L.
// Every index is bounded by L; the walk advances at least one token per chunk, so a row never holds
// more than L + 1 offsets.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>
#include <stdint.h>

namespace dhsa {
namespace chunks {

constexpr int kWarpsPerBlock = 4;
constexpr int kBlockThreads = 256;

struct ChunkArgs {
    const void* key;        // [B, H, L, D]
    const float* probs;     // [B, L] or null (similarity rule)
    int32_t* offsets;       // [B, L + 1]
    int32_t* counts;        // [B]
    float* d;               // workspace [B, L] (similarity rule; zeros outside the valid range)
    float* threshold;       // workspace [B] (similarity rule)
    int batch, heads, length, head_dim;
    int min_chunk, max_chunk, window;
    float prob_threshold;   // the attribute `threshold`, as float (the reference compares in float)
};

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// One warp per candidate c in [window - 1, L - window - 1] of sequence blockIdx.y.
template <typename T>
__global__ void co_similarity(ChunkArgs a) {
    const int lane = threadIdx.x & 31;
    const int first = a.window - 1, end = a.length - a.window;  // candidates [first, end)
    const long long c = first + (long long)blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);
    if (c >= end) return;
    const int b = blockIdx.y;
    const long long L = a.length, D = a.head_dim;
    const T* key = reinterpret_cast<const T*>(a.key) + (long long)b * a.heads * L * D;
    double dot = 0.0, left_sq = 0.0, right_sq = 0.0;
    for (long long e = lane; e < (long long)a.heads * D; e += 32) {
        const long long h = e / D, dd = e - h * D;
        const T* col = key + h * L * D + dd;
        float left = to_float(col[(c - a.window + 1) * D]);
        float right = to_float(col[(c + 1) * D]);
        for (int s = 1; s < a.window; ++s) {
            left += to_float(col[(c - a.window + 1 + s) * D]);
            right += to_float(col[(c + 1 + s) * D]);
        }
        dot += (double)(left * right);
        left_sq += (double)(left * left);
        right_sq += (double)(right * right);
    }
    dot = warp_sum(dot);
    left_sq = warp_sum(left_sq);
    right_sq = warp_sum(right_sq);
    if (lane == 0) {
        const float norms = sqrtf((float)left_sq) * sqrtf((float)right_sq);
        a.d[(long long)b * L + c] = 1.0f - (float)dot / fmaxf(norms, 1e-12f);
    }
}

// Sum over the block (kBlockThreads threads) in a fixed order; every thread gets the total.
__device__ __forceinline__ double block_sum(double v, double* shared) {
    v = warp_sum(v);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();  // `shared` may still be read from a previous call
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    double total = 0.0;
    for (int w = 0; w < kBlockThreads / 32; ++w) total += shared[w];
    return total;
}

// threshold[b] = mean + std (unbiased) of d over the valid candidates; +inf when fewer than two.
__global__ void co_threshold(ChunkArgs a) {
    __shared__ double shared[kBlockThreads / 32];
    const int b = blockIdx.x;
    const long long first = a.window - 1, last = (long long)a.length - a.window - 1;
    const long long n = last - first + 1;
    if (n < 2) {
        if (threadIdx.x == 0) a.threshold[b] = CUDART_INF_F;
        return;
    }
    const float* d = a.d + (long long)b * a.length;
    double sum = 0.0;
    for (long long c = first + threadIdx.x; c <= last; c += kBlockThreads) sum += d[c];
    const float mean = (float)(block_sum(sum, shared) / (double)n);
    double squares = 0.0;
    for (long long c = first + threadIdx.x; c <= last; c += kBlockThreads) {
        const double dev = (double)d[c] - (double)mean;
        squares += dev * dev;
    }
    const double total = block_sum(squares, shared);
    if (threadIdx.x == 0) a.threshold[b] = mean + (float)sqrt(total / (double)(n - 1));
}

// Whether a chunk may start at s (candidate c = s - 1 was proposed).
__device__ __forceinline__ bool co_proposed(const ChunkArgs& a, const float* d, const float* probs,
                                            float threshold, int s) {
    const int c = s - 1;
    if (c < 0 || c + 1 >= a.length) return false;
    if (probs != nullptr) return probs[c] >= a.prob_threshold;
    if (c < a.window - 1 || c > a.length - a.window - 1) return false;
    const float prev = c > 0 ? d[c - 1] : -CUDART_INF_F;
    const float next = c + 1 < a.length ? d[c + 1] : -CUDART_INF_F;
    return d[c] >= prev && d[c] > next && d[c] > threshold;
}

// Score of a forced cut at start s (the candidate's probability or d; -inf when not finite or past
// the last candidate).
__device__ __forceinline__ double co_score(const ChunkArgs& a, const float* d, const float* probs, int s) {
    const int c = s - 1;
    if (c < 0 || c >= a.length - 1) return -CUDART_INF;
    const double v = (double)(probs != nullptr ? probs[c] : d[c]);
    return isfinite(v) ? v : -CUDART_INF;
}

// enforce_chunk_limits for sequence blockIdx.x, then the row padded with L.
__global__ void co_limits(ChunkArgs a) {
    __shared__ int count;
    const int b = blockIdx.x;
    const int L = a.length;
    int32_t* out = a.offsets + (long long)b * (L + 1);
    if (threadIdx.x == 0) {
        const float* d = a.probs != nullptr ? nullptr : a.d + (long long)b * L;
        const float* probs = a.probs != nullptr ? a.probs + (long long)b * L : nullptr;
        const float threshold = a.probs != nullptr ? 0.f : a.threshold[b];
        int n = 0;
        out[n++] = 0;
        int start = 0;
        while (true) {
            const int lo = start + a.min_chunk, hi = start + a.max_chunk;
            const int upper = min(hi, L - a.min_chunk);
            int chosen = -1;
            for (int s = lo; s <= upper; ++s)  // the first proposal in [lo, upper]
                if (co_proposed(a, d, probs, threshold, s)) {
                    chosen = s;
                    break;
                }
            if (chosen < 0) {
                if (L - start <= a.max_chunk) break;
                const int cut_hi = upper >= lo ? upper : min(hi, L - 1);
                chosen = cut_hi;
                if (cut_hi >= lo) {
                    double best = -CUDART_INF;
                    for (int s = cut_hi; s >= lo; --s) {  // from the latest: the first maximum wins
                        const double v = co_score(a, d, probs, s);
                        if (v > best) {
                            best = v;
                            chosen = s;
                        }
                    }
                }
            }
            out[n++] = chosen;
            start = chosen;
        }
        out[n++] = L;
        a.counts[b] = n;
        count = n;
    }
    __syncthreads();
    for (int i = count + threadIdx.x; i <= L; i += blockDim.x) out[i] = L;
}

// Pack padded rows [B, L + 1] into [B, S], S = max(counts) (the registry's output width), and store
// S as the int64 size of that width. One block per row; every block reads all B counts (B is the
// batch: small), so nothing waits on another block and nothing goes back to the host.
__global__ void co_pack(const int32_t* __restrict__ offsets, const int32_t* __restrict__ counts, int batch,
                        int length, int32_t* __restrict__ packed, int64_t* __restrict__ width) {
    __shared__ int s_width;
    if (threadIdx.x == 0) {
        int w = 1;
        for (int b = 0; b < batch; ++b) w = max(w, min(counts[b], length + 1));
        s_width = w;
        if (blockIdx.x == 0) *width = w;
    }
    __syncthreads();
    const int w = s_width;
    const long long row = blockIdx.x;
    for (int j = threadIdx.x; j < w; j += blockDim.x) packed[row * w + j] = offsets[row * (length + 1ll) + j];
}

}  // namespace chunks
}  // namespace dhsa
