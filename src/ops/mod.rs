//! Ops, one module per op family: the CPU reference (f32) and the CUDA launcher of each op side by side.
//!
//! Conventions shared by every family:
//! - Tensors are dense, row-major; images are NCHW, sequences [batch, length, features].
//! - Outputs and activation gradients are written (`=`); parameter gradients accumulate (`+=`), so several
//!   uses of one weight, or gradient accumulation over micro-batches, need no extra buffer.
//! - Launchers check devices, dtypes and shapes and return an error naming the op and the shapes; kernels
//!   trust them. The CPU backend computes in f32; CUDA stores f32 or bf16 and accumulates in f32.

pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod infonce;
pub mod linear;
pub mod loss;
pub mod lstm;
pub mod norm;
pub mod optim;
pub mod sampling;
pub mod shape;
pub mod softmax;
pub mod vmath;

use anyhow::{ensure, Result};

use crate::runtime::device::Device;
use crate::tensor::{DType, Tensor};

/// Which CUDA kernel runs an op that has both a tensor-core and a CUDA-core kernel (the conv forward and data
/// gradient, the attention forward; bf16 on sm_80+ only: other dtypes and GPUs always take [`Variant::Simt`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// Tensor cores: `mma.sync` m16n8k16, bf16 in, f32 accumulate. The default.
    TensorCore,
    /// f32 FMAs on the CUDA cores.
    Simt,
}

impl Variant {
    /// The variant the environment variable `var` names (`tensor-core`, the default, or `simt`), for comparing
    /// kernels in benchmarks and profiles without rebuilding.
    pub fn from_env(var: &str) -> Result<Variant> {
        match std::env::var(var).as_deref() {
            Err(_) | Ok("") | Ok("tensor-core") => Ok(Variant::TensorCore),
            Ok("simt") => Ok(Variant::Simt),
            Ok(other) => anyhow::bail!("{var}={other}: expected tensor-core or simt"),
        }
    }

    /// [`Variant::from_env`] read once per process into `cell`: the ops ask on every call, the environment
    /// does not change under them.
    pub fn from_env_once(cell: &'static std::sync::OnceLock<Result<Variant, String>>, var: &str) -> Result<Variant> {
        cell.get_or_init(|| Variant::from_env(var).map_err(|e| e.to_string())).clone().map_err(anyhow::Error::msg)
    }
}

/// The device all `tensors` share, or an error naming the op.
pub(crate) fn common_device(op: &str, tensors: &[&Tensor]) -> Result<Device> {
    let device = tensors[0].device();
    for t in &tensors[1..] {
        ensure!(t.device().same(&device), "{op}: tensors on different devices ({} and {})", device, t.device());
    }
    Ok(device)
}

/// Checks that all `tensors` have the same shape.
pub(crate) fn same_shape(op: &str, tensors: &[&Tensor]) -> Result<()> {
    for t in &tensors[1..] {
        ensure!(t.shape() == tensors[0].shape(), "{op}: shape {:?} does not match {:?}", t.shape(), tensors[0].shape());
    }
    Ok(())
}

/// The dtype all `tensors` share, checked against what the device supports for this op.
pub(crate) fn common_dtype(op: &str, device: &Device, tensors: &[&Tensor]) -> Result<DType> {
    let dtype = tensors[0].dtype();
    for t in &tensors[1..] {
        ensure!(t.dtype() == dtype, "{op}: mixed dtypes {} and {}", dtype, t.dtype());
    }
    match device {
        Device::Cpu => ensure!(dtype == DType::F32, "{op}: the CPU backend computes in f32, got {dtype}"),
        Device::Cuda(_) => {
            ensure!(matches!(dtype, DType::F32 | DType::BF16), "{op}: CUDA supports f32 and bf16, got {dtype}")
        }
    }
    Ok(dtype)
}
