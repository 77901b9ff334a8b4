//! The `sgdm` command line: a thin layer over the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;

#[derive(Parser)]
#[command(
    name = "sgdm",
    version,
    about = "Structure-Guided Diffusion Model engine: reconstruct seen images from EEG, on CPU or CUDA",
    after_help = "Examples:\n  sgdm info                    devices, driver and NVRTC versions, kernel cache\n  \
                  sgdm kernels --arch sm_90    compile every kernel for H100 and show registers and spills\n  \
                  sgdm --device cpu info       force the CPU backend\n  \
                  sgdm --device cuda-sim info  the simulated CUDA device (cudasim/README.md)\n  \
                  sgdm synth --out data/synth  write the simulated default dataset\n  \
                  sgdm data inspect eeg.npy    format, shape, channels and statistics of an EEG file\n  \
                  sgdm data import things-eeg2 --eeg-dir sub-01 --images-dir image_set --out data/things\n\n\
                  Environment:\n  SGDM_CACHE_DIR   where compiled kernels (cubins, the simulator's host builds) and the unpacked default weights are cached \
                  (default: $XDG_CACHE_HOME/sgdm or ~/.cache/sgdm)\n  \
                  SGDM_WEIGHTS     the weights folder when --weights is not given (else weights/ beside this\n                   \
                  executable, else the default model built into it)\n  \
                  LD_LIBRARY_PATH  must reach libnvrtc.so.13 (and libnvrtc-builtins) for CUDA"
)]
struct Cli {
    /// Where to run: auto (CUDA if usable, else CPU with a notice), cpu, cuda, cuda:N, or cuda-sim (the
    /// simulated CUDA device: the CUDA path checked on the CPU, for correctness, never speed). synth and data
    /// run on the CPU only and refuse the others.
    #[arg(long, global = true, default_value = "auto", value_name = "DEVICE")]
    device: sgdm::DeviceSpec,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The whole job on the shipped default model, with no GPU and no download: synthesise the default
    /// dataset, reconstruct its test split from EEG, evaluate against a shuffled control, write
    /// out/demo/sheet.png and out/demo/metrics.json.
    #[command(after_help = "Examples:\n  \
                            sgdm demo                         everything into out/demo (a rerun reuses what is there)\n  \
                            sgdm demo --items 40 --steps 10   a quicker look\n  \
                            sgdm demo --weights runs/all      your own `sgdm train all` output instead of weights/\n\n\
                            Writes OUT/data (the dataset), OUT/recon (images, structure maps, manifest), OUT/metrics.json\n\
                            and OUT/sheet.png (seen | true structure | structure map from EEG | reconstruction | reconstruction\n\
                            without structure, for the first 24 test items); metrics.json holds the structure metrics, the ridge\n\
                            floor and the ablation (the first --ablation-items figures, seeds 0, 1, 2).\n\n\
                            A rerun resumes: it reuses OUT/data when it holds the default dataset, and the finished images of\n\
                            OUT/recon made with the same weights, --steps, --scheduler, --guidance, --controlnet-scale and\n\
                            --seed; with other ones it says what changed and starts the reconstructions over (the dataset is\n\
                            kept). --items only chooses how many are needed. To start over entirely, delete OUT.")]
    Demo(cli::demo::Args),
    /// Print the devices found, driver and NVRTC versions (or why CUDA is unavailable) and the kernel cache.
    #[command(after_help = "Examples:\n  sgdm info\n  sgdm --device cuda:1 info")]
    Info,
    /// Compile every CUDA kernel with NVRTC (no GPU needed) and print registers, shared memory and spills.
    #[command(after_help = "Examples:\n  sgdm kernels --arch sm_90          H100/H200\n  \
                            sgdm kernels --arch sm_80          A100\n  \
                            sgdm kernels --arch sm_90 --file elementwise.cu\n\n\
                            Without --arch, the architecture of the selected CUDA device is used.\n\
                            The cubins are written to the kernel cache, so this also prewarms it.")]
    Kernels(cli::kernels::Args),
    /// Run one model (UNet, ControlNet, AutoencoderKL or an SGDM module) on tensors from a safetensors file,
    /// optionally backward, and write the results: the conformance and debugging tool.
    #[command(after_help = "Examples:\n  \
                            sgdm forward tests/fixtures/models/contrastive_alignment \\\n      \
                            --inputs tests/fixtures/models/contrastive_alignment/inputs.safetensors --output out.safetensors\n  \
                            sgdm forward MODEL_DIR --inputs in.safetensors --grad-outputs g.safetensors --output out.safetensors\n  \
                            sgdm --device cuda forward MODEL_DIR --inputs in.safetensors --output out.safetensors --dtype bf16\n  \
                            sgdm --device cuda forward MODEL_DIR --inputs in.safetensors --grad-outputs g.safetensors \\\n      \
                            --output out.safetensors --dtype bf16 --compare MODEL_DIR/expected.safetensors\n\n\
                            Tensor names follow the PyTorch call: e.g. UNet2DConditionModel takes sample, timestep,\n\
                            encoder_hidden_states (and down_block_additional_residuals.{i}, mid_block_additional_residual)\n\
                            and returns sample; with --grad-outputs it also writes grad.<input> and grad.<parameter>.")]
    Forward(cli::forward::Args),
    /// Write the simulated default dataset: tangram stimuli, their structure maps and simulated posterior
    /// EEG (THINGS-EEG2 layout: 17 channels, 100 Hz, -0.2 to 0.8 s).
    #[command(after_help = "Examples:\n  sgdm synth --out data/synth                 default: 1000/100/200 figures, 4/4/80 repetitions\n  \
                            sgdm synth --out data/noise --snr 0         background EEG only (a chance-level control)\n  \
                            sgdm synth --out data/small --train-figures 200 --test-figures 50 --seed 7\n  \
                            sgdm synth --out data/synth --force         replace an earlier run\n\n\
                            Writes DIR/manifest.json, DIR/eeg/<split>.npy [figures, reps, 17, 100] in microvolts,\n\
                            DIR/images/<split>/<index>.png, DIR/structure/<split>/<index>.png and\n\
                            DIR/edges16/<split>.npy [figures, 16, 16]. See docs/synth.md.")]
    Synth(cli::synth::Args),
    /// Train the SGDM stages from a TOML configuration on a dataset (`sgdm synth`'s or `sgdm data import`'s):
    /// base, vae, encoder, controlnet, or all of them in order. Trains on the train split, validates on val,
    /// never reads test. The first Ctrl-C stops at the end of the current step with a checkpoint and prints
    /// how to continue.
    #[command(after_help = "Examples:\n  \
                            sgdm train vae --config train.toml --out runs/vae\n  \
                            sgdm train encoder --config train.toml --out runs/encoder\n  \
                            sgdm train vae --config train.toml --out runs/vae --resume runs/vae/vae-step000500.safetensors\n  \
                            sgdm train all --config train.toml --out runs/all     rerun it to continue after Ctrl-C\n\n\
                            `all` runs base (if [base] is present), vae, encoder and controlnet into one --out, skipping a\n\
                            stage whose final output is there and resuming one from its latest checkpoint there; it sets the\n\
                            paths to earlier stages' outputs itself (encoder.vae_weights, controlnet.structural_vae_weights,\n\
                            encoder_weights, eeg_standardization, and vae/unet when [base] is present), so leave them out.\n\n\
                            train.toml (sizes for `sgdm synth`'s default dataset):\n  \
                            [vae]\n  data = \"data/synth\"\n  beta = 0.001\n  lambda = 1.0\n  \
                            [vae.train]\n  steps = 2000\n  batch = 32\n  lr = 1e-3\n  warmup = 100\n  seed = 0\n  \
                            [vae.model]\n  latent_dim = 64\n  structure_dim = 256\n  image_size = 64\n  channels = [16, 32, 64]\n  hidden = 256\n  \
                            [encoder]\n  data = \"data/synth\"\n  vae_weights = \"runs/vae/vae.safetensors\"\n  temperature = 0.07\n  \
                            [encoder.vae]   # the [vae.model] values\n  ...\n  \
                            [encoder.train]\n  steps = 2000\n  batch = 32\n  lr = 1e-3\n  \
                            [encoder.model]\n  n_channels = 17\n  n_timepoints = 100\n  latent_dim = 64\n  lstm_hidden = 64\n  \
                            lstm_layers = 1\n  spatial_channels = [32, 64]\n  fusion_hidden = 128\n\n\
                            weights/train.toml is the configuration the shipped model was trained with (all four stages);\n\
                            configs/things-eeg2.toml trains the same models on an imported THINGS-EEG2 dataset, and\n\
                            configs/things-eeg2-sd15.toml starts from Stable Diffusion 1.5 (docs/things-eeg2.md).\n\
                            Keys the data decides may be left out and are read from the dataset's manifest.json: n_channels\n\
                            and n_timepoints of [encoder.model] and [controlnet.encoder], image_size of [base], [vae.model],\n\
                            [encoder.vae] and [controlnet.structural_vae], [base.unet_model] sample_size, and [controlnet]\n\
                            image_size (the base VAE's sample_size, else [base] image_size, else the dataset's).\n\
                            [base] pretrained = \"DIR\" (a diffusers Stable Diffusion folder with vae/ and unet/) replaces\n\
                            the base stage: nothing is trained, the ControlNet starts from DIR's UNet as diffusers'\n\
                            ControlNetModel.from_unet does, and base.json records DIR for reconstruct.\n\
                            A single stage reads only its own table, so one file can hold every stage; the keys `all` fills in\n\
                            must then be given (e.g. [encoder] vae_weights). A key nothing reads is refused by name, in the\n\
                            diffusers model tables [base.vae_model] and [base.unet_model] too.\n\n\
                            Resuming: `all` rerun with the same --config and --out skips the stages whose final output is there\n\
                            and resumes an interrupted one from its latest checkpoint (a checkpoint resumes only under the\n\
                            configuration it was written with; a killed run loses at most the steps since it). To start over,\n\
                            delete --out or give another. A non-finite loss stops a stage with an error (nothing is written\n\
                            for that step); final parameters are never written with NaN or Inf in them.\n\n\
                            [<stage>.train] also takes min_lr, weight_decay, max_grad_norm, checkpoint_every (500),\n\
                            log_every (10) and select_best (true: the final parameters are the checkpoint with the lowest\n\
                            validation loss). [encoder.image_embeddings] train/val = .npy [figures, latent_dim] aligns the\n\
                            encoder with precomputed image embeddings (e.g. CLIP) instead of the VAE's mu.\n\
                            [encoder.model] structure_dim (with [encoder] structure_weight > 0) gives the encoder its own\n\
                            structure head, trained with it (InfoNCE + weight x structure MSE / the targets' variance;\n\
                            structure_hidden > 0 makes it an MLP), and linear_path = true a linear read-out of the EEG\n\
                            beside its two branches; weights/train.toml uses both (the same keys in [controlnet.encoder]).\n\
                            --device cuda trains in bf16 with f32 master weights.\n\
                            DIR receives <stage>.jsonl, <stage>-step<N>.safetensors checkpoints, <stage>.safetensors\n\
                            and, for encoder, eeg_standardization.json (per-channel statistics of the train split).")]
    Train(cli::train::Args),
    /// Reconstruct the images seen in an EEG file: encoder -> structure map -> ControlNet-guided denoising
    /// -> VAE decode; PNGs and a manifest, resumable, shardable across processes.
    #[command(after_help = "Examples:\n  \
                            sgdm reconstruct --eeg data/synth/eeg/test.npy --images data/synth/images/test --out out/recon\n  \
                            sgdm reconstruct --eeg eeg.npy --weights runs/all --out out/recon --steps 30 --guidance 4\n  \
                            sgdm reconstruct --eeg eeg.npy --out out/recon --shard 2/8     the third of 8 processes\n  \
                            sbatch --array=0-7 --wrap 'sgdm reconstruct --eeg eeg.npy --out out/recon --shard $SLURM_ARRAY_TASK_ID/8'\n\n\
                            Writes OUT/images/<index>.png, OUT/structure/<index>.png (the structure map predicted from the\n\
                            EEG), OUT/manifest.jsonl (one line per finished item) and OUT/run.json (the settings).\n\n\
                            Resuming: a rerun into the same OUT skips the finished items, so a killed run resumes where it\n\
                            stopped, as long as the EEG file's content (a checksum, not just its path), the weights folder\n\
                            and --steps, --scheduler, --guidance, --controlnet-scale and --seed are those in OUT/run.json;\n\
                            --batch, --shard, --limit and --images may change. Anything else is refused before a file is\n\
                            written (a folder where no item was finished takes the new settings). To start over, delete\n\
                            OUT (rm -r OUT) or give another --out.\n\n\
                            Every setting is checked before the first write, and a batch whose images come out NaN or Inf\n\
                            fails the run instead of being written. On CUDA the models run in bf16; on the CPU in f32.")]
    Reconstruct(cli::reconstruct::Args),
    /// Evaluate reconstructions: N-way retrieval top-1/top-5, PixCorr, SSIM and 2-way identification, next
    /// to a control with the items shuffled; writes metrics.json and a contact sheet.
    #[command(after_help = "Examples:\n  \
                            sgdm eval --recon out/recon --out out/eval\n  \
                            sgdm eval --recon out/seed0 --recon out/seed1 --recon out/seed2 --out out/eval   averaged over seeds\n  \
                            sgdm eval --recon out/recon --images data/synth/images/test --out out/eval --sheet-items 48\n  \
                            sgdm eval --recon out/recon --out out/eval --items 40        a run made with --limit 40\n  \
                            sgdm eval --recon out/recon --out out/eval --allow-incomplete   score what is finished so far\n\n\
                            A folder must be complete: every item of the EEG file (or its first --items) reconstructed, with\n\
                            the EEG file's content unchanged since. An incomplete one is refused, naming the missing items,\n\
                            unless --allow-incomplete, which prints them and lists them in metrics.json as \"missing\".\n\n\
                            Retrieval and 2-way identification compare in the StructuralVAE's latent space (its mu);\n\
                            PixCorr uses RGB values, SSIM grayscale (scikit-image's definition), both at the reconstruction's\n\
                            size. The control pairs every item with another item's image (a seeded derangement): chance,\n\
                            measured on the same data. sheet.png shows seen | true structure | structure map from EEG | reconstruction (and with\n\
                            --ablation | reconstruction without structure).")]
    Eval(cli::eval::Args),
    /// Profile a denoising step (ControlNet + UNet): time per op family, share of the step, FLOPs and bytes,
    /// achieved TFLOP/s and GB/s against the device's peaks measured here.
    #[command(after_help = "Examples:\n  \
                            sgdm profile                                  the shipped default model, batch 1\n  \
                            sgdm --device cuda profile --model sd15 --batch 4\n  \
                            sgdm profile --model sd15 --steps 1           SD 1.5 at 512x512 on the CPU (slow: ~30 s a step)\n  \
                            sgdm profile --json > profile.json\n\n\
                            FLOPs count a multiply-add as 2 and bytes are each tensor read or written once (the op's minimum\n\
                            traffic). The peaks are the best of a few square GEMMs and copies in the same dtype. On CUDA each op\n\
                            is synchronised while profiled, so the plain step time is reported too.")]
    Profile(cli::profile::Args),
    /// Time our kernels at the shapes of the speed targets (SD 1.5 conv, attention and GroupNorm + SiLU; the
    /// EEG encoder's LSTM; InfoNCE), forward and backward, against the device's peaks measured in the run.
    #[command(after_help = "Examples:\n  \
                            sgdm --device cuda bench                       every family at the target shapes, bf16\n  \
                            sgdm --device cuda bench --family conv --json conv.json\n  \
                            sgdm bench --quick                             small shapes, seconds on a CPU\n  \
                            sgdm bench --list > cases.json                 the cases, for benches/gpu/torch_ops.py\n\n\
                            Each pass is timed as the median of --runs calls after --warmup (CUDA events on a GPU). FLOPs count\n\
                            a multiply-add as 2 (attention backward: 2.5x forward); bytes are the op's minimum traffic.\n\
                            benches/gpu/compare.sh runs this and PyTorch on the same shapes and prints the ratios.")]
    Bench(cli::bench::Args),
    /// Look inside EEG data files; import real datasets (THINGS-EEG2) into the layout `sgdm train` reads.
    #[command(
        subcommand,
        after_help = "Examples:\n  sgdm data inspect preprocessed_eeg_training.npy\n  \
                      sgdm data import things-eeg2 --eeg-dir sub-01 --images-dir image_set --out data/things-sub01"
    )]
    Data(cli::data::Command),
}

