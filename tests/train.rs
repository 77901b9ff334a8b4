//! The training machinery: the learning-rate schedule against values worked out by hand, AdamW (with
//! global-norm clipping) against torch.optim.AdamW (tests/fixtures/train, made by make_fixture.py there),
//! gradient accumulation by loss scaling, checkpoints that resume bit-identically on CPU and refuse what is
//! not theirs, and the JSONL log.

mod common;

use std::path::{Path, PathBuf};

use common::compare;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sgdm::models::sgdm::{StructuralVae, StructuralVaeConfig, StructuralVaeOutputGrads};
use sgdm::nn::{Grads, ParamId, ParamStore, ParamTree, Standalone};
use sgdm::ops::loss::{kl_loss, kl_loss_backward, mse_loss, mse_loss_backward, PARTIALS};
use sgdm::ops::optim::AdamW;
use sgdm::train::{config_id, load_checkpoint, save_checkpoint, LrSchedule, Optimizer, OptimizerConfig, Progress, RngState, StepLog};
use sgdm::util::format_duration;
use sgdm::weights::{save_safetensors, SafetensorsFile};
use sgdm::{DType, Device, Tensor};

fn close(got: f64, want: f64) {
    assert!((got - want).abs() <= 1e-12 * want.abs().max(1.0), "got {got}, want {want}");
}

#[test]
fn schedule_warms_up_linearly_then_decays_by_half_cosine_to_the_floor() {
    let s = LrSchedule::new(1.0, 0.1, 4, 12).unwrap();
    // Warm-up: peak * (step + 1) / 4.
    for (step, want) in [(0, 0.25), (1, 0.5), (2, 0.75), (3, 1.0)] {
        close(s.lr(step), want);
    }
    // Decay over steps 4..12: progress p = (step - 4) / 8, lr = 0.1 + 0.9 * (1 + cos(pi p)) / 2.
    let half_sqrt2 = std::f64::consts::FRAC_1_SQRT_2;
    for (step, want) in [
        (4, 1.0),                              // p = 0
        (6, 0.1 + 0.45 * (1.0 + half_sqrt2)),  // p = 1/4: 0.868198...
        (8, 0.55),                             // p = 1/2: cos = 0
        (10, 0.1 + 0.45 * (1.0 - half_sqrt2)), // p = 3/4: 0.231801...
        (12, 0.1),                             // the floor
        (1000, 0.1),
    ] {
        close(s.lr(step), want);
    }
    close(s.lr(6), 0.868_198_051_533_946_4);
    // No warm-up: the first step runs at the peak; warm-up to the end: the floor after it.
    close(LrSchedule::new(2.0, 0.0, 0, 2).unwrap().lr(0), 2.0);
    close(LrSchedule::new(2.0, 0.0, 0, 2).unwrap().lr(1), 1.0);
    close(LrSchedule::new(2.0, 0.5, 3, 3).unwrap().lr(2), 2.0);
    close(LrSchedule::new(2.0, 0.5, 3, 3).unwrap().lr(3), 0.5);
    for (peak, min, warmup, total) in [(1.0, 2.0, 0, 10), (1.0, 0.0, 11, 10), (1.0, 0.0, 0, 0), (f64::NAN, 0.0, 0, 1)] {
        let e = LrSchedule::new(peak, min, warmup, total).unwrap_err();
        assert!(format!("{e}").contains("learning-rate schedule"), "{e}");
    }
}

fn fixture_path() -> PathBuf {
    common::repo_root().join("tests/fixtures/train/adamw.safetensors")
}

fn meta_f64(f: &SafetensorsFile, key: &str) -> f64 {
    f.metadata()[key].parse().unwrap()
}

/// The fixture's model: parameters at their initial values, zero gradients, an optimizer.
fn fixture_model(f: &SafetensorsFile, max_norm: Option<f32>) -> (ParamTree, ParamStore, Grads, Optimizer, f64) {
    let mut tree = ParamTree::new();
    for name in ["linear.weight", "linear.bias", "norm.weight"] {
        tree.add(name.to_string(), f.shape(&format!("initial.{name}")).unwrap());
    }
    let mut params = ParamStore::random_owned(&tree, &Device::Cpu, DType::F32, 0).unwrap();
    for (i, s) in tree.specs().iter().enumerate() {
        let v = f.tensor(&format!("initial.{}", s.name), &Device::Cpu, DType::F32).unwrap().to_f32_vec().unwrap();
        params.get_mut(ParamId(i)).write_f32(&v).unwrap();
    }
    let alloc = &mut Standalone(Device::Cpu);
    let grads = Grads::zeros(&tree, alloc, DType::F32).unwrap();
    let adamw = AdamW {
        lr: 0.0,
        beta1: meta_f64(f, "beta1"),
        beta2: meta_f64(f, "beta2"),
        eps: meta_f64(f, "eps"),
        weight_decay: meta_f64(f, "weight_decay"),
    };
    let config = OptimizerConfig { adamw, max_grad_norm: max_norm, micro_batches: 1 };
    let opt = Optimizer::new(&tree, &params, alloc, config).unwrap();
    (tree, params, grads, opt, meta_f64(f, "lr"))
}

