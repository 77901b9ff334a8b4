// Group norm (optionally fused with SiLU) and layer norm, forward and backward.
//
// Shared contract: statistics are f32 whatever the storage type: the mean and rstd = 1/sqrt(var + eps) of each
// (batch, group) or row, computed two-pass (mean first, then the mean squared deviation from it; the second
// read hits L1/L2). Outputs and dx are written (=). Parameter grads are never accumulated with atomics: each
// block writes its per-channel partial sums to an f32 buffer `part` laid out [2][P][C] (dweight sums, then
// dbias sums), and norm_param_grad_reduce adds them over P in a fixed order (+=), so every run gives the
// same bits. Where every pointer is 16-byte aligned and the innermost run length divides by the pack width,
// loads and stores move 16 bytes at a time (4 f32 or 8 bf16); otherwise one element at a time.
#include "common.cuh"

// 16 bytes of storage as f32 values.
template <typename T>
struct Pack;
template <>
struct Pack<F32> {
    static constexpr int N = 4;
    static __device__ __forceinline__ void load(const float* p, float* v) {
        const float4 q = *reinterpret_cast<const float4*>(p);
        v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
    }
    static __device__ __forceinline__ void store(float* p, const float* v) {
        float4 q;
        q.x = v[0], q.y = v[1], q.z = v[2], q.w = v[3];
        *reinterpret_cast<float4*>(p) = q;
    }
};
template <>
struct Pack<BF16> {
    static constexpr int N = 8;
    // Little-endian: element 2k is the low half of word k.
    static __device__ __forceinline__ void load(const bf16_t* p, float* v) {
        const uint4 q = *reinterpret_cast<const uint4*>(p);
        const unsigned w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int k = 0; k < 4; k++) {
            v[2 * k] = __uint_as_float(w[k] << 16);
            v[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
        }
    }
    static __device__ __forceinline__ void store(bf16_t* p, const float* v) {
        unsigned w[4];
#pragma unroll
        for (int k = 0; k < 4; k++) w[k] = (unsigned)f32_to_bf16(v[2 * k]) | ((unsigned)f32_to_bf16(v[2 * k + 1]) << 16);
        uint4 q;
        q.x = w[0], q.y = w[1], q.z = w[2], q.w = w[3];
        *reinterpret_cast<uint4*>(p) = q;
    }
};

// W consecutive elements starting at p (W is 1 or the pack width).
template <typename T, int W>
__device__ __forceinline__ void load_w(const typename T::raw* p, float* v) {
    if constexpr (W == 1) v[0] = T::load(p, 0);
    else Pack<T>::load(p, v);
}
template <typename T, int W>
__device__ __forceinline__ void store_w(typename T::raw* p, const float* v) {
    if constexpr (W == 1) T::store(p, 0, v[0]);
    else Pack<T>::store(p, v);
}

__device__ __forceinline__ bool aligned16(const void* p) { return ((unsigned long long)p & 15ull) == 0; }

__device__ __forceinline__ float sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }

// d/dh [h * s(h)] = s(h) * (1 + h * (1 - s(h)))
__device__ __forceinline__ float silu_grad(float h) {
    const float s = sigmoid(h);
    return s * (1.0f + h * (1.0f - s));
}

// Sums two values over the block with one pair of barriers; every thread gets both. scratch: 64 floats.
__device__ __forceinline__ void block_sum2(float& a, float& b, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    a = warp_sum(a);
    b = warp_sum(b);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = a, scratch[32 + warp] = b;
    __syncthreads();
    a = warp_sum(lane < warps ? scratch[lane] : 0.0f);
    b = warp_sum(lane < warps ? scratch[32 + lane] : 0.0f);
}

