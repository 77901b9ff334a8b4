// Losses, reduced deterministically: a `*_partials` kernel runs on a grid fixed by the element count (one
// 256-thread block per 256 elements, at most the launcher's PARTIALS, independent of the device) and writes one
// f32 block sum per block; `finish_sum` (one block)
// adds those partials in a fixed order and writes scale * total into loss[0]. Same inputs, same bits.
// Gradients are written (=), with the upstream gradient of the loss folded into `coef`.
#include "common.cuh"

// partials[block] = sum over this block's grid-stride share of (pred - target)^2. n = numel.
template <typename T>
__device__ void mse_partials(const typename T::raw* pred, const typename T::raw* target, float* partials, long long n) {
    __shared__ float scratch[32];
    float acc = 0.0f;
    GRID_STRIDE_LOOP(i, n) {
        const float d = T::load(pred, i) - T::load(target, i);
        acc += d * d;
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// dpred = coef * (pred - target), coef = 2 * dloss / numel.
template <typename T>
__device__ void mse_backward(const typename T::raw* pred, const typename T::raw* target, float coef,
                             typename T::raw* dpred, long long n) {
    GRID_STRIDE_LOOP(i, n) T::store(dpred, i, coef * (T::load(pred, i) - T::load(target, i)));
}

// partials[block] = sum of (1 + logvar - mu^2 - exp(logvar)) over this block's share.
template <typename T>
__device__ void kl_partials(const typename T::raw* mu, const typename T::raw* logvar, float* partials, long long n) {
    __shared__ float scratch[32];
    float acc = 0.0f;
    GRID_STRIDE_LOOP(i, n) {
        const float m = T::load(mu, i), lv = T::load(logvar, i);
        acc += (lv - expm1f(lv)) - m * m;  // = 1 + lv - exp(lv) - mu^2 without the cancellation near lv = 0
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// KL = -0.5 / batch * sum(...): dmu = coef * mu, dlogvar = coef * expm1(logvar) / 2, coef = dloss / batch.
template <typename T>
__device__ void kl_backward(const typename T::raw* mu, const typename T::raw* logvar, float coef, typename T::raw* dmu,
                            typename T::raw* dlogvar, long long n) {
    GRID_STRIDE_LOOP(i, n) {
        T::store(dmu, i, coef * T::load(mu, i));
        T::store(dlogvar, i, 0.5f * coef * expm1f(T::load(logvar, i)));
    }
}

// loss[0] = scale * sum(partials[0..count]); one block, blockDim.x a multiple of 32.
extern "C" __global__ void finish_sum(const float* partials, int count, float scale, float* loss) {
    __shared__ float scratch[32];
    float acc = 0.0f;
    for (int i = threadIdx.x; i < count; i += blockDim.x) acc += partials[i];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) loss[0] = scale * acc;
}

#define FOR_EACH_LOSS(T, suffix)                                                                                \
    extern "C" __global__ void mse_partials_##suffix(const T::raw* pred, const T::raw* target, float* partials, \
                                                     long long n) {                                              \
        mse_partials<T>(pred, target, partials, n);                                                              \
    }                                                                                                            \
    extern "C" __global__ void mse_backward_##suffix(const T::raw* pred, const T::raw* target, float coef,      \
                                                     T::raw* dpred, long long n) {                               \
        mse_backward<T>(pred, target, coef, dpred, n);                                                           \
    }                                                                                                            \
    extern "C" __global__ void kl_partials_##suffix(const T::raw* mu, const T::raw* logvar, float* partials,    \
                                                    long long n) {                                               \
        kl_partials<T>(mu, logvar, partials, n);                                                                 \
    }                                                                                                            \
    extern "C" __global__ void kl_backward_##suffix(const T::raw* mu, const T::raw* logvar, float coef,         \
                                                    T::raw* dmu, T::raw* dlogvar, long long n) {                 \
        kl_backward<T>(mu, logvar, coef, dmu, dlogvar, n);                                                       \
    }
FOR_EACH_LOSS(F32, f32)
FOR_EACH_LOSS(BF16, bf16)
