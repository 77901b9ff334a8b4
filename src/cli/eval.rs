//! `sgdm eval`: retrieval, structure and reconstruction metrics with a shuffled control, the linear floor,
//! and the structure ablation; see [`sgdm::evaluate`].

use std::path::PathBuf;

use anyhow::{Context, Result};
use sgdm::evaluate::ablation::AblationConfig;
use sgdm::evaluate::{evaluate, format_indices, format_table, EvalConfig};
use sgdm::pipeline::Pipeline;
use sgdm::reconstruct::read_run;
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
    /// Items per sheet row (each: seen | true structure | structure from EEG | reconstruction, and with
    /// --ablation | reconstruction without structure).
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
    #[command(flatten)]
    ablation: AblationArgs,
}

/// The ablation flags shared by `eval` and `demo`.
#[derive(clap::Args, Clone)]
pub struct AblationArgs {
    /// Also run the ablation: the same EEG and seeds reconstructed with the structure map from EEG, without
    /// structure (ControlNet off) and with the true structure maps, into OUT/ablation/, scored by PixCorr,
    /// SSIM, 2-way identification and N-way pixel matching (mean and spread over the seeds).
    #[arg(long)]
    pub ablation: bool,
    /// The ablation's items: the first N evaluated items [default: all].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(2..))]
    pub ablation_items: Option<u64>,
    /// The ablation's seeds, comma-separated (at least 2: the spread is over them).
    #[arg(long, value_name = "S,S,...", value_delimiter = ',', default_value = "0,1,2")]
    pub ablation_seeds: Vec<u64>,
    /// Items the ablation denoises together.
    #[arg(long, value_name = "B", default_value_t = 16)]
    pub ablation_batch: usize,
}

impl AblationArgs {
    pub fn config(&self, items_default: Option<u64>) -> Result<AblationConfig> {
        anyhow::ensure!(
            self.ablation_seeds.len() >= 2,
            "--ablation-seeds {:?}: give at least 2 seeds (the spread is over them)",
            self.ablation_seeds
        );
        anyhow::ensure!(self.ablation_batch >= 1, "--ablation-batch must be at least 1");
        let mut unique = self.ablation_seeds.clone();
        unique.sort_unstable();
        unique.dedup();
        anyhow::ensure!(unique.len() == self.ablation_seeds.len(), "--ablation-seeds {:?}: a seed is repeated", self.ablation_seeds);
        Ok(AblationConfig {
            items: self.ablation_items.or(items_default).map(|n| n as usize),
            seeds: self.ablation_seeds.clone(),
            batch: self.ablation_batch,
        })
    }
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
        ablation: if args.ablation.ablation { Some(args.ablation.config(None)?) } else { None },
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
