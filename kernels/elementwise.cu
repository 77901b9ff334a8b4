// Elementwise ops. Contract for every kernel: x, y (and dy, dx) hold n elements in the named storage type
// (GEGLU's input and input grad hold 2n, the timestep embedding reads f32 timesteps); arithmetic is f32;
// outputs are written (=), never accumulated. In-place use (y == x) is allowed except for GEGLU and the
// timestep embedding, whose inputs and outputs differ in shape.
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
__device__ void fill(typename T::raw* y, float value, long long n) {
    GRID_STRIDE_LOOP(i, n) T::store(y, i, value);
}

template <typename T>
__device__ void scale(const typename T::raw* x, float alpha, typename T::raw* y, long long n) {
    GRID_STRIDE_LOOP(i, n) T::store(y, i, alpha * T::load(x, i));
}

__device__ __forceinline__ float sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }

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
    extern "C" __global__ void fill_##suffix(T::raw* y, float value, long long n) { fill<T>(y, value, n); }    \
    extern "C" __global__ void silu_forward_##suffix(const T::raw* x, T::raw* y, long long n) {                \
        silu_forward<T>(x, y, n);                                                                                \
    }                                                                                                            \
    extern "C" __global__ void silu_backward_##suffix(const T::raw* x, const T::raw* dy, T::raw* dx, long long n) { \
        silu_backward<T>(x, dy, dx, n);                                                                          \
    }
FOR_EACH_FLOAT_OP(F32, f32)
FOR_EACH_FLOAT_OP(BF16, bf16)

// ReLU: y = x < 0 ? 0 : x, so NaN passes through as in torch (fmaxf would hide it); dx = x <= 0 ? 0 : dy,
// torch's threshold_backward (x == 0 gets 0).
template <typename T>
__device__ void relu_forward(const typename T::raw* x, typename T::raw* y, long long n) {
    GRID_STRIDE_LOOP(i, n) {
        const float v = T::load(x, i);
        T::store(y, i, v < 0.0f ? 0.0f : v);
    }
}
template <typename T>
__device__ void relu_backward(const typename T::raw* x, const typename T::raw* dy, typename T::raw* dx, long long n) {
    GRID_STRIDE_LOOP(i, n) T::store(dx, i, T::load(x, i) <= 0.0f ? 0.0f : T::load(dy, i));
}

// Exact GELU (torch's default, approximate='none'): gelu(x) = x * Phi(x), Phi the standard normal CDF.
// normcdff(x) = erfc(-x / sqrt 2) / 2 keeps its relative accuracy in the left tail, where 1 + erff(...) cancels.
__device__ __forceinline__ float gelu(float v) { return v * normcdff(v); }
// gelu'(x) = Phi(x) + x * phi(x), phi(x) = exp(-x^2 / 2) / sqrt(2 pi).
__device__ __forceinline__ float gelu_grad(float v) {
    return normcdff(v) + v * expf(-0.5f * v * v) * 0.3989422804014327f;
}

template <typename T>
__device__ void gelu_forward(const typename T::raw* x, typename T::raw* y, long long n) {
    GRID_STRIDE_LOOP(i, n) T::store(y, i, gelu(T::load(x, i)));
}
template <typename T>
__device__ void gelu_backward(const typename T::raw* x, const typename T::raw* dy, typename T::raw* dx, long long n) {
    GRID_STRIDE_LOOP(i, n) T::store(dx, i, T::load(dy, i) * gelu_grad(T::load(x, i)));
}

