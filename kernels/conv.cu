// Convolution as implicit GEMM: no im2col buffer in global memory. Every kernel gathers its GEMM operands
// straight from the NCHW tensors into shared-memory tiles (zero outside the image and past the edges of the
// problem) and multiplies them in f32; storage is f32 or bf16, rounded once on the final store.
//
// Shapes, shared by all kernels (PyTorch semantics, weight [K, C, R, S] = [C_out, C_in, kH, kW]):
//   x  [N, C, H, W]   input          y / dy  [N, K, P, Q]   output and its gradient
//   P = (H + pad_top + pad_bottom - R) / stride + 1, likewise Q; only pad_top and pad_left enter the index
//   math (pad_bottom and pad_right only decide P and Q), so any asymmetric padding works.
// ConvTranspose2d is conv2d_backward_input with its bias; Conv1d is conv2d with H = R = 1.
//
// Tiling (all three GEMM kernels): a 64x64 output tile per block of 256 threads, 16 reduction steps per
// shared-memory tile; thread (tx = tid % 16, ty = tid / 16) owns rows ty + 16i and columns tx + 16j,
// i, j < 4, so shared-memory reads are broadcasts or consecutive words.
#include "mma.cuh"

#define TILE_M 64
#define TILE_N 64
#define TILE_K 16
#define THREADS 256
// At least two resident blocks per SM (<= 128 registers); without a minimum, ptxas capped one kernel at 48
// registers and spilled.
#define MIN_BLOCKS 2
// Row padding of the shared tiles: stores with a stride of one row then spread over the banks.
#define PAD 4

struct ConvShape {
    int N, C, H, W, K, R, S, stride, pad_h, pad_w, P, Q;
};

__device__ __forceinline__ void multiply_tile(const float (*As)[TILE_M + PAD], const float (*Bs)[TILE_N + PAD],
                                              float acc[4][4], int tx, int ty) {
#pragma unroll
    for (int kk = 0; kk < TILE_K; ++kk) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
}

// Forward: y[n, k, p, q] = bias[k] + sum_{c, r, s} w[k, c, r, s] * x[n, c, p*stride - pad_h + r, q*stride - pad_w + s].
// GEMM: rows k < K, columns (n, p, q) < N*P*Q, reduction (c, r, s) < C*R*S. `bias` may be null. y is written.
// Grid: (ceil(N*P*Q / 64), ceil(K / 64)), 256 threads.
template <typename T>
__device__ void conv2d_forward(const typename T::raw* x, const typename T::raw* w, const typename T::raw* bias,
                               typename T::raw* y, const ConvShape s) {
    __shared__ float As[TILE_K][TILE_M + PAD];
    __shared__ float Bs[TILE_K][TILE_N + PAD];
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int RS = s.R * s.S, CRS = s.C * RS, PQ = s.P * s.Q;
    const long long columns = (long long)s.N * PQ;
    const int m0 = blockIdx.y * TILE_M;
    const long long col0 = (long long)blockIdx.x * TILE_N;

    // This thread gathers column `bcol` of every B tile (reduction rows brow + 4i): its output pixel is fixed.
    const int bcol = tid & 63, brow = tid >> 6;
    const long long gcol = col0 + bcol;
    const bool col_valid = gcol < columns;
    const int n = col_valid ? (int)(gcol / PQ) : 0, pq = col_valid ? (int)(gcol % PQ) : 0;
    const int ih0 = (pq / s.Q) * s.stride - s.pad_h, iw0 = (pq % s.Q) * s.stride - s.pad_w;
    const typename T::raw* xn = x + (long long)n * s.C * s.H * s.W;

    float acc[4][4] = {};
    for (int k0 = 0; k0 < CRS; k0 += TILE_K) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int m = m0 + ty + 16 * i, k = k0 + tx;
            As[tx][ty + 16 * i] = (m < s.K && k < CRS) ? T::load(w, (long long)m * CRS + k) : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int k = k0 + brow + 4 * i;
            float v = 0.0f;
            if (col_valid && k < CRS) {
                const int c = k / RS, rs = k - c * RS, r = rs / s.S;
                const int ih = ih0 + r, iw = iw0 + (rs - r * s.S);
                if (ih >= 0 && ih < s.H && iw >= 0 && iw < s.W) v = T::load(xn, ((long long)c * s.H + ih) * s.W + iw);
            }
            Bs[brow + 4 * i][bcol] = v;
        }
        __syncthreads();
        multiply_tile(As, Bs, acc, tx, ty);
        __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const long long col = col0 + tx + 16 * j;
        if (col >= columns) continue;
        const long long on = col / PQ, opq = col % PQ;
        typename T::raw* yp = y + on * s.K * PQ + opq;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int m = m0 + ty + 16 * i;
            if (m < s.K) T::store(yp, (long long)m * PQ, acc[i][j] + (bias ? T::load(bias, m) : 0.0f));
        }
    }
}

