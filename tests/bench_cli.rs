//! `sgdm bench`: the case list torch_ops.py reads, and a quick CPU run whose rows carry the exact FLOP and
//! byte counts of their shapes.

mod common;

use common::run_sgdm;

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn the_case_list_covers_every_family_at_the_target_shapes() {
    let (ok, out, err) = run_sgdm(["bench", "--list"]);
    assert!(ok, "{err}");
    let cases = json(&out);
    let cases = cases.as_array().unwrap();
    let mut ids: Vec<&str> = cases.iter().map(|c| c["id"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), cases.len(), "ids are unique");
    for family in sgdm::bench::FAMILIES {
        assert!(cases.iter().any(|c| c["family"] == *family), "{family} missing");
    }
    // SD 1.5's top-level conv at batch 16, cross-attention to 77 tokens at d = 40, InfoNCE at 8192.
    assert!(ids.contains(&"conv_batch16_channels320_side64"), "{ids:?}");
    assert!(ids.contains(&"attention_batch2_heads8_q_len4096_kv_len77_head_dim40"), "{ids:?}");
    assert!(ids.contains(&"infonce_batch8192_dim512"), "{ids:?}");
    assert!(ids.contains(&"lstm_batch1024_steps100_input17_hidden256_layers2"), "{ids:?}");
    let conv = cases.iter().find(|c| c["family"] == "conv").unwrap();
    assert_eq!(conv["params"]["channels"], 320);
    assert_eq!(conv["passes"], serde_json::json!(["forward", "backward_input", "backward_weight"]));

    let (ok, out, _) = run_sgdm(["bench", "--list", "--family", "infonce"]);
    assert!(ok && json(&out).as_array().unwrap().iter().all(|c| c["family"] == "infonce"));
    let (ok, _, err) = run_sgdm(["bench", "--list", "--family", "gemm"]);
    assert!(!ok && err.contains("unknown --family gemm") && err.contains("groupnorm_silu"), "{err}");
}

#[test]
fn a_quick_cpu_run_times_every_pass_with_exact_counts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ours.json");
    let (ok, out, err) = run_sgdm([
        "--device",
        "cpu",
        "bench",
        "--quick",
        "--family",
        "conv",
        "--family",
        "groupnorm_silu",
        "--runs",
        "3",
        "--warmup",
        "1",
        "--json",
        path.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("peaks measured now: GEMM") && out.contains("backward_weight"), "{out}");
    let doc = json(&std::fs::read_to_string(&path).unwrap());
    assert_eq!(doc["device"], "cpu");
    assert!(doc["peak_gemm_flops"].as_f64().unwrap() > 0.0 && doc["peak_copy_bytes_per_s"].as_f64().unwrap() > 0.0);
    let rows = doc["rows"].as_array().unwrap();
    // Quick conv: 2 shapes x 3 passes; GroupNorm + SiLU: 2 shapes x 2 passes.
    assert_eq!(rows.len(), 2 * 3 + 2 * 2, "{rows:?}");
    for r in rows {
        let (ms, lo, hi) = (r["ms"].as_f64().unwrap(), r["min_ms"].as_f64().unwrap(), r["max_ms"].as_f64().unwrap());
        assert!(lo > 0.0 && lo <= ms && ms <= hi, "{r}");
    }
    let row = |id: &str, pass: &str| rows.iter().find(|r| r["id"] == id && r["pass"] == pass).unwrap_or_else(|| panic!("{id} {pass}"));
    // 3x3 conv, 16 -> 16 channels on 8x8, batch 1: 2 * 16 * 16 * 9 * 64 FLOPs per pass.
    assert_eq!(row("conv_batch1_channels16_side8", "backward_input")["flops"], 2.0 * 16.0 * 16.0 * 9.0 * 64.0);
    // GroupNorm + SiLU on [1, 16, 8, 8] f32: forward reads x and writes y, backward reads x and dy, writes dx.
    let gn = "groupnorm_silu_batch1_channels16_side8_groups4";
    assert_eq!(row(gn, "forward")["bytes"], 2.0 * 1024.0 * 4.0);
    assert_eq!(row(gn, "backward")["bytes"], 3.0 * 1024.0 * 4.0);
    assert_eq!(row(gn, "forward")["flops"], 0.0);
}

/// The kernel-variant environment variables are checked (a typo is an error naming the variable and the
/// accepted values, even on the CPU, which ignores the choice); `simt` is accepted.
#[test]
fn kernel_variant_variables_are_validated() {
    for (var, family) in [("SGDM_CONV_KERNEL", "conv"), ("SGDM_ATTENTION_KERNEL", "attention")] {
        let run = |value: &str| {
            std::process::Command::new(common::sgdm_bin())
                .args(["--device", "cpu", "bench", "--quick", "--family", family, "--runs", "1", "--warmup", "0"])
                .env(var, value)
                .output()
                .unwrap()
        };
        let bad = run("tensorcores");
        let err = String::from_utf8_lossy(&bad.stderr);
        assert!(!bad.status.success() && err.contains(&format!("{var}=tensorcores: expected tensor-core or simt")), "{err}");
        assert!(run("simt").status.success());
    }
}
