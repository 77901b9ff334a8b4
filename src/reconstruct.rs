//! Offline reconstruction of an EEG file (`sgdm reconstruct`): items (EEG rows, averaged over their
//! repetitions) are read from the file's memory map in batches by a reader thread, reconstructed by the
//! [`Pipeline`], and encoded and written by a writer thread, each PNG atomically, each finished item
//! appended to `manifest.jsonl` as one line.
//!
//! Output folder:
//! - `run.json`: the settings that determine the images (EEG file and a checksum of its content, weights,
//!   steps, scheduler, guidance, ControlNet scale, seed, and the given structure maps' file and checksum). A rerun with other settings, or with another
//!   recording saved at the same EEG path, is refused rather than mixing two runs, unless no item was
//!   finished under the old settings (then the new ones replace them).
//! - `images/<index>.png`, `structure/<index>.png` (the structure map the ControlNet was conditioned on,
//!   upsampled to the image size: the one predicted from the EEG, or the given one of `structure_maps`),
//!   with `<index>` the item's row in the EEG file, zero-padded to 5 digits.
//! - `manifest.jsonl`: one JSON object per finished item (index, source row, seed, steps, timing, ...).
//!
//! An item is finished when its line is in the manifest and its PNG exists; a rerun skips finished items,
//! so a killed run resumes where it stopped, and removes the temporary files a killed writer left.
//! `--shard K/N` takes the items with `index % N == K`, so N processes (a Slurm job array, several GPUs)
//! split a file with no coordination; their manifest lines are appended with one `write` each to a file
//! opened for appending, which keeps lines whole on local filesystems.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use image::{GrayImage, RgbImage};
use serde_json::{json, Value};

use crate::data::dataset::Manifest;
use crate::data::eeg::{EegData, EegRows, EegScan};
use crate::data::image::{from_planes, save_png_gray, save_png_rgb};
use crate::data::npy::{NpyDtype, NpyFile};
use crate::models::sgdm::upsample_nearest;
use crate::pipeline::{Pipeline, SamplingOptions};
use crate::tensor::{memory_stats, reset_memory_peak};
use crate::util::{content_checksum, remove_stale_temporaries, write_atomic};

/// `--shard K/N`: the items with `index % N == K` (K counts from 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub k: usize,
    pub n: usize,
}

impl Default for Shard {
    fn default() -> Shard {
        Shard { k: 0, n: 1 }
    }
}

impl FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> Result<Shard, String> {
        let bad = || format!("'{s}' is not K/N with 0 <= K < N (e.g. 0/4 .. 3/4)");
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let (k, n): (usize, usize) = (k.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
        if n == 0 || k >= n {
            return Err(bad());
        }
        Ok(Shard { k, n })
    }
}

impl Shard {
    pub fn takes(&self, index: usize) -> bool {
        index % self.n == self.k
    }
}

/// The EEG items of a file: a plain `.npy` is read by rows from its memory map; THINGS-EEG2 and pickle
/// files (dicts) are loaded whole. Opening scans the whole file once ([`EegScan`]), so a NaN in its last row
/// is refused before the first batch, and the scan is what the model's contract is checked against. A plain
/// `.npy` of a dataset (`DATASET/eeg/<split>.npy`) takes its channel names and times from the manifest.
pub struct EegItems {
    source: ItemSource,
    scan: EegScan,
}

enum ItemSource {
    Rows(EegRows),
    Whole(EegData),
}

impl EegItems {
    /// Opens and scans `path`; a file holding NaN or Inf is refused here, naming the first.
    pub fn open(path: &Path) -> Result<EegItems> {
        let is_plain_npy = NpyFile::open(path).map(|f| f.header.dtype != NpyDtype::Object).unwrap_or(false);
        let (source, scan) = if is_plain_npy {
            let rows = EegRows::open(path)?;
            let mut scan = rows.scan()?;
            if let Some((names, times)) = Manifest::axes_of(path).filter(|(n, t)| n.len() == scan.shape[2] && t.len() == scan.shape[3]) {
                (scan.ch_names, scan.times) = (Some(names), Some(times));
            }
            (ItemSource::Rows(rows), scan)
        } else {
            let data = EegData::open_unchecked(path)?;
            let scan = data.scan();
            (ItemSource::Whole(data), scan)
        };
        scan.check_finite()?;
        Ok(EegItems { source, scan })
    }

    /// `[items, repetitions, channels, time]`.
    pub fn shape(&self) -> [usize; 4] {
        self.scan.shape
    }

    /// What the scan at opening found.
    pub fn scan(&self) -> &EegScan {
        &self.scan
    }

