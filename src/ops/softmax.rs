//! Softmax over the last dimension, `y = softmax(scale * x)`, and its backward: the unfused attention path
//! (matmul + softmax + matmul) of attention shapes the fused kernel does not take, such as the AutoencoderKL
//! mid-block's single 512-wide head over 4096 tokens. Outputs and input gradients are written (=).
//! CPU: f32 reference, rows in parallel. CUDA: `kernels/softmax.cu`, one block per row, f32 statistics,
//! f32 or bf16 storage.

use anyhow::{ensure, Result};
use cudarc::driver::LaunchConfig;
use rayon::prelude::*;

use super::{common_device, common_dtype, same_shape};
use crate::runtime::cuda::KernelArg::{Ptr, F32, I64};
use crate::runtime::cuda::{CudaDevice, KernelArg};
use crate::runtime::device::Device;
use crate::tensor::{DType, Tensor};

pub const KERNEL_FILE: &str = "softmax.cu";

/// (rows, row length) of `[.., n]` tensors with n >= 1.
fn row_dims(op: &str, t: &Tensor) -> Result<(usize, usize)> {
    let s = t.shape();
    ensure!(s.last().is_some_and(|&n| n > 0), "{op}: expected [.., n] with a last dimension n >= 1, got {s:?}");
    let n = s[s.len() - 1];
    Ok((t.numel() / n, n))
}

/// `y[.., j] = exp(scale * x[.., j] - m) / sum_k exp(scale * x[.., k] - m)` with m the row's maximum of
/// `scale * x` (so no exponential overflows): torch's `softmax(scale * x, dim=-1)`. A row of -inf gives NaN,
/// as in torch.
pub fn softmax_forward(x: &Tensor, scale: f32, y: &mut Tensor) -> Result<()> {
    const OP: &str = "softmax_forward";
    let device = common_device(OP, &[x, y])?;
    same_shape(OP, &[x, y])?;
    let (rows, n) = row_dims(OP, x)?;
    let _profile = crate::profile::scope(crate::profile::Family::Softmax, || {
        (device.clone(), 5.0 * x.numel() as f64, crate::profile::bytes_of(&[x.numel(), y.numel()], x.dtype().size()))
    });
    let dtype = common_dtype(OP, &device, &[x, y])?;
    if rows == 0 {
        return Ok(());
    }
    match device {
        Device::Cpu => {
            let x = x.f32s()?;
            y.f32s_mut()?.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(y, x)| {
                let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(scale * v));
                let mut sum = 0.0f32;
                for (y, &v) in y.iter_mut().zip(x) {
                    *y = (scale * v - max).exp();
                    sum += *y;
                }
                let inv = 1.0 / sum;
                y.iter_mut().for_each(|y| *y *= inv);
            });
            Ok(())
        }
        Device::Cuda(d) => launch_rows(
            OP,
            &d,
            by_dtype(dtype, "softmax_forward_f32", "softmax_forward_bf16"),
            rows,
            n,
            &[Ptr(x.cuda_ptr()?), Ptr(y.cuda_ptr()?), F32(scale)],
        ),
    }
}

/// Backward of [`softmax_forward`] from its output: `dx = scale * y * (dy - sum_k dy[.., k] * y[.., k])`.
pub fn softmax_backward(y: &Tensor, dy: &Tensor, scale: f32, dx: &mut Tensor) -> Result<()> {
    const OP: &str = "softmax_backward";
    let device = common_device(OP, &[y, dy, dx])?;
    same_shape(OP, &[y, dy, dx])?;
    let (rows, n) = row_dims(OP, y)?;
    let dtype = common_dtype(OP, &device, &[y, dy, dx])?;
    if rows == 0 {
        return Ok(());
    }
    match device {
        Device::Cpu => {
            let (y, dy) = (y.f32s()?, dy.f32s()?);
            dx.f32s_mut()?.par_chunks_mut(n).zip(y.par_chunks(n).zip(dy.par_chunks(n))).for_each(|(dx, (y, dy))| {
                let dot: f32 = y.iter().zip(dy).map(|(y, g)| y * g).sum();
                for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(dy) {
                    *dx = scale * y * (g - dot);
                }
            });
            Ok(())
        }
        Device::Cuda(d) => launch_rows(
            OP,
            &d,
            by_dtype(dtype, "softmax_backward_f32", "softmax_backward_bf16"),
            rows,
            n,
            &[Ptr(y.cuda_ptr()?), Ptr(dy.cuda_ptr()?), Ptr(dx.cuda_ptr()?), F32(scale)],
        ),
    }
}

fn by_dtype(dtype: DType, f32_kernel: &'static str, bf16_kernel: &'static str) -> &'static str {
    // common_dtype has already refused everything else.
    if dtype == DType::BF16 {
        bf16_kernel
    } else {
        f32_kernel
    }
}

/// One block per row (grid-stride over rows past the grid's size), about four elements per thread: 32
/// threads for the 77 text tokens of cross-attention, 1024 from 4096 columns on. Then `n` and `rows`.
fn launch_rows(op: &str, d: &CudaDevice, kernel: &'static str, rows: usize, n: usize, args: &[KernelArg]) -> Result<()> {
    ensure!(n <= i64::MAX as usize && rows <= i64::MAX as usize, "{op}: {rows} rows of {n} do not fit the kernel");
    let threads = n.div_ceil(4).next_multiple_of(32).clamp(32, 1024) as u32;
    let blocks = rows.min(i32::MAX as usize) as u32;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
    let args: Vec<KernelArg> = args.iter().copied().chain([I64(n as i64)]).collect();
    d.launch(KERNEL_FILE, kernel, cfg, &args, Some(rows as i64))
}
