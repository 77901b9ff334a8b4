//! The parameterised layers of [`crate::nn`] run on a [`ParamStore`]: forward from the parameters, backward
//! adding into [`Grads`] (`layer_back`), every new tensor taken from an [`Allocator`]. Every model runs its
//! layers through these.

use anyhow::{ensure, Result};

use crate::nn::{Allocator, Conv1d, Conv2d, ConvTranspose2d, Grads, Linear, Norm, ParamStore};
use crate::ops::conv::{
    conv1d_backward_input, conv1d_backward_weight, conv1d_forward, conv2d_backward_input, conv2d_backward_weight, conv2d_forward, conv_backward_bias,
    conv_transpose2d_backward_input, conv_transpose2d_backward_weight, conv_transpose2d_forward, Conv2dSpec,
};
use crate::ops::elementwise::add;
use crate::ops::linear::{linear_backward, linear_forward};
use crate::ops::norm::{
    group_norm_backward, group_norm_forward, group_norm_scratch_shape, layer_norm_backward, layer_norm_forward, layer_norm_scratch_shape, Affine,
    GroupNorm, NormGrads, Stats, StatsMut,
};
use crate::tensor::{DType, Tensor};

/// A GroupNorm's output and the statistics its backward reads.
pub struct GroupNormActivations {
    pub y: Tensor,
    pub mean: Tensor,
    pub rstd: Tensor,
}

impl GroupNormActivations {
    pub fn discard(&mut self) {
        self.y.discard();
        self.mean.discard();
        self.rstd.discard();
    }
}

fn group_norm_spec(norm: &Norm, silu: bool) -> GroupNorm {
    GroupNorm { groups: norm.groups, eps: norm.eps as f32, silu }
}

/// GroupNorm of `x` [N, C, ...], followed by SiLU when `silu`.
pub fn group_norm(p: &ParamStore, norm: &Norm, silu: bool, x: &Tensor, alloc: &mut dyn Allocator) -> Result<GroupNormActivations> {
    let n = x.shape()[0];
    let mut y = alloc.alloc(x.shape(), x.dtype())?;
    let mut mean = alloc.alloc(&[n, norm.groups], DType::F32)?;
    let mut rstd = alloc.alloc(&[n, norm.groups], DType::F32)?;
    let affine = Affine { weight: p.get(norm.weight), bias: p.get(norm.bias) };
    group_norm_forward(group_norm_spec(norm, silu), x, affine, &mut y, StatsMut { mean: &mut mean, rstd: &mut rstd })?;
    Ok(GroupNormActivations { y, mean, rstd })
}

/// Backward of [`group_norm`]: returns dx, adds the weight and bias gradients.
pub fn group_norm_back(
    p: &ParamStore,
    g: &mut Grads,
    norm: &Norm,
    silu: bool,
    x: &Tensor,
    acts: &GroupNormActivations,
    dy: &Tensor,
    alloc: &mut dyn Allocator,
) -> Result<Tensor> {
    let mut dx = alloc.alloc(x.shape(), x.dtype())?;
    let mut scratch = alloc.alloc(&group_norm_scratch_shape(x.shape()), DType::F32)?;
    let affine = Affine { weight: p.get(norm.weight), bias: p.get(norm.bias) };
    let (dweight, dbias) = g.weight_bias_mut(norm.weight, Some(norm.bias));
    let dbias = dbias.expect("a GroupNorm has a bias");
    let stats = Stats { mean: &acts.mean, rstd: &acts.rstd };
    group_norm_backward(group_norm_spec(norm, silu), x, affine, stats, dy, NormGrads { dx: &mut dx, dweight, dbias, scratch: &mut scratch })?;
    Ok(dx)
}

