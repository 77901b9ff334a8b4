//! What a training run reports: a JSONL log with one object per logged step (flushed at once, so a crash
//! or Ctrl-C loses nothing logged), and a one-line progress display on stderr.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// One logged step. `losses` are named (`total`, `recon`, `kl`, ...) and written in order.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRecord {
    pub step: u64,
    pub losses: Vec<(String, f64)>,
    pub lr: f64,
    pub grad_norm: f64,
    /// Optimizer steps per second since the previous logged step (or the log's start).
    pub steps_per_s: f64,
    /// Seconds since the log was opened (this process's part of the run).
    pub wall_s: f64,
}

impl StepRecord {
    fn to_json(&self) -> serde_json::Value {
        let losses: serde_json::Map<String, serde_json::Value> = self.losses.iter().map(|(k, v)| (k.clone(), serde_json::json!(v))).collect();
        serde_json::json!({
            "step": self.step,
            "loss": losses,
            "lr": self.lr,
            "grad_norm": self.grad_norm,
            "steps_per_s": self.steps_per_s,
            "wall_s": self.wall_s,
        })
    }
}

/// The JSONL log of a run. A resumed run appends to the log of the run it continues.
pub struct StepLog {
    path: PathBuf,
    out: BufWriter<File>,
    start: Instant,
    /// The previous logged step and when it was logged: the rate's reference.
    last: (u64, Instant),
}

impl StepLog {
    /// Opens `path` for appending (created if absent), for a run starting at `first_step` (0, or the step
    /// it resumes from).
    pub fn open(path: impl AsRef<Path>, first_step: u64) -> Result<StepLog> {
        let path = path.as_ref().to_path_buf();
        let file =
            OpenOptions::new().create(true).append(true).open(&path).with_context(|| format!("{}: cannot open the training log", path.display()))?;
        let start = Instant::now();
        Ok(StepLog { path, out: BufWriter::new(file), start, last: (first_step, start) })
    }

    /// Appends one line for `step` (optimizer steps taken) and flushes it; returns the record written.
    pub fn log(&mut self, step: u64, losses: &[(&str, f64)], lr: f64, grad_norm: f64) -> Result<StepRecord> {
        let now = Instant::now();
        let (since_step, since) = self.last;
        let elapsed = now.duration_since(since).as_secs_f64();
        let steps_per_s = if elapsed > 0.0 { step.saturating_sub(since_step) as f64 / elapsed } else { 0.0 };
        self.last = (step, now);
        let record = StepRecord {
            step,
            losses: losses.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            lr,
            grad_norm,
            steps_per_s,
            wall_s: now.duration_since(self.start).as_secs_f64(),
        };
        let write = |out: &mut BufWriter<File>| -> std::io::Result<()> {
            serde_json::to_writer(&mut *out, &record.to_json())?;
            out.write_all(b"\n")?;
            out.flush()
        };
        write(&mut self.out).with_context(|| format!("{}: cannot write the training log", self.path.display()))?;
        Ok(record)
    }
}

/// A progress line on stderr (`step 120/1000  loss 0.1234  3.2 steps/s  ETA 4m35s`), redrawn in place at
/// most a few times a second. A few lines of our own: a progress-bar crate would add a dependency for one
/// line of text.
pub struct Progress {
    total: u64,
    first_step: u64,
    start: Instant,
    drawer: crate::util::LineDrawer,
}

impl Progress {
    /// A run going from `first_step` (0, or the step resumed from) to `total` optimizer steps.
    pub fn new(first_step: u64, total: u64) -> Progress {
        Progress { total, first_step, start: Instant::now(), drawer: crate::util::LineDrawer::new() }
    }

    /// The line for `step` (steps taken) with `loss`; rates count only this process's steps.
    pub fn line(&self, step: u64, loss: f64) -> String {
        let elapsed = self.start.elapsed().as_secs_f64();
        let done = step.saturating_sub(self.first_step);
        let rate = if elapsed > 0.0 { done as f64 / elapsed } else { 0.0 };
        let eta = if rate > 0.0 {
            crate::util::format_duration(Duration::from_secs_f64(self.total.saturating_sub(step) as f64 / rate))
        } else {
            "?".to_string()
        };
        format!("step {step}/{}  loss {loss:.4}  {rate:.2} steps/s  ETA {eta}", self.total)
    }

    /// Redraws the line when due (see [`crate::util::LineDrawer`]), and at the last step.
    pub fn update(&mut self, step: u64, loss: f64) {
        let line = self.line(step, loss);
        self.drawer.draw(step >= self.total, || line);
    }
}
