//! `sgdm eval`: retrieval and reconstruction metrics with a shuffled control; see [`sgdm::evaluate`].

use std::path::PathBuf;

use anyhow::{Context, Result};
use sgdm::evaluate::{evaluate, format_indices, format_table, read_run, EvalConfig};
use sgdm::pipeline::Pipeline;
use sgdm::runtime::select;
use sgdm::DeviceSpec;

#[derive(clap::Args)]
pub struct Args {
    /// A folder written by `sgdm reconstruct`; repeat it for runs with other seeds (the metrics are
    /// averaged over them).
    #[arg(long, value_name = "DIR", required = true)]
    recon: Vec<PathBuf>,
    /// Where to write metrics.json and sheet.png (created if absent).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// The EEG file [default: the one the reconstruction's run.json names].
    #[arg(long, value_name = "FILE")]
    eeg: Option<PathBuf>,
    /// The seen images: a folder in file-name order, or a THINGS image folder (one folder per concept) in
    /// THINGS order [default: the manifest's `seen` paths].
    #[arg(long, value_name = "DIR")]
    images: Option<PathBuf>,
    /// Weights folder for the embeddings [default: the one the reconstruction's run.json names].
    #[arg(long, value_name = "DIR")]
    weights: Option<PathBuf>,
    /// Items on the contact sheet (the first ones, in index order).
    #[arg(long, default_value_t = 24, value_name = "N")]
    sheet_items: usize,
    /// Items per sheet row (each: seen | structure from EEG | reconstruction).
    #[arg(long, default_value_t = 4, value_name = "N")]
    sheet_columns: usize,
    /// Seed of the shuffled control's permutation.
    #[arg(long, default_value_t = 0)]
    control_seed: u64,
    /// Score the first N items of the EEG file (a run made with --limit N) [default: every item].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    items: Option<u64>,
    /// Score the items that are finished even when others are missing (they are printed and listed in
    /// metrics.json as "missing"); without it an incomplete folder is refused.
    #[arg(long)]
    allow_incomplete: bool,
}

pub fn run(spec: DeviceSpec, args: &Args) -> Result<()> {
    let selected = select(spec)?;
    if let Some(n) = &selected.notice {
        eprintln!("{n}");
    }
    let weights = match &args.weights {
        Some(w) => w.clone(),
        None => {
            let run = read_run(&args.recon[0]).context("give --weights, or a reconstruction folder")?;
            PathBuf::from(run["weights"].as_str().with_context(|| format!("{}: no 'weights'", args.recon[0].join("run.json").display()))?)
        }
    };
    let pipeline = Pipeline::open(&weights, &selected.device, super::reconstruct::dtype_for(&selected.device))?;
    let cfg = EvalConfig {
        recon: args.recon.clone(),
        eeg: args.eeg.clone(),
        images: args.images.clone(),
        out: args.out.clone(),
        sheet_items: args.sheet_items,
        sheet_columns: args.sheet_columns,
        control_seed: args.control_seed,
        expected_items: args.items.map(|n| n as usize),
        allow_incomplete: args.allow_incomplete,
    };
    let metrics = evaluate(&pipeline, &cfg)?;
    if let Some(missing) = metrics["missing"].as_array().filter(|m| !m.is_empty()) {
        let missing: Vec<usize> = missing.iter().filter_map(|v| v.as_u64().map(|i| i as usize)).collect();
        eprintln!("sgdm: warning: scored {} items; {} not reconstructed (missing: {})", metrics["items"], missing.len(), format_indices(&missing));
    }
    print!("{}", format_table(&metrics));
    println!("wrote {} and {}", args.out.join("metrics.json").display(), args.out.join("sheet.png").display());
    Ok(())
}
