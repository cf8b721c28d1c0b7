// attention_mma.cu: causal attention on the tensor cores, forward and backward, head sizes 32
// and 64 (every preset's). src/backend/cuda/attention.rs picks these kernels when the head size
// fits and the plain CUDA-core kernels of attention.cu otherwise; both implement the same
// Backend::attention_forward / attention_backward (twin: src/backend/cpu/attention.rs).
//
// Layout: qkv [B, T, 3C] bf16 (q | k | v per position, head h owns columns h*HS .. (h+1)*HS),
// out and dout [B, T, C] bf16, lse [B, NH, T] fp32 (natural log). `starts` (nullable, [B*T]
// int32, nondecreasing along a row) restricts query i to keys starts[i] <= j <= i, so packed
// examples never see each other; null means plain causal.
//
// Scheme (FlashAttention-2, Dao 2023): a block of 4 warps owns 64 rows; each warp owns 16 and
// holds them as mma.sync m16n8k16 fragments (bf16 operands, fp32 accumulators). Tiles of 64
// keys (or queries) are staged in shared memory, rows padded by 8 elements so the fragment
// loads hit 32 distinct banks. Scores live in registers; softmax runs online in base 2.
//   forward: S = Q K^T, running max and sum, O += P V; saves lse.
//   backward: prep D_i = dout_i . out_i; dq kernel (one block per query tile, loops over key
//   tiles): S, P = exp(S - lse), dP = dout V^T, dS = P (dP - D), dq = scale dS K;
//   dkv kernel (one block per key tile, loops over query tiles): S^T, P^T, dv = P^T dout,
//   dP^T = V dout^T, dS^T, dk = scale dS^T Q. No float atomics: every output element is
//   written by one thread, so results are deterministic.
//
// Napkin math (gpt2-124m: B=64, NH=12, T=1024, HS=64): forward 2 products x 2*B*NH*T^2*HS / 2
// (causal) = 103 GFLOP; backward recomputes S twice and does 5 more products: ~360 GFLOP.
// At ~500 TFLOP/s for mma.sync that is ~0.2 ms forward, ~0.7 ms backward; bytes are small
// (qkv 302 MB read, out 101 MB written), so the floor is the tensor cores and the
// shared-memory fragment loads, not DRAM.
#include "attention_mma.cuh"

// ---- forward --------------------------------------------------------------------------------
// Grid (ceil(T/64), B*NH), 128 threads.
template <int HS, bool LDSM>
__device__ __forceinline__ void forward_mma(__nv_bfloat16* __restrict__ out,
                                            float* __restrict__ lse,
                                            const __nv_bfloat16* __restrict__ qkv,
                                            const int* __restrict__ starts, int t, int c, int nh,
                                            float scale) {
    constexpr int LD = HS + 8;
    __shared__ __align__(16) __nv_bfloat16 q_s[MMA_ROWS * LD];
    __shared__ __align__(16) __nv_bfloat16 k_s[MMA_TILE * LD];
    __shared__ __align__(16) __nv_bfloat16 v_s[MMA_TILE * LD];
    const int bh = blockIdx.y, bb = bh / nh, h = bh % nh;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * MMA_ROWS;  // the longest rows start first
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const int g = lane >> 2, tq = lane & 3;
    const int r = warp * 16 + g;  // this thread's tile rows: r and r + 8
    const size_t c3 = 3 * (size_t)c;
    const __nv_bfloat16* base = qkv + (size_t)bb * t * c3 + h * HS;
    const int i_a = q0 + r, i_b = q0 + r + 8;
    const int* row_starts = starts ? starts + (size_t)bb * t : nullptr;
    const int start_a = row_starts ? row_starts[min(i_a, t - 1)] : 0;
    const int start_b = row_starts ? row_starts[min(i_b, t - 1)] : 0;
    const int first_key = row_starts ? row_starts[q0] : 0;  // nondecreasing: the tile's least
    const int last_key = min(q0 + MMA_ROWS, t) - 1;
    const float sl2 = scale * LOG2E;

    load_tile<HS>(q_s, base, c3, q0, t);
    float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.0f, l_b = 0.0f;
    float o[HS / 8][4];
    zero_acc(o);
    for (int j0 = (first_key / MMA_TILE) * MMA_TILE; j0 <= last_key; j0 += MMA_TILE) {
        __syncthreads();  // the previous tile is consumed
        load_tile<HS>(k_s, base + c, c3, j0, t);
        load_tile<HS>(v_s, base + 2 * c, c3, j0, t);
        __syncthreads();
        float s[MMA_TILE / 8][4];
        scores<HS, LDSM>(s, q_s, k_s, warp * 16, lane);
        softmax_tile<HS>(s, o, m_a, m_b, l_a, l_b, j0, i_a, i_b, start_a, start_b, sl2, tq);
        times_tile<HS, LDSM>(o, s, v_s, lane);
    }
    forward_store<HS>(out, lse, o, m_a, m_b, l_a, l_b, ((size_t)bb * t + i_a) * c + h * HS,
                      (size_t)bh * t + i_a, i_a, t, c, tq);
}

