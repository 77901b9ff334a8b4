//! Convolutions, forward and backward, with PyTorch semantics: Conv2d (any kernel size and stride, padding
//! given per side so diffusers' asymmetric downsampler pad fits, optional bias), ConvTranspose2d and Conv1d.
//! Weights are [C_out, C_in, kH, kW] for Conv2d, [C_in, C_out, kH, kW] for ConvTranspose2d and [C_out, C_in, k]
//! for Conv1d. Outputs and input gradients are written (=); weight and bias gradients accumulate (+=).
//!
//! Everything reduces to three convolution primitives over one geometry (forward, data gradient, weight
//! gradient): ConvTranspose2d's forward is Conv2d's data gradient and its backward is Conv2d's forward and
//! weight gradient with the roles of input and output swapped; Conv1d is Conv2d over a 1-pixel-high image.
//! CPU: im2col + `matrixmultiply::sgemm` per image. CUDA: `kernels/conv.cu`, implicit GEMM (no im2col buffer).

use anyhow::{ensure, Result};
use cudarc::driver::LaunchConfig;
use rayon::prelude::*;

use super::linear::cpu_gemm;
use super::{common_device, common_dtype};
use crate::runtime::blas::GemmShape;
use crate::runtime::cuda::CudaDevice;
use crate::runtime::cuda::KernelArg::{self, Ptr, I32};
use crate::runtime::device::Device;
use crate::runtime::kernel_table;
use crate::tensor::{DType, Tensor};

pub const KERNEL_FILE: &str = "conv.cu";

/// The conv kernel choice ([`super::Variant`]); `SGDM_CONV_KERNEL` overrides the default.
pub type ConvKernel = super::Variant;

fn kernel_from_env() -> Result<ConvKernel> {
    static CHOICE: std::sync::OnceLock<Result<ConvKernel, String>> = std::sync::OnceLock::new();
    ConvKernel::from_env_once(&CHOICE, "SGDM_CONV_KERNEL")
}

/// Zero padding added on each side of the image before the convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Padding {
    pub top: usize,
    pub bottom: usize,
    pub left: usize,
    pub right: usize,
}

impl Padding {
    /// `p` on every side (PyTorch's `padding=p`).
    pub const fn uniform(p: usize) -> Padding {
        Padding { top: p, bottom: p, left: p, right: p }
    }
}

/// Stride (the same along both axes) and padding of a Conv2d or ConvTranspose2d.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dSpec {
    pub stride: usize,
    pub padding: Padding,
}

impl Conv2dSpec {
    /// PyTorch's `stride=stride, padding=padding`.
    pub const fn new(stride: usize, padding: usize) -> Conv2dSpec {
        Conv2dSpec { stride, padding: Padding::uniform(padding) }
    }

    /// diffusers' AutoencoderKL `Downsample2D`: `F.pad(x, (0, 1, 0, 1))` (right and bottom) and then a 3x3
    /// stride-2 conv with `padding=0`.
    pub const VAE_DOWNSAMPLE: Conv2dSpec = Conv2dSpec { stride: 2, padding: Padding { top: 0, bottom: 1, left: 0, right: 1 } };
}

/// Every size of one convolution, named as in the kernels: input [n, c, h, w], weight [k, c, r, s],
/// output [n, k, p, q]. Only the top and left padding enter the index math.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    r: usize,
    s: usize,
    stride: usize,
    pad_h: usize,
    pad_w: usize,
    p: usize,
    q: usize,
}

impl Geometry {
    /// Refuses empty channel and image dimensions (a batch of 0 is allowed and does nothing).
    fn nonempty(self, op: &str, x: &[usize], w: &[usize]) -> Result<Geometry> {
        ensure!(self.c > 0 && self.k > 0 && self.h > 0 && self.w > 0, "{op}: input {x:?} with weight {w:?} has an empty channel or image dimension");
        Ok(self)
    }
    fn input_len(&self) -> usize {
        self.c * self.h * self.w
    }
    fn output_len(&self) -> usize {
        self.k * self.p * self.q
    }
    fn patch_len(&self) -> usize {
        self.c * self.r * self.s
    }
    /// 1x1, stride 1, no padding: the input image already is its own im2col matrix.
    fn pointwise(&self) -> bool {
        self.r == 1 && self.s == 1 && self.stride == 1 && self.pad_h == 0 && self.pad_w == 0 && self.p == self.h && self.q == self.w
    }
}

