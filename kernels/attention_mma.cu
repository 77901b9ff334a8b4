// Multi-head scaled dot-product attention on tensor cores (bf16 storage, sm_80+): the FlashAttention-2 style
// forward and backward, beside the CUDA-core kernels of attention.cu (same layout, outputs and contract; the
// backward's delta = rowsum(dout * out) comes from attention_backward_delta there). P and dS are rounded to
// bf16 before their products; every sum is f32.
#include "mma.cuh"

// ---------------------------------------------------------------------------------------------------------
// Forward on tensor cores (bf16 only, sm_80+), FlashAttention-2 style. grid (ceil(Lq / 64), B*H), block 128:
// each of the 4 warps owns 16 query rows, whose Q fragments stay in registers for the whole kernel; the
// block walks the keys in tiles of 64 held in shared memory, K as Ks[key][dim] and V transposed as
// Vt[dim][key] (both contiguous along the mma reduction axis, so every fragment register is one aligned
// 32-bit load). Per tile and warp: S = Q K^T (16 x 64, mma.m16n8k16 over the head dim padded to DP, a
// multiple of 16), the online softmax in base 2 on the S fragments (a row's 64 scores live in the 4 lanes of
// one lane group: max and sum over shuffles xor 1, 2), then O += P V with P rounded to bf16: the C fragments
// of two adjacent 8-key tiles of S are exactly the A fragment of one 16-key step. Row and column padding of
// the shared tiles (8 bf16) keep the fragment loads on 32 distinct banks for every DP.
// Fragment layout (PTX ISA, lane = 4 * group + tig): A (row group | group+8, k 2tig..+1 | +8..+9),
// B (k 2tig..+1 | +8..+9, col group), C (row group | group+8, col 2tig..+1).
#define FA_WARPS 4
#define FA_ROWS (16 * FA_WARPS)
#define FA_KEYS 64

// q[row, dim] and q[row, dim + 1] of this head as one A register (zero past Lq or d).
__device__ __forceinline__ unsigned q_pair(const bf16_t* q, long long qbase, int C, int row, int dim, int Lq, int d) {
    unsigned lo = 0, hi = 0;
    if (row < Lq) {
        const bf16_t* p = q + qbase + (long long)row * C;
        if (dim < d) lo = p[dim];
        if (dim + 1 < d) hi = p[dim + 1];
    }
    return lo | (hi << 16);
}

