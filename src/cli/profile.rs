//! `sgdm profile`: where a denoising step (ControlNet + UNet) spends its time, per op family, against the
//! device's measured peaks. See [`sgdm::profile`] for how ops are accounted.

use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::{json, Value};
use sgdm::models::unet::{ControlNet, UNet, UNetConfig};
use sgdm::nn::{Inference, ParamStore};
use sgdm::pipeline::{Denoiser, Pipeline, Step};
use sgdm::profile::{Totals, FAMILIES};
use sgdm::runtime::select;
use sgdm::DeviceSpec;

use super::reconstruct::{dtype_for, weights_folder};

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Model {
    /// The default model (or the one --weights names): 64x64 images, 16x16 latents.
    Default,
    /// Stable Diffusion 1.5's UNet and ControlNet at 512x512 (64x64 latents), random weights.
    Sd15,
}

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, value_enum, default_value = "default")]
    model: Model,
    /// Images per step; with guidance the step evaluates twice as many rows.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Steps timed (after one warm-up step), both plain and profiled.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Classifier-free guidance on (the step evaluates 2 x batch rows) or off.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    guidance: bool,
    /// Weights folder for --model default [default: $SGDM_WEIGHTS, else weights/ beside the executable,
    /// else the model built into this binary].
    #[arg(long, value_name = "DIR")]
    weights: Option<std::path::PathBuf>,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
}

const SD15_UNET: &str = include_str!("../../tests/fixtures/sd15/unet.json");
const SD15_CONTROLNET: &str = include_str!("../../tests/fixtures/sd15/controlnet.json");

pub fn run(spec: DeviceSpec, args: &Args) -> Result<()> {
    anyhow::ensure!(args.batch >= 1 && args.steps >= 1, "--batch and --steps must be at least 1");
    let selected = select(spec)?;
    if let Some(n) = &selected.notice {
        eprintln!("{n}");
    }
    let device = selected.device;
    if device.is_simulated() {
        anyhow::bail!(
            "sgdm profile measures a GPU, and the simulated CUDA device (cuda-sim) runs kernels on the CPU to check \
             them: its times are not GPU numbers. Use --device cuda on a GPU, or --device cpu for the CPU backend"
        );
    }
    let dtype = dtype_for(&device);
    let rows = if args.guidance { 2 * args.batch } else { args.batch };

    // The models and one step's inputs.
    let pipeline;
    let sd15;
    let (denoiser, inputs, label) = match args.model {
        Model::Default => {
            let weights = weights_folder(args.weights.as_deref())?;
            pipeline = Pipeline::open(&weights, &device, dtype)?;
            let inputs = pipeline.step_inputs(rows, 0)?;
            (pipeline.denoiser(), inputs, format!("default ({}, {}x{} images)", weights.display(), pipeline.image_size(), pipeline.image_size()))
        }
        Model::Sd15 => {
            let parse = |text: &str, name: &str| -> Result<UNetConfig> {
                let v: Value = serde_json::from_str(text).with_context(|| format!("built-in {name}"))?;
                UNetConfig::from_json(std::path::Path::new(name), &v)
            };
            let unet = UNet::new(parse(SD15_UNET, "sd15/unet.json")?)?;
            let controlnet = ControlNet::new(parse(SD15_CONTROLNET, "sd15/controlnet.json")?)?;
            eprintln!(
                "drawing random SD 1.5 UNet and ControlNet parameters ({:.2} G)...",
                (unet.params.numel() + controlnet.params.numel()) as f64 / 1e9
            );
            let up = ParamStore::random_owned(&unet.params, &device, dtype, 1)?;
            let cp = ParamStore::random_owned(&controlnet.params, &device, dtype, 2)?;
            sd15 = (unet, up, controlnet, cp);
            let d = Denoiser { unet: &sd15.0, unet_params: &sd15.1, controlnet: &sd15.2, controlnet_params: &sd15.3 };
            let inputs = d.random_inputs(&device, dtype, rows, 64, 77, sd15.0.config.cross_attention_dim, 0)?;
            (d, inputs, "sd15 (Stable Diffusion 1.5 UNet + ControlNet, random weights, 512x512)".to_string())
        }
    };
    let [x, t, context, cond] = &inputs;
    let step = || -> Result<()> {
        denoiser.predict(x, t, context, cond, 1.0, &mut Inference(device.clone()))?;
        device.synchronize()
    };

    eprintln!("measuring the device's GEMM and copy peaks...");
    let (peak_flops, peak_bw) = sgdm::bench::peaks(&device, dtype)?;
    eprintln!("warm-up step...");
    let warm = Instant::now();
    step()?;
    let warm_seconds = warm.elapsed().as_secs_f64();
    let plain = Instant::now();
    for _ in 0..args.steps {
        step()?;
    }
    let step_seconds = plain.elapsed().as_secs_f64() / args.steps as f64;
    sgdm::profile::start();
    let profiled = Instant::now();
    let result = (0..args.steps).try_for_each(|_| step());
    let profiled_seconds = profiled.elapsed().as_secs_f64() / args.steps as f64;
    let totals = sgdm::profile::stop();
    result?;

    // The step as reconstruction runs it: activations in a pool, and on CUDA replayed as a captured graph.
    eprintln!("setting up the pooled step{}...", if device.is_cuda() { " and capturing its CUDA graph" } else { "" });
    let mut pooled = Step::with_inputs(&denoiser, inputs, 1.0, device.is_cuda(), 0)?;
    pooled.run(&denoiser)?;
    device.synchronize()?;
    let replay = Instant::now();
    for _ in 0..args.steps {
        pooled.run(&denoiser)?;
    }
    device.synchronize()?;
    let pooled_seconds = replay.elapsed().as_secs_f64() / args.steps as f64;
    let pool = pooled.pool_usage();

    let per_step = |t: &Totals| Totals {
        calls: t.calls / args.steps as u64,
        seconds: t.seconds / args.steps as f64,
        flops: t.flops / args.steps as f64,
        bytes: t.bytes / args.steps as f64,
    };
    let tracked: f64 = totals.iter().map(|t| t.seconds).sum::<f64>() / args.steps as f64;
    let families: Vec<Value> = FAMILIES
        .iter()
        .zip(&totals)
        .map(|(f, t)| {
            let s = per_step(t);
            let (rate, bw) = if s.seconds > 0.0 { (s.flops / s.seconds, s.bytes / s.seconds) } else { (0.0, 0.0) };
            json!({
                "family": f.name(), "calls": s.calls, "seconds": s.seconds, "share": if profiled_seconds > 0.0 { s.seconds / profiled_seconds } else { 0.0 },
                "flops": s.flops, "bytes": s.bytes, "flops_per_s": rate, "bytes_per_s": bw,
                "flops_vs_peak": rate / peak_flops, "bytes_vs_peak": bw / peak_bw,
            })
        })
        .collect();
    let report = json!({
        "model": label,
        "device": format!("{device:?}"),
        "dtype": dtype.to_string(),
        "batch": args.batch,
        "rows": rows,
        "guidance": args.guidance,
        "steps": args.steps,
        "peak": { "gemm_flops_per_s": peak_flops, "copy_bytes_per_s": peak_bw },
        "warmup_step_seconds": warm_seconds,
        "step_seconds": step_seconds,
        "profiled_step_seconds": profiled_seconds,
        "untracked_seconds": (profiled_seconds - tracked).max(0.0),
        "pooled_step_seconds": pooled_seconds,
        "cuda_graph": pooled.captured(),
        "pool_bytes": pool.capacity,
        "steps_per_second": 1.0 / pooled_seconds,
        "families": families,
        "commit": option_env!("SGDM_GIT_COMMIT").unwrap_or("unknown"),
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report));
    }
    Ok(())
}