fn conv_output_len(op: &str, input: usize, before: usize, after: usize, kernel: usize, stride: usize) -> Result<usize> {
    ensure!(stride >= 1 && kernel >= 1, "{op}: stride {stride} and kernel size {kernel} must be at least 1");
    let padded = input + before + after;
    ensure!(padded >= kernel, "{op}: kernel size {kernel} exceeds the padded input size {padded}");
    Ok((padded - kernel) / stride + 1)
}

/// The geometry of a Conv2d of `x` [N, C_in, H, W] with `w` [C_out, C_in, kH, kW].
fn conv2d_geometry(op: &str, x: &[usize], w: &[usize], spec: Conv2dSpec) -> Result<Geometry> {
    ensure!(x.len() == 4, "{op}: input {x:?} is not [N, C_in, H, W]");
    ensure!(w.len() == 4, "{op}: weight {w:?} is not [C_out, C_in, kH, kW]");
    ensure!(x[1] == w[1], "{op}: input {x:?} has {} channels but weight {w:?} expects {}", x[1], w[1]);
    let pad = spec.padding;
    Geometry {
        n: x[0],
        c: x[1],
        h: x[2],
        w: x[3],
        k: w[0],
        r: w[2],
        s: w[3],
        stride: spec.stride,
        pad_h: pad.top,
        pad_w: pad.left,
        p: conv_output_len(op, x[2], pad.top, pad.bottom, w[2], spec.stride)?,
        q: conv_output_len(op, x[3], pad.left, pad.right, w[3], spec.stride)?,
    }
    .nonempty(op, x, w)
}

/// The geometry of the Conv2d whose data gradient is the ConvTranspose2d of `x` [N, C_in, H, W] with `w`
/// [C_in, C_out, kH, kW]: that conv maps the transpose's output [N, C_out, H', W'] back to [N, C_in, H, W].
fn conv_transpose2d_geometry(op: &str, x: &[usize], w: &[usize], spec: Conv2dSpec) -> Result<Geometry> {
    ensure!(x.len() == 4, "{op}: input {x:?} is not [N, C_in, H, W]");
    ensure!(w.len() == 4, "{op}: weight {w:?} is not [C_in, C_out, kH, kW]");
    ensure!(x[1] == w[0], "{op}: input {x:?} has {} channels but weight {w:?} expects {}", x[1], w[0]);
    ensure!(spec.stride >= 1 && w[2] >= 1 && w[3] >= 1, "{op}: stride {} and kernel {w:?} must be positive", spec.stride);
    ensure!(x[2] >= 1 && x[3] >= 1, "{op}: input {x:?} has an empty image");
    let pad = spec.padding;
    let full = |len: usize, k: usize| (len - 1) * spec.stride + k;
    let (fh, fw) = (full(x[2], w[2]), full(x[3], w[3]));
    ensure!(
        fh > pad.top + pad.bottom && fw > pad.left + pad.right,
        "{op}: padding {pad:?} leaves no output of input {x:?} with weight {w:?} and stride {}",
        spec.stride
    );
    Geometry {
        n: x[0],
        c: w[1],
        h: fh - pad.top - pad.bottom,
        w: fw - pad.left - pad.right,
        k: x[1],
        r: w[2],
        s: w[3],
        stride: spec.stride,
        pad_h: pad.top,
        pad_w: pad.left,
        p: x[2],
        q: x[3],
    }
    .nonempty(op, x, w)
}

/// The geometry of a Conv1d of `x` [N, C_in, L] with `w` [C_out, C_in, k]: a Conv2d over [N, C_in, 1, L].
fn conv1d_geometry(op: &str, x: &[usize], w: &[usize], stride: usize, padding: usize) -> Result<Geometry> {
    ensure!(x.len() == 3, "{op}: input {x:?} is not [N, C_in, L]");
    ensure!(w.len() == 3, "{op}: weight {w:?} is not [C_out, C_in, k]");
    ensure!(x[1] == w[1], "{op}: input {x:?} has {} channels but weight {w:?} expects {}", x[1], w[1]);
    Geometry {
        n: x[0],
        c: x[1],
        h: 1,
        w: x[2],
        k: w[0],
        r: 1,
        s: w[2],
        stride,
        pad_h: 0,
        pad_w: padding,
        p: 1,
        q: conv_output_len(op, x[2], padding, padding, w[2], stride)?,
    }
    .nonempty(op, x, w)
}

fn expect_shape(op: &str, what: &str, t: &Tensor, shape: &[usize]) -> Result<()> {
    ensure!(t.shape() == shape, "{op}: {what} has shape {:?}, expected {shape:?}", t.shape());
    Ok(())
}

