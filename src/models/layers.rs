//! The parameterised layers of [`crate::nn`] run on a [`ParamStore`]: forward from the parameters, backward
//! adding into [`Grads`], every tensor taken from an [`Allocator`].

use anyhow::{ensure, Result};

use crate::nn::{Allocator, Conv2d, Grads, Linear, Norm, ParamStore};
use crate::ops;
use crate::ops::conv::{conv2d_backward_input, conv2d_backward_weight, conv2d_forward, conv_backward_bias};
use crate::ops::linear::{linear_backward, linear_forward};
use crate::ops::norm::{group_norm_backward, group_norm_forward, group_norm_scratch_shape, Affine, GroupNorm, NormGrads, Stats, StatsMut};
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
    anyhow::ensure!(s.len() == 4 && s[1] == c.input, "conv2d: input {s:?} must be [N, {}, H, W]", c.input);
    let pad = c.spec.padding;
    let (h, w) = (s[2] + pad.top + pad.bottom, s[3] + pad.left + pad.right);
    anyhow::ensure!(h >= c.kernel && w >= c.kernel, "conv2d: padded input {h}x{w} is smaller than the {}x{} kernel", c.kernel, c.kernel);
    let out = [s[0], c.output, (h - c.kernel) / c.spec.stride + 1, (w - c.kernel) / c.spec.stride + 1];
    let mut y = alloc.alloc(&out, x.dtype())?;
    conv2d_forward(x, p.get(c.weight), c.bias.map(|b| p.get(b)), c.spec, &mut y)?;
    Ok(y)
}

/// Backward of [`conv`]: returns dx, adds the weight and bias gradients.
pub fn conv_back(p: &ParamStore, g: &mut Grads, c: &Conv2d, x: &Tensor, dy: &Tensor, alloc: &mut dyn Allocator) -> Result<Tensor> {
    let mut dx = alloc.alloc(x.shape(), x.dtype())?;
    conv2d_backward_input(dy, p.get(c.weight), c.spec, &mut dx)?;
    let (dw, db) = g.weight_bias_mut(c.weight, c.bias);
    conv2d_backward_weight(x, dy, c.spec, dw)?;
    if let Some(db) = db {
        conv_backward_bias(dy, db)?;
    }
    Ok(dx)
}

/// `nn.Linear` over the last dimension of `x` into a new tensor.
pub fn linear(p: &ParamStore, l: &Linear, x: &Tensor, alloc: &mut dyn Allocator) -> Result<Tensor> {
    let mut shape = x.shape().to_vec();
    *shape.last_mut().expect("linear input has a feature dimension") = l.output;
    let mut y = alloc.alloc(&shape, x.dtype())?;
    linear_forward(x, p.get(l.weight), l.bias.map(|b| p.get(b)), &mut y)?;
    Ok(y)
}

/// Backward of [`linear`]: writes `dx` when given, adds the weight and bias gradients.
pub fn linear_back(p: &ParamStore, g: &mut Grads, l: &Linear, x: &Tensor, dy: &Tensor, dx: Option<&mut Tensor>) -> Result<()> {
    let (dw, db) = g.weight_bias_mut(l.weight, l.bias);
    linear_backward(x, p.get(l.weight), dy, dx, Some(dw), db)
}

/// A LayerNorm's output and the statistics its backward needs ([rows] f32 each).
pub struct LayerNormActivations {
    pub output: Tensor,
    pub mean: Tensor,
    pub rstd: Tensor,
}

pub(crate) fn layer_norm_forward(norm: &Norm, params: &ParamStore, x: &Tensor, alloc: &mut dyn Allocator) -> Result<LayerNormActivations> {
    let rows = x.numel() / norm.channels.max(1);
    let mut output = alloc.alloc(x.shape(), x.dtype())?;
    let mut mean = alloc.alloc(&[rows], DType::F32)?;
    let mut rstd = alloc.alloc(&[rows], DType::F32)?;
    let affine = ops::norm::Affine { weight: params.get(norm.weight), bias: params.get(norm.bias) };
    let stats = ops::norm::StatsMut { mean: &mut mean, rstd: &mut rstd };
    ops::norm::layer_norm_forward(norm.eps as f32, x, affine, &mut output, stats)?;
    Ok(LayerNormActivations { output, mean, rstd })
}

/// Returns dx; adds to the norm's weight and bias gradients.
pub(crate) fn layer_norm_backward(
    norm: &Norm,
    params: &ParamStore,
    grads: &mut Grads,
    acts: &LayerNormActivations,
    x: &Tensor,
    dy: &Tensor,
    alloc: &mut dyn Allocator,
) -> Result<Tensor> {
    let mut dx = alloc.alloc(x.shape(), x.dtype())?;
    let mut scratch = alloc.alloc(&ops::norm::layer_norm_scratch_shape(x.shape()), DType::F32)?;
    let (dweight, dbias) = grads.pair_mut(norm.weight, norm.bias);
    let stats = ops::norm::Stats { mean: &acts.mean, rstd: &acts.rstd };
    let norm_grads = ops::norm::NormGrads { dx: &mut dx, dweight, dbias, scratch: &mut scratch };
    ops::norm::layer_norm_backward(x, params.get(norm.weight), stats, dy, norm_grads)?;
    Ok(dx)
}

/// `nn.Linear` over the last dimension: `x` [.., input] -> [.., output].
pub(crate) fn linear_layer_forward(layer: &Linear, params: &ParamStore, x: &Tensor, alloc: &mut dyn Allocator) -> Result<Tensor> {
    let mut shape = x.shape().to_vec();
    ensure!(shape.last() == Some(&layer.input), "Linear({}, {}): input {:?} does not end in {}", layer.input, layer.output, x.shape(), layer.input);
    *shape.last_mut().unwrap() = layer.output;
    let mut y = alloc.alloc(&shape, x.dtype())?;
    ops::linear::linear_forward(x, params.get(layer.weight), layer.bias.map(|b| params.get(b)), &mut y)?;
    Ok(y)
}

/// Backward of [`linear_layer_forward`]: adds to the weight and bias gradients and returns dx.
pub(crate) fn linear_layer_backward(
    layer: &Linear,
    params: &ParamStore,
    grads: &mut Grads,
    x: &Tensor,
    dy: &Tensor,
    alloc: &mut dyn Allocator,
) -> Result<Tensor> {
    let mut dx = alloc.alloc(x.shape(), x.dtype())?;
    ops::linear::linear_backward(x, params.get(layer.weight), dy, Some(&mut dx), None, None)?;
    linear_layer_param_backward(layer, params, grads, x, dy)?;
    Ok(dx)
}

/// The parameter half of [`linear_layer_backward`], for layers whose input takes no gradient.
pub(crate) fn linear_layer_param_backward(layer: &Linear, params: &ParamStore, grads: &mut Grads, x: &Tensor, dy: &Tensor) -> Result<()> {
    let w = params.get(layer.weight);
    ops::linear::linear_backward(x, w, dy, None, Some(grads.get_mut(layer.weight)), None)?;
    if let Some(b) = layer.bias {
        ops::linear::linear_backward(x, w, dy, None, None, Some(grads.get_mut(b)))?;
    }
    Ok(())
}

/// `a + b` into a new tensor.
pub(crate) fn sum(a: &Tensor, b: &Tensor, alloc: &mut dyn Allocator) -> Result<Tensor> {
    let mut y = alloc.alloc(a.shape(), a.dtype())?;
    ops::elementwise::add(a, b, &mut y)?;
    Ok(y)
}
