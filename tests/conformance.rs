//! Every model `sgdm forward` runs, on the fixtures PyTorch made (tests/fixtures/models/make_fixtures.py),
//! through the same code path as the command: outputs within a relative L2 error of 1e-4 and gradients
//! within 1e-3 of the float64 reference on CPU f32 (the conformance bounds: f32 rounding over a few hundred
//! operations per value sits far below them, a wrong weight mapping or formula far above).

mod common;

use sgdm::conformance::{compare_outputs, run, Bounds, CLASSES};
use sgdm::weights::{Component, SafetensorsFile};
use sgdm::{DType, Device};

fn fixture(case: &str) -> std::path::PathBuf {
    common::repo_root().join("tests/fixtures/models").join(case)
}

/// Runs a fixture forward and backward and checks every expected tensor, and nothing else, came out, within
/// `Bounds::F32` (the conformance bounds; their reasons are on `Bounds`).
fn check_case(case: &str) {
    check_case_on(case, &Device::Cpu, DType::F32, Bounds::F32);
}

fn check_case_on(case: &str, device: &Device, dtype: DType, bounds: Bounds) {
    let dir = fixture(case);
    let outputs = run(&dir, &dir.join("inputs.safetensors"), Some(&dir.join("grad_outputs.safetensors")), device, dtype, None)
        .unwrap_or_else(|e| panic!("{case}: {e:#}"))
        .outputs;
    let reference = dir.join("expected.safetensors");
    // Zero gradients in bf16 are bounded by the CPU f32 run's residuals (conformance::ZeroGradient).
    let f32_run = bounds.needs_f32_run(&reference).unwrap().then(|| {
        run(&dir, &dir.join("inputs.safetensors"), Some(&dir.join("grad_outputs.safetensors")), &Device::Cpu, DType::F32, None)
            .unwrap_or_else(|e| panic!("{case} on the CPU: {e:#}"))
            .outputs
    });
    let rows = compare_outputs(&outputs, &reference, bounds, f32_run.as_ref()).unwrap_or_else(|e| panic!("{case}: {e:#}"));
    let mut worst = (0f64, 0f64);
    for r in &rows {
        let what = if r.zero_reference { "norm where the gradient is zero" } else { "relative L2 error" };
        assert!(r.pass, "{case}: {}: {what} {:.3e} > {:e}", r.name, r.error, r.bound);
        if !r.zero_reference {
            let slot = if r.name.starts_with("grad.") { &mut worst.1 } else { &mut worst.0 };
            *slot = slot.max(r.error);
        }
    }
    println!("{case:<28} {device} {dtype}: worst relative L2: outputs {:.2e}, gradients {:.2e}", worst.0, worst.1);
}

#[test]
fn every_runnable_model_matches_pytorch_on_cpu_f32() {
    for case in std::fs::read_dir(fixture("")).unwrap() {
        let case = case.unwrap().file_name().to_string_lossy().into_owned();
        let Ok(component) = Component::open(fixture(&case)) else { continue };
        let class = component.class_name().unwrap().to_string();
        if !CLASSES.contains(&class.as_str()) {
            common::skipped(&format!("conformance of {case}"), format!("sgdm forward does not run {class} yet"));
        }
    }
    for case in every_runnable_case() {
        check_case(&case);
    }
}

fn every_runnable_case() -> Vec<String> {
    let mut cases = Vec::new();
    for case in std::fs::read_dir(fixture("")).unwrap() {
        let case = case.unwrap().file_name().to_string_lossy().into_owned();
        let Ok(component) = Component::open(fixture(&case)) else { continue };
        if CLASSES.contains(&component.class_name().unwrap()) {
            cases.push(case);
        }
    }
    cases.sort();
    assert_eq!(cases.len(), CLASSES.len(), "one fixture per runnable class");
    cases
}

#[test]
fn every_runnable_model_matches_pytorch_on_cuda_bf16() {
    let Some(gpu) = common::gpu_or_skip("model conformance on CUDA bf16") else { return };
    for case in every_runnable_case() {
        check_case_on(&case, &gpu, DType::BF16, Bounds::BF16);
    }
}

