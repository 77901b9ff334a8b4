//! Device selection and the CLI's behaviour on a machine with or without a GPU.

mod common;

use std::process::Command;

use sgdm::runtime::{probe, select};
use sgdm::{Device, DeviceSpec};

#[test]
fn auto_selects_cuda_only_when_a_gpu_is_usable_and_otherwise_says_why() {
    let selected = select(DeviceSpec::Auto).unwrap();
    match probe::driver() {
        // A simulated device is never chosen by auto (another test of this binary may have started it).
        Ok(d) if d.device_count > 0 && !d.simulated && probe::nvrtc().is_ok() => {
            assert!(selected.device.is_cuda(), "a usable GPU was found but auto chose {}", selected.device)
        }
        _ => {
            assert!(matches!(selected.device, Device::Cpu));
            let notice = selected.notice.expect("falling back to the CPU prints a notice");
            assert!(notice.starts_with("sgdm: using the CPU (") && !notice.contains('\n'), "{notice}");
        }
    }
}

#[test]
fn explicit_cuda_without_a_gpu_is_an_error_not_a_panic() {
    if probe::driver().is_ok_and(|d| d.device_count > 0 && !d.simulated) {
        common::skipped("explicit cuda without a GPU", "a GPU is present, so --device cuda cannot fail for want of one");
        return;
    }
    // In a process of its own: a test of this binary may have started the simulator here.
    let (code, stdout, stderr) = sgdm(&["--device", "cuda", "info"]);
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    assert!(stdout.contains("selected (--device cuda:0): none: CUDA is unavailable"), "{stdout}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// With the simulator running, `cuda` is refused (a real driver cannot be loaded beside it) and `auto` falls
/// back to the CPU: nothing ever takes the simulated device for a GPU.
#[test]
fn a_process_running_the_simulator_never_passes_it_off_as_a_gpu() {
    let Some(gpu) = common::gpu_or_skip("the simulated device's labels") else { return };
    if !gpu.is_simulated() {
        common::skipped("the simulated device's labels", "the CUDA tests run on a real GPU here");
        return;
    }
    assert_eq!(gpu.to_string(), "cuda-sim");
    let err = select(DeviceSpec::Cuda(0)).err().expect("cuda must not open beside the simulator");
    assert!(format!("{err:#}").contains("runs the simulated CUDA device"), "{err:#}");
    let auto = select(DeviceSpec::Auto).unwrap();
    assert!(matches!(auto.device, Device::Cpu), "auto chose {}", auto.device);
    let driver = probe::driver().unwrap();
    assert!(driver.simulated && driver.device_count == 1);
}

#[test]
fn the_simulated_device_is_named_as_such_and_measures_nothing() {
    if !common::simulator_or_skip("cuda-sim from the command line") {
        return;
    }
    let (code, stdout, stderr) = sgdm(&["--device", "cuda-sim", "info"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    for line in [
        "cuda-sim: the simulated CUDA device",
        "the simulator's stand-in driver, not NVIDIA's",
        "cuda-sim: cudasim: simulated sm_90 device (host CPU, not a GPU)",
        "selected (--device cuda-sim): cuda-sim",
    ] {
        assert!(stdout.contains(line), "`sgdm --device cuda-sim info` lacks '{line}':\n{stdout}");
    }
    for command in [&["profile", "--steps", "1"][..], &["bench", "--quick", "--runs", "1"]] {
        let (code, _, stderr) = sgdm(&[&["--device", "cuda-sim"][..], command].concat());
        assert_eq!(code, 1, "sgdm {command:?} on cuda-sim: {stderr}");
        assert!(stderr.contains("its times are not GPU numbers"), "{stderr}");
    }
}

#[test]
fn cpu_is_always_available() {
    let s = select(DeviceSpec::Cpu).unwrap();
    assert!(matches!(s.device, Device::Cpu) && s.notice.is_none());
}

fn sgdm(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(common::sgdm_bin()).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn info_reports_devices_libraries_and_the_kernel_cache() {
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new(common::sgdm_bin()).arg("info").env("SGDM_CACHE_DIR", cache.path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for line in ["cpu:", "cuda driver:", "nvrtc:", "selected (--device auto):", "kernel cache:", "kernel files:"] {
        assert!(stdout.contains(line), "`sgdm info` lacks '{line}':\n{stdout}");
    }
    assert!(stdout.contains(&cache.path().join("kernels").display().to_string()), "{stdout}");
}

#[test]
fn bad_device_names_are_rejected_with_the_accepted_forms() {
    let (code, _, stderr) = sgdm(&["--device", "gpu0", "info"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("expected auto, cpu, cuda, cuda:N or cuda-sim"), "{stderr}");
}

#[test]
fn kernels_without_arch_or_gpu_asks_for_arch() {
    if probe::driver().is_ok_and(|d| d.device_count > 0 && !d.simulated) {
        common::skipped("`sgdm kernels` without --arch", "a GPU is present, so it defaults to its architecture");
        return;
    }
    let (code, _, stderr) = sgdm(&["kernels"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("pass --arch"), "{stderr}");
    let (code, _, stderr) = sgdm(&["kernels", "--arch", "sm9"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("expected sm_XX"), "{stderr}");
}

#[test]
fn every_command_has_help_with_examples() {
    for args in [&["--help"][..], &["info", "--help"], &["kernels", "--help"]] {
        let (code, stdout, _) = sgdm(args);
        assert_eq!(code, 0);
        assert!(stdout.contains("Examples:"), "`sgdm {}` has no examples:\n{stdout}", args.join(" "));
    }
}

/// Tensors made on one thread are written, zeroed, read and used by a GEMM on another, whose first CUDA
/// call that is (the raw copies and cuBLASLt use the thread's current context, which cudarc only binds for
/// its own calls).
#[test]
fn cuda_tensors_work_from_a_thread_that_made_no_cuda_call() {
    let Some(gpu) = common::gpu_or_skip("CUDA tensors from another thread") else { return };
    let a = sgdm::Tensor::from_f32(&gpu, &[2, 3], sgdm::DType::F32, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
    let w = sgdm::Tensor::from_f32(&gpu, &[1, 3], sgdm::DType::F32, &[1.0, 1.0, 1.0]).unwrap();
    let mut y = sgdm::Tensor::zeros(&gpu, &[2, 1], sgdm::DType::F32).unwrap();
    let (sums, zeros) = std::thread::spawn(move || {
        sgdm::ops::linear::linear_forward(&a, &w, None, &mut y).unwrap();
        let sums = y.to_f32_vec().unwrap();
        y.write_f32(&[7.0, 8.0]).unwrap();
        y.fill_zero().unwrap();
        (sums, y.to_f32_vec().unwrap())
    })
    .join()
    .unwrap();
    assert_eq!(sums, [6.0, 15.0]);
    assert_eq!(zeros, [0.0, 0.0]);
}
