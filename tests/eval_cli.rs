//! `sgdm eval` on known inputs: reconstructions that are the seen images score PixCorr, SSIM and 2-way
//! identification of exactly 1 while the shuffled control does not; the contact sheet has the documented
//! layout; mismatched folders and too few items are refused. The structure metrics, the linear floor and
//! the ablation write the keys scripts read; the ablation's true-structure path is conditioned on exactly
//! the dataset's targets and its no-structure path ignores the structure map; the floor never fits or
//! selects on the split it scores.

mod common;

use std::path::Path;

use common::{run_sgdm, tiny_model};

/// A reconstruction folder of the tiny model's first `n` test items (1 denoising step: only the folder's
/// layout matters here).
fn recon_folder(out: &Path, n: usize) {
    let (data, weights) = tiny_model();
    let (ok, stdout, stderr) = run_sgdm([
        "--device",
        "cpu",
        "reconstruct",
        "--eeg",
        data.join("eeg/test.npy").to_str().unwrap(),
        "--images",
        data.join("images/test").to_str().unwrap(),
        "--weights",
        weights.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "1",
        "--limit",
        &n.to_string(),
    ]);
    assert!(ok, "{stdout}\n{stderr}");
}

fn metric(m: &serde_json::Value, path: &[&str]) -> f64 {
    path.iter().fold(m, |v, k| &v[*k]).as_f64().unwrap_or_else(|| panic!("metrics.json has no {path:?}: {m}"))
}

#[test]
fn reconstructions_equal_to_the_seen_images_score_one_and_the_control_does_not() {
    let (data, _) = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    let recon = dir.path().join("recon");
    recon_folder(&recon, 6);
    // Replace each reconstruction with its seen image at the reconstruction's size.
    for i in 0..6 {
        let name = format!("{i:05}.png");
        let size = sgdm::data::image::load_rgb(recon.join("images").join(&name)).unwrap().width();
        let seen = sgdm::data::image::load_square(data.join("images/test").join(&name), size).unwrap();
        sgdm::data::image::save_png_rgb(recon.join("images").join(&name), &seen).unwrap();
    }
    let out = dir.path().join("eval");
    let (ok, stdout, stderr) =
        run_sgdm(["--device", "cpu", "eval", "--recon", recon.to_str().unwrap(), "--out", out.to_str().unwrap(), "--sheet-columns", "2"]);
    assert!(ok, "{stdout}\n{stderr}");
    println!("{stdout}");
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m["items"], 6);
    for key in ["pixcorr", "ssim", "two_way"] {
        let v = metric(&m, &["reconstruction", key, "mean"]);
        assert!((v - 1.0).abs() < 1e-9, "{key} of identical images is {v}");
        let c = metric(&m, &["control", "reconstruction", key, "mean"]);
        assert!(c < 0.95, "{key} of the shuffled control is {c}: the control does not shuffle");
    }
    assert!((metric(&m, &["retrieval", "chance_top1"]) - 1.0 / 6.0).abs() < 1e-12);
    for key in ["top1", "top5"] {
        let v = metric(&m, &["retrieval", key]);
        assert!((0.0..=1.0).contains(&v));
    }
    // Six items of four 32-pixel images (seen, true structure, structure from EEG, reconstruction), two a
    // row: 3 rows.
    let sheet = sgdm::data::image::load_rgb(out.join("sheet.png")).unwrap();
    assert_eq!(sheet.dimensions(), (10 + 2 * (4 * 32 + 3 * 2 + 10), 10 + 3 * (32 + 10)));
    assert!(stdout.contains("retrieval top-1 (6-way)") && stdout.contains("control"), "{stdout}");
}

#[test]
fn recon_metrics_pair_each_reconstruction_with_the_given_image() {
    use image::RgbImage;
    let a = RgbImage::from_fn(16, 16, |x, y| image::Rgb([(x * 16) as u8, (y * 16) as u8, 7]));
    let b = RgbImage::from_fn(16, 16, |x, y| image::Rgb([(y * 16) as u8, 255 - (x * 16) as u8, 90]));
    let (recon, seen) = (vec![a.clone(), b.clone()], vec![a, b]);
    let latents = [1.0, 0.0, 2.0, 0.0, 1.0, 0.5];
    let same = sgdm::metrics::recon_metrics(&recon, &seen, &latents, &latents, 3, &[0, 1]).unwrap();
    assert_eq!((same.pixcorr, same.two_way), (1.0, 1.0));
    assert!((same.ssim - 1.0).abs() < 1e-12);
    let swapped = sgdm::metrics::recon_metrics(&recon, &seen, &latents, &latents, 3, &[1, 0]).unwrap();
    assert!(swapped.pixcorr < 0.5 && swapped.ssim < 0.5 && swapped.two_way == 0.0, "{swapped:?}");
}

