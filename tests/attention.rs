//! The CPU attention against a naive float64 reference: forward on odd and SD-like shapes, backward against
//! central differences, `=` semantics of the gradients, and bad shapes as errors (tests/cuda_parity holds
//! CUDA to this CPU reference).

mod common;

use common::{check_gradient, compare, cpu, random};
use sgdm::ops::attention::{attention_backward, attention_forward, AttentionSpec, Qkv, QkvGrads};
use sgdm::{DType, Device, Tensor};

#[derive(Clone, Copy, Debug)]
struct Case {
    batch: usize,
    q_len: usize,
    kv_len: usize,
    heads: usize,
    head_dim: usize,
}

impl Case {
    fn hidden(&self) -> usize {
        self.heads * self.head_dim
    }
    fn q_shape(&self) -> [usize; 3] {
        [self.batch, self.q_len, self.hidden()]
    }
    fn kv_shape(&self) -> [usize; 3] {
        [self.batch, self.kv_len, self.hidden()]
    }
    fn stats_shape(&self) -> [usize; 3] {
        [self.batch, self.heads, self.q_len]
    }
    fn q_numel(&self) -> usize {
        self.batch * self.q_len * self.hidden()
    }
    fn kv_numel(&self) -> usize {
        self.batch * self.kv_len * self.hidden()
    }
}

/// Float64 attention, the textbook way: scores, max-subtracted softmax, weighted sum. Returns (out, lse).
fn reference(c: Case, scale: f64, q: &[f64], k: &[f64], v: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let (hd, d) = (c.hidden(), c.head_dim);
    let mut out = vec![0f64; c.q_numel()];
    let mut lse = vec![0f64; c.batch * c.heads * c.q_len];
    for b in 0..c.batch {
        for h in 0..c.heads {
            for i in 0..c.q_len {
                let qi = &q[(b * c.q_len + i) * hd + h * d..][..d];
                let s: Vec<f64> = (0..c.kv_len)
                    .map(|j| scale * qi.iter().zip(&k[(b * c.kv_len + j) * hd + h * d..][..d]).map(|(a, b)| a * b).sum::<f64>())
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = s.iter().map(|x| (x - m).exp()).sum();
                lse[(b * c.heads + h) * c.q_len + i] = m + sum.ln();
                let o = &mut out[(b * c.q_len + i) * hd + h * d..][..d];
                for (j, sj) in s.iter().enumerate() {
                    let p = (sj - m).exp() / sum;
                    for (o, v) in o.iter_mut().zip(&v[(b * c.kv_len + j) * hd + h * d..][..d]) {
                        *o += p * v;
                    }
                }
            }
        }
    }
    (out, lse)
}

struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

fn inputs(c: Case, seed: u64) -> Inputs {
    Inputs { q: random(c.q_numel(), -1.0, 1.0, seed), k: random(c.kv_numel(), -1.0, 1.0, seed + 1), v: random(c.kv_numel(), -1.0, 1.0, seed + 2) }
}

/// Runs the CPU forward; returns (out, lse).
fn forward(c: Case, spec: AttentionSpec, x: &Inputs) -> (Tensor, Tensor) {
    let (q, k, v) = (cpu(&c.q_shape(), &x.q), cpu(&c.kv_shape(), &x.k), cpu(&c.kv_shape(), &x.v));
    let mut out = Tensor::zeros(&Device::Cpu, &c.q_shape(), DType::F32).unwrap();
    let mut lse = Tensor::zeros(&Device::Cpu, &c.stats_shape(), DType::F32).unwrap();
    attention_forward(spec, Qkv { q: &q, k: &k, v: &v }, &mut out, &mut lse).unwrap();
    (out, lse)
}

/// Runs forward then backward with `dout` on the CPU, gradients starting from `fill`; returns (dq, dk, dv).
fn backward(c: Case, spec: AttentionSpec, x: &Inputs, dout: &[f32], fill: f32) -> [Vec<f32>; 3] {
    let (q, k, v) = (cpu(&c.q_shape(), &x.q), cpu(&c.kv_shape(), &x.k), cpu(&c.kv_shape(), &x.v));
    let (out, lse) = forward(c, spec, x);
    let mut delta = Tensor::zeros(&Device::Cpu, &c.stats_shape(), DType::F32).unwrap();
    let mut dq = cpu(&c.q_shape(), &vec![fill; c.q_numel()]);
    let mut dk = cpu(&c.kv_shape(), &vec![fill; c.kv_numel()]);
    let mut dv = cpu(&c.kv_shape(), &vec![fill; c.kv_numel()]);
    attention_backward(
        spec,
        Qkv { q: &q, k: &k, v: &v },
        &out,
        &lse,
        &cpu(&c.q_shape(), dout),
        &mut delta,
        QkvGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv },
    )
    .unwrap();
    [dq.to_f32_vec().unwrap(), dk.to_f32_vec().unwrap(), dv.to_f32_vec().unwrap()]
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

