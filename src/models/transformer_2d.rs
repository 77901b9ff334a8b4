//! diffusers' `transformer_2d.py`: `Transformer2DModel`, the transformer blocks run over an NCHW feature map.

use anyhow::{bail, ensure, Context, Result};

use crate::models::attention::{Attention, TransformerBlock, TransformerBlockActivations};
use crate::models::layers::{self, sum};
use crate::nn::{join, Allocator, Conv2d, Grads, Linear, Norm, ParamStore, ParamTree};
use crate::ops;
use crate::tensor::{DType, Tensor};

/// `proj_in` / `proj_out` of a Transformer2DModel: 1x1 convolutions (SD 1.x) or linear layers (SD 2.x).
#[derive(Debug, Clone)]
pub enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// `Transformer2DModel` over an NCHW feature map.
#[derive(Debug, Clone)]
pub struct Transformer2d {
    pub norm: Norm,
    pub proj_in: Projection,
    pub blocks: Vec<TransformerBlock>,
    pub proj_out: Projection,
    pub heads: usize,
    pub head_dim: usize,
}

/// What the cross-attention blocks of one UNet share.
#[derive(Debug, Clone, Copy)]
pub struct TransformerSpec {
    pub cross_attention_dim: usize,
    pub groups: usize,
    pub use_linear_projection: bool,
}

impl Transformer2d {
    pub fn new(tree: &mut ParamTree, prefix: &str, channels: usize, heads: usize, layers: usize, spec: TransformerSpec) -> Result<Transformer2d> {
        ensure!(heads > 0 && channels.is_multiple_of(heads), "{prefix}: {channels} channels do not split into {heads} heads");
        ensure!(layers > 0, "{prefix}: a Transformer2DModel needs at least one transformer block");
        let head_dim = channels / heads;
        let projection = |tree: &mut ParamTree, name: &str| {
            let p = join(prefix, name);
            if spec.use_linear_projection {
                Projection::Linear(Linear::new(tree, &p, channels, channels, true))
            } else {
                Projection::Conv(Conv2d::k1(tree, &p, channels, channels))
            }
        };
        let norm = Norm::group(tree, &join(prefix, "norm"), spec.groups, channels, 1e-6)?;
        let proj_in = projection(tree, "proj_in");
        let blocks = (0..layers)
            .map(|l| {
                let p = join(prefix, &format!("transformer_blocks.{l}"));
                TransformerBlock {
                    norm1: Norm::layer(tree, &join(&p, "norm1"), channels, 1e-5),
                    attn1: Attention::new(tree, &join(&p, "attn1"), channels, channels, heads, head_dim, false),
                    norm2: Norm::layer(tree, &join(&p, "norm2"), channels, 1e-5),
                    attn2: Attention::new(tree, &join(&p, "attn2"), channels, spec.cross_attention_dim, heads, head_dim, false),
                    norm3: Norm::layer(tree, &join(&p, "norm3"), channels, 1e-5),
                    ff_proj: Linear::new(tree, &join(&p, "ff.net.0.proj"), channels, 8 * channels, true),
                    ff_out: Linear::new(tree, &join(&p, "ff.net.2"), 4 * channels, channels, true),
                }
            })
            .collect();
        let proj_out = projection(tree, "proj_out");
        Ok(Transformer2d { norm, proj_in, blocks, proj_out, heads, head_dim })
    }
}

/// `y` [B, C, H, W] <-> tokens [B, HW, C] (diffusers' permute + reshape around the transformer blocks).
fn map_to_tokens(map: Tensor, alloc: &mut dyn Allocator) -> Result<Tensor> {
    let &[b, c, h, w] = map.shape() else { bail!("Transformer2DModel: feature map {:?} is not [B, C, H, W]", map.shape()) };
    let map = map.reshape(&[b, c, h * w])?;
    let mut tokens = alloc.alloc(&[b, h * w, c], map.dtype())?;
    ops::shape::transpose_last2(&map, &mut tokens)?;
    Ok(tokens)
}

