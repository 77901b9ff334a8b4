//! What the stages share: the optimisation loop and its configuration, where a stage runs, the data and
//! output helpers.

use crate::diffusion::scheduler::TRAIN_TIMESTEPS;
use crate::models::autoencoder_kl::AutoencoderKl;
use crate::models::sgdm::StructuralVae;
use crate::ops::loss::mse_loss;
use rand::Rng;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, ensure, Context, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use serde_json::Value;

use crate::data::dataset::SplitManifest;
use crate::data::eeg::{EegData, Repetitions};
use crate::data::image::{load_square, MAX_IMAGE_SIZE};
use crate::data::npy::NpyFile;
use crate::memory::arena::ArenaReport;
use crate::memory::pool::StepPool;
use crate::memory::{Arena, MemoryPlan, Region};
use crate::nn::{Allocator, Grads, Inference, ParamId, ParamStore, ParamTree, Standalone};
use crate::ops::loss::PARTIALS;
use crate::ops::optim::AdamW;
use crate::runtime::Device;
use crate::tensor::{DType, Tensor};
use crate::train::{load_checkpoint, peek_checkpoint, save_checkpoint, LrSchedule, Optimizer, OptimizerConfig, Progress, RngState, StepLog};
use crate::weights::{save_safetensors, SafetensorsFile, COMPONENT_WEIGHT_FILES};

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

pub(super) fn default_micro_batches() -> usize {
    1
}

pub(super) fn default_select_best() -> bool {
    true
}

pub(super) fn default_weight_decay() -> f64 {
    AdamW::default().weight_decay
}

pub(super) fn default_checkpoint_every() -> u64 {
    500
}

pub(super) fn default_log_every() -> u64 {
    10
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
    /// Where the loop's memory went.
    pub memory: LoopMemory,
}

/// The memory of one training loop: the arena of its long-lived state (gradients and optimizer state; the
/// parameters have their own), and the per-step pool.
#[derive(Debug, Clone, PartialEq)]
pub struct LoopMemory {
    pub arena: ArenaReport,
    /// The per-step pool's capacity (0 with [`StepMemory::Standalone`]), the most of it one step used, and
    /// tensors it could not place (standalone allocations instead; 0 when every step repeats the first).
    pub step_pool: usize,
    pub step_peak: usize,
    pub overflowed: usize,
}

/// Where a training step's tensors (activations, their gradients, scratch, inputs) come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepMemory {
    /// A [`StepPool`]: sized by the first step, the same addresses every step after it (the default).
    Pool,
    /// The same pool, filled with NaN before every step after the first: anything that reads memory it did not write makes
    /// NaN (tests hold training to it).
    PoisonedPool,
    /// A standalone zeroed allocation per tensor: the reference the pool is tested against.
    Standalone,
}

/// Where a stage runs: the device, the storage dtype of its parameters and activations (f32 on the CPU;
/// bf16 on CUDA, with f32 master weights in the optimizer; losses are always f32), and where its steps'
/// tensors come from. The stages take anything that converts into one: a `&Device` gives the defaults.
pub struct On {
    pub device: Device,
    pub dtype: DType,
    pub step_memory: StepMemory,
}

impl On {
    pub fn new(device: &Device) -> On {
        On { device: device.clone(), dtype: if device.is_cuda() { DType::BF16 } else { DType::F32 }, step_memory: StepMemory::Pool }
    }

    /// The stage on `device` with its steps' tensors from `memory`.
    pub fn with_step_memory(device: &Device, memory: StepMemory) -> On {
        On { step_memory: memory, ..On::new(device) }
    }

    /// A tensor of `values` in the stage's dtype, from `alloc` (inside a step: the step's pool).
    pub(super) fn upload(&self, alloc: &mut dyn Allocator, shape: &[usize], values: &[f32]) -> Result<Tensor> {
        let mut t = alloc.alloc(shape, self.dtype)?;
        t.write_f32(values)?;
        Ok(t)
    }

    /// A zeroed tensor in the stage's dtype, from `alloc`.
    pub(super) fn zeros_in(&self, alloc: &mut dyn Allocator, shape: &[usize]) -> Result<Tensor> {
        let mut t = alloc.alloc(shape, self.dtype)?;
        t.fill_zero()?;
        Ok(t)
    }

