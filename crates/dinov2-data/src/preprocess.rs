//! Inference preprocessing: decoded RGB image → normalised CHW `f32` tensor.
//!
//! [`Preprocess::Eval`] is the official evaluation transform (`make_classification_eval_transform`): torchvision
//! `Resize(256, BICUBIC)` (shorter side, antialiased like PIL) → `CenterCrop(224)` → `ToTensor` → ImageNet
//! `Normalize`, pixel-exact against PIL/torchvision. The other variants give ViT-friendly sizes (multiples of the
//! patch size) without cropping the image.

use image::RgbImage;

use crate::error::{Error, Result};
use crate::resize::{center_crop, resize_bicubic, shorter_side_size};

/// ImageNet mean (RGB), as in `torchvision.transforms.Normalize` of the official code.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet standard deviation (RGB).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// A normalised image, channel-major (`[channels, height, width]`, row-major), ready for a model.
///
/// ```
/// use dinov2_data::{to_tensor_normalized, IMAGENET_MEAN, IMAGENET_STD};
/// let img = image::RgbImage::from_fn(3, 2, |x, _| image::Rgb([if x == 2 { 255 } else { 0 }, 0, 0]));
/// let t = to_tensor_normalized(&img, IMAGENET_MEAN, IMAGENET_STD);
/// assert_eq!(t.shape(), [3, 2, 3]);
/// assert_eq!(t.data.len(), 3 * 2 * 3);
/// assert_eq!(t.at(0, 1, 2), (1.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]); // channel 0, row 1, column 2
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct ImageTensor {
    /// Number of channels (3).
    pub channels: usize,
    /// Height in pixels.
    pub height: usize,
    /// Width in pixels.
    pub width: usize,
    /// `channels * height * width` values, CHW order.
    pub data: Vec<f32>,
}

impl ImageTensor {
    /// `[channels, height, width]`.
    pub fn shape(&self) -> [usize; 3] {
        [self.channels, self.height, self.width]
    }

    /// Value at channel `c`, row `y`, column `x` (panics when out of range, like slice indexing).
    pub fn at(&self, c: usize, y: usize, x: usize) -> f32 {
        self.data[(c * self.height + y) * self.width + x]
    }
}

/// `ToTensor` + `Normalize(mean, std)` exactly as torchvision computes them in `f32`:
/// `(v / 255 - mean) / std`.
///
/// ```
/// use dinov2_data::to_tensor_normalized;
/// let img = image::RgbImage::from_pixel(2, 2, image::Rgb([0, 51, 255]));
/// let t = to_tensor_normalized(&img, [0.0; 3], [1.0; 3]); // plain ToTensor
/// assert_eq!((t.at(0, 0, 0), t.at(1, 1, 1), t.at(2, 0, 1)), (0.0, 0.2, 1.0));
/// ```
pub fn to_tensor_normalized(img: &RgbImage, mean: [f32; 3], std: [f32; 3]) -> ImageTensor {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut data = vec![0f32; 3 * w * h];
    write_normalized_chw(img, mean, std, &mut data);
    ImageTensor {
        channels: 3,
        height: h,
        width: w,
        data,
    }
}

/// Writes `ToTensor` + `Normalize` of `img` into `out` (length `3*H*W`, CHW). Used by the collate step to fill
/// batch buffers without intermediate allocations.
///
/// ```
/// use dinov2_data::{preprocess::write_normalized_chw, to_tensor_normalized, IMAGENET_MEAN, IMAGENET_STD};
/// let img = image::RgbImage::from_fn(4, 3, |x, y| image::Rgb([x as u8 * 60, y as u8 * 80, 7]));
/// let mut batch = vec![0f32; 2 * 3 * 3 * 4]; // room for two images
/// write_normalized_chw(&img, IMAGENET_MEAN, IMAGENET_STD, &mut batch[36..]);
/// assert_eq!(&batch[36..], &to_tensor_normalized(&img, IMAGENET_MEAN, IMAGENET_STD).data[..]);
/// ```
pub fn write_normalized_chw(img: &RgbImage, mean: [f32; 3], std: [f32; 3], out: &mut [f32]) {
    let plane = img.width() as usize * img.height() as usize;
    let mut lut = [[0f32; 256]; 3];
    for c in 0..3 {
        for (v, l) in lut[c].iter_mut().enumerate() {
            *l = (v as f32 / 255.0 - mean[c]) / std[c];
        }
    }
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (i, p) in img.as_raw().chunks_exact(3).enumerate() {
        r[i] = lut[0][p[0] as usize];
        g[i] = lut[1][p[1] as usize];
        b[i] = lut[2][p[2] as usize];
    }
}

