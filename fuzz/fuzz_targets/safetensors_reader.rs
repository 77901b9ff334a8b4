//! Arbitrary bytes as a safetensors file, through what a model load does with one: the header and its
//! offsets, every tensor's dtype, shape and bytes, conversion to f32, the non-finite scan and
//! `ParamStore::load` against a model built from the file's own names and shapes. It must return errors,
//! never panic, hang or exhaust memory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sgdm::nn::{ParamStore, ParamTree};
use sgdm::weights::SafetensorsFile;
use sgdm::{DType, Device};

/// Tensors the loader would allocate past this are left out of the model (the file itself bounds the
/// bytes read, not the size of an f32 copy of a huge bf16 shape).
const MAX_ELEMENTS: usize = 1 << 22;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = SafetensorsFile::from_bytes(data.to_vec(), "fuzz.safetensors") else { return };
    let _ = file.metadata();
    let mut tree = ParamTree::new();
    let names: Vec<String> = file.names().map(str::to_string).collect();
    for name in &names {
        let Ok(shape) = file.shape(name).map(<[usize]>::to_vec) else { continue };
        let elements = shape.iter().try_fold(1usize, |n, d| n.checked_mul(*d));
        if let Ok((dtype, _, bytes)) = file.raw(name) {
            let _ = sgdm::tensor::non_finite_values(dtype, bytes);
        }
        if elements.is_some_and(|n| n <= MAX_ELEMENTS) {
            let _ = file.tensor(name, &Device::Cpu, DType::F32);
            tree.add(name.clone(), &shape);
        }
    }
    let _ = file.ensure_all_used();
    let _ = ParamStore::load_owned(&tree, &file, &Device::Cpu, DType::F32, &[]);
});
