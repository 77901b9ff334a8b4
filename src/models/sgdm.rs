//! The SGDM modules, with the PyTorch state_dict names of their reference classes:
//! `SpatiotemporalEEGEncoder` (bidirectional LSTM over time + Conv1d across electrodes, fused by an MLP),
//! `StructuralVAE` (conv encoder, Gaussian latent, structure head, transposed-conv decoder) and
//! `ContrastiveAlignment` (the symmetric NT-Xent loss, no parameters).

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::models::config::ConfigReader;
use crate::models::layers;
use crate::nn::{Allocator, Conv1d, Conv2d, ConvTranspose2d, Grads, Linear, Lstm, ParamStore, ParamTree};
use crate::ops::conv::{conv1d_backward_input, conv1d_forward, Conv2dSpec};
use crate::ops::elementwise::{
    add, relu_backward, relu_forward, reparameterize_backward, reparameterize_forward, scale, sigmoid_backward, sigmoid_forward,
};
use crate::ops::lstm::{lstm_backward, lstm_forward, LstmActivations, LstmBackwardScratch, LstmConfig, LstmParams};
use crate::ops::shape::{avg_pool_last, avg_pool_last_backward, concat_channels, split_channels, transpose_last2, transpose_last2_backward};
use crate::tensor::{DType, Tensor};

/// Also read from a training configuration's TOML (every field required there).
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct EegEncoderConfig {
    pub n_channels: usize,
    pub n_timepoints: usize,
    pub latent_dim: usize,
    pub lstm_hidden: usize,
    pub lstm_layers: usize,
    pub spatial_channels: [usize; 2],
    pub fusion_hidden: usize,
    /// The structure map's size (E·E) predicted by the encoder's own structure head from the embedding,
    /// trained with the encoder (stage `encoder`'s `structure_weight`). 0 (the default, and the paper's
    /// encoder): no head, the structure map comes from the StructuralVAE's structure head on the rescaled
    /// embedding.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub structure_dim: usize,
    /// The head's hidden width: 0 (the default) makes it one Linear (`structure_head`, which stage `encoder`
    /// starts from the StructuralVAE's structure head), more an MLP (`structure_head.0`, ReLU,
    /// `structure_head.2`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub structure_hidden: usize,
    /// A linear read-out beside the two branches: the embedding gains `linear_path · flatten(eeg)` (no bias;
    /// the EEG flattened electrode by electrode). false (the default, and the paper's encoder): none.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub linear_path: bool,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl EegEncoderConfig {
    /// Reads `encoder_config.json` (or a model folder's `config.json`); a key it does not know is refused.
    pub fn from_json(path: &Path, value: &Value) -> Result<EegEncoderConfig> {
        let r = ConfigReader::new(path, value);
        let spatial = r.usizes("spatial_channels", &[128, 256])?;
        ensure!(spatial.len() == 2, "{}: 'spatial_channels' must hold 2 sizes, got {spatial:?}", path.display());
        let config = EegEncoderConfig {
            n_channels: r.usize("n_channels", 64)?,
            n_timepoints: r.usize("n_timepoints", 500)?,
            latent_dim: r.usize("latent_dim", 512)?,
            lstm_hidden: r.usize("lstm_hidden", 256)?,
            lstm_layers: r.usize("lstm_layers", 2)?,
            spatial_channels: [spatial[0], spatial[1]],
            fusion_hidden: r.usize("fusion_hidden", 1024)?,
            structure_hidden: r.usize("structure_hidden", 0)?,
            structure_dim: r.usize("structure_dim", 0)?,
            linear_path: r.bool("linear_path", false)?,
        };
        r.refuse_unread(&[])?;
        Ok(config)
    }
}

/// `SpatiotemporalEEGEncoder`: output = fusion(concat(LSTM output at the last time step, pooled spatial
/// features)). The spatial branch convolves across electrodes with time as channels. Two optional parts
/// beside the paper's encoder: a linear path (the embedding gains `W · flatten(eeg)`) and a structure head
/// from the embedding to a structure map ([`EegEncoder::structure`]).
#[derive(Debug, Clone)]
pub struct EegEncoder {
    pub config: EegEncoderConfig,
    pub params: ParamTree,
    pub temporal: Lstm,
    pub spatial: [Conv1d; 2],
    pub fusion: [Linear; 2],
    pub structure_head: Option<StructureHead>,
    pub linear_path: Option<Linear>,
}

/// The encoder's structure head (see [`EegEncoderConfig::structure_hidden`]).
#[derive(Debug, Clone)]
pub enum StructureHead {
    Linear(Linear),
    Mlp([Linear; 2]),
}

