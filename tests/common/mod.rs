//! Helpers shared by the integration tests: skips that stay visible, random data, tolerance checks that
//! report their errors, and central finite differences in float64.
#![allow(dead_code)] // each test binary uses its own subset

pub mod things;

use std::io::Write;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sgdm::runtime::select;
use sgdm::tensor::{bytes_to_f32, f32_to_bytes};
use sgdm::{DType, Device, DeviceSpec, Tensor};

/// Reports a test that cannot run here. Written straight to stderr, past libtest's output capture, so a
/// skip is always visible in the test log and never passes silently.
pub fn skipped(what: &str, reason: impl std::fmt::Display) {
    let _ = writeln!(std::io::stderr(), "SKIPPED: {what}: {reason}");
}

/// The `sgdm` binary under test: `$SGDM_BIN` when set (the GPU bundle runs test binaries away from the build
/// tree), else the one cargo built for this test run.
pub fn sgdm_bin() -> std::path::PathBuf {
    std::env::var_os("SGDM_BIN").map(Into::into).unwrap_or_else(|| env!("CARGO_BIN_EXE_sgdm").into())
}

/// The repository root, where `tests/fixtures/` lives: `$SGDM_REPO_ROOT` when set (the GPU bundle runs test
/// binaries in a copy of the tree at another path), else the source tree this binary was built from.
pub fn repo_root() -> std::path::PathBuf {
    std::env::var_os("SGDM_REPO_ROOT").map(Into::into).unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
}

/// The CUDA device the CUDA tests run on: `$SGDM_DEVICE` (`cuda` or `cuda-sim`) when set, failing the test if it
/// cannot be opened; otherwise a real GPU when one is usable, else the simulated device (cudasim/), else None
/// after printing SKIPPED with the reason.
pub fn gpu_or_skip(what: &str) -> Option<Device> {
    let requested = match std::env::var("SGDM_DEVICE").as_deref() {
        Ok("cuda") => Some(DeviceSpec::Cuda(0)),
        Ok("cuda-sim") => Some(DeviceSpec::CudaSim),
        Ok("") | Err(_) => None,
        Ok(other) => panic!("SGDM_DEVICE={other}: the CUDA tests run on cuda or cuda-sim"),
    };
    if let Some(spec) = requested {
        return Some(select(spec).unwrap_or_else(|e| panic!("{what}: SGDM_DEVICE={spec}: {e:#}")).device);
    }
    let real = sgdm::runtime::probe::driver().is_ok_and(|d| d.device_count > 0 && !d.simulated);
    let spec = if real { DeviceSpec::Cuda(0) } else { DeviceSpec::CudaSim };
    match select(spec) {
        Ok(s) => Some(s.device),
        Err(e) => {
            skipped(what, format!("no usable CUDA device, real or simulated: {e:#}"));
            None
        }
    }
}

/// Whether the simulated CUDA device can run here (built into this binary, and a C++ compiler for the kernels'
/// host builds); otherwise prints SKIPPED with the reason and returns false, or fails the test when
/// `SGDM_DEVICE=cuda-sim` asks for the simulator.
pub fn simulator_or_skip(what: &str) -> bool {
    let compiler = std::env::var("CXX").ok().filter(|c| !c.is_empty()).unwrap_or_else(|| "c++".into());
    let why = match sgdm::runtime::cudasim::built_in() {
        Err(e) => e,
        Ok(()) => match std::process::Command::new(&compiler).arg("--version").output() {
            Ok(out) if out.status.success() => return true,
            _ => format!("the simulator compiles kernels for the host and there is no C++ compiler `{compiler}` here"),
        },
    };
    if std::env::var("SGDM_DEVICE").as_deref() == Ok("cuda-sim") {
        panic!("{what}: SGDM_DEVICE=cuda-sim, but {why}");
    }
    skipped(what, why);
    false
}

