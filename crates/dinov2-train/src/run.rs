//! A whole run from a [`TrainConfig`]: data, model, resume, checkpoints, metrics, export (what `dinov2 train`
//! does; `train/train.py: do_train`).
//!
//! **Data-parallel** ([`RunOptions::communicator`] of more than one rank, e.g. `mpirun -np N dinov2 train`):
//! every rank runs [`run`] with the same configuration and output directory (a shared file system). Rank `r`
//! of `N` reads its shard of the dataset (`ShardedInfiniteSampler` with `rank = r, world = N`; its own
//! augmentation seeds), `train.batch_size_per_gpu` images per step, so a step sees `N × batch_size_per_gpu`
//! images and the learning rate follows the official scaling rule for that global batch; gradients are averaged
//! over the ranks ([`crate::data_parallel`]). Rank 0 alone writes the configuration, the metrics, the
//! checkpoints, the exported teacher and the plot, and runs the k-NN evaluation; the other ranks wait for each
//! checkpoint to be complete before they go on. A checkpoint holds every rank's sampler position and loads
//! with any number of ranks (same number: each rank continues its exact data order; another number: each
//! rank's new shard from rank 0's position, see [`Trainer::restore`]). The logged losses are the means over
//! the ranks, the throughput is global images per second. [`Event`]s are emitted on every rank.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use dinov2_data::{
    Dataset, DinoPipeline, Loader, LoaderConfig, Preprocess, ShardedInfiniteSampler,
};
use dinov2_dist::{Communicator, SingleProcess};

use crate::checkpoint;
use crate::config::TrainConfig;
use crate::data_parallel::{DataParallel, DEFAULT_BUCKET_BYTES};
use crate::error::{Error, Result};
use crate::eval::knn::{embed_dataset_with, knn_evaluate, metrics_json, KnnAccuracy};
use crate::meta_arch::{SslMetaArch, SslMetaArchConfig, StepBatch};
use crate::optim::AdamWConfig;
use crate::schedules::ScheduleConfig;
use crate::trainer::{OptimSettings, StepReport, Trainer};

/// The metrics file: one JSON object per logged iteration.
pub const METRICS_FILE: &str = "training_metrics.jsonl";
/// The loss-curve plot next to it.
pub const PLOT_FILE: &str = "training_metrics.png";
/// The exported teacher backbone (official key names, its `VitConfig` in the metadata).
pub const TEACHER_FILE: &str = "teacher.safetensors";
/// The merged configuration of the run.
pub const CONFIG_FILE: &str = "config.yaml";
/// The checkpoint directory.
pub const CHECKPOINT_DIR: &str = "checkpoints";

/// How to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Where everything goes.
    pub output_dir: PathBuf,
    /// Resume from the latest checkpoint in `output_dir` when there is one (the default, as official).
    pub resume: bool,
    /// Save and stop once this many iterations are complete (the schedules are unchanged).
    pub stop_after_iters: Option<u64>,
    /// Set it (from a Ctrl-C handler, say) to save and stop after the current iteration (data-parallel: when it
    /// is set on any rank, every rank stops after the same iteration).
    pub stop: Arc<AtomicBool>,
    /// The ranks of a data-parallel run ([`SingleProcess`] by default; see the [module docs](self)).
    pub communicator: Arc<dyn Communicator>,
    /// Bucket size of the gradient all-reduce (data-parallel only).
    pub grad_bucket_bytes: usize,
    /// Where the model runs (`Device::Cpu` by default; a CUDA device needs the `cuda` feature).
    pub device: Device,
    /// Mixed precision: the backbones compute in this dtype (bf16 on CUDA, say) on f32 master weights
    /// ([`SslMetaArch::set_compute_dtype`]); `None` (the default) computes in f32.
    pub compute_dtype: Option<candle_core::DType>,
}

impl RunOptions {
    /// Resume on, no early stop.
    pub fn new(output_dir: impl Into<PathBuf>) -> Self {
        Self {
            output_dir: output_dir.into(),
            resume: true,
            stop_after_iters: None,
            stop: Arc::new(AtomicBool::new(false)),
            communicator: Arc::new(SingleProcess),
            grad_bucket_bytes: DEFAULT_BUCKET_BYTES,
            device: Device::Cpu,
            compute_dtype: None,
        }
    }

    /// Data-parallel over `comm` (this process is `comm.rank()` of `comm.world_size()`).
    pub fn with_communicator(mut self, comm: Arc<dyn Communicator>) -> Self {
        self.communicator = comm;
        self
    }
}

