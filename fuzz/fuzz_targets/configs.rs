//! Arbitrary text as each configuration sgdm reads: the training TOML (one stage's table, and every table
//! as `train all` reads it), and the JSON model configs (our own SGDM modules', strictly; diffusers'
//! UNet/ControlNet and AutoencoderKL, leniently and strictly), each followed by building the model's
//! parameter tree as a weights folder's load does. It must return errors, never panic, hang or exhaust
//! memory.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sgdm::models::autoencoder_kl::{AutoencoderKl, AutoencoderKlConfig};
use sgdm::models::sgdm::{EegEncoder, EegEncoderConfig, StructuralVae, StructuralVaeConfig};
use sgdm::models::unet::{ControlNet, UNet, UNetConfig};
use sgdm::train::config::{Stage, TrainingConfig};

/// Parameters a fuzzed config may ask for before its model is not built (the tree is only shapes, but the
/// input must not make the fuzzer measure allocation of a real model).
const MAX_CHANNELS: usize = 4096;

fn small(v: &serde_json::Value) -> bool {
    fn walk(v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::Number(n) => n.as_u64().is_none_or(|x| x <= MAX_CHANNELS as u64),
            serde_json::Value::Array(a) => a.len() <= 16 && a.iter().all(walk),
            serde_json::Value::Object(o) => o.values().all(walk),
            _ => true,
        }
    }
    walk(v)
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = Path::new("fuzz.toml");
    for stage in Stage::ALL {
        let _ = TrainingConfig::stage(path, text, stage);
    }
    let _ = TrainingConfig::all(path, text, Path::new("out"));

    let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else { return };
    let path = Path::new("fuzz.json");
    let build = small(&value);
    if let Ok(c) = EegEncoderConfig::from_json(path, &value) {
        if build {
            let _ = EegEncoder::new(c);
        }
    }
    if let Ok(c) = StructuralVaeConfig::from_json(path, &value) {
        if build {
            let _ = StructuralVae::new(c);
        }
    }
    let _ = UNetConfig::from_json_strict(path, &value, &["sample_size"]);
    if let Ok(c) = UNetConfig::from_json(path, &value) {
        if build {
            let _ = UNet::new(c.clone());
            let _ = ControlNet::new(c);
        }
    }
    let _ = AutoencoderKlConfig::from_json_strict(path, &value, &["sample_size"]);
    if let Ok(c) = AutoencoderKlConfig::from_json(path, &value) {
        if build {
            let _ = AutoencoderKl::new(c);
        }
    }
});
