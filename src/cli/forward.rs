//! `sgdm forward`: run one model on tensors from a safetensors file (optionally backward) and write the
//! results; the conformance hook for PyTorch comparisons.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use sgdm::runtime::arena::human_bytes;
use sgdm::runtime::select;
use sgdm::tensor::memory_stats;
use sgdm::weights::save_safetensors;
use sgdm::{DType, DeviceSpec};

#[derive(clap::Args)]
pub struct Args {
    /// A model directory: config.json (its _class_name picks the model) and one weights file.
    model_dir: PathBuf,
    /// Input tensors, named as the model's PyTorch call names them.
    #[arg(long)]
    inputs: PathBuf,
    /// Where to write the outputs (and gradients), atomically.
    #[arg(long)]
    output: PathBuf,
    /// One upstream gradient per output, same names: also run backward and write grad.<input> and
    /// grad.<parameter>.
    #[arg(long)]
    grad_outputs: Option<PathBuf>,
    /// Storage dtype of weights and activations (CUDA: f32 or bf16; CPU: f32).
    #[arg(long, default_value = "f32")]
    dtype: DType,
    /// Ignore any weights file and draw the parameters from this seed (only config.json is read): for
    /// running full-size configs such as SD 1.5's without their weights.
    #[arg(long, value_name = "SEED")]
    random_weights: Option<u64>,
}

pub fn run(spec: DeviceSpec, args: &Args) -> Result<()> {
    let selected = select(spec)?;
    if let Some(n) = &selected.notice {
        eprintln!("{n}");
    }
    let started = Instant::now();
    let run = sgdm::conformance::run(
        &args.model_dir,
        &args.inputs,
        args.grad_outputs.as_deref(),
        &selected.device,
        args.dtype,
        args.random_weights,
    )?;
    selected.device.synchronize()?;
    let elapsed = started.elapsed();
    let memory = memory_stats();
    let outputs = run.outputs;
    let refs: Vec<(&str, &sgdm::Tensor)> = outputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
    save_safetensors(&args.output, &refs, None).with_context(|| format!("writing {}", args.output.display()))?;
    for (name, t) in &outputs {
        println!("{name:<48} {:?} {}", t.shape(), t.dtype());
    }
    println!("{} tensors on {} in {:.3} s -> {}", outputs.len(), selected.device, elapsed.as_secs_f64(), args.output.display());
    let peak = if selected.device.is_cuda() { memory.device_peak } else { memory.host_peak } as usize;
    println!(
        "memory on {}: parameters {}, peak of all tensors {} (parameters, inputs, activations, gradients)",
        selected.device,
        human_bytes(run.param_bytes),
        human_bytes(peak)
    );
    Ok(())
}
