//! The simulated CUDA device itself (cudasim/): what it checks on every launch, its asynchrony, its graph
//! capture rules, and that it catches bugs planted in copies of our real kernels (a removed barrier, swapped
//! mma fragment registers, an off-by-one gather, a wrong launch argument list), each by the check meant for it.
//!
//! A planted bug runs in a child process of this test binary: the kernel sources come from a folder holding
//! the mutated copy (SGDM_KERNELS_DIR), the child runs one of the "victim" tests below, which hold the mutated
//! kernel to the CPU reference and pass on the real kernels, and the parent reads how the child failed.

mod common;

use std::path::Path;
use std::process::Command;

use cudarc::driver::LaunchConfig;
use sgdm::ops::attention::{attention_forward_using, AttentionKernel, AttentionSpec, Qkv};
use sgdm::ops::conv::{conv2d_forward_using, Conv2dSpec, ConvKernel};
use sgdm::ops::norm::{group_norm_backward, group_norm_forward, group_norm_scratch_shape, Affine, GroupNorm, NormGrads, Stats, StatsMut};
use sgdm::runtime::cuda::KernelArg::{self, Ptr, F32, I32, I64};
use sgdm::runtime::kernels::{KERNEL_FILES, KERNEL_HEADERS};
use sgdm::runtime::{cudasim, select};
use sgdm::{DType, Device, DeviceSpec, Tensor};

use common::{compare, random, rounded};

/// The simulated device, or None after SKIPPED when this binary has no simulator or a real driver is in use.
fn sim(what: &str) -> Option<Device> {
    if !common::simulator_or_skip(what) {
        return None;
    }
    match select(DeviceSpec::CudaSim) {
        Ok(s) => Some(s.device),
        Err(e) => panic!("{what}: the simulator is built in but does not start: {e:#}"),
    }
}

