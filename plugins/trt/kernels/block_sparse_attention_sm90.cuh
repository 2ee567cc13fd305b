// Block-sparse flash attention forward for Hopper (sm_90a): warpgroup MMA (wgmma.mma_async).
//
// Same contract and CTA decomposition as block_sparse_attention.cuh (one CTA = one 128-row query
// tile of a routing head, rows = head_group heads x P positions; the key stream of the query block
// is gathered 128 keys at a time), but the two GEMMs run on the tensor cores' warpgroup path:
//   - 2 consumer warpgroups, warpgroup w owns rows 64w..64w+63 (wgmma M = 64), plus (variant
//     "wgmma") a producer warpgroup that gathers the K/V tiles;
//   - Q and the gathered K/V tiles live in shared memory in the 128-byte swizzled layout that the
//     wgmma matrix descriptors read: a tile of R rows x D columns is stored as D/64 column blocks,
//     each R rows x 128 bytes, with the 16-byte chunk c of row r at chunk c ^ (r & 7);
//   - S = Q K^T: A (Q) and B (K, K-major) from shared memory; O += P V: A (P) from registers, B (V,
//     rows = keys, D contiguous) from shared memory with the transpose bit (N-major);
//   - K/V rows are gathered with cp.async (16 bytes) into a ring of 3 stages; the key positions of
//     a tile are computed into shared memory before its loads (as in the mma.sync kernel) and also
//     drive the causal / padding mask;
//   - the S GEMM of tile j is issued together with the P V GEMM of tile j - 1 and the softmax of
//     tile j runs while the latter is in flight (FlashAttention-3's intra-warpgroup pipelining);
//     the two consumer warpgroups take turns issuing (ping-pong), so one's softmax overlaps the
//     other's GEMMs.
// Only sm_90a device code contains the kernel bodies; other targets compile stubs that trap, and the
// host never launches them there (dhsa_kernels.cu checks the device and the kernel's attributes).
#pragma once

#include <cuda.h>  // CUtensorMap (a type only: the library does not link the driver)

#include "block_sparse_attention.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DHSA_WGMMA_ENABLED 1
#endif

namespace dhsa {
namespace sm90 {

#ifdef DHSA_WGMMA_ENABLED
#define DHSA_WGMMA_D64 \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15" ", " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define DHSA_WGMMA_C64 \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
    "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
    "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define DHSA_WGMMA_D128 \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15" ", " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31" ", " \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47" ", " \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define DHSA_WGMMA_C128 \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
    "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
    "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
    "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
    "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
    "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
    "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

// D[64 x N] (+)= A B with fp32 accumulators (N / 2 per thread): ss = A and B from shared memory
// (both K-major; acc = 0 overwrites D), rs = A from registers (4 x 2 elements), B from shared memory
// N-major (transposed). TY = bf16 or f16; P_SS / P_RS: operand number of the predicate source.
#define DHSA_WGMMA_DEF(N, TY, P_SS, A0, A1, A2, A3, B_RS, P_RS)                                    \
    __device__ __forceinline__ void wgmma_ss_m64n##N##_##TY(float (&d)[N / 2], uint64_t da,        \
                                                             uint64_t db, int acc) {               \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #P_SS ", 0;\n"                             \
                     "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." #TY "." #TY " {" DHSA_WGMMA_D##N \
                     "}, %" #A0 ", %" #A1 ", p, 1, 1, 0, 0;\n}\n"                                     \
                     : DHSA_WGMMA_C##N                                                              \
                     : "l"(da), "l"(db), "r"(acc));                                                 \
    }                                                                                               \
    __device__ __forceinline__ void wgmma_rs_m64n##N##_##TY(float (&d)[N / 2],                      \
                                                             const uint32_t (&a)[4], uint64_t db) { \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #P_RS ", 0;\n"                             \
                     "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." #TY "." #TY " {" DHSA_WGMMA_D##N \
                     "}, {%" #A0 ", %" #A1 ", %" #A2 ", %" #A3 "}, %" #B_RS ", p, 1, 1, 1;\n}\n"      \
                     : DHSA_WGMMA_C##N                                                              \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));                \
    }
// operands after the N / 2 accumulators: ss: desc A, desc B, acc; rs: a0..a3, desc B, 1
DHSA_WGMMA_DEF(64, bf16, 34, 32, 33, 34, 35, 36, 37)
DHSA_WGMMA_DEF(64, f16, 34, 32, 33, 34, 35, 36, 37)
DHSA_WGMMA_DEF(128, bf16, 66, 64, 65, 66, 67, 68, 69)
DHSA_WGMMA_DEF(128, f16, 66, 64, 65, 66, 67, 68, 69)
#undef DHSA_WGMMA_DEF
#undef DHSA_WGMMA_D64
#undef DHSA_WGMMA_C64
#undef DHSA_WGMMA_D128
#undef DHSA_WGMMA_C128

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Keeps the compiler from moving accesses of wgmma accumulator / operand registers across the
// asynchronous MMA's issue and wait (the registers are in flight in between).
// Named barrier `id` (0 is __syncthreads) over `n` threads: wait for all, or only arrive.
__device__ __forceinline__ void named_bar_sync(int id, int n) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id, int n) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}
template <int N>
__device__ __forceinline__ void pin(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void pin(uint32_t (&r)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(r[i][e])::"memory");
}

