//! The reconstruction pipeline: EEG -> encoder embedding -> structure map (StructuralVAE structure head) ->
//! ControlNet condition; embedding -> cross-attention tokens (the EEG projector); guided denoising of
//! Gaussian latents by the UNet with the ControlNet's residuals; AutoencoderKL decode.
//!
//! A weights folder is what `sgdm train all` writes; [`crate::weights_folder`] lists its files.
//!
//! The denoising state (the latents and the scheduler's x0) stays on the pipeline's device in f32 and the
//! guided scheduler update runs there (`ops::sampling::guided_step`); the models run in the pipeline's dtype,
//! as a [`Step`] whose activations live in a memory pool (replayed as a CUDA graph on CUDA). Each item's
//! initial noise depends only on the seed and the item's index, so batching, sharding and resuming never
//! change an image.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

use crate::data::contract::{EegContract, STANDARDIZATION_FILE};
use crate::data::eeg::EegScan;
use crate::diffusion::scheduler::{Scheduler, SchedulerKind};
use crate::memory::pool::Pool;
use crate::models::autoencoder_kl::AutoencoderKl;
use crate::models::layers;
use crate::models::sgdm::{upsample_nearest, EegEncoder, EegEncoderConfig, StructuralVae, StructuralVaeConfig};
use crate::models::unet::{ControlNet, UNet, UNetConditioning};
use crate::nn::{Inference, Linear, ParamStore, ParamTree, Pooled};
use crate::ops::elementwise::scale;
use crate::ops::sampling::{guided_step, GuidedStep};
use crate::runtime::Device;
use crate::tensor::{DType, Tensor};
use crate::weights::SafetensorsFile;
use crate::weights_folder::{
    base_components, load_autoencoder_kl, load_controlnet, load_eeg_encoder, load_structural_vae, load_unet, read_json, ENCODER_CONFIG, VAE_CONFIG,
    WEIGHT_FILES,
};

/// The largest latent side a pipeline accepts: 8192-pixel images through SD's 8x VAE.
pub const MAX_LATENT_SIZE: usize = 1024;

/// How the denoising loop runs.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingOptions {
    pub steps: usize,
    pub scheduler: SchedulerKind,
    /// Classifier-free guidance scale: 1 evaluates the conditional branch only; above 1 also the
    /// unconditional one (zero tokens, the same structure map) and extrapolates away from it.
    pub guidance: f32,
    /// The ControlNet residuals' scale; at 0 the ControlNet is switched off (not evaluated).
    pub controlnet_scale: f32,
    pub seed: u64,
}

impl SamplingOptions {
    /// Checks every setting, naming the command-line flag: callers run it before their first write.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            (1..=crate::diffusion::scheduler::TRAIN_TIMESTEPS).contains(&self.steps),
            "--steps {} must be between 1 and {} (the training timesteps)",
            self.steps,
            crate::diffusion::scheduler::TRAIN_TIMESTEPS
        );
        ensure!(
            self.guidance.is_finite() && self.guidance >= 1.0,
            "--guidance {} must be a finite number of at least 1 (1: no guidance; SD's usual range is 2 to 10)",
            self.guidance
        );
        ensure!(
            self.controlnet_scale.is_finite(),
            "--controlnet-scale {} must be a finite number (1: as trained; 0 ignores the structure map; negative pushes away from it)",
            self.controlnet_scale
        );
        Ok(())
    }
}

impl Default for SamplingOptions {
    fn default() -> SamplingOptions {
        SamplingOptions { steps: 20, scheduler: SchedulerKind::DpmSolverPp2m, guidance: 3.0, controlnet_scale: 1.0, seed: 0 }
    }
}

/// One batch's results, in the batch's order.
pub struct Reconstruction {
    /// RGB images `[B, 3, S, S]` in [0, 1].
    pub images: Vec<f32>,
    /// The structure maps the ControlNet was conditioned on, `[B, E, E]`: those predicted from the EEG (as the
    /// structure head outputs them), or the ones given to [`Pipeline::reconstruct_conditioned`].
    pub structure: Vec<f32>,
    /// Seconds spent in the denoising loop (UNet + ControlNet + scheduler) and in the whole batch.
    pub denoise_seconds: f64,
    pub total_seconds: f64,
}

