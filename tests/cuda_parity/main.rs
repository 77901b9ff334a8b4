//! CUDA against the CPU reference: every kernel file's ops on fresh random data, through tensors leased from
//! a CUDA memory pool (ranges inside one allocation). One module per kernel file. Without a GPU the test prints SKIPPED and its reason.

mod attention;
#[path = "../common/mod.rs"]
mod common;
mod conv;
mod elementwise;
mod infonce;
mod linear;
mod loss;
mod lstm;
mod norm;
mod optim;
mod sampling;
mod shape;
mod softmax;

use sgdm::runtime::kernel_table::KERNELS;
use sgdm::runtime::kernels::KERNEL_FILES;

/// Runs every kernel file's checks, each to its end, even after failures: a tolerance failure prints its
/// FAIL row and is recorded (common::defer_failures), a panic (an exact-equality check, a launch error) ends
/// only that file's checks. The test fails at the end with the list, so one GPU run reports every row.
#[test]
fn every_kernel_file_matches_the_cpu_reference() {
    let Some(gpu) = common::gpu_or_skip("CUDA-vs-CPU parity") else { return };
    common::defer_failures();
    let mut failures = Vec::new();
    for file in KERNEL_FILES {
        let check: fn(&sgdm::Device) = match file.name {
            "conv.cu" => conv::check,
            "elementwise.cu" => elementwise::check,
            "linear.cu" => linear::check,
            "attention.cu" => attention::check,
            "attention_mma.cu" => attention::check_tensor_cores,
            "norm.cu" => norm::check,
            "shape.cu" => shape::check,
            "softmax.cu" => softmax::check,
            "loss.cu" => loss::check,
            "optim.cu" => optim::check,
            "lstm.cu" => lstm::check,
            "infonce.cu" => infonce::check,
            "sampling.cu" => sampling::check,
            other => panic!("kernels/{other} has no CUDA-vs-CPU check: add a module to tests/cuda_parity/"),
        };
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&gpu)));
        failures.extend(common::take_failures().into_iter().map(|f| format!("{}: {f}", file.name)));
        if let Err(panic) = outcome {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic without a message".into());
            println!("PARITY {:<36} stopped: {message}", file.name);
            failures.push(format!("{}: stopped: {message}", file.name));
        }
    }
    let loads = gpu.cuda().unwrap().kernel_loads();
    println!("kernel modules: {} compiled now, {} loaded from the cubin cache", loads.compiled, loads.cache_hits);
    assert!(failures.is_empty(), "{} parity failure(s):\n{}", failures.len(), failures.join("\n"));
    assert_eq!(loads.compiled + loads.cache_hits, KERNEL_FILES.len(), "each kernel file is loaded once");
    // Every launch is checked against the kernel table; launching every kernel here checks every launcher's
    // argument list.
    let never: Vec<&str> = KERNELS.iter().filter(|k| k.launches() == 0).map(|k| k.name).collect();
    assert!(never.is_empty(), "the parity checks never launched {} kernel(s): {}", never.len(), never.join(", "));
    println!("all {} kernels launched, each argument list checked against its signature", KERNELS.len());
}

/// The parity checks again on the simulator's checked builds, each in a child process (the build is chosen
/// when the simulator starts): `memory` instruments every access (shared-memory races, out-of-bounds and
/// misaligned accesses are errors), which finds the missing barriers the plain build can miss (tests/cudasim.rs);
/// `asan` adds AddressSanitizer and UBSan (local arrays, undefined behaviour) when SGDM_SIM_ASAN=1, as it needs
/// libasan preloaded and takes longer. On a real GPU these run on the simulator too.
#[test]
fn every_kernel_file_passes_the_simulators_memory_checks() {
    if !common::simulator_or_skip("parity under the simulator's memory checks") {
        return;
    }
    let mut checks = vec![("memory", None)];
    if std::env::var("SGDM_SIM_ASAN").is_ok_and(|v| v == "1") {
        let libasan = std::process::Command::new(std::env::var("CXX").unwrap_or_else(|_| "c++".into()))
            .arg("-print-file-name=libasan.so")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap();
        checks.push(("asan", Some(libasan)));
    } else {
        common::skipped("parity under AddressSanitizer", "set SGDM_SIM_ASAN=1 to run it (benches/gpu/ and cudasim/README.md)");
    }
    for (check, preload) in checks {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap());
        child
            .args(["every_kernel_file_matches_the_cpu_reference", "--exact", "--nocapture", "--test-threads=1"])
            .env("SGDM_DEVICE", "cuda-sim")
            .env("SGDM_SIM_CHECK", check);
        if let Some(lib) = &preload {
            child.env("LD_PRELOAD", lib).env("ASAN_OPTIONS", "detect_leaks=0:abort_on_error=1");
        }
        let started = std::time::Instant::now();
        let out = child.output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let rows = text.lines().filter(|l| l.starts_with("PARITY ")).count();
        println!("parity with SGDM_SIM_CHECK={check}: {rows} rows in {:.0} s", started.elapsed().as_secs_f64());
        assert!(out.status.success() && rows > 700, "parity under SGDM_SIM_CHECK={check} failed:\n{text}");
        for marker in ["hazard on __shared__", "outside every __shared__ array", "misaligned", "ERROR: AddressSanitizer", "runtime error:"] {
            assert!(!text.contains(marker), "parity under SGDM_SIM_CHECK={check} reported '{marker}':\n{text}");
        }
    }
}

/// The deferred mode above must not turn failures into passes: out-of-bound values and NaNs are recorded
/// (with the worst element), in-bound ones are not, and without deferral a failure still panics.
#[test]
fn deferred_comparisons_record_every_failure() {
    common::defer_failures();
    common::compare("within bounds", &[1.0, 2.0], &[1.0, 2.001], 1e-2, 0.0);
    common::compare("one out of bounds", &[1.0, 3.0, 2.5], &[1.0, 2.0, 2.0], 1e-2, 0.0);
    common::compare("nan", &[f32::NAN], &[1.0], 1e-2, 0.0);
    let failures = common::take_failures();
    assert_eq!(failures.len(), 2, "{failures:?}");
    assert!(failures[0].starts_with("one out of bounds: 2 of 3 elements out of bounds; worst element 1"), "{failures:?}");
    assert!(failures[1].starts_with("nan: 1 of 1 elements"), "{failures:?}");
    let strict = std::thread::spawn(|| common::compare("strict", &[2.0], &[1.0], 1e-2, 0.0)).join();
    assert!(strict.is_err(), "without defer_failures a failed comparison panics");
}
