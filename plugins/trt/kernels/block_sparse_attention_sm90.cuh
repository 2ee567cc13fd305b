// Block-sparse flash attention forward for Hopper (sm_90a): warpgroup MMA (wgmma.mma_async).
//
// Same contract and CTA decomposition as block_sparse_attention.cuh (one CTA = one 128-row query
// tile of a routing head, rows = head_group heads x P positions; the key stream of the query block
// is gathered BN keys at a time), but the two GEMMs run on the tensor cores' warpgroup path:
//   - 2 consumer warpgroups (256 threads), warpgroup w owns rows 64w..64w+63 (wgmma M = 64);
//   - Q and the gathered K/V tiles live in shared memory in the 128-byte swizzled layout that the
//     wgmma matrix descriptors read: a tile of R rows x D columns is stored as D/64 column blocks,
//     each R rows x 128 bytes, with the 16-byte chunk c of row r at chunk c ^ (r & 7);
//   - S = Q K^T: A (Q) and B (K, K-major) from shared memory; O += P V: A (P) from registers, B (V,
//     rows = keys, D contiguous) from shared memory with the transpose bit (N-major);
//   - K/V rows are gathered with cp.async (16 bytes) into a ring of STAGES buffers; the key
//     positions of a tile are computed ahead into shared memory (as in the mma.sync kernel);
//   - OVERLAP: the S GEMM of tile j is issued together with the P V GEMM of tile j - 1 and the
//     softmax of tile j runs while the latter is in flight (FlashAttention-3's intra-warpgroup
//     pipelining).
// Only sm_90a device code contains the kernel body; other targets compile a stub that traps, and the
// host never launches it there (dhsa_kernels.cu checks the device and the kernel's attributes).
#pragma once

#include "block_sparse_attention.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DHSA_WGMMA_ENABLED 1
#endif