/// Every model of a weights folder, loaded on one device.
pub struct Pipeline {
    pub dir: PathBuf,
    pub device: Device,
    pub dtype: DType,
    encoder: EegEncoder,
    encoder_params: ParamStore,
    /// What the encoder expects of its EEG, and the statistics that standardise it.
    pub contract: EegContract,
    svae: StructuralVae,
    svae_params: ParamStore,
    projector: Linear,
    projector_params: ParamStore,
    pub tokens: usize,
    /// The length embeddings are rescaled to before the structure head (InfoNCE fixes only their direction).
    pub structure_norm: f32,
    controlnet: ControlNet,
    controlnet_params: ParamStore,
    unet: UNet,
    unet_params: ParamStore,
    vae: AutoencoderKl,
    vae_params: ParamStore,
    /// The structure map's side, the latent's side and channels, the condition image's side.
    pub edge: usize,
    pub latent_size: usize,
    pub latent_channels: usize,
    pub condition_size: usize,
}

impl Pipeline {
    /// Loads the weights folder `dir` (see the module docs) onto `device` as `dtype`. Every file is checked:
    /// missing files, unknown or misshapen tensors and inconsistent sizes are errors naming the file.
    pub fn open(dir: &Path, device: &Device, dtype: DType) -> Result<Pipeline> {
        ensure!(dir.is_dir(), "{}: no such weights folder (expected the output of `sgdm train all`)", dir.display());
        for f in WEIGHT_FILES.iter().chain(&["controlnet/config.json"]) {
            ensure!(dir.join(f).is_file(), "{}: the weights folder has no {f} (expected the output of `sgdm train all`)", dir.display());
        }
        let (vae_dir, unet_dir) = base_components(dir)?;
        let path = dir.join(ENCODER_CONFIG);
        let config = EegEncoderConfig::from_json(&path, &read_json(&path)?)?;
        let (encoder, encoder_params) = load_eeg_encoder(&config, &path.display().to_string(), &dir.join("encoder.safetensors"), device, dtype)?;
        let path = dir.join(VAE_CONFIG);
        let config = StructuralVaeConfig::from_json(&path, &read_json(&path)?)?;
        let (svae, svae_params) = load_structural_vae(&config, &path.display().to_string(), &dir.join("vae.safetensors"), device, dtype)?;
        let latent_dim = encoder.config.latent_dim;
        ensure!(
            latent_dim == svae.config.latent_dim,
            "{}: the encoder's latent_dim {latent_dim} differs from the StructuralVAE's {}",
            dir.display(),
            svae.config.latent_dim
        );

        let contract = EegContract::read(&dir.join(STANDARDIZATION_FILE), encoder.config.n_channels)?;

        let (vae, vae_params) = load_autoencoder_kl(&vae_dir, device, dtype)?;
        let (unet, unet_params, unet_config) = load_unet(&unet_dir, device, dtype)?;
        let (controlnet, controlnet_params) = load_controlnet(&dir.join("controlnet"), device, dtype)?;

        let path = dir.join("eeg_projector.safetensors");
        let file = SafetensorsFile::open(&path)?;
        let tokens: usize = file
            .metadata()
            .get("tokens")
            .and_then(|t| t.parse().ok())
            .with_context(|| format!("{}: no 'tokens' metadata (the number of cross-attention tokens)", path.display()))?;
        let structure_norm: f32 =
            file.metadata().get("structure_norm").and_then(|t| t.parse().ok()).filter(|v: &f32| v.is_finite() && *v > 0.0).with_context(|| {
                format!("{}: no positive 'structure_norm' metadata (the embedding length the structure head takes)", path.display())
            })?;
        let d = unet.config.cross_attention_dim;
        let mut tree = ParamTree::new();
        let projector = Linear::new(&mut tree, "eeg_projector", latent_dim, tokens * d, true);
        let projector_params = ParamStore::load_owned(&tree, &file, device, dtype, &[])?;

        let edge = (svae.config.structure_dim as f64).sqrt().round() as usize;
        ensure!(
            edge * edge == svae.config.structure_dim,
            "{}: structure_dim {} is not a square",
            dir.join("vae_config.json").display(),
            svae.config.structure_dim
        );
        ensure!(
            encoder.config.structure_dim == 0 || encoder.config.structure_dim == svae.config.structure_dim,
            "{}: the encoder's structure head predicts {} values, the StructuralVAE's structure maps have {}",
            dir.display(),
            encoder.config.structure_dim,
            svae.config.structure_dim
        );
        ensure!(
            controlnet.config.conditioning_channels == 1,
            "{}: the ControlNet must take a 1-channel structure map",
            dir.join("controlnet/config.json").display()
        );
        ensure!(
            unet.config.in_channels == vae.config.latent_channels && controlnet.config.in_channels == vae.config.latent_channels,
            "{}: the UNet and ControlNet take {} and {} channels, the VAE's latents have {}",
            dir.display(),
            unet.config.in_channels,
            controlnet.config.in_channels,
            vae.config.latent_channels
        );
        let sample_size = unet_config
            .get("sample_size")
            .and_then(Value::as_u64)
            .with_context(|| format!("{}: no 'sample_size'", unet_dir.join("config.json").display()))? as usize;
        // Checked before anything is sized by it: 100000 made the first batch abort on a 160 GB allocation.
        ensure!(
            (1..=MAX_LATENT_SIZE).contains(&sample_size),
            "{}: 'sample_size' {sample_size} is not a latent size sgdm runs (1 to {MAX_LATENT_SIZE}; SD 1.5's is 64)",
            unet_dir.join("config.json").display()
        );
        let condition_size = sample_size * controlnet.condition_downscale();
        ensure!(
            condition_size.is_multiple_of(edge),
            "{}: the ControlNet's condition size {condition_size} is not a multiple of the structure map's {edge}",
            dir.display()
        );
        Ok(Pipeline {
            dir: dir.to_path_buf(),
            device: device.clone(),
            dtype,
            encoder,
            encoder_params,
            contract,
            svae,
            svae_params,
            projector,
            projector_params,
            tokens,
            structure_norm,
            controlnet,
            controlnet_params,
            latent_channels: vae.config.latent_channels,
            latent_size: sample_size,
            unet,
            unet_params,
            vae,
            vae_params,
            edge,
            condition_size,
        })
    }

