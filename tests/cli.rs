//! End-to-end tests of the `dinov2` command line on the committed tiny fixture models and sample images.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Module, Tensor};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn dinov2(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dinov2"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env(
            "HF_HUB_CACHE",
            std::env::temp_dir().join("dinov2-cli-test-empty-cache"),
        )
        .output()
        .expect("run dinov2")
}

fn ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "dinov2 failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn embed_pixel_values_matches_the_official_outputs() {
    // The fixture's input through the CLI (batch size 1, so batching is exercised) equals the official outputs.
    let dir = tempfile::tempdir().unwrap();
    let fixture = root().join("crates/dinov2-model/tests/fixtures/reg/outputs_70x98.safetensors");
    let reference = load(&fixture);
    let pv = dir.path().join("pv.safetensors");
    candle_core::safetensors::save(
        &HashMap::from([("pixel_values".to_string(), reference["input"].clone())]),
        &pv,
    )
    .unwrap();
    let out = dir.path().join("out.safetensors");
    let model = root().join("crates/dinov2-model/tests/fixtures/reg/hf");
    ok(&dinov2(&[
        "embed",
        "--model",
        model.to_str().unwrap(),
        "--pixel-values",
        pv.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--batch-size",
        "1",
    ]));
    let got = load(&out);
    for k in [
        "x_norm_clstoken",
        "x_norm_patchtokens",
        "x_norm_regtokens",
        "x_prenorm",
    ] {
        assert_eq!(got[k].dims(), reference[k].dims(), "{k}");
        let scale = reference[k]
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(max_diff(&got[k], &reference[k]) <= 1e-4 * scale, "{k}");
    }
}

#[test]
fn embed_images_writes_the_contract_and_is_consistent_with_the_library() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("emb.safetensors");
    let model = root().join("crates/dinov2-model/tests/fixtures/plain/hf");
    let images = root().join("examples/images");
    ok(&dinov2(&[
        "embed",
        "--model",
        model.to_str().unwrap(),
        "--images",
        images.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--batch-size",
        "2",
    ]));
    let got = load(&out);
    let n = got["x_norm_clstoken"].dim(0).unwrap();
    assert_eq!(n, 3, "three sample images");
    assert_eq!(got["x_norm_clstoken"].dims(), &[3, 32]);
    assert_eq!(
        got["x_norm_patchtokens"].dims(),
        &[3, 256, 32],
        "224/14 = 16x16 patches"
    );
    assert_eq!(got["x_prenorm"].dims(), &[3, 257, 32]);
    assert!(
        !got.contains_key("x_norm_regtokens"),
        "no registers, no key"
    );
    // The library path on the same preprocessing gives the same class tokens.
    let loaded =
        dinov2_model::load_model(model.to_str().unwrap(), &Device::Cpu, DType::F32).unwrap();
    let mut files = dinov2::embed::collect_images(&[images]).unwrap();
    files.sort();
    let pre = dinov2_data::preprocess::Preprocess::OFFICIAL_EVAL;
    let imgs: Vec<_> = files
        .iter()
        .map(|p| dinov2::embed::load_image(p, &pre).unwrap())
        .collect();
    let x = dinov2::embed::stack(&imgs, &Device::Cpu).unwrap();
    let cls = loaded.forward(&x).unwrap();
    assert!(max_diff(&cls, &got["x_norm_clstoken"]) < 1e-5);
    // Paths are recorded in the metadata.
    let bytes = std::fs::read(&out).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let paths = meta
        .metadata()
        .as_ref()
        .unwrap()
        .get("paths")
        .unwrap()
        .clone();
    assert!(paths.contains("circles.png"));
}

#[test]
fn embed_reports_bad_input_clearly_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("broken.jpg");
    std::fs::write(&bad, b"not a jpeg").unwrap();
    let out = dir.path().join("emb.safetensors");
    let model = root().join("crates/dinov2-model/tests/fixtures/plain/hf");
    let r = dinov2(&[
        "embed",
        "--model",
        model.to_str().unwrap(),
        "--images",
        bad.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("broken.jpg"), "error names the file: {err}");
    assert!(!out.exists(), "no partial output");
    // With --skip-bad the good images still go through.
    let good = root().join("examples/images/checker.png");
    ok(&dinov2(&[
        "embed",
        "--model",
        model.to_str().unwrap(),
        "--images",
        bad.to_str().unwrap(),
        good.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--skip-bad",
    ]));
    assert_eq!(load(&out)["x_norm_clstoken"].dim(0).unwrap(), 1);
    // Sizes that are not a multiple of 14 without a resize option: a clear error.
    let r = dinov2(&[
        "embed",
        "--model",
        model.to_str().unwrap(),
        "--images",
        good.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--preprocess",
        "exact",
    ]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("14"), "error mentions the patch size: {err}");
    // An unknown model name offline: a clear error.
    let r = dinov2(&["info", "--model", "not_a_model"]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("unknown model"));
}

