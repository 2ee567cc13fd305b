// C ABI of the DHSA CUDA kernels: host-side validation, workspace layout, launches.
// No exception leaves this file; every entry point returns a DHSA_STATUS_* code.

#include "dhsa_kernels.h"

#include <cuda_runtime.h>

#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "block_sparse_attention.cuh"
#include "block_sparse_attention_sm90.cuh"
#include "route_kernels.cuh"
#include "chunk_offsets_kernels.cuh"

namespace {

thread_local char g_last_error[512] = "";

int fail(int status, const char* fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(g_last_error, sizeof(g_last_error), fmt, args);
    va_end(args);
    return status;
}

int ok() {
    g_last_error[0] = '\0';
    return DHSA_STATUS_OK;
}

constexpr size_t kAlign = 256;

size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

struct Layout {
    size_t flag = 0, counts = 0, stream_off = 0, chunk_start = 0, total = 0;
};

Layout workspace_layout(const DhsaBsaParams& p, int nq) {
    Layout l;
    const size_t rows = (size_t)p.batch * p.num_route_heads * nq;
    l.flag = 0;
    l.counts = align_up(sizeof(int32_t));
    size_t end = l.counts + align_up(rows * sizeof(int32_t));
    if (p.key_chunk_offsets != nullptr) {
        l.stream_off = end;
        end += align_up(rows * ((size_t)p.index_width + 1) * sizeof(int32_t));
        l.chunk_start = end;
        end += align_up(rows * ((size_t)p.index_width > 0 ? p.index_width : 1) * sizeof(int32_t));
    }
    l.total = end;
    return l;
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

// The buffers dhsa_bsa_forward reads and writes (dhsa_bsa_workspace_size reads shapes only, so a
// TensorRT plugin can size its workspace at build time, before any buffer exists).
int validate_pointers(const DhsaBsaParams& p) {
    if (!p.q || !p.k || !p.v || !p.out || !p.block_index || !p.block_count)
        return fail(DHSA_STATUS_INVALID_ARGUMENT,
                    "a required pointer is NULL (q=%p k=%p v=%p out=%p block_index=%p "
                    "block_count=%p)",
                    p.q, p.k, p.v, p.out, (const void*)p.block_index, (const void*)p.block_count);
    return DHSA_STATUS_OK;
}

// Shapes and attributes; the key_chunk_offsets pointer only says whether chunks are variable.
int validate(const DhsaBsaParams* p) {
    if (p == nullptr) return fail(DHSA_STATUS_INVALID_ARGUMENT, "params is NULL");
    if (p->batch < 1 || p->num_q_heads < 1 || p->num_kv_heads < 1 || p->num_route_heads < 1 ||
        p->q_len < 1 || p->k_len < 1 || p->index_width < 0)
        return fail(DHSA_STATUS_INVALID_ARGUMENT,
                    "bad sizes: batch=%d Hq=%d Hkv=%d Hr=%d Lq=%d Lk=%d K=%d (all >= 1, K >= 0)",
                    p->batch, p->num_q_heads, p->num_kv_heads, p->num_route_heads, p->q_len,
                    p->k_len, p->index_width);
    if (p->head_dim != 64 && p->head_dim != 128)
        return fail(DHSA_STATUS_UNSUPPORTED, "head_dim %d is not supported; use 64 or 128",
                    p->head_dim);
    if (p->dtype != DHSA_DTYPE_FP16 && p->dtype != DHSA_DTYPE_BF16)
        return fail(DHSA_STATUS_UNSUPPORTED, "dtype %d is not supported; use fp16 (0) or bf16 (1)",
                    p->dtype);
    if (p->num_q_heads % p->num_kv_heads != 0)
        return fail(DHSA_STATUS_INVALID_ARGUMENT, "Hq=%d is not a multiple of Hkv=%d",
                    p->num_q_heads, p->num_kv_heads);
    if (p->num_q_heads % p->num_route_heads != 0)
        return fail(DHSA_STATUS_INVALID_ARGUMENT, "Hq=%d is not a multiple of Hr=%d",
                    p->num_q_heads, p->num_route_heads);
    const int hg = p->num_q_heads / p->num_route_heads;
    const int ratio = p->num_q_heads / p->num_kv_heads;
    if (ratio % hg != 0)
        return fail(DHSA_STATUS_INVALID_ARGUMENT,
                    "head_group %d (Hq=%d / Hr=%d) does not divide the GQA ratio %d: a routing "
                    "head must not span KV heads",
                    hg, p->num_q_heads, p->num_route_heads, ratio);
    if (hg > 64)
        return fail(DHSA_STATUS_UNSUPPORTED, "head_group %d is larger than 64", hg);
    if (p->q_block < 1)
        return fail(DHSA_STATUS_INVALID_ARGUMENT, "q_block %d must be >= 1", p->q_block);
    if (p->key_chunk_offsets == nullptr && p->k_block < 1)
        return fail(DHSA_STATUS_INVALID_ARGUMENT, "k_block %d must be >= 1", p->k_block);
    if (p->key_chunk_offsets != nullptr && p->num_chunks < 1)
        return fail(DHSA_STATUS_INVALID_ARGUMENT,
                    "num_chunks %d must be >= 1 with key_chunk_offsets", p->num_chunks);
    if (!(p->scale > 0.f) || !std::isfinite(p->scale))
        return fail(DHSA_STATUS_INVALID_ARGUMENT, "scale %g must be finite and > 0",
                    (double)p->scale);
    if (p->causal != 0 && p->causal != 1)
        return fail(DHSA_STATUS_INVALID_ARGUMENT, "causal %d must be 0 or 1", p->causal);
    if (!aligned16(p->q) || !aligned16(p->k) || !aligned16(p->v) || !aligned16(p->out))
        return fail(DHSA_STATUS_INVALID_ARGUMENT,
                    "q, k, v and out must be 16-byte aligned (q=%p k=%p v=%p out=%p)", p->q, p->k,
                    p->v, p->out);
    const long long nq = ((long long)p->q_len + p->q_block - 1) / p->q_block;
    const long long elems_q = (long long)p->batch * p->num_q_heads * p->q_len * p->head_dim;
    const long long elems_k = (long long)p->batch * p->num_kv_heads * p->k_len * p->head_dim;
    const long long rows = (long long)p->batch * p->num_route_heads * nq;
    if (elems_q >= (1ll << 40) || elems_k >= (1ll << 40) || rows * ((long long)p->index_width + 1) >=
                                                               (1ll << 31))
        return fail(DHSA_STATUS_UNSUPPORTED, "tensors too large (q %lld, k %lld elements)", elems_q,
                    elems_k);
    if (p->variant < DHSA_VARIANT_AUTO || p->variant > DHSA_VARIANT_WGMMA_CPASYNC)
        return fail(DHSA_STATUS_INVALID_ARGUMENT, "variant %d unknown", p->variant);
    return DHSA_STATUS_OK;
}

// Launch one attention kernel instance over the (query tile, routing head, batch) grid; bm = query
// rows per CTA.
// Whether every K and V row of the batch fits in the device's L2 cache (work_item's order).
bool kv_fits_in_l2(const dhsa::BsaArgs& a, int head_dim) {
    int dev = 0, l2 = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev) != cudaSuccess) {
        cudaGetLastError();
        return false;
    }
    const long long kv_bytes = 2ll * a.batch * a.hkv * a.lk * head_dim * 2;  // K + V, 2-byte types
    return kv_bytes <= (long long)l2;
}

