//! cuBLASLt GEMMs and the bias-gradient kernel against the CPU reference.

use sgdm::ops::linear::{linear_backward, linear_forward, matmul, MatmulSpec};
use sgdm::{DType, Device, Tensor};

use crate::common::{compare, cpu, random, rounded};

fn on(gpu: &Device, shape: &[usize], dtype: DType, v: &[f32]) -> Tensor {
    Tensor::from_f32(gpu, shape, dtype, v).unwrap()
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0, |m, x| m.max(x.abs()))
}

pub fn check(gpu: &Device) {
    let (m, k, n) = (77, 40, 33); // odd sizes, head-dim-like k
                                  // f32: CUBLAS_COMPUTE_32F (no TF32); only the summation order differs from the CPU.
                                  // bf16: inputs are the same bf16 values on both sides; the output rounds once to bf16 (2^-9 relative),
                                  // and cancellation in a sum makes small elements relatively worse, hence a floor of 1% of the largest.
    for (dtype, rel, floor_frac) in [(DType::F32, 1e-5f32, 1e-5f32), (DType::BF16, 1e-2, 1e-2)] {
        let x = rounded(dtype, &random(m * k, -1.0, 1.0, 21));
        let w = rounded(dtype, &random(n * k, -1.0, 1.0, 22));
        let b = rounded(dtype, &random(n, -1.0, 1.0, 23));
        let dy = rounded(dtype, &random(m * n, -1.0, 1.0, 24));

        let mut gy = on(gpu, &[m, n], dtype, &vec![0.0; m * n]);
        linear_forward(&on(gpu, &[m, k], dtype, &x), &on(gpu, &[n, k], dtype, &w), Some(&on(gpu, &[n], dtype, &b)), &mut gy).unwrap();
        let mut cy = cpu(&[m, n], &vec![0.0; m * n]);
        linear_forward(&cpu(&[m, k], &x), &cpu(&[n, k], &w), Some(&cpu(&[n], &b)), &mut cy).unwrap();
        let want = cy.f32s().unwrap();
        compare(&format!("linear_forward {dtype}"), &gy.to_f32_vec().unwrap(), want, rel, floor_frac * max_abs(want));

        // Gradients into f32 tensors (the training layout), accumulating onto non-zero values.
        let prior = random(n * k, -1.0, 1.0, 25);
        let mut gdx = on(gpu, &[m, k], dtype, &vec![0.0; m * k]);
        let mut gdw = on(gpu, &[n, k], DType::F32, &prior);
        let mut gdb = on(gpu, &[n], DType::F32, &prior[..n]);
        linear_backward(
            &on(gpu, &[m, k], dtype, &x),
            &on(gpu, &[n, k], dtype, &w),
            &on(gpu, &[m, n], dtype, &dy),
            Some(&mut gdx),
            Some(&mut gdw),
            Some(&mut gdb),
        )
        .unwrap();
        let (mut cdx, mut cdw, mut cdb) = (cpu(&[m, k], &vec![0.0; m * k]), cpu(&[n, k], &prior), cpu(&[n], &prior[..n]));
        linear_backward(&cpu(&[m, k], &x), &cpu(&[n, k], &w), &cpu(&[m, n], &dy), Some(&mut cdx), Some(&mut cdw), Some(&mut cdb)).unwrap();
        for (name, g, c) in [
            ("dx", gdx.to_f32_vec().unwrap(), cdx),
            ("dw (+=, f32)", gdw.to_f32_vec().unwrap(), cdw),
            ("db (+=, f32)", gdb.to_f32_vec().unwrap(), cdb),
        ] {
            let want = c.f32s().unwrap();
            compare(&format!("linear_backward {name} {dtype}"), &g, want, rel, floor_frac * max_abs(want));
        }

        // Gradients into bf16 tensors (bias_grad_bf16_bf16), accumulating onto bf16 values: one more rounding
        // of dw and db to bf16 (2^-9 relative) on top of the bound above.
        if dtype == DType::BF16 {
            let prior16 = rounded(DType::BF16, &prior);
            let (mut gdw, mut gdb) = (on(gpu, &[n, k], DType::BF16, &prior16), on(gpu, &[n], DType::BF16, &prior16[..n]));
            linear_backward(
                &on(gpu, &[m, k], dtype, &x),
                &on(gpu, &[n, k], dtype, &w),
                &on(gpu, &[m, n], dtype, &dy),
                None,
                Some(&mut gdw),
                Some(&mut gdb),
            )
            .unwrap();
            let (mut cdw, mut cdb) = (cpu(&[n, k], &prior16), cpu(&[n], &prior16[..n]));
            linear_backward(&cpu(&[m, k], &x), &cpu(&[n, k], &w), &cpu(&[m, n], &dy), None, Some(&mut cdw), Some(&mut cdb)).unwrap();
            for (name, g, c) in [("dw (+=, bf16)", gdw.to_f32_vec().unwrap(), cdw), ("db (+=, bf16)", gdb.to_f32_vec().unwrap(), cdb)] {
                let want = c.f32s().unwrap();
                compare(&format!("linear_backward {name}"), &g, want, rel, floor_frac * max_abs(want));
            }
        }

        // Batched, both transposes.
        let (batch, mm, kk, nn) = (3, 9, 16, 7);
        let a = rounded(dtype, &random(batch * kk * mm, -1.0, 1.0, 26));
        let bb = rounded(dtype, &random(batch * nn * kk, -1.0, 1.0, 27));
        let spec = MatmulSpec { trans_a: true, trans_b: true, alpha: 0.25, accumulate: false };
        let mut gc = on(gpu, &[batch, mm, nn], dtype, &vec![0.0; batch * mm * nn]);
        matmul(&on(gpu, &[batch, kk, mm], dtype, &a), &on(gpu, &[batch, nn, kk], dtype, &bb), &mut gc, spec).unwrap();
        let mut cc = cpu(&[batch, mm, nn], &vec![0.0; batch * mm * nn]);
        matmul(&cpu(&[batch, kk, mm], &a), &cpu(&[batch, nn, kk], &bb), &mut cc, spec).unwrap();
        let want = cc.f32s().unwrap();
        compare(&format!("matmul batched aᵀbᵀ {dtype}"), &gc.to_f32_vec().unwrap(), want, rel, floor_frac * max_abs(want));

        // An empty batch: nothing written, parameter grads unchanged (cuBLASLt and the bias-gradient launch
        // must not see the empty shapes).
        let x0 = on(gpu, &[0, k], dtype, &[]);
        let mut y0 = on(gpu, &[0, n], dtype, &[]);
        linear_forward(&x0, &on(gpu, &[n, k], dtype, &w), Some(&on(gpu, &[n], dtype, &b)), &mut y0).unwrap();
        let (mut dw0, mut db0) = (on(gpu, &[n, k], DType::F32, &prior), on(gpu, &[n], DType::F32, &prior[..n]));
        let mut dx0 = on(gpu, &[0, k], dtype, &[]);
        linear_backward(&x0, &on(gpu, &[n, k], dtype, &w), &on(gpu, &[0, n], dtype, &[]), Some(&mut dx0), Some(&mut dw0), Some(&mut db0)).unwrap();
        compare(&format!("linear_backward empty batch dw {dtype}"), &dw0.to_f32_vec().unwrap(), &prior, 0.0, 0.0);
        compare(&format!("linear_backward empty batch db {dtype}"), &db0.to_f32_vec().unwrap(), &prior[..n], 0.0, 0.0);
    }
}
