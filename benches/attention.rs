//! Attention at SD 1.5's first-level shapes (64x64 latent = 4096 tokens, 8 heads of 40): self-attention and
//! cross-attention to 77 text tokens, batch 2, forward and backward. CUDA in bf16 when a GPU is present, the
//! CPU reference in f32 always, in one run so the groups compare directly.
//!
//! Throughput is in floating-point operations (criterion prints them as elements/s): 4*Lq*Lk*d*H*B for the
//! forward, 2.5x that for the backward (the usual count: five products, not counting the kernels'
//! recomputation of the scores).
//!
//! Each group compares the fused kernel (`<device>/fused`) with the composition it replaces, measured in the
//! same run (`<device>/matmul+softmax+matmul`): scores = scale·Q·Kᵀ (cuBLASLt on CUDA, sgemm on the CPU),
//! softmax over the keys, P·V; the backward is dP = dO·Vᵀ, dV = Pᵀ·dO, dS = softmax_backward, dQ = dS·K,
//! dK = dSᵀ·Q. The composition gets Q, K, V already split into heads ([B*H, L, d]) and materialises the
//! [B*H, Lq, Lk] scores (1 GiB in bf16 for self-attention at 4096 tokens); the head split and merge copies it
//! would also need are not counted, so the comparison favours it.
//!
//! CPU self-attention uses 1024 query and key tokens instead of 4096 (16x less work): at 4096 one forward took
//! 1.4 s of CPU time and one backward 2.3 s (7 s and 10 s wall on the shared 2-core machine), and
//! `cargo test` runs every bench once. Cross-attention keeps the full 4096 x 77 shape on every device.

#[path = "common/mod.rs"]
mod common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sgdm::memory::arena::aligned;
use sgdm::memory::pool::Pool;
use sgdm::ops::attention::{attention_backward, attention_forward, AttentionDims, AttentionSpec, Qkv, QkvGrads};
use sgdm::ops::linear::{matmul, MatmulSpec};
use sgdm::ops::softmax::{softmax_backward, softmax_forward};
use sgdm::{DType, Device, Tensor};

const BATCH: usize = 2;
const HEADS: usize = 8;
const HEAD_DIM: usize = 40;
const TOKENS: usize = 4096;
const CPU_TOKENS: usize = 1024;
const TEXT_TOKENS: usize = 77;

struct Buffers {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dout: Tensor,
    delta: Tensor,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
}

fn buffers(device: &Device, dtype: DType, q_len: usize, kv_len: usize) -> (Pool, Buffers) {
    let (qs, ks, ss) = ([BATCH, q_len, HEADS * HEAD_DIM], [BATCH, kv_len, HEADS * HEAD_DIM], [BATCH, HEADS, q_len]);
    let layout =
        [(qs, dtype), (ks, dtype), (ks, dtype), (qs, dtype), (ss, DType::F32), (qs, dtype), (ss, DType::F32), (qs, dtype), (ks, dtype), (ks, dtype)];
    let pool = Pool::new(device, layout.iter().map(|(shape, dtype)| aligned(shape.iter().product::<usize>() * dtype.size())).sum()).unwrap();
    let mut t: Vec<Tensor> = layout
        .iter()
        .enumerate()
        .map(|(i, (shape, dtype))| {
            let mut t = pool.alloc(shape, *dtype).unwrap();
            let n: usize = shape.iter().product();
            // Deterministic values in [-1, 1): realistic score spreads, no denormals.
            t.write_f32(&(0..n).map(|j| ((j * 7919 + i * 104_729) % 2000) as f32 / 1000.0 - 1.0).collect::<Vec<_>>()).unwrap();
            t
        })
        .collect();
    let mut next = || t.remove(0);
    let b = Buffers { q: next(), k: next(), v: next(), out: next(), lse: next(), dout: next(), delta: next(), dq: next(), dk: next(), dv: next() };
    (pool, b)
}

/// The unfused composition's tensors, heads split out: q, o, do, dq [B*H, Lq, d]; k, v, dk, dv [B*H, Lk, d];
/// scores, probabilities and their gradient [B*H, Lq, Lk].
struct Unfused {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    dout: Tensor,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
    s: Tensor,
    p: Tensor,
    ds: Tensor,
}

