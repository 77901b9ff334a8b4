//! The CPU GroupNorm (+ fused SiLU) and LayerNorm against float64 references: forward values and statistics,
//! every gradient against central differences, `+=` on parameter grads, and shape errors that name the op.
//! (tests/cuda_parity/norm.rs holds CUDA to this CPU reference.)

mod common;

use common::{check_gradient, compare, cpu, random};
use sgdm::ops::norm::{
    group_norm_backward, group_norm_forward, group_norm_scratch_shape, layer_norm_backward, layer_norm_forward, layer_norm_scratch_shape, Affine,
    GroupNorm, NormGrads, Stats, StatsMut,
};
use sgdm::{DType, Device, Tensor};

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(&Device::Cpu, shape, DType::F32).unwrap()
}

fn sigmoid64(v: f64) -> f64 {
    1.0 / (1.0 + (-v).exp())
}

/// Float64 GroupNorm (+ SiLU): returns y, and the per-(batch, group) mean and rstd.
fn group_norm64(x: &[f64], w: &[f64], b: &[f64], shape: &[usize], gn: GroupNorm) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (c, hw) = (shape[1], shape[2..].iter().product::<usize>());
    let len = c / gn.groups * hw;
    let (mut y, mut means, mut rstds) = (vec![0.0; x.len()], vec![], vec![]);
    for (ng, xg) in x.chunks(len).enumerate() {
        let mean = xg.iter().sum::<f64>() / len as f64;
        let var = xg.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / len as f64;
        let rstd = 1.0 / (var + gn.eps as f64).sqrt();
        for (i, v) in xg.iter().enumerate() {
            let ch = (ng % gn.groups) * (c / gn.groups) + i / hw;
            let h = (v - mean) * rstd * w[ch] + b[ch];
            y[ng * len + i] = if gn.silu { h * sigmoid64(h) } else { h };
        }
        means.push(mean);
        rstds.push(rstd);
    }
    (y, means, rstds)
}

/// Float64 LayerNorm over the last dimension `d`: returns y, mean, rstd per row.
fn layer_norm64(x: &[f64], w: &[f64], b: &[f64], d: usize, eps: f32) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut y, mut means, mut rstds) = (vec![], vec![], vec![]);
    for xr in x.chunks(d) {
        let mean = xr.iter().sum::<f64>() / d as f64;
        let var = xr.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        y.extend(xr.iter().zip(w).zip(b).map(|((v, w), b)| (v - mean) * rstd * w + b));
        means.push(mean);
        rstds.push(rstd);
    }
    (y, means, rstds)
}

fn to32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&v| v as f32).collect()
}

fn dot(a: &[f64], g: &[f32]) -> f64 {
    a.iter().zip(g).map(|(a, g)| a * *g as f64).sum()
}

/// The shapes the brief names: 3 groups over 6 channels of a 7x9 image at batch 1, SD's 32 groups over 96
/// channels, and a batch of 2 so groups of different samples must not mix.
fn group_norm_cases() -> Vec<(Vec<usize>, usize)> {
    vec![(vec![1, 6, 7, 9], 3), (vec![1, 96, 7, 9], 32), (vec![2, 96, 4, 4], 32), (vec![2, 5, 11], 5)]
}

struct GnRun {
    y: Vec<f32>,
    mean: Tensor,
    rstd: Tensor,
}

fn run_group_norm(gn: GroupNorm, shape: &[usize], x: &[f32], w: &[f32], b: &[f32]) -> GnRun {
    let stats_shape = [shape[0], gn.groups];
    let (mut y, mut mean, mut rstd) = (zeros(shape), zeros(&stats_shape), zeros(&stats_shape));
    let (wt, bt) = (cpu(&[w.len()], w), cpu(&[b.len()], b));
    let stats = StatsMut { mean: &mut mean, rstd: &mut rstd };
    group_norm_forward(gn, &cpu(shape, x), Affine { weight: &wt, bias: &bt }, &mut y, stats).unwrap();
    GnRun { y: y.f32s().unwrap().to_vec(), mean, rstd }
}

