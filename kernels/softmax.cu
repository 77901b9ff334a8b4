// Softmax over the last dim of a row-major [rows, n] tensor, y = softmax(scale * x), and its backward.
// One block per row (grid-stride over rows, uniform across the block, so the block reductions are safe);
// blockDim.x is a multiple of 32, at most 1024. Statistics (max, sum, dot) are f32; storage is f32 or bf16,
// rounded once on the final store. Outputs are written (=).
#include "common.cuh"

// Max over the whole block; every thread gets the result. `scratch` holds at least 32 floats.
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();  // scratch may still be read by a previous reduction
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : neg_inf();
    return warp_max(v);
}

// y[row, j] = exp(scale * x[row, j] - m) / sum_k exp(scale * x[row, k] - m), m = max_k scale * x[row, k].
// Pass 1 keeps a running (max, sum) per thread (online softmax), so x is read twice in all: once for the
// statistics and once for the output. A thread whose elements are all -inf contributes sum 0.
template <typename T>
__device__ void softmax_forward(const typename T::raw* x, typename T::raw* y, float scale, long long n,
                                long long rows) {
    __shared__ float scratch[32];
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const long long base = row * n;
        float m = neg_inf(), s = 0.0f;
        for (long long j = threadIdx.x; j < n; j += blockDim.x) {
            const float v = scale * T::load(x, base + j);
            if (v > m) {
                s = s * expf(m - v) + 1.0f;  // m = -inf: expf(-inf) = 0, s restarts at 1
                m = v;
            } else if (m != neg_inf() || v != v) {
                s += expf(v - m);  // a NaN makes s, the row sum and so the whole row NaN, as on the CPU
            }
        }
        const float row_max = block_max(m, scratch);
        // Rescale every thread's sum to the row maximum; threads without finite elements hold s = 0.
        const float row_sum = block_sum(s == 0.0f ? 0.0f : s * expf(m - row_max), scratch);
        const float inv = 1.0f / row_sum;
        for (long long j = threadIdx.x; j < n; j += blockDim.x)
            T::store(y, base + j, expf(scale * T::load(x, base + j) - row_max) * inv);
    }
}

// dx[row, j] = scale * y[row, j] * (dy[row, j] - sum_k dy[row, k] * y[row, k]), from the forward's output y.
template <typename T>
__device__ void softmax_backward(const typename T::raw* y, const typename T::raw* dy, typename T::raw* dx,
                                 float scale, long long n, long long rows) {
    __shared__ float scratch[32];
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const long long base = row * n;
        float dot = 0.0f;
        for (long long j = threadIdx.x; j < n; j += blockDim.x) dot += T::load(y, base + j) * T::load(dy, base + j);
        dot = block_sum(dot, scratch);
        for (long long j = threadIdx.x; j < n; j += blockDim.x)
            T::store(dx, base + j, scale * T::load(y, base + j) * (T::load(dy, base + j) - dot));
    }
}

#define FOR_EACH_SOFTMAX_OP(T, suffix)                                                                          \
    extern "C" __global__ void softmax_forward_##suffix(const T::raw* x, T::raw* y, float scale, long long n,   \
                                                        long long rows) {                                       \
        softmax_forward<T>(x, y, scale, n, rows);                                                                \
    }                                                                                                            \
    extern "C" __global__ void softmax_backward_##suffix(const T::raw* y, const T::raw* dy, T::raw* dx,         \
                                                         float scale, long long n, long long rows) {            \
        softmax_backward<T>(y, dy, dx, scale, n, rows);                                                          \
    }
FOR_EACH_SOFTMAX_OP(F32, f32)
FOR_EACH_SOFTMAX_OP(BF16, bf16)
