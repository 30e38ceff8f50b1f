//! k-NN evaluation of frozen features, as the official `eval/knn.py`: features L2-normalised, cosine similarity to
//! every training feature, the `k` most similar neighbours vote with weights `softmax(sim / T)`, and the class with
//! the largest summed weight is the prediction; the metrics are top-1 and top-5 accuracy for each k of
//! [`OFFICIAL_KS`].
//!
//! [`embed_dataset`] computes the features of a [`Dataset`] with a backbone (the normalised class token, what the
//! official `model(x)` returns); [`knn_evaluate`] scores them for several k at once (the official evaluation),
//! [`knn_accuracy`] gives the top-1 accuracy of one k and [`knn_predict`] the predicted classes.
//!
//! ```
//! use candle_core::{DType, Device};
//! use candle_nn::VarMap;
//! use dinov2_data::synthetic::SyntheticShapes;
//! use dinov2_model::{DinoVisionTransformer, VitConfig};
//! use dinov2_train::eval::knn::{embed_dataset, knn_accuracy};
//! # fn main() -> dinov2_train::Result<()> {
//! let mut cfg = VitConfig::vit_small();
//! (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.patch_size, cfg.img_size) = (32, 2, 1, 8, 32);
//! let varmap = VarMap::new();
//! let model = DinoVisionTransformer::new(&cfg, dinov2_model::init::seeded(&varmap, 0, DType::F32, &Device::Cpu))?;
//! let (train, train_labels) = embed_dataset(&model, &SyntheticShapes::new(40, 1), 32, 16)?;
//! let (test, test_labels) = embed_dataset(&model, &SyntheticShapes::new(20, 2), 32, 16)?;
//! assert_eq!(train.dims(), &[40, 32]);
//! let acc = knn_accuracy(&train, &train_labels, &test, &test_labels, 20, 0.07)?;
//! assert!((0.0..=1.0).contains(&acc));
//! # Ok(()) }
//! ```

use candle_core::{DType, Device, Tensor, D};
use dinov2_data::{Dataset, Preprocess};
use dinov2_model::DinoVisionTransformer;
use rayon::prelude::*;

use super::{for_each_batch, invalid, rank_of};
#[cfg(any(doc, test))]
use crate::error::Error;
use crate::error::Result;

/// The official voting temperature (`--temperature` default of `eval/knn.py`).
pub const TEMPERATURE: f64 = 0.07;

/// Test rows scored per similarity chunk are chosen so that a chunk holds about this many similarities.
const CHUNK_ELEMS: usize = 1 << 22;

/// `features / max(||features||, 1e-12)` row-wise, in f32 (torch `F.normalize`, as the official
/// `ModelWithNormalize`).
fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(1e-12)?;
    Ok(x.broadcast_div(&norm)?)
}

