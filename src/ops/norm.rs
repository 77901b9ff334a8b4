//! Normalisation: GroupNorm over [N, C, spatial...] with an optional fused SiLU (diffusers' ResnetBlock2D
//! applies its norm and then SiLU), and LayerNorm over the last dimension. Forward and backward.
//!
//! Contract shared by both:
//! - Forward writes `y` and the statistics the backward needs: the mean and `rstd = 1 / sqrt(var + eps)` of
//!   each (batch, group) or row, always f32 (also for bf16 storage), biased variance as in PyTorch.
//! - With SiLU fused, the pre-activation `h = xhat * weight + bias` is recomputed in the backward from `x` and
//!   the statistics rather than stored: one tensor less to keep, a few flops more.
//! - Backward writes `dx` (=) and adds to `dweight` and `dbias` (+=). The parameter grads go through per-block
//!   partial sums in the caller's f32 `scratch` ([`group_norm_scratch_shape`], [`layer_norm_scratch_shape`]),
//!   added up over the batch in a fixed order: results are deterministic on both backends, no atomics.
//!
//! CPU: rayon over (batch, group) or rows; statistics two-pass (mean, then mean squared deviation) with f64
//! accumulators, as are every other reduction. CUDA: `kernels/norm.cu`, f32 or bf16 storage, f32 arithmetic.

use anyhow::{bail, ensure, Result};
use cudarc::driver::LaunchConfig;
use rayon::prelude::*;

use super::{common_device, common_dtype};
use crate::runtime::cuda::KernelArg::{Ptr, F32, I32, I64};
use crate::runtime::device::Device;
use crate::runtime::kernel_table;
use crate::tensor::{DType, Tensor};

pub const KERNEL_FILE: &str = "norm.cu";

/// Threads per GroupNorm block (one block per (batch, group)); the kernels' `__launch_bounds__`.
const GROUP_NORM_THREADS: u32 = 512;
/// Warps per LayerNorm forward block (one warp per row).
const LAYER_NORM_WARPS: u32 = 8;
/// The LayerNorm backward keeps two f32 column sums per warp in shared memory; 48 KiB needs no opt-in.
const LAYER_NORM_BACKWARD_SMEM: usize = 48 * 1024;

/// GroupNorm settings: `groups` must divide the channels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupNorm {
    pub groups: usize,
    pub eps: f32,
    /// Apply SiLU after the affine transform.
    pub silu: bool,
}

/// Per-channel (GroupNorm) or per-feature (LayerNorm) scale and shift.
#[derive(Clone, Copy)]
pub struct Affine<'a> {
    pub weight: &'a Tensor,
    pub bias: &'a Tensor,
}

/// Statistics written by a forward: f32, [N, groups] for GroupNorm, [rows] for LayerNorm.
pub struct StatsMut<'a> {
    pub mean: &'a mut Tensor,
    pub rstd: &'a mut Tensor,
}

/// Statistics read by a backward, as the forward wrote them.
#[derive(Clone, Copy)]
pub struct Stats<'a> {
    pub mean: &'a Tensor,
    pub rstd: &'a Tensor,
}

/// Where a backward writes: `dx` (=), `dweight` and `dbias` (+=), and its f32 scratch for partial sums.
pub struct NormGrads<'a> {
    pub dx: &'a mut Tensor,
    pub dweight: &'a mut Tensor,
    pub dbias: &'a mut Tensor,
    pub scratch: &'a mut Tensor,
}

/// (N, C, spatial size) of a GroupNorm input, checked against `groups`.
fn group_norm_dims(op: &str, gn: GroupNorm, x: &Tensor) -> Result<(usize, usize, usize)> {
    let s = x.shape();
    ensure!(s.len() >= 2, "{op}: x {s:?} is not [N, C, spatial...]");
    let (n, c, hw) = (s[0], s[1], s[2..].iter().product::<usize>());
    ensure!(n * c * hw > 0, "{op}: x {s:?} is empty");
    ensure!(gn.groups > 0 && c % gn.groups == 0, "{op}: {} groups do not divide the {c} channels of x {s:?}", gn.groups);
    ensure!(c <= i32::MAX as usize && n * gn.groups <= i32::MAX as usize, "{op}: x {s:?} is too large");
    Ok((n, c, hw))
}

