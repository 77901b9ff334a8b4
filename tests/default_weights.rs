//! The shipped default model: it loads, stays under the 20 MB budget, carries its provenance, and
//! reconstructs (a 2-step smoke run; `sgdm demo` is the full job).

mod common;

#[test]
fn the_shipped_weights_load_fit_the_budget_and_reconstruct() {
    let dir = common::repo_root().join("weights");
    let mut total = 0u64;
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                total += e.metadata().unwrap().len();
            }
        }
    }
    assert!(total < 20_000_000, "weights/ holds {total} bytes, over the 20 MB budget");
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    for needle in ["sgdm train all --config weights/train.toml", "Seeds", "Wall times", "selected"] {
        assert!(readme.contains(needle), "weights/README.md lacks '{needle}'");
    }
    let p = sgdm::pipeline::Pipeline::open(&dir, &sgdm::Device::Cpu, sgdm::DType::F32).unwrap();
    assert_eq!((p.image_size(), p.eeg_shape()), (64, (17, 100)));
    let opts = sgdm::pipeline::SamplingOptions { steps: 2, ..Default::default() };
    let r = p.reconstruct(&common::random(2 * 17 * 100, -5.0, 5.0, 1), &[0, 1], &opts).unwrap();
    assert_eq!(r.images.len(), 2 * 3 * 64 * 64);
    assert!(r.images.iter().all(|v| v.is_finite() && (0.0..=1.0).contains(v)));
}
