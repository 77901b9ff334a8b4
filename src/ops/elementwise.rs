//! Elementwise ops: dtype casts, add, scale, SiLU forward and backward. Outputs are written (=).
//! CPU: f32 reference. CUDA: `kernels/elementwise.cu`, f32 or bf16 storage, f32 arithmetic.

use anyhow::{bail, Result};

use super::{common_device, common_dtype, same_shape};
use crate::runtime::cuda::KernelArg::{Ptr, F32};
use crate::runtime::device::Device;
use crate::tensor::{convert_bytes, DType, Tensor};

pub const KERNEL_FILE: &str = "elementwise.cu";
pub const KERNELS: &[&str] = &[
    "cast_f32_bf16",
    "cast_bf16_f32",
    "cast_f32_f16",
    "cast_f16_f32",
    "cast_bf16_f16",
    "cast_f16_bf16",
    "add_f32",
    "add_bf16",
    "scale_f32",
    "scale_bf16",
    "silu_forward_f32",
    "silu_forward_bf16",
    "silu_backward_f32",
    "silu_backward_bf16",
];

fn cast_kernel(from: DType, to: DType) -> &'static str {
    match (from, to) {
        (DType::F32, DType::BF16) => "cast_f32_bf16",
        (DType::BF16, DType::F32) => "cast_bf16_f32",
        (DType::F32, DType::F16) => "cast_f32_f16",
        (DType::F16, DType::F32) => "cast_f16_f32",
        (DType::BF16, DType::F16) => "cast_bf16_f16",
        (DType::F16, DType::BF16) => "cast_f16_bf16",
        _ => unreachable!("same-dtype casts are copies"),
    }
}

/// `y = x` converted to `y`'s dtype (round to nearest even).
pub fn cast(x: &Tensor, y: &mut Tensor) -> Result<()> {
    let device = common_device("cast", &[x, y])?;
    same_shape("cast", &[x, y])?;
    if x.dtype() == y.dtype() {
        return y.write_bytes(&x.to_bytes()?);
    }
    match device {
        Device::Cpu => {
            let bytes = convert_bytes(x.dtype(), y.dtype(), x.host_bytes()?);
            y.host_bytes_mut()?.copy_from_slice(&bytes);
            Ok(())
        }
        Device::Cuda(d) => d.launch_elementwise(
            KERNEL_FILE,
            cast_kernel(x.dtype(), y.dtype()),
            &[Ptr(x.cuda_ptr()?), Ptr(y.cuda_ptr()?)],
            x.numel(),
        ),
    }
}

fn by_dtype(dtype: DType, f32_kernel: &'static str, bf16_kernel: &'static str) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok(f32_kernel),
        DType::BF16 => Ok(bf16_kernel),
        DType::F16 => bail!("no f16 kernel"),
    }
}

/// `y = a + b`.
pub fn add(a: &Tensor, b: &Tensor, y: &mut Tensor) -> Result<()> {
    let device = common_device("add", &[a, b, y])?;
    same_shape("add", &[a, b, y])?;
    let dtype = common_dtype("add", &device, &[a, b, y])?;
    match device {
        Device::Cpu => {
            let (a, b) = (a.f32s()?, b.f32s()?);
            for ((y, a), b) in y.f32s_mut()?.iter_mut().zip(a).zip(b) {
                *y = a + b;
            }
            Ok(())
        }
        Device::Cuda(d) => d.launch_elementwise(
            KERNEL_FILE,
            by_dtype(dtype, "add_f32", "add_bf16")?,
            &[Ptr(a.cuda_ptr()?), Ptr(b.cuda_ptr()?), Ptr(y.cuda_ptr()?)],
            a.numel(),
        ),
    }
}

/// `y = alpha * x`.
pub fn scale(x: &Tensor, alpha: f32, y: &mut Tensor) -> Result<()> {
    let device = common_device("scale", &[x, y])?;
    same_shape("scale", &[x, y])?;
    let dtype = common_dtype("scale", &device, &[x, y])?;
    match device {
        Device::Cpu => {
            for (y, x) in y.f32s_mut()?.iter_mut().zip(x.f32s()?) {
                *y = alpha * x;
            }
            Ok(())
        }
        Device::Cuda(d) => d.launch_elementwise(
            KERNEL_FILE,
            by_dtype(dtype, "scale_f32", "scale_bf16")?,
            &[Ptr(x.cuda_ptr()?), F32(alpha), Ptr(y.cuda_ptr()?)],
            x.numel(),
        ),
    }
}

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

/// `y = x * sigmoid(x)`.
pub fn silu_forward(x: &Tensor, y: &mut Tensor) -> Result<()> {
    let device = common_device("silu_forward", &[x, y])?;
    same_shape("silu_forward", &[x, y])?;
    let dtype = common_dtype("silu_forward", &device, &[x, y])?;
    match device {
        Device::Cpu => {
            for (y, &x) in y.f32s_mut()?.iter_mut().zip(x.f32s()?) {
                *y = x * sigmoid(x);
            }
            Ok(())
        }
        Device::Cuda(d) => d.launch_elementwise(
            KERNEL_FILE,
            by_dtype(dtype, "silu_forward_f32", "silu_forward_bf16")?,
            &[Ptr(x.cuda_ptr()?), Ptr(y.cuda_ptr()?)],
            x.numel(),
        ),
    }
}

/// `dx = dy * silu'(x)`, with silu'(x) = s(x) (1 + x (1 - s(x))).
pub fn silu_backward(x: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
    let device = common_device("silu_backward", &[x, dy, dx])?;
    same_shape("silu_backward", &[x, dy, dx])?;
    let dtype = common_dtype("silu_backward", &device, &[x, dy, dx])?;
    match device {
        Device::Cpu => {
            for ((dx, &x), &dy) in dx.f32s_mut()?.iter_mut().zip(x.f32s()?).zip(dy.f32s()?) {
                let s = sigmoid(x);
                *dx = dy * s * (1.0 + x * (1.0 - s));
            }
            Ok(())
        }
        Device::Cuda(d) => d.launch_elementwise(
            KERNEL_FILE,
            by_dtype(dtype, "silu_backward_f32", "silu_backward_bf16")?,
            &[Ptr(x.cuda_ptr()?), Ptr(dy.cuda_ptr()?), Ptr(dx.cuda_ptr()?)],
            x.numel(),
        ),
    }
}
