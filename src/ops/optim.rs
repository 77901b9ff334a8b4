//! Optimizer ops: the AdamW step (torch.optim.AdamW's update rule exactly) on f32 master weights and f32
//! state, optionally refreshing a bf16 copy of the weights for the forward pass, and global-norm gradient
//! clipping (torch.nn.utils.clip_grad_norm_). Parameters, state and gradients are updated in place.
//! CPU: f32 reference. CUDA: `kernels/optim.cu`; gradients f32 or bf16, all arithmetic f32.

use anyhow::{ensure, Result};
use cudarc::driver::LaunchConfig;
use rayon::prelude::*;

use super::{common_device, common_dtype, same_shape};
use crate::runtime::cuda::KernelArg::{Ptr, F32, I32};
use crate::runtime::device::Device;
use crate::tensor::{f32_to_bytes, DType, Tensor};

pub const KERNEL_FILE: &str = "optim.cu";

/// Length of the `partials` scratch `clip_grad_norm` takes (the CUDA partial-sum grid, in blocks).
pub const PARTIALS: usize = 256;
const BLOCK: u32 = 256;
const CHUNK: usize = 1 << 14;

fn kernel(dtype: DType, f32_kernel: &'static str, bf16_kernel: &'static str) -> &'static str {
    if dtype == DType::BF16 {
        bf16_kernel
    } else {
        f32_kernel
    }
}

/// AdamW hyperparameters, f64 like the Python floats torch computes its scalars from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamW {
    /// torch.optim.AdamW's defaults.
    fn default() -> AdamW {
        AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 }
    }
}

/// The per-step scalars, computed in f64 as torch does in Python, then used as f32.
struct StepScalars {
    decay: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    eps: f32,
    step_size: f32,
    bc2_sqrt: f32,
}

impl AdamW {
    fn scalars(&self, step: u64) -> StepScalars {
        let t = step as f64;
        StepScalars {
            decay: (1.0 - self.lr * self.weight_decay) as f32,
            one_minus_beta1: (1.0 - self.beta1) as f32,
            beta2: self.beta2 as f32,
            one_minus_beta2: (1.0 - self.beta2) as f32,
            eps: self.eps as f32,
            step_size: (self.lr / (1.0 - self.beta1.powf(t))) as f32,
            bc2_sqrt: (1.0 - self.beta2.powf(t)).sqrt() as f32,
        }
    }
}

/// One AdamW step, `step` counting from 1 (torch's `state["step"]` after its increment):
/// `p *= 1 - lr wd; m += (1 - b1)(g - m); v = b2 v + (1 - b2) g^2;
/// p += (-lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.
/// `param`, `m`, `v` are f32; `grad` f32 (or bf16 on CUDA); `param_bf16`, when given, receives the new
/// weights in bf16.
pub fn adamw_step(
    opt: &AdamW,
    step: u64,
    param: &mut Tensor,
    grad: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    param_bf16: Option<&mut Tensor>,
) -> Result<()> {
    const OP: &str = "adamw_step";
    ensure!(step >= 1, "{OP}: steps count from 1, got {step}");
    let device = common_device(OP, &[param, grad, m, v])?;
    same_shape(OP, &[param, grad, m, v])?;
    for (what, t) in [("param", &*param), ("m", &*m), ("v", &*v)] {
        ensure!(t.dtype() == DType::F32, "{OP}: {what} {:?} must be f32 (master weights and state), got {}", t.shape(), t.dtype());
    }
    let grad_dtype = common_dtype(OP, &device, &[grad])?;
    if let Some(b) = &param_bf16 {
        common_device(OP, &[param, b])?;
        same_shape(OP, &[param, b])?;
        ensure!(b.dtype() == DType::BF16, "{OP}: the weight copy {:?} must be bf16, got {}", b.shape(), b.dtype());
    }
    let s = opt.scalars(step);
    match &device {
        Device::Cpu => {
            let g = grad.f32s()?;
            let (m, v) = (m.f32s_mut()?, v.f32s_mut()?);
            let p = param.f32s_mut()?;
            p.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK))).for_each(
                |((p, g), (m, v))| {
                    for i in 0..p.len() {
                        let mi = m[i] + s.one_minus_beta1 * (g[i] - m[i]);
                        let vi = s.beta2 * v[i] + s.one_minus_beta2 * g[i] * g[i];
                        m[i] = mi;
                        v[i] = vi;
                        p[i] = p[i] * s.decay + (-s.step_size * mi) / (vi.sqrt() / s.bc2_sqrt + s.eps);
                    }
                },
            );
            if let Some(b) = param_bf16 {
                let bytes = f32_to_bytes(DType::BF16, param.f32s()?);
                b.host_bytes_mut()?.copy_from_slice(&bytes);
            }
            Ok(())
        }
        Device::Cuda(d) => {
            let copy = match param_bf16 {
                Some(b) => b.cuda_ptr()?,
                None => 0,
            };
            d.launch_elementwise(
                KERNEL_FILE,
                kernel(grad_dtype, "adamw_step_f32", "adamw_step_bf16"),
                &[
                    Ptr(param.cuda_ptr()?),
                    Ptr(grad.cuda_ptr()?),
                    Ptr(m.cuda_ptr()?),
                    Ptr(v.cuda_ptr()?),
                    Ptr(copy),
                    F32(s.decay),
                    F32(s.one_minus_beta1),
                    F32(s.beta2),
                    F32(s.one_minus_beta2),
                    F32(s.eps),
                    F32(s.step_size),
                    F32(s.bc2_sqrt),
                ],
                param.numel(),
            )
        }
    }
}