#[test]
fn pca_writes_a_picture_of_the_patch_grid() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pca.png");
    let model = root().join("crates/dinov2-model/tests/fixtures/swiglu/hf");
    let image = root().join("examples/images/circles.png");
    ok(&dinov2(&[
        "pca",
        "--model",
        model.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--size",
        "112",
    ]));
    let img = image::open(&out).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (112, 112), "8x8 patches of 14 pixels");
    // Three components scaled to the full range: every channel reaches 0 and 255 somewhere.
    for c in 0..3 {
        let vals: Vec<u8> = img.pixels().map(|p| p[c]).collect();
        assert_eq!(*vals.iter().min().unwrap(), 0);
        assert_eq!(*vals.iter().max().unwrap(), 255);
    }
}

#[test]
fn convert_round_trips_through_the_transformers_layout() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    let model = root().join("crates/dinov2-model/tests/fixtures/reg/official.pth");
    let cfg = root().join("crates/dinov2-model/tests/fixtures/reg/config.json");
    ok(&dinov2(&[
        "convert",
        "--model",
        model.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
        "--format",
        "transformers",
        "--output",
        hf.to_str().unwrap(),
    ]));
    let out = dinov2(&["info", "--model", hf.to_str().unwrap()]);
    ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Transformers"), "{text}");
    assert!(text.contains("\"num_register_tokens\": 4"), "{text}");
}

#[test]
fn curate_embed_then_dedup_runs_end_to_end_with_a_model() {
    let dir = tempfile::tempdir().unwrap();
    // Five images: the three samples plus exact copies of two of them (duplicates to find).
    let pool = dir.path().join("pool");
    std::fs::create_dir(&pool).unwrap();
    for name in ["checker.png", "circles.png", "gradient.jpg"] {
        std::fs::copy(root().join("examples/images").join(name), pool.join(name)).unwrap();
    }
    std::fs::copy(
        root().join("examples/images/circles.png"),
        pool.join("circles_copy.png"),
    )
    .unwrap();
    std::fs::copy(
        root().join("examples/images/checker.png"),
        pool.join("z_checker_copy.png"),
    )
    .unwrap();
    let emb = dir.path().join("emb");
    let merged = dir.path().join("emb.npy");
    let model = root().join("crates/dinov2-model/tests/fixtures/plain/hf");
    ok(&dinov2(&[
        "curate",
        "embed",
        "--images",
        pool.to_str().unwrap(),
        "--output",
        emb.to_str().unwrap(),
        "--weights",
        model.to_str().unwrap(),
        "--batch-size",
        "2",
        "--merge-to",
        merged.to_str().unwrap(),
    ]));
    let dedup = dir.path().join("dedup");
    ok(&dinov2(&[
        "curate",
        "dedup",
        "--embeddings",
        merged.to_str().unwrap(),
        "--k",
        "4",
        "--threshold",
        "0.999",
        "--output",
        dedup.to_str().unwrap(),
    ]));
    let keep = std::fs::read(dedup.join("keep.npy")).unwrap();
    // int64 row ids after the .npy header: 5 images, 2 exact duplicates removed.
    let header_len = u16::from_le_bytes([keep[8], keep[9]]) as usize + 10;
    let ids: Vec<i64> = keep[header_len..]
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(ids.len(), 3, "kept {ids:?}");
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn embed_in_reduced_precision_stays_close_to_f32() {
    let dir = tempfile::tempdir().unwrap();
    let model = root().join("crates/dinov2-model/tests/fixtures/reg/hf");
    let images = root().join("examples/images");
    let run = |dtype: &str| {
        let out = dir.path().join(format!("{dtype}.safetensors"));
        ok(&dinov2(&[
            "embed",
            "--model",
            model.to_str().unwrap(),
            "--images",
            images.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--dtype",
            dtype,
        ]));
        load(&out)
    };
    let full = run("f32");
    for dtype in ["bf16", "f16"] {
        let low = run(dtype);
        for k in ["x_norm_clstoken", "x_norm_patchtokens", "x_norm_regtokens"] {
            assert_eq!(low[k].dtype(), DType::F32, "outputs are written as f32");
            let scale = full[k]
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let err = max_diff(&low[k], &full[k]) / scale;
            assert!(err < 0.1, "{dtype} {k}: relative error {err}");
        }
    }
}
