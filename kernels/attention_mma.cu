// attention_mma.cu: causal attention on the tensor cores, forward and backward, head sizes 32
// and 64 (every preset's). src/backend/cuda/attention.rs picks these kernels when the head size
// fits and the plain CUDA-core kernels of attention.cu otherwise; both implement the same
// Backend::attention_forward / attention_backward (twin: src/backend/cpu/attention.rs).
//
// Layout: qkv [B, T, 3C] bf16 (q | k | v per position, head h owns columns h*HS .. (h+1)*HS),
// out and dout [B, T, C] bf16, lse [B, NH, T] fp32 (natural log). `starts` (nullable, [B*T]
// int32, nondecreasing along a row) restricts query i to keys starts[i] <= j <= i, so packed
// examples never see each other; null means plain causal.
//
// Scheme (FlashAttention-2, Dao 2023): a block of 4 warps owns 64 rows; each warp owns 16 and
// holds them as mma.sync m16n8k16 fragments (bf16 operands, fp32 accumulators). Tiles of 64
// keys (or queries) are staged in shared memory, rows padded by 8 elements so the fragment
// loads hit 32 distinct banks. Scores live in registers; softmax runs online in base 2.
//   forward: S = Q K^T, running max and sum, O += P V; saves lse.
//   backward: prep D_i = dout_i . out_i; dq kernel (one block per query tile, loops over key
//   tiles): S, P = exp(S - lse), dP = dout V^T, dS = P (dP - D), dq += scale dS K;
//   dkv kernel (one block per key tile, loops over query tiles): S^T, P^T, dv += P^T dout,
//   dP^T = V dout^T, dS^T, dk += scale dS^T Q. No float atomics: every output element is
//   written by one thread, so results are deterministic.
//
// Napkin math (gpt2-124m: B=64, NH=12, T=1024, HS=64): forward 2 products x 2*B*NH*T^2*HS / 2
// (causal) = 103 GFLOP; backward recomputes S twice and does 5 more products: ~360 GFLOP.
// At ~500 TFLOP/s for mma.sync that is ~0.2 ms forward, ~0.7 ms backward; bytes are small
// (qkv 302 MB read, out 101 MB written), so the floor is the tensor cores and the
// shared-memory fragment loads, not DRAM.
#include <stdint.h>

#include "common.cuh"

#define MMA_ROWS 64     // rows a block owns: 4 warps x 16
#define MMA_TILE 64     // keys (forward, dq) or queries (dkv) per inner-loop tile
#define MMA_THREADS 128
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

// d += a b for one m16n8k16 tile: a row-major 16x16 bf16, b column-major 16x8 bf16, d fp32.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as a bf16 pair, `lo` in the low half (the lower column of a fragment).
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// Two adjacent bf16 of a row (4-byte aligned).
__device__ __forceinline__ uint32_t ld_pair(const __nv_bfloat16* p) {
    return *reinterpret_cast<const uint32_t*>(p);
}

// The same column of two consecutive rows, `ld` apart: a B fragment read down a row-major tile.
__device__ __forceinline__ uint32_t ld_col_pair(const __nv_bfloat16* p, int ld) {
    const uint32_t lo = *reinterpret_cast<const uint16_t*>(p);
    const uint32_t hi = *reinterpret_cast<const uint16_t*>(p + ld);
    return lo | (hi << 16);
}

// Four 8x8 bf16 matrices from shared memory in one instruction: lanes 8m .. 8m+7 give the row
// addresses (16 bytes each) of matrix m; lane l receives in x[m] row l/4, columns 2(l%4) and
// 2(l%4)+1 of matrix m, or with `.trans` column l/4, rows 2(l%4) and 2(l%4)+1.
__device__ __forceinline__ void ldsm_x4(uint32_t (&x)[4], const __nv_bfloat16* row) {
    const uint32_t at = (uint32_t)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(x[0]), "=r"(x[1]), "=r"(x[2]), "=r"(x[3])
                 : "r"(at)
                 : "memory");
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&x)[4], const __nv_bfloat16* row) {
    const uint32_t at = (uint32_t)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(x[0]), "=r"(x[1]), "=r"(x[2]), "=r"(x[3])
                 : "r"(at)
                 : "memory");
}