/// (rows, D) of a LayerNorm input: every dimension but the last is a row.
fn layer_norm_dims(op: &str, x: &Tensor) -> Result<(usize, usize)> {
    let s = x.shape();
    ensure!(!s.is_empty() && x.numel() > 0, "{op}: x {s:?} is empty or a scalar");
    let d = s[s.len() - 1];
    ensure!(d <= i32::MAX as usize, "{op}: x {s:?} has too many features");
    Ok((x.numel() / d, d))
}

fn check_eps(op: &str, eps: f32) -> Result<()> {
    ensure!(eps.is_finite() && eps >= 0.0, "{op}: eps must be finite and non-negative, got {eps}");
    Ok(())
}

fn check_shape(op: &str, what: &str, t: &Tensor, want: &[usize], x: &Tensor) -> Result<()> {
    ensure!(t.shape() == want, "{op}: {what} {:?} does not match x {:?} (expected {want:?})", t.shape(), x.shape());
    Ok(())
}

fn check_f32(op: &str, what: &str, t: &Tensor) -> Result<()> {
    ensure!(t.dtype() == DType::F32, "{op}: {what} {:?} must be f32, got {}", t.shape(), t.dtype());
    Ok(())
}

fn check_affine(op: &str, affine: Affine, features: usize, x: &Tensor) -> Result<()> {
    check_shape(op, "weight", affine.weight, &[features], x)?;
    check_shape(op, "bias", affine.bias, &[features], x)
}

fn check_stats(op: &str, mean: &Tensor, rstd: &Tensor, want: &[usize], x: &Tensor) -> Result<()> {
    for (what, t) in [("mean", mean), ("rstd", rstd)] {
        check_shape(op, what, t, want, x)?;
        check_f32(op, what, t)?;
    }
    Ok(())
}

fn kernel(name: &str, dtype: DType) -> Result<&'static str> {
    let wanted = match dtype {
        DType::F32 => format!("{name}_f32"),
        DType::BF16 => format!("{name}_bf16"),
        DType::F16 => bail!("{name}: no f16 kernel"),
    };
    Ok(kernel_table::find(KERNEL_FILE, &wanted)?.name)
}

fn i32_arg(v: usize) -> crate::runtime::cuda::KernelArg {
    I32(v as i32)
}

/// The f32 scratch a GroupNorm backward needs: per-(batch, channel) sums for dweight and dbias.
pub fn group_norm_scratch_shape(x_shape: &[usize]) -> Vec<usize> {
    vec![2, x_shape.first().copied().unwrap_or(0), x_shape.get(1).copied().unwrap_or(0)]
}

/// Rows per LayerNorm backward block and the number of blocks. A function of the row count only, so the
/// partial sums, and with them the bits of dweight and dbias, do not depend on the device.
fn layer_norm_chunking(rows: usize) -> (usize, usize) {
    let rows_per_block = rows.div_ceil(512).max(32);
    (rows_per_block, rows.div_ceil(rows_per_block))
}

/// The f32 scratch a LayerNorm backward needs: per-block column sums for dweight and dbias.
pub fn layer_norm_scratch_shape(x_shape: &[usize]) -> Vec<usize> {
    let d = x_shape.last().copied().unwrap_or(0);
    let rows = x_shape.iter().product::<usize>().checked_div(d).unwrap_or(0);
    vec![2, layer_norm_chunking(rows).1, d]
}

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

fn silu_grad(h: f32) -> f32 {
    let s = sigmoid(h);
    s * (1.0 + h * (1.0 - s))
}

/// Two-pass statistics in f64: (mean, 1 / sqrt(biased variance + eps)).
fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean as f32, (1.0 / (var + eps as f64).sqrt()) as f32)
}

/// dweight[c] += sum_p part[0][p][c], dbias[c] += sum_p part[1][p][c], in order of p.
fn add_partials(part: &[f32], p: usize, dweight: &mut [f32], dbias: &mut [f32]) {
    let c = dweight.len();
    let (pw, pb) = part.split_at(p * c);
    for (j, (dw, db)) in dweight.iter_mut().zip(dbias.iter_mut()).enumerate() {
        *dw = (*dw as f64 + (0..p).map(|i| pw[i * c + j] as f64).sum::<f64>()) as f32;
        *db = (*db as f64 + (0..p).map(|i| pb[i * c + j] as f64).sum::<f64>()) as f32;
    }
}

