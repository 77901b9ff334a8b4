//! Tensors: a shape and a dtype over a byte range of device storage (a standalone allocation, a slice
//! carved from the parameter arena, or a range leased from a per-step pool). No autograd, no strides:
//! tensors are dense and row-major.
//!
//! A [`Tensor::discard`]ed tensor gives its memory back at once; every later access to it is an error
//! rather than a silent read of memory that now belongs to someone else.

use std::alloc::Layout;
use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::{CudaSlice, DevicePtr};

pub use crate::dtype::{bytes_to_f32, convert_bytes, f32_to_bytes, non_finite_values, DType, NonFiniteValues};
use crate::runtime::cuda::CudaDevice;
use crate::runtime::device::Device;

/// Byte alignment of every allocation and every arena slice.
pub const ALIGN: usize = 256;

/// 256-byte aligned, zero-initialised host memory.
struct HostBuffer {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: HostBuffer owns its allocation; access is synchronised by Tensor's borrow rules.
unsafe impl Send for HostBuffer {}
unsafe impl Sync for HostBuffer {}

impl HostBuffer {
    fn zeroed(bytes: usize) -> Result<HostBuffer> {
        let layout = Layout::from_size_align(bytes.max(1), ALIGN).context("allocation too large")?;
        // SAFETY: the layout has non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).with_context(|| format!("out of host memory allocating {bytes} bytes"))?;
        Ok(HostBuffer { ptr, layout })
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

enum Buffer {
    Host(HostBuffer),
    /// `_allocation` owns the device memory `ptr` points into; it is freed when the storage drops.
    Cuda {
        _allocation: CudaSlice<u8>,
        ptr: u64,
        device: Arc<CudaDevice>,
    },
}

/// Bytes allocated through [`Storage`] (arenas, pools and standalone tensors), now and at the high-water mark,
/// on the host and on CUDA devices: what `sgdm forward` and the profiler report as memory use.
static HOST_LIVE: AtomicU64 = AtomicU64::new(0);
static HOST_PEAK: AtomicU64 = AtomicU64::new(0);
static DEVICE_LIVE: AtomicU64 = AtomicU64::new(0);
static DEVICE_PEAK: AtomicU64 = AtomicU64::new(0);

/// Live and peak bytes of tensor storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStats {
    pub host_live: u64,
    pub host_peak: u64,
    pub device_live: u64,
    pub device_peak: u64,
}

/// Tensor storage now and at its peak since the last [`reset_memory_peak`].
pub fn memory_stats() -> MemoryStats {
    MemoryStats {
        host_live: HOST_LIVE.load(Ordering::Relaxed),
        host_peak: HOST_PEAK.load(Ordering::Relaxed),
        device_live: DEVICE_LIVE.load(Ordering::Relaxed),
        device_peak: DEVICE_PEAK.load(Ordering::Relaxed),
    }
}

/// Starts a new high-water mark at the current use.
pub fn reset_memory_peak() {
    HOST_PEAK.store(HOST_LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
    DEVICE_PEAK.store(DEVICE_LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
}

fn counters(cuda: bool) -> (&'static AtomicU64, &'static AtomicU64) {
    if cuda {
        (&DEVICE_LIVE, &DEVICE_PEAK)
    } else {
        (&HOST_LIVE, &HOST_PEAK)
    }
}

/// One allocation, shared by the tensors carved from it.
pub struct Storage {
    buffer: Buffer,
    bytes: usize,
}

impl Storage {
    /// Allocates `bytes` of zeroed memory on `device`. The only allocation path in the engine: arenas call it
    /// once per region, standalone tensors once each.
    pub fn zeroed(device: &Device, bytes: usize) -> Result<Arc<Storage>> {
        let buffer = match device {
            Device::Cpu => Buffer::Host(HostBuffer::zeroed(bytes)?),
            Device::Cuda(d) => {
                let allocation = d.stream().alloc_zeros::<u8>(bytes.max(1)).with_context(|| format!("allocating {bytes} bytes on {}", device))?;
                let ptr = allocation.device_ptr(d.stream()).0;
                Buffer::Cuda { ptr, _allocation: allocation, device: d.clone() }
            }
        };
        let (live, peak) = counters(device.is_cuda());
        let now = live.fetch_add(bytes as u64, Ordering::Relaxed) + bytes as u64;
        peak.fetch_max(now, Ordering::Relaxed);
        Ok(Arc::new(Storage { buffer, bytes }))
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn device(&self) -> Device {
        match &self.buffer {
            Buffer::Host(_) => Device::Cpu,
            Buffer::Cuda { device, .. } => Device::Cuda(device.clone()),
        }
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        let (live, _) = counters(matches!(self.buffer, Buffer::Cuda { .. }));
        live.fetch_sub(self.bytes as u64, Ordering::Relaxed);
    }
}

impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Storage({} bytes on {})", self.bytes, self.device())
    }
}

/// A dense, row-major tensor. Not `Clone`: two tensors never alias the same bytes, so `&mut Tensor` is the
/// exclusive right to write them.
pub struct Tensor {
    storage: Arc<Storage>,
    offset: usize,
    shape: Vec<usize>,
    dtype: DType,
    /// Set by [`Tensor::discard`]: the memory is gone and every access is an error.
    discarded: bool,
    /// For a tensor taken from a [`crate::memory::Pool`]: its range of the pool, given back when the tensor
    /// drops. Held as an opaque value so that tensors need not know the pool (which sits above them).
    _lease: Option<Box<dyn Send + Sync>>,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor({:?}, {}, {})", self.shape, self.dtype, self.storage.device())
    }
}

impl Tensor {
    /// A tensor over `storage` at `offset` that gives `lease` back when it drops (pooled memory).
    pub(crate) fn leased(storage: Arc<Storage>, offset: usize, shape: &[usize], dtype: DType, lease: impl Send + Sync + 'static) -> Tensor {
        Tensor::carve(storage, offset, shape, dtype).with_lease(lease)
    }