/// Progress of a run, for a progress bar or a log.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event<'a> {
    /// The run starts at `start_iter` of `max_iter` (resumed from a checkpoint, or not).
    Started {
        /// First iteration to run.
        start_iter: u64,
        /// Iterations of the whole run.
        max_iter: u64,
        /// The checkpoint resumed from.
        resumed_from: Option<&'a Path>,
        /// Dataset size.
        dataset_len: usize,
    },
    /// One iteration done.
    Step {
        /// What it did.
        report: &'a StepReport,
        /// Images per second over the logging window.
        images_per_s: f64,
    },
    /// A checkpoint was written.
    Checkpoint {
        /// Its directory.
        path: &'a Path,
    },
    /// The periodic k-NN evaluation of the teacher ran (`evaluation.knn_*`).
    Knn {
        /// Iterations completed when it ran.
        iteration: u64,
        /// Accuracy per k, in the order of `evaluation.knn_nb_knn`.
        results: &'a [KnnAccuracy],
    },
    /// Distillation: the frozen teacher was loaded (before [`Event::Started`]; its `Display` is a log line).
    DistillationTeacher {
        /// What was loaded.
        info: &'a crate::distill::TeacherInfo,
    },
}

/// Why the run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopReason {
    /// All iterations done.
    Finished,
    /// `stop_after_iters` reached.
    StopAfterIters,
    /// The stop flag was set (Ctrl-C).
    Interrupted,
}

/// The outcome of [`run`].
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// Completed iterations of the run (all sessions).
    pub iteration: u64,
    /// Iterations of the whole run.
    pub max_iter: u64,
    /// The last checkpoint written.
    pub checkpoint: PathBuf,
    /// The exported model: the teacher backbone ([`TEACHER_FILE`]), or in a distillation run the student's EMA
    /// ([`STUDENT_EMA_FILE`](crate::distill::STUDENT_EMA_FILE)).
    pub teacher: PathBuf,
    /// Why it stopped.
    pub reason: StopReason,
}

/// The meta-architecture of a configuration (official init, seeded by `train.seed`; `student.pretrained_weights`
/// loaded into the student's backbone when set; the teacher a copy of the student). For pretraining: a
/// distillation run builds its networks with [`crate::distill::build_arch`].
pub fn build_arch(cfg: &TrainConfig, device: &Device) -> Result<SslMetaArch> {
    let student = cfg.student_vit()?;
    let d = student.embed_dim;
    let arch_cfg = SslMetaArchConfig {
        student,
        dino_head: cfg.dino_head(d),
        ibot_head: cfg.ibot_head(d),
        loss: cfg.loss(),
    };
    let arch = SslMetaArch::new(arch_cfg, cfg.train.seed, device)?;
    let pretrained = cfg.student.pretrained_weights.trim();
    if pretrained.is_empty() {
        return Ok(arch);
    }
    // official: a non-strict load into the student backbone, before the teacher copy
    let w = dinov2_model::weights::load_weights(pretrained)?;
    let mut loaded = 0;
    for (prefix, params) in [
        ("backbone.", arch.student_parameters()),
        ("backbone.", arch.teacher_parameters()),
    ] {
        for (k, v) in params {
            if let Some(t) = k.strip_prefix(prefix).and_then(|k| w.state_dict.get(k)) {
                if t.dims() != v.dims() {
                    return Err(Error::invalid(
                        "student.pretrained_weights",
                        pretrained,
                        format!(
                            "`{k}` has shape {:?} there, {:?} in this model",
                            t.dims(),
                            v.dims()
                        ),
                    ));
                }
                v.set(&t.to_dtype(v.dtype())?.to_device(device)?)?;
                loaded += 1;
            }
        }
    }
    if loaded == 0 {
        return Err(Error::invalid(
            "student.pretrained_weights",
            pretrained,
            "no tensor of the file matches the student backbone",
        ));
    }
    Ok(arch)
}

/// The optimisation settings of a configuration (`lr` by the scaling rule for one process).
pub fn optim_settings(cfg: &TrainConfig) -> OptimSettings {
    optim_settings_for(cfg, 1)
}

