// Shape ops on dense NCHW / [B, C, L] tensors: channel concat and split, nearest 2x upsampling, average pooling
// of the last dim to size 1. Values move unchanged (bf16 -> f32 -> bf16 is exact); sums accumulate in f32.
// Every output is written (=), never accumulated; n counts the elements of the tensor indexed by the thread.
#include "common.cuh"

// y [N, ca + cb, hw] = concat(a [N, ca, hw], b [N, cb, hw]) along channels. n = N * (ca + cb) * hw.
template <typename T>
__device__ void concat_channels(const typename T::raw* a, const typename T::raw* b, typename T::raw* y, int ca, int cb,
                                long long hw, long long n) {
    const int c_total = ca + cb;
    GRID_STRIDE_LOOP(i, n) {
        const long long pixel = i % hw, rest = i / hw;
        const int c = (int)(rest % c_total);
        const long long batch = rest / c_total;
        const float v = c < ca ? T::load(a, (batch * ca + c) * hw + pixel) : T::load(b, (batch * cb + (c - ca)) * hw + pixel);
        T::store(y, i, v);
    }
}

// The inverse (and concat's backward): a = y[:, :ca], b = y[:, ca:]. n = N * (ca + cb) * hw.
template <typename T>
__device__ void split_channels(const typename T::raw* y, typename T::raw* a, typename T::raw* b, int ca, int cb,
                               long long hw, long long n) {
    const int c_total = ca + cb;
    GRID_STRIDE_LOOP(i, n) {
        const long long pixel = i % hw, rest = i / hw;
        const int c = (int)(rest % c_total);
        const long long batch = rest / c_total;
        const float v = T::load(y, i);
        if (c < ca) T::store(a, (batch * ca + c) * hw + pixel, v);
        else T::store(b, (batch * cb + (c - ca)) * hw + pixel, v);
    }
}

// y [NC, 2h, 2w] = x [NC, h, w] repeated 2x2 (nearest). n = NC * 4 * h * w, one thread per output.
template <typename T>
__device__ void upsample_nearest2x(const typename T::raw* x, typename T::raw* y, int h, int w, long long n) {
    const int w2 = 2 * w, h2 = 2 * h;
    GRID_STRIDE_LOOP(i, n) {
        const int ox = (int)(i % w2);
        const long long rest = i / w2;
        const int oy = (int)(rest % h2);
        const long long plane = rest / h2;
        T::store(y, i, T::load(x, (plane * h + (oy >> 1)) * w + (ox >> 1)));
    }
}

// dx [NC, h, w] = sum of each 2x2 block of dy [NC, 2h, 2w]. n = NC * h * w, one thread per input pixel.
template <typename T>
__device__ void upsample_nearest2x_backward(const typename T::raw* dy, typename T::raw* dx, int h, int w, long long n) {
    const long long w2 = 2 * w;
    GRID_STRIDE_LOOP(i, n) {
        const int x = (int)(i % w);
        const long long rest = i / w;
        const int y = (int)(rest % h);
        const long long plane = rest / h;
        const long long top = (plane * 2 * h + 2 * y) * w2 + 2 * x;
        T::store(dx, i, (T::load(dy, top) + T::load(dy, top + 1)) + (T::load(dy, top + w2) + T::load(dy, top + w2 + 1)));
    }
}

// AdaptiveAvgPool1d(1): y [rows] = mean of each row of x [rows, len]. One warp per row (grid-stride over rows);
// blockDim.x must be a multiple of 32. n = rows.
template <typename T>
__device__ void avg_pool_last(const typename T::raw* x, typename T::raw* y, long long len, long long n) {
    const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const long long warps = ((long long)gridDim.x * blockDim.x) >> 5;
    const int lane = threadIdx.x & 31;
    for (long long row = warp; row < n; row += warps) {  // uniform across the warp: warp_sum needs all 32 lanes
        float acc = 0.0f;
        for (long long j = lane; j < len; j += 32) acc += T::load(x, row * len + j);
        acc = warp_sum(acc);
        if (lane == 0) T::store(y, row, acc / (float)len);
    }
}

