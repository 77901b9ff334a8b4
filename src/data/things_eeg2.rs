//! `sgdm data import things-eeg2`: THINGS-EEG2's preprocessed EEG and its image folders, turned into the
//! dataset layout `sgdm train` reads ([`crate::data::dataset`]).
//!
//! Sources, per subject folder (`--eeg-dir`, repeatable): `preprocessed_eeg_training.npy` and
//! `preprocessed_eeg_test.npy`, either the official release's `np.save` of a dict or the NICE/ATM
//! `pickle.dump` of the same dict (keys `preprocessed_eeg_data` `[images, repetitions, channels, time]`,
//! `ch_names`, `times`); and the image set (`--images-dir`): `training_images/<concept>/<image>` and
//! `test_images/<concept>/<image>`, JPEG or PNG.
//!
//! **THINGS order.** EEG row i is the i-th image when the concept folders are sorted by name and the images
//! sorted by name within each concept (`00001_aardvark/aardvark_01b.jpg`, `aardvark_02s.jpg`, ...,
//! `00002_abacus/...`). The release states it on its image set page (https://osf.io/y63gw/wiki, "How to
//! match the training images with the corresponding training EEG trials": "a nested loop with the outer loop
//! iterating through the 1,654 sorted object concepts and the inner loop iterating through the 10 sorted
//! images per object concept", the first dimension of the preprocessed array being that image condition);
//! its `image_metadata.npy` lists the images in that order, and its own code sorts the paths the same way
//! (gifale95/eeg_encoding, `02_dnn_feature_maps_extraction/extract_feature_maps_alexnet.py`: `os.walk`, then
//! `image_list.sort()`; the zero-padded concept numbers make a path sort and a per-level sort agree).
//!
//! **Splits.** `test` is the test images with their EEG (THINGS-EEG2's 200 zero-shot concepts). `val` is
//! carved from the training images by whole concepts: `--val-concepts` concepts (default one in 16, at least
//! one) chosen by a seeded shuffle, so no concept is in both train and val; `train` is the rest. Both keep
//! THINGS order. Counts come from the folders, so a small folder of the same shape imports too.
//!
//! **Subjects.** Several `--eeg-dir`s pool subjects: row i keeps image i, and its repetitions are every
//! subject's, subject by subject in the order given (`sources` in the manifest records which). Their channel
//! names and time axes must agree. For one model per subject, import each subject into its own dataset.
//!
//! **What is written:** `eeg/<split>.npy` (f32 `[images, repetitions, channels, time]`, a copy: the sources
//! are pickles, not addressable by rows, and val is carved out of the training file), the images resized and
//! centre-cropped to `--image-size` as PNG under `images/<split>/<concept>/`, their structure maps under
//! `structure/<split>/<concept>/` and 16x16 targets in `edges16/<split>.npy`, both by the structure extraction
//! `sgdm synth` uses ([`StructureMaps::from_image`]); and `manifest.json`, last, with the channel names,
//! sampling rate, time axis, per-figure concepts and every source file's SHA-256.
//!
//! Every check (files present and decodable, EEG rows against images, concepts of unequal size, duplicate
//! names, NaN or Inf, subjects that disagree) runs before the first write; a run that fails after it leaves
//! no `manifest.json`, so nothing reads the folder as a dataset.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use memmap2::Mmap;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::data::dataset::{Manifest, SourceFile, SplitManifest};
use crate::data::eeg::{EegData, EegFormat};
use crate::data::image::{decode_rgb, resize_center_crop, save_png_gray, save_png_rgb};
use crate::data::npy::{write_f32, NpyWriter};
use crate::data::structure::{StructureMaps, EDGE_SIZE};
use crate::data::synth::Rng;
use crate::data::things::ImageFolder;
use crate::util::write_atomic;