/// Top-1 accuracy (in `[0, 1]`) of the weighted k-NN classifier of the official `eval/knn.py`.
///
/// `train` is `[N, D]` with `train_labels.len() == N`, `test` is `[M, D]` with `test_labels.len() == M`; both are
/// L2-normalised here (the features need not be). For each test row, the `k` training rows of largest cosine
/// similarity (ties: lower index first; `k` is capped at `N`) vote with weights `softmax(sim / temperature)` over
/// those neighbours, the score of a class is the sum of its neighbours' weights, and the prediction is the class of
/// largest score (ties: lower class index). The official code normalises the weights over its largest `k` (200)
/// rather than over `k`; that scales every score of a row alike and leaves the prediction unchanged. The similarity
/// matrix is computed in chunks of test rows, so memory stays bounded for large sets.
///
/// Errors: [`Error::InvalidArgument`] on features that are not rank-2 or of different widths, label counts that do
/// not match the rows, an empty set, `k == 0`, or a temperature that is not positive and finite.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use dinov2_train::eval::knn::knn_accuracy;
/// # fn main() -> dinov2_train::Result<()> {
/// // class 0 points along x, class 1 along y; lengths do not matter (cosine similarity)
/// let train = Tensor::new(&[[1f32, 0.1], [3.0, -0.2], [0.1, 1.0], [-0.2, 2.0]], &Device::Cpu)?;
/// let test = Tensor::new(&[[5f32, 1.0], [1.0, 4.0], [0.2, 1.0]], &Device::Cpu)?;
/// let acc = knn_accuracy(&train, &[0, 0, 1, 1], &test, &[0, 1, 0], 1, 0.07)?;
/// assert_eq!(acc, 2.0 / 3.0); // the third test point is nearest to class 1
/// assert!(knn_accuracy(&train, &[0, 0, 1], &test, &[0, 1, 0], 1, 0.07).is_err());
/// # Ok(()) }
/// ```
pub fn knn_accuracy(
    train: &Tensor,
    train_labels: &[usize],
    test: &Tensor,
    test_labels: &[usize],
    k: usize,
    temperature: f64,
) -> Result<f64> {
    let predictions = knn_predict(train, train_labels, test, k, temperature)?;
    check_test_labels(predictions.len(), test_labels)?;
    let correct = predictions
        .iter()
        .zip(test_labels)
        .filter(|(p, t)| p == t)
        .count();
    Ok(correct as f64 / predictions.len() as f64)
}

/// The predicted class of every test row under the weighted k-NN vote of [`knn_accuracy`] (same rules, same
/// errors).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use dinov2_train::eval::knn::knn_predict;
/// # fn main() -> dinov2_train::Result<()> {
/// let train = Tensor::new(&[[1f32, 0.0], [0.9, 0.1], [0.0, 1.0]], &Device::Cpu)?;
/// let test = Tensor::new(&[[0.6f32, 0.4], [0.1, 0.9]], &Device::Cpu)?;
/// // k = 3: the two class-0 neighbours of the first point outvote the class-2 one
/// assert_eq!(knn_predict(&train, &[0, 0, 2], &test, 3, 0.07)?, vec![0, 2]);
/// # Ok(()) }
/// ```
pub fn knn_predict(
    train: &Tensor,
    train_labels: &[usize],
    test: &Tensor,
    k: usize,
    temperature: f64,
) -> Result<Vec<usize>> {
    let num_classes = num_classes(train_labels, &[]);
    map_rows_chunked(
        train,
        train_labels,
        test,
        &[k],
        temperature,
        CHUNK_ELEMS,
        |_, sims| {
            let scores = class_scores(sims, train_labels, num_classes, &[k], temperature);
            argmax(&scores[0])
        },
    )
}

/// The official k values (`--nb_knn` default of `eval/knn.py`).
pub const OFFICIAL_KS: [usize; 4] = [10, 20, 100, 200];

/// Top-1 and top-5 accuracy of the k-NN classifier for one `k`, in percent (as the official logs).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KnnAccuracy {
    /// The number of neighbours that voted.
    pub k: usize,
    /// Percent of test rows whose true class has the largest score.
    pub top1: f64,
    /// Percent of test rows whose true class is among the 5 largest scores.
    pub top5: f64,
}