/// How to turn an image into a model input (see [`preprocess()`] for examples of each variant).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Preprocess {
    /// Official eval transform: resize the shorter side to `resize` (bicubic, antialiased as PIL), center-crop
    /// `crop`×`crop`, `ToTensor`, ImageNet `Normalize`. The official values are 256 / 224.
    Eval {
        /// Shorter-side size after resizing.
        resize: u32,
        /// Square crop size.
        crop: u32,
    },
    /// Bicubic resize so that both sides are multiples of `multiple`: each side is rounded to the nearest multiple
    /// (at least one) of its size, after first scaling the shorter side to `shorter_side` when given (aspect ratio
    /// kept up to that rounding). No cropping.
    ResizeToMultiple {
        /// Patch size (14 for DINOv2).
        multiple: u32,
        /// Optional shorter-side target applied before rounding.
        shorter_side: Option<u32>,
    },
    /// Keep the pixels as they are and center-pad the *normalised* tensor with zeros up to multiples of `multiple`
    /// (the official `CenterPadding`: left/top get `pad // 2`, right/bottom the rest).
    CenterPad {
        /// Patch size.
        multiple: u32,
    },
    /// No geometric change; a typed error if a side is not a multiple of `multiple` (never silently cropped).
    Exact {
        /// Patch size.
        multiple: u32,
    },
}

impl Preprocess {
    /// The official evaluation transform, `Eval { resize: 256, crop: 224 }`.
    ///
    /// ```
    /// use dinov2_data::Preprocess;
    /// assert_eq!(Preprocess::OFFICIAL_EVAL, Preprocess::Eval { resize: 256, crop: 224 });
    /// ```
    pub const OFFICIAL_EVAL: Preprocess = Preprocess::Eval {
        resize: 256,
        crop: 224,
    };

    /// The official evaluation transform scaled to a `crop` of any size: the shorter side resized to
    /// `crop · 256 / 224` (rounded), then the `crop`×`crop` center crop.
    ///
    /// ```
    /// use dinov2_data::Preprocess;
    /// assert_eq!(Preprocess::eval_at(224), Preprocess::OFFICIAL_EVAL);
    /// assert_eq!(Preprocess::eval_at(32), Preprocess::Eval { resize: 37, crop: 32 });
    /// ```
    pub fn eval_at(crop: u32) -> Preprocess {
        let resize = (u64::from(crop) * 256 + 112) / 224;
        Preprocess::Eval {
            resize: u32::try_from(resize).unwrap_or(u32::MAX),
            crop,
        }
    }
}

fn nearest_multiple(v: u32, m: u32) -> u32 {
    let q = (u64::from(v) + u64::from(m) / 2) / u64::from(m);
    (q.max(1) * u64::from(m)) as u32
}

