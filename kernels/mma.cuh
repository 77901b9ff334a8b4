// Tensor cores for the kernels that use them (conv.cu, attention_mma.cu): mma.sync m16n8k16 with bf16 inputs
// and f32 accumulators (sm_80+), and the bf16 pairs its fragment registers are made of.
//
// Fragment layout (PTX ISA, mma.m16n8k16, lane = 4 * group + tig), each register two consecutive-k values:
//   A regs: (row group, k 2tig..+1), (row group+8, same k), (row group, k 2tig+8..+9), (row group+8, same)
//   B regs: (k 2tig..+1, col group), (k 2tig+8..+9, col group)
//   C/D:    (row group, col 2tig..+1), (row group+8, col 2tig..+1)
#pragma once
#include "common.cuh"

// d += A · B for one 16 x 8 tile over k = 16: A row-major 16 x 16 (a), B column-major 16 x 8 (b0, b1).
__device__ __forceinline__ void mma_m16n8k16_bf16(float d[4], const unsigned a[4], unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// p[0] and p[1] as one fragment register (p[0] in the low half): one aligned 32-bit load, so p is 4-byte aligned.
__device__ __forceinline__ unsigned bf16_pair(const bf16_t* p) { return *reinterpret_cast<const unsigned*>(p); }

// lo and hi rounded to bf16 (nearest even) as one fragment register, lo in the low half.
__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    return (unsigned)f32_to_bf16(lo) | ((unsigned)f32_to_bf16(hi) << 16);
}
