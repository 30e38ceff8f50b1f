//! Embedding store: memory-mapped (or owned) row-major f32 matrices read from `.npy` or safetensors files,
//! L2 normalisation, row subsets, and row-id to file-path maps.

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::error::{invalid, io_err, Error, Result};
use crate::npy;

enum Storage {
    Owned(Vec<f32>),
    Mapped { map: memmap2::Mmap, offset: usize },
}

/// A row-major `rows x dim` f32 matrix of embeddings, owned or memory-mapped (zero-copy).
pub struct Embeddings {
    rows: usize,
    dim: usize,
    storage: Storage,
}

impl std::fmt::Debug for Embeddings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embeddings")
            .field("rows", &self.rows)
            .field("dim", &self.dim)
            .field("mapped", &self.is_mapped())
            .finish()
    }
}

fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let f = std::fs::File::open(path).map_err(io_err(path))?;
    // SAFETY: the mapping is read-only; like every mmap-based reader (numpy's mmap_mode="r" included) we rely on
    // the file not being truncated or rewritten by another process while it is open. All our own writers replace
    // files by rename, which leaves existing mappings intact.
    unsafe { memmap2::Mmap::map(&f) }.map_err(io_err(path))
}

impl Embeddings {
    /// Wraps an owned row-major buffer.
    ///
    /// ```
    /// let e = dinov2_curate::store::Embeddings::from_vec(vec![3.0, 4.0, 1.0, 0.0], 2, 2).unwrap();
    /// let n = e.normalized();
    /// assert_eq!(n.row(0), &[0.6, 0.8]);
    /// ```
    pub fn from_vec(data: Vec<f32>, rows: usize, dim: usize) -> Result<Self> {
        Self::from_vec_of(data, rows, dim, None)
    }

    /// [`Embeddings::from_vec`] for data read from `path` (named by the non-finite check).
    fn from_vec_of(data: Vec<f32>, rows: usize, dim: usize, path: Option<&Path>) -> Result<Self> {
        if rows.checked_mul(dim) != Some(data.len()) || dim == 0 {
            return Err(Error::Shape {
                op: "embeddings",
                reason: format!("{} values do not form {rows} x {dim}", data.len()),
            });
        }
        check_finite(&data, dim, path)?;
        Ok(Self {
            rows,
            dim,
            storage: Storage::Owned(data),
        })
    }

