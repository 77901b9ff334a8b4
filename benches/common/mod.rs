//! What the benches share: the devices each one measures on.

use sgdm::runtime::select;
use sgdm::{DType, Device, DeviceSpec};

/// The CPU in f32 and, when a GPU is usable, CUDA in each of `cuda_dtypes` (named `cuda-bf16`, ...); without
/// a GPU, a SKIPPED line naming `what` and the reason. Never the simulated device: its times measure nothing.
pub fn devices(what: &str, cuda_dtypes: &[DType]) -> Vec<(String, Device, DType)> {
    let mut out = vec![("cpu-f32".to_string(), Device::Cpu, DType::F32)];
    match select(DeviceSpec::Cuda(0)) {
        Ok(s) => out.extend(cuda_dtypes.iter().map(|&d| (format!("cuda-{d}"), s.device.clone(), d))),
        Err(e) => eprintln!("SKIPPED: CUDA {what} benches: they need a GPU (the simulated device measures no time): {e:#}"),
    }
    out
}
