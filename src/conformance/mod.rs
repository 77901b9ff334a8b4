//! What `sgdm forward` runs: one model from a component directory on named input tensors, optionally
//! backward from named upstream gradients, returning named outputs, `grad.<input>` for every float input
//! (except timesteps and scalars) and `grad.<parameter>` for every parameter. Tensor names follow the PyTorch
//! calls the fixtures in tests/fixtures/models were made with. One file per models file holds its runners.

mod autoencoder_kl;
mod sgdm;
mod unet;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

use crate::nn::{Grads, ParamStore, ParamTree};
use crate::runtime::device::Device;
use crate::tensor::{DType, Tensor};
use crate::weights::{ModelSource, SafetensorsFile};

/// Tensors by name, as read from a safetensors file, on one device in one dtype.
pub struct Named {
    /// Where they came from, for error messages.
    pub source: String,
    pub tensors: BTreeMap<String, Tensor>,
}

impl Named {
    /// Reads every tensor of a safetensors file onto `device` as `dtype`; f32-only inputs (timesteps,
    /// scales) are always read as f32.
    pub fn load(path: &Path, device: &Device, dtype: DType, f32_names: &[&str]) -> Result<Named> {
        let file = SafetensorsFile::open(path)?;
        let mut tensors = BTreeMap::new();
        for name in file.names() {
            let d = if f32_names.contains(&name) { DType::F32 } else { dtype };
            tensors.insert(name.to_string(), file.tensor(name, device, d)?);
        }
        Ok(Named { source: path.display().to_string(), tensors })
    }

    /// The tensor `name`, or an error naming the file and what it holds.
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| {
            let have: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
            anyhow!("{}: no tensor '{name}' (it holds {})", self.source, have.join(", "))
        })
    }

    pub fn get_opt(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// The tensor `name` with an expected shape.
    pub fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<&Tensor> {
        let t = self.get(name)?;
        if t.shape() != shape {
            bail!("{}: tensor '{name}' has shape {:?}, expected {shape:?}", self.source, t.shape());
        }
        Ok(t)
    }

    /// Fails on names no model input uses, so a typo is not silently ignored.
    pub fn ensure_only(&self, known: &[&str]) -> Result<()> {
        let unknown: Vec<&str> =
            self.tensors.keys().map(String::as_str).filter(|n| !known.iter().any(|k| k == n || n.starts_with(&format!("{k}.")))).collect();
        if !unknown.is_empty() {
            bail!("{}: unknown tensor name(s) {} (expected {})", self.source, unknown.join(", "), known.join(", "));
        }
        Ok(())
    }
}

/// Named results of one run.
pub type Outputs = Vec<(String, Tensor)>;

/// A model's source as a runner sees it: its configuration and parameters, and the bytes of the parameters
/// loaded so far (for `sgdm forward`'s memory report).
pub struct Source {
    pub model: ModelSource,
    param_bytes: std::cell::Cell<usize>,
}

impl Source {
    pub fn config_path(&self) -> std::path::PathBuf {
        self.model.config_path()
    }

    pub fn config(&self) -> &serde_json::Value {
        &self.model.config
    }

    /// The model's parameters, in an arena of their own: loaded from the weights file (every tensor checked
    /// by name and shape, `aliases` as in [`ParamStore::load`]) or drawn from the seed.
    pub fn params(&self, tree: &ParamTree, device: &Device, dtype: DType, aliases: &[(&str, &str)]) -> Result<ParamStore> {
        self.param_bytes.set(self.param_bytes.get() + tree.numel() * dtype.size());
        ParamStore::from_source(tree, &self.model.parameters, device, dtype, aliases)
    }
}

/// `(grad.<parameter>, gradient)` for every parameter of `tree`, in its order.
fn param_grads(tree: &ParamTree, grads: Grads) -> impl Iterator<Item = (String, Tensor)> + '_ {
    tree.specs().iter().map(|s| format!("grad.{}", s.name)).zip(grads.into_tensors())
}

/// How one model class is run: its source, the inputs, the upstream gradients if any, device, dtype.
pub type Runner = fn(&Source, &Named, Option<&Named>, &Device, DType) -> Result<Outputs>;