template <int DP>
__device__ __forceinline__ void attention_forward_mma(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                                                      const bf16_t* __restrict__ v, bf16_t* __restrict__ out,
                                                      float* __restrict__ lse, int Lq, int Lk, int H, int d, float scale) {
    constexpr int KLD = DP + 8, VLD = FA_KEYS + 8, KT = DP / 16, NT = DP / 8;
    __shared__ __align__(16) bf16_t Ks[FA_KEYS * KLD];
    __shared__ __align__(16) bf16_t Vt[DP * VLD];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, group = lane >> 2, tig = lane & 3;
    const int bh = blockIdx.y, b = bh / H, h = bh - b * H, C = H * d;
    const int i0 = blockIdx.x * FA_ROWS + warp * 16;
    const long long qbase = (long long)b * Lq * C + (long long)h * d;
    const long long kbase = (long long)b * Lk * C + (long long)h * d;
    const float sl2 = scale * LOG2E;

    unsigned qa[KT][4];
#pragma unroll
    for (int kt = 0; kt < KT; ++kt) {
        const int dim = 16 * kt + 2 * tig;
        qa[kt][0] = q_pair(q, qbase, C, i0 + group, dim, Lq, d);
        qa[kt][1] = q_pair(q, qbase, C, i0 + group + 8, dim, Lq, d);
        qa[kt][2] = q_pair(q, qbase, C, i0 + group, dim + 8, Lq, d);
        qa[kt][3] = q_pair(q, qbase, C, i0 + group + 8, dim + 8, Lq, d);
    }
    float o[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[nt][e] = 0.0f;
    float m[2] = {neg_inf(), neg_inf()}, l[2] = {0.0f, 0.0f};  // rows group and group + 8

    for (int j0 = 0; j0 < Lk; j0 += FA_KEYS) {
        __syncthreads();  // every warp is done with the previous tiles
        for (int idx = tid; idx < FA_KEYS * DP; idx += blockDim.x) {
            const int key = idx / DP, dim = idx - key * DP, j = j0 + key;
            bf16_t kv = 0, vv = 0;
            if (j < Lk && dim < d) {
                const long long at = kbase + (long long)j * C + dim;
                kv = k[at];
                vv = v[at];
            }
            Ks[key * KLD + dim] = kv;
            Vt[dim * VLD + key] = vv;
        }
        __syncthreads();

        float s[8][4];
#pragma unroll
        for (int ni = 0; ni < 8; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[ni][e] = 0.0f;
#pragma unroll
        for (int kt = 0; kt < KT; ++kt)
#pragma unroll
            for (int ni = 0; ni < 8; ++ni) {
                const bf16_t* kr = &Ks[(ni * 8 + group) * KLD + kt * 16 + 2 * tig];
                mma_m16n8k16_bf16(s[ni], qa[kt], bf16_pair(kr), bf16_pair(kr + 8));
            }

        float mx[2] = {m[0], m[1]};
#pragma unroll
        for (int ni = 0; ni < 8; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = j0 + ni * 8 + 2 * tig + (e & 1);
                const float x = key < Lk ? s[ni][e] * sl2 : neg_inf();
                s[ni][e] = x;
                mx[e >> 1] = fmaxf(mx[e >> 1], x);
            }
        float corr[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));  // finite: key j0 exists
            corr[r] = exp2f(m[r] - mx[r]);                                   // 0 on the first tile
            m[r] = mx[r];
            l[r] *= corr[r];
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[nt][e] *= corr[e >> 1];
#pragma unroll
        for (int ni = 0; ni < 8; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float p = exp2f(s[ni][e] - m[e >> 1]);
                l[e >> 1] += p;
                s[ni][e] = p;
            }
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            const unsigned pa[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]), pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                                    pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                    pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const bf16_t* vr = &Vt[(nt * 8 + group) * VLD + kk * 16 + 2 * tig];
                mma_m16n8k16_bf16(o[nt], pa, bf16_pair(vr), bf16_pair(vr + 8));
            }
        }
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        const int row = i0 + group + 8 * r;
        if (row >= Lq) continue;
        const float inv = 1.0f / l[r];
        bf16_t* orow = out + qbase + (long long)row * C;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const int dim = nt * 8 + 2 * tig + j;
                if (dim < d) orow[dim] = f32_to_bf16(o[nt][2 * r + j] * inv);
            }
        if (tig == 0) lse[(long long)bh * Lq + row] = m[r] * LN2 + logf(l[r]);
    }
}

#define FA_KERNEL(DP)                                                                                             \
    extern "C" __global__ void __launch_bounds__(FA_WARPS * 32) attention_forward_mma_bf16_d##DP(              \
        const bf16_t* q, const bf16_t* k, const bf16_t* v, bf16_t* out, float* lse, int Lq, int Lk, int H, int d, \
        float scale) {                                                                                            \
        attention_forward_mma<DP>(q, k, v, out, lse, Lq, Lk, H, d, scale);                                        \
    }
FA_KERNEL(16)
FA_KERNEL(32)
FA_KERNEL(48)
FA_KERNEL(64)
FA_KERNEL(80)
FA_KERNEL(96)
FA_KERNEL(112)
FA_KERNEL(128)
FA_KERNEL(144)
FA_KERNEL(160)

// ---------------------------------------------------------------------------------------------------------
// Backward on tensor cores (bf16, sm_80+, head dims up to 96: SD 1.5's 40 and 80), FlashAttention-2 style,
// as two kernels that each recompute the probabilities P = exp2(scale log2e q.k - lse log2e) from the saved
// lse, so neither needs atomics: dq per query block, dk and dv per key block. `delta` (row sums of dout * out)
// comes from attention_backward_delta first. With dS = P (dP - delta), dP = dout v^T:
//   dq = scale dS k,   dk = scale dS^T q,   dv = P^T dout.
// Tiles of 32 rows of the other side stream through shared memory, both as [row][dim] (the B operand of the
// products reducing over dim) and transposed as [dim][row] (the B operand of those reducing over rows), each
// padded so fragment loads hit 32 distinct banks. The warp's own 16 rows stay in registers as A fragments.
#define FB_TILE 32
#define FB_TLD (FB_TILE + 8)

