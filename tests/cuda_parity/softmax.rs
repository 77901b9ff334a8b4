//! Softmax kernels against the CPU: rows of 1, 7, 77 (cross-attention keys), 4099 (odd, past one block's
//! four elements per thread) and 8192 (longer than the 1024-thread block covers in four), and a large-
//! magnitude case. f32: the block reduction adds in another order than the CPU's sequential sum, so 1e-5
//! relative (plus the CPU's own n * 2^-24 sum error); bf16 rounds once on the store: 2^-8 relative.

use sgdm::memory::pool::Pool;
use sgdm::ops::softmax::{softmax_backward, softmax_forward};
use sgdm::{DType, Device};

use crate::common::{compare, cpu, random, rounded, upload, zeros};

pub fn check(gpu: &Device) {
    let pool = Pool::new(gpu, 1 << 24).unwrap();
    for (dtype, rel, floor) in [(DType::F32, 1e-5, 1e-9), (DType::BF16, 2f32.powi(-8), 1e-9)] {
        for (rows, n, scale, offset) in [
            (3, 1, 1.0f32, 0.0f32),
            (5, 7, -0.5, 0.0),
            (33, 77, 40f32.powf(-0.5), 0.0),
            (3, 4099, 1.0, 0.0),
            (2, 8192, 512f32.powf(-0.5), 0.0),
            (4, 100, 1.0, 1e4),
        ] {
            let what = format!("[{rows}, {n}] scale {scale} offset {offset} {dtype}");
            let rel = rel + n as f32 * 6e-8;
            let x: Vec<f32> = random(rows * n, -6.0, 6.0, 301 + n as u64).iter().map(|v| v + offset).collect();
            let x = rounded(dtype, &x);
            let gx = upload(&pool, &[rows, n], dtype, &x);
            let mut gy = upload(&pool, &[rows, n], dtype, &vec![f32::NAN; rows * n]);
            let mut cy = zeros(&[rows, n]);
            softmax_forward(&gx, scale, &mut gy).unwrap();
            softmax_forward(&cpu(&[rows, n], &x), scale, &mut cy).unwrap();
            compare(&format!("softmax_forward {what}"), &gy.to_f32_vec().unwrap(), cy.f32s().unwrap(), rel, floor);

            // The backward from the same (stored) y on both sides, so only the backward's error is measured.
            let y = gy.to_f32_vec().unwrap();
            let dy = rounded(dtype, &random(rows * n, -1.0, 1.0, 302 + n as u64));
            let gdy = upload(&pool, &[rows, n], dtype, &dy);
            let mut gdx = upload(&pool, &[rows, n], dtype, &vec![f32::NAN; rows * n]);
            let mut cdx = zeros(&[rows, n]);
            softmax_backward(&gy, &gdy, scale, &mut gdx).unwrap();
            softmax_backward(&cpu(&[rows, n], &y), &cpu(&[rows, n], &dy), scale, &mut cdx).unwrap();
            // dy - dot cancels: the floor is the dot's absolute error (sum |dy y| <= 1) times |scale y|.
            let max_y = y.iter().fold(0f32, |m, v| m.max(v.abs()));
            let floor = rel * scale.abs() * max_y + 1e-9;
            compare(&format!("softmax_backward {what}"), &gdx.to_f32_vec().unwrap(), cdx.f32s().unwrap(), rel, floor);
        }
        // A NaN anywhere in a row makes the whole row NaN, as on the CPU, wherever it sits among the
        // threads' elements (first in a thread's share, before any finite value, was the case that leaked).
        let n = 256;
        for at in [0, 1, 200] {
            let mut x = random(n, -1.0, 1.0, 303);
            x[at] = f32::NAN;
            let gx = upload(&pool, &[1, n], dtype, &rounded(dtype, &x));
            let mut gy = upload(&pool, &[1, n], dtype, &vec![0.0; n]);
            softmax_forward(&gx, 1.0, &mut gy).unwrap();
            let y = gy.to_f32_vec().unwrap();
            let finite = y.iter().filter(|v| !v.is_nan()).count();
            if finite > 0 {
                crate::common::fail(format!("softmax_forward {dtype}: NaN at {at} left {finite} of {n} outputs finite"));
            }
        }
    }
}
