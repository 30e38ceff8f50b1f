//! Image transforms with torchvision-on-PIL semantics, on 8-bit RGB images.
//!
//! Each deterministic operation reproduces what torchvision does to a PIL image (which is what the official
//! `DataAugmentationDINO` feeds it): Pillow's fixed-point/float formulas, rounding and clipping included. The random
//! wrappers sample their parameters like torchvision (same distributions; the random stream itself is ours, seeded
//! per sample, see [`crate::loader`]).

use image::RgbImage;
use rand::seq::SliceRandom;
use rand::Rng;

use crate::resize::{resized_crop, CropBox};

/// Pillow's `convert("L")`: ITU-R 601-2 luma in 16-bit fixed point, `(19595 R + 38470 G + 7471 B + 0x8000) >> 16`.
///
/// ```
/// use dinov2_data::transforms::luma;
/// assert_eq!(luma(&[255, 255, 255]), 255);
/// assert_eq!(luma(&[255, 0, 0]), 76);
/// ```
#[inline]
pub fn luma(p: &[u8]) -> u8 {
    ((u32::from(p[0]) * 19595 + u32::from(p[1]) * 38470 + u32::from(p[2]) * 7471 + 0x8000) >> 16)
        as u8
}

/// Pillow's `Image.blend(a, b, alpha)` for one 8-bit value: `a + alpha * (b - a)` in `f32`, truncated and clipped.
#[inline]
fn blend(a: u8, b: u8, alpha: f32) -> u8 {
    let t = f32::from(a) + alpha * (f32::from(b) - f32::from(a));
    // `as u8` saturates (t <= 0 -> 0, t >= 255 -> 255) and truncates toward zero, like Pillow's two branches.
    t as u8
}

/// Horizontal flip (in place).
///
/// ```
/// let mut img = image::RgbImage::from_fn(3, 1, |x, _| image::Rgb([x as u8; 3]));
/// dinov2_data::transforms::hflip(&mut img);
/// assert_eq!(img.get_pixel(0, 0).0, [2, 2, 2]);
/// ```
pub fn hflip(img: &mut RgbImage) {
    image::imageops::flip_horizontal_in_place(img);
}

/// torchvision `adjust_brightness` (PIL `ImageEnhance.Brightness`): blend with black.
///
/// ```
/// let mut img = image::RgbImage::from_pixel(2, 2, image::Rgb([100, 200, 250]));
/// dinov2_data::transforms::adjust_brightness(&mut img, 1.2);
/// assert_eq!(img.get_pixel(0, 0).0, [120, 240, 255]); // scaled, clipped at 255
/// ```
pub fn adjust_brightness(img: &mut RgbImage, factor: f64) {
    let a = factor as f32;
    let mut lut = [0u8; 256];
    for (v, l) in lut.iter_mut().enumerate() {
        *l = blend(0, v as u8, a);
    }
    for v in img.iter_mut() {
        *v = lut[*v as usize];
    }
}

/// torchvision `adjust_contrast` (PIL `ImageEnhance.Contrast`): blend with the constant grey
/// `int(mean(L) + 0.5)`.
///
/// ```
/// let mut img = image::RgbImage::from_fn(2, 1, |x, _| image::Rgb([if x == 0 { 100 } else { 200 }; 3]));
/// dinov2_data::transforms::adjust_contrast(&mut img, 0.0); // factor 0: the mean grey everywhere
/// assert!(img.pixels().all(|p| p.0 == [150, 150, 150]));
/// ```
pub fn adjust_contrast(img: &mut RgbImage, factor: f64) {
    let n = (img.width() as u64 * img.height() as u64).max(1);
    let sum: u64 = img
        .as_raw()
        .chunks_exact(3)
        .map(|p| u64::from(luma(p)))
        .sum();
    let mean = (sum as f64 / n as f64 + 0.5) as u8;
    let a = factor as f32;
    let mut lut = [0u8; 256];
    for (v, l) in lut.iter_mut().enumerate() {
        *l = blend(mean, v as u8, a);
    }
    for v in img.iter_mut() {
        *v = lut[*v as usize];
    }
}

