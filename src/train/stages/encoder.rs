//! Stage `encoder` (stage 2): the SpatiotemporalEEGEncoder aligned with the frozen StructuralVAE's mu.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::{bail, ensure, Context, Result};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;

use super::common::{
    check_image_size, default_trial_average, gather, load_images, mse, save_model_config, split_eeg, standardize, structure_targets, train_loop,
    training_trials, vae_mu, validation_mean, LoopConfig, NamedLosses, On, StageReport,
};
use crate::data::contract::{EegContract, STANDARDIZATION_FILE};
use crate::data::dataset::{Manifest, SplitManifest};
use crate::data::eeg::{EegData, Repetitions};
use crate::data::npy::NpyFile;
use crate::models::sgdm::{EegEncoder, EegEncoderConfig, StructuralVae, StructuralVaeConfig, StructureHead};
use crate::nn::{Allocator, Grads, ParamStore};
use crate::ops::elementwise::add;
use crate::ops::infonce::{infonce_backward, infonce_forward, InfoNceActivations};
use crate::ops::loss::mse_loss_backward;
use crate::train::config_id;
use crate::weights::SafetensorsFile;
use crate::weights_folder::ENCODER_CONFIG;

/// Stage `encoder` (TOML table `[encoder]`): the EEG encoder's embedding of a trial against the frozen
/// StructuralVAE's mu (z = mu, no noise) of the figure shown, by the symmetric InfoNCE loss.
///
/// EEG: training draws one random single trial per figure at each step (the repetitions act as
/// augmentation, and a batch holds distinct figures, so no positive pair is ever a negative);
/// validation uses each val figure's average over its repetitions, the usual test-time protocol. Each
/// channel is standardised with the mean and standard deviation of the train split's trials.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncoderStageConfig {
    pub data: PathBuf,
    /// The StructuralVAE's parameters (`vae.safetensors` from stage `vae`) and configuration.
    pub vae_weights: PathBuf,
    pub vae: StructuralVaeConfig,
    pub temperature: f32,
    pub train: LoopConfig,
    /// `latent_dim` must equal the VAE's; `n_channels` and `n_timepoints` the dataset's.
    pub model: EegEncoderConfig,
    /// Precomputed image embeddings (e.g. CLIP features a user extracted) to align with instead of the
    /// VAE's mu. Stage `controlnet` reads the structure map through the StructuralVAE's structure head, so
    /// an encoder trained against other embeddings serves retrieval, not the default reconstruction path.
    #[serde(default)]
    pub image_embeddings: Option<EmbeddingTargets>,
    /// Each training sample's EEG is the mean of this many distinct random repetitions of its figure (1: a
    /// single trial).
    #[serde(default = "default_trial_average")]
    pub trial_average: usize,
    /// The weight of the structure term when `model` has a structure head (`structure_dim`): the loss is
    /// InfoNCE plus structure_weight · MSE(head(embedding), structure target) / the train split's mean
    /// per-value variance of the targets (so 1 is the loss of predicting the mean map). Required positive
    /// with a head, and 0 (the default) without one.
    #[serde(default)]
    pub structure_weight: f64,
}

/// `[encoder.image_embeddings]`: `.npy` files `[figures, latent_dim]` (f16/f32/f64), one row per figure
/// of the split in the manifest's order.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingTargets {
    pub train: PathBuf,
    pub val: PathBuf,
}

/// An embedding file's rows, checked against the split's figure count and the embedding width.
fn embedding_rows(path: &Path, figures: usize, dim: usize) -> Result<Vec<f32>> {
    let file = NpyFile::open(path)?;
    ensure!(
        file.header.shape == [figures, dim],
        "{}: image embeddings of shape {:?}, expected [{figures}, {dim}] (figures of the split, the encoder's latent_dim)",
        path.display(),
        file.header.shape
    );
    let rows = file.to_f32()?;
    if let Some(i) = rows.iter().position(|v| !v.is_finite()) {
        bail!("{}: non-finite value at row {}, column {}", path.display(), i / dim, i % dim);
    }
    Ok(rows)
}

/// Per-channel mean and standard deviation over every trial and time point of `eeg` ([N, R, C, T]).
fn channel_stats(eeg: &EegData) -> (Vec<f32>, Vec<f32>) {
    let [n, r, c, t] = eeg.shape;
    let mut sum = vec![0f64; c];
    let mut sq = vec![0f64; c];
    for (k, row) in eeg.data.chunks_exact(t).enumerate() {
        let ch = k % c;
        for &v in row {
            sum[ch] += v as f64;
            sq[ch] += v as f64 * v as f64;
        }
    }
    let count = (n * r * t) as f64;
    let mean: Vec<f64> = sum.iter().map(|s| s / count).collect();
    let std = sq.iter().zip(&mean).map(|(q, m)| ((q / count - m * m).max(0.0).sqrt().max(1e-6)) as f32).collect();
    (mean.into_iter().map(|m| m as f32).collect(), std)
}

