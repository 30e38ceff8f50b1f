//! Batch assembly, as the official `collate_data_and_cast` (`dinov2/data/collate.py`): crop-major stacking of the
//! normalised crops and iBOT masks with stratified ratios on half of the global crops.

use image::RgbImage;
use rand::seq::SliceRandom;
use rand::Rng;
use rayon::prelude::*;

use crate::augment::{MultiCrop, GLOBAL_CROPS};
use crate::masking::MaskingGenerator;
use crate::preprocess::{write_normalized_chw, IMAGENET_MEAN, IMAGENET_STD};
use crate::transforms::uniform;

/// iBOT masks of a batch of global crops and the derived index/weight tensors (made by [`MaskCollate::sample`]).
#[derive(Clone, Debug, PartialEq)]
pub struct MaskBatch {
    /// Number of global crops (`2 * batch`).
    pub n_crops: usize,
    /// Patches per crop.
    pub n_tokens: usize,
    /// `[n_crops, n_tokens]` row-major (`collated_masks`).
    pub masks: Vec<bool>,
    /// Flat indices of the masked entries of `masks` (`mask_indices_list`, int64).
    pub mask_indices: Vec<i64>,
    /// Per masked patch, `1 / max(1, masked count of its crop)` (`masks_weight`).
    pub masks_weight: Vec<f32>,
    /// Total masked patches (`n_masked_patches`).
    pub n_masked_patches: usize,
    /// Upper bound of `n_masked_patches` used to size fixed buffers (`upperbound`).
    pub upperbound: usize,
}

impl MaskBatch {
    /// Derives indices and weights from explicit masks (`n_crops * n_tokens` booleans).
    ///
    /// ```
    /// use dinov2_data::MaskBatch;
    /// // two crops of four tokens: tokens 1 and 2 of crop 0 masked, crop 1 not masked
    /// let m = vec![false, true, true, false, false, false, false, false];
    /// let b = MaskBatch::from_masks(m, 2, 4, 3);
    /// assert_eq!(b.mask_indices, vec![1, 2]);
    /// assert_eq!(b.masks_weight, vec![0.5, 0.5]); // 1 / (masked tokens of the crop)
    /// assert_eq!((b.n_masked_patches, b.upperbound), (2, 3));
    /// ```
    pub fn from_masks(
        masks: Vec<bool>,
        n_crops: usize,
        n_tokens: usize,
        upperbound: usize,
    ) -> Self {
        let mut mask_indices = Vec::new();
        let mut masks_weight = Vec::new();
        for c in 0..n_crops {
            let row = &masks[c * n_tokens..(c + 1) * n_tokens];
            let cnt = row.iter().filter(|&&b| b).count();
            let w = 1.0f32 / (cnt.max(1) as f32);
            for (t, &b) in row.iter().enumerate() {
                if b {
                    mask_indices.push((c * n_tokens + t) as i64);
                    masks_weight.push(w);
                }
            }
        }
        let n_masked_patches = mask_indices.len();
        Self {
            n_crops,
            n_tokens,
            masks,
            mask_indices,
            masks_weight,
            n_masked_patches,
            upperbound,
        }
    }
}

/// `torch.linspace(start, end, steps)` in `f32` (torch's two-sided formula).
///
/// ```
/// use dinov2_data::collate::linspace_f32;
/// assert_eq!(linspace_f32(0.0, 1.0, 5), vec![0.0, 0.25, 0.5, 0.75, 1.0]);
/// assert_eq!(linspace_f32(2.0, 3.0, 1), vec![2.0]);
/// ```
pub fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

/// Mask sampling parameters (`ibot.mask_ratio_min_max`, `ibot.mask_sample_probability`).
///
/// ```
/// use dinov2_data::rand::SeedableRng;
/// use dinov2_data::{rand_chacha::ChaCha8Rng, MaskCollate};
/// let mc = MaskCollate::official(224, 14); // 16x16 patch grid
/// let batch_size = 4; // 4 images, 2 global crops each: 8 masks
/// let masks = mc.sample(batch_size, &mut ChaCha8Rng::seed_from_u64(0));
/// assert_eq!((masks.n_crops, masks.n_tokens), (8, 256));
/// assert_eq!(masks.upperbound, mc.upperbound(batch_size));
/// let masked_crops = masks.masks.chunks(256).filter(|c| c.contains(&true)).count();
/// assert_eq!(masked_crops, 4, "half of the global crops get a mask");
/// assert!(masks.n_masked_patches <= masks.upperbound);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct MaskCollate {
    /// Ratio range (0.1, 0.5).
    pub mask_ratio: (f32, f32),
    /// Fraction of global crops that get a mask (0.5).
    pub mask_probability: f64,
    /// The block generator.
    pub generator: MaskingGenerator,
}

