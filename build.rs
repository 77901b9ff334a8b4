//! Build steps that need the kernel sources or a C++ compiler:
//! - embeds every `kernels/*.cu` and `kernels/*.cuh` into the binary, so the runtime can compile them with NVRTC
//!   at first use without the source tree being present;
//! - reads every `extern "C" __global__` signature (after the C preprocessor has expanded the kernel files'
//!   macros) into the kernel table that every launch is checked against (src/runtime/kernel_table.rs);
//! - builds the simulated CUDA device's libraries (cudasim/: the stand-in libcuda.so with the SIMT executor,
//!   and libcublasLt.so) and embeds them, so `--device cuda-sim` works from the binary alone.
//!
//! Needs a C++17 compiler: `$CXX`, else `c++` (g++ >= 11 or clang >= 14). The simulator is built on x86-64 Linux
//! only; elsewhere, or with SGDM_NO_CUDASIM=1, the binary says `--device cuda-sim` is unavailable.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::{env, fs};

#[path = "src/runtime/kernel_signature.rs"]
#[allow(dead_code)]
mod kernel_signature;

fn compiler() -> String {
    env::var("CXX").ok().filter(|c| !c.is_empty()).unwrap_or_else(|| "c++".to_string())
}

fn run(cmd: &mut Command, what: &str) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!(
            "sgdm's build runs a C++ compiler ({what}) and could not start `{}`: {e}\n\
             Install g++ (>= 11) or clang (>= 14), or point CXX at one.",
            compiler()
        )
    });
    if !out.status.success() {
        panic!("{what} failed ({:?}):\n{}", cmd, String::from_utf8_lossy(&out.stderr));
    }
    out.stdout
}

fn main() {
    // The commit this binary was built from, for the numbers `sgdm profile` reports (absent outside git).
    if let Ok(out) = Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).output() {
        if out.status.success() {
            println!("cargo:rustc-env=SGDM_GIT_COMMIT={}", String::from_utf8_lossy(&out.stdout).trim());
        }
    }
    for git in [".git/HEAD", ".git/refs/heads"] {
        if Path::new(git).exists() {
            println!("cargo:rerun-if-changed={git}");
        }
    }
    println!("cargo:rerun-if-env-changed=CXX");
    println!("cargo:rerun-if-env-changed=SGDM_NO_CUDASIM");
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let kernels = root.join("kernels");
    println!("cargo:rerun-if-changed={}", kernels.display());

    let mut files: Vec<PathBuf> = fs::read_dir(&kernels)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", kernels.display()))
        .map(|entry| entry.expect("kernels/ entry").path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("cu" | "cuh")))
        .collect();
    files.sort();
    embed_kernels(&files, &out_dir);
    kernel_table(&files, &kernels, &out_dir);
    cudasim(&root, &out_dir);
}

fn embed_kernels(files: &[PathBuf], out_dir: &Path) {
    let mut sources = String::new();
    let mut headers = String::new();
    for path in files {
        println!("cargo:rerun-if-changed={}", path.display());
        let name = path.file_name().unwrap().to_str().expect("kernel file names are UTF-8");
        let entry = format!("    EmbeddedSource {{ name: {name:?}, source: include_str!({:?}) }},\n", path.display().to_string());
        if name.ends_with(".cuh") {
            headers.push_str(&entry);
        } else {
            sources.push_str(&entry);
        }
    }
    let generated = format!(
        "/// Every `kernels/*.cu` file, compiled as one NVRTC program each.\n\
         pub const KERNEL_FILES: &[EmbeddedSource] = &[\n{sources}];\n\
         /// Every `kernels/*.cuh` header, handed to NVRTC so `#include \"name.cuh\"` resolves.\n\
         pub const KERNEL_HEADERS: &[EmbeddedSource] = &[\n{headers}];\n"
    );
    let out = out_dir.join("embedded_kernels.rs");
    fs::write(&out, generated).unwrap_or_else(|e| panic!("cannot write {}: {e}", out.display()));
}

/// The preprocessed text of one kernel file, as the C preprocessor expands it for NVRTC.
pub fn preprocess(cxx: &str, file: &Path, include: &Path) -> String {
    let out = run(
        Command::new(cxx).args(["-E", "-P", "-x", "c++", "-std=c++17", "-D__CUDACC_RTC__", "-I"]).arg(include).arg(file),
        &format!("preprocessing {}", file.display()),
    );
    String::from_utf8(out).expect("preprocessed kernels are UTF-8")
}

