//! The SGDM training stages, on the CPU (f32) or CUDA (bf16 with f32 master weights), each a function of a small configuration: `base` (the embedded
//! default's AutoencoderKL and UNet, see [`BaseStageConfig`]), `vae` (stage 1, the StructuralVAE), `encoder`
//! (stage 2, the SpatiotemporalEEGEncoder aligned with the frozen StructuralVAE's mu by the symmetric InfoNCE
//! loss) and `controlnet` (stage 3, the ControlNet and the EEG-to-token projector, see
//! [`ControlNetStageConfig`]). Each reads a dataset in the layout of [`crate::data::dataset`] (`sgdm synth`'s
//! or `sgdm data import`'s), trains on its `train` split, validates on its `val` split and never opens the
//! `test` split.
//!
//! A stage writes into its output folder: `<stage>.jsonl` (the step log, validation losses as `val`),
//! `<stage>-step<NNNNNN>.safetensors` (checkpoints every `checkpoint_every` steps and at the end, kept so
//! the validation losses can pick one; `--resume` continues from any of them exactly) and
//! `<stage>.safetensors` (the final parameters under their PyTorch names); stage `base` runs two such loops,
//! `base_vae` and `base_unet`. The encoder stage also writes `eeg_standardization.json`, the per-channel
//! statistics its inputs were scaled with; `base` and `controlnet` also write their models as diffusers
//! components.
//!
//! Every stage takes a stop flag: once it is set (by Ctrl-C in `sgdm train`), the running loop ends after its
//! current step, writes a checkpoint there and returns a [`Stopped`] error naming it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, ensure, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use serde_json::Value;

use super::{config_id, load_checkpoint, peek_checkpoint, save_checkpoint, LrSchedule, Optimizer, OptimizerConfig, Progress, RngState, StepLog};
use crate::data::eeg::{EegData, Repetitions};
use crate::data::image::{load_square, MAX_IMAGE_SIZE};
use crate::data::npy::NpyFile;
use crate::data::contract::{EegContract, STANDARDIZATION_FILE};
use crate::data::dataset::{Manifest, SplitManifest};
use crate::diffusion::scheduler::{alphas_cumprod, TRAIN_TIMESTEPS};
use crate::models::autoencoder_kl::{AutoencoderKl, AutoencoderKlConfig, LEGACY_ATTENTION_NAMES};
use crate::models::layers::{linear_layer_forward, linear_layer_param_backward};
use crate::models::unet::{ControlNet, UNet, UNetConditioning, UNetConfig};
use crate::models::sgdm::{upsample_nearest, EegEncoder, EegEncoderConfig, StructuralVae, StructuralVaeConfig, StructuralVaeOutputGrads};
use crate::nn::{Grads, Linear, ParamId, ParamStore, ParamTree, Standalone};
use crate::ops::infonce::{infonce_backward, infonce_forward, InfoNceActivations};
use crate::ops::loss::{kl_loss, kl_loss_backward, mse_loss, mse_loss_backward, PARTIALS};
use crate::ops::elementwise::{add, reparameterize_backward, reparameterize_forward};
use crate::ops::optim::AdamW;
use crate::runtime::Device;
use crate::tensor::{DType, Tensor};
use crate::weights::{save_safetensors, Component, SafetensorsFile, COMPONENT_WEIGHT_FILES};
use crate::weights_folder::{load_autoencoder_kl, load_unet, BASE_POINTER, ENCODER_CONFIG, VAE_CONFIG};

/// The optimisation loop shared by the stages (TOML table `[<stage>.train]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoopConfig {
    /// Optimizer steps of the whole run (a resumed run counts the steps before it).
    pub steps: u64,
    /// Distinct figures per micro-batch.
    pub batch: usize,
    /// Micro-batches whose gradients accumulate into one optimizer step (effective batch = batch x this).
    #[serde(default = "default_micro_batches")]
    pub micro_batches: usize,
    /// Peak learning rate, reached after `warmup` steps, then half-cosine decay to `min_lr`.
    pub lr: f64,
    #[serde(default)]
    pub min_lr: f64,
    #[serde(default)]
    pub warmup: u64,
    /// Seeds the initial parameters and the data RNG (batches, repetitions, the VAE's noise).
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this; absent: never clip.
    #[serde(default)]
    pub max_grad_norm: Option<f32>,
    /// Write a checkpoint and validate every this many steps (and always at the end).
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// Write a step-log line every this many steps.
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// The final parameters are those of the checkpoint with the lowest validation loss (true), or of the
    /// last step (false).
    #[serde(default = "default_select_best")]
    pub select_best: bool,
}

fn default_micro_batches() -> usize {
    1
}

fn default_select_best() -> bool {
    true
}

fn default_weight_decay() -> f64 {
    AdamW::default().weight_decay
}

fn default_checkpoint_every() -> u64 {
    500
}

fn default_log_every() -> u64 {
    10
}

/// Stage `vae` (TOML table `[vae]`): loss = MSE(recon, image in [0, 1]) + beta * KL + lambda *
/// MSE(structure, the 16x16 edge map flattened), z sampled with the reparameterisation.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaeStageConfig {
    /// Dataset folder holding `manifest.json`.
    pub data: PathBuf,
    pub beta: f32,
    pub lambda: f32,
    pub train: LoopConfig,
    /// `structure_dim` must equal the dataset's edge map size squared (256 for 16x16); images are resized
    /// to `image_size`.
    pub model: StructuralVaeConfig,
}

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

/// What a run reports.
#[derive(Debug, Clone, PartialEq)]
pub struct StageReport {
    /// The step the run started from (0, or the checkpoint's).
    pub first_step: u64,
    /// The training loss of each step this run took.
    pub train_losses: Vec<f64>,
    /// (step, validation loss) at every checkpoint, the last at the end.
    pub val_losses: Vec<(u64, f64)>,
    /// The checkpoint the final parameters are taken from and its validation loss: the best of every
    /// checkpoint of this run in the output folder (earlier processes' included) with `select_best`, else
    /// the last step.
    pub selected: (u64, f64),
}

/// Where a stage runs: the device, and the storage dtype of its parameters and activations (f32 on the CPU;
/// bf16 on CUDA, with f32 master weights in the optimizer). Losses are always f32.
pub struct On {
    pub device: Device,
    pub dtype: DType,
}

impl On {
    pub fn new(device: &Device) -> On {
        On { device: device.clone(), dtype: if device.is_cuda() { DType::BF16 } else { DType::F32 } }
    }

    fn tensor(&self, shape: &[usize], values: &[f32]) -> Result<Tensor> {
        Tensor::from_f32(&self.device, shape, self.dtype, values)
    }

    fn zeros(&self, shape: &[usize]) -> Result<Tensor> {
        Tensor::zeros(&self.device, shape, self.dtype)
    }

    fn alloc(&self) -> Standalone {
        Standalone(self.device.clone())
    }

    fn random_params(&self, tree: &ParamTree, seed: u64) -> Result<ParamStore> {
        ParamStore::random_owned(tree, &self.device, self.dtype, seed)
    }

    fn load_params(&self, tree: &ParamTree, file: &SafetensorsFile, aliases: &[(&str, &str)]) -> Result<ParamStore> {
        ParamStore::load_owned(tree, file, &self.device, self.dtype, aliases)
    }
}

/// A loss value and its partial sums: f32 on the device of `like`.
fn loss_buffers(like: &Tensor) -> Result<(Tensor, Tensor)> {
    Ok((Tensor::zeros(&like.device(), &[1], DType::F32)?, Tensor::zeros(&like.device(), &[PARTIALS], DType::F32)?))
}

fn check_image_size(stage: &str, key: &str, size: usize) -> Result<()> {
    ensure!((1..=MAX_IMAGE_SIZE).contains(&size), "stage {stage}: {key} {size} must be between 1 and {MAX_IMAGE_SIZE}");
    Ok(())
}