/// The optimisation settings of a configuration trained on `world_size` data-parallel ranks (`lr` by the
/// scaling rule for the global batch, `batch_size_per_gpu × world_size`).
///
/// ```
/// let cfg = dinov2_train::TrainConfig::default();
/// let (one, four) = (dinov2_train::run::optim_settings(&cfg), dinov2_train::run::optim_settings_for(&cfg, 4));
/// assert_eq!(four.schedules.lr, 2.0 * one.schedules.lr);
/// ```
pub fn optim_settings_for(cfg: &TrainConfig, world_size: usize) -> OptimSettings {
    let (o, t) = (&cfg.optim, &cfg.teacher);
    OptimSettings {
        schedules: ScheduleConfig {
            lr: cfg.lr(world_size.max(1)),
            min_lr: o.min_lr,
            epochs: o.epochs,
            epoch_length: cfg.train.OFFICIAL_EPOCH_LENGTH,
            warmup_epochs: o.warmup_epochs,
            freeze_last_layer_epochs: o.freeze_last_layer_epochs,
            weight_decay: o.weight_decay,
            weight_decay_end: o.weight_decay_end,
            momentum_teacher: t.momentum_teacher,
            final_momentum_teacher: t.final_momentum_teacher,
            warmup_teacher_temp: t.warmup_teacher_temp,
            teacher_temp: t.teacher_temp,
            warmup_teacher_temp_epochs: t.warmup_teacher_temp_epochs,
        },
        adamw: AdamWConfig {
            beta1: o.adamw_beta1,
            beta2: o.adamw_beta2,
            ..AdamWConfig::default()
        },
        layerwise_decay: o.layerwise_decay,
        patch_embed_lr_mult: o.patch_embed_lr_mult,
        clip_grad: o.clip_grad,
    }
}

