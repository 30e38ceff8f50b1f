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
fn embed_reads_the_configuration_from_the_weights_metadata() {
    // 40 wide with 2 heads and 16-pixel patches: neither the heads nor anything else needs --config.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = dinov2_model::VitConfig::vit_small();
    (cfg.embed_dim, cfg.num_heads, cfg.depth) = (40, 2, 1);
    (cfg.patch_size, cfg.img_size) = (16, 32);
    let weights = dir.path().join("teacher.safetensors");
    let sd = dinov2_model::init::init_state_dict(&cfg, 7).unwrap();
    dinov2_model::weights::save_safetensors_with_config(&sd, &cfg, &weights).unwrap();
    let out = dir.path().join("emb.safetensors");
    let image = root().join("examples/images/checker.png");
    ok(&dinov2(&[
        "embed",
        "--model",
        weights.to_str().unwrap(),
        "--images",
        image.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--preprocess",
        "pad",
    ]));
    let got = load(&out);
    assert_eq!(got["x_norm_clstoken"].dims(), &[1, 40]);
    // 300x200 padded to multiples of the model's 16-pixel patch (not 14): 19x13 patches.
    assert_eq!(got["x_norm_patchtokens"].dims(), &[1, 19 * 13, 40]);
    // The same numbers as the library with the configuration given explicitly.
    let model =
        dinov2_model::DinoVisionTransformer::from_state_dict(&cfg, &sd, &Device::Cpu, DType::F32)
            .unwrap();
    let pre = dinov2_data::preprocess::Preprocess::CenterPad { multiple: 16 };
    let x = dinov2::embed::stack(
        &[dinov2::embed::load_image(&image, &pre).unwrap()],
        &Device::Cpu,
    )
    .unwrap();
    assert!(max_diff(&model.forward(&x).unwrap(), &got["x_norm_clstoken"]) < 1e-5);
    // `info` shows the stored configuration; `convert` keeps it.
    let info = dinov2(&["info", "--model", weights.to_str().unwrap()]);
    ok(&info);
    assert!(String::from_utf8_lossy(&info.stdout).contains("\"num_heads\": 2"));
    let copy = dir.path().join("copy.safetensors");
    ok(&dinov2(&[
        "convert",
        "--model",
        weights.to_str().unwrap(),
        "--output",
        copy.to_str().unwrap(),
    ]));
    assert_eq!(
        dinov2_model::weights::load_weights(&copy).unwrap().config,
        cfg
    );
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

/// `n` pseudo-random rows of dimension 8 (splitmix64 of the index), every 6th an exact copy of the row before.
fn curate_pool(path: &Path, n: usize) {
    let d = 8;
    let hash = |i: u64| {
        let mut z = i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let mut x = Vec::with_capacity(n * d);
    for i in 0..n {
        for p in 0..d {
            let v = if i % 6 == 5 {
                x[(i - 1) * d + p]
            } else {
                hash((i * d + p) as u64)
            };
            x.push(v);
        }
    }
    dinov2::curate::npy::write_f32(path, &x, &[n, d]).unwrap();
}

fn read_ids(path: &Path) -> Vec<i64> {
    dinov2::curate::npy::read_i64(path).unwrap().0
}

fn summary(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap()
}

#[test]
fn curate_stages_keep_their_command_line_contract() {
    let dir = tempfile::tempdir().unwrap();
    let p = |s: &str| dir.path().join(s).to_str().unwrap().to_string();
    curate_pool(&dir.path().join("x.npy"), 120);
    let (x, dd) = (p("x.npy"), p("dd"));
    let dedup = |threshold: &str, extra: &[&str]| {
        let mut a = vec![
            "curate",
            "dedup",
            "--embeddings",
            &x,
            "--k",
            "8",
            "--threshold",
            threshold,
            "--chunk",
            "50",
            "--output",
            &dd,
        ];
        a.extend_from_slice(extra);
        dinov2(&a)
    };
    let out = dedup("0.999", &[]);
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("dedup: kept 100 of 120 rows"), "{err}");
    let keep = read_ids(&dir.path().join("dd/keep.npy"));
    assert_eq!(keep.len(), 100);
    assert!(keep.windows(2).all(|w| w[0] < w[1]));
    assert!(dir.path().join("dd/edges/chunk_0000000050.npy").exists());
    let s = summary(&dir.path().join("dd"));
    assert_eq!(s["mode"], "self");
    assert_eq!(s["result"]["n_kept"], 100);
    assert_eq!(s["index"]["kind"], "exact");
    assert_eq!(s["params"]["index"]["index"], "Auto");
    assert!(s["recall_at_k"].is_null() && s["seconds"].is_f64());
    // Done: skipped, exit 0.
    let out = dedup("0.999", &[]);
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("stage already done (use --force to recompute)"));
    // Checkpoints of other parameters: refused (exit 1), then recomputed with --force.
    std::fs::remove_file(dir.path().join("dd/summary.json")).unwrap();
    let out = dedup("0.99", &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("params.json differs; use --force"));
    ok(&dedup("0.99", &["--force"]));

    // k-means, hierarchical k-means and balanced sampling on the kept rows.
    let keep_path = p("dd/keep.npy");
    let km = p("km");
    let out = dinov2(&[
        "curate",
        "kmeans",
        "--embeddings",
        &x,
        "--rows",
        &keep_path,
        "--k",
        "5",
        "--iters",
        "4",
        "--init",
        "random",
        "--checkpoint-every",
        "2",
        "--output",
        &km,
    ]);
    ok(&out);
    let s = summary(Path::new(&km));
    assert_eq!((s["k"].as_u64(), s["n"].as_u64()), (Some(5), Some(100)));
    assert_eq!(s["config"]["init"], "Random");
    assert!(s["resumed_from_iteration"].is_null());
    assert_eq!(read_ids(&dir.path().join("km/rows.npy")), keep);
    assert!(dir.path().join("km/checkpoint/state.json").exists());
    let hk = p("hk");
    ok(&dinov2(&[
        "curate",
        "hkmeans",
        "--embeddings",
        &x,
        "--k",
        "10,3",
        "--iters",
        "5",
        "--resampling-steps",
        "1",
        "--sample-size",
        "3,2",
        "--output",
        &hk,
    ]));
    assert_eq!(summary(Path::new(&hk))["k"], serde_json::json!([10, 3]));
    assert!(dir.path().join("hk/level2/sorted_members.npy").exists());
    let sel = p("sel");
    ok(&dinov2(&[
        "curate",
        "sample",
        "--clustering",
        &hk,
        "--target",
        "30",
        "--strategy",
        "c",
        "--output",
        &sel,
    ]));
    let s = summary(Path::new(&sel));
    assert_eq!(
        (s["selected"].as_u64(), s["strategy"].as_str()),
        (Some(30), Some("c"))
    );
    assert_eq!(read_ids(&dir.path().join("sel/selection.npy")).len(), 30);
    // A bad pick strategy is a clear error.
    let out = dinov2(&[
        "curate",
        "sample",
        "--clustering",
        &hk,
        "--target",
        "3",
        "--strategy",
        "x",
        "--output",
        &p("bad"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("use r (random) or c (closest)"));

    // k-NN (CSR with a threshold) and retrieval.
    ok(&dinov2(&[
        "curate",
        "knn",
        "--embeddings",
        &x,
        "--threshold",
        "0.999",
        "--output",
        &p("range"),
    ]));
    assert_eq!(
        summary(&dir.path().join("range"))["pairs"],
        40,
        "20 copies, both ways"
    );
    assert_eq!(read_ids(&dir.path().join("range/offsets.npy")).len(), 121);
    ok(&dinov2(&[
        "curate",
        "retrieve",
        "--embeddings",
        &x,
        "--queries",
        &x,
        "--k",
        "2",
        "--unique",
        "--index",
        "ivf",
        "--nlist",
        "4",
        "--nprobe",
        "4",
        "--output",
        &p("ret"),
    ]));
    let s = summary(&dir.path().join("ret"));
    assert_eq!(s["result"]["n_queries"], 120);
    assert_eq!(
        read_ids(&dir.path().join("ret/retrieved.npy")).len() as u64,
        s["result"]["n_unique"].as_u64().unwrap()
    );
}

#[test]
fn non_finite_inputs_are_refused_by_every_command_that_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let p = |s: &str| dir.path().join(s).to_str().unwrap().to_string();
    let fails_with = |args: &[&str], needles: &[&str]| {
        let out = dinov2(args);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "{args:?} succeeded: {err}");
        for n in needles {
            assert!(err.contains(n), "{args:?}: `{n}` not in {err}");
        }
    };
    // The case that used to report "kept 100 of 100 rows": an all-NaN embedding file, through every stage.
    dinov2::curate::npy::write_f32(
        Path::new(&p("nan.npy")),
        &vec![f32::NAN; 100 * 8],
        &[100, 8],
    )
    .unwrap();
    let nan = p("nan.npy");
    let stages: [&[&str]; 4] = [
        &[
            "curate",
            "dedup",
            "--embeddings",
            &nan,
            "--output",
            &p("dd"),
        ],
        &[
            "curate",
            "kmeans",
            "--embeddings",
            &nan,
            "--k",
            "4",
            "--output",
            &p("km"),
        ],
        &[
            "curate",
            "hkmeans",
            "--embeddings",
            &nan,
            "--k",
            "4,2",
            "--output",
            &p("hk"),
        ],
        &[
            "curate",
            "retrieve",
            "--embeddings",
            &nan,
            "--queries",
            &nan,
            "--output",
            &p("rt"),
        ],
    ];
    for args in stages {
        fails_with(
            args,
            &["nan.npy: row 0 is not finite (NaN in column 0); 100 of 100 rows"],
        );
        assert!(!Path::new(args.last().unwrap())
            .join("summary.json")
            .exists());
    }
    // One infinite value in an otherwise good file names its row.
    let mut x: Vec<f32> = (0..50 * 4).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
    x[37 * 4 + 2] = f32::INFINITY;
    dinov2::curate::npy::write_f32(Path::new(&p("inf.npy")), &x, &[50, 4]).unwrap();
    fails_with(
        &[
            "curate",
            "dedup",
            "--embeddings",
            &p("inf.npy"),
            "--output",
            &p("dd2"),
        ],
        &["inf.npy: row 37 is not finite (inf in column 2); 1 of 50 rows"],
    );
    // Pixel tensors: the image and position of the first bad value.
    let mut v = vec![0.5f32; 2 * 3 * 28 * 28];
    v[3 * 28 * 28 + 28 * 28 + 5 * 28 + 9] = f32::NAN;
    let pv = Tensor::from_vec(v, (2, 3, 28, 28), &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &HashMap::from([("pixel_values".to_string(), pv)]),
        p("pv.safetensors"),
    )
    .unwrap();
    let model = root().join("crates/dinov2-model/tests/fixtures/plain/hf");
    fails_with(
        &[
            "embed",
            "--model",
            model.to_str().unwrap(),
            "--pixel-values",
            &p("pv.safetensors"),
            "--output",
            &p("out.safetensors"),
        ],
        &["pv.safetensors: image 1 is not finite (NaN at channel 1, row 5, column 9)"],
    );
    assert!(!dir.path().join("out.safetensors").exists());
    // Weights: the file and the tensor.
    let mut w = load(&model.join("model.safetensors"));
    let key = "embeddings.cls_token";
    let bad = (w[key].clone() * f64::INFINITY).unwrap();
    w.insert(key.to_string(), bad);
    candle_core::safetensors::save(&w, p("bad.safetensors")).unwrap();
    fails_with(
        &[
            "embed",
            "--model",
            &p("bad.safetensors"),
            "--images",
            root().join("examples/images").to_str().unwrap(),
            "--output",
            &p("out.safetensors"),
        ],
        &["bad.safetensors", "`cls_token` is not finite", "diverged"],
    );
}
