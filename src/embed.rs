//! Batched feature extraction: images (decoded and preprocessed by `dinov2-data`) or ready pixel tensors
//! through a backbone, collected into the official output tensors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use dinov2_data::decode::load_rgb;
use dinov2_data::preprocess::{preprocess, ImageTensor, Preprocess};
use dinov2_model::DinoVisionTransformer;

/// The four official outputs, concatenated over batches (f32, CPU).
#[derive(Debug, Default)]
pub struct EmbeddingOutputs {
    /// `[B, D]`
    pub cls: Vec<Tensor>,
    /// `[B, N, D]`
    pub patch: Vec<Tensor>,
    /// `[B, R, D]`
    pub reg: Vec<Tensor>,
    /// `[B, 1 + R + N, D]`
    pub prenorm: Vec<Tensor>,
}

impl EmbeddingOutputs {
    /// Runs one batch `[b, 3, H, W]` and appends its outputs.
    pub fn push_batch(&mut self, model: &DinoVisionTransformer, x: &Tensor) -> Result<()> {
        let f = model.forward_features(x, None)?;
        let cpu =
            |t: Tensor| -> Result<Tensor> { Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?) };
        self.cls.push(cpu(f.x_norm_clstoken)?);
        self.patch.push(cpu(f.x_norm_patchtokens)?);
        self.reg.push(cpu(f.x_norm_regtokens)?);
        self.prenorm.push(cpu(f.x_prenorm)?);
        Ok(())
    }

    /// Named tensors as `dinov2 embed` writes them (`x_norm_regtokens` only when the model has registers).
    pub fn into_named(self) -> Result<Vec<(String, Tensor)>> {
        let cat = |v: Vec<Tensor>| -> Result<Tensor> { Ok(Tensor::cat(&v, 0)?) };
        if self.cls.is_empty() {
            bail!("nothing was embedded");
        }
        let mut out = vec![
            ("x_norm_clstoken".to_string(), cat(self.cls)?),
            ("x_norm_patchtokens".to_string(), cat(self.patch)?),
        ];
        let reg = cat(self.reg)?;
        if reg.dim(1)? > 0 {
            out.push(("x_norm_regtokens".to_string(), reg));
        }
        out.push(("x_prenorm".to_string(), cat(self.prenorm)?));
        Ok(out)
    }
}

/// Decodes and preprocesses one image file.
pub fn load_image(path: &Path, pre: &Preprocess) -> Result<ImageTensor> {
    let img = load_rgb(path).with_context(|| format!("cannot read image {}", path.display()))?;
    preprocess(&img, pre).with_context(|| format!("cannot preprocess {}", path.display()))
}

/// Stacks preprocessed images of one size into `[b, 3, H, W]`.
pub fn stack(images: &[ImageTensor], device: &Device) -> Result<Tensor> {
    let first = images.first().context("empty batch")?;
    let mut data = Vec::with_capacity(images.len() * first.data.len());
    for im in images {
        if im.shape() != first.shape() {
            bail!(
                "images of different sizes after preprocessing ({:?} and {:?}); use `--preprocess eval` or a fixed size",
                first.shape(),
                im.shape()
            );
        }
        data.extend_from_slice(&im.data);
    }
    Ok(Tensor::from_vec(
        data,
        (images.len(), first.channels, first.height, first.width),
        device,
    )?)
}

/// Image files under `inputs` (files as given; directories searched recursively, sorted), by extension.
pub fn collect_images(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    const EXT: [&str; 9] = [
        "jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm",
    ];
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot list {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out)?;
            } else if p
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| EXT.contains(&e.to_ascii_lowercase().as_str()))
            {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in inputs {
        if p.is_dir() {
            walk(p, &mut out)?;
        } else if p.is_file() {
            out.push(p.clone());
        } else {
            bail!("{}: no such file or directory", p.display());
        }
    }
    Ok(out)
}

/// Reads `pixel_values` (`[B, 3, H, W]`, already normalised) from a safetensors file.
pub fn read_pixel_values(path: &Path) -> Result<Tensor> {
    let mut map: HashMap<String, Tensor> = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let t = map
        .remove("pixel_values")
        .with_context(|| format!("{} has no `pixel_values` tensor", path.display()))?;
    if t.rank() != 4 || t.dim(1)? != 3 {
        bail!(
            "`pixel_values` in {} has shape {:?}, expected [B, 3, H, W]",
            path.display(),
            t.dims()
        );
    }
    let t = t.to_dtype(DType::F32)?;
    // Refuse NaN and inf: the model would turn them into NaN features without a word.
    let (_, _, h, w) = t.dims4()?;
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        let (b, c, y, x) = (i / (3 * h * w), i / (h * w) % 3, i / w % h, i % w);
        bail!(
            "`pixel_values` in {}: image {b} is not finite ({} at channel {c}, row {y}, column {x})",
            path.display(),
            v[i]
        );
    }
    Ok(t)
}

/// Writes named tensors (and string metadata) to a safetensors file atomically: a temporary file in the same
/// directory, then a rename, so an interrupted run never leaves a truncated output.
pub fn write_safetensors_atomic(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let name = path
        .file_name()
        .context("output path has no file name")?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let views: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    safetensors::serialize_to_file(views, metadata, &tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// A [`dinov2_curate::embed::Embedder`] backed by a DINOv2 model: normalised class tokens of preprocessed images.
pub struct ModelEmbedder {
    /// The backbone.
    pub model: DinoVisionTransformer,
    /// How images are brought to the model's input size.
    pub preprocess: Preprocess,
    /// Device of the forward pass.
    pub device: Device,
}

impl dinov2_curate::embed::Embedder for ModelEmbedder {
    fn dim(&self) -> usize {
        self.model.embed_dim()
    }

    fn embed(&mut self, paths: &[PathBuf]) -> dinov2_curate::Result<Vec<f32>> {
        let err = dinov2_curate::Error::embedder;
        let images = paths
            .iter()
            .map(|p| load_image(p, &self.preprocess))
            .collect::<Result<Vec<_>>>()
            .map_err(err)?;
        let x = stack(&images, &self.device).map_err(err)?;
        let cls = self
            .model
            .forward_features(&x, None)
            .and_then(|f| {
                let t = f.x_norm_clstoken;
                Ok(t.to_device(&Device::Cpu)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?)
            })
            .map_err(dinov2_curate::Error::embedder)?;
        Ok(cls)
    }
}
