//! `sgdm bench`: our kernels at the shapes the performance targets are set for (SD 1.5's convolutions, attention and
//! GroupNorm + SiLU; the EEG encoder's LSTM; InfoNCE), forward and backward, on random data, timed after
//! warm-up as the median of many runs (CUDA events on a GPU, the wall clock on the CPU), with achieved
//! TFLOP/s or GB/s against the device's GEMM and copy peaks measured in the same run.
//!
//! The case list is data ([`cases`], printed by `sgdm bench --list`), so the PyTorch side of the comparison
//! (benches/gpu/torch_ops.py) times exactly the same shapes.

use std::time::Instant;

use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::ops::attention::{
    attention_backward, attention_backward_using, attention_forward, attention_forward_using, AttentionKernel, AttentionSpec, Qkv, QkvGrads,
};
use crate::ops::conv::{
    conv2d_backward_input, conv2d_backward_input_using, conv2d_backward_weight, conv2d_backward_weight_using, conv2d_forward, conv2d_forward_using,
    Conv2dSpec, ConvKernel,
};
use crate::ops::elementwise::scale;
use crate::ops::infonce::{infonce_backward, infonce_forward, InfoNceActivations, DEFAULT_TEMPERATURE};
use crate::ops::linear::{matmul, MatmulSpec};
use crate::ops::lstm::{lstm_backward, lstm_forward, LstmActivations, LstmBackwardScratch, LstmConfig, LstmParams};
use crate::ops::norm::{group_norm_backward, group_norm_forward, group_norm_scratch_shape, Affine, GroupNorm, NormGrads, Stats, StatsMut};
use crate::{DType, Device, Tensor};

/// The op families with targets.
pub const FAMILIES: &[&str] = &["conv", "attention", "groupnorm_silu", "lstm", "infonce"];

/// One shape of one family. `params` names its sizes (the same names torch_ops.py reads).
#[derive(Clone, Debug)]
pub struct Case {
    pub id: String,
    pub family: &'static str,
    pub params: Vec<(&'static str, usize)>,
    /// The passes timed, e.g. ["forward", "backward_input", "backward_weight"].
    pub passes: Vec<&'static str>,
}

impl Case {
    fn new(family: &'static str, params: &[(&'static str, usize)], passes: &[&'static str]) -> Case {
        let id = std::iter::once(family.to_string()).chain(params.iter().map(|(k, v)| format!("{k}{v}"))).collect::<Vec<_>>().join("_");
        Case { id, family, params: params.to_vec(), passes: passes.to_vec() }
    }

    /// `{"id", "family", "params": {name: size}, "passes"}`.
    pub fn to_json(&self) -> serde_json::Value {
        let params: serde_json::Map<String, serde_json::Value> = self.params.iter().map(|(k, v)| (k.to_string(), (*v).into())).collect();
        serde_json::json!({ "id": self.id, "family": self.family, "params": params, "passes": self.passes })
    }

    pub fn get(&self, name: &str) -> usize {
        self.params.iter().find(|(k, _)| *k == name).map(|(_, v)| *v).unwrap_or_else(|| panic!("{}: no parameter {name}", self.id))
    }
}

/// The cases: the target shapes, or (`quick`) small ones of the same kinds, for the CPU and CI.
pub fn cases(quick: bool) -> Vec<Case> {
    let mut out = Vec::new();
    let conv_passes = &["forward", "backward_input", "backward_weight"][..];
    let fb = &["forward", "backward"][..];
    // SD 1.5's levels at 512x512: (channels, latent side).
    let levels: &[(usize, usize)] = if quick { &[(16, 8), (32, 4)] } else { &[(320, 64), (640, 32), (1280, 16), (1280, 8)] };
    let batches: &[usize] = if quick { &[1] } else { &[2, 16] };
    for &batch in batches {
        for &(channels, side) in levels {
            out.push(Case::new("conv", &[("batch", batch), ("channels", channels), ("side", side)], conv_passes));
        }
    }
    // Attention at each level: self-attention over side² tokens, cross-attention to 77 text tokens; 8 heads
    // of d = channels / 8. Batch 2: one image with classifier-free guidance.
    for &(channels, side) in levels {
        let (heads, tokens) = if quick { (2, side * side) } else { (8, side * side) };
        let d = channels / heads;
        for kv in [tokens, if quick { 7 } else { 77 }] {
            out.push(Case::new(
                "attention",
                &[("batch", if quick { 1 } else { 2 }), ("heads", heads), ("q_len", tokens), ("kv_len", kv), ("head_dim", d)],
                fb,
            ));
        }
    }
    for &batch in batches {
        for &(channels, side) in levels {
            out.push(Case::new(
                "groupnorm_silu",
                &[("batch", batch), ("channels", channels), ("side", side), ("groups", if quick { 4 } else { 32 })],
                fb,
            ));
        }
    }
    // The EEG encoder's LSTM: 17 channels x 100 steps in, 2 bidirectional layers of 256.
    let (lstm_batches, hidden, steps): (&[usize], usize, usize) = if quick { (&[4], 16, 10) } else { (&[64, 256, 1024], 256, 100) };
    for &batch in lstm_batches {
        out.push(Case::new("lstm", &[("batch", batch), ("steps", steps), ("input", 17), ("hidden", hidden), ("layers", 2)], fb));
    }
    let (infonce_batches, dim): (&[usize], usize) = if quick { (&[32], 16) } else { (&[1024, 2048, 4096, 8192], 512) };
    for &batch in infonce_batches {
        out.push(Case::new("infonce", &[("batch", batch), ("dim", dim)], fb));
    }
    out
}