/// The generator name the manifest records.
pub const GENERATOR: &str = "sgdm data import things-eeg2";
/// Bumped whenever the same sources and options would produce different bytes.
pub const IMPORTER_VERSION: u32 = 1;
pub const TRAINING_EEG: &str = "preprocessed_eeg_training.npy";
pub const TEST_EEG: &str = "preprocessed_eeg_test.npy";
pub const TRAINING_IMAGES: &str = "training_images";
pub const TEST_IMAGES: &str = "test_images";
/// Training concepts per validation concept when `--val-concepts` is not given.
pub const DEFAULT_VAL_FRACTION: usize = 16;
/// The default image side: that of `sgdm synth`'s figures (and the structure extraction's).
pub const DEFAULT_IMAGE_SIZE: usize = crate::data::structure::STRUCTURE_SIZE;
/// Images decoded and written per parallel batch (and per progress report).
const BATCH: usize = 64;
/// Worker threads per core for image work, which waits on the disk as much as it computes.
const IO_WORKERS_PER_CORE: usize = 4;
/// Two time axes agree when every sample time differs by less than this (seconds): well under any
/// sampling interval, well over float rounding.
const TIME_TOLERANCE_S: f64 = 1e-6;

/// What `import` does.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportConfig {
    /// One folder per subject, each holding [`TRAINING_EEG`] and [`TEST_EEG`].
    pub eeg_dirs: Vec<PathBuf>,
    /// The folder holding [`TRAINING_IMAGES`] and [`TEST_IMAGES`].
    pub images_dir: PathBuf,
    pub out: PathBuf,
    /// Training concepts held out for validation; `None`: one in [`DEFAULT_VAL_FRACTION`], at least one.
    pub val_concepts: Option<usize>,
    /// Seeds the choice of validation concepts.
    pub seed: u64,
    /// Side the images are stored at.
    pub image_size: usize,
    /// Replace the dataset in a non-empty output folder.
    pub force: bool,
}

/// Progress of a running import: `done` of `total` `unit`s of `phase`, reported at its start and as it goes.
#[derive(Debug, Clone, Copy)]
pub struct ImportProgress<'a> {
    pub phase: &'a str,
    pub unit: &'static str,
    pub done: usize,
    pub total: usize,
}

/// A source EEG file, checked.
struct EegSource {
    path: PathBuf,
    bytes: u64,
    sha256: String,
    /// `[images, repetitions, channels, time]`.
    shape: [usize; 4],
}

/// One subject's two files.
struct Subject {
    training: EegSource,
    test: EegSource,
}

/// A split: which source rows (training or test images) it takes, in order.
struct SplitPlan {
    name: &'static str,
    /// Rows of the source file (and images of the source folder).
    rows: Vec<usize>,
    from_test: bool,
}

/// Everything checked, before the first write.
struct Plan {
    training_images: ImageFolder,
    test_images: ImageFolder,
    subjects: Vec<Subject>,
    ch_names: Vec<String>,
    times: Vec<f64>,
    splits: Vec<SplitPlan>,
    /// (role, folder, bytes, digest) of the two image folders.
    image_sources: Vec<SourceFile>,
}

/// Imports THINGS-EEG2 as the module docs describe and returns the manifest, written last.
pub fn import(cfg: &ImportConfig, progress: &mut dyn FnMut(ImportProgress)) -> Result<Manifest> {
    let plan = check(cfg, progress)?;
    write(cfg, &plan, progress)
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(path).with_context(|| format!("{}: cannot resolve", path.display()))
}

/// Maps `path`, hashes it and decodes it as EEG (no finiteness check).
fn read_eeg(path: &Path) -> Result<(EegData, String, u64)> {
    let file = crate::util::open_file(path).with_context(|| format!("{}: cannot open", path.display()))?;
    // SAFETY: read-only map; a file modified by another process while we read it is outside our contract
    // (and the second read compares checksums).
    let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("{}: cannot map", path.display()))?;
    let eeg = EegData::from_bytes(&mmap, path)?;
    Ok((eeg, sha256_hex(&mmap), mmap.len() as u64))
}

