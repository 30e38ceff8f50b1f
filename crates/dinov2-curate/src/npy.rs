//! Minimal `.npy` (NumPy format 1.0/2.0/3.0) reader and writer, enough for embedding matrices and id lists.
//!
//! Supported element types: little-endian `f4`, `f8`, `f2`, `i8`, `i4`, `u4`, `u8` (read) and `f4`, `f8`, `i8`
//! (write). C order only. Writes are atomic: the file is written under a temporary name in the same directory and
//! renamed into place, so a crash never leaves a half-written output.

use std::io::Write;
use std::path::Path;

use crate::error::{io_err, Error, Result};

const MAGIC: &[u8] = b"\x93NUMPY";

/// Element type of an `.npy` array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NpyDtype {
    /// `<f2`
    F16,
    /// `<f4`
    F32,
    /// `<f8`
    F64,
    /// `<i4`
    I32,
    /// `<i8`
    I64,
    /// `<u4`
    U32,
    /// `<u8`
    U64,
}

impl NpyDtype {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            NpyDtype::F16 => 2,
            NpyDtype::F32 | NpyDtype::I32 | NpyDtype::U32 => 4,
            NpyDtype::F64 | NpyDtype::I64 | NpyDtype::U64 => 8,
        }
    }

    fn descr(self) -> &'static str {
        match self {
            NpyDtype::F16 => "<f2",
            NpyDtype::F32 => "<f4",
            NpyDtype::F64 => "<f8",
            NpyDtype::I32 => "<i4",
            NpyDtype::I64 => "<i8",
            NpyDtype::U32 => "<u4",
            NpyDtype::U64 => "<u8",
        }
    }

    fn parse(descr: &str) -> Option<Self> {
        // '|' and '=' appear for single-byte or native types; we accept '<' (and '=' on little-endian hosts).
        let d = descr.trim();
        let (order, rest) = d.split_at_checked(1)?;
        if !(order == "<" || (order == "=" && cfg!(target_endian = "little"))) {
            return None;
        }
        Some(match rest {
            "f2" => NpyDtype::F16,
            "f4" => NpyDtype::F32,
            "f8" => NpyDtype::F64,
            "i4" => NpyDtype::I32,
            "i8" => NpyDtype::I64,
            "u4" => NpyDtype::U32,
            "u8" => NpyDtype::U64,
            _ => return None,
        })
    }
}

/// Parsed `.npy` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpyHeader {
    /// Element type.
    pub dtype: NpyDtype,
    /// Array shape (empty for a scalar).
    pub shape: Vec<usize>,
    /// Byte offset of the data from the start of the file.
    pub data_offset: usize,
}

impl NpyHeader {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::Npy {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Parses the header of an `.npy` file held in `bytes` (only the header part needs to be present).
pub fn parse_header(bytes: &[u8], path: &Path) -> Result<NpyHeader> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(bad(path, "not an .npy file (bad magic)"));
    }
    let major = bytes[6];
    let (hlen, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(bad(path, "truncated header"));
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12usize,
            )
        }
        v => return Err(bad(path, format!("unsupported format version {v}"))),
    };
    let end = start
        .checked_add(hlen)
        .ok_or_else(|| bad(path, "header length overflow"))?;
    if bytes.len() < end {
        return Err(bad(path, "truncated header"));
    }
    let text =
        std::str::from_utf8(&bytes[start..end]).map_err(|_| bad(path, "header is not text"))?;
    let descr = dict_value(text, "descr").ok_or_else(|| bad(path, "header has no 'descr'"))?;
    let descr = descr.trim().trim_matches(|c| c == '\'' || c == '"');
    let dtype =
        NpyDtype::parse(descr).ok_or_else(|| bad(path, format!("unsupported dtype {descr}")))?;
    let fortran = dict_value(text, "fortran_order")
        .ok_or_else(|| bad(path, "header has no 'fortran_order'"))?;
    if fortran.trim() != "False" {
        return Err(bad(path, "Fortran-ordered arrays are not supported"));
    }
    let shape_s = dict_value(text, "shape").ok_or_else(|| bad(path, "header has no 'shape'"))?;
    let inner = shape_s.trim().trim_start_matches('(').trim_end_matches(')');
    let mut shape = Vec::new();
    for part in inner.split(',') {
        let p = part.trim();
        if p.is_empty() {
            continue;
        }
        shape.push(
            p.parse::<usize>()
                .map_err(|_| bad(path, format!("bad shape {shape_s}")))?,
        );
    }
    // The byte size must fit in memory's address space: every later size computation relies on it.
    shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
        .and_then(|len| len.checked_add(end))
        .ok_or_else(|| bad(path, format!("shape {shape:?} is too large")))?;
    Ok(NpyHeader {
        dtype,
        shape,
        data_offset: end,
    })
}

