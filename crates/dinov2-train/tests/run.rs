//! Whole runs from a configuration over an image folder: exact resume through the data loader, stop
//! conditions, outputs.

use std::path::Path;

use dinov2_train::run::{
    run, Event, RunOptions, StopReason, CONFIG_FILE, METRICS_FILE, TEACHER_FILE,
};
use dinov2_train::TrainConfig;

fn image_folder(dir: &Path) {
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    for i in 0..6u32 {
        let img = dinov2_data::image::RgbImage::from_fn(40 + i, 36, |x, y| {
            dinov2_data::image::Rgb([(x * 7 + i * 30) as u8, (y * 5) as u8, ((x + y) * 3) as u8])
        });
        let sub = if i % 2 == 0 { "" } else { "sub" };
        img.save(dir.join(sub).join(format!("{i}.png"))).unwrap();
    }
}

/// vit_tiny (the only small official-style arch) on 28-pixel globals and 14-pixel locals with tiny heads.
fn config(data: &Path) -> TrainConfig {
    let o = [
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
        "student.patch_size=14".into(),
        "crops.global_crops_size=28".into(),
        "crops.local_crops_size=14".into(),
        "crops.local_crops_number=2".into(),
        "dino.head_n_prototypes=64".into(),
        "dino.head_hidden_dim=32".into(),
        "dino.head_bottleneck_dim=16".into(),
    ];
    TrainConfig::load(None, &o).unwrap()
}

/// The exported teacher's tensors as bits, by name.
fn teacher_bits(dir: &Path) -> Vec<(String, Vec<u32>)> {
    let mut t: Vec<_> =
        candle_core::safetensors::load(dir.join(TEACHER_FILE), &candle_core::Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(k, v)| {
                let bits = v
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .into_iter()
                    .map(f32::to_bits)
                    .collect();
                (k, bits)
            })
            .collect();
    t.sort();
    t
}

#[test]
fn stop_resume_equals_a_straight_run_and_writes_every_output() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("images");
    image_folder(&data);
    let cfg = config(&data);

    let straight = tmp.path().join("straight");
    let s = run(&cfg, &RunOptions::new(&straight), &mut |_| {}).unwrap();
    assert_eq!(
        (s.iteration, s.max_iter, s.reason),
        (6, 6, StopReason::Finished)
    );
    for f in [
        CONFIG_FILE,
        METRICS_FILE,
        TEACHER_FILE,
        "training_metrics.png",
    ] {
        assert!(straight.join(f).is_file(), "{f}");
    }
    let lines = std::fs::read_to_string(straight.join(METRICS_FILE)).unwrap();
    assert_eq!(lines.lines().count(), 6);
    // the exported teacher loads as a model, its configuration from the file
    let w = dinov2_model::weights::load_weights(straight.join(TEACHER_FILE)).unwrap();
    assert_eq!((w.config.embed_dim, w.config.num_heads), (192, 3));

    let resumed = tmp.path().join("resumed");
    let mut opts = RunOptions::new(&resumed);
    opts.stop_after_iters = Some(4);
    let first = run(&cfg, &opts, &mut |_| {}).unwrap();
    assert_eq!(
        (first.iteration, first.reason),
        (4, StopReason::StopAfterIters)
    );
    opts.stop_after_iters = None;
    let second = run(&cfg, &opts, &mut |_| {}).unwrap();
    assert_eq!(second.iteration, 6);
    assert!(
        teacher_bits(&straight) == teacher_bits(&resumed),
        "bit-identical teacher after a resume"
    );
    let a = std::fs::read(s.checkpoint.join("model.safetensors")).unwrap();
    let b = std::fs::read(second.checkpoint.join("model.safetensors")).unwrap();
    assert!(a == b, "student, teacher and centres identical");
    let lines2 = std::fs::read_to_string(resumed.join(METRICS_FILE)).unwrap();
    let iters = |t: &str| -> Vec<u64> {
        t.lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["iteration"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    };
    assert_eq!(iters(&lines2), iters(&lines));
    // the last 3 checkpoints are kept (6 iterations, period 2: 2, 4, 6)
    let kept = dinov2_train::checkpoint::list(resumed.join("checkpoints")).unwrap();
    assert_eq!(kept.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [2, 4, 6]);
}

