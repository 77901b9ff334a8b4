//! Our module trees name and size every parameter exactly as diffusers does: the SD 1.5 UNet, ControlNet
//! and VAE (tests/fixtures/sd15, from diffusers 0.42.1) and the tiny fixture models (their weights files).

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use sgdm::models::autoencoder_kl::{AutoencoderKl, AutoencoderKlConfig};
use sgdm::models::sgdm::{EegEncoder, EegEncoderConfig, StructuralVae, StructuralVaeConfig};
use sgdm::models::unet::{ControlNet, UNet, UNetConfig};
use sgdm::nn::ParamTree;
use sgdm::weights::Component;

fn root() -> std::path::PathBuf {
    common::repo_root()
}

fn ours(tree: &ParamTree) -> BTreeMap<String, Vec<usize>> {
    tree.specs().iter().map(|s| (s.name.clone(), s.shape.clone())).collect()
}

fn build(class: &str, path: &Path, config: &serde_json::Value) -> ParamTree {
    match class {
        "unet" | "UNet2DConditionModel" => UNet::new(UNetConfig::from_json(path, config).unwrap()).unwrap().params,
        "controlnet" | "ControlNetModel" => ControlNet::new(UNetConfig::from_json(path, config).unwrap()).unwrap().params,
        "vae" | "AutoencoderKL" => AutoencoderKl::new(AutoencoderKlConfig::from_json(path, config).unwrap()).unwrap().params,
        "SpatiotemporalEEGEncoder" => EegEncoder::new(EegEncoderConfig::from_json(path, config).unwrap()).unwrap().params,
        "StructuralVAE" => StructuralVae::new(StructuralVaeConfig::from_json(path, config).unwrap()).unwrap().params,
        other => panic!("no builder for {other}"),
    }
}

fn assert_same(what: &str, ours: &BTreeMap<String, Vec<usize>>, theirs: &BTreeMap<String, Vec<usize>>) {
    let missing: Vec<_> = theirs.keys().filter(|k| !ours.contains_key(*k)).collect();
    let extra: Vec<_> = ours.keys().filter(|k| !theirs.contains_key(*k)).collect();
    assert!(missing.is_empty() && extra.is_empty(), "{what}: missing {missing:?}, extra {extra:?}");
    for (name, shape) in theirs {
        assert_eq!(&ours[name], shape, "{what}: {name}");
    }
}

#[test]
fn sd15_module_trees_match_diffusers() {
    let dir = root().join("tests/fixtures/sd15");
    let shapes: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("param_shapes.json")).unwrap()).unwrap();
    for (name, total) in [("unet", 859_520_964usize), ("controlnet", 361_279_120), ("vae", 83_653_863)] {
        let path = dir.join(format!("{name}.json"));
        let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let tree = build(name, &path, &config);
        let theirs: BTreeMap<String, Vec<usize>> = shapes[name]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e[0].as_str().unwrap().to_string(), e[1].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect()))
            .collect();
        assert_same(&format!("SD 1.5 {name}"), &ours(&tree), &theirs);
        assert_eq!(tree.numel(), total, "SD 1.5 {name} parameter count");
    }
}

#[test]
fn tiny_fixture_models_match_their_weight_files() {
    for case in ["unet_tiny", "controlnet_tiny", "autoencoder_kl_tiny", "eeg_encoder_tiny", "structural_vae_tiny"] {
        let c = Component::open(root().join("tests/fixtures/models").join(case)).unwrap();
        let tree = build(c.class_name().unwrap(), &c.dir.join("config.json"), &c.config);
        let theirs = c.weights.names().map(|n| (n.to_string(), c.weights.shape(n).unwrap().to_vec())).collect();
        assert_same(case, &ours(&tree), &theirs);
    }
}

#[test]
fn unsupported_configs_are_refused_naming_file_and_key() {
    let path = Path::new("unet/config.json");
    let err = |v: serde_json::Value| UNetConfig::from_json(path, &v).unwrap_err().to_string();
    let e = err(serde_json::json!({"class_embed_type": "timestep"}));
    assert!(e.contains("unet/config.json") && e.contains("'class_embed_type'"), "{e}");
    let e = err(serde_json::json!({"down_block_types": ["SimpleCrossAttnDownBlock2D"], "block_out_channels": [32]}));
    assert!(e.contains("SimpleCrossAttnDownBlock2D"), "{e}");
    let e = err(serde_json::json!({"attention_head_dim": [8, 8], "block_out_channels": [32, 64, 64, 64]}));
    assert!(e.contains("'attention_head_dim' has 2 entries for 4 blocks"), "{e}");
    let e = err(serde_json::json!({"block_out_channels": "wide"}));
    assert!(e.contains("'block_out_channels' must be a list of integers"), "{e}");
    let cfg = UNetConfig::from_json(path, &serde_json::json!({"block_out_channels": [30, 60], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "norm_num_groups": 32})).unwrap();
    let e = UNet::new(cfg).unwrap_err().to_string();
    assert!(e.contains("GroupNorm with 32 groups cannot split 30 channels"), "{e}");
}

mod loading {
    use super::*;
    use sgdm::memory::{Arena, MemoryPlan};
    use sgdm::models::autoencoder_kl::LEGACY_ATTENTION_NAMES;
    use sgdm::nn::ParamStore;
    use sgdm::weights::{save_safetensors, SafetensorsFile};
    use sgdm::{DType, Device, Tensor};