/// Checks the output folder, the image folders and every EEG file; nothing is written.
fn check(cfg: &ImportConfig, progress: &mut dyn FnMut(ImportProgress)) -> Result<Plan> {
    let out = cfg.out.display();
    ensure!(!cfg.eeg_dirs.is_empty(), "give at least one --eeg-dir (a subject's folder holding {TRAINING_EEG} and {TEST_EEG})");
    ensure!(
        (1..=crate::data::image::MAX_IMAGE_SIZE).contains(&cfg.image_size),
        "--image-size {} must be between 1 and {}",
        cfg.image_size,
        crate::data::image::MAX_IMAGE_SIZE
    );
    if cfg.out.exists() {
        ensure!(cfg.out.is_dir(), "{out}: exists and is not a folder");
        let non_empty = std::fs::read_dir(&cfg.out).with_context(|| format!("{out}: cannot list"))?.next().is_some();
        ensure!(!non_empty || cfg.force, "{out}: is not empty; pass --force to replace the dataset in it");
    }

    let training_images = ImageFolder::open(cfg.images_dir.join(TRAINING_IMAGES))
        .with_context(|| format!("{}: expected THINGS-EEG2's image set ({TRAINING_IMAGES}/ and {TEST_IMAGES}/)", cfg.images_dir.display()))?;
    let test_images = ImageFolder::open(cfg.images_dir.join(TEST_IMAGES))
        .with_context(|| format!("{}: expected THINGS-EEG2's image set ({TRAINING_IMAGES}/ and {TEST_IMAGES}/)", cfg.images_dir.display()))?;
    for (folder, what) in [(&training_images, "training"), (&test_images, "test")] {
        check_concept_sizes(folder, what)?;
        check_unique_names(folder)?;
    }
    let training_concepts: BTreeSet<&String> = training_images.concepts.iter().collect();
    if let Some(shared) = test_images.concepts.iter().find(|c| training_concepts.contains(c)) {
        bail!(
            "{}: concept '{shared}' is also a training concept ({}): THINGS-EEG2's test concepts are disjoint from its training \
             concepts (zero-shot), so a shared name means the folders are mixed up",
            test_images.root.join(shared).display(),
            training_images.root.join(shared).display()
        );
    }

    let mut subjects = Vec::new();
    let mut reference: Option<(PathBuf, Vec<String>, Vec<f64>)> = None;
    let files: Vec<(PathBuf, &ImageFolder)> =
        cfg.eeg_dirs.iter().flat_map(|d| [(d.join(TRAINING_EEG), &training_images), (d.join(TEST_EEG), &test_images)]).collect();
    progress(ImportProgress { phase: "checking EEG", unit: "files", done: 0, total: files.len() });
    let mut checked = Vec::new();
    for (k, (path, images)) in files.iter().enumerate() {
        let (eeg, sha256, bytes) = read_eeg(path)?;
        let p = path.display();
        ensure!(
            eeg.format != EegFormat::NpyArray,
            "{p}: a plain numeric array, with no channel names or time axis; the importer reads THINGS-EEG2's preprocessed dict \
             (np.save of a dict, or the NICE/ATM pickle of it)"
        );
        eeg.check_finite()?;
        images.check_pairs_with(eeg.shape[0], path)?;
        let (names, times) = (eeg.ch_names.clone().unwrap_or_default(), eeg.times.clone().unwrap_or_default());
        ensure!(times.len() >= 2, "{p}: 'times' has {} value(s); a sampling rate needs at least 2", times.len());
        match &reference {
            None => reference = Some((path.clone(), names, times)),
            Some((first, ref_names, ref_times)) => {
                if let Some(i) = (0..names.len().max(ref_names.len())).find(|&i| names.get(i) != ref_names.get(i)) {
                    bail!(
                        "{p}: its channels differ from {}'s at position {i}: {} here, {} there ({} vs {} channels); every file must \
                         hold the same channels in the same order",
                        first.display(),
                        names.get(i).map_or("none", String::as_str),
                        ref_names.get(i).map_or("none", String::as_str),
                        names.len(),
                        ref_names.len()
                    );
                }
                ensure!(
                    times.len() == ref_times.len(),
                    "{p}: {} time points, {} has {}; every file must share one time axis",
                    times.len(),
                    first.display(),
                    ref_times.len()
                );
                if let Some(i) = times.iter().zip(ref_times).position(|(a, b)| (a - b).abs() > TIME_TOLERANCE_S) {
                    bail!("{p}: sample {i} is at {} s, in {} at {} s; every file must share one time axis", times[i], first.display(), ref_times[i]);
                }
            }
        }
        checked.push(EegSource { path: absolute(path)?, bytes, sha256, shape: eeg.shape });
        progress(ImportProgress { phase: "checking EEG", unit: "files", done: k + 1, total: files.len() });
    }
    let mut checked = checked.into_iter();
    while let (Some(training), Some(test)) = (checked.next(), checked.next()) {
        subjects.push(Subject { training, test });
    }
    let (_, ch_names, times) = reference.expect("at least one EEG file was read");

    let image_sources = vec![digest_images(&training_images, "training images", progress)?, digest_images(&test_images, "test images", progress)?];
    let splits = plan_splits(cfg, &training_images, &test_images)?;
    Ok(Plan { training_images, test_images, subjects, ch_names, times, splits, image_sources })
}

