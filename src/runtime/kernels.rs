//! The kernel pipeline: the embedded `kernels/*.cu` sources, NVRTC compilation to a cubin for one exact
//! `sm_XX`, the on-disk cubin cache, and the per-kernel resource report parsed from ptxas.
//!
//! Cubins, not PTX: PTX from a newer NVRTC is refused by an older driver, a cubin for the device's exact
//! architecture loads on any driver that supports that architecture.

use std::ffi::{c_char, CStr, CString};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

use crate::runtime::probe;
use crate::util::write_atomic;

/// A kernel source file embedded at build time.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedSource {
    pub name: &'static str,
    pub source: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/embedded_kernels.rs"));

/// The kernel sources the runtime compiles: the embedded ones, or, for kernel development without rebuilding
/// the binary, those in `$SGDM_KERNELS_DIR` (every file the embedded set has, read once per process). The
/// cache key covers the text, so edited kernels never load a stale cubin.
pub fn kernel_sources() -> Result<(&'static [EmbeddedSource], &'static [EmbeddedSource]), String> {
    type Loaded = Result<(Vec<EmbeddedSource>, Vec<EmbeddedSource>), String>;
    static SOURCES: OnceLock<Loaded> = OnceLock::new();
    let Some(dir) = std::env::var_os("SGDM_KERNELS_DIR").filter(|d| !d.is_empty()) else {
        return Ok((KERNEL_FILES, KERNEL_HEADERS));
    };
    let loaded = SOURCES.get_or_init(|| {
        let dir = PathBuf::from(dir);
        let read = |set: &[EmbeddedSource]| -> Result<Vec<EmbeddedSource>, String> {
            set.iter()
                .map(|f| {
                    let path = dir.join(f.name);
                    let text = std::fs::read_to_string(&path).map_err(|e| format!("SGDM_KERNELS_DIR: cannot read {}: {e}", path.display()))?;
                    Ok(EmbeddedSource { name: f.name, source: Box::leak(text.into_boxed_str()) })
                })
                .collect()
        };
        Ok((read(KERNEL_FILES)?, read(KERNEL_HEADERS)?))
    });
    match loaded {
        Ok((files, headers)) => Ok((files.as_slice(), headers.as_slice())),
        Err(e) => Err(e.clone()),
    }
}

/// Looks up a kernel file by name (`"elementwise.cu"`) among [`kernel_sources`].
pub fn kernel_file(name: &str) -> Result<&'static EmbeddedSource, String> {
    let (files, _) = kernel_sources()?;
    files.iter().find(|f| f.name == name).ok_or_else(|| format!("no kernel file kernels/{name} is embedded"))
}

fn kernel_headers() -> &'static [EmbeddedSource] {
    kernel_sources().map(|(_, h)| h).unwrap_or(KERNEL_HEADERS)
}

/// A GPU architecture NVRTC can target: `sm_90`, `sm_90a`, `sm_80`, ...
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Arch {
    pub major: u32,
    pub minor: u32,
    /// `sm_90a`: architecture-specific features (wgmma, setmaxnreg) that do not run on later GPUs.
    pub accelerated: bool,
}

impl Arch {
    pub fn new(major: u32, minor: u32) -> Arch {
        Arch { major, minor, accelerated: false }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sm_{}{}{}", self.major, self.minor, if self.accelerated { "a" } else { "" })
    }
}

impl FromStr for Arch {
    type Err = String;
    fn from_str(s: &str) -> Result<Arch, String> {
        let bad = || format!("'{s}' is not a GPU architecture: expected sm_XX or sm_XXa, e.g. sm_80, sm_90, sm_90a");
        let digits = s.trim().strip_prefix("sm_").ok_or_else(bad)?;
        let (digits, accelerated) = match digits.strip_suffix('a') {
            Some(d) => (d, true),
            None => (digits, false),
        };
        if !(2..=3).contains(&digits.len()) || !digits.chars().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        let (major, minor) = digits.split_at(digits.len() - 1);
        Ok(Arch { major: major.parse().map_err(|_| bad())?, minor: minor.parse().map_err(|_| bad())?, accelerated })
    }
}

/// Options every kernel file is compiled with. `-lineinfo` keeps source lines for Nsight Compute at no
/// runtime cost; `-v` to ptxas yields the per-kernel resource report.
fn compile_options(arch: Arch) -> Vec<String> {
    vec![format!("--gpu-architecture={arch}"), "-std=c++17".to_string(), "-lineinfo".to_string(), "--ptxas-options=-v".to_string()]
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("NVRTC is not available: {0}")]
    NvrtcUnavailable(String),
    #[error("NVRTC failed to compile kernels/{file} for {arch}:\n{log}")]
    Compile { file: String, arch: Arch, log: String },
    #[error("NVRTC call {call} failed for kernels/{file}: nvrtcResult {code}")]
    Nvrtc { file: String, call: &'static str, code: i32 },
}

