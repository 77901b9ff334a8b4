//! The training configuration file (TOML): one table per stage, `[base]`, `[vae]`, `[encoder]` and
//! `[controlnet]`, each optional. A single stage reads only its own table (the others must be stage tables
//! but are not read), so a file holding every stage, like the shipped `weights/train.toml`, trains any one
//! of them; `train all` reads every table and fills in the paths to the earlier stages' outputs itself.
//! A key nothing reads is refused by name everywhere, the diffusers model tables of `[base]` included:
//! in a file we read, an unknown key is a typo that would silently change what is trained.
//!
//! **From the dataset.** What the data decides may be left out and is then read from the `manifest.json` of
//! the table's `data`: the EEG encoder's `n_channels` and `n_timepoints` (`[encoder.model]`,
//! `[controlnet.encoder]`), the StructuralVAE's `image_size` (`[vae.model]`, `[encoder.vae]`,
//! `[controlnet.structural_vae]`) and `[base] image_size` are the dataset's channel count, time points and
//! image size; `[base.unet_model] sample_size` is `[base] image_size` over the VAE's downscale;
//! `[controlnet] image_size` is the base's: the `sample_size` of the VAE it uses (512 for
//! Stable Diffusion 1.5), else `[base] image_size`, else the dataset's. A value given is used as given.
//!
//! **A pretrained base.** `[base]` holding only `pretrained = "DIR"` (a diffusers Stable Diffusion folder
//! with `vae/` and `unet/`) trains no base: `train all` checks that both load and gives the ControlNet stage
//! `DIR/vae` and `DIR/unet`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::de::IgnoredAny;
use serde::Deserialize;

use super::stages::{BaseStageConfig, ControlNetStageConfig, EncoderStageConfig, VaeStageConfig};
use crate::data::dataset::Manifest;
use crate::models::autoencoder_kl::AutoencoderKlConfig;
use crate::models::unet::UNetConfig;

/// A stage, by its table's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Base,
    Vae,
    Encoder,
    Controlnet,
}

impl Stage {
    /// In the order `train all` runs them.
    pub const ALL: [Stage; 4] = [Stage::Base, Stage::Vae, Stage::Encoder, Stage::Controlnet];

    pub fn table(self) -> &'static str {
        match self {
            Stage::Base => "base",
            Stage::Vae => "vae",
            Stage::Encoder => "encoder",
            Stage::Controlnet => "controlnet",
        }
    }
}

/// The paths `train all` gives the later stages: (table, key, file in the output folder written by an
/// earlier stage). `vae` and `unet` only when the configuration has a `[base]` table (without it the
/// ControlNet trains on the `vae/` and `unet/` its table names, e.g. Stable Diffusion's).
pub const OUTPUTS_IN_OUT: [(&str, &str, &str); 6] = [
    ("encoder", "vae_weights", "vae.safetensors"),
    ("controlnet", "structural_vae_weights", "vae.safetensors"),
    ("controlnet", "encoder_weights", "encoder.safetensors"),
    ("controlnet", "eeg_standardization", "eeg_standardization.json"),
    ("controlnet", "vae", "vae"),
    ("controlnet", "unet", "unet"),
];

/// What a configuration file gives each stage; a stage that was not asked for, or has no table, is `None`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrainingConfig {
    pub base: Option<BaseStageConfig>,
    /// `[base] pretrained = "DIR"`: the Stable Diffusion folder used as the base instead of training one.
    pub pretrained_base: Option<PathBuf>,
    pub vae: Option<VaeStageConfig>,
    pub encoder: Option<EncoderStageConfig>,
    pub controlnet: Option<ControlNetStageConfig>,
}

/// The file's tables, each parsed as its type parameter: a stage's config type for the stages read,
/// `IgnoredAny` for the others (so their content is neither parsed nor required). An unknown table is
/// refused, with the line it is on.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Tables<B, V, E, C> {
    base: Option<B>,
    vae: Option<V>,
    encoder: Option<E>,
    controlnet: Option<C>,
}