#[test]
fn group_norm_forward_matches_float64() {
    for (shape, groups) in group_norm_cases() {
        let (n, c) = (shape[0], shape[1]);
        let numel: usize = shape.iter().product();
        // An offset mean (uniform on [-3, 5)) so that centring matters.
        let x = random(numel, -3.0, 5.0, 1);
        let (w, b) = (random(c, 0.5, 1.5, 2), random(c, -0.5, 0.5, 3));
        for eps in [1e-5, 1e-6] {
            for silu in [false, true] {
                let gn = GroupNorm { groups, eps, silu };
                let run = run_group_norm(gn, &shape, &x, &w, &b);
                let (y64, mean64, rstd64) = group_norm64(&common::f64s(&x), &common::f64s(&w), &common::f64s(&b), &shape, gn);
                let what = format!("group_norm {shape:?} g{groups} eps{eps:e} silu={silu}");
                // f32 arithmetic on O(1) values after f64 statistics: a few ulp of |y| <= 4, so 1e-5 relative
                // plus 2e-6 absolute for outputs near zero.
                compare(&format!("{what} y"), &run.y, &to32(&y64), 1e-5, 2e-6);
                // Statistics are f64 sums rounded once to f32.
                compare(&format!("{what} mean"), run.mean.f32s().unwrap(), &to32(&mean64), 1e-6, 1e-7);
                compare(&format!("{what} rstd"), run.rstd.f32s().unwrap(), &to32(&rstd64), 1e-6, 0.0);
                assert_eq!(run.mean.shape(), &[n, groups]);
            }
        }
    }
}

#[test]
fn group_norm_statistics_are_stable_for_a_large_mean() {
    // x = 1000 + U[-1, 1): a one-pass E[x^2] - E[x]^2 in f32 loses the variance (0.33 against 1e6); the
    // two-pass f64 statistics keep it. What remains is storing the mean in f32 (ulp(1000) / 2 = 3e-5), which
    // moves the normalised values (std 0.58) by up to 3e-5 / 0.58 = 5e-5: hence the 1e-4 floor.
    let shape = [1, 6, 7, 9];
    let x: Vec<f32> = random(378, -1.0, 1.0, 4).iter().map(|v| v + 1000.0).collect();
    let (w, b) = (vec![1.0; 6], vec![0.0; 6]);
    let gn = GroupNorm { groups: 3, eps: 1e-6, silu: false };
    let run = run_group_norm(gn, &shape, &x, &w, &b);
    let (y64, _, rstd64) = group_norm64(&common::f64s(&x), &common::f64s(&w), &common::f64s(&b), &shape, gn);
    compare("group_norm mean 1000 y", &run.y, &to32(&y64), 0.0, 1e-4);
    compare("group_norm mean 1000 rstd", run.rstd.f32s().unwrap(), &to32(&rstd64), 1e-6, 0.0);
}

/// Runs the GroupNorm backward on `dy` into the given grads (dweight/dbias accumulate).
fn run_group_norm_backward(
    gn: GroupNorm,
    shape: &[usize],
    x: &[f32],
    w: &[f32],
    b: &[f32],
    dy: &[f32],
    dx: &mut Tensor,
    dw: &mut Tensor,
    db: &mut Tensor,
) {
    let run = run_group_norm(gn, shape, x, w, b);
    let (wt, bt) = (cpu(&[w.len()], w), cpu(&[b.len()], b));
    let mut scratch = zeros(&group_norm_scratch_shape(shape));
    group_norm_backward(
        gn,
        &cpu(shape, x),
        Affine { weight: &wt, bias: &bt },
        Stats { mean: &run.mean, rstd: &run.rstd },
        &cpu(shape, dy),
        NormGrads { dx, dweight: dw, dbias: db, scratch: &mut scratch },
    )
    .unwrap();
}

#[test]
fn group_norm_backward_matches_central_differences() {
    for (shape, groups) in group_norm_cases() {
        let c = shape[1];
        let numel: usize = shape.iter().product();
        let x = random(numel, -3.0, 5.0, 5);
        let (w, b) = (random(c, 0.5, 1.5, 6), random(c, -0.5, 0.5, 7));
        let dy = random(numel, -1.0, 1.0, 8);
        for (eps, silu) in [(1e-5, false), (1e-5, true), (1e-6, true)] {
            let gn = GroupNorm { groups, eps, silu };
            let (mut dx, mut dw, mut db) = (zeros(&shape), zeros(&[c]), zeros(&[c]));
            run_group_norm_backward(gn, &shape, &x, &w, &b, &dy, &mut dx, &mut dw, &mut db);
            let (x64, w64, b64) = (common::f64s(&x), common::f64s(&w), common::f64s(&b));
            let what = format!("group_norm {shape:?} g{groups} eps{eps:e} silu={silu}");
            // The loss is sum(y * dy) in f64, so its gradient is the backward with that dy. The analytic side
            // is f32 (about 1e-6 relative, after the cancellation in dx = rstd (dxhat - m1 - xhat m2) up to
            // 1e-6 of the largest term); differences with h = 1e-6 in f64 are good to ~1e-8.
            let loss_x = |x: &[f64]| dot(&group_norm64(x, &w64, &b64, &shape, gn).0, &dy);
            check_gradient(&format!("{what} dx"), &x, dx.f32s().unwrap(), loss_x, 60, 1e-4, 2e-5);
            let loss_w = |w: &[f64]| dot(&group_norm64(&x64, w, &b64, &shape, gn).0, &dy);
            check_gradient(&format!("{what} dweight"), &w, dw.f32s().unwrap(), loss_w, c, 1e-4, 2e-5);
            let loss_b = |b: &[f64]| dot(&group_norm64(&x64, &w64, b, &shape, gn).0, &dy);
            check_gradient(&format!("{what} dbias"), &b, db.f32s().unwrap(), loss_b, c, 1e-4, 2e-5);
        }
    }
}

