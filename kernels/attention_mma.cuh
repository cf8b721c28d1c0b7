// attention_mma.cuh: the tensor-core building blocks of kernels/attention_mma.cu: mma.sync
// m16n8k16 on bf16 fragments loaded by ldmatrix, 64-row tile copies by cp.async, the
// S = A B^T and acc += P V tile products, quad reductions, row stores, and the per-tile steps
// of the forward, dq and dkv kernels. Layout and scheme: see attention_mma.cu's header.
#pragma once

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
// elements per row), by one ldmatrix (matrices: rows rb.., rb+8.. x columns k0.., k0+8..).
__device__ __forceinline__ void ld_a_frag(uint32_t (&a)[4], const __nv_bfloat16* tile, int ld,
                                          int rb, int k0, int lane) {
    ldsm_x4(a, tile + (rb + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + k0 + (lane >> 4) * 8);
}

// Accumulator tiles s[2kk], s[2kk+1] (16 rows x 16 columns) as the A fragment of the next product.
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&s)[MMA_TILE / 8][4],
                                         int kk) {
    a[0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
    a[1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
    a[2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    a[3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

// ---- cp.async: global -> shared copies that proceed while the warps compute ------------------
// 16 bytes from global `src` to shared `dst`, or 16 zero bytes when `!valid` (src unread).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
    const uint32_t at = (uint32_t)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :
                 : "r"(at), "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Copies rows row0 .. row0+63 of an [T, stride] bf16 tensor (HS columns from `src`) into a
// shared tile with HS+8 elements per row, through cp.async (the caller commits and waits);
// rows at or past T become zero.
template <int HS>
__device__ __forceinline__ void load_tile_async(__nv_bfloat16* tile, const __nv_bfloat16* src,
                                                size_t stride, int row0, int t) {
    constexpr int CHUNKS = HS / 8;
    for (int idx = threadIdx.x; idx < MMA_TILE * CHUNKS; idx += MMA_THREADS) {
        const int r = idx / CHUNKS, ch = idx % CHUNKS;
        const bool valid = row0 + r < t;
        const __nv_bfloat16* from = src + (size_t)(valid ? row0 + r : 0) * stride + ch * 8;
        cp_async_16(tile + r * (HS + 8) + ch * 8, from, valid);
    }
}

// s += A B^T for one 16-column k-step (columns k0 ..): the warp's A fragment `a` against 64 rows
// of `b_tile` (row-major [64][HS]: each row is one column of B^T), B fragments by ldmatrix.
template <int HS>
__device__ __forceinline__ void mma_bt_ldsm(float (&s)[MMA_TILE / 8][4], const uint32_t (&a)[4],
                                            const __nv_bfloat16* b_tile, int k0, int lane) {
    constexpr int LD = HS + 8;
#pragma unroll
    for (int nt = 0; nt < MMA_TILE / 8; nt += 2) {
        // Matrices: rows nt*8.. and nt*8+8.. x columns k0.. and k0+8..:
        // b0, b1 of n-tile nt, then b0, b1 of n-tile nt+1.
        uint32_t b[4];
        ldsm_x4(b, b_tile + (nt * 8 + (lane & 7) + (lane >> 4) * 8) * LD + k0 +
                       ((lane >> 3) & 1) * 8);
        mma_bf16(s[nt], a, b[0], b[1]);
        mma_bf16(s[nt + 1], a, b[2], b[3]);
    }
}

template <int N>
__device__ __forceinline__ void zero_acc(float (&s)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; i++) {
#pragma unroll
        for (int e = 0; e < 4; e++) s[i][e] = 0.0f;
    }
}

// S = A B^T for a warp's 16 rows (tile rows rb ..) against 64 tile rows: A from `a_tile`, B
// from `b_tile` (row-major [64][HS]: each row is one column of B^T, so B[k][n] = b_tile[n][k]).
template <int HS>
__device__ __forceinline__ void scores(float (&s)[MMA_TILE / 8][4], const __nv_bfloat16* a_tile,
                                       const __nv_bfloat16* b_tile, int rb, int lane) {
    zero_acc(s);
#pragma unroll
    for (int k0 = 0; k0 < HS; k0 += 16) {
        uint32_t a[4];
        ld_a_frag(a, a_tile, HS + 8, rb, k0, lane);
        mma_bt_ldsm<HS>(s, a, b_tile, k0, lane);
    }
}

// acc += P V for a warp: P the warp's 16 x 64 accumulator tiles, V row-major [64][HS] in shared
// (B[k][n] = v_tile[k][n], read down the columns).
template <int HS>
__device__ __forceinline__ void times_tile(float (&acc)[HS / 8][4],
                                           const float (&p)[MMA_TILE / 8][4],
                                           const __nv_bfloat16* v_tile, int lane) {
    constexpr int LD = HS + 8;
#pragma unroll
    for (int kk = 0; kk < MMA_TILE / 16; kk++) {
        uint32_t a[4];
        acc_to_a(a, p, kk);
#pragma unroll
        for (int dn = 0; dn < HS / 8; dn += 2) {
            // Transposed matrices: rows kk*16.. and kk*16+8.. x columns dn*8.. and dn*8+8..:
            // b0, b1 of n-tile dn, then b0, b1 of n-tile dn+1.
            uint32_t b[4];
            ldsm_x4_trans(b, v_tile + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD +
                                 dn * 8 + (lane >> 4) * 8);
            mma_bf16(acc[dn], a, b[0], b[1]);
            mma_bf16(acc[dn + 1], a, b[2], b[3]);
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

// dst[0..HS) of a bf16 row = scale * acc row (`half` 0: accumulator rows g, 1: rows g+8).
// Overwrites: dqkv is an activation gradient (Backend's conventions), so it needs no zeroing.
template <int HS>
__device__ __forceinline__ void store_row(__nv_bfloat16* dst, const float (&acc)[HS / 8][4],
                                          int half, float scale, int tq) {
#pragma unroll
    for (int dn = 0; dn < HS / 8; dn++) {
        *reinterpret_cast<__nv_bfloat162*>(dst + dn * 8 + 2 * tq) =
            __floats2bfloat162_rn(scale * acc[dn][2 * half], scale * acc[dn][2 * half + 1]);
    }
}

// ---- per-tile steps of the forward, dq and dkv kernels -------------------------------------------
// Forward: masks the warp's score tile `s` (keys j0 .., rows i_a and i_b = i_a + 8, which see
// keys start_* ..= i_*), folds it into the running max `m_*` and sum `l_*` (base 2), rescales
// the output accumulator `o`, and leaves `s` = exp2(s - m): the P tile of `o += P V`.
template <int HS>
__device__ __forceinline__ void softmax_tile(float (&s)[MMA_TILE / 8][4], float (&o)[HS / 8][4],
                                             float& m_a, float& m_b, float& l_a, float& l_b,
                                             int j0, int i_a, int i_b, int start_a, int start_b,
                                             float sl2, int tq) {
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
}

// Forward epilogue: out rows i_a, i_b (those below T) = o / l, and their lse (natural log).
template <int HS>
__device__ __forceinline__ void forward_store(__nv_bfloat16* out, float* lse,
                                              const float (&o)[HS / 8][4], float m_a, float m_b,
                                              float l_a, float l_b, size_t out_row_a,
                                              size_t lse_row_a, int i_a, int t, int c, int tq) {
    const float inv_a = l_a > 0.0f ? 1.0f / l_a : 0.0f;
    const float inv_b = l_b > 0.0f ? 1.0f / l_b : 0.0f;
#pragma unroll
    for (int dn = 0; dn < HS / 8; dn++) {
        if (i_a < t) {
            *reinterpret_cast<uint32_t*>(out + out_row_a + dn * 8 + 2 * tq) =
                pack_bf16(o[dn][0] * inv_a, o[dn][1] * inv_a);
        }
        if (i_a + 8 < t) {
            *reinterpret_cast<uint32_t*>(out + out_row_a + 8 * (size_t)c + dn * 8 + 2 * tq) =
                pack_bf16(o[dn][2] * inv_b, o[dn][3] * inv_b);
        }
    }
    if (tq == 0) {
        if (i_a < t) lse[lse_row_a] = (m_a + log2f(l_a)) * LN2;
        if (i_a + 8 < t) lse[lse_row_a + 8] = (m_b + log2f(l_b)) * LN2;
    }
}

// dq: turns the scores `p` (keys j0 ..) into P = exp2(S sl2 - lse) (masked as in the forward)
// and then, with dP = dout V^T in `dp`, into dS = P (dP - D) in place.
__device__ __forceinline__ void dq_tile_ds(float (&p)[MMA_TILE / 8][4],
                                           const float (&dp)[MMA_TILE / 8][4], int j0, int i_a,
                                           int i_b, int start_a, int start_b, float sl2,
                                           float lse_a, float lse_b, float d_a, float d_b,
                                           int tq) {
#pragma unroll
    for (int nt = 0; nt < MMA_TILE / 8; nt++) {
#pragma unroll
        for (int e = 0; e < 2; e++) {
            const int j = j0 + nt * 8 + 2 * tq + e;
            const float pa = (j <= i_a && j >= start_a) ? exp2f(p[nt][e] * sl2 - lse_a) : 0.0f;
            const float pb =
                (j <= i_b && j >= start_b) ? exp2f(p[nt][2 + e] * sl2 - lse_b) : 0.0f;
            p[nt][e] = pa * (dp[nt][e] - d_a);
            p[nt][2 + e] = pb * (dp[nt][2 + e] - d_b);
        }
    }
}

// dkv: turns the transposed scores `p` (rows: keys j_a, j_b = j_a + 8; columns: queries i0 + x
// with lse_s[x] in base 2, +inf past T, and starts start_s[x]) into P^T.
__device__ __forceinline__ void dkv_tile_p(float (&p)[MMA_TILE / 8][4], int i0, int j_a, int j_b,
                                           const float* lse_s, const int* start_s, float sl2,
                                           int tq) {
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
}

// dkv: P^T in `p` becomes dS^T = P^T (dP^T - D) given dP^T in `dp` and D of each query column.
__device__ __forceinline__ void dkv_tile_ds(float (&p)[MMA_TILE / 8][4],
                                            const float (&dp)[MMA_TILE / 8][4], const float* d_s,
                                            int tq) {
#pragma unroll
    for (int nt = 0; nt < MMA_TILE / 8; nt++) {
#pragma unroll
        for (int e = 0; e < 2; e++) {
            const int x = nt * 8 + 2 * tq + e;
            p[nt][e] *= dp[nt][e] - d_s[x];
            p[nt][2 + e] *= dp[nt][2 + e] - d_s[x];
        }
    }
}
