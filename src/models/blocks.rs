//! The diffusers building blocks shared by the UNet, the ControlNet and the AutoencoderKL, as parameter
//! structures named exactly like diffusers' modules (`resnets.0.norm1.weight`, ...).

use anyhow::{anyhow, bail, ensure, Context, Result};

use crate::nn::{join, Allocator, Conv2d, Grads, Linear, Norm, ParamStore, ParamTree};
use crate::ops::attention::{attention_backward, attention_forward, AttentionSpec, Qkv, QkvGrads, MAX_HEAD_DIM};
use crate::ops;
use crate::ops::conv::Conv2dSpec;
use crate::ops::elementwise::{add, silu_backward, silu_forward};
use crate::ops::linear::{matmul, MatmulSpec};
use crate::ops::shape::{transpose_last2, upsample_nearest2x, upsample_nearest2x_backward};
use crate::ops::softmax::{softmax_backward, softmax_forward};
use crate::tensor::{DType, Tensor};

/// `ResnetBlock2D`: GroupNorm, SiLU, 3x3 conv, (+ projected time embedding), GroupNorm, SiLU, 3x3 conv,
/// plus a 1x1 shortcut where the channel count changes. Output scale 1.
#[derive(Debug, Clone)]
pub struct ResnetBlock {
    pub norm1: Norm,
    pub conv1: Conv2d,
    pub time_emb_proj: Option<Linear>,
    pub norm2: Norm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    pub fn new(tree: &mut ParamTree, prefix: &str, input: usize, output: usize, temb: Option<usize>, groups: usize, eps: f64) -> Result<ResnetBlock> {
        Ok(ResnetBlock {
            norm1: Norm::group(tree, &join(prefix, "norm1"), groups, input, eps)?,
            conv1: Conv2d::k3(tree, &join(prefix, "conv1"), input, output, 1),
            time_emb_proj: temb.map(|t| Linear::new(tree, &join(prefix, "time_emb_proj"), t, output, true)),
            norm2: Norm::group(tree, &join(prefix, "norm2"), groups, output, eps)?,
            conv2: Conv2d::k3(tree, &join(prefix, "conv2"), output, output, 1),
            conv_shortcut: (input != output).then(|| Conv2d::k1(tree, &join(prefix, "conv_shortcut"), input, output)),
        })
    }
}

/// The parameterised layers of [`crate::nn`] run on a [`ParamStore`]: forward from the parameters, backward
/// adding into [`Grads`], every tensor taken from an [`Allocator`].
pub mod layers {
    use anyhow::Result;

    use crate::nn::{Allocator, Conv2d, Grads, Linear, Norm, ParamStore};
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
}

/// The time-embedding branch of a resnet: `silu(temb)` (the projection's input) and the ones the projected
/// [N, C] embedding is multiplied with to broadcast it over the N x H·W positions in one accumulating GEMM.
pub struct TimeActivations {
    silu: Tensor,
    ones: Tensor,
}

/// What [`ResnetBlock::backward`] reads: the GroupNorm activations and the first conv's output (with the time
/// embedding added), which is the second GroupNorm's input.
pub struct ResnetActivations {
    norm1: layers::GroupNormActivations,
    conv1: Tensor,
    time: Option<TimeActivations>,
    norm2: layers::GroupNormActivations,
}

impl ResnetActivations {
    fn discard(&mut self) {
        self.norm1.discard();
        self.conv1.discard();
        if let Some(t) = &mut self.time {
            t.silu.discard();
            t.ones.discard();
        }
        self.norm2.discard();
    }
}

impl ResnetBlock {
    /// `x` [N, C_in, H, W] and, when the block has `time_emb_proj`, `temb` [N, temb_channels]; returns
    /// [N, C_out, H, W] = shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))) + proj(silu(temb))))).
    pub fn forward(&self, p: &ParamStore, x: &Tensor, temb: Option<&Tensor>, alloc: &mut dyn Allocator) -> Result<(Tensor, ResnetActivations)> {
        let norm1 = layers::group_norm(p, &self.norm1, true, x, alloc)?;
        let mut conv1 = layers::conv(p, &self.conv1, &norm1.y, alloc)?;
        let time = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => {
                let shape = conv1.shape().to_vec();
                let (n, c, hw) = (shape[0], shape[1], shape[2] * shape[3]);
                ensure!(temb.shape() == [n, proj.input], "ResnetBlock2D: temb {:?} must be [{n}, {}]", temb.shape(), proj.input);
                let mut silu = alloc.alloc(temb.shape(), temb.dtype())?;
                silu_forward(temb, &mut silu)?;
                let projected = layers::linear(p, proj, &silu, alloc)?.reshape(&[n, c, 1])?;
                let mut ones = alloc.alloc(&[n, 1, hw], conv1.dtype())?;
                crate::ops::elementwise::fill(&mut ones, 1.0)?;
                let mut h = conv1.reshape(&[n, c, hw])?;
                matmul(&projected, &ones, &mut h, MatmulSpec { accumulate: true, ..MatmulSpec::default() })?;
                conv1 = h.reshape(&shape)?;
                Some(TimeActivations { silu, ones })
            }
            (None, None) => None,
            (Some(_), None) => bail!("ResnetBlock2D: the block projects a time embedding but none was given"),
            (None, Some(_)) => bail!("ResnetBlock2D: a time embedding was given to a block without time_emb_proj"),
        };
        let norm2 = layers::group_norm(p, &self.norm2, true, &conv1, alloc)?;
        let conv2 = layers::conv(p, &self.conv2, &norm2.y, alloc)?;
        let mut y = alloc.alloc(conv2.shape(), conv2.dtype())?;
        match &self.conv_shortcut {
            Some(sc) => add(&layers::conv(p, sc, x, alloc)?, &conv2, &mut y)?,
            None => add(x, &conv2, &mut y)?,
        }
        let mut acts = ResnetActivations { norm1, conv1, time, norm2 };
        if !alloc.keeps_activations() {
            acts.discard();
        }
        Ok((y, acts))
    }

    /// Backward of [`ResnetBlock::forward`] from `dy`: returns dx and, with a time embedding, dtemb; adds
    /// every parameter gradient.
    pub fn backward(
        &self,
        p: &ParamStore,
        g: &mut Grads,
        x: &Tensor,
        temb: Option<&Tensor>,
        acts: &ResnetActivations,
        dy: &Tensor,
        alloc: &mut dyn Allocator,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let dnorm2 = layers::conv_back(p, g, &self.conv2, &acts.norm2.y, dy, alloc)?;
        let dconv1 = layers::group_norm_back(p, g, &self.norm2, true, &acts.conv1, &acts.norm2, &dnorm2, alloc)?;
        let (dconv1, dtemb) = match (&self.time_emb_proj, temb, &acts.time) {
            (Some(proj), Some(temb), Some(time)) => {
                let shape = dconv1.shape().to_vec();
                let (n, c, hw) = (shape[0], shape[1], shape[2] * shape[3]);
                let dconv1 = dconv1.reshape(&[n, c, hw])?;
                let mut dprojected = alloc.alloc(&[n, c, 1], dconv1.dtype())?;
                matmul(&dconv1, &time.ones, &mut dprojected, MatmulSpec { trans_b: true, ..MatmulSpec::default() })?;
                let dprojected = dprojected.reshape(&[n, c])?;
                let mut dsilu = alloc.alloc(time.silu.shape(), time.silu.dtype())?;
                layers::linear_back(p, g, proj, &time.silu, &dprojected, Some(&mut dsilu))?;
                let mut dtemb = alloc.alloc(temb.shape(), temb.dtype())?;
                silu_backward(temb, &dsilu, &mut dtemb)?;
                (dconv1.reshape(&shape)?, Some(dtemb))
            }
            (None, None, None) => (dconv1, None),
            _ => bail!("ResnetBlock2D backward: the time embedding does not match the forward's"),
        };
        let dnorm1 = layers::conv_back(p, g, &self.conv1, &acts.norm1.y, &dconv1, alloc)?;
        let dmain = layers::group_norm_back(p, g, &self.norm1, true, x, &acts.norm1, &dnorm1, alloc)?;
        let mut dx = alloc.alloc(x.shape(), x.dtype())?;
        match &self.conv_shortcut {
            Some(sc) => add(&dmain, &layers::conv_back(p, g, sc, x, dy, alloc)?, &mut dx)?,
            None => add(&dmain, dy, &mut dx)?,
        }
        Ok((dx, dtemb))
    }
}

