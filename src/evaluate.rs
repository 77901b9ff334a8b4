//! `sgdm eval`: how good the reconstructions of an EEG file are, next to a control that measures chance.
//!
//! - **Retrieval** (zero-shot, N-way over the evaluated items): each item's EEG embedding (its trials
//!   averaged first, as THINGS-EEG2 papers do at test) against every seen image's embedding in the
//!   StructuralVAE's latent space (its mu, the target the encoder was aligned to); top-1 and top-5.
//! - **Reconstruction**, per reconstruction folder (one per seed) and averaged over them: PixCorr (Pearson
//!   correlation of all RGB values of reconstruction and seen image, at the reconstruction's size), SSIM
//!   (grayscale by scikit-image's `rgb2gray` weights, Gaussian window σ = 1.5, data range 1, as
//!   `skimage.metrics.structural_similarity`), and 2-way identification in the StructuralVAE's latent space.
//! - **Structure**: the structure maps predicted from the EEG (the structure head's output the ControlNet
//!   is conditioned on) against the true structure targets of the same items (the dataset's
//!   `edges16/<split>.npy` when the EEG file is a dataset's split, else computed from the seen images by
//!   [`crate::data::structure`]): mean Pearson correlation, N-way matching top-1/top-5 by correlation, and
//!   how alike the maps are among themselves (mean pairwise correlation, predicted and true).
//! - **Control**: the same numbers with the items deranged (every EEG embedding, structure map and
//!   reconstruction paired with another item's image, by a seeded permutation without fixed points), so
//!   chance is measured on the same data rather than assumed.
//! - **Linear floor** ([`floor`]), when the EEG file is the test split of a dataset: ridge regression from
//!   the trial-averaged EEG to the structure targets and to the StructuralVAE's mu, fitted on the train
//!   split with its penalty chosen on val, scored with the same structure metrics and retrieval; beside it
//!   the train split's mean structure map, the prediction that knows no EEG.
//! - **Ablation** ([`ablation`], with `EvalConfig::ablation`): the same EEG and seeds reconstructed with the
//!   structure map from EEG, without structure (ControlNet off) and with the true structure maps; PixCorr,
//!   SSIM, 2-way identification and N-way pixel matching, averaged over seeds with their spread.
//!
//! Only complete folders are scored: every item of the EEG file (or its first `--items`), finished in every
//! folder; with `allow_incomplete` the finished ones, the others listed as `missing`.
//!
//! Writes `metrics.json` and `sheet.png`: a contact sheet with, for each of the first items, the seen image,
//! its true structure map, the structure map predicted from the EEG, the reconstruction and (with the
//! ablation) the reconstruction without structure, side by side.

pub mod ablation;
pub mod floor;

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use image::{imageops, Rgb, RgbImage};
use serde_json::{json, Value};

use crate::data::dataset::DatasetSplit;
use crate::data::image::{load_rgb, load_square, resize_center_crop, save_png_rgb, to_planes};
use crate::data::structure::StructureMaps;
use crate::diffusion::scheduler::SchedulerKind;
use crate::metrics::{correlation_top_k, derangement, mean_pairwise_correlation, mean_row_correlation, retrieval_top_k, ReconMetrics};
use crate::models::sgdm::upsample_nearest;
use crate::pipeline::{Pipeline, SamplingOptions};
use crate::reconstruct::{finished_items, image_files, read_run, EegItems};
use crate::util::content_checksum;
use ablation::{load_reconstructions, run_ablation, score_run, AblationConfig, Condition};

