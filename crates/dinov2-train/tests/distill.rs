//! Distillation (the paper's recipe, `dinov2_train::distill`): a small student learns from a frozen pretrained
//! teacher (the fixture `tests/fixtures/distill_teacher.safetensors`, see the fixtures README) and moves toward
//! it; whole runs through `run()` resume bit for bit and export the student's EMA.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use dinov2_data::synthetic::SyntheticShapes;
use dinov2_data::{DinoPipeline, Loader, LoaderConfig, ShardedInfiniteSampler};
use dinov2_loss::DinoHead;
use dinov2_model::{DinoVisionTransformer, VitConfig};
use dinov2_train::distill::{FrozenTeacher, TeacherHeads, TeacherOptions, STUDENT_EMA_FILE};
use dinov2_train::eval::knn::{embed_dataset, knn_accuracy, TEMPERATURE};
use dinov2_train::meta_arch::{SslMetaArch, SslMetaArchConfig, StepBatch, Submodules};
use dinov2_train::run::{optim_settings, run, Event, RunOptions, StopReason, TEACHER_FILE};
use dinov2_train::trainer::Trainer;
use dinov2_train::TrainConfig;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/distill_teacher.safetensors"
);
/// The fixture teacher's heads: one shared DINO/iBOT head with this many prototypes.
const TEACHER_K: usize = 128;
const IMAGE_SIZE: usize = 32;

/// The training settings shared by the fixture's pretraining and the distillation test (patch 8 on 32-pixel
/// shapes, as the main job, with smaller heads).
fn config(overrides: &[&str]) -> TrainConfig {
    let mut o = vec![
        "train.dataset_path=generated".to_string(),
        "student.patch_size=8".into(),
        "crops.global_crops_size=32".into(),
        "crops.local_crops_size=16".into(),
        "crops.local_crops_number=4".into(),
        format!("dino.head_n_prototypes={TEACHER_K}"),
        "dino.head_hidden_dim=128".into(),
        "dino.head_bottleneck_dim=32".into(),
        "train.OFFICIAL_EPOCH_LENGTH=20".into(),
        "optim.warmup_epochs=1".into(),
        "teacher.warmup_teacher_temp_epochs=2".into(),
    ];
    o.extend(overrides.iter().map(|s| s.to_string()));
    TrainConfig::load(None, &o).unwrap()
}

/// A ViT of `width` and `depth` (3 heads of 16 or 2 of 16) on 32-pixel images, patch 8, LayerScale 1e-5.
fn vit(width: usize, depth: usize, drop_path_rate: f64) -> VitConfig {
    let mut v = VitConfig::vit_small();
    (v.embed_dim, v.num_heads, v.depth, v.patch_size, v.img_size) =
        (width, width / 16, depth, 8, IMAGE_SIZE);
    v.layer_scale_init = Some(1e-5);
    (v.drop_path_rate, v.drop_path_uniform) = (drop_path_rate, true);
    v
}

/// A trainer over `student` with the heads and optimisation of `cfg`, distilling from `teacher` if given.
fn trainer(cfg: &TrainConfig, student: VitConfig, teacher: Option<Submodules>) -> Trainer {
    let d = student.embed_dim;
    let arch_cfg = SslMetaArchConfig {
        student,
        dino_head: cfg.dino_head(d),
        ibot_head: None,
        loss: cfg.loss(),
    };
    let mut arch = SslMetaArch::new(arch_cfg, cfg.train.seed, &Device::Cpu).unwrap();
    if let Some(t) = teacher {
        arch.set_frozen_teacher(t).unwrap();
    }
    Trainer::new(arch, &optim_settings(cfg), cfg.train.seed).unwrap()
}

/// The training batches of `cfg` over generated shapes (class colours), from iteration 0.
fn batches(cfg: &TrainConfig, pool: usize) -> impl Iterator<Item = StepBatch> {
    let data = SyntheticShapes::new(pool, 0).with_class_colours();
    let sampler = ShardedInfiniteSampler::new(pool, cfg.train.seed, 0, 1, true).unwrap();
    let pipeline = DinoPipeline {
        augmentation: cfg.augmentation().unwrap(),
        masking: cfg.masking(),
    };
    let loader_cfg = LoaderConfig {
        batch_size: cfg.train.batch_size_per_gpu,
        num_threads: 2,
        seed: cfg.train.seed,
        drop_last: true,
        ..LoaderConfig::default()
    };
    Loader::new(Arc::new(data), sampler, Arc::new(pipeline), loader_cfg)
        .unwrap()
        .map(|b| StepBatch::from_batch(&b.unwrap().batch, &Device::Cpu).unwrap())
}

