//! The CPU reference of the elementwise ops against float64 (tests/cuda_parity.rs holds CUDA to it).

mod common;

use common::{check_gradient, compare, cpu, random};
use sgdm::ops::elementwise::{
    add, add_scaled, add_scaled_backward, cast, geglu_backward, geglu_forward, gelu_backward, gelu_forward, relu_backward, relu_forward,
    reparameterize_backward, reparameterize_forward, scale, sigmoid_backward, sigmoid_forward, silu_backward, silu_forward, timestep_embedding,
};
use sgdm::ops::elementwise::{log_backward, log_forward, mul, mul_backward, rsqrt_backward, rsqrt_forward, tanh_backward, tanh_forward};
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

/// erf in float64 from the all-positive series erf(x) = 2/sqrt(pi) e^{-x^2} sum_n 2^n x^{2n+1} / (2n+1)!!,
/// which has no cancellation, so it is good to ~1e-15 relative for the |x| < 6 used here.
fn erf64(x: f64) -> f64 {
    let (mut term, mut sum, mut n) = (x, x, 0.0);
    while term.abs() > 1e-17 * sum.abs() {
        n += 1.0;
        term *= 2.0 * x * x / (2.0 * n + 1.0);
        sum += term;
    }
    2.0 / std::f64::consts::PI.sqrt() * (-x * x).exp() * sum
}

/// erfc in float64 with full relative accuracy in the tail: 1 - erf(z) for z < 3, else the continued
/// fraction erfc(z) = e^{-z^2} / sqrt(pi) / (z + (1/2) / (z + 1 / (z + (3/2) / (z + ...)))), 80 levels deep.
fn erfc64(z: f64) -> f64 {
    if z < 3.0 {
        return 1.0 - erf64(z);
    }
    let mut k = z;
    for n in (1..=80).rev() {
        k = z + (n as f64 / 2.0) / k;
    }
    (-z * z).exp() / std::f64::consts::PI.sqrt() / k
}

fn gelu64(x: f64) -> f64 {
    0.5 * x * erfc64(-x / std::f64::consts::SQRT_2)
}