// Data gradient: dx[n, c, h, w] = bias[c] + sum_{k, r, s} w[k, c, r, s] * dy[n, k, p, q] over the (p, q) with
// p*stride - pad_h + r = h and q*stride - pad_w + s = w. GEMM: rows c < C, columns (n, h, w) < N*H*W,
// reduction (k, r, s) < K*R*S; taps whose (p, q) is fractional or outside the output contribute zero, so
// nothing is scattered and no atomics are needed. `bias` may be null (it is ConvTranspose2d's bias). dx is
// written. Grid: (ceil(N*H*W / 64), ceil(C / 64)), 256 threads.
template <typename T>
__device__ void conv2d_backward_input(const typename T::raw* dy, const typename T::raw* w, const typename T::raw* bias,
                                      typename T::raw* dx, const ConvShape s) {
    __shared__ float As[TILE_K][TILE_M + PAD];
    __shared__ float Bs[TILE_K][TILE_N + PAD];
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int RS = s.R * s.S, KRS = s.K * RS, HW = s.H * s.W, PQ = s.P * s.Q;
    const long long columns = (long long)s.N * HW;
    const int m0 = blockIdx.y * TILE_M;
    const long long col0 = (long long)blockIdx.x * TILE_N;

    const int bcol = tid & 63, brow = tid >> 6;
    const long long gcol = col0 + bcol;
    const bool col_valid = gcol < columns;
    const int n = col_valid ? (int)(gcol / HW) : 0, hw = col_valid ? (int)(gcol % HW) : 0;
    const int hp = hw / s.W + s.pad_h, wp = hw % s.W + s.pad_w;  // padded-image coordinates of this pixel
    const typename T::raw* dyn = dy + (long long)n * s.K * PQ;

    float acc[4][4] = {};
    for (int k0 = 0; k0 < KRS; k0 += TILE_K) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int m = m0 + ty + 16 * i, k = k0 + tx;
            float v = 0.0f;
            if (m < s.C && k < KRS) {
                const int ko = k / RS, rs = k - ko * RS;
                v = T::load(w, ((long long)ko * s.C + m) * RS + rs);
            }
            As[tx][ty + 16 * i] = v;
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int k = k0 + brow + 4 * i;
            float v = 0.0f;
            if (col_valid && k < KRS) {
                const int ko = k / RS, rs = k - ko * RS, r = rs / s.S;
                const int ph = hp - r, pw = wp - (rs - r * s.S);
                if (ph >= 0 && pw >= 0 && ph % s.stride == 0 && pw % s.stride == 0) {
                    const int p = ph / s.stride, q = pw / s.stride;
                    if (p < s.P && q < s.Q) v = T::load(dyn, ((long long)ko * s.P + p) * s.Q + q);
                }
            }
            Bs[brow + 4 * i][bcol] = v;
        }
        __syncthreads();
        multiply_tile(As, Bs, acc, tx, ty);
        __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const long long col = col0 + tx + 16 * j;
        if (col >= columns) continue;
        const long long on = col / HW, ohw = col % HW;
        typename T::raw* dxp = dx + on * s.C * HW + ohw;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int m = m0 + ty + 16 * i;
            if (m < s.C) T::store(dxp, (long long)m * HW, acc[i][j] + (bias ? T::load(bias, m) : 0.0f));
        }
    }
}