fn tokens_to_map(tokens: &Tensor, height: usize, width: usize, alloc: &mut dyn Allocator) -> Result<Tensor> {
    let &[b, l, c] = tokens.shape() else { bail!("Transformer2DModel: tokens {:?} are not [B, HW, C]", tokens.shape()) };
    ensure!(l == height * width, "Transformer2DModel: {l} tokens do not fill a {height}x{width} map");
    let mut map = alloc.alloc(&[b, c, l], tokens.dtype())?;
    ops::shape::transpose_last2(tokens, &mut map)?;
    map.reshape(&[b, c, height, width])
}

impl Projection {
    /// A 1x1 conv over `x` [B, C, H, W], or a Linear over tokens `x` [B, HW, C].
    pub fn forward(&self, params: &ParamStore, x: &Tensor, alloc: &mut dyn Allocator) -> Result<Tensor> {
        match self {
            Projection::Linear(l) => layers::linear(params, l, x, alloc),
            Projection::Conv(c) => {
                let &[b, channels, h, w] = x.shape() else { bail!("Transformer2DModel projection: input {:?} is not [B, C, H, W]", x.shape()) };
                ensure!(
                    c.kernel == 1 && channels == c.input,
                    "Transformer2DModel projection: a 1x1 conv from {} channels cannot take {:?}",
                    c.input,
                    x.shape()
                );
                let mut y = alloc.alloc(&[b, c.output, h, w], x.dtype())?;
                ops::conv::conv2d_forward(x, params.get(c.weight), c.bias.map(|id| params.get(id)), c.spec, &mut y)?;
                Ok(y)
            }
        }
    }

    /// Backward of [`Projection::forward`] with the same `x`: adds to the parameter gradients, returns dx.
    pub fn backward(&self, params: &ParamStore, grads: &mut Grads, x: &Tensor, dy: &Tensor, alloc: &mut dyn Allocator) -> Result<Tensor> {
        match self {
            Projection::Linear(l) => Ok(layers::linear_back_input(params, grads, l, x, dy, alloc)?),
            Projection::Conv(c) => {
                let mut dx = alloc.alloc(x.shape(), x.dtype())?;
                ops::conv::conv2d_backward_input(dy, params.get(c.weight), c.spec, &mut dx)?;
                ops::conv::conv2d_backward_weight(x, dy, c.spec, grads.get_mut(c.weight))?;
                if let Some(b) = c.bias {
                    ops::conv::conv_backward_bias(dy, grads.get_mut(b))?;
                }
                Ok(dx)
            }
        }
    }
}

/// What a [`Transformer2d`]'s backward needs, and its output [B, C, H, W].
pub struct Transformer2dActivations {
    /// The GroupNorm's statistics [B, groups] (f32).
    pub norm_mean: Tensor,
    pub norm_rstd: Tensor,
    /// `proj_in`'s input: the normalised map [B, C, H, W] (conv) or its tokens [B, HW, C] (linear).
    pub proj_in_input: Tensor,
    /// `proj_in`'s output as tokens [B, HW, C]: the first block's input.
    pub tokens: Tensor,
    pub blocks: Vec<TransformerBlockActivations>,
    /// The last block's output back on the map [B, C, H, W], `proj_out`'s input when it is a conv.
    pub proj_out_map: Option<Tensor>,
    pub output: Tensor,
}

impl Transformer2dActivations {
    /// Everything but the output.
    fn discard_saved(&mut self) {
        [&mut self.norm_mean, &mut self.norm_rstd, &mut self.proj_in_input, &mut self.tokens].into_iter().for_each(Tensor::discard);
        self.proj_out_map.iter_mut().for_each(Tensor::discard);
        for b in &mut self.blocks {
            for n in [&mut b.norm1, &mut b.norm2, &mut b.norm3] {
                [&mut n.output, &mut n.mean, &mut n.rstd].into_iter().for_each(Tensor::discard);
            }
            for a in [&mut b.attn1, &mut b.attn2] {
                [&mut a.q, &mut a.k, &mut a.v, &mut a.attended, &mut a.lse, &mut a.output].into_iter().for_each(Tensor::discard);
            }
            [&mut b.after_attn1, &mut b.after_attn2, &mut b.ff_hidden, &mut b.ff_gated, &mut b.output].into_iter().for_each(Tensor::discard);
        }
    }

