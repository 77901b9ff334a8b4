//! Which weights folder a command uses when it is given none: a binary must find its model wherever it was
//! copied or installed (`cargo install` leaves nothing but the binary), so the folder is never a path
//! baked in at compile time. In order:
//!
//! 1. `--weights DIR`;
//! 2. `SGDM_WEIGHTS`: a folder named in the environment (refused if it is not one, never skipped);
//! 3. `weights/` beside the executable: the layout of an unpacked release archive, and how a packager
//!    ships other weights with the binary;
//! 4. the shipped default model, built into the binary (about 13 MB) and unpacked on first use into the
//!    cache, `<cache>/weights/<checksum>/` (`$SGDM_CACHE_DIR`, else `$XDG_CACHE_HOME/sgdm`, else
//!    `~/.cache/sgdm`), where later runs find it.
//!
//! The commands print which one they used. The built-in model is the source tree's `weights/` at build
//! time; its folder is named by the checksum of its bytes, so two builds with different models never share
//! one, and a folder whose files differ from the binary's (edited, or cut short) is unpacked again.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use sha2::{Digest, Sha256};

/// Where the weights came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsSource {
    Flag,
    Environment,
    BesideExecutable,
    BuiltIn,
}

/// A weights folder and how it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocatedWeights {
    pub dir: PathBuf,
    pub source: WeightsSource,
}

impl std::fmt::Display for LocatedWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = match self.source {
            WeightsSource::Flag => "from --weights",
            WeightsSource::Environment => "from SGDM_WEIGHTS",
            WeightsSource::BesideExecutable => "the weights/ beside the executable",
            WeightsSource::BuiltIn => "the default model built into this binary, unpacked to the cache",
        };
        write!(f, "{} ({how})", self.dir.display())
    }
}

/// The environment variable naming a weights folder.
pub const WEIGHTS_ENV: &str = "SGDM_WEIGHTS";

macro_rules! shipped {
    ($($file:literal),* $(,)?) => {
        [$(($file, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/weights/", $file)) as &[u8])),*]
    };
}

/// The shipped model's files (the training logs stay in the source tree).
const BUILT_IN: [(&str, &[u8]); 14] = shipped![
    "README.md",
    "train.toml",
    "vae.safetensors",
    "vae_config.json",
    "encoder.safetensors",
    "encoder_config.json",
    "eeg_standardization.json",
    "eeg_projector.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "controlnet/config.json",
    "controlnet/diffusion_pytorch_model.safetensors",
];

/// The weights folder to use: `flag` when given, else the first of the order in the module docs.
pub fn locate(flag: Option<&Path>) -> Result<LocatedWeights> {
    if let Some(dir) = flag {
        return Ok(LocatedWeights { dir: dir.to_path_buf(), source: WeightsSource::Flag });
    }
    if let Some(dir) = std::env::var_os(WEIGHTS_ENV).filter(|v| !v.is_empty()) {
        let dir = PathBuf::from(dir);
        ensure!(dir.is_dir(), "{WEIGHTS_ENV}={}: no such weights folder (unset {WEIGHTS_ENV} to use the default model)", dir.display());
        return Ok(LocatedWeights { dir, source: WeightsSource::Environment });
    }
    let exe = std::env::current_exe().context("cannot find this executable's path (to look for weights/ beside it)")?;
    if let Some(beside) = exe.parent().map(|d| d.join("weights")).filter(|d| d.is_dir()) {
        return Ok(LocatedWeights { dir: beside, source: WeightsSource::BesideExecutable });
    }
    let root = crate::runtime::kernels::cache_dir();
    // cache_dir() is the kernel cache inside the cache root; the weights live beside it.
    let root = root.parent().unwrap_or(&root).join("weights");
    Ok(LocatedWeights { dir: unpack_built_in(&root)?, source: WeightsSource::BuiltIn })
}

/// The built-in model unpacked under `root` (done now if it is not there whole), its folder's path.
pub fn unpack_built_in(root: &Path) -> Result<PathBuf> {
    let mut hash = Sha256::new();
    for (name, bytes) in BUILT_IN {
        hash.update(name.as_bytes());
        hash.update((bytes.len() as u64).to_le_bytes());
        hash.update(bytes);
    }
    let checksum: String = hash.finalize()[..8].iter().map(|b| format!("{b:02x}")).collect();
    let dir = root.join(format!("default-{checksum}"));
    let whole = |dir: &Path| BUILT_IN.iter().all(|(name, bytes)| std::fs::read(dir.join(name)).is_ok_and(|b| b == *bytes));
    if whole(&dir) {
        return Ok(dir);
    }
    std::fs::create_dir_all(root).with_context(|| format!("{}: cannot create the folder for the built-in weights", root.display()))?;
    crate::util::remove_stale_temporaries(root).with_context(|| format!("{}: cannot remove an interrupted unpacking", root.display()))?;
    // Unpacked into a temporary folder and renamed into place, so a folder of that name is always whole.
    let staging = crate::util::temporary_path(&dir, std::process::id(), 0);
    for (name, bytes) in BUILT_IN {
        let path = staging.join(name);
        std::fs::create_dir_all(path.parent().unwrap_or(&staging)).with_context(|| format!("{}: cannot create", staging.display()))?;
        crate::util::write_atomic(&path, bytes).with_context(|| format!("{}: cannot write", path.display()))?;
    }
    if dir.exists() {
        // Damaged (it failed the check above): replaced.
        std::fs::remove_dir_all(&dir).with_context(|| format!("{}: cannot replace the damaged unpacked weights", dir.display()))?;
    }
    if let Err(e) = std::fs::rename(&staging, &dir) {
        let _ = std::fs::remove_dir_all(&staging);
        // Another process unpacked the same weights at the same moment.
        ensure!(whole(&dir), "{}: cannot unpack the built-in weights: {e}", dir.display());
    }
    Ok(dir)
}
