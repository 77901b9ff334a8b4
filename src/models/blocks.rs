//! The diffusers building blocks shared by the UNet, the ControlNet and the AutoencoderKL, as parameter
//! structures named exactly like diffusers' modules (`resnets.0.norm1.weight`, ...).

use anyhow::{ensure, Result};

use crate::nn::{join, Conv2d, Linear, Norm, ParamTree};
use crate::ops::conv::Conv2dSpec;

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
