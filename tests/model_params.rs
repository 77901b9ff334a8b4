//! Our module trees name and size every parameter exactly as diffusers does: the SD 1.5 UNet, ControlNet
//! and VAE (tests/fixtures/sd15, from diffusers 0.42.1) and the tiny fixture models (their weights files).

use std::collections::BTreeMap;
use std::path::Path;

use sgdm::models::autoencoder_kl::{AutoencoderKl, AutoencoderKlConfig};
use sgdm::models::sgdm::{EegEncoder, EegEncoderConfig, StructuralVae, StructuralVaeConfig};
use sgdm::models::unet::{ControlNet, UNet, UNetConfig};
use sgdm::nn::ParamTree;
use sgdm::weights::Component;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
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
