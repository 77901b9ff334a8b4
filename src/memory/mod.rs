//! Memory above the tensors, two mechanisms and one interface: the parameter arena that long-lived state
//! (parameters, gradients, optimizer state) is carved from, the pool that every step's tensors are leased
//! from (a denoising step's as a training step's), and the allocator interface layers and ops take.
pub mod allocator;
pub mod arena;
pub mod pool;

pub use allocator::Allocator;
pub use arena::{Arena, MemoryPlan, Region};
