// adamw.cu: the AdamW update (Loshchilov & Hutter, decoupled weight decay) on fp32 master weights.
//
// Twin of Backend::adamw (src/backend/mod.rs) and the CPU reference: per element,
//   g     = grad * grad_scale
//   m     = beta1 * m + (1 - beta1) * g
//   v     = beta2 * v + (1 - beta2) * g^2
//   mhat  = m / beta1_correction,  vhat = v / beta2_correction   (correction_i = 1 - beta_i^step)
//   p    -= lr * (mhat / (sqrt(vhat) + eps) + weight_decay * p)
// and the bf16 working copy is rewritten from the updated fp32 master.
//
// Napkin math (memory bound; ~12 FLOPs per element are free next to the traffic):
//   reads  master 4 + grad 4 (fp32) + m 4 + v 4 = 16 B;  writes master 4 + param_bf16 2 + m 4 + v 4 = 14 B
//   30 B per element; GPT-2 small, 124M params: 124e6 * 30 B = 3.7 GB -> ~1.24 ms at 3 TB/s
//   (H100 SXM HBM3 peak ~3.35 TB/s; the measured roofline goes in docs/PERF.md).
#include "common.cuh"

// Grid-stride loop over n elements; any grid size is correct, ~a few blocks per SM is enough.
extern "C" __global__ void adamw_update_bf16(float* __restrict__ master,
                                             __nv_bfloat16* __restrict__ param_bf16,
                                             const float* __restrict__ grad,
                                             float* __restrict__ m,
                                             float* __restrict__ v,
                                             size_t n,
                                             float lr,
                                             float beta1,
                                             float beta2,
                                             float eps,
                                             float weight_decay,
                                             float beta1_correction,
                                             float beta2_correction,
                                             float grad_scale) {
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float g = grad[i] * grad_scale;
        const float mi = beta1 * m[i] + (1.0f - beta1) * g;
        const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        const float mhat = mi / beta1_correction;
        const float vhat = vi / beta2_correction;
        float p = master[i];
        p -= lr * (mhat / (sqrtf(vhat) + eps) + weight_decay * p);
        master[i] = p;
        param_bf16[i] = f32_to_bf16(p);
    }
}
