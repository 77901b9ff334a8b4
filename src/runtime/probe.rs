//! Finds libcuda and libnvrtc and checks them before cudarc touches them. cudarc panics when a library or
//! one of its symbols is missing; this module returns an error that names what is missing instead.
//! It opens the same file names, in the same order, that cudarc's dynamic loader tries.

use std::ffi::c_int;

use libloading::Library;

/// cudarc is built with its `cuda-13000` feature: the driver must implement the CUDA 13.0 API
/// (NVIDIA driver 580 or newer).
pub const MIN_DRIVER_VERSION: i32 = 13000;
/// Oldest NVRTC that knows Hopper (sm_90) and can emit cubins.
pub const MIN_NVRTC_VERSION: (i32, i32) = (12, 0);

/// Every driver function the engine calls, through cudarc or directly: a library without one of them is too old
/// (cudarc would panic at the call). tests/cudasim.rs holds this list to what the simulated driver records
/// the engine calling.
pub const DRIVER_SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDriverGetVersion",
    "cuGetErrorString",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetName",
    "cuDeviceGetAttribute",
    "cuDeviceTotalMem_v2",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxGetCurrent",
    "cuCtxSetCurrent",
    "cuMemGetInfo_v2",
    "cuStreamCreate",
    "cuStreamDestroy_v2",
    "cuStreamSynchronize",
    "cuStreamBeginCapture_v2",
    "cuStreamEndCapture",
    "cuEventCreate",
    "cuEventDestroy_v2",
    "cuEventRecord",
    "cuEventSynchronize",
    "cuEventElapsedTime_v2",
    "cuMemAllocAsync",
    "cuMemFreeAsync",
    "cuMemcpyHtoDAsync_v2",
    "cuMemcpyDtoHAsync_v2",
    "cuMemsetD8Async",
    "cuModuleLoadData",
    "cuModuleUnload",
    "cuModuleGetFunction",
    "cuLaunchKernel",
    "cuGraphInstantiateWithFlags",
    "cuGraphUpload",
    "cuGraphLaunch",
    "cuGraphExecDestroy",
    "cuGraphDestroy",
];

const NVRTC_SYMBOLS: &[&str] = &[
    "nvrtcVersion",
    "nvrtcCreateProgram",
    "nvrtcCompileProgram",
    "nvrtcDestroyProgram",
    "nvrtcGetProgramLogSize",
    "nvrtcGetProgramLog",
    "nvrtcGetCUBINSize",
    "nvrtcGetCUBIN",
];

const CUBLASLT_SYMBOLS: &[&str] = &[
    "cublasLtCreate",
    "cublasLtDestroy",
    "cublasLtMatmul",
    "cublasLtMatmulDescCreate",
    "cublasLtMatmulDescDestroy",
    "cublasLtMatmulDescSetAttribute",
    "cublasLtMatrixLayoutCreate",
    "cublasLtMatrixLayoutDestroy",
    "cublasLtMatrixLayoutSetAttribute",
    "cublasLtMatmulPreferenceCreate",
    "cublasLtMatmulPreferenceDestroy",
    "cublasLtMatmulPreferenceSetAttribute",
    "cublasLtMatmulAlgoGetHeuristic",
];

/// What the driver probe found.
#[derive(Debug, Clone)]
pub struct DriverInfo {
    /// The file name that loaded, e.g. `libcuda.so.1`.
    pub library: String,
    /// As `cuDriverGetVersion` reports it: 13000 for CUDA 13.0.
    pub version: i32,
    pub device_count: usize,
    /// The library is the CUDA simulator's stand-in driver (cudasim/), not NVIDIA's.
    pub simulated: bool,
}

/// What the NVRTC probe found.
#[derive(Debug, Clone)]
pub struct NvrtcInfo {
    pub library: String,
    pub version: (i32, i32),
}

/// Formats a `cuDriverGetVersion` number as `major.minor`.
pub fn format_driver_version(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// Checks a driver version against what cudarc was built for.
pub fn check_driver_version(version: i32) -> Result<(), String> {
    if version < MIN_DRIVER_VERSION {
        return Err(format!(
            "the CUDA driver supports CUDA {} but sgdm needs CUDA {} or newer (NVIDIA driver 580+)",
            format_driver_version(version),
            format_driver_version(MIN_DRIVER_VERSION)
        ));
    }
    Ok(())
}

/// Checks an NVRTC version against the oldest one we can use.
pub fn check_nvrtc_version(version: (i32, i32)) -> Result<(), String> {
    if version < MIN_NVRTC_VERSION {
        return Err(format!(
            "NVRTC {}.{} is too old: sgdm needs NVRTC {}.{} or newer",
            version.0, version.1, MIN_NVRTC_VERSION.0, MIN_NVRTC_VERSION.1
        ));
    }
    Ok(())
}

fn open_library(stem: &str, hint: &str) -> Result<(Library, String), String> {
    let candidates = cudarc::get_lib_name_candidates(stem);
    for name in &candidates {
        // SAFETY: loading a shared library runs its initialisers; these are NVIDIA's own libraries, the same
        // ones cudarc would load.
        if let Ok(lib) = unsafe { Library::new(name) } {
            return Ok((lib, name.clone()));
        }
    }
    Err(format!("no lib{stem}.so could be loaded from the library path; {hint}"))
}

fn check_symbols(lib: &Library, library: &str, symbols: &[&str]) -> Result<(), String> {
    let missing: Vec<&str> = symbols
        .iter()
        .copied()
        // SAFETY: the symbol is only looked up, never called, here.
        .filter(|s| unsafe { lib.get::<*const ()>(s.as_bytes()) }.is_err())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("{library} lacks {} (too old a library?)", missing.join(", ")))
    }
}