/// One timed pass.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub id: String,
    pub family: &'static str,
    pub pass: &'static str,
    /// Median milliseconds per call.
    pub ms: f64,
    /// Fastest and slowest of the timed calls.
    pub min_ms: f64,
    pub max_ms: f64,
    /// Useful floating-point operations per call (0 where the op is bandwidth-bound and counted in bytes).
    pub flops: f64,
    /// Bytes the op must read and write at least once.
    pub bytes: f64,
}

/// How long to time: `warmup` untimed calls, then `runs` timed ones.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub warmup: usize,
    pub runs: usize,
}

/// Median, min and max milliseconds of `f` over `timing.runs` calls after `timing.warmup`: CUDA events
/// around each call on a GPU (no host synchronisation inside the timed region), the wall clock on the CPU.
pub fn time(device: &Device, timing: Timing, mut f: impl FnMut() -> Result<()>) -> Result<(f64, f64, f64)> {
    for _ in 0..timing.warmup {
        f()?;
    }
    device.synchronize()?;
    let mut ms = Vec::with_capacity(timing.runs);
    match device {
        Device::Cpu => {
            for _ in 0..timing.runs {
                let t = Instant::now();
                f()?;
                ms.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        Device::Cuda(d) => {
            let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
            let mut events = Vec::with_capacity(timing.runs);
            for _ in 0..timing.runs {
                let start = d.stream().record_event(flags)?;
                f()?;
                let end = d.stream().record_event(flags)?;
                events.push((start, end));
            }
            for (start, end) in &events {
                ms.push(start.elapsed_ms(end)? as f64);
            }
        }
    }
    ms.sort_by(f64::total_cmp);
    Ok((ms[ms.len() / 2], ms[0], ms[ms.len() - 1]))
}

/// The device's peaks measured now: the best of a few square `dtype` GEMMs (8192³ on a GPU, 1024³ on the
/// CPU) in FLOP/s, and of a few copies of 2^28 (GPU) or 2^24 (CPU) elements in bytes/s (read + write).
pub fn peaks(device: &Device, dtype: DType) -> Result<(f64, f64)> {
    let n = if device.is_cuda() { 8192 } else { 1024 };
    let a = random(device, &[n, n], dtype, 1)?;
    let mut c = Tensor::zeros(device, &[n, n], dtype)?;
    let timing = Timing { warmup: 2, runs: 5 };
    let (_, gemm_ms, _) = time(device, timing, || matmul(&a, &a, &mut c, MatmulSpec::default()))?;
    let m = if device.is_cuda() { 1 << 28 } else { 1 << 24 };
    let x = Tensor::zeros(device, &[m], dtype)?;
    let mut y = Tensor::zeros(device, &[m], dtype)?;
    let (_, copy_ms, _) = time(device, timing, || scale(&x, 1.0, &mut y))?;
    Ok((2.0 * (n as f64).powi(3) / (gemm_ms * 1e-3), 2.0 * (m * dtype.size()) as f64 / (copy_ms * 1e-3)))
}

/// A tensor of uniform values in [-1, 1) from `seed`.
fn random(device: &Device, shape: &[usize], dtype: DType, seed: u64) -> Result<Tensor> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_f32(device, shape, dtype, &v)
}

/// Times every pass of `case` on `device` in `dtype`.
pub fn run_case(device: &Device, dtype: DType, case: &Case, timing: Timing) -> Result<Vec<Row>> {
    let size = dtype.size() as f64;
    let zeros = |shape: &[usize], dtype| Tensor::zeros(device, shape, dtype);
    let mut rows = Vec::new();
    let mut push = |pass: &'static str, (ms, min_ms, max_ms): (f64, f64, f64), flops: f64, bytes: f64| {
        rows.push(Row { id: case.id.clone(), family: case.family, pass, ms, min_ms, max_ms, flops, bytes });
    };
    match case.family {
        "conv" => {
            let (n, c, s) = (case.get("batch"), case.get("channels"), case.get("side"));
            let spec = Conv2dSpec::new(1, 1);
            let x = random(device, &[n, c, s, s], dtype, 1)?;
            let dy = random(device, &[n, c, s, s], dtype, 2)?;
            let w = random(device, &[c, c, 3, 3], dtype, 3)?;
            let b = random(device, &[c], dtype, 4)?;
            let mut y = zeros(&[n, c, s, s], dtype)?;
            let mut dx = zeros(&[n, c, s, s], dtype)?;
            let mut dw = zeros(&[c, c, 3, 3], dtype)?;
            let flops = 2.0 * (n * c * c * 9 * s * s) as f64;
            let (act, wt) = ((n * c * s * s) as f64 * size, (c * c * 9) as f64 * size);
            push("forward", time(device, timing, || conv2d_forward(&x, &w, Some(&b), spec, &mut y))?, flops, 2.0 * act + wt);
            if device.is_cuda() && dtype == DType::BF16 {
                // The CUDA-core kernel the tensor-core one replaced, for the variant notes.
                let t = time(device, timing, || conv2d_forward_using(ConvKernel::Simt, &x, &w, Some(&b), spec, &mut y))?;
                push("forward_simt", t, flops, 2.0 * act + wt);
            }
            push("backward_input", time(device, timing, || conv2d_backward_input(&dy, &w, spec, &mut dx))?, flops, 2.0 * act + wt);
            if device.is_cuda() && dtype == DType::BF16 {
                let t = time(device, timing, || conv2d_backward_input_using(ConvKernel::Simt, &dy, &w, spec, &mut dx))?;
                push("backward_input_simt", t, flops, 2.0 * act + wt);
            }
            push("backward_weight", time(device, timing, || conv2d_backward_weight(&x, &dy, spec, &mut dw))?, flops, 2.0 * act + wt);
            if device.is_cuda() && dtype == DType::BF16 {
                let t = time(device, timing, || conv2d_backward_weight_using(ConvKernel::Simt, &x, &dy, spec, &mut dw))?;
                push("backward_weight_simt", t, flops, 2.0 * act + wt);
            }
        }
        "attention" => {
            let (b, h, lq, lk, d) = (case.get("batch"), case.get("heads"), case.get("q_len"), case.get("kv_len"), case.get("head_dim"));
            let spec = AttentionSpec::new(h);
            let q = random(device, &[b, lq, h * d], dtype, 1)?;
            let k = random(device, &[b, lk, h * d], dtype, 2)?;
            let v = random(device, &[b, lk, h * d], dtype, 3)?;
            let dout = random(device, &[b, lq, h * d], dtype, 4)?;
            let mut out = zeros(&[b, lq, h * d], dtype)?;
            let mut lse = zeros(&[b, h, lq], DType::F32)?;
            let mut delta = zeros(&[b, h, lq], DType::F32)?;
            let mut dq = zeros(&[b, lq, h * d], dtype)?;
            let mut dk = zeros(&[b, lk, h * d], dtype)?;
            let mut dv = zeros(&[b, lk, h * d], dtype)?;
            let x = Qkv { q: &q, k: &k, v: &v };
            // q·kᵀ and p·v: 4·B·H·Lq·Lk·d; backward recomputes q·kᵀ and runs four more products (2.5x, the
            // FlashAttention papers' convention).
            let flops = 4.0 * (b * h * lq * lk * d) as f64;
            let io = ((2 * b * lq * h * d) + (2 * b * lk * h * d)) as f64 * size;
            push("forward", time(device, timing, || attention_forward(spec, x, &mut out, &mut lse))?, flops, io);
            if device.is_cuda() && dtype == DType::BF16 {
                let t = time(device, timing, || attention_forward_using(AttentionKernel::Simt, spec, x, &mut out, &mut lse))?;
                push("forward_simt", t, flops, io);
            }
            attention_forward(spec, x, &mut out, &mut lse)?;
            let t = time(device, timing, || {
                attention_backward(spec, x, &out, &lse, &dout, &mut delta, QkvGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv })
            })?;
            push("backward", t, 2.5 * flops, 2.0 * io);
            if device.is_cuda() && dtype == DType::BF16 {
                let t = time(device, timing, || {
                    let grads = QkvGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv };
                    attention_backward_using(AttentionKernel::Simt, spec, x, &out, &lse, &dout, &mut delta, grads)
                })?;
                push("backward_simt", t, 2.5 * flops, 2.0 * io);
            }
        }
        "groupnorm_silu" => {
            let (n, c, s, g) = (case.get("batch"), case.get("channels"), case.get("side"), case.get("groups"));
            let gn = GroupNorm { groups: g, eps: 1e-5, silu: true };
            let shape = [n, c, s, s];
            let x = random(device, &shape, dtype, 1)?;
            let dy = random(device, &shape, dtype, 2)?;
            let w = random(device, &[c], dtype, 3)?;
            let bias = random(device, &[c], dtype, 4)?;
            let mut y = zeros(&shape, dtype)?;
            let mut dx = zeros(&shape, dtype)?;
            let (mut mean, mut rstd) = (zeros(&[n, g], DType::F32)?, zeros(&[n, g], DType::F32)?);
            let (mut dw, mut db) = (zeros(&[c], dtype)?, zeros(&[c], dtype)?);
            let mut scratch = zeros(&group_norm_scratch_shape(&shape), DType::F32)?;
            let numel = (n * c * s * s) as f64;
            let t = time(device, timing, || {
                group_norm_forward(gn, &x, Affine { weight: &w, bias: &bias }, &mut y, StatsMut { mean: &mut mean, rstd: &mut rstd })
            })?;
            push("forward", t, 0.0, 2.0 * numel * size);
            let t = time(device, timing, || {
                let grads = NormGrads { dx: &mut dx, dweight: &mut dw, dbias: &mut db, scratch: &mut scratch };
                group_norm_backward(gn, &x, Affine { weight: &w, bias: &bias }, Stats { mean: &mean, rstd: &rstd }, &dy, grads)
            })?;
            push("backward", t, 0.0, 3.0 * numel * size);
        }
        "lstm" => {
            let (batch, steps) = (case.get("batch"), case.get("steps"));
            let config =
                LstmConfig { input_size: case.get("input"), hidden_size: case.get("hidden"), num_layers: case.get("layers"), bidirectional: true };
            let mut params = LstmParams::zeros(device, config, dtype)?;
            for (i, (_, t)) in params.named_mut().into_iter().enumerate() {
                // PyTorch's init range, U(-1/sqrt(H), 1/sqrt(H)).
                let r = random(device, t.shape(), DType::F32, 10 + i as u64)?.to_f32_vec()?;
                let bound = 1.0 / (config.hidden_size as f32).sqrt();
                t.write_f32(&r.iter().map(|v| v * bound).collect::<Vec<_>>())?;
            }
            let x = random(device, &[batch, steps, config.input_size], dtype, 1)?;
            let dy = random(device, &[batch, steps, config.output_size()], dtype, 2)?;
            let mut acts = LstmActivations::zeros(device, config, batch, steps, dtype)?;
            let mut grads = LstmParams::zeros(device, config, DType::F32)?;
            let mut scratch = LstmBackwardScratch::zeros(device, config, batch, steps, dtype)?;
            let mut dx = zeros(x.shape(), dtype)?;
            let h4 = 4 * config.hidden_size;
            let flops: f64 = (0..config.num_layers)
                .map(|l| 2.0 * (batch * steps * h4 * (config.layer_input_size(l) + config.hidden_size) * config.directions()) as f64)
                .sum();
            let io = (x.numel() + dy.numel()) as f64 * size;
            push("forward", time(device, timing, || lstm_forward(&params, &x, &mut acts))?, flops, io);
            lstm_forward(&params, &x, &mut acts)?;
            let t = time(device, timing, || lstm_backward(&params, &x, &acts, &dy, Some(&mut dx), &mut grads, &mut scratch))?;
            push("backward", t, 2.0 * flops, 2.0 * io);
        }
        "infonce" => {
            let (b, d) = (case.get("batch"), case.get("dim"));
            let a = random(device, &[b, d], dtype, 1)?;
            let bb = random(device, &[b, d], dtype, 2)?;
            let mut acts = InfoNceActivations::zeros(device, b, d, dtype)?;
            let (mut da, mut db) = (zeros(&[b, d], dtype)?, zeros(&[b, d], dtype)?);
            let flops = 2.0 * (b * b * d) as f64;
            let io = (2 * b * d) as f64 * size;
            push("forward", time(device, timing, || infonce_forward(&a, &bb, DEFAULT_TEMPERATURE, &mut acts))?, flops, io);
            infonce_forward(&a, &bb, DEFAULT_TEMPERATURE, &mut acts)?;
            push("backward", time(device, timing, || infonce_backward(&mut acts, 1.0, &mut da, &mut db))?, 2.0 * flops, 2.0 * io);
        }
        other => bail!("unknown bench family {other} (known: {})", FAMILIES.join(", ")),
    }
    Ok(rows)
}
