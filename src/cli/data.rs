//! `sgdm data`: look inside EEG files before training on them, and import real datasets into the layout
//! `sgdm train` reads.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use sgdm::data::eeg::EegData;
use sgdm::data::things_eeg2::{import, ImportConfig, ImportProgress, DEFAULT_IMAGE_SIZE};
use sgdm::util::ItemProgress;

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
    /// Import a real dataset into the layout `sgdm train` reads (manifest, EEG per split, images, structure
    /// targets).
    #[command(subcommand)]
    Import(Import),
}

#[derive(clap::Subcommand)]
pub enum Import {
    /// THINGS-EEG2: the preprocessed EEG of one or more subjects and the image set, in THINGS order (concept
    /// folders sorted, images sorted within each), split into train, val (whole training concepts, seeded)
    /// and test (the test concepts).
    #[command(
        name = "things-eeg2",
        after_help = "Examples:\n  \
                      sgdm data import things-eeg2 --eeg-dir osf/preprocessed/sub-01 --images-dir osf/image_set --out data/things-sub01\n  \
                      sgdm data import things-eeg2 --eeg-dir sub-01 --eeg-dir sub-02 --images-dir image_set --out data/things-sub01-02\n  \
                      sgdm data import things-eeg2 --eeg-dir atm/Preprocessed_data_250Hz/sub-08 --images-dir image_set \\\n      \
                      --out data/things-atm-sub08 --val-concepts 200 --seed 1 --image-size 512\n\n\
                      Reads SUBJECT_DIR/preprocessed_eeg_training.npy and preprocessed_eeg_test.npy (the official np.save of a\n\
                      dict, or the NICE/ATM pickle of it) and IMAGES_DIR/training_images/<concept>/<image> and\n\
                      test_images/<concept>/<image> (JPEG or PNG). EEG row i is image i in THINGS order: concept folders\n\
                      sorted by name, images sorted by name within each, the order of the release's image_metadata.npy.\n\
                      Repeating --eeg-dir pools subjects: each row's repetitions are every subject's, in the order given;\n\
                      import subjects separately for one model each.\n\n\
                      Writes OUT/manifest.json (last), OUT/eeg/<split>.npy [images, repetitions, channels, time] f32,\n\
                      OUT/images/<split>/<concept>/<image>.png (at --image-size), OUT/structure/<split>/<concept>/<image>.png\n\
                      and OUT/edges16/<split>.npy [images, 16, 16] (the structure extraction sgdm synth uses).\n\
                      Every check runs before the first write: missing or unreadable files, EEG rows that do not match the\n\
                      images, a concept with another number of images than the rest, duplicate names, NaN or Inf, subjects\n\
                      whose channels or time axes differ. docs/things-eeg2.md goes from the OSF downloads to metrics."
    )]
    ThingsEeg2(ThingsEeg2Args),
}

#[derive(clap::Args)]
pub struct ThingsEeg2Args {
    /// A subject's folder holding preprocessed_eeg_training.npy and preprocessed_eeg_test.npy; repeat it to
    /// pool subjects.
    #[arg(long = "eeg-dir", value_name = "SUBJECT_DIR", required = true)]
    eeg_dirs: Vec<PathBuf>,
    /// The image set: holds training_images/ and test_images/, one folder per concept in each.
    #[arg(long, value_name = "IMAGES_DIR")]
    images_dir: PathBuf,
    /// The dataset folder to write (created if absent).
    #[arg(long, value_name = "DATASET")]
    out: PathBuf,
    /// Training concepts held out, whole, for validation [default: one in 16 of the training concepts, at
    /// least 1].
    #[arg(long, value_name = "N")]
    val_concepts: Option<usize>,
    /// Seeds the choice of the validation concepts.
    #[arg(long, default_value_t = 0, value_name = "S")]
    seed: u64,
    /// Side of the square the images are resized and centre-cropped to (512 for Stable Diffusion).
    #[arg(long, default_value_t = DEFAULT_IMAGE_SIZE, value_name = "PIXELS")]
    image_size: usize,
    /// Replace the dataset in a non-empty DATASET (only what the importer writes there is removed).
    #[arg(long)]
    force: bool,
}

pub fn run(command: &Command) -> Result<()> {
    match command {
        Command::Inspect { file } => inspect(file),
        Command::Import(Import::ThingsEeg2(args)) => import_things_eeg2(args),
    }
}

fn import_things_eeg2(args: &ThingsEeg2Args) -> Result<()> {
    let cfg = ImportConfig {
        eeg_dirs: args.eeg_dirs.clone(),
        images_dir: args.images_dir.clone(),
        out: args.out.clone(),
        val_concepts: args.val_concepts,
        seed: args.seed,
        image_size: args.image_size,
        force: args.force,
    };
    let start = Instant::now();
    let mut bar: Option<(String, ItemProgress)> = None;
    let manifest = import(&cfg, &mut |p: ImportProgress| {
        if bar.as_ref().is_none_or(|(phase, _)| phase != p.phase) {
            bar = Some((p.phase.to_string(), ItemProgress::new(p.phase, p.unit)));
        }
        if let Some((_, b)) = bar.as_mut() {
            b.update(p.done, p.total);
        }
    })?;
    let split = |name: &str| manifest.splits.iter().find(|s| s.name == name).map_or((0, 0), |s| (s.figures, s.repetitions));
    let ((train, train_reps), (val, _), (test, test_reps)) = (split("train"), split("val"), split("test"));
    println!(
        "wrote {train} train, {val} val and {test} test images ({train_reps} repetitions per training image, {test_reps} per test image; \
         {} channels x {} samples at {} Hz) to {} in {:.1} s",
        manifest.ch_names.len(),
        manifest.times.len(),
        manifest.sampling_rate_hz,
        args.out.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
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