/// Loads libcuda, checks its version and counts devices. Never panics.
pub fn driver() -> Result<DriverInfo, String> {
    let (lib, library) = open_library("cuda", "is an NVIDIA driver installed?")?;
    check_symbols(&lib, &library, DRIVER_SYMBOLS)?;
    // SAFETY: only the symbol's presence is checked.
    let simulated = unsafe { lib.get::<*const ()>(b"cudasim_identity") }.is_ok();
    type GetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;
    type Init = unsafe extern "C" fn(u32) -> c_int;
    type GetCount = unsafe extern "C" fn(*mut c_int) -> c_int;
    // SAFETY: the signatures are those of the CUDA driver API; the symbols were checked above.
    let info = unsafe {
        let get_version = lib.get::<GetVersion>(b"cuDriverGetVersion").map_err(|e| e.to_string())?;
        let mut version = 0;
        let rc = get_version(&mut version);
        if rc != 0 {
            return Err(format!("cuDriverGetVersion failed with CUresult {rc}"));
        }
        check_driver_version(version)?;
        let init = lib.get::<Init>(b"cuInit").map_err(|e| e.to_string())?;
        match init(0) {
            0 => {}
            100 => return Err("the CUDA driver found no device (CUDA_ERROR_NO_DEVICE)".into()),
            rc => return Err(format!("cuInit failed with CUresult {rc}")),
        }
        let get_count = lib.get::<GetCount>(b"cuDeviceGetCount").map_err(|e| e.to_string())?;
        let mut count = 0;
        let rc = get_count(&mut count);
        if rc != 0 {
            return Err(format!("cuDeviceGetCount failed with CUresult {rc}"));
        }
        DriverInfo { library, version, device_count: count.max(0) as usize, simulated }
    };
    // The driver is initialised now: never unload it (unloading an initialised libcuda has crashed other
    // programs in dlclose; cudarc loads the same library again, so keeping it costs nothing).
    std::mem::forget(lib);
    Ok(info)
}

/// Loads libnvrtc and checks its version. Works without a GPU. Never panics.
pub fn nvrtc() -> Result<NvrtcInfo, String> {
    let (lib, library) = open_library(
        "nvrtc",
        "install the CUDA toolkit or `pip install nvidia-cuda-nvrtc` and add its lib folder \
         (site-packages/nvidia/cu13/lib) to LD_LIBRARY_PATH",
    )?;
    check_symbols(&lib, &library, NVRTC_SYMBOLS)?;
    type Version = unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int;
    // SAFETY: nvrtcVersion(int*, int*) is NVRTC's documented signature; the symbol was checked above.
    let version = unsafe {
        let f = lib.get::<Version>(b"nvrtcVersion").map_err(|e| e.to_string())?;
        let (mut major, mut minor) = (0, 0);
        let rc = f(&mut major, &mut minor);
        if rc != 0 {
            return Err(format!("nvrtcVersion failed with nvrtcResult {rc}"));
        }
        (major, minor)
    };
    check_nvrtc_version(version)?;
    Ok(NvrtcInfo { library, version })
}

/// Checks that libcublasLt loads and has every function we call. Returns the file name that loaded.
pub fn cublaslt() -> Result<String, String> {
    let (lib, library) =
        open_library("cublasLt", "install the CUDA toolkit or `pip install nvidia-cublas` and add its lib folder to LD_LIBRARY_PATH")?;
    check_symbols(&lib, &library, CUBLASLT_SYMBOLS)?;
    Ok(library)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_versions_below_13_0_are_refused() {
        assert!(check_driver_version(12080).unwrap_err().contains("CUDA 12.8"));
        assert!(check_driver_version(13000).is_ok());
        assert!(check_driver_version(13020).is_ok());
    }

    #[test]
    fn nvrtc_versions_below_12_0_are_refused() {
        assert!(check_nvrtc_version((11, 8)).is_err());
        assert!(check_nvrtc_version((12, 0)).is_ok());
        assert!(check_nvrtc_version((13, 0)).is_ok());
    }
}
