//! Every example of `examples/` run with small arguments, so none can rot.
//!
//! Each example file is compiled into this test as a module (`#[path]`): its `Args` are parsed from a command
//! line and its `run` called, exactly what its `main` does. That runs the current source under any test
//! command (`cargo test --test examples` builds no example binaries, so running the binaries could pick up
//! stale ones or none). `pretrain_tiny` is a thin printer over `dinov2::pretrain_demo::run`, which
//! `tests/train_cli.rs` runs at a smaller size.
// every example brings its own copy of `examples/common/mod.rs`, as when it is built alone
#![allow(clippy::duplicate_mod)]

use std::path::{Path, PathBuf};

use clap::Parser;

#[allow(dead_code)]
#[path = "../examples/attention_map.rs"]
mod attention_map;
#[allow(dead_code)]
#[path = "../examples/curate_pool.rs"]
mod curate_pool;
#[allow(dead_code)]
#[path = "../examples/custom_ssl_step.rs"]
mod custom_ssl_step;
#[allow(dead_code)]
#[path = "../examples/extract_features.rs"]
mod extract_features;
#[allow(dead_code)]
#[path = "../examples/knn_classify.rs"]
mod knn_classify;
#[allow(dead_code)]
#[path = "../examples/pca_visualize.rs"]
mod pca_visualize;

/// A tiny model with 4 registers (2 heads, width 32) in the `transformers` layout: the `--model` path.
const REG_MODEL: &str = "crates/dinov2-model/tests/fixtures/reg/hf";

fn args<A: Parser>(line: &[&str]) -> A {
    A::try_parse_from(std::iter::once("example").chain(line.iter().copied()))
        .unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn extract_features_writes_the_official_outputs_of_every_image() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("f.safetensors");
    let got = extract_features::run(&args(&["--output", path_str(&out), "--crop", "56"])).unwrap();
    // 3 shipped images, the random ViT (width 192, no registers), 56 px crops: 4x4 patches
    assert_eq!(got["x_norm_clstoken"].dims(), &[3, 192]);
    assert_eq!(got["x_norm_patchtokens"].dims(), &[3, 16, 192]);
    assert_eq!(got["x_prenorm"].dims(), &[3, 17, 192]);
    assert!(!got.contains_key("x_norm_regtokens"));
    let bytes = std::fs::read(&out).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let paths: Vec<String> =
        serde_json::from_str(&meta.metadata().as_ref().unwrap()["paths"]).unwrap();
    assert_eq!(paths.len(), 3);
    assert!(paths[0].ends_with("checker.png"));
    let file = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    assert_eq!(file.len(), 3);

    // real weights (a fixture with registers): the register tokens are written too
    let one = PathBuf::from("examples/images/circles.png");
    let line = [
        "--model",
        REG_MODEL,
        "--images",
        path_str(&one),
        "--output",
        path_str(&out),
    ];
    let got = extract_features::run(&args(&line)).unwrap();
    assert_eq!(got["x_norm_regtokens"].dims(), &[1, 4, 32]);
    assert_eq!(got["x_prenorm"].dims(), &[1, 1 + 4 + 256, 32]);
}

#[test]
fn pca_visualize_draws_one_square_per_patch() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pca.png");
    let image = "examples/images/checker.png"; // 300 x 200: shorter side 56 -> 84 x 56, 6 x 4 patches of 14
    let line = ["--image", image, "--output", path_str(&out), "--size", "56"];
    let picture = pca_visualize::run(&args(&line)).unwrap();
    assert_eq!(picture.dimensions(), (84, 56));
    assert_eq!(image::open(&out).unwrap().to_rgb8(), picture);
    let colours: std::collections::HashSet<_> = picture.pixels().collect();
    assert!(colours.len() > 1, "one colour for every patch");
    // within a patch the colour is constant
    assert_eq!(picture.get_pixel(14, 0), picture.get_pixel(27, 13));

    let side = pca_visualize::Args {
        side_by_side: true,
        ..args(&line)
    };
    assert_eq!(pca_visualize::run(&side).unwrap().dimensions(), (168, 56));
}

