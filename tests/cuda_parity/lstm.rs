//! The LSTM on CUDA (cuBLASLt GEMMs + the fused cell kernels) against the CPU reference: output, input
//! gradient and every parameter gradient (accumulated onto non-zero f32 values).

use sgdm::ops::lstm::{lstm_backward, lstm_forward, LstmActivations, LstmBackwardScratch, LstmConfig, LstmParams};
use sgdm::{DType, Device, Tensor};

use crate::common::{compare, random, rounded, NanFilled};

struct Run {
    y: Vec<f32>,
    dx: Vec<f32>,
    grads: Vec<(String, Vec<f32>)>,
}

fn run(
    device: &Device,
    dtype: DType,
    cfg: LstmConfig,
    params: &[Vec<f32>],
    prior: &[Vec<f32>],
    x: &[f32],
    dy: &[f32],
    (b, t): (usize, usize),
) -> Run {
    let mut p = LstmParams::zeros(device, cfg, dtype).unwrap();
    for ((_, t), v) in p.named_mut().into_iter().zip(params) {
        t.write_f32(v).unwrap();
    }
    let mut grads = LstmParams::zeros(device, cfg, DType::F32).unwrap();
    for ((_, t), v) in grads.named_mut().into_iter().zip(prior) {
        t.write_f32(v).unwrap();
    }
    let xt = Tensor::from_f32(device, &[b, t, cfg.input_size], dtype, x).unwrap();
    // NaN-filled buffers, as reused pool memory may hold anything: every buffer, padding rows included,
    // must be written before it is read.
    let mut acts = LstmActivations::new(cfg, b, t, dtype, &mut NanFilled(device.clone())).unwrap();
    lstm_forward(&p, &xt, &mut acts).unwrap();
    let dyt = Tensor::from_f32(device, acts.output().shape(), dtype, dy).unwrap();
    let mut dx = Tensor::from_f32(device, xt.shape(), dtype, &vec![f32::NAN; x.len()]).unwrap();
    let mut scratch = LstmBackwardScratch::new(cfg, b, t, dtype, &mut NanFilled(device.clone())).unwrap();
    lstm_backward(&p, &xt, &acts, &dyt, Some(&mut dx), &mut grads, &mut scratch).unwrap();
    Run {
        y: acts.output().to_f32_vec().unwrap(),
        dx: dx.to_f32_vec().unwrap(),
        grads: grads.named().into_iter().map(|(n, t)| (n, t.to_f32_vec().unwrap())).collect(),
    }
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0, |m, x| m.max(x.abs()))
}

pub fn check(gpu: &Device) {
    let cases = [
        (LstmConfig { input_size: 7, hidden_size: 4, num_layers: 2, bidirectional: true }, 1, 5),
        // EEG-encoder-like: 17 channels, odd hidden size, several warps per step.
        (LstmConfig { input_size: 17, hidden_size: 40, num_layers: 2, bidirectional: true }, 5, 9),
        (LstmConfig { input_size: 5, hidden_size: 33, num_layers: 3, bidirectional: false }, 3, 6),
    ];
    // f32: cuBLASLt computes in f32 (no TF32) and the cell uses expf/tanhf: only summation order and ulps
    // differ, which the recurrence carries without growth over these few steps.
    // bf16: hidden states and gate gradients are rounded to bf16 at every step (2^-9 relative) and feed the
    // next step's GEMM; cell states and gates stay f32. A floor of 2% of the largest value absorbs
    // cancellation in small elements.
    for (dtype, rel, floor_frac) in [(DType::F32, 1e-4f32, 1e-4f32), (DType::BF16, 2e-2, 2e-2)] {
        for (i, &(cfg, b, t)) in cases.iter().enumerate() {
            let seed = 100 * i as u64;
            let params: Vec<Vec<f32>> = cfg
                .parameter_shapes()
                .iter()
                .enumerate()
                .map(|(k, (_, s))| rounded(dtype, &random(s.iter().product(), -0.4, 0.4, seed + k as u64)))
                .collect();
            let prior: Vec<Vec<f32>> =
                cfg.parameter_shapes().iter().enumerate().map(|(k, (_, s))| random(s.iter().product(), -1.0, 1.0, seed + 50 + k as u64)).collect();
            let x = rounded(dtype, &random(b * t * cfg.input_size, -1.0, 1.0, seed + 90));
            let dy = rounded(dtype, &random(b * t * cfg.output_size(), -1.0, 1.0, seed + 91));
            let g = run(gpu, dtype, cfg, &params, &prior, &x, &dy, (b, t));
            let c = run(&Device::Cpu, DType::F32, cfg, &params, &prior, &x, &dy, (b, t));
            let tag = format!("L{} D{} H{} B{b} T{t} {dtype}", cfg.num_layers, cfg.directions(), cfg.hidden_size);
            compare(&format!("lstm y {tag}"), &g.y, &c.y, rel, floor_frac * max_abs(&c.y));
            compare(&format!("lstm dx {tag}"), &g.dx, &c.dx, rel, floor_frac * max_abs(&c.dx));
            for (k, ((name, gv), (_, cv))) in g.grads.iter().zip(&c.grads).enumerate() {
                // Compare what was added to the prior, so the bound scales with the gradient itself.
                let added = |v: &[f32]| -> Vec<f32> { v.iter().zip(&prior[k]).map(|(v, p)| v - p).collect() };
                let (gd, cd) = (added(gv), added(cv));
                compare(&format!("lstm d{name} (+=) {tag}"), &gd, &cd, rel, floor_frac * max_abs(&cd));
            }
        }
    }
}
