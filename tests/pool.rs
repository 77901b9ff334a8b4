//! The inference memory pool: first-fit placement in address order, merged free ranges, leases given back
//! on drop and on discard, exhaustion named in the error, and the determinism that CUDA graph replay relies
//! on: the same sequence of allocations and frees lands on the same addresses. Then a model forward in a
//! pool whose memory was poisoned with NaN matches the ordinary inference forward bit for bit (no layer reads
//! memory it did not write), and a pipeline step reused across batches matches fresh ones.

mod common;

use sgdm::memory::pool::Pool;
use sgdm::models::unet::UNetConditioning;
use sgdm::nn::{Allocator, Inference, Pooled};
use sgdm::{DType, Device, Tensor};

#[test]
fn ranges_are_placed_first_fit_merged_on_release_and_exhaustion_is_named() {
    let pool = Pool::new(&Device::Cpu, 4096).unwrap();
    let a = pool.alloc(&[64], DType::F32).unwrap(); // 256 bytes
    let mut b = pool.alloc(&[65], DType::F32).unwrap(); // 260 -> 512 bytes
    let c = pool.alloc(&[10], DType::BF16).unwrap(); // 20 -> 256 bytes
    assert_eq!((a.offset(), b.offset(), c.offset()), (0, 256, 768));
    let u = pool.usage();
    assert_eq!((u.live, u.peak, u.top, u.handed), (1024, 1024, 1024, 3));
    // Discarding gives the range back at once; dropping `a` merges it with b's, so 768 bytes fit at 0.
    b.discard();
    drop(a);
    let d = pool.alloc(&[192], DType::F32).unwrap();
    assert_eq!(d.offset(), 0);
    assert_eq!(pool.usage().live, 768 + 256);
    // 768..1024 and 1024..4096 are taken by c and free: 3072 bytes (768 f32) fit, 769 f32 do not.
    let err = pool.alloc(&[769], DType::F32).unwrap_err();
    assert!(sgdm::memory::pool::is_exhausted(&err), "exhaustion is a typed error callers can fall back on");
    let err = err.to_string();
    assert!(err.contains("memory pool of 4096 bytes is exhausted") && err.contains("needs 3328 bytes"), "{err}");
    let e = pool.alloc(&[768], DType::F32).unwrap();
    assert_eq!(e.offset(), 1024);
    drop((c, d, e));
    assert_eq!(pool.usage().live, 0);
    assert_eq!(pool.alloc(&[1024], DType::F32).unwrap().offset(), 0, "everything merged back into one range");
}

/// Records the offset of every tensor a pool hands out.
struct Recording(Pooled, Vec<usize>);

impl Allocator for Recording {
    fn alloc(&mut self, shape: &[usize], dtype: DType) -> anyhow::Result<Tensor> {
        let t = self.0.alloc(shape, dtype)?;
        self.1.push(t.offset());
        Ok(t)
    }

    fn keeps_activations(&self) -> bool {
        false
    }
}

#[test]
fn a_unet_forward_in_a_poisoned_pool_matches_and_repeats_its_addresses() {
    let (unet, p, sample, context, timestep) = common::tiny_unet();
    let cond = UNetConditioning { timestep: &timestep, encoder_hidden_states: &context, residuals: None };
    let want = unet.forward(&p, &sample, &cond, &mut Inference(Device::Cpu)).unwrap().output.to_f32_vec().unwrap();

    // Size a pool with a planner, poison it, then run twice: same output, same address sequence.
    let planner = Pool::planner(&Device::Cpu);
    drop(unet.forward(&p, &sample, &cond, &mut Pooled::inference(planner.clone())).unwrap());
    let top = planner.usage().top;
    let pool = Pool::new(&Device::Cpu, top).unwrap();
    let mut poison = pool.alloc(&[top / 4], DType::F32).unwrap();
    poison.write_f32(&vec![f32::NAN; top / 4]).unwrap();
    drop(poison);
    let mut runs = Vec::new();
    for _ in 0..2 {
        let mut alloc = Recording(Pooled::inference(pool.clone()), Vec::new());
        let out = unet.forward(&p, &sample, &cond, &mut alloc).unwrap().output.to_f32_vec().unwrap();
        assert_eq!(out, want, "pooled forward differs from the inference forward");
        runs.push(alloc.1);
        assert_eq!(pool.usage().live, 0, "every range came back");
    }
    assert_eq!(runs[0], runs[1], "the second forward placed its tensors elsewhere");
    assert!(runs[0].len() > 50 && pool.usage().peak <= top);
    println!("UNet tiny forward: {} tensors in a {top}-byte pool", runs[0].len());
}

