// cross_entropy.cu: fused softmax + cross-entropy over a padded vocabulary, with the logits
// gradient written in place.
//
// Twin of Backend::cross_entropy and src/backend/cpu/cross_entropy.rs. One block per row:
// max, sum of exp, loss, and (when has_grad) dlogits = dloss * (softmax - onehot) over [0, V)
// and 0 over [V, VP), all in one kernel, fp32 math on bf16 logits. A masked row (target < 0)
// gets loss 0 and, with a gradient, an all-zero row.
//
// Napkin math (memory bound; ~5 FLOPs per logit): one read of the row for an online max and
// sum of exp (running max m and sum s per thread, merged across the block), a second read and
// one write for the gradient. GPT-2 small N*VP = 65536*50304 = 3.3G logits, 6.6 GB in bf16:
// ~20 GB moved (less where the second read hits L2), ~5 ms at 4 TB/s. Rows whose length is a
// multiple of 8 (every padded vocabulary) move 16 bytes per access.
#include "common.cuh"

// Folds x into a running (max, sum of exp(. - max)).
__device__ __forceinline__ void online_add(float& m, float& s, float x) {
    if (x > m) {
        s = s * __expf(m - x) + 1.0f;
        m = x;
    } else {
        s += __expf(x - m);
    }
}

extern "C" __global__ void cross_entropy_forward_bf16(__nv_bfloat16* __restrict__ losses,
                                                      __nv_bfloat16* __restrict__ logits,
                                                      const int* __restrict__ targets, int v,
                                                      int vp, int has_grad, float dloss) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    const int target = targets[row];
    __nv_bfloat16* x = logits + (size_t)row * vp;
    // 16-byte accesses when every row starts 16-byte aligned (VP a multiple of 8).
    const bool wide = vp % 8 == 0;
    if (target < 0) {
        if (threadIdx.x == 0) losses[row] = f32_to_bf16(0.0f);
        if (has_grad) {
            for (int j = threadIdx.x; j < vp; j += blockDim.x) x[j] = f32_to_bf16(0.0f);
        }
        return;
    }
    // Read before any thread overwrites the row (the reductions below hold __syncthreads).
    const float x_target = bf16_to_f32(x[target]);
    float m = -FLT_MAX, s = 0.0f;
    if (wide) {
        for (int j0 = threadIdx.x * 8; j0 < v; j0 += blockDim.x * 8) {
            const uint4 raw = *reinterpret_cast<const uint4*>(x + j0);
            const __nv_bfloat16* e = reinterpret_cast<const __nv_bfloat16*>(&raw);
#pragma unroll
            for (int k = 0; k < 8; k++) {
                if (j0 + k < v) online_add(m, s, bf16_to_f32(e[k]));
            }
        }
    } else {
        for (int j = threadIdx.x; j < v; j += blockDim.x) online_add(m, s, bf16_to_f32(x[j]));
    }
    const float row_max = block_reduce_max(m, scratch);
    // A thread that saw nothing has s = 0, and exp of a finite difference is finite: no NaN.
    const float sum = block_reduce_sum(s * __expf(m - row_max), scratch);
    const float lse = row_max + logf(sum);
    if (threadIdx.x == 0) losses[row] = f32_to_bf16(lse - x_target);
    if (!has_grad) return;
    if (wide) {
        for (int j0 = threadIdx.x * 8; j0 < vp; j0 += blockDim.x * 8) {
            uint4 raw = *reinterpret_cast<const uint4*>(x + j0);
            __nv_bfloat16* e = reinterpret_cast<__nv_bfloat16*>(&raw);
#pragma unroll
            for (int k = 0; k < 8; k++) {
                const int j = j0 + k;
                float g = 0.0f;
                if (j < v) g = dloss * (__expf(bf16_to_f32(e[k]) - lse) - (j == target ? 1.0f : 0.0f));
                e[k] = f32_to_bf16(g);
            }
            *reinterpret_cast<uint4*>(x + j0) = raw;
        }
    } else {
        for (int j = threadIdx.x; j < vp; j += blockDim.x) {
            float g = 0.0f;
            if (j < v) g = dloss * (__expf(bf16_to_f32(x[j]) - lse) - (j == target ? 1.0f : 0.0f));
            x[j] = f32_to_bf16(g);
        }
    }
}
