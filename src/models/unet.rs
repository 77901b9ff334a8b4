//! `UNet2DConditionModel` and `ControlNetModel`: configuration with diffusers' semantics and the module trees
//! (parameters named as diffusers names them). The ControlNet reuses the UNet's time embedding, input conv,
//! down blocks and mid block.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use crate::models::blocks::{downsampler, upsampler, DownBlock, MidBlock, ResnetBlock, Transformer2d, TransformerSpec, UpBlock};
use crate::models::config::ConfigReader;
use crate::nn::{join, Conv2d, Linear, Norm, ParamTree};
use crate::models::blocks::{linear_layer_backward, linear_layer_forward, linear_layer_param_backward};
use crate::nn::{Allocator, Grads, ParamStore};
use crate::ops;
use crate::tensor::Tensor;

/// The UNet settings sgdm implements. Everything else in a diffusers config either keeps its default or is
/// refused when the model is built.
#[derive(Debug, Clone, PartialEq)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    /// `true` for CrossAttnDownBlock2D, `false` for DownBlock2D, per down block.
    pub down_cross_attention: Vec<bool>,
    /// The same for the up blocks (CrossAttnUpBlock2D / UpBlock2D), in up order.
    pub up_cross_attention: Vec<bool>,
    pub layers_per_block: Vec<usize>,
    /// Heads per down block (diffusers: `num_attention_heads`, which defaults to `attention_head_dim`; in SD
    /// 1.x configs `attention_head_dim` really is the number of heads).
    pub heads: Vec<usize>,
    pub transformer_layers_per_block: Vec<usize>,
    pub cross_attention_dim: usize,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    /// ControlNet only: the conditioning embedding's channels and the condition image's channels.
    pub conditioning_embedding_out_channels: Vec<usize>,
    pub conditioning_channels: usize,
}

fn block_kinds(r: &ConfigReader, key: &str, default: &[&str], cross: &str, plain: &str) -> Result<Vec<bool>> {
    r.strings(key, default)?
        .iter()
        .map(|t| match t.as_str() {
            t if t == cross => Ok(true),
            t if t == plain => Ok(false),
            other => bail!("{}: block type {other} in '{key}' is not supported (only {cross} and {plain})", r.path.display()),
        })
        .collect()
}

