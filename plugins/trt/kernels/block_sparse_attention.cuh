// Block-sparse flash attention forward (mma.sync m16n8k16, fp32 accumulation, online softmax).
//
// One CTA = one query tile of one routing head: rows = head_group heads x P query positions
// (P = min(q_block, BM / head_group)), so with group routing all query heads of a KV group share
// every K/V tile the CTA loads. The CTA walks the "key stream": the concatenation of the selected
// chunks of its query block, cut into tiles of BN keys that are gathered row by row into shared
// memory (cp.async, double-buffered). Positions of the keys of a tile are kept in shared memory so
// the causal mask is applied token by token; tiles wholly below the diagonal skip the mask.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace dhsa {

// ---------------------------------------------------------------------------------------------
// PTX helpers
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool pred) {
    const int size = pred ? 16 : 0;  // size 0: nothing read, 16 zero bytes written
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(size));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));  // ex2(-inf) = +0
    return y;
}

template <typename T>
struct Mma;

template <>
struct Mma<__nv_bfloat16> {
    __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    __device__ __forceinline__ static uint32_t pack(float x, float y) {
        __nv_bfloat162 v = __floats2bfloat162_rn(x, y);
        return *reinterpret_cast<uint32_t*>(&v);
    }
};

template <>
struct Mma<__half> {
    __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    __device__ __forceinline__ static uint32_t pack(float x, float y) {
        __half2 v = __floats2half2_rn(x, y);
        return *reinterpret_cast<uint32_t*>(&v);
    }
};

// Shared-memory tiles are rows of D elements in 16-byte chunks; chunk c of row r is stored at
// chunk c ^ (r & 7) so that ldmatrix's 8 rows of one chunk column hit 8 different bank groups.
template <int D>
__device__ __forceinline__ int swz(int row, int chunk) {
    return row * D + ((chunk ^ (row & 7)) << 3);
}

// ---------------------------------------------------------------------------------------------
// Kernel arguments (device side)
// ---------------------------------------------------------------------------------------------

struct BsaArgs {
    const void* q;
    const void* k;
    const void* v;
    void* out;
    const int32_t* block_index;        // [B, Hr, nQ, K]
    const int32_t* key_chunk_offsets;  // [B, nC + 1] or null
    int32_t* flag;                     // workspace: error flag
    int32_t* counts;                   // workspace: validated counts [B, Hr, nQ] (0 for bad rows)
    int32_t* stream_off;               // workspace (variable chunks): [B, Hr, nQ, K + 1]
    int32_t* chunk_start;              // workspace (variable chunks): [B, Hr, nQ, K]
    const int32_t* block_count;        // [B, Hr, nQ]
    int batch, hq, hkv, hr, lq, lk, width, nc, nq, q_block, k_block;
    int head_group;      // Hq / Hr
    int kv_ratio;        // Hq / Hkv
    int pos_per_tile;    // P
    int tiles_per_qblock;
    float scale_log2;    // scale * log2(e)
    int causal;
    int hoist_last;      // work order (see work_item): 1 = last query block of every head first
};

// The CTA's work item: query tile x of routing head r of sequence b, from a 1-D grid. Per (b, r) in
// turn, its query tiles from the last (heaviest under a causal mask) to the first: consecutive CTAs
// share a KV head, whose selected K/V blocks then stay in L2. With `hoist_last` (the host sets it
// when all K/V fit in L2, i.e. short sequences) the tiles of the LAST query block of every (b, r)
// come first: under vslash that block is dense, and with one head after another the last head's
// dense block started in the last waves and set the critical path (8K: -12 % with hoisting; at
// 32K, where K/V do not fit in L2, hoisting cost 6-9 % in locality, docs/GPU_NOTES.md v9).
__device__ __forceinline__ void work_item(const BsaArgs& a, int& x, int& r, int& b) {
    const int tpq = a.tiles_per_qblock;
    const int heads = a.hr * a.batch;
    const int gx = a.nq * tpq;
    const int item = (int)blockIdx.x;
    const int first = a.hoist_last ? heads * tpq : 0;  // hoisted items
    int rb;
    if (item < first) {
        rb = item / tpq;
        x = gx - 1 - (item - rb * tpq);
    } else {
        const int rest = a.hoist_last ? gx - tpq : gx;  // > 0 here
        const int i = item - first;
        rb = i / rest;
        x = rest - 1 - (i - rb * rest);
    }
    b = rb / a.hr;
    r = rb - b * a.hr;
}