/// torchvision `adjust_saturation` (PIL `ImageEnhance.Color`): blend with the pixel's own grey.
///
/// ```
/// use dinov2_data::transforms::{adjust_saturation, luma};
/// let mut img = image::RgbImage::from_pixel(1, 1, image::Rgb([200, 40, 90]));
/// let grey = luma(&img.get_pixel(0, 0).0);
/// adjust_saturation(&mut img, 0.0); // factor 0: fully desaturated
/// assert_eq!(img.get_pixel(0, 0).0, [grey; 3]);
/// ```
pub fn adjust_saturation(img: &mut RgbImage, factor: f64) {
    let a = factor as f32;
    for p in img.as_mut().chunks_exact_mut(3) {
        let l = luma(p);
        for v in p.iter_mut() {
            *v = blend(l, *v, a);
        }
    }
}

/// C `round()` (half away from zero) of a non-negative finite value, without a libm call.
#[inline]
fn round_pos(x: f64) -> i32 {
    let t = x as i32; // truncation == floor for x >= 0
    if x - f64::from(t) >= 0.5 {
        t + 1
    } else {
        t
    }
}

/// Pillow `rgb2hsv` for one pixel (same float/double steps as the C code).
#[inline]
fn rgb2hsv(r: u8, g: u8, b: u8) -> (u8, u8, u8) {
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    if maxc == minc {
        return (0, 0, maxc);
    }
    let cr = f32::from(maxc - minc);
    let s = cr / f32::from(maxc);
    let h: f32 = if r == maxc {
        let bc = f32::from(maxc - b) / cr;
        let gc = f32::from(maxc - g) / cr;
        bc - gc
    } else if g == maxc {
        let rc = f32::from(maxc - r) / cr;
        let bc = f32::from(maxc - b) / cr;
        (2.0 + f64::from(rc) - f64::from(bc)) as f32
    } else {
        let gc = f32::from(maxc - g) / cr;
        let rc = f32::from(maxc - r) / cr;
        (4.0 + f64::from(gc) - f64::from(rc)) as f32
    };
    // fmod(t, 1.0) for t in (0, 2): exact, like the subtraction below
    let t = f64::from(h) / 6.0 + 1.0;
    let h = (if t >= 1.0 { t - 1.0 } else { t }) as f32;
    let uh = ((f64::from(h) * 255.0) as i32).clamp(0, 255) as u8;
    let us = ((f64::from(s) * 255.0) as i32).clamp(0, 255) as u8;
    (uh, us, maxc)
}

/// Pillow `hsv2rgb` for one pixel (reference for the table-driven version).
#[cfg_attr(not(test), allow(dead_code))]
#[inline]
fn hsv2rgb(h: u8, s: u8, v: u8) -> [u8; 3] {
    if s == 0 {
        return [v, v, v];
    }
    let hh = f64::from(h) * 6.0 / 255.0;
    let i = hh as i32; // floor for hh >= 0
    let f = (hh - f64::from(i)) as f32;
    let fs = (f64::from(s) / 255.0) as f32;
    let vf = f64::from(v);
    let clip = |x: f64| round_pos(x.max(0.0)).clamp(0, 255) as u8;
    let p = clip(vf * (1.0 - f64::from(fs)));
    let q = clip(vf * (1.0 - f64::from(fs * f)));
    let t = clip(vf * (1.0 - f64::from(fs) * (1.0 - f64::from(f))));
    match i % 6 {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

/// Lookup tables that make Pillow's HSV round trip cheap while computing exactly the same values: the 8-bit hue
/// only depends on which channel is the maximum and on the two other channels' distances to it, the 8-bit saturation
/// on (max - min, max); the per-hue and per-saturation factors of `hsv2rgb` are tabulated.
struct HsvTables {
    /// [max channel 0/1/2][d1 * 256 + d2] -> 8-bit hue.
    hue: Vec<[u8; 65536]>,
    /// [cr * 256 + maxc] -> 8-bit saturation.
    sat: Box<[u8; 65536]>,
    /// per 8-bit hue: (sector i, fraction f) as `hsv2rgb` computes them.
    sector: [(i32, f32); 256],
    /// per 8-bit saturation: `fs = s / 255.0` as `f32`.
    fs: [f32; 256],
}

fn hsv_tables() -> &'static HsvTables {
    static T: std::sync::OnceLock<HsvTables> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let mut hue = vec![[0u8; 65536]; 3];
        let mut sat = Box::new([0u8; 65536]);
        for d1 in 0..256usize {
            for d2 in 0..256usize {
                // a representative pixel with max = 255 (the hue only depends on the distances)
                let (a, b) = ((255 - d1) as u8, (255 - d2) as u8);
                let cr_ok = d1 > 0 || d2 > 0;
                if cr_ok {
                    // r is max: (db, dg) = (d1, d2)
                    hue[0][d1 * 256 + d2] = rgb2hsv(255, b, a).0;
                    // g is max (r < g): (dr, db) = (d1, d2)
                    hue[1][d1 * 256 + d2] = rgb2hsv(a, 255, b).0;
                    // b is max (r, g < b): (dg, dr) = (d1, d2)
                    hue[2][d1 * 256 + d2] = rgb2hsv(b, a, 255).0;
                }
                if d1 >= 1 && d2 >= d1 {
                    // cr = d1, maxc = d2
                    sat[d1 * 256 + d2] = rgb2hsv(d2 as u8, (d2 - d1) as u8, (d2 - d1) as u8).1;
                }
            }
        }
        let mut sector = [(0i32, 0f32); 256];
        let mut fs = [0f32; 256];
        for v in 0..256usize {
            let hh = v as f64 * 6.0 / 255.0;
            let i = hh as i32;
            sector[v] = (i, (hh - f64::from(i)) as f32);
            fs[v] = (v as f64 / 255.0) as f32;
        }
        HsvTables {
            hue,
            sat,
            sector,
            fs,
        }
    })
}

