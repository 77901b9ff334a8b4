//! Matmul and Linear on the CPU against float64 references and central differences.

mod common;

use common::{check_gradient, compare, cpu, random};
use sgdm::ops::linear::{linear_backward, linear_forward, matmul, MatmulSpec};

/// Naive float64 `op(a) · op(b)` for one matrix.
fn matmul64(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, ta: bool, tb: bool) -> Vec<f64> {
    let mut c = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            for p in 0..k {
                let av = if ta { a[p * m + i] } else { a[i * k + p] };
                let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                c[i * n + j] += av as f64 * bv as f64;
            }
        }
    }
    c
}

fn to32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

// f32 sums of K <= 70 products of values in [-1, 1): rounding error well under 1e-5 of the result scale.
const REL: f32 = 1e-5;
const FLOOR: f32 = 1e-5;

#[test]
fn matmul_matches_float64_for_every_transpose_batched_and_accumulating() {
    let (batch, m, n, k) = (3, 7, 5, 9);
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let a = random(batch * m * k, -1.0, 1.0, 1);
        let b = random(batch * k * n, -1.0, 1.0, 2);
        let a_shape = if ta { [batch, k, m] } else { [batch, m, k] };
        let b_shape = if tb { [batch, n, k] } else { [batch, k, n] };
        let c0 = random(batch * m * n, -1.0, 1.0, 3);
        let mut c = cpu(&[batch, m, n], &c0);
        let spec = MatmulSpec { trans_a: ta, trans_b: tb, alpha: 0.5, accumulate: true };
        matmul(&cpu(&a_shape, &a), &cpu(&b_shape, &b), &mut c, spec).unwrap();
        let mut want = Vec::new();
        for i in 0..batch {
            let r = matmul64(&a[i * m * k..(i + 1) * m * k], &b[i * k * n..(i + 1) * k * n], m, n, k, ta, tb);
            want.extend(r.iter().zip(&c0[i * m * n..]).map(|(r, c)| (0.5 * r + *c as f64) as f32));
        }
        compare(&format!("matmul ta={ta} tb={tb} (+=)"), c.f32s().unwrap(), &want, REL, FLOOR);
    }
}

#[test]
fn linear_forward_matches_float64_with_and_without_bias() {
    let (rows, k, n) = (2 * 7, 9, 5); // [2, 7, 9] input: leading dimensions are flattened
    let x = random(rows * k, -1.0, 1.0, 4);
    let w = random(n * k, -1.0, 1.0, 5);
    let b = random(n, -1.0, 1.0, 6);
    let want = matmul64(&x, &w, rows, n, k, false, true);
    let mut y = cpu(&[2, 7, n], &vec![9.0; rows * n]);
    linear_forward(&cpu(&[2, 7, k], &x), &cpu(&[n, k], &w), None, &mut y).unwrap();
    compare("linear_forward", y.f32s().unwrap(), &to32(&want), REL, FLOOR);
    linear_forward(&cpu(&[2, 7, k], &x), &cpu(&[n, k], &w), Some(&cpu(&[n], &b)), &mut y).unwrap();
    let with_bias: Vec<f32> = want.iter().enumerate().map(|(i, v)| (v + b[i % n] as f64) as f32).collect();
    compare("linear_forward + bias", y.f32s().unwrap(), &with_bias, REL, FLOOR);
}

