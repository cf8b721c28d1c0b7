// attention.cu: causal multi-head self-attention, forward and backward, flash-attention style.
//
// Twin of Backend::attention_gqa_forward / attention_gqa_backward (and so of the multi-head
// attention_forward / attention_backward, NKV = NH) and src/backend/cpu/attention.rs.
// The CUDA-core fallback for head sizes the tensor-core kernels (attention_mma.cu) don't take.
// Layout: qkv [B, T, (NH + 2 NKV) hs] bf16 (NH query heads | NKV key heads | NKV value heads per
// position, see HeadCols in common.cuh; [B, T, 3C] when NKV = NH), out [B, T, C] bf16, lse
// [B, NH, T] fp32. Query head h reads key/value head h / (NH / NKV).
// Head size hs = C / NH, at most ATT_MAX_HS = 128. Arithmetic and accumulation in fp32.
// Packed rows: with starts [B, T] (non-null; examples are contiguous segments, so starts is
// non-decreasing along a row, checked by the launcher) query i attends keys starts[i] <= j <= i;
// with starts == nullptr, keys 0 <= j <= i. Key (query) tiles that are masked for a whole block
// are not loaded, tiles masked for one warp are skipped by it: a row of short examples costs
// about sum(len^2)/2 instead of T^2/2 score evaluations.
//
// Forward: one warp per query row, ATT_ROWS = 8 rows per block; the block walks key tiles of
// ATT_TILE = 32 keys staged in shared memory (fp32). Per tile each lane scores one key, the
// warp does an online-softmax update (running max m, running sum l), and each lane accumulates
// the output dims lane, lane+32, lane+64, lane+96 with the tile's probabilities broadcast by
// shuffles. The T x T matrix never leaves registers.
//
// Backward (three kernels, no float atomics, deterministic):
//   prep: per query row, D_i = dout_i . out_i, and the lse refined by one re-summation
//         lse += log(sum_j exp(s_ij - lse)) (a no-op up to rounding for the forward's own lse).
//   dq:   per query row, over key tiles: P = exp(s - lse), dP = dout_i . v_j,
//         dS = P (dP - D_i), dq_i = scale * sum_j dS_ij k_j.
//   dkv:  per key row of one key/value head, over the query heads of its group (in order) and
//         their query tiles: dv_j = sum_h sum_i P_ij dout_i, dk_j = scale * sum_h sum_i dS_ij q_i.
//         The group's sum stays in registers, so grouped heads need no atomics either.
//
// Napkin math (GPT-2 small: B=64, NH=12, T=1024, hs=64): forward FLOPs ~ 4 * B*NH*T^2/2 * hs
// = 103 GFLOP (causal half); backward recomputes the scores twice (prep, dq, dkv: 3x QK^T) plus
// 4 more products ~ 2.5-3x forward. This straightforward CUDA-core kernel does not use tensor
// cores (~60 TFLOP/s fp32 FMA peak on H100): expect ~2-4 ms forward, a tensor-core rewrite
// (FA2/FA3 style, wmma or wgmma) is the follow-up. Bytes: qkv 2 B * 3C per position read once
// per 8-row block per tile -> L2 traffic ~ T/8 times the qkv size per head; DRAM ~ qkv + out.
#include "common.cuh"

#define ATT_MAX_HS 128
#define ATT_ROWS 8
#define ATT_TILE 32
#define ATT_DPL (ATT_MAX_HS / WARP_SIZE)  // dims per lane

// Loads rows [j0, j0 + ATT_TILE) of the hs columns from `col` of a qkv row (width w) into
// dst[ATT_TILE][ld] as fp32; rows past T are zero. Every thread of the block calls it.
__device__ __forceinline__ void load_tile(float* dst, int ld, const __nv_bfloat16* qkv, int col,
                                          int w, int bb, int j0, int t, int hs) {
    for (int idx = threadIdx.x; idx < ATT_TILE * hs; idx += blockDim.x) {
        const int jj = idx / hs, d = idx % hs;
        const int j = j0 + jj;
        dst[jj * ld + d] = j < t ? bf16_to_f32(qkv[((size_t)bb * t + j) * w + col + d]) : 0.0f;
    }
}