fn parse<B, V, E, C>(path: &Path, text: &str) -> Result<Tables<B, V, E, C>>
where
    Tables<B, V, E, C>: serde::de::DeserializeOwned,
{
    toml::from_str(text).with_context(|| format!("{}: invalid training configuration", path.display()))
}

impl TrainingConfig {
    /// `stage`'s table of the configuration `text`, read from `path` (which names it in errors); the other
    /// tables are not read.
    pub fn stage(path: &Path, text: &str, stage: Stage) -> Result<TrainingConfig> {
        let p = path.display();
        let mut raw: toml::Table = toml::from_str(text).with_context(|| format!("{p}: invalid TOML"))?;
        let pretrained_base = take_pretrained(path, &mut raw)?;
        if stage == Stage::Base {
            if let Some(dir) = pretrained_base {
                return Ok(TrainingConfig { pretrained_base: Some(dir), ..Default::default() });
            }
        }
        let table = raw
            .get(stage.table())
            .with_context(|| format!("{p}: no [{}] table for this stage", stage.table()))?
            .as_table()
            .with_context(|| format!("{p}: [{}] must be a table", stage.table()))?;
        for (_, key, file) in OUTPUTS_IN_OUT.iter().filter(|(t, _, _)| *t == stage.table()) {
            ensure!(
                table.contains_key(*key),
                "{p}: [{}] has no '{key}': set it to the {file} an earlier stage wrote, or run `sgdm train all`, which sets it to \
                 {file} in its --out",
                stage.table()
            );
        }
        let vae_dir = raw.get("controlnet").and_then(|t| t.get("vae")).and_then(|v| v.as_str()).map(PathBuf::from);
        let filled = fill_from_datasets(path, &mut raw, &[stage], vae_dir.as_deref())?;
        let text = if filled { toml::to_string(&raw)? } else { text.to_string() };
        let text = text.as_str();
        type I = IgnoredAny;
        let config = match stage {
            Stage::Base => TrainingConfig { base: parse::<BaseStageConfig, I, I, I>(path, text)?.base, ..Default::default() },
            Stage::Vae => TrainingConfig { vae: parse::<I, VaeStageConfig, I, I>(path, text)?.vae, ..Default::default() },
            Stage::Encoder => TrainingConfig { encoder: parse::<I, I, EncoderStageConfig, I>(path, text)?.encoder, ..Default::default() },
            Stage::Controlnet => TrainingConfig { controlnet: parse::<I, I, I, ControlNetStageConfig>(path, text)?.controlnet, ..Default::default() },
        };
        config.check_base_models(path)?;
        Ok(TrainingConfig { pretrained_base, ..config })
    }

    /// Every table, for `train all` into `out`: `[vae]`, `[encoder]` and `[controlnet]` are required,
    /// `[base]` optional, and the paths of [`OUTPUTS_IN_OUT`] are set to the earlier stages' outputs in
    /// `out` (given in the file, they are refused: `train all` chooses them).
    pub fn all(path: &Path, text: &str, out: &Path) -> Result<TrainingConfig> {
        let p = path.display();
        let mut table: toml::Table = toml::from_str(text).with_context(|| format!("{p}: invalid TOML"))?;
        let has_base = table.contains_key("base");
        let pretrained_base = take_pretrained(path, &mut table)?;
        // Where the ControlNet stage's VAE and UNet come from: the pretrained folder, or stage base's output.
        let base_dir = pretrained_base.clone().unwrap_or_else(|| out.to_path_buf());
        for stage in ["vae", "encoder", "controlnet"] {
            ensure!(table.contains_key(stage), "{p}: sgdm train all needs a [{stage}] table");
        }
        let given = |(_, key, _): &&(&str, &str, &str)| has_base || (*key != "vae" && *key != "unet");
        for (stage, key, file) in OUTPUTS_IN_OUT.iter().filter(given) {
            let stage_table = table[*stage].as_table_mut().with_context(|| format!("{p}: [{stage}] must be a table"))?;
            let from = if *key == "vae" || *key == "unet" { base_dir.join(file) } else { out.join(file) };
            if stage_table.contains_key(*key) {
                bail!("{p}: [{stage}] {key} is set, but sgdm train all uses {} from an earlier stage; remove it", from.display());
            }
            stage_table.insert(key.to_string(), toml::Value::String(from.to_string_lossy().into_owned()));
        }
        // A trained base's size is [base] image_size; a pretrained one's, its VAE's sample_size.
        fill_from_datasets(path, &mut table, &Stage::ALL, pretrained_base.as_ref().map(|d| d.join("vae")).as_deref())?;
        let tables: Tables<BaseStageConfig, VaeStageConfig, EncoderStageConfig, ControlNetStageConfig> = parse(path, &toml::to_string(&table)?)?;
        let config = TrainingConfig { base: tables.base, pretrained_base, vae: tables.vae, encoder: tables.encoder, controlnet: tables.controlnet };
        config.check_base_models(path)?;
        Ok(config)
    }

