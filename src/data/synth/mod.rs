//! The simulated default dataset (`sgdm synth`): tangram figures as stimuli, a simulated observer's
//! posterior EEG to them, written in the layout a real user's data takes (EEG `.npy`, PNG images and
//! structure maps, `manifest.json`). Everything is a pure function of the seed. docs/synth.md describes
//! the generative model. One item at a time: `Figure::random(..).render()` draws and renders a figure,
//! `Brain::evoked` and `Brain::simulate_trial` turn it into EEG.

pub mod eeg_sim;
pub mod tangram;

use std::collections::HashSet;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use image::{GrayImage, RgbImage};
use rayon::prelude::*;

pub use crate::data::dataset::{Manifest, SplitManifest};
use crate::data::image::{save_png_gray, save_png_rgb};
use crate::data::npy::write_f32;
use crate::util::write_atomic;
use eeg_sim::{Brain, CHANNELS, SAMPLES, SAMPLING_RATE_HZ};
use tangram::{Figure, Rendering, EDGE_SIZE, IMAGE_SIZE};

/// Bumped whenever the same seed would produce different bytes.
pub const GENERATOR_VERSION: u32 = 1;

/// A small, fast, seedable generator (SplitMix64). Hand-written rather than `rand`'s `StdRng` because the
/// dataset's bytes must stay fixed for a given seed and generator version, and `rand` does not promise its
/// streams across releases.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
    spare_normal: Option<f64>,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed, spare_normal: None }
    }

    /// An independent stream for one item (figure, trial, ...) addressed by `path`, so items can be
    /// generated in any order, in parallel, with identical results.
    pub fn stream(seed: u64, path: &[u64]) -> Rng {
        let mut r = Rng::new(seed);
        for &p in path {
            r.state = r.next_u64() ^ p.wrapping_mul(0xD6E8_FEB8_6659_FD93);
        }
        Rng::new(r.next_u64())
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal (Marsaglia's polar method, both values used: no trigonometry, which matters as
    /// the background EEG draws about ten thousand of these per trial).
    pub fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare_normal.take() {
            return z;
        }
        loop {
            let (u, v) = (2.0 * self.uniform() - 1.0, 2.0 * self.uniform() - 1.0);
            let s = u * u + v * v;
            if s > 0.0 && s < 1.0 {
                let f = (-2.0 * s.ln() / s).sqrt();
                self.spare_normal = Some(v * f);
                return u * f;
            }
        }
    }

    /// Standard Gumbel.
    pub fn gumbel(&mut self) -> f64 {
        -(-(1.0 - self.uniform()).ln()).ln()
    }

    /// Uniform in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        ((self.uniform() * n as f64) as usize).min(n - 1)
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

/// How many distinct figures a split has and how often each is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitSize {
    pub figures: usize,
    pub repetitions: usize,
}

/// What `generate` makes.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthConfig {
    pub seed: u64,
    /// Gain of every stimulus-locked part of the EEG relative to its nominal (physiological) amplitude;
    /// 0 leaves only background EEG.
    pub snr: f64,
    pub train: SplitSize,
    pub val: SplitSize,
    pub test: SplitSize,
    /// Replace the dataset in a non-empty output folder.
    pub force: bool,
}

impl Default for SynthConfig {
    /// THINGS-EEG2's repetition scheme (4 per training image, 80 per test image) at a size that generates
    /// in well under a minute on two cores.
    fn default() -> SynthConfig {
        SynthConfig {
            seed: 0,
            snr: 1.0,
            train: SplitSize { figures: 1000, repetitions: 4 },
            val: SplitSize { figures: 100, repetitions: 4 },
            test: SplitSize { figures: 200, repetitions: 80 },
            force: false,
        }
    }
}

impl SynthConfig {
    /// The splits in order: (name, size).
    pub fn splits(&self) -> [(&'static str, SplitSize); 3] {
        [("train", self.train), ("val", self.val), ("test", self.test)]
    }
}

/// Progress of a running `generate`: figures of `split` done out of `total`, reported at the start of each
/// split (`done` 0) and after each batch.
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    pub split: &'a str,
    pub done: usize,
    pub total: usize,
}

