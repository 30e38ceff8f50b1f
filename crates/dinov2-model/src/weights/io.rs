//! Low-level file access: sniffing the container, reading `.safetensors` and zip `.pth` files, atomic writes.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use candle_core::safetensors::Load;
use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// Largest safetensors header we accept (the format's own limit is 100 MB).
const MAX_HEADER: u64 = 100_000_000;

/// What a file holds, judged by its first bytes (never by its extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Container {
    Safetensors,
    /// A zip archive: `torch.save` since torch 1.6.
    Zip,
    /// A bare pickle: `torch.save(..., _use_new_zipfile_serialization=False)` or torch < 1.6.
    LegacyPickle,
}

pub(crate) fn format_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

pub(crate) fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads the first bytes of `path` and says which container it is.
pub(crate) fn sniff(path: &Path) -> Result<Container> {
    let mut f = File::open(path).map_err(|e| io_err(path, e))?;
    let len = f.metadata().map_err(|e| io_err(path, e))?.len();
    let mut head = [0u8; 9];
    let n = read_up_to(&mut f, &mut head).map_err(|e| io_err(path, e))?;
    let head = &head[..n];
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        return Ok(Container::Zip);
    }
    if n == 9 {
        let hlen = u64::from_le_bytes([
            head[0], head[1], head[2], head[3], head[4], head[5], head[6], head[7],
        ]);
        if head[8] == b'{' && (2..=MAX_HEADER).contains(&hlen) {
            if hlen > len - 8 {
                return Err(format_err(
                    path,
                    format!(
                        "truncated safetensors file: the header alone needs {} bytes but the file has {len}",
                        hlen + 8
                    ),
                ));
            }
            return Ok(Container::Safetensors);
        }
    }
    if n >= 2 && head[0] == 0x80 && (2..=5).contains(&head[1]) {
        return Ok(Container::LegacyPickle);
    }
    let what = if n == 0 {
        "the file is empty".to_string()
    } else if head.first() == Some(&b'{') {
        "it looks like a JSON file, not a weights file".to_string()
    } else {
        "neither a safetensors file nor a PyTorch (zip) checkpoint".to_string()
    };
    Err(format_err(path, what))
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match f.read(&mut buf[filled..])? {
            0 => break,
            k => filled += k,
        }
    }
    Ok(filled)
}

/// A safetensors file's tensors and its `__metadata__` string map.
pub(crate) struct SafetensorsFile {
    pub(crate) tensors: Vec<(String, Tensor)>,
    pub(crate) metadata: HashMap<String, String>,
}

/// An open safetensors file after its header: the file (positioned at the tensor data), its length, the header's
/// length and the parsed header.
struct Header {
    file: File,
    len: u64,
    hlen: u64,
    meta: safetensors::tensor::Metadata,
}

fn truncated(path: &Path, what: &str) -> Error {
    format_err(path, format!("truncated safetensors file ({what})"))
}

/// Opens a safetensors file and reads its header (bounded by the file's length and [`MAX_HEADER`]).
fn read_header(path: &Path) -> Result<Header> {
    let mut file = File::open(path).map_err(|e| io_err(path, e))?;
    let len = file.metadata().map_err(|e| io_err(path, e))?.len();
    let mut n8 = [0u8; 8];
    file.read_exact(&mut n8)
        .map_err(|_| truncated(path, "no header"))?;
    let hlen = u64::from_le_bytes(n8);
    if hlen > MAX_HEADER || hlen > len.saturating_sub(8) {
        return Err(truncated(path, "header longer than the file"));
    }
    let mut header = vec![0u8; hlen as usize];
    file.read_exact(&mut header)
        .map_err(|_| truncated(path, "short header"))?;
    let meta = serde_json::from_slice(&header)
        .map_err(|e| format_err(path, format!("invalid safetensors header: {e}")))?;
    Ok(Header {
        file,
        len,
        hlen,
        meta,
    })
}