// Weight gradient: dw[k, c, r, s] += sum_{n, p, q} dy[n, k, p, q] * x[n, c, p*stride - pad_h + r, q*stride - pad_w + s].
// GEMM: rows k < K, columns (c, r, s) < C*R*S, reduction over the N*P*Q output pixels, which each block walks
// whole (no split-K), so every dw element has one owner and `+=` needs no atomics.
// Grid: (ceil(C*R*S / 64), ceil(K / 64)), 256 threads.
template <typename T>
__device__ void conv2d_backward_weight(const typename T::raw* x, const typename T::raw* dy, typename T::raw* dw,
                                       const ConvShape s) {
    __shared__ float As[TILE_K][TILE_M + PAD];
    __shared__ float Bs[TILE_K][TILE_N + PAD];
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int RS = s.R * s.S, CRS = s.C * RS, PQ = s.P * s.Q;
    const long long pixels = (long long)s.N * PQ;
    const int m0 = blockIdx.y * TILE_M, col0 = blockIdx.x * TILE_N;

    // Both tiles are loaded with the reduction index tx (consecutive threads read consecutive pixels) and the
    // row or column ty + 16i; the (c, r, s) of this thread's four B columns stay fixed.
    long long x_channel[4];
    int tap_r[4], tap_s[4];
    bool col_valid[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int col = col0 + ty + 16 * i;
        col_valid[i] = col < CRS;
        const int c = col_valid[i] ? col / RS : 0, rs = col_valid[i] ? col - c * RS : 0;
        x_channel[i] = (long long)c * s.H * s.W;
        tap_r[i] = rs / s.S;
        tap_s[i] = rs % s.S;
    }

    float acc[4][4] = {};
    for (long long r0 = 0; r0 < pixels; r0 += TILE_K) {
        const long long red = r0 + tx;
        const bool red_valid = red < pixels;
        const int n = red_valid ? (int)(red / PQ) : 0, pq = red_valid ? (int)(red % PQ) : 0;
        const int ih0 = (pq / s.Q) * s.stride - s.pad_h, iw0 = (pq % s.Q) * s.stride - s.pad_w;
        const long long dy_base = (long long)n * s.K * PQ + pq;
        const long long x_base = (long long)n * s.C * s.H * s.W;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int m = m0 + ty + 16 * i;
            As[tx][ty + 16 * i] = (red_valid && m < s.K) ? T::load(dy, dy_base + (long long)m * PQ) : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            float v = 0.0f;
            const int ih = ih0 + tap_r[i], iw = iw0 + tap_s[i];
            if (red_valid && col_valid[i] && ih >= 0 && ih < s.H && iw >= 0 && iw < s.W)
                v = T::load(x, x_base + x_channel[i] + (long long)ih * s.W + iw);
            Bs[tx][ty + 16 * i] = v;
        }
        __syncthreads();
        multiply_tile(As, Bs, acc, tx, ty);
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int m = m0 + ty + 16 * i;
        if (m >= s.K) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int col = col0 + tx + 16 * j;
            if (col >= CRS) continue;
            const long long o = (long long)m * CRS + col;
            T::store(dw, o, T::load(dw, o) + acc[i][j]);
        }
    }
}

// Bias gradient: db[c] += sum_{n, i} dy[n, c, i] for dy [N, C, L] (L = P*Q, or a sequence length).
// One block per channel, THREADS threads.
template <typename T>
__device__ void conv_bias_backward(const typename T::raw* dy, typename T::raw* db, int N, int C, int L) {
    __shared__ float scratch[32];
    const int c = blockIdx.x;
    float v = 0.0f;
    for (int n = 0; n < N; ++n) {
        const typename T::raw* row = dy + ((long long)n * C + c) * L;
        for (int i = threadIdx.x; i < L; i += blockDim.x) v += T::load(row, i);
    }
    v = block_sum(v, scratch);
    if (threadIdx.x == 0) T::store(db, c, T::load(db, c) + v);
}

