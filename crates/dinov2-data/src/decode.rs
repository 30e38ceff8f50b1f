//! Robust image decoding to 8-bit RGB.
//!
//! Supports JPEG (incl. CMYK/YCCK), PNG (incl. 16-bit, palette, grey, alpha), WebP, BMP, TIFF (incl. CMYK) and GIF
//! (first frame). The EXIF orientation is applied. Every input is converted to 8-bit RGB: grey is replicated, alpha is
//! dropped (like PIL's `convert("RGB")`), 16-bit samples are scaled to 8 bits (PIL clips them instead, a known PIL
//! quirk we do not copy). A pixel-count limit, checked on the declared size *before* decoding, guards against
//! decompression bombs.

use std::io::{BufRead, Cursor, Read, Seek};
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};

use crate::error::{Error, Result};

/// PIL's `Image.MAX_IMAGE_PIXELS` (it warns above it and refuses above twice it); we refuse above it by default.
pub const DEFAULT_MAX_PIXELS: u64 = 89_478_485;

/// Decoding options.
///
/// ```
/// use dinov2_data::{DecodeOptions, decode::DEFAULT_MAX_PIXELS};
/// let o = DecodeOptions::default();
/// assert_eq!((o.max_pixels, o.apply_exif_orientation), (DEFAULT_MAX_PIXELS, true));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Refuse images whose declared width*height exceeds this (decompression-bomb guard).
    pub max_pixels: u64,
    /// Apply the EXIF orientation tag (JPEG, TIFF, WebP). Default true.
    pub apply_exif_orientation: bool,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        Self {
            max_pixels: DEFAULT_MAX_PIXELS,
            apply_exif_orientation: true,
        }
    }
}

/// Loads an image file as 8-bit RGB with the default [`DecodeOptions`].
///
/// Errors carry the path: [`Error::Io`] when the file cannot be read, [`Error::Decode`] when it is not a readable
/// image, [`Error::TooManyPixels`] above the decompression-bomb limit.
///
/// ```
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("red.png");
/// image::RgbImage::from_pixel(4, 3, image::Rgb([255, 0, 0])).save(&path)?;
/// let img = dinov2_data::load_rgb(&path)?;
/// assert_eq!(img.dimensions(), (4, 3));
/// assert_eq!(img.get_pixel(0, 0).0, [255, 0, 0]);
/// assert!(matches!(
///     dinov2_data::load_rgb(dir.path().join("missing.png")),
///     Err(dinov2_data::Error::Io { path: Some(_), .. })
/// ));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn load_rgb(path: impl AsRef<Path>) -> Result<RgbImage> {
    load_rgb_with(path, &DecodeOptions::default())
}

/// Loads an image file as 8-bit RGB.
///
/// ```
/// use dinov2_data::{load_rgb_with, DecodeOptions, Error};
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("grey.png");
/// image::RgbImage::from_pixel(40, 30, image::Rgb([9, 9, 9])).save(&path)?;
/// let small_limit = DecodeOptions { max_pixels: 1000, ..Default::default() };
/// assert!(matches!(
///     load_rgb_with(&path, &small_limit),
///     Err(Error::TooManyPixels { width: 40, height: 30, .. })
/// ));
/// assert_eq!(load_rgb_with(&path, &DecodeOptions::default())?.dimensions(), (40, 30));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn load_rgb_with(path: impl AsRef<Path>, opts: &DecodeOptions) -> Result<RgbImage> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_rgb(&bytes, opts).map_err(|e| e.with_path(path))
}