/// Generation threads per core (see `generate` for why more than one).
const IO_WORKERS_PER_CORE: usize = 4;
/// The most figures, and trials (figures x repetitions), a split may have. THINGS-EEG2's training set has
/// 16540 images and 66160 trials.
pub const MAX_FIGURES: usize = 100_000;
pub const MAX_TRIALS: usize = 1_000_000;
/// Figures generated per parallel batch (and per progress report).
const BATCH: usize = 50;

/// Draws distinct figures (distinct up to rotation, mirroring and translation) and deals them to the
/// splits in order, so no figure appears in two splits.
pub fn split_figures(cfg: &SynthConfig) -> Vec<Vec<Figure>> {
    let wanted: usize = cfg.splits().iter().map(|(_, s)| s.figures).sum();
    let mut seen = HashSet::new();
    let mut unique = Vec::with_capacity(wanted);
    let mut next = 0u64;
    while unique.len() < wanted {
        let batch: Vec<(Figure, Vec<(i32, i32)>)> = (next..next + BATCH as u64)
            .into_par_iter()
            .map(|k| {
                let f = Figure::random(&mut Rng::stream(cfg.seed, &[0, k]));
                let key = f.canonical_key();
                (f, key)
            })
            .collect();
        next += BATCH as u64;
        for (f, key) in batch {
            if unique.len() < wanted && seen.insert(key) {
                unique.push(f);
            }
        }
    }
    let mut rest = unique.into_iter();
    cfg.splits().iter().map(|(_, s)| rest.by_ref().take(s.figures).collect()).collect()
}

