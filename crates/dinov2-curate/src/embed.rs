//! Embedding an image pool into sharded `.npy` files, resumable after a crash.
//!
//! Layout of the output directory:
//! - `manifest.json`: dimension, row count, shard size, shard count (checked on resume);
//! - `paths.txt`: row id to image path (line `i` = row `i`; checked on resume);
//! - `shard_00000.npy` (`f32`, `rows x dim`) and `shard_00000.ids.npy` (`int64` row ids), one pair per contiguous
//!   block of `shard_size` rows. Both are written atomically, ids first, so a present and well-formed
//!   `shard_XXXXX.npy` means a finished shard: a rerun skips it and recomputes only missing shards.
//!
//! The model is abstracted by [`Embedder`], so the batching/sharding/resume logic is independent of the backbone.

use std::path::{Path, PathBuf};

use crate::error::{invalid, io_err, Error, Result};
use crate::npy;
use crate::store::{l2_normalize_rows, Embeddings};
use dinov2_dist::{Communicator, SingleProcess};

/// Anything that turns a batch of image files into embedding rows.
///
/// A model's own errors go into [`Error::Embedder`] (see [`Error::embedder`]).
///
/// ```
/// use std::path::PathBuf;
/// use dinov2_curate::embed::Embedder;
/// /// A stand-in model: the length of the file name, twice.
/// struct NameLength;
/// impl Embedder for NameLength {
///     fn dim(&self) -> usize {
///         2
///     }
///     fn embed(&mut self, paths: &[PathBuf]) -> dinov2_curate::Result<Vec<f32>> {
///         Ok(paths.iter().flat_map(|p| [p.as_os_str().len() as f32; 2]).collect())
///     }
/// }
/// let mut m: Box<dyn Embedder> = Box::new(NameLength);
/// assert_eq!(m.embed(&["a.jpg".into()]).unwrap(), vec![5.0, 5.0]);
/// ```
pub trait Embedder {
    /// Embedding dimension.
    fn dim(&self) -> usize;
    /// Embeds `paths` (one batch), returning `paths.len() * dim()` values, row-major.
    fn embed(&mut self, paths: &[PathBuf]) -> Result<Vec<f32>>;
}

impl<E: Embedder + ?Sized> Embedder for Box<E> {
    fn dim(&self) -> usize {
        (**self).dim()
    }
    fn embed(&mut self, paths: &[PathBuf]) -> Result<Vec<f32>> {
        (**self).embed(paths)
    }
}

/// Sharding and batching parameters.
///
/// ```
/// let c = dinov2_curate::embed::EmbedConfig::default();
/// assert_eq!((c.shard_size, c.batch_size, c.normalize), (65536, 64, true));
/// ```
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(default)]
pub struct EmbedConfig {
    /// Rows per output shard.
    pub shard_size: usize,
    /// Images per embedder call.
    pub batch_size: usize,
    /// L2-normalise rows before writing.
    pub normalize: bool,
}

impl Default for EmbedConfig {
    fn default() -> Self {
        Self {
            shard_size: 65536,
            batch_size: 64,
            normalize: true,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
struct Manifest {
    dim: usize,
    n_rows: usize,
    shard_size: usize,
    n_shards: usize,
    normalize: bool,
}

/// What an [`embed_pool`] call did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EmbedReport {
    /// Rows in the pool.
    pub n_rows: usize,
    /// Embedding dimension.
    pub dim: usize,
    /// Shards in total.
    pub n_shards: usize,
    /// Shards computed by this call.
    pub computed: usize,
    /// Shards found finished and skipped.
    pub skipped: usize,
}

/// Path of shard `i` in `dir`.
pub fn shard_path(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("shard_{i:05}.npy"))
}

fn ids_path(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("shard_{i:05}.ids.npy"))
}

fn shard_done(dir: &Path, i: usize, rows: usize, dim: usize) -> bool {
    let (Ok(h), Ok(hi)) = (
        npy::read_header(&shard_path(dir, i)),
        npy::read_header(&ids_path(dir, i)),
    ) else {
        return false;
    };
    let len_ok = std::fs::metadata(shard_path(dir, i))
        .map(|m| m.len() as usize == h.data_offset + rows * dim * 4)
        .unwrap_or(false);
    h.dtype == npy::NpyDtype::F32 && h.shape == [rows, dim] && hi.shape == [rows] && len_ok
}

