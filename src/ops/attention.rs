//! Multi-head scaled dot-product attention, self and cross, forward and backward.
//!
//! Layout: q [B, Lq, H*d], k and v [B, Lk, H*d], out [B, Lq, H*d] with heads interleaved in the last dimension,
//! exactly what diffusers' to_q/to_k/to_v produce, so no transposes surround the op. The forward saves the
//! per-row log-sum-exp `lse` [B, H, Lq] (f32 on every backend); the backward recomputes the probabilities
//! from it and needs a scratch `delta` [B, H, Lq] (f32) for the row sums of dout * out.
//! CPU: f32, rayon over (batch, head, query block) with `matrixmultiply::sgemm` for the products.
//! CUDA: flash-style kernels that never store the score matrix: `kernels/attention.cu` on the CUDA cores (f32
//! or bf16 storage), `kernels/attention_mma.cu` on tensor cores (bf16).

use anyhow::{ensure, Result};
use cudarc::driver::LaunchConfig;
use matrixmultiply::sgemm;
use rayon::prelude::*;

use super::{common_device, common_dtype, same_shape};
use crate::runtime::cuda::CudaDevice;
use crate::runtime::cuda::KernelArg::{self, Ptr, F32, I32};
use crate::runtime::device::Device;
use crate::runtime::kernel_table;
use crate::tensor::{DType, Tensor};

pub const KERNEL_FILE: &str = "attention.cu";
/// The tensor-core kernels (bf16, sm_80+).
pub const MMA_KERNEL_FILE: &str = "attention_mma.cu";

/// The attention kernels' choice ([`super::Variant`]); `SGDM_ATTENTION_KERNEL` overrides the default.
pub type AttentionKernel = super::Variant;

fn kernel_from_env() -> Result<AttentionKernel> {
    static CHOICE: std::sync::OnceLock<Result<AttentionKernel, String>> = std::sync::OnceLock::new();
    AttentionKernel::from_env_once(&CHOICE, "SGDM_ATTENTION_KERNEL")
}

/// Query rows per block of the tensor-core forward and dq kernels, key rows of the dk/dv kernel (4 warps of 16).
const MMA_FORWARD_ROWS: usize = 64;
/// The tensor-core backward holds dk and dv accumulators for 16 keys of the whole head in registers: up to
/// 96 columns (SD 1.5's 40 and 80) without spilling; larger heads take the CUDA-core backward.
const MMA_BACKWARD_MAX_HEAD_DIM: usize = 96;

/// The largest head dim the CUDA kernels hold in registers (5 columns per lane); SD 1.5 needs 160.
pub const MAX_HEAD_DIM: usize = 160;

/// Query rows per CUDA block: forward (4 warps x 8 rows), dq (4 x 4); keys per dk/dv block (4 x 4).
const CUDA_FORWARD_ROWS: usize = 32;
const CUDA_BACKWARD_ROWS: usize = 16;
const CUDA_THREADS: u32 = 128;

/// Query rows per CPU task: bounds the score block to 64 x Lk floats.
const CPU_ROWS: usize = 64;

/// Number of heads and score scale (`None`: 1/sqrt(head dim), as diffusers).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionSpec {
    pub heads: usize,
    pub scale: Option<f32>,
}

impl AttentionSpec {
    pub fn new(heads: usize) -> AttentionSpec {
        AttentionSpec { heads, scale: None }
    }

    pub fn with_scale(self, scale: f32) -> AttentionSpec {
        AttentionSpec { scale: Some(scale), ..self }
    }
}

/// The three projected inputs, each [B, L, H*d].
#[derive(Clone, Copy)]
pub struct Qkv<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
}

/// The input gradients, written (=), shaped as q, k and v.
pub struct QkvGrads<'a> {
    pub dq: &'a mut Tensor,
    pub dk: &'a mut Tensor,
    pub dv: &'a mut Tensor,
}