    /// EEG channels and time points the encoder takes.
    pub fn eeg_shape(&self) -> (usize, usize) {
        (self.encoder.config.n_channels, self.encoder.config.n_timepoints)
    }

    /// Checks a scanned EEG file against the encoder's contract (channel and time point counts, channel names
    /// and order, sampling rate, window, finiteness, scale) and prints the notes it gives, one line each.
    pub fn check_eeg(&self, scan: &EegScan) -> Result<()> {
        let [_, _, c, t] = scan.shape;
        let (ec, et) = self.eeg_shape();
        ensure!(
            (c, t) == (ec, et),
            "{}: trials of {c} channels x {t} time points, the encoder in {} takes {ec} x {et}",
            scan.path.display(),
            self.dir.display()
        );
        for note in self.contract.check(scan, &self.dir.join(STANDARDIZATION_FILE))? {
            eprintln!("sgdm: note: {note}");
        }
        Ok(())
    }

    /// The decoded image's side.
    pub fn image_size(&self) -> usize {
        self.latent_size << (self.vae.config.block_out_channels.len() - 1)
    }

    /// The StructuralVAE's input side (images are resized to it for the latent-space metrics).
    pub fn structural_vae_image_size(&self) -> usize {
        self.svae.config.image_size
    }

    fn tensor(&self, shape: &[usize], values: &[f32]) -> Result<Tensor> {
        Tensor::from_f32(&self.device, shape, self.dtype, values)
    }

    /// The encoder's embeddings `[B, latent]` of raw EEG `[B, C, T]` (microvolts, as stored; standardised
    /// here with the training split's statistics).
    pub fn embed(&self, eeg: &[f32]) -> Result<Tensor> {
        let (c, t) = self.eeg_shape();
        ensure!(eeg.len().is_multiple_of(c * t) && !eeg.is_empty(), "EEG batch of {} values is not a whole number of [{c}, {t}] trials", eeg.len());
        let b = eeg.len() / (c * t);
        let (mean, std) = (&self.contract.mean, &self.contract.std);
        let scaled: Vec<f32> = eeg.iter().enumerate().map(|(i, v)| (v - mean[(i / t) % c]) / std[(i / t) % c]).collect();
        let x = self.tensor(&[b, c, t], &scaled)?;
        Ok(self.encoder.forward(&self.encoder_params, &x, &mut Inference(self.device.clone()))?.embedding)
    }