/// The runner for a diffusers/PyTorch `_class_name`.
fn runner(class: &str) -> Option<Runner> {
    match class {
        "ContrastiveAlignment" => Some(sgdm::run_contrastive_alignment),
        "SpatiotemporalEEGEncoder" => Some(sgdm::run_eeg_encoder),
        "StructuralVAE" => Some(sgdm::run_structural_vae),
        "AutoencoderKL" => Some(autoencoder_kl::run_autoencoder_kl),
        "UNet2DConditionModel" => Some(unet::run_unet),
        "ControlNetModel" => Some(unet::run_controlnet),
        _ => None,
    }
}

/// The classes `sgdm forward` runs.
pub const CLASSES: &[&str] =
    &["ContrastiveAlignment", "SpatiotemporalEEGEncoder", "StructuralVAE", "AutoencoderKL", "UNet2DConditionModel", "ControlNetModel"];

/// What one run produced.
pub struct Run {
    pub outputs: Outputs,
    /// Bytes of the model's parameters as stored for the run.
    pub param_bytes: usize,
}

/// Runs the model in `model_dir` on `inputs` (and backward from `grad_outputs`) on `device` in `dtype`,
/// with its weights file, or with seeded random parameters when `random_seed` is given.
pub fn run(model_dir: &Path, inputs: &Path, grad_outputs: Option<&Path>, device: &Device, dtype: DType, random_seed: Option<u64>) -> Result<Run> {
    let component = Source { model: ModelSource::open(model_dir, random_seed)?, param_bytes: 0.into() };
    let class = component
        .model
        .class_name()
        .ok_or_else(|| anyhow!("{}: config.json has no _class_name to choose the model", model_dir.display()))?
        .to_string();
    let Some(run) = runner(&class) else {
        bail!("{}: sgdm forward does not run {class} models (it runs {})", model_dir.display(), CLASSES.join(", "));
    };
    let inputs = Named::load(inputs, device, dtype, &["timestep", "conditioning_scale"])?;
    let grads = grad_outputs.map(|p| Named::load(p, device, dtype, &[])).transpose()?;
    let outputs = run(&component, &inputs, grads.as_ref(), device, dtype).with_context(|| format!("running {class} from {}", model_dir.display()))?;
    Ok(Run { outputs, param_bytes: component.param_bytes.get() })
}

/// Relative L2 bounds for comparing a run's outputs with a reference (PyTorch's float64 fixtures, or a CPU
/// f32 run of the same model).
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// Model outputs.
    pub output: f64,
    /// `grad.*` tensors, which pass through every layer twice.
    pub grad: f64,
    /// A reference gradient with a norm below [`ZERO_GRAD_NORM`] is zero in exact arithmetic (float64
    /// round-off); see [`ZeroGradient`].
    pub zero_grad: ZeroGradient,
}

/// How to bound a gradient that is zero in exact arithmetic. In our models these are the attention key biases:
/// softmax ignores a shift of a row's scores, and a key bias adds q·b to every score of row q, so its gradient
/// is a sum of terms that cancel exactly. A computation returns only the rounding residual of that sum.
#[derive(Clone, Copy, Debug)]
pub enum ZeroGradient {
    /// The norm must stay below this. For f32 against float64: the f32 residuals of every fixture's zero
    /// gradients are at most 1.3e-6, while a formula or mapping error leaves a gradient of the size of the
    /// module's others (0.8 and up in the fixtures): 1e-4 sits two orders of magnitude from both.
    Absolute(f64),
    /// The norm must stay below `factor` times the norm of the same gradient from a CPU f32 run on the same
    /// inputs. Both runs compute the same cancelling sum by the same algorithm, so their residuals have the
    /// same terms and scale with the unit roundoff: bf16 keeps 8 significant bits where f32 keeps 24, a
    /// factor of 2^16 (and bf16 rounds only where values are stored, f32 after every operation).
    VersusF32Residual { factor: f64 },
}

/// See [`Bounds::zero_grad`].
pub const ZERO_GRAD_NORM: f64 = 1e-10;

impl Bounds {
    /// f32 against a float64 reference: f32 rounding over a few hundred operations per value stays far
    /// below 1e-4 (outputs) and 1e-3 (gradients); a wrong weight mapping or formula lands far above.
    pub const F32: Bounds = Bounds { output: 1e-4, grad: 1e-3, zero_grad: ZeroGradient::Absolute(1e-4) };
    /// bf16 keeps 8 significant bits (3.9e-3 relative per stored value) and every layer rounds its output
    /// again, so errors grow with depth: a few percent for outputs, more for gradients. Mapping or formula
    /// errors still show as errors of order 1.
    pub const BF16: Bounds = Bounds { output: 5e-2, grad: 1.5e-1, zero_grad: ZeroGradient::VersusF32Residual { factor: 65536.0 } };