/// The sizes one call works on, checked against every tensor.
#[derive(Debug, Clone, Copy)]
pub struct AttentionDims {
    pub batch: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl AttentionDims {
    /// Checks q, k and v against each other and `spec`, and returns the sizes.
    pub fn of(op: &str, spec: AttentionSpec, x: Qkv) -> Result<AttentionDims> {
        let (q, k, v) = (x.q.shape(), x.k.shape(), x.v.shape());
        ensure!(q.len() == 3 && k.len() == 3, "{op}: q {q:?} and k {k:?} must be [batch, length, heads*head_dim]");
        ensure!(v == k, "{op}: v {v:?} does not match k {k:?}");
        ensure!(q[0] == k[0], "{op}: batch {} of q {q:?} differs from batch {} of k {k:?}", q[0], k[0]);
        ensure!(q[2] == k[2], "{op}: hidden size {} of q {q:?} differs from {} of k {k:?}", q[2], k[2]);
        ensure!(spec.heads > 0, "{op}: zero heads");
        ensure!(q[2] % spec.heads == 0, "{op}: hidden size {} of q {q:?} is not divisible by {} heads", q[2], spec.heads);
        let dims = AttentionDims { batch: q[0], q_len: q[1], kv_len: k[1], heads: spec.heads, head_dim: q[2] / spec.heads };
        ensure!(dims.batch > 0 && dims.q_len > 0 && dims.kv_len > 0 && dims.head_dim > 0, "{op}: empty dimension in q {q:?} or k {k:?}");
        ensure!(
            dims.head_dim <= MAX_HEAD_DIM,
            "{op}: head dim {} (q {q:?}, {} heads) exceeds the supported {MAX_HEAD_DIM}",
            dims.head_dim,
            spec.heads
        );
        Ok(dims)
    }

    fn hidden(&self) -> usize {
        self.heads * self.head_dim
    }

    /// [B, H, Lq]: the shape of `lse` and `delta`.
    pub fn row_stats_shape(&self) -> [usize; 3] {
        [self.batch, self.heads, self.q_len]
    }

    /// Floating-point operations of the forward: two products of 2*Lq*Lk*d per head.
    pub fn forward_flops(&self) -> u64 {
        4 * (self.batch * self.heads * self.q_len * self.kv_len * self.head_dim) as u64
    }

    fn scale(&self, spec: AttentionSpec) -> f32 {
        spec.scale.unwrap_or(1.0 / (self.head_dim as f32).sqrt())
    }
}

fn check_row_stats(op: &str, name: &str, dims: &AttentionDims, t: &Tensor) -> Result<()> {
    let want = dims.row_stats_shape();
    ensure!(t.shape() == want, "{op}: {name} {:?} must be [batch, heads, q_len] = {want:?}", t.shape());
    ensure!(t.dtype() == DType::F32, "{op}: {name} must be f32, got {}", t.dtype());
    Ok(())
}

/// `out = softmax(scale * q k^T) v` per head; `lse[b, h, i] = log sum_j exp(scale * q_i . k_j)`.
pub fn attention_forward(spec: AttentionSpec, x: Qkv, out: &mut Tensor, lse: &mut Tensor) -> Result<()> {
    attention_forward_using(kernel_from_env()?, spec, x, out, lse)
}

/// [`attention_forward`] on a chosen CUDA kernel (tests and benchmarks compare the variants; the CPU ignores it).
pub fn attention_forward_using(variant: AttentionKernel, spec: AttentionSpec, x: Qkv, out: &mut Tensor, lse: &mut Tensor) -> Result<()> {
    const OP: &str = "attention_forward";
    let dims = AttentionDims::of(OP, spec, x)?;
    let device = common_device(OP, &[x.q, x.k, x.v, out, lse])?;
    same_shape(OP, &[x.q, out])?;
    let dtype = common_dtype(OP, &device, &[x.q, x.k, x.v, out])?;
    check_row_stats(OP, "lse", &dims, lse)?;
    let scale = dims.scale(spec);
    let _profile = crate::profile::scope(crate::profile::Family::Attention, || {
        (
            device.clone(),
            dims.forward_flops() as f64,
            crate::profile::bytes_of(&[x.q.numel(), x.k.numel(), x.v.numel(), out.numel()], x.q.dtype().size()),
        )
    });
    match device {
        Device::Cpu => {
            cpu_forward(&dims, scale, x.q.f32s()?, x.k.f32s()?, x.v.f32s()?, out.f32s_mut()?, lse.f32s_mut()?);
            Ok(())
        }
        Device::Cuda(d) => {
            let args = [Ptr(x.q.cuda_ptr()?), Ptr(x.k.cuda_ptr()?), Ptr(x.v.cuda_ptr()?), Ptr(out.cuda_ptr()?), Ptr(lse.cuda_ptr()?)];
            if dtype == DType::BF16 && variant == AttentionKernel::TensorCore && d.arch.major >= 8 && dims.head_dim <= MAX_HEAD_DIM {
                let name = format!("attention_forward_mma_bf16_d{}", dims.head_dim.div_ceil(16) * 16);
                launch_rows(&d, kernel(MMA_KERNEL_FILE, &name)?, &dims, scale, MMA_FORWARD_ROWS, 32 * 4, dims.q_len, &args)
            } else {
                launch_tiled(&d, "attention_forward", dtype, &dims, scale, CUDA_FORWARD_ROWS, dims.q_len, &args)
            }
        }
    }
}

/// Gradients of `attention_forward`: `dq`, `dk`, `dv` written (=) from `dout`, using the saved `out` and `lse`.
/// `delta` [B, H, Lq] f32 is scratch (it ends up holding the row sums of dout * out).
pub fn attention_backward(spec: AttentionSpec, x: Qkv, out: &Tensor, lse: &Tensor, dout: &Tensor, delta: &mut Tensor, grads: QkvGrads) -> Result<()> {
    let variant = kernel_from_env()?;
    attention_backward_using(variant, spec, x, out, lse, dout, delta, grads)
}

/// [`attention_backward`] on a chosen CUDA kernel (tensor cores for bf16 head dims up to 96).
pub fn attention_backward_using(
    variant: AttentionKernel,
    spec: AttentionSpec,
    x: Qkv,
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    delta: &mut Tensor,
    grads: QkvGrads,
) -> Result<()> {
    const OP: &str = "attention_backward";
    let dims = AttentionDims::of(OP, spec, x)?;
    let QkvGrads { dq, dk, dv } = grads;
    let device = common_device(OP, &[x.q, x.k, x.v, out, lse, dout, delta, dq, dk, dv])?;
    same_shape(OP, &[x.q, out, dout, dq])?;
    same_shape(OP, &[x.k, dk, dv])?;
    let dtype = common_dtype(OP, &device, &[x.q, x.k, x.v, out, dout, dq, dk, dv])?;
    check_row_stats(OP, "lse", &dims, lse)?;
    check_row_stats(OP, "delta", &dims, delta)?;
    let scale = dims.scale(spec);
    match device {
        Device::Cpu => {
            let delta = delta.f32s_mut()?;
            cpu_row_dots(&dims, dout.f32s()?, out.f32s()?, delta);
            let saved = CpuSaved { q: x.q.f32s()?, k: x.k.f32s()?, v: x.v.f32s()?, dout: dout.f32s()?, lse: lse.f32s()?, delta };
            cpu_backward(&dims, scale, saved, dq.f32s_mut()?, dk.f32s_mut()?, dv.f32s_mut()?);
            Ok(())
        }
        Device::Cuda(d) => {
            let rows = dims.batch * dims.q_len * dims.heads;
            let name = kernel(KERNEL_FILE, &format!("attention_backward_delta_{}", dtype_suffix(dtype)))?.name;
            let blocks = (rows * 32).div_ceil(256);
            ensure!(blocks <= i32::MAX as usize, "{OP}: {rows} rows exceed one launch");
            let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            let args = [
                Ptr(dout.cuda_ptr()?),
                Ptr(out.cuda_ptr()?),
                Ptr(delta.cuda_ptr()?),
                I32(dims.q_len as i32),
                I32(dims.heads as i32),
                I32(dims.head_dim as i32),
            ];
            d.launch(KERNEL_FILE, name, cfg, &args, Some(rows as i64))?;
            let inputs = [
                Ptr(x.q.cuda_ptr()?),
                Ptr(x.k.cuda_ptr()?),
                Ptr(x.v.cuda_ptr()?),
                Ptr(dout.cuda_ptr()?),
                Ptr(lse.cuda_ptr()?),
                Ptr(delta.cuda_ptr()?),
            ];
            let mut dq_args = inputs.to_vec();
            dq_args.push(Ptr(dq.cuda_ptr()?));
            let mut dkdv_args = inputs.to_vec();
            dkdv_args.extend([Ptr(dk.cuda_ptr()?), Ptr(dv.cuda_ptr()?)]);
            if dtype == DType::BF16 && variant == AttentionKernel::TensorCore && d.arch.major >= 8 && dims.head_dim <= MMA_BACKWARD_MAX_HEAD_DIM {
                let dp = dims.head_dim.div_ceil(16) * 16;
                let dq_kernel = kernel(MMA_KERNEL_FILE, &format!("attention_backward_dq_mma_bf16_d{dp}"))?;
                launch_rows(&d, dq_kernel, &dims, scale, MMA_FORWARD_ROWS, 32 * 4, dims.q_len, &dq_args)?;
                let dkdv_kernel = kernel(MMA_KERNEL_FILE, &format!("attention_backward_dkdv_mma_bf16_d{dp}"))?;
                return launch_rows(&d, dkdv_kernel, &dims, scale, MMA_FORWARD_ROWS, 32 * 4, dims.kv_len, &dkdv_args);
            }
            launch_tiled(&d, "attention_backward_dq", dtype, &dims, scale, CUDA_BACKWARD_ROWS, dims.q_len, &dq_args)?;
            launch_tiled(&d, "attention_backward_dkdv", dtype, &dims, scale, CUDA_BACKWARD_ROWS, dims.kv_len, &dkdv_args)
        }
    }
}

fn dtype_suffix(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        _ => "bf16", // common_dtype admits only f32 and bf16 on CUDA
    }
}

