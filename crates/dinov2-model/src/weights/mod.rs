//! Weight formats: every published DINOv2 checkpoint layout → one canonical [`StateDict`].
//!
//! [`load_weights`] reads a file or a directory, recognises the layout **by its keys** (never by the file
//! extension alone), converts it to the official facebookresearch/dinov2 names, checks every tensor's shape,
//! and infers the [`VitConfig`] from the tensors:
//!
//! | layout | recognised by | conversion |
//! |---|---|---|
//! | official (`.pth` / `.safetensors`) | `cls_token` + `mask_token` | none |
//! | Hugging Face `transformers` | `embeddings.cls_token` (optionally under `dinov2.` / `dinov2_with_registers.`) | q/k/v fused in order into `qkv`, `layer_scale1.lambda1` → `ls1.gamma`, `weights_in/out` → `mlp.w12/w3`, `layernorm` → `norm`, ... |
//! | timm | official names without `mask_token`, or `reg_token` | `reg_token` → `register_tokens`; a class-less `pos_embed` gets a zero class row (timm folded `pos_embed[0]` into `cls_token`, and only the sum matters); packed SwiGLU `mlp.fc1/fc2` → `mlp.w12/w3` |
//! | training checkpoint | top-level `teacher`/`student`/`model` entry, `backbone.`/`module.` prefixes, or chunked `blocks.{chunk}.{i}.` | prefixes stripped, `blocks.{chunk}.{i}.` → `blocks.{i}.` |
//!
//! Tensors that are not part of the backbone (a `transformers` `classifier.*`, `dino_head.*`, `ibot_head.*`,
//! timm `head.*`) are returned in [`LoadedWeights::extra`] under their original names.
//!
//! The reverse direction: [`save_safetensors`] (official names) and [`save_transformers`] (a directory that
//! `Dinov2Model.from_pretrained` / `Dinov2WithRegistersModel.from_pretrained` load without missing keys).

mod io;
mod pth;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::config::{Arch, FfnKind, PosEmbedInterpolation, VitConfig};
use crate::error::{Error, Result};
use crate::state_dict::StateDict;
use crate::vit::DinoVisionTransformer;

use io::{format_err, io_err, Container};

/// Tensors with their names, as read from a file.
type NamedTensors = Vec<(String, Tensor)>;

/// The safetensors metadata key under which [`save_safetensors_with_config`] stores the model's [`VitConfig`]
/// (its serde JSON). [`load_weights_with`] uses it when no configuration is given.
///
/// ```
/// assert_eq!(dinov2_model::weights::CONFIG_METADATA_KEY, "dinov2_config");
/// ```
pub const CONFIG_METADATA_KEY: &str = "dinov2_config";

/// The layout a checkpoint was stored in (recognised by the keys, not the file name).
///
/// ```
/// use dinov2_model::weights::{load_weights, save_safetensors, save_transformers, WeightFormat};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mut cfg = dinov2_model::VitConfig::vit_small();
/// (cfg.depth, cfg.img_size) = (1, 28);
/// let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
/// let dir = tempfile::tempdir()?;
/// save_safetensors(&sd, &dir.path().join("official.safetensors"))?;
/// save_transformers(&sd, &cfg, &dir.path().join("hf"))?;
/// assert_eq!(load_weights(&dir.path().join("official.safetensors"))?.format, WeightFormat::OfficialSafetensors);
/// assert_eq!(load_weights(&dir.path().join("hf"))?.format, WeightFormat::Transformers);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WeightFormat {
    /// Official names in a PyTorch (zip) file, e.g. `dinov2_vits14_pretrain.pth`.
    OfficialPth,
    /// Official names in a safetensors file (what [`save_safetensors`] writes).
    OfficialSafetensors,
    /// Hugging Face `transformers` (`Dinov2Model`, `Dinov2WithRegistersModel`, `...ForImageClassification`).
    Transformers,
    /// timm (`vit_*_patch14_dinov2`, `vit_*_patch14_reg4_dinov2`).
    Timm,
    /// An official training checkpoint (`{"teacher": {"backbone.blocks.0.0. ...": ...}}` and friends).
    TrainingCheckpoint,
}

/// Backbone weights under the official names plus what was found around them.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use dinov2_model::weights::{load_weights, save_safetensors};
/// use dinov2_model::{DinoVisionTransformer, LinearClassifier};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mut cfg = dinov2_model::VitConfig::vit_small();
/// (cfg.depth, cfg.img_size) = (1, 28);
/// let mut sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
/// sd.insert("head.weight", Tensor::zeros((10, 2 * 384), DType::F32, &Device::Cpu)?); // not the backbone
/// sd.insert("head.bias", Tensor::zeros(10, DType::F32, &Device::Cpu)?);
/// let dir = tempfile::tempdir()?;
/// save_safetensors(&sd, &dir.path().join("with_head.safetensors"))?;
///
/// let w = load_weights(&dir.path().join("with_head.safetensors"))?;
/// assert_eq!(w.config, cfg); // inferred from the shapes
/// assert!(!w.state_dict.contains("head.weight"));
/// let model = DinoVisionTransformer::from_state_dict(&w.config, &w.state_dict, &Device::Cpu, DType::F32)?;
/// let head = LinearClassifier::from_state_dict(&w.extra, "head.", 1, model.embed_dim())?;
/// assert_eq!(head.num_classes(), 10);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct LoadedWeights {
    /// Canonical official names, `f32` on the CPU, backbone only (`mask_token` included when present).
    pub state_dict: StateDict,
    /// The configuration: the one given, else the one in the safetensors metadata
    /// ([`CONFIG_METADATA_KEY`]), else inferred from the tensors (and `config.json` for `transformers`).
    pub config: VitConfig,
    /// The layout the file was in.
    pub format: WeightFormat,
    /// Non-backbone tensors under their original names (`classifier.*`, `dino_head.*`, `ibot_head.*`, `head.*`, ...).
    pub extra: StateDict,
}

/// Options of [`load_weights_with`].
///
/// A given configuration is checked against the tensors, strictly:
///
/// ```
/// use dinov2_model::weights::{load_weights_with, save_safetensors, LoadOptions};
/// use dinov2_model::Error;
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mut cfg = dinov2_model::VitConfig::vit_small();
/// (cfg.depth, cfg.img_size) = (1, 28);
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("one_block.safetensors");
/// save_safetensors(&dinov2_model::init::init_state_dict(&cfg, 0)?, &path)?;
/// let two_blocks = dinov2_model::VitConfig { depth: 2, ..cfg.clone() };
/// let opts = LoadOptions { config: Some(two_blocks), ..Default::default() };
/// let err = load_weights_with(&path, &opts).unwrap_err();
/// assert!(matches!(err, Error::MissingKey { ref key, .. } if key.starts_with("blocks.1.")));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Use this configuration instead of inferring one (needed when the width is not one of the released
    /// sizes and there is neither a configuration in the safetensors metadata, as
    /// [`save_safetensors_with_config`] writes, nor a `transformers` `config.json` to give the number of heads).
    /// It takes precedence over the metadata, which is then not read. The tensors are checked against it.
    pub config: Option<VitConfig>,
    /// For `.pth` files: the top-level entry holding the state dict (`"teacher"`, `"student"`, `"model"`).
    /// Without it `"teacher"`, then `"model"`, then the top level itself are tried. `"student"` also selects the
    /// `student.` half of a `{"model": {"student.…", "teacher.…"}}` checkpoint.
    pub checkpoint_key: Option<String>,
}