#[inline]
fn rgb2hsv_lut(t: &HsvTables, r: u8, g: u8, b: u8) -> (u8, u8, u8) {
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    if maxc == minc {
        return (0, 0, maxc);
    }
    let (dr, dg, db) = (
        usize::from(maxc - r),
        usize::from(maxc - g),
        usize::from(maxc - b),
    );
    let h = if r == maxc {
        t.hue[0][db * 256 + dg]
    } else if g == maxc {
        t.hue[1][dr * 256 + db]
    } else {
        t.hue[2][dg * 256 + dr]
    };
    (
        h,
        t.sat[usize::from(maxc - minc) * 256 + usize::from(maxc)],
        maxc,
    )
}

#[inline]
fn hsv2rgb_lut(t: &HsvTables, h: u8, s: u8, v: u8) -> [u8; 3] {
    if s == 0 {
        return [v, v, v];
    }
    let (i, f) = t.sector[usize::from(h)];
    let fs = t.fs[usize::from(s)];
    let vf = f64::from(v);
    let clip = |x: f64| round_pos(x.max(0.0)).clamp(0, 255) as u8;
    let p = clip(vf * (1.0 - f64::from(fs)));
    let q = clip(vf * (1.0 - f64::from(fs * f)));
    let tt = clip(vf * (1.0 - f64::from(fs) * (1.0 - f64::from(f))));
    match i % 6 {
        0 => [v, tt, p],
        1 => [q, v, p],
        2 => [p, v, tt],
        3 => [p, q, v],
        4 => [tt, p, v],
        _ => [v, p, q],
    }
}

/// torchvision `adjust_hue` on PIL: to Pillow HSV, add `int(hue * 255)` (truncated, wrapping) to the 8-bit hue,
/// back to RGB. `hue` must be in [-0.5, 0.5].
///
/// ```
/// use dinov2_data::transforms::adjust_hue;
/// let mut img = image::RgbImage::from_pixel(1, 1, image::Rgb([255, 0, 0]));
/// adjust_hue(&mut img, 1.0 / 3.0); // red shifted by a third of the hue circle: green
/// let [r, g, b] = img.get_pixel(0, 0).0;
/// assert!(g == 255 && r < 10 && b < 10, "{r} {g} {b}");
/// let mut grey = image::RgbImage::from_pixel(1, 1, image::Rgb([90, 90, 90]));
/// adjust_hue(&mut grey, 0.4); // greys have no hue
/// assert_eq!(grey.get_pixel(0, 0).0, [90, 90, 90]);
/// ```
pub fn adjust_hue(img: &mut RgbImage, hue: f64) {
    let shift = (hue * 255.0) as i32 as u8;
    let t = hsv_tables();
    for p in img.as_mut().chunks_exact_mut(3) {
        let (h, s, v) = rgb2hsv_lut(t, p[0], p[1], p[2]);
        p.copy_from_slice(&hsv2rgb_lut(t, h.wrapping_add(shift), s, v));
    }
}