    /// Opens `.npy` (2-D float) or `.safetensors` (the tensor named `embeddings`, or the only tensor) by extension.
    /// `<f4` npy files and F32 safetensors tensors are memory-mapped; other float types are converted into memory.
    pub fn open(path: &Path) -> Result<Self> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("safetensors") => Self::open_safetensors(path, None),
            _ => Self::open_npy(path),
        }
    }

    /// Rank `rank`'s contiguous share ([`dinov2_dist::shard_range`]) of the rows of a matrix file, and the file's
    /// number of rows. For a `<f4` `.npy` only these rows are mapped, read and checked for NaN/inf (a row named
    /// in an error is the file's row number), so a rank touches nothing but its share; other files are opened
    /// whole ([`Embeddings::open`]) and the share copied.
    ///
    /// ```
    /// use dinov2_curate::store::Embeddings;
    /// let dir = tempfile::tempdir()?;
    /// let p = dir.path().join("x.npy");
    /// Embeddings::from_vec((0..10).map(|v| v as f32).collect(), 5, 2)?.save_npy(&p)?;
    /// let (part, n) = Embeddings::open_shard(&p, 2, 1)?;
    /// assert_eq!((n, part.rows(), part.as_slice()), (5, 2, &[6.0, 7.0, 8.0, 9.0][..]));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open_shard(path: &Path, world: usize, rank: usize) -> Result<(Self, usize)> {
        let is_npy = path.extension().and_then(|e| e.to_str()) != Some("safetensors");
        if is_npy {
            let h = npy::read_header(path)?;
            if let (&[rows, dim], npy::NpyDtype::F32) = (&h.shape[..], h.dtype) {
                if dim > 0 && cfg!(target_endian = "little") && h.data_offset % 4 == 0 {
                    let map = map_file(path)?;
                    if map.len() < h.data_offset + rows * dim * 4 {
                        return Err(Error::Npy {
                            path: path.into(),
                            reason: "file shorter than its shape (truncated?)".into(),
                        });
                    }
                    let r = dinov2_dist::shard_range(rows, world, rank);
                    let e = Self {
                        rows: r.len(),
                        dim,
                        storage: Storage::Mapped {
                            map,
                            offset: h.data_offset + r.start * dim * 4,
                        },
                    };
                    check_finite(e.as_slice(), dim, Some(path)).map_err(|err| match err {
                        Error::NonFinite {
                            path,
                            row,
                            col,
                            value,
                            rows: bad,
                            ..
                        } => Error::NonFinite {
                            path,
                            row: row + r.start,
                            col,
                            value,
                            rows: bad,
                            total: rows,
                        },
                        other => other,
                    })?;
                    return Ok((e, rows));
                }
            }
        }
        let all = Self::open(path)?;
        let r = dinov2_dist::shard_range(all.rows(), world, rank);
        let part = all.row_range(r.start, r.end)?.to_vec();
        Ok((Self::from_vec(part, r.len(), all.dim())?, all.rows()))
    }

    /// Opens a 2-D `.npy` float matrix (memory-mapped when it is little-endian f32).
    pub fn open_npy(path: &Path) -> Result<Self> {
        let h = npy::read_header(path)?;
        if h.shape.len() != 2 {
            return Err(Error::Npy {
                path: path.into(),
                reason: format!("expected a 2-D matrix, found shape {:?}", h.shape),
            });
        }
        let (rows, dim) = (h.shape[0], h.shape[1]);
        if dim == 0 {
            return Err(Error::Npy {
                path: path.into(),
                reason: "zero columns".into(),
            });
        }
        let map = map_file(path)?;
        // parse_header checked that the byte size and its end fit in usize.
        let need = rows * dim * h.dtype.size();
        if map.len() < h.data_offset + need {
            return Err(Error::Npy {
                path: path.into(),
                reason: "file shorter than its shape (truncated?)".into(),
            });
        }
        if h.dtype == npy::NpyDtype::F32 && cfg!(target_endian = "little") && h.data_offset % 4 == 0
        {
            let e = Self {
                rows,
                dim,
                storage: Storage::Mapped {
                    map,
                    offset: h.data_offset,
                },
            };
            check_finite(e.as_slice(), dim, Some(path))?;
            return Ok(e);
        }
        let data = npy::decode_f32(&map[h.data_offset..h.data_offset + need], h.dtype, path)?;
        Self::from_vec_of(data, rows, dim, Some(path))
    }

    /// Opens a 2-D tensor of a safetensors file: `name`, else `embeddings`, else the only tensor.
    pub fn open_safetensors(path: &Path, name: Option<&str>) -> Result<Self> {
        let map = map_file(path)?;
        let bad = |reason: String| Error::Safetensors {
            path: path.into(),
            reason,
        };
        let st = safetensors::SafeTensors::deserialize(&map).map_err(|e| bad(e.to_string()))?;
        let names = st.names();
        let chosen = match name {
            Some(n) => n.to_string(),
            None if names.contains(&"embeddings") => "embeddings".to_string(),
            None if names.len() == 1 => names[0].to_string(),
            None => return Err(bad(format!("several tensors {names:?}; name one"))),
        };
        let view = st.tensor(&chosen).map_err(|e| bad(e.to_string()))?;
        let shape = view.shape().to_vec();
        if shape.len() != 2 || shape[1] == 0 {
            return Err(bad(format!(
                "tensor {chosen} has shape {shape:?}, expected 2-D"
            )));
        }
        let (rows, dim) = (shape[0], shape[1]);
        let bytes = view.data();
        let offset = bytes.as_ptr() as usize - map.as_ptr() as usize;
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => npy::NpyDtype::F32,
            safetensors::Dtype::F64 => npy::NpyDtype::F64,
            safetensors::Dtype::F16 => npy::NpyDtype::F16,
            safetensors::Dtype::BF16 => {
                let data = bytes
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect();
                return Self::from_vec_of(data, rows, dim, Some(path));
            }
            d => return Err(bad(format!("unsupported dtype {d:?}"))),
        };
        if dtype == npy::NpyDtype::F32 && cfg!(target_endian = "little") && offset % 4 == 0 {
            drop(st);
            let e = Self {
                rows,
                dim,
                storage: Storage::Mapped { map, offset },
            };
            check_finite(e.as_slice(), dim, Some(path))?;
            return Ok(e);
        }
        let data = npy::decode_f32(bytes, dtype, path)?;
        Self::from_vec_of(data, rows, dim, Some(path))
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (embedding dimension).
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Whether the data is memory-mapped from a file.
    pub fn is_mapped(&self) -> bool {
        matches!(self.storage, Storage::Mapped { .. })
    }

    /// The whole matrix, row-major.
    pub fn as_slice(&self) -> &[f32] {
        match &self.storage {
            Storage::Owned(v) => v,
            Storage::Mapped { map, offset } => {
                let bytes = &map[*offset..*offset + self.rows * self.dim * 4];
                // Alignment and length were checked when the mapping was created.
                bytemuck::try_cast_slice(bytes).unwrap_or(&[])
            }
        }
    }

    /// Row `i` (panics if out of range, like slice indexing).
    pub fn row(&self, i: usize) -> &[f32] {
        &self.as_slice()[i * self.dim..(i + 1) * self.dim]
    }

    /// Rows `start..end` as one contiguous slice (the unit of work of a shard/worker).
    pub fn row_range(&self, start: usize, end: usize) -> Result<&[f32]> {
        if start > end || end > self.rows {
            return Err(invalid(
                "rows",
                format!("row range {start}..{end} is not inside 0..{}", self.rows),
            ));
        }
        Ok(&self.as_slice()[start * self.dim..end * self.dim])
    }

    /// An owned, L2-normalised copy (rows of norm zero stay zero).
    pub fn normalized(&self) -> Embeddings {
        let mut v = self.as_slice().to_vec();
        l2_normalize_rows(&mut v, self.dim);
        Embeddings {
            rows: self.rows,
            dim: self.dim,
            storage: Storage::Owned(v),
        }
    }

    /// Largest `| ||row|| - 1 |` over all rows.
    pub fn max_norm_deviation(&self) -> f32 {
        self.as_slice()
            .par_chunks(self.dim)
            .map(|r| (r.iter().map(|x| x * x).sum::<f32>().sqrt() - 1.0).abs())
            .reduce(|| 0.0, f32::max)
    }

    /// Returns itself if every row already has unit norm (within `1e-3`), else an owned normalised copy.
    pub fn into_normalized(self) -> Embeddings {
        if self.rows == 0 || self.max_norm_deviation() <= 1e-3 {
            self
        } else {
            self.normalized()
        }
    }

    /// An owned copy of the rows `ids` (in that order); an id outside the matrix is an
    /// [`Error::RowOutOfRange`] (without a path: the caller knows where the ids came from).
    pub fn select(&self, ids: &[i64]) -> Result<Embeddings> {
        let mut v = Vec::with_capacity(ids.len() * self.dim);
        for &id in ids {
            let i = usize::try_from(id).ok().filter(|&i| i < self.rows).ok_or(
                Error::RowOutOfRange {
                    row: id,
                    rows: self.rows,
                    path: None,
                },
            )?;
            v.extend_from_slice(self.row(i));
        }
        Embeddings::from_vec(v, ids.len(), self.dim)
    }

    /// Writes the matrix as an f32 `.npy` file (atomically).
    pub fn save_npy(&self, path: &Path) -> Result<()> {
        npy::write_f32(path, self.as_slice(), &[self.rows, self.dim])
    }
}