/// The structure targets of stage `encoder`'s structure term: the train and val splits' `[figures, E·E]`
/// maps and the train split's mean per-value variance, which the term is divided by.
struct StructureTargets {
    train: Vec<f32>,
    val: Vec<f32>,
    dim: usize,
    variance: f64,
}

/// `None` when the encoder has no structure head; refuses a head without a positive `structure_weight`, a
/// weight without a head, and targets of another size than the head's.
fn encoder_structure_targets(cfg: &EncoderStageConfig, train: &SplitManifest, val: &SplitManifest) -> Result<Option<StructureTargets>> {
    let (w, dim) = (cfg.structure_weight, cfg.model.structure_dim);
    ensure!(w.is_finite() && w >= 0.0, "stage encoder: structure_weight must be finite and at least 0, got {w}");
    if dim == 0 {
        ensure!(w == 0.0, "stage encoder: structure_weight {w} needs a structure head: set [encoder.model] structure_dim");
        return Ok(None);
    }
    ensure!(w > 0.0, "stage encoder: the model has a structure head (structure_dim {dim}) but structure_weight is 0: nothing would train it");
    let read = |split: &SplitManifest| structure_targets(&cfg.data, split, dim);
    let (train_maps, val_maps) = (read(train)?, read(val)?);
    let n = train.figures as f64;
    let mut variance = 0.0;
    for j in 0..dim {
        let column = train_maps.iter().skip(j).step_by(dim).map(|v| *v as f64);
        let (sum, sq) = column.fold((0.0, 0.0), |(s, q), v| (s + v, q + v * v));
        variance += (sq / n - (sum / n).powi(2)).max(0.0) / dim as f64;
    }
    ensure!(variance > 0.0, "{}: every training structure target is the same map: nothing to learn", cfg.data.join(&train.edges16).display());
    Ok(Some(StructureTargets { train: train_maps, val: val_maps, dim, variance }))
}