// `extra`: kernel parameters after the BsaArgs (the wgmma producer's tensor maps).
template <typename... Extra>
int launch_grid(void (*kernel)(dhsa::BsaArgs, Extra...), int bm, int threads, int smem_bytes,
                const dhsa::BsaArgs& args, cudaStream_t stream, const Extra&... extra) {
    cudaError_t e =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (e != cudaSuccess)
        return fail(DHSA_STATUS_CUDA_ERROR, "cudaFuncSetAttribute(%d bytes of shared memory): %s",
                    smem_bytes, cudaGetErrorString(e));
    dhsa::BsaArgs a = args;
    a.pos_per_tile = bm / a.head_group;
    if (a.pos_per_tile > a.q_block) a.pos_per_tile = a.q_block;
    a.tiles_per_qblock = (a.q_block + a.pos_per_tile - 1) / a.pos_per_tile;
    const long long gx = (long long)a.nq * a.tiles_per_qblock;
    const long long items = gx * a.hr * a.batch;  // one CTA each, 1-D grid (see work_item)
    if (items > 0x7fffffffll)
        return fail(DHSA_STATUS_UNSUPPORTED,
                    "grid too large (%lld query tiles x %d routing heads x %d sequences > 2^31 - 1); "
                    "split the batch or the sequence",
                    gx, a.hr, a.batch);
    const dim3 grid((unsigned)items);
    kernel<<<grid, threads, smem_bytes, stream>>>(a, extra...);
    e = cudaGetLastError();
    if (e != cudaSuccess)
        return fail(DHSA_STATUS_CUDA_ERROR, "attention kernel launch (grid %u): %s", grid.x,
                    cudaGetErrorString(e));
    return DHSA_STATUS_OK;
}

template <typename T, int D, int WARPS, int MT>
int launch_attention(const dhsa::BsaArgs& args, cudaStream_t stream) {
    using C = dhsa::BsaConfig<D, WARPS, MT>;
    auto kernel = args.key_chunk_offsets != nullptr ? dhsa::bsa_fwd_kernel<T, D, WARPS, MT, true>
                                                    : dhsa::bsa_fwd_kernel<T, D, WARPS, MT, false>;
    return launch_grid(kernel, C::BM, C::kThreads, C::kSmemBytes, args, stream);
}

// The wgmma kernels run on compute capability 9.0 devices (H100 / H200) only.
bool wgmma_device() {
    int dev = 0, major = 0, minor = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return false;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess)
        return false;
    return major == 9 && minor == 0;
}

// An sm_90a image of `kernel` is loaded: other builds (plain sm_90, PTX compiled at load time) hold
// a stub without the kernel's static shared memory (sharedSizeBytes == 0).
template <typename Kernel>
bool wgmma_built(Kernel* kernel) {
    cudaFuncAttributes attr;
    if (cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(kernel)) != cudaSuccess) {
        cudaGetLastError();  // clear the error (no image for this device)
        return false;
    }
    return attr.sharedSizeBytes > 0;
}

int wgmma_unsupported() {
    return fail(DHSA_STATUS_UNSUPPORTED,
                "the wgmma variants need a compute capability 9.0 GPU and a library built for "
                "sm_90a (-gencode arch=compute_90a,code=sm_90a)");
}

int launch_sm90(void (*fixed)(dhsa::BsaArgs), void (*var)(dhsa::BsaArgs), int threads,
                int smem_bytes, const dhsa::BsaArgs& args, cudaStream_t stream) {
    if (!wgmma_device() || !wgmma_built(fixed)) return wgmma_unsupported();
    return launch_grid(args.key_chunk_offsets != nullptr ? var : fixed, dhsa::sm90::kBM, threads,
                       smem_bytes, args, stream);
}

// cuTensorMapEncodeTiled, looked up in the driver at run time: the library links only the CUDA
// runtime, so it loads on machines whose driver is older than the toolkit's headers.
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                   const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                   const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                   CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiledFn encode_tiled() {
    static const EncodeTiledFn fn = [] {
        void* ptr = nullptr;
        cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
        const cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000,
                                                               cudaEnableDefault, &found);
#else
        const cudaError_t e = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &ptr,
                                                      cudaEnableDefault, &found);
#endif
        if (e != cudaSuccess || found != cudaDriverEntryPointSuccess) {
            cudaGetLastError();
            ptr = nullptr;
        }
        return reinterpret_cast<EncodeTiledFn>(ptr);
    }();
    return fn;
}

