// decode.cu: causal attention of Tn new positions over a key/value cache, for generation.
//
// Twin of Backend::attention_gqa_cached_forward (and so of attention_cached_forward, NKV = NH)
// and src/backend/cpu/decode.rs.
// Layout: qkv [B, Tn, (NH + 2 NKV) hs] bf16 (NH query heads | NKV key heads | NKV value heads
// per new position, HeadCols in common.cuh; [B, Tn, 3C] when NKV = NH), k_cache and v_cache
// [B, Tmax, NKV hs] bf16, out [B, Tn, C] bf16. Query head h reads key/value head h / (NH / NKV).
// Head size hs = C / NH, at most DEC_MAX_HS = 128. Arithmetic and accumulation in fp32.
//
// Two kernels in stream order:
//   append: copies the new k and v heads into cache rows past .. past+Tn (grid-stride).
//   attention: one block per (new position i, b*NH + h); its DEC_WARPS warps split the
//     L = past + i + 1 keys into tiles of 32 (warp w takes tiles w, w + DEC_WARPS, ...). Each
//     lane holds the query dims lane, lane+32, lane+64, lane+96 in registers; per key the warp
//     reduces the partial dot products (coalesced 2*hs-byte row reads, no shared-memory tile),
//     lane jj keeps the score of key jj of the tile, then the warp does the online-softmax
//     update of forward attention and accumulates p_j v_j. The warps' (max, sum, out) triples
//     are merged in shared memory at the end. A decode step (Tn = 1) thus still spreads each
//     head's keys over 8 warps instead of one.
//
// Napkin math (GPT-2 small decode, B = 1, C = 768, L = 1024): per layer the kernel reads
// K and V, 2 * L * C * 2 B = 3.1 MB, and does 4 * L * C = 3.1 MFLOP: memory bound, ~1-2 us at
// ~3 TB/s if the 12 (b, h) blocks could pull full bandwidth; in practice 12 blocks on 132 SMs
// are latency bound (each warp walks 4 tiles of 32 keys with a 5-step shuffle reduction per
// key), so expect ~10-20 us per layer. Prefill (Tn = T) reads the cache once per query row
// (L2 traffic ~ T^2 * C * 2 B per layer) and is not tuned: it runs once per prompt.
#include "common.cuh"

#define DEC_MAX_HS 128
#define DEC_WARPS 8
#define DEC_TILE 32
#define DEC_DPL (DEC_MAX_HS / WARP_SIZE)  // dims per lane

// Grid-stride over B * Tn * ckv (ckv = NKV hs): k_cache[b, past + i, :] = the key heads of
// qkv[b, i, :] (columns C .. C + ckv), v_cache likewise (the next ckv columns).
extern "C" __global__ void decode_kv_append_bf16(__nv_bfloat16* __restrict__ k_cache,
                                                 __nv_bfloat16* __restrict__ v_cache,
                                                 const __nv_bfloat16* __restrict__ qkv, int b,
                                                 int tn, int past, int tmax, int c, int nh,
                                                 int nkv) {
    const int ckv = nkv * (c / nh);
    const size_t w = (size_t)c + 2 * ckv;
    const size_t total = (size_t)b * tn * ckv;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        const size_t row = idx / ckv;  // b * tn + i
        const int d = (int)(idx % ckv);
        const int bb = (int)(row / tn), i = (int)(row % tn);
        const size_t src = row * w + c + d;
        const size_t dst = ((size_t)bb * tmax + past + i) * ckv + d;
        k_cache[dst] = qkv[src];
        v_cache[dst] = qkv[src + ckv];
    }
}

