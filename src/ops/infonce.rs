//! InfoNCE / symmetric NT-Xent between two batches of embeddings (the EEG–image contrastive loss), as
//! CLIP-style code computes it: `a_n, b_n = normalize(a), normalize(b)` (rows, `F.normalize`'s eps 1e-12),
//! `logits = a_n · b_nᵀ / temperature`, `loss = (CE(logits, arange(B)) + CE(logitsᵀ, arange(B))) / 2` with
//! mean reduction. Forward saves the unit rows, norms, logits and both log-sum-exp vectors; backward turns a
//! scalar `dloss` into `da`, `db` (`=`).
//!
//! The similarity GEMMs go through `matmul` (matrixmultiply / cuBLASLt); the rest is `kernels/infonce.cu` on
//! CUDA: one launch normalises both batches, one computes the row and column log-sum-exps together, one
//! reduces them to the loss; backward is one launch for the logits gradient and one for the normalisation
//! backward around the two GEMMs. Statistics, logits and the loss are f32 on every backend.

use anyhow::{bail, ensure, Result};
use cudarc::driver::LaunchConfig;
use rayon::prelude::*;

use super::linear::{matmul, MatmulSpec};
use crate::memory::allocator::{Allocator, Standalone};
use crate::runtime::cuda::KernelArg::{Ptr, F32, I32};
use crate::runtime::device::Device;
use crate::tensor::{DType, Tensor};

pub const KERNEL_FILE: &str = "infonce.cu";

/// The SGDM ContrastiveAlignment temperature.
pub const DEFAULT_TEMPERATURE: f32 = 0.07;

/// `F.normalize`'s eps: rows are divided by `max(‖x‖, eps)`.
const NORM_EPS: f32 = 1e-12;

/// What backward needs from forward, plus backward's scratch, for one (batch, dim, dtype).
pub struct InfoNceActivations {
    batch: usize,
    dim: usize,
    dtype: DType,
    temperature: f32,
    /// Unit rows of a and b, storage dtype `[B, D]` (the GEMM operands).
    a_unit: Tensor,
    b_unit: Tensor,
    /// ‖a_i‖ then ‖b_i‖, f32 `[2B]`.
    norms: Tensor,
    /// f32 `[B, B]`.
    logits: Tensor,
    /// Row log-sum-exps then column log-sum-exps of the logits, f32 `[2B]`.
    lse: Tensor,
    /// f32 `[1]`.
    loss: Tensor,
    /// Backward scratch: dloss/dlogits in the storage dtype `[B, B]`, and the gradients of the unit rows,
    /// f32 `[B, D]` each.
    dlogits: Tensor,
    da_unit: Tensor,
    db_unit: Tensor,
}

impl InfoNceActivations {
    /// Every tensor's shape and dtype, in the order of the fields (and of allocation).
    fn layout(batch: usize, dim: usize, dtype: DType) -> [(Vec<usize>, DType); 9] {
        let (b, d) = (batch, dim);
        [
            (vec![b, d], dtype),
            (vec![b, d], dtype),
            (vec![2 * b], DType::F32),
            (vec![b, b], DType::F32),
            (vec![2 * b], DType::F32),
            (vec![1], DType::F32),
            (vec![b, b], dtype),
            (vec![b, d], DType::F32),
            (vec![b, d], DType::F32),
        ]
    }

    /// Makes every tensor with `alloc`; `dtype` is the embeddings' storage dtype.
    pub fn new(batch: usize, dim: usize, dtype: DType, alloc: &mut dyn Allocator) -> Result<InfoNceActivations> {
        let mut t = InfoNceActivations::layout(batch, dim, dtype).into_iter().map(|(shape, dtype)| alloc.alloc(&shape, dtype));
        let mut next = || t.next().expect("the layout lists every tensor");
        Ok(InfoNceActivations {
            batch,
            dim,
            dtype,
            temperature: DEFAULT_TEMPERATURE,
            a_unit: next()?,
            b_unit: next()?,
            norms: next()?,
            logits: next()?,
            lse: next()?,
            loss: next()?,
            dlogits: next()?,
            da_unit: next()?,
            db_unit: next()?,
        })
    }

    /// Standalone zero tensors on `device`.
    pub fn zeros(device: &Device, batch: usize, dim: usize, dtype: DType) -> Result<InfoNceActivations> {
        InfoNceActivations::new(batch, dim, dtype, &mut Standalone(device.clone()))
    }

    /// The loss as a device tensor `[1]` f32 (no host synchronisation).
    pub fn loss_tensor(&self) -> &Tensor {
        &self.loss
    }

    /// The loss of the last forward, read back to the host (waits for the device).
    pub fn loss(&self) -> Result<f32> {
        Ok(self.loss.to_f32_vec()?[0])
    }

    /// The logits of the last forward, f32 `[B, B]` (retrieval metrics rank them).
    pub fn logits(&self) -> &Tensor {
        &self.logits
    }
}

