//! `sgdm data import things-eeg2` on THINGS-shaped folders written here (a few concepts of tiny JPEG and PNG
//! images, EEG in the official np.save layout and in the NICE/ATM pickle layout): THINGS order, validation
//! carved from whole training concepts, pooled subjects, structure targets by synth's extraction, source
//! checksums; and every refusal, each naming the file, before anything is written.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::run_sgdm;
use common::things::{image_folder, subject_folder, times, Layout, CHANNELS};
use sgdm::data::dataset::Manifest;
use sgdm::data::eeg::{EegData, Repetitions};
use sgdm::data::npy::NpyFile;
use sgdm::data::structure::StructureMaps;
use sha2::Digest;

/// 6 training concepts of 3 images, 4 test concepts of 1, and two subjects: sub-01 in the official layout
/// (2 training and 3 test repetitions), sub-02 in the NICE/ATM layout (1 and 2).
struct Source {
    _dir: tempfile::TempDir,
    images: PathBuf,
    subjects: [PathBuf; 2],
    train_names: Vec<String>,
    test_names: Vec<String>,
}

fn source() -> Source {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("image_set");
    let train_names = image_folder(&images, "training_images", 6, 3, 1);
    let test_names = image_folder(&images, "test_images", 4, 1, 7);
    let t = times(-0.2, 100.0, 100);
    let subjects = [dir.path().join("sub-01"), dir.path().join("sub-02")];
    subject_folder(&subjects[0], Layout::NpSave, [18, 2, 17, 100], [4, 3, 17, 100], &CHANNELS, &t, 1);
    subject_folder(&subjects[1], Layout::PickleDump, [18, 1, 17, 100], [4, 2, 17, 100], &CHANNELS, &t, 3);
    Source { _dir: dir, images, subjects, train_names, test_names }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn import_args<'a>(src: &'a Source, out: &'a Path, subjects: &'a [PathBuf], extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["data", "import", "things-eeg2", "--images-dir", s(&src.images), "--out", s(out)];
    for subject in subjects {
        args.extend(["--eeg-dir", s(subject)]);
    }
    args.extend_from_slice(extra);
    args
}

fn sha256(path: &Path) -> String {
    sha2::Sha256::digest(std::fs::read(path).unwrap()).iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn import_pairs_rows_with_images_in_things_order_and_carves_validation_from_whole_concepts() {
    let src = source();
    let out = src.images.parent().unwrap().join("dataset");
    let (ok, stdout, stderr) = run_sgdm(import_args(&src, &out, &src.subjects, &["--val-concepts", "2", "--seed", "3", "--image-size", "32"]));
    assert!(ok, "import failed:\n{stdout}\n{stderr}");
    assert!(stderr.contains("checking EEG: 4/4") && stderr.contains("writing train images: 12/12"), "progress lines:\n{stderr}");
    assert!(stdout.contains("wrote 12 train, 6 val and 4 test images"), "{stdout}");
    let m = Manifest::read(&out).unwrap();
    assert_eq!((m.generator.as_str(), m.seed, m.snr), ("sgdm data import things-eeg2", 3, None));
    assert_eq!((m.ch_names.len(), m.ch_names[11].as_str(), m.sampling_rate_hz, m.image_size, m.edge_size), (17, "POz", 100.0, 32, 16));
    assert_eq!((m.times[0], m.times.len()), (-0.2, 100));
    let split = |name: &str| m.splits.iter().find(|sp| sp.name == name).unwrap();
    let (train, val, test) = (split("train"), split("val"), split("test"));
    assert_eq!((train.figures, val.figures, test.figures), (12, 6, 4));
    assert_eq!((train.repetitions, test.repetitions), (3, 5), "two subjects' repetitions pooled");

    // Validation is two whole concepts, none of them in train; both keep THINGS order.
    let val_concepts: BTreeSet<&String> = val.concepts.iter().collect();
    let train_concepts: BTreeSet<&String> = train.concepts.iter().collect();
    assert_eq!((val_concepts.len(), train_concepts.len()), (2, 4));
    assert!(val_concepts.is_disjoint(&train_concepts));
    for sp in [train, val, test] {
        let mut sorted = sp.images.clone();
        sorted.sort();
        assert_eq!(sp.images, sorted, "split {} is not in THINGS order", sp.name);
    }

    // Every row holds its image's EEG: subject 1's repetitions, then subject 2's.
    let sub1 = EegData::open(src.subjects[0].join("preprocessed_eeg_training.npy"), Repetitions::Keep).unwrap();
    let sub2 = EegData::open(src.subjects[1].join("preprocessed_eeg_training.npy"), Repetitions::Keep).unwrap();
    let per = 17 * 100;
    for sp in [train, val] {
        let eeg = NpyFile::open(out.join(&sp.eeg)).unwrap();
        assert_eq!(eeg.header.shape, [sp.figures, 3, 17, 100]);
        let values = eeg.to_f32().unwrap();
        for (k, image) in sp.images.iter().enumerate() {
            let source_name = image.split_once('/').unwrap().1.split_once('/').unwrap().1;
            let stem = Path::new(source_name).file_stem().unwrap().to_str().unwrap();
            let row = src.train_names.iter().position(|n| n.contains(&format!("/{stem}."))).unwrap();
            let got = &values[k * 3 * per..(k + 1) * 3 * per];
            assert_eq!(got[..2 * per], sub1.data[row * 2 * per..(row + 1) * 2 * per], "{} row {k}", sp.name);
            assert_eq!(got[2 * per..], sub2.data[row * per..(row + 1) * per], "{} row {k}", sp.name);
        }
    }
    assert_eq!(test.images.len(), src.test_names.len());

    // Images at --image-size; structure targets are synth's extraction of the source image.
    let first = image::open(out.join(&val.images[0])).unwrap();
    assert_eq!((first.width(), first.height()), (32, 32));
    let edges = NpyFile::open(out.join(&test.edges16)).unwrap();
    assert_eq!(edges.header.shape, [4, 16, 16]);
    let source_image = image::open(src.images.join("test_images").join(&src.test_names[2])).unwrap().to_rgb8();
    assert_eq!(edges.to_f32().unwrap()[2 * 256..3 * 256], StructureMaps::from_image(&source_image).edges16);
    assert!(out.join(&test.structure[2]).is_file());

    // Every source EEG file by its SHA-256; the image folders by a digest over their files.
    let file = src.subjects[1].join("preprocessed_eeg_test.npy");
    let recorded = m.sources.iter().find(|f| Path::new(&f.path) == std::fs::canonicalize(&file).unwrap()).unwrap();
    assert_eq!(recorded.sha256, sha256(&file));
    assert!(recorded.role.contains("test EEG, subject 2 of 2"), "{}", recorded.role);
    assert_eq!(m.sources.len(), 6);

    // The same seed carves the same concepts; the dataset is reproducible byte for byte.
    let again = src.images.parent().unwrap().join("again");
    let (ok, _, stderr) = run_sgdm(import_args(&src, &again, &src.subjects, &["--val-concepts", "2", "--seed", "3", "--image-size", "32"]));
    assert!(ok, "{stderr}");
    for f in ["manifest.json", "eeg/val.npy", "edges16/train.npy"] {
        let (a, b) = (std::fs::read(out.join(f)).unwrap(), std::fs::read(again.join(f)).unwrap());
        assert!(a == b, "{f} differs between two imports of the same sources");
    }
}

/// Runs an import expected to be refused; returns its stderr after checking exit status 1 and that the
/// output folder was not created.
fn refused(what: &str, args: Vec<&str>, out: &Path) -> String {
    let output = std::process::Command::new(common::sgdm_bin()).args(&args).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(1), "{what}: not refused with exit status 1:\n{stderr}");
    assert!(!out.exists(), "{what}: the refused import wrote {}", out.display());
    stderr
}

