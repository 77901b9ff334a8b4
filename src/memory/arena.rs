//! The memory arena: one allocation per region (parameters, gradients, optimizer state, activations,
//! scratch), sized by a plan made before the first step and carved into tensors by a bump pointer.
//! Nothing is allocated after `Arena::new`: a carve that does not fit the plan is an error, never a
//! reallocation, so addresses stay stable (a denoising step can be captured as a CUDA graph).

use std::fmt;
use std::sync::Arc;

use anyhow::{bail, Result};

use crate::runtime::device::Device;
use crate::tensor::{DType, Storage, Tensor, ALIGN};

/// What a region holds. Parameters, gradients and optimizer state live for the whole run; activations and
/// scratch are reset between steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Region {
    Params,
    Grads,
    Optimizer,
    Activations,
    Scratch,
}

impl Region {
    pub const ALL: [Region; 5] = [Region::Params, Region::Grads, Region::Optimizer, Region::Activations, Region::Scratch];

    fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Region::Params => "params",
            Region::Grads => "grads",
            Region::Optimizer => "optimizer",
            Region::Activations => "activations",
            Region::Scratch => "scratch",
        }
    }
}

/// Rounds a byte count up to the arena alignment.
pub fn aligned(bytes: usize) -> usize {
    bytes.div_ceil(ALIGN) * ALIGN
}

/// The bytes each region needs, summed from every tensor that will be carved from it (each rounded up to
/// the alignment). Build it by reserving exactly what the step will carve.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryPlan {
    bytes: [usize; 5],
    tensors: [usize; 5],
}

impl MemoryPlan {
    pub fn new() -> MemoryPlan {
        MemoryPlan::default()
    }

    /// Reserves room for one tensor.
    pub fn reserve(&mut self, region: Region, shape: &[usize], dtype: DType) -> &mut MemoryPlan {
        self.reserve_bytes(region, shape.iter().product::<usize>() * dtype.size())
    }

    pub fn reserve_bytes(&mut self, region: Region, bytes: usize) -> &mut MemoryPlan {
        self.bytes[region.index()] += aligned(bytes);
        self.tensors[region.index()] += 1;
        self
    }

    /// A region sized for the larger of two alternatives that never live at the same time.
    pub fn max(&self, other: &MemoryPlan) -> MemoryPlan {
        let mut out = self.clone();
        for r in 0..5 {
            out.bytes[r] = out.bytes[r].max(other.bytes[r]);
            out.tensors[r] = out.tensors[r].max(other.tensors[r]);
        }
        out
    }

    pub fn bytes(&self, region: Region) -> usize {
        self.bytes[region.index()]
    }

    pub fn total_bytes(&self) -> usize {
        self.bytes.iter().sum()
    }
}

struct RegionState {
    storage: Arc<Storage>,
    capacity: usize,
    top: usize,
    peak: usize,
    carved: usize,
}

/// Usage of one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionUsage {
    pub region: Region,
    pub capacity: usize,
    pub used: usize,
    pub peak: usize,
}

/// Usage of every region, for `sgdm profile` and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArenaReport {
    pub device: String,
    pub regions: Vec<RegionUsage>,
}

impl ArenaReport {
    pub fn total_capacity(&self) -> usize {
        self.regions.iter().map(|r| r.capacity).sum()
    }

    pub fn total_peak(&self) -> usize {
        self.regions.iter().map(|r| r.peak).sum()
    }
}

/// Formats a byte count with a binary unit.
pub fn human_bytes(bytes: usize) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

impl fmt::Display for ArenaReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "arena on {}: {:<12} {:>12} {:>12}", self.device, "region", "planned", "peak")?;
        for r in &self.regions {
            writeln!(f, "  {:<12} {:>12} {:>12}", r.region.name(), human_bytes(r.capacity), human_bytes(r.peak))?;
        }
        write!(f, "  {:<12} {:>12} {:>12}", "total", human_bytes(self.total_capacity()), human_bytes(self.total_peak()))
    }
}

/// Region storage for one device; see the module docs.
pub struct Arena {
    device: Device,
    regions: Vec<RegionState>,
}

impl Arena {
    /// Allocates every region once, at the size the plan gives.
    pub fn new(device: &Device, plan: &MemoryPlan) -> Result<Arena> {
        let regions = Region::ALL
            .iter()
            .map(|&r| {
                let capacity = plan.bytes(r);
                Ok(RegionState { storage: Storage::zeroed(device, capacity)?, capacity, top: 0, peak: 0, carved: 0 })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Arena { device: device.clone(), regions })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Carves a tensor from `region`. Its memory is zero only the first time it is handed out.
    pub fn alloc(&mut self, region: Region, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let bytes = shape.iter().product::<usize>() * dtype.size();
        let state = &mut self.regions[region.index()];
        let end = state.top + aligned(bytes);
        if end > state.capacity {
            bail!(
                "arena region '{}' is out of its planned {} bytes: carving {:?} {} ({} bytes) at offset {} \
                 (tensor #{} since the last reset); the memory plan for this step is too small",
                region.name(),
                state.capacity,
                shape,
                dtype,
                bytes,
                state.top,
                state.carved + 1
            );
        }
        let tensor = Tensor::carve(state.storage.clone(), state.top, shape, dtype);
        state.top = end;
        state.peak = state.peak.max(end);
        state.carved += 1;
        Ok(tensor)
    }

    /// Frees everything carved from `region` at once. Tensors carved before become invalid: using one is
    /// an error.
    pub fn reset(&mut self, region: Region) {
        let state = &mut self.regions[region.index()];
        state.storage.bump_generation();
        state.top = 0;
        state.carved = 0;
    }

    /// Resets the per-step regions (activations and scratch).
    pub fn reset_step(&mut self) {
        self.reset(Region::Activations);
        self.reset(Region::Scratch);
    }

    pub fn usage(&self, region: Region) -> RegionUsage {
        let s = &self.regions[region.index()];
        RegionUsage { region, capacity: s.capacity, used: s.top, peak: s.peak }
    }

    pub fn report(&self) -> ArenaReport {
        ArenaReport { device: self.device.to_string(), regions: Region::ALL.iter().map(|&r| self.usage(r)).collect() }
    }
}
