//! LSTM on the CPU against a float64 implementation of PyTorch's LSTM equations, central differences of it
//! for every gradient, `+=`/`=` semantics and shape errors.

mod common;

use common::{check_gradient, compare, cpu, f64s, random, NanFilled};
use sgdm::nn::Standalone;
use sgdm::ops::lstm::{lstm_backward, lstm_forward, step_rows, LstmActivations, LstmBackwardScratch, LstmConfig, LstmParams};
use sgdm::{DType, Device, Tensor};

const TWO_LAYERS_BIDI: LstmConfig = LstmConfig { input_size: 7, hidden_size: 4, num_layers: 2, bidirectional: true };

fn sigmoid(v: f64) -> f64 {
    1.0 / (1.0 + (-v).exp())
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

/// torch.nn.LSTM(batch_first=True) in float64, straight from its documented equations. `p` holds the
/// parameters in `LstmConfig::parameter_shapes` order; returns the output [B, T, D·H].
fn reference(cfg: &LstmConfig, p: &[Vec<f64>], x: &[f64], b: usize, t: usize) -> Vec<f64> {
    let (h, d) = (cfg.hidden_size, cfg.directions());
    let (mut input, mut in_size) = (x.to_vec(), cfg.input_size);
    for layer in 0..cfg.num_layers {
        let mut out = vec![0.0; b * t * d * h];
        for dir in 0..d {
            let base = (layer * d + dir) * 4;
            let (wih, whh, bih, bhh) = (&p[base], &p[base + 1], &p[base + 2], &p[base + 3]);
            for bi in 0..b {
                let (mut hs, mut cs) = (vec![0.0; h], vec![0.0; h]);
                let order: Vec<usize> = if dir == 0 { (0..t).collect() } else { (0..t).rev().collect() };
                for ti in order {
                    let xt = &input[(bi * t + ti) * in_size..][..in_size];
                    let pre: Vec<f64> =
                        (0..4 * h).map(|r| bih[r] + bhh[r] + dot(&wih[r * in_size..][..in_size], xt) + dot(&whh[r * h..][..h], &hs)).collect();
                    for j in 0..h {
                        let (i, f, g, o) = (sigmoid(pre[j]), sigmoid(pre[h + j]), pre[2 * h + j].tanh(), sigmoid(pre[3 * h + j]));
                        cs[j] = f * cs[j] + i * g;
                        hs[j] = o * cs[j].tanh();
                    }
                    out[(bi * t + ti) * d * h + dir * h..][..h].copy_from_slice(&hs);
                }
            }
        }
        input = out;
        in_size = d * h;
    }
    input
}

/// Random parameters in [-0.6, 0.6): wide enough that the gates leave their linear range.
fn random_params(cfg: &LstmConfig, seed: u64) -> Vec<Vec<f32>> {
    cfg.parameter_shapes().iter().enumerate().map(|(i, (_, s))| random(s.iter().product(), -0.6, 0.6, seed + i as u64)).collect()
}

fn params_on(device: &Device, cfg: LstmConfig, values: &[Vec<f32>], dtype: DType) -> LstmParams {
    let mut p = LstmParams::zeros(device, cfg, dtype).unwrap();
    for ((_, t), v) in p.named_mut().into_iter().zip(values) {
        t.write_f32(v).unwrap();
    }
    p
}

struct Run {
    y: Vec<f32>,
    dx: Vec<f32>,
    grads: Vec<Vec<f32>>,
}

/// Forward, then backward from `dy` into zeroed gradients.
fn run_cpu(cfg: LstmConfig, params: &[Vec<f32>], x: &[f32], dy: &[f32], b: usize, t: usize) -> Run {
    let p = params_on(&Device::Cpu, cfg, params, DType::F32);
    let xt = cpu(&[b, t, cfg.input_size], x);
    let mut acts = LstmActivations::zeros(&Device::Cpu, cfg, b, t, DType::F32).unwrap();
    lstm_forward(&p, &xt, &mut acts).unwrap();
    let mut grads = LstmParams::zeros(&Device::Cpu, cfg, DType::F32).unwrap();
    let mut scratch = LstmBackwardScratch::zeros(&Device::Cpu, cfg, b, t, DType::F32).unwrap();
    let mut dx = cpu(&[b, t, cfg.input_size], &vec![f32::NAN; x.len()]); // `=`: prior contents must not leak
    lstm_backward(&p, &xt, &acts, &cpu(acts.output().shape(), dy), Some(&mut dx), &mut grads, &mut scratch).unwrap();
    Run {
        y: acts.output().to_f32_vec().unwrap(),
        dx: dx.to_f32_vec().unwrap(),
        grads: grads.named().iter().map(|(_, t)| t.to_f32_vec().unwrap()).collect(),
    }
}

// Forward: f32 sums of at most 8 + 8 products per gate and f32 exp/tanh stay within a few ulps; over 5 steps
// and 2 layers the error stays near 1e-6 on outputs of magnitude < 1.
const FWD_REL: f32 = 1e-5;
const FWD_FLOOR: f32 = 1e-5;
// Gradients: the f32 analytic gradient sums B·T terms through the recurrence (relative error ~1e-6); the
// float64 central differences (step 1e-6) are accurate to ~1e-9. 1e-4 relative leaves margin for
// cancellation in small gradients, the floor for gradients that are nearly zero.
const GRAD_REL: f64 = 1e-4;
const GRAD_ABS: f64 = 2e-5;

#[test]
fn forward_matches_float64_pytorch_equations_for_odd_sizes() {
    for (cfg, b, t) in [
        (TWO_LAYERS_BIDI, 1, 5),
        (TWO_LAYERS_BIDI, 3, 5),
        (LstmConfig { input_size: 5, hidden_size: 3, num_layers: 3, bidirectional: false }, 2, 4),
        (LstmConfig { input_size: 2, hidden_size: 6, num_layers: 1, bidirectional: true }, 3, 1),
    ] {
        let params = random_params(&cfg, 10);
        let x = random(b * t * cfg.input_size, -1.0, 1.0, 1);
        let run = run_cpu(cfg, &params, &x, &vec![0.0; b * t * cfg.output_size()], b, t);
        let p64: Vec<Vec<f64>> = params.iter().map(|v| f64s(v)).collect();
        let want: Vec<f32> = reference(&cfg, &p64, &f64s(&x), b, t).iter().map(|&v| v as f32).collect();
        compare(&format!("lstm_forward L{} D{} B{b} T{t}", cfg.num_layers, cfg.directions()), &run.y, &want, FWD_REL, FWD_FLOOR);
    }
}

#[test]
fn reverse_direction_at_the_last_step_has_seen_only_the_last_input() {
    let cfg = LstmConfig { input_size: 7, hidden_size: 4, num_layers: 1, bidirectional: true };
    let (b, t, h) = (3, 5, 4);
    let params = random_params(&cfg, 30);
    let x = random(b * t * 7, -1.0, 1.0, 31);
    let full = run_cpu(cfg, &params, &x, &vec![0.0; b * t * 2 * h], b, t).y;
    let last: Vec<f32> = (0..b).flat_map(|bi| x[(bi * t + t - 1) * 7..][..7].to_vec()).collect();
    let single = run_cpu(cfg, &params, &last, &vec![0.0; b * 2 * h], b, 1).y;
    for bi in 0..b {
        let got = &full[(bi * t + t - 1) * 2 * h + h..][..h];
        compare(&format!("reverse h at T-1, row {bi}"), got, &single[bi * 2 * h + h..][..h], 1e-6, 1e-7);
    }
}

#[test]
fn backward_matches_central_differences_for_the_input_and_every_parameter() {
    for (cfg, b, t) in [
        (TWO_LAYERS_BIDI, 3, 5),
        (TWO_LAYERS_BIDI, 1, 5),
        // Three layers use both inter-layer gradient buffers.
        (LstmConfig { input_size: 5, hidden_size: 3, num_layers: 3, bidirectional: true }, 2, 4),
        // One step: no recurrence at all (dW_hh stays zero).
        (LstmConfig { input_size: 2, hidden_size: 6, num_layers: 1, bidirectional: false }, 2, 1),
    ] {
        let params = random_params(&cfg, 40);
        let x = random(b * t * cfg.input_size, -1.0, 1.0, 41);
        let g = random(b * t * cfg.output_size(), -1.0, 1.0, 42); // dL/dy for L = Σ y·g
        let run = run_cpu(cfg, &params, &x, &g, b, t);
        let p64: Vec<Vec<f64>> = params.iter().map(|v| f64s(v)).collect();
        let loss = |p: &[Vec<f64>], x: &[f64]| dot(&reference(&cfg, p, x, b, t), &f64s(&g));
        let tag = format!("L{} D{} B{b}", cfg.num_layers, cfg.directions());
        check_gradient(&format!("lstm dx {tag}"), &x, &run.dx, |x| loss(&p64, x), 60, GRAD_REL, GRAD_ABS);
        for (i, (name, _)) in cfg.parameter_shapes().iter().enumerate() {
            let with = |v: &[f64]| {
                let mut p = p64.clone();
                p[i] = v.to_vec();
                loss(&p, &f64s(&x))
            };
            check_gradient(&format!("lstm d{name} {tag}"), &params[i], &run.grads[i], with, 24, GRAD_REL, GRAD_ABS);
        }
    }
}

#[test]
fn parameter_grads_accumulate_and_input_grads_overwrite() {
    let (cfg, b, t) = (TWO_LAYERS_BIDI, 3, 5);
    let params = random_params(&cfg, 50);
    let x = random(b * t * 7, -1.0, 1.0, 51);
    let dy = random(b * t * 8, -1.0, 1.0, 52);
    let once = run_cpu(cfg, &params, &x, &dy, b, t);

    let p = params_on(&Device::Cpu, cfg, &params, DType::F32);
    let xt = cpu(&[b, t, 7], &x);
    let mut acts = LstmActivations::zeros(&Device::Cpu, cfg, b, t, DType::F32).unwrap();
    lstm_forward(&p, &xt, &mut acts).unwrap();
    let prior: Vec<Vec<f32>> =
        cfg.parameter_shapes().iter().enumerate().map(|(i, (_, s))| random(s.iter().product(), -1.0, 1.0, 60 + i as u64)).collect();
    let mut grads = params_on(&Device::Cpu, cfg, &prior, DType::F32);
    let mut scratch = LstmBackwardScratch::zeros(&Device::Cpu, cfg, b, t, DType::F32).unwrap();
    let mut dx = cpu(&[b, t, 7], &vec![5.0; b * t * 7]);
    let dyt = cpu(&[b, t, 8], &dy);
    for _ in 0..2 {
        lstm_backward(&p, &xt, &acts, &dyt, Some(&mut dx), &mut grads, &mut scratch).unwrap();
    }
    // Same f32 operations in the same order, so only the final additions round differently.
    compare("lstm dx after two backwards (=)", dx.f32s().unwrap(), &once.dx, 1e-6, 1e-7);
    for (i, (name, t)) in grads.named().iter().enumerate() {
        let want: Vec<f32> = prior[i].iter().zip(&once.grads[i]).map(|(p, g)| p + 2.0 * g).collect();
        compare(&format!("lstm {name} grad: prior + 2 x grad (+=)"), t.f32s().unwrap(), &want, 1e-5, 1e-6);
    }
    // No input gradient requested: parameter gradients still accumulate.
    lstm_backward(&p, &xt, &acts, &dyt, None, &mut grads, &mut scratch).unwrap();
    let w = grads.named()[0].1.to_f32_vec().unwrap();
    let want: Vec<f32> = prior[0].iter().zip(&once.grads[0]).map(|(p, g)| p + 3.0 * g).collect();
    compare("lstm weight_ih_l0 grad without dx", &w, &want, 1e-5, 1e-6);
}

fn error_of(r: anyhow::Result<()>) -> String {
    format!("{:#}", r.expect_err("expected an error"))
}

#[test]
fn bad_shapes_are_errors_naming_the_op_and_the_tensor() {
    let (cfg, b, t) = (TWO_LAYERS_BIDI, 3, 5);
    let cpu_dev = Device::Cpu;
    let p = params_on(&cpu_dev, cfg, &random_params(&cfg, 70), DType::F32);
    let mut acts = LstmActivations::zeros(&cpu_dev, cfg, b, t, DType::F32).unwrap();

    let e = error_of(lstm_forward(&p, &Tensor::zeros(&cpu_dev, &[b, t, 6], DType::F32).unwrap(), &mut acts));
    assert!(e.contains("lstm_forward") && e.contains("input x") && e.contains("[3, 5, 6]"), "{e}");
    let e = error_of(lstm_forward(&p, &Tensor::zeros(&cpu_dev, &[b, t + 1, 7], DType::F32).unwrap(), &mut acts));
    assert!(e.contains("lstm_forward") && e.contains("[3, 6, 7]"), "{e}");

    let mut wrong = params_on(&cpu_dev, cfg, &random_params(&cfg, 70), DType::F32);
    wrong.layers[1][1].weight_hh = Tensor::zeros(&cpu_dev, &[16, 5], DType::F32).unwrap();
    let x = Tensor::zeros(&cpu_dev, &[b, t, 7], DType::F32).unwrap();
    let e = error_of(lstm_forward(&wrong, &x, &mut acts));
    assert!(e.contains("lstm_forward") && e.contains("weight_hh_l1_reverse") && e.contains("[16, 5]"), "{e}");

    let mut other = LstmActivations::zeros(&cpu_dev, LstmConfig { hidden_size: 5, ..cfg }, b, t, DType::F32).unwrap();
    let e = error_of(lstm_forward(&p, &x, &mut other));
    assert!(e.contains("lstm_forward") && e.contains("activations"), "{e}");

    lstm_forward(&p, &x, &mut acts).unwrap();
    let mut grads = LstmParams::zeros(&cpu_dev, cfg, DType::F32).unwrap();
    let mut scratch = LstmBackwardScratch::zeros(&cpu_dev, cfg, b, t, DType::F32).unwrap();
    let bad_dy = Tensor::zeros(&cpu_dev, &[b, t, 4], DType::F32).unwrap();
    let e = error_of(lstm_backward(&p, &x, &acts, &bad_dy, None, &mut grads, &mut scratch));
    assert!(e.contains("lstm_backward") && e.contains("dy") && e.contains("[3, 5, 4]"), "{e}");
    let dy = Tensor::zeros(&cpu_dev, &[b, t, 8], DType::F32).unwrap();
    let mut bad_dx = Tensor::zeros(&cpu_dev, &[b, t, 8], DType::F32).unwrap();
    let e = error_of(lstm_backward(&p, &x, &acts, &dy, Some(&mut bad_dx), &mut grads, &mut scratch));
    assert!(e.contains("lstm_backward") && e.contains("dx") && e.contains("[3, 5, 8]"), "{e}");
    grads.layers[0][0].bias_ih = Tensor::zeros(&cpu_dev, &[15], DType::F32).unwrap();
    let e = error_of(lstm_backward(&p, &x, &acts, &dy, None, &mut grads, &mut scratch));
    assert!(e.contains("lstm_backward") && e.contains("gradients bias_ih_l0") && e.contains("[15]"), "{e}");
    let mut grads = LstmParams::zeros(&cpu_dev, cfg, DType::F32).unwrap();
    let mut short = LstmBackwardScratch::zeros(&cpu_dev, cfg, b, t - 1, DType::F32).unwrap();
    let e = error_of(lstm_backward(&p, &x, &acts, &dy, None, &mut grads, &mut short));
    assert!(e.contains("lstm_backward") && e.contains("scratch"), "{e}");

    let bf = params_on(&cpu_dev, cfg, &random_params(&cfg, 70), DType::BF16);
    let e = error_of(lstm_forward(&bf, &x, &mut acts));
    assert!(e.contains("lstm_forward") && e.contains("f32"), "{e}");
}

#[test]
fn parameter_names_follow_pytorch() {
    let names: Vec<String> = TWO_LAYERS_BIDI.parameter_shapes().into_iter().map(|(n, _)| n).collect();
    assert_eq!(&names[..4], ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"]);
    assert_eq!(&names[4..8], ["weight_ih_l0_reverse", "weight_hh_l0_reverse", "bias_ih_l0_reverse", "bias_hh_l0_reverse"]);
    assert_eq!(names[8], "weight_ih_l1");
    let shapes: Vec<Vec<usize>> = TWO_LAYERS_BIDI.parameter_shapes().into_iter().map(|(_, s)| s).collect();
    assert_eq!(shapes[0], [16, 7]);
    assert_eq!(shapes[8], [16, 8]); // layer 1 reads both directions of layer 0
    assert_eq!(shapes[9], [16, 4]);
}

#[test]
fn step_rows_align_every_step_to_256_bytes() {
    assert_eq!(step_rows(3, 4, DType::F32), 16); // 16-byte rows: 16 per 256 bytes
    assert_eq!(step_rows(5, 40, DType::F32), 8); // 160-byte rows: 8 rows = 1280 bytes
    assert_eq!(step_rows(5, 40, DType::BF16), 16);
    assert_eq!(step_rows(256, 256, DType::BF16), 256); // the EEG encoder: no padding
    assert_eq!(step_rows(1, 256, DType::F32), 1);
    for (b, h, dt) in [(3, 4, DType::F32), (7, 33, DType::BF16), (2, 1, DType::BF16)] {
        let r = step_rows(b, h, dt);
        assert!(r >= b && (r * h * dt.size()).is_multiple_of(256), "{b} {h} {dt}: {r}");
    }
}

#[test]
fn buffers_full_of_nan_from_a_reused_pool_do_not_leak_into_results() {
    // A step pool's memory holds whatever the last step left there: every activation and scratch buffer must
    // be written before it is read, padding rows included.
    let (cfg, b, t) = (TWO_LAYERS_BIDI, 3, 5);
    let params = random_params(&cfg, 80);
    let x = random(b * t * 7, -1.0, 1.0, 81);
    let dy = random(b * t * 8, -1.0, 1.0, 82);
    let clean = run_cpu(cfg, &params, &x, &dy, b, t);

    let p = params_on(&Device::Cpu, cfg, &params, DType::F32);
    let xt = cpu(&[b, t, 7], &x);
    let mut acts = LstmActivations::new(cfg, b, t, DType::F32, &mut NanFilled(Device::Cpu)).unwrap();
    lstm_forward(&p, &xt, &mut acts).unwrap();
    let mut grads = LstmParams::zeros(&Device::Cpu, cfg, DType::F32).unwrap();
    let mut scratch = LstmBackwardScratch::new(cfg, b, t, DType::F32, &mut NanFilled(Device::Cpu)).unwrap();
    let mut dx = cpu(&[b, t, 7], &vec![f32::NAN; b * t * 7]);
    lstm_backward(&p, &xt, &acts, &cpu(&[b, t, 8], &dy), Some(&mut dx), &mut grads, &mut scratch).unwrap();
    compare("lstm y from NaN-filled buffers", &acts.output().to_f32_vec().unwrap(), &clean.y, 0.0, 0.0);
    compare("lstm dx from NaN-filled buffers", dx.f32s().unwrap(), &clean.dx, 0.0, 0.0);
    for ((name, g), want) in grads.named().iter().zip(&clean.grads) {
        compare(&format!("lstm d{name} from NaN-filled buffers"), g.f32s().unwrap(), want, 0.0, 0.0);
    }
}

#[test]
fn three_bidirectional_layers_from_an_allocator_match_the_reference() {
    // Three layers: the backward's layer-gradient buffers alternate between its two.
    let (cfg, b, t) = (LstmConfig { input_size: 5, hidden_size: 3, num_layers: 3, bidirectional: true }, 2, 4);
    let alloc = &mut Standalone(Device::Cpu);
    let mut acts = LstmActivations::new(cfg, b, t, DType::F32, alloc).unwrap();
    let mut scratch = LstmBackwardScratch::new(cfg, b, t, DType::F32, alloc).unwrap();
    let params = random_params(&cfg, 90);
    let x = random(b * t * 5, -1.0, 1.0, 91);
    let dy = random(b * t * 6, -1.0, 1.0, 92);
    let want = run_cpu(cfg, &params, &x, &dy, b, t);
    let p = params_on(&Device::Cpu, cfg, &params, DType::F32);
    let xt = cpu(&[b, t, 5], &x);
    lstm_forward(&p, &xt, &mut acts).unwrap();
    let mut grads = LstmParams::zeros(&Device::Cpu, cfg, DType::F32).unwrap();
    let mut dx = cpu(&[b, t, 5], &vec![0.0; b * t * 5]);
    lstm_backward(&p, &xt, &acts, &cpu(&[b, t, 6], &dy), Some(&mut dx), &mut grads, &mut scratch).unwrap();
    compare("lstm y, three layers", &acts.output().to_f32_vec().unwrap(), &want.y, 0.0, 0.0);
    compare("lstm dx, three layers", dx.f32s().unwrap(), &want.dx, 0.0, 0.0);
}
