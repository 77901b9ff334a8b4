//! The EEG encoder's optional parts beside the paper's encoder: the linear path (the embedding gains
//! `W · flatten(eeg)`) and the structure head (one Linear, or Linear-ReLU-Linear, from the embedding to a
//! structure map). Each is checked against a float64 computation of its definition from the same
//! parameters: the forward, the parameter gradients and the gradients passed back. The paper's encoder
//! (`EegEncoder` without them) is held to PyTorch by the conformance fixtures; here the encoder with the
//! parts added must equal that encoder plus the parts, so no fixture is needed for the rest.
//!
//! Tolerances: every compared value is an f32 sum of at most 340 products of values below 2 in magnitude
//! (the 17x20 flattened EEG against one row of W), so its rounding error is below 340 · 2^-24 · 4 ≈ 1e-4 of
//! the terms' scale; rel 1e-4 with a floor of 1e-5 holds that with room.

mod common;

use common::{compare, cpu, random};
use sgdm::models::sgdm::{EegEncoder, EegEncoderConfig};
use sgdm::nn::{Grads, ParamStore, Standalone};
use sgdm::{DType, Device};

const B: usize = 3;

fn config(linear_path: bool, structure_dim: usize, structure_hidden: usize) -> EegEncoderConfig {
    EegEncoderConfig {
        n_channels: 17,
        n_timepoints: 20,
        latent_dim: 8,
        lstm_hidden: 4,
        lstm_layers: 1,
        spatial_channels: [6, 5],
        fusion_hidden: 12,
        structure_hidden,
        structure_dim,
        linear_path,
    }
}

/// `store` for `to`, with every parameter `to` shares with `from` copied from `from_store`.
fn shared_params(from: &EegEncoder, from_store: &ParamStore, to: &EegEncoder, seed: u64) -> ParamStore {
    let mut store = ParamStore::random_owned(&to.params, &Device::Cpu, DType::F32, seed).unwrap();
    for (i, spec) in to.params.specs().iter().enumerate() {
        if let Some(id) = from.params.id(&spec.name) {
            store.get_mut(sgdm::nn::ParamId(i)).write_f32(&from_store.get(id).to_f32_vec().unwrap()).unwrap();
        }
    }
    store
}

fn values(store: &ParamStore, model: &EegEncoder, name: &str) -> Vec<f64> {
    store.get(model.params.id(name).unwrap()).to_f32_vec().unwrap().into_iter().map(f64::from).collect()
}

/// `w` `[o, i]` times each row of `x` `[n, i]`, plus `bias`.
fn affine(w: &[f64], bias: Option<&[f64]>, x: &[f64], o: usize) -> Vec<f64> {
    let i = w.len() / o;
    x.chunks_exact(i).flat_map(|row| (0..o).map(move |r| bias.map_or(0.0, |b| b[r]) + (0..i).map(|k| w[r * i + k] * row[k]).sum::<f64>())).collect()
}

/// `w^T dy` for each row of `dy` `[n, o]`.
fn affine_input_grad(w: &[f64], dy: &[f64], o: usize) -> Vec<f64> {
    let i = w.len() / o;
    dy.chunks_exact(o).flat_map(|row| (0..i).map(move |k| (0..o).map(|r| w[r * i + k] * row[r]).sum::<f64>())).collect()
}

/// `sum_n dy_n x_n^T` `[o, i]`.
fn affine_weight_grad(x: &[f64], dy: &[f64], o: usize) -> Vec<f64> {
    let i = x.len() / (dy.len() / o);
    (0..o).flat_map(|r| (0..i).map(move |k| x.chunks_exact(i).zip(dy.chunks_exact(o)).map(|(xr, dr)| xr[k] * dr[r]).sum::<f64>())).collect()
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|x| *x as f32).collect()
}

