//! `sgdm forward` for the SGDM modules: SpatiotemporalEEGEncoder, StructuralVAE and ContrastiveAlignment.

use anyhow::{ensure, Result};

use super::{param_grads, Named, Outputs, Source};
use crate::models::sgdm::{
    ContrastiveAlignment, EegEncoder, EegEncoderConfig, StructuralVae, StructuralVaeActivations, StructuralVaeConfig, StructuralVaeOutputGrads,
};
use crate::nn::{Grads, ParamTree, Standalone};
use crate::ops::infonce::{infonce_backward, infonce_forward, InfoNceActivations};
use crate::runtime::Device;
use crate::tensor::{DType, Tensor};

/// `sgdm forward` for ContrastiveAlignment: inputs `eeg_embed` and `visual_embed` [B, D]; output `loss` [1];
/// with an upstream gradient for `loss`, `grad.eeg_embed` and `grad.visual_embed`.
pub fn run_contrastive_alignment(c: &Source, inputs: &Named, grads: Option<&Named>, device: &Device, dtype: DType) -> Result<Outputs> {
    let m = ContrastiveAlignment::from_json(&c.config_path(), c.config())?;
    c.params(&ParamTree::new(), device, dtype, &[])?;
    inputs.ensure_only(&["eeg_embed", "visual_embed"])?;
    let (a, b) = (inputs.get("eeg_embed")?, inputs.get("visual_embed")?);
    ensure!(
        a.shape().len() == 2 && a.shape() == b.shape(),
        "{}: eeg_embed {:?} and visual_embed {:?} must both be [B, D]",
        inputs.source,
        a.shape(),
        b.shape()
    );
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

/// `sgdm forward` for SpatiotemporalEEGEncoder: input `eeg` [B, C, T]; output `embedding` [B, latent]; with
/// its upstream gradient, `grad.eeg` and `grad.<parameter>`.
pub fn run_eeg_encoder(c: &Source, inputs: &Named, grads: Option<&Named>, device: &Device, dtype: DType) -> Result<Outputs> {
    let m = EegEncoder::new(EegEncoderConfig::from_json(&c.config_path(), c.config())?)?;
    let params = c.params(&m.params, device, dtype, &[])?;
    inputs.ensure_only(&["eeg"])?;
    let mut alloc = Standalone(device.clone());
    let acts = m.forward(&params, inputs.get("eeg")?, &mut alloc)?;
    let mut out = Vec::new();
    if let Some(g) = grads {
        g.ensure_only(&["embedding"])?;
        let dembedding = g.get_shaped("embedding", acts.embedding.shape())?;
        let mut pg = Grads::zeros(&m.params, &mut alloc, dtype)?;
        let deeg = m.backward(&params, &acts, dembedding, &mut pg, true, &mut alloc)?.expect("asked for the input gradient");
        out.push(("grad.eeg".to_string(), deeg));
        out.extend(param_grads(&m.params, pg));
    }
    out.push(("embedding".to_string(), acts.embedding));
    Ok(out)
}

/// `sgdm forward` for StructuralVAE: inputs `image` [B, 3, S, S] and optionally `eps` [B, latent]; outputs
/// `recon`, `mu`, `logvar`, `structure`; with their upstream gradients, `grad.image`, `grad.eps` (when
/// given) and `grad.<parameter>`.
pub fn run_structural_vae(c: &Source, inputs: &Named, grads: Option<&Named>, device: &Device, dtype: DType) -> Result<Outputs> {
    let m = StructuralVae::new(StructuralVaeConfig::from_json(&c.config_path(), c.config())?)?;
    let params = c.params(&m.params, device, dtype, &[])?;
    inputs.ensure_only(&["image", "eps"])?;
    let (image, eps) = (inputs.get("image")?, inputs.get_opt("eps"));
    let mut alloc = Standalone(device.clone());
    let acts = m.forward(&params, image, eps, &mut alloc)?;
    let mut out = Vec::new();
    if let Some(g) = grads {
        g.ensure_only(&["recon", "mu", "logvar", "structure"])?;
        let d = StructuralVaeOutputGrads {
            recon: g.get_shaped("recon", acts.recon.shape())?,
            mu: g.get_shaped("mu", acts.mu.shape())?,
            logvar: g.get_shaped("logvar", acts.logvar.shape())?,
            structure: g.get_shaped("structure", acts.structure.shape())?,
        };
        let mut pg = Grads::zeros(&m.params, &mut alloc, dtype)?;
        let di = m.backward(&params, image, eps, &acts, &d, &mut pg, true, &mut alloc)?.expect("asked for the input gradients");
        out.push(("grad.image".to_string(), di.image));
        out.extend(di.eps.map(|e| ("grad.eps".to_string(), e)));
        out.extend(param_grads(&m.params, pg));
    }
    let StructuralVaeActivations { recon, mu, logvar, structure, .. } = acts;
    out.extend([("recon", recon), ("mu", mu), ("logvar", logvar), ("structure", structure)].map(|(n, t)| (n.to_string(), t)));
    Ok(out)
}
