//! Full training checkpoints: atomic, the last N kept, resumable to the bit.
//!
//! A checkpoint is a directory `model_{iteration:07}` (the number of completed iterations) under
//! `OUTPUT_DIR/checkpoints/`:
//! * `model.safetensors`: `student.<name>` and `teacher.<name>` for every parameter (official names:
//!   `backbone.…`, `dino_head.…`, `ibot_head.…`), `dino_loss.center` and `ibot_patch_loss.center`;
//! * `optimizer.safetensors`: AdamW's `exp_avg.<name>` / `exp_avg_sq.<name>` (f32), the step counts in its
//!   metadata;
//! * `trainer.json`: the iteration, the data sampler's position (every rank's, for a data-parallel run), the
//!   stochastic-depth generator's state, the format version. A checkpoint of a data-parallel run is written
//!   by rank 0 and is the same as a single process's: it loads with any number of ranks.
//!
//! In a distillation run ([`crate::distill`]) the `teacher.<name>` tensors are the student's EMA (the exported
//! model); the frozen teacher is not saved: it is loaded again from `distillation.teacher_model`.
//!
//! The directory is written under a temporary name, synced, then renamed: a crash mid-write leaves the previous
//! checkpoints as they were, and a half-written one is never mistaken for a checkpoint.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use dinov2_data::rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::meta_arch::SslMetaArch;
use crate::optim::{AdamW, ParamState};

const FORMAT_VERSION: u32 = 1;
const MODEL_FILE: &str = "model.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const TRAINER_FILE: &str = "trainer.json";

/// The scalar state of a run (`trainer.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Format version (1).
    pub version: u32,
    /// Completed iterations: the next iteration to run.
    pub iteration: u64,
    /// Position of the data sampler after the last consumed batch.
    pub sampler_position: u64,
    /// The stochastic-depth generator.
    pub drop_path_rng: RngState,
    /// Data-parallel runs: every rank's sampler position, in rank order (`sampler_position` is rank 0's).
    /// Empty for a single process and in checkpoints of older versions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rank_sampler_positions: Vec<u64>,
}

/// A [`ChaCha8Rng`]'s full state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The 32-byte seed, hex.
    pub seed: String,
    /// The stream.
    pub stream: u64,
    /// The word position (a u128, as decimal text).
    pub word_pos: String,
}

impl RngState {
    /// The state of `rng`.
    ///
    /// ```
    /// use dinov2_data::rand::{RngCore, SeedableRng};
    /// use dinov2_data::rand_chacha::ChaCha8Rng;
    /// use dinov2_train::checkpoint::RngState;
    /// let mut rng = ChaCha8Rng::seed_from_u64(5);
    /// rng.next_u64();
    /// let saved = RngState::of(&rng);
    /// let expected = rng.next_u64();
    /// assert_eq!(saved.restore()?.next_u64(), expected);
    /// # Ok::<(), dinov2_train::Error>(())
    /// ```
    pub fn of(rng: &ChaCha8Rng) -> Self {
        Self {
            seed: rng.get_seed().iter().map(|b| format!("{b:02x}")).collect(),
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos().to_string(),
        }
    }

    /// The generator in this state.
    pub fn restore(&self) -> Result<ChaCha8Rng> {
        use dinov2_data::rand::SeedableRng;
        let bad = |reason: &str| Error::InvalidArgument {
            name: "drop_path_rng",
            reason: reason.to_string(),
        };
        if self.seed.len() != 64 || !self.seed.is_ascii() {
            return Err(bad("the seed must be 64 hex digits"));
        }
        let mut seed = [0u8; 32];
        for (i, b) in seed.iter_mut().enumerate() {
            *b = u8::from_str_radix(&self.seed[2 * i..2 * i + 2], 16)
                .map_err(|_| bad("the seed must be 64 hex digits"))?;
        }
        let word_pos: u128 = self
            .word_pos
            .parse()
            .map_err(|_| bad("the word position must be a decimal integer"))?;
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(word_pos);
        Ok(rng)
    }
}

/// The directory name of the checkpoint after `iteration` completed iterations.
pub fn checkpoint_name(iteration: u64) -> String {
    format!("model_{iteration:07}")
}

