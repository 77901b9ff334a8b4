//! Weights IO: safetensors files read through memmap (f32, f16 and bf16, converted to the dtype asked for),
//! safetensors written atomically, and diffusers component directories (`config.json` + weights).
//! Every error names the file, and the tensor where there is one.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, SafeTensorError};

use crate::runtime::device::Device;
use crate::tensor::{convert_bytes, DType, Tensor};
use crate::util::write_atomic_with;

#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    /// The I/O error is part of the message, not a chained source: `{:#}` would print it twice.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: truncated safetensors file: {detail}")]
    Truncated { path: PathBuf, detail: String },
    #[error("{path}: corrupt safetensors file: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("{path}: tensor '{tensor}' has dtype {dtype}, which sgdm does not read (it reads F32, F16 and BF16)")]
    UnsupportedDtype { path: PathBuf, tensor: String, dtype: String },
    #[error("{path}: missing tensor '{tensor}'{hint}")]
    Missing { path: PathBuf, tensor: String, hint: String },
    #[error("{path}: tensor '{tensor}' has shape {found:?}, expected {expected:?}")]
    Shape { path: PathBuf, tensor: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("{path}: {count} unknown tensor name(s), not used by the model: {names}")]
    Unknown { path: PathBuf, count: usize, names: String },
    #[error("{path}: {detail}")]
    Component { path: PathBuf, detail: String },
    #[error("{path}: cannot write safetensors: {detail}")]
    Write { path: PathBuf, detail: String },
}

