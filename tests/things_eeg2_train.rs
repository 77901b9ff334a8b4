//! THINGS-EEG2 end to end on a THINGS-shaped folder written here: imported, trained by `sgdm train all`
//! with the channels, time points and image sizes left to the dataset (once with a tiny base trained, once
//! with a tiny pretrained diffusers "SD-like" folder as the base), reconstructed from the official test file
//! with the THINGS test_images folder as the seen images, and evaluated; the EEG <-> model contract refuses
//! every mismatch in reconstruct, eval and training before any output; the example configurations in
//! configs/ read against an imported dataset.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::OnceLock;

use common::run_sgdm;
use common::things::{eeg_dict_file, eeg_values, image_folder, subject_folder, times, Layout, CHANNELS};
use serde_json::{json, Value};
use sgdm::data::npy::write_f32;
use sgdm::models::autoencoder_kl::{AutoencoderKl, AutoencoderKlConfig};
use sgdm::models::unet::{ControlNet, UNet, UNetConfig};
use sgdm::nn::{ParamId, ParamStore, ParamTree};
use sgdm::train::config::TrainingConfig;
use sgdm::weights::{save_safetensors, Component, SafetensorsFile};
use sgdm::{DType, Device};

/// The source folders and the dataset imported from them (image size 32): 8 training concepts of 2 images,
/// 4 test concepts of 1; one subject in the official layout, 2 training and 4 test repetitions.
struct Imported {
    root: PathBuf,
    subject: PathBuf,
    images: PathBuf,
    data: PathBuf,
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn imported() -> &'static Imported {
    static DATA: OnceLock<Imported> = OnceLock::new();
    DATA.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("things_eeg2_train_{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let images = root.join("image_set");
        image_folder(&images, "training_images", 8, 2, 1);
        image_folder(&images, "test_images", 4, 1, 20);
        let subject = root.join("sub-01");
        subject_folder(&subject, Layout::NpSave, [16, 2, 17, 100], [4, 4, 17, 100], &CHANNELS, &times(-0.2, 100.0, 100), 11);
        let data = root.join("dataset");
        let (ok, out, err) = run_sgdm([
            "data",
            "import",
            "things-eeg2",
            "--eeg-dir",
            s(&subject),
            "--images-dir",
            s(&images),
            "--out",
            s(&data),
            "--val-concepts",
            "2",
            "--image-size",
            "32",
        ]);
        assert!(ok, "import failed:\n{out}\n{err}");
        Imported { root, subject, images, data }
    })
}

/// Tiny models for `data`, every channel count, time length and image size left to the dataset; `base` is
/// the `[base]` table (trained or pretrained).
fn config(data: &Path, base: &str) -> String {
    let data = s(data);
    let train =
        |table: &str, lr: f64| format!("[{table}]\nsteps = 4\nbatch = 4\nlr = {lr}\nwarmup = 1\nseed = 1\ncheckpoint_every = 4\nlog_every = 4\n");
    let svae = "latent_dim = 8\nstructure_dim = 256\nchannels = [4, 8, 8]\nhidden = 32\n";
    let encoder = "latent_dim = 8\nlstm_hidden = 8\nlstm_layers = 1\nspatial_channels = [8, 8]\nfusion_hidden = 16\n";
    format!(
        "{base}\n[vae]\ndata = {data:?}\nbeta = 1e-3\nlambda = 1.0\n{}[vae.model]\n{svae}\
         [encoder]\ndata = {data:?}\ntemperature = 0.1\n{}[encoder.vae]\n{svae}[encoder.model]\n{encoder}\
         [controlnet]\ndata = {data:?}\ntokens = 2\ncondition_dropout = 0.2\nconditioning_embedding_out_channels = [8, 16]\n\
         {}[controlnet.structural_vae]\n{svae}[controlnet.encoder]\n{encoder}",
        train("vae.train", 3e-3),
        train("encoder.train", 3e-3),
        train("controlnet.train", 2e-3),
    )
}

