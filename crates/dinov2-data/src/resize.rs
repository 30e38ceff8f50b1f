//! Pillow-exact bicubic resampling and cropping of 8-bit RGB images.
//!
//! This reproduces Pillow's `Image.resize(size, Image.BICUBIC)` (what torchvision's `Resize`/`RandomResizedCrop`
//! call on PIL images) bit for bit: separable convolution with the Keys cubic (a = -0.5, support 2), the filter
//! stretched by the downscale factor (antialiasing), coefficients computed in double precision, normalised, quantised
//! to 22-bit fixed point, horizontal pass first into an 8-bit intermediate image restricted to the rows the vertical
//! pass needs, then the vertical pass; each pass rounds and clips to 8 bits.

use image::RgbImage;

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point filter coefficients of one resampling pass.
struct Coeffs {
    ksize: usize,
    /// (first input index, number of taps) per output index.
    bounds: Vec<(usize, usize)>,
    k: Vec<i32>,
}

fn precompute(in_size: usize, out_size: usize) -> Coeffs {
    let (in0, in1) = (0.0f64, in_size as f64);
    let scale = (in1 - in0) / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut k = vec![0i32; out_size * ksize];
    let mut w = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = in0 + (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C casts truncate toward zero; the clamps make that equivalent to the C code.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin).min(ksize);
        let mut ww = 0.0;
        for (x, wx) in w.iter_mut().enumerate().take(n) {
            let v = bicubic(((x + xmin) as f64 - center + 0.5) * ss);
            *wx = v;
            ww += v;
        }
        let row = &mut k[xx * ksize..xx * ksize + n];
        for (x, kx) in row.iter_mut().enumerate() {
            let mut v = w[x];
            if ww != 0.0 {
                v /= ww;
            }
            let f = v * f64::from(1u32 << PRECISION_BITS);
            *kx = if v < 0.0 {
                (-0.5 + f) as i32
            } else {
                (0.5 + f) as i32
            };
        }
        bounds.push((xmin, n));
    }
    Coeffs { ksize, bounds, k }
}

