// The CUDA dialect our kernels use, as host C++. The simulator force-includes this header (`-include`) when it
// compiles a kernel file for the host (a "twin" of the cubin NVRTC builds from the same source), after the
// source has been through the mechanical rewrite in src/runtime/cudasim/twin.rs (inline PTX -> calls of
// cudasim::ptx, `__shared__` declarations -> per-block arrays). Everything a kernel can observe of the GPU is
// here: the thread and block indices, barriers, warp collectives, shared memory and the PTX it issues.
//
// A CUDA thread is a fiber (cudasim/src/simt.cpp): it runs until it must wait for other threads (a barrier, a
// warp collective), then the block's scheduler runs the others. Host compiler: g++ >= 11 or clang >= 14,
// x86-64.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

// ---- CUDA keywords ---------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __CUDACC_RTC__ 1
#define __CUDA_ARCH__ 900

// ---- built-in types --------------------------------------------------------------------------------------------
struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct __attribute__((aligned(8))) float2 {
    float x, y;
};
struct __attribute__((aligned(16))) float4 {
    float x, y, z, w;
};
struct __attribute__((aligned(8))) int2 {
    int x, y;
};
struct __attribute__((aligned(16))) int4 {
    int x, y, z, w;
};
struct __attribute__((aligned(8))) uint2 {
    unsigned int x, y;
};
struct __attribute__((aligned(16))) uint4 {
    unsigned int x, y, z, w;
};
static inline float2 make_float2(float x, float y) { return {x, y}; }
static inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
static inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
static constexpr int warpSize = 32;

// ---- the running thread and block ------------------------------------------------------------------------------
namespace cudasim {
struct BlockCoordinates {
    dim3 grid, block, block_idx;
};
// Every fiber's stack is FIBER_STACK_BYTES long and aligned to it; its first page holds this header, so the
// running CUDA thread finds its indices from its stack pointer, without thread-local storage.
struct FiberHeader {
    const uint3* thread_idx;
    const BlockCoordinates* block;
    void* fiber;  // the executor's own
    void* run;
};
constexpr unsigned long FIBER_STACK_BYTES = 256 * 1024;
static inline const FiberHeader& fiber_header() {
    unsigned long sp;
    asm("mov %%rsp, %0" : "=r"(sp));
    return *reinterpret_cast<const FiberHeader*>(sp & ~(FIBER_STACK_BYTES - 1));
}

void syncthreads(const char* file, int line);
void syncwarp(unsigned mask, const char* file, int line);

// A warp-collective operation: each lane in `mask` arrives with its input; once all have, `compute` runs over
// the 32 lanes' inputs and outputs (entries of lanes outside the mask are null), then every lane goes on with
// its own output.
typedef void (*CollectiveFn)(void* const* in, void* const* out, unsigned mask);
void warp_collective(const char* what, unsigned mask, CollectiveFn compute, void* in, void* out);

// Shared memory: `site` identifies one `__shared__` declaration (the address of a static byte the rewrite
// places beside it); each block gets fresh, NaN-filled storage for it.
void* shared_array(const void* site, size_t bytes, size_t align, const char* name, const char* file, int line);
void* dynamic_shared(size_t align);

template <typename T>
T* shared(const void* site, const char* name, const char* file, int line, size_t align = alignof(T)) {
    return static_cast<T*>(shared_array(site, sizeof(T), align < alignof(T) ? alignof(T) : align, name, file, line));
}
}  // namespace cudasim

#define threadIdx (*::cudasim::fiber_header().thread_idx)
#define blockIdx (::cudasim::fiber_header().block->block_idx)
#define blockDim (::cudasim::fiber_header().block->block)
#define gridDim (::cudasim::fiber_header().block->grid)
#define __syncthreads() ::cudasim::syncthreads(__FILE__, __LINE__)