/// A split's EEG, checked to hold one row per figure of the split: rows pair with figures by position, so
/// a file with more rows would index past the figures' targets and one with fewer would silently train on
/// a subset.
fn split_eeg(data: &Path, split: &SplitManifest, repetitions: Repetitions) -> Result<EegData> {
    let path = data.join(&split.eeg);
    let eeg = EegData::open(&path, Repetitions::Keep)?;
    ensure!(
        eeg.shape[0] == split.figures,
        "{}: {} rows, but the manifest's '{}' split has {} figures (row i is the EEG of figure i)",
        path.display(),
        eeg.shape[0],
        split.name,
        split.figures
    );
    Ok(eeg.with_repetitions(repetitions))
}

/// A split's images as `[N, 3, S, S]` in [0, 1] and its edge maps as `[N, E·E]`.
struct ImageSplit {
    len: usize,
    images: Vec<f32>,
    edges: Vec<f32>,
}

fn load_images(data: &Path, split: &SplitManifest, size: usize, structure_dim: usize) -> Result<ImageSplit> {
    let edges_path = data.join(&split.edges16);
    let edges = NpyFile::open(&edges_path)?.to_f32()?;
    ensure!(
        edges.len() == split.figures * structure_dim,
        "{}: {} values, expected {} figures x structure_dim {structure_dim}",
        edges_path.display(),
        edges.len(),
        split.figures
    );
    let mut images = Vec::with_capacity(split.figures * 3 * size * size);
    for rel in &split.images {
        images.extend(crate::data::image::to_planes(&load_square(data.join(rel), size as u32)?));
    }
    ensure!(split.images.len() == split.figures, "split '{}': {} images for {} figures", split.name, split.images.len(), split.figures);
    Ok(ImageSplit { len: split.figures, images, edges })
}

/// The rows `idx` of a row-major array with `per` values a row.
fn gather(values: &[f32], per: usize, idx: &[usize]) -> Vec<f32> {
    idx.iter().flat_map(|&i| &values[i * per..(i + 1) * per]).copied().collect()
}

/// Refuses parameters holding NaN or Inf as a stage's result, naming the tensor: they would load as a
/// model that makes only garbage.
fn ensure_finite(path: &Path, tensors: &[(&str, &Tensor)]) -> Result<()> {
    for (name, t) in tensors {
        if let Some(bad) = crate::tensor::non_finite_values(t.dtype(), &t.to_bytes()?) {
            bail!("{}: not written: parameter '{name}' holds {} non-finite value(s) (NaN or Inf); training diverged", path.display(), bad.count);
        }
    }
    Ok(())
}

fn save_params(path: &Path, tree: &ParamTree, params: &ParamStore) -> Result<()> {
    let refs: Vec<(&str, &Tensor)> = tree.specs().iter().enumerate().map(|(i, s)| (s.name.as_str(), params.get(ParamId(i)))).collect();
    ensure_finite(path, &refs)?;
    save_safetensors(path, &refs, None).with_context(|| format!("{}: cannot write the parameters", path.display()))
}