/// `n` uniform values in `[lo, hi)`, reproducible from `seed`.
pub fn random(n: usize, lo: f32, hi: f32, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// Values as they are after storing them in `dtype`.
pub fn rounded(dtype: DType, v: &[f32]) -> Vec<f32> {
    bytes_to_f32(dtype, &f32_to_bytes(dtype, v))
}

/// A CPU f32 tensor.
pub fn cpu(shape: &[usize], values: &[f32]) -> Tensor {
    Tensor::from_f32(&Device::Cpu, shape, DType::F32, values).unwrap()
}

thread_local! {
    /// Failures recorded instead of panicking, while [`defer_failures`] is on for this thread.
    static DEFERRED: std::cell::RefCell<Option<Vec<String>>> = const { std::cell::RefCell::new(None) };
}

/// From now on, on this thread, a failed [`compare`] prints its FAIL row and records the failure instead of
/// panicking, so one run reports every row (the GPU parity table) rather than stopping at the first; collect
/// them with [`take_failures`].
pub fn defer_failures() {
    DEFERRED.with(|d| *d.borrow_mut() = Some(Vec::new()));
}

/// The failures recorded since [`defer_failures`] (empty when it was never called).
pub fn take_failures() -> Vec<String> {
    DEFERRED.with(|d| d.borrow_mut().as_mut().map(std::mem::take).unwrap_or_default())
}

/// Records a failure when [`defer_failures`] is on, else panics with it.
pub fn fail(message: String) {
    let deferred = DEFERRED.with(|d| d.borrow_mut().as_mut().map(|list| list.push(message.clone())).is_some());
    if !deferred {
        panic!("{message}");
    }
}

/// Checks `|got - want| <= rel * |want| + floor` element by element, and prints one `PARITY` row with the max
/// abs and relative L2 errors, the bound and pass/FAIL, so every tolerance check leaves a line in the log
/// (benches/gpu/parity.sh gathers the rows into its table). A failure names the worst element and the count.
pub fn compare(what: &str, got: &[f32], want: &[f32], rel: f32, floor: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let mut max_abs = 0f32;
    let (mut num, mut den) = (0f64, 0f64);
    let mut bad = 0usize;
    // (element, excess over its bound); NaN anywhere counts as out of bounds.
    let mut worst: Option<(usize, f32)> = None;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        let bound = rel * w.abs() + floor;
        if d.partial_cmp(&bound).is_none_or(|o| o.is_gt()) {
            bad += 1;
            let excess = if d.is_nan() { f32::INFINITY } else { d - bound };
            if worst.is_none_or(|(_, e)| excess > e) {
                worst = Some((i, excess));
            }
        }
        max_abs = if d.is_nan() { f32::NAN } else { max_abs.max(d) };
        num += (d as f64).powi(2);
        den += (*w as f64).powi(2);
    }
    let verdict = if bad == 0 { "pass" } else { "FAIL" };
    println!("PARITY {what:<36} max abs {max_abs:.3e}  rel L2 {:.3e}  bound {rel:.1e}*|x|+{floor:.0e}  {verdict}", (num / den.max(1e-300)).sqrt());
    if let Some((i, _)) = worst {
        fail(format!(
            "{what}: {bad} of {} elements out of bounds; worst element {i}: got {}, want {} (bound {rel:e}*|want|+{floor:e})",
            got.len(),
            got[i],
            want[i]
        ));
    }
}

/// A tensor leased from `pool` holding `values` in `dtype`.
pub fn upload(pool: &sgdm::memory::pool::Pool, shape: &[usize], dtype: DType, values: &[f32]) -> Tensor {
    let mut t = pool.alloc(shape, dtype).unwrap();
    t.write_f32(values).unwrap();
    t
}

/// A CPU f32 tensor of zeros.
pub fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(&Device::Cpu, shape, DType::F32).unwrap()
}

