// InfoNCE / symmetric NT-Xent: everything around the similarity GEMMs (which cuBLASLt does). B rows of
// D-dimensional embeddings a and b; logits f32 [B, B] = a_unit · b_unitᵀ / temperature; statistics and the
// loss in f32. Row r of the [2B] vectors norms and lse is a's row r (r < B) or b's row r - B (norms), the
// row log-sum-exp r (r < B) or the column log-sum-exp r - B (lse).
#include "common.cuh"

#define NEG_INF __int_as_float(0xff800000)

// F.normalize's eps: rows are divided by max(‖x‖, eps).
#define NORM_EPS 1e-12f

// Forward normalisation of a and b, one warp per row (2B rows): unit (=) = x / max(‖x‖, eps), norms (=) = ‖x‖.
// Launch with blockDim a multiple of 32 and at least 2B warps.
template <typename T>
__device__ void infonce_normalize(const typename T::raw* a, const typename T::raw* b, typename T::raw* a_unit,
                                  typename T::raw* b_unit, float* norms, int B, int D) {
    const int row = (int)(((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5), lane = threadIdx.x & 31;
    if (row >= 2 * B) return;  // whole warps leave together
    const bool is_b = row >= B;
    const long long base = (long long)(is_b ? row - B : row) * D;
    const typename T::raw* x = (is_b ? b : a) + base;
    typename T::raw* u = (is_b ? b_unit : a_unit) + base;
    float ss = 0.0f;
    for (int k = lane; k < D; k += 32) {
        const float v = T::load(x, k);
        ss += v * v;
    }
    const float norm = sqrtf(warp_sum(ss));
    const float inv = 1.0f / fmaxf(norm, NORM_EPS);
    for (int k = lane; k < D; k += 32) T::store(u, k, T::load(x, k) * inv);
    if (lane == 0) norms[row] = norm;
}

// Adds the log-sum-exp state (m2, s2) (max, sum of exp(x - max)) to (m, s); an empty state has m = -inf.
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
    if (m2 == NEG_INF) return;
    if (m2 > m) {
        s = s * expf(m - m2) + s2;
        m = m2;
    } else {
        s += s2 * expf(m2 - m);
    }
}

// Row and column log-sum-exps of logits [B, B] into lse (=) [2B], in one launch of 256-thread blocks: the
// first ceil(B/8) blocks take 8 rows each (a warp per row, reading along the row); the next ceil(B/32) take
// 32 columns each (a thread per column, 8 threads per column splitting the rows, so every warp reads 32
// adjacent floats of one row), merged in shared memory. The branch is uniform per block.
extern "C" __global__ void infonce_softmax_stats(const float* logits, float* lse, int B) {
    __shared__ float part_m[8][32], part_s[8][32];
    const int row_blocks = (B + 7) / 8;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if ((int)blockIdx.x < row_blocks) {
        const int row = blockIdx.x * 8 + warp;
        if (row >= B) return;
        const float* l = logits + (long long)row * B;
        float m = NEG_INF, s = 0.0f;
        for (int j = lane; j < B; j += 32) lse_merge(m, s, l[j], 1.0f);
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) {
            const float m2 = __shfl_xor_sync(0xffffffffu, m, offset), s2 = __shfl_xor_sync(0xffffffffu, s, offset);
            lse_merge(m, s, m2, s2);
        }
        if (lane == 0) lse[row] = m + logf(s);
    } else {
        const int col = (blockIdx.x - row_blocks) * 32 + lane;
        float m = NEG_INF, s = 0.0f;
        if (col < B)
            for (int i = warp; i < B; i += 8) lse_merge(m, s, logits[(long long)i * B + col], 1.0f);
        part_m[warp][lane] = m;
        part_s[warp][lane] = s;
        __syncthreads();
        if (warp == 0 && col < B) {
            for (int w = 1; w < 8; ++w) lse_merge(m, s, part_m[w][lane], part_s[w][lane]);
            lse[B + col] = m + logf(s);
        }
    }
}

