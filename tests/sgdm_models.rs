//! The SGDM modules' forward and backward as training uses them, beyond the PyTorch fixtures of
//! tests/conformance.rs: a batch of one, per-sample independence across a batch, parameter gradients that
//! accumulate (`+=`) over backward calls, the VAE without `eps`, and backward without input gradients.
//! All on CPU f32 with the fixtures' weights (tests/fixtures/models).

mod common;

use common::{compare, cpu, random};
use sgdm::models::sgdm::{EegEncoder, EegEncoderConfig, StructuralVae, StructuralVaeConfig, StructuralVaeOutputGrads};
use sgdm::nn::{Grads, ParamStore, ParamTree, Standalone};
use sgdm::weights::Component;
use sgdm::{Arena, DType, Device, MemoryPlan, Tensor};

fn component(case: &str) -> Component {
    Component::open(common::repo_root().join("tests/fixtures/models").join(case)).unwrap()
}

fn load(tree: &ParamTree, c: &Component) -> ParamStore {
    let mut plan = MemoryPlan::new();
    ParamStore::plan(tree, &mut plan, DType::F32);
    let mut arena = Arena::new(&Device::Cpu, &plan).unwrap();
    ParamStore::load(tree, &c.weights, &mut arena, DType::F32, &[]).unwrap()
}

fn encoder() -> (EegEncoder, ParamStore) {
    let c = component("eeg_encoder_tiny");
    let m = EegEncoder::new(EegEncoderConfig::from_json(&c.dir.join("config.json"), &c.config).unwrap()).unwrap();
    let p = load(&m.params, &c);
    (m, p)
}

fn vae() -> (StructuralVae, ParamStore) {
    let c = component("structural_vae_tiny");
    let m = StructuralVae::new(StructuralVaeConfig::from_json(&c.dir.join("config.json"), &c.config).unwrap()).unwrap();
    let p = load(&m.params, &c);
    (m, p)
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_f32_vec().unwrap()
}

fn zero_grads(tree: &ParamTree) -> Grads {
    Grads::zeros(tree, &mut Standalone(Device::Cpu), DType::F32).unwrap()
}

fn grad_values(g: &Grads, tree: &ParamTree) -> Vec<Vec<f32>> {
    (0..tree.len()).map(|i| values(g.get(sgdm::nn::ParamId(i)))).collect()
}

#[test]
fn eeg_encoder_batch_of_one_matches_each_row_of_a_batch() {
    let (m, p) = encoder();
    let (ch, t, latent) = (m.config.n_channels, m.config.n_timepoints, m.config.latent_dim);
    let batch = 3;
    let eeg = random(batch * ch * t, -1.0, 1.0, 7);
    let dy = random(batch * latent, -1.0, 1.0, 8);
    let alloc = &mut Standalone(Device::Cpu);
    let all = m.forward(&p, &cpu(&[batch, ch, t], &eeg), alloc).unwrap();
    let mut all_grads = zero_grads(&m.params);
    let deeg_all = m.backward(&p, &all, &cpu(&[batch, latent], &dy), &mut all_grads, true, alloc).unwrap().unwrap();
    let (embedding_all, deeg_all) = (values(&all.embedding), values(&deeg_all));
    let mut summed = zero_grads(&m.params);
    for i in 0..batch {
        let x = cpu(&[1, ch, t], &eeg[i * ch * t..(i + 1) * ch * t]);
        let one = m.forward(&p, &x, alloc).unwrap();
        assert_eq!(one.embedding.shape(), [1, latent]);
        compare(&format!("embedding, sample {i} alone"), &values(&one.embedding), &embedding_all[i * latent..(i + 1) * latent], 1e-5, 1e-6);
        let dx = m.backward(&p, &one, &cpu(&[1, latent], &dy[i * latent..(i + 1) * latent]), &mut summed, true, alloc).unwrap().unwrap();
        assert_eq!(dx.shape(), [1, ch, t]);
        compare(&format!("grad.eeg, sample {i} alone"), &values(&dx), &deeg_all[i * ch * t..(i + 1) * ch * t], 1e-4, 1e-6);
    }
    // Per-sample backward calls summed by `+=` give the batch's parameter gradients.
    for (spec, (got, want)) in m.params.specs().iter().zip(grad_values(&summed, &m.params).iter().zip(grad_values(&all_grads, &m.params))) {
        compare(&format!("grad.{} summed over samples", spec.name), got, &want, 1e-4, 1e-6);
    }
}

