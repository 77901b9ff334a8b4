// The denoising loop's own arithmetic, on the device so a step needs no host round trip: the guided
// scheduler update and the structure head's input rescaling. Double precision where the CPU reference uses
// it (the scheduler's coefficients and update), so CUDA and CPU agree to f32 rounding.
#include "common.cuh"

// One scheduler step from the model's noise prediction `eps`: with guidance (`guided` != 0) eps holds the
// conditional rows [0, n) then the unconditional rows [n, 2n), combined as u + g (c - u) in f32; then
//   x0'  = x0_sample * s + x0_eps * e
//   s'   = c_sample * s + c_eps * e + c_x0 * x0' + c_x0_prev * x0      (x0: the previous step's prediction)
// in double, stored in the f32 state `sample` and `x0`, and `copies` copies of s' * out_scale written to
// `out` (the next step's model input, one per guidance branch, or the VAE decoder's input).
template <typename T>
__device__ void guided_step(const typename T::raw* eps, float* sample, float* x0, typename T::raw* out, double x0_sample,
                            double x0_eps, double c_sample, double c_eps, double c_x0, double c_x0_prev, float guidance,
                            int guided, float out_scale, int copies, long long n) {
    GRID_STRIDE_LOOP(i, n) {
        float e = T::load(eps, i);
        if (guided) {
            const float u = T::load(eps, i + n);
            e = __fadd_rn(u, __fmul_rn(guidance, __fsub_rn(e, u)));  // no contraction: as the CPU rounds
        }
        const double s = sample[i], ev = e, prev = x0[i];
        const double x0v = __dadd_rn(__dmul_rn(x0_sample, s), __dmul_rn(x0_eps, ev));
        const double next = __dadd_rn(__dadd_rn(__dadd_rn(__dmul_rn(c_sample, s), __dmul_rn(c_eps, ev)), __dmul_rn(c_x0, x0v)),
                                      __dmul_rn(c_x0_prev, prev));
        const float ns = (float)next;
        sample[i] = ns;
        x0[i] = (float)x0v;
        const float o = __fmul_rn(ns, out_scale);
        for (int k = 0; k < copies; ++k) T::store(out, i + (long long)k * n, o);
    }
}

// Each row of x [rows, d] scaled to length `norm` (a zero row stays zero); one block of 256 threads per row,
// the sum of squares in f32 as the CPU computes it (in another order).
template <typename T>
__device__ void rescale_rows(const typename T::raw* x, typename T::raw* y, float norm, int d, long long rows) {
    __shared__ float scratch[32];
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const long long base = row * d;
        float s = 0.0f;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            const float v = T::load(x, base + j);
            s += v * v;
        }
        const float len = sqrtf(block_sum(s, scratch));
        const float k = len > 0.0f ? norm / len : 0.0f;
        for (int j = threadIdx.x; j < d; j += blockDim.x) T::store(y, base + j, T::load(x, base + j) * k);
    }
}

#define SAMPLING(T, suffix)                                                                                      \
    extern "C" __global__ void guided_step_##suffix(const T::raw* eps, float* sample, float* x0, T::raw* out,   \
                                                    double x0_sample, double x0_eps, double c_sample,            \
                                                    double c_eps, double c_x0, double c_x0_prev, float guidance, \
                                                    int guided, float out_scale, int copies, long long n) {      \
        guided_step<T>(eps, sample, x0, out, x0_sample, x0_eps, c_sample, c_eps, c_x0, c_x0_prev, guidance,     \
                       guided, out_scale, copies, n);                                                            \
    }                                                                                                            \
    extern "C" __global__ void rescale_rows_##suffix(const T::raw* x, T::raw* y, float norm, int d, long long rows) { \
        rescale_rows<T>(x, y, norm, d, rows);                                                                    \
    }
SAMPLING(F32, f32)
SAMPLING(BF16, bf16)