impl MaskCollate {
    /// Official defaults for a global crop size and patch size: ratios (0.1, 0.5), probability 0.5, the training
    /// [`MaskingGenerator`] (example: [`MaskCollate`]).
    pub fn official(global_crop_size: usize, patch_size: usize) -> Self {
        Self {
            mask_ratio: (0.1, 0.5),
            mask_probability: 0.5,
            generator: MaskingGenerator::for_training(global_crop_size, patch_size),
        }
    }

    /// `upperbound` for a batch of `batch_size` images ([`GLOBAL_CROPS`] global crops each): the official bound of
    /// [`MaskBatch::n_masked_patches`] that sizes fixed buffers (deterministic; example: [`MaskCollate`]).
    pub fn upperbound(&self, batch_size: usize) -> usize {
        self.upperbound_for_crops(batch_size * GLOBAL_CROPS)
    }

    /// `upperbound` for `n_crops` global crops in all.
    ///
    /// ```
    /// let mc = dinov2_data::MaskCollate::official(224, 14);
    /// assert_eq!(mc.upperbound_for_crops(6), mc.upperbound(3));
    /// ```
    pub fn upperbound_for_crops(&self, n_crops: usize) -> usize {
        let n = self.generator.num_patches();
        let n_masked = (n_crops as f64 * self.mask_probability) as usize;
        let probs = linspace_f32(self.mask_ratio.0, self.mask_ratio.1, n_masked + 1);
        (0..n_masked)
            .map(|i| (n as f32 * probs[i + 1]) as usize)
            .sum()
    }

    /// Samples the masks of a batch of `batch_size` images, that is of `batch_size * GLOBAL_CROPS` global crops
    /// (crop-major, like the crops of a [`Batch`]; example: [`MaskCollate`]). See
    /// [`MaskCollate::sample_for_crops`].
    pub fn sample<R: Rng + ?Sized>(&self, batch_size: usize, rng: &mut R) -> MaskBatch {
        self.sample_for_crops(batch_size * GLOBAL_CROPS, rng)
    }

    /// Samples masks for `n_crops` global crops in all: `int(n_crops * p)` of them get
    /// `int(N * U(probs[i], probs[i+1]))` patches (stratified over `linspace(min, max)`), the rest none; the list is
    /// shuffled.
    ///
    /// ```
    /// use dinov2_data::rand::SeedableRng;
    /// use dinov2_data::{rand_chacha::ChaCha8Rng, MaskCollate};
    /// let mc = MaskCollate::official(224, 14);
    /// let a = mc.sample_for_crops(6, &mut ChaCha8Rng::seed_from_u64(5));
    /// let b = mc.sample(3, &mut ChaCha8Rng::seed_from_u64(5));
    /// assert_eq!(a, b);
    /// ```
    pub fn sample_for_crops<R: Rng + ?Sized>(&self, n_crops: usize, rng: &mut R) -> MaskBatch {
        let n = self.generator.num_patches();
        let n_masked = (n_crops as f64 * self.mask_probability) as usize;
        let probs = linspace_f32(self.mask_ratio.0, self.mask_ratio.1, n_masked + 1);
        let mut list: Vec<Vec<bool>> = Vec::with_capacity(n_crops);
        let mut upperbound = 0usize;
        for i in 0..n_masked {
            let r = uniform(rng, f64::from(probs[i]), f64::from(probs[i + 1])) as f32;
            list.push(self.generator.generate((n as f32 * r) as usize, rng));
            upperbound += (n as f32 * probs[i + 1]) as usize;
        }
        for _ in n_masked..n_crops {
            list.push(vec![false; n]);
        }
        list.shuffle(rng);
        MaskBatch::from_masks(list.concat(), n_crops, n, upperbound)
    }
}

