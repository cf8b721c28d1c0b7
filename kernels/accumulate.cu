// accumulate.cu: acc += x over f32 gradient buffers (Backend::accumulate; twin of the CPU's
// element loop). Gradient accumulation computes each micro-batch's gradient from zero and adds
// it here, in micro-batch order, so one process with W micro-batches sums exactly what W ranks
// with one micro-batch each sum in the all-reduce (rank order).
//
// Napkin math: 2 loads + 1 store of 4 bytes per element; gpt2-124m's fp32 gradients (124M
// values) -> 1.5 GB -> ~0.45 ms at 3.3 TB/s per accumulated micro-batch.
#include <stddef.h>

#include "common.cuh"

// acc[i] += x[i] for i < n: float4 loads and stores for the bulk when both pointers are 16-byte
// aligned (`vec` = 1, checked by the launcher), single floats for the tail (and otherwise).
extern "C" __global__ void accumulate_f32(float* __restrict__ acc, const float* __restrict__ x,
                                          size_t n, int vec) {
    const size_t first = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    size_t done = 0;
    if (vec) {
        const size_t n4 = n / 4;
        float4* a4 = reinterpret_cast<float4*>(acc);
        const float4* x4 = reinterpret_cast<const float4*>(x);
        for (size_t i = first; i < n4; i += stride) {
            float4 a = a4[i];
            const float4 b = x4[i];
            a.x += b.x;
            a.y += b.y;
            a.z += b.z;
            a.w += b.w;
            a4[i] = a;
        }
        done = n4 * 4;
    }
    for (size_t i = done + first; i < n; i += stride) acc[i] += x[i];
}
