//! diffusers' Transformer2DModel (both projections, one and two blocks) and the UNet's time embedding
//! against PyTorch (tests/fixtures/blocks/make_fixtures.py): outputs within a relative L2 error of 1e-4
//! and every input and parameter gradient within 1e-3 of the float64 reference, on CPU f32. Parameters load
//! through `ParamStore` against the trees `Transformer2d::new` and `TimeEmbedding::new` build, so a name or
//! shape that differs from diffusers' state_dict fails the load.

mod common;

use std::path::PathBuf;

use serde_json::Value;
use sgdm::models::transformer_2d::{Transformer2d, TransformerSpec};
use sgdm::models::unet::TimeEmbedding;
use sgdm::nn::{Grads, ParamId, ParamStore, ParamTree, Standalone};
use sgdm::weights::SafetensorsFile;
use sgdm::{Arena, DType, Device, MemoryPlan, Tensor};

const OUTPUT_BOUND: f64 = 1e-4;
const GRAD_BOUND: f64 = 1e-3;

fn case_dir(case: &str) -> PathBuf {
    common::repo_root().join("tests/fixtures/blocks").join(case)
}

fn config(case: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(case_dir(case).join("config.json")).unwrap()).unwrap()
}

fn usize_of(c: &Value, key: &str) -> usize {
    c[key].as_u64().unwrap_or_else(|| panic!("config key {key}")) as usize
}

