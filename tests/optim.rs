//! The CPU AdamW step against torch.optim.AdamW's update rule evaluated by hand in float64, and global-norm
//! clipping against torch.nn.utils.clip_grad_norm_'s definition (tests/cuda_parity/optim.rs holds CUDA to them).

mod common;

use common::{compare, cpu, random, rounded};
use sgdm::ops::optim::{adamw_step, clip_grad_norm, AdamW, PARTIALS};
use sgdm::{DType, Device, Tensor};

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(&Device::Cpu, shape, DType::F32).unwrap()
}

/// torch.optim.AdamW (single tensor, amsgrad off, maximize off) for one step `t`, in float64.
fn adamw64(o: &AdamW, t: u64, p: &mut [f64], g: &[f64], m: &mut [f64], v: &mut [f64]) {
    let bc1 = 1.0 - o.beta1.powi(t as i32);
    let bc2 = 1.0 - o.beta2.powi(t as i32);
    for i in 0..p.len() {
        p[i] *= 1.0 - o.lr * o.weight_decay;
        m[i] = o.beta1 * m[i] + (1.0 - o.beta1) * g[i];
        v[i] = o.beta2 * v[i] + (1.0 - o.beta2) * g[i] * g[i];
        let m_hat = m[i] / bc1;
        let v_hat = v[i] / bc2;
        p[i] -= o.lr * m_hat / (v_hat.sqrt() + o.eps);
    }
}

#[test]
fn adamw_first_step_by_hand() {
    // Step 1 from m = v = 0: m = 0.1 g, v = 0.001 g^2, m_hat = g, v_hat = g^2, so with p = 1, g = 0.5 and
    // torch's defaults (lr 1e-3, wd 1e-2): p = 1 * (1 - 1e-5) - 1e-3 * 0.5 / (0.5 + 1e-8) = 0.99899000002.
    let (mut p, mut m, mut v) = (cpu(&[1], &[1.0]), zeros(&[1]), zeros(&[1]));
    adamw_step(&AdamW::default(), 1, &mut p, &cpu(&[1], &[0.5]), &mut m, &mut v, None).unwrap();
    assert!((p.f32s().unwrap()[0] as f64 - 0.99899000002).abs() < 1.2e-7, "{:?}", p.f32s().unwrap());
    assert!((m.f32s().unwrap()[0] - 0.05).abs() < 1e-8 && (v.f32s().unwrap()[0] - 2.5e-4).abs() < 1e-10);
}

#[test]
fn adamw_reproduces_five_steps_of_torchs_rule_in_float64() {
    let n = 37;
    let opt = AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
    let p0 = random(n, -1.0, 1.0, 1);
    let (mut p, mut m, mut v) = (cpu(&[n], &p0), zeros(&[n]), zeros(&[n]));
    let mut copy = Tensor::zeros(&Device::Cpu, &[n], DType::BF16).unwrap();
    let mut p64: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
    let (mut m64, mut v64) = (vec![0.0; n], vec![0.0; n]);
    for t in 1..=5u64 {
        // Gradients of both signs and mixed scales, including near-zero ones where eps matters.
        let mut g = random(n, -1.0, 1.0, 10 + t);
        g[0] = 1e-9;
        g[1] *= 1e3;
        let g64: Vec<f64> = g.iter().map(|&x| x as f64).collect();
        adamw_step(&opt, t, &mut p, &cpu(&[n], &g), &mut m, &mut v, Some(&mut copy)).unwrap();
        adamw64(&opt, t, &mut p64, &g64, &mut m64, &mut v64);
        let want = |x: &[f64]| x.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        // Each step rounds p (|p| <= 1.1) once or twice in f32 and the update (<= 1e-2) to ~1e-6 relative:
        // ~1.5e-7 per step, so 1e-6 absolute after five steps. v is a sum of positive terms: a few ulp of
        // itself. m can cancel (m + 0.1 (g - m) with |g| <= 1): a few ulp of 1 (3e-8) absolute.
        compare(&format!("adamw p after step {t}"), p.f32s().unwrap(), &want(&p64), 0.0, 1e-6);
        compare(&format!("adamw m after step {t}"), m.f32s().unwrap(), &want(&m64), 1e-6, 3e-8);
        compare(&format!("adamw v after step {t}"), v.f32s().unwrap(), &want(&v64), 1e-6, 1e-18);
        assert_eq!(copy.to_f32_vec().unwrap(), rounded(DType::BF16, p.f32s().unwrap()), "bf16 copy = rounded p");
    }
}