// ---------------------------------------------------------------------------------------------
// Validation / planning kernel: one warp per (b, r, query block) row.
// ---------------------------------------------------------------------------------------------

__global__ void bsa_plan_kernel(BsaArgs a) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const long long nrows = (long long)a.batch * a.hr * a.nq;
    if (row >= nrows) return;
    const int b = (int)(row / ((long long)a.hr * a.nq));
    const int cnt = a.block_count[row];
    const bool var = a.key_chunk_offsets != nullptr;
    int bad = 0;
    if (cnt < 0 || cnt > a.width) {
        bad |= 1;
    } else {
        const int32_t* idx = a.block_index + row * (long long)a.width;
        const int32_t* off = var ? a.key_chunk_offsets + (long long)b * (a.nc + 1) : nullptr;
        int prev_c = -1;
        int prev_end = 0;
        int running = 0;
        for (int base = 0; base < cnt; base += 32) {
            const int i = base + lane;
            const bool act = i < cnt;
            const int c = act ? idx[i] : 0x7fffffff;
            const bool in_range = c >= 0 && c < a.nc;
            if (act && !in_range) bad |= 2;
            int cprev = __shfl_up_sync(0xffffffffu, c, 1);
            if (lane == 0) cprev = prev_c;
            if (act && c <= cprev) bad |= 4;
            if (var) {
                int st = 0, en = 0;
                if (act && in_range) {
                    st = off[c];
                    en = off[c + 1];
                    if (!(st >= 0 && st <= en && en <= a.lk)) {
                        bad |= 8;
                        st = en = 0;
                    }
                }
                int eprev = __shfl_up_sync(0xffffffffu, en, 1);
                if (lane == 0) eprev = prev_end;
                if (act && in_range && st < eprev) bad |= 8;
                int incl = en - st;
#pragma unroll
                for (int o = 1; o < 32; o <<= 1) {
                    const int y = __shfl_up_sync(0xffffffffu, incl, o);
                    if (lane >= o) incl += y;
                }
                if (act) {
                    a.stream_off[row * (long long)(a.width + 1) + i + 1] = running + incl;
                    a.chunk_start[row * (long long)a.width + i] = st;
                }
                running += __shfl_sync(0xffffffffu, incl, 31);
                prev_end = __shfl_sync(0xffffffffu, en, 31);
            }
            prev_c = __shfl_sync(0xffffffffu, c, 31);
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) bad |= __shfl_xor_sync(0xffffffffu, bad, o);
    if (lane == 0) {
        a.counts[row] = bad ? 0 : cnt;
        if (var) a.stream_off[row * (long long)(a.width + 1)] = 0;
        if (bad) atomicOr(a.flag, bad);
    }
}

// ---------------------------------------------------------------------------------------------
// Attention kernel
// ---------------------------------------------------------------------------------------------

template <int D, int WARPS, int MT>
struct BsaConfig {
    static constexpr int kWarps = WARPS;
    static constexpr int kThreads = WARPS * 32;
    static constexpr int kRowsPerWarp = 16 * MT;  // MT m16 tiles per warp share every K/V fragment
    static constexpr int BM = WARPS * kRowsPerWarp;
    static constexpr int BN = 64;
    static constexpr int kChunksPerRow = D / 8;
    static constexpr int kRowsPerPass = kThreads / kChunksPerRow;
    static constexpr int kPasses = BN / kRowsPerPass;
    static constexpr int kSmemQ = BM * D * 2;
    static constexpr int kSmemKV = BN * D * 2;
    static constexpr int kSmemBytes = kSmemQ + 4 * kSmemKV + 3 * BN * 4;
    static constexpr int kMinBlocks = (WARPS == 4) ? 2 : 1;
    static_assert(kThreads >= BN, "one thread per key row computes the key positions");
    static_assert(kThreads % kChunksPerRow == 0, "threads per row");
    static_assert(BN % kRowsPerPass == 0, "rows per pass");
};

