//! GEMM-shaped ops: batched matmul with transposes, and torch's `Linear` (y = x·Wᵀ + b) forward and
//! backward. CPU: `matrixmultiply::sgemm` (threaded). CUDA: cuBLASLt with f32 compute, bias fused in the
//! epilogue; the bias gradient is a column-sum kernel in `kernels/linear.cu`.

use anyhow::{bail, ensure, Result};
use cudarc::driver::LaunchConfig;

use super::common_device;
use crate::runtime::blas::GemmShape;
use crate::runtime::cuda::KernelArg::{Ptr, I64};
use crate::runtime::device::Device;
use crate::tensor::{DType, Tensor};

pub const KERNEL_FILE: &str = "linear.cu";

/// Options of [`matmul`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MatmulSpec {
    /// A is stored `[.., k, m]` and used transposed.
    pub trans_a: bool,
    /// B is stored `[.., n, k]` and used transposed.
    pub trans_b: bool,
    pub alpha: f32,
    /// `c += ...` instead of `c = ...`.
    pub accumulate: bool,
}

impl Default for MatmulSpec {
    fn default() -> MatmulSpec {
        MatmulSpec { trans_a: false, trans_b: false, alpha: 1.0, accumulate: false }
    }
}

/// Storage dtypes a GEMM accepts: A and B alike (f32 or bf16), C alike or f32 (f32 gradients of bf16
/// activations).
fn gemm_dtypes(op: &str, device: &Device, ab: &[&Tensor], c: DType) -> Result<DType> {
    let dtype = ab[0].dtype();
    for t in ab {
        ensure!(t.dtype() == dtype, "{op}: mixed input dtypes {dtype} and {}", t.dtype());
    }
    match device {
        Device::Cpu => ensure!(dtype == DType::F32 && c == DType::F32, "{op}: the CPU backend computes in f32"),
        Device::Cuda(_) => ensure!(
            matches!(dtype, DType::F32 | DType::BF16) && (c == dtype || c == DType::F32),
            "{op}: CUDA GEMMs take f32 or bf16 inputs and an output of the same dtype or f32, got {dtype} -> {c}"
        ),
    }
    Ok(dtype)
}

/// Row-major sgemm on slices, the CPU GEMM of every op family: `c = alpha * op(a) · op(b) + beta * c` for
/// `s.batch` matrices packed one after another in each slice (slices may be longer).
pub(crate) fn cpu_gemm(s: GemmShape, a: &[f32], b: &[f32], c: &mut [f32], alpha: f32, beta: f32) {
    let (rsa, csa) = if s.trans_a { (1, s.m as isize) } else { (s.k as isize, 1) };
    let (rsb, csb) = if s.trans_b { (1, s.k as isize) } else { (s.n as isize, 1) };
    let (sa, sb, sc) = (s.m * s.k, s.k * s.n, s.m * s.n);
    assert!(
        a.len() >= s.batch * sa && b.len() >= s.batch * sb && c.len() >= s.batch * sc,
        "cpu_gemm: {s:?} does not fit slices of {}, {} and {} elements",
        a.len(),
        b.len(),
        c.len()
    );
    for i in 0..s.batch {
        // SAFETY: each matrix lies inside its slice (asserted above), the strides address exactly one matrix,
        // and `c` does not alias `a` or `b` (it is borrowed mutably).
        unsafe {
            matrixmultiply::sgemm(
                s.m,
                s.k,
                s.n,
                alpha,
                a[i * sa..].as_ptr(),
                rsa,
                csa,
                b[i * sb..].as_ptr(),
                rsb,
                csb,
                beta,
                c[i * sc..].as_mut_ptr(),
                s.n as isize,
                1,
            );
        }
    }
}

