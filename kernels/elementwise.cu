// Elementwise ops. Contract for every kernel: x, y (and dy, dx) hold n elements in the named storage type;
// arithmetic is f32; outputs are written (=), never accumulated. In-place use (y == x) is allowed.
#include "common.cuh"

template <typename In, typename Out>
__device__ void cast(const typename In::raw* x, typename Out::raw* y, long long n) {
    GRID_STRIDE_LOOP(i, n) Out::store(y, i, In::load(x, i));
}

template <typename T>
__device__ void add(const typename T::raw* a, const typename T::raw* b, typename T::raw* y, long long n) {
    GRID_STRIDE_LOOP(i, n) T::store(y, i, T::load(a, i) + T::load(b, i));
}

template <typename T>
__device__ void scale(const typename T::raw* x, float alpha, typename T::raw* y, long long n) {
    GRID_STRIDE_LOOP(i, n) T::store(y, i, alpha * T::load(x, i));
}

__device__ __forceinline__ float sigmoid(float v) { return 1.0f / (1.0f + __expf(-v)); }

template <typename T>
__device__ void silu_forward(const typename T::raw* x, typename T::raw* y, long long n) {
    GRID_STRIDE_LOOP(i, n) {
        const float v = T::load(x, i);
        T::store(y, i, v * sigmoid(v));
    }
}

// d/dx [x * s(x)] = s(x) * (1 + x * (1 - s(x)))
template <typename T>
__device__ void silu_backward(const typename T::raw* x, const typename T::raw* dy, typename T::raw* dx, long long n) {
    GRID_STRIDE_LOOP(i, n) {
        const float v = T::load(x, i), s = sigmoid(v);
        T::store(dx, i, T::load(dy, i) * s * (1.0f + v * (1.0f - s)));
    }
}

#define CAST(name, In, Out) \
    extern "C" __global__ void name(const In::raw* x, Out::raw* y, long long n) { cast<In, Out>(x, y, n); }
CAST(cast_f32_bf16, F32, BF16)
CAST(cast_bf16_f32, BF16, F32)
CAST(cast_f32_f16, F32, F16)
CAST(cast_f16_f32, F16, F32)
CAST(cast_bf16_f16, BF16, F16)
CAST(cast_f16_bf16, F16, BF16)

#define FOR_EACH_FLOAT_OP(T, suffix)                                                                            \
    extern "C" __global__ void add_##suffix(const T::raw* a, const T::raw* b, T::raw* y, long long n) {        \
        add<T>(a, b, y, n);                                                                                      \
    }                                                                                                            \
    extern "C" __global__ void scale_##suffix(const T::raw* x, float alpha, T::raw* y, long long n) {          \
        scale<T>(x, alpha, y, n);                                                                                \
    }                                                                                                            \
    extern "C" __global__ void silu_forward_##suffix(const T::raw* x, T::raw* y, long long n) {                \
        silu_forward<T>(x, y, n);                                                                                \
    }                                                                                                            \
    extern "C" __global__ void silu_backward_##suffix(const T::raw* x, const T::raw* dy, T::raw* dx, long long n) { \
        silu_backward<T>(x, dy, dx, n);                                                                          \
    }
FOR_EACH_FLOAT_OP(F32, f32)
FOR_EACH_FLOAT_OP(BF16, bf16)