    /// Items `indices` averaged over their repetitions, `[k, C, T]`.
    pub fn read(&self, indices: &[usize]) -> Result<Vec<f32>> {
        let [_, r, c, t] = self.shape();
        let per = c * t;
        let mut out = Vec::with_capacity(indices.len() * per);
        for &i in indices {
            let rows = match &self.source {
                ItemSource::Rows(rows) => rows.read(i..i + 1)?,
                ItemSource::Whole(d) => d.data[i * r * per..(i + 1) * r * per].to_vec(),
            };
            let mut mean = vec![0f32; per];
            for rep in rows.chunks_exact(per) {
                mean.iter_mut().zip(rep).for_each(|(m, v)| *m += v);
            }
            out.extend(mean.into_iter().map(|m| m / r as f32));
        }
        Ok(out)
    }
}

/// What `sgdm reconstruct` does.
#[derive(Debug, Clone)]
pub struct ReconstructConfig {
    pub eeg: PathBuf,
    /// The seen images, one per EEG row ([`image_files`]: sorted by file name, or a THINGS image folder in
    /// THINGS order), recorded in the manifest for `sgdm eval`.
    pub images: Option<PathBuf>,
    pub out: PathBuf,
    pub sampling: SamplingOptions,
    pub batch: usize,
    pub shard: Shard,
    /// Only the first `limit` items of the file.
    pub limit: Option<usize>,
    /// Structure maps to condition the ControlNet on instead of those predicted from the EEG: a `.npy` of
    /// `[rows, E, E]` or `[rows, E·E]` float maps, row i for EEG item i (e.g. a dataset's true structure
    /// targets, `edges16/<split>.npy`: the ablation's oracle).
    pub structure_maps: Option<PathBuf>,
}

/// The structure maps of [`ReconstructConfig::structure_maps`] for the first `items` rows, `[items, E·E]`,
/// checked for shape and finiteness.
pub fn read_structure_maps(path: &Path, edge: usize, items: usize) -> Result<Vec<f32>> {
    let file = NpyFile::open(path)?;
    let shape = file.header.shape.clone();
    let e2 = edge * edge;
    ensure!(
        shape.len() >= 2 && shape[1..].iter().product::<usize>() == e2,
        "{}: shape {shape:?}; structure maps for this model are [rows, {edge}, {edge}] or [rows, {e2}]",
        path.display()
    );
    ensure!(shape[0] >= items, "{}: {} structure maps for {items} EEG items", path.display(), shape[0]);
    let values = file.to_f32().with_context(|| format!("{}: cannot read the structure maps", path.display()))?;
    let values = values[..items * e2].to_vec();
    if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
        bail!("{}: structure map {} holds a non-finite value ({}) at position {}", path.display(), bad / e2, values[bad], bad % e2);
    }
    Ok(values)
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Items this shard owns, those already finished before this run, and those written now.
    pub owned: usize,
    pub skipped: usize,
    pub written: usize,
    pub seconds: f64,
    /// Seconds per denoising step of one batch (UNet + ControlNet + scheduler), averaged over the batches.
    pub seconds_per_step: f64,
    pub batch: usize,
    pub peak_host_bytes: u64,
    pub peak_device_bytes: u64,
}

impl Summary {
    pub fn images_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.written as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// The images of a folder, one per EEG row: a flat folder of images (PNG or JPEG) sorted by name, or a
/// THINGS image folder (one folder per concept, e.g. THINGS-EEG2's `test_images/` or an imported dataset's
/// `images/test/`) in THINGS order, concept folders sorted and images sorted within each. The image set's
/// root (holding `training_images/` and `test_images/`) is refused: read as concepts it would pair rows with
/// the wrong images.
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list the images folder", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()
        .with_context(|| format!("{}: cannot list the images folder", dir.display()))?;
    for split in [crate::data::things_eeg2::TRAINING_IMAGES, crate::data::things_eeg2::TEST_IMAGES] {
        ensure!(
            !dir.join(split).is_dir(),
            "{}: holds THINGS-EEG2's image set ({split}/); give the folder of the EEG file's images: test_images/ for \
             preprocessed_eeg_test.npy, training_images/ for preprocessed_eeg_training.npy",
            dir.display()
        );
    }
    let hidden = |p: &PathBuf| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
    if entries.iter().any(|p| p.is_dir() && !hidden(p)) {
        return Ok(crate::data::things::ImageFolder::open(dir)?.images);
    }
    let mut files: Vec<PathBuf> = entries
        .into_iter()
        .filter(|p| p.extension().and_then(|e| e.to_str()).is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg")))
        .collect();
    files.sort();
    Ok(files)
}

/// The finished items of an output folder: index -> its manifest line. Lines that do not parse (a line
/// cut short by a crash) are ignored, and so are lines whose PNG is missing.
pub fn finished_items(out: &Path) -> Result<BTreeMap<usize, Value>> {
    let path = out.join("manifest.jsonl");
    let mut done = BTreeMap::new();
    let text = match crate::util::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(done),
        Err(e) => return Err(e).with_context(|| format!("{}: cannot read", path.display())),
    };
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else { continue };
        let (Some(index), Some(image)) = (v["index"].as_u64(), v["image"].as_str()) else { continue };
        if out.join(image).is_file() {
            done.insert(index as usize, v);
        }
    }
    Ok(done)
}

