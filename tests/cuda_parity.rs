//! CUDA against the CPU reference: one launch of every kernel family per kernel file, on random data,
//! through tensors carved from a CUDA arena. Without a GPU every test here prints SKIPPED and its reason.

mod common;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sgdm::ops::elementwise;
use sgdm::runtime::kernels::KERNEL_FILES;
use sgdm::runtime::{select, Arena, MemoryPlan, Region};
use sgdm::tensor::{bytes_to_f32, f32_to_bytes};
use sgdm::{DType, Device, DeviceSpec, Tensor};

fn gpu_or_skip() -> Option<Device> {
    match select(DeviceSpec::Cuda(0)) {
        Ok(s) => Some(s.device),
        Err(e) => {
            common::skipped("CUDA-vs-CPU parity", format!("no usable CUDA device: {e:#}"));
            None
        }
    }
}

fn random(n: usize, lo: f32, hi: f32, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// Values as they are after storing them in `dtype`.
fn rounded(dtype: DType, v: &[f32]) -> Vec<f32> {
    bytes_to_f32(dtype, &f32_to_bytes(dtype, v))
}

fn cpu(v: &[f32]) -> Tensor {
    Tensor::from_f32(&Device::Cpu, &[v.len()], DType::F32, v).unwrap()
}

/// Max abs and relative L2 error; fails past `bound` (relative to each |reference| element, plus `floor`).
fn compare(what: &str, got: &[f32], want: &[f32], rel: f32, floor: f32) {
    assert_eq!(got.len(), want.len());
    let mut max_abs = 0f32;
    let (mut num, mut den) = (0f64, 0f64);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        assert!(d <= rel * w.abs() + floor, "{what}: element {i}: cuda {g}, cpu {w}");
        max_abs = max_abs.max(d);
        num += (d as f64).powi(2);
        den += (*w as f64).powi(2);
    }
    println!("{what:<28} max abs {max_abs:.3e}  rel L2 {:.3e}  bound {rel:.1e}*|x|+{floor:.0e}  pass", (num / den.max(1e-30)).sqrt());
}

fn check_elementwise(gpu: &Device) {
    let n = 10_007; // not a multiple of the block size
    let x = random(n, -6.0, 6.0, 1);
    let b = random(n, -2.0, 2.0, 2);
    let mut plan = MemoryPlan::new();
    for _ in 0..4 {
        plan.reserve(Region::Activations, &[n], DType::F32);
    }
    let mut arena = Arena::new(gpu, &plan).unwrap();

    // Casts: CUDA and `half` both round to nearest even, so the bits agree exactly.
    for (from, to) in [
        (DType::F32, DType::BF16),
        (DType::BF16, DType::F32),
        (DType::F32, DType::F16),
        (DType::F16, DType::F32),
        (DType::BF16, DType::F16),
        (DType::F16, DType::BF16),
    ] {
        let mut src = arena.alloc(Region::Activations, &[n], from).unwrap();
        src.write_f32(&x).unwrap();
        let mut dst = arena.alloc(Region::Activations, &[n], to).unwrap();
        elementwise::cast(&src, &mut dst).unwrap();
        let mut want = Tensor::zeros(&Device::Cpu, &[n], to).unwrap();
        elementwise::cast(&src.to_device(&Device::Cpu, from).unwrap(), &mut want).unwrap();
        assert_eq!(dst.to_bytes().unwrap(), want.to_bytes().unwrap(), "cast {from} -> {to} is not bit-exact");
        println!("cast {from} -> {to}: bit-exact over {n} values");
        arena.reset_step();
    }

    // f32: only __expf differs from the CPU's exp (a few ulp). bf16: the inputs are the bf16-rounded values on
    // both sides; the output is rounded once to bf16, half an ulp = 2^-9 relative, 2^-8 leaves margin.
    for (dtype, rel, floor) in [(DType::F32, 1e-5, 1e-6), (DType::BF16, 2f32.powi(-8), 1e-6)] {
        let (xr, br) = (rounded(dtype, &x), rounded(dtype, &b));
        let mut gx = arena.alloc(Region::Activations, &[n], dtype).unwrap();
        gx.write_f32(&xr).unwrap();
        let mut gb = arena.alloc(Region::Activations, &[n], dtype).unwrap();
        gb.write_f32(&br).unwrap();
        let mut gy = arena.alloc(Region::Activations, &[n], dtype).unwrap();
        let mut cy = cpu(&vec![0.0; n]);

        elementwise::add(&gx, &gb, &mut gy).unwrap();
        elementwise::add(&cpu(&xr), &cpu(&br), &mut cy).unwrap();
        compare(&format!("add {dtype}"), &gy.to_f32_vec().unwrap(), cy.f32s().unwrap(), rel, floor);

        elementwise::scale(&gx, 0.3, &mut gy).unwrap();
        elementwise::scale(&cpu(&xr), 0.3, &mut cy).unwrap();
        compare(&format!("scale {dtype}"), &gy.to_f32_vec().unwrap(), cy.f32s().unwrap(), rel, floor);

        elementwise::silu_forward(&gx, &mut gy).unwrap();
        elementwise::silu_forward(&cpu(&xr), &mut cy).unwrap();
        compare(&format!("silu_forward {dtype}"), &gy.to_f32_vec().unwrap(), cy.f32s().unwrap(), rel, floor);

        elementwise::silu_backward(&gx, &gb, &mut gy).unwrap();
        elementwise::silu_backward(&cpu(&xr), &cpu(&br), &mut cy).unwrap();
        compare(&format!("silu_backward {dtype}"), &gy.to_f32_vec().unwrap(), cy.f32s().unwrap(), rel, floor);
        arena.reset_step();
    }
    println!("{}", arena.report());
}

#[test]
fn one_launch_per_kernel_file_matches_the_cpu_reference() {
    let Some(gpu) = gpu_or_skip() else { return };
    for file in KERNEL_FILES {
        match file.name {
            "elementwise.cu" => check_elementwise(&gpu),
            other => panic!("kernels/{other} has no CUDA-vs-CPU check: add one to tests/cuda_parity.rs"),
        }
    }
    let loads = gpu.cuda().unwrap().kernel_loads();
    println!("kernel modules: {} compiled now, {} loaded from the cubin cache", loads.compiled, loads.cache_hits);
    assert_eq!(loads.compiled + loads.cache_hits, KERNEL_FILES.len(), "each kernel file is loaded once");
}