fn run_fixture_steps(steps: usize, clip: bool, what: &str) {
    let f = SafetensorsFile::open(fixture_path()).unwrap();
    let max_norm = clip.then(|| meta_f64(&f, "max_norm") as f32);
    let (tree, mut params, mut grads, mut opt, lr) = fixture_model(&f, max_norm);
    let mut norms = Vec::new();
    for k in 1..=steps {
        for (i, s) in tree.specs().iter().enumerate() {
            let g = f.tensor(&format!("grad{k}.{}", s.name), &Device::Cpu, DType::F32).unwrap().to_f32_vec().unwrap();
            grads.get_mut(ParamId(i)).write_f32(&g).unwrap();
        }
        opt.step(&mut params, &mut grads, lr).unwrap();
        norms.push(opt.grad_norm().unwrap());
        for i in 0..tree.len() {
            assert!(grads.get(ParamId(i)).to_f32_vec().unwrap().iter().all(|&x| x == 0.0), "gradients are zeroed after a step");
        }
    }
    assert_eq!(opt.steps(), steps as u64);
    // The fixture's gradient sets have global norms 3.0, 0.4 and 2.0.
    for (got, want) in norms.iter().zip([3.0f32, 0.4, 2.0]) {
        assert!((got - want).abs() <= 1e-6 * want, "global gradient norm {got}, want {want}");
    }
    for (i, s) in tree.specs().iter().enumerate() {
        let want = f.tensor(&format!("{what}.{}", s.name), &Device::Cpu, DType::F32).unwrap().to_f32_vec().unwrap();
        compare(&format!("{what} {}", s.name), &params.get(ParamId(i)).to_f32_vec().unwrap(), &want, 1e-6, 1e-8);
    }
}

#[test]
fn one_adamw_step_matches_torch() {
    run_fixture_steps(1, false, "one_step");
}

#[test]
fn three_clipped_adamw_steps_match_torch() {
    run_fixture_steps(3, true, "three_steps");
}

/// A StructuralVAE small enough to train in milliseconds.
fn tiny_vae(hidden: usize) -> StructuralVae {
    StructuralVae::new(StructuralVaeConfig { latent_dim: 4, structure_dim: 6, image_size: 8, channels: [2, 3, 4], hidden }).unwrap()
}

fn random_params(tree: &ParamTree, seed: u64) -> ParamStore {
    ParamStore::random_owned(tree, &Device::Cpu, DType::F32, seed).unwrap()
}

const KL_WEIGHT: f32 = 0.1;

/// Forward and backward of `MSE(recon, image) + KL_WEIGHT * KL` on one batch, adding the gradients of
/// `loss_scale` times that loss into `grads`; returns the loss. With `eps`, z is sampled.
fn vae_loss_backward(m: &StructuralVae, p: &ParamStore, image: &Tensor, eps: Option<&Tensor>, loss_scale: f32, grads: &mut Grads) -> f32 {
    let alloc = &mut Standalone(Device::Cpu);
    let acts = m.forward(p, image, eps, alloc).unwrap();
    let zeros = |t: &Tensor| Tensor::zeros(&Device::Cpu, t.shape(), DType::F32).unwrap();
    let mut loss = Tensor::zeros(&Device::Cpu, &[1], DType::F32).unwrap();
    let mut partials = Tensor::zeros(&Device::Cpu, &[PARTIALS], DType::F32).unwrap();
    mse_loss(&acts.recon, image, &mut loss, &mut partials).unwrap();
    let mse = loss.to_f32_vec().unwrap()[0];
    kl_loss(&acts.mu, &acts.logvar, &mut loss, &mut partials).unwrap();
    let kl = loss.to_f32_vec().unwrap()[0];
    let (mut drecon, mut dmu, mut dlogvar) = (zeros(&acts.recon), zeros(&acts.mu), zeros(&acts.logvar));
    mse_loss_backward(&acts.recon, image, loss_scale, &mut drecon).unwrap();
    kl_loss_backward(&acts.mu, &acts.logvar, loss_scale * KL_WEIGHT, &mut dmu, &mut dlogvar).unwrap();
    let dstructure = zeros(&acts.structure);
    let d = StructuralVaeOutputGrads { recon: &drecon, mu: &dmu, logvar: &dlogvar, structure: &dstructure };
    m.backward(p, image, eps, &acts, &d, grads, false, alloc).unwrap();
    mse + KL_WEIGHT * kl
}

