//! `dinov2 eval knn` end to end: generated class folders, a tiny random model file, the JSON metrics.

use dinov2_data::synthetic::SyntheticShapes;
use dinov2_data::{FileDataset, Preprocess};
use dinov2_train::eval::knn::{embed_dataset_with, knn_evaluate};

mod common;
use common::{class_folders, dinov2, tiny_model};

#[test]
fn knn_prints_every_k_and_writes_the_library_result() {
    let dir = tempfile::tempdir().unwrap();
    let (train, val) = class_folders(dir.path(), 60, 30);
    // a validation class folder may be missing: labels follow the class names, not the folder positions
    std::fs::remove_dir_all(val.join(&FileDataset::image_folder(&val).unwrap().classes[0]))
        .unwrap();
    let (model_path, model) = tiny_model(dir.path(), 2);
    let metrics = dir.path().join("metrics.json");
    std::fs::write(&metrics, r#"{"linear": {"kept": true}}"#).unwrap();
    let out = dinov2(&[
        "eval",
        "knn",
        "--model",
        model_path.to_str().unwrap(),
        "--train",
        train.to_str().unwrap(),
        "--val",
        val.to_str().unwrap(),
        "--k",
        "1,5,20",
        "--resize",
        "36",
        "--crop",
        "32",
        "--batch-size",
        "7",
        "--output",
        metrics.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("k = ")).count(),
        3,
        "{stdout}"
    );

    // the same evaluation through the library
    let transform = Preprocess::Eval {
        resize: 36,
        crop: 32,
    };
    let train_ds = FileDataset::image_folder(&train).unwrap();
    let mut val_ds = FileDataset::image_folder(&val).unwrap();
    for (_, label) in &mut val_ds.entries {
        *label = label.map(|l| l + 1); // class 0 was removed from val
    }
    let (tr, tr_labels) = embed_dataset_with(&model, &train_ds, transform, 16).unwrap();
    let (va, va_labels) = embed_dataset_with(&model, &val_ds, transform, 16).unwrap();
    let expected = knn_evaluate(&tr, &tr_labels, &va, &va_labels, &[1, 5, 20], 0.07).unwrap();

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&metrics).unwrap()).unwrap();
    assert_eq!(
        json["linear"]["kept"], true,
        "other keys of the file are kept"
    );
    for r in expected {
        let got = &json["knn"][r.k.to_string()];
        let (top1, top5) = (got["top1"].as_f64().unwrap(), got["top5"].as_f64().unwrap());
        assert!(
            (top1 - r.top1).abs() < 1e-9 && (top5 - r.top5).abs() < 1e-9,
            "k = {}: {got}",
            r.k
        );
        assert!(
            stdout.contains(&format!("top-1 {:6.2}%", r.top1)),
            "{stdout}"
        );
    }
}

#[test]
fn knn_refuses_a_validation_class_the_training_set_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let (train, val) = (dir.path().join("train"), dir.path().join("val"));
    SyntheticShapes::new(4, 1)
        .write_image_folder(&train)
        .unwrap();
    SyntheticShapes::new(6, 2).write_image_folder(&val).unwrap();
    let missing = FileDataset::image_folder(&train).unwrap().classes[0].clone();
    std::fs::remove_dir_all(train.join(&missing)).unwrap();
    let (model_path, _) = tiny_model(dir.path(), 2);
    let out = dinov2(&[
        "eval",
        "knn",
        "--model",
        model_path.to_str().unwrap(),
        "--train",
        train.to_str().unwrap(),
        "--val",
        val.to_str().unwrap(),
        "--crop",
        "32",
        "--resize",
        "32",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("validation class `{missing}`"))
            && stderr.contains("has no folder in the training set"),
        "{stderr}"
    );
}
