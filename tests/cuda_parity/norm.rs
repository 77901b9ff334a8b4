//! Norm kernels against the CPU reference: GroupNorm (+ SiLU) and LayerNorm, forward and backward, f32 and
//! bf16, on shapes that take the 16-byte path (spatial sizes and features divisible by 8) and the scalar one
//! (7x9, 37 features). Parameter grads start from nonzero values to check `+=`, and run twice to check that
//! the reduction is deterministic.

use sgdm::ops::norm::{
    group_norm_backward, group_norm_forward, group_norm_scratch_shape, layer_norm_backward, layer_norm_forward, layer_norm_scratch_shape, Affine,
    GroupNorm, NormGrads, Stats, StatsMut,
};
use sgdm::{DType, Device, Tensor};

use crate::common::{compare, random, rounded};

/// Bounds relative to the largest expected magnitude, so near-zero outputs of a cancelling sum (dx) are held
/// to the precision of the terms they came from. f32: the CPU's f64 statistics against the GPU's f32 block
/// sums, a few 1e-7 relative. bf16: both sides start from the same bf16 values and compute in f32; the GPU
/// rounds its output once to bf16 (2^-9 relative), 1e-2 leaves a margin for the f32 differences.
fn close(what: &str, dtype: DType, got: &Tensor, want: &Tensor) {
    let (got, want) = (got.to_f32_vec().unwrap(), want.to_f32_vec().unwrap());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let (rel, floor) = match dtype {
        DType::BF16 => (1e-2, 2e-3 * scale),
        _ => (1e-5, 1e-5 * scale),
    };
    compare(&format!("{what} {dtype}"), &got, &want, rel, floor);
}

/// f32 statistics on both sides: f64 against f32 reductions.
fn check_stats(what: &str, got: &Tensor, want: &Tensor) {
    compare(what, &got.to_f32_vec().unwrap(), &want.to_f32_vec().unwrap(), 1e-5, 1e-6);
}

struct Inputs {
    x: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
    dy: Vec<f32>,
    start: Vec<f32>,
}

fn inputs(dtype: DType, numel: usize, features: usize, seed: u64) -> Inputs {
    Inputs {
        x: rounded(dtype, &random(numel, -3.0, 5.0, seed)),
        w: rounded(dtype, &random(features, 0.5, 1.5, seed + 1)),
        b: rounded(dtype, &random(features, -0.5, 0.5, seed + 2)),
        dy: rounded(dtype, &random(numel, -1.0, 1.0, seed + 3)),
        start: rounded(dtype, &random(features, -1.0, 1.0, seed + 4)),
    }
}

/// The tensors of one side (GPU in `dtype`, or CPU in f32).
struct Side {
    x: Tensor,
    w: Tensor,
    b: Tensor,
    dy: Tensor,
    y: Tensor,
    mean: Tensor,
    rstd: Tensor,
    dx: Tensor,
    dw: Tensor,
    db: Tensor,
    scratch: Tensor,
}

fn side(device: &Device, dtype: DType, shape: &[usize], stats: &[usize], scratch: &[usize], i: &Inputs) -> Side {
    let t = |shape: &[usize], v: &[f32]| Tensor::from_f32(device, shape, dtype, v).unwrap();
    let f = |shape: &[usize]| Tensor::zeros(device, shape, DType::F32).unwrap();
    let c = [i.w.len()];
    Side {
        x: t(shape, &i.x),
        w: t(&c, &i.w),
        b: t(&c, &i.b),
        dy: t(shape, &i.dy),
        y: Tensor::zeros(device, shape, dtype).unwrap(),
        mean: f(stats),
        rstd: f(stats),
        dx: Tensor::zeros(device, shape, dtype).unwrap(),
        dw: t(&c, &i.start),
        db: t(&c, &i.start),
        scratch: f(scratch),
    }
}

fn group_norm_both(s: &mut Side, gn: GroupNorm) {
    let affine = Affine { weight: &s.w, bias: &s.b };
    group_norm_forward(gn, &s.x, affine, &mut s.y, StatsMut { mean: &mut s.mean, rstd: &mut s.rstd }).unwrap();
    let grads = NormGrads { dx: &mut s.dx, dweight: &mut s.dw, dbias: &mut s.db, scratch: &mut s.scratch };
    group_norm_backward(gn, &s.x, affine, Stats { mean: &s.mean, rstd: &s.rstd }, &s.dy, grads).unwrap();
}