    pub(super) fn tensor(&self, shape: &[usize], values: &[f32]) -> Result<Tensor> {
        Tensor::from_f32(&self.device, shape, self.dtype, values)
    }

    pub(super) fn zeros(&self, shape: &[usize]) -> Result<Tensor> {
        Tensor::zeros(&self.device, shape, self.dtype)
    }

    /// Standalone tensors for forwards no backward follows (validation, the stages' preprocessing), which
    /// run outside the step loop's pool: activations are discarded block by block, so a validation pass
    /// holds one block's working set beside the step pool, not a whole forward's activations.
    pub(super) fn forward_only(&self) -> Inference {
        Inference(self.device.clone())
    }

    pub(super) fn random_params(&self, tree: &ParamTree, seed: u64) -> Result<ParamStore> {
        ParamStore::random_owned(tree, &self.device, self.dtype, seed)
    }

    pub(super) fn load_params(&self, tree: &ParamTree, file: &SafetensorsFile, aliases: &[(&str, &str)]) -> Result<ParamStore> {
        ParamStore::load_owned(tree, file, &self.device, self.dtype, aliases)
    }
}

impl From<&Device> for On {
    fn from(device: &Device) -> On {
        On::new(device)
    }
}

/// A loss value and its partial sums, f32, from `alloc`.
pub(super) fn loss_buffers(alloc: &mut dyn Allocator) -> Result<(Tensor, Tensor)> {
    Ok((alloc.alloc(&[1], DType::F32)?, alloc.alloc(&[PARTIALS], DType::F32)?))
}

pub(super) fn check_image_size(stage: &str, key: &str, size: usize) -> Result<()> {
    ensure!((1..=MAX_IMAGE_SIZE).contains(&size), "stage {stage}: {key} {size} must be between 1 and {MAX_IMAGE_SIZE}");
    Ok(())
}

