//! `sgdm train <stage>`: run one training stage from a TOML configuration.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;
use sgdm::train::stages::{
    train_base, train_controlnet, train_encoder, train_vae, BaseStageConfig, ControlNetStageConfig, EncoderStageConfig, StageReport, VaeStageConfig,
};

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Stage {
    /// The embedded default's AutoencoderKL and UNet, from scratch (skip it with real SD 1.5 weights).
    Base,
    /// Stage 1: the StructuralVAE (reconstruction, beta-weighted KL, structure map).
    Vae,
    /// Stage 2: the EEG encoder, InfoNCE against the frozen StructuralVAE's mu.
    Encoder,
    /// Stage 3: the ControlNet and the EEG-to-token projector, epsilon loss through the frozen UNet.
    Controlnet,
}

#[derive(clap::Args)]
pub struct Args {
    /// The stage to run; its table ([base], [vae], [encoder] or [controlnet]) is read from the configuration.
    #[arg(value_enum)]
    stage: Stage,
    /// TOML configuration holding the stage's table.
    #[arg(long, value_name = "FILE.toml")]
    config: PathBuf,
    /// Continue from a checkpoint written by the same stage under the same configuration.
    #[arg(long, value_name = "CKPT")]
    resume: Option<PathBuf>,
    /// Folder for the step log, checkpoints and final parameters (created if absent).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

/// The configuration file: one table per stage, each optional.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    base: Option<BaseStageConfig>,
    vae: Option<VaeStageConfig>,
    encoder: Option<EncoderStageConfig>,
    controlnet: Option<ControlNetStageConfig>,
}

fn read_config(path: &Path) -> Result<ConfigFile> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read the configuration", path.display()))?;
    toml::from_str(&text).with_context(|| format!("{}: invalid training configuration", path.display()))
}

pub fn run(args: &Args) -> Result<()> {
    let config = read_config(&args.config)?;
    let missing = |table: &str| format!("{}: no [{table}] table for this stage", args.config.display());
    let resume = args.resume.as_deref();
    let reports: Vec<(&str, StageReport)> = match args.stage {
        Stage::Base => {
            let r = train_base(&config.base.with_context(|| missing("base"))?, &args.out, resume)?;
            r.vae.map(|v| ("base_vae", v)).into_iter().chain([("base_unet", r.unet)]).collect()
        }
        Stage::Vae => vec![("vae", train_vae(&config.vae.with_context(|| missing("vae"))?, &args.out, resume)?)],
        Stage::Encoder => vec![("encoder", train_encoder(&config.encoder.with_context(|| missing("encoder"))?, &args.out, resume)?)],
        Stage::Controlnet => vec![("controlnet", train_controlnet(&config.controlnet.with_context(|| missing("controlnet"))?, &args.out, resume)?)],
    };
    for (name, report) in &reports {
        print_report(name, report);
        println!("wrote {}", args.out.join(format!("{name}.safetensors")).display());
    }
    Ok(())
}

fn print_report(name: &str, report: &StageReport) {
    let first = report.train_losses.first().copied().unwrap_or(f64::NAN);
    let last = report.train_losses.last().copied().unwrap_or(f64::NAN);
    println!("{name}: steps {}..{}, training loss {first:.4} -> {last:.4}", report.first_step, report.first_step + report.train_losses.len() as u64);
    for (step, val) in &report.val_losses {
        println!("  validation loss at step {step}: {val:.4}");
    }
}
