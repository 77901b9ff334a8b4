//! `sgdm eval`: how good the reconstructions of an EEG file are, next to a control that measures chance.
//!
//! - **Retrieval** (zero-shot, N-way over the evaluated items): each item's EEG embedding (its trials
//!   averaged first, as THINGS-EEG2 papers do at test) against every seen image's embedding in the
//!   StructuralVAE's latent space (its mu, the target the encoder was aligned to); top-1 and top-5.
//! - **Reconstruction**, per reconstruction folder (one per seed) and averaged over them: PixCorr (Pearson
//!   correlation of all RGB values of reconstruction and seen image, at the reconstruction's size), SSIM
//!   (grayscale by scikit-image's `rgb2gray` weights, Gaussian window σ = 1.5, data range 1, as
//!   `skimage.metrics.structural_similarity`), and 2-way identification in the StructuralVAE's latent space.
//! - **Control**: the same numbers with the items deranged (every EEG embedding and reconstruction paired
//!   with another item's image, by a seeded permutation without fixed points), so chance is measured on the
//!   same data rather than assumed.
//!
//! Only complete folders are scored: every item of the EEG file (or its first `--items`), finished in every
//! folder; with `allow_incomplete` the finished ones, the others listed as `missing`.
//!
//! Writes `metrics.json` and `sheet.png`: a contact sheet with, for each of the first items, the seen image,
//! the structure map predicted from the EEG and the reconstruction, side by side.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use image::{imageops, Rgb, RgbImage};
use serde_json::{json, Value};

use crate::data::image::{load_rgb, load_square, resize_center_crop, save_png_rgb, to_planes};
use crate::eval::{derangement, pixcorr, retrieval_top_k, ssim, two_way_identification};
use crate::pipeline::Pipeline;
use crate::reconstruct::{finished_items, image_files, EegItems};
use crate::util::content_checksum;

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

/// The reconstruction metrics of one pairing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReconMetrics {
    pub pixcorr: f64,
    pub ssim: f64,
    pub two_way: f64,
}

/// skimage.color.rgb2gray: 0.2125 R + 0.7154 G + 0.0721 B.
fn gray(rgb: &RgbImage) -> Vec<f32> {
    rgb.pixels().map(|p| (0.2125 * p[0] as f32 + 0.7154 * p[1] as f32 + 0.0721 * p[2] as f32) / 255.0).collect()
}

fn unit(rgb: &RgbImage) -> Vec<f32> {
    rgb.as_raw().iter().map(|v| *v as f32 / 255.0).collect()
}

