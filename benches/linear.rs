//! Linear layers at SD 1.5 shapes: the attention projections (320 -> 320) and the GEGLU input projection
//! (320 -> 2560) over 2 x 4096 tokens. CPU f32 (with a quarter of the tokens: the full shape takes
//! seconds per iteration on 2 cores) and, when a GPU is present, cuBLASLt in bf16 and f32, in one run.
//! Throughput is in FLOP (2·m·n·k per GEMM).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sgdm::ops::linear::linear_forward;
use sgdm::runtime::select;
use sgdm::{DType, Device, DeviceSpec, Tensor};

fn bench(c: &mut Criterion) {
    let mut runs = vec![("cpu-f32".to_string(), Device::Cpu, DType::F32, 2048)];
    match select(DeviceSpec::Cuda(0)) {
        Ok(s) => {
            runs.push(("cuda-bf16".into(), s.device.clone(), DType::BF16, 8192));
            runs.push(("cuda-f32".into(), s.device, DType::F32, 8192));
        }
        Err(e) => eprintln!("SKIPPED: CUDA linear benches: {e:#}"),
    }
    for (name, device, dtype, m) in runs {
        for (k, n) in [(320, 320), (320, 2560)] {
            let x = Tensor::zeros(&device, &[m, k], dtype).unwrap();
            let w = Tensor::zeros(&device, &[n, k], dtype).unwrap();
            let b = Tensor::zeros(&device, &[n], dtype).unwrap();
            let mut y = Tensor::zeros(&device, &[m, n], dtype).unwrap();
            let mut g = c.benchmark_group(format!("linear/{k}x{n}"));
            g.throughput(Throughput::Elements((2 * m * n * k) as u64));
            g.bench_function(format!("{name}/m{m}"), |bench| {
                bench.iter(|| {
                    linear_forward(&x, &w, Some(&b), &mut y).unwrap();
                    device.synchronize().unwrap();
                })
            });
            g.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
