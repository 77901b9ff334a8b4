//! Norms at SD 1.5 shapes: GroupNorm(32) + SiLU on [2, 320, 64, 64] (a ResnetBlock2D's norm1 at the top
//! level), forward and backward, against the unfused composition (GroupNorm, then the elementwise SiLU); and
//! LayerNorm over [2 * 4096, 320] (a transformer block's norms at 64x64), forward and backward.
//! CPU f32 always (these shapes take tens of milliseconds, affordable in `cargo test`'s single run); CUDA bf16
//! and f32 when a GPU is present. Throughput counts the bytes an op must read and write (x and y forward;
//! x, dy and dx backward), not its re-reads from cache, so it compares directly with copy bandwidth.

#[path = "common/mod.rs"]
mod common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sgdm::ops::elementwise::{silu_backward, silu_forward};
use sgdm::ops::norm::{
    group_norm_backward, group_norm_forward, group_norm_scratch_shape, layer_norm_backward, layer_norm_forward, layer_norm_scratch_shape, Affine,
    GroupNorm, NormGrads, Stats, StatsMut,
};
use sgdm::{DType, Device, Tensor};

const GN_SHAPE: [usize; 4] = [2, 320, 64, 64];
const GN: GroupNorm = GroupNorm { groups: 32, eps: 1e-5, silu: true };
const LN_SHAPE: [usize; 2] = [2 * 4096, 320];

fn filled(device: &Device, shape: &[usize], dtype: DType, seed: usize) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32) * 0.004 - 2.0).collect();
    Tensor::from_f32(device, shape, dtype, &v).unwrap()
}

/// The tensors of one norm: input, params, output, statistics, gradients.
struct Bufs {
    x: Tensor,
    w: Tensor,
    b: Tensor,
    y: Tensor,
    mean: Tensor,
    rstd: Tensor,
    dy: Tensor,
    dx: Tensor,
    dw: Tensor,
    db: Tensor,
    scratch: Tensor,
}

fn bufs(device: &Device, dtype: DType, shape: &[usize], features: usize, stats: &[usize], scratch: &[usize]) -> Bufs {
    let z = |shape: &[usize], dtype| Tensor::zeros(device, shape, dtype).unwrap();
    Bufs {
        x: filled(device, shape, dtype, 1),
        w: filled(device, &[features], dtype, 2),
        b: filled(device, &[features], dtype, 3),
        y: z(shape, dtype),
        mean: z(stats, DType::F32),
        rstd: z(stats, DType::F32),
        dy: filled(device, shape, dtype, 4),
        dx: z(shape, dtype),
        dw: z(&[features], dtype),
        db: z(&[features], dtype),
        scratch: z(scratch, DType::F32),
    }
}

fn bench(c: &mut Criterion) {
    let gn_numel: usize = GN_SHAPE.iter().product();
    let ln_numel: usize = LN_SHAPE.iter().product();
    for (name, device, dtype) in common::devices("norm", &[DType::BF16, DType::F32]) {
        let size = dtype.size();
        let sync = || device.synchronize().unwrap();

        let mut t = bufs(&device, dtype, &GN_SHAPE, 320, &[2, 32], &group_norm_scratch_shape(&GN_SHAPE));
        let mut g = c.benchmark_group("group_norm_silu_forward/2x320x64x64: fused vs unfused norm then silu");
        g.throughput(Throughput::Bytes((2 * gn_numel * size) as u64));
        g.bench_function(format!("{name}/fused"), |bench| {
            bench.iter(|| {
                let stats = StatsMut { mean: &mut t.mean, rstd: &mut t.rstd };
                group_norm_forward(GN, &t.x, Affine { weight: &t.w, bias: &t.b }, &mut t.y, stats).unwrap();
                sync();
            })
        });
        g.bench_function(format!("{name}/unfused-norm-then-silu"), |bench| {
            let plain = GroupNorm { silu: false, ..GN };
            bench.iter(|| {
                let stats = StatsMut { mean: &mut t.mean, rstd: &mut t.rstd };
                group_norm_forward(plain, &t.x, Affine { weight: &t.w, bias: &t.b }, &mut t.dx, stats).unwrap();
                silu_forward(&t.dx, &mut t.y).unwrap();
                sync();
            })
        });
        g.finish();

        let mut g = c.benchmark_group("group_norm_silu_backward/2x320x64x64: fused vs unfused silu then norm");
        g.throughput(Throughput::Bytes((3 * gn_numel * size) as u64));
        g.bench_function(format!("{name}/fused"), |bench| {
            bench.iter(|| {
                let grads = NormGrads { dx: &mut t.dx, dweight: &mut t.dw, dbias: &mut t.db, scratch: &mut t.scratch };
                let stats = Stats { mean: &t.mean, rstd: &t.rstd };
                group_norm_backward(GN, &t.x, Affine { weight: &t.w, bias: &t.b }, stats, &t.dy, grads).unwrap();
                sync();
            })
        });
        // The unfused backward: SiLU's backward from the stored norm output h, then the plain GroupNorm's.
        let h = filled(&device, &GN_SHAPE, dtype, 5);
        let mut dh = Tensor::zeros(&device, &GN_SHAPE, dtype).unwrap();
        g.bench_function(format!("{name}/unfused-silu-then-norm"), |bench| {
            let plain = GroupNorm { silu: false, ..GN };
            bench.iter(|| {
                silu_backward(&h, &t.dy, &mut dh).unwrap();
                let grads = NormGrads { dx: &mut t.dx, dweight: &mut t.dw, dbias: &mut t.db, scratch: &mut t.scratch };
                let stats = Stats { mean: &t.mean, rstd: &t.rstd };
                group_norm_backward(plain, &t.x, Affine { weight: &t.w, bias: &t.b }, stats, &dh, grads).unwrap();
                sync();
            })
        });
        g.finish();
        drop(dh);
        drop(t);

        let mut t = bufs(&device, dtype, &LN_SHAPE, 320, &[LN_SHAPE[0]], &layer_norm_scratch_shape(&LN_SHAPE));
        let mut g = c.benchmark_group("layer_norm_forward/8192x320");
        g.throughput(Throughput::Bytes((2 * ln_numel * size) as u64));
        g.bench_function(&name, |bench| {
            bench.iter(|| {
                let stats = StatsMut { mean: &mut t.mean, rstd: &mut t.rstd };
                layer_norm_forward(1e-5, &t.x, Affine { weight: &t.w, bias: &t.b }, &mut t.y, stats).unwrap();
                sync();
            })
        });
        g.finish();

        let mut g = c.benchmark_group("layer_norm_backward/8192x320");
        g.throughput(Throughput::Bytes((3 * ln_numel * size) as u64));
        g.bench_function(&name, |bench| {
            bench.iter(|| {
                let grads = NormGrads { dx: &mut t.dx, dweight: &mut t.dw, dbias: &mut t.db, scratch: &mut t.scratch };
                layer_norm_backward(&t.x, &t.w, Stats { mean: &t.mean, rstd: &t.rstd }, &t.dy, grads).unwrap();
                sync();
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
