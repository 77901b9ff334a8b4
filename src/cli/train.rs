//! `sgdm train <stage>`: run one training stage, or all of them in order, from a TOML configuration; the
//! first Ctrl-C stops the running stage at the end of its step with a checkpoint.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use sgdm::train::stages::{
    train_base, train_controlnet, train_encoder, train_vae, BaseStageConfig, ControlNetStageConfig, EncoderStageConfig, StageReport, Stopped,
    VaeStageConfig,
};
use sgdm::runtime::select;
use sgdm::weights::COMPONENT_WEIGHT_FILES;
use sgdm::{Device, DeviceSpec};

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
    /// base (when the configuration has a [base] table), vae, encoder and controlnet in order, all in --out;
    /// a stage whose final output is in --out already is skipped, an interrupted one resumes.
    All,
}

#[derive(clap::Args)]
pub struct Args {
    /// The stage to run; its table ([base], [vae], [encoder] or [controlnet]) is read from the configuration.
    /// `all` reads every table.
    #[arg(value_enum)]
    stage: Stage,
    /// TOML configuration holding the stage's table.
    #[arg(long, value_name = "FILE.toml")]
    config: PathBuf,
    /// Continue from a checkpoint written by the same stage under the same configuration (not with `all`,
    /// which finds its checkpoints in --out).
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

/// Set by the first Ctrl-C; the running stage's loop reads it after every step.
static STOP: AtomicBool = AtomicBool::new(false);

/// The first Ctrl-C sets [`STOP`]; a second one ends the process at once.
fn install_stop_handler() -> Result<()> {
    ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            eprintln!("\nsgdm: second Ctrl-C, exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("\nsgdm: stopping at the end of this step (Ctrl-C again to exit at once)");
    })
    .context("cannot install the Ctrl-C handler")
}

pub fn run(spec: DeviceSpec, args: &Args) -> Result<()> {
    let selected = select(spec)?;
    if let Some(n) = &selected.notice {
        eprintln!("{n}");
    }
    let device = &selected.device;
    let text = sgdm::util::read_to_string(&args.config).with_context(|| format!("{}: cannot read the configuration", args.config.display()))?;
    install_stop_handler()?;
    if let Stage::All = args.stage {
        ensure!(args.resume.is_none(), "sgdm train all takes no --resume: rerun it with the same --out to continue");
        return run_all(args, &text, device).map_err(|e| match e.downcast_ref::<Stopped>() {
            Some(_) => e.context(format!("to continue, rerun: sgdm train all --config {} --out {}", args.config.display(), args.out.display())),
            None => e,
        });
    }
    let config = parse_config(&args.config, &text)?;
    run_stage(args.stage, &config, &args.config, &args.out, args.resume.as_deref(), device).map_err(|e| match e.downcast_ref::<Stopped>() {
        Some(stopped) => {
            let stage = clap::ValueEnum::to_possible_value(&args.stage).map(|v| v.get_name().to_string()).unwrap_or_default();
            let hint = format!(
                "to continue: sgdm train {stage} --config {} --out {} --resume {}",
                args.config.display(),
                args.out.display(),
                stopped.checkpoint.display()
            );
            e.context(hint)
        }
        None => e,
    })
}

fn parse_config(path: &Path, text: &str) -> Result<ConfigFile> {
    toml::from_str(text).with_context(|| format!("{}: invalid training configuration", path.display()))
}

fn run_stage(stage: Stage, config: &ConfigFile, path: &Path, out: &Path, resume: Option<&Path>, device: &Device) -> Result<()> {
    let missing = |table: &str| format!("{}: no [{table}] table for this stage", path.display());
    let stop = &STOP;
    let reports: Vec<(&str, StageReport)> = match stage {
        Stage::Base => {
            let r = train_base(config.base.as_ref().with_context(|| missing("base"))?, out, resume, stop, device)?;
            r.vae.map(|v| ("base_vae", v)).into_iter().chain([("base_unet", r.unet)]).collect()
        }
        Stage::Vae => vec![("vae", train_vae(config.vae.as_ref().with_context(|| missing("vae"))?, out, resume, stop, device)?)],
        Stage::Encoder => vec![("encoder", train_encoder(config.encoder.as_ref().with_context(|| missing("encoder"))?, out, resume, stop, device)?)],
        Stage::Controlnet => vec![("controlnet", train_controlnet(config.controlnet.as_ref().with_context(|| missing("controlnet"))?, out, resume, stop, device)?)],
        Stage::All => unreachable!("sgdm train all runs the stages one by one"),
    };
    for (name, report) in &reports {
        print_report(name, report);
        println!("wrote {}", out.join(format!("{name}.safetensors")).display());
    }
    Ok(())
}

