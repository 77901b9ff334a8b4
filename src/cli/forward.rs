//! `sgdm forward`: run one model on tensors from a safetensors file (optionally backward) and write the
//! results; the conformance hook for PyTorch comparisons.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use sgdm::memory::arena::human_bytes;
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
    /// Compare every output with the tensor of the same name in this safetensors file (a PyTorch fixture's
    /// expected.safetensors, or the output of a CPU run) and print max abs and relative L2 error per tensor
    /// against its bound; exit non-zero if any is out of bounds.
    #[arg(long, value_name = "REFERENCE")]
    compare: Option<PathBuf>,
    /// With --compare: the relative L2 bound for outputs [default: 1e-4 for f32, 5e-2 for bf16].
    #[arg(long, requires = "compare")]
    output_bound: Option<f64>,
    /// With --compare: the relative L2 bound for grad.* tensors [default: 1e-3 for f32, 1.5e-1 for bf16].
    #[arg(long, requires = "compare")]
    grad_bound: Option<f64>,
}

pub fn run(spec: DeviceSpec, args: &Args) -> Result<()> {
    let selected = select(spec)?;
    if let Some(n) = &selected.notice {
        eprintln!("{n}");
    }
    let started = Instant::now();
    let run = sgdm::conformance::run(&args.model_dir, &args.inputs, args.grad_outputs.as_deref(), &selected.device, args.dtype, args.random_weights)?;
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
    if let Some(reference) = &args.compare {
        let mut bounds = sgdm::conformance::Bounds::for_dtype(args.dtype);
        bounds.output = args.output_bound.unwrap_or(bounds.output);
        bounds.grad = args.grad_bound.unwrap_or(bounds.grad);
        // Zero gradients in bf16 are bounded by the CPU f32 run's residuals (conformance::ZeroGradient).
        let f32_run = if bounds.needs_f32_run(reference)? {
            eprintln!(
                "the reference has gradients that are zero in exact arithmetic: running the model on the CPU in f32 to bound their rounding residual"
            );
            let cpu = sgdm::conformance::run(
                &args.model_dir,
                &args.inputs,
                args.grad_outputs.as_deref(),
                &sgdm::Device::Cpu,
                DType::F32,
                args.random_weights,
            )?;
            Some(cpu.outputs)
        } else {
            None
        };
        let rows = sgdm::conformance::compare_outputs(&outputs, reference, bounds, f32_run.as_ref())?;
        println!("compared with {} ({} {}):", reference.display(), selected.device, args.dtype);
        for r in &rows {
            let what = if r.zero_reference { "norm (zero reference)" } else { "rel L2" };
            println!(
                "  {:<48} max abs {:.3e}  {what} {:.3e}  bound {:.1e}  {}",
                r.name,
                r.max_abs,
                r.error,
                r.bound,
                if r.pass { "pass" } else { "FAIL" }
            );
        }
        let failed: Vec<&str> = rows.iter().filter(|r| !r.pass).map(|r| r.name.as_str()).collect();
        if !failed.is_empty() {
            anyhow::bail!("{} of {} tensors out of bounds against {}: {}", failed.len(), rows.len(), reference.display(), failed.join(", "));
        }
        println!("all {} tensors within bounds", rows.len());
    }
    Ok(())
}