/// Refuses a device other than the CPU for a command that only runs there, rather than ignore it.
fn cpu_only(device: &sgdm::DeviceSpec, command: &str) -> anyhow::Result<()> {
    match device {
        sgdm::DeviceSpec::Auto | sgdm::DeviceSpec::Cpu => Ok(()),
        other => anyhow::bail!("sgdm {command} runs on the CPU only: --device {other} does not apply to it (leave --device out)"),
    }
}

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, so writing to a closed pipe (`sgdm data inspect FILE | head`) would make
    // println! panic. The default action ends the program quietly, as for any Unix tool.
    // SAFETY: restoring a signal's default disposition at start-up, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info => cli::info::run(cli.device),
        Command::Kernels(args) => cli::kernels::run(cli.device, &args),
        Command::Forward(args) => cli::forward::run(cli.device, &args),
        Command::Synth(args) => cpu_only(&cli.device, "synth").and_then(|()| cli::synth::run(&args)),
        Command::Data(command) => cpu_only(&cli.device, "data").and_then(|()| cli::data::run(&command)),
        Command::Train(args) => cli::train::run(cli.device, &args),
        Command::Reconstruct(args) => cli::reconstruct::run(cli.device, &args),
        Command::Eval(args) => cli::eval::run(cli.device, &args),
        Command::Demo(args) => cli::demo::run(cli.device, &args),
        Command::Profile(args) => cli::profile::run(cli.device, &args),
        Command::Bench(args) => cli::bench::run(cli.device, &args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sgdm: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
