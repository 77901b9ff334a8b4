//! Noise schedulers with diffusers' semantics for Stable Diffusion 1.5 (scaled_linear betas 0.00085..0.012
//! over 1000 steps, epsilon prediction, `steps_offset = 1`): DDIM (`DDIMScheduler`, eta 0, "leading"
//! spacing, `set_alpha_to_one = false`), Euler (`EulerDiscreteScheduler`, "linspace" spacing) and
//! DPM-Solver++(2M) (`DPMSolverMultistepScheduler`, midpoint, final sigma zero, lower-order final step).
//!
//! Every update is a linear combination, so a step is expressed as coefficients:
//! `x0 = a·sample + b·eps`, then `prev = cs·sample + ce·eps + cx·x0 + cp·x0_prev`, where `x0_prev` is the
//! previous step's `x0` (only DPM-Solver++ second order uses it). The same coefficients drive the CPU update
//! here and a fused device kernel, so both backends step identically. Schedules are computed in f64.

use std::fmt;
use std::str::FromStr;

use anyhow::{ensure, Result};

pub const TRAIN_TIMESTEPS: usize = 1000;
const BETA_START: f64 = 0.00085;
const BETA_END: f64 = 0.012;

/// `alphas_cumprod` of SD 1.5's scaled_linear schedule: betas = linspace(√β0, √β1, 1000)².
pub fn alphas_cumprod() -> Vec<f64> {
    let (s, e) = (BETA_START.sqrt(), BETA_END.sqrt());
    let n = TRAIN_TIMESTEPS;
    let mut acc = 1.0;
    (0..n)
        .map(|i| {
            let beta = (s + (e - s) * i as f64 / (n - 1) as f64).powi(2);
            acc *= 1.0 - beta;
            acc
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    Ddim,
    Euler,
    DpmSolverPp2m,
}

impl FromStr for SchedulerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<SchedulerKind, String> {
        match s {
            "ddim" => Ok(SchedulerKind::Ddim),
            "euler" => Ok(SchedulerKind::Euler),
            "dpmpp2m" => Ok(SchedulerKind::DpmSolverPp2m),
            _ => Err(format!("unknown scheduler '{s}': expected ddim, euler or dpmpp2m")),
        }
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Euler => "euler",
            SchedulerKind::DpmSolverPp2m => "dpmpp2m",
        })
    }
}

/// The coefficients of one step; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepCoefficients {
    /// `x0 = x0_sample·sample + x0_eps·eps`.
    pub x0_sample: f64,
    pub x0_eps: f64,
    /// `prev = sample·sample + eps·eps + x0·x0 + x0_prev·x0_prev`.
    pub sample: f64,
    pub eps: f64,
    pub x0: f64,
    pub x0_prev: f64,
}

impl StepCoefficients {
    /// Applies the step to CPU slices: overwrites `sample` with the previous (less noisy) sample and `x0`
    /// with this step's clean-sample prediction. `x0` holds the previous step's prediction on entry.
    pub fn apply(&self, sample: &mut [f32], eps: &[f32], x0: &mut [f32]) {
        for ((s, &e), x) in sample.iter_mut().zip(eps).zip(x0.iter_mut()) {
            let (sv, ev, prev) = (*s as f64, e as f64, *x as f64);
            let x0v = self.x0_sample * sv + self.x0_eps * ev;
            *s = (self.sample * sv + self.eps * ev + self.x0 * x0v + self.x0_prev * prev) as f32;
            *x = x0v as f32;
        }
    }
}

/// A scheduler set up for a number of inference steps.
#[derive(Debug, Clone)]
pub struct Scheduler {
    pub kind: SchedulerKind,
    /// The timesteps passed to the UNet, one per step (Euler's are fractional).
    pub timesteps: Vec<f64>,
    /// What the initial Gaussian noise is multiplied by.
    pub init_noise_sigma: f64,
    alphas_cumprod: Vec<f64>,
    /// Euler and DPM-Solver++: σ per step, plus the final σ = 0.
    sigmas: Vec<f64>,
}

/// `np.interp(x, arange(len(table)), table)`.
fn interp(x: f64, table: &[f64]) -> f64 {
    if x <= 0.0 {
        return table[0];
    }
    let i = x.floor() as usize;
    if i + 1 >= table.len() {
        return table[table.len() - 1];
    }
    let f = x - i as f64;
    table[i] * (1.0 - f) + table[i + 1] * f
}

/// `np.linspace(start, end, n)`.
fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    (0..n).map(|i| start + (end - start) * i as f64 / (n - 1) as f64).collect()
}

/// numpy's round-half-to-even, as `np.round` and `torch.round` do.
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

impl Scheduler {
    /// diffusers' `set_timesteps(steps)` for SD 1.5's settings.
    pub fn new(kind: SchedulerKind, steps: usize) -> Result<Scheduler> {
        ensure!((1..=TRAIN_TIMESTEPS).contains(&steps), "{kind}: {steps} inference steps is out of range 1..={TRAIN_TIMESTEPS}");
        let ac = alphas_cumprod();
        let sigma_table: Vec<f64> = ac.iter().map(|a| ((1.0 - a) / a).sqrt()).collect();
        let (timesteps, sigmas, init_noise_sigma) = match kind {
            SchedulerKind::Ddim => {
                let ratio = TRAIN_TIMESTEPS / steps;
                let t = (0..steps).rev().map(|i| (i * ratio + 1) as f64).collect();
                (t, Vec::new(), 1.0)
            }
            SchedulerKind::Euler => {
                let mut t = linspace(0.0, (TRAIN_TIMESTEPS - 1) as f64, steps);
                t.reverse();
                let mut s: Vec<f64> = t.iter().map(|&x| interp(x, &sigma_table)).collect();
                s.push(0.0);
                let init = s[0];
                (t, s, init)
            }
            SchedulerKind::DpmSolverPp2m => {
                let mut t: Vec<f64> = linspace(0.0, (TRAIN_TIMESTEPS - 1) as f64, steps + 1).into_iter().map(round_half_even).collect();
                t.reverse();
                t.pop();
                let mut s: Vec<f64> = t.iter().map(|&x| interp(x, &sigma_table)).collect();
                s.push(0.0);
                (t, s, 1.0)
            }
        };
        Ok(Scheduler { kind, timesteps, init_noise_sigma, alphas_cumprod: ac, sigmas })
    }