fn sigmoid64(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn zeros(n: usize) -> Tensor {
    cpu(&[n], &vec![0.0; n])
}

fn run_unary(op: fn(&Tensor, &mut Tensor) -> anyhow::Result<()>, x: &[f32]) -> Vec<f32> {
    let mut y = zeros(x.len());
    op(&t(x), &mut y).unwrap();
    y.f32s().unwrap().to_vec()
}

fn run_backward(op: fn(&Tensor, &Tensor, &mut Tensor) -> anyhow::Result<()>, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let mut dx = zeros(x.len());
    op(&t(x), &t(dy), &mut dx).unwrap();
    dx.f32s().unwrap().to_vec()
}

fn f32s(v: impl Iterator<Item = f64>) -> Vec<f32> {
    v.map(|v| v as f32).collect()
}

#[test]
fn erf64_reference_matches_known_values() {
    // Tabulated: erf(0.5) = 0.5204998778130465, erf(1) = 0.8427007929497149, erf(2) = 0.9953222650189527.
    for (x, want) in [(0.5, 0.5204998778130465), (1.0, 0.8427007929497149), (2.0, 0.9953222650189527)] {
        assert!((erf64(x) - want).abs() < 1e-15, "erf64({x}) = {}", erf64(x));
        assert!((erf64(-x) + want).abs() < 1e-15);
    }
    // erfc(3) = 2.209049699858544e-5, erfc(5) = 1.5374597944280349e-12: the continued-fraction side.
    for (z, want) in [(3.0, 2.209049699858544e-5), (5.0, 1.537_459_794_428_035e-12)] {
        assert!((erfc64(z) / want - 1.0).abs() < 1e-13, "erfc64({z}) = {}", erfc64(z));
    }
}

#[test]
fn relu_forward_and_backward_match_float64() {
    let x = random(1001, -3.0, 3.0, 11);
    let dy = random(1001, -1.0, 1.0, 12);
    // max(x, 0) is exact.
    assert_eq!(run_unary(relu_forward, &x), f32s(x.iter().map(|&v| (v as f64).max(0.0))));
    let dx = run_backward(relu_backward, &x, &dy);
    let loss = |x: &[f64]| x.iter().zip(&dy).map(|(x, g)| x.max(0.0) * *g as f64).sum::<f64>();
    // The kink at 0 is never within h = 1e-6 of these random inputs, so the differences are exact up to f64
    // rounding of the sum (~1e-10 relative to the step).
    check_gradient("relu_backward", &x, &dx, loss, 1001, 1e-6, 1e-6);
    let at_zero = run_backward(relu_backward, &[0.0, -0.0], &[1.0, 1.0]);
    assert_eq!(at_zero, [0.0, 0.0], "torch's threshold_backward gives 0 at x = 0");
    assert!(run_unary(relu_forward, &[f32::NAN])[0].is_nan(), "NaN propagates, as torch.relu");
}

#[test]
fn gelu_forward_and_backward_match_float64() {
    let mut x = random(2001, -6.0, 6.0, 21);
    x.extend([0.0, -8.0, 8.0, -1e-3, 1e-3]);
    let dy = random(x.len(), -1.0, 1.0, 22);
    let want = f32s(x.iter().map(|&v| gelu64(v as f64)));
    // The erfc fit is good to 1.2e-7 relative, but its exp argument (~-z^2, up to -32 at x = -8) is rounded
    // to f32: 32 * 2^-24 = 2e-6 relative error in the left tail. 4e-6 leaves margin; the floor covers values
    // below f32's normal range.
    compare("gelu_forward cpu vs f64", &run_unary(gelu_forward, &x), &want, 4e-6, 1e-30);
    let dx = run_backward(gelu_backward, &x, &dy);
    let loss = |x: &[f64]| x.iter().zip(&dy).map(|(x, g)| gelu64(*x) * *g as f64).sum::<f64>();
    // f32 gelu' (same argument rounding as above) against central differences good to ~1e-9.
    check_gradient("gelu_backward", &x, &dx, loss, 2006, 4e-6, 1e-7);
}

#[test]
fn geglu_splits_value_then_gate_on_odd_sizes() {
    // [3, 5, 2 * 7]: 15 rows, half = 7, as diffusers' GEGLU: value = x[..., :7], gate = x[..., 7:].
    let (rows, half) = (15, 7);
    let x = random(rows * 2 * half, -4.0, 4.0, 31);
    let dy = random(rows * half, -1.0, 1.0, 32);
    let reference = |x: &[f64]| -> Vec<f64> {
        (0..rows * half).map(|i| x[(i / half) * 2 * half + i % half] * gelu64(x[(i / half) * 2 * half + half + i % half])).collect()
    };
    let mut y = Tensor::zeros(&Device::Cpu, &[3, 5, half], DType::F32).unwrap();
    geglu_forward(&cpu(&[3, 5, 2 * half], &x), &mut y).unwrap();
    let want = f32s(reference(&common::f64s(&x)).into_iter());
    // One gelu (4e-6, as above) times one rounded product.
    compare("geglu_forward cpu vs f64", y.f32s().unwrap(), &want, 5e-6, 1e-30);

    let mut dx = Tensor::zeros(&Device::Cpu, &[3, 5, 2 * half], DType::F32).unwrap();
    geglu_backward(&cpu(&[3, 5, 2 * half], &x), &cpu(&[3, 5, half], &dy), &mut dx).unwrap();
    let loss = |x: &[f64]| reference(x).iter().zip(&dy).map(|(y, g)| y * *g as f64).sum::<f64>();
    check_gradient("geglu_backward (value and gate)", &x, dx.f32s().unwrap(), loss, x.len(), 5e-6, 1e-7);

    let mut bad = Tensor::zeros(&Device::Cpu, &[3, 5, 8], DType::F32).unwrap();
    let err = geglu_forward(&cpu(&[3, 5, 2 * half], &x), &mut bad).unwrap_err().to_string();
    assert!(err.contains("geglu_forward") && err.contains("[3, 5, 14]") && err.contains("[3, 5, 8]"), "{err}");
    let mut odd = Tensor::zeros(&Device::Cpu, &[1, 3], DType::F32).unwrap();
    let err = geglu_forward(&cpu(&[1, 7], &x[..7]), &mut odd).unwrap_err().to_string();
    assert!(err.contains("[1, 7]"), "{err}");
    let err = geglu_backward(&cpu(&[3, 5, 2 * half], &x), &cpu(&[3, 5, half], &dy), &mut bad).unwrap_err().to_string();
    assert!(err.contains("geglu_backward"), "{err}");
}

#[test]
fn sigmoid_forward_and_backward_match_float64() {
    let x = random(777, -12.0, 12.0, 41);
    let dy = random(777, -1.0, 1.0, 42);
    let y = run_unary(sigmoid_forward, &x);
    // f32 exp and one division: a few ulp.
    compare("sigmoid_forward cpu vs f64", &y, &f32s(x.iter().map(|&v| sigmoid64(v as f64))), 1e-6, 1e-30);
    // The backward takes the forward's output.
    let dx = run_backward(sigmoid_backward, &y, &dy);
    let loss = |x: &[f64]| x.iter().zip(&dy).map(|(x, g)| sigmoid64(*x) * *g as f64).sum::<f64>();
    // y(1 - y) loses relative accuracy where y rounds near 1 (1 - y cancels): 1e-6 of |dy| absolute.
    check_gradient("sigmoid_backward", &x, &dx, loss, 777, 1e-5, 1e-6);
}

#[test]
fn add_scaled_and_its_backward() {
    let (a, b) = (random(333, -2.0, 2.0, 51), random(333, -2.0, 2.0, 52));
    let s = 0.7f32;
    let mut y = zeros(333);
    add_scaled(&t(&a), &t(&b), s, &mut y).unwrap();
    let want = f32s(a.iter().zip(&b).map(|(&a, &b)| a as f64 + s as f64 * b as f64));
    // Two f32 roundings (product, sum) where f64 rounds once: 2 ulp of the operands' scale.
    compare("add_scaled cpu vs f64", y.f32s().unwrap(), &want, 3e-7, 3e-7);
    let dy = random(333, -1.0, 1.0, 53);
    let (mut da, mut db) = (zeros(333), zeros(333));
    add_scaled_backward(&t(&dy), s, &mut da, &mut db).unwrap();
    let loss_a = |a: &[f64]| a.iter().zip(&b).zip(&dy).map(|((a, b), g)| (a + s as f64 * *b as f64) * *g as f64).sum::<f64>();
    check_gradient("add_scaled_backward da", &a, da.f32s().unwrap(), loss_a, 333, 1e-6, 1e-7);
    let loss_b = |b: &[f64]| b.iter().zip(&a).zip(&dy).map(|((b, a), g)| (*a as f64 + s as f64 * b) * *g as f64).sum::<f64>();
    check_gradient("add_scaled_backward db", &b, db.f32s().unwrap(), loss_b, 333, 1e-6, 1e-7);
    let err = add_scaled(&t(&a), &t(&b[..332]), s, &mut y).unwrap_err().to_string();
    assert!(err.contains("add_scaled") && err.contains("[332]"), "{err}");
}

/// diffusers' get_timestep_embedding, evaluated in float64.
fn timestep_embedding64(t: &[f32], dim: usize, flip: bool, shift: f64) -> Vec<f64> {
    let half = dim / 2;
    let mut out = vec![0.0; t.len() * dim];
    for (row, &t) in out.chunks_mut(dim).zip(t) {
        for k in 0..half {
            let arg = t as f64 * (-(10000f64.ln()) * k as f64 / (half as f64 - shift)).exp();
            let (sin_at, cos_at) = if flip { (half + k, k) } else { (k, half + k) };
            row[sin_at] = arg.sin();
            row[cos_at] = arg.cos();
        }
    }
    out
}

fn embed(t: &[f32], dim: usize, flip: bool, shift: f32) -> Vec<f32> {
    let mut y = Tensor::zeros(&Device::Cpu, &[t.len(), dim], DType::F32).unwrap();
    timestep_embedding(&cpu(&[t.len()], t), flip, shift, &mut y).unwrap();
    y.f32s().unwrap().to_vec()
}

#[test]
fn timestep_embedding_matches_the_formula_in_float64() {
    let t = [0.0, 1.0, 17.0, 250.5, 999.0];
    for (dim, flip, shift) in [(320, true, 0.0), (32, false, 1.0), (7, true, 0.0), (9, false, 1.0)] {
        let got = embed(&t, dim, flip, shift);
        let want = timestep_embedding64(&t, dim, flip, shift as f64);
        // torch's f32 evaluation: the exponent (|e| <= 9.3), exp and t * freq are each rounded, so the angle
        // t * freq is off by up to ~3 * 2^-24 * t * freq (+ |e| t freq 2^-24 <= 0.37 t 2^-24), and sin/cos
        // move by as much: <= 1.6e-4 at t = 999. Bound: 2.4e-7 * (t + 1) per row.
        for (r, &tr) in t.iter().enumerate() {
            let bound = 2.4e-7 * (tr + 1.0);
            let row = r * dim..(r + 1) * dim;
            let want: Vec<f32> = want[row.clone()].iter().map(|&v| v as f32).collect();
            compare(&format!("timestep_embedding dim {dim} flip {flip} t {tr}"), &got[row], &want, 0.0, bound);
        }
        if dim % 2 == 1 {
            assert!(got.chunks(dim).all(|row| row[dim - 1] == 0.0), "odd dims end in a zero column");
        }
    }

    // By hand. dim 4, flip false, shift 1: half = 2, exponents = -ln(1e4) * [0, 1] / (2 - 1) = [0, -9.2103],
    // freqs = [1, 1e-4]; t = 1 gives angles [1, 1e-4] and the row (sin 1, sin 1e-4, cos 1, cos 1e-4)
    // = (0.8414710, 1.0e-4, 0.5403023, 0.99999999).
    let got = embed(&[1.0], 4, false, 1.0);
    for (g, w) in got.iter().zip([0.841_470_96, 1.0e-4, 0.540_302_3, 1.0]) {
        assert!((g - w).abs() < 1e-6, "{got:?}");
    }
    // dim 5, flip true, shift 0: half = 2, exponents = -ln(1e4) * [0, 1] / 2 = [0, -4.6052], freqs = [1, 0.01];
    // t = 2 gives angles [2, 0.02]; flipped to (cos, sin) and padded: (cos 2, cos 0.02, sin 2, sin 0.02, 0)
    // = (-0.4161468, 0.9998000, 0.9092974, 0.0199987, 0).
    let got = embed(&[2.0], 5, true, 0.0);
    for (g, w) in got.iter().zip([-0.416_146_84, 0.999_8, 0.909_297_4, 0.019_998_667, 0.0]) {
        assert!((g - w).abs() < 1e-6, "{got:?}");
    }
}

#[test]
fn timestep_embedding_refuses_bad_shapes() {
    let mut y = Tensor::zeros(&Device::Cpu, &[3, 8], DType::F32).unwrap();
    let err = timestep_embedding(&cpu(&[2], &[1.0, 2.0]), true, 0.0, &mut y).unwrap_err().to_string();
    assert!(err.contains("timestep_embedding") && err.contains("[2]") && err.contains("[3, 8]"), "{err}");
    let mut y = Tensor::zeros(&Device::Cpu, &[1, 2], DType::F32).unwrap();
    let err = timestep_embedding(&cpu(&[1], &[1.0]), true, 1.0, &mut y).unwrap_err().to_string();
    assert!(err.contains("half - freq_shift = 0"), "{err}");
}

#[test]
fn reparameterize_matches_float64_and_central_differences() {
    let n = 37;
    let (mu, logvar, eps) = (random(n, -2.0, 2.0, 31), random(n, -4.0, 2.0, 32), random(n, -2.0, 2.0, 33));
    let mut z = cpu(&[n], &vec![0.0; n]);
    reparameterize_forward(&cpu(&[n], &mu), &cpu(&[n], &logvar), &cpu(&[n], &eps), &mut z).unwrap();
    let want: Vec<f32> = (0..n).map(|i| (mu[i] as f64 + eps[i] as f64 * (0.5 * logvar[i] as f64).exp()) as f32).collect();
    // One f32 exp and one fma-free multiply-add: a few ulp.
    compare("reparameterize_forward", z.f32s().unwrap(), &want, 1e-6, 1e-6);

    let g = random(n, -1.0, 1.0, 34);
    let (mut dmu, mut dlogvar) = (cpu(&[n], &vec![9.0; n]), cpu(&[n], &vec![9.0; n]));
    reparameterize_backward(&cpu(&[n], &logvar), &cpu(&[n], &eps), &cpu(&[n], &g), &mut dmu, &mut dlogvar).unwrap();
    let loss = |mu: &[f64], lv: &[f64]| (0..n).map(|i| (mu[i] + eps[i] as f64 * (0.5 * lv[i]).exp()) * g[i] as f64).sum::<f64>();
    let lv64 = common::f64s(&logvar);
    let mu64 = common::f64s(&mu);
    check_gradient("reparameterize dmu", &mu, dmu.f32s().unwrap(), |m| loss(m, &lv64), n, 1e-6, 1e-7);
    check_gradient("reparameterize dlogvar", &logvar, dlogvar.f32s().unwrap(), |l| loss(&mu64, l), n, 1e-5, 1e-7);
}

#[test]
fn tanh_forward_and_backward_match_float64() {
    let x = grid();
    let dy: Vec<f32> = x.iter().map(|v| 0.7 - v * 0.05).collect();
    let y = run_unary(tanh_forward, &x);
    // libm's f32 tanh is within an ulp or two: 1e-6 relative.
    compare("tanh_forward cpu vs f64", &y, &f32s(x.iter().map(|&v| (v as f64).tanh())), 1e-6, 1e-30);
    let dx = run_backward(tanh_backward, &y, &dy);
    let loss = |x: &[f64]| x.iter().zip(&dy).map(|(x, g)| x.tanh() * *g as f64).sum::<f64>();
    // From the f32 output: 1 - y^2 cancels in the tails (|x| > 8, where y rounds to 1), an absolute error of
    // ~1e-7 |dy|; elsewhere ~1e-6 relative. Central differences in f64 are good to ~1e-9.
    check_gradient("tanh_backward", &x, &dx, loss, 401, 1e-5, 1e-6);
}

#[test]
fn log_and_rsqrt_match_float64_and_central_differences() {
    let x = random(777, 0.05, 20.0, 11); // odd size, positive inputs
    let dy = random(777, -1.0, 1.0, 12);
    let y = run_unary(log_forward, &x);
    // f32 ln is within an ulp of the result (its absolute error near x = 1, where ln is near 0): 1e-6 relative,
    // 1e-7 absolute.
    compare("log_forward cpu vs f64", &y, &f32s(x.iter().map(|&v| (v as f64).ln())), 1e-6, 1e-7);
    let dx = run_backward(log_backward, &x, &dy);
    let loss = |x: &[f64]| x.iter().zip(&dy).map(|(x, g)| x.ln() * *g as f64).sum::<f64>();
    // One f32 division: ~1e-7 relative.
    check_gradient("log_backward", &x, &dx, loss, 777, 1e-5, 1e-6);

    let y = run_unary(rsqrt_forward, &x);
    // sqrt then a division, each correctly rounded: two half-ulps, 2.4e-7 relative; 1e-6 leaves margin.
    compare("rsqrt_forward cpu vs f64", &y, &f32s(x.iter().map(|&v| 1.0 / (v as f64).sqrt())), 1e-6, 1e-30);
    let dx = run_backward(rsqrt_backward, &y, &dy);
    let loss = |x: &[f64]| x.iter().zip(&dy).map(|(x, g)| *g as f64 / x.sqrt()).sum::<f64>();
    // y^3 from the f32 output: ~1e-6 relative.
    check_gradient("rsqrt_backward", &x, &dx, loss, 777, 1e-5, 1e-6);
}

#[test]
fn mul_is_correctly_rounded_and_its_backward_matches_central_differences() {
    let (n, a, b, dy) = (777, random(777, -3.0, 3.0, 21), random(777, -3.0, 3.0, 22), random(777, -1.0, 1.0, 23));
    let mut y = zeros(n);
    mul(&t(&a), &t(&b), &mut y).unwrap();
    // The product of two f32 values is exact in f64, so one f32 rounding makes them equal.
    for ((y, a), b) in y.f32s().unwrap().iter().zip(&a).zip(&b) {
        assert_eq!(*y, (*a as f64 * *b as f64) as f32);
    }
    let (mut da, mut db) = (zeros(n), zeros(n));
    mul_backward(&t(&a), &t(&b), &t(&dy), &mut da, &mut db).unwrap();
    // One f32 product each: correctly rounded, so ~6e-8 relative.
    let loss_a = |a: &[f64]| a.iter().zip(&b).zip(&dy).map(|((a, b), g)| a * *b as f64 * *g as f64).sum::<f64>();
    check_gradient("mul_backward da", &a, da.f32s().unwrap(), loss_a, n, 1e-6, 1e-7);
    let loss_b = |b: &[f64]| b.iter().zip(&a).zip(&dy).map(|((b, a), g)| *a as f64 * b * *g as f64).sum::<f64>();
    check_gradient("mul_backward db", &b, db.f32s().unwrap(), loss_b, n, 1e-6, 1e-7);

    // Bad shapes name the op and the shapes; half dtypes are refused on the CPU.
    let mut short = zeros(5);
    let err = mul(&t(&a), &t(&b), &mut short).unwrap_err().to_string();
    assert!(err.contains("mul: shape [5] does not match [777]"), "{err}");
    let err = mul_backward(&t(&a), &t(&b), &t(&dy), &mut short, &mut db).unwrap_err().to_string();
    assert!(err.contains("mul_backward: shape [5] does not match [777]"), "{err}");
    let err = tanh_forward(&t(&a), &mut short).unwrap_err().to_string();
    assert!(err.contains("tanh_forward: shape [5] does not match [777]"), "{err}");
    let half = Tensor::zeros(&Device::Cpu, &[4], DType::BF16).unwrap();
    let mut half_out = Tensor::zeros(&Device::Cpu, &[4], DType::BF16).unwrap();
    assert!(rsqrt_forward(&half, &mut half_out).unwrap_err().to_string().contains("rsqrt_forward: the CPU backend computes in f32"));
}