fn run_gemm(device: &Device, s: GemmShape, a: &Tensor, b: &Tensor, c: &mut Tensor, bias: Option<&Tensor>, alpha: f32, beta: f32) -> Result<()> {
    match device {
        Device::Cpu => {
            cpu_gemm(s, a.f32s()?, b.f32s()?, c.f32s_mut()?, alpha, beta);
            if let Some(bias) = bias {
                let bias = bias.f32s()?;
                for row in c.f32s_mut()?.chunks_exact_mut(s.n) {
                    for (y, b) in row.iter_mut().zip(bias) {
                        *y += b;
                    }
                }
            }
            Ok(())
        }
        Device::Cuda(d) => d.blas()?.gemm(
            d.stream(),
            s,
            a.dtype(),
            c.dtype(),
            (a.cuda_ptr()?, b.cuda_ptr()?, c.cuda_ptr()?),
            bias.map(|b| b.cuda_ptr()).transpose()?,
            alpha,
            beta,
        ),
    }
}

/// Splits a shape into (batch, rows, cols) of its last two dimensions.
fn matrix_dims(op: &str, name: &str, t: &Tensor) -> Result<(usize, usize, usize)> {
    let s = t.shape();
    ensure!(s.len() >= 2, "{op}: {name} must have at least 2 dimensions, got {s:?}");
    let (r, c) = (s[s.len() - 2], s[s.len() - 1]);
    Ok((s[..s.len() - 2].iter().product(), r, c))
}

/// `c[.., m, n] (=|+=) alpha * op(a)[.., m, k] · op(b)[.., k, n]`, batched over equal leading dimensions.
pub fn matmul(a: &Tensor, b: &Tensor, c: &mut Tensor, spec: MatmulSpec) -> Result<()> {
    let device = common_device("matmul", &[a, b, c])?;
    gemm_dtypes("matmul", &device, &[a, b], c.dtype())?;
    let (ba, ar, ac) = matrix_dims("matmul", "a", a)?;
    let (bb, br, bc) = matrix_dims("matmul", "b", b)?;
    let (bc_, cr, cc) = matrix_dims("matmul", "c", c)?;
    let (m, k) = if spec.trans_a { (ac, ar) } else { (ar, ac) };
    let (k2, n) = if spec.trans_b { (bc, br) } else { (br, bc) };
    ensure!(
        k == k2 && ba == bb && ba == bc_ && (cr, cc) == (m, n),
        "matmul: shapes a {:?}{} · b {:?}{} -> c {:?} do not agree",
        a.shape(),
        if spec.trans_a { "ᵀ" } else { "" },
        b.shape(),
        if spec.trans_b { "ᵀ" } else { "" },
        c.shape()
    );
    let shape = GemmShape { m, n, k, trans_a: spec.trans_a, trans_b: spec.trans_b, batch: ba };
    let _profile = crate::profile::scope(crate::profile::Family::Gemm, || {
        (device.clone(), 2.0 * (ba * m * n * k) as f64, crate::profile::bytes_of(&[a.numel(), b.numel(), c.numel()], a.dtype().size()))
    });
    run_gemm(&device, shape, a, b, c, None, spec.alpha, if spec.accumulate { 1.0 } else { 0.0 })
}

/// Rows and features of a `[.., features]` tensor.
fn rows(op: &str, t: &Tensor, features: usize) -> Result<usize> {
    let s = t.shape();
    ensure!(s.last() == Some(&features), "{op}: expected a last dimension of {features}, got shape {s:?}");
    Ok(t.numel() / features.max(1))
}

fn linear_shapes(op: &str, x: &Tensor, w: &Tensor) -> Result<(usize, usize, usize)> {
    ensure!(w.shape().len() == 2, "{op}: weight must be [out, in], got {:?}", w.shape());
    let (n, k) = (w.shape()[0], w.shape()[1]);
    Ok((rows(op, x, k)?, n, k))
}

