//! Shape kernels: concat, split and upsampling move values, so they match the CPU bit for bit; the 2x2
//! block sum and the pooled mean add in a different order than the CPU (f32 1e-5; bf16 rounds once, 2^-8).

use sgdm::memory::pool::Pool;
use sgdm::ops::shape;
use sgdm::{DType, Device};

use crate::common::{compare, cpu, random, rounded, upload, zeros};

pub fn check(gpu: &Device) {
    let (n, ca, cb, h, w) = (2, 3, 5, 7, 9);
    let pool = Pool::new(gpu, 1 << 24).unwrap();
    for (dtype, rel, floor) in [(DType::F32, 1e-5, 1e-6), (DType::BF16, 2f32.powi(-8), 1e-6)] {
        let a = rounded(dtype, &random(n * ca * h * w, -1.0, 1.0, 201));
        let b = rounded(dtype, &random(n * cb * h * w, -1.0, 1.0, 202));
        let ga = upload(&pool, &[n, ca, h, w], dtype, &a);
        let gb = upload(&pool, &[n, cb, h, w], dtype, &b);
        let mut gy = pool.alloc(&[n, ca + cb, h, w], dtype).unwrap();
        let mut cy = zeros(&[n, ca + cb, h, w]);
        shape::concat_channels(&ga, &gb, &mut gy).unwrap();
        shape::concat_channels(&cpu(&[n, ca, h, w], &a), &cpu(&[n, cb, h, w], &b), &mut cy).unwrap();
        assert_eq!(gy.to_f32_vec().unwrap(), cy.f32s().unwrap(), "concat_channels {dtype}");
        let mut sa = pool.alloc(&[n, ca, h, w], dtype).unwrap();
        let mut sb = pool.alloc(&[n, cb, h, w], dtype).unwrap();
        shape::split_channels(&gy, &mut sa, &mut sb).unwrap();
        assert_eq!((sa.to_f32_vec().unwrap(), sb.to_f32_vec().unwrap()), (a.clone(), b.clone()), "split_channels {dtype}");
        println!("concat_channels / split_channels {dtype}: bit-exact");

        let x = rounded(dtype, &random(n * ca * h * w, -1.0, 1.0, 203));
        let gx = upload(&pool, &[n, ca, h, w], dtype, &x);
        let mut gu = pool.alloc(&[n, ca, 2 * h, 2 * w], dtype).unwrap();
        let mut cu = zeros(&[n, ca, 2 * h, 2 * w]);
        shape::upsample_nearest2x(&gx, &mut gu).unwrap();
        shape::upsample_nearest2x(&cpu(&[n, ca, h, w], &x), &mut cu).unwrap();
        assert_eq!(gu.to_f32_vec().unwrap(), cu.f32s().unwrap(), "upsample_nearest2x {dtype}");
        let dy = rounded(dtype, &random(n * ca * 4 * h * w, -1.0, 1.0, 204));
        let gdy = upload(&pool, &[n, ca, 2 * h, 2 * w], dtype, &dy);
        let mut gdx = pool.alloc(&[n, ca, h, w], dtype).unwrap();
        let mut cdx = zeros(&[n, ca, h, w]);
        shape::upsample_nearest2x_backward(&gdy, &mut gdx).unwrap();
        shape::upsample_nearest2x_backward(&cpu(&[n, ca, 2 * h, 2 * w], &dy), &mut cdx).unwrap();
        compare(&format!("upsample_nearest2x_backward {dtype}"), &gdx.to_f32_vec().unwrap(), cdx.f32s().unwrap(), rel, floor);

        // AdaptiveAvgPool1d(1) on the EEG encoder's [B, C, L]: rows more than one block of warps, odd L.
        for (pb, pc, pl) in [(3, 129, 250), (1, 5, 1)] {
            let x = rounded(dtype, &random(pb * pc * pl, -2.0, 2.0, 205));
            let gx = upload(&pool, &[pb, pc, pl], dtype, &x);
            let mut gp = pool.alloc(&[pb, pc, 1], dtype).unwrap();
            let mut cp = zeros(&[pb, pc, 1]);
            shape::avg_pool_last(&gx, &mut gp).unwrap();
            shape::avg_pool_last(&cpu(&[pb, pc, pl], &x), &mut cp).unwrap();
            compare(&format!("avg_pool_last [{pb}, {pc}, {pl}] {dtype}"), &gp.to_f32_vec().unwrap(), cp.f32s().unwrap(), rel, floor);
            let dy = rounded(dtype, &random(pb * pc, -1.0, 1.0, 206));
            let gdy = upload(&pool, &[pb, pc, 1], dtype, &dy);
            let mut gdx = pool.alloc(&[pb, pc, pl], dtype).unwrap();
            let mut cdx = zeros(&[pb, pc, pl]);
            shape::avg_pool_last_backward(&gdy, &mut gdx).unwrap();
            shape::avg_pool_last_backward(&cpu(&[pb, pc, 1], &dy), &mut cdx).unwrap();
            compare(&format!("avg_pool_last_backward {dtype}"), &gdx.to_f32_vec().unwrap(), cdx.f32s().unwrap(), rel, floor);
        }

        // transpose_last2 only moves values: bit-exact, on odd sizes across several 32x32 tiles, batch 3.
        for (tb, tr, tc) in [(3, 77, 45), (1, 1, 33), (2, 4096, 40)] {
            let x = rounded(dtype, &random(tb * tr * tc, -1.0, 1.0, 207));
            let gx = upload(&pool, &[tb, tr, tc], dtype, &x);
            let mut gt = pool.alloc(&[tb, tc, tr], dtype).unwrap();
            let mut ct = zeros(&[tb, tc, tr]);
            shape::transpose_last2(&gx, &mut gt).unwrap();
            shape::transpose_last2(&cpu(&[tb, tr, tc], &x), &mut ct).unwrap();
            assert_eq!(gt.to_f32_vec().unwrap(), ct.f32s().unwrap(), "transpose_last2 [{tb}, {tr}, {tc}] {dtype}");
            let mut gback = pool.alloc(&[tb, tr, tc], dtype).unwrap();
            shape::transpose_last2_backward(&gt, &mut gback).unwrap();
            assert_eq!(gback.to_f32_vec().unwrap(), x, "transpose_last2_backward [{tb}, {tc}, {tr}] {dtype}");
        }
        println!("transpose_last2 / transpose_last2_backward {dtype}: bit-exact");
    }
}