// ---- backward prep: dvec[bh*T + i] = dout_i . out_i over the head's columns --------------------
// One warp per (row, head); 256 threads per block, grid ceil(B*NH*T / 8).
extern "C" __global__ void __launch_bounds__(256)
    attention_backward_dot_bf16(float* __restrict__ dvec, const __nv_bfloat16* __restrict__ dout,
                                const __nv_bfloat16* __restrict__ out, int rows, int t, int c,
                                int nh) {
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    const int lane = threadIdx.x % WARP_SIZE;
    if (row >= rows) return;
    const int hs = c / nh;
    const int bh = row / t, i = row % t, bb = bh / nh, h = bh % nh;
    const size_t at = ((size_t)bb * t + i) * c + h * hs;
    float acc = 0.0f;
    for (int d = lane; d < hs; d += WARP_SIZE) {
        acc += bf16_to_f32(dout[at + d]) * bf16_to_f32(out[at + d]);
    }
    acc = warp_reduce_sum(acc);
    if (lane == 0) dvec[row] = acc;
}

// ---- backward, dq: one block per 64 query rows, over the key tiles they see --------------------
template <int HS, bool LDSM>
__device__ __forceinline__ void backward_dq_mma(__nv_bfloat16* __restrict__ dqkv,
                                                const float* __restrict__ lse,
                                                const float* __restrict__ dvec,
                                                const __nv_bfloat16* __restrict__ dout,
                                                const __nv_bfloat16* __restrict__ qkv,
                                                const int* __restrict__ starts, int t, int c,
                                                int nh, float scale) {
    constexpr int LD = HS + 8;
    __shared__ __align__(16) __nv_bfloat16 q_s[MMA_ROWS * LD];
    __shared__ __align__(16) __nv_bfloat16 do_s[MMA_ROWS * LD];
    __shared__ __align__(16) __nv_bfloat16 k_s[MMA_TILE * LD];
    __shared__ __align__(16) __nv_bfloat16 v_s[MMA_TILE * LD];
    const int bh = blockIdx.y, bb = bh / nh, h = bh % nh;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * MMA_ROWS;
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const int g = lane >> 2, tq = lane & 3;
    const int r = warp * 16 + g;
    const size_t c3 = 3 * (size_t)c;
    const __nv_bfloat16* base = qkv + (size_t)bb * t * c3 + h * HS;
    const int i_a = q0 + r, i_b = q0 + r + 8;
    const int* row_starts = starts ? starts + (size_t)bb * t : nullptr;
    const int start_a = row_starts ? row_starts[min(i_a, t - 1)] : 0;
    const int start_b = row_starts ? row_starts[min(i_b, t - 1)] : 0;
    const int first_key = row_starts ? row_starts[q0] : 0;
    const int last_key = min(q0 + MMA_ROWS, t) - 1;
    const float sl2 = scale * LOG2E;
    // Rows past T get lse = +inf, so their P is 0 and they add nothing.
    const float lse_a = i_a < t ? lse[(size_t)bh * t + i_a] * LOG2E : INFINITY;
    const float lse_b = i_b < t ? lse[(size_t)bh * t + i_b] * LOG2E : INFINITY;
    const float d_a = i_a < t ? dvec[(size_t)bh * t + i_a] : 0.0f;
    const float d_b = i_b < t ? dvec[(size_t)bh * t + i_b] : 0.0f;

    load_tile<HS>(q_s, base, c3, q0, t);
    load_tile<HS>(do_s, dout + (size_t)bb * t * c + h * HS, c, q0, t);
    float dq[HS / 8][4];
    zero_acc(dq);
    for (int j0 = (first_key / MMA_TILE) * MMA_TILE; j0 <= last_key; j0 += MMA_TILE) {
        __syncthreads();
        load_tile<HS>(k_s, base + c, c3, j0, t);
        load_tile<HS>(v_s, base + 2 * c, c3, j0, t);
        __syncthreads();
        float p[MMA_TILE / 8][4], dp[MMA_TILE / 8][4];
        scores<HS, LDSM>(p, q_s, k_s, warp * 16, lane);
        scores<HS, LDSM>(dp, do_s, v_s, warp * 16, lane);
        dq_tile_ds(p, dp, j0, i_a, i_b, start_a, start_b, sl2, lse_a, lse_b, d_a, d_b, tq);
        times_tile<HS, LDSM>(dq, p, k_s, lane);
    }
    if (i_a < t) store_row<HS>(dqkv + ((size_t)bb * t + i_a) * c3 + h * HS, dq, 0, scale, tq);
    if (i_b < t) store_row<HS>(dqkv + ((size_t)bb * t + i_b) * c3 + h * HS, dq, 1, scale, tq);
}