#[inline]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// A rectangular region of an RGB image (the result of a PIL `crop` without copying).
///
/// ```
/// use dinov2_data::CropBox;
/// let img = image::RgbImage::new(64, 48);
/// assert_eq!(CropBox::full(&img), CropBox { left: 0, top: 0, width: 64, height: 48 });
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropBox {
    /// Left column.
    pub left: u32,
    /// Top row.
    pub top: u32,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

impl CropBox {
    /// The whole image (see the example of [`CropBox`]).
    pub fn full(img: &RgbImage) -> Self {
        Self {
            left: 0,
            top: 0,
            width: img.width(),
            height: img.height(),
        }
    }
}

/// `img.crop(box).resize((out_w, out_h), BICUBIC)` as Pillow computes it. The box must lie inside the image (the
/// function clamps it otherwise) and `out_w`, `out_h` must be positive (0 gives an empty image).
///
/// ```
/// use dinov2_data::{resize::resized_crop, CropBox};
/// // left half white, right half black: the resized right half is black
/// let img = image::RgbImage::from_fn(40, 20, |x, _| image::Rgb([if x < 20 { 255 } else { 0 }; 3]));
/// let b = CropBox { left: 20, top: 0, width: 20, height: 20 };
/// let out = resized_crop(&img, b, 8, 8);
/// assert_eq!(out.dimensions(), (8, 8));
/// assert!(out.pixels().all(|p| p.0 == [0, 0, 0]));
/// ```
pub fn resized_crop(img: &RgbImage, b: CropBox, out_w: u32, out_h: u32) -> RgbImage {
    let iw = img.width() as usize;
    let left = (b.left as usize).min(iw);
    let top = (b.top as usize).min(img.height() as usize);
    let cw = (b.width as usize).min(iw - left);
    let ch = (b.height as usize).min(img.height() as usize - top);
    let (ow, oh) = (out_w as usize, out_h as usize);
    if ow == 0 || oh == 0 || cw == 0 || ch == 0 {
        return RgbImage::new(out_w, out_h);
    }
    let src = img.as_raw();
    let sstride = iw * 3;
    let need_h = ow != cw;
    let need_v = oh != ch;

    // Horizontal pass (only over the rows the vertical pass will read).
    let vco = if need_v {
        Some(precompute(ch, oh))
    } else {
        None
    };
    let (yfirst, ylast) = match &vco {
        Some(c) => {
            let first = c.bounds[0].0;
            let (lmin, ln) = c.bounds[oh - 1];
            (first, lmin + ln)
        }
        None => (0, ch),
    };
    let rows = ylast - yfirst;
    let tmp: Vec<u8>;
    let (tsrc, tstride, toff): (&[u8], usize, usize) = if need_h {
        let hc = precompute(cw, ow);
        // Transpose the needed region (column-major: for each source column, all rows' RGB), so that each output
        // column is a contiguous, vectorisable sum of whole source columns. Integer sums do not depend on the
        // order, so this is bit-identical to Pillow's row-by-row loop.
        let colen = rows * 3;
        let mut cols = vec![0u8; cw * colen];
        for r in 0..rows {
            let so = (top + yfirst + r) * sstride + left * 3;
            let srow = &src[so..so + cw * 3];
            for (x, p) in srow.chunks_exact(3).enumerate() {
                let d = &mut cols[x * colen + r * 3..x * colen + r * 3 + 3];
                d.copy_from_slice(p);
            }
        }
        let mut t = vec![0u8; rows * ow * 3];
        let mut acc = vec![0i32; colen];
        let half = 1i32 << (PRECISION_BITS - 1);
        for xx in 0..ow {
            let (xmin, n) = hc.bounds[xx];
            let k = &hc.k[xx * hc.ksize..xx * hc.ksize + n];
            acc.fill(half);
            for (j, &kv) in k.iter().enumerate() {
                let col = &cols[(xmin + j) * colen..(xmin + j + 1) * colen];
                // bounded sums: wrapping ops never wrap and keep debug overflow checks out of the hot loop
                for (a, &p) in acc.iter_mut().zip(col) {
                    *a = a.wrapping_add(i32::from(p).wrapping_mul(kv));
                }
            }
            for r in 0..rows {
                let o = r * ow * 3 + xx * 3;
                t[o] = clip8(acc[r * 3]);
                t[o + 1] = clip8(acc[r * 3 + 1]);
                t[o + 2] = clip8(acc[r * 3 + 2]);
            }
        }
        tmp = t;
        (&tmp, ow * 3, 0)
    } else {
        (src, sstride, (top + yfirst) * sstride + left * 3)
    };

    let Some(vc) = vco else {
        // No vertical pass: copy the (horizontally resampled or cropped) rows.
        let mut out = Vec::with_capacity(ow * oh * 3);
        for r in 0..oh {
            out.extend_from_slice(&tsrc[toff + r * tstride..toff + r * tstride + ow * 3]);
        }
        return RgbImage::from_raw(out_w, out_h, out)
            .unwrap_or_else(|| RgbImage::new(out_w, out_h));
    };
    let rowlen = ow * 3;
    let mut out = vec![0u8; oh * rowlen];
    let mut acc = vec![0i32; rowlen];
    for yy in 0..oh {
        let (ymin, n) = vc.bounds[yy];
        let k = &vc.k[yy * vc.ksize..yy * vc.ksize + n];
        acc.fill(1i32 << (PRECISION_BITS - 1));
        for (j, &kv) in k.iter().enumerate() {
            let r = ymin - yfirst + j;
            let srow = &tsrc[toff + r * tstride..toff + r * tstride + rowlen];
            for (a, &p) in acc.iter_mut().zip(srow) {
                *a = a.wrapping_add(i32::from(p).wrapping_mul(kv));
            }
        }
        for (o, &a) in out[yy * rowlen..(yy + 1) * rowlen].iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    RgbImage::from_raw(out_w, out_h, out).unwrap_or_else(|| RgbImage::new(out_w, out_h))
}

/// `img.resize((out_w, out_h), BICUBIC)` as Pillow computes it.
///
/// ```
/// use dinov2_data::resize::resize_bicubic;
/// let img = image::RgbImage::from_pixel(100, 60, image::Rgb([10, 128, 250]));
/// let out = resize_bicubic(&img, 33, 17);
/// assert_eq!(out.dimensions(), (33, 17));
/// assert!(out.pixels().all(|p| p.0 == [10, 128, 250])); // normalised filter: constants stay constant
/// ```
pub fn resize_bicubic(img: &RgbImage, out_w: u32, out_h: u32) -> RgbImage {
    resized_crop(img, CropBox::full(img), out_w, out_h)
}

/// Output size of torchvision `Resize(size)` with an int size: the shorter side becomes `size`, the longer one
/// `int(size * long / short)` (truncated, as Python's `int`).
///
/// ```
/// use dinov2_data::resize::shorter_side_size;
/// assert_eq!(shorter_side_size(640, 480, 256), (341, 256));
/// assert_eq!(shorter_side_size(480, 640, 256), (256, 341));
/// ```
pub fn shorter_side_size(w: u32, h: u32, size: u32) -> (u32, u32) {
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    if short == 0 {
        return (w, h);
    }
    let new_long = (f64::from(size) * f64::from(long) / f64::from(short)) as u32;
    if w <= h {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

/// Python's `round()` (half to even).
pub(crate) fn round_half_even(x: f64) -> f64 {
    x.round_ties_even()
}

/// torchvision `CenterCrop(size)` on a PIL image: zero-pads when the crop is larger than the image, then crops the
/// box whose top-left corner is `round((H - h) / 2), round((W - w) / 2)` (Python rounding, half to even).
///
/// ```
/// use dinov2_data::resize::center_crop;
/// let img = image::RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 + 1, y as u8 + 1, 0]));
/// let c = center_crop(&img, 3, 1);
/// assert_eq!((c.dimensions(), c.get_pixel(0, 0).0), ((3, 1), [2, 2, 0]));
/// let padded = center_crop(&img, 7, 3); // larger than the image: zero padding
/// assert_eq!((padded.get_pixel(0, 0).0, padded.get_pixel(1, 0).0), ([0, 0, 0], [1, 1, 0]));
/// ```
pub fn center_crop(img: &RgbImage, crop_w: u32, crop_h: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    if crop_w > w || crop_h > h {
        let pl = if crop_w > w { (crop_w - w) / 2 } else { 0 };
        let pt = if crop_h > h { (crop_h - h) / 2 } else { 0 };
        let pr = if crop_w > w {
            (crop_w - w).div_ceil(2)
        } else {
            0
        };
        let pb = if crop_h > h {
            (crop_h - h).div_ceil(2)
        } else {
            0
        };
        let mut padded = RgbImage::new(w + pl + pr, h + pt + pb);
        image::imageops::replace(&mut padded, img, i64::from(pl), i64::from(pt));
        return center_crop(&padded, crop_w, crop_h);
    }
    let top = round_half_even(f64::from(h - crop_h) / 2.0) as u32;
    let left = round_half_even(f64::from(w - crop_w) / 2.0) as u32;
    crop(
        img,
        CropBox {
            left,
            top,
            width: crop_w,
            height: crop_h,
        },
    )
}

/// Copies a box out of an image (clamped to the image).
///
/// ```
/// use dinov2_data::{resize::crop, CropBox};
/// let img = image::RgbImage::from_fn(6, 4, |x, y| image::Rgb([x as u8, y as u8, 0]));
/// let c = crop(&img, CropBox { left: 2, top: 1, width: 3, height: 2 });
/// assert_eq!((c.dimensions(), c.get_pixel(0, 0).0), ((3, 2), [2, 1, 0]));
/// ```
pub fn crop(img: &RgbImage, b: CropBox) -> RgbImage {
    image::imageops::crop_imm(img, b.left, b.top, b.width, b.height).to_image()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_round_is_half_to_even() {
        for (x, r) in [
            (0.5, 0.0),
            (1.5, 2.0),
            (2.5, 2.0),
            (3.5, 4.0),
            (16.0, 16.0),
            (16.4, 16.0),
            (16.6, 17.0),
        ] {
            assert_eq!(round_half_even(x), r, "{x}");
        }
    }

    #[test]
    fn identity_and_constant_images() {
        let img = RgbImage::from_fn(9, 5, |x, y| image::Rgb([x as u8 * 20, y as u8 * 40, 200]));
        assert_eq!(resize_bicubic(&img, 9, 5), img);
        // a constant image stays constant at any size (coefficients are normalised)
        let c = RgbImage::from_pixel(37, 23, image::Rgb([10, 128, 255]));
        for (w, h) in [(5, 3), (100, 7), (37, 50), (1, 1)] {
            let r = resize_bicubic(&c, w, h);
            assert!(r.pixels().all(|p| p.0 == [10, 128, 255]), "{w}x{h}");
        }
    }

    #[test]
    fn coefficients_sum_to_one_in_fixed_point() {
        for (i, o) in [(100, 7), (7, 100), (256, 224), (1000, 96), (3, 3)] {
            let c = precompute(i, o);
            for xx in 0..o {
                let (_, n) = c.bounds[xx];
                let s: i64 = c.k[xx * c.ksize..xx * c.ksize + n]
                    .iter()
                    .map(|&v| i64::from(v))
                    .sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= n as i64,
                    "{i}->{o} at {xx}: {s}"
                );
            }
        }
    }

    #[test]
    fn shorter_side_matches_torchvision_rule() {
        assert_eq!(shorter_side_size(640, 480, 256), (341, 256));
        assert_eq!(shorter_side_size(480, 640, 256), (256, 341));
        assert_eq!(shorter_side_size(300, 300, 256), (256, 256));
    }
}