// Grid (Tn, B * NH), block DEC_WARPS * 32 threads. The caches must already hold the new rows.
extern "C" __global__ void __launch_bounds__(DEC_WARPS * WARP_SIZE)
    decode_attention_bf16(__nv_bfloat16* __restrict__ out, const __nv_bfloat16* __restrict__ qkv,
                          const __nv_bfloat16* __restrict__ k_cache,
                          const __nv_bfloat16* __restrict__ v_cache, int tn, int past, int tmax,
                          int c, int nh, int nkv, float scale) {
    __shared__ float o_s[DEC_WARPS][DEC_MAX_HS];
    __shared__ float m_s[DEC_WARPS];
    __shared__ float l_s[DEC_WARPS];
    const int hs = c / nh;
    const int i = blockIdx.x;
    const int bh = blockIdx.y, bb = bh / nh, h = bh % nh;
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const int keys = past + i + 1;
    const HeadCols hc = head_cols(h, c, nh, nkv);
    const int ckv = nkv * hs;                // a cache row
    const int kv_col = hc.k - c;             // head h's key/value head within a cache row
    const __nv_bfloat16* q = qkv + ((size_t)bb * tn + i) * hc.w + hc.q;
    const __nv_bfloat16* kbase = k_cache + (size_t)bb * tmax * ckv + kv_col;
    const __nv_bfloat16* vbase = v_cache + (size_t)bb * tmax * ckv + kv_col;
    float qr[DEC_DPL], o[DEC_DPL];
#pragma unroll
    for (int r = 0; r < DEC_DPL; r++) {
        const int d = lane + r * WARP_SIZE;
        qr[r] = d < hs ? bf16_to_f32(q[d]) * scale : 0.0f;
        o[r] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    for (int j0 = warp * DEC_TILE; j0 < keys; j0 += DEC_WARPS * DEC_TILE) {
        const int n_in = min(DEC_TILE, keys - j0);  // warp-uniform
        float s_mine = -INFINITY;
        for (int jj = 0; jj < n_in; jj++) {
            const __nv_bfloat16* kr = kbase + (size_t)(j0 + jj) * ckv;
            float part = 0.0f;
#pragma unroll
            for (int r = 0; r < DEC_DPL; r++) {
                const int d = lane + r * WARP_SIZE;
                if (d < hs) part += qr[r] * bf16_to_f32(kr[d]);
            }
            const float s = warp_reduce_sum(part);
            if (lane == jj) s_mine = s;
        }
        const float m_new = fmaxf(m, warp_reduce_max(s_mine));
        const float p = lane < n_in ? __expf(s_mine - m_new) : 0.0f;
        const float alpha = __expf(m - m_new);  // 0 on the first tile (m = -inf)
        l = l * alpha + warp_reduce_sum(p);
        m = m_new;
#pragma unroll
        for (int r = 0; r < DEC_DPL; r++) o[r] *= alpha;
        for (int jj = 0; jj < n_in; jj++) {
            const float pj = __shfl_sync(0xffffffffu, p, jj);
            const __nv_bfloat16* vr = vbase + (size_t)(j0 + jj) * ckv;
#pragma unroll
            for (int r = 0; r < DEC_DPL; r++) {
                const int d = lane + r * WARP_SIZE;
                if (d < hs) o[r] += pj * bf16_to_f32(vr[d]);
            }
        }
    }
    // Merge the warps: M = max m_w, L = sum l_w e^(m_w - M), out = sum o_w e^(m_w - M) / L.
    // Warp 0 always has key 0, so M is finite; a warp with no keys has m = -inf, weight 0.
#pragma unroll
    for (int r = 0; r < DEC_DPL; r++) {
        const int d = lane + r * WARP_SIZE;
        if (d < hs) o_s[warp][d] = o[r];
    }
    if (lane == 0) {
        m_s[warp] = m;
        l_s[warp] = l;
    }
    __syncthreads();
    float big_m = -INFINITY;
#pragma unroll
    for (int w = 0; w < DEC_WARPS; w++) big_m = fmaxf(big_m, m_s[w]);
    float big_l = 0.0f, f[DEC_WARPS];
#pragma unroll
    for (int w = 0; w < DEC_WARPS; w++) {
        f[w] = m_s[w] == -INFINITY ? 0.0f : __expf(m_s[w] - big_m);
        big_l += l_s[w] * f[w];
    }
    const float inv_l = 1.0f / big_l;
    __nv_bfloat16* dst = out + ((size_t)bb * tn + i) * c + h * hs;
    for (int d = threadIdx.x; d < hs; d += blockDim.x) {
        float acc = 0.0f;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; w++) acc += o_s[w][d] * f[w];
        dst[d] = f32_to_bf16(acc * inv_l);
    }
}
