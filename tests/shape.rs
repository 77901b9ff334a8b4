//! The CPU shape ops against float64 references and central differences (tests/cuda_parity/shape.rs holds
//! CUDA to them). Concat, split and upsampling only move values, so forwards are compared exactly.

mod common;

use common::{check_gradient, compare, cpu, f64s, random};
use sgdm::ops::shape::{
    avg_pool_last, avg_pool_last_backward, concat_channels, split_channels, transpose_last2, transpose_last2_backward, upsample_nearest2x,
    upsample_nearest2x_backward,
};
use sgdm::{DType, Device, Tensor};

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(&Device::Cpu, shape, DType::F32).unwrap()
}

fn dot(a: &[f64], g: &[f32]) -> f64 {
    a.iter().zip(g).map(|(a, g)| a * *g as f64).sum()
}

/// cat([a, b], dim=1) of [n, ca, hw] and [n, cb, hw], in f64.
fn concat64(a: &[f64], b: &[f64], n: usize, ca: usize, cb: usize, hw: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(n * (ca + cb) * hw);
    for i in 0..n {
        out.extend_from_slice(&a[i * ca * hw..(i + 1) * ca * hw]);
        out.extend_from_slice(&b[i * cb * hw..(i + 1) * cb * hw]);
    }
    out
}

#[test]
fn concat_and_split_channels_on_odd_sizes() {
    for (n, ca, cb, h, w) in [(2, 3, 5, 7, 9), (1, 1, 4, 3, 1)] {
        let hw = h * w;
        let a = random(n * ca * hw, -1.0, 1.0, 1);
        let b = random(n * cb * hw, -1.0, 1.0, 2);
        let mut y = zeros(&[n, ca + cb, h, w]);
        concat_channels(&cpu(&[n, ca, h, w], &a), &cpu(&[n, cb, h, w], &b), &mut y).unwrap();
        let want: Vec<f32> = concat64(&f64s(&a), &f64s(&b), n, ca, cb, hw).iter().map(|&v| v as f32).collect();
        assert_eq!(y.f32s().unwrap(), want, "concat [{n}, {ca}+{cb}, {h}, {w}]");

        // split is concat's backward: d/da sum(cat(a, b) * g) = split(g).a, and the same for b.
        let g = random(n * (ca + cb) * hw, -1.0, 1.0, 3);
        let (mut da, mut db) = (zeros(&[n, ca, h, w]), zeros(&[n, cb, h, w]));
        split_channels(&cpu(&[n, ca + cb, h, w], &g), &mut da, &mut db).unwrap();
        let b64 = f64s(&b);
        let a64 = f64s(&a);
        // The loss is linear: central differences are exact up to f64 rounding of the sum.
        check_gradient("split_channels as concat's da", &a, da.f32s().unwrap(), |a| dot(&concat64(a, &b64, n, ca, cb, hw), &g), 200, 1e-7, 1e-8);
        check_gradient("split_channels as concat's db", &b, db.f32s().unwrap(), |b| dot(&concat64(&a64, b, n, ca, cb, hw), &g), 200, 1e-7, 1e-8);
    }
}

#[test]
fn concat_and_split_refuse_mismatched_shapes() {
    let a = zeros(&[2, 3, 7, 9]);
    let b = zeros(&[2, 5, 7, 8]);
    let mut y = zeros(&[2, 8, 7, 9]);
    let err = concat_channels(&a, &b, &mut y).unwrap_err().to_string();
    assert!(err.contains("concat_channels") && err.contains("[2, 5, 7, 8]"), "{err}");
    let mut b = zeros(&[2, 4, 7, 9]);
    let mut a = zeros(&[2, 3, 7, 9]);
    let err = split_channels(&y, &mut a, &mut b).unwrap_err().to_string();
    assert!(err.contains("split_channels") && err.contains("[2, 8, 7, 9]"), "{err}");
}