fn reduce_partials(
    d: &crate::runtime::cuda::CudaDevice,
    dtype: DType,
    part: &Tensor,
    p: usize,
    c: usize,
    dweight: &Tensor,
    dbias: &Tensor,
) -> Result<()> {
    let cfg = LaunchConfig { grid_dim: (c.div_ceil(32) as u32, 1, 1), block_dim: (32, 8, 1), shared_mem_bytes: 0 };
    d.launch(
        KERNEL_FILE,
        kernel("norm_param_grad_reduce", dtype)?,
        cfg,
        &[Ptr(part.cuda_ptr()?), Ptr(dweight.cuda_ptr()?), Ptr(dbias.cuda_ptr()?), i32_arg(p), i32_arg(c)],
        None,
    )
}

/// GroupNorm forward: `y = (x - mean) * rstd * weight[c] + bias[c]` over each (batch, group), then
/// `y = y * sigmoid(y)` when `gn.silu`. x, y: [N, C, spatial...]; weight, bias: [C]; stats: [N, groups] f32.
pub fn group_norm_forward(gn: GroupNorm, x: &Tensor, affine: Affine, y: &mut Tensor, stats: StatsMut) -> Result<()> {
    const OP: &str = "group_norm_forward";
    let (n, c, hw) = group_norm_dims(OP, gn, x)?;
    check_eps(OP, gn.eps)?;
    check_affine(OP, affine, c, x)?;
    check_shape(OP, "y", y, x.shape(), x)?;
    check_stats(OP, stats.mean, stats.rstd, &[n, gn.groups], x)?;
    let device = common_device(OP, &[x, affine.weight, affine.bias, y, stats.mean, stats.rstd])?;
    let _profile = crate::profile::scope(crate::profile::Family::Norm, || {
        (device.clone(), 8.0 * x.numel() as f64, crate::profile::bytes_of(&[x.numel(), y.numel()], x.dtype().size()))
    });
    let dtype = common_dtype(OP, &device, &[x, affine.weight, affine.bias, y])?;
    let g = gn.groups;
    match device {
        Device::Cpu => {
            let (w, b) = (affine.weight.f32s()?, affine.bias.f32s()?);
            let (x, cg) = (x.f32s()?, c / g);
            let stats = stats.mean.f32s_mut()?.par_iter_mut().zip(stats.rstd.f32s_mut()?.par_iter_mut());
            y.f32s_mut()?.par_chunks_mut(cg * hw).zip(x.par_chunks(cg * hw)).zip(stats).enumerate().for_each(|(ng, ((y, x), (mean, rstd)))| {
                (*mean, *rstd) = moments(x, gn.eps);
                for (ci, (y, x)) in y.chunks_mut(hw).zip(x.chunks(hw)).enumerate() {
                    let ch = (ng % g) * cg + ci;
                    let (scale, shift) = (*rstd * w[ch], b[ch]);
                    for (y, &x) in y.iter_mut().zip(x) {
                        let h = (x - *mean) * scale + shift;
                        *y = if gn.silu { h * sigmoid(h) } else { h };
                    }
                }
            });
            Ok(())
        }
        Device::Cuda(d) => {
            let cfg = LaunchConfig { grid_dim: ((n * g) as u32, 1, 1), block_dim: (GROUP_NORM_THREADS, 1, 1), shared_mem_bytes: 0 };
            d.launch(
                KERNEL_FILE,
                kernel("group_norm_forward", dtype)?,
                cfg,
                &[
                    Ptr(x.cuda_ptr()?),
                    Ptr(affine.weight.cuda_ptr()?),
                    Ptr(affine.bias.cuda_ptr()?),
                    Ptr(y.cuda_ptr()?),
                    Ptr(stats.mean.cuda_ptr()?),
                    Ptr(stats.rstd.cuda_ptr()?),
                    i32_arg(c),
                    i32_arg(g),
                    I64(hw as i64),
                    F32(gn.eps),
                    I32(gn.silu as i32),
                ],
                None,
            )
        }
    }
}