/// Loads a checkpoint in any supported layout (see the [module docs](self)) with an inferred configuration.
///
/// `path` is a `.pth` / `.safetensors` file, or a directory holding `model.safetensors` (or a sharded
/// `model.safetensors.index.json`, or `pytorch_model.bin`) and optionally a `transformers` `config.json`.
///
/// ```
/// use dinov2_model::weights::{load_weights, save_safetensors, WeightFormat};
/// use dinov2_model::{StateDict, VitConfig};
/// # fn main() -> dinov2_model::Result<()> {
/// // A random ViT-S/14-shaped state dict, saved and loaded back.
/// let mut cfg = VitConfig::vit_small();
/// cfg.depth = 1;
/// cfg.img_size = 28;
/// let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
/// let path = std::env::temp_dir().join(format!("doc-load-{}.safetensors", std::process::id()));
/// save_safetensors(&sd, &path)?;
/// let loaded = load_weights(&path)?;
/// assert_eq!(loaded.format, WeightFormat::OfficialSafetensors);
/// assert_eq!(loaded.config, cfg); // 384 wide → 6 heads, as released
/// # std::fs::remove_file(&path).ok();
/// # Ok(())
/// # }
/// ```
pub fn load_weights(path: impl AsRef<Path>) -> Result<LoadedWeights> {
    load_weights_with(path, &LoadOptions::default())
}

/// [`load_weights`] with an explicit configuration and/or checkpoint key.
///
/// The configuration is, in order: `opts.config`; the [`VitConfig`] stored in the safetensors metadata under
/// [`CONFIG_METADATA_KEY`] (by [`save_safetensors_with_config`]; a malformed one is an [`Error::Format`]
/// naming the file, and one that does not match the tensors too); a `transformers` `config.json`; inference
/// from the tensor shapes. Whichever it is, the tensors are checked against it strictly.
///
/// A width that is not a released size needs its configuration (the number of heads is not in the tensors):
///
/// ```
/// use dinov2_model::weights::{load_weights, load_weights_with, save_safetensors, LoadOptions};
/// use dinov2_model::{Error, VitConfig};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mut cfg = VitConfig::vit_small();
/// (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.img_size) = (32, 2, 1, 28);
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("tiny.safetensors");
/// save_safetensors(&dinov2_model::init::init_state_dict(&cfg, 0)?, &path)?;
/// assert!(matches!(load_weights(&path), Err(Error::InvalidConfig { field: "num_heads", .. })));
/// let opts = LoadOptions { config: Some(cfg.clone()), ..Default::default() };
/// assert_eq!(load_weights_with(&path, &opts)?.config.num_heads, 2);
/// # Ok(()) }
/// ```
///
/// The student of an official training checkpoint:
///
/// ```no_run
/// use dinov2_model::weights::{load_weights_with, LoadOptions};
/// # fn main() -> dinov2_model::Result<()> {
/// let opts = LoadOptions { config: None, checkpoint_key: Some("student".into()) };
/// let w = load_weights_with("eval/training_12499/teacher_checkpoint.pth", &opts)?;
/// println!("{} blocks, extra heads: {:?}", w.config.depth, w.extra.keys().collect::<Vec<_>>());
/// # Ok(())
/// # }
/// ```
pub fn load_weights_with(path: impl AsRef<Path>, opts: &LoadOptions) -> Result<LoadedWeights> {
    let path = path.as_ref();
    let raw = read_raw(path, opts)?;
    let (canon, extra, format) = canonicalize(raw.tensors, raw.container, raw.key_used, opts)
        .map_err(|e| match e {
            Error::Format { reason, .. } => format_err(path, reason),
            e => e,
        })?;
    if !canon.contains("cls_token") && !canon.contains("patch_embed.proj.weight") {
        let mut seen: Vec<&String> = canon.keys().chain(extra.keys()).take(6).collect();
        seen.sort();
        let reason = if seen.is_empty() {
            match (raw.container, &opts.checkpoint_key) {
                (Container::Zip, None) => "no tensors at the top level of the checkpoint nor under `teacher` or \
                     `model`; pass `LoadOptions::checkpoint_key` (CLI: --checkpoint-key) naming the entry that \
                     holds the state dict"
                    .to_string(),
                _ => "no tensors found".to_string(),
            }
        } else {
            format!(
                "no DINOv2 backbone weights found (no `cls_token`, `embeddings.cls_token` or `patch_embed.proj.weight`; keys include {})",
                seen.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", ")
            )
        };
        return Err(format_err(path, reason));
    }
    for (name, t) in canon.iter().chain(extra.iter()) {
        check_finite(path, name, t)?;
    }
    let from_metadata = opts.config.is_none() && raw.metadata_config.is_some();
    let config = match (&opts.config, &raw.metadata_config) {
        (Some(c), _) => {
            c.validate()?;
            c.clone()
        }
        (None, Some((file, json))) => metadata_config(file, json)?,
        (None, None) => {
            // A config.json is only trusted when it describes a transformers DINOv2 model (a timm repository
            // also has a config.json, with other fields).
            let is_dinov2 = |c: &serde_json::Value| {
                c.get("model_type")
                    .and_then(|m| m.as_str())
                    .is_some_and(|m| m.starts_with("dinov2"))
            };
            let hf = raw
                .hf_config
                .as_ref()
                .filter(|c| format == WeightFormat::Transformers || is_dinov2(c));
            infer_config(&canon, hf)?
        }
    };
    let mut canon = canon;
    if !canon.contains("mask_token") {
        // timm drops the mask token; it starts at zero in the official model (its initial value).
        let d = config.embed_dim;
        canon.insert(
            "mask_token",
            Tensor::zeros((1, d), DType::F32, &Device::Cpu)?,
        );
    }
    match (
        DinoVisionTransformer::check_state_dict(&config, &canon),
        &raw.metadata_config,
    ) {
        (Err(e), Some((file, _))) if from_metadata => {
            return Err(format_err(
                file,
                format!(
                    "the `{CONFIG_METADATA_KEY}` configuration in the metadata does not match the tensors: {e}; \
                     pass an explicit configuration (`LoadOptions::config`, CLI `--config <VitConfig JSON>`) to override it"
                ),
            ))
        }
        (r, _) => r?,
    }
    let state_dict = to_f32(canon)?;
    let extra = to_f32(extra)?;
    Ok(LoadedWeights {
        state_dict,
        config,
        format,
        extra,
    })
}

/// Tensors read from disk, before any renaming.
struct RawWeights {
    tensors: Vec<(String, Tensor)>,
    container: Container,
    /// The top-level `.pth` entry the tensors came from.
    key_used: Option<String>,
    hf_config: Option<serde_json::Value>,
    /// The safetensors file holding a [`CONFIG_METADATA_KEY`] entry, and that entry (unparsed: it is only read
    /// when no configuration is given).
    metadata_config: Option<(PathBuf, String)>,
}

/// What one weights file gave.
struct FileWeights {
    tensors: NamedTensors,
    key_used: Option<String>,
    metadata_config: Option<(PathBuf, String)>,
}