    /// The StructuralVAE's mu `[B, latent]` of RGB images `[B, 3, S, S]` in [0, 1] at its input size: the
    /// space the encoder's embeddings are aligned to, where retrieval and 2-way identification compare.
    pub fn image_embedding(&self, images: &[f32]) -> Result<Vec<f32>> {
        let s = self.svae.config.image_size;
        ensure!(
            images.len().is_multiple_of(3 * s * s) && !images.is_empty(),
            "{} image values are not a whole number of [3, {s}, {s}] images",
            images.len()
        );
        let x = self.tensor(&[images.len() / (3 * s * s), 3, s, s], images)?;
        self.svae.forward(&self.svae_params, &x, None, &mut Inference(self.device.clone()))?.mu.to_f32_vec()
    }

    /// The structure maps `[B, E·E]` predicted from embeddings ([`crate::models::sgdm::structure_maps`]).
    pub fn structure(&self, embedding: &Tensor) -> Result<Tensor> {
        let alloc = &mut Inference(self.device.clone());
        crate::models::sgdm::structure_maps(
            (&self.encoder, &self.encoder_params),
            (&self.svae, &self.svae_params),
            embedding,
            self.structure_norm,
            alloc,
        )
    }

    /// Item `index`'s initial latent noise: depends on the seed and the index only.
    pub fn initial_noise(&self, seed: u64, index: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(index);
        let n = self.latent_channels * self.latent_size * self.latent_size;
        crate::util::standard_normal(&mut rng, n)
    }

    /// Reconstructs one batch: `eeg` `[B, C, T]` raw, `indices` the items' indices (they seed the noise).
    pub fn reconstruct(&self, eeg: &[f32], indices: &[u64], opts: &SamplingOptions) -> Result<Reconstruction> {
        self.reconstruct_with(&mut Steps::default(), eeg, indices, opts)
    }

    /// [`Pipeline::reconstruct`] reusing the denoising steps (memory pools and, on CUDA, captured graphs) that
    /// `steps` holds from earlier batches of the same size and options.
    pub fn reconstruct_with(&self, steps: &mut Steps, eeg: &[f32], indices: &[u64], opts: &SamplingOptions) -> Result<Reconstruction> {
        self.reconstruct_conditioned(steps, eeg, indices, opts, None)
    }

