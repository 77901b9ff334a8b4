//! Layers with explicit parameters: each layer struct records its hyperparameters and the ids of its
//! parameters in a [`ParamTree`], under the PyTorch state_dict name, so a model's weight names and shapes
//! are fixed when it is built, before any memory exists. The tree is what weights are loaded against and
//! what the memory plan reserves.

use std::collections::HashMap;

use anyhow::{bail, Result};

pub use crate::memory::allocator::{standalone, Allocator, Inference, Standalone};
pub use crate::memory::pool::Pooled;
use crate::ops::conv::Conv2dSpec;

/// The index of a parameter in its [`ParamTree`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ParamId(pub usize);

/// One parameter: its state_dict name and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

/// Every parameter of a model, in registration order.
#[derive(Debug, Clone, Default)]
pub struct ParamTree {
    specs: Vec<ParamSpec>,
    by_name: HashMap<String, ParamId>,
}

/// Joins a module prefix and a leaf name the way PyTorch's state_dict does.
pub fn join(prefix: &str, leaf: &str) -> String {
    if prefix.is_empty() {
        leaf.to_string()
    } else {
        format!("{prefix}.{leaf}")
    }
}

impl ParamTree {
    pub fn new() -> ParamTree {
        ParamTree::default()
    }

    /// Registers `name` with `shape`. Building a model registers each name once; a repeat is a bug in the
    /// model's builder, reported with the name.
    pub fn add(&mut self, name: String, shape: &[usize]) -> ParamId {
        let id = ParamId(self.specs.len());
        let previous = self.by_name.insert(name.clone(), id);
        assert!(previous.is_none(), "parameter {name} registered twice");
        self.specs.push(ParamSpec { name, shape: shape.to_vec() });
        id
    }

    pub fn specs(&self) -> &[ParamSpec] {
        &self.specs
    }

    pub fn spec(&self, id: ParamId) -> &ParamSpec {
        &self.specs[id.0]
    }

    pub fn id(&self, name: &str) -> Option<ParamId> {
        self.by_name.get(name).copied()
    }

    pub fn len(&self) -> usize {
        self.specs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// Total number of parameter values.
    pub fn numel(&self) -> usize {
        self.specs.iter().map(|s| s.shape.iter().product::<usize>()).sum()
    }
}

/// `nn.Linear(input, output, bias)`: weight `[output, input]`, bias `[output]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Linear {
    pub weight: ParamId,
    pub bias: Option<ParamId>,
    pub input: usize,
    pub output: usize,
}

impl Linear {
    pub fn new(tree: &mut ParamTree, prefix: &str, input: usize, output: usize, bias: bool) -> Linear {
        let weight = tree.add(join(prefix, "weight"), &[output, input]);
        let bias = bias.then(|| tree.add(join(prefix, "bias"), &[output]));
        Linear { weight, bias, input, output }
    }
}

/// `nn.Conv2d`: weight `[output, input, k, k]`, bias `[output]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2d {
    pub weight: ParamId,
    pub bias: Option<ParamId>,
    pub input: usize,
    pub output: usize,
    pub kernel: usize,
    pub spec: Conv2dSpec,
}

impl Conv2d {
    pub fn new(tree: &mut ParamTree, prefix: &str, input: usize, output: usize, kernel: usize, spec: Conv2dSpec, bias: bool) -> Conv2d {
        let weight = tree.add(join(prefix, "weight"), &[output, input, kernel, kernel]);
        let bias = bias.then(|| tree.add(join(prefix, "bias"), &[output]));
        Conv2d { weight, bias, input, output, kernel, spec }
    }

    /// A 3x3 convolution with padding 1 (stride 1 or 2), the UNet's workhorse.
    pub fn k3(tree: &mut ParamTree, prefix: &str, input: usize, output: usize, stride: usize) -> Conv2d {
        Conv2d::new(tree, prefix, input, output, 3, Conv2dSpec::new(stride, 1), true)
    }

