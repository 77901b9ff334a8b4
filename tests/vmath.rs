//! The vectorisable CPU row kernels against float64: `exp` within 1.5e-7 relative (about 1 ulp) over its whole
//! range, its edges (underflow to 0, overflow to +inf, NaN kept), `max` reporting NaN, and the shifted
//! exponential sum.

use sgdm::ops::vmath::{exp, exp_shifted_sum, max};

#[test]
fn exp_is_within_an_ulp_of_float64_over_its_range() {
    let (lo, hi, n) = (-87.33f64, 88.37f64, 2_000_001);
    let mut worst = (0f64, 0f32);
    for i in 0..n {
        let x = (lo + (hi - lo) * i as f64 / (n - 1) as f64) as f32;
        let want = (x as f64).exp();
        let rel = ((exp(x) as f64 - want) / want).abs();
        if rel > worst.0 {
            worst = (rel, x);
        }
    }
    println!("exp: worst relative error {:.3e} at x = {}", worst.0, worst.1);
    assert!(worst.0 < 1.5e-7, "exp: relative error {:.3e} at x = {}", worst.0, worst.1);
    assert_eq!(exp(0.0), 1.0);
    assert_eq!(exp(-100.0), 0.0);
    assert_eq!(exp(f32::NEG_INFINITY), 0.0);
    assert_eq!(exp(89.0), f32::INFINITY);
    assert_eq!(exp(f32::INFINITY), f32::INFINITY);
    assert!(exp(f32::NAN).is_nan());
}

#[test]
fn max_and_the_shifted_exponential_sum_match_a_sequential_reference() {
    let row: Vec<f32> = (0..1003).map(|i| ((i * 7919) % 2000) as f32 / 100.0 - 10.0).collect();
    assert_eq!(max(&row), row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)));
    assert_eq!(max(&[]), f32::NEG_INFINITY);
    let mut with_nan = row.clone();
    with_nan[1000] = f32::NAN; // in the tail past the last full lane chunk
    assert!(max(&with_nan).is_nan());

    let m = max(&row);
    let want: f64 = row.iter().map(|&v| ((v - m) as f64).exp()).sum();
    let mut shifted = row.clone();
    let sum = exp_shifted_sum(&mut shifted, m);
    assert!(((sum as f64 - want) / want).abs() < 1e-6, "sum {sum} vs {want}");
    for (s, &v) in shifted.iter().zip(&row) {
        let w = ((v - m) as f64).exp(); // the f32 difference is what the kernel exponentiates
        assert!(((*s as f64) - w).abs() <= 2.5e-7 * w, "e^({v} - {m}) = {s}, want {w}");
    }
}