// ---- backward, dk and dv: one block per 64 key rows, over the query tiles that see them --------
template <int HS, bool LDSM>
__device__ __forceinline__ void backward_dkv_mma(__nv_bfloat16* __restrict__ dqkv,
                                                 const float* __restrict__ lse,
                                                 const float* __restrict__ dvec,
                                                 const __nv_bfloat16* __restrict__ dout,
                                                 const __nv_bfloat16* __restrict__ qkv,
                                                 const int* __restrict__ starts, int t, int c,
                                                 int nh, float scale) {
    constexpr int LD = HS + 8;
    __shared__ __align__(16) __nv_bfloat16 k_s[MMA_ROWS * LD];
    __shared__ __align__(16) __nv_bfloat16 v_s[MMA_ROWS * LD];
    __shared__ __align__(16) __nv_bfloat16 q_s[MMA_TILE * LD];
    __shared__ __align__(16) __nv_bfloat16 do_s[MMA_TILE * LD];
    __shared__ float lse_s[MMA_TILE], d_s[MMA_TILE];
    __shared__ int start_s[MMA_TILE];
    const int bh = blockIdx.y, bb = bh / nh, h = bh % nh;
    const int k0 = blockIdx.x * MMA_ROWS;  // the first key tiles see the most queries
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const int g = lane >> 2, tq = lane & 3;
    const int r = warp * 16 + g;
    const size_t c3 = 3 * (size_t)c;
    const __nv_bfloat16* base = qkv + (size_t)bb * t * c3 + h * HS;
    const __nv_bfloat16* dout_base = dout + (size_t)bb * t * c + h * HS;
    const int j_a = k0 + r, j_b = k0 + r + 8;
    const int* row_starts = starts ? starts + (size_t)bb * t : nullptr;
    const int last_key = min(k0 + MMA_ROWS, t) - 1;
    const float sl2 = scale * LOG2E;

    load_tile<HS>(k_s, base + c, c3, k0, t);
    load_tile<HS>(v_s, base + 2 * c, c3, k0, t);
    float dk[HS / 8][4], dv[HS / 8][4];
    zero_acc(dk);
    zero_acc(dv);
    for (int i0 = (k0 / MMA_TILE) * MMA_TILE; i0 < t; i0 += MMA_TILE) {
        // Starts never decrease along a row: once a tile's first query starts past these keys,
        // no later query sees them either.
        if (row_starts && row_starts[i0] > last_key) break;
        __syncthreads();
        load_tile<HS>(q_s, base, c3, i0, t);
        load_tile<HS>(do_s, dout_base, c, i0, t);
        for (int x = threadIdx.x; x < MMA_TILE; x += MMA_THREADS) {
            const int i = i0 + x;
            lse_s[x] = i < t ? lse[(size_t)bh * t + i] * LOG2E : INFINITY;
            d_s[x] = i < t ? dvec[(size_t)bh * t + i] : 0.0f;
            start_s[x] = (row_starts && i < t) ? row_starts[i] : 0;
        }
        __syncthreads();
        float p[MMA_TILE / 8][4];
        scores<HS, LDSM>(p, k_s, q_s, warp * 16, lane);  // S^T: rows keys, columns queries
        dkv_tile_p(p, i0, j_a, j_b, lse_s, start_s, sl2, tq);
        times_tile<HS, LDSM>(dv, p, do_s, lane);
        // dP^T only now, so its registers are not live during the dv product.
        float dp[MMA_TILE / 8][4];
        scores<HS, LDSM>(dp, v_s, do_s, warp * 16, lane);
        dkv_tile_ds(p, dp, d_s, tq);
        times_tile<HS, LDSM>(dk, p, q_s, lane);
    }
    if (j_a < t) {
        __nv_bfloat16* row = dqkv + ((size_t)bb * t + j_a) * c3 + h * HS;
        store_row<HS>(row + c, dk, 0, scale, tq);
        store_row<HS>(row + 2 * c, dv, 0, 1.0f, tq);
    }
    if (j_b < t) {
        __nv_bfloat16* row = dqkv + ((size_t)bb * t + j_b) * c3 + h * HS;
        store_row<HS>(row + c, dk, 1, scale, tq);
        store_row<HS>(row + 2 * c, dv, 1, 1.0f, tq);
    }
}