impl EegEncoder {
    pub fn new(config: EegEncoderConfig) -> Result<EegEncoder> {
        let c = &config;
        ensure!(c.lstm_layers >= 1, "SpatiotemporalEEGEncoder: lstm_layers must be at least 1");
        ensure!(
            c.structure_dim > 0 || c.structure_hidden == 0,
            "SpatiotemporalEEGEncoder: structure_hidden {} needs a structure head: set structure_dim",
            c.structure_hidden
        );
        let mut t = ParamTree::new();
        let temporal = Lstm::new(&mut t, "temporal_encoder", c.n_channels, c.lstm_hidden, c.lstm_layers, true);
        let [c0, c1] = c.spatial_channels;
        let spatial = [Conv1d::new(&mut t, "spatial_encoder.0", c.n_timepoints, c0, 3, 1), Conv1d::new(&mut t, "spatial_encoder.2", c0, c1, 3, 1)];
        let fusion = [
            Linear::new(&mut t, "fusion.0", 2 * c.lstm_hidden + c1, c.fusion_hidden, true),
            Linear::new(&mut t, "fusion.2", c.fusion_hidden, c.latent_dim, true),
        ];
        let structure_head = match (c.structure_dim, c.structure_hidden) {
            (0, _) => None,
            (dim, 0) => Some(StructureHead::Linear(Linear::new(&mut t, "structure_head", c.latent_dim, dim, true))),
            (dim, hidden) => Some(StructureHead::Mlp([
                Linear::new(&mut t, "structure_head.0", c.latent_dim, hidden, true),
                Linear::new(&mut t, "structure_head.2", hidden, dim, true),
            ])),
        };
        let linear_path = c.linear_path.then(|| Linear::new(&mut t, "linear_path", c.n_channels * c.n_timepoints, c.latent_dim, false));
        Ok(EegEncoder { config, params: t, temporal, spatial, fusion, structure_head, linear_path })
    }
}

/// What [`EegEncoder::backward`] needs from a forward, and the forward's output `embedding`.
pub struct EegEncoderActivations {
    /// `eeg` transposed to [B, T, C]: the LSTM's batch-first sequence, and the spatial branch's input with
    /// the time steps as channels and the electrodes as the length.
    eeg_t: Tensor,
    lstm: LstmActivations,
    /// [1, T, 1], one at the last step: a 1x1 Conv1d with it as its only filter picks `temporal[:, -1]`.
    last_step: Tensor,
    /// After each Conv1d's ReLU, [B, c0, C] and [B, c1, C].
    spatial: [Tensor; 2],
    /// `cat(temporal[:, -1], pooled spatial features)`, [B, 2H + c1].
    fused: Tensor,
    /// After `fusion.0` and its ReLU, [B, fusion_hidden].
    hidden: Tensor,
    /// With the linear path: the EEG flattened to [B, C·T], its input.
    flat: Option<Tensor>,
    /// [B, latent_dim].
    pub embedding: Tensor,
}

const EEG_ENCODER: &str = "SpatiotemporalEEGEncoder";

impl EegEncoder {
    fn lstm_config(&self) -> LstmConfig {
        let t = &self.temporal;
        LstmConfig { input_size: t.input, hidden_size: t.hidden, num_layers: t.layers.len(), bidirectional: t.layers[0].len() == 2 }
    }

    /// The LSTM's parameter ids in `LstmParams` order (per layer and direction: W_ih, W_hh, b_ih, b_hh).
    fn lstm_ids(&self) -> Vec<crate::nn::ParamId> {
        self.temporal.layers.iter().flatten().flat_map(|d| [d.weight_ih, d.weight_hh, d.bias_ih, d.bias_hh]).collect()
    }

