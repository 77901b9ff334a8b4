//! InfoNCE (symmetric NT-Xent) on the CPU against a float64 reference, central differences of it, sanity
//! values and shape errors.

mod common;

use common::{check_gradient, cpu, f64s, random};
use sgdm::ops::infonce::{infonce_backward, infonce_forward, InfoNceActivations, DEFAULT_TEMPERATURE};
use sgdm::{DType, Device, Tensor};

/// CLIP-style symmetric cross-entropy in float64: normalise rows (eps 1e-12), logits = a·bᵀ/τ, mean of the
/// row-wise and column-wise cross-entropies against the diagonal.
fn reference(a: &[f64], b: &[f64], n: usize, d: usize, tau: f64) -> f64 {
    let unit = |x: &[f64]| -> Vec<f64> {
        x.chunks(d)
            .flat_map(|r| {
                let norm = r.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
                r.iter().map(move |v| v / norm).collect::<Vec<_>>()
            })
            .collect()
    };
    let (an, bn) = (unit(a), unit(b));
    let logit = |i: usize, j: usize| (0..d).map(|k| an[i * d + k] * bn[j * d + k]).sum::<f64>() / tau;
    let lse = |v: Vec<f64>| {
        let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        m + v.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
    };
    let mut loss = 0.0;
    for i in 0..n {
        loss += lse((0..n).map(|j| logit(i, j)).collect()) - logit(i, i); // a_i against every b
        loss += lse((0..n).map(|j| logit(j, i)).collect()) - logit(i, i); // b_i against every a
    }
    loss / (2 * n) as f64
}

fn forward(a: &[f32], b: &[f32], n: usize, d: usize, tau: f32) -> (f32, InfoNceActivations) {
    let mut acts = InfoNceActivations::zeros(&Device::Cpu, n, d, DType::F32).unwrap();
    infonce_forward(&cpu(&[n, d], a), &cpu(&[n, d], b), tau, &mut acts).unwrap();
    (acts.loss().unwrap(), acts)
}

// Loss: f32 dot products of unit vectors (D ≤ 512) divided by τ ≥ 0.07 carry ~1e-6 absolute error into
// logits of size ≤ 15, and the log-sum-exps add a few ulps: 1e-5 relative plus 2e-5 absolute.
const LOSS_REL: f64 = 1e-5;
const LOSS_ABS: f64 = 2e-5;

#[test]
fn forward_matches_float64_for_odd_sizes_and_temperatures() {
    for (n, d) in [(1, 3), (5, 3), (5, 512), (7, 33)] {
        for tau in [DEFAULT_TEMPERATURE, 0.3, 1.0] {
            let a = random(n * d, -1.0, 1.0, 1 + n as u64);
            // b correlated with a, so the diagonal matters without saturating the softmax
            let b: Vec<f32> = a.iter().zip(random(n * d, -1.0, 1.0, 2)).map(|(a, r)| a + 0.8 * r).collect();
            let (got, _) = forward(&a, &b, n, d, tau);
            let want = reference(&f64s(&a), &f64s(&b), n, d, tau as f64);
            let err = (got as f64 - want).abs();
            println!("infonce B{n} D{d} tau {tau}: {got} vs {want} (err {err:.2e})");
            assert!(err <= LOSS_REL * want.abs() + LOSS_ABS, "B{n} D{d} tau {tau}: got {got}, want {want}");
        }
    }
}

#[test]
fn backward_matches_central_differences() {
    // The analytic f32 gradient (softmax differences, a GEMM, the projection of the normalisation) carries
    // ~1e-6 relative error; the float64 central differences are accurate to ~1e-9. Gradients scale with
    // 1/τ, so the floor does too. D = 512 runs at τ = 0.3: at 0.07 its softmax saturates (loss ~1e-4) and
    // the check would compare near-zero numbers.
    for (n, d, tau) in [(5, 3, DEFAULT_TEMPERATURE), (1, 3, 0.5), (5, 512, 0.3), (4, 7, 1.0)] {
        let a = random(n * d, -1.0, 1.0, 10 + d as u64);
        let b: Vec<f32> = a.iter().zip(random(n * d, -1.0, 1.0, 11)).map(|(a, r)| a + r).collect();
        let dloss = 0.75;
        let (_, mut acts) = forward(&a, &b, n, d, tau);
        let (mut da, mut db) = (cpu(&[n, d], &vec![f32::NAN; n * d]), cpu(&[n, d], &vec![f32::NAN; n * d]));
        infonce_backward(&mut acts, dloss, &mut da, &mut db).unwrap();
        let (a64, b64) = (f64s(&a), f64s(&b));
        let tau64 = tau as f64;
        let abs = 1e-5 / tau64;
        check_gradient(&format!("infonce da B{n} D{d} tau {tau}"), &a, da.f32s().unwrap(), |x| 0.75 * reference(x, &b64, n, d, tau64), 60, 1e-4, abs);
        check_gradient(&format!("infonce db B{n} D{d} tau {tau}"), &b, db.f32s().unwrap(), |x| 0.75 * reference(&a64, x, n, d, tau64), 60, 1e-4, abs);
    }
}

