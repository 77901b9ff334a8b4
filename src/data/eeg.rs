//! EEG recordings: one loader that recognises every layout sgdm reads (a plain numeric `.npy`, the
//! THINGS-EEG2 official `np.save` of a dict, the NICE/ATM `pickle.dump` of the same dict), converts the data
//! to f32 `[rows, repetitions, channels, time]`, and validates it; plus row-range reads of plain `.npy` files
//! straight from the memory map.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use memmap2::Mmap;

use crate::data::npy::{self, NpyDtype, NpyFile};
use crate::data::pickle::{self, ArrayData, Dtype, NdArray, Value};

/// The layout a file was recognised as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EegFormat {
    /// A numeric `.npy` array `[N, C, T]` or `[N, R, C, T]`.
    NpyArray,
    /// THINGS-EEG2 official preprocessed file: `np.save` of a dict (`.npy` header, then a pickle).
    ThingsEeg2,
    /// NICE/ATM re-preprocessed file: `pickle.dump` of the same dict, no `.npy` header.
    PickledDict,
}

impl fmt::Display for EegFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EegFormat::NpyArray => "numeric .npy array",
            EegFormat::ThingsEeg2 => "THINGS-EEG2 preprocessed (np.save of a dict)",
            EegFormat::PickledDict => "NICE/ATM preprocessed (pickle.dump of a dict)",
        })
    }
}

/// What to do with repeated presentations of the same image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repetitions {
    /// `[N, R, C, T]` as stored.
    Keep,
    /// The mean over repetitions: `[N, 1, C, T]`.
    Average,
    /// Every repetition a row of its own: `[N·R, 1, C, T]`, row `n·R + r`.
    Trials,
}

/// An EEG recording in f32.
#[derive(Debug, Clone)]
pub struct EegData {
    pub path: PathBuf,
    pub format: EegFormat,
    /// The element type stored in the file.
    pub source_dtype: Dtype,
    /// `[rows, repetitions, channels, time]`.
    pub shape: [usize; 4],
    /// C order over `shape`.
    pub data: Vec<f32>,
    pub ch_names: Option<Vec<String>>,
    /// Sample times in seconds, when the file stores them.
    pub times: Option<Vec<f64>>,
}

/// What one pass over an EEG file found, for checking it against a model before any output: its shape,
/// the names and times it stores, the standard deviation of each channel over every finite value (all
/// rows, repetitions and samples), and its non-finite values.
#[derive(Debug, Clone, PartialEq)]
pub struct EegScan {
    pub path: PathBuf,
    /// `[rows, repetitions, channels, time]` as stored.
    pub shape: [usize; 4],
    pub ch_names: Option<Vec<String>>,
    pub times: Option<Vec<f64>>,
    pub channel_std: Vec<f64>,
    pub non_finite: Option<NonFinite>,
}

impl EegScan {
    /// Sampling rate in Hz, from the spacing of `times`.
    pub fn sfreq(&self) -> Option<f64> {
        sfreq(self.times.as_deref()?)
    }

    /// Refuses a file holding NaN or Inf, naming the first and the count.
    pub fn check_finite(&self) -> Result<()> {
        match self.non_finite {
            None => Ok(()),
            Some(nf) => Err(non_finite_error(&self.path, nf)),
        }
    }
}

/// Per-channel sums over the finite values of whole `[rows, R, C, T]` blocks, and the first non-finite value.
struct ChannelMoments {
    shape: [usize; 4],
    sum: Vec<f64>,
    squares: Vec<f64>,
    count: Vec<u64>,
    non_finite: Option<NonFinite>,
}

impl ChannelMoments {
    fn new(shape: [usize; 4]) -> ChannelMoments {
        let c = shape[2];
        ChannelMoments { shape, sum: vec![0.0; c], squares: vec![0.0; c], count: vec![0; c], non_finite: None }
    }

    /// Adds rows starting at `row_offset`.
    fn add(&mut self, data: &[f32], row_offset: usize) {
        let [_, r, c, t] = self.shape;
        for (k, samples) in data.chunks_exact(t).enumerate() {
            let ch = k % c;
            for &v in samples.iter().filter(|v| v.is_finite()) {
                self.sum[ch] += v as f64;
                self.squares[ch] += v as f64 * v as f64;
                self.count[ch] += 1;
            }
        }
        if let Some(found) = non_finite(data, [data.len() / (r * c * t).max(1), r, c, t], row_offset) {
            match &mut self.non_finite {
                Some(nf) => nf.count += found.count,
                None => self.non_finite = Some(found),
            }
        }
    }

