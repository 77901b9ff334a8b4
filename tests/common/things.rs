//! THINGS-EEG2-shaped test data written here: the preprocessed EEG dict in both layouts (the official
//! `np.save` of a dict, and the NICE/ATM `pickle.dump` of it), byte by byte as numpy writes them, and image
//! folders of tiny JPEG and PNG images (`training_images/<concept>/<image>`, `test_images/...`).
#![allow(dead_code)] // each test binary uses its own subset

use std::path::Path;

use sgdm::data::npy::{header_bytes, NpyDtype};

pub const CHANNELS: [&str; 17] = ["P7", "P5", "P3", "P1", "Pz", "P2", "P4", "P6", "P8", "PO7", "PO3", "POz", "PO4", "PO8", "O1", "Oz", "O2"];

/// How the dict is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// The official release: `np.save` of a dict (a `.npy` header, then the pickle of a 0-d object array).
    NpSave,
    /// NICE/ATM: `pickle.dump` of the dict, in a file still named `.npy`.
    PickleDump,
}

/// Pickle opcodes (protocol 2, as numpy writes arrays: `_reconstruct` then BUILD).
struct Pickle(Vec<u8>);

impl Pickle {
    fn op(&mut self, bytes: &[u8]) -> &mut Pickle {
        self.0.extend_from_slice(bytes);
        self
    }
    fn global(&mut self, module: &str, name: &str) -> &mut Pickle {
        self.op(format!("c{module}\n{name}\n").as_bytes())
    }
    fn str(&mut self, s: &str) -> &mut Pickle {
        self.op(b"X").op(&(s.len() as u32).to_le_bytes()).op(s.as_bytes())
    }
    fn int(&mut self, i: i32) -> &mut Pickle {
        match u8::try_from(i) {
            Ok(b) => self.op(&[b'K', b]),
            Err(_) => self.op(b"J").op(&i.to_le_bytes()),
        }
    }
    /// `numpy.dtype(descr, False, True)` with its BUILD state.
    fn dtype(&mut self, descr: &str, order: &str, flags: i32) -> &mut Pickle {
        self.global("numpy", "dtype").str(descr).op(b"\x89\x88\x87R(").int(3).str(order).op(b"NNN").int(-1).int(-1).int(flags).op(b"tb")
    }
    /// `_reconstruct(ndarray, (0,), b'b')`, left for its BUILD state.
    fn empty_array(&mut self) -> &mut Pickle {
        self.global("numpy.core.multiarray", "_reconstruct").global("numpy", "ndarray").int(0).op(b"\x85C\x01b\x87R")
    }
    fn array(&mut self, shape: &[usize], descr: &str, data: &[u8]) -> &mut Pickle {
        self.empty_array().op(b"(").int(1).op(b"(");
        for &d in shape {
            self.int(d as i32);
        }
        self.op(b"t").dtype(descr, "<", 0).op(b"\x89B").op(&(data.len() as u32).to_le_bytes()).op(data).op(b"tb")
    }
    fn dict(&mut self, shape: [usize; 4], data: &[f32], ch_names: &[&str], times: &[f64]) -> &mut Pickle {
        self.op(b"}(").str("preprocessed_eeg_data");
        self.array(&shape, "f4", bytemuck::cast_slice(data));
        self.str("ch_names").op(b"](");
        for name in ch_names {
            self.str(name);
        }
        let times: Vec<u8> = times.iter().flat_map(|t| t.to_le_bytes()).collect();
        self.op(b"e").str("times").array(&[times.len() / 8], "f8", &times);
        self.op(b"u")
    }
}

/// The bytes of a preprocessed EEG file: `data` f32 `[images, repetitions, channels, time]`.
pub fn eeg_dict_file(layout: Layout, shape: [usize; 4], data: &[f32], ch_names: &[&str], times: &[f64]) -> Vec<u8> {
    assert_eq!(shape.iter().product::<usize>(), data.len());
    let mut p = Pickle(Vec::new());
    p.op(b"\x80\x02");
    match layout {
        Layout::PickleDump => {
            p.dict(shape, data, ch_names, times).op(b".");
            p.0
        }
        Layout::NpSave => {
            p.empty_array().op(b"(").int(1).op(b")").dtype("O8", "|", 63).op(b"\x89]");
            p.dict(shape, data, ch_names, times).op(b"atb.");
            let mut file = header_bytes(NpyDtype::Object, &[]);
            file.extend_from_slice(&p.0);
            file
        }
    }
}

/// `n` sample times from `start` seconds at `rate` Hz.
pub fn times(start: f64, rate: f64, n: usize) -> Vec<f64> {
    (0..n).map(|i| start + i as f64 / rate).collect()
}

/// Writes `root/<dir>/<concept>/<image>`: `concepts` concept folders (`00001_c1`, ...) of `per_concept` tiny
/// images each (24x20, a dark rectangle on a light ground placed by the image's number), JPEG and PNG
/// alternating. Returns the images in THINGS order, relative to `root/<dir>`.
pub fn image_folder(root: &Path, dir: &str, concepts: usize, per_concept: usize, first_concept: usize) -> Vec<String> {
    let mut names = Vec::new();
    for c in 0..concepts {
        let concept = format!("{:05}_c{}", first_concept + c, first_concept + c);
        let folder = root.join(dir).join(&concept);
        std::fs::create_dir_all(&folder).unwrap();
        for i in 0..per_concept {
            let k = (first_concept + c) * 7 + i * 3;
            let img = image::RgbImage::from_fn(24, 20, |x, y| {
                let inside = (k as u32 % 9..k as u32 % 9 + 10).contains(&x) && (k as u32 % 7..k as u32 % 7 + 9).contains(&y);
                if inside {
                    image::Rgb([20, 30, (k * 13 % 200) as u8])
                } else {
                    image::Rgb([230, 220, 210])
                }
            });
            let (name, format) = if i % 2 == 0 {
                (format!("c{}_{i:02}b.jpg", first_concept + c), image::ImageFormat::Jpeg)
            } else {
                (format!("c{}_{i:02}s.png", first_concept + c), image::ImageFormat::Png)
            };
            img.save_with_format(folder.join(&name), format).unwrap();
            names.push(format!("{concept}/{name}"));
        }
    }
    names
}

/// EEG values for `rows` images: each image's own pattern (so the encoder has something to learn) plus
/// seeded noise, scaled like microvolts.
pub fn eeg_values(shape: [usize; 4], seed: u64) -> Vec<f32> {
    let [n, r, c, t] = shape;
    let noise = super::random(n * r * c * t, -1.0, 1.0, seed);
    (0..n * r * c * t)
        .map(|i| {
            let (row, ch, s) = (i / (r * c * t), i / t % c, i % t);
            5.0 * (((row * 3 + ch) % 7) as f32 - 3.0) * (s as f32 * 0.3 + row as f32).sin() + 2.0 * noise[i]
        })
        .collect()
}

/// A subject folder with both files in `layout`: `train_rows` and `test_rows` images, the given
/// repetitions, channels and time axis.
pub fn subject_folder(dir: &Path, layout: Layout, train: [usize; 4], test: [usize; 4], ch_names: &[&str], times: &[f64], seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, shape, s) in [("preprocessed_eeg_training.npy", train, seed), ("preprocessed_eeg_test.npy", test, seed + 1)] {
        std::fs::write(dir.join(name), eeg_dict_file(layout, shape, &eeg_values(shape, s), ch_names, times)).unwrap();
    }
}
