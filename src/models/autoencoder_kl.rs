//! `AutoencoderKL`: configuration and module tree (encoder, quant convs, decoder), named as diffusers names
//! them. The mid-block attention's historical names (`query`, `key`, `value`, `proj_attn`) are accepted as
//! aliases when weights are loaded.

use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{json, Value};

use crate::models::attention::Attention;
use crate::models::config::ConfigReader;
use crate::models::layers::{self, GroupNormActivations};
use crate::models::resnet::{downsampler, upsampler, ResnetActivations, ResnetBlock};
use crate::nn::{join, Allocator, Conv2d, Grads, Linear, Norm, ParamStore, ParamTree};
use crate::ops::attention::{attention_backward, attention_forward, AttentionSpec, Qkv, QkvGrads, MAX_HEAD_DIM};
use crate::ops::elementwise::{add, add_scaled, fill, relu_backward, relu_forward};
use crate::ops::linear::{matmul, MatmulSpec};
use crate::ops::shape::{concat_channels, split_channels};
use crate::ops::shape::{transpose_last2, upsample_nearest2x, upsample_nearest2x_backward};
use crate::ops::softmax::{softmax_backward, softmax_forward};
use crate::tensor::{DType, Tensor};

/// The AutoencoderKL's GroupNorms use eps 1e-6 throughout.
const VAE_EPS: f64 = 1e-6;

#[derive(Debug, Clone, PartialEq)]
pub struct AutoencoderKlConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    /// SD's 0.18215: applied by the pipeline, not by the model.
    pub scaling_factor: f64,
}

impl AutoencoderKlConfig {
    pub fn from_json(path: &Path, value: &Value) -> Result<AutoencoderKlConfig> {
        AutoencoderKlConfig::read(&ConfigReader::new(path, value))
    }

    /// [`AutoencoderKlConfig::from_json`] for a configuration we write ourselves (a training TOML's table):
    /// a key it does not read, other than `also_known`, is refused by name.
    pub fn from_json_strict(path: &Path, value: &Value, also_known: &[&str]) -> Result<AutoencoderKlConfig> {
        let r = ConfigReader::new(path, value);
        let config = AutoencoderKlConfig::read(&r)?;
        r.refuse_unread(also_known)?;
        Ok(config)
    }

    fn read(r: &ConfigReader) -> Result<AutoencoderKlConfig> {
        let path = r.path.as_path();
        let boc = r.usizes("block_out_channels", &[64])?;
        ensure!(!boc.is_empty(), "{}: 'block_out_channels' is empty", path.display());
        for (key, kind) in [("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")] {
            let types = r.strings(key, &vec![kind; boc.len()])?;
            if types.len() != boc.len() || types.iter().any(|t| t != kind) {
                bail!("{}: '{key}' must be {} x {kind}", path.display(), boc.len());
            }
        }
        r.require("act_fn", &[Value::Null, json!("silu")], "only SiLU")?;
        r.require("mid_block_add_attention", &[Value::Null, json!(true)], "the mid block always has attention")?;
        r.require("use_quant_conv", &[Value::Null, json!(true)], "quant_conv is always present")?;
        r.require("use_post_quant_conv", &[Value::Null, json!(true)], "post_quant_conv is always present")?;
        let scaling_factor = r.f64("scaling_factor", 0.18215)?;
        ensure!(
            scaling_factor.is_finite() && scaling_factor > 0.0,
            "{}: 'scaling_factor' must be a positive number, got {scaling_factor}",
            path.display()
        );
        Ok(AutoencoderKlConfig {
            in_channels: r.usize("in_channels", 3)?,
            out_channels: r.usize("out_channels", 3)?,
            latent_channels: r.usize("latent_channels", 4)?,
            block_out_channels: boc,
            layers_per_block: r.usize("layers_per_block", 1)?,
            norm_num_groups: r.usize("norm_num_groups", 32)?,
            scaling_factor,
        })
    }
}

