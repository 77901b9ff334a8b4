//! Elementwise ops: the CPU reference, and CUDA in f32 and bf16 when a GPU is present, in one run so the
//! groups compare directly. Throughput counts bytes read plus bytes written.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sgdm::ops::elementwise::{add, silu_forward};
use sgdm::runtime::{select, Arena, MemoryPlan, Region};
use sgdm::{DType, Device, DeviceSpec};

const N: usize = 1 << 22;

fn devices() -> Vec<(String, Device, DType)> {
    let mut out = vec![("cpu-f32".to_string(), Device::Cpu, DType::F32)];
    match select(DeviceSpec::Cuda(0)) {
        Ok(s) => {
            out.push(("cuda-f32".into(), s.device.clone(), DType::F32));
            out.push(("cuda-bf16".into(), s.device, DType::BF16));
        }
        Err(e) => eprintln!("SKIPPED: CUDA elementwise benches: {e:#}"),
    }
    out
}

fn bench(c: &mut Criterion) {
    for (name, device, dtype) in devices() {
        let mut plan = MemoryPlan::new();
        for _ in 0..3 {
            plan.reserve(Region::Activations, &[N], dtype);
        }
        let mut arena = Arena::new(&device, &plan).unwrap();
        let x = arena.alloc(Region::Activations, &[N], dtype).unwrap();
        let b = arena.alloc(Region::Activations, &[N], dtype).unwrap();
        let mut y = arena.alloc(Region::Activations, &[N], dtype).unwrap();

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
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
