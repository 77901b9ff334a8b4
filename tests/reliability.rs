//! Reliability of the `sgdm` command line as a new user meets it: nothing wrong is ever marked
//! finished, no input makes it panic, bad input is refused before anything is written, and the binary
//! works away from the tree it was built in. Each test reproduces one reported failure; the last ones go
//! further: `sgdm train all` killed (SIGKILL) at random points and resumed ends with the weights of an
//! uninterrupted run, and every file-reading command run over a corpus of broken files exits with a clear
//! error (never a panic's 101) and writes nothing that looks finished.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{sgdm_bin, tiny_model};
use sgdm::data::npy::{write_f32, NpyFile};

/// `sgdm --device cpu ARGS` with `env` added to the environment.
fn sgdm_with_env<S: AsRef<std::ffi::OsStr>>(args: &[S], env: &[(&str, &std::ffi::OsStr)]) -> Output {
    let mut cmd = Command::new(sgdm_bin());
    cmd.arg("--device").arg("cpu").args(args).env_remove("SGDM_WEIGHTS");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("cannot run sgdm")
}

fn sgdm<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    sgdm_with_env(args, &[])
}

fn text(out: &Output) -> String {
    format!("exit {:?}\n--- stdout\n{}--- stderr\n{}", out.status.code(), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A refusal: exit status 1 (sgdm's error exit), not a panic (101) or a signal, with no panic message.
fn assert_refused(out: &Output, what: &str) {
    assert_eq!(out.status.code(), Some(1), "{what}: expected a refusal with exit status 1\n{}", text(out));
    assert!(!stderr(out).contains("panicked"), "{what}: panicked\n{}", text(out));
}

fn assert_ok(out: &Output, what: &str) {
    assert!(out.status.success(), "{what}: failed\n{}", text(out));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `reconstruct` of the tiny model's test split into `out` (1 denoising step, no guidance: only the
/// folder matters), with `extra` flags.
fn reconstruct_args(eeg: &Path, weights: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["reconstruct", "--eeg", s(eeg), "--weights", s(weights), "--out", s(out)].iter().map(|a| a.to_string()).collect();
    for (flag, default) in [("--steps", "1"), ("--guidance", "1")] {
        if !extra.contains(&flag) {
            args.extend([flag.to_string(), default.to_string()]);
        }
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

fn manifest_lines(out: &Path) -> usize {
    std::fs::read_to_string(out.join("manifest.jsonl")).map_or(0, |t| t.lines().count())
}

/// Rewrites one tensor of a safetensors file (f32) with `edit`.
fn edit_tensor(path: &Path, name: &str, edit: impl Fn(&mut [f32])) {
    use sgdm::weights::{save_safetensors, SafetensorsFile};
    use sgdm::{DType, Device};
    let file = SafetensorsFile::open(path).unwrap();
    let names: Vec<String> = file.names().map(str::to_string).collect();
    let mut tensors: Vec<(String, sgdm::Tensor)> = names.iter().map(|n| (n.clone(), file.tensor(n, &Device::Cpu, DType::F32).unwrap())).collect();
    let metadata = file.metadata().clone();
    drop(file);
    let (_, t) = tensors.iter_mut().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{}: no tensor {name}", path.display()));
    let mut v = t.to_f32_vec().unwrap();
    edit(&mut v);
    t.write_f32(&v).unwrap();
    let refs: Vec<(&str, &sgdm::Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    save_safetensors(path, &refs, Some(&metadata)).unwrap();
}

/// The tiny model's `[encoder]` table as a configuration of its own, with the VAE weights it needs.
fn encoder_only_config(data: &Path, weights: &Path) -> String {
    let mut all: toml::Table = toml::from_str(&common::tiny_train_config(data)).unwrap();
    let mut encoder = all.remove("encoder").unwrap();
    encoder.as_table_mut().unwrap().insert("vae_weights".into(), toml::Value::String(s(&weights.join("vae.safetensors")).into()));
    toml::to_string(&toml::Table::from_iter([("encoder".to_string(), encoder)])).unwrap()
}

// 1. EEG rows that do not pair with the manifest's figures.
#[test]
fn training_refuses_an_eeg_file_whose_rows_do_not_match_the_manifest() {
    let (data, weights) = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("data");
    copy_dir(data, &copy);
    let config = dir.path().join("encoder.toml");
    std::fs::write(&config, encoder_only_config(&copy, weights)).unwrap();
    let train = NpyFile::open(data.join("eeg/train.npy")).unwrap();
    let shape = train.header.shape.clone();
    let values = train.to_f32().unwrap();
    let per_row = values.len() / shape[0];
    for rows in [shape[0] + 1, shape[0] - 1] {
        let resized: Vec<f32> = values.iter().copied().cycle().take(rows * per_row).collect();
        write_f32(copy.join("eeg/train.npy"), &[rows, shape[1], shape[2], shape[3]], &resized).unwrap();
        let out = dir.path().join(format!("out{rows}"));
        let run = sgdm(&["train", "encoder", "--config", s(&config), "--out", s(&out)]);
        assert_refused(&run, &format!("an EEG file of {rows} rows for {} figures", shape[0]));
        let err = stderr(&run);
        assert!(err.contains("train.npy") && err.contains(&format!("{rows} rows")) && err.contains(&format!("{} figures", shape[0])), "{err}");
        assert!(!out.join("encoder.safetensors").exists());
    }
}

// 2. Non-finite weights, and non-finite outputs from finite weights.
#[test]
fn a_nan_weight_is_refused_at_load_naming_the_file_and_tensor() {
    let (data, weights) = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("weights");
    copy_dir(weights, &broken);
    let unet = broken.join("unet/diffusion_pytorch_model.safetensors");
    edit_tensor(&unet, "conv_in.weight", |v| v[5] = f32::NAN);
    let out = dir.path().join("out");
    let run = sgdm(&reconstruct_args(&data.join("eeg/test.npy"), &broken, &out, &[]));
    assert_refused(&run, "a NaN in the UNet's weights");
    let err = stderr(&run);
    assert!(err.contains("diffusion_pytorch_model.safetensors") && err.contains("conv_in.weight") && err.contains("non-finite"), "{err}");
    assert_eq!(manifest_lines(&out), 0, "items were marked finished");
}

#[test]
fn a_batch_whose_images_come_out_non_finite_is_not_written() {
    let (data, weights) = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("weights");
    copy_dir(weights, &broken);
    // Finite weights that overflow: the noise prediction becomes infinite, the images NaN.
    edit_tensor(&broken.join("unet/diffusion_pytorch_model.safetensors"), "conv_out.weight", |v| v.iter_mut().for_each(|x| *x = 3e38));
    let out = dir.path().join("out");
    let run = sgdm(&reconstruct_args(&data.join("eeg/test.npy"), &broken, &out, &["--batch", "2"]));
    assert_refused(&run, "images that decode to NaN");
    assert!(stderr(&run).contains("non-finite"), "{}", text(&run));
    assert_eq!(manifest_lines(&out), 0, "items were marked finished");
    assert!(std::fs::read_dir(out.join("images")).map_or(0, |d| d.count()) == 0, "images were written");
}

/// Found beside item 2: a diverged training run wrote NaN weights as its final output, exit 0.
#[test]
fn a_training_run_that_diverges_stops_and_writes_no_final_weights() {
    let (data, _) = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    let mut config: toml::Table = toml::from_str(&common::tiny_train_config(data)).unwrap();
    let mut vae = config.remove("vae").unwrap();
    vae["train"].as_table_mut().unwrap().insert("lr".into(), toml::Value::Float(1e30));
    let path = dir.path().join("vae.toml");
    std::fs::write(&path, toml::to_string(&toml::Table::from_iter([("vae".to_string(), vae)])).unwrap()).unwrap();
    let out = dir.path().join("out");
    let run = sgdm(&["train", "vae", "--config", s(&path), "--out", s(&out)]);
    assert_refused(&run, "a learning rate of 1e30");
    assert!(stderr(&run).contains("diverged"), "{}", text(&run));
    assert!(!out.join("vae.safetensors").exists(), "the diverged parameters were written as the stage's result");
}

// 3. Validation before the first write.
#[test]
fn bad_sampling_settings_are_refused_before_anything_is_written() {
    let (data, weights) = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    let eeg = data.join("eeg/test.npy");
    let out = dir.path().join("out");
    for (flags, needle) in [
        (&["--steps", "0"][..], "--steps"),
        (&["--guidance", "nan"][..], "--guidance"),
        (&["--controlnet-scale", "inf"][..], "--controlnet-scale"),
        (&["--batch", "0"][..], "--batch"),
        (&["--steps", "5000"][..], "--steps"),
    ] {
        let run = sgdm(&reconstruct_args(&eeg, weights, &out, flags));
        assert_refused(&run, &format!("{flags:?}"));
        assert!(stderr(&run).contains(needle), "{flags:?}\n{}", text(&run));
        assert!(!out.exists(), "{flags:?} was refused only after writing {}", out.display());
    }
    assert_ok(&sgdm(&reconstruct_args(&eeg, weights, &out, &["--limit", "1"])), "the corrected command");

    // A folder that an earlier sgdm claimed with other settings but never finished an item in is not
    // locked: the new settings replace the old.
    let claimed = dir.path().join("claimed");
    std::fs::create_dir_all(&claimed).unwrap();
    std::fs::write(claimed.join("run.json"), r#"{"steps": 0, "guidance": null}"#).unwrap();
    let run = sgdm(&reconstruct_args(&eeg, weights, &claimed, &["--limit", "1"]));
    assert_ok(&run, "a claimed folder with no finished item");
    assert_eq!(manifest_lines(&claimed), 1);
}

#[test]
fn help_says_what_makes_a_folder_resumable_and_how_to_start_over() {
    for command in ["reconstruct", "demo"] {
        let help = String::from_utf8_lossy(&sgdm(&[command, "--help"]).stdout).into_owned();
        for needle in ["resum", "start over", "Examples"] {
            assert!(help.contains(needle), "sgdm {command} --help does not mention '{needle}':\n{help}");
        }
    }
}

// 4. The default weights of a binary copied away from its build tree.
#[test]
fn a_copied_binary_finds_its_default_weights_and_says_which_it_used() {
    let (data, weights) = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    let bin_dir = dir.path().join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    let copied = bin_dir.join("sgdm");
    std::fs::copy(sgdm_bin(), &copied).unwrap();
    let cache = dir.path().join("cache");
    let run = |out: &Path, env: &[(&str, &std::ffi::OsStr)]| {
        let mut cmd = Command::new(&copied);
        cmd.args(["--device", "cpu"]).args(reconstruct_args(&data.join("eeg/test.npy"), Path::new("-"), out, &["--limit", "1"]));
        // Without --weights: drop the two arguments reconstruct_args put there.
        let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
        let at = args.iter().position(|a| a == "--weights").unwrap();
        let mut cmd = Command::new(&copied);
        cmd.args(&args[..at]).args(&args[at + 2..]).env_remove("SGDM_WEIGHTS").env("SGDM_CACHE_DIR", &cache).current_dir(dir.path());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let run_json = |out: &Path| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap() };

    let built_in = dir.path().join("built_in");
    let r = run(&built_in, &[]);
    assert_ok(&r, "a copied binary without --weights");
    assert!(stderr(&r).contains("built into this binary"), "{}", text(&r));
    let used = PathBuf::from(run_json(&built_in)["weights"].as_str().unwrap());
    assert!(used.starts_with(std::fs::canonicalize(&cache).unwrap()), "the built-in weights were read from {}", used.display());
    // An unpacked copy cut short (a full disk) is unpacked again, and a killed unpacking's folder removed.
    let vae = std::fs::read(used.join("vae.safetensors")).unwrap();
    std::fs::write(used.join("vae.safetensors"), &vae[..100]).unwrap();
    let mut gone = Command::new("true").spawn().unwrap();
    let dead_pid = gone.id();
    gone.wait().unwrap();
    let staging = sgdm::util::temporary_path(&used, dead_pid, 0);
    std::fs::create_dir_all(staging.join("unet")).unwrap();
    assert_ok(&run(&dir.path().join("built_in_again"), &[]), "the built-in weights after damage");
    assert_eq!(std::fs::read(used.join("vae.safetensors")).unwrap(), vae, "the damaged unpacked weights were not restored");
    assert!(!staging.exists(), "a killed unpacking's folder was left");

    let from_env = dir.path().join("from_env");
    let r = run(&from_env, &[("SGDM_WEIGHTS", weights.as_os_str())]);
    assert_ok(&r, "SGDM_WEIGHTS");
    assert!(stderr(&r).contains("SGDM_WEIGHTS"), "{}", text(&r));
    assert_eq!(run_json(&from_env)["weights"].as_str().unwrap(), s(&std::fs::canonicalize(weights).unwrap()));

    copy_dir(weights, &bin_dir.join("weights"));
    let beside = dir.path().join("beside");
    let r = run(&beside, &[]);
    assert_ok(&r, "weights beside the executable");
    assert!(stderr(&r).contains("beside the executable"), "{}", text(&r));

    let r = run(&dir.path().join("missing"), &[("SGDM_WEIGHTS", dir.path().join("absent").as_os_str())]);
    assert_refused(&r, "SGDM_WEIGHTS naming no folder");
    assert!(stderr(&r).contains("SGDM_WEIGHTS") && stderr(&r).contains("absent"), "{}", text(&r));
}

// 5. One stage from a configuration that holds every stage.
#[test]
fn a_single_stage_trains_from_the_shipped_configuration_reading_only_its_own_table() {
    let (data, _) = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    let shipped = std::fs::read_to_string(common::repo_root().join("weights/train.toml")).unwrap();
    let mut config: toml::Table = toml::from_str(&shipped).unwrap();
    let vae = config["vae"].as_table_mut().unwrap();
    vae.insert("data".into(), toml::Value::String(s(data).into()));
    let train = vae["train"].as_table_mut().unwrap();
    for (key, value) in [("steps", 2), ("batch", 4), ("checkpoint_every", 2), ("warmup", 1)] {
        train.insert(key.into(), toml::Value::Integer(value));
    }
    let path = dir.path().join("train.toml");
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    let out = dir.path().join("vae");
    assert_ok(&sgdm(&["train", "vae", "--config", s(&path), "--out", s(&out)]), "sgdm train vae with every stage's table present");
    assert!(out.join("vae.safetensors").is_file());

    // A key that only `train all` fills in is named, with what to do.
    let run = sgdm(&["train", "encoder", "--config", s(&path), "--out", s(&dir.path().join("enc"))]);
    assert_refused(&run, "stage encoder without vae_weights");
    assert!(stderr(&run).contains("vae_weights") && stderr(&run).contains("train all"), "{}", text(&run));
}

// 6. Resume keyed on the EEG file's content, not its path.
#[test]
fn a_rerun_after_the_eeg_file_was_replaced_at_the_same_path_is_refused() {
    let (data, weights) = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    let eeg = dir.path().join("eeg.npy");
    let original = NpyFile::open(data.join("eeg/test.npy")).unwrap();
    let (shape, values) = (original.header.shape.clone(), original.to_f32().unwrap());
    write_f32(&eeg, &shape, &values).unwrap();
    let out = dir.path().join("out");
    assert_ok(&sgdm(&reconstruct_args(&eeg, weights, &out, &["--limit", "2"])), "the first run");
    // Another recording of the same shape at the same path.
    let other: Vec<f32> = values.iter().map(|v| -v).collect();
    write_f32(&eeg, &shape, &other).unwrap();
    let run = sgdm(&reconstruct_args(&eeg, weights, &out, &[]));
    assert_refused(&run, "a replaced EEG file");
    assert!(stderr(&run).contains("eeg.npy") && stderr(&run).contains("content"), "{}", text(&run));
    assert_eq!(manifest_lines(&out), 2, "the replaced file's items were added to the folder");
}

// 7. eval on a folder with items missing.
#[test]
fn eval_refuses_an_incomplete_folder_and_names_what_is_missing() {
    let (data, weights) = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    let recon = dir.path().join("recon");
    let mut args = reconstruct_args(&data.join("eeg/test.npy"), weights, &recon, &[]);
    args.extend(["--images".into(), s(&data.join("images/test")).into()]);
    assert_ok(&sgdm(&args), "reconstruct");
    std::fs::remove_file(recon.join("images/00003.png")).unwrap();
    let eval = |extra: &[&str]| {
        let out = dir.path().join("eval");
        let _ = std::fs::remove_dir_all(&out);
        let mut args = vec!["eval", "--recon", s(&recon), "--out", s(&out)];
        args.extend(extra);
        (sgdm(&args), out)
    };
    let (run, out) = eval(&[]);
    assert_refused(&run, "an incomplete folder");
    let err = stderr(&run);
    assert!(err.contains("1 of 6") && err.contains("missing: 3") && err.contains("--allow-incomplete"), "{err}");
    assert!(!out.join("metrics.json").exists());

    let (run, out) = eval(&["--allow-incomplete"]);
    assert_ok(&run, "--allow-incomplete");
    assert!(stderr(&run).contains("missing: 3"), "{}", text(&run));
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!((m["items"].as_u64(), m["missing"].as_array().map(Vec::len)), (Some(5), Some(1)), "{m}");

    // The first N items of a run made with --limit N.
    let (run, _) = eval(&["--items", "3"]);
    assert_ok(&run, "--items 3");
    assert!(String::from_utf8_lossy(&run.stdout).contains("3 items"), "{}", text(&run));
}

// 8. The smaller ones.
#[test]
fn a_directory_given_as_a_file_is_named_as_a_directory_once() {
    let (_, weights) = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("folder.npy");
    std::fs::create_dir_all(&folder).unwrap();
    let out = dir.path().join("out");
    for args in [
        vec!["data".to_string(), "inspect".into(), s(&folder).into()],
        reconstruct_args(&folder, weights, &out, &[]),
        vec!["train".into(), "vae".into(), "--config".into(), s(&folder).into(), "--out".into(), s(&out).into()],
        vec![
            "forward".into(),
            s(&common::repo_root().join("tests/fixtures/models/contrastive_alignment")).into(),
            "--inputs".into(),
            s(&folder).into(),
            "--output".into(),
            s(&dir.path().join("o.safetensors")).into(),
        ],
    ] {
        let run = sgdm(&args);
        assert_refused(&run, &format!("{args:?}"));
        let err = stderr(&run);
        assert!(err.contains("is a directory") && !err.contains("os error 19"), "{args:?}: {err}");
        assert_eq!(err.matches("is a directory").count(), 1, "{args:?}: said twice: {err}");
    }
}

#[test]
fn negative_numbers_are_read_as_numbers() {
    let (data, weights) = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    let eeg = data.join("eeg/test.npy");
    let run = sgdm(&reconstruct_args(&eeg, weights, &dir.path().join("a"), &["--guidance", "-1"]));
    assert_refused(&run, "--guidance -1");
    assert!(stderr(&run).contains("--guidance -1 must be"), "{}", text(&run));
    // A negative ControlNet scale pushes away from the structure map: allowed.
    assert_ok(
        &sgdm(&reconstruct_args(&eeg, weights, &dir.path().join("b"), &["--controlnet-scale", "-0.5", "--limit", "1"])),
        "--controlnet-scale -0.5",
    );
    let run = sgdm(&["synth", "--out", s(&dir.path().join("c")), "--snr", "-1"]);
    assert_refused(&run, "--snr -1");
    assert!(stderr(&run).contains("--snr"), "{}", text(&run));
}

#[test]
fn a_run_that_would_do_nothing_is_refused() {
    let (data, weights) = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    let run = sgdm(&reconstruct_args(&data.join("eeg/test.npy"), weights, &dir.path().join("a"), &["--limit", "0"]));
    assert_eq!(run.status.code(), Some(2), "--limit 0\n{}", text(&run));
    assert!(stderr(&run).contains("--limit"), "{}", text(&run));
    let empty = dir.path().join("empty.npy");
    write_f32(&empty, &[0, 1, 17, 100], &[]).unwrap();
    let out = dir.path().join("b");
    let run = sgdm(&reconstruct_args(&empty, weights, &out, &[]));
    assert_refused(&run, "an empty EEG file");
    assert!(stderr(&run).contains("empty.npy") && stderr(&run).contains("no EEG items"), "{}", text(&run));
    assert!(!out.exists());
}

#[test]
fn a_killed_writers_temporary_files_are_removed_on_resume() {
    let (data, weights) = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let eeg = data.join("eeg/test.npy");
    assert_ok(&sgdm(&reconstruct_args(&eeg, weights, &out, &["--limit", "1"])), "first run");
    // What a kill -9 during a write leaves: a temporary of a process that no longer exists.
    let mut gone = Command::new(sgdm_bin()).arg("--version").stdout(std::process::Stdio::null()).spawn().unwrap();
    let dead_pid = gone.id();
    gone.wait().unwrap();
    let stale = sgdm::util::temporary_path(&out.join("images/00001.png"), dead_pid, 0);
    std::fs::write(&stale, b"half a png").unwrap();
    assert!(stale.file_name().unwrap().to_str().unwrap().contains(".tmp-"));
    assert_ok(&sgdm(&reconstruct_args(&eeg, weights, &out, &["--limit", "2"])), "the resumed run");
    assert!(!stale.exists(), "{} survived the resume", stale.display());
}

#[test]
fn a_cuda_device_is_refused_by_commands_that_run_only_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    for args in [vec!["--device", "cuda", "synth", "--out", s(dir.path())], vec!["--device", "cuda", "data", "inspect", "x.npy"]] {
        let run = Command::new(sgdm_bin()).args(&args).output().unwrap();
        assert_refused(&run, &format!("{args:?}"));
        assert!(stderr(&run).contains("runs on the CPU only"), "{args:?}\n{}", text(&run));
    }
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "synth wrote before refusing");
}

#[test]
fn unknown_keys_in_our_own_configuration_files_are_refused_by_name() {
    let (data, weights) = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    for (file, key) in [("encoder_config.json", "lstm_hiden"), ("vae_config.json", "latentdim")] {
        let broken = dir.path().join(file);
        copy_dir(weights, &broken);
        let path = broken.join(file);
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        v[key] = serde_json::json!(3);
        std::fs::write(&path, v.to_string()).unwrap();
        let run = sgdm(&reconstruct_args(&data.join("eeg/test.npy"), &broken, &dir.path().join(format!("out-{file}")), &[]));
        assert_refused(&run, file);
        assert!(stderr(&run).contains(file) && stderr(&run).contains(&format!("'{key}'")), "{}", text(&run));
    }
    let mut config: toml::Table = toml::from_str(&common::tiny_train_config(data)).unwrap();
    config["base"]["vae_model"].as_table_mut().unwrap().insert("latent_channel".into(), toml::Value::Integer(4));
    let path = dir.path().join("train.toml");
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    let out = dir.path().join("train");
    let run = sgdm(&["train", "all", "--config", s(&path), "--out", s(&out)]);
    assert_refused(&run, "an unknown key in [base.vae_model]");
    assert!(stderr(&run).contains("'latent_channel'") && stderr(&run).contains("base.vae_model"), "{}", text(&run));
    assert!(!out.exists(), "train all wrote before refusing its configuration");
}

#[test]
fn synth_progress_rates_are_measured_from_the_start_of_each_split() {
    let dir = tempfile::tempdir().unwrap();
    let run = sgdm(&[
        "synth",
        "--out",
        s(dir.path()),
        "--train-figures",
        "8",
        "--val-figures",
        "4",
        "--test-figures",
        "4",
        "--train-reps",
        "1",
        "--val-reps",
        "1",
        "--test-reps",
        "1",
    ]);
    assert_ok(&run, "synth");
    let err = stderr(&run);
    let rates: Vec<f64> = err
        .lines()
        .filter_map(|l| l.split("  ").find(|part| part.ends_with("figures/s")).and_then(|p| p.trim_end_matches(" figures/s").trim().parse().ok()))
        .collect();
    assert!(!rates.is_empty(), "no progress line:\n{err}");
    // A figure is rendered, simulated and written as two fsynced PNGs: far slower than 100 000 a second.
    assert!(rates.iter().all(|r| *r < 1e5), "implausible progress rates {rates:?}:\n{err}");
}

#[test]
fn a_closed_stdout_ends_the_program_quietly() {
    let (data, _) = tiny_model();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let run = Command::new(sgdm_bin()).args(["data", "inspect", s(&data.join("eeg/test.npy"))]).stdout(writer).output().unwrap();
    assert_ne!(run.status.code(), Some(101), "{}", text(&run));
    assert!(!stderr(&run).contains("panicked") && !stderr(&run).contains("Broken pipe"), "{}", text(&run));
}

/// Every file of a folder, recursively, relative to it.
fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path.strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    out
}

/// What `train all` leaves as its result: each stage's final parameters and configuration files.
const TRAIN_ALL_RESULTS: [&str; 15] = [
    "base_vae.safetensors",
    "base_unet.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae.safetensors",
    "vae_config.json",
    "encoder.safetensors",
    "encoder_config.json",
    "eeg_standardization.json",
    "controlnet.safetensors",
    "controlnet/config.json",
    "controlnet/diffusion_pytorch_model.safetensors",
    "eeg_projector.safetensors",
];

#[test]
fn train_all_killed_at_random_points_and_resumed_ends_with_the_weights_of_an_uninterrupted_run() {
    use rand::{Rng, SeedableRng};
    let (data, _) = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    // Six steps a stage with a checkpoint every two, so kills land between checkpoints, in validation,
    // while checkpoints and final outputs are written, and between stages.
    let config = common::tiny_train_config(data).replace("steps = 5", "steps = 6").replace("checkpoint_every = 5", "checkpoint_every = 2");
    let config_path = dir.path().join("train.toml");
    std::fs::write(&config_path, config).unwrap();
    let train_all = |out: &Path| {
        let mut cmd = Command::new(sgdm_bin());
        cmd.args(["--device", "cpu", "train", "all", "--config", s(&config_path), "--out", s(out)]);
        cmd
    };

    let straight = dir.path().join("straight");
    let start = std::time::Instant::now();
    assert_ok(&train_all(&straight).output().unwrap(), "the uninterrupted run");
    let duration = start.elapsed();

    // SIGKILL (Child::kill) at random times up to half a whole run's length after each start, so most runs
    // are killed; each resumes the last. SGDM_KILL_SEED chooses other times.
    let seed: u64 = std::env::var("SGDM_KILL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(17);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let killed = dir.path().join("killed");
    let mut kills = Vec::new();
    for _ in 0..8 {
        let mut child = train_all(&killed).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap();
        let at = duration.mul_f64(rng.random_range(0.05..0.5));
        std::thread::sleep(at);
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "a resumed run failed: {}", String::from_utf8_lossy(&out.stderr));
            break;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills.push(format!("{:.2}s", at.as_secs_f64()));
    }
    println!("seed {seed}: an uninterrupted run takes {:.2}s; killed at {}", duration.as_secs_f64(), kills.join(", "));
    assert!(!kills.is_empty(), "no run was killed: every kill time fell past its run's end");
    let last = train_all(&killed).output().unwrap();
    assert_ok(&last, "the final resumed run");

    for file in TRAIN_ALL_RESULTS {
        let (a, b) = (std::fs::read(straight.join(file)), std::fs::read(killed.join(file)));
        let (a, b) = (
            a.unwrap_or_else(|e| panic!("the uninterrupted run has no {file}: {e}")),
            b.unwrap_or_else(|e| panic!("the killed run has no {file}: {e}")),
        );
        assert!(a == b, "{file} differs from the uninterrupted run's after kills at {kills:?} (seed {seed})");
    }
    let leftovers: Vec<_> = files_under(&killed).into_iter().filter(|p| p.to_string_lossy().contains(".tmp-")).collect();
    assert!(leftovers.is_empty(), "temporary files of killed writers survived the resumes: {leftovers:?}");
}

/// A broken stand-in for a file: bytes, or a directory where the file should be.
enum Broken {
    Bytes(Vec<u8>),
    Directory,
}

/// How a file is broken, and the broken file.
type Variant = (String, Broken);

/// What every kind of file can suffer: nothing in it, noise, a cut in half, a directory in its place.
fn generic_variants(valid: &[u8]) -> Vec<Variant> {
    let noise: Vec<u8> = (0..257u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    vec![
        ("empty".into(), Broken::Bytes(Vec::new())),
        ("noise".into(), Broken::Bytes(noise)),
        ("half".into(), Broken::Bytes(valid[..valid.len() / 2].to_vec())),
        ("directory".into(), Broken::Directory),
    ]
}

/// A `.npy` file with this header dict and data, as numpy writes one (version 1, header padded to 64).
fn npy(dict: &str, data: &[u8]) -> Vec<u8> {
    let mut header = dict.to_string();
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(data);
    out
}

/// EEG files broken in the ways the format allows, beside the generic ones.
fn eeg_variants(valid: &[u8]) -> Vec<Variant> {
    let fixtures = common::repo_root().join("tests/fixtures/data");
    let four_f32 = [0u8; 16];
    let mut v = generic_variants(valid);
    v.extend([
        ("shape beyond the data".into(), Broken::Bytes(npy("{'descr': '<f4', 'fortran_order': False, 'shape': (1000, 17, 100), }", &four_f32))),
        ("petabyte shape".into(), Broken::Bytes(npy("{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000000, 17, 100), }", &four_f32))),
        (
            "overflowing shape".into(),
            Broken::Bytes(npy("{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296, 4294967296), }", &four_f32)),
        ),
        ("rank 1".into(), Broken::Bytes(npy("{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }", &four_f32))),
        ("int64".into(), Broken::Bytes(npy("{'descr': '<i8', 'fortran_order': False, 'shape': (2,), }", &four_f32))),
        ("header cut".into(), Broken::Bytes(npy("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 17, 100), }", &[])[..40].to_vec())),
        ("no rows".into(), Broken::Bytes(npy("{'descr': '<f4', 'fortran_order': False, 'shape': (0, 17, 100), }", &[]))),
    ]);
    for fixture in ["nan.npy", "fortran.npy", "hostile_os_system.npy", "things_np1.npy"] {
        let bytes = std::fs::read(fixtures.join(fixture)).unwrap();
        if fixture == "things_np1.npy" {
            v.push(("THINGS dict cut short".into(), Broken::Bytes(bytes[..bytes.len() - 40].to_vec())));
        } else {
            v.push((fixture.into(), Broken::Bytes(bytes)));
        }
    }
    v
}

/// A safetensors file with this header and data.
fn safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header.as_bytes());
    out.extend(data);
    out
}

fn safetensors_variants(valid: &[u8]) -> Vec<Variant> {
    let mut v = generic_variants(valid);
    let mut huge = u64::MAX.to_le_bytes().to_vec();
    huge.extend(b"{}");
    let mut nan = valid.to_vec();
    let header_len = u64::from_le_bytes(valid[..8].try_into().unwrap()) as usize;
    // The first value of the data section; every tensor here is f32.
    nan[8 + header_len..8 + header_len + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    v.extend([
        ("header length past the end".into(), Broken::Bytes(huge)),
        ("header not JSON".into(), Broken::Bytes(safetensors("{not json", &[]))),
        ("offsets past the data".into(), Broken::Bytes(safetensors(r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,1000]}}"#, &[0; 16]))),
        (
            "shape overflowing".into(),
            Broken::Bytes(safetensors(r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,16]}}"#, &[0; 16])),
        ),
        ("int64 tensor".into(), Broken::Bytes(safetensors(r#"{"w":{"dtype":"I64","shape":[2],"data_offsets":[0,16]}}"#, &[0; 16]))),
        ("a NaN value".into(), Broken::Bytes(nan)),
    ]);
    v
}

fn json_variants(valid: &[u8]) -> Vec<Variant> {
    let mut v = generic_variants(valid);
    for (what, text) in
        [("unclosed", "{"), ("a list", "[]"), ("null", "null"), ("numbers as text", r#"{"latent_dim": "8", "channels": "many", "mean": "x"}"#)]
    {
        v.push((what.into(), Broken::Bytes(text.as_bytes().to_vec())));
    }
    v
}

fn png_variants(valid: &[u8]) -> Vec<Variant> {
    let mut v = generic_variants(valid);
    // A valid signature and IHDR claiming 100000 x 100000 pixels, then nothing.
    let mut huge = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR".to_vec();
    huge.extend(100_000u32.to_be_bytes());
    huge.extend(100_000u32.to_be_bytes());
    huge.extend([8, 2, 0, 0, 0, 0, 0, 0, 0]);
    v.push(("claims 10^10 pixels".into(), Broken::Bytes(huge)));
    v
}

/// Puts `variant` at `path` (replacing what is there).
fn plant(path: &Path, variant: &Broken) {
    if path.is_dir() {
        std::fs::remove_dir_all(path).unwrap();
    } else if path.exists() {
        std::fs::remove_file(path).unwrap();
    }
    match variant {
        Broken::Bytes(b) => std::fs::write(path, b).unwrap(),
        Broken::Directory => std::fs::create_dir_all(path).unwrap(),
    }
}

/// A run on broken input: never a panic (exit 101) or a signal; with `must_fail`, exit status 1.
fn assert_handled(run: &Output, what: &str, must_fail: bool) {
    let code = run.status.code();
    assert!(code.is_some(), "{what}: killed by a signal\n{}", text(run));
    assert_ne!(code, Some(101), "{what}: panicked\n{}", text(run));
    assert!(!stderr(run).contains("panicked"), "{what}: panicked\n{}", text(run));
    if must_fail {
        assert_eq!(code, Some(1), "{what}: accepted\n{}", text(run));
    }
}

#[test]
fn broken_eeg_files_are_refused_by_inspect_and_reconstruct_with_nothing_marked_finished() {
    let (data, weights) = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    let valid = std::fs::read(data.join("eeg/test.npy")).unwrap();
    for (k, (what, variant)) in eeg_variants(&valid).iter().enumerate() {
        let file = dir.path().join(format!("eeg{k}.npy"));
        plant(&file, variant);
        // inspect shows what a file holds, NaN included: it may succeed, never panic.
        assert_handled(&sgdm(&["data", "inspect", s(&file)]), &format!("data inspect of an EEG file: {what}"), false);
        let out = dir.path().join(format!("out{k}"));
        let run = sgdm(&reconstruct_args(&file, weights, &out, &[]));
        assert_handled(&run, &format!("reconstruct from an EEG file: {what}"), true);
        assert_eq!(manifest_lines(&out), 0, "reconstruct from an EEG file ({what}) marked items finished");
        let (eval_out, recon) = (dir.path().join(format!("eval{k}")), dir.path().join("good"));
        if k == 0 {
            assert_ok(&sgdm(&reconstruct_args(&data.join("eeg/test.npy"), weights, &recon, &[])), "the reconstruction eval reads");
        }
        let run = sgdm(&["eval", "--recon", s(&recon), "--eeg", s(&file), "--images", s(&data.join("images/test")), "--out", s(&eval_out)]);
        assert_handled(&run, &format!("eval with an EEG file: {what}"), true);
        assert!(!eval_out.join("metrics.json").exists(), "eval with a broken EEG file ({what}) wrote metrics");
    }
}

#[test]
fn broken_things_eeg2_sources_are_refused_by_the_importer_with_nothing_written() {
    use common::things::{image_folder, subject_folder, times, Layout, CHANNELS};
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("image_set");
    let names = image_folder(&images, "training_images", 3, 2, 1);
    image_folder(&images, "test_images", 2, 1, 4);
    let subject = dir.path().join("sub-01");
    subject_folder(&subject, Layout::NpSave, [6, 2, 17, 100], [2, 2, 17, 100], &CHANNELS, &times(-0.2, 100.0, 100), 1);
    let import = |out: &Path| sgdm(&["data", "import", "things-eeg2", "--eeg-dir", s(&subject), "--images-dir", s(&images), "--out", s(out)]);
    let training = subject.join("preprocessed_eeg_training.npy");
    let valid = std::fs::read(&training).unwrap();
    for (k, (what, variant)) in eeg_variants(&valid).iter().enumerate() {
        plant(&training, variant);
        let out = dir.path().join(format!("eeg{k}"));
        assert_handled(&import(&out), &format!("import with a training EEG file: {what}"), true);
        assert!(!out.exists(), "import with a broken EEG file ({what}) wrote {}", out.display());
    }
    plant(&training, &Broken::Bytes(valid));
    let image = images.join("training_images").join(&names[3]);
    for (k, (what, variant)) in png_variants(&std::fs::read(&image).unwrap()).iter().enumerate() {
        plant(&image, variant);
        let out = dir.path().join(format!("image{k}"));
        assert_handled(&import(&out), &format!("import with a training image: {what}"), true);
        assert!(!out.exists(), "import with a broken image ({what}) wrote {}", out.display());
    }
}

#[test]
fn a_weights_folder_with_any_file_broken_is_refused_before_anything_is_written() {
    let (data, weights) = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    let eeg = data.join("eeg/test.npy");
    let files = [
        "vae.safetensors",
        "vae_config.json",
        "encoder.safetensors",
        "encoder_config.json",
        "eeg_standardization.json",
        "eeg_projector.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "controlnet/config.json",
        "controlnet/diffusion_pytorch_model.safetensors",
    ];
    let mut runs = 0;
    for file in files {
        let valid = std::fs::read(weights.join(file)).unwrap();
        let mut variants = if file.ends_with(".json") { json_variants(&valid) } else { safetensors_variants(&valid) };
        if file.ends_with("config.json") && file != "controlnet/config.json" {
            // Components' folders mixed up: a ControlNet's config made UNet::new index its missing up blocks.
            variants.push(("another component's config".into(), Broken::Bytes(std::fs::read(weights.join("controlnet/config.json")).unwrap())));
        }
        for (k, (what, variant)) in variants.iter().enumerate() {
            let broken = dir.path().join("weights");
            let _ = std::fs::remove_dir_all(&broken);
            copy_dir(weights, &broken);
            plant(&broken.join(file), variant);
            let out = dir.path().join(format!("out-{}-{k}", file.replace('/', "_")));
            let run = sgdm(&reconstruct_args(&eeg, &broken, &out, &[]));
            assert_handled(&run, &format!("reconstruct with {file}: {what}"), true);
            assert!(!out.exists(), "reconstruct with {file} ({what}) wrote {} before refusing", out.display());
            runs += 1;
        }
    }
    // The other commands that load a weights folder, on one broken file each.
    let broken = dir.path().join("weights");
    let _ = std::fs::remove_dir_all(&broken);
    copy_dir(weights, &broken);
    plant(&broken.join("unet/diffusion_pytorch_model.safetensors"), &Broken::Bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}".to_vec()));
    let demo = dir.path().join("demo");
    let run = sgdm(&["demo", "--weights", s(&broken), "--out", s(&demo), "--items", "2", "--steps", "1"]);
    assert_handled(&run, "demo with broken weights", true);
    assert!(!demo.exists(), "demo wrote {} before refusing its weights", demo.display());
    assert_handled(&sgdm(&["profile", "--weights", s(&broken), "--steps", "1"]), "profile with broken weights", true);
    println!("{runs} broken weights folders refused");
}

#[test]
fn a_broken_reconstruction_folder_is_refused_by_eval_with_no_metrics_written() {
    let (data, weights) = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    let mut args = reconstruct_args(&data.join("eeg/test.npy"), weights, &good, &[]);
    args.extend(["--images".into(), s(&data.join("images/test")).into()]);
    assert_ok(&sgdm(&args), "reconstruct");
    let cases: Vec<(&str, Vec<Variant>)> = vec![
        ("run.json", json_variants(&std::fs::read(good.join("run.json")).unwrap())),
        ("manifest.jsonl", generic_variants(&std::fs::read(good.join("manifest.jsonl")).unwrap())),
        ("images/00002.png", png_variants(&std::fs::read(good.join("images/00002.png")).unwrap())),
        // structure/*.png are not among eval's inputs: it predicts the structure maps from the EEG again
        // (and scores those), so a broken one there changes nothing it reports.
    ];
    for (file, variants) in cases {
        for (k, (what, variant)) in variants.iter().enumerate() {
            let recon = dir.path().join("recon");
            let _ = std::fs::remove_dir_all(&recon);
            copy_dir(&good, &recon);
            plant(&recon.join(file), variant);
            let out = dir.path().join(format!("eval-{}-{k}", file.replace('/', "_")));
            let run = sgdm(&["eval", "--recon", s(&recon), "--weights", s(weights), "--out", s(&out)]);
            assert_handled(&run, &format!("eval with {file}: {what}"), true);
            assert!(!out.join("metrics.json").exists(), "eval with {file} ({what}) wrote metrics.json");
        }
    }
    // A seen image broken in the folder eval reads them from.
    for (k, (what, variant)) in png_variants(&std::fs::read(data.join("images/test/00001.png")).unwrap()).iter().enumerate() {
        let images = dir.path().join("images");
        let _ = std::fs::remove_dir_all(&images);
        copy_dir(&data.join("images/test"), &images);
        plant(&images.join("00001.png"), variant);
        let out = dir.path().join(format!("eval-seen-{k}"));
        let run = sgdm(&["eval", "--recon", s(&good), "--images", s(&images), "--out", s(&out)]);
        assert_handled(&run, &format!("eval with a seen image: {what}"), true);
        assert!(!out.join("metrics.json").exists(), "eval with a broken seen image ({what}) wrote metrics.json");
    }
}

#[test]
fn broken_training_configurations_and_datasets_are_refused_with_no_stage_output() {
    let (data, weights) = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    let full: toml::Table = toml::from_str(&common::tiny_train_config(data)).unwrap();
    let only = |stage: &str, data: &Path| -> String {
        let mut table = full[stage].as_table().unwrap().clone();
        table.insert("data".into(), toml::Value::String(s(data).into()));
        if stage == "encoder" {
            table.insert("vae_weights".into(), toml::Value::String(s(&weights.join("vae.safetensors")).into()));
        }
        toml::to_string(&toml::Table::from_iter([(stage.to_string(), toml::Value::Table(table))])).unwrap()
    };
    // The configuration itself.
    let valid = only("vae", data);
    let mut variants = generic_variants(valid.as_bytes());
    for (what, text) in [
        ("unclosed table", "[vae\nbeta = 1".to_string()),
        ("a number as text", valid.replace("beta = 0.001", "beta = \"small\"")),
        ("negative steps", valid.replace("steps = 5", "steps = -5")),
        ("zero steps", valid.replace("steps = 5", "steps = 0")),
        ("a huge batch", valid.replace("batch = 8", "batch = 100000000000")),
        ("zero image size", valid.replace("image_size = 32", "image_size = 0")),
    ] {
        assert!(what == "unclosed table" || text != valid, "{what}: the replacement matched nothing in\n{valid}");
        variants.push((what.into(), Broken::Bytes(text.into_bytes())));
    }
    for (k, (what, variant)) in variants.iter().enumerate() {
        let config = dir.path().join(format!("config{k}.toml"));
        plant(&config, variant);
        let out = dir.path().join(format!("out-config-{k}"));
        let run = sgdm(&["train", "vae", "--config", s(&config), "--out", s(&out)]);
        assert_handled(&run, &format!("train vae with a configuration: {what}"), true);
        assert!(!out.join("vae.safetensors").exists(), "train vae with a configuration ({what}) wrote its parameters");
    }
    // The dataset's files, for the stages that read them.
    let cases: Vec<(&str, &str, Vec<Variant>)> = vec![
        ("vae", "manifest.json", json_variants(&std::fs::read(data.join("manifest.json")).unwrap())),
        ("vae", "images/train/00003.png", png_variants(&std::fs::read(data.join("images/train/00003.png")).unwrap())),
        ("vae", "edges16/val.npy", eeg_variants(&std::fs::read(data.join("edges16/val.npy")).unwrap())),
        ("encoder", "eeg/train.npy", eeg_variants(&std::fs::read(data.join("eeg/train.npy")).unwrap())),
    ];
    for (stage, file, variants) in cases {
        for (k, (what, variant)) in variants.iter().enumerate() {
            let copy = dir.path().join("data");
            let _ = std::fs::remove_dir_all(&copy);
            copy_dir(data, &copy);
            plant(&copy.join(file), variant);
            let config = dir.path().join("stage.toml");
            std::fs::write(&config, only(stage, &copy)).unwrap();
            let out = dir.path().join(format!("out-{stage}-{}-{k}", file.replace('/', "_")));
            let run = sgdm(&["train", stage, "--config", s(&config), "--out", s(&out)]);
            assert_handled(&run, &format!("train {stage} with {file}: {what}"), true);
            assert!(!out.join(format!("{stage}.safetensors")).exists(), "train {stage} with {file} ({what}) wrote its parameters");
        }
    }
}

#[test]
fn sgdm_forward_refuses_broken_inputs_configs_and_weights_with_no_output() {
    let fixture = common::repo_root().join("tests/fixtures/models/structural_vae_tiny");
    let dir = tempfile::tempdir().unwrap();
    let inputs = std::fs::read(fixture.join("inputs.safetensors")).unwrap();
    let cases: Vec<(&str, Vec<Variant>)> = vec![
        ("inputs.safetensors", safetensors_variants(&inputs).into_iter().filter(|(what, _)| what != "a NaN value").collect()),
        ("config.json", json_variants(&std::fs::read(fixture.join("config.json")).unwrap())),
        ("model.safetensors", safetensors_variants(&std::fs::read(fixture.join("model.safetensors")).unwrap())),
    ];
    for (file, variants) in cases {
        for (k, (what, variant)) in variants.iter().enumerate() {
            let model = dir.path().join("model");
            let _ = std::fs::remove_dir_all(&model);
            copy_dir(&fixture, &model);
            plant(&model.join(file), variant);
            let output = dir.path().join(format!("out-{file}-{k}.safetensors"));
            let run = sgdm(&["forward", s(&model), "--inputs", s(&model.join("inputs.safetensors")), "--output", s(&output)]);
            assert_handled(&run, &format!("forward with {file}: {what}"), true);
            assert!(!output.exists(), "forward with {file} ({what}) wrote its output");
        }
    }
}

/// Found by trying sizes beyond the corpus: values that aborted the process on a failed allocation (exit
/// 134, no message but the allocator's) or divided by zero are refused up front, by name.
#[test]
fn sizes_that_would_abort_on_allocation_are_refused_with_a_message() {
    let (data, weights) = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    for flag in ["--train-figures", "--train-reps"] {
        let run = sgdm(&["synth", "--out", s(&dir.path().join("synth")), flag, "100000000000"]);
        assert_refused(&run, flag);
        assert!(stderr(&run).contains("over the limits"), "{}", text(&run));
    }
    for (file, key, value, needle) in [
        ("unet/config.json", "sample_size", serde_json::json!(100000), "'sample_size' 100000"),
        ("vae/config.json", "scaling_factor", serde_json::json!(0.0), "'scaling_factor' must be a positive number"),
    ] {
        let broken = dir.path().join(key);
        copy_dir(weights, &broken);
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(broken.join(file)).unwrap()).unwrap();
        v[key] = value;
        std::fs::write(broken.join(file), v.to_string()).unwrap();
        let out = dir.path().join(format!("out-{key}"));
        let run = sgdm(&reconstruct_args(&data.join("eeg/test.npy"), &broken, &out, &[]));
        assert_refused(&run, &format!("{file} {key}"));
        assert!(stderr(&run).contains(needle), "{}", text(&run));
        assert!(!out.exists());
    }
    let mut config: toml::Table = toml::from_str(&common::tiny_train_config(data)).unwrap();
    let mut vae = config.remove("vae").unwrap();
    vae["model"].as_table_mut().unwrap().insert("image_size".into(), toml::Value::Integer(64000));
    let path = dir.path().join("vae.toml");
    std::fs::write(&path, toml::to_string(&toml::Table::from_iter([("vae".to_string(), vae)])).unwrap()).unwrap();
    let run = sgdm(&["train", "vae", "--config", s(&path), "--out", s(&dir.path().join("train"))]);
    assert_refused(&run, "image_size 64000");
    assert!(stderr(&run).contains("model.image_size 64000"), "{}", text(&run));
}