    /// A 1x1 convolution.
    pub fn k1(tree: &mut ParamTree, prefix: &str, input: usize, output: usize) -> Conv2d {
        Conv2d::new(tree, prefix, input, output, 1, Conv2dSpec::new(1, 0), true)
    }
}

/// `nn.GroupNorm(groups, channels, eps)` (or `nn.LayerNorm(channels, eps)` with `groups == 0`), affine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Norm {
    pub weight: ParamId,
    pub bias: ParamId,
    pub channels: usize,
    /// 0 for LayerNorm over the last dimension.
    pub groups: usize,
    pub eps: f64,
}

impl Norm {
    pub fn group(tree: &mut ParamTree, prefix: &str, groups: usize, channels: usize, eps: f64) -> Result<Norm> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            bail!("{prefix}: GroupNorm with {groups} groups cannot split {channels} channels");
        }
        let weight = tree.add(join(prefix, "weight"), &[channels]);
        let bias = tree.add(join(prefix, "bias"), &[channels]);
        Ok(Norm { weight, bias, channels, groups, eps })
    }

    pub fn layer(tree: &mut ParamTree, prefix: &str, channels: usize, eps: f64) -> Norm {
        let weight = tree.add(join(prefix, "weight"), &[channels]);
        let bias = tree.add(join(prefix, "bias"), &[channels]);
        Norm { weight, bias, channels, groups: 0, eps }
    }
}

/// `nn.Conv1d(input, output, kernel, padding)`: weight `[output, input, kernel]`, bias `[output]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv1d {
    pub weight: ParamId,
    pub bias: ParamId,
    pub input: usize,
    pub output: usize,
    pub kernel: usize,
    pub padding: usize,
}

impl Conv1d {
    pub fn new(tree: &mut ParamTree, prefix: &str, input: usize, output: usize, kernel: usize, padding: usize) -> Conv1d {
        let weight = tree.add(join(prefix, "weight"), &[output, input, kernel]);
        let bias = tree.add(join(prefix, "bias"), &[output]);
        Conv1d { weight, bias, input, output, kernel, padding }
    }
}

/// `nn.ConvTranspose2d(input, output, kernel, stride, padding)`: weight `[input, output, k, k]` (PyTorch's
/// transposed layout), bias `[output]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvTranspose2d {
    pub weight: ParamId,
    pub bias: ParamId,
    pub input: usize,
    pub output: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl ConvTranspose2d {
    pub fn new(tree: &mut ParamTree, prefix: &str, input: usize, output: usize, kernel: usize, stride: usize, padding: usize) -> ConvTranspose2d {
        let weight = tree.add(join(prefix, "weight"), &[input, output, kernel, kernel]);
        let bias = tree.add(join(prefix, "bias"), &[output]);
        ConvTranspose2d { weight, bias, input, output, kernel, stride, padding }
    }
}

/// One direction of one LSTM layer: PyTorch's `weight_ih_l{k}[_reverse]` `[4H, input]`,
/// `weight_hh_l{k}[_reverse]` `[4H, H]`, `bias_ih_l{k}[_reverse]` and `bias_hh_l{k}[_reverse]` `[4H]`,
/// gates in the order (i, f, g, o).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LstmDirection {
    pub weight_ih: ParamId,
    pub weight_hh: ParamId,
    pub bias_ih: ParamId,
    pub bias_hh: ParamId,
}

/// `nn.LSTM(input, hidden, layers, batch_first=True, bidirectional)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lstm {
    pub input: usize,
    pub hidden: usize,
    /// `layers[k][d]`: layer k, direction d (0 forward, 1 reverse).
    pub layers: Vec<Vec<LstmDirection>>,
}