/// L2-normalises each `dim`-long row of `data` in place (zero rows stay zero).
pub fn l2_normalize_rows(data: &mut [f32], dim: usize) {
    data.par_chunks_mut(dim.max(1)).for_each(|r| {
        let n = r
            .iter()
            .map(|&x| (x as f64) * (x as f64))
            .sum::<f64>()
            .sqrt();
        if n > 0.0 {
            let inv = (1.0 / n) as f32;
            r.iter_mut().for_each(|x| *x *= inv);
        }
    });
}

/// Reads a row-id to path map: a text file with one path per line (line `i` = row `i`).
pub fn read_paths(path: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    Ok(text
        .lines()
        .filter(|l| !l.is_empty())
        .map(PathBuf::from)
        .collect())
}

/// Refuses a row-major buffer with a NaN or an infinity ([`Error::NonFinite`], naming `path`, the first bad row
/// and column, and how many rows are bad). One parallel pass over the data.
///
/// ```
/// use dinov2_curate::{store::check_finite, Error};
/// assert!(check_finite(&[1.0, 0.0, 0.5, 0.5], 2, None).is_ok());
/// let e = check_finite(&[1.0, 0.0, 0.5, f32::NAN, f32::INFINITY, 0.0], 2, None).unwrap_err();
/// assert!(matches!(e, Error::NonFinite { row: 1, col: 1, rows: 2, total: 3, .. }));
/// assert!(e.to_string().starts_with("embeddings: row 1 is not finite (NaN in column 1); 2 of 3 rows"));
/// ```
pub fn check_finite(data: &[f32], dim: usize, path: Option<&Path>) -> Result<()> {
    if dim == 0 {
        return Ok(());
    }
    const ROWS_PER_TASK: usize = 4096;
    // (first bad row, its column, value, bad rows) per task; the fast path is one vectorised all().
    let per_task: Vec<(usize, usize, f32, usize)> = data
        .par_chunks(dim * ROWS_PER_TASK)
        .enumerate()
        .filter(|(_, c)| !c.iter().fold(true, |ok, x| ok & x.is_finite()))
        .map(|(t, c)| {
            let mut first = None;
            let mut bad = 0;
            for (r, row) in c.chunks(dim).enumerate() {
                if let Some(col) = row.iter().position(|x| !x.is_finite()) {
                    bad += 1;
                    first.get_or_insert((t * ROWS_PER_TASK + r, col, row[col]));
                }
            }
            let (row, col, value) = first.expect("a task with a non-finite value");
            (row, col, value, bad)
        })
        .collect();
    match per_task.first() {
        None => Ok(()),
        Some(&(row, col, value, _)) => Err(Error::NonFinite {
            path: path.map(Path::to_path_buf),
            row,
            col,
            value,
            rows: per_task.iter().map(|t| t.3).sum(),
            total: data.len() / dim,
        }),
    }
}