#[test]
fn no_resume_starts_over_and_a_set_stop_flag_saves_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("images");
    image_folder(&data);
    let cfg = config(&data);
    let out = tmp.path().join("out");
    let mut opts = RunOptions::new(&out);
    opts.stop_after_iters = Some(1);
    run(&cfg, &opts, &mut |_| {}).unwrap();
    opts.resume = false;
    opts.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let s = run(&cfg, &opts, &mut |_| {}).unwrap();
    assert_eq!((s.iteration, s.reason), (0, StopReason::Interrupted));
    // the first run moved aside, not deleted; the new run's checkpoint is the only one in place
    let kept = dinov2_train::checkpoint::list(out.join("checkpoints")).unwrap();
    assert_eq!(kept.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0]);
    let archived: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("previous-"))
        .collect();
    assert_eq!(archived.len(), 1);
    assert!(archived[0]
        .path()
        .join("checkpoints/model_0000001")
        .is_dir());
}

#[test]
fn periodic_knn_logs_the_teacher_accuracy_and_survives_a_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("images");
    image_folder(&data);
    let shapes =
        |n, seed| dinov2_data::synthetic::SyntheticShapes::new(n, seed).with_class_colours();
    shapes(20, 1)
        .write_image_folder(tmp.path().join("knn_train"))
        .unwrap();
    shapes(10, 2)
        .write_image_folder(tmp.path().join("knn_val"))
        .unwrap();
    let mut cfg = config(&data);
    cfg.evaluation.knn_train_dataset = tmp.path().join("knn_train").display().to_string();
    cfg.evaluation.knn_val_dataset = tmp.path().join("knn_val").display().to_string();
    cfg.evaluation.knn_nb_knn = vec![1, 5];
    cfg.evaluation.eval_period_iterations = 4;

    let knn_lines = |dir: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.join(METRICS_FILE))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v.get("knn").is_some())
            .collect()
    };
    // a straight run: evaluated after iteration 4 and after the last (6)
    let straight = tmp.path().join("straight");
    let mut events = Vec::new();
    run(&cfg, &RunOptions::new(&straight), &mut |e| {
        if let Event::Knn { iteration, results } = e {
            events.push((iteration, results.to_vec()));
        }
    })
    .unwrap();
    assert_eq!(events.iter().map(|e| e.0).collect::<Vec<_>>(), [4, 6]);
    let lines = knn_lines(&straight);
    assert_eq!(lines.len(), 2);
    for ((_, results), line) in events.iter().zip(&lines) {
        for r in results {
            assert!((0.0..=100.0).contains(&r.top1) && r.top5 >= r.top1);
            assert_eq!(line["knn"][r.k.to_string()]["top1"], r.top1);
        }
    }
    // the log keys the evaluation by the last iteration that ran, as the loss lines
    assert_eq!(
        (
            lines[0]["iteration"].as_u64(),
            lines[1]["iteration"].as_u64()
        ),
        (Some(3), Some(5))
    );

    // stopped at 5 and resumed: the same evaluations, the same numbers
    let resumed = tmp.path().join("resumed");
    let mut opts = RunOptions::new(&resumed);
    opts.stop_after_iters = Some(5);
    run(&cfg, &opts, &mut |_| {}).unwrap();
    opts.stop_after_iters = None;
    run(&cfg, &opts, &mut |_| {}).unwrap();
    assert_eq!(knn_lines(&resumed), lines);

    // a wrong path fails before any training
    cfg.evaluation.knn_val_dataset = tmp.path().join("missing").display().to_string();
    let err = run(&cfg, &RunOptions::new(tmp.path().join("bad")), &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
    assert!(!tmp.path().join("bad").join(METRICS_FILE).exists());
}