/// Trains as configured (see the [module docs](self)). Resumes from the latest checkpoint of
/// `opts.output_dir` unless `opts.resume` is off; otherwise starts from `MODEL.WEIGHTS` when it names a
/// checkpoint directory. A non-finite loss stops the run with [`Error::NonFiniteLoss`] naming the last good
/// checkpoint.
pub fn run(
    cfg: &TrainConfig,
    opts: &RunOptions,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<RunSummary> {
    cfg.validate()?;
    let comm = opts.communicator.clone();
    let (rank, world) = (comm.rank(), comm.world_size());
    let lead = rank == 0;
    let out = &opts.output_dir;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    // what rank 0 alone does is wrapped in `on_lead`, which hands its outcome (or its error) to the others
    on_lead(comm.as_ref(), || {
        let mut saved_cfg = cfg.clone();
        saved_cfg.apply_scaling_rules(world);
        crate::plot::write_atomic(&out.join(CONFIG_FILE), saved_cfg.to_yaml().as_bytes())?;
        Ok(None)
    })?;

    let device = opts.device.clone();
    let mut arch = if cfg.distillation.enabled {
        let (arch, info) = crate::distill::build_arch(cfg, &device)?;
        on_event(Event::DistillationTeacher { info: &info });
        arch
    } else {
        build_arch(cfg, &device)?
    };
    arch.set_compute_dtype(opts.compute_dtype);
    let dp = DataParallel::new(comm.clone()).with_bucket_bytes(opts.grad_bucket_bytes)?;
    let mut trainer = Trainer::new(arch, &optim_settings_for(cfg, world), cfg.train.seed)?
        .with_data_parallel(dp)?;
    let ckpt_dir = out.join(CHECKPOINT_DIR);
    // rank 0 decides (archives a previous run, finds the checkpoint), every rank reads the same checkpoint
    let resumed_from = on_lead(comm.as_ref(), || {
        let mut resumed_from = None;
        if opts.resume {
            resumed_from = checkpoint::latest(&ckpt_dir)?;
        } else {
            archive_previous_run(out)?;
        }
        let weights = cfg.model.weights.trim();
        if resumed_from.is_none() && !weights.is_empty() {
            resumed_from = Some(PathBuf::from(weights));
        }
        Ok(resumed_from)
    })?;
    if let Some(p) = &resumed_from {
        trainer.restore(p)?;
    }
    let start = trainer.iteration();
    let max_iter = trainer.max_iter();
    let mut knn = None;
    on_lead(comm.as_ref(), || {
        trim_metrics(&out.join(METRICS_FILE), start)?;
        knn = PeriodicKnn::open(cfg)?;
        Ok(None)
    })?;
    let dataset = dinov2_data::open_dataset(&cfg.train.dataset_path)?;
    let dataset_len = dataset.len();
    let batch_size = cfg.train.batch_size_per_gpu;
    let mut sampler = ShardedInfiniteSampler::new(dataset_len, cfg.train.seed, rank, world, true)?;
    sampler.seek(trainer.sampler_position());
    let pipeline = DinoPipeline {
        augmentation: cfg.augmentation()?,
        masking: cfg.masking(),
    };
    let loader_cfg = LoaderConfig {
        batch_size,
        num_threads: cfg.train.num_workers.max(1),
        seed: cfg.train.seed,
        rank,
        start_step: start,
        drop_last: true,
        ..LoaderConfig::default()
    };
    let mut loader = Loader::new(dataset, sampler, Arc::new(pipeline), loader_cfg)?;
    on_event(Event::Started {
        start_iter: start,
        max_iter,
        resumed_from: resumed_from.as_deref(),
        dataset_len,
    });

    let period = cfg.checkpoint_period().max(1);
    let log_period = cfg.train.log_period.max(1);
    let mut last_checkpoint = resumed_from.clone();
    let mut window = (Instant::now(), 0usize);
    let reason = loop {
        let it = trainer.iteration();
        if it >= max_iter {
            break StopReason::Finished;
        }
        if opts.stop_after_iters.is_some_and(|n| it >= n) {
            break StopReason::StopAfterIters;
        }
        let mut stop = [f64::from(u8::from(opts.stop.load(Ordering::SeqCst)))];
        if world > 1 {
            comm.all_reduce_sum_f64(&mut stop)?; // every rank stops after the same iteration
        }
        if stop[0] > 0.0 {
            break StopReason::Interrupted;
        }
        let loaded = loader.next().ok_or_else(|| Error::InvalidArgument {
            name: "train.dataset_path",
            reason: "the data loader stopped".into(),
        })??;
        let batch = StepBatch::from_batch(&loaded.batch, &device)?;
        let report = match trainer.step(&batch) {
            Err(Error::NonFiniteLoss {
                iteration, terms, ..
            }) => {
                return Err(Error::NonFiniteLoss {
                    iteration,
                    terms,
                    last_checkpoint,
                })
            }
            r => r?,
        };
        trainer.set_sampler_position(loaded.next_position);
        window.1 += batch_size * world;
        let done = trainer.iteration();
        let logged = done % log_period == 0 || done == max_iter || it == start;
        let secs = window.0.elapsed().as_secs_f64().max(1e-9);
        let images_per_s = window.1 as f64 / secs;
        on_event(Event::Step {
            report: &report,
            images_per_s,
        });
        if logged && lead {
            append_metrics(&out.join(METRICS_FILE), &report, images_per_s, batch_size)?;
            window = (Instant::now(), 0);
        }
        if let Some(knn) = knn.as_ref().filter(|k| k.due(done, max_iter)) {
            let results = knn.evaluate(trainer.arch())?;
            knn.log(&out.join(METRICS_FILE), report.iteration, &results)?;
            on_event(Event::Knn {
                iteration: done,
                results: &results,
            });
            window = (Instant::now(), 0); // the evaluation's time is not training throughput
        }
        if done % period == 0 && done < max_iter {
            let p = save_collective(&mut trainer, out, cfg)?;
            on_event(Event::Checkpoint { path: &p });
            last_checkpoint = Some(p);
        }
    };
    drop(loader);
    // whether the last checkpoint is the current state (rank 0 looks, every rank follows)
    let reuse = on_lead(comm.as_ref(), || {
        Ok(match &last_checkpoint {
            Some(p)
                if p.starts_with(&ckpt_dir)
                    && checkpoint::list(&ckpt_dir)?.last().map(|(i, _)| *i)
                        == Some(trainer.iteration()) =>
            {
                Some(p.clone())
            }
            _ => None,
        })
    })?;
    let checkpoint = match reuse {
        Some(p) => p,
        None => {
            let p = save_collective(&mut trainer, out, cfg)?;
            on_event(Event::Checkpoint { path: &p });
            p
        }
    };
    Ok(RunSummary {
        iteration: trainer.iteration(),
        max_iter,
        checkpoint,
        teacher: out.join(export_file(cfg)),
        reason,
    })
}

/// The k-NN evaluation of the teacher during a run (`evaluation.knn_*`), its datasets opened once at the start
/// so that a wrong path fails before any training.
struct PeriodicKnn {
    train: Arc<dyn Dataset>,
    val: Arc<dyn Dataset>,
    transform: Preprocess,
    ks: Vec<usize>,
    temperature: f64,
    batch_size: usize,
    period: u64,
}

impl PeriodicKnn {
    fn open(cfg: &TrainConfig) -> Result<Option<Self>> {
        let e = &cfg.evaluation;
        if !e.knn_enabled() {
            return Ok(None);
        }
        let (train, val) = crate::eval::eval_datasets(&e.knn_train_dataset, &e.knn_val_dataset)?;
        // the official eval transform scaled to the global crop: resize 256 / crop 224 at 224
        let crop = cfg.crops.global_crops_size;
        let crop = u32::try_from(crop).map_err(|_| {
            Error::invalid("crops.global_crops_size", crop, "is too large to evaluate")
        })?;
        Ok(Some(Self {
            train,
            val,
            transform: Preprocess::eval_at(crop),
            ks: e.knn_nb_knn.clone(),
            temperature: e.knn_temperature,
            batch_size: cfg.train.batch_size_per_gpu.max(1),
            period: e.eval_period_iterations.max(1),
        }))
    }

    /// Every `eval_period_iterations` iterations, and after the last.
    fn due(&self, done: u64, max_iter: u64) -> bool {
        done % self.period == 0 || done == max_iter
    }

    /// The teacher backbone's k-NN accuracies (the official evaluation runs on the teacher).
    fn evaluate(&self, arch: &SslMetaArch) -> Result<Vec<KnnAccuracy>> {
        let teacher = arch.teacher().backbone.detached();
        let (train, train_labels) = embed_dataset_with(
            &teacher,
            self.train.as_ref(),
            self.transform,
            self.batch_size,
        )?;
        let (val, val_labels) =
            embed_dataset_with(&teacher, self.val.as_ref(), self.transform, self.batch_size)?;
        knn_evaluate(
            &train,
            &train_labels,
            &val,
            &val_labels,
            &self.ks,
            self.temperature,
        )
    }

    /// `{"iteration": i, "knn": {"<k>": {"top1": .., "top5": ..}}}` in the metrics log, `i` the iteration that
    /// ran last (as the loss lines), so a resume trims it with them.
    fn log(&self, path: &Path, iteration: u64, results: &[KnnAccuracy]) -> Result<()> {
        let line = serde_json::json!({ "iteration": iteration, "knn": metrics_json(results) });
        append_line(path, &line.to_string())
    }
}

/// Starting over in a directory that holds a run: its checkpoints and outputs move to `previous-<unix time>/`
/// (nothing is deleted, and a later resume cannot pick up the old run's checkpoints).
fn archive_previous_run(out: &Path) -> Result<()> {
    let names = [
        CHECKPOINT_DIR,
        METRICS_FILE,
        PLOT_FILE,
        TEACHER_FILE,
        crate::distill::STUDENT_EMA_FILE,
    ];
    if !names.iter().any(|n| out.join(n).exists()) {
        return Ok(());
    }
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut dest = out.join(format!("previous-{secs}"));
    let mut n = 1;
    while dest.exists() {
        dest = out.join(format!("previous-{secs}-{n}"));
        n += 1;
    }
    std::fs::create_dir_all(&dest).map_err(|e| Error::io(&dest, e))?;
    for name in names {
        let src = out.join(name);
        if src.exists() {
            std::fs::rename(&src, dest.join(name)).map_err(|e| Error::io(&src, e))?;
        }
    }
    Ok(())
}

/// Runs `f` on rank 0 alone and hands its outcome to the other ranks (a collective): its optional path on every
/// rank, or its error (on rank 0) and [`Error::RankFailed`] with its text (on the others), so that a failure of
/// rank 0's own work does not leave the others waiting. One rank: just `f`.
fn on_lead(
    comm: &dyn Communicator,
    f: impl FnOnce() -> Result<Option<PathBuf>>,
) -> Result<Option<PathBuf>> {
    if comm.rank() == 0 {
        lead_result(comm, f)
    } else {
        follow_result(comm)
    }
}

/// Runs `f` on rank 0 and tells the other ranks its outcome ([`follow_result`]): an optional path, or the
/// error's text. One rank: just `f`.
fn lead_result(
    comm: &dyn Communicator,
    f: impl FnOnce() -> Result<Option<PathBuf>>,
) -> Result<Option<PathBuf>> {
    let r = f();
    if comm.world_size() > 1 {
        let mut msg = match &r {
            Ok(None) => vec![0u8],
            Ok(Some(p)) => [&[1u8][..], p.to_string_lossy().as_bytes()].concat(),
            Err(e) => [&[2u8][..], e.to_string().as_bytes()].concat(),
        };
        comm.broadcast_bytes(&mut msg, 0)?;
    }
    r
}

/// The outcome of rank 0's [`lead_result`]: its path, or [`Error::RankFailed`].
fn follow_result(comm: &dyn Communicator) -> Result<Option<PathBuf>> {
    let mut msg = Vec::new();
    comm.broadcast_bytes(&mut msg, 0)?;
    let text = || String::from_utf8_lossy(&msg[1..]).into_owned();
    match msg.first() {
        Some(0) => Ok(None),
        Some(1) => Ok(Some(PathBuf::from(text()))),
        _ => Err(Error::RankFailed {
            rank: 0,
            reason: if msg.is_empty() {
                "no reply".into()
            } else {
                text()
            },
        }),
    }
}

/// A checkpoint of the run, written by rank 0 once every rank is known to hold the same weights; the other
/// ranks wait until it is complete (and get rank 0's error if it failed).
fn save_collective(trainer: &mut Trainer, out: &Path, cfg: &TrainConfig) -> Result<PathBuf> {
    trainer.prepare_checkpoint()?;
    let comm = trainer.data_parallel().map(|dp| dp.communicator().clone());
    let comm: Arc<dyn Communicator> = comm.unwrap_or_else(|| Arc::new(SingleProcess));
    let saved = on_lead(comm.as_ref(), || save_all(trainer, out, cfg).map(Some))?;
    saved.ok_or_else(|| Error::RankFailed {
        rank: 0,
        reason: "no checkpoint path".into(),
    })
}

/// Checkpoint, pruning, teacher export and plot.
fn save_all(trainer: &mut Trainer, out: &Path, cfg: &TrainConfig) -> Result<PathBuf> {
    let dir = out.join(CHECKPOINT_DIR);
    let p = trainer.save(&dir)?;
    checkpoint::prune(&dir, cfg.train.checkpoints_to_keep.max(1))?;
    export_teacher(trainer.arch(), &out.join(export_file(cfg)))?;
    let metrics = out.join(METRICS_FILE);
    if metrics.exists() {
        crate::plot::plot_losses(&metrics, out.join(PLOT_FILE))?;
    }
    Ok(p)
}

/// The exported model's file name: the teacher, or the student's EMA in a distillation run.
fn export_file(cfg: &TrainConfig) -> &'static str {
    if cfg.distillation.enabled {
        crate::distill::STUDENT_EMA_FILE
    } else {
        TEACHER_FILE
    }
}

