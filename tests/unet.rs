//! The SD 1.5 UNet and ControlNet at full width (tests/fixtures/sd15 configs, seeded random weights) on a
//! small latent: the ControlNet's residuals fit the UNet's skip connections and both produce finite maps of
//! the right shapes. The tiny fixtures (tests/conformance.rs) check the numbers against PyTorch.

mod common;

use std::path::Path;

use sgdm::models::unet::{ControlNet, UNet, UNetConditioning, UNetConfig};
use sgdm::nn::{ParamStore, ParamTree, Standalone};
use sgdm::{DType, Device, Tensor};

fn random_params(tree: &ParamTree, seed: u64) -> ParamStore {
    ParamStore::random_owned(tree, &Device::Cpu, DType::F32, seed).unwrap()
}

fn sd15_config(name: &str) -> UNetConfig {
    let path = common::repo_root().join("tests/fixtures/sd15").join(name);
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    UNetConfig::from_json(&path, &config).unwrap()
}

fn finite(t: &Tensor) -> bool {
    t.to_f32_vec().unwrap().iter().all(|v| v.is_finite())
}

#[test]
fn sd15_controlnet_residuals_drive_the_sd15_unet_on_a_small_latent() {
    let (h, w, tokens) = (16, 16, 77);
    let sample = common::cpu(&[1, 4, h, w], &common::random(4 * h * w, -1.0, 1.0, 1));
    let context = common::cpu(&[1, tokens, 768], &common::random(tokens * 768, -1.0, 1.0, 2));
    let timestep = common::cpu(&[1], &[500.0]);
    let alloc = &mut Standalone(Device::Cpu);

    // The ControlNet's weights are dropped before the UNet's are made (about 1.4 and 3.4 GB in f32).
    let (down, mid) = {
        let controlnet = ControlNet::new(sd15_config("controlnet.json")).unwrap();
        let f = controlnet.condition_downscale();
        assert_eq!(f, 8);
        let cond = common::cpu(&[1, 3, h * f, w * f], &common::random(3 * h * f * w * f, 0.0, 1.0, 3));
        let p = random_params(&controlnet.params, 4);
        let acts = controlnet.forward(&p, &sample, &timestep, &context, &cond, 0.7, alloc).unwrap();
        (acts.down, acts.mid)
    };
    let shapes: Vec<&[usize]> = down.iter().map(Tensor::shape).collect();
    let expected: Vec<[usize; 4]> =
        [(320, 16), (320, 16), (320, 16), (320, 8), (640, 8), (640, 8), (640, 4), (1280, 4), (1280, 4), (1280, 2), (1280, 2), (1280, 2)]
            .iter()
            .map(|&(c, s)| [1, c, s, s])
            .collect();
    assert_eq!(shapes, expected.iter().map(|s| s.as_slice()).collect::<Vec<_>>());
    assert_eq!(mid.shape(), [1, 1280, 2, 2]);
    assert!(down.iter().all(finite) && finite(&mid));

    let unet = UNet::new(sd15_config("unet.json")).unwrap();
    let p = random_params(&unet.params, 5);
    let cond = UNetConditioning { timestep: &timestep, encoder_hidden_states: &context, residuals: Some((down.iter().collect(), &mid)) };
    let acts = unet.forward(&p, &sample, &cond, alloc).unwrap();
    assert_eq!(acts.output.shape(), [1, 4, h, w]);
    assert!(finite(&acts.output));
}

fn tiny_unet() -> UNet {
    let config = serde_json::json!({
        "_class_name": "UNet2DConditionModel", "block_out_channels": [8, 16], "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 8, "attention_head_dim": 2, "norm_num_groups": 4
    });
    UNet::new(UNetConfig::from_json(Path::new("tiny.json"), &config).unwrap()).unwrap()
}

#[test]
fn one_timestep_is_broadcast_over_the_batch_and_odd_latents_are_refused() {
    let unet = tiny_unet();
    let p = random_params(&unet.params, 6);
    let alloc = &mut Standalone(Device::Cpu);
    let sample = common::cpu(&[2, 4, 4, 6], &common::random(2 * 4 * 24, -1.0, 1.0, 7));
    let context = common::cpu(&[2, 3, 8], &common::random(2 * 3 * 8, -1.0, 1.0, 8));
    let run = |t: &[f32], sample: &Tensor, alloc: &mut Standalone| {
        let timestep = common::cpu(&[t.len()], t);
        let cond = UNetConditioning { timestep: &timestep, encoder_hidden_states: &context, residuals: None };
        unet.forward(&p, sample, &cond, alloc).map(|a| a.output.to_f32_vec().unwrap())
    };
    assert_eq!(run(&[250.0], &sample, alloc).unwrap(), run(&[250.0, 250.0], &sample, alloc).unwrap());
    let odd = common::cpu(&[2, 4, 4, 5], &common::random(2 * 4 * 20, -1.0, 1.0, 9));
    let err = format!("{:#}", run(&[250.0], &odd, alloc).unwrap_err());
    assert!(err.contains("[2, 4, 4, 5]") && err.contains("multiples of 2"), "{err}");
}
