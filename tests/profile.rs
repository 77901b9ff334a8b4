//! `sgdm profile` and the op accounting behind it: a conv's counted FLOPs and bytes are its algorithm's,
//! nested ops count once, and the command's JSON covers the step's op families.

mod common;

use sgdm::ops::conv::{conv2d_forward, Conv2dSpec};
use sgdm::profile::{Family, FAMILIES};
use sgdm::{DType, Device, Tensor};

#[test]
fn a_conv_is_counted_with_its_flops_and_bytes() {
    let (n, c, h, w, k, r) = (2, 3, 9, 7, 5, 3);
    let x = Tensor::from_f32(&Device::Cpu, &[n, c, h, w], DType::F32, &common::random(n * c * h * w, -1.0, 1.0, 1)).unwrap();
    let wt = Tensor::from_f32(&Device::Cpu, &[k, c, r, r], DType::F32, &common::random(k * c * r * r, -1.0, 1.0, 2)).unwrap();
    let mut y = Tensor::zeros(&Device::Cpu, &[n, k, h, w], DType::F32).unwrap();
    // Another test binary's thread could profile too; this binary has only this test touching it.
    sgdm::profile::start();
    conv2d_forward(&x, &wt, None, Conv2dSpec::new(1, 1), &mut y).unwrap();
    let totals = sgdm::profile::stop();
    let conv = totals[FAMILIES.iter().position(|f| *f == Family::Conv).unwrap()];
    assert_eq!(conv.calls, 1);
    assert_eq!(conv.flops, 2.0 * (n * k * h * w * c * r * r) as f64);
    assert_eq!(conv.bytes, 4.0 * (x.numel() + wt.numel() + y.numel()) as f64);
    assert!(conv.seconds > 0.0);
    // Off again: nothing more is counted.
    conv2d_forward(&x, &wt, None, Conv2dSpec::new(1, 1), &mut y).unwrap();
    sgdm::profile::start();
    assert_eq!(sgdm::profile::stop().iter().map(|t| t.calls).sum::<u64>(), 0);
}

#[test]
fn the_profile_command_reports_every_family_of_a_denoising_step() {
    let (_, weights) = common::tiny_model();
    let (ok, stdout, stderr) = common::run_sgdm(["--device", "cpu", "profile", "--weights", weights.to_str().unwrap(), "--steps", "1", "--json"]);
    assert!(ok, "{stdout}\n{stderr}");
    let r: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"));
    assert_eq!(r["rows"], 2, "guidance doubles batch 1");
    // The pooled step as reconstruction runs it (no graph on the CPU), in a pool of a positive size.
    assert!(r["pooled_step_seconds"].as_f64().unwrap() > 0.0 && r["pool_bytes"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["cuda_graph"], false);
    assert!(r["peak"]["gemm_flops_per_s"].as_f64().unwrap() > 0.0 && r["peak"]["copy_bytes_per_s"].as_f64().unwrap() > 0.0);
    let fams = r["families"].as_array().unwrap();
    let get = |name: &str| fams.iter().find(|f| f["family"] == name).unwrap_or_else(|| panic!("no {name} row"));
    for name in ["conv", "gemm", "attention", "norm", "elementwise"] {
        assert!(get(name)["calls"].as_u64().unwrap() > 0, "no {name} calls in a UNet + ControlNet step: {}", get(name));
        assert!(get(name)["bytes"].as_f64().unwrap() > 0.0);
    }
    let share: f64 = fams.iter().map(|f| f["share"].as_f64().unwrap()).sum();
    assert!(share > 0.5 && share <= 1.0 + 1e-9, "the families' shares sum to {share}");

    let (ok, table, stderr) = common::run_sgdm(["--device", "cpu", "profile", "--weights", weights.to_str().unwrap(), "--steps", "1"]);
    assert!(ok, "{stderr}");
    assert!(table.contains("TFLOP/s") && table.contains("conv") && table.contains("ms plain"), "{table}");
    assert!(table.contains("as reconstruction runs it:") && table.contains("steps/s") && table.contains("MiB pool"), "{table}");
}
