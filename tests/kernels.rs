//! The kernel pipeline without a GPU: every kernel file compiles with NVRTC for sm_80 and sm_90, every
//! kernel of the kernel table (the signatures build.rs read from the sources, which every launch is checked
//! against) is in the cubin, nothing spills, the cache compiles once then hits, and a compile error shows
//! NVRTC's log. Under CI=true a missing NVRTC fails these tests instead of skipping.

mod common;

use sgdm::runtime::kernel_table::KERNELS;
use sgdm::runtime::kernels::{compile, Arch, CacheOutcome, EmbeddedSource, KernelCache, KERNEL_FILES};
use sgdm::runtime::probe;

fn nvrtc_available() -> bool {
    match probe::nvrtc() {
        Ok(_) => true,
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true, so NVRTC must be installed (.ci/run installs it from PyPI): {e}")
        }
        Err(e) => {
            common::skipped("kernel compilation", format!("NVRTC is not available: {e}"));
            false
        }
    }
}

const ARCHS: [Arch; 2] = [Arch { major: 8, minor: 0, accelerated: false }, Arch { major: 9, minor: 0, accelerated: false }];

#[test]
fn every_kernel_file_compiles_for_sm80_and_sm90_with_every_table_kernel_and_no_spills() {
    if !nvrtc_available() {
        return;
    }
    for file in KERNEL_FILES {
        let table: Vec<&str> = KERNELS.iter().filter(|k| k.file == file.name).map(|k| k.name).collect();
        assert!(!table.is_empty(), "kernels/{} has no kernel in the table", file.name);
        for arch in ARCHS {
            let compiled = compile(file, arch).unwrap_or_else(|e| panic!("{e}"));
            assert!(compiled.cubin.starts_with(b"\x7fELF"), "{} for {arch} is not a cubin", file.name);
            let resources = compiled.resources();
            assert_eq!(resources.len(), table.len(), "kernels/{} for {arch}: ptxas compiled other kernels than the table's", file.name);
            for name in &table {
                let r = resources
                    .iter()
                    .find(|r| r.name == *name)
                    .unwrap_or_else(|| panic!("kernels/{} has no kernel {name} for {arch}:\n{}", file.name, compiled.log));
                assert!(r.registers > 0, "{name}: ptxas reported no registers:\n{}", compiled.log);
                assert_eq!((r.spill_store_bytes, r.spill_load_bytes), (0, 0), "{name} spills registers on {arch}:\n{}", compiled.log);
            }
            println!("{} {arch}: {} kernels, {} bytes of cubin", file.name, resources.len(), compiled.cubin.len());
        }
    }
}

#[test]
fn cache_compiles_once_then_hits_and_replaces_corrupt_entries() {
    if !nvrtc_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = KernelCache::new(dir.path().join("kernels"));
    let file = &KERNEL_FILES[0];
    let arch = ARCHS[1];
    let (first, outcome) = cache.load_or_compile(file, arch).unwrap();
    assert_eq!(outcome, CacheOutcome::Compiled);
    let (second, outcome) = cache.load_or_compile(file, arch).unwrap();
    assert_eq!(outcome, CacheOutcome::Hit);
    assert_eq!(first, second);

    let nvrtc = probe::nvrtc().unwrap().version;
    let path = cache.path_for(file, arch, nvrtc);
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.contains("sm_90") && name.contains(&format!("nvrtc{}.{}", nvrtc.0, nvrtc.1)), "{name}");
    assert_ne!(path, cache.path_for(file, ARCHS[0], nvrtc), "the key includes the arch");
    assert_ne!(path, cache.path_for(file, arch, (nvrtc.0, nvrtc.1 + 1)), "the key includes the NVRTC version");

    std::fs::write(&path, b"not a cubin").unwrap();
    let (third, outcome) = cache.load_or_compile(file, arch).unwrap();
    assert_eq!(outcome, CacheOutcome::Compiled, "a corrupt cache entry is recompiled");
    assert_eq!(third, first);
    assert_eq!(std::fs::read(&path).unwrap(), first);
}

#[test]
fn compile_errors_show_the_file_arch_and_nvrtc_log() {
    if !nvrtc_available() {
        return;
    }
    let broken: &'static EmbeddedSource = Box::leak(Box::new(EmbeddedSource {
        name: "broken.cu",
        source: "#include \"common.cuh\"\nextern \"C\" __global__ void k(float* y) { y[0] = undefined_helper(); }\n",
    }));
    let err = compile(broken, ARCHS[1]).unwrap_err().to_string();
    assert!(err.contains("kernels/broken.cu") && err.contains("sm_90"), "{err}");
    assert!(err.contains("undefined_helper"), "the NVRTC log is part of the error: {err}");
}
