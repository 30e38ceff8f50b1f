//! The `dinov2` command line: [`Cli`] (clap) and [`run`], which dispatches to the model subcommands
//! ([`model`]), the curation stages ([`curate`]), training ([`train`]) and evaluation ([`eval`]).

mod curate;
mod eval;
mod eval_linear;
mod model;
mod train;

use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use dinov2_dist::Communicator;

use self::model::{ModelArgs, OutFormat, PreprocessMode};

/// `dinov2 [--threads N] <command>`.
#[derive(Parser)]
#[command(
    name = "dinov2",
    version,
    about = "DINOv2 in Rust: pretraining, evaluation, features, PCA pictures, weight conversion, data curation"
)]
pub struct Cli {
    /// Worker threads (default: all cores; also RAYON_NUM_THREADS).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Embed images (or a pixel tensor) into x_norm_clstoken / x_norm_patchtokens / x_norm_regtokens / x_prenorm.
    Embed {
        #[command(flatten)]
        model: ModelArgs,
        /// Image files or directories (searched recursively).
        #[arg(long, num_args = 1.., required_unless_present = "pixel_values", conflicts_with = "pixel_values")]
        images: Vec<std::path::PathBuf>,
        /// A safetensors file with `pixel_values` f32 [B, 3, H, W], already normalised.
        #[arg(long)]
        pixel_values: Option<std::path::PathBuf>,
        /// Output safetensors file.
        #[arg(long)]
        output: std::path::PathBuf,
        /// Images per forward pass.
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        /// How images are brought to the model's input.
        #[arg(long, value_enum, default_value_t = PreprocessMode::Eval)]
        preprocess: PreprocessMode,
        /// Eval mode: shorter side before cropping.
        #[arg(long, default_value_t = 256)]
        resize: u32,
        /// Eval mode: center-crop size.
        #[arg(long, default_value_t = 224)]
        crop: u32,
        /// Resize mode: target shorter side.
        #[arg(long)]
        size: Option<u32>,
        /// Skip unreadable images (listed at the end) instead of stopping at the first.
        #[arg(long)]
        skip_bad: bool,
    },
    /// Write the first-3-principal-components picture of an image's patch features as a PNG.
    Pca {
        #[command(flatten)]
        model: ModelArgs,
        /// Input image.
        #[arg(long)]
        image: std::path::PathBuf,
        /// Output PNG.
        #[arg(long)]
        output: std::path::PathBuf,
        /// Shorter side of the model input (rounded to the patch size).
        #[arg(long, default_value_t = 448)]
        size: u32,
    },
    /// Convert weights to official-named safetensors or a transformers directory.
    Convert {
        #[command(flatten)]
        model: ModelArgs,
        /// Output file (official) or directory (transformers).
        #[arg(long)]
        output: std::path::PathBuf,
        #[arg(long, value_enum, default_value_t = OutFormat::Official)]
        format: OutFormat,
    },
    /// Print a checkpoint's detected format and configuration.
    Info {
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Data curation: embed, dedup, knn, retrieve, kmeans, hkmeans, sample.
    #[command(subcommand)]
    Curate(curate::CurateCommand),
    /// DINOv2 self-supervised pretraining from a YAML configuration (official keys), resumable; with a
    /// `distillation` section, distillation from a frozen pretrained teacher.
    Train(train::TrainArgs),
    /// Evaluate a frozen backbone on image folders: k-NN, linear probe.
    #[command(subcommand)]
    Eval(eval::EvalCommand),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    if let Some(t) = cli.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
            .context("cannot size the thread pool")?;
    }
    match cli.command {
        Command::Embed {
            model,
            images,
            pixel_values,
            output,
            batch_size,
            preprocess,
            resize,
            crop,
            size,
            skip_bad,
        } => {
            // The patch size is the loaded model's (its --config, its metadata or its tensors).
            let pre = |patch| model::preprocess_of(preprocess, resize, crop, size, patch);
            model::embed(
                &model,
                &images,
                pixel_values.as_ref(),
                &output,
                batch_size,
                pre,
                skip_bad,
            )
        }
        Command::Pca {
            model,
            image,
            output,
            size,
        } => model::pca(&model, &image, &output, size),
        Command::Convert {
            model,
            output,
            format,
        } => model::convert(&model, &output, format),
        Command::Info { model } => model::info(&model),
        Command::Curate(cmd) => with_communicator(|comm| curate::run(cmd, comm)),
        Command::Train(args) => with_communicator(|comm| train::train(args, comm)),
        Command::Eval(cmd) => eval::run(cmd),
    }
}

/// Runs a command that can span processes on the communicator its launcher asked for (one process alone, MPI
/// under `mpirun`). When one rank of several fails, it prints its error and aborts the group (`MPI_Abort`), so
/// the other ranks stop instead of waiting for it in their next collective.
fn with_communicator(f: impl FnOnce(Arc<dyn Communicator>) -> Result<()>) -> Result<()> {
    let comm = dinov2_dist::from_env().context("cannot join the process group")?;
    let (rank, world) = (comm.rank(), comm.world_size());
    let res = f(comm.clone());
    if let Err(e) = &res {
        if world > 1 {
            eprintln!("Error on rank {rank} of {world}: {e:?}");
            comm.abort(1);
        }
    }
    res
}

/// `--device`: `cpu`, `cuda` (device 0) or `cuda:N`.
pub(crate) fn parse_device(spec: &str) -> Result<candle_core::Device> {
    let ordinal = match spec.trim() {
        "cpu" => return Ok(candle_core::Device::Cpu),
        "cuda" => 0,
        s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => anyhow::bail!("--device `{spec}`: expected cpu, cuda or cuda:N"),
        },
    };
    if !cfg!(feature = "cuda") {
        anyhow::bail!(
            "--device {spec}: this dinov2 was built without CUDA; build with `tools/build_cuda.sh build --features cuda` \
             (docs/cuda.md)"
        );
    }
    candle_core::Device::new_cuda(ordinal)
        .with_context(|| format!("cannot open CUDA device {ordinal}"))
}

#[cfg(test)]
mod tests {
    use super::parse_device;

    #[test]
    fn device_specs() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        for bad in ["gpu", "cuda:", "cuda:x", "cuda0"] {
            let e = parse_device(bad).unwrap_err().to_string();
            assert!(e.contains("expected cpu, cuda or cuda:N"), "{bad}: {e}");
        }
        if !cfg!(feature = "cuda") {
            let e = parse_device("cuda:1").unwrap_err().to_string();
            assert!(
                e.contains("built without CUDA") && e.contains("tools/build_cuda.sh"),
                "{e}"
            );
        }
    }
}
