//! Element types and their byte encodings: what a tensor stores, what a safetensors file holds, what
//! cuBLASLt is told. Below the runtime and the tensors, which both speak of dtypes.

use std::fmt;

use half::{bf16, f16};

/// Element types a tensor can store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<DType, String> {
        match s {
            "f32" | "float32" => Ok(DType::F32),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "f16" | "float16" => Ok(DType::F16),
            _ => Err(format!("unknown dtype '{s}': expected f32, bf16 or f16")),
        }
    }
}

/// Converts f32 values to the little-endian bytes of `dtype` (round to nearest even).
pub fn f32_to_bytes(dtype: DType, values: &[f32]) -> Vec<u8> {
    use half::slice::HalfFloatSliceExt;
    match dtype {
        DType::F32 => bytemuck::cast_slice(values).to_vec(),
        DType::BF16 => {
            let mut out = vec![bf16::ZERO; values.len()];
            out.convert_from_f32_slice(values);
            bytemuck::cast_slice(&out).to_vec()
        }
        DType::F16 => {
            let mut out = vec![f16::ZERO; values.len()];
            out.convert_from_f32_slice(values);
            bytemuck::cast_slice(&out).to_vec()
        }
    }
}

/// Reads little-endian `dtype` bytes (any alignment) as f32 values.
pub fn bytes_to_f32(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    debug_assert_eq!(bytes.len() % dtype.size(), 0);
    match dtype {
        DType::F32 => match bytemuck::try_cast_slice::<u8, f32>(bytes) {
            Ok(v) => v.to_vec(),
            Err(_) => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        },
        DType::BF16 => bytes.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        DType::F16 => bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
    }
}

/// Converts little-endian bytes from one dtype to another.
pub fn convert_bytes(from: DType, to: DType, bytes: &[u8]) -> Vec<u8> {
    if from == to {
        bytes.to_vec()
    } else {
        f32_to_bytes(to, &bytes_to_f32(from, bytes))
    }
}

/// Where the non-finite values (NaN, ±Inf) of an array are: how many, and the flat index of the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NonFiniteValues {
    pub count: usize,
    pub first: usize,
}

/// The non-finite values of little-endian `dtype` bytes, found from the exponent bits alone (all ones),
/// without converting: a weights file is scanned at memory speed, in parallel.
pub fn non_finite_values(dtype: DType, bytes: &[u8]) -> Option<NonFiniteValues> {
    use rayon::prelude::*;
    let size = dtype.size();
    let exponent_all_ones = |e: &[u8]| -> bool {
        match dtype {
            DType::F32 => u32::from_le_bytes([e[0], e[1], e[2], e[3]]) & 0x7f80_0000 == 0x7f80_0000,
            DType::F16 => u16::from_le_bytes([e[0], e[1]]) & 0x7c00 == 0x7c00,
            DType::BF16 => u16::from_le_bytes([e[0], e[1]]) & 0x7f80 == 0x7f80,
        }
    };
    const CHUNK: usize = 1 << 16;
    let per_chunk: Vec<(usize, Option<usize>)> = bytes
        .par_chunks(CHUNK * size)
        .enumerate()
        .map(|(c, chunk)| {
            let mut count = 0;
            let mut first = None;
            for (i, e) in chunk.chunks_exact(size).enumerate() {
                if exponent_all_ones(e) {
                    count += 1;
                    first.get_or_insert(c * CHUNK + i);
                }
            }
            (count, first)
        })
        .collect();
    let count = per_chunk.iter().map(|c| c.0).sum();
    per_chunk.iter().find_map(|c| c.1).map(|first| NonFiniteValues { count, first })
}