/// torchvision `rgb_to_grayscale(num_output_channels=3)` on PIL: luma replicated to 3 channels.
///
/// ```
/// let mut img = image::RgbImage::from_pixel(1, 1, image::Rgb([255, 0, 0]));
/// dinov2_data::transforms::to_grayscale(&mut img);
/// assert_eq!(img.get_pixel(0, 0).0, [76, 76, 76]);
/// ```
pub fn to_grayscale(img: &mut RgbImage) {
    for p in img.as_mut().chunks_exact_mut(3) {
        let l = luma(p);
        p.fill(l);
    }
}

/// PIL `ImageOps.solarize`: values `>= threshold` become `255 - v`.
///
/// ```
/// let mut img = image::RgbImage::from_pixel(1, 1, image::Rgb([10, 128, 250]));
/// dinov2_data::transforms::solarize(&mut img, 128);
/// assert_eq!(img.get_pixel(0, 0).0, [10, 127, 5]);
/// ```
pub fn solarize(img: &mut RgbImage, threshold: u8) {
    for v in img.iter_mut() {
        if *v >= threshold {
            *v = 255 - *v;
        }
    }
}

/// torchvision's 1-D Gaussian kernel: `exp(-0.5 (x / sigma)^2)` on `linspace(-(k-1)/2, (k-1)/2, k)`, normalised,
/// in `f32`.
///
/// ```
/// let k = dinov2_data::transforms::gaussian_kernel1d(9, 1.0);
/// assert_eq!(k.len(), 9);
/// assert!((k.iter().sum::<f32>() - 1.0).abs() < 1e-6);
/// assert!(k[4] > k[3] && k[3] == k[5]);
/// ```
pub fn gaussian_kernel1d(kernel_size: usize, sigma: f32) -> Vec<f32> {
    let half = (kernel_size as f32 - 1.0) * 0.5;
    let pdf: Vec<f32> = (0..kernel_size)
        .map(|i| {
            let x = -half + i as f32;
            (-0.5 * (x / sigma).powi(2)).exp()
        })
        .collect();
    let s: f32 = pdf.iter().sum();
    pdf.into_iter().map(|v| v / s).collect()
}

#[inline]
fn reflect(i: isize, n: isize) -> usize {
    // torch "reflect" padding (edge not repeated); folded again for tiny images
    let mut i = i;
    if n == 1 {
        return 0;
    }
    loop {
        if i < 0 {
            i = -i;
        } else if i >= n {
            i = 2 * (n - 1) - i;
        } else {
            return i as usize;
        }
    }
}