/// Top-1 and top-5 accuracy (percent) of the official k-NN evaluation for every `k` of `ks`, from one neighbour
/// search: the `max(ks)` most similar training rows of each test row are found once, their weights are
/// `softmax(sim / temperature)` over those `max(ks)` neighbours (exactly the official normalisation), and for each
/// `k` the score of a class is the summed weight of its neighbours among the first `k`.
///
/// Ranking rules, for reproducible numbers: neighbours of equal similarity are taken lower index first; classes
/// of equal score rank lower class index first, so a true class of score 0 counts for top-5 only when fewer than
/// five classes rank ahead of it. `torchmetrics` breaks ties in whatever order `torch.topk` returns, which can
/// differ only on exact ties. A `k` above the training set size uses every training row. Results come back in
/// the order of `ks`.
///
/// Errors: those of [`knn_accuracy`], and [`Error::InvalidArgument`] for an empty `ks`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use dinov2_train::eval::knn::knn_evaluate;
/// # fn main() -> dinov2_train::Result<()> {
/// let train = Tensor::new(&[[1f32, 0.0], [0.9, 0.2], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.1]], &Device::Cpu)?;
/// let test = Tensor::new(&[[1f32, 0.1], [0.2, 1.0]], &Device::Cpu)?;
/// let results = knn_evaluate(&train, &[0, 0, 1, 1, 2], &test, &[0, 2], &[1, 5], 0.07)?;
/// assert_eq!((results[0].k, results[0].top1), (1, 50.0)); // the second test row is labelled 2, near class 1
/// assert_eq!(results[1].top5, 100.0); // 3 classes: every true class is in the top 5
/// # Ok(()) }
/// ```
pub fn knn_evaluate(
    train: &Tensor,
    train_labels: &[usize],
    test: &Tensor,
    test_labels: &[usize],
    ks: &[usize],
    temperature: f64,
) -> Result<Vec<KnnAccuracy>> {
    evaluate_chunked(
        train,
        train_labels,
        test,
        test_labels,
        ks,
        temperature,
        CHUNK_ELEMS,
    )
}

fn evaluate_chunked(
    train: &Tensor,
    train_labels: &[usize],
    test: &Tensor,
    test_labels: &[usize],
    ks: &[usize],
    temperature: f64,
    chunk_elems: usize,
) -> Result<Vec<KnnAccuracy>> {
    if test.rank() == 2 {
        check_test_labels(test.dims()[0], test_labels)?;
    }
    let num_classes = num_classes(train_labels, test_labels);
    // per test row and k: (top-1 hit, top-5 hit)
    let hits = map_rows_chunked(
        train,
        train_labels,
        test,
        ks,
        temperature,
        chunk_elems,
        |row, sims| {
            let truth = test_labels[row];
            class_scores(sims, train_labels, num_classes, ks, temperature)
                .iter()
                .map(|scores| {
                    let rank = rank_of(scores, truth);
                    (rank == 0, rank < 5)
                })
                .collect::<Vec<_>>()
        },
    )?;
    let percent = |n: usize| 100.0 * n as f64 / hits.len() as f64;
    Ok(ks
        .iter()
        .enumerate()
        .map(|(i, &k)| KnnAccuracy {
            k,
            top1: percent(hits.iter().filter(|h| h[i].0).count()),
            top5: percent(hits.iter().filter(|h| h[i].1).count()),
        })
        .collect())
}

/// `{"10": {"top1": .., "top5": ..}, ...}`: the per-k accuracies as the `knn` object of the metrics files
/// (`dinov2 eval knn --output`, the training log).
pub fn metrics_json(results: &[KnnAccuracy]) -> serde_json::Value {
    let mut obj = serde_json::Map::new();
    for r in results {
        obj.insert(
            r.k.to_string(),
            serde_json::json!({ "top1": r.top1, "top5": r.top5 }),
        );
    }
    serde_json::Value::Object(obj)
}

/// One label per test row.
fn check_test_labels(rows: usize, test_labels: &[usize]) -> Result<()> {
    if test_labels.len() == rows {
        return Ok(());
    }
    Err(invalid(
        "test_labels",
        format!(
            "has {} labels for {rows} test features; give one label per row",
            test_labels.len()
        ),
    ))
}

fn num_classes(train_labels: &[usize], test_labels: &[usize]) -> usize {
    train_labels
        .iter()
        .chain(test_labels)
        .max()
        .map_or(0, |&c| c + 1)
}