#[test]
fn adamw_refuses_bad_inputs() {
    let (mut p, mut m, mut v) = (zeros(&[4]), zeros(&[4]), zeros(&[4]));
    let err = adamw_step(&AdamW::default(), 0, &mut p, &zeros(&[4]), &mut m, &mut v, None).unwrap_err().to_string();
    assert!(err.contains("adamw_step") && err.contains("from 1"), "{err}");
    let err = adamw_step(&AdamW::default(), 1, &mut p, &zeros(&[5]), &mut m, &mut v, None).unwrap_err().to_string();
    assert!(err.contains("adamw_step") && err.contains("[5]") && err.contains("[4]"), "{err}");
    let mut copy = zeros(&[4]);
    let err = adamw_step(&AdamW::default(), 1, &mut p, &zeros(&[4]), &mut m, &mut v, Some(&mut copy)).unwrap_err().to_string();
    assert!(err.contains("must be bf16"), "{err}");
}

#[test]
fn clip_grad_norm_scales_by_the_global_norm() {
    let a0 = random(15, -1.0, 1.0, 3);
    let b0 = random(7, -3.0, 3.0, 4);
    let norm64 = a0.iter().chain(&b0).map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    let (mut norm, mut partials) = (zeros(&[1]), zeros(&[PARTIALS]));

    // max_norm below the norm: everything scales by max_norm / (norm + 1e-6), and the norm before clipping
    // is reported (torch returns it too).
    let max_norm = (0.5 * norm64) as f32;
    let (mut a, mut b) = (cpu(&[3, 5], &a0), cpu(&[7], &b0));
    clip_grad_norm(&mut [&mut a, &mut b], max_norm, &mut norm, &mut partials).unwrap();
    // The norm: f64 sum, one rounding. The scaled values: the f32 coefficient and one product, ~2 ulp.
    assert!((norm.f32s().unwrap()[0] as f64 - norm64).abs() <= 1e-7 * norm64);
    let coef = max_norm as f64 / (norm64 + 1e-6);
    let want = |x: &[f32]| x.iter().map(|&x| (x as f64 * coef) as f32).collect::<Vec<f32>>();
    compare("clip_grad_norm a", a.f32s().unwrap(), &want(&a0), 3e-7, 1e-12);
    compare("clip_grad_norm b", b.f32s().unwrap(), &want(&b0), 3e-7, 1e-12);
    let clipped = a.f32s().unwrap().iter().chain(b.f32s().unwrap()).map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    assert!((clipped - max_norm as f64).abs() < 1e-5 * max_norm as f64, "clipped norm {clipped} vs {max_norm}");

    // max_norm above the norm: the coefficient clamps to 1 and nothing changes.
    let (mut a, mut b) = (cpu(&[3, 5], &a0), cpu(&[7], &b0));
    clip_grad_norm(&mut [&mut a, &mut b], (2.0 * norm64) as f32, &mut norm, &mut partials).unwrap();
    assert_eq!((a.f32s().unwrap(), b.f32s().unwrap()), (&a0[..], &b0[..]));

    // No gradients: a norm of 0, as torch.
    norm.write_f32(&[7.0]).unwrap();
    clip_grad_norm(&mut [], 1.0, &mut norm, &mut partials).unwrap();
    assert_eq!(norm.f32s().unwrap()[0], 0.0);
}

#[test]
fn clip_grad_norm_refuses_bad_outputs() {
    let mut g = zeros(&[3]);
    let (mut norm, mut partials) = (zeros(&[2]), zeros(&[PARTIALS]));
    let err = clip_grad_norm(&mut [&mut g], 1.0, &mut norm, &mut partials).unwrap_err().to_string();
    assert!(err.contains("clip_grad_norm") && err.contains("[2]"), "{err}");
    let (mut norm, mut partials) = (zeros(&[1]), zeros(&[3]));
    let err = clip_grad_norm(&mut [&mut g], 1.0, &mut norm, &mut partials).unwrap_err().to_string();
    assert!(err.contains("partials") && err.contains("[3]"), "{err}");
    let mut half = Tensor::zeros(&Device::Cpu, &[3], DType::BF16).unwrap();
    let (mut norm, mut partials) = (zeros(&[1]), zeros(&[PARTIALS]));
    let err = clip_grad_norm(&mut [&mut half], 1.0, &mut norm, &mut partials).unwrap_err().to_string();
    assert!(err.contains("computes in f32"), "{err}");
}