/// Embeds `paths` into `out` (see the module docs for the layout), skipping shards already finished there.
/// `progress(rows_done, rows_total)` is called after every batch (skipped shards count as done).
pub fn embed_pool(
    embedder: &mut dyn Embedder,
    paths: &[PathBuf],
    out: &Path,
    cfg: &EmbedConfig,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<EmbedReport> {
    embed_pool_sharded(embedder, paths, out, cfg, progress, &SingleProcess)
}

/// [`embed_pool`] by the ranks of `comm` together (`mpirun -np N dinov2 curate embed`): shard `s` is rank
/// `s % N`'s, which writes it to `out` (so a rerun resumes per rank, with any world size when `out` is on a
/// shared file system); every rank checks or writes the manifest and `paths.txt` in its own view of `out`.
/// `progress` counts this rank's rows; the returned report counts every rank's shards. The shard files are the
/// ones one process writes.
pub fn embed_pool_sharded(
    embedder: &mut dyn Embedder,
    paths: &[PathBuf],
    out: &Path,
    cfg: &EmbedConfig,
    progress: &mut dyn FnMut(usize, usize),
    comm: &dyn Communicator,
) -> Result<EmbedReport> {
    let (rank, world) = (comm.rank(), comm.world_size());
    if cfg.shard_size == 0 || cfg.batch_size == 0 {
        let name = if cfg.shard_size == 0 {
            "shard_size"
        } else {
            "batch_size"
        };
        return Err(invalid(name, "must be positive"));
    }
    let dim = embedder.dim();
    let n = paths.len();
    let n_shards = n.div_ceil(cfg.shard_size);
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let manifest = Manifest {
        dim,
        n_rows: n,
        shard_size: cfg.shard_size,
        n_shards,
        normalize: cfg.normalize,
    };
    let mpath = out.join("manifest.json");
    let ppath = out.join("paths.txt");
    if mpath.exists() {
        let text = std::fs::read_to_string(&mpath).map_err(io_err(&mpath))?;
        let old: Manifest = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: mpath.clone(),
            source,
        })?;
        if old != manifest {
            return Err(Error::Resume {
                path: out.into(),
                reason: format!(
                    "manifest {old:?} differs from {manifest:?}; use another output directory"
                ),
            });
        }
        let old_paths = crate::store::read_paths(&ppath)?;
        if old_paths != paths {
            return Err(Error::Resume {
                path: out.into(),
                reason: "paths.txt differs from the image list; use another output directory"
                    .into(),
            });
        }
    } else {
        crate::store::write_paths(&ppath, paths)?;
        write_json(&mpath, &manifest)?;
    }
    let mut report = EmbedReport {
        n_rows: n,
        dim,
        n_shards,
        computed: 0,
        skipped: 0,
    };
    let mut done_rows = 0;
    let mine = |s: usize| s % world == rank;
    let my_rows: usize = (0..n_shards)
        .filter(|&s| mine(s))
        .map(|s| ((s + 1) * cfg.shard_size).min(n) - s * cfg.shard_size)
        .sum();
    let n = if world == 1 { n } else { my_rows };
    for s in (0..n_shards).filter(|&s| mine(s)) {
        let (a, b) = (
            s * cfg.shard_size,
            ((s + 1) * cfg.shard_size).min(paths.len()),
        );
        if shard_done(out, s, b - a, dim) {
            report.skipped += 1;
            done_rows += b - a;
            progress(done_rows, n);
            continue;
        }
        let mut rows = Vec::with_capacity((b - a) * dim);
        for batch in paths[a..b].chunks(cfg.batch_size) {
            let e = embedder.embed(batch)?;
            if e.len() != batch.len() * dim {
                return Err(Error::EmbedderOutput {
                    values: e.len(),
                    images: batch.len(),
                    dim,
                });
            }
            if let Some(i) = e.iter().position(|v| !v.is_finite()) {
                return Err(Error::NonFiniteEmbedding {
                    image: batch[i / dim].clone(),
                    row: a + (rows.len() + i) / dim,
                    col: i % dim,
                    value: e[i],
                });
            }
            rows.extend_from_slice(&e);
            done_rows += batch.len();
            progress(done_rows, n);
        }
        if cfg.normalize {
            l2_normalize_rows(&mut rows, dim);
        }
        let ids: Vec<i64> = (a as i64..b as i64).collect();
        npy::write_i64(&ids_path(out, s), &ids, &[b - a])?;
        npy::write_f32(&shard_path(out, s), &rows, &[b - a, dim])?;
        report.computed += 1;
    }
    if world > 1 {
        let c = comm.all_gather_i64(&[report.computed as i64, report.skipped as i64])?;
        report.computed = c.iter().step_by(2).sum::<i64>() as usize;
        report.skipped = c.iter().skip(1).step_by(2).sum::<i64>() as usize;
    }
    Ok(report)
}

