//! The SGDM EEG encoder's LSTM: 2 layers, bidirectional, hidden 256, over 17 EEG channels x 100 time steps,
//! forward and backward through time. CUDA (bf16 and f32, when a GPU is present) at batch 256; the CPU at
//! batch 16, because batch 256 takes several seconds per iteration on 2 cores. Throughput counts the GEMM
//! FLOPs (forward 2·B·T·4H·(in + H) per layer and direction; backward twice that), so the groups compare
//! directly with the cuBLASLt and matrixmultiply peaks of the linear bench.
//!
//! Then, in the same run, the fused cell against the library composition it replaces, on one
//! layer and direction of the first layer's shape (17 -> 256, 100 steps; the same batches):
//! `<dev>/fused-cell` is `lstm_forward` (one input-projection GEMM, then per step one cuBLASLt/sgemm GEMM
//! h·W_hhᵀ and one fused cell kernel); `<dev>/gemm+unfused-cell` is, per step and per gate (i, f, g, o, each
//! its own [B, H] tensor: we have no strided views), the GEMMs x_t·W_ih,kᵀ + b_k (bias in the epilogue) and
//! += h_{t-1}·W_hh,kᵀ, then separate kernels sigmoid(i), sigmoid(f), tanh(g), sigmoid(o), f·c, i·g, the sum,
//! tanh(c) and o·tanh(c): the same GEMM FLOPs in 8 GEMMs per step instead of 1 + 1/T, and 9 elementwise
//! launches instead of 1. The composition keeps gates and cell state in the storage dtype (ours keeps them
//! in f32), runs its first step from zero states where ours skips the recurrent GEMM, and saves h_t and c_t
//! of every step as ours does for backward.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sgdm::ops::elementwise::{add, mul, sigmoid_forward, tanh_forward};
use sgdm::ops::linear::{linear_forward, matmul, MatmulSpec};
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
    let per_layer = |layer| 2 * batch * STEPS * h4 * (CONFIG.layer_input_size(layer) + CONFIG.hidden_size) * CONFIG.directions();
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

/// One layer and direction of the first layer: the shapes the cell comparison runs on.
const CELL_CONFIG: LstmConfig = LstmConfig { input_size: 17, hidden_size: 256, num_layers: 1, bidirectional: false };

/// The composition's tensors: per gate k the weights W_ih,k [H, in], W_hh,k [H, H] and the folded bias
/// b_ih,k + b_hh,k [H]; the inputs x_t [B, in] of every step; per gate the pre-activation and activation
/// [B, H]; the products f·c and i·g, tanh(c); and the c_t, h_t of every step (plus the zero initial states).
struct Unfused {
    w_ih: Vec<Tensor>,
    w_hh: Vec<Tensor>,
    bias: Vec<Tensor>,
    x: Vec<Tensor>,
    pre: Vec<Tensor>,
    act: Vec<Tensor>,
    fc: Tensor,
    ig: Tensor,
    tc: Tensor,
    c: Vec<Tensor>,
    h: Vec<Tensor>,
}

fn unfused(device: &Device, dtype: DType, batch: usize) -> Unfused {
    let (h, input) = (CELL_CONFIG.hidden_size, CELL_CONFIG.input_size);
    let zeros = |shape: &[usize]| Tensor::zeros(device, shape, dtype).unwrap();
    Unfused {
        w_ih: (0..4).map(|k| filled(device, &[h, input], dtype, k)).collect(),
        w_hh: (0..4).map(|k| filled(device, &[h, h], dtype, 4 + k)).collect(),
        bias: (0..4).map(|k| filled(device, &[h], dtype, 8 + k)).collect(),
        x: (0..STEPS).map(|t| filled(device, &[batch, input], dtype, 100 + t)).collect(),
        pre: (0..4).map(|_| zeros(&[batch, h])).collect(),
        act: (0..4).map(|_| zeros(&[batch, h])).collect(),
        fc: zeros(&[batch, h]),
        ig: zeros(&[batch, h]),
        tc: zeros(&[batch, h]),
        c: (0..=STEPS).map(|_| zeros(&[batch, h])).collect(),
        h: (0..=STEPS).map(|_| zeros(&[batch, h])).collect(),
    }
}

/// The forward recurrence as library calls; `c[0]`, `h[0]` are the zero initial states, step t writes
/// `c[t + 1]`, `h[t + 1]`.
fn unfused_forward(u: &mut Unfused) {
    let rec = MatmulSpec { trans_b: true, accumulate: true, ..MatmulSpec::default() };
    for t in 0..STEPS {
        for k in 0..4 {
            linear_forward(&u.x[t], &u.w_ih[k], Some(&u.bias[k]), &mut u.pre[k]).unwrap();
            matmul(&u.h[t], &u.w_hh[k], &mut u.pre[k], rec).unwrap();
            if k == 2 {
                tanh_forward(&u.pre[k], &mut u.act[k]).unwrap();
            } else {
                sigmoid_forward(&u.pre[k], &mut u.act[k]).unwrap();
            }
        }
        let [i, f, g, o] = [&u.act[0], &u.act[1], &u.act[2], &u.act[3]];
        mul(f, &u.c[t], &mut u.fc).unwrap();
        mul(i, g, &mut u.ig).unwrap();
        add(&u.fc, &u.ig, &mut u.c[t + 1]).unwrap();
        tanh_forward(&u.c[t + 1], &mut u.tc).unwrap();
        mul(o, &u.tc, &mut u.h[t + 1]).unwrap();
    }
}

fn bench_cell(c: &mut Criterion) {
    let mut runs = vec![("cpu-f32".to_string(), Device::Cpu, DType::F32, 16)];
    match select(DeviceSpec::Cuda(0)) {
        Ok(s) => {
            runs.push(("cuda-bf16".into(), s.device.clone(), DType::BF16, 256));
            runs.push(("cuda-f32".into(), s.device, DType::F32, 256));
        }
        Err(e) => eprintln!("SKIPPED: CUDA LSTM cell comparison: {e:#}"),
    }
    let cfg = CELL_CONFIG;
    for (name, device, dtype, batch) in runs {
        let mut params = LstmParams::zeros(&device, cfg, dtype).unwrap();
        for (i, (_, t)) in params.named_mut().into_iter().enumerate() {
            *t = filled(&device, t.shape(), dtype, i);
        }
        let x = filled(&device, &[batch, STEPS, cfg.input_size], dtype, 99);
        let mut acts = LstmActivations::zeros(&device, cfg, batch, STEPS, dtype).unwrap();
        let mut u = unfused(&device, dtype, batch);
        let flops = 2 * batch * STEPS * 4 * cfg.hidden_size * (cfg.input_size + cfg.hidden_size);
        let mut g = c.benchmark_group(format!("lstm_cell_forward/17->256 x{STEPS} steps b{batch}: fused-cell vs gemm+unfused-cell"));
        g.sample_size(10);
        g.throughput(Throughput::Elements(flops as u64));
        g.bench_function(format!("{name}/fused-cell"), |bench| {
            bench.iter(|| {
                lstm_forward(&params, &x, &mut acts).unwrap();
                device.synchronize().unwrap();
            })
        });
        g.bench_function(format!("{name}/gemm+unfused-cell"), |bench| {
            bench.iter(|| {
                unfused_forward(&mut u);
                device.synchronize().unwrap();
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench, bench_cell);
criterion_main!(benches);
