// gelu.cu: GELU (tanh approximation) forward and backward (and backward in place, for the
// unfused matmul_gelu_backward).
//
// Twin of Backend::gelu_forward / gelu_backward and src/backend/cpu/gelu.rs.
// All buffers bf16, arithmetic fp32.
//
// Napkin math (memory bound; GELU ~20 FLOPs per element, free next to the traffic):
//   gelu forward: read 2 B + write 2 B per element; GPT-2 small B*T*4C = 201M elements
//                 -> 805 MB, ~0.27 ms at 3 TB/s.
//   gelu backward: read inp 2 B + dout 2 B, write dinp 2 B = 6 B per element, ~0.4 ms.
#include "common.cuh"

#define GELU_SCALE 0.7978845608028654f  // sqrt(2/pi)
#define GELU_CUBIC 0.044715f

extern "C" __global__ void gelu_forward_bf16(__nv_bfloat16* __restrict__ out,
                                             const __nv_bfloat16* __restrict__ inp, size_t n) {
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float x = bf16_to_f32(inp[i]);
        const float u = GELU_SCALE * (x + GELU_CUBIC * x * x * x);
        out[i] = f32_to_bf16(0.5f * x * (1.0f + tanhf(u)));
    }
}

// gelu'(x) for the tanh approximation, with u = sqrt(2/pi) (x + 0.044715 x^3).
__device__ __forceinline__ float gelu_grad(float x) {
    const float u = GELU_SCALE * (x + GELU_CUBIC * x * x * x);
    const float th = tanhf(u);
    const float sech2 = 1.0f - th * th;
    return 0.5f * (1.0f + th) + 0.5f * x * sech2 * GELU_SCALE * (1.0f + 3.0f * GELU_CUBIC * x * x);
}

// dinp = gelu'(inp) * dout (overwrites: an activation gradient, see Backend's conventions).
extern "C" __global__ void gelu_backward_bf16(__nv_bfloat16* __restrict__ dinp,
                                              const __nv_bfloat16* __restrict__ inp,
                                              const __nv_bfloat16* __restrict__ dout, size_t n) {
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        dinp[i] = f32_to_bf16(gelu_grad(bf16_to_f32(inp[i])) * bf16_to_f32(dout[i]));
    }
}

// grad *= gelu'(pre) in place: matmul_gelu_backward where cuBLASLt's DGELU epilogue does not
// apply (src/backend/cuda/matmul.rs).
extern "C" __global__ void gelu_backward_in_place_bf16(__nv_bfloat16* __restrict__ grad,
                                                       const __nv_bfloat16* __restrict__ pre,
                                                       size_t n) {
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        grad[i] = f32_to_bf16(gelu_grad(bf16_to_f32(pre[i])) * bf16_to_f32(grad[i]));
    }
}

