// Multi-head scaled dot-product attention, flash-style: scores are computed tile by tile in shared memory and
// registers, never stored in global memory.
//
// Layout (what diffusers' to_q/to_k/to_v produce, heads interleaved in the last dimension):
//   q, out, dout, dq: [B, Lq, H*d]    k, v, dk, dv: [B, Lk, H*d]    lse, delta: [B, H, Lq], always f32.
// Storage is F32 or BF16; every product and sum is f32. All outputs are written (=).
//
// Work split: a block is 4 warps. In the forward and dq kernels a warp owns R query rows and lane j owns key
// j of the current 32-key tile; in the dk/dv kernel a warp owns R key rows and lane i owns query i of the
// current 32-query tile. Each lane accumulates its output rows at columns lane, lane + 32, ..., so the head
// dim is a runtime value up to 32 * NC; kernels are instantiated for NC = 1..5 (head dims up to 32, 64, 96,
// 128, 160; SD 1.5's 40, 80 and 160 use the 64, 96 and 160 variants). Shared-memory rows are padded to an odd
// stride, so lanes reading one row each hit distinct banks. The static shared memory of every kernel stays
// under 48 KiB at NC = 5 (no opt-in attribute needed). The bf16 kernels on tensor cores are in attention_mma.cu;
// their backward starts with attention_backward_delta from here.
#include "common.cuh"

#define ATTN_WARPS 4
#define ATTN_THREADS (ATTN_WARPS * 32)
#define ATTN_TILE 32  // keys (forward, dq) or queries (dk/dv) per tile: one per lane

// tile[r * stride + c] = x[row0 + r, head, c] for r < rows, c < d; rows at or past `len` are zero.
// `base` is the element offset of (batch, row 0, head column 0); rows are `row_stride` elements apart.
template <typename S>
__device__ __forceinline__ void load_tile(float* tile, int stride, const typename S::raw* x, long long base,
                                          int row_stride, int row0, int rows, int len, int d) {
    for (int idx = threadIdx.x; idx < rows * d; idx += blockDim.x) {
        const int r = idx / d, c = idx - r * d, row = row0 + r;
        tile[r * stride + c] = row < len ? S::load(x, base + (long long)row * row_stride + c) : 0.0f;
    }
}

// Zeroes `n` floats of shared memory. Tiles only ever write columns < d, so the padding columns a lane may
// read past d stay zero for the whole kernel.
__device__ __forceinline__ void zero_shared(float* s, int n) {
    for (int idx = threadIdx.x; idx < n; idx += blockDim.x) s[idx] = 0.0f;
}