// dq. grid (ceil(Lq / 64), B*H), block 128: 4 warps x 16 query rows.
template <int DP>
__device__ __forceinline__ void attention_backward_dq_mma(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                                                          const bf16_t* __restrict__ v, const bf16_t* __restrict__ dout,
                                                          const float* __restrict__ lse, const float* __restrict__ delta,
                                                          bf16_t* __restrict__ dq, int Lq, int Lk, int H, int d, float scale) {
    constexpr int KLD = DP + 8, KT = DP / 16, NT = DP / 8;
    __shared__ __align__(16) bf16_t Ks[FB_TILE * KLD];
    __shared__ __align__(16) bf16_t Vs[FB_TILE * KLD];
    __shared__ __align__(16) bf16_t Kt[DP * FB_TLD];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, group = lane >> 2, tig = lane & 3;
    const int bh = blockIdx.y, b = bh / H, h = bh - b * H, C = H * d;
    const int i0 = blockIdx.x * FA_ROWS + warp * 16;
    const long long qbase = (long long)b * Lq * C + (long long)h * d;
    const long long kbase = (long long)b * Lk * C + (long long)h * d;
    const float sl2 = scale * LOG2E;

    unsigned qa[KT][4], ga[KT][4];
#pragma unroll
    for (int kt = 0; kt < KT; ++kt) {
        const int dim = 16 * kt + 2 * tig;
        qa[kt][0] = q_pair(q, qbase, C, i0 + group, dim, Lq, d);
        qa[kt][1] = q_pair(q, qbase, C, i0 + group + 8, dim, Lq, d);
        qa[kt][2] = q_pair(q, qbase, C, i0 + group, dim + 8, Lq, d);
        qa[kt][3] = q_pair(q, qbase, C, i0 + group + 8, dim + 8, Lq, d);
        ga[kt][0] = q_pair(dout, qbase, C, i0 + group, dim, Lq, d);
        ga[kt][1] = q_pair(dout, qbase, C, i0 + group + 8, dim, Lq, d);
        ga[kt][2] = q_pair(dout, qbase, C, i0 + group, dim + 8, Lq, d);
        ga[kt][3] = q_pair(dout, qbase, C, i0 + group + 8, dim + 8, Lq, d);
    }
    float lse2[2], dl[2];  // rows group and group + 8 (zero past Lq: their q and dout rows are zero too)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = i0 + group + 8 * r;
        lse2[r] = row < Lq ? lse[(long long)bh * Lq + row] * LOG2E : 0.0f;
        dl[r] = row < Lq ? delta[(long long)bh * Lq + row] : 0.0f;
    }
    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[nt][e] = 0.0f;

    for (int j0 = 0; j0 < Lk; j0 += FB_TILE) {
        __syncthreads();
        for (int idx = tid; idx < FB_TILE * DP; idx += blockDim.x) {
            const int key = idx / DP, dim = idx - key * DP, j = j0 + key;
            bf16_t kv = 0, vv = 0;
            if (j < Lk && dim < d) {
                const long long at = kbase + (long long)j * C + dim;
                kv = k[at];
                vv = v[at];
            }
            Ks[key * KLD + dim] = kv;
            Vs[key * KLD + dim] = vv;
            Kt[dim * FB_TLD + key] = kv;
        }
        __syncthreads();
        float s[4][4], dp[4][4];
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[ni][e] = dp[ni][e] = 0.0f;
#pragma unroll
        for (int kt = 0; kt < KT; ++kt)
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
                const int at = (ni * 8 + group) * KLD + kt * 16 + 2 * tig;
                mma_m16n8k16_bf16(s[ni], qa[kt], bf16_pair(&Ks[at]), bf16_pair(&Ks[at + 8]));
                mma_m16n8k16_bf16(dp[ni], ga[kt], bf16_pair(&Vs[at]), bf16_pair(&Vs[at + 8]));
            }
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = j0 + ni * 8 + 2 * tig + (e & 1), r = e >> 1;
                const float p = key < Lk ? exp2f(s[ni][e] * sl2 - lse2[r]) : 0.0f;
                s[ni][e] = p * (dp[ni][e] - dl[r]);  // dS
            }