// ---- intrinsics ------------------------------------------------------------------------------------------------
static inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
static inline float __uint_as_float(unsigned v) { float f; std::memcpy(&f, &v, 4); return f; }
static inline int __float_as_int(float v) { int i; std::memcpy(&i, &v, 4); return i; }
static inline unsigned __float_as_uint(float v) { unsigned i; std::memcpy(&i, &v, 4); return i; }
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline float __fdividef(float a, float b) { return a / b; }
static inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
static inline float normcdff(float x) { return 0.5f * erfcf(-x * 0.70710678118654752f); }
// The _rn forms are single IEEE operations, never contracted into an FMA; twins are compiled with
// -ffp-contract=off, so every float operation already is.
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
static inline int __ffs(int x) { return __builtin_ffs(x); }
// CUDA's min/max are overloaded device functions for every arithmetic type.
#define CUDASIM_MIN_MAX(T)                                     \
    static inline T min(T a, T b) { return a < b ? a : b; } \
    static inline T max(T a, T b) { return a > b ? a : b; }
CUDASIM_MIN_MAX(int)
CUDASIM_MIN_MAX(unsigned int)
CUDASIM_MIN_MAX(long)
CUDASIM_MIN_MAX(unsigned long)
CUDASIM_MIN_MAX(long long)
CUDASIM_MIN_MAX(unsigned long long)
#undef CUDASIM_MIN_MAX
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }
static inline double min(double a, double b) { return fmin(a, b); }
static inline double max(double a, double b) { return fmax(a, b); }

// ---- warp shuffles and votes -----------------------------------------------------------------------------------
namespace cudasim {
enum ShuffleMode { SHFL_IDX, SHFL_BFLY, SHFL_UP, SHFL_DOWN };
struct ShuffleIn {
    uint64_t bits;
    int operand;  // the source lane, lane mask or delta
    int width;
    int mode;
};
void shuffle_compute(void* const* in, void* const* out, unsigned mask);
template <typename T>
T shuffle(unsigned mask, T value, int operand, int width, ShuffleMode mode, const char* what) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "a shuffle moves at most 8 bytes");
    ShuffleIn in{0, operand, width, mode};
    std::memcpy(&in.bits, &value, sizeof(T));
    uint64_t out = 0;
    warp_collective(what, mask, shuffle_compute, &in, &out);
    T r;
    std::memcpy(&r, &out, sizeof(T));
    return r;
}
unsigned ballot(unsigned mask, int predicate);
}  // namespace cudasim

template <typename T>
T __shfl_sync(unsigned mask, T v, int lane, int width = 32) {
    return cudasim::shuffle(mask, v, lane, width, cudasim::SHFL_IDX, "__shfl_sync");
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return cudasim::shuffle(mask, v, lane_mask, width, cudasim::SHFL_BFLY, "__shfl_xor_sync");
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return cudasim::shuffle(mask, v, (int)delta, width, cudasim::SHFL_UP, "__shfl_up_sync");
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return cudasim::shuffle(mask, v, (int)delta, width, cudasim::SHFL_DOWN, "__shfl_down_sync");
}
static inline unsigned __ballot_sync(unsigned mask, int predicate) { return cudasim::ballot(mask, predicate); }
static inline int __any_sync(unsigned mask, int predicate) { return cudasim::ballot(mask, predicate) != 0; }
static inline int __all_sync(unsigned mask, int predicate) { return cudasim::ballot(mask, predicate) == mask; }
#define __syncwarp(...) ::cudasim::syncwarp(::cudasim::syncwarp_mask(__VA_ARGS__), __FILE__, __LINE__)
namespace cudasim {
constexpr unsigned syncwarp_mask() { return 0xffffffffu; }
constexpr unsigned syncwarp_mask(unsigned mask) { return mask; }
}  // namespace cudasim

