//! `sgdm reconstruct`: reconstruct the images seen in an EEG file; see [`sgdm::reconstruct`].

use std::path::{Path, PathBuf};

use anyhow::Result;
use sgdm::default_weights::locate;
use sgdm::diffusion::scheduler::SchedulerKind;
use sgdm::memory::arena::human_bytes;
use sgdm::pipeline::{Pipeline, SamplingOptions};
use sgdm::reconstruct::{reconstruct, ReconstructConfig, Shard, Summary};
use sgdm::runtime::select;
use sgdm::util::ItemProgress;
use sgdm::{DType, Device, DeviceSpec};

/// The weights folder for `--weights` (`None`: the default, found as `sgdm::default_weights` describes),
/// announced on stderr with where it came from.
pub fn weights_folder(flag: Option<&Path>) -> Result<PathBuf> {
    let located = locate(flag)?;
    eprintln!("sgdm: weights: {located}");
    Ok(located.dir)
}

/// The sampling flags shared by `reconstruct` and `demo`.
#[derive(clap::Args, Clone)]
pub struct Sampling {
    /// Denoising steps.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// ddim, euler or dpmpp2m (DPM-Solver++ 2M).
    #[arg(long, default_value = "dpmpp2m")]
    pub scheduler: SchedulerKind,
    /// Classifier-free guidance scale, at least 1 (1: conditional branch only, half the work).
    #[arg(long, default_value_t = 3.0, allow_negative_numbers = true)]
    pub guidance: f32,
    /// Multiplies the ControlNet's residuals (0 switches the ControlNet off: the structure map is ignored and
    /// the ControlNet not evaluated; negative pushes away from the map).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub controlnet_scale: f32,
    /// Seeds every item's initial noise together with its index.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Items denoised together.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
}

impl Sampling {
    pub fn options(&self) -> SamplingOptions {
        SamplingOptions {
            steps: self.steps,
            scheduler: self.scheduler,
            guidance: self.guidance,
            controlnet_scale: self.controlnet_scale,
            seed: self.seed,
        }
    }
}

#[derive(clap::Args)]
pub struct Args {
    /// EEG file: .npy [items, repetitions, channels, time] or [items, channels, time] (read by rows from
    /// its memory map), or a THINGS-EEG2 / pickle dict; repetitions are averaged.
    #[arg(long, value_name = "FILE")]
    eeg: PathBuf,
    /// The seen images, one per EEG item: a folder of images in file-name order, or a THINGS image folder
    /// (one folder per concept, e.g. test_images/) in THINGS order; recorded in the manifest for `sgdm eval`.
    #[arg(long, value_name = "DIR")]
    images: Option<PathBuf>,
    /// Weights folder written by `sgdm train all` [default: $SGDM_WEIGHTS, else weights/ beside the
    /// executable, else the model built into this binary].
    #[arg(long, value_name = "DIR")]
    weights: Option<PathBuf>,
    /// Output folder: images/, structure/, manifest.jsonl, run.json (a rerun resumes).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    #[command(flatten)]
    sampling: Sampling,
    /// Take the items with index % N == K (K from 0), to split a file across processes or nodes.
    #[arg(long, value_name = "K/N", default_value = "0/1")]
    shard: Shard,
    /// Only the first N items of the file (N >= 1).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    limit: Option<u64>,
    /// Condition the ControlNet on these structure maps instead of those predicted from the EEG: a .npy of
    /// float maps [items, 16, 16], row i for EEG item i (e.g. a dataset's true targets, edges16/test.npy).
    #[arg(long, value_name = "FILE")]
    structure_maps: Option<PathBuf>,
}

/// The storage dtype for a device: f32 on the CPU reference, bf16 on CUDA.
pub fn dtype_for(device: &Device) -> DType {
    if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    }
}

pub fn print_summary(s: &Summary, steps: usize) {
    println!(
        "{} image(s) written, {} already finished, {} owned by this shard; {:.1} s, {:.2} images/s",
        s.written,
        s.skipped,
        s.owned,
        s.seconds,
        s.images_per_second()
    );
    if s.written > 0 {
        println!("  {:.3} s per denoising step at batch {} ({steps} steps a batch)", s.seconds_per_step, s.batch);
    }
    println!("  peak tensor memory: host {}, device {}", human_bytes(s.peak_host_bytes as usize), human_bytes(s.peak_device_bytes as usize));
}

pub fn run(spec: DeviceSpec, args: &Args) -> Result<()> {
    let selected = select(spec)?;
    if let Some(n) = &selected.notice {
        eprintln!("{n}");
    }
    let device = selected.device;
    let weights = weights_folder(args.weights.as_deref())?;
    let pipeline = Pipeline::open(&weights, &device, dtype_for(&device))?;
    let cfg = ReconstructConfig {
        eeg: args.eeg.clone(),
        images: args.images.clone(),
        out: args.out.clone(),
        sampling: args.sampling.options(),
        batch: args.sampling.batch,
        shard: args.shard,
        limit: args.limit.map(|n| n as usize),
        structure_maps: args.structure_maps.clone(),
    };
    let mut progress = ItemProgress::new("reconstruct", "images");
    let summary = reconstruct(&pipeline, &cfg, &mut |done, total| progress.update(done, total))?;
    print_summary(&summary, args.sampling.steps);
    println!("wrote {}", args.out.join("manifest.jsonl").display());
    Ok(())
}