#pragma unroll
        for (int kk = 0; kk < FB_TILE / 16; ++kk) {
            const unsigned pa[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]), pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                                    pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                    pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const bf16_t* kr = &Kt[(nt * 8 + group) * FB_TLD + kk * 16 + 2 * tig];
                mma_m16n8k16_bf16(acc[nt], pa, bf16_pair(kr), bf16_pair(kr + 8));
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = i0 + group + 8 * r;
        if (row >= Lq) continue;
        bf16_t* out = dq + qbase + (long long)row * C;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const int dim = nt * 8 + 2 * tig + j;
                if (dim < d) out[dim] = f32_to_bf16(acc[nt][2 * r + j] * scale);
            }
    }
}

// dk and dv. grid (ceil(Lk / 64), B*H), block 128: 4 warps x 16 key rows.
template <int DP>
__device__ __forceinline__ void attention_backward_dkdv_mma(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                                                            const bf16_t* __restrict__ v, const bf16_t* __restrict__ dout,
                                                            const float* __restrict__ lse, const float* __restrict__ delta,
                                                            bf16_t* __restrict__ dk, bf16_t* __restrict__ dv, int Lq, int Lk,
                                                            int H, int d, float scale) {
    constexpr int KLD = DP + 8, KT = DP / 16, NT = DP / 8;
    __shared__ __align__(16) bf16_t Qs[FB_TILE * KLD];
    __shared__ __align__(16) bf16_t Gs[FB_TILE * KLD];
    __shared__ __align__(16) bf16_t Qt[DP * FB_TLD];
    __shared__ __align__(16) bf16_t Gt[DP * FB_TLD];
    __shared__ float lse2s[FB_TILE], deltas[FB_TILE];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, group = lane >> 2, tig = lane & 3;
    const int bh = blockIdx.y, b = bh / H, h = bh - b * H, C = H * d;
    const int j0w = blockIdx.x * FA_ROWS + warp * 16;
    const long long qbase = (long long)b * Lq * C + (long long)h * d;
    const long long kbase = (long long)b * Lk * C + (long long)h * d;
    const float sl2 = scale * LOG2E;

    unsigned ka[KT][4], va[KT][4];
#pragma unroll
    for (int kt = 0; kt < KT; ++kt) {
        const int dim = 16 * kt + 2 * tig;
        ka[kt][0] = q_pair(k, kbase, C, j0w + group, dim, Lk, d);
        ka[kt][1] = q_pair(k, kbase, C, j0w + group + 8, dim, Lk, d);
        ka[kt][2] = q_pair(k, kbase, C, j0w + group, dim + 8, Lk, d);
        ka[kt][3] = q_pair(k, kbase, C, j0w + group + 8, dim + 8, Lk, d);
        va[kt][0] = q_pair(v, kbase, C, j0w + group, dim, Lk, d);
        va[kt][1] = q_pair(v, kbase, C, j0w + group + 8, dim, Lk, d);
        va[kt][2] = q_pair(v, kbase, C, j0w + group, dim + 8, Lk, d);
        va[kt][3] = q_pair(v, kbase, C, j0w + group + 8, dim + 8, Lk, d);
    }
    float gk[NT][4], gv[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) gk[nt][e] = gv[nt][e] = 0.0f;

    for (int i0 = 0; i0 < Lq; i0 += FB_TILE) {
        __syncthreads();
        for (int idx = tid; idx < FB_TILE * DP; idx += blockDim.x) {
            const int row = idx / DP, dim = idx - row * DP, i = i0 + row;
            bf16_t qv = 0, gvv = 0;
            if (i < Lq && dim < d) {
                const long long at = qbase + (long long)i * C + dim;
                qv = q[at];
                gvv = dout[at];
            }
            Qs[row * KLD + dim] = qv;
            Gs[row * KLD + dim] = gvv;
            Qt[dim * FB_TLD + row] = qv;
            Gt[dim * FB_TLD + row] = gvv;
        }
        if (tid < FB_TILE) {
            const int i = i0 + tid;
            // A query past Lq gets lse = +inf, so its probabilities are exactly zero.
            lse2s[tid] = i < Lq ? lse[(long long)bh * Lq + i] * LOG2E : __int_as_float(0x7f800000);
            deltas[tid] = i < Lq ? delta[(long long)bh * Lq + i] : 0.0f;
        }
        __syncthreads();
        float s[4][4], dp[4][4];  // S^T and dP^T: 16 keys x 32 queries
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[ni][e] = dp[ni][e] = 0.0f;
#pragma unroll
        for (int kt = 0; kt < KT; ++kt)
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
                const int at = (ni * 8 + group) * KLD + kt * 16 + 2 * tig;
                mma_m16n8k16_bf16(s[ni], ka[kt], bf16_pair(&Qs[at]), bf16_pair(&Qs[at + 8]));
                mma_m16n8k16_bf16(dp[ni], va[kt], bf16_pair(&Gs[at]), bf16_pair(&Gs[at + 8]));
            }
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int col = ni * 8 + 2 * tig + (e & 1);
                const float p = exp2f(s[ni][e] * sl2 - lse2s[col]);
                s[ni][e] = p;                            // P^T
                dp[ni][e] = p * (dp[ni][e] - deltas[col]);  // dS^T
            }
