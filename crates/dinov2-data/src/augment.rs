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

use crate::error::{Error, Result};
use crate::resize::{resized_crop, CropBox};
use crate::transforms::{
    gaussian_blur, hflip, solarize, to_grayscale, uniform, ColorJitter, JitterParams,
    RandomResizedCrop,
};

/// Number of global crops per image in the DINOv2 multi-crop (and so of iBOT masks per sample).
pub const GLOBAL_CROPS: usize = 2;

/// Probabilities of applying the Gaussian blur to global crop 1, global crop 2 and the local crops.
///
/// ```
/// use dinov2_data::BlurProbabilities;
/// assert_eq!(BlurProbabilities::default(), BlurProbabilities::RELEASED);
/// assert_eq!(BlurProbabilities::INTENDED.global1, 1.0);
/// ```
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
///
/// The defaults are those of the official `ssl_default_config.yaml`; the ViT-L/14 and ViT-g/14 configs set
/// `local_crops_size: 98` (a 7x7 patch grid).
///
/// ```
/// use dinov2_data::CropsConfig;
/// let c = CropsConfig::default();
/// assert_eq!((c.global_crops_size, c.local_crops_size, c.local_crops_number), (224, 96, 8));
/// let vitl14 = CropsConfig { local_crops_size: 98, ..Default::default() };
/// assert_eq!(vitl14.global_crops_scale, (0.32, 1.0));
/// ```
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

/// Which crop of the multi-crop set (they differ in size, scale, blur and solarize probabilities). See
/// [`DataAugmentationDino::plan_crop`].
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
///
/// ```
/// use dinov2_data::{CropBox, CropPlan};
/// let plan = CropPlan {
///     crop: CropBox { left: 0, top: 0, width: 10, height: 10 },
///     size: 4,
///     flip: false,
///     jitter: None,
///     grayscale: true,
///     blur_sigma: None,
///     solarize: true,
/// };
/// let img = image::RgbImage::from_pixel(20, 10, image::Rgb([255, 0, 0]));
/// let out = plan.apply(&img); // resized crop -> grayscale (76) -> solarize (76 < 128: unchanged)
/// assert_eq!(out.dimensions(), (4, 4));
/// assert!(out.pixels().all(|p| p.0 == [76, 76, 76]));
/// ```
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
    /// Applies the plan: resized crop → flip → jitter → grayscale → blur → solarize (example: [`CropPlan`]).
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

/// The multi-crop output of one image (8-bit crops; normalisation happens when batching, see
/// [`collate()`](crate::collate::collate)). Made by [`DataAugmentationDino::apply`].
#[derive(Clone, Debug, PartialEq)]
pub struct MultiCrop {
    /// The two global crops.
    pub global: Vec<RgbImage>,
    /// The local crops.
    pub local: Vec<RgbImage>,
}