/// Conv2d of `x` [N, C_in, H, W] into a new [N, C_out, H', W'].
pub fn conv(p: &ParamStore, c: &Conv2d, x: &Tensor, alloc: &mut dyn Allocator) -> Result<Tensor> {
    let s = x.shape();
    ensure!(s.len() == 4 && s[1] == c.input, "conv2d: input {s:?} must be [N, {}, H, W]", c.input);
    let pad = c.spec.padding;
    let (h, w) = (s[2] + pad.top + pad.bottom, s[3] + pad.left + pad.right);
    ensure!(h >= c.kernel && w >= c.kernel, "conv2d: padded input {h}x{w} is smaller than the {}x{} kernel", c.kernel, c.kernel);
    let out = [s[0], c.output, (h - c.kernel) / c.spec.stride + 1, (w - c.kernel) / c.spec.stride + 1];
    let mut y = alloc.alloc(&out, x.dtype())?;
    conv2d_forward(x, p.get(c.weight), c.bias.map(|b| p.get(b)), c.spec, &mut y)?;
    Ok(y)
}

/// Backward of [`conv`]: returns dx, adds the weight and bias gradients.
pub fn conv_back(p: &ParamStore, g: &mut Grads, c: &Conv2d, x: &Tensor, dy: &Tensor, alloc: &mut dyn Allocator) -> Result<Tensor> {
    let mut dx = alloc.alloc(x.shape(), x.dtype())?;
    conv_back_into(p, g, c, x, dy, Some(&mut dx))?;
    Ok(dx)
}

/// Backward of [`conv`] into a given `dx` (none for an input that takes no gradient): adds the weight and
/// bias gradients.
pub fn conv_back_into(p: &ParamStore, g: &mut Grads, c: &Conv2d, x: &Tensor, dy: &Tensor, dx: Option<&mut Tensor>) -> Result<()> {
    if let Some(dx) = dx {
        conv2d_backward_input(dy, p.get(c.weight), c.spec, dx)?;
    }
    let (dw, db) = g.weight_bias_mut(c.weight, c.bias);
    conv2d_backward_weight(x, dy, c.spec, dw)?;
    if let Some(db) = db {
        conv_backward_bias(dy, db)?;
    }
    Ok(())
}

/// `nn.Conv1d` (stride 1) of `x` [B, C_in, L] into a new [B, C_out, L'].
pub fn conv1d(p: &ParamStore, l: &Conv1d, x: &Tensor, alloc: &mut dyn Allocator) -> Result<Tensor> {
    let s = x.shape();
    let len = (s[2] + 2 * l.padding + 1).saturating_sub(l.kernel);
    let mut y = alloc.alloc(&[s[0], l.output, len], x.dtype())?;
    conv1d_forward(x, p.get(l.weight), Some(p.get(l.bias)), 1, l.padding, &mut y)?;
    Ok(y)
}

/// Backward of [`conv1d`]: writes `dx` when given, adds the weight and bias gradients.
pub fn conv1d_back(p: &ParamStore, g: &mut Grads, l: &Conv1d, x: &Tensor, dy: &Tensor, dx: Option<&mut Tensor>) -> Result<()> {
    if let Some(dx) = dx {
        conv1d_backward_input(dy, p.get(l.weight), 1, l.padding, dx)?;
    }
    conv1d_backward_weight(x, dy, 1, l.padding, g.get_mut(l.weight))?;
    conv_backward_bias(dy, g.get_mut(l.bias))
}

/// `nn.ConvTranspose2d` of `x` [B, C_in, H, W] into a new [B, C_out, H', W'].
pub fn conv_transpose2d(p: &ParamStore, l: &ConvTranspose2d, x: &Tensor, alloc: &mut dyn Allocator) -> Result<Tensor> {
    let s = x.shape();
    let out = |len: usize| ((len.max(1) - 1) * l.stride + l.kernel).saturating_sub(2 * l.padding);
    let mut y = alloc.alloc(&[s[0], l.output, out(s[2]), out(s[3])], x.dtype())?;
    conv_transpose2d_forward(x, p.get(l.weight), Some(p.get(l.bias)), Conv2dSpec::new(l.stride, l.padding), &mut y)?;
    Ok(y)
}

/// Backward of [`conv_transpose2d`]: writes `dx` when given, adds the weight and bias gradients.
pub fn conv_transpose2d_back(p: &ParamStore, g: &mut Grads, l: &ConvTranspose2d, x: &Tensor, dy: &Tensor, dx: Option<&mut Tensor>) -> Result<()> {
    let spec = Conv2dSpec::new(l.stride, l.padding);
    if let Some(dx) = dx {
        conv_transpose2d_backward_input(dy, p.get(l.weight), spec, dx)?;
    }
    conv_transpose2d_backward_weight(x, dy, spec, g.get_mut(l.weight))?;
    conv_backward_bias(dy, g.get_mut(l.bias))
}

