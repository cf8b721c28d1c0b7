// common.cuh: device helpers shared by every kernel family in kernels/*.cu.
//
// What lives here: bf16 <-> fp32 conversion, warp and block reductions (sum, max) and ceil_div.
// Everything is header-only (__device__ __forceinline__ or constexpr), so each .cu file that
// includes it compiles on its own; build.rs passes `-I kernels`.
// Conventions (docs/BUILD.md, DESIGN.md): kernels are `extern "C"`, named
// `<family>_<op>_<dtype>`; bf16 storage, fp32 arithmetic and accumulation.
#pragma once

#include <cuda_bf16.h>
#include <float.h>
#include <stddef.h>

constexpr int WARP_SIZE = 32;

// Number of blocks of `b` needed to cover `a` items.
template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) {
    return (a + b - 1) / b;
}

// ---- bf16 <-> fp32 ----------------------------------------------------------------------------
__device__ __forceinline__ float bf16_to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
// Round to nearest even.
__device__ __forceinline__ __nv_bfloat16 f32_to_bf16(float x) { return __float2bfloat16_rn(x); }

// ---- warp reductions: every lane of the warp gets the result ----------------------------------
__device__ __forceinline__ float warp_reduce_sum(float x) {
#pragma unroll
    for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2) {
        x += __shfl_xor_sync(0xffffffffu, x, offset);
    }
    return x;
}

__device__ __forceinline__ float warp_reduce_max(float x) {
#pragma unroll
    for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2) {
        x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
    }
    return x;
}

// ---- block reductions: every thread of the block gets the result ------------------------------
// Requirements: blockDim.x is a multiple of 32 (at most 1024), every thread of the block calls
// it (it holds __syncthreads), and `scratch` is __shared__ float[32], reusable after return.
__device__ __forceinline__ float block_reduce_sum(float x, float* scratch) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int n_warps = blockDim.x / WARP_SIZE;
    x = warp_reduce_sum(x);
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = lane < n_warps ? scratch[lane] : 0.0f;
    x = warp_reduce_sum(x);
    __syncthreads();  // scratch may be reused by the caller
    return x;
}

__device__ __forceinline__ float block_reduce_max(float x, float* scratch) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int n_warps = blockDim.x / WARP_SIZE;
    x = warp_reduce_max(x);
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = lane < n_warps ? scratch[lane] : -FLT_MAX;
    x = warp_reduce_max(x);
    __syncthreads();
    return x;
}

// ---- attention's qkv layout (attention.cu, attention_mma.cu, decode.cu) -----------------------
// A qkv row holds NH query heads, then NKV key heads, then NKV value heads, hs = C / NH columns
// each: width w = (NH + 2 NKV) hs (3C when NKV = NH). Query head h reads key/value head
// h / (NH / NKV) (grouped-query attention; NKV = 1 is multi-query).
struct HeadCols {
    int w;  // row width
    int q;  // first column of query head h
    int k;  // first column of its key head
    int v;  // first column of its value head
};

__device__ __forceinline__ HeadCols head_cols(int h, int c, int nh, int nkv) {
    const int hs = c / nh, kvh = h / (nh / nkv);
    return {c + 2 * nkv * hs, h * hs, c + kvh * hs, c + (nkv + kvh) * hs};
}