#[derive(Debug, Clone)]
pub struct VaeEncoder {
    pub conv_in: Conv2d,
    pub down: Vec<DownEncoderBlock>,
    pub mid: VaeMidBlock,
    pub conv_norm_out: Norm,
    pub conv_out: Conv2d,
}

#[derive(Debug, Clone)]
pub struct VaeDecoder {
    pub conv_in: Conv2d,
    pub mid: VaeMidBlock,
    pub up: Vec<UpDecoderBlock>,
    pub conv_norm_out: Norm,
    pub conv_out: Conv2d,
}

#[derive(Debug, Clone)]
pub struct AutoencoderKl {
    pub config: AutoencoderKlConfig,
    pub params: ParamTree,
    pub encoder: VaeEncoder,
    pub quant_conv: Conv2d,
    pub post_quant_conv: Conv2d,
    pub decoder: VaeDecoder,
}

fn mid_block(tree: &mut ParamTree, prefix: &str, channels: usize, groups: usize) -> Result<VaeMidBlock> {
    Ok(VaeMidBlock {
        resnets: [
            ResnetBlock::new(tree, &format!("{prefix}.resnets.0"), channels, channels, None, groups, VAE_EPS)?,
            ResnetBlock::new(tree, &format!("{prefix}.resnets.1"), channels, channels, None, groups, VAE_EPS)?,
        ],
        attention: VaeAttention::new(tree, &format!("{prefix}.attentions.0"), channels, groups, VAE_EPS)?,
    })
}

impl AutoencoderKl {
    pub fn new(config: AutoencoderKlConfig) -> Result<AutoencoderKl> {
        let mut t = ParamTree::new();
        let c = &config;
        let boc = &c.block_out_channels;
        let groups = c.norm_num_groups;
        let last = *boc.last().unwrap();
        let latent = c.latent_channels;

        let conv_in = Conv2d::k3(&mut t, "encoder.conv_in", c.in_channels, boc[0], 1);
        let mut down = Vec::new();
        let mut input = boc[0];
        for (i, &output) in boc.iter().enumerate() {
            let prefix = format!("encoder.down_blocks.{i}");
            let mut block = DownEncoderBlock { resnets: Vec::new(), downsampler: None };
            for l in 0..c.layers_per_block {
                let cin = if l == 0 { input } else { output };
                block.resnets.push(ResnetBlock::new(&mut t, &format!("{prefix}.resnets.{l}"), cin, output, None, groups, VAE_EPS)?);
            }
            if i + 1 < boc.len() {
                block.downsampler = Some(downsampler(&mut t, &prefix, output, true));
            }
            down.push(block);
            input = output;
        }
        let mid = mid_block(&mut t, "encoder.mid_block", last, groups)?;
        let encoder = VaeEncoder {
            conv_in,
            down,
            mid,
            conv_norm_out: Norm::group(&mut t, "encoder.conv_norm_out", groups, last, VAE_EPS)?,
            conv_out: Conv2d::k3(&mut t, "encoder.conv_out", last, 2 * latent, 1),
        };
        let quant_conv = Conv2d::k1(&mut t, "quant_conv", 2 * latent, 2 * latent);
        let post_quant_conv = Conv2d::k1(&mut t, "post_quant_conv", latent, latent);

        let conv_in = Conv2d::k3(&mut t, "decoder.conv_in", latent, last, 1);
        let mid = mid_block(&mut t, "decoder.mid_block", last, groups)?;
        let mut up = Vec::new();
        let mut prev = last;
        let rev: Vec<usize> = boc.iter().rev().copied().collect();
        for (i, &output) in rev.iter().enumerate() {
            let prefix = format!("decoder.up_blocks.{i}");
            let mut block = UpDecoderBlock { resnets: Vec::new(), upsampler: None };
            for l in 0..c.layers_per_block + 1 {
                let cin = if l == 0 { prev } else { output };
                block.resnets.push(ResnetBlock::new(&mut t, &format!("{prefix}.resnets.{l}"), cin, output, None, groups, VAE_EPS)?);
            }
            if i + 1 < rev.len() {
                block.upsampler = Some(upsampler(&mut t, &prefix, output));
            }
            up.push(block);
            prev = output;
        }
        let decoder = VaeDecoder {
            conv_in,
            mid,
            up,
            conv_norm_out: Norm::group(&mut t, "decoder.conv_norm_out", groups, boc[0], VAE_EPS)?,
            conv_out: Conv2d::k3(&mut t, "decoder.conv_out", boc[0], c.out_channels, 1),
        };
        Ok(AutoencoderKl { config, params: t, encoder, quant_conv, post_quant_conv, decoder })
    }
}

