//! The structure extraction: an image's edge map (Sobel gradient magnitude of its ink, the dark part of
//! the image) and its 16x16 block-averaged structure target, the StructuralVAE structure head's output.
//! `sgdm synth` applies it to each tangram's coverage and `sgdm data import` to each photograph, always at
//! [`STRUCTURE_SIZE`] pixels, so a structure target means the same on either dataset.

use image::{GrayImage, RgbImage};

use crate::data::image::resize_center_crop;

/// Side, in pixels, of the image the edges are computed on (the tangram renderings' size).
pub const STRUCTURE_SIZE: usize = 128;
/// Side of the structure target.
pub const EDGE_SIZE: usize = 16;

/// An image's edge map and structure target, row-major, row 0 at the top.
#[derive(Debug, Clone, PartialEq)]
pub struct StructureMaps {
    /// `size` x `size` Sobel gradient magnitude of the coverage, in [0, 1]; a sharp step from 0 to 1 reads 1.
    pub edges: Vec<f32>,
    /// `edge_size` x `edge_size` block means of `edges`, scaled so the strongest block is 1 (all zero when
    /// the image has no edge).
    pub edges16: Vec<f32>,
}

impl StructureMaps {
    /// The maps of a `size` x `size` coverage (1 where the ink is, 0 on the background); `size` must be a
    /// multiple of `edge_size`.
    pub fn from_coverage(coverage: &[f32], size: usize, edge_size: usize) -> StructureMaps {
        let n = size as i64;
        let at = |x: i64, y: i64| coverage[(y.clamp(0, n - 1) * n + x.clamp(0, n - 1)) as usize];
        let mut edges = vec![0.0f32; coverage.len()];
        for (i, e) in edges.iter_mut().enumerate() {
            let (x, y) = (i as i64 % n, i as i64 / n);
            let gx = at(x + 1, y - 1) + 2.0 * at(x + 1, y) + at(x + 1, y + 1) - at(x - 1, y - 1) - 2.0 * at(x - 1, y) - at(x - 1, y + 1);
            let gy = at(x - 1, y + 1) + 2.0 * at(x, y + 1) + at(x + 1, y + 1) - at(x - 1, y - 1) - 2.0 * at(x, y - 1) - at(x + 1, y - 1);
            *e = ((gx * gx + gy * gy).sqrt() / 4.0).min(1.0);
        }
        let edges16 = normalized_max(&block_mean(&edges, size, edge_size));
        StructureMaps { edges, edges16 }
    }

    /// The maps of a photograph: resized (short side) and centre-cropped to [`STRUCTURE_SIZE`], its ink
    /// the darkness 1 - grey (grey by scikit-image's `rgb2gray` weights, as `sgdm eval`'s SSIM), so a black
    /// figure on white gives exactly what the tangram renderer's coverage gives.
    pub fn from_image(img: &RgbImage) -> StructureMaps {
        let square = resize_center_crop(img, STRUCTURE_SIZE as u32);
        let coverage: Vec<f32> =
            square.pixels().map(|p| 1.0 - (0.2125 * p[0] as f32 + 0.7154 * p[1] as f32 + 0.0721 * p[2] as f32) / 255.0).collect();
        StructureMaps::from_coverage(&coverage, STRUCTURE_SIZE, EDGE_SIZE)
    }

    /// The edge map as a grey image, white edges on black (the ControlNet convention).
    pub fn edges_image(&self) -> GrayImage {
        let size = (self.edges.len() as f64).sqrt() as u32;
        GrayImage::from_raw(size, size, self.edges.iter().map(|e| (e * 255.0).round() as u8).collect()).expect("the edge map is square")
    }
}

/// Averages a `size` x `size` map over square blocks down to `out` x `out`.
pub fn block_mean(map: &[f32], size: usize, out: usize) -> Vec<f32> {
    let b = size / out;
    let mut res = vec![0.0f32; out * out];
    for (i, v) in map.iter().enumerate() {
        res[(i / size / b) * out + (i % size) / b] += v;
    }
    res.iter_mut().for_each(|v| *v /= (b * b) as f32);
    res
}

fn normalized_max(v: &[f32]) -> Vec<f32> {
    let max = v.iter().copied().fold(0.0f32, f32::max);
    v.iter().map(|x| if max > 0.0 { x / max } else { 0.0 }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_black_square_on_white_has_edges_on_its_outline_only() {
        let img =
            RgbImage::from_fn(
                256,
                256,
                |x, y| if (64..192).contains(&x) && (64..192).contains(&y) { image::Rgb([0, 0, 0]) } else { image::Rgb([255; 3]) },
            );
        let maps = StructureMaps::from_image(&img);
        assert_eq!((maps.edges.len(), maps.edges16.len()), (128 * 128, 256));
        // The square spans pixels 32..96 at 128: its border reads about 1 (the resize softens the step by
        // a pixel), its inside and outside 0.
        let border = (30..35).map(|x| maps.edges[64 * 128 + x]).fold(0.0, f32::max);
        assert!(border > 0.9, "the square's left edge reads only {border}");
        assert_eq!(maps.edges[64 * 128 + 64], 0.0);
        assert_eq!(maps.edges[10 * 128 + 10], 0.0);
        assert_eq!(maps.edges16.iter().copied().fold(0.0, f32::max), 1.0);
        assert_eq!(maps.edges16[8 * 16 + 8], 0.0, "the square's inside has no edge");
        let blank = StructureMaps::from_image(&RgbImage::from_pixel(20, 20, image::Rgb([90; 3])));
        assert!(blank.edges16.iter().all(|v| *v == 0.0), "a flat image has no structure");
        assert_eq!(maps.edges_image().dimensions(), (128, 128));
    }
}