fn tensor(device: &Device, shape: &[usize], dtype: DType, values: &[f32]) -> Tensor {
    Tensor::from_f32(device, shape, dtype, values).unwrap()
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

// ---- victims: small parity checks of the kernels the planted bugs go into ---------------------------------------

/// conv2d_forward_mma_bf16 on an odd 9x9 image, 3x3 taps, padding 1 (every edge of the gather) against the CPU.
/// Both read the same bf16 inputs; bound: one bf16 rounding of the output (2^-8 relative) plus f32 order.
#[test]
fn victim_conv_forward_on_tensor_cores() {
    let Some(gpu) = sim("conv2d forward on tensor cores, simulated") else { return };
    let (n, c, h, w, k) = (2, 8, 9, 9, 16);
    let x = rounded(DType::BF16, &random(n * c * h * w, -1.0, 1.0, 1));
    let wt = rounded(DType::BF16, &random(k * c * 9, -1.0, 1.0, 2));
    let spec = Conv2dSpec::new(1, 1);
    let run = |device: &Device, dtype: DType| {
        let mut y = Tensor::zeros(device, &[n, k, h, w], dtype).unwrap();
        conv2d_forward_using(
            ConvKernel::TensorCore,
            &tensor(device, &[n, c, h, w], dtype, &x),
            &tensor(device, &[k, c, 3, 3], dtype, &wt),
            None,
            spec,
            &mut y,
        )
        .unwrap();
        y.to_f32_vec().unwrap()
    };
    let want = run(&Device::Cpu, DType::F32);
    compare("victim conv2d_forward_mma_bf16", &run(&gpu, DType::BF16), &want, 3.9e-3, 1e-5 * (c * 9) as f32);
}

/// attention_forward_mma_bf16_d16 over 70 keys (two key tiles of 64, the second partial) against the CPU.
/// Bound as in tests/cuda_parity/attention.rs: bf16 rounding of P and of the output.
#[test]
fn victim_attention_forward_on_tensor_cores() {
    let Some(gpu) = sim("attention forward on tensor cores, simulated") else { return };
    let (b, l, heads, d) = (1, 70, 2, 16);
    let q = rounded(DType::BF16, &random(b * l * heads * d, -1.0, 1.0, 3));
    let k = rounded(DType::BF16, &random(b * l * heads * d, -1.0, 1.0, 4));
    let v = rounded(DType::BF16, &random(b * l * heads * d, -1.0, 1.0, 5));
    let run = |device: &Device, dtype: DType| {
        let shape = [b, l, heads * d];
        let (q, k, v) = (tensor(device, &shape, dtype, &q), tensor(device, &shape, dtype, &k), tensor(device, &shape, dtype, &v));
        let mut out = Tensor::zeros(device, &shape, dtype).unwrap();
        let mut lse = Tensor::zeros(device, &[b, heads, l], DType::F32).unwrap();
        attention_forward_using(AttentionKernel::TensorCore, AttentionSpec::new(heads), Qkv { q: &q, k: &k, v: &v }, &mut out, &mut lse).unwrap();
        out.to_f32_vec().unwrap()
    };
    let want = run(&Device::Cpu, DType::F32);
    compare("victim attention_forward_mma_bf16", &run(&gpu, DType::BF16), &want, 1e-2, 1e-2 * max_abs(&want));
}

/// GroupNorm's weight and bias gradients (norm_param_grad_reduce adds the per-block partial sums; 40 channels
/// span two blocks of 32) in f32 against the CPU: only the summation order differs (1e-5 relative).
#[test]
fn victim_group_norm_parameter_gradients() {
    let Some(gpu) = sim("GroupNorm parameter gradients, simulated") else { return };
    let (n, c, hw, groups) = (2, 40, 9, 8);
    let gn = GroupNorm { groups, eps: 1e-5, silu: false };
    let x = random(n * c * hw, -1.0, 1.0, 6);
    let dy = random(n * c * hw, -1.0, 1.0, 7);
    let weight = random(c, 0.5, 1.5, 8);
    let bias = random(c, -0.5, 0.5, 9);
    let run = |device: &Device| {
        let shape = [n, c, hw];
        let (x, dy) = (tensor(device, &shape, DType::F32, &x), tensor(device, &shape, DType::F32, &dy));
        let (w, b) = (tensor(device, &[c], DType::F32, &weight), tensor(device, &[c], DType::F32, &bias));
        let mut y = Tensor::zeros(device, &shape, DType::F32).unwrap();
        let (mut mean, mut rstd) =
            (Tensor::zeros(device, &[n, groups], DType::F32).unwrap(), Tensor::zeros(device, &[n, groups], DType::F32).unwrap());
        group_norm_forward(gn, &x, Affine { weight: &w, bias: &b }, &mut y, StatsMut { mean: &mut mean, rstd: &mut rstd }).unwrap();
        let mut dx = Tensor::zeros(device, &shape, DType::F32).unwrap();
        let (mut dw, mut db) = (Tensor::zeros(device, &[c], DType::F32).unwrap(), Tensor::zeros(device, &[c], DType::F32).unwrap());
        let mut scratch = Tensor::zeros(device, &group_norm_scratch_shape(&shape), DType::F32).unwrap();
        let grads = NormGrads { dx: &mut dx, dweight: &mut dw, dbias: &mut db, scratch: &mut scratch };
        group_norm_backward(gn, &x, Affine { weight: &w, bias: &b }, Stats { mean: &mean, rstd: &rstd }, &dy, grads).unwrap();
        [dw.to_f32_vec().unwrap(), db.to_f32_vec().unwrap()].concat()
    };
    let want = run(&Device::Cpu);
    compare("victim norm_param_grad_reduce_f32", &run(&gpu), &want, 1e-5, 1e-6 * max_abs(&want));
}

// ---- planted bugs -------------------------------------------------------------------------------------------

/// How a child run failed.
#[derive(Debug, Default)]
struct Caught {
    numeric: bool,
    race: bool,
    bounds: bool,
    passed: bool,
}

impl std::fmt::Display for Caught {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut kinds = Vec::new();
        if self.numeric {
            kinds.push("numeric failure");
        }
        if self.race {
            kinds.push("race report");
        }
        if self.bounds {
            kinds.push("bounds report");
        }
        if kinds.is_empty() {
            kinds.push(if self.passed { "MISSED (the victim passed)" } else { "other failure" });
        }
        write!(f, "{}", kinds.join(" + "))
    }
}

struct Mutant {
    name: &'static str,
    file: &'static str,
    /// The mutation applies to the first `find` after `scope`.
    scope: &'static str,
    find: &'static str,
    replace: &'static str,
    victim: &'static str,
}

