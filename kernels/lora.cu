// lora.cu: the ops LoRA adds (Backend::add_columns, copy_columns, dropout_forward,
// dropout_backward; twin of src/backend/cpu/lora.rs, the specification).
//
// Layout: y [N, OC] bf16 row-major; a slice is columns col .. col+W of every row; x and out
// [N, W] dense bf16. Arithmetic fp32, one rounding to bf16 per output.
//
// Dropout's mask is recomputed from (seed, element index), never stored: with
// key = splitmix64(seed) (computed on the host), element i is kept iff
// (float)(splitmix64(key ^ i) >> 32) * 2^-32 >= p, with the integer rounded to float by
// round-to-nearest-even (__uint2float_rn) and the scale by 2^-32 exact, so the CPU and this
// kernel draw the same mask bit for bit. Kept elements are multiplied by `scale` = 1/(1-p),
// computed once on the host in f32.
//
// Napkin math (memory bound), a Llama-3.2-1B q_proj adapter at B*T = 16384, W = 2048 (33.6M
// elements): add_columns reads 4 B and writes 2 B per element -> 201 MB, ~70 us at 3 TB/s;
// copy_columns 134 MB, ~45 us; dropout over N*C = 33.6M: 134 MB, ~45 us.
#include "common.cuh"

// One block per row (grid-strided over rows), threads over the slice's columns: no 64-bit
// division per element.

// y[r, col + j] += alpha * x[r, j].
extern "C" __global__ void lora_add_columns_bf16(__nv_bfloat16* __restrict__ y,
                                                 const __nv_bfloat16* __restrict__ x, int n,
                                                 int oc, int col, int w, float alpha) {
    for (int r = blockIdx.x; r < n; r += gridDim.x) {
        __nv_bfloat16* yr = y + (size_t)r * oc + col;
        const __nv_bfloat16* xr = x + (size_t)r * w;
        for (int j = threadIdx.x; j < w; j += blockDim.x) {
            yr[j] = f32_to_bf16(bf16_to_f32(yr[j]) + alpha * bf16_to_f32(xr[j]));
        }
    }
}

// out[r, j] = alpha * y[r, col + j] (overwrites).
extern "C" __global__ void lora_copy_columns_bf16(__nv_bfloat16* __restrict__ out,
                                                  const __nv_bfloat16* __restrict__ y, int n,
                                                  int oc, int col, int w, float alpha) {
    for (int r = blockIdx.x; r < n; r += gridDim.x) {
        const __nv_bfloat16* yr = y + (size_t)r * oc + col;
        __nv_bfloat16* o = out + (size_t)r * w;
        for (int j = threadIdx.x; j < w; j += blockDim.x) {
            o[j] = f32_to_bf16(alpha * bf16_to_f32(yr[j]));
        }
    }
}

// splitmix64's output function (as cpu/lora.rs `splitmix64`).
__device__ __forceinline__ unsigned long long splitmix64(unsigned long long x) {
    unsigned long long z = x + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// out[i] = keep(key, i) ? inp[i] * scale : 0. The backward is the same map on dout.
extern "C" __global__ void lora_dropout_bf16(__nv_bfloat16* __restrict__ out,
                                             const __nv_bfloat16* __restrict__ inp, size_t n,
                                             float p, float scale, unsigned long long key) {
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const unsigned int bits = (unsigned int)(splitmix64(key ^ (unsigned long long)i) >> 32);
        const float u = __fmul_rn(__uint2float_rn(bits), 2.3283064365386963e-10f);
        out[i] = u >= p ? f32_to_bf16(bf16_to_f32(inp[i]) * scale) : f32_to_bf16(0.0f);
    }
}
