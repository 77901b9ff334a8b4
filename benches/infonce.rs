//! The EEG-image contrastive loss at training size: B = 1024 pairs of 512-d embeddings, forward (normalise,
//! similarity GEMM, row and column log-sum-exp, loss) and backward. CPU f32 at full size (~0.1 s per
//! iteration) and, with a GPU, CUDA in bf16 and f32. Throughput counts the similarity GEMM FLOPs
//! (2·B²·D forward, twice that backward).
//!
//! The forward is also timed against the library composition it replaces, in the same run:
//! `<dev>/fused` is `infonce_forward`; `<dev>/composition` is, per side, the row normalisation from separate
//! ops (x·x, the row sums of squares as a GEMV against ones, rsqrt, the per-row factor broadcast by a K = 1
//! GEMM, the product; no eps clamp), the logits GEMM a_n·b_nᵀ/τ into f32, softmax over rows
//! (ops::softmax), the transpose (ops::shape::transpose_last2) and softmax over its rows (the columns), ln of
//! both, and the loss: the diagonal picked by a product with the identity and summed by two GEMVs. Without a
//! gather op the composition reads the B x B matrix twice more than torch's nll_loss would, which favours
//! the fused path by two B² f32 passes. The backward composition is not timed.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sgdm::ops::elementwise::{add, log_forward, mul, rsqrt_forward};
use sgdm::ops::infonce::{infonce_backward, infonce_forward, InfoNceActivations, DEFAULT_TEMPERATURE};
use sgdm::ops::linear::{matmul, MatmulSpec};
use sgdm::ops::shape::transpose_last2;
use sgdm::ops::softmax::softmax_forward;
use sgdm::runtime::select;
use sgdm::{DType, Device, DeviceSpec, Tensor};

const B: usize = 1024;
const D: usize = 512;

fn filled(device: &Device, dtype: DType, seed: usize) -> Tensor {
    let v: Vec<f32> = (0..B * D).map(|i| ((i * 7919 + seed * 104_729) % 1000) as f32 / 500.0 - 1.0).collect();
    Tensor::from_f32(device, &[B, D], dtype, &v).unwrap()
}

fn bench(c: &mut Criterion) {
    let mut runs = vec![("cpu-f32".to_string(), Device::Cpu, DType::F32)];
    match select(DeviceSpec::Cuda(0)) {
        Ok(s) => {
            runs.push(("cuda-bf16".into(), s.device.clone(), DType::BF16));
            runs.push(("cuda-f32".into(), s.device, DType::F32));
        }
        Err(e) => eprintln!("SKIPPED: CUDA InfoNCE benches: {e:#}"),
    }
    for (name, device, dtype) in runs {
        let (a, b) = (filled(&device, dtype, 1), filled(&device, dtype, 2));
        let (mut da, mut db) = (Tensor::zeros(&device, &[B, D], dtype).unwrap(), Tensor::zeros(&device, &[B, D], dtype).unwrap());
        let mut acts = InfoNceActivations::zeros(&device, B, D, dtype).unwrap();
        let mut g = c.benchmark_group(format!("infonce/b{B}-d{D}"));
        g.sample_size(20);
        g.throughput(Throughput::Elements((2 * B * B * D) as u64));
        g.bench_function(format!("forward/{name}"), |bench| {
            bench.iter(|| {
                infonce_forward(&a, &b, DEFAULT_TEMPERATURE, &mut acts).unwrap();
                device.synchronize().unwrap();
            })
        });
        infonce_forward(&a, &b, DEFAULT_TEMPERATURE, &mut acts).unwrap();
        g.throughput(Throughput::Elements((4 * B * B * D) as u64));
        g.bench_function(format!("backward/{name}"), |bench| {
            bench.iter(|| {
                infonce_backward(&mut acts, 1.0, &mut da, &mut db).unwrap();
                device.synchronize().unwrap();
            })
        });
        g.finish();

        let mut u = composition(&device, dtype);
        let mut g = c.benchmark_group(format!("infonce_forward/b{B}-d{D}: fused vs composition"));
        g.sample_size(20);
        g.throughput(Throughput::Elements((2 * B * B * D) as u64));
        g.bench_function(format!("{name}/fused"), |bench| {
            bench.iter(|| {
                infonce_forward(&a, &b, DEFAULT_TEMPERATURE, &mut acts).unwrap();
                device.synchronize().unwrap();
            })
        });
        g.bench_function(format!("{name}/composition"), |bench| {
            bench.iter(|| {
                composition_forward(&a, &b, &mut u);
                device.synchronize().unwrap();
            })
        });
        g.finish();
        composition_forward(&a, &b, &mut u);
        let (fused, composed) = (acts.loss().unwrap(), u.loss.to_f32_vec().unwrap()[0]);
        println!("infonce {name}: loss fused {fused}, composition {composed}");
    }
}