/// Refuses a float tensor with a NaN or an infinity ([`Error::NonFinite`]): one parallel, vectorised pass over
/// the CPU data (loaded weights are contiguous CPU tensors, so nothing is copied).
fn check_finite(path: &Path, name: &str, t: &Tensor) -> Result<()> {
    match first_non_finite(t)? {
        None => Ok(()),
        Some((index, value)) => Err(Error::NonFinite {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            index,
            numel: t.elem_count(),
            value,
        }),
    }
}

/// The first non-finite element (flat index, value) of a float tensor; `None` for finite or non-float tensors.
fn first_non_finite(t: &Tensor) -> Result<Option<(usize, f64)>> {
    use candle_core::{CpuStorage, Storage};
    use rayon::prelude::*;
    fn scan<T: Copy + Send + Sync>(
        s: &[T],
        finite: impl Fn(T) -> bool + Sync,
        to_f64: impl Fn(T) -> f64,
    ) -> Option<(usize, f64)> {
        const CHUNK: usize = 1 << 16;
        let (ci, c) = s
            .par_chunks(CHUNK)
            .enumerate()
            .find_first(|(_, c)| !c.iter().fold(true, |ok, &x| ok & finite(x)))?;
        let i = c.iter().position(|&x| !finite(x))?;
        Some((ci * CHUNK + i, to_f64(c[i])))
    }
    if !t.dtype().is_float() {
        return Ok(None);
    }
    // No-ops for a contiguous CPU tensor.
    let t = t.to_device(&Device::Cpu)?.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout
        .contiguous_offsets()
        .expect("a contiguous tensor has contiguous offsets");
    Ok(match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => scan(&v[start..end], f32::is_finite, f64::from),
        Storage::Cpu(CpuStorage::F64(v)) => scan(&v[start..end], f64::is_finite, |x| x),
        Storage::Cpu(CpuStorage::F16(v)) => scan(&v[start..end], half::f16::is_finite, f64::from),
        Storage::Cpu(CpuStorage::BF16(v)) => scan(&v[start..end], half::bf16::is_finite, f64::from),
        _ => None,
    })
}

/// Reads a safetensors file, keeping its [`CONFIG_METADATA_KEY`] entry.
fn read_safetensors_file(path: &Path) -> Result<FileWeights> {
    let f = io::read_safetensors(path)?;
    Ok(FileWeights {
        tensors: f.tensors,
        key_used: None,
        metadata_config: f
            .metadata
            .get(CONFIG_METADATA_KEY)
            .map(|j| (path.to_path_buf(), j.clone())),
    })
}

/// The `VitConfig` stored in a safetensors file's metadata ([`CONFIG_METADATA_KEY`], written by
/// [`save_safetensors_with_config`]), read from the header alone and validated; `None` when the file has none.
///
/// ```
/// use dinov2_model::{weights, VitConfig};
/// let dir = tempfile::tempdir().unwrap();
/// let mut cfg = VitConfig::vit_small();
/// (cfg.embed_dim, cfg.num_heads, cfg.depth) = (32, 2, 1);
/// let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
/// weights::save_safetensors_with_config(&sd, &cfg, dir.path().join("m.safetensors"))?;
/// assert_eq!(weights::stored_config(dir.path().join("m.safetensors"))?, Some(cfg));
/// weights::save_safetensors(&sd, dir.path().join("plain.safetensors"))?;
/// assert_eq!(weights::stored_config(dir.path().join("plain.safetensors"))?, None);
/// # Ok::<(), dinov2_model::Error>(())
/// ```
///
/// Errors: [`Error::Io`] when the file cannot be read, [`Error::Format`] for a malformed header or a stored
/// configuration that is not a valid `VitConfig`.
pub fn stored_config(path: impl AsRef<Path>) -> Result<Option<VitConfig>> {
    let path = path.as_ref();
    io::read_safetensors_metadata(path)?
        .get(CONFIG_METADATA_KEY)
        .map(|json| metadata_config(path, json))
        .transpose()
}

/// Parses and validates a configuration stored in the metadata of `file`.
fn metadata_config(file: &Path, json: &str) -> Result<VitConfig> {
    let bad = |why: String| {
        format_err(
            file,
            format!(
                "the `{CONFIG_METADATA_KEY}` metadata entry is not a valid VitConfig ({why}); pass an explicit \
                 configuration (`LoadOptions::config`, CLI `--config <VitConfig JSON>`) to override it"
            ),
        )
    };
    let cfg: VitConfig = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
    cfg.validate().map_err(|e| bad(e.to_string()))?;
    Ok(cfg)
}

fn read_raw(path: &Path, opts: &LoadOptions) -> Result<RawWeights> {
    let meta = std::fs::metadata(path).map_err(|e| io_err(path, e))?;
    if meta.is_dir() {
        return read_dir(path, opts);
    }
    let container = io::sniff(path)?;
    let FileWeights {
        tensors,
        key_used,
        metadata_config,
    } = read_file(path, container, opts)?;
    // A `model.safetensors` next to its `config.json` (a `transformers` directory addressed by file).
    let hf_config = match path.parent() {
        Some(dir) if container == Container::Safetensors => {
            read_hf_config(&dir.join("config.json")).ok().flatten()
        }
        _ => None,
    };
    Ok(RawWeights {
        tensors,
        container,
        key_used,
        hf_config,
        metadata_config,
    })
}

fn read_file(path: &Path, container: Container, opts: &LoadOptions) -> Result<FileWeights> {
    let pth = |tensors: NamedTensors, key: Option<&str>| FileWeights {
        tensors,
        key_used: key.map(str::to_string),
        metadata_config: None,
    };
    match container {
        Container::Safetensors => read_safetensors_file(path),
        Container::LegacyPickle => Err(format_err(
            path,
            "legacy (non-zip) PyTorch serialization is not supported; re-save it with a current torch: \
             `torch.save(torch.load(f, weights_only=True), f)`",
        )),
        Container::Zip => {
            if let Some(k) = &opts.checkpoint_key {
                match io::read_pth(path, Some(k)) {
                    Ok(t) => return Ok(pth(t, Some(k))),
                    // `student` inside a `{"model": {"student.…": …}}` checkpoint.
                    Err(e) if k == "student" => match io::read_pth(path, Some("model")) {
                        Ok(t) if !t.is_empty() => return Ok(pth(t, Some("model"))),
                        _ => return Err(e),
                    },
                    Err(e) => return Err(e),
                }
            }
            // Only the tensor index is parsed while probing; the data is read once, for the chosen entry.
            let top = io::pth_tensor_names(path, None)?;
            for k in ["teacher", "model"] {
                if let Ok(names) = io::pth_tensor_names(path, Some(k)) {
                    // candle applies the key only to a top-level dict; otherwise it returns the top level.
                    if !names.is_empty() && names != top {
                        return Ok(pth(io::read_pth(path, Some(k))?, Some(k)));
                    }
                }
            }
            Ok(pth(io::read_pth(path, None)?, None))
        }
    }
}

fn read_hf_config(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format_err(path, format!("invalid JSON: {e}")))?;
    Ok(Some(v))
}

