//! `AutoencoderKL`: configuration and module tree (encoder, quant convs, decoder), named as diffusers names
//! them. The mid-block attention's historical names (`query`, `key`, `value`, `proj_attn`) are accepted as
//! aliases when weights are loaded.

use std::path::Path;

use anyhow::{bail, ensure, Result};
use serde_json::{json, Value};

use crate::models::blocks::{downsampler, upsampler, Attention, DownBlock, MidBlock, ResnetBlock, UpBlock};
use crate::models::config::ConfigReader;
use crate::nn::{Conv2d, Norm, ParamTree};

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
        let r = ConfigReader::new(path, value);
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
        Ok(AutoencoderKlConfig {
            in_channels: r.usize("in_channels", 3)?,
            out_channels: r.usize("out_channels", 3)?,
            latent_channels: r.usize("latent_channels", 4)?,
            block_out_channels: boc,
            layers_per_block: r.usize("layers_per_block", 1)?,
            norm_num_groups: r.usize("norm_num_groups", 32)?,
            scaling_factor: r.f64("scaling_factor", 0.18215)?,
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
