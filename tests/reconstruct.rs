//! `sgdm reconstruct` on a tiny model trained here by `sgdm train all`: every item written once with its
//! manifest line, images independent of batching, a killed run resumed, shards covering every item exactly
//! once, other settings and bad inputs refused.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{run_sgdm, tiny_model};

/// `sgdm reconstruct` on the tiny model's test split with `extra` flags; returns (success, stdout, stderr).
fn reconstruct(out: &Path, extra: &[&str]) -> (bool, String, String) {
    let (data, weights) = tiny_model();
    reconstruct_from(out, &data.join("eeg/test.npy"), weights, extra)
}

fn reconstruct_from(out: &Path, eeg: &Path, weights: &Path, extra: &[&str]) -> (bool, String, String) {
    let (data, _) = tiny_model();
    let mut args: Vec<String> = [
        "--device",
        "cpu",
        "reconstruct",
        "--eeg",
        eeg.to_str().unwrap(),
        "--images",
        data.join("images/test").to_str().unwrap(),
        "--weights",
        weights.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if !extra.contains(&"--steps") {
        args.extend(["--steps".to_string(), "4".to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    run_sgdm(args)
}

/// index -> how many manifest lines name it.
fn manifest_counts(out: &Path) -> BTreeMap<u64, usize> {
    let mut counts = BTreeMap::new();
    for line in std::fs::read_to_string(out.join("manifest.jsonl")).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("bad manifest line {line:?}: {e}"));
        *counts.entry(v["index"].as_u64().unwrap()).or_insert(0) += 1;
    }
    counts
}

/// The decoded pixels of every image in `out/images`, by file name.
fn pixels(out: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(out.join("images"))
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            (path.file_name().unwrap().to_str().unwrap().to_string(), sgdm::data::image::load_rgb(&path).unwrap().into_raw())
        })
        .collect()
}

#[test]
fn every_item_is_written_once_with_its_manifest_line_and_a_rerun_skips_them() {
    let out = tempfile::tempdir().unwrap();
    let (ok, stdout, stderr) = reconstruct(out.path(), &["--batch", "4"]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("6 image(s) written"), "{stdout}");
    assert_eq!(manifest_counts(out.path()), (0..6).map(|i| (i, 1)).collect());
    let first: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(out.path().join("manifest.jsonl")).unwrap().lines().next().unwrap()).unwrap();
    for key in ["index", "row", "seed", "steps", "seconds", "image", "structure", "seen"] {
        assert!(!first[key].is_null(), "manifest line lacks {key}: {first}");
    }
    let img = sgdm::data::image::load_rgb(out.path().join("images/00000.png")).unwrap();
    assert_eq!(img.dimensions(), (32, 32));
    assert!(out.path().join("structure/00005.png").is_file());

    let (ok, stdout, _) = reconstruct(out.path(), &["--batch", "4"]);
    assert!(ok && stdout.contains("0 image(s) written, 6 already finished"), "{stdout}");
    assert_eq!(manifest_counts(out.path()).values().sum::<usize>(), 6);
}

#[test]
fn images_do_not_depend_on_the_batch_size() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    assert!(reconstruct(a.path(), &["--batch", "6"]).0);
    assert!(reconstruct(b.path(), &["--batch", "1"]).0);
    let (pa, pb) = (pixels(a.path()), pixels(b.path()));
    assert_eq!(pa.len(), 6);
    for (name, x) in &pa {
        // Per-item noise and per-row arithmetic: at most a rounding step apart (CPU GEMM blocking may
        // differ with the batch's row count).
        let worst = x.iter().zip(&pb[name]).map(|(p, q)| p.abs_diff(*q)).max().unwrap();
        assert!(worst <= 1, "{name}: pixels differ by up to {worst} between batch 6 and batch 1");
    }
}

#[test]
fn shards_cover_every_item_exactly_once_with_the_unsharded_images() {
    let (whole, sharded) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    assert!(reconstruct(whole.path(), &["--batch", "2"]).0);
    for k in 0..4 {
        let shard = format!("{k}/4");
        let (ok, stdout, stderr) = reconstruct(sharded.path(), &["--batch", "2", "--shard", &shard]);
        assert!(ok, "shard {shard}: {stdout}\n{stderr}");
        let expected = if k < 2 { 2 } else { 1 };
        assert!(stdout.contains(&format!("{expected} image(s) written")), "shard {shard} of 6 items: {stdout}");
    }
    assert_eq!(manifest_counts(sharded.path()), (0..6).map(|i| (i, 1)).collect());
    let (pw, ps) = (pixels(whole.path()), pixels(sharded.path()));
    for (name, x) in &pw {
        let worst = x.iter().zip(&ps[name]).map(|(p, q)| p.abs_diff(*q)).max().unwrap();
        assert!(worst <= 1, "{name}: sharded image differs by up to {worst}");
    }
}