#[test]
fn linear_backward_matches_central_differences_and_accumulates_parameter_grads() {
    let (m, k, n) = (6, 4, 3);
    let x = random(m * k, -1.0, 1.0, 7);
    let w = random(n * k, -1.0, 1.0, 8);
    let b = random(n, -1.0, 1.0, 9);
    let g = random(m * n, -1.0, 1.0, 10); // dL/dy for L = sum(y * g)
    let loss = |x: &[f64], w: &[f64], b: &[f64]| {
        let mut l = 0.0;
        for i in 0..m {
            for j in 0..n {
                let y: f64 = (0..k).map(|p| x[i * k + p] * w[j * k + p]).sum::<f64>() + b[j];
                l += y * g[i * n + j] as f64;
            }
        }
        l
    };
    let f64s = common::f64s;
    let prior_dw = random(n * k, -1.0, 1.0, 11);
    let prior_db = random(n, -1.0, 1.0, 12);
    let mut dx = cpu(&[m, k], &vec![7.0; m * k]);
    let mut dw = cpu(&[n, k], &prior_dw);
    let mut db = cpu(&[n], &prior_db);
    linear_backward(&cpu(&[m, k], &x), &cpu(&[n, k], &w), &cpu(&[m, n], &g), Some(&mut dx), Some(&mut dw), Some(&mut db)).unwrap();
    // L is linear in each argument, so central differences are exact up to f64 rounding; f32 GEMM rounding
    // of sums of 3..6 terms is the error left.
    check_gradient("linear dx", &x, dx.f32s().unwrap(), |xs| loss(xs, &f64s(&w), &f64s(&b)), 64, 1e-5, 1e-5);
    let dw_new: Vec<f32> = dw.f32s().unwrap().iter().zip(&prior_dw).map(|(a, p)| a - p).collect();
    check_gradient("linear dw (+=)", &w, &dw_new, |ws| loss(&f64s(&x), ws, &f64s(&b)), 64, 1e-5, 1e-5);
    let db_new: Vec<f32> = db.f32s().unwrap().iter().zip(&prior_db).map(|(a, p)| a - p).collect();
    check_gradient("linear db (+=)", &b, &db_new, |bs| loss(&f64s(&x), &f64s(&w), bs), 64, 1e-5, 1e-5);
}

#[test]
fn bad_shapes_are_errors_naming_the_op_and_shapes() {
    let mut c = cpu(&[2, 2], &[0.0; 4]);
    let err = matmul(&cpu(&[2, 3], &[0.0; 6]), &cpu(&[2, 2], &[0.0; 4]), &mut c, MatmulSpec::default()).unwrap_err();
    assert!(err.to_string().starts_with("matmul: shapes a [2, 3]"), "{err}");
    let err = matmul(&cpu(&[3], &[0.0; 3]), &cpu(&[3, 2], &[0.0; 6]), &mut c, MatmulSpec::default()).unwrap_err();
    assert!(err.to_string().contains("at least 2 dimensions"), "{err}");
    let mut y = cpu(&[2, 4], &[0.0; 8]);
    let err = linear_forward(&cpu(&[2, 3], &[0.0; 6]), &cpu(&[4, 5], &[0.0; 20]), None, &mut y).unwrap_err();
    assert!(err.to_string().contains("linear_forward: expected a last dimension of 5, got shape [2, 3]"), "{err}");
    let err = linear_forward(&cpu(&[2, 5], &[0.0; 10]), &cpu(&[4, 5], &[0.0; 20]), Some(&cpu(&[3], &[0.0; 3])), &mut y).unwrap_err();
    assert!(err.to_string().contains("bias must be [4]"), "{err}");
}

/// An empty batch (zero rows) is legal: forward writes nothing, backward leaves dw and db as they were (on
/// CUDA these once reached cuBLASLt and the bias-gradient launch with empty shapes; tests/cuda_parity holds
/// the same case there).
#[test]
fn an_empty_batch_runs_forward_and_backward_and_adds_nothing() {
    let (k, n) = (4, 3);
    let w = random(n * k, -1.0, 1.0, 1);
    let (prior_dw, prior_db) = (random(n * k, -1.0, 1.0, 2), random(n, -1.0, 1.0, 3));
    let x = cpu(&[0, k], &[]);
    let mut y = cpu(&[0, n], &[]);
    linear_forward(&x, &cpu(&[n, k], &w), Some(&cpu(&[n], &[0.5; 3])), &mut y).unwrap();
    let (mut dx, mut dw, mut db) = (cpu(&[0, k], &[]), cpu(&[n, k], &prior_dw), cpu(&[n], &prior_db));
    linear_backward(&x, &cpu(&[n, k], &w), &cpu(&[0, n], &[]), Some(&mut dx), Some(&mut dw), Some(&mut db)).unwrap();
    assert_eq!(dw.f32s().unwrap(), prior_dw);
    assert_eq!(db.f32s().unwrap(), prior_db);
}
