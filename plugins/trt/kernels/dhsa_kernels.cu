// C ABI of the DHSA CUDA kernels: host-side validation, workspace layout, launches.
// No exception leaves this file; every entry point returns a DHSA_STATUS_* code.

#include "dhsa_kernels.h"

#include <cuda_runtime.h>

#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <type_traits>

#include "block_sparse_attention.cuh"
#include "block_sparse_attention_sm90.cuh"

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

int validate(const DhsaBsaParams* p) {
    if (p == nullptr) return fail(DHSA_STATUS_INVALID_ARGUMENT, "params is NULL");
    if (!p->q || !p->k || !p->v || !p->out || !p->block_index || !p->block_count)
        return fail(DHSA_STATUS_INVALID_ARGUMENT,
                    "a required pointer is NULL (q=%p k=%p v=%p out=%p block_index=%p "
                    "block_count=%p)",
                    p->q, p->k, p->v, p->out, (const void*)p->block_index,
                    (const void*)p->block_count);
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

}  // namespace

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
    const int nq = (p.q_len + p.q_block - 1) / p.q_block;
    const Layout l = workspace_layout(p, nq);
    if (workspace == nullptr || workspace_bytes < l.total)
        return fail(DHSA_STATUS_WORKSPACE, "workspace %p of %zu bytes; %zu bytes needed",
                    workspace, workspace_bytes, l.total);
    if (!aligned16(workspace))
        return fail(DHSA_STATUS_WORKSPACE, "workspace %p must be 16-byte aligned", workspace);

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
    if (workspace == nullptr) return fail(DHSA_STATUS_WORKSPACE, "workspace is NULL");
    int32_t host = 0;
    cudaError_t e = cudaMemcpyAsync(&host, workspace, sizeof(int32_t), cudaMemcpyDeviceToHost,
                                    stream);
    if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
    if (e != cudaSuccess)
        return fail(DHSA_STATUS_CUDA_ERROR, "reading the error flag: %s", cudaGetErrorString(e));
    if (flag) *flag = host;
    if (host != 0)
        return fail(DHSA_STATUS_INDEX_ERROR,
                    "the kernel rejected its indices (flag 0x%x:%s%s%s%s); the affected rows were "
                    "not computed",
                    host, (host & DHSA_FLAG_BAD_COUNT) ? " block_count outside [0, K]" : "",
                    (host & DHSA_FLAG_BAD_INDEX) ? " block index outside [0, nC)" : "",
                    (host & DHSA_FLAG_NOT_ASCENDING) ? " block indices not strictly ascending" : "",
                    (host & DHSA_FLAG_BAD_CHUNK_OFFSETS) ? " bad key_chunk_offsets" : "");
    return ok();
}

}  // extern "C"