/// The attention core's saved tensors: the fused op's output and log-sum-exp rows, or, for head dims the
/// fused kernels do not hold (the SD VAE's 512), the explicit probabilities and output.
enum AttentionCore {
    Fused { out: Tensor, lse: Tensor },
    Unfused { probs: Tensor, out: Tensor },
}

impl AttentionCore {
    fn out(&self) -> &Tensor {
        match self {
            AttentionCore::Fused { out, .. } | AttentionCore::Unfused { out, .. } => out,
        }
    }
}

/// What [`Attention::vae_backward`] reads: the GroupNorm, its output as tokens [B, L, C], q, k, v and the core.
pub struct VaeAttentionActivations {
    norm: layers::GroupNormActivations,
    tokens: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    core: AttentionCore,
}

impl Attention {
    /// The VAE mid block's attention on `x` [B, C, L] (L = H·W): GroupNorm, tokens [B, L, C], single-head
    /// softmax(q kᵀ / √C) v, `to_out.0`, back to [B, C, L], plus `x`. `fused` picks the fused attention op
    /// (head dims up to [`MAX_HEAD_DIM`]) or matmul + softmax + matmul (any head dim).
    pub fn vae_forward(&self, p: &ParamStore, x: &Tensor, fused: bool, alloc: &mut dyn Allocator) -> Result<(Tensor, VaeAttentionActivations)> {
        let norm_params = self.group_norm.as_ref().filter(|_| self.heads == 1);
        let Some(norm_params) = norm_params else { bail!("Attention: the VAE path needs the single-head attention with a GroupNorm") };
        let s = x.shape().to_vec();
        ensure!(s.len() == 3 && s[1] == self.head_dim, "VAE attention: input {s:?} must be [B, {}, H*W]", self.head_dim);
        ensure!(!fused || self.head_dim <= MAX_HEAD_DIM, "VAE attention: the fused op holds head dims up to {MAX_HEAD_DIM}, not {}", self.head_dim);
        let (b, c, l) = (s[0], s[1], s[2]);
        let norm = layers::group_norm(p, norm_params, false, x, alloc)?;
        let mut tokens = alloc.alloc(&[b, l, c], x.dtype())?;
        transpose_last2(&norm.y, &mut tokens)?;
        let q = layers::linear(p, &self.to_q, &tokens, alloc)?;
        let k = layers::linear(p, &self.to_k, &tokens, alloc)?;
        let v = layers::linear(p, &self.to_v, &tokens, alloc)?;
        let mut out = alloc.alloc(&[b, l, c], x.dtype())?;
        let core = if fused {
            let mut lse = alloc.alloc(&[b, 1, l], DType::F32)?;
            attention_forward(AttentionSpec::new(1), Qkv { q: &q, k: &k, v: &v }, &mut out, &mut lse)?;
            AttentionCore::Fused { out, lse }
        } else {
            let mut scores = alloc.alloc(&[b, l, l], x.dtype())?;
            matmul(&q, &k, &mut scores, MatmulSpec { trans_b: true, ..MatmulSpec::default() })?;
            let mut probs = alloc.alloc(&[b, l, l], x.dtype())?;
            softmax_forward(&scores, vae_attention_scale(c), &mut probs)?;
            matmul(&probs, &v, &mut out, MatmulSpec::default())?;
            AttentionCore::Unfused { probs, out }
        };
        let projected = layers::linear(p, &self.to_out, core.out(), alloc)?;
        let mut back = alloc.alloc(&[b, c, l], x.dtype())?;
        transpose_last2(&projected, &mut back)?;
        let mut y = alloc.alloc(&[b, c, l], x.dtype())?;
        add(x, &back, &mut y)?;
        let mut acts = VaeAttentionActivations { norm, tokens, q, k, v, core };
        if !alloc.keeps_activations() {
            acts.norm.discard();
            [&mut acts.tokens, &mut acts.q, &mut acts.k, &mut acts.v].into_iter().for_each(Tensor::discard);
            match &mut acts.core {
                AttentionCore::Fused { out, lse } => [out, lse].into_iter().for_each(Tensor::discard),
                AttentionCore::Unfused { probs, out } => [probs, out].into_iter().for_each(Tensor::discard),
            }
        }
        Ok((y, acts))
    }

