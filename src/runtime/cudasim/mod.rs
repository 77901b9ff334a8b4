//! The simulated CUDA device (`--device cuda-sim`, `SGDM_DEVICE=cuda-sim` in tests): the engine's ordinary
//! CUDA path, unchanged, on a stand-in driver. Activation loads the simulator's `libcuda.so` and
//! `libcublasLt.so` (built from cudasim/ by build.rs and embedded in the binary) under the names cudarc loads,
//! and compiles every kernel file for the host as a "twin" of its cubin (cached like cubins). From then on
//! cudarc, NVRTC's cubins, the launchers and cuBLASLt calls all take their usual route; each launch runs the
//! twin of the kernel the cubin names, on the SIMT executor. It proves logic, launches and memory safety,
//! never speed: no simulated time is a GPU number. What it models and what not: cudasim/README.md.
//!
//! A process either simulates or uses a real driver: activation refuses when a CUDA driver is already loaded.
//!
//! Settings (environment, read at activation):
//! - `SGDM_SIM_CHECK`: `off` (default), `memory` (twins instrumented: every access checked for shared-memory
//!   races, out-of-bounds and misaligned accesses), `asan` (AddressSanitizer + UBSan; the process must be
//!   started with `LD_PRELOAD=$(c++ -print-file-name=libasan.so)`).
//! - `SGDM_SIM_SYNC=1`: run every call at once instead of deferring queued work to synchronisation points.
//! - `SGDM_SIM_ORDER`: `forward` (default), `reverse` or `random[:SEED]` order of threads and blocks.
//! - `SGDM_SIM_SHARED_FILL`: `nan` (default) or `zero`, what shared memory holds at block start.
//! - `SGDM_SIM_MEMORY`: the device memory the simulator reports and enforces, in bytes or with a unit
//!   (`8GiB`); default 80 GiB.
//! - `SGDM_SIM_TIMES=1`: print the host time spent per kernel at exit (to make simulated tests faster).

pub mod twin;

use std::ffi::{c_char, c_int, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_LAZY, RTLD_NOW};
use sha2::{Digest, Sha256};

use crate::runtime::kernels::{cache_root, kernel_sources, EmbeddedSource};
use crate::util::write_atomic;

/// The simulator's libraries as build.rs embedded them.
pub struct Libraries {
    pub driver: &'static [u8],
    pub cublaslt: &'static [u8],
    pub kernel_header: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/cudasim_embedded.rs"));

/// glibc's RTLD_NOLOAD: open only if already loaded.
const RTLD_NOLOAD: c_int = 4;

/// Which twin build runs the kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// `-O2`: fastest; catches numeric, launch, barrier, collective and pointer-argument errors.
    Off,
    /// Instrumented twins: every access checked (shared-memory races, bounds, alignment).
    Memory,
    /// AddressSanitizer and UBSan in the twins.
    Asan,
}

