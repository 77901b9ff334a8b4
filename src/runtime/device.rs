//! Device selection: `auto`, `cpu`, `cuda`, `cuda:N`.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use crate::runtime::cuda::CudaDevice;
use crate::runtime::{cudasim, probe};

/// Where tensors live and ops run.
#[derive(Clone)]
pub enum Device {
    /// f32 reference backend.
    Cpu,
    /// bf16 storage, f32 accumulation.
    Cuda(Arc<CudaDevice>),
}

impl Device {
    pub fn is_cuda(&self) -> bool {
        matches!(self, Device::Cuda(_))
    }

    pub fn cuda(&self) -> Option<&Arc<CudaDevice>> {
        match self {
            Device::Cuda(d) => Some(d),
            Device::Cpu => None,
        }
    }

    /// Whether two handles name the same device.
    pub fn same(&self, other: &Device) -> bool {
        match (self, other) {
            (Device::Cpu, Device::Cpu) => true,
            (Device::Cuda(a), Device::Cuda(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// Whether this is the simulated CUDA device (`cuda-sim`): its results are checked CUDA semantics, its times
    /// are not GPU times.
    pub fn is_simulated(&self) -> bool {
        matches!(self, Device::Cuda(d) if d.simulated)
    }

    /// Waits for all queued work (a no-op on the CPU).
    pub fn synchronize(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(d) => d.synchronize(),
        }
    }
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(d) => write!(f, "{d:?}"),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(d) if d.simulated => write!(f, "cuda-sim"),
            Device::Cuda(d) => write!(f, "cuda:{}", d.ordinal),
        }
    }
}

/// What the user asked for with `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// CUDA device 0 when the driver, NVRTC and a GPU are all there; otherwise the CPU, with a notice.
    Auto,
    Cpu,
    Cuda(usize),
    /// The simulated CUDA device (cudasim/): the CUDA path on the host CPU, for correctness, never speed.
    CudaSim,
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<DeviceSpec, String> {
        match s.trim() {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            "cuda-sim" => Ok(DeviceSpec::CudaSim),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| format!("unknown device '{s}': expected auto, cpu, cuda, cuda:N or cuda-sim")),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => write!(f, "auto"),
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::CudaSim => write!(f, "cuda-sim"),
        }
    }
}

/// The device chosen, and for `auto` falling back to the CPU, the one-line reason.
pub struct Selected {
    pub device: Device,
    pub notice: Option<String>,
}

/// Opens the device `spec` names. An explicit `cuda` that cannot be opened is an error; `auto` falls back.
/// A process that has started the simulator (`cuda-sim`) has no real driver: `cuda` is then an error and
/// `auto` never picks the simulated device.
pub fn select(spec: DeviceSpec) -> Result<Selected> {
    match spec {
        DeviceSpec::Cpu => Ok(Selected { device: Device::Cpu, notice: None }),
        DeviceSpec::CudaSim => {
            cudasim::activate().context("starting the simulated CUDA device (--device cuda-sim)")?;
            Ok(Selected { device: Device::Cuda(CudaDevice::open(0)?), notice: None })
        }
        DeviceSpec::Cuda(n) => {
            if cudasim::active().is_some() {
                bail!("cuda:{n} cannot be opened: this process runs the simulated CUDA device (cuda-sim), which replaces the real driver");
            }
            Ok(Selected { device: Device::Cuda(CudaDevice::open(n)?), notice: None })
        }
        DeviceSpec::Auto => {
            let why = if cudasim::active().is_some() {
                "this process runs the simulated CUDA device, which auto never selects".to_string()
            } else {
                match probe::driver() {
                    Ok(d) if d.device_count == 0 => "the CUDA driver reports no GPU".to_string(),
                    Ok(_) => match CudaDevice::open(0) {
                        Ok(d) => return Ok(Selected { device: Device::Cuda(d), notice: None }),
                        Err(e) => format!("{e:#}"),
                    },
                    Err(e) => e,
                }
            };
            Ok(Selected { device: Device::Cpu, notice: Some(format!("sgdm: using the CPU ({why})")) })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs_parse() {
        assert_eq!("auto".parse::<DeviceSpec>(), Ok(DeviceSpec::Auto));
        assert_eq!("cpu".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(3)));
        assert_eq!("cuda-sim".parse::<DeviceSpec>(), Ok(DeviceSpec::CudaSim));
        assert_eq!(DeviceSpec::CudaSim.to_string(), "cuda-sim");
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            assert!(bad.parse::<DeviceSpec>().unwrap_err().contains("expected auto"), "{bad}");
        }
    }
}