/// A stage's losses of one step, named, the total first.
type NamedLosses = Vec<(&'static str, f64)>;

/// A run that stopped on request (`stop` set, e.g. by Ctrl-C) at the end of a step, before its last, after
/// writing a checkpoint there; `--resume` with `checkpoint` continues it exactly.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{stage} stopped on request at step {step} of {steps}; checkpoint {}", checkpoint.display())]
pub struct Stopped {
    /// The loop that stopped: a stage's name, or `base_vae` / `base_unet`.
    pub stage: String,
    pub step: u64,
    pub steps: u64,
    pub checkpoint: PathBuf,
}

/// The training loop the stages share. `step` runs one batch's forward and backward (with the upstream
/// gradient `dloss` it is given) into the gradients and returns its named losses, the total first; with
/// `micro_batches` k it runs k times per optimizer step with dloss 1/k (gradient accumulation); `validate` returns the validation loss. When
/// `stop` is set the loop ends after the current step with a checkpoint and a [`Stopped`] error.
fn train_loop(on: &On, 
    stage: &str,
    cfg: &LoopConfig,
    id: &str,
    out: &Path,
    resume: Option<&Path>,
    tree: &ParamTree,
    params: &mut ParamStore,
    step: &mut dyn FnMut(&ParamStore, &mut Grads, &mut ChaCha8Rng, f32) -> Result<NamedLosses>,
    validate: &mut dyn FnMut(&ParamStore) -> Result<f64>,
    stop: &AtomicBool,
) -> Result<StageReport> {
    ensure!(cfg.steps > 0 && cfg.checkpoint_every > 0 && cfg.log_every > 0, "stage {stage}: steps, checkpoint_every and log_every must be positive");
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create the output folder", out.display()))?;
    let schedule = LrSchedule::new(cfg.lr, cfg.min_lr, cfg.warmup, cfg.steps)?;
    let alloc = &mut on.alloc();
    let mut grads = Grads::zeros(tree, alloc, on.dtype)?;
    let adamw = AdamW { weight_decay: cfg.weight_decay, ..AdamW::default() };
    let mut opt = Optimizer::new(tree, params, alloc, OptimizerConfig { adamw, max_grad_norm: cfg.max_grad_norm, micro_batches: cfg.micro_batches })?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    if let Some(path) = resume {
        rng = load_checkpoint(path, tree, params, &mut opt, id)?.rng.rng();
    }
    let first_step = opt.steps();
    let mut log = StepLog::open(out.join(format!("{stage}.jsonl")), first_step)?;
    let mut progress = Progress::new(first_step, cfg.steps);
    let mut report = StageReport { first_step, train_losses: Vec::new(), val_losses: Vec::new(), selected: (0, f64::NAN) };
    while opt.steps() < cfg.steps {
        let mut losses = step(params, &mut grads, &mut rng, opt.loss_scale())?;
        for _ in 1..cfg.micro_batches {
            let more = step(params, &mut grads, &mut rng, opt.loss_scale())?;
            losses.iter_mut().zip(more).for_each(|(l, m)| l.1 += m.1);
        }
        losses.iter_mut().for_each(|l| l.1 /= cfg.micro_batches as f64);
        if let Some((name, value)) = losses.iter().find(|l| !l.1.is_finite()) {
            bail!(
                "stage {stage}: the {name} loss is {value} at step {}: training diverged, and nothing of this step is kept \
                 (lower the stage's lr or set its max_grad_norm; the checkpoints before it are in {})",
                opt.steps() + 1,
                out.display()
            );
        }
        let lr = schedule.lr(opt.steps());
        opt.step(params, &mut grads, lr)?;
        let done = opt.steps();
        let total = losses[0].1;
        report.train_losses.push(total);
        let stopping = stop.load(Ordering::SeqCst) && done < cfg.steps;
        let at_checkpoint = done.is_multiple_of(cfg.checkpoint_every) || done == cfg.steps;
        let checkpoint = out.join(format!("{stage}-step{done:06}.safetensors"));
        if at_checkpoint {
            let val = validate(params)?;
            report.val_losses.push((done, val));
            losses.push(("val", val));
        }
        if at_checkpoint || stopping {
            save_checkpoint(&checkpoint, tree, params, &opt, id, &RngState::of(&rng), at_checkpoint.then(|| losses.last().map(|l| l.1)).flatten())?;
        }
        if at_checkpoint || stopping || done.is_multiple_of(cfg.log_every) {
            log.log(done, &losses, lr, opt.grad_norm()? as f64)?;
        }
        progress.update(done, total);
        if stopping {
            return Err(Stopped { stage: stage.to_string(), step: done, steps: cfg.steps, checkpoint }.into());
        }
    }
    let last = out.join(format!("{stage}-step{:06}.safetensors", cfg.steps));
    report.selected = match best_checkpoint(stage, out, id, cfg.steps)? {
        Some((step, path, val)) if cfg.select_best => {
            if step != cfg.steps {
                load_checkpoint(&path, tree, params, &mut opt, id)?;
            }
            (step, val)
        }
        _ => (cfg.steps, peek_checkpoint(&last)?.and_then(|c| c.2).unwrap_or(f64::NAN)),
    };
    save_params(&out.join(format!("{stage}.safetensors")), tree, params)?;
    Ok(report)
}

/// The checkpoint of `stage` in `out` written under configuration `id` at a step up to `steps` with the
/// lowest validation loss (the later one on a tie): (step, path, validation loss).
fn best_checkpoint(stage: &str, out: &Path, id: &str, steps: u64) -> Result<Option<(u64, PathBuf, f64)>> {
    let prefix = format!("{stage}-step");
    let mut best: Option<(u64, PathBuf, f64)> = None;
    for entry in std::fs::read_dir(out).with_context(|| format!("{}: cannot list the output folder", out.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let Some(digits) = name.strip_prefix(&prefix).and_then(|r| r.strip_suffix(".safetensors")) else { continue };
        if digits.len() != 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Some((step, config, Some(val))) = peek_checkpoint(&path)? else { continue };
        if config != id || step > steps || !val.is_finite() {
            continue;
        }
        if best.as_ref().is_none_or(|b| val < b.2 || (val == b.2 && step > b.0)) {
            best = Some((step, path, val));
        }
    }
    Ok(best)
}

/// The three terms of the VAE loss: MSE(recon, image), KL against N(0, 1), MSE(structure, edges).
struct VaeLosses {
    recon: f64,
    kl: f64,
    structure: f64,
}

/// The three terms of a forward's outputs against `image` and `edges`.
fn vae_losses(acts: &crate::models::sgdm::StructuralVaeActivations, image: &Tensor, edges: &Tensor) -> Result<VaeLosses> {
    let (mut loss, mut partials) = loss_buffers(image)?;
    let read = |loss: &Tensor| -> Result<f64> { Ok(loss.to_f32_vec()?[0] as f64) };
    mse_loss(&acts.recon, image, &mut loss, &mut partials)?;
    let recon = read(&loss)?;
    kl_loss(&acts.mu, &acts.logvar, &mut loss, &mut partials)?;
    let kl = read(&loss)?;
    mse_loss(&acts.structure, edges, &mut loss, &mut partials)?;
    let structure = read(&loss)?;
    Ok(VaeLosses { recon, kl, structure })
}

impl VaeStageConfig {
    fn total(&self, l: &VaeLosses) -> f64 {
        l.recon + self.beta as f64 * l.kl + self.lambda as f64 * l.structure
    }
}

/// Runs stage `vae`; see [`VaeStageConfig`] and the module docs for what it writes into `out`.
pub fn train_vae(cfg: &VaeStageConfig, out: &Path, resume: Option<&Path>, stop: &AtomicBool, device: &Device) -> Result<StageReport> {
    let on = &On::new(device);
    let m = &cfg.model;
    check_image_size("vae", "model.image_size", m.image_size)?;
    let manifest = Manifest::read(&cfg.data)?;
    ensure!(
        m.structure_dim == manifest.edge_size * manifest.edge_size,
        "stage vae: model.structure_dim is {}, the dataset's edge maps are {0}x{0} = {1}",
        m.structure_dim,
        manifest.edge_size * manifest.edge_size
    );
    let train = load_images(&cfg.data, manifest.split(&cfg.data, "train")?, m.image_size, m.structure_dim)?;
    let val = load_images(&cfg.data, manifest.split(&cfg.data, "val")?, m.image_size, m.structure_dim)?;
    let b = cfg.train.batch;
    ensure!(b >= 1 && b <= train.len, "stage vae: batch {b} must be between 1 and the {} training figures", train.len);
    let model = StructuralVae::new(m.clone())?;
    let mut params = on.random_params(&model.params, cfg.train.seed)?;
    let (s, sd, latent) = (m.image_size, m.structure_dim, m.latent_dim);
    let per_image = 3 * s * s;

    let mut step = |p: &ParamStore, grads: &mut Grads, rng: &mut ChaCha8Rng, dloss: f32| -> Result<NamedLosses> {
        let idx = rand::seq::index::sample(rng, train.len, b).into_vec();
        let image = on.tensor(&[b, 3, s, s], &gather(&train.images, per_image, &idx))?;
        let edges = on.tensor(&[b, sd], &gather(&train.edges, sd, &idx))?;
        let eps = on.tensor(&[b, latent], &crate::util::standard_normal(rng, b * latent))?;
        let alloc = &mut on.alloc();
        let acts = model.forward(p, &image, Some(&eps), alloc)?;
        let l = vae_losses(&acts, &image, &edges)?;
        let zeros = |t: &Tensor| on.zeros(t.shape());
        let (mut drecon, mut dmu, mut dlogvar, mut dstructure) = (zeros(&acts.recon)?, zeros(&acts.mu)?, zeros(&acts.logvar)?, zeros(&acts.structure)?);
        mse_loss_backward(&acts.recon, &image, dloss, &mut drecon)?;
        kl_loss_backward(&acts.mu, &acts.logvar, cfg.beta * dloss, &mut dmu, &mut dlogvar)?;
        mse_loss_backward(&acts.structure, &edges, cfg.lambda * dloss, &mut dstructure)?;
        let d = StructuralVaeOutputGrads { recon: &drecon, mu: &dmu, logvar: &dlogvar, structure: &dstructure };
        model.backward(p, &image, Some(&eps), &acts, &d, grads, false, alloc)?;
        Ok(vec![("total", cfg.total(&l)), ("recon", l.recon), ("kl", l.kl), ("structure", l.structure)])
    };
    // z = mu: the validation loss is deterministic. Every loss term is a mean over the batch, so chunk
    // means weighted by chunk size give the split's mean.
    let mut validate = |p: &ParamStore| -> Result<f64> {
        let mut sum = 0.0;
        for start in (0..val.len).step_by(b) {
            let idx: Vec<usize> = (start..(start + b).min(val.len)).collect();
            let image = on.tensor(&[idx.len(), 3, s, s], &gather(&val.images, per_image, &idx))?;
            let edges = on.tensor(&[idx.len(), sd], &gather(&val.edges, sd, &idx))?;
            let acts = model.forward(p, &image, None, &mut on.alloc())?;
            sum += cfg.total(&vae_losses(&acts, &image, &edges)?) * idx.len() as f64;
        }
        Ok(sum / val.len as f64)
    };
    let id = config_id(format!("vae {cfg:?}").as_bytes());
    // Before the parameters, which `train all` takes as the sign that the stage finished.
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create the output folder", out.display()))?;
    save_model_config(&out.join(VAE_CONFIG), "StructuralVAE", m)?;
    train_loop(on, "vae", &cfg.train, &id, out, resume, &model.params, &mut params, &mut step, &mut validate, stop)
}

/// Writes a model's configuration as JSON with diffusers' `_class_name` key (what `from_json` reads back).
fn save_model_config(path: &Path, class: &str, config: &impl serde::Serialize) -> Result<()> {
    let mut value = serde_json::to_value(config)?;
    value.as_object_mut().context("a model configuration is a table")?.insert("_class_name".into(), Value::from(class));
    crate::util::write_atomic(path, serde_json::to_string_pretty(&value)?.as_bytes()).with_context(|| format!("{}: cannot write", path.display()))
}

/// The training EEG of `figures` (`[figures, per]`, from `data` `[N, reps, per]`): per figure one random
/// repetition, or with `k` > 1 the mean of `k` distinct random repetitions (more signal per sample, closer to
/// the averaged EEG of validation and test, and still a different sample at most steps).
fn training_trials(data: &[f32], per: usize, reps: usize, figures: &[usize], k: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let mut out = Vec::with_capacity(figures.len() * per);
    for &f in figures {
        if k <= 1 {
            let r = rng.random_range(0..reps);
            out.extend_from_slice(&data[(f * reps + r) * per..(f * reps + r + 1) * per]);
        } else {
            let mut mean = vec![0f32; per];
            for r in rand::seq::index::sample(rng, reps, k) {
                mean.iter_mut().zip(&data[(f * reps + r) * per..(f * reps + r + 1) * per]).for_each(|(m, v)| *m += v);
            }
            out.extend(mean.into_iter().map(|m| m / k as f32));
        }
    }
    out
}

fn default_trial_average() -> usize {
    1
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

fn standardize(eeg: &mut EegData, mean: &[f32], std: &[f32]) {
    let [_, _, c, t] = eeg.shape;
    for (k, row) in eeg.data.chunks_exact_mut(t).enumerate() {
        let ch = k % c;
        row.iter_mut().for_each(|v| *v = (*v - mean[ch]) / std[ch]);
    }
}

/// The frozen VAE's mu (z = mu) of every image of a split, `[N, latent]`.
fn vae_mu(on: &On, model: &StructuralVae, p: &ParamStore, images: &ImageSplit, chunk: usize) -> Result<Vec<f32>> {
    let s = model.config.image_size;
    let mut mu = Vec::with_capacity(images.len * model.config.latent_dim);
    for start in (0..images.len).step_by(chunk) {
        let idx: Vec<usize> = (start..(start + chunk).min(images.len)).collect();
        let image = on.tensor(&[idx.len(), 3, s, s], &gather(&images.images, 3 * s * s, &idx))?;
        mu.extend(model.forward(p, &image, None, &mut on.alloc())?.mu.to_f32_vec()?);
    }
    Ok(mu)
}

/// Runs stage `encoder`; see [`EncoderStageConfig`] and the module docs for what it writes into `out`.
pub fn train_encoder(cfg: &EncoderStageConfig, out: &Path, resume: Option<&Path>, stop: &AtomicBool, device: &Device) -> Result<StageReport> {
    let on = &On::new(device);
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
    let (train_mu, val_mu) = match &cfg.image_embeddings {
        Some(t) => (embedding_rows(&t.train, train_split.figures, m.latent_dim)?, embedding_rows(&t.val, val_split.figures, m.latent_dim)?),
        None => {
            let vae = StructuralVae::new(cfg.vae.clone())?;
            let vae_params = on.load_params(&vae.params, &SafetensorsFile::open(&cfg.vae_weights)?, &[])?;
            let sd = cfg.vae.structure_dim;
            (
                vae_mu(on, &vae, &vae_params, &load_images(&cfg.data, train_split, cfg.vae.image_size, sd)?, b)?,
                vae_mu(on, &vae, &vae_params, &load_images(&cfg.data, val_split, cfg.vae.image_size, sd)?, b)?,
            )
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
    ensure!((1..=reps).contains(&cfg.trial_average), "stage encoder: trial_average {} must be between 1 and the {reps} repetitions", cfg.trial_average);
    ensure!(b >= 2 && b <= n_train, "stage encoder: batch {b} must be between 2 and the {n_train} training figures");
    ensure!(n_val >= 2, "stage encoder: the val split needs at least 2 figures for InfoNCE, it has {n_val}");
    let (latent, trial) = (m.latent_dim, c * t);
    let encoder = EegEncoder::new(m.clone())?;
    let mut params = on.random_params(&encoder.params, cfg.train.seed)?;
    let mut nce = InfoNceActivations::zeros(&on.device, b, latent, on.dtype)?;

    let mut step = |p: &ParamStore, grads: &mut Grads, rng: &mut ChaCha8Rng, dloss: f32| -> Result<NamedLosses> {
        let figures = rand::seq::index::sample(rng, n_train, b).into_vec();
        let eeg = on.tensor(&[b, c, t], &training_trials(&train.data, trial, reps, &figures, cfg.trial_average, rng))?;
        let target = on.tensor(&[b, latent], &gather(&train_mu, latent, &figures))?;
        let alloc = &mut on.alloc();
        let acts = encoder.forward(p, &eeg, alloc)?;
        infonce_forward(&acts.embedding, &target, cfg.temperature, &mut nce)?;
        let loss = nce.loss()? as f64;
        let (mut dembedding, mut dtarget) = (on.zeros(&[b, latent])?, on.zeros(&[b, latent])?);
        infonce_backward(&mut nce, dloss, &mut dembedding, &mut dtarget)?;
        encoder.backward(p, &acts, &dembedding, grads, false, alloc)?;
        Ok(vec![("total", loss)])
    };
    // InfoNCE depends on the batch: the val figures in order, in chunks of `batch` (the last may be
    // smaller), each chunk's loss weighted by its size.
    let mut validate = |p: &ParamStore| -> Result<f64> {
        let mut sum = 0.0;
        for start in (0..n_val).step_by(b) {
            let idx: Vec<usize> = (start..(start + b).min(n_val)).collect();
            let eeg = on.tensor(&[idx.len(), c, t], &gather(&val.data, trial, &idx))?;
            let target = on.tensor(&[idx.len(), latent], &gather(&val_mu, latent, &idx))?;
            let acts = encoder.forward(p, &eeg, &mut on.alloc())?;
            let mut chunk = InfoNceActivations::zeros(&on.device, idx.len(), latent, on.dtype)?;
            infonce_forward(&acts.embedding, &target, cfg.temperature, &mut chunk)?;
            sum += chunk.loss()? as f64 * idx.len() as f64;
        }
        Ok(sum / n_val as f64)
    };
    let id = config_id(format!("encoder {cfg:?}").as_bytes());
    // Before the parameters, which `train all` takes as the sign that the stage finished.
    save_model_config(&out.join(ENCODER_CONFIG), "SpatiotemporalEEGEncoder", m)?;
    train_loop(on, "encoder", &cfg.train, &id, out, resume, &encoder.params, &mut params, &mut step, &mut validate, stop)
}

/// Writes `dir` as a diffusers component: `config.json` (`config` with `_class_name`) and
/// `diffusion_pytorch_model.safetensors` holding the parameters of `tree` whose names `keep` accepts.
fn save_component(dir: &Path, class: &str, config: &Value, tree: &ParamTree, params: &ParamStore, keep: &dyn Fn(&str) -> bool) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create the component folder", dir.display()))?;
    let mut config = config.clone();
    config.as_object_mut().with_context(|| format!("{class} config must be a table"))?.insert("_class_name".into(), Value::from(class));
    let config_path = dir.join("config.json");
    crate::util::write_atomic(&config_path, serde_json::to_string_pretty(&config)?.as_bytes()).with_context(|| format!("{}: cannot write", config_path.display()))?;
    let refs: Vec<(&str, &Tensor)> =
        tree.specs().iter().enumerate().filter(|(_, s)| keep(&s.name)).map(|(i, s)| (s.name.as_str(), params.get(ParamId(i)))).collect();
    let path = dir.join(COMPONENT_WEIGHT_FILES[0]);
    ensure_finite(&path, &refs)?;
    save_safetensors(&path, &refs, None).with_context(|| format!("{}: cannot write the parameters", path.display()))
}

/// Stage `base` (TOML table `[base]`): a small base trained from scratch, as the embedded default's. With
/// Stable Diffusion weights, `[base] pretrained = "DIR"` replaces it ([`check_pretrained_base`]). First a small AutoencoderKL (loss = MSE(decode(z), image in [-1, 1]) + `kl_weight` · KL, z
/// sampled with the reparameterisation), then a small UNet2DConditionModel with the epsilon-prediction loss
/// on the frozen VAE's latents.
///
/// UNet training: the latent of an image is the VAE posterior's mean (deterministic, computed once) times
/// the VAE config's `scaling_factor`; t is uniform in [0, 1000), ε standard normal from the stage's seeded
/// RNG, x_t = sqrt(ᾱ_t)·z + sqrt(1 − ᾱ_t)·ε with SD 1.5's ᾱ, loss = MSE(UNet(x_t, t, context), ε). The
/// base UNet has no text: its context is a fixed null context, `context_tokens` zero tokens of the
/// config's `cross_attention_dim` (so cross-attention contributes only its output bias); the ControlNet stage
/// feeds the same UNet its EEG tokens, and zero tokens again under condition dropout.
///
/// Writes `vae/` and `unet/` as diffusers components (`config.json` + `diffusion_pytorch_model.safetensors`)
/// beside the two halves' logs and checkpoints (`base_vae-*`, `base_unet-*`). `--resume` with a `base_vae`
/// checkpoint continues the VAE and then trains the UNet; with a `base_unet` checkpoint it reads the VAE
/// from the `vae/` component next to that checkpoint and continues the UNet.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseStageConfig {
    pub data: PathBuf,
    /// Images are resized to this; the latents are `image_size / 2^(blocks - 1)` square.
    pub image_size: usize,
    pub kl_weight: f32,
    pub context_tokens: usize,
    pub vae_train: LoopConfig,
    pub unet_train: LoopConfig,
    /// diffusers `config.json` contents of the AutoencoderKL and the UNet2DConditionModel.
    pub vae_model: Value,
    pub unet_model: Value,
}

/// What stage `base` reports: the VAE's run (absent when resumed from a UNet checkpoint) and the UNet's.
#[derive(Debug, Clone, PartialEq)]
pub struct BaseReport {
    pub vae: Option<StageReport>,
    pub unet: StageReport,
}

/// Images of a split as `[N, 3, S, S]` in [-1, 1], diffusers' VAE input range.
fn signed_images(data: &Path, split: &SplitManifest, size: usize, edge_size: usize) -> Result<Vec<f32>> {
    Ok(load_images(data, split, size, edge_size * edge_size)?.images.into_iter().map(|v| 2.0 * v - 1.0).collect())
}

/// The VAE's two loss terms for a decode of z against `image`.
fn kl_vae_losses(recon: &Tensor, image: &Tensor, mean: &Tensor, logvar: &Tensor) -> Result<(f64, f64)> {
    let (mut loss, mut partials) = loss_buffers(image)?;
    mse_loss(recon, image, &mut loss, &mut partials)?;
    let mse = loss.to_f32_vec()?[0] as f64;
    kl_loss(mean, logvar, &mut loss, &mut partials)?;
    Ok((mse, loss.to_f32_vec()?[0] as f64))
}

fn train_base_vae(on: &On, cfg: &BaseStageConfig, vae: &AutoencoderKl, train: &[f32], val: &[f32], out: &Path, resume: Option<&Path>, stop: &AtomicBool) -> Result<(ParamStore, StageReport)> {
    let s = cfg.image_size;
    let per_image = 3 * s * s;
    let n_train = train.len() / per_image;
    let b = cfg.vae_train.batch;
    ensure!(b >= 1 && b <= n_train, "stage base: vae_train.batch {b} must be between 1 and the {n_train} training figures");
    let mut params = on.random_params(&vae.params, cfg.vae_train.seed)?;
    let kl_weight = cfg.kl_weight;
    let mut step = |p: &ParamStore, grads: &mut Grads, rng: &mut ChaCha8Rng, dloss: f32| -> Result<NamedLosses> {
        let idx = rand::seq::index::sample(rng, n_train, b).into_vec();
        let image = on.tensor(&[b, 3, s, s], &gather(train, per_image, &idx))?;
        let alloc = &mut on.alloc();
        let (mean, logvar, enc) = vae.encode(p, &image, alloc)?;
        let eps = on.tensor(mean.shape(), &crate::util::standard_normal(rng, mean.numel()))?;
        let mut z = on.zeros(mean.shape())?;
        reparameterize_forward(&mean, &logvar, &eps, &mut z)?;
        let (recon, dec) = vae.decode(p, &z, alloc)?;
        let (mse, kl) = kl_vae_losses(&recon, &image, &mean, &logvar)?;
        let mut drecon = on.zeros(recon.shape())?;
        mse_loss_backward(&recon, &image, dloss, &mut drecon)?;
        let dz = vae.decode_backward(p, grads, &z, &dec, &drecon, alloc)?;
        let (mut dmean, mut dlogvar) = (on.zeros(mean.shape())?, on.zeros(mean.shape())?);
        reparameterize_backward(&logvar, &eps, &dz, &mut dmean, &mut dlogvar)?;
        let (mut kl_dmean, mut kl_dlogvar) = (on.zeros(mean.shape())?, on.zeros(mean.shape())?);
        kl_loss_backward(&mean, &logvar, kl_weight * dloss, &mut kl_dmean, &mut kl_dlogvar)?;
        let (mut dmean_total, mut dlogvar_total) = (on.zeros(mean.shape())?, on.zeros(mean.shape())?);
        add(&dmean, &kl_dmean, &mut dmean_total)?;
        add(&dlogvar, &kl_dlogvar, &mut dlogvar_total)?;
        vae.encode_backward(p, grads, &image, &enc, &dmean_total, &dlogvar_total, alloc)?;
        Ok(vec![("total", mse + kl_weight as f64 * kl), ("recon", mse), ("kl", kl)])
    };
    // z = mean: deterministic; both terms are batch means, so size-weighted chunk means give the split's.
    let n_val = val.len() / per_image;
    let mut validate = |p: &ParamStore| -> Result<f64> {
        let mut sum = 0.0;
        for start in (0..n_val).step_by(b) {
            let idx: Vec<usize> = (start..(start + b).min(n_val)).collect();
            let image = on.tensor(&[idx.len(), 3, s, s], &gather(val, per_image, &idx))?;
            let alloc = &mut on.alloc();
            let (mean, logvar, _) = vae.encode(p, &image, alloc)?;
            let (recon, _) = vae.decode(p, &mean, alloc)?;
            let (mse, kl) = kl_vae_losses(&recon, &image, &mean, &logvar)?;
            sum += (mse + kl_weight as f64 * kl) * idx.len() as f64;
        }
        Ok(sum / n_val as f64)
    };
    let id = config_id(format!("base_vae {:?} {:?} {} {} {}", cfg.vae_model, cfg.vae_train, cfg.kl_weight, cfg.image_size, cfg.data.display()).as_bytes());
    let report = train_loop(on, "base_vae", &cfg.vae_train, &id, out, resume, &vae.params, &mut params, &mut step, &mut validate, stop)?;
    Ok((params, report))
}

/// The VAE posterior's mean of every image, times `scaling_factor`: `[N, latent, h, w]` flattened.
fn scaled_latents(on: &On, vae: &AutoencoderKl, p: &ParamStore, images: &[f32], size: usize, chunk: usize) -> Result<Vec<f32>> {
    let per_image = 3 * size * size;
    let n = images.len() / per_image;
    let scale = vae.config.scaling_factor as f32;
    let mut latents = Vec::new();
    for start in (0..n).step_by(chunk) {
        let idx: Vec<usize> = (start..(start + chunk).min(n)).collect();
        let image = on.tensor(&[idx.len(), 3, size, size], &gather(images, per_image, &idx))?;
        let (mean, _, _) = vae.encode(p, &image, &mut on.alloc())?;
        latents.extend(mean.to_f32_vec()?.into_iter().map(|v| v * scale));
    }
    Ok(latents)
}

/// A noised batch for the epsilon loss: timesteps [B] and x_t = sqrt(ᾱ_t)·z + sqrt(1 − ᾱ_t)·ε per sample.
struct NoisedBatch {
    timesteps: Tensor,
    noise: Tensor,
    noisy: Tensor,
}

fn noise_batch(on: &On, latents: &[f32], shape: &[usize], alphas: &[f64], rng: &mut ChaCha8Rng) -> Result<NoisedBatch> {
    let per = latents.len() / shape[0];
    let t: Vec<usize> = (0..shape[0]).map(|_| rng.random_range(0..TRAIN_TIMESTEPS)).collect();
    let eps = crate::util::standard_normal(rng, latents.len());
    let noisy: Vec<f32> = latents
        .iter()
        .zip(&eps)
        .enumerate()
        .map(|(i, (z, e))| {
            let a = alphas[t[i / per]];
            (a.sqrt() * *z as f64 + (1.0 - a).sqrt() * *e as f64) as f32
        })
        .collect();
    let steps: Vec<f32> = t.iter().map(|&t| t as f32).collect();
    Ok(NoisedBatch { timesteps: Tensor::from_f32(&on.device, &[shape[0]], DType::F32, &steps)?, noise: on.tensor(shape, &eps)?, noisy: on.tensor(shape, &noisy)? })
}

fn mse(pred: &Tensor, target: &Tensor) -> Result<f64> {
    let (mut loss, mut partials) = loss_buffers(pred)?;
    mse_loss(pred, target, &mut loss, &mut partials)?;
    Ok(loss.to_f32_vec()?[0] as f64)
}

/// The seed of the fixed timesteps and noise that the epsilon-loss validations draw, the same at every
/// checkpoint so their losses compare.
const VAL_NOISE_SEED: u64 = 0x5eed_f7a1;

/// Runs stage `base`; see [`BaseStageConfig`].
pub fn train_base(cfg: &BaseStageConfig, out: &Path, resume: Option<&Path>, stop: &AtomicBool, device: &Device) -> Result<BaseReport> {
    let on = &On::new(device);
    check_image_size("base", "image_size", cfg.image_size)?;
    let vae_config_path = out.join("vae/config.json");
    let unet_config_path = out.join("unet/config.json");
    let vae = AutoencoderKl::new(AutoencoderKlConfig::from_json(&vae_config_path, &cfg.vae_model)?)?;
    let unet = UNet::new(UNetConfig::from_json(&unet_config_path, &cfg.unet_model)?)?;
    let uc = &unet.config;
    ensure!(
        uc.in_channels == vae.config.latent_channels && uc.out_channels == vae.config.latent_channels,
        "stage base: the UNet's in/out channels {}/{} must equal the VAE's latent_channels {}",
        uc.in_channels,
        uc.out_channels,
        vae.config.latent_channels
    );
    let down = 1 << (vae.config.block_out_channels.len() - 1);
    let s = cfg.image_size;
    ensure!(s.is_multiple_of(down), "stage base: image_size {s} must be a multiple of the VAE's downscale {down}");
    // The reconstruction pipeline samples latents of the UNet's sample_size: another size than training's
    // would decode images of a size the model never saw.
    if let Some(sample_size) = cfg.unet_model.get("sample_size").and_then(Value::as_u64) {
        ensure!(
            sample_size as usize == s / down,
            "stage base: [base.unet_model] sample_size {sample_size} must be image_size {s} / the VAE's downscale {down} = {} (the \
             latent side reconstruction samples); leave it out to have it computed",
            s / down
        );
    }
    let manifest = Manifest::read(&cfg.data)?;
    let train = signed_images(&cfg.data, manifest.split(&cfg.data, "train")?, s, manifest.edge_size)?;
    let val = signed_images(&cfg.data, manifest.split(&cfg.data, "val")?, s, manifest.edge_size)?;

    let resume_kind = resume.map(|p| p.file_name().and_then(|f| f.to_str()).unwrap_or_default());
    let (vae_params, vae_report, unet_resume) = match resume_kind {
        Some(name) if name.starts_with("base_unet") => {
            let checkpoint = resume.expect("a resume path");
            let dir = checkpoint.parent().unwrap_or(Path::new(".")).join("vae");
            let p = on.load_params(&vae.params, &Component::open(&dir)?.weights, &LEGACY_ATTENTION_NAMES)?;
            // The output folder holds both components, whichever folder the run resumed from.
            save_component(&out.join("vae"), "AutoencoderKL", &cfg.vae_model, &vae.params, &p, &|_| true)?;
            (p, None, Some(checkpoint))
        }
        Some(name) if !name.starts_with("base_vae") => bail!("stage base: resume from a base_vae-* or base_unet-* checkpoint, not {name}"),
        _ => {
            let (p, report) = train_base_vae(on, cfg, &vae, &train, &val, out, resume, stop)?;
            save_component(&out.join("vae"), "AutoencoderKL", &cfg.vae_model, &vae.params, &p, &|_| true)?;
            (p, Some(report), None)
        }
    };

    let b = cfg.unet_train.batch;
    let train_latents = scaled_latents(on, &vae, &vae_params, &train, s, b)?;
    let val_latents = scaled_latents(on, &vae, &vae_params, &val, s, b)?;
    let (lc, h) = (vae.config.latent_channels, s / down);
    let per = lc * h * h;
    let n_train = train_latents.len() / per;
    ensure!(b >= 1 && b <= n_train, "stage base: unet_train.batch {b} must be between 1 and the {n_train} training figures");
    let alphas = alphas_cumprod();
    let null_context = |n: usize| on.zeros(&[n, cfg.context_tokens, uc.cross_attention_dim]);
    let batch_context = null_context(b)?;
    let mut params = on.random_params(&unet.params, cfg.unet_train.seed)?;
    let mut step = |p: &ParamStore, grads: &mut Grads, rng: &mut ChaCha8Rng, dloss: f32| -> Result<NamedLosses> {
        let idx = rand::seq::index::sample(rng, n_train, b).into_vec();
        let batch = noise_batch(on, &gather(&train_latents, per, &idx), &[b, lc, h, h], &alphas, rng)?;
        let cond = UNetConditioning { timestep: &batch.timesteps, encoder_hidden_states: &batch_context, residuals: None };
        let alloc = &mut on.alloc();
        let acts = unet.forward(p, &batch.noisy, &cond, alloc)?;
        let loss = mse(&acts.output, &batch.noise)?;
        let mut dy = on.zeros(acts.output.shape())?;
        mse_loss_backward(&acts.output, &batch.noise, dloss, &mut dy)?;
        unet.backward(p, grads, &batch.noisy, &cond, &acts, &dy, alloc)?;
        Ok(vec![("total", loss)])
    };
    let n_val = val_latents.len() / per;
    let mut validate = |p: &ParamStore| -> Result<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(VAL_NOISE_SEED);
        let mut sum = 0.0;
        for start in (0..n_val).step_by(b) {
            let idx: Vec<usize> = (start..(start + b).min(n_val)).collect();
            let batch = noise_batch(on, &gather(&val_latents, per, &idx), &[idx.len(), lc, h, h], &alphas, &mut rng)?;
            let context = null_context(idx.len())?;
            let cond = UNetConditioning { timestep: &batch.timesteps, encoder_hidden_states: &context, residuals: None };
            let acts = unet.forward(p, &batch.noisy, &cond, &mut on.alloc())?;
            sum += mse(&acts.output, &batch.noise)? * idx.len() as f64;
        }
        Ok(sum / n_val as f64)
    };
    let id = config_id(format!("base_unet {cfg:?}").as_bytes());
    let unet_report = train_loop(on, "base_unet", &cfg.unet_train, &id, out, unet_resume, &unet.params, &mut params, &mut step, &mut validate, stop)?;
    save_component(&out.join("unet"), "UNet2DConditionModel", &cfg.unet_model, &unet.params, &params, &|_| true)?;
    Ok(BaseReport { vae: vae_report, unet: unet_report })
}

/// Stage `controlnet` (TOML table `[controlnet]`, stage 3): the ControlNet and the EEG-to-token projector
/// `eeg_projector` (Linear, the EEG encoder's embedding -> `tokens` · `cross_attention_dim`, read as
/// `[tokens, cross_attention_dim]`) trained with the epsilon loss of stage `base` through the frozen UNet
/// (the UNet's context is the tokens and its residuals the ControlNet's); the AutoencoderKL, the UNet, the
/// EEG encoder and the StructuralVAE are frozen.
///
/// The condition: the EEG encoder's embedding e (a random single trial in training, the repetition average
/// in validation, standardised with stage `encoder`'s statistics) gives the structure map
/// `structure_head(e)` of the StructuralVAE's decoder, `[E·E]` row-major (E = sqrt(structure_dim), 16), read
/// as a one-channel E x E image and upsampled nearest-neighbour by the integer factor (latent size ·
/// condition downscale) / E to the ControlNet's condition size; the ControlNet has
/// `conditioning_channels` 1. Values are used as the head gives them (about [0, 1], edges high).
///
/// Condition dropout: each training sample's tokens are zero with probability `condition_dropout` (the
/// structure map stays), which is the unconditional branch classifier-free guidance evaluates.
///
/// Initialisation as diffusers' `ControlNetModel.from_unet`: conv_in, time_embedding, down_blocks and
/// mid_block copied from the UNet; the zero convs and `controlnet_cond_embedding.conv_out` zero; the rest of
/// the conditioning embedding and the projector seeded random. Writes `controlnet/` as a diffusers component
/// (its config is the UNet's encoder half with `conditioning_channels` 1 and
/// `conditioning_embedding_out_channels`) and `eeg_projector.safetensors` (metadata `tokens`, and
/// `structure_norm`: the length the embedding is rescaled to before the structure head).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlNetStageConfig {
    pub data: PathBuf,
    /// Stage `base`'s output (or any diffusers Stable Diffusion folder's) `vae/` and `unet/` components.
    pub vae: PathBuf,
    pub unet: PathBuf,
    /// Stage `vae`'s parameters and configuration.
    pub structural_vae_weights: PathBuf,
    pub structural_vae: StructuralVaeConfig,
    /// Stage `encoder`'s parameters, configuration and `eeg_standardization.json`.
    pub encoder_weights: PathBuf,
    pub encoder: EegEncoderConfig,
    pub eeg_standardization: PathBuf,
    /// Images are resized to this before the VAE encodes them.
    pub image_size: usize,
    pub tokens: usize,
    pub condition_dropout: f64,
    pub conditioning_embedding_out_channels: Vec<usize>,
    pub train: LoopConfig,
    /// As the encoder stage's: each training sample's EEG is the mean of this many random repetitions.
    #[serde(default = "default_trial_average")]
    pub trial_average: usize,
}

/// The diffusers ControlNetModel config keys that `from_unet` copies from the UNet's config.
const CONTROLNET_UNET_KEYS: [&str; 17] = [
    "in_channels",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "only_cross_attention",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "act_fn",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "attention_head_dim",
    "num_attention_heads",
    "use_linear_projection",
    "upcast_attention",
];

/// Runs stage `controlnet`; see [`ControlNetStageConfig`].
pub fn train_controlnet(cfg: &ControlNetStageConfig, out: &Path, resume: Option<&Path>, stop: &AtomicBool, device: &Device) -> Result<StageReport> {
    let on = &On::new(device);
    ensure!((0.0..1.0).contains(&cfg.condition_dropout), "stage controlnet: condition_dropout {} must be in [0, 1)", cfg.condition_dropout);
    ensure!(cfg.tokens >= 1, "stage controlnet: tokens must be at least 1");
    check_image_size("controlnet", "image_size", cfg.image_size)?;
    check_image_size("controlnet", "structural_vae.image_size", cfg.structural_vae.image_size)?;
    let (vae, vae_params) = load_autoencoder_kl(&cfg.vae, &on.device, on.dtype)?;
    let (unet, unet_params, unet_config) = load_unet(&cfg.unet, &on.device, on.dtype)?;

    let mut cn_config = serde_json::Map::new();
    cn_config.insert("_class_name".into(), Value::from("ControlNetModel"));
    for key in CONTROLNET_UNET_KEYS {
        if let Some(v) = unet_config.get(key) {
            cn_config.insert(key.into(), v.clone());
        }
    }
    cn_config.insert("conditioning_channels".into(), Value::from(1));
    cn_config.insert("conditioning_embedding_out_channels".into(), Value::from(cfg.conditioning_embedding_out_channels.clone()));
    let cn_config = Value::Object(cn_config);
    let controlnet = ControlNet::new(UNetConfig::from_json(&out.join("controlnet/config.json"), &cn_config)?)?;
    let d = unet.config.cross_attention_dim;
    let latent_dim = cfg.encoder.latent_dim;
    ensure!(latent_dim == cfg.structural_vae.latent_dim, "stage controlnet: the encoder's latent_dim {latent_dim} differs from the StructuralVAE's {}", cfg.structural_vae.latent_dim);
    let mut tree = controlnet.params.clone();
    let projector = Linear::new(&mut tree, "eeg_projector", latent_dim, cfg.tokens * d, true);

    let svae = StructuralVae::new(cfg.structural_vae.clone())?;
    let svae_params = on.load_params(&svae.params, &SafetensorsFile::open(&cfg.structural_vae_weights)?, &[])?;
    let encoder = EegEncoder::new(cfg.encoder.clone())?;
    let encoder_params = on.load_params(&encoder.params, &SafetensorsFile::open(&cfg.encoder_weights)?, &[])?;
    let edge = (cfg.structural_vae.structure_dim as f64).sqrt() as usize;
    ensure!(edge * edge == cfg.structural_vae.structure_dim, "stage controlnet: structure_dim {} is not a square", cfg.structural_vae.structure_dim);

    let s = cfg.image_size;
    let down = 1 << (vae.config.block_out_channels.len() - 1);
    ensure!(s.is_multiple_of(down), "stage controlnet: image_size {s} must be a multiple of the VAE's downscale {down}");
    let (lc, h) = (vae.config.latent_channels, s / down);
    let cond_size = h * controlnet.condition_downscale();
    ensure!(cond_size.is_multiple_of(edge), "stage controlnet: the condition size {cond_size} is not a multiple of the structure map's {edge}");
    let factor = cond_size / edge;

    let manifest = Manifest::read(&cfg.data)?;
    let (train_split, val_split) = (manifest.split(&cfg.data, "train")?, manifest.split(&cfg.data, "val")?);
    let b = cfg.train.batch;
    let train_latents = scaled_latents(on, &vae, &vae_params, &signed_images(&cfg.data, train_split, s, manifest.edge_size)?, s, b)?;
    let val_latents = scaled_latents(on, &vae, &vae_params, &signed_images(&cfg.data, val_split, s, manifest.edge_size)?, s, b)?;
    let (c, t) = (cfg.encoder.n_channels, cfg.encoder.n_timepoints);
    // The dataset's EEG against the encoder's contract: the same channels, rate, window and scale.
    let contract = EegContract::read(&cfg.eeg_standardization, c)?;
    contract.check_dataset(&manifest, &cfg.data, &cfg.eeg_standardization)?;
    let mut train = split_eeg(&cfg.data, train_split, Repetitions::Keep)?;
    let mut val = split_eeg(&cfg.data, val_split, Repetitions::Keep)?;
    for eeg in [&train, &val] {
        eeg.expect(c, t)?;
        let mut scan = eeg.scan();
        scan.ch_names = Some(manifest.ch_names.clone());
        scan.times = Some(manifest.times.iter().map(|&v| v as f64).collect());
        contract.check(&scan, &cfg.eeg_standardization)?;
    }
    standardize(&mut train, &contract.mean, &contract.std);
    standardize(&mut val, &contract.mean, &contract.std);
    let val = val.with_repetitions(Repetitions::Average);
    let [n_train, reps, _, _] = train.shape;
    let n_val = val.shape[0];
    ensure!((1..=reps).contains(&cfg.trial_average), "stage controlnet: trial_average {} must be between 1 and the {reps} repetitions", cfg.trial_average);
    ensure!(b >= 1 && b <= n_train, "stage controlnet: batch {b} must be between 1 and the {n_train} training figures");
    let per = lc * h * h;

    // from_unet: the shared encoder half copied by name, the zero convs and the condition embedding's
    // conv_out zero.
    let mut params = on.random_params(&tree, cfg.train.seed)?;
    for (i, spec) in tree.specs().iter().enumerate() {
        let zero = spec.name.starts_with("controlnet_down_blocks.")
            || spec.name.starts_with("controlnet_mid_block.")
            || spec.name.starts_with("controlnet_cond_embedding.conv_out.");
        if zero {
            params.get_mut(ParamId(i)).write_f32(&vec![0.0; spec.shape.iter().product()])?;
        } else if let Some(id) = unet.params.id(&spec.name) {
            params.get_mut(ParamId(i)).write_f32(&unet_params.get(id).to_f32_vec()?)?;
        }
    }

    // The EEG's embedding [B, latent] and its condition image [B, 1, S, S]; then the tokens, zero where dropped.
    // InfoNCE fixes only the embedding's direction: rescaled to the mean norm of the VAE's mu over the train
    // split, it reaches the structure head at the scale that head was trained on.
    let structure_norm = {
        let images = load_images(&cfg.data, train_split, cfg.structural_vae.image_size, cfg.structural_vae.structure_dim)?;
        let mu = vae_mu(on, &svae, &svae_params, &images, b.max(1))?;
        let norms: Vec<f64> = mu.chunks_exact(latent_dim).map(|r| r.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt()).collect();
        (norms.iter().sum::<f64>() / norms.len().max(1) as f64) as f32
    };
    let condition = |eeg: &Tensor| -> Result<(Tensor, Tensor)> {
        let alloc = &mut on.alloc();
        let embedding = encoder.forward(&encoder_params, eeg, alloc)?.embedding;
        let structure = svae.structure_from_embedding(&svae_params, &embedding, structure_norm, alloc)?;
        let n = embedding.shape()[0];
        let cond = on.tensor(&[n, 1, cond_size, cond_size], &upsample_nearest(&structure.to_f32_vec()?, edge, factor))?;
        Ok((embedding, cond))
    };
    let tokens = |p: &ParamStore, embedding: &Tensor, keep: &[bool]| -> Result<Tensor> {
        let flat = linear_layer_forward(&projector, p, embedding, &mut on.alloc())?.to_f32_vec()?;
        let masked: Vec<f32> = flat.chunks_exact(cfg.tokens * d).zip(keep).flat_map(|(row, &k)| row.iter().map(move |v| if k { *v } else { 0.0 })).collect();
        on.tensor(&[keep.len(), cfg.tokens, d], &masked)
    };
    // The frozen UNet's backward adds its parameter gradients here; nothing reads them.
    let mut unet_grads = Grads::zeros(&unet.params, &mut on.alloc(), on.dtype)?;
    let epsilon_loss = |p: &ParamStore, batch: &NoisedBatch, context: &Tensor, cond: &Tensor, alloc: &mut Standalone| -> Result<_> {
        let cn = controlnet.forward(p, &batch.noisy, &batch.timesteps, context, cond, 1.0, alloc)?;
        let unet_cond = UNetConditioning { timestep: &batch.timesteps, encoder_hidden_states: context, residuals: Some((cn.down.iter().collect(), &cn.mid)) };
        let acts = unet.forward(&unet_params, &batch.noisy, &unet_cond, alloc)?;
        let loss = mse(&acts.output, &batch.noise)?;
        Ok((cn, acts, loss))
    };
    let alphas = alphas_cumprod();
    let mut step = |p: &ParamStore, grads: &mut Grads, rng: &mut ChaCha8Rng, dloss: f32| -> Result<NamedLosses> {
        let figures = rand::seq::index::sample(rng, n_train, b).into_vec();
        let eeg = training_trials(&train.data, c * t, reps, &figures, cfg.trial_average, rng);
        let keep: Vec<bool> = (0..b).map(|_| rng.random::<f64>() >= cfg.condition_dropout).collect();
        let batch = noise_batch(on, &gather(&train_latents, per, &figures), &[b, lc, h, h], &alphas, rng)?;
        let (embedding, cond) = condition(&on.tensor(&[b, c, t], &eeg)?)?;
        let context = tokens(p, &embedding, &keep)?;
        let alloc = &mut on.alloc();
        let (cn, acts, loss) = epsilon_loss(p, &batch, &context, &cond, alloc)?;
        let mut dy = on.zeros(acts.output.shape())?;
        mse_loss_backward(&acts.output, &batch.noise, dloss, &mut dy)?;
        let unet_cond = UNetConditioning { timestep: &batch.timesteps, encoder_hidden_states: &context, residuals: Some((cn.down.iter().collect(), &cn.mid)) };
        let du = unet.backward(&unet_params, &mut unet_grads, &batch.noisy, &unet_cond, &acts, &dy, alloc)?;
        let (ddown, dmid) = du.residuals.context("stage controlnet: the UNet returned no residual gradients")?;
        let ddown: Vec<&Tensor> = ddown.iter().collect();
        let dc = controlnet.backward(p, grads, &batch.noisy, &context, &cond, &cn, &ddown, &dmid, alloc)?;
        // The tokens feed both the UNet's and the ControlNet's cross-attention; dropped rows were constants.
        let (du_ctx, dc_ctx) = (du.encoder_hidden_states.to_f32_vec()?, dc.encoder_hidden_states.to_f32_vec()?);
        let dtokens: Vec<f32> = du_ctx
            .chunks_exact(cfg.tokens * d)
            .zip(dc_ctx.chunks_exact(cfg.tokens * d))
            .zip(&keep)
            .flat_map(|((u, c), &k)| u.iter().zip(c).map(move |(u, c)| if k { u + c } else { 0.0 }))
            .collect();
        linear_layer_param_backward(&projector, p, grads, &embedding, &on.tensor(&[b, cfg.tokens * d], &dtokens)?)?;
        Ok(vec![("total", loss)])
    };
    let mut validate = |p: &ParamStore| -> Result<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(VAL_NOISE_SEED);
        let mut sum = 0.0;
        for start in (0..n_val).step_by(b) {
            let idx: Vec<usize> = (start..(start + b).min(n_val)).collect();
            let batch = noise_batch(on, &gather(&val_latents, per, &idx), &[idx.len(), lc, h, h], &alphas, &mut rng)?;
            let (embedding, cond) = condition(&on.tensor(&[idx.len(), c, t], &gather(&val.data, c * t, &idx))?)?;
            let context = tokens(p, &embedding, &vec![true; idx.len()])?;
            sum += epsilon_loss(p, &batch, &context, &cond, &mut on.alloc())?.2 * idx.len() as f64;
        }
        Ok(sum / n_val as f64)
    };
    let id = config_id(format!("controlnet {cfg:?}").as_bytes());
    let report = train_loop(on, "controlnet", &cfg.train, &id, out, resume, &tree, &mut params, &mut step, &mut validate, stop)?;
    save_component(&out.join("controlnet"), "ControlNetModel", &cn_config, &tree, &params, &|name| !name.starts_with("eeg_projector."))?;
    let metadata = std::collections::BTreeMap::from([("tokens".to_string(), cfg.tokens.to_string()), ("structure_norm".to_string(), format!("{structure_norm:?}"))]);
    let refs = [("eeg_projector.weight", params.get(projector.weight)), ("eeg_projector.bias", params.get(projector.bias.expect("the projector has a bias")))];
    let path = out.join("eeg_projector.safetensors");
    ensure_finite(&path, &refs)?;
    // The projector last: `train all` takes it as the sign that the stage finished.
    write_base_pointer(cfg, out)?;
    save_safetensors(&path, &refs, Some(&metadata)).with_context(|| format!("{}: cannot write the projector", path.display()))?;
    Ok(report)
}