// Benchmark baseline only (the conv kernels above never build this buffer): the im2col matrix of x,
// col [N, C*R*S, P*Q] with col[n, (c, r, s), (p, q)] = x[n, c, p*stride - pad_h + r, q*stride - pad_w + s],
// zero in the padding. One thread per col element (grid-stride), consecutive threads along q: the writes are
// coalesced, the reads of one image row are too at stride 1. count = N*C*R*S*P*Q. K is unused.
template <typename T>
__device__ void im2col(const typename T::raw* x, typename T::raw* col, const ConvShape s, long long count) {
    const int RS = s.R * s.S, PQ = s.P * s.Q;
    GRID_STRIDE_LOOP(i, count) {
        const int pq = (int)(i % PQ);
        const long long plane = i / PQ;  // (n, c, r, s)
        const int tap = (int)(plane % RS);
        const long long nc = plane / RS;  // n * C + c
        const int ih = (pq / s.Q) * s.stride - s.pad_h + tap / s.S;
        const int iw = (pq % s.Q) * s.stride - s.pad_w + tap % s.S;
        const bool inside = ih >= 0 && ih < s.H && iw >= 0 && iw < s.W;
        T::store(col, i, inside ? T::load(x, (nc * s.H + ih) * s.W + iw) : 0.0f);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Forward on tensor cores (bf16 only, sm_80+): the same implicit GEMM as conv2d_forward (rows k < K, columns
// (n, p, q), reduction (c, r, s)), multiplied with mma.sync.m16n8k16 (bf16 in, f32 accumulate).
//
// Block: 128 output channels x 128 output pixels, 32-deep reduction tiles, 256 threads = 8 warps as 2 (rows)
// x 4 (columns), each warp a 64 x 32 sub-tile = 4 x 4 mma tiles of 16 x 8. Shared tiles, both k-contiguous so
// every fragment register is one aligned 32-bit load of two consecutive-k bf16 values:
//   As[row][k]   weights (row = output channel)     -> mma A, "row" layout
//   Bs[col][k]   gathered input pixels              -> mma B, "col" layout
// Rows are 32 + 8 bf16 = 80 bytes = 20 banks apart, so the 8 fragment rows x 4 lanes of a load hit 32
// different banks. Fragment layout: mma.cuh.
#define MMA_BM 128
#define MMA_BN 128
#define MMA_BK 32
#define MMA_LD (MMA_BK + 8)

// One MMA_BK-deep step of a 128 x 128 block tile: each warp's 64 x 32 sub-tile (rows warp_row.., columns
// warp_col..) += As[row][k] . Bs[col][k]^T, as 4 x 4 mma tiles of 16 x 8, fragments per the layout above.
__device__ __forceinline__ void mma_block_step(const bf16_t (*As)[MMA_LD], const bf16_t (*Bs)[MMA_LD], float acc[4][4][4],
                                               int warp_row, int warp_col, int group, int tig) {
#pragma unroll
    for (int kk = 0; kk < MMA_BK; kk += 16) {
        unsigned a[4][4], b[4][2];
#pragma unroll
        for (int mi = 0; mi < 4; ++mi) {
            const int r = warp_row + mi * 16 + group, k = kk + 2 * tig;
            a[mi][0] = bf16_pair(&As[r][k]);
            a[mi][1] = bf16_pair(&As[r + 8][k]);
            a[mi][2] = bf16_pair(&As[r][k + 8]);
            a[mi][3] = bf16_pair(&As[r + 8][k + 8]);
        }
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
            const int c = warp_col + ni * 8 + group, k = kk + 2 * tig;
            b[ni][0] = bf16_pair(&Bs[c][k]);
            b[ni][1] = bf16_pair(&Bs[c][k + 8]);
        }
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) mma_m16n8k16_bf16(acc[mi][ni], a[mi], b[ni][0], b[ni][1]);
    }
}

// Grid: (ceil(N*P*Q / 128), ceil(K / 128)), 256 threads. `bias` may be null. y is written.
// FLIP: `w` is the weight of the convolution this one is the input gradient of, [C_out = s.C, C_in = s.K, R, S],
// read as w'[k, c, r, s] = w[c, k, R-1-r, S-1-s] (transposed channels, rotated taps) without a copy.
template <bool FLIP>
__device__ void conv2d_forward_mma(const bf16_t* x, const bf16_t* w, const bf16_t* bias, bf16_t* y, const ConvShape s) {
    __shared__ __align__(16) bf16_t As[MMA_BM][MMA_LD];
    __shared__ __align__(16) bf16_t Bs[MMA_BN][MMA_LD];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int warp_row = (warp >> 2) * 64, warp_col = (warp & 3) * 32;
    const int group = lane >> 2, tig = lane & 3;
    const int RS = s.R * s.S, CRS = s.C * RS, PQ = s.P * s.Q;
    const long long columns = (long long)s.N * PQ;
    const int m0 = blockIdx.y * MMA_BM;
    const long long col0 = (long long)blockIdx.x * MMA_BN;

    // Gather: this thread owns pixel column bcol of every B tile, reduction rows bk0 .. bk0 + 15.
    const int bcol = tid & (MMA_BN - 1), bk0 = (tid >> 7) * 16;
    const long long gcol = col0 + bcol;
    const bool col_valid = gcol < columns;
    const int n = col_valid ? (int)(gcol / PQ) : 0, pq = col_valid ? (int)(gcol % PQ) : 0;
    const int ih0 = (pq / s.Q) * s.stride - s.pad_h, iw0 = (pq % s.Q) * s.stride - s.pad_w;
    const bf16_t* xn = x + (long long)n * s.C * s.H * s.W;
    // Weights: this thread loads row arow of every A tile, reduction columns ak0 .. ak0 + 15.
    const int arow = tid >> 1, ak0 = (tid & 1) * 16;
    const int am = m0 + arow;
    const bf16_t* wrow = w + (long long)(am < s.K ? am : 0) * CRS;

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    for (int k0 = 0; k0 < CRS; k0 += MMA_BK) {
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const int k = k0 + ak0 + i;
            bf16_t v = 0;
            if (am < s.K && k < CRS) {
                if (FLIP) {
                    const int c = k / RS, rs = k - c * RS;  // w[c, am, R-1-r, S-1-s] = w[c, am][RS-1-rs]
                    v = w[((long long)c * s.K + am) * RS + (RS - 1 - rs)];
                } else {
                    v = wrow[k];
                }
            }
            As[arow][ak0 + i] = v;
        }
#pragma unroll 4
        for (int i = 0; i < 16; ++i) {
            const int k = k0 + bk0 + i;
            bf16_t v = 0;
            if (col_valid && k < CRS) {
                const int c = k / RS, rs = k - c * RS, r = rs / s.S;
                const int ih = ih0 + r, iw = iw0 + (rs - r * s.S);
                if (ih >= 0 && ih < s.H && iw >= 0 && iw < s.W) v = xn[((long long)c * s.H + ih) * s.W + iw];
            }
            Bs[bcol][bk0 + i] = v;
        }
        __syncthreads();
        mma_block_step(As, Bs, acc, warp_row, warp_col, group, tig);
        __syncthreads();
    }
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int m = m0 + warp_row + mi * 16 + group + 8 * half;
            if (m >= s.K) continue;
            const float b = bias ? bf16_to_f32(bias[m]) : 0.0f;
#pragma unroll
            for (int ni = 0; ni < 4; ++ni)
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    const long long col = col0 + warp_col + ni * 8 + 2 * tig + j;
                    if (col >= columns) continue;
                    const long long on = col / PQ, opq = col % PQ;
                    y[(on * s.K + m) * PQ + opq] = f32_to_bf16(acc[mi][ni][2 * half + j] + b);
                }
        }
}

