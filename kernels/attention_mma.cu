// attention_mma.cu: causal attention on the tensor cores, forward and backward, head sizes 32
// and 64 (every preset's). src/backend/cuda/attention.rs picks these kernels when the head size
// fits and the plain CUDA-core kernels of attention.cu otherwise; both implement the same
// Backend::attention_gqa_forward / attention_gqa_backward (and so the multi-head ops, NKV = NH;
// twin: src/backend/cpu/attention.rs).
//
// Layout: qkv [B, T, (NH + 2 NKV) HS] bf16 (NH query heads | NKV key heads | NKV value heads per
// position, HeadCols in common.cuh; [B, T, 3C] when NKV = NH), out and dout [B, T, C] bf16, lse
// [B, NH, T] fp32 (natural log). Query head h reads key/value head h / (NH / NKV). `starts`
// (nullable, [B*T] int32, nondecreasing along a row) restricts query i to keys
// starts[i] <= j <= i, so packed examples never see each other; null means plain causal.
//
// Scheme (FlashAttention-2, Dao 2023): a block of 4 warps owns 64 rows; each warp owns 16 and
// holds them as mma.sync m16n8k16 fragments (bf16 operands, fp32 accumulators). Tiles of 64
// keys (or queries) are staged in shared memory, rows padded by 8 elements so the ldmatrix
// fragment loads hit 32 distinct banks. Scores live in registers; softmax runs online in base 2.
//   forward: S = Q K^T, running max and sum, O += P V; saves lse.
//   backward: prep D_i = dout_i . out_i; dq kernel (one block per query tile, loops over key
//   tiles): S, P = exp(S - lse), dP = dout V^T, dS = P (dP - D), dq = scale dS K;
//   dkv kernel (one block per key tile of one key/value head, loops over the query heads of
//   its group in order and over their query tiles): S^T, P^T, dv = P^T dout, dP^T = V dout^T,
//   dS^T, dk = scale dS^T Q, summed over the group in the accumulators. No float atomics:
//   every output element is written by one thread, so results are deterministic.
//
// Pipelining: the inner tiles are double-buffered. While the warps compute on one tile,
// cp.async copies the next one into the other half of shared memory, so each tile's
// global-memory latency hides behind the previous tile's products. Shared memory: 2 stages x 2
// tiles x 64 x (HS + 8) bf16 = 36 KB at HS = 64, plus the block's own tiles: Q for the forward
// (46 KB, static), Q and dout for dq, K and V for dkv (55 KB, dynamic: the launcher opts these
// kernels in above 48 KB). Measured on an H200 against the same kernels loading each tile
// between two barriers (docs/PERF.md): gpt2-124m attention forward 8.3 -> 7.5 ms, backward
// 31.0 -> 27.9 ms per step. Holding dq's and dkv's own tiles in registers instead would fit
// static shared memory but take 174 and 247 registers (two blocks per SM where dq now runs
// three): backward 28.4 ms.
//
// Napkin math (gpt2-124m: B=64, NH=12, T=1024, HS=64), per layer: forward 2 products x
// 2*B*NH*T^2*HS / 2 (causal) = 103 GFLOP; backward recomputes S twice and does 5 more products:
// ~360 GFLOP. At ~500 TFLOP/s for mma.sync that is ~0.2 ms forward, ~0.7 ms backward; bytes are
// small (qkv 302 MB read, out 101 MB written), so the floor is the tensor cores and the
// shared-memory fragment loads, not DRAM.
#include "attention_mma.cuh"

// Elements of one 64-row shared tile, rows padded by 8 (a stage holds two: K and V, or Q and dout).
#define SMEM_TILE(HS) (MMA_TILE * ((HS) + 8))