/// What `sgdm eval` reads.
#[derive(Debug, Clone)]
pub struct EvalConfig {
    /// Reconstruction folders written by `sgdm reconstruct` from the same EEG file, one per seed.
    pub recon: Vec<PathBuf>,
    /// The EEG file (default: the one the first folder's `run.json` names).
    pub eeg: Option<PathBuf>,
    /// The seen images ([`crate::reconstruct::image_files`]: a folder in file-name order, or a THINGS image
    /// folder in THINGS order); default: the `seen` paths in the manifest.
    pub images: Option<PathBuf>,
    pub out: PathBuf,
    /// Items on the contact sheet, and triplets per sheet row.
    pub sheet_items: usize,
    pub sheet_columns: usize,
    /// Seeds the control's permutation.
    pub control_seed: u64,
    /// The items a complete folder holds: the first `expected_items` of the EEG file (a run made with
    /// `--limit`), or every item when `None`.
    pub expected_items: Option<usize>,
    /// Score the items every folder finished even when some expected ones are missing (they are listed in
    /// `metrics.json` as `missing`); otherwise a folder missing any is refused.
    pub allow_incomplete: bool,
    /// Run the ablation (reconstructions into `out/ablation/`) and score it.
    pub ablation: Option<AblationConfig>,
}

/// Item indices as short ranges: `3, 7-9, 12`.
pub fn format_indices(indices: &[usize]) -> String {
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for &i in indices {
        match ranges.last_mut() {
            Some((_, end)) if *end + 1 == i => *end = i,
            _ => ranges.push((i, i)),
        }
    }
    const SHOWN: usize = 20;
    let mut text: Vec<String> = ranges.iter().take(SHOWN).map(|&(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") }).collect();
    if ranges.len() > SHOWN {
        text.push(format!("... ({} ranges in all)", ranges.len()));
    }
    text.join(", ")
}

fn mean_of(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

fn summary(per_seed: &[ReconMetrics]) -> Value {
    let field = |f: fn(&ReconMetrics) -> f64| {
        let v: Vec<f64> = per_seed.iter().map(f).collect();
        json!({ "mean": mean_of(&v), "per_seed": v })
    };
    json!({ "pixcorr": field(|m| m.pixcorr), "ssim": field(|m| m.ssim), "two_way": field(|m| m.two_way) })
}

/// The evaluation; returns `metrics.json`'s contents (also written, with the sheet, into `cfg.out`).
pub fn evaluate(pipeline: &Pipeline, cfg: &EvalConfig) -> Result<Value> {
    ensure!(!cfg.recon.is_empty(), "no reconstruction folder to evaluate");
    let runs: Vec<Value> = cfg.recon.iter().map(|d| read_run(d)).collect::<Result<_>>()?;
    let eeg_path = match &cfg.eeg {
        Some(p) => p.clone(),
        None => PathBuf::from(runs[0]["eeg"].as_str().with_context(|| format!("{}: no 'eeg'", cfg.recon[0].join("run.json").display()))?),
    };
    let checksum = content_checksum(&eeg_path).with_context(|| format!("{}: cannot read", eeg_path.display()))?;
    for (dir, run) in cfg.recon.iter().zip(&runs) {
        let eeg = std::fs::canonicalize(&eeg_path).with_context(|| format!("{}: cannot resolve", eeg_path.display()))?;
        ensure!(
            run["eeg"].as_str() == Some(eeg.to_str().unwrap_or_default()),
            "{}: reconstructed from {}, not {}",
            dir.join("run.json").display(),
            run["eeg"],
            eeg.display()
        );
        ensure!(
            run["eeg_checksum"].as_str().is_none_or(|c| c == checksum),
            "{}: its content is not what {} was reconstructed from (checksum there {}, now {checksum}): the file was replaced",
            eeg_path.display(),
            dir.display(),
            run["eeg_checksum"]
        );
    }
    let eeg = EegItems::open(&eeg_path)?;
    pipeline.check_eeg(eeg.scan())?;
    let rows = eeg.shape()[0];
    let expected = cfg.expected_items.unwrap_or(rows);
    ensure!(expected <= rows, "--items {expected}: {} holds {rows} items", eeg_path.display());
    // The expected items every folder finished; the others are missing.
    let manifests: Vec<_> = cfg.recon.iter().map(|d| finished_items(d)).collect::<Result<_>>()?;
    let mut missing = Vec::new();
    for (dir, finished) in cfg.recon.iter().zip(&manifests) {
        let here: Vec<usize> = (0..expected).filter(|i| !finished.contains_key(i)).collect();
        ensure!(
            here.is_empty() || cfg.allow_incomplete,
            "{}: {} of {expected} items are not reconstructed (missing: {}). Finish the run (rerun the same sgdm reconstruct), \
             score the first N items with --items N, or score the finished ones with --allow-incomplete",
            dir.display(),
            here.len(),
            format_indices(&here)
        );
        missing.extend(here);
    }
    missing.sort_unstable();
    missing.dedup();
    let items: Vec<usize> = (0..expected).filter(|i| missing.binary_search(i).is_err()).collect();
    ensure!(items.len() >= 2, "{}: {} finished item(s) common to every folder; evaluation needs at least 2", cfg.recon[0].display(), items.len());
    let n = items.len();

    let seen_paths: Vec<PathBuf> = match &cfg.images {
        Some(dir) => {
            let files = image_files(dir)?;
            let last = *items.last().unwrap();
            ensure!(files.len() > last, "{}: {} images, but item {last} is reconstructed", dir.display(), files.len());
            items.iter().map(|&i| files[i].clone()).collect()
        }
        None => items
            .iter()
            .map(|i| {
                manifests[0][i]["seen"].as_str().map(PathBuf::from).with_context(|| {
                    format!(
                        "{}: item {i} has no 'seen' image (reconstruct with --images, or give eval --images)",
                        cfg.recon[0].join("manifest.jsonl").display()
                    )
                })
            })
            .collect::<Result<_>>()?,
    };
    let load_recon = |dir: &Path, i: usize| -> Result<RgbImage> { load_rgb(dir.join(manifests[0][&i]["image"].as_str().unwrap_or_default())) };
    let first: Vec<RgbImage> = items.iter().map(|&i| load_recon(&cfg.recon[0], i)).collect::<Result<_>>()?;
    let s = first[0].width();
    ensure!(first.iter().all(|r| r.dimensions() == (s, s)), "{}: reconstructions of different sizes", cfg.recon[0].display());
    let seen: Vec<RgbImage> = seen_paths.iter().map(|p| load_square(p, s)).collect::<Result<_>>()?;

    // Retrieval in the StructuralVAE's latent space.
    let vs = pipeline.structural_vae_image_size() as u32;
    let latents = |images: &[RgbImage]| -> Result<Vec<f32>> {
        let mut out = Vec::new();
        for chunk in images.chunks(64) {
            let x: Vec<f32> = chunk.iter().flat_map(|im| to_planes(&resize_center_crop(im, vs))).collect();
            out.extend(pipeline.image_embedding(&x)?);
        }
        Ok(out)
    };
    let seen_latents = latents(&seen)?;
    let dim = seen_latents.len() / n;
    let (mut eeg_embeddings, mut predicted_maps) = (Vec::with_capacity(n * dim), Vec::new());
    for chunk in items.chunks(64) {
        let embedding = pipeline.embed(&eeg.read(chunk)?)?;
        predicted_maps.extend(pipeline.structure(&embedding)?.to_f32_vec()?);
        eeg_embeddings.extend(embedding.to_f32_vec()?);
    }
    let ks = [1, 5];
    let retrieval = retrieval_top_k(&eeg_embeddings, &seen_latents, dim, &ks)?;
    let shuffle = derangement(n, cfg.control_seed);
    let deranged =
        |rows: &[f32], width: usize| -> Vec<f32> { shuffle.iter().flat_map(|&j| rows[j * width..(j + 1) * width].iter().copied()).collect() };
    let control_retrieval = retrieval_top_k(&eeg_embeddings, &deranged(&seen_latents, dim), dim, &ks)?;

    // Structure: the maps from EEG against the true targets of the same items.
    let e2 = pipeline.edge * pipeline.edge;
    let dataset = DatasetSplit::of(&eeg_path).filter(|d| d.manifest.edge_size == pipeline.edge && d.split.figures == rows);
    let (true_maps, targets_source) = match &dataset {
        Some(d) => {
            let all = d.structure_targets()?;
            (
                items.iter().flat_map(|&i| all[i * e2..(i + 1) * e2].iter().copied()).collect::<Vec<f32>>(),
                d.dir.join(&d.split.edges16).display().to_string(),
            )
        }
        None => {
            ensure!(
                pipeline.edge == crate::data::structure::EDGE_SIZE,
                "the model's structure maps are {0}x{0}; true ones computed from the seen images are {1}x{1}",
                pipeline.edge,
                crate::data::structure::EDGE_SIZE
            );
            let maps = seen_paths.iter().map(|p| load_rgb(p).map(|im| StructureMaps::from_image(&im).edges16)).collect::<Result<Vec<_>>>()?;
            (maps.concat(), "computed from the seen images (crate::data::structure)".to_string())
        }
    };
    let structure_scores = |predicted: &[f32]| -> Result<Value> {
        let top = correlation_top_k(predicted, &true_maps, e2, &ks)?;
        Ok(json!({ "corr": mean_row_correlation(predicted, &true_maps, e2)?, "top1": top[0], "top5": top[1] }))
    };
    let deranged_maps = deranged(&true_maps, e2);
    let control_top = correlation_top_k(&predicted_maps, &deranged_maps, e2, &ks)?;
    let mut structure = json!({
        "targets": targets_source,
        "ways": n,
        "eeg": structure_scores(&predicted_maps)?,
        "control": { "corr": mean_row_correlation(&predicted_maps, &deranged_maps, e2)?, "top1": control_top[0], "top5": control_top[1] },
    });
    structure["eeg"]["pairwise_corr"] = json!(mean_pairwise_correlation(&predicted_maps, e2)?);
    structure["true"] = json!({ "pairwise_corr": mean_pairwise_correlation(&true_maps, e2)? });

    // The linear floor, fitted on the train split and selected on val of the EEG file's dataset.
    let ridge = match &dataset {
        Some(d) if d.split.name != "train" && d.split.name != "val" => {
            let floor = floor::fit_linear_floor(pipeline, d)?;
            let test_eeg = eeg.read(&items)?;
            let maps = floor.structure.model.predict(&test_eeg)?;
            let mu = floor.mu.model.predict(&test_eeg)?;
            let mean_maps: Vec<f32> = (0..n).flat_map(|_| floor.mean_map.iter().copied()).collect();
            let mu_retrieval = retrieval_top_k(&mu, &seen_latents, dim, &ks)?;
            structure["mean_map"] = json!({ "corr": mean_row_correlation(&mean_maps, &true_maps, e2)?, "what": "the train split's mean structure target for every item" });
            let mut s = structure_scores(&maps)?;
            s["pairwise_corr"] = json!(mean_pairwise_correlation(&maps, e2)?);
            s["relative_penalty"] = json!(floor.structure.relative_penalty);
            s["val_corr"] = json!(floor.structure.val_score);
            json!({
                "what": "ridge regression from the trial-averaged EEG (standardised, flattened) fitted on the train split, penalty chosen on val",
                "train_figures": floor.train_figures,
                "val_figures": floor.val_figures,
                "features": test_eeg.len() / n,
                "structure": s,
                "retrieval": { "top1": mu_retrieval[0], "top5": mu_retrieval[1], "relative_penalty": floor.mu.relative_penalty, "val_cosine": floor.mu.val_score },
            })
        }
        Some(d) => json!({ "skipped": format!("the EEG file is the '{}' split, which the floor is fitted or selected on", d.split.name) }),
        None => json!({ "skipped": format!("{} is not a split of a dataset with train and val splits", eeg_path.display()) }),
    };

    let (mut per_seed, mut control) = (Vec::new(), Vec::new());
    let mut pixel_matching = Vec::new();
    for (k, dir) in cfg.recon.iter().enumerate() {
        let recon = if k == 0 { first.clone() } else { items.iter().map(|&i| load_recon(dir, i)).collect::<Result<Vec<_>>>()? };
        let recon_latents = latents(&recon)?;
        let scores = score_run(&recon, &seen, &recon_latents, &seen_latents, dim, cfg.control_seed)?;
        per_seed.push(scores.metrics);
        control.push(scores.control);
        pixel_matching.push(scores);
    }

    // The ablation: reconstructions of the first items three ways, with several seeds.
    let mut without_structure: Option<Vec<RgbImage>> = None;
    let ablation_json = match &cfg.ablation {
        None => Value::Null,
        Some(ab) => {
            let count = ab.items.unwrap_or(n).min(n);
            ensure!(count >= 2, "--ablation-items {count}: the ablation needs at least 2 items");
            ensure!(
                items[..count].iter().enumerate().all(|(k, &i)| k == i),
                "the ablation reconstructs the first {count} items of {}, but items {} are not among the evaluated ones",
                eeg_path.display(),
                format_indices(&missing)
            );
            let sampling = sampling_of(&runs[0], &cfg.recon[0])?;
            let out = cfg.out.join("ablation");
            let maps_file = match &dataset {
                Some(d) => d.dir.join(&d.split.edges16),
                None => {
                    std::fs::create_dir_all(&out).with_context(|| format!("{}: cannot create", out.display()))?;
                    let path = out.join("true_structure.npy");
                    crate::data::npy::write_f32(&path, &[count, pipeline.edge, pipeline.edge], &true_maps[..count * e2])?;
                    path
                }
            };
            let runs = run_ablation(pipeline, &eeg_path, &sampling, &maps_file, count, ab, &cfg.recon, &out)?;
            let seen_sub = &seen[..count];
            let seen_latents_sub = &seen_latents[..count * dim];
            let mut scored = Vec::new();
            for run in runs {
                let recon = load_reconstructions(&run.dir, count)?;
                let recon_latents = latents(&recon)?;
                let scores = score_run(&recon, seen_sub, &recon_latents, seen_latents_sub, dim, cfg.control_seed)?;
                if run.condition == Condition::NoStructure && (without_structure.is_none() || run.seed == sampling.seed) {
                    without_structure = Some(recon);
                }
                scored.push((run, scores));
            }
            ablation::summary(&scored, count, &sampling, &ab.seeds)
        }
    };

    let retrieval_json = |r: &[f64]| json!({ "top1": r[0], "top5": r[1] });
    let mut reconstruction = summary(&per_seed);
    reconstruction["pixel_top1"] = json!(mean_of(&pixel_matching.iter().map(|s| s.pixel_top1).collect::<Vec<_>>()));
    reconstruction["pixel_top5"] = json!(mean_of(&pixel_matching.iter().map(|s| s.pixel_top5).collect::<Vec<_>>()));
    let mut control_reconstruction = summary(&control);
    control_reconstruction["pixel_top1"] = json!(mean_of(&pixel_matching.iter().map(|s| s.control_pixel_top1).collect::<Vec<_>>()));
    let metrics = json!({
        "items": n,
        "missing": missing,
        "eeg": eeg_path.display().to_string(),
        "weights": pipeline.dir.display().to_string(),
        "recon": cfg.recon.iter().map(|d| d.display().to_string()).collect::<Vec<_>>(),
        "seeds": runs.iter().map(|r| r["seed"].clone()).collect::<Vec<_>>(),
        "retrieval": {
            "ways": n,
            "space": "StructuralVAE mu",
            "top1": retrieval[0],
            "top5": retrieval[1],
            "chance_top1": 1.0 / n as f64,
            "chance_top5": (5.0 / n as f64).min(1.0),
        },
        "reconstruction": reconstruction,
        "structure": structure,
        "ridge": ridge,
        "ablation": ablation_json,
        "control": {
            "what": "every EEG embedding, structure map and reconstruction paired with another item's seen image (a seeded derangement)",
            "permutation_seed": cfg.control_seed,
            "retrieval": retrieval_json(&control_retrieval),
            "reconstruction": control_reconstruction,
        },
    });
    // Every file is read before the first write (but the ablation's reconstructions), and metrics.json, the
    // result, is written last: a folder with metrics.json holds a finished evaluation.
    let shown = cfg.sheet_items.min(n);
    let map_image = |maps: &[f32], k: usize| -> RgbImage {
        let up = upsample_nearest(&maps[k * e2..(k + 1) * e2], pipeline.edge, (s as usize).div_ceil(pipeline.edge));
        let side = pipeline.edge * (s as usize).div_ceil(pipeline.edge);
        let grey = RgbImage::from_fn(side as u32, side as u32, |x, y| {
            let v = (up[y as usize * side + x as usize].clamp(0.0, 1.0) * 255.0).round() as u8;
            Rgb([v, v, v])
        });
        resize_center_crop(&grey, s)
    };
    std::fs::create_dir_all(&cfg.out).with_context(|| format!("{}: cannot create", cfg.out.display()))?;
    crate::util::remove_stale_temporaries(&cfg.out)
        .with_context(|| format!("{}: cannot remove the temporary files of a killed run", cfg.out.display()))?;
    if shown > 0 {
        let blank = RgbImage::from_pixel(s, s, Rgb([128, 128, 128]));
        let cells: Vec<Vec<RgbImage>> = (0..shown)
            .map(|k| {
                let mut row = vec![seen[k].clone(), map_image(&true_maps, k), map_image(&predicted_maps, k), first[k].clone()];
                if let Some(without) = &without_structure {
                    row.push(without.get(k).cloned().unwrap_or_else(|| blank.clone()));
                }
                row
            })
            .collect();
        save_png_rgb(cfg.out.join("sheet.png"), &contact_sheet(&cells, s, cfg.sheet_columns.max(1)))?;
    }
    let path = cfg.out.join("metrics.json");
    crate::util::write_atomic(&path, serde_json::to_string_pretty(&metrics)?.as_bytes())
        .with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(metrics)
}

/// The sampling settings a reconstruction folder's `run.json` records.
pub fn sampling_of(run: &Value, dir: &Path) -> Result<SamplingOptions> {
    let path = dir.join("run.json");
    let number = |key: &str| run[key].as_f64().with_context(|| format!("{}: no number '{key}'", path.display()));
    let scheduler: SchedulerKind = run["scheduler"]
        .as_str()
        .with_context(|| format!("{}: no 'scheduler'", path.display()))?
        .parse()
        .map_err(|e: String| anyhow::anyhow!("{}: {e}", path.display()))?;
    let sampling = SamplingOptions {
        steps: number("steps")? as usize,
        scheduler,
        guidance: number("guidance")? as f32,
        controlnet_scale: number("controlnet_scale")? as f32,
        seed: run["seed"].as_u64().with_context(|| format!("{}: no 'seed'", path.display()))?,
    };
    sampling.validate().with_context(|| format!("{}: settings sgdm cannot run", path.display()))?;
    Ok(sampling)
}

/// Rows of `s`-pixel images (each row one item: seen image, maps, reconstructions) in a grid of `columns`
/// items a row: 2 px between the images of an item, 10 px between items, on mid grey.
pub fn contact_sheet(cells: &[Vec<RgbImage>], s: u32, columns: usize) -> RgbImage {
    let (gap, pad) = (2u32, 10u32);
    let per = cells.iter().map(Vec::len).max().unwrap_or(0) as u32;
    let cell_w = per * s + per.saturating_sub(1) * gap;
    let rows = cells.len().div_ceil(columns) as u32;
    let cols = columns.min(cells.len()) as u32;
    let mut sheet = RgbImage::from_pixel(pad + cols * (cell_w + pad), pad + rows * (s + pad), Rgb([128, 128, 128]));
    for (k, item) in cells.iter().enumerate() {
        let (r, c) = ((k / columns) as u32, (k % columns) as u32);
        let (x0, y0) = (pad + c * (cell_w + pad), pad + r * (s + pad));
        for (j, im) in item.iter().enumerate() {
            imageops::replace(&mut sheet, im, (x0 + j as u32 * (s + gap)) as i64, y0 as i64);
        }
    }
    sheet
}

/// The metrics as small tables for the terminal: the model beside the shuffled control, chance and (where
/// it was fitted) the linear floor; then the ablation, mean ± standard deviation over seeds.
pub fn format_table(m: &Value) -> String {
    let r = &m["retrieval"];
    let c = &m["control"];
    let st = &m["structure"];
    let ridge = &m["ridge"];
    let f = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.3}"));
    let mut out = format!("{} items, {} seed(s)\n", m["items"], m["seeds"].as_array().map_or(0, Vec::len));
    let row =
        |name: String, cells: [&Value; 4]| format!("{:<30}{:>10}{:>10}{:>10}{:>10}\n", name, f(cells[0]), f(cells[1]), f(cells[2]), f(cells[3]));
    let chance = |v: f64| json!(v);
    let n = m["items"].as_f64().unwrap_or(0.0);
    out += &format!("{:<30}{:>10}{:>10}{:>10}{:>10}\n", "", "EEG", "control", "chance", "ridge");
    out +=
        &row(format!("retrieval top-1 ({}-way)", r["ways"]), [&r["top1"], &c["retrieval"]["top1"], &r["chance_top1"], &ridge["retrieval"]["top1"]]);
    out += &row("retrieval top-5".into(), [&r["top5"], &c["retrieval"]["top5"], &r["chance_top5"], &ridge["retrieval"]["top5"]]);
    out += &row("structure correlation".into(), [&st["eeg"]["corr"], &st["control"]["corr"], &Value::Null, &ridge["structure"]["corr"]]);
    out += &row("structure matching top-1".to_string(), [&st["eeg"]["top1"], &st["control"]["top1"], &chance(1.0 / n), &ridge["structure"]["top1"]]);
    out += &row(
        "structure matching top-5".into(),
        [&st["eeg"]["top5"], &st["control"]["top5"], &chance((5.0 / n).min(1.0)), &ridge["structure"]["top5"]],
    );
    for (key, name) in [("pixcorr", "PixCorr"), ("ssim", "SSIM"), ("two_way", "2-way identification")] {
        let chance = if key == "two_way" { json!(0.5) } else { Value::Null };
        out += &row(name.into(), [&m["reconstruction"][key]["mean"], &c["reconstruction"][key]["mean"], &chance, &Value::Null]);
    }
    out += &row(
        "pixel matching top-1".to_string(),
        [&m["reconstruction"]["pixel_top1"], &c["reconstruction"]["pixel_top1"], &chance(1.0 / n), &Value::Null],
    );
    if let Some(mean) = st["mean_map"]["corr"].as_f64() {
        out += &format!("structure correlation of the train split's mean map (no EEG): {mean:.3}\n");
    }
    let a = &m["ablation"];
    if a.is_object() {
        let ms = |v: &Value, key: &str| format!("{} ± {}", f(&v[key]), f(&v[format!("{key}_std")]));
        out += &format!("ablation: the first {} items, seeds {}, mean ± sd over seeds\n", a["items"], a["seeds"]);
        out += &format!("{:<22}{:>16}{:>16}{:>16}{:>24}\n", "", "PixCorr", "SSIM", "2-way", format!("pixel top-1 ({}-way)", a["ways"]));
        for (key, name) in [
            ("eeg_structure", "structure from EEG"),
            ("no_structure", "no structure"),
            ("true_structure", "true structure"),
            ("eeg_minus_none", "from EEG - none"),
        ] {
            let v = &a[key];
            out += &format!("{:<22}{:>16}{:>16}{:>16}{:>24}\n", name, ms(v, "pixcorr"), ms(v, "ssim"), ms(v, "two_way"), ms(v, "pixel_top1"));
        }
    }
    out
}