/// Finds the raw text of `key`'s value in a Python dict literal (values here never contain nested dicts).
fn dict_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let pat_a = format!("'{key}'");
    let pat_b = format!("\"{key}\"");
    let pos = text
        .find(&pat_a)
        .map(|p| p + pat_a.len())
        .or_else(|| text.find(&pat_b).map(|p| p + pat_b.len()))?;
    let rest = text[pos..].trim_start().strip_prefix(':')?.trim_start();
    if rest.starts_with('(') {
        let close = rest.find(')')?;
        return Some(&rest[..=close]);
    }
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Some(&rest[..end])
}

/// Reads the header of the `.npy` file at `path`.
pub fn read_header(path: &Path) -> Result<NpyHeader> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut buf = vec![0u8; 10];
    f.read_exact(&mut buf)
        .map_err(|_| bad(path, "not an .npy file (shorter than its magic)"))?;
    if &buf[..6] != MAGIC {
        return Err(bad(path, "not an .npy file (bad magic)"));
    }
    let end = match buf[6] {
        1 => u16::from_le_bytes([buf[8], buf[9]]) as usize + 10,
        2 | 3 => {
            buf.resize(12, 0);
            f.read_exact(&mut buf[10..])
                .map_err(|_| bad(path, "truncated header"))?;
            u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize + 12
        }
        v => return Err(bad(path, format!("unsupported format version {v}"))),
    };
    if end > (1 << 24) {
        return Err(bad(path, "header longer than 16 MiB"));
    }
    let have = buf.len();
    buf.resize(end, 0);
    f.read_exact(&mut buf[have..])
        .map_err(|_| bad(path, "truncated header"))?;
    parse_header(&buf, path)
}

/// Decodes little-endian elements of `dtype` from `data` into f32.
pub(crate) fn decode_f32(data: &[u8], dtype: NpyDtype, path: &Path) -> Result<Vec<f32>> {
    Ok(match dtype {
        NpyDtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        NpyDtype::F64 => data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        NpyDtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(bad(
                path,
                format!("expected a float array, found {other:?}"),
            ))
        }
    })
}

/// Decodes little-endian integer elements into i64.
fn decode_i64(data: &[u8], dtype: NpyDtype, path: &Path) -> Result<Vec<i64>> {
    Ok(match dtype {
        NpyDtype::I64 => data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect(),
        NpyDtype::U64 => {
            let mut v = Vec::with_capacity(data.len() / 8);
            for c in data.chunks_exact(8) {
                let x = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
                v.push(i64::try_from(x).map_err(|_| bad(path, "u64 value does not fit in i64"))?);
            }
            v
        }
        NpyDtype::I32 => data
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
            .collect(),
        NpyDtype::U32 => data
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
            .collect(),
        other => {
            return Err(bad(
                path,
                format!("expected an integer array, found {other:?}"),
            ))
        }
    })
}

fn read_all(path: &Path) -> Result<(NpyHeader, Vec<u8>)> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let h = parse_header(&bytes, path)?;
    let need = h
        .numel()
        .checked_mul(h.dtype.size())
        .ok_or_else(|| bad(path, "size overflow"))?;
    if h.data_offset
        .checked_add(need)
        .is_none_or(|end| bytes.len() < end)
    {
        return Err(bad(
            path,
            format!(
                "file holds {} data bytes, shape needs {need}",
                bytes.len() - h.data_offset
            ),
        ));
    }
    Ok((h, bytes))
}

/// Reads a float array (f32/f64/f16) as f32, returning data and shape.
pub fn read_f32(path: &Path) -> Result<(Vec<f32>, Vec<usize>)> {
    let (h, bytes) = read_all(path)?;
    let need = h.numel() * h.dtype.size();
    let v = decode_f32(&bytes[h.data_offset..h.data_offset + need], h.dtype, path)?;
    Ok((v, h.shape))
}

/// Reads an integer array (i64/i32/u32/u64) as i64, returning data and shape.
pub fn read_i64(path: &Path) -> Result<(Vec<i64>, Vec<usize>)> {
    let (h, bytes) = read_all(path)?;
    let need = h.numel() * h.dtype.size();
    let v = decode_i64(&bytes[h.data_offset..h.data_offset + need], h.dtype, path)?;
    Ok((v, h.shape))
}

/// Builds a version-1.0 header (64-byte aligned, as NumPy writes it).
pub fn header_bytes(dtype: NpyDtype, shape: &[usize]) -> Vec<u8> {
    let shape_s = match shape.len() {
        0 => "()".to_string(),
        1 => format!("({},)", shape[0]),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut dict = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {}, }}",
        dtype.descr(),
        shape_s
    );
    let total = 10 + dict.len() + 1;
    let pad = (64 - total % 64) % 64;
    dict.push_str(&" ".repeat(pad));
    dict.push('\n');
    let mut out = Vec::with_capacity(10 + dict.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}