impl Check {
    fn name(self) -> &'static str {
        match self {
            Check::Off => "off",
            Check::Memory => "memory",
            Check::Asan => "asan",
        }
    }

    fn flags(self) -> &'static [&'static str] {
        match self {
            Check::Off => &["-O2"],
            Check::Memory => &["-O2", "-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0"],
            Check::Asan => &["-O1", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Forward,
    Reverse,
    Random(u64),
}

/// How the simulator runs, from `SGDM_SIM_*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub check: Check,
    pub deferred: bool,
    pub order: Order,
    pub shared_fill_nan: bool,
    pub memory_bytes: Option<u64>,
    /// Print the host time spent in each kernel when the process exits (`SGDM_SIM_TIMES=1`): for making
    /// simulated tests faster, never a GPU time.
    pub report_times: bool,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Bytes from `123`, `8GiB`, `512MiB`, `2GB`.
fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

impl Settings {
    pub fn from_env() -> Result<Settings> {
        let check = match env("SGDM_SIM_CHECK").as_deref() {
            None | Some("off") => Check::Off,
            Some("memory") => Check::Memory,
            Some("asan") => Check::Asan,
            Some(other) => bail!("SGDM_SIM_CHECK={other}: expected off, memory or asan"),
        };
        let deferred = match env("SGDM_SIM_SYNC").as_deref() {
            None | Some("0") => true,
            Some("1") => false,
            Some(other) => bail!("SGDM_SIM_SYNC={other}: expected 0 or 1"),
        };
        let order = match env("SGDM_SIM_ORDER").as_deref() {
            None | Some("forward") => Order::Forward,
            Some("reverse") => Order::Reverse,
            Some("random") => Order::Random(1),
            Some(o) => match o.strip_prefix("random:").and_then(|s| s.parse().ok()) {
                Some(seed) => Order::Random(seed),
                None => bail!("SGDM_SIM_ORDER={o}: expected forward, reverse, random or random:SEED"),
            },
        };
        let shared_fill_nan = match env("SGDM_SIM_SHARED_FILL").as_deref() {
            None | Some("nan") => true,
            Some("zero") => false,
            Some(other) => bail!("SGDM_SIM_SHARED_FILL={other}: expected nan or zero"),
        };
        let memory_bytes = match env("SGDM_SIM_MEMORY") {
            None => None,
            Some(m) => Some(
                parse_bytes(&m).filter(|&b| b > 0).ok_or_else(|| anyhow!("SGDM_SIM_MEMORY={m}: expected a number of bytes, e.g. 8GiB or 512MiB"))?,
            ),
        };
        let report_times = match env("SGDM_SIM_TIMES").as_deref() {
            None | Some("0") => false,
            Some("1") => true,
            Some(other) => bail!("SGDM_SIM_TIMES={other}: expected 0 or 1"),
        };
        Ok(Settings { check, deferred, order, shared_fill_nan, memory_bytes, report_times })
    }

    /// One line for `sgdm info` and logs.
    pub fn describe(&self) -> String {
        let order = match self.order {
            Order::Forward => "forward".to_string(),
            Order::Reverse => "reverse".to_string(),
            Order::Random(s) => format!("random:{s}"),
        };
        format!(
            "checks {}, {} execution, {order} thread and block order, shared memory filled with {}",
            self.check.name(),
            if self.deferred { "deferred" } else { "synchronous" },
            if self.shared_fill_nan { "NaN" } else { "zeros" }
        )
    }
}

#[repr(C)]
struct Config {
    struct_size: u32,
    deferred: c_int,
    thread_order: c_int,
    block_order: c_int,
    seed: u64,
    shared_fill_nan: c_int,
    memory_bytes: u64,
    report_times: c_int,
}

/// Counters of the simulation so far.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub launches: u64,
    pub blocks: u64,
    pub threads: u64,
    pub barriers: u64,
    pub collectives: u64,
    pub races: u64,
    pub bad_accesses: u64,
    pub memory_in_use: u64,
    pub memory_peak: u64,
}

/// The active simulator of this process.
pub struct Simulator {
    pub settings: Settings,
    /// Where the driver libraries were written.
    pub runtime_dir: PathBuf,
    /// Where the host-compiled kernels live.
    pub twin_dir: PathBuf,
    driver: Library,
}

static SIMULATOR: OnceLock<Result<Simulator, String>> = OnceLock::new();

/// Whether this binary carries the simulator (x86-64 Linux, built with a C++ compiler).
pub fn built_in() -> Result<(), String> {
    BUILT.map(|_| ()).map_err(|why| format!("this sgdm binary has no CUDA simulator: {why}"))
}

/// Starts the simulator (once per process) and returns it.
pub fn activate() -> Result<&'static Simulator> {
    SIMULATOR.get_or_init(|| start().map_err(|e| format!("{e:#}"))).as_ref().map_err(|e| anyhow!("{e}"))
}

/// The simulator, if this process activated it successfully.
pub fn active() -> Option<&'static Simulator> {
    SIMULATOR.get().and_then(|s| s.as_ref().ok())
}