fn upsample64(x: &[f64], planes: usize, h: usize, w: usize) -> Vec<f64> {
    let mut out = vec![0.0; planes * 4 * h * w];
    for p in 0..planes {
        for oy in 0..2 * h {
            for ox in 0..2 * w {
                out[(p * 2 * h + oy) * 2 * w + ox] = x[(p * h + oy / 2) * w + ox / 2];
            }
        }
    }
    out
}

#[test]
fn upsample_nearest2x_and_its_backward_on_odd_sizes() {
    for (n, c, h, w) in [(2, 3, 7, 9), (1, 1, 1, 5)] {
        let x = random(n * c * h * w, -1.0, 1.0, 4);
        let mut y = zeros(&[n, c, 2 * h, 2 * w]);
        upsample_nearest2x(&cpu(&[n, c, h, w], &x), &mut y).unwrap();
        let want: Vec<f32> = upsample64(&f64s(&x), n * c, h, w).iter().map(|&v| v as f32).collect();
        assert_eq!(y.f32s().unwrap(), want, "upsample [{n}, {c}, {h}, {w}]");

        let g = random(n * c * 4 * h * w, -1.0, 1.0, 5);
        let mut dx = zeros(&[n, c, h, w]);
        upsample_nearest2x_backward(&cpu(&[n, c, 2 * h, 2 * w], &g), &mut dx).unwrap();
        // Each gradient is a sum of four f32 values: ~2 ulp; central differences of a linear loss are exact
        // up to f64 rounding.
        check_gradient("upsample_nearest2x_backward", &x, dx.f32s().unwrap(), |x| dot(&upsample64(x, n * c, h, w), &g), 400, 1e-6, 1e-7);
    }
    let mut y = zeros(&[2, 3, 14, 17]);
    let err = upsample_nearest2x(&zeros(&[2, 3, 7, 9]), &mut y).unwrap_err().to_string();
    assert!(err.contains("upsample_nearest2x") && err.contains("[2, 3, 14, 17]"), "{err}");
    let mut dx = zeros(&[2, 3, 7, 8]);
    let err = upsample_nearest2x_backward(&zeros(&[2, 3, 14, 18]), &mut dx).unwrap_err().to_string();
    assert!(err.contains("upsample_nearest2x_backward") && err.contains("[2, 3, 7, 8]"), "{err}");
}

#[test]
fn avg_pool_last_and_its_backward() {
    // The EEG encoder's AdaptiveAvgPool1d(1) on [B, C, L]; odd L, batch 1 and L = 1 included.
    for (b, c, l) in [(3, 5, 11), (1, 7, 250), (2, 3, 1)] {
        let x = random(b * c * l, -2.0, 2.0, 6);
        let mut y = zeros(&[b, c, 1]);
        avg_pool_last(&cpu(&[b, c, l], &x), &mut y).unwrap();
        let mean64 = |x: &[f64]| -> Vec<f64> { x.chunks(l).map(|r| r.iter().sum::<f64>() / l as f64).collect() };
        let want: Vec<f32> = mean64(&f64s(&x)).iter().map(|&v| v as f32).collect();
        // A sequential f32 sum of L terms: L * 2^-24 of the sum of magnitudes (<= 2 L here), then one division.
        compare(&format!("avg_pool_last [{b}, {c}, {l}]"), y.f32s().unwrap(), &want, 1e-6, l as f32 * 2.0 * 6e-8);

        let g = random(b * c, -1.0, 1.0, 7);
        let mut dx = zeros(&[b, c, l]);
        avg_pool_last_backward(&cpu(&[b, c], &g), &mut dx).unwrap();
        check_gradient("avg_pool_last_backward", &x, dx.f32s().unwrap(), |x| dot(&mean64(x), &g), 300, 1e-6, 1e-8);
    }
    let mut y = zeros(&[3, 4, 1]);
    let err = avg_pool_last(&zeros(&[3, 5, 11]), &mut y).unwrap_err().to_string();
    assert!(err.contains("avg_pool_last") && err.contains("[3, 5, 11]") && err.contains("[3, 4, 1]"), "{err}");
    let mut y = zeros(&[3, 5, 2]);
    assert!(avg_pool_last(&zeros(&[3, 5, 11]), &mut y).is_err(), "the pooled length must be 1");
    let mut dx = zeros(&[3, 5, 0]);
    let err = avg_pool_last_backward(&zeros(&[3, 5, 1]), &mut dx).unwrap_err().to_string();
    assert!(err.contains("L > 0"), "{err}");
}

