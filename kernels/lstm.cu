// LSTM cell steps (torch.nn.LSTM: gate order i, f, g, o). The host runs the recurrence one step at a time:
// cuBLASLt does the GEMMs (the input projection of all steps at once, then h_prev · W_hhᵀ per step, and in
// backward dgates · W_hh per step), these kernels do everything elementwise within a step, one thread per
// (batch row b, hidden unit j); adjacent threads touch adjacent j, so every access is coalesced.
//
// Layouts (B batch, T steps, H hidden): gates f32 [B, T, 4H] (batch-major, the input projection's layout);
// cell f32 [T, B, H]; hidden T [T, R, H] and dgates_by_step T [T, R, 4H] (time-major GEMM operands) with
// R >= B rows per step so that each step starts 256-byte aligned for cuBLASLt: the kernels run over R·H
// threads and write zeros to rows B..R-1, which keeps the padding out of every GEMM's result; y / dy T
// [B, T, y_cols] with this direction's H columns starting at y_offset. `prev` is the step the direction
// processed just before t (t-1 forward, t+1 reverse), or -1 at its first step, where h and c start at zero.
//
// A persistent kernel that keeps W_hh on chip across steps would save the per-step launches and W_hh
// re-reads; this file is the plain per-step structure that the CPU reference shares.
#include "common.cuh"

__device__ __forceinline__ float sigmoid_f32(float v) { return 1.0f / (1.0f + expf(-v)); }

// Forward of step t. In: gates[b, t, :] holds x_t · W_ihᵀ; recurrent [R, 4H] f32 holds h_prev · W_hhᵀ (read
// only when prev >= 0). Out (=): gates[b, t, :] = (σ(i), σ(f), tanh(g), σ(o)) of the pre-activations plus
// both biases; cell[t] = f·c_prev + i·g; hidden[t] = o·tanh(c), also stored into y.
template <typename T>
__device__ void lstm_cell_forward(float* gates, const float* recurrent, const typename T::raw* b_ih,
                                  const typename T::raw* b_hh, float* cell, typename T::raw* hidden,
                                  typename T::raw* y, int t, int prev, int B, int R, int steps, int H, int y_cols,
                                  int y_offset) {
    const long long n = (long long)R * H;
    GRID_STRIDE_LOOP(idx, n) {
        const int b = (int)(idx / H), j = (int)(idx % H);
        typename T::raw* h_out = hidden + ((long long)t * R + b) * H + j;
        if (b >= B) {
            T::store(h_out, 0, 0.0f);
            continue;
        }
        float* pre = gates + ((long long)b * steps + t) * 4 * H;
        const float* rec = recurrent + (long long)b * 4 * H;
        float v[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const int i = k * H + j;
            v[k] = pre[i] + T::load(b_ih, i) + T::load(b_hh, i) + (prev >= 0 ? rec[i] : 0.0f);
        }
        const float ig = sigmoid_f32(v[0]), fg = sigmoid_f32(v[1]), gg = tanhf(v[2]), og = sigmoid_f32(v[3]);
        const float c_prev = prev >= 0 ? cell[((long long)prev * B + b) * H + j] : 0.0f;
        const float c = fg * c_prev + ig * gg;
        const float h = og * tanhf(c);
        pre[j] = ig;
        pre[H + j] = fg;
        pre[2 * H + j] = gg;
        pre[3 * H + j] = og;
        cell[((long long)t * B + b) * H + j] = c;
        T::store(h_out, 0, h);
        T::store(y, ((long long)b * steps + t) * y_cols + y_offset + j, h);
    }
}

// Backward of step t. In: the activated gates and cell states of the forward; dy [B, T, y_cols]; when
// has_next (t is not the direction's last step) dh_next [R, H] f32 = dgates_next · W_hh and dc [B, H] f32,
// the cell gradient carried from the next step. Out (=): the pre-activation gate gradients of step t into
// dgates[b, t, :] ([B, T, 4H]) and dgates_by_step[t, b, :] ([T, R, 4H]); dc = the gradient of c_prev.
template <typename T>
__device__ void lstm_cell_backward(const float* gates, const float* cell, const typename T::raw* dy,
                                   const float* dh_next, float* dc, typename T::raw* dgates,
                                   typename T::raw* dgates_by_step, int has_next, int t, int prev, int B,
                                   int R, int steps, int H, int y_cols, int y_offset) {
    const long long n = (long long)R * H;
    GRID_STRIDE_LOOP(idx, n) {
        const int b = (int)(idx / H), j = (int)(idx % H);
        typename T::raw* by_step = dgates_by_step + ((long long)t * R + b) * 4 * H;
        if (b >= B) {
#pragma unroll
            for (int k = 0; k < 4; ++k) T::store(by_step, k * H + j, 0.0f);
            continue;
        }
        const long long row = (long long)b * steps + t;
        const float* act = gates + row * 4 * H;
        const float ig = act[j], fg = act[H + j], gg = act[2 * H + j], og = act[3 * H + j];
        const float tc = tanhf(cell[((long long)t * B + b) * H + j]);
        const float c_prev = prev >= 0 ? cell[((long long)prev * B + b) * H + j] : 0.0f;
        float dh = T::load(dy, row * y_cols + y_offset + j), dct = 0.0f;
        if (has_next) {
            dh += dh_next[idx];
            dct = dc[idx];
        }
        dct += dh * og * (1.0f - tc * tc);
        const float d[4] = {dct * gg * ig * (1.0f - ig), dct * c_prev * fg * (1.0f - fg), dct * ig * (1.0f - gg * gg),
                            dh * tc * og * (1.0f - og)};
        dc[idx] = dct * fg;
        typename T::raw* by_row = dgates + row * 4 * H;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            T::store(by_row, k * H + j, d[k]);
            T::store(by_step, k * H + j, d[k]);
        }
    }
}

#define LSTM_KERNELS(T, suffix)                                                                                   \
    extern "C" __global__ void lstm_cell_forward_##suffix(                                                        \
        float* gates, const float* recurrent, const T::raw* b_ih, const T::raw* b_hh, float* cell, T::raw* hidden, \
        T::raw* y, int t, int prev, int B, int R, int steps, int H, int y_cols, int y_offset) {                   \
        lstm_cell_forward<T>(gates, recurrent, b_ih, b_hh, cell, hidden, y, t, prev, B, R, steps, H, y_cols,       \
                             y_offset);                                                                           \
    }                                                                                                             \
    extern "C" __global__ void lstm_cell_backward_##suffix(                                                       \
        const float* gates, const float* cell, const T::raw* dy, const float* dh_next, float* dc, T::raw* dgates,  \
        T::raw* dgates_by_step, int has_next, int t, int prev, int B, int R, int steps, int H, int y_cols,        \
        int y_offset) {                                                                                           \
        lstm_cell_backward<T>(gates, cell, dy, dh_next, dc, dgates, dgates_by_step, has_next, t, prev, B, R, steps, \
                              H, y_cols, y_offset);                                                               \
    }
LSTM_KERNELS(F32, f32)
LSTM_KERNELS(BF16, bf16)