// m64nNk16 wgmma for element type T (bf16 / fp16) and N = 64 or 128: ss (A and B from shared
// memory, both K-major) and rs (A from registers, B from shared memory N-major).
template <typename T>
struct IsBf16 {
    static constexpr bool value = false;
};
template <>
struct IsBf16<__nv_bfloat16> {
    static constexpr bool value = true;
};
template <typename T, int N>
struct Wg {
    static_assert(N == 64 || N == 128, "wgmma N");
    __device__ __forceinline__ static void ss(float (&d)[N / 2], uint64_t a, uint64_t b, int acc) {
        if constexpr (N == 64) {
            if constexpr (IsBf16<T>::value) wgmma_ss_m64n64_bf16(d, a, b, acc);
            else wgmma_ss_m64n64_f16(d, a, b, acc);
        } else {
            if constexpr (IsBf16<T>::value) wgmma_ss_m64n128_bf16(d, a, b, acc);
            else wgmma_ss_m64n128_f16(d, a, b, acc);
        }
    }
    __device__ __forceinline__ static void rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b) {
        if constexpr (N == 64) {
            if constexpr (IsBf16<T>::value) wgmma_rs_m64n64_bf16(d, a, b);
            else wgmma_rs_m64n64_f16(d, a, b);
        } else {
            if constexpr (IsBf16<T>::value) wgmma_rs_m64n128_bf16(d, a, b);
            else wgmma_rs_m64n128_f16(d, a, b);
        }
    }
};

// Shared-memory matrix descriptor, 128-byte swizzle: start address, leading / stride byte offsets.
__device__ __forceinline__ uint64_t make_desc(uint32_t saddr, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((saddr & 0x3FFFFu) >> 4) | ((uint64_t)((lbo >> 4) & 0x3FFFu) << 16) |
           ((uint64_t)((sbo >> 4) & 0x3FFFu) << 32) | (1ull << 62);
}
#endif  // DHSA_WGMMA_ENABLED

#ifdef DHSA_WGMMA_ENABLED
// mbarrier (shared memory, CTA scope): init, arrive, wait for the completion of a phase parity.
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, int parity) {
    asm volatile(
        "{\n.reg .pred done;\nWAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT_%=;\n}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
// Arrive on `bar` and add `bytes` to the bytes its current phase waits for (the copy engine's
// complete_tx pays them back).
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
                 : "memory");
}
// Bulk tensor copy (TMA) of one box of a 3-D tensor map at coordinates (c0, c1, c2) into shared
// memory at `dst`, completing `bytes` of transaction count on `bar`. Boxes that reach past the
// tensor are zero-filled there: nothing outside the tensor is read.
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2,
                                            uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
        "[%5];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
        : "memory");
}
__device__ __forceinline__ void tma_prefetch_map(const CUtensorMap* map) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}
#endif  // DHSA_WGMMA_ENABLED

// Byte offset of 16-byte chunk `chunk` (D / 8 per row) of row `row` in a swizzled tile of R rows.
template <int R>
__device__ __forceinline__ uint32_t swz128(int row, int chunk) {
    return (uint32_t)((chunk >> 3) * (R * 128) + row * 128 + (((chunk & 7) ^ (row & 7)) << 4));
}

constexpr int kBM = 128;  // query rows per CTA (2 consumer warpgroups x 64)
constexpr int kBN = 128;  // gathered keys per K/V tile

// Dynamic shared memory: the Q tile, then STAGES K tiles, then STAGES V tiles (swizzled layout).
template <int D, int STAGES>
struct WgSmem {
    static constexpr int kTileQ = kBM * D * 2;
    static constexpr int kTileKV = kBN * D * 2;
    // + slack to align the dynamic buffer to 1024 bytes (the swizzle atom); its base is 16-aligned
    static constexpr int kBytes = 1008 + kTileQ + 2 * STAGES * kTileKV;
    unsigned char* gQ;         // generic pointer to the Q tile (epilogue)
    uint32_t sQ, sK0, sV0;     // shared addresses of the Q tile and of stage 0's K / V tiles
    __device__ __forceinline__ explicit WgSmem(unsigned char* raw) {
        const uint32_t r = smem_addr(raw);
        sQ = (r + 1023u) & ~1023u;
        gQ = raw + (sQ - r);
        sK0 = sQ + kTileQ;
        sV0 = sK0 + STAGES * kTileKV;
    }
};