fn expect_bias(op: &str, bias: Option<&Tensor>, channels: usize) -> Result<()> {
    match bias {
        Some(b) => expect_shape(op, "bias", b, &[channels]),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Public ops: shape checks, then one of the three primitives.

/// Conv2d: `y = conv(x, w) + bias`. x [N, C_in, H, W], w [C_out, C_in, kH, kW], bias [C_out], y [N, C_out, H', W'].
pub fn conv2d_forward(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, spec: Conv2dSpec, y: &mut Tensor) -> Result<()> {
    let op = "conv2d_forward";
    let g = conv2d_geometry(op, x.shape(), w.shape(), spec)?;
    expect_bias(op, bias, g.k)?;
    expect_shape(op, "output", y, &[g.n, g.k, g.p, g.q])?;
    let _profile = crate::profile::scope(crate::profile::Family::Conv, || {
        let e = x.dtype().size();
        (x.device(), 2.0 * y.numel() as f64 * (w.numel() / w.shape()[0]) as f64, crate::profile::bytes_of(&[x.numel(), w.numel(), y.numel()], e))
    });
    forward(op, &g, x, w, bias, y, kernel_from_env()?)
}

/// [`conv2d_forward`] on a chosen CUDA kernel (tests and benchmarks compare the variants; the CPU ignores it).
pub fn conv2d_forward_using(kernel: ConvKernel, x: &Tensor, w: &Tensor, bias: Option<&Tensor>, spec: Conv2dSpec, y: &mut Tensor) -> Result<()> {
    let op = "conv2d_forward";
    let g = conv2d_geometry(op, x.shape(), w.shape(), spec)?;
    expect_bias(op, bias, g.k)?;
    expect_shape(op, "output", y, &[g.n, g.k, g.p, g.q])?;
    forward(op, &g, x, w, bias, y, kernel)
}

/// Conv2d input gradient: `dx = d(sum(y * dy)) / dx` (written). Shapes as in [`conv2d_forward`].
pub fn conv2d_backward_input(dy: &Tensor, w: &Tensor, spec: Conv2dSpec, dx: &mut Tensor) -> Result<()> {
    let op = "conv2d_backward_input";
    let g = conv2d_geometry(op, dx.shape(), w.shape(), spec)?;
    expect_shape(op, "output gradient", dy, &[g.n, g.k, g.p, g.q])?;
    backward_input(op, &g, dy, w, None, dx, kernel_from_env()?)
}

/// [`conv2d_backward_input`] on a chosen CUDA kernel (the tensor-core one covers stride 1 only; other strides
/// take the CUDA-core kernel either way).
pub fn conv2d_backward_input_using(kernel: ConvKernel, dy: &Tensor, w: &Tensor, spec: Conv2dSpec, dx: &mut Tensor) -> Result<()> {
    let op = "conv2d_backward_input";
    let g = conv2d_geometry(op, dx.shape(), w.shape(), spec)?;
    expect_shape(op, "output gradient", dy, &[g.n, g.k, g.p, g.q])?;
    backward_input(op, &g, dy, w, None, dx, kernel)
}

/// Conv2d weight gradient: `dw += d(sum(y * dy)) / dw`. Shapes as in [`conv2d_forward`].
pub fn conv2d_backward_weight(x: &Tensor, dy: &Tensor, spec: Conv2dSpec, dw: &mut Tensor) -> Result<()> {
    let op = "conv2d_backward_weight";
    let g = conv2d_geometry(op, x.shape(), dw.shape(), spec)?;
    expect_shape(op, "output gradient", dy, &[g.n, g.k, g.p, g.q])?;
    backward_weight(op, &g, x, dy, dw, kernel_from_env()?)
}

/// [`conv2d_backward_weight`] on a chosen CUDA kernel (tests and benchmarks compare the variants).
pub fn conv2d_backward_weight_using(kernel: ConvKernel, x: &Tensor, dy: &Tensor, spec: Conv2dSpec, dw: &mut Tensor) -> Result<()> {
    let op = "conv2d_backward_weight";
    let g = conv2d_geometry(op, x.shape(), dw.shape(), spec)?;
    expect_shape(op, "output gradient", dy, &[g.n, g.k, g.p, g.q])?;
    backward_weight(op, &g, x, dy, dw, kernel)
}

/// Bias gradient of any of these convolutions: `db[c] += sum of dy[n, c, ...]` for dy [N, C, ...] (rank 3 or 4).
pub fn conv_backward_bias(dy: &Tensor, db: &mut Tensor) -> Result<()> {
    let op = "conv_backward_bias";
    let shape = dy.shape();
    ensure!(matches!(shape.len(), 3 | 4), "{op}: output gradient {shape:?} is not [N, C, L] or [N, C, H, W]");
    let (n, c, len) = (shape[0], shape[1], shape[2..].iter().product::<usize>());
    expect_shape(op, "bias gradient", db, &[c])?;
    let device = common_device(op, &[dy, db])?;
    let dtype = common_dtype(op, &device, &[dy, db])?;
    match device {
        Device::Cpu => {
            let dy = dy.f32s()?;
            for (ch, db) in db.f32s_mut()?.iter_mut().enumerate() {
                *db += (0..n).map(|i| dy[(i * c + ch) * len..][..len].iter().sum::<f32>()).sum::<f32>();
            }
            Ok(())
        }
        Device::Cuda(d) => {
            if c == 0 {
                return Ok(());
            }
            ensure!(n * c * len <= i32::MAX as usize, "{op}: output gradient {shape:?} is too large for the kernel");
            let cfg = LaunchConfig { grid_dim: (c as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            let args = [Ptr(dy.cuda_ptr()?), Ptr(db.cuda_ptr()?), I32(n as i32), I32(c as i32), I32(len as i32)];
            d.launch(KERNEL_FILE, by_dtype(dtype, "conv_bias_backward")?, cfg, &args, None)
        }
    }
}

/// ConvTranspose2d (`output_padding=0`): x [N, C_in, H, W], w [C_in, C_out, kH, kW], bias [C_out],
/// y [N, C_out, (H-1)*stride - pad_top - pad_bottom + kH, likewise W].
pub fn conv_transpose2d_forward(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, spec: Conv2dSpec, y: &mut Tensor) -> Result<()> {
    let op = "conv_transpose2d_forward";
    let g = conv_transpose2d_geometry(op, x.shape(), w.shape(), spec)?;
    expect_bias(op, bias, g.c)?;
    expect_shape(op, "output", y, &[g.n, g.c, g.h, g.w])?;
    let _profile = crate::profile::scope(crate::profile::Family::Conv, || {
        let e = x.dtype().size();
        (x.device(), 2.0 * x.numel() as f64 * (w.numel() / w.shape()[0]) as f64, crate::profile::bytes_of(&[x.numel(), w.numel(), y.numel()], e))
    });
    backward_input(op, &g, x, w, bias, y, kernel_from_env()?)
}

/// ConvTranspose2d input gradient (written). Shapes as in [`conv_transpose2d_forward`].
pub fn conv_transpose2d_backward_input(dy: &Tensor, w: &Tensor, spec: Conv2dSpec, dx: &mut Tensor) -> Result<()> {
    let op = "conv_transpose2d_backward_input";
    let g = conv_transpose2d_geometry(op, dx.shape(), w.shape(), spec)?;
    expect_shape(op, "output gradient", dy, &[g.n, g.c, g.h, g.w])?;
    forward(op, &g, dy, w, None, dx, kernel_from_env()?)
}

/// ConvTranspose2d weight gradient (`+=`). Shapes as in [`conv_transpose2d_forward`].
pub fn conv_transpose2d_backward_weight(x: &Tensor, dy: &Tensor, spec: Conv2dSpec, dw: &mut Tensor) -> Result<()> {
    let op = "conv_transpose2d_backward_weight";
    let g = conv_transpose2d_geometry(op, x.shape(), dw.shape(), spec)?;
    expect_shape(op, "output gradient", dy, &[g.n, g.c, g.h, g.w])?;
    backward_weight(op, &g, dy, x, dw, kernel_from_env()?)
}

/// Conv1d with symmetric `padding`: x [N, C_in, L], w [C_out, C_in, k], bias [C_out], y [N, C_out, L'].
pub fn conv1d_forward(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, stride: usize, padding: usize, y: &mut Tensor) -> Result<()> {
    let op = "conv1d_forward";
    let g = conv1d_geometry(op, x.shape(), w.shape(), stride, padding)?;
    let _profile = crate::profile::scope(crate::profile::Family::Conv, || {
        let e = x.dtype().size();
        (x.device(), 2.0 * y.numel() as f64 * (w.numel() / w.shape()[0]) as f64, crate::profile::bytes_of(&[x.numel(), w.numel(), y.numel()], e))
    });
    expect_bias(op, bias, g.k)?;
    expect_shape(op, "output", y, &[g.n, g.k, g.q])?;
    forward(op, &g, x, w, bias, y, kernel_from_env()?)
}

/// Conv1d input gradient (written). Shapes as in [`conv1d_forward`].
pub fn conv1d_backward_input(dy: &Tensor, w: &Tensor, stride: usize, padding: usize, dx: &mut Tensor) -> Result<()> {
    let op = "conv1d_backward_input";
    let g = conv1d_geometry(op, dx.shape(), w.shape(), stride, padding)?;
    expect_shape(op, "output gradient", dy, &[g.n, g.k, g.q])?;
    backward_input(op, &g, dy, w, None, dx, kernel_from_env()?)
}

/// Conv1d weight gradient (`+=`). Shapes as in [`conv1d_forward`].
pub fn conv1d_backward_weight(x: &Tensor, dy: &Tensor, stride: usize, padding: usize, dw: &mut Tensor) -> Result<()> {
    let op = "conv1d_backward_weight";
    let g = conv1d_geometry(op, x.shape(), dw.shape(), stride, padding)?;
    expect_shape(op, "output gradient", dy, &[g.n, g.k, g.q])?;
    backward_weight(op, &g, x, dy, dw, kernel_from_env()?)
}

// ---------------------------------------------------------------------------------------------------------
// The three primitives: device dispatch.

fn tensors<'a>(list: &[Option<&'a Tensor>]) -> Vec<&'a Tensor> {
    list.iter().flatten().copied().collect()
}

/// `y[n, k, p, q] = bias[k] + sum_{c, r, s} w[k, c, r, s] x[n, c, p*stride - pad_h + r, q*stride - pad_w + s]`.
fn forward(op: &str, g: &Geometry, x: &Tensor, w: &Tensor, bias: Option<&Tensor>, y: &mut Tensor, kernel: ConvKernel) -> Result<()> {
    let all = tensors(&[Some(x), Some(w), bias, Some(&*y)]);
    let device = common_device(op, &all)?;
    let dtype = common_dtype(op, &device, &all)?;
    match device {
        Device::Cpu => {
            let bias = bias.map(|b| b.f32s()).transpose()?;
            cpu_forward(g, x.f32s()?, w.f32s()?, bias, y.f32s_mut()?);
            Ok(())
        }
        Device::Cuda(d) => {
            let bias = bias.map(|b| b.cuda_ptr()).transpose()?.unwrap_or(0);
            let args = [Ptr(x.cuda_ptr()?), Ptr(w.cuda_ptr()?), Ptr(bias), Ptr(y.cuda_ptr()?)];
            let (rows, cols) = (g.k, g.n * g.p * g.q);
            if dtype == DType::BF16 && kernel == ConvKernel::TensorCore && d.arch.major >= 8 {
                launch_gemm(op, &d, "conv2d_forward_mma_bf16", g, (rows, cols), MMA_TILE, &args)
            } else {
                launch_gemm(op, &d, by_dtype(dtype, "conv2d_forward")?, g, (rows, cols), TILE, &args)
            }
        }
    }
}

/// `dx[n, c, h, w] = bias[c] + sum over the taps that read (h, w) of w[k, c, r, s] dy[n, k, p, q]`.
fn backward_input(op: &str, g: &Geometry, dy: &Tensor, w: &Tensor, bias: Option<&Tensor>, dx: &mut Tensor, kernel: ConvKernel) -> Result<()> {
    let all = tensors(&[Some(dy), Some(w), bias, Some(&*dx)]);
    let device = common_device(op, &all)?;
    let dtype = common_dtype(op, &device, &all)?;
    match device {
        Device::Cpu => {
            let bias = bias.map(|b| b.f32s()).transpose()?;
            cpu_backward_input(g, dy.f32s()?, w.f32s()?, bias, dx.f32s_mut()?);
            Ok(())
        }
        Device::Cuda(d) => {
            let bias = bias.map(|b| b.cuda_ptr()).transpose()?.unwrap_or(0);
            let args = [Ptr(dy.cuda_ptr()?), Ptr(w.cuda_ptr()?), Ptr(bias), Ptr(dx.cuda_ptr()?)];
            let (rows, cols) = (g.c, g.n * g.h * g.w);
            // At stride 1 the data gradient is itself a convolution (rotated, transposed weights): tensor cores.
            let as_conv = g.stride == 1 && g.pad_h < g.r && g.pad_w < g.s;
            if dtype == DType::BF16 && kernel == ConvKernel::TensorCore && d.arch.major >= 8 && as_conv {
                launch_gemm(op, &d, "conv2d_backward_input_mma_bf16", g, (rows, cols), MMA_TILE, &args)
            } else {
                launch_gemm(op, &d, by_dtype(dtype, "conv2d_backward_input")?, g, (rows, cols), TILE, &args)
            }
        }
    }
}

/// `dw[k, c, r, s] += sum_{n, p, q} dy[n, k, p, q] x[n, c, p*stride - pad_h + r, q*stride - pad_w + s]`.
fn backward_weight(op: &str, g: &Geometry, x: &Tensor, dy: &Tensor, dw: &mut Tensor, kernel: ConvKernel) -> Result<()> {
    let device = common_device(op, &[x, dy, dw])?;
    let dtype = common_dtype(op, &device, &[x, dy, dw])?;
    match device {
        Device::Cpu => {
            cpu_backward_weight(g, x.f32s()?, dy.f32s()?, dw.f32s_mut()?);
            Ok(())
        }
        Device::Cuda(d) => {
            if dtype == DType::BF16 && kernel == ConvKernel::TensorCore && d.arch.major >= 8 {
                return backward_weight_mma(op, &d, g, x, dy, dw);
            }
            let args = [Ptr(x.cuda_ptr()?), Ptr(dy.cuda_ptr()?), Ptr(dw.cuda_ptr()?)];
            launch_gemm(op, &d, by_dtype(dtype, "conv2d_backward_weight")?, g, (g.k, g.patch_len()), TILE, &args)
        }
    }
}

/// Blocks the tensor-core weight gradient aims for: two waves of a 132-SM H100.
const DW_TARGET_BLOCKS: usize = 264;

/// The weight gradient on tensor cores: the (k, crs) output tiles rarely fill the GPU (SD 1.5's 3x3 convs
/// have 23 x 3 of them at 320 channels), so the N*P*Q reduction is split over the grid's z axis into slices
/// of at least 256, whose f32 partial sums a second kernel adds into dw; a single slice adds directly.
fn backward_weight_mma(op: &str, d: &CudaDevice, g: &Geometry, x: &Tensor, dy: &Tensor, dw: &mut Tensor) -> Result<()> {
    let (rows, cols, reduction) = (g.k, g.patch_len(), g.n * g.p * g.q);
    if rows == 0 || cols == 0 || reduction == 0 {
        return Ok(());
    }
    let tiles = rows.div_ceil(MMA_TILE) * cols.div_ceil(MMA_TILE);
    let splits = DW_TARGET_BLOCKS.div_ceil(tiles).min(reduction.div_ceil(256)).clamp(1, 65_535);
    let chunk = reduction.div_ceil(splits).div_ceil(32) * 32;
    let splits = reduction.div_ceil(chunk);
    ensure!(chunk <= i32::MAX as usize, "{op}: a reduction slice of {chunk} exceeds the kernel's 32-bit argument");
    let partial = if splits > 1 { Some(Tensor::zeros(&x.device(), &[splits, rows, cols], DType::F32)?) } else { None };
    let partial_ptr = partial.as_ref().map(Tensor::cuda_ptr).transpose()?.unwrap_or(0);
    let dims = [g.n, g.c, g.h, g.w, g.k, g.r, g.s, g.stride, g.pad_h, g.pad_w, g.p, g.q];
    let fits = |v: usize| v <= i32::MAX as usize;
    ensure!(
        dims.iter().all(|&v| fits(v)) && fits(g.input_len()) && fits(g.output_len()) && fits(rows * cols),
        "{op}: geometry {g:?} exceeds the kernel's 32-bit per-image indexing"
    );
    ensure!(rows.div_ceil(MMA_TILE) <= 65_535 && fits(cols.div_ceil(MMA_TILE)), "{op}: {rows}x{cols} is too large a grid");
    let cfg = LaunchConfig {
        grid_dim: (cols.div_ceil(MMA_TILE) as u32, rows.div_ceil(MMA_TILE) as u32, splits as u32),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut args = vec![Ptr(x.cuda_ptr()?), Ptr(dy.cuda_ptr()?), Ptr(dw.cuda_ptr()?), Ptr(partial_ptr), I32(chunk as i32), I32((splits > 1) as i32)];
    args.extend(dims.iter().map(|&v| I32(v as i32)));
    d.launch(KERNEL_FILE, "conv2d_backward_weight_mma_bf16", cfg, &args, None)?;
    if splits > 1 {
        d.launch_elementwise(KERNEL_FILE, "conv_dw_reduce_bf16", &[Ptr(partial_ptr), Ptr(dw.cuda_ptr()?), I32(splits as i32)], rows * cols)?;
    }
    // `partial` is freed on the stream after the reduction that reads it.
    Ok(())
}

/// Benchmark baseline only: the convolutions above never build an im2col buffer (CPU: per image, internally;
/// CUDA: implicit GEMM). `benches/conv.rs` times im2col + a batched GEMM against them, the composition they
/// replace. `col` [N, C*kH*kW, H'*W'] = the patches of `x` [N, C, H, W] under a `kernel` [kH, kW] window with
/// `spec`'s stride and padding: `col[n, (c, r, s), (p, q)] = x[n, c, p*stride - top + r, q*stride - left + s]`,
/// zero in the padding; so `y[n] = w.reshape(C_out, C*kH*kW) · col[n]` is the Conv2d. Exact (values move).
pub fn im2col(x: &Tensor, kernel: [usize; 2], spec: Conv2dSpec, col: &mut Tensor) -> Result<()> {
    let op = "im2col";
    let xs = x.shape();
    ensure!(xs.len() == 4, "{op}: input {xs:?} is not [N, C, H, W]");
    let g = conv2d_geometry(op, xs, &[1, xs[1], kernel[0], kernel[1]], spec)?;
    expect_shape(op, "col", col, &[g.n, g.patch_len(), g.p * g.q])?;
    let device = common_device(op, &[x, col])?;
    let dtype = common_dtype(op, &device, &[x, col])?;
    match device {
        Device::Cpu => {
            im2col_cpu(&g, x.f32s()?, col.f32s_mut()?);
            Ok(())
        }
        Device::Cuda(d) => {
            let dims = [g.n, g.c, g.h, g.w, g.k, g.r, g.s, g.stride, g.pad_h, g.pad_w, g.p, g.q];
            ensure!(
                dims.iter().all(|&v| v <= i32::MAX as usize) && g.patch_len() * g.p * g.q <= i32::MAX as usize,
                "{op}: geometry {g:?} exceeds the kernel's 32-bit per-image indexing"
            );
            let args: Vec<KernelArg> = [Ptr(x.cuda_ptr()?), Ptr(col.cuda_ptr()?)].into_iter().chain(dims.iter().map(|&v| I32(v as i32))).collect();
            d.launch_elementwise(KERNEL_FILE, by_dtype(dtype, "im2col")?, &args, col.numel())
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// CUDA launchers.

fn by_dtype(dtype: DType, kernel: &str) -> Result<&'static str> {
    let name = format!("{kernel}_{}", if dtype == DType::BF16 { "bf16" } else { "f32" });
    Ok(kernel_table::find(KERNEL_FILE, &name)?.name)
}

/// Output tile of the SIMT kernels, and of the tensor-core forward.
const TILE: usize = 64;
const MMA_TILE: usize = 128;
const THREADS: u32 = 256;

/// Launches one implicit-GEMM kernel over a `rows` x `cols` output in `tile` x `tile` blocks of 256
/// threads, then the twelve sizes.
fn launch_gemm(
    op: &str,
    d: &CudaDevice,
    kernel: &'static str,
    g: &Geometry,
    (rows, cols): (usize, usize),
    tile: usize,
    pointers: &[KernelArg],
) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let dims = [g.n, g.c, g.h, g.w, g.k, g.r, g.s, g.stride, g.pad_h, g.pad_w, g.p, g.q];
    // The kernels index within one image and one weight with 32-bit ints and across the batch with 64-bit.
    let fits = |v: usize| v <= i32::MAX as usize;
    ensure!(
        dims.iter().all(|&v| fits(v)) && fits(g.input_len()) && fits(g.output_len()) && fits(g.k * g.patch_len()),
        "{op}: geometry {g:?} exceeds the kernel's 32-bit per-image indexing"
    );
    ensure!(rows.div_ceil(tile) <= 65_535 && fits(cols.div_ceil(tile)), "{op}: {rows}x{cols} is too large a grid");
    let cfg = LaunchConfig { grid_dim: (cols.div_ceil(tile) as u32, rows.div_ceil(tile) as u32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    let args: Vec<KernelArg> = pointers.iter().copied().chain(dims.iter().map(|&v| I32(v as i32))).collect();
    d.launch(KERNEL_FILE, kernel, cfg, &args, None)
}

// ---------------------------------------------------------------------------------------------------------
// CPU reference: im2col + sgemm per image. matrixmultiply already spreads each GEMM over the cores, so the
// batch is walked in order (running images in parallel on top would oversubscribe, and does nothing at
// batch 1); im2col and col2im run in parallel over channels.

/// `col[(c, r, s), (p, q)] = x[c, p*stride - pad_h + r, q*stride - pad_w + s]`, zero in the padding.
fn im2col_cpu(g: &Geometry, x: &[f32], col: &mut [f32]) {
    let (rs, pq) = (g.r * g.s, g.p * g.q);
    col.par_chunks_mut(rs * pq).zip(x.par_chunks(g.h * g.w)).for_each(|(rows, img)| {
        for (tap, row) in rows.chunks_mut(pq).enumerate() {
            let (r, s) = (tap / g.s, tap % g.s);
            for (p, out) in row.chunks_mut(g.q).enumerate() {
                let ih = (p * g.stride + r) as isize - g.pad_h as isize;
                if ih < 0 || ih >= g.h as isize {
                    out.fill(0.0);
                    continue;
                }
                let line = &img[ih as usize * g.w..][..g.w];
                for (q, v) in out.iter_mut().enumerate() {
                    let iw = (q * g.stride + s) as isize - g.pad_w as isize;
                    *v = if iw >= 0 && iw < g.w as isize { line[iw as usize] } else { 0.0 };
                }
            }
        }
    });
}

/// The adjoint of [`im2col_cpu`]: `x[c, h, w] = sum of the col entries that im2col read from (h, w)`.
fn col2im(g: &Geometry, col: &[f32], x: &mut [f32]) {
    let (rs, pq) = (g.r * g.s, g.p * g.q);
    x.par_chunks_mut(g.h * g.w).zip(col.par_chunks(rs * pq)).for_each(|(img, rows)| {
        img.fill(0.0);
        for (tap, row) in rows.chunks(pq).enumerate() {
            let (r, s) = (tap / g.s, tap % g.s);
            for (p, vals) in row.chunks(g.q).enumerate() {
                let ih = (p * g.stride + r) as isize - g.pad_h as isize;
                if ih < 0 || ih >= g.h as isize {
                    continue;
                }
                let line = &mut img[ih as usize * g.w..][..g.w];
                for (q, v) in vals.iter().enumerate() {
                    let iw = (q * g.stride + s) as isize - g.pad_w as isize;
                    if iw >= 0 && iw < g.w as isize {
                        line[iw as usize] += v;
                    }
                }
            }
        }
    });
}

/// Row-major `c[m, n] = a · b + beta · c[m, n]` where `a` is [m, k] (or [k, m] if `a_t`) and `b` is [k, n]
/// (or [n, k] if `b_t`).
fn gemm(m: usize, k: usize, n: usize, a: &[f32], a_t: bool, b: &[f32], b_t: bool, beta: f32, c: &mut [f32]) {
    cpu_gemm(GemmShape { m, n, k, trans_a: a_t, trans_b: b_t, batch: 1 }, a, b, c, 1.0, beta);
}

fn add_bias(bias: Option<&[f32]>, out: &mut [f32], plane: usize) {
    if let Some(bias) = bias {
        for (row, b) in out.chunks_mut(plane).zip(bias) {
            row.iter_mut().for_each(|v| *v += b);
        }
    }
}

fn cpu_forward(g: &Geometry, x: &[f32], w: &[f32], bias: Option<&[f32]>, y: &mut [f32]) {
    let (crs, pq) = (g.patch_len(), g.p * g.q);
    let mut col = if g.pointwise() { Vec::new() } else { vec![0.0; crs * pq] };
    for (img, out) in x.chunks(g.input_len()).zip(y.chunks_mut(g.output_len())).take(g.n) {
        let cols = if g.pointwise() {
            img
        } else {
            im2col_cpu(g, img, &mut col);
            &col
        };
        gemm(g.k, crs, pq, w, false, cols, false, 0.0, out);
        add_bias(bias, out, pq);
    }
}

fn cpu_backward_input(g: &Geometry, dy: &[f32], w: &[f32], bias: Option<&[f32]>, dx: &mut [f32]) {
    let (crs, pq) = (g.patch_len(), g.p * g.q);
    let mut col = if g.pointwise() { Vec::new() } else { vec![0.0; crs * pq] };
    for (grad, img) in dy.chunks(g.output_len()).zip(dx.chunks_mut(g.input_len())).take(g.n) {
        if g.pointwise() {
            gemm(crs, g.k, pq, w, true, grad, false, 0.0, img);
        } else {
            gemm(crs, g.k, pq, w, true, grad, false, 0.0, &mut col);
            col2im(g, &col, img);
        }
        add_bias(bias, img, g.h * g.w);
    }
}

fn cpu_backward_weight(g: &Geometry, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    let (crs, pq) = (g.patch_len(), g.p * g.q);
    let mut col = if g.pointwise() { Vec::new() } else { vec![0.0; crs * pq] };
    for (img, grad) in x.chunks(g.input_len()).zip(dy.chunks(g.output_len())).take(g.n) {
        let cols = if g.pointwise() {
            img
        } else {
            im2col_cpu(g, img, &mut col);
            &col
        };
        // beta = 1: accumulate into dw, image after image and on top of what the caller holds.
        gemm(g.k, pq, crs, grad, false, cols, true, 1.0, dw);
    }
}