/// Writes `path` atomically: `fill` writes the content to a temporary file in the same directory, which is then
/// flushed, synced and renamed over `path`.
pub fn atomic_write<F>(path: &Path, fill: F) -> Result<()>
where
    F: FnOnce(&mut dyn Write) -> std::io::Result<()>,
{
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    // Unique per process and per call, so that concurrent writers of one path (ranks of a sharded run, threads)
    // never share a temporary file; the last rename wins, and every rename installs a complete file.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp{}.{call}", std::process::id()));
    let res = (|| -> std::io::Result<()> {
        let f = std::fs::File::create(&tmp)?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        fill(&mut w)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.map_err(io_err(path))
}

fn write_elems<T: Copy, const N: usize>(
    path: &Path,
    dtype: NpyDtype,
    shape: &[usize],
    data: &[T],
    to_le: fn(T) -> [u8; N],
) -> Result<()> {
    let n: usize = shape.iter().product();
    if n != data.len() {
        return Err(Error::Shape {
            op: "npy write",
            reason: format!(
                "shape {shape:?} holds {n} elements, the data has {}",
                data.len()
            ),
        });
    }
    let header = header_bytes(dtype, shape);
    atomic_write(path, |w| {
        w.write_all(&header)?;
        let mut buf = Vec::with_capacity(N * 8192);
        for chunk in data.chunks(8192) {
            buf.clear();
            for &x in chunk {
                buf.extend_from_slice(&to_le(x));
            }
            w.write_all(&buf)?;
        }
        Ok(())
    })
}

/// Writes an f32 array.
pub fn write_f32(path: &Path, data: &[f32], shape: &[usize]) -> Result<()> {
    write_elems(path, NpyDtype::F32, shape, data, f32::to_le_bytes)
}

/// Writes an f64 array.
pub fn write_f64(path: &Path, data: &[f64], shape: &[usize]) -> Result<()> {
    write_elems(path, NpyDtype::F64, shape, data, f64::to_le_bytes)
}

/// Writes an i64 array.
pub fn write_i64(path: &Path, data: &[i64], shape: &[usize]) -> Result<()> {
    write_elems(path, NpyDtype::I64, shape, data, i64::to_le_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dtype_starting_with_a_multibyte_character_is_an_error() {
        // Found by the fuzzer: the byte-order character was split off as the first *byte*.
        let mut h = b"\x93NUMPY\x01\x00".to_vec();
        let dict = "{'descr': '\u{d9}8', 'fortran_order': False, 'shape': (1,), }\n";
        h.extend_from_slice(&(dict.len() as u16).to_le_bytes());
        h.extend_from_slice(dict.as_bytes());
        let e = parse_header(&h, Path::new("x.npy")).unwrap_err();
        assert!(e.to_string().contains("unsupported dtype"), "{e}");
    }

    #[test]
    fn roundtrip_f32_i64() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.npy");
        let data: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 1.0).collect();
        write_f32(&p, &data, &[3, 4]).unwrap();
        let (back, shape) = read_f32(&p).unwrap();
        assert_eq!(shape, vec![3, 4]);
        assert_eq!(back, data);
        let h = read_header(&p).unwrap();
        assert_eq!(h.data_offset % 64, 0);
        let q = dir.path().join("b.npy");
        write_i64(&q, &[5, -1, 7], &[3]).unwrap();
        let (ids, shape) = read_i64(&q).unwrap();
        assert_eq!((ids, shape), (vec![5, -1, 7], vec![3]));
    }

    fn raw_header(text: &str) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&[1, 0]);
        b.extend_from_slice(&(text.len() as u16).to_le_bytes());
        b.extend_from_slice(text.as_bytes());
        b
    }

    #[test]
    fn rejects_garbage_and_fortran() {
        let p = Path::new("x.npy");
        assert!(parse_header(b"hello world, not npy", p).is_err());
        let h = raw_header("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }");
        assert!(parse_header(&h, p).is_err());
        let h = raw_header("{'descr': '>f4', 'fortran_order': False, 'shape': (2, 2), }");
        assert!(parse_header(&h, p).is_err());
    }

    #[test]
    fn parses_numpy_style_headers() {
        let b = raw_header("{'descr': '<f8', 'fortran_order': False, 'shape': (7,), }");
        let h = parse_header(&b, Path::new("y")).unwrap();
        assert_eq!(h.dtype, NpyDtype::F64);
        assert_eq!(h.shape, vec![7]);
    }
}