pub fn item_name(index: usize) -> String {
    format!("{index:05}.png")
}

/// The settings recorded in `run.json`: those that determine the images. `eeg_checksum` is the EEG file's
/// [`content_checksum`], so a different recording saved at the same path is not mistaken for the same.
pub fn run_settings(cfg: &ReconstructConfig, pipeline: &Pipeline) -> Result<Value> {
    let canonical = |p: &Path| -> Result<String> {
        Ok(std::fs::canonicalize(p).with_context(|| format!("{}: cannot resolve", p.display()))?.display().to_string())
    };
    let s = &cfg.sampling;
    let mut settings = json!({
        "eeg": canonical(&cfg.eeg)?,
        "eeg_checksum": content_checksum(&cfg.eeg).with_context(|| format!("{}: cannot read", cfg.eeg.display()))?,
        "weights": canonical(&pipeline.dir)?,
        "steps": s.steps,
        "scheduler": s.scheduler.to_string(),
        "guidance": s.guidance,
        "controlnet_scale": s.controlnet_scale,
        "seed": s.seed,
    });
    // Only when given, so folders made before the option existed still match the default.
    if let Some(maps) = &cfg.structure_maps {
        settings["structure_maps"] = Value::from(canonical(maps)?);
        settings["structure_maps_checksum"] = Value::from(content_checksum(maps).with_context(|| format!("{}: cannot read", maps.display()))?);
    }
    Ok(settings)
}

/// Why the folder's `run.json` (`found`) does not describe a run with `settings`: one line per setting
/// that differs; empty when they match.
fn settings_differences(found: &Value, settings: &Value) -> Vec<String> {
    let keys: std::collections::BTreeSet<&String> = found.as_object().into_iter().chain(settings.as_object()).flat_map(|m| m.keys()).collect();
    keys.into_iter()
        .filter(|k| found.get(k.as_str()) != settings.get(k.as_str()))
        .map(|k| {
            let show = |v: Option<&Value>| v.map_or("(absent)".to_string(), Value::to_string);
            format!("{k}: there {}, now {}", show(found.get(k.as_str())), show(settings.get(k.as_str())))
        })
        .collect()
}

