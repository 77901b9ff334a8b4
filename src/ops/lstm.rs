//! LSTM with PyTorch's semantics (`nn.LSTM(batch_first=True)`: multi-layer, optionally bidirectional, gate
//! order i, f, g, o, zero initial states), forward and backward through time.
//!
//! Structure, the same on both backends: per layer and direction one GEMM projects the whole input sequence
//! (`x · W_ihᵀ`, via `linear_forward`), then the recurrence runs step by step: a GEMM `h_{t-1} · W_hhᵀ` and a
//! cell step (biases, nonlinearities, state update). Backward mirrors it: per step a cell-backward and a GEMM
//! `dgates_t · W_hh` carrying `dh` to the previous step; `dW_hh`, `dW_ih`, the biases and the input gradient
//! are one GEMM (or reduction) each over all steps. CPU: matrixmultiply and rayon. CUDA: cuBLASLt and the
//! fused cell kernels of `kernels/lstm.cu`.
//!
//! Layouts: inputs and outputs are batch-first `[B, T, features]`; per-step state (cell and hidden states,
//! gate gradients) is kept time-major `[T, B, H]` so that one step is one dense matrix for the GEMMs. The
//! gates stay batch-major `[B, T, 4H]`, the layout of the input projection that produces them. Cell states,
//! gates and the recurrent GEMM's output are f32 on every backend (the cell state is a running sum over up
//! to hundreds of steps); hidden states, outputs and gate gradients use the parameters' storage dtype.
//! The time-major GEMM operands (hidden states, step gate gradients) have `step_rows(B, H, dtype) >= B` rows
//! per step, kept at zero beyond B, so that every step starts on a 256-byte boundary: the per-step GEMMs
//! address steps by offset, and cuBLASLt's fastest kernels need 256-byte aligned operands (runtime::blas
//! tells its heuristic the real alignment, so unaligned steps would be correct, only slower).
//! Parameter gradients accumulate (`+=`) into f32 or the storage dtype; the input gradient is written (`=`).

use std::borrow::{Borrow, BorrowMut};

use anyhow::{bail, ensure, Result};
use cudarc::driver::LaunchConfig;
use rayon::prelude::*;

use super::linear::{cpu_gemm, linear_backward, linear_forward};
use crate::memory::allocator::{Allocator, Standalone};
use crate::runtime::blas::GemmShape;
use crate::runtime::cuda::KernelArg::{Ptr, I32};
use crate::runtime::device::Device;
use crate::tensor::{DType, Tensor};

pub const KERNEL_FILE: &str = "lstm.cu";

/// The hyper-parameters of `nn.LSTM` that shape its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LstmConfig {
    pub input_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub bidirectional: bool,
}

impl LstmConfig {
    pub fn directions(&self) -> usize {
        if self.bidirectional {
            2
        } else {
            1
        }
    }

    /// Features of each time step of the output (and of the input of every layer after the first).
    pub fn output_size(&self) -> usize {
        self.directions() * self.hidden_size
    }

    pub fn layer_input_size(&self, layer: usize) -> usize {
        if layer == 0 {
            self.input_size
        } else {
            self.output_size()
        }
    }

    /// Every parameter's PyTorch name and shape, in `LstmParams::named` order.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let h4 = 4 * self.hidden_size;
        let mut out = Vec::new();
        for layer in 0..self.num_layers {
            for dir in 0..self.directions() {
                let shapes = [vec![h4, self.layer_input_size(layer)], vec![h4, self.hidden_size], vec![h4], vec![h4]];
                for (kind, shape) in PARAM_KINDS.iter().zip(shapes) {
                    out.push((param_name(kind, layer, dir), shape));
                }
            }
        }
        out
    }
}

const PARAM_KINDS: [&str; 4] = ["weight_ih", "weight_hh", "bias_ih", "bias_hh"];

/// PyTorch's state_dict name of one LSTM parameter: `weight_ih_l0`, `bias_hh_l1_reverse`, ...
pub fn param_name(kind: &str, layer: usize, direction: usize) -> String {
    format!("{kind}_l{layer}{}", if direction == 1 { "_reverse" } else { "" })
}

/// The parameters of one layer and direction (or their gradients), as owned tensors (`T = Tensor`) or
/// borrowed ones (`&Tensor`, `&mut Tensor`: views over a model's parameter store and gradients).
pub struct LstmWeights<T = Tensor> {
    /// `[4H, input]`, rows in gate order i, f, g, o.
    pub weight_ih: T,
    /// `[4H, H]`.
    pub weight_hh: T,
    /// `[4H]`.
    pub bias_ih: T,
    /// `[4H]`.
    pub bias_hh: T,
}

/// Every parameter of an LSTM (or its gradients), `layers[layer][direction]` with direction 1 the `_reverse`
/// one.
pub struct LstmParams<T = Tensor> {
    pub config: LstmConfig,
    pub layers: Vec<Vec<LstmWeights<T>>>,
}

