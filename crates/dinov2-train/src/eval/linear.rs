//! The linear probe of the official `eval/linear.py`: a grid of linear heads trained on frozen features, the best
//! one reported.
//!
//! * **Features** ([`LinearFeatures`]): for every image, the normalised class tokens of the last blocks (up to 4)
//!   and the mean of the last block's patch tokens (registers excluded), from
//!   `get_intermediate_layers(x, n, return_class_token=True, norm=True)`. A head reads
//!   [`create_linear_input`](LinearFeatures::linear_input): the class tokens of its last `n_last_blocks` blocks
//!   (oldest first), then the patch mean if `avgpool`, so `D`, `2D`, `4D` or `5D` values.
//! * **Grid** ([`official_grid`]): `n_last_blocks` ∈ {1, 4} × `avgpool` ∈ {false, true} ×
//!   [`OFFICIAL_LEARNING_RATES`], 52 heads, trained together ([`LinearHeads`]): each minibatch goes through
//!   every head, the loss is the sum of the heads' cross-entropies. Heads start at weight ~ N(0, 0.01), bias 0;
//!   SGD with momentum 0.9, no weight decay, learning rate `lr × batch / 256` (linear scaling) annealed to 0 by a
//!   cosine over all iterations (torch `CosineAnnealingLR`, `eta_min = 0`).
//! * **Selection** ([`linear_probe`]): the head of best top-1 on a held-out part of the training set (ties: lower
//!   held-out cross-entropy, then grid order); its top-1 / top-5 on the validation set is the result. Every
//!   head's validation accuracy is reported too.
//! * **Saving** ([`TrainedHead::save`], [`load_head`]): the official `_linear_head` layout (`weight` `[C, dim]`,
//!   `bias` `[C]`), so `dinov2_model::LinearClassifier` (and `nn.Linear.load_state_dict` in Python) reads it; the
//!   file's metadata holds `n_last_blocks`, `avgpool`, `num_classes` and the class names.
//!
//! Differences from the official script, all deliberate:
//!
//! * The backbone runs **once per image**, under the evaluation transform (shorter side resize, center crop), and
//!   the heads train on these cached features for every epoch. The official script runs the backbone at every
//!   step on `RandomResizedCrop(224)` + horizontal flip views, so its heads see augmented features; ours are
//!   cheaper by the number of epochs and usually land a little lower.
//! * The head is **selected on a held-out split of the training set** (`holdout`, default 10%, at least one
//!   image, drawn with the seed), and the heads train on the rest. The official script selects the best of its
//!   52 heads on the validation set itself and reports that head's validation accuracy, which flatters the
//!   number; `holdout = 0` reproduces that (all training images train, selection on validation).
//! * Minibatches come from successive seeded shuffles of the training split (an infinite sampler, as the
//!   official `SHARDED_INFINITE` one; the batch capped at the split's size), and an epoch is `epoch_length`
//!   iterations: by default the official 1250, or one pass over the split when that is longer (for ImageNet at
//!   batch 128, 10 epochs are then 10 passes, the official number of samples at its global batch of 1024). The
//!   official script always runs 10 × 1250 iterations. The learning rates scale with our batch (no world size).
//! * Features are f32 (the official ones come from fp16 autocast, then `.float()`), and accuracies are plain
//!   (micro) top-1 / top-5 as the official `MEAN_ACCURACY`, ties ranked lower class first.
//!
//! Memory: the cache holds `5·D` floats per image (ViT-L on ImageNet-1k: about 26 GB); a head group's logits are
//! computed in chunks.
//!
//! ```
//! use candle_core::{DType, Device};
//! use dinov2_data::{synthetic::SyntheticShapes, Preprocess};
//! use dinov2_model::{DinoVisionTransformer, VitConfig};
//! use dinov2_train::eval::linear::{embed_linear_features, linear_probe, LinearProbeConfig};
//! # fn main() -> dinov2_train::Result<()> {
//! let mut cfg = VitConfig::vit_small();
//! (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.patch_size, cfg.img_size) = (16, 2, 2, 8, 32);
//! let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
//! let model = DinoVisionTransformer::from_state_dict(&cfg, &sd, &Device::Cpu, DType::F32)?;
//! let eval = Preprocess::Eval { resize: 32, crop: 32 };
//! let train = embed_linear_features(&model, &SyntheticShapes::new(40, 1), eval, 16, 2)?;
//! let val = embed_linear_features(&model, &SyntheticShapes::new(20, 2), eval, 16, 2)?;
//! let probe = LinearProbeConfig { epochs: 2, epoch_length: Some(10), batch_size: 8, ..Default::default() };
//! let result = linear_probe(&train, &val, 10, &probe)?;
//! // a 2-block backbone: the 4-block heads of the official grid are skipped, with a note
//! assert_eq!(result.heads.len(), 2 * 13);
//! assert!(result.notes[0].contains("n_last_blocks = 4"));
//! assert!((0.0..=100.0).contains(&result.best().val.top1));
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use dinov2_data::rand::{Rng, SeedableRng};
use dinov2_data::rand_chacha::ChaCha8Rng;
use dinov2_data::{Dataset, Preprocess};
use dinov2_model::vit::{BlockSelection, IntermediateOptions};
use dinov2_model::{DinoVisionTransformer, LinearClassifier, StateDict};
use rayon::prelude::*;

use super::{for_each_batch, invalid, rank_of};
use crate::error::{Error, Result};

/// The learning rates of the official grid (`--learning-rates` default of `eval/linear.py`), before scaling.
pub const OFFICIAL_LEARNING_RATES: [f64; 13] = [
    1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1,
];

/// The official numbers of last blocks whose class tokens feed a head.
pub const OFFICIAL_N_LAST_BLOCKS: [usize; 2] = [1, 4];

/// SGD momentum of the official optimiser.
pub const MOMENTUM: f64 = 0.9;

/// Iterations per epoch of the official script (`--epoch-length` default of `eval/linear.py`).
pub const OFFICIAL_EPOCH_LENGTH: usize = 1250;

/// Standard deviation of the heads' initial weights (official `normal_(mean=0.0, std=0.01)`).
pub const INIT_STD: f64 = 0.01;

/// Logits are computed for at most about this many (row, head, class) entries at a time when scoring.
const SCORE_CHUNK_ELEMS: usize = 1 << 22;

/// Which features feed a head: the class tokens of the last `n_last_blocks` blocks, and the mean patch token of
/// the last block when `avgpool`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FeatureConfig {
    /// Number of last blocks whose class tokens are concatenated (oldest first).
    pub n_last_blocks: usize,
    /// Whether the mean of the last block's patch tokens is appended.
    pub avgpool: bool,
}

impl FeatureConfig {
    /// The width of the head input for a backbone of width `embed_dim`: `(n_last_blocks + avgpool) · D`.
    ///
    /// ```
    /// use dinov2_train::eval::linear::FeatureConfig;
    /// let cfg = FeatureConfig { n_last_blocks: 4, avgpool: true };
    /// assert_eq!(cfg.input_dim(384), 5 * 384);
    /// assert_eq!(FeatureConfig { n_last_blocks: 1, avgpool: false }.input_dim(384), 384);
    /// ```
    pub fn input_dim(&self, embed_dim: usize) -> usize {
        (self.n_last_blocks + usize::from(self.avgpool)) * embed_dim
    }

    /// A short description: `"4 blocks + avgpool"`, `"1 block"`.
    ///
    /// ```
    /// use dinov2_train::eval::linear::FeatureConfig;
    /// assert_eq!(FeatureConfig { n_last_blocks: 4, avgpool: true }.describe(), "4 blocks + avgpool");
    /// assert_eq!(FeatureConfig { n_last_blocks: 1, avgpool: false }.describe(), "1 block");
    /// ```
    pub fn describe(&self) -> String {
        let s = if self.n_last_blocks == 1 { "" } else { "s" };
        let pool = if self.avgpool { " + avgpool" } else { "" };
        format!("{} block{s}{pool}", self.n_last_blocks)
    }
}

/// Cached backbone features of a set of images, with their labels: what every head of the grid reads.
#[derive(Debug, Clone)]
pub struct LinearFeatures {
    class_tokens: Vec<Tensor>,
    patch_mean: Tensor,
    labels: Vec<usize>,
}

