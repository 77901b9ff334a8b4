//! `sgdm train <stage>`: run one training stage, or all of them in order, from a TOML configuration; the
//! first Ctrl-C stops the running stage at the end of its step with a checkpoint.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, ensure, Context, Result};
use sgdm::memory::arena::human_bytes;
use sgdm::runtime::select;
use sgdm::train::config::{Stage as TableStage, TrainingConfig};
use sgdm::train::stages::{check_pretrained_base, train_base, train_controlnet, train_encoder, train_vae, StageReport, Stopped};
use sgdm::util::remove_stale_temporaries;
use sgdm::weights::COMPONENT_WEIGHT_FILES;
use sgdm::{Device, DeviceSpec};

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Stage {
    /// A small AutoencoderKL and UNet from scratch, or with `[base] pretrained = "DIR"` a check that DIR (a
    /// diffusers Stable Diffusion folder) serves as the base.
    Base,
    /// Stage 1: the StructuralVAE (reconstruction, beta-weighted KL, structure map).
    Vae,
    /// Stage 2: the EEG encoder, InfoNCE against the frozen StructuralVAE's mu.
    Encoder,
    /// Stage 3: the ControlNet and the EEG-to-token projector, epsilon loss through the frozen UNet.
    Controlnet,
    /// base (when the configuration has a [base] table; with `[base] pretrained = "DIR"` only checked), vae,
    /// encoder and controlnet in order, all in --out; a stage whose final output is in --out already is
    /// skipped, an interrupted one resumes.
    All,
}

impl Stage {
    /// The configuration table the stage reads; `None` for `all`, which reads every table.
    fn table(self) -> Option<TableStage> {
        match self {
            Stage::Base => Some(TableStage::Base),
            Stage::Vae => Some(TableStage::Vae),
            Stage::Encoder => Some(TableStage::Encoder),
            Stage::Controlnet => Some(TableStage::Controlnet),
            Stage::All => None,
        }
    }
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
    let Some(stage) = args.stage.table() else {
        ensure!(args.resume.is_none(), "sgdm train all takes no --resume: rerun it with the same --out to continue");
        let config = TrainingConfig::all(&args.config, &text, &args.out)?;
        install_stop_handler()?;
        return run_all(args, &config, device).map_err(|e| match e.downcast_ref::<Stopped>() {
            Some(_) => e.context(format!("to continue, rerun: sgdm train all --config {} --out {}", args.config.display(), args.out.display())),
            None => e,
        });
    };
    let config = TrainingConfig::stage(&args.config, &text, stage)?;
    install_stop_handler()?;
    run_stage(stage, &config, &args.config, &args.out, args.resume.as_deref(), device).map_err(|e| match e.downcast_ref::<Stopped>() {
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

fn run_stage(stage: TableStage, config: &TrainingConfig, path: &Path, out: &Path, resume: Option<&Path>, device: &Device) -> Result<()> {
    let missing = |table: &str| format!("{}: no [{table}] table for this stage", path.display());
    let stop = &STOP;
    clean_output(out)?;
    if let (TableStage::Base, Some(dir)) = (stage, &config.pretrained_base) {
        println!("base: pretrained {}, checked; nothing to train", check_pretrained_base(dir)?);
        return Ok(());
    }
    let reports: Vec<(&str, StageReport)> = match stage {
        TableStage::Base => {
            let r = train_base(config.base.as_ref().with_context(|| missing("base"))?, out, resume, stop, device)?;
            r.vae.map(|v| ("base_vae", v)).into_iter().chain([("base_unet", r.unet)]).collect()
        }
        TableStage::Vae => vec![("vae", train_vae(config.vae.as_ref().with_context(|| missing("vae"))?, out, resume, stop, device)?)],
        TableStage::Encoder => {
            vec![("encoder", train_encoder(config.encoder.as_ref().with_context(|| missing("encoder"))?, out, resume, stop, device)?)]
        }
        TableStage::Controlnet => {
            vec![("controlnet", train_controlnet(config.controlnet.as_ref().with_context(|| missing("controlnet"))?, out, resume, stop, device)?)]
        }
    };
    for (name, report) in &reports {
        print_report(name, report);
        println!("wrote {}", out.join(format!("{name}.safetensors")).display());
    }
    Ok(())
}

/// Removes what killed runs left half-written in the output folder and its component folders.
fn clean_output(out: &Path) -> Result<()> {
    for dir in [out.to_path_buf(), out.join("vae"), out.join("unet"), out.join("controlnet")] {
        remove_stale_temporaries(&dir).with_context(|| format!("{}: cannot remove the temporary files of a killed run", dir.display()))?;
    }
    Ok(())
}

fn run_all(args: &Args, config: &TrainingConfig, device: &Device) -> Result<()> {
    let has_base = config.base.is_some() || config.pretrained_base.is_some();
    for stage in TableStage::ALL.into_iter().filter(|s| has_base || *s != TableStage::Base) {
        let name = stage.table();
        if let (TableStage::Base, Some(dir)) = (stage, &config.pretrained_base) {
            println!("base: pretrained {}, checked; not trained", check_pretrained_base(dir)?);
            continue;
        }
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
        run_stage(stage, config, &args.config, &args.out, resume.as_deref(), device)?;
    }
    Ok(())
}

/// The file a stage writes last, relative to the output folder.
fn final_output(stage: TableStage) -> PathBuf {
    match stage {
        TableStage::Base => Path::new("unet").join(COMPONENT_WEIGHT_FILES[0]),
        TableStage::Vae => "vae.safetensors".into(),
        TableStage::Encoder => "encoder.safetensors".into(),
        TableStage::Controlnet => "eeg_projector.safetensors".into(),
    }
}

/// The stage's checkpoint with the highest step in `out` (for base, a base_unet one before any base_vae one).
fn latest_checkpoint(out: &Path, stage: TableStage) -> Result<Option<PathBuf>> {
    let loops: &[&str] = match stage {
        TableStage::Base => &["base_unet", "base_vae"],
        TableStage::Vae => &["vae"],
        TableStage::Encoder => &["encoder"],
        TableStage::Controlnet => &["controlnet"],
    };
    let names: Vec<String> = match std::fs::read_dir(out) {
        Ok(entries) => entries
            .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("{}: cannot list", out.display()))?,
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
    let m = &report.memory;
    let overflow = if m.overflowed > 0 { format!(", {} tensors outside it", m.overflowed) } else { String::new() };
    println!(
        "  memory: gradients and optimizer state {}; per-step pool {} (peak {}){overflow}",
        human_bytes(m.arena.total_capacity()),
        human_bytes(m.step_pool),
        human_bytes(m.step_peak)
    );
}