// The A fragment of tile rows rb .. rb+15 and columns k0 .. k0+15 of a row-major tile (ld
// elements per row). LDSM: one ldmatrix (matrices: rows rb.., rb+8.. x columns k0.., k0+8..);
// otherwise four 4-byte loads (g = lane/4, tq = lane%4).
template <bool LDSM>
__device__ __forceinline__ void ld_a_frag(uint32_t (&a)[4], const __nv_bfloat16* tile, int ld,
                                          int rb, int k0, int lane) {
    if (LDSM) {
        ldsm_x4(a, tile + (rb + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + k0 + (lane >> 4) * 8);
    } else {
        const int r = rb + (lane >> 2), tq = lane & 3;
        a[0] = ld_pair(tile + r * ld + k0 + 2 * tq);
        a[1] = ld_pair(tile + (r + 8) * ld + k0 + 2 * tq);
        a[2] = ld_pair(tile + r * ld + k0 + 8 + 2 * tq);
        a[3] = ld_pair(tile + (r + 8) * ld + k0 + 8 + 2 * tq);
    }
}

// Accumulator tiles s[2kk], s[2kk+1] (16 rows x 16 columns) as the A fragment of the next product.
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&s)[MMA_TILE / 8][4],
                                         int kk) {
    a[0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
    a[1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
    a[2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    a[3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

// Copies rows row0 .. row0+63 of an [T, stride] bf16 tensor (HS columns from `src`) into a
// shared tile with HS+8 elements per row; rows at or past T become zero. 16-byte accesses.
template <int HS>
__device__ __forceinline__ void load_tile(__nv_bfloat16* tile, const __nv_bfloat16* src,
                                          size_t stride, int row0, int t) {
    constexpr int CHUNKS = HS / 8;
    for (int idx = threadIdx.x; idx < MMA_TILE * CHUNKS; idx += MMA_THREADS) {
        const int r = idx / CHUNKS, ch = idx % CHUNKS;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (row0 + r < t) {
            v = *reinterpret_cast<const uint4*>(src + (size_t)(row0 + r) * stride + ch * 8);
        }
        *reinterpret_cast<uint4*>(tile + r * (HS + 8) + ch * 8) = v;
    }
}

// S = A B^T for a warp's 16 rows (tile rows rb ..) against 64 tile rows: A from `a_tile`, B
// from `b_tile` (row-major [64][HS]: each row is one column of B^T, so B[k][n] = b_tile[n][k]).
template <int HS, bool LDSM>
__device__ __forceinline__ void scores(float (&s)[MMA_TILE / 8][4], const __nv_bfloat16* a_tile,
                                       const __nv_bfloat16* b_tile, int rb, int lane) {
    constexpr int LD = HS + 8;
    const int g = lane >> 2, tq = lane & 3;
#pragma unroll
    for (int nt = 0; nt < MMA_TILE / 8; nt++) {
#pragma unroll
        for (int e = 0; e < 4; e++) s[nt][e] = 0.0f;
    }
#pragma unroll
    for (int k0 = 0; k0 < HS; k0 += 16) {
        uint32_t a[4];
        ld_a_frag<LDSM>(a, a_tile, LD, rb, k0, lane);
#pragma unroll
        for (int nt = 0; nt < MMA_TILE / 8; nt += 2) {
            if (LDSM) {
                // Matrices: rows nt*8.. and nt*8+8.. x columns k0.. and k0+8..:
                // b0, b1 of n-tile nt, then b0, b1 of n-tile nt+1.
                uint32_t b[4];
                ldsm_x4(b, b_tile + (nt * 8 + (lane & 7) + (lane >> 4) * 8) * LD + k0 +
                               ((lane >> 3) & 1) * 8);
                mma_bf16(s[nt], a, b[0], b[1]);
                mma_bf16(s[nt + 1], a, b[2], b[3]);
            } else {
#pragma unroll
                for (int u = 0; u < 2; u++) {
                    const __nv_bfloat16* row = b_tile + ((nt + u) * 8 + g) * LD + k0 + 2 * tq;
                    mma_bf16(s[nt + u], a, ld_pair(row), ld_pair(row + 8));
                }
            }
        }
    }
}

// acc += P V for a warp: P the warp's 16 x 64 accumulator tiles, V row-major [64][HS] in shared
// (B[k][n] = v_tile[k][n], read down the columns).
template <int HS, bool LDSM>
__device__ __forceinline__ void times_tile(float (&acc)[HS / 8][4],
                                           const float (&p)[MMA_TILE / 8][4],
                                           const __nv_bfloat16* v_tile, int lane) {
    constexpr int LD = HS + 8;
    const int g = lane >> 2, tq = lane & 3;
#pragma unroll
    for (int kk = 0; kk < MMA_TILE / 16; kk++) {
        uint32_t a[4];
        acc_to_a(a, p, kk);
#pragma unroll
        for (int dn = 0; dn < HS / 8; dn += 2) {
            if (LDSM) {
                // Transposed matrices: rows kk*16.. and kk*16+8.. x columns dn*8.. and dn*8+8..:
                // b0, b1 of n-tile dn, then b0, b1 of n-tile dn+1.
                uint32_t b[4];
                ldsm_x4_trans(b, v_tile + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD +
                                     dn * 8 + (lane >> 4) * 8);
                mma_bf16(acc[dn], a, b[0], b[1]);
                mma_bf16(acc[dn + 1], a, b[2], b[3]);
            } else {
#pragma unroll
                for (int u = 0; u < 2; u++) {
                    const __nv_bfloat16* col = v_tile + (kk * 16 + 2 * tq) * LD + (dn + u) * 8 + g;
                    mma_bf16(acc[dn + u], a, ld_col_pair(col, LD), ld_col_pair(col + 8 * LD, LD));
                }
            }
        }
    }
}

__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// dst[0..HS) of a bf16 row += scale * acc row (`half` 0: accumulator rows g, 1: rows g+8).
template <int HS>
__device__ __forceinline__ void add_row(__nv_bfloat16* dst, const float (&acc)[HS / 8][4],
                                        int half, float scale, int tq) {
#pragma unroll
    for (int dn = 0; dn < HS / 8; dn++) {
        __nv_bfloat162* p = reinterpret_cast<__nv_bfloat162*>(dst + dn * 8 + 2 * tq);
        const float2 old = __bfloat1622float2(*p);
        *p = __floats2bfloat162_rn(old.x + scale * acc[dn][2 * half],
                                   old.y + scale * acc[dn][2 * half + 1]);
    }
}

// ---- forward --------------------------------------------------------------------------------
// Grid (ceil(T/64), B*NH), 128 threads.
template <int HS, bool LDSM>
__device__ __forceinline__ void forward_mma(__nv_bfloat16* __restrict__ out,
                                            float* __restrict__ lse,
                                            const __nv_bfloat16* __restrict__ qkv,
                                            const int* __restrict__ starts, int t, int c, int nh,
                                            float scale) {
    constexpr int LD = HS + 8;
    __shared__ __align__(16) __nv_bfloat16 q_s[MMA_ROWS * LD];
    __shared__ __align__(16) __nv_bfloat16 k_s[MMA_TILE * LD];
    __shared__ __align__(16) __nv_bfloat16 v_s[MMA_TILE * LD];
    const int bh = blockIdx.y, bb = bh / nh, h = bh % nh;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * MMA_ROWS;  // the longest rows start first
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const int g = lane >> 2, tq = lane & 3;
    const int r = warp * 16 + g;  // this thread's tile rows: r and r + 8
    const size_t c3 = 3 * (size_t)c;
    const __nv_bfloat16* base = qkv + (size_t)bb * t * c3 + h * HS;
    const int i_a = q0 + r, i_b = q0 + r + 8;
    const int* row_starts = starts ? starts + (size_t)bb * t : nullptr;
    const int start_a = row_starts ? row_starts[min(i_a, t - 1)] : 0;
    const int start_b = row_starts ? row_starts[min(i_b, t - 1)] : 0;
    const int first_key = row_starts ? row_starts[q0] : 0;  // nondecreasing: the tile's least
    const int last_key = min(q0 + MMA_ROWS, t) - 1;
    const float sl2 = scale * LOG2E;

    load_tile<HS>(q_s, base, c3, q0, t);
    float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.0f, l_b = 0.0f;
    float o[HS / 8][4];
#pragma unroll
    for (int dn = 0; dn < HS / 8; dn++) {
#pragma unroll
        for (int e = 0; e < 4; e++) o[dn][e] = 0.0f;
    }
    for (int j0 = (first_key / MMA_TILE) * MMA_TILE; j0 <= last_key; j0 += MMA_TILE) {
        __syncthreads();  // the previous tile is consumed
        load_tile<HS>(k_s, base + c, c3, j0, t);
        load_tile<HS>(v_s, base + 2 * c, c3, j0, t);
        __syncthreads();
        float s[MMA_TILE / 8][4];
        scores<HS, LDSM>(s, q_s, k_s, warp * 16, lane);
        float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < MMA_TILE / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int j = j0 + nt * 8 + 2 * tq + e;
                s[nt][e] = (j <= i_a && j >= start_a) ? s[nt][e] * sl2 : -INFINITY;
                s[nt][2 + e] = (j <= i_b && j >= start_b) ? s[nt][2 + e] * sl2 : -INFINITY;
                mx_a = fmaxf(mx_a, s[nt][e]);
                mx_b = fmaxf(mx_b, s[nt][2 + e]);
            }
        }
        const float new_a = fmaxf(m_a, quad_max(mx_a)), new_b = fmaxf(m_b, quad_max(mx_b));
        // A row that has seen no visible key yet keeps m = -inf: exponentiate against 0 then.
        const float ref_a = new_a == -INFINITY ? 0.0f : new_a;
        const float ref_b = new_b == -INFINITY ? 0.0f : new_b;
        const float alpha_a = exp2f(m_a - ref_a), alpha_b = exp2f(m_b - ref_b);
        m_a = new_a;
        m_b = new_b;
        float sum_a = 0.0f, sum_b = 0.0f;
#pragma unroll
        for (int nt = 0; nt < MMA_TILE / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                s[nt][e] = exp2f(s[nt][e] - ref_a);
                s[nt][2 + e] = exp2f(s[nt][2 + e] - ref_b);
                sum_a += s[nt][e];
                sum_b += s[nt][2 + e];
            }
        }
        l_a = l_a * alpha_a + quad_sum(sum_a);
        l_b = l_b * alpha_b + quad_sum(sum_b);
#pragma unroll
        for (int dn = 0; dn < HS / 8; dn++) {
            o[dn][0] *= alpha_a;
            o[dn][1] *= alpha_a;
            o[dn][2] *= alpha_b;
            o[dn][3] *= alpha_b;
        }
        times_tile<HS, LDSM>(o, s, v_s, lane);
    }
    const float inv_a = l_a > 0.0f ? 1.0f / l_a : 0.0f;
    const float inv_b = l_b > 0.0f ? 1.0f / l_b : 0.0f;
#pragma unroll
    for (int dn = 0; dn < HS / 8; dn++) {
        if (i_a < t) {
            *reinterpret_cast<uint32_t*>(out + ((size_t)bb * t + i_a) * c + h * HS + dn * 8 +
                                         2 * tq) = pack_bf16(o[dn][0] * inv_a, o[dn][1] * inv_a);
        }
        if (i_b < t) {
            *reinterpret_cast<uint32_t*>(out + ((size_t)bb * t + i_b) * c + h * HS + dn * 8 +
                                         2 * tq) = pack_bf16(o[dn][2] * inv_b, o[dn][3] * inv_b);
        }
    }
    if (tq == 0) {
        if (i_a < t) lse[(size_t)bh * t + i_a] = (m_a + log2f(l_a)) * LN2;
        if (i_b < t) lse[(size_t)bh * t + i_b] = (m_b + log2f(l_b)) * LN2;
    }
}

// ---- backward prep: dvec[bh*T + i] = dout_i . out_i over the head's columns --------------------
// One warp per (row, head); 256 threads per block, grid ceil(B*NH*T / 8).
extern "C" __global__ void __launch_bounds__(256)
    attention_backward_dot_bf16(float* __restrict__ dvec, const __nv_bfloat16* __restrict__ dout,
                                const __nv_bfloat16* __restrict__ out, int rows, int t, int c,
                                int nh) {
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    const int lane = threadIdx.x % WARP_SIZE;
    if (row >= rows) return;
    const int hs = c / nh;
    const int bh = row / t, i = row % t, bb = bh / nh, h = bh % nh;
    const size_t at = ((size_t)bb * t + i) * c + h * hs;
    float acc = 0.0f;
    for (int d = lane; d < hs; d += WARP_SIZE) {
        acc += bf16_to_f32(dout[at + d]) * bf16_to_f32(out[at + d]);
    }
    acc = warp_reduce_sum(acc);
    if (lane == 0) dvec[row] = acc;
}

// ---- backward, dq: one block per 64 query rows, over the key tiles they see --------------------
template <int HS, bool LDSM>
__device__ __forceinline__ void backward_dq_mma(__nv_bfloat16* __restrict__ dqkv,
                                                const float* __restrict__ lse,
                                                const float* __restrict__ dvec,
                                                const __nv_bfloat16* __restrict__ dout,
                                                const __nv_bfloat16* __restrict__ qkv,
                                                const int* __restrict__ starts, int t, int c,
                                                int nh, float scale) {
    constexpr int LD = HS + 8;
    __shared__ __align__(16) __nv_bfloat16 q_s[MMA_ROWS * LD];
    __shared__ __align__(16) __nv_bfloat16 do_s[MMA_ROWS * LD];
    __shared__ __align__(16) __nv_bfloat16 k_s[MMA_TILE * LD];
    __shared__ __align__(16) __nv_bfloat16 v_s[MMA_TILE * LD];
    const int bh = blockIdx.y, bb = bh / nh, h = bh % nh;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * MMA_ROWS;
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const int g = lane >> 2, tq = lane & 3;
    const int r = warp * 16 + g;
    const size_t c3 = 3 * (size_t)c;
    const __nv_bfloat16* base = qkv + (size_t)bb * t * c3 + h * HS;
    const int i_a = q0 + r, i_b = q0 + r + 8;
    const int* row_starts = starts ? starts + (size_t)bb * t : nullptr;
    const int start_a = row_starts ? row_starts[min(i_a, t - 1)] : 0;
    const int start_b = row_starts ? row_starts[min(i_b, t - 1)] : 0;
    const int first_key = row_starts ? row_starts[q0] : 0;
    const int last_key = min(q0 + MMA_ROWS, t) - 1;
    const float sl2 = scale * LOG2E;
    // Rows past T get lse = +inf, so their P is 0 and they add nothing.
    const float lse_a = i_a < t ? lse[(size_t)bh * t + i_a] * LOG2E : INFINITY;
    const float lse_b = i_b < t ? lse[(size_t)bh * t + i_b] * LOG2E : INFINITY;
    const float d_a = i_a < t ? dvec[(size_t)bh * t + i_a] : 0.0f;
    const float d_b = i_b < t ? dvec[(size_t)bh * t + i_b] : 0.0f;

    load_tile<HS>(q_s, base, c3, q0, t);
    load_tile<HS>(do_s, dout + (size_t)bb * t * c + h * HS, c, q0, t);
    float dq[HS / 8][4];
#pragma unroll
    for (int dn = 0; dn < HS / 8; dn++) {
#pragma unroll
        for (int e = 0; e < 4; e++) dq[dn][e] = 0.0f;
    }
    for (int j0 = (first_key / MMA_TILE) * MMA_TILE; j0 <= last_key; j0 += MMA_TILE) {
        __syncthreads();
        load_tile<HS>(k_s, base + c, c3, j0, t);
        load_tile<HS>(v_s, base + 2 * c, c3, j0, t);
        __syncthreads();
        float p[MMA_TILE / 8][4], dp[MMA_TILE / 8][4];
        scores<HS, LDSM>(p, q_s, k_s, warp * 16, lane);
        scores<HS, LDSM>(dp, do_s, v_s, warp * 16, lane);
#pragma unroll
        for (int nt = 0; nt < MMA_TILE / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int j = j0 + nt * 8 + 2 * tq + e;
                const float pa =
                    (j <= i_a && j >= start_a) ? exp2f(p[nt][e] * sl2 - lse_a) : 0.0f;
                const float pb =
                    (j <= i_b && j >= start_b) ? exp2f(p[nt][2 + e] * sl2 - lse_b) : 0.0f;
                p[nt][e] = pa * (dp[nt][e] - d_a);  // dS
                p[nt][2 + e] = pb * (dp[nt][2 + e] - d_b);
            }
        }
        times_tile<HS, LDSM>(dq, p, k_s, lane);
    }
    if (i_a < t) add_row<HS>(dqkv + ((size_t)bb * t + i_a) * c3 + h * HS, dq, 0, scale, tq);
    if (i_b < t) add_row<HS>(dqkv + ((size_t)bb * t + i_b) * c3 + h * HS, dq, 1, scale, tq);
}

// ---- backward, dk and dv: one block per 64 key rows, over the query tiles that see them --------
template <int HS, bool LDSM>
__device__ __forceinline__ void backward_dkv_mma(__nv_bfloat16* __restrict__ dqkv,
                                                 const float* __restrict__ lse,
                                                 const float* __restrict__ dvec,
                                                 const __nv_bfloat16* __restrict__ dout,
                                                 const __nv_bfloat16* __restrict__ qkv,
                                                 const int* __restrict__ starts, int t, int c,
                                                 int nh, float scale) {
    constexpr int LD = HS + 8;
    __shared__ __align__(16) __nv_bfloat16 k_s[MMA_ROWS * LD];
    __shared__ __align__(16) __nv_bfloat16 v_s[MMA_ROWS * LD];
    __shared__ __align__(16) __nv_bfloat16 q_s[MMA_TILE * LD];
    __shared__ __align__(16) __nv_bfloat16 do_s[MMA_TILE * LD];
    __shared__ float lse_s[MMA_TILE], d_s[MMA_TILE];
    __shared__ int start_s[MMA_TILE];
    const int bh = blockIdx.y, bb = bh / nh, h = bh % nh;
    const int k0 = blockIdx.x * MMA_ROWS;  // the first key tiles see the most queries
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const int g = lane >> 2, tq = lane & 3;
    const int r = warp * 16 + g;
    const size_t c3 = 3 * (size_t)c;
    const __nv_bfloat16* base = qkv + (size_t)bb * t * c3 + h * HS;
    const __nv_bfloat16* dout_base = dout + (size_t)bb * t * c + h * HS;
    const int j_a = k0 + r, j_b = k0 + r + 8;
    const int* row_starts = starts ? starts + (size_t)bb * t : nullptr;
    const int last_key = min(k0 + MMA_ROWS, t) - 1;
    const float sl2 = scale * LOG2E;

    load_tile<HS>(k_s, base + c, c3, k0, t);
    load_tile<HS>(v_s, base + 2 * c, c3, k0, t);
    float dk[HS / 8][4], dv[HS / 8][4];
#pragma unroll
    for (int dn = 0; dn < HS / 8; dn++) {
#pragma unroll
        for (int e = 0; e < 4; e++) dk[dn][e] = dv[dn][e] = 0.0f;
    }
    for (int i0 = (k0 / MMA_TILE) * MMA_TILE; i0 < t; i0 += MMA_TILE) {
        // Starts never decrease along a row: once a tile's first query starts past these keys,
        // no later query sees them either.
        if (row_starts && row_starts[i0] > last_key) break;
        __syncthreads();
        load_tile<HS>(q_s, base, c3, i0, t);
        load_tile<HS>(do_s, dout_base, c, i0, t);
        for (int x = threadIdx.x; x < MMA_TILE; x += MMA_THREADS) {
            const int i = i0 + x;
            lse_s[x] = i < t ? lse[(size_t)bh * t + i] * LOG2E : INFINITY;
            d_s[x] = i < t ? dvec[(size_t)bh * t + i] : 0.0f;
            start_s[x] = (row_starts && i < t) ? row_starts[i] : 0;
        }
        __syncthreads();
        float p[MMA_TILE / 8][4];
        scores<HS, LDSM>(p, k_s, q_s, warp * 16, lane);  // S^T: rows keys, columns queries
#pragma unroll
        for (int nt = 0; nt < MMA_TILE / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int x = nt * 8 + 2 * tq + e;
                const int i = i0 + x;
                const bool see_a = i >= j_a && start_s[x] <= j_a;
                const bool see_b = i >= j_b && start_s[x] <= j_b;
                p[nt][e] = see_a ? exp2f(p[nt][e] * sl2 - lse_s[x]) : 0.0f;
                p[nt][2 + e] = see_b ? exp2f(p[nt][2 + e] * sl2 - lse_s[x]) : 0.0f;
            }
        }
        times_tile<HS, LDSM>(dv, p, do_s, lane);
        // dP^T only now, so its registers are not live during the dv product.
        float dp[MMA_TILE / 8][4];
        scores<HS, LDSM>(dp, v_s, do_s, warp * 16, lane);
#pragma unroll
        for (int nt = 0; nt < MMA_TILE / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int x = nt * 8 + 2 * tq + e;
                p[nt][e] *= dp[nt][e] - d_s[x];  // dS^T
                p[nt][2 + e] *= dp[nt][2 + e] - d_s[x];
            }
        }
        times_tile<HS, LDSM>(dk, p, q_s, lane);
    }
    if (j_a < t) {
        __nv_bfloat16* row = dqkv + ((size_t)bb * t + j_a) * c3 + h * HS;
        add_row<HS>(row + c, dk, 0, scale, tq);
        add_row<HS>(row + 2 * c, dv, 0, 1.0f, tq);
    }
    if (j_b < t) {
        __nv_bfloat16* row = dqkv + ((size_t)bb * t + j_b) * c3 + h * HS;
        add_row<HS>(row + c, dk, 1, scale, tq);
        add_row<HS>(row + 2 * c, dv, 1, 1.0f, tq);
    }
}