impl LstmParams {
    /// Every tensor in `dtype` from `alloc`.
    pub fn new(config: LstmConfig, dtype: DType, alloc: &mut dyn Allocator) -> Result<LstmParams> {
        let tensors = config.parameter_shapes().into_iter().map(|(_, shape)| alloc.alloc(&shape, dtype)).collect::<Result<Vec<_>>>()?;
        LstmParams::from_tensors(config, tensors)
    }

    /// Standalone zero tensors on `device`.
    pub fn zeros(device: &Device, config: LstmConfig, dtype: DType) -> Result<LstmParams> {
        LstmParams::new(config, dtype, &mut Standalone(device.clone()))
    }
}

impl<T> LstmParams<T> {
    /// The parameters from `tensors` in [`LstmConfig::parameter_shapes`] order (per layer and direction:
    /// W_ih, W_hh, b_ih, b_hh); their shapes are checked where they are used.
    pub fn from_tensors(config: LstmConfig, tensors: impl IntoIterator<Item = T>) -> Result<LstmParams<T>> {
        let mut it = tensors.into_iter();
        let count = 4 * config.num_layers * config.directions();
        let mut layers = Vec::with_capacity(config.num_layers);
        for _ in 0..config.num_layers {
            let mut dirs = Vec::with_capacity(config.directions());
            for _ in 0..config.directions() {
                let mut next = || it.next().ok_or_else(|| anyhow::anyhow!("LSTM parameters: fewer than the {count} tensors of {config:?}"));
                dirs.push(LstmWeights { weight_ih: next()?, weight_hh: next()?, bias_ih: next()?, bias_hh: next()? });
            }
            layers.push(dirs);
        }
        ensure!(it.next().is_none(), "LSTM parameters: more than the {count} tensors of {config:?}");
        Ok(LstmParams { config, layers })
    }
}

impl<T: Borrow<Tensor>> LstmParams<T> {
    /// The same tensors, borrowed.
    pub fn view(&self) -> LstmParams<&Tensor> {
        let layers = self
            .layers
            .iter()
            .map(|dirs| {
                dirs.iter()
                    .map(|w| LstmWeights {
                        weight_ih: w.weight_ih.borrow(),
                        weight_hh: w.weight_hh.borrow(),
                        bias_ih: w.bias_ih.borrow(),
                        bias_hh: w.bias_hh.borrow(),
                    })
                    .collect()
            })
            .collect();
        LstmParams { config: self.config, layers }
    }

    /// `(PyTorch name, tensor)` for every parameter.
    pub fn named(&self) -> Vec<(String, &Tensor)> {
        let names = self.config.parameter_shapes().into_iter().map(|(n, _)| n);
        names
            .zip(self.layers.iter().flatten().flat_map(|w| [w.weight_ih.borrow(), w.weight_hh.borrow(), w.bias_ih.borrow(), w.bias_hh.borrow()]))
            .collect()
    }

    /// Checks every tensor against `config` and `device`; returns their common dtype.
    fn check(&self, op: &str, what: &str, config: &LstmConfig, device: &Device) -> Result<DType> {
        ensure!(self.config == *config, "{op}: {what} are for {:?}, expected {config:?}", self.config);
        ensure!(
            self.layers.len() == config.num_layers && self.layers.iter().all(|l| l.len() == config.directions()),
            "{op}: {what} must hold {} layer(s) of {} direction(s)",
            config.num_layers,
            config.directions()
        );
        let named = self.named();
        let dtype = named[0].1.dtype();
        for ((name, t), (_, shape)) in named.iter().zip(config.parameter_shapes()) {
            ensure!(t.shape() == shape, "{op}: {what} {name} must be {shape:?}, got {:?}", t.shape());
            ensure!(t.device().same(device), "{op}: {what} {name} is on {}, the input on {device}", t.device());
            ensure!(t.dtype() == dtype, "{op}: {what} {name} is {}, the others {dtype}", t.dtype());
        }
        Ok(dtype)
    }
}

impl<T: BorrowMut<Tensor>> LstmParams<T> {
    /// The same tensors, borrowed writable.
    pub fn view_mut(&mut self) -> LstmParams<&mut Tensor> {
        let layers = self
            .layers
            .iter_mut()
            .map(|dirs| {
                dirs.iter_mut()
                    .map(|w| LstmWeights {
                        weight_ih: w.weight_ih.borrow_mut(),
                        weight_hh: w.weight_hh.borrow_mut(),
                        bias_ih: w.bias_ih.borrow_mut(),
                        bias_hh: w.bias_hh.borrow_mut(),
                    })
                    .collect()
            })
            .collect();
        LstmParams { config: self.config, layers }
    }