/// `nn.Linear` over the last dimension of `x` [.., input] into a new [.., output].
pub fn linear(p: &ParamStore, l: &Linear, x: &Tensor, alloc: &mut dyn Allocator) -> Result<Tensor> {
    let mut shape = x.shape().to_vec();
    ensure!(shape.last() == Some(&l.input), "Linear({}, {}): input {:?} does not end in {}", l.input, l.output, x.shape(), l.input);
    *shape.last_mut().unwrap() = l.output;
    let mut y = alloc.alloc(&shape, x.dtype())?;
    linear_forward(x, p.get(l.weight), l.bias.map(|b| p.get(b)), &mut y)?;
    Ok(y)
}

/// Backward of [`linear`]: writes `dx` when given (none for an input that takes no gradient), adds the weight
/// and bias gradients.
pub fn linear_back(p: &ParamStore, g: &mut Grads, l: &Linear, x: &Tensor, dy: &Tensor, dx: Option<&mut Tensor>) -> Result<()> {
    let (dw, db) = g.weight_bias_mut(l.weight, l.bias);
    linear_backward(x, p.get(l.weight), dy, dx, Some(dw), db)
}

/// [`linear_back`] into a new dx, which it returns.
pub fn linear_back_input(p: &ParamStore, g: &mut Grads, l: &Linear, x: &Tensor, dy: &Tensor, alloc: &mut dyn Allocator) -> Result<Tensor> {
    let mut dx = alloc.alloc(x.shape(), x.dtype())?;
    linear_back(p, g, l, x, dy, Some(&mut dx))?;
    Ok(dx)
}

/// A LayerNorm's output and the statistics its backward needs ([rows] f32 each).
pub struct LayerNormActivations {
    pub output: Tensor,
    pub mean: Tensor,
    pub rstd: Tensor,
}

/// LayerNorm of `x` over its last dimension.
pub fn layer_norm(p: &ParamStore, norm: &Norm, x: &Tensor, alloc: &mut dyn Allocator) -> Result<LayerNormActivations> {
    let rows = x.numel() / norm.channels.max(1);
    let mut output = alloc.alloc(x.shape(), x.dtype())?;
    let mut mean = alloc.alloc(&[rows], DType::F32)?;
    let mut rstd = alloc.alloc(&[rows], DType::F32)?;
    let affine = Affine { weight: p.get(norm.weight), bias: p.get(norm.bias) };
    layer_norm_forward(norm.eps as f32, x, affine, &mut output, StatsMut { mean: &mut mean, rstd: &mut rstd })?;
    Ok(LayerNormActivations { output, mean, rstd })
}

/// Backward of [`layer_norm`]: returns dx, adds the weight and bias gradients.
pub fn layer_norm_back(
    p: &ParamStore,
    g: &mut Grads,
    norm: &Norm,
    x: &Tensor,
    acts: &LayerNormActivations,
    dy: &Tensor,
    alloc: &mut dyn Allocator,
) -> Result<Tensor> {
    let mut dx = alloc.alloc(x.shape(), x.dtype())?;
    let mut scratch = alloc.alloc(&layer_norm_scratch_shape(x.shape()), DType::F32)?;
    let (dweight, dbias) = g.pair_mut(norm.weight, norm.bias);
    let stats = Stats { mean: &acts.mean, rstd: &acts.rstd };
    layer_norm_backward(x, p.get(norm.weight), stats, dy, NormGrads { dx: &mut dx, dweight, dbias, scratch: &mut scratch })?;
    Ok(dx)
}

/// `a + b` into a new tensor.
pub fn sum(a: &Tensor, b: &Tensor, alloc: &mut dyn Allocator) -> Result<Tensor> {
    let mut y = alloc.alloc(a.shape(), a.dtype())?;
    add(a, b, &mut y)?;
    Ok(y)
}