/// k-NN top-1 accuracy (20 neighbours, official temperature) of `model`'s class tokens on generated shapes:
/// `n_train` labelled images vote for `n_test` others (independent seeds).
fn knn(model: &DinoVisionTransformer, n_train: usize, n_test: usize) -> f64 {
    let split = |n, seed| SyntheticShapes::new(n, seed).with_class_colours();
    let (train, train_labels) = embed_dataset(model, &split(n_train, 1), IMAGE_SIZE, 100).unwrap();
    let (test, test_labels) = embed_dataset(model, &split(n_test, 2), IMAGE_SIZE, 100).unwrap();
    knn_accuracy(&train, &train_labels, &test, &test_labels, 20, TEMPERATURE).unwrap()
}

/// The distillation loss of the student's EMA on `n` held-out images: the DINO cross-entropy of its class
/// token's prototype scores (temperature 0.1) against the teacher's targets (centred on these images,
/// temperature 0.07). Predictions that ignore the teacher score at least ln K against targets this peaked.
fn distillation_loss(
    teacher: (&DinoVisionTransformer, &DinoHead),
    student: (&DinoVisionTransformer, &DinoHead),
    n: usize,
) -> f64 {
    use candle_core::{Module, D};
    let data = SyntheticShapes::new(n, 3).with_class_colours();
    let logits = |(backbone, head): (&DinoVisionTransformer, &DinoHead)| -> Tensor {
        let (cls, _) = embed_dataset(backbone, &data, IMAGE_SIZE, 100).unwrap();
        head.forward(&cls).unwrap()
    };
    let t = logits(teacher);
    let t = t.broadcast_sub(&t.mean_keepdim(0).unwrap()).unwrap();
    let targets = candle_nn::ops::softmax_last_dim(&(t / 0.07).unwrap()).unwrap();
    let log_p = candle_nn::ops::log_softmax(&(logits(student) / 0.1).unwrap(), D::Minus1).unwrap();
    let ce = (targets * log_p)
        .unwrap()
        .sum(1)
        .unwrap()
        .mean_all()
        .unwrap();
    -f64::from(ce.to_scalar::<f32>().unwrap())
}

fn fixture_teacher() -> FrozenTeacher {
    let cfg = config(&[
        "distillation.enabled=true",
        &format!("distillation.teacher_model={FIXTURE}"),
        "student.drop_path_rate=0",
    ]);
    FrozenTeacher::load(&TeacherOptions::from_config(&cfg).unwrap(), &Device::Cpu).unwrap()
}

#[test]
fn a_student_distilled_from_a_pretrained_teacher_moves_toward_it() {
    let teacher = fixture_teacher();
    assert_eq!(teacher.info.heads, TeacherHeads::Loaded);
    assert_eq!(teacher.info.dino_prototypes, TEACHER_K);
    let cfg = config(&[
        "distillation.enabled=true",
        "distillation.teacher_model=fixture",
        "student.drop_path_rate=0",
        "train.batch_size_per_gpu=16",
        "optim.epochs=3",
        "optim.base_lr=0.05", // x sqrt(16/1024): lr 6e-3
        "teacher.momentum_teacher=0.9",
        "teacher.final_momentum_teacher=0.95",
    ]);
    let teacher_net = (
        teacher.networks.backbone.clone(),
        teacher.networks.dino_head.detached(),
    );
    let mut t = trainer(&cfg, vit(32, 2, 0.0), Some(teacher.networks));
    let (n_train, n_test, n_held_out) = (300, 200, 200);
    let measure = |t: &Trainer| -> (f64, f64) {
        let ema = t.arch().teacher();
        let loss = distillation_loss(
            (&teacher_net.0, &teacher_net.1),
            (&ema.backbone, &ema.dino_head),
            n_held_out,
        );
        (knn(&ema.backbone, n_train, n_test), loss)
    };
    let knn_teacher = knn(&teacher_net.0, n_train, n_test);
    let (knn_before, loss_before) = measure(&t);
    let n = t.max_iter();
    for batch in batches(&cfg, 1000).take(n as usize) {
        let r = t.step(&batch).unwrap();
        assert!(r.losses.ibot.is_some() && r.losses.koleo.is_some());
    }
    let (knn_after, loss_after) = measure(&t);
    let uniform = (TEACHER_K as f64).ln();
    eprintln!(
        "{n} iterations: student EMA k-NN {knn_before:.3} -> {knn_after:.3} (teacher {knn_teacher:.3}); \
         held-out distillation loss {loss_before:.3} -> {loss_after:.3} (uniform predictions {uniform:.3})"
    );
    assert!(knn_teacher > knn_before + 0.3, "the teacher is meaningful");
    assert!(knn_after > knn_before + 0.3, "{knn_before} -> {knn_after}");
    // the teacher-specific measure: a student trained without this teacher's targets stays above ln K
    assert!(
        loss_after < loss_before - 1.0,
        "{loss_before} -> {loss_after}"
    );
    assert!(
        loss_after < uniform - 0.3,
        "{loss_after} vs ln K = {uniform}"
    );
}