/// The paths `train all` gives the later stages: (table, key, file in --out written by an earlier stage).
const OUTPUTS_IN_OUT: [(&str, &str, &str); 6] = [
    ("encoder", "vae_weights", "vae.safetensors"),
    ("controlnet", "structural_vae_weights", "vae.safetensors"),
    ("controlnet", "encoder_weights", "encoder.safetensors"),
    ("controlnet", "eeg_standardization", "eeg_standardization.json"),
    ("controlnet", "vae", "vae"),
    ("controlnet", "unet", "unet"),
];

fn run_all(args: &Args, text: &str, device: &Device) -> Result<()> {
    let path = &args.config;
    let mut table: toml::Table = toml::from_str(text).with_context(|| format!("{}: invalid TOML", path.display()))?;
    let has_base = table.contains_key("base");
    for stage in ["vae", "encoder", "controlnet"] {
        ensure!(table.contains_key(stage), "{}: sgdm train all needs a [{stage}] table", path.display());
    }
    // Without [base] the ControlNet trains on the vae/ and unet/ the user's [controlnet] names (real SD weights).
    let given = |(_, key, _): &&(&str, &str, &str)| has_base || (*key != "vae" && *key != "unet");
    for (stage, key, file) in OUTPUTS_IN_OUT.iter().filter(given) {
        let stage_table = table[*stage].as_table_mut().with_context(|| format!("{}: [{stage}] must be a table", path.display()))?;
        if stage_table.contains_key(*key) {
            bail!("{}: [{stage}] {key} is set, but sgdm train all uses {} from an earlier stage; remove it", path.display(), args.out.join(file).display());
        }
        stage_table.insert(key.to_string(), toml::Value::String(args.out.join(file).to_string_lossy().into_owned()));
    }
    let config = parse_config(path, &toml::to_string(&table)?)?;
    let stages = [(Stage::Base, "base"), (Stage::Vae, "vae"), (Stage::Encoder, "encoder"), (Stage::Controlnet, "controlnet")];
    for (stage, name) in stages.into_iter().filter(|(s, _)| has_base || !matches!(s, Stage::Base)) {
        let done = args.out.join(final_output(stage));
        if done.exists() {
            println!("{name}: {} exists, skipped", done.display());
            continue;
        }
        if STOP.load(Ordering::SeqCst) {
            bail!("stopped on request before stage {name}");
        }
        let resume = latest_checkpoint(&args.out, stage)?;
        match &resume {
            Some(ckpt) => println!("{name}: resuming from {}", ckpt.display()),
            None => println!("{name}: training"),
        }
        run_stage(stage, &config, path, &args.out, resume.as_deref(), device)?;
    }
    Ok(())
}

/// The file a stage writes last, relative to the output folder.
fn final_output(stage: Stage) -> PathBuf {
    match stage {
        Stage::Base => Path::new("unet").join(COMPONENT_WEIGHT_FILES[0]),
        Stage::Vae => "vae.safetensors".into(),
        Stage::Encoder => "encoder.safetensors".into(),
        Stage::Controlnet | Stage::All => "eeg_projector.safetensors".into(),
    }
}

/// The stage's checkpoint with the highest step in `out` (for base, a base_unet one before any base_vae one).
fn latest_checkpoint(out: &Path, stage: Stage) -> Result<Option<PathBuf>> {
    let loops: &[&str] = match stage {
        Stage::Base => &["base_unet", "base_vae"],
        Stage::Vae => &["vae"],
        Stage::Encoder => &["encoder"],
        Stage::Controlnet | Stage::All => &["controlnet"],
    };
    let names: Vec<String> = match std::fs::read_dir(out) {
        Ok(entries) => entries.map(|e| Ok(e?.file_name().to_string_lossy().into_owned())).collect::<std::io::Result<_>>().with_context(|| format!("{}: cannot list", out.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("{}: cannot list", out.display())),
    };
    for name in loops {
        let prefix = format!("{name}-step");
        let latest = names.iter().filter(|n| n.starts_with(&prefix) && n.ends_with(".safetensors")).max();
        if let Some(file) = latest {
            return Ok(Some(out.join(file)));
        }
    }
    Ok(None)
}

fn print_report(name: &str, report: &StageReport) {
    let first = report.train_losses.first().copied().unwrap_or(f64::NAN);
    let last = report.train_losses.last().copied().unwrap_or(f64::NAN);
    println!("{name}: steps {}..{}, training loss {first:.4} -> {last:.4}", report.first_step, report.first_step + report.train_losses.len() as u64);
    for (step, val) in &report.val_losses {
        println!("  validation loss at step {step}: {val:.4}");
    }
    let (step, val) = report.selected;
    println!("  final parameters: step {step} (validation loss {val:.4})");
}
