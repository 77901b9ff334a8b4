//! The training optimizer: AdamW over every parameter of a model, with f32 moments and, when the model's
//! parameters are bf16 (CUDA), f32 master weights from which each step refreshes the bf16 copy; global-norm
//! gradient clipping before each step; gradient accumulation over micro-batches.
//!
//! Accumulation scales the loss, not the gradients: each micro-batch's loss backward gets
//! `dloss = 1 / micro_batches` ([`Optimizer::loss_scale`]) and the backwards add into the same [`Grads`],
//! so after the last micro-batch they hold the gradient of the mean loss, with no extra pass over the
//! gradients and no bf16 gradient ever holding an unscaled sum.

use anyhow::{ensure, Context, Result};

use crate::memory::{MemoryPlan, Region};
use crate::nn::{Allocator, Grads, ParamId, ParamStore, ParamTree};
use crate::ops::elementwise::cast;
use crate::ops::optim::{adamw_step, clip_grad_norm, AdamW, PARTIALS};
use crate::tensor::{DType, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimizerConfig {
    /// betas, eps and weight decay; `lr` is replaced at each step by the schedule's rate.
    pub adamw: AdamW,
    /// Clip the global L2 norm of the gradients to this before each step; `None` never clips (the norm is
    /// still measured, for the log).
    pub max_grad_norm: Option<f32>,
    /// Micro-batches whose gradients make one step (1: no accumulation).
    pub micro_batches: usize,
}

/// AdamW state for one model; see the module docs.
pub struct Optimizer {
    pub config: OptimizerConfig,
    /// Optimizer steps taken so far.
    step: u64,
    /// f32 master weights, one per parameter, when the parameters are stored in bf16.
    master: Option<Vec<Tensor>>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    total_norm: Tensor,
    partials: Tensor,
}

impl Optimizer {
    /// Reserves room for [`Optimizer::new`]'s state, for parameters of `tree` stored in `dtype`, in an
    /// arena's optimizer region.
    pub fn plan(tree: &ParamTree, dtype: DType, plan: &mut MemoryPlan) {
        let copies = if dtype == DType::BF16 { 3 } else { 2 };
        for _ in 0..copies {
            for s in tree.specs() {
                plan.reserve(Region::Optimizer, &s.shape, DType::F32);
            }
        }
        plan.reserve(Region::Optimizer, &[1], DType::F32).reserve(Region::Optimizer, &[PARTIALS], DType::F32);
    }

    /// Zero moments at step 0, and master weights copied from `params` when they are bf16. Parameters must
    /// be f32 or bf16.
    pub fn new(tree: &ParamTree, params: &ParamStore, alloc: &mut dyn Allocator, config: OptimizerConfig) -> Result<Optimizer> {
        ensure!(config.micro_batches >= 1, "optimizer: micro_batches must be at least 1, got {}", config.micro_batches);
        if let Some(max) = config.max_grad_norm {
            ensure!(max > 0.0 && max.is_finite(), "optimizer: max_grad_norm must be positive and finite, got {max}");
        }
        ensure!(tree.len() == params.len(), "optimizer: the tree has {} parameters, the store {}", tree.len(), params.len());
        let dtype = if params.is_empty() { DType::F32 } else { params.get(ParamId(0)).dtype() };
        ensure!(dtype == DType::F32 || dtype == DType::BF16, "optimizer: parameters must be f32 or bf16 (with f32 master weights), got {dtype}");
        let zeros = |alloc: &mut dyn Allocator| -> Result<Vec<Tensor>> {
            tree.specs()
                .iter()
                .map(|s| {
                    let mut t = alloc.alloc(&s.shape, DType::F32)?;
                    t.fill_zero()?;
                    Ok(t)
                })
                .collect()
        };
        let master = if dtype == DType::BF16 {
            let mut master = zeros(alloc)?;
            for (i, (s, w)) in tree.specs().iter().zip(&mut master).enumerate() {
                let p = params.get(ParamId(i));
                ensure!(p.dtype() == dtype, "optimizer: parameter {} is {}, the others {dtype}", s.name, p.dtype());
                cast(p, w).with_context(|| format!("optimizer: master copy of {}", s.name))?;
            }
            Some(master)
        } else {
            None
        };
        let (m, v) = (zeros(alloc)?, zeros(alloc)?);
        let total_norm = alloc.alloc(&[1], DType::F32)?;
        let partials = alloc.alloc(&[PARTIALS], DType::F32)?;
        Ok(Optimizer { config, step: 0, master, m, v, total_norm, partials })
    }

    /// Optimizer steps taken so far (the schedule's argument for the next step).
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The `dloss` each micro-batch's loss backward gets: `1 / micro_batches`.
    pub fn loss_scale(&self) -> f32 {
        (1.0 / self.config.micro_batches as f64) as f32
    }

    /// One step at rate `lr` from the gradients accumulated in `grads`: clip them by global norm, apply
    /// AdamW to the (master) weights and the bf16 copy, then zero `grads` for the next step.
    pub fn step(&mut self, params: &mut ParamStore, grads: &mut Grads, lr: f64) -> Result<()> {
        ensure!(
            grads.len() == self.m.len() && params.len() == self.m.len(),
            "optimizer: built for {} parameters, given {} parameters and {} gradients",
            self.m.len(),
            params.len(),
            grads.len()
        );
        let max_norm = self.config.max_grad_norm.unwrap_or(f32::INFINITY);
        let ids: Vec<ParamId> = (0..grads.len()).map(ParamId).collect();
        clip_grad_norm(&mut grads.all_mut(), max_norm, &mut self.total_norm, &mut self.partials)?;
        self.step += 1;
        let opt = AdamW { lr, ..self.config.adamw };
        for (i, id) in ids.iter().enumerate() {
            let (m, v) = (&mut self.m[i], &mut self.v[i]);
            match &mut self.master {
                Some(master) => adamw_step(&opt, self.step, &mut master[i], grads.get(*id), m, v, Some(params.get_mut(*id)))?,
                None => adamw_step(&opt, self.step, params.get_mut(*id), grads.get(*id), m, v, None)?,
            }
        }
        grads.zero()
    }

    /// The global gradient norm of the last step, before clipping (a read back to the host).
    pub fn grad_norm(&self) -> Result<f32> {
        Ok(self.total_norm.to_f32_vec()?[0])
    }

    /// The state a checkpoint holds, by parameter index: the f32 master weights (when kept), and the moments.
    pub fn state(&self) -> (Option<&[Tensor]>, &[Tensor], &[Tensor]) {
        (self.master.as_deref(), &self.m, &self.v)
    }

    /// The state to restore into, by parameter index, and the step counter.
    pub(crate) fn state_mut(&mut self) -> (&mut u64, Option<&mut [Tensor]>, &mut [Tensor], &mut [Tensor]) {
        (&mut self.step, self.master.as_deref_mut(), &mut self.m, &mut self.v)
    }
}
