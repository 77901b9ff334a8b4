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
use sgdm::train::{LrSchedule, Optimizer, OptimizerConfig};
use sgdm::weights::SafetensorsFile;
use sgdm::{Arena, DType, Device, MemoryPlan, Tensor};

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
        (4, 1.0),                                    // p = 0
        (6, 0.1 + 0.45 * (1.0 + half_sqrt2)),        // p = 1/4: 0.868198...
        (8, 0.55),                                   // p = 1/2: cos = 0
        (10, 0.1 + 0.45 * (1.0 - half_sqrt2)),       // p = 3/4: 0.231801...
        (12, 0.1),                                   // the floor
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
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/train/adamw.safetensors")
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
    let mut plan = MemoryPlan::new();
    ParamStore::plan(&tree, &mut plan, DType::F32);
    let mut arena = Arena::new(&Device::Cpu, &plan).unwrap();
    let mut params = ParamStore::random(&tree, &mut arena, DType::F32, 0).unwrap();
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
    let mut plan = MemoryPlan::new();
    ParamStore::plan(tree, &mut plan, DType::F32);
    let mut arena = Arena::new(&Device::Cpu, &plan).unwrap();
    ParamStore::random(tree, &mut arena, DType::F32, seed).unwrap()
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
