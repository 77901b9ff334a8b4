//! Elementwise ops: the CPU reference, and CUDA in f32 and bf16 when a GPU is present, in one run so the
//! groups compare directly. Throughput counts bytes read plus bytes written. Also GEGLU at SD 1.5's largest
//! feed-forward (batch 2 x 4096 tokens, input 2 x 1280) and an AdamW step over 10M parameters: both stay
//! under ~0.2 s per CPU iteration on 2 cores, so the CPU runs the full shapes.

#[path = "common/mod.rs"]
mod common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sgdm::memory::arena::aligned;
use sgdm::memory::pool::Pool;
use sgdm::memory::{Arena, MemoryPlan, Region};
use sgdm::ops::elementwise::{add, geglu_forward, silu_forward};
use sgdm::ops::optim::{adamw_step, AdamW};
use sgdm::{DType, Device};

const N: usize = 1 << 22;
/// GEGLU in SD 1.5's first-level transformer blocks: [2 * 4096 tokens, 2 * 1280] -> [8192, 1280].
const GEGLU_ROWS: usize = 2 * 4096;
const GEGLU_HALF: usize = 1280;
/// Parameters in the AdamW bench (the SGDM encoders and VAE are of this order).
const ADAMW_PARAMS: usize = 10_000_000;

fn bench(c: &mut Criterion) {
    for (name, device, dtype) in common::devices("elementwise", &[DType::F32, DType::BF16]) {
        let pool = Pool::new(&device, 3 * aligned(N * dtype.size())).unwrap();
        let x = pool.alloc(&[N], dtype).unwrap();
        let b = pool.alloc(&[N], dtype).unwrap();
        let mut y = pool.alloc(&[N], dtype).unwrap();

        let mut g = c.benchmark_group(format!("silu_forward/{N}"));
        g.throughput(Throughput::Bytes((2 * N * dtype.size()) as u64));
        g.bench_function(&name, |bench| {
            bench.iter(|| {
                silu_forward(&x, &mut y).unwrap();
                device.synchronize().unwrap();
            })
        });
        g.finish();

        let mut g = c.benchmark_group(format!("add/{N}"));
        g.throughput(Throughput::Bytes((3 * N * dtype.size()) as u64));
        g.bench_function(&name, |bench| {
            bench.iter(|| {
                add(&x, &b, &mut y).unwrap();
                device.synchronize().unwrap();
            })
        });
        g.finish();
        drop((x, b, y, pool));

        bench_geglu(c, &name, &device, dtype);
        bench_adamw(c, &name, &device, dtype);
    }
}

fn bench_geglu(c: &mut Criterion, name: &str, device: &Device, dtype: DType) {
    let (x_shape, y_shape) = ([GEGLU_ROWS, 2 * GEGLU_HALF], [GEGLU_ROWS, GEGLU_HALF]);
    let pool = Pool::new(device, aligned(GEGLU_ROWS * 3 * GEGLU_HALF * dtype.size()) + 256).unwrap();
    let x = pool.alloc(&x_shape, dtype).unwrap();
    let mut y = pool.alloc(&y_shape, dtype).unwrap();
    let mut g = c.benchmark_group(format!("geglu_forward/{GEGLU_ROWS}x{}", 2 * GEGLU_HALF));
    g.throughput(Throughput::Bytes((3 * GEGLU_ROWS * GEGLU_HALF * dtype.size()) as u64));
    g.bench_function(name, |bench| {
        bench.iter(|| {
            geglu_forward(&x, &mut y).unwrap();
            device.synchronize().unwrap();
        })
    });
    g.finish();
}

/// f32 master weights and state; gradients in `dtype`; with bf16 gradients (CUDA) the step also writes the
/// bf16 weight copy, as mixed-precision training does.
fn bench_adamw(c: &mut Criterion, name: &str, device: &Device, dtype: DType) {
    let n = ADAMW_PARAMS;
    let copy = dtype == DType::BF16;
    let mut plan = MemoryPlan::new();
    plan.reserve(Region::Params, &[n], DType::F32).reserve(Region::Grads, &[n], dtype);
    plan.reserve(Region::Optimizer, &[n], DType::F32).reserve(Region::Optimizer, &[n], DType::F32);
    if copy {
        plan.reserve(Region::Params, &[n], DType::BF16);
    }
    let mut arena = Arena::new(device, &plan).unwrap();
    let mut p = arena.alloc(Region::Params, &[n], DType::F32).unwrap();
    let mut p_bf16 = if copy { Some(arena.alloc(Region::Params, &[n], DType::BF16).unwrap()) } else { None };
    let grad = arena.alloc(Region::Grads, &[n], dtype).unwrap();
    let mut m = arena.alloc(Region::Optimizer, &[n], DType::F32).unwrap();
    let mut v = arena.alloc(Region::Optimizer, &[n], DType::F32).unwrap();
    // p, m, v read and written in f32, the gradient read, the copy written.
    let bytes = n * (3 * 8 + dtype.size() + if copy { 2 } else { 0 });
    let mut g = c.benchmark_group(format!("adamw_step/{n}"));
    g.throughput(Throughput::Bytes(bytes as u64));
    let opt = AdamW::default();
    let mut step = 0;
    g.bench_function(name, |bench| {
        bench.iter(|| {
            step += 1;
            adamw_step(&opt, step, &mut p, &grad, &mut m, &mut v, p_bf16.as_mut()).unwrap();
            device.synchronize().unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
