//! The EEG <-> model contract: what a weights folder's encoder expects of the EEG it is given, and the check
//! every EEG file passes before `reconstruct`, `eval` or stage `controlnet` produce anything from it.
//!
//! Stage `encoder` records the contract in `eeg_standardization.json`: the channel names in order and the
//! per-channel mean and standard deviation of the training split (which standardise the encoder's input),
//! and, from the dataset's manifest, the sampling rate, the time window and the unit. A file is refused,
//! naming it and the difference, when its channel names differ or come in another order, when its sampling
//! rate or window differ, when it holds NaN or Inf (found by one pass over the file, with the first index),
//! or when its values' scale is off by orders of magnitude (volts where microvolts were trained on). A file
//! that stores no names or times (a plain `.npy`) is taken to follow the contract, with a one-line note.
//! Weights folders written before the rate, window and unit were recorded are checked on what they hold.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::data::dataset::Manifest;
use crate::data::eeg::EegScan;

/// The file, in a weights folder, that holds the contract.
pub const STANDARDIZATION_FILE: &str = "eeg_standardization.json";

/// A file whose channels' standard deviations are this many times larger or smaller (the median ratio) than
/// the training split's is refused: the same unit and preprocessing differ by a few times at most (averaging
/// 80 repetitions divides noise by 9), a wrong unit by a thousand (millivolts) or a million (volts).
pub const SCALE_TOLERANCE: f64 = 100.0;

/// `eeg_standardization.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EegContract {
    /// The split the statistics were computed on.
    pub split: String,
    /// The channels, in the order of the encoder's input.
    pub ch_names: Vec<String>,
    /// Per channel, over every trial and sample of the split.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling_rate_hz: Option<f64>,
    /// First and last sample time, in seconds from stimulus onset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_s: Option<[f64; 2]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub units: Option<String>,
}

impl EegContract {
    /// The contract of an encoder trained on `manifest`'s `split` with these statistics.
    pub fn from_manifest(manifest: &Manifest, split: &str, mean: Vec<f32>, std: Vec<f32>) -> EegContract {
        EegContract {
            split: split.into(),
            ch_names: manifest.ch_names.clone(),
            mean,
            std,
            sampling_rate_hz: Some(manifest.sampling_rate_hz),
            window_s: manifest.window().map(|(a, b)| [a, b]),
            units: Some(manifest.eeg_units.clone()),
        }
    }

    /// Reads and checks `path` for an encoder of `channels` channels.
    pub fn read(path: &Path, channels: usize) -> Result<EegContract> {
        let p = path.display();
        let text = crate::util::read_to_string(path).with_context(|| format!("{p}: cannot read"))?;
        let contract: EegContract = serde_json::from_str(&text).with_context(|| format!("{p}: not an EEG standardization file"))?;
        ensure!(
            contract.mean.len() == channels && contract.std.len() == channels,
            "{p}: {} means and {} deviations for the encoder's {channels} channels",
            contract.mean.len(),
            contract.std.len()
        );
        ensure!(contract.mean.iter().all(|m| m.is_finite()), "{p}: every 'mean' must be a finite number");
        ensure!(contract.std.iter().all(|s| *s > 0.0 && s.is_finite()), "{p}: every 'std' must be positive");
        ensure!(
            contract.ch_names.is_empty() || contract.ch_names.len() == channels,
            "{p}: names {} channels, the encoder takes {channels}",
            contract.ch_names.len()
        );
        if let Some(rate) = contract.sampling_rate_hz {
            ensure!(rate.is_finite() && rate > 0.0, "{p}: 'sampling_rate_hz' {rate} must be positive");
        }
        Ok(contract)
    }

