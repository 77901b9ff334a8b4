//! The denoising loop's arithmetic as device ops, so a step runs without a host round trip: the guided
//! scheduler update ([`guided_step`]) and the structure head's input rescaling ([`rescale_rows`]).
//! CPU: the f64/f32 reference ([`StepCoefficients::apply`]'s arithmetic). CUDA: `kernels/sampling.cu`.

use anyhow::{ensure, Result};

use super::{common_device, common_dtype};
use crate::diffusion::scheduler::StepCoefficients;
use crate::runtime::cuda::KernelArg::{Ptr, F32, F64, I32};
use crate::runtime::device::Device;
use crate::tensor::{DType, Tensor};
use cudarc::driver::LaunchConfig;

pub const KERNEL_FILE: &str = "sampling.cu";

/// One step of the sampling loop after the model's noise prediction.
#[derive(Debug, Clone, Copy)]
pub struct GuidedStep {
    /// Classifier-free guidance scale, or `None` for a single unguided branch.
    pub guidance: Option<f32>,
    /// The scheduler step's coefficients.
    pub coefficients: StepCoefficients,
    /// The new sample times this is written to `out` (the next step's input scale, or 1 / the VAE's
    /// scaling factor after the last step).
    pub out_scale: f32,
}

/// `eps` [n] (unguided) or [2n] (guided: conditional rows, then unconditional): combines the branches as
/// `u + g (c - u)`, applies the scheduler step to the f32 state `sample` [n] and `x0` [n] (the previous
/// step's clean-sample prediction on entry, this step's on return), and writes `sample · out_scale` into
/// `out`, once per `out.numel() / n` copies (each guidance branch's next input, or the decoder's input).
pub fn guided_step(eps: &Tensor, step: &GuidedStep, sample: &mut Tensor, x0: &mut Tensor, out: &mut Tensor) -> Result<()> {
    const OP: &str = "guided_step";
    let device = common_device(OP, &[eps, sample, x0, out])?;
    let dtype = common_dtype(OP, &device, &[eps, out])?;
    ensure!(sample.dtype() == DType::F32 && x0.dtype() == DType::F32, "{OP}: sample and x0 must be f32, got {} and {}", sample.dtype(), x0.dtype());
    let n = sample.numel();
    ensure!(n > 0 && x0.numel() == n, "{OP}: sample {:?} and x0 {:?} must have the same, non-zero size", sample.shape(), x0.shape());
    let branches = if step.guidance.is_some() { 2 } else { 1 };
    ensure!(eps.numel() == branches * n, "{OP}: eps {:?} must hold {branches} x {n} values", eps.shape());
    ensure!(out.numel() > 0 && out.numel().is_multiple_of(n), "{OP}: out {:?} is not a whole number of copies of {n} values", out.shape());
    let copies = out.numel() / n;
    let c = step.coefficients;
    let _profile = crate::profile::scope(crate::profile::Family::Elementwise, || {
        (device.clone(), 12.0 * n as f64, (eps.numel() * dtype.size() + 16 * n + out.numel() * dtype.size()) as f64)
    });
    match device {
        Device::Cpu => {
            let (eps, out) = (eps.f32s()?, out.f32s_mut()?);
            let (sample, x0) = (sample.f32s_mut()?, x0.f32s_mut()?);
            for i in 0..n {
                let e = match step.guidance {
                    Some(g) => {
                        let (cv, u) = (eps[i], eps[i + n]);
                        u + g * (cv - u)
                    }
                    None => eps[i],
                };
                let (sv, ev, prev) = (sample[i] as f64, e as f64, x0[i] as f64);
                let x0v = c.x0_sample * sv + c.x0_eps * ev;
                let next = (c.sample * sv + c.eps * ev + c.x0 * x0v + c.x0_prev * prev) as f32;
                sample[i] = next;
                x0[i] = x0v as f32;
                let o = next * step.out_scale;
                for k in 0..copies {
                    out[i + k * n] = o;
                }
            }
            Ok(())
        }
        Device::Cuda(d) => d.launch_elementwise(
            KERNEL_FILE,
            if dtype == DType::BF16 { "guided_step_bf16" } else { "guided_step_f32" },
            &[
                Ptr(eps.cuda_ptr()?),
                Ptr(sample.cuda_ptr()?),
                Ptr(x0.cuda_ptr()?),
                Ptr(out.cuda_ptr()?),
                F64(c.x0_sample),
                F64(c.x0_eps),
                F64(c.sample),
                F64(c.eps),
                F64(c.x0),
                F64(c.x0_prev),
                F32(step.guidance.unwrap_or(1.0)),
                I32(step.guidance.is_some() as i32),
                F32(step.out_scale),
                I32(copies as i32),
            ],
            n,
        ),
    }
}

/// Each row of `x` [rows, d] scaled to Euclidean length `norm` into `y` (a zero row stays zero).
pub fn rescale_rows(x: &Tensor, norm: f32, y: &mut Tensor) -> Result<()> {
    const OP: &str = "rescale_rows";
    let device = common_device(OP, &[x, y])?;
    let dtype = common_dtype(OP, &device, &[x, y])?;
    ensure!(x.shape().len() == 2 && x.shape() == y.shape(), "{OP}: x {:?} and y {:?} must be the same [rows, d]", x.shape(), y.shape());
    let (rows, d) = (x.shape()[0], x.shape()[1]);
    ensure!(d > 0 && d <= i32::MAX as usize, "{OP}: row length {d} out of range");
    if rows == 0 {
        return Ok(());
    }
    match device {
        Device::Cpu => {
            for (xr, yr) in x.f32s()?.chunks_exact(d).zip(y.f32s_mut()?.chunks_exact_mut(d)) {
                let len = xr.iter().map(|v| v * v).sum::<f32>().sqrt();
                let k = if len > 0.0 { norm / len } else { 0.0 };
                for (o, v) in yr.iter_mut().zip(xr) {
                    *o = v * k;
                }
            }
            Ok(())
        }
        Device::Cuda(dev) => {
            let cfg = LaunchConfig { grid_dim: (rows.min(65_535) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            dev.launch(
                KERNEL_FILE,
                if dtype == DType::BF16 { "rescale_rows_bf16" } else { "rescale_rows_f32" },
                cfg,
                &[Ptr(x.cuda_ptr()?), Ptr(y.cuda_ptr()?), F32(norm), I32(d as i32)],
                Some(rows as i64),
            )
        }
    }
}