// Tensor map of K or V seen as [B * Hkv, Lk, D], boxes of 64 columns x k_block rows, 128-byte
// swizzle (the shared layout of the wgmma kernels). Rows past Lk read as zeros.
template <typename T>
bool kv_tensor_map(CUtensorMap* map, const void* base, const dhsa::BsaArgs& a, int d) {
    const EncodeTiledFn encode = encode_tiled();
    if (encode == nullptr) return false;
    const cuuint64_t dims[3] = {(cuuint64_t)d, (cuuint64_t)a.lk, (cuuint64_t)a.batch * a.hkv};
    const cuuint64_t strides[2] = {(cuuint64_t)d * sizeof(T), (cuuint64_t)a.lk * d * sizeof(T)};
    const cuuint32_t box[3] = {64, (cuuint32_t)a.k_block, 1};
    const cuuint32_t unit[3] = {1, 1, 1};
    const CUtensorMapDataType type = std::is_same<T, __nv_bfloat16>::value
                                         ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                         : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
    return encode(map, type, 3, const_cast<void*>(base), dims, strides, box, unit,
                  CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                  CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The warp-specialized kernel: TMA producer for fixed chunks whose k_block (a multiple of 8)
// divides the 128-key tile, when `tma` allows it and the driver encodes the maps; else cp.async.
template <typename T, int D, bool PINGPONG>
int launch_wgmma_ws(const dhsa::BsaArgs& a, bool tma, cudaStream_t stream) {
    namespace s9 = dhsa::sm90;
    constexpr int smem = s9::WgSmem<D, s9::kWsStages>::kBytes;
    if (!wgmma_device() || !wgmma_built(s9::bsa_wgmma_ws_kernel<T, D, PINGPONG, false, false>))
        return wgmma_unsupported();
    CUtensorMap tmk, tmv;
    std::memset(&tmk, 0, sizeof(tmk));
    std::memset(&tmv, 0, sizeof(tmv));
    const bool fixed = a.key_chunk_offsets == nullptr;
    if (fixed && tma && a.k_block % 8 == 0 && s9::kBN % a.k_block == 0 &&
        kv_tensor_map<T>(&tmk, a.k, a, D) && kv_tensor_map<T>(&tmv, a.v, a, D))
        return launch_grid(s9::bsa_wgmma_ws_kernel<T, D, PINGPONG, false, true>, s9::kBM,
                           s9::kWsThreads, smem, a, stream, tmk, tmv);
    return launch_grid(fixed ? s9::bsa_wgmma_ws_kernel<T, D, PINGPONG, false, false>
                             : s9::bsa_wgmma_ws_kernel<T, D, PINGPONG, true, false>,
                       s9::kBM, s9::kWsThreads, smem, a, stream, tmk, tmv);
}

template <typename T, int D, bool OVERLAP, bool SPLIT>
int launch_wgmma(const dhsa::BsaArgs& a, cudaStream_t stream) {
    // 3 K/V stages; the ping-pong goes with the overlapped schedule
    return launch_sm90(dhsa::sm90::bsa_wgmma_kernel<T, D, 3, OVERLAP, OVERLAP, SPLIT, false>,
                       dhsa::sm90::bsa_wgmma_kernel<T, D, 3, OVERLAP, OVERLAP, SPLIT, true>, 256,
                       dhsa::sm90::WgSmem<D, 3>::kBytes, a, stream);
}

template <typename T, bool OVERLAP, bool SPLIT>
int launch_wgmma_d(const dhsa::BsaArgs& a, int head_dim, cudaStream_t stream) {
    return head_dim == 64 ? launch_wgmma<T, 64, OVERLAP, SPLIT>(a, stream)
                          : launch_wgmma<T, 128, OVERLAP, SPLIT>(a, stream);
}

template <typename T>
int dispatch(const dhsa::BsaArgs& a, int head_dim, int variant, cudaStream_t stream) {
    if (variant == DHSA_VARIANT_AUTO) {
        // Tiles of 128 rows when a query block fills them (head_group * q_block >= 128): the wgmma
        // kernel on sm_90a builds running on compute capability 9.0, else 4 warps x 32 rows (fastest
        // mma.sync variant on an H200 from 8K tokens on, docs/GPU_NOTES.md); with fewer rows per
        // query block, the 64-row tile wastes fewer rows.
        if ((long long)a.head_group * a.q_block < 128)
            variant = DHSA_VARIANT_M64;
        else if (wgmma_device() &&
                 wgmma_built(head_dim == 64 ? dhsa::sm90::bsa_wgmma_ws_kernel<T, 64, true, false, false>
                                            : dhsa::sm90::bsa_wgmma_ws_kernel<T, 128, true, false, false>))
            variant = DHSA_VARIANT_WGMMA;
        else
            variant = DHSA_VARIANT_M128_W4;
    }
    switch (variant) {
        case DHSA_VARIANT_WGMMA:
        case DHSA_VARIANT_WGMMA_CPASYNC: {
            const bool tma = variant == DHSA_VARIANT_WGMMA;
            return head_dim == 64 ? launch_wgmma_ws<T, 64, true>(a, tma, stream)
                                  : launch_wgmma_ws<T, 128, true>(a, tma, stream);
        }
        case DHSA_VARIANT_WGMMA_SERIAL:
            return launch_wgmma_d<T, false, false>(a, head_dim, stream);
        case DHSA_VARIANT_WGMMA_OVERLAP:
            return launch_wgmma_d<T, true, false>(a, head_dim, stream);
        case DHSA_VARIANT_WGMMA_SPLIT:
            return launch_wgmma_d<T, true, true>(a, head_dim, stream);
        case DHSA_VARIANT_M128:
            return head_dim == 64 ? launch_attention<T, 64, 8, 1>(a, stream)
                                  : launch_attention<T, 128, 8, 1>(a, stream);
        case DHSA_VARIANT_M256:
            return head_dim == 64 ? launch_attention<T, 64, 8, 2>(a, stream)
                                  : launch_attention<T, 128, 8, 2>(a, stream);
        case DHSA_VARIANT_M128_W4:
            return head_dim == 64 ? launch_attention<T, 64, 4, 2>(a, stream)
                                  : launch_attention<T, 128, 4, 2>(a, stream);
        default:
            return head_dim == 64 ? launch_attention<T, 64, 4, 1>(a, stream)
                                  : launch_attention<T, 128, 4, 1>(a, stream);
    }
}


// ------------------------------------------------------------------------------------------- Route

long long ceil_div_ll(long long a, long long b) { return (a + b - 1) / b; }

// Host geometry of one Route call (validated parameters).
struct RoutePlan {
    int hr = 0, nq = 0, nc = 0, pattern = 0, variable = 0, length_normalized = 0;
    long long budget_blocks = 0, budget = 0, dense_first = 0;
    int n_last = 0, n_vertical = 0, n_slash = 0, line_len = 0, n_kt = 0, row_tiles = 0, n_split = 0;
    bool need_km = false;
};

struct RouteLayout {
    size_t flag = 0, bad = 0, qm = 0, km = 0, row_m = 0, row_l = 0, vertical = 0, slash = 0,
           slash_part = 0, vert_part = 0, v_prefix = 0, s_prefix = 0, stats_part = 0, total = 0;
};

// Shapes and attributes (what the output shape and the workspace size depend on); the buffers are
// checked by dhsa_route_forward only (route_pointers).
int route_validate(const DhsaRouteParams* p, RoutePlan* plan) {
    if (p == nullptr) return fail(DHSA_STATUS_INVALID_ARGUMENT, "Route: params is NULL");
    if (p->batch < 1 || p->num_q_heads < 1 || p->num_kv_heads < 1 || p->q_len < 1 || p->k_len < 1)
        return fail(DHSA_STATUS_INVALID_ARGUMENT,
                    "Route: bad sizes batch=%d Hq=%d Hkv=%d Lq=%d Lk=%d; all must be >= 1", p->batch,
                    p->num_q_heads, p->num_kv_heads, p->q_len, p->k_len);
    if (p->head_dim < 1 || p->head_dim > dhsa::route::kMaxHeadDim)
        return fail(DHSA_STATUS_UNSUPPORTED, "Route: head_dim %d is not supported; use 1..%d",
                    p->head_dim, dhsa::route::kMaxHeadDim);
    if (p->dtype != DHSA_DTYPE_FP16 && p->dtype != DHSA_DTYPE_BF16 && p->dtype != DHSA_DTYPE_FP32)
        return fail(DHSA_STATUS_UNSUPPORTED,
                    "Route: dtype %d is not supported; use fp16 (0), bf16 (1) or fp32 (2)", p->dtype);
    if (p->q_block < 1)
        return fail(DHSA_STATUS_INVALID_ARGUMENT, "Route: attribute q_block = %d must be >= 1", p->q_block);
    if (p->k_block < 1)
        return fail(DHSA_STATUS_INVALID_ARGUMENT, "Route: attribute k_block = %d must be >= 1", p->k_block);
    if (p->pattern < DHSA_ROUTE_PATTERN_TOPK || p->pattern > DHSA_ROUTE_PATTERN_DYNAMIC)
        return fail(DHSA_STATUS_INVALID_ARGUMENT,
                    "Route: attribute pattern = %d is unknown; use 0 topk, 1 ashape, 2 vslash, 3 "
                    "vslash_blockwise or 4 dynamic",
                    p->pattern);
    if (!(p->density > 0.0 && p->density <= 1.0))
        return fail(DHSA_STATUS_INVALID_ARGUMENT,
                    "Route: attribute density = %g is outside (0, 1]; pass e.g. 0.125", p->density);
    if (p->sink_tokens < 0 || p->local_tokens < 0 || p->instruction_tokens < 0 ||
        p->vslash_blockwise_above < 0)
        return fail(DHSA_STATUS_INVALID_ARGUMENT,
                    "Route: attributes sink_tokens = %d, local_tokens = %d, instruction_tokens = %d, "
                    "vslash_blockwise_above = %d must all be >= 0",
                    p->sink_tokens, p->local_tokens, p->instruction_tokens, p->vslash_blockwise_above);
    if (p->chunk_score != DHSA_ROUTE_CHUNK_SCORE_MASS && p->chunk_score != DHSA_ROUTE_CHUNK_SCORE_MEAN)
        return fail(DHSA_STATUS_INVALID_ARGUMENT,
                    "Route: attribute chunk_score = %d is unknown; use 0 mass or 1 mean", p->chunk_score);
    if (p->num_q_heads % p->num_kv_heads != 0)
        return fail(DHSA_STATUS_INVALID_ARGUMENT,
                    "Route: query heads %d are not a multiple of key heads %d", p->num_q_heads,
                    p->num_kv_heads);
    const int ratio = p->num_q_heads / p->num_kv_heads;
    if (p->head_group != 1 && p->head_group != ratio)
        return fail(DHSA_STATUS_INVALID_ARGUMENT,
                    "Route: attribute head_group = %d must be 1 (per head) or Hq/Hkv = %d (per KV "
                    "group)",
                    p->head_group, ratio);
    if (p->q_len > p->k_len)
        return fail(DHSA_STATUS_INVALID_ARGUMENT,
                    "Route: query length %d exceeds key length %d; queries must be the last Lq of "
                    "the Lk key positions",
                    p->q_len, p->k_len);
    if (p->key_chunk_offsets != nullptr && p->offsets_width < 1)
        return fail(DHSA_STATUS_INVALID_ARGUMENT,
                    "Route: key_chunk_offsets needs at least one column (offsets_width = %d)",
                    p->offsets_width);
    if (p->offsets_width < 0)
        return fail(DHSA_STATUS_INVALID_ARGUMENT, "Route: offsets_width = %d must be >= 0",
                    p->offsets_width);
    RoutePlan& l = *plan;
    // The offsets' width (not the pointer) decides the geometry, so shapes and workspace sizes can be
    // asked before the buffers exist: width 0 = no offsets.
    const bool has_offsets = p->key_chunk_offsets != nullptr || p->offsets_width > 0;
    l.hr = p->num_q_heads / p->head_group;
    l.nq = (int)ceil_div_ll(p->q_len, p->q_block);
    l.pattern = p->pattern;
    if (l.pattern == DHSA_ROUTE_PATTERN_VSLASH && p->vslash_blockwise_above > 0 &&
        p->k_len > p->vslash_blockwise_above)
        l.pattern = DHSA_ROUTE_PATTERN_VSLASH_BLOCKWISE;
    l.variable = l.pattern == DHSA_ROUTE_PATTERN_DYNAMIC && has_offsets;
    l.nc = l.variable ? p->offsets_width - 1 : (int)ceil_div_ll(p->k_len, p->k_block);
    if (l.variable && l.nc < 1)
        return fail(DHSA_STATUS_INVALID_ARGUMENT,
                    "Route: key_chunk_offsets of width %d hold no chunk; pass [B, nC + 1] offsets "
                    "with nC >= 1",
                    p->offsets_width);
    const long long key_blocks = ceil_div_ll(p->k_len, p->k_block);
    const double blocks = std::floor(p->density * (double)key_blocks + 1e-3);
    l.budget_blocks = blocks < 1.0 ? 1 : (long long)blocks;
    const long long budget_tokens = l.budget_blocks * p->k_block;
    l.budget = l.pattern == DHSA_ROUTE_PATTERN_DYNAMIC ? budget_tokens : l.budget_blocks;
    l.length_normalized = l.pattern == DHSA_ROUTE_PATTERN_DYNAMIC &&
                          p->chunk_score == DHSA_ROUTE_CHUNK_SCORE_MEAN;
    l.need_km = !(l.pattern == DHSA_ROUTE_PATTERN_DYNAMIC && p->chunk_score == DHSA_ROUTE_CHUNK_SCORE_MASS);
    if (l.pattern == DHSA_ROUTE_PATTERN_VSLASH) {
        l.dense_first = ceil_div_ll(budget_tokens, p->q_block);
        l.n_last = p->q_block < p->q_len ? p->q_block : p->q_len;
        const long long nv = budget_tokens / 2, ns = budget_tokens - nv;
        l.n_vertical = (int)(nv < p->k_len ? nv : p->k_len);
        l.n_slash = (int)(ns < p->k_len ? ns : p->k_len);
        l.line_len = p->k_len;
        l.n_kt = (int)ceil_div_ll(p->k_len, dhsa::route::kTile);
        l.n_split = (int)ceil_div_ll(p->k_len, dhsa::route::kStatsSplit);
    } else if (l.pattern == DHSA_ROUTE_PATTERN_VSLASH_BLOCKWISE) {
        l.dense_first = ceil_div_ll(budget_tokens, p->q_block);
        const long long nv = l.budget_blocks / 2, ns = l.budget_blocks - nv;
        l.n_vertical = (int)(nv < l.nc ? nv : l.nc);
        l.n_slash = (int)(ns < l.nc ? ns : l.nc);
        l.line_len = l.nc;
        l.row_tiles = (int)ceil_div_ll(l.nq, dhsa::route::kBlockwiseRows);
    }
    const long long out_elems = (long long)p->batch * l.hr * l.nq * l.nc;
    if (out_elems >= (1ll << 31) || (long long)p->batch * p->num_q_heads * p->q_len * p->head_dim >= (1ll << 40) ||
        l.hr > 65535 || p->batch > 65535 || p->num_kv_heads > 65535)
        return fail(DHSA_STATUS_UNSUPPORTED,
                    "Route: problem too large (block_index of %lld entries, Hr=%d, B=%d)", out_elems,
                    l.hr, p->batch);
    return DHSA_STATUS_OK;
}

int route_pointers(const DhsaRouteParams& p) {
    if (!p.q || !p.k || !p.block_index || !p.block_count)
        return fail(DHSA_STATUS_INVALID_ARGUMENT,
                    "Route: a required pointer is NULL (q=%p k=%p block_index=%p block_count=%p)",
                    p.q, p.k, (const void*)p.block_index, (const void*)p.block_count);
    if (p.offsets_width > 0 && p.key_chunk_offsets == nullptr)
        return fail(DHSA_STATUS_INVALID_ARGUMENT,
                    "Route: offsets_width = %d without key_chunk_offsets; pass 0 or the offsets",
                    p.offsets_width);
    return DHSA_STATUS_OK;
}

RouteLayout route_layout(const DhsaRouteParams& p, const RoutePlan& l) {
    RouteLayout w;
    size_t end = 0;
    auto take = [&end](size_t bytes) {
        const size_t at = end;
        end += align_up(bytes > 0 ? bytes : 1);
        return at;
    };
    const size_t f = sizeof(float);
    const size_t lines = (size_t)p.batch * l.hr;
    w.flag = take(sizeof(int32_t));
    w.bad = take((size_t)p.batch * sizeof(int32_t));
    w.qm = take(lines * l.nq * p.head_dim * f);
    if (l.need_km) w.km = take((size_t)p.batch * p.num_kv_heads * l.nc * p.head_dim * f);
    if (l.pattern == DHSA_ROUTE_PATTERN_VSLASH) {
        const size_t rows = (size_t)p.batch * p.num_q_heads * l.n_last;
        w.row_m = take(rows * f);
        w.row_l = take(rows * f);
        w.vertical = take(lines * l.line_len * f);
        w.slash = take(lines * l.line_len * f);
        w.slash_part = take(lines * l.n_kt * (size_t)(l.n_last + dhsa::route::kTile - 1) * f);
        w.v_prefix = take(lines * ((size_t)p.k_len + 1) * f);
        w.s_prefix = take(lines * ((size_t)p.k_len + 1) * f);
        w.stats_part = take(rows * (size_t)l.n_split * 2 * f);
    } else if (l.pattern == DHSA_ROUTE_PATTERN_VSLASH_BLOCKWISE) {
        w.row_m = take(lines * l.nq * f);
        w.row_l = take(lines * l.nq * f);
        w.vertical = take(lines * l.line_len * f);
        w.slash = take(lines * l.line_len * f);
        w.slash_part = take(lines * l.row_tiles * (size_t)l.nc * f);
        w.vert_part = take(lines * l.row_tiles * (size_t)l.nc * f);
    }
    w.total = end;
    return w;
}

int max_dynamic_smem() {
    int dev = 0, bytes = 48 * 1024;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
        cudaGetLastError();
        return 48 * 1024;
    }
    return bytes;
}

// Static shared memory of the kernels that also take dynamic shared memory (upper bounds).
constexpr int kSelectStaticSmem =
    4 * 1024 + dhsa::route::kMaxSelectRows * dhsa::route::kMaxHeadDim * 4;
constexpr int kLinesStaticSmem = (int)sizeof(dhsa::route::MmaTileSmem) + 64 * 65 * 4 + 1024;

// Always set: the 48 KB default limit counts static + dynamic shared memory together (48 KB of
// dynamic memory plus the kernel's static arrays fails to launch without the attribute).
template <typename Kernel>
int set_smem(Kernel kernel, int bytes, const char* what) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (e != cudaSuccess)
        return fail(DHSA_STATUS_CUDA_ERROR, "Route: cudaFuncSetAttribute(%s, %d bytes): %s", what,
                    bytes, cudaGetErrorString(e));
    return DHSA_STATUS_OK;
}

