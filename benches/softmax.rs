//! Softmax over the AutoencoderKL mid-block attention's scores at 512x512 (one head, 4096 queries x 4096
//! keys, batch 1; that attention runs as matmul + softmax + matmul), forward and backward, with the scale
//! 1/sqrt(512). CPU f32 always (16.8M elements, tens of milliseconds per pass); CUDA bf16 and f32 when a GPU
//! is present. Throughput counts the bytes an op must move (x and y forward; y, dy and dx backward), so it
//! compares directly with copy bandwidth; the CUDA kernels re-read their row once more from cache.
//! No library softmax exists in this build to compare against: copy bandwidth is the bound to read them by.

#[path = "common/mod.rs"]
mod common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sgdm::ops::softmax::{softmax_backward, softmax_forward};
use sgdm::{DType, Device, Tensor};

const ROWS: usize = 4096;
const KEYS: usize = 4096;

fn filled(device: &Device, dtype: DType, seed: usize) -> Tensor {
    let v: Vec<f32> = (0..ROWS * KEYS).map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32) * 0.02 - 10.0).collect();
    Tensor::from_f32(device, &[ROWS, KEYS], dtype, &v).unwrap()
}

fn bench(c: &mut Criterion) {
    let scale = 512f32.powf(-0.5);
    for (name, device, dtype) in common::devices("softmax", &[DType::BF16, DType::F32]) {
        let bytes = (ROWS * KEYS * dtype.size()) as u64;
        let x = filled(&device, dtype, 1);
        let dy = filled(&device, dtype, 2);
        let mut y = Tensor::zeros(&device, &[ROWS, KEYS], dtype).unwrap();
        let mut dx = Tensor::zeros(&device, &[ROWS, KEYS], dtype).unwrap();

        let mut g = c.benchmark_group(format!("softmax_forward/{ROWS}x{KEYS}: bytes moved vs copy bandwidth"));
        g.sample_size(10);
        g.throughput(Throughput::Bytes(2 * bytes));
        g.bench_function(&name, |bench| {
            bench.iter(|| {
                softmax_forward(&x, scale, &mut y).unwrap();
                device.synchronize().unwrap();
            })
        });
        g.finish();

        let mut g = c.benchmark_group(format!("softmax_backward/{ROWS}x{KEYS}: bytes moved vs copy bandwidth"));
        g.sample_size(10);
        g.throughput(Throughput::Bytes(3 * bytes));
        g.bench_function(&name, |bench| {
            bench.iter(|| {
                softmax_backward(&y, &dy, scale, &mut dx).unwrap();
                device.synchronize().unwrap();
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