/// `DataAugmentationDINO`.
///
/// [`DataAugmentationDino::official`] (also `Default`) is the official configuration: 2 global crops of 224 px
/// (scale 0.32-1), 8 local crops of 96 px (scale 0.05-0.32), the released blur probabilities;
/// [`DataAugmentationDino::new`] takes any crops configuration.
///
/// ```
/// use dinov2_data::rand::SeedableRng;
/// use dinov2_data::rand_chacha::ChaCha8Rng;
/// use dinov2_data::{BlurProbabilities, CropsConfig, DataAugmentationDino};
/// let aug = DataAugmentationDino::new(CropsConfig { local_crops_number: 2, ..Default::default() },
///                                     BlurProbabilities::RELEASED)?;
/// let img = image::RgbImage::from_pixel(300, 200, image::Rgb([200, 100, 50]));
/// let mut rng = ChaCha8Rng::seed_from_u64(0);
/// let out = aug.apply(&img, &mut rng);
/// assert_eq!(out.global[0].dimensions(), (224, 224));
/// assert_eq!(out.local.len(), 2);
/// assert_eq!(out.local[0].dimensions(), (96, 96));
/// // the same seed gives the same crops
/// assert_eq!(aug.apply(&img, &mut ChaCha8Rng::seed_from_u64(0)), out);
/// # Ok::<(), dinov2_data::Error>(())
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
    /// The official configuration: [`CropsConfig::default`] (2 x 224 px global crops, scale (0.32, 1.0); 8 x 96 px
    /// local crops, scale (0.05, 0.32)), [`BlurProbabilities::RELEASED`], `ColorJitter(0.4, 0.4, 0.2, 0.1)` with
    /// p 0.8, grayscale p 0.2, blur sigma in (0.1, 2.0), solarize p 0.2 on global crop 2.
    ///
    /// ```
    /// use dinov2_data::{BlurProbabilities, CropsConfig, DataAugmentationDino};
    /// let aug = DataAugmentationDino::official();
    /// assert_eq!(aug, DataAugmentationDino::default());
    /// assert_eq!(aug, DataAugmentationDino::new(CropsConfig::default(), BlurProbabilities::RELEASED)?);
    /// assert_eq!((aug.crops.local_crops_number, aug.crops.local_crops_scale), (8, (0.05, 0.32)));
    /// assert_eq!((aug.jitter_p, aug.grayscale_p, aug.solarize_p), (0.8, 0.2, 0.2));
    /// # Ok::<(), dinov2_data::Error>(())
    /// ```
    pub fn official() -> Self {
        Self::with_official_colour(CropsConfig::default(), BlurProbabilities::RELEASED)
    }

    /// The official augmentation with the given crops configuration and blur probabilities.
    ///
    /// Errors with [`Error::InvalidConfig`] on a scale range that is not `0 < min <= max`, a zero crop size, or a
    /// blur probability outside [0, 1].
    ///
    /// ```
    /// use dinov2_data::{BlurProbabilities, CropsConfig, DataAugmentationDino, Error};
    /// let bad = CropsConfig { local_crops_scale: (0.5, 0.1), ..Default::default() };
    /// match DataAugmentationDino::new(bad, BlurProbabilities::RELEASED) {
    ///     Err(Error::InvalidConfig { field: "local_crops_scale", .. }) => {}
    ///     other => panic!("{other:?}"),
    /// }
    /// let vitl14 = CropsConfig { local_crops_size: 98, ..Default::default() };
    /// let aug = DataAugmentationDino::new(vitl14, BlurProbabilities::INTENDED)?;
    /// assert_eq!(aug.crops.local_crops_size, 98);
    /// # Ok::<(), dinov2_data::Error>(())
    /// ```
    pub fn new(crops: CropsConfig, blur: BlurProbabilities) -> Result<Self> {
        let ok_range = |(a, b): (f64, f64)| a > 0.0 && a <= b && b.is_finite();
        for (field, range) in [
            ("global_crops_scale", crops.global_crops_scale),
            ("local_crops_scale", crops.local_crops_scale),
        ] {
            if !ok_range(range) {
                return Err(Error::config(
                    field,
                    format!("{range:?} must satisfy 0 < min <= max (officially (0.32, 1.0) / (0.05, 0.32))"),
                ));
            }
        }
        if crops.global_crops_size == 0 {
            return Err(Error::config(
                "global_crops_size",
                "must be positive (officially 224)",
            ));
        }
        if crops.local_crops_number > 0 && crops.local_crops_size == 0 {
            return Err(Error::config(
                "local_crops_size",
                "must be positive when local_crops_number > 0 (officially 96, or 98 for patch 14)",
            ));
        }
        for (field, p) in [
            ("blur.global1", blur.global1),
            ("blur.global2", blur.global2),
            ("blur.local", blur.local),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(Error::config(
                    field,
                    format!("probability {p} is not in [0, 1]"),
                ));
            }
        }
        Ok(Self::with_official_colour(crops, blur))
    }

    fn with_official_colour(crops: CropsConfig, blur: BlurProbabilities) -> Self {
        Self {
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
        }
    }

    /// Draws every random decision of one crop (in the order torchvision draws them) without touching pixels.
    ///
    /// ```
    /// use dinov2_data::rand::SeedableRng;
    /// use dinov2_data::{rand_chacha::ChaCha8Rng, CropKind, DataAugmentationDino};
    /// let aug = DataAugmentationDino::official();
    /// let mut rng = ChaCha8Rng::seed_from_u64(7);
    /// let plan = aug.plan_crop(500, 375, CropKind::Local, &mut rng);
    /// assert_eq!(plan.size, 96);
    /// assert!(plan.crop.left + plan.crop.width <= 500 && plan.crop.top + plan.crop.height <= 375);
    /// assert!(!plan.solarize, "only the second global crop is solarized");
    /// let g1 = aug.plan_crop(500, 375, CropKind::Global1, &mut rng);
    /// assert!(g1.blur_sigma.is_none(), "the released probabilities never blur global crop 1");
    /// ```
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

    /// Augments one image: global crop 1, global crop 2, then the local crops, in that order of random draws
    /// (example: [`DataAugmentationDino`]).
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

impl Default for DataAugmentationDino {
    /// [`DataAugmentationDino::official`].
    fn default() -> Self {
        Self::official()
    }
}

/// The official linear-evaluation training transform (`make_classification_train_transform`):
/// `RandomResizedCrop(crop, scale=(0.08, 1), bicubic)` → horizontal flip with p 0.5 (then `ToTensor` + `Normalize`,
/// see [`crate::preprocess::to_tensor_normalized`]).
///
/// ```
/// use dinov2_data::rand::SeedableRng;
/// use dinov2_data::{rand_chacha::ChaCha8Rng, ClassificationTrainTransform};
/// let t = ClassificationTrainTransform::default();
/// let img = image::RgbImage::from_pixel(300, 200, image::Rgb([1, 2, 3]));
/// let out = t.apply(&img, &mut ChaCha8Rng::seed_from_u64(0));
/// assert_eq!(out.dimensions(), (224, 224));
/// assert_eq!(out.get_pixel(100, 100).0, [1, 2, 3]);
/// ```
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
    /// Applies the transform to an 8-bit image (example: [`ClassificationTrainTransform`]).
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