    /// This tensor, giving `lease` back when it drops (a pool planner's bookkeeping).
    pub(crate) fn with_lease(mut self, lease: impl Send + Sync + 'static) -> Tensor {
        self._lease = Some(Box::new(lease));
        self
    }

    /// A view of `shape` x `dtype` at byte `offset` of `storage`. The caller guarantees that no other live
    /// tensor overlaps it.
    pub(crate) fn carve(storage: Arc<Storage>, offset: usize, shape: &[usize], dtype: DType) -> Tensor {
        debug_assert!(offset + shape.iter().product::<usize>() * dtype.size() <= storage.bytes);
        Tensor { storage, offset, shape: shape.to_vec(), dtype, discarded: false, _lease: None }
    }

    /// A standalone zero tensor (its own allocation). Step loops lease from a [`crate::memory::Pool`] instead.
    pub fn zeros(device: &Device, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let bytes = shape.iter().product::<usize>() * dtype.size();
        Ok(Tensor::carve(Storage::zeroed(device, bytes)?, 0, shape, dtype))
    }

    /// A standalone tensor holding `values` converted to `dtype`.
    pub fn from_f32(device: &Device, shape: &[usize], dtype: DType, values: &[f32]) -> Result<Tensor> {
        let mut t = Tensor::zeros(device, shape, dtype)?;
        t.write_f32(values)?;
        Ok(t)
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn size_bytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }

    pub fn device(&self) -> Device {
        self.storage.device()
    }

    /// Byte offset of this tensor inside its storage (arena tests check alignment with it).
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// The same bytes under another shape with as many elements.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Tensor> {
        ensure!(shape.iter().product::<usize>() == self.numel(), "cannot reshape {:?} ({} elements) to {:?}", self.shape, self.numel(), shape);
        self.shape = shape.to_vec();
        Ok(self)
    }

    /// Frees this tensor's memory (its own allocation, or its pool range; an arena's stays with the arena) and makes
    /// every later use an error that says so: what an inference forward does with the activations only a
    /// backward would read.
    pub fn discard(&mut self) {
        static EMPTY: std::sync::OnceLock<Arc<Storage>> = std::sync::OnceLock::new();
        let empty = EMPTY.get_or_init(|| Storage::zeroed(&Device::Cpu, 0).expect("a zero-byte host allocation"));
        self.storage = empty.clone();
        self.offset = 0;
        self.discarded = true;
        self._lease = None;
    }

    fn check_live(&self) -> Result<()> {
        if self.discarded {
            bail!("tensor {:?} was discarded: an inference forward keeps no activations for a backward", self.shape);
        }
        Ok(())
    }

    /// The host bytes of a CPU tensor.
    pub fn host_bytes(&self) -> Result<&[u8]> {
        self.check_live()?;
        match &self.storage.buffer {
            // SAFETY: the range lies inside the allocation (checked at carve time) and no live tensor overlaps
            // it mutably: writers need `&mut` to this very tensor.
            Buffer::Host(h) => Ok(unsafe { std::slice::from_raw_parts(h.ptr.as_ptr().add(self.offset), self.size_bytes()) }),
            Buffer::Cuda { .. } => bail!("tensor {:?} lives on {}, not the host", self.shape, self.device()),
        }
    }

    /// The host bytes of a CPU tensor, writable.
    pub fn host_bytes_mut(&mut self) -> Result<&mut [u8]> {
        self.check_live()?;
        let len = self.size_bytes();
        match &self.storage.buffer {
            // SAFETY: as in `host_bytes`; `&mut self` makes this the only access to these bytes.
            Buffer::Host(h) => Ok(unsafe { std::slice::from_raw_parts_mut(h.ptr.as_ptr().add(self.offset), len) }),
            Buffer::Cuda { .. } => bail!("tensor {:?} lives on {}, not the host", self.shape, self.device()),
        }
    }

