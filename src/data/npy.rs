//! `.npy` files: header parsing, memory-mapped reading of numeric arrays (f16, f32, f64, little endian,
//! C order) converted to f32 row by row, and atomic writing of f32 arrays. Object arrays (`|O`, a pickle
//! after the header) are recognised here and decoded by `data::pickle`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use memmap2::{Mmap, MmapMut};

use crate::util::{next_temporary_path, write_atomic_with};

const MAGIC: &[u8] = b"\x93NUMPY";

/// The element type named by a header's `descr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NpyDtype {
    F16,
    F32,
    F64,
    /// `|O`: Python objects; the data section is a pickle.
    Object,
}

impl NpyDtype {
    /// Bytes per element (object arrays have none: their data is a pickle stream).
    pub fn size(self) -> usize {
        match self {
            NpyDtype::F16 => 2,
            NpyDtype::F32 => 4,
            NpyDtype::F64 => 8,
            NpyDtype::Object => 0,
        }
    }

    /// Parses a numpy `descr` string; `path` is for the error message.
    pub fn from_descr(descr: &str, path: &Path) -> Result<NpyDtype> {
        match descr {
            "<f2" => Ok(NpyDtype::F16),
            "<f4" => Ok(NpyDtype::F32),
            "<f8" => Ok(NpyDtype::F64),
            "|O" => Ok(NpyDtype::Object),
            d if d.starts_with('>') => {
                bail!("{}: big-endian arrays ({d}) are not read; save little-endian (arr.astype('<f4'))", path.display())
            }
            d => bail!("{}: unsupported dtype {d}: sgdm reads float16, float32 and float64 arrays", path.display()),
        }
    }

    pub fn descr(self) -> &'static str {
        match self {
            NpyDtype::F16 => "<f2",
            NpyDtype::F32 => "<f4",
            NpyDtype::F64 => "<f8",
            NpyDtype::Object => "|O",
        }
    }
}

/// A parsed `.npy` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpyHeader {
    pub dtype: NpyDtype,
    pub shape: Vec<usize>,
    /// Byte offset of the data section.
    pub data_offset: usize,
}

impl NpyHeader {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Finds `'key':` in a header dict literal and returns the text after it.
fn header_value<'a>(dict: &'a str, key: &str) -> Option<&'a str> {
    let at = dict.find(&format!("'{key}'")).or_else(|| dict.find(&format!("\"{key}\"")))?;
    let rest = &dict[at + key.len() + 2..];
    Some(rest.trim_start().strip_prefix(':')?.trim_start())
}

/// Parses the header at the start of `bytes`. Never panics on arbitrary input.
pub fn parse_header(bytes: &[u8], path: &Path) -> Result<NpyHeader> {
    let p = path.display();
    ensure!(bytes.len() >= 10, "{p}: truncated .npy file ({} bytes, shorter than its preamble)", bytes.len());
    ensure!(bytes.starts_with(MAGIC), "{p}: not a .npy file (no \\x93NUMPY magic)");
    let (len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
        2 | 3 => {
            ensure!(bytes.len() >= 12, "{p}: truncated .npy header");
            (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12)
        }
        v => bail!("{p}: unsupported .npy format version {v}"),
    };
    let end = start.checked_add(len).filter(|&e| e <= bytes.len());
    let end = end.with_context(|| format!("{p}: truncated .npy header ({len} bytes announced)"))?;
    let dict = std::str::from_utf8(&bytes[start..end]).with_context(|| format!("{p}: .npy header is not text"))?;

    let descr = header_value(dict, "descr").with_context(|| format!("{p}: .npy header lacks 'descr'"))?;
    let quote = descr.chars().next().filter(|c| *c == '\'' || *c == '"');
    let descr = quote
        .and_then(|q| descr[1..].split(q).next())
        .with_context(|| format!("{p}: .npy 'descr' is not a simple string (structured arrays are not read)"))?;
    let dtype = NpyDtype::from_descr(descr, path)?;

    let fortran = header_value(dict, "fortran_order").with_context(|| format!("{p}: .npy header lacks 'fortran_order'"))?;
    if fortran.starts_with("True") {
        bail!("{p}: array is in Fortran order; save it in C order (np.ascontiguousarray) and try again");
    }
    ensure!(fortran.starts_with("False"), "{p}: .npy 'fortran_order' is neither True nor False");

    let shape = header_value(dict, "shape").with_context(|| format!("{p}: .npy header lacks 'shape'"))?;
    let inner = shape.strip_prefix('(').and_then(|s| s.split(')').next()).with_context(|| format!("{p}: .npy 'shape' is not a tuple"))?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{p}: .npy 'shape' ({inner}) holds something other than sizes"))?;
    let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    ensure!(numel.is_some(), "{p}: .npy shape {shape:?} overflows");
    Ok(NpyHeader { dtype, shape, data_offset: end })
}

