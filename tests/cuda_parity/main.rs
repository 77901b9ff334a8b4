//! CUDA against the CPU reference: every kernel file's ops on fresh random data, through tensors carved from
//! a CUDA arena. One module per kernel file. Without a GPU the test prints SKIPPED and its reason.

mod attention;
#[path = "../common/mod.rs"]
mod common;
mod conv;
mod elementwise;
mod infonce;
mod linear;
mod norm;
mod loss;
mod optim;
mod shape;
mod lstm;
mod softmax;

use sgdm::runtime::kernels::KERNEL_FILES;

#[test]
fn every_kernel_file_matches_the_cpu_reference() {
    let Some(gpu) = common::gpu_or_skip("CUDA-vs-CPU parity") else { return };
    for file in KERNEL_FILES {
        match file.name {
            "conv.cu" => conv::check(&gpu),
            "elementwise.cu" => elementwise::check(&gpu),
            "linear.cu" => linear::check(&gpu),
            "attention.cu" => attention::check(&gpu),
            "norm.cu" => norm::check(&gpu),
            "shape.cu" => shape::check(&gpu),
            "softmax.cu" => softmax::check(&gpu),
            "loss.cu" => loss::check(&gpu),
            "optim.cu" => optim::check(&gpu),
            "lstm.cu" => lstm::check(&gpu),
            "infonce.cu" => infonce::check(&gpu),
            other => panic!("kernels/{other} has no CUDA-vs-CPU check: add a module to tests/cuda_parity/"),
        }
    }
    let loads = gpu.cuda().unwrap().kernel_loads();
    println!("kernel modules: {} compiled now, {} loaded from the cubin cache", loads.compiled, loads.cache_hits);
    assert_eq!(loads.compiled + loads.cache_hits, KERNEL_FILES.len(), "each kernel file is loaded once");
}
