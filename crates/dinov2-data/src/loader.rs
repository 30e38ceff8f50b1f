//! The parallel loader: decoding and augmentation on a rayon thread pool, bounded prefetch, deterministic batches.
//!
//! Every sample gets its own random stream seeded by `(seed, rank, stream position)` and every batch's masks a stream
//! seeded by `(seed, rank, step)`, and results are consumed in request order, so the batches are identical whatever
//! the number of threads. Bad samples (corrupt, truncated, empty, non-image files, even a panicking decoder) are
//! skipped, counted and replaced by the next indices of the sampler (or stop the loader with an error under
//! [`BadDataPolicy::FailFast`]); the loader never panics and never hangs: dropping it stops its producer thread.

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::augment::{DataAugmentationDino, MultiCrop};
use crate::collate::{collate, Batch, MaskCollate};
use crate::dataset::{Dataset, Sample};
use crate::decode::DecodeOptions;
use crate::error::{Error, Result};
use crate::preprocess::{preprocess, ImageTensor, Preprocess};
use crate::sampler::{mix_seed, IndexStream};

/// What the loader does per sample and per batch.
///
/// `process` runs on the loader's worker threads with a random stream of its own per sample; `collate` runs once per
/// batch with a random stream seeded by the step. Both streams are [`ChaCha8Rng`]s (re-exported as
/// [`crate::rand_chacha::ChaCha8Rng`]).
///
/// ```
/// use std::sync::Arc;
/// use dinov2_data::rand_chacha::ChaCha8Rng;
/// use dinov2_data::{Dataset, DecodeOptions, EpochSampler, Loader, LoaderConfig, Pipeline, Result, Sample};
/// # struct Sizes;
/// # impl Dataset for Sizes {
/// #     fn len(&self) -> usize { 5 }
/// #     fn get(&self, i: usize, _: &DecodeOptions) -> Result<Sample> {
/// #         Ok(Sample { image: image::RgbImage::new(10 + i as u32, 10), label: None })
/// #     }
/// #     fn describe(&self, i: usize) -> String { format!("#{i}") }
/// #     fn label(&self, _: usize) -> Option<i64> { None }
/// # }
/// /// Image widths, summed per batch.
/// struct SumWidths;
/// impl Pipeline for SumWidths {
///     type Item = u32;
///     type Output = u32;
///     fn process(&self, sample: Sample, _rng: &mut ChaCha8Rng) -> Result<u32> {
///         Ok(sample.image.width())
///     }
///     fn collate(&self, items: Vec<u32>, _: Vec<usize>, _: Vec<Option<i64>>, _: &mut ChaCha8Rng) -> u32 {
///         items.iter().sum()
///     }
/// }
/// let cfg = LoaderConfig { batch_size: 2, num_threads: 2, ..Default::default() };
/// let loader = Loader::new(Arc::new(Sizes), EpochSampler::new(5, 0, 1, None)?, Arc::new(SumWidths), cfg)?;
/// let sums: Vec<u32> = loader.map(|b| b.map(|b| b.batch)).collect::<Result<_>>()?;
/// assert_eq!(sums, vec![10 + 11, 12 + 13, 14]);
/// # Ok::<(), dinov2_data::Error>(())
/// ```
pub trait Pipeline: Send + Sync + 'static {
    /// Per-sample result.
    type Item: Send;
    /// Batch type.
    type Output: Send + 'static;
    /// Transforms one decoded sample (may fail: the sample is then treated as bad).
    fn process(&self, sample: Sample, rng: &mut ChaCha8Rng) -> Result<Self::Item>;
    /// Builds a batch.
    fn collate(
        &self,
        items: Vec<Self::Item>,
        indices: Vec<usize>,
        labels: Vec<Option<i64>>,
        rng: &mut ChaCha8Rng,
    ) -> Self::Output;
}

/// DINOv2 training: multi-crop augmentation + masks (example: [`Loader`]).
#[derive(Clone, Debug)]
pub struct DinoPipeline {
    /// The augmentation.
    pub augmentation: DataAugmentationDino,
    /// Mask sampling.
    pub masking: MaskCollate,
}

impl DinoPipeline {
    /// The augmentation with the official masking for its global crop size and the model's `patch_size`
    /// ([`MaskCollate::official`]).
    ///
    /// ```
    /// use dinov2_data::{DataAugmentationDino, DinoPipeline, MaskCollate};
    /// let p = DinoPipeline::new(DataAugmentationDino::official(), 14);
    /// assert_eq!(p.masking, MaskCollate::official(224, 14));
    /// ```
    pub fn new(augmentation: DataAugmentationDino, patch_size: usize) -> Self {
        let masking =
            MaskCollate::official(augmentation.crops.global_crops_size as usize, patch_size);
        Self {
            augmentation,
            masking,
        }
    }
}

