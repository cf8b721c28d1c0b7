// swiglu.cu: the SwiGLU gate of the Llama family's MLP (Shazeer 2020), forward and backward.
//
// Twin of Backend::swiglu_forward / swiglu_backward and src/backend/cpu/swiglu.rs.
// Layout: gate_up [N, 2I] bf16 (gate in the first I columns of a row, up in the last I: the
// fused gate_up_proj matmul's output), out and dout [N, I], dgate_up [N, 2I]. All bf16,
// arithmetic fp32. out = silu(gate) * up, silu(g) = g * sigmoid(g).
// Backward: dup = dout * silu(g); dgate = dout * up * sigmoid(g) * (1 + g * (1 - sigmoid(g))).
//
// One block per row (grid N, 256 threads striding over the I columns): no 64-bit division per
// element, and a row's gate and up halves are each read contiguously.
//
// Napkin math (memory bound; ~10 FLOPs per element), llama-3.2-1b at B=8, T=2048, I=8192
// (N*I = 134M per call): forward reads 4 B and writes 2 B per element -> 805 MB, ~270 us at
// 3 TB/s; backward reads gate, up, dout (6 B) and writes dgate, dup (4 B) -> 1.34 GB, ~450 us.
#include "common.cuh"

// 1 / (1 + e^-x) with an IEEE reciprocal: 0 (not NaN) where e^-x overflows to inf, whatever
// --use_fast_math makes of `/`.
__device__ __forceinline__ float sigmoid(float x) { return __frcp_rn(1.0f + expf(-x)); }

extern "C" __global__ void swiglu_forward_bf16(__nv_bfloat16* __restrict__ out,
                                               const __nv_bfloat16* __restrict__ gate_up, int i) {
    const size_t row = blockIdx.x;
    const __nv_bfloat16* g = gate_up + row * 2 * i;
    __nv_bfloat16* o = out + row * i;
    for (int j = threadIdx.x; j < i; j += blockDim.x) {
        const float x = bf16_to_f32(g[j]);
        o[j] = f32_to_bf16(x * sigmoid(x) * bf16_to_f32(g[i + j]));
    }
}

// dgate_up overwrites (an activation gradient, see Backend's conventions).
extern "C" __global__ void swiglu_backward_bf16(__nv_bfloat16* __restrict__ dgate_up,
                                                const __nv_bfloat16* __restrict__ dout,
                                                const __nv_bfloat16* __restrict__ gate_up, int i) {
    const size_t row = blockIdx.x;
    const __nv_bfloat16* g = gate_up + row * 2 * i;
    const __nv_bfloat16* dy = dout + row * i;
    __nv_bfloat16* dg = dgate_up + row * 2 * i;
    for (int j = threadIdx.x; j < i; j += blockDim.x) {
        const float x = bf16_to_f32(g[j]), up = bf16_to_f32(g[i + j]), d = bf16_to_f32(dy[j]);
        const float sg = sigmoid(x);
        dg[j] = f32_to_bf16(d * up * sg * (1.0f + x * (1.0f - sg)));
        dg[i + j] = f32_to_bf16(d * x * sg);
    }
}
