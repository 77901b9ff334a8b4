//! safetensors round trips and every bad-input error of the weights loader.

use std::collections::BTreeMap;
use std::path::Path;

use sgdm::weights::{save_safetensors, Component, RawView, SafetensorsFile, WeightError};
use sgdm::{DType, Device, Tensor};

fn values(n: usize) -> Vec<f32> {
    // Multiples of 1/8 in [-4, 4): exactly representable in f32, bf16 and f16, so round trips are exact.
    (0..n).map(|i| ((i * 37 % 64) as f32 - 32.0) / 8.0).collect()
}

fn write_model(path: &Path) {
    let a = Tensor::from_f32(&Device::Cpu, &[2, 3], DType::F32, &values(6)).unwrap();
    let b = Tensor::from_f32(&Device::Cpu, &[4], DType::BF16, &values(4)).unwrap();
    let c = Tensor::from_f32(&Device::Cpu, &[3, 1, 2], DType::F16, &values(6)).unwrap();
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    save_safetensors(path, &[("down.0.weight", &a), ("down.0.bias", &b), ("up.conv.weight", &c)], Some(&meta)).unwrap();
}

#[test]
fn round_trip_keeps_names_shapes_dtypes_and_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    write_model(&path);
    let f = SafetensorsFile::open(&path).unwrap();
    assert_eq!(f.names().collect::<Vec<_>>(), ["down.0.bias", "down.0.weight", "up.conv.weight"]);
    let (dtype, shape, bytes) = f.raw("down.0.bias").unwrap();
    assert_eq!((dtype, shape, bytes.len()), (DType::BF16, &[4usize][..], 8));
    let (dtype, shape, _) = f.raw("up.conv.weight").unwrap();
    assert_eq!((dtype, shape), (DType::F16, &[3usize, 1, 2][..]));
    for (name, n) in [("down.0.weight", 6), ("down.0.bias", 4), ("up.conv.weight", 6)] {
        for target in [DType::F32, DType::BF16, DType::F16] {
            let t = f.tensor(name, &Device::Cpu, target).unwrap();
            assert_eq!(t.dtype(), target);
            assert_eq!(t.to_f32_vec().unwrap(), values(n), "{name} loaded as {target}");
        }
    }
    f.ensure_all_used().unwrap();
}

#[test]
fn the_same_tensors_and_metadata_give_the_same_bytes() {
    // The metadata went through a HashMap whose order changes with every map: a resumed training run's
    // files differed from an uninterrupted run's in their header alone.
    let dir = tempfile::tempdir().unwrap();
    let t = Tensor::from_f32(&Device::Cpu, &[3], DType::F32, &values(3)).unwrap();
    let meta: BTreeMap<String, String> = (0..12).map(|i| (format!("key{i:02}"), format!("value {i}"))).collect();
    let written: Vec<Vec<u8>> = (0..4)
        .map(|i| {
            let path = dir.path().join(format!("m{i}.safetensors"));
            save_safetensors(&path, &[("b", &t), ("a", &t)], Some(&meta)).unwrap();
            std::fs::read(&path).unwrap()
        })
        .collect();
    assert!(written.iter().all(|w| *w == written[0]), "four saves of the same tensors gave different bytes");
    let f = SafetensorsFile::open(dir.path().join("m0.safetensors")).unwrap();
    assert_eq!(f.metadata(), &meta);
    assert_eq!(f.tensor("a", &Device::Cpu, DType::F32).unwrap().to_f32_vec().unwrap(), values(3));
}

#[test]
fn conversion_on_load_rounds_to_nearest_even() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.safetensors");
    // 1 + 2^-8 lies exactly between two bf16 values (1 and 1 + 2^-7): ties go to the even one, 1.0.
    // 1 + 3 * 2^-9 rounds up to 1 + 2^-7.
    let x = [1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-9), -3.0e-3];
    let t = Tensor::from_f32(&Device::Cpu, &[3], DType::F32, &x).unwrap();
    save_safetensors(&path, &[("x", &t)], None).unwrap();
    let f = SafetensorsFile::open(&path).unwrap();
    let b = f.tensor("x", &Device::Cpu, DType::BF16).unwrap().to_f32_vec().unwrap();
    assert_eq!(b[0], 1.0);
    assert_eq!(b[1], 1.0 + 2f32.powi(-7));
    assert!((b[2] - x[2]).abs() <= x[2].abs() * 2f32.powi(-8), "bf16 keeps 8 significant bits");
}

fn open_err(path: &Path) -> String {
    SafetensorsFile::open(path).unwrap_err().to_string()
}

#[test]
fn truncated_files_are_reported_as_truncated_with_the_file_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("full.safetensors");
    write_model(&path);
    let bytes = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    for cut in [0, 5, 8, 8 + header_len / 2, 8 + header_len + 3, bytes.len() - 1] {
        let p = dir.path().join(format!("cut{cut}.safetensors"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let err = open_err(&p);
        assert!(err.contains(&format!("cut{cut}.safetensors")), "{err}");
        assert!(err.contains("truncated"), "cut at {cut}: {err}");
    }
}

#[test]
fn corrupt_headers_and_trailing_bytes_are_reported_as_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let bad_json = dir.path().join("json.safetensors");
    let header = b"{\"x\": {\"dtype\": \"F32\", \"shape\": [1], ";
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    std::fs::write(&bad_json, &bytes).unwrap();
    let err = open_err(&bad_json);
    assert!(err.contains("json.safetensors") && err.contains("corrupt"), "{err}");

    let full = dir.path().join("full.safetensors");
    write_model(&full);
    let mut bytes = std::fs::read(&full).unwrap();
    bytes.extend_from_slice(&[0; 16]);
    let trailing = dir.path().join("trailing.safetensors");
    std::fs::write(&trailing, &bytes).unwrap();
    let err = open_err(&trailing);
    assert!(err.contains("trailing.safetensors") && err.contains("corrupt"), "{err}");

    let overlapping = dir.path().join("overlap.safetensors");
    let header = br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0; 12]);
    std::fs::write(&overlapping, &bytes).unwrap();
    assert!(open_err(&overlapping).contains("corrupt"));
}