    /// The LSTM's parameters as `ops::lstm` takes them: views of the tensors in `p`, nothing copied.
    fn lstm_params<'p>(&self, p: &'p ParamStore) -> Result<LstmParams<&'p Tensor>> {
        LstmParams::from_tensors(self.lstm_config(), self.lstm_ids().into_iter().map(|id| p.get(id)))
    }

    /// `eeg` [B, n_channels, n_timepoints] -> `embedding` [B, latent_dim], keeping what backward needs.
    pub fn forward(&self, p: &ParamStore, eeg: &Tensor, alloc: &mut dyn Allocator) -> Result<EegEncoderActivations> {
        let c = &self.config;
        let s = eeg.shape();
        ensure!(
            s.len() == 3 && s[0] > 0 && s[1..] == [c.n_channels, c.n_timepoints],
            "{EEG_ENCODER}: eeg must be [B, {} electrodes, {} time points] with B > 0, got {s:?}",
            c.n_channels,
            c.n_timepoints
        );
        let (b, ch, t, dtype) = (s[0], s[1], s[2], eeg.dtype());
        let mut eeg_t = alloc.alloc(&[b, t, ch], dtype)?;
        transpose_last2(eeg, &mut eeg_t).with_context(|| format!("{EEG_ENCODER}: eeg.transpose(1, 2)"))?;

        let config = self.lstm_config();
        let lstm_params = self.lstm_params(p)?;
        let mut lstm = LstmActivations::new(config, b, t, dtype, alloc)?;
        lstm_forward(&lstm_params, &eeg_t, &mut lstm).with_context(|| format!("{EEG_ENCODER}: temporal_encoder"))?;
        let last_step = last_step_filter(t, dtype, alloc)?;
        let out = config.output_size();
        let mut temporal = alloc.alloc(&[b, 1, out], dtype)?;
        conv1d_forward(lstm.output(), &last_step, None, 1, 0, &mut temporal)
            .with_context(|| format!("{EEG_ENCODER}: temporal_encoder output at the last step"))?;

        let s0 = relu(&layers::conv1d(p, &self.spatial[0], &eeg_t, alloc).with_context(|| format!("{EEG_ENCODER}: spatial_encoder.0"))?, alloc)?;
        let s1 = relu(&layers::conv1d(p, &self.spatial[1], &s0, alloc).with_context(|| format!("{EEG_ENCODER}: spatial_encoder.2"))?, alloc)?;
        let c1 = self.spatial[1].output;
        let mut pooled = alloc.alloc(&[b, c1, 1], dtype)?;
        avg_pool_last(&s1, &mut pooled).with_context(|| format!("{EEG_ENCODER}: spatial_encoder.4"))?;

        let mut fused = alloc.alloc(&[b, out + c1, 1, 1], dtype)?;
        concat_channels(&temporal.reshape(&[b, out, 1, 1])?, &pooled.reshape(&[b, c1, 1, 1])?, &mut fused)
            .with_context(|| format!("{EEG_ENCODER}: concatenating the temporal and spatial features"))?;
        let fused = fused.reshape(&[b, out + c1])?;
        let hidden = relu(&layers::linear(p, &self.fusion[0], &fused, alloc).with_context(|| format!("{EEG_ENCODER}: fusion.0"))?, alloc)?;
        let mut embedding = layers::linear(p, &self.fusion[1], &hidden, alloc).with_context(|| format!("{EEG_ENCODER}: fusion.2"))?;
        let mut flat = None;
        if let Some(l) = &self.linear_path {
            let mut x = alloc.alloc(eeg.shape(), dtype)?;
            scale(eeg, 1.0, &mut x)?;
            let x = x.reshape(&[b, ch * t])?;
            let read_out = layers::linear(p, l, &x, alloc).with_context(|| format!("{EEG_ENCODER}: linear_path"))?;
            embedding = layers::sum(&embedding, &read_out, alloc)?;
            flat = Some(x);
        }
        Ok(EegEncoderActivations { eeg_t, lstm, last_step, spatial: [s0, s1], fused, hidden, flat, embedding })
    }

    /// Backward from `dembedding` (the gradient of `acts.embedding`): accumulates every parameter gradient
    /// into `grads` (`+=`) and, when `input_grad`, returns the gradient of `eeg` (written).
    pub fn backward(
        &self,
        p: &ParamStore,
        acts: &EegEncoderActivations,
        dembedding: &Tensor,
        grads: &mut Grads,
        input_grad: bool,
        alloc: &mut dyn Allocator,
    ) -> Result<Option<Tensor>> {
        ensure!(
            dembedding.shape() == acts.embedding.shape(),
            "{EEG_ENCODER}: the gradient of embedding has shape {:?}, the embedding {:?}",
            dembedding.shape(),
            acts.embedding.shape()
        );
        let [b, t, ch] = [acts.eeg_t.shape()[0], acts.eeg_t.shape()[1], acts.eeg_t.shape()[2]];
        let dtype = acts.eeg_t.dtype();
        let config = self.lstm_config();
        let (out, c1) = (config.output_size(), self.spatial[1].output);

        let mut dhidden = alloc.alloc(acts.hidden.shape(), dtype)?;
        layers::linear_back(p, grads, &self.fusion[1], &acts.hidden, dembedding, Some(&mut dhidden))
            .with_context(|| format!("{EEG_ENCODER}: fusion.2 backward"))?;
        let dhidden = relu_grad(&acts.hidden, &dhidden, alloc)?;
        let mut dfused = alloc.alloc(acts.fused.shape(), dtype)?;
        layers::linear_back(p, grads, &self.fusion[0], &acts.fused, &dhidden, Some(&mut dfused))
            .with_context(|| format!("{EEG_ENCODER}: fusion.0 backward"))?;
        let mut dtemporal = alloc.alloc(&[b, out, 1, 1], dtype)?;
        let mut dpooled = alloc.alloc(&[b, c1, 1, 1], dtype)?;
        split_channels(&dfused.reshape(&[b, out + c1, 1, 1])?, &mut dtemporal, &mut dpooled)?;

        // The LSTM's backward takes the gradient of its whole output: the last step's, zero elsewhere
        // (exact zeros: each is the last-step filter's 0 times a finite gradient).
        let mut dsequence = alloc.alloc(&[b, t, out], dtype)?;
        conv1d_backward_input(&dtemporal.reshape(&[b, 1, out])?, &acts.last_step, 1, 0, &mut dsequence)?;
        let mut scratch = LstmBackwardScratch::new(config, b, t, dtype, alloc)?;
        let mut dx_temporal = input_grad.then(|| alloc.alloc(&[b, t, ch], dtype)).transpose()?;
        let mut lstm_grads = LstmParams::from_tensors(config, grads.many_mut(&self.lstm_ids()))?;
        lstm_backward(&self.lstm_params(p)?, &acts.eeg_t, &acts.lstm, &dsequence, dx_temporal.as_mut(), &mut lstm_grads, &mut scratch)
            .with_context(|| format!("{EEG_ENCODER}: temporal_encoder backward"))?;

        let mut ds1 = alloc.alloc(acts.spatial[1].shape(), dtype)?;
        avg_pool_last_backward(&dpooled.reshape(&[b, c1, 1])?, &mut ds1)?;
        let ds1 = relu_grad(&acts.spatial[1], &ds1, alloc)?;
        let mut ds0 = alloc.alloc(acts.spatial[0].shape(), dtype)?;
        layers::conv1d_back(p, grads, &self.spatial[1], &acts.spatial[0], &ds1, Some(&mut ds0))
            .with_context(|| format!("{EEG_ENCODER}: spatial_encoder.2 backward"))?;
        let ds0 = relu_grad(&acts.spatial[0], &ds0, alloc)?;
        let mut dx_spatial = input_grad.then(|| alloc.alloc(&[b, t, ch], dtype)).transpose()?;
        layers::conv1d_back(p, grads, &self.spatial[0], &acts.eeg_t, &ds0, dx_spatial.as_mut())
            .with_context(|| format!("{EEG_ENCODER}: spatial_encoder.0 backward"))?;

        let mut dx_linear = None;
        if let (Some(l), Some(flat)) = (&self.linear_path, &acts.flat) {
            let mut d = input_grad.then(|| alloc.alloc(flat.shape(), dtype)).transpose()?;
            layers::linear_back(p, grads, l, flat, dembedding, d.as_mut()).with_context(|| format!("{EEG_ENCODER}: linear_path backward"))?;
            dx_linear = d;
        }

        let (Some(dx_temporal), Some(dx_spatial)) = (dx_temporal, dx_spatial) else { return Ok(None) };
        let mut dx = alloc.alloc(&[b, t, ch], dtype)?;
        add(&dx_temporal, &dx_spatial, &mut dx)?;
        let mut deeg = alloc.alloc(&[b, ch, t], dtype)?;
        transpose_last2_backward(&dx, &mut deeg)?;
        if let Some(d) = dx_linear {
            deeg = layers::sum(&deeg, &d.reshape(&[b, ch, t])?, alloc)?;
        }
        Ok(Some(deeg))
    }
}