    fn vae_tiny() -> (Component, AutoencoderKl) {
        let c = Component::open(root().join("tests/fixtures/models/autoencoder_kl_tiny")).unwrap();
        let vae = AutoencoderKl::new(AutoencoderKlConfig::from_json(&c.dir, &c.config).unwrap()).unwrap();
        (c, vae)
    }

    fn arena_for(tree: &ParamTree, dtype: DType) -> Arena {
        let mut plan = MemoryPlan::new();
        ParamStore::plan(tree, &mut plan, dtype);
        Arena::new(&Device::Cpu, &plan).unwrap()
    }

    #[test]
    fn parameters_load_into_the_arena_with_their_values() {
        let (c, vae) = vae_tiny();
        let mut arena = arena_for(&vae.params, DType::F32);
        let store = ParamStore::load(&vae.params, &c.weights, &mut arena, DType::F32, &[]).unwrap();
        assert_eq!(store.len(), vae.params.len());
        let id = vae.params.id("decoder.mid_block.attentions.0.to_q.weight").unwrap();
        let want = c.weights.tensor("decoder.mid_block.attentions.0.to_q.weight", &Device::Cpu, DType::F32).unwrap();
        assert_eq!(store.get(id).to_f32_vec().unwrap(), want.to_f32_vec().unwrap());
        let report = arena.report();
        assert_eq!(report.regions[0].used, report.regions[0].capacity, "the plan is exactly what loading carves");
    }

    /// Rewrites the tiny VAE's weights with the pre-0.14 attention names, stored as 1x1 convolutions.
    fn legacy_copy(c: &Component, dir: &Path, extra: Option<&str>, drop: Option<&str>) -> SafetensorsFile {
        let mut owned: Vec<(String, Tensor)> = Vec::new();
        for name in c.weights.names() {
            if Some(name) == drop {
                continue;
            }
            let mut t = c.weights.tensor(name, &Device::Cpu, DType::F32).unwrap();
            let mut new_name = name.to_string();
            for (old, new) in LEGACY_ATTENTION_NAMES {
                if name.contains(&format!("attentions.0.{new}.")) {
                    new_name = name.replace(&format!(".{new}."), &format!(".{old}."));
                    if t.shape().len() == 2 {
                        let s = t.shape().to_vec();
                        t = t.reshape(&[s[0], s[1], 1, 1]).unwrap();
                    }
                }
            }
            owned.push((new_name, t));
        }
        if let Some(extra) = extra {
            owned.push((extra.to_string(), Tensor::zeros(&Device::Cpu, &[2], DType::F32).unwrap()));
        }
        let refs: Vec<(&str, &Tensor)> = owned.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let path = dir.join("legacy.safetensors");
        save_safetensors(&path, &refs, None).unwrap();
        SafetensorsFile::open(&path).unwrap()
    }

    #[test]
    fn legacy_vae_attention_names_load_through_aliases() {
        let (c, vae) = vae_tiny();
        let dir = tempfile::tempdir().unwrap();
        let legacy = legacy_copy(&c, dir.path(), None, None);
        assert!(legacy.contains("encoder.mid_block.attentions.0.query.weight"));
        let mut arena = arena_for(&vae.params, DType::BF16);
        let store = ParamStore::load(&vae.params, &legacy, &mut arena, DType::BF16, &LEGACY_ATTENTION_NAMES).unwrap();
        let id = vae.params.id("encoder.mid_block.attentions.0.to_out.0.weight").unwrap();
        assert_eq!(store.get(id).shape(), vae.params.spec(id).shape.as_slice());
        // Without the aliases the same file is refused, naming the tensor.
        let err = ParamStore::load(&vae.params, &legacy, &mut arena_for(&vae.params, DType::F32), DType::F32, &[]).err().unwrap();
        assert!(err.to_string().contains("missing tensor 'encoder.mid_block.attentions.0.to_q.weight'"), "{err}");
    }

    #[test]
    fn unknown_and_missing_weights_are_refused_by_name() {
        let (c, vae) = vae_tiny();
        let dir = tempfile::tempdir().unwrap();
        let extra = legacy_copy(&c, dir.path(), Some("encoder.mystery.weight"), None);
        let err = ParamStore::load(&vae.params, &extra, &mut arena_for(&vae.params, DType::F32), DType::F32, &LEGACY_ATTENTION_NAMES).err().unwrap();
        assert!(err.to_string().contains("1 unknown tensor name(s), not used by the model: encoder.mystery.weight"), "{err}");
        let missing = legacy_copy(&c, dir.path(), None, Some("decoder.conv_out.bias"));
        let err =
            ParamStore::load(&vae.params, &missing, &mut arena_for(&vae.params, DType::F32), DType::F32, &LEGACY_ATTENTION_NAMES).err().unwrap();
        assert!(err.to_string().contains("missing tensor 'decoder.conv_out.bias'"), "{err}");
    }

    #[test]
    fn random_parameters_are_seeded_and_scaled_by_fan_in() {
        let (_, vae) = vae_tiny();
        let a = ParamStore::random(&vae.params, &mut arena_for(&vae.params, DType::F32), DType::F32, 7).unwrap();
        let b = ParamStore::random(&vae.params, &mut arena_for(&vae.params, DType::F32), DType::F32, 7).unwrap();
        let id = vae.params.id("decoder.up_blocks.0.resnets.0.conv1.weight").unwrap();
        let v = a.get(id).to_f32_vec().unwrap();
        assert_eq!(v, b.get(id).to_f32_vec().unwrap());
        let fan_in: usize = vae.params.spec(id).shape[1..].iter().product();
        let var = v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32;
        assert!((var * fan_in as f32 - 1.0).abs() < 0.1, "variance {var} for fan-in {fan_in}");
    }
}