// Weight gradient on tensor cores (bf16 only, sm_80+): dw[k, (c, r, s)] += sum over j = (n, p, q) of
// dy[n, k, p, q] * x[n, c, p*stride - pad_h + r, q*stride - pad_w + s]. GEMM rows k < K, columns (c, r, s) <
// C*R*S, reduction j < N*P*Q, tiled and multiplied exactly as conv2d_forward_mma (As[k][j] from dy, Bs[crs][j]
// gathered from x). The reduction is split over blockIdx.z in `chunk`-long slices (a multiple of 32): with
// `split`, each slice writes its f32 partial sums to partial[z][k][crs] and conv_dw_reduce_bf16 adds them
// into dw; without, the single slice adds its sums into dw directly. Grid: (ceil(CRS / 128), ceil(K / 128),
// splits), 256 threads.
__device__ void conv2d_backward_weight_mma(const bf16_t* x, const bf16_t* dy, bf16_t* dw, float* partial, int chunk,
                                           bool split, const ConvShape s) {
    __shared__ __align__(16) bf16_t As[MMA_BM][MMA_LD];
    __shared__ __align__(16) bf16_t Bs[MMA_BN][MMA_LD];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int warp_row = (warp >> 2) * 64, warp_col = (warp & 3) * 32;
    const int group = lane >> 2, tig = lane & 3;
    const int RS = s.R * s.S, CRS = s.C * RS, PQ = s.P * s.Q;
    const long long J = (long long)s.N * PQ;
    const int m0 = blockIdx.y * MMA_BM, c0 = blockIdx.x * MMA_BN;
    const long long jbeg = (long long)blockIdx.z * chunk;
    const long long jend = jbeg + chunk < J ? jbeg + chunk : J;

    // dy rows: this thread loads row arow of every A tile, reduction offsets aj0 .. aj0 + 15.
    const int arow = tid >> 1, aj0 = (tid & 1) * 16, am = m0 + arow;
    // x gather: this thread owns column bcol (one (c, r, s)) of every B tile, reduction offsets bj0 .. bj0 + 15.
    const int bcol = tid & (MMA_BN - 1), bj0 = (tid >> 7) * 16, bcrs = c0 + bcol;
    const bool bvalid = bcrs < CRS;
    const int bc = bvalid ? bcrs / RS : 0, brs = bvalid ? bcrs - bc * RS : 0;
    const int br = brs / s.S, bs = brs - br * s.S;

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    for (long long j0 = jbeg; j0 < jend; j0 += MMA_BK) {
#pragma unroll 4
        for (int i = 0; i < 16; ++i) {
            const long long j = j0 + aj0 + i;
            bf16_t v = 0;
            if (am < s.K && j < jend) {
                const long long n = j / PQ;
                v = dy[(n * s.K + am) * PQ + (j - n * PQ)];
            }
            As[arow][aj0 + i] = v;
        }
#pragma unroll 4
        for (int i = 0; i < 16; ++i) {
            const long long j = j0 + bj0 + i;
            bf16_t v = 0;
            if (bvalid && j < jend) {
                const long long n = j / PQ;
                const int pq = (int)(j - n * PQ), p = pq / s.Q, q = pq - p * s.Q;
                const int ih = p * s.stride - s.pad_h + br, iw = q * s.stride - s.pad_w + bs;
                if (ih >= 0 && ih < s.H && iw >= 0 && iw < s.W) v = x[((n * s.C + bc) * s.H + ih) * s.W + iw];
            }
            Bs[bcol][bj0 + i] = v;
        }
        __syncthreads();
        mma_block_step(As, Bs, acc, warp_row, warp_col, group, tig);
        __syncthreads();
    }
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int m = m0 + warp_row + mi * 16 + group + 8 * half;
            if (m >= s.K) continue;
#pragma unroll
            for (int ni = 0; ni < 4; ++ni)
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    const int col = c0 + warp_col + ni * 8 + 2 * tig + j;
                    if (col >= CRS) continue;
                    const long long idx = (long long)m * CRS + col;
                    const float v = acc[mi][ni][2 * half + j];
                    if (split) {
                        partial[(long long)blockIdx.z * s.K * CRS + idx] = v;
                    } else {
                        dw[idx] = f32_to_bf16(bf16_to_f32(dw[idx]) + v);
                    }
                }
        }
}

