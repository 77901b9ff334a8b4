//! The per-step memory pool, of inference and training steps alike: one allocation, handed out in
//! 256-byte-aligned ranges that return to the pool when their tensor drops (or is discarded). A step's
//! working set lives in the pool at its peak size instead of one allocation per tensor (in inference,
//! where [`super::Allocator::keeps_activations`] is false, that peak is one block's), and because the first-fit search over a free list kept in address order is deterministic, the same
//! sequence of allocations and frees lands on the same addresses every time: what replaying a captured
//! CUDA graph of the step requires (the graph's kernels keep the addresses they were captured with).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::Result;

use crate::runtime::device::Device;
use crate::tensor::{DType, Storage, Tensor};

const ALIGN: usize = 256;

/// A pool had no free range large enough (a typed error, so callers can fall back to other memory).
#[derive(Debug)]
pub struct PoolExhausted(pub String);

impl std::fmt::Display for PoolExhausted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PoolExhausted {}

/// Whether `err` (or anything in its chain) is a [`PoolExhausted`].
pub fn is_exhausted(err: &anyhow::Error) -> bool {
    err.chain().any(|e| e.is::<PoolExhausted>())
}

struct State {
    /// Free ranges: start -> length, non-adjacent (neighbours are merged).
    free: BTreeMap<usize, usize>,
    live: usize,
    peak: usize,
    /// The highest end of a range handed out: the capacity a pool needs to replay the same sequence.
    top: usize,
    /// Ranges handed out since the pool was made: a forward's allocation count.
    handed: usize,
}

struct Shared {
    capacity: usize,
    state: Mutex<State>,
}

/// A range of a pool, given back when dropped.
pub struct Lease {
    shared: Arc<Shared>,
    start: usize,
    len: usize,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut st = self.shared.state.lock().unwrap();
        st.live -= self.len;
        let (mut start, mut len) = (self.start, self.len);
        // Merge with the free range just before and the one just after.
        if let Some((&s, &l)) = st.free.range(..start).next_back() {
            if s + l == start {
                st.free.remove(&s);
                start = s;
                len += l;
            }
        }
        if let Some(&l) = st.free.get(&(self.start + self.len)) {
            st.free.remove(&(self.start + self.len));
            len += l;
        }
        st.free.insert(start, len);
    }
}

/// One device allocation handed out in ranges. Cheap to clone (shared).
#[derive(Clone)]
pub struct Pool {
    memory: Memory,
    shared: Arc<Shared>,
}

#[derive(Clone)]
enum Memory {
    Storage(Arc<Storage>),
    /// A planner: ranges are placed as in a real pool, tensors are standalone allocations on this device.
    Planner(Device),
}

/// What a pool holds now and held at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolUsage {
    pub capacity: usize,
    /// Bytes in ranges handed out now, and at most.
    pub live: usize,
    pub peak: usize,
    /// The highest end of a range handed out (>= peak: the free list may fragment). A pool of this capacity
    /// places the same sequence of allocations and frees at the same addresses.
    pub top: usize,
    pub handed: usize,
}

impl Pool {
    /// A pool of `bytes` (rounded up to 256) on `device`.
    pub fn new(device: &Device, bytes: usize) -> Result<Pool> {
        let capacity = bytes.div_ceil(ALIGN) * ALIGN;
        Ok(Pool::with_memory(Memory::Storage(Storage::zeroed(device, capacity)?), capacity))
    }

    /// A pool without memory of its own, for sizing one: it places every range as a pool would (without a
    /// capacity limit) while the tensors it hands out are ordinary allocations on `device`. After a step ran
    /// on it, `usage().top` is the capacity a real pool needs for that step, learned without holding the
    /// memory twice.
    pub fn planner(device: &Device) -> Pool {
        Pool::with_memory(Memory::Planner(device.clone()), usize::MAX / 4)
    }

    fn with_memory(memory: Memory, capacity: usize) -> Pool {
        let free = if capacity > 0 { BTreeMap::from([(0, capacity)]) } else { BTreeMap::new() };
        let state = Mutex::new(State { free, live: 0, peak: 0, top: 0, handed: 0 });
        Pool { memory, shared: Arc::new(Shared { capacity, state }) }
    }

    /// A tensor in the lowest free range that fits (its contents are whatever the range last held).
    pub fn alloc(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let bytes = shape.iter().product::<usize>() * dtype.size();
        let len = bytes.max(1).div_ceil(ALIGN) * ALIGN;
        let mut st = self.shared.state.lock().unwrap();
        let Some((&start, &free)) = st.free.iter().find(|(_, &l)| l >= len) else {
            return Err(PoolExhausted(format!(
                "memory pool of {} bytes is exhausted: {:?} {} needs {} bytes, {} are in use, the largest free range holds {} bytes",
                self.shared.capacity,
                shape,
                dtype,
                len,
                st.live,
                st.free.values().max().copied().unwrap_or(0)
            ))
            .into());
        };
        st.free.remove(&start);
        if free > len {
            st.free.insert(start + len, free - len);
        }
        st.live += len;
        st.peak = st.peak.max(st.live);
        st.top = st.top.max(start + len);
        st.handed += 1;
        drop(st);
        let lease = Lease { shared: self.shared.clone(), start, len };
        match &self.memory {
            Memory::Storage(storage) => Ok(Tensor::leased(storage.clone(), start, shape, dtype, lease)),
            Memory::Planner(device) => Ok(Tensor::zeros(device, shape, dtype)?.with_lease(lease)),
        }
    }