    /// The values of a CPU f32 tensor.
    pub fn f32s(&self) -> Result<&[f32]> {
        ensure!(self.dtype == DType::F32, "expected an f32 tensor, found {} {:?}", self.dtype, self.shape);
        Ok(bytemuck::cast_slice(self.host_bytes()?))
    }

    /// The values of a CPU f32 tensor, writable.
    pub fn f32s_mut(&mut self) -> Result<&mut [f32]> {
        ensure!(self.dtype == DType::F32, "expected an f32 tensor, found {} {:?}", self.dtype, self.shape);
        Ok(bytemuck::cast_slice_mut(self.host_bytes_mut()?))
    }

    /// The device address of a CUDA tensor, for kernel arguments.
    pub fn cuda_ptr(&self) -> Result<u64> {
        self.check_live()?;
        match &self.storage.buffer {
            Buffer::Cuda { ptr, .. } => Ok(ptr + self.offset as u64),
            Buffer::Host(_) => bail!("tensor {:?} lives on the host, not on a CUDA device", self.shape),
        }
    }

    /// Overwrites the tensor with raw little-endian bytes of its own dtype.
    pub fn write_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        ensure!(
            bytes.len() == self.size_bytes(),
            "writing {} bytes into a {} tensor {:?} of {} bytes",
            bytes.len(),
            self.dtype,
            self.shape,
            self.size_bytes()
        );
        self.check_live()?;
        let dst = self.offset;
        match &self.storage.buffer {
            Buffer::Host(_) => self.host_bytes_mut()?.copy_from_slice(bytes),
            Buffer::Cuda { ptr, device, .. } => {
                // Raw driver calls use the thread's current context, which cudarc binds only for its own calls.
                device.context().bind_to_thread().context("binding the CUDA context")?;
                // SAFETY: the destination range lies inside the allocation; the copy completes before
                // `bytes` can be dropped because we synchronise the stream.
                unsafe { cudarc::driver::result::memcpy_htod_async(ptr + dst as u64, bytes, device.stream().cu_stream()) }
                    .context("copying host to device")?;
                device.synchronize()?;
            }
        }
        Ok(())
    }

    /// Sets every element to zero, on the device's stream (no host copy, no synchronisation).
    pub fn fill_zero(&mut self) -> Result<()> {
        self.check_live()?;
        let len = self.size_bytes();
        match &self.storage.buffer {
            Buffer::Host(_) => self.host_bytes_mut()?.fill(0),
            Buffer::Cuda { ptr, device, .. } => {
                // Raw driver calls use the thread's current context, which cudarc binds only for its own calls.
                device.context().bind_to_thread().context("binding the CUDA context")?;
                // SAFETY: the range lies inside the allocation; the memset is ordered on the device's stream.
                unsafe { cudarc::driver::result::memset_d8_async(ptr + self.offset as u64, 0, len, device.stream().cu_stream()) }
                    .context("zeroing device memory")?;
            }
        }
        Ok(())
    }

    /// Overwrites the tensor with `values`, converted to its dtype.
    pub fn write_f32(&mut self, values: &[f32]) -> Result<()> {
        ensure!(values.len() == self.numel(), "writing {} values into a tensor {:?} of {} elements", values.len(), self.shape, self.numel());
        match self.dtype {
            DType::F32 if !self.device().is_cuda() => {
                self.f32s_mut()?.copy_from_slice(values);
                Ok(())
            }
            dtype => self.write_bytes(&f32_to_bytes(dtype, values)),
        }
    }

    /// Copies the raw bytes to the host (waits for the device).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        self.check_live()?;
        match &self.storage.buffer {
            Buffer::Host(_) => Ok(self.host_bytes()?.to_vec()),
            Buffer::Cuda { ptr, device, .. } => {
                // Raw driver calls use the thread's current context, which cudarc binds only for its own calls.
                device.context().bind_to_thread().context("binding the CUDA context")?;
                let mut out = vec![0u8; self.size_bytes()];
                // SAFETY: the source range lies inside the allocation; we synchronise before reading `out`.
                unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut out, ptr + self.offset as u64, device.stream().cu_stream()) }
                    .context("copying device to host")?;
                device.synchronize()?;
                Ok(out)
            }
        }
    }

    /// The values as f32, on the host.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        if self.dtype == DType::F32 && !self.device().is_cuda() {
            return Ok(self.f32s()?.to_vec());
        }
        Ok(bytes_to_f32(self.dtype, &self.to_bytes()?))
    }

    /// A standalone copy on `device` with `dtype`.
    pub fn to_device(&self, device: &Device, dtype: DType) -> Result<Tensor> {
        let mut t = Tensor::zeros(device, &self.shape, dtype)?;
        t.write_bytes(&convert_bytes(self.dtype, dtype, &self.to_bytes()?))?;
        Ok(t)
    }
}