/// What [`EegEncoder::structure`] computed: the MLP head's hidden layer (after its ReLU) and the map.
pub struct EegStructureActivations {
    hidden: Option<Tensor>,
    /// `[B, structure_dim]`.
    pub structure: Tensor,
}

impl EegEncoder {
    /// The structure head on `embedding` `[B, latent_dim]`: `[B, structure_dim]`, or `None` when the encoder
    /// has no head.
    pub fn structure(&self, p: &ParamStore, embedding: &Tensor, alloc: &mut dyn Allocator) -> Result<Option<EegStructureActivations>> {
        let context = |name: &str| format!("{EEG_ENCODER}: {name}");
        match &self.structure_head {
            None => Ok(None),
            Some(StructureHead::Linear(l)) => {
                let structure = layers::linear(p, l, embedding, alloc).with_context(|| context("structure_head"))?;
                Ok(Some(EegStructureActivations { hidden: None, structure }))
            }
            Some(StructureHead::Mlp([first, second])) => {
                let hidden = relu(&layers::linear(p, first, embedding, alloc).with_context(|| context("structure_head.0"))?, alloc)?;
                let structure = layers::linear(p, second, &hidden, alloc).with_context(|| context("structure_head.2"))?;
                Ok(Some(EegStructureActivations { hidden: Some(hidden), structure }))
            }
        }
    }