/// `y[.., n] = x[.., k] · w[n, k]ᵀ + b[n]` (torch's `nn.Linear`).
pub fn linear_forward(x: &Tensor, w: &Tensor, b: Option<&Tensor>, y: &mut Tensor) -> Result<()> {
    let mut all = vec![x, w, &*y];
    all.extend(b);
    let device = common_device("linear_forward", &all)?;
    gemm_dtypes("linear_forward", &device, &[x, w], y.dtype())?;
    let (m, n, k) = linear_shapes("linear_forward", x, w)?;
    ensure!(rows("linear_forward", y, n)? == m, "linear_forward: output {:?} does not match input {:?}", y.shape(), x.shape());
    if let Some(b) = b {
        ensure!(b.shape() == [n], "linear_forward: bias must be [{n}], got {:?}", b.shape());
        ensure!(b.dtype() == y.dtype(), "linear_forward: bias dtype {} differs from the output's {}", b.dtype(), y.dtype());
    }
    let shape = GemmShape { m, n, k, trans_a: false, trans_b: true, batch: 1 };
    let _profile = crate::profile::scope(crate::profile::Family::Gemm, || {
        (device.clone(), 2.0 * (m * n * k) as f64, crate::profile::bytes_of(&[x.numel(), w.numel(), y.numel()], x.dtype().size()))
    });
    run_gemm(&device, shape, x, w, y, b, 1.0, 0.0)
}

/// Backward of [`linear_forward`]: `dx = dy · w` (=), `dw += dyᵀ · x`, `db += Σ_rows dy`. Pass `None` for
/// gradients that are not needed.
pub fn linear_backward(x: &Tensor, w: &Tensor, dy: &Tensor, dx: Option<&mut Tensor>, dw: Option<&mut Tensor>, db: Option<&mut Tensor>) -> Result<()> {
    let device = common_device("linear_backward", &[x, w, dy])?;
    let (m, n, k) = linear_shapes("linear_backward", x, w)?;
    ensure!(rows("linear_backward", dy, n)? == m, "linear_backward: dy {:?} does not match x {:?}", dy.shape(), x.shape());
    if let Some(dx) = dx {
        common_device("linear_backward", &[x, dx])?;
        gemm_dtypes("linear_backward", &device, &[dy, w], dx.dtype())?;
        ensure!(dx.shape() == x.shape(), "linear_backward: dx {:?} must match x {:?}", dx.shape(), x.shape());
        let shape = GemmShape { m, n: k, k: n, trans_a: false, trans_b: false, batch: 1 };
        run_gemm(&device, shape, dy, w, dx, None, 1.0, 0.0)?;
    }
    if let Some(dw) = dw {
        common_device("linear_backward", &[x, dw])?;
        gemm_dtypes("linear_backward", &device, &[dy, x], dw.dtype())?;
        ensure!(dw.shape() == w.shape(), "linear_backward: dw {:?} must match w {:?}", dw.shape(), w.shape());
        let shape = GemmShape { m: n, n: k, k: m, trans_a: true, trans_b: false, batch: 1 };
        run_gemm(&device, shape, dy, x, dw, None, 1.0, 1.0)?;
    }
    if let Some(db) = db {
        common_device("linear_backward", &[x, db])?;
        ensure!(db.shape() == [n], "linear_backward: db must be [{n}], got {:?}", db.shape());
        bias_grad(&device, dy, db, m, n)?;
    }
    Ok(())
}

fn bias_grad(device: &Device, dy: &Tensor, db: &mut Tensor, rows: usize, cols: usize) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Ok(()); // nothing to add (and an empty grid is an invalid CUDA launch)
    }
    match device {
        Device::Cpu => {
            ensure!(dy.dtype() == DType::F32 && db.dtype() == DType::F32, "linear_backward: the CPU backend computes in f32");
            let db = db.f32s_mut()?;
            for row in dy.f32s()?.chunks_exact(cols) {
                for (g, d) in db.iter_mut().zip(row) {
                    *g += d;
                }
            }
            Ok(())
        }
        Device::Cuda(d) => {
            let name = match (dy.dtype(), db.dtype()) {
                (DType::F32, DType::F32) => "bias_grad_f32_f32",
                (DType::BF16, DType::BF16) => "bias_grad_bf16_bf16",
                (DType::BF16, DType::F32) => "bias_grad_bf16_f32",
                (a, b) => bail!("linear_backward: no bias gradient from {a} dy into {b} db"),
            };
            let cfg = LaunchConfig { grid_dim: (cols.div_ceil(256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            d.launch(KERNEL_FILE, name, cfg, &[Ptr(dy.cuda_ptr()?), Ptr(db.cuda_ptr()?), I64(rows as i64), I64(cols as i64)], None)
        }
    }
}