template <typename T, int D, int WARPS, int MT, bool VAR>
__global__ void __launch_bounds__(WARPS * 32, BsaConfig<D, WARPS, MT>::kMinBlocks)
    bsa_fwd_kernel(BsaArgs a) {
    using C = BsaConfig<D, WARPS, MT>;
    constexpr int BM = C::BM;
    constexpr int BN = C::BN;
    constexpr int NT = BN / 8;   // n-tiles of S
    constexpr int KS = D / 16;   // k-steps of Q K^T
    constexpr int DT = D / 8;    // n-tiles of O
    constexpr int PS = BN / 16;  // k-steps of P V

    extern __shared__ __align__(128) unsigned char smem_raw[];
    T* sQ = reinterpret_cast<T*>(smem_raw);
    T* sK = reinterpret_cast<T*>(smem_raw + C::kSmemQ);                   // 2 stages
    T* sV = reinterpret_cast<T*>(smem_raw + C::kSmemQ + 2 * C::kSmemKV);  // 2 stages
    int* sPos = reinterpret_cast<int*>(smem_raw + C::kSmemQ + 4 * C::kSmemKV);  // [3][BN]

    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int warp_row0 = warp * C::kRowsPerWarp;

    int x, r, b;
    work_item(a, x, r, b);  // heavy (late, causal) query tiles first
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
    const long long qrow0 = (long long)b * a.hq * a.lq;  // row index of (b, head 0, t 0)
    const T* kbase = reinterpret_cast<const T*>(a.k) + ((long long)b * a.hkv + kvh) * a.lk * D;
    const T* vbase = reinterpret_cast<const T*>(a.v) + ((long long)b * a.hkv + kvh) * a.lk * D;
    const long long row_id = ((long long)b * a.hr + r) * a.nq + qb;
    const int cnt = a.counts[row_id];
    constexpr bool var = VAR;  // variable chunks (key_chunk_offsets) or fixed k_block chunks
    const int32_t* idx = a.block_index + row_id * a.width;
    const int32_t* soff = var ? a.stream_off + row_id * (a.width + 1) : nullptr;
    const int32_t* cst = var ? a.chunk_start + row_id * a.width : nullptr;
    const int total = var ? soff[cnt] : cnt * a.k_block;
    const int ntiles = (total + BN - 1) / BN;
    const int qpos_offset = a.lk - a.lq;
    const int qmin = qpos_offset + t0;

    // ---- Q tile -> shared memory (zero rows that are not real queries) ----
    {
        constexpr int kQChunks = BM * (D / 8);
        for (int ci = tid; ci < kQChunks; ci += C::kThreads) {
            const int m = ci / (D / 8);
            const int c = ci % (D / 8);
            const int g = m / P;
            const int p = m - g * P;
            const bool valid = g < a.head_group && p < npos;
            const T* src = reinterpret_cast<const T*>(a.q);
            if (valid) src += ((qrow0 + (long long)(h0 + g) * a.lq + t0 + p) * D + c * 8);
            cp_async16(smem_addr(sQ + swz<D>(m, c)), src, valid);
        }
    }

    // Key positions of tile jj (stream slots jj*BN .. jj*BN+BN-1) are computed one tile ahead by
    // threads tid < BN, one slot each, into sPos[jj % 3]; -1 marks a slot past the stream's end or
    // past Lk (tail of the short last fixed chunk). Variable chunks: a per-thread cursor walks the
    // stream offsets (monotone, as tiles advance).
    int cursor = 0;
    auto stream_pos = [&](int jj) -> int {
        const int s = jj * BN + tid;
        if (s >= total) return -1;
        if constexpr (VAR) {
            while (cursor + 1 < cnt && soff[cursor + 1] <= s) ++cursor;
            return cst[cursor] + (s - soff[cursor]);
        }
        const int i = s / a.k_block;
        const int kp = idx[i] * a.k_block + (s - i * a.k_block);
        return kp < a.lk ? kp : -1;
    };
    auto compute_pos = [&](int jj) {
        if (tid < BN) sPos[(jj % 3) * BN + tid] = stream_pos(jj);
    };

    auto load_tile = [&](int j, int stage) {
        const int c = tid % C::kChunksPerRow;
        T* dK = sK + stage * (BN * D);
        T* dV = sV + stage * (BN * D);
        const int* pos = sPos + (j % 3) * BN;
#pragma unroll
        for (int it = 0; it < C::kPasses; ++it) {
            const int row = it * C::kRowsPerPass + tid / C::kChunksPerRow;
            const int kp = pos[row];
            const bool valid = kp >= 0;
            const long long off = (long long)(valid ? kp : 0) * D + c * 8;
            cp_async16(smem_addr(dK + swz<D>(row, c)), kbase + off, valid);
            cp_async16(smem_addr(dV + swz<D>(row, c)), vbase + off, valid);
        }
    };

    // Query positions of this thread's rows (g and g + 8 of each of the warp's m16 tiles).
    const int g = lane >> 2;
    const int tq = lane & 3;
    int qpos[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int m = warp_row0 + mt * 16 + g + h * 8;
            qpos[mt][h] = qpos_offset + t0 + m % P;
        }

    float o[MT][DT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int d = 0; d < DT; ++d)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[mt][d][e] = 0.f;
    float m_run[MT][2], l_run[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            m_run[mt][h] = -INFINITY;
            l_run[mt][h] = 0.f;
        }

    compute_pos(0);
    compute_pos(1);
    __syncthreads();
    if (ntiles > 0) load_tile(0, 0);
    cp_async_commit();

    const uint32_t sQ_base = smem_addr(sQ);
    for (int j = 0; j < ntiles; ++j) {
        const int stage = j & 1;
        if (j + 1 < ntiles) {
            load_tile(j + 1, stage ^ 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();

        const uint32_t sK_base = smem_addr(sK + stage * (BN * D));
        const uint32_t sV_base = smem_addr(sV + stage * (BN * D));
        const int* pos = sPos + (j % 3) * BN;

        // ---- S = Q K^T (16*MT x BN per warp) ----
        float s[MT][NT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[mt][n][e] = 0.f;
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            uint32_t af[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const int row = warp_row0 + mt * 16 + (lane & 15);
                const int chunk = ks * 2 + (lane >> 4);
                ldmatrix_x4(af[mt], sQ_base + swz<D>(row, chunk) * 2);
            }
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                uint32_t bf[4];
                const int row = np * 16 + (lane & 7) + ((lane >> 4) << 3);
                const int chunk = ks * 2 + ((lane >> 3) & 1);
                ldmatrix_x4(bf, sK_base + swz<D>(row, chunk) * 2);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    Mma<T>::run(s[mt][2 * np], af[mt], bf[0], bf[1]);
                    Mma<T>::run(s[mt][2 * np + 1], af[mt], bf[2], bf[3]);
                }
            }
        }

        // ---- mask (only tiles that reach past the first query or hold padding) ----
        const int last = pos[BN - 1];
        const bool need_mask = last < 0 || (a.causal && last > qmin);
        if (need_mask) {
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                const int2 kp = *reinterpret_cast<const int2*>(pos + n * 8 + tq * 2);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const bool ok0 = kp.x >= 0 && (!a.causal || kp.x <= qpos[mt][h]);
                        const bool ok1 = kp.y >= 0 && (!a.causal || kp.y <= qpos[mt][h]);
                        if (!ok0) s[mt][n][2 * h] = -INFINITY;
                        if (!ok1) s[mt][n][2 * h + 1] = -INFINITY;
                    }
            }
        }

        // ---- online softmax ----
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float mx = m_run[mt][h];
#pragma unroll
                for (int n = 0; n < NT; ++n)
                    mx = fmaxf(mx, fmaxf(s[mt][n][2 * h], s[mt][n][2 * h + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float ms = (mx == -INFINITY) ? 0.f : mx * a.scale_log2;
                const float alpha =
                    (mx == -INFINITY) ? 1.f : fast_exp2(m_run[mt][h] * a.scale_log2 - ms);
                m_run[mt][h] = mx;
                float sum = 0.f;
#pragma unroll
                for (int n = 0; n < NT; ++n) {
                    const float p0 = fast_exp2(s[mt][n][2 * h] * a.scale_log2 - ms);
                    const float p1 = fast_exp2(s[mt][n][2 * h + 1] * a.scale_log2 - ms);
                    s[mt][n][2 * h] = p0;
                    s[mt][n][2 * h + 1] = p1;
                    sum += p0 + p1;
                }
                l_run[mt][h] = l_run[mt][h] * alpha + sum;
#pragma unroll
                for (int d = 0; d < DT; ++d) {
                    o[mt][d][2 * h] *= alpha;
                    o[mt][d][2 * h + 1] *= alpha;
                }
            }

        // ---- O += P V ----
#pragma unroll
        for (int kk = 0; kk < PS; ++kk) {
            uint32_t pf[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                pf[mt][0] = Mma<T>::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                pf[mt][1] = Mma<T>::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                pf[mt][2] = Mma<T>::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                pf[mt][3] = Mma<T>::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }
#pragma unroll
            for (int dp = 0; dp < DT / 2; ++dp) {
                uint32_t bf[4];
                const int row = kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
                const int chunk = dp * 2 + (lane >> 4);
                ldmatrix_x4_trans(bf, sV_base + swz<D>(row, chunk) * 2);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    Mma<T>::run(o[mt][2 * dp], pf[mt], bf[0], bf[1]);
                    Mma<T>::run(o[mt][2 * dp + 1], pf[mt], bf[2], bf[3]);
                }
            }
        }
        compute_pos(j + 2);  // sPos[(j + 2) % 3] was last read in iteration j - 1
        __syncthreads();
    }
    cp_async_wait<0>();
    __syncthreads();

    // ---- epilogue: normalize, stage the warp's rows in its own Q rows, write coalesced ----
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float l = l_run[mt][h];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            const float inv = l > 0.f ? 1.f / l : 0.f;
            const int row = warp_row0 + mt * 16 + g + h * 8;
#pragma unroll
            for (int d = 0; d < DT; ++d) {
                const uint32_t packed =
                    Mma<T>::pack(o[mt][d][2 * h] * inv, o[mt][d][2 * h + 1] * inv);
                // chunk d holds columns d*8..d*8+7; this thread's pair starts at column tq*2.
                *reinterpret_cast<uint32_t*>(sQ + swz<D>(row, d) + tq * 2) = packed;
            }
        }
    __syncwarp();
    T* out = reinterpret_cast<T*>(a.out);
    constexpr int kOutChunks = C::kRowsPerWarp * (D / 8);
#pragma unroll
    for (int ci = lane; ci < kOutChunks; ci += 32) {
        const int m = warp_row0 + ci / (D / 8);
        const int c = ci % (D / 8);
        const int gg = m / P;
        const int p = m - gg * P;
        if (gg < a.head_group && p < npos) {
            const uint4 val = *reinterpret_cast<const uint4*>(sQ + swz<D>(m, c));
            *reinterpret_cast<uint4*>(out + (qrow0 + (long long)(h0 + gg) * a.lq + t0 + p) * D +
                                      c * 8) = val;
        }
    }
}

}  // namespace dhsa
