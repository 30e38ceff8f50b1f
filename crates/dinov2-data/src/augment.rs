//! `DataAugmentationDINO`: two global and `n` local crops per image, exactly composed as in the official code.
//!
//! Per crop: `RandomResizedCrop(size, scale, bicubic)` → horizontal flip (p 0.5) → `ColorJitter(0.4, 0.4, 0.2, 0.1)`
//! with p 0.8 → grayscale with p 0.2 → Gaussian blur (kernel 9, sigma ~ U(0.1, 2)) with a per-crop probability →
//! solarize (threshold 128, p 0.2) on the second global crop only → `ToTensor` + ImageNet `Normalize` (done by the
//! collate step, see [`crate::collate`]).
//!
//! The official blur probabilities are inverted by a bug (its `GaussianBlur(p)` applies the blur with probability
//! `1 - p`), so the released models were trained with 0 / 0.9 / 0.5 (global 1 / global 2 / local);
//! [`BlurProbabilities::RELEASED`] reproduces that, [`BlurProbabilities::INTENDED`] gives the DINO/BYOL
//! 1.0 / 0.1 / 0.5.

use image::RgbImage;
use rand::Rng;
use serde::Deserialize;

use crate::error::{DataError, Result};
use crate::resize::{resized_crop, CropBox};
use crate::transforms::{
    gaussian_blur, hflip, solarize, to_grayscale, uniform, ColorJitter, JitterParams,
    RandomResizedCrop,
};

/// Probabilities of applying the Gaussian blur to global crop 1, global crop 2 and the local crops.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
pub struct BlurProbabilities {
    /// First global crop.
    pub global1: f64,
    /// Second global crop.
    pub global2: f64,
    /// Local crops.
    pub local: f64,
}

impl BlurProbabilities {
    /// What the released official code does (0 / 0.9 / 0.5): reproduces the released models.
    pub const RELEASED: BlurProbabilities = BlurProbabilities {
        global1: 0.0,
        global2: 0.9,
        local: 0.5,
    };
    /// What the code intended (DINO/BYOL values 1.0 / 0.1 / 0.5).
    pub const INTENDED: BlurProbabilities = BlurProbabilities {
        global1: 1.0,
        global2: 0.1,
        local: 0.5,
    };
}

impl Default for BlurProbabilities {
    fn default() -> Self {
        Self::RELEASED
    }
}

/// The `crops` section of the official config, with its key names (deserialisable from the YAML/JSON config).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default)]
pub struct CropsConfig {
    /// `crops.global_crops_scale` (default [0.32, 1.0]).
    pub global_crops_scale: (f64, f64),
    /// `crops.local_crops_number` (default 8).
    pub local_crops_number: usize,
    /// `crops.local_crops_scale` (default [0.05, 0.32]).
    pub local_crops_scale: (f64, f64),
    /// `crops.global_crops_size` (default 224).
    pub global_crops_size: u32,
    /// `crops.local_crops_size` (default 96; 98 for patch 14 models).
    pub local_crops_size: u32,
}

impl Default for CropsConfig {
    fn default() -> Self {
        Self {
            global_crops_scale: (0.32, 1.0),
            local_crops_number: 8,
            local_crops_scale: (0.05, 0.32),
            global_crops_size: 224,
            local_crops_size: 96,
        }
    }
}

/// Which crop of the multi-crop set (they differ in size, scale, blur and solarize probabilities).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CropKind {
    /// First global crop.
    Global1,
    /// Second global crop (the only one that may be solarized).
    Global2,
    /// A local crop.
    Local,
}

/// All random decisions of one crop; [`CropPlan::apply`] is deterministic.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CropPlan {
    /// Crop box in the source image.
    pub crop: CropBox,
    /// Output size (square).
    pub size: u32,
    /// Horizontal flip.
    pub flip: bool,
    /// Colour jitter, when applied.
    pub jitter: Option<JitterParams>,
    /// Grayscale.
    pub grayscale: bool,
    /// Blur sigma, when blurred.
    pub blur_sigma: Option<f32>,
    /// Solarize (threshold 128).
    pub solarize: bool,
}