    /// `(PyTorch name, tensor)` for every parameter, writable (for loading weights).
    pub fn named_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let names = self.config.parameter_shapes().into_iter().map(|(n, _)| n);
        names
            .zip(
                self.layers
                    .iter_mut()
                    .flatten()
                    .flat_map(|w| [w.weight_ih.borrow_mut(), w.weight_hh.borrow_mut(), w.bias_ih.borrow_mut(), w.bias_hh.borrow_mut()]),
            )
            .collect()
    }
}

/// Storage dtypes an LSTM runs in on `device`.
fn check_dtype(op: &str, device: &Device, dtype: DType) -> Result<()> {
    match device {
        Device::Cpu => ensure!(dtype == DType::F32, "{op}: the CPU backend computes in f32, got {dtype}"),
        Device::Cuda(_) => ensure!(matches!(dtype, DType::F32 | DType::BF16), "{op}: CUDA stores LSTM tensors in f32 or bf16, got {dtype}"),
    }
    Ok(())
}

/// Rows per step of the time-major GEMM operands: `batch` rounded up so that one step of `hidden` elements
/// per row is a multiple of 256 bytes (see the module docs). No padding when `hidden·size` is a multiple of
/// 256 bytes, as for the EEG encoder's hidden size 256.
pub fn step_rows(batch: usize, hidden: usize, dtype: DType) -> usize {
    let row_bytes = (hidden * dtype.size()).max(1);
    let (mut x, mut y) = (row_bytes, 256);
    while y != 0 {
        (x, y) = (y, x % y);
    }
    let unit = 256 / x;
    batch.div_ceil(unit) * unit
}

/// What one direction of one layer saves for backward.
struct DirectionActivations {
    /// Gates after their nonlinearities (sigmoid i, f, o; tanh g), f32 `[B, T, 4H]`. Forward first writes the
    /// input projection here, then each cell step replaces its pre-activations by the gates.
    gates: Tensor,
    /// Cell states c_t, f32 `[T, B, H]`.
    cell: Tensor,
    /// Hidden states h_t, storage dtype `[T, R, H]` with `R = step_rows(B, H, dtype)` (rows past B are zero;
    /// the same values as in the layer's output).
    hidden: Tensor,
}

/// The activations `lstm_backward` needs, written by `lstm_forward`: every layer's output and, per layer and
/// direction, the gates and the cell and hidden states of every step. Sized for one (batch, length).
pub struct LstmActivations {
    config: LstmConfig,
    batch: usize,
    seq_len: usize,
    dtype: DType,
    /// Per layer, `[B, T, D·H]` in the storage dtype; the last is the LSTM's output.
    outputs: Vec<Tensor>,
    directions: Vec<Vec<DirectionActivations>>,
    /// Scratch for one step's `h_{t-1} · W_hhᵀ`, f32 `[R, 4H]`.
    recurrent: Tensor,
    /// Rows per step of the time-major GEMM operands.
    rows: usize,
}

/// The tensors of a layout, made in order by `alloc` as `next` is called.
struct Allocations<'a> {
    layout: std::vec::IntoIter<(Vec<usize>, DType)>,
    alloc: &'a mut dyn Allocator,
}

impl Allocations<'_> {
    fn next(&mut self) -> Result<Tensor> {
        let (shape, dtype) = self.layout.next().expect("the layout lists every tensor");
        self.alloc.alloc(&shape, dtype)
    }
}

impl LstmActivations {
    /// Every tensor's shape and dtype, in allocation order.
    fn layout(config: &LstmConfig, batch: usize, seq_len: usize, dtype: DType) -> Vec<(Vec<usize>, DType)> {
        let (b, t, h) = (batch, seq_len, config.hidden_size);
        let rows = step_rows(batch, h, dtype);
        let mut out = Vec::new();
        for _ in 0..config.num_layers {
            out.push((vec![b, t, config.output_size()], dtype));
            for _ in 0..config.directions() {
                out.extend([(vec![b, t, 4 * h], DType::F32), (vec![t, b, h], DType::F32), (vec![t, rows, h], dtype)]);
            }
        }
        out.push((vec![rows, 4 * h], DType::F32));
        out
    }

    /// Makes every tensor with `alloc`; `dtype` is the storage dtype of the parameters.
    pub fn new(config: LstmConfig, batch: usize, seq_len: usize, dtype: DType, alloc: &mut dyn Allocator) -> Result<LstmActivations> {
        let mut a = Allocations { layout: LstmActivations::layout(&config, batch, seq_len, dtype).into_iter(), alloc };
        let mut outputs = Vec::new();
        let mut directions = Vec::new();
        for _ in 0..config.num_layers {
            outputs.push(a.next()?);
            let mut dirs = Vec::new();
            for _ in 0..config.directions() {
                let (gates, cell, hidden) = (a.next()?, a.next()?, a.next()?);
                dirs.push(DirectionActivations { gates, cell, hidden });
            }
            directions.push(dirs);
        }
        let recurrent = a.next()?;
        let rows = step_rows(batch, config.hidden_size, dtype);
        Ok(LstmActivations { config, batch, seq_len, dtype, outputs, directions, recurrent, rows })
    }