    fn finish(self, path: &Path, ch_names: Option<Vec<String>>, times: Option<Vec<f64>>) -> EegScan {
        let channel_std = (0..self.shape[2])
            .map(|ch| {
                let n = self.count[ch].max(1) as f64;
                let mean = self.sum[ch] / n;
                (self.squares[ch] / n - mean * mean).max(0.0).sqrt()
            })
            .collect();
        EegScan { path: path.to_path_buf(), shape: self.shape, ch_names, times, channel_std, non_finite: self.non_finite }
    }
}

fn sfreq(t: &[f64]) -> Option<f64> {
    if t.len() < 2 {
        return None;
    }
    let dt = (t[t.len() - 1] - t[0]) / (t.len() - 1) as f64;
    Some((1e6 / dt).round() / 1e6)
}

/// Where the first non-finite value is, and how many there are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NonFinite {
    pub count: usize,
    /// `[row, repetition, channel, t]`.
    pub first: [usize; 4],
}

impl EegData {
    /// Loads, checks that every value is finite, and arranges repetitions.
    pub fn open(path: impl AsRef<Path>, repetitions: Repetitions) -> Result<EegData> {
        let eeg = EegData::open_unchecked(path)?;
        eeg.check_finite()?;
        Ok(eeg.with_repetitions(repetitions))
    }

    /// Loads as stored, without the finiteness check (for inspecting a broken file).
    pub fn open_unchecked(path: impl AsRef<Path>) -> Result<EegData> {
        let path = path.as_ref();
        let file = crate::util::open_file(path).with_context(|| format!("{}: cannot open", path.display()))?;
        // SAFETY: read-only map; a file modified by another process while we read it is outside our contract.
        let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("{}: cannot map", path.display()))?;
        EegData::from_bytes(&mmap, path)
    }

    /// Recognises and decodes a file's bytes; `path` names it in errors. No finiteness check.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<EegData> {
        let p = path.display();
        if bytes.starts_with(b"\x93NUMPY") {
            let header = npy::parse_header(bytes, path)?;
            let data = &bytes[header.data_offset..];
            if header.dtype == NpyDtype::Object {
                let root = pickle::load(data, path)?;
                let dict = match root {
                    Value::Array(NdArray { shape, data: ArrayData::Objects(mut items), .. }) if shape.is_empty() && items.len() == 1 => {
                        items.pop().unwrap()
                    }
                    v => bail!("{p}: the pickled object is a {}, not a 0-d object array holding a dict", v.kind()),
                };
                return from_dict(&dict, path, EegFormat::ThingsEeg2);
            }
            let shape = shape4(&header.shape, path)?;
            let want = header.numel().saturating_mul(header.dtype.size());
            ensure!(data.len() == want, "{p}: shape {:?} needs {want} bytes of data, the file holds {}", header.shape, data.len());
            return Ok(EegData {
                path: path.to_path_buf(),
                format: EegFormat::NpyArray,
                source_dtype: match header.dtype {
                    NpyDtype::F16 => Dtype::F16,
                    NpyDtype::F32 => Dtype::F32,
                    NpyDtype::F64 | NpyDtype::Object => Dtype::F64,
                },
                shape,
                data: npy::decode_f32(header.dtype, data),
                ch_names: None,
                times: None,
            });
        }
        ensure!(bytes.first() == Some(&0x80), "{p}: neither a .npy file (no \\x93NUMPY magic) nor a pickle (no protocol 2+ header)");
        let root = pickle::load(bytes, path)?;
        from_dict(&root, path, EegFormat::PickledDict)
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Sampling rate in Hz, from the spacing of `times`.
    pub fn sfreq(&self) -> Option<f64> {
        sfreq(self.times.as_deref()?)
    }

    /// The file's [`EegScan`], from the values as stored.
    pub fn scan(&self) -> EegScan {
        let mut moments = ChannelMoments::new(self.shape);
        moments.add(&self.data, 0);
        moments.finish(&self.path, self.ch_names.clone(), self.times.clone())
    }

    /// First and last sample time in seconds.
    pub fn time_range(&self) -> Option<(f64, f64)> {
        let t = self.times.as_ref()?;
        Some((*t.first()?, *t.last()?))
    }

    /// Counts NaN and ±Inf values and locates the first.
    pub fn non_finite(&self) -> Option<NonFinite> {
        non_finite(&self.data, self.shape, 0)
    }

    pub fn check_finite(&self) -> Result<()> {
        check_finite(&self.data, self.shape, 0, &self.path)
    }

    /// Checks the channel count and time length against what a model expects.
    pub fn expect(&self, channels: usize, timepoints: usize) -> Result<()> {
        let [_, _, c, t] = self.shape;
        ensure!(
            (c, t) == (channels, timepoints),
            "{}: holds {c} channels × {t} time points (shape {:?}), the configuration expects {channels} × {timepoints}",
            self.path.display(),
            self.shape
        );
        Ok(())
    }

    pub fn with_repetitions(mut self, repetitions: Repetitions) -> EegData {
        let [n, r, c, t] = self.shape;
        match repetitions {
            Repetitions::Keep => {}
            Repetitions::Trials => self.shape = [n * r, 1, c, t],
            Repetitions::Average => {
                let row = c * t;
                let mut mean = vec![0f32; n * row];
                for (i, out) in mean.chunks_exact_mut(row).enumerate() {
                    for rep in self.data[i * r * row..(i + 1) * r * row].chunks_exact(row) {
                        out.iter_mut().zip(rep).for_each(|(o, v)| *o += v);
                    }
                    out.iter_mut().for_each(|o| *o /= r as f32);
                }
                self.data = mean;
                self.shape = [n, 1, c, t];
            }
        }
        self
    }
}