/// A memory-mapped `.npy` file.
pub struct NpyFile {
    pub path: PathBuf,
    pub header: NpyHeader,
    mmap: Mmap,
}

impl NpyFile {
    /// Opens and checks a `.npy` file: header, and for numeric arrays that the data section has exactly the
    /// bytes the shape needs.
    pub fn open(path: impl AsRef<Path>) -> Result<NpyFile> {
        let path = path.as_ref().to_path_buf();
        let file = crate::util::open_file(&path).with_context(|| format!("{}: cannot open", path.display()))?;
        // SAFETY: read-only map; a file modified by another process while we read it is outside our contract.
        let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("{}: cannot map", path.display()))?;
        let header = parse_header(&mmap, &path)?;
        if header.dtype != NpyDtype::Object {
            let want = header.numel() * header.dtype.size();
            let have = mmap.len() - header.data_offset;
            ensure!(
                have >= want,
                "{}: truncated .npy file: shape {:?} needs {want} bytes of data, the file holds {have}",
                path.display(),
                header.shape
            );
            ensure!(
                have == want,
                "{}: corrupt .npy file: shape {:?} needs {want} bytes of data, the file holds {have}",
                path.display(),
                header.shape
            );
        }
        Ok(NpyFile { path, header, mmap })
    }

    /// The raw data section (a pickle stream for object arrays).
    pub fn data(&self) -> &[u8] {
        &self.mmap[self.header.data_offset..]
    }

    /// Elements `start..start + count` (in C order) as f32.
    pub fn read_f32(&self, start: usize, count: usize) -> Result<Vec<f32>> {
        let dtype = self.header.dtype;
        ensure!(dtype != NpyDtype::Object, "{}: holds Python objects, not a numeric array", self.path.display());
        ensure!(
            start.checked_add(count).is_some_and(|e| e <= self.header.numel()),
            "{}: elements {start}..{} are out of range ({} elements)",
            self.path.display(),
            start + count,
            self.header.numel()
        );
        let s = dtype.size();
        Ok(decode_f32(dtype, &self.data()[start * s..(start + count) * s]))
    }

    /// Every element as f32.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        self.read_f32(0, self.header.numel())
    }
}

/// Decodes little-endian f16/f32/f64 bytes (any alignment) to f32.
pub fn decode_f32(dtype: NpyDtype, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        NpyDtype::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        NpyDtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
        NpyDtype::F64 => bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
        NpyDtype::Object => Vec::new(),
    }
}

/// The bytes of a version-1 `.npy` header for a numeric C-order array (padded so data starts at a
/// multiple of 64, as numpy does).
pub fn header_bytes(dtype: NpyDtype, shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut dict = format!("{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}", dtype.descr());
    let unpadded = MAGIC.len() + 4 + dict.len() + 1;
    dict.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    dict.push('\n');
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}

/// Writes an f32 array as `.npy`, atomically.
pub fn write_f32(path: impl AsRef<Path>, shape: &[usize], values: &[f32]) -> Result<()> {
    let path = path.as_ref();
    ensure!(shape.iter().product::<usize>() == values.len(), "{}: shape {shape:?} does not hold {} values", path.display(), values.len());
    write_atomic_with(path, |w| {
        w.write_all(&header_bytes(NpyDtype::F32, shape))?;
        w.write_all(bytemuck::cast_slice(values))
    })
    .with_context(|| format!("{}: cannot write", path.display()))
}

/// An f32 `.npy` file filled in place, in any order, through a writable memory map: it is a temporary
/// beside its path until [`NpyWriter::finish`] flushes it and renames it over the path, so a reader never
/// sees it half-written; dropped unfinished, the temporary is removed. For arrays assembled from several
/// sources that need not all be in memory at once.
pub struct NpyWriter {
    path: PathBuf,
    tmp: PathBuf,
    mmap: MmapMut,
    data_offset: usize,
    finished: bool,
}