// The CTA's query tile (same decomposition as bsa_fwd_kernel: rows = head_group heads x P query
// positions) and the key stream of its query block.
struct WgTile {
    int t0, npos, P, h0, cnt, total, ntiles, qpos_offset, kv_head;  // kv_head: b * Hkv + KV head
    long long qrow0, kvoff, row_id;
};

template <int D, bool VAR>
__device__ __forceinline__ bool wg_tile(const BsaArgs& a, WgTile& t) {
    int x, r, b;
    work_item(a, x, r, b);  // heavy (late, causal) query tiles first
    const int qb = x / a.tiles_per_qblock;
    const int tt = x - qb * a.tiles_per_qblock;
    t.t0 = qb * a.q_block + tt * a.pos_per_tile;
    const int t_end = min(min(t.t0 + a.pos_per_tile, (qb + 1) * a.q_block), a.lq);
    t.npos = t_end - t.t0;
    if (t.npos <= 0) return false;
    t.P = a.pos_per_tile;
    t.h0 = r * a.head_group;
    t.qrow0 = (long long)b * a.hq * a.lq;
    t.kv_head = b * a.hkv + t.h0 / a.kv_ratio;
    t.kvoff = (long long)t.kv_head * a.lk * D;
    t.row_id = ((long long)b * a.hr + r) * a.nq + qb;
    t.cnt = a.counts[t.row_id];
    t.total = VAR ? a.stream_off[t.row_id * (a.width + 1) + t.cnt] : t.cnt * a.k_block;
    t.ntiles = (t.total + kBN - 1) / kBN;
    t.qpos_offset = a.lk - a.lq;
    return true;
}

// Key position of stream slot s of the tile's query block (-1: past the stream or past Lk).
// Variable chunks: `cursor` walks the stream offsets; slots must be asked for in increasing order.
template <bool VAR>
__device__ __forceinline__ int wg_stream_key(const BsaArgs& a, const WgTile& t, int s, int& cursor) {
    if (s >= t.total) return -1;
    if constexpr (VAR) {
        const int32_t* soff = a.stream_off + t.row_id * (a.width + 1);
        while (cursor + 1 < t.cnt && soff[cursor + 1] <= s) ++cursor;
        return a.chunk_start[t.row_id * a.width + cursor] + (s - soff[cursor]);
    }
    const int i = s / a.k_block;
    const int kp = a.block_index[t.row_id * a.width + i] * a.k_block + (s - i * a.k_block);
    return kp < a.lk ? kp : -1;
}

// cp.async of Q rows [row0, row0 + rows) into the swizzled Q tile (zeros for rows that are not
// real queries) by NT threads.
template <typename T, int D, int NT>
__device__ __forceinline__ void wg_load_q(const BsaArgs& a, const WgTile& t, uint32_t sQ, int row0,
                                          int rows, int tid) {
    for (int ci = tid; ci < rows * (D / 8); ci += NT) {
        const int m = row0 + ci / (D / 8);
        const int c = ci % (D / 8);
        const int g = m / t.P;
        const int p = m - g * t.P;
        const bool valid = g < a.head_group && p < t.npos;
        const T* src = reinterpret_cast<const T*>(a.q);
        if (valid) src += (t.qrow0 + (long long)(t.h0 + g) * a.lq + t.t0 + p) * D + c * 8;
        cp_async16(sQ + swz128<kBM>(m, c), src, valid);
    }
}

// cp.async gather by NT threads of the K rows at key positions kpos[0..kBN) (if do_k) and of the V
// rows at vpos[0..kBN) (if do_v; SAME: vpos == kpos) into swizzled tiles (zeros for position -1).
// Thread group tid / (D / 8) handles RPT consecutive rows, 16 bytes (chunk tid % (D / 8)) of each:
// its positions are read as int4 vectors, and a warp's instruction still writes two whole rows.
// The load issue sits on every thread's path, so it is kept short (measured: reading the
// positions once per matrix instead of once per row pair cost ~10 %, docs/GPU_NOTES.md v7).
template <typename T, int D, int NT, bool SAME>
__device__ __forceinline__ void wg_load_kv(const T* kbase, const int* kpos, uint32_t dK, bool do_k,
                                           const T* vbase, const int* vpos, uint32_t dV, bool do_v,
                                           int tid) {
    constexpr int CPR = D / 8;
    constexpr int RPT = kBN * CPR / NT;  // rows per thread
    static_assert(NT % CPR == 0 && RPT % 4 == 0, "threads per K/V row");
    const int c = tid % CPR;
    const int r0 = (tid / CPR) * RPT;
    int kp[RPT], vp[RPT];
#pragma unroll
    for (int i = 0; i < RPT; i += 4) {
        *reinterpret_cast<int4*>(kp + i) = *reinterpret_cast<const int4*>(kpos + r0 + i);
        if (!SAME) *reinterpret_cast<int4*>(vp + i) = *reinterpret_cast<const int4*>(vpos + r0 + i);
    }
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
        const uint32_t o = swz128<kBN>(r0 + i, c);
        const long long ko = (long long)(kp[i] >= 0 ? kp[i] : 0) * D + c * 8;
        if (do_k) cp_async16(dK + o, kbase + ko, kp[i] >= 0);
        if (SAME) {
            if (do_v) cp_async16(dV + o, vbase + ko, kp[i] >= 0);
        } else if (do_v) {
            const long long vo = (long long)(vp[i] >= 0 ? vp[i] : 0) * D + c * 8;
            cp_async16(dV + o, vbase + vo, vp[i] >= 0);
        }
    }
}

