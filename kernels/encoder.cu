// encoder.cu: token + position embedding, forward and backward.
//
// Twin of Backend::encoder_forward / encoder_backward and src/backend/cpu/encoder.rs.
// Storage: wte, wpe, out, dout bf16; dwte, dwpe fp32 (gradients); ids int32.
//
// Napkin math (memory bound, ~1 FLOP per element):
//   forward  reads wte row 2 B + wpe row 2 B, writes out 2 B = 6 B per element;
//            GPT-2 small B*T*C = 64*1024*768 = 50.3M elements -> 302 MB, ~0.1 ms at 3 TB/s.
//   backward reads dout once for dwte (2 B) and once for dwpe (2 B), read-modify-writes the
//            touched dwte rows and dwpe (8 B each); ~10 B per element -> ~0.17 ms.
// Determinism: no float atomics. dwte is summed per distinct token by one block that walks that
// token's positions in increasing order (the bucket lists are built on the host); dwpe is summed
// per (t, c) over the batch in order, or, with explicit positions, by the same bucket kernel as
// dwte with buckets keyed by position.
// Explicit positions (packed rows): the forward reads one more int per row of C elements;
// the backward's bucket walk costs what the dwte walk costs.
// The token embedding alone (Backend::embedding_forward / embedding_backward, the Llama
// family, no wpe): encoder_embedding_forward_bf16 copies rows; the backward is the dwte bucket
// kernel below. llama-3.2-1b at B=8, T=2048, C=2048: forward reads and writes 33.6M bf16
// (134 MB, ~45 us at 3 TB/s); backward reads dout (67 MB) and read-modify-writes the touched
// fp32 rows of dwte (at most 268 MB), ~110 us.
#include "common.cuh"

// out[p, c] = wte[ids[p], c] + wpe[p % T, c], grid-stride over N*C elements.
extern "C" __global__ void encoder_forward_bf16(__nv_bfloat16* __restrict__ out,
                                                const int* __restrict__ ids,
                                                const __nv_bfloat16* __restrict__ wte,
                                                const __nv_bfloat16* __restrict__ wpe,
                                                int n, int t, int c) {
    const size_t total = (size_t)n * c;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const int pos = (int)(i / c);
        const int ch = (int)(i % c);
        const float x = bf16_to_f32(wte[(size_t)ids[pos] * c + ch]) +
                        bf16_to_f32(wpe[(size_t)(pos % t) * c + ch]);
        out[i] = f32_to_bf16(x);
    }
}

// out[p, c] = wte[ids[p], c] + wpe[pos[p], c]: explicit positions, each in [0, Tmax)
// (checked on the host).
extern "C" __global__ void encoder_forward_pos_bf16(__nv_bfloat16* __restrict__ out,
                                                    const int* __restrict__ ids,
                                                    const int* __restrict__ pos,
                                                    const __nv_bfloat16* __restrict__ wte,
                                                    const __nv_bfloat16* __restrict__ wpe,
                                                    int n, int c) {
    const size_t total = (size_t)n * c;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const int p = (int)(i / c);
        const int ch = (int)(i % c);
        const float x = bf16_to_f32(wte[(size_t)ids[p] * c + ch]) +
                        bf16_to_f32(wpe[(size_t)pos[p] * c + ch]);
        out[i] = f32_to_bf16(x);
    }
}

// out[p, :] = wte[ids[p], :]: one block per token position, threads striding over C.
extern "C" __global__ void encoder_embedding_forward_bf16(__nv_bfloat16* __restrict__ out,
                                                          const int* __restrict__ ids,
                                                          const __nv_bfloat16* __restrict__ wte,
                                                          int c) {
    const size_t p = blockIdx.x;
    const __nv_bfloat16* src = wte + (size_t)ids[p] * c;
    __nv_bfloat16* dst = out + p * c;
    for (int ch = threadIdx.x; ch < c; ch += blockDim.x) dst[ch] = src[ch];
}

// One block per distinct token: bucket k owns token bucket_token[k] and the positions
// order[bucket_start[k] .. bucket_start[k+1]] (ascending). Threads stride over channels.
// With explicit positions the launcher also runs it on dwpe, buckets keyed by position.
extern "C" __global__ void encoder_backward_wte_f32(float* __restrict__ dwte,
                                                    const __nv_bfloat16* __restrict__ dout,
                                                    const int* __restrict__ order,
                                                    const int* __restrict__ bucket_start,
                                                    const int* __restrict__ bucket_token,
                                                    int c) {
    const int k = blockIdx.x;
    const int begin = bucket_start[k];
    const int end = bucket_start[k + 1];
    float* row = dwte + (size_t)bucket_token[k] * c;
    for (int ch = threadIdx.x; ch < c; ch += blockDim.x) {
        float acc = 0.0f;
        for (int i = begin; i < end; i++) {
            acc += bf16_to_f32(dout[(size_t)order[i] * c + ch]);
        }
        row[ch] += acc;
    }
}

// dwpe[t, c] += sum_b dout[b, t, c], grid-stride over T*C, batch summed in order.
extern "C" __global__ void encoder_backward_wpe_f32(float* __restrict__ dwpe,
                                                    const __nv_bfloat16* __restrict__ dout,
                                                    int b, int t, int c) {
    const size_t total = (size_t)t * c;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        float acc = 0.0f;
        for (int bb = 0; bb < b; bb++) {
            acc += bf16_to_f32(dout[(size_t)bb * total + i]);
        }
        dwpe[i] += acc;
    }
}
