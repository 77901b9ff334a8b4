//! The learning-rate schedule: linear warm-up to the peak, then a half-cosine decay to a floor, as a pure
//! function of the optimizer step (llm.c's schedule), so a resumed run needs nothing but the step count.

use anyhow::{ensure, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub peak_lr: f64,
    /// The floor the cosine decays to, reached at `total_steps` and kept after.
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl LrSchedule {
    pub fn new(peak_lr: f64, min_lr: f64, warmup_steps: u64, total_steps: u64) -> Result<LrSchedule> {
        ensure!(
            peak_lr.is_finite() && min_lr.is_finite() && 0.0 <= min_lr && min_lr <= peak_lr,
            "learning-rate schedule: need 0 <= min_lr ({min_lr}) <= peak_lr ({peak_lr})"
        );
        ensure!(
            warmup_steps <= total_steps && total_steps > 0,
            "learning-rate schedule: need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps}) and total_steps > 0"
        );
        Ok(LrSchedule { peak_lr, min_lr, warmup_steps, total_steps })
    }

    /// The rate for optimizer step `step`, counting from 0: `peak (step + 1) / warmup` during the warm-up
    /// (the first step already moves, none is wasted at rate 0), then
    /// `min + (peak - min) (1 + cos(pi (step - warmup) / (total - warmup))) / 2`, and `min` from `total` on.
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        if step >= self.total_steps {
            return self.min_lr;
        }
        let progress = (step - self.warmup_steps) as f64 / (self.total_steps - self.warmup_steps) as f64;
        self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}
