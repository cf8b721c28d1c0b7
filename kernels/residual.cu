// residual.cu: the residual add, out = a + b (Backend::residual_forward; twin of
// src/backend/cpu/residual.rs). All buffers bf16, the add in fp32.
//
// Napkin math (memory bound, one FLOP per element): read 4 B, write 2 B per element;
// GPT-2 small B*T*C = 50.3M -> 302 MB, ~0.1 ms at 3 TB/s.
#include "common.cuh"

// out = a + b.
extern "C" __global__ void residual_forward_bf16(__nv_bfloat16* __restrict__ out,
                                                 const __nv_bfloat16* __restrict__ a,
                                                 const __nv_bfloat16* __restrict__ b,
                                                 size_t n) {
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        out[i] = f32_to_bf16(bf16_to_f32(a[i]) + bf16_to_f32(b[i]));
    }
}
