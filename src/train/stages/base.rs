//! Stage `base`: the AutoencoderKL and the UNet trained from scratch (or a pretrained folder named instead).

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::{bail, ensure, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use serde_json::Value;

use super::common::{
    check_image_size, gather, loss_buffers, mse, noise_batch, save_component, scaled_latents, signed_images, train_loop, validation_mean, LoopConfig,
    NamedLosses, On, StageReport, VAL_NOISE_SEED,
};
use crate::data::dataset::Manifest;
use crate::diffusion::scheduler::alphas_cumprod;
use crate::models::autoencoder_kl::{AutoencoderKl, AutoencoderKlConfig, LEGACY_ATTENTION_NAMES};
use crate::models::unet::{UNet, UNetConditioning, UNetConfig};
use crate::nn::{Allocator, Grads, ParamStore};
use crate::ops::elementwise::{add, reparameterize_backward, reparameterize_forward};
use crate::ops::loss::{kl_loss, kl_loss_backward, mse_loss, mse_loss_backward};
use crate::tensor::Tensor;
use crate::train::config_id;
use crate::weights::Component;

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

/// The VAE's two loss terms for a decode of z against `image`.
fn kl_vae_losses(recon: &Tensor, image: &Tensor, mean: &Tensor, logvar: &Tensor, alloc: &mut dyn Allocator) -> Result<(f64, f64)> {
    let (mut loss, mut partials) = loss_buffers(alloc)?;
    mse_loss(recon, image, &mut loss, &mut partials)?;
    let mse = loss.to_f32_vec()?[0] as f64;
    kl_loss(mean, logvar, &mut loss, &mut partials)?;
    Ok((mse, loss.to_f32_vec()?[0] as f64))
}

fn train_base_vae(
    on: &On,
    cfg: &BaseStageConfig,
    vae: &AutoencoderKl,
    train: &[f32],
    val: &[f32],
    out: &Path,
    resume: Option<&Path>,
    stop: &AtomicBool,
) -> Result<(ParamStore, StageReport)> {
    let s = cfg.image_size;
    let per_image = 3 * s * s;
    let n_train = train.len() / per_image;
    let b = cfg.vae_train.batch;
    ensure!(b >= 1 && b <= n_train, "stage base: vae_train.batch {b} must be between 1 and the {n_train} training figures");
    let mut params = on.random_params(&vae.params, cfg.vae_train.seed)?;
    let kl_weight = cfg.kl_weight;
    let mut step = |p: &ParamStore, grads: &mut Grads, rng: &mut ChaCha8Rng, dloss: f32, alloc: &mut dyn Allocator| -> Result<NamedLosses> {
        let idx = rand::seq::index::sample(rng, n_train, b).into_vec();
        let image = on.upload(alloc, &[b, 3, s, s], &gather(train, per_image, &idx))?;
        let (mean, logvar, enc) = vae.encode(p, &image, alloc)?;
        let eps = on.upload(alloc, mean.shape(), &crate::util::standard_normal(rng, mean.numel()))?;
        let mut z = on.zeros_in(alloc, mean.shape())?;
        reparameterize_forward(&mean, &logvar, &eps, &mut z)?;
        let (recon, dec) = vae.decode(p, &z, alloc)?;
        let (mse, kl) = kl_vae_losses(&recon, &image, &mean, &logvar, alloc)?;
        let mut drecon = on.zeros_in(alloc, recon.shape())?;
        mse_loss_backward(&recon, &image, dloss, &mut drecon)?;
        let dz = vae.decode_backward(p, grads, &z, &dec, &drecon, alloc)?;
        let (mut dmean, mut dlogvar) = (on.zeros_in(alloc, mean.shape())?, on.zeros_in(alloc, mean.shape())?);
        reparameterize_backward(&logvar, &eps, &dz, &mut dmean, &mut dlogvar)?;
        let (mut kl_dmean, mut kl_dlogvar) = (on.zeros_in(alloc, mean.shape())?, on.zeros_in(alloc, mean.shape())?);
        kl_loss_backward(&mean, &logvar, kl_weight * dloss, &mut kl_dmean, &mut kl_dlogvar)?;
        let (mut dmean_total, mut dlogvar_total) = (on.zeros_in(alloc, mean.shape())?, on.zeros_in(alloc, mean.shape())?);
        add(&dmean, &kl_dmean, &mut dmean_total)?;
        add(&dlogvar, &kl_dlogvar, &mut dlogvar_total)?;
        vae.encode_backward(p, grads, &image, &enc, &dmean_total, &dlogvar_total, alloc)?;
        Ok(vec![("total", mse + kl_weight as f64 * kl), ("recon", mse), ("kl", kl)])
    };
    // z = mean: deterministic; both terms are batch means, so size-weighted chunk means give the split's.
    let n_val = val.len() / per_image;
    let mut validate = |p: &ParamStore| -> Result<f64> {
        validation_mean(on, n_val, b, |idx, alloc| {
            let image = on.tensor(&[idx.len(), 3, s, s], &gather(val, per_image, idx))?;
            let (mean, logvar, _) = vae.encode(p, &image, alloc)?;
            let (recon, _) = vae.decode(p, &mean, alloc)?;
            let (mse, kl) = kl_vae_losses(&recon, &image, &mean, &logvar, alloc)?;
            Ok(mse + kl_weight as f64 * kl)
        })
    };
    let id =
        config_id(format!("base_vae {:?} {:?} {} {} {}", cfg.vae_model, cfg.vae_train, cfg.kl_weight, cfg.image_size, cfg.data.display()).as_bytes());
    let report = train_loop(on, "base_vae", &cfg.vae_train, &id, out, resume, &vae.params, &mut params, &mut step, &mut validate, stop)?;
    Ok((params, report))
}

/// Runs stage `base`; see [`BaseStageConfig`].
pub fn train_base(cfg: &BaseStageConfig, out: &Path, resume: Option<&Path>, stop: &AtomicBool, on: impl Into<On>) -> Result<BaseReport> {
    let on = &on.into();
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
    let mut step = |p: &ParamStore, grads: &mut Grads, rng: &mut ChaCha8Rng, dloss: f32, alloc: &mut dyn Allocator| -> Result<NamedLosses> {
        let idx = rand::seq::index::sample(rng, n_train, b).into_vec();
        let batch = noise_batch(on, alloc, &gather(&train_latents, per, &idx), &[b, lc, h, h], &alphas, rng)?;
        let cond = UNetConditioning { timestep: &batch.timesteps, encoder_hidden_states: &batch_context, residuals: None };
        let acts = unet.forward(p, &batch.noisy, &cond, alloc)?;
        let loss = mse(&acts.output, &batch.noise, alloc)?;
        let mut dy = on.zeros_in(alloc, acts.output.shape())?;
        mse_loss_backward(&acts.output, &batch.noise, dloss, &mut dy)?;
        unet.backward(p, grads, &batch.noisy, &cond, &acts, &dy, alloc)?;
        Ok(vec![("total", loss)])
    };
    let n_val = val_latents.len() / per;
    let mut validate = |p: &ParamStore| -> Result<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(VAL_NOISE_SEED);
        validation_mean(on, n_val, b, |idx, alloc| {
            let batch = noise_batch(on, alloc, &gather(&val_latents, per, idx), &[idx.len(), lc, h, h], &alphas, &mut rng)?;
            let context = null_context(idx.len())?;
            let cond = UNetConditioning { timestep: &batch.timesteps, encoder_hidden_states: &context, residuals: None };
            let acts = unet.forward(p, &batch.noisy, &cond, alloc)?;
            mse(&acts.output, &batch.noise, alloc)
        })
    };
    let id = config_id(format!("base_unet {cfg:?}").as_bytes());
    let unet_report = train_loop(on, "base_unet", &cfg.unet_train, &id, out, unet_resume, &unet.params, &mut params, &mut step, &mut validate, stop)?;
    save_component(&out.join("unet"), "UNet2DConditionModel", &cfg.unet_model, &unet.params, &params, &|_| true)?;
    Ok(BaseReport { vae: vae_report, unet: unet_report })
}
