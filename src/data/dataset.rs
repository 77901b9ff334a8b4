//! The dataset layout `sgdm train` reads, written by `sgdm synth` (simulated) and `sgdm data import
//! things-eeg2` (a real recording): `manifest.json`, and per split an EEG `.npy`, the images, their structure
//! maps (PNG) and their 16x16 structure targets (`.npy`). Paths in the manifest are relative to the dataset
//! folder. The importer's additions (`concepts`, `sources`) are optional, so a manifest written before them
//! still reads, and `snr` is absent where there is no simulation.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// What a dataset writer (`sgdm synth`, the importers) writes inside its output folder, the manifest first;
/// `--force` removes these and nothing else.
pub const DATASET_OUTPUTS: [&str; 5] = ["manifest.json", "eeg", "edges16", "images", "structure"];

/// Removes [`DATASET_OUTPUTS`] from `out`, in order: the manifest goes first, so an interrupted replacement
/// never looks finished. Anything else in the folder is left alone.
pub fn remove_dataset_outputs(out: &Path) -> Result<()> {
    for name in DATASET_OUTPUTS {
        let path = out.join(name);
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else if path.exists() {
            std::fs::remove_file(&path)
        } else {
            Ok(())
        };
        removed.with_context(|| format!("{}: cannot remove", path.display()))?;
    }
    Ok(())
}

/// `manifest.json`: what a reader needs to use the dataset. It is written last: a folder without it holds
/// an unfinished run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// What wrote the dataset: `sgdm synth` or `sgdm data import things-eeg2`.
    pub generator: String,
    pub generator_version: u32,
    pub sgdm_version: String,
    /// synth: the seed every figure and trial derives from; import: the seed that chose the validation concepts.
    pub seed: u64,
    /// synth only: the gain of the stimulus-locked EEG.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snr: Option<f64>,
    /// The EEG channels, in the order of the EEG arrays' channel axis.
    pub ch_names: Vec<String>,
    pub sampling_rate_hz: f64,
    /// Seconds from stimulus onset, one per sample.
    pub times: Vec<f32>,
    /// The EEG values' unit, as far as it is known (the official THINGS-EEG2 files are whitened, so unitless).
    pub eeg_units: String,
    /// Side of the (square) images in `images`.
    pub image_size: usize,
    /// Side of the structure targets in `edges16`.
    pub edge_size: usize,
    pub splits: Vec<SplitManifest>,
    /// import only: the files the dataset was made from, with their checksums.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<SourceFile>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitManifest {
    pub name: String,
    pub figures: usize,
    pub repetitions: usize,
    /// float32 [figures, repetitions, channels, samples].
    pub eeg: String,
    pub eeg_shape: Vec<usize>,
    /// float32 [figures, edge_size, edge_size]: block-averaged structure maps, strongest block 1.
    pub edges16: String,
    /// Per figure, the stimulus (RGB PNG).
    pub images: Vec<String>,
    /// Per figure, the structure map (grey PNG, white edges on black).
    pub structure: Vec<String>,
    /// import only: per figure, the THINGS concept (folder name) it shows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub concepts: Vec<String>,
}

/// A source file of an imported dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceFile {
    /// What the file was used for, e.g. `training EEG, subject 1 of 2`.
    pub role: String,
    /// As given on the command line, made absolute.
    pub path: String,
    pub bytes: u64,
    /// SHA-256 of the whole file, hex.
    pub sha256: String,
}

impl Manifest {
    /// Reads `data/manifest.json`.
    pub fn read(data: &Path) -> Result<Manifest> {
        let path = data.join("manifest.json");
        let text = crate::util::read_to_string(&path).with_context(|| format!("{}: cannot read the dataset manifest", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: not an sgdm dataset manifest", path.display()))
    }

    /// The split named `name`; `data` names the dataset in the error.
    pub fn split(&self, data: &Path, name: &str) -> Result<&SplitManifest> {
        self.splits
            .iter()
            .find(|s| s.name == name)
            .with_context(|| format!("{}: the manifest has no '{name}' split", data.join("manifest.json").display()))
    }

    /// First and last sample time in seconds.
    pub fn window(&self) -> Option<(f64, f64)> {
        Some((*self.times.first()? as f64, *self.times.last()? as f64))
    }

    /// The channel names and sample times of a split's EEG file `eeg` (`DATASET/eeg/<split>.npy`), from the
    /// manifest of the dataset it is in; `None` when it is in no readable dataset. A plain `.npy` stores
    /// neither, so this is how a dataset's own file is checked against a model as fully as a THINGS-EEG2 one.
    pub fn axes_of(eeg: &Path) -> Option<(Vec<String>, Vec<f64>)> {
        let found = DatasetSplit::of(eeg)?;
        Some((found.manifest.ch_names.clone(), found.manifest.times.iter().map(|&t| t as f64).collect()))
    }
}

/// The dataset and split an EEG file belongs to: `DATASET/eeg/<split>.npy` listed in `DATASET/manifest.json`.
#[derive(Debug, Clone)]
pub struct DatasetSplit {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub split: SplitManifest,
}

impl DatasetSplit {
    /// The split whose EEG file is `eeg`; `None` when `eeg` is in no readable dataset.
    pub fn of(eeg: &Path) -> Option<DatasetSplit> {
        let file = std::fs::canonicalize(eeg).ok()?;
        let dir = file.parent()?.parent()?.to_path_buf();
        let manifest = Manifest::read(&dir).ok()?;
        let split = manifest.splits.iter().find(|s| std::fs::canonicalize(dir.join(&s.eeg)).is_ok_and(|p| p == file))?.clone();
        Some(DatasetSplit { dir, manifest, split })
    }

    /// Another split of the same dataset.
    pub fn sibling(&self, name: &str) -> Result<DatasetSplit> {
        Ok(DatasetSplit { dir: self.dir.clone(), manifest: self.manifest.clone(), split: self.manifest.split(&self.dir, name)?.clone() })
    }

    /// The split's structure targets `[figures, edge_size²]` (`edges16/<split>.npy`), checked for shape and
    /// finiteness.
    pub fn structure_targets(&self) -> Result<Vec<f32>> {
        let path = self.dir.join(&self.split.edges16);
        let file = crate::data::npy::NpyFile::open(&path)?;
        let e = self.manifest.edge_size;
        let shape = &file.header.shape;
        anyhow::ensure!(
            shape.first() == Some(&self.split.figures) && shape[1..].iter().product::<usize>() == e * e,
            "{}: shape {shape:?}, the manifest describes {} figures of {e}x{e} structure targets",
            path.display(),
            self.split.figures
        );
        let values = file.to_f32().with_context(|| format!("{}: cannot read", path.display()))?;
        anyhow::ensure!(values.iter().all(|v| v.is_finite()), "{}: holds NaN or Inf", path.display());
        Ok(values)
    }

    /// The split's images, one per figure.
    pub fn image_paths(&self) -> Vec<PathBuf> {
        self.split.images.iter().map(|p| self.dir.join(p)).collect()
    }

    pub fn eeg_path(&self) -> PathBuf {
        self.dir.join(&self.split.eeg)
    }
}