    /// [`Pipeline::reconstruct_with`] conditioned on `structure` `[B, E·E]` instead of the structure maps the
    /// EEG predicts when it is given (the EEG still gives the cross-attention tokens): the ablation's
    /// oracle, which feeds the true structure targets.
    pub fn reconstruct_conditioned(
        &self,
        steps: &mut Steps,
        eeg: &[f32],
        indices: &[u64],
        opts: &SamplingOptions,
        structure: Option<&[f32]>,
    ) -> Result<Reconstruction> {
        let start = std::time::Instant::now();
        let b = indices.len();
        opts.validate()?;
        let embedding = self.embed(eeg)?;
        ensure!(embedding.shape()[0] == b, "{} EEG trials for {b} items", embedding.shape()[0]);
        let structure = match structure {
            Some(given) => {
                let e2 = self.edge * self.edge;
                ensure!(given.len() == b * e2, "{} structure values for {b} items of {}x{} maps", given.len(), self.edge, self.edge);
                given.to_vec()
            }
            None => self.structure(&embedding)?.to_f32_vec()?,
        };

        // Conditional tokens, then (with guidance) the unconditional branch's zero tokens after them.
        let guided = opts.guidance > 1.0;
        let branches = if guided { 2 } else { 1 };
        let d = self.unet.config.cross_attention_dim;
        let mut tokens = layers::linear(&self.projector_params, &self.projector, &embedding, &mut Inference(self.device.clone()))?.to_f32_vec()?;
        tokens.resize(branches * b * self.tokens * d, 0.0);
        let factor = self.condition_size / self.edge;
        let cond_one = upsample_nearest(&structure, self.edge, factor);
        let cond_all: Vec<f32> = (0..branches).flat_map(|_| cond_one.iter().copied()).collect();

        // The loop runs on the device: the state (sample, x0) stays there in f32, each step's model input is
        // written by the previous step's update, and the timesteps are uploaded before the first step, so a
        // step makes no host round trip.
        let scheduler = Scheduler::new(opts.scheduler, opts.steps)?;
        let (lc, h) = (self.latent_channels, self.latent_size);
        let shape = [b, lc, h, h];
        let mut noise: Vec<f32> = indices.iter().flat_map(|&i| self.initial_noise(opts.seed, i)).collect();
        let sigma = scheduler.init_noise_sigma as f32;
        noise.iter_mut().for_each(|v| *v *= sigma);
        let scale0 = scheduler.input_scale(0) as f32;
        let first_in: Vec<f32> = (0..branches).flat_map(|_| noise.iter().map(|v| v * scale0)).collect();
        let rows = branches * b;
        let key = (rows, opts.controlnet_scale.to_bits());
        if steps.0.as_ref().is_none_or(|(k, _)| *k != key) {
            // Only the last batch of a run differs in size: one step's pool (and graph) is held at a time.
            steps.0 = None;
            let graph = std::env::var("SGDM_CUDA_GRAPHS").as_deref() != Ok("0");
            steps.0 = Some((key, Step::new(self, rows, b, opts.controlnet_scale, graph)?));
        }
        let step = &mut steps.0.as_mut().expect("set above").1;
        step.x.write_f32(&first_in)?;
        step.context.write_f32(&tokens)?;
        step.cond.write_f32(&cond_all)?;
        let mut sample = Tensor::from_f32(&self.device, &shape, DType::F32, &noise)?;
        let mut x0 = Tensor::zeros(&self.device, &shape, DType::F32)?;
        let mut z = Tensor::zeros(&self.device, &shape, self.dtype)?;
        let timesteps = (0..scheduler.steps())
            .map(|step| Tensor::from_f32(&self.device, &[rows], DType::F32, &vec![scheduler.timesteps[step] as f32; rows]))
            .collect::<Result<Vec<_>>>()?;
        let inv = (1.0 / self.vae.config.scaling_factor) as f32;
        let denoise_start = std::time::Instant::now();
        let model = self.denoiser();
        for (i, t) in timesteps.iter().enumerate() {
            scale(t, 1.0, &mut step.t)?;
            step.run(&model)?;
            let last = i + 1 == scheduler.steps();
            let update = GuidedStep {
                guidance: guided.then_some(opts.guidance),
                coefficients: scheduler.coefficients(i),
                out_scale: if last { inv } else { scheduler.input_scale(i + 1) as f32 },
            };
            let eps = step.eps.as_ref().expect("Step::run leaves the noise prediction");
            guided_step(eps, &update, &mut sample, &mut x0, if last { &mut z } else { &mut step.x })?;
        }
        self.device.synchronize()?;
        let denoise_seconds = denoise_start.elapsed().as_secs_f64();

        // The decode reuses the step's pool (sized for it), or ordinary allocations if it does not fit.
        let decoded = match self.vae.decode(&self.vae_params, &z, &mut Pooled::inference(step.pool.clone())) {
            Ok((decoded, _)) => decoded,
            Err(e) if crate::memory::pool::is_exhausted(&e) => self.vae.decode(&self.vae_params, &z, &mut Inference(self.device.clone()))?.0,
            Err(e) => return Err(e),
        };
        ensure!(decoded.shape()[1] == 3, "the VAE decodes {} channels; a PNG needs 3", decoded.shape()[1]);
        let decoded = decoded.to_f32_vec()?;
        // Checked before clamping, which would turn +Inf white and leave NaN to become black pixels: an image
        // made of overflow is an error, never a finished result.
        for (what, values, per_item) in [("decoded image", &decoded, decoded.len() / b), ("structure map", &structure, structure.len() / b)] {
            if let Some(bad) = crate::tensor::non_finite_values(DType::F32, bytemuck::cast_slice(values)) {
                bail!(
                    "item {}: its {what} holds {} non-finite value(s) (NaN or Inf) in this batch of items {indices:?}; nothing is written \
                     for them. The model overflows with these weights ({}) and settings (guidance {}, ControlNet scale {})",
                    indices[bad.first / per_item],
                    bad.count,
                    self.dir.display(),
                    opts.guidance,
                    opts.controlnet_scale
                );
            }
        }
        let images = decoded.into_iter().map(|v| ((v + 1.0) * 0.5).clamp(0.0, 1.0)).collect();
        Ok(Reconstruction { images, structure, denoise_seconds, total_seconds: start.elapsed().as_secs_f64() })
    }