/// torchvision `gaussian_blur(img, kernel_size, sigma)` on a PIL image: reflect padding, Gaussian convolution in
/// `f32`, rounded half to even back to 8 bits. We convolve separably (torchvision uses the 2-D outer-product kernel);
/// the results differ only in float rounding, i.e. by at most 1 level where a value sits at .5.
///
/// ```
/// use dinov2_data::transforms::gaussian_blur;
/// let mut img = image::RgbImage::new(9, 9);
/// img.put_pixel(4, 4, image::Rgb([255, 255, 255])); // a single bright dot spreads out
/// let out = gaussian_blur(&img, 9, 1.0);
/// let (centre, next) = (out.get_pixel(4, 4)[0], out.get_pixel(5, 4)[0]);
/// assert!(centre < 255 && next > 0 && centre > next);
/// ```
pub fn gaussian_blur(img: &RgbImage, kernel_size: usize, sigma: f32) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return img.clone();
    }
    let k = gaussian_kernel1d(kernel_size, sigma);
    let r = kernel_size / 2;
    let src = img.as_raw();
    let rowlen = w * 3;
    // horizontal pass into f32, over a reflect-padded copy of each row (contiguous, vectorisable)
    let mut tmp = vec![0f32; w * h * 3];
    let mut padded = vec![0f32; (w + 2 * r) * 3];
    let xsrc: Vec<usize> = (0..w + 2 * r)
        .map(|x| reflect(x as isize - r as isize, w as isize))
        .collect();
    for y in 0..h {
        let row = &src[y * rowlen..(y + 1) * rowlen];
        for (pp, &xs) in padded.chunks_exact_mut(3).zip(&xsrc) {
            pp[0] = f32::from(row[xs * 3]);
            pp[1] = f32::from(row[xs * 3 + 1]);
            pp[2] = f32::from(row[xs * 3 + 2]);
        }
        let out = &mut tmp[y * rowlen..(y + 1) * rowlen];
        out.fill(0.0);
        for (j, &kv) in k.iter().enumerate() {
            for (o, &p) in out.iter_mut().zip(&padded[j * 3..j * 3 + rowlen]) {
                *o += p * kv;
            }
        }
    }
    // vertical pass, rounding
    let mut out = vec![0u8; w * h * 3];
    let mut acc = vec![0f32; rowlen];
    for y in 0..h as isize {
        acc.fill(0.0);
        for (j, &kv) in k.iter().enumerate() {
            let yy = reflect(y + j as isize - r as isize, h as isize);
            for (a, &v) in acc.iter_mut().zip(&tmp[yy * rowlen..(yy + 1) * rowlen]) {
                *a += v * kv;
            }
        }
        let y = y as usize;
        for (o, &a) in out[y * rowlen..(y + 1) * rowlen].iter_mut().zip(&acc) {
            *o = a.round_ties_even().clamp(0.0, 255.0) as u8;
        }
    }
    RgbImage::from_raw(w as u32, h as u32, out).unwrap_or_else(|| img.clone())
}

/// torchvision `RandomResizedCrop` parameters and sampling.
///
/// ```
/// use dinov2_data::rand::SeedableRng;
/// use dinov2_data::{rand_chacha::ChaCha8Rng, RandomResizedCrop};
/// let rrc = RandomResizedCrop::new(96, (0.05, 0.32));
/// let mut rng = ChaCha8Rng::seed_from_u64(0);
/// let b = rrc.get_params(500, 375, &mut rng); // the box only
/// let area = f64::from(b.width * b.height) / (500.0 * 375.0);
/// assert!(b.left + b.width <= 500 && b.top + b.height <= 375);
/// assert!((0.04..0.33).contains(&area), "{area}"); // scale range, up to rounding of the sides
/// let img = image::RgbImage::new(500, 375);
/// assert_eq!(rrc.apply(&img, &mut rng).dimensions(), (96, 96)); // box + resize
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RandomResizedCrop {
    /// Output size (square).
    pub size: u32,
    /// Range of the crop area as a fraction of the image area.
    pub scale: (f64, f64),
    /// Range of the crop aspect ratio (w/h), sampled log-uniformly.
    pub ratio: (f64, f64),
}

impl RandomResizedCrop {
    /// `RandomResizedCrop(size, scale)` with the default ratio (3/4, 4/3) (example: [`RandomResizedCrop`]).
    pub fn new(size: u32, scale: (f64, f64)) -> Self {
        Self {
            size,
            scale,
            ratio: (3.0 / 4.0, 4.0 / 3.0),
        }
    }