fn table(r: &Value) -> String {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let mut out = format!(
        "{}\n{} {}, batch {} ({} rows a step{}), {} steps timed\n",
        r["model"].as_str().unwrap_or_default(),
        r["device"].as_str().unwrap_or_default(),
        r["dtype"].as_str().unwrap_or_default(),
        r["batch"],
        r["rows"],
        if r["guidance"] == true { ": guidance doubles the batch" } else { "" },
        r["steps"]
    );
    out += &format!(
        "peaks measured here: GEMM {:.2} TFLOP/s, copy {:.1} GB/s\n\n",
        f(&r["peak"]["gemm_flops_per_s"]) / 1e12,
        f(&r["peak"]["copy_bytes_per_s"]) / 1e9
    );
    out += &format!(
        "{:<12}{:>7}{:>11}{:>7}{:>10}{:>9}{:>10}{:>9}{:>8}{:>8}\n",
        "family", "calls", "ms/step", "share", "GFLOP", "GB", "TFLOP/s", "GB/s", "%FLOP", "%BW"
    );
    let mut fams: Vec<&Value> = r["families"].as_array().map(|a| a.iter().collect()).unwrap_or_default();
    fams.sort_by(|a, b| f(&b["seconds"]).total_cmp(&f(&a["seconds"])));
    for fam in fams {
        out += &format!(
            "{:<12}{:>7}{:>11.2}{:>6.1}%{:>10.2}{:>9.3}{:>10.3}{:>9.1}{:>7.1}%{:>7.1}%\n",
            fam["family"].as_str().unwrap_or_default(),
            fam["calls"],
            f(&fam["seconds"]) * 1e3,
            f(&fam["share"]) * 100.0,
            f(&fam["flops"]) / 1e9,
            f(&fam["bytes"]) / 1e9,
            f(&fam["flops_per_s"]) / 1e12,
            f(&fam["bytes_per_s"]) / 1e9,
            f(&fam["flops_vs_peak"]) * 100.0,
            f(&fam["bytes_vs_peak"]) * 100.0,
        );
    }
    out += &format!(
        "\nstep: {:.2} ms plain, {:.2} ms profiled ({:.2} ms outside the op families); warm-up step {:.2} ms\n",
        f(&r["step_seconds"]) * 1e3,
        f(&r["profiled_step_seconds"]) * 1e3,
        f(&r["untracked_seconds"]) * 1e3,
        f(&r["warmup_step_seconds"]) * 1e3
    );
    out += &format!(
        "as reconstruction runs it: {:.2} ms per step ({:.1} steps/s){}, activations in a {:.1} MiB pool\n",
        f(&r["pooled_step_seconds"]) * 1e3,
        f(&r["steps_per_second"]),
        if r["cuda_graph"] == true { ", replayed as a CUDA graph" } else { "" },
        f(&r["pool_bytes"]) / (1024.0 * 1024.0)
    );
    out += "Profiled ops are synchronised one by one (CUDA); the plain time has no such stalls.\n";
    out
}
