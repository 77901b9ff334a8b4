//! Attention at SD 1.5's first-level shapes (64x64 latent = 4096 tokens, 8 heads of 40): self-attention and
//! cross-attention to 77 text tokens, batch 2, forward and backward. CUDA in bf16 when a GPU is present, the
//! CPU reference in f32 always, in one run so the groups compare directly.
//!
//! Throughput is in floating-point operations (criterion prints them as elements/s): 4*Lq*Lk*d*H*B for the
//! forward, 2.5x that for the backward (the usual count: five products, not counting the kernels'
//! recomputation of the scores).
//!
//! CPU self-attention uses 1024 query and key tokens instead of 4096 (16x less work): at 4096 one forward took
//! 1.4 s of CPU time and one backward 2.3 s (7 s and 10 s wall on the shared 2-core machine), and
//! `cargo test` runs every bench once. Cross-attention keeps the full 4096 x 77 shape on every device.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sgdm::ops::attention::{attention_backward, attention_forward, AttentionDims, AttentionSpec, Qkv, QkvGrads};
use sgdm::runtime::{select, Arena, MemoryPlan, Region};
use sgdm::{DType, Device, DeviceSpec, Tensor};

const BATCH: usize = 2;
const HEADS: usize = 8;
const HEAD_DIM: usize = 40;
const TOKENS: usize = 4096;
const CPU_TOKENS: usize = 1024;
const TEXT_TOKENS: usize = 77;

fn devices() -> Vec<(String, Device, DType)> {
    let mut out = vec![("cpu-f32".to_string(), Device::Cpu, DType::F32)];
    match select(DeviceSpec::Cuda(0)) {
        Ok(s) => out.push(("cuda-bf16".into(), s.device, DType::BF16)),
        Err(e) => eprintln!("SKIPPED: CUDA attention benches: {e:#}"),
    }
    out
}

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

fn buffers(device: &Device, dtype: DType, q_len: usize, kv_len: usize) -> (Arena, Buffers) {
    let (qs, ks, ss) = ([BATCH, q_len, HEADS * HEAD_DIM], [BATCH, kv_len, HEADS * HEAD_DIM], [BATCH, HEADS, q_len]);
    let layout = [
        (qs, dtype),
        (ks, dtype),
        (ks, dtype),
        (qs, dtype),
        (ss, DType::F32),
        (qs, dtype),
        (ss, DType::F32),
        (qs, dtype),
        (ks, dtype),
        (ks, dtype),
    ];
    let mut plan = MemoryPlan::new();
    for (shape, dtype) in layout {
        plan.reserve(Region::Activations, &shape, dtype);
    }
    let mut arena = Arena::new(device, &plan).unwrap();
    let mut t: Vec<Tensor> = layout
        .iter()
        .enumerate()
        .map(|(i, (shape, dtype))| {
            let mut t = arena.alloc(Region::Activations, shape, *dtype).unwrap();
            let n: usize = shape.iter().product();
            // Deterministic values in [-1, 1): realistic score spreads, no denormals.
            t.write_f32(&(0..n).map(|j| ((j * 7919 + i * 104_729) % 2000) as f32 / 1000.0 - 1.0).collect::<Vec<_>>())
                .unwrap();
            t
        })
        .collect();
    let mut next = || t.remove(0);
    let b = Buffers {
        q: next(),
        k: next(),
        v: next(),
        out: next(),
        lse: next(),
        dout: next(),
        delta: next(),
        dq: next(),
        dk: next(),
        dv: next(),
    };
    (arena, b)
}

fn bench(c: &mut Criterion) {
    let spec = AttentionSpec::new(HEADS);
    for (name, device, dtype) in devices() {
        let self_tokens = if device.is_cuda() { TOKENS } else { CPU_TOKENS };
        for (kind, q_len, kv_len) in [("self", self_tokens, self_tokens), ("cross", TOKENS, TEXT_TOKENS)] {
            let (_arena, mut b) = buffers(&device, dtype, q_len, kv_len);
            let qkv = Qkv { q: &b.q, k: &b.k, v: &b.v };
            let flops = AttentionDims::of("bench", spec, qkv).unwrap().forward_flops();
            let shape = format!("{kind} b{BATCH} {q_len}x{kv_len} h{HEADS} d{HEAD_DIM}");

            let mut g = c.benchmark_group(format!("attention_forward/{shape}"));
            g.sample_size(10);
            g.throughput(Throughput::Elements(flops));
            g.bench_function(&name, |bench| {
                bench.iter(|| {
                    attention_forward(spec, qkv, &mut b.out, &mut b.lse).unwrap();
                    device.synchronize().unwrap();
                })
            });
            g.finish();

            let mut g = c.benchmark_group(format!("attention_backward/{shape}"));
            g.sample_size(10);
            g.throughput(Throughput::Elements(flops * 5 / 2));
            g.bench_function(&name, |bench| {
                bench.iter(|| {
                    let grads = QkvGrads { dq: &mut b.dq, dk: &mut b.dk, dv: &mut b.dv };
                    attention_backward(spec, qkv, &b.out, &b.lse, &b.dout, &mut b.delta, grads).unwrap();
                    device.synchronize().unwrap();
                })
            });
            g.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
