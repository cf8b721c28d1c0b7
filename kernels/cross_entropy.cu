// cross_entropy.cu: fused softmax + cross-entropy over a padded vocabulary, with the logits
// gradient written in place, scaled uniformly or per row.
//
// Twin of Backend::cross_entropy and src/backend/cpu/cross_entropy.rs. One block per row:
// max, sum of exp, loss, and (when has_grad) dlogits = w * (softmax - onehot) over [0, V) and 0
// over [V, VP), all in one kernel, fp32 math on bf16 logits. The row weight is
// w = scale * row_weights[row] when row_weights is not null (DPO's per-sequence coefficients),
// else w = scale. A masked row (target < 0) gets loss 0 and, with a gradient, an all-zero row.
// The loss is stored as bf16 (`_bf16`) or fp32 (`_bf16_f32loss`: logits bf16, losses fp32, for
// callers that sum per-row losses, e.g. sequence log-probabilities).
//
// Napkin math (memory bound; ~5 FLOPs per logit): reads the V logits of a row twice (max, then
// exp-sum; the second read mostly hits L2 for V = 50304, 100 KB per row) and a third time for
// the gradient, writes VP: ~6-8 B per logit from DRAM; the row weight and the loss are 4-8 B
// per row, nothing next to that. GPT-2 small N*VP = 65536*50304 = 3.3G logits -> ~20-26 GB,
// ~7-9 ms at 3 TB/s; fusing max and sum (online softmax) is the next step.
#include "common.cuh"

__device__ __forceinline__ void store_loss(__nv_bfloat16* p, float x) { *p = f32_to_bf16(x); }
__device__ __forceinline__ void store_loss(float* p, float x) { *p = x; }

template <typename LossT>
__device__ __forceinline__ void cross_entropy_row(LossT* __restrict__ losses,
                                                  __nv_bfloat16* __restrict__ logits,
                                                  const int* __restrict__ targets,
                                                  const float* __restrict__ row_weights, int v,
                                                  int vp, int has_grad, float scale) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    const int target = targets[row];
    __nv_bfloat16* x = logits + (size_t)row * vp;
    if (target < 0) {
        if (threadIdx.x == 0) store_loss(losses + row, 0.0f);
        if (has_grad) {
            for (int j = threadIdx.x; j < vp; j += blockDim.x) x[j] = f32_to_bf16(0.0f);
        }
        return;
    }
    // Read before any thread overwrites the row (the reductions below hold __syncthreads).
    const float x_target = bf16_to_f32(x[target]);
    float m = -FLT_MAX;
    for (int j = threadIdx.x; j < v; j += blockDim.x) m = fmaxf(m, bf16_to_f32(x[j]));
    m = block_reduce_max(m, scratch);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) sum += expf(bf16_to_f32(x[j]) - m);
    sum = block_reduce_sum(sum, scratch);
    const float lse = m + logf(sum);
    if (threadIdx.x == 0) store_loss(losses + row, lse - x_target);
    if (has_grad) {
        const float w = row_weights != nullptr ? scale * row_weights[row] : scale;
        for (int j = threadIdx.x; j < vp; j += blockDim.x) {
            float g = 0.0f;
            if (j < v) {
                const float p = expf(bf16_to_f32(x[j]) - lse);
                g = w * (p - (j == target ? 1.0f : 0.0f));
            }
            x[j] = f32_to_bf16(g);
        }
    }
}

extern "C" __global__ void cross_entropy_forward_bf16(__nv_bfloat16* __restrict__ losses,
                                                      __nv_bfloat16* __restrict__ logits,
                                                      const int* __restrict__ targets,
                                                      const float* __restrict__ row_weights,
                                                      int v, int vp, int has_grad, float scale) {
    cross_entropy_row(losses, logits, targets, row_weights, v, vp, has_grad, scale);
}

extern "C" __global__ void cross_entropy_forward_bf16_f32loss(float* __restrict__ losses,
                                                              __nv_bfloat16* __restrict__ logits,
                                                              const int* __restrict__ targets,
                                                              const float* __restrict__ row_weights,
                                                              int v, int vp, int has_grad,
                                                              float scale) {
    cross_entropy_row(losses, logits, targets, row_weights, v, vp, has_grad, scale);
}