// GEGLU as diffusers' feed-forward: x is [rows, 2 * half]; per row, value = x[:, :half], gate = x[:, half:];
// y [rows, half] = value * gelu(gate). n = rows * half, one thread per output element.
// Backward writes both halves of dx: dvalue = dy * gelu(gate), dgate = dy * value * gelu'(gate).
template <typename T>
__device__ void geglu_forward(const typename T::raw* x, typename T::raw* y, long long half, long long n) {
    GRID_STRIDE_LOOP(i, n) {
        const long long value_at = i + (i / half) * half;  // row * 2 * half + col
        T::store(y, i, T::load(x, value_at) * gelu(T::load(x, value_at + half)));
    }
}
template <typename T>
__device__ void geglu_backward(const typename T::raw* x, const typename T::raw* dy, typename T::raw* dx,
                               long long half, long long n) {
    GRID_STRIDE_LOOP(i, n) {
        const long long value_at = i + (i / half) * half;
        const float value = T::load(x, value_at), gate = T::load(x, value_at + half), g = T::load(dy, i);
        T::store(dx, value_at, g * gelu(gate));
        T::store(dx, value_at + half, g * value * gelu_grad(gate));
    }
}

// Sigmoid; the backward takes the forward's output y: dx = dy * y * (1 - y).
template <typename T>
__device__ void sigmoid_forward(const typename T::raw* x, typename T::raw* y, long long n) {
    GRID_STRIDE_LOOP(i, n) T::store(y, i, 1.0f / (1.0f + expf(-T::load(x, i))));
}
template <typename T>
__device__ void sigmoid_backward(const typename T::raw* y, const typename T::raw* dy, typename T::raw* dx, long long n) {
    GRID_STRIDE_LOOP(i, n) {
        const float s = T::load(y, i);
        T::store(dx, i, T::load(dy, i) * s * (1.0f - s));
    }
}

// Residual add with a scale: y = a + s * b. Backward: da = dy, db = s * dy (both written).
template <typename T>
__device__ void add_scaled(const typename T::raw* a, const typename T::raw* b, float s, typename T::raw* y, long long n) {
    GRID_STRIDE_LOOP(i, n) T::store(y, i, T::load(a, i) + s * T::load(b, i));
}
template <typename T>
__device__ void add_scaled_backward(const typename T::raw* dy, float s, typename T::raw* da, typename T::raw* db,
                                    long long n) {
    GRID_STRIDE_LOOP(i, n) {
        const float g = T::load(dy, i);
        T::store(da, i, g);
        T::store(db, i, s * g);
    }
}

// diffusers' get_timestep_embedding (max_period 10000, scale 1): t is [batch] f32, y is [batch, dim], n = batch * dim.
// half = dim / 2; freq_k = exp(-ln(10000) * k / (half - shift)); row = (sin(t f), cos(t f)), or (cos, sin) when
// flip; an odd dim's last column is 0. Each step is an f32 operation in torch's order, so the rounding matches.
template <typename T>
__device__ void timestep_embedding(const float* t, typename T::raw* y, int dim, int flip, float shift, long long n) {
    const int half = dim / 2;
    GRID_STRIDE_LOOP(i, n) {
        const int j = (int)(i % dim);
        float out = 0.0f;
        if (j < 2 * half) {
            const int k = j < half ? j : j - half;
            const float exponent = (-9.210340371976184f * (float)k) / ((float)half - shift);
            const float arg = t[i / dim] * expf(exponent);
            out = ((j < half) != (flip != 0)) ? sinf(arg) : cosf(arg);
        }
        T::store(y, i, out);
    }
}