    /// Backward of [`Attention::vae_forward`] from `dy` [B, C, L]: returns dx, adds every parameter gradient.
    pub fn vae_backward(&self, p: &ParamStore, g: &mut Grads, x: &Tensor, acts: &VaeAttentionActivations, dy: &Tensor, alloc: &mut dyn Allocator) -> Result<Tensor> {
        let norm_params = self.group_norm.as_ref().expect("vae_forward checked the GroupNorm");
        let s = x.shape();
        let (b, c, l) = (s[0], s[1], s[2]);
        let mut dprojected = alloc.alloc(&[b, l, c], dy.dtype())?;
        transpose_last2(dy, &mut dprojected)?;
        let mut dout = alloc.alloc(&[b, l, c], dy.dtype())?;
        layers::linear_back(p, g, &self.to_out, acts.core.out(), &dprojected, Some(&mut dout))?;
        let mut dq = alloc.alloc(&[b, l, c], dy.dtype())?;
        let mut dk = alloc.alloc(&[b, l, c], dy.dtype())?;
        let mut dv = alloc.alloc(&[b, l, c], dy.dtype())?;
        let qkv = Qkv { q: &acts.q, k: &acts.k, v: &acts.v };
        match &acts.core {
            AttentionCore::Fused { out, lse } => {
                let mut delta = alloc.alloc(&[b, 1, l], DType::F32)?;
                attention_backward(AttentionSpec::new(1), qkv, out, lse, &dout, &mut delta, QkvGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv })?;
            }
            AttentionCore::Unfused { probs, .. } => {
                let mut dprobs = alloc.alloc(&[b, l, l], dy.dtype())?;
                matmul(&dout, &acts.v, &mut dprobs, MatmulSpec { trans_b: true, ..MatmulSpec::default() })?;
                matmul(probs, &dout, &mut dv, MatmulSpec { trans_a: true, ..MatmulSpec::default() })?;
                let mut dscores = alloc.alloc(&[b, l, l], dy.dtype())?;
                softmax_backward(probs, &dprobs, vae_attention_scale(c), &mut dscores)?;
                matmul(&dscores, &acts.k, &mut dq, MatmulSpec::default())?;
                matmul(&dscores, &acts.q, &mut dk, MatmulSpec { trans_a: true, ..MatmulSpec::default() })?;
            }
        }
        // The three projections read the same tokens: their input gradients sum in one [B·L, C] buffer.
        let mut dtokens = alloc.alloc(&[b * l, c], dy.dtype())?;
        let accumulate = MatmulSpec { accumulate: true, ..MatmulSpec::default() };
        for (proj, d, first) in [(&self.to_q, dq, true), (&self.to_k, dk, false), (&self.to_v, dv, false)] {
            layers::linear_back(p, g, proj, &acts.tokens, &d, None)?;
            let spec = if first { MatmulSpec::default() } else { accumulate };
            matmul(&d.reshape(&[b * l, c])?, p.get(proj.weight), &mut dtokens, spec)?;
        }
        let mut dnormed = alloc.alloc(&[b, c, l], dy.dtype())?;
        transpose_last2(&dtokens.reshape(&[b, l, c])?, &mut dnormed)?;
        let dmain = layers::group_norm_back(p, g, norm_params, false, x, &acts.norm, &dnormed, alloc)?;
        let mut dx = alloc.alloc(s, dy.dtype())?;
        add(&dmain, dy, &mut dx)?;
        Ok(dx)
    }
}

/// diffusers' score scale for one head of dimension `channels`.
fn vae_attention_scale(channels: usize) -> f32 {
    1.0 / (channels as f32).sqrt()
}

/// A chain of resnets, each input kept for the backward.
pub struct ResnetChainActivations {
    inputs: Vec<Tensor>,
    resnets: Vec<ResnetActivations>,
}

/// Runs `resnets` in order from `x`; the activations keep every resnet's input but the first (`x`, the
/// caller's).
fn resnet_chain_forward(resnets: &[ResnetBlock], p: &ParamStore, x: &Tensor, temb: Option<&Tensor>, alloc: &mut dyn Allocator) -> Result<(Tensor, ResnetChainActivations)> {
    let mut chain = ResnetChainActivations { inputs: Vec::new(), resnets: Vec::new() };
    let mut h: Option<Tensor> = None;
    for (i, r) in resnets.iter().enumerate() {
        let input = h.as_ref().unwrap_or(x);
        let (y, acts) = r.forward(p, input, temb, alloc).with_context(|| format!("resnets.{i}"))?;
        chain.resnets.push(acts);
        chain.inputs.extend(h.replace(y));
        if !alloc.keeps_activations() {
            chain.inputs.iter_mut().for_each(Tensor::discard);
        }
    }
    let y = h.ok_or_else(|| anyhow!("a block needs at least one resnet"))?;
    Ok((y, chain))
}

/// Backward of [`resnet_chain_forward`]: returns dx and the summed dtemb.
fn resnet_chain_backward(
    resnets: &[ResnetBlock],
    p: &ParamStore,
    g: &mut Grads,
    x: &Tensor,
    temb: Option<&Tensor>,
    chain: &ResnetChainActivations,
    dy: &Tensor,
    alloc: &mut dyn Allocator,
) -> Result<(Tensor, Option<Tensor>)> {
    let mut d: Option<Tensor> = None;
    let mut dtemb: Option<Tensor> = None;
    for (i, r) in resnets.iter().enumerate().rev() {
        let input = if i == 0 { x } else { &chain.inputs[i - 1] };
        let upstream = d.as_ref().unwrap_or(dy);
        let (dx, dt) = r.backward(p, g, input, temb, &chain.resnets[i], upstream, alloc).with_context(|| format!("resnets.{i} backward"))?;
        d = Some(dx);
        dtemb = match (dtemb, dt) {
            (Some(sum), Some(dt)) => {
                let mut total = alloc.alloc(sum.shape(), sum.dtype())?;
                add(&sum, &dt, &mut total)?;
                Some(total)
            }
            (sum, dt) => sum.or(dt),
        };
    }
    Ok((d.ok_or_else(|| anyhow!("a block needs at least one resnet"))?, dtemb))
}

/// What [`MidBlock::vae_backward`] reads.
pub struct VaeMidActivations {
    resnet0: ResnetActivations,
    /// resnet 0's output as [B, C, H·W], the attention's input.
    attention_input: Tensor,
    attention: VaeAttentionActivations,
    /// The attention's output as [B, C, H, W], resnet 1's input.
    resnet1_input: Tensor,
    resnet1: ResnetActivations,
}

impl MidBlock {
    /// The VAE's mid block (`UNetMidBlock2D` without time embedding): resnet, spatial attention, resnet.
    pub fn vae_forward(&self, p: &ParamStore, x: &Tensor, alloc: &mut dyn Allocator) -> Result<(Tensor, VaeMidActivations)> {
        let (Some(attention), [r0, r1], true) = (&self.vae_attention, &self.resnets[..], self.attentions.is_empty()) else {
            bail!("mid block: the VAE path needs two resnets and the VAE attention");
        };
        let shape = x.shape().to_vec();
        let (h0, resnet0) = r0.forward(p, x, None, alloc).context("resnets.0")?;
        let attention_input = h0.reshape(&[shape[0], shape[1], shape[2] * shape[3]])?;
        let fused = attention.head_dim <= MAX_HEAD_DIM;
        let (h1, attention_acts) = attention.vae_forward(p, &attention_input, fused, alloc).context("attentions.0")?;
        let resnet1_input = h1.reshape(&shape)?;
        let (y, resnet1) = r1.forward(p, &resnet1_input, None, alloc).context("resnets.1")?;
        let mut acts = VaeMidActivations { resnet0, attention_input, attention: attention_acts, resnet1_input, resnet1 };
        if !alloc.keeps_activations() {
            acts.attention_input.discard();
            acts.resnet1_input.discard();
        }
        Ok((y, acts))
    }

