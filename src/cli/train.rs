//! `dinov2 train`: DINOv2 pretraining (or distillation) from a YAML configuration (a thin layer over `dinov2_train::run`).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};
use dinov2_train::run::{Event, RunOptions, StopReason};
use dinov2_train::TrainConfig;
use indicatif::{ProgressBar, ProgressStyle};

/// `dinov2 train` arguments.
#[derive(clap::Args)]
pub struct TrainArgs {
    /// YAML configuration merged onto the defaults (official keys, e.g. the official train/vitl14.yaml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Output directory (checkpoints, teacher.safetensors, metrics); default `train.output_dir`.
    #[arg(long)]
    output_dir: Option<PathBuf>,
    /// Start over even if the output directory holds a checkpoint.
    #[arg(long)]
    no_resume: bool,
    /// Save a checkpoint and exit once N iterations are complete (schedules unchanged).
    #[arg(long, value_name = "N")]
    stop_after_iters: Option<u64>,
    /// Data-parallel runs (`mpirun -np N dinov2 train`): size of the gradient all-reduce buckets, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 25)]
    grad_bucket_mib: usize,
    /// Where the model trains: cpu, cuda or cuda:N (CUDA needs a build with the `cuda` feature; docs/cuda.md).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// The backbones' compute dtype: bf16 or f16 for mixed precision on f32 master weights (heads, losses and
    /// the optimizer stay in f32).
    #[arg(long, value_enum, default_value_t = super::model::Precision::F32)]
    dtype: super::model::Precision,
    /// Official-style overrides, e.g. `optim.epochs=10 train.dataset_path=photos/`.
    #[arg(value_name = "KEY=VALUE")]
    overrides: Vec<String>,
}

/// Runs `dinov2 train`.
pub fn train(args: TrainArgs, comm: std::sync::Arc<dyn dinov2_dist::Communicator>) -> Result<()> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let cfg = TrainConfig::load(args.config.as_deref(), &args.overrides)?;
    let output_dir = args
        .output_dir
        .unwrap_or_else(|| PathBuf::from(&cfg.train.output_dir));
    let mut opts = RunOptions::new(&output_dir);
    opts.resume = !args.no_resume;
    opts.stop_after_iters = args.stop_after_iters;
    opts.device = super::parse_device(&args.device)?;
    // f32 is the master weights' own dtype: no mixed precision
    opts.compute_dtype = Some(args.dtype.dtype()).filter(|&d| d != candle_core::DType::F32);
    opts = opts.with_communicator(comm.clone());
    anyhow::ensure!(
        args.grad_bucket_mib > 0,
        "--grad-bucket-mib must be at least 1"
    );
    opts.grad_bucket_bytes = args.grad_bucket_mib.saturating_mul(1 << 20);
    if world > 1 && rank == 0 {
        eprintln!(
            "data-parallel over {world} ranks ({}): batch {} per rank, {} per step",
            comm.backend(),
            cfg.train.batch_size_per_gpu,
            cfg.train.batch_size_per_gpu * world
        );
    }
    let stop = opts.stop.clone();
    ctrlc::set_handler(move || {
        if stop.swap(true, Ordering::SeqCst) {
            eprintln!("\ninterrupted twice: exiting without saving");
            std::process::exit(130);
        }
        eprintln!(
            "\nCtrl-C: saving a checkpoint after this iteration (press again to exit at once)"
        );
    })
    .context("cannot install the Ctrl-C handler")?;

    // progress on rank 0 only (the other ranks train silently; their errors still reach stderr)
    let bar = if rank == 0 {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    if rank == 0 {
        bar.enable_steady_tick(Duration::from_millis(500));
    }
    let summary = dinov2_train::run::run(&cfg, &opts, &mut |e| match e {
        Event::Started {
            start_iter,
            max_iter,
            resumed_from,
            dataset_len,
        } => {
            bar.set_length(max_iter);
            bar.set_position(start_iter);
            match resumed_from {
                Some(p) => bar.println(format!(
                    "resuming from {} (iteration {start_iter})",
                    p.display()
                )),
                None => bar.println(format!(
                    "training from scratch: {dataset_len} images, {max_iter} iterations"
                )),
            }
        }
        Event::Step {
            report,
            images_per_s,
        } => {
            bar.set_position(report.iteration + 1);
            let terms: Vec<String> = report
                .losses
                .official_log()
                .iter()
                .map(|(k, v)| format!("{}={v:.3}", k.trim_end_matches("_loss")))
                .collect();
            bar.set_message(format!(
                "loss {:.3} ({}) lr {:.2e} {images_per_s:.1} img/s",
                report.losses.total,
                terms.join(" "),
                report.schedule.lr
            ));
        }
        Event::Checkpoint { path } => bar.println(format!("checkpoint {}", path.display())),
        Event::Knn { iteration, results } => {
            let per_k: Vec<String> = results
                .iter()
                .map(|r| format!("k={} top-1 {:.2}% top-5 {:.2}%", r.k, r.top1, r.top5))
                .collect();
            bar.println(format!(
                "k-NN at iteration {iteration}: {}",
                per_k.join(", ")
            ));
        }
        // on stderr even without a terminal: it may state a deviation from the paper (seeded teacher heads)
        Event::DistillationTeacher { info } if rank == 0 => bar.suspend(|| eprintln!("{info}")),
        _ => {}
    });
    bar.finish_and_clear();
    let summary = summary?;
    if rank != 0 {
        return Ok(());
    }
    let how = match summary.reason {
        StopReason::Finished => "finished",
        StopReason::StopAfterIters => "stopped (--stop-after-iters)",
        StopReason::Interrupted => "interrupted",
        _ => "stopped",
    };
    let exported = if cfg.distillation.enabled {
        "student EMA"
    } else {
        "teacher"
    };
    println!(
        "{how} at iteration {}/{}; checkpoint {}; {exported} {}",
        summary.iteration,
        summary.max_iter,
        summary.checkpoint.display(),
        summary.teacher.display()
    );
    Ok(())
}