fn kernel(file: &str, name: &str) -> Result<&'static kernel_table::Kernel> {
    kernel_table::find(file, name)
}

/// Launches one of the tiled kernels: grid (ceil(len / rows_per_block), B*H), the head-dim variant holding
/// `d` in ceil(d / 32) columns per lane; `args` are followed by Lq, Lk, H, d and the scale.
fn launch_tiled(
    d: &CudaDevice,
    kind: &str,
    dtype: DType,
    dims: &AttentionDims,
    scale: f32,
    rows_per_block: usize,
    len: usize,
    args: &[KernelArg],
) -> Result<()> {
    let variant = dims.head_dim.div_ceil(32) * 32;
    let kernel = kernel(KERNEL_FILE, &format!("{kind}_{}_d{variant}", dtype_suffix(dtype)))?;
    launch_rows(d, kernel, dims, scale, rows_per_block, CUDA_THREADS, len, args)
}

/// Launches `kernel` over (ceil(len / rows_per_block), batch * heads) blocks of `threads`, then the sizes.
fn launch_rows(
    d: &CudaDevice,
    kernel: &'static kernel_table::Kernel,
    dims: &AttentionDims,
    scale: f32,
    rows_per_block: usize,
    threads: u32,
    len: usize,
    args: &[KernelArg],
) -> Result<()> {
    let kind = kernel.name;
    let heads = dims.batch * dims.heads;
    ensure!(heads <= 65_535, "{kind}: batch * heads = {heads} exceeds the grid's y limit 65535");
    ensure!(
        dims.batch * dims.q_len.max(dims.kv_len) * dims.hidden() < i32::MAX as usize,
        "{kind}: sizes {dims:?} overflow the kernels' 32-bit row indices"
    );
    let cfg = LaunchConfig { grid_dim: (len.div_ceil(rows_per_block) as u32, heads as u32, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
    let mut all = args.to_vec();
    all.extend([I32(dims.q_len as i32), I32(dims.kv_len as i32), I32(dims.heads as i32), I32(dims.head_dim as i32), F32(scale)]);
    d.launch(kernel.file, kernel.name, cfg, &all, None)
}

/// The row of head `h` of token `i` in batch `b` of a [B, L, H*d] tensor starts at this element.
fn head_offset(dims: &AttentionDims, len: usize, b: usize, i: usize, h: usize) -> usize {
    (b * len + i) * dims.hidden() + h * dims.head_dim
}

/// `c[m x n] = alpha * a[m x k] b[k x n] + beta * c`, with element strides (row, column) for each matrix.
/// Safety: every (row, column) the strides address lies inside the slices.
fn gemm(
    (m, k, n): (usize, usize, usize),
    alpha: f32,
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    beta: f32,
    c: &mut [f32],
    (rsc, csc): (usize, usize),
) {
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(last(m, k, rsa, csa) < a.len() && last(k, n, rsb, csb) < b.len() && last(m, n, rsc, csc) < c.len());
    // SAFETY: the assert above keeps every addressed element inside its slice; c does not alias a or b
    // (it is borrowed mutably).
    unsafe {
        sgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            rsa as isize,
            csa as isize,
            b.as_ptr(),
            rsb as isize,
            csb as isize,
            beta,
            c.as_mut_ptr(),
            rsc as isize,
            csc as isize,
        )
    }
}

/// Scores `s[rows x Lk] = scale * q[i0..i0+rows] k^T` of head (b, h).
fn cpu_scores(dims: &AttentionDims, scale: f32, q: &[f32], k: &[f32], (b, h, i0, rows): (usize, usize, usize, usize), s: &mut [f32]) {
    let hd = dims.hidden();
    let qh = &q[head_offset(dims, dims.q_len, b, i0, h)..];
    let kh = &k[head_offset(dims, dims.kv_len, b, 0, h)..];
    gemm((rows, dims.head_dim, dims.kv_len), scale, qh, (hd, 1), kh, (1, hd), 0.0, s, (dims.kv_len, 1));
}

fn cpu_forward(dims: &AttentionDims, scale: f32, q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], lse: &mut [f32]) {
    let (lq, lk, hd, d) = (dims.q_len, dims.kv_len, dims.hidden(), dims.head_dim);
    let blocks = lq.div_ceil(CPU_ROWS);
    let results: Vec<(Vec<f32>, Vec<f32>)> = (0..dims.batch * dims.heads * blocks)
        .into_par_iter()
        .map(|task| {
            let (bh, block) = (task / blocks, task % blocks);
            let (b, h) = (bh / dims.heads, bh % dims.heads);
            let i0 = block * CPU_ROWS;
            let rows = CPU_ROWS.min(lq - i0);
            let mut s = vec![0f32; rows * lk];
            cpu_scores(dims, scale, q, k, (b, h, i0, rows), &mut s);
            let mut row_lse = vec![0f32; rows];
            for (row, lse) in s.chunks_mut(lk).zip(&mut row_lse) {
                let m = super::vmath::max(row);
                let sum = super::vmath::exp_shifted_sum(row, m);
                super::vmath::scale(row, 1.0 / sum);
                *lse = m + sum.ln();
            }
            let mut o = vec![0f32; rows * d];
            let vh = &v[head_offset(dims, lk, b, 0, h)..];
            gemm((rows, lk, d), 1.0, &s, (lk, 1), vh, (hd, 1), 0.0, &mut o, (d, 1));
            (o, row_lse)
        })
        .collect();
    for (task, (o, row_lse)) in results.iter().enumerate() {
        let (bh, block) = (task / blocks, task % blocks);
        let (b, h) = (bh / dims.heads, bh % dims.heads);
        let i0 = block * CPU_ROWS;
        for (r, orow) in o.chunks(d).enumerate() {
            let at = head_offset(dims, lq, b, i0 + r, h);
            out[at..at + d].copy_from_slice(orow);
        }
        lse[bh * lq + i0..bh * lq + i0 + row_lse.len()].copy_from_slice(row_lse);
    }
}