#[test]
fn every_bad_input_is_refused_by_name_before_anything_is_written() {
    let src = source();
    let root = src.images.parent().unwrap().to_path_buf();
    let out = root.join("never");
    let one = [src.subjects[0].clone()];
    let train = src.images.join("training_images");

    // EEG rows that do not pair with the images: a whole concept folder moved away.
    let moved = root.join("moved");
    std::fs::rename(train.join("00006_c6"), &moved).unwrap();
    let e = refused("rows != images", import_args(&src, &out, &one, &[]), &out);
    assert!(e.contains("preprocessed_eeg_training.npy has 18 EEG rows") && e.contains("15 images in 5 concepts"), "{e}");
    std::fs::rename(&moved, train.join("00006_c6")).unwrap();

    // A concept with another number of images than the others.
    let lone = train.join("00002_c2").join(src.train_names[4].split_once('/').unwrap().1);
    let kept = std::fs::read(&lone).unwrap();
    std::fs::remove_file(&lone).unwrap();
    let e = refused("a short concept", import_args(&src, &out, &one, &[]), &out);
    assert!(e.contains("00002_c2: holds 2 image(s), but 5 of the 6 training concepts hold 3"), "{e}");

    // Duplicate names: the missing image's place taken by a copy named like an image of concept 1.
    let twin = train.join("00002_c2").join("C1_00B.png");
    std::fs::copy(train.join("00001_c1/c1_00b.jpg"), &twin).unwrap();
    let e = refused("a duplicate name", import_args(&src, &out, &one, &[]), &out);
    assert!(e.contains("C1_00B.png: has the same name as") && e.contains("c1_00b.jpg"), "{e}");
    std::fs::remove_file(&twin).unwrap();

    // An unreadable image in its place.
    std::fs::write(&lone, b"\xff\xd8\xff not really a JPEG").unwrap();
    let e = refused("an unreadable image", import_args(&src, &out, &one, &[]), &out);
    assert!(e.contains(&format!("{}: corrupt or truncated image", lone.display())), "{e}");
    std::fs::write(&lone, &kept).unwrap();

    // A test concept that is also a training concept.
    let test_concept = src.images.join("test_images/00007_c7");
    std::fs::rename(&test_concept, src.images.join("test_images/00001_c1")).unwrap();
    let e = refused("a shared concept", import_args(&src, &out, &one, &[]), &out);
    assert!(e.contains("concept '00001_c1' is also a training concept"), "{e}");
    std::fs::rename(src.images.join("test_images/00001_c1"), &test_concept).unwrap();

    // NaN and Inf in the EEG, with the first index.
    let bad_eeg = root.join("sub-nan");
    let mut values = common::things::eeg_values([18, 2, 17, 100], 1);
    values[(5 * 2 + 1) * 1700 + 3 * 100 + 7] = f32::NAN;
    values[(9 * 2) * 1700] = f32::INFINITY;
    std::fs::create_dir_all(&bad_eeg).unwrap();
    let t = times(-0.2, 100.0, 100);
    std::fs::write(
        bad_eeg.join("preprocessed_eeg_training.npy"),
        common::things::eeg_dict_file(Layout::NpSave, [18, 2, 17, 100], &values, &CHANNELS, &t),
    )
    .unwrap();
    std::fs::copy(src.subjects[0].join("preprocessed_eeg_test.npy"), bad_eeg.join("preprocessed_eeg_test.npy")).unwrap();
    let e = refused("NaN in the EEG", import_args(&src, &out, std::slice::from_ref(&bad_eeg), &[]), &out);
    assert!(e.contains("sub-nan/preprocessed_eeg_training.npy: 2 non-finite value(s)") && e.contains("[5, 1, 3, 7]"), "{e}");

    // Subjects whose channels differ (reordered), or whose time axes differ.
    let reordered = root.join("sub-reordered");
    let mut names = CHANNELS;
    names.swap(0, 1);
    subject_folder(&reordered, Layout::PickleDump, [18, 1, 17, 100], [4, 1, 17, 100], &names, &t, 5);
    let e = refused("reordered channels", import_args(&src, &out, &[one[0].clone(), reordered.clone()], &[]), &out);
    assert!(e.contains("sub-reordered/preprocessed_eeg_training.npy: its channels differ") && e.contains("position 0: P5 here, P7 there"), "{e}");
    let resampled = root.join("sub-250hz");
    subject_folder(&resampled, Layout::PickleDump, [18, 1, 17, 100], [4, 1, 17, 100], &CHANNELS, &times(0.0, 250.0, 100), 5);
    let e = refused("another time axis", import_args(&src, &out, &[one[0].clone(), resampled], &[]), &out);
    assert!(e.contains("sub-250hz/preprocessed_eeg_training.npy: sample 0 is at 0 s"), "{e}");

    // A plain array in place of the dict, and a missing file.
    let plain = root.join("sub-plain");
    std::fs::create_dir_all(&plain).unwrap();
    sgdm::data::npy::write_f32(
        plain.join("preprocessed_eeg_training.npy"),
        &[18, 2, 17, 100],
        &values.iter().map(|v| if v.is_finite() { *v } else { 0.0 }).collect::<Vec<_>>(),
    )
    .unwrap();
    let e = refused("a plain array", import_args(&src, &out, std::slice::from_ref(&plain), &[]), &out);
    assert!(e.contains("sub-plain/preprocessed_eeg_training.npy: a plain numeric array"), "{e}");
    let e = refused("a missing file", import_args(&src, &out, &[root.join("sub-absent")], &[]), &out);
    assert!(e.contains("sub-absent/preprocessed_eeg_training.npy: cannot open"), "{e}");
    let e = refused("no image set", vec!["data", "import", "things-eeg2", "--images-dir", s(&root), "--eeg-dir", s(&one[0]), "--out", s(&out)], &out);
    assert!(e.contains("training_images: not a directory") && e.contains("expected THINGS-EEG2's image set"), "{e}");

    // Validation must leave training concepts; the image size must be sensible.
    let e = refused("all concepts to val", import_args(&src, &out, &one, &["--val-concepts", "6"]), &out);
    assert!(e.contains("--val-concepts 6") && e.contains("holds 6 training concept(s)"), "{e}");
    let e = refused("--image-size 0", import_args(&src, &out, &one, &["--image-size", "0"]), &out);
    assert!(e.contains("--image-size 0 must be between 1 and 4096"), "{e}");

    // A non-empty output folder is kept unless --force, which replaces only what the importer writes.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let (ok, _, e) = run_sgdm(import_args(&src, &out, &one, &[]));
    assert!(!ok && e.contains("is not empty; pass --force"), "{e}");
    let (ok, _, e) = run_sgdm(import_args(&src, &out, &one, &["--force"]));
    assert!(ok, "{e}");
    assert_eq!(std::fs::read_to_string(out.join("notes.txt")).unwrap(), "mine");
    assert_eq!(Manifest::read(&out).unwrap().splits[1].figures, 3, "default: one in 16 training concepts, at least 1");

    let (ok, help, _) = run_sgdm(["data", "import", "things-eeg2", "--help"]);
    assert!(ok && help.contains("Examples:") && help.contains("THINGS order"), "{help}");
}
