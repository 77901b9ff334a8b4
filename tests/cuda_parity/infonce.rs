//! InfoNCE on CUDA (normalisation, row/column log-sum-exp, loss, logits-gradient and normalisation-backward
//! kernels around cuBLASLt GEMMs) against the CPU reference: the loss, da and db.

use sgdm::ops::infonce::{infonce_backward, infonce_forward, InfoNceActivations, DEFAULT_TEMPERATURE};
use sgdm::{DType, Device, Tensor};

use crate::common::{compare, random, rounded, NanFilled};

fn run(device: &Device, dtype: DType, a: &[f32], b: &[f32], (n, d): (usize, usize), tau: f32) -> (f32, Vec<f32>, Vec<f32>) {
    let on = |v: &[f32]| Tensor::from_f32(device, &[n, d], dtype, v).unwrap();
    // NaN-filled like reused pool memory: every buffer must be written before it is read.
    let mut acts = InfoNceActivations::new(n, d, dtype, &mut NanFilled(device.clone())).unwrap();
    infonce_forward(&on(a), &on(b), tau, &mut acts).unwrap();
    let (mut da, mut db) = (on(&vec![f32::NAN; n * d]), on(&vec![f32::NAN; n * d]));
    infonce_backward(&mut acts, 1.5, &mut da, &mut db).unwrap();
    (acts.loss().unwrap(), da.to_f32_vec().unwrap(), db.to_f32_vec().unwrap())
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0, |m, x| m.max(x.abs()))
}

pub fn check(gpu: &Device) {
    // B = 1 (a single pair), odd sizes, D = 512 (the embedding width), and B = 300 so that the statistics
    // kernel runs many row blocks and column blocks with partial tails.
    let cases = [((1, 3), 0.5), ((5, 512), DEFAULT_TEMPERATURE), ((77, 40), DEFAULT_TEMPERATURE), ((300, 64), 0.2)];
    // f32: the same f32 math in another summation order: 1e-5 relative (loss), gradients 1e-4 relative with
    // a floor of 1e-4 of the largest element (softmax differences cancel).
    // bf16: the unit rows are stored in bf16 (2^-9 relative), so logits move by up to ~2^-9/τ; the loss and
    // the gradients (the logits gradient is bf16 too) agree to ~2%.
    for (dtype, loss_rel, rel, floor_frac) in [(DType::F32, 1e-5f32, 1e-4f32, 1e-4f32), (DType::BF16, 2e-2, 3e-2, 3e-2)] {
        for ((n, d), tau) in cases {
            let a = rounded(dtype, &random(n * d, -1.0, 1.0, 7 + n as u64));
            let noise = random(n * d, -1.0, 1.0, 8 + d as u64);
            let b = rounded(dtype, &a.iter().zip(noise).map(|(a, r)| a + 1.5 * r).collect::<Vec<_>>());
            let (gl, gda, gdb) = run(gpu, dtype, &a, &b, (n, d), tau);
            let (cl, cda, cdb) = run(&Device::Cpu, DType::F32, &a, &b, (n, d), tau);
            let tag = format!("B{n} D{d} tau {tau} {dtype}");
            compare(&format!("infonce loss {tag}"), &[gl], &[cl], loss_rel, loss_rel);
            compare(&format!("infonce da {tag}"), &gda, &cda, rel, floor_frac * max_abs(&cda));
            compare(&format!("infonce db {tag}"), &gdb, &cdb, rel, floor_frac * max_abs(&cdb));
        }
    }
}
