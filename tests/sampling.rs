//! The sampling loop's ops on the CPU (tests/cuda_parity/sampling.rs holds CUDA to them): the guided step
//! is exactly classifier-free guidance followed by the scheduler's own update (`StepCoefficients::apply`)
//! and the scaled copies of the new sample; the rescaling matches a float64 reference; fill fills.

mod common;

use common::{compare, cpu, random};
use sgdm::diffusion::scheduler::{Scheduler, SchedulerKind};
use sgdm::ops::elementwise::fill;
use sgdm::ops::sampling::{guided_step, rescale_rows, GuidedStep};

#[test]
fn the_guided_step_is_guidance_then_the_scheduler_update_then_scaled_copies() {
    let n = 2 * 4 * 5 * 5;
    for kind in [SchedulerKind::Ddim, SchedulerKind::Euler, SchedulerKind::DpmSolverPp2m] {
        let scheduler = Scheduler::new(kind, 8).unwrap();
        for (guidance, copies) in [(None, 1), (Some(4.0f32), 2), (Some(4.0), 1)] {
            let branches = if guidance.is_some() { 2 } else { 1 };
            let eps = random(branches * n, -2.0, 2.0, 1);
            let (sample, x0) = (random(n, -3.0, 3.0, 2), random(n, -1.0, 1.0, 3));
            let step = GuidedStep { guidance, coefficients: scheduler.coefficients(3), out_scale: 0.7 };
            let (mut s, mut x) = (cpu(&[n], &sample), cpu(&[n], &x0));
            let mut out = cpu(&[copies * n], &vec![f32::NAN; copies * n]);
            guided_step(&cpu(&[branches * n], &eps), &step, &mut s, &mut x, &mut out).unwrap();

            // The reference: guidance on the host, then the scheduler's own update.
            let e: Vec<f32> = match guidance {
                Some(g) => eps[..n].iter().zip(&eps[n..]).map(|(c, u)| u + g * (c - u)).collect(),
                None => eps.clone(),
            };
            let (mut want_s, mut want_x) = (sample.clone(), x0.clone());
            step.coefficients.apply(&mut want_s, &e, &mut want_x);
            assert_eq!(s.f32s().unwrap(), want_s, "{kind:?} {guidance:?}: sample");
            assert_eq!(x.f32s().unwrap(), want_x, "{kind:?} {guidance:?}: x0");
            let scaled: Vec<f32> = want_s.iter().map(|v| v * 0.7).collect();
            for k in 0..copies {
                assert_eq!(&out.f32s().unwrap()[k * n..(k + 1) * n], &scaled[..], "{kind:?} {guidance:?}: copy {k}");
            }
        }
    }
}

#[test]
fn the_guided_step_refuses_mismatched_sizes() {
    let scheduler = Scheduler::new(SchedulerKind::Ddim, 4).unwrap();
    let step = GuidedStep { guidance: Some(2.0), coefficients: scheduler.coefficients(0), out_scale: 1.0 };
    let (mut s, mut x) = (cpu(&[6], &[0.0; 6]), cpu(&[6], &[0.0; 6]));
    // Guided needs 2n noise values; out must be whole copies.
    let err = guided_step(&cpu(&[6], &[0.0; 6]), &step, &mut s, &mut x, &mut cpu(&[6], &[0.0; 6])).unwrap_err();
    assert!(err.to_string().contains("eps [6] must hold 2 x 6 values"), "{err}");
    let err = guided_step(&cpu(&[12], &[0.0; 12]), &step, &mut s, &mut x, &mut cpu(&[9], &[0.0; 9])).unwrap_err();
    assert!(err.to_string().contains("not a whole number of copies"), "{err}");
}

#[test]
fn rows_are_rescaled_to_the_norm_and_zero_rows_stay_zero() {
    let d = 37;
    let mut x = random(4 * d, -1.0, 1.0, 5);
    x[d..2 * d].fill(0.0);
    let mut y = cpu(&[4, d], &vec![0.0; 4 * d]);
    rescale_rows(&cpu(&[4, d], &x), 3.0, &mut y).unwrap();
    let want: Vec<f32> = x
        .chunks(d)
        .flat_map(|r| {
            let len = r.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
            r.iter().map(move |v| if len > 0.0 { (*v as f64 * 3.0 / len) as f32 } else { 0.0 })
        })
        .collect();
    // f32 sum of 37 squares and one division against float64: a few ulps.
    compare("rescale_rows", y.f32s().unwrap(), &want, 1e-6, 1e-7);
    assert!(y.f32s().unwrap()[d..2 * d].iter().all(|v| *v == 0.0));
}

#[test]
fn fill_sets_every_element() {
    let mut t = cpu(&[3, 5], &[9.0; 15]);
    fill(&mut t, -0.25).unwrap();
    assert_eq!(t.f32s().unwrap(), [-0.25; 15]);
}