int launched(const char* what) {
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess)
        return fail(DHSA_STATUS_CUDA_ERROR, "Route: %s launch: %s", what, cudaGetErrorString(e));
    return DHSA_STATUS_OK;
}

#define DHSA_TRY(expr)                          \
    do {                                        \
        const int _st = (expr);                 \
        if (_st != DHSA_STATUS_OK) return _st;  \
    } while (0)

// The two logits passes of vslash (row statistics, then line sums): on the tensor cores for fp16 /
// bf16 with D % 16 == 0 and 16-byte aligned q / k, else on the CUDA cores (fp32, and
// DHSA_ROUTE_LOGITS=fp32 in the environment, which forces the CUDA-core path for comparisons).
bool route_fp32_logits_forced() {
    const char* env = std::getenv("DHSA_ROUTE_LOGITS");
    return env != nullptr && std::strcmp(env, "fp32") == 0;
}

template <typename T, bool MMA>
int vslash_logits_as(const dhsa::route::RouteArgs& a, long long stats_x, int wbytes, cudaStream_t stream) {
    namespace rt = dhsa::route;
    rt::route_vslash_stats_kernel<T, MMA><<<dim3((unsigned)stats_x, (unsigned)a.hq, (unsigned)a.batch), 256, 0,
                                            stream>>>(a);
    DHSA_TRY(launched("vslash stats"));
    rt::route_vslash_stats_merge_kernel<<<(unsigned)ceil_div_ll((long long)a.batch * a.hq * a.n_last, 256), 256, 0,
                                          stream>>>(a);
    DHSA_TRY(launched("vslash stats merge"));
    DHSA_TRY(set_smem(rt::route_vslash_lines_kernel<T, MMA>, wbytes, "vslash lines"));
    rt::route_vslash_lines_kernel<T, MMA><<<dim3((unsigned)a.n_kt, (unsigned)a.hr, (unsigned)a.batch), 256, wbytes,
                                            stream>>>(a);
    return launched("vslash lines");
}

