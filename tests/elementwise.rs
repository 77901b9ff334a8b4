//! The CPU reference of the elementwise ops against float64 (tests/cuda_parity.rs holds CUDA to it).

mod common;

use sgdm::ops::elementwise::{add, cast, scale, silu_backward, silu_forward};
use sgdm::{DType, Device, Tensor};

fn t(values: &[f32]) -> Tensor {
    Tensor::from_f32(&Device::Cpu, &[values.len()], DType::F32, values).unwrap()
}

fn grid() -> Vec<f32> {
    (0..401).map(|i| (i as f32 - 200.0) * 0.05).collect() // [-10, 10]
}

fn silu64(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

#[test]
fn add_and_scale_are_correctly_rounded() {
    // One f32 operation is correctly rounded, so it equals the f64 result rounded to f32 exactly.
    let a = grid();
    let b: Vec<f32> = a.iter().map(|x| x * 0.37 + 0.1).collect();
    let mut y = t(&[0.0; 401]);
    add(&t(&a), &t(&b), &mut y).unwrap();
    for ((y, a), b) in y.f32s().unwrap().iter().zip(&a).zip(&b) {
        assert_eq!(*y, (*a as f64 + *b as f64) as f32);
    }
    scale(&t(&a), -1.7, &mut y).unwrap();
    for (y, a) in y.f32s().unwrap().iter().zip(&a) {
        assert_eq!(*y, (-1.7f32 as f64 * *a as f64) as f32);
    }
}

#[test]
fn silu_forward_matches_float64() {
    let x = grid();
    let mut y = t(&[0.0; 401]);
    silu_forward(&t(&x), &mut y).unwrap();
    for (y, x) in y.f32s().unwrap().iter().zip(&x) {
        let r = silu64(*x as f64);
        // f32 exp and division: a few ulp.
        assert!((*y as f64 - r).abs() <= 1e-6 * r.abs().max(1.0), "silu({x}) = {y}, expected {r}");
    }
}

#[test]
fn silu_backward_matches_central_differences_in_float64() {
    let x = grid();
    let dy: Vec<f32> = x.iter().map(|v| 0.5 - v * 0.03).collect();
    let mut dx = t(&[0.0; 401]);
    silu_backward(&t(&x), &t(&dy), &mut dx).unwrap();
    let loss = |x: &[f64]| x.iter().zip(&dy).map(|(x, g)| silu64(*x) * *g as f64).sum::<f64>();
    // f32 rounding of s(x) and the products: ~1e-7 relative; differences in f64 are good to ~1e-9.
    common::check_gradient("silu_backward", &x, dx.f32s().unwrap(), loss, 401, 2e-6, 2e-6);
}

#[test]
fn cpu_ops_refuse_half_dtypes_and_mismatched_shapes() {
    let x = Tensor::from_f32(&Device::Cpu, &[4], DType::BF16, &[1.0; 4]).unwrap();
    let mut y = Tensor::zeros(&Device::Cpu, &[4], DType::BF16).unwrap();
    let err = silu_forward(&x, &mut y).unwrap_err().to_string();
    assert!(err.contains("computes in f32"), "{err}");
    let mut short = t(&[0.0; 3]);
    let err = scale(&t(&[1.0; 4]), 2.0, &mut short).unwrap_err().to_string();
    assert!(err.contains("shape [3] does not match [4]"), "{err}");
    let mut mixed = t(&[0.0; 4]);
    assert!(add(&t(&[1.0; 4]), &x, &mut mixed).unwrap_err().to_string().contains("mixed dtypes"));
}

#[test]
fn cpu_cast_rounds_to_nearest_even_and_back_exactly() {
    let x = [1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-9), 65504.0, 1e-7];
    let mut b = Tensor::zeros(&Device::Cpu, &[4], DType::BF16).unwrap();
    cast(&t(&x), &mut b).unwrap();
    let mut back = t(&[0.0; 4]);
    cast(&b, &mut back).unwrap();
    let back = back.f32s().unwrap();
    assert_eq!(back[0], 1.0);
    assert_eq!(back[1], 1.0 + 2f32.powi(-7));
    let mut h = Tensor::zeros(&Device::Cpu, &[4], DType::F16).unwrap();
    cast(&t(&x), &mut h).unwrap();
    let h = h.to_f32_vec().unwrap();
    assert_eq!(h[2], 65504.0, "f16 max is representable");
    assert_eq!(h[3], 2f32.powi(-23), "1e-7 rounds to the f16 subnormal 2 * 2^-24");
}
