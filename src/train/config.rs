//! The training configuration file (TOML): one table per stage, `[base]`, `[vae]`, `[encoder]` and
//! `[controlnet]`, each optional. A single stage reads only its own table (the others must be stage tables
//! but are not read), so a file holding every stage, like the shipped `weights/train.toml`, trains any one
//! of them; `train all` reads every table and fills in the paths to the earlier stages' outputs itself.
//! A key nothing reads is refused by name everywhere, the diffusers model tables of `[base]` included:
//! in a file we read, an unknown key is a typo that would silently change what is trained.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde::de::IgnoredAny;
use serde::Deserialize;

use super::stages::{BaseStageConfig, ControlNetStageConfig, EncoderStageConfig, VaeStageConfig};
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
        let raw: toml::Table = toml::from_str(text).with_context(|| format!("{p}: invalid TOML"))?;
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
        type I = IgnoredAny;
        let config = match stage {
            Stage::Base => TrainingConfig { base: parse::<BaseStageConfig, I, I, I>(path, text)?.base, ..Default::default() },
            Stage::Vae => TrainingConfig { vae: parse::<I, VaeStageConfig, I, I>(path, text)?.vae, ..Default::default() },
            Stage::Encoder => TrainingConfig { encoder: parse::<I, I, EncoderStageConfig, I>(path, text)?.encoder, ..Default::default() },
            Stage::Controlnet => TrainingConfig { controlnet: parse::<I, I, I, ControlNetStageConfig>(path, text)?.controlnet, ..Default::default() },
        };
        config.check_base_models(path)?;
        Ok(config)
    }

    /// Every table, for `train all` into `out`: `[vae]`, `[encoder]` and `[controlnet]` are required,
    /// `[base]` optional, and the paths of [`OUTPUTS_IN_OUT`] are set to the earlier stages' outputs in
    /// `out` (given in the file, they are refused: `train all` chooses them).
    pub fn all(path: &Path, text: &str, out: &Path) -> Result<TrainingConfig> {
        let p = path.display();
        let mut table: toml::Table = toml::from_str(text).with_context(|| format!("{p}: invalid TOML"))?;
        let has_base = table.contains_key("base");
        for stage in ["vae", "encoder", "controlnet"] {
            ensure!(table.contains_key(stage), "{p}: sgdm train all needs a [{stage}] table");
        }
        let given = |(_, key, _): &&(&str, &str, &str)| has_base || (*key != "vae" && *key != "unet");
        for (stage, key, file) in OUTPUTS_IN_OUT.iter().filter(given) {
            let stage_table = table[*stage].as_table_mut().with_context(|| format!("{p}: [{stage}] must be a table"))?;
            if stage_table.contains_key(*key) {
                bail!("{p}: [{stage}] {key} is set, but sgdm train all uses {} from an earlier stage; remove it", out.join(file).display());
            }
            stage_table.insert(key.to_string(), toml::Value::String(out.join(file).to_string_lossy().into_owned()));
        }
        let tables: Tables<BaseStageConfig, VaeStageConfig, EncoderStageConfig, ControlNetStageConfig> = parse(path, &toml::to_string(&table)?)?;
        let config = TrainingConfig { base: tables.base, vae: tables.vae, encoder: tables.encoder, controlnet: tables.controlnet };
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