impl LinearFeatures {
    /// From the normalised class tokens of the last blocks (`class_tokens[i]` `[N, D]`, oldest block first), the
    /// last block's mean patch token (`[N, D]`) and one label per row. Tensors are stored as contiguous f32.
    ///
    /// Errors: [`Error::InvalidArgument`] when there is no class token tensor, a tensor is not `[N, D]` with the
    /// same `N` and `D` as the others, or `labels.len() != N`.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use dinov2_train::eval::linear::{FeatureConfig, LinearFeatures};
    /// # fn main() -> dinov2_train::Result<()> {
    /// let dev = Device::Cpu;
    /// let (old, new) = (Tensor::new(&[[1f32, 2.], [3., 4.]], &dev)?, Tensor::new(&[[5f32, 6.], [7., 8.]], &dev)?);
    /// let mean = Tensor::new(&[[0f32, -1.], [-2., -3.]], &dev)?;
    /// let f = LinearFeatures::new(vec![old, new], mean, vec![0, 1])?;
    /// assert_eq!((f.len(), f.embed_dim(), f.blocks()), (2, 2, 2));
    /// let x = f.linear_input(FeatureConfig { n_last_blocks: 2, avgpool: true })?;
    /// assert_eq!(x.to_vec2::<f32>()?[0], [1.0, 2.0, 5.0, 6.0, 0.0, -1.0]);
    /// assert!(LinearFeatures::new(vec![], Tensor::zeros((2, 2), candle_core::DType::F32, &dev)?, vec![0, 1]).is_err());
    /// # Ok(()) }
    /// ```
    pub fn new(class_tokens: Vec<Tensor>, patch_mean: Tensor, labels: Vec<usize>) -> Result<Self> {
        let (n, d) = patch_mean.dims2().map_err(|_| {
            invalid(
                "patch_mean",
                format!("must be [N, D], got shape {:?}", patch_mean.dims()),
            )
        })?;
        if class_tokens.is_empty() {
            return Err(invalid(
                "class_tokens",
                "needs the class tokens of at least one block",
            ));
        }
        for t in &class_tokens {
            if t.dims() != [n, d] {
                return Err(invalid(
                    "class_tokens",
                    format!(
                        "every tensor must be [{n}, {d}] like the patch mean, got shape {:?}",
                        t.dims()
                    ),
                ));
            }
        }
        if labels.len() != n {
            return Err(invalid(
                "labels",
                format!(
                    "has {} labels for {n} feature rows; give one label per row",
                    labels.len()
                ),
            ));
        }
        let f32_rows = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
        let class_tokens = class_tokens
            .iter()
            .map(f32_rows)
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            class_tokens,
            patch_mean: f32_rows(&patch_mean)?,
            labels,
        })
    }

    /// The features of a batch of preprocessed images `[B, 3, H, W]`, as the official `ModelWithIntermediateLayers`
    /// and `create_linear_input` see them: the normalised class tokens of the last `blocks` blocks and the mean
    /// of the last block's patch tokens, registers excluded.
    ///
    /// Errors: [`Error::InvalidArgument`] when `blocks` is 0 or above the model's depth, or `labels` does not
    /// have one entry per image; [`Error::Model`] from the forward.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use dinov2_model::{DinoVisionTransformer, VitConfig};
    /// use dinov2_train::eval::linear::LinearFeatures;
    /// # fn main() -> dinov2_train::Result<()> {
    /// let mut cfg = VitConfig::vit_small().with_registers(2);
    /// (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.patch_size, cfg.img_size) = (16, 2, 3, 8, 16);
    /// let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
    /// let model = DinoVisionTransformer::from_state_dict(&cfg, &sd, &Device::Cpu, DType::F32)?;
    /// let x = (Tensor::arange(0f32, 2. * 3. * 16. * 16., &Device::Cpu)? * 0.01)?.sin()?.reshape((2, 3, 16, 16))?;
    /// let f = LinearFeatures::from_images(&model, &x, 3, vec![0, 1])?;
    /// // the last block's class token is the final normalised class token
    /// let cls = model.forward_features(&x, None)?.x_norm_clstoken;
    /// let diff = (&f.class_tokens()[2] - cls)?.abs()?.max_all()?.to_scalar::<f32>()?;
    /// assert!(diff < 1e-5);
    /// assert!(LinearFeatures::from_images(&model, &x, 4, vec![0, 1]).is_err()); // only 3 blocks
    /// # Ok(()) }
    /// ```
    pub fn from_images(
        model: &DinoVisionTransformer,
        images: &Tensor,
        blocks: usize,
        labels: Vec<usize>,
    ) -> Result<Self> {
        check_blocks(model, blocks)?;
        let outs = model.get_intermediate_layers(
            images,
            &BlockSelection::Last(blocks),
            IntermediateOptions {
                reshape: false,
                return_class_token: true,
                norm: true,
            },
        )?;
        let last = outs
            .last()
            .ok_or_else(|| invalid("blocks", "the backbone returned no block outputs"))?;
        let patch_mean = last.patch_tokens.to_dtype(DType::F32)?.mean(1)?;
        let class_tokens = outs
            .iter()
            .map(|o| {
                o.class_token
                    .clone()
                    .ok_or_else(|| invalid("blocks", "the backbone returned no class token"))
            })
            .collect::<Result<Vec<_>>>()?;
        Self::new(class_tokens, patch_mean, labels)
    }

    /// Number of rows (images).
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The backbone width `D`.
    pub fn embed_dim(&self) -> usize {
        self.patch_mean.dims().get(1).copied().unwrap_or(0)
    }

    /// Number of blocks whose class tokens are cached (the largest usable `n_last_blocks`).
    pub fn blocks(&self) -> usize {
        self.class_tokens.len()
    }

    /// The labels, one per row.
    pub fn labels(&self) -> &[usize] {
        &self.labels
    }

    /// The cached class tokens, oldest block first, each `[N, D]` f32.
    pub fn class_tokens(&self) -> &[Tensor] {
        &self.class_tokens
    }

    /// The mean patch token of the last block, `[N, D]` f32.
    pub fn patch_mean(&self) -> &Tensor {
        &self.patch_mean
    }

    /// The input of a head with feature configuration `config`, `[N, config.input_dim(D)]`: exactly the official
    /// `create_linear_input(x_tokens_list, use_n_blocks, use_avgpool)` (the class tokens of the last
    /// `n_last_blocks` blocks, oldest first, then the patch mean when `avgpool`).
    ///
    /// Errors: [`Error::InvalidArgument`] when `n_last_blocks` is 0 or above [`blocks`](Self::blocks).
    /// (Example: [`LinearFeatures::new`].)
    pub fn linear_input(&self, config: FeatureConfig) -> Result<Tensor> {
        let n = config.n_last_blocks;
        if n == 0 || n > self.blocks() {
            return Err(invalid(
                "n_last_blocks",
                format!(
                    "{n} is outside 1..={}: the features hold the class tokens of {} block(s)",
                    self.blocks(),
                    self.blocks()
                ),
            ));
        }
        let mut parts: Vec<&Tensor> = self.class_tokens[self.blocks() - n..].iter().collect();
        if config.avgpool {
            parts.push(&self.patch_mean);
        }
        Ok(Tensor::cat(&parts, 1)?)
    }

    /// The rows `rows` (in that order, repeats allowed) as a new feature set.
    ///
    /// Errors: [`Error::InvalidArgument`] for a row index out of range.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use dinov2_train::eval::linear::LinearFeatures;
    /// # fn main() -> dinov2_train::Result<()> {
    /// let t = Tensor::new(&[[1f32], [2.], [3.]], &Device::Cpu)?;
    /// let f = LinearFeatures::new(vec![t.clone()], t, vec![7, 8, 9])?;
    /// let picked = f.select(&[2, 0])?;
    /// assert_eq!(picked.labels(), &[9, 7]);
    /// assert_eq!(picked.patch_mean().to_vec2::<f32>()?, [[3.0], [1.0]]);
    /// assert!(f.select(&[3]).is_err());
    /// # Ok(()) }
    /// ```
    pub fn select(&self, rows: &[usize]) -> Result<Self> {
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.len()) {
            return Err(invalid(
                "rows",
                format!("row {bad} is out of range for {} feature rows", self.len()),
            ));
        }
        let idx: Vec<u32> = rows
            .iter()
            .map(|&r| u32::try_from(r))
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| invalid("rows", "row indices must fit in 32 bits"))?;
        let idx = Tensor::from_vec(idx, rows.len(), self.patch_mean.device())?;
        Ok(Self {
            class_tokens: self
                .class_tokens
                .iter()
                .map(|t| t.index_select(&idx, 0))
                .collect::<candle_core::Result<_>>()?,
            patch_mean: self.patch_mean.index_select(&idx, 0)?,
            labels: rows.iter().map(|&r| self.labels[r]).collect(),
        })
    }

    fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        Ok(Self {
            class_tokens: self
                .class_tokens
                .iter()
                .map(|t| t.narrow(0, start, len))
                .collect::<candle_core::Result<_>>()?,
            patch_mean: self.patch_mean.narrow(0, start, len)?,
            labels: self.labels[start..start + len].to_vec(),
        })
    }

    fn concat(parts: &[Self]) -> Result<Self> {
        let blocks = parts.first().map_or(0, Self::blocks);
        let class_tokens = (0..blocks)
            .map(|b| {
                let ts: Vec<&Tensor> = parts.iter().map(|p| &p.class_tokens[b]).collect();
                Tensor::cat(&ts, 0)
            })
            .collect::<candle_core::Result<_>>()?;
        let means: Vec<&Tensor> = parts.iter().map(|p| &p.patch_mean).collect();
        Ok(Self {
            class_tokens,
            patch_mean: Tensor::cat(&means, 0)?,
            labels: parts
                .iter()
                .flat_map(|p| p.labels.iter().copied())
                .collect(),
        })
    }
}

fn check_blocks(model: &DinoVisionTransformer, blocks: usize) -> Result<()> {
    let depth = model.config().depth;
    if blocks == 0 || blocks > depth {
        return Err(invalid(
            "blocks",
            format!("{blocks} is outside 1..={depth}: the backbone has {depth} blocks"),
        ));
    }
    Ok(())
}

/// The [`LinearFeatures`] of every sample of `dataset`, computed once: each image goes through `transform`
/// (`Preprocess::Eval { resize, crop }`: shorter side resized, center crop, ImageNet normalisation; the official
/// evaluation uses [`Preprocess::OFFICIAL_EVAL`]), `batch_size` images per forward, and the class tokens of the
/// last `blocks` blocks (the official grid needs `min(4, depth)`) and the last block's patch mean are kept.
///
/// Errors: [`Error::InvalidArgument`] on an empty dataset, a zero `batch_size`, a transform that is not
/// `Preprocess::Eval`, `blocks` outside `1..=depth`, or a sample without a non-negative label; [`Error::Data`]
/// when a sample cannot be loaded; [`Error::Model`] / [`Error::Candle`] from the forward.
///
/// ```
/// use candle_core::{DType, Device};
/// use dinov2_data::{synthetic::SyntheticShapes, Preprocess};
/// use dinov2_model::{DinoVisionTransformer, VitConfig};
/// use dinov2_train::eval::linear::embed_linear_features;
/// # fn main() -> dinov2_train::Result<()> {
/// let mut cfg = VitConfig::vit_small();
/// (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.patch_size, cfg.img_size) = (16, 2, 4, 8, 32);
/// let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
/// let model = DinoVisionTransformer::from_state_dict(&cfg, &sd, &Device::Cpu, DType::F32)?;
/// let data = SyntheticShapes::new(6, 0);
/// let eval = Preprocess::Eval { resize: 36, crop: 32 };
/// let f = embed_linear_features(&model, &data, eval, 4, 4)?;
/// assert_eq!((f.len(), f.blocks(), f.embed_dim()), (6, 4, 16));
/// assert_eq!(f.labels(), &[0, 1, 2, 3, 4, 5]);
/// assert!(embed_linear_features(&model, &data, eval, 4, 5).is_err()); // 4 blocks only
/// # Ok(()) }
/// ```
pub fn embed_linear_features(
    model: &DinoVisionTransformer,
    dataset: &dyn Dataset,
    transform: Preprocess,
    batch_size: usize,
    blocks: usize,
) -> Result<LinearFeatures> {
    check_blocks(model, blocks)?;
    let mut parts = Vec::new();
    let labels = for_each_batch(
        model,
        dataset,
        transform,
        batch_size,
        "the linear probe",
        |x| {
            let b = x.dims().first().copied().unwrap_or(0);
            parts.push(LinearFeatures::from_images(model, x, blocks, vec![0; b])?);
            Ok(())
        },
    )?;
    let mut all = LinearFeatures::concat(&parts)?;
    all.labels = labels;
    Ok(all)
}

/// One head of the grid: its features and its learning rate before the linear scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeadSpec {
    /// The features it reads.
    pub config: FeatureConfig,
    /// Base learning rate (the head trains at `lr × batch / 256`, annealed).
    pub lr: f64,
}

