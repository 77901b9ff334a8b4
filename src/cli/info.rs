//! `sgdm info`: what hardware and libraries the engine sees.

use anyhow::Result;
use sgdm::memory::arena::human_bytes;
use sgdm::runtime::cuda::CudaDevice;
use sgdm::runtime::kernels::{cache_dir, KERNEL_FILES};
use sgdm::runtime::{cudasim, probe};
use sgdm::DeviceSpec;

pub fn run(spec: DeviceSpec) -> Result<()> {
    println!("sgdm {}", env!("CARGO_PKG_VERSION"));
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!("cpu: {threads} threads (f32 reference backend)");
    // The simulator replaces the driver for the whole process, so it starts before anything probes CUDA.
    match (spec, cudasim::built_in()) {
        (DeviceSpec::CudaSim, _) => match cudasim::activate() {
            Ok(sim) => println!(
                "cuda-sim: the simulated CUDA device (sm_90 on the host CPU: checks CUDA correctness, never GPU speed); {}; kernels compiled for the host in {}",
                sim.settings.describe(),
                sim.twin_dir.display()
            ),
            Err(e) => println!("cuda-sim: cannot start: {e:#}"),
        },
        (_, Ok(())) => println!("cuda-sim: available (--device cuda-sim; a simulated device, not a GPU)"),
        (_, Err(e)) => println!("cuda-sim: unavailable: {e}"),
    }

    let driver = probe::driver();
    match &driver {
        Ok(d) => println!(
            "cuda driver: {} (CUDA {}), {} device(s){}",
            d.library,
            probe::format_driver_version(d.version),
            d.device_count,
            if d.simulated { " — the simulator's stand-in driver, not NVIDIA's" } else { "" }
        ),
        Err(e) => println!("cuda driver: unavailable: {e}"),
    }
    match probe::nvrtc() {
        Ok(n) => println!("nvrtc: {} ({}.{})", n.library, n.version.0, n.version.1),
        Err(e) => println!("nvrtc: unavailable: {e}"),
    }
    match probe::cublaslt() {
        Ok(lib) => println!("cublaslt: {lib}"),
        Err(e) => println!("cublaslt: unavailable: {e}"),
    }
    if let Ok(d) = &driver {
        for ordinal in 0..d.device_count {
            match CudaDevice::open(ordinal) {
                Ok(dev) => println!(
                    "{}: {}, compute capability {}.{} ({}), {} memory",
                    if dev.simulated { "cuda-sim".to_string() } else { format!("cuda:{ordinal}") },
                    dev.name,
                    dev.arch.major,
                    dev.arch.minor,
                    dev.arch,
                    human_bytes(dev.total_memory)
                ),
                Err(e) => println!("cuda:{ordinal}: cannot be opened: {e:#}"),
            }
        }
    }

    let selected = sgdm::runtime::select(spec);
    match &selected {
        Ok(s) => {
            let why = s.notice.as_deref().map(|n| format!(" — {}", n.trim_start_matches("sgdm: "))).unwrap_or_default();
            println!("selected (--device {spec}): {}{why}", s.device)
        }
        Err(e) => println!("selected (--device {spec}): none: {e:#}"),
    }

    let dir = cache_dir();
    let cached = std::fs::read_dir(&dir)
        .map(|it| it.filter_map(|e| e.ok()).filter(|e| e.path().extension().is_some_and(|x| x == "cubin")).count())
        .unwrap_or(0);
    println!("kernel cache: {} ({cached} cubins; set SGDM_CACHE_DIR to move it)", dir.display());
    let names: Vec<&str> = KERNEL_FILES.iter().map(|f| f.name).collect();
    println!("kernel files: {}", names.join(", "));
    selected.map(|_| ())
}
