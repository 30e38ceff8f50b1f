//! `dinov2 eval linear` end to end: generated class folders, a tiny random model file, the JSON metrics and the
//! saved head, against the library result.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use dinov2_data::{FileDataset, Preprocess};
mod common;
use common::{class_folders, dinov2, tiny_model};
use dinov2_train::eval::linear::{
    embed_linear_features, linear_probe, load_head, LinearProbeConfig,
};

fn folders(dir: &Path) -> (PathBuf, PathBuf) {
    class_folders(dir, 80, 30)
}

#[test]
fn linear_prints_the_grid_writes_metrics_and_a_loadable_head() {
    let dir = tempfile::tempdir().unwrap();
    let (train, val) = folders(dir.path());
    let (model_path, model) = tiny_model(dir.path(), 4);
    let metrics = dir.path().join("metrics.json");
    std::fs::write(&metrics, r#"{"knn": {"kept": true}}"#).unwrap();
    let head_path = dir.path().join("head.safetensors");
    let out = dinov2(&[
        "eval",
        "linear",
        "--model",
        model_path.to_str().unwrap(),
        "--train",
        train.to_str().unwrap(),
        "--val",
        val.to_str().unwrap(),
        "--output",
        metrics.to_str().unwrap(),
        "--head-output",
        head_path.to_str().unwrap(),
        "--epochs",
        "2",
        "--epoch-length",
        "100",
        "--batch-size",
        "16",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // the same evaluation through the library: default image size = the model's 32, resize 37
    let (train_ds, val_ds) = (
        FileDataset::image_folder(&train).unwrap(),
        FileDataset::image_folder(&val).unwrap(),
    );
    let eval = Preprocess::Eval {
        resize: 37,
        crop: 32,
    };
    let train_f = embed_linear_features(&model, &train_ds, eval, 64, 4).unwrap();
    let val_f = embed_linear_features(&model, &val_ds, eval, 64, 4).unwrap();
    let cfg = LinearProbeConfig {
        epochs: 2,
        epoch_length: Some(100),
        batch_size: 16,
        ..Default::default()
    };
    let expected = linear_probe(&train_f, &val_f, 10, &cfg).unwrap();
    let best = expected.best();
    assert!(
        best.val.top1 > 30.0,
        "class colours are linearly visible even to a random backbone: {best:?}"
    );

    // one line per feature configuration, then the chosen head
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 6, "{stdout}");
    for (line, config) in lines.iter().zip([
        "1 block ",
        "1 block + avgpool",
        "4 blocks ",
        "4 blocks + avgpool",
    ]) {
        assert!(line.starts_with(config), "{line}");
    }
    assert_eq!(lines[4], format!("best: {}", best.name));
    assert!(
        lines[5].contains(&format!("val top-1 {:6.2}%", best.val.top1)),
        "{}",
        lines[5]
    );

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&metrics).unwrap()).unwrap();
    assert_eq!(json["knn"]["kept"], true, "other evaluations are kept");
    let linear = &json["linear"];
    assert_eq!(linear["best"]["name"], best.name.as_str());
    assert_eq!(linear["best"]["top1"], best.val.top1);
    assert_eq!(linear["best"]["top5"], best.val.top5);
    assert_eq!(linear["heads"].as_object().unwrap().len(), 52);
    assert_eq!(
        linear["heads"][&best.name]["holdout_top1"],
        best.holdout.unwrap().top1
    );

    // the saved head is the chosen one and gives the reported accuracy through LinearClassifier
    let head = load_head(&head_path).unwrap();
    assert_eq!(head.class_names, train_ds.classes);
    assert_eq!(head.config, best.spec.config);
    let images: Vec<Tensor> = (0..val_ds.entries.len())
        .map(|i| {
            let img = dinov2_data::load_rgb(&val_ds.entries[i].0).unwrap();
            let t = dinov2_data::preprocess(&img, &eval).unwrap();
            Tensor::from_vec(t.data, (3, 32, 32), &Device::Cpu).unwrap()
        })
        .collect();
    let x = Tensor::stack(&images, 0).unwrap();
    let logits: Vec<Vec<f32>> = head
        .classifier
        .forward(&model, &x)
        .unwrap()
        .to_vec2()
        .unwrap();
    let correct = logits
        .iter()
        .zip(val_f.labels())
        .filter(|(row, &y)| {
            row.iter()
                .enumerate()
                .all(|(c, &v)| v < row[y] || (v == row[y] && c >= y))
        })
        .count();
    assert_eq!(100.0 * correct as f64 / logits.len() as f64, best.val.top1);
}

#[test]
fn linear_refuses_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let (train, val) = folders(dir.path());
    let (shallow, _) = tiny_model(dir.path(), 2);
    let run = |extra: &[&str], train: &Path, val: &Path| {
        let mut args = vec![
            "eval",
            "linear",
            "--model",
            shallow.to_str().unwrap(),
            "--train",
            train.to_str().unwrap(),
            "--val",
            val.to_str().unwrap(),
            "--epochs",
            "1",
        ];
        args.extend(extra);
        let out = dinov2(&args);
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // 4 blocks asked for explicitly from a 2-block backbone
    let err = run(&["--n-last-blocks", "1,4"], &train, &val);
    assert!(err.contains("n_last_blocks"), "{err}");
    let err = run(&["--holdout", "1.5"], &train, &val);
    assert!(err.contains("holdout"), "{err}");
    // a validation class the training set lacks
    std::fs::create_dir_all(val.join("zebra")).unwrap();
    std::fs::copy(
        std::fs::read_dir(val.join(&FileDataset::image_folder(&val).unwrap().classes[0]))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path(),
        val.join("zebra/0.png"),
    )
    .unwrap();
    let err = run(&[], &train, &val);
    assert!(err.contains("zebra"), "{err}");
}