#ifdef DHSA_WGMMA_ENABLED
// One consumer warpgroup's 64 query rows: the O accumulator, the online-softmax state and the two
// GEMMs. Thread layout of the wgmma fragments: warp w of the warpgroup holds rows 16w..16w+15,
// lane holds g = lane / 4 and g + 8, columns 2 tq, 2 tq + 1 of every n8 block (tq = lane % 4).
template <typename T, int D>
struct WgRows {
    static constexpr int NB = kBN / 8;   // n8 blocks of S
    static constexpr int KS = D / 16;    // k-steps of Q K^T
    static constexpr int PS = kBN / 16;  // k-steps of P V
    static constexpr int DB = D / 8;     // n8 blocks of O
    static constexpr int kTileKV = kBN * D * 2;

    float o[D / 2];
    float m_run[2], l_run[2];
    int qpos[2];
    int qmin, causal, tq, row0;
    float sl2;
    uint64_t dq0, dk0, dv0;

    // wg: warpgroup index among the consumers (its rows 64 wg ..), lt: thread index in it.
    __device__ __forceinline__ void init(const BsaArgs& a, const WgTile& t, int wg, int lt,
                                         uint32_t sQ, uint32_t sK0, uint32_t sV0) {
        const int lane = lt & 31;
        tq = lane & 3;
        row0 = wg * 64 + (lt >> 5) * 16 + (lane >> 2);
#pragma unroll
        for (int h = 0; h < 2; ++h) qpos[h] = t.qpos_offset + t.t0 + (row0 + 8 * h) % t.P;
        qmin = t.qpos_offset + t.t0;
        causal = a.causal;
        sl2 = a.scale_log2;
#pragma unroll
        for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            m_run[h] = -INFINITY;
            l_run[h] = 0.f;
        }
        dq0 = make_desc(sQ + wg * 64 * 128, 16, 1024);
        dk0 = make_desc(sK0, 16, 1024);
        dv0 = make_desc(sV0, kBN * 128, 1024);  // N-major V: 64-column blocks kBN * 128 bytes apart
    }
    // S = Q K^T of the K tile in stage st (issue only).
    __device__ __forceinline__ void gemm_s(float (&s)[kBN / 2], int st) const {
        const uint64_t dk = dk0 + (uint64_t)((st * kTileKV) >> 4);
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            const uint32_t qo = (ks >> 2) * (kBM * 128) + (ks & 3) * 32;
            const uint32_t ko = (ks >> 2) * (kBN * 128) + (ks & 3) * 32;
            Wg<T, kBN>::ss(s, dq0 + (qo >> 4), dk + (ko >> 4), ks > 0 ? 1 : 0);
        }
    }
    // O += P V of the V tile in stage st (issue only).
    __device__ __forceinline__ void gemm_pv(const uint32_t (&p)[PS][4], int st) {
        const uint64_t dv = dv0 + (uint64_t)((st * kTileKV) >> 4);
#pragma unroll
        for (int kk = 0; kk < PS; ++kk) Wg<T, D>::rs(o, p[kk], dv + (uint64_t)((kk * 16 * 128) >> 4));
    }
    // Mask (key positions pos[0..kBN)), online softmax of S in place -> probabilities; alpha = the
    // factor O must be rescaled by.
    __device__ __forceinline__ void softmax(float (&s)[kBN / 2], const int* pos, float (&alpha)[2]) {
        const int last = pos[kBN - 1];
        if (last < 0 || (causal && last > qmin)) {
#pragma unroll
            for (int n = 0; n < NB; ++n) {
                const int2 kp = *reinterpret_cast<const int2*>(pos + n * 8 + tq * 2);
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const bool ok0 = kp.x >= 0 && (!causal || kp.x <= qpos[h]);
                    const bool ok1 = kp.y >= 0 && (!causal || kp.y <= qpos[h]);
                    if (!ok0) s[4 * n + 2 * h] = -INFINITY;
                    if (!ok1) s[4 * n + 2 * h + 1] = -INFINITY;
                }
            }
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float mx = m_run[h];
#pragma unroll
            for (int n = 0; n < NB; ++n) mx = fmaxf(mx, fmaxf(s[4 * n + 2 * h], s[4 * n + 2 * h + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float ms = (mx == -INFINITY) ? 0.f : mx * sl2;
            alpha[h] = (mx == -INFINITY) ? 1.f : fast_exp2(m_run[h] * sl2 - ms);
            m_run[h] = mx;
            float sum = 0.f;
#pragma unroll
            for (int n = 0; n < NB; ++n) {
                const float p0 = fast_exp2(s[4 * n + 2 * h] * sl2 - ms);
                const float p1 = fast_exp2(s[4 * n + 2 * h + 1] * sl2 - ms);
                s[4 * n + 2 * h] = p0;
                s[4 * n + 2 * h + 1] = p1;
                sum += p0 + p1;
            }
            l_run[h] = l_run[h] * alpha[h] + sum;
        }
    }
    // O *= alpha (per row), then the probabilities -> A fragments of P V (k-step kk = keys
    // 16 kk .. 16 kk + 15 = n8 blocks 2 kk, 2 kk + 1 of S).
    __device__ __forceinline__ void rescale_pack(const float (&s)[kBN / 2], const float (&alpha)[2],
                                                 uint32_t (&p)[PS][4]) {
#pragma unroll
        for (int d = 0; d < DB; ++d) {
            o[4 * d] *= alpha[0];
            o[4 * d + 1] *= alpha[0];
            o[4 * d + 2] *= alpha[1];
            o[4 * d + 3] *= alpha[1];
        }
#pragma unroll
        for (int kk = 0; kk < PS; ++kk)
#pragma unroll
            for (int e = 0; e < 4; ++e) p[kk][e] = Mma<T>::pack(s[8 * kk + 2 * e], s[8 * kk + 2 * e + 1]);
    }
    // Normalize, stage the warp's 16 rows in its own (swizzled) Q rows, write them coalesced.
    __device__ __forceinline__ void store(const BsaArgs& a, const WgTile& t, unsigned char* gQ,
                                          int lane) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float l = l_run[h];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
            for (int d = 0; d < DB; ++d)
                *reinterpret_cast<uint32_t*>(gQ + swz128<kBM>(row0 + 8 * h, d) + tq * 4) =
                    Mma<T>::pack(o[4 * d + 2 * h] * inv, o[4 * d + 2 * h + 1] * inv);
        }
        __syncwarp();
        T* out = reinterpret_cast<T*>(a.out);
        const int wrow0 = row0 - (lane >> 2);
#pragma unroll
        for (int ci = lane; ci < 16 * (D / 8); ci += 32) {
            const int m = wrow0 + ci / (D / 8);
            const int c = ci % (D / 8);
            const int g = m / t.P;
            const int pp = m - g * t.P;
            if (g < a.head_group && pp < t.npos)
                *reinterpret_cast<uint4*>(out + (t.qrow0 + (long long)(t.h0 + g) * a.lq + t.t0 + pp) * D +
                                          c * 8) = *reinterpret_cast<const uint4*>(gQ + swz128<kBM>(m, c));
        }
    }
};
#endif  // DHSA_WGMMA_ENABLED