impl Pipeline for DinoPipeline {
    type Item = MultiCrop;
    type Output = Batch;
    fn process(&self, sample: Sample, rng: &mut ChaCha8Rng) -> Result<MultiCrop> {
        Ok(self.augmentation.apply(&sample.image, rng))
    }
    fn collate(
        &self,
        items: Vec<MultiCrop>,
        indices: Vec<usize>,
        labels: Vec<Option<i64>>,
        rng: &mut ChaCha8Rng,
    ) -> Batch {
        collate(&items, indices, labels, &self.masking, rng)
    }
}

/// Evaluation / feature extraction: a deterministic [`Preprocess`] per image (example: [`Loader`]).
#[derive(Clone, Debug)]
pub struct EvalPipeline {
    /// The preprocessing.
    pub preprocess: Preprocess,
}

/// A batch of preprocessed images (the batches of an [`EvalPipeline`]).
#[derive(Clone, Debug, PartialEq)]
pub struct EvalBatch {
    /// One tensor per image (sizes may differ unless the preprocessing fixes them).
    pub images: Vec<ImageTensor>,
    /// Dataset indices.
    pub indices: Vec<usize>,
    /// Labels.
    pub labels: Vec<Option<i64>>,
}

impl Pipeline for EvalPipeline {
    type Item = ImageTensor;
    type Output = EvalBatch;
    fn process(&self, sample: Sample, _rng: &mut ChaCha8Rng) -> Result<ImageTensor> {
        preprocess(&sample.image, &self.preprocess)
    }
    fn collate(
        &self,
        items: Vec<ImageTensor>,
        indices: Vec<usize>,
        labels: Vec<Option<i64>>,
        _: &mut ChaCha8Rng,
    ) -> EvalBatch {
        EvalBatch {
            images: items,
            indices,
            labels,
        }
    }
}

/// What to do with a sample that cannot be loaded (see [`LoaderConfig::bad_data`] and the example of [`Loader`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum BadDataPolicy {
    /// Skip it (one warning per file, counted in [`BadDataReport`]) and take the next index of the sampler.
    #[default]
    Skip,
    /// Yield the error and stop.
    FailFast,
}

/// Loader settings (example: [`Loader`]).
///
/// The default uses every core ([`std::thread::available_parallelism`]); the batches do not depend on
/// `num_threads` or `prefetch`.
#[derive(Clone, Debug)]
pub struct LoaderConfig {
    /// Samples per batch.
    pub batch_size: usize,
    /// Worker threads (decoding + augmentation).
    pub num_threads: usize,
    /// Batches prepared ahead (bounded queue).
    pub prefetch: usize,
    /// Base seed of the per-sample and per-batch random streams.
    pub seed: u64,
    /// Rank (enters the seeds so that ranks get different augmentations).
    pub rank: usize,
    /// First step number (for resuming: the batch RNG is seeded by the step).
    pub start_step: u64,
    /// Bad data handling.
    pub bad_data: BadDataPolicy,
    /// Stop with an error after this many bad samples in a row (a dataset of only bad files must not spin).
    pub max_consecutive_bad: usize,
    /// Decoding options.
    pub decode: DecodeOptions,
    /// Drop a last incomplete batch (finite samplers).
    pub drop_last: bool,
    /// Print one warning per bad file and a summary on stderr.
    pub warn: bool,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            batch_size: 64,
            num_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            prefetch: 2,
            seed: 0,
            rank: 0,
            start_step: 0,
            bad_data: BadDataPolicy::Skip,
            max_consecutive_bad: 1000,
            decode: DecodeOptions::default(),
            drop_last: false,
            warn: true,
        }
    }
}

/// One skipped sample (see [`BadDataReport`]).
#[derive(Clone, Debug, PartialEq)]
pub struct BadSample {
    /// Dataset index.
    pub index: usize,
    /// Its description (path).
    pub name: String,
    /// The error.
    pub reason: String,
}

/// Summary of the skipped samples ([`Loader::bad_data`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BadDataReport {
    /// Number of skips (a file drawn twice counts twice).
    pub skipped: usize,
    /// Distinct bad samples, in order of discovery.
    pub samples: Vec<BadSample>,
}

impl std::fmt::Display for BadDataReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} bad samples skipped ({} distinct files)",
            self.skipped,
            self.samples.len()
        )
    }
}

/// A batch with the loader position after it (to resume exactly: seek the sampler to `next_position` and start
/// at `step + 1`; example: [`Loader`]).
#[derive(Clone, Debug)]
pub struct Loaded<O> {
    /// The batch.
    pub batch: O,
    /// Its step number.
    pub step: u64,
    /// Sampler position right after this batch (skipped bad samples included).
    pub next_position: u64,
}