    fn block_input(&self, block: usize) -> &Tensor {
        if block == 0 {
            &self.tokens
        } else {
            &self.blocks[block - 1].output
        }
    }
}

/// The input gradients of a [`Transformer2d`], written.
pub struct Transformer2dGrads {
    pub dx: Tensor,
    pub dcontext: Tensor,
}

impl Transformer2d {
    fn group_norm_spec(&self) -> ops::norm::GroupNorm {
        ops::norm::GroupNorm { groups: self.norm.groups, eps: self.norm.eps as f32, silu: false }
    }

    /// `x` [B, C, H, W], `context` [B, L, cross_attention_dim] (encoder_hidden_states).
    pub fn forward(&self, params: &ParamStore, x: &Tensor, context: &Tensor, alloc: &mut dyn Allocator) -> Result<Transformer2dActivations> {
        let &[batch, channels, height, width] = x.shape() else { bail!("Transformer2DModel: input {:?} is not [B, C, H, W]", x.shape()) };
        ensure!(
            channels == self.norm.channels,
            "Transformer2DModel: input {:?} has {channels} channels, the model {}",
            x.shape(),
            self.norm.channels
        );
        let mut normed = alloc.alloc(x.shape(), x.dtype())?;
        let mut norm_mean = alloc.alloc(&[batch, self.norm.groups], DType::F32)?;
        let mut norm_rstd = alloc.alloc(&[batch, self.norm.groups], DType::F32)?;
        let affine = ops::norm::Affine { weight: params.get(self.norm.weight), bias: params.get(self.norm.bias) };
        let stats = ops::norm::StatsMut { mean: &mut norm_mean, rstd: &mut norm_rstd };
        ops::norm::group_norm_forward(self.group_norm_spec(), x, affine, &mut normed, stats).context("Transformer2DModel norm")?;
        // diffusers applies a conv projection before moving to tokens and a linear one after.
        let (proj_in_input, tokens) = match &self.proj_in {
            Projection::Conv(_) => {
                let projected = self.proj_in.forward(params, &normed, alloc).context("Transformer2DModel proj_in")?;
                (normed, map_to_tokens(projected, alloc)?)
            }
            Projection::Linear(_) => {
                let normed_tokens = map_to_tokens(normed, alloc)?;
                let tokens = self.proj_in.forward(params, &normed_tokens, alloc).context("Transformer2DModel proj_in")?;
                (normed_tokens, tokens)
            }
        };
        let output = alloc.alloc(x.shape(), x.dtype())?;
        let mut acts = Transformer2dActivations { norm_mean, norm_rstd, proj_in_input, tokens, blocks: Vec::new(), proj_out_map: None, output };
        for (l, block) in self.blocks.iter().enumerate() {
            let b =
                block.forward(params, acts.block_input(l), context, alloc).with_context(|| format!("Transformer2DModel transformer_blocks.{l}"))?;
            acts.blocks.push(b);
        }
        let last = acts.block_input(self.blocks.len());
        let projected = match &self.proj_out {
            Projection::Conv(_) => {
                let map = tokens_to_map(last, height, width, alloc)?;
                let projected = self.proj_out.forward(params, &map, alloc).context("Transformer2DModel proj_out")?;
                acts.proj_out_map = Some(map);
                projected
            }
            Projection::Linear(_) => {
                let projected = self.proj_out.forward(params, last, alloc).context("Transformer2DModel proj_out")?;
                tokens_to_map(&projected, height, width, alloc)?
            }
        };
        ops::elementwise::add(&projected, x, &mut acts.output)?;
        if !alloc.keeps_activations() {
            acts.discard_saved();
        }
        Ok(acts)
    }