/// Decodes an in-memory encoded image (any supported format, detected from the content) to 8-bit RGB.
///
/// ```
/// use dinov2_data::{decode_rgb, DecodeOptions, Error};
/// let mut png = std::io::Cursor::new(Vec::new());
/// image::RgbImage::from_pixel(5, 2, image::Rgb([1, 2, 3])).write_to(&mut png, image::ImageFormat::Png)?;
/// let img = decode_rgb(png.get_ref(), &DecodeOptions::default())?;
/// assert_eq!((img.dimensions(), img.get_pixel(4, 1).0), ((5, 2), [1, 2, 3]));
/// assert!(matches!(decode_rgb(b"GIF89a garbage", &DecodeOptions::default()), Err(Error::Decode { .. })));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn decode_rgb(bytes: &[u8], opts: &DecodeOptions) -> Result<RgbImage> {
    if bytes.is_empty() {
        return Err(Error::Decode {
            path: None,
            reason: "empty file (0 bytes)".into(),
        });
    }
    let img = decode_dynamic(Cursor::new(bytes), opts)?;
    Ok(to_rgb8(img))
}

fn decode_err(e: impl std::fmt::Display) -> Error {
    Error::Decode {
        path: None,
        reason: e.to_string(),
    }
}

fn decode_dynamic<R: BufRead + Seek>(reader: R, opts: &DecodeOptions) -> Result<DynamicImage> {
    let mut reader = ImageReader::new(reader)
        .with_guessed_format()
        .map_err(decode_err)?;
    if reader.format().is_none() {
        return Err(Error::Decode {
            path: None,
            reason: "unrecognised image format".into(),
        });
    }
    // Let the decoders allocate what a max_pixels RGBA16 image needs, plus slack.
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(opts.max_pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(decode_err)?;
    let (w, h) = decoder.dimensions();
    let pixels = u64::from(w) * u64::from(h);
    if pixels > opts.max_pixels {
        return Err(Error::TooManyPixels {
            path: None,
            width: w,
            height: h,
            pixels,
            limit: opts.max_pixels,
        });
    }
    if pixels == 0 {
        return Err(Error::Decode {
            path: None,
            reason: format!("image has zero size {w}x{h}"),
        });
    }
    let orientation = if opts.apply_exif_orientation {
        decoder.orientation().ok()
    } else {
        None
    };
    let mut img = DynamicImage::from_decoder(decoder).map_err(decode_err)?;
    if let Some(o) = orientation {
        img.apply_orientation(o);
    }
    Ok(img)
}

/// Converts any decoded image to 8-bit RGB (grey replicated, alpha dropped, 16-bit/float scaled).
///
/// ```
/// let grey = image::GrayImage::from_pixel(2, 2, image::Luma([77]));
/// let rgb = dinov2_data::decode::to_rgb8(image::DynamicImage::ImageLuma8(grey));
/// assert_eq!(rgb.get_pixel(1, 1).0, [77, 77, 77]);
/// ```
pub fn to_rgb8(img: DynamicImage) -> RgbImage {
    match img {
        DynamicImage::ImageRgb8(i) => i,
        other => other.to_rgb8(),
    }
}

/// Reads a whole stream into memory and decodes it (used for tar members).
///
/// ```
/// use dinov2_data::{decode::decode_rgb_from_reader, DecodeOptions};
/// let mut bmp = std::io::Cursor::new(Vec::new());
/// image::RgbImage::from_pixel(3, 3, image::Rgb([0, 200, 0])).write_to(&mut bmp, image::ImageFormat::Bmp)?;
/// bmp.set_position(0);
/// let img = decode_rgb_from_reader(bmp, &DecodeOptions::default())?;
/// assert_eq!(img.get_pixel(2, 2).0, [0, 200, 0]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn decode_rgb_from_reader(mut r: impl Read, opts: &DecodeOptions) -> Result<RgbImage> {
    let mut buf = Vec::new();
    r.read_to_end(&mut buf).map_err(|e| Error::Io {
        path: None,
        source: e,
    })?;
    decode_rgb(&buf, opts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageFormat, Rgb};

    fn encode(img: &DynamicImage, fmt: ImageFormat) -> Vec<u8> {
        let mut c = Cursor::new(Vec::new());
        img.write_to(&mut c, fmt).unwrap();
        c.into_inner()
    }

    fn pattern(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            Rgb([
                (x * 17 % 256) as u8,
                (y * 29 % 256) as u8,
                ((x + y) * 7 % 256) as u8,
            ])
        })
    }

    #[test]
    fn lossless_formats_roundtrip_exactly() {
        let src = pattern(13, 7);
        for fmt in [ImageFormat::Png, ImageFormat::Bmp, ImageFormat::Tiff] {
            let bytes = encode(&DynamicImage::ImageRgb8(src.clone()), fmt);
            let out = decode_rgb(&bytes, &DecodeOptions::default()).unwrap();
            assert_eq!(out, src, "{fmt:?}");
        }
    }

    #[test]
    fn grey_alpha_and_16bit_become_rgb() {
        let grey = image::GrayImage::from_fn(5, 4, |x, y| image::Luma([(x * 40 + y) as u8]));
        let out = decode_rgb(
            &encode(&DynamicImage::ImageLuma8(grey.clone()), ImageFormat::Png),
            &Default::default(),
        )
        .unwrap();
        for (x, y, p) in out.enumerate_pixels() {
            let g = grey.get_pixel(x, y)[0];
            assert_eq!(p.0, [g, g, g]);
        }
        let rgba =
            image::RgbaImage::from_fn(5, 4, |x, y| image::Rgba([x as u8 * 50, y as u8 * 60, 7, 3]));
        let out = decode_rgb(
            &encode(&DynamicImage::ImageRgba8(rgba.clone()), ImageFormat::Png),
            &Default::default(),
        )
        .unwrap();
        for (x, y, p) in out.enumerate_pixels() {
            let q = rgba.get_pixel(x, y).0;
            assert_eq!(p.0, [q[0], q[1], q[2]]);
        }
        let deep = image::ImageBuffer::<Rgb<u16>, Vec<u16>>::from_fn(4, 3, |x, y| {
            Rgb([x as u16 * 257 * 60, 65535, y as u16 * 257 * 100])
        });
        let out = decode_rgb(
            &encode(&DynamicImage::ImageRgb16(deep.clone()), ImageFormat::Png),
            &Default::default(),
        )
        .unwrap();
        for (x, y, p) in out.enumerate_pixels() {
            let q = deep.get_pixel(x, y).0;
            assert_eq!(p.0, [(q[0] / 257) as u8, 255, (q[2] / 257) as u8]);
        }
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        let o = DecodeOptions::default();
        assert!(matches!(decode_rgb(&[], &o), Err(Error::Decode { .. })));
        assert!(matches!(
            decode_rgb(b"hello, this is not an image at all", &o),
            Err(Error::Decode { .. })
        ));
        let png = encode(&DynamicImage::ImageRgb8(pattern(32, 32)), ImageFormat::Png);
        assert!(decode_rgb(&png[..png.len() / 2], &o).is_err());
        let jpg = encode(&DynamicImage::ImageRgb8(pattern(64, 64)), ImageFormat::Jpeg);
        // a JPEG cut in its header must fail; one cut in its entropy data may decode partially, but never panics
        assert!(decode_rgb(&jpg[..40], &o).is_err());
        let _ = decode_rgb(&jpg[..jpg.len() / 2], &o);
    }

    #[test]
    fn pixel_limit_is_enforced_before_decoding() {
        let png = encode(&DynamicImage::ImageRgb8(pattern(40, 30)), ImageFormat::Png);
        let o = DecodeOptions {
            max_pixels: 40 * 30 - 1,
            ..Default::default()
        };
        match decode_rgb(&png, &o) {
            Err(Error::TooManyPixels {
                width: 40,
                height: 30,
                pixels: 1200,
                ..
            }) => {}
            other => panic!("expected TooManyPixels, got {other:?}"),
        }
        let o = DecodeOptions {
            max_pixels: 40 * 30,
            ..Default::default()
        };
        assert!(decode_rgb(&png, &o).is_ok());
    }
}