    /// `[base.vae_model]` and `[base.unet_model]` are diffusers configs kept as written (they become the
    /// components' `config.json`), so serde cannot refuse their unknown keys: the model readers do.
    fn check_base_models(&self, path: &Path) -> Result<()> {
        let Some(base) = &self.base else { return Ok(()) };
        // diffusers' sample_size is read by the reconstruction pipeline, not by the model.
        AutoencoderKlConfig::from_json_strict(Path::new(&format!("{} [base.vae_model]", path.display())), &base.vae_model, &["sample_size"])?;
        UNetConfig::from_json_strict(Path::new(&format!("{} [base.unet_model]", path.display())), &base.unet_model, &["sample_size"])?;
        Ok(())
    }
}

/// Removes `[base]` from `table` when it names a pretrained base and returns that folder. `pretrained` must
/// be the table's only key (the others configure a base to train) and name a folder with `vae/config.json`
/// and `unet/config.json`.
fn take_pretrained(path: &Path, table: &mut toml::Table) -> Result<Option<PathBuf>> {
    let p = path.display();
    let Some(base) = table.get("base").and_then(|b| b.as_table()) else { return Ok(None) };
    let Some(dir) = base.get("pretrained") else { return Ok(None) };
    let dir = PathBuf::from(dir.as_str().with_context(|| format!("{p}: [base] pretrained must be a folder's path (a string)"))?);
    let others: Vec<&str> = base.keys().map(String::as_str).filter(|k| *k != "pretrained").collect();
    ensure!(
        others.is_empty(),
        "{p}: [base] pretrained = {:?} uses that model as the base, so nothing of a base to train may be set beside it: remove {}",
        dir.display().to_string(),
        others.join(", ")
    );
    for component in ["vae", "unet"] {
        let config = dir.join(component).join("config.json");
        ensure!(
            config.is_file(),
            "{p}: [base] pretrained = {:?}: {} is missing; expected a diffusers Stable Diffusion folder with vae/ and unet/ \
             (config.json and diffusion_pytorch_model.safetensors in each)",
            dir.display().to_string(),
            config.display()
        );
    }
    table.remove("base");
    Ok(Some(dir))
}

/// The keys of `(table, subtable)` that default to the dataset's EEG channel count, time points or image size.
const FROM_DATASET: [(&str, Option<&str>, &str); 8] = [
    ("base", None, "image_size"),
    ("vae", Some("model"), "image_size"),
    ("encoder", Some("vae"), "image_size"),
    ("encoder", Some("model"), "n_channels"),
    ("encoder", Some("model"), "n_timepoints"),
    ("controlnet", Some("structural_vae"), "image_size"),
    ("controlnet", Some("encoder"), "n_channels"),
    ("controlnet", Some("encoder"), "n_timepoints"),
];

