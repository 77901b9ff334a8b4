//! Elementwise ops: dtype casts, add, scale, product, residual add with a scale, the activations (SiLU,
//! ReLU, exact GELU, GEGLU, sigmoid, tanh) and the natural log and reciprocal square root, forward and
//! backward, and diffusers' sinusoidal timestep embedding. Outputs and
//! input gradients are written (=). CPU: f32 reference. CUDA: `kernels/elementwise.cu`, f32 or bf16 storage,
//! f32 arithmetic.

use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

use super::{common_device, common_dtype, same_shape};
use crate::runtime::cuda::KernelArg::{Ptr, F32, I32, I64};
use crate::runtime::device::Device;
use crate::tensor::{convert_bytes, DType, Tensor};

pub const KERNEL_FILE: &str = "elementwise.cu";

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
    let _profile = crate::profile::scope(crate::profile::Family::Elementwise, || {
        (device.clone(), y.numel() as f64, crate::profile::bytes_of(&[x.numel(), y.numel()], y.dtype().size()))
    });
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
        Device::Cuda(d) => d.launch_elementwise(KERNEL_FILE, cast_kernel(x.dtype(), y.dtype()), &[Ptr(x.cuda_ptr()?), Ptr(y.cuda_ptr()?)], x.numel()),
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
    let _profile = crate::profile::scope(crate::profile::Family::Elementwise, || {
        (device.clone(), y.numel() as f64, crate::profile::bytes_of(&[a.numel(), b.numel(), y.numel()], y.dtype().size()))
    });
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

/// Every element of `y` set to `value` (on the device's stream: no host copy, no synchronisation).
pub fn fill(y: &mut Tensor, value: f32) -> Result<()> {
    let device = y.device();
    let dtype = common_dtype("fill", &device, &[y])?;
    match device {
        Device::Cpu => {
            y.f32s_mut()?.fill(value);
            Ok(())
        }
        Device::Cuda(d) => d.launch_elementwise(KERNEL_FILE, by_dtype(dtype, "fill_f32", "fill_bf16")?, &[Ptr(y.cuda_ptr()?), F32(value)], y.numel()),
    }
}