/// Saves a full checkpoint into `dir` (created if needed) and returns its path. Pending centre updates are
/// folded in first (the same arithmetic the next step would do, so the run continues bit for bit).
pub fn save(
    dir: impl AsRef<Path>,
    arch: &mut SslMetaArch,
    optimizer: &AdamW,
    state: &TrainerState,
) -> Result<PathBuf> {
    let dir = dir.as_ref();
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let final_path = dir.join(checkpoint_name(state.iteration));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        checkpoint_name(state.iteration),
        std::process::id()
    ));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;

    // model: student, teacher, centres
    let mut model: Vec<(String, Tensor)> = Vec::new();
    for (k, v) in arch.student_parameters() {
        model.push((format!("student.{k}"), v.as_tensor().detach()));
    }
    for (k, v) in arch.teacher_parameters() {
        model.push((format!("teacher.{k}"), v.as_tensor().detach()));
    }
    let loss = arch.loss_mut();
    loss.dino_loss_mut().center_mut().apply_pending()?;
    model.push((
        "dino_loss.center".into(),
        loss.dino_loss().center().tensor().clone(),
    ));
    if let Some(ibot) = loss.ibot_loss_mut() {
        ibot.center_mut().apply_pending()?;
        model.push((
            "ibot_patch_loss.center".into(),
            ibot.center().tensor().clone(),
        ));
    }
    write_safetensors(&tmp.join(MODEL_FILE), model, HashMap::new())?;

    // optimizer
    let mut tensors = Vec::new();
    let mut steps = serde_json::Map::new();
    for p in optimizer.params() {
        if let Some(s) = &p.state {
            let shape = p.var.shape().clone();
            tensors.push((
                format!("exp_avg.{}", p.name),
                Tensor::from_slice(&s.exp_avg, &shape, &Device::Cpu)?,
            ));
            tensors.push((
                format!("exp_avg_sq.{}", p.name),
                Tensor::from_slice(&s.exp_avg_sq, &shape, &Device::Cpu)?,
            ));
            steps.insert(p.name.clone(), s.step.into());
        }
    }
    let meta = HashMap::from([(
        "steps".to_string(),
        serde_json::Value::Object(steps).to_string(),
    )]);
    write_safetensors(&tmp.join(OPTIMIZER_FILE), tensors, meta)?;

    let json =
        serde_json::to_vec_pretty(state).map_err(|e| Error::checkpoint(&tmp, e.to_string()))?;
    write_synced(&tmp.join(TRAINER_FILE), &json)?;
    sync_dir(&tmp)?;

    if final_path.exists() {
        fs::remove_dir_all(&final_path).map_err(|e| Error::io(&final_path, e))?;
    }
    fs::rename(&tmp, &final_path).map_err(|e| Error::io(&final_path, e))?;
    sync_dir(dir)?;
    Ok(final_path)
}

/// Restores a checkpoint into a freshly built `arch` and `optimizer` of the same configuration and returns its
/// scalar state. Every parameter must be in the file with its shape.
pub fn load(
    path: impl AsRef<Path>,
    arch: &mut SslMetaArch,
    optimizer: &mut AdamW,
) -> Result<TrainerState> {
    let path = path.as_ref();
    let text =
        fs::read(path.join(TRAINER_FILE)).map_err(|e| Error::io(path.join(TRAINER_FILE), e))?;
    let state: TrainerState = serde_json::from_slice(&text)
        .map_err(|e| Error::checkpoint(path, format!("{TRAINER_FILE}: {e}")))?;
    if state.version != FORMAT_VERSION {
        return Err(Error::checkpoint(
            path,
            format!(
                "format version {} (this build reads {FORMAT_VERSION})",
                state.version
            ),
        ));
    }
    state.drop_path_rng.restore()?;

    let model = read_safetensors(&path.join(MODEL_FILE))?;
    let get = |key: &str, shape: &[usize]| -> Result<&Tensor> {
        let t = model
            .0
            .get(key)
            .ok_or_else(|| Error::checkpoint(path, format!("{MODEL_FILE} has no `{key}`")))?;
        if t.dims() != shape {
            return Err(Error::checkpoint(
                path,
                format!(
                    "`{key}` has shape {:?}, this run expects {shape:?}",
                    t.dims()
                ),
            ));
        }
        Ok(t)
    };
    for (prefix, params) in [
        ("student", arch.student_parameters()),
        ("teacher", arch.teacher_parameters()),
    ] {
        for (k, v) in params {
            v.set(get(&format!("{prefix}.{k}"), v.dims())?)?;
        }
    }
    let n_expected =
        2 * arch.student_parameters().len() + 1 + usize::from(arch.loss().ibot_loss().is_some());
    if model.0.len() != n_expected {
        return Err(Error::checkpoint(
            path,
            format!(
                "{MODEL_FILE} holds {} tensors, this run's model has {n_expected}: a different configuration",
                model.0.len()
            ),
        ));
    }
    let loss = arch.loss_mut();
    let c = loss.dino_loss().center().tensor().dims().to_vec();
    let center = get("dino_loss.center", &c)?.clone();
    loss.dino_loss_mut().center_mut().set(center)?;
    if let Some(ibot) = loss.ibot_loss_mut() {
        let c = ibot.center().tensor().dims().to_vec();
        ibot.center_mut()
            .set(get("ibot_patch_loss.center", &c)?.clone())?;
    }

    let (opt, meta) = read_safetensors(&path.join(OPTIMIZER_FILE))?;
    let steps: HashMap<String, u64> = meta
        .get("steps")
        .map(|s| serde_json::from_str(s))
        .transpose()
        .map_err(|e| Error::checkpoint(path, format!("{OPTIMIZER_FILE} steps: {e}")))?
        .unwrap_or_default();
    for p in optimizer.params_mut() {
        p.state = match steps.get(&p.name) {
            None => None,
            Some(&step) => {
                let n = p.var.elem_count();
                let vec = |key: String| -> Result<Vec<f32>> {
                    let t = opt.get(&key).ok_or_else(|| {
                        Error::checkpoint(path, format!("{OPTIMIZER_FILE} has no `{key}`"))
                    })?;
                    if t.elem_count() != n {
                        return Err(Error::checkpoint(
                            path,
                            format!("`{key}` has {} values, expected {n}", t.elem_count()),
                        ));
                    }
                    Ok(t.flatten_all()?.to_vec1::<f32>()?)
                };
                Some(ParamState {
                    exp_avg: vec(format!("exp_avg.{}", p.name))?,
                    exp_avg_sq: vec(format!("exp_avg_sq.{}", p.name))?,
                    step,
                })
            }
        };
    }
    Ok(state)
}