fn uniform(rng: &mut ChaCha8Rng, shape: &[usize]) -> Tensor {
    let v: Vec<f32> = (0..shape.iter().product()).map(|_| rng.random::<f32>()).collect();
    Tensor::from_f32(&Device::Cpu, shape, DType::F32, &v).unwrap()
}

fn normal(rng: &mut ChaCha8Rng, shape: &[usize]) -> Tensor {
    let v: Vec<f32> = (0..shape.iter().product())
        .map(|_| {
            let (u1, u2): (f32, f32) = (rng.random_range(f32::EPSILON..1.0), rng.random());
            (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        })
        .collect();
    Tensor::from_f32(&Device::Cpu, shape, DType::F32, &v).unwrap()
}

fn rows(t: &Tensor, range: std::ops::Range<usize>) -> Tensor {
    let s = t.shape();
    let per: usize = s[1..].iter().product();
    let mut shape = s.to_vec();
    shape[0] = range.len();
    let v = t.to_f32_vec().unwrap();
    Tensor::from_f32(&Device::Cpu, &shape, DType::F32, &v[range.start * per..range.end * per]).unwrap()
}

#[test]
fn accumulating_micro_batches_with_the_loss_scale_gives_the_full_batch_gradient() {
    let m = tiny_vae(8);
    let p = random_params(&m.params, 3);
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let image = uniform(&mut rng, &[4, 3, 8, 8]);
    let alloc = &mut Standalone(Device::Cpu);
    let mut full = Grads::zeros(&m.params, alloc, DType::F32).unwrap();
    vae_loss_backward(&m, &p, &image, None, 1.0, &mut full);

    let config = OptimizerConfig { adamw: AdamW::default(), max_grad_norm: None, micro_batches: 2 };
    let opt = Optimizer::new(&m.params, &p, alloc, config).unwrap();
    assert_eq!(opt.loss_scale(), 0.5);
    let mut accumulated = Grads::zeros(&m.params, alloc, DType::F32).unwrap();
    for half in [0..2, 2..4] {
        vae_loss_backward(&m, &p, &rows(&image, half), None, opt.loss_scale(), &mut accumulated);
    }
    for (i, s) in m.params.specs().iter().enumerate() {
        let (got, want) = (accumulated.get(ParamId(i)).to_f32_vec().unwrap(), full.get(ParamId(i)).to_f32_vec().unwrap());
        compare(&format!("accumulated grad {}", s.name), &got, &want, 1e-5, 1e-7);
    }
}

/// The configuration text a run's checkpoints are tied to (what `sgdm train --config` would read).
const CONFIG: &[u8] = b"[vae]\nsteps = 8\nbatch = 2\nmicro_batches = 2\n";
const TOTAL_STEPS: u64 = 8;

/// Everything a training process holds between steps.
struct Run {
    model: StructuralVae,
    params: ParamStore,
    grads: Grads,
    opt: Optimizer,
    rng: ChaCha8Rng,
    schedule: LrSchedule,
}

/// A fresh process's state: parameters from `param_seed`, data RNG from `data_seed`.
fn new_run(hidden: usize, param_seed: u64, data_seed: u64) -> Run {
    let model = tiny_vae(hidden);
    let params = random_params(&model.params, param_seed);
    let alloc = &mut Standalone(Device::Cpu);
    let grads = Grads::zeros(&model.params, alloc, DType::F32).unwrap();
    let config = OptimizerConfig { adamw: AdamW { weight_decay: 0.05, ..AdamW::default() }, max_grad_norm: Some(0.5), micro_batches: 2 };
    let opt = Optimizer::new(&model.params, &params, alloc, config).unwrap();
    let schedule = LrSchedule::new(1e-2, 1e-3, 2, TOTAL_STEPS).unwrap();
    Run { model, params, grads, opt, rng: ChaCha8Rng::seed_from_u64(data_seed), schedule }
}

/// Trains until `end` optimizer steps: each step two micro-batches of two random images with sampled z.
/// Returns each step's mean loss.
fn train_until(run: &mut Run, end: u64) -> Vec<f32> {
    let mut losses = Vec::new();
    while run.opt.steps() < end {
        let scale = run.opt.loss_scale();
        let mut loss = 0.0;
        for _ in 0..run.opt.config.micro_batches {
            let image = uniform(&mut run.rng, &[2, 3, 8, 8]);
            let eps = normal(&mut run.rng, &[2, 4]);
            loss += scale * vae_loss_backward(&run.model, &run.params, &image, Some(&eps), scale, &mut run.grads);
        }
        let lr = run.schedule.lr(run.opt.steps());
        run.opt.step(&mut run.params, &mut run.grads, lr).unwrap();
        losses.push(loss);
    }
    losses
}

/// Parameters and AdamW moments, as bytes.
fn state_bytes(run: &Run) -> Vec<Vec<u8>> {
    let (master, m, v) = run.opt.state();
    assert!(master.is_none(), "f32 parameters need no master copy");
    (0..run.params.len()).map(|i| run.params.get(ParamId(i)).to_bytes().unwrap()).chain(m.iter().chain(v).map(|t| t.to_bytes().unwrap())).collect()
}

fn save(run: &Run, path: &Path) {
    save_checkpoint(path, &run.model.params, &run.params, &run.opt, &config_id(CONFIG), &RngState::of(&run.rng), None).unwrap();
}

#[test]
fn resuming_from_a_checkpoint_continues_bit_identically() {
    let mut straight = new_run(8, 1, 11);
    let losses = train_until(&mut straight, TOTAL_STEPS);
    println!("losses of the uninterrupted run: {losses:?}");
    assert!(losses.iter().all(|l| l.is_finite()));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("step3.safetensors");
    let mut first = new_run(8, 1, 11);
    train_until(&mut first, 3);
    save(&first, &path);
    drop(first);

    // Another process: other initial weights and another data seed, all replaced by the checkpoint.
    let mut resumed = new_run(8, 99, 12);
    let meta = load_checkpoint(&path, &resumed.model.params, &mut resumed.params, &mut resumed.opt, &config_id(CONFIG)).unwrap();
    assert_eq!((meta.step, resumed.opt.steps()), (3, 3));
    resumed.rng = meta.rng.rng();
    let rest = train_until(&mut resumed, TOTAL_STEPS);
    assert_eq!(rest, losses[3..], "the resumed run's losses");
    assert!(state_bytes(&resumed) == state_bytes(&straight), "parameters or AdamW moments differ after resuming");

    let file = SafetensorsFile::open(&path).unwrap();
    for name in ["fc_mu.weight", "optimizer.m.fc_mu.weight", "optimizer.v.decoder.6.bias"] {
        assert!(file.contains(name), "checkpoint lacks {name}");
    }
    assert!(!file.names().any(|n| n.starts_with("optimizer.master.")), "no master copies of f32 parameters");
    assert_eq!(file.metadata()["step"], "3");
    assert_eq!(file.metadata()["format_version"], "1");
}

/// Loads `path` into a fresh run of the tiny VAE with `hidden` under `config`; returns the error text.
fn refusal(path: &Path, hidden: usize, config: &[u8]) -> String {
    let mut run = new_run(hidden, 5, 6);
    let before = state_bytes(&run);
    let e = load_checkpoint(path, &run.model.params, &mut run.params, &mut run.opt, &config_id(config)).unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains(&path.display().to_string()), "the error names the file: {msg}");
    assert!(state_bytes(&run) == before, "a refused checkpoint changed the state: {msg}");
    println!("refused: {msg}");
    msg
}