impl Lstm {
    pub fn new(tree: &mut ParamTree, prefix: &str, input: usize, hidden: usize, layers: usize, bidirectional: bool) -> Lstm {
        let directions = if bidirectional { 2 } else { 1 };
        let layers = (0..layers)
            .map(|k| {
                let layer_input = if k == 0 { input } else { directions * hidden };
                (0..directions)
                    .map(|d| {
                        let suffix = if d == 1 { "_reverse" } else { "" };
                        let name = |w: &str| join(prefix, &format!("{w}_l{k}{suffix}"));
                        LstmDirection {
                            weight_ih: tree.add(name("weight_ih"), &[4 * hidden, layer_input]),
                            weight_hh: tree.add(name("weight_hh"), &[4 * hidden, hidden]),
                            bias_ih: tree.add(name("bias_ih"), &[4 * hidden]),
                            bias_hh: tree.add(name("bias_hh"), &[4 * hidden]),
                        }
                    })
                    .collect()
            })
            .collect();
        Lstm { input, hidden, layers }
    }
}

/// The tensors of a [`ParamTree`], carved from an arena's parameter region, indexed by [`ParamId`].
pub struct ParamStore {
    tensors: Vec<crate::tensor::Tensor>,
}

impl ParamStore {
    /// Reserves room for every parameter of `tree` in `dtype`.
    pub fn plan(tree: &ParamTree, plan: &mut crate::memory::MemoryPlan, dtype: crate::tensor::DType) {
        for s in tree.specs() {
            plan.reserve(crate::memory::Region::Params, &s.shape, dtype);
        }
    }

    /// An arena on `device` sized for exactly `tree`'s parameters in `dtype`.
    fn own_arena(tree: &ParamTree, device: &crate::runtime::Device, dtype: crate::tensor::DType) -> Result<crate::memory::Arena> {
        let mut plan = crate::memory::MemoryPlan::new();
        ParamStore::plan(tree, &mut plan, dtype);
        crate::memory::Arena::new(device, &plan)
    }

    /// [`ParamStore::load`] into an arena of the parameters' own on `device`.
    pub fn load_owned(
        tree: &ParamTree,
        file: &crate::weights::SafetensorsFile,
        device: &crate::runtime::Device,
        dtype: crate::tensor::DType,
        aliases: &[(&str, &str)],
    ) -> Result<ParamStore> {
        ParamStore::load(tree, file, &mut ParamStore::own_arena(tree, device, dtype)?, dtype, aliases)
    }

    /// [`ParamStore::random`] into an arena of the parameters' own on `device`.
    pub fn random_owned(tree: &ParamTree, device: &crate::runtime::Device, dtype: crate::tensor::DType, seed: u64) -> Result<ParamStore> {
        ParamStore::random(tree, &mut ParamStore::own_arena(tree, device, dtype)?, dtype, seed)
    }

    /// Every parameter of `tree` from `source` ([`ParamStore::load_owned`] or [`ParamStore::random_owned`]).
    pub fn from_source(
        tree: &ParamTree,
        source: &crate::weights::ParamSource,
        device: &crate::runtime::Device,
        dtype: crate::tensor::DType,
        aliases: &[(&str, &str)],
    ) -> Result<ParamStore> {
        match source {
            crate::weights::ParamSource::File(file) => ParamStore::load_owned(tree, file, device, dtype, aliases),
            crate::weights::ParamSource::Random { seed } => ParamStore::random_owned(tree, device, dtype, *seed),
        }
    }