    /// Backward of [`Transformer2d::forward`] with the same `x` and `context`: adds to the parameter
    /// gradients and returns the input gradients.
    pub fn backward(
        &self,
        params: &ParamStore,
        grads: &mut Grads,
        acts: &Transformer2dActivations,
        x: &Tensor,
        context: &Tensor,
        dy: &Tensor,
        alloc: &mut dyn Allocator,
    ) -> Result<Transformer2dGrads> {
        let &[_, _, height, width] = x.shape() else { bail!("Transformer2DModel: input {:?} is not [B, C, H, W]", x.shape()) };
        // The output residual hands dy to both the input and proj_out.
        let mut dx_residual = alloc.alloc(dy.shape(), dy.dtype())?;
        let mut dprojected = alloc.alloc(dy.shape(), dy.dtype())?;
        ops::elementwise::add_scaled_backward(dy, 1.0, &mut dx_residual, &mut dprojected)?;
        let mut dtokens = match &self.proj_out {
            Projection::Conv(_) => {
                let map = acts.proj_out_map.as_ref().expect("a conv proj_out keeps its input map");
                let dmap = self.proj_out.backward(params, grads, map, &dprojected, alloc).context("Transformer2DModel proj_out")?;
                map_to_tokens(dmap, alloc)?
            }
            Projection::Linear(_) => {
                let dprojected = map_to_tokens(dprojected, alloc)?;
                let last = acts.block_input(self.blocks.len());
                self.proj_out.backward(params, grads, last, &dprojected, alloc).context("Transformer2DModel proj_out")?
            }
        };
        let mut dcontext: Option<Tensor> = None;
        for (l, block) in self.blocks.iter().enumerate().rev() {
            let (dx, dc) = block
                .backward(params, grads, &acts.blocks[l], acts.block_input(l), context, &dtokens, alloc)
                .with_context(|| format!("Transformer2DModel transformer_blocks.{l} backward"))?;
            dtokens = dx;
            dcontext = Some(match dcontext {
                Some(total) => sum(&total, &dc, alloc)?,
                None => dc,
            });
        }
        let dcontext = dcontext.expect("Transformer2d::new builds at least one block");
        let dnormed = match &self.proj_in {
            Projection::Conv(_) => {
                let dprojected = tokens_to_map(&dtokens, height, width, alloc)?;
                self.proj_in.backward(params, grads, &acts.proj_in_input, &dprojected, alloc).context("Transformer2DModel proj_in")?
            }
            Projection::Linear(_) => {
                let dnormed_tokens =
                    self.proj_in.backward(params, grads, &acts.proj_in_input, &dtokens, alloc).context("Transformer2DModel proj_in")?;
                tokens_to_map(&dnormed_tokens, height, width, alloc)?
            }
        };
        let mut dx_norm = alloc.alloc(x.shape(), x.dtype())?;
        let mut scratch = alloc.alloc(&ops::norm::group_norm_scratch_shape(x.shape()), DType::F32)?;
        let (dweight, dbias) = grads.pair_mut(self.norm.weight, self.norm.bias);
        let affine = ops::norm::Affine { weight: params.get(self.norm.weight), bias: params.get(self.norm.bias) };
        let stats = ops::norm::Stats { mean: &acts.norm_mean, rstd: &acts.norm_rstd };
        let norm_grads = ops::norm::NormGrads { dx: &mut dx_norm, dweight, dbias, scratch: &mut scratch };
        ops::norm::group_norm_backward(self.group_norm_spec(), x, affine, stats, &dnormed, norm_grads).context("Transformer2DModel norm backward")?;
        Ok(Transformer2dGrads { dx: sum(&dx_residual, &dx_norm, alloc)?, dcontext })
    }
}