/// `[N, C, T]` becomes `[N, 1, C, T]`; `[N, R, C, T]` stays.
fn shape4(shape: &[usize], path: &Path) -> Result<[usize; 4]> {
    let shape4 = match *shape {
        [n, c, t] => [n, 1, c, t],
        [n, r, c, t] => [n, r, c, t],
        _ => bail!(
            "{}: EEG array has rank {} (shape {shape:?}); expected [images, channels, time] or [images, repetitions, channels, time]",
            path.display(),
            shape.len()
        ),
    };
    ensure!(shape4[1..].iter().all(|&d| d > 0), "{}: EEG array of shape {shape:?} has no repetitions, channels or time points", path.display());
    Ok(shape4)
}

fn non_finite(data: &[f32], shape: [usize; 4], row_offset: usize) -> Option<NonFinite> {
    let first = data.iter().position(|v| !v.is_finite())?;
    let count = data[first..].iter().filter(|v| !v.is_finite()).count();
    let [_, r, c, t] = shape;
    let index = [row_offset + first / (r * c * t), first / (c * t) % r, first / t % c, first % t];
    Some(NonFinite { count, first: index })
}

fn check_finite(data: &[f32], shape: [usize; 4], row_offset: usize, path: &Path) -> Result<()> {
    match non_finite(data, shape, row_offset) {
        None => Ok(()),
        Some(nf) => Err(non_finite_error(path, nf)),
    }
}

fn non_finite_error(path: &Path, NonFinite { count, first }: NonFinite) -> anyhow::Error {
    anyhow::anyhow!("{}: {count} non-finite value(s) (NaN or Inf); the first is at [row, repetition, channel, t] = {first:?}", path.display())
}

