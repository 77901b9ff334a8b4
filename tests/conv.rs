//! The CPU convolutions against naive float64 loops written from PyTorch's definitions (tests/cuda_parity/conv.rs
//! holds CUDA to the CPU): Conv2d over every kernel size / stride / padding combination we use, including
//! diffusers' asymmetric downsampler pad, ConvTranspose2d k4 s2 p1 and Conv1d k3 p1; gradients against central
//! differences; `+=` accumulation of weight and bias gradients; bad shapes as errors.
//!
//! Tolerances. Forward: each output sums at most C_in*kH*kW = 48 (or 144 in the wider case) f32 products of
//! values in [-1, 1]; f32 rounding of such sums stays near 1e-6, so 1e-5 relative plus 1e-5 absolute leaves
//! room without hiding an indexing error (those are O(0.1)). Gradients: the loss sum(y * g) is linear in each
//! of x, w and b, so central differences in float64 are exact but for roundoff (~1e-16 * |loss| / h = 1e-9);
//! the bound is the f32 error of the analytic gradient: 1e-5 relative, plus 3e-5 absolute because a bias or
//! weight gradient sums up to 286 products in f32 (errors up to ~6e-6 seen) and is read back as the difference
//! of two f32 values near 1-10 (the `+=` check starts from random values).

mod common;

use common::{check_gradient, compare, cpu, f64s, random};
use sgdm::ops::conv::{
    conv1d_backward_input, conv1d_backward_weight, conv1d_forward, conv2d_backward_input, conv2d_backward_weight, conv2d_forward, conv_backward_bias,
    conv_transpose2d_backward_input, conv_transpose2d_backward_weight, conv_transpose2d_forward, im2col, Conv2dSpec, Padding,
};
use sgdm::{DType, Device, Tensor};

const REL: f32 = 1e-5;
const FLOOR: f32 = 1e-5;
const GRAD_REL: f64 = 1e-5;
const GRAD_ABS: f64 = 3e-5;

/// One Conv2d problem: input [n, c, h, w], weight [k, c, kh, kw].
#[derive(Debug, Clone, Copy)]
struct Case {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    kh: usize,
    kw: usize,
    spec: Conv2dSpec,
}

impl Case {
    fn out(&self) -> (usize, usize) {
        let p = self.spec.padding;
        ((self.h + p.top + p.bottom - self.kh) / self.spec.stride + 1, (self.w + p.left + p.right - self.kw) / self.spec.stride + 1)
    }
    fn x_shape(&self) -> [usize; 4] {
        [self.n, self.c, self.h, self.w]
    }
    fn w_shape(&self) -> [usize; 4] {
        [self.k, self.c, self.kh, self.kw]
    }
    fn y_shape(&self) -> [usize; 4] {
        let (p, q) = self.out();
        [self.n, self.k, p, q]
    }
    fn name(&self) -> String {
        let p = self.spec.padding;
        format!("{}x{} s{} pad(t{} b{} l{} r{}) n{}", self.kh, self.kw, self.spec.stride, p.top, p.bottom, p.left, p.right, self.n)
    }
}