/// GroupNorm backward (through the fused SiLU when `gn.silu`): writes `dx`, adds to `dweight` and `dbias`.
/// `stats` are the forward's; `grads.scratch` is f32 of [`group_norm_scratch_shape`].
pub fn group_norm_backward(gn: GroupNorm, x: &Tensor, affine: Affine, stats: Stats, dy: &Tensor, grads: NormGrads) -> Result<()> {
    const OP: &str = "group_norm_backward";
    let (n, c, hw) = group_norm_dims(OP, gn, x)?;
    check_affine(OP, affine, c, x)?;
    check_stats(OP, stats.mean, stats.rstd, &[n, gn.groups], x)?;
    check_shape(OP, "dy", dy, x.shape(), x)?;
    check_shape(OP, "dx", grads.dx, x.shape(), x)?;
    check_shape(OP, "dweight", grads.dweight, &[c], x)?;
    check_shape(OP, "dbias", grads.dbias, &[c], x)?;
    check_shape(OP, "scratch", grads.scratch, &group_norm_scratch_shape(x.shape()), x)?;
    check_f32(OP, "scratch", grads.scratch)?;
    let tensors = [x, affine.weight, affine.bias, dy, &*grads.dx, &*grads.dweight, &*grads.dbias];
    let device = common_device(OP, &[&tensors[..], &[stats.mean, stats.rstd, &*grads.scratch]].concat())?;
    let dtype = common_dtype(OP, &device, &tensors)?;
    let g = gn.groups;
    match device {
        Device::Cpu => {
            let (w, b) = (affine.weight.f32s()?, affine.bias.f32s()?);
            let (mean, rstd) = (stats.mean.f32s()?, stats.rstd.f32s()?);
            let (x, dy, cg) = (x.f32s()?, dy.f32s()?, c / g);
            let len = cg * hw;
            let part = grads.scratch.f32s_mut()?;
            let (pw, pb) = part.split_at_mut(n * c);
            let inputs = x.par_chunks(len).zip(dy.par_chunks(len));
            let partials = pw.par_chunks_mut(cg).zip(pb.par_chunks_mut(cg));
            grads.dx.f32s_mut()?.par_chunks_mut(len).zip(inputs).zip(partials).enumerate().for_each(|(ng, ((dx, (x, dy)), (pw, pb)))| {
                let (mean, rstd) = (mean[ng], rstd[ng]);
                let channel = |ci: usize| (ng % g) * cg + ci;
                // (xhat, g): g is dy carried back through the SiLU, if any.
                let xhat_g = |x: f32, dy: f32, ch: usize| {
                    let xhat = (x - mean) * rstd;
                    (xhat, if gn.silu { dy * silu_grad(xhat * w[ch] + b[ch]) } else { dy })
                };
                // The first pass parks g in dx, so the SiLU derivative is evaluated once per element.
                let (mut sum_dxhat, mut sum_dxhat_xhat) = (0f64, 0f64);
                for ci in 0..cg {
                    let (ch, range) = (channel(ci), ci * hw..(ci + 1) * hw);
                    let (mut sg, mut sgx) = (0f64, 0f64);
                    for ((dx, &x), &dy) in dx[range.clone()].iter_mut().zip(&x[range.clone()]).zip(&dy[range]) {
                        let (xhat, g) = xhat_g(x, dy, ch);
                        *dx = g;
                        sg += g as f64;
                        sgx += (g * xhat) as f64;
                    }
                    (pw[ci], pb[ci]) = (sgx as f32, sg as f32);
                    sum_dxhat += w[ch] as f64 * sg;
                    sum_dxhat_xhat += w[ch] as f64 * sgx;
                }
                let m1 = (sum_dxhat / len as f64) as f32;
                let m2 = (sum_dxhat_xhat / len as f64) as f32;
                for (ci, (dx, x)) in dx.chunks_mut(hw).zip(x.chunks(hw)).enumerate() {
                    let wc = w[channel(ci)];
                    for (dx, &x) in dx.iter_mut().zip(x) {
                        let xhat = (x - mean) * rstd;
                        *dx = rstd * (*dx * wc - m1 - xhat * m2);
                    }
                }
            });
            add_partials(grads.scratch.f32s()?, n, grads.dweight.f32s_mut()?, grads.dbias.f32s_mut()?);
            Ok(())
        }
        Device::Cuda(d) => {
            let cfg = LaunchConfig { grid_dim: ((n * g) as u32, 1, 1), block_dim: (GROUP_NORM_THREADS, 1, 1), shared_mem_bytes: 0 };
            d.launch(
                KERNEL_FILE,
                kernel("group_norm_backward", dtype)?,
                cfg,
                &[
                    Ptr(x.cuda_ptr()?),
                    Ptr(affine.weight.cuda_ptr()?),
                    Ptr(affine.bias.cuda_ptr()?),
                    Ptr(stats.mean.cuda_ptr()?),
                    Ptr(stats.rstd.cuda_ptr()?),
                    Ptr(dy.cuda_ptr()?),
                    Ptr(grads.dx.cuda_ptr()?),
                    Ptr(grads.scratch.cuda_ptr()?),
                    i32_arg(n),
                    i32_arg(c),
                    i32_arg(g),
                    I64(hw as i64),
                    I32(gn.silu as i32),
                ],
                None,
            )?;
            reduce_partials(&d, dtype, grads.scratch, n, c, grads.dweight, grads.dbias)
        }
    }
}