    /// Starts the peak over from what is live now.
    pub fn reset_peak(&self) {
        let mut st = self.shared.state.lock().unwrap();
        st.peak = st.live;
    }

    pub fn usage(&self) -> PoolUsage {
        let st = self.shared.state.lock().unwrap();
        PoolUsage { capacity: self.shared.capacity, live: st.live, peak: st.peak, top: st.top, handed: st.handed }
    }
}

/// The per-step pool of a loop whose steps repeat one sequence of allocations (a training loop: same
/// shapes, same order, every step). The first step runs on a [`Pool::planner`], which learns the capacity
/// the step needs; from the second step on, tensors are leased from a pool of exactly that capacity, and
/// because placement is deterministic each step lands on the same addresses as the one before. A tensor
/// a later step cannot place (a step larger than the first) becomes a standalone allocation, counted in
/// [`StepPool::overflowed`]: never an error in the middle of a step whose gradients are half accumulated.
pub struct StepPool {
    device: Device,
    pool: Pool,
    sized: bool,
    /// Fill the pool with NaN before every step after the first (tests: a layer that reads what it did not
    /// write shows it; the first step runs on the planner's zeroed tensors).
    poison: bool,
    overflow: Arc<std::sync::atomic::AtomicUsize>,
}

impl StepPool {
    pub fn new(device: &Device) -> StepPool {
        StepPool { device: device.clone(), pool: Pool::planner(device), sized: false, poison: false, overflow: Arc::default() }
    }

    /// A step pool whose memory is filled with NaN before every step after the first: a layer that reads an
    /// element of its buffers before writing it makes NaN results (what tests/train_stages.rs checks every
    /// stage against). All-ones bytes: NaN in f32, bf16 and f16 alike.
    pub fn poisoned(device: &Device) -> StepPool {
        StepPool { poison: true, ..StepPool::new(device) }
    }

    /// The allocator of the current step: forwards keep their activations for the backward.
    pub fn training(&self) -> Pooled {
        Pooled::training(self.pool.clone()).overflowing_to(&self.device, self.overflow.clone())
    }

    /// Ends a step; every tensor it leased must have dropped. After the first step, the planner gives way
    /// to a pool of the capacity that step needed.
    pub fn end_step(&mut self) -> Result<()> {
        let usage = self.pool.usage();
        anyhow::ensure!(usage.live == 0, "a step ended with {} bytes of its per-step memory still in use", usage.live);
        if !self.sized {
            self.pool = Pool::new(&self.device, usage.top)?;
            self.sized = true;
        }
        if self.poison && self.pool.usage().capacity > 0 {
            let n = self.pool.usage().capacity / 4;
            let mut all = self.pool.alloc(&[n], DType::F32)?;
            all.write_bytes(&vec![0xFF; 4 * n])?;
            drop(all);
            self.pool.reset_peak();
        }
        Ok(())
    }

    /// The pool's usage: before the first step ends, the planner's.
    pub fn usage(&self) -> PoolUsage {
        self.pool.usage()
    }

    /// Tensors the pool could not place since it was made.
    pub fn overflowed(&self) -> usize {
        self.overflow.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Tensors leased from a [`Pool`]: ranges come back to the pool as their tensors drop (or, in
/// inference, as activations are discarded), so the pool needs the step's peak working set only, and a
/// repeated step reuses the same addresses (CUDA graph replay). Contents are not zeroed: layers write every
/// element they hand on (tests/pool.rs runs forwards and tests/train_stages.rs training steps in NaN-poisoned
/// pools to hold them to it). Training and inference are its two modes: whether forwards keep the activations a backward reads.
pub struct Pooled {
    pool: Pool,
    keep_activations: bool,
    /// Where a tensor goes when the pool has no range for it (a step larger than the one that sized the
    /// pool), counted; `None`: exhaustion is an error.
    overflow: Option<(Device, std::sync::Arc<std::sync::atomic::AtomicUsize>)>,
}

impl Pooled {
    /// Forward-only steps: activations are discarded block by block, exhaustion is an error.
    pub fn inference(pool: Pool) -> Pooled {
        Pooled { pool, keep_activations: false, overflow: None }
    }

    /// Forward and backward steps: activations are kept until the step drops them.
    pub fn training(pool: Pool) -> Pooled {
        Pooled { pool, keep_activations: true, overflow: None }
    }

    /// Tensors the pool cannot place become standalone allocations on `device`, each counted in `count`.
    pub fn overflowing_to(mut self, device: &Device, count: std::sync::Arc<std::sync::atomic::AtomicUsize>) -> Pooled {
        self.overflow = Some((device.clone(), count));
        self
    }
}

impl super::Allocator for Pooled {
    fn alloc(&mut self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        match (self.pool.alloc(shape, dtype), &self.overflow) {
            (Err(e), Some((device, count))) if is_exhausted(&e) => {
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Tensor::zeros(device, shape, dtype)
            }
            (result, _) => result,
        }
    }

    fn keeps_activations(&self) -> bool {
        self.keep_activations
    }
}
