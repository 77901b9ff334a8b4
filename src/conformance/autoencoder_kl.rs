//! `sgdm forward` for AutoencoderKL.

use anyhow::{ensure, Result};

use super::{param_grads, Named, Outputs, Source};
use crate::models::autoencoder_kl::{AutoencoderKl, AutoencoderKlConfig, LEGACY_ATTENTION_NAMES};
use crate::nn::Grads;
use crate::ops::elementwise::add;
use crate::runtime::Device;
use crate::tensor::DType;

/// `sgdm forward` for AutoencoderKL, as tests/fixtures/models/make_fixtures.py's `run_vae`: inputs `sample`
/// [B, in, H, W] and/or `latents` [B', latent, h, w]; outputs `latent_dist.mean`, `latent_dist.logvar` and
/// `reconstruction` = decode(mean) from `sample`, `decoded` = decode(latents) from `latents`. With upstream
/// gradients for every output, also `grad.sample`, `grad.latents` and `grad.<parameter>`.
pub fn run_autoencoder_kl(c: &Source, inputs: &Named, grads: Option<&Named>, device: &Device, dtype: DType) -> Result<Outputs> {
    let model = AutoencoderKl::new(AutoencoderKlConfig::from_json(&c.config_path(), c.config())?)?;
    let p = c.params(&model.params, device, dtype, &LEGACY_ATTENTION_NAMES)?;
    inputs.ensure_only(&["sample", "latents"])?;
    let (sample, latents) = (inputs.get_opt("sample"), inputs.get_opt("latents"));
    ensure!(sample.is_some() || latents.is_some(), "{}: AutoencoderKL needs 'sample' and/or 'latents'", inputs.source);
    // Without upstream gradients nothing will read the activations: discard them block by block.
    let alloc = &mut *crate::nn::standalone(device, grads.is_some());

    let encoded = sample.map(|x| -> Result<_> {
        let (mean, logvar, enc) = model.encode(&p, x, alloc)?;
        let (reconstruction, dec) = model.decode(&p, &mean, alloc)?;
        Ok((mean, logvar, enc, reconstruction, dec))
    });
    let encoded = encoded.transpose()?;
    let decoded = latents.map(|z| model.decode(&p, z, alloc)).transpose()?;

    let mut g = grads.map(|_| Grads::zeros(&model.params, alloc, dtype)).transpose()?;
    let mut input_grads = Vec::new();
    if let (Some(gn), Some(g)) = (grads, g.as_mut()) {
        let mut known = Vec::new();
        if let (Some(x), Some((mean, logvar, enc, reconstruction, dec))) = (sample, &encoded) {
            known.extend(["latent_dist.mean", "latent_dist.logvar", "reconstruction"]);
            let dmean_out = gn.get_shaped("latent_dist.mean", mean.shape())?;
            let dlogvar = gn.get_shaped("latent_dist.logvar", logvar.shape())?;
            let drec = gn.get_shaped("reconstruction", reconstruction.shape())?;
            let dmean_dec = model.decode_backward(&p, g, mean, dec, drec, alloc)?;
            let mut dmean = alloc.alloc(mean.shape(), dtype)?;
            add(dmean_out, &dmean_dec, &mut dmean)?;
            input_grads.push(("grad.sample".to_string(), model.encode_backward(&p, g, x, enc, &dmean, dlogvar, alloc)?));
        }
        if let (Some(z), Some((out, dec))) = (latents, &decoded) {
            known.push("decoded");
            let dy = gn.get_shaped("decoded", out.shape())?;
            input_grads.push(("grad.latents".to_string(), model.decode_backward(&p, g, z, dec, dy, alloc)?));
        }
        gn.ensure_only(&known)?;
    }

    let mut out = Vec::new();
    if let Some((mean, logvar, _, reconstruction, _)) = encoded {
        out.push(("latent_dist.mean".to_string(), mean));
        out.push(("latent_dist.logvar".to_string(), logvar));
        out.push(("reconstruction".to_string(), reconstruction));
    }
    if let Some((y, _)) = decoded {
        out.push(("decoded".to_string(), y));
    }
    out.extend(input_grads);
    if let Some(g) = g {
        out.extend(param_grads(&model.params, g));
    }
    Ok(out)
}