/// Runs stage `encoder`; see [`EncoderStageConfig`] and the module docs for what it writes into `out`.
pub fn train_encoder(cfg: &EncoderStageConfig, out: &Path, resume: Option<&Path>, stop: &AtomicBool, on: impl Into<On>) -> Result<StageReport> {
    let on = &on.into();
    let m = &cfg.model;
    ensure!(
        m.latent_dim == cfg.vae.latent_dim,
        "stage encoder: model.latent_dim {} differs from the VAE's latent_dim {}",
        m.latent_dim,
        cfg.vae.latent_dim
    );
    ensure!(cfg.temperature > 0.0 && cfg.temperature.is_finite(), "stage encoder: temperature must be positive, got {}", cfg.temperature);
    check_image_size("encoder", "vae.image_size", cfg.vae.image_size)?;
    let manifest = Manifest::read(&cfg.data)?;
    let (train_split, val_split) = (manifest.split(&cfg.data, "train")?, manifest.split(&cfg.data, "val")?);

    let b = cfg.train.batch;
    let mut vae = None;
    let (train_mu, val_mu) = match &cfg.image_embeddings {
        Some(t) => (embedding_rows(&t.train, train_split.figures, m.latent_dim)?, embedding_rows(&t.val, val_split.figures, m.latent_dim)?),
        None => {
            let model = StructuralVae::new(cfg.vae.clone())?;
            let vae_params = on.load_params(&model.params, &SafetensorsFile::open(&cfg.vae_weights)?, &[])?;
            let sd = cfg.vae.structure_dim;
            let mu = (
                vae_mu(on, &model, &vae_params, &load_images(&cfg.data, train_split, cfg.vae.image_size, sd)?, b)?,
                vae_mu(on, &model, &vae_params, &load_images(&cfg.data, val_split, cfg.vae.image_size, sd)?, b)?,
            );
            vae = Some((model, vae_params));
            mu
        }
    };

    let mut train = split_eeg(&cfg.data, train_split, Repetitions::Keep)?;
    let mut val = split_eeg(&cfg.data, val_split, Repetitions::Keep)?;
    train.expect(m.n_channels, m.n_timepoints)?;
    val.expect(m.n_channels, m.n_timepoints)?;
    let (mean, std) = channel_stats(&train);
    standardize(&mut train, &mean, &std);
    standardize(&mut val, &mean, &std);
    let val = val.with_repetitions(Repetitions::Average);
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create the output folder", out.display()))?;
    EegContract::from_manifest(&manifest, "train", mean, std).write(&out.join(STANDARDIZATION_FILE))?;

    let [n_train, reps, c, t] = train.shape;
    let n_val = val.shape[0];
    ensure!(
        (1..=reps).contains(&cfg.trial_average),
        "stage encoder: trial_average {} must be between 1 and the {reps} repetitions",
        cfg.trial_average
    );
    ensure!(b >= 2 && b <= n_train, "stage encoder: batch {b} must be between 2 and the {n_train} training figures");
    ensure!(n_val >= 2, "stage encoder: the val split needs at least 2 figures for InfoNCE, it has {n_val}");
    let (latent, trial) = (m.latent_dim, c * t);
    let encoder = EegEncoder::new(m.clone())?;
    let structure = encoder_structure_targets(cfg, train_split, val_split)?;
    let mut params = on.random_params(&encoder.params, cfg.train.seed)?;
    if let (Some(StructureHead::Linear(head)), Some((svae, svae_params))) = (&encoder.structure_head, &vae) {
        // A linear structure head starts as the StructuralVAE's, which maps mu (what InfoNCE aligns the
        // embedding to) to the structure map; training then fits it to the EEG's embeddings.
        ensure!(
            cfg.vae.structure_dim == m.structure_dim,
            "stage encoder: model.structure_dim {} differs from the VAE's structure_dim {}",
            m.structure_dim,
            cfg.vae.structure_dim
        );
        let from = &svae.structure_head;
        params.get_mut(head.weight).write_f32(&svae_params.get(from.weight).to_f32_vec()?)?;
        if let (Some(to), Some(b)) = (head.bias, from.bias) {
            params.get_mut(to).write_f32(&svae_params.get(b).to_f32_vec()?)?;
        }
    }
    let mut nce = InfoNceActivations::zeros(&on.device, b, latent, on.dtype)?;

    let mut step = |p: &ParamStore, grads: &mut Grads, rng: &mut ChaCha8Rng, dloss: f32, alloc: &mut dyn Allocator| -> Result<NamedLosses> {
        let figures = rand::seq::index::sample(rng, n_train, b).into_vec();
        let eeg = on.upload(alloc, &[b, c, t], &training_trials(&train.data, trial, reps, &figures, cfg.trial_average, rng))?;
        let target = on.upload(alloc, &[b, latent], &gather(&train_mu, latent, &figures))?;
        let acts = encoder.forward(p, &eeg, alloc)?;
        infonce_forward(&acts.embedding, &target, cfg.temperature, &mut nce)?;
        let loss = nce.loss()? as f64;
        let (mut dembedding, mut dtarget) = (on.zeros_in(alloc, &[b, latent])?, on.zeros_in(alloc, &[b, latent])?);
        infonce_backward(&mut nce, dloss, &mut dembedding, &mut dtarget)?;
        let mut losses = vec![("total", loss)];
        if let (Some(head), Some(targets)) = (encoder.structure(p, &acts.embedding, alloc)?, &structure) {
            let edges = on.upload(alloc, &[b, targets.dim], &gather(&targets.train, targets.dim, &figures))?;
            let normalized = mse(&head.structure, &edges, alloc)? / targets.variance;
            let weight = cfg.structure_weight / targets.variance;
            let mut dstructure = on.zeros_in(alloc, head.structure.shape())?;
            mse_loss_backward(&head.structure, &edges, weight as f32 * dloss, &mut dstructure)?;
            let from_head = encoder.structure_backward(p, &acts.embedding, &head, &dstructure, grads, alloc)?;
            let mut sum = on.zeros_in(alloc, dembedding.shape())?;
            add(&dembedding, &from_head, &mut sum)?;
            dembedding = sum;
            losses = vec![("total", loss + cfg.structure_weight * normalized), ("infonce", loss), ("structure", normalized)];
        }
        encoder.backward(p, &acts, &dembedding, grads, false, alloc)?;
        Ok(losses)
    };
    // InfoNCE depends on the batch: the val figures in order, in chunks of `batch` (the last may be
    // smaller), each chunk's loss weighted by its size.
    let mut validate = |p: &ParamStore| -> Result<f64> {
        validation_mean(on, n_val, b, |idx, alloc| {
            let eeg = on.tensor(&[idx.len(), c, t], &gather(&val.data, trial, idx))?;
            let target = on.tensor(&[idx.len(), latent], &gather(&val_mu, latent, idx))?;
            let acts = encoder.forward(p, &eeg, alloc)?;
            let mut chunk = InfoNceActivations::zeros(&on.device, idx.len(), latent, on.dtype)?;
            infonce_forward(&acts.embedding, &target, cfg.temperature, &mut chunk)?;
            let mut loss = chunk.loss()? as f64;
            if let (Some(head), Some(targets)) = (encoder.structure(p, &acts.embedding, alloc)?, &structure) {
                let edges = on.tensor(&[idx.len(), targets.dim], &gather(&targets.val, targets.dim, idx))?;
                loss += cfg.structure_weight * mse(&head.structure, &edges, alloc)? / targets.variance;
            }
            Ok(loss)
        })
    };
    let id = config_id(format!("encoder {cfg:?}").as_bytes());
    // Before the parameters, which `train all` takes as the sign that the stage finished.
    save_model_config(&out.join(ENCODER_CONFIG), "SpatiotemporalEEGEncoder", m)?;
    train_loop(on, "encoder", &cfg.train, &id, out, resume, &encoder.params, &mut params, &mut step, &mut validate, stop)
}
