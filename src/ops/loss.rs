//! Losses and their gradients: mean squared error, and the Gaussian KL divergence of (mu, logvar) against
//! N(0, 1) as the VAE trainers use it. The loss is written to a one-element f32 tensor on the device, so a
//! training step never waits for the host; gradients are written (=) and take the upstream gradient of
//! the loss as `dloss` (1 for a plain step, 1/k when averaging k micro-batches).
//!
//! Reductions are deterministic on both devices: the elements are cut into `PARTIALS` fixed shares whose
//! sums land in the caller's `partials` scratch (f32, `PARTIALS` elements), then added in a fixed order.
//! CPU: f32 inputs, f64 accumulation. CUDA: `kernels/loss.cu`, f32 or bf16 inputs, f32 accumulation.

use anyhow::{ensure, Result};
use cudarc::driver::LaunchConfig;
use rayon::prelude::*;

use super::{common_device, common_dtype, same_shape};
use crate::runtime::cuda::{
    CudaDevice, KernelArg,
    KernelArg::{Ptr, F32, I32},
};
use crate::runtime::device::Device;
use crate::tensor::{DType, Tensor};

pub const KERNEL_FILE: &str = "loss.cu";

/// Length of the `partials` scratch every reduction takes (the CUDA partial-sum grid, in blocks).
pub const PARTIALS: usize = 256;
const BLOCK: u32 = 256;

fn kernel(dtype: DType, f32_kernel: &'static str, bf16_kernel: &'static str) -> &'static str {
    if dtype == DType::BF16 {
        bf16_kernel
    } else {
        f32_kernel
    }
}

fn check_outputs(op: &str, device: &Device, loss: &Tensor, partials: &Tensor) -> Result<()> {
    common_device(op, &[loss, partials])?;
    ensure!(loss.device().same(device), "{op}: the loss lives on {}, the inputs on {device}", loss.device());
    ensure!(loss.dtype() == DType::F32 && loss.numel() == 1, "{op}: the loss must be one f32 element, got {} {:?}", loss.dtype(), loss.shape());
    ensure!(
        partials.dtype() == DType::F32 && partials.numel() == PARTIALS,
        "{op}: partials must be {PARTIALS} f32 elements, got {} {:?}",
        partials.dtype(),
        partials.shape()
    );
    Ok(())
}

/// `scale * sum_i term(a_i, b_i)` with f64 accumulation over `PARTIALS` fixed shares, each share's sum
/// also written to `partials`: the result does not depend on the thread count.
fn cpu_reduce(a: &[f32], b: &[f32], scale: f64, partials: &mut [f32], term: impl Fn(f64, f64) -> f64 + Sync) -> f32 {
    let share = a.len().div_ceil(PARTIALS).max(1);
    let sums: Vec<f64> = (0..PARTIALS)
        .into_par_iter()
        .map(|k| {
            let range = (k * share).min(a.len())..((k + 1) * share).min(a.len());
            a[range.clone()].iter().zip(&b[range]).map(|(&a, &b)| term(a as f64, b as f64)).sum()
        })
        .collect();
    for (p, s) in partials.iter_mut().zip(&sums) {
        *p = *s as f32;
    }
    (scale * sums.iter().sum::<f64>()) as f32
}

/// Launches `name` on the partial-sum grid (one 256-thread block per 256 elements, at most `PARTIALS`: the
/// grid depends only on `n`, so the summation order is fixed), then `finish_sum` writing `scale * total` into
/// `loss`.
fn cuda_reduce(
    d: &CudaDevice,
    name: &'static str,
    inputs: [KernelArg; 2],
    n: usize,
    scale: f32,
    loss: &mut Tensor,
    partials: &mut Tensor,
) -> Result<()> {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, PARTIALS);
    let grid = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    d.launch(KERNEL_FILE, name, grid, &[inputs[0], inputs[1], Ptr(partials.cuda_ptr()?)], Some(n as i64))?;
    let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    d.launch(KERNEL_FILE, "finish_sum", one, &[Ptr(partials.cuda_ptr()?), I32(blocks as i32), F32(scale), Ptr(loss.cuda_ptr()?)], None)
}

/// `loss[0] = mean((pred - target)^2)` over every element (torch's `F.mse_loss`, reduction "mean").
pub fn mse_loss(pred: &Tensor, target: &Tensor, loss: &mut Tensor, partials: &mut Tensor) -> Result<()> {
    const OP: &str = "mse_loss";
    let device = common_device(OP, &[pred, target])?;
    same_shape(OP, &[pred, target])?;
    let dtype = common_dtype(OP, &device, &[pred, target])?;
    check_outputs(OP, &device, loss, partials)?;
    let n = pred.numel();
    ensure!(n > 0, "{OP}: the mean of an empty tensor {:?} is undefined", pred.shape());
    let scale = 1.0 / n as f64;
    match &device {
        Device::Cpu => {
            let v = cpu_reduce(pred.f32s()?, target.f32s()?, scale, partials.f32s_mut()?, |p, t| (p - t) * (p - t));
            loss.f32s_mut()?[0] = v;
            Ok(())
        }
        Device::Cuda(d) => cuda_reduce(
            d,
            kernel(dtype, "mse_partials_f32", "mse_partials_bf16"),
            [Ptr(pred.cuda_ptr()?), Ptr(target.cuda_ptr()?)],
            n,
            scale as f32,
            loss,
            partials,
        ),
    }
}