// ---------------------------------------------------------------------------------------------
// Variant "wgmma" (DHSA_VARIANT_WGMMA): warp-specialized. Warpgroup 0 is the producer: it computes
// the key positions of each tile and gathers the K/V rows with cp.async into a ring of 3 stages
// (full / empty mbarriers per stage). Warpgroups 1 and 2 are consumers (64 rows each): per tile j
// they issue S_j = Q K_j^T and O += P_{j-1} V_{j-1} together, run the softmax of S_j while the
// latter is in flight, and take turns issuing (ping-pong named barriers), so one warpgroup's
// softmax overlaps the other's GEMMs (FlashAttention-3's schedule).
// ---------------------------------------------------------------------------------------------

constexpr int kWsStages = 3;
constexpr int kWsThreads = 384;

// TMA (fixed chunks whose k_block is a multiple of 8 dividing kBN): one producer thread copies each
// k_block-row K / V block of a tile as D / 64 boxes of the tensor maps `tmk` / `tmv` ([B * Hkv, Lk,
// D], 128-byte swizzle: the layout the wgmma descriptors read) with bulk tensor copies that complete
// on the stage's full barrier; the producer keeps 24 registers and the consumers get 240. Otherwise
// (variable chunks, other k_block) the producer gathers rows with cp.async and the maps are unused.
template <typename T, int D, bool PINGPONG, bool VAR, bool TMA>
__global__ void __launch_bounds__(kWsThreads, 1)
    bsa_wgmma_ws_kernel(BsaArgs a, const __grid_constant__ CUtensorMap tmk,
                        const __grid_constant__ CUtensorMap tmv) {
    static_assert(!(TMA && VAR), "the TMA producer copies fixed k_block blocks");
#ifdef DHSA_WGMMA_ENABLED
    constexpr int S = kWsStages;
    constexpr int kProducerRegs = TMA ? 24 : 40;
    constexpr int kConsumerRegs = TMA ? 240 : 232;
    using M = WgRows<T, D>;
    using L = WgSmem<D, S>;
    // Static shared memory also marks the sm_90a build (host: sharedSizeBytes > 0).
    __shared__ __align__(16) int sPos[S * kBN];
    __shared__ __align__(8) uint64_t sBar[2 * S];  // full[s], empty[s]
    static_assert(L::kBytes + sizeof(sPos) + sizeof(sBar) <= 232448, "more shared memory than a block has");
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const L sm(smem_raw);
    const uint32_t sQ = sm.sQ, sK0 = sm.sK0, sV0 = sm.sV0;
    unsigned char* gQ = sm.gQ;
    const uint32_t full0 = smem_addr(sBar);
    const uint32_t empty0 = full0 + 8 * S;

    WgTile t;
    if (!wg_tile<D, VAR>(a, t)) return;
    const int tid = threadIdx.x;
    const int wg = tid >> 7;
    if (tid == 0) {
        for (int s = 0; s < S; ++s) {
            mbar_init(full0 + 8 * s, 128);   // the producer's threads
            mbar_init(empty0 + 8 * s, 256);  // the consumers' threads
        }
    }
    __syncthreads();

    if (wg == 0) {
        // ---- producer ----
        setmaxnreg_dec<kProducerRegs>();
        if constexpr (TMA) {
            if (tid == 0) {
                tma_prefetch_map(&tmk);
                tma_prefetch_map(&tmv);
            }
            const int blocks_per_tile = kBN / a.k_block;
            const int32_t* index = a.block_index + t.row_id * a.width;
            int cursor = 0;
            for (int j = 0; j < t.ntiles; ++j) {
                const int s = j % S;
                const uint32_t full = full0 + 8 * s;
                if (j >= S) mbar_wait(empty0 + 8 * s, ((j / S) - 1) & 1);
                sPos[s * kBN + tid] = wg_stream_key<false>(a, t, j * kBN + tid, cursor);
                if (tid == 0) {
                    mbar_arrive_expect_tx(full, 2u * L::kTileKV);
                    for (int b = 0; b < blocks_per_tile; ++b) {
                        const int i = j * blocks_per_tile + b;
                        const int row = i < t.cnt ? index[i] * a.k_block : a.lk;  // a.lk: zeros
#pragma unroll
                        for (int c = 0; c < D / 64; ++c) {
                            const uint32_t off = s * L::kTileKV + c * (kBN * 128) + b * a.k_block * 128;
                            tma_load_3d(sK0 + off, &tmk, c * 64, row, t.kv_head, full);
                            tma_load_3d(sV0 + off, &tmv, c * 64, row, t.kv_head, full);
                        }
                    }
                } else {
                    mbar_arrive(full);
                }
            }
            return;
        }
        const T* kbase = reinterpret_cast<const T*>(a.k) + t.kvoff;
        const T* vbase = reinterpret_cast<const T*>(a.v) + t.kvoff;
        int cursor = 0;
        for (int j = 0; j < t.ntiles; ++j) {
            const int s = j % S;
            // Tile j - 1 is published as soon as it has landed (visible to the tensor cores), before
            // waiting for a free stage: the consumers never wait for the issue of a later tile.
            if (j >= 1) {
                cp_async_wait<0>();
                fence_proxy_async();
                mbar_arrive(full0 + 8 * ((j - 1) % S));
            }
            if (j >= S) mbar_wait(empty0 + 8 * s, ((j / S) - 1) & 1);
            sPos[s * kBN + tid] = wg_stream_key<VAR>(a, t, j * kBN + tid, cursor);
            named_bar_sync(1, 128);
            wg_load_kv<T, D, 128, true>(kbase, sPos + s * kBN, sK0 + s * L::kTileKV, true, vbase,
                                        sPos + s * kBN, sV0 + s * L::kTileKV, true, tid);
            cp_async_commit();
        }
        if (t.ntiles > 0) {
            cp_async_wait<0>();
            fence_proxy_async();
            mbar_arrive(full0 + 8 * ((t.ntiles - 1) % S));
        }
    } else {
        // ---- consumers ----
        setmaxnreg_inc<kConsumerRegs>();
        const int c = wg - 1;
        const int lt = tid & 127;
        wg_load_q<T, D, 128>(a, t, sQ, c * 64, 64, lt);
        cp_async_commit();
        cp_async_wait<0>();
        fence_proxy_async();
        named_bar_sync(2 + c, 128);
        M rows;
        rows.init(a, t, c, lt, sQ, sK0, sV0);
        // Ping-pong: consumer c issues its GEMMs after bar_sync(4 + c), then lets the other go.
        const int my_bar = 4 + c, other_bar = 5 - c;
        if (PINGPONG && c == 1) named_bar_arrive(4, 256);  // consumer 0 goes first
        const int n = t.ntiles;
        if (n > 0) {
            uint32_t p[M::PS][4];
            {
                float s[kBN / 2];
                float alpha[2];
                mbar_wait(full0, 0);
                if (PINGPONG) named_bar_sync(my_bar, 256);
                wgmma_fence();
                rows.gemm_s(s, 0);
                wgmma_commit();
                if (PINGPONG) named_bar_arrive(other_bar, 256);
                wgmma_wait<0>();
                pin(s);
                rows.softmax(s, sPos, alpha);
                rows.rescale_pack(s, alpha, p);
            }
            for (int j = 1; j < n; ++j) {
                const int st = j % S;
                const int sp = (j - 1) % S;
                float s[kBN / 2];
                float alpha[2];
                mbar_wait(full0 + 8 * st, (j / S) & 1);
                if (PINGPONG) named_bar_sync(my_bar, 256);
                pin(p);
                pin(rows.o);
                wgmma_fence();
                rows.gemm_s(s, st);
                wgmma_commit();
                rows.gemm_pv(p, sp);
                wgmma_commit();
                if (PINGPONG) named_bar_arrive(other_bar, 256);
                wgmma_wait<1>();
                pin(s);
                rows.softmax(s, sPos + st * kBN, alpha);
                wgmma_wait<0>();
                pin(rows.o);
                pin(p);
                mbar_arrive(empty0 + 8 * sp);  // K and V of tile j - 1 are no longer read
                rows.rescale_pack(s, alpha, p);
            }
            if (PINGPONG) named_bar_sync(my_bar, 256);
            pin(p);
            pin(rows.o);
            wgmma_fence();
            rows.gemm_pv(p, (n - 1) % S);
            wgmma_commit();
            if (PINGPONG && c == 0) named_bar_arrive(other_bar, 256);  // consumer 1 issues last: no one waits
            wgmma_wait<0>();
            pin(rows.o);
            pin(p);
        } else if (PINGPONG && c == 0) {
            named_bar_sync(my_bar, 256);  // pairs with consumer 1's first arrive
        }
        rows.store(a, t, gQ, tid & 31);
    }
#else
    __trap();  // not built for sm_90a: the host never launches this (see dhsa_kernels.cu)
#endif
}

