//! End-to-end tests of `dinov2 train` and of the main job (`examples/pretrain_tiny.rs`) at a smaller size.

use std::path::Path;
use std::process::Command;

fn dinov2(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dinov2"))
        .args(args)
        .output()
        .expect("run dinov2")
}

fn write_images(dir: &Path, n: u32) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..n {
        let img = dinov2::data::image::RgbImage::from_fn(36 + i, 34, |x, y| {
            dinov2::data::image::Rgb([(x * 9 + i * 40) as u8, (y * 7) as u8, ((x * y) % 251) as u8])
        });
        img.save(dir.join(format!("{i}.jpg"))).unwrap();
    }
}

const TINY: [&str; 13] = [
    "train.log_period=1",
    "student.arch=vit_tiny",
    "student.patch_size=8",
    "crops.global_crops_size=16",
    "crops.local_crops_size=8",
    "crops.local_crops_number=2",
    "dino.head_n_prototypes=32",
    "dino.head_hidden_dim=16",
    "dino.head_bottleneck_dim=8",
    "train.batch_size_per_gpu=2",
    "train.OFFICIAL_EPOCH_LENGTH=2",
    "optim.epochs=2",
    "optim.warmup_epochs=1",
];

#[test]
fn train_resumes_exports_a_loadable_teacher_and_rejects_bad_configurations() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_images(&data, 5);
    let out = tmp.path().join("run");
    let mut args = vec![
        "train",
        "--output-dir",
        out.to_str().unwrap(),
        "--stop-after-iters",
        "2",
    ];
    let ds = format!("train.dataset_path={}", data.display());
    args.push(&ds);
    args.push("teacher.warmup_teacher_temp_epochs=1");
    args.extend(TINY);
    let o = dinov2(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout)
        .contains("stopped (--stop-after-iters) at iteration 2/4"));
    // resumes by default and finishes
    args.retain(|a| *a != "--stop-after-iters" && *a != "2");
    let o = dinov2(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("finished at iteration 4/4"));
    assert_eq!(
        std::fs::read_to_string(out.join("training_metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        4
    );
    // the exported teacher embeds without --config (its configuration is in the file)
    let feats = tmp.path().join("feats.safetensors");
    let o = dinov2(&[
        "embed",
        "--model",
        out.join("teacher.safetensors").to_str().unwrap(),
        "--images",
        data.to_str().unwrap(),
        "--output",
        feats.to_str().unwrap(),
        "--preprocess",
        "resize",
        "--size",
        "16",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = candle_core::safetensors::load(&feats, &candle_core::Device::Cpu).unwrap();
    assert_eq!(t["x_norm_clstoken"].dims(), &[5, 192]);

    // an unknown key names the closest valid one; an impossible value names its key; nothing is written
    let bad = tmp.path().join("bad");
    let o = dinov2(&[
        "train",
        "--output-dir",
        bad.to_str().unwrap(),
        "optim.lr_base=0.1",
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("optim.base_lr"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = dinov2(&[
        "train",
        "--output-dir",
        bad.to_str().unwrap(),
        "crops.global_crops_size=100",
        "student.patch_size=14",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("crops.global_crops_size"));
    assert!(!bad.exists());
}

/// The main job at a smaller size (fewer images and iterations): pretraining must beat the random
/// initialisation on the k-NN evaluation.
#[test]
fn pretraining_on_generated_shapes_beats_random_init() {
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = dinov2::pretrain_demo::DemoOptions::new(tmp.path());
    (opts.pool_size, opts.knn_train, opts.knn_test) = (600, 300, 300);
    opts.overrides = vec!["optim.epochs=3".into()];
    let r = dinov2::pretrain_demo::run(&opts, &mut |_| {}).unwrap();
    assert!(
        r.trained_accuracy > r.random_init_accuracy + 0.05,
        "random init {:.3}, trained {:.3}",
        r.random_init_accuracy,
        r.trained_accuracy
    );
}