/// The official grid in the official order: for each `n` of `n_last_blocks`, `avgpool` false then true, each
/// learning rate of `learning_rates` (`setup_linear_classifiers`).
///
/// ```
/// use dinov2_train::eval::linear::{official_grid, OFFICIAL_LEARNING_RATES, OFFICIAL_N_LAST_BLOCKS};
/// let grid = official_grid(&OFFICIAL_N_LAST_BLOCKS, &OFFICIAL_LEARNING_RATES);
/// assert_eq!(grid.len(), 52);
/// assert_eq!((grid[0].config.n_last_blocks, grid[0].config.avgpool, grid[0].lr), (1, false, 1e-5));
/// assert_eq!((grid[51].config.n_last_blocks, grid[51].config.avgpool, grid[51].lr), (4, true, 0.1));
/// ```
pub fn official_grid(n_last_blocks: &[usize], learning_rates: &[f64]) -> Vec<HeadSpec> {
    let mut grid = Vec::with_capacity(n_last_blocks.len() * 2 * learning_rates.len());
    for &n in n_last_blocks {
        for avgpool in [false, true] {
            for &lr in learning_rates {
                grid.push(HeadSpec {
                    config: FeatureConfig {
                        n_last_blocks: n,
                        avgpool,
                    },
                    lr,
                });
            }
        }
    }
    grid
}

/// The official linear scaling rule: `lr × batch_size / 256` (`scale_lr`, one process).
///
/// ```
/// assert_eq!(dinov2_train::eval::linear::scaled_lr(0.1, 128), 0.05);
/// ```
pub fn scaled_lr(lr: f64, batch_size: usize) -> f64 {
    lr * batch_size as f64 / 256.0
}

/// The official head names, `classifier_{n}_blocks_avgpool_{True|False}_lr_{scaled lr:.5f}` with `.` written
/// `_`. Where two heads of `specs` would get the same name (scaled rates that agree to 5 decimals), more decimals
/// are used for all of them.
///
/// ```
/// use dinov2_train::eval::linear::{head_names, official_grid};
/// let names = head_names(&official_grid(&[4], &[1e-3, 0.1]), 256);
/// assert_eq!(names[0], "classifier_4_blocks_avgpool_False_lr_0_00100");
/// assert_eq!(names[3], "classifier_4_blocks_avgpool_True_lr_0_10000");
/// // at batch 128, 1e-5 and 2e-5 scale to 0.000005 and 0.00001: 5 decimals would not tell them apart
/// let names = head_names(&official_grid(&[1], &[1e-5, 2e-5]), 128);
/// assert_eq!(names[0], "classifier_1_blocks_avgpool_False_lr_0_000005");
/// ```
pub fn head_names(specs: &[HeadSpec], batch_size: usize) -> Vec<String> {
    let names = |decimals: usize| -> Vec<String> {
        specs
            .iter()
            .map(|s| {
                let pool = if s.config.avgpool { "True" } else { "False" };
                let lr = format!("{:.*}", decimals, scaled_lr(s.lr, batch_size));
                format!(
                    "classifier_{}_blocks_avgpool_{pool}_lr_{}",
                    s.config.n_last_blocks,
                    lr.replace('.', "_")
                )
            })
            .collect()
    };
    for decimals in 5..12 {
        let candidate = names(decimals);
        let mut sorted = candidate.clone();
        sorted.sort();
        sorted.dedup();
        if sorted.len() == candidate.len() {
            return candidate;
        }
    }
    names(12)
}

/// Top-1 / top-5 accuracy (percent) and mean cross-entropy of one head on a feature set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeadScore {
    /// Percent of rows whose label has the largest logit (ties: lower class first).
    pub top1: f64,
    /// Percent of rows whose label is among the 5 largest logits.
    pub top5: f64,
    /// Mean cross-entropy (NaN or infinite for a diverged head).
    pub loss: f64,
}

/// The heads of the same features, trained as one matrix: `weight` `[H·C, dim]`, `bias` `[H·C]`.
#[derive(Debug, Clone)]
struct HeadGroup {
    config: FeatureConfig,
    heads: Vec<usize>,
    weight: Tensor,
    bias: Tensor,
    momentum: Option<(Tensor, Tensor)>,
}

/// A set of linear heads trained together on the same minibatches, as the official `AllClassifiers` with one
/// SGD optimiser (momentum [`MOMENTUM`], no weight decay, one parameter group per head at `lr × batch / 256`)
/// and `CosineAnnealingLR(optimizer, total_iterations, eta_min=0)`.
///
/// Heads that read the same features are stacked into one matrix, so a step is one matrix product per feature
/// configuration; gradients are the closed-form softmax cross-entropy gradients (mean over the batch, summed
/// over heads as the official loss).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use dinov2_train::eval::linear::{official_grid, FeatureConfig, LinearFeatures, LinearHeads};
/// # fn main() -> dinov2_train::Result<()> {
/// // two classes separated along the first axis
/// let x = Tensor::new(&[[1f32, 0.2], [0.8, -0.3], [-1.0, 0.1], [-0.9, -0.2]], &Device::Cpu)?;
/// let data = LinearFeatures::new(vec![x.clone()], x, vec![0, 0, 1, 1])?;
/// let specs = official_grid(&[1], &[0.5, 1e-5]);
/// let mut heads = LinearHeads::new(specs, 2, 2, 4, 50, 0)?;
/// let first = heads.step(&data)?;
/// for _ in 1..50 {
///     heads.step(&data)?;
/// }
/// assert!(heads.step(&data).is_err()); // all 50 iterations are done
/// let scores = heads.evaluate(&data)?;
/// assert_eq!(scores[0].top1, 100.0); // lr 0.5: separated
/// assert!(scores[0].loss < scores[1].loss); // lr 1e-5 barely moved
/// assert!(first > scores.iter().map(|s| s.loss).sum::<f64>());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct LinearHeads {
    specs: Vec<HeadSpec>,
    groups: Vec<HeadGroup>,
    embed_dim: usize,
    num_classes: usize,
    batch_size: usize,
    total_iterations: usize,
    iteration: usize,
}

