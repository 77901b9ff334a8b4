//! The SGDM modules, with the PyTorch state_dict names of their reference classes:
//! `SpatiotemporalEEGEncoder` (bidirectional LSTM over time + Conv1d across electrodes, fused by an MLP),
//! `StructuralVAE` (conv encoder, Gaussian latent, structure head, transposed-conv decoder) and
//! `ContrastiveAlignment` (the symmetric NT-Xent loss, no parameters).

use std::path::Path;

use anyhow::{ensure, Result};
use serde_json::Value;

use crate::conformance::{Named, Outputs};
use crate::models::config::ConfigReader;
use crate::ops::infonce::{infonce_backward, infonce_forward, InfoNceActivations};
use crate::runtime::device::Device;
use crate::tensor::{DType, Tensor};
use crate::weights::Component;
use crate::nn::{Conv1d, Conv2d, ConvTranspose2d, Linear, Lstm, ParamTree};
use crate::ops::conv::Conv2dSpec;

#[derive(Debug, Clone, PartialEq)]
pub struct EegEncoderConfig {
    pub n_channels: usize,
    pub n_timepoints: usize,
    pub latent_dim: usize,
    pub lstm_hidden: usize,
    pub lstm_layers: usize,
    pub spatial_channels: [usize; 2],
    pub fusion_hidden: usize,
}

impl EegEncoderConfig {
    pub fn from_json(path: &Path, value: &Value) -> Result<EegEncoderConfig> {
        let r = ConfigReader::new(path, value);
        let spatial = r.usizes("spatial_channels", &[128, 256])?;
        ensure!(spatial.len() == 2, "{}: 'spatial_channels' must hold 2 sizes, got {spatial:?}", path.display());
        Ok(EegEncoderConfig {
            n_channels: r.usize("n_channels", 64)?,
            n_timepoints: r.usize("n_timepoints", 500)?,
            latent_dim: r.usize("latent_dim", 512)?,
            lstm_hidden: r.usize("lstm_hidden", 256)?,
            lstm_layers: r.usize("lstm_layers", 2)?,
            spatial_channels: [spatial[0], spatial[1]],
            fusion_hidden: r.usize("fusion_hidden", 1024)?,
        })
    }
}

/// `SpatiotemporalEEGEncoder`: output = fusion(concat(LSTM output at the last time step, pooled spatial
/// features)). The spatial branch convolves across electrodes with time as channels.
#[derive(Debug, Clone)]
pub struct EegEncoder {
    pub config: EegEncoderConfig,
    pub params: ParamTree,
    pub temporal: Lstm,
    pub spatial: [Conv1d; 2],
    pub fusion: [Linear; 2],
}

