//! `sgdm eval` on known inputs: reconstructions that are the seen images score PixCorr, SSIM and 2-way
//! identification of exactly 1 while the shuffled control does not; the contact sheet has the documented
//! layout; mismatched folders and too few items are refused.

mod common;

use std::path::Path;

use common::{run_sgdm, tiny_model};

/// A reconstruction folder of the tiny model's first `n` test items (1 denoising step: only the folder's
/// layout matters here).
fn recon_folder(out: &Path, n: usize) {
    let (data, weights) = tiny_model();
    let (ok, stdout, stderr) = run_sgdm([
        "--device", "cpu", "reconstruct", "--eeg", data.join("eeg/test.npy").to_str().unwrap(), "--images", data.join("images/test").to_str().unwrap(),
        "--weights", weights.to_str().unwrap(), "--out", out.to_str().unwrap(), "--steps", "1", "--limit", &n.to_string(),
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
    let (ok, stdout, stderr) = run_sgdm(["--device", "cpu", "eval", "--recon", recon.to_str().unwrap(), "--out", out.to_str().unwrap(), "--sheet-columns", "2"]);
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
    // Six triplets of 32-pixel images, two a row: 3 rows.
    let sheet = sgdm::data::image::load_rgb(out.join("sheet.png")).unwrap();
    assert_eq!(sheet.dimensions(), (10 + 2 * (3 * 32 + 4 + 10), 10 + 3 * (32 + 10)));
    assert!(stdout.contains("retrieval top-1 (6-way)") && stdout.contains("control"), "{stdout}");
}

#[test]
fn recon_metrics_pair_each_reconstruction_with_the_given_image() {
    use image::RgbImage;
    let a = RgbImage::from_fn(16, 16, |x, y| image::Rgb([(x * 16) as u8, (y * 16) as u8, 7]));
    let b = RgbImage::from_fn(16, 16, |x, y| image::Rgb([(y * 16) as u8, 255 - (x * 16) as u8, 90]));
    let (recon, seen) = (vec![a.clone(), b.clone()], vec![a, b]);
    let latents = [1.0, 0.0, 2.0, 0.0, 1.0, 0.5];
    let same = sgdm::evaluate::recon_metrics(&recon, &seen, &latents, &latents, 3, &[0, 1]).unwrap();
    assert_eq!((same.pixcorr, same.two_way), (1.0, 1.0));
    assert!((same.ssim - 1.0).abs() < 1e-12);
    let swapped = sgdm::evaluate::recon_metrics(&recon, &seen, &latents, &latents, 3, &[1, 0]).unwrap();
    assert!(swapped.pixcorr < 0.5 && swapped.ssim < 0.5 && swapped.two_way == 0.0, "{swapped:?}");
}

#[test]
fn eval_refuses_other_eeg_and_too_few_items() {
    let dir = tempfile::tempdir().unwrap();
    let recon = dir.path().join("recon");
    recon_folder(&recon, 1);
    let (ok, _, stderr) = run_sgdm(["--device", "cpu", "eval", "--recon", recon.to_str().unwrap(), "--out", dir.path().join("e").to_str().unwrap(), "--items", "1"]);
    assert!(!ok && stderr.contains("at least 2"), "{stderr}");

    let other = dir.path().join("other.npy");
    sgdm::data::npy::write_f32(&other, &[2, 1, 17, 100], &vec![0.0; 2 * 1700]).unwrap();
    let (ok, _, stderr) = run_sgdm([
        "--device", "cpu", "eval", "--recon", recon.to_str().unwrap(), "--eeg", other.to_str().unwrap(), "--out", dir.path().join("e").to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("run.json") && stderr.contains("other.npy"), "{stderr}");
}
