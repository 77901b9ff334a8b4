//! The EEG-image contrastive loss at training size: B = 1024 pairs of 512-d embeddings, forward (normalise,
//! similarity GEMM, row and column log-sum-exp, loss) and backward. CPU f32 at full size (~0.1 s per
//! iteration) and, with a GPU, CUDA in bf16 and f32. Throughput counts the similarity GEMM FLOPs
//! (2·B²·D forward, twice that backward).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sgdm::ops::infonce::{infonce_backward, infonce_forward, InfoNceActivations, DEFAULT_TEMPERATURE};
use sgdm::runtime::select;
use sgdm::{DType, Device, DeviceSpec, Tensor};

const B: usize = 1024;
const D: usize = 512;

fn filled(device: &Device, dtype: DType, seed: usize) -> Tensor {
    let v: Vec<f32> = (0..B * D).map(|i| ((i * 7919 + seed * 104_729) % 1000) as f32 / 500.0 - 1.0).collect();
    Tensor::from_f32(device, &[B, D], dtype, &v).unwrap()
}

fn bench(c: &mut Criterion) {
    let mut runs = vec![("cpu-f32".to_string(), Device::Cpu, DType::F32)];
    match select(DeviceSpec::Cuda(0)) {
        Ok(s) => {
            runs.push(("cuda-bf16".into(), s.device.clone(), DType::BF16));
            runs.push(("cuda-f32".into(), s.device, DType::F32));
        }
        Err(e) => eprintln!("SKIPPED: CUDA InfoNCE benches: {e:#}"),
    }
    for (name, device, dtype) in runs {
        let (a, b) = (filled(&device, dtype, 1), filled(&device, dtype, 2));
        let (mut da, mut db) =
            (Tensor::zeros(&device, &[B, D], dtype).unwrap(), Tensor::zeros(&device, &[B, D], dtype).unwrap());
        let mut acts = InfoNceActivations::zeros(&device, B, D, dtype).unwrap();
        let mut g = c.benchmark_group(format!("infonce/b{B}-d{D}"));
        g.sample_size(20);
        g.throughput(Throughput::Elements((2 * B * B * D) as u64));
        g.bench_function(format!("forward/{name}"), |bench| {
            bench.iter(|| {
                infonce_forward(&a, &b, DEFAULT_TEMPERATURE, &mut acts).unwrap();
                device.synchronize().unwrap();
            })
        });
        infonce_forward(&a, &b, DEFAULT_TEMPERATURE, &mut acts).unwrap();
        g.throughput(Throughput::Elements((4 * B * B * D) as u64));
        g.bench_function(format!("backward/{name}"), |bench| {
            bench.iter(|| {
                infonce_backward(&mut acts, 1.0, &mut da, &mut db).unwrap();
                device.synchronize().unwrap();
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
