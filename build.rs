//! Embeds every `kernels/*.cu` and `kernels/*.cuh` into the binary, so the runtime can compile them with
//! NVRTC at first use without the source tree being present.
use std::{env, fs, path::PathBuf};

fn main() {
    // The commit this binary was built from, for the numbers `sgdm profile` reports (absent outside git).
    if let Ok(out) = std::process::Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).output() {
        if out.status.success() {
            println!("cargo:rustc-env=SGDM_GIT_COMMIT={}", String::from_utf8_lossy(&out.stdout).trim());
        }
    }
    for git in [".git/HEAD", ".git/refs/heads"] {
        if std::path::Path::new(git).exists() {
            println!("cargo:rerun-if-changed={git}");
        }
    }
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let dir = root.join("kernels");
    println!("cargo:rerun-if-changed={}", dir.display());

    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("kernels/ entry").path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("cu" | "cuh")))
        .collect();
    files.sort();

    let mut sources = String::new();
    let mut headers = String::new();
    for path in &files {
        println!("cargo:rerun-if-changed={}", path.display());
        let name = path.file_name().unwrap().to_str().expect("kernel file names are UTF-8");
        let entry = format!(
            "    EmbeddedSource {{ name: {name:?}, source: include_str!({:?}) }},\n",
            path.display().to_string()
        );
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
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR")).join("embedded_kernels.rs");
    fs::write(&out, generated).unwrap_or_else(|e| panic!("cannot write {}: {e}", out.display()));
}
