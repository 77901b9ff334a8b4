//! Shape ops: channel concat and split of NCHW tensors (split is concat's backward), nearest 2x upsampling
//! and its backward, and `AdaptiveAvgPool1d(1)` over the last dim of [B, C, L] and its backward. Outputs are
//! written (=). Also the swap of the last two dims, [B, R, C] -> [B, C, R] (NCHW <-> [B, HW, C] around a
//! Transformer2DModel), its own backward. CPU: f32 reference. CUDA: `kernels/shape.cu`, f32 or bf16 storage,
//! f32 sums.

use anyhow::{ensure, Result};
use cudarc::driver::LaunchConfig;
use rayon::prelude::*;

use super::{common_device, common_dtype};
use crate::runtime::cuda::KernelArg::{Ptr, I32, I64};
use crate::runtime::device::Device;
use crate::tensor::{DType, Tensor};

pub const KERNEL_FILE: &str = "shape.cu";

fn kernel(dtype: DType, f32_kernel: &'static str, bf16_kernel: &'static str) -> &'static str {
    // common_dtype has already refused everything else.
    if dtype == DType::BF16 {
        bf16_kernel
    } else {
        f32_kernel
    }
}

fn fits_i32(op: &str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| anyhow::anyhow!("{op}: {what} = {v} does not fit the kernel's int"))
}

/// Checks concat/split shapes: `a` [N, Ca, H, W], `b` [N, Cb, H, W], `y` [N, Ca + Cb, H, W].
fn concat_dims(op: &str, a: &Tensor, b: &Tensor, y: &Tensor) -> Result<(usize, usize, usize, usize)> {
    let (sa, sb, sy) = (a.shape(), b.shape(), y.shape());
    let ok = sa.len() == 4
        && sb.len() == 4
        && sy.len() == 4
        && sa[0] == sb[0]
        && sa[0] == sy[0]
        && sa[2..] == sb[2..]
        && sa[2..] == sy[2..]
        && sa[1] + sb[1] == sy[1];
    ensure!(ok, "{op}: expected a [N, Ca, H, W], b [N, Cb, H, W] and the concat [N, Ca+Cb, H, W], got {sa:?}, {sb:?}, {sy:?}");
    Ok((sa[0], sa[1], sb[1], sa[2] * sa[3]))
}

/// `y = cat([a, b], dim=1)` for NCHW tensors.
pub fn concat_channels(a: &Tensor, b: &Tensor, y: &mut Tensor) -> Result<()> {
    const OP: &str = "concat_channels";
    let device = common_device(OP, &[a, b, y])?;
    let (_, ca, cb, hw) = concat_dims(OP, a, b, y)?;
    let dtype = common_dtype(OP, &device, &[a, b, y])?;
    let _profile = crate::profile::scope(crate::profile::Family::Shape, || {
        (device.clone(), 0.0, crate::profile::bytes_of(&[a.numel(), b.numel(), y.numel()], y.dtype().size()))
    });
    if y.numel() == 0 {
        return Ok(());
    }
    match device {
        Device::Cpu => {
            let (a, b) = (a.f32s()?, b.f32s()?);
            let (la, lb) = (ca * hw, cb * hw);
            for (i, row) in y.f32s_mut()?.chunks_mut(la + lb).enumerate() {
                row[..la].copy_from_slice(&a[i * la..(i + 1) * la]);
                row[la..].copy_from_slice(&b[i * lb..(i + 1) * lb]);
            }
            Ok(())
        }
        Device::Cuda(d) => d.launch_elementwise(
            KERNEL_FILE,
            kernel(dtype, "concat_channels_f32", "concat_channels_bf16"),
            &[Ptr(a.cuda_ptr()?), Ptr(b.cuda_ptr()?), Ptr(y.cuda_ptr()?), I32(fits_i32(OP, "Ca", ca)?), I32(fits_i32(OP, "Cb", cb)?), I64(hw as i64)],
            y.numel(),
        ),
    }
}