#[test]
fn attention_map_is_a_distribution_over_the_patches() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("attention.png");
    let line = ["--output", path_str(&out), "--size", "56"]; // circles.png, 256 x 256: 4 x 4 patches
    let (picture, attn) = attention_map::run(&args(&line)).unwrap();
    assert_eq!(picture.dimensions(), (56, 56));
    assert_eq!(image::open(&out).unwrap().to_rgb8(), picture);
    assert_eq!(attn.len(), 16);
    let total: f32 = attn.iter().sum();
    assert!(
        attn.iter().all(|&a| a >= 0.0) && total > 0.5 && total <= 1.0 + 1e-5,
        "{attn:?}"
    );

    // one head of a model with registers: the patches share the CLS attention with the registers
    let line = [
        "--model",
        REG_MODEL,
        "--output",
        path_str(&out),
        "--size",
        "56",
        "--head",
        "1",
    ];
    let (_, attn) = attention_map::run(&args(&line)).unwrap();
    let total: f32 = attn.iter().sum();
    assert!(attn.len() == 16 && total > 0.0 && total < 1.0, "{attn:?}");
    let bad = [
        "--model",
        REG_MODEL,
        "--output",
        path_str(&out),
        "--head",
        "2",
    ];
    let err = attention_map::run(&args(&bad)).unwrap_err().to_string();
    assert!(err.contains("2 heads"), "{err}");
}

#[test]
fn knn_classify_beats_chance_on_class_coloured_shapes() {
    let line = ["--train", "200", "--test", "60", "--k", "10,20"];
    let (results, predicted) = knn_classify::run(&args(&line)).unwrap();
    assert_eq!(results.iter().map(|r| r.k).collect::<Vec<_>>(), [10, 20]);
    assert_eq!(predicted.len(), 60);
    for r in &results {
        assert!(r.top1 <= r.top5 && r.top5 <= 100.0, "{r:?}");
        // random features see the colour families (measured 83 % at 500 / 200 images; chance is 10 %)
        assert!(r.top1 > 40.0, "{r:?}");
    }
    let right = predicted
        .iter()
        .enumerate()
        .filter(|&(i, &p)| p == i % 10)
        .count();
    assert_eq!(100.0 * right as f64 / 60.0, results[0].top1); // test labels cycle through the classes
}

#[test]
fn custom_ssl_step_trains_with_finite_losses() {
    let history = custom_ssl_step::run(&args(&["--steps", "3", "--batch-size", "4"])).unwrap();
    assert_eq!(history.len(), 3);
    for [total, dino_local, dino_global, koleo, ibot] in &history {
        assert!([total, dino_local, dino_global, koleo, ibot]
            .iter()
            .all(|v| v.is_finite()));
        assert!((total - (dino_local + dino_global + koleo + ibot)).abs() < 1e-4 * total.abs());
        assert!(*dino_local > 0.0 && *dino_global > 0.0 && *ibot > 0.0);
    }
    assert_ne!(history[0], history[1]);
    // KoLeo needs two images in a batch: an error, not a panic or a NaN
    assert!(custom_ssl_step::run(&args(&["--steps", "1", "--batch-size", "1"])).is_err());
}

#[test]
fn curate_pool_drops_the_copies_and_samples_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let line = [
        "--output",
        path_str(dir.path()),
        "--shapes",
        "20",
        "--clusters",
        "4",
        "--target",
        "8",
    ];
    let (paths, kept_rows, sampled) = curate_pool::run(&args(&line)).unwrap();
    assert_eq!(paths.len(), 3 * 3 + 20);
    let name = |i: &i64| {
        paths[*i as usize]
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    };
    let kept: Vec<String> = kept_rows.iter().map(name).collect();
    for stem in ["checker", "circles", "gradient"] {
        assert!(
            kept.iter().any(|k| k.starts_with(stem) && !k.contains('_')),
            "{kept:?}"
        );
        assert!(
            !kept.iter().any(|k| k.starts_with(stem) && k.contains('_')),
            "{kept:?}"
        );
    }
    // the exact and near copies are the only duplicates among these images
    assert_eq!(kept_rows.len(), 3 + 20);
    assert_eq!(sampled.len(), 8);
    assert!(sampled.iter().all(|s| kept_rows.contains(s)));
    assert!(sampled.windows(2).all(|w| w[0] < w[1]), "no image twice");
}