fn transpose64(x: &[f64], batch: usize, r: usize, c: usize) -> Vec<f64> {
    let mut out = vec![0.0; x.len()];
    for b in 0..batch {
        for i in 0..r {
            for j in 0..c {
                out[(b * c + j) * r + i] = x[(b * r + i) * c + j];
            }
        }
    }
    out
}

#[test]
fn transpose_last2_and_its_backward_are_exact() {
    // Odd sizes around the 32-wide CPU blocks, a single row or column, batch 1, a rank-2 and a rank-4 shape,
    // and the VAE's [1, 4096, 512] <-> [1, 512, 4096] at 64x64 (the mid-block attention).
    for shape in [vec![2, 7, 9], vec![1, 33, 65], vec![3, 1, 5], vec![2, 5, 1], vec![40, 77], vec![2, 3, 31, 64], vec![1, 4096, 512]] {
        let rank = shape.len();
        let (r, c) = (shape[rank - 2], shape[rank - 1]);
        let batch: usize = shape[..rank - 2].iter().product();
        let mut out_shape = shape.clone();
        out_shape.swap(rank - 2, rank - 1);
        let x = random(batch * r * c, -1.0, 1.0, 8);
        let mut y = zeros(&out_shape);
        transpose_last2(&cpu(&shape, &x), &mut y).unwrap();
        let want: Vec<f32> = transpose64(&f64s(&x), batch, r, c).iter().map(|&v| v as f32).collect();
        assert_eq!(y.f32s().unwrap(), want, "transpose_last2 {shape:?}");

        // The backward is the same op on dy: dx = dyᵀ, bit for bit, and it undoes the forward.
        let mut dx = zeros(&shape);
        transpose_last2_backward(&y, &mut dx).unwrap();
        assert_eq!(dx.f32s().unwrap(), x, "transpose_last2_backward {out_shape:?} undoes the forward");
        let g = random(batch * r * c, -1.0, 1.0, 9);
        transpose_last2_backward(&cpu(&out_shape, &g), &mut dx).unwrap();
        let mut again = zeros(&shape);
        transpose_last2(&cpu(&out_shape, &g), &mut again).unwrap();
        let want: Vec<f32> = transpose64(&f64s(&g), batch, c, r).iter().map(|&v| v as f32).collect();
        assert_eq!(dx.f32s().unwrap(), want, "transpose_last2_backward {out_shape:?}");
        assert_eq!(dx.f32s().unwrap(), again.f32s().unwrap(), "the backward is the forward on dy");
    }
}

#[test]
fn transpose_last2_refuses_mismatched_shapes() {
    let mut y = zeros(&[2, 7, 9]);
    let err = transpose_last2(&zeros(&[2, 7, 9]), &mut y).unwrap_err().to_string();
    assert!(err.contains("transpose_last2") && err.contains("[2, 7, 9]"), "{err}");
    let mut y = zeros(&[3, 9, 7]);
    let err = transpose_last2(&zeros(&[2, 7, 9]), &mut y).unwrap_err().to_string();
    assert!(err.contains("transpose_last2") && err.contains("[3, 9, 7]"), "{err}");
    let mut y = zeros(&[7]);
    let err = transpose_last2(&zeros(&[7]), &mut y).unwrap_err().to_string();
    assert!(err.contains("transpose_last2") && err.contains("[7]"), "{err}");
    let mut dx = zeros(&[2, 9, 7]);
    let err = transpose_last2_backward(&zeros(&[2, 9, 7]), &mut dx).unwrap_err().to_string();
    assert!(err.contains("transpose_last2_backward") && err.contains("[2, 9, 7]"), "{err}");
}
