//! The sampling loop's device ops against the CPU: the guided scheduler step (every scheduler, guided and
//! not, f32 and bf16 model dtypes) and the row rescaling. The update runs in double on both sides from the
//! same inputs, so f32 state agrees to a few f32 ulps (1e-6 relative); bf16 outputs round once (2^-8).

use sgdm::diffusion::scheduler::{Scheduler, SchedulerKind};
use sgdm::ops::sampling::{guided_step, rescale_rows, GuidedStep};
use sgdm::{DType, Device, Tensor};

use crate::common::{compare, cpu, random, rounded};

pub fn check(gpu: &Device) {
    let n = 4 * 9 * 9 * 3; // three items of 4x9x9 latents: not a multiple of the block size
    for dtype in [DType::F32, DType::BF16] {
        let (rel, out_rel) = (1e-6, if dtype == DType::BF16 { 2f32.powi(-8) } else { 1e-6 });
        for kind in [SchedulerKind::Ddim, SchedulerKind::Euler, SchedulerKind::DpmSolverPp2m] {
            let scheduler = Scheduler::new(kind, 10).unwrap();
            for guidance in [None, Some(3.5f32)] {
                let branches = if guidance.is_some() { 2 } else { 1 };
                let what = format!("guided_step {kind:?} {} {dtype}", if guidance.is_some() { "guided" } else { "unguided" });
                let eps = rounded(dtype, &random(branches * n, -2.0, 2.0, 1));
                let (sample, x0) = (random(n, -3.0, 3.0, 2), random(n, -1.0, 1.0, 3));
                let step = GuidedStep { guidance, coefficients: scheduler.coefficients(4), out_scale: scheduler.input_scale(5) as f32 };
                let mut g = (Tensor::from_f32(gpu, &[n], DType::F32, &sample).unwrap(), Tensor::from_f32(gpu, &[n], DType::F32, &x0).unwrap());
                let mut gout = Tensor::zeros(gpu, &[branches * n], dtype).unwrap();
                guided_step(&Tensor::from_f32(gpu, &[branches * n], dtype, &eps).unwrap(), &step, &mut g.0, &mut g.1, &mut gout).unwrap();
                let mut c = (cpu(&[n], &sample), cpu(&[n], &x0));
                let mut cout = cpu(&[branches * n], &vec![0.0; branches * n]);
                guided_step(&cpu(&[branches * n], &eps), &step, &mut c.0, &mut c.1, &mut cout).unwrap();
                compare(&format!("{what} sample"), &g.0.to_f32_vec().unwrap(), c.0.f32s().unwrap(), rel, 1e-6);
                compare(&format!("{what} x0"), &g.1.to_f32_vec().unwrap(), c.1.f32s().unwrap(), rel, 1e-6);
                compare(&format!("{what} out"), &gout.to_f32_vec().unwrap(), cout.f32s().unwrap(), out_rel, 1e-6);
            }
        }
        // Rescaling: rows of 8 and of 1000 (past one block's 256 threads), one all-zero row.
        for d in [8, 1000] {
            let mut x = rounded(dtype, &random(5 * d, -1.0, 1.0, 4));
            x[2 * d..3 * d].fill(0.0);
            let mut gy = Tensor::zeros(gpu, &[5, d], dtype).unwrap();
            rescale_rows(&Tensor::from_f32(gpu, &[5, d], dtype, &x).unwrap(), 7.5, &mut gy).unwrap();
            let mut cy = cpu(&[5, d], &vec![0.0; 5 * d]);
            rescale_rows(&cpu(&[5, d], &x), 7.5, &mut cy).unwrap();
            // f32: the block sums in another order (d * 2^-24 relative); bf16: one output rounding.
            let r = if dtype == DType::BF16 { 2f32.powi(-8) } else { 1e-6 + d as f32 * 6e-8 };
            compare(&format!("rescale_rows d={d} {dtype}"), &gy.to_f32_vec().unwrap(), cy.f32s().unwrap(), r, 1e-7);
        }
    }
}
