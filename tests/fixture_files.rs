//! The conformance fixtures written by PyTorch and diffusers (tests/fixtures/models/make_fixtures.py) open
//! through our weights reader: real-world safetensors files, diffusers config.json files, and expected
//! gradients for every parameter.

mod common;

use sgdm::weights::{Component, SafetensorsFile};
use sgdm::{DType, Device};

const CASES: [(&str, &str); 6] = [
    ("unet_tiny", "UNet2DConditionModel"),
    ("controlnet_tiny", "ControlNetModel"),
    ("autoencoder_kl_tiny", "AutoencoderKL"),
    ("eeg_encoder_tiny", "SpatiotemporalEEGEncoder"),
    ("structural_vae_tiny", "StructuralVAE"),
    ("contrastive_alignment", "ContrastiveAlignment"),
];

#[test]
fn every_fixture_opens_and_has_a_gradient_per_parameter() {
    let root = common::repo_root().join("tests/fixtures/models");
    for (case, class) in CASES {
        let dir = root.join(case);
        let component = Component::open(&dir).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(component.class_name(), Some(class), "{case}");
        let expected = SafetensorsFile::open(dir.join("expected.safetensors")).unwrap();
        for name in component.weights.names().map(str::to_string).collect::<Vec<_>>() {
            let w = component.weights.tensor(&name, &Device::Cpu, DType::F32).unwrap();
            assert!(w.to_f32_vec().unwrap().iter().all(|v| v.is_finite()), "{case}: {name}");
            if !name.ends_with("running_mean") && !name.ends_with("running_var") {
                let g = expected.shape(&format!("grad.{name}")).unwrap_or_else(|e| panic!("{case}: {e}"));
                assert_eq!(g, w.shape(), "{case}: grad.{name}");
            }
        }
        let inputs = SafetensorsFile::open(dir.join("inputs.safetensors")).unwrap();
        assert!(inputs.names().count() > 0, "{case} has inputs");
        let grad_outputs = SafetensorsFile::open(dir.join("grad_outputs.safetensors")).unwrap();
        for output in grad_outputs.names() {
            assert_eq!(expected.shape(output).unwrap(), grad_outputs.shape(output).unwrap(), "{case}: {output}");
        }
    }
}