    /// Standalone zero tensors on `device`.
    pub fn zeros(device: &Device, config: LstmConfig, batch: usize, seq_len: usize, dtype: DType) -> Result<LstmActivations> {
        LstmActivations::new(config, batch, seq_len, dtype, &mut Standalone(device.clone()))
    }

    /// The LSTM's output `[B, T, D·H]`: per step, the forward direction's h then the reverse one's.
    pub fn output(&self) -> &Tensor {
        self.outputs.last().expect("at least one layer")
    }

    fn check(&self, op: &str, config: &LstmConfig, device: &Device, dtype: DType) -> Result<()> {
        ensure!(self.config == *config, "{op}: activations are for {:?}, the parameters for {config:?}", self.config);
        ensure!(self.dtype == dtype, "{op}: activations are {}, the parameters {dtype}", self.dtype);
        ensure!(self.recurrent.device().same(device), "{op}: activations are on {}, the input on {device}", self.recurrent.device());
        Ok(())
    }
}

/// Scratch for `lstm_backward`, sized for one (batch, length).
pub struct LstmBackwardScratch {
    config: LstmConfig,
    batch: usize,
    seq_len: usize,
    dtype: DType,
    /// Pre-activation gate gradients of one direction, storage dtype, batch-major `[B, T, 4H]` (paired with
    /// the layer input for `dW_ih` and the input gradient) ...
    dgates: Tensor,
    /// ... and the same values time-major `[T, R, 4H]` (one step is one matrix for `dh_{t-1}` and `dW_hh`;
    /// rows past B are zero).
    dgates_by_step: Tensor,
    /// `dgates_{t+1} · W_hh`: the hidden-state gradient the next step sends back, f32 `[R, H]`.
    dh: Tensor,
    /// The cell-state gradient the next step sends back, f32 `[B, H]`, updated in place step by step.
    dc: Tensor,
    /// Gradients of the outputs of the layers below the top, storage dtype `[B, T, D·H]`; two at most
    /// (layer k reads one and writes the other).
    dlayers: Vec<Tensor>,
}

impl LstmBackwardScratch {
    /// Every tensor's shape and dtype, in allocation order.
    fn layout(config: &LstmConfig, batch: usize, seq_len: usize, dtype: DType) -> Vec<(Vec<usize>, DType)> {
        let (b, t, h) = (batch, seq_len, config.hidden_size);
        let rows = step_rows(batch, h, dtype);
        let mut out = vec![(vec![b, t, 4 * h], dtype), (vec![t, rows, 4 * h], dtype), (vec![rows, h], DType::F32), (vec![b, h], DType::F32)];
        for _ in 0..Self::dlayer_count(config) {
            out.push((vec![b, t, config.output_size()], dtype));
        }
        out
    }

    fn dlayer_count(config: &LstmConfig) -> usize {
        config.num_layers.saturating_sub(1).min(2)
    }

    /// Makes every tensor with `alloc` (see `LstmActivations::new`).
    pub fn new(config: LstmConfig, batch: usize, seq_len: usize, dtype: DType, alloc: &mut dyn Allocator) -> Result<LstmBackwardScratch> {
        let mut a = Allocations { layout: LstmBackwardScratch::layout(&config, batch, seq_len, dtype).into_iter(), alloc };
        let (dgates, dgates_by_step, dh, dc) = (a.next()?, a.next()?, a.next()?, a.next()?);
        let dlayers = (0..Self::dlayer_count(&config)).map(|_| a.next()).collect::<Result<Vec<_>>>()?;
        Ok(LstmBackwardScratch { config, batch, seq_len, dtype, dgates, dgates_by_step, dh, dc, dlayers })
    }

    pub fn zeros(device: &Device, config: LstmConfig, batch: usize, seq_len: usize, dtype: DType) -> Result<LstmBackwardScratch> {
        LstmBackwardScratch::new(config, batch, seq_len, dtype, &mut Standalone(device.clone()))
    }
}

/// Time steps in the order a direction processes them: forward 0..T, reverse T-1..0.
fn steps(seq_len: usize, direction: usize) -> Box<dyn DoubleEndedIterator<Item = usize>> {
    if direction == 0 {
        Box::new(0..seq_len)
    } else {
        Box::new((0..seq_len).rev())
    }
}

/// The step a direction processed just before `t` (whose states `t` starts from), if any.
fn previous_step(seq_len: usize, direction: usize, t: usize) -> Option<usize> {
    if direction == 0 {
        t.checked_sub(1)
    } else {
        (t + 1 < seq_len).then_some(t + 1)
    }
}

/// One cell step's place: which step, the one before it, and where its h goes in the layer output.
#[derive(Clone, Copy)]
struct Step {
    batch: usize,
    /// Rows per step of the time-major GEMM operands (>= batch).
    rows: usize,
    seq_len: usize,
    hidden: usize,
    t: usize,
    prev: Option<usize>,
    /// Columns of the layer output and this direction's first column.
    y_cols: usize,
    y_offset: usize,
}