/// Writes `tests/fixtures/distill_teacher.safetensors` (see the fixtures README): a 48-wide, 4-block ViT (patch 8,
/// 32-pixel images) pretrained with DINOv2 on generated shapes, its teacher backbone, and a DINO head of
/// [`kmeans_head`] (official names, the `VitConfig` in the metadata).
/// `cargo test --release -p dinov2-train --test distill -- --ignored --nocapture`
#[test]
#[ignore = "regenerates the fixture (a few minutes)"]
fn make_teacher_fixture() {
    let cfg = config(&[
        "train.batch_size_per_gpu=32",
        "optim.epochs=15",
        "optim.base_lr=0.017", // x sqrt(32/1024): lr 3e-3
        "optim.weight_decay_end=0.2",
        "teacher.momentum_teacher=0.95",
    ]);
    let mut t = trainer(&cfg, vit(48, 4, 0.1), None);
    let knn_init = knn(&t.arch().teacher().backbone, 1000, 1000);
    let start = std::time::Instant::now();
    let n = t.max_iter();
    for (i, batch) in batches(&cfg, 4000).take(n as usize).enumerate() {
        let r = t.step(&batch).unwrap();
        if i % 50 == 0 {
            eprintln!("iteration {i}: loss {:.3}", r.losses.total);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let backbone = &t.arch().teacher().backbone;
    let knn_trained = knn(backbone, 1000, 1000);
    eprintln!("{n} iterations in {secs:.0} s: teacher k-NN {knn_init:.3} -> {knn_trained:.3}");
    write_fixture(
        &backbone.state_dict().unwrap(),
        &t.arch().config().teacher(),
    );
    // it loads back as a teacher with its head
    assert_eq!(fixture_teacher().info.heads, TeacherHeads::Loaded);
}

/// Writes the fixture: the backbone `sd` and the [`kmeans_head`] of the model it makes (as loaded, fused).
fn write_fixture(sd: &dinov2_model::StateDict, vit_cfg: &VitConfig) {
    let model =
        DinoVisionTransformer::from_state_dict(vit_cfg, sd, &Device::Cpu, DType::F32).unwrap();
    let mut sd = sd.clone();
    for (k, v) in kmeans_head(&model).iter() {
        sd.insert(format!("dino_head.{k}"), v.clone());
    }
    dinov2_model::weights::save_safetensors_with_config(&sd, vit_cfg, Path::new(FIXTURE)).unwrap();
}

/// The fixture teacher's DINO head: the pretraining heads of runs this small collapse (every image gets the
/// same prototype scores: after centering the targets are uniform, the DINO loss sits at ln K), so the head is
/// built from the backbone instead. One Linear layer (identity weight, bias minus the mean class token) into a
/// bottleneck as wide as the backbone, and [`TEACHER_K`] prototypes (`weight_g` 1) that are the spherical
/// k-means centroids (25 Lloyd iterations from evenly spaced images) of the centred, normalised class tokens of
/// the first 2000 pool images: the targets are soft cluster assignments of the teacher's features.
fn kmeans_head(backbone: &DinoVisionTransformer) -> dinov2_model::StateDict {
    let pool = SyntheticShapes::new(2000, 0).with_class_colours();
    let (x, _) = embed_dataset(backbone, &pool, IMAGE_SIZE, 100).unwrap();
    let normalize = |t: &Tensor| -> Tensor {
        let n = t.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap();
        t.broadcast_div(&n.maximum(1e-12).unwrap()).unwrap()
    };
    let mean = x.mean_keepdim(0).unwrap();
    let z = normalize(&x.broadcast_sub(&mean).unwrap());
    let (n, d) = z.dims2().unwrap();
    let step = (n / TEACHER_K) as u32;
    let init = Tensor::arange_step(0u32, (TEACHER_K as u32) * step, step, &Device::Cpu).unwrap();
    let mut c = z.index_select(&init, 0).unwrap();
    let ids = Tensor::arange(0u32, TEACHER_K as u32, &Device::Cpu).unwrap();
    for _ in 0..25 {
        let assign = z.matmul(&c.t().unwrap()).unwrap().argmax(1).unwrap();
        let onehot = assign
            .unsqueeze(1)
            .unwrap()
            .broadcast_eq(&ids.unsqueeze(0).unwrap())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let sums = onehot.t().unwrap().matmul(&z).unwrap();
        let empty = onehot
            .sum(0)
            .unwrap()
            .eq(0f32)
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        c = empty
            .broadcast_as((TEACHER_K, d))
            .unwrap()
            .where_cond(&c, &normalize(&sums))
            .unwrap();
    }
    let mut sd = dinov2_model::StateDict::new();
    sd.insert(
        "mlp.weight",
        Tensor::eye(d, DType::F32, &Device::Cpu).unwrap(),
    );
    sd.insert("mlp.bias", mean.flatten_all().unwrap().neg().unwrap());
    sd.insert(
        "last_layer.weight_g",
        Tensor::ones((TEACHER_K, 1), DType::F32, &Device::Cpu).unwrap(),
    );
    sd.insert("last_layer.weight_v", c);
    sd
}

/// A generated image folder (6 shapes).
fn image_folder(dir: &Path) {
    SyntheticShapes::new(6, 0)
        .with_class_colours()
        .write_image_folder(dir)
        .unwrap();
}

/// A whole run over `data`: vit_tiny (patch 8) on 16-pixel global crops, 2 epochs of 3 iterations, small heads
/// of `k` prototypes; a distillation from `teacher` when given.
fn run_config(data: &Path, k: usize, teacher: Option<&str>) -> TrainConfig {
    let mut o = vec![
        format!("train.dataset_path={}", data.display()),
        "train.batch_size_per_gpu=2".into(),
        "train.OFFICIAL_EPOCH_LENGTH=3".into(),
        "train.num_workers=2".into(),
        "train.checkpoint_period=2".into(),
        "train.log_period=1".into(),
        "optim.epochs=2".into(),
        "optim.warmup_epochs=1".into(),
        "teacher.warmup_teacher_temp_epochs=1".into(),
        "student.arch=vit_tiny".into(),
        "student.patch_size=8".into(),
        "student.drop_path_rate=0".into(),
        "crops.global_crops_size=16".into(),
        "crops.local_crops_size=8".into(),
        "crops.local_crops_number=2".into(),
        format!("dino.head_n_prototypes={k}"),
        "dino.head_hidden_dim=32".into(),
        "dino.head_bottleneck_dim=16".into(),
    ];
    if let Some(t) = teacher {
        o.push("distillation.enabled=true".into());
        o.push(format!("distillation.teacher_model={t}"));
    }
    TrainConfig::load(None, &o).unwrap()
}

/// Runs `cfg` into `out` (stopping after `stop` iterations if given); returns the summary and the teacher's
/// log line.
fn run_distill(
    cfg: &TrainConfig,
    out: &Path,
    stop: Option<u64>,
) -> (dinov2_train::run::RunSummary, String) {
    let mut opts = RunOptions::new(out);
    opts.stop_after_iters = stop;
    let mut line = String::new();
    let s = run(cfg, &opts, &mut |e| {
        if let Event::DistillationTeacher { info } = e {
            line = info.to_string();
        }
    })
    .unwrap();
    (s, line)
}

fn file_bits(path: &Path) -> Vec<(String, Vec<u32>)> {
    let mut t: Vec<_> = candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| {
            let v = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (k, v.into_iter().map(f32::to_bits).collect())
        })
        .collect();
    t.sort();
    t
}

#[test]
fn a_distillation_run_resumes_bit_identically_and_exports_the_student_ema() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("images");
    image_folder(&data);
    let cfg = run_config(&data, TEACHER_K, Some(FIXTURE));

    let straight = tmp.path().join("straight");
    let (s, line) = run_distill(&cfg, &straight, None);
    assert_eq!((s.iteration, s.reason), (6, StopReason::Finished));
    assert!(line.contains("heads loaded"), "{line}");
    assert_eq!(s.teacher, straight.join(STUDENT_EMA_FILE));
    assert!(!straight.join(TEACHER_FILE).exists());
    // the student EMA loads as a model, its configuration from the file
    let ema =
        dinov2_model::load_model(s.teacher.to_str().unwrap(), &Device::Cpu, DType::F32).unwrap();
    assert_eq!((ema.embed_dim(), ema.config().num_heads), (192, 3));

    let resumed = tmp.path().join("resumed");
    let (first, _) = run_distill(&cfg, &resumed, Some(4));
    assert_eq!(
        (first.iteration, first.reason),
        (4, StopReason::StopAfterIters)
    );
    let (second, _) = run_distill(&cfg, &resumed, None);
    assert_eq!(second.iteration, 6);
    assert!(
        file_bits(&s.teacher) == file_bits(&second.teacher),
        "bit-identical student EMA after a resume"
    );
    let a = std::fs::read(s.checkpoint.join("model.safetensors")).unwrap();
    let b = std::fs::read(second.checkpoint.join("model.safetensors")).unwrap();
    assert!(a == b, "student, student EMA and centres identical");
}