/// Checks that a diffusers Stable Diffusion folder (`[base] pretrained`) can serve as the base: its `vae/`
/// and `unet/` configurations build, every tensor of both loads by name and shape with no NaN or Inf and none
/// left over, and the UNet takes the VAE's latents. Returns a one-line description.
pub fn check_pretrained_base(dir: &Path) -> Result<String> {
    let (vae_dir, unet_dir) = (dir.join("vae"), dir.join("unet"));
    let (vae, _) = load_autoencoder_kl(&vae_dir, &Device::Cpu, DType::F32)?;
    let (unet, _, _) = load_unet(&unet_dir, &Device::Cpu, DType::F32)?;
    ensure!(
        unet.config.in_channels == vae.config.latent_channels,
        "{}: the UNet takes {} channels, the VAE ({}) makes latents of {}",
        unet_dir.display(),
        unet.config.in_channels,
        vae_dir.display(),
        vae.config.latent_channels
    );
    Ok(format!(
        "{} (VAE latents of {} channels, 1/{} of the image side; UNet cross-attention width {})",
        dir.display(),
        vae.config.latent_channels,
        1 << (vae.config.block_out_channels.len() - 1),
        unet.config.cross_attention_dim
    ))
}

fn write_base_pointer(cfg: &ControlNetStageConfig, out: &Path) -> Result<()> {
    let path = out.join(BASE_POINTER);
    let same = |given: &Path, here: &str| -> bool {
        match (std::fs::canonicalize(given), std::fs::canonicalize(out.join(here))) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
    };
    if same(&cfg.vae, "vae") && same(&cfg.unet, "unet") {
        return Ok(());
    }
    let abs = |p: &Path| -> Result<String> { Ok(std::fs::canonicalize(p).with_context(|| format!("{}: cannot resolve", p.display()))?.display().to_string()) };
    let value = serde_json::json!({ "vae": abs(&cfg.vae)?, "unet": abs(&cfg.unet)? });
    crate::util::write_atomic(&path, serde_json::to_string_pretty(&value)?.as_bytes()).with_context(|| format!("{}: cannot write", path.display()))
}