/// Resources ptxas reported for one kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelResources {
    pub name: String,
    pub registers: u32,
    /// Static shared memory per block.
    pub shared_bytes: u32,
    /// Per-thread stack frame in local memory.
    pub stack_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
}

impl KernelResources {
    /// Bytes of local memory a thread touches: its stack frame, which holds any spills.
    pub fn local_bytes(&self) -> u32 {
        self.stack_bytes
    }
}

/// A compiled kernel file.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub file: &'static str,
    pub arch: Arch,
    pub cubin: Vec<u8>,
    /// NVRTC's log, including ptxas' resource report.
    pub log: String,
}

impl Compiled {
    pub fn resources(&self) -> Vec<KernelResources> {
        parse_ptxas_report(&self.log)
    }
}

fn first_number_before(text: &str, unit: &str) -> Option<u32> {
    let end = text.find(unit)?;
    text[..end].split(|c: char| !c.is_ascii_digit()).rfind(|s| !s.is_empty())?.parse().ok()
}

/// Parses ptxas' `-v` report (as NVRTC passes it through in the program log) into one entry per kernel.
pub fn parse_ptxas_report(log: &str) -> Vec<KernelResources> {
    let mut out: Vec<KernelResources> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            out.push(KernelResources { name, ..Default::default() });
            continue;
        }
        let Some(current) = out.last_mut() else { continue };
        if line.contains("bytes stack frame") {
            current.stack_bytes = first_number_before(line, "bytes stack frame").unwrap_or(0);
            current.spill_store_bytes = first_number_before(line, "bytes spill stores").unwrap_or(0);
            current.spill_load_bytes = first_number_before(line, "bytes spill loads").unwrap_or(0);
        } else if line.contains("Used ") && line.contains(" registers") {
            current.registers = first_number_before(line, " registers").unwrap_or(0);
            current.shared_bytes = first_number_before(line, " bytes smem").unwrap_or(0);
        }
    }
    out
}

fn nvrtc_check(file: &str, call: &'static str, rc: cudarc::nvrtc::sys::nvrtcResult) -> Result<(), KernelError> {
    if rc == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(KernelError::Nvrtc { file: file.to_string(), call, code: rc as i32 })
    }
}

/// Compiles one embedded kernel file to a cubin for `arch`. Needs libnvrtc, not a GPU.
pub fn compile(file: &'static EmbeddedSource, arch: Arch) -> Result<Compiled, KernelError> {
    probe::nvrtc().map_err(KernelError::NvrtcUnavailable)?;
    use cudarc::nvrtc::sys;
    let c = |s: &str| CString::new(s).expect("kernel sources and names hold no NUL byte");
    let source = c(file.source);
    let name = c(file.name);
    let header_sources: Vec<CString> = kernel_headers().iter().map(|h| c(h.source)).collect();
    let header_names: Vec<CString> = kernel_headers().iter().map(|h| c(h.name)).collect();
    let header_source_ptrs: Vec<*const c_char> = header_sources.iter().map(|s| s.as_ptr()).collect();
    let header_name_ptrs: Vec<*const c_char> = header_names.iter().map(|s| s.as_ptr()).collect();
    let options: Vec<CString> = compile_options(arch).iter().map(|o| c(o)).collect();
    let option_ptrs: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();

    // SAFETY: every pointer handed to NVRTC outlives the program, which is destroyed before returning;
    // the probe above checked that each symbol exists, so cudarc's loader does not panic.
    unsafe {
        let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
        nvrtc_check(
            file.name,
            "nvrtcCreateProgram",
            sys::nvrtcCreateProgram(
                &mut prog,
                source.as_ptr(),
                name.as_ptr(),
                header_source_ptrs.len() as i32,
                header_source_ptrs.as_ptr(),
                header_name_ptrs.as_ptr(),
            ),
        )?;
        let result = (|| {
            let rc = sys::nvrtcCompileProgram(prog, option_ptrs.len() as i32, option_ptrs.as_ptr());
            let mut log_size = 0usize;
            nvrtc_check(file.name, "nvrtcGetProgramLogSize", sys::nvrtcGetProgramLogSize(prog, &mut log_size))?;
            let mut log = vec![0 as c_char; log_size.max(1)];
            nvrtc_check(file.name, "nvrtcGetProgramLog", sys::nvrtcGetProgramLog(prog, log.as_mut_ptr()))?;
            let log = CStr::from_ptr(log.as_ptr()).to_string_lossy().into_owned();
            if rc != sys::nvrtcResult::NVRTC_SUCCESS {
                return Err(KernelError::Compile { file: file.name.to_string(), arch, log });
            }
            let mut size = 0usize;
            nvrtc_check(file.name, "nvrtcGetCUBINSize", sys::nvrtcGetCUBINSize(prog, &mut size))?;
            let mut cubin = vec![0u8; size];
            nvrtc_check(file.name, "nvrtcGetCUBIN", sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char))?;
            Ok(Compiled { file: file.name, arch, cubin, log })
        })();
        sys::nvrtcDestroyProgram(&mut prog);
        result
    }
}

