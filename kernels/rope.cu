// rope.cu: rotary position embedding (Su et al. 2021), Hugging Face's rotate-half form, in
// place on the query and key heads of qkv, forward and backward.
//
// Twin of Backend::rope_forward / rope_backward and src/backend/cpu/rope.rs.
// Layout: qkv [B, T, W] bf16 with W = (NH + 2 NKV) hs: NH query heads, NKV key heads, NKV value
// heads; the first NH + NKV heads of a row are rotated, the value heads left alone. For
// i < hs/2 the pair (x[i], x[i + hs/2]) turns by a = p * inv_freq[i] (inv_freq fp32 [hs/2]):
//   x'[i] = x[i] cos a - x[i+hs/2] sin a,   x'[i+hs/2] = x[i+hs/2] cos a + x[i] sin a.
// The backward turns the gradient by -a (the transpose of a rotation). Position p of flat row r
// = b*T + t is pos[r] (packed rows), or past + t without pos.
//
// Precision: the angle is computed in fp32 as the specification says (p * inv_freq[i], exactly
// the CPU's and Hugging Face's f32 product), then its sine and cosine in fp64. build.rs compiles
// with --use_fast_math, which turns sinf/cosf into the __sinf/__cosf intrinsics: they reduce
// the angle through the fp32 product a / (2 pi), and angles reach T * 1 rad (8192 rad at
// T = 8192, 131072 rad at Llama 3's 128K context, where that product keeps 9 fractional bits
// of a turn: errors of several 1e-3 rad, more than a bf16 step). fp64 sincos keeps its full
// range reduction under fast-math and costs little here: one sincos per (position,
// frequency), shared by all the position's NH + NKV heads through shared memory. (Its slow
// path for huge arguments is why ptxas reports a 40-byte stack frame; no spills.)
//
// One block per token row: its first hs/2 threads fill the cos/sin table, then the block
// strides over the (NH + NKV) * hs/2 pairs, consecutive threads on consecutive i (coalesced).
//
// Napkin math (memory bound), llama-3.2-1b at B=8, T=2048, NH=32, NKV=8, hs=64: per call reads
// and writes B*T*(NH+NKV)*hs = 42M bf16 -> 168 MB, ~55 us at 3 TB/s; 6 FLOPs per pair; 0.5M
// fp64 sincos (B*T*hs/2), ~10 us of fp64 throughput at worst, overlapped with the traffic.
#include "common.cuh"

#define ROPE_MAX_HALF 128  // hs <= 256

// Rotates row blockIdx.x by sign * a (sign 1 forward, -1 backward).
__device__ __forceinline__ void rope_row(__nv_bfloat16* __restrict__ qkv,
                                         const float* __restrict__ inv_freq,
                                         const int* __restrict__ pos, int past, int t, int nh,
                                         int nkv, int hs, float sign) {
    __shared__ float cos_s[ROPE_MAX_HALF];
    __shared__ float sin_s[ROPE_MAX_HALF];
    const int row = blockIdx.x;
    const int half = hs / 2;
    const int p = pos ? pos[row] : past + row % t;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const float a = (float)p * inv_freq[i];  // fp32, as specified
        double s, c;
        sincos((double)a, &s, &c);
        cos_s[i] = (float)c;
        sin_s[i] = sign * (float)s;
    }
    __syncthreads();
    __nv_bfloat16* x = qkv + (size_t)row * (nh + 2 * nkv) * hs;
    const int pairs = (nh + nkv) * half;
    for (int k = threadIdx.x; k < pairs; k += blockDim.x) {
        const int head = k / half, i = k % half;
        __nv_bfloat16* lo = x + head * hs + i;
        const float x0 = bf16_to_f32(lo[0]), x1 = bf16_to_f32(lo[half]);
        lo[0] = f32_to_bf16(x0 * cos_s[i] - x1 * sin_s[i]);
        lo[half] = f32_to_bf16(x1 * cos_s[i] + x0 * sin_s[i]);
    }
}

// Grid (B*T), block 128 threads. pos may be null (then p = past + t).
extern "C" __global__ void rope_forward_bf16(__nv_bfloat16* __restrict__ qkv,
                                             const float* __restrict__ inv_freq,
                                             const int* __restrict__ pos, int past, int t, int nh,
                                             int nkv, int hs) {
    rope_row(qkv, inv_freq, pos, past, t, nh, nkv, hs, 1.0f);
}

// The same rotation by -a over dqkv (past = 0).
extern "C" __global__ void rope_backward_bf16(__nv_bfloat16* __restrict__ dqkv,
                                              const float* __restrict__ inv_freq,
                                              const int* __restrict__ pos, int t, int nh, int nkv,
                                              int hs) {
    rope_row(dqkv, inv_freq, pos, 0, t, nh, nkv, hs, -1.0f);
}