    pub fn steps(&self) -> usize {
        self.timesteps.len()
    }

    /// What the sample is multiplied by before it enters the UNet (`scale_model_input`).
    pub fn input_scale(&self, step: usize) -> f64 {
        match self.kind {
            SchedulerKind::Euler => 1.0 / (self.sigmas[step].powi(2) + 1.0).sqrt(),
            SchedulerKind::Ddim | SchedulerKind::DpmSolverPp2m => 1.0,
        }
    }

    /// The update of step `step` (0-based, in the order of `timesteps`).
    pub fn coefficients(&self, step: usize) -> StepCoefficients {
        let n = self.steps();
        assert!(step < n, "step {step} of a {n}-step schedule");
        match self.kind {
            SchedulerKind::Ddim => {
                let t = self.timesteps[step] as usize;
                let prev = t as isize - (TRAIN_TIMESTEPS / n) as isize;
                let a_t = self.alphas_cumprod[t];
                let a_prev = if prev >= 0 { self.alphas_cumprod[prev as usize] } else { self.alphas_cumprod[0] };
                StepCoefficients {
                    x0_sample: 1.0 / a_t.sqrt(),
                    x0_eps: -(1.0 - a_t).sqrt() / a_t.sqrt(),
                    sample: 0.0,
                    eps: (1.0 - a_prev).sqrt(),
                    x0: a_prev.sqrt(),
                    x0_prev: 0.0,
                }
            }
            SchedulerKind::Euler => {
                let (sigma, next) = (self.sigmas[step], self.sigmas[step + 1]);
                StepCoefficients { x0_sample: 1.0, x0_eps: -sigma, sample: 1.0, eps: next - sigma, x0: 0.0, x0_prev: 0.0 }
            }
            SchedulerKind::DpmSolverPp2m => {
                // diffusers' DPM-Solver++ works on the VP sample: alpha = 1/√(σ²+1), sigma_vp = σ·alpha,
                // lambda = ln(alpha) - ln(sigma_vp).
                let vp = |s: f64| {
                    let alpha = 1.0 / (s * s + 1.0).sqrt();
                    (alpha, s * alpha)
                };
                let lambda = |(a, s): (f64, f64)| a.ln() - s.ln();
                let (alpha_t, sigma_t) = vp(self.sigmas[step + 1]);
                let (alpha_s0, sigma_s0) = vp(self.sigmas[step]);
                let h = lambda((alpha_t, sigma_t)) - lambda((alpha_s0, sigma_s0));
                let phi = (-h).exp() - 1.0; // -> -1 at the final σ = 0, where h = ∞
                let x0_sample = 1.0 / alpha_s0;
                let x0_eps = -sigma_s0 / alpha_s0;
                // First order on the first step and (final sigma zero) on the last one.
                let first_order = step == 0 || step == n - 1;
                if first_order {
                    return StepCoefficients { x0_sample, x0_eps, sample: sigma_t / sigma_s0, eps: 0.0, x0: -alpha_t * phi, x0_prev: 0.0 };
                }
                let (alpha_s1, sigma_s1) = vp(self.sigmas[step - 1]);
                let r0 = (lambda((alpha_s0, sigma_s0)) - lambda((alpha_s1, sigma_s1))) / h;
                // x_t = (σt/σs0)·x − αt·φ·D0 − ½αt·φ·D1, D0 = m0, D1 = (m0 − m1)/r0.
                StepCoefficients {
                    x0_sample,
                    x0_eps,
                    sample: sigma_t / sigma_s0,
                    eps: 0.0,
                    x0: -alpha_t * phi * (1.0 + 0.5 / r0),
                    x0_prev: 0.5 * alpha_t * phi / r0,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd15_schedule_constants() {
        let ac = alphas_cumprod();
        assert!((ac[0] - (1.0 - 0.00085)).abs() < 1e-12);
        // FACTS: Euler's init_noise_sigma for 20 steps is 14.6146.
        let euler = Scheduler::new(SchedulerKind::Euler, 20).unwrap();
        assert!((euler.init_noise_sigma - 14.6146).abs() < 1e-3, "{}", euler.init_noise_sigma);
        assert_eq!(euler.timesteps[0], 999.0);
        let ddim = Scheduler::new(SchedulerKind::Ddim, 20).unwrap();
        assert_eq!(ddim.timesteps.first(), Some(&951.0));
        assert_eq!(ddim.timesteps.last(), Some(&1.0));
        let dpm = Scheduler::new(SchedulerKind::DpmSolverPp2m, 20).unwrap();
        assert_eq!(dpm.timesteps.first(), Some(&999.0));
        assert_eq!(dpm.timesteps.len(), 20);
        assert!(Scheduler::new(SchedulerKind::Ddim, 0).is_err());
    }

    #[test]
    fn round_half_even_matches_numpy() {
        for (x, r) in [(0.5, 0.0), (1.5, 2.0), (2.5, 2.0), (-0.5, 0.0), (-1.5, -2.0), (2.4, 2.0), (2.6, 3.0)] {
            assert_eq!(round_half_even(x), r, "{x}");
        }
    }
}
