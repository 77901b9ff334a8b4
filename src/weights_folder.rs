//! The weights folder: what `sgdm train all` writes and the reconstruction pipeline reads (the shipped default
//! in `weights/` is one), and the loading of its models, which the pipeline, stage `controlnet` (trained
//! against a folder's AutoencoderKL and UNet and the earlier stages' StructuralVAE and EEG encoder) and the
//! `[base] pretrained` check share.
//!
//! | file | what |
//! | --- | --- |
//! | `vae/`, `unet/`, `controlnet/` | diffusers components (`config.json` + `diffusion_pytorch_model.safetensors`) |
//! | `vae.safetensors`, `vae_config.json` | the StructuralVAE (stage 1) |
//! | `encoder.safetensors`, `encoder_config.json`, `eeg_standardization.json` | the EEG encoder (stage 2) and its input scaling |
//! | `eeg_projector.safetensors` | embedding -> `tokens` cross-attention tokens (stage 3) |
//! | `base.json` (optional) | the `vae` and `unet` folders to use instead of `vae/` and `unet/` (e.g. Stable Diffusion's) |

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use serde_json::Value;

use crate::models::autoencoder_kl::{AutoencoderKl, AutoencoderKlConfig, LEGACY_ATTENTION_NAMES};
use crate::models::sgdm::{EegEncoder, EegEncoderConfig, StructuralVae, StructuralVaeConfig};
use crate::models::unet::{ControlNet, UNet, UNetConfig};
use crate::nn::ParamStore;
use crate::runtime::Device;
use crate::tensor::DType;
use crate::weights::{Component, SafetensorsFile};

/// The StructuralVAE's configuration, written by stage `vae` beside `vae.safetensors`.
pub const VAE_CONFIG: &str = "vae_config.json";
/// The EEG encoder's configuration, written by stage `encoder` beside `encoder.safetensors`.
pub const ENCODER_CONFIG: &str = "encoder_config.json";
/// The file naming the AutoencoderKL and UNet a ControlNet was trained against when they are not the
/// `vae/` and `unet/` beside it (e.g. a Stable Diffusion folder).
pub const BASE_POINTER: &str = "base.json";

/// The files a weights folder must hold besides the three diffusers components.
pub const WEIGHT_FILES: [&str; 6] =
    ["vae.safetensors", VAE_CONFIG, "encoder.safetensors", ENCODER_CONFIG, "eeg_standardization.json", "eeg_projector.safetensors"];

/// The AutoencoderKL and UNet folders of a weights folder: its `vae/` and `unet/`, or those `base.json`
/// names (written by stage `controlnet` when it trained against, say, a Stable Diffusion folder).
pub fn base_components(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let pointer = dir.join(BASE_POINTER);
    if pointer.is_file() {
        let v = read_json(&pointer)?;
        let get = |key: &str| -> Result<PathBuf> {
            let p = PathBuf::from(v[key].as_str().with_context(|| format!("{}: no '{key}' path", pointer.display()))?);
            ensure!(p.join("config.json").is_file(), "{}: '{key}' names {}, which has no config.json", pointer.display(), p.display());
            Ok(p)
        };
        return Ok((get("vae")?, get("unet")?));
    }
    for f in ["vae/config.json", "unet/config.json"] {
        ensure!(dir.join(f).is_file(), "{}: the weights folder has no {f} and no base.json naming the VAE and UNet", dir.display());
    }
    Ok((dir.join("vae"), dir.join("unet")))
}

/// The context of a model that its configuration file does not describe.
pub fn built(config: &Path) -> String {
    format!("{}: the model this configuration describes cannot be built", config.display())
}

pub fn read_json(path: &Path) -> Result<Value> {
    let text = crate::util::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

/// The AutoencoderKL component in `dir` with its parameters on `device` as `dtype` (older checkpoints'
/// attention names accepted).
pub fn load_autoencoder_kl(dir: &Path, device: &Device, dtype: DType) -> Result<(AutoencoderKl, ParamStore)> {
    let component = Component::open(dir)?;
    let config_path = dir.join("config.json");
    let vae = AutoencoderKl::new(AutoencoderKlConfig::from_json(&config_path, &component.config)?).with_context(|| built(&config_path))?;
    let params = ParamStore::load_owned(&vae.params, &component.weights, device, dtype, &LEGACY_ATTENTION_NAMES)?;
    Ok((vae, params))
}

/// The UNet2DConditionModel component in `dir` with its parameters, and its `config.json` as written (the
/// settings a ControlNet copies from it, the latent size).
pub fn load_unet(dir: &Path, device: &Device, dtype: DType) -> Result<(UNet, ParamStore, Value)> {
    let component = Component::open(dir)?;
    let config_path = dir.join("config.json");
    let unet = UNet::new(UNetConfig::from_json(&config_path, &component.config)?).with_context(|| built(&config_path))?;
    let params = ParamStore::load_owned(&unet.params, &component.weights, device, dtype, &[])?;
    Ok((unet, params, component.config))
}

/// The ControlNetModel component in `dir` with its parameters.
pub fn load_controlnet(dir: &Path, device: &Device, dtype: DType) -> Result<(ControlNet, ParamStore)> {
    let component = Component::open(dir)?;
    let config_path = dir.join("config.json");
    let controlnet = ControlNet::new(UNetConfig::from_json(&config_path, &component.config)?).with_context(|| built(&config_path))?;
    let params = ParamStore::load_owned(&controlnet.params, &component.weights, device, dtype, &[])?;
    Ok((controlnet, params))
}

/// The StructuralVAE (stage `vae`'s model) of `config`, with its parameters from `weights` on `device` as
/// `dtype`. `source` names where the configuration came from (a file, a TOML table) for errors.
pub fn load_structural_vae(
    config: &StructuralVaeConfig,
    source: &str,
    weights: &Path,
    device: &Device,
    dtype: DType,
) -> Result<(StructuralVae, ParamStore)> {
    let model = StructuralVae::new(config.clone()).with_context(|| format!("{source}: the StructuralVAE it describes cannot be built"))?;
    let params = ParamStore::load_owned(&model.params, &SafetensorsFile::open(weights)?, device, dtype, &[])?;
    Ok((model, params))
}

/// The EEG encoder (stage `encoder`'s model) of `config`, with its parameters from `weights`; as
/// [`load_structural_vae`].
pub fn load_eeg_encoder(config: &EegEncoderConfig, source: &str, weights: &Path, device: &Device, dtype: DType) -> Result<(EegEncoder, ParamStore)> {
    let model = EegEncoder::new(config.clone()).with_context(|| format!("{source}: the EEG encoder it describes cannot be built"))?;
    let params = ParamStore::load_owned(&model.params, &SafetensorsFile::open(weights)?, device, dtype, &[])?;
    Ok((model, params))
}
