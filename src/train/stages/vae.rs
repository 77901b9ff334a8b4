//! Stage `vae` (stage 1): the StructuralVAE.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::{ensure, Context, Result};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;

use super::common::{
    check_image_size, gather, load_images, loss_buffers, save_model_config, train_loop, validation_mean, LoopConfig, NamedLosses, On, StageReport,
};
use crate::data::dataset::Manifest;
use crate::models::sgdm::{StructuralVae, StructuralVaeConfig, StructuralVaeOutputGrads};
use crate::nn::{Allocator, Grads, ParamStore};
use crate::ops::loss::{kl_loss, kl_loss_backward, mse_loss, mse_loss_backward};
use crate::tensor::Tensor;
use crate::train::config_id;
use crate::weights_folder::VAE_CONFIG;

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

/// The three terms of the VAE loss: MSE(recon, image), KL against N(0, 1), MSE(structure, edges).
struct VaeLosses {
    recon: f64,
    kl: f64,
    structure: f64,
}

/// The three terms of a forward's outputs against `image` and `edges`.
fn vae_losses(acts: &crate::models::sgdm::StructuralVaeActivations, image: &Tensor, edges: &Tensor, alloc: &mut dyn Allocator) -> Result<VaeLosses> {
    let (mut loss, mut partials) = loss_buffers(alloc)?;
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
pub fn train_vae(cfg: &VaeStageConfig, out: &Path, resume: Option<&Path>, stop: &AtomicBool, on: impl Into<On>) -> Result<StageReport> {
    let on = &on.into();
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

    let mut step = |p: &ParamStore, grads: &mut Grads, rng: &mut ChaCha8Rng, dloss: f32, alloc: &mut dyn Allocator| -> Result<NamedLosses> {
        let idx = rand::seq::index::sample(rng, train.len, b).into_vec();
        let image = on.upload(alloc, &[b, 3, s, s], &gather(&train.images, per_image, &idx))?;
        let edges = on.upload(alloc, &[b, sd], &gather(&train.edges, sd, &idx))?;
        let eps = on.upload(alloc, &[b, latent], &crate::util::standard_normal(rng, b * latent))?;
        let acts = model.forward(p, &image, Some(&eps), alloc)?;
        let l = vae_losses(&acts, &image, &edges, alloc)?;
        let (mut drecon, mut dmu, mut dlogvar, mut dstructure) = (
            on.zeros_in(alloc, acts.recon.shape())?,
            on.zeros_in(alloc, acts.mu.shape())?,
            on.zeros_in(alloc, acts.logvar.shape())?,
            on.zeros_in(alloc, acts.structure.shape())?,
        );
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
        validation_mean(on, val.len, b, |idx, alloc| {
            let image = on.tensor(&[idx.len(), 3, s, s], &gather(&val.images, per_image, idx))?;
            let edges = on.tensor(&[idx.len(), sd], &gather(&val.edges, sd, idx))?;
            let acts = model.forward(p, &image, None, alloc)?;
            Ok(cfg.total(&vae_losses(&acts, &image, &edges, alloc)?))
        })
    };
    let id = config_id(format!("vae {cfg:?}").as_bytes());
    // Before the parameters, which `train all` takes as the sign that the stage finished.
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create the output folder", out.display()))?;
    save_model_config(&out.join(VAE_CONFIG), "StructuralVAE", m)?;
    train_loop(on, "vae", &cfg.train, &id, out, resume, &model.params, &mut params, &mut step, &mut validate, stop)
}