#[test]
fn eval_refuses_other_eeg_and_too_few_items() {
    let dir = tempfile::tempdir().unwrap();
    let recon = dir.path().join("recon");
    recon_folder(&recon, 1);
    let (ok, _, stderr) =
        run_sgdm(["--device", "cpu", "eval", "--recon", recon.to_str().unwrap(), "--out", dir.path().join("e").to_str().unwrap(), "--items", "1"]);
    assert!(!ok && stderr.contains("at least 2"), "{stderr}");

    let other = dir.path().join("other.npy");
    sgdm::data::npy::write_f32(&other, &[2, 1, 17, 100], &vec![0.0; 2 * 1700]).unwrap();
    let (ok, _, stderr) = run_sgdm([
        "--device",
        "cpu",
        "eval",
        "--recon",
        recon.to_str().unwrap(),
        "--eeg",
        other.to_str().unwrap(),
        "--out",
        dir.path().join("e").to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("run.json") && stderr.contains("other.npy"), "{stderr}");
}

/// `path` (`a.b.c`) in nested JSON.
fn at<'a>(m: &'a serde_json::Value, path: &str) -> &'a serde_json::Value {
    path.split('.').fold(m, |v, k| &v[k])
}

#[test]
fn eval_with_the_ablation_writes_the_keys_scripts_read_and_feeds_the_true_structure_path_the_exact_targets() {
    let (data, _) = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    let recon = dir.path().join("recon");
    recon_folder(&recon, 6);
    let out = dir.path().join("eval");
    let args = [
        "--device",
        "cpu",
        "eval",
        "--recon",
        recon.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--ablation",
        "--ablation-items",
        "4",
        "--ablation-seeds",
        "0,1",
        "--sheet-columns",
        "2",
    ];
    let (ok, stdout, stderr) = run_sgdm(args);
    assert!(ok, "{stdout}\n{stderr}");
    println!("{stdout}");
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    // The keys scripts read, each a number.
    for key in [
        "structure.eeg.corr",
        "structure.eeg.top1",
        "structure.eeg.top5",
        "structure.control.corr",
        "structure.control.top1",
        "ridge.structure.corr",
        "ridge.structure.top1",
        "ridge.retrieval.top1",
        "ablation.eeg_structure.pixcorr",
        "ablation.no_structure.pixcorr",
        "ablation.true_structure.pixcorr",
        "ablation.eeg_structure.ssim",
        "ablation.no_structure.ssim",
        "ablation.true_structure.ssim",
    ] {
        let v = at(&m, key).as_f64().unwrap_or_else(|| panic!("metrics.json has no number at {key}: {m}"));
        assert!(v.is_finite() && (-1.0..=1.0).contains(&v), "{key} = {v}");
    }
    assert_eq!(at(&m, "ablation.items"), 4);
    assert_eq!(at(&m, "ablation.eeg_structure.pixcorr_per_seed").as_array().unwrap().len(), 2);
    assert!(at(&m, "ablation.no_structure.pixcorr_std").as_f64().unwrap() >= 0.0);
    assert!(at(&m, "structure.targets").as_str().unwrap().ends_with("edges16/test.npy"));
    assert!(stdout.contains("structure matching top-1") && stdout.contains("no structure") && stdout.contains("ridge"), "{stdout}");

    let folders = at(&m, "ablation.folders").as_array().unwrap();
    let folder = |condition: &str, seed: u64| -> std::path::PathBuf {
        let f = folders
            .iter()
            .find(|f| f["condition"] == condition && f["seed"] == seed)
            .unwrap_or_else(|| panic!("no {condition} seed {seed}: {folders:?}"));
        f["dir"].as_str().unwrap().into()
    };
    // The evaluated folder has the ablation's settings at seed 0: reused, not reconstructed again.
    assert_eq!(folder("eeg_structure", 0), recon);
    assert_eq!(folder("eeg_structure", 1), out.join("ablation/eeg_structure/seed-1"));
    let run = |dir: &std::path::Path| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(dir.join("run.json")).unwrap()).unwrap() };
    for seed in [0, 1] {
        assert_eq!(run(&folder("no_structure", seed))["controlnet_scale"], 0.0);
        let true_dir = folder("true_structure", seed);
        let settings = run(&true_dir);
        let targets_file = std::fs::canonicalize(data.join("edges16/test.npy")).unwrap();
        assert_eq!(settings["structure_maps"], targets_file.display().to_string());
        assert_eq!(settings["controlnet_scale"], 1.0);
        // What conditioned each item (the structure PNG is the map the ControlNet got, upsampled to 32 px) is
        // the item's target, to the PNG's 8 bits.
        let targets = sgdm::data::npy::NpyFile::open(&targets_file).unwrap().to_f32().unwrap();
        for i in 0..4 {
            let png = sgdm::data::image::load_rgb(true_dir.join(format!("structure/{i:05}.png"))).unwrap();
            for (x, y, p) in png.enumerate_pixels() {
                let want = (targets[i * 256 + (y as usize / 2) * 16 + x as usize / 2].clamp(0.0, 1.0) * 255.0).round() as u8;
                assert_eq!(p[0], want, "item {i} pixel ({x}, {y})");
            }
        }
    }
    // Five images an item with the ablation: the last is the reconstruction without structure.
    let sheet = sgdm::data::image::load_rgb(out.join("sheet.png")).unwrap();
    assert_eq!(sheet.dimensions(), (10 + 2 * (5 * 32 + 4 * 2 + 10), 10 + 3 * (32 + 10)));

    // A rerun finds every ablation folder finished.
    let (ok, stdout, stderr) = run_sgdm(args);
    assert!(ok, "{stdout}\n{stderr}");
    let again: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(at(&again, "ablation.true_structure.pixcorr"), at(&m, "ablation.true_structure.pixcorr"));
}

