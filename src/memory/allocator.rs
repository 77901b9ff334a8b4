//! The one allocator interface: where layers and ops get the tensors they write (activations, gradients,
//! scratch). Training and inference differ in which allocator they pass, not in how ops allocate.

use anyhow::Result;

use crate::runtime::Device;
use crate::tensor::{DType, Tensor};

/// Where layers get the tensors they write (activations, gradients, scratch): the per-step pool inside a
/// step loop (`memory::pool::Pooled`), a region of the parameter arena for long-lived state
/// (`memory::arena::Carve`), or standalone allocations for one-off runs such as `sgdm forward`.
pub trait Allocator {
    fn alloc(&mut self, shape: &[usize], dtype: DType) -> Result<Tensor>;

    /// Whether forwards keep the activations a backward reads. `false` ([`Inference`]): each block discards
    /// its intermediates as it returns ([`crate::tensor::Tensor::discard`]), so a forward holds one block's
    /// working set plus what later blocks read (skip connections), not the whole network's activations.
    fn keeps_activations(&self) -> bool {
        true
    }
}

/// Standalone zeroed tensors on one device, for forwards that will not be differentiated: activations are
/// discarded block by block (see [`Allocator::keeps_activations`]).
pub struct Inference(pub Device);

impl Allocator for Inference {
    fn alloc(&mut self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        Tensor::zeros(&self.0, shape, dtype)
    }

    fn keeps_activations(&self) -> bool {
        false
    }
}

/// Standalone zeroed tensors on one device.
pub struct Standalone(pub Device);

impl Allocator for Standalone {
    fn alloc(&mut self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        Tensor::zeros(&self.0, shape, dtype)
    }
}

/// Standalone tensors for a forward that a backward will follow ([`Standalone`]: activations kept) or not
/// ([`Inference`]: discarded block by block).
pub fn standalone(device: &Device, differentiated: bool) -> Box<dyn Allocator> {
    if differentiated {
        Box::new(Standalone(device.clone()))
    } else {
        Box::new(Inference(device.clone()))
    }
}