fn relative_l2(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.shape(), want.shape());
    let (got, want) = (got.to_f32_vec().unwrap(), want.to_f32_vec().unwrap());
    let num: f64 = got.iter().zip(&want).map(|(g, w)| (*g as f64 - *w as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|w| (*w as f64).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

/// The case's parameters, loaded against `tree` (every name must match, none may be left over).
fn load_params(case: &str, tree: &ParamTree) -> ParamStore {
    let mut plan = MemoryPlan::new();
    ParamStore::plan(tree, &mut plan, DType::F32);
    let mut arena = Arena::new(&Device::Cpu, &plan).unwrap();
    let file = SafetensorsFile::open(case_dir(case).join("weights.safetensors")).unwrap();
    ParamStore::load(tree, &file, &mut arena, DType::F32, &[]).unwrap_or_else(|e| panic!("{case}: {e:#}"))
}

/// Compares the output, the named input gradients and every parameter gradient; returns the worst errors.
fn check(case: &str, data: &SafetensorsFile, output: &Tensor, inputs: &[(&str, &Tensor)], tree: &ParamTree, grads: &Grads) -> (f64, f64) {
    let want = |name: &str| data.tensor(name, &Device::Cpu, DType::F32).unwrap();
    let out_err = relative_l2(output, &want("output"));
    assert!(out_err <= OUTPUT_BOUND, "{case}: output: relative L2 error {out_err:.3e}");
    let mut worst = 0f64;
    let params = tree.specs().iter().map(|s| (format!("grad.{}", s.name), grads.get(tree.id(&s.name).unwrap())));
    let checked: Vec<(String, &Tensor)> = inputs.iter().map(|(n, t)| (format!("grad.{n}"), *t)).chain(params).collect();
    for (name, got) in &checked {
        let err = relative_l2(got, &want(name));
        assert!(err <= GRAD_BOUND, "{case}: {name}: relative L2 error {err:.3e}");
        worst = worst.max(err);
    }
    let expected_grads = data.names().filter(|n| n.starts_with("grad.")).count();
    assert_eq!(checked.len(), expected_grads, "{case}: every gradient PyTorch wrote is checked");
    println!("{case:<28} worst relative L2: output {out_err:.2e}, gradients {worst:.2e}");
    (out_err, worst)
}

fn transformer_case(case: &str) {
    let c = config(case);
    let spec = TransformerSpec {
        cross_attention_dim: usize_of(&c, "cross_attention_dim"),
        groups: usize_of(&c, "norm_num_groups"),
        use_linear_projection: c["use_linear_projection"].as_bool().unwrap(),
    };
    let (heads, channels) = (usize_of(&c, "num_attention_heads"), usize_of(&c, "in_channels"));
    let mut tree = ParamTree::new();
    let model = Transformer2d::new(&mut tree, "", channels, heads, usize_of(&c, "num_layers"), spec).unwrap();
    assert_eq!(model.head_dim, usize_of(&c, "attention_head_dim"), "{case}");
    let params = load_params(case, &tree);
    let data = SafetensorsFile::open(case_dir(case).join("data.safetensors")).unwrap();
    let get = |name: &str| data.tensor(name, &Device::Cpu, DType::F32).unwrap();
    let (x, context, dy) = (get("input.hidden_states"), get("input.encoder_hidden_states"), get("grad_output"));
    let mut alloc = Standalone(Device::Cpu);
    let mut grads = Grads::zeros(&tree, &mut alloc, DType::F32).unwrap();
    let acts = model.forward(&params, &x, &context, &mut alloc).unwrap_or_else(|e| panic!("{case}: {e:#}"));
    let g = model.backward(&params, &mut grads, &acts, &x, &context, &dy, &mut alloc).unwrap_or_else(|e| panic!("{case}: {e:#}"));
    check(case, &data, &acts.output, &[("hidden_states", &g.dx), ("encoder_hidden_states", &g.dcontext)], &tree, &grads);

    // A second backward writes the same input gradients and adds the parameter gradients again (to f32
    // rounding: the GEMMs fold the old value into their sums).
    let first: Vec<Tensor> = (0..tree.len()).map(|i| scaled(grads.get(ParamId(i)), 2.0)).collect();
    let again = model.backward(&params, &mut grads, &acts, &x, &context, &dy, &mut alloc).unwrap();
    assert_eq!(again.dx.to_f32_vec().unwrap(), g.dx.to_f32_vec().unwrap(), "{case}: dx is written, not accumulated");
    for (i, doubled) in first.iter().enumerate() {
        let err = relative_l2(grads.get(ParamId(i)), doubled);
        assert!(err <= 1e-6, "{case}: {} does not accumulate: relative L2 error {err:.3e}", tree.spec(ParamId(i)).name);
    }
}

fn scaled(t: &Tensor, alpha: f32) -> Tensor {
    let values: Vec<f32> = t.to_f32_vec().unwrap().iter().map(|v| alpha * v).collect();
    Tensor::from_f32(&Device::Cpu, t.shape(), DType::F32, &values).unwrap()
}

#[test]
fn transformer_2d_with_conv_projections_matches_diffusers() {
    transformer_case("transformer_conv_1layer");
    transformer_case("transformer_conv_2layer");
}

#[test]
fn transformer_2d_with_linear_projections_matches_diffusers() {
    transformer_case("transformer_linear_1layer");
    transformer_case("transformer_linear_2layer");
}

fn time_embedding_case(case: &str) {
    let c = config(case);
    let mut tree = ParamTree::new();
    let model = TimeEmbedding::new(&mut tree, "", usize_of(&c, "channels"), usize_of(&c, "time_embed_dim"));
    let params = load_params(case, &tree);
    let data = SafetensorsFile::open(case_dir(case).join("data.safetensors")).unwrap();
    let get = |name: &str| data.tensor(name, &Device::Cpu, DType::F32).unwrap();
    let (t, dy) = (get("input.timestep"), get("grad_output"));
    let mut alloc = Standalone(Device::Cpu);
    let mut grads = Grads::zeros(&tree, &mut alloc, DType::F32).unwrap();
    let (flip, shift) = (c["flip_sin_to_cos"].as_bool().unwrap(), c["freq_shift"].as_f64().unwrap());
    let acts = model.forward(&params, &t, flip, shift, &mut alloc).unwrap_or_else(|e| panic!("{case}: {e:#}"));
    model.backward(&params, &mut grads, &acts, &dy, &mut alloc).unwrap_or_else(|e| panic!("{case}: {e:#}"));
    check(case, &data, &acts.output, &[], &tree, &grads);
}

#[test]
fn time_embedding_matches_diffusers() {
    time_embedding_case("time_embedding_flip");
    time_embedding_case("time_embedding_shift");
}

#[test]
fn transformer_2d_names_its_shape_errors() {
    let mut tree = ParamTree::new();
    let spec = TransformerSpec { cross_attention_dim: 12, groups: 4, use_linear_projection: false };
    let model = Transformer2d::new(&mut tree, "", 16, 2, 1, spec).unwrap();
    let mut alloc = Standalone(Device::Cpu);
    let mut plan = MemoryPlan::new();
    ParamStore::plan(&tree, &mut plan, DType::F32);
    let mut arena = Arena::new(&Device::Cpu, &plan).unwrap();
    let params = ParamStore::random(&tree, &mut arena, DType::F32, 7).unwrap();
    let context = Tensor::zeros(&Device::Cpu, &[2, 7, 12], DType::F32).unwrap();
    let wrong_channels = Tensor::zeros(&Device::Cpu, &[2, 8, 3, 5], DType::F32).unwrap();
    let e = model.forward(&params, &wrong_channels, &context, &mut alloc).err().unwrap();
    assert!(format!("{e:#}").contains("Transformer2DModel: input [2, 8, 3, 5] has 8 channels, the model 16"), "{e:#}");
    let x = Tensor::zeros(&Device::Cpu, &[2, 16, 3, 5], DType::F32).unwrap();
    let wrong_context = Tensor::zeros(&Device::Cpu, &[2, 7, 10], DType::F32).unwrap();
    let e = model.forward(&params, &x, &wrong_context, &mut alloc).err().unwrap();
    assert!(format!("{e:#}").contains("transformer_blocks.0") && format!("{e:#}").contains("[2, 7, 10]"), "{e:#}");
}