/// Refuses a concept folder whose image count differs from the one most concepts of the folder have.
fn check_concept_sizes(folder: &ImageFolder, what: &str) -> Result<()> {
    let mut sizes: BTreeMap<&str, usize> = BTreeMap::new();
    folder.concepts.iter().for_each(|c| *sizes.entry(c.as_str()).or_default() += 1);
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    sizes.values().for_each(|&n| *counts.entry(n).or_default() += 1);
    // The most common size; on a tie the larger, so a folder missing images is the one named.
    let (&usual, _) = counts.iter().max_by_key(|&(size, concepts)| (*concepts, *size)).expect("an image folder holds a concept");
    if let Some((concept, n)) = sizes.iter().find(|&(_, &n)| n != usual) {
        bail!(
            "{}: holds {n} image(s), but {} of the {} {what} concepts hold {usual} (THINGS-EEG2: 10 per training concept, 1 per \
             test concept); every concept must have the same number, or the EEG rows would pair with the wrong images",
            folder.root.join(concept).display(),
            counts[&usual],
            sizes.len()
        );
    }
    Ok(())
}

/// Refuses two images with the same name (ignoring case and extension) anywhere in the folder: they would
/// collide in the output (`a.jpg`, `a.png`) or be the same image twice, which makes retrieval ambiguous.
fn check_unique_names(folder: &ImageFolder) -> Result<()> {
    let mut seen: BTreeMap<String, &PathBuf> = BTreeMap::new();
    for path in &folder.images {
        let stem = path.file_stem().map(|s| s.to_string_lossy().to_lowercase()).unwrap_or_default();
        if let Some(first) = seen.insert(stem, path) {
            bail!(
                "{}: has the same name as {} (names must be unique within a folder, whatever their case and extension)",
                path.display(),
                first.display()
            );
        }
    }
    Ok(())
}

/// Decodes every image of `folder` (an unreadable one is an error naming it) and returns the folder's
/// source entry: SHA-256 over each image's path relative to the folder and its own SHA-256, in THINGS order.
fn digest_images(folder: &ImageFolder, role: &str, progress: &mut dyn FnMut(ImportProgress)) -> Result<SourceFile> {
    let phase = format!("checking {role}");
    let total = folder.images.len();
    progress(ImportProgress { phase: &phase, unit: "images", done: 0, total });
    let mut all = Sha256::new();
    let mut bytes = 0u64;
    for start in (0..total).step_by(BATCH) {
        let batch = &folder.images[start..(start + BATCH).min(total)];
        let digests: Vec<(String, u64)> = batch
            .par_iter()
            .map(|path| {
                let data = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
                decode_rgb(&data, path)?;
                Ok((sha256_hex(&data), data.len() as u64))
            })
            .collect::<Result<_>>()?;
        for (path, (digest, size)) in batch.iter().zip(digests) {
            let rel = path.strip_prefix(&folder.root).unwrap_or(path);
            all.update(format!("{}\0{digest}\n", rel.display()).as_bytes());
            bytes += size;
        }
        progress(ImportProgress { phase: &phase, unit: "images", done: start + batch.len(), total });
    }
    Ok(SourceFile {
        role: format!(
            "{role}: {total} files in {} concepts; sha256 over each file's path relative to this folder, a NUL, its own SHA-256 \
             and a newline, in THINGS order",
            folder.concept_count()
        ),
        path: absolute(&folder.root)?.display().to_string(),
        bytes,
        sha256: all.finalize().iter().map(|b| format!("{b:02x}")).collect(),
    })
}