#[test]
fn a_killed_run_resumes_and_finishes_every_item_once() {
    let (data, weights) = tiny_model();
    let (straight, killed) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    assert!(reconstruct(straight.path(), &["--batch", "1", "--steps", "40"]).0);
    let mut child = std::process::Command::new(common::sgdm_bin())
        .args(["--device", "cpu", "reconstruct", "--eeg"])
        .arg(data.join("eeg/test.npy"))
        .arg("--images")
        .arg(data.join("images/test"))
        .arg("--weights")
        .arg(weights)
        .arg("--out")
        .arg(killed.path())
        .args(["--steps", "40", "--batch", "1"])
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once at least one item is finished (or when it is done, if it is faster than the polling).
    let manifest = killed.path().join("manifest.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while std::fs::read_to_string(&manifest).map_or(0, |t| t.lines().count()) < 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before = manifest_counts(killed.path()).len();
    println!("killed after {before} of 6 items");
    let (ok, stdout, stderr) = reconstruct(killed.path(), &["--batch", "1", "--steps", "40"]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains(&format!("{} image(s) written, {before} already finished", 6 - before)), "{stdout}");
    assert_eq!(manifest_counts(killed.path()), (0..6).map(|i| (i, 1)).collect());
    assert_eq!(pixels(straight.path()), pixels(killed.path()), "the resumed run's images differ from an uninterrupted run's");
}

#[test]
fn a_rerun_with_other_settings_is_refused() {
    let out = tempfile::tempdir().unwrap();
    assert!(reconstruct(out.path(), &["--limit", "2"]).0);
    let (ok, _, stderr) = reconstruct(out.path(), &["--limit", "2", "--guidance", "5"]);
    assert!(!ok && stderr.contains("run.json") && stderr.contains("other settings"), "{stderr}");
}

#[test]
fn bad_inputs_are_refused_with_the_file_and_the_problem() {
    let (data, weights) = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    let eeg = sgdm::data::npy::NpyFile::open(data.join("eeg/test.npy")).unwrap();
    let mut values = eeg.to_f32().unwrap();
    let shape = eeg.header.shape.clone();
    let per_item = values.len() / shape[0];
    values[3 * per_item + 17] = f32::NAN;
    let nan = dir.path().join("nan.npy");
    sgdm::data::npy::write_f32(&nan, &shape, &values).unwrap();
    let out = dir.path().join("out");
    let (ok, _, stderr) = reconstruct_from(&out, &nan, weights, &["--batch", "1"]);
    assert!(!ok && stderr.contains("nan.npy") && stderr.to_lowercase().contains("nan"), "{stderr}");
    assert!(!out.join("images/00003.png").exists(), "the item with NaN EEG has an image");

    let narrow = dir.path().join("narrow.npy");
    sgdm::data::npy::write_f32(&narrow, &[2, 1, 16, 100], &vec![0.0; 2 * 16 * 100]).unwrap();
    let (ok, _, stderr) = reconstruct_from(&dir.path().join("o2"), &narrow, weights, &[]);
    assert!(!ok && stderr.contains("narrow.npy") && stderr.contains("16 channels"), "{stderr}");

    let (ok, _, stderr) = reconstruct_from(&dir.path().join("o3"), &data.join("eeg/test.npy"), &dir.path().join("absent"), &[]);
    assert!(!ok && stderr.contains("absent") && stderr.contains("weights folder"), "{stderr}");

    let (ok, _, stderr) = reconstruct(&dir.path().join("o4"), &["--shard", "4/4"]);
    assert!(!ok && stderr.contains("K/N"), "{stderr}");

    // Structure maps to condition on: of the model's 16x16, one per item, finite; refused before any write.
    let maps = |name: &str, shape: &[usize], values: Vec<f32>| {
        let path = dir.path().join(name);
        sgdm::data::npy::write_f32(&path, shape, &values).unwrap();
        path
    };
    let small = maps("small.npy", &[6, 8, 8], vec![0.5; 6 * 64]);
    let few = maps("few.npy", &[2, 16, 16], vec![0.5; 2 * 256]);
    let mut holed = vec![0.5; 6 * 256];
    holed[4 * 256 + 3] = f32::INFINITY;
    let holed = maps("holed.npy", &[6, 256], holed);
    for (file, says) in [(&small, "[rows, 16, 16]"), (&few, "2 structure maps for 6 EEG items"), (&holed, "structure map 4")] {
        let out = dir.path().join("o5");
        let (ok, _, stderr) = reconstruct(&out, &["--structure-maps", file.to_str().unwrap()]);
        assert!(!ok && stderr.contains(file.file_name().unwrap().to_str().unwrap()) && stderr.contains(says), "{stderr}");
        assert!(!out.exists(), "a refused run wrote {}", out.display());
    }
}