const MUTANTS: &[Mutant] = &[
    Mutant {
        name: "conv mma forward without the barrier after the tile stores",
        file: "conv.cu",
        scope: "__device__ void conv2d_forward_mma(",
        find: "        __syncthreads();\n        mma_block_step(",
        replace: "        mma_block_step(",
        victim: "victim_conv_forward_on_tensor_cores",
    },
    Mutant {
        name: "conv mma fragment registers a1 and a2 swapped",
        file: "conv.cu",
        scope: "__device__ __forceinline__ void mma_block_step(",
        find: "            a[mi][1] = bf16_pair(&As[r + 8][k]);\n            a[mi][2] = bf16_pair(&As[r][k + 8]);",
        replace: "            a[mi][2] = bf16_pair(&As[r + 8][k]);\n            a[mi][1] = bf16_pair(&As[r][k + 8]);",
        victim: "victim_conv_forward_on_tensor_cores",
    },
    Mutant {
        name: "conv mma gather bound off by one (iw <= W)",
        file: "conv.cu",
        scope: "__device__ void conv2d_forward_mma(",
        find: "iw < s.W) v = xn[",
        replace: "iw <= s.W) v = xn[",
        victim: "victim_conv_forward_on_tensor_cores",
    },
    Mutant {
        name: "attention mma forward without the barrier after the K/V tile",
        file: "attention_mma.cu",
        scope: "            Vt[dim * VLD + key] = vv;",
        find: "        __syncthreads();\n",
        replace: "",
        victim: "victim_attention_forward_on_tensor_cores",
    },
    Mutant {
        name: "norm_param_grad_reduce without its barrier",
        file: "norm.cu",
        scope: "    sw[ty][tx] = a, sb[ty][tx] = b;",
        find: "    __syncthreads();\n",
        replace: "",
        victim: "victim_group_norm_parameter_gradients",
    },
];

fn mutated(m: &Mutant) -> String {
    let source = KERNEL_FILES.iter().find(|f| f.name == m.file).unwrap().source;
    let scope = source.find(m.scope).unwrap_or_else(|| panic!("{}: kernels/{} no longer has `{}`", m.name, m.file, m.scope));
    let at = scope
        + source[scope..].find(m.find).unwrap_or_else(|| panic!("{}: kernels/{} no longer has `{}` after `{}`", m.name, m.file, m.find, m.scope));
    format!("{}{}{}", &source[..at], m.replace, &source[at + m.find.len()..])
}

/// Runs `victim` in a child process on the simulator with kernel sources from `kernels` and `check`.
fn run_child(victim: &str, kernels: &Path, check: &str, order: &str) -> (Caught, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([victim, "--exact", "--nocapture", "--test-threads=1"])
        .env("SGDM_DEVICE", "cuda-sim")
        .env("SGDM_KERNELS_DIR", kernels)
        .env("SGDM_SIM_CHECK", check)
        .env("SGDM_SIM_ORDER", order)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let caught = Caught {
        numeric: text.contains(" FAIL\n") || text.contains("elements out of bounds"),
        race: text.contains("hazard on __shared__"),
        bounds: text.contains("outside every __shared__ array")
            || text.contains("past the end of allocation")
            || text.contains("cudasim: fault at device address"),
        passed: out.status.success(),
    };
    (caught, text)
}

/// Every planted bug is caught, by the check its kind calls for: a missing barrier by the race checker (the
/// plain build misses some: a warp that runs to the barrier before the others read the tile may never see a
/// stale value), swapped registers by the numbers, an out-of-bounds gather by the bounds check. The plain
/// build runs in reverse thread order too, where a missing barrier is least likely to show numerically.
#[test]
fn planted_bugs_are_caught() {
    if sim("planted bugs").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut missed = Vec::new();
    for (i, m) in MUTANTS.iter().enumerate() {
        let kernels = dir.path().join(format!("mutant{i}"));
        std::fs::create_dir(&kernels).unwrap();
        for f in KERNEL_FILES.iter().chain(KERNEL_HEADERS) {
            let text = if f.name == m.file { mutated(m) } else { f.source.to_string() };
            std::fs::write(kernels.join(f.name), text).unwrap();
        }
        for (check, order) in [("off", "forward"), ("off", "reverse"), ("memory", "forward")] {
            let (caught, text) = run_child(m.victim, &kernels, check, order);
            println!("MUTANT {:<62} checks {check:<6} {order:<7}: {caught}", m.name);
            let expected = match (m.name, check) {
                (n, "memory") if n.contains("barrier") => caught.race,
                (n, _) if n.contains("swapped") => caught.numeric,
                // The report names the access, the allocation and the argument pointing into it.
                (n, "memory") if n.contains("off by one") => caught.bounds && text.contains("argument 0 (x) points into that allocation"),
                (n, _) if n.contains("off by one") => caught.numeric || caught.bounds,
                _ => true, // a missing barrier in the plain build: reported above, not required
            };
            if !expected || (caught.passed && check == "memory") {
                missed.push(format!("{} (checks {check}, {order}): {caught}\n{text}", m.name));
            }
        }
    }
    assert!(missed.is_empty(), "planted bugs the simulator did not catch as it should:\n{}", missed.join("\n---\n"));
}