/// The pre-0.14 diffusers names of the VAE attention's projections, for loading old checkpoints:
/// (old suffix, current suffix).
pub const LEGACY_ATTENTION_NAMES: [(&str, &str); 4] = [("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0")];

/// diffusers' `DiagonalGaussianDistribution` clamps the log-variance to this range.
const LOGVAR_RANGE: (f32, f32) = (-30.0, 20.0);

/// `clamp(x, lo, hi)` from the ops at hand: `x1 = x - relu(x - hi)`, `y = x1 + relu(lo - x1)`. Inside the
/// range both ReLUs are exactly 0, so y is x bit for bit; the ReLUs' zero slope at 0 passes the gradient at
/// the bounds, as torch's clamp does.
struct ClampActivations {
    above: Tensor,
    below: Tensor,
}

fn clamp_forward(x: &Tensor, (lo, hi): (f32, f32), alloc: &mut dyn Allocator) -> Result<(Tensor, ClampActivations)> {
    let mut bound = alloc.alloc(x.shape(), x.dtype())?;
    fill(&mut bound, hi)?;
    let mut above = alloc.alloc(x.shape(), x.dtype())?;
    add_scaled(x, &bound, -1.0, &mut above)?;
    let mut excess = alloc.alloc(x.shape(), x.dtype())?;
    relu_forward(&above, &mut excess)?;
    let mut capped = alloc.alloc(x.shape(), x.dtype())?;
    add_scaled(x, &excess, -1.0, &mut capped)?;
    fill(&mut bound, lo)?;
    let mut below = alloc.alloc(x.shape(), x.dtype())?;
    add_scaled(&bound, &capped, -1.0, &mut below)?;
    relu_forward(&below, &mut excess)?;
    let mut y = alloc.alloc(x.shape(), x.dtype())?;
    add(&capped, &excess, &mut y)?;
    Ok((y, ClampActivations { above, below }))
}

fn clamp_backward(acts: &ClampActivations, dy: &Tensor, alloc: &mut dyn Allocator) -> Result<Tensor> {
    let mut masked = alloc.alloc(dy.shape(), dy.dtype())?;
    relu_backward(&acts.below, dy, &mut masked)?;
    let mut dcapped = alloc.alloc(dy.shape(), dy.dtype())?;
    add_scaled(dy, &masked, -1.0, &mut dcapped)?;
    relu_backward(&acts.above, &dcapped, &mut masked)?;
    let mut dx = alloc.alloc(dy.shape(), dy.dtype())?;
    add_scaled(&dcapped, &masked, -1.0, &mut dx)?;
    Ok(dx)
}

/// What [`AutoencoderKl::encode_backward`] reads.
pub struct EncoderActivations {
    conv_in: Tensor,
    down: Vec<DownEncoderActivations>,
    /// Each down block's output: the next block's (or the mid block's) input.
    down_outputs: Vec<Tensor>,
    mid: VaeMidActivations,
    mid_output: Tensor,
    norm_out: GroupNormActivations,
    conv_out: Tensor,
    logvar: ClampActivations,
}