// dx [rows, len] = dy [rows] / len, broadcast. n = rows * len.
template <typename T>
__device__ void avg_pool_last_backward(const typename T::raw* dy, typename T::raw* dx, long long len, long long n) {
    GRID_STRIDE_LOOP(i, n) T::store(dx, i, T::load(dy, i / len) / (float)len);
}

// y [B, C, R] = x [B, R, C] transposed per matrix. Block (32, 8) moves 32x32 tiles through shared memory:
// reads of x and writes of y both run along rows (coalesced); the tile's row padding (33 floats) puts the
// column reads of the write phase on 32 different banks. Grid (ceil(C/32), <= ceil(R/32), <= B); the y and z
// grid dims stride over the rest. Tile coordinates are uniform per block, so __syncthreads is reached by all.
// n = B.
template <typename T>
__device__ void transpose_last2(const typename T::raw* x, typename T::raw* y, int R, int C, long long n) {
    __shared__ float tile[32][33];
    const int c0 = blockIdx.x * 32;
    for (long long b = blockIdx.z; b < n; b += gridDim.z) {
        const long long matrix = b * R * C;
        for (int r0 = blockIdx.y * 32; r0 < R; r0 += gridDim.y * 32) {
            for (int i = threadIdx.y; i < 32; i += 8) {
                const int r = r0 + i, c = c0 + threadIdx.x;
                if (r < R && c < C) tile[i][threadIdx.x] = T::load(x, matrix + (long long)r * C + c);
            }
            __syncthreads();
            for (int i = threadIdx.y; i < 32; i += 8) {
                const int c = c0 + i, r = r0 + threadIdx.x;
                if (c < C && r < R) T::store(y, matrix + (long long)c * R + r, tile[threadIdx.x][i]);
            }
            __syncthreads();  // the next tile overwrites this one
        }
    }
}

#define FOR_EACH_SHAPE_OP(T, suffix)                                                                            \
    extern "C" __global__ void concat_channels_##suffix(const T::raw* a, const T::raw* b, T::raw* y, int ca, int cb, \
                                                        long long hw, long long n) {                             \
        concat_channels<T>(a, b, y, ca, cb, hw, n);                                                              \
    }                                                                                                            \
    extern "C" __global__ void split_channels_##suffix(const T::raw* y, T::raw* a, T::raw* b, int ca, int cb,   \
                                                       long long hw, long long n) {                              \
        split_channels<T>(y, a, b, ca, cb, hw, n);                                                               \
    }                                                                                                            \
    extern "C" __global__ void upsample_nearest2x_##suffix(const T::raw* x, T::raw* y, int h, int w, long long n) { \
        upsample_nearest2x<T>(x, y, h, w, n);                                                                    \
    }                                                                                                            \
    extern "C" __global__ void upsample_nearest2x_backward_##suffix(const T::raw* dy, T::raw* dx, int h, int w,  \
                                                                    long long n) {                               \
        upsample_nearest2x_backward<T>(dy, dx, h, w, n);                                                         \
    }                                                                                                            \
    extern "C" __global__ void avg_pool_last_##suffix(const T::raw* x, T::raw* y, long long len, long long n) { \
        avg_pool_last<T>(x, y, len, n);                                                                          \
    }                                                                                                            \
    extern "C" __global__ void avg_pool_last_backward_##suffix(const T::raw* dy, T::raw* dx, long long len,      \
                                                               long long n) {                                    \
        avg_pool_last_backward<T>(dy, dx, len, n);                                                               \
    }                                                                                                            \
    extern "C" __global__ void transpose_last2_##suffix(const T::raw* x, T::raw* y, int R, int C, long long n) { \
        transpose_last2<T>(x, y, R, C, n);                                                                       \
    }
FOR_EACH_SHAPE_OP(F32, f32)
FOR_EACH_SHAPE_OP(BF16, bf16)