/// Reads the dict both preprocessed layouts store.
fn from_dict(dict: &Value, path: &Path, format: EegFormat) -> Result<EegData> {
    let p = path.display();
    let Value::Dict(items) = dict else { bail!("{p}: the pickled object is a {}, expected a dict", dict.kind()) };
    let key = |name: &str| {
        dict.get(name).with_context(|| {
            let keys: Vec<String> = items.iter().map(|(k, _)| if let Value::Str(s) = k { s.clone() } else { k.kind().into() }).collect();
            format!("{p}: the dict lacks the key '{name}' (it has: {})", keys.join(", "))
        })
    };

    let eeg = match key("preprocessed_eeg_data")? {
        Value::Array(a) => a,
        v => bail!("{p}: 'preprocessed_eeg_data' is a {}, expected a numpy float array", v.kind()),
    };
    let npy_dtype = match eeg.dtype {
        Dtype::F16 => NpyDtype::F16,
        Dtype::F32 => NpyDtype::F32,
        Dtype::F64 => NpyDtype::F64,
        d => bail!("{p}: 'preprocessed_eeg_data' has dtype {d}, expected float16, float32 or float64"),
    };
    let shape = shape4(&eeg.shape, path).with_context(|| format!("{p}: in 'preprocessed_eeg_data'"))?;
    let data = match &eeg.data {
        ArrayData::Raw(bytes) => npy::decode_f32(npy_dtype, bytes),
        ArrayData::Objects(_) => bail!("{p}: 'preprocessed_eeg_data' holds Python objects, expected floats"),
    };
    let [_, _, channels, timepoints] = shape;

    let ch_names = match key("ch_names")? {
        Value::List(v) | Value::Array(NdArray { data: ArrayData::Objects(v), .. }) => v
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::Str(s) => Ok(s.clone()),
                v => bail!("{p}: 'ch_names'[{i}] is a {}, expected a str", v.kind()),
            })
            .collect::<Result<Vec<_>>>()?,
        Value::Array(a) if matches!(a.dtype, Dtype::Unicode(_)) => {
            a.to_strings().with_context(|| format!("{p}: 'ch_names' holds invalid code points"))?
        }
        v => bail!("{p}: 'ch_names' is a {}, expected a list of str or a numpy str array", v.kind()),
    };
    ensure!(ch_names.len() == channels, "{p}: 'ch_names' names {} channels, 'preprocessed_eeg_data' has {channels}", ch_names.len());

    let times = match key("times")? {
        Value::Array(a) => a.to_f64().with_context(|| format!("{p}: 'times' has dtype {}, expected numbers", a.dtype))?,
        Value::List(v) => v
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::Float(x) => Ok(*x),
                Value::Int(x) => Ok(*x as f64),
                v => bail!("{p}: 'times'[{i}] is a {}, expected a number", v.kind()),
            })
            .collect::<Result<Vec<_>>>()?,
        v => bail!("{p}: 'times' is a {}, expected a numpy array of seconds", v.kind()),
    };
    ensure!(times.len() == timepoints, "{p}: 'times' has {} values, 'preprocessed_eeg_data' has {timepoints} time points", times.len());
    if let Some(i) = times.windows(2).position(|w| w[1].partial_cmp(&w[0]) != Some(std::cmp::Ordering::Greater)) {
        bail!("{p}: 'times' does not increase at index {} ({} then {})", i + 1, times[i], times[i + 1]);
    }

    Ok(EegData { path: path.to_path_buf(), format, source_dtype: eeg.dtype, shape, data, ch_names: Some(ch_names), times: Some(times) })
}

/// Values decoded at a time by [`EegRows::scan`] (16 MiB of f32).
const SCAN_BLOCK_VALUES: usize = 4 << 20;

/// Row-range reads of a plain numeric `.npy` EEG array, from its memory map: a batch costs its own rows only.
pub struct EegRows {
    file: NpyFile,
    shape: [usize; 4],
}

impl EegRows {
    pub fn open(path: impl AsRef<Path>) -> Result<EegRows> {
        let file = NpyFile::open(path)?;
        ensure!(
            file.header.dtype != NpyDtype::Object,
            "{}: holds a pickled dict, which cannot be read by rows; load it whole with EegData::open",
            file.path.display()
        );
        let shape = shape4(&file.header.shape, &file.path)?;
        Ok(EegRows { file, shape })
    }

    /// `[rows, repetitions, channels, time]`.
    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }

    /// The file's [`EegScan`]: one pass over the memory map, a block of rows at a time, so a file larger than
    /// memory is scanned whole before its first batch is read.
    pub fn scan(&self) -> Result<EegScan> {
        let [n, r, c, t] = self.shape;
        let per_row = r * c * t;
        let rows_per_block = (SCAN_BLOCK_VALUES / per_row.max(1)).max(1);
        let mut moments = ChannelMoments::new(self.shape);
        for start in (0..n).step_by(rows_per_block) {
            let end = (start + rows_per_block).min(n);
            moments.add(&self.file.read_f32(start * per_row, (end - start) * per_row)?, start);
        }
        Ok(moments.finish(&self.file.path, None, None))
    }

    /// Rows `rows` as f32 `[rows.len(), R, C, T]`, checked finite (errors give the row index in the file).
    pub fn read(&self, rows: Range<usize>) -> Result<Vec<f32>> {
        let [n, r, c, t] = self.shape;
        ensure!(
            rows.start <= rows.end && rows.end <= n,
            "{}: rows {}..{} are out of range ({n} rows)",
            self.file.path.display(),
            rows.start,
            rows.end
        );
        let row = r * c * t;
        let data = self.file.read_f32(rows.start * row, rows.len() * row)?;
        check_finite(&data, [rows.len(), r, c, t], rows.start, &self.file.path)?;
        Ok(data)
    }
}