impl CropPlan {
    /// Applies the plan: resized crop → flip → jitter → grayscale → blur → solarize.
    pub fn apply(&self, img: &RgbImage) -> RgbImage {
        let mut c = resized_crop(img, self.crop, self.size, self.size);
        if self.flip {
            hflip(&mut c);
        }
        if let Some(j) = &self.jitter {
            j.apply(&mut c);
        }
        if self.grayscale {
            to_grayscale(&mut c);
        }
        if let Some(s) = self.blur_sigma {
            c = gaussian_blur(&c, 9, s);
        }
        if self.solarize {
            solarize(&mut c, 128);
        }
        c
    }
}

/// The multi-crop output of one image (8-bit crops; normalisation happens when batching).
#[derive(Clone, Debug, PartialEq)]
pub struct MultiCrop {
    /// The two global crops.
    pub global: Vec<RgbImage>,
    /// The local crops.
    pub local: Vec<RgbImage>,
}

/// `DataAugmentationDINO`.
///
/// ```
/// use dinov2_data::augment::{DataAugmentationDino, CropsConfig, BlurProbabilities};
/// use rand::SeedableRng;
/// let aug = DataAugmentationDino::new(CropsConfig { local_crops_number: 2, ..Default::default() },
///                                     BlurProbabilities::RELEASED)?;
/// let img = image::RgbImage::from_pixel(300, 200, image::Rgb([200, 100, 50]));
/// let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
/// let out = aug.apply(&img, &mut rng);
/// assert_eq!(out.global[0].dimensions(), (224, 224));
/// assert_eq!(out.local.len(), 2);
/// # Ok::<(), dinov2_data::DataError>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct DataAugmentationDino {
    /// Crop configuration.
    pub crops: CropsConfig,
    /// Blur probabilities.
    pub blur: BlurProbabilities,
    /// Colour jitter (0.4, 0.4, 0.2, 0.1 officially).
    pub jitter: ColorJitter,
    /// Probability of applying the jitter (0.8).
    pub jitter_p: f64,
    /// Probability of grayscale (0.2).
    pub grayscale_p: f64,
    /// Blur sigma range (0.1, 2.0).
    pub blur_sigma: (f64, f64),
    /// Solarize probability on global crop 2 (0.2).
    pub solarize_p: f64,
}

impl DataAugmentationDino {
    /// Builds the official augmentation from a crops config and blur probabilities.
    pub fn new(crops: CropsConfig, blur: BlurProbabilities) -> Result<Self> {
        let ok_range = |(a, b): (f64, f64)| a > 0.0 && a <= b && b.is_finite();
        if !ok_range(crops.global_crops_scale) || !ok_range(crops.local_crops_scale) {
            return Err(DataError::Config(format!(
                "crop scales must satisfy 0 < min <= max: global {:?}, local {:?}",
                crops.global_crops_scale, crops.local_crops_scale
            )));
        }
        if crops.global_crops_size == 0
            || (crops.local_crops_number > 0 && crops.local_crops_size == 0)
        {
            return Err(DataError::Config("crop sizes must be positive".into()));
        }
        for p in [blur.global1, blur.global2, blur.local] {
            if !(0.0..=1.0).contains(&p) {
                return Err(DataError::Config(format!(
                    "blur probability {p} not in [0, 1]"
                )));
            }
        }
        Ok(Self {
            crops,
            blur,
            jitter: ColorJitter {
                brightness: 0.4,
                contrast: 0.4,
                saturation: 0.2,
                hue: 0.1,
            },
            jitter_p: 0.8,
            grayscale_p: 0.2,
            blur_sigma: (0.1, 2.0),
            solarize_p: 0.2,
        })
    }

    /// Draws every random decision of one crop (in the order torchvision draws them) without touching pixels.
    pub fn plan_crop<R: Rng + ?Sized>(
        &self,
        width: u32,
        height: u32,
        kind: CropKind,
        rng: &mut R,
    ) -> CropPlan {
        let (rrc, blur_p, solarize_p) = match kind {
            CropKind::Global1 => (self.global_rrc(), self.blur.global1, 0.0),
            CropKind::Global2 => (self.global_rrc(), self.blur.global2, self.solarize_p),
            CropKind::Local => (self.local_rrc(), self.blur.local, 0.0),
        };
        let crop = rrc.get_params(width, height, rng);
        let flip = rng.random::<f64>() < 0.5;
        let jitter = if rng.random::<f64>() < self.jitter_p {
            Some(self.jitter.sample(rng))
        } else {
            None
        };
        let grayscale = rng.random::<f64>() < self.grayscale_p;
        let blur_sigma = if rng.random::<f64>() < blur_p {
            Some(uniform(rng, self.blur_sigma.0, self.blur_sigma.1) as f32)
        } else {
            None
        };
        let solarize = solarize_p > 0.0 && rng.random::<f64>() < solarize_p;
        CropPlan {
            crop,
            size: rrc.size,
            flip,
            jitter,
            grayscale,
            blur_sigma,
            solarize,
        }
    }