/// A tiny base to train, its sizes (image, sample_size) left to the dataset.
fn trained_base(data: &Path) -> String {
    format!(
        "[base]\ndata = {:?}\nkl_weight = 1e-6\ncontext_tokens = 4\n\
         [base.vae_model]\nblock_out_channels = [8, 16]\ndown_block_types = [\"DownEncoderBlock2D\", \"DownEncoderBlock2D\"]\n\
         up_block_types = [\"UpDecoderBlock2D\", \"UpDecoderBlock2D\"]\nlatent_channels = 4\nlayers_per_block = 1\nnorm_num_groups = 4\nscaling_factor = 0.5\n\
         [base.unet_model]\nblock_out_channels = [16, 32]\ndown_block_types = [\"CrossAttnDownBlock2D\", \"DownBlock2D\"]\n\
         up_block_types = [\"UpBlock2D\", \"CrossAttnUpBlock2D\"]\nlayers_per_block = 1\nattention_head_dim = 2\ncross_attention_dim = 16\nnorm_num_groups = 4\n\
         [base.vae_train]\nsteps = 4\nbatch = 4\nlr = 3e-3\nwarmup = 1\nseed = 1\ncheckpoint_every = 4\n\
         [base.unet_train]\nsteps = 4\nbatch = 4\nlr = 2e-3\nwarmup = 1\nseed = 2\ncheckpoint_every = 4\n",
        s(data)
    )
}

fn train_all(config_text: &str, out: &Path) -> String {
    let path = out.with_extension("toml");
    std::fs::write(&path, config_text).unwrap();
    let (ok, stdout, stderr) = run_sgdm(["train", "all", "--config", s(&path), "--out", s(out)]);
    assert!(ok, "sgdm train all failed:\n{stdout}\n{stderr}");
    stdout
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The weights folder trained on the imported dataset with a tiny trained base, made once.
fn trained() -> &'static PathBuf {
    static WEIGHTS: OnceLock<PathBuf> = OnceLock::new();
    WEIGHTS.get_or_init(|| {
        let d = imported();
        let weights = d.root.join("weights");
        train_all(&config(&d.data, &trained_base(&d.data)), &weights);
        weights
    })
}

fn reconstruct(eeg: &Path, weights: &Path, out: &Path, extra: &[&str]) -> (bool, String, String) {
    let mut args = vec!["--device", "cpu", "reconstruct", "--eeg", s(eeg), "--weights", s(weights), "--out", s(out), "--steps", "2", "--batch", "4"];
    args.extend_from_slice(extra);
    run_sgdm(args)
}

