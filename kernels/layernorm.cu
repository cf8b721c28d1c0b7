// layernorm.cu: LayerNorm forward, residual-add + LayerNorm forward, and backward.
//
// Twin of Backend::layernorm_forward / residual_layernorm_forward / layernorm_backward and
// src/backend/cpu/layernorm.rs. Storage: activations, mean, rstd bf16; weight, bias bf16 (the
// parameter working copy); dweight, dbias fp32. Arithmetic and every reduction fp32.
//
// mean and rstd are saved (bf16, as the Backend contract asks) but the backward recomputes them
// in fp32 from inp: a bf16 rstd carries a 0.4% error that would flow straight into dinp, and the
// recompute costs one extra read of a row that is read anyway.
//
// Napkin math (memory bound; ~10 FLOPs per element):
//   forward: read inp 2 B, write out 2 B per element (weight/bias stay in L1/L2);
//            GPT-2 small N*C = 50.3M -> 201 MB, ~0.07 ms at 3 TB/s.
//   residual_layernorm forward: read a, b 4 B, write residual, out 4 B -> 8 B per element,
//            ~0.13 ms.
//   backward: dinp kernel reads inp, dout, dinp and writes dinp: 8 B per element; the
//            dweight/dbias partial kernel reads inp and dout again (4 B) -> ~0.2 ms.
// Determinism: dweight/dbias are summed over fixed row chunks into partials, then each channel
// adds its partials in chunk order (no float atomics).
#include "common.cuh"

#define LN_EPS 1e-5f

// One warp per row; blockDim.x = 256 (8 rows per block). Two passes over the row (mean, then
// centred variance), the row stays in L1.
extern "C" __global__ void layernorm_forward_bf16(__nv_bfloat16* __restrict__ out,
                                                  __nv_bfloat16* __restrict__ mean,
                                                  __nv_bfloat16* __restrict__ rstd,
                                                  const __nv_bfloat16* __restrict__ inp,
                                                  const __nv_bfloat16* __restrict__ weight,
                                                  const __nv_bfloat16* __restrict__ bias,
                                                  int n, int c) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= n) return;
    const __nv_bfloat16* x = inp + (size_t)row * c;
    float sum = 0.0f;
    for (int i = lane; i < c; i += WARP_SIZE) sum += bf16_to_f32(x[i]);
    const float m = warp_reduce_sum(sum) / c;
    float var = 0.0f;
    for (int i = lane; i < c; i += WARP_SIZE) {
        const float d = bf16_to_f32(x[i]) - m;
        var += d * d;
    }
    const float s = rsqrtf(warp_reduce_sum(var) / c + LN_EPS);
    __nv_bfloat16* o = out + (size_t)row * c;
    for (int i = lane; i < c; i += WARP_SIZE) {
        const float norm = (bf16_to_f32(x[i]) - m) * s;
        o[i] = f32_to_bf16(norm * bf16_to_f32(weight[i]) + bf16_to_f32(bias[i]));
    }
    if (lane == 0) {
        mean[row] = f32_to_bf16(m);
        rstd[row] = f32_to_bf16(s);
    }
}

// residual = a + b (rounded to bf16), then out = layernorm(residual), statistics taken over the
// rounded residual so they match a separate residual_forward + layernorm_forward exactly.
extern "C" __global__ void layernorm_residual_layernorm_forward_bf16(
    __nv_bfloat16* __restrict__ residual, __nv_bfloat16* __restrict__ out,
    __nv_bfloat16* __restrict__ mean, __nv_bfloat16* __restrict__ rstd,
    const __nv_bfloat16* __restrict__ a, const __nv_bfloat16* __restrict__ b,
    const __nv_bfloat16* __restrict__ weight, const __nv_bfloat16* __restrict__ bias, int n,
    int c) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= n) return;
    const size_t base = (size_t)row * c;
    __nv_bfloat16* r = residual + base;
    float sum = 0.0f;
    // Each lane reads back only the elements it wrote itself, so no synchronisation is needed.
    for (int i = lane; i < c; i += WARP_SIZE) {
        const __nv_bfloat16 v = f32_to_bf16(bf16_to_f32(a[base + i]) + bf16_to_f32(b[base + i]));
        r[i] = v;
        sum += bf16_to_f32(v);
    }
    const float m = warp_reduce_sum(sum) / c;
    float var = 0.0f;
    for (int i = lane; i < c; i += WARP_SIZE) {
        const float d = bf16_to_f32(r[i]) - m;
        var += d * d;
    }
    const float s = rsqrtf(warp_reduce_sum(var) / c + LN_EPS);
    __nv_bfloat16* o = out + base;
    for (int i = lane; i < c; i += WARP_SIZE) {
        const float norm = (bf16_to_f32(r[i]) - m) * s;
        o[i] = f32_to_bf16(norm * bf16_to_f32(weight[i]) + bf16_to_f32(bias[i]));
    }
    if (lane == 0) {
        mean[row] = f32_to_bf16(m);
        rstd[row] = f32_to_bf16(s);
    }
}