#[test]
fn the_oracle_path_is_conditioned_on_exactly_the_given_maps_and_the_controlnet_off_ignores_them() {
    use sgdm::pipeline::{Pipeline, SamplingOptions, Steps};
    let (data, weights) = tiny_model();
    let pipeline = Pipeline::open(weights, &sgdm::Device::Cpu, sgdm::DType::F32).unwrap();
    let eeg = sgdm::reconstruct::EegItems::open(&data.join("eeg/test.npy")).unwrap().read(&[0, 1]).unwrap();
    let split = sgdm::data::dataset::DatasetSplit::of(&data.join("eeg/test.npy")).unwrap();
    let targets = split.structure_targets().unwrap()[..2 * 256].to_vec();
    let opts = SamplingOptions { steps: 2, ..SamplingOptions::default() };
    let run =
        |opts: &SamplingOptions, maps: Option<&[f32]>| pipeline.reconstruct_conditioned(&mut Steps::default(), &eeg, &[0, 1], opts, maps).unwrap();
    let from_eeg = run(&opts, None);
    // Given the maps the EEG predicts, the conditioned path is the ordinary one, bit for bit.
    assert_eq!(run(&opts, Some(&from_eeg.structure)).images, from_eeg.images);
    let oracle = run(&opts, Some(&targets));
    assert_eq!(oracle.structure, targets, "the oracle is conditioned on exactly the targets");
    assert_ne!(oracle.images, from_eeg.images, "the structure map changes the images");
    // ControlNet off: the structure map makes no difference at all.
    let off = SamplingOptions { controlnet_scale: 0.0, ..opts };
    assert_eq!(run(&off, Some(&targets)).images, run(&off, None).images);
}

#[test]
fn the_linear_floor_never_fits_or_selects_on_the_split_it_scores() {
    use sgdm::data::dataset::DatasetSplit;
    let (data, weights) = tiny_model();
    let pipeline = sgdm::pipeline::Pipeline::open(weights, &sgdm::Device::Cpu, sgdm::DType::F32).unwrap();
    for split in ["train", "val"] {
        let evaluated = DatasetSplit::of(&data.join(format!("eeg/{split}.npy"))).unwrap();
        let err =
            sgdm::evaluate::floor::fit_linear_floor(&pipeline, &evaluated).err().unwrap_or_else(|| panic!("the floor scored the {split} split"));
        assert!(format!("{err:#}").contains(&format!("the '{split}' split")), "{err:#}");
    }
    let floor = sgdm::evaluate::floor::fit_linear_floor(&pipeline, &DatasetSplit::of(&data.join("eeg/test.npy")).unwrap()).unwrap();
    assert_eq!((floor.train_figures, floor.val_figures), (24, 8));
    assert_eq!(floor.structure.scores.len(), sgdm::ridge::default_penalty_grid().len());
    let test = sgdm::reconstruct::EegItems::open(&data.join("eeg/test.npy")).unwrap().read(&[0, 1, 2]).unwrap();
    assert!(floor.structure.model.predict(&test).unwrap().iter().all(|v| v.is_finite()));
    assert_eq!(floor.mu.model.outputs(), 8, "the tiny StructuralVAE's latent");
}