template <typename T>
int vslash_logits(const dhsa::route::RouteArgs& a, long long stats_x, int wbytes, cudaStream_t stream) {
    if constexpr (!std::is_same<T, float>::value) {
        if (a.d % 16 == 0 && aligned16(a.q) && aligned16(a.k) && !route_fp32_logits_forced())
            return vslash_logits_as<T, true>(a, stats_x, wbytes, stream);
    }
    return vslash_logits_as<T, false>(a, stats_x, wbytes, stream);
}

template <typename T>
int route_launch(const dhsa::route::RouteArgs& a, const RoutePlan& l, cudaStream_t stream) {
    namespace rt = dhsa::route;
    rt::route_check_offsets_kernel<<<a.batch, 256, 0, stream>>>(a);
    DHSA_TRY(launched("offsets check"));
    rt::route_query_means_kernel<T><<<dim3((unsigned)a.nq, (unsigned)a.hr, (unsigned)a.batch), 128, 0, stream>>>(a);
    DHSA_TRY(launched("query means"));
    if (l.need_km) {
        rt::route_key_means_kernel<T><<<dim3((unsigned)a.nc, (unsigned)a.hkv, (unsigned)a.batch), 128, 0, stream>>>(a);
        DHSA_TRY(launched("key means"));
    }
    const int smem_limit = max_dynamic_smem();
    if (l.pattern == DHSA_ROUTE_PATTERN_VSLASH) {
        const long long stats_x = ceil_div_ll(a.n_last, rt::kTile) * a.n_split;
        if (stats_x > 0x7fffffffll)
            return fail(DHSA_STATUS_UNSUPPORTED, "Route: Lk %d too long for the vslash statistics grid", a.lk);
        const int wbytes = (a.n_last + rt::kTile - 1) * (int)sizeof(float);
        if (wbytes + kLinesStaticSmem > smem_limit)
            return fail(DHSA_STATUS_UNSUPPORTED,
                        "Route: q_block %d needs %d bytes of shared memory for the vslash lines; the "
                        "device allows %d: use a smaller q_block",
                        a.q_block, wbytes + kLinesStaticSmem, smem_limit);
        DHSA_TRY(vslash_logits<T>(a, stats_x, wbytes, stream));
        rt::route_vslash_slash_reduce_kernel<<<dim3((unsigned)ceil_div_ll(a.lk, 256), (unsigned)a.hr, (unsigned)a.batch), 256, 0, stream>>>(a);
        DHSA_TRY(launched("vslash slash reduce"));
        rt::route_top_lines_kernel<<<dim3(2, (unsigned)a.hr, (unsigned)a.batch), 1024, 0, stream>>>(a);
        DHSA_TRY(launched("top lines"));
    } else if (l.pattern == DHSA_ROUTE_PATTERN_VSLASH_BLOCKWISE) {
        const int bytes = 3 * a.nc * (int)sizeof(float);
        if (bytes + kSelectStaticSmem > smem_limit)
            return fail(DHSA_STATUS_UNSUPPORTED,
                        "Route: vslash_blockwise over %d key blocks needs %d bytes of shared memory; "
                        "the device allows %d: use a larger k_block",
                        a.nc, bytes + kSelectStaticSmem, smem_limit);
        DHSA_TRY(set_smem(rt::route_blockwise_lines_kernel, bytes, "blockwise lines"));
        rt::route_blockwise_lines_kernel<<<dim3((unsigned)a.row_tiles, (unsigned)a.hr, (unsigned)a.batch), 256, bytes, stream>>>(a);
        DHSA_TRY(launched("blockwise lines"));
        rt::route_blockwise_reduce_kernel<<<dim3((unsigned)ceil_div_ll(a.nc, 256), (unsigned)a.hr, (unsigned)a.batch), 256, 0, stream>>>(a);
        DHSA_TRY(launched("blockwise reduce"));
        rt::route_top_lines_kernel<<<dim3(2, (unsigned)a.hr, (unsigned)a.batch), 1024, 0, stream>>>(a);
        DHSA_TRY(launched("top lines"));
    }
    const int row_bytes = a.nc * (int)sizeof(float);
    if (row_bytes + kSelectStaticSmem > smem_limit)
        return fail(DHSA_STATUS_UNSUPPORTED,
                    "Route: %d chunks need %d bytes of shared memory per row; the device allows %d: "
                    "use a larger k_block (or longer chunks)",
                    a.nc, row_bytes + kSelectStaticSmem, smem_limit);
    // dynamic / mass reads every key per row: several query blocks per CTA share those reads
    dhsa::route::RouteArgs sa = a;
    sa.select_rows = 1;
    if (a.pattern == DHSA_ROUTE_PATTERN_DYNAMIC && a.chunk_score == DHSA_ROUTE_CHUNK_SCORE_MASS) {
        const int fit = (smem_limit - kSelectStaticSmem) / row_bytes;
        sa.select_rows = fit < rt::kMaxSelectRows ? fit : rt::kMaxSelectRows;
        if (sa.select_rows < 1) sa.select_rows = 1;
    }
    const int bytes = sa.select_rows * row_bytes;
    DHSA_TRY(set_smem(rt::route_select_kernel<T>, bytes, "selection"));
    rt::route_select_kernel<T><<<dim3((unsigned)ceil_div_ll(a.nq, sa.select_rows), (unsigned)a.hr, (unsigned)a.batch),
                                 rt::kSelectThreads, bytes, stream>>>(sa);
    DHSA_TRY(launched("selection"));
    return DHSA_STATUS_OK;
}