// ---------------------------------------------------------------------------------------------------------------
// group_norm_forward: x, y [N, C, HW]; weight, bias [C]; mean, rstd [N, G] f32 (written).
// y = (x - mean) * rstd * weight[c] + bias[c], then y = y * sigmoid(y) when silu != 0.
// Grid: N * G blocks, one per (batch, group); blockDim a multiple of 32 (at most 1024).
template <typename T, int W>
__device__ void group_norm_forward_body(const typename T::raw* x, const typename T::raw* weight,
                                        const typename T::raw* bias, typename T::raw* y, float* mean_out,
                                        float* rstd_out, int C, int G, long long HW, float eps, int silu) {
    __shared__ float scratch[32];
    const int Cg = C / G;
    const long long ng = blockIdx.x;  // n * G + g; the group's elements are contiguous
    const int g = (int)(ng % G);
    const long long len = (long long)Cg * HW;
    const typename T::raw* xg = x + ng * len;
    typename T::raw* yg = y + ng * len;

    float s = 0.0f;
    for (long long i = threadIdx.x; i < len / W; i += blockDim.x) {
        float v[W];
        load_w<T, W>(xg + i * W, v);
#pragma unroll
        for (int k = 0; k < W; k++) s += v[k];
    }
    const float mean = block_sum(s, scratch) / (float)len;
    float q = 0.0f;
    for (long long i = threadIdx.x; i < len / W; i += blockDim.x) {
        float v[W];
        load_w<T, W>(xg + i * W, v);
#pragma unroll
        for (int k = 0; k < W; k++) q += (v[k] - mean) * (v[k] - mean);
    }
    const float rstd = rsqrtf(block_sum(q, scratch) / (float)len + eps);
    if (threadIdx.x == 0) mean_out[ng] = mean, rstd_out[ng] = rstd;

    for (int c = 0; c < Cg; c++) {
        const int ch = g * Cg + c;
        const float scale = rstd * T::load(weight, ch), shift = T::load(bias, ch);
        const long long off = (long long)c * HW;
        for (long long i = threadIdx.x; i < HW / W; i += blockDim.x) {
            float v[W];
            load_w<T, W>(xg + off + i * W, v);
#pragma unroll
            for (int k = 0; k < W; k++) {
                const float h = (v[k] - mean) * scale + shift;
                v[k] = silu ? h * sigmoid(h) : h;
            }
            store_w<T, W>(yg + off + i * W, v);
        }
    }
}