pub(crate) fn write_json<T: serde::Serialize>(path: &Path, v: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|source| Error::Json {
        path: path.into(),
        source,
    })?;
    npy::atomic_write(path, |w| w.write_all(text.as_bytes()))
}

/// Opens a finished embedding directory: returns the manifest's `(n_rows, dim, n_shards)` after checking every shard.
fn check_dir(dir: &Path) -> Result<Manifest> {
    let mpath = dir.join("manifest.json");
    let text = std::fs::read_to_string(&mpath).map_err(io_err(&mpath))?;
    let m: Manifest = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: mpath,
        source,
    })?;
    for s in 0..m.n_shards {
        let rows = (m.n_rows - s * m.shard_size).min(m.shard_size);
        if !shard_done(dir, s, rows, m.dim) {
            return Err(Error::Resume {
                path: dir.into(),
                reason: format!("shard {s} is missing or incomplete; rerun the embedding"),
            });
        }
    }
    Ok(m)
}

/// Loads every shard of a finished embedding directory into one owned matrix.
pub fn load_shards(dir: &Path) -> Result<Embeddings> {
    let m = check_dir(dir)?;
    let mut v = Vec::with_capacity(m.n_rows * m.dim);
    for s in 0..m.n_shards {
        let (data, _) = npy::read_f32(&shard_path(dir, s))?;
        v.extend_from_slice(&data);
    }
    Embeddings::from_vec(v, m.n_rows, m.dim)
}

/// Concatenates the shards of a finished directory into one `.npy` file, streaming one shard at a time.
pub fn merge_shards(dir: &Path, output: &Path) -> Result<()> {
    let m = check_dir(dir)?;
    let header = npy::header_bytes(npy::NpyDtype::F32, &[m.n_rows, m.dim]);
    npy::atomic_write(output, |w| {
        w.write_all(&header)?;
        for s in 0..m.n_shards {
            let p = shard_path(dir, s);
            let bytes = std::fs::read(&p)?;
            let h = npy::parse_header(&bytes, &p).map_err(std::io::Error::other)?;
            w.write_all(&bytes[h.data_offset..])?;
        }
        Ok(())
    })
}