fn hex16(bytes: &[u8]) -> String {
    bytes[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `bytes` to `path` unless a file with exactly those bytes is there.
fn ensure_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if std::fs::read(path).is_ok_and(|b| b == bytes) {
        return Ok(());
    }
    write_atomic(path, bytes).with_context(|| format!("writing {}", path.display()))
}

fn compiler() -> String {
    env("CXX").unwrap_or_else(|| "c++".to_string())
}

fn start() -> Result<Simulator> {
    let libs = BUILT.map_err(|why| anyhow!("this sgdm binary has no CUDA simulator: {why}"))?;
    let settings = Settings::from_env()?;
    // A real driver (or another simulator build) already in the process would be the one cudarc uses.
    for name in cudarc::get_lib_name_candidates("cuda") {
        // SAFETY: RTLD_NOLOAD only looks the library up; nothing is loaded or initialised.
        if let Ok(lib) = unsafe { Library::open(Some(&name), RTLD_LAZY | RTLD_NOLOAD) } {
            // SAFETY: only the presence of the symbol is checked.
            let ours = unsafe { lib.get::<*const ()>(b"cudasim_identity") }.is_ok();
            if !ours {
                bail!("a CUDA driver ({name}) is already loaded in this process: cuda-sim must be selected before any other CUDA use");
            }
        }
    }
    let mut h = Sha256::new();
    h.update(libs.driver);
    h.update(libs.cublaslt);
    h.update(libs.kernel_header.as_bytes());
    let runtime_dir = cache_root().join("cudasim").join(format!("runtime-{}", hex16(&h.finalize())));
    std::fs::create_dir_all(&runtime_dir).with_context(|| format!("creating {}", runtime_dir.display()))?;
    let driver_path = runtime_dir.join("libcuda.so");
    ensure_file(&driver_path, libs.driver)?;
    ensure_file(&runtime_dir.join("libcublasLt.so"), libs.cublaslt)?;
    ensure_file(&runtime_dir.join("cudasim_kernel.h"), libs.kernel_header.as_bytes())?;

    if settings.check == Check::Asan {
        // SAFETY: only looks the symbol up in the global scope.
        let program = Library::this();
        if unsafe { program.get::<*const ()>(b"__asan_init") }.is_err() {
            bail!(
                "SGDM_SIM_CHECK=asan needs AddressSanitizer's runtime loaded first: run with \
                 LD_PRELOAD=$({} -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0",
                compiler()
            );
        }
    }
    // SAFETY: the simulator's own driver library, built with this binary; RTLD_GLOBAL makes its executor
    // visible to the twins and its soname (libcuda.so) the library cudarc's dlopen("libcuda.so") finds.
    let driver =
        unsafe { Library::open(Some(&driver_path), RTLD_NOW | RTLD_GLOBAL) }.with_context(|| format!("loading {}", driver_path.display()))?;
    let (thread_order, block_order, seed) = match settings.order {
        Order::Forward => (0, 0, 1),
        Order::Reverse => (1, 1, 1),
        Order::Random(s) => (2, 2, s),
    };
    let config = Config {
        struct_size: std::mem::size_of::<Config>() as u32,
        deferred: settings.deferred as c_int,
        thread_order,
        block_order,
        seed,
        shared_fill_nan: settings.shared_fill_nan as c_int,
        memory_bytes: settings.memory_bytes.unwrap_or(0),
        report_times: settings.report_times as c_int,
    };
    // SAFETY: cudasim_configure(const cudasim_config*) as defined in cudasim/src/driver.cpp, struct mirrored above.
    let rc = unsafe {
        let configure = driver.get::<unsafe extern "C" fn(*const Config) -> c_int>(b"cudasim_configure")?;
        configure(&config)
    };
    if rc != 0 {
        bail!("the CUDA simulator refused its configuration (code {rc}): it could not reserve address space for device memory");
    }
    let twins = build_twins(&settings, &runtime_dir, libs)?;
    let twin_dir = twins.first().and_then(|t| t.parent()).map(Path::to_path_buf).unwrap_or_default();
    type LoadTwin = unsafe extern "C" fn(*const c_char, *mut c_char, usize) -> c_int;
    // SAFETY: cudasim_load_twin(const char*, char*, size_t) as defined in cudasim/src/driver.cpp.
    let load = unsafe { driver.get::<LoadTwin>(b"cudasim_load_twin")? };
    for path in &twins {
        let c = CString::new(path.to_string_lossy().as_bytes()).context("twin path")?;
        let mut error = vec![0 as c_char; 1024];
        // SAFETY: both buffers outlive the call; the error buffer's length is passed.
        if unsafe { load(c.as_ptr(), error.as_mut_ptr(), error.len()) } != 0 {
            // SAFETY: the driver NUL-terminates what it writes.
            let msg = unsafe { std::ffi::CStr::from_ptr(error.as_ptr()) }.to_string_lossy().into_owned();
            bail!("loading the kernel twin {}: {msg}", path.display());
        }
    }
    let blas_path = runtime_dir.join("libcublasLt.so");
    // SAFETY: the simulator's cuBLASLt, built with this binary; its soname is the name cudarc opens.
    let blas = unsafe { Library::open(Some(&blas_path), RTLD_NOW | RTLD_GLOBAL) }.with_context(|| format!("loading {}", blas_path.display()))?;
    std::mem::forget(blas);
    Ok(Simulator { settings, runtime_dir, twin_dir, driver })
}

impl Simulator {
    pub fn stats(&self) -> Stats {
        let mut s = Stats::default();
        // SAFETY: cudasim_get_stats(cudasim_stats*) fills the struct mirrored by `Stats`.
        unsafe {
            if let Ok(f) = self.driver.get::<unsafe extern "C" fn(*mut Stats)>(b"cudasim_get_stats") {
                f(&mut s);
            }
        }
        s
    }

    /// The driver API functions the process has called so far.
    pub fn called_driver_functions(&self) -> Vec<String> {
        // SAFETY: cudasim_called_functions(char*, size_t) writes at most `len` bytes, NUL-terminated.
        unsafe {
            let Ok(f) = self.driver.get::<unsafe extern "C" fn(*mut c_char, usize) -> usize>(b"cudasim_called_functions") else {
                return Vec::new();
            };
            let len = f(std::ptr::null_mut(), 0);
            let mut buf = vec![0 as c_char; len];
            f(buf.as_mut_ptr(), len);
            let s = std::ffi::CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned();
            s.split(',').filter(|x| !x.is_empty()).map(str::to_string).collect()
        }
    }
}

/// The twin of every kernel file for `settings.check`, from the cache or compiled now (in parallel). Each file's
/// twin is keyed by its own source, every header, the check's flags and the compiler, so editing one kernel
/// file (or pointing SGDM_KERNELS_DIR at edited copies) recompiles only that file.
fn build_twins(settings: &Settings, runtime_dir: &Path, libs: Libraries) -> Result<Vec<PathBuf>> {
    let (files, headers) = kernel_sources().map_err(anyhow::Error::msg)?;
    let cxx = compiler();
    let version = Command::new(&cxx).arg("--version").output().with_context(|| {
        format!("the CUDA simulator compiles kernels for the host and could not run `{cxx}` (set CXX to g++ >= 11 or clang >= 14)")
    })?;
    let mut common = Sha256::new();
    common.update(&version.stdout);
    common.update(libs.kernel_header.as_bytes());
    for flag in settings.check.flags() {
        common.update(flag.as_bytes());
    }
    for hd in headers {
        common.update(hd.name.as_bytes());
        common.update([0]);
        common.update(hd.source.as_bytes());
        common.update([0]);
    }
    let dir = cache_root().join("cudasim").join(format!("twins-{}", settings.check.name()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let targets: Vec<(PathBuf, &EmbeddedSource)> = files
        .iter()
        .map(|f| {
            let mut h = common.clone();
            h.update(f.name.as_bytes());
            h.update([0]);
            h.update(f.source.as_bytes());
            (dir.join(format!("{}-{}.so", f.name.trim_end_matches(".cu"), hex16(&h.finalize()))), f)
        })
        .collect();
    let missing: Vec<&(PathBuf, &EmbeddedSource)> = targets.iter().filter(|(path, _)| !path.exists()).collect();
    if !missing.is_empty() {
        let work = dir.join(format!("build-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(work.join("original")).with_context(|| format!("creating {}", work.display()))?;
        let names: Vec<&str> = missing.iter().map(|(_, f)| f.name).collect();
        eprintln!("sgdm: compiling {} for the CUDA simulator (checks {}) ...", names.join(", "), settings.check.name());
        let started = std::time::Instant::now();
        let header = work.join("cudasim_kernel.h");
        std::fs::write(&header, libs.kernel_header)?;
        for hd in headers {
            std::fs::write(work.join("original").join(hd.name), hd.source)?;
            std::fs::write(work.join(hd.name), twin::rewrite(&format!("kernels/{}", hd.name), hd.source)?)?;
        }
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let queue = std::sync::Mutex::new(missing.clone());
        let errors = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..threads.min(missing.len()) {
                s.spawn(|| loop {
                    let Some((target, file)) = queue.lock().unwrap().pop() else { break };
                    let built = build_twin(&cxx, &work, &header, runtime_dir, settings.check, file.name, file.source).and_then(|lib| {
                        // Atomic: a concurrent process building the same twin leaves one complete file.
                        std::fs::rename(&lib, target).with_context(|| format!("moving the twin to {}", target.display()))
                    });
                    if let Err(e) = built {
                        errors.lock().unwrap().push(format!("{e:#}"));
                    }
                });
            }
        });
        let _ = std::fs::remove_dir_all(&work);
        let errors = errors.into_inner().unwrap();
        if !errors.is_empty() {
            bail!("compiling the kernels for the CUDA simulator failed:\n{}", errors.join("\n"));
        }
        eprintln!("sgdm: compiled them in {:.1} s, into {}", started.elapsed().as_secs_f64(), dir.display());
    }
    Ok(targets.into_iter().map(|(path, _)| path).collect())
}

/// Compiles one kernel file's twin in `dir` (which holds the rewritten headers); returns the library's path.
fn build_twin(cxx: &str, dir: &Path, header: &Path, runtime_dir: &Path, check: Check, name: &str, source: &str) -> Result<PathBuf> {
    let stem = name.trim_end_matches(".cu");
    let original = dir.join("original").join(name);
    std::fs::write(&original, source)?;
    // The kernels and their parameter names, from the source as the C preprocessor expands it.
    let pre = Command::new(cxx)
        .args(["-E", "-P", "-x", "c++", "-std=c++17", "-D__CUDACC_RTC__", "-I"])
        .arg(dir.join("original"))
        .arg(&original)
        .output()
        .with_context(|| format!("preprocessing kernels/{name}"))?;
    if !pre.status.success() {
        bail!("preprocessing kernels/{name}:\n{}", String::from_utf8_lossy(&pre.stderr));
    }
    let kernels =
        crate::runtime::kernel_signature::parse_kernels(&String::from_utf8_lossy(&pre.stdout)).map_err(|e| anyhow!("kernels/{name}: {e}"))?;
    let twin = twin::rewrite(&format!("kernels/{name}"), source)? + &twin::registration(&kernels);
    let cpp = dir.join(format!("{stem}.cpp"));
    std::fs::write(&cpp, twin)?;
    let object = dir.join(format!("{stem}.o"));
    let lib = dir.join(format!("lib{stem}.so"));
    // Compiled with the check's instrumentation; linked without ThreadSanitizer's runtime, whose hooks the
    // simulator's executor defines itself.
    let compile = Command::new(cxx)
        .args(["-std=c++17", "-g1", "-fPIC", "-ffp-contract=off", "-fno-strict-aliasing", "-w", "-c"])
        .args(check.flags())
        .arg("-include")
        .arg(header)
        .arg("-I")
        .arg(dir)
        .arg(&cpp)
        .arg("-o")
        .arg(&object)
        .output()
        .with_context(|| format!("compiling kernels/{name} for the host"))?;
    if !compile.status.success() {
        bail!("compiling kernels/{name} for the host:\n{}", String::from_utf8_lossy(&compile.stderr));
    }
    let link = Command::new(cxx)
        .args(["-shared", "-o"])
        .arg(&lib)
        .arg(&object)
        .args(if check == Check::Asan { &["-fsanitize=address,undefined"][..] } else { &[][..] })
        .arg(format!("-L{}", runtime_dir.display()))
        .args(["-l:libcuda.so", "-Wl,--no-undefined"])
        .output()
        .with_context(|| format!("linking the host build of kernels/{name}"))?;
    if !link.status.success() {
        bail!("linking the host build of kernels/{name}:\n{}", String::from_utf8_lossy(&link.stderr));
    }
    Ok(lib)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_parse_with_units() {
        assert_eq!(parse_bytes("123"), Some(123));
        assert_eq!(parse_bytes("8GiB"), Some(8 << 30));
        assert_eq!(parse_bytes("512MiB"), Some(512 << 20));
        assert_eq!(parse_bytes("2GB"), Some(2_000_000_000));
        assert_eq!(parse_bytes("2 TB"), None);
        assert_eq!(parse_bytes("lots"), None);
    }
}