#[test]
fn group_norm_backward_writes_dx_and_accumulates_parameter_grads() {
    let (shape, groups) = (vec![2, 6, 7, 9], 3);
    let numel: usize = shape.iter().product();
    let (x, dy) = (random(numel, -2.0, 2.0, 9), random(numel, -1.0, 1.0, 10));
    let (w, b) = (random(6, 0.5, 1.5, 11), random(6, -0.5, 0.5, 12));
    let gn = GroupNorm { groups, eps: 1e-5, silu: true };
    let (mut dx, mut dw, mut db) = (zeros(&shape), zeros(&[6]), zeros(&[6]));
    run_group_norm_backward(gn, &shape, &x, &w, &b, &dy, &mut dx, &mut dw, &mut db);
    let (dx1, dw1, db1) = (dx.to_f32_vec().unwrap(), dw.to_f32_vec().unwrap(), db.to_f32_vec().unwrap());

    let start = random(6, -1.0, 1.0, 13);
    let mut dx = cpu(&shape, &vec![123.0; numel]);
    let (mut dw, mut db) = (cpu(&[6], &start), cpu(&[6], &start));
    run_group_norm_backward(gn, &shape, &x, &w, &b, &dy, &mut dx, &mut dw, &mut db);
    run_group_norm_backward(gn, &shape, &x, &w, &b, &dy, &mut dx, &mut dw, &mut db);
    assert_eq!(dx.f32s().unwrap(), &dx1[..], "dx is written, not accumulated, and deterministic");
    let twice = |g: &[f32]| -> Vec<f32> { start.iter().zip(g).map(|(s, g)| s + 2.0 * g).collect() };
    // Two f32 additions onto the starting value: a couple of ulp.
    compare("group_norm dweight += twice", dw.f32s().unwrap(), &twice(&dw1), 1e-6, 1e-6);
    compare("group_norm dbias += twice", db.f32s().unwrap(), &twice(&db1), 1e-6, 1e-6);
}

fn run_layer_norm(eps: f32, shape: &[usize], x: &[f32], w: &[f32], b: &[f32]) -> (Vec<f32>, Tensor, Tensor) {
    let rows = x.len() / shape[shape.len() - 1];
    let (mut y, mut mean, mut rstd) = (zeros(shape), zeros(&[rows]), zeros(&[rows]));
    let (wt, bt) = (cpu(&[w.len()], w), cpu(&[b.len()], b));
    let stats = StatsMut { mean: &mut mean, rstd: &mut rstd };
    layer_norm_forward(eps, &cpu(shape, x), Affine { weight: &wt, bias: &bt }, &mut y, stats).unwrap();
    (y.f32s().unwrap().to_vec(), mean, rstd)
}

/// Odd feature counts (37), SD's 320, and 70 rows so the backward spans several partial-sum blocks.
fn layer_norm_cases() -> Vec<Vec<usize>> {
    vec![vec![1, 3, 37], vec![2, 5, 320], vec![70, 40], vec![9]]
}

#[test]
fn layer_norm_forward_matches_float64() {
    for shape in layer_norm_cases() {
        let d = shape[shape.len() - 1];
        let x = random(shape.iter().product(), -3.0, 5.0, 14);
        let (w, b) = (random(d, 0.5, 1.5, 15), random(d, -0.5, 0.5, 16));
        for eps in [1e-5, 1e-6] {
            let (y, mean, rstd) = run_layer_norm(eps, &shape, &x, &w, &b);
            let (y64, mean64, rstd64) = layer_norm64(&common::f64s(&x), &common::f64s(&w), &common::f64s(&b), d, eps);
            let what = format!("layer_norm {shape:?} eps{eps:e}");
            // As for GroupNorm: f32 arithmetic on O(1) values after f64 statistics.
            compare(&format!("{what} y"), &y, &to32(&y64), 1e-5, 2e-6);
            compare(&format!("{what} mean"), mean.f32s().unwrap(), &to32(&mean64), 1e-6, 1e-7);
            compare(&format!("{what} rstd"), rstd.f32s().unwrap(), &to32(&rstd64), 1e-6, 0.0);
        }
    }
}