// Forward. grid (ceil(Lq / 32), B*H), block 128. out = softmax(scale * q k^T) v per head;
// lse[b, h, i] = log sum_j exp(scale * q_i . k_j) (natural log), kept for the backward.
template <typename S, int NC>
__device__ __forceinline__ void attention_forward(const typename S::raw* __restrict__ q,
                                                  const typename S::raw* __restrict__ k,
                                                  const typename S::raw* __restrict__ v, typename S::raw* __restrict__ out,
                                                  float* __restrict__ lse, int Lq, int Lk, int H, int d, float scale) {
    constexpr int R = 8, ROWS = ATTN_WARPS * R, STRIDE = 32 * NC + 1;
    __shared__ float qs[ROWS * STRIDE];
    __shared__ float kvs[ATTN_TILE * STRIDE];  // the K tile, then the V tile
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int bh = blockIdx.y, b = bh / H, h = bh - b * H, C = H * d;
    const int i0 = blockIdx.x * ROWS;
    const long long qbase = (long long)b * Lq * C + (long long)h * d;
    const long long kbase = (long long)b * Lk * C + (long long)h * d;
    const float sl2 = scale * LOG2E;  // scores in log2 units, so exp2 replaces exp

    zero_shared(qs, ROWS * STRIDE);
    zero_shared(kvs, ATTN_TILE * STRIDE);
    __syncthreads();
    load_tile<S>(qs, STRIDE, q, qbase, C, i0, ROWS, Lq, d);
    const float* qw = qs + warp * R * STRIDE;

    float o[R][NC], m[R], l[R];  // l: this lane's share of the row sum, reduced over the warp at the end
#pragma unroll
    for (int r = 0; r < R; ++r) {
        m[r] = neg_inf();
        l[r] = 0.0f;
#pragma unroll
        for (int t = 0; t < NC; ++t) o[r][t] = 0.0f;
    }

    for (int j0 = 0; j0 < Lk; j0 += ATTN_TILE) {
        __syncthreads();  // every warp is done with the previous V tile
        load_tile<S>(kvs, STRIDE, k, kbase, C, j0, ATTN_TILE, Lk, d);
        __syncthreads();
        float s[R];
#pragma unroll
        for (int r = 0; r < R; ++r) s[r] = 0.0f;
        const float* krow = kvs + lane * STRIDE;
        for (int c = 0; c < d; ++c) {
            const float kc = krow[c];
#pragma unroll
            for (int r = 0; r < R; ++r) s[r] += qw[r * STRIDE + c] * kc;
        }
        const bool valid = j0 + lane < Lk;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const float x = valid ? s[r] * sl2 : neg_inf();
            const float m_new = fmaxf(m[r], warp_max(x));  // finite: lane 0's key always exists
            const float correction = exp2f(m[r] - m_new);  // 0 on the first tile (m = -inf)
            const float p = exp2f(x - m_new);
            l[r] = l[r] * correction + p;
#pragma unroll
            for (int t = 0; t < NC; ++t) o[r][t] *= correction;
            m[r] = m_new;
            s[r] = p;
        }
        __syncthreads();  // every warp is done with the K tile
        load_tile<S>(kvs, STRIDE, v, kbase, C, j0, ATTN_TILE, Lk, d);
        __syncthreads();
        const int keys = min(ATTN_TILE, Lk - j0);
        for (int jj = 0; jj < keys; ++jj) {
            float vv[NC];
#pragma unroll
            for (int t = 0; t < NC; ++t) vv[t] = kvs[jj * STRIDE + lane + 32 * t];
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const float p = __shfl_sync(0xffffffffu, s[r], jj);
#pragma unroll
                for (int t = 0; t < NC; ++t) o[r][t] += p * vv[t];
            }
        }
    }

#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int i = i0 + warp * R + r;
        const float sum = warp_sum(l[r]);
        if (i < Lq) {
            const float inv = 1.0f / sum;
#pragma unroll
            for (int t = 0; t < NC; ++t) {
                const int c = lane + 32 * t;
                if (c < d) S::store(out, qbase + (long long)i * C + c, o[r][t] * inv);
            }
            if (lane == 0) lse[(long long)bh * Lq + i] = m[r] * LN2 + logf(sum);
        }
    }
}

// Backward preprocessing. delta[b, h, i] = sum_c dout[b, i, h*d + c] * out[b, i, h*d + c], the row sums the
// softmax backward needs. One warp per (b, i, h) row, rows = B*Lq*H; any block size that is a multiple of 32.
template <typename S>
__device__ __forceinline__ void attention_backward_delta(const typename S::raw* __restrict__ dout,
                                                         const typename S::raw* __restrict__ out,
                                                         float* __restrict__ delta, int Lq, int H, int d, long long rows) {
    const long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;  // row is uniform over the warp, so the whole warp leaves together
    float acc = 0.0f;
    for (int c = lane; c < d; c += 32) acc += S::load(dout, row * d + c) * S::load(out, row * d + c);
    acc = warp_sum(acc);
    if (lane == 0) {
        const long long bi = row / H, b = bi / Lq;
        const int h = (int)(row - bi * H), i = (int)(bi - b * Lq);
        delta[(b * H + h) * Lq + i] = acc;
    }
}

