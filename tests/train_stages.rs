//! The training stages on a tiny synthetic dataset (generated here with `sgdm synth`'s generator): each
//! stage's training loss falls over a short CPU run, validation reads the val split and nothing else (the
//! test split is deleted before training), and a resumed run continues exactly.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::OnceLock;

use sgdm::data::synth::{generate, SplitSize, SynthConfig};
use sgdm::models::sgdm::{EegEncoderConfig, StructuralVaeConfig};
use sgdm::nn::ParamStore;
use sgdm::train::stages::{
    train_base, train_controlnet, train_encoder, train_vae, BaseStageConfig, ControlNetStageConfig, EncoderStageConfig, LoopConfig, StageReport,
    Stopped, VaeStageConfig,
};
use sgdm::weights::SafetensorsFile;
use sgdm::Device;

/// The stop flag of the runs that are not stopped.
static KEEP_GOING: AtomicBool = AtomicBool::new(false);

/// 24 train, 8 val and 2 test figures, 2 repetitions each, with the test split's files removed.
fn dataset() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("train_stages_synth");
        let cfg = SynthConfig {
            seed: 3,
            snr: 1.0,
            train: SplitSize { figures: 24, repetitions: 2 },
            val: SplitSize { figures: 8, repetitions: 2 },
            test: SplitSize { figures: 2, repetitions: 2 },
            force: true,
        };
        generate(&cfg, &dir, &mut |_| {}).unwrap();
        remove_test_split(&dir);
        dir
    })
}

/// Deletes every file of the test split: a stage that opened one would fail.
fn remove_test_split(dir: &Path) {
    for f in ["eeg/test.npy", "edges16/test.npy"] {
        std::fs::remove_file(dir.join(f)).unwrap();
    }
    for d in ["images/test", "structure/test"] {
        std::fs::remove_dir_all(dir.join(d)).unwrap();
    }
}

fn loop_config(steps: u64, batch: usize, lr: f64) -> LoopConfig {
    LoopConfig {
        steps,
        batch,
        micro_batches: 1,
        lr,
        min_lr: lr / 10.0,
        warmup: 2,
        seed: 1,
        weight_decay: 0.0,
        max_grad_norm: Some(1.0),
        checkpoint_every: 10,
        log_every: 5,
        // Runs compared across folders (resume tests) must not pick different checkpoints; selection has
        // its own test.
        select_best: false,
    }
}

fn vae_model() -> StructuralVaeConfig {
    StructuralVaeConfig { latent_dim: 8, structure_dim: 256, image_size: 32, channels: [4, 8, 8], hidden: 32 }
}

fn vae_config(data: &Path, steps: u64) -> VaeStageConfig {
    VaeStageConfig { data: data.to_path_buf(), beta: 1e-3, lambda: 1.0, train: loop_config(steps, 8, 3e-3), model: vae_model() }
}