/// What [`AutoencoderKl::decode_backward`] reads.
pub struct DecoderActivations {
    post_quant: Tensor,
    conv_in: Tensor,
    mid: VaeMidActivations,
    mid_output: Tensor,
    up: Vec<UpDecoderActivations>,
    /// Each up block's output: the next block's (or the output norm's) input.
    up_outputs: Vec<Tensor>,
    norm_out: GroupNormActivations,
}

impl AutoencoderKl {
    /// `encode(sample).latent_dist`: `sample` [B, in_channels, H, W] -> (mean, logvar), each
    /// [B, latent_channels, H / 2^(blocks-1), W / 2^(blocks-1)], logvar clamped to [-30, 20].
    pub fn encode(&self, p: &ParamStore, sample: &Tensor, alloc: &mut dyn Allocator) -> Result<(Tensor, Tensor, EncoderActivations)> {
        let s = sample.shape();
        ensure!(s.len() == 4 && s[1] == self.config.in_channels, "AutoencoderKL encode: sample {s:?} must be [B, {}, H, W]", self.config.in_channels);
        let e = &self.encoder;
        let conv_in = layers::conv(p, &e.conv_in, sample, alloc).context("AutoencoderKL encoder.conv_in")?;
        let mut down = Vec::new();
        let mut down_outputs: Vec<Tensor> = Vec::new();
        for (i, block) in e.down.iter().enumerate() {
            let x = down_outputs.last().unwrap_or(&conv_in);
            let (y, acts) = block.forward(p, x, alloc).with_context(|| format!("AutoencoderKL encoder.down_blocks.{i}"))?;
            down.push(acts);
            down_outputs.push(y);
        }
        let mid_input = down_outputs.last().expect("at least one block");
        let (mid_output, mid) = e.mid.forward(p, mid_input, alloc).context("AutoencoderKL encoder.mid_block")?;
        let norm_out = layers::group_norm(p, &e.conv_norm_out, true, &mid_output, alloc)?;
        let conv_out = layers::conv(p, &e.conv_out, &norm_out.y, alloc)?;
        let moments = layers::conv(p, &self.quant_conv, &conv_out, alloc)?;
        let m = moments.shape();
        let latent = [m[0], self.config.latent_channels, m[2], m[3]];
        let mut mean = alloc.alloc(&latent, moments.dtype())?;
        let mut raw_logvar = alloc.alloc(&latent, moments.dtype())?;
        split_channels(&moments, &mut mean, &mut raw_logvar)?;
        let (logvar, logvar_acts) = clamp_forward(&raw_logvar, LOGVAR_RANGE, alloc)?;
        let acts = EncoderActivations { conv_in, down, down_outputs, mid, mid_output, norm_out, conv_out, logvar: logvar_acts };
        Ok((mean, logvar, acts))
    }

    /// Backward of [`AutoencoderKl::encode`] from the mean's and the clamped logvar's gradients: returns
    /// dsample, adds every encoder and quant_conv gradient.
    pub fn encode_backward(
        &self,
        p: &ParamStore,
        g: &mut Grads,
        sample: &Tensor,
        acts: &EncoderActivations,
        dmean: &Tensor,
        dlogvar: &Tensor,
        alloc: &mut dyn Allocator,
    ) -> Result<Tensor> {
        let e = &self.encoder;
        let draw_logvar = clamp_backward(&acts.logvar, dlogvar, alloc)?;
        let mut dmoments = alloc.alloc(acts.conv_out.shape(), dmean.dtype())?;
        concat_channels(dmean, &draw_logvar, &mut dmoments)?;
        let dconv_out = layers::conv_back(p, g, &self.quant_conv, &acts.conv_out, &dmoments, alloc)?;
        let dnorm_out = layers::conv_back(p, g, &e.conv_out, &acts.norm_out.y, &dconv_out, alloc)?;
        let dmid_output = layers::group_norm_back(p, g, &e.conv_norm_out, true, &acts.mid_output, &acts.norm_out, &dnorm_out, alloc)?;
        let mid_input = acts.down_outputs.last().expect("at least one block");
        let mut d = e.mid.backward(p, g, mid_input, &acts.mid, &dmid_output, alloc).context("AutoencoderKL encoder.mid_block backward")?;
        for (i, block) in e.down.iter().enumerate().rev() {
            let x = if i == 0 { &acts.conv_in } else { &acts.down_outputs[i - 1] };
            d = block.backward(p, g, x, &acts.down[i], &d, alloc).with_context(|| format!("AutoencoderKL encoder.down_blocks.{i} backward"))?;
        }
        layers::conv_back(p, g, &e.conv_in, sample, &d, alloc).context("AutoencoderKL encoder.conv_in backward")
    }

