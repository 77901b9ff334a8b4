//! `UNet2DConditionModel` and `ControlNetModel`: configuration with diffusers' semantics and the module trees
//! (parameters named as diffusers names them). The ControlNet reuses the UNet's time embedding, input conv,
//! down blocks and mid block.

use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{json, Value};

use crate::models::config::ConfigReader;
use crate::models::layers::{self, GroupNormActivations};
use crate::models::resnet::{downsampler, upsampler, ResnetBlock};
use crate::models::transformer_2d::{Transformer2d, TransformerSpec};
use crate::models::unet_2d_blocks::{DownBlock, MidBlock, SharedGrads, UNetDownActivations, UNetMidActivations, UNetUpActivations, UpBlock};
use crate::nn::{join, Allocator, Conv2d, Grads, Linear, Norm, ParamStore, ParamTree};
use crate::ops;
use crate::ops::elementwise::{add, scale, silu_backward, silu_forward};
use crate::tensor::{DType, Tensor};

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
    /// Accepted either way: our attention always forms scores and the softmax in f32, which is what
    /// upcasting asks of a half-precision model.
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
        UNetConfig::read(&ConfigReader::new(path, value))
    }

    /// [`UNetConfig::from_json`] for a configuration we write ourselves (a training TOML's table): a key it
    /// does not read, other than `also_known`, is refused by name.
    pub fn from_json_strict(path: &Path, value: &Value, also_known: &[&str]) -> Result<UNetConfig> {
        let r = ConfigReader::new(path, value);
        let config = UNetConfig::read(&r)?;
        r.refuse_unread(also_known)?;
        Ok(config)
    }

    fn read(r: &ConfigReader) -> Result<UNetConfig> {
        let path = r.path.as_path();
        let boc = r.usizes("block_out_channels", &[320, 640, 1280, 1280])?;
        let n = boc.len();
        ensure!(n >= 1, "{}: 'block_out_channels' is empty", path.display());
        let down = block_kinds(
            r,
            "down_block_types",
            &["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        )?;
        let is_controlnet = r.raw("_class_name").and_then(Value::as_str) == Some("ControlNetModel");
        let up = if is_controlnet {
            Vec::new()
        } else {
            block_kinds(
                r,
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
        r.require("global_pool_conditions", &[Value::Null, json!(false)], "the ControlNet's residuals keep their maps")?;
        r.require("controlnet_conditioning_channel_order", &[Value::Null, json!("rgb")], "RGB condition images only")?;
        ensure!(
            r.raw("reverse_transformer_layers_per_block").is_none_or(Value::is_null),
            "{}: 'reverse_transformer_layers_per_block' is not supported",
            path.display()
        );
        if r.raw("cross_attention_dim").is_some_and(Value::is_array) {
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
        ensure!(
            c.up_cross_attention.len() == c.block_out_channels.len(),
            "UNet2DConditionModel: {} up block types for {} blocks (a ControlNetModel's config, which has none?)",
            c.up_cross_attention.len(),
            c.block_out_channels.len()
        );
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
        let hidden = layers::linear(params, &self.linear_1, &sinusoid, alloc).context("time_embedding.linear_1")?;
        let mut activated = alloc.alloc(hidden.shape(), dtype)?;
        ops::elementwise::silu_forward(&hidden, &mut activated)?;
        let output = layers::linear(params, &self.linear_2, &activated, alloc).context("time_embedding.linear_2")?;
        Ok(TimeEmbeddingActivations { sinusoid, hidden, activated, output })
    }

    /// Backward of [`TimeEmbedding::forward`] from `dy` [B, time_embed_dim]: adds to the gradients of
    /// `linear_1` and `linear_2` (timesteps take no gradient).
    pub fn backward(
        &self,
        params: &ParamStore,
        grads: &mut Grads,
        acts: &TimeEmbeddingActivations,
        dy: &Tensor,
        alloc: &mut dyn Allocator,
    ) -> Result<()> {
        let dactivated =
            layers::linear_back_input(params, grads, &self.linear_2, &acts.activated, dy, alloc).context("time_embedding.linear_2 backward")?;
        let mut dhidden = alloc.alloc(acts.hidden.shape(), acts.hidden.dtype())?;
        ops::elementwise::silu_backward(&acts.hidden, &dactivated, &mut dhidden)?;
        layers::linear_back(params, grads, &self.linear_1, &acts.sinusoid, &dhidden, None).context("time_embedding.linear_1 backward")
    }
}

/// `timestep` [B] or [1] (diffusers broadcasts one timestep over the batch) as [batch] f32.
fn batch_timesteps(timestep: &Tensor, batch: usize, alloc: &mut dyn Allocator) -> Result<Option<Tensor>> {
    match timestep.shape() {
        [n] if *n == batch => Ok(None),
        [1] => {
            let t = timestep.to_f32_vec()?[0];
            let mut expanded = alloc.alloc(&[batch], DType::F32)?;
            expanded.write_f32(&vec![t; batch])?;
            Ok(Some(expanded))
        }
        s => bail!("timestep {s:?} must be [{batch}] or [1] for a batch of {batch}"),
    }
}

/// What [`Encoder::backward`] reads; also holds the skip connections and the mid block's output.
pub struct EncoderActivations {
    time: TimeEmbeddingActivations,
    /// conv_in's output (plus the conditioning embedding in the ControlNet): the first skip connection.
    first: Tensor,
    down: Vec<UNetDownActivations>,
    mid: UNetMidActivations,
}

impl EncoderActivations {
    /// conv_in's output, then every down block's skips, in the order diffusers collects them.
    pub fn skips(&self) -> Vec<&Tensor> {
        std::iter::once(&self.first).chain(self.down.iter().flat_map(UNetDownActivations::skips)).collect()
    }

    pub fn mid_output(&self) -> &Tensor {
        &self.mid.output
    }

    fn temb(&self) -> &Tensor {
        &self.time.output
    }

    fn down_input(&self, block: usize) -> &Tensor {
        if block == 0 {
            &self.first
        } else {
            self.down[block - 1].output()
        }
    }
}

impl Encoder {
    /// The time embedding of `timestep`, then the down blocks and the mid block from `first` (conv_in's
    /// output, which the caller computes: the ControlNet adds its condition to it).
    fn forward(
        &self,
        c: &UNetConfig,
        p: &ParamStore,
        first: Tensor,
        timestep: &Tensor,
        context: &Tensor,
        alloc: &mut dyn Allocator,
    ) -> Result<EncoderActivations> {
        let batch = first.shape()[0];
        ensure!(
            context.shape().len() == 3 && context.shape()[0] == batch && context.shape()[2] == c.cross_attention_dim,
            "encoder_hidden_states {:?} must be [{batch}, L, {}]",
            context.shape(),
            c.cross_attention_dim
        );
        let expanded = batch_timesteps(timestep, batch, alloc)?;
        let time = self.time_embedding.forward(p, expanded.as_ref().unwrap_or(timestep), c.flip_sin_to_cos, c.freq_shift, alloc)?;
        let mut down: Vec<UNetDownActivations> = Vec::new();
        for (i, block) in self.down.iter().enumerate() {
            let x = down.last().map_or(&first, UNetDownActivations::output);
            down.push(block.forward(p, x, &time.output, context, alloc).with_context(|| format!("down_blocks.{i}"))?);
        }
        let mid_input = down.last().map_or(&first, UNetDownActivations::output);
        let mid = self.mid.forward(p, mid_input, &time.output, context, alloc).context("mid_block")?;
        Ok(EncoderActivations { time, first, down, mid })
    }

    /// Backward of [`Encoder::forward`] from each skip's gradient (`dskips`, as [`EncoderActivations::skips`]
    /// orders them) and the mid output's, with `shared` holding what the layers after the encoder (the UNet's
    /// up blocks) sent to the time embedding and the context: returns the gradients of `first` and of the
    /// context, adds every parameter gradient.
    fn backward(
        &self,
        p: &ParamStore,
        g: &mut Grads,
        acts: &EncoderActivations,
        context: &Tensor,
        dskips: &[Tensor],
        dmid: &Tensor,
        mut shared: SharedGrads,
        alloc: &mut dyn Allocator,
    ) -> Result<(Tensor, Tensor)> {
        let temb = acts.temb();
        let last = self.down.len() - 1;
        let mut carried =
            self.mid.backward(p, g, acts.down_input(last + 1), temb, context, &acts.mid, dmid, &mut shared, alloc).context("mid_block backward")?;
        let mut end = dskips.len();
        for (i, block) in self.down.iter().enumerate().rev() {
            let count = acts.down[i].skips().len();
            let start = end - count;
            // The block's output is a skip and the next block's input: both gradients reach it.
            let output_total = sum(&carried, &dskips[end - 1], alloc)?;
            let mut block_dskips: Vec<&Tensor> = dskips[start..end - 1].iter().collect();
            block_dskips.push(&output_total);
            carried = block
                .backward(p, g, acts.down_input(i), temb, context, &acts.down[i], &block_dskips, &mut shared, alloc)
                .with_context(|| format!("down_blocks.{i} backward"))?;
            end = start;
        }
        ensure!(end == 1, "UNet encoder backward: {} skip gradients for {} skips", dskips.len(), acts.skips().len());
        let dfirst = sum(&carried, &dskips[0], alloc)?;
        let dtemb = shared.dtemb.ok_or_else(|| anyhow!("UNet encoder backward: no resnet took the time embedding"))?;
        self.time_embedding.backward(p, g, &acts.time, &dtemb, alloc)?;
        let dcontext = match shared.dcontext {
            Some(d) => d,
            None => alloc.alloc(context.shape(), context.dtype())?,
        };
        Ok((dfirst, dcontext))
    }
}

fn sum(a: &Tensor, b: &Tensor, alloc: &mut dyn Allocator) -> Result<Tensor> {
    let mut y = alloc.alloc(a.shape(), a.dtype())?;
    add(a, b, &mut y)?;
    Ok(y)
}

/// `sample` [B, in_channels, H, W] with H and W divisible by the down blocks' total downscaling (diffusers
/// then upsamples by exactly 2x each time).
fn check_sample(what: &str, c: &UNetConfig, sample: &Tensor) -> Result<()> {
    let s = sample.shape();
    let factor = 1 << (c.block_out_channels.len() - 1);
    ensure!(
        s.len() == 4 && s[1] == c.in_channels && s[2].is_multiple_of(factor) && s[3].is_multiple_of(factor),
        "{what}: sample {s:?} must be [B, {}, H, W] with H and W multiples of {factor}",
        c.in_channels
    );
    Ok(())
}

/// The UNet's inputs besides the sample; the residuals are a ControlNet's, one per skip connection plus the
/// mid block's, or none.
pub struct UNetConditioning<'a> {
    pub timestep: &'a Tensor,
    pub encoder_hidden_states: &'a Tensor,
    pub residuals: Option<(Vec<&'a Tensor>, &'a Tensor)>,
}

/// What [`UNet::backward`] reads.
pub struct UNetActivations {
    encoder: EncoderActivations,
    /// The skips and the mid output with the residuals added, when residuals were given.
    with_residuals: Option<(Vec<Tensor>, Tensor)>,
    up: Vec<UNetUpActivations>,
    norm_out: GroupNormActivations,
    pub output: Tensor,
}

impl UNetActivations {
    fn skips(&self) -> Vec<&Tensor> {
        match &self.with_residuals {
            Some((skips, _)) => skips.iter().collect(),
            None => self.encoder.skips(),
        }
    }

    fn mid_output(&self) -> &Tensor {
        match &self.with_residuals {
            Some((_, mid)) => mid,
            None => self.encoder.mid_output(),
        }
    }

    fn up_input(&self, block: usize) -> &Tensor {
        if block == 0 {
            self.mid_output()
        } else {
            self.up[block - 1].output()
        }
    }
}

/// The UNet's input gradients: the sample's, the context's, and each residual's when residuals were given.
pub struct UNetInputGrads {
    pub sample: Tensor,
    pub encoder_hidden_states: Tensor,
    pub residuals: Option<(Vec<Tensor>, Tensor)>,
}

impl UNet {
    /// `UNet2DConditionModel.forward(sample, timestep, encoder_hidden_states, ...)`: the predicted noise
    /// [B, out_channels, H, W].
    pub fn forward(&self, p: &ParamStore, sample: &Tensor, cond: &UNetConditioning, alloc: &mut dyn Allocator) -> Result<UNetActivations> {
        let c = &self.config;
        check_sample("UNet2DConditionModel", c, sample)?;
        let context = cond.encoder_hidden_states;
        let first = layers::conv(p, &self.encoder.conv_in, sample, alloc).context("UNet conv_in")?;
        let encoder = self.encoder.forward(c, p, first, cond.timestep, context, alloc).context("UNet2DConditionModel")?;
        let with_residuals = match &cond.residuals {
            Some((down, mid)) => {
                let skips = encoder.skips();
                ensure!(down.len() == skips.len(), "UNet2DConditionModel: {} down residuals for {} skip connections", down.len(), skips.len());
                let mut summed = Vec::new();
                for (i, (skip, r)) in skips.iter().zip(down).enumerate() {
                    ensure!(
                        r.shape() == skip.shape(),
                        "UNet2DConditionModel: down residual {i} {:?} does not match its skip {:?}",
                        r.shape(),
                        skip.shape()
                    );
                    summed.push(sum(skip, r, alloc)?);
                }
                let m = encoder.mid_output();
                ensure!(
                    mid.shape() == m.shape(),
                    "UNet2DConditionModel: mid residual {:?} does not match the mid block's output {:?}",
                    mid.shape(),
                    m.shape()
                );
                Some((summed, sum(m, mid, alloc)?))
            }
            None => None,
        };
        let (skips, mid_output) = match &with_residuals {
            Some((skips, mid)) => (skips.iter().collect(), mid),
            None => (encoder.skips(), encoder.mid_output()),
        };
        let mut up: Vec<UNetUpActivations> = Vec::new();
        let mut remaining = skips.len();
        for (i, block) in self.up.iter().enumerate() {
            let count = block.resnets.len();
            ensure!(count <= remaining, "UNet2DConditionModel: up_blocks.{i} needs {count} skips, {remaining} are left");
            let block_skips: Vec<&Tensor> = skips[remaining - count..remaining].iter().rev().copied().collect();
            let x = up.last().map_or(mid_output, UNetUpActivations::output);
            up.push(block.forward(p, x, &block_skips, encoder.temb(), context, alloc).with_context(|| format!("UNet up_blocks.{i}"))?);
            remaining -= count;
        }
        ensure!(remaining == 0, "UNet2DConditionModel: {remaining} skip connections left unused");
        let last = up.last().expect("at least one up block").output();
        let norm_out = layers::group_norm(p, &self.conv_norm_out, true, last, alloc).context("UNet conv_norm_out")?;
        let output = layers::conv(p, &self.conv_out, &norm_out.y, alloc).context("UNet conv_out")?;
        Ok(UNetActivations { encoder, with_residuals, up, norm_out, output })
    }

    /// Backward of [`UNet::forward`] from the output's gradient: returns the input gradients, adds every
    /// parameter gradient.
    pub fn backward(
        &self,
        p: &ParamStore,
        g: &mut Grads,
        sample: &Tensor,
        cond: &UNetConditioning,
        acts: &UNetActivations,
        dy: &Tensor,
        alloc: &mut dyn Allocator,
    ) -> Result<UNetInputGrads> {
        let context = cond.encoder_hidden_states;
        let last = acts.up.last().expect("at least one up block").output();
        let dnorm = layers::conv_back(p, g, &self.conv_out, &acts.norm_out.y, dy, alloc).context("UNet conv_out backward")?;
        let mut d =
            layers::group_norm_back(p, g, &self.conv_norm_out, true, last, &acts.norm_out, &dnorm, alloc).context("UNet conv_norm_out backward")?;
        let mut dskips: Vec<Option<Tensor>> = (0..acts.skips().len()).map(|_| None).collect();
        let mut shared = SharedGrads::default();
        let mut start = 0;
        for (i, block) in self.up.iter().enumerate().rev() {
            let (dx, block_dskips) = block
                .backward(p, g, acts.up_input(i), acts.encoder.temb(), context, &acts.up[i], &d, &mut shared, alloc)
                .with_context(|| format!("UNet up_blocks.{i} backward"))?;
            // The last up block consumed the first skips; each consumed its range most recent first.
            let end = start + block_dskips.len();
            for (k, ds) in block_dskips.into_iter().enumerate() {
                dskips[end - 1 - k] = Some(ds);
            }
            start = end;
            d = dx;
        }
        ensure!(start == dskips.len(), "UNet2DConditionModel backward: the up blocks consumed {start} of {} skips", dskips.len());
        let dskips: Vec<Tensor> = dskips.into_iter().map(|d| d.expect("every skip feeds one up resnet")).collect();
        let (dfirst, encoder_hidden_states) =
            self.encoder.backward(p, g, &acts.encoder, context, &dskips, &d, shared, alloc).context("UNet2DConditionModel backward")?;
        let dsample = layers::conv_back(p, g, &self.encoder.conv_in, sample, &dfirst, alloc).context("UNet conv_in backward")?;
        // A residual is added to its skip (or the mid output): it takes that tensor's gradient.
        let residuals = acts.with_residuals.as_ref().map(|_| (dskips, d));
        Ok(UNetInputGrads { sample: dsample, encoder_hidden_states, residuals })
    }
}

/// What [`ControlNet::backward`] reads, and the outputs.
pub struct ControlNetActivations {
    /// The conditioning embedding's convs before the last: each one's output and its SiLU (the next conv's
    /// input).
    cond_hidden: Vec<(Tensor, Tensor)>,
    encoder: EncoderActivations,
    conditioning_scale: f32,
    /// One residual per UNet skip connection, and the mid block's, each times `conditioning_scale`.
    pub down: Vec<Tensor>,
    pub mid: Tensor,
}

/// The ControlNet's input gradients.
pub struct ControlNetInputGrads {
    pub sample: Tensor,
    pub encoder_hidden_states: Tensor,
    pub controlnet_cond: Tensor,
}

impl ControlNet {
    /// A zero conv's output times the conditioning scale.
    fn zero_conv_forward(p: &ParamStore, conv: &Conv2d, x: &Tensor, s: f32, alloc: &mut dyn Allocator) -> Result<Tensor> {
        let z = layers::conv(p, conv, x, alloc)?;
        let mut y = alloc.alloc(z.shape(), z.dtype())?;
        scale(&z, s, &mut y)?;
        Ok(y)
    }

    fn zero_conv_backward(
        p: &ParamStore,
        g: &mut Grads,
        conv: &Conv2d,
        x: &Tensor,
        s: f32,
        dy: &Tensor,
        alloc: &mut dyn Allocator,
    ) -> Result<Tensor> {
        let mut dz = alloc.alloc(dy.shape(), dy.dtype())?;
        scale(dy, s, &mut dz)?;
        layers::conv_back(p, g, conv, x, &dz, alloc)
    }

    /// The conditioning embedding's convs that a SiLU follows: conv_in and the blocks.
    fn cond_convs(&self) -> Vec<&Conv2d> {
        std::iter::once(&self.cond_conv_in).chain(&self.cond_blocks).collect()
    }

    /// `ControlNetModel.forward(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale)`
    /// (no guess mode): `controlnet_cond` [B, conditioning_channels, H·f, W·f] with f =
    /// [`ControlNet::condition_downscale`].
    pub fn forward(
        &self,
        p: &ParamStore,
        sample: &Tensor,
        timestep: &Tensor,
        context: &Tensor,
        controlnet_cond: &Tensor,
        conditioning_scale: f32,
        alloc: &mut dyn Allocator,
    ) -> Result<ControlNetActivations> {
        let c = &self.config;
        check_sample("ControlNetModel", c, sample)?;
        let (s, f) = (sample.shape(), self.condition_downscale());
        let expected = [s[0], c.conditioning_channels, s[2] * f, s[3] * f];
        ensure!(
            controlnet_cond.shape() == expected,
            "ControlNetModel: controlnet_cond {:?} must be {expected:?} for sample {s:?}",
            controlnet_cond.shape()
        );
        let mut cond_hidden: Vec<(Tensor, Tensor)> = Vec::new();
        for (j, conv) in self.cond_convs().into_iter().enumerate() {
            let x = cond_hidden.last().map_or(controlnet_cond, |(_, a)| a);
            let h = layers::conv(p, conv, x, alloc).with_context(|| format!("ControlNetModel controlnet_cond_embedding conv {j}"))?;
            let mut a = alloc.alloc(h.shape(), h.dtype())?;
            silu_forward(&h, &mut a)?;
            cond_hidden.push((h, a));
        }
        let last = &cond_hidden.last().expect("conv_in at least").1;
        let embedding = layers::conv(p, &self.cond_conv_out, last, alloc).context("ControlNetModel controlnet_cond_embedding.conv_out")?;
        let h = layers::conv(p, &self.encoder.conv_in, sample, alloc).context("ControlNetModel conv_in")?;
        let first = sum(&h, &embedding, alloc)?;
        let encoder = self.encoder.forward(c, p, first, timestep, context, alloc).context("ControlNetModel")?;
        let skips = encoder.skips();
        ensure!(skips.len() == self.zero_convs.len(), "ControlNetModel: {} skips for {} zero convs", skips.len(), self.zero_convs.len());
        let down = skips
            .iter()
            .zip(&self.zero_convs)
            .enumerate()
            .map(|(i, (x, conv))| {
                Self::zero_conv_forward(p, conv, x, conditioning_scale, alloc).with_context(|| format!("ControlNetModel controlnet_down_blocks.{i}"))
            })
            .collect::<Result<Vec<_>>>()?;
        let mid = Self::zero_conv_forward(p, &self.mid_zero_conv, encoder.mid_output(), conditioning_scale, alloc)
            .context("ControlNetModel controlnet_mid_block")?;
        Ok(ControlNetActivations { cond_hidden, encoder, conditioning_scale, down, mid })
    }

    /// Backward of [`ControlNet::forward`] from the residuals' gradients: returns the input gradients, adds
    /// every parameter gradient.
    pub fn backward(
        &self,
        p: &ParamStore,
        g: &mut Grads,
        sample: &Tensor,
        context: &Tensor,
        controlnet_cond: &Tensor,
        acts: &ControlNetActivations,
        ddown: &[&Tensor],
        dmid: &Tensor,
        alloc: &mut dyn Allocator,
    ) -> Result<ControlNetInputGrads> {
        let s = acts.conditioning_scale;
        let skips = acts.encoder.skips();
        ensure!(ddown.len() == skips.len(), "ControlNetModel backward: {} residual gradients for {} residuals", ddown.len(), skips.len());
        let dskips = skips
            .iter()
            .zip(&self.zero_convs)
            .zip(ddown)
            .map(|((x, conv), dy)| Self::zero_conv_backward(p, g, conv, x, s, dy, alloc))
            .collect::<Result<Vec<_>>>()?;
        let dmid = Self::zero_conv_backward(p, g, &self.mid_zero_conv, acts.encoder.mid_output(), s, dmid, alloc)?;
        let (dfirst, encoder_hidden_states) =
            self.encoder.backward(p, g, &acts.encoder, context, &dskips, &dmid, SharedGrads::default(), alloc).context("ControlNetModel backward")?;
        let dsample = layers::conv_back(p, g, &self.encoder.conv_in, sample, &dfirst, alloc).context("ControlNetModel conv_in backward")?;
        let last = &acts.cond_hidden.last().expect("conv_in at least").1;
        let mut d = layers::conv_back(p, g, &self.cond_conv_out, last, &dfirst, alloc)
            .context("ControlNetModel controlnet_cond_embedding.conv_out backward")?;
        for (j, conv) in self.cond_convs().into_iter().enumerate().rev() {
            let (h, _) = &acts.cond_hidden[j];
            let mut dh = alloc.alloc(h.shape(), h.dtype())?;
            silu_backward(h, &d, &mut dh)?;
            let x = if j == 0 { controlnet_cond } else { &acts.cond_hidden[j - 1].1 };
            d = layers::conv_back(p, g, conv, x, &dh, alloc)
                .with_context(|| format!("ControlNetModel controlnet_cond_embedding conv {j} backward"))?;
        }
        Ok(ControlNetInputGrads { sample: dsample, encoder_hidden_states, controlnet_cond: d })
    }
}
