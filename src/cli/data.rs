//! `sgdm data`: look inside EEG files before training on them.

use std::path::{Path, PathBuf};

use anyhow::Result;
use sgdm::data::eeg::EegData;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Print an EEG file's format, shape, dtype, channels, sampling rate, time range, non-finite count and
    /// per-channel mean and standard deviation.
    #[command(after_help = "Examples:\n  sgdm data inspect preprocessed_eeg_training.npy     THINGS-EEG2 official file\n  \
                            sgdm data inspect sub-01/preprocessed_eeg_test.npy   NICE/ATM pickle\n  \
                            sgdm data inspect eeg.npy                           plain [N, C, T] or [N, R, C, T] array")]
    Inspect {
        /// The EEG file (.npy array, np.save of a dict, or pickle.dump of a dict).
        file: PathBuf,
    },
}

pub fn run(command: &Command) -> Result<()> {
    match command {
        Command::Inspect { file } => inspect(file),
    }
}

fn inspect(file: &Path) -> Result<()> {
    let eeg = EegData::open_unchecked(file)?;
    let [n, r, c, t] = eeg.shape;
    println!("file           {}", eeg.path.display());
    println!("format         {}", eeg.format);
    println!("shape          [{n}, {r}, {c}, {t}] (rows, repetitions, channels, time)");
    println!("dtype          {}", eeg.source_dtype);
    match &eeg.ch_names {
        Some(names) => println!("channels       {c}: {}", names.join(", ")),
        None => println!("channels       {c} (names not stored)"),
    }
    match eeg.sfreq() {
        Some(hz) => println!("sampling rate  {hz} Hz"),
        None => println!("sampling rate  unknown (no times stored)"),
    }
    match eeg.time_range() {
        Some((a, b)) => println!("time range     {a:.3} .. {b:.3} s"),
        None => println!("time range     unknown (no times stored)"),
    }
    match eeg.non_finite() {
        None => println!("non-finite     0"),
        Some(nf) => println!("non-finite     {} (NaN or Inf; first at [row, repetition, channel, t] = {:?})", nf.count, nf.first),
    }
    println!("{:<14} {:>14} {:>14}", "channel", "mean", "std");
    // Sums over finite values only, in f64: a full THINGS-EEG2 channel is 6.6 million samples.
    let mut sums = vec![(0f64, 0f64, 0usize); c];
    for (i, v) in eeg.data.iter().enumerate().filter(|(_, v)| v.is_finite()) {
        let s = &mut sums[i / t % c];
        *s = (s.0 + *v as f64, s.1 + (*v as f64).powi(2), s.2 + 1);
    }
    for (ch, (sum, sq, count)) in sums.into_iter().enumerate() {
        let name = eeg.ch_names.as_ref().map_or_else(|| ch.to_string(), |n| n[ch].clone());
        let mean = sum / count.max(1) as f64;
        let std = (sq / count.max(1) as f64 - mean * mean).max(0.0).sqrt();
        println!("{name:<14} {mean:>14.6} {std:>14.6}");
    }
    Ok(())
}
