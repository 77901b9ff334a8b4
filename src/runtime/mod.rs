//! The runtime: devices, the CUDA context and kernel pipeline (NVRTC, the kernel cache and table), cuBLASLt,
//! and the simulated device.
pub mod blas;
pub mod cuda;
pub mod cudasim;
pub mod device;
pub mod kernel_signature;
pub mod kernel_table;
pub mod kernels;
pub mod probe;

pub use device::{select, Device, DeviceSpec};
