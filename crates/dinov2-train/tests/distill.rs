//! Distillation (the paper's recipe, `dinov2_train::distill`): a small student learns from a frozen pretrained
//! teacher (the fixture `tests/fixtures/distill_teacher.safetensors`, see the fixtures README) and moves toward
//! it; whole runs through `run()` resume bit for bit and export the student's EMA.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use dinov2_data::synthetic::SyntheticShapes;
use dinov2_data::{DinoPipeline, Loader, LoaderConfig, ShardedInfiniteSampler};
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

/// Linear CKA between the class tokens of two models on the same images (1 = the same features up to a
/// rotation and scale).
fn linear_cka(a: &DinoVisionTransformer, b: &DinoVisionTransformer, n: usize) -> f64 {
    let data = SyntheticShapes::new(n, 3).with_class_colours();
    let centred = |m: &DinoVisionTransformer| -> Tensor {
        let (x, _) = embed_dataset(m, &data, IMAGE_SIZE, 100).unwrap();
        let x = x.to_dtype(DType::F64).unwrap();
        x.broadcast_sub(&x.mean_keepdim(0).unwrap()).unwrap()
    };
    let (x, y) = (centred(a), centred(b));
    let frob2 = |m: Tensor| {
        m.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let xy = frob2(y.t().unwrap().matmul(&x).unwrap());
    let xx = frob2(x.t().unwrap().matmul(&x).unwrap());
    let yy = frob2(y.t().unwrap().matmul(&y).unwrap());
    xy / (xx.sqrt() * yy.sqrt())
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
    let teacher_backbone = teacher.networks.backbone.clone();
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
    let mut t = trainer(&cfg, vit(32, 2, 0.0), Some(teacher.networks));

    let (n_train, n_test) = (300, 200);
    let ema = |t: &Trainer| t.arch().teacher().backbone.clone();
    let knn_before = knn(&ema(&t), n_train, n_test);
    let cka_before = linear_cka(&ema(&t), &teacher_backbone, 200);
    let knn_teacher = knn(&teacher_backbone, n_train, n_test);
    let n = t.max_iter();
    for batch in batches(&cfg, 1000).take(n as usize) {
        let r = t.step(&batch).unwrap();
        assert!(r.losses.ibot.is_some() && r.losses.koleo.is_some());
    }
    let knn_after = knn(&ema(&t), n_train, n_test);
    let cka_after = linear_cka(&ema(&t), &teacher_backbone, 200);
    eprintln!(
        "{n} iterations: student EMA k-NN {knn_before:.3} -> {knn_after:.3} (teacher {knn_teacher:.3}), \
         CKA with the teacher {cka_before:.3} -> {cka_after:.3}"
    );
    assert!(knn_teacher > knn_before + 0.1, "the teacher is meaningful");
    assert!(knn_after > knn_before + 0.1, "{knn_before} -> {knn_after}");
    assert!(cka_after > cka_before + 0.05, "{cka_before} -> {cka_after}");
}

/// Writes `tests/fixtures/distill_teacher.safetensors`: a 48-wide, 4-block ViT (patch 8, 32-pixel images)
/// pretrained with DINOv2 on generated shapes, its teacher backbone and DINO head (official names, the
/// `VitConfig` in the metadata). `cargo test --release -p dinov2-train --test distill -- --ignored --nocapture`
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
    let teacher = t.arch().teacher();
    let knn_trained = knn(&teacher.backbone, 1000, 1000);
    eprintln!("{n} iterations in {secs:.0} s: teacher k-NN {knn_init:.3} -> {knn_trained:.3}");
    let mut sd = teacher.backbone.state_dict().unwrap();
    for (k, v) in teacher.dino_head.state_dict().unwrap().iter() {
        sd.insert(format!("dino_head.{k}"), v.clone());
    }
    let vit_cfg = t.arch().config().teacher();
    dinov2_model::weights::save_safetensors_with_config(&sd, &vit_cfg, Path::new(FIXTURE)).unwrap();
    // it loads back as a teacher with its heads
    assert_eq!(fixture_teacher().info.heads, TeacherHeads::Loaded);
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
    let exported = pre.join(TEACHER_FILE).display().to_string();
    for (teacher, heads) in [
        (pre.display().to_string(), "heads loaded"), // its latest checkpoint, config.yaml for the width
        (checkpoint, "heads loaded"),
        (exported, "built from seed"), // a backbone alone: seeded heads, said in the log line
    ] {
        let cfg = run_config(&data, 64, Some(&teacher));
        let out = tmp
            .path()
            .join(format!("distill-{heads}-{}", teacher.len()));
        let (s, line) = run_distill(&cfg, &out, Some(1));
        assert_eq!(s.iteration, 1, "{teacher}");
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
}