#define FOR_EACH_ACTIVATION(T, suffix)                                                                          \
    extern "C" __global__ void relu_forward_##suffix(const T::raw* x, T::raw* y, long long n) {                \
        relu_forward<T>(x, y, n);                                                                                \
    }                                                                                                            \
    extern "C" __global__ void relu_backward_##suffix(const T::raw* x, const T::raw* dy, T::raw* dx, long long n) { \
        relu_backward<T>(x, dy, dx, n);                                                                          \
    }                                                                                                            \
    extern "C" __global__ void gelu_forward_##suffix(const T::raw* x, T::raw* y, long long n) {                \
        gelu_forward<T>(x, y, n);                                                                                \
    }                                                                                                            \
    extern "C" __global__ void gelu_backward_##suffix(const T::raw* x, const T::raw* dy, T::raw* dx, long long n) { \
        gelu_backward<T>(x, dy, dx, n);                                                                          \
    }                                                                                                            \
    extern "C" __global__ void geglu_forward_##suffix(const T::raw* x, T::raw* y, long long half, long long n) { \
        geglu_forward<T>(x, y, half, n);                                                                         \
    }                                                                                                            \
    extern "C" __global__ void geglu_backward_##suffix(const T::raw* x, const T::raw* dy, T::raw* dx, long long half, \
                                                       long long n) {                                            \
        geglu_backward<T>(x, dy, dx, half, n);                                                                   \
    }                                                                                                            \
    extern "C" __global__ void sigmoid_forward_##suffix(const T::raw* x, T::raw* y, long long n) {             \
        sigmoid_forward<T>(x, y, n);                                                                             \
    }                                                                                                            \
    extern "C" __global__ void sigmoid_backward_##suffix(const T::raw* y, const T::raw* dy, T::raw* dx, long long n) { \
        sigmoid_backward<T>(y, dy, dx, n);                                                                       \
    }                                                                                                            \
    extern "C" __global__ void add_scaled_##suffix(const T::raw* a, const T::raw* b, float s, T::raw* y, long long n) { \
        add_scaled<T>(a, b, s, y, n);                                                                            \
    }                                                                                                            \
    extern "C" __global__ void add_scaled_backward_##suffix(const T::raw* dy, float s, T::raw* da, T::raw* db,  \
                                                            long long n) {                                       \
        add_scaled_backward<T>(dy, s, da, db, n);                                                                \
    }                                                                                                            \
    extern "C" __global__ void timestep_embedding_##suffix(const float* t, T::raw* y, int dim, int flip, float shift, \
                                                           long long n) {                                        \
        timestep_embedding<T>(t, y, dim, flip, shift, n);                                                        \
    }
FOR_EACH_ACTIVATION(F32, f32)
FOR_EACH_ACTIVATION(BF16, bf16)

// The VAE's reparameterisation: z = mu + eps * exp(logvar / 2); backward dmu = dz, dlogvar = dz * eps *
// exp(logvar / 2) / 2 (both written).
template <typename T>
__device__ void reparameterize_forward(const typename T::raw* mu, const typename T::raw* logvar, const typename T::raw* eps,
                                       typename T::raw* z, long long n) {
    GRID_STRIDE_LOOP(i, n) T::store(z, i, T::load(mu, i) + T::load(eps, i) * expf(0.5f * T::load(logvar, i)));
}
template <typename T>
__device__ void reparameterize_backward(const typename T::raw* logvar, const typename T::raw* eps, const typename T::raw* dz,
                                        typename T::raw* dmu, typename T::raw* dlogvar, long long n) {
    GRID_STRIDE_LOOP(i, n) {
        const float g = T::load(dz, i);
        T::store(dmu, i, g);
        T::store(dlogvar, i, 0.5f * g * T::load(eps, i) * expf(0.5f * T::load(logvar, i)));
    }
}
#define REPARAMETERIZE(T, suffix)                                                                                 \
    extern "C" __global__ void reparameterize_forward_##suffix(const T::raw* mu, const T::raw* logvar,          \
                                                               const T::raw* eps, T::raw* z, long long n) {     \
        reparameterize_forward<T>(mu, logvar, eps, z, n);                                                        \
    }                                                                                                            \
    extern "C" __global__ void reparameterize_backward_##suffix(const T::raw* logvar, const T::raw* eps,        \
                                                                const T::raw* dz, T::raw* dmu, T::raw* dlogvar, \
                                                                long long n) {                                   \
        reparameterize_backward<T>(logvar, eps, dz, dmu, dlogvar, n);                                            \
    }
REPARAMETERIZE(F32, f32)
REPARAMETERIZE(BF16, bf16)