/// One GEMM whose matrices start `offset` elements into their tensors: `c = op(a)·op(b) + beta·c`. The
/// per-step slices of the time-major buffers need it (`matmul` takes whole tensors only).
fn gemm_at(op: &str, s: GemmShape, (a, ao): (&Tensor, usize), (b, bo): (&Tensor, usize), (c, co): (&mut Tensor, usize), beta: f32) -> Result<()> {
    ensure!(
        ao + s.m * s.k <= a.numel() && bo + s.k * s.n <= b.numel() && co + s.m * s.n <= c.numel(),
        "{op}: GEMM {s:?} reaches past its operands {:?}, {:?}, {:?}",
        a.shape(),
        b.shape(),
        c.shape()
    );
    ensure!(
        a.dtype() == b.dtype() && (c.dtype() == a.dtype() || c.dtype() == DType::F32),
        "{op}: GEMM of {} and {} into {}",
        a.dtype(),
        b.dtype(),
        c.dtype()
    );
    if s.m == 0 || s.n == 0 {
        return Ok(());
    }
    match c.device() {
        Device::Cpu => {
            let (a, b) = (&a.f32s()?[ao..], &b.f32s()?[bo..]);
            cpu_gemm(s, a, b, &mut c.f32s_mut()?[co..], 1.0, beta);
            Ok(())
        }
        Device::Cuda(d) => {
            let at = |t: &Tensor, off: usize| Ok::<u64, anyhow::Error>(t.cuda_ptr()? + (off * t.dtype().size()) as u64);
            let ptrs = (at(a, ao)?, at(b, bo)?, at(c, co)?);
            d.blas()?.gemm(d.stream(), s, a.dtype(), c.dtype(), ptrs, None, 1.0, beta)
        }
    }
}

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

/// The slices of steps `t` (writable) and `prev` (read) of a time-major buffer of `len`-element steps.
fn step_and_prev(buf: &mut [f32], len: usize, t: usize, prev: Option<usize>) -> (&mut [f32], Option<&[f32]>) {
    match prev {
        None => (&mut buf[t * len..(t + 1) * len], None),
        Some(p) if p < t => {
            let (lo, hi) = buf.split_at_mut(t * len);
            (&mut hi[..len], Some(&lo[p * len..(p + 1) * len]))
        }
        Some(p) => {
            let (lo, hi) = buf.split_at_mut(p * len);
            (&mut lo[t * len..(t + 1) * len], Some(&hi[..len]))
        }
    }
}

fn cuda_config(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (n.div_ceil(256).max(1) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

fn kernel_name(dtype: DType, f32_name: &'static str, bf16_name: &'static str) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok(f32_name),
        DType::BF16 => Ok(bf16_name),
        DType::F16 => bail!("lstm: no f16 kernels"),
    }
}

fn step_args(s: &Step) -> [crate::runtime::cuda::KernelArg; 8] {
    [
        I32(s.t as i32),
        I32(s.prev.map_or(-1, |p| p as i32)),
        I32(s.batch as i32),
        I32(s.rows as i32),
        I32(s.seq_len as i32),
        I32(s.hidden as i32),
        I32(s.y_cols as i32),
        I32(s.y_offset as i32),
    ]
}

/// Batch rows per rayon task in a CPU cell step: a step is only B·H elements, so small batches run on one
/// thread rather than pay a fork-join per step.
fn cell_rows_per_task(hidden: usize) -> usize {
    (16_384 / hidden.max(1)).max(1)
}

