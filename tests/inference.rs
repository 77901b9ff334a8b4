//! Inference forwards (`nn::Inference`) discard each block's activations as it returns: the outputs are
//! bit-identical to a forward that keeps them, the peak memory of the activations drops, and a backward
//! that reaches a discarded tensor is an error saying so, never a silent wrong gradient. One test per
//! binary: the memory counters are process-wide.

mod common;

use sgdm::models::autoencoder_kl::{AutoencoderKl, AutoencoderKlConfig};
use sgdm::models::unet::UNetConditioning;
use sgdm::nn::{Allocator, Grads, Inference, ParamStore, Standalone};
use sgdm::tensor::{memory_stats, reset_memory_peak};
use sgdm::{DType, Device};

fn config(case: &str) -> (std::path::PathBuf, serde_json::Value) {
    let path = common::repo_root().join("tests/fixtures/models").join(case).join("config.json");
    let value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    (path, value)
}

/// Runs `f` and returns its result and the host bytes its tensors peaked at above what was live before.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let before = memory_stats().host_live;
    reset_memory_peak();
    let out = f();
    (out, memory_stats().host_peak - before)
}

#[test]
fn inference_forwards_match_keep_less_and_refuse_a_backward() {
    let (unet, p, sample, context, timestep) = common::tiny_unet();
    let cond = UNetConditioning { timestep: &timestep, encoder_hidden_states: &context, residuals: None };
    let ((kept, kept_acts), kept_peak) = peak_of(|| {
        let acts = unet.forward(&p, &sample, &cond, &mut Standalone(Device::Cpu)).unwrap();
        (acts.output.to_f32_vec().unwrap(), acts)
    });
    drop(kept_acts);
    let ((lean, lean_acts), lean_peak) = peak_of(|| {
        let acts = unet.forward(&p, &sample, &cond, &mut Inference(Device::Cpu)).unwrap();
        (acts.output.to_f32_vec().unwrap(), acts)
    });
    assert_eq!(lean, kept, "UNet: inference output differs");
    println!("UNet activations peak: kept {kept_peak} B, inference {lean_peak} B");
    assert!(lean_peak * 4 < kept_peak * 3, "UNet: inference peaked at {lean_peak} B, keeping everything at {kept_peak} B");

    // A backward through discarded activations stops with an error naming the cause.
    let alloc = &mut Standalone(Device::Cpu);
    let mut g = Grads::zeros(&unet.params, alloc as &mut dyn Allocator, DType::F32).unwrap();
    let dy = common::cpu(&[2, 4, 8, 8], &vec![1.0; 2 * 4 * 64]);
    let err = unet.backward(&p, &mut g, &sample, &cond, &lean_acts, &dy, alloc).err().expect("a backward over discarded activations");
    assert!(format!("{err:#}").contains("was discarded: an inference forward keeps no activations"), "{err:#}");
    drop(lean_acts);

    // The AutoencoderKL decoder (resnet chains, the mid block's attention, upsamplers).
    let (path, value) = config("autoencoder_kl_tiny");
    let vae = AutoencoderKl::new(AutoencoderKlConfig::from_json(&path, &value).unwrap()).unwrap();
    let p = ParamStore::random_owned(&vae.params, &Device::Cpu, DType::F32, 4).unwrap();
    let z = common::cpu(&[2, 4, 8, 8], &common::random(2 * 4 * 64, -1.0, 1.0, 5));
    let decode = |alloc: &mut dyn Allocator| -> Vec<f32> { vae.decode(&p, &z, alloc).unwrap().0.to_f32_vec().unwrap() };
    let (kept, kept_peak) = peak_of(|| decode(&mut Standalone(Device::Cpu)));
    let (lean, lean_peak) = peak_of(|| decode(&mut Inference(Device::Cpu)));
    assert_eq!(lean, kept, "VAE decode: inference output differs");
    println!("VAE decode activations peak: kept {kept_peak} B, inference {lean_peak} B");
    assert!(lean_peak < kept_peak, "VAE decode: inference peaked at {lean_peak} B, keeping everything at {kept_peak} B");
}
