//! AutoencoderKL pieces beyond what the PyTorch fixture (tests/conformance.rs, autoencoder_kl_tiny) covers:
//! the resnet's time-embedding path (the UNet's, absent from the VAE) against central differences, the VAE
//! attention's matmul + softmax + matmul path (head dims above the fused op's 160) against the fused one,
//! and the SD 1.5 VAE at full width on a small image.

mod common;

use sgdm::models::autoencoder_kl::VaeAttention;
use sgdm::models::autoencoder_kl::{AutoencoderKl, AutoencoderKlConfig};
use sgdm::models::resnet::ResnetBlock;
use sgdm::nn::{Grads, ParamStore, ParamTree, Standalone};
use sgdm::{Arena, DType, Device, MemoryPlan, Tensor};

fn random_params(tree: &ParamTree, seed: u64) -> ParamStore {
    let mut plan = MemoryPlan::new();
    ParamStore::plan(tree, &mut plan, DType::F32);
    let mut arena = Arena::new(&Device::Cpu, &plan).unwrap();
    ParamStore::random(tree, &mut arena, DType::F32, seed).unwrap()
}

fn dot(a: &Tensor, b: &[f32]) -> f64 {
    a.to_f32_vec().unwrap().iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// Central differences of `loss` in f32 at up to `samples` coordinates of `x`, against `analytic`.
fn check_f32_differences(what: &str, x: &[f32], analytic: &[f32], loss: impl Fn(&[f32]) -> f64, samples: usize) {
    let h = 1e-2f32;
    let mut xs = x.to_vec();
    let mut max_err = 0f64;
    for i in (0..x.len()).step_by((x.len() / samples).max(1)) {
        xs[i] = x[i] + h;
        let up = loss(&xs);
        xs[i] = x[i] - h;
        let down = loss(&xs);
        xs[i] = x[i];
        let numeric = (up - down) / (2.0 * h as f64);
        let err = (analytic[i] as f64 - numeric).abs();
        assert!(err <= 1e-2 * numeric.abs() + 2e-3, "{what}[{i}]: analytic {}, central difference {numeric}", analytic[i]);
        max_err = max_err.max(err);
    }
    println!("{what:<36} f32 central differences (h = {h}): max abs err {max_err:.3e}  pass");
}

#[test]
fn resnet_time_embedding_gradients_match_central_differences() {
    let (n, cin, cout, temb_ch, hw) = (2, 4, 6, 5, [5, 3]);
    let mut tree = ParamTree::new();
    let block = ResnetBlock::new(&mut tree, "r", cin, cout, Some(temb_ch), 2, 1e-5).unwrap();
    let p = random_params(&tree, 7);
    let x = common::random(n * cin * hw[0] * hw[1], -1.0, 1.0, 1);
    let temb = common::random(n * temb_ch, -2.0, 2.0, 2);
    let gout = common::random(n * cout * hw[0] * hw[1], -1.0, 1.0, 3);
    let alloc = &mut Standalone(Device::Cpu);
    let forward = |x: &[f32], t: &[f32]| {
        let (y, _) =
            block.forward(&p, &common::cpu(&[n, cin, hw[0], hw[1]], x), Some(&common::cpu(&[n, temb_ch], t)), &mut Standalone(Device::Cpu)).unwrap();
        dot(&y, &gout)
    };

    let (xt, tt) = (common::cpu(&[n, cin, hw[0], hw[1]], &x), common::cpu(&[n, temb_ch], &temb));
    let (y, acts) = block.forward(&p, &xt, Some(&tt), alloc).unwrap();
    let mut g = Grads::zeros(&tree, alloc, DType::F32).unwrap();
    let (dx, dtemb) = block.backward(&p, &mut g, &xt, Some(&tt), &acts, &common::cpu(y.shape(), &gout), alloc).unwrap();
    let dtemb = dtemb.expect("a block with time_emb_proj returns dtemb").to_f32_vec().unwrap();
    check_f32_differences("ResnetBlock2D dtemb", &temb, &dtemb, |t| forward(&x, t), 10);
    check_f32_differences("ResnetBlock2D dx", &x, &dx.to_f32_vec().unwrap(), |x| forward(x, &temb), 30);

    // The projected embedding and conv1's bias are both added per (batch, channel) to conv1's output, so their
    // bias gradients are the same sums.
    let grad = |name: &str| g.get(tree.id(name).unwrap()).to_f32_vec().unwrap();
    common::compare("time_emb_proj.bias grad = conv1.bias grad", &grad("r.time_emb_proj.bias"), &grad("r.conv1.bias"), 1e-5, 1e-6);

    let wrong = block.forward(&p, &xt, None, alloc).err().expect("a missing time embedding is an error");
    assert!(wrong.to_string().contains("none was given"), "{wrong}");
}

/// Runs the VAE attention forward and backward on one path; returns y, dx and every parameter gradient.
fn vae_attention(channels: usize, len: usize, fused: bool) -> Vec<(String, Vec<f32>)> {
    let mut tree = ParamTree::new();
    let attention = VaeAttention::new(&mut tree, "a", channels, 8, 1e-6).unwrap();
    let p = random_params(&tree, 11);
    let alloc = &mut Standalone(Device::Cpu);
    let x = common::cpu(&[2, channels, len], &common::random(2 * channels * len, -1.0, 1.0, 4));
    let (y, acts) = attention.forward(&p, &x, fused, alloc).unwrap();
    let dy = common::cpu(y.shape(), &common::random(y.numel(), -1.0, 1.0, 5));
    let mut g = Grads::zeros(&tree, alloc, DType::F32).unwrap();
    let dx = attention.backward(&p, &mut g, &x, &acts, &dy, alloc).unwrap();
    let mut out = vec![("y".to_string(), y.to_f32_vec().unwrap()), ("dx".to_string(), dx.to_f32_vec().unwrap())];
    for (i, spec) in tree.specs().iter().enumerate() {
        out.push((format!("grad.{}", spec.name), g.get(sgdm::nn::ParamId(i)).to_f32_vec().unwrap()));
    }
    out
}

#[test]
fn vae_attention_unfused_path_matches_the_fused_op() {
    for (name, (fused, unfused)) in vae_attention(32, 20, true).into_iter().zip(vae_attention(32, 20, false)).map(|(f, u)| (f.0.clone(), (f.1, u.1)))
    {
        // The key bias gradient is zero in exact arithmetic (softmax ignores a shift shared by a row's scores):
        // both paths leave only rounding there.
        let floor = if name.ends_with("to_k.bias") { 1e-5 } else { 1e-5 * fused.iter().fold(0f32, |m, v| m.max(v.abs())) };
        common::compare(&format!("VAE attention {name}"), &unfused, &fused, 1e-4, floor);
    }
}

#[test]
fn vae_attention_beyond_the_fused_head_dim_runs_unfused_only() {
    let mut tree = ParamTree::new();
    let attention = VaeAttention::new(&mut tree, "a", 192, 32, 1e-6).unwrap();
    let p = random_params(&tree, 3);
    let alloc = &mut Standalone(Device::Cpu);
    let x = common::cpu(&[1, 192, 6], &common::random(192 * 6, -1.0, 1.0, 6));
    let refused = attention.forward(&p, &x, true, alloc).err().expect("head dim 192 exceeds the fused op");
    assert!(refused.to_string().contains("up to 160"), "{refused}");
    let (y, _) = attention.forward(&p, &x, false, alloc).unwrap();
    assert_eq!(y.shape(), [1, 192, 6]);
    assert!(y.to_f32_vec().unwrap().iter().all(|v| v.is_finite()));
}

#[test]
fn sd15_vae_with_random_weights_encodes_and_decodes_a_small_image() {
    let path = common::repo_root().join("tests/fixtures/sd15/vae.json");
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let vae = AutoencoderKl::new(AutoencoderKlConfig::from_json(&path, &config).unwrap()).unwrap();
    assert_eq!((vae.config.block_out_channels.as_slice(), vae.config.latent_channels), ([128, 256, 512, 512].as_slice(), 4));
    let p = random_params(&vae.params, 5);
    let alloc = &mut Standalone(Device::Cpu);
    let image = common::cpu(&[1, 3, 32, 32], &common::random(3 * 32 * 32, -1.0, 1.0, 8));
    let (mean, logvar, _) = vae.encode(&p, &image, alloc).unwrap();
    assert_eq!((mean.shape(), logvar.shape()), ([1, 4, 4, 4].as_slice(), [1, 4, 4, 4].as_slice()));
    let (decoded, _) = vae.decode(&p, &mean, alloc).unwrap();
    assert_eq!(decoded.shape(), [1, 3, 32, 32]);
    assert!(decoded.to_f32_vec().unwrap().iter().all(|v| v.is_finite()));
}