/// Applies a [`Preprocess`] to an RGB image.
///
/// Errors: [`Error::EmptyImage`] on an image without pixels, [`Error::NotMultiple`] when [`Preprocess::Exact`]
/// meets a size that is not a multiple of the patch, [`Error::InvalidConfig`] on a zero size or multiple.
///
/// ```
/// use dinov2_data::{preprocess, Preprocess};
/// let img = image::RgbImage::from_pixel(320, 240, image::Rgb([124, 116, 104]));
/// let t = preprocess(&img, &Preprocess::OFFICIAL_EVAL)?;
/// assert_eq!(t.shape(), [3, 224, 224]);
/// let t = preprocess(&img, &Preprocess::CenterPad { multiple: 14 })?;
/// assert_eq!(t.shape(), [3, 252, 322]);
/// let t = preprocess(&img, &Preprocess::ResizeToMultiple { multiple: 14, shorter_side: Some(224) })?;
/// assert_eq!(t.shape(), [3, 224, 294]); // 299x224 rounded to multiples of 14
/// assert!(matches!(
///     preprocess(&img, &Preprocess::Exact { multiple: 14 }),
///     Err(dinov2_data::Error::NotMultiple { width: 320, height: 240, multiple: 14 })
/// ));
/// # Ok::<(), dinov2_data::Error>(())
/// ```
pub fn preprocess(img: &RgbImage, p: &Preprocess) -> Result<ImageTensor> {
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return Err(Error::EmptyImage {
            width: w,
            height: h,
        });
    }
    let check_multiple = |m: u32| {
        if m == 0 {
            Err(Error::config(
                "multiple",
                "must be positive (the patch size, e.g. 14)",
            ))
        } else {
            Ok(())
        }
    };
    match *p {
        Preprocess::Eval { resize, crop } => {
            if resize == 0 || crop == 0 {
                let field = if resize == 0 { "resize" } else { "crop" };
                return Err(Error::config(
                    field,
                    "must be positive (officially 256 / 224)",
                ));
            }
            let (rw, rh) = shorter_side_size(w, h, resize);
            let resized = resize_bicubic(img, rw.max(1), rh.max(1));
            let cropped = center_crop(&resized, crop, crop);
            Ok(to_tensor_normalized(&cropped, IMAGENET_MEAN, IMAGENET_STD))
        }
        Preprocess::ResizeToMultiple {
            multiple,
            shorter_side,
        } => {
            check_multiple(multiple)?;
            let (bw, bh) = match shorter_side {
                Some(0) => return Err(Error::config("shorter_side", "must be positive")),
                Some(s) => shorter_side_size(w, h, s),
                None => (w, h),
            };
            let (tw, th) = (
                nearest_multiple(bw, multiple),
                nearest_multiple(bh, multiple),
            );
            let resized = resize_bicubic(img, tw, th);
            Ok(to_tensor_normalized(&resized, IMAGENET_MEAN, IMAGENET_STD))
        }
        Preprocess::CenterPad { multiple } => {
            check_multiple(multiple)?;
            let t = to_tensor_normalized(img, IMAGENET_MEAN, IMAGENET_STD);
            let (w, h) = (w as usize, h as usize);
            let m = multiple as usize;
            let (nw, nh) = (w.div_ceil(m) * m, h.div_ceil(m) * m);
            let (pl, pt) = ((nw - w) / 2, (nh - h) / 2);
            let mut data = vec![0f32; 3 * nw * nh];
            for c in 0..3 {
                for y in 0..h {
                    let src = &t.data[(c * h + y) * w..(c * h + y + 1) * w];
                    let o = (c * nh + y + pt) * nw + pl;
                    data[o..o + w].copy_from_slice(src);
                }
            }
            Ok(ImageTensor {
                channels: 3,
                height: nh,
                width: nw,
                data,
            })
        }
        Preprocess::Exact { multiple } => {
            check_multiple(multiple)?;
            if w % multiple != 0 || h % multiple != 0 {
                return Err(Error::NotMultiple {
                    width: w,
                    height: h,
                    multiple,
                });
            }
            Ok(to_tensor_normalized(img, IMAGENET_MEAN, IMAGENET_STD))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 3) as u8, (y * 5) as u8, ((x ^ y) * 7) as u8])
        })
    }

    #[test]
    fn normalisation_is_torchvision_formula() {
        let i = img(4, 3);
        let t = to_tensor_normalized(&i, IMAGENET_MEAN, IMAGENET_STD);
        for y in 0..3 {
            for x in 0..4 {
                for c in 0..3 {
                    let v = i.get_pixel(x, y)[c] as f32;
                    let e = (v / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
                    assert_eq!(t.at(c, y as usize, x as usize), e);
                }
            }
        }
    }

    #[test]
    fn center_pad_matches_official_padding_rule() {
        // official CenterPadding: new = ceil(s/m)*m, left = (new-s)//2, right = rest; zeros on the normalised tensor
        let i = img(17, 30);
        let t = preprocess(&i, &Preprocess::CenterPad { multiple: 14 }).unwrap();
        assert_eq!(t.shape(), [3, 42, 28]);
        let (pl, pt) = ((28 - 17) / 2, (42 - 30) / 2);
        let plain = to_tensor_normalized(&i, IMAGENET_MEAN, IMAGENET_STD);
        for c in 0..3 {
            for y in 0..42 {
                for x in 0..28 {
                    let inside = (pt..pt + 30).contains(&y) && (pl..pl + 17).contains(&x);
                    let e = if inside {
                        plain.at(c, y - pt, x - pl)
                    } else {
                        0.0
                    };
                    assert_eq!(t.at(c, y, x), e);
                }
            }
        }
        // already a multiple: unchanged
        let t = preprocess(&img(28, 14), &Preprocess::CenterPad { multiple: 14 }).unwrap();
        assert_eq!(
            t,
            to_tensor_normalized(&img(28, 14), IMAGENET_MEAN, IMAGENET_STD)
        );
    }

    #[test]
    fn exact_refuses_non_multiples_and_keeps_multiples() {
        assert!(matches!(
            preprocess(&img(28, 15), &Preprocess::Exact { multiple: 14 }),
            Err(Error::NotMultiple {
                width: 28,
                height: 15,
                multiple: 14
            })
        ));
        let t = preprocess(&img(28, 42), &Preprocess::Exact { multiple: 14 }).unwrap();
        assert_eq!(t.shape(), [3, 42, 28]);
        assert!(preprocess(&img(28, 42), &Preprocess::Exact { multiple: 0 }).is_err());
    }

    #[test]
    fn resize_to_multiple_sizes() {
        let t = preprocess(
            &img(100, 60),
            &Preprocess::ResizeToMultiple {
                multiple: 14,
                shorter_side: None,
            },
        )
        .unwrap();
        assert_eq!(t.shape(), [3, 56, 98]);
        // shorter side 224 first: 100x60 -> 373x224 -> 378x224
        let p = Preprocess::ResizeToMultiple {
            multiple: 14,
            shorter_side: Some(224),
        };
        assert_eq!(
            preprocess(&img(100, 60), &p).unwrap().shape(),
            [3, 224, 378]
        );
        // tiny images get at least one patch
        let t = preprocess(
            &img(3, 2),
            &Preprocess::ResizeToMultiple {
                multiple: 14,
                shorter_side: None,
            },
        )
        .unwrap();
        assert_eq!(t.shape(), [3, 14, 14]);
    }
}