/// Generates the dataset into `out` and returns its manifest, written last (a folder without
/// `manifest.json` holds an unfinished run). Refuses a non-empty `out` unless `cfg.force`.
pub fn generate(cfg: &SynthConfig, out: &Path, progress: &mut dyn FnMut(Progress)) -> Result<Manifest> {
    let p = out.display();
    ensure!(cfg.snr.is_finite() && cfg.snr >= 0.0, "{p}: --snr must be a finite number >= 0 (got {})", cfg.snr);
    for (name, s) in cfg.splits() {
        ensure!(s.figures > 0 && s.repetitions > 0, "{p}: split {name} needs at least one figure and one repetition");
        // A split's EEG is built in memory: the bounds keep a typo from aborting on a failed allocation.
        ensure!(
            s.figures <= MAX_FIGURES && s.figures.saturating_mul(s.repetitions) <= MAX_TRIALS,
            "{p}: split {name} of {} figures x {} repetitions is over the limits ({MAX_FIGURES} figures, {MAX_TRIALS} trials a split: \
             {:.1} GB of EEG in memory)",
            s.figures,
            s.repetitions,
            (MAX_TRIALS * CHANNELS.len() * SAMPLES * 4) as f64 / 1e9
        );
    }
    prepare_output(out, cfg.force)?;

    // Each PNG is flushed to disk before its rename (atomic writes), so most of a worker's time is spent
    // waiting on the disk: more workers than cores overlap those waits.
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(IO_WORKERS_PER_CORE * cores)
        .build()
        .with_context(|| format!("{p}: cannot start worker threads"))?;
    let brain = Brain::shared();
    let figures = split_figures(cfg);
    let mut splits = Vec::new();
    for (split_index, ((name, size), figs)) in cfg.splits().into_iter().zip(&figures).enumerate() {
        for sub in ["images", "structure"] {
            let dir = out.join(sub).join(name);
            std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
        }
        let trial_len = CHANNELS.len() * SAMPLES;
        let mut eeg = Vec::with_capacity(figs.len() * size.repetitions * trial_len);
        let mut edges16 = Vec::with_capacity(figs.len() * EDGE_SIZE * EDGE_SIZE);
        let (mut images, mut structure) = (Vec::new(), Vec::new());
        // Reported before the first batch too, so a progress line's rate counts from the split's start.
        progress(Progress { split: name, done: 0, total: figs.len() });
        for start in (0..figs.len()).step_by(BATCH) {
            let end = (start + BATCH).min(figs.len());
            let done: Vec<(Vec<f32>, Vec<f32>)> = pool.install(|| {
                (start..end)
                    .into_par_iter()
                    .map(|i| {
                        let rendering = figs[i].render();
                        write_pngs(out, name, i, &rendering)?;
                        let evoked = brain.evoked(&rendering);
                        let mut trials = Vec::with_capacity(size.repetitions * trial_len);
                        for rep in 0..size.repetitions {
                            let mut rng = Rng::stream(cfg.seed, &[1, split_index as u64, i as u64, rep as u64]);
                            trials.extend(brain.simulate_trial(&evoked, cfg.snr, &mut rng));
                        }
                        Ok((trials, rendering.edges16))
                    })
                    .collect::<Result<_>>()
            })?;
            for (i, (trials, e16)) in (start..end).zip(done) {
                eeg.extend(trials);
                edges16.extend(e16);
                images.push(format!("images/{name}/{i:05}.png"));
                structure.push(format!("structure/{name}/{i:05}.png"));
            }
            progress(Progress { split: name, done: end, total: figs.len() });
        }
        let eeg_shape = vec![figs.len(), size.repetitions, CHANNELS.len(), SAMPLES];
        let eeg_path = format!("eeg/{name}.npy");
        let edges_path = format!("edges16/{name}.npy");
        write_f32(out.join(&eeg_path), &eeg_shape, &eeg)?;
        write_f32(out.join(&edges_path), &[figs.len(), EDGE_SIZE, EDGE_SIZE], &edges16)?;
        splits.push(SplitManifest {
            name: name.into(),
            figures: figs.len(),
            repetitions: size.repetitions,
            eeg: eeg_path,
            eeg_shape,
            edges16: edges_path,
            images,
            structure,
            concepts: Vec::new(),
        });
    }

    let manifest = Manifest {
        generator: "sgdm synth".into(),
        generator_version: GENERATOR_VERSION,
        sgdm_version: env!("CARGO_PKG_VERSION").into(),
        seed: cfg.seed,
        snr: Some(cfg.snr),
        ch_names: CHANNELS.iter().map(|c| c.to_string()).collect(),
        sampling_rate_hz: SAMPLING_RATE_HZ,
        times: eeg_sim::times(),
        eeg_units: "microvolts".into(),
        image_size: IMAGE_SIZE,
        edge_size: EDGE_SIZE,
        splits,
        sources: Vec::new(),
    };
    let path = out.join("manifest.json");
    let json = serde_json::to_string_pretty(&manifest).context("serialising the manifest")?;
    write_atomic(&path, json.as_bytes()).with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(manifest)
}

/// Makes `out` ready: created if absent; if it holds anything, refused unless `force`, in which case
/// only the files and folders this generator writes are removed (manifest first, so an interrupted
/// replacement never looks finished).
fn prepare_output(out: &Path, force: bool) -> Result<()> {
    let p = out.display();
    if out.exists() {
        ensure!(out.is_dir(), "{p}: exists and is not a folder");
        let non_empty = std::fs::read_dir(out).with_context(|| format!("{p}: cannot list"))?.next().is_some();
        if non_empty && !force {
            bail!("{p}: is not empty; pass --force to replace the synthetic dataset in it");
        }
        crate::data::dataset::remove_dataset_outputs(out)?;
    }
    for sub in ["eeg", "edges16"] {
        let dir = out.join(sub);
        std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    }
    Ok(())
}

fn write_pngs(out: &Path, split: &str, index: usize, r: &Rendering) -> Result<()> {
    let n = IMAGE_SIZE as u32;
    let grey = GrayImage::from_raw(n, n, r.image_u8()).expect("image buffer matches its size");
    let rgb: RgbImage = image::DynamicImage::ImageLuma8(grey).to_rgb8();
    save_png_rgb(out.join(format!("images/{split}/{index:05}.png")), &rgb)?;
    let edges = GrayImage::from_raw(n, n, r.structure_u8()).expect("structure buffer matches its size");
    save_png_gray(out.join(format!("structure/{split}/{index:05}.png")), &edges)
}
