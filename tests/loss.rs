//! The CPU losses against float64 references and central differences (tests/cuda_parity/loss.rs holds
//! CUDA to them).

mod common;

use common::{check_gradient, cpu, f64s, random};
use sgdm::ops::loss::{kl_loss, kl_loss_backward, mse_loss, mse_loss_backward, PARTIALS};
use sgdm::{DType, Device, Tensor};

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(&Device::Cpu, shape, DType::F32).unwrap()
}

fn mse64(p: &[f64], t: &[f32]) -> f64 {
    p.iter().zip(t).map(|(p, t)| (p - *t as f64).powi(2)).sum::<f64>() / p.len() as f64
}

fn kl64(mu: &[f64], logvar: &[f64], batch: usize) -> f64 {
    -0.5 * mu.iter().zip(logvar).map(|(m, lv)| 1.0 + lv - m * m - lv.exp()).sum::<f64>() / batch as f64
}

#[test]
fn mse_loss_and_gradient_match_float64() {
    for shape in [vec![3, 4, 7, 9], vec![1, 5], vec![1]] {
        let n: usize = shape.iter().product();
        let pred = random(n, -2.0, 2.0, 1);
        let target = random(n, -2.0, 2.0, 2);
        let (mut loss, mut partials) = (zeros(&[1]), zeros(&[PARTIALS]));
        mse_loss(&cpu(&shape, &pred), &cpu(&shape, &target), &mut loss, &mut partials).unwrap();
        let want = mse64(&f64s(&pred), &target);
        let got = loss.f32s().unwrap()[0];
        // f64 accumulation, one rounding to f32 at the end.
        assert!((got as f64 - want).abs() <= 1e-7 * want, "mse {shape:?}: {got} vs {want}");

        let dloss = 0.5;
        let mut dpred = zeros(&shape);
        mse_loss_backward(&cpu(&shape, &pred), &cpu(&shape, &target), dloss, &mut dpred).unwrap();
        // One rounded product of a rounded difference: ~1e-7 relative.
        check_gradient(&format!("mse_loss_backward {shape:?}"), &pred, dpred.f32s().unwrap(), |p| dloss as f64 * mse64(p, &target), 300, 1e-6, 1e-9);
    }
}

#[test]
fn kl_loss_sums_elements_and_averages_the_batch() {
    // By hand: mu = [1, 0], logvar = [0, ln 2], batch 1: -0.5 * ((1 + 0 - 1 - 1) + (1 + ln 2 - 0 - 2))
    // = -0.5 * (-1 + ln 2 - 1) = 1 - ln(2) / 2 = 0.65342641.
    let (mut loss, mut partials) = (zeros(&[1]), zeros(&[PARTIALS]));
    kl_loss(&cpu(&[1, 2], &[1.0, 0.0]), &cpu(&[1, 2], &[0.0, 2f32.ln()]), &mut loss, &mut partials).unwrap();
    assert!((loss.f32s().unwrap()[0] - 0.653_426_4).abs() < 1e-6, "{:?}", loss.f32s().unwrap());

    for shape in [vec![3, 40], vec![1, 4, 5, 7], vec![5, 3, 3, 1]] {
        let n: usize = shape.iter().product();
        let batch = shape[0];
        let mu = random(n, -2.0, 2.0, 3);
        let logvar = random(n, -3.0, 2.0, 4);
        kl_loss(&cpu(&shape, &mu), &cpu(&shape, &logvar), &mut loss, &mut partials).unwrap();
        let want = kl64(&f64s(&mu), &f64s(&logvar), batch);
        let got = loss.f32s().unwrap()[0];
        // f32 exp of each logvar is exact to 1 ulp, summed in f64: ~1e-7 relative of the sum of magnitudes.
        assert!((got as f64 - want).abs() <= 1e-6 * want.abs(), "kl {shape:?}: {got} vs {want}");

        let dloss = 1.5;
        let (mut dmu, mut dlogvar) = (zeros(&shape), zeros(&shape));
        kl_loss_backward(&cpu(&shape, &mu), &cpu(&shape, &logvar), dloss, &mut dmu, &mut dlogvar).unwrap();
        // The f64 loss (up to ~1e2 here) is good to ~1e-14 absolute; divided by 2h = 2e-6 the central
        // difference is good to ~1e-8 absolute, which sets the floor. The analytic side is ~1e-7 relative.
        let lv64 = f64s(&logvar);
        let mu64 = f64s(&mu);
        check_gradient(&format!("kl dmu {shape:?}"), &mu, dmu.f32s().unwrap(), |m| dloss as f64 * kl64(m, &lv64, batch), 200, 1e-6, 3e-8);
        check_gradient(
            &format!("kl dlogvar {shape:?}"),
            &logvar,
            dlogvar.f32s().unwrap(),
            |lv| dloss as f64 * kl64(&mu64, lv, batch),
            200,
            1e-6,
            3e-8,
        );
    }
}

#[test]
fn losses_refuse_bad_shapes_and_outputs() {
    let (mut loss, mut partials) = (zeros(&[1]), zeros(&[PARTIALS]));
    let err = mse_loss(&zeros(&[2, 3]), &zeros(&[3, 2]), &mut loss, &mut partials).unwrap_err().to_string();
    assert!(err.contains("mse_loss") && err.contains("[3, 2]") && err.contains("[2, 3]"), "{err}");
    let mut wide = zeros(&[2]);
    let err = mse_loss(&zeros(&[2, 3]), &zeros(&[2, 3]), &mut wide, &mut partials).unwrap_err().to_string();
    assert!(err.contains("one f32 element") && err.contains("[2]"), "{err}");
    let mut short = zeros(&[PARTIALS - 1]);
    let err = kl_loss(&zeros(&[2, 3]), &zeros(&[2, 3]), &mut loss, &mut short).unwrap_err().to_string();
    assert!(err.contains("kl_loss") && err.contains("partials"), "{err}");
    let err = kl_loss(&zeros(&[2, 3]), &zeros(&[2, 4]), &mut loss, &mut partials).unwrap_err().to_string();
    assert!(err.contains("kl_loss") && err.contains("[2, 4]"), "{err}");
    let err = mse_loss(&zeros(&[0]), &zeros(&[0]), &mut loss, &mut partials).unwrap_err().to_string();
    assert!(err.contains("empty"), "{err}");
    let (mut dmu, mut dlv) = (zeros(&[2, 3]), zeros(&[3, 3]));
    let err = kl_loss_backward(&zeros(&[2, 3]), &zeros(&[2, 3]), 1.0, &mut dmu, &mut dlv).unwrap_err().to_string();
    assert!(err.contains("kl_loss_backward") && err.contains("[3, 3]"), "{err}");
}
