// sample.cu: drawing one token per row of logits (temperature, top-k, top-p) on the GPU.
//
// Twin of Backend::sample_tokens and src/backend/cpu/sample.rs, whose header states the rule;
// this kernel reaches the same answer without sorting. One block of SAMPLE_THREADS threads per
// row of logits [N, VP] bf16 (first V columns real); tokens [N] int; uniforms [N] fp32 in
// [0, 1), drawn on the host.
//
// A logit's rank order is that of its 16-bit key (the bf16 bits with the sign folded, so
// larger keys are larger values, -0 below +0, as f32::total_cmp), ties broken by the smaller
// index. Every kept set the rule builds is a prefix of that ranking, so it is described by a
// boundary (key tau, last tied index): keep i iff key_i > tau, or key_i == tau and i <= last.
//   1. greedy: one pass, block max of (key, -index) packed in 64 bits.
//   2. top-k: bisection over the 16-bit key for the largest tau with count(key >= tau) >= k
//      (16 passes), then the k - count(key > tau) -th tie in index order (one scan).
//   3. top-p: the same bisection on the weight mass w_i = exp((x_i - x_max) / T) of the top-k
//      tokens against target = p * (their total), then a scan over the ties.
//   4. draw: r = u * (kept mass); the first kept index, in index order, whose running mass
//      exceeds r (one scan).
// A "scan" gives each thread a contiguous segment of the row: per-thread sums, one block
// exclusive scan, then each thread walks its segment; the smallest hit index wins. Sums are
// fp32 in a different order than the CPU's f64, so the two agree except when a running sum
// lands within rounding of its target.
//
// Napkin math (V = 50304, 100 KB of bf16 per row, L2-resident after the first pass): greedy is
// one coalesced pass, ~3-5 us with the launch. Full sampling is at most ~40 passes (2 x 16
// bisection steps, each a pass plus a block reduction) and 3 scans, ~50-100 us per row, all
// latency (syncs and L2 reads), no DRAM to speak of. Rows run in parallel, one per SM.
#include "common.cuh"

#define SAMPLE_THREADS 1024

// The bf16 bits as an unsigned key whose order is the value order (f32::total_cmp).
__device__ __forceinline__ unsigned sample_key(__nv_bfloat16 x) {
    const unsigned bits = __bfloat16_as_ushort(x);
    return (bits & 0x8000u) ? (~bits & 0xFFFFu) : (bits | 0x8000u);
}

__device__ __forceinline__ unsigned long long block_reduce_max_u64(unsigned long long x,
                                                                   unsigned long long* s) {
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    const int n_warps = blockDim.x / WARP_SIZE;
#pragma unroll
    for (int off = WARP_SIZE / 2; off > 0; off /= 2) {
        const unsigned long long y = __shfl_xor_sync(0xffffffffu, x, off);
        x = y > x ? y : x;
    }
    if (lane == 0) s[warp] = x;
    __syncthreads();
    x = lane < n_warps ? s[lane] : 0ull;
#pragma unroll
    for (int off = WARP_SIZE / 2; off > 0; off /= 2) {
        const unsigned long long y = __shfl_xor_sync(0xffffffffu, x, off);
        x = y > x ? y : x;
    }
    __syncthreads();
    return x;
}

__device__ __forceinline__ unsigned block_reduce_min_u32(unsigned x, unsigned* s) {
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    const int n_warps = blockDim.x / WARP_SIZE;
#pragma unroll
    for (int off = WARP_SIZE / 2; off > 0; off /= 2) x = min(x, __shfl_xor_sync(0xffffffffu, x, off));
    if (lane == 0) s[warp] = x;
    __syncthreads();
    x = lane < n_warps ? s[lane] : 0xFFFFFFFFu;
#pragma unroll
    for (int off = WARP_SIZE / 2; off > 0; off /= 2) x = min(x, __shfl_xor_sync(0xffffffffu, x, off));
    __syncthreads();
    return x;
}

// Exclusive prefix sum over the block in thread order; *total gets the block's sum.
__device__ __forceinline__ float block_exclusive_scan(float x, float* s, float* total) {
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    const int n_warps = blockDim.x / WARP_SIZE;
    float inc = x;
#pragma unroll
    for (int off = 1; off < WARP_SIZE; off *= 2) {
        const float y = __shfl_up_sync(0xffffffffu, inc, off);
        if (lane >= off) inc += y;
    }
    float exc = __shfl_up_sync(0xffffffffu, inc, 1);
    if (lane == 0) exc = 0.0f;
    if (lane == WARP_SIZE - 1) s[warp] = inc;
    __syncthreads();
    if (warp == 0) {
        float w = lane < n_warps ? s[lane] : 0.0f;
#pragma unroll
        for (int off = 1; off < WARP_SIZE; off *= 2) {
            const float y = __shfl_up_sync(0xffffffffu, w, off);
            if (lane >= off) w += y;
        }
        s[lane] = w;
    }
    __syncthreads();
    const float prefix = warp > 0 ? s[warp - 1] : 0.0f;
    *total = s[n_warps - 1];
    __syncthreads();
    return prefix + exc;
}

// The smallest index i < v with member(i) at which carry + (running sum of val over members
// up to and including i, in index order) exceeds target (strict) or reaches it; -1 if none.
template <typename Member, typename Val>
__device__ int find_first(int v, Member member, Val val, float carry, float target, bool strict,
                          float* f_s, unsigned* u_s) {
    const int chunk = ceil_div(v, (int)blockDim.x);
    const int i0 = min(v, (int)threadIdx.x * chunk), i1 = min(v, i0 + chunk);
    float local = 0.0f;
    for (int i = i0; i < i1; i++) {
        if (member(i)) local += val(i);
    }
    float total;
    float cum = carry + block_exclusive_scan(local, f_s, &total);
    unsigned hit = 0xFFFFFFFFu;
    for (int i = i0; i < i1; i++) {
        if (!member(i)) continue;
        cum += val(i);
        if (strict ? cum > target : cum >= target) {
            hit = (unsigned)i;
            break;
        }
    }
    hit = block_reduce_min_u32(hit, u_s);
    return hit == 0xFFFFFFFFu ? -1 : (int)hit;
}