/// `dpred = dloss * 2 (pred - target) / numel`.
pub fn mse_loss_backward(pred: &Tensor, target: &Tensor, dloss: f32, dpred: &mut Tensor) -> Result<()> {
    const OP: &str = "mse_loss_backward";
    let device = common_device(OP, &[pred, target, dpred])?;
    same_shape(OP, &[pred, target, dpred])?;
    let dtype = common_dtype(OP, &device, &[pred, target, dpred])?;
    let n = pred.numel();
    ensure!(n > 0, "{OP}: the mean of an empty tensor {:?} is undefined", pred.shape());
    let coef = (2.0 * dloss as f64 / n as f64) as f32;
    match &device {
        Device::Cpu => {
            let (p, t) = (pred.f32s()?, target.f32s()?);
            dpred.f32s_mut()?.par_iter_mut().zip(p.par_iter().zip(t)).with_min_len(1 << 14).for_each(|(d, (p, t))| {
                *d = coef * (p - t);
            });
            Ok(())
        }
        Device::Cuda(d) => d.launch_elementwise(
            KERNEL_FILE,
            kernel(dtype, "mse_backward_f32", "mse_backward_bf16"),
            &[Ptr(pred.cuda_ptr()?), Ptr(target.cuda_ptr()?), F32(coef), Ptr(dpred.cuda_ptr()?)],
            n,
        ),
    }
}

fn kl_batch(op: &str, mu: &Tensor, logvar: &Tensor) -> Result<usize> {
    same_shape(op, &[mu, logvar])?;
    let batch = mu.shape().first().copied().unwrap_or(0);
    ensure!(batch > 0, "{op}: mu {:?} needs a leading batch dim of at least 1", mu.shape());
    Ok(batch)
}

/// The VAE's KL term against N(0, 1), summed over every element and averaged over the batch (dim 0):
/// `loss[0] = -0.5 * sum(1 + logvar - mu^2 - exp(logvar)) / batch`. This equals diffusers'
/// `DiagonalGaussianDistribution.kl().mean()` (0.5 * sum(mu^2 + var - 1 - logvar) per sample, then the
/// batch mean) and the classic `-0.5 * torch.sum(...)` divided by the batch size.
pub fn kl_loss(mu: &Tensor, logvar: &Tensor, loss: &mut Tensor, partials: &mut Tensor) -> Result<()> {
    const OP: &str = "kl_loss";
    let device = common_device(OP, &[mu, logvar])?;
    let batch = kl_batch(OP, mu, logvar)?;
    let dtype = common_dtype(OP, &device, &[mu, logvar])?;
    check_outputs(OP, &device, loss, partials)?;
    let scale = -0.5 / batch as f64;
    match &device {
        Device::Cpu => {
            let v = cpu_reduce(mu.f32s()?, logvar.f32s()?, scale, partials.f32s_mut()?, |m, lv| 1.0 + lv - m * m - lv.exp());
            loss.f32s_mut()?[0] = v;
            Ok(())
        }
        Device::Cuda(d) => cuda_reduce(
            d,
            kernel(dtype, "kl_partials_f32", "kl_partials_bf16"),
            [Ptr(mu.cuda_ptr()?), Ptr(logvar.cuda_ptr()?)],
            mu.numel(),
            scale as f32,
            loss,
            partials,
        ),
    }
}

/// Gradients of `kl_loss` times `dloss`: `dmu = dloss * mu / batch`,
/// `dlogvar = dloss * (exp(logvar) - 1) / (2 batch)`.
pub fn kl_loss_backward(mu: &Tensor, logvar: &Tensor, dloss: f32, dmu: &mut Tensor, dlogvar: &mut Tensor) -> Result<()> {
    const OP: &str = "kl_loss_backward";
    let device = common_device(OP, &[mu, logvar, dmu, dlogvar])?;
    let batch = kl_batch(OP, mu, logvar)?;
    same_shape(OP, &[mu, dmu, dlogvar])?;
    let dtype = common_dtype(OP, &device, &[mu, logvar, dmu, dlogvar])?;
    let coef = (dloss as f64 / batch as f64) as f32;
    match &device {
        Device::Cpu => {
            for (d, m) in dmu.f32s_mut()?.iter_mut().zip(mu.f32s()?) {
                *d = coef * m;
            }
            for (d, lv) in dlogvar.f32s_mut()?.iter_mut().zip(logvar.f32s()?) {
                *d = 0.5 * coef * lv.exp_m1(); // exp(lv) - 1 cancels near lv = 0
            }
            Ok(())
        }
        Device::Cuda(d) => d.launch_elementwise(
            KERNEL_FILE,
            kernel(dtype, "kl_backward_f32", "kl_backward_bf16"),
            &[Ptr(mu.cuda_ptr()?), Ptr(logvar.cuda_ptr()?), F32(coef), Ptr(dmu.cuda_ptr()?), Ptr(dlogvar.cuda_ptr()?)],
            mu.numel(),
        ),
    }
}
