//! Per-op-family accounting for `sgdm profile`: while enabled, each instrumented op entry point (see
//! [`scope`]) adds its wall time, the FLOPs and the bytes its shapes imply to its family's totals.
//!
//! On CUDA a scope synchronises the device when it opens and when it closes, so each op's time is its own
//! (launch overhead included); this serialises the stream, so `sgdm profile` also times the same steps
//! without scopes and reports both. Nested scopes (an op built from other ops) count once, in the
//! outermost. When profiling is off a scope costs one relaxed atomic load.
//!
//! FLOPs count a multiply-add as 2 and are the algorithm's (not the kernel's: padding and recomputation are
//! not counted); bytes are the tensors the op must read and write once each, its minimum traffic.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crate::runtime::Device;

/// The op families of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    Conv,
    Gemm,
    Attention,
    Norm,
    Elementwise,
    Softmax,
    Shape,
}

pub const FAMILIES: [Family; 7] = [Family::Conv, Family::Gemm, Family::Attention, Family::Norm, Family::Elementwise, Family::Softmax, Family::Shape];

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Conv => "conv",
            Family::Gemm => "gemm",
            Family::Attention => "attention",
            Family::Norm => "norm",
            Family::Elementwise => "elementwise",
            Family::Softmax => "softmax",
            Family::Shape => "shape",
        }
    }
}

/// One family's totals.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Totals {
    pub calls: u64,
    pub seconds: f64,
    pub flops: f64,
    pub bytes: f64,
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<[Totals; 7]> = Mutex::new([Totals { calls: 0, seconds: 0.0, flops: 0.0, bytes: 0.0 }; 7]);

thread_local! {
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Starts accounting from zero.
pub fn start() {
    *TOTALS.lock().unwrap_or_else(|e| e.into_inner()) = Default::default();
    ENABLED.store(true, Ordering::SeqCst);
}

/// Stops accounting and returns each family's totals, in [`FAMILIES`] order.
pub fn stop() -> [Totals; 7] {
    ENABLED.store(false, Ordering::SeqCst);
    *TOTALS.lock().unwrap_or_else(|e| e.into_inner())
}

/// An open scope; its time is recorded when it is dropped.
pub struct Scope {
    family: Family,
    flops: f64,
    bytes: f64,
    device: Device,
    start: Instant,
}

/// Opens a scope for one call of an op of `family`; `what` gives its device, FLOPs and bytes and runs only
/// when profiling is on (otherwise the scope is None and costs nothing more).
pub fn scope(family: Family, what: impl FnOnce() -> (Device, f64, f64)) -> Option<Scope> {
    if !ENABLED.load(Ordering::Relaxed) {
        return None;
    }
    let (device, flops, bytes) = what();
    let device = &device;
    let outer = DEPTH.with(|d| {
        let v = d.get();
        d.set(v + 1);
        v > 0
    });
    if outer {
        return Some(Scope { family, flops: -1.0, bytes: 0.0, device: device.clone(), start: Instant::now() });
    }
    let _ = device.synchronize();
    Some(Scope { family, flops, bytes, device: device.clone(), start: Instant::now() })
}

impl Drop for Scope {
    fn drop(&mut self) {
        DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
        if self.flops < 0.0 {
            return;
        }
        let _ = self.device.synchronize();
        let seconds = self.start.elapsed().as_secs_f64();
        let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
        let t = &mut totals[FAMILIES.iter().position(|f| *f == self.family).unwrap_or(0)];
        t.calls += 1;
        t.seconds += seconds;
        t.flops += self.flops;
        t.bytes += self.bytes;
    }
}

/// Bytes of tensors with these element counts at `elem` bytes each.
pub fn bytes_of(numels: &[usize], elem: usize) -> f64 {
    numels.iter().sum::<usize>() as f64 * elem as f64
}