// tanh, ln and rsqrt: y = tanhf(x), logf(x), rsqrtf(x). The tanh and rsqrt backwards take the forward's output y
// (dx = dy * (1 - y^2), dx = -dy * y^3 / 2); the log backward takes x (dx = dy / x).
template <typename T>
__device__ void tanh_forward(const typename T::raw* x, typename T::raw* y, long long n) {
    GRID_STRIDE_LOOP(i, n) T::store(y, i, tanhf(T::load(x, i)));
}
template <typename T>
__device__ void tanh_backward(const typename T::raw* y, const typename T::raw* dy, typename T::raw* dx, long long n) {
    GRID_STRIDE_LOOP(i, n) {
        const float t = T::load(y, i);
        T::store(dx, i, T::load(dy, i) * (1.0f - t * t));
    }
}
template <typename T>
__device__ void log_forward(const typename T::raw* x, typename T::raw* y, long long n) {
    GRID_STRIDE_LOOP(i, n) T::store(y, i, logf(T::load(x, i)));
}
template <typename T>
__device__ void log_backward(const typename T::raw* x, const typename T::raw* dy, typename T::raw* dx, long long n) {
    GRID_STRIDE_LOOP(i, n) T::store(dx, i, T::load(dy, i) / T::load(x, i));
}
template <typename T>
__device__ void rsqrt_forward(const typename T::raw* x, typename T::raw* y, long long n) {
    GRID_STRIDE_LOOP(i, n) T::store(y, i, rsqrtf(T::load(x, i)));
}
template <typename T>
__device__ void rsqrt_backward(const typename T::raw* y, const typename T::raw* dy, typename T::raw* dx, long long n) {
    GRID_STRIDE_LOOP(i, n) {
        const float r = T::load(y, i);
        T::store(dx, i, -0.5f * T::load(dy, i) * r * r * r);
    }
}
// Product y = a * b; backward da = dy * b, db = dy * a (both written; each element is read before it is written).
template <typename T>
__device__ void mul(const typename T::raw* a, const typename T::raw* b, typename T::raw* y, long long n) {
    GRID_STRIDE_LOOP(i, n) T::store(y, i, T::load(a, i) * T::load(b, i));
}
template <typename T>
__device__ void mul_backward(const typename T::raw* a, const typename T::raw* b, const typename T::raw* dy,
                             typename T::raw* da, typename T::raw* db, long long n) {
    GRID_STRIDE_LOOP(i, n) {
        const float g = T::load(dy, i), av = T::load(a, i), bv = T::load(b, i);
        T::store(da, i, g * bv);
        T::store(db, i, g * av);
    }
}
#define UNARY_PAIR(T, suffix, name)                                                                               \
    extern "C" __global__ void name##_forward_##suffix(const T::raw* x, T::raw* y, long long n) {               \
        name##_forward<T>(x, y, n);                                                                              \
    }                                                                                                            \
    extern "C" __global__ void name##_backward_##suffix(const T::raw* x, const T::raw* dy, T::raw* dx, long long n) { \
        name##_backward<T>(x, dy, dx, n);                                                                        \
    }
#define PRODUCT(T, suffix)                                                                                        \
    UNARY_PAIR(T, suffix, tanh)                                                                                  \
    UNARY_PAIR(T, suffix, log)                                                                                   \
    UNARY_PAIR(T, suffix, rsqrt)                                                                                 \
    extern "C" __global__ void mul_##suffix(const T::raw* a, const T::raw* b, T::raw* y, long long n) {         \
        mul<T>(a, b, y, n);                                                                                      \
    }                                                                                                            \
    extern "C" __global__ void mul_backward_##suffix(const T::raw* a, const T::raw* b, const T::raw* dy,        \
                                                     T::raw* da, T::raw* db, long long n) {                      \
        mul_backward<T>(a, b, dy, da, db, n);                                                                    \
    }
PRODUCT(F32, f32)
PRODUCT(BF16, bf16)
