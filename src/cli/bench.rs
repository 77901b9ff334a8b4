//! `sgdm bench`: time our kernels at the shapes of the performance targets (src/bench.rs) and print ms, TFLOP/s and GB/s against the peaks
//! measured in the same run (src/bench.rs); `--list` prints the cases for the PyTorch side.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use sgdm::bench::{cases, peaks, run_case, Case, Timing, FAMILIES};
use sgdm::runtime::select;
use sgdm::{DType, DeviceSpec};

#[derive(clap::Args)]
pub struct Args {
    /// Families to run (repeatable): conv, attention, groupnorm_silu, lstm, infonce [default: all].
    #[arg(long = "family", value_name = "FAMILY")]
    families: Vec<String>,
    /// Small shapes of the same kinds (seconds on a CPU) instead of the SD 1.5 / encoder shapes.
    #[arg(long)]
    quick: bool,
    /// Print the cases as JSON (id, family, params, passes) and exit: what benches/gpu/torch_ops.py reads.
    #[arg(long)]
    list: bool,
    /// Storage dtype [default: bf16 on CUDA, f32 on the CPU].
    #[arg(long)]
    dtype: Option<DType>,
    /// Untimed calls before timing each pass.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Timed calls per pass; the median is reported.
    #[arg(long, default_value_t = 30)]
    runs: usize,
    /// Also write every row, the device, the peaks and the commit as JSON here (atomically).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

fn selected_cases(args: &Args) -> Result<Vec<Case>> {
    for f in &args.families {
        if !FAMILIES.contains(&f.as_str()) {
            bail!("unknown --family {f} (known: {})", FAMILIES.join(", "));
        }
    }
    Ok(cases(args.quick).into_iter().filter(|c| args.families.is_empty() || args.families.iter().any(|f| f == c.family)).collect())
}

pub fn run(spec: DeviceSpec, args: &Args) -> Result<()> {
    anyhow::ensure!(args.runs >= 1, "--runs must be at least 1");
    let cases = selected_cases(args)?;
    if args.list {
        let list: Vec<serde_json::Value> = cases.iter().map(Case::to_json).collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    let selected = select(spec)?;
    if let Some(n) = &selected.notice {
        eprintln!("{n}");
    }
    let device = selected.device;
    if device.is_simulated() {
        anyhow::bail!(
            "sgdm bench measures a GPU, and the simulated CUDA device (cuda-sim) runs kernels on the CPU to check \
             them: its times are not GPU numbers. Use --device cuda on a GPU, or --device cpu for the CPU backend"
        );
    }
    let dtype = args.dtype.unwrap_or(if device.is_cuda() { DType::BF16 } else { DType::F32 });
    let timing = Timing { warmup: args.warmup, runs: args.runs };
    let (peak_flops, peak_bw) = peaks(&device, dtype)?;
    println!(
        "{device} {dtype}, commit {}: peaks measured now: GEMM {:.1} TFLOP/s, copy {:.0} GB/s",
        env!("SGDM_GIT_COMMIT"),
        peak_flops / 1e12,
        peak_bw / 1e9
    );
    println!("{:<15} {:<52} {:<16} {:>10} {:>9} {:>7} {:>8} {:>7}", "family", "case", "pass", "median ms", "TFLOP/s", "%gemm", "GB/s", "%copy");
    let mut all = Vec::new();
    for case in &cases {
        let rows = run_case(&device, dtype, case, timing).with_context(|| format!("bench case {}", case.id))?;
        for r in &rows {
            let (tflops, gbs) = (r.flops / (r.ms * 1e-3) / 1e12, r.bytes / (r.ms * 1e-3) / 1e9);
            println!(
                "{:<15} {:<52} {:<16} {:>10.4} {:>9} {:>7} {:>8.0} {:>6.0}%",
                r.family,
                r.id,
                r.pass,
                r.ms,
                if r.flops > 0.0 { format!("{tflops:.2}") } else { "-".into() },
                if r.flops > 0.0 { format!("{:.0}%", 100.0 * tflops * 1e12 / peak_flops) } else { "-".into() },
                gbs,
                100.0 * gbs * 1e9 / peak_bw
            );
        }
        all.extend(rows);
    }
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "device": device.to_string(),
            "dtype": dtype.to_string(),
            "commit": env!("SGDM_GIT_COMMIT"),
            "warmup": args.warmup,
            "runs": args.runs,
            "peak_gemm_flops": peak_flops,
            "peak_copy_bytes_per_s": peak_bw,
            "rows": all,
        });
        sgdm::util::write_atomic(path, serde_json::to_string_pretty(&doc)?.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
