//! Evaluation of frozen backbones, as the official `eval/` scripts: [`knn`] (weighted k-NN on L2-normalised class
//! tokens) and [`linear`] (the linear probe: a grid of linear heads on cached class tokens and patch means).
//! [`write_metrics`] keeps the results of several evaluations in one JSON file.
pub mod knn;
pub mod linear;

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use dinov2_data::{preprocess, Dataset, DecodeOptions, FileDataset, Preprocess};
use dinov2_model::DinoVisionTransformer;
use rayon::prelude::*;

use crate::error::{Error, Result};

/// A labelled training and validation folder (torchvision `ImageFolder`: one subfolder per class), the
/// validation labels renumbered onto the training classes by name, so a validation set may lack classes (or list
/// them in another order) and still be scored correctly.
///
/// Errors: [`Error::Data`] when a folder cannot be read or holds no class folder or image,
/// [`Error::InvalidArgument`] when a validation class has no training folder (nothing could predict it).
///
/// ```
/// use dinov2_data::Dataset;
/// use dinov2_train::eval::labelled_folders;
/// let root = tempfile::tempdir().unwrap();
/// for (split, classes) in [("train", ["ant", "bee", "cat"].as_slice()), ("val", ["bee", "cat"].as_slice())] {
///     for class in classes {
///         let dir = root.path().join(split).join(class);
///         std::fs::create_dir_all(&dir).unwrap();
///         image::RgbImage::new(4, 4).save(dir.join("0.png")).unwrap();
///     }
/// }
/// let (train, val) = labelled_folders(&root.path().join("train"), &root.path().join("val"))?;
/// assert_eq!((train.label(1), val.label(0)), (Some(1), Some(1))); // "bee" in both
/// assert!(labelled_folders(&root.path().join("val"), &root.path().join("train")).is_err()); // no "ant" folder
/// # Ok::<(), dinov2_train::Error>(())
/// ```
pub fn labelled_folders(train: &Path, val: &Path) -> Result<(FileDataset, FileDataset)> {
    let train_ds = FileDataset::image_folder(train)?;
    let mut val_ds = FileDataset::image_folder(val)?;
    let mut map = Vec::with_capacity(val_ds.classes.len());
    for name in &val_ds.classes {
        match train_ds.classes.iter().position(|c| c == name) {
            Some(i) => map.push(i as i64),
            None => {
                return Err(Error::InvalidArgument {
                    name: "val",
                    reason: format!(
                        "validation class `{name}` ({}) has no folder in the training set {} (its classes: {}); \
                         the classifier could never predict it",
                        val.join(name).display(),
                        train.display(),
                        train_ds.classes.join(", ")
                    ),
                })
            }
        }
    }
    for (_, label) in &mut val_ds.entries {
        *label = label.and_then(|l| usize::try_from(l).ok().and_then(|l| map.get(l).copied()));
    }
    val_ds.classes = train_ds.classes.clone();
    Ok((train_ds, val_ds))
}

/// Opens a labelled training and validation set from dataset strings ([`dinov2_data::open_dataset`]: an image
/// folder, `ImageFolder:root=DIR`, `ImageNet:split=...:root=...`, ...). When both are plain folders their classes
/// are matched by name ([`labelled_folders`]); otherwise the datasets' own labels are used as they are.
///
/// Errors: those of [`labelled_folders`] and [`dinov2_data::open_dataset`].
pub fn eval_datasets(train: &str, val: &str) -> Result<(Arc<dyn Dataset>, Arc<dyn Dataset>)> {
    let (t, v) = (Path::new(train.trim()), Path::new(val.trim()));
    if t.is_dir() && v.is_dir() {
        let (t, v) = labelled_folders(t, v)?;
        return Ok((Arc::new(t), Arc::new(v)));
    }
    Ok((
        dinov2_data::open_dataset(train)?,
        dinov2_data::open_dataset(val)?,
    ))
}

