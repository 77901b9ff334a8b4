//! Image IO: PNG and JPEG in (decoded by the `image` crate), PNG out, written atomically; resize and centre
//! crop to a square.

use std::io::Cursor;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use image::imageops::FilterType;
use image::{GrayImage, ImageFormat, RgbImage};

use crate::util::write_atomic;

/// The largest image side sgdm trains at or imports to (SD's is 512): a typo of 64000 would ask for a
/// terabyte.
pub const MAX_IMAGE_SIZE: usize = 4096;

/// Decodes a PNG or JPEG file to 8-bit RGB.
pub fn load_rgb(path: impl AsRef<Path>) -> Result<RgbImage> {
    let path = path.as_ref();
    let mut bytes = Vec::new();
    crate::util::open_file(path)
        .and_then(|mut f| std::io::Read::read_to_end(&mut f, &mut bytes))
        .with_context(|| format!("{}: cannot open", path.display()))?;
    decode_rgb(&bytes, path)
}

/// Decodes the bytes of a PNG or JPEG file to 8-bit RGB; `path` names the file in errors.
pub fn decode_rgb(bytes: &[u8], path: &Path) -> Result<RgbImage> {
    let mut reader = image::ImageReader::new(Cursor::new(bytes)).with_guessed_format().with_context(|| format!("{}: cannot read", path.display()))?;
    // Content that matches no signature is judged by the name it claims, so a damaged `x.jpg` is reported
    // as a corrupt JPEG rather than as an unknown format.
    if reader.format().is_none() {
        if let Ok(format) = ImageFormat::from_path(path) {
            reader.set_format(format);
        }
    }
    let format = reader.format();
    ensure!(
        matches!(format, Some(ImageFormat::Png | ImageFormat::Jpeg)),
        "{}: not a PNG or JPEG image (detected: {})",
        path.display(),
        format.map(|f| format!("{f:?}")).unwrap_or_else(|| "unknown".into())
    );
    Ok(reader.decode().with_context(|| format!("{}: corrupt or truncated image", path.display()))?.to_rgb8())
}

/// Scales the short side to `size` (Catmull-Rom) and crops the centre `size` x `size` square.
pub fn resize_center_crop(img: &RgbImage, size: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    if (w, h) == (size, size) {
        return img.clone();
    }
    let scale = size as f64 / w.min(h) as f64;
    let (nw, nh) = (((w as f64 * scale).round() as u32).max(size), ((h as f64 * scale).round() as u32).max(size));
    let resized = image::imageops::resize(img, nw, nh, FilterType::CatmullRom);
    image::imageops::crop_imm(&resized, (nw - size) / 2, (nh - size) / 2, size, size).to_image()
}

/// Loads an image as a `size` x `size` RGB square.
pub fn load_square(path: impl AsRef<Path>, size: u32) -> Result<RgbImage> {
    Ok(resize_center_crop(&load_rgb(path)?, size))
}

fn encode_png(write: impl FnOnce(&mut Cursor<Vec<u8>>) -> image::ImageResult<()>, path: &Path) -> Result<()> {
    let mut buf = Cursor::new(Vec::new());
    write(&mut buf).with_context(|| format!("{}: cannot encode PNG", path.display()))?;
    write_atomic(path, buf.get_ref()).with_context(|| format!("{}: cannot write", path.display()))
}

/// Writes an RGB image as PNG, atomically.
pub fn save_png_rgb(path: impl AsRef<Path>, img: &RgbImage) -> Result<()> {
    let path = path.as_ref();
    encode_png(|buf| img.write_to(buf, ImageFormat::Png), path)
}

/// Writes a grayscale image as PNG, atomically.
pub fn save_png_gray(path: impl AsRef<Path>, img: &GrayImage) -> Result<()> {
    let path = path.as_ref();
    encode_png(|buf| img.write_to(buf, ImageFormat::Png), path)
}

/// An RGB image as `[3, H, W]` planes in [0, 1] (the models' layout).
pub fn to_planes(img: &RgbImage) -> Vec<f32> {
    (0..3).flat_map(|c| img.pixels().map(move |p| p[c] as f32 / 255.0)).collect()
}

/// The inverse of [`to_planes`]: `[3, size, size]` planes in [0, 1] (clamped) -> an RGB image, rounded.
pub fn from_planes(planes: &[f32], size: usize) -> RgbImage {
    RgbImage::from_fn(size as u32, size as u32, |x, y| {
        let at = |c: usize| (planes[c * size * size + y as usize * size + x as usize].clamp(0.0, 1.0) * 255.0).round() as u8;
        image::Rgb([at(0), at(1), at(2)])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_and_jpeg_round_trip_through_resize_and_crop() {
        let dir = tempfile::tempdir().unwrap();
        // 40x20 image: left half black, right half white.
        let img = RgbImage::from_fn(40, 20, |x, _| if x < 20 { image::Rgb([0, 0, 0]) } else { image::Rgb([255, 255, 255]) });
        let png = dir.path().join("a.png");
        save_png_rgb(&png, &img).unwrap();
        assert_eq!(load_rgb(&png).unwrap(), img, "PNG is lossless");
        let jpg = dir.path().join("a.jpg");
        img.save_with_format(&jpg, ImageFormat::Jpeg).unwrap();
        for path in [&png, &jpg] {
            let sq = load_square(path, 10).unwrap();
            assert_eq!(sq.dimensions(), (10, 10));
            // Centre crop of the 20x10 resize keeps the black/white boundary in the middle.
            assert!(sq.get_pixel(1, 5)[0] < 40 && sq.get_pixel(8, 5)[0] > 215, "{path:?}");
        }
    }

    #[test]
    fn unreadable_images_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.png");
        std::fs::write(&bad, b"\x89PNG\r\n\x1a\n truncated").unwrap();
        assert!(load_rgb(&bad).unwrap_err().to_string().contains("bad.png: corrupt or truncated"));
        let txt = dir.path().join("notes.jpg");
        std::fs::write(&txt, b"hello").unwrap();
        assert!(load_rgb(&txt).unwrap_err().to_string().contains("notes.jpg: corrupt or truncated"));
        let gif = dir.path().join("anim.png");
        std::fs::write(&gif, b"GIF89a\x01\x00\x01\x00").unwrap();
        let err = load_rgb(&gif).unwrap_err().to_string();
        assert!(err.contains("anim.png: not a PNG or JPEG"), "{err}");
        assert!(load_rgb(dir.path().join("absent.png")).unwrap_err().to_string().contains("absent.png: cannot open"));
    }
}