/// Where cubins are cached: `$SGDM_CACHE_DIR`, else `$XDG_CACHE_HOME/sgdm`, else `~/.cache/sgdm`,
/// with a `kernels/` folder inside.
pub fn cache_dir() -> PathBuf {
    cache_root().join("kernels")
}

/// The folder of everything sgdm caches: `kernels/` (cubins) and `cudasim/` (the simulated device's libraries
/// and host-compiled kernels).
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("SGDM_CACHE_DIR").filter(|d| !d.is_empty()) {
        PathBuf::from(dir)
    } else if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        PathBuf::from(dir).join("sgdm")
    } else if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        PathBuf::from(home).join(".cache").join("sgdm")
    } else {
        std::env::temp_dir().join("sgdm-cache")
    }
}

/// Whether a cubin came from the cache or was compiled now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    Hit,
    Compiled,
}

/// The on-disk cubin cache, keyed by (source hash, arch, NVRTC version).
#[derive(Debug, Clone)]
pub struct KernelCache {
    dir: PathBuf,
}

impl KernelCache {
    pub fn new(dir: PathBuf) -> KernelCache {
        KernelCache { dir }
    }

    pub fn default_location() -> KernelCache {
        KernelCache::new(cache_dir())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cache file for a kernel file: the hash covers the file, every header and the compile options,
    /// so editing any of them misses the cache.
    pub fn path_for(&self, file: &EmbeddedSource, arch: Arch, nvrtc: (i32, i32)) -> PathBuf {
        let mut h = Sha256::new();
        h.update(file.name.as_bytes());
        h.update([0]);
        h.update(file.source.as_bytes());
        for header in kernel_headers() {
            h.update([0]);
            h.update(header.name.as_bytes());
            h.update([0]);
            h.update(header.source.as_bytes());
        }
        for option in compile_options(arch) {
            h.update([0]);
            h.update(option.as_bytes());
        }
        let digest = h.finalize();
        let hash: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        let stem = file.name.trim_end_matches(".cu");
        self.dir.join(format!("{stem}-{arch}-nvrtc{}.{}-{hash}.cubin", nvrtc.0, nvrtc.1))
    }

    /// Returns the cached cubin, or compiles and caches it. A cache that cannot be written costs a
    /// recompile next time, never a failure; a corrupt cache file is replaced.
    pub fn load_or_compile(&self, file: &'static EmbeddedSource, arch: Arch) -> Result<(Vec<u8>, CacheOutcome), KernelError> {
        let nvrtc = probe::nvrtc().map_err(KernelError::NvrtcUnavailable)?;
        let path = self.path_for(file, arch, nvrtc.version);
        if let Ok(bytes) = std::fs::read(&path) {
            if bytes.starts_with(b"\x7fELF") {
                return Ok((bytes, CacheOutcome::Hit));
            }
        }
        let compiled = compile(file, arch)?;
        if let Err(e) = std::fs::create_dir_all(&self.dir).and_then(|_| write_atomic(&path, &compiled.cubin)) {
            eprintln!("sgdm: warning: cannot write the kernel cache {}: {e}", path.display());
        }
        Ok((compiled.cubin, CacheOutcome::Compiled))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_parses_and_prints() {
        assert_eq!("sm_90".parse::<Arch>().unwrap(), Arch::new(9, 0));
        assert_eq!("sm_80".parse::<Arch>().unwrap().to_string(), "sm_80");
        assert_eq!("sm_90a".parse::<Arch>().unwrap().to_string(), "sm_90a");
        assert_eq!("sm_100".parse::<Arch>().unwrap(), Arch::new(10, 0));
        for bad in ["90", "sm90", "sm_", "sm_9", "sm_9x", "compute_90"] {
            assert!(bad.parse::<Arch>().is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn ptxas_report_is_parsed_per_kernel() {
        let log = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'spill' for 'sm_90'\n\
ptxas info    : Function properties for spill\n\
ptxas         .     256 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n\
ptxas info    : Used 32 registers, used 0 barriers, 256 bytes cumulative stack size\n\
ptxas info    : Compiling entry function 'k' for 'sm_90'\n\
ptxas info    : Function properties for k\n\
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 10 registers, used 1 barriers, 1024 bytes smem, 360 bytes cmem[0]\n";
        let r = parse_ptxas_report(log);
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            KernelResources { name: "spill".into(), registers: 32, shared_bytes: 0, stack_bytes: 256, spill_store_bytes: 8, spill_load_bytes: 12 }
        );
        assert_eq!((r[1].name.as_str(), r[1].registers, r[1].shared_bytes), ("k", 10, 1024));
    }
}