/// The composition's tensors: ones to sum and broadcast with, the normalisation's intermediates (storage
/// dtype) for each side, the f32 [B, B] logits, their transpose, both softmaxes and logs, the identity mask.
struct Composition {
    ones_d: Tensor,
    ones_row: Tensor,
    ones_b: Tensor,
    ones_b_row: Tensor,
    eye: Tensor,
    sq: Tensor,
    sumsq: Tensor,
    inv: Tensor,
    inv_rows: Tensor,
    a_unit: Tensor,
    b_unit: Tensor,
    logits: Tensor,
    logits_t: Tensor,
    p_rows: Tensor,
    p_cols: Tensor,
    lp_rows: Tensor,
    lp_cols: Tensor,
    lp_sum: Tensor,
    diag: Tensor,
    col_sums: Tensor,
    loss: Tensor,
}

fn composition(device: &Device, dtype: DType) -> Composition {
    let z = |shape: &[usize], dtype: DType| Tensor::zeros(device, shape, dtype).unwrap();
    let ones = |shape: &[usize], dtype: DType| Tensor::from_f32(device, shape, dtype, &vec![1.0; shape.iter().product()]).unwrap();
    let eye: Vec<f32> = (0..B * B).map(|i| if i % (B + 1) == 0 { 1.0 } else { 0.0 }).collect();
    let f = DType::F32;
    Composition {
        ones_d: ones(&[D, 1], dtype),
        ones_row: ones(&[1, D], dtype),
        ones_b: ones(&[B, 1], f),
        ones_b_row: ones(&[1, B], f),
        eye: Tensor::from_f32(device, &[B, B], f, &eye).unwrap(),
        sq: z(&[B, D], dtype),
        sumsq: z(&[B, 1], dtype),
        inv: z(&[B, 1], dtype),
        inv_rows: z(&[B, D], dtype),
        a_unit: z(&[B, D], dtype),
        b_unit: z(&[B, D], dtype),
        logits: z(&[B, B], f),
        logits_t: z(&[B, B], f),
        p_rows: z(&[B, B], f),
        p_cols: z(&[B, B], f),
        lp_rows: z(&[B, B], f),
        lp_cols: z(&[B, B], f),
        lp_sum: z(&[B, B], f),
        diag: z(&[B, B], f),
        col_sums: z(&[1, B], f),
        loss: z(&[1, 1], f),
    }
}

/// `unit = x · rsqrt(rowsum(x·x))`, from separate ops.
fn normalize(x: &Tensor, u: &mut Composition, b_side: bool) {
    mul(x, x, &mut u.sq).unwrap();
    matmul(&u.sq, &u.ones_d, &mut u.sumsq, MatmulSpec::default()).unwrap();
    rsqrt_forward(&u.sumsq, &mut u.inv).unwrap();
    matmul(&u.inv, &u.ones_row, &mut u.inv_rows, MatmulSpec::default()).unwrap();
    let unit = if b_side { &mut u.b_unit } else { &mut u.a_unit };
    mul(x, &u.inv_rows, unit).unwrap();
}

/// loss = -(Σ_i ln softmax_rows(L)_ii + Σ_i ln softmax_rows(Lᵀ)_ii) / 2B, L = a_n·b_nᵀ/τ.
fn composition_forward(a: &Tensor, b: &Tensor, u: &mut Composition) {
    normalize(a, u, false);
    normalize(b, u, true);
    let spec = MatmulSpec { trans_b: true, alpha: 1.0 / DEFAULT_TEMPERATURE, ..MatmulSpec::default() };
    matmul(&u.a_unit, &u.b_unit, &mut u.logits, spec).unwrap();
    softmax_forward(&u.logits, 1.0, &mut u.p_rows).unwrap();
    transpose_last2(&u.logits, &mut u.logits_t).unwrap();
    softmax_forward(&u.logits_t, 1.0, &mut u.p_cols).unwrap();
    log_forward(&u.p_rows, &mut u.lp_rows).unwrap();
    log_forward(&u.p_cols, &mut u.lp_cols).unwrap();
    add(&u.lp_rows, &u.lp_cols, &mut u.lp_sum).unwrap();
    mul(&u.lp_sum, &u.eye, &mut u.diag).unwrap();
    matmul(&u.ones_b_row, &u.diag, &mut u.col_sums, MatmulSpec::default()).unwrap();
    let mean = MatmulSpec { alpha: -1.0 / (2 * B) as f32, ..MatmulSpec::default() };
    matmul(&u.col_sums, &u.ones_b, &mut u.loss, mean).unwrap();
}

criterion_group!(benches, bench);
criterion_main!(benches);