/// LayerNorm forward over the last dimension: `y = (x - mean) * rstd * weight + bias`.
/// x, y: [..., D]; weight, bias: [D]; stats: [rows] f32, rows = numel / D.
pub fn layer_norm_forward(eps: f32, x: &Tensor, affine: Affine, y: &mut Tensor, stats: StatsMut) -> Result<()> {
    const OP: &str = "layer_norm_forward";
    let (rows, d) = layer_norm_dims(OP, x)?;
    check_eps(OP, eps)?;
    check_affine(OP, affine, d, x)?;
    check_shape(OP, "y", y, x.shape(), x)?;
    check_stats(OP, stats.mean, stats.rstd, &[rows], x)?;
    let device = common_device(OP, &[x, affine.weight, affine.bias, y, stats.mean, stats.rstd])?;
    let _profile = crate::profile::scope(crate::profile::Family::Norm, || {
        (device.clone(), 8.0 * x.numel() as f64, crate::profile::bytes_of(&[x.numel(), y.numel()], x.dtype().size()))
    });
    let dtype = common_dtype(OP, &device, &[x, affine.weight, affine.bias, y])?;
    match device {
        Device::Cpu => {
            let (w, b, x) = (affine.weight.f32s()?, affine.bias.f32s()?, x.f32s()?);
            let stats = stats.mean.f32s_mut()?.par_iter_mut().zip(stats.rstd.f32s_mut()?.par_iter_mut());
            y.f32s_mut()?.par_chunks_mut(d).zip(x.par_chunks(d)).zip(stats).with_min_len(16).for_each(|((y, x), (mean, rstd))| {
                (*mean, *rstd) = moments(x, eps);
                for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
                    *y = (x - *mean) * *rstd * w + b;
                }
            });
            Ok(())
        }
        Device::Cuda(dev) => {
            let cfg = LaunchConfig {
                grid_dim: (rows.div_ceil(LAYER_NORM_WARPS as usize) as u32, 1, 1),
                block_dim: (LAYER_NORM_WARPS * 32, 1, 1),
                shared_mem_bytes: 0,
            };
            dev.launch(
                KERNEL_FILE,
                kernel("layer_norm_forward", dtype)?,
                cfg,
                &[
                    Ptr(x.cuda_ptr()?),
                    Ptr(affine.weight.cuda_ptr()?),
                    Ptr(affine.bias.cuda_ptr()?),
                    Ptr(y.cuda_ptr()?),
                    Ptr(stats.mean.cuda_ptr()?),
                    Ptr(stats.rstd.cuda_ptr()?),
                    I64(rows as i64),
                    i32_arg(d),
                    F32(eps),
                ],
                None,
            )
        }
    }
}