// The workspace every forward takes: present, at least `needed` bytes (what `size_fn` returns), and
// 16-byte aligned (the kernels read it as int32 / float vectors).
int check_workspace(const char* op, const char* size_fn, const void* workspace, size_t workspace_bytes,
                    size_t needed) {
    if (workspace == nullptr || workspace_bytes < needed)
        return fail(DHSA_STATUS_WORKSPACE, "%s: workspace %p of %zu bytes; %zu bytes needed (%s)", op,
                    workspace, workspace_bytes, needed, size_fn);
    if (!aligned16(workspace))
        return fail(DHSA_STATUS_WORKSPACE, "%s: workspace %p must be 16-byte aligned", op, workspace);
    return DHSA_STATUS_OK;
}

int read_flag(const void* workspace, cudaStream_t stream, int32_t* flag, const char* op) {
    if (workspace == nullptr) return fail(DHSA_STATUS_WORKSPACE, "%s: workspace is NULL", op);
    int32_t host = 0;
    cudaError_t e = cudaMemcpyAsync(&host, workspace, sizeof(int32_t), cudaMemcpyDeviceToHost, stream);
    if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
    if (e != cudaSuccess)
        return fail(DHSA_STATUS_CUDA_ERROR, "%s: reading the error flag: %s", op, cudaGetErrorString(e));
    if (flag) *flag = host;
    if (host != 0)
        return fail(DHSA_STATUS_INDEX_ERROR,
                    "%s: the kernel rejected its indices (flag 0x%x:%s%s%s%s); the affected rows were "
                    "not computed",
                    op, host, (host & DHSA_FLAG_BAD_COUNT) ? " block_count outside [0, K]" : "",
                    (host & DHSA_FLAG_BAD_INDEX) ? " block index outside [0, nC)" : "",
                    (host & DHSA_FLAG_NOT_ASCENDING) ? " block indices not strictly ascending" : "",
                    (host & DHSA_FLAG_BAD_CHUNK_OFFSETS)
                        ? " bad key_chunk_offsets (each row must start at 0, never decrease and end "
                          "at Lk)"
                        : "");
    return ok();
}

}  // namespace

// ChunkOffsets: shapes and attributes (the workspace depends on them only).
int chunk_offsets_validate(const DhsaChunkOffsetsParams* p) {
    if (p == nullptr) return fail(DHSA_STATUS_INVALID_ARGUMENT, "ChunkOffsets: params is NULL");
    if (p->batch < 1 || p->batch > 65535 || p->num_kv_heads < 1 || p->length < 1 || p->head_dim < 1)
        return fail(DHSA_STATUS_INVALID_ARGUMENT,
                    "ChunkOffsets: bad sizes batch=%d Hkv=%d L=%d D=%d; all must be >= 1 (batch <= 65535)",
                    p->batch, p->num_kv_heads, p->length, p->head_dim);
    if (p->length >= (1 << 30) || (long long)p->batch * (p->length + 1) >= (1ll << 31))
        return fail(DHSA_STATUS_UNSUPPORTED, "ChunkOffsets: batch %d x length %d too large", p->batch,
                    p->length);
    if (p->dtype != DHSA_DTYPE_FP16 && p->dtype != DHSA_DTYPE_BF16 && p->dtype != DHSA_DTYPE_FP32)
        return fail(DHSA_STATUS_UNSUPPORTED,
                    "ChunkOffsets: dtype %d is not supported; use fp16 (0), bf16 (1) or fp32 (2)", p->dtype);
    if (p->min_chunk < 1 || p->min_chunk >= (1 << 30))
        return fail(DHSA_STATUS_INVALID_ARGUMENT, "ChunkOffsets: attribute min_chunk = %d must be in [1, 2^30)",
                    p->min_chunk);
    if (p->max_chunk < p->min_chunk || p->max_chunk >= (1 << 30))
        return fail(DHSA_STATUS_INVALID_ARGUMENT,
                    "ChunkOffsets: attribute max_chunk = %d must be >= min_chunk = %d (and < 2^30)",
                    p->max_chunk, p->min_chunk);
    if (p->window < 1 || p->window >= (1 << 30))
        return fail(DHSA_STATUS_INVALID_ARGUMENT, "ChunkOffsets: attribute window = %d must be >= 1", p->window);
    if (!std::isfinite(p->threshold))
        return fail(DHSA_STATUS_INVALID_ARGUMENT, "ChunkOffsets: attribute threshold = %g must be finite",
                    p->threshold);
    return DHSA_STATUS_OK;
}

struct ChunkWorkspace {
    size_t d = 0, threshold = 0, total = 0;
};

ChunkWorkspace chunk_workspace_layout(const DhsaChunkOffsetsParams& p) {
    ChunkWorkspace w;
    w.d = 0;
    w.threshold = align_up((size_t)p.batch * p.length * sizeof(float));
    w.total = w.threshold + align_up((size_t)p.batch * sizeof(float));
    return w;
}

template <typename T>
cudaError_t launch_similarity(const dhsa::chunks::ChunkArgs& a, long long candidates, cudaStream_t stream) {
    const dim3 grid((unsigned)((candidates + dhsa::chunks::kWarpsPerBlock - 1) / dhsa::chunks::kWarpsPerBlock),
                    (unsigned)a.batch);
    dhsa::chunks::co_similarity<T><<<grid, dhsa::chunks::kWarpsPerBlock * 32, 0, stream>>>(a);
    return cudaGetLastError();
}