// Backward, step 1: one warp per row. Recomputes mean and rstd in fp32 (saved to `stats`
// [2N] for step 2), then dinp += rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm)) with
// dnorm = dout * weight.
extern "C" __global__ void layernorm_backward_dinp_bf16(__nv_bfloat16* __restrict__ dinp,
                                                        float* __restrict__ stats,
                                                        const __nv_bfloat16* __restrict__ dout,
                                                        const __nv_bfloat16* __restrict__ inp,
                                                        const __nv_bfloat16* __restrict__ weight,
                                                        int n, int c) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= n) return;
    const size_t base = (size_t)row * c;
    const __nv_bfloat16* x = inp + base;
    const __nv_bfloat16* dy = dout + base;
    float sum = 0.0f;
    for (int i = lane; i < c; i += WARP_SIZE) sum += bf16_to_f32(x[i]);
    const float m = warp_reduce_sum(sum) / c;
    float var = 0.0f;
    for (int i = lane; i < c; i += WARP_SIZE) {
        const float d = bf16_to_f32(x[i]) - m;
        var += d * d;
    }
    const float s = rsqrtf(warp_reduce_sum(var) / c + LN_EPS);
    float dnorm_sum = 0.0f, dnorm_norm_sum = 0.0f;
    for (int i = lane; i < c; i += WARP_SIZE) {
        const float norm = (bf16_to_f32(x[i]) - m) * s;
        const float dnorm = bf16_to_f32(dy[i]) * bf16_to_f32(weight[i]);
        dnorm_sum += dnorm;
        dnorm_norm_sum += dnorm * norm;
    }
    const float dnorm_mean = warp_reduce_sum(dnorm_sum) / c;
    const float dnorm_norm_mean = warp_reduce_sum(dnorm_norm_sum) / c;
    __nv_bfloat16* dx = dinp + base;
    for (int i = lane; i < c; i += WARP_SIZE) {
        const float norm = (bf16_to_f32(x[i]) - m) * s;
        const float dnorm = bf16_to_f32(dy[i]) * bf16_to_f32(weight[i]);
        dx[i] = f32_to_bf16(bf16_to_f32(dx[i]) + s * (dnorm - dnorm_mean - norm * dnorm_norm_mean));
    }
    if (lane == 0) {
        stats[2 * row] = m;
        stats[2 * row + 1] = s;
    }
}

// Backward, step 2: block (32, 8) covers 32 channels of one chunk of `rows_per_chunk` rows
// (grid (ceil(C/32), chunks)). Thread (cx, ry) sums rows ry, ry+8, ... of the chunk; the 8
// partial sums are added in order. partials layout: [chunk][2][C] (dweight then dbias).
extern "C" __global__ void layernorm_backward_partial_bf16(float* __restrict__ partials,
                                                           const float* __restrict__ stats,
                                                           const __nv_bfloat16* __restrict__ dout,
                                                           const __nv_bfloat16* __restrict__ inp,
                                                           int n, int c, int rows_per_chunk) {
    __shared__ float sw[8][33];
    __shared__ float sb[8][33];
    const int cx = threadIdx.x, ry = threadIdx.y;
    const int ch = blockIdx.x * 32 + cx;
    const int chunk = blockIdx.y;
    const int r0 = chunk * rows_per_chunk;
    const int r1 = min(n, r0 + rows_per_chunk);
    float dw = 0.0f, db = 0.0f;
    if (ch < c) {
        for (int r = r0 + ry; r < r1; r += 8) {
            const size_t idx = (size_t)r * c + ch;
            const float dy = bf16_to_f32(dout[idx]);
            const float norm = (bf16_to_f32(inp[idx]) - stats[2 * r]) * stats[2 * r + 1];
            dw += dy * norm;
            db += dy;
        }
    }
    sw[ry][cx] = dw;
    sb[ry][cx] = db;
    __syncthreads();
    if (ry == 0 && ch < c) {
        float w = 0.0f, b = 0.0f;
#pragma unroll
        for (int k = 0; k < 8; k++) {
            w += sw[k][cx];
            b += sb[k][cx];
        }
        partials[(size_t)chunk * 2 * c + ch] = w;
        partials[(size_t)chunk * 2 * c + c + ch] = b;
    }
}

// Backward, step 3: dweight[ch] += sum over chunks (in order) of the partials; same for dbias.
extern "C" __global__ void layernorm_backward_reduce_f32(float* __restrict__ dweight,
                                                         float* __restrict__ dbias,
                                                         const float* __restrict__ partials,
                                                         int chunks, int c) {
    const int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    float w = 0.0f, b = 0.0f;
    for (int k = 0; k < chunks; k++) {
        w += partials[(size_t)k * 2 * c + ch];
        b += partials[(size_t)k * 2 * c + c + ch];
    }
    dweight[ch] += w;
    dbias[ch] += b;
}
