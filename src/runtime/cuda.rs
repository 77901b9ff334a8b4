//! One CUDA device: its context, the stream every op runs on, and the kernels loaded from cubins.
//! Event tracking is off (one stream orders everything), so tensors hand raw device pointers to kernels.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg};

use crate::runtime::blas::BlasLt;
use crate::runtime::kernel_table;
pub use crate::runtime::kernel_table::KernelArg;
use crate::runtime::kernels::{kernel_file, Arch, CacheOutcome, KernelCache};
use crate::runtime::probe;

/// How kernels got loaded so far: the first run compiles, later runs hit the cubin cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelLoadCounts {
    pub compiled: usize,
    pub cache_hits: usize,
}

pub struct CudaDevice {
    pub ordinal: usize,
    /// The simulated device (the process runs cudasim's driver): CUDA semantics, not GPU speed.
    pub simulated: bool,
    pub name: String,
    pub arch: Arch,
    pub total_memory: usize,
    pub driver_version: i32,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    cache: KernelCache,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(&'static str, &'static str), CudaFunction>>,
    loads: Mutex<KernelLoadCounts>,
    blas: OnceLock<BlasLt>,
    blas_init: Mutex<()>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.simulated { "cuda-sim".to_string() } else { format!("cuda:{}", self.ordinal) };
        write!(f, "{kind} ({}, {})", self.name, self.arch)
    }
}

impl CudaDevice {
    /// Opens device `ordinal`. Probes libcuda and libnvrtc first, so a missing or old library is an error.
    pub fn open(ordinal: usize) -> Result<Arc<CudaDevice>> {
        let driver = probe::driver().map_err(|e| anyhow!("CUDA is unavailable: {e}"))?;
        probe::nvrtc().map_err(|e| anyhow!("CUDA kernels cannot be compiled: {e}"))?;
        if ordinal >= driver.device_count {
            bail!("cuda:{ordinal} does not exist: the driver reports {} device(s)", driver.device_count);
        }
        let ctx = CudaContext::new(ordinal).with_context(|| format!("creating a context on cuda:{ordinal}"))?;
        // SAFETY: no allocation or stream exists yet in this context. We order all work on one stream, so
        // cudarc's per-allocation events are pure overhead (and break CUDA graph capture).
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx.compute_capability()?;
        let stream = ctx.new_stream().context("creating a stream")?;
        Ok(Arc::new(CudaDevice {
            ordinal,
            simulated: driver.simulated,
            name: ctx.name()?,
            arch: Arch::new(major as u32, minor as u32),
            total_memory: ctx.total_mem()?,
            driver_version: driver.version,
            ctx,
            stream,
            cache: KernelCache::default_location(),
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            loads: Mutex::new(KernelLoadCounts::default()),
            blas: OnceLock::new(),
            blas_init: Mutex::new(()),
        }))
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn kernel_loads(&self) -> KernelLoadCounts {
        *self.loads.lock().unwrap()
    }

    /// (free, total) device memory in bytes.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        Ok(self.ctx.mem_get_info()?)
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().context("synchronizing the CUDA stream")
    }

    /// The device's cuBLASLt state, created at first use.
    pub fn blas(&self) -> Result<&BlasLt> {
        if let Some(b) = self.blas.get() {
            return Ok(b);
        }
        let _guard = self.blas_init.lock().unwrap();
        if self.blas.get().is_none() {
            let _ = self.blas.set(BlasLt::new(&self.stream)?);
        }
        Ok(self.blas.get().expect("initialised above"))
    }

    fn module(&self, file: &'static str) -> Result<Arc<CudaModule>> {
        let mut modules = self.modules.lock().unwrap();
        if let Some(m) = modules.get(file) {
            return Ok(m.clone());
        }
        let source = kernel_file(file).map_err(anyhow::Error::msg)?;
        let (cubin, outcome) = self.cache.load_or_compile(source, self.arch)?;
        {
            let mut loads = self.loads.lock().unwrap();
            match outcome {
                CacheOutcome::Hit => loads.cache_hits += 1,
                CacheOutcome::Compiled => loads.compiled += 1,
            }
        }
        let module = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
            .with_context(|| format!("loading the {} cubin of kernels/{file}", self.arch))?;
        modules.insert(file, module.clone());
        Ok(module)
    }

    /// The kernel `name` from `kernels/<file>`, compiled (or read from the cache) and loaded at first use.
    pub fn function(&self, file: &'static str, name: &'static str) -> Result<CudaFunction> {
        if let Some(f) = self.functions.lock().unwrap().get(&(file, name)) {
            return Ok(f.clone());
        }
        let f = self.module(file)?.load_function(name).with_context(|| format!("kernels/{file} has no kernel named {name}"))?;
        self.functions.lock().unwrap().insert((file, name), f.clone());
        Ok(f)
    }

    /// Launches an elementwise kernel over `n` elements with a grid-stride loop: `args` are pushed before `n`.
    pub fn launch_elementwise(&self, file: &'static str, name: &'static str, args: &[KernelArg], n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        const BLOCK: usize = 256;
        // Enough blocks to fill the device several times over; the grid-stride loop covers the rest.
        let blocks = n.div_ceil(BLOCK).min(65_535) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK as u32, 1, 1), shared_mem_bytes: 0 };
        self.launch(file, name, cfg, args, Some(n as i64))
    }

    /// Launches `kernels/<file>::<name>` with `args` (then `count`, if given) on the device's stream. The
    /// argument list is checked against the kernel's signature in the kernel table first.
    pub fn launch(&self, file: &'static str, name: &'static str, cfg: LaunchConfig, args: &[KernelArg], count: Option<i64>) -> Result<()> {
        let kernel = kernel_table::find(file, name)?;
        let mut all = args.to_vec();
        all.extend(count.map(KernelArg::I64));
        kernel.check_args(&all)?;
        let f = self.function(file, name)?;
        let mut b = self.stream.launch_builder(&f);
        for a in &all {
            match a {
                KernelArg::Ptr(p) => b.arg(p),
                KernelArg::F32(v) => b.arg(v),
                KernelArg::I32(v) => b.arg(v),
                KernelArg::I64(v) => b.arg(v),
                KernelArg::F64(v) => b.arg(v),
            };
        }
        // SAFETY: the argument list matches the kernel's signature (checked above against the kernel table), and
        // every pointer is a live allocation on this device (Tensor checks).
        unsafe { b.launch(cfg) }.with_context(|| format!("launching {name} from kernels/{file}"))?;
        kernel.record_launch();
        Ok(())
    }
}