    /// torchvision `RandomResizedCrop.get_params`: 10 attempts of (area ~ U(scale) * A, log-ratio uniform,
    /// w = round(sqrt(area*r)), h = round(sqrt(area/r))), accepted if it fits, with a uniform position; otherwise
    /// the central crop with the ratio clamped to the allowed range (example: [`RandomResizedCrop`]).
    pub fn get_params<R: Rng + ?Sized>(&self, width: u32, height: u32, rng: &mut R) -> CropBox {
        if width == 0 || height == 0 {
            return CropBox {
                left: 0,
                top: 0,
                width,
                height,
            };
        }
        let area = f64::from(width) * f64::from(height);
        let (lr0, lr1) = (self.ratio.0.ln(), self.ratio.1.ln());
        for _ in 0..10 {
            let target_area = area * uniform(rng, self.scale.0, self.scale.1);
            let aspect = uniform(rng, lr0, lr1).exp();
            let w = (target_area * aspect).sqrt().round_ties_even() as i64;
            let h = (target_area / aspect).sqrt().round_ties_even() as i64;
            if 0 < w && w <= i64::from(width) && 0 < h && h <= i64::from(height) {
                let top = rng.random_range(0..=(i64::from(height) - h)) as u32;
                let left = rng.random_range(0..=(i64::from(width) - w)) as u32;
                return CropBox {
                    left,
                    top,
                    width: w as u32,
                    height: h as u32,
                };
            }
        }
        let in_ratio = f64::from(width) / f64::from(height);
        let (w, h) = if in_ratio < self.ratio.0.min(self.ratio.1) {
            (
                width,
                (f64::from(width) / self.ratio.0.min(self.ratio.1)).round_ties_even() as u32,
            )
        } else if in_ratio > self.ratio.0.max(self.ratio.1) {
            (
                (f64::from(height) * self.ratio.0.max(self.ratio.1)).round_ties_even() as u32,
                height,
            )
        } else {
            (width, height)
        };
        let (w, h) = (w.clamp(1, width.max(1)), h.clamp(1, height.max(1)));
        CropBox {
            left: (width - w) / 2,
            top: (height - h) / 2,
            width: w,
            height: h,
        }
    }

    /// Samples a box and returns the resized crop (example: [`RandomResizedCrop`]).
    pub fn apply<R: Rng + ?Sized>(&self, img: &RgbImage, rng: &mut R) -> RgbImage {
        let b = self.get_params(img.width(), img.height(), rng);
        resized_crop(img, b, self.size, self.size)
    }
}

/// `U(a, b)` like `torch.empty(1).uniform_(a, b)` / Python `random.uniform` (a + (b - a) * U[0, 1)).
///
/// ```
/// use dinov2_data::rand::SeedableRng;
/// let mut rng = dinov2_data::rand_chacha::ChaCha8Rng::seed_from_u64(3);
/// let v = dinov2_data::transforms::uniform(&mut rng, 0.1, 2.0);
/// assert!((0.1..2.0).contains(&v));
/// ```
#[inline]
pub fn uniform<R: Rng + ?Sized>(rng: &mut R, a: f64, b: f64) -> f64 {
    a + (b - a) * rng.random::<f64>()
}

/// One of the four ColorJitter operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JitterOp {
    /// brightness
    Brightness,
    /// contrast
    Contrast,
    /// saturation
    Saturation,
    /// hue
    Hue,
}

/// Sampled ColorJitter parameters: a random order of the four ops and their factors.
///
/// ```
/// use dinov2_data::transforms::{adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation};
/// use dinov2_data::{JitterOp, JitterParams};
/// let p = JitterParams {
///     order: [JitterOp::Hue, JitterOp::Saturation, JitterOp::Contrast, JitterOp::Brightness],
///     brightness: 0.8,
///     contrast: 1.3,
///     saturation: 0.9,
///     hue: 0.05,
/// };
/// let img = image::RgbImage::from_fn(8, 8, |x, y| image::Rgb([x as u8 * 30, y as u8 * 30, 90]));
/// let mut jittered = img.clone();
/// p.apply(&mut jittered);
/// // the same as the four operations applied in `order`
/// let mut manual = img.clone();
/// adjust_hue(&mut manual, 0.05);
/// adjust_saturation(&mut manual, 0.9);
/// adjust_contrast(&mut manual, 1.3);
/// adjust_brightness(&mut manual, 0.8);
/// assert_eq!(jittered, manual);
/// assert_ne!(jittered, img);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct JitterParams {
    /// Order of application (a permutation, like `torch.randperm(4)`).
    pub order: [JitterOp; 4],
    /// Brightness factor.
    pub brightness: f64,
    /// Contrast factor.
    pub contrast: f64,
    /// Saturation factor.
    pub saturation: f64,
    /// Hue shift in [-0.5, 0.5].
    pub hue: f64,
}

impl JitterParams {
    /// Applies the ops in `order` (example: [`JitterParams`]).
    pub fn apply(&self, img: &mut RgbImage) {
        for op in self.order {
            match op {
                JitterOp::Brightness => adjust_brightness(img, self.brightness),
                JitterOp::Contrast => adjust_contrast(img, self.contrast),
                JitterOp::Saturation => adjust_saturation(img, self.saturation),
                JitterOp::Hue => adjust_hue(img, self.hue),
            }
        }
    }
}