fn dtype_from_safetensors(d: StDtype) -> Option<DType> {
    match d {
        StDtype::F32 => Some(DType::F32),
        StDtype::F16 => Some(DType::F16),
        StDtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

fn dtype_to_safetensors(d: DType) -> StDtype {
    match d {
        DType::F32 => StDtype::F32,
        DType::F16 => StDtype::F16,
        DType::BF16 => StDtype::BF16,
    }
}

#[derive(Debug, Clone)]
struct Entry {
    dtype: StDtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// A file's bytes: its memory map, or bytes already in memory (the fuzzer's).
#[derive(Debug)]
enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// An open safetensors file. Tensors are read on demand from the memory map; the names read are recorded
/// so that a model loader can refuse a file holding names it does not know.
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Bytes,
    data_start: usize,
    entries: BTreeMap<String, Entry>,
    metadata: BTreeMap<String, String>,
    used: Mutex<HashSet<String>>,
}

impl SafetensorsFile {
    pub fn open(path: impl AsRef<Path>) -> Result<SafetensorsFile, WeightError> {
        let path = path.as_ref().to_path_buf();
        let io = |error| WeightError::Io { path: path.clone(), error };
        let file = crate::util::open_file(&path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len() as usize;
        if len < 8 {
            return Err(WeightError::Truncated { path, detail: format!("{len} bytes, shorter than the 8-byte header length") });
        }
        // SAFETY: the map is read-only; a file changed underneath by another process is outside our contract,
        // as with every memory-mapped loader.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        SafetensorsFile::parse(path, Bytes::Mapped(mmap))
    }

    /// A safetensors file's bytes already in memory; `path` names it in errors.
    pub fn from_bytes(bytes: Vec<u8>, path: impl AsRef<Path>) -> Result<SafetensorsFile, WeightError> {
        let path = path.as_ref().to_path_buf();
        if bytes.len() < 8 {
            return Err(WeightError::Truncated { path, detail: format!("{} bytes, shorter than the 8-byte header length", bytes.len()) });
        }
        SafetensorsFile::parse(path, Bytes::Owned(bytes))
    }

    fn parse(path: PathBuf, mmap: Bytes) -> Result<SafetensorsFile, WeightError> {
        let len = mmap.len();
        let header_len = u64::from_le_bytes(mmap[..8].try_into().unwrap()) as usize;
        if header_len.checked_add(8).is_none_or(|end| end > len) {
            return Err(WeightError::Truncated { path, detail: format!("the header claims {header_len} bytes but the file holds {len}") });
        }
        let (n, metadata) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| match e {
            SafeTensorError::MetadataIncompleteBuffer => {
                let described: usize = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&mmap[8..8 + header_len])
                    .ok()
                    .and_then(|m| {
                        m.iter()
                            .filter(|(k, _)| *k != "__metadata__")
                            .map(|(_, v)| v["data_offsets"][1].as_u64().map(|x| x as usize))
                            .collect::<Option<Vec<_>>>()
                    })
                    .and_then(|ends| ends.into_iter().max())
                    .unwrap_or(0);
                let held = len - 8 - header_len;
                if held < described {
                    WeightError::Truncated {
                        path: path.clone(),
                        detail: format!("the header describes {described} bytes of tensor data, the file holds {held}"),
                    }
                } else {
                    WeightError::Corrupt {
                        path: path.clone(),
                        detail: format!("the header describes {described} bytes of tensor data, the file holds {held}"),
                    }
                }
            }
            other => WeightError::Corrupt { path: path.clone(), detail: other.to_string() },
        })?;
        let header_metadata = metadata.metadata().iter().flatten().map(|(k, v)| (k.clone(), v.clone())).collect();
        let entries = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| {
                let (start, end) = info.data_offsets;
                (name, Entry { dtype: info.dtype, shape: info.shape.clone(), start, end })
            })
            .collect();
        Ok(SafetensorsFile { path, mmap, data_start: 8 + n, entries, metadata: header_metadata, used: Mutex::new(HashSet::new()) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The header's `__metadata__` entries (empty when it has none).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The stored shape of a tensor.
    pub fn shape(&self, name: &str) -> Result<&[usize], WeightError> {
        Ok(&self.entry(name)?.shape)
    }

    fn entry(&self, name: &str) -> Result<&Entry, WeightError> {
        self.entries.get(name).ok_or_else(|| {
            let near = similar_names(name, self.entries.keys().map(String::as_str));
            let hint = if near.is_empty() { String::new() } else { format!(" (similar names: {})", near.join(", ")) };
            WeightError::Missing { path: self.path.clone(), tensor: name.to_string(), hint }
        })
    }

    /// The stored dtype and little-endian bytes of a tensor, straight from the map. Marks the name as used.
    pub fn raw(&self, name: &str) -> Result<(DType, &[usize], &[u8]), WeightError> {
        let e = self.entry(name)?;
        let dtype = dtype_from_safetensors(e.dtype).ok_or_else(|| WeightError::UnsupportedDtype {
            path: self.path.clone(),
            tensor: name.to_string(),
            dtype: format!("{:?}", e.dtype),
        })?;
        self.used.lock().unwrap().insert(name.to_string());
        Ok((dtype, &e.shape, &self.mmap[self.data_start + e.start..self.data_start + e.end]))
    }

    /// Loads a tensor onto `device` as `dtype`, whatever it was stored as.
    pub fn tensor(&self, name: &str, device: &Device, dtype: DType) -> Result<Tensor, anyhow::Error> {
        let (stored, shape, bytes) = self.raw(name)?;
        let mut t = Tensor::zeros(device, shape, dtype)?;
        t.write_bytes(&convert_bytes(stored, dtype, bytes))?;
        Ok(t)
    }

    /// Loads a tensor and checks its shape.
    pub fn tensor_with_shape(&self, name: &str, expected: &[usize], device: &Device, dtype: DType) -> Result<Tensor, anyhow::Error> {
        self.check_shape(name, expected)?;
        self.tensor(name, device, dtype)
    }

    /// Checks a tensor's stored shape without reading it.
    pub fn check_shape(&self, name: &str, expected: &[usize]) -> Result<(), WeightError> {
        let found = &self.entry(name)?.shape;
        if found != expected {
            return Err(WeightError::Shape { path: self.path.clone(), tensor: name.to_string(), expected: expected.to_vec(), found: found.clone() });
        }
        Ok(())
    }

    /// Names never read through [`raw`](Self::raw) or [`tensor`](Self::tensor), sorted.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.lock().unwrap();
        self.entries.keys().filter(|k| !used.contains(*k)).cloned().collect()
    }

    /// After a model has loaded every tensor it knows: an error naming every tensor it did not.
    pub fn ensure_all_used(&self) -> Result<(), WeightError> {
        let unused = self.unused();
        if unused.is_empty() {
            return Ok(());
        }
        let mut names = unused.iter().take(10).cloned().collect::<Vec<_>>().join(", ");
        if unused.len() > 10 {
            names.push_str(", ...");
        }
        Err(WeightError::Unknown { path: self.path.clone(), count: unused.len(), names })
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + (ca != *cb) as usize;
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

/// Up to three stored names close to `name` by edit distance: a misspelt or renamed weight usually differs
/// in one path component.
fn similar_names<'a>(name: &str, names: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let limit = (name.len() / 4).max(3);
    let mut scored: Vec<(usize, &str)> = names.map(|n| (edit_distance(name, n), n)).filter(|(d, _)| *d <= limit).collect();
    scored.sort();
    scored.into_iter().take(3).map(|(_, n)| n).collect()
}

/// Writes tensors to a safetensors file, atomically. Each keeps its dtype; CUDA tensors are copied to the
/// host first. `metadata` goes to the `__metadata__` header entry.
pub fn save_safetensors(path: impl AsRef<Path>, tensors: &[(&str, &Tensor)], metadata: Option<&BTreeMap<String, String>>) -> Result<(), WeightError> {
    let path = path.as_ref();
    let werr = |detail: String| WeightError::Write { path: path.to_path_buf(), detail };
    let views = tensors
        .iter()
        .map(|(name, t)| {
            let bytes = t.to_bytes().map_err(|e| werr(format!("reading tensor '{name}': {e:#}")))?;
            Ok((name.to_string(), RawView::of(t, bytes)))
        })
        .collect::<Result<Vec<_>, WeightError>>()?;
    save_safetensors_raw(path, views, metadata)
}

/// [`save_safetensors`] for tensors already read to the host (a caller that also hashes the bytes).
pub fn save_safetensors_raw(
    path: impl AsRef<Path>,
    views: Vec<(String, RawView)>,
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<(), WeightError> {
    let path = path.as_ref();
    let werr = |detail: String| WeightError::Write { path: path.to_path_buf(), detail };
    let mut seen = HashSet::new();
    for (name, _) in &views {
        if !seen.insert(name.as_str()) {
            return Err(werr(format!("tensor name '{name}' given twice")));
        }
    }
    let info = metadata.map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
    let mut buffer = safetensors::tensor::serialize(views, info).map_err(|e| werr(e.to_string()))?;
    sort_header(&mut buffer);
    write_atomic_with(path, |w| w.write_all(&buffer)).map_err(|error| WeightError::Io { path: path.to_path_buf(), error })
}

/// Rewrites a serialized safetensors header with its JSON keys sorted. The safetensors crate writes the
/// `__metadata__` entries in a `HashMap`'s order, which changes from process to process, so the same tensors
/// gave different bytes (a resumed training run's outputs could not be compared with an uninterrupted
/// run's, nor files deduplicated by checksum). Readers locate tensors by their offsets, never by the order
/// of the header's keys; sorting only moves keys, so the header keeps its length (padded with spaces, as
/// the format allows, should it ever come out shorter).
fn sort_header(buffer: &mut [u8]) {
    let Some(len) = buffer.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize) else { return };
    let Some(header) = buffer.get_mut(8..8 + len) else { return };
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(header) else { return };
    let Ok(sorted) = serde_json::to_vec(&value) else { return };
    if sorted.len() <= header.len() {
        header[..sorted.len()].copy_from_slice(&sorted);
        header[sorted.len()..].fill(b' ');
    }
}

/// A tensor as safetensors writes it: any safetensors dtype, shape and little-endian bytes.
pub struct RawView {
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl RawView {
    /// `t`'s dtype and shape with `bytes`, its content as [`Tensor::to_bytes`] reads it.
    pub fn of(t: &Tensor, bytes: Vec<u8>) -> RawView {
        RawView { dtype: dtype_to_safetensors(t.dtype()), shape: t.shape().to_vec(), bytes }
    }
}

impl safetensors::View for RawView {
    fn dtype(&self) -> StDtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// The weight file names a diffusers component directory may use, in the order they are tried.
pub const COMPONENT_WEIGHT_FILES: [&str; 2] = ["diffusion_pytorch_model.safetensors", "model.safetensors"];

/// A diffusers component directory (`unet/`, `vae/`, `controlnet/`, ...): its `config.json` and weights,
/// opened as one unit.
#[derive(Debug)]
pub struct Component {
    pub dir: PathBuf,
    pub config: serde_json::Value,
    pub weights: SafetensorsFile,
}

impl Component {
    pub fn open(dir: impl AsRef<Path>) -> Result<Component, WeightError> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(WeightError::Component { path: dir, detail: "not a directory".into() });
        }
        let config_path = dir.join("config.json");
        let text = crate::util::read_to_string(&config_path).map_err(|error| WeightError::Io { path: config_path.clone(), error })?;
        let config: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| WeightError::Component { path: config_path.clone(), detail: format!("invalid JSON: {e}") })?;
        if !config.is_object() {
            return Err(WeightError::Component { path: config_path, detail: "expected a JSON object".into() });
        }
        let Some(weights_path) = COMPONENT_WEIGHT_FILES.iter().map(|f| dir.join(f)).find(|p| p.is_file()) else {
            let has = |f: &str| dir.join(f).exists();
            let detail = if has("diffusion_pytorch_model.safetensors.index.json") || has("model.safetensors.index.json") {
                "sharded checkpoints (*.safetensors.index.json) are not supported: merge the shards into one file".into()
            } else if has("diffusion_pytorch_model.bin") || has("pytorch_model.bin") {
                "only a PyTorch pickle (.bin) checkpoint is here; sgdm never unpickles weights (pickles can run \
                 code): convert it to safetensors"
                    .into()
            } else {
                format!("no weights: expected {}", COMPONENT_WEIGHT_FILES.join(" or "))
            };
            return Err(WeightError::Component { path: dir, detail });
        };
        let weights = SafetensorsFile::open(&weights_path)?;
        Ok(Component { dir, config, weights })
    }

    /// The `_class_name` diffusers writes into a component's config, if any.
    pub fn class_name(&self) -> Option<&str> {
        self.config.get("_class_name").and_then(|v| v.as_str())
    }
}

/// Where a model's parameter values come from.
pub enum ParamSource {
    /// A weights file, every tensor checked against the model by name and shape when loaded.
    File(SafetensorsFile),
    /// A seeded generator (profiling and benchmarking full-size configurations that come without weights).
    Random { seed: u64 },
}

/// Where a model's configuration and parameters come from: a component directory with its weights, or
/// its `config.json` alone with seeded random parameters.
pub struct ModelSource {
    pub dir: PathBuf,
    pub config: serde_json::Value,
    pub parameters: ParamSource,
}

impl ModelSource {
    /// The component in `dir`; with `random_seed`, only its config.json is read.
    pub fn open(dir: &Path, random_seed: Option<u64>) -> anyhow::Result<ModelSource> {
        use anyhow::Context;
        match random_seed {
            None => {
                let c = Component::open(dir)?;
                Ok(ModelSource { dir: c.dir, config: c.config, parameters: ParamSource::File(c.weights) })
            }
            Some(seed) => {
                let path = dir.join("config.json");
                let text = crate::util::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
                let config: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
                Ok(ModelSource { dir: dir.to_path_buf(), config, parameters: ParamSource::Random { seed } })
            }
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    pub fn class_name(&self) -> Option<&str> {
        self.config.get("_class_name").and_then(|v| v.as_str())
    }
}