/// `y = alpha * x`.
pub fn scale(x: &Tensor, alpha: f32, y: &mut Tensor) -> Result<()> {
    let device = common_device("scale", &[x, y])?;
    let _profile = crate::profile::scope(crate::profile::Family::Elementwise, || {
        (device.clone(), y.numel() as f64, crate::profile::bytes_of(&[x.numel(), y.numel()], y.dtype().size()))
    });
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

/// Below this many elements the CPU ops run on one thread: rayon's fork-join costs more than it saves.
const PAR_MIN: usize = 1 << 14;

fn map1(x: &[f32], y: &mut [f32], f: impl Fn(f32) -> f32 + Sync) {
    y.par_iter_mut().zip(x.par_iter()).with_min_len(PAR_MIN).for_each(|(y, &x)| *y = f(x));
}

fn map2(a: &[f32], b: &[f32], y: &mut [f32], f: impl Fn(f32, f32) -> f32 + Sync) {
    y.par_iter_mut().zip(a.par_iter().zip(b.par_iter())).with_min_len(PAR_MIN).for_each(|(y, (&a, &b))| *y = f(a, b));
}

/// A unary op `y = f(x)` (or a backward `dx = f(x, dy)`) on either device; `kernels` = (f32, bf16) names.
fn unary(op: &str, kernels: (&'static str, &'static str), x: &Tensor, y: &mut Tensor, cpu: impl Fn(f32) -> f32 + Sync) -> Result<()> {
    let device = common_device(op, &[x, y])?;
    same_shape(op, &[x, y])?;
    let dtype = common_dtype(op, &device, &[x, y])?;
    let _profile = crate::profile::scope(crate::profile::Family::Elementwise, || {
        (device.clone(), y.numel() as f64, crate::profile::bytes_of(&[x.numel(), y.numel()], y.dtype().size()))
    });
    match device {
        Device::Cpu => {
            map1(x.f32s()?, y.f32s_mut()?, cpu);
            Ok(())
        }
        Device::Cuda(d) => {
            d.launch_elementwise(KERNEL_FILE, by_dtype(dtype, kernels.0, kernels.1)?, &[Ptr(x.cuda_ptr()?), Ptr(y.cuda_ptr()?)], x.numel())
        }
    }
}

fn binary(
    op: &str,
    kernels: (&'static str, &'static str),
    a: &Tensor,
    b: &Tensor,
    y: &mut Tensor,
    cpu: impl Fn(f32, f32) -> f32 + Sync,
) -> Result<()> {
    let device = common_device(op, &[a, b, y])?;
    same_shape(op, &[a, b, y])?;
    let dtype = common_dtype(op, &device, &[a, b, y])?;
    let _profile = crate::profile::scope(crate::profile::Family::Elementwise, || {
        (device.clone(), y.numel() as f64, crate::profile::bytes_of(&[a.numel(), b.numel(), y.numel()], y.dtype().size()))
    });
    match device {
        Device::Cpu => {
            map2(a.f32s()?, b.f32s()?, y.f32s_mut()?, cpu);
            Ok(())
        }
        Device::Cuda(d) => d.launch_elementwise(
            KERNEL_FILE,
            by_dtype(dtype, kernels.0, kernels.1)?,
            &[Ptr(a.cuda_ptr()?), Ptr(b.cuda_ptr()?), Ptr(y.cuda_ptr()?)],
            a.numel(),
        ),
    }
}

/// `y = max(x, 0)`; NaN propagates, as in torch.
pub fn relu_forward(x: &Tensor, y: &mut Tensor) -> Result<()> {
    unary("relu_forward", ("relu_forward_f32", "relu_forward_bf16"), x, y, |x| if x < 0.0 { 0.0 } else { x })
}

/// `dx = 0` where `x <= 0`, else `dy` (torch's threshold_backward: 0 at x = 0).
pub fn relu_backward(x: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
    binary("relu_backward", ("relu_backward_f32", "relu_backward_bf16"), x, dy, dx, |x, g| if x <= 0.0 { 0.0 } else { g })
}

/// Coefficients of Numerical Recipes' `erfcc` fit: erfc(z) = t exp(-z^2 + sum_k c_k t^k), t = 1 / (1 + z/2),
/// for z >= 0, with relative error below 1.2e-7 everywhere.
const ERFC_FIT: [f32; 10] =
    [-1.265_512_2, 1.000_023_7, 0.374_091_96, 0.096_784_18, -0.186_288_06, 0.278_868_07, -1.135_204, 1.488_515_9, -0.822_152_23, 0.170_872_77];

/// `erfc(z)` in f32 with the fit's relative accuracy in the tail, which GELU's left side needs (1 + erf
/// cancels there).
fn erfc(z: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.5 * z.abs());
    let poly = ERFC_FIT.iter().rev().fold(0.0, |acc, c| acc * t + c);
    let r = t * (-z * z + poly).exp();
    if z >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// The standard normal CDF, `erfc(-x / sqrt 2) / 2`.
fn normal_cdf(x: f32) -> f32 {
    0.5 * erfc(-x * std::f32::consts::FRAC_1_SQRT_2)
}

/// Exact (erf) GELU, torch's default: `x * Phi(x)`.
pub fn gelu(x: f32) -> f32 {
    x * normal_cdf(x)
}

/// `gelu'(x) = Phi(x) + x phi(x)`.
pub fn gelu_grad(x: f32) -> f32 {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    normal_cdf(x) + x * (-0.5 * x * x).exp() * INV_SQRT_2PI
}

/// `y = gelu(x)`, the exact erf form (torch's `approximate='none'`).
pub fn gelu_forward(x: &Tensor, y: &mut Tensor) -> Result<()> {
    unary("gelu_forward", ("gelu_forward_f32", "gelu_forward_bf16"), x, y, gelu)
}

/// `dx = dy * gelu'(x)`.
pub fn gelu_backward(x: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
    binary("gelu_backward", ("gelu_backward_f32", "gelu_backward_bf16"), x, dy, dx, |x, g| g * gelu_grad(x))
}

/// Checks GEGLU shapes: `x` [.., 2h], `y` [.., h] with the same leading dims; returns h.
fn geglu_half(op: &str, x: &Tensor, y: &Tensor) -> Result<usize> {
    let (xs, ys) = (x.shape(), y.shape());
    let ok = !xs.is_empty()
        && xs.len() == ys.len()
        && xs[xs.len() - 1] % 2 == 0
        && xs[..xs.len() - 1] == ys[..ys.len() - 1]
        && xs[xs.len() - 1] / 2 == ys[ys.len() - 1];
    ensure!(ok, "{op}: input {xs:?} must be [.., 2h] and the output [.., h] with the same leading dims, got {ys:?}");
    Ok(ys[ys.len() - 1])
}

/// GEGLU as diffusers' feed-forward uses it: `x` [.., 2h] splits along the last dim into value = first half
/// and gate = second half; `y` [.., h] = value * gelu(gate).
pub fn geglu_forward(x: &Tensor, y: &mut Tensor) -> Result<()> {
    let device = common_device("geglu_forward", &[x, y])?;
    let _profile = crate::profile::scope(crate::profile::Family::Elementwise, || {
        (device.clone(), y.numel() as f64, crate::profile::bytes_of(&[x.numel(), y.numel()], y.dtype().size()))
    });
    let half = geglu_half("geglu_forward", x, y)?;
    let dtype = common_dtype("geglu_forward", &device, &[x, y])?;
    if half == 0 || y.numel() == 0 {
        return Ok(());
    }
    match device {
        Device::Cpu => {
            let x = x.f32s()?;
            y.f32s_mut()?.par_chunks_mut(half).zip(x.par_chunks(2 * half)).for_each(|(y, x)| {
                let (value, gate) = x.split_at(half);
                for ((y, v), g) in y.iter_mut().zip(value).zip(gate) {
                    *y = v * gelu(*g);
                }
            });
            Ok(())
        }
        Device::Cuda(d) => d.launch_elementwise(
            KERNEL_FILE,
            by_dtype(dtype, "geglu_forward_f32", "geglu_forward_bf16")?,
            &[Ptr(x.cuda_ptr()?), Ptr(y.cuda_ptr()?), I64(half as i64)],
            y.numel(),
        ),
    }
}

/// GEGLU backward: `dx` [.., 2h] is written in both halves, dvalue = dy * gelu(gate) and
/// dgate = dy * value * gelu'(gate).
pub fn geglu_backward(x: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
    let device = common_device("geglu_backward", &[x, dy, dx])?;
    let half = geglu_half("geglu_backward", x, dy)?;
    same_shape("geglu_backward", &[x, dx])?;
    let dtype = common_dtype("geglu_backward", &device, &[x, dy, dx])?;
    if half == 0 || dy.numel() == 0 {
        return Ok(());
    }
    match device {
        Device::Cpu => {
            let (x, dy) = (x.f32s()?, dy.f32s()?);
            dx.f32s_mut()?.par_chunks_mut(2 * half).zip(x.par_chunks(2 * half).zip(dy.par_chunks(half))).for_each(|(dx, (x, dy))| {
                let (value, gate) = x.split_at(half);
                let (dvalue, dgate) = dx.split_at_mut(half);
                for i in 0..half {
                    dvalue[i] = dy[i] * gelu(gate[i]);
                    dgate[i] = dy[i] * value[i] * gelu_grad(gate[i]);
                }
            });
            Ok(())
        }
        Device::Cuda(d) => d.launch_elementwise(
            KERNEL_FILE,
            by_dtype(dtype, "geglu_backward_f32", "geglu_backward_bf16")?,
            &[Ptr(x.cuda_ptr()?), Ptr(dy.cuda_ptr()?), Ptr(dx.cuda_ptr()?), I64(half as i64)],
            dy.numel(),
        ),
    }
}

/// `y = 1 / (1 + exp(-x))`.
pub fn sigmoid_forward(x: &Tensor, y: &mut Tensor) -> Result<()> {
    unary("sigmoid_forward", ("sigmoid_forward_f32", "sigmoid_forward_bf16"), x, y, sigmoid)
}

/// `dx = dy * y * (1 - y)`, from the forward's output `y`.
pub fn sigmoid_backward(y: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
    binary("sigmoid_backward", ("sigmoid_backward_f32", "sigmoid_backward_bf16"), y, dy, dx, |s, g| g * s * (1.0 - s))
}

/// Residual add with a scale: `y = a + s * b`.
pub fn add_scaled(a: &Tensor, b: &Tensor, s: f32, y: &mut Tensor) -> Result<()> {
    let device = common_device("add_scaled", &[a, b, y])?;
    let _profile = crate::profile::scope(crate::profile::Family::Elementwise, || {
        (device.clone(), y.numel() as f64, crate::profile::bytes_of(&[a.numel(), b.numel(), y.numel()], y.dtype().size()))
    });
    same_shape("add_scaled", &[a, b, y])?;
    let dtype = common_dtype("add_scaled", &device, &[a, b, y])?;
    match device {
        Device::Cpu => {
            map2(a.f32s()?, b.f32s()?, y.f32s_mut()?, |a, b| a + s * b);
            Ok(())
        }
        Device::Cuda(d) => d.launch_elementwise(
            KERNEL_FILE,
            by_dtype(dtype, "add_scaled_f32", "add_scaled_bf16")?,
            &[Ptr(a.cuda_ptr()?), Ptr(b.cuda_ptr()?), F32(s), Ptr(y.cuda_ptr()?)],
            a.numel(),
        ),
    }
}

/// Backward of `y = a + s * b`: `da = dy`, `db = s * dy` (both written).
pub fn add_scaled_backward(dy: &Tensor, s: f32, da: &mut Tensor, db: &mut Tensor) -> Result<()> {
    let device = common_device("add_scaled_backward", &[dy, da, db])?;
    same_shape("add_scaled_backward", &[dy, da, db])?;
    let dtype = common_dtype("add_scaled_backward", &device, &[dy, da, db])?;
    match device {
        Device::Cpu => {
            let dy = dy.f32s()?;
            da.f32s_mut()?.copy_from_slice(dy);
            map1(dy, db.f32s_mut()?, |g| s * g);
            Ok(())
        }
        Device::Cuda(d) => d.launch_elementwise(
            KERNEL_FILE,
            by_dtype(dtype, "add_scaled_backward_f32", "add_scaled_backward_bf16")?,
            &[Ptr(dy.cuda_ptr()?), F32(s), Ptr(da.cuda_ptr()?), Ptr(db.cuda_ptr()?)],
            dy.numel(),
        ),
    }
}

/// The VAE's reparameterisation `z = mu + eps * exp(logvar / 2)` for a given standard-normal `eps`.
pub fn reparameterize_forward(mu: &Tensor, logvar: &Tensor, eps: &Tensor, z: &mut Tensor) -> Result<()> {
    const OP: &str = "reparameterize_forward";
    let device = common_device(OP, &[mu, logvar, eps, z])?;
    same_shape(OP, &[mu, logvar, eps, z])?;
    let dtype = common_dtype(OP, &device, &[mu, logvar, eps, z])?;
    match device {
        Device::Cpu => {
            let (mu, logvar, eps) = (mu.f32s()?, logvar.f32s()?, eps.f32s()?);
            for (i, z) in z.f32s_mut()?.iter_mut().enumerate() {
                *z = mu[i] + eps[i] * (0.5 * logvar[i]).exp();
            }
            Ok(())
        }
        Device::Cuda(d) => d.launch_elementwise(
            KERNEL_FILE,
            by_dtype(dtype, "reparameterize_forward_f32", "reparameterize_forward_bf16")?,
            &[Ptr(mu.cuda_ptr()?), Ptr(logvar.cuda_ptr()?), Ptr(eps.cuda_ptr()?), Ptr(z.cuda_ptr()?)],
            mu.numel(),
        ),
    }
}

/// Backward of [`reparameterize_forward`]: `dmu = dz`, `dlogvar = dz * eps * exp(logvar / 2) / 2` (written).
pub fn reparameterize_backward(logvar: &Tensor, eps: &Tensor, dz: &Tensor, dmu: &mut Tensor, dlogvar: &mut Tensor) -> Result<()> {
    const OP: &str = "reparameterize_backward";
    let device = common_device(OP, &[logvar, eps, dz, dmu, dlogvar])?;
    same_shape(OP, &[logvar, eps, dz, dmu, dlogvar])?;
    let dtype = common_dtype(OP, &device, &[logvar, eps, dz, dmu, dlogvar])?;
    match device {
        Device::Cpu => {
            let (logvar, eps, dz) = (logvar.f32s()?, eps.f32s()?, dz.f32s()?);
            dmu.f32s_mut()?.copy_from_slice(dz);
            for (i, d) in dlogvar.f32s_mut()?.iter_mut().enumerate() {
                *d = 0.5 * dz[i] * eps[i] * (0.5 * logvar[i]).exp();
            }
            Ok(())
        }
        Device::Cuda(d) => d.launch_elementwise(
            KERNEL_FILE,
            by_dtype(dtype, "reparameterize_backward_f32", "reparameterize_backward_bf16")?,
            &[Ptr(logvar.cuda_ptr()?), Ptr(eps.cuda_ptr()?), Ptr(dz.cuda_ptr()?), Ptr(dmu.cuda_ptr()?), Ptr(dlogvar.cuda_ptr()?)],
            dz.numel(),
        ),
    }
}

/// diffusers' `get_timestep_embedding` with max_period 10000 and scale 1: `t` [batch] f32 timesteps, `y`
/// [batch, dim] (f32, or bf16 on CUDA). half = dim / 2, freq_k = exp(-ln(10000) k / (half - freq_shift)),
/// each row is (sin(t freq), cos(t freq)), or (cos, sin) with `flip_sin_to_cos`; an odd dim's last column
/// is 0. Computed in f32 in torch's order of operations. SD 1.5's UNet uses flip = true, freq_shift = 0.
/// Timesteps stay f32 on both devices: bf16 cannot hold 999.
pub fn timestep_embedding(t: &Tensor, flip_sin_to_cos: bool, freq_shift: f32, y: &mut Tensor) -> Result<()> {
    const OP: &str = "timestep_embedding";
    let device = common_device(OP, &[t, y])?;
    ensure!(
        t.shape().len() == 1 && y.shape().len() == 2 && y.shape()[0] == t.shape()[0],
        "{OP}: timesteps {:?} must be [batch] and the embedding {:?} [batch, dim]",
        t.shape(),
        y.shape()
    );
    ensure!(t.dtype() == DType::F32, "{OP}: timesteps must be f32 (bf16 cannot hold 999), got {}", t.dtype());
    let dtype = common_dtype(OP, &device, &[y])?;
    let dim = y.shape()[1];
    let half = dim / 2;
    ensure!(half as f32 - freq_shift != 0.0, "{OP}: dim {dim} with freq_shift {freq_shift} divides by half - freq_shift = 0");
    ensure!(dim <= i32::MAX as usize, "{OP}: dim {dim} is too large");
    if y.numel() == 0 {
        return Ok(());
    }
    match device {
        Device::Cpu => {
            let t = t.f32s()?;
            let ln_max_period = -(10000f64.ln() as f32);
            let freqs: Vec<f32> = (0..half).map(|k| ((ln_max_period * k as f32) / (half as f32 - freq_shift)).exp()).collect();
            for (row, &t) in y.f32s_mut()?.chunks_mut(dim).zip(t) {
                let (first, rest) = row.split_at_mut(half);
                let (second, pad) = rest.split_at_mut(half);
                let (sin, cos) = if flip_sin_to_cos { (second, first) } else { (first, second) };
                for k in 0..half {
                    let arg = t * freqs[k];
                    sin[k] = arg.sin();
                    cos[k] = arg.cos();
                }
                pad.fill(0.0);
            }
            Ok(())
        }
        Device::Cuda(d) => d.launch_elementwise(
            KERNEL_FILE,
            by_dtype(dtype, "timestep_embedding_f32", "timestep_embedding_bf16")?,
            &[Ptr(t.cuda_ptr()?), Ptr(y.cuda_ptr()?), I32(dim as i32), I32(flip_sin_to_cos as i32), F32(freq_shift)],
            y.numel(),
        ),
    }
}

/// `y = tanh(x)`.
pub fn tanh_forward(x: &Tensor, y: &mut Tensor) -> Result<()> {
    unary("tanh_forward", ("tanh_forward_f32", "tanh_forward_bf16"), x, y, f32::tanh)
}

/// `dx = dy * (1 - y^2)`, from the forward's output `y` (like [`sigmoid_backward`]).
pub fn tanh_backward(y: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
    binary("tanh_backward", ("tanh_backward_f32", "tanh_backward_bf16"), y, dy, dx, |t, g| g * (1.0 - t * t))
}

/// `y = ln(x)`: NaN for x < 0 and -inf at 0, as in torch.
pub fn log_forward(x: &Tensor, y: &mut Tensor) -> Result<()> {
    unary("log_forward", ("log_forward_f32", "log_forward_bf16"), x, y, f32::ln)
}

/// `dx = dy / x`.
pub fn log_backward(x: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
    binary("log_backward", ("log_backward_f32", "log_backward_bf16"), x, dy, dx, |x, g| g / x)
}

/// `y = 1 / sqrt(x)`: +inf at 0, NaN for x < 0, as torch's `rsqrt`.
pub fn rsqrt_forward(x: &Tensor, y: &mut Tensor) -> Result<()> {
    unary("rsqrt_forward", ("rsqrt_forward_f32", "rsqrt_forward_bf16"), x, y, |x| 1.0 / x.sqrt())
}

/// `dx = -dy * y^3 / 2`, from the forward's output `y` (d/dx x^(-1/2) = -x^(-3/2) / 2).
pub fn rsqrt_backward(y: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
    binary("rsqrt_backward", ("rsqrt_backward_f32", "rsqrt_backward_bf16"), y, dy, dx, |r, g| -0.5 * g * r * r * r)
}

/// `y = a * b` (same shapes; no broadcasting).
pub fn mul(a: &Tensor, b: &Tensor, y: &mut Tensor) -> Result<()> {
    binary("mul", ("mul_f32", "mul_bf16"), a, b, y, |a, b| a * b)
}

/// Backward of [`mul`]: `da = dy * b`, `db = dy * a` (both written).
pub fn mul_backward(a: &Tensor, b: &Tensor, dy: &Tensor, da: &mut Tensor, db: &mut Tensor) -> Result<()> {
    const OP: &str = "mul_backward";
    let device = common_device(OP, &[a, b, dy, da, db])?;
    same_shape(OP, &[a, b, dy, da, db])?;
    let dtype = common_dtype(OP, &device, &[a, b, dy, da, db])?;
    match device {
        Device::Cpu => {
            let (a, b, dy) = (a.f32s()?, b.f32s()?, dy.f32s()?);
            map2(dy, b, da.f32s_mut()?, |g, b| g * b);
            map2(dy, a, db.f32s_mut()?, |g, a| g * a);
            Ok(())
        }
        Device::Cuda(d) => d.launch_elementwise(
            KERNEL_FILE,
            by_dtype(dtype, "mul_backward_f32", "mul_backward_bf16")?,
            &[Ptr(a.cuda_ptr()?), Ptr(b.cuda_ptr()?), Ptr(dy.cuda_ptr()?), Ptr(da.cuda_ptr()?), Ptr(db.cuda_ptr()?)],
            a.numel(),
        ),
    }
}
