//! The ablation SGDM's claim rests on: the same EEG, seeds and sampling settings reconstructed three ways,
//! so that only the ControlNet's condition differs:
//!
//! - `eeg_structure`: the structure map predicted from the EEG (the model as it runs);
//! - `no_structure`: the ControlNet switched off (`controlnet_scale` 0; the EEG's cross-attention tokens
//!   still condition the UNet), what the diffusion model does without structure guidance;
//! - `true_structure`: the true structure targets of the seen images (an oracle: the most the structure
//!   path can give with these weights).
//!
//! Each condition and seed is an ordinary reconstruction folder (`OUT/ablation/<condition>/seed-<s>/`, made
//! by [`crate::reconstruct::reconstruct`], so a killed evaluation resumes); an `eeg_structure` folder the
//! evaluation was given with the same settings and seed is used instead of reconstructing it again.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Result};
use image::RgbImage;
use serde_json::{json, Value};

use crate::data::image::load_rgb;
use crate::metrics::{correlation_top_k, derangement, recon_metrics, unit, ReconMetrics};
use crate::pipeline::{Pipeline, SamplingOptions};
use crate::reconstruct::{clear_output, finished_items, other_settings, read_run, reconstruct, run_settings, ReconstructConfig, Shard};
use crate::util::ItemProgress;

/// What `--ablation` runs.
#[derive(Debug, Clone, PartialEq)]
pub struct AblationConfig {
    /// The first `items` evaluated items (all of them when `None`).
    pub items: Option<usize>,
    /// Every condition is reconstructed with each of these seeds.
    pub seeds: Vec<u64>,
    /// Items denoised together.
    pub batch: usize,
}

impl Default for AblationConfig {
    fn default() -> AblationConfig {
        AblationConfig { items: None, seeds: vec![0, 1, 2], batch: 16 }
    }
}

/// How the ControlNet is conditioned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    EegStructure,
    NoStructure,
    TrueStructure,
}

impl Condition {
    pub const ALL: [Condition; 3] = [Condition::EegStructure, Condition::NoStructure, Condition::TrueStructure];

    /// The name in `metrics.json` and the folder's.
    pub fn name(self) -> &'static str {
        match self {
            Condition::EegStructure => "eeg_structure",
            Condition::NoStructure => "no_structure",
            Condition::TrueStructure => "true_structure",
        }
    }
}

/// One condition reconstructed with one seed.
#[derive(Debug, Clone)]
pub struct AblationRun {
    pub condition: Condition,
    pub seed: u64,
    pub dir: PathBuf,
}

/// The reconstruction of `condition` with `seed`: the sampling settings of the evaluated folder with that
/// seed, the ControlNet off for `no_structure`, the maps of `true_structure_maps` for `true_structure`.
pub fn reconstruct_config(
    condition: Condition,
    seed: u64,
    eeg: &Path,
    sampling: &SamplingOptions,
    true_structure_maps: &Path,
    items: usize,
    batch: usize,
    out: &Path,
) -> ReconstructConfig {
    let mut sampling = SamplingOptions { seed, ..sampling.clone() };
    if condition == Condition::NoStructure {
        sampling.controlnet_scale = 0.0;
    }
    ReconstructConfig {
        eeg: eeg.to_path_buf(),
        images: None,
        out: out.join(condition.name()).join(format!("seed-{seed}")),
        sampling,
        batch,
        shard: Shard::default(),
        limit: Some(items),
        structure_maps: (condition == Condition::TrueStructure).then(|| true_structure_maps.to_path_buf()),
    }
}

/// Reconstructs (or resumes) every condition with every seed for the first `items` items of `eeg` into
/// `out`; `given` are the evaluated folders, reused for `eeg_structure` where one has the same settings,
/// seed and items. A folder in `out` made with other settings is started over (it is the evaluation's own).
/// Each run's progress is drawn as `reconstruct`'s is.
pub fn run_ablation(
    pipeline: &Pipeline,
    eeg: &Path,
    sampling: &SamplingOptions,
    true_structure_maps: &Path,
    items: usize,
    cfg: &AblationConfig,
    given: &[PathBuf],
    out: &Path,
) -> Result<Vec<AblationRun>> {
    ensure!(cfg.seeds.len() >= 2, "the ablation needs at least 2 seeds to measure a spread, got {:?}", cfg.seeds);
    let mut runs = Vec::new();
    for condition in Condition::ALL {
        for &seed in &cfg.seeds {
            let rc = reconstruct_config(condition, seed, eeg, sampling, true_structure_maps, items, cfg.batch, out);
            let settings = run_settings(&rc, pipeline)?;
            let reused = given.iter().find(|dir| {
                read_run(dir).is_ok_and(|run| run == settings) && finished_items(dir).is_ok_and(|done| (0..items).all(|i| done.contains_key(&i)))
            });
            if let Some(dir) = reused {
                runs.push(AblationRun { condition, seed, dir: dir.clone() });
                continue;
            }
            if other_settings(&rc, &settings)?.is_some() {
                clear_output(&rc.out)?;
            }
            let mut bar = ItemProgress::new(&format!("ablation {} seed {seed}", condition.name()), "images");
            reconstruct(pipeline, &rc, &mut |done, total| bar.update(done, total))?;
            runs.push(AblationRun { condition, seed, dir: rc.out });
        }
    }
    Ok(runs)
}

/// The first `items` reconstructions of a folder.
pub fn load_reconstructions(dir: &Path, items: usize) -> Result<Vec<RgbImage>> {
    let done = finished_items(dir)?;
    (0..items)
        .map(|i| {
            let line = done.get(&i).ok_or_else(|| anyhow::anyhow!("{}: item {i} is not reconstructed", dir.display()))?;
            load_rgb(dir.join(line["image"].as_str().unwrap_or_default()))
        })
        .collect()
}

