//! `sgdm synth`: write the simulated visual-EEG dataset to a folder.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use sgdm::data::synth::{generate, Progress, SplitSize, SynthConfig};
use sgdm::util::ItemProgress;

#[derive(clap::Args)]
pub struct Args {
    /// Folder to write the dataset to (created if absent).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Seed: the same seed (and sgdm version) gives the same bytes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Gain of the stimulus-locked EEG relative to its nominal amplitude; 0 leaves background EEG only.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    snr: f64,
    /// Distinct training figures (each split: at most 100000 figures and 1000000 trials).
    #[arg(long, default_value_t = 1000, value_name = "N")]
    train_figures: usize,
    /// Repetitions (trials) per training figure.
    #[arg(long, default_value_t = 4, value_name = "N")]
    train_reps: usize,
    /// Distinct validation figures.
    #[arg(long, default_value_t = 100, value_name = "N")]
    val_figures: usize,
    /// Repetitions per validation figure.
    #[arg(long, default_value_t = 4, value_name = "N")]
    val_reps: usize,
    /// Distinct test figures (none shared with train or val).
    #[arg(long, default_value_t = 200, value_name = "N")]
    test_figures: usize,
    /// Repetitions per test figure (THINGS-EEG2 averages 80 at test).
    #[arg(long, default_value_t = 80, value_name = "N")]
    test_reps: usize,
    /// Replace the dataset in a non-empty DIR (only what synth writes there is removed).
    #[arg(long)]
    force: bool,
}

pub fn run(args: &Args) -> Result<()> {
    let cfg = SynthConfig {
        seed: args.seed,
        snr: args.snr,
        train: SplitSize { figures: args.train_figures, repetitions: args.train_reps },
        val: SplitSize { figures: args.val_figures, repetitions: args.val_reps },
        test: SplitSize { figures: args.test_figures, repetitions: args.test_reps },
        force: args.force,
    };
    let start = Instant::now();
    let manifest = generate(&cfg, &args.out, &mut split_progress())?;
    let trials: usize = manifest.splits.iter().map(|s| s.figures * s.repetitions).sum();
    println!(
        "wrote {} figures, {trials} trials ({} channels x {} samples at {} Hz) to {} in {:.1} s",
        manifest.splits.iter().map(|s| s.figures).sum::<usize>(),
        manifest.ch_names.len(),
        manifest.times.len(),
        manifest.sampling_rate_hz,
        args.out.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `generate`'s progress as one progress line per split.
pub fn split_progress() -> impl FnMut(Progress) {
    let mut bar: Option<(String, ItemProgress)> = None;
    move |p| {
        if bar.as_ref().is_none_or(|(split, _)| split != p.split) {
            bar = Some((p.split.to_string(), ItemProgress::new(p.split, "figures")));
        }
        if let Some((_, b)) = bar.as_mut() {
            b.update(p.done, p.total);
        }
    }
}
