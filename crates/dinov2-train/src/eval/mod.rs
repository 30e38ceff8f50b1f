//! Evaluation of frozen backbones, as the official `eval/` scripts: [`knn`] (weighted k-NN on L2-normalised class
//! tokens). [`write_metrics`] keeps the results of several evaluations in one JSON file.
pub mod knn;

use std::path::Path;

use crate::error::{Error, Result};

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