/// One run's scores: the reconstruction metrics, N-way pixel matching, and the same with the items deranged.
#[derive(Debug, Clone, Copy)]
pub struct RunScores {
    pub metrics: ReconMetrics,
    pub pixel_top1: f64,
    pub pixel_top5: f64,
    pub control: ReconMetrics,
    pub control_pixel_top1: f64,
}

/// Scores reconstructions against `seen` (same order; latents in the StructuralVAE's space, `dim` wide).
pub fn score_run(
    recon: &[RgbImage],
    seen: &[RgbImage],
    recon_latents: &[f32],
    seen_latents: &[f32],
    dim: usize,
    control_seed: u64,
) -> Result<RunScores> {
    let n = recon.len();
    let identity: Vec<usize> = (0..n).collect();
    let shuffle = derangement(n, control_seed);
    let pixels = |images: &[RgbImage]| -> Vec<f32> { images.iter().flat_map(unit).collect() };
    let (recon_pixels, seen_pixels) = (pixels(recon), pixels(seen));
    let per = recon_pixels.len() / n;
    let matching = correlation_top_k(&recon_pixels, &seen_pixels, per, &[1, 5])?;
    let shuffled: Vec<f32> = shuffle.iter().flat_map(|&j| seen_pixels[j * per..(j + 1) * per].iter().copied()).collect();
    let control_matching = correlation_top_k(&recon_pixels, &shuffled, per, &[1])?;
    Ok(RunScores {
        metrics: recon_metrics(recon, seen, recon_latents, seen_latents, dim, &identity)?,
        pixel_top1: matching[0],
        pixel_top5: matching[1],
        control: recon_metrics(recon, seen, recon_latents, seen_latents, dim, &shuffle)?,
        control_pixel_top1: control_matching[0],
    })
}

/// Mean and sample standard deviation (n - 1) of `values`; the deviation is 0 for a single value.
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = if values.len() > 1 { values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}

/// How a metric is read from a run's scores.
type RunMetric = fn(&RunScores) -> f64;

/// The metrics a condition is summarised by, with how each is read from a run.
const SUMMARISED: [(&str, RunMetric); 5] = [
    ("pixcorr", |s| s.metrics.pixcorr),
    ("ssim", |s| s.metrics.ssim),
    ("two_way", |s| s.metrics.two_way),
    ("pixel_top1", |s| s.pixel_top1),
    ("pixel_top5", |s| s.pixel_top5),
];

/// `metrics.json`'s `ablation` object: per condition, each metric's mean over seeds under its own name
/// (`ablation.eeg_structure.pixcorr`), its standard deviation over seeds (`pixcorr_std`), the per-seed
/// values (`pixcorr_per_seed`) and the control's mean (`pixcorr_control`); and the per-seed differences
/// between conditions (`eeg_minus_none`, `true_minus_eeg`), which share each seed's noise.
pub fn summary(runs: &[(AblationRun, RunScores)], items: usize, sampling: &SamplingOptions, seeds: &[u64]) -> Value {
    let scores_of = |c: Condition| -> Vec<RunScores> {
        seeds.iter().filter_map(|s| runs.iter().find(|(r, _)| r.condition == c && r.seed == *s).map(|(_, x)| *x)).collect()
    };
    let mut out = json!({
        "what": "the same EEG and seeds reconstructed with the structure map from EEG (eeg_structure), with the ControlNet off \
                 (no_structure) and with the true structure targets (true_structure); *_std is the standard deviation over seeds \
                 (n - 1), *_control the same items deranged",
        "items": items,
        "ways": items,
        "seeds": seeds,
        "steps": sampling.steps,
        "scheduler": sampling.scheduler.to_string(),
        "guidance": sampling.guidance,
        "controlnet_scale": sampling.controlnet_scale,
        "folders": runs.iter().map(|(r, _)| json!({ "condition": r.condition.name(), "seed": r.seed, "dir": r.dir.display().to_string() })).collect::<Vec<_>>(),
    });
    for c in Condition::ALL {
        let scores = scores_of(c);
        let mut entry = serde_json::Map::new();
        for (name, get) in SUMMARISED {
            let values: Vec<f64> = scores.iter().map(get).collect();
            let (mean, std) = mean_std(&values);
            entry.insert(name.into(), json!(mean));
            entry.insert(format!("{name}_std"), json!(std));
            entry.insert(format!("{name}_per_seed"), json!(values));
        }
        for (name, get) in [
            ("pixcorr", (|s: &RunScores| s.control.pixcorr) as RunMetric),
            ("ssim", |s| s.control.ssim),
            ("two_way", |s| s.control.two_way),
            ("pixel_top1", |s| s.control_pixel_top1),
        ] {
            entry.insert(format!("{name}_control"), json!(mean_std(&scores.iter().map(get).collect::<Vec<_>>()).0));
        }
        out[c.name()] = Value::Object(entry);
    }
    for (name, a, b) in
        [("eeg_minus_none", Condition::EegStructure, Condition::NoStructure), ("true_minus_eeg", Condition::TrueStructure, Condition::EegStructure)]
    {
        let (sa, sb) = (scores_of(a), scores_of(b));
        let mut entry = serde_json::Map::new();
        for (metric, get) in SUMMARISED {
            let diffs: Vec<f64> = sa.iter().zip(&sb).map(|(x, y)| get(x) - get(y)).collect();
            let (mean, std) = mean_std(&diffs);
            entry.insert(metric.into(), json!(mean));
            entry.insert(format!("{metric}_std"), json!(std));
        }
        out[name] = Value::Object(entry);
    }
    out
}
