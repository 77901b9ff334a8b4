// Optimizer kernels: the AdamW step on f32 master weights and state, and global-norm gradient clipping.
// Clipping never leaves the device: per tensor, `sumsq_partials` (a grid of 256-thread blocks, one per 256
// elements and at most PARTIALS) writes block sums of g^2 and `accumulate_sum` (one block) adds them, in a fixed order, into
// total[0]; after the last tensor `finish_norm` takes the square root, and `clip_scale` reads the norm
// from device memory. Deterministic: same inputs, same bits.
#include "common.cuh"

// torch.optim.AdamW's single-tensor step, in its order of operations (p, m, v f32; g f32 or bf16; n elements):
//   p *= decay                      decay = 1 - lr * weight_decay
//   m += (1 - beta1) * (g - m)      (torch's lerp)
//   v = beta2 * v + (1 - beta2) g^2
//   p += (-step_size * m) / (sqrt(v) / bc2_sqrt + eps)   (addcdiv) step_size = lr / (1 - beta1^t), bc2_sqrt = sqrt(1 - beta2^t)
// The host computes the scalars in f64, as torch does in Python. p_bf16, when not null, gets the new p in bf16.
template <typename G>
__device__ void adamw_step(float* p, const typename G::raw* g, float* m, float* v, bf16_t* p_bf16, float decay,
                           float one_minus_beta1, float beta2, float one_minus_beta2, float eps, float step_size,
                           float bc2_sqrt, long long n) {
    GRID_STRIDE_LOOP(i, n) {
        const float grad = G::load(g, i);
        float param = p[i] * decay;
        const float mi = m[i] + one_minus_beta1 * (grad - m[i]);
        const float vi = beta2 * v[i] + one_minus_beta2 * grad * grad;
        param += (-step_size * mi) / (sqrtf(vi) / bc2_sqrt + eps);
        m[i] = mi;
        v[i] = vi;
        p[i] = param;
        if (p_bf16) p_bf16[i] = f32_to_bf16(param);
    }
}

// partials[block] = sum of g^2 over this block's grid-stride share.
template <typename T>
__device__ void sumsq_partials(const typename T::raw* g, float* partials, long long n) {
    __shared__ float scratch[32];
    float acc = 0.0f;
    GRID_STRIDE_LOOP(i, n) {
        const float v = T::load(g, i);
        acc += v * v;
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// g *= min(1, max_norm / (norm[0] + 1e-6)), torch.nn.utils.clip_grad_norm_'s clamped coefficient.
template <typename T>
__device__ void clip_scale(typename T::raw* g, const float* norm, float max_norm, long long n) {
    const float coef = fminf(1.0f, max_norm / (norm[0] + 1e-6f));
    GRID_STRIDE_LOOP(i, n) T::store(g, i, coef * T::load(g, i));
}

// total[0] = (first ? 0 : total[0]) + sum(partials[0..count]); one block, blockDim.x a multiple of 32.
extern "C" __global__ void accumulate_sum(const float* partials, int count, int first, float* total) {
    __shared__ float scratch[32];
    float acc = 0.0f;
    for (int i = threadIdx.x; i < count; i += blockDim.x) acc += partials[i];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) total[0] = (first ? 0.0f : total[0]) + acc;
}

// total[0] = sqrt(total[0]): the sum of squares becomes the global L2 norm. One thread.
extern "C" __global__ void finish_norm(float* total) {
    if (blockIdx.x == 0 && threadIdx.x == 0) total[0] = sqrtf(total[0]);
}

#define FOR_EACH_GRAD(T, suffix)                                                                                \
    extern "C" __global__ void adamw_step_##suffix(float* p, const T::raw* g, float* m, float* v, bf16_t* p_bf16, \
                                                   float decay, float one_minus_beta1, float beta2,              \
                                                   float one_minus_beta2, float eps, float step_size,            \
                                                   float bc2_sqrt, long long n) {                                \
        adamw_step<T>(p, g, m, v, p_bf16, decay, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2_sqrt, n); \
    }                                                                                                            \
    extern "C" __global__ void sumsq_partials_##suffix(const T::raw* g, float* partials, long long n) {         \
        sumsq_partials<T>(g, partials, n);                                                                       \
    }                                                                                                            \
    extern "C" __global__ void clip_scale_##suffix(T::raw* g, const float* norm, float max_norm, long long n) { \
        clip_scale<T>(g, norm, max_norm, n);                                                                     \
    }
FOR_EACH_GRAD(F32, f32)
FOR_EACH_GRAD(BF16, bf16)