/// The training concepts, in THINGS order, split into (train, val) by a seeded choice of whole concepts.
fn plan_splits(cfg: &ImportConfig, training: &ImageFolder, test: &ImageFolder) -> Result<Vec<SplitPlan>> {
    let mut concepts: Vec<&String> = training.concepts.iter().collect();
    concepts.dedup();
    let n = concepts.len();
    let val_count = cfg.val_concepts.unwrap_or((n / DEFAULT_VAL_FRACTION).max(1));
    ensure!(
        val_count >= 1 && val_count < n,
        "--val-concepts {val_count}: {} holds {n} training concept(s); validation needs at least one and training must keep at least one",
        training.root.display()
    );
    let mut order: Vec<usize> = (0..n).collect();
    Rng::new(cfg.seed).shuffle(&mut order);
    let val: BTreeSet<&String> = order[..val_count].iter().map(|&i| concepts[i]).collect();
    let (mut train_rows, mut val_rows) = (Vec::new(), Vec::new());
    for (row, concept) in training.concepts.iter().enumerate() {
        if val.contains(concept) {
            val_rows.push(row)
        } else {
            train_rows.push(row)
        }
    }
    Ok(vec![
        SplitPlan { name: "train", rows: train_rows, from_test: false },
        SplitPlan { name: "val", rows: val_rows, from_test: false },
        SplitPlan { name: "test", rows: (0..test.images.len()).collect(), from_test: true },
    ])
}

/// Makes `out` ready: created if absent; otherwise only what the importer writes is removed (the manifest
/// first, so an interrupted replacement never looks finished). `check` refused a non-empty folder without --force.
fn prepare_output(out: &Path) -> Result<()> {
    crate::data::dataset::remove_dataset_outputs(out)?;
    for sub in ["eeg", "edges16", "images", "structure"] {
        let dir = out.join(sub);
        std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    }
    Ok(())
}

/// The image's name in the output: its concept folder and its name, as PNG.
fn output_name(folder: &ImageFolder, row: usize) -> String {
    let stem = folder.images[row].file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    format!("{}/{stem}.png", folder.concepts[row])
}