// Backward, query side. grid (ceil(Lq / 16), B*H), block 128. With p_ij = exp(scale q_i.k_j - lse_i) and
// ds_ij = p_ij (dout_i.v_j - delta_i): dq_i = scale * sum_j ds_ij k_j.
template <typename S, int NC>
__device__ __forceinline__ void attention_backward_dq(const typename S::raw* __restrict__ q,
                                                      const typename S::raw* __restrict__ k,
                                                      const typename S::raw* __restrict__ v,
                                                      const typename S::raw* __restrict__ dout,
                                                      const float* __restrict__ lse, const float* __restrict__ delta,
                                                      typename S::raw* __restrict__ dq, int Lq, int Lk, int H, int d,
                                                      float scale) {
    constexpr int R = 4, ROWS = ATTN_WARPS * R, STRIDE = 32 * NC + 1;
    __shared__ float qs[ROWS * STRIDE];
    __shared__ float dos[ROWS * STRIDE];
    __shared__ float kvs[ATTN_TILE * STRIDE];  // the V tile, then the K tile
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int bh = blockIdx.y, b = bh / H, h = bh - b * H, C = H * d;
    const int i0 = blockIdx.x * ROWS;
    const long long qbase = (long long)b * Lq * C + (long long)h * d;
    const long long kbase = (long long)b * Lk * C + (long long)h * d;
    const float sl2 = scale * LOG2E;

    zero_shared(qs, ROWS * STRIDE);
    zero_shared(dos, ROWS * STRIDE);
    zero_shared(kvs, ATTN_TILE * STRIDE);
    __syncthreads();
    load_tile<S>(qs, STRIDE, q, qbase, C, i0, ROWS, Lq, d);
    load_tile<S>(dos, STRIDE, dout, qbase, C, i0, ROWS, Lq, d);
    const float* qw = qs + warp * R * STRIDE;
    const float* dow = dos + warp * R * STRIDE;

    float acc[R][NC], lse2[R], dl[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int i = i0 + warp * R + r;
        lse2[r] = i < Lq ? lse[(long long)bh * Lq + i] * LOG2E : 0.0f;
        dl[r] = i < Lq ? delta[(long long)bh * Lq + i] : 0.0f;
#pragma unroll
        for (int t = 0; t < NC; ++t) acc[r][t] = 0.0f;
    }

    for (int j0 = 0; j0 < Lk; j0 += ATTN_TILE) {
        __syncthreads();  // every warp is done with the previous K tile
        load_tile<S>(kvs, STRIDE, v, kbase, C, j0, ATTN_TILE, Lk, d);
        __syncthreads();
        float dp[R], s[R];
#pragma unroll
        for (int r = 0; r < R; ++r) dp[r] = s[r] = 0.0f;
        const float* row = kvs + lane * STRIDE;
        for (int c = 0; c < d; ++c) {
            const float vc = row[c];
#pragma unroll
            for (int r = 0; r < R; ++r) dp[r] += dow[r * STRIDE + c] * vc;
        }
        __syncthreads();  // every warp is done with the V tile
        load_tile<S>(kvs, STRIDE, k, kbase, C, j0, ATTN_TILE, Lk, d);
        __syncthreads();
        for (int c = 0; c < d; ++c) {
            const float kc = row[c];
#pragma unroll
            for (int r = 0; r < R; ++r) s[r] += qw[r * STRIDE + c] * kc;
        }
        const bool valid = j0 + lane < Lk;
#pragma unroll
        for (int r = 0; r < R; ++r) s[r] = valid ? exp2f(s[r] * sl2 - lse2[r]) * (dp[r] - dl[r]) : 0.0f;  // ds
        const int keys = min(ATTN_TILE, Lk - j0);
        for (int jj = 0; jj < keys; ++jj) {
            float kk[NC];
#pragma unroll
            for (int t = 0; t < NC; ++t) kk[t] = kvs[jj * STRIDE + lane + 32 * t];
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const float ds = __shfl_sync(0xffffffffu, s[r], jj);
#pragma unroll
                for (int t = 0; t < NC; ++t) acc[r][t] += ds * kk[t];
            }
        }
    }

#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int i = i0 + warp * R + r;
        if (i >= Lq) continue;