/// A training batch.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// `[2B, 3, G, G]` normalised global crops, crop-major (all first crops, then all second crops).
    pub global_crops: Vec<f32>,
    /// Shape of `global_crops`.
    pub global_shape: [usize; 4],
    /// `[nL*B, 3, L, L]` normalised local crops, crop-major.
    pub local_crops: Vec<f32>,
    /// Shape of `local_crops`.
    pub local_shape: [usize; 4],
    /// iBOT masks of the global crops.
    pub masks: MaskBatch,
    /// Dataset indices of the samples.
    pub indices: Vec<usize>,
    /// Labels of the samples (when the dataset has them).
    pub labels: Vec<Option<i64>>,
}

fn stack_crop_major(samples: &[&[RgbImage]]) -> (Vec<f32>, [usize; 4]) {
    let b = samples.len();
    let nc = samples.first().map_or(0, |s| s.len());
    let (w, h) = samples
        .first()
        .and_then(|s| s.first())
        .map_or((0, 0), |c| (c.width() as usize, c.height() as usize));
    let per = 3 * w * h;
    let mut out = vec![0f32; nc * b * per];
    if per == 0 {
        return (out, [nc * b, 3, h, w]);
    }
    // crop-major: slot k = c * b + i holds crop c of sample i; filled in parallel (on the caller's rayon pool)
    out.par_chunks_mut(per).enumerate().for_each(|(k, dst)| {
        let (c, i) = (k / b, k % b);
        if let Some(img) = samples[i].get(c) {
            if img.width() as usize == w && img.height() as usize == h {
                write_normalized_chw(img, IMAGENET_MEAN, IMAGENET_STD, dst);
            }
        }
    });
    (out, [nc * b, 3, h, w])
}

/// `collate_data_and_cast` minus the dtype cast: stacks crops crop-major, normalised, and samples masks.
///
/// ```
/// use dinov2_data::rand::SeedableRng;
/// use dinov2_data::{collate, rand_chacha::ChaCha8Rng, DataAugmentationDino, MaskCollate};
/// let aug = DataAugmentationDino::official();
/// let mut rng = ChaCha8Rng::seed_from_u64(0);
/// let img = image::RgbImage::from_pixel(64, 48, image::Rgb([128, 128, 128]));
/// let samples = vec![aug.apply(&img, &mut rng), aug.apply(&img, &mut rng)];
/// let b = collate(&samples, vec![10, 11], vec![None, Some(3)], &MaskCollate::official(224, 14), &mut rng);
/// assert_eq!(b.global_shape, [4, 3, 224, 224]); // crop-major: crop 1 of both images, then crop 2
/// assert_eq!(b.local_shape, [16, 3, 96, 96]);
/// assert_eq!(b.global_crops.len(), 4 * 3 * 224 * 224);
/// assert_eq!((b.masks.n_crops, b.indices, b.labels), (4, vec![10, 11], vec![None, Some(3)]));
/// ```
pub fn collate<R: Rng + ?Sized>(
    samples: &[MultiCrop],
    indices: Vec<usize>,
    labels: Vec<Option<i64>>,
    masking: &MaskCollate,
    rng: &mut R,
) -> Batch {
    let g: Vec<&[RgbImage]> = samples.iter().map(|s| s.global.as_slice()).collect();
    let l: Vec<&[RgbImage]> = samples.iter().map(|s| s.local.as_slice()).collect();
    let (global_crops, global_shape) = stack_crop_major(&g);
    let (local_crops, local_shape) = stack_crop_major(&l);
    let masks = masking.sample_for_crops(global_shape[0], rng);
    Batch {
        global_crops,
        global_shape,
        local_crops,
        local_shape,
        masks,
        indices,
        labels,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_and_indices_from_explicit_masks() {
        let m = vec![true, false, true, false, false, false, false, true, true];
        let b = MaskBatch::from_masks(m, 3, 3, 7);
        assert_eq!(b.mask_indices, vec![0, 2, 7, 8]);
        assert_eq!(b.masks_weight, vec![0.5, 0.5, 0.5, 0.5]);
        assert_eq!(b.n_masked_patches, 4);
    }
}