#[test]
fn aligned_batches_give_a_loss_near_zero_and_unrelated_ones_about_ln_b() {
    let (n, d) = (16, 512);
    // Identical rows in high dimension are nearly orthogonal to the other rows (|cos| ~ 0.05): at τ = 0.01
    // every off-diagonal logit is ~95 below the diagonal.
    let a = random(n * d, -1.0, 1.0, 20);
    let (aligned, _) = forward(&a, &a, n, d, 0.01);
    assert!(aligned < 1e-6, "aligned batches: loss {aligned}");
    // Exactly orthogonal batches (disjoint basis vectors): all logits are 0, so the loss is ln B exactly.
    let basis = |offset: usize| -> Vec<f32> {
        let mut v = vec![0.0; n * d];
        for i in 0..n {
            v[i * d + offset + i] = 1.0;
        }
        v
    };
    let (orthogonal, _) = forward(&basis(0), &basis(n), n, d, DEFAULT_TEMPERATURE);
    assert!((orthogonal - (n as f32).ln()).abs() < 1e-6, "orthogonal batches: loss {orthogonal}, ln B {}", (n as f32).ln());
    // Independent random batches at τ = 1: logits are within ±0.2 of 0, so the loss is within 0.2 of ln B.
    let (random_pair, _) = forward(&a, &random(n * d, -1.0, 1.0, 21), n, d, 1.0);
    assert!((random_pair - (n as f32).ln()).abs() < 0.2, "random batches: loss {random_pair}, ln B {}", (n as f32).ln());
    println!("aligned {aligned:.2e}, orthogonal {orthogonal} (ln {n} = {}), random {random_pair}", (n as f32).ln());
}

#[test]
fn a_zero_row_is_clamped_like_f_normalize_and_stays_finite() {
    let (n, d) = (3, 4);
    let mut a = random(n * d, -1.0, 1.0, 30);
    a[d..2 * d].fill(0.0);
    let b = random(n * d, -1.0, 1.0, 31);
    let (loss, mut acts) = forward(&a, &b, n, d, 0.5);
    let want = reference(&f64s(&a), &f64s(&b), n, d, 0.5);
    assert!((loss as f64 - want).abs() < 1e-5, "loss {loss}, want {want}");
    let (mut da, mut db) = (cpu(&[n, d], &vec![0.0; n * d]), cpu(&[n, d], &vec![0.0; n * d]));
    infonce_backward(&mut acts, 1.0, &mut da, &mut db).unwrap();
    assert!(da.f32s().unwrap().iter().chain(db.f32s().unwrap()).all(|v| v.is_finite()));
}

fn error_of(r: anyhow::Result<()>) -> String {
    format!("{:#}", r.expect_err("expected an error"))
}

#[test]
fn bad_shapes_and_temperatures_are_errors_naming_the_op() {
    let dev = Device::Cpu;
    let z = |s: &[usize]| Tensor::zeros(&dev, s, DType::F32).unwrap();
    let mut acts = InfoNceActivations::zeros(&dev, 4, 8, DType::F32).unwrap();
    let e = error_of(infonce_forward(&z(&[4, 8]), &z(&[4, 9]), 0.07, &mut acts));
    assert!(e.contains("infonce_forward") && e.contains("[4, 9]") && e.contains("[4, 8]"), "{e}");
    let e = error_of(infonce_forward(&z(&[32]), &z(&[32]), 0.07, &mut acts));
    assert!(e.contains("infonce_forward") && e.contains("[32]"), "{e}");
    let e = error_of(infonce_forward(&z(&[5, 8]), &z(&[5, 8]), 0.07, &mut acts));
    assert!(e.contains("infonce_forward") && e.contains("activations") && e.contains("[5, 8]"), "{e}");
    let e = error_of(infonce_forward(&z(&[4, 8]), &z(&[4, 8]), 0.0, &mut acts));
    assert!(e.contains("infonce_forward") && e.contains("temperature"), "{e}");
    let e = error_of(infonce_forward(&z(&[0, 8]), &z(&[0, 8]), 0.07, &mut acts));
    assert!(e.contains("infonce_forward") && e.contains("[0, 8]"), "{e}");
    infonce_forward(&z(&[4, 8]), &z(&[4, 8]), 0.07, &mut acts).unwrap();
    let e = error_of(infonce_backward(&mut acts, 1.0, &mut z(&[4, 7]), &mut z(&[4, 8])));
    assert!(e.contains("infonce_backward") && e.contains("da") && e.contains("[4, 7]"), "{e}");
    let e = error_of(infonce_backward(&mut acts, 1.0, &mut z(&[4, 8]), &mut z(&[8, 4])));
    assert!(e.contains("infonce_backward") && e.contains("db") && e.contains("[8, 4]"), "{e}");
}