    /// Backward of [`EegEncoder::structure`] from `dstructure`: accumulates the head's parameter gradients
    /// and returns the gradient of `embedding`.
    pub fn structure_backward(
        &self,
        p: &ParamStore,
        embedding: &Tensor,
        acts: &EegStructureActivations,
        dstructure: &Tensor,
        grads: &mut Grads,
        alloc: &mut dyn Allocator,
    ) -> Result<Tensor> {
        ensure!(
            dstructure.shape() == acts.structure.shape(),
            "{EEG_ENCODER}: the gradient of structure has shape {:?}, the structure {:?}",
            dstructure.shape(),
            acts.structure.shape()
        );
        let context = |name: &str| format!("{EEG_ENCODER}: {name} backward");
        let mut dembedding = alloc.alloc(embedding.shape(), embedding.dtype())?;
        match (&self.structure_head, &acts.hidden) {
            (Some(StructureHead::Linear(l)), None) => {
                layers::linear_back(p, grads, l, embedding, dstructure, Some(&mut dembedding)).with_context(|| context("structure_head"))?;
            }
            (Some(StructureHead::Mlp([first, second])), Some(hidden)) => {
                let mut dhidden = alloc.alloc(hidden.shape(), hidden.dtype())?;
                layers::linear_back(p, grads, second, hidden, dstructure, Some(&mut dhidden)).with_context(|| context("structure_head.2"))?;
                let dhidden = relu_grad(hidden, &dhidden, alloc)?;
                layers::linear_back(p, grads, first, embedding, &dhidden, Some(&mut dembedding)).with_context(|| context("structure_head.0"))?;
            }
            _ => bail!("{EEG_ENCODER}: structure_backward needs the activations of this encoder's structure head"),
        }
        Ok(dembedding)
    }
}

impl StructuralVae {
    /// The structure maps `[B, E·E]` the structure head predicts from EEG embeddings `[B, latent]`, each row
    /// rescaled to length `norm` first (zero rows stay zero): InfoNCE fixes only an embedding's direction,
    /// and `norm` is the length the head saw in training (the mean length of the VAE's mu). The ControlNet's
    /// condition at reconstruction and in stage `controlnet`.
    pub fn structure_from_embedding(&self, p: &ParamStore, embedding: &Tensor, norm: f32, alloc: &mut dyn Allocator) -> Result<Tensor> {
        let mut scaled = alloc.alloc(embedding.shape(), embedding.dtype())?;
        crate::ops::sampling::rescale_rows(embedding, norm, &mut scaled)?;
        layers::linear(p, &self.structure_head, &scaled, alloc)
    }
}

/// The structure maps `[B, E·E]` the ControlNet is conditioned on, from EEG embeddings: the encoder's own
/// structure head when it has one, else the StructuralVAE's on the embeddings rescaled to `norm`
/// ([`StructuralVae::structure_from_embedding`]). Inference and stage `controlnet` both take them from here.
pub fn structure_maps(
    encoder: (&EegEncoder, &ParamStore),
    svae: (&StructuralVae, &ParamStore),
    embedding: &Tensor,
    norm: f32,
    alloc: &mut dyn Allocator,
) -> Result<Tensor> {
    match encoder.0.structure(encoder.1, embedding, alloc)? {
        Some(head) => Ok(head.structure),
        None => svae.0.structure_from_embedding(svae.1, embedding, norm, alloc),
    }
}

/// `[B, E·E]` structure maps -> `[B, E·f, E·f]`, nearest-neighbour: the ControlNet's condition images (and
/// the structure maps reconstruct writes) at `f` times the map's side.
pub fn upsample_nearest(maps: &[f32], edge: usize, factor: usize) -> Vec<f32> {
    let out = edge * factor;
    maps.chunks_exact(edge * edge).flat_map(|map| (0..out * out).map(move |i| map[(i / out / factor) * edge + (i % out) / factor])).collect()
}

/// The [1, T, 1] Conv1d filter that picks step T - 1 of a [B, T, F] sequence read as T channels of length
/// F. The ops have no strided slice; this one is exact (one product by 1, the others by 0, summed) and its
/// input gradient is the scatter back into a dense [B, T, F] that the LSTM's backward reads.
fn last_step_filter(steps: usize, dtype: DType, alloc: &mut dyn Allocator) -> Result<Tensor> {
    let mut f = alloc.alloc(&[1, steps, 1], dtype)?;
    let mut one_hot = vec![0.0; steps];
    one_hot[steps - 1] = 1.0;
    f.write_f32(&one_hot)?;
    Ok(f)
}

/// Also read from a training configuration's TOML (every field required there).
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct StructuralVaeConfig {
    pub latent_dim: usize,
    pub structure_dim: usize,
    pub image_size: usize,
    pub channels: [usize; 3],
    pub hidden: usize,
}

