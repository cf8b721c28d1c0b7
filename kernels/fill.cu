// fill.cu: zero-filling device buffers (Backend::fill_zero; twin of `fill(0)` on the CPU).
//
// A kernel rather than cuMemsetD8Async: `topcoat bench --kernels` on an H200 timed the driver's
// memsets at ~0.2 ms per call whatever the size (149 calls, mostly small gradient buffers, took
// 29.7 ms of a 135 ms gpt2-124m step), while a grid-stride store kernel costs one launch.
//
// Napkin math: a pure store stream; gpt2-124m's fp32 gradients are 0.5 GB -> ~0.15 ms at
// 3.3 TB/s for all of them, the largest (wte, 154 MB) ~0.05 ms.
#include <stdint.h>

#include "common.cuh"

// Zeroes `bytes` bytes at `p` (16-byte aligned: the launcher checks): 16-byte stores for the
// bulk, single bytes for the tail.
extern "C" __global__ void fill_zero_u8(unsigned char* __restrict__ p, size_t bytes) {
    const size_t n16 = bytes / 16;
    const size_t first = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    uint4* p16 = reinterpret_cast<uint4*>(p);
    for (size_t i = first; i < n16; i += stride) p16[i] = make_uint4(0u, 0u, 0u, 0u);
    const size_t tail = n16 * 16 + first;
    if (tail < bytes) p[tail] = 0;
}