#[test]
fn the_linear_path_adds_w_times_the_flattened_eeg_and_its_gradients() {
    let (plain, with) = (EegEncoder::new(config(false, 0, 0)).unwrap(), EegEncoder::new(config(true, 0, 0)).unwrap());
    let with_params = ParamStore::random_owned(&with.params, &Device::Cpu, DType::F32, 3).unwrap();
    let plain_params = shared_params(&with, &with_params, &plain, 4);
    let eeg_values = random(B * 17 * 20, -1.5, 1.5, 5);
    let eeg = cpu(&[B, 17, 20], &eeg_values);
    let alloc = &mut Standalone(Device::Cpu);
    let base = plain.forward(&plain_params, &eeg, alloc).unwrap();
    let acts = with.forward(&with_params, &eeg, alloc).unwrap();

    let w = values(&with_params, &with, "linear_path.weight");
    let x: Vec<f64> = eeg_values.iter().map(|v| *v as f64).collect();
    let read_out = affine(&w, None, &x, 8);
    let want: Vec<f64> = base.embedding.to_f32_vec().unwrap().iter().zip(&read_out).map(|(e, r)| *e as f64 + r).collect();
    compare("embedding = paper encoder + W flatten(eeg)", &acts.embedding.to_f32_vec().unwrap(), &f32s(&want), 1e-4, 1e-5);

    let dembedding_values = random(B * 8, -1.0, 1.0, 6);
    let dembedding = cpu(&[B, 8], &dembedding_values);
    let mut plain_grads = Grads::zeros(&plain.params, alloc, DType::F32).unwrap();
    let plain_deeg = plain.backward(&plain_params, &base, &dembedding, &mut plain_grads, true, alloc).unwrap().unwrap();
    let mut grads = Grads::zeros(&with.params, alloc, DType::F32).unwrap();
    let deeg = with.backward(&with_params, &acts, &dembedding, &mut grads, true, alloc).unwrap().unwrap();

    let dy: Vec<f64> = dembedding_values.iter().map(|v| *v as f64).collect();
    let dw = grads.get(with.params.id("linear_path.weight").unwrap()).to_f32_vec().unwrap();
    compare("linear_path.weight gradient", &dw, &f32s(&affine_weight_grad(&x, &dy, 8)), 1e-4, 1e-5);
    let through_w = affine_input_grad(&w, &dy, 8);
    let want: Vec<f64> = plain_deeg.to_f32_vec().unwrap().iter().zip(&through_w).map(|(d, t)| *d as f64 + t).collect();
    compare("eeg gradient = paper encoder's + W^T dembedding", &deeg.to_f32_vec().unwrap(), &f32s(&want), 1e-4, 1e-5);
    for (i, spec) in plain.params.specs().iter().enumerate() {
        let id = with.params.id(&spec.name).unwrap();
        let got = grads.get(id).to_f32_vec().unwrap();
        compare(
            &format!("{} gradient unchanged by the linear path", spec.name),
            &got,
            &plain_grads.get(sgdm::nn::ParamId(i)).to_f32_vec().unwrap(),
            1e-5,
            1e-7,
        );
    }
}

#[test]
fn the_structure_heads_match_their_definition_and_pass_the_gradient_back() {
    for hidden in [0, 10] {
        let encoder = EegEncoder::new(config(false, 9, hidden)).unwrap();
        let params = ParamStore::random_owned(&encoder.params, &Device::Cpu, DType::F32, 7).unwrap();
        let alloc = &mut Standalone(Device::Cpu);
        let embedding_values = random(B * 8, -1.0, 1.0, 8);
        let embedding = cpu(&[B, 8], &embedding_values);
        let acts = encoder.structure(&params, &embedding, alloc).unwrap().expect("a head");
        let e: Vec<f64> = embedding_values.iter().map(|v| *v as f64).collect();
        let dstructure_values = random(B * 9, -1.0, 1.0, 9);
        let ds: Vec<f64> = dstructure_values.iter().map(|v| *v as f64).collect();
        let mut grads = Grads::zeros(&encoder.params, alloc, DType::F32).unwrap();
        let dembedding = encoder.structure_backward(&params, &embedding, &acts, &cpu(&[B, 9], &dstructure_values), &mut grads, alloc).unwrap();
        let grad = |name: &str| grads.get(encoder.params.id(name).unwrap()).to_f32_vec().unwrap();

        let (want, want_de) = if hidden == 0 {
            let (w, b) = (values(&params, &encoder, "structure_head.weight"), values(&params, &encoder, "structure_head.bias"));
            compare("structure_head.weight gradient", &grad("structure_head.weight"), &f32s(&affine_weight_grad(&e, &ds, 9)), 1e-4, 1e-5);
            (affine(&w, Some(&b), &e, 9), affine_input_grad(&w, &ds, 9))
        } else {
            let (w0, b0) = (values(&params, &encoder, "structure_head.0.weight"), values(&params, &encoder, "structure_head.0.bias"));
            let (w2, b2) = (values(&params, &encoder, "structure_head.2.weight"), values(&params, &encoder, "structure_head.2.bias"));
            let h: Vec<f64> = affine(&w0, Some(&b0), &e, hidden).into_iter().map(|v| v.max(0.0)).collect();
            let dh: Vec<f64> = affine_input_grad(&w2, &ds, 9).iter().zip(&h).map(|(d, h)| if *h > 0.0 { *d } else { 0.0 }).collect();
            compare("structure_head.2.weight gradient", &grad("structure_head.2.weight"), &f32s(&affine_weight_grad(&h, &ds, 9)), 1e-4, 1e-5);
            compare("structure_head.0.weight gradient", &grad("structure_head.0.weight"), &f32s(&affine_weight_grad(&e, &dh, hidden)), 1e-4, 1e-5);
            (affine(&w2, Some(&b2), &h, 9), affine_input_grad(&w0, &dh, hidden))
        };
        compare(&format!("structure (hidden {hidden})"), &acts.structure.to_f32_vec().unwrap(), &f32s(&want), 1e-4, 1e-5);
        compare(&format!("embedding gradient (hidden {hidden})"), &dembedding.to_f32_vec().unwrap(), &f32s(&want_de), 1e-4, 1e-5);
    }
    let plain = EegEncoder::new(config(false, 0, 0)).unwrap();
    let params = ParamStore::random_owned(&plain.params, &Device::Cpu, DType::F32, 7).unwrap();
    assert!(plain.structure(&params, &cpu(&[B, 8], &random(B * 8, -1.0, 1.0, 8)), &mut Standalone(Device::Cpu)).unwrap().is_none());
    let err = EegEncoder::new(config(false, 0, 5)).expect_err("a hidden width without a head is refused");
    assert!(format!("{err:#}").contains("structure_hidden 5 needs a structure head"), "{err:#}");
}