#pragma unroll
        for (int kk = 0; kk < FB_TILE / 16; ++kk) {
            const unsigned pa[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]), pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                                    pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                    pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
            const unsigned da[4] = {pack_bf16(dp[2 * kk][0], dp[2 * kk][1]), pack_bf16(dp[2 * kk][2], dp[2 * kk][3]),
                                    pack_bf16(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                                    pack_bf16(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const int at = (nt * 8 + group) * FB_TLD + kk * 16 + 2 * tig;
                mma_m16n8k16_bf16(gv[nt], pa, bf16_pair(&Gt[at]), bf16_pair(&Gt[at + 8]));
                mma_m16n8k16_bf16(gk[nt], da, bf16_pair(&Qt[at]), bf16_pair(&Qt[at + 8]));
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int key = j0w + group + 8 * r;
        if (key >= Lk) continue;
        const long long at = kbase + (long long)key * C;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const int dim = nt * 8 + 2 * tig + j;
                if (dim < d) {
                    dk[at + dim] = f32_to_bf16(gk[nt][2 * r + j] * scale);
                    dv[at + dim] = f32_to_bf16(gv[nt][2 * r + j]);
                }
            }
    }
}

#define FB_KERNELS(DP)                                                                                            \
    extern "C" __global__ void __launch_bounds__(FA_WARPS * 32) attention_backward_dq_mma_bf16_d##DP(          \
        const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* dout, const float* lse,                  \
        const float* delta, bf16_t* dq, int Lq, int Lk, int H, int d, float scale) {                              \
        attention_backward_dq_mma<DP>(q, k, v, dout, lse, delta, dq, Lq, Lk, H, d, scale);                        \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(FA_WARPS * 32) attention_backward_dkdv_mma_bf16_d##DP(        \
        const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* dout, const float* lse,                  \
        const float* delta, bf16_t* dk, bf16_t* dv, int Lq, int Lk, int H, int d, float scale) {                  \
        attention_backward_dkdv_mma<DP>(q, k, v, dout, lse, delta, dk, dv, Lq, Lk, H, d, scale);                  \
    }
FB_KERNELS(16)
FB_KERNELS(32)
FB_KERNELS(48)
FB_KERNELS(64)
FB_KERNELS(80)
FB_KERNELS(96)