impl UNetConfig {
    /// Reads a UNet2DConditionModel or ControlNetModel `config.json` value; `path` names it in errors.
    pub fn from_json(path: &Path, value: &Value) -> Result<UNetConfig> {
        let r = ConfigReader::new(path, value);
        let boc = r.usizes("block_out_channels", &[320, 640, 1280, 1280])?;
        let n = boc.len();
        ensure!(n >= 1, "{}: 'block_out_channels' is empty", path.display());
        let down = block_kinds(
            &r,
            "down_block_types",
            &["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        )?;
        let is_controlnet = value.get("_class_name").and_then(Value::as_str) == Some("ControlNetModel");
        let up = if is_controlnet {
            Vec::new()
        } else {
            block_kinds(
                &r,
                "up_block_types",
                &["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                "CrossAttnUpBlock2D",
                "UpBlock2D",
            )?
        };
        ensure!(
            down.len() == n && (is_controlnet || up.len() == n),
            "{}: {n} block_out_channels but {} down and {} up block types",
            path.display(),
            down.len(),
            up.len()
        );
        r.require("mid_block_type", &[Value::Null, json!("UNetMidBlock2DCrossAttn")], "only UNetMidBlock2DCrossAttn")?;
        for key in ["class_embed_type", "addition_embed_type", "encoder_hid_dim", "time_cond_proj_dim", "num_class_embeds"] {
            r.require(key, &[Value::Null], "extra conditioning embeddings are not implemented")?;
        }
        r.require("resnet_time_scale_shift", &[Value::Null, json!("default")], "only the additive time embedding")?;
        r.require("time_embedding_type", &[Value::Null, json!("positional")], "only sinusoidal time embeddings")?;
        r.require("act_fn", &[Value::Null, json!("silu")], "only SiLU")?;
        r.require("only_cross_attention", &[Value::Null, json!(false)], "self-attention is always used")?;
        r.require("dual_cross_attention", &[Value::Null, json!(false)], "not implemented")?;
        r.require("center_input_sample", &[Value::Null, json!(false)], "not implemented")?;
        r.require("conv_in_kernel", &[Value::Null, json!(3)], "3x3 only")?;
        r.require("conv_out_kernel", &[Value::Null, json!(3)], "3x3 only")?;
        r.require("attention_type", &[Value::Null, json!("default")], "only default attention")?;
        r.require("mid_block_scale_factor", &[Value::Null, json!(1), json!(1.0)], "output scale 1 only")?;
        r.require("downsample_padding", &[Value::Null, json!(1)], "padding 1 only")?;
        ensure!(
            value.get("reverse_transformer_layers_per_block").is_none_or(Value::is_null),
            "{}: 'reverse_transformer_layers_per_block' is not supported",
            path.display()
        );
        if value.get("cross_attention_dim").is_some_and(Value::is_array) {
            bail!("{}: per-block 'cross_attention_dim' is not supported", path.display());
        }
        let attention_head_dim = r.per_block("attention_head_dim", n)?.unwrap_or(vec![8; n]);
        let heads = r.per_block("num_attention_heads", n)?.unwrap_or(attention_head_dim);
        Ok(UNetConfig {
            in_channels: r.usize("in_channels", 4)?,
            out_channels: r.usize("out_channels", 4)?,
            block_out_channels: boc,
            down_cross_attention: down,
            up_cross_attention: up,
            layers_per_block: r.per_block("layers_per_block", n)?.unwrap_or(vec![2; n]),
            heads,
            transformer_layers_per_block: r.per_block("transformer_layers_per_block", n)?.unwrap_or(vec![1; n]),
            cross_attention_dim: r.usize("cross_attention_dim", 1280)?,
            use_linear_projection: r.bool("use_linear_projection", false)?,
            upcast_attention: r.bool("upcast_attention", false)?,
            norm_num_groups: r.usize("norm_num_groups", 32)?,
            norm_eps: r.f64("norm_eps", 1e-5)?,
            flip_sin_to_cos: r.bool("flip_sin_to_cos", true)?,
            freq_shift: r.f64("freq_shift", 0.0)?,
            conditioning_embedding_out_channels: r.usizes("conditioning_embedding_out_channels", &[16, 32, 96, 256])?,
            conditioning_channels: r.usize("conditioning_channels", 3)?,
        })
    }

    fn time_embed_dim(&self) -> usize {
        4 * self.block_out_channels[0]
    }

    fn transformer_spec(&self) -> TransformerSpec {
        TransformerSpec {
            cross_attention_dim: self.cross_attention_dim,
            groups: self.norm_num_groups,
            use_linear_projection: self.use_linear_projection,
        }
    }
}

/// `time_embedding`: sinusoidal features of `block_out_channels[0]` channels, `linear_1`, SiLU, `linear_2`.
#[derive(Debug, Clone)]
pub struct TimeEmbedding {
    pub linear_1: Linear,
    pub linear_2: Linear,
    pub channels: usize,
}

/// What the UNet and the ControlNet share: the input conv, time embedding, down blocks and mid block.
#[derive(Debug, Clone)]
pub struct Encoder {
    pub conv_in: Conv2d,
    pub time_embedding: TimeEmbedding,
    pub down: Vec<DownBlock>,
    pub mid: MidBlock,
}

fn build_encoder(tree: &mut ParamTree, c: &UNetConfig) -> Result<Encoder> {
    let boc = &c.block_out_channels;
    let temb = c.time_embed_dim();
    let (groups, eps, spec) = (c.norm_num_groups, c.norm_eps, c.transformer_spec());
    let conv_in = Conv2d::k3(tree, "conv_in", c.in_channels, boc[0], 1);
    let time_embedding = TimeEmbedding::new(tree, "time_embedding", boc[0], temb);
    let mut down = Vec::new();
    let mut input = boc[0];
    for (i, &output) in boc.iter().enumerate() {
        let prefix = format!("down_blocks.{i}");
        let final_block = i + 1 == boc.len();
        let mut block = DownBlock { resnets: Vec::new(), attentions: Vec::new(), downsampler: None };
        for l in 0..c.layers_per_block[i] {
            let cin = if l == 0 { input } else { output };
            block.resnets.push(ResnetBlock::new(tree, &format!("{prefix}.resnets.{l}"), cin, output, Some(temb), groups, eps)?);
            if c.down_cross_attention[i] {
                let name = format!("{prefix}.attentions.{l}");
                block.attentions.push(Transformer2d::new(tree, &name, output, c.heads[i], c.transformer_layers_per_block[i], spec)?);
            }
        }
        if !final_block {
            block.downsampler = Some(downsampler(tree, &prefix, output, false));
        }
        down.push(block);
        input = output;
    }
    let last = *boc.last().unwrap();
    let n = boc.len() - 1;
    let mid = MidBlock {
        resnets: vec![
            ResnetBlock::new(tree, "mid_block.resnets.0", last, last, Some(temb), groups, eps)?,
            ResnetBlock::new(tree, "mid_block.resnets.1", last, last, Some(temb), groups, eps)?,
        ],
        attentions: vec![Transformer2d::new(tree, "mid_block.attentions.0", last, c.heads[n], c.transformer_layers_per_block[n], spec)?],
        vae_attention: None,
    };
    Ok(Encoder { conv_in, time_embedding, down, mid })
}

/// `UNet2DConditionModel`.
#[derive(Debug, Clone)]
pub struct UNet {
    pub config: UNetConfig,
    pub params: ParamTree,
    pub encoder: Encoder,
    pub up: Vec<UpBlock>,
    pub conv_norm_out: Norm,
    pub conv_out: Conv2d,
}

impl UNet {
    pub fn new(config: UNetConfig) -> Result<UNet> {
        let mut tree = ParamTree::new();
        let c = &config;
        let encoder = build_encoder(&mut tree, c)?;
        let (groups, eps, spec, temb) = (c.norm_num_groups, c.norm_eps, c.transformer_spec(), c.time_embed_dim());
        let rev: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let rev_heads: Vec<usize> = c.heads.iter().rev().copied().collect();
        let rev_layers: Vec<usize> = c.layers_per_block.iter().rev().copied().collect();
        let rev_tlayers: Vec<usize> = c.transformer_layers_per_block.iter().rev().copied().collect();
        let mut up = Vec::new();
        let mut prev_output = rev[0];
        for i in 0..rev.len() {
            let prefix = format!("up_blocks.{i}");
            let output = rev[i];
            let input = rev[(i + 1).min(rev.len() - 1)];
            let layers = rev_layers[i] + 1;
            let mut block = UpBlock { resnets: Vec::new(), attentions: Vec::new(), upsampler: None };
            for l in 0..layers {
                let skip = if l + 1 == layers { input } else { output };
                let cin = if l == 0 { prev_output } else { output };
                block.resnets.push(ResnetBlock::new(&mut tree, &format!("{prefix}.resnets.{l}"), cin + skip, output, Some(temb), groups, eps)?);
                if c.up_cross_attention[i] {
                    let name = format!("{prefix}.attentions.{l}");
                    block.attentions.push(Transformer2d::new(&mut tree, &name, output, rev_heads[i], rev_tlayers[i], spec)?);
                }
            }
            if i + 1 < rev.len() {
                block.upsampler = Some(upsampler(&mut tree, &prefix, output));
            }
            up.push(block);
            prev_output = output;
        }
        let c0 = c.block_out_channels[0];
        let conv_norm_out = Norm::group(&mut tree, "conv_norm_out", groups, c0, eps)?;
        let conv_out = Conv2d::k3(&mut tree, "conv_out", c0, c.out_channels, 1);
        Ok(UNet { config, params: tree, encoder, up, conv_norm_out, conv_out })
    }
}

/// `ControlNetModel`: the UNet's encoder half, a conditioning embedding that brings the condition image
/// down to the latent size, and zero-initialised 1x1 convs producing one residual per UNet skip
/// connection plus the mid residual.
#[derive(Debug, Clone)]
pub struct ControlNet {
    pub config: UNetConfig,
    pub params: ParamTree,
    pub encoder: Encoder,
    /// `controlnet_cond_embedding`: conv_in, blocks (3x3, every second one stride 2), conv_out; SiLU between.
    pub cond_conv_in: Conv2d,
    pub cond_blocks: Vec<Conv2d>,
    pub cond_conv_out: Conv2d,
    pub zero_convs: Vec<Conv2d>,
    pub mid_zero_conv: Conv2d,
}

impl ControlNet {
    pub fn new(config: UNetConfig) -> Result<ControlNet> {
        let mut tree = ParamTree::new();
        let c = &config;
        let encoder = build_encoder(&mut tree, c)?;
        let ch = &c.conditioning_embedding_out_channels;
        ensure!(!ch.is_empty(), "ControlNet: 'conditioning_embedding_out_channels' is empty");
        let p = "controlnet_cond_embedding";
        let cond_conv_in = Conv2d::k3(&mut tree, &join(p, "conv_in"), c.conditioning_channels, ch[0], 1);
        let mut cond_blocks = Vec::new();
        for i in 0..ch.len() - 1 {
            cond_blocks.push(Conv2d::k3(&mut tree, &join(p, &format!("blocks.{}", 2 * i)), ch[i], ch[i], 1));
            cond_blocks.push(Conv2d::k3(&mut tree, &join(p, &format!("blocks.{}", 2 * i + 1)), ch[i], ch[i + 1], 2));
        }
        let c0 = c.block_out_channels[0];
        let cond_conv_out = Conv2d::k3(&mut tree, &join(p, "conv_out"), *ch.last().unwrap(), c0, 1);
        let mut zero_convs = vec![Conv2d::k1(&mut tree, "controlnet_down_blocks.0", c0, c0)];
        for (i, &output) in c.block_out_channels.iter().enumerate() {
            let count = c.layers_per_block[i] + encoder.down[i].downsampler.is_some() as usize;
            for _ in 0..count {
                let name = format!("controlnet_down_blocks.{}", zero_convs.len());
                zero_convs.push(Conv2d::k1(&mut tree, &name, output, output));
            }
        }
        let last = *c.block_out_channels.last().unwrap();
        let mid_zero_conv = Conv2d::k1(&mut tree, "controlnet_mid_block", last, last);
        Ok(ControlNet { config, params: tree, encoder, cond_conv_in, cond_blocks, cond_conv_out, zero_convs, mid_zero_conv })
    }

    /// How many times smaller the latent is than the condition image.
    pub fn condition_downscale(&self) -> usize {
        1 << (self.config.conditioning_embedding_out_channels.len() - 1)
    }
}

/// What the time embedding's backward needs, and its output [B, time_embed_dim].
pub struct TimeEmbeddingActivations {
    /// The sinusoidal features [B, channels] (`linear_1`'s input), `linear_1`'s output and its SiLU.
    pub sinusoid: Tensor,
    pub hidden: Tensor,
    pub activated: Tensor,
    pub output: Tensor,
}

impl TimeEmbedding {
    pub fn new(tree: &mut ParamTree, prefix: &str, channels: usize, time_embed_dim: usize) -> TimeEmbedding {
        TimeEmbedding {
            linear_1: Linear::new(tree, &join(prefix, "linear_1"), channels, time_embed_dim, true),
            linear_2: Linear::new(tree, &join(prefix, "linear_2"), time_embed_dim, time_embed_dim, true),
            channels,
        }
    }

    /// `timesteps` [B] f32 -> [B, time_embed_dim] in the parameters' dtype; `flip_sin_to_cos` and
    /// `freq_shift` as the UNet config gives them.
    pub fn forward(
        &self,
        params: &ParamStore,
        timesteps: &Tensor,
        flip_sin_to_cos: bool,
        freq_shift: f64,
        alloc: &mut dyn Allocator,
    ) -> Result<TimeEmbeddingActivations> {
        ensure!(timesteps.shape().len() == 1, "time_embedding: timesteps {:?} must be [batch]", timesteps.shape());
        let dtype = params.get(self.linear_1.weight).dtype();
        let mut sinusoid = alloc.alloc(&[timesteps.shape()[0], self.channels], dtype)?;
        ops::elementwise::timestep_embedding(timesteps, flip_sin_to_cos, freq_shift as f32, &mut sinusoid)?;
        let hidden = linear_layer_forward(&self.linear_1, params, &sinusoid, alloc).context("time_embedding.linear_1")?;
        let mut activated = alloc.alloc(hidden.shape(), dtype)?;
        ops::elementwise::silu_forward(&hidden, &mut activated)?;
        let output = linear_layer_forward(&self.linear_2, params, &activated, alloc).context("time_embedding.linear_2")?;
        Ok(TimeEmbeddingActivations { sinusoid, hidden, activated, output })
    }

    /// Backward of [`TimeEmbedding::forward`] from `dy` [B, time_embed_dim]: adds to the gradients of
    /// `linear_1` and `linear_2` (timesteps take no gradient).
    pub fn backward(&self, params: &ParamStore, grads: &mut Grads, acts: &TimeEmbeddingActivations, dy: &Tensor, alloc: &mut dyn Allocator) -> Result<()> {
        let dactivated = linear_layer_backward(&self.linear_2, params, grads, &acts.activated, dy, alloc).context("time_embedding.linear_2 backward")?;
        let mut dhidden = alloc.alloc(acts.hidden.shape(), acts.hidden.dtype())?;
        ops::elementwise::silu_backward(&acts.hidden, &dactivated, &mut dhidden)?;
        linear_layer_param_backward(&self.linear_1, params, grads, &acts.sinusoid, &dhidden).context("time_embedding.linear_1 backward")
    }
}