/// Writes the teacher backbone (the student's EMA in a distillation run) with official key names and its
/// `VitConfig` in the metadata (loadable by `dinov2 embed --model FILE` and `dinov2_model::load_model`),
/// atomically.
pub fn export_teacher(arch: &SslMetaArch, path: &Path) -> Result<()> {
    let backbone = &arch.teacher().backbone;
    let sd = backbone.state_dict()?;
    let cfg = arch.config().teacher();
    dinov2_model::weights::save_safetensors_with_config(&sd, &cfg, path)?;
    Ok(())
}

fn append_metrics(path: &Path, r: &StepReport, images_per_s: f64, batch_size: usize) -> Result<()> {
    let mut obj = serde_json::Map::new();
    obj.insert("iteration".into(), r.iteration.into());
    let logged = r.losses.official_log();
    let total: f64 = logged.iter().map(|(_, v)| v).sum();
    obj.insert("total_loss".into(), json_f64(total));
    for (k, v) in &logged {
        obj.insert((*k).into(), json_f64(*v));
    }
    let s = &r.schedule;
    for (k, v) in [
        ("lr", s.lr),
        ("wd", s.weight_decay),
        ("mom", s.momentum),
        ("last_layer_lr", s.last_layer_lr),
        ("teacher_temp", s.teacher_temp),
        ("images_per_s", images_per_s),
    ] {
        obj.insert(k.into(), json_f64(v));
    }
    obj.insert("current_batch_size".into(), batch_size.into());
    for (k, v) in &r.grad_norms {
        obj.insert(format!("grad_norm_{k}"), json_f64(*v));
    }
    append_line(path, &serde_json::Value::Object(obj).to_string())
}

fn append_line(path: &Path, line: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    writeln!(f, "{line}").map_err(|e| Error::io(path, e))
}

fn json_f64(v: f64) -> serde_json::Value {
    serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, serde_json::Value::Number)
}

/// Drops metric lines of iterations at or after `start` (re-run after a resume), atomically.
fn trim_metrics(path: &Path, start: u64) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("iteration").and_then(|i| i.as_u64()))
                .is_some_and(|i| i < start)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    crate::plot::write_atomic(path, kept.as_bytes())
}