/// Validates the arguments, then maps `f(test_row, similarities to every training row)` over the test rows, the
/// similarity matrix computed `chunk_elems` similarities at a time.
fn map_rows_chunked<R: Send>(
    train: &Tensor,
    train_labels: &[usize],
    test: &Tensor,
    ks: &[usize],
    temperature: f64,
    chunk_elems: usize,
    f: impl Fn(usize, &[f32]) -> R + Sync,
) -> Result<Vec<R>> {
    let (n, d) = train.dims2().map_err(|_| {
        invalid(
            "train",
            format!("must be [N, D], got shape {:?}", train.dims()),
        )
    })?;
    let (m, d_test) = test.dims2().map_err(|_| {
        invalid(
            "test",
            format!("must be [M, D], got shape {:?}", test.dims()),
        )
    })?;
    if n == 0 || m == 0 {
        let name = if n == 0 { "train" } else { "test" };
        return Err(invalid(name, "is empty; give at least one feature row"));
    }
    if d != d_test {
        return Err(invalid(
            "test",
            format!("has {d_test} features per row but train has {d}"),
        ));
    }
    if train_labels.len() != n {
        return Err(invalid(
            "train_labels",
            format!(
                "has {} labels for {n} train features; give one label per row",
                train_labels.len()
            ),
        ));
    }
    if ks.is_empty() {
        return Err(invalid(
            "k",
            "needs at least one value (officially 10, 20, 100, 200)",
        ));
    }
    if ks.contains(&0) {
        return Err(invalid(
            "k",
            "must be at least 1 (officially 10, 20, 100 or 200)",
        ));
    }
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(invalid(
            "temperature",
            format!("must be positive and finite (officially 0.07), got {temperature}"),
        ));
    }
    let train_t = l2_normalize(train)?.t()?.contiguous()?;
    let test = l2_normalize(test)?;
    let rows_per_chunk = (chunk_elems / n).clamp(1, m);
    let mut out = Vec::with_capacity(m);
    for start in (0..m).step_by(rows_per_chunk) {
        let rows = rows_per_chunk.min(m - start);
        let sims = test.narrow(0, start, rows)?.matmul(&train_t)?;
        let sims: Vec<Vec<f32>> = sims.to_device(&Device::Cpu)?.to_vec2()?;
        out.par_extend(
            sims.par_iter()
                .enumerate()
                .map(|(i, row)| f(start + i, row)),
        );
    }
    Ok(out)
}