fn kernel_table(files: &[PathBuf], include: &Path, out_dir: &Path) {
    let cxx = compiler();
    let mut table =
        String::from("/// Every kernel of every `kernels/*.cu` file, with its parameters, in file order.\npub static KERNELS: &[Kernel] = &[\n");
    let mut index = 0;
    let mut seen = std::collections::HashMap::new();
    for path in files.iter().filter(|p| p.extension().is_some_and(|e| e == "cu")) {
        let file = path.file_name().unwrap().to_str().unwrap();
        let parsed = kernel_signature::parse_kernels(&preprocess(&cxx, path, include)).unwrap_or_else(|e| panic!("kernels/{file}: {e}"));
        for k in parsed {
            if let Some(other) = seen.insert(k.name.clone(), file.to_string()) {
                panic!("kernel {} is defined in both kernels/{other} and kernels/{file}: names must be unique", k.name);
            }
            let params: Vec<String> =
                k.params.iter().map(|p| format!("Param {{ name: {:?}, ty: {:?}, kind: ParamKind::{} }}", p.name, p.ty, p.kind.rust_name())).collect();
            table.push_str(&format!("    Kernel {{ index: {index}, file: {file:?}, name: {:?}, params: &[{}] }},\n", k.name, params.join(", ")));
            index += 1;
        }
    }
    table.push_str("];\n");
    table.push_str(&format!("/// Launches of each kernel so far, by [`Kernel::index`].\nstatic LAUNCHES: [std::sync::atomic::AtomicU64; {index}] = [const {{ std::sync::atomic::AtomicU64::new(0) }}; {index}];\n"));
    let out = out_dir.join("kernel_table.rs");
    fs::write(&out, table).unwrap_or_else(|e| panic!("cannot write {}: {e}", out.display()));
}

fn cudasim(root: &Path, out_dir: &Path) {
    let sim = root.join("cudasim");
    println!("cargo:rerun-if-changed={}", sim.display());
    for f in ["include/cudasim_kernel.h", "src/simt.h", "src/simt.cpp", "src/driver.cpp", "src/cubin.h", "src/cubin.cpp", "src/cublaslt.cpp"] {
        println!("cargo:rerun-if-changed={}", sim.join(f).display());
    }
    let target_ok = env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") && env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("x86_64");
    let disabled = env::var("SGDM_NO_CUDASIM").is_ok_and(|v| !v.is_empty() && v != "0");
    let generated = out_dir.join("cudasim_embedded.rs");
    if !target_ok || disabled {
        let why = if disabled { "SGDM_NO_CUDASIM was set when sgdm was built" } else { "the simulator runs on x86-64 Linux only" };
        fs::write(&generated, format!("pub const BUILT: Result<Libraries, &str> = Err({why:?});\n")).unwrap();
        return;
    }
    let cxx = compiler();
    let dir = out_dir.join("cudasim");
    fs::create_dir_all(&dir).unwrap();
    let common = ["-std=c++17", "-O3", "-g", "-fPIC", "-Wall", "-Wextra", "-Wno-unused-parameter"];
    // The executor's functions are called by the twins: default visibility. The driver exports exactly its API.
    let objects: Vec<(PathBuf, Vec<&str>)> = vec![
        (sim.join("src/simt.cpp"), vec![]),
        (sim.join("src/driver.cpp"), vec!["-fvisibility=hidden"]),
        (sim.join("src/cubin.cpp"), vec!["-fvisibility=hidden"]),
        (sim.join("src/cublaslt.cpp"), vec!["-fvisibility=hidden"]),
    ];
    std::thread::scope(|s| {
        for (src, extra) in &objects {
            let (cxx, dir) = (&cxx, &dir);
            s.spawn(move || {
                let obj = dir.join(src.file_name().unwrap()).with_extension("o");
                run(
                    Command::new(cxx).args(common).args(extra).arg("-c").arg(src).arg("-o").arg(&obj),
                    &format!("compiling the CUDA simulator's {}", src.display()),
                );
            });
        }
    });
    let driver = dir.join("libcuda.so");
    run(
        Command::new(&cxx)
            .args(["-shared", "-Wl,-soname,libcuda.so", "-Wl,--no-undefined"])
            .args(["simt.o", "driver.o", "cubin.o"].map(|o| dir.join(o)))
            .arg("-o")
            .arg(&driver)
            .args(["-ldl", "-lpthread"]),
        "linking the CUDA simulator's libcuda.so",
    );
    let blas = dir.join("libcublasLt.so");
    run(
        Command::new(&cxx)
            .args(["-shared", "-Wl,-soname,libcublasLt.so", "-Wl,--no-undefined"])
            .arg(dir.join("cublaslt.o"))
            .arg(format!("-L{}", dir.display()))
            .arg("-l:libcuda.so")
            .arg("-o")
            .arg(&blas),
        "linking the CUDA simulator's libcublasLt.so",
    );
    let header = sim.join("include/cudasim_kernel.h");
    fs::write(
        &generated,
        format!(
            "pub const BUILT: Result<Libraries, &str> = Ok(Libraries {{\n    \
             driver: include_bytes!({:?}),\n    cublaslt: include_bytes!({:?}),\n    kernel_header: include_str!({:?}),\n}});\n",
            driver.display().to_string(),
            blas.display().to_string(),
            header.display().to_string()
        ),
    )
    .unwrap();
}