/// Global-norm clipping as torch.nn.utils.clip_grad_norm_ (L2): `total_norm[0]` (one f32) receives the
/// norm of all `grads` together, before clipping, and every gradient is multiplied by
/// `min(1, max_norm / (norm + 1e-6))`. On CUDA nothing returns to the host: the coefficient is read from
/// `total_norm` on the device. `partials` is f32 scratch of `PARTIALS` elements; the sums are
/// deterministic (fixed shares, fixed order), f64 on the CPU and f32 on CUDA.
pub fn clip_grad_norm(grads: &mut [&mut Tensor], max_norm: f32, total_norm: &mut Tensor, partials: &mut Tensor) -> Result<()> {
    const OP: &str = "clip_grad_norm";
    let device = total_norm.device();
    common_device(OP, &[total_norm, partials])?;
    for g in grads.iter() {
        ensure!(g.device().same(&device), "{OP}: gradient {:?} lives on {}, the norm on {device}", g.shape(), g.device());
        common_dtype(OP, &device, &[&**g])?;
    }
    ensure!(
        total_norm.dtype() == DType::F32 && total_norm.numel() == 1,
        "{OP}: the norm must be one f32 element, got {} {:?}",
        total_norm.dtype(),
        total_norm.shape()
    );
    ensure!(
        partials.dtype() == DType::F32 && partials.numel() == PARTIALS,
        "{OP}: partials must be {PARTIALS} f32 elements, got {} {:?}",
        partials.dtype(),
        partials.shape()
    );
    match &device {
        Device::Cpu => {
            let mut sumsq = 0f64;
            for g in grads.iter() {
                sumsq +=
                    g.f32s()?.par_chunks(CHUNK).map(|c| c.iter().map(|&x| x as f64 * x as f64).sum::<f64>()).collect::<Vec<_>>().iter().sum::<f64>();
            }
            let norm = sumsq.sqrt() as f32;
            total_norm.f32s_mut()?[0] = norm;
            let coef = (max_norm / (norm + 1e-6)).min(1.0);
            for g in grads.iter_mut() {
                g.f32s_mut()?.par_iter_mut().with_min_len(CHUNK).for_each(|x| *x *= coef);
            }
            Ok(())
        }
        Device::Cuda(d) => {
            let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
            let accumulate = |count: usize, first: bool| {
                d.launch(
                    KERNEL_FILE,
                    "accumulate_sum",
                    one,
                    &[Ptr(partials.cuda_ptr()?), I32(count as i32), I32(first as i32), Ptr(total_norm.cuda_ptr()?)],
                    None,
                )
            };
            // An empty list still writes a norm of 0.
            accumulate(0, true)?;
            for g in grads.iter() {
                // One block per BLOCK elements, at most PARTIALS: a small tensor (a bias) needs one block, not a
                // grid of idle ones. The grid depends only on the size, so the sum's order (and bits) is fixed.
                let blocks = g.numel().div_ceil(BLOCK as usize).clamp(1, PARTIALS);
                let grid = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
                let name = kernel(g.dtype(), "sumsq_partials_f32", "sumsq_partials_bf16");
                d.launch(KERNEL_FILE, name, grid, &[Ptr(g.cuda_ptr()?), Ptr(partials.cuda_ptr()?)], Some(g.numel() as i64))?;
                accumulate(blocks, false)?;
            }
            d.launch(
                KERNEL_FILE,
                "finish_norm",
                LaunchConfig { grid_dim: (1, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 },
                &[Ptr(total_norm.cuda_ptr()?)],
                None,
            )?;
            for g in grads.iter() {
                let name = kernel(g.dtype(), "clip_scale_f32", "clip_scale_bf16");
                d.launch_elementwise(KERNEL_FILE, name, &[Ptr(g.cuda_ptr()?), Ptr(total_norm.cuda_ptr()?), F32(max_norm)], g.numel())?;
            }
            Ok(())
        }
    }
}