/// The checkpoints in `dir`, sorted by iteration (complete ones only: temporary directories and directories
/// without `trainer.json` are ignored).
pub fn list(dir: impl AsRef<Path>) -> Result<Vec<(u64, PathBuf)>> {
    let dir = dir.as_ref();
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let Some(it) = name
            .to_str()
            .and_then(|n| n.strip_prefix("model_"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if entry.path().join(TRAINER_FILE).is_file() {
            out.push((it, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Whether `path` is a complete checkpoint directory (it holds `trainer.json` and `model.safetensors`).
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// assert!(!dinov2_train::checkpoint::is_checkpoint(dir.path()));
/// std::fs::write(dir.path().join("trainer.json"), "{}").unwrap();
/// std::fs::write(dir.path().join("model.safetensors"), "").unwrap();
/// assert!(dinov2_train::checkpoint::is_checkpoint(dir.path()));
/// ```
pub fn is_checkpoint(path: impl AsRef<Path>) -> bool {
    let path = path.as_ref();
    path.join(TRAINER_FILE).is_file() && path.join(MODEL_FILE).is_file()
}

/// The most recent checkpoint in `dir`, if any.
pub fn latest(dir: impl AsRef<Path>) -> Result<Option<PathBuf>> {
    Ok(list(dir)?.pop().map(|(_, p)| p))
}

/// Deletes all but the `keep` most recent checkpoints, and leftovers of interrupted writes.
pub fn prune(dir: impl AsRef<Path>, keep: usize) -> Result<()> {
    let dir = dir.as_ref();
    let all = list(dir)?;
    let n = all.len().saturating_sub(keep);
    for (_, p) in &all[..n] {
        fs::remove_dir_all(p).map_err(|e| Error::io(p, e))?;
    }
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))?.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".model_") && name.contains(".tmp-") {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    Ok(())
}

type Tensors = (HashMap<String, Tensor>, HashMap<String, String>);

fn read_safetensors(path: &Path) -> Result<Tensors> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::checkpoint(path, e.to_string()))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::checkpoint(path, e.to_string()))?;
    let mut out = HashMap::new();
    for (k, v) in st.tensors() {
        if v.dtype() != safetensors::Dtype::F32 {
            return Err(Error::checkpoint(
                path,
                format!("`{k}` is {:?}, expected F32", v.dtype()),
            ));
        }
        let data: Vec<f32> = v
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.insert(k, Tensor::from_vec(data, v.shape(), &Device::Cpu)?);
    }
    Ok((out, meta))
}

fn write_safetensors(
    path: &Path,
    tensors: Vec<(String, Tensor)>,
    meta: HashMap<String, String>,
) -> Result<()> {
    let tensors = tensors
        .into_iter()
        .map(|(k, t)| {
            Ok((
                k,
                t.to_device(&Device::Cpu)?
                    .to_dtype(DType::F32)?
                    .contiguous()?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), Some(meta))
        .map_err(|e| Error::checkpoint(path, e.to_string()))?;
    write_synced(path, &bytes)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

fn sync_dir(dir: &Path) -> Result<()> {
    // directories can be fsynced on Unix; elsewhere opening one may fail, which is not an error here
    if let Ok(f) = fs::File::open(dir) {
        let _ = f.sync_all();
    }
    Ok(())
}