    /// Loads every parameter of `tree` from `file` as `dtype`. A missing tensor, a wrong shape, a tensor the
    /// model does not have, or a NaN or Inf value is an error naming the file and tensor. `aliases` lists (old, current) name
    /// components accepted for older checkpoints (e.g. the VAE's `query` for `to_q`); an aliased weight may
    /// be stored as a 1x1 convolution `[o, i, 1, 1]` where the model has a linear `[o, i]`.
    pub fn load(
        tree: &ParamTree,
        file: &crate::weights::SafetensorsFile,
        arena: &mut crate::memory::Arena,
        dtype: crate::tensor::DType,
        aliases: &[(&str, &str)],
    ) -> Result<ParamStore> {
        use crate::tensor::convert_bytes;
        let mut tensors = Vec::with_capacity(tree.len());
        for spec in tree.specs() {
            let stored_name = if file.contains(&spec.name) {
                spec.name.clone()
            } else {
                aliases
                    .iter()
                    .map(|(old, new)| spec.name.replace(&format!(".{new}."), &format!(".{old}.")))
                    .find(|n| *n != spec.name && file.contains(n))
                    .unwrap_or_else(|| spec.name.clone())
            };
            let stored_shape = file.shape(&stored_name)?.to_vec();
            let conv_as_linear =
                stored_name != spec.name && stored_shape.len() == 4 && stored_shape[2..] == [1, 1] && stored_shape[..2] == spec.shape[..];
            if !conv_as_linear {
                file.check_shape(&stored_name, &spec.shape)?;
            }
            let (stored_dtype, _, bytes) = file.raw(&stored_name)?;
            if let Some(bad) = crate::tensor::non_finite_values(stored_dtype, bytes) {
                bail!(
                    "{}: tensor '{stored_name}' holds {} non-finite value(s) (NaN or Inf), the first at flat index {}: the file is damaged \
                     or its training diverged, and every output made with it would be too",
                    file.path().display(),
                    bad.count,
                    bad.first
                );
            }
            let mut t = arena.alloc(crate::memory::Region::Params, &spec.shape, dtype)?;
            t.write_bytes(&convert_bytes(stored_dtype, dtype, bytes))?;
            tensors.push(t);
        }
        file.ensure_all_used()?;
        Ok(ParamStore { tensors })
    }

    /// Parameters from a seeded generator: N(0, std²) with `std = 1/√fan_in` for weights (fan_in = the
    /// product of all but the first dimension), zero biases, unit norm weights: the starting point of
    /// training from scratch, and the weights of benchmarks and profiles of full-size configs.
    pub fn random(tree: &ParamTree, arena: &mut crate::memory::Arena, dtype: crate::tensor::DType, seed: u64) -> Result<ParamStore> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut tensors = Vec::with_capacity(tree.len());
        for spec in tree.specs() {
            let n: usize = spec.shape.iter().product();
            let values: Vec<f32> = if spec.shape.len() == 1 {
                let is_norm = spec.name.ends_with(".weight");
                vec![if is_norm { 1.0 } else { 0.0 }; n]
            } else {
                let fan_in: usize = spec.shape[1..].iter().product();
                let std = 1.0 / (fan_in as f32).sqrt();
                (0..n)
                    .map(|_| {
                        // Box-Muller from two uniforms.
                        let (u1, u2): (f32, f32) = (rng.random_range(f32::EPSILON..1.0), rng.random());
                        std * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
                    })
                    .collect()
            };
            let mut t = arena.alloc(crate::memory::Region::Params, &spec.shape, dtype)?;
            t.write_f32(&values)?;
            tensors.push(t);
        }
        Ok(ParamStore { tensors })
    }

    pub fn get(&self, id: ParamId) -> &crate::tensor::Tensor {
        &self.tensors[id.0]
    }

    /// A parameter to update in place (the optimizer's step, a checkpoint restore).
    pub fn get_mut(&mut self, id: ParamId) -> &mut crate::tensor::Tensor {
        &mut self.tensors[id.0]
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
}

/// Parameter gradients: one tensor per [`ParamId`] of a tree, shaped like the parameter. Backwards add to
/// them (`+=`), so they start at zero and gradient accumulation over micro-batches needs no extra buffer.
/// The dtype must be one every op accepts for its parameter gradients: f32 on the CPU, the parameters'
/// storage dtype on CUDA (the convolutions' weight gradients have no mixed-dtype form).
pub struct Grads {
    tensors: Vec<crate::tensor::Tensor>,
}