impl LinearHeads {
    /// New heads for `specs` on features of width `embed_dim`, `num_classes` outputs each, initialised as the
    /// official `LinearClassifier` (weight ~ N(0, [`INIT_STD`]²) drawn from `seed`, head by head in `specs`
    /// order; bias 0). `batch_size` sets the learning-rate scaling, `total_iterations` the cosine schedule's
    /// length.
    ///
    /// Errors: [`Error::InvalidArgument`] for an empty `specs`, a spec with `n_last_blocks == 0` or a learning
    /// rate that is not positive and finite, or a zero `embed_dim`, `num_classes`, `batch_size` or
    /// `total_iterations`. (Example: [`LinearHeads`].)
    pub fn new(
        specs: Vec<HeadSpec>,
        embed_dim: usize,
        num_classes: usize,
        batch_size: usize,
        total_iterations: usize,
        seed: u64,
    ) -> Result<Self> {
        // `with_weights` validates everything (an empty weight list or zero-sized weights included)
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let weights = specs
            .iter()
            .map(|s| {
                let dim = s.config.input_dim(embed_dim);
                let w: Vec<f32> = (0..num_classes * dim)
                    .map(|_| (standard_normal(&mut rng) * INIT_STD) as f32)
                    .collect();
                Ok((
                    Tensor::from_vec(w, (num_classes, dim), &Device::Cpu)?,
                    Tensor::zeros(num_classes, DType::F32, &Device::Cpu)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Self::with_weights(specs, embed_dim, weights, batch_size, total_iterations)
    }

    /// Heads with given initial weights (`weights[h]` = (`[C, dim]`, `[C]`) for `specs[h]`), otherwise as
    /// [`new`](Self::new). The weights are copied to f32 on the CPU.
    ///
    /// Errors: those of [`new`](Self::new), and [`Error::InvalidArgument`] when `weights` does not hold one
    /// pair per spec of the shapes above with one `C` for all.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use dinov2_train::eval::linear::{official_grid, LinearHeads};
    /// # fn main() -> dinov2_train::Result<()> {
    /// let specs = official_grid(&[1], &[0.1]); // two heads: without and with the patch mean
    /// let w = |dim| Tensor::zeros((3, dim), DType::F32, &Device::Cpu);
    /// let b = Tensor::zeros(3, DType::F32, &Device::Cpu)?;
    /// let heads = LinearHeads::with_weights(specs.clone(), 8, vec![(w(8)?, b.clone()), (w(16)?, b.clone())], 64, 10)?;
    /// assert_eq!(heads.num_classes(), 3);
    /// assert_eq!(heads.learning_rate(1), 0.1 * 64.0 / 256.0);
    /// assert!(LinearHeads::with_weights(specs, 8, vec![(w(8)?, b.clone()), (w(8)?, b)], 64, 10).is_err());
    /// # Ok(()) }
    /// ```
    pub fn with_weights(
        specs: Vec<HeadSpec>,
        embed_dim: usize,
        weights: Vec<(Tensor, Tensor)>,
        batch_size: usize,
        total_iterations: usize,
    ) -> Result<Self> {
        validate_specs(&specs)?;
        if embed_dim == 0 {
            return Err(invalid("embed_dim", "must be positive"));
        }
        if batch_size == 0 {
            return Err(invalid("batch_size", "must be positive"));
        }
        if total_iterations == 0 {
            return Err(invalid(
                "total_iterations",
                "must be positive (the cosine schedule's length)",
            ));
        }
        if weights.len() != specs.len() {
            return Err(invalid(
                "weights",
                format!(
                    "has {} (weight, bias) pairs for {} heads",
                    weights.len(),
                    specs.len()
                ),
            ));
        }
        let num_classes = weights[0].0.dims().first().copied().unwrap_or(0);
        if num_classes == 0 {
            return Err(invalid("num_classes", "must be positive"));
        }
        let mut groups: Vec<HeadGroup> = Vec::new();
        let mut parts: Vec<(Vec<Tensor>, Vec<Tensor>)> = Vec::new();
        for (h, (spec, (w, b))) in specs.iter().zip(&weights).enumerate() {
            let dim = spec.config.input_dim(embed_dim);
            if w.dims() != [num_classes, dim] || b.dims() != [num_classes] {
                return Err(invalid(
                    "weights",
                    format!(
                        "head {h} ({}) needs weight [{num_classes}, {dim}] and bias [{num_classes}], got {:?} and {:?}",
                        spec.config.describe(),
                        w.dims(),
                        b.dims()
                    ),
                ));
            }
            let cpu = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F32);
            let (w, b) = (cpu(w)?, cpu(b)?);
            match groups.iter().position(|g| g.config == spec.config) {
                Some(g) => {
                    groups[g].heads.push(h);
                    parts[g].0.push(w);
                    parts[g].1.push(b);
                }
                None => {
                    groups.push(HeadGroup {
                        config: spec.config,
                        heads: vec![h],
                        weight: w.clone(),
                        bias: b.clone(),
                        momentum: None,
                    });
                    parts.push((vec![w], vec![b]));
                }
            }
        }
        for (g, (ws, bs)) in groups.iter_mut().zip(parts) {
            g.weight = Tensor::cat(&ws, 0)?;
            g.bias = Tensor::cat(&bs, 0)?;
        }
        Ok(Self {
            specs,
            groups,
            embed_dim,
            num_classes,
            batch_size,
            total_iterations,
            iteration: 0,
        })
    }

    /// The heads, in the order they were given.
    pub fn specs(&self) -> &[HeadSpec] {
        &self.specs
    }

    /// Number of classes of every head.
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// Steps taken so far.
    pub fn iteration(&self) -> usize {
        self.iteration
    }

    /// The learning rate head `head` takes at the next step: `lr × batch / 256 × (1 + cos(π t / T)) / 2` at
    /// iteration `t` of `T` (0 for an unknown head or after the last iteration).
    pub fn learning_rate(&self, head: usize) -> f64 {
        let Some(spec) = self.specs.get(head) else {
            return 0.0;
        };
        scaled_lr(spec.lr, self.batch_size) * self.cosine_factor()
    }

    fn cosine_factor(&self) -> f64 {
        if self.iteration >= self.total_iterations {
            return 0.0;
        }
        let t = self.iteration as f64 / self.total_iterations as f64;
        0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }

    /// One SGD step of every head on the minibatch `batch`; returns the summed loss (the sum over heads of the
    /// mean cross-entropy over the batch), computed before the update.
    ///
    /// Errors: [`Error::InvalidArgument`] after the last of `total_iterations` steps, for an empty batch, a batch
    /// of another width or with fewer cached blocks than a head reads, or a label `>= num_classes`.
    /// (Example: [`LinearHeads`].)
    pub fn step(&mut self, batch: &LinearFeatures) -> Result<f64> {
        if self.iteration >= self.total_iterations {
            return Err(invalid(
                "iteration",
                format!(
                    "all {} iterations of the schedule are done",
                    self.total_iterations
                ),
            ));
        }
        self.check_features(batch, "batch")?;
        let factor = self.cosine_factor();
        let b = batch.len();
        let c = self.num_classes;
        let mut total = 0f64;
        for g in &mut self.groups {
            let x = batch.linear_input(g.config)?.to_device(&Device::Cpu)?;
            let h = g.heads.len();
            let logits = x
                .matmul(&g.weight.t()?)?
                .broadcast_add(&g.bias)?
                .flatten_all()?;
            let mut grad: Vec<f32> = logits.to_vec1()?;
            total += softmax_xent_grad(&mut grad, batch.labels(), h, c);
            let grad = Tensor::from_vec(grad, (b, h * c), &Device::Cpu)?;
            let grad_w = grad.t()?.matmul(&x)?;
            let grad_b = grad.sum(0)?;
            let (buf_w, buf_b) = match g.momentum.take() {
                None => (grad_w, grad_b),
                Some((mw, mb)) => (
                    (mw.affine(MOMENTUM, 0.0)? + grad_w)?,
                    (mb.affine(MOMENTUM, 0.0)? + grad_b)?,
                ),
            };
            let lrs: Vec<f32> = g
                .heads
                .iter()
                .flat_map(|&i| {
                    let lr = (scaled_lr(self.specs[i].lr, self.batch_size) * factor) as f32;
                    std::iter::repeat_n(lr, c)
                })
                .collect();
            let lrs = Tensor::from_vec(lrs, h * c, &Device::Cpu)?;
            g.weight = (&g.weight - buf_w.broadcast_mul(&lrs.unsqueeze(1)?)?)?;
            g.bias = (&g.bias - (&buf_b * &lrs)?)?;
            g.momentum = Some((buf_w, buf_b));
        }
        self.iteration += 1;
        Ok(total)
    }

    fn check_features(&self, f: &LinearFeatures, name: &'static str) -> Result<()> {
        if f.is_empty() {
            return Err(invalid(name, "has no rows"));
        }
        if f.embed_dim() != self.embed_dim {
            return Err(invalid(
                name,
                format!(
                    "has features of width {} but the heads read width {}",
                    f.embed_dim(),
                    self.embed_dim
                ),
            ));
        }
        let need = self
            .specs
            .iter()
            .map(|s| s.config.n_last_blocks)
            .max()
            .unwrap_or(1);
        if f.blocks() < need {
            return Err(invalid(
                name,
                format!(
                    "holds the class tokens of {} block(s) but a head reads {need}",
                    f.blocks()
                ),
            ));
        }
        if let Some(&bad) = f.labels().iter().find(|&&l| l >= self.num_classes) {
            return Err(invalid(
                name,
                format!(
                    "has label {bad} but the heads have {} classes",
                    self.num_classes
                ),
            ));
        }
        Ok(())
    }

    /// Every head's weight `[C, dim]` and bias `[C]`, in [`specs`](Self::specs) order.
    ///
    /// ```
    /// use dinov2_train::eval::linear::{official_grid, LinearHeads};
    /// # fn main() -> dinov2_train::Result<()> {
    /// let heads = LinearHeads::new(official_grid(&[1, 4], &[0.1]), 8, 5, 128, 100, 0)?;
    /// let w = heads.weights()?;
    /// assert_eq!(w.len(), 4);
    /// assert_eq!((w[3].0.dims(), w[3].1.dims()), (&[5, 5 * 8][..], &[5][..])); // 4 blocks + avgpool
    /// let head = heads.head(3)?; // the same weights, with their features and learning rate
    /// assert_eq!((head.config.n_last_blocks, head.config.avgpool, head.scaled_lr), (4, true, 0.05));
    /// assert!(heads.head(4).is_err());
    /// # Ok(()) }
    /// ```
    pub fn weights(&self) -> Result<Vec<(Tensor, Tensor)>> {
        let c = self.num_classes;
        let mut out = vec![None; self.specs.len()];
        for g in &self.groups {
            for (k, &h) in g.heads.iter().enumerate() {
                out[h] = Some((g.weight.narrow(0, k * c, c)?, g.bias.narrow(0, k * c, c)?));
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Head `head` as a [`TrainedHead`] (example: [`weights`](Self::weights)).
    ///
    /// Errors: [`Error::InvalidArgument`] for an unknown head.
    pub fn head(&self, head: usize) -> Result<TrainedHead> {
        let spec = *self.specs.get(head).ok_or_else(|| {
            invalid(
                "head",
                format!("{head} is out of range for {} heads", self.specs.len()),
            )
        })?;
        let (weight, bias) = self.weights()?.swap_remove(head);
        Ok(TrainedHead {
            config: spec.config,
            lr: spec.lr,
            scaled_lr: scaled_lr(spec.lr, self.batch_size),
            weight,
            bias,
        })
    }

    /// Top-1, top-5 and mean cross-entropy of every head (in [`specs`](Self::specs) order) on `features`,
    /// whose labels are the truth. Logits are computed a chunk of rows at a time. A row whose logits are not all
    /// finite counts as a miss.
    ///
    /// Errors: those of [`step`](Self::step) about the features. (Example: [`LinearHeads`].)
    pub fn evaluate(&self, features: &LinearFeatures) -> Result<Vec<HeadScore>> {
        self.check_features(features, "features")?;
        let c = self.num_classes;
        let n = features.len();
        let mut hits1 = vec![0usize; self.specs.len()];
        let mut hits5 = vec![0usize; self.specs.len()];
        let mut loss = vec![0f64; self.specs.len()];
        let rows_per_chunk = (SCORE_CHUNK_ELEMS / (self.specs.len() * c).max(1)).clamp(1, n);
        for start in (0..n).step_by(rows_per_chunk) {
            let chunk = features.narrow(start, rows_per_chunk.min(n - start))?;
            for g in &self.groups {
                let x = chunk.linear_input(g.config)?.to_device(&Device::Cpu)?;
                let logits: Vec<Vec<f32>> = x
                    .matmul(&g.weight.t()?)?
                    .broadcast_add(&g.bias)?
                    .to_vec2()?;
                // per head: (top-1 hits, top-5 hits, summed loss) over the chunk
                let per_head: Vec<(usize, usize, f64)> = (0..g.heads.len())
                    .into_par_iter()
                    .map(|k| {
                        let mut acc = (0, 0, 0f64);
                        for (row, &y) in logits.iter().zip(chunk.labels()) {
                            let s = &row[k * c..(k + 1) * c];
                            let rank = if s.iter().all(|v| v.is_finite()) {
                                rank_of(s, y)
                            } else {
                                usize::MAX
                            };
                            acc.0 += usize::from(rank == 0);
                            acc.1 += usize::from(rank < 5);
                            acc.2 += cross_entropy(s, y);
                        }
                        acc
                    })
                    .collect();
                for (&h, (t1, t5, l)) in g.heads.iter().zip(per_head) {
                    hits1[h] += t1;
                    hits5[h] += t5;
                    loss[h] += l;
                }
            }
        }
        let pct = |k: usize| 100.0 * k as f64 / n as f64;
        Ok((0..self.specs.len())
            .map(|h| HeadScore {
                top1: pct(hits1[h]),
                top5: pct(hits5[h]),
                loss: loss[h] / n as f64,
            })
            .collect())
    }
}

fn validate_specs(specs: &[HeadSpec]) -> Result<()> {
    if specs.is_empty() {
        return Err(invalid("specs", "needs at least one head"));
    }
    for s in specs {
        if s.config.n_last_blocks == 0 {
            return Err(invalid("n_last_blocks", "must be at least 1"));
        }
        if !(s.lr.is_finite() && s.lr > 0.0) {
            return Err(invalid(
                "learning_rates",
                format!("must be positive and finite, got {}", s.lr),
            ));
        }
    }
    Ok(())
}

/// A standard normal draw (Box-Muller).
fn standard_normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// `-log softmax(s)[y]`, in f64.
fn cross_entropy(s: &[f32], y: usize) -> f64 {
    let max = s
        .iter()
        .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
    let sum: f64 = s.iter().map(|&v| (f64::from(v) - max).exp()).sum();
    max + sum.ln() - f64::from(s[y])
}

/// Turns the logits `[B, heads·classes]` (row-major) into the gradient of the summed per-head mean
/// cross-entropy, `(softmax − onehot) / B`, in place; returns that loss.
fn softmax_xent_grad(logits: &mut [f32], labels: &[usize], heads: usize, classes: usize) -> f64 {
    let b = labels.len();
    let scale = 1.0 / b as f32;
    let loss: f64 = logits
        .par_chunks_mut(heads * classes)
        .zip(labels.par_iter())
        .map(|(row, &y)| {
            let mut l = 0f64;
            for s in row.chunks_mut(classes) {
                l += cross_entropy(s, y);
                let max = s.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let mut sum = 0f32;
                for v in s.iter_mut() {
                    *v = (*v - max).exp();
                    sum += *v;
                }
                for v in s.iter_mut() {
                    *v = *v / sum * scale;
                }
                s[y] -= scale;
            }
            l
        })
        .sum();
    loss / b as f64
}

/// A trained head: its features, its learning rate, and its weights in the official layout.
#[derive(Debug, Clone)]
pub struct TrainedHead {
    /// The features it reads.
    pub config: FeatureConfig,
    /// Base learning rate of the grid.
    pub lr: f64,
    /// The learning rate it trained at (before annealing).
    pub scaled_lr: f64,
    /// `[C, dim]`, f32.
    pub weight: Tensor,
    /// `[C]`, f32.
    pub bias: Tensor,
}

/// Metadata keys of a saved head (besides `format`).
const META_N_LAST_BLOCKS: &str = "n_last_blocks";
const META_AVGPOOL: &str = "avgpool";
const META_NUM_CLASSES: &str = "num_classes";
const META_CLASS_NAMES: &str = "class_names";
const META_EMBED_DIM: &str = "embed_dim";
const META_LR: &str = "lr";

impl TrainedHead {
    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.weight.dims().first().copied().unwrap_or(0)
    }

    /// The backbone width `D` it reads (input width / (n_last_blocks + avgpool)).
    pub fn embed_dim(&self) -> usize {
        let width = self.weight.dims().get(1).copied().unwrap_or(0);
        width / (self.config.n_last_blocks + usize::from(self.config.avgpool)).max(1)
    }

    /// Writes the head as safetensors in the official `_linear_head` layout (`weight` `[C, dim]`, `bias` `[C]`,
    /// f32), atomically, with metadata `n_last_blocks`, `avgpool` (`true`/`false`), `num_classes`, `embed_dim`,
    /// `lr` (the scaled rate) and `class_names` (a JSON array, one name per class in label order). In Python:
    /// `nn.Linear(dim, C).load_state_dict(safetensors.torch.load_file(path))`; here: [`load_head`].
    ///
    /// Errors: [`Error::InvalidArgument`] when `class_names` does not have one name per class; [`Error::Io`] when
    /// the file cannot be written.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use dinov2_train::eval::linear::{load_head, FeatureConfig, TrainedHead};
    /// # fn main() -> dinov2_train::Result<()> {
    /// let head = TrainedHead {
    ///     config: FeatureConfig { n_last_blocks: 4, avgpool: false },
    ///     lr: 0.01,
    ///     scaled_lr: 0.005,
    ///     weight: Tensor::ones((2, 4 * 8), DType::F32, &Device::Cpu)?,
    ///     bias: Tensor::new(&[0.5f32, -0.5], &Device::Cpu)?,
    /// };
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("head.safetensors");
    /// head.save(&path, &["cat".to_string(), "dog".to_string()])?;
    /// let back = load_head(&path)?;
    /// assert_eq!(back.config, head.config);
    /// assert_eq!(back.class_names, ["cat", "dog"]);
    /// assert_eq!((back.classifier.layers(), back.classifier.avgpool(), back.classifier.num_classes()), (4, false, 2));
    /// assert!(head.save(&path, &["cat".to_string()]).is_err());
    /// # Ok(()) }
    /// ```
    pub fn save(&self, path: impl AsRef<Path>, class_names: &[String]) -> Result<()> {
        let path = path.as_ref();
        let c = self.num_classes();
        if class_names.len() != c {
            return Err(invalid(
                "class_names",
                format!("has {} names for a head of {c} classes", class_names.len()),
            ));
        }
        let names = serde_json::to_string(class_names)
            .map_err(|e| invalid("class_names", format!("cannot be written as JSON: {e}")))?;
        let meta: HashMap<String, String> = [
            ("format", "pt".to_string()),
            (META_N_LAST_BLOCKS, self.config.n_last_blocks.to_string()),
            (META_AVGPOOL, self.config.avgpool.to_string()),
            (META_NUM_CLASSES, c.to_string()),
            (META_EMBED_DIM, self.embed_dim().to_string()),
            (META_LR, self.scaled_lr.to_string()),
            (META_CLASS_NAMES, names),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let cpu = |t: &Tensor| -> Result<Tensor> {
            Ok(t.to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?
                .contiguous()?)
        };
        let tensors = [("bias", cpu(&self.bias)?), ("weight", cpu(&self.weight)?)];
        let bytes = safetensors::serialize(tensors.iter().map(|(k, t)| (*k, t)), Some(meta))
            .map_err(|e| Error::io(path, std::io::Error::other(e)))?;
        crate::plot::write_atomic(path, &bytes)
    }
}

/// A head read back by [`load_head`].
#[derive(Debug, Clone)]
pub struct LoadedHead {
    /// The classifier (`LinearClassifier::forward(&model, &images)` gives the logits).
    pub classifier: LinearClassifier,
    /// The features it reads.
    pub config: FeatureConfig,
    /// One name per class, in label order.
    pub class_names: Vec<String>,
}

/// Reads a head written by [`TrainedHead::save`] (or any official-layout `weight`/`bias` safetensors with that
/// metadata) as a `dinov2_model::LinearClassifier`. (Example: [`TrainedHead::save`].)
///
/// Errors: [`Error::Io`] when the file cannot be read; [`Error::Checkpoint`] when it is not safetensors, lacks a
/// metadata key or holds values that disagree with the tensors; [`Error::Model`] for tensors of the wrong shape.
pub fn load_head(path: impl AsRef<Path>) -> Result<LoadedHead> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |reason: String| Error::checkpoint(path, reason);
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let get = |key: &str| -> Result<&String> {
        meta.get(key).ok_or_else(|| {
            bad(format!(
                "metadata key `{key}` is missing; is this a head written by `dinov2 eval linear`?"
            ))
        })
    };
    let number = |key: &str| -> Result<usize> {
        let v = get(key)?;
        v.parse()
            .map_err(|_| bad(format!("metadata `{key}` = `{v}` is not a whole number")))
    };
    let n_last_blocks = number(META_N_LAST_BLOCKS)?;
    let embed_dim = number(META_EMBED_DIM)?;
    let num_classes = number(META_NUM_CLASSES)?;
    let avgpool = match get(META_AVGPOOL)?.as_str() {
        "true" => true,
        "false" => false,
        other => {
            return Err(bad(format!(
                "metadata `{META_AVGPOOL}` = `{other}` is not true or false"
            )))
        }
    };
    let class_names: Vec<String> = serde_json::from_str(get(META_CLASS_NAMES)?).map_err(|e| {
        bad(format!(
            "metadata `{META_CLASS_NAMES}` is not a JSON list of names: {e}"
        ))
    })?;
    if class_names.len() != num_classes {
        return Err(bad(format!(
            "{} class names for {num_classes} classes",
            class_names.len()
        )));
    }
    let sd: StateDict = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?
        .into_iter()
        .collect();
    let classifier =
        LinearClassifier::from_state_dict_with_avgpool(&sd, "", n_last_blocks, avgpool, embed_dim)?;
    if classifier.num_classes() != num_classes {
        return Err(bad(format!(
            "the weight has {} classes but the metadata says {num_classes}",
            classifier.num_classes()
        )));
    }
    Ok(LoadedHead {
        classifier,
        config: FeatureConfig {
            n_last_blocks,
            avgpool,
        },
        class_names,
    })
}

/// Settings of [`linear_probe`]; `Default` is the official grid with our held-out selection.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearProbeConfig {
    /// Numbers of last blocks; `None`: the official {1, 4}, the configurations the features cannot serve (a
    /// backbone of fewer than 4 blocks) skipped with a note. Given explicitly, each must be servable.
    pub n_last_blocks: Option<Vec<usize>>,
    /// Base learning rates ([`OFFICIAL_LEARNING_RATES`]).
    pub learning_rates: Vec<f64>,
    /// Epochs (10).
    pub epochs: usize,
    /// Iterations per epoch; `None`: [`OFFICIAL_EPOCH_LENGTH`], or one pass over the training split when that
    /// is longer.
    pub epoch_length: Option<usize>,
    /// Minibatch size (128, the official per-GPU batch); capped at the training split's size.
    pub batch_size: usize,
    /// Fraction of the training set held out for the head selection (0.1; at least one image). 0 selects on the
    /// validation set, as the official script.
    pub holdout: f64,
    /// Seed of the split, the initial weights and the minibatch order.
    pub seed: u64,
}

impl Default for LinearProbeConfig {
    fn default() -> Self {
        Self {
            n_last_blocks: None,
            learning_rates: OFFICIAL_LEARNING_RATES.to_vec(),
            epochs: 10,
            epoch_length: None,
            batch_size: 128,
            holdout: 0.1,
            seed: 0,
        }
    }
}

/// The result of one head of the grid. Accuracies in percent.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadResult {
    /// The official name ([`head_names`]).
    pub name: String,
    /// Its features and base learning rate.
    pub spec: HeadSpec,
    /// Held-out scores (`None` when the selection is on the validation set).
    pub holdout: Option<HeadScore>,
    /// Validation scores.
    pub val: HeadScore,
}

impl HeadResult {
    /// The score the selection ranks by: held-out, else validation.
    fn selection(&self) -> HeadScore {
        self.holdout.unwrap_or(self.val)
    }

    /// True when `self` ranks strictly above `other`: higher selection top-1, then lower selection loss (a
    /// non-finite loss ranks last).
    fn beats(&self, other: &HeadResult) -> bool {
        let (a, b) = (self.selection(), other.selection());
        let loss = |s: HeadScore| {
            if s.loss.is_finite() {
                s.loss
            } else {
                f64::INFINITY
            }
        };
        a.top1 > b.top1 || (a.top1 == b.top1 && loss(a) < loss(b))
    }
}

/// What [`linear_probe`] found.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LinearProbeResult {
    /// Every head of the grid, in grid order.
    pub heads: Vec<HeadResult>,
    /// Index into `heads` of the selected head.
    pub best: usize,
    /// The selected head's weights.
    pub head: TrainedHead,
    /// Configurations skipped and other remarks, for the user.
    pub notes: Vec<String>,
    /// SGD steps taken.
    pub iterations: usize,
    /// The minibatch size used (the requested one capped at the training split).
    pub batch_size: usize,
    /// Rows the heads trained on.
    pub train_rows: usize,
    /// Rows held out for the selection (0: selected on validation).
    pub holdout_rows: usize,
}

impl LinearProbeResult {
    /// The selected head.
    pub fn best(&self) -> &HeadResult {
        &self.heads[self.best]
    }

    /// For each feature configuration (grid order), the head of best selection score: one line per
    /// configuration for a summary.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use dinov2_train::eval::linear::{linear_probe, LinearFeatures, LinearProbeConfig};
    /// # fn main() -> dinov2_train::Result<()> {
    /// let x = Tensor::new(&[[1f32, 0.], [0., 1.], [0.9, 0.1], [0.1, 0.9], [1., 0.2], [0.2, 1.]], &Device::Cpu)?;
    /// let f = LinearFeatures::new(vec![x.clone()], x, vec![0, 1, 0, 1, 0, 1])?;
    /// let cfg = LinearProbeConfig { epochs: 1, epoch_length: Some(5), holdout: 0.0, ..Default::default() };
    /// let r = linear_probe(&f, &f, 2, &cfg)?;
    /// let per = r.best_per_config(); // 1 block, 1 block + avgpool (one cached block: n = 4 skipped)
    /// assert_eq!(per.len(), 2);
    /// assert!(per.iter().any(|h| h.name == r.best().name));
    /// # Ok(()) }
    /// ```
    pub fn best_per_config(&self) -> Vec<&HeadResult> {
        let mut out: Vec<&HeadResult> = Vec::new();
        for h in &self.heads {
            match out.iter_mut().find(|o| o.spec.config == h.spec.config) {
                Some(o) if h.beats(o) => *o = h,
                Some(_) => {}
                None => out.push(h),
            }
        }
        out
    }

    /// `{"best": {"name", "top1", "top5"}, "heads": {"<name>": {"holdout_top1", "top1", "top5"}, ...}}` in
    /// percent (`holdout_top1` is null when the selection was on the validation set): the `linear` object of
    /// the metrics files.
    pub fn metrics_json(&self) -> serde_json::Value {
        let best = self.best();
        let mut heads = serde_json::Map::new();
        for h in &self.heads {
            heads.insert(
                h.name.clone(),
                serde_json::json!({
                    "holdout_top1": h.holdout.map(|s| s.top1),
                    "top1": h.val.top1,
                    "top5": h.val.top5,
                }),
            );
        }
        serde_json::json!({
            "best": { "name": best.name, "top1": best.val.top1, "top5": best.val.top5 },
            "heads": heads,
        })
    }
}

/// The linear probe (see the [module docs](self)): trains the grid of heads on `train` (less a held-out split),
/// selects the best on the held-out split, and scores every head on `val`. Labels must be below `num_classes`.
///
/// Errors: [`Error::InvalidArgument`] for an empty feature set, features of different widths, a label
/// `>= num_classes`, an empty or non-positive learning-rate list or one with repeats, a zero `epochs`,
/// `epoch_length` or `batch_size`, `holdout` outside `[0, 1)`, a training set too small to hold out an image and keep one, or
/// `n_last_blocks` given explicitly with a value the features cannot serve (0, repeated, or above
/// `train.blocks()`).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use dinov2_train::eval::linear::{linear_probe, LinearFeatures, LinearProbeConfig};
/// # fn main() -> dinov2_train::Result<()> {
/// // three classes on three axes, 60 noisy points each
/// let rows: Vec<f32> = (0..180).flat_map(|i| {
///     let mut v = [((i * 7) % 5) as f32 * 0.05; 3];
///     v[i % 3] += 1.0;
///     v
/// }).collect();
/// let x = Tensor::from_vec(rows, (180, 3), &Device::Cpu)?;
/// let f = LinearFeatures::new(vec![x.clone()], x, (0..180).map(|i| i % 3).collect())?;
/// let cfg = LinearProbeConfig {
///     n_last_blocks: Some(vec![1]),
///     epochs: 4,
///     epoch_length: Some(20),
///     batch_size: 32,
///     ..Default::default()
/// };
/// let r = linear_probe(&f, &f, 3, &cfg)?;
/// assert_eq!((r.heads.len(), r.holdout_rows, r.train_rows), (26, 18, 162));
/// assert_eq!(r.best().val.top1, 100.0);
/// assert_eq!(r.metrics_json()["best"]["top1"], 100.0);
/// # Ok(()) }
/// ```
pub fn linear_probe(
    train: &LinearFeatures,
    val: &LinearFeatures,
    num_classes: usize,
    cfg: &LinearProbeConfig,
) -> Result<LinearProbeResult> {
    if train.is_empty() || val.is_empty() {
        let name = if train.is_empty() { "train" } else { "val" };
        return Err(invalid(name, "has no rows"));
    }
    if train.embed_dim() != val.embed_dim() {
        return Err(invalid(
            "val",
            format!(
                "has features of width {} but train has {}",
                val.embed_dim(),
                train.embed_dim()
            ),
        ));
    }
    if num_classes == 0 {
        return Err(invalid("num_classes", "must be positive"));
    }
    for (name, f) in [("train", train), ("val", val)] {
        if let Some(&bad) = f.labels().iter().find(|&&l| l >= num_classes) {
            return Err(invalid(
                name,
                format!("has label {bad}, not below num_classes = {num_classes}"),
            ));
        }
    }
    if cfg.learning_rates.is_empty() {
        return Err(invalid(
            "learning_rates",
            "needs at least one value (officially 13, 1e-5 to 0.1)",
        ));
    }
    for (i, lr) in cfg.learning_rates.iter().enumerate() {
        if cfg.learning_rates[..i].contains(lr) {
            return Err(invalid(
                "learning_rates",
                format!("has {lr} twice; give each rate once"),
            ));
        }
    }
    if cfg.epochs == 0 {
        return Err(invalid("epochs", "must be at least 1"));
    }
    if cfg.epoch_length == Some(0) {
        return Err(invalid("epoch_length", "must be at least 1 iteration"));
    }
    if cfg.batch_size == 0 {
        return Err(invalid("batch_size", "must be positive"));
    }
    if !(cfg.holdout.is_finite() && (0.0..1.0).contains(&cfg.holdout)) {
        return Err(invalid(
            "holdout",
            format!(
                "must be in [0, 1) (0.1 holds out 10% of the training images), got {}",
                cfg.holdout
            ),
        ));
    }
    let blocks = train.blocks().min(val.blocks());
    let mut notes = Vec::new();
    let n_last_blocks = match &cfg.n_last_blocks {
        Some(list) => {
            if list.is_empty() {
                return Err(invalid(
                    "n_last_blocks",
                    "needs at least one value (officially 1 and 4)",
                ));
            }
            for (i, &n) in list.iter().enumerate() {
                if n == 0 || n > blocks {
                    return Err(invalid(
                        "n_last_blocks",
                        format!("{n} is outside 1..={blocks}: the features hold the class tokens of {blocks} block(s)"),
                    ));
                }
                if list[..i].contains(&n) {
                    return Err(invalid("n_last_blocks", format!("has {n} twice")));
                }
            }
            list.clone()
        }
        None => {
            let (ok, skipped): (Vec<usize>, Vec<usize>) =
                OFFICIAL_N_LAST_BLOCKS.iter().partition(|&&n| n <= blocks);
            for n in skipped {
                notes.push(format!(
                    "n_last_blocks = {n} skipped: the features hold the class tokens of {blocks} block(s)"
                ));
            }
            ok
        }
    };

    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let (fit, holdout) = if cfg.holdout > 0.0 {
        let n = train.len();
        let h = ((cfg.holdout * n as f64).round() as usize).max(1);
        if h >= n {
            return Err(invalid(
                "train",
                format!(
                    "has {n} image(s): too few to hold out {h} for the head selection and train on the rest; \
                     give more training images or holdout = 0 (select on the validation set)"
                ),
            ));
        }
        let perm = permutation(n, &mut rng);
        (train.select(&perm[h..])?, Some(train.select(&perm[..h])?))
    } else {
        notes.push(
            "holdout = 0: the head is selected on the validation set (as the official script)"
                .into(),
        );
        (train.clone(), None)
    };
    let batch_size = cfg.batch_size.min(fit.len());
    let per_epoch = cfg
        .epoch_length
        .unwrap_or(OFFICIAL_EPOCH_LENGTH.max(fit.len() / batch_size));
    let iterations = cfg.epochs * per_epoch;
    let specs = official_grid(&n_last_blocks, &cfg.learning_rates);
    let names = head_names(&specs, batch_size);
    let mut heads = LinearHeads::new(
        specs,
        train.embed_dim(),
        num_classes,
        batch_size,
        iterations,
        rng.random(),
    )?;
    // an infinite sampler: successive shuffles of the training split, cut into batches
    let mut order: Vec<usize> = Vec::new();
    let mut next = 0;
    for _ in 0..iterations {
        let mut rows = Vec::with_capacity(batch_size);
        while rows.len() < batch_size {
            if next == order.len() {
                order = permutation(fit.len(), &mut rng);
                next = 0;
            }
            rows.push(order[next]);
            next += 1;
        }
        heads.step(&fit.select(&rows)?)?;
    }
    let holdout_scores = holdout.as_ref().map(|h| heads.evaluate(h)).transpose()?;
    let val_scores = heads.evaluate(val)?;
    let results: Vec<HeadResult> = heads
        .specs()
        .iter()
        .zip(names)
        .enumerate()
        .map(|(i, (&spec, name))| HeadResult {
            name,
            spec,
            holdout: holdout_scores.as_ref().map(|s| s[i]),
            val: val_scores[i],
        })
        .collect();
    let mut best = 0;
    for (i, r) in results.iter().enumerate() {
        if r.beats(&results[best]) {
            best = i;
        }
    }
    Ok(LinearProbeResult {
        head: heads.head(best)?,
        heads: results,
        best,
        notes,
        iterations,
        batch_size,
        train_rows: fit.len(),
        holdout_rows: holdout.as_ref().map_or(0, LinearFeatures::len),
    })
}

/// A uniformly random permutation of `0..n` (Fisher-Yates).
fn permutation(n: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.random_range(0..=i);
        p.swap(i, j);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use dinov2_model::VitConfig;

    /// `n` points of `classes` clusters in `d >= classes` dimensions (seeded): centre of class `c` at `3·e_c`,
    /// noise uniform in [-0.5, 0.5) per coordinate. Three cached blocks: the last holds the points, the older ones
    /// scaled and shifted copies; the patch mean holds their negation.
    fn clusters(n: usize, classes: usize, d: usize, seed: u64) -> LinearFeatures {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let labels: Vec<usize> = (0..n).map(|i| i % classes).collect();
        let mut data = Vec::with_capacity(n * d);
        for &y in &labels {
            for j in 0..d {
                data.push(rng.random::<f32>() - 0.5 + if j == y { 3.0 } else { 0.0 });
            }
        }
        let x = Tensor::from_vec(data, (n, d), &Device::Cpu).unwrap();
        let old = x.affine(0.5, 0.25).unwrap();
        let neg = x.affine(-1.0, 0.0).unwrap();
        LinearFeatures::new(vec![old.clone(), old, x], neg, labels).unwrap()
    }

    fn name_of<T: std::fmt::Debug>(r: Result<T>) -> &'static str {
        match r {
            Err(Error::InvalidArgument { name, .. }) => name,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
            .unwrap()
    }

    fn tiny_model(depth: usize, registers: usize) -> DinoVisionTransformer {
        let mut cfg = VitConfig::vit_small().with_registers(registers);
        (
            cfg.embed_dim,
            cfg.num_heads,
            cfg.depth,
            cfg.patch_size,
            cfg.img_size,
        ) = (16, 2, depth, 8, 16);
        let sd = dinov2_model::init::init_state_dict(&cfg, 3).unwrap();
        DinoVisionTransformer::from_state_dict(&cfg, &sd, &Device::Cpu, DType::F32).unwrap()
    }

    fn images(n: usize) -> Tensor {
        (Tensor::arange(0f32, (n * 3 * 16 * 16) as f32, &Device::Cpu).unwrap() * 0.37)
            .and_then(|t| t.sin()?.reshape((n, 3, 16, 16)))
            .unwrap()
    }

    #[test]
    fn linear_input_is_the_official_concatenation() {
        let t = |v: f32| Tensor::full(v, (2, 3), &Device::Cpu).unwrap();
        // blocks d-4 .. d-1 hold 1, 2, 3, 4; the patch mean holds 9
        let f = LinearFeatures::new(vec![t(1.), t(2.), t(3.), t(4.)], t(9.), vec![0, 1]).unwrap();
        let row = |n_last_blocks, avgpool| {
            let x = f
                .linear_input(FeatureConfig {
                    n_last_blocks,
                    avgpool,
                })
                .unwrap();
            x.to_vec2::<f32>().unwrap()[1].clone()
        };
        assert_eq!(row(1, false), [4.0; 3]);
        assert_eq!(row(1, true), [4., 4., 4., 9., 9., 9.]);
        assert_eq!(
            row(4, false),
            [1., 1., 1., 2., 2., 2., 3., 3., 3., 4., 4., 4.]
        );
        let r = row(4, true);
        assert_eq!(
            (r.len(), &r[..3], &r[12..]),
            (15, &[1.0; 3][..], &[9.0; 3][..])
        );
        let five = FeatureConfig {
            n_last_blocks: 5,
            avgpool: true,
        };
        assert_eq!(name_of(f.linear_input(five)), "n_last_blocks");
    }

    #[test]
    fn features_come_from_the_intermediate_layers_without_registers() {
        let model = tiny_model(4, 2);
        let x = images(3);
        let f = LinearFeatures::from_images(&model, &x, 4, vec![0, 1, 2]).unwrap();
        let full = model.forward_features(&x, None).unwrap();
        assert!(max_diff(&f.class_tokens()[3], &full.x_norm_clstoken) < 1e-5);
        let mean = full.x_norm_patchtokens.mean(1).unwrap();
        assert!(max_diff(f.patch_mean(), &mean) < 1e-5);
        // the released 4-layer head reads exactly the (4, avgpool) input
        let vm = candle_nn::VarMap::new();
        let vb = dinov2_model::init::seeded(&vm, 0, DType::F32, &Device::Cpu);
        let lc = LinearClassifier::new(4, 16, 3, vb).unwrap();
        let four = FeatureConfig {
            n_last_blocks: 4,
            avgpool: true,
        };
        assert!(
            max_diff(
                &lc.features(&model, &x).unwrap(),
                &f.linear_input(four).unwrap()
            ) < 1e-5
        );
        // the blocks differ, so a wrong order would show
        assert!(max_diff(&f.class_tokens()[0], &f.class_tokens()[3]) > 1e-2);
        assert_eq!(
            name_of(LinearFeatures::from_images(&model, &x, 4, vec![0])),
            "labels"
        );
        assert_eq!(
            name_of(LinearFeatures::from_images(&model, &x, 0, vec![0, 1, 2])),
            "blocks"
        );
    }

    /// Plain per-head SGD (momentum 0.9, cosine annealing over `total` steps) in f64 on the given batches; returns
    /// rows `[w_k..., b_k]`.
    fn reference_sgd(
        x: &[Vec<f32>],
        labels: &[usize],
        w0: &[Vec<f32>],
        lr: f64,
        batches: &[Vec<usize>],
        total: usize,
    ) -> Vec<Vec<f64>> {
        let (c, d) = (w0.len(), x[0].len());
        let mut w: Vec<Vec<f64>> = w0
            .iter()
            .map(|r| r.iter().map(|&v| f64::from(v)).collect())
            .collect();
        w.iter_mut().for_each(|r| r.push(0.0)); // the bias as column d
        let mut buf = vec![vec![0f64; d + 1]; c];
        for (t, rows) in batches.iter().enumerate() {
            let mut grad = vec![vec![0f64; d + 1]; c];
            for &r in rows {
                let xi: Vec<f64> = x[r].iter().map(|&v| f64::from(v)).chain([1.0]).collect();
                let z: Vec<f64> = w
                    .iter()
                    .map(|wk| wk.iter().zip(&xi).map(|(a, b)| a * b).sum())
                    .collect();
                let m = z.iter().copied().fold(f64::MIN, f64::max);
                let s: f64 = z.iter().map(|v| (v - m).exp()).sum();
                for k in 0..c {
                    let g = ((z[k] - m).exp() / s - f64::from(u8::from(k == labels[r])))
                        / rows.len() as f64;
                    grad[k]
                        .iter_mut()
                        .zip(&xi)
                        .for_each(|(gk, xj)| *gk += g * xj);
                }
            }
            let eta = lr * 0.5 * (1.0 + (std::f64::consts::PI * t as f64 / total as f64).cos());
            for k in 0..c {
                for j in 0..=d {
                    // torch: the first step's buffer is the gradient itself (= 0.9 · 0 + g)
                    buf[k][j] = 0.9 * buf[k][j] + grad[k][j];
                    w[k][j] -= eta * buf[k][j];
                }
            }
        }
        w
    }

    #[test]
    fn stacked_heads_match_plain_sgd_with_momentum_and_cosine_annealing() {
        let f = clusters(12, 3, 3, 5);
        let specs = official_grid(&[1, 3], &[0.5, 4.0]);
        let (batch, total) = (6, 5);
        let batches: Vec<Vec<usize>> = (0..4)
            .map(|t| (0..batch).map(|i| (i * 5 + t * 7) % 12).collect())
            .collect();
        let mut heads = LinearHeads::new(specs.clone(), 3, 3, batch, total, 9).unwrap();
        let init = heads.weights().unwrap();
        for rows in &batches {
            heads.step(&f.select(rows).unwrap()).unwrap();
        }
        assert_eq!(heads.iteration(), 4);
        let after = heads.weights().unwrap();
        for (h, spec) in specs.iter().enumerate() {
            let x: Vec<Vec<f32>> = f.linear_input(spec.config).unwrap().to_vec2().unwrap();
            let w0: Vec<Vec<f32>> = init[h].0.to_vec2().unwrap();
            let expected = reference_sgd(
                &x,
                f.labels(),
                &w0,
                scaled_lr(spec.lr, batch),
                &batches,
                total,
            );
            let got_w: Vec<Vec<f32>> = after[h].0.to_vec2().unwrap();
            let got_b: Vec<f32> = after[h].1.to_vec1().unwrap();
            let mut moved = 0f64;
            for (k, row) in expected.iter().enumerate() {
                let got = got_w[k].iter().chain([&got_b[k]]);
                for (j, (&g, &e)) in got.zip(row).enumerate() {
                    assert!(
                        (f64::from(g) - e).abs() < 1e-5,
                        "head {h} [{k}][{j}]: {g} vs {e}"
                    );
                }
                moved += w0[k]
                    .iter()
                    .zip(row)
                    .map(|(&a, b)| (f64::from(a) - b).abs())
                    .sum::<f64>();
            }
            assert!(moved > 1e-3, "head {h} did not move: a vacuous comparison");
        }
        // initial weights: N(0, 0.01), bias 0
        let w: Vec<f32> = init
            .iter()
            .flat_map(|(w, _)| w.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect();
        let std = (w.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
        assert!((0.006..0.014).contains(&std), "{std}");
        assert!(init
            .iter()
            .all(|(_, b)| b.to_vec1::<f32>().unwrap().iter().all(|&v| v == 0.0)));
        // the schedule: at step 4 of 5 the rate is lr (1 + cos(4π/5)) / 2, then 0, then no more steps
        let expected_lr = scaled_lr(4.0, batch) * 0.5 * (1.0 + (std::f64::consts::PI * 0.8).cos());
        assert!((heads.learning_rate(1) - expected_lr).abs() < 1e-15);
        heads.step(&f.select(&batches[0]).unwrap()).unwrap();
        assert_eq!(heads.learning_rate(1), 0.0);
        assert_eq!(name_of(heads.step(&f)), "iteration");
    }

    #[test]
    fn a_separable_problem_is_learned_and_the_best_head_selected_on_the_holdout() {
        let train = clusters(300, 5, 8, 1);
        let val = clusters(100, 5, 8, 2);
        let cfg = LinearProbeConfig {
            n_last_blocks: Some(vec![1, 3]),
            epochs: 8,
            epoch_length: Some(20),
            batch_size: 32,
            ..Default::default()
        };
        let r = linear_probe(&train, &val, 5, &cfg).unwrap();
        assert_eq!(r.heads.len(), 2 * 2 * 13);
        assert_eq!((r.holdout_rows, r.train_rows, r.batch_size), (30, 270, 32));
        assert_eq!(r.iterations, 8 * 20);
        let best = r.best();
        assert!(best.val.top1 >= 98.0, "{best:?}");
        assert_eq!(best.val.top5, 100.0);
        // the selection: no head beats the chosen one on the holdout
        let sel = best.holdout.unwrap();
        assert!(r.heads.iter().all(|h| h.holdout.unwrap().top1 <= sel.top1));
        // the smallest rates barely move from the initialisation: near chance on the loss
        let slowest = &r.heads[0];
        assert!(
            slowest.val.loss > 1.5 && slowest.val.loss < 1.7,
            "{slowest:?}"
        );
        assert!(best.val.loss < 0.5 * slowest.val.loss);
        // the saved weights are the chosen head's
        assert_eq!(r.head.config, best.spec.config);
        assert_eq!(r.head.lr, best.spec.lr);
        // one summary line per feature configuration
        let per = r.best_per_config();
        assert_eq!(per.len(), 4);
        assert!(per.iter().any(|h| h.name == best.name));
        // deterministic for a seed, another seed gives another run
        let again = linear_probe(&train, &val, 5, &cfg).unwrap();
        assert_eq!(again.heads, r.heads);
        let other = linear_probe(
            &train,
            &val,
            5,
            &LinearProbeConfig {
                seed: 1,
                ..cfg.clone()
            },
        )
        .unwrap();
        assert_ne!(other.heads, r.heads);
        let json = r.metrics_json();
        assert_eq!(json["best"]["name"], best.name.as_str());
        assert_eq!(json["heads"].as_object().unwrap().len(), 52);
        assert_eq!(json["heads"][&best.name]["holdout_top1"], sel.top1);
    }

    #[test]
    fn the_default_epoch_is_the_official_length_or_one_pass() {
        let f = clusters(20, 2, 2, 0);
        let cfg = LinearProbeConfig {
            n_last_blocks: Some(vec![1]),
            learning_rates: vec![0.1],
            epochs: 1,
            batch_size: 4,
            ..Default::default()
        };
        let r = linear_probe(&f, &f, 2, &cfg).unwrap();
        assert_eq!((r.train_rows, r.iterations), (18, OFFICIAL_EPOCH_LENGTH));
        // a split of more than 1250 batches: one pass per epoch
        let big = clusters(2 * 1300 + 2, 2, 2, 0);
        let cfg = LinearProbeConfig {
            batch_size: 2,
            holdout: 0.0,
            ..cfg
        };
        let r = linear_probe(&big, &f, 2, &cfg).unwrap();
        assert_eq!(r.iterations, 1301);
    }

    #[test]
    fn holdout_zero_selects_on_validation_and_missing_blocks_are_skipped_or_refused() {
        let train = clusters(40, 2, 2, 3);
        let val = clusters(20, 2, 2, 4);
        let cfg = LinearProbeConfig {
            epochs: 2,
            epoch_length: Some(5),
            batch_size: 8,
            holdout: 0.0,
            ..Default::default()
        };
        let r = linear_probe(&train, &val, 2, &cfg).unwrap();
        // 3 cached blocks: the official n = 4 is skipped with a note, n = 1 stays
        assert_eq!(r.heads.len(), 26);
        assert!(
            r.notes
                .iter()
                .any(|n| n.contains("n_last_blocks = 4 skipped")),
            "{:?}",
            r.notes
        );
        assert!(r.notes.iter().any(|n| n.contains("holdout = 0")));
        assert_eq!((r.holdout_rows, r.train_rows), (0, 40));
        assert!(r.heads.iter().all(|h| h.holdout.is_none()));
        assert!(r.heads.iter().all(|h| h.val.top1 <= r.best().val.top1));
        assert!(r.metrics_json()["heads"][&r.best().name]["holdout_top1"].is_null());
        // asked for explicitly, n = 4 is an error
        let four = LinearProbeConfig {
            n_last_blocks: Some(vec![1, 4]),
            ..cfg
        };
        assert_eq!(
            name_of(linear_probe(&train, &val, 2, &four)),
            "n_last_blocks"
        );
    }

    #[test]
    fn bad_arguments_are_typed_errors() {
        let f = clusters(10, 2, 2, 0);
        let ok = LinearProbeConfig {
            epochs: 1,
            epoch_length: Some(2),
            batch_size: 4,
            ..Default::default()
        };
        let run = |cfg: LinearProbeConfig| linear_probe(&f, &f, 2, &cfg);
        assert_eq!(
            name_of(run(LinearProbeConfig {
                learning_rates: vec![],
                ..ok.clone()
            })),
            "learning_rates"
        );
        assert_eq!(
            name_of(run(LinearProbeConfig {
                learning_rates: vec![0.1, 0.1],
                ..ok.clone()
            })),
            "learning_rates"
        );
        assert_eq!(
            name_of(run(LinearProbeConfig {
                learning_rates: vec![-1.0],
                ..ok.clone()
            })),
            "learning_rates"
        );
        assert_eq!(
            name_of(run(LinearProbeConfig {
                epochs: 0,
                ..ok.clone()
            })),
            "epochs"
        );
        assert_eq!(
            name_of(run(LinearProbeConfig {
                epoch_length: Some(0),
                ..ok.clone()
            })),
            "epoch_length"
        );
        assert_eq!(
            name_of(run(LinearProbeConfig {
                batch_size: 0,
                ..ok.clone()
            })),
            "batch_size"
        );
        assert_eq!(
            name_of(run(LinearProbeConfig {
                holdout: 1.0,
                ..ok.clone()
            })),
            "holdout"
        );
        assert_eq!(
            name_of(run(LinearProbeConfig {
                holdout: f64::NAN,
                ..ok.clone()
            })),
            "holdout"
        );
        assert_eq!(
            name_of(run(LinearProbeConfig {
                n_last_blocks: Some(vec![]),
                ..ok.clone()
            })),
            "n_last_blocks"
        );
        assert_eq!(
            name_of(run(LinearProbeConfig {
                n_last_blocks: Some(vec![1, 1]),
                ..ok.clone()
            })),
            "n_last_blocks"
        );
        assert_eq!(
            name_of(run(LinearProbeConfig {
                n_last_blocks: Some(vec![0]),
                ..ok.clone()
            })),
            "n_last_blocks"
        );
        assert_eq!(name_of(linear_probe(&f, &f, 1, &ok)), "train"); // label 1 >= 1 class
        assert_eq!(name_of(linear_probe(&f, &f, 0, &ok)), "num_classes");
        let one = f.select(&[0]).unwrap();
        let err = linear_probe(&one, &f, 2, &ok).unwrap_err();
        assert!(err.to_string().contains("too few to hold out"), "{err}");
        assert!(linear_probe(
            &one,
            &f,
            2,
            &LinearProbeConfig {
                holdout: 0.0,
                ..ok.clone()
            }
        )
        .is_ok());
        let wide = clusters(10, 2, 3, 0);
        assert_eq!(name_of(linear_probe(&f, &wide, 2, &ok)), "val");
        let empty = f.select(&[]).unwrap();
        assert_eq!(name_of(linear_probe(&empty, &f, 2, &ok)), "train");
        assert_eq!(name_of(f.select(&[10])), "rows");
        // the trainer's own checks
        let spec = official_grid(&[1], &[0.1]);
        assert_eq!(name_of(LinearHeads::new(vec![], 2, 2, 4, 1, 0)), "specs");
        assert_eq!(
            name_of(LinearHeads::new(spec.clone(), 2, 2, 4, 0, 0)),
            "total_iterations"
        );
        assert_eq!(
            name_of(LinearHeads::new(spec.clone(), 0, 2, 4, 1, 0)),
            "embed_dim"
        );
        assert_eq!(
            name_of(LinearHeads::new(spec.clone(), 2, 0, 4, 1, 0)),
            "num_classes"
        );
        let mut heads = LinearHeads::new(spec, 2, 1, 4, 1, 0).unwrap();
        assert_eq!(name_of(heads.step(&f)), "batch"); // label 1 with one class
        assert_eq!(name_of(heads.evaluate(&wide)), "features");
        assert_eq!(name_of(heads.head(5)), "head");
    }

    #[test]
    fn a_diverged_head_counts_as_wrong() {
        let f = clusters(4, 2, 2, 0);
        let specs = official_grid(&[1], &[0.1]);
        let d = 2;
        let w = Tensor::full(f32::NAN, (2, d), &Device::Cpu).unwrap();
        let b = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
        let w2 = Tensor::zeros((2, 2 * d), DType::F32, &Device::Cpu).unwrap();
        let heads =
            LinearHeads::with_weights(specs, d, vec![(w, b.clone()), (w2, b)], 4, 1).unwrap();
        let s = heads.evaluate(&f).unwrap();
        assert_eq!((s[0].top1, s[0].top5), (0.0, 0.0));
        assert!(!s[0].loss.is_finite());
        // all-zero logits: every class ties, the lower class wins; half the rows are class 0
        assert_eq!((s[1].top1, s[1].top5), (50.0, 100.0));
        assert!((s[1].loss - 2f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn a_saved_head_loads_as_a_linear_classifier_with_the_same_logits() {
        let model = tiny_model(4, 1);
        let x = images(2);
        let f = LinearFeatures::from_images(&model, &x, 4, vec![0, 1]).unwrap();
        let specs = official_grid(&[1, 4], &[0.1]);
        let heads = LinearHeads::new(specs.clone(), 16, 3, 2, 1, 4).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        for (h, spec) in specs.iter().enumerate() {
            let head = heads.head(h).unwrap();
            assert_eq!(head.embed_dim(), 16);
            let path = dir.path().join(format!("{h}.safetensors"));
            head.save(&path, &names).unwrap();
            let back = load_head(&path).unwrap();
            assert_eq!((back.config, &back.class_names), (spec.config, &names));
            let ours = f
                .linear_input(spec.config)
                .and_then(|x| Ok(x.matmul(&head.weight.t()?)?.broadcast_add(&head.bias)?))
                .unwrap();
            let theirs = back.classifier.forward(&model, &x).unwrap();
            assert!(
                max_diff(&ours, &theirs) < 1e-5,
                "{}",
                spec.config.describe()
            );
            // the official layout: exactly `weight` and `bias`
            let st = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
            let mut keys: Vec<_> = st.keys().cloned().collect();
            keys.sort();
            assert_eq!(keys, ["bias", "weight"]);
        }
        // no temporary files left behind
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), specs.len());
    }

    #[test]
    fn malformed_head_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        std::fs::write(&path, b"not safetensors").unwrap();
        assert!(matches!(load_head(&path), Err(Error::Checkpoint { .. })));
        // an official head file without our metadata
        let t = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
        candle_core::safetensors::save(&HashMap::from([("weight", t), ("bias", b)]), &path)
            .unwrap();
        let err = load_head(&path).unwrap_err();
        assert!(
            err.to_string()
                .contains("metadata key `n_last_blocks` is missing"),
            "{err}"
        );
        assert!(matches!(
            load_head(dir.path().join("missing")),
            Err(Error::Io { .. })
        ));
    }

    #[test]
    fn head_names_follow_the_official_pattern() {
        let specs = official_grid(&OFFICIAL_N_LAST_BLOCKS, &OFFICIAL_LEARNING_RATES);
        // batch 1024 (128 per GPU x 8): the official names, 5 decimals, all distinct
        let names = head_names(&specs, 1024);
        assert_eq!(names[0], "classifier_1_blocks_avgpool_False_lr_0_00004");
        assert_eq!(names[51], "classifier_4_blocks_avgpool_True_lr_0_40000");
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 52);
        let small = head_names(&specs, 128);
        let mut sorted = small.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 52);
    }
}