// ---- launches -----------------------------------------------------------------------------------------------

/// The kernel table refuses a launcher's wrong argument list on every device, before the driver reads the
/// arguments; arguments of the right kinds in the wrong order reach the kernel and show in the results.
#[test]
fn a_wrong_launch_argument_list_is_refused_or_caught() {
    let Some(gpu) = sim("launch argument lists, simulated") else { return };
    let d = gpu.cuda().unwrap();
    let x = tensor(&gpu, &[64], DType::F32, &random(64, -1.0, 1.0, 10));
    let mut y = Tensor::zeros(&gpu, &[64], DType::F32).unwrap();
    let (xp, yp) = (x.cuda_ptr().unwrap(), y.cuda_ptr().unwrap());
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (64, 1, 1), shared_mem_bytes: 0 };
    // scale_f32(const F32::raw* x, float alpha, F32::raw* y, long long n): alpha and y swapped.
    let err = d.launch("elementwise.cu", "scale_f32", cfg, &[Ptr(xp), Ptr(yp), F32(2.0)], Some(64)).unwrap_err();
    assert!(format!("{err:#}").contains("argument 1 (alpha: float) needs F32, the launcher passed Ptr"), "{err:#}");
    d.launch("elementwise.cu", "scale_f32", cfg, &[Ptr(xp), F32(2.0), Ptr(yp)], Some(64)).expect("the right list is accepted");
    let err = d.launch("elementwise.cu", "scale_f32", cfg, &[Ptr(xp), F32(2.0), Ptr(yp), I32(64)], None).unwrap_err();
    assert!(format!("{err:#}").contains("argument 3 (n: long long) needs I64"), "{err:#}");
    // x and y swapped (both pointers): the kernel scales y (zeros) into x, and y stays zero.
    let want: Vec<f32> = x.to_f32_vec().unwrap().iter().map(|v| 2.0 * v).collect();
    y.fill_zero().unwrap();
    d.launch("elementwise.cu", "scale_f32", cfg, &[Ptr(yp), F32(2.0), Ptr(xp)], Some(64)).unwrap();
    let got = y.to_f32_vec().unwrap();
    assert!(got != want && got.iter().all(|v| *v == 0.0), "the swapped launch must not produce the right result");
}

/// Every argument of the right kind for `kernel`: `ptr` for pointers, zeros for the rest.
fn placeholder_args(file: &str, name: &str, ptr: u64) -> Vec<KernelArg> {
    use sgdm::runtime::kernel_table::{find, ParamKind};
    find(file, name)
        .unwrap()
        .params
        .iter()
        .map(|p| match p.kind {
            ParamKind::Ptr => Ptr(ptr),
            ParamKind::F32 => F32(0.0),
            ParamKind::F64 => KernelArg::F64(0.0),
            ParamKind::I32 | ParamKind::U32 => I32(0),
            ParamKind::I64 | ParamKind::U64 => I64(0),
        })
        .collect()
}

/// A launch the GPU would refuse is refused: more threads than the kernel's __launch_bounds__ or sm_90 allows,
/// more dynamic shared memory than 48 KiB without the opt-in attribute.
#[test]
fn launches_are_held_to_the_cubins_limits() {
    let Some(gpu) = sim("launch limits, simulated") else { return };
    let d = gpu.cuda().unwrap();
    let buffer = Tensor::zeros(&gpu, &[1 << 16], DType::F32).unwrap();
    let p = buffer.cuda_ptr().unwrap();
    let launch = |file: &'static str, name: &'static str, block: u32, shared: u32| {
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: shared };
        d.launch(file, name, cfg, &placeholder_args(file, name, p), None).and_then(|_| gpu.synchronize())
    };
    // __launch_bounds__(256)
    let err = launch("conv.cu", "conv2d_forward_mma_bf16", 512, 0).unwrap_err();
    assert!(format!("{err:#}").contains("512 threads per block, but the kernel allows 256"), "{err:#}");
    let err = launch("elementwise.cu", "fill_f32", 2048, 0).unwrap_err();
    assert!(format!("{err:#}").contains("outside the limits of sm_90"), "{err:#}");
    // layer_norm_backward_f32 takes its column sums in dynamic shared memory.
    let err = launch("norm.cu", "layer_norm_backward_f32", 256, 64 * 1024).unwrap_err();
    assert!(format!("{err:#}").contains("65536 bytes of dynamic shared memory, but the kernel may use"), "{err:#}");
}