    /// The UNet and ControlNet with their parameters.
    pub fn denoiser(&self) -> Denoiser<'_> {
        Denoiser { unet: &self.unet, unet_params: &self.unet_params, controlnet: &self.controlnet, controlnet_params: &self.controlnet_params }
    }

    /// Random inputs of one denoising step for `rows` rows (a guided batch of B items has 2B): latents,
    /// timesteps, cross-attention tokens, condition maps. For benchmarks and the profiler.
    pub fn step_inputs(&self, rows: usize, seed: u64) -> Result<[Tensor; 4]> {
        let d = self.unet.config.cross_attention_dim;
        self.denoiser().random_inputs(&self.device, self.dtype, rows, self.latent_size, self.tokens, d, seed)
    }
}

/// The denoising step a reconstruction has set up, with its (rows, ControlNet scale bits): reused across
/// batches of the same size, replaced by a batch of another.
#[derive(Default)]
pub struct Steps(Option<((usize, u32), Step)>);

/// One denoising step of a fixed size: the model's inputs in tensors the caller fills before each [`Step::run`]
/// (`x`, `t`, `context`, `cond`), its activations in a memory [`Pool`] sized to the step's working set, and
/// the noise prediction in `eps`. On CUDA the step is captured once as a CUDA graph (unless
/// `SGDM_CUDA_GRAPHS=0`) and every run replays it: one launch instead of hundreds, with the activations at
/// the addresses they were captured at, which the pool's deterministic placement guarantees.
pub struct Step {
    pub x: Tensor,
    pub t: Tensor,
    pub context: Tensor,
    pub cond: Tensor,
    /// The last run's noise prediction (in the pool; fixed while a graph replays).
    pub eps: Option<Tensor>,
    controlnet_scale: f32,
    pool: Pool,
    graph: Option<cudarc::driver::CudaGraph>,
}

impl Step {
    /// Sets up the step for `rows` rows (a guided batch of `items` items has 2 x items): sizes the pool for
    /// the step and for the batch's VAE decode with eager runs on a planner (which also load every kernel and
    /// plan every GEMM), then, on CUDA with `graph`, captures the graph.
    pub fn new(p: &Pipeline, rows: usize, items: usize, controlnet_scale: f32, graph: bool) -> Result<Step> {
        let (lc, h) = (p.latent_channels, p.latent_size);
        let d = p.unet.config.cross_attention_dim;
        let cs = p.condition_size;
        let zeros = |shape: &[usize], dtype| Tensor::zeros(&p.device, shape, dtype);
        let (x, t) = (zeros(&[rows, lc, h, h], p.dtype)?, zeros(&[rows], DType::F32)?);
        let (context, cond) = (zeros(&[rows, p.tokens, d], p.dtype)?, zeros(&[rows, 1, cs, cs], p.dtype)?);
        // The VAE decode of the batch runs in the same pool after the last step, so size the pool for it too
        // (plus the noise prediction, which stays allocated there); the decode falls back to ordinary
        // allocations if the pool still turns out too small.
        let planner = Pool::planner(&p.device);
        drop(p.vae.decode(&p.vae_params, &zeros(&[items, lc, h, h], p.dtype)?, &mut Pooled::inference(planner.clone()))?);
        let reserve = planner.usage().top + x.size_bytes().div_ceil(256) * 256;
        Step::with_inputs(&p.denoiser(), [x, t, context, cond], controlnet_scale, graph, reserve)
    }

    /// The step of `model` on these input tensors (x, t, context, cond), which it keeps as its static inputs;
    /// the pool holds at least `min_capacity` bytes (for work that shares it after the step).
    pub fn with_inputs(model: &Denoiser, inputs: [Tensor; 4], controlnet_scale: f32, graph: bool, min_capacity: usize) -> Result<Step> {
        let [x, t, context, cond] = inputs;
        let device = x.device();
        // Sizing: one eager step on a planner places every range as the pool will, without holding its memory.
        let planner = Pool::planner(&device);
        drop(model.predict(&x, &t, &context, &cond, controlnet_scale, &mut Pooled::inference(planner.clone()))?);
        let pool = Pool::new(&device, planner.usage().top.max(min_capacity))?;
        let mut step = Step { x, t, context, cond, eps: None, controlnet_scale, pool, graph: None };
        if let (Device::Cuda(d), true) = (&device, graph) {
            d.synchronize()?;
            step.graph = Some(step.capture(model, d)?);
        }
        Ok(step)
    }