// The largest tau in [lo, hi] with mass(tau) >= target, for a mass non-increasing in tau and
// mass(lo) >= target assumed. `mass` must be called by every thread (it reduces over the block).
template <typename Mass>
__device__ unsigned bisect_key(unsigned lo, unsigned hi, float target, Mass mass) {
    while (lo < hi) {
        const unsigned mid = (lo + hi + 1) / 2;
        if (mass(mid) >= target) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    return lo;
}

// Grid (N), block SAMPLE_THREADS.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_tokens_bf16(int* __restrict__ tokens, const __nv_bfloat16* __restrict__ logits,
                       const float* __restrict__ uniforms, int v, int vp, float temperature,
                       int top_k, float top_p) {
    __shared__ float f_s[32];
    __shared__ unsigned u_s[32];
    __shared__ unsigned long long ull_s[32];
    const int row = blockIdx.x;
    const __nv_bfloat16* x = logits + (size_t)row * vp;
    const int tid = threadIdx.x, nt = blockDim.x;

    // 1. The first token of the ranking.
    unsigned long long best = 0ull;
    for (int i = tid; i < v; i += nt) {
        const unsigned long long packed =
            ((unsigned long long)sample_key(x[i]) << 32) | (0xFFFFFFFFu - (unsigned)i);
        best = packed > best ? packed : best;
    }
    best = block_reduce_max_u64(best, ull_s);
    const unsigned best_key = (unsigned)(best >> 32);
    const int best_idx = (int)(0xFFFFFFFFu - (unsigned)(best & 0xFFFFFFFFull));
    if (temperature <= 0.0f || top_k == 1) {
        if (tid == 0) tokens[row] = best_idx;
        return;
    }
    const float x_max = bf16_to_f32(x[best_idx]);
    const float inv_t = 1.0f / temperature;
    auto key = [&](int i) { return sample_key(x[i]); };
    auto weight = [&](int i) { return __expf((bf16_to_f32(x[i]) - x_max) * inv_t); };
    auto one = [](int) { return 1.0f; };

    // 2. Top-k boundary (tk_key, tk_last); the defaults keep every token.
    unsigned tk_key = 0;
    int tk_last = v - 1;
    if (top_k > 0 && top_k < v) {
        const float k = (float)top_k;
        tk_key = bisect_key(0, best_key, k, [&](unsigned tau) {
            float n = 0.0f;
            for (int i = tid; i < v; i += nt) n += key(i) >= tau ? 1.0f : 0.0f;
            return block_reduce_sum(n, f_s);
        });
        float greater = 0.0f;
        for (int i = tid; i < v; i += nt) greater += key(i) > tk_key ? 1.0f : 0.0f;
        greater = block_reduce_sum(greater, f_s);
        const int tie = find_first(
            v, [&](int i) { return key(i) == tk_key; }, one, greater, k, false, f_s, u_s);
        tk_last = tie >= 0 ? tie : v - 1;  // always found: counts are exact in fp32
    }
    auto kept_k = [&](int i) {
        const unsigned kk = key(i);
        return kk > tk_key || (kk == tk_key && i <= tk_last);
    };

    // 3. Top-p boundary (tp_key, tp_last) within the top-k tokens.
    unsigned tp_key = 0;
    int tp_last = v - 1;
    if (top_p < 1.0f) {
        float s_k = 0.0f;
        for (int i = tid; i < v; i += nt) s_k += kept_k(i) ? weight(i) : 0.0f;
        s_k = block_reduce_sum(s_k, f_s);
        const float target = top_p * s_k;
        tp_key = bisect_key(tk_key, best_key, target, [&](unsigned tau) {
            float m = 0.0f;
            for (int i = tid; i < v; i += nt) m += (kept_k(i) && key(i) >= tau) ? weight(i) : 0.0f;
            return block_reduce_sum(m, f_s);
        });
        float greater = 0.0f;
        for (int i = tid; i < v; i += nt) greater += (kept_k(i) && key(i) > tp_key) ? weight(i) : 0.0f;
        greater = block_reduce_sum(greater, f_s);
        const int tie = find_first(
            v, [&](int i) { return key(i) == tp_key && kept_k(i); }, weight, greater, target,
            false, f_s, u_s);
        tp_last = tie >= 0 ? tie : v - 1;  // not reached by rounding: keep every tie
    }
    auto kept = [&](int i) {
        const unsigned kk = key(i);
        return kept_k(i) && (kk > tp_key || (kk == tp_key && i <= tp_last));
    };

    // 4. The draw, in index order.
    float mass = 0.0f;
    for (int i = tid; i < v; i += nt) mass += kept(i) ? weight(i) : 0.0f;
    mass = block_reduce_sum(mass, f_s);
    const float r = uniforms[row] * mass;
    int tok = find_first(v, kept, weight, 0.0f, r, true, f_s, u_s);
    if (tok < 0) {  // rounding left r out of reach: the largest kept index
        unsigned last = 0;
        for (int i = tid; i < v; i += nt) last = kept(i) ? max(last, (unsigned)i + 1) : last;
        last = (unsigned)(0xFFFFFFFFu - block_reduce_min_u32(0xFFFFFFFFu - last, u_s));
        tok = (int)last - 1;
    }
    if (tid == 0) tokens[row] = tok;
}