/// `a, b = y[:, :Ca], y[:, Ca:]` for NCHW tensors, with Ca taken from `a`: concat's backward (dy -> da, db).
pub fn split_channels(y: &Tensor, a: &mut Tensor, b: &mut Tensor) -> Result<()> {
    const OP: &str = "split_channels";
    let device = common_device(OP, &[y, a, b])?;
    let (_, ca, cb, hw) = concat_dims(OP, a, b, y)?;
    let dtype = common_dtype(OP, &device, &[y, a, b])?;
    if y.numel() == 0 {
        return Ok(());
    }
    match device {
        Device::Cpu => {
            let (la, lb) = (ca * hw, cb * hw);
            let (a, b) = (a.f32s_mut()?, b.f32s_mut()?);
            for (i, row) in y.f32s()?.chunks(la + lb).enumerate() {
                a[i * la..(i + 1) * la].copy_from_slice(&row[..la]);
                b[i * lb..(i + 1) * lb].copy_from_slice(&row[la..]);
            }
            Ok(())
        }
        Device::Cuda(d) => d.launch_elementwise(
            KERNEL_FILE,
            kernel(dtype, "split_channels_f32", "split_channels_bf16"),
            &[Ptr(y.cuda_ptr()?), Ptr(a.cuda_ptr()?), Ptr(b.cuda_ptr()?), I32(fits_i32(OP, "Ca", ca)?), I32(fits_i32(OP, "Cb", cb)?), I64(hw as i64)],
            y.numel(),
        ),
    }
}

/// Checks `x` [N, C, H, W] against `y` [N, C, 2H, 2W]; returns (H, W).
fn upsample_dims(op: &str, x: &Tensor, y: &Tensor) -> Result<(usize, usize)> {
    let (sx, sy) = (x.shape(), y.shape());
    let ok = sx.len() == 4 && sy.len() == 4 && sx[..2] == sy[..2] && sy[2] == 2 * sx[2] && sy[3] == 2 * sx[3];
    ensure!(ok, "{op}: expected x [N, C, H, W] and y [N, C, 2H, 2W], got {sx:?} and {sy:?}");
    Ok((sx[2], sx[3]))
}

/// Nearest-neighbour 2x upsampling (`F.interpolate(scale_factor=2, mode="nearest")`): `x` [N, C, H, W] ->
/// `y` [N, C, 2H, 2W].
pub fn upsample_nearest2x(x: &Tensor, y: &mut Tensor) -> Result<()> {
    const OP: &str = "upsample_nearest2x";
    let device = common_device(OP, &[x, y])?;
    let (h, w) = upsample_dims(OP, x, y)?;
    let dtype = common_dtype(OP, &device, &[x, y])?;
    let _profile = crate::profile::scope(crate::profile::Family::Shape, || {
        (device.clone(), 0.0, crate::profile::bytes_of(&[x.numel(), y.numel()], y.dtype().size()))
    });
    if y.numel() == 0 {
        return Ok(());
    }
    match device {
        Device::Cpu => {
            let x = x.f32s()?;
            y.f32s_mut()?.par_chunks_mut(4 * h * w).zip(x.par_chunks(h * w)).for_each(|(y, x)| {
                for (oy, row) in y.chunks_mut(2 * w).enumerate() {
                    let src = &x[(oy / 2) * w..(oy / 2 + 1) * w];
                    for (ox, v) in row.iter_mut().enumerate() {
                        *v = src[ox / 2];
                    }
                }
            });
            Ok(())
        }
        Device::Cuda(d) => d.launch_elementwise(
            KERNEL_FILE,
            kernel(dtype, "upsample_nearest2x_f32", "upsample_nearest2x_bf16"),
            &[Ptr(x.cuda_ptr()?), Ptr(y.cuda_ptr()?), I32(fits_i32(OP, "H", h)?), I32(fits_i32(OP, "W", w)?)],
            y.numel(),
        ),
    }
}