fn layer_norm_both(s: &mut Side, eps: f32) {
    let affine = Affine { weight: &s.w, bias: &s.b };
    layer_norm_forward(eps, &s.x, affine, &mut s.y, StatsMut { mean: &mut s.mean, rstd: &mut s.rstd }).unwrap();
    let grads = NormGrads { dx: &mut s.dx, dweight: &mut s.dw, dbias: &mut s.db, scratch: &mut s.scratch };
    layer_norm_backward(&s.x, &s.w, Stats { mean: &s.mean, rstd: &s.rstd }, &s.dy, grads).unwrap();
}

fn compare_sides(what: &str, dtype: DType, gpu: &Side, cpu: &Side) {
    close(&format!("{what} y"), dtype, &gpu.y, &cpu.y);
    check_stats(&format!("{what} mean {dtype}"), &gpu.mean, &cpu.mean);
    check_stats(&format!("{what} rstd {dtype}"), &gpu.rstd, &cpu.rstd);
    close(&format!("{what} dx"), dtype, &gpu.dx, &cpu.dx);
    close(&format!("{what} dweight +="), dtype, &gpu.dw, &cpu.dw);
    close(&format!("{what} dbias +="), dtype, &gpu.db, &cpu.db);
}

pub fn check(gpu: &Device) {
    for dtype in [DType::F32, DType::BF16] {
        // 7x9: the scalar path; 8x8 and 4x4: 16-byte packs (HW divisible by 8).
        for (shape, groups, silu, eps) in
            [(vec![1, 6, 7, 9], 3, true, 1e-6), (vec![2, 96, 4, 4], 32, false, 1e-5), (vec![2, 320, 8, 8], 32, true, 1e-5)]
        {
            let gn = GroupNorm { groups, eps, silu };
            let numel: usize = shape.iter().product();
            let i = inputs(dtype, numel, shape[1], 30);
            let (stats, scratch) = ([shape[0], groups], group_norm_scratch_shape(&shape));
            let mut g = side(gpu, dtype, &shape, &stats, &scratch, &i);
            let mut c = side(&Device::Cpu, DType::F32, &shape, &stats, &scratch, &i);
            group_norm_both(&mut g, gn);
            group_norm_both(&mut c, gn);
            let what = format!("group_norm {shape:?} g{groups} silu={silu}");
            compare_sides(&what, dtype, &g, &c);

            let mut again = side(gpu, dtype, &shape, &stats, &scratch, &i);
            group_norm_both(&mut again, gn);
            assert_eq!(again.dw.to_bytes().unwrap(), g.dw.to_bytes().unwrap(), "{what}: dweight is not deterministic");
            assert_eq!(again.db.to_bytes().unwrap(), g.db.to_bytes().unwrap(), "{what}: dbias is not deterministic");
        }

        // 37: the scalar path; 320 and 1280: packs; 600 rows: 19 partial-sum blocks; 1280 features: 4 warps.
        for (shape, eps) in [(vec![1, 3, 37], 1e-5), (vec![2, 77, 320], 1e-5), (vec![600, 1280], 1e-6)] {
            let numel: usize = shape.iter().product();
            let i = inputs(dtype, numel, shape[shape.len() - 1], 40);
            let stats = [numel / shape[shape.len() - 1]];
            let scratch = layer_norm_scratch_shape(&shape);
            let mut g = side(gpu, dtype, &shape, &stats, &scratch, &i);
            let mut c = side(&Device::Cpu, DType::F32, &shape, &stats, &scratch, &i);
            layer_norm_both(&mut g, eps);
            layer_norm_both(&mut c, eps);
            let what = format!("layer_norm {shape:?}");
            compare_sides(&what, dtype, &g, &c);

            let mut again = side(gpu, dtype, &shape, &stats, &scratch, &i);
            layer_norm_both(&mut again, eps);
            assert_eq!(again.dw.to_bytes().unwrap(), g.dw.to_bytes().unwrap(), "{what}: dweight is not deterministic");
        }
    }
}
