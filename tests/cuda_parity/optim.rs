//! Optimizer kernels: three AdamW steps from the same state on both devices (the same f32 operations; CUDA
//! may fuse a multiply-add, so 1e-6 relative), the bf16 weight copy equal to the rounded f32 weights, and
//! clipping over a list of tensors of both dtypes (norm 1e-5; clipped values within one rounding).

use sgdm::memory::pool::Pool;
use sgdm::ops::optim::{adamw_step, clip_grad_norm, AdamW, PARTIALS};
use sgdm::{DType, Device, Tensor};

use crate::common::{compare, cpu, random, rounded};

fn upload(pool: &Pool, shape: &[usize], dtype: DType, values: &[f32]) -> Tensor {
    let mut t = pool.alloc(shape, dtype).unwrap();
    t.write_f32(values).unwrap();
    t
}

pub fn check(gpu: &Device) {
    let n = 100_003;
    let pool = Pool::new(gpu, 14 * n * 4 + 16384).unwrap();
    let opt = AdamW { lr: 1e-2, weight_decay: 0.1, ..AdamW::default() };
    for grad_dtype in [DType::F32, DType::BF16] {
        let p0 = random(n, -1.0, 1.0, 401);
        let mut gp = upload(&pool, &[n], DType::F32, &p0);
        let mut gcopy = pool.alloc(&[n], DType::BF16).unwrap();
        let mut gm = upload(&pool, &[n], DType::F32, &vec![0.0; n]);
        let mut gv = upload(&pool, &[n], DType::F32, &vec![0.0; n]);
        let (mut cp, mut cm, mut cv) = (cpu(&[n], &p0), cpu(&[n], &vec![0.0; n]), cpu(&[n], &vec![0.0; n]));
        for step in 1..=3 {
            let g = rounded(grad_dtype, &random(n, -1.0, 1.0, 410 + step));
            let gg = upload(&pool, &[n], grad_dtype, &g);
            adamw_step(&opt, step, &mut gp, &gg, &mut gm, &mut gv, Some(&mut gcopy)).unwrap();
            adamw_step(&opt, step, &mut cp, &cpu(&[n], &g), &mut cm, &mut cv, None).unwrap();
        }
        let got = gp.to_f32_vec().unwrap();
        compare(&format!("adamw p (grads {grad_dtype})"), &got, cp.f32s().unwrap(), 1e-6, 1e-7);
        compare(&format!("adamw m (grads {grad_dtype})"), &gm.to_f32_vec().unwrap(), cm.f32s().unwrap(), 1e-6, 1e-8);
        compare(&format!("adamw v (grads {grad_dtype})"), &gv.to_f32_vec().unwrap(), cv.f32s().unwrap(), 1e-6, 1e-12);
        assert_eq!(gcopy.to_f32_vec().unwrap(), rounded(DType::BF16, &got), "the bf16 copy is the rounded f32 weights");
    }

    // Clipping over [f32 tensor, bf16 tensor, empty tensor]; the CPU sees the bf16 values as f32.
    let a = random(n, -1.0, 1.0, 420);
    let b = rounded(DType::BF16, &random(777, -3.0, 3.0, 421));
    for clip_below in [true, false] {
        let mut ga = upload(&pool, &[n], DType::F32, &a);
        let mut gb = upload(&pool, &[777], DType::BF16, &b);
        let mut ge = pool.alloc(&[0], DType::F32).unwrap();
        let mut gnorm = pool.alloc(&[1], DType::F32).unwrap();
        let mut gpartials = pool.alloc(&[PARTIALS], DType::F32).unwrap();
        let (mut ca, mut cb, mut ce) = (cpu(&[n], &a), cpu(&[777], &b), cpu(&[0], &[]));
        let (mut cnorm, mut cpartials) = (cpu(&[1], &[0.0]), cpu(&[PARTIALS], &[0.0; PARTIALS]));
        let max_norm = if clip_below { 1.0 } else { 1e6 };
        clip_grad_norm(&mut [&mut ga, &mut gb, &mut ge], max_norm, &mut gnorm, &mut gpartials).unwrap();
        clip_grad_norm(&mut [&mut ca, &mut cb, &mut ce], max_norm, &mut cnorm, &mut cpartials).unwrap();
        compare("clip_grad_norm norm", &gnorm.to_f32_vec().unwrap(), cnorm.f32s().unwrap(), 1e-5, 0.0);
        compare(&format!("clip_grad_norm f32 (clip {clip_below})"), &ga.to_f32_vec().unwrap(), ca.f32s().unwrap(), 1e-5, 1e-12);
        compare(&format!("clip_grad_norm bf16 (clip {clip_below})"), &gb.to_f32_vec().unwrap(), cb.f32s().unwrap(), 2f32.powi(-8), 1e-12);
    }
}