// loss[0] (=) = Σ_i (row_lse_i + col_lse_i - 2 logits_ii) / 2B. One block (blockDim a multiple of 32).
extern "C" __global__ void infonce_loss(const float* logits, const float* lse, float* loss, int B) {
    __shared__ float scratch[32];
    float acc = 0.0f;
    for (int i = threadIdx.x; i < B; i += blockDim.x) acc += lse[i] + lse[B + i] - 2.0f * logits[(long long)i * B + i];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) loss[0] = acc / (2.0f * B);
}

// dlogits (=) [B, B] = scale · (softmax over row i + softmax over column j - 2 δ_ij), with
// scale = dloss / (2 B temperature), which makes it the gradient with respect to a_unit · b_unitᵀ.
template <typename T>
__device__ void infonce_logits_grad(const float* logits, const float* lse, typename T::raw* dlogits, float scale,
                                    int B, long long n) {
    GRID_STRIDE_LOOP(idx, n) {
        const int i = (int)(idx / B), j = (int)(idx % B);
        const float l = logits[idx];
        float g = expf(l - lse[i]) + expf(l - lse[B + j]);
        if (i == j) g -= 2.0f;
        T::store(dlogits, idx, scale * g);
    }
}

// Normalisation backward, one warp per row (2B rows): dx (=) = (du - u (u·du)) / ‖x‖, or du / eps where
// the norm was clamped to eps. du (the gradients of a_unit and b_unit) is f32.
template <typename T>
__device__ void infonce_normalize_backward(const typename T::raw* a_unit, const typename T::raw* b_unit,
                                           const float* norms, const float* da_unit, const float* db_unit,
                                           typename T::raw* da, typename T::raw* db, int B, int D) {
    const int row = (int)(((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5), lane = threadIdx.x & 31;
    if (row >= 2 * B) return;
    const bool is_b = row >= B;
    const long long base = (long long)(is_b ? row - B : row) * D;
    const typename T::raw* u = (is_b ? b_unit : a_unit) + base;
    const float* du = (is_b ? db_unit : da_unit) + base;
    typename T::raw* dx = (is_b ? db : da) + base;
    const float norm = norms[row];
    if (norm > NORM_EPS) {
        float dot = 0.0f;
        for (int k = lane; k < D; k += 32) dot += T::load(u, k) * du[k];
        dot = warp_sum(dot);
        const float inv = 1.0f / norm;
        for (int k = lane; k < D; k += 32) T::store(dx, k, (du[k] - T::load(u, k) * dot) * inv);
    } else {
        for (int k = lane; k < D; k += 32) T::store(dx, k, du[k] * (1.0f / NORM_EPS));
    }
}

#define INFONCE_KERNELS(T, suffix)                                                                                \
    extern "C" __global__ void infonce_normalize_##suffix(const T::raw* a, const T::raw* b, T::raw* a_unit,       \
                                                          T::raw* b_unit, float* norms, int B, int D) {           \
        infonce_normalize<T>(a, b, a_unit, b_unit, norms, B, D);                                                  \
    }                                                                                                             \
    extern "C" __global__ void infonce_logits_grad_##suffix(const float* logits, const float* lse, T::raw* dlogits, \
                                                            float scale, int B, long long n) {                    \
        infonce_logits_grad<T>(logits, lse, dlogits, scale, B, n);                                                \
    }                                                                                                             \
    extern "C" __global__ void infonce_normalize_backward_##suffix(                                               \
        const T::raw* a_unit, const T::raw* b_unit, const float* norms, const float* da_unit, const float* db_unit, \
        T::raw* da, T::raw* db, int B, int D) {                                                                   \
        infonce_normalize_backward<T>(a_unit, b_unit, norms, da_unit, db_unit, da, db, B, D);                     \
    }
INFONCE_KERNELS(F32, f32)
INFONCE_KERNELS(BF16, bf16)
