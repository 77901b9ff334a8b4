// Linear-layer helpers around cuBLASLt's GEMMs.
#include "common.cuh"

// db[c] += sum_r dy[r, c] for a row-major dy [rows, cols]. One thread per column: a warp reads 32
// consecutive columns of one row, so every load is coalesced; the row sum is in f32 and deterministic.
template <typename In, typename Out>
__device__ void bias_grad(const typename In::raw* dy, typename Out::raw* db, long long rows, long long cols) {
    const long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float sum = 0.0f;
    for (long long r = 0; r < rows; ++r) sum += In::load(dy, r * cols + c);
    Out::store(db, c, Out::load(db, c) + sum);
}

extern "C" __global__ void bias_grad_f32_f32(const float* dy, float* db, long long rows, long long cols) {
    bias_grad<F32, F32>(dy, db, rows, cols);
}
extern "C" __global__ void bias_grad_bf16_bf16(const bf16_t* dy, bf16_t* db, long long rows, long long cols) {
    bias_grad<BF16, BF16>(dy, db, rows, cols);
}
extern "C" __global__ void bias_grad_bf16_f32(const bf16_t* dy, float* db, long long rows, long long cols) {
    bias_grad<BF16, F32>(dy, db, rows, cols);
}
