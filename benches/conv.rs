//! Conv2d 3x3, 320 -> 320 channels, stride 1, padding 1, batch 2: the SD 1.5 UNet's first-level resnet conv
//! on 64x64 latents. Forward, input gradient and weight gradient; f32 on the CPU, f32 and bf16 on CUDA when a
//! GPU is present. Throughput is counted in floating-point operations: criterion's "elem/s" reads as FLOP/s
//! (2 * N * C_out * H' * W' * C_in * 9 per pass; the input gradient also spends them on the zero taps of
//! its gather formulation, so its FLOP/s are comparable with the others).
//!
//! Each device's forward is compared, in the same run, with the composition it replaces: on CUDA,
//! `<device>/im2col+gemm` (the im2col kernel writes the [N, C*9, H*W] patch matrix, 2x 47 MB in bf16, then a
//! cuBLASLt GEMM batched over the images with the weight repeated per image, as a zero-stride batched GEMM
//! would read it; no bias, so the baseline does slightly less). The CPU forward already is im2col + sgemm
//! per image, its own baseline.
//!
//! The CPU runs the full SD shape too: a pass is 15.1 GFLOP, measured at 0.5-0.7 s per iteration (about
//! 25 GFLOP/s, 2 shared cores), inside the ~2 s per iteration that `cargo test`'s single run can afford.

#[path = "common/mod.rs"]
mod common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sgdm::memory::arena::aligned;
use sgdm::memory::pool::Pool;
use sgdm::ops::conv::{conv2d_backward_input, conv2d_backward_weight, conv2d_forward, im2col, Conv2dSpec};
use sgdm::ops::linear::{matmul, MatmulSpec};
use sgdm::{DType, Tensor};

const BATCH: usize = 2;
const CHANNELS: usize = 320;
const SIDE: usize = 64;

fn bench(c: &mut Criterion) {
    let spec = Conv2dSpec::new(1, 1);
    for (name, device, dtype) in common::devices("conv", &[DType::BF16, DType::F32]) {
        let image = [BATCH, CHANNELS, SIDE, SIDE];
        let weight = [CHANNELS, CHANNELS, 3, 3];
        let shapes = [&image[..], &image, &image, &image, &weight, &weight, &[CHANNELS]];
        let pool = Pool::new(&device, shapes.iter().map(|s| aligned(s.iter().product::<usize>() * dtype.size())).sum()).unwrap();
        let alloc = |shape: &[usize], fill: f32| {
            let mut t = pool.alloc(shape, dtype).unwrap();
            let n: usize = shape.iter().product();
            t.write_f32(&(0..n).map(|i| fill * ((i % 17) as f32 - 8.0) / 8.0).collect::<Vec<_>>()).unwrap();
            t
        };
        let x = alloc(&image, 1.0);
        let dy = alloc(&image, 0.5);
        let mut y = alloc(&image, 0.0);
        let mut dx = alloc(&image, 0.0);
        let w = alloc(&weight, 0.05);
        let mut dw = alloc(&weight, 0.0);
        let b = alloc(&[CHANNELS], 0.1);

        let flops = (2 * BATCH * CHANNELS * SIDE * SIDE * CHANNELS * 9) as u64;
        let mut g =
            c.benchmark_group(format!("conv2d_3x3_{CHANNELS}to{CHANNELS}_b{BATCH}_{SIDE}x{SIDE}: implicit GEMM vs im2col+gemm (CUDA forward)"));
        g.throughput(Throughput::Elements(flops));
        g.sample_size(10);
        g.bench_function(format!("{name}/forward"), |bench| {
            bench.iter(|| {
                conv2d_forward(&x, &w, Some(&b), spec, &mut y).unwrap();
                device.synchronize().unwrap();
            })
        });
        if device.is_cuda() {
            let patch = CHANNELS * 9;
            let mut col = Tensor::zeros(&device, &[BATCH, patch, SIDE * SIDE], dtype).unwrap();
            let w_rows = w.to_f32_vec().unwrap();
            let w_batched = Tensor::from_f32(&device, &[BATCH, CHANNELS, patch], dtype, &w_rows.repeat(BATCH)).unwrap();
            let mut y_rows = Tensor::zeros(&device, &[BATCH, CHANNELS, SIDE * SIDE], dtype).unwrap();
            g.bench_function(format!("{name}/im2col+gemm"), |bench| {
                bench.iter(|| {
                    im2col(&x, [3, 3], spec, &mut col).unwrap();
                    matmul(&w_batched, &col, &mut y_rows, MatmulSpec::default()).unwrap();
                    device.synchronize().unwrap();
                })
            });
        }
        g.bench_function(format!("{name}/backward_input"), |bench| {
            bench.iter(|| {
                conv2d_backward_input(&dy, &w, spec, &mut dx).unwrap();
                device.synchronize().unwrap();
            })
        });
        g.bench_function(format!("{name}/backward_weight"), |bench| {
            bench.iter(|| {
                conv2d_backward_weight(&x, &dy, spec, &mut dw).unwrap();
                device.synchronize().unwrap();
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