#[test]
fn missing_file_names_the_path() {
    let err = open_err(Path::new("/nonexistent/dir/model.safetensors"));
    assert!(err.contains("/nonexistent/dir/model.safetensors"), "{err}");
}

#[test]
fn unsupported_dtypes_are_refused_by_tensor_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ints.safetensors");
    let view = RawView { dtype: safetensors::Dtype::I64, shape: vec![2], bytes: vec![0; 16] };
    safetensors::serialize_to_file([("position_ids", view)], None, &path).unwrap();
    let f = SafetensorsFile::open(&path).unwrap();
    let err = f.tensor("position_ids", &Device::Cpu, DType::F32).unwrap_err().to_string();
    assert!(err.contains("ints.safetensors") && err.contains("'position_ids'") && err.contains("I64"), "{err}");
}

#[test]
fn missing_tensors_wrong_shapes_and_unknown_names_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    write_model(&path);
    let f = SafetensorsFile::open(&path).unwrap();

    let err = f.tensor("down.0.wieght", &Device::Cpu, DType::F32).unwrap_err();
    let err = err.downcast::<WeightError>().unwrap();
    assert!(matches!(&err, WeightError::Missing { tensor, .. } if tensor == "down.0.wieght"));
    let msg = err.to_string();
    assert!(msg.contains("m.safetensors") && msg.contains("similar names: down.0.weight"), "{msg}");

    let err = f.tensor_with_shape("down.0.weight", &[3, 2], &Device::Cpu, DType::F32).unwrap_err().to_string();
    assert!(err.contains("'down.0.weight'") && err.contains("[2, 3]") && err.contains("expected [3, 2]"), "{err}");

    f.tensor_with_shape("down.0.weight", &[2, 3], &Device::Cpu, DType::F32).unwrap();
    let err = f.ensure_all_used().unwrap_err().to_string();
    assert!(err.contains("2 unknown") && err.contains("down.0.bias") && err.contains("up.conv.weight"), "{err}");
    assert_eq!(f.unused(), ["down.0.bias", "up.conv.weight"]);
}

#[test]
fn saving_refuses_duplicate_names_and_leaves_no_partial_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dup.safetensors");
    let t = Tensor::zeros(&Device::Cpu, &[2], DType::F32).unwrap();
    let err = save_safetensors(&path, &[("a", &t), ("a", &t)], None).unwrap_err().to_string();
    assert!(err.contains("dup.safetensors") && err.contains("'a' given twice"), "{err}");
    assert!(!path.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "no temporary file is left behind");
}

#[test]
fn diffusers_component_directory_opens_as_one_unit() {
    let dir = tempfile::tempdir().unwrap();
    let unet = dir.path().join("unet");
    std::fs::create_dir(&unet).unwrap();
    std::fs::write(unet.join("config.json"), r#"{"_class_name": "UNet2DConditionModel", "in_channels": 4}"#).unwrap();
    write_model(&unet.join("diffusion_pytorch_model.safetensors"));
    let c = Component::open(&unet).unwrap();
    assert_eq!(c.class_name(), Some("UNet2DConditionModel"));
    assert_eq!(c.config["in_channels"], 4);
    assert!(c.weights.contains("down.0.weight"));

    // transformers-style name
    let enc = dir.path().join("text_encoder");
    std::fs::create_dir(&enc).unwrap();
    std::fs::write(enc.join("config.json"), "{}").unwrap();
    write_model(&enc.join("model.safetensors"));
    assert!(Component::open(&enc).unwrap().class_name().is_none());
}

#[test]
fn diffusers_component_errors_name_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let err = |p: &Path| Component::open(p).unwrap_err().to_string();

    let none = dir.path().join("absent");
    assert!(err(&none).contains("not a directory"));

    let no_config = dir.path().join("no_config");
    std::fs::create_dir(&no_config).unwrap();
    assert!(err(&no_config).contains("config.json"));

    let bad_json = dir.path().join("bad_json");
    std::fs::create_dir(&bad_json).unwrap();
    std::fs::write(bad_json.join("config.json"), "{\"in_channels\": ").unwrap();
    let e = err(&bad_json);
    assert!(e.contains("bad_json/config.json") && e.contains("invalid JSON"), "{e}");

    let no_weights = dir.path().join("no_weights");
    std::fs::create_dir(&no_weights).unwrap();
    std::fs::write(no_weights.join("config.json"), "{}").unwrap();
    assert!(err(&no_weights).contains("diffusion_pytorch_model.safetensors or model.safetensors"));

    let pickle = dir.path().join("pickle");
    std::fs::create_dir(&pickle).unwrap();
    std::fs::write(pickle.join("config.json"), "{}").unwrap();
    std::fs::write(pickle.join("diffusion_pytorch_model.bin"), b"\x80\x02").unwrap();
    assert!(err(&pickle).contains("never unpickles"));

    let sharded = dir.path().join("sharded");
    std::fs::create_dir(&sharded).unwrap();
    std::fs::write(sharded.join("config.json"), "{}").unwrap();
    std::fs::write(sharded.join("diffusion_pytorch_model.safetensors.index.json"), "{}").unwrap();
    assert!(err(&sharded).contains("sharded"));
}
