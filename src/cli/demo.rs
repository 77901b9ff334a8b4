//! `sgdm demo`: the whole job on the shipped default model, from nothing: synthesise `sgdm synth`'s default
//! dataset, reconstruct its test split, evaluate against the shuffled control, and write the sheet and the
//! metrics. A rerun reuses the dataset and the finished reconstructions; reconstructions made with other
//! sampling settings or weights are started over, not refused (the demo's folder is its own).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use sgdm::data::synth::{generate, Manifest, SynthConfig, GENERATOR_VERSION};
use sgdm::evaluate::ablation::AblationConfig;
use sgdm::evaluate::{evaluate, format_table, EvalConfig};
use sgdm::pipeline::Pipeline;
use sgdm::reconstruct::{clear_output, other_settings, reconstruct, run_settings, ReconstructConfig, Shard};
use sgdm::runtime::select;
use sgdm::util::ItemProgress;
use sgdm::DeviceSpec;

use super::reconstruct::{dtype_for, print_summary, weights_folder, Sampling};

#[derive(clap::Args)]
pub struct Args {
    /// Output folder: data/ (the synthetic dataset), recon/, metrics.json, sheet.png.
    #[arg(long, value_name = "DIR", default_value = "out/demo")]
    out: PathBuf,
    /// Weights folder [default: $SGDM_WEIGHTS, else weights/ beside the executable, else the model built
    /// into this binary].
    #[arg(long, value_name = "DIR")]
    weights: Option<PathBuf>,
    /// Reconstruct only the first N of the 200 test figures (N >= 1).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    items: Option<u64>,
    #[command(flatten)]
    sampling: Sampling,
    /// The ablation's items (the first N test figures: each is reconstructed 8 more times, so the demo stays
    /// within minutes on 2 cores; `sgdm eval --ablation` runs all of them).
    #[arg(long, value_name = "N", default_value_t = DEMO_ABLATION_ITEMS, value_parser = clap::value_parser!(u64).range(2..))]
    ablation_items: u64,
}

/// The demo's ablation subset: the 24 figures its contact sheet shows.
pub const DEMO_ABLATION_ITEMS: u64 = 24;

/// Whether `dir` holds `sgdm synth`'s default dataset from this generator version.
fn has_default_dataset(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("manifest.json")) else { return false };
    let Ok(m) = serde_json::from_str::<Manifest>(&text) else { return false };
    let d = SynthConfig::default();
    let sizes: Vec<(usize, usize)> = m.splits.iter().map(|s| (s.figures, s.repetitions)).collect();
    m.generator_version == GENERATOR_VERSION
        && m.seed == d.seed
        && m.snr == Some(d.snr)
        && sizes == [(d.train.figures, d.train.repetitions), (d.val.figures, d.val.repetitions), (d.test.figures, d.test.repetitions)]
}

pub fn run(spec: DeviceSpec, args: &Args) -> Result<()> {
    let start = Instant::now();
    // Before anything is written (the dataset, or the restart of reconstructions made with other settings).
    args.sampling.options().validate()?;
    anyhow::ensure!(args.sampling.batch >= 1, "--batch must be at least 1");
    let selected = select(spec)?;
    if let Some(n) = &selected.notice {
        eprintln!("{n}");
    }
    // The model first: a broken weights folder is refused before minutes of dataset synthesis.
    let weights = weights_folder(args.weights.as_deref())?;
    let pipeline = Pipeline::open(&weights, &selected.device, dtype_for(&selected.device))
        .with_context(|| format!("{}: cannot load the model", weights.display()))?;
    let data = args.out.join("data");
    if has_default_dataset(&data) {
        println!("1/3 dataset: reusing {}", data.display());
    } else {
        println!("1/3 dataset: sgdm synth's default set (seed 0) into {}", data.display());
        let cfg = SynthConfig { force: true, ..SynthConfig::default() };
        generate(&cfg, &data, &mut super::synth::split_progress())?;
    }

    let recon = args.out.join("recon");
    println!("2/3 reconstruct: the test split's EEG (averaged over its 80 repetitions) with {}", weights.display());
    let cfg = ReconstructConfig {
        eeg: data.join("eeg/test.npy"),
        images: Some(data.join("images/test")),
        out: recon.clone(),
        sampling: args.sampling.options(),
        batch: args.sampling.batch,
        shard: Shard::default(),
        limit: args.items.map(|n| n as usize),
        structure_maps: None,
    };
    if let Some(changed) = other_settings(&cfg, &run_settings(&cfg, &pipeline)?)? {
        println!("  {} was made with other settings ({}): starting the reconstructions over", recon.display(), changed.join("; "));
        clear_output(&recon)?;
    }
    let mut bar = ItemProgress::new("reconstruct", "images");
    let summary = reconstruct(&pipeline, &cfg, &mut |done, total| bar.update(done, total))?;
    print_summary(&summary, args.sampling.steps);

    // The reconstruction's seed is the ablation's first, so its images serve the ablation too.
    let seed = args.sampling.seed;
    let seeds = vec![seed, seed.wrapping_add(1), seed.wrapping_add(2)];
    let ablation =
        AblationConfig { items: Some((args.ablation_items as usize).min(cfg.limit.unwrap_or(usize::MAX))), seeds, batch: args.sampling.batch };
    println!(
        "3/3 evaluate: retrieval, structure maps, the ridge floor, PixCorr, SSIM, 2-way identification, the shuffled control, and the ablation \
         (the first {} figures, seeds {:?}: structure from EEG, no structure, true structure)",
        ablation.items.unwrap_or_default(),
        ablation.seeds
    );
    let eval = EvalConfig {
        recon: vec![recon],
        eeg: None,
        images: None,
        out: args.out.clone(),
        sheet_items: 24,
        sheet_columns: 4,
        control_seed: 0,
        expected_items: cfg.limit,
        allow_incomplete: false,
        ablation: Some(ablation),
    };
    let metrics = evaluate(&pipeline, &eval)?;
    print!("{}", format_table(&metrics));
    println!("sheet (seen | true structure | structure from EEG | reconstruction | without structure): {}", args.out.join("sheet.png").display());
    println!("metrics: {}", args.out.join("metrics.json").display());
    println!("demo finished in {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}
