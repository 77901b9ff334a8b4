//! Every model `sgdm forward` runs, on the fixtures PyTorch made (tests/fixtures/models/make_fixtures.py),
//! through the same code path as the command: outputs within a relative L2 error of 1e-4 and gradients
//! within 1e-3 of the float64 reference on CPU f32 (the bounds: f32 rounding over a few hundred
//! operations per value sits far below them, a wrong weight mapping or formula far above).

mod common;


use sgdm::conformance::{run, CLASSES};
use sgdm::weights::{Component, SafetensorsFile};
use sgdm::{DType, Device};

const OUTPUT_BOUND: f64 = 1e-4;
const GRAD_BOUND: f64 = 1e-3;
/// A reference gradient below this norm is float64 round-off of an exact zero; ours must then stay below
/// `ZERO_GRAD_BOUND` (f32 round-off of the same sums).
const ZERO_GRAD_NORM: f64 = 1e-10;
const ZERO_GRAD_BOUND: f64 = 1e-4;

fn fixture(case: &str) -> std::path::PathBuf {
    common::repo_root().join("tests/fixtures/models").join(case)
}

fn l2(v: &[f32]) -> f64 {
    v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt()
}

fn relative_l2(got: &[f32], want: &[f32]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(g, w)| (*g as f64 - *w as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|w| (*w as f64).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

/// bf16 storage keeps 8 significant bits (2^-8 = 3.9e-3 relative per stored value) and every layer rounds
/// its output again, so errors grow with depth: a few percent for outputs, more for gradients, which pass
/// through every layer twice. Mapping or formula errors still show as errors of order 1.
const BF16_OUTPUT_BOUND: f64 = 5e-2;
const BF16_GRAD_BOUND: f64 = 1.5e-1;
/// bf16 round-off of a gradient that is zero in exact arithmetic (see ZERO_GRAD_NORM).
const BF16_ZERO_GRAD_BOUND: f64 = 1e-2;

/// Runs a fixture forward and backward and checks every expected tensor, and nothing else, came out.
fn check_case(case: &str) {
    check_case_on(case, &Device::Cpu, DType::F32, (OUTPUT_BOUND, GRAD_BOUND, ZERO_GRAD_BOUND));
}

fn check_case_on(case: &str, device: &Device, dtype: DType, (output_bound, grad_bound, zero_bound): (f64, f64, f64)) {
    let dir = fixture(case);
    let outputs = run(&dir, &dir.join("inputs.safetensors"), Some(&dir.join("grad_outputs.safetensors")), device, dtype, None)
        .unwrap_or_else(|e| panic!("{case}: {e:#}"))
        .outputs;
    let expected = SafetensorsFile::open(dir.join("expected.safetensors")).unwrap();
    let mut produced: Vec<&str> = outputs.iter().map(|(n, _)| n.as_str()).collect();
    produced.sort();
    assert_eq!(produced, expected.names().collect::<Vec<_>>(), "{case}: output names");
    let mut worst = (0f64, 0f64);
    for (name, t) in &outputs {
        let want = expected.tensor(name, &Device::Cpu, DType::F32).unwrap();
        assert_eq!(t.shape(), want.shape(), "{case}: {name}");
        let (got, want) = (t.to_f32_vec().unwrap(), want.to_f32_vec().unwrap());
        if name.starts_with("grad.") && l2(&want) < ZERO_GRAD_NORM {
            // Zero in exact arithmetic (the attention's key bias: softmax ignores a shift shared by a row's
            // scores); the reference holds float64 round-off, so only an absolute bound means anything.
            assert!(l2(&got) <= zero_bound, "{case}: {name}: norm {:.3e} where the gradient is zero", l2(&got));
            continue;
        }
        let err = relative_l2(&got, &want);
        let (bound, slot) = if name.starts_with("grad.") { (grad_bound, &mut worst.1) } else { (output_bound, &mut worst.0) };
        assert!(err <= bound, "{case}: {name}: relative L2 error {err:.3e} > {bound:e}");
        *slot = slot.max(err);
    }
    println!("{case:<28} {device} {dtype}: worst relative L2: outputs {:.2e}, gradients {:.2e}", worst.0, worst.1);
}

#[test]
fn every_runnable_model_matches_pytorch_on_cpu_f32() {
    let mut ran = 0;
    for case in std::fs::read_dir(fixture("")).unwrap() {
        let case = case.unwrap().file_name().to_string_lossy().into_owned();
        let Ok(component) = Component::open(fixture(&case)) else { continue };
        let class = component.class_name().unwrap().to_string();
        if CLASSES.contains(&class.as_str()) {
            check_case(&case);
            ran += 1;
        } else {
            common::skipped(&format!("conformance of {case}"), format!("sgdm forward does not run {class} yet"));
        }
    }
    assert_eq!(ran, CLASSES.len(), "one fixture per runnable class");
}

#[test]
fn every_runnable_model_matches_pytorch_on_cuda_bf16() {
    let Some(gpu) = common::gpu_or_skip("model conformance on CUDA bf16") else { return };
    for case in std::fs::read_dir(fixture("")).unwrap() {
        let case = case.unwrap().file_name().to_string_lossy().into_owned();
        let Ok(component) = Component::open(fixture(&case)) else { continue };
        if CLASSES.contains(&component.class_name().unwrap()) {
            check_case_on(&case, &gpu, DType::BF16, (BF16_OUTPUT_BOUND, BF16_GRAD_BOUND, BF16_ZERO_GRAD_BOUND));
        }
    }
}

#[test]
fn the_command_writes_its_results_and_refuses_bad_inputs() {
    let dir = fixture("contrastive_alignment");
    let out = tempfile::tempdir().unwrap();
    let bin = common::sgdm_bin();
    let run = |args: &[&str]| std::process::Command::new(&bin).args(args).output().unwrap();
    let d = dir.display().to_string();
    let o = out.path().join("o.safetensors").display().to_string();
    let ok = run(&["--device", "cpu", "forward", &d, "--inputs", &format!("{d}/inputs.safetensors"), "--output", &o]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert_eq!(SafetensorsFile::open(&o).unwrap().names().collect::<Vec<_>>(), ["loss"]);
    // The weights file where inputs belong: unknown input names are refused by name.
    let bad = run(&["--device", "cpu", "forward", &d, "--inputs", &format!("{d}/grad_outputs.safetensors"), "--output", &o]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown tensor name(s) loss"), "{}", String::from_utf8_lossy(&bad.stderr));
    let missing = run(&["--device", "cpu", "forward", &d, "--inputs", "/nonexistent.safetensors", "--output", &o]);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent.safetensors"));

    // Random weights from config.json alone: the UNet runs in a directory holding nothing else, and reports
    // its parameter and peak memory.
    let unet = fixture("unet_tiny");
    let config_only = out.path().join("unet");
    std::fs::create_dir(&config_only).unwrap();
    std::fs::copy(unet.join("config.json"), config_only.join("config.json")).unwrap();
    let (c, i) = (config_only.display().to_string(), format!("{}/inputs.safetensors", unet.display()));
    let random = run(&["--device", "cpu", "forward", &c, "--inputs", &i, "--output", &o, "--random-weights", "5"]);
    let stdout = String::from_utf8_lossy(&random.stdout);
    assert!(random.status.success(), "{}", String::from_utf8_lossy(&random.stderr));
    assert!(stdout.contains("memory on cpu: parameters 783.8 KiB, peak of all tensors"), "{stdout}");
    assert_eq!(SafetensorsFile::open(&o).unwrap().names().collect::<Vec<_>>(), ["sample"]);
    let without = run(&["--device", "cpu", "forward", &c, "--inputs", &i, "--output", &o]);
    assert!(String::from_utf8_lossy(&without.stderr).contains("no weights"), "{}", String::from_utf8_lossy(&without.stderr));
}