/// Reconstruction metrics of reconstructions `recon[i]` against seen images `seen[pair[i]]`.
pub fn recon_metrics(recon: &[RgbImage], seen: &[RgbImage], recon_latents: &[f32], seen_latents: &[f32], dim: usize, pair: &[usize]) -> Result<ReconMetrics> {
    let n = recon.len();
    let (mut pc, mut ss) = (0.0, 0.0);
    for (i, r) in recon.iter().enumerate() {
        let s = &seen[pair[i]];
        pc += pixcorr(&unit(r), &unit(s))?;
        ss += ssim(&gray(r), &gray(s), r.width() as usize, r.height() as usize, 1.0)?;
    }
    let paired: Vec<f32> = pair.iter().flat_map(|&j| seen_latents[j * dim..(j + 1) * dim].iter().copied()).collect();
    Ok(ReconMetrics { pixcorr: pc / n as f64, ssim: ss / n as f64, two_way: two_way_identification(recon_latents, &paired, dim)? })
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

/// The `run.json` of a reconstruction folder.
pub fn read_run(dir: &Path) -> Result<Value> {
    let path = dir.join("run.json");
    let text = crate::util::read_to_string(&path).with_context(|| format!("{}: cannot read (is this an `sgdm reconstruct` output folder?)", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
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
                    format!("{}: item {i} has no 'seen' image (reconstruct with --images, or give eval --images)", cfg.recon[0].join("manifest.jsonl").display())
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
    let mut eeg_embeddings = Vec::with_capacity(n * dim);
    for chunk in items.chunks(64) {
        eeg_embeddings.extend(pipeline.embed(&eeg.read(chunk)?)?.to_f32_vec()?);
    }
    let ks = [1, 5];
    let retrieval = retrieval_top_k(&eeg_embeddings, &seen_latents, dim, &ks)?;
    let shuffle = derangement(n, cfg.control_seed);
    let shuffled_keys: Vec<f32> = shuffle.iter().flat_map(|&j| seen_latents[j * dim..(j + 1) * dim].iter().copied()).collect();
    let control_retrieval = retrieval_top_k(&eeg_embeddings, &shuffled_keys, dim, &ks)?;
    let identity: Vec<usize> = (0..n).collect();

    let (mut per_seed, mut control) = (Vec::new(), Vec::new());
    for (k, dir) in cfg.recon.iter().enumerate() {
        let recon = if k == 0 { first.clone() } else { items.iter().map(|&i| load_recon(dir, i)).collect::<Result<Vec<_>>>()? };
        let recon_latents = latents(&recon)?;
        per_seed.push(recon_metrics(&recon, &seen, &recon_latents, &seen_latents, dim, &identity)?);
        control.push(recon_metrics(&recon, &seen, &recon_latents, &seen_latents, dim, &shuffle)?);
    }

    let retrieval_json = |r: &[f64]| json!({ "top1": r[0], "top5": r[1] });
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
        "reconstruction": summary(&per_seed),
        "control": {
            "what": "every EEG embedding and reconstruction paired with another item's seen image (a seeded derangement)",
            "permutation_seed": cfg.control_seed,
            "retrieval": retrieval_json(&control_retrieval),
            "reconstruction": summary(&control),
        },
    });
    // Every file is read before the first write, and metrics.json, the result, is written last: a folder
    // with metrics.json holds a finished evaluation.
    let shown = cfg.sheet_items.min(n);
    let structure: Vec<RgbImage> = items[..shown]
        .iter()
        .map(|i| load_rgb(cfg.recon[0].join(manifests[0][i]["structure"].as_str().unwrap_or_default())).map(|im| resize_center_crop(&im, s)))
        .collect::<Result<_>>()?;
    std::fs::create_dir_all(&cfg.out).with_context(|| format!("{}: cannot create", cfg.out.display()))?;
    crate::util::remove_stale_temporaries(&cfg.out).with_context(|| format!("{}: cannot remove the temporary files of a killed run", cfg.out.display()))?;
    if shown > 0 {
        let triplets: Vec<[&RgbImage; 3]> = (0..shown).map(|k| [&seen[k], &structure[k], &first[k]]).collect();
        save_png_rgb(cfg.out.join("sheet.png"), &contact_sheet(&triplets, s, cfg.sheet_columns.max(1)))?;
    }
    let path = cfg.out.join("metrics.json");
    crate::util::write_atomic(&path, serde_json::to_string_pretty(&metrics)?.as_bytes()).with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(metrics)
}

/// Triplets of `s`-pixel images in a grid of `columns` triplets a row: 2 px between the images of a
/// triplet, 10 px between triplets, on mid grey.
pub fn contact_sheet(triplets: &[[&RgbImage; 3]], s: u32, columns: usize) -> RgbImage {
    let (gap, pad) = (2u32, 10u32);
    let cell_w = 3 * s + 2 * gap;
    let rows = triplets.len().div_ceil(columns) as u32;
    let cols = columns.min(triplets.len()) as u32;
    let mut sheet = RgbImage::from_pixel(pad + cols * (cell_w + pad), pad + rows * (s + pad), Rgb([128, 128, 128]));
    for (k, t) in triplets.iter().enumerate() {
        let (r, c) = ((k / columns) as u32, (k % columns) as u32);
        let (x0, y0) = (pad + c * (cell_w + pad), pad + r * (s + pad));
        for (j, im) in t.iter().enumerate() {
            imageops::replace(&mut sheet, *im, (x0 + j as u32 * (s + gap)) as i64, y0 as i64);
        }
    }
    sheet
}

/// The metrics as a small table for the terminal.
pub fn format_table(m: &Value) -> String {
    let r = &m["retrieval"];
    let c = &m["control"];
    let f = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.3}"));
    let mut out = format!("{} items, {} seed(s)\n", m["items"], m["seeds"].as_array().map_or(0, Vec::len));
    out += &format!("{:<28}{:>10}{:>10}{:>10}\n", "", "EEG", "control", "chance");
    out += &format!("{:<28}{:>10}{:>10}{:>10}\n", format!("retrieval top-1 ({}-way)", r["ways"]), f(&r["top1"]), f(&c["retrieval"]["top1"]), f(&r["chance_top1"]));
    out += &format!("{:<28}{:>10}{:>10}{:>10}\n", "retrieval top-5", f(&r["top5"]), f(&c["retrieval"]["top5"]), f(&r["chance_top5"]));
    for (key, name, chance) in [("pixcorr", "PixCorr", "-"), ("ssim", "SSIM", "-"), ("two_way", "2-way identification", "0.500")] {
        out += &format!("{:<28}{:>10}{:>10}{:>10}\n", name, f(&m["reconstruction"][key]["mean"]), f(&c["reconstruction"][key]["mean"]), chance);
    }
    out
}