    /// `decode(z).sample`: `z` [B, latent_channels, h, w] -> [B, out_channels, h·2^(blocks-1), w·2^(blocks-1)].
    pub fn decode(&self, p: &ParamStore, z: &Tensor, alloc: &mut dyn Allocator) -> Result<(Tensor, DecoderActivations)> {
        let s = z.shape();
        ensure!(
            s.len() == 4 && s[1] == self.config.latent_channels,
            "AutoencoderKL decode: latents {s:?} must be [B, {}, h, w]",
            self.config.latent_channels
        );
        let d = &self.decoder;
        let post_quant = layers::conv(p, &self.post_quant_conv, z, alloc).context("AutoencoderKL post_quant_conv")?;
        let conv_in = layers::conv(p, &d.conv_in, &post_quant, alloc).context("AutoencoderKL decoder.conv_in")?;
        let (mid_output, mid) = d.mid.forward(p, &conv_in, alloc).context("AutoencoderKL decoder.mid_block")?;
        let mut up = Vec::new();
        let mut up_outputs: Vec<Tensor> = Vec::new();
        for (i, block) in d.up.iter().enumerate() {
            let x = up_outputs.last().unwrap_or(&mid_output);
            let (y, acts) = block.forward(p, x, alloc).with_context(|| format!("AutoencoderKL decoder.up_blocks.{i}"))?;
            up.push(acts);
            up_outputs.push(y);
        }
        let last = up_outputs.last().expect("at least one block");
        let norm_out = layers::group_norm(p, &d.conv_norm_out, true, last, alloc)?;
        let y = layers::conv(p, &d.conv_out, &norm_out.y, alloc)?;
        Ok((y, DecoderActivations { post_quant, conv_in, mid, mid_output, up, up_outputs, norm_out }))
    }

    /// Backward of [`AutoencoderKl::decode`]: returns dz, adds every decoder and post_quant_conv gradient.
    pub fn decode_backward(
        &self,
        p: &ParamStore,
        g: &mut Grads,
        z: &Tensor,
        acts: &DecoderActivations,
        dy: &Tensor,
        alloc: &mut dyn Allocator,
    ) -> Result<Tensor> {
        let dd = &self.decoder;
        let last = acts.up_outputs.last().expect("at least one block");
        let dnorm_out = layers::conv_back(p, g, &dd.conv_out, &acts.norm_out.y, dy, alloc)?;
        let mut d = layers::group_norm_back(p, g, &dd.conv_norm_out, true, last, &acts.norm_out, &dnorm_out, alloc)?;
        for (i, block) in dd.up.iter().enumerate().rev() {
            let x = if i == 0 { &acts.mid_output } else { &acts.up_outputs[i - 1] };
            d = block.backward(p, g, x, &acts.up[i], &d, alloc).with_context(|| format!("AutoencoderKL decoder.up_blocks.{i} backward"))?;
        }
        let dconv_in = dd.mid.backward(p, g, &acts.conv_in, &acts.mid, &d, alloc).context("AutoencoderKL decoder.mid_block backward")?;
        let dpost_quant = layers::conv_back(p, g, &dd.conv_in, &acts.post_quant, &dconv_in, alloc)?;
        layers::conv_back(p, g, &self.post_quant_conv, z, &dpost_quant, alloc)
    }
}