/// The class scores of one test row for each `k` of `ks`: the `max(ks)` most similar training rows (capped at
/// all of them) weighted by `softmax(sim / T)` over those neighbours, summed per class over the first `k`.
fn class_scores(
    sims: &[f32],
    labels: &[usize],
    num_classes: usize,
    ks: &[usize],
    temperature: f64,
) -> Vec<Vec<f64>> {
    let k_max = ks.iter().copied().max().unwrap_or(1).clamp(1, sims.len());
    // descending similarity, ties to the lower index (NaN, from NaN features, sorts last)
    let order = |&a: &usize, &b: &usize| {
        sims[b]
            .partial_cmp(&sims[a])
            .unwrap_or_else(|| sims[a].is_nan().cmp(&sims[b].is_nan()))
            .then(a.cmp(&b))
    };
    let mut idx: Vec<usize> = (0..sims.len()).collect();
    if k_max < idx.len() {
        idx.select_nth_unstable_by(k_max - 1, order);
        idx.truncate(k_max);
    }
    idx.sort_unstable_by(order);
    let max = f64::from(sims[idx[0]]);
    let weights: Vec<f64> = idx
        .iter()
        .map(|&j| ((f64::from(sims[j]) - max) / temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    ks.iter()
        .map(|&k| {
            let mut scores = vec![0f64; num_classes];
            for (&j, w) in idx.iter().zip(&weights).take(k) {
                scores[labels[j]] += w / total;
            }
            scores
        })
        .collect()
}

/// The class of largest score, ties to the lower class.
fn argmax(scores: &[f64]) -> usize {
    let mut best = 0;
    for (c, &s) in scores.iter().enumerate() {
        if s > scores[best] {
            best = c;
        }
    }
    best
}

/// The features of every sample of `dataset`: the backbone's normalised class token (`x_norm_clstoken`, the
/// official `model(x)`), `[N, D]` in f32 on the model's device, with the samples' labels.
///
/// Each image goes through the evaluation transform for small images: shorter side resized to `image_size`
/// (bicubic), center crop `image_size` x `image_size`, ImageNet normalisation ([`Preprocess::Eval`] with
/// `resize == crop`); give the training's global crop size. Images are decoded and transformed in parallel (rayon)
/// and embedded `batch_size` at a time.
///
/// Errors: [`Error::InvalidArgument`] on an empty dataset, a zero `image_size` or `batch_size`, or a sample without
/// a label or with a negative one; [`Error::Data`] when a sample cannot be loaded; [`Error::Model`] /
/// [`Error::Candle`] from the forward.
///
/// ```
/// use candle_core::{DType, Device};
/// use dinov2_data::synthetic::SyntheticShapes;
/// use dinov2_model::{DinoVisionTransformer, VitConfig};
/// use dinov2_train::eval::knn::embed_dataset;
/// # fn main() -> dinov2_train::Result<()> {
/// let mut cfg = VitConfig::vit_small();
/// (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.patch_size, cfg.img_size) = (16, 2, 1, 8, 32);
/// let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
/// let model = DinoVisionTransformer::from_state_dict(&cfg, &sd, &Device::Cpu, DType::F32)?;
/// let data = SyntheticShapes::new(12, 0);
/// let (features, labels) = embed_dataset(&model, &data, 32, 5)?;
/// assert_eq!(features.dims(), &[12, 16]);
/// assert_eq!(labels, (0..12).map(|i| i % 10).collect::<Vec<_>>());
/// // batching does not change the features
/// let (again, _) = embed_dataset(&model, &data, 32, 12)?;
/// let diff = (features - again)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert!(diff < 1e-5);
/// # Ok(()) }
/// ```
pub fn embed_dataset(
    model: &DinoVisionTransformer,
    dataset: &dyn Dataset,
    image_size: usize,
    batch_size: usize,
) -> Result<(Tensor, Vec<usize>)> {
    if image_size == 0 {
        return Err(invalid("image_size", "must be positive"));
    }
    let size = u32::try_from(image_size)
        .map_err(|_| invalid("image_size", format!("{image_size} is too large")))?;
    let transform = Preprocess::Eval {
        resize: size,
        crop: size,
    };
    embed_dataset_with(model, dataset, transform, batch_size)
}

/// [`embed_dataset`] with any evaluation transform: `Preprocess::Eval { resize, crop }` (the official k-NN and
/// linear evaluations use [`Preprocess::OFFICIAL_EVAL`], resize 256 then crop 224). Other variants do not give
/// images of one size and are refused.
///
/// Errors: those of [`embed_dataset`], and [`Error::InvalidArgument`] for a transform that is not
/// `Preprocess::Eval` or has a zero size.
///
/// ```
/// use candle_core::{DType, Device};
/// use dinov2_data::{synthetic::SyntheticShapes, Preprocess};
/// use dinov2_model::{DinoVisionTransformer, VitConfig};
/// use dinov2_train::eval::knn::embed_dataset_with;
/// # fn main() -> dinov2_train::Result<()> {
/// let mut cfg = VitConfig::vit_small();
/// (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.patch_size, cfg.img_size) = (16, 2, 1, 8, 32);
/// let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
/// let model = DinoVisionTransformer::from_state_dict(&cfg, &sd, &Device::Cpu, DType::F32)?;
/// let data = SyntheticShapes::new(4, 0);
/// let (features, _) = embed_dataset_with(&model, &data, Preprocess::Eval { resize: 40, crop: 32 }, 4)?;
/// assert_eq!(features.dims(), &[4, 16]);
/// let pad = Preprocess::CenterPad { multiple: 8 };
/// assert!(embed_dataset_with(&model, &data, pad, 4).is_err());
/// # Ok(()) }
/// ```
pub fn embed_dataset_with(
    model: &DinoVisionTransformer,
    dataset: &dyn Dataset,
    transform: Preprocess,
    batch_size: usize,
) -> Result<(Tensor, Vec<usize>)> {
    let mut features = Vec::new();
    let labels = for_each_batch(
        model,
        dataset,
        transform,
        batch_size,
        "k-NN evaluation",
        |x| {
            let cls = model.forward_features(x, None)?.x_norm_clstoken;
            features.push(cls.to_dtype(DType::F32)?);
            Ok(())
        },
    )?;
    Ok((Tensor::cat(&features, 0)?, labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(rows: &[&[f32]]) -> Tensor {
        let d = rows[0].len();
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(flat, (rows.len(), d), &Device::Cpu).unwrap()
    }

    /// Unit vectors at angle `a` (radians) in the plane.
    fn at(a: f32) -> [f32; 2] {
        [a.cos(), a.sin()]
    }

    #[test]
    fn nearest_neighbour_with_k1_is_the_most_similar_direction() {
        // three classes on three rays 120 degrees apart; test points slightly off each ray
        let train: Vec<[f32; 2]> = [0.0, 0.05, 2.1, 2.15, 4.2, 4.25].map(at).to_vec();
        let rows: Vec<&[f32]> = train.iter().map(|r| &r[..]).collect();
        let test: Vec<[f32; 2]> = [0.3, 2.4, 4.0, 1.0].map(at).to_vec();
        let test_rows: Vec<&[f32]> = test.iter().map(|r| &r[..]).collect();
        let labels = [0, 0, 1, 1, 2, 2];
        let pred = knn_predict(&t(&rows), &labels, &t(&test_rows), 1, TEMPERATURE).unwrap();
        // 1.0 rad is nearer to 0.05 (distance 0.95) than to 2.1 (distance 1.1)
        assert_eq!(pred, vec![0, 1, 2, 0]);
        let acc = knn_accuracy(
            &t(&rows),
            &labels,
            &t(&test_rows),
            &[0, 1, 2, 1],
            1,
            TEMPERATURE,
        )
        .unwrap();
        assert_eq!(acc, 0.75);
    }

    #[test]
    fn weights_follow_softmax_of_similarity_over_temperature() {
        // test point at angle 0; one class-0 neighbour at angle a, two class-1 neighbours at angle b > a.
        // class 0 wins iff exp(cos a / T) > 2 exp(cos b / T), i.e. cos a - cos b > T ln 2.
        let (a, b) = (0.2f32, 0.5f32);
        let train = [at(a), at(b), at(-b)];
        let rows: Vec<&[f32]> = train.iter().map(|r| &r[..]).collect();
        let test = t(&[&at(0.0)]);
        let gap = f64::from(a.cos() - b.cos());
        let below = gap / 2f64.ln() * 0.9; // class 0 wins: its neighbour is decisively closer
        let above = gap / 2f64.ln() * 1.1; // class 1 wins: two neighbours outweigh one at high temperature
        assert_eq!(
            knn_predict(&t(&rows), &[0, 1, 1], &test, 3, below).unwrap(),
            vec![0]
        );
        assert_eq!(
            knn_predict(&t(&rows), &[0, 1, 1], &test, 3, above).unwrap(),
            vec![1]
        );
        // with k = 1 only the nearest votes, whatever the temperature
        assert_eq!(
            knn_predict(&t(&rows), &[0, 1, 1], &test, 1, above).unwrap(),
            vec![0]
        );
    }

    #[test]
    fn features_are_l2_normalised_and_k_is_capped() {
        // the class-1 point is long but points away: cosine, not dot product, decides
        let train = t(&[&[1.0, 0.0], &[-100.0, 1.0]]);
        let test = t(&[&[2.0, 0.5], &[-0.5, 0.1]]);
        let pred = knn_predict(&train, &[0, 1], &test, 1, TEMPERATURE).unwrap();
        assert_eq!(pred, vec![0, 1]);
        // k larger than the training set: all neighbours vote, still the similarity-weighted choice
        let pred = knn_predict(&train, &[0, 1], &test, 50, TEMPERATURE).unwrap();
        assert_eq!(pred, vec![0, 1]);
    }

    #[test]
    fn chunking_does_not_change_predictions() {
        let (n, m, d) = (37, 29, 5);
        let wave = |len: usize, f: f32| -> Tensor {
            let v: Vec<f32> = (0..len * d).map(|i| (i as f32 * f).sin()).collect();
            Tensor::from_vec(v, (len, d), &Device::Cpu).unwrap()
        };
        let (train, test) = (wave(n, 0.7), wave(m, 1.3));
        let labels: Vec<usize> = (0..n).map(|i| i % 4).collect();
        let test_labels: Vec<usize> = (0..m).map(|i| (i * 7) % 4).collect();
        let eval = |chunk_elems| {
            evaluate_chunked(
                &train,
                &labels,
                &test,
                &test_labels,
                &[1, 5, 50],
                TEMPERATURE,
                chunk_elems,
            )
            .unwrap()
        };
        let whole = eval(usize::MAX);
        for chunk_elems in [1, n, 3 * n + 1, 10 * n] {
            assert_eq!(
                eval(chunk_elems),
                whole,
                "chunk of {chunk_elems} similarities"
            );
        }
        assert!(
            whole.iter().any(|r| r.top1 > 0.0 && r.top1 < 100.0),
            "a degenerate case would prove nothing"
        );
    }

    #[test]
    fn ties_go_to_the_lower_index_and_class() {
        // identical training points: the first one is the nearest neighbour
        let train = t(&[&[1.0, 0.0], &[1.0, 0.0]]);
        let test = t(&[&[1.0, 0.0]]);
        assert_eq!(
            knn_predict(&train, &[3, 1], &test, 1, TEMPERATURE).unwrap(),
            vec![3]
        );
        // two equally weighted classes: the lower class index wins
        assert_eq!(
            knn_predict(&train, &[3, 1], &test, 2, TEMPERATURE).unwrap(),
            vec![1]
        );
    }

    #[test]
    fn top5_counts_the_true_class_among_the_five_best_scores() {
        // seven classes on seven rays; the test point lies on ray 0, so the classes rank by angular distance:
        // 0 (0), 1 and 6 (one step), 2 and 5 (two steps), 3 and 4 (three)
        let angle = |c: usize| c as f32 * std::f32::consts::TAU / 7.0;
        let train: Vec<[f32; 2]> = (0..7).map(|c| at(angle(c))).collect();
        let rows: Vec<&[f32]> = train.iter().map(|r| &r[..]).collect();
        let origin = at(0.0);
        let test = t(&[&origin[..]; 7]);
        let truth: Vec<usize> = (0..7).collect();
        // a large temperature keeps every class's weight visible
        let r = knn_evaluate(&t(&rows), &truth, &test, &truth, &[7, 1, 3], 10.0).unwrap();
        assert_eq!(r.iter().map(|r| r.k).collect::<Vec<_>>(), vec![7, 1, 3]);
        let pct = |n: usize| 100.0 * n as f64 / 7.0;
        // k = 7: classes 0, 1, 6, 2, 5 are the top 5 (ties by lower class: 1 before 6, 2 before 5)
        assert_eq!((r[0].top1, r[0].top5), (pct(1), pct(5)));
        // k = 1: only class 0 has a vote; the zero-score classes rank by index: 1, 2, 3, 4 fill the top 5
        assert_eq!((r[1].top1, r[1].top5), (pct(1), pct(5)));
        // k = 3: classes 0, 1, 6 have votes, then 2 and 3 by index; 4 and 5 miss
        assert_eq!((r[2].top1, r[2].top5), (pct(1), pct(5)));
        assert_eq!(rank_of(&[0.5, 0.2, 0.2, 0.0, 0.1, 0.0], 2), 2);
        assert_eq!(rank_of(&[0.5, 0.2, 0.2, 0.0, 0.1, 0.0], 5), 5);
        // k above the training set size: every training row votes (the same as k = 7)
        let big = knn_evaluate(&t(&rows), &truth, &test, &truth, &[200], 10.0).unwrap();
        assert_eq!((big[0].top1, big[0].top5), (r[0].top1, r[0].top5));
        let json = metrics_json(&r);
        assert_eq!(json["7"]["top5"], serde_json::json!(pct(5)));
        assert_eq!(json.as_object().unwrap().len(), 3);
    }

    #[test]
    fn evaluate_rejects_bad_k_lists_and_label_counts() {
        let train = t(&[&[1.0, 0.0], &[0.0, 1.0]]);
        let test = t(&[&[1.0, 0.0]]);
        let name = |r: Result<Vec<KnnAccuracy>>| match r {
            Err(Error::InvalidArgument { name, .. }) => name,
            other => panic!("expected InvalidArgument, got {other:?}"),
        };
        assert_eq!(
            name(knn_evaluate(&train, &[0, 1], &test, &[0], &[], 0.07)),
            "k"
        );
        assert_eq!(
            name(knn_evaluate(&train, &[0, 1], &test, &[0], &[5, 0], 0.07)),
            "k"
        );
        assert_eq!(
            name(knn_evaluate(&train, &[0, 1], &test, &[0, 1], &[1], 0.07)),
            "test_labels"
        );
        assert_eq!(
            name(knn_evaluate(&train, &[0], &test, &[0], &[1], 0.07)),
            "train_labels"
        );
    }

    #[test]
    fn bad_arguments_are_typed_errors() {
        let train = t(&[&[1.0, 0.0], &[0.0, 1.0]]);
        let test = t(&[&[1.0, 0.0]]);
        let name = |r: Result<f64>| match r {
            Err(Error::InvalidArgument { name, .. }) => name,
            other => panic!("expected InvalidArgument, got {other:?}"),
        };
        assert_eq!(
            name(knn_accuracy(&train, &[0], &test, &[0], 1, 0.07)),
            "train_labels"
        );
        assert_eq!(
            name(knn_accuracy(&train, &[0, 1], &test, &[0, 1], 1, 0.07)),
            "test_labels"
        );
        assert_eq!(
            name(knn_accuracy(&train, &[0, 1], &test, &[0], 0, 0.07)),
            "k"
        );
        assert_eq!(
            name(knn_accuracy(&train, &[0, 1], &test, &[0], 1, 0.0)),
            "temperature"
        );
        assert_eq!(
            name(knn_accuracy(&train, &[0, 1], &test, &[0], 1, f64::NAN)),
            "temperature"
        );
        let wide = t(&[&[1.0, 0.0, 0.0]]);
        assert_eq!(
            name(knn_accuracy(&train, &[0, 1], &wide, &[0], 1, 0.07)),
            "test"
        );
        let empty = Tensor::zeros((0, 2), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            name(knn_accuracy(&empty, &[], &test, &[0], 1, 0.07)),
            "train"
        );
        assert_eq!(
            name(knn_accuracy(&train, &[0, 1], &empty, &[], 1, 0.07)),
            "test"
        );
        let flat = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            name(knn_accuracy(&flat, &[0], &test, &[0], 1, 0.07)),
            "train"
        );
        let msg = knn_accuracy(&train, &[0], &test, &[0], 1, 0.07)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("1 labels for 2 train features"), "{msg}");
    }
}