/// LayerNorm backward: writes `dx`, adds to `dweight` and `dbias`. `stats` are the forward's;
/// `grads.scratch` is f32 of [`layer_norm_scratch_shape`]. The bias does not enter the input gradient.
pub fn layer_norm_backward(x: &Tensor, weight: &Tensor, stats: Stats, dy: &Tensor, grads: NormGrads) -> Result<()> {
    const OP: &str = "layer_norm_backward";
    let (rows, d) = layer_norm_dims(OP, x)?;
    check_shape(OP, "weight", weight, &[d], x)?;
    check_stats(OP, stats.mean, stats.rstd, &[rows], x)?;
    check_shape(OP, "dy", dy, x.shape(), x)?;
    check_shape(OP, "dx", grads.dx, x.shape(), x)?;
    check_shape(OP, "dweight", grads.dweight, &[d], x)?;
    check_shape(OP, "dbias", grads.dbias, &[d], x)?;
    check_shape(OP, "scratch", grads.scratch, &layer_norm_scratch_shape(x.shape()), x)?;
    check_f32(OP, "scratch", grads.scratch)?;
    let tensors = [x, weight, dy, &*grads.dx, &*grads.dweight, &*grads.dbias];
    let device = common_device(OP, &[&tensors[..], &[stats.mean, stats.rstd, &*grads.scratch]].concat())?;
    let dtype = common_dtype(OP, &device, &tensors)?;
    let (rows_per_block, blocks) = layer_norm_chunking(rows);
    match device {
        Device::Cpu => {
            let (w, x, dy) = (weight.f32s()?, x.f32s()?, dy.f32s()?);
            let (mean, rstd) = (stats.mean.f32s()?, stats.rstd.f32s()?);
            let part = grads.scratch.f32s_mut()?;
            let (pw, pb) = part.split_at_mut(blocks * d);
            let chunk = rows_per_block * d;
            let inputs = x.par_chunks(chunk).zip(dy.par_chunks(chunk));
            let saved = mean.par_chunks(rows_per_block).zip(rstd.par_chunks(rows_per_block));
            let partials = pw.par_chunks_mut(d).zip(pb.par_chunks_mut(d));
            grads.dx.f32s_mut()?.par_chunks_mut(chunk).zip(inputs).zip(saved).zip(partials).for_each(|(((dx, (x, dy)), (mean, rstd)), (pw, pb))| {
                let (mut cw, mut cb) = (vec![0f64; d], vec![0f64; d]);
                for (r, (dx, (x, dy))) in dx.chunks_mut(d).zip(x.chunks(d).zip(dy.chunks(d))).enumerate() {
                    let (mean, rstd) = (mean[r], rstd[r]);
                    let (mut a1, mut a2) = (0f64, 0f64);
                    for j in 0..d {
                        let xhat = (x[j] - mean) * rstd;
                        let dxhat = dy[j] * w[j];
                        a1 += dxhat as f64;
                        a2 += (dxhat * xhat) as f64;
                        cw[j] += (dy[j] * xhat) as f64;
                        cb[j] += dy[j] as f64;
                    }
                    let (m1, m2) = ((a1 / d as f64) as f32, (a2 / d as f64) as f32);
                    for j in 0..d {
                        let xhat = (x[j] - mean) * rstd;
                        dx[j] = rstd * (dy[j] * w[j] - m1 - xhat * m2);
                    }
                }
                for j in 0..d {
                    (pw[j], pb[j]) = (cw[j] as f32, cb[j] as f32);
                }
            });
            add_partials(grads.scratch.f32s()?, blocks, grads.dweight.f32s_mut()?, grads.dbias.f32s_mut()?);
            Ok(())
        }
        Device::Cuda(dev) => {
            let warps = (LAYER_NORM_BACKWARD_SMEM / (2 * d * 4)).min(8);
            ensure!(warps > 0, "{OP}: x {:?}: CUDA supports at most {} features", x.shape(), LAYER_NORM_BACKWARD_SMEM / 8);
            let cfg =
                LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (warps as u32 * 32, 1, 1), shared_mem_bytes: (warps * 2 * d * 4) as u32 };
            dev.launch(
                KERNEL_FILE,
                kernel("layer_norm_backward", dtype)?,
                cfg,
                &[
                    Ptr(x.cuda_ptr()?),
                    Ptr(weight.cuda_ptr()?),
                    Ptr(stats.mean.cuda_ptr()?),
                    Ptr(stats.rstd.cuda_ptr()?),
                    Ptr(dy.cuda_ptr()?),
                    Ptr(grads.dx.cuda_ptr()?),
                    Ptr(grads.scratch.cuda_ptr()?),
                    I64(rows as i64),
                    i32_arg(d),
                    i32_arg(rows_per_block),
                ],
                None,
            )?;
            reduce_partials(&dev, dtype, grads.scratch, blocks, d, grads.dweight, grads.dbias)
        }
    }
}