/// `DownEncoderBlock2D`: resnets, then a stride-2 downsampler except in the last block.
#[derive(Debug, Clone)]
pub struct DownEncoderBlock {
    pub resnets: Vec<ResnetBlock>,
    pub downsampler: Option<Conv2d>,
}

/// `UpDecoderBlock2D`: `layers_per_block + 1` resnets, then a nearest-2x upsampler and a 3x3 conv except in the
/// last block.
#[derive(Debug, Clone)]
pub struct UpDecoderBlock {
    pub resnets: Vec<ResnetBlock>,
    pub upsampler: Option<Conv2d>,
}

/// `UNetMidBlock2D` without time embedding: resnet, spatial attention, resnet.
#[derive(Debug, Clone)]
pub struct VaeMidBlock {
    pub resnets: [ResnetBlock; 2],
    pub attention: VaeAttention,
}

/// The mid block's single-head spatial self-attention: `Attention` with a GroupNorm first and biased q/k/v
/// projections, over the H·W positions of a feature map.
#[derive(Debug, Clone)]
pub struct VaeAttention {
    pub group_norm: Norm,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
    pub channels: usize,
}

impl VaeAttention {
    /// Under `prefix` (`...mid_block.attentions.0`), GroupNorm eps as the VAE's.
    pub fn new(tree: &mut ParamTree, prefix: &str, channels: usize, groups: usize, eps: f64) -> Result<VaeAttention> {
        let group_norm = Norm::group(tree, &join(prefix, "group_norm"), groups, channels, eps)?;
        let Attention { to_q, to_k, to_v, to_out, .. } = Attention::new(tree, prefix, channels, channels, 1, channels, true);
        Ok(VaeAttention { group_norm, to_q, to_k, to_v, to_out, channels })
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

/// What [`VaeAttention::backward`] reads: the GroupNorm, its output as tokens [B, L, C], q, k, v and the core.
pub struct VaeAttentionActivations {
    norm: layers::GroupNormActivations,
    tokens: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    core: AttentionCore,
}

impl VaeAttention {
    /// The VAE mid block's attention on `x` [B, C, L] (L = H·W): GroupNorm, tokens [B, L, C], single-head
    /// softmax(q kᵀ / √C) v, `to_out.0`, back to [B, C, L], plus `x`. `fused` picks the fused attention op
    /// (head dims up to [`MAX_HEAD_DIM`]) or matmul + softmax + matmul (any head dim).
    pub fn forward(&self, p: &ParamStore, x: &Tensor, fused: bool, alloc: &mut dyn Allocator) -> Result<(Tensor, VaeAttentionActivations)> {
        let norm_params = &self.group_norm;
        let s = x.shape().to_vec();
        ensure!(s.len() == 3 && s[1] == self.channels, "VAE attention: input {s:?} must be [B, {}, H*W]", self.channels);
        ensure!(!fused || self.channels <= MAX_HEAD_DIM, "VAE attention: the fused op holds head dims up to {MAX_HEAD_DIM}, not {}", self.channels);
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

    /// Backward of [`VaeAttention::forward`] from `dy` [B, C, L]: returns dx, adds every parameter gradient.
    pub fn backward(
        &self,
        p: &ParamStore,
        g: &mut Grads,
        x: &Tensor,
        acts: &VaeAttentionActivations,
        dy: &Tensor,
        alloc: &mut dyn Allocator,
    ) -> Result<Tensor> {
        let norm_params = &self.group_norm;
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

/// Runs `resnets` (no time embedding) in order from `x`; the activations keep every resnet's input but the first (`x`, the
/// caller's).
fn resnet_chain_forward(resnets: &[ResnetBlock], p: &ParamStore, x: &Tensor, alloc: &mut dyn Allocator) -> Result<(Tensor, ResnetChainActivations)> {
    let mut chain = ResnetChainActivations { inputs: Vec::new(), resnets: Vec::new() };
    let mut h: Option<Tensor> = None;
    for (i, r) in resnets.iter().enumerate() {
        let input = h.as_ref().unwrap_or(x);
        let (y, acts) = r.forward(p, input, None, alloc).with_context(|| format!("resnets.{i}"))?;
        chain.resnets.push(acts);
        chain.inputs.extend(h.replace(y));
        if !alloc.keeps_activations() {
            chain.inputs.iter_mut().for_each(Tensor::discard);
        }
    }
    let y = h.ok_or_else(|| anyhow!("a block needs at least one resnet"))?;
    Ok((y, chain))
}

/// Backward of [`resnet_chain_forward`]: returns dx, adds every parameter gradient.
fn resnet_chain_backward(
    resnets: &[ResnetBlock],
    p: &ParamStore,
    g: &mut Grads,
    x: &Tensor,
    chain: &ResnetChainActivations,
    dy: &Tensor,
    alloc: &mut dyn Allocator,
) -> Result<Tensor> {
    let mut d: Option<Tensor> = None;
    for (i, r) in resnets.iter().enumerate().rev() {
        let input = if i == 0 { x } else { &chain.inputs[i - 1] };
        let upstream = d.as_ref().unwrap_or(dy);
        let (dx, _) = r.backward(p, g, input, None, &chain.resnets[i], upstream, alloc).with_context(|| format!("resnets.{i} backward"))?;
        d = Some(dx);
    }
    d.ok_or_else(|| anyhow!("a block needs at least one resnet"))
}

/// What [`VaeMidBlock::backward`] reads.
pub struct VaeMidActivations {
    resnet0: ResnetActivations,
    /// resnet 0's output as [B, C, H·W], the attention's input.
    attention_input: Tensor,
    attention: VaeAttentionActivations,
    /// The attention's output as [B, C, H, W], resnet 1's input.
    resnet1_input: Tensor,
    resnet1: ResnetActivations,
}

impl VaeMidBlock {
    /// The VAE's mid block (`UNetMidBlock2D` without time embedding): resnet, spatial attention, resnet.
    pub fn forward(&self, p: &ParamStore, x: &Tensor, alloc: &mut dyn Allocator) -> Result<(Tensor, VaeMidActivations)> {
        let [r0, r1] = &self.resnets;
        let attention = &self.attention;
        let shape = x.shape().to_vec();
        let (h0, resnet0) = r0.forward(p, x, None, alloc).context("resnets.0")?;
        let attention_input = h0.reshape(&[shape[0], shape[1], shape[2] * shape[3]])?;
        let fused = attention.channels <= MAX_HEAD_DIM;
        let (h1, attention_acts) = attention.forward(p, &attention_input, fused, alloc).context("attentions.0")?;
        let resnet1_input = h1.reshape(&shape)?;
        let (y, resnet1) = r1.forward(p, &resnet1_input, None, alloc).context("resnets.1")?;
        let mut acts = VaeMidActivations { resnet0, attention_input, attention: attention_acts, resnet1_input, resnet1 };
        if !alloc.keeps_activations() {
            acts.attention_input.discard();
            acts.resnet1_input.discard();
        }
        Ok((y, acts))
    }

    /// Backward of [`VaeMidBlock::forward`]: returns dx, adds every parameter gradient.
    pub fn backward(
        &self,
        p: &ParamStore,
        g: &mut Grads,
        x: &Tensor,
        acts: &VaeMidActivations,
        dy: &Tensor,
        alloc: &mut dyn Allocator,
    ) -> Result<Tensor> {
        let attention = &self.attention;
        let (d1, _) = self.resnets[1].backward(p, g, &acts.resnet1_input, None, &acts.resnet1, dy, alloc).context("resnets.1 backward")?;
        let shape = d1.shape().to_vec();
        let d1 = d1.reshape(acts.attention_input.shape())?;
        let da = attention.backward(p, g, &acts.attention_input, &acts.attention, &d1, alloc).context("attentions.0 backward")?;
        let (dx, _) = self.resnets[0].backward(p, g, x, None, &acts.resnet0, &da.reshape(&shape)?, alloc).context("resnets.0 backward")?;
        Ok(dx)
    }
}

/// What [`DownEncoderBlock::backward`] reads: the resnets' activations and the downsampler's input.
pub struct DownEncoderActivations {
    resnets: ResnetChainActivations,
    downsampler_input: Option<Tensor>,
}

impl DownEncoderBlock {
    /// Resnets, then the downsampler if any.
    pub fn forward(&self, p: &ParamStore, x: &Tensor, alloc: &mut dyn Allocator) -> Result<(Tensor, DownEncoderActivations)> {
        let (h, resnets) = resnet_chain_forward(&self.resnets, p, x, alloc)?;
        match &self.downsampler {
            Some(conv) => {
                let y = layers::conv(p, conv, &h, alloc).context("downsamplers.0")?;
                let mut h = h;
                if !alloc.keeps_activations() {
                    h.discard();
                }
                Ok((y, DownEncoderActivations { resnets, downsampler_input: Some(h) }))
            }
            None => Ok((h, DownEncoderActivations { resnets, downsampler_input: None })),
        }
    }

    /// Backward of [`DownEncoderBlock::forward`]: returns dx, adds every parameter gradient.
    pub fn backward(
        &self,
        p: &ParamStore,
        g: &mut Grads,
        x: &Tensor,
        acts: &DownEncoderActivations,
        dy: &Tensor,
        alloc: &mut dyn Allocator,
    ) -> Result<Tensor> {
        let dh = match (&self.downsampler, &acts.downsampler_input) {
            (Some(conv), Some(h)) => Some(layers::conv_back(p, g, conv, h, dy, alloc).context("downsamplers.0 backward")?),
            _ => None,
        };
        resnet_chain_backward(&self.resnets, p, g, x, &acts.resnets, dh.as_ref().unwrap_or(dy), alloc)
    }
}

/// What [`UpDecoderBlock::backward`] reads: the resnets' activations and the upsampler conv's input.
pub struct UpDecoderActivations {
    resnets: ResnetChainActivations,
    upsampled: Option<Tensor>,
}

impl UpDecoderBlock {
    /// Resnets (no skip connections), then nearest 2x and a 3x3 conv.
    pub fn forward(&self, p: &ParamStore, x: &Tensor, alloc: &mut dyn Allocator) -> Result<(Tensor, UpDecoderActivations)> {
        let (h, resnets) = resnet_chain_forward(&self.resnets, p, x, alloc)?;
        match &self.upsampler {
            Some(conv) => {
                let s = h.shape();
                let mut upsampled = alloc.alloc(&[s[0], s[1], 2 * s[2], 2 * s[3]], h.dtype())?;
                upsample_nearest2x(&h, &mut upsampled)?;
                let y = layers::conv(p, conv, &upsampled, alloc).context("upsamplers.0")?;
                if !alloc.keeps_activations() {
                    upsampled.discard();
                }
                Ok((y, UpDecoderActivations { resnets, upsampled: Some(upsampled) }))
            }
            None => Ok((h, UpDecoderActivations { resnets, upsampled: None })),
        }
    }

    /// Backward of [`UpDecoderBlock::forward`]: returns dx, adds every parameter gradient.
    pub fn backward(
        &self,
        p: &ParamStore,
        g: &mut Grads,
        x: &Tensor,
        acts: &UpDecoderActivations,
        dy: &Tensor,
        alloc: &mut dyn Allocator,
    ) -> Result<Tensor> {
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
        resnet_chain_backward(&self.resnets, p, g, x, &acts.resnets, dh.as_ref().unwrap_or(dy), alloc)
    }
}