impl EegEncoder {
    pub fn new(config: EegEncoderConfig) -> Result<EegEncoder> {
        let c = &config;
        ensure!(c.lstm_layers >= 1, "SpatiotemporalEEGEncoder: lstm_layers must be at least 1");
        let mut t = ParamTree::new();
        let temporal = Lstm::new(&mut t, "temporal_encoder", c.n_channels, c.lstm_hidden, c.lstm_layers, true);
        let [c0, c1] = c.spatial_channels;
        let spatial = [
            Conv1d::new(&mut t, "spatial_encoder.0", c.n_timepoints, c0, 3, 1),
            Conv1d::new(&mut t, "spatial_encoder.2", c0, c1, 3, 1),
        ];
        let fusion = [
            Linear::new(&mut t, "fusion.0", 2 * c.lstm_hidden + c1, c.fusion_hidden, true),
            Linear::new(&mut t, "fusion.2", c.fusion_hidden, c.latent_dim, true),
        ];
        Ok(EegEncoder { config, params: t, temporal, spatial, fusion })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct StructuralVaeConfig {
    pub latent_dim: usize,
    pub structure_dim: usize,
    pub image_size: usize,
    pub channels: [usize; 3],
    pub hidden: usize,
}

impl StructuralVaeConfig {
    pub fn from_json(path: &Path, value: &Value) -> Result<StructuralVaeConfig> {
        let r = ConfigReader::new(path, value);
        let ch = r.usizes("channels", &[64, 128, 256])?;
        ensure!(ch.len() == 3, "{}: 'channels' must hold 3 sizes, got {ch:?}", path.display());
        let image_size = r.usize("image_size", 128)?;
        ensure!(image_size.is_multiple_of(8) && image_size > 0, "{}: 'image_size' {image_size} is not a multiple of 8", path.display());
        Ok(StructuralVaeConfig {
            latent_dim: r.usize("latent_dim", 512)?,
            structure_dim: r.usize("structure_dim", 256)?,
            image_size,
            channels: [ch[0], ch[1], ch[2]],
            hidden: r.usize("hidden", 1024)?,
        })
    }
}

/// `StructuralVAE`: `encoder` (three Conv2d k4 s2 p1 + ReLU, flatten, Linear + ReLU), `fc_mu`, `fc_logvar`,
/// `structure_head`, `decoder` (Linear, unflatten, three ConvTranspose2d k4 s2 p1 with ReLU between,
/// Sigmoid). The indices in the names are those of the reference `nn.Sequential`s.
#[derive(Debug, Clone)]
pub struct StructuralVae {
    pub config: StructuralVaeConfig,
    pub params: ParamTree,
    pub encoder_convs: [Conv2d; 3],
    pub encoder_fc: Linear,
    pub fc_mu: Linear,
    pub fc_logvar: Linear,
    pub structure_head: Linear,
    pub decoder_fc: Linear,
    pub decoder_deconvs: [ConvTranspose2d; 3],
}

impl StructuralVae {
    pub fn new(config: StructuralVaeConfig) -> Result<StructuralVae> {
        let c = &config;
        let mut t = ParamTree::new();
        let [c0, c1, c2] = c.channels;
        let s = c.image_size / 8;
        let k4 = |t: &mut ParamTree, name: &str, i: usize, o: usize| Conv2d::new(t, name, i, o, 4, Conv2dSpec::new(2, 1), true);
        let encoder_convs = [k4(&mut t, "encoder.0", 3, c0), k4(&mut t, "encoder.2", c0, c1), k4(&mut t, "encoder.4", c1, c2)];
        let encoder_fc = Linear::new(&mut t, "encoder.7", c2 * s * s, c.hidden, true);
        let fc_mu = Linear::new(&mut t, "fc_mu", c.hidden, c.latent_dim, true);
        let fc_logvar = Linear::new(&mut t, "fc_logvar", c.hidden, c.latent_dim, true);
        let structure_head = Linear::new(&mut t, "structure_head", c.latent_dim, c.structure_dim, true);
        let decoder_fc = Linear::new(&mut t, "decoder.0", c.latent_dim, c2 * s * s, true);
        let decoder_deconvs = [
            ConvTranspose2d::new(&mut t, "decoder.2", c2, c1, 4, 2, 1),
            ConvTranspose2d::new(&mut t, "decoder.4", c1, c0, 4, 2, 1),
            ConvTranspose2d::new(&mut t, "decoder.6", c0, 3, 4, 2, 1),
        ];
        Ok(StructuralVae { config, params: t, encoder_convs, encoder_fc, fc_mu, fc_logvar, structure_head, decoder_fc, decoder_deconvs })
    }
}

/// `ContrastiveAlignment`: the symmetric NT-Xent loss at a temperature; it has no parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ContrastiveAlignment {
    pub temperature: f64,
}

impl ContrastiveAlignment {
    pub fn from_json(path: &Path, value: &Value) -> Result<ContrastiveAlignment> {
        let temperature = ConfigReader::new(path, value).f64("temperature", 0.07)?;
        ensure!(temperature > 0.0, "{}: 'temperature' must be positive, got {temperature}", path.display());
        Ok(ContrastiveAlignment { temperature })
    }
}

/// `sgdm forward` for ContrastiveAlignment: inputs `eeg_embed` and `visual_embed` [B, D]; output `loss` [1];
/// with an upstream gradient for `loss`, `grad.eeg_embed` and `grad.visual_embed`.
pub fn run_contrastive_alignment(c: &Component, inputs: &Named, grads: Option<&Named>, device: &Device, dtype: DType) -> Result<Outputs> {
    let m = ContrastiveAlignment::from_json(&c.dir.join("config.json"), &c.config)?;
    c.weights.ensure_all_used()?;
    inputs.ensure_only(&["eeg_embed", "visual_embed"])?;
    let (a, b) = (inputs.get("eeg_embed")?, inputs.get("visual_embed")?);
    ensure!(a.shape().len() == 2 && a.shape() == b.shape(), "{}: eeg_embed {:?} and visual_embed {:?} must both be [B, D]", inputs.source, a.shape(), b.shape());
    let (batch, dim) = (a.shape()[0], a.shape()[1]);
    let mut acts = InfoNceActivations::zeros(device, batch, dim, dtype)?;
    infonce_forward(a, b, m.temperature as f32, &mut acts)?;
    let mut out = vec![("loss".to_string(), Tensor::from_f32(device, &[1], DType::F32, &[acts.loss()?])?)];
    if let Some(g) = grads {
        g.ensure_only(&["loss"])?;
        let dloss = g.get_shaped("loss", &[1])?.to_f32_vec()?[0];
        let mut da = Tensor::zeros(device, &[batch, dim], dtype)?;
        let mut db = Tensor::zeros(device, &[batch, dim], dtype)?;
        infonce_backward(&mut acts, dloss, &mut da, &mut db)?;
        out.push(("grad.eeg_embed".to_string(), da));
        out.push(("grad.visual_embed".to_string(), db));
    }
    Ok(out)
}
