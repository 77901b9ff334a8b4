//! sgdm: the Structure-Guided Diffusion Model engine (EEG-to-image reconstruction), with a CPU f32
//! reference backend and a CUDA backend of hand-written NVRTC-compiled kernels. docs/architecture.md draws
//! the data flow and the layer map.

#[cfg(target_endian = "big")]
compile_error!("sgdm reads and writes little-endian tensor files and assumes a little-endian host");

pub mod bench;
pub mod conformance;
pub mod data;
pub mod default_weights;
pub mod diffusion;
pub mod dtype;
pub mod evaluate;
pub mod memory;
pub mod metrics;
pub mod models;
pub mod nn;
pub mod ops;
pub mod pipeline;
pub mod profile;
pub mod reconstruct;
pub mod ridge;
pub mod runtime;
pub mod tensor;
pub mod train;
pub mod util;
pub mod weights;
pub mod weights_folder;

pub use memory::{Arena, MemoryPlan, Region};
pub use runtime::{Device, DeviceSpec};
pub use tensor::{DType, Tensor};