/// The `run.json` of a reconstruction folder.
pub fn read_run(dir: &Path) -> Result<Value> {
    let path = dir.join("run.json");
    let text = crate::util::read_to_string(&path)
        .with_context(|| format!("{}: cannot read (is this an `sgdm reconstruct` output folder?)", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

/// The folder's `run.json`, if it has one.
fn read_run_json(out: &Path) -> Result<Option<Value>> {
    let path = out.join("run.json");
    match crate::util::read_to_string(&path) {
        Ok(text) => Ok(Some(serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("{}: cannot read", path.display())),
    }
}

/// What stands between `cfg.out` and a run with `settings`: `None` when the folder is new, or its
/// `run.json` holds these settings, or it holds others but no item was finished under them (nothing to
/// mix with); else the settings that differ, one a line.
pub fn other_settings(cfg: &ReconstructConfig, settings: &Value) -> Result<Option<Vec<String>>> {
    let Some(found) = read_run_json(&cfg.out)? else { return Ok(None) };
    let differences = settings_differences(&found, settings);
    if differences.is_empty() || finished_items(&cfg.out)?.is_empty() {
        return Ok(None);
    }
    Ok(Some(differences))
}

/// Removes what `sgdm reconstruct` writes into an output folder (images/, structure/, manifest.jsonl,
/// run.json) and nothing else: a run that starts over.
pub fn clear_output(out: &Path) -> Result<()> {
    for dir in ["images", "structure"] {
        let path = out.join(dir);
        match std::fs::remove_dir_all(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e).with_context(|| format!("{}: cannot remove", path.display())),
            _ => {}
        }
    }
    for file in ["manifest.jsonl", "run.json"] {
        let path = out.join(file);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e).with_context(|| format!("{}: cannot remove", path.display())),
            _ => {}
        }
    }
    Ok(())
}

/// Refuses an output folder holding items finished with other settings, naming what differs; the EEG
/// file's content changed under the same path gets a message of its own.
fn check_output(cfg: &ReconstructConfig, settings: &Value) -> Result<()> {
    let Some(differences) = other_settings(cfg, settings)? else { return Ok(()) };
    let path = cfg.out.join("run.json");
    let found = read_run_json(&cfg.out)?.unwrap_or_default();
    if found["eeg"] == settings["eeg"] && found["eeg_checksum"] != settings["eeg_checksum"] {
        bail!(
            "{}: the file's content is not the content {} was reconstructed from (checksum there {}, now {}): the folder would \
             mix two recordings. Use another --out, or delete {} to start over",
            cfg.eeg.display(),
            cfg.out.display(),
            found["eeg_checksum"],
            settings["eeg_checksum"],
            cfg.out.display()
        );
    }
    bail!(
        "{}: this folder holds reconstructions made with other settings:\n  {}\nuse another --out, or delete the folder to start over",
        path.display(),
        differences.join("\n  ")
    )
}

/// Creates the output folder and writes `run.json` (replacing one whose run finished no item): the run's
/// first write, made only after every check.
fn claim_output(cfg: &ReconstructConfig, settings: &Value) -> Result<()> {
    for dir in [cfg.out.join("images"), cfg.out.join("structure")] {
        std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    }
    let path = cfg.out.join("run.json");
    if read_run_json(&cfg.out)?.as_ref() == Some(settings) {
        return Ok(());
    }
    write_atomic(&path, serde_json::to_string_pretty(settings)?.as_bytes()).with_context(|| format!("{}: cannot write", path.display()))
}

/// One finished item on its way to the writer thread.
struct Finished {
    index: usize,
    image: RgbImage,
    structure: GrayImage,
    line: Value,
}

/// Runs a reconstruction; `progress(done, total)` is called after each batch with this run's counts.
///
/// Every input and setting is checked before the first write (the output folder, `run.json`), so a refused
/// run leaves nothing behind, and a folder is never claimed by a command that cannot run.
pub fn reconstruct(pipeline: &Pipeline, cfg: &ReconstructConfig, progress: &mut dyn FnMut(usize, usize)) -> Result<Summary> {
    cfg.sampling.validate()?;
    ensure!(cfg.batch >= 1, "--batch must be at least 1");
    ensure!(cfg.limit != Some(0), "--limit 0 would reconstruct nothing: give at least 1, or leave --limit out for every item");
    let items = EegItems::open(&cfg.eeg)?;
    let rows = items.shape()[0];
    ensure!(rows > 0, "{}: holds no EEG items (0 rows): nothing to reconstruct", cfg.eeg.display());
    pipeline.check_eeg(items.scan())?;
    let n = cfg.limit.map_or(rows, |l| l.min(rows));
    let seen = match &cfg.images {
        Some(dir) => {
            let dir = std::fs::canonicalize(dir).with_context(|| format!("{}: no such images folder", dir.display()))?;
            let files = image_files(&dir)?;
            ensure!(files.len() >= n, "{}: {} images for {n} EEG items", dir.display(), files.len());
            Some(files)
        }
        None => None,
    };
    let given_structure = match &cfg.structure_maps {
        Some(path) => Some(read_structure_maps(path, pipeline.edge, n)?),
        None => None,
    };
    let settings = run_settings(cfg, pipeline)?;
    check_output(cfg, &settings)?;
    claim_output(cfg, &settings)?;
    for dir in [cfg.out.clone(), cfg.out.join("images"), cfg.out.join("structure")] {
        remove_stale_temporaries(&dir).with_context(|| format!("{}: cannot remove the temporary files of a killed run", dir.display()))?;
    }

    let owned: Vec<usize> = (0..n).filter(|&i| cfg.shard.takes(i)).collect();
    let done = finished_items(&cfg.out)?;
    let pending: Vec<usize> = owned.iter().copied().filter(|i| !done.contains_key(i)).collect();
    let skipped = owned.len() - pending.len();
    reset_memory_peak();
    let start = Instant::now();
    let (s, edge) = (pipeline.image_size(), pipeline.edge);
    let batches: Vec<Vec<usize>> = pending.chunks(cfg.batch).map(<[usize]>::to_vec).collect();
    let total = pending.len();
    let mut written = 0;
    let mut step_seconds = Vec::new();

    std::thread::scope(|scope| -> Result<()> {
        // Reader: the next batches' EEG, read while the current one is denoised.
        let (eeg_tx, eeg_rx) = mpsc::sync_channel::<Result<(Vec<usize>, Vec<f32>)>>(2);
        let items = &items;
        let batches = &batches;
        scope.spawn(move || {
            for idx in batches {
                if eeg_tx.send(items.read(idx).map(|eeg| (idx.clone(), eeg))).is_err() {
                    return;
                }
            }
        });
        // Writer: PNG encoding, atomic writes and manifest lines.
        let (out_tx, out_rx) = mpsc::sync_channel::<Finished>(4 * cfg.batch);
        let out_dir = &cfg.out;
        let writer = scope.spawn(move || -> Result<()> {
            let path = out_dir.join("manifest.jsonl");
            let mut manifest =
                OpenOptions::new().create(true).append(true).open(&path).with_context(|| format!("{}: cannot open for appending", path.display()))?;
            for item in out_rx {
                let name = item_name(item.index);
                save_png_rgb(out_dir.join("images").join(&name), &item.image)?;
                save_png_gray(out_dir.join("structure").join(&name), &item.structure)?;
                let mut line = serde_json::to_vec(&item.line)?;
                line.push(b'\n');
                manifest.write_all(&line).with_context(|| format!("{}: cannot append", path.display()))?;
            }
            manifest.sync_data().with_context(|| format!("{}: cannot sync", path.display()))?;
            Ok(())
        });

        let result = (|| -> Result<()> {
            // Denoising steps (pools, CUDA graphs) set up by the first batch of each size, reused after.
            let mut steps = crate::pipeline::Steps::default();
            for batch in eeg_rx {
                let (idx, eeg) = batch?;
                let indices: Vec<u64> = idx.iter().map(|&i| i as u64).collect();
                let e2 = edge * edge;
                let given: Option<Vec<f32>> =
                    given_structure.as_ref().map(|maps| idx.iter().flat_map(|&i| maps[i * e2..(i + 1) * e2].iter().copied()).collect());
                let r = pipeline.reconstruct_conditioned(&mut steps, &eeg, &indices, &cfg.sampling, given.as_deref())?;
                step_seconds.push(r.denoise_seconds / cfg.sampling.steps as f64);
                let per_item = r.total_seconds / idx.len() as f64;
                let structure_up = upsample_nearest(&r.structure, edge, s / edge);
                for (k, &index) in idx.iter().enumerate() {
                    let image = from_planes(&r.images[k * 3 * s * s..(k + 1) * 3 * s * s], s);
                    let map = &structure_up[k * s * s..(k + 1) * s * s];
                    let structure = GrayImage::from_fn(s as u32, s as u32, |x, y| {
                        image::Luma([(map[y as usize * s + x as usize].clamp(0.0, 1.0) * 255.0).round() as u8])
                    });
                    let mut line = json!({
                        "index": index,
                        "row": index,
                        "image": format!("images/{}", item_name(index)),
                        "structure": format!("structure/{}", item_name(index)),
                        "seed": cfg.sampling.seed,
                        "steps": cfg.sampling.steps,
                        "scheduler": cfg.sampling.scheduler.to_string(),
                        "guidance": cfg.sampling.guidance,
                        "controlnet_scale": cfg.sampling.controlnet_scale,
                        "seconds": per_item,
                        "batch": idx.len(),
                        "device": if pipeline.device.is_cuda() { "cuda" } else { "cpu" },
                    });
                    if let Some(files) = &seen {
                        line["seen"] = Value::from(files[index].display().to_string());
                    }
                    if out_tx.send(Finished { index, image, structure, line }).is_err() {
                        bail!("the PNG writer stopped");
                    }
                }
                written += idx.len();
                progress(written, total);
            }
            Ok(())
        })();
        drop(out_tx);
        // The writer's own error (a full disk, say) explains a stopped run better than the loop's.
        writer.join().map_err(|_| anyhow::anyhow!("the PNG writer thread panicked"))??;
        result
    })?;
    let mem = memory_stats();
    Ok(Summary {
        owned: owned.len(),
        skipped,
        written,
        seconds: start.elapsed().as_secs_f64(),
        seconds_per_step: if step_seconds.is_empty() { 0.0 } else { step_seconds.iter().sum::<f64>() / step_seconds.len() as f64 },
        batch: cfg.batch,
        peak_host_bytes: mem.host_peak,
        peak_device_bytes: mem.device_peak,
    })
}