#[test]
fn train_all_on_the_import_then_reconstruct_the_test_file_and_evaluate_against_things_images() {
    let d = imported();
    let weights = trained();
    // What the configuration left out came from the dataset.
    let encoder = read_json(&weights.join("encoder_config.json"));
    assert_eq!((encoder["n_channels"].as_u64(), encoder["n_timepoints"].as_u64()), (Some(17), Some(100)));
    assert_eq!(read_json(&weights.join("vae_config.json"))["image_size"], 32);
    assert_eq!(read_json(&weights.join("unet/config.json"))["sample_size"], 16, "image 32 over the VAE's downscale of 2");
    // The contract: channels in order, rate, window, unit.
    let contract = read_json(&weights.join("eeg_standardization.json"));
    assert_eq!(contract["ch_names"][11], "POz");
    assert_eq!(contract["sampling_rate_hz"], 100.0);
    assert_eq!(contract["units"], "as stored in the source files");
    let window: Vec<f64> = serde_json::from_value(contract["window_s"].clone()).unwrap();
    assert!((window[0] + 0.2).abs() < 1e-6 && (window[1] - 0.79).abs() < 1e-6, "{window:?}");

    // The official test file, its 4 repetitions averaged, with THINGS' test_images as the seen images.
    let recon = d.root.join("recon");
    let test_eeg = d.subject.join("preprocessed_eeg_test.npy");
    let (ok, out, err) = reconstruct(&test_eeg, weights, &recon, &["--images", s(&d.images.join("test_images"))]);
    assert!(ok, "reconstruct failed:\n{out}\n{err}");
    assert!(!err.contains("note:"), "a file with names and times needs no note:\n{err}");
    let lines: Vec<Value> =
        std::fs::read_to_string(recon.join("manifest.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut seen: Vec<(u64, String)> = lines.iter().map(|l| (l["index"].as_u64().unwrap(), l["seen"].as_str().unwrap().to_string())).collect();
    seen.sort();
    assert!(seen[0].1.ends_with("test_images/00020_c20/c20_00b.jpg") && seen[3].1.ends_with("test_images/00023_c23/c23_00b.jpg"), "{seen:?}");
    let eval = d.root.join("eval");
    let (ok, out, err) = run_sgdm(["--device", "cpu", "eval", "--recon", s(&recon), "--out", s(&eval)]);
    assert!(ok, "eval failed:\n{out}\n{err}");
    let metrics = read_json(&eval.join("metrics.json"));
    assert_eq!((metrics["items"].as_u64(), metrics["retrieval"]["ways"].as_u64()), (Some(4), Some(4)));
    for key in ["top1", "top5"] {
        assert!(metrics["retrieval"][key].as_f64().is_some_and(|v| (0.0..=1.0).contains(&v)), "{metrics}");
    }
    // eval reads THINGS folders too, and refuses the image set's root, which would pair rows wrongly.
    let (ok, _, err) = run_sgdm(["--device", "cpu", "eval", "--recon", s(&recon), "--out", s(&eval), "--images", s(&d.data.join("images/test"))]);
    assert!(ok, "{err}");
    let (ok, _, err) = run_sgdm(["--device", "cpu", "eval", "--recon", s(&recon), "--out", s(&d.root.join("e2")), "--images", s(&d.images)]);
    assert!(!ok && err.contains("holds THINGS-EEG2's image set") && err.contains("test_images/"), "{err}");
}

/// A copy of the official test file with other names, times or values.
fn test_file(d: &Imported, name: &str, names: &[&str], t: &[f64], scale: f32) -> PathBuf {
    let values: Vec<f32> = eeg_values([4, 4, 17, 100], 12).iter().map(|v| v * scale).collect();
    let path = d.root.join(name);
    std::fs::write(&path, eeg_dict_file(Layout::PickleDump, [4, 4, 17, 100], &values, names, t)).unwrap();
    path
}

#[test]
fn the_eeg_contract_refuses_every_mismatch_before_any_output() {
    let d = imported();
    let weights = trained();
    let t = times(-0.2, 100.0, 100);
    let refused = |what: &str, eeg: &Path, expect: &[&str]| {
        let out = d.root.join(format!("refused-{what}"));
        let (ok, _, err) = reconstruct(eeg, weights, &out, &[]);
        assert!(!ok, "{what}: not refused");
        assert!(err.contains(eeg.file_name().unwrap().to_str().unwrap()), "{what}: the error does not name the file:\n{err}");
        for e in expect {
            assert!(err.contains(e), "{what}: no '{e}' in:\n{err}");
        }
        assert!(!out.exists(), "{what}: a refused reconstruction wrote {}", out.display());
    };
    let mut swapped = CHANNELS;
    swapped.swap(3, 4);
    refused("reordered", &test_file(d, "reordered.npy", &swapped, &t, 1.0), &["in another order", "position 3 is Pz here, P1 in the model"]);
    let frontal = ["Fp1", "Fp2", "F7", "F3", "Fz", "F4", "F8", "FC5", "FC1", "FC2", "FC6", "T7", "C3", "Cz", "C4", "T8", "CP5"];
    refused("frontal", &test_file(d, "frontal.npy", &frontal, &t, 1.0), &["not the model's", "P7, P5", "Fp1, Fp2"]);
    refused("250 Hz", &test_file(d, "fast.npy", &CHANNELS, &times(-0.2, 250.0, 100), 1.0), &["sampled at 250 Hz", "at 100 Hz"]);
    refused("window", &test_file(d, "late.npy", &CHANNELS, &times(0.0, 100.0, 100), 1.0), &["from 0.000 to 0.990 s", "from -0.200 to 0.790 s"]);
    refused("volts", &test_file(d, "volts.npy", &CHANNELS, &t, 1e-6), &["about 1.0e-6 times the scale", "volts"]);

    // A plain .npy: NaN in its last row is found by the scan before any batch, with its index.
    let mut values = eeg_values([4, 4, 17, 100], 12);
    values[(3 * 4 + 2) * 1700 + 5 * 100 + 9] = f32::NAN;
    let nan = d.root.join("nan.npy");
    write_f32(&nan, &[4, 4, 17, 100], &values).unwrap();
    refused("NaN", &nan, &["1 non-finite value(s)", "[3, 2, 5, 9]"]);
    // A plain .npy without names or times is read as the model's, with a one-line note.
    let plain = d.root.join("plain.npy");
    write_f32(&plain, &[4, 4, 17, 100], &eeg_values([4, 4, 17, 100], 12)).unwrap();
    let (ok, _, err) = reconstruct(&plain, weights, &d.root.join("plain-recon"), &["--limit", "1"]);
    assert!(ok, "{err}");
    let notes: Vec<&str> = err.lines().filter(|l| l.starts_with("sgdm: note:")).collect();
    assert_eq!(notes.len(), 1, "{err}");
    assert!(
        notes[0].contains("plain.npy: stores no channel names or times; read as the model's P7, P5")
            && notes[0].contains("at 100 Hz, -0.200 to 0.790 s"),
        "{err}"
    );

    // eval checks the file against the weights it scores with: here a model trained on another channel order.
    let other = d.root.join("other-weights");
    copy_dir(weights, &other);
    let mut contract = read_json(&other.join("eeg_standardization.json"));
    contract["ch_names"].as_array_mut().unwrap().swap(0, 1);
    std::fs::write(other.join("eeg_standardization.json"), contract.to_string()).unwrap();
    let recon = d.root.join("recon-eval-check");
    let test_eeg = d.subject.join("preprocessed_eeg_test.npy");
    let (ok, _, err) = reconstruct(&test_eeg, weights, &recon, &["--limit", "2", "--images", s(&d.images.join("test_images"))]);
    assert!(ok, "{err}");
    let (ok, _, err) =
        run_sgdm(["--device", "cpu", "eval", "--recon", s(&recon), "--items", "2", "--weights", s(&other), "--out", s(&d.root.join("e4"))]);
    assert!(!ok && err.contains("preprocessed_eeg_test.npy: holds the model's channels in another order"), "{err}");
    assert!(!d.root.join("e4").exists(), "eval wrote before refusing");

    // Training: stage controlnet checks the dataset against the encoder's contract before any output.
    let edited = d.root.join("dataset-reordered");
    copy_dir(&d.data, &edited);
    let mut manifest = read_json(&edited.join("manifest.json"));
    manifest["ch_names"].as_array_mut().unwrap().swap(0, 1);
    std::fs::write(edited.join("manifest.json"), manifest.to_string()).unwrap();
    // A single stage reads only its own table, so the earlier stages' outputs are named in it.
    let stage = |data: &Path, out: &Path| {
        let paths = format!(
            "[controlnet]\nvae = {:?}\nunet = {:?}\nstructural_vae_weights = {:?}\nencoder_weights = {:?}\neeg_standardization = {:?}\n",
            s(&weights.join("vae")),
            s(&weights.join("unet")),
            s(&weights.join("vae.safetensors")),
            s(&weights.join("encoder.safetensors")),
            s(&weights.join("eeg_standardization.json")),
        );
        let path = out.with_extension("toml");
        std::fs::write(&path, config(data, "").replacen("[controlnet]\n", &paths, 1)).unwrap();
        run_sgdm(["train", "controlnet", "--config", s(&path), "--out", s(out)])
    };
    // A dataset's own plain .npy is checked with the names and times of its manifest.
    let (ok, _, err) = reconstruct(&d.data.join("eeg/test.npy"), weights, &d.root.join("recon-dataset"), &["--limit", "1"]);
    assert!(ok && !err.contains("note:"), "{err}");
    let (ok, _, err) = reconstruct(&edited.join("eeg/test.npy"), weights, &d.root.join("recon-reordered"), &["--limit", "1"]);
    assert!(!ok && err.contains("dataset-reordered/eeg/test.npy: holds the model's channels in another order"), "{err}");
    let out = d.root.join("cn-reordered");
    let (ok, _, err) = stage(&edited, &out);
    assert!(!ok && err.contains("dataset-reordered/manifest.json: holds the model's channels in another order"), "{err}");
    assert!(!out.exists(), "the refused stage wrote its folder");
    let volts = d.root.join("dataset-volts");
    copy_dir(&d.data, &volts);
    for split in ["train", "val"] {
        let file = sgdm::data::npy::NpyFile::open(volts.join(format!("eeg/{split}.npy"))).unwrap();
        let (shape, v) = (file.header.shape.clone(), file.to_f32().unwrap());
        drop(file);
        write_f32(volts.join(format!("eeg/{split}.npy")), &shape, &v.iter().map(|x| x * 1e-6).collect::<Vec<_>>()).unwrap();
    }
    let out = d.root.join("cn-volts");
    let (ok, _, err) = stage(&volts, &out);
    assert!(!ok && err.contains("dataset-volts/eeg/train.npy: its values are about 1.0e-6 times"), "{err}");
    assert!(!out.exists(), "the refused stage wrote its folder");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

/// Writes a diffusers component: `config.json` and seeded random parameters.
fn write_component(dir: &Path, config: &Value, tree: &ParamTree, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(config).unwrap()).unwrap();
    let params = ParamStore::random_owned(tree, &Device::Cpu, DType::F32, seed).unwrap();
    let refs: Vec<(&str, &sgdm::Tensor)> = tree.specs().iter().enumerate().map(|(i, spec)| (spec.name.as_str(), params.get(ParamId(i)))).collect();
    save_safetensors(dir.join("diffusion_pytorch_model.safetensors"), &refs, None).unwrap();
}

/// A Stable-Diffusion-1.5-shaped diffusers folder, tiny: SD's config keys, a four-level VAE (downscale 8)
/// with sample_size 64, a UNet of cross-attention width 24 on 8x8 latents; model_index.json and no text
/// encoder, which the base does not need.
fn sd_like_folder(dir: &Path) {
    let vae = json!({
        "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu", "in_channels": 3, "out_channels": 3,
        "block_out_channels": [4, 8, 8, 8],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 64, "scaling_factor": 0.18215
    });
    let unet = json!({
        "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu", "attention_head_dim": 2,
        "block_out_channels": [8, 16], "center_input_sample": false, "cross_attention_dim": 24,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0,
        "in_channels": 4, "layers_per_block": 1, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 4, "out_channels": 4,
        "sample_size": 8, "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]
    });
    let vae_model = AutoencoderKl::new(AutoencoderKlConfig::from_json(&dir.join("vae/config.json"), &vae).unwrap()).unwrap();
    write_component(&dir.join("vae"), &vae, &vae_model.params, 7);
    let unet_model = UNet::new(UNetConfig::from_json(&dir.join("unet/config.json"), &unet).unwrap()).unwrap();
    write_component(&dir.join("unet"), &unet, &unet_model.params, 8);
    let index =
        json!({ "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"] });
    std::fs::write(dir.join("model_index.json"), index.to_string()).unwrap();
}

#[test]
fn a_pretrained_sd_like_base_skips_base_training_and_seeds_the_controlnet_as_from_unet_does() {
    let d = imported();
    let sd = d.root.join("sd-like");
    sd_like_folder(&sd);
    let weights = d.root.join("weights-pretrained");
    let stdout = train_all(&config(&d.data, &format!("[base]\npretrained = {:?}\n", s(&sd))), &weights);
    assert!(stdout.contains("base: pretrained") && stdout.contains("not trained"), "{stdout}");
    assert!(!weights.join("unet").exists() && !weights.join("base_unet.jsonl").exists(), "a base was trained");
    // base.json records the pretrained components, so reconstruct loads them.
    let pointer = read_json(&weights.join("base.json"));
    assert_eq!(pointer["unet"], s(&std::fs::canonicalize(sd.join("unet")).unwrap()));
    assert_eq!(pointer["vae"], s(&std::fs::canonicalize(sd.join("vae")).unwrap()));
    // Tokens of the UNet's cross-attention width; images at the VAE's resolution.
    let projector = SafetensorsFile::open(weights.join("eeg_projector.safetensors")).unwrap();
    assert_eq!(projector.shape("eeg_projector.weight").unwrap(), [2 * 24, 8]);
    let recon = d.root.join("recon-pretrained");
    let (ok, out, err) = reconstruct(&d.subject.join("preprocessed_eeg_test.npy"), &weights, &recon, &["--limit", "2"]);
    assert!(ok, "reconstruct failed:\n{out}\n{err}");
    let image = image::open(recon.join("images/00000.png")).unwrap();
    assert_eq!((image.width(), image.height()), (64, 64), "the image side is the VAE's sample_size");

    // from_unet: at learning rate 0 the trained ControlNet is its initialisation. conv_in, the time
    // embedding, the down blocks and the mid block are the UNet's; the zero convs and the condition
    // embedding's conv_out are zero; the rest of the condition embedding is freshly initialised.
    let text = config(&d.data, &format!("[base]\npretrained = {:?}\n", s(&sd))).replace("lr = 0.002", "lr = 0.0");
    let frozen_out = d.root.join("weights-lr0");
    let cfg = TrainingConfig::all(Path::new("lr0.toml"), &text, &frozen_out).unwrap();
    let stop = AtomicBool::new(false);
    sgdm::train::stages::train_vae(cfg.vae.as_ref().unwrap(), &frozen_out, None, &stop, &Device::Cpu).unwrap();
    sgdm::train::stages::train_encoder(cfg.encoder.as_ref().unwrap(), &frozen_out, None, &stop, &Device::Cpu).unwrap();
    let controlnet_cfg = cfg.controlnet.as_ref().unwrap();
    assert_eq!(controlnet_cfg.image_size, 64, "[controlnet] image_size comes from the pretrained VAE's sample_size");
    sgdm::train::stages::train_controlnet(controlnet_cfg, &frozen_out, None, &stop, &Device::Cpu).unwrap();
    let cn = Component::open(frozen_out.join("controlnet")).unwrap();
    let cn_model = ControlNet::new(UNetConfig::from_json(&frozen_out.join("controlnet/config.json"), &cn.config).unwrap()).unwrap();
    let unet = SafetensorsFile::open(sd.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let values = |file: &SafetensorsFile, name: &str| file.tensor(name, &Device::Cpu, DType::F32).unwrap().to_f32_vec().unwrap();
    let (mut copied, mut zero, mut fresh) = (0, 0, 0);
    for spec in cn_model.params.specs() {
        let got = values(&cn.weights, &spec.name);
        let name = spec.name.as_str();
        if name.starts_with("controlnet_down_blocks.")
            || name.starts_with("controlnet_mid_block.")
            || name.starts_with("controlnet_cond_embedding.conv_out.")
        {
            assert!(got.iter().all(|v| *v == 0.0), "{name} is not zero-initialised");
            zero += 1;
        } else if name.starts_with("controlnet_cond_embedding.") {
            fresh += got.iter().any(|v| *v != 0.0) as usize;
        } else {
            assert!(["conv_in.", "time_embedding.", "down_blocks.", "mid_block."].iter().any(|p| name.starts_with(p)), "unexpected {name}");
            assert_eq!(got, values(&unet, name), "{name} is not the UNet's");
            copied += 1;
        }
    }
    assert!(copied > 20 && zero >= 4 && fresh >= 2, "copied {copied}, zero {zero}, fresh {fresh}");

    // A pretrained base is the whole [base] table, and must be a diffusers folder.
    let bad = format!("[base]\npretrained = {:?}\nimage_size = 32\n", s(&sd));
    let e = TrainingConfig::all(Path::new("c.toml"), &config(&d.data, &bad), &frozen_out).unwrap_err().to_string();
    assert!(e.contains("c.toml: [base] pretrained") && e.contains("remove image_size"), "{e}");
    let e = TrainingConfig::all(Path::new("c.toml"), &config(&d.data, &format!("[base]\npretrained = {:?}\n", s(&d.root))), &frozen_out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unet/config.json is missing") || e.contains("vae/config.json is missing"), "{e}");
}

#[test]
fn the_example_configurations_read_their_sizes_from_an_imported_dataset() {
    let d = imported();
    let repo = common::repo_root();
    let text = std::fs::read_to_string(repo.join("configs/things-eeg2.toml")).unwrap().replace("data/things-eeg2-sub01", s(&d.data));
    let cfg = TrainingConfig::all(Path::new("configs/things-eeg2.toml"), &text, Path::new("runs/x")).unwrap();
    let encoder = cfg.encoder.unwrap();
    assert_eq!((encoder.model.n_channels, encoder.model.n_timepoints, encoder.vae.image_size), (17, 100, 32));
    let base = cfg.base.unwrap();
    assert_eq!((base.image_size, base.unet_model["sample_size"].as_u64()), (32, Some(8)));
    assert_eq!(cfg.controlnet.unwrap().image_size, 32);

    let sd = d.root.join("sd-like-example");
    sd_like_folder(&sd);
    let text = std::fs::read_to_string(repo.join("configs/things-eeg2-sd15.toml"))
        .unwrap()
        .replace("data/things-eeg2-sub01-512", s(&d.data))
        .replace("models/stable-diffusion-v1-5", s(&sd));
    let cfg = TrainingConfig::all(Path::new("configs/things-eeg2-sd15.toml"), &text, Path::new("runs/y")).unwrap();
    assert_eq!(cfg.pretrained_base.as_deref(), Some(sd.as_path()));
    let controlnet = cfg.controlnet.unwrap();
    assert_eq!((controlnet.image_size, controlnet.encoder.n_channels), (64, 17), "the VAE's sample_size; the dataset's channels");
    assert_eq!(controlnet.unet, sd.join("unet"));
}