impl StructuralVaeConfig {
    /// Reads `vae_config.json` (or a model folder's `config.json`); a key it does not know is refused.
    pub fn from_json(path: &Path, value: &Value) -> Result<StructuralVaeConfig> {
        let r = ConfigReader::new(path, value);
        let ch = r.usizes("channels", &[64, 128, 256])?;
        ensure!(ch.len() == 3, "{}: 'channels' must hold 3 sizes, got {ch:?}", path.display());
        let image_size = r.usize("image_size", 128)?;
        ensure!(image_size.is_multiple_of(8) && image_size > 0, "{}: 'image_size' {image_size} is not a multiple of 8", path.display());
        let config = StructuralVaeConfig {
            latent_dim: r.usize("latent_dim", 512)?,
            structure_dim: r.usize("structure_dim", 256)?,
            image_size,
            channels: [ch[0], ch[1], ch[2]],
            hidden: r.usize("hidden", 1024)?,
        };
        r.refuse_unread(&[])?;
        Ok(config)
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

/// What [`StructuralVae::backward`] needs from a forward, and the forward's outputs.
pub struct StructuralVaeActivations {
    /// After each encoder conv's ReLU: [B, c0, S/2, S/2], [B, c1, S/4, S/4] and [B, c2·s·s] (the last
    /// flattened, as `encoder.7` reads it).
    encoder: [Tensor; 3],
    /// After `encoder.7` and its ReLU, [B, hidden].
    hidden: Tensor,
    /// [B, latent_dim].
    pub mu: Tensor,
    /// [B, latent_dim].
    pub logvar: Tensor,
    /// `mu + eps·exp(logvar / 2)` when an `eps` was given; `None` when z is `mu`.
    z: Option<Tensor>,
    /// `structure_head(z)`, [B, structure_dim].
    pub structure: Tensor,
    /// `decoder.0`'s output unflattened to [B, c2, s, s], then the first two deconvolutions after their ReLUs.
    decoder: [Tensor; 3],
    /// The reconstruction after the Sigmoid, [B, 3, S, S].
    pub recon: Tensor,
}

/// The upstream gradients of the four outputs (pass zeros for an output no loss reads).
pub struct StructuralVaeOutputGrads<'a> {
    pub recon: &'a Tensor,
    pub mu: &'a Tensor,
    pub logvar: &'a Tensor,
    pub structure: &'a Tensor,
}

/// Gradients of the inputs: `image`, and `eps` when one was given.
pub struct StructuralVaeInputGrads {
    pub image: Tensor,
    pub eps: Option<Tensor>,
}

const STRUCTURAL_VAE: &str = "StructuralVAE";

impl StructuralVae {
    /// `image` [B, 3, S, S] and an optional standard-normal `eps` [B, latent_dim] -> `recon`, `mu`, `logvar`,
    /// `structure`, keeping what backward needs. Without `eps`, z = mu (deterministic).
    pub fn forward(&self, p: &ParamStore, image: &Tensor, eps: Option<&Tensor>, alloc: &mut dyn Allocator) -> Result<StructuralVaeActivations> {
        let c = &self.config;
        let (size, latent) = (c.image_size, c.latent_dim);
        let s = image.shape();
        ensure!(
            s.len() == 4 && s[0] > 0 && s[1..] == [3, size, size],
            "{STRUCTURAL_VAE}: image must be [B, 3, {size}, {size}] with B > 0, got {s:?}"
        );
        let b = s[0];
        if let Some(e) = eps {
            ensure!(e.shape() == [b, latent], "{STRUCTURAL_VAE}: eps must be [{b}, {latent}], got {:?}", e.shape());
        }
        let e0 = relu(&layers::conv(p, &self.encoder_convs[0], image, alloc).with_context(|| format!("{STRUCTURAL_VAE}: encoder.0"))?, alloc)?;
        let e1 = relu(&layers::conv(p, &self.encoder_convs[1], &e0, alloc).with_context(|| format!("{STRUCTURAL_VAE}: encoder.2"))?, alloc)?;
        let e2 = relu(&layers::conv(p, &self.encoder_convs[2], &e1, alloc).with_context(|| format!("{STRUCTURAL_VAE}: encoder.4"))?, alloc)?;
        let e2 = e2.reshape(&[b, self.encoder_fc.input])?;
        let hidden = relu(&layers::linear(p, &self.encoder_fc, &e2, alloc).with_context(|| format!("{STRUCTURAL_VAE}: encoder.7"))?, alloc)?;
        let mu = layers::linear(p, &self.fc_mu, &hidden, alloc).with_context(|| format!("{STRUCTURAL_VAE}: fc_mu"))?;
        let logvar = layers::linear(p, &self.fc_logvar, &hidden, alloc).with_context(|| format!("{STRUCTURAL_VAE}: fc_logvar"))?;
        let z = match eps {
            Some(e) => {
                let mut z = alloc.alloc(&[b, latent], mu.dtype())?;
                reparameterize_forward(&mu, &logvar, e, &mut z).with_context(|| format!("{STRUCTURAL_VAE}: z = mu + eps·exp(logvar / 2)"))?;
                Some(z)
            }
            None => None,
        };
        let zr = z.as_ref().unwrap_or(&mu);
        let structure = layers::linear(p, &self.structure_head, zr, alloc).with_context(|| format!("{STRUCTURAL_VAE}: structure_head"))?;
        let c2 = c.channels[2];
        let d0 = layers::linear(p, &self.decoder_fc, zr, alloc).with_context(|| format!("{STRUCTURAL_VAE}: decoder.0"))?.reshape(&[
            b,
            c2,
            size / 8,
            size / 8,
        ])?;
        let d1 =
            relu(&layers::conv_transpose2d(p, &self.decoder_deconvs[0], &d0, alloc).with_context(|| format!("{STRUCTURAL_VAE}: decoder.2"))?, alloc)?;
        let d2 =
            relu(&layers::conv_transpose2d(p, &self.decoder_deconvs[1], &d1, alloc).with_context(|| format!("{STRUCTURAL_VAE}: decoder.4"))?, alloc)?;
        let logits = layers::conv_transpose2d(p, &self.decoder_deconvs[2], &d2, alloc).with_context(|| format!("{STRUCTURAL_VAE}: decoder.6"))?;
        let mut recon = alloc.alloc(logits.shape(), logits.dtype())?;
        sigmoid_forward(&logits, &mut recon).with_context(|| format!("{STRUCTURAL_VAE}: decoder.7"))?;
        Ok(StructuralVaeActivations { encoder: [e0, e1, e2], hidden, mu, logvar, z, structure, decoder: [d0, d1, d2], recon })
    }