/// Cell step forward: gates (pre-activations, then activated) of step `t`, its c and h, and h into the output.
fn cell_forward(s: &Step, w: &LstmWeights<&Tensor>, acts: &mut DirectionActivations, recurrent: &Tensor, y: &mut Tensor) -> Result<()> {
    match y.device() {
        Device::Cpu => {
            let (h, g4) = (s.hidden, 4 * s.hidden);
            let (b_ih, b_hh, rec) = (w.bias_ih.f32s()?, w.bias_hh.f32s()?, recurrent.f32s()?);
            let (c_cur, c_prev) = step_and_prev(acts.cell.f32s_mut()?, s.batch * h, s.t, s.prev);
            let h_step = &mut acts.hidden.f32s_mut()?[s.t * s.rows * h..][..s.rows * h];
            let (h_cur, h_pad) = h_step.split_at_mut(s.batch * h);
            h_pad.fill(0.0);
            let gates = acts.gates.f32s_mut()?;
            gates
                .par_chunks_mut(s.seq_len * g4)
                .zip(y.f32s_mut()?.par_chunks_mut(s.seq_len * s.y_cols))
                .zip(c_cur.par_chunks_mut(h))
                .zip(h_cur.par_chunks_mut(h))
                .enumerate()
                .with_min_len(cell_rows_per_task(h))
                .for_each(|(b, (((gates, y), c), hid))| {
                    let pre = &mut gates[s.t * g4..][..g4];
                    let y = &mut y[s.t * s.y_cols + s.y_offset..][..h];
                    for j in 0..h {
                        let mut v = [0f32; 4];
                        for (k, v) in v.iter_mut().enumerate() {
                            let i = k * h + j;
                            *v = pre[i] + b_ih[i] + b_hh[i];
                            if s.prev.is_some() {
                                *v += rec[b * g4 + i];
                            }
                        }
                        let (ig, fg, gg, og) = (sigmoid(v[0]), sigmoid(v[1]), v[2].tanh(), sigmoid(v[3]));
                        let cp = c_prev.map_or(0.0, |p| p[b * h + j]);
                        let cv = fg * cp + ig * gg;
                        let hv = og * cv.tanh();
                        pre[j] = ig;
                        pre[h + j] = fg;
                        pre[2 * h + j] = gg;
                        pre[3 * h + j] = og;
                        c[j] = cv;
                        hid[j] = hv;
                        y[j] = hv;
                    }
                });
            Ok(())
        }
        Device::Cuda(d) => {
            let name = kernel_name(y.dtype(), "lstm_cell_forward_f32", "lstm_cell_forward_bf16")?;
            let mut args = vec![
                Ptr(acts.gates.cuda_ptr()?),
                Ptr(recurrent.cuda_ptr()?),
                Ptr(w.bias_ih.cuda_ptr()?),
                Ptr(w.bias_hh.cuda_ptr()?),
                Ptr(acts.cell.cuda_ptr()?),
                Ptr(acts.hidden.cuda_ptr()?),
                Ptr(y.cuda_ptr()?),
            ];
            args.extend(step_args(s));
            d.launch(KERNEL_FILE, name, cuda_config(s.rows * s.hidden), &args, None)
        }
    }
}

/// Cell step backward: from dh (output gradient of step `t` plus, unless `t` is the direction's last step,
/// `scratch.dh`) and the carried dc, the pre-activation gate gradients of step `t` (both layouts) and the dc
/// carried to the previous step.
fn cell_backward(s: &Step, has_next: bool, acts: &DirectionActivations, dy: &Tensor, scratch: &mut LstmBackwardScratch) -> Result<()> {
    match dy.device() {
        Device::Cpu => {
            let (h, g4, bh) = (s.hidden, 4 * s.hidden, s.batch * s.hidden);
            let (gates, cell, dy, dh_next) = (acts.gates.f32s()?, acts.cell.f32s()?, dy.f32s()?, scratch.dh.f32s()?);
            let c_cur = &cell[s.t * bh..][..bh];
            let c_prev = s.prev.map(|p| &cell[p * bh..][..bh]);
            let dg_step = &mut scratch.dgates_by_step.f32s_mut()?[s.t * s.rows * g4..][..s.rows * g4];
            let (dg_step, dg_pad) = dg_step.split_at_mut(s.batch * g4);
            dg_pad.fill(0.0);
            scratch
                .dgates
                .f32s_mut()?
                .par_chunks_mut(s.seq_len * g4)
                .zip(dg_step.par_chunks_mut(g4))
                .zip(scratch.dc.f32s_mut()?.par_chunks_mut(h))
                .enumerate()
                .with_min_len(cell_rows_per_task(h))
                .for_each(|(b, ((dgb, dgs), dc))| {
                    let row = b * s.seq_len + s.t;
                    let act = &gates[row * g4..][..g4];
                    let dyrow = &dy[row * s.y_cols + s.y_offset..][..h];
                    let dgb = &mut dgb[s.t * g4..][..g4];
                    for j in 0..h {
                        let (ig, fg, gg, og) = (act[j], act[h + j], act[2 * h + j], act[3 * h + j]);
                        let tc = c_cur[b * h + j].tanh();
                        let cp = c_prev.map_or(0.0, |p| p[b * h + j]);
                        let (mut dh, mut dct) = (dyrow[j], 0.0);
                        if has_next {
                            dh += dh_next[b * h + j];
                            dct = dc[j];
                        }
                        dct += dh * og * (1.0 - tc * tc);
                        let d = [dct * gg * ig * (1.0 - ig), dct * cp * fg * (1.0 - fg), dct * ig * (1.0 - gg * gg), dh * tc * og * (1.0 - og)];
                        dc[j] = dct * fg;
                        for (k, d) in d.into_iter().enumerate() {
                            dgb[k * h + j] = d;
                            dgs[k * h + j] = d;
                        }
                    }
                });
            Ok(())
        }
        Device::Cuda(d) => {
            let name = kernel_name(dy.dtype(), "lstm_cell_backward_f32", "lstm_cell_backward_bf16")?;
            let mut args = vec![
                Ptr(acts.gates.cuda_ptr()?),
                Ptr(acts.cell.cuda_ptr()?),
                Ptr(dy.cuda_ptr()?),
                Ptr(scratch.dh.cuda_ptr()?),
                Ptr(scratch.dc.cuda_ptr()?),
                Ptr(scratch.dgates.cuda_ptr()?),
                Ptr(scratch.dgates_by_step.cuda_ptr()?),
                I32(has_next as i32),
            ];
            args.extend(step_args(s));
            d.launch(KERNEL_FILE, name, cuda_config(s.rows * s.hidden), &args, None)
        }
    }
}