fn kernel_name(dtype: DType, f32_name: &'static str, bf16_name: &'static str) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok(f32_name),
        DType::BF16 => Ok(bf16_name),
        DType::F16 => bail!("infonce: no f16 kernels"),
    }
}

/// Blocks of 256 threads, one warp per row, for `rows` rows.
fn warp_per_row(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows.div_ceil(8).max(1) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// Forward: saves what backward needs in `acts` and writes the loss into `acts.loss_tensor()` (read it with
/// `acts.loss()`). `a` and `b` are `[B, D]` rows paired by index.
pub fn infonce_forward(a: &Tensor, b: &Tensor, temperature: f32, acts: &mut InfoNceActivations) -> Result<()> {
    const OP: &str = "infonce_forward";
    ensure!(temperature.is_finite() && temperature > 0.0, "{OP}: temperature must be positive, got {temperature}");
    ensure!(a.shape().len() == 2 && a.shape()[0] > 0 && a.shape()[1] > 0, "{OP}: a must be [batch, dim], got {:?}", a.shape());
    ensure!(b.shape() == a.shape(), "{OP}: b {:?} must match a {:?}", b.shape(), a.shape());
    let (batch, dim) = (a.shape()[0], a.shape()[1]);
    ensure!((acts.batch, acts.dim) == (batch, dim), "{OP}: activations are for [{}, {}], the inputs are [{batch}, {dim}]", acts.batch, acts.dim);
    ensure!(batch * batch.max(dim) < i32::MAX as usize, "{OP}: batch {batch} x dim {dim} is too large");
    let device = super::common_device(OP, &[a, b, &acts.logits])?;
    let dtype = super::common_dtype(OP, &device, &[a, b, &acts.a_unit])?;
    acts.temperature = temperature;
    match &device {
        Device::Cpu => {
            let (a_unit, b_unit, norms) = (acts.a_unit.f32s_mut()?, acts.b_unit.f32s_mut()?, acts.norms.f32s_mut()?);
            let (na, nb) = norms.split_at_mut(batch);
            normalize_rows(a.f32s()?, a_unit, na, dim);
            normalize_rows(b.f32s()?, b_unit, nb, dim);
        }
        Device::Cuda(d) => {
            let name = kernel_name(dtype, "infonce_normalize_f32", "infonce_normalize_bf16")?;
            let args = [
                Ptr(a.cuda_ptr()?),
                Ptr(b.cuda_ptr()?),
                Ptr(acts.a_unit.cuda_ptr()?),
                Ptr(acts.b_unit.cuda_ptr()?),
                Ptr(acts.norms.cuda_ptr()?),
                I32(batch as i32),
                I32(dim as i32),
            ];
            d.launch(KERNEL_FILE, name, warp_per_row(2 * batch), &args, None)?;
        }
    }
    let spec = MatmulSpec { trans_b: true, alpha: 1.0 / temperature, ..MatmulSpec::default() };
    matmul(&acts.a_unit, &acts.b_unit, &mut acts.logits, spec)?;
    match &device {
        Device::Cpu => {
            let logits = acts.logits.f32s()?;
            let lse = acts.lse.f32s_mut()?;
            let (rows, cols) = lse.split_at_mut(batch);
            rows.par_iter_mut().zip(logits.par_chunks(batch)).for_each(|(r, l)| {
                let m = l.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                *r = m + l.iter().map(|&v| (v - m).exp()).sum::<f32>().ln();
            });
            let mut col_max = vec![f32::NEG_INFINITY; batch];
            for l in logits.chunks(batch) {
                for (m, &v) in col_max.iter_mut().zip(l) {
                    *m = m.max(v);
                }
            }
            let mut col_sum = vec![0f32; batch];
            for l in logits.chunks(batch) {
                for ((s, &m), &v) in col_sum.iter_mut().zip(&col_max).zip(l) {
                    *s += (v - m).exp();
                }
            }
            for ((c, m), s) in cols.iter_mut().zip(col_max).zip(col_sum) {
                *c = m + s.ln();
            }
            let total: f64 = (0..batch).map(|i| (rows[i] + cols[i] - 2.0 * logits[i * batch + i]) as f64).sum();
            acts.loss.f32s_mut()?[0] = (total / (2 * batch) as f64) as f32;
        }
        Device::Cuda(d) => {
            let (row_blocks, col_blocks) = (batch.div_ceil(8), batch.div_ceil(32));
            let cfg = LaunchConfig { grid_dim: ((row_blocks + col_blocks) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            d.launch(KERNEL_FILE, "infonce_softmax_stats", cfg, &[Ptr(acts.logits.cuda_ptr()?), Ptr(acts.lse.cuda_ptr()?), I32(batch as i32)], None)?;
            let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
            let args = [Ptr(acts.logits.cuda_ptr()?), Ptr(acts.lse.cuda_ptr()?), Ptr(acts.loss.cuda_ptr()?), I32(batch as i32)];
            d.launch(KERNEL_FILE, "infonce_loss", cfg, &args, None)?;
        }
    }
    Ok(())
}

/// `unit[i] = x[i] / max(‖x[i]‖, eps)`, `norms[i] = ‖x[i]‖`.
fn normalize_rows(x: &[f32], unit: &mut [f32], norms: &mut [f32], dim: usize) {
    unit.par_chunks_mut(dim).zip(x.par_chunks(dim)).zip(norms.par_iter_mut()).for_each(|((u, x), n)| {
        *n = x.iter().map(|v| v * v).sum::<f32>().sqrt();
        let inv = 1.0 / n.max(NORM_EPS);
        for (u, x) in u.iter_mut().zip(x) {
            *u = x * inv;
        }
    });
}

/// Backward of `normalize_rows`: `dx = (du - u (u·du)) / ‖x‖`, or `du / eps` where the norm was clamped.
fn normalize_rows_backward(unit: &[f32], norms: &[f32], du: &[f32], dx: &mut [f32], dim: usize) {
    dx.par_chunks_mut(dim).zip(unit.par_chunks(dim)).zip(du.par_chunks(dim)).zip(norms.par_iter()).for_each(|(((dx, u), du), &n)| {
        if n > NORM_EPS {
            let dot: f32 = u.iter().zip(du).map(|(u, d)| u * d).sum();
            for ((dx, u), du) in dx.iter_mut().zip(u).zip(du) {
                *dx = (du - u * dot) / n;
            }
        } else {
            for (dx, du) in dx.iter_mut().zip(du) {
                *dx = du / NORM_EPS;
            }
        }
    });
}

/// Backward from `dloss` (the gradient of the loss, a scalar): `da`, `db` `[B, D]` (`=`). `acts` holds the
/// forward of these inputs; its scratch is overwritten.
pub fn infonce_backward(acts: &mut InfoNceActivations, dloss: f32, da: &mut Tensor, db: &mut Tensor) -> Result<()> {
    const OP: &str = "infonce_backward";
    let (batch, dim) = (acts.batch, acts.dim);
    for (name, t) in [("da", &*da), ("db", &*db)] {
        ensure!(
            t.shape() == [batch, dim] && t.dtype() == acts.dtype,
            "{OP}: {name} must be {} [{batch}, {dim}] like the inputs, got {} {:?}",
            acts.dtype,
            t.dtype(),
            t.shape()
        );
    }
    let device = super::common_device(OP, &[da, db, &acts.logits])?;
    // d loss / d logits_ij = (softmax_row_i(j) + softmax_col_j(i) - 2 δ_ij) / 2B; logits = s / τ.
    let scale = dloss / (2.0 * batch as f32 * acts.temperature);
    match &device {
        Device::Cpu => {
            let (logits, lse) = (acts.logits.f32s()?, acts.lse.f32s()?);
            let (rows, cols) = lse.split_at(batch);
            acts.dlogits.f32s_mut()?.par_chunks_mut(batch).enumerate().for_each(|(i, g)| {
                for (j, g) in g.iter_mut().enumerate() {
                    let l = logits[i * batch + j];
                    let diag = if i == j { 2.0 } else { 0.0 };
                    *g = scale * ((l - rows[i]).exp() + (l - cols[j]).exp() - diag);
                }
            });
        }
        Device::Cuda(d) => {
            let name = kernel_name(acts.dtype, "infonce_logits_grad_f32", "infonce_logits_grad_bf16")?;
            let args = [Ptr(acts.logits.cuda_ptr()?), Ptr(acts.lse.cuda_ptr()?), Ptr(acts.dlogits.cuda_ptr()?), F32(scale), I32(batch as i32)];
            d.launch_elementwise(KERNEL_FILE, name, &args, batch * batch)?;
        }
    }
    matmul(&acts.dlogits, &acts.b_unit, &mut acts.da_unit, MatmulSpec::default())?;
    matmul(&acts.dlogits, &acts.a_unit, &mut acts.db_unit, MatmulSpec { trans_a: true, ..MatmulSpec::default() })?;
    match &device {
        Device::Cpu => {
            let norms = acts.norms.f32s()?;
            normalize_rows_backward(acts.a_unit.f32s()?, &norms[..batch], acts.da_unit.f32s()?, da.f32s_mut()?, dim);
            normalize_rows_backward(acts.b_unit.f32s()?, &norms[batch..], acts.db_unit.f32s()?, db.f32s_mut()?, dim);
        }
        Device::Cuda(d) => {
            let name = kernel_name(acts.dtype, "infonce_normalize_backward_f32", "infonce_normalize_backward_bf16")?;
            let args = [
                Ptr(acts.a_unit.cuda_ptr()?),
                Ptr(acts.b_unit.cuda_ptr()?),
                Ptr(acts.norms.cuda_ptr()?),
                Ptr(acts.da_unit.cuda_ptr()?),
                Ptr(acts.db_unit.cuda_ptr()?),
                Ptr(da.cuda_ptr()?),
                Ptr(db.cuda_ptr()?),
                I32(batch as i32),
                I32(dim as i32),
            ];
            d.launch(KERNEL_FILE, name, warp_per_row(2 * batch), &args, None)?;
        }
    }
    Ok(())
}
