//! Training checkpoints: one safetensors file, written atomically, holding every parameter under its
//! PyTorch name, the AdamW state (`optimizer.m.<name>`, `optimizer.v.<name>`, and `optimizer.master.<name>`
//! when the parameters are bf16 copies of f32 master weights), and metadata: the format and its version,
//! the optimizer step, the identity of the run's configuration, the data RNG's exact state, and a SHA-256
//! of every tensor's bytes. Restoring refuses, naming the file and the problem, anything that is not a
//! checkpoint of this model under this configuration, intact.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use super::optimizer::Optimizer;
use crate::nn::{ParamId, ParamStore, ParamTree};
use crate::tensor::{convert_bytes, DType, Tensor};
use crate::weights::{save_safetensors_raw, RawView, SafetensorsFile};

/// The `format` metadata value that marks an sgdm checkpoint.
pub const FORMAT: &str = "sgdm-checkpoint";
/// The layout version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// The identity of a run's configuration: the SHA-256 of its text, in hex. A checkpoint resumes only under
/// the configuration it was written with.
pub fn config_id(config_text: &[u8]) -> String {
    hex(&Sha256::digest(config_text))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The exact state of the training RNG (ChaCha8: seed, stream and position), so a resumed run draws the same
/// batches and noise as an uninterrupted one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RngState {
    pub seed: [u8; 32],
    pub stream: u64,
    pub word_pos: u128,
}

impl RngState {
    pub fn of(rng: &ChaCha8Rng) -> RngState {
        RngState { seed: rng.get_seed(), stream: rng.get_stream(), word_pos: rng.get_word_pos() }
    }