/// A copy of the checkpoint at `from` with its tensors edited by `edit`, written with the same metadata.
fn edited_copy(from: &Path, to: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let f = SafetensorsFile::open(from).unwrap();
    let mut tensors: Vec<(String, Tensor)> = f.names().map(|n| (n.to_string(), f.tensor(n, &Device::Cpu, DType::F32).unwrap())).collect();
    edit(&mut tensors);
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    save_safetensors(to, &refs, Some(f.metadata())).unwrap();
}

#[test]
fn corrupt_truncated_and_mismatched_checkpoints_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.safetensors");
    let mut run = new_run(8, 1, 11);
    train_until(&mut run, 1);
    save(&run, &good);
    let bytes = std::fs::read(&good).unwrap();

    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert!(refusal(&truncated, 8, CONFIG).contains("truncated"));

    let corrupt = dir.path().join("corrupt.safetensors");
    let mut flipped = bytes.clone();
    *flipped.last_mut().unwrap() ^= 0x40;
    std::fs::write(&corrupt, &flipped).unwrap();
    assert!(refusal(&corrupt, 8, CONFIG).contains("corrupt checkpoint: the tensor data's SHA-256"));

    let msg = refusal(&good, 10, CONFIG);
    assert!(msg.contains("'encoder.7.weight' has shape [8, 4], expected [10, 4]"), "{msg}");

    let msg = refusal(&good, 8, b"[vae]\nsteps = 9\n");
    assert!(msg.contains("another configuration"), "{msg}");

    let missing = dir.path().join("missing.safetensors");
    edited_copy(&good, &missing, |t| t.retain(|(n, _)| n != "optimizer.v.fc_mu.bias"));
    assert!(refusal(&missing, 8, CONFIG).contains("missing tensor 'optimizer.v.fc_mu.bias'"));

    let extra = dir.path().join("extra.safetensors");
    edited_copy(&good, &extra, |t| t.push(("controlnet.conv_in.bias".into(), Tensor::zeros(&Device::Cpu, &[2], DType::F32).unwrap())));
    assert!(refusal(&extra, 8, CONFIG).contains("1 tensor(s) this model does not have (a checkpoint of another model?): controlnet.conv_in.bias"));

    let weights_only = dir.path().join("weights.safetensors");
    let refs: Vec<(&str, &Tensor)> =
        run.model.params.specs().iter().enumerate().map(|(i, s)| (s.name.as_str(), run.params.get(ParamId(i)))).collect();
    save_safetensors(&weights_only, &refs, None).unwrap();
    assert!(refusal(&weights_only, 8, CONFIG).contains("not an sgdm checkpoint"));

    // The intact file still loads.
    let mut fresh = new_run(8, 5, 6);
    load_checkpoint(&good, &fresh.model.params, &mut fresh.params, &mut fresh.opt, &config_id(CONFIG)).unwrap();
    assert!(state_bytes(&fresh) == state_bytes(&run));
}

