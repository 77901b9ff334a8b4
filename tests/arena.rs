//! Arena planning, alignment, capacity, reset and peak reporting, on the CPU (the API is the same on CUDA;
//! tests/cuda_parity.rs carves CUDA tensors from an arena when a GPU is present).

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
        .reserve(Region::Activations, &[65], DType::F32); // 260 bytes -> 512
    assert_eq!(plan.bytes(Region::Params), 512);
    assert_eq!(plan.bytes(Region::Activations), 512);
    assert_eq!(plan.bytes(Region::Grads), 0);
    assert_eq!(plan.total_bytes(), 1024);
}

#[test]
fn plan_max_sizes_regions_for_the_larger_alternative() {
    let mut a = MemoryPlan::new();
    a.reserve_bytes(Region::Scratch, 1000).reserve_bytes(Region::Params, 10);
    let mut b = MemoryPlan::new();
    b.reserve_bytes(Region::Scratch, 300).reserve_bytes(Region::Params, 600);
    let m = a.max(&b);
    assert_eq!(m.bytes(Region::Scratch), 1024);
    assert_eq!(m.bytes(Region::Params), 768);
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
    let mut arena = Arena::new(&Device::Cpu, &plan_for(&[(Region::Scratch, &[64], DType::F32)])).unwrap();
    let _a = arena.alloc(Region::Scratch, &[64], DType::F32).unwrap();
    let err = arena.alloc(Region::Scratch, &[1], DType::F32).unwrap_err().to_string();
    assert!(err.contains("'scratch'") && err.contains("planned 256 bytes"), "{err}");
    let err = arena.alloc(Region::Optimizer, &[1], DType::F32).unwrap_err().to_string();
    assert!(err.contains("'optimizer'"), "{err}");
}

#[test]
fn reset_reuses_memory_and_invalidates_old_tensors() {
    let mut arena = Arena::new(&Device::Cpu, &plan_for(&[(Region::Activations, &[10], DType::F32)])).unwrap();
    let mut first = arena.alloc(Region::Activations, &[10], DType::F32).unwrap();
    first.write_f32(&[3.0; 10]).unwrap();
    arena.reset_step();
    let second = arena.alloc(Region::Activations, &[10], DType::F32).unwrap();
    assert_eq!(second.offset(), first.offset(), "reset hands the same bytes out again");
    assert_eq!(second.to_f32_vec().unwrap(), vec![3.0; 10], "memory is not cleared on reset");
    let mut second = second;
    second.fill_zero().unwrap();
    assert_eq!(second.to_f32_vec().unwrap(), vec![0.0; 10], "fill_zero clears exactly the tensor");
    let err = first.to_f32_vec().unwrap_err().to_string();
    assert!(err.contains("has been reset"), "{err}");
    assert!(first.write_f32(&[0.0; 10]).is_err());
}

#[test]
fn peak_is_reported_per_region_across_resets() {
    let plan =
        plan_for(&[(Region::Params, &[100], DType::F32), (Region::Activations, &[100], DType::F32), (Region::Activations, &[100], DType::F32)]);
    let mut arena = Arena::new(&Device::Cpu, &plan).unwrap();
    let _p = arena.alloc(Region::Params, &[100], DType::F32).unwrap();
    for step in 0..3 {
        let _a = arena.alloc(Region::Activations, &[100], DType::F32).unwrap();
        if step == 1 {
            let _b = arena.alloc(Region::Activations, &[100], DType::F32).unwrap();
        }
        arena.reset_step();
    }
    let act = arena.usage(Region::Activations);
    assert_eq!((act.capacity, act.used, act.peak), (1024, 0, 1024));
    let params = arena.usage(Region::Params);
    assert_eq!((params.capacity, params.used, params.peak), (512, 512, 512));
    let report = arena.report();
    assert_eq!(report.total_capacity(), 1536);
    assert_eq!(report.total_peak(), 1536);
    let text = report.to_string();
    for name in ["params", "grads", "optimizer", "activations", "scratch", "total", "1.0 KiB"] {
        assert!(text.contains(name), "report lacks {name}:\n{text}");
    }
}

#[test]
fn human_bytes_uses_binary_units() {
    assert_eq!(human_bytes(0), "0 B");
    assert_eq!(human_bytes(1023), "1023 B");
    assert_eq!(human_bytes(1536), "1.5 KiB");
    assert_eq!(human_bytes(3 << 30), "3.0 GiB");
}