/// torchvision `ColorJitter(brightness, contrast, saturation, hue)`: factors uniform in `[1-b, 1+b]`, `[1-c, 1+c]`,
/// `[1-s, 1+s]` and a hue shift uniform in `[-h, h]`, applied in a uniformly random order.
///
/// ```
/// use dinov2_data::rand::SeedableRng;
/// use dinov2_data::{rand_chacha::ChaCha8Rng, ColorJitter};
/// let jitter = ColorJitter { brightness: 0.4, contrast: 0.4, saturation: 0.2, hue: 0.1 };
/// let p = jitter.sample(&mut ChaCha8Rng::seed_from_u64(1));
/// assert!((0.6..=1.4).contains(&p.brightness) && (-0.1..=0.1).contains(&p.hue));
/// let mut order = p.order.to_vec();
/// order.sort_by_key(|op| *op as u8);
/// assert_eq!(order.len(), 4);
/// order.dedup();
/// assert_eq!(order.len(), 4, "a permutation of the four ops");
/// let mut img = image::RgbImage::from_pixel(8, 8, image::Rgb([120, 60, 30]));
/// p.apply(&mut img);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ColorJitter {
    /// Brightness strength.
    pub brightness: f64,
    /// Contrast strength.
    pub contrast: f64,
    /// Saturation strength.
    pub saturation: f64,
    /// Hue strength (<= 0.5).
    pub hue: f64,
}

impl ColorJitter {
    /// Samples the parameters (example: [`ColorJitter`]).
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> JitterParams {
        let mut order = [
            JitterOp::Brightness,
            JitterOp::Contrast,
            JitterOp::Saturation,
            JitterOp::Hue,
        ];
        order.shuffle(rng);
        let f = |rng: &mut R, s: f64| uniform(rng, (1.0 - s).max(0.0), 1.0 + s);
        let brightness = f(rng, self.brightness);
        let contrast = f(rng, self.contrast);
        let saturation = f(rng, self.saturation);
        let hue = uniform(rng, -self.hue, self.hue);
        JitterParams {
            order,
            brightness,
            contrast,
            saturation,
            hue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn hsv_roundtrip_of_grey_and_primaries() {
        for (r, g, b) in [
            (0u8, 0u8, 0u8),
            (255, 0, 0),
            (0, 255, 0),
            (0, 0, 255),
            (77, 77, 77),
        ] {
            let (h, s, v) = rgb2hsv(r, g, b);
            assert_eq!(hsv2rgb(h, s, v), [r, g, b]);
        }
    }

    #[test]
    fn hsv_tables_equal_direct_formulas() {
        let t = hsv_tables();
        let mut state = 12345u32;
        for _ in 0..200_000 {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let [r, g, b, _] = state.to_le_bytes();
            assert_eq!(rgb2hsv_lut(t, r, g, b), rgb2hsv(r, g, b), "{r} {g} {b}");
            let (h, s, v) = rgb2hsv(r, g, b);
            assert_eq!(hsv2rgb_lut(t, h, s, v), hsv2rgb(h, s, v));
            assert_eq!(hsv2rgb_lut(t, r, g, b), hsv2rgb(r, g, b));
        }
    }

    #[test]
    fn gaussian_kernel_is_normalised_and_symmetric() {
        let k = gaussian_kernel1d(9, 1.3);
        assert!((k.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        for i in 0..4 {
            assert_eq!(k[i], k[8 - i]);
        }
    }

    #[test]
    fn fallback_crop_is_central_with_clamped_ratio() {
        // scale > 1 can never fit, so the fallback is taken: 1000x100 has ratio 10 > 4/3 -> h = 100, w = 133
        let rrc = RandomResizedCrop::new(8, (2.0, 3.0));
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let b = rrc.get_params(1000, 100, &mut rng);
        assert_eq!(
            b,
            CropBox {
                left: (1000 - 133) / 2,
                top: 0,
                width: 133,
                height: 100
            }
        );
        let b = rrc.get_params(100, 1000, &mut rng);
        assert_eq!(
            b,
            CropBox {
                left: 0,
                top: (1000 - 133) / 2,
                width: 100,
                height: 133
            }
        );
    }
}
