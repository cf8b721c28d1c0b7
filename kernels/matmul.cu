// matmul.cu: the small kernels around the cuBLASLt matmuls (src/backend/cuda/matmul.rs).
//
// The GEMMs themselves (forward with bias epilogue, backward dinp and dweight) run in cuBLASLt;
// this file holds the bias gradient: dbias[oc] += sum over rows of dout[row, oc], bf16 in, fp32
// out, deterministic (fixed row chunks, then chunk partials added in order; no float atomics).
//
// Napkin math: reads dout once, 2 B per element, 1 FLOP; GPT-2 small fc layer N*4C = 201M
// elements -> 403 MB, ~0.13 ms at 3 TB/s (the partials, chunks * OC * 4 B, are small).
#include "common.cuh"

// Block (32, 8), grid (ceil(OC/32), chunks): partials[chunk][oc] = sum of dout over the chunk's rows.
extern "C" __global__ void matmul_bias_backward_partial_bf16(float* __restrict__ partials,
                                                             const __nv_bfloat16* __restrict__ dout,
                                                             int n, int oc, int rows_per_chunk) {
    __shared__ float s[8][33];
    const int cx = threadIdx.x, ry = threadIdx.y;
    const int col = blockIdx.x * 32 + cx;
    const int chunk = blockIdx.y;
    const int r0 = chunk * rows_per_chunk;
    const int r1 = min(n, r0 + rows_per_chunk);
    float acc = 0.0f;
    if (col < oc) {
        for (int r = r0 + ry; r < r1; r += 8) acc += bf16_to_f32(dout[(size_t)r * oc + col]);
    }
    s[ry][cx] = acc;
    __syncthreads();
    if (ry == 0 && col < oc) {
        float total = 0.0f;
#pragma unroll
        for (int k = 0; k < 8; k++) total += s[k][cx];
        partials[(size_t)chunk * oc + col] = total;
    }
}

// dbias[oc] += sum over chunks, in order, of partials[chunk][oc].
extern "C" __global__ void matmul_bias_backward_reduce_f32(float* __restrict__ dbias,
                                                           const float* __restrict__ partials,
                                                           int chunks, int oc) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= oc) return;
    float acc = 0.0f;
    for (int k = 0; k < chunks; k++) acc += partials[(size_t)k * oc + col];
    dbias[col] += acc;
}