fn write(cfg: &ImportConfig, plan: &Plan, progress: &mut dyn FnMut(ImportProgress)) -> Result<Manifest> {
    let out = &cfg.out;
    prepare_output(out)?;
    let [_, _, channels, samples] = plan.subjects[0].training.shape;
    let per_rep = channels * samples;
    let reps = |test: bool| -> usize { plan.subjects.iter().map(|s| if test { s.test.shape[1] } else { s.training.shape[1] }).sum() };

    // EEG: every split's file filled in place, one source file in memory at a time.
    let mut writers = plan
        .splits
        .iter()
        .map(|s| NpyWriter::create(out.join(format!("eeg/{}.npy", s.name)), &[s.rows.len(), reps(s.from_test), channels, samples]))
        .collect::<Result<Vec<_>>>()?;
    let total_files = 2 * plan.subjects.len();
    progress(ImportProgress { phase: "writing EEG", unit: "files", done: 0, total: total_files });
    let mut offsets = [0usize; 2];
    for (k, subject) in plan.subjects.iter().enumerate() {
        for (from_test, source) in [(false, &subject.training), (true, &subject.test)] {
            let (eeg, sha256, _) = read_eeg(&source.path)?;
            ensure!(
                sha256 == source.sha256,
                "{}: changed while it was being imported (SHA-256 {} when checked, {sha256} now)",
                source.path.display(),
                source.sha256
            );
            let r = source.shape[1];
            let offset = offsets[from_test as usize];
            for (split, writer) in plan.splits.iter().zip(&mut writers).filter(|(s, _)| s.from_test == from_test) {
                let total_reps = reps(from_test);
                let values = writer.values_mut();
                for (i, &row) in split.rows.iter().enumerate() {
                    let dst = (i * total_reps + offset) * per_rep;
                    values[dst..dst + r * per_rep].copy_from_slice(&eeg.data[row * r * per_rep..(row + 1) * r * per_rep]);
                }
            }
            offsets[from_test as usize] += r;
            progress(ImportProgress { phase: "writing EEG", unit: "files", done: 2 * k + 1 + from_test as usize, total: total_files });
        }
    }
    for writer in writers {
        writer.finish()?;
    }

    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(IO_WORKERS_PER_CORE * cores)
        .build()
        .with_context(|| format!("{}: cannot start worker threads", out.display()))?;
    let mut splits = Vec::new();
    for split in &plan.splits {
        let folder = if split.from_test { &plan.test_images } else { &plan.training_images };
        let names: Vec<String> = split.rows.iter().map(|&row| output_name(folder, row)).collect();
        for concept in split.rows.iter().map(|&row| &folder.concepts[row]).collect::<BTreeSet<_>>() {
            for sub in ["images", "structure"] {
                let dir = out.join(sub).join(split.name).join(concept);
                std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
            }
        }
        let phase = format!("writing {} images", split.name);
        progress(ImportProgress { phase: &phase, unit: "images", done: 0, total: split.rows.len() });
        let mut edges16 = Vec::with_capacity(split.rows.len() * EDGE_SIZE * EDGE_SIZE);
        for start in (0..split.rows.len()).step_by(BATCH) {
            let end = (start + BATCH).min(split.rows.len());
            let maps: Vec<Vec<f32>> = pool.install(|| {
                (start..end)
                    .into_par_iter()
                    .map(|i| {
                        let source = &folder.images[split.rows[i]];
                        let data = std::fs::read(source).with_context(|| format!("{}: cannot read", source.display()))?;
                        let img = decode_rgb(&data, source)?;
                        save_png_rgb(out.join(format!("images/{}/{}", split.name, names[i])), &resize_center_crop(&img, cfg.image_size as u32))?;
                        let maps = StructureMaps::from_image(&img);
                        save_png_gray(out.join(format!("structure/{}/{}", split.name, names[i])), &maps.edges_image())?;
                        Ok(maps.edges16)
                    })
                    .collect::<Result<_>>()
            })?;
            maps.into_iter().for_each(|m| edges16.extend(m));
            progress(ImportProgress { phase: &phase, unit: "images", done: end, total: split.rows.len() });
        }
        let edges_path = format!("edges16/{}.npy", split.name);
        write_f32(out.join(&edges_path), &[split.rows.len(), EDGE_SIZE, EDGE_SIZE], &edges16)?;
        splits.push(SplitManifest {
            name: split.name.into(),
            figures: split.rows.len(),
            repetitions: reps(split.from_test),
            eeg: format!("eeg/{}.npy", split.name),
            eeg_shape: vec![split.rows.len(), reps(split.from_test), channels, samples],
            edges16: edges_path,
            images: names.iter().map(|n| format!("images/{}/{n}", split.name)).collect(),
            structure: names.iter().map(|n| format!("structure/{}/{n}", split.name)).collect(),
            concepts: split.rows.iter().map(|&row| folder.concepts[row].clone()).collect(),
        });
    }

    let subjects = plan.subjects.len();
    let mut sources = Vec::new();
    for (k, subject) in plan.subjects.iter().enumerate() {
        for (what, source) in [("training EEG", &subject.training), ("test EEG", &subject.test)] {
            sources.push(SourceFile {
                role: format!("{what}, subject {} of {subjects} (repetitions {} of each row)", k + 1, source.shape[1]),
                path: source.path.display().to_string(),
                bytes: source.bytes,
                sha256: source.sha256.clone(),
            });
        }
    }
    sources.extend(plan.image_sources.iter().cloned());
    let dt = (plan.times[plan.times.len() - 1] - plan.times[0]) / (plan.times.len() - 1) as f64;
    let manifest = Manifest {
        generator: GENERATOR.into(),
        generator_version: IMPORTER_VERSION,
        sgdm_version: env!("CARGO_PKG_VERSION").into(),
        seed: cfg.seed,
        snr: None,
        ch_names: plan.ch_names.clone(),
        sampling_rate_hz: (1e6 / dt).round() / 1e6,
        times: plan.times.iter().map(|&t| t as f32).collect(),
        eeg_units: "as stored in the source files".into(),
        image_size: cfg.image_size,
        edge_size: EDGE_SIZE,
        splits,
        sources,
    };
    let path = out.join("manifest.json");
    let json = serde_json::to_string_pretty(&manifest).context("serialising the manifest")?;
    write_atomic(&path, json.as_bytes()).with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(manifest)
}
