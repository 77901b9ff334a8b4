//! `sgdm demo` end to end on the tiny model trained here (the shipped weights are exercised by the README's
//! command; this checks the command's plumbing): dataset, reconstructions, metrics and sheet are written
//! where it says, a rerun reuses the dataset and the finished reconstructions, and a rerun with other
//! sampling settings starts the reconstructions over.

mod common;

use common::{run_sgdm, tiny_model};

#[test]
fn demo_writes_the_sheet_and_metrics_and_a_rerun_reuses_its_work() {
    let (_, weights) = tiny_model();
    let out = tempfile::tempdir().unwrap();
    let args =
        ["--device", "cpu", "demo", "--out", out.path().to_str().unwrap(), "--weights", weights.to_str().unwrap(), "--items", "5", "--steps", "2"];
    let (ok, stdout, stderr) = run_sgdm(args);
    assert!(ok, "{stdout}\n{stderr}");
    for f in ["sheet.png", "metrics.json", "recon/manifest.jsonl", "data/manifest.json", "recon/images/00004.png"] {
        assert!(out.path().join(f).is_file(), "demo did not write {f}:\n{stdout}");
    }
    assert!(!out.path().join("recon/images/00005.png").exists(), "--items 5 reconstructed a sixth item");
    let metrics: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.path().join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["items"], 5);
    assert!(metrics["control"]["reconstruction"]["ssim"]["mean"].is_number());
    assert!(stdout.contains(&out.path().join("sheet.png").display().to_string()), "{stdout}");

    let (ok, stdout, stderr) = run_sgdm(args);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("dataset: reusing") && stdout.contains("0 image(s) written, 5 already finished"), "{stdout}");

    // Other sampling settings (what `--help` suggests after a quick look): the reconstructions start over
    // rather than being refused, and the dataset is kept.
    let mut other = args.to_vec();
    let last = other.len() - 1;
    other[last] = "3";
    let (ok, stdout, stderr) = run_sgdm(other);
    assert!(ok, "demo with other --steps was refused:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("dataset: reusing") && stdout.contains("starting the reconstructions over") && stdout.contains("5 image(s) written"),
        "{stdout}"
    );
    let run: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.path().join("recon/run.json")).unwrap()).unwrap();
    assert_eq!(run["steps"], 3);
}
