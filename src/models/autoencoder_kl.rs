//! `AutoencoderKL`: configuration and module tree (encoder, quant convs, decoder), named as diffusers names
//! them. The mid-block attention's historical names (`query`, `key`, `value`, `proj_attn`) are accepted as
//! aliases when weights are loaded.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use crate::models::blocks::layers::{self, GroupNormActivations};
use crate::models::blocks::{downsampler, upsampler, Attention, DownActivations, DownBlock, MidBlock, ResnetBlock, UpActivations, UpBlock, VaeMidActivations};
use crate::models::config::ConfigReader;
use crate::nn::{Allocator, Conv2d, Grads, Norm, ParamStore, ParamTree};
use crate::ops::elementwise::{add, add_scaled, fill, relu_backward, relu_forward};
use crate::ops::shape::{concat_channels, split_channels};
use crate::tensor::Tensor;

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
        ensure!(scaling_factor.is_finite() && scaling_factor > 0.0, "{}: 'scaling_factor' must be a positive number, got {scaling_factor}", path.display());
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
    pub down: Vec<DownBlock>,
    pub mid: MidBlock,
    pub conv_norm_out: Norm,
    pub conv_out: Conv2d,
}

#[derive(Debug, Clone)]
pub struct VaeDecoder {
    pub conv_in: Conv2d,
    pub mid: MidBlock,
    pub up: Vec<UpBlock>,
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

fn mid_block(tree: &mut ParamTree, prefix: &str, channels: usize, groups: usize) -> Result<MidBlock> {
    Ok(MidBlock {
        resnets: vec![
            ResnetBlock::new(tree, &format!("{prefix}.resnets.0"), channels, channels, None, groups, VAE_EPS)?,
            ResnetBlock::new(tree, &format!("{prefix}.resnets.1"), channels, channels, None, groups, VAE_EPS)?,
        ],
        attentions: Vec::new(),
        vae_attention: Some(Attention::vae(tree, &format!("{prefix}.attentions.0"), channels, groups, VAE_EPS)?),
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
            let mut block = DownBlock { resnets: Vec::new(), attentions: Vec::new(), downsampler: None };
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
            let mut block = UpBlock { resnets: Vec::new(), attentions: Vec::new(), upsampler: None };
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
pub const LEGACY_ATTENTION_NAMES: [(&str, &str); 4] =
    [("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0")];

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
    down: Vec<DownActivations>,
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
    up: Vec<UpActivations>,
    /// Each up block's output: the next block's (or the output norm's) input.
    up_outputs: Vec<Tensor>,
    norm_out: GroupNormActivations,
}

impl AutoencoderKl {
    /// `encode(sample).latent_dist`: `sample` [B, in_channels, H, W] -> (mean, logvar), each
    /// [B, latent_channels, H / 2^(blocks-1), W / 2^(blocks-1)], logvar clamped to [-30, 20].
    pub fn encode(&self, p: &ParamStore, sample: &Tensor, alloc: &mut dyn Allocator) -> Result<(Tensor, Tensor, EncoderActivations)> {
        let s = sample.shape();
        ensure!(
            s.len() == 4 && s[1] == self.config.in_channels,
            "AutoencoderKL encode: sample {s:?} must be [B, {}, H, W]",
            self.config.in_channels
        );
        let e = &self.encoder;
        let conv_in = layers::conv(p, &e.conv_in, sample, alloc).context("AutoencoderKL encoder.conv_in")?;
        let mut down = Vec::new();
        let mut down_outputs: Vec<Tensor> = Vec::new();
        for (i, block) in e.down.iter().enumerate() {
            let x = down_outputs.last().unwrap_or(&conv_in);
            let (y, acts) = block.forward(p, x, None, alloc).with_context(|| format!("AutoencoderKL encoder.down_blocks.{i}"))?;
            down.push(acts);
            down_outputs.push(y);
        }
        let mid_input = down_outputs.last().expect("at least one block");
        let (mid_output, mid) = e.mid.vae_forward(p, mid_input, alloc).context("AutoencoderKL encoder.mid_block")?;
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
        let mut d = e.mid.vae_backward(p, g, mid_input, &acts.mid, &dmid_output, alloc).context("AutoencoderKL encoder.mid_block backward")?;
        for (i, block) in e.down.iter().enumerate().rev() {
            let x = if i == 0 { &acts.conv_in } else { &acts.down_outputs[i - 1] };
            d = block.backward(p, g, x, None, &acts.down[i], &d, alloc).with_context(|| format!("AutoencoderKL encoder.down_blocks.{i} backward"))?.0;
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
        let (mid_output, mid) = d.mid.vae_forward(p, &conv_in, alloc).context("AutoencoderKL decoder.mid_block")?;
        let mut up = Vec::new();
        let mut up_outputs: Vec<Tensor> = Vec::new();
        for (i, block) in d.up.iter().enumerate() {
            let x = up_outputs.last().unwrap_or(&mid_output);
            let (y, acts) = block.decoder_forward(p, x, alloc).with_context(|| format!("AutoencoderKL decoder.up_blocks.{i}"))?;
            up.push(acts);
            up_outputs.push(y);
        }
        let last = up_outputs.last().expect("at least one block");
        let norm_out = layers::group_norm(p, &d.conv_norm_out, true, last, alloc)?;
        let y = layers::conv(p, &d.conv_out, &norm_out.y, alloc)?;
        Ok((y, DecoderActivations { post_quant, conv_in, mid, mid_output, up, up_outputs, norm_out }))
    }

    /// Backward of [`AutoencoderKl::decode`]: returns dz, adds every decoder and post_quant_conv gradient.
    pub fn decode_backward(&self, p: &ParamStore, g: &mut Grads, z: &Tensor, acts: &DecoderActivations, dy: &Tensor, alloc: &mut dyn Allocator) -> Result<Tensor> {
        let dd = &self.decoder;
        let last = acts.up_outputs.last().expect("at least one block");
        let dnorm_out = layers::conv_back(p, g, &dd.conv_out, &acts.norm_out.y, dy, alloc)?;
        let mut d = layers::group_norm_back(p, g, &dd.conv_norm_out, true, last, &acts.norm_out, &dnorm_out, alloc)?;
        for (i, block) in dd.up.iter().enumerate().rev() {
            let x = if i == 0 { &acts.mid_output } else { &acts.up_outputs[i - 1] };
            d = block.decoder_backward(p, g, x, &acts.up[i], &d, alloc).with_context(|| format!("AutoencoderKL decoder.up_blocks.{i} backward"))?;
        }
        let dconv_in = dd.mid.vae_backward(p, g, &acts.conv_in, &acts.mid, &d, alloc).context("AutoencoderKL decoder.mid_block backward")?;
        let dpost_quant = layers::conv_back(p, g, &dd.conv_in, &acts.post_quant, &dconv_in, alloc)?;
        layers::conv_back(p, g, &self.post_quant_conv, z, &dpost_quant, alloc)
    }
}

