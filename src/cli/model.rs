//! The model subcommands: `embed`, `pca`, `convert`, `info`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::ValueEnum;
use dinov2::embed::{
    collect_images, load_image, read_pixel_values, stack, write_safetensors_atomic,
    EmbeddingOutputs,
};
use dinov2_data::preprocess::Preprocess;
use dinov2_model::hub::HubOptions;
use dinov2_model::weights::{save_safetensors_with_config, save_transformers, LoadOptions};
use dinov2_model::{load_model_with, LoadedModel, VitConfig};
use indicatif::{ProgressBar, ProgressStyle};

/// Which weights to load, and how.
#[derive(clap::Args, Clone)]
pub(super) struct ModelArgs {
    /// Weights file or directory (official .pth/.safetensors, transformers dir, timm, training checkpoint),
    /// an official name (dinov2_vits14, dinov2_vitb14_reg, ...) or a Hub id (facebook/dinov2-small).
    #[arg(long)]
    pub(super) model: String,
    /// A VitConfig JSON for checkpoints whose configuration cannot be inferred (custom widths).
    #[arg(long)]
    pub(super) config: Option<PathBuf>,
    /// For training checkpoints: the top-level entry to read (teacher, student, model).
    #[arg(long)]
    pub(super) checkpoint_key: Option<String>,
    /// Compute dtype.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub(super) dtype: Precision,
    /// Where the model runs: cpu, cuda or cuda:N (CUDA needs a build with the `cuda` feature; docs/cuda.md).
    #[arg(long, default_value = "cpu")]
    pub(super) device: String,
}