    fn capture(&mut self, model: &Denoiser, d: &crate::runtime::cuda::CudaDevice) -> Result<cudarc::driver::CudaGraph> {
        use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        let stream = d.stream();
        stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).context("beginning the step's graph capture")?;
        let eps = model.predict(&self.x, &self.t, &self.context, &self.cond, self.controlnet_scale, &mut Pooled::inference(self.pool.clone()));
        // The capture ends whatever happened, so the stream is usable again for the error's report.
        let graph = stream.end_capture(CUgraphInstantiate_flags(0)).context("ending the step's graph capture")?;
        self.eps = Some(eps.context("capturing the denoising step as a CUDA graph (SGDM_CUDA_GRAPHS=0 runs it without)")?);
        let graph = graph.ok_or_else(|| anyhow::anyhow!("the captured denoising step is an empty graph"))?;
        graph.upload().context("uploading the step's graph")?;
        Ok(graph)
    }

    /// Evaluates the step on the current inputs into `eps`: replays the graph, or runs the models eagerly with
    /// the activations in the pool.
    pub fn run(&mut self, model: &Denoiser) -> Result<()> {
        match &self.graph {
            Some(graph) => graph.launch().context("replaying the denoising step's graph"),
            None => {
                self.eps = None; // its range goes back to the pool first
                self.eps = Some(model.predict(
                    &self.x,
                    &self.t,
                    &self.context,
                    &self.cond,
                    self.controlnet_scale,
                    &mut Pooled::inference(self.pool.clone()),
                )?);
                Ok(())
            }
        }
    }

    /// The pool's capacity and high-water mark.
    pub fn pool_usage(&self) -> crate::memory::pool::PoolUsage {
        self.pool.usage()
    }

    pub fn captured(&self) -> bool {
        self.graph.is_some()
    }
}

/// A UNet driven by a ControlNet: what one denoising step evaluates.
pub struct Denoiser<'a> {
    pub unet: &'a UNet,
    pub unet_params: &'a ParamStore,
    pub controlnet: &'a ControlNet,
    pub controlnet_params: &'a ParamStore,
}

impl Denoiser<'_> {
    /// The predicted noise `[rows, C, H, W]`. At `controlnet_scale` 0 the ControlNet is not evaluated: its
    /// residuals would all be zero, so the UNet alone gives the same prediction.
    pub fn predict(
        &self,
        x: &Tensor,
        t: &Tensor,
        context: &Tensor,
        cond: &Tensor,
        controlnet_scale: f32,
        alloc: &mut dyn crate::nn::Allocator,
    ) -> Result<Tensor> {
        if controlnet_scale == 0.0 {
            let unet_cond = UNetConditioning { timestep: t, encoder_hidden_states: context, residuals: None };
            return Ok(self.unet.forward(self.unet_params, x, &unet_cond, alloc)?.output);
        }
        let cn = self.controlnet.forward(self.controlnet_params, x, t, context, cond, controlnet_scale, alloc)?;
        let unet_cond = UNetConditioning { timestep: t, encoder_hidden_states: context, residuals: Some((cn.down.iter().collect(), &cn.mid)) };
        Ok(self.unet.forward(self.unet_params, x, &unet_cond, alloc)?.output)
    }

    /// Random step inputs for latents of side `size` and `tokens` context tokens of width `d`.
    pub fn random_inputs(&self, device: &Device, dtype: DType, rows: usize, size: usize, tokens: usize, d: usize, seed: u64) -> Result<[Tensor; 4]> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let c = self.unet.config.in_channels;
        let cs = size * self.controlnet.condition_downscale();
        let cc = self.controlnet.config.conditioning_channels;
        let x = Tensor::from_f32(device, &[rows, c, size, size], dtype, &crate::util::standard_normal(&mut rng, rows * c * size * size))?;
        let t = Tensor::from_f32(device, &[rows], DType::F32, &vec![500.0; rows])?;
        let context = Tensor::from_f32(device, &[rows, tokens, d], dtype, &crate::util::standard_normal(&mut rng, rows * tokens * d))?;
        let cond = Tensor::from_f32(device, &[rows, cc, cs, cs], dtype, &crate::util::standard_normal(&mut rng, rows * cc * cs * cs))?;
        Ok([x, t, context, cond])
    }
}