    /// Backward from the outputs' gradients `d`: accumulates every parameter gradient into `grads` (`+=`)
    /// and, when `input_grads`, returns the gradients of `image` and `eps` (written). `image` and `eps` are
    /// the forward's inputs.
    pub fn backward(
        &self,
        p: &ParamStore,
        image: &Tensor,
        eps: Option<&Tensor>,
        acts: &StructuralVaeActivations,
        d: &StructuralVaeOutputGrads,
        grads: &mut Grads,
        input_grads: bool,
        alloc: &mut dyn Allocator,
    ) -> Result<Option<StructuralVaeInputGrads>> {
        for (name, g, out) in
            [("recon", d.recon, &acts.recon), ("mu", d.mu, &acts.mu), ("logvar", d.logvar, &acts.logvar), ("structure", d.structure, &acts.structure)]
        {
            ensure!(g.shape() == out.shape(), "{STRUCTURAL_VAE}: the gradient of {name} has shape {:?}, the output {:?}", g.shape(), out.shape());
        }
        ensure!(eps.is_some() == acts.z.is_some(), "{STRUCTURAL_VAE}: backward must get the eps the forward got");
        let dtype = acts.mu.dtype();
        let new = |alloc: &mut dyn Allocator, like: &Tensor| alloc.alloc(like.shape(), dtype);

        let mut dlogits = new(alloc, &acts.recon)?;
        sigmoid_backward(&acts.recon, d.recon, &mut dlogits)?;
        let [d0, d1, d2] = &acts.decoder;
        let mut dd2 = new(alloc, d2)?;
        layers::conv_transpose2d_back(p, grads, &self.decoder_deconvs[2], d2, &dlogits, Some(&mut dd2))
            .with_context(|| format!("{STRUCTURAL_VAE}: decoder.6 backward"))?;
        let dd2 = relu_grad(d2, &dd2, alloc)?;
        let mut dd1 = new(alloc, d1)?;
        layers::conv_transpose2d_back(p, grads, &self.decoder_deconvs[1], d1, &dd2, Some(&mut dd1))
            .with_context(|| format!("{STRUCTURAL_VAE}: decoder.4 backward"))?;
        let dd1 = relu_grad(d1, &dd1, alloc)?;
        let mut dd0 = new(alloc, d0)?;
        layers::conv_transpose2d_back(p, grads, &self.decoder_deconvs[0], d0, &dd1, Some(&mut dd0))
            .with_context(|| format!("{STRUCTURAL_VAE}: decoder.2 backward"))?;
        let dd0 = dd0.reshape(&[d0.shape()[0], self.decoder_fc.output])?;

        let z = acts.z.as_ref().unwrap_or(&acts.mu);
        let mut dz_decoder = new(alloc, z)?;
        layers::linear_back(p, grads, &self.decoder_fc, z, &dd0, Some(&mut dz_decoder))
            .with_context(|| format!("{STRUCTURAL_VAE}: decoder.0 backward"))?;
        let mut dz_structure = new(alloc, z)?;
        layers::linear_back(p, grads, &self.structure_head, z, d.structure, Some(&mut dz_structure))
            .with_context(|| format!("{STRUCTURAL_VAE}: structure_head backward"))?;
        let mut dz = new(alloc, z)?;
        add(&dz_decoder, &dz_structure, &mut dz)?;

        let mut dmu = new(alloc, &acts.mu)?;
        let (dlogvar_sum, deps) = match eps {
            Some(e) => {
                let (mut dmu_z, mut dlogvar_z) = (new(alloc, &acts.mu)?, new(alloc, &acts.mu)?);
                reparameterize_backward(&acts.logvar, e, &dz, &mut dmu_z, &mut dlogvar_z)?;
                add(&dmu_z, d.mu, &mut dmu)?;
                let mut dlogvar = new(alloc, &acts.mu)?;
                add(&dlogvar_z, d.logvar, &mut dlogvar)?;
                // deps = dz·exp(logvar / 2) is the reparameterisation itself with mu = 0 and eps = dz; 0·dz is
                // an exact zero for a finite dz.
                let deps = if input_grads {
                    let mut zero = new(alloc, &dz)?;
                    scale(&dz, 0.0, &mut zero)?;
                    let mut deps = new(alloc, &dz)?;
                    reparameterize_forward(&zero, &acts.logvar, &dz, &mut deps)?;
                    Some(deps)
                } else {
                    None
                };
                (Some(dlogvar), deps)
            }
            None => {
                add(&dz, d.mu, &mut dmu)?;
                (None, None)
            }
        };

        let dlogvar = dlogvar_sum.as_ref().unwrap_or(d.logvar);
        let mut dh_mu = new(alloc, &acts.hidden)?;
        layers::linear_back(p, grads, &self.fc_mu, &acts.hidden, &dmu, Some(&mut dh_mu))
            .with_context(|| format!("{STRUCTURAL_VAE}: fc_mu backward"))?;
        let mut dh_logvar = new(alloc, &acts.hidden)?;
        layers::linear_back(p, grads, &self.fc_logvar, &acts.hidden, dlogvar, Some(&mut dh_logvar))
            .with_context(|| format!("{STRUCTURAL_VAE}: fc_logvar backward"))?;
        let mut dh = new(alloc, &acts.hidden)?;
        add(&dh_mu, &dh_logvar, &mut dh)?;
        let dh = relu_grad(&acts.hidden, &dh, alloc)?;
        let [e0, e1, e2] = &acts.encoder;
        let mut de2 = new(alloc, e2)?;
        layers::linear_back(p, grads, &self.encoder_fc, e2, &dh, Some(&mut de2)).with_context(|| format!("{STRUCTURAL_VAE}: encoder.7 backward"))?;
        let de2 = relu_grad(e2, &de2, alloc)?.reshape(&[
            e1.shape()[0],
            self.encoder_convs[2].output,
            self.config.image_size / 8,
            self.config.image_size / 8,
        ])?;
        let mut de1 = new(alloc, e1)?;
        layers::conv_back_into(p, grads, &self.encoder_convs[2], e1, &de2, Some(&mut de1))
            .with_context(|| format!("{STRUCTURAL_VAE}: encoder.4 backward"))?;
        let de1 = relu_grad(e1, &de1, alloc)?;
        let mut de0 = new(alloc, e0)?;
        layers::conv_back_into(p, grads, &self.encoder_convs[1], e0, &de1, Some(&mut de0))
            .with_context(|| format!("{STRUCTURAL_VAE}: encoder.2 backward"))?;
        let de0 = relu_grad(e0, &de0, alloc)?;
        let mut dimage = input_grads.then(|| new(alloc, image)).transpose()?;
        layers::conv_back_into(p, grads, &self.encoder_convs[0], image, &de0, dimage.as_mut())
            .with_context(|| format!("{STRUCTURAL_VAE}: encoder.0 backward"))?;
        Ok(dimage.map(|image| StructuralVaeInputGrads { image, eps: deps }))
    }
}

/// `ContrastiveAlignment`: the symmetric NT-Xent loss at a temperature; it has no parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ContrastiveAlignment {
    pub temperature: f64,
}

impl ContrastiveAlignment {
    pub fn from_json(path: &Path, value: &Value) -> Result<ContrastiveAlignment> {
        let r = ConfigReader::new(path, value);
        let temperature = r.f64("temperature", 0.07)?;
        r.refuse_unread(&[])?;
        ensure!(temperature > 0.0, "{}: 'temperature' must be positive, got {temperature}", path.display());
        Ok(ContrastiveAlignment { temperature })
    }
}

fn relu(x: &Tensor, alloc: &mut dyn Allocator) -> Result<Tensor> {
    let mut y = alloc.alloc(x.shape(), x.dtype())?;
    relu_forward(x, &mut y)?;
    Ok(y)
}

/// ReLU's backward from its output `y`: torch's test `x <= 0` picks the same elements as `y <= 0`, so the
/// activations keep only the ReLU's output.
fn relu_grad(y: &Tensor, dy: &Tensor, alloc: &mut dyn Allocator) -> Result<Tensor> {
    let mut dx = alloc.alloc(y.shape(), y.dtype())?;
    relu_backward(y, dy, &mut dx)?;
    Ok(dx)
}