fn unfused(device: &Device, dtype: DType, q_len: usize, kv_len: usize) -> Unfused {
    let (bh, d) = (BATCH * HEADS, HEAD_DIM);
    let t = |shape: &[usize], seed: usize| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|j| ((j * 7919 + seed * 104_729) % 2000) as f32 / 1000.0 - 1.0).collect();
        Tensor::from_f32(device, shape, dtype, &v).unwrap()
    };
    let (qs, ks, ss) = ([bh, q_len, d], [bh, kv_len, d], [bh, q_len, kv_len]);
    Unfused {
        q: t(&qs, 0),
        k: t(&ks, 1),
        v: t(&ks, 2),
        o: t(&qs, 3),
        dout: t(&qs, 5),
        dq: t(&qs, 7),
        dk: t(&ks, 8),
        dv: t(&ks, 9),
        s: t(&ss, 10),
        p: t(&ss, 11),
        ds: t(&ss, 12),
    }
}

/// scores = scale·Q·Kᵀ, P = softmax(scores), O = P·V.
fn unfused_forward(u: &mut Unfused, scale: f32) {
    matmul(&u.q, &u.k, &mut u.s, MatmulSpec { trans_b: true, alpha: scale, ..MatmulSpec::default() }).unwrap();
    softmax_forward(&u.s, 1.0, &mut u.p).unwrap();
    matmul(&u.p, &u.v, &mut u.o, MatmulSpec::default()).unwrap();
}

/// dP = dO·Vᵀ (into the scores buffer), dV = Pᵀ·dO, dS = P ⊙ (dP − rowsum(dP ⊙ P)) · scale, dQ = dS·K,
/// dK = dSᵀ·Q.
fn unfused_backward(u: &mut Unfused, scale: f32) {
    matmul(&u.dout, &u.v, &mut u.s, MatmulSpec { trans_b: true, ..MatmulSpec::default() }).unwrap();
    matmul(&u.p, &u.dout, &mut u.dv, MatmulSpec { trans_a: true, ..MatmulSpec::default() }).unwrap();
    softmax_backward(&u.p, &u.s, scale, &mut u.ds).unwrap();
    matmul(&u.ds, &u.k, &mut u.dq, MatmulSpec::default()).unwrap();
    matmul(&u.ds, &u.q, &mut u.dk, MatmulSpec { trans_a: true, ..MatmulSpec::default() }).unwrap();
}

fn bench(c: &mut Criterion) {
    let spec = AttentionSpec::new(HEADS);
    for (name, device, dtype) in common::devices("attention", &[DType::BF16]) {
        let self_tokens = if device.is_cuda() { TOKENS } else { CPU_TOKENS };
        for (kind, q_len, kv_len) in [("self", self_tokens, self_tokens), ("cross", TOKENS, TEXT_TOKENS)] {
            let (_pool, mut b) = buffers(&device, dtype, q_len, kv_len);
            let qkv = Qkv { q: &b.q, k: &b.k, v: &b.v };
            let flops = AttentionDims::of("bench", spec, qkv).unwrap().forward_flops();
            let shape = format!("{kind} b{BATCH} {q_len}x{kv_len} h{HEADS} d{HEAD_DIM}");

            let mut u = unfused(&device, dtype, q_len, kv_len);
            let scale = (HEAD_DIM as f32).powf(-0.5);

            let mut g = c.benchmark_group(format!("attention_forward/{shape}: fused vs matmul+softmax+matmul"));
            g.sample_size(10);
            g.throughput(Throughput::Elements(flops));
            g.bench_function(format!("{name}/fused"), |bench| {
                bench.iter(|| {
                    attention_forward(spec, qkv, &mut b.out, &mut b.lse).unwrap();
                    device.synchronize().unwrap();
                })
            });
            g.bench_function(format!("{name}/matmul+softmax+matmul"), |bench| {
                bench.iter(|| {
                    unfused_forward(&mut u, scale);
                    device.synchronize().unwrap();
                })
            });
            g.finish();

            let mut g = c.benchmark_group(format!("attention_backward/{shape}: fused vs matmul+softmax+matmul"));
            g.sample_size(10);
            g.throughput(Throughput::Elements(flops * 5 / 2));
            g.bench_function(format!("{name}/fused"), |bench| {
                bench.iter(|| {
                    let grads = QkvGrads { dq: &mut b.dq, dk: &mut b.dk, dv: &mut b.dv };
                    attention_backward(spec, qkv, &b.out, &b.lse, &b.dout, &mut b.delta, grads).unwrap();
                    device.synchronize().unwrap();
                })
            });
            g.bench_function(format!("{name}/matmul+softmax+matmul"), |bench| {
                bench.iter(|| {
                    unfused_backward(&mut u, scale);
                    device.synchronize().unwrap();
                })
            });
            g.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