/// Float64 values of an f32 slice.
pub fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Checks an analytic gradient of a scalar function against central differences of a float64 reference of
/// that function, at up to `samples` coordinates spread over `x`. `loss(x)` is the f64 forward reduced to a
/// scalar (typically `sum(y * g)` for a fixed random `g`, whose gradient is the backward with `dy = g`).
pub fn check_gradient(what: &str, x: &[f32], analytic: &[f32], loss: impl Fn(&[f64]) -> f64, samples: usize, rel: f64, abs: f64) {
    assert_eq!(x.len(), analytic.len(), "{what}: gradient length");
    let h = 1e-6;
    let mut xs = f64s(x);
    let step = (x.len() / samples.max(1)).max(1);
    let mut max_err = 0f64;
    for i in (0..x.len()).step_by(step) {
        let orig = xs[i];
        xs[i] = orig + h;
        let up = loss(&xs);
        xs[i] = orig - h;
        let down = loss(&xs);
        xs[i] = orig;
        let numeric = (up - down) / (2.0 * h);
        let err = (analytic[i] as f64 - numeric).abs();
        assert!(
            err <= rel * numeric.abs() + abs,
            "{what}: d/dx[{i}]: analytic {}, central difference {numeric} (bound {rel:e}*|fd|+{abs:e})",
            analytic[i]
        );
        max_err = max_err.max(err);
    }
    println!("{what:<36} gradient vs central differences: max abs err {max_err:.3e}  pass");
}

/// A `sgdm train all` configuration of tiny models (32x32 images, 16x16 latents) for the dataset `data`,
/// five steps a stage: seconds on a CPU.
#[allow(dead_code)]
pub fn tiny_train_config(data: &std::path::Path) -> String {
    tiny_train_config_with_steps(data, 5)
}

/// [`tiny_train_config`] with `steps` optimizer steps per stage (checkpointed at the last).
pub fn tiny_train_config_with_steps(data: &std::path::Path, steps: usize) -> String {
    let data = data.display().to_string();
    let loop_toml = |table: &str, lr: f64| {
        format!(
            "[{table}]\nsteps = {steps}\nbatch = 8\nlr = {lr}\nwarmup = {}\nseed = 1\ncheckpoint_every = {steps}\nlog_every = {steps}\n",
            steps.min(2)
        )
    };
    let vae_model = "latent_dim = 8\nstructure_dim = 256\nimage_size = 32\nchannels = [4, 8, 8]\nhidden = 32\n";
    let encoder_model =
        "n_channels = 17\nn_timepoints = 100\nlatent_dim = 8\nlstm_hidden = 8\nlstm_layers = 1\nspatial_channels = [8, 8]\nfusion_hidden = 16\n";
    format!(
        "[base]\ndata = {data:?}\nimage_size = 32\nkl_weight = 1e-6\ncontext_tokens = 4\n\
         [base.vae_model]\nblock_out_channels = [8, 16]\ndown_block_types = [\"DownEncoderBlock2D\", \"DownEncoderBlock2D\"]\n\
         up_block_types = [\"UpDecoderBlock2D\", \"UpDecoderBlock2D\"]\nlatent_channels = 4\nlayers_per_block = 1\nnorm_num_groups = 4\nscaling_factor = 0.5\n\
         [base.unet_model]\nsample_size = 16\nblock_out_channels = [16, 32]\ndown_block_types = [\"CrossAttnDownBlock2D\", \"DownBlock2D\"]\n\
         up_block_types = [\"UpBlock2D\", \"CrossAttnUpBlock2D\"]\nlayers_per_block = 1\nattention_head_dim = 2\ncross_attention_dim = 16\nnorm_num_groups = 4\n\
         {}{}\
         [vae]\ndata = {data:?}\nbeta = 1e-3\nlambda = 1.0\n{}[vae.model]\n{vae_model}\
         [encoder]\ndata = {data:?}\ntemperature = 0.1\n{}[encoder.vae]\n{vae_model}[encoder.model]\n{encoder_model}\
         [controlnet]\ndata = {data:?}\nimage_size = 32\ntokens = 2\ncondition_dropout = 0.2\nconditioning_embedding_out_channels = [8, 16]\n\
         {}[controlnet.structural_vae]\n{vae_model}[controlnet.encoder]\n{encoder_model}",
        loop_toml("base.vae_train", 3e-3),
        loop_toml("base.unet_train", 2e-3),
        loop_toml("vae.train", 3e-3),
        loop_toml("encoder.train", 3e-3),
        loop_toml("controlnet.train", 2e-3),
    )
}

