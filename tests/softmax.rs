//! The CPU softmax against a float64 reference and central differences (tests/cuda_parity/softmax.rs holds
//! CUDA to it): odd row lengths (1, 7, 77, 4099), negative and attention-style scales, large magnitudes.

mod common;

use common::{check_gradient, compare, cpu, f64s, random};
use sgdm::ops::softmax::{softmax_backward, softmax_forward};
use sgdm::{DType, Device, Tensor};

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(&Device::Cpu, shape, DType::F32).unwrap()
}

/// softmax(scale * x) over rows of `n`, in f64.
fn softmax64(x: &[f64], n: usize, scale: f64) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(n) {
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(scale * v));
        let e: Vec<f64> = row.iter().map(|&v| (scale * v - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        out.extend(e.iter().map(|e| e / sum));
    }
    out
}

fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&v| v as f32).collect()
}

/// Relative tolerance of the CPU forward: each y is one f32 exp (~1 ulp) times 1/sum, and the sum of n
/// positive terms accumulates sequentially (n * 2^-24 worst case, relative to the sum); scale * x rounds
/// once (2^-24 of |scale * x| <= 8 here, an absolute error in the exponent).
fn forward_rel(n: usize) -> f32 {
    1e-6 + n as f32 * 6e-8
}

#[test]
fn softmax_forward_matches_float64_on_odd_rows_and_scales() {
    // 1/sqrt(40): SD's attention scale at head dim 40; 1/sqrt(512): the VAE's mid-block attention.
    for (rows, n) in [(3, 1), (5, 7), (6, 77), (2, 4099)] {
        for scale in [1.0f32, 40f32.powf(-0.5), 512f32.powf(-0.5), -0.5] {
            let x = random(rows * n, -8.0, 8.0, 11 + n as u64);
            let mut y = zeros(&[rows, n]);
            y.f32s_mut().unwrap().fill(f32::NAN); // written, not accumulated
            softmax_forward(&cpu(&[rows, n], &x), scale, &mut y).unwrap();
            let want = to_f32(&softmax64(&f64s(&x), n, scale as f64));
            compare(&format!("softmax_forward [{rows}, {n}] scale {scale}"), y.f32s().unwrap(), &want, forward_rel(n), 1e-30);
        }
    }
}

#[test]
fn softmax_forward_is_stable_at_large_magnitudes() {
    // exp(1e4) overflows f32 (and f64): only the max-shifted form stays finite. Values around +-1e4 are
    // spaced 2^-10 apart in f32; their differences to the row max are exact (Sterbenz), so the tolerance
    // stays that of the ordinary case. A 4-D attention-score shape on the way.
    let (b, h, q, k) = (2, 3, 5, 9);
    for offset in [1e4f32, -1e4, 1e38] {
        let x: Vec<f32> = random(b * h * q * k, -6.0, 6.0, 12).iter().map(|v| offset + v * (offset.abs() * 1e-4)).collect();
        let mut y = zeros(&[b, h, q, k]);
        softmax_forward(&cpu(&[b, h, q, k], &x), 1.0, &mut y).unwrap();
        let want = to_f32(&softmax64(&f64s(&x), k, 1.0));
        assert!(y.f32s().unwrap().iter().all(|v| v.is_finite()), "softmax at {offset}: non-finite output");
        compare(&format!("softmax_forward around {offset:e}"), y.f32s().unwrap(), &want, forward_rel(k), 1e-30);
        for row in y.f32s().unwrap().chunks(k) {
            let sum: f32 = row.iter().sum();
            assert!((sum - 1.0).abs() < 1e-6, "softmax at {offset}: a row sums to {sum}");
        }
    }
}

#[test]
fn softmax_backward_matches_central_differences_and_overwrites() {
    for (rows, n, scale) in [(3, 1, 1.0f32), (5, 7, 0.7), (4, 77, 40f32.powf(-0.5)), (2, 4099, -1.3)] {
        let x = random(rows * n, -3.0, 3.0, 13 + n as u64);
        let g = random(rows * n, -1.0, 1.0, 14 + n as u64);
        let mut y = zeros(&[rows, n]);
        softmax_forward(&cpu(&[rows, n], &x), scale, &mut y).unwrap();
        let mut dx = zeros(&[rows, n]);
        dx.f32s_mut().unwrap().fill(f32::NAN); // written, not accumulated
        softmax_backward(&y, &cpu(&[rows, n], &g), scale, &mut dx).unwrap();
        // dx = scale * y * (g - dot): y carries the forward's relative error (forward_rel), the dot a sum of
        // n f32 products (n * 2^-24 of sum |g y| <= 1), then one subtraction; the absolute floor covers
        // the cancellation in g - dot. Central differences in f64 with h = 1e-6 are exact to ~1e-10.
        check_gradient(
            &format!("softmax_backward [{rows}, {n}] scale {scale}"),
            &x,
            dx.f32s().unwrap(),
            |x| softmax64(x, n, scale as f64).iter().zip(&g).map(|(y, g)| y * *g as f64).sum(),
            300,
            (forward_rel(n) * 4.0) as f64,
            1e-7,
        );
    }
}

#[test]
fn softmax_refuses_bad_shapes() {
    let x = zeros(&[4, 7]);
    let mut y = zeros(&[4, 8]);
    let err = softmax_forward(&x, 1.0, &mut y).unwrap_err().to_string();
    assert!(err.contains("softmax_forward") && err.contains("[4, 8]") && err.contains("[4, 7]"), "{err}");
    let mut e = zeros(&[4, 0]);
    let err = softmax_forward(&zeros(&[4, 0]), 1.0, &mut e).unwrap_err().to_string();
    assert!(err.contains("softmax_forward") && err.contains("[4, 0]"), "{err}");
    let mut s = zeros(&[]);
    let err = softmax_forward(&zeros(&[]), 1.0, &mut s).unwrap_err().to_string();
    assert!(err.contains("softmax_forward") && err.contains("[]"), "{err}");
    let mut dx = zeros(&[4, 7]);
    let err = softmax_backward(&x, &zeros(&[7, 4]), 1.0, &mut dx).unwrap_err().to_string();
    assert!(err.contains("softmax_backward") && err.contains("[7, 4]"), "{err}");
    // An empty batch of rows is a no-op.
    let mut y = zeros(&[0, 7]);
    softmax_forward(&zeros(&[0, 7]), 1.0, &mut y).unwrap();
}

/// A NaN anywhere in a row poisons that row and no other, wherever it sits (the CUDA kernel once skipped a
/// NaN met before any finite value; tests/cuda_parity/softmax.rs checks it there).
#[test]
fn a_nan_poisons_its_whole_row_and_only_it() {
    let n = 300;
    for at in [0, 1, 150, n - 1] {
        let mut x = random(2 * n, -1.0, 1.0, 9);
        x[at] = f32::NAN;
        let mut y = zeros(&[2, n]);
        softmax_forward(&cpu(&[2, n], &x), 1.0, &mut y).unwrap();
        let y = y.f32s().unwrap();
        assert!(y[..n].iter().all(|v| v.is_nan()), "NaN at {at}: row 0 not all NaN");
        assert!(y[n..].iter().all(|v| v.is_finite()), "NaN at {at}: row 1 touched");
    }
}
