// Helpers shared by every kernel file: bf16/f16 <-> f32 conversion, typed load/store, warp and block reductions.
// No CUDA toolkit headers: NVRTC compiles this with nothing but libnvrtc. Half types are carried as their raw
// 16-bit patterns and converted with PTX `cvt`, which rounds to nearest even like torch's casts.
#pragma once

typedef unsigned short bf16_t;
typedef unsigned short f16_t;

__device__ __forceinline__ float bf16_to_f32(bf16_t x) { return __uint_as_float(((unsigned int)x) << 16); }

__device__ __forceinline__ bf16_t f32_to_bf16(float x) {
    unsigned short r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
}

__device__ __forceinline__ float f16_to_f32(f16_t x) {
    float r;
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(x));
    return r;
}

__device__ __forceinline__ f16_t f32_to_f16(float x) {
    unsigned short r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
}

// Storage types: every kernel reads its inputs into f32 registers and rounds once on the final store.
struct F32 {
    typedef float raw;
    static __device__ __forceinline__ float load(const float* p, long long i) { return p[i]; }
    static __device__ __forceinline__ void store(float* p, long long i, float v) { p[i] = v; }
};
struct BF16 {
    typedef bf16_t raw;
    static __device__ __forceinline__ float load(const bf16_t* p, long long i) { return bf16_to_f32(p[i]); }
    static __device__ __forceinline__ void store(bf16_t* p, long long i, float v) { p[i] = f32_to_bf16(v); }
};
struct F16 {
    typedef f16_t raw;
    static __device__ __forceinline__ float load(const f16_t* p, long long i) { return f16_to_f32(p[i]); }
    static __device__ __forceinline__ void store(f16_t* p, long long i, float v) { p[i] = f32_to_f16(v); }
};

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// exp(x) = exp2(x * LOG2E): the softmaxes work in base 2 (one ex2 per element) and convert back with LN2.
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Sum over the whole block; every thread gets the result. `scratch` holds at least 32 floats.
// blockDim.x must be a multiple of 32.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

// Grid-stride loop over n elements (n may exceed 2^31).
#define GRID_STRIDE_LOOP(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (long long)blockDim.x * gridDim.x)
