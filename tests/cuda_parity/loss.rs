//! Loss kernels: the block-partial reduction in f32 against the CPU's f64 sum (1e-5 relative, both dtypes:
//! the loss itself is f32 and the inputs are the same bf16-rounded values on both sides), run twice to
//! check the bits repeat; gradients f32 1e-5, bf16 one rounding (2^-8).

use sgdm::memory::pool::Pool;
use sgdm::ops::loss::{self, PARTIALS};
use sgdm::{DType, Device, Tensor};

use crate::common::{compare, cpu, random, rounded, upload, zeros};

pub fn check(gpu: &Device) {
    let shape = [3, 4, 63, 65]; // more elements than the partial-sum grid's threads, not a multiple of them
    let n: usize = shape.iter().product();
    let pool = Pool::new(gpu, 8 * n * 4 + (1 << 16)).unwrap();
    for (dtype, grad_rel) in [(DType::F32, 1e-5), (DType::BF16, 2f32.powi(-8))] {
        let a = rounded(dtype, &random(n, -2.0, 2.0, 301));
        let b = rounded(dtype, &random(n, -3.0, 2.0, 302));
        let (ga, gb) = (upload(&pool, &shape, dtype, &a), upload(&pool, &shape, dtype, &b));
        let mut gloss = pool.alloc(&[1], DType::F32).unwrap();
        let mut gpartials = pool.alloc(&[PARTIALS], DType::F32).unwrap();
        let (mut closs, mut cpartials) = (zeros(&[1]), zeros(&[PARTIALS]));
        let (ca, cb) = (cpu(&shape, &a), cpu(&shape, &b));

        type Reduce = fn(&Tensor, &Tensor, &mut Tensor, &mut Tensor) -> anyhow::Result<()>;
        let reductions: [(&str, Reduce); 2] = [("mse_loss", loss::mse_loss), ("kl_loss", loss::kl_loss)];
        for (name, op) in reductions {
            op(&ga, &gb, &mut gloss, &mut gpartials).unwrap();
            let first = gloss.to_bytes().unwrap();
            op(&ga, &gb, &mut gloss, &mut gpartials).unwrap();
            assert_eq!(gloss.to_bytes().unwrap(), first, "{name} {dtype} is not deterministic");
            op(&ca, &cb, &mut closs, &mut cpartials).unwrap();
            compare(&format!("{name} {dtype}"), &gloss.to_f32_vec().unwrap(), closs.f32s().unwrap(), 1e-5, 0.0);
        }

        let mut gd = pool.alloc(&shape, dtype).unwrap();
        let mut cd = zeros(&shape);
        loss::mse_loss_backward(&ga, &gb, 0.7, &mut gd).unwrap();
        loss::mse_loss_backward(&ca, &cb, 0.7, &mut cd).unwrap();
        compare(&format!("mse_loss_backward {dtype}"), &gd.to_f32_vec().unwrap(), cd.f32s().unwrap(), grad_rel, 1e-12);
        let mut gd2 = pool.alloc(&shape, dtype).unwrap();
        let mut cd2 = zeros(&shape);
        loss::kl_loss_backward(&ga, &gb, 0.7, &mut gd, &mut gd2).unwrap();
        loss::kl_loss_backward(&ca, &cb, 0.7, &mut cd, &mut cd2).unwrap();
        compare(&format!("kl_loss_backward dmu {dtype}"), &gd.to_f32_vec().unwrap(), cd.f32s().unwrap(), grad_rel, 1e-12);
        compare(&format!("kl_loss_backward dlogvar {dtype}"), &gd2.to_f32_vec().unwrap(), cd2.f32s().unwrap(), grad_rel, 1e-12);
    }
}