impl Grads {
    /// Reserves room for [`Grads::zeros`] of `tree` in `dtype` in an arena's gradient region.
    pub fn plan(tree: &ParamTree, plan: &mut crate::memory::MemoryPlan, dtype: crate::tensor::DType) {
        for s in tree.specs() {
            plan.reserve(crate::memory::Region::Grads, &s.shape, dtype);
        }
    }

    /// Zeroed gradients for every parameter of `tree` in `dtype`, in an arena of their own on `device`.
    pub fn owned(tree: &ParamTree, device: &crate::runtime::Device, dtype: crate::tensor::DType) -> Result<Grads> {
        let mut plan = crate::memory::MemoryPlan::new();
        Grads::plan(tree, &mut plan, dtype);
        let mut arena = crate::memory::Arena::new(device, &plan)?;
        Grads::zeros(tree, &mut arena.region(crate::memory::Region::Grads), dtype)
    }

    /// Zeroed gradients for every parameter of `tree`, from `alloc` (in training, the arena's gradient
    /// region: [`crate::memory::Arena::region`]).
    pub fn zeros(tree: &ParamTree, alloc: &mut dyn Allocator, dtype: crate::tensor::DType) -> Result<Grads> {
        let tensors = tree.specs().iter().map(|s| alloc.alloc(&s.shape, dtype)).collect::<Result<Vec<_>>>()?;
        let mut grads = Grads { tensors };
        grads.zero()?;
        Ok(grads)
    }

    /// Sets every gradient to zero on the device (the optimizer's step does, for the next step).
    pub fn zero(&mut self) -> Result<()> {
        for t in &mut self.tensors {
            t.fill_zero()?;
        }
        Ok(())
    }

    pub fn get(&self, id: ParamId) -> &crate::tensor::Tensor {
        &self.tensors[id.0]
    }

    pub fn get_mut(&mut self, id: ParamId) -> &mut crate::tensor::Tensor {
        &mut self.tensors[id.0]
    }

    /// Two distinct gradients at once (a norm's weight and bias are written by one backward call).
    pub fn pair_mut(&mut self, a: ParamId, b: ParamId) -> (&mut crate::tensor::Tensor, &mut crate::tensor::Tensor) {
        assert_ne!(a, b, "Grads::pair_mut: the same parameter twice");
        if a.0 < b.0 {
            let (low, high) = self.tensors.split_at_mut(b.0);
            (&mut low[a.0], &mut high[0])
        } else {
            let (low, high) = self.tensors.split_at_mut(a.0);
            (&mut high[0], &mut low[b.0])
        }
    }

    /// The gradients of a layer's weight and (distinct) optional bias, both writable at once.
    pub fn weight_bias_mut(&mut self, weight: ParamId, bias: Option<ParamId>) -> (&mut crate::tensor::Tensor, Option<&mut crate::tensor::Tensor>) {
        match bias {
            Some(b) => {
                let (w, b) = self.pair_mut(weight, b);
                (w, Some(b))
            }
            None => (self.get_mut(weight), None),
        }
    }

    /// The gradients of `ids` (distinct), writable at once, in the order of `ids`: views an op's gradient
    /// struct can hold (`ops::lstm::LstmParams<&mut Tensor>`).
    pub fn many_mut(&mut self, ids: &[ParamId]) -> Vec<&mut crate::tensor::Tensor> {
        let mut slots: Vec<Option<&mut crate::tensor::Tensor>> = self.tensors.iter_mut().map(Some).collect();
        ids.iter().map(|id| slots[id.0].take().expect("Grads::many_mut: the same parameter twice")).collect()
    }

    /// Every gradient, writable at once, in [`ParamId`] order.
    pub fn all_mut(&mut self) -> Vec<&mut crate::tensor::Tensor> {
        self.tensors.iter_mut().collect()
    }

    /// The gradients in [`ParamId`] order (the tree's registration order).
    pub fn into_tensors(self) -> Vec<crate::tensor::Tensor> {
        self.tensors
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
}
