//! DDIM, Euler and DPM-Solver++(2M) replayed against trajectories recorded from diffusers
//! (tests/fixtures/schedulers/make_fixture.py says how they were made).

mod common;

use sgdm::diffusion::scheduler::{Scheduler, SchedulerKind};

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

#[test]
fn schedulers_reproduce_diffusers_trajectories() {
    let text = std::fs::read_to_string(common::repo_root().join("tests/fixtures/schedulers/trajectories.json")).unwrap();
    let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 12);
    for case in cases {
        let kind: SchedulerKind = case["scheduler"].as_str().unwrap().parse().unwrap();
        let steps = case["steps"].as_u64().unwrap() as usize;
        let what = format!("{kind} with {steps} steps");
        let s = Scheduler::new(kind, steps).unwrap();

        // diffusers keeps timesteps and sigmas in float32: 1e-4 absolute on timesteps up to 999.
        let want_t = floats(&case["timesteps"]);
        assert_eq!(s.timesteps.len(), want_t.len(), "{what}");
        for (a, b) in s.timesteps.iter().zip(&want_t) {
            assert!((a - b).abs() < 1e-4, "{what}: timestep {a} vs diffusers {b}");
        }
        // diffusers forms σ = √((1 − ᾱ)/ᾱ) in float32, where 1 − ᾱ cancels near t = 0 (ᾱ = 0.99915):
        // a relative error up to ~1e-5 there, which our float64 does not have.
        let sigma = case["init_noise_sigma"].as_f64().unwrap();
        assert!((s.init_noise_sigma - sigma).abs() <= 2e-5 * sigma, "{what}: init_noise_sigma {} vs {sigma}", s.init_noise_sigma);

        let mut sample: Vec<f32> = floats(&case["initial_sample"]).iter().map(|&x| x as f32).collect();
        let mut x0 = vec![0f32; sample.len()];
        let (eps, samples, scales) = (case["eps"].as_array().unwrap(), case["samples"].as_array().unwrap(), floats(&case["input_scales"]));
        let mut worst = 0f64;
        for step in 0..steps {
            assert!((s.input_scale(step) - scales[step]).abs() <= 1e-6, "{what}: input scale at step {step}");
            let e: Vec<f32> = floats(&eps[step]).iter().map(|&x| x as f32).collect();
            s.coefficients(step).apply(&mut sample, &e, &mut x0);
            let want = floats(&samples[step]);
            let scale = want.iter().fold(1f64, |m, x| m.max(x.abs()));
            for (i, (g, w)) in sample.iter().zip(&want).enumerate() {
                let err = (*g as f64 - w).abs() / scale;
                worst = worst.max(err);
                // diffusers computes in float32 (coefficients and the update), we in float64 and round once:
                // 1e-5 of the sample's scale covers float32 rounding over 25 steps.
                assert!(err <= 1e-5, "{what}: step {step}, element {i}: {g} vs diffusers {w}");
            }
        }
        println!("{what:<24} max error {worst:.2e} of the sample scale");
    }
}