/// Pointer arguments are checked against the live allocations when a launch is queued (a host address) and
/// again when it runs (memory freed in between, in stream order).
#[test]
fn pointer_arguments_must_point_into_live_allocations() {
    let Some(gpu) = sim("pointer arguments, simulated") else { return };
    let d = gpu.cuda().unwrap();
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
    let host = [0f32; 32];
    let err = d.launch("elementwise.cu", "fill_f32", cfg, &[Ptr(host.as_ptr() as u64), F32(1.0)], Some(32)).unwrap_err();
    assert!(format!("{err:#}").contains("is not a device address"), "{err:#}");
    let freed = Tensor::zeros(&gpu, &[32], DType::F32).unwrap();
    let p = freed.cuda_ptr().unwrap();
    drop(freed);
    let deferred = cudasim::active().unwrap().settings.deferred;
    let launched = d.launch("elementwise.cu", "fill_f32", cfg, &[Ptr(p), F32(1.0)], Some(32));
    let err = if deferred {
        launched.unwrap(); // queued behind the free: the allocation is still live when the launch is made
        gpu.synchronize().unwrap_err()
    } else {
        launched.unwrap_err()
    };
    assert!(format!("{err:#}").contains("which has been freed"), "{err:#}");
}

// ---- asynchrony and graphs ----------------------------------------------------------------------------------

/// With deferral (the default), queued work runs only when the program waits for it: a device-to-host copy's
/// destination holds NaN until then, and a host-to-device copy's source must not change before then.
#[test]
fn asynchronous_copies_are_in_flight_until_synchronised() {
    let Some(gpu) = sim("asynchronous copies, simulated") else { return };
    if !cudasim::active().unwrap().settings.deferred {
        common::skipped("asynchronous copies, simulated", "SGDM_SIM_SYNC=1 runs every call at once");
        return;
    }
    let d = gpu.cuda().unwrap();
    d.context().bind_to_thread().unwrap();
    let stream = d.stream().cu_stream();
    let t = tensor(&gpu, &[4], DType::F32, &[1.0, 2.0, 3.0, 4.0]);
    let mut out = vec![0u8; 16];
    // SAFETY: the tensor's 16 bytes; `out` outlives the synchronisation below.
    unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut out, t.cuda_ptr().unwrap(), stream) }.unwrap();
    assert!(out.iter().all(|b| *b == 0xff), "read before the copy ran: poisoned");
    gpu.synchronize().unwrap();
    assert_eq!(sgdm::tensor::bytes_to_f32(DType::F32, &out), [1.0, 2.0, 3.0, 4.0]);

    let mut source = vec![0u8; 16];
    // SAFETY: as above; the source is deliberately changed before the copy runs.
    unsafe { cudarc::driver::result::memcpy_htod_async(t.cuda_ptr().unwrap(), &source, stream) }.unwrap();
    source[0] = 1;
    let err = gpu.synchronize().unwrap_err();
    assert!(format!("{err:#}").contains("host source changed between the call and the copy"), "{err:#}");
}

/// A capture refuses what would synchronise (and is then invalid); a captured sequence replays.
#[test]
fn a_capture_refuses_synchronisation_and_replays_what_it_recorded() {
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let Some(gpu) = sim("graph capture, simulated") else { return };
    let d = gpu.cuda().unwrap();
    let stream = d.context().new_stream().unwrap();
    let x = tensor(&gpu, &[8], DType::F32, &[1.0; 8]);
    let mut y = Tensor::zeros(&gpu, &[8], DType::F32).unwrap();
    stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
    assert!(stream.synchronize().is_err(), "synchronising a capturing stream fails");
    let err = stream.end_capture(CUgraphInstantiate_flags(0)).err().expect("the capture is invalid now");
    assert!(format!("{err:?}").contains("INVALIDATED"), "{err:?}");

    // Recorded on the device's own stream: scale x into y, twice; nothing runs until the graph is launched.
    d.stream().begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
    sgdm::ops::elementwise::scale(&x, 3.0, &mut y).unwrap();
    let graph = d.stream().end_capture(CUgraphInstantiate_flags(0)).unwrap().unwrap();
    assert_eq!(y.to_f32_vec().unwrap(), [0.0; 8], "capturing ran nothing");
    graph.launch().unwrap();
    assert_eq!(y.to_f32_vec().unwrap(), [3.0; 8]);
}