    /// Backward of [`MidBlock::vae_forward`]: returns dx, adds every parameter gradient.
    pub fn vae_backward(&self, p: &ParamStore, g: &mut Grads, x: &Tensor, acts: &VaeMidActivations, dy: &Tensor, alloc: &mut dyn Allocator) -> Result<Tensor> {
        let attention = self.vae_attention.as_ref().expect("vae_forward checked the attention");
        let (d1, _) = self.resnets[1].backward(p, g, &acts.resnet1_input, None, &acts.resnet1, dy, alloc).context("resnets.1 backward")?;
        let shape = d1.shape().to_vec();
        let d1 = d1.reshape(acts.attention_input.shape())?;
        let da = attention.vae_backward(p, g, &acts.attention_input, &acts.attention, &d1, alloc).context("attentions.0 backward")?;
        let (dx, _) = self.resnets[0].backward(p, g, x, None, &acts.resnet0, &da.reshape(&shape)?, alloc).context("resnets.0 backward")?;
        Ok(dx)
    }
}

/// What [`DownBlock::backward`] reads: the resnets' activations and the downsampler's input.
pub struct DownActivations {
    resnets: ResnetChainActivations,
    downsampler_input: Option<Tensor>,
}

impl DownBlock {
    /// A down block without transformers (`DownEncoderBlock2D`, or `DownBlock2D` with `temb`): resnets, then
    /// the downsampler if any.
    pub fn forward(&self, p: &ParamStore, x: &Tensor, temb: Option<&Tensor>, alloc: &mut dyn Allocator) -> Result<(Tensor, DownActivations)> {
        ensure!(self.attentions.is_empty(), "down block: this path runs blocks without transformers");
        let (h, resnets) = resnet_chain_forward(&self.resnets, p, x, temb, alloc)?;
        match &self.downsampler {
            Some(conv) => {
                let y = layers::conv(p, conv, &h, alloc).context("downsamplers.0")?;
                let mut h = h;
                if !alloc.keeps_activations() {
                    h.discard();
                }
                Ok((y, DownActivations { resnets, downsampler_input: Some(h) }))
            }
            None => Ok((h, DownActivations { resnets, downsampler_input: None })),
        }
    }

    /// Backward of [`DownBlock::forward`]: returns dx and, with a time embedding, dtemb.
    pub fn backward(
        &self,
        p: &ParamStore,
        g: &mut Grads,
        x: &Tensor,
        temb: Option<&Tensor>,
        acts: &DownActivations,
        dy: &Tensor,
        alloc: &mut dyn Allocator,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let dh = match (&self.downsampler, &acts.downsampler_input) {
            (Some(conv), Some(h)) => Some(layers::conv_back(p, g, conv, h, dy, alloc).context("downsamplers.0 backward")?),
            _ => None,
        };
        resnet_chain_backward(&self.resnets, p, g, x, temb, &acts.resnets, dh.as_ref().unwrap_or(dy), alloc)
    }
}

/// What [`UpBlock::decoder_backward`] reads: the resnets' activations and the upsampler conv's input.
pub struct UpActivations {
    resnets: ResnetChainActivations,
    upsampled: Option<Tensor>,
}

impl UpBlock {
    /// The VAE decoder's `UpDecoderBlock2D` (no skip connections): resnets, then nearest 2x and a 3x3 conv.
    pub fn decoder_forward(&self, p: &ParamStore, x: &Tensor, alloc: &mut dyn Allocator) -> Result<(Tensor, UpActivations)> {
        ensure!(self.attentions.is_empty(), "up block: the decoder path runs blocks without transformers");
        let (h, resnets) = resnet_chain_forward(&self.resnets, p, x, None, alloc)?;
        match &self.upsampler {
            Some(conv) => {
                let s = h.shape();
                let mut upsampled = alloc.alloc(&[s[0], s[1], 2 * s[2], 2 * s[3]], h.dtype())?;
                upsample_nearest2x(&h, &mut upsampled)?;
                let y = layers::conv(p, conv, &upsampled, alloc).context("upsamplers.0")?;
                if !alloc.keeps_activations() {
                    upsampled.discard();
                }
                Ok((y, UpActivations { resnets, upsampled: Some(upsampled) }))
            }
            None => Ok((h, UpActivations { resnets, upsampled: None })),
        }
    }

    /// Backward of [`UpBlock::decoder_forward`]: returns dx, adds every parameter gradient.
    pub fn decoder_backward(&self, p: &ParamStore, g: &mut Grads, x: &Tensor, acts: &UpActivations, dy: &Tensor, alloc: &mut dyn Allocator) -> Result<Tensor> {
        let dh = match (&self.upsampler, &acts.upsampled) {
            (Some(conv), Some(up)) => {
                let dup = layers::conv_back(p, g, conv, up, dy, alloc).context("upsamplers.0 backward")?;
                let s = dup.shape();
                let mut dh = alloc.alloc(&[s[0], s[1], s[2] / 2, s[3] / 2], dup.dtype())?;
                upsample_nearest2x_backward(&dup, &mut dh)?;
                Some(dh)
            }
            _ => None,
        };
        Ok(resnet_chain_backward(&self.resnets, p, g, x, None, &acts.resnets, dh.as_ref().unwrap_or(dy), alloc)?.0)
    }
}

/// `Attention`: multi-head attention with `to_q`, `to_k`, `to_v` and `to_out.0`. In transformer blocks the
/// q/k/v projections have no bias; in the VAE's mid block they do, and a GroupNorm comes first.
#[derive(Debug, Clone)]
pub struct Attention {
    pub group_norm: Option<Norm>,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
    pub heads: usize,
    pub head_dim: usize,
}

impl Attention {
    /// `query_dim` in and out, keys and values from `kv_dim` features (`query_dim` for self-attention).
    pub fn new(tree: &mut ParamTree, prefix: &str, query_dim: usize, kv_dim: usize, heads: usize, head_dim: usize, qkv_bias: bool) -> Attention {
        let inner = heads * head_dim;
        Attention {
            group_norm: None,
            to_q: Linear::new(tree, &join(prefix, "to_q"), query_dim, inner, qkv_bias),
            to_k: Linear::new(tree, &join(prefix, "to_k"), kv_dim, inner, qkv_bias),
            to_v: Linear::new(tree, &join(prefix, "to_v"), kv_dim, inner, qkv_bias),
            to_out: Linear::new(tree, &join(prefix, "to_out.0"), inner, query_dim, true),
            heads,
            head_dim,
        }
    }

    /// The AutoencoderKL's single-head spatial self-attention with its GroupNorm (eps as the VAE's).
    pub fn vae(tree: &mut ParamTree, prefix: &str, channels: usize, groups: usize, eps: f64) -> Result<Attention> {
        let group_norm = Norm::group(tree, &join(prefix, "group_norm"), groups, channels, eps)?;
        let mut a = Attention::new(tree, prefix, channels, channels, 1, channels, true);
        a.group_norm = Some(group_norm);
        Ok(a)
    }
}

/// `BasicTransformerBlock`: LayerNorm + self-attention, LayerNorm + cross-attention, LayerNorm + GEGLU
/// feed-forward (`ff.net.0.proj` [8C, C] split into value and gate halves, `ff.net.2` [C, 4C]).
#[derive(Debug, Clone)]
pub struct TransformerBlock {
    pub norm1: Norm,
    pub attn1: Attention,
    pub norm2: Norm,
    pub attn2: Attention,
    pub norm3: Norm,
    pub ff_proj: Linear,
    pub ff_out: Linear,
}

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