/// The `__metadata__` string map of a safetensors file, from its header alone.
pub(crate) fn read_safetensors_metadata(path: &Path) -> Result<HashMap<String, String>> {
    Ok(read_header(path)?
        .meta
        .metadata()
        .clone()
        .unwrap_or_default())
}

/// Reads every tensor of a safetensors file one at a time (peak memory: the tensors, not the file twice).
pub(crate) fn read_safetensors(path: &Path) -> Result<SafetensorsFile> {
    let Header {
        file: mut f,
        len,
        hlen,
        meta,
    } = read_header(path)?;
    let truncated = |what: &str| truncated(path, what);
    let data_start = 8 + hlen;
    let data_len = meta.data_len() as u64;
    if data_start + data_len > len {
        return Err(format_err(
            path,
            format!(
                "truncated safetensors file: the header describes {data_len} bytes of tensor data but only {} follow it",
                len - data_start
            ),
        ));
    }
    let mut out = Vec::new();
    for name in meta.offset_keys() {
        let Some(info) = meta.info(&name) else {
            continue;
        };
        let (s, e) = info.data_offsets;
        let mut buf = vec![0u8; e - s];
        f.seek(SeekFrom::Start(data_start + s as u64))
            .map_err(|e| io_err(path, e))?;
        f.read_exact(&mut buf)
            .map_err(|_| truncated("short tensor data"))?;
        let view = safetensors::tensor::TensorView::new(info.dtype, info.shape.clone(), &buf)
            .map_err(|e| format_err(path, format!("tensor `{name}`: {e}")))?;
        let t = view
            .load(&Device::Cpu)
            .map_err(|e| format_err(path, format!("tensor `{name}`: {e}")))?;
        out.push((name, t));
    }
    Ok(SafetensorsFile {
        tensors: out,
        metadata: meta.metadata().clone().unwrap_or_default(),
    })
}

/// Reads the tensors of a zip `.pth` file, from the top-level entry `key` (or the top-level dict itself), with
/// this crate's bounded pickle reader ([`super::pth`]).
pub(crate) fn read_pth(path: &Path, key: Option<&str>) -> Result<Vec<(String, Tensor)>> {
    super::pth::read(path, key)
}

/// Writes `path` atomically: the bytes go to a temporary file in the same directory, which is synced and then
/// renamed over `path`. On error the temporary file is removed and `path` is untouched.
pub(crate) fn atomic_write<F>(path: &Path, write: F) -> Result<()>
where
    F: FnOnce(&Path) -> Result<()>,
{
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid("path", format!("{} is not a file path", path.display())))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{nanos}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = write(&tmp).and_then(|()| {
        let f = File::open(&tmp).map_err(|e| io_err(&tmp, e))?;
        f.sync_all().map_err(|e| io_err(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Sorted tensor names of a zip `.pth` file under `key` (parses the pickle only, reads no tensor data).
pub(crate) fn pth_tensor_names(path: &Path, key: Option<&str>) -> Result<Vec<String>> {
    let mut names = super::pth::tensor_names(path, key)?;
    names.sort();
    Ok(names)
}

/// Atomic write of raw bytes.
pub(crate) fn atomic_write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    atomic_write(path, |tmp| {
        let mut f = File::create(tmp).map_err(|e| io_err(tmp, e))?;
        f.write_all(bytes).map_err(|e| io_err(tmp, e))
    })
}

/// Atomic safetensors write with `{"format": "pt"}` metadata (what `transformers` expects) plus `extra_metadata`.
pub(crate) fn write_safetensors(
    path: &Path,
    tensors: Vec<(String, Tensor)>,
    extra_metadata: Vec<(String, String)>,
) -> Result<()> {
    let mut tensors = tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.contiguous()?)))
        .collect::<Result<Vec<_>>>()?;
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut meta: HashMap<String, String> = extra_metadata.into_iter().collect();
    meta.insert("format".to_string(), "pt".to_string());
    atomic_write(path, |tmp| {
        safetensors::serialize_to_file(tensors.iter().map(|(k, t)| (k, t)), Some(meta), tmp)
            .map_err(|e| format_err(tmp, format!("cannot write safetensors: {e}")))
    })
}
