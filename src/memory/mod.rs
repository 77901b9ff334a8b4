//! Memory above the tensors: the arena that long-lived tensors are carved from and the pool that per-step
//! tensors are leased from.
pub mod arena;
pub mod pool;

pub use arena::{Arena, MemoryPlan, Region};
