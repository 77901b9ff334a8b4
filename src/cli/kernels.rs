//! `sgdm kernels`: compile every kernel file for one architecture and print ptxas' resource report.

use anyhow::{bail, Context, Result};
use sgdm::runtime::kernels::{compile, Arch, KernelCache, KERNEL_FILES};
use sgdm::runtime::probe;
use sgdm::util::write_atomic;
use sgdm::{Device, DeviceSpec};

#[derive(clap::Args)]
pub struct Args {
    /// Target architecture, e.g. sm_80, sm_90, sm_90a. Default: the selected CUDA device's.
    #[arg(long)]
    arch: Option<Arch>,
    /// Compile only this kernel file (e.g. elementwise.cu).
    #[arg(long)]
    file: Option<String>,
}

pub fn run(spec: DeviceSpec, args: &Args) -> Result<()> {
    let arch = match args.arch {
        Some(a) => a,
        None => match sgdm::runtime::select(spec)?.device {
            Device::Cuda(d) => d.arch,
            Device::Cpu => bail!("no CUDA device selected: pass --arch (e.g. --arch sm_90) to compile without a GPU"),
        },
    };
    let nvrtc = probe::nvrtc().map_err(|e| anyhow::anyhow!("NVRTC is not available: {e}"))?;
    let files: Vec<_> = KERNEL_FILES.iter().filter(|f| args.file.as_deref().is_none_or(|n| n == f.name)).collect();
    if files.is_empty() {
        let names: Vec<&str> = KERNEL_FILES.iter().map(|f| f.name).collect();
        bail!("no kernel file named {:?}; the files are {}", args.file.as_deref().unwrap_or(""), names.join(", "));
    }
    let cache = KernelCache::default_location();
    println!("compiling {} kernel file(s) for {arch} with NVRTC {}.{} ({})", files.len(), nvrtc.version.0, nvrtc.version.1, nvrtc.library);
    println!("{:<16} {:<28} {:>5} {:>10} {:>11} {:>12} {:>11}", "file", "kernel", "regs", "smem (B)", "local (B)", "spill st (B)", "spill ld (B)");
    let mut spills = 0;
    for file in files {
        let compiled = compile(file, arch)?;
        let mut resources = compiled.resources();
        resources.sort_by(|a, b| a.name.cmp(&b.name));
        for r in resources {
            println!(
                "{:<16} {:<28} {:>5} {:>10} {:>11} {:>12} {:>11}",
                file.name,
                r.name,
                r.registers,
                r.shared_bytes,
                r.local_bytes(),
                r.spill_store_bytes,
                r.spill_load_bytes
            );
            spills += (r.spill_store_bytes + r.spill_load_bytes > 0) as usize;
        }
        let path = cache.path_for(file, arch, nvrtc.version);
        std::fs::create_dir_all(cache.dir())
            .and_then(|_| write_atomic(&path, &compiled.cubin))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!("cubins cached in {}", cache.dir().display());
    if spills > 0 {
        println!("warning: {spills} kernel(s) spill registers to local memory");
    }
    Ok(())
}