impl NpyWriter {
    /// A zero-filled f32 array of `shape` to be written to `path`.
    pub fn create(path: impl AsRef<Path>, shape: &[usize]) -> Result<NpyWriter> {
        let path = path.as_ref().to_path_buf();
        let p = path.display();
        let header = header_bytes(NpyDtype::F32, shape);
        let bytes = shape.iter().try_fold(4usize, |n, &d| n.checked_mul(d)).with_context(|| format!("{p}: shape {shape:?} is too large"))?;
        let tmp = next_temporary_path(&path).with_context(|| format!("{p}: cannot write"))?;
        let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&tmp).with_context(|| format!("{p}: cannot create"))?;
        let total = header.len() + bytes;
        let mapped = file.set_len(total as u64).and_then(|()| {
            // SAFETY: the temporary was just created by this process under a name no other writer uses.
            unsafe { MmapMut::map_mut(&file) }
        });
        let mut mmap = match mapped {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e).with_context(|| format!("{p}: cannot create a file of {total} bytes"));
            }
        };
        mmap[..header.len()].copy_from_slice(&header);
        Ok(NpyWriter { path, tmp, mmap, data_offset: header.len(), finished: false })
    }

    /// The array's values, C order (the header pads the data to a multiple of 64 bytes, so it is aligned).
    pub fn values_mut(&mut self) -> &mut [f32] {
        bytemuck::cast_slice_mut(&mut self.mmap[self.data_offset..])
    }

    /// Flushes the values to disk and puts the file in place.
    pub fn finish(mut self) -> Result<()> {
        let p = self.path.display().to_string();
        self.mmap.flush().with_context(|| format!("{p}: cannot write"))?;
        std::fs::rename(&self.tmp, &self.path).with_context(|| format!("{p}: cannot write"))?;
        self.finished = true;
        Ok(())
    }
}

impl Drop for NpyWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read_round_trips_and_aligns_data_to_64_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.npy");
        let values: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
        write_f32(&path, &[2, 3, 4], &values).unwrap();
        let f = NpyFile::open(&path).unwrap();
        assert_eq!(f.header.shape, [2, 3, 4]);
        assert_eq!(f.header.dtype, NpyDtype::F32);
        assert_eq!(f.header.data_offset % 64, 0);
        assert_eq!(f.to_f32().unwrap(), values);
        assert_eq!(f.read_f32(12, 3).unwrap(), values[12..15]);
        assert!(f.read_f32(23, 2).is_err());
        write_f32(dir.path().join("v.npy"), &[5], &values[..5]).unwrap();
        assert_eq!(NpyFile::open(dir.path().join("v.npy")).unwrap().header.shape, [5]);
    }

    #[test]
    fn a_writer_fills_in_any_order_and_appears_only_when_finished() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.npy");
        let mut w = NpyWriter::create(&path, &[2, 3]).unwrap();
        w.values_mut()[5] = 7.0;
        w.values_mut()[0] = -1.0;
        assert!(!path.exists(), "visible before finish");
        w.finish().unwrap();
        assert_eq!(NpyFile::open(&path).unwrap().to_f32().unwrap(), [-1.0, 0.0, 0.0, 0.0, 0.0, 7.0]);
        drop(NpyWriter::create(dir.path().join("abandoned.npy"), &[4]).unwrap());
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, [std::ffi::OsString::from("w.npy")], "an unfinished writer leaves nothing");
    }

    #[test]
    fn headers_numpy_writes_parse() {
        let p = Path::new("x.npy");
        let mut bytes = MAGIC.to_vec();
        let dict = "{'descr': '<f8', 'fortran_order': False, 'shape': (3, 17, 100), }          \n";
        bytes.extend_from_slice(&[1, 0]);
        bytes.extend_from_slice(&(dict.len() as u16).to_le_bytes());
        bytes.extend_from_slice(dict.as_bytes());
        let h = parse_header(&bytes, p).unwrap();
        assert_eq!((h.dtype, h.shape.as_slice(), h.data_offset), (NpyDtype::F64, &[3usize, 17, 100][..], bytes.len()));
    }

    #[test]
    fn bad_headers_are_errors_naming_the_file() {
        let p = Path::new("bad.npy");
        let with_dict = |dict: &str| {
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(&[1, 0]);
            b.extend_from_slice(&(dict.len() as u16).to_le_bytes());
            b.extend_from_slice(dict.as_bytes());
            parse_header(&b, p).unwrap_err().to_string()
        };
        assert!(with_dict("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }").contains("Fortran order"));
        assert!(with_dict("{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }").contains("big-endian"));
        assert!(with_dict("{'descr': '<i8', 'fortran_order': False, 'shape': (2,), }").contains("unsupported dtype <i8"));
        assert!(with_dict("{'descr': '<f4', 'fortran_order': False, 'shape': (2, x), }").contains("shape"));
        assert!(with_dict("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }").contains("structured"));
        assert!(parse_header(b"\x93NUMPY\x01\x00\xff\x00{", p).unwrap_err().to_string().contains("truncated"));
        assert!(parse_header(b"PK\x03\x04 not npy at all", p).unwrap_err().to_string().contains("bad.npy: not a .npy"));
    }

    #[test]
    fn truncated_and_oversized_data_sections_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.npy");
        write_f32(&path, &[4, 4], &[1.0; 16]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
        let err = NpyFile::open(&path).err().unwrap().to_string();
        assert!(err.contains("t.npy: truncated") && err.contains("64 bytes"), "{err}");
        let mut long = bytes.clone();
        long.extend_from_slice(&[0; 4]);
        std::fs::write(&path, &long).unwrap();
        assert!(NpyFile::open(&path).err().unwrap().to_string().contains("corrupt"));
    }
}