namespace dhsa {
namespace sm90 {

#ifdef DHSA_WGMMA_ENABLED
__device__ __forceinline__ void wgmma_ss_m64n64_bf16(float (&d)[32], uint64_t da, uint64_t db, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "%32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(acc));
}
__device__ __forceinline__ void wgmma_rs_m64n64_bf16(float (&d)[32], const uint32_t (&a)[4], uint64_t db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "{%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}
__device__ __forceinline__ void wgmma_ss_m64n64_f16(float (&d)[32], uint64_t da, uint64_t db, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "%32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(acc));
}
__device__ __forceinline__ void wgmma_rs_m64n64_f16(float (&d)[32], const uint32_t (&a)[4], uint64_t db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "{%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}
__device__ __forceinline__ void wgmma_ss_m64n128_bf16(float (&d)[64], uint64_t da, uint64_t db, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(acc));
}
__device__ __forceinline__ void wgmma_rs_m64n128_bf16(float (&d)[64], const uint32_t (&a)[4], uint64_t db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}
__device__ __forceinline__ void wgmma_ss_m64n128_f16(float (&d)[64], uint64_t da, uint64_t db, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(acc));
}
__device__ __forceinline__ void wgmma_rs_m64n128_f16(float (&d)[64], const uint32_t (&a)[4], uint64_t db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}

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
#endif  // DHSA_WGMMA_ENABLED

template <typename T, int N>
struct Wg;
#ifdef DHSA_WGMMA_ENABLED
template <>
struct Wg<__nv_bfloat16, 64> {
    __device__ __forceinline__ static void ss(float (&d)[32], uint64_t a, uint64_t b, int acc) {
        wgmma_ss_m64n64_bf16(d, a, b, acc);
    }
    __device__ __forceinline__ static void rs(float (&d)[32], const uint32_t (&a)[4], uint64_t b) {
        wgmma_rs_m64n64_bf16(d, a, b);
    }
};
template <>
struct Wg<__nv_bfloat16, 128> {
    __device__ __forceinline__ static void ss(float (&d)[64], uint64_t a, uint64_t b, int acc) {
        wgmma_ss_m64n128_bf16(d, a, b, acc);
    }
    __device__ __forceinline__ static void rs(float (&d)[64], const uint32_t (&a)[4], uint64_t b) {
        wgmma_rs_m64n128_bf16(d, a, b);
    }
};
template <>
struct Wg<__half, 64> {
    __device__ __forceinline__ static void ss(float (&d)[32], uint64_t a, uint64_t b, int acc) {
        wgmma_ss_m64n64_f16(d, a, b, acc);
    }
    __device__ __forceinline__ static void rs(float (&d)[32], const uint32_t (&a)[4], uint64_t b) {
        wgmma_rs_m64n64_f16(d, a, b);
    }
};
template <>
struct Wg<__half, 128> {
    __device__ __forceinline__ static void ss(float (&d)[64], uint64_t a, uint64_t b, int acc) {
        wgmma_ss_m64n128_f16(d, a, b, acc);
    }
    __device__ __forceinline__ static void rs(float (&d)[64], const uint32_t (&a)[4], uint64_t b) {
        wgmma_rs_m64n128_f16(d, a, b);
    }
};

// Shared-memory matrix descriptor, 128-byte swizzle: start address, leading / stride byte offsets.
__device__ __forceinline__ uint64_t make_desc(uint32_t saddr, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((saddr & 0x3FFFFu) >> 4) | ((uint64_t)((lbo >> 4) & 0x3FFFu) << 16) |
           ((uint64_t)((sbo >> 4) & 0x3FFFu) << 32) | (1ull << 62);
}
#endif  // DHSA_WGMMA_ENABLED

// Byte offset of 16-byte chunk `chunk` (D / 8 per row) of row `row` in a swizzled tile of R rows.
template <int R>
__device__ __forceinline__ uint32_t swz128(int row, int chunk) {
    return (uint32_t)((chunk >> 3) * (R * 128) + row * 128 + (((chunk & 7) ^ (row & 7)) << 4));
}

template <int D, int STAGES, bool OVERLAP>
struct WgConfig {
    static constexpr int kThreads = 256;  // 2 warpgroups x 64 rows
    static constexpr int BM = 128;
    static constexpr int BN = 128;
    // tiles loaded ahead of the one being computed: with OVERLAP the V of tile j - 1 is still read
    // while tile j is computed, so one stage fewer is free for loads.
    static constexpr int kLookahead = OVERLAP ? STAGES - 2 : STAGES - 1;
    static constexpr int kPosRing = kLookahead + 2;  // key-position slots (static shared memory)
    static constexpr int kTileQ = BM * D * 2;
    static constexpr int kTileKV = BN * D * 2;
    // + slack to align the dynamic buffer to 1024 bytes (the swizzle atom); its base is 16-aligned
    static constexpr int kSmemBytes = 1008 + kTileQ + 2 * STAGES * kTileKV;
    static constexpr int kStaticSmemBytes = kPosRing * BN * 4;
    static_assert(kLookahead >= 1, "at least one tile must be loaded ahead");
    static_assert(kSmemBytes + kStaticSmemBytes <= 232448, "more shared memory than an sm_90 block has");
};

template <typename T, int D, int STAGES, bool OVERLAP, bool VAR>
__global__ void __launch_bounds__(256, 1) bsa_wgmma_kernel(BsaArgs a) {
#ifdef DHSA_WGMMA_ENABLED
    using C = WgConfig<D, STAGES, OVERLAP>;
    constexpr int BM = C::BM;
    constexpr int BN = C::BN;
    constexpr int NB = BN / 8;   // n8 blocks of S
    constexpr int KS = D / 16;   // k-steps of Q K^T
    constexpr int PS = BN / 16;  // k-steps of P V
    constexpr int DB = D / 8;    // n8 blocks of O
    constexpr int LA = C::kLookahead;
    constexpr int RING = C::kPosRing;

    __shared__ int sPos[RING * BN];  // also marks the sm_90a build (host: sharedSizeBytes > 0)
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const uint32_t raw = smem_addr(smem_raw);
    const uint32_t base = (raw + 1023u) & ~1023u;
    unsigned char* gbase = smem_raw + (base - raw);
    const uint32_t sQ = base;
    const uint32_t sK0 = base + C::kTileQ;
    const uint32_t sV0 = sK0 + STAGES * C::kTileKV;

    const int tid = threadIdx.x;
    const int wg = tid >> 7;
    const int warp = tid >> 5;
    const int lane = tid & 31;

    const int x = gridDim.x - 1 - blockIdx.x;  // heavy (late, causal) query blocks first
    const int r = blockIdx.y;
    const int b = blockIdx.z;
    const int qb = x / a.tiles_per_qblock;
    const int tt = x - qb * a.tiles_per_qblock;
    const int t0 = qb * a.q_block + tt * a.pos_per_tile;
    int t_end = min(t0 + a.pos_per_tile, (qb + 1) * a.q_block);
    t_end = min(t_end, a.lq);
    const int npos = t_end - t0;
    if (npos <= 0) return;

    const int P = a.pos_per_tile;
    const int h0 = r * a.head_group;
    const int kvh = h0 / a.kv_ratio;
    const long long qrow0 = (long long)b * a.hq * a.lq;
    const T* kbase = reinterpret_cast<const T*>(a.k) + ((long long)b * a.hkv + kvh) * a.lk * D;
    const T* vbase = reinterpret_cast<const T*>(a.v) + ((long long)b * a.hkv + kvh) * a.lk * D;
    const long long row_id = ((long long)b * a.hr + r) * a.nq + qb;
    const int cnt = a.counts[row_id];
    const int32_t* idx = a.block_index + row_id * a.width;
    const int32_t* soff = VAR ? a.stream_off + row_id * (a.width + 1) : nullptr;
    const int32_t* cst = VAR ? a.chunk_start + row_id * a.width : nullptr;
    const int total = VAR ? soff[cnt] : cnt * a.k_block;
    const int ntiles = (total + BN - 1) / BN;
    const int qpos_offset = a.lk - a.lq;
    const int qmin = qpos_offset + t0;

    // ---- Q tile (zero rows that are not real queries) ----
    for (int ci = tid; ci < BM * (D / 8); ci += C::kThreads) {
        const int m = ci / (D / 8);
        const int c = ci % (D / 8);
        const int g = m / P;
        const int p = m - g * P;
        const bool valid = g < a.head_group && p < npos;
        const T* src = reinterpret_cast<const T*>(a.q);
        if (valid) src += (qrow0 + (long long)(h0 + g) * a.lq + t0 + p) * D + c * 8;
        cp_async16(sQ + swz128<BM>(m, c), src, valid);
    }

    // Key positions of tile jj into sPos[jj % RING] (threads tid < BN, one slot each); -1 = none.
    int cursor = 0;
    auto compute_pos = [&](int jj) {
        if (tid >= BN) return;
        const int s = jj * BN + tid;
        int kp = -1;
        if (s < total) {
            if constexpr (VAR) {
                while (cursor + 1 < cnt && soff[cursor + 1] <= s) ++cursor;
                kp = cst[cursor] + (s - soff[cursor]);
            } else {
                const int i = s / a.k_block;
                kp = idx[i] * a.k_block + (s - i * a.k_block);
                if (kp >= a.lk) kp = -1;
            }
        }
        sPos[(jj % RING) * BN + tid] = kp;
    };
    auto load_tile = [&](int jj) {
        constexpr int CPR = D / 8;
        constexpr int RPP = C::kThreads / CPR;
        const int st = jj % STAGES;
        const int c = tid % CPR;
        const int* pos = sPos + (jj % RING) * BN;
        const uint32_t dK = sK0 + st * C::kTileKV;
        const uint32_t dV = sV0 + st * C::kTileKV;
#pragma unroll
        for (int it = 0; it < BN / RPP; ++it) {
            const int row = it * RPP + tid / CPR;
            const int kp = pos[row];
            const bool valid = kp >= 0;
            const long long off = (long long)(valid ? kp : 0) * D + c * 8;
            const uint32_t o = swz128<BN>(row, c);
            cp_async16(dK + o, kbase + off, valid);
            cp_async16(dV + o, vbase + off, valid);
        }
    };

    // This thread's two rows: warp (within its warpgroup) w holds rows 16w..16w+15 of the
    // warpgroup's 64, lane holds g and g + 8; its columns in each n8 block are 2 tq, 2 tq + 1.
    const int g = lane >> 2;
    const int tq = lane & 3;
    const int row0 = wg * 64 + (warp & 3) * 16 + g;
    int qpos[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) qpos[h] = qpos_offset + t0 + (row0 + 8 * h) % P;

    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    float m_run[2] = {-INFINITY, -INFINITY};
    float l_run[2] = {0.f, 0.f};

    // Descriptors (start address advanced per k-step): Q rows of this warpgroup, K / V of stage 0.
    const uint64_t dq0 = make_desc(sQ + wg * 64 * 128, 16, 1024);
    const uint64_t dk0 = make_desc(sK0, 16, 1024);
    const uint64_t dv0 = make_desc(sV0, BN * 128, 1024);

    auto gemm_s = [&](float (&s)[BN / 2], int jj) {
        const uint64_t dk = dk0 + (uint64_t)(((jj % STAGES) * C::kTileKV) >> 4);
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            const uint32_t qo = (ks >> 2) * (BM * 128) + (ks & 3) * 32;
            const uint32_t ko = (ks >> 2) * (BN * 128) + (ks & 3) * 32;
            Wg<T, BN>::ss(s, dq0 + (qo >> 4), dk + (ko >> 4), ks > 0 ? 1 : 0);
        }
    };
    auto gemm_pv = [&](const uint32_t (&p)[PS][4], int jj) {
        const uint64_t dv = dv0 + (uint64_t)(((jj % STAGES) * C::kTileKV) >> 4);
#pragma unroll
        for (int kk = 0; kk < PS; ++kk) Wg<T, D>::rs(o, p[kk], dv + (uint64_t)((kk * 16 * 128) >> 4));
    };
    // Mask, online softmax of S (tile jj) -> P (packed A fragments), alpha = rescale of O.
    auto softmax = [&](float (&s)[BN / 2], int jj, uint32_t (&p)[PS][4], float (&alpha)[2]) {
        const int* pos = sPos + (jj % RING) * BN;
        const int last = pos[BN - 1];
        if (last < 0 || (a.causal && last > qmin)) {
#pragma unroll
            for (int n = 0; n < NB; ++n) {
                const int2 kp = *reinterpret_cast<const int2*>(pos + n * 8 + tq * 2);
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const bool ok0 = kp.x >= 0 && (!a.causal || kp.x <= qpos[h]);
                    const bool ok1 = kp.y >= 0 && (!a.causal || kp.y <= qpos[h]);
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
            const float ms = (mx == -INFINITY) ? 0.f : mx * a.scale_log2;
            alpha[h] = (mx == -INFINITY) ? 1.f : fast_exp2(m_run[h] * a.scale_log2 - ms);
            m_run[h] = mx;
            float sum = 0.f;
#pragma unroll
            for (int n = 0; n < NB; ++n) {
                const float p0 = fast_exp2(s[4 * n + 2 * h] * a.scale_log2 - ms);
                const float p1 = fast_exp2(s[4 * n + 2 * h + 1] * a.scale_log2 - ms);
                s[4 * n + 2 * h] = p0;
                s[4 * n + 2 * h + 1] = p1;
                sum += p0 + p1;
            }
            l_run[h] = l_run[h] * alpha[h] + sum;
        }
#pragma unroll
        for (int kk = 0; kk < PS; ++kk)
#pragma unroll
            for (int e = 0; e < 4; ++e) p[kk][e] = Mma<T>::pack(s[8 * kk + 2 * e], s[8 * kk + 2 * e + 1]);
    };
    auto rescale = [&](const float (&alpha)[2]) {
#pragma unroll
        for (int d = 0; d < DB; ++d) {
            o[4 * d] *= alpha[0];
            o[4 * d + 1] *= alpha[0];
            o[4 * d + 2] *= alpha[1];
            o[4 * d + 3] *= alpha[1];
        }
    };

    for (int jj = 0; jj <= LA; ++jj) compute_pos(jj);
    __syncthreads();
#pragma unroll
    for (int jj = 0; jj < LA; ++jj) {
        if (jj < ntiles) load_tile(jj);
        cp_async_commit();  // Q joins tile 0's group; empty groups keep the count uniform
    }

    // Top of tile jj: its K/V have landed and are visible to the tensor cores; every thread is done
    // with tile jj - 1's slots, so tile jj + LA is loaded into the stage that held tile jj - 1
    // (jj - 2 with OVERLAP: V of jj - 1 is still read).
    auto begin_tile = [&](int jj) {
        cp_async_wait<LA - 1>();
        fence_proxy_async();
        __syncthreads();
        if (jj + LA < ntiles) load_tile(jj + LA);
        cp_async_commit();
    };
    if constexpr (OVERLAP) {
        // Straight-line issue/wait pairs (no branch between a wgmma and its wait) keep ptxas from
        // serializing the asynchronous MMAs (C7514).
        if (ntiles > 0) {
            uint32_t p[PS][4];
            {
                begin_tile(0);
                float s[BN / 2];
                float alpha[2];
                wgmma_fence();
                gemm_s(s, 0);
                wgmma_commit();
                wgmma_wait<0>();
                pin(s);
                softmax(s, 0, p, alpha);  // O is still 0: no rescale
                compute_pos(LA + 1);
            }
            // Tile j: S_j = Q K_j^T and O += P_{j-1} V_{j-1} in flight together, softmax of S_j
            // into the other P buffer meanwhile. Two P buffers used alternately (the loop is
            // unrolled by two): with one buffer and a copy, ptxas lets the new P share the
            // registers of the in-flight one and then serializes the wgmmas (C7513).
            auto step = [&](int j, uint32_t (&pc)[PS][4], uint32_t (&pn)[PS][4]) {
                begin_tile(j);
                float s[BN / 2];
                float alpha[2];
                pin(pc);
                pin(o);
                wgmma_fence();
                gemm_s(s, j);
                wgmma_commit();
                gemm_pv(pc, j - 1);
                wgmma_commit();
                wgmma_wait<1>();
                pin(s);
                softmax(s, j, pn, alpha);
                wgmma_wait<0>();
                pin(o);
                pin(pc);
                rescale(alpha);
                compute_pos(j + LA + 1);
            };
            auto last_pv = [&](uint32_t (&pc)[PS][4]) {
                wgmma_fence();
                gemm_pv(pc, ntiles - 1);
                wgmma_commit();
                wgmma_wait<0>();
                pin(o);
                pin(pc);
            };
            uint32_t p2[PS][4];
            int j = 1;
            for (; j + 1 < ntiles; j += 2) {
                step(j, p, p2);
                step(j + 1, p2, p);
            }
            if (j < ntiles) {
                step(j, p, p2);
                last_pv(p2);
            } else {
                last_pv(p);
            }
        }
    } else {
        for (int j = 0; j < ntiles; ++j) {
            begin_tile(j);
            float s[BN / 2];
            uint32_t p[PS][4];
            float alpha[2];
            wgmma_fence();
            gemm_s(s, j);
            wgmma_commit();
            wgmma_wait<0>();
            pin(s);
            softmax(s, j, p, alpha);
            rescale(alpha);
            wgmma_fence();
            gemm_pv(p, j);
            wgmma_commit();
            wgmma_wait<0>();
            pin(o);
            pin(p);
            compute_pos(j + LA + 1);
        }
    }
    cp_async_wait<0>();
    __syncthreads();

    // ---- epilogue: normalize, stage the warp's rows in its own Q rows, write coalesced ----
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float l = l_run[h];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const float inv = l > 0.f ? 1.f / l : 0.f;
        const int row = row0 + 8 * h;
#pragma unroll
        for (int d = 0; d < DB; ++d) {
            const uint32_t packed = Mma<T>::pack(o[4 * d + 2 * h] * inv, o[4 * d + 2 * h + 1] * inv);
            *reinterpret_cast<uint32_t*>(gbase + swz128<BM>(row, d) + tq * 4) = packed;
        }
    }
    __syncwarp();
    T* out = reinterpret_cast<T*>(a.out);
    const int warp_row0 = wg * 64 + (warp & 3) * 16;
#pragma unroll
    for (int ci = lane; ci < 16 * (D / 8); ci += 32) {
        const int m = warp_row0 + ci / (D / 8);
        const int c = ci % (D / 8);
        const int gg = m / P;
        const int pp = m - gg * P;
        if (gg < a.head_group && pp < npos) {
            const uint4 val = *reinterpret_cast<const uint4*>(gbase + swz128<BM>(m, c));
            *reinterpret_cast<uint4*>(out + (qrow0 + (long long)(h0 + gg) * a.lq + t0 + pp) * D +
                                      c * 8) = val;
        }
    }
#else
    __trap();  // not built for sm_90a: the host never launches this (see dhsa_kernels.cu)
#endif
}

}  // namespace sm90
}  // namespace dhsa