/// CUDA in f32 is held to the CPU's f32 bounds: the kernels accumulate in f32 like the CPU backend (cuBLASLt
/// with f32 compute, never TF32).
#[test]
fn every_runnable_model_matches_pytorch_on_cuda_f32() {
    let Some(gpu) = common::gpu_or_skip("model conformance on CUDA f32") else { return };
    for case in every_runnable_case() {
        check_case_on(&case, &gpu, DType::F32, Bounds::F32);
    }
}

/// What the command itself must do: `sgdm --device cuda-sim forward MODEL --dtype D --compare
/// expected.safetensors` passes for every fixture, in bf16 and in f32, each in a process of its own.
#[test]
fn the_command_passes_every_fixture_on_the_simulated_device() {
    if !common::simulator_or_skip("sgdm --device cuda-sim forward --compare") {
        return;
    }
    let out = tempfile::tempdir().unwrap();
    for case in every_runnable_case() {
        let d = fixture(&case).display().to_string();
        for dtype in ["bf16", "f32"] {
            let o = out.path().join(format!("{case}-{dtype}.safetensors"));
            let run = std::process::Command::new(common::sgdm_bin())
                .args(["--device", "cuda-sim", "forward", &d, "--dtype", dtype, "--inputs", &format!("{d}/inputs.safetensors")])
                .args(["--grad-outputs", &format!("{d}/grad_outputs.safetensors"), "--output", o.to_str().unwrap()])
                .args(["--compare", &format!("{d}/expected.safetensors")])
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&run.stdout);
            assert!(
                run.status.success() && stdout.contains("within bounds") && stdout.contains("on cuda-sim"),
                "{case} {dtype} on cuda-sim:\n{stdout}\n{}",
                String::from_utf8_lossy(&run.stderr)
            );
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
    // --compare against PyTorch's reference passes with the f32 bounds; against a reference with one tensor
    // perturbed by 1% it fails, names the tensor and exits non-zero; against another model's reference it
    // is an error naming the file.
    let i = format!("{d}/inputs.safetensors");
    let g = format!("{d}/grad_outputs.safetensors");
    let e = format!("{d}/expected.safetensors");
    let good = run(&["--device", "cpu", "forward", &d, "--inputs", &i, "--grad-outputs", &g, "--output", &o, "--compare", &e]);
    let stdout = String::from_utf8_lossy(&good.stdout);
    assert!(good.status.success(), "{}", String::from_utf8_lossy(&good.stderr));
    assert!(stdout.contains("loss") && stdout.contains(" pass") && stdout.contains("within bounds"), "{stdout}");
    let reference = SafetensorsFile::open(&e).unwrap();
    let mut perturbed: Vec<(String, sgdm::Tensor)> = Vec::new();
    for name in reference.names() {
        let t = reference.tensor(name, &Device::Cpu, DType::F32).unwrap();
        let mut v = t.to_f32_vec().unwrap();
        if name == "loss" {
            v.iter_mut().for_each(|x| *x *= 1.01);
        }
        perturbed.push((name.to_string(), sgdm::Tensor::from_f32(&Device::Cpu, t.shape(), DType::F32, &v).unwrap()));
    }
    let p = out.path().join("perturbed.safetensors");
    let refs: Vec<(&str, &sgdm::Tensor)> = perturbed.iter().map(|(n, t)| (n.as_str(), t)).collect();
    sgdm::weights::save_safetensors(&p, &refs, None).unwrap();
    let bad = run(&["--device", "cpu", "forward", &d, "--inputs", &i, "--grad-outputs", &g, "--output", &o, "--compare", p.to_str().unwrap()]);
    let (stdout, stderr) = (String::from_utf8_lossy(&bad.stdout), String::from_utf8_lossy(&bad.stderr));
    assert!(!bad.status.success() && stdout.contains("FAIL") && stderr.contains("out of bounds") && stderr.contains("loss"), "{stdout}\n{stderr}");
    let other = fixture("structural_vae_tiny").join("expected.safetensors");
    let wrong = run(&["--device", "cpu", "forward", &d, "--inputs", &i, "--output", &o, "--compare", other.to_str().unwrap()]);
    assert!(
        !wrong.status.success() && String::from_utf8_lossy(&wrong.stderr).contains("does not hold the tensors"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );
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
