//! Row kernels for the CPU reference written so LLVM vectorises them at the baseline x86-64 target (SSE2):
//! an `exp` without libm calls or branches, and the softmax row pass built on it. The CPU attention spends
//! most of its time exponentiating scores; libm's scalar `expf` made that pass 42% of an SD 1.5 step.

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in a part exact in f32 and the rest (Cody-Waite), so `x - n ln 2` loses no bits.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Adding and subtracting 1.5 * 2^23 rounds an f32 of magnitude below 2^22 to the nearest integer.
const ROUND: f32 = 12_582_912.0;

/// e^x within about 1 ulp (8.2e-8 relative at worst, measured in tests/vmath.rs) on [-87.33, 88.37]; 0
/// below (where e^x is subnormal), +inf above (2^128 is not an f32; the true e^x overflows at 88.72, so
/// (88.37, 88.72] also reads +inf); NaN for NaN. Range reduction x = n ln 2 + r, |r| <= ln2/2, then a
/// degree-6 polynomial for e^r (the Cephes `expf` coefficients) and 2^n by building the exponent bits.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let c = x.clamp(-87.33, 88.37);
    let n = (c * LOG2E + ROUND) - ROUND;
    let r = c - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5; // Cephes' 5.0000001201e-1, which is 0.5 in f32
    let y = p * r * r + r + 1.0;
    // SAFETY: n is an integer in [-126, 128] (c is clamped), so the conversion is exact; unlike `as`, it
    // compiles to the plain packed conversion (no saturation and NaN checks), which keeps the loop vectorised.
    let n = unsafe { n.to_int_unchecked::<i32>() };
    let scaled = y * f32::from_bits(((n + 127) << 23) as u32);
    // Branch-free selects: the clamp above keeps NaN out of the integer conversion, these put it back.
    let scaled = if x < -87.33 { 0.0 } else { scaled };
    let scaled = if x > 88.37 { f32::INFINITY } else { scaled };
    if x.is_nan() {
        x
    } else {
        scaled
    }
}

/// The largest element (NaN if any is NaN, as a sequential fold with `f32::max` would not report).
pub fn max(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut nan = false;
    let chunks = row.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = if v > *l { v } else { *l };
            nan |= v.is_nan();
        }
    }
    for &v in tail {
        lanes[0] = if v > lanes[0] { v } else { lanes[0] };
        nan |= v.is_nan();
    }
    if nan {
        return f32::NAN;
    }
    lanes.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// Replaces every x with e^(x - shift) and returns their sum (eight partial sums, so it vectorises).
pub fn exp_shifted_sum(row: &mut [f32], shift: f32) -> f32 {
    let mut lanes = [0f32; 8];
    let mut chunks = row.chunks_exact_mut(8);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c.iter_mut()) {
            *v = exp(*v - shift);
            *l += *v;
        }
    }
    let mut sum = 0f32;
    for v in chunks.into_remainder() {
        *v = exp(*v - shift);
        sum += *v;
    }
    lanes.iter().sum::<f32>() + sum
}

/// Replaces every x with e^(x - shift).
pub fn exp_shifted(row: &mut [f32], shift: f32) {
    for v in row {
        *v = exp(*v - shift);
    }
}

/// Multiplies every element by `k`.
pub fn scale(row: &mut [f32], k: f32) {
    for v in row {
        *v *= k;
    }
}