// group_norm_backward: x, dy, dx [N, C, HW]; weight, bias [C] (bias only matters with silu: the pre-activation
// h = xhat * weight + bias is recomputed, not stored); mean, rstd [N, G] from the forward.
// dx (=) = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) over the group, dxhat = g * weight[c],
// g = dy * silu'(h) (or dy). part [2][N][C] (=): sum over HW of g * xhat (dweight) and of g (dbias).
// Grid: N * G blocks; blockDim a multiple of 32.
template <typename T, int W>
__device__ void group_norm_backward_body(const typename T::raw* x, const typename T::raw* weight,
                                         const typename T::raw* bias, const float* mean_in, const float* rstd_in,
                                         const typename T::raw* dy, typename T::raw* dx, float* part, int N, int C,
                                         int G, long long HW, int silu) {
    __shared__ float scratch[64];
    const int Cg = C / G;
    const long long ng = blockIdx.x;
    const int n = (int)(ng / G), g = (int)(ng % G);
    const long long len = (long long)Cg * HW;
    const typename T::raw* xg = x + ng * len;
    const typename T::raw* dyg = dy + ng * len;
    typename T::raw* dxg = dx + ng * len;
    const float mean = mean_in[ng], rstd = rstd_in[ng];

    // Group sums of dxhat and dxhat * xhat follow from the per-channel sums, weighted by weight[c].
    float sum_dxhat = 0.0f, sum_dxhat_xhat = 0.0f;
    for (int c = 0; c < Cg; c++) {
        const int ch = g * Cg + c;
        const float wc = T::load(weight, ch), bc = T::load(bias, ch);
        const long long off = (long long)c * HW;
        float sg = 0.0f, sgx = 0.0f;
        for (long long i = threadIdx.x; i < HW / W; i += blockDim.x) {
            float xv[W], gv[W];
            load_w<T, W>(xg + off + i * W, xv);
            load_w<T, W>(dyg + off + i * W, gv);
#pragma unroll
            for (int k = 0; k < W; k++) {
                const float xhat = (xv[k] - mean) * rstd;
                const float gk = silu ? gv[k] * silu_grad(xhat * wc + bc) : gv[k];
                sg += gk;
                sgx += gk * xhat;
            }
        }
        block_sum2(sgx, sg, scratch);
        if (threadIdx.x == 0) {
            part[(long long)n * C + ch] = sgx;
            part[(long long)N * C + (long long)n * C + ch] = sg;
        }
        sum_dxhat += wc * sg;
        sum_dxhat_xhat += wc * sgx;
    }
    const float m1 = sum_dxhat / (float)len, m2 = sum_dxhat_xhat / (float)len;

    for (int c = 0; c < Cg; c++) {
        const int ch = g * Cg + c;
        const float wc = T::load(weight, ch), bc = T::load(bias, ch);
        const long long off = (long long)c * HW;
        for (long long i = threadIdx.x; i < HW / W; i += blockDim.x) {
            float xv[W], gv[W];
            load_w<T, W>(xg + off + i * W, xv);
            load_w<T, W>(dyg + off + i * W, gv);
#pragma unroll
            for (int k = 0; k < W; k++) {
                const float xhat = (xv[k] - mean) * rstd;
                const float gk = silu ? gv[k] * silu_grad(xhat * wc + bc) : gv[k];
                xv[k] = rstd * (gk * wc - m1 - xhat * m2);
            }
            store_w<T, W>(dxg + off + i * W, xv);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// layer_norm_forward: x, y [rows, D]; weight, bias [D]; mean, rstd [rows] f32 (written).
// y = (x - mean) * rstd * weight + bias. One warp per row (a row of 320..1280 values is 10..40 per lane, and a
// warp reduces without barriers). Grid: ceil(rows / warps per block) blocks.
template <typename T, int W>
__device__ void layer_norm_forward_body(const typename T::raw* x, const typename T::raw* weight,
                                        const typename T::raw* bias, typename T::raw* y, float* mean_out,
                                        float* rstd_out, long long rows, int D, float eps) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;  // the whole warp leaves together
    const typename T::raw* xr = x + row * D;
    typename T::raw* yr = y + row * D;

    float s = 0.0f;
    for (int j = lane; j < D / W; j += 32) {
        float v[W];
        load_w<T, W>(xr + j * W, v);
#pragma unroll
        for (int k = 0; k < W; k++) s += v[k];
    }
    const float mean = warp_sum(s) / (float)D;
    float q = 0.0f;
    for (int j = lane; j < D / W; j += 32) {
        float v[W];
        load_w<T, W>(xr + j * W, v);
#pragma unroll
        for (int k = 0; k < W; k++) q += (v[k] - mean) * (v[k] - mean);
    }
    const float rstd = rsqrtf(warp_sum(q) / (float)D + eps);
    if (lane == 0) mean_out[row] = mean, rstd_out[row] = rstd;

    for (int j = lane; j < D / W; j += 32) {
        float v[W], wv[W], bv[W];
        load_w<T, W>(xr + j * W, v);
        load_w<T, W>(weight + j * W, wv);
        load_w<T, W>(bias + j * W, bv);
#pragma unroll
        for (int k = 0; k < W; k++) v[k] = (v[k] - mean) * rstd * wv[k] + bv[k];
        store_w<T, W>(yr + j * W, v);
    }
}

// layer_norm_backward: x, dy, dx [rows, D]; weight [D]; mean, rstd [rows] from the forward.
// dx (=) = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) over the row, dxhat = dy * weight.
// Block b owns rows [b * rows_per_block, (b + 1) * rows_per_block), one warp per row at a time; each warp sums
// dy * xhat and dy per column into its own slice of dynamic shared memory (each column owned by one lane, so
// no races), and the block adds the warps' slices in order into part [2][gridDim.x][D] (=).
// Dynamic shared memory: warps * 2 * D floats.
template <typename T, int W>
__device__ void layer_norm_backward_body(const typename T::raw* x, const typename T::raw* weight,
                                         const float* mean_in, const float* rstd_in, const typename T::raw* dy,
                                         typename T::raw* dx, float* part, long long rows, int D,
                                         int rows_per_block) {
    extern __shared__ float colsum[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int i = threadIdx.x; i < warps * 2 * D; i += blockDim.x) colsum[i] = 0.0f;
    __syncthreads();
    // Element k of pack j sits at slot k * (D / W) + j: consecutive lanes hit consecutive banks.
    float* cw = colsum + warp * 2 * D;
    float* cb = cw + D;
    const int packs = D / W;

    const long long row0 = (long long)blockIdx.x * rows_per_block;
    const long long row1 = min(row0 + rows_per_block, rows);
    for (long long row = row0 + warp; row < row1; row += warps) {
        const float mean = mean_in[row], rstd = rstd_in[row];
        const typename T::raw* xr = x + row * D;
        const typename T::raw* dyr = dy + row * D;
        float a1 = 0.0f, a2 = 0.0f;
        for (int j = lane; j < packs; j += 32) {
            float xv[W], gv[W], wv[W];
            load_w<T, W>(xr + j * W, xv);
            load_w<T, W>(dyr + j * W, gv);
            load_w<T, W>(weight + j * W, wv);
#pragma unroll
            for (int k = 0; k < W; k++) {
                const float xhat = (xv[k] - mean) * rstd, dxhat = gv[k] * wv[k];
                a1 += dxhat;
                a2 += dxhat * xhat;
                cw[k * packs + j] += gv[k] * xhat;
                cb[k * packs + j] += gv[k];
            }
        }
        const float m1 = warp_sum(a1) / (float)D, m2 = warp_sum(a2) / (float)D;
        for (int j = lane; j < packs; j += 32) {
            float xv[W], gv[W], wv[W];
            load_w<T, W>(xr + j * W, xv);
            load_w<T, W>(dyr + j * W, gv);
            load_w<T, W>(weight + j * W, wv);
#pragma unroll
            for (int k = 0; k < W; k++) {
                const float xhat = (xv[k] - mean) * rstd;
                xv[k] = rstd * (gv[k] * wv[k] - m1 - xhat * m2);
            }
            store_w<T, W>(dx + row * D + j * W, xv);
        }
    }
    __syncthreads();
    for (int col = threadIdx.x; col < D; col += blockDim.x) {
        const int slot = (col % W) * packs + col / W;
        float sw = 0.0f, sb = 0.0f;
        for (int w = 0; w < warps; w++) sw += colsum[w * 2 * D + slot], sb += colsum[w * 2 * D + D + slot];
        part[(long long)blockIdx.x * D + col] = sw;
        part[(long long)gridDim.x * D + (long long)blockIdx.x * D + col] = sb;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// norm_param_grad_reduce: dweight[c] += sum_p part[0][p][c], dbias[c] += sum_p part[1][p][c], summed in a fixed
// order (deterministic). Block (32, 8): 32 channels, 8 interleaved slices of p. Grid: ceil(C / 32).
template <typename T>
__device__ void norm_param_grad_reduce(const float* part, typename T::raw* dweight, typename T::raw* dbias, int P,
                                       int C) {
    __shared__ float sw[8][33], sb[8][33];
    const int tx = threadIdx.x, ty = threadIdx.y, c = blockIdx.x * 32 + tx;
    float a = 0.0f, b = 0.0f;
    if (c < C) {
        for (int p = ty; p < P; p += 8) {
            a += part[(long long)p * C + c];
            b += part[(long long)P * C + (long long)p * C + c];
        }
    }
    sw[ty][tx] = a, sb[ty][tx] = b;
    __syncthreads();
    if (ty == 0 && c < C) {
        for (int k = 1; k < 8; k++) a += sw[k][tx], b += sb[k][tx];
        T::store(dweight, c, T::load(dweight, c) + a);
        T::store(dbias, c, T::load(dbias, c) + b);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Entry points: pick the 16-byte path where every pointer is aligned and runs divide by the pack width.
#define NORM_KERNELS(T, suffix)                                                                                     \
    extern "C" __global__ void __launch_bounds__(512)                                                               \
        group_norm_forward_##suffix(const T::raw* x, const T::raw* weight, const T::raw* bias, T::raw* y,          \
                                    float* mean, float* rstd, int C, int G, long long HW, float eps, int silu) {    \
        constexpr int P = Pack<T>::N;                                                                               \
        if (HW % P == 0 && aligned16(x) && aligned16(y))                                                            \
            group_norm_forward_body<T, P>(x, weight, bias, y, mean, rstd, C, G, HW, eps, silu);                    \
        else                                                                                                        \
            group_norm_forward_body<T, 1>(x, weight, bias, y, mean, rstd, C, G, HW, eps, silu);                    \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(512) group_norm_backward_##suffix(                                \
        const T::raw* x, const T::raw* weight, const T::raw* bias, const float* mean, const float* rstd,            \
        const T::raw* dy, T::raw* dx, float* part, int N, int C, int G, long long HW, int silu) {                   \
        constexpr int P = Pack<T>::N;                                                                               \
        if (HW % P == 0 && aligned16(x) && aligned16(dy) && aligned16(dx))                                          \
            group_norm_backward_body<T, P>(x, weight, bias, mean, rstd, dy, dx, part, N, C, G, HW, silu);          \
        else                                                                                                        \
            group_norm_backward_body<T, 1>(x, weight, bias, mean, rstd, dy, dx, part, N, C, G, HW, silu);          \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(256)                                                               \
        layer_norm_forward_##suffix(const T::raw* x, const T::raw* weight, const T::raw* bias, T::raw* y,          \
                                    float* mean, float* rstd, long long rows, int D, float eps) {                   \
        constexpr int P = Pack<T>::N;                                                                               \
        if (D % P == 0 && aligned16(x) && aligned16(y) && aligned16(weight) && aligned16(bias))                    \
            layer_norm_forward_body<T, P>(x, weight, bias, y, mean, rstd, rows, D, eps);                           \
        else                                                                                                        \
            layer_norm_forward_body<T, 1>(x, weight, bias, y, mean, rstd, rows, D, eps);                           \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(256) layer_norm_backward_##suffix(                                \
        const T::raw* x, const T::raw* weight, const float* mean, const float* rstd, const T::raw* dy, T::raw* dx,  \
        float* part, long long rows, int D, int rows_per_block) {                                                   \
        constexpr int P = Pack<T>::N;                                                                               \
        if (D % P == 0 && aligned16(x) && aligned16(weight) && aligned16(dy) && aligned16(dx))                     \
            layer_norm_backward_body<T, P>(x, weight, mean, rstd, dy, dx, part, rows, D, rows_per_block);          \
        else                                                                                                        \
            layer_norm_backward_body<T, 1>(x, weight, mean, rstd, dy, dx, part, rows, D, rows_per_block);          \
    }                                                                                                               \
    extern "C" __global__ void norm_param_grad_reduce_##suffix(const float* part, T::raw* dweight, T::raw* dbias,  \
                                                               int P, int C) {                                      \
        norm_param_grad_reduce<T>(part, dweight, dbias, P, C);                                                      \
    }
NORM_KERNELS(F32, f32)
NORM_KERNELS(BF16, bf16)