/// `delta[b, h, i] = dout_i . out_i` over head h's columns.
fn cpu_row_dots(dims: &AttentionDims, dout: &[f32], out: &[f32], delta: &mut [f32]) {
    let (lq, d) = (dims.q_len, dims.head_dim);
    delta.par_chunks_mut(lq).enumerate().for_each(|(bh, row)| {
        let (b, h) = (bh / dims.heads, bh % dims.heads);
        for (i, x) in row.iter_mut().enumerate() {
            let at = head_offset(dims, lq, b, i, h);
            *x = dout[at..at + d].iter().zip(&out[at..at + d]).map(|(g, o)| g * o).sum();
        }
    });
}

struct CpuSaved<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    dout: &'a [f32],
    lse: &'a [f32],
    delta: &'a [f32],
}

fn cpu_backward(dims: &AttentionDims, scale: f32, x: CpuSaved, dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) {
    let (lq, lk, hd, d) = (dims.q_len, dims.kv_len, dims.hidden(), dims.head_dim);
    // One task per (batch, head): dk and dv sum over every query block of the head.
    let results: Vec<[Vec<f32>; 3]> = (0..dims.batch * dims.heads)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / dims.heads, bh % dims.heads);
            let (mut dqh, mut dkh, mut dvh) = (vec![0f32; lq * d], vec![0f32; lk * d], vec![0f32; lk * d]);
            let kh = &x.k[head_offset(dims, lk, b, 0, h)..];
            let vh = &x.v[head_offset(dims, lk, b, 0, h)..];
            let mut p = vec![0f32; CPU_ROWS * lk];
            let mut dp = vec![0f32; CPU_ROWS * lk];
            for i0 in (0..lq).step_by(CPU_ROWS) {
                let rows = CPU_ROWS.min(lq - i0);
                let (p, dp) = (&mut p[..rows * lk], &mut dp[..rows * lk]);
                cpu_scores(dims, scale, x.q, x.k, (b, h, i0, rows), p);
                for (r, row) in p.chunks_mut(lk).enumerate() {
                    let lse = x.lse[bh * lq + i0 + r];
                    super::vmath::exp_shifted(row, lse);
                }
                let qh = &x.q[head_offset(dims, lq, b, i0, h)..];
                let gh = &x.dout[head_offset(dims, lq, b, i0, h)..];
                // dv += p^T dout
                gemm((lk, rows, d), 1.0, p, (1, lk), gh, (hd, 1), 1.0, &mut dvh, (d, 1));
                // dp = dout v^T, then ds = p (dp - delta), in place in p
                gemm((rows, d, lk), 1.0, gh, (hd, 1), vh, (1, hd), 0.0, dp, (lk, 1));
                for (r, (prow, dprow)) in p.chunks_mut(lk).zip(dp.chunks(lk)).enumerate() {
                    let delta = x.delta[bh * lq + i0 + r];
                    prow.iter_mut().zip(dprow).for_each(|(p, g)| *p *= g - delta);
                }
                // dq = scale * ds k,  dk += scale * ds^T q
                gemm((rows, lk, d), scale, p, (lk, 1), kh, (hd, 1), 0.0, &mut dqh[i0 * d..], (d, 1));
                gemm((lk, rows, d), scale, p, (1, lk), qh, (hd, 1), 1.0, &mut dkh, (d, 1));
            }
            [dqh, dkh, dvh]
        })
        .collect();
    for (bh, [dqh, dkh, dvh]) in results.iter().enumerate() {
        let (b, h) = (bh / dims.heads, bh % dims.heads);
        for (dst, src, len) in [(&mut *dq, dqh, lq), (&mut *dk, dkh, lk), (&mut *dv, dvh, lk)] {
            for (i, row) in src.chunks(d).enumerate() {
                let at = head_offset(dims, len, b, i, h);
                dst[at..at + d].copy_from_slice(row);
            }
        }
    }
}