// ---------------------------------------------------------------------------------------------
// Variants "wgmma_overlap" / "wgmma_split" / "wgmma_serial": no producer, the two warpgroups gather
// the K/V tiles themselves (cp.async ring of STAGES, one __syncthreads per tile); OVERLAP issues S_j
// with P_{j-1} V_{j-1} (else S, softmax, P V one after the other); PINGPONG orders the two
// warpgroups' GEMM issue within a tile.
// ---------------------------------------------------------------------------------------------

template <typename T, int D, int STAGES, bool OVERLAP, bool PINGPONG, bool SPLIT, bool VAR>
__global__ void __launch_bounds__(256, 1) bsa_wgmma_kernel(BsaArgs a) {
#ifdef DHSA_WGMMA_ENABLED
    using M = WgRows<T, D>;
    using L = WgSmem<D, STAGES>;
    // Tiles loaded ahead of the one computed (KA for K, VA for V). Serial: STAGES - 1 for both.
    // OVERLAP: the V of tile j - 1 is still read while tile j is computed, so one stage fewer is
    // free (STAGES - 2); with SPLIT (3 stages) K is loaded two tiles ahead and V one: at the top of
    // tile j, K_{j+2} goes into the stage of K_{j-1} (its S GEMM is done) and V_{j+1} into that of
    // V_{j-2}; both are first read two tiles later.
    static_assert(!SPLIT || (OVERLAP && STAGES == 3), "SPLIT is the 3-stage overlapped schedule");
    constexpr int KA = SPLIT ? 2 : (OVERLAP ? STAGES - 2 : STAGES - 1);
    constexpr int VA = SPLIT ? 1 : KA;
    constexpr int RING = KA + 2;  // key-position slots
    static_assert(VA >= 1, "at least one tile must be loaded ahead");
    __shared__ __align__(16) int sPos[RING * kBN];  // also marks the sm_90a build (see above)
    static_assert(L::kBytes + sizeof(sPos) <= 232448, "more shared memory than an sm_90 block has");
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const L sm(smem_raw);
    const uint32_t sQ = sm.sQ, sK0 = sm.sK0, sV0 = sm.sV0;
    unsigned char* gQ = sm.gQ;

    WgTile t;
    if (!wg_tile<D, VAR>(a, t)) return;
    const int tid = threadIdx.x;
    const int wg = tid >> 7;
    const T* kbase = reinterpret_cast<const T*>(a.k) + t.kvoff;
    const T* vbase = reinterpret_cast<const T*>(a.v) + t.kvoff;
    const int ntiles = t.ntiles;

    wg_load_q<T, D, 256>(a, t, sQ, 0, kBM, tid);
    // Key positions of tile jj into sPos[jj % RING] (threads tid < kBN, one slot each).
    int cursor = 0;
    auto compute_pos = [&](int jj) {
        if (tid < kBN) sPos[(jj % RING) * kBN + tid] = wg_stream_key<VAR>(a, t, jj * kBN + tid, cursor);
    };
    // K of tile jk and V of tile jv (each only if it exists), as one cp.async group
    auto load_kv = [&](int jk, int jv) {
        wg_load_kv<T, D, 256, KA == VA>(kbase, sPos + (jk % RING) * kBN, sK0 + (jk % STAGES) * L::kTileKV,
                              jk < ntiles, vbase, sPos + (jv % RING) * kBN,
                              sV0 + (jv % STAGES) * L::kTileKV, jv < ntiles, tid);
        cp_async_commit();  // empty groups keep the count uniform
    };
    M rows;
    rows.init(a, t, wg, tid & 127, sQ, sK0, sV0);

    for (int jj = 0; jj <= KA; ++jj) compute_pos(jj);
    __syncthreads();
#pragma unroll
    for (int jj = 0; jj < KA; ++jj) load_kv(jj, jj < VA ? jj : ntiles);  // Q joins tile 0's group
    // Top of tile jj: K_jj and V_{jj-1} (V_jj without OVERLAP) have landed and are visible to the
    // tensor cores; every thread is done with the slots of the tiles loaded next, whose loads are
    // issued once this tile's GEMMs are (issue_loads).
    auto begin_tile = [&](int jj) {
        cp_async_wait<KA - 1>();
        fence_proxy_async();
        __syncthreads();
    };
    auto issue_loads = [&](int jj) { load_kv(jj + KA, jj + VA); };
    if constexpr (OVERLAP) {
        if (ntiles > 0) {
            uint32_t p[M::PS][4];
            {
                begin_tile(0);
                float s[kBN / 2];
                float alpha[2];
                wgmma_fence();
                rows.gemm_s(s, 0);
                wgmma_commit();
                issue_loads(0);
                wgmma_wait<0>();
                pin(s);
                rows.softmax(s, sPos, alpha);
                rows.rescale_pack(s, alpha, p);
                compute_pos(KA + 1);
            }
            for (int j = 1; j < ntiles; ++j) {
                begin_tile(j);
                float s[kBN / 2];
                float alpha[2];
                if (PINGPONG && wg == 1) named_bar_sync(1, 256);
                pin(p);
                pin(rows.o);
                wgmma_fence();
                rows.gemm_s(s, j % STAGES);
                wgmma_commit();
                rows.gemm_pv(p, (j - 1) % STAGES);
                wgmma_commit();
                if (PINGPONG && wg == 0) named_bar_arrive(1, 256);
                issue_loads(j);
                wgmma_wait<1>();
                pin(s);
                rows.softmax(s, sPos + (j % RING) * kBN, alpha);
                wgmma_wait<0>();
                pin(rows.o);
                pin(p);
                rows.rescale_pack(s, alpha, p);  // P is rewritten only once its P V is done
                compute_pos(j + KA + 1);
            }
            wgmma_fence();
            rows.gemm_pv(p, (ntiles - 1) % STAGES);
            wgmma_commit();
            wgmma_wait<0>();
            pin(rows.o);
            pin(p);
        }
    } else {
        for (int j = 0; j < ntiles; ++j) {
            begin_tile(j);
            float s[kBN / 2];
            uint32_t p[M::PS][4];
            float alpha[2];
            wgmma_fence();
            rows.gemm_s(s, j % STAGES);
            wgmma_commit();
            issue_loads(j);
            wgmma_wait<0>();
            pin(s);
            rows.softmax(s, sPos + (j % RING) * kBN, alpha);
            rows.rescale_pack(s, alpha, p);
            wgmma_fence();
            rows.gemm_pv(p, j % STAGES);
            wgmma_commit();
            wgmma_wait<0>();
            pin(rows.o);
            pin(p);
            compute_pos(j + KA + 1);
        }
    }
    cp_async_wait<0>();
    __syncthreads();
    rows.store(a, t, gQ, tid & 31);
#else
    __trap();  // not built for sm_90a: the host never launches this (see dhsa_kernels.cu)
#endif
}

}  // namespace sm90
}  // namespace dhsa