#[test]
fn eeg_encoder_parameter_gradients_accumulate() {
    let (m, p) = encoder();
    let (ch, t, latent) = (m.config.n_channels, m.config.n_timepoints, m.config.latent_dim);
    let alloc = &mut Standalone(Device::Cpu);
    let acts = m.forward(&p, &cpu(&[2, ch, t], &random(2 * ch * t, -1.0, 1.0, 11)), alloc).unwrap();
    let dy = cpu(&[2, latent], &random(2 * latent, -1.0, 1.0, 12));
    let mut once = zero_grads(&m.params);
    let dx = m.backward(&p, &acts, &dy, &mut once, true, alloc).unwrap().unwrap();
    let mut twice = zero_grads(&m.params);
    for _ in 0..2 {
        // Without the input gradient nothing is returned, and the parameter gradients are the same.
        assert!(m.backward(&p, &acts, &dy, &mut twice, false, alloc).unwrap().is_none());
    }
    assert!(values(&dx).iter().all(|v| v.is_finite()));
    // Only the last step's output is read: the top layer's reverse direction has then run one step, from
    // h = 0, so its recurrent weights get no gradient (in PyTorch too).
    let no_gradient = format!("temporal_encoder.weight_hh_l{}_reverse", m.config.lstm_layers - 1);
    for (spec, (one, two)) in m.params.specs().iter().zip(grad_values(&once, &m.params).iter().zip(grad_values(&twice, &m.params))) {
        assert_eq!(one.iter().any(|v| *v != 0.0), spec.name != no_gradient, "grad.{}", spec.name);
        let doubled: Vec<f32> = one.iter().map(|v| 2.0 * v).collect();
        compare(&format!("grad.{} after two backward calls", spec.name), &two, &doubled, 1e-6, 0.0);
    }
}

/// Records the shape of every tensor it hands out.
struct Counting(Vec<Vec<usize>>);

impl sgdm::nn::Allocator for Counting {
    fn alloc(&mut self, shape: &[usize], dtype: DType) -> anyhow::Result<Tensor> {
        self.0.push(shape.to_vec());
        Tensor::zeros(&Device::Cpu, shape, dtype)
    }
}

#[test]
fn eeg_encoder_lstm_borrows_its_weights() {
    // The LSTM reads its weights from the ParamStore and adds its gradients into the Grads: neither the
    // forward nor the backward allocates a tensor shaped like an LSTM parameter.
    let (m, p) = encoder();
    let (ch, t, latent) = (m.config.n_channels, m.config.n_timepoints, m.config.latent_dim);
    let lstm_shapes: Vec<Vec<usize>> = m.params.specs().iter().filter(|s| s.name.starts_with("temporal_encoder.")).map(|s| s.shape.clone()).collect();
    assert!(!lstm_shapes.is_empty());
    let alloc = &mut Counting(Vec::new());
    let acts = m.forward(&p, &cpu(&[2, ch, t], &random(2 * ch * t, -1.0, 1.0, 21)), alloc).unwrap();
    let forward = alloc.0.len();
    let mut grads = zero_grads(&m.params);
    m.backward(&p, &acts, &cpu(&[2, latent], &random(2 * latent, -1.0, 1.0, 22)), &mut grads, true, alloc).unwrap();
    assert!(forward > 0 && alloc.0.len() > forward, "the counting allocator saw the forward and the backward");
    for shape in &alloc.0 {
        assert!(!lstm_shapes.contains(shape), "a {shape:?} tensor was allocated: the shape of an LSTM parameter");
    }
}

/// Upstream gradients for the VAE's four outputs of a batch of `b`, reproducible from `seed`.
fn vae_output_grads(m: &StructuralVae, b: usize, seed: u64) -> [Tensor; 4] {
    let (s, latent, structure) = (m.config.image_size, m.config.latent_dim, m.config.structure_dim);
    [
        cpu(&[b, 3, s, s], &random(b * 3 * s * s, -1.0, 1.0, seed)),
        cpu(&[b, latent], &random(b * latent, -1.0, 1.0, seed + 1)),
        cpu(&[b, latent], &random(b * latent, -1.0, 1.0, seed + 2)),
        cpu(&[b, structure], &random(b * structure, -1.0, 1.0, seed + 3)),
    ]
}

fn output_grads(g: &[Tensor; 4]) -> StructuralVaeOutputGrads<'_> {
    StructuralVaeOutputGrads { recon: &g[0], mu: &g[1], logvar: &g[2], structure: &g[3] }
}

