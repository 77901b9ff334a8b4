//! Attention kernels against the CPU reference: every head-dim variant (32, 64, 96, 128, 160), self and
//! cross shapes spanning several tiles, forward (out, lse) and backward (dq, dk, dv), f32 and bf16; in bf16
//! on tensor cores and on the CUDA cores.

use sgdm::memory::pool::Pool;
use sgdm::ops::attention::{attention_backward_using, attention_forward_using, AttentionKernel, AttentionSpec, Qkv, QkvGrads};
use sgdm::{DType, Device, Tensor};

use crate::common::{compare, random, rounded};

/// (batch, q_len, kv_len, heads, head_dim). The CUDA-core kernels come in head-dim variants of 32, 64, 96, 128
/// and 160 columns, the tensor-core ones in every multiple of 16 up to 160 (backward up to 96): the cases cover
/// each (the parity test checks every kernel was launched).
const CASES: [(usize, usize, usize, usize, usize); 11] = [
    (1, 13, 7, 3, 4),    // d32 variant (tensor cores: d16), fewer keys than one tile
    (2, 7, 13, 3, 40),   // d64 variant (d48), SD's 40
    (1, 100, 77, 2, 80), // d96 variant (d80), 77-token cross-attention, several query and key tiles
    (1, 33, 40, 1, 128), // d128 variant, one row past a forward block
    (2, 50, 70, 2, 160), // d160 variant, SD's largest
    (1, 64, 64, 8, 33),  // odd head dim, 8 heads
    (1, 9, 70, 1, 32),   // tensor cores d32, two key tiles
    (1, 17, 5, 2, 64),   // d64
    (1, 5, 19, 1, 96),   // d96
    (1, 11, 66, 1, 112), // d112 (forward on tensor cores, backward on the CUDA cores)
    (1, 20, 9, 1, 144),  // d144
];

struct Run {
    out: Vec<f32>,
    lse: Vec<f32>,
    grads: [Vec<f32>; 3],
}

/// Forward and backward on `device` with tensors of `dtype` leased from one pool (ranges at offsets inside
/// one allocation, as in a step).
fn run(device: &Device, dtype: DType, variant: AttentionKernel, case: (usize, usize, usize, usize, usize), x: [&[f32]; 4]) -> Run {
    let (b, lq, lk, h, d) = case;
    let (qs, ks, ss) = ([b, lq, h * d], [b, lk, h * d], [b, h, lq]);
    let aligned = |shape: &[usize], dtype: DType| (shape.iter().product::<usize>() * dtype.size()).div_ceil(256) * 256;
    let bytes = [qs, ks, ks, qs, qs, qs, ks, ks].iter().map(|s| aligned(s, dtype)).sum::<usize>() + 2 * aligned(&ss, DType::F32);
    let pool = Pool::new(device, bytes).unwrap();
    let tensor = |shape: &[usize], dtype: DType, values: Option<&[f32]>| -> Tensor {
        let mut t = pool.alloc(shape, dtype).unwrap();
        if let Some(v) = values {
            t.write_f32(v).unwrap();
        }
        t
    };
    let q = tensor(&qs, dtype, Some(x[0]));
    let k = tensor(&ks, dtype, Some(x[1]));
    let v = tensor(&ks, dtype, Some(x[2]));
    let dout = tensor(&qs, dtype, Some(x[3]));
    let mut out = tensor(&qs, dtype, None);
    let mut lse = tensor(&ss, DType::F32, None);
    let mut delta = tensor(&ss, DType::F32, None);
    let mut dq = tensor(&qs, dtype, None);
    let mut dk = tensor(&ks, dtype, None);
    let mut dv = tensor(&ks, dtype, None);
    let spec = AttentionSpec::new(h);
    let qkv = Qkv { q: &q, k: &k, v: &v };
    attention_forward_using(variant, spec, qkv, &mut out, &mut lse).unwrap();
    let grads = QkvGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv };
    attention_backward_using(variant, spec, qkv, &out, &lse, &dout, &mut delta, grads).unwrap();
    device.synchronize().unwrap();
    Run {
        out: out.to_f32_vec().unwrap(),
        lse: lse.to_f32_vec().unwrap(),
        grads: [dq.to_f32_vec().unwrap(), dk.to_f32_vec().unwrap(), dv.to_f32_vec().unwrap()],
    }
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

/// kernels/attention.cu: the CUDA-core kernels in f32 and bf16.
pub fn check(gpu: &Device) {
    check_variant(gpu, &[DType::F32, DType::BF16], AttentionKernel::Simt);
}

/// kernels/attention_mma.cu: the tensor-core kernels (bf16; P and dS are rounded to bf16 before their
/// products, within the same bounds; the backward for head dims up to 96, on the CUDA cores beyond).
pub fn check_tensor_cores(gpu: &Device) {
    check_variant(gpu, &[DType::BF16], AttentionKernel::TensorCore);
}

fn check_variant(gpu: &Device, dtypes: &[DType], variant: AttentionKernel) {
    for (n, case) in CASES.iter().enumerate() {
        let (b, lq, lk, h, d) = *case;
        let seed = 1000 + 10 * n as u64;
        let q = random(b * lq * h * d, -1.0, 1.0, seed);
        let k = random(b * lk * h * d, -1.0, 1.0, seed + 1);
        let v = random(b * lk * h * d, -1.0, 1.0, seed + 2);
        let g = random(b * lq * h * d, -1.0, 1.0, seed + 3);
        // f32: only the summation order and exp2f differ from the CPU, ~1e-6 relative per result.
        // bf16: both sides see the same bf16-rounded inputs, but the GPU rounds out and the gradients to bf16
        // (2^-9 relative) and forms delta from the rounded out, so gradients carry ~2^-8 of their scale.
        // The floor is relative to the largest value, for gradients whose sums nearly cancel.
        for &dtype in dtypes {
            let (rel, floor) = if dtype == DType::F32 { (1e-4, 1e-5) } else { (1e-2, 1e-2) };
            let x: Vec<Vec<f32>> = [&q, &k, &v, &g].iter().map(|t| rounded(dtype, t)).collect();
            let xs = [&x[0][..], &x[1][..], &x[2][..], &x[3][..]];
            let want = run(&Device::Cpu, DType::F32, AttentionKernel::Simt, *case, xs);
            let got = run(gpu, dtype, variant, *case, xs);
            let what = |name: &str| format!("attention {name} {dtype} {variant:?} {case:?}");
            compare(&what("out"), &got.out, &want.out, rel, floor * max_abs(&want.out));
            compare(&what("lse"), &got.lse, &want.lse, 1e-5, 1e-5 * max_abs(&want.lse).max(1.0));
            for (name, (got, want)) in ["dq", "dk", "dv"].iter().zip(got.grads.iter().zip(&want.grads)) {
                compare(&what(name), got, want, rel, floor * max_abs(want));
            }
        }
    }
    // Device-side errors surface at the next synchronize; none may be pending.
    gpu.synchronize().unwrap();
}
