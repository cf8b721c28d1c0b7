// rmsnorm.cu: RMSNorm forward, residual-add + RMSNorm forward, and backward (Llama family).
//
// Twin of Backend::rmsnorm_forward / residual_rmsnorm_forward / rmsnorm_backward and
// src/backend/cpu/rmsnorm.rs. out = x * rstd * weight, rstd = 1/sqrt(mean(x^2) + eps).
// Storage: activations and weight bf16, rstd fp32 (a Role::Stat buffer: the backward reads it
// as saved, no recompute), dweight fp32. Arithmetic and every reduction fp32.
//
// Napkin math (memory bound; ~4 FLOPs per element), llama-3.2-1b at B=8, T=2048, C=2048
// (N*C = 33.6M elements per call):
//   forward: read inp 2 B, write out 2 B per element -> 134 MB, ~45 us at 3 TB/s.
//   residual_rmsnorm forward: read a, b, write residual, out: 8 B per element -> 268 MB, ~90 us
//            (unfused: residual 6 B + rmsnorm 4 B = 10 B per element).
//   backward: dinp kernel reads inp, dout, dinp and writes dinp (8 B); the dweight partial
//            kernel reads inp and dout again (4 B) -> 12 B per element, ~135 us.
// Determinism: dweight is summed over fixed row chunks into partials, then each channel adds
// its partials in chunk order (no float atomics), as kernels/layernorm.cu does.
#include "common.cuh"

// Sum of squares of one row over the warp's lanes (every lane gets the result).
__device__ __forceinline__ float row_sum_sq(const __nv_bfloat16* x, int c, int lane) {
    float ss = 0.0f;
    for (int i = lane; i < c; i += WARP_SIZE) {
        const float v = bf16_to_f32(x[i]);
        ss += v * v;
    }
    return warp_reduce_sum(ss);
}

// One warp per row; blockDim.x = 256 (8 rows per block). The second pass re-reads the row
// from L1.
extern "C" __global__ void rmsnorm_forward_bf16(__nv_bfloat16* __restrict__ out,
                                                float* __restrict__ rstd,
                                                const __nv_bfloat16* __restrict__ inp,
                                                const __nv_bfloat16* __restrict__ weight, int n,
                                                int c, float eps) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= n) return;
    const __nv_bfloat16* x = inp + (size_t)row * c;
    const float s = rsqrtf(row_sum_sq(x, c, lane) / c + eps);
    __nv_bfloat16* o = out + (size_t)row * c;
    for (int i = lane; i < c; i += WARP_SIZE) {
        o[i] = f32_to_bf16(bf16_to_f32(x[i]) * s * bf16_to_f32(weight[i]));
    }
    if (lane == 0) rstd[row] = s;
}

// residual = a + b (rounded to bf16), then out = rmsnorm(residual), the statistic taken over
// the rounded residual so it matches a separate residual_forward + rmsnorm_forward exactly.
extern "C" __global__ void rmsnorm_residual_rmsnorm_forward_bf16(
    __nv_bfloat16* __restrict__ residual, __nv_bfloat16* __restrict__ out,
    float* __restrict__ rstd, const __nv_bfloat16* __restrict__ a,
    const __nv_bfloat16* __restrict__ b, const __nv_bfloat16* __restrict__ weight, int n, int c,
    float eps) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= n) return;
    const size_t base = (size_t)row * c;
    __nv_bfloat16* r = residual + base;
    float ss = 0.0f;
    // Each lane reads back only the elements it wrote itself, so no synchronisation is needed.
    for (int i = lane; i < c; i += WARP_SIZE) {
        const __nv_bfloat16 v = f32_to_bf16(bf16_to_f32(a[base + i]) + bf16_to_f32(b[base + i]));
        r[i] = v;
        const float f = bf16_to_f32(v);
        ss += f * f;
    }
    const float s = rsqrtf(warp_reduce_sum(ss) / c + eps);
    __nv_bfloat16* o = out + base;
    for (int i = lane; i < c; i += WARP_SIZE) {
        o[i] = f32_to_bf16(bf16_to_f32(r[i]) * s * bf16_to_f32(weight[i]));
    }
    if (lane == 0) rstd[row] = s;
}