#[test]
fn two_ranks_write_every_output_once_and_a_single_process_resumes() {
    use dinov2_dist::{Communicator, ThreadGroup};
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("images");
    image_folder(&data);
    let cfg = config(&data);
    let out = tmp.path().join("out");
    // two ranks (one thread each) in the same output directory, 2 images per rank and step
    let summaries: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = ThreadGroup::new(2)
            .unwrap()
            .into_iter()
            .map(|r| {
                let (cfg, out) = (&cfg, &out);
                s.spawn(move || {
                    let rank = r.rank();
                    let mut opts = RunOptions::new(out).with_communicator(std::sync::Arc::new(r));
                    opts.stop_after_iters = Some(2);
                    let mut started = 0;
                    let mut global_rate = Vec::new();
                    let summary = run(cfg, &opts, &mut |e| match e {
                        Event::Started { .. } => started += 1,
                        Event::Step { images_per_s, .. } => global_rate.push(images_per_s),
                        _ => {}
                    })
                    .unwrap();
                    assert_eq!((started, global_rate.len()), (1, 2), "rank {rank}");
                    summary
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for s in &summaries {
        assert_eq!((s.iteration, s.reason), (2, StopReason::StopAfterIters));
        assert_eq!(s.checkpoint, summaries[0].checkpoint);
    }
    // rank 0 wrote each output once
    let metrics = std::fs::read_to_string(out.join(METRICS_FILE)).unwrap();
    assert_eq!(metrics.lines().count(), 2, "{metrics}");
    let kept = dinov2_train::checkpoint::list(out.join("checkpoints")).unwrap();
    assert_eq!(kept.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [2]);
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(summaries[0].checkpoint.join("trainer.json")).unwrap(),
    )
    .unwrap();
    // each rank consumed 2 steps × 2 images of its own shard
    assert_eq!(state["rank_sampler_positions"], serde_json::json!([4, 4]));
    assert!(out.join(TEACHER_FILE).is_file());
    // the saved configuration has the learning rate of the global batch (2 ranks × 2 images)
    let saved = TrainConfig::load(Some(&out.join(CONFIG_FILE)), &[] as &[String]).unwrap();
    assert_eq!(saved.optim.lr, cfg.lr(2));
    let leftovers: Vec<_> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty());

    // one process resumes the 2-rank checkpoint and finishes
    let s = run(&cfg, &RunOptions::new(&out), &mut |_| {}).unwrap();
    assert_eq!((s.iteration, s.reason), (6, StopReason::Finished));
    let metrics = std::fs::read_to_string(out.join(METRICS_FILE)).unwrap();
    assert_eq!(metrics.lines().count(), 6);
}

#[test]
fn a_failure_of_rank_0_alone_reaches_the_other_ranks() {
    use dinov2_dist::{Communicator, ThreadGroup};
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("images");
    image_folder(&data);
    let mut cfg = config(&data);
    // rank 0 alone opens the k-NN datasets
    cfg.evaluation.knn_train_dataset = tmp.path().join("missing").display().to_string();
    cfg.evaluation.knn_val_dataset = cfg.evaluation.knn_train_dataset.clone();
    let out = tmp.path().join("out");
    let errors: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = ThreadGroup::new(2)
            .unwrap()
            .into_iter()
            .map(|r| {
                let (cfg, out) = (&cfg, &out);
                s.spawn(move || {
                    let rank = r.rank();
                    let opts = RunOptions::new(out).with_communicator(std::sync::Arc::new(r));
                    let e = run(cfg, &opts, &mut |_| {}).unwrap_err();
                    if rank == 1 {
                        assert!(
                            matches!(e, dinov2_train::Error::RankFailed { rank: 0, .. }),
                            "{e}"
                        );
                    }
                    e.to_string()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for e in &errors {
        assert!(e.contains("missing"), "{e}");
    }
    assert!(errors[1].starts_with("rank 0 failed: "), "{}", errors[1]);
}