    pub fn rng(&self) -> ChaCha8Rng {
        use rand::SeedableRng;
        let mut rng = ChaCha8Rng::from_seed(self.seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(self.word_pos);
        rng
    }

    fn encode(&self) -> String {
        format!("chacha8:{}:{}:{}", hex(&self.seed), self.stream, self.word_pos)
    }

    fn decode(text: &str) -> Option<RngState> {
        let mut parts = text.split(':');
        if parts.next()? != "chacha8" {
            return None;
        }
        let seed_hex = parts.next()?;
        let stream = parts.next()?.parse().ok()?;
        let word_pos = parts.next()?.parse().ok()?;
        if parts.next().is_some() || seed_hex.len() != 64 {
            return None;
        }
        let mut seed = [0u8; 32];
        for (i, b) in seed.iter_mut().enumerate() {
            *b = u8::from_str_radix(seed_hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(RngState { seed, stream, word_pos })
    }
}

/// What a checkpoint restores besides the tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointMeta {
    /// Optimizer steps taken when it was written.
    pub step: u64,
    pub config_id: String,
    pub rng: RngState,
    /// The validation loss measured at this step, when the run measured one.
    pub val_loss: Option<f64>,
}

fn m_name(name: &str) -> String {
    format!("optimizer.m.{name}")
}

fn v_name(name: &str) -> String {
    format!("optimizer.v.{name}")
}

fn master_name(name: &str) -> String {
    format!("optimizer.master.{name}")
}

/// SHA-256 over every tensor in name order: the name, a zero byte, the little-endian bytes.
fn digest<'a>(tensors: impl Iterator<Item = (&'a str, &'a [u8])>) -> String {
    let mut h = Sha256::new();
    for (name, bytes) in tensors {
        h.update(name.as_bytes());
        h.update([0u8]);
        h.update(bytes);
    }
    hex(&h.finalize())
}

/// Writes the model's parameters, the optimizer's state, `rng` and the step's validation loss (when one was
/// measured) to `path` (atomically: a crash leaves the previous checkpoint whole).
pub fn save_checkpoint(
    path: impl AsRef<Path>,
    tree: &ParamTree,
    params: &ParamStore,
    optimizer: &Optimizer,
    config_id: &str,
    rng: &RngState,
    val_loss: Option<f64>,
) -> Result<()> {
    let path = path.as_ref();
    let (master, m, v) = optimizer.state();
    let mut tensors: BTreeMap<String, &Tensor> = BTreeMap::new();
    for (i, spec) in tree.specs().iter().enumerate() {
        tensors.insert(spec.name.clone(), params.get(ParamId(i)));
        tensors.insert(m_name(&spec.name), &m[i]);
        tensors.insert(v_name(&spec.name), &v[i]);
        if let Some(master) = master {
            tensors.insert(master_name(&spec.name), &master[i]);
        }
    }
    let views = tensors
        .into_iter()
        .map(|(name, t)| {
            let bytes = t.to_bytes().with_context(|| format!("{}: reading tensor '{name}'", path.display()))?;
            Ok((name, RawView::of(t, bytes)))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut metadata = BTreeMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("format_version".to_string(), FORMAT_VERSION.to_string()),
        ("step".to_string(), optimizer.steps().to_string()),
        ("config_id".to_string(), config_id.to_string()),
        ("rng".to_string(), rng.encode()),
        ("master_weights".to_string(), master.is_some().to_string()),
        ("sha256".to_string(), digest(views.iter().map(|(n, v)| (n.as_str(), v.bytes.as_slice())))),
    ]);
    if let Some(val) = val_loss {
        // `{:?}` keeps every bit of the f64, so the selection among checkpoints is exact.
        metadata.insert("val_loss".to_string(), format!("{val:?}"));
    }
    save_safetensors_raw(path, views, Some(&metadata))?;
    Ok(())
}

fn write_from(file: &SafetensorsFile, name: &str, t: &mut Tensor) -> Result<()> {
    let (stored, _, bytes) = file.raw(name)?;
    t.write_bytes(&convert_bytes(stored, t.dtype(), bytes)).with_context(|| format!("{}: restoring tensor '{name}'", file.path().display()))
}

/// Restores a checkpoint written by [`save_checkpoint`] into `params` and `optimizer` (built for the same
/// model), after checking that it is an intact sgdm checkpoint of this model under `config_id`. Nothing is
/// written unless every check passes. Returns the metadata; the optimizer's step is restored.
///
/// Across devices: f32 parameters take the master weights when the file has them (exact), bf16
/// parameters their stored copy; an optimizer with master weights takes them from the file's masters, or
/// from its f32 parameters.
pub fn load_checkpoint(
    path: impl AsRef<Path>,
    tree: &ParamTree,
    params: &mut ParamStore,
    optimizer: &mut Optimizer,
    config_id: &str,
) -> Result<CheckpointMeta> {
    let file = SafetensorsFile::open(path.as_ref())?;
    let shown = file.path().display().to_string();
    let meta = file.metadata();
    let field = |key: &str| meta.get(key).map(String::as_str);
    ensure!(field("format") == Some(FORMAT), "{shown}: not an sgdm checkpoint (metadata 'format' is {:?}, expected \"{FORMAT}\")", field("format"));
    ensure!(
        field("format_version") == Some(&FORMAT_VERSION.to_string()),
        "{shown}: checkpoint format version {:?}, this sgdm reads version {FORMAT_VERSION}",
        field("format_version")
    );
    let found_id = field("config_id").unwrap_or_default();
    ensure!(
        found_id == config_id,
        "{shown}: written under another configuration (config id {found_id}), this run's is {config_id}: \
         resume with the configuration the checkpoint was written with"
    );
    let step: u64 =
        field("step").and_then(|s| s.parse().ok()).with_context(|| format!("{shown}: metadata 'step' is {:?}, not a step count", field("step")))?;
    let rng =
        field("rng").and_then(RngState::decode).with_context(|| format!("{shown}: metadata 'rng' is {:?}, not a ChaCha8 state", field("rng")))?;
    let has_master = match field("master_weights") {
        Some("true") => true,
        Some("false") => false,
        other => bail!("{shown}: metadata 'master_weights' is {other:?}, expected \"true\" or \"false\""),
    };

    let mut expected = BTreeSet::new();
    for spec in tree.specs() {
        let mut names = vec![spec.name.clone(), m_name(&spec.name), v_name(&spec.name)];
        if has_master {
            names.push(master_name(&spec.name));
        }
        for name in names {
            file.check_shape(&name, &spec.shape)?;
            expected.insert(name);
        }
    }
    let unknown: Vec<&str> = file.names().filter(|n| !expected.contains(*n)).collect();
    ensure!(
        unknown.is_empty(),
        "{shown}: {} tensor(s) this model does not have (a checkpoint of another model?): {}",
        unknown.len(),
        unknown.iter().take(10).copied().collect::<Vec<_>>().join(", ")
    );
    let stored_digest = field("sha256").with_context(|| format!("{shown}: no 'sha256' metadata"))?;
    let tensors = expected.iter().map(|n| file.raw(n).map(|(_, _, bytes)| (n.as_str(), bytes))).collect::<Result<Vec<_>, _>>()?;
    let found_digest = digest(tensors.into_iter());
    ensure!(
        found_digest == stored_digest,
        "{shown}: corrupt checkpoint: the tensor data's SHA-256 is {found_digest}, the header records {stored_digest}"
    );

    let (opt_step, mut opt_master, m, v) = optimizer.state_mut();
    ensure!(
        m.len() == tree.len() && params.len() == tree.len(),
        "{shown}: the model has {} parameters, the store {} and the optimizer {}",
        tree.len(),
        params.len(),
        m.len()
    );
    for (i, spec) in tree.specs().iter().enumerate() {
        let name = &spec.name;
        let param = params.get_mut(ParamId(i));
        let param_source = if has_master && param.dtype() == DType::F32 { master_name(name) } else { name.clone() };
        write_from(&file, &param_source, param)?;
        write_from(&file, &m_name(name), &mut m[i])?;
        write_from(&file, &v_name(name), &mut v[i])?;
        if let Some(master) = opt_master.as_deref_mut() {
            let source = if has_master { master_name(name) } else { name.clone() };
            write_from(&file, &source, &mut master[i])?;
        }
    }
    *opt_step = step;
    Ok(CheckpointMeta { step, config_id: config_id.to_string(), rng, val_loss: val_loss_of(&file)? })
}

fn val_loss_of(file: &SafetensorsFile) -> Result<Option<f64>> {
    match file.metadata().get("val_loss") {
        None => Ok(None),
        Some(text) => text.parse().map(Some).with_context(|| format!("{}: metadata 'val_loss' is {text:?}, not a number", file.path().display())),
    }
}

/// The step, configuration identity and validation loss recorded in a checkpoint's header, read without
/// its tensors; `None` for a safetensors file that is not an sgdm checkpoint.
pub fn peek_checkpoint(path: impl AsRef<Path>) -> Result<Option<(u64, String, Option<f64>)>> {
    let file = SafetensorsFile::open(path.as_ref())?;
    let meta = file.metadata();
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        return Ok(None);
    }
    let step =
        meta.get("step").and_then(|s| s.parse().ok()).with_context(|| format!("{}: metadata 'step' is not a step count", file.path().display()))?;
    Ok(Some((step, meta.get("config_id").cloned().unwrap_or_default(), val_loss_of(&file)?)))
}