/// Writes a row-id to path map (one path per line), atomically.
pub fn write_paths(path: &Path, paths: &[PathBuf]) -> Result<()> {
    npy::atomic_write(path, |w| {
        for p in paths {
            writeln!(w, "{}", p.display())?;
        }
        Ok(())
    })
}

/// Reads a 1-D id list (`.npy` of integers), e.g. a `keep.npy` used as a row subset.
pub fn read_ids(path: &Path) -> Result<Vec<i64>> {
    let (v, shape) = npy::read_i64(path)?;
    if shape.len() != 1 {
        return Err(Error::Npy {
            path: path.into(),
            reason: format!("expected 1-D ids, found shape {shape:?}"),
        });
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_is_mapped_and_matches() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e.npy");
        let data: Vec<f32> = (0..30).map(|i| (i as f32).sin()).collect();
        npy::write_f32(&p, &data, &[10, 3]).unwrap();
        let e = Embeddings::open(&p).unwrap();
        assert!(e.is_mapped());
        assert_eq!((e.rows(), e.dim()), (10, 3));
        assert_eq!(e.as_slice(), &data[..]);
        let n = e.normalized();
        for i in 0..10 {
            let r = n.row(i);
            let norm: f32 = r.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-6);
            let o = e.row(i);
            let on: f32 = o.iter().map(|x| x * x).sum::<f32>().sqrt();
            for j in 0..3 {
                assert!((r[j] - o[j] / on).abs() < 1e-6);
            }
        }
        let s = e.select(&[3, 1]).unwrap();
        assert_eq!(s.row(0), e.row(3));
        assert_eq!(s.row(1), e.row(1));
        assert!(e.select(&[10]).is_err());
    }

    #[test]
    fn safetensors_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e.safetensors");
        let data: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4, 3], &bytes)
                .unwrap();
        safetensors::serialize_to_file(vec![("embeddings", view)], None, &p).unwrap();
        let e = Embeddings::open(&p).unwrap();
        assert_eq!((e.rows(), e.dim()), (4, 3));
        assert_eq!(e.as_slice(), &data[..]);
    }

    #[test]
    fn non_finite_embeddings_are_refused_at_every_entry_naming_file_and_row() {
        let dir = tempfile::tempdir().unwrap();
        let (rows, dim) = (9000, 3); // more than one parallel task
        let mut v: Vec<f32> = (0..rows * dim).map(|i| (i % 7) as f32 + 1.0).collect();
        v[5000 * dim + 2] = f32::NAN;
        v[8000 * dim] = f32::NEG_INFINITY;
        let check = |r: Result<Embeddings>, path: Option<&Path>| match r {
            Err(Error::NonFinite {
                path: p,
                row,
                col,
                rows: bad,
                total,
                ..
            }) => {
                assert_eq!(
                    (p.as_deref(), row, col, bad, total),
                    (path, 5000, 2, 2, rows)
                );
            }
            other => panic!("{other:?}"),
        };
        check(Embeddings::from_vec(v.clone(), rows, dim), None);
        // f32 (memory-mapped), f64 and f16 .npy files.
        let p = dir.path().join("e.npy");
        npy::write_f32(&p, &v, &[rows, dim]).unwrap();
        check(Embeddings::open(&p), Some(&p));
        let p64 = dir.path().join("e64.npy");
        let v64: Vec<f64> = v.iter().map(|&x| f64::from(x)).collect();
        npy::write_f64(&p64, &v64, &[rows, dim]).unwrap();
        check(Embeddings::open(&p64), Some(&p64));
        // safetensors, f32 (mapped) and bf16 (converted).
        for dtype in [safetensors::Dtype::F32, safetensors::Dtype::BF16] {
            let bytes: Vec<u8> = match dtype {
                safetensors::Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                _ => v
                    .iter()
                    .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                    .collect(),
            };
            let view =
                safetensors::tensor::TensorView::new(dtype, vec![rows, dim], &bytes).unwrap();
            let ps = dir.path().join(format!("e_{dtype:?}.safetensors"));
            safetensors::serialize_to_file([("embeddings", view)], None, &ps).unwrap();
            check(Embeddings::open(&ps), Some(&ps));
        }
        let msg = Embeddings::open(&p).unwrap_err().to_string();
        assert!(
            msg.contains("e.npy: row 5000 is not finite (NaN in column 2); 2 of 9000 rows"),
            "{msg}"
        );
        // Finite data still opens, mapped.
        v[5000 * dim + 2] = 0.0;
        v[8000 * dim] = 0.0;
        npy::write_f32(&p, &v, &[rows, dim]).unwrap();
        assert!(Embeddings::open(&p).unwrap().is_mapped());
    }
}