    pub fn for_dtype(dtype: DType) -> Bounds {
        match dtype {
            DType::BF16 => Bounds::BF16,
            _ => Bounds::F32,
        }
    }

    /// Whether comparing against `reference` needs a CPU f32 run of the same model (its zero gradients are
    /// bounded by that run's residuals).
    pub fn needs_f32_run(&self, reference: &Path) -> Result<bool> {
        if !matches!(self.zero_grad, ZeroGradient::VersusF32Residual { .. }) {
            return Ok(false);
        }
        let file = SafetensorsFile::open(reference)?;
        for name in file.names().filter(|n| n.starts_with("grad.")) {
            if l2(&file.tensor(name, &Device::Cpu, DType::F32)?.to_f32_vec()?) < ZERO_GRAD_NORM {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// One tensor's comparison with its reference.
#[derive(Clone, Debug)]
pub struct Comparison {
    pub name: String,
    /// Relative L2 error, or the plain L2 norm where the reference gradient is zero.
    pub error: f64,
    pub max_abs: f64,
    pub bound: f64,
    /// True where the reference is a zero gradient and `error` is a norm.
    pub zero_reference: bool,
    pub pass: bool,
}

fn l2(v: &[f32]) -> f64 {
    v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt()
}

/// Compares every output with the tensor of the same name in `reference` (a safetensors file): relative L2
/// error within `bounds`. The names must match exactly both ways and the shapes must agree; a missing,
/// extra or misshapen tensor is an error naming the file, not a failed row. `f32_run` is the same model's CPU
/// f32 outputs, needed where `bounds` bound zero gradients by its residuals ([`Bounds::needs_f32_run`]).
pub fn compare_outputs(outputs: &Outputs, reference: &Path, bounds: Bounds, f32_run: Option<&Outputs>) -> Result<Vec<Comparison>> {
    let file = SafetensorsFile::open(reference)?;
    let mut produced: Vec<&str> = outputs.iter().map(|(n, _)| n.as_str()).collect();
    produced.sort();
    let mut expected: Vec<&str> = file.names().collect();
    expected.sort();
    if produced != expected {
        let missing: Vec<&str> = expected.iter().filter(|n| !produced.contains(n)).copied().collect();
        let extra: Vec<&str> = produced.iter().filter(|n| !expected.contains(n)).copied().collect();
        bail!(
            "{}: the reference does not hold the tensors this run produced (not produced: {}; not in the reference: {})",
            reference.display(),
            if missing.is_empty() { "none".into() } else { missing.join(", ") },
            if extra.is_empty() { "none".into() } else { extra.join(", ") }
        );
    }
    let mut rows = Vec::new();
    for (name, t) in outputs {
        let want = file.tensor(name, &Device::Cpu, DType::F32)?;
        if t.shape() != want.shape() {
            bail!("{}: tensor '{name}' has shape {:?}, the run produced {:?}", reference.display(), want.shape(), t.shape());
        }
        let (got, want) = (t.to_f32_vec()?, want.to_f32_vec()?);
        let max_abs =
            got.iter().zip(&want).map(|(g, w)| (*g as f64 - *w as f64).abs()).fold(0f64, |m, d| if d.is_nan() { f64::NAN } else { m.max(d) });
        let is_grad = name.starts_with("grad.");
        let (error, bound, zero_reference) = if is_grad && l2(&want) < ZERO_GRAD_NORM {
            let bound = match bounds.zero_grad {
                ZeroGradient::Absolute(b) => b,
                ZeroGradient::VersusF32Residual { factor } => {
                    let f32_run =
                        f32_run.ok_or_else(|| anyhow!("{name} is zero in the reference: bounding it needs the CPU f32 run of the same model"))?;
                    let (_, residual) = f32_run.iter().find(|(n, _)| n == name).ok_or_else(|| anyhow!("the CPU f32 run produced no {name}"))?;
                    factor * l2(&residual.to_f32_vec()?)
                }
            };
            (l2(&got), bound, true)
        } else {
            let num: f64 = got.iter().zip(&want).map(|(g, w)| (*g as f64 - *w as f64).powi(2)).sum();
            (num.sqrt() / l2(&want).max(1e-300), if is_grad { bounds.grad } else { bounds.output }, false)
        };
        rows.push(Comparison { name: name.clone(), error, max_abs, bound, zero_reference, pass: error <= bound });
    }
    Ok(rows)
}