#[test]
fn runs_checkpoints_and_bare_backbones_are_teachers() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("images");
    image_folder(&data);
    // a short pretraining run: vit_tiny (192 wide, not a released width) with 64-prototype heads
    let pre = tmp.path().join("pretrain");
    let mut pre_cfg = run_config(&data, 64, None);
    pre_cfg.apply_overrides(&["optim.epochs=1"]).unwrap();
    let (p, _) = run_distill(&pre_cfg, &pre, None);
    assert_eq!(p.iteration, 3);

    let checkpoint = p.checkpoint.display().to_string();
    let exported = pre.join(TEACHER_FILE);
    let distill = |teacher: &str, name: &str| -> String {
        let cfg = run_config(&data, 64, Some(teacher));
        let (s, line) = run_distill(&cfg, &tmp.path().join(name), Some(1));
        assert_eq!(s.iteration, 1, "{teacher}");
        line
    };
    // the run directory (its latest checkpoint; the width from the exported teacher's metadata), a checkpoint,
    // and the exported backbone alone (seeded heads, said in the log line)
    for (teacher, heads) in [
        (pre.display().to_string(), "heads loaded"),
        (checkpoint.clone(), "heads loaded"),
        (exported.display().to_string(), "built from seed"),
    ] {
        let line = distill(&teacher, &format!("d-{}", teacher.len()));
        assert!(line.contains(heads) && line.contains("192 wide"), "{line}");
    }
    // the student heads must output the teacher's prototypes
    let cfg = run_config(&data, 32, Some(&pre.display().to_string()));
    let err = run(&cfg, &RunOptions::new(tmp.path().join("k")), &mut |_| {}).unwrap_err();
    assert!(
        matches!(err, dinov2_train::Error::Teacher { .. })
            && err.to_string().contains("dino.head_n_prototypes=64"),
        "{err}"
    );
    let cfg = run_config(&data, 64, Some("missing/teacher.safetensors"));
    let err = run(&cfg, &RunOptions::new(tmp.path().join("m")), &mut |_| {}).unwrap_err();
    assert!(
        err.to_string().contains("missing/teacher.safetensors"),
        "{err}"
    );
    // without the exported file, the width comes from the run's config.yaml...
    std::fs::rename(&exported, tmp.path().join("moved.safetensors")).unwrap();
    assert!(distill(&checkpoint, "d-yaml").contains("192 wide"));
    // ...and one this build cannot read asks for distillation.teacher_config
    let yaml = pre.join("config.yaml");
    let text = std::fs::read_to_string(&yaml).unwrap();
    std::fs::write(
        &yaml,
        text.replace("evaluation:", "evaluation:\n  future_key: 1"),
    )
    .unwrap();
    let cfg = run_config(&data, 64, Some(&checkpoint));
    let err = run(&cfg, &RunOptions::new(tmp.path().join("y")), &mut |_| {}).unwrap_err();
    assert!(
        err.to_string().contains("distillation.teacher_config"),
        "{err}"
    );
}