#[test]
fn structural_vae_batch_of_one_and_accumulation() {
    let (m, p) = vae();
    let (s, latent) = (m.config.image_size, m.config.latent_dim);
    let alloc = &mut Standalone(Device::Cpu);
    let image = cpu(&[1, 3, s, s], &random(3 * s * s, 0.0, 1.0, 21));
    let eps = cpu(&[1, latent], &random(latent, -2.0, 2.0, 22));
    let acts = m.forward(&p, &image, Some(&eps), alloc).unwrap();
    assert_eq!(acts.recon.shape(), [1, 3, s, s]);
    assert_eq!(acts.structure.shape(), [1, m.config.structure_dim]);
    let g = vae_output_grads(&m, 1, 23);
    let mut once = zero_grads(&m.params);
    let di = m.backward(&p, &image, Some(&eps), &acts, &output_grads(&g), &mut once, true, alloc).unwrap().unwrap();
    assert_eq!(di.image.shape(), [1, 3, s, s]);
    assert_eq!(di.eps.as_ref().map(|e| e.shape().to_vec()), Some(vec![1, latent]));
    let mut twice = zero_grads(&m.params);
    for _ in 0..2 {
        assert!(m.backward(&p, &image, Some(&eps), &acts, &output_grads(&g), &mut twice, false, alloc).unwrap().is_none());
    }
    for (spec, (one, two)) in m.params.specs().iter().zip(grad_values(&once, &m.params).iter().zip(grad_values(&twice, &m.params))) {
        assert!(one.iter().any(|v| *v != 0.0), "grad.{} is all zero", spec.name);
        let doubled: Vec<f32> = one.iter().map(|v| 2.0 * v).collect();
        compare(&format!("grad.{} after two backward calls", spec.name), &two, &doubled, 1e-6, 0.0);
    }
}

#[test]
fn structural_vae_without_eps_is_eps_zero() {
    // z = mu + 0·exp(logvar / 2) is mu exactly, and the gradient through it is the same: dlogvar gets
    // nothing from z.
    let (m, p) = vae();
    let (s, latent, b) = (m.config.image_size, m.config.latent_dim, 2);
    let alloc = &mut Standalone(Device::Cpu);
    let image = cpu(&[b, 3, s, s], &random(b * 3 * s * s, 0.0, 1.0, 31));
    let zero = cpu(&[b, latent], &vec![0.0; b * latent]);
    let g = vae_output_grads(&m, b, 32);
    let (mut with_eps, mut without) = (zero_grads(&m.params), zero_grads(&m.params));
    let a = m.forward(&p, &image, Some(&zero), alloc).unwrap();
    let da = m.backward(&p, &image, Some(&zero), &a, &output_grads(&g), &mut with_eps, true, alloc).unwrap().unwrap();
    let n = m.forward(&p, &image, None, alloc).unwrap();
    let dn = m.backward(&p, &image, None, &n, &output_grads(&g), &mut without, true, alloc).unwrap().unwrap();
    assert!(dn.eps.is_none());
    for (what, x, y) in [("recon", &a.recon, &n.recon), ("structure", &a.structure, &n.structure), ("grad.image", &da.image, &dn.image)] {
        compare(&format!("{what} without eps"), &values(y), &values(x), 1e-6, 1e-7);
    }
    for (spec, (x, y)) in m.params.specs().iter().zip(grad_values(&with_eps, &m.params).iter().zip(grad_values(&without, &m.params))) {
        compare(&format!("grad.{} without eps", spec.name), &y, x, 1e-6, 1e-7);
    }
    // A backward that does not match the forward's use of eps is refused.
    let err = m.backward(&p, &image, None, &a, &output_grads(&g), &mut without, false, alloc).err().unwrap();
    assert!(format!("{err:#}").contains("eps"), "{err:#}");
}

#[test]
fn wrong_input_shapes_are_named() {
    let (m, p) = encoder();
    let alloc = &mut Standalone(Device::Cpu);
    let err = m.forward(&p, &cpu(&[2, m.config.n_timepoints, m.config.n_channels], &vec![0.0; 2 * 17 * 20]), alloc).err().unwrap();
    let msg = format!("{err:#}");
    assert!(msg.contains("SpatiotemporalEEGEncoder") && msg.contains("[2, 20, 17]"), "{msg}");
    let (v, vp) = vae();
    let err = v.forward(&vp, &cpu(&[1, 3, 8, 8], &[0.0; 192]), None, alloc).err().unwrap();
    let msg = format!("{err:#}");
    assert!(msg.contains("StructuralVAE") && msg.contains("[1, 3, 8, 8]"), "{msg}");
}