fn len(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Every kernel size, stride and padding the models use, on the odd 7x9 image with batch 1, C_in 3, C_out 5;
/// then a batch of 2, a non-square kernel, a general asymmetric pad and a wider case that spans several
/// GEMM blocks.
fn cases() -> Vec<Case> {
    let base = Case { n: 1, c: 3, h: 7, w: 9, k: 5, kh: 3, kw: 3, spec: Conv2dSpec::new(1, 1) };
    let mut out = Vec::new();
    for (kernel, pads) in [(1, [0, 1]), (3, [0, 1]), (4, [1, 2])] {
        for stride in [1, 2] {
            for pad in pads {
                out.push(Case { kh: kernel, kw: kernel, spec: Conv2dSpec::new(stride, pad), ..base });
            }
        }
    }
    out.push(Case { spec: Conv2dSpec::VAE_DOWNSAMPLE, ..base });
    out.push(Case { spec: Conv2dSpec { stride: 1, padding: Padding { top: 2, bottom: 0, left: 1, right: 3 } }, ..base });
    out.push(Case { n: 2, c: 4, h: 6, w: 5, k: 3, spec: Conv2dSpec::new(2, 1), ..base });
    out.push(Case { kh: 1, kw: 3, spec: Conv2dSpec { stride: 1, padding: Padding { top: 0, bottom: 0, left: 1, right: 1 } }, ..base });
    out.push(Case { n: 2, c: 16, h: 11, w: 13, k: 24, ..base });
    out
}

// ---------------------------------------------------------------------------------------------------------
// Float64 references, straight from the definitions.

/// Conv2d: y[n, k, p, q] = b[k] + sum_{c, r, s} w[k, c, r, s] x[n, c, p*stride - top + r, q*stride - left + s].
fn conv2d_f64(t: &Case, x: &[f64], w: &[f64], b: Option<&[f64]>) -> Vec<f64> {
    let (ho, wo) = t.out();
    let (st, pad) = (t.spec.stride as isize, t.spec.padding);
    let mut y = vec![0.0; t.n * t.k * ho * wo];
    for n in 0..t.n {
        for k in 0..t.k {
            for p in 0..ho {
                for q in 0..wo {
                    let mut acc = b.map_or(0.0, |b| b[k]);
                    for c in 0..t.c {
                        for r in 0..t.kh {
                            for s in 0..t.kw {
                                let ih = p as isize * st - pad.top as isize + r as isize;
                                let iw = q as isize * st - pad.left as isize + s as isize;
                                if ih >= 0 && ih < t.h as isize && iw >= 0 && iw < t.w as isize {
                                    acc += w[((k * t.c + c) * t.kh + r) * t.kw + s] * x[((n * t.c + c) * t.h + ih as usize) * t.w + iw as usize];
                                }
                            }
                        }
                    }
                    y[((n * t.k + k) * ho + p) * wo + q] = acc;
                }
            }
        }
    }
    y
}

/// ConvTranspose2d (PyTorch's definition, output_padding 0): every input pixel scatters w[ci, co] into the
/// output at (ih*stride - pad + r, iw*stride - pad + s). Returns y and its (H', W').
fn conv_transpose2d_f64(
    (n, ci, h, w): (usize, usize, usize, usize),
    (co, kh, kw): (usize, usize, usize),
    stride: usize,
    pad: usize,
    x: &[f64],
    wt: &[f64],
    b: Option<&[f64]>,
) -> (Vec<f64>, usize, usize) {
    let (ho, wo) = ((h - 1) * stride + kh - 2 * pad, (w - 1) * stride + kw - 2 * pad);
    let mut y = vec![0.0; n * co * ho * wo];
    for (i, v) in y.iter_mut().enumerate() {
        *v = b.map_or(0.0, |b| b[(i / (ho * wo)) % co]);
    }
    for b_ in 0..n {
        for c in 0..ci {
            for ih in 0..h {
                for iw in 0..w {
                    let xv = x[((b_ * ci + c) * h + ih) * w + iw];
                    for o in 0..co {
                        for r in 0..kh {
                            for s in 0..kw {
                                let oh = (ih * stride + r) as isize - pad as isize;
                                let ow = (iw * stride + s) as isize - pad as isize;
                                if oh >= 0 && oh < ho as isize && ow >= 0 && ow < wo as isize {
                                    y[((b_ * co + o) * ho + oh as usize) * wo + ow as usize] += xv * wt[((c * co + o) * kh + r) * kw + s];
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    (y, ho, wo)
}

/// Conv1d: y[n, k, l] = b[k] + sum_{c, j} w[k, c, j] x[n, c, l*stride - pad + j].
fn conv1d_f64(
    (n, c, l): (usize, usize, usize),
    (k, kw): (usize, usize),
    stride: usize,
    pad: usize,
    x: &[f64],
    w: &[f64],
    b: Option<&[f64]>,
) -> (Vec<f64>, usize) {
    let lo = (l + 2 * pad - kw) / stride + 1;
    let mut y = vec![0.0; n * k * lo];
    for b_ in 0..n {
        for o in 0..k {
            for t in 0..lo {
                let mut acc = b.map_or(0.0, |b| b[o]);
                for ch in 0..c {
                    for j in 0..kw {
                        let i = (t * stride + j) as isize - pad as isize;
                        if i >= 0 && i < l as isize {
                            acc += w[(o * c + ch) * kw + j] * x[(b_ * c + ch) * l + i as usize];
                        }
                    }
                }
                y[(b_ * k + o) * lo + t] = acc;
            }
        }
    }
    (y, lo)
}

fn dot(a: &[f64], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(a, b)| a * *b as f64).sum()
}

fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&v| v as f32).collect()
}

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(&Device::Cpu, shape, DType::F32).unwrap()
}

// ---------------------------------------------------------------------------------------------------------

#[test]
fn conv2d_forward_matches_float64_for_every_kernel_stride_and_padding() {
    for (i, t) in cases().into_iter().enumerate() {
        let seed = 100 + 10 * i as u64;
        let x = random(len(&t.x_shape()), -1.0, 1.0, seed);
        let w = random(len(&t.w_shape()), -1.0, 1.0, seed + 1);
        let b = random(t.k, -1.0, 1.0, seed + 2);
        for with_bias in [false, true] {
            let mut y = zeros(&t.y_shape());
            let bias = cpu(&[t.k], &b);
            conv2d_forward(&cpu(&t.x_shape(), &x), &cpu(&t.w_shape(), &w), with_bias.then_some(&bias), t.spec, &mut y).unwrap();
            let want = conv2d_f64(&t, &f64s(&x), &f64s(&w), with_bias.then(|| f64s(&b)).as_deref());
            let what = format!("conv2d {}{}", t.name(), if with_bias { " +bias" } else { "" });
            compare(&what, y.f32s().unwrap(), &to_f32(&want), REL, FLOOR);
        }
    }
}

#[test]
fn vae_downsample_spec_equals_explicit_right_bottom_pad_then_unpadded_conv() {
    // diffusers: F.pad(x, (0, 1, 0, 1)) then Conv2d(k3, s2, p0). Build the padded image by hand.
    let (n, c, h, w, k) = (2, 3, 8, 7, 4);
    let x = random(n * c * h * w, -1.0, 1.0, 7);
    let wt = random(k * c * 9, -1.0, 1.0, 8);
    let mut padded = vec![0.0; n * c * (h + 1) * (w + 1)];
    for img in 0..n * c {
        for i in 0..h {
            let (src, dst) = ((img * h + i) * w, (img * (h + 1) + i) * (w + 1));
            padded[dst..dst + w].copy_from_slice(&x[src..src + w]);
        }
    }
    let (ho, wo) = ((h + 1 - 3) / 2 + 1, (w + 1 - 3) / 2 + 1);
    let mut want = zeros(&[n, k, ho, wo]);
    conv2d_forward(&cpu(&[n, c, h + 1, w + 1], &padded), &cpu(&[k, c, 3, 3], &wt), None, Conv2dSpec::new(2, 0), &mut want).unwrap();
    let mut got = zeros(&[n, k, ho, wo]);
    conv2d_forward(&cpu(&[n, c, h, w], &x), &cpu(&[k, c, 3, 3], &wt), None, Conv2dSpec::VAE_DOWNSAMPLE, &mut got).unwrap();
    // The same products in the same order: equal up to the GEMM's blocking, i.e. to a few ulp.
    compare("VAE downsample vs explicit pad", got.f32s().unwrap(), want.f32s().unwrap(), 1e-6, 1e-6);
}

#[test]
fn conv2d_gradients_match_central_differences_and_accumulate() {
    for (i, t) in cases().into_iter().enumerate() {
        let seed = 500 + 10 * i as u64;
        let x = random(len(&t.x_shape()), -1.0, 1.0, seed);
        let w = random(len(&t.w_shape()), -1.0, 1.0, seed + 1);
        let b = random(t.k, -1.0, 1.0, seed + 2);
        let g = random(len(&t.y_shape()), -1.0, 1.0, seed + 3);
        let dy = cpu(&t.y_shape(), &g);
        let (x64, w64, b64) = (f64s(&x), f64s(&w), f64s(&b));

        let mut dx = cpu(&t.x_shape(), &random(len(&t.x_shape()), -9.0, 9.0, seed + 4)); // garbage: dx is written
        conv2d_backward_input(&dy, &cpu(&t.w_shape(), &w), t.spec, &mut dx).unwrap();
        let loss = |x: &[f64]| dot(&conv2d_f64(&t, x, &w64, Some(&b64)), &g);
        check_gradient(&format!("conv2d dx {}", t.name()), &x, dx.f32s().unwrap(), loss, 60, GRAD_REL, GRAD_ABS);

        // Weight and bias gradients accumulate: start from random values, apply twice.
        let dw0 = random(len(&t.w_shape()), -1.0, 1.0, seed + 5);
        let db0 = random(t.k, -1.0, 1.0, seed + 6);
        let mut dw = cpu(&t.w_shape(), &dw0);
        let mut db = cpu(&[t.k], &db0);
        conv2d_backward_weight(&cpu(&t.x_shape(), &x), &dy, t.spec, &mut dw).unwrap();
        conv_backward_bias(&dy, &mut db).unwrap();
        let dw1: Vec<f32> = dw.f32s().unwrap().iter().zip(&dw0).map(|(a, b)| a - b).collect();
        let db1: Vec<f32> = db.f32s().unwrap().iter().zip(&db0).map(|(a, b)| a - b).collect();
        let loss = |w: &[f64]| dot(&conv2d_f64(&t, &x64, w, Some(&b64)), &g);
        check_gradient(&format!("conv2d dw {}", t.name()), &w, &dw1, loss, 60, GRAD_REL, GRAD_ABS);
        let loss = |b: &[f64]| dot(&conv2d_f64(&t, &x64, &w64, Some(b)), &g);
        check_gradient(&format!("conv2d db {}", t.name()), &b, &db1, loss, t.k, GRAD_REL, GRAD_ABS);

        conv2d_backward_weight(&cpu(&t.x_shape(), &x), &dy, t.spec, &mut dw).unwrap();
        conv_backward_bias(&dy, &mut db).unwrap();
        let twice_w: Vec<f32> = dw0.iter().zip(&dw1).map(|(a, d)| a + 2.0 * d).collect();
        let twice_b: Vec<f32> = db0.iter().zip(&db1).map(|(a, d)| a + 2.0 * d).collect();
        compare(&format!("conv2d dw += twice {}", t.name()), dw.f32s().unwrap(), &twice_w, REL, FLOOR);
        compare(&format!("conv2d db += twice {}", t.name()), db.f32s().unwrap(), &twice_b, REL, FLOOR);
    }
}

#[test]
fn conv_transpose2d_k4_s2_p1_forward_and_gradients_match_float64() {
    for (n, ci, h, w, co) in [(1, 3, 7, 9, 5), (2, 4, 4, 3, 2)] {
        let (kh, kw, stride, pad) = (4, 4, 2, 1);
        let spec = Conv2dSpec::new(stride, pad);
        let seed = (n * 1000 + ci) as u64;
        let x = random(n * ci * h * w, -1.0, 1.0, seed);
        let wt = random(ci * co * kh * kw, -1.0, 1.0, seed + 1);
        let b = random(co, -1.0, 1.0, seed + 2);
        let (want, ho, wo) = conv_transpose2d_f64((n, ci, h, w), (co, kh, kw), stride, pad, &f64s(&x), &f64s(&wt), Some(&f64s(&b)));
        assert_eq!((ho, wo), (2 * h, 2 * w), "k4 s2 p1 doubles the image");
        let (xs, ws, ys) = ([n, ci, h, w], [ci, co, kh, kw], [n, co, ho, wo]);
        let mut y = zeros(&ys);
        conv_transpose2d_forward(&cpu(&xs, &x), &cpu(&ws, &wt), Some(&cpu(&[co], &b)), spec, &mut y).unwrap();
        let name = format!("conv_transpose2d k4s2p1 {n}x{ci}x{h}x{w}->{co}");
        compare(&name, y.f32s().unwrap(), &to_f32(&want), REL, FLOOR);

        let g = random(len(&ys), -1.0, 1.0, seed + 3);
        let dy = cpu(&ys, &g);
        let (x64, w64, b64) = (f64s(&x), f64s(&wt), f64s(&b));
        let fwd = |x: &[f64], wt: &[f64], b: &[f64]| conv_transpose2d_f64((n, ci, h, w), (co, kh, kw), stride, pad, x, wt, Some(b)).0;
        let mut dx = zeros(&xs);
        conv_transpose2d_backward_input(&dy, &cpu(&ws, &wt), spec, &mut dx).unwrap();
        check_gradient(&format!("{name} dx"), &x, dx.f32s().unwrap(), |x| dot(&fwd(x, &w64, &b64), &g), 60, GRAD_REL, GRAD_ABS);

        let dw0 = random(len(&ws), -1.0, 1.0, seed + 4);
        let mut dw = cpu(&ws, &dw0);
        conv_transpose2d_backward_weight(&cpu(&xs, &x), &dy, spec, &mut dw).unwrap();
        let dw1: Vec<f32> = dw.f32s().unwrap().iter().zip(&dw0).map(|(a, b)| a - b).collect();
        check_gradient(&format!("{name} dw"), &wt, &dw1, |w| dot(&fwd(&x64, w, &b64), &g), 60, GRAD_REL, GRAD_ABS);

        let mut db = cpu(&[co], &[0.5; 8][..co]);
        conv_backward_bias(&dy, &mut db).unwrap();
        let db1: Vec<f32> = db.f32s().unwrap().iter().map(|v| v - 0.5).collect();
        check_gradient(&format!("{name} db"), &b, &db1, |b| dot(&fwd(&x64, &w64, b), &g), co, GRAD_REL, GRAD_ABS);
    }
}

#[test]
fn conv1d_k3_p1_forward_and_gradients_match_float64() {
    // The EEG encoder's spatial branch: electrodes along L, time samples as channels.
    for (n, c, l, k, stride) in [(1, 5, 17, 7, 1), (3, 4, 9, 6, 2)] {
        let (kw, pad) = (3, 1);
        let seed = (n * 100 + l) as u64;
        let x = random(n * c * l, -1.0, 1.0, seed);
        let w = random(k * c * kw, -1.0, 1.0, seed + 1);
        let b = random(k, -1.0, 1.0, seed + 2);
        let (want, lo) = conv1d_f64((n, c, l), (k, kw), stride, pad, &f64s(&x), &f64s(&w), Some(&f64s(&b)));
        let (xs, ws, ys) = ([n, c, l], [k, c, kw], [n, k, lo]);
        let mut y = zeros(&ys);
        conv1d_forward(&cpu(&xs, &x), &cpu(&ws, &w), Some(&cpu(&[k], &b)), stride, pad, &mut y).unwrap();
        let name = format!("conv1d k3p1 s{stride} {n}x{c}x{l}->{k}");
        compare(&name, y.f32s().unwrap(), &to_f32(&want), REL, FLOOR);

        let g = random(len(&ys), -1.0, 1.0, seed + 3);
        let dy = cpu(&ys, &g);
        let (x64, w64, b64) = (f64s(&x), f64s(&w), f64s(&b));
        let fwd = |x: &[f64], w: &[f64], b: &[f64]| conv1d_f64((n, c, l), (k, kw), stride, pad, x, w, Some(b)).0;
        let mut dx = zeros(&xs);
        conv1d_backward_input(&dy, &cpu(&ws, &w), stride, pad, &mut dx).unwrap();
        check_gradient(&format!("{name} dx"), &x, dx.f32s().unwrap(), |x| dot(&fwd(x, &w64, &b64), &g), 60, GRAD_REL, GRAD_ABS);

        let dw0 = random(len(&ws), -1.0, 1.0, seed + 4);
        let mut dw = cpu(&ws, &dw0);
        conv1d_backward_weight(&cpu(&xs, &x), &dy, stride, pad, &mut dw).unwrap();
        let dw1: Vec<f32> = dw.f32s().unwrap().iter().zip(&dw0).map(|(a, b)| a - b).collect();
        check_gradient(&format!("{name} dw"), &w, &dw1, |w| dot(&fwd(&x64, w, &b64), &g), 60, GRAD_REL, GRAD_ABS);

        let mut db = zeros(&[k]);
        conv_backward_bias(&dy, &mut db).unwrap();
        check_gradient(&format!("{name} db"), &b, db.f32s().unwrap(), |b| dot(&fwd(&x64, &w64, b), &g), k, GRAD_REL, GRAD_ABS);
    }
}

/// Runs `f`, expects an error, and checks that its message names the op and contains every `needle`.
fn expect_error(what: &str, result: anyhow::Result<()>, op: &str, needles: &[&str]) {
    let err = match result {
        Ok(()) => panic!("{what}: expected an error"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains(op), "{what}: error does not name {op}: {err}");
    for n in needles {
        assert!(err.contains(n), "{what}: error does not mention {n}: {err}");
    }
    println!("{what}: {err}");
}

#[test]
fn bad_shapes_are_errors_naming_the_op_and_shapes() {
    let spec = Conv2dSpec::new(1, 1);
    let x = zeros(&[1, 3, 7, 9]);
    let w = zeros(&[5, 3, 3, 3]);
    let mut y = zeros(&[1, 5, 7, 9]);

    let w_bad_c = zeros(&[5, 4, 3, 3]);
    expect_error("channel mismatch", conv2d_forward(&x, &w_bad_c, None, spec, &mut y), "conv2d_forward", &["[1, 3, 7, 9]", "[5, 4, 3, 3]"]);
    let w_rank3 = zeros(&[5, 3, 9]);
    expect_error("weight rank", conv2d_forward(&x, &w_rank3, None, spec, &mut y), "conv2d_forward", &["[5, 3, 9]"]);
    let x_rank3 = zeros(&[3, 7, 9]);
    expect_error("input rank", conv2d_forward(&x_rank3, &w, None, spec, &mut y), "conv2d_forward", &["[3, 7, 9]"]);
    let mut y_bad = zeros(&[1, 5, 5, 7]);
    expect_error("output shape", conv2d_forward(&x, &w, None, spec, &mut y_bad), "conv2d_forward", &["[1, 5, 5, 7]", "[1, 5, 7, 9]"]);
    let b_bad = zeros(&[4]);
    expect_error("bias shape", conv2d_forward(&x, &w, Some(&b_bad), spec, &mut y), "conv2d_forward", &["bias", "[4]"]);
    let big = zeros(&[5, 3, 11, 3]);
    expect_error("kernel taller than the padded input", conv2d_forward(&x, &big, None, spec, &mut y), "conv2d_forward", &["11"]);
    expect_error("stride 0", conv2d_forward(&x, &w, None, Conv2dSpec::new(0, 1), &mut y), "conv2d_forward", &["stride"]);
    let (x_empty, w_empty) = (zeros(&[1, 0, 7, 9]), zeros(&[5, 0, 3, 3]));
    expect_error("no channels", conv2d_forward(&x_empty, &w_empty, None, spec, &mut y), "conv2d_forward", &["[1, 0, 7, 9]"]);
    let half = Tensor::zeros(&Device::Cpu, &[1, 3, 7, 9], DType::BF16).unwrap();
    expect_error("bf16 on the CPU", conv2d_forward(&half, &w, None, spec, &mut y), "conv2d_forward", &["f32"]);

    let mut dx = zeros(&[1, 3, 7, 9]);
    expect_error("dy shape", conv2d_backward_input(&y_bad, &w, spec, &mut dx), "conv2d_backward_input", &["[1, 5, 5, 7]"]);
    let mut dw = zeros(&[5, 4, 3, 3]);
    expect_error("dw channels", conv2d_backward_weight(&x, &y, spec, &mut dw), "conv2d_backward_weight", &["[5, 4, 3, 3]"]);
    let mut db = zeros(&[6]);
    expect_error("db shape", conv_backward_bias(&y, &mut db), "conv_backward_bias", &["[6]"]);

    let wt_bad = zeros(&[4, 5, 4, 4]);
    let mut yt = zeros(&[1, 5, 14, 18]);
    expect_error(
        "transpose channels",
        conv_transpose2d_forward(&x, &wt_bad, None, Conv2dSpec::new(2, 1), &mut yt),
        "conv_transpose2d_forward",
        &["[4, 5, 4, 4]"],
    );
    let mut yt_bad = zeros(&[1, 5, 14, 17]);
    let wt = zeros(&[3, 5, 4, 4]);
    expect_error(
        "transpose output",
        conv_transpose2d_forward(&x, &wt, None, Conv2dSpec::new(2, 1), &mut yt_bad),
        "conv_transpose2d_forward",
        &["[1, 5, 14, 17]", "[1, 5, 14, 18]"],
    );
    conv_transpose2d_forward(&x, &wt, None, Conv2dSpec::new(2, 1), &mut yt).unwrap();

    let x1 = zeros(&[2, 4, 17]);
    let w1 = zeros(&[6, 5, 3]);
    let mut y1 = zeros(&[2, 6, 17]);
    expect_error("conv1d channels", conv1d_forward(&x1, &w1, None, 1, 1, &mut y1), "conv1d_forward", &["[2, 4, 17]", "[6, 5, 3]"]);
    let mut y0 = zeros(&[0, 6, 17]);
    conv1d_forward(&zeros(&[0, 5, 17]), &w1, None, 1, 1, &mut y0).expect("an empty batch is a no-op");
    expect_error("conv1d weight rank", conv1d_forward(&x1, &w, None, 1, 1, &mut y1), "conv1d_forward", &["[5, 3, 3, 3]"]);
}

/// col [N, C*R*S, P*Q] of `x` [N, C, H, W], written as the definition reads.
fn im2col_loops(x: &[f32], [n, c, h, w]: [usize; 4], [r, s]: [usize; 2], spec: Conv2dSpec) -> Vec<f32> {
    let pad = spec.padding;
    let p = (h + pad.top + pad.bottom - r) / spec.stride + 1;
    let q = (w + pad.left + pad.right - s) / spec.stride + 1;
    let mut col = Vec::with_capacity(n * c * r * s * p * q);
    for img in 0..n {
        for ch in 0..c {
            for kr in 0..r {
                for ks in 0..s {
                    for op in 0..p {
                        for oq in 0..q {
                            let ih = (op * spec.stride + kr) as isize - pad.top as isize;
                            let iw = (oq * spec.stride + ks) as isize - pad.left as isize;
                            let inside = (0..h as isize).contains(&ih) && (0..w as isize).contains(&iw);
                            col.push(if inside { x[((img * c + ch) * h + ih as usize) * w + iw as usize] } else { 0.0 });
                        }
                    }
                }
            }
        }
    }
    col
}

#[test]
fn im2col_matches_its_definition_exactly_and_gives_the_conv_as_a_gemm() {
    // The bench baseline's buffer: 3x3 p1 (SD's resnet conv), the VAE downsampler's asymmetric pad, a 1x1, and
    // a 2x5 kernel at stride 2 on an odd image.
    for (x_shape, kernel, spec) in [
        ([2, 3, 7, 9], [3, 3], Conv2dSpec::new(1, 1)),
        ([1, 4, 8, 8], [3, 3], Conv2dSpec::VAE_DOWNSAMPLE),
        ([2, 5, 3, 4], [1, 1], Conv2dSpec::new(1, 0)),
        ([1, 2, 9, 11], [2, 5], Conv2dSpec::new(2, 1)),
    ] {
        let x = random(x_shape.iter().product(), -1.0, 1.0, 71);
        let want = im2col_loops(&x, x_shape, kernel, spec);
        let crs = x_shape[1] * kernel[0] * kernel[1];
        let mut col = zeros(&[x_shape[0], crs, want.len() / (x_shape[0] * crs)]);
        col.f32s_mut().unwrap().fill(f32::NAN); // written, padding included
        im2col(&cpu(&x_shape, &x), kernel, spec, &mut col).unwrap();
        assert_eq!(col.f32s().unwrap(), want, "im2col {x_shape:?} kernel {kernel:?} {spec:?}");
    }
    // The composition the bench times equals the conv: y[n] = w [K, C*9] · col[n] (f32 sums in another order).
    let (xs, k) = ([2, 3, 7, 9], 4);
    let spec = Conv2dSpec::new(1, 1);
    let x = random(xs.iter().product(), -1.0, 1.0, 72);
    let w = random(k * 3 * 9, -1.0, 1.0, 73);
    let mut col = zeros(&[2, 27, 63]);
    im2col(&cpu(&xs, &x), [3, 3], spec, &mut col).unwrap();
    let mut y = zeros(&[2, k, 7, 9]);
    conv2d_forward(&cpu(&xs, &x), &cpu(&[k, 3, 3, 3], &w), None, spec, &mut y).unwrap();
    let mut gemm = Vec::new();
    for img in col.f32s().unwrap().chunks(27 * 63) {
        for row in w.chunks(27) {
            gemm.extend((0..63).map(|j| row.iter().enumerate().map(|(i, w)| w * img[i * 63 + j]).sum::<f32>()));
        }
    }
    compare("im2col + GEMM vs conv2d_forward", &gemm, y.f32s().unwrap(), REL, FLOOR);

    let mut col = zeros(&[2, 27, 62]);
    let err = im2col(&cpu(&xs, &x), [3, 3], spec, &mut col).unwrap_err().to_string();
    assert!(err.contains("im2col") && err.contains("[2, 27, 62]"), "{err}");
    let err = im2col(&zeros(&[2, 3, 7]), [3, 3], spec, &mut col).unwrap_err().to_string();
    assert!(err.contains("im2col") && err.contains("[2, 3, 7]"), "{err}");
}
