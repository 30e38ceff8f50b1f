//! BEiT-style block masking, as the official `MaskingGenerator` (`dinov2/data/masking.py`).

use rand::Rng;

use crate::transforms::uniform;

/// Block-wise mask generator over a `height x width` patch grid.
///
/// ```
/// use dinov2_data::rand::SeedableRng;
/// use dinov2_data::MaskingGenerator;
/// // the training setup for 224 px crops and patch 14: a 16x16 grid, at most 128 patches per block
/// let g = MaskingGenerator::for_training(224, 14);
/// let mut rng = dinov2_data::rand_chacha::ChaCha8Rng::seed_from_u64(1);
/// let m = g.generate(50, &mut rng);
/// assert_eq!(m.len(), 256);
/// assert!(m.iter().filter(|&&b| b).count() <= 50);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct MaskingGenerator {
    /// Grid height.
    pub height: usize,
    /// Grid width.
    pub width: usize,
    /// Minimum block area drawn (4).
    pub min_num_patches: f64,
    /// Maximum patches added by one block.
    pub max_num_patches: f64,
    /// (ln min_aspect, ln max_aspect).
    pub log_aspect_ratio: (f64, f64),
}

impl MaskingGenerator {
    /// `MaskingGenerator(input_size=(h, w), min_num_patches=4, max_num_patches, min_aspect=0.3, max_aspect=1/0.3)`.
    ///
    /// ```
    /// let g = dinov2_data::MaskingGenerator::new(7, 9, 20.0);
    /// assert_eq!((g.num_patches(), g.min_num_patches), (63, 4.0));
    /// ```
    pub fn new(height: usize, width: usize, max_num_patches: f64) -> Self {
        let min_aspect: f64 = 0.3;
        Self {
            height,
            width,
            min_num_patches: 4.0,
            max_num_patches,
            log_aspect_ratio: (min_aspect.ln(), (1.0 / min_aspect).ln()),
        }
    }

    /// The generator `train.py` builds: grid `img // patch`, `max_num_patches = 0.5 * img // patch * img // patch`
    /// evaluated with Python's left-to-right float floor divisions (128 for 224/14, 98 for 224/16).
    ///
    /// ```
    /// let g = dinov2_data::MaskingGenerator::for_training(224, 16);
    /// assert_eq!((g.height, g.width, g.max_num_patches), (14, 14, 98.0));
    /// ```
    pub fn for_training(img_size: usize, patch_size: usize) -> Self {
        let g = img_size / patch_size;
        let (i, p) = (img_size as f64, patch_size as f64);
        let max = (((0.5 * i / p).floor() * i) / p).floor();
        Self::new(g, g, max)
    }

    /// Number of cells (example: [`MaskingGenerator::new`]).
    pub fn num_patches(&self) -> usize {
        self.height * self.width
    }

    /// One block attempt loop (`_mask`): up to 10 tries, returns the number of newly masked cells.
    ///
    /// ```
    /// use dinov2_data::rand::SeedableRng;
    /// let g = dinov2_data::MaskingGenerator::for_training(224, 14);
    /// let mut mask = vec![false; g.num_patches()];
    /// let mut rng = dinov2_data::rand_chacha::ChaCha8Rng::seed_from_u64(0);
    /// let added = g.mask_block(&mut mask, 30.0, &mut rng);
    /// assert!(added <= 30);
    /// assert_eq!(mask.iter().filter(|&&m| m).count(), added);
    /// ```
    pub fn mask_block<R: Rng + ?Sized>(
        &self,
        mask: &mut [bool],
        max_mask_patches: f64,
        rng: &mut R,
    ) -> usize {
        let mut delta = 0;
        for _ in 0..10 {
            let target_area = uniform(rng, self.min_num_patches, max_mask_patches);
            let aspect = uniform(rng, self.log_aspect_ratio.0, self.log_aspect_ratio.1).exp();
            let h = (target_area * aspect).sqrt().round_ties_even() as usize;
            let w = (target_area / aspect).sqrt().round_ties_even() as usize;
            if w < self.width && h < self.height {
                let top = rng.random_range(0..=self.height - h);
                let left = rng.random_range(0..=self.width - w);
                let mut already = 0usize;
                for i in top..top + h {
                    already += mask[i * self.width + left..i * self.width + left + w]
                        .iter()
                        .filter(|&&b| b)
                        .count();
                }
                let new = (h * w - already) as f64;
                if 0.0 < new && new <= max_mask_patches {
                    for i in top..top + h {
                        for m in &mut mask[i * self.width + left..i * self.width + left + w] {
                            if !*m {
                                *m = true;
                                delta += 1;
                            }
                        }
                    }
                }
                if delta > 0 {
                    break;
                }
            }
        }
        delta
    }

    /// `__call__(num_masking_patches)`: a row-major `height*width` mask with at most `num_masking_patches` cells set
    /// (fewer when the attempts run out), built from blocks (example: [`MaskingGenerator`]).
    pub fn generate<R: Rng + ?Sized>(&self, num_masking_patches: usize, rng: &mut R) -> Vec<bool> {
        let mut mask = vec![false; self.num_patches()];
        let mut count = 0usize;
        while count < num_masking_patches {
            let budget = ((num_masking_patches - count) as f64).min(self.max_num_patches);
            let delta = self.mask_block(&mut mask, budget, rng);
            if delta == 0 {
                break;
            }
            count += delta;
        }
        mask
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn training_constants() {
        let g = MaskingGenerator::for_training(224, 14);
        assert_eq!((g.height, g.width, g.max_num_patches), (16, 16, 128.0));
        let g = MaskingGenerator::for_training(224, 16);
        assert_eq!((g.height, g.width, g.max_num_patches), (14, 14, 98.0));
    }

    #[test]
    fn never_exceeds_target_and_zero_is_empty() {
        let g = MaskingGenerator::for_training(224, 14);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        assert!(g.generate(0, &mut rng).iter().all(|&b| !b));
        for t in [1, 4, 25, 60, 128, 200] {
            for _ in 0..50 {
                let n = g.generate(t, &mut rng).iter().filter(|&&b| b).count();
                assert!(n <= t, "{n} > {t}");
            }
        }
    }
}
