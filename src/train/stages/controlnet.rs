//! Stage `controlnet` (stage 3): the ControlNet and the EEG-to-token projector.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::{ensure, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use serde_json::Value;

use super::common::{
    check_image_size, default_trial_average, ensure_finite, gather, load_images, mse, noise_batch, save_component, scaled_latents, signed_images,
    split_eeg, standardize, train_loop, training_trials, vae_mu, validation_mean, LoopConfig, NamedLosses, NoisedBatch, On, StageReport,
    VAL_NOISE_SEED,
};
use crate::data::contract::EegContract;
use crate::data::dataset::Manifest;
use crate::data::eeg::Repetitions;
use crate::diffusion::scheduler::alphas_cumprod;
use crate::models::layers;
use crate::models::sgdm::{structure_maps, upsample_nearest, EegEncoderConfig, StructuralVaeConfig};
use crate::models::unet::{ControlNet, UNetConditioning, UNetConfig};
use crate::nn::{Allocator, Grads, Linear, ParamId, ParamStore};
use crate::ops::loss::mse_loss_backward;
use crate::runtime::Device;
use crate::tensor::{DType, Tensor};
use crate::train::config_id;
use crate::weights::save_safetensors;
use crate::weights_folder::{load_autoencoder_kl, load_eeg_encoder, load_structural_vae, load_unet, BASE_POINTER};

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
pub fn train_controlnet(cfg: &ControlNetStageConfig, out: &Path, resume: Option<&Path>, stop: &AtomicBool, on: impl Into<On>) -> Result<StageReport> {
    let on = &on.into();
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
    ensure!(
        latent_dim == cfg.structural_vae.latent_dim,
        "stage controlnet: the encoder's latent_dim {latent_dim} differs from the StructuralVAE's {}",
        cfg.structural_vae.latent_dim
    );
    let mut tree = controlnet.params.clone();
    let projector = Linear::new(&mut tree, "eeg_projector", latent_dim, cfg.tokens * d, true);

    // The frozen models, loaded as the pipeline loads them.
    let (svae, svae_params) =
        load_structural_vae(&cfg.structural_vae, "[controlnet.structural_vae]", &cfg.structural_vae_weights, &on.device, on.dtype)?;
    let (encoder, encoder_params) = load_eeg_encoder(&cfg.encoder, "[controlnet.encoder]", &cfg.encoder_weights, &on.device, on.dtype)?;
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
    ensure!(
        (1..=reps).contains(&cfg.trial_average),
        "stage controlnet: trial_average {} must be between 1 and the {reps} repetitions",
        cfg.trial_average
    );
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
    let condition = |eeg: &Tensor, alloc: &mut dyn Allocator| -> Result<(Tensor, Tensor)> {
        let embedding = encoder.forward(&encoder_params, eeg, alloc)?.embedding;
        // As the pipeline's: the encoder's own structure head when it has one.
        let structure = structure_maps((&encoder, &encoder_params), (&svae, &svae_params), &embedding, structure_norm, alloc)?;
        let n = embedding.shape()[0];
        let cond = on.upload(alloc, &[n, 1, cond_size, cond_size], &upsample_nearest(&structure.to_f32_vec()?, edge, factor))?;
        Ok((embedding, cond))
    };
    let tokens = |p: &ParamStore, embedding: &Tensor, keep: &[bool], alloc: &mut dyn Allocator| -> Result<Tensor> {
        let flat = layers::linear(p, &projector, embedding, alloc)?.to_f32_vec()?;
        let masked: Vec<f32> =
            flat.chunks_exact(cfg.tokens * d).zip(keep).flat_map(|(row, &k)| row.iter().map(move |v| if k { *v } else { 0.0 })).collect();
        on.upload(alloc, &[keep.len(), cfg.tokens, d], &masked)
    };
    // The frozen UNet's backward adds its parameter gradients here; nothing reads them.
    let mut unet_grads = Grads::owned(&unet.params, &on.device, on.dtype)?;
    let epsilon_loss = |p: &ParamStore, batch: &NoisedBatch, context: &Tensor, cond: &Tensor, alloc: &mut dyn Allocator| -> Result<_> {
        let cn = controlnet.forward(p, &batch.noisy, &batch.timesteps, context, cond, 1.0, alloc)?;
        let unet_cond =
            UNetConditioning { timestep: &batch.timesteps, encoder_hidden_states: context, residuals: Some((cn.down.iter().collect(), &cn.mid)) };
        let acts = unet.forward(&unet_params, &batch.noisy, &unet_cond, alloc)?;
        let loss = mse(&acts.output, &batch.noise, alloc)?;
        Ok((cn, acts, loss))
    };
    let alphas = alphas_cumprod();
    let mut step = |p: &ParamStore, grads: &mut Grads, rng: &mut ChaCha8Rng, dloss: f32, alloc: &mut dyn Allocator| -> Result<NamedLosses> {
        let figures = rand::seq::index::sample(rng, n_train, b).into_vec();
        let eeg = training_trials(&train.data, c * t, reps, &figures, cfg.trial_average, rng);
        let keep: Vec<bool> = (0..b).map(|_| rng.random::<f64>() >= cfg.condition_dropout).collect();
        let batch = noise_batch(on, alloc, &gather(&train_latents, per, &figures), &[b, lc, h, h], &alphas, rng)?;
        let eeg = on.upload(alloc, &[b, c, t], &eeg)?;
        let (embedding, cond) = condition(&eeg, alloc)?;
        let context = tokens(p, &embedding, &keep, alloc)?;
        let (cn, acts, loss) = epsilon_loss(p, &batch, &context, &cond, alloc)?;
        let mut dy = on.zeros_in(alloc, acts.output.shape())?;
        mse_loss_backward(&acts.output, &batch.noise, dloss, &mut dy)?;
        let unet_cond =
            UNetConditioning { timestep: &batch.timesteps, encoder_hidden_states: &context, residuals: Some((cn.down.iter().collect(), &cn.mid)) };
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
        let dtokens = on.upload(alloc, &[b, cfg.tokens * d], &dtokens)?;
        layers::linear_back(p, grads, &projector, &embedding, &dtokens, None)?;
        Ok(vec![("total", loss)])
    };
    let mut validate = |p: &ParamStore| -> Result<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(VAL_NOISE_SEED);
        validation_mean(on, n_val, b, |idx, alloc| {
            let batch = noise_batch(on, alloc, &gather(&val_latents, per, idx), &[idx.len(), lc, h, h], &alphas, &mut rng)?;
            let eeg = on.upload(alloc, &[idx.len(), c, t], &gather(&val.data, c * t, idx))?;
            let (embedding, cond) = condition(&eeg, alloc)?;
            let context = tokens(p, &embedding, &vec![true; idx.len()], alloc)?;
            Ok(epsilon_loss(p, &batch, &context, &cond, alloc)?.2)
        })
    };
    let id = config_id(format!("controlnet {cfg:?}").as_bytes());
    let report = train_loop(on, "controlnet", &cfg.train, &id, out, resume, &tree, &mut params, &mut step, &mut validate, stop)?;
    save_component(&out.join("controlnet"), "ControlNetModel", &cn_config, &tree, &params, &|name| !name.starts_with("eeg_projector."))?;
    let metadata = std::collections::BTreeMap::from([
        ("tokens".to_string(), cfg.tokens.to_string()),
        ("structure_norm".to_string(), format!("{structure_norm:?}")),
    ]);
    let refs = [
        ("eeg_projector.weight", params.get(projector.weight)),
        ("eeg_projector.bias", params.get(projector.bias.expect("the projector has a bias"))),
    ];
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
    let abs = |p: &Path| -> Result<String> {
        Ok(std::fs::canonicalize(p).with_context(|| format!("{}: cannot resolve", p.display()))?.display().to_string())
    };
    let value = serde_json::json!({ "vae": abs(&cfg.vae)?, "unet": abs(&cfg.unet)? });
    crate::util::write_atomic(&path, serde_json::to_string_pretty(&value)?.as_bytes()).with_context(|| format!("{}: cannot write", path.display()))
}