// ---- inline PTX ------------------------------------------------------------------------------------------------
// The rewrite turns `asm("op.a.b %0, %1;" : "=h"(r) : "f"(x))` into `cudasim::ptx::op_a_b(out_h(r), in_f(x))`:
// operands in the order the PTX names them, each wrapped by its constraint letter so that an operand of the
// wrong size or kind is a compile error (as ptxas would reject the register), never a silent conversion.
namespace cudasim {
namespace ptx {
template <typename T>
unsigned short& out_h(T& v) {
    static_assert(std::is_same<T, unsigned short>::value || std::is_same<T, short>::value, "\"h\" is a 16-bit integer register");
    return reinterpret_cast<unsigned short&>(v);
}
template <typename T>
unsigned& out_r(T& v) {
    static_assert(std::is_integral<T>::value && sizeof(T) == 4, "\"r\" is a 32-bit integer register");
    return reinterpret_cast<unsigned&>(v);
}
template <typename T>
float& out_f(T& v) {
    static_assert(std::is_same<T, float>::value, "\"f\" is an f32 register");
    return v;
}
template <typename T>
unsigned short in_h(T v) {
    static_assert(std::is_integral<T>::value && sizeof(T) == 2, "\"h\" is a 16-bit integer register");
    return (unsigned short)v;
}
template <typename T>
unsigned in_r(T v) {
    static_assert(std::is_integral<T>::value && sizeof(T) == 4, "\"r\" is a 32-bit integer register");
    return (unsigned)v;
}
template <typename T>
float in_f(T v) {
    static_assert(std::is_same<T, float>::value, "\"f\" is an f32 register");
    return v;
}

// cvt.rn.bf16.f32: round to nearest even; NaN becomes the canonical bf16 NaN 0x7fff.
static inline void cvt_rn_bf16_f32(unsigned short& d, float a) {
    unsigned u;
    std::memcpy(&u, &a, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        d = 0x7fff;
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    d = (unsigned short)(u >> 16);
}
static inline void cvt_f32_f16(float& d, unsigned short h) {
    _Float16 x;
    std::memcpy(&x, &h, 2);
    d = (float)x;
}
static inline void cvt_rn_f16_f32(unsigned short& d, float a) {
    _Float16 x = (_Float16)a;  // IEEE round to nearest even
    std::memcpy(&d, &x, 2);
}
// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {d0..d3}, {a0..a3}, {b0, b1}, {c0..c3}: a warp-wide
// 16x8x16 product, fragments per the PTX ISA (computed in cudasim/src/simt.cpp).
void mma_sync_aligned_m16n8k16_row_col_f32_bf16_bf16_f32(float& d0, float& d1, float& d2, float& d3, unsigned a0,
                                                        unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                                        unsigned b1, float c0, float c1, float c2, float c3);
}  // namespace ptx
}  // namespace cudasim

// ---- registration (appended to each twin by the rewrite) ---------------------------------------------------------
namespace cudasim {
typedef void (*KernelThunk)(void* const* params);
struct TwinKernel {
    const char* name;
    KernelThunk thunk;
    int param_count;
    const unsigned* param_sizes;
    const unsigned char* param_is_pointer;
    const char* param_names;  // comma-separated, from the signature
};
template <typename F>
struct Signature;
template <typename... A>
struct Signature<void (*)(A...)> {
    static constexpr int count = sizeof...(A);
    static constexpr unsigned sizes[sizeof...(A) + 1] = {(unsigned)sizeof(A)..., 0};
    static constexpr unsigned char is_pointer[sizeof...(A) + 1] = {(unsigned char)std::is_pointer<A>::value..., 0};
    template <void (*K)(A...), size_t... I>
    static void call(void* const* p, std::index_sequence<I...>) {
        K(*static_cast<const A*>(p[I])...);
    }
};
// cuLaunchKernel's `void** kernelParams`: one pointer per parameter, to a copy of its value.
template <auto K>
void thunk(void* const* params) {
    using S = Signature<decltype(K)>;
    S::template call<K>(params, std::make_index_sequence<S::count>{});
}
}  // namespace cudasim
#define CUDASIM_KERNEL(name, param_names)                                                                    \
    {#name, &::cudasim::thunk<&name>, ::cudasim::Signature<decltype(&name)>::count,                          \
     ::cudasim::Signature<decltype(&name)>::sizes, ::cudasim::Signature<decltype(&name)>::is_pointer, param_names}