// Backward, step 1: one warp per row. With norm = x * rstd and dnorm = dout * weight,
// dinp += rstd * (dnorm - norm * mean(dnorm * norm)) (accumulates: the residual stream's
// gradient, see Backend::rmsnorm_backward).
extern "C" __global__ void rmsnorm_backward_dinp_bf16(__nv_bfloat16* __restrict__ dinp,
                                                      const __nv_bfloat16* __restrict__ dout,
                                                      const __nv_bfloat16* __restrict__ inp,
                                                      const __nv_bfloat16* __restrict__ weight,
                                                      const float* __restrict__ rstd, int n,
                                                      int c) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= n) return;
    const size_t base = (size_t)row * c;
    const __nv_bfloat16* x = inp + base;
    const __nv_bfloat16* dy = dout + base;
    const float s = rstd[row];
    float dot = 0.0f;
    for (int i = lane; i < c; i += WARP_SIZE) {
        dot += bf16_to_f32(dy[i]) * bf16_to_f32(weight[i]) * bf16_to_f32(x[i]) * s;
    }
    const float dnorm_norm_mean = warp_reduce_sum(dot) / c;
    __nv_bfloat16* dx = dinp + base;
    for (int i = lane; i < c; i += WARP_SIZE) {
        const float norm = bf16_to_f32(x[i]) * s;
        const float dnorm = bf16_to_f32(dy[i]) * bf16_to_f32(weight[i]);
        dx[i] = f32_to_bf16(bf16_to_f32(dx[i]) + s * (dnorm - norm * dnorm_norm_mean));
    }
}

// Backward, step 2: block (32, 8) covers 32 channels of one chunk of `rows_per_chunk` rows
// (grid (ceil(C/32), chunks)). Thread (cx, ry) sums dout * x * rstd over rows ry, ry+8, ...
// of the chunk; the 8 partial sums are added in order. partials layout: [chunk][C].
extern "C" __global__ void rmsnorm_backward_partial_bf16(float* __restrict__ partials,
                                                         const __nv_bfloat16* __restrict__ dout,
                                                         const __nv_bfloat16* __restrict__ inp,
                                                         const float* __restrict__ rstd, int n,
                                                         int c, int rows_per_chunk) {
    __shared__ float sw[8][33];
    const int cx = threadIdx.x, ry = threadIdx.y;
    const int ch = blockIdx.x * 32 + cx;
    const int chunk = blockIdx.y;
    const int r0 = chunk * rows_per_chunk;
    const int r1 = min(n, r0 + rows_per_chunk);
    float dw = 0.0f;
    if (ch < c) {
        for (int r = r0 + ry; r < r1; r += 8) {
            const size_t idx = (size_t)r * c + ch;
            dw += bf16_to_f32(dout[idx]) * bf16_to_f32(inp[idx]) * rstd[r];
        }
    }
    sw[ry][cx] = dw;
    __syncthreads();
    if (ry == 0 && ch < c) {
        float w = 0.0f;
#pragma unroll
        for (int k = 0; k < 8; k++) w += sw[k][cx];
        partials[(size_t)chunk * c + ch] = w;
    }
}

// Backward, step 3: dweight[ch] += sum over chunks (in order) of the partials.
extern "C" __global__ void rmsnorm_backward_reduce_f32(float* __restrict__ dweight,
                                                       const float* __restrict__ partials,
                                                       int chunks, int c) {
    const int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    float w = 0.0f;
    for (int k = 0; k < chunks; k++) w += partials[(size_t)k * c + ch];
    dweight[ch] += w;
}
