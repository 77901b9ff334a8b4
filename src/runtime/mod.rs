//! The runtime: devices, the CUDA context and kernel pipeline, the memory arena and the inference pool.
pub mod arena;
pub mod blas;
pub mod cuda;
pub mod cudasim;
pub mod device;
pub mod kernel_signature;
pub mod kernel_table;
pub mod kernels;
pub mod pool;
pub mod probe;

pub use arena::{Arena, MemoryPlan, Region};
pub use device::{select, Device, DeviceSpec};