fn read_dir(dir: &Path, opts: &LoadOptions) -> Result<RawWeights> {
    let hf_config = read_hf_config(&dir.join("config.json"))?;
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let bin = dir.join("pytorch_model.bin");
    let (file, container) = if single.is_file() {
        (read_safetensors_file(&single)?, Container::Safetensors)
    } else if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| io_err(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format_err(&index, format!("invalid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| format_err(&index, "no `weight_map` object"))?;
        let shards: BTreeSet<&str> = map.values().filter_map(|s| s.as_str()).collect();
        let mut all = FileWeights {
            tensors: Vec::new(),
            key_used: None,
            metadata_config: None,
        };
        for s in shards {
            if s.contains('/') || s.contains('\\') || s.starts_with('.') {
                return Err(format_err(
                    &index,
                    format!("shard name `{s}` is not a plain file name"),
                ));
            }
            let shard = read_safetensors_file(&dir.join(s))?;
            all.tensors.extend(shard.tensors);
            all.metadata_config = all.metadata_config.or(shard.metadata_config);
        }
        (all, Container::Safetensors)
    } else if bin.is_file() {
        let c = io::sniff(&bin)?;
        (read_file(&bin, c, opts)?, c)
    } else {
        return Err(format_err(
            dir,
            "the directory holds no `model.safetensors`, `model.safetensors.index.json` or `pytorch_model.bin`",
        ));
    };
    Ok(RawWeights {
        tensors: file.tensors,
        container,
        key_used: file.key_used,
        hf_config,
        metadata_config: file.metadata_config,
    })
}

fn to_f32(sd: StateDict) -> Result<StateDict> {
    sd.into_iter()
        .map(|(k, t)| {
            let t = if t.dtype().is_float() && t.dtype() != DType::F32 {
                t.to_dtype(DType::F32)?
            } else {
                t
            };
            Ok((k, t.to_device(&Device::Cpu)?))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------------------
// Layout detection and conversion to the official names.

const HF_PREFIXES: [&str; 2] = ["dinov2.", "dinov2_with_registers."];

/// Whether `key` names a backbone parameter under the official naming.
fn is_backbone_name(key: &str) -> bool {
    matches!(
        key,
        "cls_token" | "pos_embed" | "register_tokens" | "mask_token"
    ) || key.starts_with("patch_embed.")
        || key.starts_with("blocks.")
        || key.starts_with("norm.")
}

/// `blocks.{a}.{b}.rest` with both indices numeric → `Some((a, b, rest))`.
fn chunked_block(key: &str) -> Option<(&str, &str, &str)> {
    let rest = key.strip_prefix("blocks.")?;
    let (a, rest) = rest.split_once('.')?;
    let (b, rest) = rest.split_once('.')?;
    let num = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
    (num(a) && num(b)).then_some((a, b, rest))
}

fn canonicalize(
    raw: Vec<(String, Tensor)>,
    container: Container,
    key_used: Option<String>,
    opts: &LoadOptions,
) -> Result<(StateDict, StateDict, WeightFormat)> {
    let names: Vec<&str> = raw.iter().map(|(k, _)| k.as_str()).collect();
    let training = key_used.is_some()
        || names.iter().any(|k| {
            ["module.", "backbone.", "teacher.", "student."]
                .iter()
                .any(|p| k.starts_with(p))
                || chunked_block(k).is_some()
        });
    let hf = names.iter().any(|k| {
        *k == "embeddings.cls_token"
            || HF_PREFIXES
                .iter()
                .any(|p| k.strip_prefix(p) == Some("embeddings.cls_token"))
    });
    if training {
        let (sd, extra) = from_training(raw, opts)?;
        return Ok((sd, extra, WeightFormat::TrainingCheckpoint));
    }
    if hf {
        let (sd, extra) = from_transformers(raw)?;
        return Ok((sd, extra, WeightFormat::Transformers));
    }
    let timm = names.contains(&"reg_token")
        || (names.contains(&"cls_token") && !names.contains(&"mask_token"));
    let raw = if timm {
        raw.into_iter()
            .map(|(k, t)| {
                if k == "reg_token" {
                    ("register_tokens".to_string(), t)
                } else {
                    (k, t)
                }
            })
            .collect()
    } else {
        raw
    };
    let (sd, extra) = split_extra(raw);
    if timm {
        return Ok((from_timm(sd)?, extra, WeightFormat::Timm));
    }
    let format = if container == Container::Safetensors {
        WeightFormat::OfficialSafetensors
    } else {
        WeightFormat::OfficialPth
    };
    Ok((sd, extra, format))
}

/// Splits official-named tensors from everything else.
fn split_extra(raw: Vec<(String, Tensor)>) -> (StateDict, StateDict) {
    let mut sd = StateDict::new();
    let mut extra = StateDict::new();
    for (k, t) in raw {
        if is_backbone_name(&k) {
            sd.insert(k, t);
        } else {
            extra.insert(k, t);
        }
    }
    (sd, extra)
}

fn from_training(raw: Vec<(String, Tensor)>, opts: &LoadOptions) -> Result<(StateDict, StateDict)> {
    let strip_module = |k: &str| -> String {
        let mut k = k;
        while let Some(r) = k.strip_prefix("module.") {
            k = r;
        }
        k.to_string()
    };
    let raw: Vec<(String, Tensor)> = raw
        .into_iter()
        .map(|(k, t)| (strip_module(&k), t))
        .collect();
    // `{"model": {"teacher.backbone.…", "student.backbone.…"}}`: keep one half.
    let has = |p: &str| raw.iter().any(|(k, _)| k.starts_with(p));
    let raw = if has("teacher.") || has("student.") {
        let want = if opts.checkpoint_key.as_deref() == Some("student") || !has("teacher.") {
            "student."
        } else {
            "teacher."
        };
        raw.into_iter()
            .filter_map(|(k, t)| k.strip_prefix(want).map(|r| (strip_module(r), t)))
            .collect()
    } else {
        raw
    };
    let has_backbone = raw.iter().any(|(k, _)| k.starts_with("backbone."));
    let mut sd = StateDict::new();
    let mut extra = StateDict::new();
    for (k, t) in raw {
        let k = if has_backbone {
            match k.strip_prefix("backbone.") {
                Some(r) => strip_module(r),
                None => {
                    extra.insert(k, t);
                    continue;
                }
            }
        } else {
            k
        };
        let k = match chunked_block(&k) {
            Some((_, i, rest)) => format!("blocks.{i}.{rest}"),
            None => k,
        };
        if is_backbone_name(&k) {
            if sd.insert(k.clone(), t).is_some() {
                return Err(Error::Format {
                    path: PathBuf::new(),
                    reason: format!("`{k}` appears twice after removing the block-chunk index"),
                });
            }
        } else {
            extra.insert(k, t);
        }
    }
    Ok((sd, extra))
}

/// Official name of a `transformers` key (without the model prefix), except q/k/v which are fused separately.
fn hf_to_official(k: &str) -> Option<String> {
    let simple = match k {
        "embeddings.cls_token" => Some("cls_token"),
        "embeddings.mask_token" => Some("mask_token"),
        "embeddings.position_embeddings" => Some("pos_embed"),
        "embeddings.register_tokens" => Some("register_tokens"),
        "embeddings.patch_embeddings.projection.weight" => Some("patch_embed.proj.weight"),
        "embeddings.patch_embeddings.projection.bias" => Some("patch_embed.proj.bias"),
        "layernorm.weight" => Some("norm.weight"),
        "layernorm.bias" => Some("norm.bias"),
        _ => None,
    };
    if let Some(s) = simple {
        return Some(s.to_string());
    }
    let rest = k.strip_prefix("encoder.layer.")?;
    let (i, rest) = rest.split_once('.')?;
    if i.is_empty() || !i.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let mapped = match rest {
        "norm1.weight" | "norm1.bias" | "norm2.weight" | "norm2.bias" => rest.to_string(),
        "attention.output.dense.weight" => "attn.proj.weight".into(),
        "attention.output.dense.bias" => "attn.proj.bias".into(),
        "layer_scale1.lambda1" => "ls1.gamma".into(),
        "layer_scale2.lambda1" => "ls2.gamma".into(),
        "mlp.fc1.weight" | "mlp.fc1.bias" | "mlp.fc2.weight" | "mlp.fc2.bias" => rest.to_string(),
        "mlp.weights_in.weight" => "mlp.w12.weight".into(),
        "mlp.weights_in.bias" => "mlp.w12.bias".into(),
        "mlp.weights_out.weight" => "mlp.w3.weight".into(),
        "mlp.weights_out.bias" => "mlp.w3.bias".into(),
        // transformers >= 5 module names (a `state_dict()` dump rather than `save_pretrained`).
        "attention.o_proj.weight" => "attn.proj.weight".into(),
        "attention.o_proj.bias" => "attn.proj.bias".into(),
        "mlp.down_proj.weight" => "mlp.w3.weight".into(),
        "mlp.down_proj.bias" => "mlp.w3.bias".into(),
        _ => return None,
    };
    Some(format!("blocks.{i}.{mapped}"))
}

/// Parts of one fused official tensor in the `transformers` layout: `(official name, part index, arity)`.
///
/// Two namings exist: the Hub checkpoints (`attention.attention.{query,key,value}`, `mlp.weights_in`) and the
/// module names of transformers ≥ 5 (`attention.{q,k,v}_proj`, `mlp.{gate,up}_proj`), which a plain
/// `state_dict()` dump has; `weights_in` = [gate; up] by rows.
fn hf_part(rest: &str) -> Option<(&'static str, usize, usize, &str)> {
    let (module, wb) = rest.rsplit_once('.')?;
    let (name, j, n) = match module {
        "attention.attention.query" | "attention.q_proj" => ("attn.qkv", 0, 3),
        "attention.attention.key" | "attention.k_proj" => ("attn.qkv", 1, 3),
        "attention.attention.value" | "attention.v_proj" => ("attn.qkv", 2, 3),
        "mlp.gate_proj" => ("mlp.w12", 0, 2),
        "mlp.up_proj" => ("mlp.w12", 1, 2),
        _ => return None,
    };
    matches!(wb, "weight" | "bias").then_some((name, j, n, wb))
}

fn from_transformers(raw: Vec<(String, Tensor)>) -> Result<(StateDict, StateDict)> {
    let prefix = HF_PREFIXES
        .iter()
        .find(|p| raw.iter().any(|(k, _)| k.starts_with(*p)))
        .copied();
    let mut sd = StateDict::new();
    let mut extra = StateDict::new();
    // "blocks.{i}.{attn.qkv|mlp.w12}.{weight|bias}" → (parts, original names)
    type Parts = (Vec<Option<Tensor>>, Vec<Option<String>>);
    let mut fused: BTreeMap<String, Parts> = BTreeMap::new();
    for (orig, t) in raw {
        let k = match prefix {
            Some(p) => match orig.strip_prefix(p) {
                Some(r) => r.to_string(),
                None => {
                    extra.insert(orig, t);
                    continue;
                }
            },
            None => orig.clone(),
        };
        if let Some((i, rest)) = k
            .strip_prefix("encoder.layer.")
            .and_then(|r| r.split_once('.'))
        {
            if let (Ok(i), Some((name, j, n, wb))) = (i.parse::<usize>(), hf_part(rest)) {
                let e = fused
                    .entry(format!("blocks.{i}.{name}.{wb}"))
                    .or_insert_with(|| (vec![None; n], vec![None; n]));
                e.0[j] = Some(t);
                e.1[j] = Some(orig);
                continue;
            }
        }
        match hf_to_official(&k) {
            Some(name) => {
                sd.insert(name, t);
            }
            None => {
                extra.insert(orig, t);
            }
        }
    }
    for (target, (parts, names)) in fused {
        if let Some(j) = parts.iter().position(Option::is_none) {
            // Name the absent part after a present sibling's naming style.
            let (present, shape) = parts
                .iter()
                .zip(&names)
                .find_map(|(t, n)| Some((n.clone()?, t.as_ref()?.dims().to_vec())))
                .unwrap_or_default();
            let key = missing_part_name(&present, j);
            return Err(Error::MissingKey {
                key,
                expected: shape,
            });
        }
        let ts: Vec<Tensor> = parts.into_iter().flatten().collect();
        sd.insert(target, Tensor::cat(&ts, 0)?);
    }
    Ok((sd, extra))
}

/// The name of part `j` of the fused tensor that `sibling` (a present part, full original name) belongs to.
fn missing_part_name(sibling: &str, j: usize) -> String {
    const GROUPS: [[&str; 3]; 3] = [
        [
            "attention.attention.query.",
            "attention.attention.key.",
            "attention.attention.value.",
        ],
        [
            "attention.q_proj.",
            "attention.k_proj.",
            "attention.v_proj.",
        ],
        ["mlp.gate_proj.", "mlp.up_proj.", ""],
    ];
    for g in GROUPS {
        for pat in g {
            if !pat.is_empty() && sibling.contains(pat) && !g[j].is_empty() {
                return sibling.replacen(pat, g[j], 1);
            }
        }
    }
    sibling.to_string()
}

/// timm → official, after `reg_token` was renamed `register_tokens`.
fn from_timm(mut sd: StateDict) -> Result<StateDict> {
    if let Some(pos) = sd.get("pos_embed") {
        if let [1, rows, d] = *pos.dims() {
            if is_square(rows) {
                let zero = Tensor::zeros((1, 1, d), pos.dtype(), pos.device())?;
                let full = Tensor::cat(&[&zero, pos], 1)?;
                sd.insert("pos_embed", full);
            }
        }
    }
    // Packed SwiGLU (timm's SwiGLUPacked keeps the fc1/fc2 names): fc1 rows = 2 × fc2 columns.
    let blocks: BTreeSet<String> = sd
        .keys()
        .filter_map(|k| {
            let r = k.strip_prefix("blocks.")?;
            let (i, rest) = r.split_once('.')?;
            (rest == "mlp.fc1.weight").then(|| i.to_string())
        })
        .collect();
    for i in blocks {
        let (Some(f1), Some(f2)) = (
            sd.get(&format!("blocks.{i}.mlp.fc1.weight")),
            sd.get(&format!("blocks.{i}.mlp.fc2.weight")),
        ) else {
            continue;
        };
        if f1.rank() == 2 && f2.rank() == 2 && f1.dims()[0] == 2 * f2.dims()[1] {
            for (from, to) in [("fc1", "w12"), ("fc2", "w3")] {
                for wb in ["weight", "bias"] {
                    if let Some(t) = sd.remove(&format!("blocks.{i}.mlp.{from}.{wb}")) {
                        sd.insert(format!("blocks.{i}.mlp.{to}.{wb}"), t);
                    }
                }
            }
        }
    }
    Ok(sd)
}

fn is_square(n: usize) -> bool {
    let r = (n as f64).sqrt().round() as usize;
    r * r == n
}

fn isqrt_exact(n: usize) -> Option<usize> {
    let r = (n as f64).sqrt().round() as usize;
    (r * r == n).then_some(r)
}

// ---------------------------------------------------------------------------------------------------------------
// Configuration inference and checking.

fn dims_of<'a>(sd: &'a StateDict, key: &str) -> Option<&'a [usize]> {
    sd.get(key).map(|t| t.dims())
}

/// Infers the architecture from a canonical (official-named) state dict.
///
/// `hf_config` is a `transformers` `config.json`: it gives the number of heads (and LayerNorm eps,
/// LayerScale value) and is cross-checked against the tensors. Without it, the number of heads comes from
/// the released sizes (384 → 6, 768 → 12, 1024 → 16, 1536 → 24); other widths give
/// [`Error::InvalidConfig`] asking for an explicit configuration ([`LoadOptions::config`]).
///
/// The interpolation of the position table is a property of the model family, not of the file:
/// register models (R > 0) get the size path with antialias, the others the `+0.1` scale-factor path.
///
/// ```
/// use dinov2_model::weights::infer_config;
/// use dinov2_model::{DinoVisionTransformer, StateDict, VitConfig};
/// # fn main() -> dinov2_model::Result<()> {
/// let cfg = VitConfig::vit_base().with_registers(4);
/// let mut sd = StateDict::new();
/// for (name, shape) in DinoVisionTransformer::parameter_shapes(&cfg)? {
///     sd.insert(name, candle_core::Tensor::zeros(shape, candle_core::DType::F32, &candle_core::Device::Cpu)?);
/// }
/// assert_eq!(infer_config(&sd, None)?, cfg);
/// # Ok(())
/// # }
/// ```
pub fn infer_config(sd: &StateDict, hf_config: Option<&serde_json::Value>) -> Result<VitConfig> {
    let d =
        match (
            dims_of(sd, "cls_token"),
            dims_of(sd, "patch_embed.proj.weight"),
        ) {
            (Some([1, 1, d]), _) => *d,
            (Some(other), _) => {
                return Err(Error::ShapeMismatch {
                    key: "cls_token".into(),
                    expected: vec![1, 1, other.last().copied().unwrap_or(0)],
                    actual: other.to_vec(),
                })
            }
            (None, Some([d, ..])) => *d,
            (None, _) => return Err(Error::config(
                "embed_dim",
                "cannot be inferred: neither `cls_token` nor `patch_embed.proj.weight` is present",
            )),
        };
    let (in_chans, patch) = match dims_of(sd, "patch_embed.proj.weight") {
        Some([_, c, p, q]) if p == q => (*c, *p),
        Some(other) => {
            return Err(Error::ShapeMismatch {
                key: "patch_embed.proj.weight".into(),
                expected: vec![d, 3, 14, 14],
                actual: other.to_vec(),
            })
        }
        None => {
            return Err(Error::MissingKey {
                key: "patch_embed.proj.weight".into(),
                expected: vec![d, 3, 14, 14],
            })
        }
    };
    let grid = match dims_of(sd, "pos_embed") {
        Some([1, rows, _]) if *rows >= 2 => isqrt_exact(rows - 1).ok_or_else(|| {
            Error::config(
                "img_size",
                format!("cannot be inferred: `pos_embed` has {rows} rows, which is not 1 + a square grid"),
            )
        })?,
        Some(other) => {
            return Err(Error::ShapeMismatch {
                key: "pos_embed".into(),
                expected: vec![1, 1370, d],
                actual: other.to_vec(),
            })
        }
        None => {
            return Err(Error::MissingKey {
                key: "pos_embed".into(),
                expected: vec![1, 1370, d],
            })
        }
    };
    let regs = match dims_of(sd, "register_tokens") {
        Some([1, r, _]) => *r,
        Some(other) => {
            return Err(Error::ShapeMismatch {
                key: "register_tokens".into(),
                expected: vec![1, 4, d],
                actual: other.to_vec(),
            })
        }
        None => 0,
    };
    // Blocks: indices must be exactly 0..depth.
    let idx: BTreeSet<usize> = sd
        .keys()
        .filter_map(|k| k.strip_prefix("blocks.")?.split_once('.')?.0.parse().ok())
        .collect();
    let depth = idx.len();
    if depth == 0 {
        return Err(Error::MissingKey {
            key: "blocks.0.norm1.weight".into(),
            expected: vec![d],
        });
    }
    if let Some(missing) = (0..depth).find(|i| !idx.contains(i)) {
        return Err(Error::config("depth", format!(
            "cannot be inferred: transformer block indices are not contiguous: block {missing} is missing but block {} exists",
            idx.iter().next_back().copied().unwrap_or(0)
        )));
    }
    let b0 = |s: &str| format!("blocks.0.{s}");
    let (ffn, mlp_ratio, ffn_bias) = if sd.contains(&b0("mlp.w12.weight")) {
        let hidden = match dims_of(sd, &b0("mlp.w3.weight")) {
            Some([_, h]) => *h,
            Some(other) => {
                return Err(Error::ShapeMismatch {
                    key: b0("mlp.w3.weight"),
                    expected: vec![d, 4096],
                    actual: other.to_vec(),
                })
            }
            None => {
                return Err(Error::MissingKey {
                    key: b0("mlp.w3.weight"),
                    expected: vec![d, VitConfig::vit_giant2().ffn_hidden_dim()],
                })
            }
        };
        let mut probe = VitConfig::vit_giant2();
        probe.embed_dim = d;
        if probe.ffn_hidden_dim() != hidden {
            return Err(Error::config("mlp_ratio", format!(
                "SwiGLU hidden size {hidden} is not what mlp_ratio 4 gives for width {d} ({}); pass an explicit configuration (`LoadOptions::config`, CLI `--config <VitConfig JSON>`)",
                probe.ffn_hidden_dim()
            )));
        }
        (FfnKind::Swiglu, 4.0, sd.contains(&b0("mlp.w12.bias")))
    } else {
        let hidden = match dims_of(sd, &b0("mlp.fc1.weight")) {
            Some([h, _]) => *h,
            Some(other) => {
                return Err(Error::ShapeMismatch {
                    key: b0("mlp.fc1.weight"),
                    expected: vec![4 * d, d],
                    actual: other.to_vec(),
                })
            }
            None => {
                return Err(Error::MissingKey {
                    key: b0("mlp.fc1.weight"),
                    expected: vec![4 * d, d],
                })
            }
        };
        let mut ratio = hidden as f64 / d as f64;
        if (d as f64 * ratio) as usize != hidden {
            // `int(D * ratio)` must give the hidden size back: nudge the ratio up within the same integer.
            ratio = (hidden as f64 + 0.5) / d as f64;
        }
        (FfnKind::Mlp, ratio, sd.contains(&b0("mlp.fc1.bias")))
    };
    let hf_f64 = |k: &str| hf_config.and_then(|c| c.get(k)).and_then(|v| v.as_f64());
    let hf_usize = |k: &str| {
        hf_config
            .and_then(|c| c.get(k))
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
    };
    let num_heads = match hf_usize("num_attention_heads") {
        Some(h) => h,
        None => match Arch::from_embed_dim(d) {
            Some(a) => a.config().num_heads,
            None => {
                return Err(Error::config("num_heads", format!(
                    "cannot infer the number of attention heads for width {d} (not a released size and no \
                     transformers config.json); pass an explicit configuration (`LoadOptions::config`, CLI `--config <VitConfig JSON>`)"
                )))
            }
        },
    };
    for (field, have) in [
        ("hidden_size", d),
        ("num_hidden_layers", depth),
        ("patch_size", patch),
        ("num_channels", in_chans),
    ] {
        if let Some(v) = hf_usize(field) {
            if v != have {
                return Err(Error::config(
                    field,
                    format!("config.json says {field} = {v} but the weights have {have}"),
                ));
            }
        }
    }
    let hf_bool = |k: &str| hf_config.and_then(|c| c.get(k)).and_then(|v| v.as_bool());
    for (field, have) in [
        ("use_swiglu_ffn", ffn == FfnKind::Swiglu),
        ("qkv_bias", sd.contains(&b0("attn.qkv.bias"))),
    ] {
        if let Some(v) = hf_bool(field) {
            if v != have {
                return Err(Error::config(
                    field,
                    format!("config.json says {field} = {v} but the weights say {have}"),
                ));
            }
        }
    }
    if let Some(r) = hf_usize("num_register_tokens") {
        if r != regs {
            return Err(Error::config(
                "num_register_tokens",
                format!("config.json says num_register_tokens = {r} but the weights have {regs}"),
            ));
        }
    }
    let layer_scale = sd
        .contains(&b0("ls1.gamma"))
        .then(|| hf_f64("layerscale_value").unwrap_or(1.0));
    let interpolation = if regs > 0 {
        PosEmbedInterpolation {
            offset: 0.0,
            antialias: true,
        }
    } else {
        PosEmbedInterpolation {
            offset: 0.1,
            antialias: false,
        }
    };
    let cfg = VitConfig {
        img_size: grid * patch,
        patch_size: patch,
        in_chans,
        embed_dim: d,
        depth,
        num_heads,
        mlp_ratio,
        ffn,
        qkv_bias: sd.contains(&b0("attn.qkv.bias")),
        proj_bias: sd.contains(&b0("attn.proj.bias")),
        ffn_bias,
        layer_scale_init: layer_scale,
        num_register_tokens: regs,
        interpolation,
        layer_norm_eps: hf_f64("layer_norm_eps").unwrap_or(1e-6),
        drop_path_rate: 0.0,
        drop_path_uniform: false,
    };
    cfg.validate()?;
    Ok(cfg)
}

// ---------------------------------------------------------------------------------------------------------------
// Saving.

/// Writes `sd` (official names) as a safetensors file, atomically (temporary file + rename).
///
/// The file loads back with [`load_weights`], and in Python with `safetensors.torch.load_file` into the
/// official model (`model.load_state_dict(..., strict=True)`).
///
/// ```
/// use dinov2_model::weights::{load_weights_with, save_safetensors, LoadOptions};
/// # fn main() -> dinov2_model::Result<()> {
/// # let cfg = { let mut c = dinov2_model::VitConfig::vit_small(); c.depth = 1; c.img_size = 28; c };
/// # let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
/// let path = std::env::temp_dir().join(format!("doc-save-{}.safetensors", std::process::id()));
/// save_safetensors(&sd, &path)?;
/// let back = load_weights_with(&path, &LoadOptions { config: Some(cfg.clone()), checkpoint_key: None })?;
/// assert_eq!(back.state_dict.len(), sd.len());
/// # std::fs::remove_file(&path).ok();
/// # Ok(())
/// # }
/// ```
pub fn save_safetensors(sd: &StateDict, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    io::write_safetensors(
        path,
        sd.iter().map(|(k, t)| (k.clone(), t.clone())).collect(),
        Vec::new(),
    )
}

/// [`save_safetensors`] that also stores `cfg` (its serde JSON) in the file's metadata under
/// [`CONFIG_METADATA_KEY`], next to `{"format": "pt"}`, so that [`load_weights`] (and `dinov2 embed --model`)
/// loads any width without an explicit configuration.
///
/// The backbone tensors of `sd` (official names) are checked against `cfg` first, strictly, so the file
/// always loads back; other tensors (heads) are written too and come back in [`LoadedWeights::extra`].
///
/// ```
/// use dinov2_model::weights::{load_weights, save_safetensors_with_config};
/// use dinov2_model::VitConfig;
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mut cfg = VitConfig::vit_small();
/// (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.img_size) = (40, 2, 1, 28); // not a released width
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("teacher.safetensors");
/// save_safetensors_with_config(&dinov2_model::init::init_state_dict(&cfg, 0)?, &cfg, &path)?;
/// assert_eq!(load_weights(&path)?.config, cfg); // no LoadOptions::config needed
/// # Ok(()) }
/// ```
pub fn save_safetensors_with_config(
    sd: &StateDict,
    cfg: &VitConfig,
    path: impl AsRef<Path>,
) -> Result<()> {
    let path = path.as_ref();
    cfg.validate()?;
    let mut backbone: StateDict = sd
        .iter()
        .filter(|(k, _)| is_backbone_name(k))
        .map(|(k, t)| (k.clone(), t.clone()))
        .collect();
    if !backbone.contains("mask_token") {
        backbone.insert(
            "mask_token",
            Tensor::zeros((1, cfg.embed_dim), DType::F32, &Device::Cpu)?,
        );
    }
    DinoVisionTransformer::check_state_dict(cfg, &backbone)?;
    let json = serde_json::to_string(cfg)
        .map_err(|e| Error::invalid("cfg", format!("cannot serialise the configuration: {e}")))?;
    io::write_safetensors(
        path,
        sd.iter().map(|(k, t)| (k.clone(), t.clone())).collect(),
        vec![(CONFIG_METADATA_KEY.to_string(), json)],
    )
}

/// Writes a `transformers` checkpoint directory (`config.json` + `model.safetensors`, each atomically) that
/// `Dinov2Model.from_pretrained` (or `Dinov2WithRegistersModel` when `cfg` has registers) loads with no
/// missing or unexpected keys.
///
/// `sd` uses the official names (as in [`LoadedWeights::state_dict`]). Parameters that the
/// `transformers` classes always have but `cfg` lacks are written with their neutral values, so the model
/// computes the same function: a missing `mask_token` is written as zeros (its official initial value), a
/// model without LayerScale gets `lambda1 = 1`, and a model without attention-output / FFN biases gets zero
/// biases. `qkv_bias = false` is expressed in `config.json`.
///
/// ```no_run
/// use dinov2_model::weights::{load_weights, save_transformers};
/// # fn main() -> dinov2_model::Result<()> {
/// let w = load_weights("dinov2_vits14_pretrain.pth")?;
/// save_transformers(&w.state_dict, &w.config, "dinov2-small-hf")?;
/// // Python: transformers.Dinov2Model.from_pretrained("dinov2-small-hf")
/// # Ok(())
/// # }
/// ```
///
/// The directory loads back to the same weights:
///
/// ```
/// use dinov2_model::weights::{load_weights, save_transformers, WeightFormat};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mut cfg = dinov2_model::VitConfig::vit_small().with_registers(4);
/// (cfg.depth, cfg.img_size) = (1, 28);
/// let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
/// let dir = tempfile::tempdir()?;
/// save_transformers(&sd, &cfg, dir.path())?;
/// assert!(dir.path().join("config.json").is_file() && dir.path().join("model.safetensors").is_file());
/// let back = load_weights(dir.path())?;
/// assert_eq!((back.format, &back.config), (WeightFormat::Transformers, &cfg));
/// for (name, t) in sd.iter() {
///     let diff = (t - back.state_dict.get(name).unwrap())?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
///     assert_eq!(diff, 0.0, "{name}"); // qkv split into query/key/value and fused back: exact
/// }
/// # Ok(()) }
/// ```
pub fn save_transformers(sd: &StateDict, cfg: &VitConfig, dir: impl AsRef<Path>) -> Result<()> {
    let dir = dir.as_ref();
    cfg.validate()?;
    let mut checked = sd.clone();
    if !checked.contains("mask_token") {
        checked.insert(
            "mask_token",
            Tensor::zeros((1, cfg.embed_dim), DType::F32, &Device::Cpu)?,
        );
    }
    DinoVisionTransformer::check_state_dict(cfg, &checked)?;
    let d = cfg.embed_dim;
    let get = |k: &str| -> Result<Tensor> {
        checked.get(k).cloned().ok_or_else(|| Error::MissingKey {
            key: k.to_string(),
            expected: vec![],
        })
    };
    let f32 = |t: Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.contiguous()?) };
    let mut out: Vec<(String, Tensor)> = vec![
        ("embeddings.cls_token".into(), f32(get("cls_token")?)?),
        ("embeddings.mask_token".into(), f32(get("mask_token")?)?),
        (
            "embeddings.position_embeddings".into(),
            f32(get("pos_embed")?)?,
        ),
        (
            "embeddings.patch_embeddings.projection.weight".into(),
            f32(get("patch_embed.proj.weight")?)?,
        ),
        (
            "embeddings.patch_embeddings.projection.bias".into(),
            f32(get("patch_embed.proj.bias")?)?,
        ),
        ("layernorm.weight".into(), f32(get("norm.weight")?)?),
        ("layernorm.bias".into(), f32(get("norm.bias")?)?),
    ];
    if cfg.num_register_tokens > 0 {
        out.push((
            "embeddings.register_tokens".into(),
            f32(get("register_tokens")?)?,
        ));
    }
    let zeros = |n: usize| Tensor::zeros(n, DType::F32, &Device::Cpu);
    let ones = |n: usize| Tensor::ones(n, DType::F32, &Device::Cpu);
    for i in 0..cfg.depth {
        let o = |s: &str| format!("blocks.{i}.{s}");
        let h = |s: &str| format!("encoder.layer.{i}.{s}");
        for n in ["norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"] {
            out.push((h(n), f32(get(&o(n))?)?));
        }
        let qkv_w = get(&o("attn.qkv.weight"))?;
        for (j, name) in ["query", "key", "value"].iter().enumerate() {
            out.push((
                h(&format!("attention.attention.{name}.weight")),
                f32(qkv_w.narrow(0, j * d, d)?)?,
            ));
        }
        if cfg.qkv_bias {
            let qkv_b = get(&o("attn.qkv.bias"))?;
            for (j, name) in ["query", "key", "value"].iter().enumerate() {
                out.push((
                    h(&format!("attention.attention.{name}.bias")),
                    f32(qkv_b.narrow(0, j * d, d)?)?,
                ));
            }
        }
        out.push((
            h("attention.output.dense.weight"),
            f32(get(&o("attn.proj.weight"))?)?,
        ));
        let proj_b = if cfg.proj_bias {
            get(&o("attn.proj.bias"))?
        } else {
            zeros(d)?
        };
        out.push((h("attention.output.dense.bias"), f32(proj_b)?));
        for (ls, hf) in [
            ("ls1.gamma", "layer_scale1.lambda1"),
            ("ls2.gamma", "layer_scale2.lambda1"),
        ] {
            let t = if cfg.layer_scale_init.is_some() {
                get(&o(ls))?
            } else {
                ones(d)?
            };
            out.push((h(hf), f32(t)?));
        }
        let (a, b, ha, hb) = match cfg.ffn {
            FfnKind::Mlp => ("fc1", "fc2", "fc1", "fc2"),
            FfnKind::Swiglu => ("w12", "w3", "weights_in", "weights_out"),
        };
        let wa = get(&o(&format!("mlp.{a}.weight")))?;
        let rows_a = wa.dims()[0];
        out.push((h(&format!("mlp.{ha}.weight")), f32(wa)?));
        let ba = if cfg.ffn_bias {
            get(&o(&format!("mlp.{a}.bias")))?
        } else {
            zeros(rows_a)?
        };
        out.push((h(&format!("mlp.{ha}.bias")), f32(ba)?));
        out.push((
            h(&format!("mlp.{hb}.weight")),
            f32(get(&o(&format!("mlp.{b}.weight")))?)?,
        ));
        let bb = if cfg.ffn_bias {
            get(&o(&format!("mlp.{b}.bias")))?
        } else {
            zeros(d)?
        };
        out.push((h(&format!("mlp.{hb}.bias")), f32(bb)?));
    }
    let config = transformers_config(cfg);
    let text = serde_json::to_string_pretty(&config)
        .map_err(|e| Error::invalid("cfg", format!("cannot serialise config.json: {e}")))?;
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    io::write_safetensors(&dir.join("model.safetensors"), out, Vec::new())?;
    io::atomic_write_bytes(&dir.join("config.json"), format!("{text}\n").as_bytes())
}

/// The `transformers` `config.json` describing `cfg` (`Dinov2Config` or `Dinov2WithRegistersConfig`).
///
/// ```
/// use dinov2_model::{weights::transformers_config, VitConfig};
/// let json = transformers_config(&VitConfig::vit_giant2().with_registers(4));
/// assert_eq!(json["model_type"], "dinov2_with_registers");
/// assert_eq!(json["hidden_size"], 1536);
/// assert_eq!(json["num_register_tokens"], 4);
/// assert_eq!(json["use_swiglu_ffn"], true);
/// assert_eq!(json["mlp_ratio"], 4); // an integer, as transformers declares it
/// ```
pub fn transformers_config(cfg: &VitConfig) -> serde_json::Value {
    use serde_json::json;
    let regs = cfg.num_register_tokens > 0;
    // transformers declares `mlp_ratio: int`; write an integer when it is one.
    let ratio = if cfg.mlp_ratio.fract() == 0.0 && cfg.mlp_ratio >= 0.0 {
        json!(cfg.mlp_ratio as u64)
    } else {
        json!(cfg.mlp_ratio)
    };
    let mut v = json!({
        "architectures": [if regs { "Dinov2WithRegistersModel" } else { "Dinov2Model" }],
        "model_type": if regs { "dinov2_with_registers" } else { "dinov2" },
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "mlp_ratio": ratio,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": cfg.layer_norm_eps,
        "image_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.in_chans,
        "qkv_bias": cfg.qkv_bias,
        "layerscale_value": cfg.layer_scale_init.unwrap_or(1.0),
        "drop_path_rate": cfg.drop_path_rate,
        "use_swiglu_ffn": cfg.ffn == FfnKind::Swiglu,
        "apply_layernorm": true,
        "reshape_hidden_states": true,
        "torch_dtype": "float32",
    });
    if let Some(o) = v.as_object_mut() {
        if regs {
            o.insert("num_register_tokens".into(), json!(cfg.num_register_tokens));
        } else {
            o.insert("use_mask_token".into(), json!(true));
        }
    }
    v
}

#[cfg(test)]
mod tests;