/// Backward of nearest 2x upsampling: `dx` [N, C, H, W] = the sum of each 2x2 block of `dy` [N, C, 2H, 2W].
pub fn upsample_nearest2x_backward(dy: &Tensor, dx: &mut Tensor) -> Result<()> {
    const OP: &str = "upsample_nearest2x_backward";
    let device = common_device(OP, &[dy, dx])?;
    let (h, w) = upsample_dims(OP, dx, dy)?;
    let dtype = common_dtype(OP, &device, &[dy, dx])?;
    if dx.numel() == 0 {
        return Ok(());
    }
    match device {
        Device::Cpu => {
            let dy = dy.f32s()?;
            dx.f32s_mut()?.par_chunks_mut(h * w).zip(dy.par_chunks(4 * h * w)).for_each(|(dx, dy)| {
                for (y, row) in dx.chunks_mut(w).enumerate() {
                    let (top, bottom) = (&dy[2 * y * 2 * w..], &dy[(2 * y + 1) * 2 * w..]);
                    for (x, v) in row.iter_mut().enumerate() {
                        *v = (top[2 * x] + top[2 * x + 1]) + (bottom[2 * x] + bottom[2 * x + 1]);
                    }
                }
            });
            Ok(())
        }
        Device::Cuda(d) => d.launch_elementwise(
            KERNEL_FILE,
            kernel(dtype, "upsample_nearest2x_backward_f32", "upsample_nearest2x_backward_bf16"),
            &[Ptr(dy.cuda_ptr()?), Ptr(dx.cuda_ptr()?), I32(fits_i32(OP, "H", h)?), I32(fits_i32(OP, "W", w)?)],
            dx.numel(),
        ),
    }
}

/// Checks `x` [B, C, L] (L > 0) against `y` [B, C, 1] (or [B, C]); returns (B * C, L).
fn pool_dims(op: &str, x: &Tensor, y: &Tensor) -> Result<(usize, usize)> {
    let (sx, sy) = (x.shape(), y.shape());
    let ok = sx.len() == 3 && sx[2] > 0 && sy.len() >= 2 && sy[..2] == sx[..2] && (sy.len() == 2 || sy[2..] == [1]);
    ensure!(ok, "{op}: expected x [B, C, L] with L > 0 and the pooled [B, C, 1] (or [B, C]), got {sx:?} and {sy:?}");
    Ok((sx[0] * sx[1], sx[2]))
}

/// `AdaptiveAvgPool1d(1)`: `y` [B, C, 1] (or [B, C]) = the mean of `x` [B, C, L] over L.
pub fn avg_pool_last(x: &Tensor, y: &mut Tensor) -> Result<()> {
    const OP: &str = "avg_pool_last";
    let device = common_device(OP, &[x, y])?;
    let (rows, len) = pool_dims(OP, x, y)?;
    let dtype = common_dtype(OP, &device, &[x, y])?;
    if rows == 0 {
        return Ok(());
    }
    match device {
        Device::Cpu => {
            let x = x.f32s()?;
            for (y, row) in y.f32s_mut()?.iter_mut().zip(x.chunks(len)) {
                *y = row.iter().sum::<f32>() / len as f32;
            }
            Ok(())
        }
        Device::Cuda(d) => {
            const BLOCK: usize = 256;
            let blocks = rows.div_ceil(BLOCK / 32).min(65_535) as u32;
            let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK as u32, 1, 1), shared_mem_bytes: 0 };
            d.launch(
                KERNEL_FILE,
                kernel(dtype, "avg_pool_last_f32", "avg_pool_last_bf16"),
                cfg,
                &[Ptr(x.cuda_ptr()?), Ptr(y.cuda_ptr()?), I64(len as i64)],
                Some(rows as i64),
            )
        }
    }
}

/// Backward of `avg_pool_last`: `dx` [B, C, L] = `dy` [B, C, 1] / L, broadcast over L.
pub fn avg_pool_last_backward(dy: &Tensor, dx: &mut Tensor) -> Result<()> {
    const OP: &str = "avg_pool_last_backward";
    let device = common_device(OP, &[dy, dx])?;
    let (rows, len) = pool_dims(OP, dx, dy)?;
    let dtype = common_dtype(OP, &device, &[dy, dx])?;
    if rows == 0 {
        return Ok(());
    }
    match device {
        Device::Cpu => {
            let dy = dy.f32s()?;
            for (row, g) in dx.f32s_mut()?.chunks_mut(len).zip(dy) {
                row.fill(g / len as f32);
            }
            Ok(())
        }
        Device::Cuda(d) => d.launch_elementwise(
            KERNEL_FILE,
            kernel(dtype, "avg_pool_last_backward_f32", "avg_pool_last_backward_bf16"),
            &[Ptr(dy.cuda_ptr()?), Ptr(dx.cuda_ptr()?), I64(len as i64)],
            dx.numel(),
        ),
    }
}