/// The loader; iterate it to get batches. Dropping it stops the worker thread.
///
/// ```
/// use std::sync::Arc;
/// use dinov2_data::{
///     BadDataPolicy, CropsConfig, DataAugmentationDino, Dataset, DinoPipeline, EpochSampler, EvalPipeline,
///     FileDataset, Loader, LoaderConfig, Preprocess, ShardedInfiniteSampler,
/// };
/// let root = tempfile::tempdir()?;
/// for i in 0..5u8 {
///     image::RgbImage::from_pixel(40 + u32::from(i), 30, image::Rgb([i * 40, 90, 200]))
///         .save(root.path().join(format!("{i}.png")))?;
/// }
/// std::fs::write(root.path().join("broken.jpg"), b"not a jpeg")?;
/// let ds = Arc::new(FileDataset::unlabeled_folder(root.path())?);
///
/// // training: multi-crop + iBOT masks (tiny crops to keep the example fast), an infinite sharded sampler
/// let crops = CropsConfig { global_crops_size: 28, local_crops_size: 14, local_crops_number: 2, ..Default::default() };
/// let pipeline = DinoPipeline::new(DataAugmentationDino::new(crops, Default::default())?, 14);
/// let sampler = ShardedInfiniteSampler::new(ds.len(), 0, 0, 1, true)?;
/// let cfg = LoaderConfig { batch_size: 4, num_threads: 2, seed: 7, warn: false, ..Default::default() };
/// let mut loader = Loader::new(ds.clone(), sampler, Arc::new(pipeline), cfg)?;
/// let first = loader.next().unwrap()?;
/// assert_eq!(first.step, 0);
/// assert_eq!(first.batch.global_shape, [8, 3, 28, 28]); // 4 images x 2 global crops, crop-major
/// assert_eq!(first.batch.local_shape, [8, 3, 14, 14]);
/// let second = loader.next().unwrap()?;
/// assert!(second.next_position >= 8);
/// assert_eq!(loader.bad_data().samples.len(), 1, "the broken file is skipped, once reported");
///
/// // evaluation: one pass, official eval transform (small sizes), the last partial batch kept
/// let sampler = EpochSampler::new(ds.len(), 0, 1, None)?;
/// let eval = EvalPipeline { preprocess: Preprocess::Eval { resize: 32, crop: 28 } };
/// let cfg = LoaderConfig { batch_size: 4, num_threads: 2, bad_data: BadDataPolicy::Skip, warn: false, ..Default::default() };
/// let sizes: Vec<usize> = Loader::new(ds, sampler, Arc::new(eval), cfg)?
///     .map(|b| b.map(|b| b.batch.images.len()))
///     .collect::<dinov2_data::Result<_>>()?;
/// assert_eq!(sizes, vec![4, 1]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Loader<O: Send + 'static> {
    rx: Option<Receiver<Result<Loaded<O>>>>,
    handle: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<BadDataReport>>,
}

impl<O: Send + 'static> Loader<O> {
    /// Starts the loader (example: [`Loader`]).
    ///
    /// Errors: [`Error::InvalidConfig`] on a zero `batch_size` or `num_threads`, [`Error::EmptyDataset`],
    /// [`Error::ThreadPool`] / [`Error::SpawnThread`] when the threads cannot be started.
    pub fn new<P: Pipeline<Output = O>>(
        dataset: Arc<dyn Dataset>,
        sampler: impl IndexStream + 'static,
        pipeline: Arc<P>,
        cfg: LoaderConfig,
    ) -> Result<Self> {
        for (field, v) in [
            ("batch_size", cfg.batch_size),
            ("num_threads", cfg.num_threads),
        ] {
            if v == 0 {
                return Err(Error::config(field, "must be positive"));
            }
        }
        if dataset.is_empty() {
            return Err(Error::EmptyDataset);
        }
        let sampler: Box<dyn IndexStream> = Box::new(sampler);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.num_threads)
            .thread_name(|i| format!("dinov2-data-{i}"))
            .build()
            .map_err(|source| Error::ThreadPool { source })?;
        let (tx, rx) = sync_channel(cfg.prefetch.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(BadDataReport::default()));
        let (stop2, report2) = (stop.clone(), report.clone());
        let handle = std::thread::Builder::new()
            .name("dinov2-data-producer".into())
            .spawn(move || produce(dataset, sampler, pipeline, cfg, pool, tx, stop2, report2))
            .map_err(|source| Error::SpawnThread { source })?;
        Ok(Self {
            rx: Some(rx),
            handle: Some(handle),
            stop,
            report,
        })
    }

    /// The bad samples met so far (example: [`Loader`]).
    pub fn bad_data(&self) -> BadDataReport {
        self.report.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl<O: Send + 'static> Iterator for Loader<O> {
    type Item = Result<Loaded<O>>;
    fn next(&mut self) -> Option<Self::Item> {
        self.rx.as_ref()?.recv().ok()
    }
}