#pragma unroll
        for (int t = 0; t < NC; ++t) {
            const int c = lane + 32 * t;
            if (c < d) S::store(dq, qbase + (long long)i * C + c, acc[r][t] * scale);
        }
    }
}

// Backward, key side. grid (ceil(Lk / 16), B*H), block 128. dv_j = sum_i p_ij dout_i and
// dk_j = scale * sum_i ds_ij q_i, looping over 32-query tiles. One 32-row buffer holds the Q tile (for the
// scores), then the dout tile (for dp and dv), then the Q tile again (for dk): two reads of Q from L2 instead
// of a second buffer, which keeps shared memory under 48 KiB at head dim 160.
template <typename S, int NC>
__device__ __forceinline__ void attention_backward_dkdv(const typename S::raw* __restrict__ q,
                                                        const typename S::raw* __restrict__ k,
                                                        const typename S::raw* __restrict__ v,
                                                        const typename S::raw* __restrict__ dout,
                                                        const float* __restrict__ lse, const float* __restrict__ delta,
                                                        typename S::raw* __restrict__ dk, typename S::raw* __restrict__ dv,
                                                        int Lq, int Lk, int H, int d, float scale) {
    constexpr int R = 4, ROWS = ATTN_WARPS * R, STRIDE = 32 * NC + 1;
    __shared__ float ks[ROWS * STRIDE];
    __shared__ float vs[ROWS * STRIDE];
    __shared__ float buf[ATTN_TILE * STRIDE];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int bh = blockIdx.y, b = bh / H, h = bh - b * H, C = H * d;
    const int j0 = blockIdx.x * ROWS;
    const long long qbase = (long long)b * Lq * C + (long long)h * d;
    const long long kbase = (long long)b * Lk * C + (long long)h * d;
    const float sl2 = scale * LOG2E;

    zero_shared(ks, ROWS * STRIDE);
    zero_shared(vs, ROWS * STRIDE);
    zero_shared(buf, ATTN_TILE * STRIDE);
    __syncthreads();
    load_tile<S>(ks, STRIDE, k, kbase, C, j0, ROWS, Lk, d);
    load_tile<S>(vs, STRIDE, v, kbase, C, j0, ROWS, Lk, d);
    const float* kw = ks + warp * R * STRIDE;
    const float* vw = vs + warp * R * STRIDE;

    float dka[R][NC], dva[R][NC];
    bool key_valid[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        key_valid[r] = j0 + warp * R + r < Lk;
#pragma unroll
        for (int t = 0; t < NC; ++t) dka[r][t] = dva[r][t] = 0.0f;
    }

    const float* row = buf + lane * STRIDE;
    for (int i0 = 0; i0 < Lq; i0 += ATTN_TILE) {
        const int i = i0 + lane;
        const bool valid = i < Lq;
        const float lse2 = valid ? lse[(long long)bh * Lq + i] * LOG2E : 0.0f;
        const float dl = valid ? delta[(long long)bh * Lq + i] : 0.0f;
        const int queries = min(ATTN_TILE, Lq - i0);

        __syncthreads();  // every warp is done with the previous Q tile
        load_tile<S>(buf, STRIDE, q, qbase, C, i0, ATTN_TILE, Lq, d);
        __syncthreads();
        float p[R], ds[R];
#pragma unroll
        for (int r = 0; r < R; ++r) p[r] = ds[r] = 0.0f;
        for (int c = 0; c < d; ++c) {
            const float qc = row[c];
#pragma unroll
            for (int r = 0; r < R; ++r) p[r] += kw[r * STRIDE + c] * qc;
        }
#pragma unroll
        for (int r = 0; r < R; ++r) p[r] = valid && key_valid[r] ? exp2f(p[r] * sl2 - lse2) : 0.0f;

        __syncthreads();  // every warp is done with the Q tile
        load_tile<S>(buf, STRIDE, dout, qbase, C, i0, ATTN_TILE, Lq, d);
        __syncthreads();
        for (int c = 0; c < d; ++c) {
            const float gc = row[c];
#pragma unroll
            for (int r = 0; r < R; ++r) ds[r] += vw[r * STRIDE + c] * gc;
        }
#pragma unroll
        for (int r = 0; r < R; ++r) ds[r] = p[r] * (ds[r] - dl);
        for (int ii = 0; ii < queries; ++ii) {
            float g[NC];
#pragma unroll
            for (int t = 0; t < NC; ++t) g[t] = buf[ii * STRIDE + lane + 32 * t];
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const float pi = __shfl_sync(0xffffffffu, p[r], ii);
#pragma unroll
                for (int t = 0; t < NC; ++t) dva[r][t] += pi * g[t];
            }
        }

        __syncthreads();  // every warp is done with the dout tile
        load_tile<S>(buf, STRIDE, q, qbase, C, i0, ATTN_TILE, Lq, d);
        __syncthreads();
        for (int ii = 0; ii < queries; ++ii) {
            float x[NC];
#pragma unroll
            for (int t = 0; t < NC; ++t) x[t] = buf[ii * STRIDE + lane + 32 * t];
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const float dsi = __shfl_sync(0xffffffffu, ds[r], ii);
#pragma unroll
                for (int t = 0; t < NC; ++t) dka[r][t] += dsi * x[t];
            }
        }
    }