/// A split's EEG, checked to hold one row per figure of the split: rows pair with figures by position, so
/// a file with more rows would index past the figures' targets and one with fewer would silently train on
/// a subset.
pub(super) fn split_eeg(data: &Path, split: &SplitManifest, repetitions: Repetitions) -> Result<EegData> {
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
pub(super) struct ImageSplit {
    pub(super) len: usize,
    pub(super) images: Vec<f32>,
    pub(super) edges: Vec<f32>,
}

/// A split's structure targets `[figures, structure_dim]` (its `edges16` file), checked to hold one finite map
/// per figure.
pub(super) fn structure_targets(data: &Path, split: &SplitManifest, structure_dim: usize) -> Result<Vec<f32>> {
    let path = data.join(&split.edges16);
    let values = NpyFile::open(&path)?.to_f32()?;
    ensure!(
        values.len() == split.figures * structure_dim,
        "{}: {} values, expected {} figures x structure_dim {structure_dim}",
        path.display(),
        values.len(),
        split.figures
    );
    ensure!(values.iter().all(|v| v.is_finite()), "{}: the structure targets hold NaN or Inf", path.display());
    Ok(values)
}

pub(super) fn load_images(data: &Path, split: &SplitManifest, size: usize, structure_dim: usize) -> Result<ImageSplit> {
    let edges = structure_targets(data, split, structure_dim)?;
    let mut images = Vec::with_capacity(split.figures * 3 * size * size);
    for rel in &split.images {
        images.extend(crate::data::image::to_planes(&load_square(data.join(rel), size as u32)?));
    }
    ensure!(split.images.len() == split.figures, "split '{}': {} images for {} figures", split.name, split.images.len(), split.figures);
    Ok(ImageSplit { len: split.figures, images, edges })
}

/// The rows `idx` of a row-major array with `per` values a row.
pub(super) fn gather(values: &[f32], per: usize, idx: &[usize]) -> Vec<f32> {
    idx.iter().flat_map(|&i| &values[i * per..(i + 1) * per]).copied().collect()
}

/// Refuses parameters holding NaN or Inf as a stage's result, naming the tensor: they would load as a
/// model that makes only garbage.
pub(super) fn ensure_finite(path: &Path, tensors: &[(&str, &Tensor)]) -> Result<()> {
    for (name, t) in tensors {
        if let Some(bad) = crate::tensor::non_finite_values(t.dtype(), &t.to_bytes()?) {
            bail!("{}: not written: parameter '{name}' holds {} non-finite value(s) (NaN or Inf); training diverged", path.display(), bad.count);
        }
    }
    Ok(())
}

pub(super) fn save_params(path: &Path, tree: &ParamTree, params: &ParamStore) -> Result<()> {
    let refs: Vec<(&str, &Tensor)> = tree.specs().iter().enumerate().map(|(i, s)| (s.name.as_str(), params.get(ParamId(i)))).collect();
    ensure_finite(path, &refs)?;
    save_safetensors(path, &refs, None).with_context(|| format!("{}: cannot write the parameters", path.display()))
}

/// A stage's losses of one step, named, the total first.
pub(super) type NamedLosses = Vec<(&'static str, f64)>;

/// One batch's forward and backward: (parameters, gradients to add to, the data RNG, `dloss`, the step's
/// allocator) -> the named losses.
pub(super) type StepFn<'a> = dyn FnMut(&ParamStore, &mut Grads, &mut ChaCha8Rng, f32, &mut dyn Allocator) -> Result<NamedLosses> + 'a;

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
/// gradient `dloss` it is given) into the gradients, taking every tensor from the allocator it is given
/// (the per-step pool, see [`StepMemory`]), and returns its named losses, the total first; with
/// `micro_batches` k it runs k times per optimizer step with dloss 1/k (gradient accumulation); `validate` returns the validation loss. When
/// `stop` is set the loop ends after the current step with a checkpoint and a [`Stopped`] error.
pub(super) fn train_loop(
    on: &On,
    stage: &str,
    cfg: &LoopConfig,
    id: &str,
    out: &Path,
    resume: Option<&Path>,
    tree: &ParamTree,
    params: &mut ParamStore,
    step: &mut StepFn,
    validate: &mut dyn FnMut(&ParamStore) -> Result<f64>,
    stop: &AtomicBool,
) -> Result<StageReport> {
    ensure!(cfg.steps > 0 && cfg.checkpoint_every > 0 && cfg.log_every > 0, "stage {stage}: steps, checkpoint_every and log_every must be positive");
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create the output folder", out.display()))?;
    let schedule = LrSchedule::new(cfg.lr, cfg.min_lr, cfg.warmup, cfg.steps)?;
    // Long-lived state in one arena, planned before anything is carved.
    let mut plan = MemoryPlan::new();
    Grads::plan(tree, &mut plan, on.dtype);
    Optimizer::plan(tree, if params.is_empty() { on.dtype } else { params.get(ParamId(0)).dtype() }, &mut plan);
    let mut arena = Arena::new(&on.device, &plan)?;
    let mut grads = Grads::zeros(tree, &mut arena.region(Region::Grads), on.dtype)?;
    let adamw = AdamW { weight_decay: cfg.weight_decay, ..AdamW::default() };
    let opt_config = OptimizerConfig { adamw, max_grad_norm: cfg.max_grad_norm, micro_batches: cfg.micro_batches };
    let mut opt = Optimizer::new(tree, params, &mut arena.region(Region::Optimizer), opt_config)?;
    let mut pool = match on.step_memory {
        StepMemory::Pool => Some(StepPool::new(&on.device)),
        StepMemory::PoisonedPool => Some(StepPool::poisoned(&on.device)),
        StepMemory::Standalone => None,
    };
    let mut step_peak = 0;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    if let Some(path) = resume {
        rng = load_checkpoint(path, tree, params, &mut opt, id)?.rng.rng();
    }
    let first_step = opt.steps();
    let mut log = StepLog::open(out.join(format!("{stage}.jsonl")), first_step)?;
    let mut progress = Progress::new(first_step, cfg.steps);
    let memory = LoopMemory { arena: arena.report(), step_pool: 0, step_peak: 0, overflowed: 0 };
    let mut report = StageReport { first_step, train_losses: Vec::new(), val_losses: Vec::new(), selected: (0, f64::NAN), memory };
    while opt.steps() < cfg.steps {
        let mut alloc: Box<dyn Allocator> = match &pool {
            Some(pool) => Box::new(pool.training()),
            None => Box::new(Standalone(on.device.clone())),
        };
        let mut losses = step(params, &mut grads, &mut rng, opt.loss_scale(), alloc.as_mut())?;
        for _ in 1..cfg.micro_batches {
            let more = step(params, &mut grads, &mut rng, opt.loss_scale(), alloc.as_mut())?;
            losses.iter_mut().zip(more).for_each(|(l, m)| l.1 += m.1);
        }
        drop(alloc);
        if let Some(pool) = &mut pool {
            step_peak = step_peak.max(pool.usage().peak);
            pool.end_step()?;
            report.memory.step_pool = pool.usage().capacity;
            report.memory.overflowed = pool.overflowed();
            report.memory.step_peak = step_peak;
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
pub(super) fn best_checkpoint(stage: &str, out: &Path, id: &str, steps: u64) -> Result<Option<(u64, PathBuf, f64)>> {
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

/// Writes a model's configuration as JSON with diffusers' `_class_name` key (what `from_json` reads back).
pub(super) fn save_model_config(path: &Path, class: &str, config: &impl serde::Serialize) -> Result<()> {
    let mut value = serde_json::to_value(config)?;
    value.as_object_mut().context("a model configuration is a table")?.insert("_class_name".into(), Value::from(class));
    crate::util::write_atomic(path, serde_json::to_string_pretty(&value)?.as_bytes()).with_context(|| format!("{}: cannot write", path.display()))
}

/// Writes `dir` as a diffusers component: `config.json` (`config` with `_class_name`) and
/// `diffusion_pytorch_model.safetensors` holding the parameters of `tree` whose names `keep` accepts.
pub(super) fn save_component(
    dir: &Path,
    class: &str,
    config: &Value,
    tree: &ParamTree,
    params: &ParamStore,
    keep: &dyn Fn(&str) -> bool,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create the component folder", dir.display()))?;
    let mut config = config.clone();
    config.as_object_mut().with_context(|| format!("{class} config must be a table"))?.insert("_class_name".into(), Value::from(class));
    let config_path = dir.join("config.json");
    crate::util::write_atomic(&config_path, serde_json::to_string_pretty(&config)?.as_bytes())
        .with_context(|| format!("{}: cannot write", config_path.display()))?;
    let refs: Vec<(&str, &Tensor)> =
        tree.specs().iter().enumerate().filter(|(_, s)| keep(&s.name)).map(|(i, s)| (s.name.as_str(), params.get(ParamId(i)))).collect();
    let path = dir.join(COMPONENT_WEIGHT_FILES[0]);
    ensure_finite(&path, &refs)?;
    save_safetensors(&path, &refs, None).with_context(|| format!("{}: cannot write the parameters", path.display()))
}

pub(super) fn noise_batch(
    on: &On,
    alloc: &mut dyn Allocator,
    latents: &[f32],
    shape: &[usize],
    alphas: &[f64],
    rng: &mut ChaCha8Rng,
) -> Result<NoisedBatch> {
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
    Ok(NoisedBatch {
        timesteps: {
            let mut t = alloc.alloc(&[shape[0]], DType::F32)?;
            t.write_f32(&steps)?;
            t
        },
        noise: on.upload(alloc, shape, &eps)?,
        noisy: on.upload(alloc, shape, &noisy)?,
    })
}

/// A validation loss over `n` figures: `chunk_loss(idx, alloc)` gives the mean loss of the figures `idx`,
/// taken in order in chunks of `chunk` (the last may be smaller), with forward-only tensors (validation runs
/// beside the step pool: see [`On::forward_only`]). Chunk means weighted by their sizes give the split's mean
/// wherever every loss term is a mean over the batch.
pub(super) fn validation_mean(
    on: &On,
    n: usize,
    chunk: usize,
    mut chunk_loss: impl FnMut(&[usize], &mut dyn Allocator) -> Result<f64>,
) -> Result<f64> {
    let mut sum = 0.0;
    for start in (0..n).step_by(chunk) {
        let idx: Vec<usize> = (start..(start + chunk).min(n)).collect();
        sum += chunk_loss(&idx, &mut on.forward_only())? * idx.len() as f64;
    }
    Ok(sum / n as f64)
}

pub(super) fn mse(pred: &Tensor, target: &Tensor, alloc: &mut dyn Allocator) -> Result<f64> {
    let (mut loss, mut partials) = loss_buffers(alloc)?;
    mse_loss(pred, target, &mut loss, &mut partials)?;
    Ok(loss.to_f32_vec()?[0] as f64)
}

pub(super) fn default_trial_average() -> usize {
    1
}

pub(super) fn standardize(eeg: &mut EegData, mean: &[f32], std: &[f32]) {
    let [_, _, c, t] = eeg.shape;
    for (k, row) in eeg.data.chunks_exact_mut(t).enumerate() {
        let ch = k % c;
        row.iter_mut().for_each(|v| *v = (*v - mean[ch]) / std[ch]);
    }
}

/// Images of a split as `[N, 3, S, S]` in [-1, 1], diffusers' VAE input range.
pub(super) fn signed_images(data: &Path, split: &SplitManifest, size: usize, edge_size: usize) -> Result<Vec<f32>> {
    Ok(load_images(data, split, size, edge_size * edge_size)?.images.into_iter().map(|v| 2.0 * v - 1.0).collect())
}

/// The VAE posterior's mean of every image, times `scaling_factor`: `[N, latent, h, w]` flattened.
pub(super) fn scaled_latents(on: &On, vae: &AutoencoderKl, p: &ParamStore, images: &[f32], size: usize, chunk: usize) -> Result<Vec<f32>> {
    let per_image = 3 * size * size;
    let n = images.len() / per_image;
    let scale = vae.config.scaling_factor as f32;
    let mut latents = Vec::new();
    for start in (0..n).step_by(chunk) {
        let idx: Vec<usize> = (start..(start + chunk).min(n)).collect();
        let image = on.tensor(&[idx.len(), 3, size, size], &gather(images, per_image, &idx))?;
        let (mean, _, _) = vae.encode(p, &image, &mut on.forward_only())?;
        latents.extend(mean.to_f32_vec()?.into_iter().map(|v| v * scale));
    }
    Ok(latents)
}

/// A noised batch for the epsilon loss: timesteps [B] and x_t = sqrt(ᾱ_t)·z + sqrt(1 − ᾱ_t)·ε per sample.
pub(super) struct NoisedBatch {
    pub(super) timesteps: Tensor,
    pub(super) noise: Tensor,
    pub(super) noisy: Tensor,
}

/// The seed of the fixed timesteps and noise that the epsilon-loss validations draw, the same at every
/// checkpoint so their losses compare.
pub(super) const VAL_NOISE_SEED: u64 = 0x5eed_f7a1;

/// The training EEG of `figures` (`[figures, per]`, from `data` `[N, reps, per]`): per figure one random
/// repetition, or with `k` > 1 the mean of `k` distinct random repetitions (more signal per sample, closer to
/// the averaged EEG of validation and test, and still a different sample at most steps).
pub(super) fn training_trials(data: &[f32], per: usize, reps: usize, figures: &[usize], k: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
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

/// The frozen VAE's mu (z = mu) of every image of a split, `[N, latent]`.
pub(super) fn vae_mu(on: &On, model: &StructuralVae, p: &ParamStore, images: &ImageSplit, chunk: usize) -> Result<Vec<f32>> {
    let s = model.config.image_size;
    let mut mu = Vec::with_capacity(images.len * model.config.latent_dim);
    for start in (0..images.len).step_by(chunk) {
        let idx: Vec<usize> = (start..(start + chunk).min(images.len)).collect();
        let image = on.tensor(&[idx.len(), 3, s, s], &gather(&images.images, 3 * s * s, &idx))?;
        mu.extend(model.forward(p, &image, None, &mut on.forward_only())?.mu.to_f32_vec()?);
    }
    Ok(mu)
}