// ---- entry points, per head size; `_lds` variants use plain shared loads, not ldmatrix -------
#define ATTENTION_MMA_KERNELS(HS, LDSM, SUFFIX)                                                  \
    extern "C" __global__ void __launch_bounds__(MMA_THREADS)                                    \
        attention_forward_mma##HS##SUFFIX(__nv_bfloat16* out, float* lse,                       \
                                          const __nv_bfloat16* qkv, const int* starts, int t,    \
                                          int c, int nh, float scale) {                          \
        forward_mma<HS, LDSM>(out, lse, qkv, starts, t, c, nh, scale);                           \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(MMA_THREADS)                                    \
        attention_backward_dq_mma##HS##SUFFIX(__nv_bfloat16* dqkv, const float* lse,             \
                                              const float* dvec, const __nv_bfloat16* dout,      \
                                              const __nv_bfloat16* qkv, const int* starts,       \
                                              int t, int c, int nh, float scale) {               \
        backward_dq_mma<HS, LDSM>(dqkv, lse, dvec, dout, qkv, starts, t, c, nh, scale);          \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(MMA_THREADS)                                    \
        attention_backward_dkv_mma##HS##SUFFIX(__nv_bfloat16* dqkv, const float* lse,            \
                                               const float* dvec, const __nv_bfloat16* dout,     \
                                               const __nv_bfloat16* qkv, const int* starts,      \
                                               int t, int c, int nh, float scale) {              \
        backward_dkv_mma<HS, LDSM>(dqkv, lse, dvec, dout, qkv, starts, t, c, nh, scale);         \
    }

ATTENTION_MMA_KERNELS(32, true, _bf16)
ATTENTION_MMA_KERNELS(64, true, _bf16)
ATTENTION_MMA_KERNELS(32, false, _lds_bf16)
ATTENTION_MMA_KERNELS(64, false, _lds_bf16)