const CASES: [Case; 6] = [
    // cross-attention with odd lengths, 3 heads of SD's head dim 40
    Case { batch: 2, q_len: 7, kv_len: 13, heads: 3, head_dim: 40 },
    // the smallest supported head dim, batch 1
    Case { batch: 1, q_len: 13, kv_len: 7, heads: 3, head_dim: 4 },
    // text cross-attention: 77 key tokens
    Case { batch: 1, q_len: 9, kv_len: 77, heads: 2, head_dim: 80 },
    // SD's largest head dim
    Case { batch: 1, q_len: 5, kv_len: 6, heads: 1, head_dim: 160 },
    // self-attention spanning two CPU query blocks (64 rows) and an odd head dim
    Case { batch: 2, q_len: 70, kv_len: 70, heads: 2, head_dim: 5 },
    // single key: softmax is 1, out = v
    Case { batch: 1, q_len: 3, kv_len: 1, heads: 2, head_dim: 8 },
];

#[test]
fn forward_matches_float64_on_odd_and_sd_shapes() {
    for (n, c) in CASES.iter().enumerate() {
        let x = inputs(*c, 10 * n as u64);
        let spec = AttentionSpec::new(c.heads);
        let (out, lse) = forward(*c, spec, &x);
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let (want_out, want_lse) = reference(*c, scale, &f64s(&x.q), &f64s(&x.k), &f64s(&x.v));
        // f32 dot products of length <= 160 and a softmax over <= 77 keys: a few 1e-7 relative per step;
        // outputs are convex combinations of values in [-1, 1], so 1e-5 absolute leaves a 10x margin.
        compare(&format!("forward out {c:?}"), out.f32s().unwrap(), &f32s(&want_out), 1e-5, 1e-5);
        compare(&format!("forward lse {c:?}"), lse.f32s().unwrap(), &f32s(&want_lse), 1e-5, 1e-5);
    }
}

#[test]
fn custom_scale_and_large_scores_stay_finite_and_exact() {
    // Scores up to ~ 30 * 40 = 1200: exp would overflow without the max subtraction.
    let c = Case { batch: 1, q_len: 7, kv_len: 13, heads: 3, head_dim: 40 };
    let x = inputs(c, 99);
    let spec = AttentionSpec::new(c.heads).with_scale(30.0);
    let (out, lse) = forward(c, spec, &x);
    let (want_out, want_lse) = reference(c, 30.0, &f64s(&x.q), &f64s(&x.k), &f64s(&x.v));
    // An f32 score carries ~1e-7 of its magnitude (up to ~1200) as error, so lse, which follows the largest
    // score, is off by up to ~1e-4 absolute (1e-5 relative leaves margin); the sharp softmax passes a
    // fraction of that to the output (measured ~1e-6; 1e-5 bound).
    compare("forward out, scale 30", out.f32s().unwrap(), &f32s(&want_out), 1e-5, 1e-5);
    compare("forward lse, scale 30", lse.f32s().unwrap(), &f32s(&want_lse), 1e-5, 1e-4);
}

#[test]
fn backward_matches_central_differences_in_float64() {
    for (n, c) in CASES.iter().enumerate() {
        let x = inputs(*c, 100 + 10 * n as u64);
        let spec = AttentionSpec::new(c.heads);
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let g = random(c.q_numel(), -1.0, 1.0, 7 + n as u64);
        let [dq, dk, dv] = backward(*c, spec, &x, &g, 0.0);
        let (q, k, v) = (f64s(&x.q), f64s(&x.k), f64s(&x.v));
        let loss = |out: Vec<f64>| out.iter().zip(&g).map(|(o, g)| o * *g as f64).sum::<f64>();
        // Analytic gradients in f32 are good to ~1e-6 relative of the sums they come from; central
        // differences in f64 with h = 1e-6 to ~1e-9. 1e-4 relative with a 2e-6 floor for near-cancelling sums.
        let (rel, abs) = (1e-4, 2e-6);
        check_gradient(&format!("dq {c:?}"), &x.q, &dq, |q| loss(reference(*c, scale, q, &k, &v).0), 60, rel, abs);
        check_gradient(&format!("dk {c:?}"), &x.k, &dk, |k| loss(reference(*c, scale, &q, k, &v).0), 60, rel, abs);
        check_gradient(&format!("dv {c:?}"), &x.v, &dv, |v| loss(reference(*c, scale, &q, &k, v).0), 60, rel, abs);
    }
}