fn encoder_config(data: &Path, vae_weights: &Path, steps: u64) -> EncoderStageConfig {
    EncoderStageConfig {
        data: data.to_path_buf(),
        vae_weights: vae_weights.to_path_buf(),
        vae: vae_model(),
        temperature: 0.1,
        train: loop_config(steps, 8, 3e-3),
        image_embeddings: None,
        trial_average: 1,
        model: EegEncoderConfig {
            n_channels: 17,
            n_timepoints: 100,
            latent_dim: 8,
            lstm_hidden: 8,
            lstm_layers: 1,
            spatial_channels: [8, 8],
            fusion_hidden: 16,
            structure_hidden: 0,
            structure_dim: 0,
            linear_path: false,
        },
        structure_weight: 0.0,
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// The mean training loss of the first and last `k` steps, printed.
fn first_last(what: &str, r: &StageReport, k: usize) -> (f64, f64) {
    let l = &r.train_losses;
    let (first, last) = (mean(&l[..k]), mean(&l[l.len() - k..]));
    println!("{what}: training loss {first:.4} (first {k} steps) -> {last:.4} (last {k}); validation {:?}", r.val_losses);
    assert!(l.iter().all(|x| x.is_finite()), "{what}: non-finite loss in {l:?}");
    (first, last)
}

#[test]
fn vae_stage_loss_falls_and_it_writes_log_checkpoint_and_weights() {
    let out = tempfile::tempdir().unwrap();
    let report = train_vae(&vae_config(dataset(), 40), out.path(), None, &KEEP_GOING, &Device::Cpu).unwrap();
    assert_eq!((report.first_step, report.train_losses.len()), (0, 40));
    let (first, last) = first_last("vae", &report, 5);
    assert!(last < 0.8 * first, "the VAE's training loss fell from {first} to only {last}");
    assert_eq!(report.val_losses.iter().map(|v| v.0).collect::<Vec<_>>(), [10, 20, 30, 40]);
    let (val_first, val_last) = (report.val_losses[0].1, report.val_losses[3].1);
    assert!(val_last < val_first, "validation loss {val_first} -> {val_last}");

    let log = std::fs::read_to_string(out.path().join("vae.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 8, "a line every 5 steps: {log}");
    assert!(lines[1]["loss"]["val"].is_number() && lines[0]["loss"]["val"].is_null());
    for key in ["total", "recon", "kl", "structure"] {
        assert!(lines[7]["loss"][key].is_number(), "{key} missing from {}", lines[7]);
    }
    assert_eq!(SafetensorsFile::open(out.path().join("vae-step000040.safetensors")).unwrap().metadata()["step"], "40");
    assert!(SafetensorsFile::open(out.path().join("vae.safetensors")).unwrap().contains("structure_head.weight"));
}

#[test]
fn encoder_stage_infonce_loss_falls_against_the_frozen_vae() {
    let vae_out = tempfile::tempdir().unwrap();
    train_vae(&vae_config(dataset(), 20), vae_out.path(), None, &KEEP_GOING, &Device::Cpu).unwrap();
    let out = tempfile::tempdir().unwrap();
    let report =
        train_encoder(&encoder_config(dataset(), &vae_out.path().join("vae.safetensors"), 40), out.path(), None, &KEEP_GOING, &Device::Cpu).unwrap();
    let (first, last) = first_last("encoder", &report, 5);
    // ln(8) = 2.08 is chance for a batch of 8.
    assert!(last < first - 0.2, "the encoder's InfoNCE loss fell from {first} to only {last}");
    let stats: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.path().join("eeg_standardization.json")).unwrap()).unwrap();
    assert_eq!(stats["split"], "train");
    assert_eq!(stats["std"].as_array().unwrap().len(), 17);
    assert!(SafetensorsFile::open(out.path().join("encoder.safetensors")).unwrap().contains("fusion.2.weight"));

    // Samples averaged over both repetitions train too; more repetitions than the data has are refused.
    let mut cfg = encoder_config(dataset(), &vae_out.path().join("vae.safetensors"), 40);
    cfg.trial_average = 2;
    let report = train_encoder(&cfg, tempfile::tempdir().unwrap().path(), None, &KEEP_GOING, &Device::Cpu).unwrap();
    let (first, last) = first_last("encoder on 2-trial averages", &report, 5);
    assert!(last < first - 0.2, "InfoNCE on averaged trials fell from {first} to only {last}");
    cfg.trial_average = 3;
    let err = format!("{:#}", train_encoder(&cfg, tempfile::tempdir().unwrap().path(), None, &KEEP_GOING, &Device::Cpu).unwrap_err());
    assert!(err.contains("trial_average 3") && err.contains("2 repetitions"), "{err}");
}

#[test]
fn encoder_stage_trains_its_structure_head_and_linear_path_from_the_vae_structure_head() {
    let vae_out = tempfile::tempdir().unwrap();
    let vae_weights = vae_out.path().join("vae.safetensors");
    train_vae(&vae_config(dataset(), 20), vae_out.path(), None, &KEEP_GOING, &Device::Cpu).unwrap();
    let mut cfg = encoder_config(dataset(), &vae_weights, 40);
    cfg.model.structure_dim = 256;
    cfg.model.linear_path = true;
    cfg.structure_weight = 1.0;

    // At learning rate 0 nothing moves: the linear head is exactly the StructuralVAE's structure head.
    let frozen = tempfile::tempdir().unwrap();
    let mut still = cfg.clone();
    still.train = LoopConfig { lr: 0.0, min_lr: 0.0, ..loop_config(2, 8, 0.0) };
    train_encoder(&still, frozen.path(), None, &KEEP_GOING, &Device::Cpu).unwrap();
    let (vae, encoder) = (SafetensorsFile::open(&vae_weights).unwrap(), SafetensorsFile::open(frozen.path().join("encoder.safetensors")).unwrap());
    for name in ["structure_head.weight", "structure_head.bias"] {
        let read = |f: &SafetensorsFile| f.tensor(name, &Device::Cpu, sgdm::DType::F32).unwrap().to_f32_vec().unwrap();
        assert_eq!(read(&encoder), read(&vae), "{name} starts as the VAE's");
    }
    assert!(encoder.contains("linear_path.weight"));
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(frozen.path().join("encoder_config.json")).unwrap()).unwrap();
    assert_eq!((config["structure_dim"].as_u64(), config["linear_path"].as_bool()), (Some(256), Some(true)));

    // Trained, the total (InfoNCE + the structure term) falls, and both terms are logged.
    let out = tempfile::tempdir().unwrap();
    let report = train_encoder(&cfg, out.path(), None, &KEEP_GOING, &Device::Cpu).unwrap();
    let (first, last) = first_last("encoder with a structure head", &report, 5);
    assert!(last < first - 0.2, "InfoNCE + structure fell from {first} to only {last}");
    let log = std::fs::read_to_string(out.path().join("encoder.jsonl")).unwrap();
    let line: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    for key in ["total", "infonce", "structure", "val"] {
        assert!(line["loss"][key].as_f64().is_some_and(f64::is_finite), "no finite '{key}' in {line}");
    }

    // A head without a weight, and a weight without a head, are refused before training.
    let mut no_weight = cfg.clone();
    no_weight.structure_weight = 0.0;
    let err = format!("{:#}", train_encoder(&no_weight, tempfile::tempdir().unwrap().path(), None, &KEEP_GOING, &Device::Cpu).unwrap_err());
    assert!(err.contains("structure_weight is 0"), "{err}");
    let mut no_head = encoder_config(dataset(), &vae_weights, 40);
    no_head.structure_weight = 2.0;
    let err = format!("{:#}", train_encoder(&no_head, tempfile::tempdir().unwrap().path(), None, &KEEP_GOING, &Device::Cpu).unwrap_err());
    assert!(err.contains("needs a structure head"), "{err}");
}

/// Rewrites a safetensors file's `__metadata__` entry `key` (the tensors stay byte for byte).
fn set_metadata(path: &Path, key: &str, value: &str) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header["__metadata__"][key] = serde_json::Value::from(value);
    let mut text = serde_json::to_vec(&header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

#[test]
fn the_final_parameters_are_those_of_the_checkpoint_with_the_lowest_validation_loss() {
    let out = tempfile::tempdir().unwrap();
    let mut cfg = vae_config(dataset(), 10);
    cfg.train.checkpoint_every = 5;
    cfg.train.select_best = true;
    let report = train_vae(&cfg, out.path(), None, &KEEP_GOING, &Device::Cpu).unwrap();
    let best = report.val_losses.iter().copied().fold((0, f64::INFINITY), |b, v| if v.1 <= b.1 { v } else { b });
    assert_eq!(report.selected, best, "validation losses {:?}", report.val_losses);

    // Make step 5 the best by its recorded validation loss, then finish the (already finished) run again:
    // selection alone must put step 5's parameters in vae.safetensors.
    let step5 = out.path().join("vae-step000005.safetensors");
    set_metadata(&step5, "val_loss", "-1.0");
    let again = train_vae(&cfg, out.path(), Some(&out.path().join("vae-step000010.safetensors")), &KEEP_GOING, &Device::Cpu).unwrap();
    assert!(again.train_losses.is_empty());
    assert_eq!(again.selected, (5, -1.0));
    let (ckpt, last, fin) = (
        SafetensorsFile::open(&step5).unwrap(),
        SafetensorsFile::open(out.path().join("vae-step000010.safetensors")).unwrap(),
        SafetensorsFile::open(out.path().join("vae.safetensors")).unwrap(),
    );
    let mut differs_from_last = false;
    for name in fin.names() {
        let (_, _, bytes) = fin.raw(name).unwrap();
        assert!(bytes == ckpt.raw(name).unwrap().2, "vae.safetensors' {name} is not step 5's");
        differs_from_last |= bytes != last.raw(name).unwrap().2;
    }
    assert!(differs_from_last, "steps 5 and 10 have the same parameters: the check above proves nothing");
}

#[test]
fn encoder_stage_aligns_with_precomputed_image_embeddings_and_refuses_misshapen_ones() {
    let (dir, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let rows = |n: usize, seed: u64| -> Vec<f32> { common::random(n * 8, -1.0, 1.0, seed) };
    let (train, val) = (dir.path().join("train.npy"), dir.path().join("val.npy"));
    sgdm::data::npy::write_f32(&train, &[24, 8], &rows(24, 1)).unwrap();
    sgdm::data::npy::write_f32(&val, &[8, 8], &rows(8, 2)).unwrap();
    // No VAE weights exist: the embeddings replace the VAE's mu entirely.
    let mut cfg = encoder_config(dataset(), &dir.path().join("absent-vae.safetensors"), 40);
    cfg.image_embeddings = Some(sgdm::train::stages::EmbeddingTargets { train: train.clone(), val: val.clone() });
    let report = train_encoder(&cfg, out.path(), None, &KEEP_GOING, &Device::Cpu).unwrap();
    let (first, last) = first_last("encoder vs .npy embeddings", &report, 5);
    assert!(last < first - 0.2, "InfoNCE against the given embeddings fell from {first} to only {last}");

    sgdm::data::npy::write_f32(&val, &[8, 7], &common::random(56, -1.0, 1.0, 3)).unwrap();
    let err = format!("{:#}", train_encoder(&cfg, out.path(), None, &KEEP_GOING, &Device::Cpu).unwrap_err());
    assert!(err.contains("val.npy") && err.contains("[8, 7]") && err.contains("[8, 8]"), "{err}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn validation_reads_the_val_split_and_training_does_not() {
    // The same dataset with the val split's images and edge maps replaced by the train split's first eight:
    // training must be unchanged (it never reads val) and validation must change (it reads nothing else).
    let edited = tempfile::tempdir().unwrap();
    copy_dir(dataset(), edited.path());
    for i in 0..8 {
        let name = format!("{i:05}.png");
        std::fs::copy(dataset().join("images/train").join(&name), edited.path().join("images/val").join(&name)).unwrap();
    }
    let edges = sgdm::data::npy::NpyFile::open(dataset().join("edges16/train.npy")).unwrap().to_f32().unwrap();
    sgdm::data::npy::write_f32(edited.path().join("edges16/val.npy"), &[8, 16, 16], &edges[..8 * 256]).unwrap();

    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let original = train_vae(&vae_config(dataset(), 10), a.path(), None, &KEEP_GOING, &Device::Cpu).unwrap();
    let swapped = train_vae(&vae_config(edited.path(), 10), b.path(), None, &KEEP_GOING, &Device::Cpu).unwrap();
    assert_eq!(original.train_losses, swapped.train_losses, "training read the val split");
    println!("validation on val {:?}, on train figures put in val {:?}", original.val_losses, swapped.val_losses);
    assert_ne!(original.val_losses, swapped.val_losses, "validation ignored the val split");
}

#[test]
fn vae_stage_resumes_exactly_from_its_checkpoint() {
    let (straight, resumed_out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cfg = vae_config(dataset(), 20);
    let full = train_vae(&cfg, straight.path(), None, &KEEP_GOING, &Device::Cpu).unwrap();
    let resumed = train_vae(&cfg, resumed_out.path(), Some(&straight.path().join("vae-step000010.safetensors")), &KEEP_GOING, &Device::Cpu).unwrap();
    assert_eq!(resumed.first_step, 10);
    assert_eq!(resumed.train_losses, full.train_losses[10..], "the resumed run's training losses");
    assert_eq!(resumed.val_losses, full.val_losses[1..], "the resumed run's validation losses");
    let (a, b) =
        (std::fs::read(straight.path().join("vae.safetensors")).unwrap(), std::fs::read(resumed_out.path().join("vae.safetensors")).unwrap());
    assert!(a == b, "the resumed run's final parameters differ");
}

fn base_config(data: &Path, vae_steps: u64, unet_steps: u64) -> BaseStageConfig {
    BaseStageConfig {
        data: data.to_path_buf(),
        image_size: 32,
        kl_weight: 1e-6,
        context_tokens: 4,
        vae_train: loop_config(vae_steps, 8, 3e-3),
        unet_train: loop_config(unet_steps, 8, 2e-3),
        vae_model: serde_json::json!({
            "block_out_channels": [8, 16],
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
            "latent_channels": 4,
            "layers_per_block": 1,
            "norm_num_groups": 4,
            "scaling_factor": 0.5
        }),
        unet_model: serde_json::json!({
            "sample_size": 16,
            "block_out_channels": [16, 32],
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "layers_per_block": 1,
            "attention_head_dim": 2,
            "cross_attention_dim": 16,
            "norm_num_groups": 4
        }),
    }
}

#[test]
fn base_stage_vae_and_unet_losses_fall_and_it_writes_diffusers_components() {
    let out = tempfile::tempdir().unwrap();
    let report = train_base(&base_config(dataset(), 30, 30), out.path(), None, &KEEP_GOING, &Device::Cpu).unwrap();
    let (first, last) = first_last("base vae", report.vae.as_ref().unwrap(), 5);
    assert!(last < 0.8 * first, "the AutoencoderKL's training loss fell from {first} to only {last}");
    let (first, last) = first_last("base unet", &report.unet, 5);
    assert!(last < 0.8 * first, "the UNet's epsilon loss fell from {first} to only {last}");
    for (component, class, tensor) in [("vae", "AutoencoderKL", "decoder.conv_out.weight"), ("unet", "UNet2DConditionModel", "conv_out.weight")] {
        let c = sgdm::weights::Component::open(out.path().join(component)).unwrap();
        assert_eq!(c.config["_class_name"], class);
        assert!(c.weights.contains(tensor), "{component} lacks {tensor}");
    }
    // They load as real Stable Diffusion components do: every parameter present, by name and shape.
    let source = |c: &str| sgdm::weights::ModelSource::open(&out.path().join(c), None).unwrap();
    let (vae, unet) = (source("vae"), source("unet"));
    let vae_model = sgdm::models::autoencoder_kl::AutoencoderKl::new(
        sgdm::models::autoencoder_kl::AutoencoderKlConfig::from_json(&vae.config_path(), &vae.config).unwrap(),
    )
    .unwrap();
    ParamStore::from_source(&vae_model.params, &vae.parameters, &sgdm::Device::Cpu, sgdm::DType::F32, &[]).unwrap();
    let unet_model = sgdm::models::unet::UNet::new(sgdm::models::unet::UNetConfig::from_json(&unet.config_path(), &unet.config).unwrap()).unwrap();
    ParamStore::from_source(&unet_model.params, &unet.parameters, &sgdm::Device::Cpu, sgdm::DType::F32, &[]).unwrap();
}

/// Stage controlnet against the output folders of stages base, vae and encoder (in that order).
fn controlnet_config([base, vae, encoder]: [&Path; 3], encoder_model: &EegEncoderConfig, train: LoopConfig) -> ControlNetStageConfig {
    ControlNetStageConfig {
        data: dataset().to_path_buf(),
        vae: base.join("vae"),
        unet: base.join("unet"),
        structural_vae_weights: vae.join("vae.safetensors"),
        structural_vae: vae_model(),
        encoder_weights: encoder.join("encoder.safetensors"),
        encoder: encoder_model.clone(),
        eeg_standardization: encoder.join("eeg_standardization.json"),
        image_size: 32,
        tokens: 2,
        condition_dropout: 0.2,
        conditioning_embedding_out_channels: vec![8, 16],
        train,
        trial_average: 1,
    }
}

#[test]
fn controlnet_stage_epsilon_loss_falls_through_the_frozen_unet() {
    let (base, vae, encoder, out) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    train_base(&base_config(dataset(), 20, 20), base.path(), None, &KEEP_GOING, &Device::Cpu).unwrap();
    train_vae(&vae_config(dataset(), 20), vae.path(), None, &KEEP_GOING, &Device::Cpu).unwrap();
    let enc = encoder_config(dataset(), &vae.path().join("vae.safetensors"), 10);
    train_encoder(&enc, encoder.path(), None, &KEEP_GOING, &Device::Cpu).unwrap();
    let cfg = controlnet_config([base.path(), vae.path(), encoder.path()], &enc.model, loop_config(30, 8, 2e-3));
    let report = train_controlnet(&cfg, out.path(), None, &KEEP_GOING, &Device::Cpu).unwrap();
    let (first, last) = first_last("controlnet", &report, 5);
    assert!(last < 0.9 * first, "the ControlNet's epsilon loss fell from {first} to only {last}");
    let c = sgdm::weights::Component::open(out.path().join("controlnet")).unwrap();
    assert_eq!(c.config["_class_name"], "ControlNetModel");
    assert!(c.weights.contains("controlnet_mid_block.weight") && !c.weights.contains("eeg_projector.weight"));
    let source = sgdm::weights::ModelSource::open(&out.path().join("controlnet"), None).unwrap();
    let model =
        sgdm::models::unet::ControlNet::new(sgdm::models::unet::UNetConfig::from_json(&source.config_path(), &source.config).unwrap()).unwrap();
    let p = ParamStore::from_source(&model.params, &source.parameters, &sgdm::Device::Cpu, sgdm::DType::F32, &[]).unwrap();
    // The zero convs start at zero: training moved them, so gradients reached the ControlNet's outputs.
    let mid = p.get(model.mid_zero_conv.weight).to_f32_vec().unwrap();
    assert!(mid.iter().any(|v| *v != 0.0), "controlnet_mid_block is still zero");
    let projector = SafetensorsFile::open(out.path().join("eeg_projector.safetensors")).unwrap();
    assert_eq!(projector.metadata()["tokens"], "2");

    // Trained against another folder's VAE and UNet (as with Stable Diffusion's): base.json names them, and
    // the folder completed with the other stages' files reconstructs through them.
    let pointer: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.path().join("base.json")).unwrap()).unwrap();
    assert_eq!(pointer["unet"], std::fs::canonicalize(base.path().join("unet")).unwrap().display().to_string());
    for f in ["vae.safetensors", "vae_config.json"] {
        std::fs::copy(vae.path().join(f), out.path().join(f)).unwrap();
    }
    for f in ["encoder.safetensors", "encoder_config.json", "eeg_standardization.json"] {
        std::fs::copy(encoder.path().join(f), out.path().join(f)).unwrap();
    }
    let pipeline = sgdm::pipeline::Pipeline::open(out.path(), &Device::Cpu, sgdm::DType::F32).unwrap();
    let opts = sgdm::pipeline::SamplingOptions { steps: 2, ..Default::default() };
    let r = pipeline.reconstruct(&vec![0.5; 2 * 17 * 100], &[0, 1], &opts).unwrap();
    assert_eq!((r.images.len(), r.structure.len()), (2 * 3 * 32 * 32, 2 * 256));
    assert!(r.images.iter().all(|v| (0.0..=1.0).contains(v)));
}

#[test]
fn a_stop_request_ends_the_stage_with_a_checkpoint_that_resumes_to_the_same_result() {
    let (straight, stopped_out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cfg = vae_config(dataset(), 12);
    train_vae(&cfg, straight.path(), None, &KEEP_GOING, &Device::Cpu).unwrap();
    // Set before the run, as Ctrl-C during its first step would: it stops at the end of that step.
    let err = train_vae(&cfg, stopped_out.path(), None, &AtomicBool::new(true), &Device::Cpu).unwrap_err();
    let stopped = err.downcast_ref::<Stopped>().unwrap_or_else(|| panic!("not a stop: {err:#}"));
    let checkpoint = stopped_out.path().join("vae-step000001.safetensors");
    assert_eq!((stopped.step, stopped.steps, &stopped.checkpoint), (1, 12, &checkpoint));
    assert!(!stopped_out.path().join("vae.safetensors").exists(), "a stopped run wrote its final parameters");
    let resumed = train_vae(&cfg, stopped_out.path(), Some(&checkpoint), &KEEP_GOING, &Device::Cpu).unwrap();
    assert_eq!((resumed.first_step, resumed.train_losses.len()), (1, 11));
    let (a, b) =
        (std::fs::read(straight.path().join("vae.safetensors")).unwrap(), std::fs::read(stopped_out.path().join("vae.safetensors")).unwrap());
    assert!(a == b, "the stopped and resumed run's final parameters differ from an uninterrupted run's");
}

#[test]
fn train_all_runs_every_stage_into_one_folder_and_a_rerun_skips_them() {
    let out = tempfile::tempdir().unwrap();
    let config = common::tiny_train_config(dataset());
    let config_path = out.path().join("train.toml");
    std::fs::write(&config_path, config).unwrap();
    let run = || {
        let output = std::process::Command::new(common::sgdm_bin())
            .args(["train", "all", "--config"])
            .arg(&config_path)
            .arg("--out")
            .arg(out.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(output.status.success(), "sgdm train all failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
        stdout
    };
    let first = run();
    for file in [
        "base_vae.safetensors",
        "base_unet.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae.safetensors",
        "vae.jsonl",
        "encoder.safetensors",
        "eeg_standardization.json",
        "controlnet.safetensors",
        "controlnet/diffusion_pytorch_model.safetensors",
        "eeg_projector.safetensors",
        "controlnet-step000005.safetensors",
        "vae_config.json",
        "encoder_config.json",
    ] {
        assert!(out.path().join(file).exists(), "train all did not write {file}:\n{first}");
    }
    let again = run();
    assert_eq!(again.matches("skipped").count(), 4, "a rerun should skip every stage:\n{again}");
}

#[test]
fn the_vae_and_encoder_stages_train_on_cuda_in_bf16() {
    let Some(gpu) = common::gpu_or_skip("CUDA bf16 training of stages vae and encoder") else { return };
    let (vae_out, enc_out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let report = train_vae(&vae_config(dataset(), 40), vae_out.path(), None, &KEEP_GOING, &gpu).unwrap();
    let (first, last) = first_last("vae on CUDA (bf16, f32 master weights)", &report, 5);
    assert!(last < 0.8 * first, "the VAE's bf16 training loss fell from {first} to only {last}");
    let file = SafetensorsFile::open(vae_out.path().join("vae.safetensors")).unwrap();
    assert_eq!(file.raw("structure_head.weight").unwrap().0, sgdm::DType::BF16);
    let report =
        train_encoder(&encoder_config(dataset(), &vae_out.path().join("vae.safetensors"), 40), enc_out.path(), None, &KEEP_GOING, &gpu).unwrap();
    let (first, last) = first_last("encoder on CUDA", &report, 5);
    assert!(last < first - 0.2, "the encoder's bf16 InfoNCE loss fell from {first} to only {last}");
}

#[test]
fn micro_batches_accumulate_into_one_optimizer_step() {
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut cfg = vae_config(dataset(), 20);
    let single = train_vae(&cfg, one.path(), None, &KEEP_GOING, &Device::Cpu).unwrap();
    cfg.train.micro_batches = 2;
    let report = train_vae(&cfg, two.path(), None, &KEEP_GOING, &Device::Cpu).unwrap();
    // 20 optimizer steps either way; each reports the mean loss of its micro-batches.
    assert_eq!(report.train_losses.len(), 20);
    let (first, last) = first_last("vae, 2 micro-batches of 8", &report, 5);
    assert!(last < 0.8 * first, "loss {first} -> {last}");
    // The first micro-batch of step 1 is the single run's whole step 1 batch (same RNG draws), and the
    // second adds another: the step-1 losses differ, the runs are not the same run.
    assert_ne!(report.train_losses[0], single.train_losses[0]);
    cfg.train.micro_batches = 0;
    let err = format!("{:#}", train_vae(&cfg, tempfile::tempdir().unwrap().path(), None, &KEEP_GOING, &Device::Cpu).unwrap_err());
    assert!(err.contains("micro_batches"), "{err}");
}

/// A run's losses and final parameters, to compare runs bit for bit.
fn run_record(report: &StageReport, weights: &Path) -> (Vec<f64>, Vec<(u64, f64)>, Vec<u8>) {
    (report.train_losses.clone(), report.val_losses.clone(), std::fs::read(weights).unwrap())
}

/// Every stage trained with its steps' tensors in the per-step pool, poisoned with NaN before every step (after the first),
/// equals the same run with a fresh zeroed allocation per tensor, bit for bit: no forward or backward of any
/// stage reads memory it did not write, and the pool changes where tensors live, nothing else. Every step
/// after the first fits the pool the first one sized (nothing overflows), at no more than that size.
#[test]
fn every_stage_trains_bit_identically_in_a_poisoned_step_pool() {
    use sgdm::train::stages::{On, StepMemory};
    let on = |memory| On::with_step_memory(&Device::Cpu, memory);
    let check_memory = |what: &str, r: &StageReport| {
        let m = &r.memory;
        assert_eq!(m.overflowed, 0, "{what}: {} tensors did not fit the pool the first step sized", m.overflowed);
        assert!(m.step_pool > 0 && m.step_peak <= m.step_pool, "{what}: pool {} bytes, peak {}", m.step_pool, m.step_peak);
        assert!(m.arena.total_capacity() > 0 && m.arena.total_used() == m.arena.total_capacity(), "{what}: {}", m.arena);
    };
    let dirs: Vec<tempfile::TempDir> = (0..8).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut runs = Vec::new();
    for (i, memory) in [StepMemory::Standalone, StepMemory::PoisonedPool].into_iter().enumerate() {
        let [vae, encoder, base, controlnet] = [0, 1, 2, 3].map(|k| dirs[4 * i + k].path());
        // Two micro-batches: the pool serves both of a step's backwards, gradients accumulating in the arena.
        let mut vae_cfg = vae_config(dataset(), 12);
        vae_cfg.train.micro_batches = 2;
        let vae_report = train_vae(&vae_cfg, vae, None, &KEEP_GOING, on(memory)).unwrap();
        let mut enc = encoder_config(dataset(), &vae.join("vae.safetensors"), 12);
        // The structure head and linear path too: their forward and backward run in the step's pool.
        enc.model.structure_dim = 256;
        enc.model.linear_path = true;
        enc.structure_weight = 0.5;
        let encoder_report = train_encoder(&enc, encoder, None, &KEEP_GOING, on(memory)).unwrap();
        let base_report = train_base(&base_config(dataset(), 6, 6), base, None, &KEEP_GOING, on(memory)).unwrap();
        let cfg = controlnet_config([base, vae, encoder], &enc.model, loop_config(6, 4, 2e-3));
        let controlnet_report = train_controlnet(&cfg, controlnet, None, &KEEP_GOING, on(memory)).unwrap();
        let reports = [
            ("vae", &vae_report, vae.join("vae.safetensors")),
            ("encoder", &encoder_report, encoder.join("encoder.safetensors")),
            ("base_vae", base_report.vae.as_ref().unwrap(), base.join("base_vae.safetensors")),
            ("base_unet", &base_report.unet, base.join("base_unet.safetensors")),
            ("controlnet", &controlnet_report, controlnet.join("controlnet.safetensors")),
        ];
        if memory == StepMemory::PoisonedPool {
            for (what, r, _) in &reports {
                check_memory(what, r);
            }
        } else {
            assert!(reports.iter().all(|(_, r, _)| r.memory.step_pool == 0), "standalone runs use no pool");
        }
        runs.push(reports.map(|(what, r, weights)| (what, run_record(r, &weights))));
    }
    for (standalone, pooled) in runs[0].iter().zip(&runs[1]) {
        assert_eq!(standalone.1 .0, pooled.1 .0, "{}: the training losses differ in the pool", standalone.0);
        assert_eq!(standalone.1 .1, pooled.1 .1, "{}: the validation losses differ in the pool", standalone.0);
        assert!(standalone.1 .2 == pooled.1 .2, "{}: the final parameters differ in the pool", standalone.0);
    }
}
