//! The SGDM EEG encoder's LSTM: 2 layers, bidirectional, hidden 256, over 17 EEG channels x 100 time steps,
//! forward and backward through time. CUDA (bf16 and f32, when a GPU is present) at batch 256; the CPU at
//! batch 16, because batch 256 takes several seconds per iteration on 2 cores. Throughput counts the GEMM
//! FLOPs (forward 2·B·T·4H·(in + H) per layer and direction; backward twice that), so the groups compare
//! directly with the cuBLASLt and matrixmultiply peaks of the linear bench.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sgdm::ops::lstm::{lstm_backward, lstm_forward, LstmActivations, LstmBackwardScratch, LstmConfig, LstmParams};
use sgdm::runtime::select;
use sgdm::{DType, Device, DeviceSpec, Tensor};

const CONFIG: LstmConfig = LstmConfig { input_size: 17, hidden_size: 256, num_layers: 2, bidirectional: true };
const STEPS: usize = 100;

fn filled(device: &Device, shape: &[usize], dtype: DType, seed: usize) -> Tensor {
    let n: usize = shape.iter().product();
    // A cheap deterministic spread in [-0.05, 0.05): keeps the gates away from saturation like trained weights.
    let v: Vec<f32> = (0..n).map(|i| ((i * 7919 + seed * 104_729) % 1000) as f32 / 10_000.0 - 0.05).collect();
    Tensor::from_f32(device, shape, dtype, &v).unwrap()
}

fn forward_flops(batch: usize) -> u64 {
    let h4 = 4 * CONFIG.hidden_size;
    let per_layer =
        |layer| 2 * batch * STEPS * h4 * (CONFIG.layer_input_size(layer) + CONFIG.hidden_size) * CONFIG.directions();
    (0..CONFIG.num_layers).map(per_layer).sum::<usize>() as u64
}

fn bench(c: &mut Criterion) {
    let mut runs = vec![("cpu-f32".to_string(), Device::Cpu, DType::F32, 16)];
    match select(DeviceSpec::Cuda(0)) {
        Ok(s) => {
            runs.push(("cuda-bf16".into(), s.device.clone(), DType::BF16, 256));
            runs.push(("cuda-f32".into(), s.device, DType::F32, 256));
        }
        Err(e) => eprintln!("SKIPPED: CUDA LSTM benches: {e:#}"),
    }
    for (name, device, dtype, batch) in runs {
        let mut params = LstmParams::zeros(&device, CONFIG, dtype).unwrap();
        for (i, (_, t)) in params.named_mut().into_iter().enumerate() {
            *t = filled(&device, t.shape(), dtype, i);
        }
        let x = filled(&device, &[batch, STEPS, CONFIG.input_size], dtype, 99);
        let dy = filled(&device, &[batch, STEPS, CONFIG.output_size()], dtype, 98);
        let mut acts = LstmActivations::zeros(&device, CONFIG, batch, STEPS, dtype).unwrap();
        let mut grads = LstmParams::zeros(&device, CONFIG, DType::F32).unwrap();
        let mut scratch = LstmBackwardScratch::zeros(&device, CONFIG, batch, STEPS, dtype).unwrap();
        let mut dx = Tensor::zeros(&device, x.shape(), dtype).unwrap();

        let mut g = c.benchmark_group("lstm/2x256-bidi-17x100");
        g.sample_size(10);
        g.throughput(Throughput::Elements(forward_flops(batch)));
        g.bench_function(format!("forward/{name}/b{batch}"), |bench| {
            bench.iter(|| {
                lstm_forward(&params, &x, &mut acts).unwrap();
                device.synchronize().unwrap();
            })
        });
        lstm_forward(&params, &x, &mut acts).unwrap();
        g.throughput(Throughput::Elements(2 * forward_flops(batch)));
        g.bench_function(format!("backward/{name}/b{batch}"), |bench| {
            bench.iter(|| {
                lstm_backward(&params, &x, &acts, &dy, Some(&mut dx), &mut grads, &mut scratch).unwrap();
                device.synchronize().unwrap();
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
