//! Memory above the tensors: the arena that long-lived tensors are carved from, the pool that per-step
//! tensors are leased from, and the allocator interface over both.
pub mod allocator;
pub mod arena;
pub mod pool;

pub use allocator::Allocator;
pub use arena::{Arena, MemoryPlan, Region};