// ---- forward ----------------------------------------------------------------------------------
template <int HS>
__device__ __forceinline__ void forward_mma(__nv_bfloat16* __restrict__ out,
                                             float* __restrict__ lse,
                                             const __nv_bfloat16* __restrict__ qkv,
                                             const int* __restrict__ starts, int t, int c, int nh,
                                             int nkv, float scale) {
    constexpr int TILE = SMEM_TILE(HS);
    __shared__ __align__(16) __nv_bfloat16 q_s[TILE];
    __shared__ __align__(16) __nv_bfloat16 k_s[2 * TILE];
    __shared__ __align__(16) __nv_bfloat16 v_s[2 * TILE];
    const int bh = blockIdx.y, bb = bh / nh, h = bh % nh;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * MMA_ROWS;  // the longest rows start first
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const int g = lane >> 2, tq = lane & 3;
    const int r = warp * 16 + g;
    // HeadCols with HS known at compile time: the row width, query head h's columns (base) and
    // its key head's, k_off further; the value head is NKV * HS further again. Written so the
    // live registers are those of the multi-head kernel (128: four blocks per SM at HS = 64).
    const size_t w = c + 2 * nkv * HS;
    const __nv_bfloat16* base = qkv + (size_t)bb * t * w + h * HS;  // query head h
    const int k_off = c + (h / (nh / nkv) - h) * HS;                 // its key head from base
    const int i_a = q0 + r, i_b = q0 + r + 8;
    const int* row_starts = starts ? starts + (size_t)bb * t : nullptr;
    const int start_a = row_starts ? row_starts[min(i_a, t - 1)] : 0;
    const int start_b = row_starts ? row_starts[min(i_b, t - 1)] : 0;
    const int first_key = row_starts ? row_starts[q0] : 0;
    const int last_key = min(q0 + MMA_ROWS, t) - 1;
    const int j_first = (first_key / MMA_TILE) * MMA_TILE;
    const float sl2 = scale * LOG2E;

    // Q and the first K/V tile in flight, as one group.
    load_tile_async<HS>(q_s, base, w, q0, t);
    load_tile_async<HS>(k_s, base + k_off, w, j_first, t);
    load_tile_async<HS>(v_s, base + k_off + nkv * HS, w, j_first, t);
    cp_async_commit();

    float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.0f, l_b = 0.0f;
    float o[HS / 8][4];
    zero_acc(o);
    int stage = 0;
    for (int j0 = j_first; j0 <= last_key; j0 += MMA_TILE, stage ^= 1) {
        if (j0 + MMA_TILE <= last_key) {
            load_tile_async<HS>(k_s + (stage ^ 1) * TILE, base + k_off, w, j0 + MMA_TILE, t);
            load_tile_async<HS>(v_s + (stage ^ 1) * TILE, base + k_off + nkv * HS, w,
                                j0 + MMA_TILE, t);
        }
        cp_async_commit();   // possibly empty: keeps "all but the newest group" = this stage
        cp_async_wait<1>();
        __syncthreads();
        float s[MMA_TILE / 8][4];
        scores<HS>(s, q_s, k_s + stage * TILE, warp * 16, lane);
        softmax_tile<HS>(s, o, m_a, m_b, l_a, l_b, j0, i_a, i_b, start_a, start_b, sl2, tq);
        times_tile<HS>(o, s, v_s + stage * TILE, lane);
        __syncthreads();  // every warp is done with this stage before it is refilled
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
// Shared memory (dynamic, from the entry point): q_s, do_s one tile each, k_s, v_s two stages.
template <int HS>
__device__ __forceinline__ void backward_dq_mma(__nv_bfloat16* __restrict__ dqkv,
                                                 const float* __restrict__ lse,
                                                 const float* __restrict__ dvec,
                                                 const __nv_bfloat16* __restrict__ dout,
                                                 const __nv_bfloat16* __restrict__ qkv,
                                                 const int* __restrict__ starts, int t, int c,
                                                 int nh, int nkv, float scale, __nv_bfloat16* q_s,
                                                 __nv_bfloat16* do_s, __nv_bfloat16* k_s,
                                                 __nv_bfloat16* v_s) {
    constexpr int TILE = SMEM_TILE(HS);
    const int bh = blockIdx.y, bb = bh / nh, h = bh % nh;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * MMA_ROWS;
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const int g = lane >> 2, tq = lane & 3;
    const int r = warp * 16 + g;
    // Columns as in the forward: query head h at base, its key head k_off further.
    const size_t w = c + 2 * nkv * HS;
    const __nv_bfloat16* base = qkv + (size_t)bb * t * w + h * HS;
    const int k_off = c + (h / (nh / nkv) - h) * HS;
    const int i_a = q0 + r, i_b = q0 + r + 8;
    const int* row_starts = starts ? starts + (size_t)bb * t : nullptr;
    const int start_a = row_starts ? row_starts[min(i_a, t - 1)] : 0;
    const int start_b = row_starts ? row_starts[min(i_b, t - 1)] : 0;
    const int first_key = row_starts ? row_starts[q0] : 0;
    const int last_key = min(q0 + MMA_ROWS, t) - 1;
    const int j_first = (first_key / MMA_TILE) * MMA_TILE;
    const float sl2 = scale * LOG2E;
    // Rows past T get lse = +inf, so their P is 0 and they add nothing.
    const float lse_a = i_a < t ? lse[(size_t)bh * t + i_a] * LOG2E : INFINITY;
    const float lse_b = i_b < t ? lse[(size_t)bh * t + i_b] * LOG2E : INFINITY;
    const float d_a = i_a < t ? dvec[(size_t)bh * t + i_a] : 0.0f;
    const float d_b = i_b < t ? dvec[(size_t)bh * t + i_b] : 0.0f;

    // Q, dout and the first K/V tile in flight, as one group.
    load_tile_async<HS>(q_s, base, w, q0, t);
    load_tile_async<HS>(do_s, dout + (size_t)bb * t * c + h * HS, c, q0, t);
    load_tile_async<HS>(k_s, base + k_off, w, j_first, t);
    load_tile_async<HS>(v_s, base + k_off + nkv * HS, w, j_first, t);
    cp_async_commit();

    float dq[HS / 8][4];
    zero_acc(dq);
    int stage = 0;
    for (int j0 = j_first; j0 <= last_key; j0 += MMA_TILE, stage ^= 1) {
        if (j0 + MMA_TILE <= last_key) {
            load_tile_async<HS>(k_s + (stage ^ 1) * TILE, base + k_off, w, j0 + MMA_TILE, t);
            load_tile_async<HS>(v_s + (stage ^ 1) * TILE, base + k_off + nkv * HS, w,
                                j0 + MMA_TILE, t);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const __nv_bfloat16* ks = k_s + stage * TILE;
        float p[MMA_TILE / 8][4], dp[MMA_TILE / 8][4];
        scores<HS>(p, q_s, ks, warp * 16, lane);
        scores<HS>(dp, do_s, v_s + stage * TILE, warp * 16, lane);
        dq_tile_ds(p, dp, j0, i_a, i_b, start_a, start_b, sl2, lse_a, lse_b, d_a, d_b, tq);
        times_tile<HS>(dq, p, ks, lane);
        __syncthreads();
    }
    if (i_a < t) store_row<HS>(dqkv + ((size_t)bb * t + i_a) * w + h * HS, dq, 0, scale, tq);
    if (i_b < t) store_row<HS>(dqkv + ((size_t)bb * t + i_b) * w + h * HS, dq, 1, scale, tq);
}

// ---- backward, dk and dv: one block per 64 key rows of one key/value head -----------------------
// The block walks the query heads of its group in order and, for each, the query tiles that see
// its keys; the walk is one sequence of (head, tile) steps, so the next step's tiles load while
// this one computes, across head boundaries too. Shared memory (dynamic, from the entry point):
// k_s, v_s one tile each, q_s, do_s two stages; the per-query statistics of both stages are
// static.
template <int HS>
__device__ __forceinline__ void backward_dkv_mma(__nv_bfloat16* __restrict__ dqkv,
                                                  const float* __restrict__ lse,
                                                  const float* __restrict__ dvec,
                                                  const __nv_bfloat16* __restrict__ dout,
                                                  const __nv_bfloat16* __restrict__ qkv,
                                                  const int* __restrict__ starts, int t, int c,
                                                  int nh, int nkv, float scale,
                                                  __nv_bfloat16* k_s, __nv_bfloat16* v_s,
                                                  __nv_bfloat16* q_s, __nv_bfloat16* do_s) {
    constexpr int TILE = SMEM_TILE(HS);
    __shared__ float lse_s[2][MMA_TILE], d_s[2][MMA_TILE];
    __shared__ int start_s[2][MMA_TILE];
    const int group = nh / nkv;
    const int bkv = blockIdx.y, bb = bkv / nkv, kvh = bkv % nkv;
    const int h_first = kvh * group, h_end = h_first + group;  // the group's query heads
    const int k0 = blockIdx.x * MMA_ROWS;  // the first key tiles see the most queries
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const int g = lane >> 2, tq = lane & 3;
    const int r = warp * 16 + g;
    const HeadCols kc = head_cols(h_first, c, nh, nkv);  // k and v columns of head kvh
    const size_t w = kc.w;
    const __nv_bfloat16* row0 = qkv + (size_t)bb * t * w;
    const __nv_bfloat16* dout_row0 = dout + (size_t)bb * t * c;
    const int j_a = k0 + r, j_b = k0 + r + 8;
    const int* row_starts = starts ? starts + (size_t)bb * t : nullptr;
    const int last_key = min(k0 + MMA_ROWS, t) - 1;
    const float sl2 = scale * LOG2E;
    // Query x of head h's tile at i0, for thread x < 64: its lse (base 2, +inf past T), D, start.
    // (Row (bb*NH + h)*T + i of lse and dvec, written from blockIdx.y: 170 registers where
    // recomputing bb*NH + h took 220.)
    auto row_stats = [&](int h, int i0, float& l, float& d, int& st) {
        const int i = i0 + (int)threadIdx.x;
        const size_t at = ((size_t)bkv * group + (h - h_first)) * t + i;
        l = i < t ? lse[at] * LOG2E : INFINITY;
        d = i < t ? dvec[at] : 0.0f;
        st = (row_starts && i < t) ? row_starts[i] : 0;
    };
    auto load_q_do = [&](int stage, int h, int i0) {
        load_tile_async<HS>(q_s + stage * TILE, row0 + h * HS, w, i0, t);
        load_tile_async<HS>(do_s + stage * TILE, dout_row0 + h * HS, c, i0, t);
    };

    // K, V and the first query tile in flight, as one group.
    load_tile_async<HS>(k_s, row0 + kc.k, w, k0, t);
    load_tile_async<HS>(v_s, row0 + kc.v, w, k0, t);
    // A head's first query tile (i0 = k0) always sees these keys: query k0 sees key k0.
    load_q_do(0, h_first, k0);
    cp_async_commit();
    if (threadIdx.x < MMA_TILE) {
        row_stats(h_first, k0, lse_s[0][threadIdx.x], d_s[0][threadIdx.x], start_s[0][threadIdx.x]);
    }

    float dk[HS / 8][4], dv[HS / 8][4];
    zero_acc(dk);
    zero_acc(dv);
    int stage = 0;
    for (int h = h_first, i0 = k0;; stage ^= 1) {
        // The next step: this head's next tile, unless it is past T or (starts never decrease
        // along a row) its first query starts past these keys, and then no later tile of the
        // head sees them either: the next head's first tile.
        int next_h = h, next = i0 + MMA_TILE;
        if (next >= t || (row_starts && row_starts[next] > last_key)) {
            next_h = h + 1;
            next = k0;
        }
        const bool more = next_h < h_end;
        float next_lse = 0.0f, next_d = 0.0f;
        int next_start = 0;
        if (more) {
            load_q_do(stage ^ 1, next_h, next);
            // Plain loads: they land while this tile is computed, stored below.
            if (threadIdx.x < MMA_TILE) row_stats(next_h, next, next_lse, next_d, next_start);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const __nv_bfloat16* qs = q_s + stage * TILE;
        const __nv_bfloat16* dos = do_s + stage * TILE;
        float p[MMA_TILE / 8][4];
        scores<HS>(p, k_s, qs, warp * 16, lane);  // S^T: rows keys, columns queries
        dkv_tile_p(p, i0, j_a, j_b, lse_s[stage], start_s[stage], sl2, tq);
        times_tile<HS>(dv, p, dos, lane);
        // dP^T only now, so its registers are not live during the dv product.
        float dp[MMA_TILE / 8][4];
        scores<HS>(dp, v_s, dos, warp * 16, lane);
        dkv_tile_ds(p, dp, d_s[stage], tq);
        times_tile<HS>(dk, p, qs, lane);
        if (more && threadIdx.x < MMA_TILE) {
            lse_s[stage ^ 1][threadIdx.x] = next_lse;
            d_s[stage ^ 1][threadIdx.x] = next_d;
            start_s[stage ^ 1][threadIdx.x] = next_start;
        }
        __syncthreads();
        if (!more) break;
        h = next_h;
        i0 = next;
    }
    if (j_a < t) {
        __nv_bfloat16* row = dqkv + ((size_t)bb * t + j_a) * w;
        store_row<HS>(row + kc.k, dk, 0, scale, tq);
        store_row<HS>(row + kc.v, dv, 0, 1.0f, tq);
    }
    if (j_b < t) {
        __nv_bfloat16* row = dqkv + ((size_t)bb * t + j_b) * w;
        store_row<HS>(row + kc.k, dk, 1, scale, tq);
        store_row<HS>(row + kc.v, dv, 1, 1.0f, tq);
    }
}

// ---- entry points, per head size ------------------------------------------------------------
// dq and dkv take 6 * SMEM_TILE(HS) bf16 of dynamic shared memory (55 KB at HS = 64).
extern __shared__ __align__(16) unsigned char mma_smem[];

#define ATTENTION_MMA_KERNELS(HS)                                                                  \
    extern "C" __global__ void __launch_bounds__(MMA_THREADS)                                      \
        attention_forward_mma##HS##_bf16(__nv_bfloat16* out, float* lse,                           \
                                          const __nv_bfloat16* qkv, const int* starts, int t,      \
                                          int c, int nh, int nkv, float scale) {                   \
        forward_mma<HS>(out, lse, qkv, starts, t, c, nh, nkv, scale);                              \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(MMA_THREADS)                                      \
        attention_backward_dq_mma##HS##_bf16(__nv_bfloat16* dqkv, const float* lse,                \
                                              const float* dvec, const __nv_bfloat16* dout,        \
                                              const __nv_bfloat16* qkv, const int* starts,         \
                                              int t, int c, int nh, int nkv, float scale) {        \
        constexpr int TILE = SMEM_TILE(HS);                                                        \
        __nv_bfloat16* q_s = reinterpret_cast<__nv_bfloat16*>(mma_smem);                           \
        backward_dq_mma<HS>(dqkv, lse, dvec, dout, qkv, starts, t, c, nh, nkv, scale, q_s,         \
                             q_s + TILE, q_s + 2 * TILE, q_s + 4 * TILE);                          \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(MMA_THREADS)                                      \
        attention_backward_dkv_mma##HS##_bf16(__nv_bfloat16* dqkv, const float* lse,               \
                                               const float* dvec, const __nv_bfloat16* dout,       \
                                               const __nv_bfloat16* qkv, const int* starts,        \
                                               int t, int c, int nh, int nkv, float scale) {       \
        constexpr int TILE = SMEM_TILE(HS);                                                        \
        __nv_bfloat16* k_s = reinterpret_cast<__nv_bfloat16*>(mma_smem);                           \
        backward_dkv_mma<HS>(dqkv, lse, dvec, dout, qkv, starts, t, c, nh, nkv, scale, k_s,        \
                              k_s + TILE, k_s + 2 * TILE, k_s + 4 * TILE);                         \
    }

ATTENTION_MMA_KERNELS(32)
ATTENTION_MMA_KERNELS(64)