impl<O: Send + 'static> Drop for Loader<O> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        drop(self.rx.take()); // unblocks a producer waiting on a full queue
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into())
}

type Processed<I> = (u64, usize, Result<(I, Option<i64>)>);

#[allow(clippy::too_many_arguments)]
fn produce<P: Pipeline>(
    dataset: Arc<dyn Dataset>,
    mut sampler: Box<dyn IndexStream>,
    pipeline: Arc<P>,
    cfg: LoaderConfig,
    pool: rayon::ThreadPool,
    tx: SyncSender<Result<Loaded<P::Output>>>,
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<BadDataReport>>,
) {
    let mut step = cfg.start_step;
    let mut warned: HashSet<usize> = HashSet::new();
    let mut consecutive_bad = 0usize;
    let mut position = 0u64;
    let finish = |report: &Arc<Mutex<BadDataReport>>| {
        if cfg.warn {
            if let Ok(r) = report.lock() {
                if r.skipped > 0 {
                    eprintln!("dinov2-data: {r}");
                }
            }
        }
    };
    loop {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let mut items = Vec::with_capacity(cfg.batch_size);
        let mut indices = Vec::with_capacity(cfg.batch_size);
        let mut labels = Vec::with_capacity(cfg.batch_size);
        let mut exhausted = false;
        while items.len() < cfg.batch_size && !exhausted {
            let mut req = Vec::new();
            for _ in items.len()..cfg.batch_size {
                match sampler.next_index() {
                    Some(x) => req.push(x),
                    None => {
                        exhausted = true;
                        break;
                    }
                }
            }
            if req.is_empty() {
                break;
            }
            let results: Vec<Processed<P::Item>> = pool.install(|| {
                req.par_iter()
                    .map(|&(pos, idx)| {
                        let r = catch_unwind(AssertUnwindSafe(|| {
                            let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(&[
                                cfg.seed,
                                cfg.rank as u64,
                                1,
                                pos,
                            ]));
                            let s = dataset.get(idx, &cfg.decode)?;
                            let label = s.label;
                            pipeline.process(s, &mut rng).map(|it| (it, label))
                        }))
                        .unwrap_or_else(|p| {
                            Err(Error::WorkerPanic {
                                index: idx,
                                message: panic_message(&*p),
                            })
                        });
                        (pos, idx, r)
                    })
                    .collect()
            });
            for (pos, idx, r) in results {
                position = pos + 1;
                match r {
                    Ok((it, label)) => {
                        items.push(it);
                        indices.push(idx);
                        labels.push(label);
                        consecutive_bad = 0;
                    }
                    Err(e) => {
                        if cfg.bad_data == BadDataPolicy::FailFast {
                            let _ = tx.send(Err(e));
                            return;
                        }
                        consecutive_bad += 1;
                        let name = dataset.describe(idx);
                        if let Ok(mut rep) = report.lock() {
                            rep.skipped += 1;
                            if warned.insert(idx) {
                                if cfg.warn {
                                    eprintln!("dinov2-data: warning: skipping {name}: {e}");
                                }
                                rep.samples.push(BadSample {
                                    index: idx,
                                    name,
                                    reason: e.to_string(),
                                });
                            }
                        }
                        if consecutive_bad >= cfg.max_consecutive_bad.max(1) {
                            let _ = tx.send(Err(Error::TooManyBadSamples {
                                count: consecutive_bad,
                                index: idx,
                                name: dataset.describe(idx),
                            }));
                            finish(&report);
                            return;
                        }
                    }
                }
            }
        }
        if items.is_empty() || (items.len() < cfg.batch_size && cfg.drop_last) {
            break;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(&[cfg.seed, cfg.rank as u64, 2, step]));
        let out = catch_unwind(AssertUnwindSafe(|| {
            pipeline.collate(items, indices, labels, &mut rng)
        }));
        let msg = match out {
            Ok(batch) => Ok(Loaded {
                batch,
                step,
                next_position: position,
            }),
            Err(p) => Err(Error::CollatePanic {
                step,
                message: panic_message(&*p),
            }),
        };
        let failed = msg.is_err();
        if tx.send(msg).is_err() || failed {
            break;
        }
        step += 1;
        if exhausted {
            break;
        }
    }
    finish(&report);
}
