//! The parameter arena: planning, alignment, capacity and reporting, on the CPU (the API is the same on
//! CUDA), and the gradients and optimizer state a training loop carves from it.

use sgdm::memory::arena::{aligned, human_bytes};
use sgdm::tensor::ALIGN;
use sgdm::{Arena, DType, Device, MemoryPlan, Region};

#[test]
fn plan_rounds_every_tensor_up_to_256_bytes() {
    assert_eq!(ALIGN, 256);
    assert_eq!(aligned(0), 0);
    assert_eq!(aligned(1), 256);
    assert_eq!(aligned(256), 256);
    assert_eq!(aligned(257), 512);
    let mut plan = MemoryPlan::new();
    plan.reserve(Region::Params, &[3], DType::F32) // 12 bytes -> 256
        .reserve(Region::Params, &[100], DType::BF16) // 200 bytes -> 256
        .reserve(Region::Optimizer, &[65], DType::F32); // 260 bytes -> 512
    assert_eq!(plan.bytes(Region::Params), 512);
    assert_eq!(plan.bytes(Region::Optimizer), 512);
    assert_eq!(plan.bytes(Region::Grads), 0);
    assert_eq!(plan.total_bytes(), 1024);
}

fn plan_for(shapes: &[(Region, &[usize], DType)]) -> MemoryPlan {
    let mut plan = MemoryPlan::new();
    for (r, s, d) in shapes {
        plan.reserve(*r, s, *d);
    }
    plan
}

#[test]
fn carved_tensors_are_aligned_disjoint_and_zeroed() {
    let shapes: &[(Region, &[usize], DType)] = &[
        (Region::Params, &[7, 3], DType::F32),
        (Region::Params, &[5], DType::BF16),
        (Region::Params, &[64, 4], DType::F32),
        (Region::Grads, &[1], DType::F16),
    ];
    let mut arena = Arena::new(&Device::Cpu, &plan_for(shapes)).unwrap();
    let mut tensors = Vec::new();
    for (r, s, d) in shapes {
        let t = arena.alloc(*r, s, *d).unwrap();
        assert_eq!(t.offset() % 256, 0, "offset {} of {:?}", t.offset(), s);
        assert_eq!(t.shape(), *s);
        assert!(t.host_bytes().unwrap().iter().all(|&b| b == 0));
        tensors.push(t);
    }
    // Writing one tensor leaves its neighbours untouched.
    tensors[0].write_f32(&[1.5; 21]).unwrap();
    tensors[2].write_f32(&[-2.0; 256]).unwrap();
    assert_eq!(tensors[0].to_f32_vec().unwrap(), vec![1.5; 21]);
    assert_eq!(tensors[1].to_f32_vec().unwrap(), vec![0.0; 5]);
    assert_eq!(tensors[2].to_f32_vec().unwrap(), vec![-2.0; 256]);
    assert_eq!((tensors[0].offset(), tensors[1].offset(), tensors[2].offset()), (0, 256, 512));
}

#[test]
fn carving_beyond_the_plan_is_an_error_not_a_reallocation() {
    let mut arena = Arena::new(&Device::Cpu, &plan_for(&[(Region::Grads, &[64], DType::F32)])).unwrap();
    let _a = arena.alloc(Region::Grads, &[64], DType::F32).unwrap();
    let err = arena.alloc(Region::Grads, &[1], DType::F32).unwrap_err().to_string();
    assert!(err.contains("'grads'") && err.contains("planned 256 bytes"), "{err}");
    let err = arena.alloc(Region::Optimizer, &[1], DType::F32).unwrap_err().to_string();
    assert!(err.contains("'optimizer'"), "{err}");
}

#[test]
fn a_training_loops_gradients_and_optimizer_state_fill_exactly_the_plan() {
    use sgdm::nn::{Grads, ParamStore, ParamTree};
    use sgdm::train::{Optimizer, OptimizerConfig};
    let mut tree = ParamTree::new();
    tree.add("a.weight".into(), &[7, 3]);
    tree.add("a.bias".into(), &[7]);
    tree.add("b.weight".into(), &[65, 2]);
    for dtype in [DType::F32, DType::BF16] {
        let params = ParamStore::random_owned(&tree, &Device::Cpu, dtype, 1).unwrap();
        let mut plan = MemoryPlan::new();
        Grads::plan(&tree, &mut plan, dtype);
        Optimizer::plan(&tree, dtype, &mut plan);
        let mut arena = Arena::new(&Device::Cpu, &plan).unwrap();
        let grads = Grads::zeros(&tree, &mut arena.region(Region::Grads), dtype).unwrap();
        let config = OptimizerConfig { adamw: Default::default(), max_grad_norm: None, micro_batches: 1 };
        let opt = Optimizer::new(&tree, &params, &mut arena.region(Region::Optimizer), config).unwrap();
        let report = arena.report();
        for r in &report.regions {
            assert_eq!(r.used, r.capacity, "{dtype}: region {} is not exactly what the loop carves", r.region.name());
        }
        // f32 moments (two per parameter) and, for bf16 parameters, f32 master weights; the norm and its partials.
        let copies = if dtype == DType::BF16 { 3 } else { 2 };
        assert_eq!(report.regions[2].tensors, copies * tree.len() + 2);
        assert_eq!(report.regions[1].tensors, tree.len());
        assert!(grads.get(tree.id("b.weight").unwrap()).to_f32_vec().unwrap().iter().all(|v| *v == 0.0));
        assert_eq!(opt.state().1.len(), tree.len());
        let text = report.to_string();
        for name in ["params", "grads", "optimizer", "total"] {
            assert!(text.contains(name), "report lacks {name}:\n{text}");
        }
    }
}

#[test]
fn human_bytes_uses_binary_units() {
    assert_eq!(human_bytes(0), "0 B");
    assert_eq!(human_bytes(1023), "1023 B");
    assert_eq!(human_bytes(1536), "1.5 KiB");
    assert_eq!(human_bytes(3 << 30), "3.0 GiB");
}