#[test]
fn step_log_writes_one_flushed_json_object_per_logged_step_and_appends_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("train.jsonl");
    let mut log = StepLog::open(&path, 0).unwrap();
    log.log(10, &[("total", 0.5), ("kl", 0.125)], 1e-3, 2.5).unwrap();
    // Flushed: readable before the log is closed.
    let first: serde_json::Value = serde_json::from_str(std::fs::read_to_string(&path).unwrap().trim()).unwrap();
    assert_eq!(first["step"], 10);
    assert_eq!(first["loss"]["total"], 0.5);
    assert_eq!(first["loss"]["kl"], 0.125);
    assert_eq!(first["lr"], 1e-3);
    assert_eq!(first["grad_norm"], 2.5);
    assert!(first["steps_per_s"].as_f64().unwrap() > 0.0 && first["wall_s"].as_f64().unwrap() >= 0.0);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let second = log.log(12, &[("total", 0.25)], 5e-4, 1.0).unwrap();
    assert!(second.steps_per_s > 0.0 && second.steps_per_s <= 2.0 / 0.02, "2 steps in at least 20 ms: {}", second.steps_per_s);
    drop(log);
    let mut resumed = StepLog::open(&path, 12).unwrap();
    resumed.log(13, &[("total", 0.2)], 4e-4, 0.9).unwrap();
    let steps: Vec<u64> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [10, 12, 13]);
    let Err(e) = StepLog::open(dir.path().join("no/such/dir/train.jsonl"), 0) else { panic!("opened a log in a missing folder") };
    assert!(format!("{e:#}").contains("no/such/dir/train.jsonl: cannot open the training log"), "{e:#}");
}

#[test]
fn progress_line_shows_step_loss_rate_and_eta() {
    let progress = Progress::new(100, 1000);
    std::thread::sleep(std::time::Duration::from_millis(10));
    let line = progress.line(100, 0.123456);
    assert!(line.starts_with("step 100/1000  loss 0.1235  0.00 steps/s  ETA ?"), "{line}");
    let line = progress.line(150, 0.5);
    assert!(line.starts_with("step 150/1000  loss 0.5000  ") && line.contains(" steps/s  ETA "), "{line}");
    assert_eq!(format_duration(std::time::Duration::from_secs(12)), "12s");
    assert_eq!(format_duration(std::time::Duration::from_secs(275)), "4m35s");
    assert_eq!(format_duration(std::time::Duration::from_secs(7380)), "2h03m");
}

