//! The parameter arena: long-lived state (parameters, gradients, optimizer state), one allocation per
//! region, sized by a plan made before the first step and carved into tensors by a bump pointer. Nothing is
//! allocated after `Arena::new` and nothing carved is ever freed before the arena: a carve that does not
//! fit the plan is an error, never a reallocation, so addresses stay stable for the whole run. Everything
//! that lives for one step comes from a [`super::pool::Pool`] instead.

use std::fmt;
use std::sync::Arc;

use anyhow::{bail, Result};

use crate::runtime::device::Device;
use crate::tensor::{DType, Storage, Tensor, ALIGN};

/// What a region holds; each lives for the whole run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Region {
    Params,
    Grads,
    /// The optimizer's moments, f32 master weights and norm buffers.
    Optimizer,
}

const REGIONS: usize = 3;

impl Region {
    pub const ALL: [Region; REGIONS] = [Region::Params, Region::Grads, Region::Optimizer];

    fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Region::Params => "params",
            Region::Grads => "grads",
            Region::Optimizer => "optimizer",
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
    bytes: [usize; REGIONS],
    tensors: [usize; REGIONS],
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
    carved: usize,
}

/// Usage of one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionUsage {
    pub region: Region,
    pub capacity: usize,
    pub used: usize,
    /// Tensors carved from it.
    pub tensors: usize,
}

/// Usage of every region, for `sgdm train`'s summary and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArenaReport {
    pub device: String,
    pub regions: Vec<RegionUsage>,
}

impl ArenaReport {
    pub fn total_capacity(&self) -> usize {
        self.regions.iter().map(|r| r.capacity).sum()
    }

    pub fn total_used(&self) -> usize {
        self.regions.iter().map(|r| r.used).sum()
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
        writeln!(f, "arena on {}: {:<12} {:>12} {:>12} {:>8}", self.device, "region", "planned", "used", "tensors")?;
        for r in &self.regions {
            writeln!(f, "  {:<12} {:>12} {:>12} {:>8}", r.region.name(), human_bytes(r.capacity), human_bytes(r.used), r.tensors)?;
        }
        let tensors: usize = self.regions.iter().map(|r| r.tensors).sum();
        write!(f, "  {:<12} {:>12} {:>12} {:>8}", "total", human_bytes(self.total_capacity()), human_bytes(self.total_used()), tensors)
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
                Ok(RegionState { storage: Storage::zeroed(device, capacity)?, capacity, top: 0, carved: 0 })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Arena { device: device.clone(), regions })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Carves a zeroed tensor from `region`; it lives as long as the arena's memory.
    pub fn alloc(&mut self, region: Region, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let bytes = shape.iter().product::<usize>() * dtype.size();
        let state = &mut self.regions[region.index()];
        let end = state.top + aligned(bytes);
        if end > state.capacity {
            bail!(
                "arena region '{}' is out of its planned {} bytes: carving {:?} {} ({} bytes) at offset {} \
                 (tensor #{}); the memory plan is too small",
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
        state.carved += 1;
        Ok(tensor)
    }

    /// `region` as an [`super::Allocator`]: what [`crate::nn::Grads::zeros`] and the optimizer take.
    pub fn region(&mut self, region: Region) -> Carve<'_> {
        Carve { arena: self, region }
    }

    pub fn usage(&self, region: Region) -> RegionUsage {
        let s = &self.regions[region.index()];
        RegionUsage { region, capacity: s.capacity, used: s.top, tensors: s.carved }
    }

    pub fn report(&self) -> ArenaReport {
        ArenaReport { device: self.device.to_string(), regions: Region::ALL.iter().map(|&r| self.usage(r)).collect() }
    }
}

/// One region of an [`Arena`] as an [`super::Allocator`]: tensors carved from it, zeroed, for the whole run.
pub struct Carve<'a> {
    arena: &'a mut Arena,
    region: Region,
}

impl super::Allocator for Carve<'_> {
    fn alloc(&mut self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.arena.alloc(self.region, shape, dtype)
    }
}