#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int j = j0 + warp * R + r;
        if (!key_valid[r]) continue;
#pragma unroll
        for (int t = 0; t < NC; ++t) {
            const int c = lane + 32 * t;
            if (c < d) {
                S::store(dk, kbase + (long long)j * C + c, dka[r][t] * scale);
                S::store(dv, kbase + (long long)j * C + c, dva[r][t]);
            }
        }
    }
}

#define ATTENTION_HEAD_DIM_KERNELS(T, suffix, NC, DMAX)                                                             \
    extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attention_forward_##suffix##_d##DMAX(               \
        const T::raw* q, const T::raw* k, const T::raw* v, T::raw* out, float* lse, int Lq, int Lk, int H, int d,   \
        float scale) {                                                                                              \
        attention_forward<T, NC>(q, k, v, out, lse, Lq, Lk, H, d, scale);                                           \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attention_backward_dq_##suffix##_d##DMAX(           \
        const T::raw* q, const T::raw* k, const T::raw* v, const T::raw* dout, const float* lse,                    \
        const float* delta, T::raw* dq, int Lq, int Lk, int H, int d, float scale) {                                \
        attention_backward_dq<T, NC>(q, k, v, dout, lse, delta, dq, Lq, Lk, H, d, scale);                           \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attention_backward_dkdv_##suffix##_d##DMAX(         \
        const T::raw* q, const T::raw* k, const T::raw* v, const T::raw* dout, const float* lse,                    \
        const float* delta, T::raw* dk, T::raw* dv, int Lq, int Lk, int H, int d, float scale) {                    \
        attention_backward_dkdv<T, NC>(q, k, v, dout, lse, delta, dk, dv, Lq, Lk, H, d, scale);                     \
    }

#define ATTENTION_KERNELS(T, suffix)                                                                                \
    extern "C" __global__ void attention_backward_delta_##suffix(const T::raw* dout, const T::raw* out,            \
                                                                 float* delta, int Lq, int H, int d,                \
                                                                 long long rows) {                                  \
        attention_backward_delta<T>(dout, out, delta, Lq, H, d, rows);                                              \
    }                                                                                                               \
    ATTENTION_HEAD_DIM_KERNELS(T, suffix, 1, 32)                                                                    \
    ATTENTION_HEAD_DIM_KERNELS(T, suffix, 2, 64)                                                                    \
    ATTENTION_HEAD_DIM_KERNELS(T, suffix, 3, 96)                                                                    \
    ATTENTION_HEAD_DIM_KERNELS(T, suffix, 4, 128)                                                                   \
    ATTENTION_HEAD_DIM_KERNELS(T, suffix, 5, 160)

ATTENTION_KERNELS(F32, f32)
ATTENTION_KERNELS(BF16, bf16)