    fn global_rrc(&self) -> RandomResizedCrop {
        RandomResizedCrop::new(self.crops.global_crops_size, self.crops.global_crops_scale)
    }

    fn local_rrc(&self) -> RandomResizedCrop {
        RandomResizedCrop::new(self.crops.local_crops_size, self.crops.local_crops_scale)
    }

    /// Augments one image: global crop 1, global crop 2, then the local crops, in that order of random draws.
    pub fn apply<R: Rng + ?Sized>(&self, img: &RgbImage, rng: &mut R) -> MultiCrop {
        let (w, h) = img.dimensions();
        let g1 = self.plan_crop(w, h, CropKind::Global1, rng).apply(img);
        let g2 = self.plan_crop(w, h, CropKind::Global2, rng).apply(img);
        let local = (0..self.crops.local_crops_number)
            .map(|_| self.plan_crop(w, h, CropKind::Local, rng).apply(img))
            .collect();
        MultiCrop {
            global: vec![g1, g2],
            local,
        }
    }
}

/// The official linear-evaluation training transform (`make_classification_train_transform`):
/// `RandomResizedCrop(crop, scale=(0.08, 1), bicubic)` → horizontal flip with p 0.5 (then `ToTensor` + `Normalize`,
/// see [`crate::preprocess::to_tensor_normalized`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClassificationTrainTransform {
    /// The random resized crop (224, scale (0.08, 1) officially).
    pub crop: RandomResizedCrop,
    /// Flip probability (0.5).
    pub hflip_p: f64,
}

impl Default for ClassificationTrainTransform {
    fn default() -> Self {
        Self {
            crop: RandomResizedCrop::new(224, (0.08, 1.0)),
            hflip_p: 0.5,
        }
    }
}

impl ClassificationTrainTransform {
    /// Applies the transform to an 8-bit image.
    pub fn apply<R: Rng + ?Sized>(&self, img: &RgbImage, rng: &mut R) -> RgbImage {
        let mut c = self.crop.apply(img, rng);
        if rng.random::<f64>() < self.hflip_p {
            hflip(&mut c);
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn classification_train_transform_shape_and_flip_rate() {
        let t = ClassificationTrainTransform::default();
        let img = RgbImage::from_fn(64, 48, |x, _| image::Rgb([x as u8 * 4, 0, 0]));
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let out = t.apply(&img, &mut rng);
        assert_eq!(out.dimensions(), (224, 224));
        // the source increases left to right: a flipped crop decreases
        let n = 2000;
        let flipped = (0..n)
            .filter(|_| {
                let o = t.apply(&img, &mut rng);
                o.get_pixel(0, 112)[0] > o.get_pixel(223, 112)[0]
            })
            .count();
        let p = flipped as f64 / n as f64;
        assert!(
            (p - 0.5).abs() < 5.0 * (0.25 / n as f64).sqrt(),
            "flip rate {p}"
        );
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let bad = CropsConfig {
            global_crops_scale: (0.5, 0.2),
            ..Default::default()
        };
        assert!(DataAugmentationDino::new(bad, BlurProbabilities::RELEASED).is_err());
        let bad = BlurProbabilities {
            global1: 1.5,
            ..BlurProbabilities::RELEASED
        };
        assert!(DataAugmentationDino::new(CropsConfig::default(), bad).is_err());
        let empty = RgbImage::new(0, 0);
        let a =
            DataAugmentationDino::new(CropsConfig::default(), BlurProbabilities::RELEASED).unwrap();
        let out = a.apply(&empty, &mut rand_chacha::ChaCha8Rng::seed_from_u64(1));
        assert_eq!(out.global[0].dimensions(), (224, 224));
    }
}