/// The dims the kernels index with 32-bit ints must fit them.
fn check_sizes(op: &str, config: &LstmConfig, batch: usize, seq_len: usize) -> Result<()> {
    let biggest = batch * seq_len * 4 * config.hidden_size.max(config.input_size);
    ensure!(batch > 0 && seq_len > 0, "{op}: empty batch ({batch}) or sequence ({seq_len})");
    ensure!(biggest < i32::MAX as usize, "{op}: batch {batch} x length {seq_len} is too large");
    Ok(())
}

/// Forward: writes every layer's output (the last is `acts.output()`, `[B, T, D·H]`) and what backward needs.
/// `x` is `[B, T, input_size]` with (B, T) those `acts` was made for.
pub fn lstm_forward(params: &LstmParams<impl Borrow<Tensor>>, x: &Tensor, acts: &mut LstmActivations) -> Result<()> {
    const OP: &str = "lstm_forward";
    let params = &params.view();
    let config = params.config;
    let device = x.device();
    let dtype = params.check(OP, "parameters", &config, &device)?;
    check_dtype(OP, &device, dtype)?;
    acts.check(OP, &config, &device, dtype)?;
    let (batch, seq_len, hidden, rows) = (acts.batch, acts.seq_len, config.hidden_size, acts.rows);
    check_sizes(OP, &config, rows, seq_len)?;
    ensure!(
        x.shape() == [batch, seq_len, config.input_size],
        "{OP}: input x must be [batch {batch}, time {seq_len}, features {}], got {:?}",
        config.input_size,
        x.shape()
    );
    ensure!(x.dtype() == dtype, "{OP}: input x is {}, the parameters {dtype}", x.dtype());
    let LstmActivations { outputs, directions, recurrent, .. } = acts;
    for layer in 0..config.num_layers {
        let (below, rest) = outputs.split_at_mut(layer);
        let input = if layer == 0 { x } else { &below[layer - 1] };
        let y = &mut rest[0];
        for (dir, a) in directions[layer].iter_mut().enumerate() {
            let w = &params.layers[layer][dir];
            linear_forward(input, w.weight_ih, None, &mut a.gates)?;
            for t in steps(seq_len, dir) {
                let prev = previous_step(seq_len, dir, t);
                if let Some(p) = prev {
                    let s = GemmShape { m: rows, n: 4 * hidden, k: hidden, trans_a: false, trans_b: true, batch: 1 };
                    gemm_at(OP, s, (&a.hidden, p * rows * hidden), (w.weight_hh, 0), (recurrent, 0), 0.0)?;
                }
                let step = Step { batch, rows, seq_len, hidden, t, prev, y_cols: config.output_size(), y_offset: dir * hidden };
                cell_forward(&step, w, a, recurrent, y)?;
            }
        }
    }
    Ok(())
}