/// Lists image files under `root` (recursively, sorted), by extension.
pub fn list_images(root: &Path) -> Result<Vec<PathBuf>> {
    const EXT: [&str; 8] = ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"];
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(io_err(&d))? {
            let p = entry.map_err(io_err(&d))?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| EXT.contains(&e.to_ascii_lowercase().as_str()))
            {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic fake model: row = hash-like function of the file name; counts images; can fail once.
    struct Fake {
        calls: usize,
        images: usize,
        fail_at_image: Option<usize>,
    }

    impl Embedder for Fake {
        fn dim(&self) -> usize {
            3
        }
        fn embed(&mut self, paths: &[PathBuf]) -> Result<Vec<f32>> {
            self.calls += 1;
            if let Some(f) = self.fail_at_image {
                if self.images + paths.len() > f {
                    return Err(Error::embedder("simulated crash"));
                }
            }
            self.images += paths.len();
            Ok(paths
                .iter()
                .flat_map(|p| {
                    let n: usize = p.to_string_lossy().bytes().map(|b| b as usize).sum();
                    [1.0 + n as f32, (n % 7) as f32, 2.0]
                })
                .collect())
        }
    }

    fn paths(n: usize) -> Vec<PathBuf> {
        (0..n)
            .map(|i| PathBuf::from(format!("img/{i:04}.jpg")))
            .collect()
    }

    #[test]
    fn shards_resume_after_crash_without_recomputing() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("emb");
        let ps = paths(23);
        let cfg = EmbedConfig {
            shard_size: 5,
            batch_size: 2,
            normalize: true,
        };
        // Crash while computing shard 2 (images 10..15).
        let mut f = Fake {
            calls: 0,
            images: 0,
            fail_at_image: Some(12),
        };
        assert!(embed_pool(&mut f, &ps, &out, &cfg, &mut |_, _| {}).is_err());
        assert!(shard_path(&out, 1).exists() && !shard_path(&out, 2).exists());
        let mut g = Fake {
            calls: 0,
            images: 0,
            fail_at_image: None,
        };
        let r = embed_pool(&mut g, &ps, &out, &cfg, &mut |_, _| {}).unwrap();
        assert_eq!((r.skipped, r.computed, r.n_shards), (2, 3, 5));
        assert_eq!(
            g.images, 13,
            "only the 13 rows of unfinished shards are embedded"
        );
        // Identical to an uninterrupted run.
        let fresh = dir.path().join("fresh");
        let mut h = Fake {
            calls: 0,
            images: 0,
            fail_at_image: None,
        };
        embed_pool(&mut h, &ps, &fresh, &cfg, &mut |_, _| {}).unwrap();
        let a = load_shards(&out).unwrap();
        let b = load_shards(&fresh).unwrap();
        assert_eq!(a.as_slice(), b.as_slice());
        assert_eq!(a.rows(), 23);
        assert!(a.max_norm_deviation() < 1e-6);
        // Third run: nothing to do.
        let mut z = Fake {
            calls: 0,
            images: 0,
            fail_at_image: None,
        };
        let r = embed_pool(&mut z, &ps, &out, &cfg, &mut |_, _| {}).unwrap();
        assert_eq!((r.skipped, r.computed, z.calls), (5, 0, 0));
        // Merged file equals the shards; ids and paths map rows back to files.
        let merged = dir.path().join("all.npy");
        merge_shards(&out, &merged).unwrap();
        assert_eq!(Embeddings::open(&merged).unwrap().as_slice(), a.as_slice());
        assert_eq!(
            crate::store::read_paths(&out.join("paths.txt")).unwrap(),
            ps
        );
        let (ids, _) = npy::read_i64(&out.join("shard_00004.ids.npy")).unwrap();
        assert_eq!(ids, vec![20, 21, 22]);
        // A different pool in the same directory is refused.
        let mut w = Fake {
            calls: 0,
            images: 0,
            fail_at_image: None,
        };
        assert!(matches!(
            embed_pool(&mut w, &paths(24), &out, &cfg, &mut |_, _| {}),
            Err(Error::Resume { .. })
        ));
    }

    /// A model that returns NaN for one image.
    struct NanAt(&'static str);

    impl Embedder for NanAt {
        fn dim(&self) -> usize {
            2
        }
        fn embed(&mut self, paths: &[PathBuf]) -> Result<Vec<f32>> {
            Ok(paths
                .iter()
                .flat_map(|p| {
                    let bad = p.ends_with(self.0);
                    [1.0, if bad { f32::NAN } else { 0.5 }]
                })
                .collect())
        }
    }

    #[test]
    fn a_non_finite_embedding_stops_the_run_naming_the_image_and_keeps_finished_shards() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("emb");
        let cfg = EmbedConfig {
            shard_size: 4,
            batch_size: 3,
            normalize: true,
        };
        let err = embed_pool(
            &mut NanAt("0006.jpg"),
            &paths(10),
            &out,
            &cfg,
            &mut |_, _| {},
        )
        .unwrap_err();
        match &err {
            Error::NonFiniteEmbedding {
                image,
                row,
                col,
                value,
            } => {
                assert_eq!(
                    (image.to_str().unwrap(), *row, *col),
                    ("img/0006.jpg", 6, 1)
                );
                assert!(value.is_nan());
            }
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains("img/0006.jpg (row 6)"), "{err}");
        assert!(shard_path(&out, 0).exists() && !shard_path(&out, 1).exists());
    }
}