/// Runs the `sgdm` binary with `args`; returns (success, stdout, stderr).
#[allow(dead_code)]
pub fn run_sgdm<I, S>(args: I) -> (bool, String, String)
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = std::process::Command::new(sgdm_bin()).args(args).output().expect("cannot run sgdm");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The tiny synthetic dataset the tiny model trains on (24/8/6 figures, 2/2/4 repetitions, seed 5), written
/// into `out` by `sgdm synth`.
pub fn tiny_synth(out: &std::path::Path) {
    let (ok, _, err) = run_sgdm([
        "synth",
        "--out",
        out.to_str().unwrap(),
        "--train-figures",
        "24",
        "--val-figures",
        "8",
        "--test-figures",
        "6",
        "--train-reps",
        "2",
        "--val-reps",
        "2",
        "--test-reps",
        "4",
        "--seed",
        "5",
        "--force",
    ]);
    assert!(ok, "sgdm synth failed: {err}");
}

/// A tiny synthetic dataset (24/8/6 figures, 6 test figures of 4 repetitions) and a weights folder trained
/// on it by `sgdm train all` with [`tiny_train_config`], made once per test binary: (dataset, weights).
#[allow(dead_code)]
pub fn tiny_model() -> &'static (std::path::PathBuf, std::path::PathBuf) {
    static MODEL: std::sync::OnceLock<(std::path::PathBuf, std::path::PathBuf)> = std::sync::OnceLock::new();
    MODEL.get_or_init(|| {
        let root = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("tiny_model_{}", std::process::id()));
        let (data, weights) = (root.join("data"), root.join("weights"));
        tiny_synth(&data);
        std::fs::write(root.join("train.toml"), tiny_train_config(&data)).unwrap();
        let (ok, out, err) = run_sgdm(["train", "all", "--config", root.join("train.toml").to_str().unwrap(), "--out", weights.to_str().unwrap()]);
        assert!(ok, "sgdm train all failed:\n{out}\n{err}");
        (data, weights)
    })
}

/// The tiny UNet of tests/fixtures/models/unet_tiny (a cross-attention down block, a plain one, their up
/// blocks, the mid block) with seeded random parameters, and inputs for batch 2: (model, parameters,
/// sample, context, timesteps).
#[allow(dead_code)]
pub fn tiny_unet() -> (sgdm::models::unet::UNet, sgdm::nn::ParamStore, Tensor, Tensor, Tensor) {
    let path = repo_root().join("tests/fixtures/models/unet_tiny/config.json");
    let value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let unet = sgdm::models::unet::UNet::new(sgdm::models::unet::UNetConfig::from_json(&path, &value).unwrap()).unwrap();
    let p = sgdm::nn::ParamStore::random_owned(&unet.params, &Device::Cpu, DType::F32, 3).unwrap();
    let sample = cpu(&[2, 4, 8, 8], &random(2 * 4 * 64, -1.0, 1.0, 1));
    let context = cpu(&[2, 5, 16], &random(2 * 5 * 16, -1.0, 1.0, 2));
    let timestep = cpu(&[2], &[10.0, 900.0]);
    (unet, p, sample, context, timestep)
}

/// Tensors filled with NaN, as reused pool memory may hold anything: an op that reads an element
/// before writing it shows it in its results.
pub struct NanFilled(pub Device);

impl sgdm::nn::Allocator for NanFilled {
    fn alloc(&mut self, shape: &[usize], dtype: DType) -> anyhow::Result<Tensor> {
        Tensor::from_f32(&self.0, shape, dtype, &vec![f32::NAN; shape.iter().product()])
    }
}