#define CONV_SHAPE_PARAMS \
    int N, int C, int H, int W, int K, int R, int S, int stride, int pad_h, int pad_w, int P, int Q
#define CONV_SHAPE {N, C, H, W, K, R, S, stride, pad_h, pad_w, P, Q}

#define CONV_KERNELS(T, suffix)                                                                                    \
    extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS) conv2d_forward_##suffix(                                 \
        const T::raw* x, const T::raw* w, const T::raw* bias, T::raw* y, CONV_SHAPE_PARAMS) {                      \
        conv2d_forward<T>(x, w, bias, y, ConvShape CONV_SHAPE);                                                    \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS) conv2d_backward_input_##suffix(                          \
        const T::raw* dy, const T::raw* w, const T::raw* bias, T::raw* dx, CONV_SHAPE_PARAMS) {                    \
        conv2d_backward_input<T>(dy, w, bias, dx, ConvShape CONV_SHAPE);                                           \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS) conv2d_backward_weight_##suffix(                         \
        const T::raw* x, const T::raw* dy, T::raw* dw, CONV_SHAPE_PARAMS) {                                        \
        conv2d_backward_weight<T>(x, dy, dw, ConvShape CONV_SHAPE);                                                \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS) conv_bias_backward_##suffix(                             \
        const T::raw* dy, T::raw* db, int N, int C, int L) {                                                       \
        conv_bias_backward<T>(dy, db, N, C, L);                                                                    \
    }                                                                                                              \
    extern "C" __global__ void im2col_##suffix(const T::raw* x, T::raw* col, CONV_SHAPE_PARAMS, long long count) { \
        im2col<T>(x, col, ConvShape CONV_SHAPE, count);                                                            \
    }