/// sgdm's probe checks, before cudarc loads libcuda, every driver function the engine calls (cudarc panics on
/// a missing one). The simulator records what the process called: all of it must be in the probe's list.
#[test]
fn the_probe_checks_every_driver_function_the_engine_calls() {
    let Some(gpu) = sim("driver functions called, simulated") else { return };
    // A workload touching every path: allocation, copies, kernels, cuBLASLt, events, a graph.
    let x = tensor(&gpu, &[4, 8], DType::F32, &random(32, -1.0, 1.0, 11));
    let w = tensor(&gpu, &[3, 8], DType::F32, &random(24, -1.0, 1.0, 12));
    let mut y = Tensor::zeros(&gpu, &[4, 3], DType::F32).unwrap();
    sgdm::ops::linear::linear_forward(&x, &w, None, &mut y).unwrap();
    let d = gpu.cuda().unwrap();
    let start = d.stream().record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
    let end = d.stream().record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
    start.elapsed_ms(&end).unwrap();
    let _ = y.to_f32_vec().unwrap();
    let called = cudasim::active().unwrap().called_driver_functions();
    let unchecked: Vec<&String> = called.iter().filter(|f| !sgdm::runtime::probe::DRIVER_SYMBOLS.contains(&f.as_str())).collect();
    assert!(unchecked.is_empty(), "the engine called driver functions runtime/probe.rs does not check: {unchecked:?}");
}

// ---- the commands -------------------------------------------------------------------------------------------

/// What a user runs, on the simulated device, each command in a process of its own: `train all` (one step of
/// every stage, bf16 with f32 master weights: base VAE and UNet, StructuralVAE, encoder, ControlNet) and
/// `reconstruct` (a few items, few steps) from the model it wrote.
#[test]
fn train_and_reconstruct_run_on_the_simulated_device() {
    if !common::simulator_or_skip("train and reconstruct on cuda-sim") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (data, weights, recon) = (dir.path().join("data"), dir.path().join("weights"), dir.path().join("recon"));
    common::tiny_synth(&data);
    let config = dir.path().join("train.toml");
    std::fs::write(&config, common::tiny_train_config_with_steps(&data, 1)).unwrap();
    let started = std::time::Instant::now();
    let (ok, out, err) =
        common::run_sgdm(["--device", "cuda-sim", "train", "all", "--config", config.to_str().unwrap(), "--out", weights.to_str().unwrap()]);
    assert!(ok, "sgdm --device cuda-sim train all:\n{out}\n{err}");
    println!("train all on cuda-sim: {:.0} s", started.elapsed().as_secs_f64());
    for file in ["vae.safetensors", "encoder.safetensors", "eeg_projector.safetensors", "unet/diffusion_pytorch_model.safetensors"] {
        assert!(weights.join(file).exists(), "train all on cuda-sim wrote no {file}:\n{out}");
    }
    let started = std::time::Instant::now();
    let (ok, out, err) = common::run_sgdm([
        "--device",
        "cuda-sim",
        "reconstruct",
        "--eeg",
        data.join("eeg/test.npy").to_str().unwrap(),
        "--images",
        data.join("images/test").to_str().unwrap(),
        "--weights",
        weights.to_str().unwrap(),
        "--out",
        recon.to_str().unwrap(),
        "--steps",
        "2",
        "--limit",
        "3",
        "--batch",
        "2",
    ]);
    assert!(ok, "sgdm --device cuda-sim reconstruct:\n{out}\n{err}");
    println!("reconstruct on cuda-sim: {:.0} s", started.elapsed().as_secs_f64());
    let manifest = std::fs::read_to_string(recon.join("manifest.jsonl")).unwrap();
    assert_eq!(manifest.lines().count(), 3, "{manifest}");
    for i in 0..3 {
        let image = sgdm::data::image::load_rgb(recon.join(format!("images/{i:05}.png"))).unwrap();
        assert!(image.width() > 0);
    }
}