// Same, from a [B, T, C] tensor (dout).
__device__ __forceinline__ void load_tile_c(float* dst, int ld, const __nv_bfloat16* x, int bb,
                                            int h, int j0, int t, int c, int hs) {
    for (int idx = threadIdx.x; idx < ATT_TILE * hs; idx += blockDim.x) {
        const int jj = idx / hs, d = idx % hs;
        const int j = j0 + jj;
        dst[jj * ld + d] = j < t ? bf16_to_f32(x[((size_t)bb * t + j) * c + h * hs + d]) : 0.0f;
    }
}

// The first key query i of row bb attends: starts[bb, i], or 0 without starts.
__device__ __forceinline__ int key_start(const int* starts, int bb, int i, int t) {
    return starts ? starts[(size_t)bb * t + i] : 0;
}

__device__ __forceinline__ float dot_hs(const float* a, const float* b, int hs) {
    float s = 0.0f;
    for (int d = 0; d < hs; d++) s += a[d] * b[d];
    return s;
}

// Grid (ceil(T / ATT_ROWS), B * NH), block ATT_ROWS * 32 threads.
extern "C" __global__ void __launch_bounds__(ATT_ROWS * WARP_SIZE)
    attention_forward_bf16(__nv_bfloat16* __restrict__ out, float* __restrict__ lse,
                           const __nv_bfloat16* __restrict__ qkv,
                           const int* __restrict__ starts, int t, int c, int nh, int nkv,
                           float scale) {
    __shared__ float q_s[ATT_ROWS][ATT_MAX_HS];
    __shared__ float k_s[ATT_TILE][ATT_MAX_HS + 1];
    __shared__ float v_s[ATT_TILE][ATT_MAX_HS];
    const int hs = c / nh;
    const int bh = blockIdx.y, bb = bh / nh, h = bh % nh;
    const HeadCols hc = head_cols(h, c, nh, nkv);
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const int row0 = blockIdx.x * ATT_ROWS;
    const int i = row0 + warp;
    const bool active = i < t;
    for (int d = lane; d < hs; d += WARP_SIZE) {
        q_s[warp][d] = active ? bf16_to_f32(qkv[((size_t)bb * t + i) * hc.w + hc.q + d]) : 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    float o[ATT_DPL];
#pragma unroll
    for (int r = 0; r < ATT_DPL; r++) o[r] = 0.0f;
    const int first = active ? key_start(starts, bb, i, t) : 0;
    const int last_row = min(t - 1, row0 + ATT_ROWS - 1);
    const int j_begin = key_start(starts, bb, row0, t) / ATT_TILE * ATT_TILE;
    for (int j0 = j_begin; j0 <= last_row; j0 += ATT_TILE) {
        __syncthreads();  // previous tile consumed (and q_s written, on the first pass)
        load_tile(&k_s[0][0], ATT_MAX_HS + 1, qkv, hc.k, hc.w, bb, j0, t, hs);
        load_tile(&v_s[0][0], ATT_MAX_HS, qkv, hc.v, hc.w, bb, j0, t, hs);
        __syncthreads();
        if (!active || j0 > i || j0 + ATT_TILE <= first) continue;
        const int j = j0 + lane;
        const bool valid = j >= first && j <= i;
        const float s = valid ? dot_hs(q_s[warp], k_s[lane], hs) * scale : -INFINITY;
        const float m_new = fmaxf(m, warp_reduce_max(s));
        const float p = valid ? expf(s - m_new) : 0.0f;
        const float alpha = expf(m - m_new);  // 0 on the first tile (m = -inf)
        l = l * alpha + warp_reduce_sum(p);
        m = m_new;
#pragma unroll
        for (int r = 0; r < ATT_DPL; r++) o[r] *= alpha;
        for (int jj = 0; jj < ATT_TILE; jj++) {
            const float pj = __shfl_sync(0xffffffffu, p, jj);
#pragma unroll
            for (int r = 0; r < ATT_DPL; r++) {
                const int d = lane + r * WARP_SIZE;
                if (d < hs) o[r] += pj * v_s[jj][d];
            }
        }
    }
    if (!active) return;
    const float inv_l = 1.0f / l;
#pragma unroll
    for (int r = 0; r < ATT_DPL; r++) {
        const int d = lane + r * WARP_SIZE;
        if (d < hs) out[((size_t)bb * t + i) * c + h * hs + d] = f32_to_bf16(o[r] * inv_l);
    }
    if (lane == 0) lse[(size_t)bh * t + i] = m + logf(l);
}

// Backward prep: stats[(bh*T + i)*2 + 0] = exact fp32 lse, [.. + 1] = D_i = dout_i . out_i.
// Grid and block as the forward.
extern "C" __global__ void __launch_bounds__(ATT_ROWS * WARP_SIZE)
    attention_backward_prep_bf16(float* __restrict__ stats, const __nv_bfloat16* __restrict__ dout,
                                 const __nv_bfloat16* __restrict__ out,
                                 const __nv_bfloat16* __restrict__ qkv,
                                 const float* __restrict__ lse,
                                 const int* __restrict__ starts, int t, int c, int nh, int nkv,
                                 float scale) {
    __shared__ float q_s[ATT_ROWS][ATT_MAX_HS];
    __shared__ float k_s[ATT_TILE][ATT_MAX_HS + 1];
    const int hs = c / nh;
    const int bh = blockIdx.y, bb = bh / nh, h = bh % nh;
    const HeadCols hc = head_cols(h, c, nh, nkv);
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const int row0 = blockIdx.x * ATT_ROWS;
    const int i = row0 + warp;
    const bool active = i < t;
    float dsum = 0.0f;
    for (int d = lane; d < hs; d += WARP_SIZE) {
        q_s[warp][d] = active ? bf16_to_f32(qkv[((size_t)bb * t + i) * hc.w + hc.q + d]) : 0.0f;
        if (active) {
            const size_t idx = ((size_t)bb * t + i) * c + h * hs + d;
            dsum += bf16_to_f32(dout[idx]) * bf16_to_f32(out[idx]);
        }
    }
    dsum = warp_reduce_sum(dsum);
    const float lse0 = active ? lse[(size_t)bh * t + i] : 0.0f;
    float psum = 0.0f;
    const int first = active ? key_start(starts, bb, i, t) : 0;
    const int last_row = min(t - 1, row0 + ATT_ROWS - 1);
    const int j_begin = key_start(starts, bb, row0, t) / ATT_TILE * ATT_TILE;
    for (int j0 = j_begin; j0 <= last_row; j0 += ATT_TILE) {
        __syncthreads();
        load_tile(&k_s[0][0], ATT_MAX_HS + 1, qkv, hc.k, hc.w, bb, j0, t, hs);
        __syncthreads();
        if (!active || j0 > i || j0 + ATT_TILE <= first) continue;
        const int j = j0 + lane;
        if (j >= first && j <= i) psum += expf(dot_hs(q_s[warp], k_s[lane], hs) * scale - lse0);
    }
    psum = warp_reduce_sum(psum);
    if (active && lane == 0) {
        stats[((size_t)bh * t + i) * 2] = lse0 + logf(psum);
        stats[((size_t)bh * t + i) * 2 + 1] = dsum;
    }
}

// Backward dq: one warp per query row, key tiles in shared memory. Writes dqkv's q part.
extern "C" __global__ void __launch_bounds__(ATT_ROWS * WARP_SIZE)
    attention_backward_dq_bf16(__nv_bfloat16* __restrict__ dqkv, const float* __restrict__ stats,
                               const __nv_bfloat16* __restrict__ dout,
                               const __nv_bfloat16* __restrict__ qkv,
                               const int* __restrict__ starts, int t, int c, int nh, int nkv,
                               float scale) {
    __shared__ float q_s[ATT_ROWS][ATT_MAX_HS];
    __shared__ float do_s[ATT_ROWS][ATT_MAX_HS];
    __shared__ float k_s[ATT_TILE][ATT_MAX_HS + 1];
    __shared__ float v_s[ATT_TILE][ATT_MAX_HS + 1];
    const int hs = c / nh;
    const int bh = blockIdx.y, bb = bh / nh, h = bh % nh;
    const HeadCols hc = head_cols(h, c, nh, nkv);
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const int row0 = blockIdx.x * ATT_ROWS;
    const int i = row0 + warp;
    const bool active = i < t;
    for (int d = lane; d < hs; d += WARP_SIZE) {
        q_s[warp][d] = active ? bf16_to_f32(qkv[((size_t)bb * t + i) * hc.w + hc.q + d]) : 0.0f;
        do_s[warp][d] = active ? bf16_to_f32(dout[((size_t)bb * t + i) * c + h * hs + d]) : 0.0f;
    }
    const float row_lse = active ? stats[((size_t)bh * t + i) * 2] : 0.0f;
    const float row_d = active ? stats[((size_t)bh * t + i) * 2 + 1] : 0.0f;
    float dq[ATT_DPL];
#pragma unroll
    for (int r = 0; r < ATT_DPL; r++) dq[r] = 0.0f;
    const int first = active ? key_start(starts, bb, i, t) : 0;
    const int last_row = min(t - 1, row0 + ATT_ROWS - 1);
    const int j_begin = key_start(starts, bb, row0, t) / ATT_TILE * ATT_TILE;
    for (int j0 = j_begin; j0 <= last_row; j0 += ATT_TILE) {
        __syncthreads();
        load_tile(&k_s[0][0], ATT_MAX_HS + 1, qkv, hc.k, hc.w, bb, j0, t, hs);
        load_tile(&v_s[0][0], ATT_MAX_HS + 1, qkv, hc.v, hc.w, bb, j0, t, hs);
        __syncthreads();
        if (!active || j0 > i || j0 + ATT_TILE <= first) continue;
        const int j = j0 + lane;
        float ds = 0.0f;
        if (j >= first && j <= i) {
            const float p = expf(dot_hs(q_s[warp], k_s[lane], hs) * scale - row_lse);
            const float dp = dot_hs(do_s[warp], v_s[lane], hs);
            ds = p * (dp - row_d) * scale;
        }
        for (int jj = 0; jj < ATT_TILE; jj++) {
            const float dsj = __shfl_sync(0xffffffffu, ds, jj);
#pragma unroll
            for (int r = 0; r < ATT_DPL; r++) {
                const int d = lane + r * WARP_SIZE;
                if (d < hs) dq[r] += dsj * k_s[jj][d];
            }
        }
    }
    if (!active) return;
#pragma unroll
    for (int r = 0; r < ATT_DPL; r++) {
        const int d = lane + r * WARP_SIZE;
        if (d < hs) {
            dqkv[((size_t)bb * t + i) * hc.w + hc.q + d] = f32_to_bf16(dq[r]);
        }
    }
}

// Backward dk, dv: one warp per key row j of key/value head kvh (grid (ceil(T / ATT_ROWS),
// B * NKV)). The block walks the query heads of kvh's group in order and, for each, the query
// tiles (i >= j) in shared memory; dk and dv sum over all of them in registers. With starts,
// a head's walk stops at the first tile whose first query starts after the block's last key.
// (ptxas picks 48 registers from the shared memory's 5 blocks per SM and spills the group
// loop's state; 4 blocks per SM give it 64.)
extern "C" __global__ void __launch_bounds__(ATT_ROWS * WARP_SIZE, 4)
    attention_backward_dkv_bf16(__nv_bfloat16* __restrict__ dqkv, const float* __restrict__ stats,
                                const __nv_bfloat16* __restrict__ dout,
                                const __nv_bfloat16* __restrict__ qkv,
                                const int* __restrict__ starts, int t, int c, int nh, int nkv,
                                float scale) {
    __shared__ float k_s[ATT_ROWS][ATT_MAX_HS];
    __shared__ float v_s[ATT_ROWS][ATT_MAX_HS];
    __shared__ float q_t[ATT_TILE][ATT_MAX_HS + 1];
    __shared__ float do_t[ATT_TILE][ATT_MAX_HS + 1];
    __shared__ float lse_t[ATT_TILE];
    __shared__ float d_t[ATT_TILE];
    const int hs = c / nh;
    const int group = nh / nkv;
    const int bkv = blockIdx.y, bb = bkv / nkv, kvh = bkv % nkv;
    const HeadCols kc = head_cols(kvh * group, c, nh, nkv);  // k and v columns of head kvh
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const int row0 = blockIdx.x * ATT_ROWS;
    const int j = row0 + warp;
    const bool active = j < t;
    for (int d = lane; d < hs; d += WARP_SIZE) {
        const size_t base = ((size_t)bb * t + j) * kc.w + d;
        k_s[warp][d] = active ? bf16_to_f32(qkv[base + kc.k]) : 0.0f;
        v_s[warp][d] = active ? bf16_to_f32(qkv[base + kc.v]) : 0.0f;
    }
    float dk[ATT_DPL], dv[ATT_DPL];
#pragma unroll
    for (int r = 0; r < ATT_DPL; r++) dk[r] = dv[r] = 0.0f;
    const int last_key = min(t - 1, row0 + ATT_ROWS - 1);
    for (int h = kvh * group; h < (kvh + 1) * group; h++) {
        const size_t bh = (size_t)bb * nh + h;
        for (int i0 = (row0 / ATT_TILE) * ATT_TILE;
             i0 < t && key_start(starts, bb, i0, t) <= last_key; i0 += ATT_TILE) {
            __syncthreads();
            load_tile(&q_t[0][0], ATT_MAX_HS + 1, qkv, h * hs, kc.w, bb, i0, t, hs);
            load_tile_c(&do_t[0][0], ATT_MAX_HS + 1, dout, bb, h, i0, t, c, hs);
            if (threadIdx.x < ATT_TILE) {
                const int i = i0 + threadIdx.x;
                lse_t[threadIdx.x] = i < t ? stats[(bh * t + i) * 2] : 0.0f;
                d_t[threadIdx.x] = i < t ? stats[(bh * t + i) * 2 + 1] : 0.0f;
            }
            __syncthreads();
            if (!active || i0 + ATT_TILE <= j || key_start(starts, bb, i0, t) > j) continue;
            const int i = i0 + lane;
            float p = 0.0f, ds = 0.0f;
            if (i < t && i >= j && key_start(starts, bb, i, t) <= j) {
                p = expf(dot_hs(q_t[lane], k_s[warp], hs) * scale - lse_t[lane]);
                const float dp = dot_hs(do_t[lane], v_s[warp], hs);
                ds = p * (dp - d_t[lane]) * scale;
            }
            for (int ii = 0; ii < ATT_TILE; ii++) {
                const float pi = __shfl_sync(0xffffffffu, p, ii);
                const float dsi = __shfl_sync(0xffffffffu, ds, ii);
#pragma unroll
                for (int r = 0; r < ATT_DPL; r++) {
                    const int d = lane + r * WARP_SIZE;
                    if (d < hs) {
                        dv[r] += pi * do_t[ii][d];
                        dk[r] += dsi * q_t[ii][d];
                    }
                }
            }
        }
    }
    if (!active) return;
#pragma unroll
    for (int r = 0; r < ATT_DPL; r++) {
        const int d = lane + r * WARP_SIZE;
        if (d < hs) {
            const size_t base = ((size_t)bb * t + j) * kc.w + d;
            dqkv[base + kc.k] = f32_to_bf16(dk[r]);
            dqkv[base + kc.v] = f32_to_bf16(dv[r]);
        }
    }
}