/// Fills in the keys of `stages`' tables that were left to the dataset (see the module docs), reading each
/// table's `data` manifest only when one is missing; `vae_dir` is the AutoencoderKL folder the ControlNet
/// stage will use, if known. Returns whether anything was filled in.
fn fill_from_datasets(path: &Path, table: &mut toml::Table, stages: &[Stage], vae_dir: Option<&Path>) -> Result<bool> {
    let p = path.display();
    let mut manifests: BTreeMap<String, Manifest> = BTreeMap::new();
    let mut manifest_of = |stage: &str, table: &toml::Table, key: &str| -> Result<Manifest> {
        let data = table
            .get("data")
            .and_then(|d| d.as_str())
            .with_context(|| format!("{p}: [{stage}] {key} is not given, so it is the dataset's, but [{stage}] names no data folder"))?;
        if !manifests.contains_key(data) {
            let manifest =
                Manifest::read(Path::new(data)).with_context(|| format!("{p}: [{stage}] {key} is not given, so it is taken from the dataset"))?;
            manifests.insert(data.to_string(), manifest);
        }
        Ok(manifests[data].clone())
    };
    let mut filled = false;
    for (stage, sub, key) in FROM_DATASET {
        if !stages.iter().any(|s| s.table() == stage) {
            continue;
        }
        let Some(stage_table) = table.get_mut(stage).and_then(|t| t.as_table_mut()) else { continue };
        let given = match sub {
            Some(sub) => stage_table.get(sub).and_then(|t| t.as_table()).is_none_or(|t| t.contains_key(key)),
            None => stage_table.contains_key(key),
        };
        if given {
            continue;
        }
        let manifest = manifest_of(stage, stage_table, key)?;
        let value = match key {
            "n_channels" => manifest.ch_names.len(),
            "n_timepoints" => manifest.times.len(),
            _ => manifest.image_size,
        };
        let target = match sub {
            Some(sub) => stage_table.get_mut(sub).and_then(|t| t.as_table_mut()).expect("checked above"),
            None => stage_table,
        };
        target.insert(key.into(), toml::Value::Integer(value as i64));
        filled = true;
    }
    if stages.contains(&Stage::Base) {
        if let Some(base) = table.get_mut("base").and_then(|t| t.as_table_mut()) {
            // The UNet's sample_size is the latent side the reconstruction samples: the image side over the VAE's downscale.
            let size = base.get("image_size").and_then(|v| v.as_integer());
            let blocks = base.get("vae_model").and_then(|v| v.get("block_out_channels")).and_then(|v| v.as_array()).map(Vec::len);
            if let (Some(size), Some(blocks), Some(unet)) = (size, blocks, base.get_mut("unet_model").and_then(|t| t.as_table_mut())) {
                let latent = u32::try_from(blocks.saturating_sub(1)).ok().and_then(|shift| size.checked_shr(shift));
                if let (false, Some(latent)) = (unet.contains_key("sample_size"), latent.filter(|_| blocks >= 1)) {
                    unet.insert("sample_size".into(), toml::Value::Integer(latent));
                    filled = true;
                }
            }
        }
    }
    if stages.contains(&Stage::Controlnet) {
        let base_size = table.get("base").and_then(|b| b.get("image_size")).and_then(|v| v.as_integer());
        if let Some(controlnet) = table.get_mut("controlnet").and_then(|t| t.as_table_mut()) {
            if !controlnet.contains_key("image_size") {
                let size = match vae_dir.and_then(vae_sample_size).or(base_size) {
                    Some(size) => size,
                    None => manifest_of("controlnet", controlnet, "image_size")?.image_size as i64,
                };
                controlnet.insert("image_size".into(), toml::Value::Integer(size));
                filled = true;
            }
        }
    }
    Ok(filled)
}

/// The image size an AutoencoderKL folder's `config.json` declares (diffusers' `sample_size`), if it does.
fn vae_sample_size(dir: &Path) -> Option<i64> {
    let text = crate::util::read_to_string(&dir.join("config.json")).ok()?;
    let config: serde_json::Value = serde_json::from_str(&text).ok()?;
    config.get("sample_size")?.as_i64().filter(|s| *s > 0)
}