    /// Writes the contract to `path`, atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        crate::util::write_atomic(path, serde_json::to_string_pretty(self)?.as_bytes()).with_context(|| format!("{}: cannot write", path.display()))
    }

    /// Checks a scanned EEG file against the contract read from `contract`; returns the notes to print
    /// (what was assumed for a file that does not say).
    pub fn check(&self, scan: &EegScan, contract: &Path) -> Result<Vec<String>> {
        let window = scan.times.as_ref().and_then(|t| Some([*t.first()?, *t.last()?]));
        let mut notes = self.check_axes(&scan.path, scan.ch_names.as_deref(), scan.sfreq(), window, contract)?;
        scan.check_finite()?;
        self.check_scale(scan, contract)?;
        if scan.ch_names.is_none() && scan.times.is_none() {
            let rate = self.sampling_rate_hz.map_or("an unrecorded rate".into(), |r| format!("{r} Hz"));
            let window = self.window_s.map_or("an unrecorded window".into(), |[a, b]| format!("{a:.3} to {b:.3} s"));
            let names = if self.ch_names.is_empty() { format!("{} channels", self.std.len()) } else { self.ch_names.join(", ") };
            notes.push(format!("{}: stores no channel names or times; read as the model's {names} at {rate}, {window}", scan.path.display()));
        }
        Ok(notes)
    }

    /// Checks the channel names, rate and window a dataset's manifest declares.
    pub fn check_dataset(&self, manifest: &Manifest, data: &Path, contract: &Path) -> Result<()> {
        let window = manifest.window().map(|(a, b)| [a, b]);
        self.check_axes(&data.join("manifest.json"), Some(&manifest.ch_names), Some(manifest.sampling_rate_hz), window, contract)?;
        Ok(())
    }

    fn check_axes(&self, file: &Path, names: Option<&[String]>, rate: Option<f64>, window: Option<[f64; 2]>, contract: &Path) -> Result<Vec<String>> {
        let (f, c) = (file.display(), contract.display());
        if let Some(names) = names.filter(|_| !self.ch_names.is_empty()) {
            if names != self.ch_names.as_slice() {
                let missing: Vec<&str> = self.ch_names.iter().filter(|n| !names.contains(n)).map(String::as_str).collect();
                let unknown: Vec<&str> = names.iter().filter(|n| !self.ch_names.contains(n)).map(String::as_str).collect();
                if missing.is_empty() && unknown.is_empty() && names.len() == self.ch_names.len() {
                    let i = names.iter().zip(&self.ch_names).position(|(a, b)| a != b).expect("the names differ");
                    bail!(
                        "{f}: holds the model's channels in another order: position {i} is {} here, {} in the model ({c}); reorder the \
                         channel axis to {}",
                        names[i],
                        self.ch_names[i],
                        self.ch_names.join(", ")
                    );
                }
                bail!(
                    "{f}: its channels are not the model's ({c}): the model's {} missing here; {} not known to the model. The model \
                     was trained on {}",
                    if missing.is_empty() { "none".into() } else { missing.join(", ") },
                    if unknown.is_empty() { "none".into() } else { unknown.join(", ") },
                    self.ch_names.join(", ")
                );
            }
        }
        let mut notes = Vec::new();
        match (rate, self.sampling_rate_hz) {
            (Some(here), Some(model)) => {
                ensure!((here - model).abs() <= 1e-6 * model, "{f}: sampled at {here} Hz, the model ({c}) at {model} Hz: resample it to {model} Hz")
            }
            (Some(_), None) => {
                notes.push(format!("{c}: records no sampling rate or time window (written before sgdm recorded them): {f} is not checked for them"))
            }
            _ => {}
        }
        if let (Some([a0, a1]), Some([b0, b1])) = (window, self.window_s) {
            // Half a sample: a window that starts or ends one sample elsewhere is another window.
            let tolerance = self.sampling_rate_hz.map_or(1e-3, |r| 0.5 / r);
            ensure!(
                (a0 - b0).abs() < tolerance && (a1 - b1).abs() < tolerance,
                "{f}: its samples run from {a0:.3} to {a1:.3} s, the model's ({c}) from {b0:.3} to {b1:.3} s: cut the epochs to the \
                 model's window"
            );
        }
        Ok(notes)
    }

    fn check_scale(&self, scan: &EegScan, contract: &Path) -> Result<()> {
        let mut ratios: Vec<f64> = scan.channel_std.iter().zip(&self.std).map(|(s, t)| s / *t as f64).collect();
        ratios.sort_by(f64::total_cmp);
        let Some(&median) = ratios.get(ratios.len() / 2) else { return Ok(()) };
        if (1.0 / SCALE_TOLERANCE..=SCALE_TOLERANCE).contains(&median) {
            return Ok(());
        }
        let unit = self.units.as_deref().map_or(String::new(), |u| format!(" (the training data's unit: {u})"));
        bail!(
            "{}: its values are about {median:.1e} times the scale the model ({}) was trained on: the median over channels of the \
             ratio of standard deviations, allowed between {:.0e} and {SCALE_TOLERANCE:.0e}. A file in volts where microvolts were \
             trained on reads 1e-6; convert it to the training data's unit{unit}",
            scan.path.display(),
            contract.display(),
            1.0 / SCALE_TOLERANCE
        )
    }
}