/// Checks `x` [.., R, C] against `y` [.., C, R] (equal leading dims); returns (batch, R, C).
fn transpose_dims(op: &str, x: &Tensor, y: &Tensor) -> Result<(usize, usize, usize)> {
    let (sx, sy) = (x.shape(), y.shape());
    let rank = sx.len();
    let ok = rank >= 2 && sy.len() == rank && sx[..rank - 2] == sy[..rank - 2] && sx[rank - 2] == sy[rank - 1] && sx[rank - 1] == sy[rank - 2];
    ensure!(ok, "{op}: expected x [.., R, C] and y [.., C, R], got {sx:?} and {sy:?}");
    Ok((sx[..rank - 2].iter().product(), sx[rank - 2], sx[rank - 1]))
}

/// Side of the square blocks the CPU transpose walks: a 32x32 f32 block of x and of y (4 KiB each) stay in L1
/// while one is read along rows and the other written along rows.
const CPU_BLOCK: usize = 32;
/// Side of the CUDA kernel's shared-memory tile (its launch grid counts tiles).
const TILE: usize = 32;

/// `y[b, c, r] = x[b, r, c]`: swaps the last two dims of `x` [.., R, C] into `y` [.., C, R], as
/// `x.transpose(-1, -2).contiguous()`. Exact (values only move).
pub fn transpose_last2(x: &Tensor, y: &mut Tensor) -> Result<()> {
    let _profile = crate::profile::scope(crate::profile::Family::Shape, || {
        (x.device(), 0.0, crate::profile::bytes_of(&[x.numel(), y.numel()], y.dtype().size()))
    });
    transpose("transpose_last2", x, y)
}

/// Backward of [`transpose_last2`]: `dx` [.., R, C] is `dy` [.., C, R] transposed back, the same operation.
pub fn transpose_last2_backward(dy: &Tensor, dx: &mut Tensor) -> Result<()> {
    transpose("transpose_last2_backward", dy, dx)
}

fn transpose(op: &str, x: &Tensor, y: &mut Tensor) -> Result<()> {
    let device = common_device(op, &[x, y])?;
    let (batch, r, c) = transpose_dims(op, x, y)?;
    let dtype = common_dtype(op, &device, &[x, y])?;
    if y.numel() == 0 {
        return Ok(());
    }
    match device {
        Device::Cpu => {
            let x = x.f32s()?;
            // Parallel over (matrix, block of CPU_BLOCK output rows); each task walks its rows block by block.
            y.f32s_mut()?.par_chunks_mut(c * r).zip(x.par_chunks(r * c)).for_each(|(y, x)| {
                y.par_chunks_mut(CPU_BLOCK * r).enumerate().for_each(|(block, y)| {
                    let c0 = block * CPU_BLOCK;
                    for r0 in (0..r).step_by(CPU_BLOCK) {
                        let r1 = (r0 + CPU_BLOCK).min(r);
                        for (i, out) in y.chunks_mut(r).enumerate() {
                            for (j, v) in out[r0..r1].iter_mut().enumerate() {
                                *v = x[(r0 + j) * c + c0 + i];
                            }
                        }
                    }
                });
            });
            Ok(())
        }
        Device::Cuda(d) => {
            ensure!(r < 1 << 30 && c < 1 << 30, "{op}: {r} x {c} matrices exceed the kernel's int dims (its tile loop steps past R)");
            let cfg = LaunchConfig {
                grid_dim: (c.div_ceil(TILE).min(i32::MAX as usize) as u32, r.div_ceil(TILE).min(65_535) as u32, batch.min(65_535) as u32),
                block_dim: (TILE as u32, 8, 1),
                shared_mem_bytes: 0,
            };
            d.launch(
                KERNEL_FILE,
                kernel(dtype, "transpose_last2_f32", "transpose_last2_bf16"),
                cfg,
                &[Ptr(x.cuda_ptr()?), Ptr(y.cuda_ptr()?), I32(r as i32), I32(c as i32)],
                Some(batch as i64),
            )
        }
    }
}