#[test]
fn a_reused_denoising_step_matches_fresh_ones() {
    let (_, weights) = common::tiny_model();
    let pipeline = sgdm::pipeline::Pipeline::open(weights, &Device::Cpu, DType::F32).unwrap();
    let opts = sgdm::pipeline::SamplingOptions { steps: 3, ..Default::default() };
    let eeg = |seed| common::random(2 * 17 * 100, -5.0, 5.0, seed);
    let mut steps = sgdm::pipeline::Steps::default();
    for seed in [1, 2] {
        let reused = pipeline.reconstruct_with(&mut steps, &eeg(seed), &[0, 1], &opts).unwrap();
        let fresh = pipeline.reconstruct(&eeg(seed), &[0, 1], &opts).unwrap();
        assert_eq!(reused.images, fresh.images, "batch {seed}: a reused step differs from a fresh one");
    }
}

/// On CUDA: the captured graph's replays equal eager runs of the same step.
#[test]
fn a_captured_step_replays_what_the_eager_step_computes() {
    let Some(gpu) = common::gpu_or_skip("CUDA graph replay of the denoising step") else { return };
    let (_, weights) = common::tiny_model();
    let pipeline = sgdm::pipeline::Pipeline::open(weights, &gpu, DType::BF16).unwrap();
    let model = pipeline.denoiser();
    let [x, t, context, cond] = pipeline.step_inputs(4, 7).unwrap();
    let mut results = Vec::new();
    for graph in [false, true] {
        let mut step = sgdm::pipeline::Step::new(&pipeline, 4, 2, 1.0, graph).unwrap();
        assert_eq!(step.captured(), graph);
        for (src, dst) in [(&x, &mut step.x), (&context, &mut step.context), (&cond, &mut step.cond)] {
            sgdm::ops::elementwise::scale(src, 1.0, dst).unwrap();
        }
        sgdm::ops::elementwise::scale(&t, 1.0, &mut step.t).unwrap();
        let mut outs = Vec::new();
        for _ in 0..2 {
            step.run(&model).unwrap();
            outs.push(step.eps.as_ref().unwrap().to_f32_vec().unwrap());
        }
        assert_eq!(outs[0], outs[1], "graph {graph}: two runs of the same inputs differ");
        results.push(outs.remove(0));
    }
    assert_eq!(results[0], results[1], "the graph replay differs from the eager step");
}

/// A training loop's step pool: the first step runs on a planner, the second gets a pool of exactly the
/// capacity the first needed and places every tensor where the second step before it did, each later step
/// repeats those addresses; a larger step overflows into standalone tensors, counted, instead of failing.
#[test]
fn a_step_pool_is_sized_by_the_first_step_and_repeats_its_addresses() {
    use sgdm::memory::pool::StepPool;
    let mut steps = StepPool::new(&Device::Cpu);
    let step = |steps: &StepPool, extra: bool| -> Vec<usize> {
        let mut alloc = steps.training();
        assert!(alloc.keeps_activations(), "training keeps activations for the backward");
        let a = alloc.alloc(&[100], DType::F32).unwrap();
        let b = alloc.alloc(&[1000], DType::F32).unwrap();
        drop(a);
        let c = alloc.alloc(&[50], DType::F32).unwrap();
        let d = if extra { Some(alloc.alloc(&[5000], DType::F32).unwrap()) } else { None };
        vec![b.offset(), c.offset(), d.map_or(0, |d| d.size_bytes())]
    };
    step(&steps, false);
    steps.end_step().unwrap();
    let sized = steps.usage();
    assert_eq!(sized.capacity, 512 + 4096, "the pool holds the first step's highest range end");
    let second = step(&steps, false);
    steps.end_step().unwrap();
    assert_eq!(second, step(&steps, false), "a repeated step moved its tensors");
    steps.end_step().unwrap();
    assert_eq!(steps.overflowed(), 0);
    assert_eq!(step(&steps, true)[2], 20_000, "the larger step got its tensor");
    assert_eq!(steps.overflowed(), 1, "the tensor the pool could not place is counted");
    steps.end_step().unwrap();
    assert_eq!(steps.usage().capacity, sized.capacity, "the pool is sized once");
    // A step that ends with a tensor still leased is refused.
    let alloc = &mut steps.training();
    let _kept = alloc.alloc(&[10], DType::F32).unwrap();
    assert!(steps.end_step().unwrap_err().to_string().contains("still in use"));
}
