//! Elementwise kernels: casts bit-exact, arithmetic within one bf16 rounding.

use sgdm::ops::elementwise;
use sgdm::runtime::{Arena, MemoryPlan, Region};
use sgdm::{DType, Device, Tensor};

use crate::common::{compare, cpu, random, rounded};

pub fn check(gpu: &Device) {
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
        let mut cy = cpu(&[n], &vec![0.0; n]);

        elementwise::add(&gx, &gb, &mut gy).unwrap();
        elementwise::add(&cpu(&[n], &xr), &cpu(&[n], &br), &mut cy).unwrap();
        compare(&format!("add {dtype}"), &gy.to_f32_vec().unwrap(), cy.f32s().unwrap(), rel, floor);

        elementwise::scale(&gx, 0.3, &mut gy).unwrap();
        elementwise::scale(&cpu(&[n], &xr), 0.3, &mut cy).unwrap();
        compare(&format!("scale {dtype}"), &gy.to_f32_vec().unwrap(), cy.f32s().unwrap(), rel, floor);

        elementwise::silu_forward(&gx, &mut gy).unwrap();
        elementwise::silu_forward(&cpu(&[n], &xr), &mut cy).unwrap();
        compare(&format!("silu_forward {dtype}"), &gy.to_f32_vec().unwrap(), cy.f32s().unwrap(), rel, floor);

        elementwise::silu_backward(&gx, &gb, &mut gy).unwrap();
        elementwise::silu_backward(&cpu(&[n], &xr), &cpu(&[n], &br), &mut cy).unwrap();
        compare(&format!("silu_backward {dtype}"), &gy.to_f32_vec().unwrap(), cy.f32s().unwrap(), rel, floor);
        arena.reset_step();
    }
    println!("{}", arena.report());
}