/// A LayerNorm's output and the statistics its backward needs ([rows] f32 each).
pub struct LayerNormActivations {
    pub output: Tensor,
    pub mean: Tensor,
    pub rstd: Tensor,
}

fn layer_norm_forward(norm: &Norm, params: &ParamStore, x: &Tensor, alloc: &mut dyn Allocator) -> Result<LayerNormActivations> {
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
fn layer_norm_backward(
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

fn sum(a: &Tensor, b: &Tensor, alloc: &mut dyn Allocator) -> Result<Tensor> {
    let mut y = alloc.alloc(a.shape(), a.dtype())?;
    ops::elementwise::add(a, b, &mut y)?;
    Ok(y)
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

/// What one transformer-variant [`Attention`]'s backward needs, and its output.
pub struct AttentionActivations {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    /// The fused attention's output (`to_out.0`'s input) and its per-row log-sum-exp [B, heads, Lq] (f32).
    pub attended: Tensor,
    pub lse: Tensor,
    pub output: Tensor,
}

impl Attention {
    fn spec(&self) -> ops::attention::AttentionSpec {
        ops::attention::AttentionSpec::new(self.heads)
    }

    /// Multi-head attention over token sequences: queries from `x` [B, Lq, query_dim], keys and values from
    /// `context` [B, Lk, kv_dim] (cross-attention) or from `x` itself (`None`: self-attention).
    pub fn sequence_forward(&self, params: &ParamStore, x: &Tensor, context: Option<&Tensor>, alloc: &mut dyn Allocator) -> Result<AttentionActivations> {
        ensure!(self.group_norm.is_none(), "Attention: the VAE's spatial attention does not run on token sequences");
        let kv_input = context.unwrap_or(x);
        let q = linear_layer_forward(&self.to_q, params, x, alloc)?;
        let k = linear_layer_forward(&self.to_k, params, kv_input, alloc)?;
        let v = linear_layer_forward(&self.to_v, params, kv_input, alloc)?;
        let mut attended = alloc.alloc(q.shape(), q.dtype())?;
        let mut lse = alloc.alloc(&[q.shape()[0], self.heads, q.shape()[1]], DType::F32)?;
        ops::attention::attention_forward(self.spec(), ops::attention::Qkv { q: &q, k: &k, v: &v }, &mut attended, &mut lse)?;
        let output = linear_layer_forward(&self.to_out, params, &attended, alloc)?;
        Ok(AttentionActivations { q, k, v, attended, lse, output })
    }

    /// Backward of [`Attention::sequence_forward`] with the same `x` and `context`: adds to the parameter
    /// gradients and returns (dx, dcontext). For self-attention dx includes the key and value paths and
    /// dcontext is `None`.
    pub fn sequence_backward(
        &self,
        params: &ParamStore,
        grads: &mut Grads,
        acts: &AttentionActivations,
        x: &Tensor,
        context: Option<&Tensor>,
        dy: &Tensor,
        alloc: &mut dyn Allocator,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let kv_input = context.unwrap_or(x);
        let dattended = linear_layer_backward(&self.to_out, params, grads, &acts.attended, dy, alloc)?;
        let mut dq = alloc.alloc(acts.q.shape(), acts.q.dtype())?;
        let mut dk = alloc.alloc(acts.k.shape(), acts.k.dtype())?;
        let mut dv = alloc.alloc(acts.v.shape(), acts.v.dtype())?;
        let mut delta = alloc.alloc(acts.lse.shape(), DType::F32)?;
        ops::attention::attention_backward(
            self.spec(),
            ops::attention::Qkv { q: &acts.q, k: &acts.k, v: &acts.v },
            &acts.attended,
            &acts.lse,
            &dattended,
            &mut delta,
            ops::attention::QkvGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv },
        )?;
        let dx = linear_layer_backward(&self.to_q, params, grads, x, &dq, alloc)?;
        let dkv_k = linear_layer_backward(&self.to_k, params, grads, kv_input, &dk, alloc)?;
        let dkv_v = linear_layer_backward(&self.to_v, params, grads, kv_input, &dv, alloc)?;
        let dkv = sum(&dkv_k, &dkv_v, alloc)?;
        match context {
            Some(_) => Ok((dx, Some(dkv))),
            None => Ok((sum(&dx, &dkv, alloc)?, None)),
        }
    }
}

/// What one [`TransformerBlock`]'s backward needs, and its output (tokens [B, L, C]).
pub struct TransformerBlockActivations {
    pub norm1: LayerNormActivations,
    pub attn1: AttentionActivations,
    /// The tokens after the self-attention residual (norm2's input) and after the cross-attention residual
    /// (norm3's input).
    pub after_attn1: Tensor,
    pub norm2: LayerNormActivations,
    pub attn2: AttentionActivations,
    pub after_attn2: Tensor,
    pub norm3: LayerNormActivations,
    /// `ff.net.0.proj`'s output [.., 8C] and the GEGLU of it [.., 4C].
    pub ff_hidden: Tensor,
    pub ff_gated: Tensor,
    pub output: Tensor,
}

impl TransformerBlock {
    /// `x` [B, L, C] tokens, `context` [B, Lc, cross_attention_dim].
    pub fn forward(&self, params: &ParamStore, x: &Tensor, context: &Tensor, alloc: &mut dyn Allocator) -> Result<TransformerBlockActivations> {
        let norm1 = layer_norm_forward(&self.norm1, params, x, alloc)?;
        let attn1 = self.attn1.sequence_forward(params, &norm1.output, None, alloc)?;
        let after_attn1 = sum(&attn1.output, x, alloc)?;
        let norm2 = layer_norm_forward(&self.norm2, params, &after_attn1, alloc)?;
        let attn2 = self.attn2.sequence_forward(params, &norm2.output, Some(context), alloc)?;
        let after_attn2 = sum(&attn2.output, &after_attn1, alloc)?;
        let norm3 = layer_norm_forward(&self.norm3, params, &after_attn2, alloc)?;
        let ff_hidden = linear_layer_forward(&self.ff_proj, params, &norm3.output, alloc)?;
        let mut gated_shape = ff_hidden.shape().to_vec();
        *gated_shape.last_mut().unwrap() /= 2;
        let mut ff_gated = alloc.alloc(&gated_shape, ff_hidden.dtype())?;
        ops::elementwise::geglu_forward(&ff_hidden, &mut ff_gated)?;
        let ff_out = linear_layer_forward(&self.ff_out, params, &ff_gated, alloc)?;
        let output = sum(&ff_out, &after_attn2, alloc)?;
        Ok(TransformerBlockActivations { norm1, attn1, after_attn1, norm2, attn2, after_attn2, norm3, ff_hidden, ff_gated, output })
    }

    /// Backward of [`TransformerBlock::forward`] with the same `x` and `context`: adds to the parameter
    /// gradients and returns (dx, dcontext).
    pub fn backward(
        &self,
        params: &ParamStore,
        grads: &mut Grads,
        acts: &TransformerBlockActivations,
        x: &Tensor,
        context: &Tensor,
        dy: &Tensor,
        alloc: &mut dyn Allocator,
    ) -> Result<(Tensor, Tensor)> {
        let dgated = linear_layer_backward(&self.ff_out, params, grads, &acts.ff_gated, dy, alloc)?;
        let mut dhidden = alloc.alloc(acts.ff_hidden.shape(), acts.ff_hidden.dtype())?;
        ops::elementwise::geglu_backward(&acts.ff_hidden, &dgated, &mut dhidden)?;
        let dnorm3 = linear_layer_backward(&self.ff_proj, params, grads, &acts.norm3.output, &dhidden, alloc)?;
        let dnorm3_in = layer_norm_backward(&self.norm3, params, grads, &acts.norm3, &acts.after_attn2, &dnorm3, alloc)?;
        let dafter_attn2 = sum(dy, &dnorm3_in, alloc)?;

        let (dnorm2, dcontext) = self.attn2.sequence_backward(params, grads, &acts.attn2, &acts.norm2.output, Some(context), &dafter_attn2, alloc)?;
        let dnorm2_in = layer_norm_backward(&self.norm2, params, grads, &acts.norm2, &acts.after_attn1, &dnorm2, alloc)?;
        let dafter_attn1 = sum(&dafter_attn2, &dnorm2_in, alloc)?;

        let (dnorm1, _) = self.attn1.sequence_backward(params, grads, &acts.attn1, &acts.norm1.output, None, &dafter_attn1, alloc)?;
        let dnorm1_in = layer_norm_backward(&self.norm1, params, grads, &acts.norm1, x, &dnorm1, alloc)?;
        let dx = sum(&dafter_attn1, &dnorm1_in, alloc)?;
        Ok((dx, dcontext.expect("cross-attention returns a context gradient")))
    }
}

impl Projection {
    /// A 1x1 conv over `x` [B, C, H, W], or a Linear over tokens `x` [B, HW, C].
    pub fn forward(&self, params: &ParamStore, x: &Tensor, alloc: &mut dyn Allocator) -> Result<Tensor> {
        match self {
            Projection::Linear(l) => linear_layer_forward(l, params, x, alloc),
            Projection::Conv(c) => {
                let &[b, channels, h, w] = x.shape() else { bail!("Transformer2DModel projection: input {:?} is not [B, C, H, W]", x.shape()) };
                ensure!(c.kernel == 1 && channels == c.input, "Transformer2DModel projection: a 1x1 conv from {} channels cannot take {:?}", c.input, x.shape());
                let mut y = alloc.alloc(&[b, c.output, h, w], x.dtype())?;
                ops::conv::conv2d_forward(x, params.get(c.weight), c.bias.map(|id| params.get(id)), c.spec, &mut y)?;
                Ok(y)
            }
        }
    }

    /// Backward of [`Projection::forward`] with the same `x`: adds to the parameter gradients, returns dx.
    pub fn backward(&self, params: &ParamStore, grads: &mut Grads, x: &Tensor, dy: &Tensor, alloc: &mut dyn Allocator) -> Result<Tensor> {
        match self {
            Projection::Linear(l) => Ok(linear_layer_backward(l, params, grads, x, dy, alloc)?),
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
        ensure!(channels == self.norm.channels, "Transformer2DModel: input {:?} has {channels} channels, the model {}", x.shape(), self.norm.channels);
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
            let b = block.forward(params, acts.block_input(l), context, alloc).with_context(|| format!("Transformer2DModel transformer_blocks.{l}"))?;
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
                let dnormed_tokens = self.proj_in.backward(params, grads, &acts.proj_in_input, &dtokens, alloc).context("Transformer2DModel proj_in")?;
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


/// A down block: resnets, optional transformers after each, and an optional stride-2 downsampler.
#[derive(Debug, Clone)]
pub struct DownBlock {
    pub resnets: Vec<ResnetBlock>,
    pub attentions: Vec<Transformer2d>,
    pub downsampler: Option<Conv2d>,
}

/// An up block: `layers_per_block + 1` resnets fed with skip connections, optional transformers, and an
/// optional nearest-2x upsampler followed by a 3x3 conv.
#[derive(Debug, Clone)]
pub struct UpBlock {
    pub resnets: Vec<ResnetBlock>,
    pub attentions: Vec<Transformer2d>,
    pub upsampler: Option<Conv2d>,
}

/// The mid block: resnet, (attention, resnet) — cross-attention transformers in the UNet, the single-head
/// spatial attention in the VAE.
#[derive(Debug, Clone)]
pub struct MidBlock {
    pub resnets: Vec<ResnetBlock>,
    pub attentions: Vec<Transformer2d>,
    pub vae_attention: Option<Attention>,
}

/// Downsampler conv: the UNet pads 1 on every side; the VAE pads (0, 1, 0, 1) explicitly and convolves with
/// padding 0.
pub fn downsampler(tree: &mut ParamTree, prefix: &str, channels: usize, vae: bool) -> Conv2d {
    let spec = if vae { Conv2dSpec::VAE_DOWNSAMPLE } else { Conv2dSpec::new(2, 1) };
    Conv2d::new(tree, &join(prefix, "downsamplers.0.conv"), channels, channels, 3, spec, true)
}

pub fn upsampler(tree: &mut ParamTree, prefix: &str, channels: usize) -> Conv2d {
    Conv2d::k3(tree, &join(prefix, "upsamplers.0.conv"), channels, channels, 1)
}

/// The gradients of the time embedding and of the cross-attention context, each summed over every resnet or
/// transformer of a UNet that read it.
#[derive(Default)]
pub struct SharedGrads {
    pub dtemb: Option<Tensor>,
    pub dcontext: Option<Tensor>,
}

fn accumulate(slot: &mut Option<Tensor>, d: Option<Tensor>, alloc: &mut dyn Allocator) -> Result<()> {
    if let Some(d) = d {
        *slot = Some(match slot.take() {
            Some(total) => sum(&total, &d, alloc)?,
            None => d,
        });
    }
    Ok(())
}

/// A UNet layer's output: a resnet's, or the transformer's that follows it in cross-attention blocks.
enum LayerOutput {
    Resnet(Tensor),
    /// The resnet's output is the transformer's input; the transformer's activations hold the layer's output.
    Attention { resnet_output: Tensor, attention: Box<Transformer2dActivations> },
}

/// What one UNet layer (a resnet and its transformer, if any) keeps for the backward.
pub struct UNetLayerActivations {
    resnet: ResnetActivations,
    output: LayerOutput,
}

impl UNetLayerActivations {
    fn discard_output(&mut self) {
        match &mut self.output {
            LayerOutput::Resnet(y) => y.discard(),
            LayerOutput::Attention { attention, .. } => attention.output.discard(),
        }
    }

    pub fn output(&self) -> &Tensor {
        match &self.output {
            LayerOutput::Resnet(y) => y,
            LayerOutput::Attention { attention, .. } => &attention.output,
        }
    }
}

fn unet_layer_forward(
    resnet: &ResnetBlock,
    attention: Option<&Transformer2d>,
    p: &ParamStore,
    x: &Tensor,
    temb: &Tensor,
    context: &Tensor,
    alloc: &mut dyn Allocator,
) -> Result<UNetLayerActivations> {
    let (h, resnet_acts) = resnet.forward(p, x, Some(temb), alloc)?;
    let output = match attention {
        Some(t) => {
            let attention = Box::new(t.forward(p, &h, context, alloc)?);
            let mut resnet_output = h;
            if !alloc.keeps_activations() {
                resnet_output.discard();
            }
            LayerOutput::Attention { attention, resnet_output }
        }
        None => LayerOutput::Resnet(h),
    };
    Ok(UNetLayerActivations { resnet: resnet_acts, output })
}

fn unet_layer_backward(
    resnet: &ResnetBlock,
    attention: Option<&Transformer2d>,
    p: &ParamStore,
    g: &mut Grads,
    x: &Tensor,
    temb: &Tensor,
    context: &Tensor,
    acts: &UNetLayerActivations,
    dy: &Tensor,
    shared: &mut SharedGrads,
    alloc: &mut dyn Allocator,
) -> Result<Tensor> {
    let dattention = match (attention, &acts.output) {
        (Some(t), LayerOutput::Attention { resnet_output, attention }) => {
            let d = t.backward(p, g, attention, resnet_output, context, dy, alloc)?;
            accumulate(&mut shared.dcontext, Some(d.dcontext), alloc)?;
            Some(d.dx)
        }
        (None, LayerOutput::Resnet(_)) => None,
        _ => bail!("UNet layer backward: the transformer does not match the forward's"),
    };
    let (dx, dtemb) = resnet.backward(p, g, x, Some(temb), &acts.resnet, dattention.as_ref().unwrap_or(dy), alloc)?;
    accumulate(&mut shared.dtemb, dtemb, alloc)?;
    Ok(dx)
}

/// What [`DownBlock::unet_backward`] reads; also holds the block's skip connections.
pub struct UNetDownActivations {
    layers: Vec<UNetLayerActivations>,
    downsampled: Option<Tensor>,
}

impl UNetDownActivations {
    /// The block's skip connections in order: every layer's output, then the downsampler's. The last one is
    /// the block's output.
    pub fn skips(&self) -> Vec<&Tensor> {
        self.layers.iter().map(UNetLayerActivations::output).chain(self.downsampled.as_ref()).collect()
    }

    pub fn output(&self) -> &Tensor {
        self.downsampled.as_ref().unwrap_or_else(|| self.layers.last().expect("a block has resnets").output())
    }
}

impl DownBlock {
    /// `DownBlock2D` / `CrossAttnDownBlock2D`: each resnet (with `temb` [N, temb_channels]), then its
    /// transformer over `context` [N, L, cross_attention_dim] in cross-attention blocks; then the downsampler.
    pub fn unet_forward(&self, p: &ParamStore, x: &Tensor, temb: &Tensor, context: &Tensor, alloc: &mut dyn Allocator) -> Result<UNetDownActivations> {
        ensure!(
            self.attentions.is_empty() || self.attentions.len() == self.resnets.len(),
            "down block: {} transformers for {} resnets",
            self.attentions.len(),
            self.resnets.len()
        );
        let mut layers: Vec<UNetLayerActivations> = Vec::new();
        for (l, resnet) in self.resnets.iter().enumerate() {
            let input = layers.last().map_or(x, UNetLayerActivations::output);
            let acts = unet_layer_forward(resnet, self.attentions.get(l), p, input, temb, context, alloc).with_context(|| format!("layer {l}"))?;
            layers.push(acts);
        }
        let last = layers.last().ok_or_else(|| anyhow!("a block needs at least one resnet"))?.output();
        let downsampled = self.downsampler.as_ref().map(|conv| layers::conv(p, conv, last, alloc).context("downsamplers.0")).transpose()?;
        Ok(UNetDownActivations { layers, downsampled })
    }

    /// Backward of [`DownBlock::unet_forward`] from `dskips`, the gradient reaching each skip connection from
    /// outside the block (for the last one, the skip's and the next block's together): returns dx, adds
    /// every parameter gradient and the time embedding's and context's gradients to `shared`.
    pub fn unet_backward(
        &self,
        p: &ParamStore,
        g: &mut Grads,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        acts: &UNetDownActivations,
        dskips: &[&Tensor],
        shared: &mut SharedGrads,
        alloc: &mut dyn Allocator,
    ) -> Result<Tensor> {
        let n = acts.layers.len();
        ensure!(dskips.len() == acts.skips().len(), "down block backward: {} skip gradients for {} skips", dskips.len(), acts.skips().len());
        // The gradient from inside the block into the current layer's output; the skip's is added to it.
        let mut carried = match &self.downsampler {
            Some(conv) => Some(layers::conv_back(p, g, conv, acts.layers[n - 1].output(), dskips[n], alloc).context("downsamplers.0 backward")?),
            None => None,
        };
        for (l, resnet) in self.resnets.iter().enumerate().rev() {
            let total;
            let dy = match carried.take() {
                Some(c) => {
                    total = sum(&c, dskips[l], alloc)?;
                    &total
                }
                None => dskips[l],
            };
            let input = if l == 0 { x } else { acts.layers[l - 1].output() };
            let attention = self.attentions.get(l);
            let dx = unet_layer_backward(resnet, attention, p, g, input, temb, context, &acts.layers[l], dy, shared, alloc)
                .with_context(|| format!("layer {l} backward"))?;
            carried = Some(dx);
        }
        carried.ok_or_else(|| anyhow!("a block needs at least one resnet"))
    }
}

/// What [`UpBlock::unet_backward`] reads.
pub struct UNetUpActivations {
    /// Each resnet's input: the hidden state and its skip connection concatenated on channels.
    inputs: Vec<Tensor>,
    layers: Vec<UNetLayerActivations>,
    /// The upsampler's nearest-2x map (its conv's input) and the conv's output.
    upsampled: Option<(Tensor, Tensor)>,
}

impl UNetUpActivations {
    pub fn output(&self) -> &Tensor {
        match &self.upsampled {
            Some((_, y)) => y,
            None => self.layers.last().expect("a block has resnets").output(),
        }
    }
}

impl UpBlock {
    /// `UpBlock2D` / `CrossAttnUpBlock2D`: each resnet takes `cat([hidden, skip], dim=1)` with the next of
    /// `skips` (in the order consumed: the most recent skip first), then its transformer in cross-attention
    /// blocks; then nearest 2x and the upsampler conv.
    pub fn unet_forward(&self, p: &ParamStore, x: &Tensor, skips: &[&Tensor], temb: &Tensor, context: &Tensor, alloc: &mut dyn Allocator) -> Result<UNetUpActivations> {
        ensure!(skips.len() == self.resnets.len(), "up block: {} skips for {} resnets", skips.len(), self.resnets.len());
        ensure!(
            self.attentions.is_empty() || self.attentions.len() == self.resnets.len(),
            "up block: {} transformers for {} resnets",
            self.attentions.len(),
            self.resnets.len()
        );
        let mut inputs = Vec::new();
        let mut layers: Vec<UNetLayerActivations> = Vec::new();
        for (l, (resnet, skip)) in self.resnets.iter().zip(skips).enumerate() {
            let hidden = layers.last().map_or(x, UNetLayerActivations::output);
            let (h, s) = (hidden.shape(), skip.shape());
            ensure!(
                h.len() == 4 && s.len() == 4 && h[0] == s[0] && h[2..] == s[2..] && h[1] + s[1] == resnet.norm1.channels,
                "up block layer {l}: hidden {h:?} and skip {s:?} do not concatenate into the resnet's {} channels",
                resnet.norm1.channels
            );
            let mut input = alloc.alloc(&[h[0], h[1] + s[1], h[2], h[3]], hidden.dtype())?;
            ops::shape::concat_channels(hidden, skip, &mut input)?;
            let acts = unet_layer_forward(resnet, self.attentions.get(l), p, &input, temb, context, alloc).with_context(|| format!("layer {l}"))?;
            inputs.push(input);
            if !alloc.keeps_activations() {
                // The concatenation and the previous layer's output were this layer's inputs only.
                inputs.iter_mut().for_each(Tensor::discard);
                if let Some(previous) = layers.last_mut() {
                    previous.discard_output();
                }
            }
            layers.push(acts);
        }
        let upsampled = match &self.upsampler {
            Some(conv) => {
                let h = layers.last().expect("checked against the skips").output();
                let s = h.shape();
                let mut up = alloc.alloc(&[s[0], s[1], 2 * s[2], 2 * s[3]], h.dtype())?;
                upsample_nearest2x(h, &mut up)?;
                let y = layers::conv(p, conv, &up, alloc).context("upsamplers.0")?;
                let mut up = up;
                if !alloc.keeps_activations() {
                    up.discard();
                    layers.last_mut().expect("checked against the skips").discard_output();
                }
                Some((up, y))
            }
            None => None,
        };
        Ok(UNetUpActivations { inputs, layers, upsampled })
    }

    /// Backward of [`UpBlock::unet_forward`] with the same `x`: returns dx and the skips' gradients (in the
    /// order consumed), adds every parameter gradient and the time embedding's and context's to `shared`.
    pub fn unet_backward(
        &self,
        p: &ParamStore,
        g: &mut Grads,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        acts: &UNetUpActivations,
        dy: &Tensor,
        shared: &mut SharedGrads,
        alloc: &mut dyn Allocator,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut d = match (&self.upsampler, &acts.upsampled) {
            (Some(conv), Some((up, _))) => {
                let dup = layers::conv_back(p, g, conv, up, dy, alloc).context("upsamplers.0 backward")?;
                let s = dup.shape();
                let mut dh = alloc.alloc(&[s[0], s[1], s[2] / 2, s[3] / 2], dup.dtype())?;
                upsample_nearest2x_backward(&dup, &mut dh)?;
                Some(dh)
            }
            (None, None) => None,
            _ => bail!("up block backward: the upsampler does not match the forward's"),
        };
        let mut dskips = Vec::new();
        for (l, resnet) in self.resnets.iter().enumerate().rev() {
            let upstream = d.as_ref().unwrap_or(dy);
            let attention = self.attentions.get(l);
            let dinput = unet_layer_backward(resnet, attention, p, g, &acts.inputs[l], temb, context, &acts.layers[l], upstream, shared, alloc)
                .with_context(|| format!("layer {l} backward"))?;
            let hidden = if l == 0 { x } else { acts.layers[l - 1].output() };
            let s = dinput.shape();
            let mut dhidden = alloc.alloc(hidden.shape(), dinput.dtype())?;
            let mut dskip = alloc.alloc(&[s[0], s[1] - hidden.shape()[1], s[2], s[3]], dinput.dtype())?;
            ops::shape::split_channels(&dinput, &mut dhidden, &mut dskip)?;
            d = Some(dhidden);
            dskips.push(dskip);
        }
        dskips.reverse();
        Ok((d.ok_or_else(|| anyhow!("a block needs at least one resnet"))?, dskips))
    }
}

/// What [`MidBlock::unet_backward`] reads.
pub struct UNetMidActivations {
    resnet0: ResnetActivations,
    /// resnet 0's output, the transformer's input; the transformer's output is resnet 1's input.
    hidden: Tensor,
    attention: Transformer2dActivations,
    resnet1: ResnetActivations,
    pub output: Tensor,
}

impl MidBlock {
    fn unet_parts(&self) -> Result<(&ResnetBlock, &Transformer2d, &ResnetBlock)> {
        match (&self.resnets[..], &self.attentions[..], &self.vae_attention) {
            ([r0, r1], [t], None) => Ok((r0, t, r1)),
            _ => bail!("mid block: UNetMidBlock2DCrossAttn needs two resnets and one transformer"),
        }
    }

    /// `UNetMidBlock2DCrossAttn`: resnet, transformer over `context`, resnet.
    pub fn unet_forward(&self, p: &ParamStore, x: &Tensor, temb: &Tensor, context: &Tensor, alloc: &mut dyn Allocator) -> Result<UNetMidActivations> {
        let (r0, t, r1) = self.unet_parts()?;
        let (hidden, resnet0) = r0.forward(p, x, Some(temb), alloc).context("resnets.0")?;
        let attention = t.forward(p, &hidden, context, alloc).context("attentions.0")?;
        let (output, resnet1) = r1.forward(p, &attention.output, Some(temb), alloc).context("resnets.1")?;
        let (mut hidden, mut attention) = (hidden, attention);
        if !alloc.keeps_activations() {
            hidden.discard();
            attention.output.discard();
        }
        Ok(UNetMidActivations { resnet0, hidden, attention, resnet1, output })
    }

    /// Backward of [`MidBlock::unet_forward`]: returns dx, adds every parameter gradient and the time
    /// embedding's and context's gradients to `shared`.
    pub fn unet_backward(
        &self,
        p: &ParamStore,
        g: &mut Grads,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        acts: &UNetMidActivations,
        dy: &Tensor,
        shared: &mut SharedGrads,
        alloc: &mut dyn Allocator,
    ) -> Result<Tensor> {
        let (r0, t, r1) = self.unet_parts()?;
        let (dattention, dtemb) = r1.backward(p, g, &acts.attention.output, Some(temb), &acts.resnet1, dy, alloc).context("resnets.1 backward")?;
        accumulate(&mut shared.dtemb, dtemb, alloc)?;
        let d = t.backward(p, g, &acts.attention, &acts.hidden, context, &dattention, alloc).context("attentions.0 backward")?;
        accumulate(&mut shared.dcontext, Some(d.dcontext), alloc)?;
        let (dx, dtemb) = r0.backward(p, g, x, Some(temb), &acts.resnet0, &d.dx, alloc).context("resnets.0 backward")?;
        accumulate(&mut shared.dtemb, dtemb, alloc)?;
        Ok(dx)
    }
}