CONV_KERNELS(F32, f32)
CONV_KERNELS(BF16, bf16)

extern "C" __global__ void __launch_bounds__(256) conv2d_forward_mma_bf16(const bf16_t* x, const bf16_t* w, const bf16_t* bias,
                                                                       bf16_t* y, CONV_SHAPE_PARAMS) {
    conv2d_forward_mma<false>(x, w, bias, y, ConvShape CONV_SHAPE);
}

// Data gradient at stride 1 on tensor cores: dx is the stride-1 convolution of dy with the rotated, transposed
// weights, padded by R-1-pad_h on top and S-1-pad_w on the left (requires pad_h <= R-1 and pad_w <= S-1);
// the shape arguments are those of the forward convolution (as for conv2d_backward_input). Grid:
// (ceil(N*H*W / 128), ceil(C / 128)), 256 threads. `bias` may be null. dx is written.
extern "C" __global__ void __launch_bounds__(256) conv2d_backward_input_mma_bf16(const bf16_t* dy, const bf16_t* w,
                                                                              const bf16_t* bias, bf16_t* dx,
                                                                              CONV_SHAPE_PARAMS) {
    const ConvShape t = {N, K, P, Q, C, R, S, 1, R - 1 - pad_h, S - 1 - pad_w, H, W};
    conv2d_forward_mma<true>(dy, w, bias, dx, t);
}

extern "C" __global__ void __launch_bounds__(256) conv2d_backward_weight_mma_bf16(const bf16_t* x, const bf16_t* dy, bf16_t* dw,
                                                                               float* partial, int chunk, int split,
                                                                               CONV_SHAPE_PARAMS) {
    conv2d_backward_weight_mma(x, dy, dw, partial, chunk, split != 0, ConvShape CONV_SHAPE);
}

// dw[i] += sum over z < splits of partial[z * count + i] (the split weight gradient's partial sums), in f32.
extern "C" __global__ void conv_dw_reduce_bf16(const float* partial, bf16_t* dw, int splits, long long count) {
    GRID_STRIDE_LOOP(i, count) {
        float v = bf16_to_f32(dw[i]);
        for (int z = 0; z < splits; ++z) v += partial[(long long)z * count + i];
        dw[i] = f32_to_bf16(v);
    }
}