impl ModelArgs {
    /// A model spec with the defaults (f32, inferred configuration).
    pub(super) fn named(model: String) -> Self {
        Self {
            model,
            config: None,
            checkpoint_key: None,
            dtype: Precision::F32,
            device: "cpu".into(),
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub(super) enum Precision {
    F32,
    Bf16,
    F16,
}

impl Precision {
    pub(super) fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::F16 => DType::F16,
        }
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
pub(super) enum PreprocessMode {
    /// Official eval transform: resize the shorter side to --resize (bicubic), center-crop --crop.
    Eval,
    /// Resize so both sides are multiples of the patch size (shorter side near --size when given).
    Resize,
    /// Keep the image; center-pad to multiples of the patch size.
    Pad,
    /// Keep the image; it must already be a multiple of the patch size.
    Exact,
}

#[derive(Clone, Copy, ValueEnum)]
pub(super) enum OutFormat {
    /// Official parameter names, safetensors (the model configuration in its metadata).
    Official,
    /// Hugging Face transformers directory (config.json + model.safetensors).
    Transformers,
}

pub(super) fn load(args: &ModelArgs) -> Result<LoadedModel> {
    let config = match &args.config {
        Some(p) => Some(
            serde_json::from_str::<VitConfig>(
                &std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read {}", p.display()))?,
            )
            .with_context(|| format!("{} is not a VitConfig JSON", p.display()))?,
        ),
        None => None,
    };
    let opts = LoadOptions {
        config,
        checkpoint_key: args.checkpoint_key.clone(),
    };
    load_model_with(
        &args.model,
        &HubOptions::from_env(),
        &opts,
        &super::parse_device(&args.device)?,
        args.dtype.dtype(),
    )
    .with_context(|| format!("cannot load model `{}`", args.model))
}

pub(super) fn preprocess_of(
    mode: PreprocessMode,
    resize: u32,
    crop: u32,
    size: Option<u32>,
    patch: u32,
) -> Preprocess {
    match mode {
        PreprocessMode::Eval => Preprocess::Eval { resize, crop },
        PreprocessMode::Resize => Preprocess::ResizeToMultiple {
            multiple: patch,
            shorter_side: size,
        },
        PreprocessMode::Pad => Preprocess::CenterPad { multiple: patch },
        PreprocessMode::Exact => Preprocess::Exact { multiple: patch },
    }
}

fn progress(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(&format!(
        "{{spinner}} {what} [{{elapsed_precise}}] {{bar:40}} {{pos}}/{{len}} ({{per_sec}}, eta {{eta}})"
    )) {
        pb.set_style(style);
    }
    pb
}

/// `dinov2 embed`.
#[allow(clippy::too_many_arguments)]
pub(super) fn embed(
    model: &ModelArgs,
    images: &[PathBuf],
    pixel_values: Option<&PathBuf>,
    output: &Path,
    batch_size: usize,
    pre: impl FnOnce(u32) -> Preprocess,
    skip_bad: bool,
) -> Result<()> {
    if batch_size == 0 {
        bail!("--batch-size must be positive");
    }
    let loaded = load(model)?;
    let m = &loaded.model;
    let pre = pre(m.config().patch_size as u32);
    let mut out = EmbeddingOutputs::default();
    let mut meta = HashMap::new();
    meta.insert("model".to_string(), model.model.clone());
    meta.insert("config".to_string(), serde_json::to_string(m.config())?);
    if let Some(pv) = pixel_values {
        let x = read_pixel_values(pv)?;
        let n = x.dim(0)?;
        let pb = progress(n as u64, "embedding");
        for start in (0..n).step_by(batch_size) {
            let b = batch_size.min(n - start);
            out.push_batch(m, &x.narrow(0, start, b)?)?;
            pb.inc(b as u64);
        }
        pb.finish_and_clear();
    } else {
        let files = collect_images(images)?;
        if files.is_empty() {
            bail!("no images found in {images:?}");
        }
        let pb = progress(files.len() as u64, "embedding");
        let mut done = Vec::new();
        let mut bad = Vec::new();
        for chunk in files.chunks(batch_size) {
            let mut batch = Vec::with_capacity(chunk.len());
            for p in chunk {
                match load_image(p, &pre) {
                    Ok(t) => {
                        batch.push(t);
                        done.push(p.display().to_string());
                    }
                    Err(e) if skip_bad => {
                        pb.println(format!("warning: skipping {e:#}"));
                        bad.push(p.display().to_string());
                    }
                    Err(e) => return Err(e.context("use --skip-bad to skip unreadable images")),
                }
            }
            if !batch.is_empty() {
                out.push_batch(m, &stack(&batch, m.device())?)?;
            }
            pb.inc(chunk.len() as u64);
        }
        pb.finish_and_clear();
        if !bad.is_empty() {
            eprintln!("skipped {} unreadable image(s)", bad.len());
        }
        meta.insert("paths".to_string(), serde_json::to_string(&done)?);
    }
    let named = out.into_named()?;
    let n = named[0].1.dim(0)?;
    write_safetensors_atomic(output, &named, Some(meta))?;
    eprintln!("wrote {n} embeddings to {}", output.display());
    Ok(())
}

/// `dinov2 pca`.
pub(super) fn pca(model: &ModelArgs, image: &Path, output: &Path, size: u32) -> Result<()> {
    let loaded = load(model)?;
    let p = loaded.model.config().patch_size as u32;
    let pre = Preprocess::ResizeToMultiple {
        multiple: p,
        shorter_side: Some(size),
    };
    let x = stack(&[load_image(image, &pre)?], loaded.model.device())?;
    let f = loaded.model.forward_features(&x, None)?;
    let picture = dinov2::pca::pca_image(&f.x_norm_patchtokens.squeeze(0)?, f.grid, p)?;
    let dir = output
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".pca.tmp-{}.png", std::process::id()));
    picture
        .save(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, output)?;
    eprintln!(
        "wrote {} ({}x{} patches)",
        output.display(),
        f.grid.0,
        f.grid.1
    );
    Ok(())
}

/// `dinov2 convert`.
pub(super) fn convert(model: &ModelArgs, output: &Path, format: OutFormat) -> Result<()> {
    let loaded = load(model)?;
    let sd = &loaded.weights.state_dict;
    match format {
        OutFormat::Official => save_safetensors_with_config(sd, &loaded.weights.config, output)?,
        OutFormat::Transformers => save_transformers(sd, &loaded.weights.config, output)?,
    }
    eprintln!("wrote {}", output.display());
    Ok(())
}

/// `dinov2 info`.
pub(super) fn info(model: &ModelArgs) -> Result<()> {
    let loaded = load(model)?;
    println!("format: {:?}", loaded.weights.format);
    println!("{}", serde_json::to_string_pretty(&loaded.weights.config)?);
    if !loaded.weights.extra.is_empty() {
        println!(
            "other tensors: {}",
            loaded
                .weights
                .extra
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}