extern "C" {

int dhsa_abi_version(void) { return DHSA_ABI_VERSION; }

const char* dhsa_status_string(int status) {
    switch (status) {
        case DHSA_STATUS_OK: return "ok";
        case DHSA_STATUS_INVALID_ARGUMENT: return "invalid argument";
        case DHSA_STATUS_UNSUPPORTED: return "unsupported";
        case DHSA_STATUS_WORKSPACE: return "workspace too small";
        case DHSA_STATUS_CUDA_ERROR: return "CUDA error";
        case DHSA_STATUS_INDEX_ERROR: return "bad block index / count / chunk offsets";
        default: return "unknown status";
    }
}

const char* dhsa_last_error_message(void) { return g_last_error; }

int dhsa_bsa_workspace_size(const DhsaBsaParams* params, size_t* bytes) {
    if (bytes == nullptr) return fail(DHSA_STATUS_INVALID_ARGUMENT, "bytes is NULL");
    const int st = validate(params);
    if (st != DHSA_STATUS_OK) return st;
    const int nq = (params->q_len + params->q_block - 1) / params->q_block;
    *bytes = workspace_layout(*params, nq).total;
    return ok();
}

int dhsa_bsa_forward(const DhsaBsaParams* params, void* workspace, size_t workspace_bytes,
                     cudaStream_t stream) {
    const int st = validate(params);
    if (st != DHSA_STATUS_OK) return st;
    const DhsaBsaParams& p = *params;
    const int pst = validate_pointers(p);
    if (pst != DHSA_STATUS_OK) return pst;
    const int nq = (p.q_len + p.q_block - 1) / p.q_block;
    const Layout l = workspace_layout(p, nq);
    const int wst = check_workspace("BlockSparseAttention", "dhsa_bsa_workspace_size", workspace,
                                    workspace_bytes, l.total);
    if (wst != DHSA_STATUS_OK) return wst;

    unsigned char* ws = static_cast<unsigned char*>(workspace);
    dhsa::BsaArgs a;
    std::memset(&a, 0, sizeof(a));
    a.q = p.q;
    a.k = p.k;
    a.v = p.v;
    a.out = p.out;
    a.block_index = p.block_index;
    a.block_count = p.block_count;
    a.key_chunk_offsets = p.key_chunk_offsets;
    a.flag = reinterpret_cast<int32_t*>(ws + l.flag);
    a.counts = reinterpret_cast<int32_t*>(ws + l.counts);
    a.stream_off = p.key_chunk_offsets ? reinterpret_cast<int32_t*>(ws + l.stream_off) : nullptr;
    a.chunk_start = p.key_chunk_offsets ? reinterpret_cast<int32_t*>(ws + l.chunk_start) : nullptr;
    a.batch = p.batch;
    a.hq = p.num_q_heads;
    a.hkv = p.num_kv_heads;
    a.hr = p.num_route_heads;
    a.lq = p.q_len;
    a.lk = p.k_len;
    a.width = p.index_width;
    a.nq = nq;
    a.q_block = p.q_block;
    a.k_block = p.key_chunk_offsets ? 1 : p.k_block;
    a.nc = p.key_chunk_offsets ? p.num_chunks : (p.k_len + p.k_block - 1) / p.k_block;
    a.head_group = p.num_q_heads / p.num_route_heads;
    a.kv_ratio = p.num_q_heads / p.num_kv_heads;
    a.scale_log2 = p.scale * 1.4426950408889634f;
    a.causal = p.causal;
    a.hoist_last = kv_fits_in_l2(a, p.head_dim) ? 1 : 0;

    cudaError_t e = cudaMemsetAsync(a.flag, 0, sizeof(int32_t), stream);
    if (e != cudaSuccess)
        return fail(DHSA_STATUS_CUDA_ERROR, "clearing the error flag: %s", cudaGetErrorString(e));

    const long long rows = (long long)p.batch * p.num_route_heads * nq;
    const int warps_per_block = 4;
    const long long blocks = (rows + warps_per_block - 1) / warps_per_block;
    if (blocks > 0x7fffffffll)
        return fail(DHSA_STATUS_UNSUPPORTED, "too many index rows (%lld)", rows);
    dhsa::bsa_plan_kernel<<<(unsigned)blocks, warps_per_block * 32, 0, stream>>>(a);
    e = cudaGetLastError();
    if (e != cudaSuccess)
        return fail(DHSA_STATUS_CUDA_ERROR, "index validation kernel launch: %s",
                    cudaGetErrorString(e));

    const int rc = p.dtype == DHSA_DTYPE_BF16
                       ? dispatch<__nv_bfloat16>(a, p.head_dim, p.variant, stream)
                       : dispatch<__half>(a, p.head_dim, p.variant, stream);
    if (rc != DHSA_STATUS_OK) return rc;
    return ok();
}

int dhsa_bsa_read_error_flag(const void* workspace, cudaStream_t stream, int32_t* flag) {
    return read_flag(workspace, stream, flag, "block-sparse attention");
}

int dhsa_route_output_shape(const DhsaRouteParams* params, int32_t* routing_heads,
                            int32_t* q_blocks, int32_t* chunks) {
    RoutePlan l;
    const int st = route_validate(params, &l);
    if (st != DHSA_STATUS_OK) return st;
    if (routing_heads) *routing_heads = l.hr;
    if (q_blocks) *q_blocks = l.nq;
    if (chunks) *chunks = l.nc;
    return ok();
}

int dhsa_route_workspace_size(const DhsaRouteParams* params, size_t* bytes) {
    if (bytes == nullptr) return fail(DHSA_STATUS_INVALID_ARGUMENT, "Route: bytes is NULL");
    RoutePlan l;
    const int st = route_validate(params, &l);
    if (st != DHSA_STATUS_OK) return st;
    *bytes = route_layout(*params, l).total;
    return ok();
}

int dhsa_route_forward(const DhsaRouteParams* params, void* workspace, size_t workspace_bytes,
                       cudaStream_t stream) {
    RoutePlan l;
    const int st = route_validate(params, &l);
    if (st != DHSA_STATUS_OK) return st;
    const DhsaRouteParams& p = *params;
    const int pst = route_pointers(p);
    if (pst != DHSA_STATUS_OK) return pst;
    const RouteLayout w = route_layout(p, l);
    const int wst = check_workspace("Route", "dhsa_route_workspace_size", workspace, workspace_bytes, w.total);
    if (wst != DHSA_STATUS_OK) return wst;
    unsigned char* ws = static_cast<unsigned char*>(workspace);
    auto fptr = [ws](size_t off) { return reinterpret_cast<float*>(ws + off); };
    dhsa::route::RouteArgs a;
    std::memset(&a, 0, sizeof(a));
    a.q = p.q;
    a.k = p.k;
    a.offsets = p.key_chunk_offsets;
    a.block_index = p.block_index;
    a.block_count = p.block_count;
    a.flag = reinterpret_cast<int32_t*>(ws + w.flag);
    a.bad_batch = reinterpret_cast<int32_t*>(ws + w.bad);
    a.qm = fptr(w.qm);
    a.km = l.need_km ? fptr(w.km) : nullptr;
    const bool lines = l.pattern == DHSA_ROUTE_PATTERN_VSLASH || l.pattern == DHSA_ROUTE_PATTERN_VSLASH_BLOCKWISE;
    if (lines) {
        a.row_m = fptr(w.row_m);
        a.row_l = fptr(w.row_l);
        a.vertical = fptr(w.vertical);
        a.slash = fptr(w.slash);
        a.slash_part = fptr(w.slash_part);
    }
    if (l.pattern == DHSA_ROUTE_PATTERN_VSLASH) {
        a.v_prefix = fptr(w.v_prefix);
        a.s_prefix = fptr(w.s_prefix);
        a.stats_part = fptr(w.stats_part);
    }
    if (l.pattern == DHSA_ROUTE_PATTERN_VSLASH_BLOCKWISE) a.vert_part = fptr(w.vert_part);
    a.batch = p.batch;
    a.hq = p.num_q_heads;
    a.hkv = p.num_kv_heads;
    a.hr = l.hr;
    a.lq = p.q_len;
    a.lk = p.k_len;
    a.d = p.head_dim;
    a.nq = l.nq;
    a.nc = l.nc;
    a.w = p.offsets_width;
    a.q_block = p.q_block;
    a.k_block = p.k_block;
    a.head_group = p.head_group;
    a.kv_ratio = p.num_q_heads / p.num_kv_heads;
    a.q_offset = p.k_len - p.q_len;
    a.pattern = l.pattern;
    a.chunk_score = p.chunk_score;
    a.variable = l.variable;
    a.length_normalized = l.length_normalized;
    a.sink_tokens = p.sink_tokens;
    a.local_tokens = p.local_tokens;
    a.instruction_tokens = p.instruction_tokens;
    a.budget = l.budget;
    a.dense_first = l.dense_first;
    a.n_last = l.n_last;
    a.n_vertical = l.n_vertical;
    a.n_slash = l.n_slash;
    a.line_len = l.line_len;
    a.n_kt = l.n_kt;
    a.row_tiles = l.row_tiles;
    a.n_split = l.n_split;
    a.select_rows = 1;
    a.root = (float)std::sqrt((double)p.head_dim);
    cudaError_t e = cudaMemsetAsync(a.flag, 0, sizeof(int32_t), stream);
    if (e != cudaSuccess)
        return fail(DHSA_STATUS_CUDA_ERROR, "Route: clearing the error flag: %s", cudaGetErrorString(e));
    int rc;
    if (p.dtype == DHSA_DTYPE_BF16) rc = route_launch<__nv_bfloat16>(a, l, stream);
    else if (p.dtype == DHSA_DTYPE_FP16) rc = route_launch<__half>(a, l, stream);
    else rc = route_launch<float>(a, l, stream);
    if (rc != DHSA_STATUS_OK) return rc;
    return ok();
}

int dhsa_route_read_error_flag(const void* workspace, cudaStream_t stream, int32_t* flag) {
    return read_flag(workspace, stream, flag, "Route");
}

int dhsa_chunk_offsets_workspace_size(const DhsaChunkOffsetsParams* params, size_t* bytes) {
    if (bytes == nullptr) return fail(DHSA_STATUS_INVALID_ARGUMENT, "ChunkOffsets: bytes is NULL");
    const int st = chunk_offsets_validate(params);
    if (st != DHSA_STATUS_OK) return st;
    *bytes = chunk_workspace_layout(*params).total;
    return ok();
}

int dhsa_chunk_offsets_forward(const DhsaChunkOffsetsParams* params, void* workspace,
                               size_t workspace_bytes, cudaStream_t stream) {
    const int st = chunk_offsets_validate(params);
    if (st != DHSA_STATUS_OK) return st;
    const DhsaChunkOffsetsParams& p = *params;
    if (p.key == nullptr || p.offsets == nullptr || p.counts == nullptr)
        return fail(DHSA_STATUS_INVALID_ARGUMENT, "ChunkOffsets: key=%p offsets=%p counts=%p must not be NULL",
                    p.key, (void*)p.offsets, (void*)p.counts);
    const ChunkWorkspace w = chunk_workspace_layout(p);
    const int wst = check_workspace("ChunkOffsets", "dhsa_chunk_offsets_workspace_size", workspace,
                                    workspace_bytes, w.total);
    if (wst != DHSA_STATUS_OK) return wst;
    unsigned char* ws = static_cast<unsigned char*>(workspace);
    dhsa::chunks::ChunkArgs a;
    std::memset(&a, 0, sizeof(a));
    a.key = p.key;
    a.probs = p.boundary_probs;
    a.offsets = p.offsets;
    a.counts = p.counts;
    a.d = reinterpret_cast<float*>(ws + w.d);
    a.threshold = reinterpret_cast<float*>(ws + w.threshold);
    a.batch = p.batch;
    a.heads = p.num_kv_heads;
    a.length = p.length;
    a.head_dim = p.head_dim;
    a.min_chunk = p.min_chunk;
    a.max_chunk = p.max_chunk;
    a.window = p.window;
    a.prob_threshold = (float)p.threshold;
    cudaError_t e = cudaSuccess;
    if (p.boundary_probs == nullptr) {
        e = cudaMemsetAsync(a.d, 0, (size_t)p.batch * p.length * sizeof(float), stream);
        const long long candidates = (long long)p.length - 2ll * p.window + 1;  // [w - 1, L - w)
        if (e == cudaSuccess && candidates > 0)
            e = p.dtype == DHSA_DTYPE_BF16   ? launch_similarity<__nv_bfloat16>(a, candidates, stream)
                : p.dtype == DHSA_DTYPE_FP16 ? launch_similarity<__half>(a, candidates, stream)
                                             : launch_similarity<float>(a, candidates, stream);
        if (e == cudaSuccess) {
            dhsa::chunks::co_threshold<<<p.batch, dhsa::chunks::kBlockThreads, 0, stream>>>(a);
            e = cudaGetLastError();
        }
    }
    if (e == cudaSuccess) {
        dhsa::chunks::co_limits<<<p.batch, dhsa::chunks::kBlockThreads, 0, stream>>>(a);
        e = cudaGetLastError();
    }
    if (e != cudaSuccess)
        return fail(DHSA_STATUS_CUDA_ERROR, "ChunkOffsets kernels (batch %d, L %d): %s", p.batch, p.length,
                    cudaGetErrorString(e));
    return ok();
}

int dhsa_chunk_offsets_pack(const int32_t* offsets, const int32_t* counts, int32_t batch, int32_t length,
                            int32_t* packed, int64_t* width, cudaStream_t stream) {
    if (offsets == nullptr || counts == nullptr || packed == nullptr || width == nullptr)
        return fail(DHSA_STATUS_INVALID_ARGUMENT,
                    "ChunkOffsets pack: offsets=%p counts=%p packed=%p width=%p must not be NULL",
                    (const void*)offsets, (const void*)counts, (void*)packed, (void*)width);
    if (batch < 1 || length < 1 || length >= (1 << 30))
        return fail(DHSA_STATUS_INVALID_ARGUMENT, "ChunkOffsets pack: batch = %d, L = %d must be >= 1", batch,
                    length);
    dhsa::chunks::co_pack<<<batch, 256, 0, stream>>>(offsets, counts, batch, length, packed, width);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess)
        return fail(DHSA_STATUS_CUDA_ERROR, "ChunkOffsets pack kernel (batch %d, L %d): %s", batch, length,
                    cudaGetErrorString(e));
    return ok();
}

}  // extern "C"