/// Sets `key` of the JSON object in `path` to `value` and writes the file atomically, keeping the other keys:
/// `dinov2 eval knn` and `dinov2 eval linear` can share one `metrics.json` (`{"knn": .., "linear": ..}`). A missing
/// file starts a new object.
///
/// Errors: [`Error::Io`] when the file cannot be read or written, [`Error::InvalidArgument`] when it exists but
/// does not hold a JSON object (it is left untouched).
///
/// ```
/// use dinov2_train::eval::write_metrics;
/// # fn main() -> dinov2_train::Result<()> {
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("metrics.json");
/// write_metrics(&path, "knn", serde_json::json!({"20": {"top1": 80.0, "top5": 95.0}}))?;
/// write_metrics(&path, "linear", serde_json::json!({"best": {"top1": 85.0}}))?;
/// let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
/// assert_eq!(v["knn"]["20"]["top1"], 80.0);
/// assert_eq!(v["linear"]["best"]["top1"], 85.0);
/// std::fs::write(&path, "not json").unwrap();
/// assert!(write_metrics(&path, "knn", serde_json::json!({})).is_err());
/// assert_eq!(std::fs::read_to_string(&path).unwrap(), "not json");
/// # Ok(()) }
/// ```
pub fn write_metrics(path: &Path, key: &str, value: serde_json::Value) -> Result<()> {
    let mut obj = match std::fs::read(path) {
        Ok(bytes) => match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Ok(serde_json::Value::Object(obj)) => obj,
            _ => {
                return Err(Error::InvalidArgument {
                    name: "output",
                    reason: format!(
                        "{} exists and is not a JSON object; give another output file",
                        path.display()
                    ),
                })
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::Map::new(),
        Err(e) => return Err(Error::io(path, e)),
    };
    obj.insert(key.to_string(), value);
    let mut text = serde_json::to_string_pretty(&serde_json::Value::Object(obj))
        .map_err(|e| Error::io(path, std::io::Error::other(e)))?;
    text.push('\n');
    crate::plot::write_atomic(path, text.as_bytes())
}

pub(crate) fn invalid(name: &'static str, reason: impl Into<String>) -> Error {
    Error::InvalidArgument {
        name,
        reason: reason.into(),
    }
}

/// The 0-based rank of `class` when classes are ordered by descending score, ties by lower class index.
pub(crate) fn rank_of<S: PartialOrd + Copy>(scores: &[S], class: usize) -> usize {
    let s = scores[class];
    scores
        .iter()
        .enumerate()
        .filter(|&(c, &x)| x > s || (x == s && c < class))
        .count()
}

/// Decodes, transforms and labels the samples of `dataset` `batch_size` at a time (in parallel within a batch)
/// and calls `f` with each batch's pixels, `[b, 3, crop, crop]` in the model's dtype on its device; returns the
/// labels in dataset order. `purpose` names the evaluation in the error for a missing label.
///
/// Errors: [`Error::InvalidArgument`] for a transform that is not `Preprocess::Eval` with positive sizes, an
/// empty dataset, a zero `batch_size`, or a sample without a non-negative label; [`Error::Data`] when a sample
/// cannot be loaded; whatever `f` returns.
pub(crate) fn for_each_batch(
    model: &DinoVisionTransformer,
    dataset: &dyn Dataset,
    transform: Preprocess,
    batch_size: usize,
    purpose: &str,
    mut f: impl FnMut(&Tensor) -> Result<()>,
) -> Result<Vec<usize>> {
    let crop = match transform {
        Preprocess::Eval { resize, crop } if resize > 0 && crop > 0 => crop as usize,
        other => {
            return Err(invalid(
                "transform",
                format!(
                    "must be Preprocess::Eval {{ resize, crop }} with positive sizes (one image size per batch), got {other:?}"
                ),
            ))
        }
    };
    if dataset.is_empty() {
        return Err(invalid("dataset", "is empty; nothing to embed"));
    }
    if batch_size == 0 {
        return Err(invalid("batch_size", "must be positive"));
    }
    let (device, dtype) = model
        .named_parameters()
        .first()
        .map(|(_, t)| (t.device().clone(), t.dtype()))
        .unwrap_or((Device::Cpu, DType::F32));
    let opts = DecodeOptions::default();
    let mut labels = Vec::with_capacity(dataset.len());
    for start in (0..dataset.len()).step_by(batch_size) {
        let end = (start + batch_size).min(dataset.len());
        let items: Vec<(Vec<f32>, usize)> = (start..end)
            .into_par_iter()
            .map(|i| -> Result<(Vec<f32>, usize)> {
                let sample = dataset.get(i, &opts)?;
                let label = sample
                    .label
                    .and_then(|l| usize::try_from(l).ok())
                    .ok_or_else(|| {
                        invalid(
                            "dataset",
                            format!(
                                "sample {} has label {:?}; {purpose} needs a non-negative label per sample",
                                dataset.describe(i),
                                sample.label
                            ),
                        )
                    })?;
                Ok((preprocess(&sample.image, &transform)?.data, label))
            })
            .collect::<Result<_>>()?;
        let mut pixels = Vec::with_capacity(items.len() * 3 * crop * crop);
        for (data, label) in items {
            pixels.extend_from_slice(&data);
            labels.push(label);
        }
        let x = Tensor::from_vec(pixels, (end - start, 3, crop, crop), &device)?.to_dtype(dtype)?;
        f(&x)?;
    }
    Ok(labels)
}