#[test]
fn backward_writes_gradients_instead_of_accumulating() {
    let c = CASES[0];
    let x = inputs(c, 5);
    let spec = AttentionSpec::new(c.heads);
    let g = random(c.q_numel(), -1.0, 1.0, 6);
    let from_zero = backward(c, spec, &x, &g, 0.0);
    let from_garbage = backward(c, spec, &x, &g, f32::NAN);
    for (name, (a, b)) in ["dq", "dk", "dv"].iter().zip(from_zero.iter().zip(&from_garbage)) {
        assert_eq!(a, b, "{name} depends on what the gradient buffer held before");
    }
}

/// Shapes of q, k, v, out and lse.
type Shapes = [&'static [usize]; 5];

fn forward_error([q, k, v, out, lse]: Shapes, heads: usize) -> String {
    let z = |s: &[usize]| Tensor::zeros(&Device::Cpu, s, DType::F32).unwrap();
    let (q, k, v) = (z(q), z(k), z(v));
    let (mut out, mut lse) = (z(out), z(lse));
    attention_forward(AttentionSpec::new(heads), Qkv { q: &q, k: &k, v: &v }, &mut out, &mut lse).unwrap_err().to_string()
}

#[test]
fn bad_shapes_are_errors_naming_the_op_and_shapes() {
    let cases: [(Shapes, usize, &str); 8] = [
        ([&[2, 7, 30], &[2, 13, 30], &[2, 13, 30], &[2, 7, 30], &[2, 4, 7]], 4, "hidden size 30 of q [2, 7, 30] is not divisible by 4 heads"),
        ([&[2, 7, 32], &[1, 13, 32], &[1, 13, 32], &[2, 7, 32], &[2, 4, 7]], 4, "batch 2 of q [2, 7, 32] differs from batch 1 of k [1, 13, 32]"),
        ([&[1, 7, 161], &[1, 13, 161], &[1, 13, 161], &[1, 7, 161], &[1, 1, 7]], 1, "head dim 161"),
        ([&[1, 7, 32], &[1, 13, 32], &[1, 12, 32], &[1, 7, 32], &[1, 4, 7]], 4, "v [1, 12, 32] does not match k [1, 13, 32]"),
        ([&[1, 7, 32], &[1, 13, 16], &[1, 13, 16], &[1, 7, 32], &[1, 4, 7]], 4, "hidden size 32 of q [1, 7, 32] differs from 16"),
        ([&[1, 7, 32], &[1, 13, 32], &[1, 13, 32], &[1, 7, 32], &[1, 7, 4]], 4, "lse [1, 7, 4] must be [batch, heads, q_len] = [1, 4, 7]"),
        ([&[1, 7, 32], &[1, 13, 32], &[1, 13, 32], &[1, 13, 32], &[1, 4, 7]], 4, "shape [1, 13, 32] does not match [1, 7, 32]"),
        ([&[7, 32], &[13, 32], &[13, 32], &[7, 32], &[4, 7]], 4, "must be [batch, length, heads*head_dim]"),
    ];
    for (shapes, heads, want) in cases {
        let err = forward_error(shapes, heads);
        assert!(err.starts_with("attention_forward: ") && err.contains(want), "{err}");
        println!("rejected: {err}");
    }
    let err = forward_error([&[1, 7, 32], &[1, 0, 32], &[1, 0, 32], &[1, 7, 32], &[1, 4, 7]], 4);
    assert!(err.contains("empty dimension"), "{err}");

    // The backward checks its own extra tensors.
    let c = Case { batch: 1, q_len: 7, kv_len: 13, heads: 4, head_dim: 8 };
    let z = |s: &[usize]| Tensor::zeros(&Device::Cpu, s, DType::F32).unwrap();
    let (q, k, v, out, lse, dout) = (z(&c.q_shape()), z(&c.kv_shape()), z(&c.kv_shape()), z(&c.q_shape()), z(&c.stats_shape()), z(&c.q_shape()));
    let (mut delta, mut dq, mut dk, mut dv) = (z(&c.stats_shape()), z(&c.q_shape()), z(&c.q_shape()), z(&c.kv_shape()));
    let err = attention_backward(
        AttentionSpec::new(c.heads),
        Qkv { q: &q, k: &k, v: &v },
        &out,
        &lse,
        &dout,
        &mut delta,
        QkvGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv },
    )
    .unwrap_err()
    .to_string();
    assert!(err.starts_with("attention_backward: ") && err.contains("shape [1, 7, 32] does not match [1, 13, 32]"), "{err}");
    println!("rejected: {err}");
    let mut bf16_delta = Tensor::zeros(&Device::Cpu, &c.stats_shape(), DType::BF16).unwrap();
    let mut dk = z(&c.kv_shape());
    let err = attention_backward(
        AttentionSpec::new(c.heads),
        Qkv { q: &q, k: &k, v: &v },
        &out,
        &lse,
        &dout,
        &mut bf16_delta,
        QkvGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("delta must be f32"), "{err}");
    println!("rejected: {err}");
}