fn run_layer_norm_backward(shape: &[usize], x: &[f32], w: &[f32], b: &[f32], dy: &[f32], grads: (&mut Tensor, &mut Tensor, &mut Tensor)) {
    let (_, mean, rstd) = run_layer_norm(1e-5, shape, x, w, b);
    let mut scratch = zeros(&layer_norm_scratch_shape(shape));
    let (dx, dweight, dbias) = grads;
    layer_norm_backward(
        &cpu(shape, x),
        &cpu(&[w.len()], w),
        Stats { mean: &mean, rstd: &rstd },
        &cpu(shape, dy),
        NormGrads { dx, dweight, dbias, scratch: &mut scratch },
    )
    .unwrap();
}

#[test]
fn layer_norm_backward_matches_central_differences() {
    for shape in layer_norm_cases() {
        let d = shape[shape.len() - 1];
        let numel: usize = shape.iter().product();
        let x = random(numel, -3.0, 5.0, 17);
        let (w, b) = (random(d, 0.5, 1.5, 18), random(d, -0.5, 0.5, 19));
        let dy = random(numel, -1.0, 1.0, 20);
        let (mut dx, mut dw, mut db) = (zeros(&shape), zeros(&[d]), zeros(&[d]));
        run_layer_norm_backward(&shape, &x, &w, &b, &dy, (&mut dx, &mut dw, &mut db));
        let (x64, w64, b64) = (common::f64s(&x), common::f64s(&w), common::f64s(&b));
        let what = format!("layer_norm {shape:?}");
        // Same reasoning and bounds as the GroupNorm gradients.
        let loss_x = |x: &[f64]| dot(&layer_norm64(x, &w64, &b64, d, 1e-5).0, &dy);
        check_gradient(&format!("{what} dx"), &x, dx.f32s().unwrap(), loss_x, 60, 1e-4, 2e-5);
        let loss_w = |w: &[f64]| dot(&layer_norm64(&x64, w, &b64, d, 1e-5).0, &dy);
        check_gradient(&format!("{what} dweight"), &w, dw.f32s().unwrap(), loss_w, 40, 1e-4, 2e-5);
        let loss_b = |b: &[f64]| dot(&layer_norm64(&x64, &w64, b, d, 1e-5).0, &dy);
        check_gradient(&format!("{what} dbias"), &b, db.f32s().unwrap(), loss_b, 40, 1e-4, 2e-5);
    }
}

#[test]
fn layer_norm_backward_writes_dx_and_accumulates_parameter_grads() {
    let (shape, d) = (vec![70, 40], 40);
    let (x, dy) = (random(2800, -2.0, 2.0, 21), random(2800, -1.0, 1.0, 22));
    let (w, b) = (random(d, 0.5, 1.5, 23), random(d, -0.5, 0.5, 24));
    let (mut dx, mut dw, mut db) = (zeros(&shape), zeros(&[d]), zeros(&[d]));
    run_layer_norm_backward(&shape, &x, &w, &b, &dy, (&mut dx, &mut dw, &mut db));
    let (dx1, dw1, db1) = (dx.to_f32_vec().unwrap(), dw.to_f32_vec().unwrap(), db.to_f32_vec().unwrap());

    let start = random(d, -1.0, 1.0, 25);
    let mut dx = cpu(&shape, &[-7.0; 2800]);
    let (mut dw, mut db) = (cpu(&[d], &start), cpu(&[d], &start));
    run_layer_norm_backward(&shape, &x, &w, &b, &dy, (&mut dx, &mut dw, &mut db));
    run_layer_norm_backward(&shape, &x, &w, &b, &dy, (&mut dx, &mut dw, &mut db));
    assert_eq!(dx.f32s().unwrap(), &dx1[..], "dx is written, not accumulated, and deterministic");
    let twice = |g: &[f32]| -> Vec<f32> { start.iter().zip(g).map(|(s, g)| s + 2.0 * g).collect() };
    // Two f32 additions onto the starting value: a couple of ulp.
    compare("layer_norm dweight += twice", dw.f32s().unwrap(), &twice(&dw1), 1e-6, 1e-6);
    compare("layer_norm dbias += twice", db.f32s().unwrap(), &twice(&db1), 1e-6, 1e-6);
}