// ---- entry points, per head size; `_lds` variants use plain shared loads, not ldmatrix -------
#define ATTENTION_MMA_KERNELS(HS, LDSM, SUFFIX)                                                  \
    extern "C" __global__ void __launch_bounds__(MMA_THREADS)                                    \
        attention_forward_mma##HS##SUFFIX(__nv_bfloat16* out, float* lse,                       \
                                          const __nv_bfloat16* qkv, const int* starts, int t,    \
                                          int c, int nh, float scale) {                          \
        forward_mma<HS, LDSM>(out, lse, qkv, starts, t, c, nh, scale);                           \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(MMA_THREADS)                                    \
        attention_backward_dq_mma##HS##SUFFIX(__nv_bfloat16* dqkv, const float* lse,             \
                                              const float* dvec, const __nv_bfloat16* dout,      \
                                              const __nv_bfloat16* qkv, const int* starts,       \
                                              int t, int c, int nh, float scale) {               \
        backward_dq_mma<HS, LDSM>(dqkv, lse, dvec, dout, qkv, starts, t, c, nh, scale);          \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(MMA_THREADS)                                    \
        attention_backward_dkv_mma##HS##SUFFIX(__nv_bfloat16* dqkv, const float* lse,            \
                                               const float* dvec, const __nv_bfloat16* dout,     \
                                               const __nv_bfloat16* qkv, const int* starts,      \
                                               int t, int c, int nh, float scale) {              \
        backward_dkv_mma<HS, LDSM>(dqkv, lse, dvec, dout, qkv, starts, t, c, nh, scale);         \
    }

ATTENTION_MMA_KERNELS(32, true, _bf16)
ATTENTION_MMA_KERNELS(64, true, _bf16)
ATTENTION_MMA_KERNELS(32, false, _lds_bf16)
ATTENTION_MMA_KERNELS(64, false, _lds_bf16)