/// Backward through time from `dy` (the gradient of `acts.output()`, `[B, T, D·H]`): writes `dx` (`=`, same
/// shape as `x`; pass `None` when the input needs no gradient) and accumulates every parameter gradient into
/// `grads` (`+=`, f32 or the parameters' dtype). `acts` must hold the forward of `params` on `x`.
pub fn lstm_backward(
    params: &LstmParams<impl Borrow<Tensor>>,
    x: &Tensor,
    acts: &LstmActivations,
    dy: &Tensor,
    mut dx: Option<&mut Tensor>,
    grads: &mut LstmParams<impl BorrowMut<Tensor>>,
    scratch: &mut LstmBackwardScratch,
) -> Result<()> {
    const OP: &str = "lstm_backward";
    let params = &params.view();
    let grads = &mut grads.view_mut();
    let config = params.config;
    let device = x.device();
    let dtype = params.check(OP, "parameters", &config, &device)?;
    check_dtype(OP, &device, dtype)?;
    let grad_dtype = grads.check(OP, "gradients", &config, &device)?;
    ensure!(grad_dtype == dtype || grad_dtype == DType::F32, "{OP}: gradients must be f32 or the parameters' {dtype}, got {grad_dtype}");
    acts.check(OP, &config, &device, dtype)?;
    let (batch, seq_len, hidden, rows) = (acts.batch, acts.seq_len, config.hidden_size, acts.rows);
    ensure!(
        (scratch.config, scratch.batch, scratch.seq_len, scratch.dtype) == (config, batch, seq_len, dtype),
        "{OP}: scratch is for {:?} batch {} length {} {}, the activations for {config:?} batch {batch} length {seq_len} {dtype}",
        scratch.config,
        scratch.batch,
        scratch.seq_len,
        scratch.dtype
    );
    ensure!(scratch.dh.device().same(&device), "{OP}: scratch is on {}, the input on {device}", scratch.dh.device());
    ensure!(
        x.shape() == [batch, seq_len, config.input_size] && x.dtype() == dtype,
        "{OP}: input x must be {dtype} [{batch}, {seq_len}, {}], got {} {:?}",
        config.input_size,
        x.dtype(),
        x.shape()
    );
    ensure!(
        dy.shape() == acts.output().shape() && dy.dtype() == dtype && dy.device().same(&device),
        "{OP}: dy must be {dtype} {:?} on {device}, got {} {:?} on {}",
        acts.output().shape(),
        dy.dtype(),
        dy.shape(),
        dy.device()
    );
    if let Some(dx) = dx.as_deref() {
        ensure!(
            dx.shape() == x.shape() && dx.dtype() == dtype && dx.device().same(&device),
            "{OP}: dx must be {dtype} {:?} on {device} like x, got {} {:?} on {}",
            x.shape(),
            dx.dtype(),
            dx.shape(),
            dx.device()
        );
    }
    let top = config.num_layers - 1;
    let mut dlayers = std::mem::take(&mut scratch.dlayers);
    let result = (|| {
        for layer in (0..config.num_layers).rev() {
            let input = if layer == 0 { x } else { &acts.outputs[layer - 1] };
            // The gradient of this layer's output is `dy` or a scratch written by the layer above; the
            // gradient of its input goes to `dx` or to the other scratch.
            let (dout, dinput): (&Tensor, Option<&mut Tensor>) = match (layer == top, layer == 0) {
                (true, true) => (dy, dx.as_deref_mut()),
                (true, false) => (dy, Some(&mut dlayers[(layer - 1) % 2])),
                (false, true) => (&dlayers[0], dx.as_deref_mut()),
                (false, false) => {
                    let (lo, hi) = dlayers.split_at_mut(1);
                    if layer % 2 == 0 {
                        (&lo[0], Some(&mut hi[0]))
                    } else {
                        (&hi[0], Some(&mut lo[0]))
                    }
                }
            };
            let mut dinput = dinput;
            for dir in 0..config.directions() {
                let (w, a) = (&params.layers[layer][dir], &acts.directions[layer][dir]);
                let g = &mut grads.layers[layer][dir];
                let mut next = None;
                for t in steps(seq_len, dir).rev() {
                    if let Some(n) = next {
                        let s = GemmShape { m: rows, n: hidden, k: 4 * hidden, trans_a: false, trans_b: false, batch: 1 };
                        gemm_at(OP, s, (&scratch.dgates_by_step, n * rows * 4 * hidden), (w.weight_hh, 0), (&mut scratch.dh, 0), 0.0)?;
                    }
                    let prev = previous_step(seq_len, dir, t);
                    let step = Step { batch, rows, seq_len, hidden, t, prev, y_cols: config.output_size(), y_offset: dir * hidden };
                    cell_backward(&step, next.is_some(), a, dout, scratch)?;
                    next = Some(t);
                }
                // dW_hh += Σ_t dgates_tᵀ · h_prev(t): the steps with a predecessor, paired with it, are two
                // contiguous ranges of the time-major buffers, shifted by one step (padding rows are zero in
                // both).
                if seq_len > 1 {
                    let (dg_off, h_off) = if dir == 0 { (rows * 4 * hidden, 0) } else { (0, rows * hidden) };
                    let s = GemmShape { m: 4 * hidden, n: hidden, k: (seq_len - 1) * rows, trans_a: true, trans_b: false, batch: 1 };
                    gemm_at(OP, s, (&scratch.dgates_by_step, dg_off), (&a.hidden, h_off), (&mut g.weight_hh, 0), 1.0)?;
                }
                linear_backward(input, w.weight_ih, &scratch.dgates, None, Some(&mut g.weight_ih), Some(&mut g.bias_ih))?;
                linear_backward(input, w.weight_ih, &scratch.dgates, None, None, Some(&mut g.bias_hh))?;
                if let Some(di) = dinput.as_deref_mut() {
                    let k_in = config.layer_input_size(layer);
                    let s = GemmShape { m: batch * seq_len, n: k_in, k: 4 * hidden, trans_a: false, trans_b: false, batch: 1 };
                    let beta = if dir == 0 { 0.0 } else { 1.0 };
                    gemm_at(OP, s, (&scratch.dgates, 0), (w.weight_ih, 0), (di, 0), beta)?;
                }
            }
        }
        Ok(())
    })();
    scratch.dlayers = dlayers;
    result
}