/// Three clipped steps on the fixture's gradients (AdamW's default betas, eps and decay at the fixture's
/// rate) with parameters stored in `dtype` (f32, or bf16 with f32 master weights), on CPU, from the
/// fixture's initial values rounded to bf16.
fn fixture_run_in(dtype: DType) -> (ParamTree, ParamStore, Optimizer) {
    let f = SafetensorsFile::open(fixture_path()).unwrap();
    let (tree, f32_params, mut grads, _, lr) = fixture_model(&f, Some(1.0));
    let mut params = ParamStore::random_owned(&tree, &Device::Cpu, dtype, 0).unwrap();
    for i in 0..tree.len() {
        let v = common::rounded(DType::BF16, &f32_params.get(ParamId(i)).to_f32_vec().unwrap());
        params.get_mut(ParamId(i)).write_f32(&v).unwrap();
    }
    let config = OptimizerConfig { adamw: AdamW { lr: 0.0, ..AdamW::default() }, max_grad_norm: Some(1.0), micro_batches: 1 };
    let mut opt = Optimizer::new(&tree, &params, &mut Standalone(Device::Cpu), config).unwrap();
    for k in 1..=3 {
        for (i, s) in tree.specs().iter().enumerate() {
            let g = f.tensor(&format!("grad{k}.{}", s.name), &Device::Cpu, DType::F32).unwrap().to_f32_vec().unwrap();
            grads.get_mut(ParamId(i)).write_f32(&g).unwrap();
        }
        opt.step(&mut params, &mut grads, lr).unwrap();
    }
    (tree, params, opt)
}

#[test]
fn bf16_parameters_follow_f32_master_weights_and_checkpoints_carry_them() {
    let (tree, f32_params, f32_opt) = fixture_run_in(DType::F32);
    let (_, bf16_params, bf16_opt) = fixture_run_in(DType::BF16);
    let master = bf16_opt.state().0.expect("bf16 parameters keep f32 master weights");
    for (i, master) in master.iter().enumerate() {
        let want = f32_params.get(ParamId(i)).to_f32_vec().unwrap();
        assert_eq!(master.to_f32_vec().unwrap(), want, "master weights step exactly as f32 parameters");
        assert_eq!(bf16_params.get(ParamId(i)).to_f32_vec().unwrap(), common::rounded(DType::BF16, &want), "bf16 copy");
    }
    assert_eq!(bf16_opt.state().1[0].to_bytes().unwrap(), f32_opt.state().1[0].to_bytes().unwrap());

    // A bf16 run's checkpoint restores an f32 run from the master weights, bit for bit.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bf16.safetensors");
    let rng = RngState::of(&ChaCha8Rng::seed_from_u64(0));
    save_checkpoint(&path, &tree, &bf16_params, &bf16_opt, "id", &rng, None).unwrap();
    let file = SafetensorsFile::open(&path).unwrap();
    assert_eq!(file.raw("linear.weight").unwrap().0, DType::BF16);
    assert_eq!(file.raw("optimizer.master.linear.weight").unwrap().0, DType::F32);
    let (_, mut params, mut opt) = fixture_run_in(DType::F32);
    params.get_mut(ParamId(0)).fill_zero().unwrap();
    load_checkpoint(&path, &tree, &mut params, &mut opt, "id").unwrap();
    for i in 0..tree.len() {
        assert_eq!(params.get(ParamId(i)).to_bytes().unwrap(), f32_params.get(ParamId(i)).to_bytes().unwrap());
    }
    // And a bf16 run takes back both its bf16 parameters and its master weights.
    let (_, mut params, mut opt) = fixture_run_in(DType::BF16);
    params.get_mut(ParamId(0)).fill_zero().unwrap();
    load_checkpoint(&path, &tree, &mut params, &mut opt, "id").unwrap();
    let restored = opt.state().0.unwrap();
    for i in 0..tree.len() {
        assert_eq!(params.get(ParamId(i)).to_bytes().unwrap(), bf16_params.get(ParamId(i)).to_bytes().unwrap());
        assert_eq!(restored[i].to_bytes().unwrap(), master[i].to_bytes().unwrap());
    }
}