fn err<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.unwrap_err())
}

#[test]
fn bad_shapes_are_errors_that_name_the_op_and_shapes() {
    let shape = [1, 6, 7, 9];
    let x = zeros(&shape);
    let (w6, b6, w5) = (zeros(&[6]), zeros(&[6]), zeros(&[5]));
    let (mut y, mut mean, mut rstd) = (zeros(&shape), zeros(&[1, 4]), zeros(&[1, 4]));

    let gn4 = GroupNorm { groups: 4, eps: 1e-5, silu: true };
    let e = err(group_norm_forward(gn4, &x, Affine { weight: &w6, bias: &b6 }, &mut y, StatsMut { mean: &mut mean, rstd: &mut rstd }));
    assert!(e.contains("group_norm_forward") && e.contains("4 groups do not divide the 6 channels of x [1, 6, 7, 9]"), "{e}");

    let gn3 = GroupNorm { groups: 3, eps: 1e-5, silu: false };
    let (mut mean, mut rstd) = (zeros(&[1, 3]), zeros(&[1, 3]));
    let e = err(group_norm_forward(gn3, &x, Affine { weight: &w5, bias: &b6 }, &mut y, StatsMut { mean: &mut mean, rstd: &mut rstd }));
    assert!(e.contains("group_norm_forward: weight [5] does not match x [1, 6, 7, 9] (expected [6])"), "{e}");

    let mut wrong_stats = zeros(&[3]);
    let e = err(group_norm_forward(gn3, &x, Affine { weight: &w6, bias: &b6 }, &mut y, StatsMut { mean: &mut wrong_stats, rstd: &mut rstd }));
    assert!(e.contains("group_norm_forward: mean [3] does not match x [1, 6, 7, 9] (expected [1, 3])"), "{e}");

    let (mut dx, mut dw, mut db, mut scratch) = (zeros(&shape), zeros(&[6]), zeros(&[6]), zeros(&[2, 1, 5]));
    let stats = Stats { mean: &mean, rstd: &rstd };
    let grads = NormGrads { dx: &mut dx, dweight: &mut dw, dbias: &mut db, scratch: &mut scratch };
    let e = err(group_norm_backward(gn3, &x, Affine { weight: &w6, bias: &b6 }, stats, &x, grads));
    assert!(e.contains("group_norm_backward: scratch [2, 1, 5] does not match x [1, 6, 7, 9] (expected [2, 1, 6])"), "{e}");

    let e = err(group_norm_forward(gn3, &zeros(&[6]), Affine { weight: &w6, bias: &b6 }, &mut y, StatsMut { mean: &mut mean, rstd: &mut rstd }));
    assert!(e.contains("group_norm_forward: x [6] is not [N, C, spatial...]"), "{e}");

    let half = Tensor::zeros(&Device::Cpu, &shape, DType::BF16).unwrap();
    let e = err(group_norm_forward(gn3, &half, Affine { weight: &w6, bias: &b6 }, &mut y, StatsMut { mean: &mut mean, rstd: &mut rstd }));
    assert!(e.contains("group_norm_forward") && e.contains("mixed dtypes"), "{e}");

    let xl = zeros(&[4, 40]);
    let (mut yl, mut ml, mut rl) = (zeros(&[4, 40]), zeros(&[4]), zeros(&[4]));
    let e = err(layer_norm_forward(1e-5, &xl, Affine { weight: &w6, bias: &b6 }, &mut yl, StatsMut { mean: &mut ml, rstd: &mut rl }));
    assert!(e.contains("layer_norm_forward: weight [6] does not match x [4, 40] (expected [40])"), "{e}");

    let (w40, mut dxl, mut dwl, mut dbl, mut sl) = (zeros(&[40]), zeros(&[4, 40]), zeros(&[40]), zeros(&[40]), zeros(&[2, 1, 40]));
    let e = err(layer_norm_backward(
        &xl,
        &w40,
        Stats { mean: &ml, rstd: &rl },
        &zeros(&[4, 41]),
        NormGrads { dx: &mut dxl, dweight: &mut dwl, dbias: &mut dbl, scratch: &mut sl },
    ));
    assert!(e.contains("layer_norm_backward: dy [4, 41] does not match x [4, 40] (expected [4, 40])"), "{e}");

    let e = err(layer_norm_forward(-1.0, &xl, Affine { weight: &w40, bias: &w40 }, &mut yl, StatsMut { mean: &mut ml, rstd: &mut rl }));
    assert!(e.contains("layer_norm_forward: eps must be finite and non-negative, got -1"), "{e}");
}
