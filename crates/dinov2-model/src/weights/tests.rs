//! Unit tests on synthetic state dicts: every conversion is checked against an independent re-statement of the
//! mapping (official ↔ transformers ↔ timm ↔ training names) and round trips through files.

use super::*;

fn tiny(ffn: FfnKind, regs: usize) -> VitConfig {
    let mut c = VitConfig::vit_small().with_registers(regs);
    c.embed_dim = 16;
    c.num_heads = 2;
    c.depth = 2;
    c.img_size = 28;
    c.ffn = ffn;
    c
}

fn backbone_shapes(cfg: &VitConfig) -> Vec<(String, Vec<usize>)> {
    DinoVisionTransformer::parameter_shapes(cfg).unwrap()
}

/// Seeded random tensors (distinct per key) with the shapes of `cfg`.
fn random_sd(cfg: &VitConfig) -> StateDict {
    backbone_shapes(cfg)
        .into_iter()
        .enumerate()
        .map(|(i, (k, s))| (k, crate::testutil::seeded(s, i as u64)))
        .collect()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

fn assert_same(a: &StateDict, b: &StateDict) {
    let ka: Vec<_> = a.keys().collect();
    let kb: Vec<_> = b.keys().collect();
    assert_eq!(ka, kb);
    for (k, t) in a.iter() {
        let u = b.get(k).unwrap();
        assert_eq!(t.dims(), u.dims(), "{k}");
        assert_eq!(bits(t), bits(u), "{k}");
    }
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "dinov2-weights-unit-{tag}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn backbone_shapes_of_released_models_match_the_reference_key_counts() {
    assert_eq!(backbone_shapes(&VitConfig::vit_small()).len(), 175);
    assert_eq!(
        backbone_shapes(&VitConfig::vit_small().with_registers(4)).len(),
        176
    );
    let g = backbone_shapes(&VitConfig::vit_giant2());
    let w12 = g
        .iter()
        .find(|(k, _)| k == "blocks.39.mlp.w12.weight")
        .unwrap();
    assert_eq!(w12.1, vec![8192, 1536]);
    let w3 = g
        .iter()
        .find(|(k, _)| k == "blocks.0.mlp.w3.weight")
        .unwrap();
    assert_eq!(w3.1, vec![1536, 4096]);
}

#[test]
fn infer_config_recovers_every_released_config() {
    for m in crate::OfficialModel::all() {
        let cfg = m.config();
        // Shape-only tensors would be large for ViT-g; zeros of the real shapes are fine (no data read).
        let sd: StateDict = backbone_shapes(&cfg)
            .into_iter()
            .filter(|(k, _)| {
                !k.starts_with("blocks.")
                    || k.starts_with("blocks.0.")
                    || k.ends_with("norm1.weight")
            })
            .map(|(k, s)| (k, Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap()))
            .collect();
        assert_eq!(infer_config(&sd, None).unwrap(), cfg, "{m}");
    }
}

#[test]
fn infer_config_mlp_ratio_reproduces_odd_hidden_sizes() {
    let mut c = tiny(FfnKind::Mlp, 0);
    c.embed_dim = 3 * 6;
    c.mlp_ratio = 100.0 / 18.0;
    let h = c.ffn_hidden_dim();
    let sd = random_sd(&c);
    let mut hf = serde_json::Map::new();
    hf.insert("num_attention_heads".into(), 2.into());
    let got = infer_config(&sd, Some(&serde_json::Value::Object(hf))).unwrap();
    assert_eq!(got.ffn_hidden_dim(), h);
}

#[test]
fn unknown_width_needs_heads() {
    let sd = random_sd(&tiny(FfnKind::Mlp, 0));
    match infer_config(&sd, None) {
        Err(Error::InvalidConfig { field, reason }) => {
            assert_eq!(field, "num_heads");
            assert!(reason.contains("heads"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn non_contiguous_blocks_are_rejected() {
    let c = tiny(FfnKind::Mlp, 0);
    let mut sd = random_sd(&c);
    let keys: Vec<String> = sd
        .keys()
        .filter(|k| k.starts_with("blocks.0."))
        .cloned()
        .collect();
    for k in keys {
        sd.remove(&k);
    }
    match infer_config(&sd, None) {
        Err(Error::InvalidConfig { field, reason }) => {
            assert_eq!(field, "depth");
            assert!(reason.contains("block 0 is missing"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn check_state_dict_reports_missing_wrong_and_unexpected_keys() {
    let check_state_dict =
        |sd: &StateDict, c: &VitConfig| DinoVisionTransformer::check_state_dict(c, sd);
    let c = tiny(FfnKind::Mlp, 0);
    let sd = random_sd(&c);
    check_state_dict(&sd, &c).unwrap();
    let mut no_mask = sd.clone();
    no_mask.remove("mask_token");
    assert!(
        matches!(check_state_dict(&no_mask, &c), Err(Error::MissingKey { key, .. }) if key == "mask_token")
    );
    let mut missing = sd.clone();
    missing.remove("blocks.1.attn.proj.bias");
    match check_state_dict(&missing, &c) {
        Err(Error::MissingKey { key, expected }) => {
            assert_eq!(key, "blocks.1.attn.proj.bias");
            assert_eq!(expected, vec![16]);
        }
        other => panic!("{other:?}"),
    }
    let mut wrong = sd.clone();
    wrong.insert(
        "blocks.1.mlp.fc2.weight",
        Tensor::zeros((16, 8), DType::F32, &Device::Cpu).unwrap(),
    );
    match check_state_dict(&wrong, &c) {
        Err(Error::ShapeMismatch {
            key,
            expected,
            actual,
        }) => {
            assert_eq!(key, "blocks.1.mlp.fc2.weight");
            assert_eq!(expected, vec![16, 64]);
            assert_eq!(actual, vec![16, 8]);
        }
        other => panic!("{other:?}"),
    }
    let mut extra = sd.clone();
    extra.insert(
        "register_tokens",
        Tensor::zeros((1, 4, 16), DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(
        matches!(check_state_dict(&extra, &c), Err(Error::UnexpectedKey { key, .. }) if key == "register_tokens")
    );
}

/// Independent statement of the official → transformers naming, used to build HF-layout dicts by hand.
fn to_hf_by_hand(sd: &StateDict, cfg: &VitConfig, prefix: &str) -> Vec<(String, Tensor)> {
    let d = cfg.embed_dim;
    let mut out = Vec::new();
    for (k, t) in sd.iter() {
        let name = match k.as_str() {
            "cls_token" => "embeddings.cls_token".to_string(),
            "mask_token" => "embeddings.mask_token".to_string(),
            "pos_embed" => "embeddings.position_embeddings".to_string(),
            "register_tokens" => "embeddings.register_tokens".to_string(),
            "patch_embed.proj.weight" => {
                "embeddings.patch_embeddings.projection.weight".to_string()
            }
            "patch_embed.proj.bias" => "embeddings.patch_embeddings.projection.bias".to_string(),
            "norm.weight" => "layernorm.weight".to_string(),
            "norm.bias" => "layernorm.bias".to_string(),
            _ => {
                let r = k.strip_prefix("blocks.").unwrap();
                let (i, rest) = r.split_once('.').unwrap();
                if let Some(wb) = rest.strip_prefix("attn.qkv.") {
                    for (j, n) in ["query", "key", "value"].iter().enumerate() {
                        out.push((
                            format!("{prefix}encoder.layer.{i}.attention.attention.{n}.{wb}"),
                            t.narrow(0, j * d, d).unwrap().contiguous().unwrap(),
                        ));
                    }
                    continue;
                }
                let hr = rest
                    .replace("attn.proj", "attention.output.dense")
                    .replace("ls1.gamma", "layer_scale1.lambda1")
                    .replace("ls2.gamma", "layer_scale2.lambda1")
                    .replace("mlp.w12", "mlp.weights_in")
                    .replace("mlp.w3", "mlp.weights_out");
                format!("encoder.layer.{i}.{hr}")
            }
        };
        out.push((format!("{prefix}{name}"), t.clone()));
    }
    out
}

#[test]
fn transformers_layout_converts_to_official() {
    for (ffn, regs, prefix) in [
        (FfnKind::Mlp, 0, ""),
        (FfnKind::Swiglu, 0, "dinov2."),
        (FfnKind::Mlp, 4, "dinov2_with_registers."),
    ] {
        let c = tiny(ffn, regs);
        let sd = random_sd(&c);
        let mut raw = to_hf_by_hand(&sd, &c, prefix);
        raw.push((
            "classifier.weight".into(),
            Tensor::zeros((5, 32), DType::F32, &Device::Cpu).unwrap(),
        ));
        let (got, extra, fmt) =
            canonicalize(raw, Container::Safetensors, None, &LoadOptions::default()).unwrap();
        assert_eq!(fmt, WeightFormat::Transformers);
        assert_same(&got, &sd);
        assert_eq!(extra.keys().collect::<Vec<_>>(), vec!["classifier.weight"]);
    }
}

/// Independent statement of the transformers >= 5 module naming (`model.state_dict()`, not `save_pretrained`).
fn to_hf5_by_hand(sd: &StateDict, cfg: &VitConfig) -> Vec<(String, Tensor)> {
    let d = cfg.embed_dim;
    let h = cfg.ffn_hidden_dim();
    let mut out = Vec::new();
    for (k, t) in to_hf_by_hand(sd, cfg, "") {
        let r = |a: &str, b: &str| k.replace(a, b);
        if k.contains("attention.attention.") {
            let k = r("attention.attention.query", "attention.q_proj")
                .replace("attention.attention.key", "attention.k_proj")
                .replace("attention.attention.value", "attention.v_proj");
            out.push((k, t));
        } else if k.contains("attention.output.dense") {
            out.push((r("attention.output.dense", "attention.o_proj"), t));
        } else if k.contains("mlp.weights_in") {
            out.push((
                r("mlp.weights_in", "mlp.gate_proj"),
                t.narrow(0, 0, h).unwrap(),
            ));
            out.push((
                r("mlp.weights_in", "mlp.up_proj"),
                t.narrow(0, h, h).unwrap(),
            ));
        } else if k.contains("mlp.weights_out") {
            out.push((r("mlp.weights_out", "mlp.down_proj"), t));
        } else {
            out.push((k, t));
        }
    }
    assert!(out.iter().all(|(_, t)| t.dims()[0] > 0 && d > 0));
    out
}

#[test]
fn transformers5_module_names_convert_to_official() {
    for ffn in [FfnKind::Mlp, FfnKind::Swiglu] {
        let c = tiny(ffn, 0);
        let sd = random_sd(&c);
        let raw = to_hf5_by_hand(&sd, &c);
        assert!(raw
            .iter()
            .any(|(k, _)| k.ends_with("attention.q_proj.weight")));
        let (got, extra, fmt) = canonicalize(
            raw.clone(),
            Container::Safetensors,
            None,
            &LoadOptions::default(),
        )
        .unwrap();
        assert_eq!(fmt, WeightFormat::Transformers);
        assert!(extra.is_empty(), "{:?}", extra.keys().collect::<Vec<_>>());
        assert_same(&got, &sd);
        if ffn == FfnKind::Swiglu {
            let raw: Vec<_> = raw
                .into_iter()
                .filter(|(k, _)| k != "encoder.layer.0.mlp.up_proj.bias")
                .collect();
            match canonicalize(raw, Container::Safetensors, None, &LoadOptions::default()) {
                Err(Error::MissingKey { key, expected }) => {
                    assert_eq!(key, "encoder.layer.0.mlp.up_proj.bias");
                    assert_eq!(expected, vec![c.ffn_hidden_dim()]);
                }
                other => panic!("{other:?}"),
            }
        }
    }
}

#[test]
fn transformers_missing_value_projection_is_a_typed_error() {
    let c = tiny(FfnKind::Mlp, 0);
    let raw: Vec<_> = to_hf_by_hand(&random_sd(&c), &c, "")
        .into_iter()
        .filter(|(k, _)| k != "encoder.layer.1.attention.attention.value.weight")
        .collect();
    match canonicalize(raw, Container::Safetensors, None, &LoadOptions::default()) {
        Err(Error::MissingKey { key, expected }) => {
            assert_eq!(key, "encoder.layer.1.attention.attention.value.weight");
            assert_eq!(expected, vec![16, 16]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn timm_layout_converts_to_official_up_to_the_cls_pos_fold() {
    for (ffn, regs) in [
        (FfnKind::Swiglu, 0),
        (FfnKind::Mlp, 4),
        (FfnKind::Swiglu, 4),
    ] {
        let c = tiny(ffn, regs);
        let sd = random_sd(&c);
        // timm's checkpoint_filter_fn, restated: drop mask_token, w12/w3 → fc1/fc2, registers: reg_token and
        // cls + pos[0] folded, class row removed.
        let mut raw = Vec::new();
        for (k, t) in sd.iter() {
            let t = t.clone();
            match k.as_str() {
                "mask_token" => {}
                "register_tokens" => raw.push(("reg_token".to_string(), t)),
                "cls_token" if regs > 0 => {
                    let p0 = sd.get("pos_embed").unwrap().narrow(1, 0, 1).unwrap();
                    raw.push((k.clone(), (t + p0).unwrap()));
                }
                "pos_embed" if regs > 0 => {
                    let n = t.dims()[1];
                    raw.push((k.clone(), t.narrow(1, 1, n - 1).unwrap()));
                }
                _ => raw.push((
                    k.replace("mlp.w12", "mlp.fc1").replace("mlp.w3", "mlp.fc2"),
                    t,
                )),
            }
        }
        raw.push((
            "head.weight".into(),
            Tensor::zeros((3, 16), DType::F32, &Device::Cpu).unwrap(),
        ));
        let (got, extra, fmt) =
            canonicalize(raw, Container::Safetensors, None, &LoadOptions::default()).unwrap();
        assert_eq!(fmt, WeightFormat::Timm);
        assert_eq!(extra.keys().collect::<Vec<_>>(), vec!["head.weight"]);
        assert!(!got.contains("mask_token"));
        let mut expect = sd.clone();
        expect.remove("mask_token");
        if regs > 0 {
            // cls + pos0 must agree; the class row of pos_embed is zero.
            let sum = |s: &StateDict| {
                (s.get("cls_token").unwrap() + s.get("pos_embed").unwrap().narrow(1, 0, 1).unwrap())
                    .unwrap()
            };
            let (a, b) = (sum(&got), sum(&expect));
            let diff = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-6, "{diff}");
            let p = got.get("pos_embed").unwrap();
            let n = p.dims()[1];
            assert_eq!(bits(&p.narrow(1, 0, 1).unwrap()), vec![0u32; 16]);
            assert_eq!(
                bits(&p.narrow(1, 1, n - 1).unwrap()),
                bits(
                    &expect
                        .get("pos_embed")
                        .unwrap()
                        .narrow(1, 1, n - 1)
                        .unwrap()
                )
            );
            expect.remove("cls_token");
            expect.remove("pos_embed");
            let mut g = got.clone();
            g.remove("cls_token");
            g.remove("pos_embed");
            assert_same(&g, &expect);
        } else {
            assert_same(&got, &expect);
        }
    }
}

#[test]
fn training_layouts_convert_to_official() {
    let c = tiny(FfnKind::Mlp, 0);
    let sd = random_sd(&c);
    // teacher checkpoint: backbone. prefix, chunked blocks (2 blocks in 2 chunks: blocks.0.0, blocks.1.1).
    let chunked = |prefix: &str| -> Vec<(String, Tensor)> {
        sd.iter()
            .map(|(k, t)| {
                let k = match k.strip_prefix("blocks.") {
                    Some(r) => {
                        let (i, rest) = r.split_once('.').unwrap();
                        format!("blocks.{i}.{i}.{rest}")
                    }
                    None => k.clone(),
                };
                (format!("{prefix}backbone.{k}"), t.clone())
            })
            .collect()
    };
    let mut raw = chunked("");
    raw.push((
        "dino_head.mlp.0.weight".into(),
        Tensor::zeros((4, 16), DType::F32, &Device::Cpu).unwrap(),
    ));
    let (got, extra, fmt) = canonicalize(
        raw,
        Container::Zip,
        Some("teacher".into()),
        &LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(fmt, WeightFormat::TrainingCheckpoint);
    assert_same(&got, &sd);
    assert_eq!(
        extra.keys().collect::<Vec<_>>(),
        vec!["dino_head.mlp.0.weight"]
    );

    // {"model": {"student.backbone.…", "teacher.backbone.…"}} with DDP `module.` prefixes: pick each half.
    let other = random_sd(&c);
    let mut raw: Vec<(String, Tensor)> = chunked("teacher.")
        .into_iter()
        .map(|(k, t)| (format!("module.{k}"), t))
        .collect();
    raw.extend(
        other
            .iter()
            .map(|(k, t)| (format!("student.backbone.{k}"), t.clone())),
    );
    let (t, _, _) = canonicalize(
        raw.clone(),
        Container::Zip,
        Some("model".into()),
        &LoadOptions::default(),
    )
    .unwrap();
    assert_same(&t, &sd);
    let opts = LoadOptions {
        config: None,
        checkpoint_key: Some("student".into()),
    };
    let (s, _, _) = canonicalize(raw, Container::Zip, Some("model".into()), &opts).unwrap();
    assert_same(&s, &other);
}

#[test]
fn save_and_load_round_trips_for_both_writers() {
    let dir = tmpdir("roundtrip");
    for (ffn, regs) in [(FfnKind::Mlp, 0), (FfnKind::Swiglu, 4)] {
        let mut c = tiny(ffn, regs);
        c.embed_dim = 384; // a released width, so the number of heads can be inferred
        c.num_heads = 6;
        c.depth = 1;
        let sd = random_sd(&c);
        let p = dir.join(format!("w{regs}.safetensors"));
        save_safetensors(&sd, &p).unwrap();
        let w = load_weights(&p).unwrap();
        assert_eq!(w.format, WeightFormat::OfficialSafetensors);
        assert_eq!(w.config, c);
        assert_same(&w.state_dict, &sd);

        let hf = dir.join(format!("hf{regs}"));
        save_transformers(&sd, &c, &hf).unwrap();
        let w = load_weights(&hf).unwrap();
        assert_eq!(w.format, WeightFormat::Transformers);
        assert_eq!(w.config, c);
        assert_same(&w.state_dict, &sd);
        // Addressed by its model.safetensors file, the sibling config.json still gives the heads.
        let w = load_weights(hf.join("model.safetensors")).unwrap();
        assert_eq!(w.config, c);
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(
            cfg["model_type"],
            if regs > 0 {
                "dinov2_with_registers"
            } else {
                "dinov2"
            }
        );
        assert_eq!(cfg["mlp_ratio"], 4);
    }
    // No temporary files left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn save_transformers_fills_neutral_parameters() {
    let dir = tmpdir("neutral");
    let mut c = tiny(FfnKind::Mlp, 0);
    c.layer_scale_init = None;
    c.proj_bias = false;
    c.ffn_bias = false;
    let mut sd = random_sd(&c);
    sd.remove("mask_token");
    save_transformers(&sd, &c, &dir).unwrap();
    let raw = io::read_safetensors(&dir.join("model.safetensors"))
        .unwrap()
        .tensors;
    let get = |k: &str| {
        raw.iter()
            .find(|(n, _)| n == k)
            .map(|(_, t)| t.clone())
            .unwrap()
    };
    assert_eq!(bits(&get("embeddings.mask_token")), vec![0u32; 16]);
    assert_eq!(
        bits(&get("encoder.layer.1.layer_scale2.lambda1")),
        vec![1f32.to_bits(); 16]
    );
    assert_eq!(bits(&get("encoder.layer.0.mlp.fc1.bias")), vec![0u32; 64]);
    assert_eq!(
        bits(&get("encoder.layer.0.attention.output.dense.bias")),
        vec![0u32; 16]
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn file_level_errors_are_typed() {
    let dir = tmpdir("errors");
    let c = tiny(FfnKind::Mlp, 0);
    let p = dir.join("w.safetensors");
    save_safetensors(&random_sd(&c), &p).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    // Truncated in the data, in the header, and empty.
    for (name, len) in [
        ("trunc_data", bytes.len() - 10),
        ("trunc_header", 40),
        ("empty", 0),
    ] {
        let q = dir.join(name);
        std::fs::write(&q, &bytes[..len]).unwrap();
        match load_weights(&q) {
            Err(Error::Format { path, reason }) => {
                assert_eq!(path, q);
                assert!(
                    reason.contains("truncated") || reason.contains("empty"),
                    "{name}: {reason}"
                );
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    // Not a weights file; a legacy pickle; a missing file; an empty directory.
    let q = dir.join("config.json");
    std::fs::write(&q, b"{\"hidden_size\": 384}").unwrap();
    assert!(
        matches!(load_weights(&q), Err(Error::Format { reason, .. }) if reason.contains("JSON"))
    );
    let q = dir.join("legacy.pth");
    std::fs::write(&q, b"\x80\x02\x8a\x0alZ\xfc\x9cF\xf9 j\xa8P\x19.").unwrap();
    assert!(
        matches!(load_weights(&q), Err(Error::Format { reason, .. }) if reason.contains("legacy"))
    );
    assert!(matches!(
        load_weights(dir.join("nope.pth")),
        Err(Error::Io { .. })
    ));
    let empty = dir.join("empty_dir");
    std::fs::create_dir_all(&empty).unwrap();
    assert!(matches!(load_weights(&empty), Err(Error::Format { path, .. }) if path == empty));
    // A zip that is not a checkpoint.
    let q = dir.join("bad.pth");
    std::fs::write(&q, b"PK\x03\x04 this is not really a zip").unwrap();
    assert!(matches!(load_weights(&q), Err(Error::Format { .. })));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn non_finite_weights_are_refused_naming_the_file_tensor_and_element() {
    let dir = tmpdir("nonfinite");
    let c = tiny(FfnKind::Mlp, 0);
    for (value, dtype) in [
        (f32::NAN, DType::F32),
        (f32::INFINITY, DType::BF16),
        (f32::NEG_INFINITY, DType::F16),
    ] {
        let mut sd = random_sd(&c);
        let w = sd.get("blocks.0.attn.proj.weight").unwrap().clone();
        let mut v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v[7] = value;
        let bad = Tensor::from_vec(v, w.dims(), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        sd.insert("blocks.0.attn.proj.weight", bad);
        let p = dir.join(format!("bad_{dtype:?}.safetensors"));
        save_safetensors(&sd, &p).unwrap();
        match load_weights(&p) {
            Err(e @ Error::NonFinite { .. }) => {
                let Error::NonFinite {
                    ref path,
                    ref tensor,
                    index,
                    numel,
                    value: got,
                } = e
                else {
                    unreachable!()
                };
                assert_eq!(
                    (path, tensor.as_str(), index, numel),
                    (&p, "blocks.0.attn.proj.weight", 7, w.elem_count())
                );
                assert_eq!(got.is_nan(), value.is_nan());
                assert!(got.is_nan() || got == f64::from(value));
                assert!(
                    e.to_string().contains("bad_") && e.to_string().contains("diverged"),
                    "{e}"
                );
            }
            other => panic!("{dtype:?}: {other:?}"),
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_config_json_is_used_only_when_it_describes_a_transformers_dinov2() {
    let dir = tmpdir("cfgjson");
    let c = tiny(FfnKind::Mlp, 0); // width 16: heads not inferable without help
    let mut sd = random_sd(&c);
    sd.remove("mask_token"); // timm layout
    save_safetensors(&sd, dir.join("model.safetensors")).unwrap();
    // A timm repository's config.json: not a transformers config, its numbers are not used.
    std::fs::write(
        dir.join("config.json"),
        r#"{"architecture": "vit_small_patch14_dinov2", "num_features": 16, "hidden_size": 999}"#,
    )
    .unwrap();
    for p in [dir.clone(), dir.join("model.safetensors")] {
        assert!(
            matches!(load_weights(&p), Err(Error::InvalidConfig { reason, .. }) if reason.contains("heads"))
        );
    }
    // A transformers DINOv2 config is used (and cross-checked) even for official-named tensors.
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "dinov2", "num_attention_heads": 2, "hidden_size": 16}"#,
    )
    .unwrap();
    let w = load_weights(&dir).unwrap();
    assert_eq!(w.format, WeightFormat::Timm);
    assert_eq!(w.config, c);
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "dinov2", "num_attention_heads": 2, "hidden_size": 32}"#,
    )
    .unwrap();
    assert!(matches!(
        load_weights(&dir),
        Err(Error::InvalidConfig {
            field: "hidden_size",
            ..
        })
    ));
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "dinov2", "num_attention_heads": 2, "use_swiglu_ffn": true}"#,
    )
    .unwrap();
    assert!(matches!(
        load_weights(&dir),
        Err(Error::InvalidConfig {
            field: "use_swiglu_ffn",
            ..
        })
    ));
    std::fs::remove_dir_all(&dir).ok();
}

/// 40 wide with 2 heads: a width whose number of heads cannot be inferred.
fn odd_width() -> VitConfig {
    let mut c = tiny(FfnKind::Mlp, 0);
    c.embed_dim = 40;
    c
}

/// Writes `sd` with `json` as its metadata configuration, whatever it is.
fn save_with_metadata_config(sd: &StateDict, json: &str, path: &Path) {
    io::write_safetensors(
        path,
        sd.iter().map(|(k, t)| (k.clone(), t.clone())).collect(),
        vec![(CONFIG_METADATA_KEY.to_string(), json.to_string())],
    )
    .unwrap();
}

/// A fresh directory, the [`odd_width`] config, its random weights and a `teacher.safetensors` path.
fn odd_width_case(tag: &str) -> (PathBuf, VitConfig, StateDict, PathBuf) {
    let dir = tmpdir(tag);
    let cfg = odd_width();
    let sd = random_sd(&cfg);
    let path = dir.join("teacher.safetensors");
    (dir, cfg, sd, path)
}

fn metadata_of(path: &Path) -> std::collections::HashMap<String, String> {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    meta.metadata().clone().unwrap_or_default()
}

#[test]
fn a_config_in_the_metadata_loads_a_width_inference_cannot_handle() {
    let (dir, cfg, sd, path) = odd_width_case("meta-roundtrip");
    // Without the metadata the number of heads is unknown.
    save_safetensors(&sd, &path).unwrap();
    assert!(matches!(
        load_weights(&path),
        Err(Error::InvalidConfig {
            field: "num_heads",
            ..
        })
    ));
    save_safetensors_with_config(&sd, &cfg, &path).unwrap();
    let meta = metadata_of(&path);
    assert_eq!(meta.get("format").map(String::as_str), Some("pt"));
    let stored: VitConfig = serde_json::from_str(&meta[CONFIG_METADATA_KEY]).unwrap();
    assert_eq!(stored, cfg);
    let w = load_weights(&path).unwrap();
    assert_eq!(w.format, WeightFormat::OfficialSafetensors);
    assert_eq!(w.config, cfg);
    assert_same(&w.state_dict, &sd);
    // Non-default fields survive too (inference would give drop path 0).
    let mut odd = cfg.clone();
    odd.drop_path_rate = 0.25;
    odd.layer_norm_eps = 1e-5;
    save_safetensors_with_config(&sd, &odd, &path).unwrap();
    assert_eq!(load_weights(&path).unwrap().config, odd);
    // The same file read from a transformers-style directory.
    let sub = dir.join("dir");
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::copy(&path, sub.join("model.safetensors")).unwrap();
    assert_eq!(load_weights(&sub).unwrap().config, odd);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn an_explicit_config_takes_precedence_over_the_metadata() {
    let (dir, cfg, sd, path) = odd_width_case("meta-precedence");
    save_safetensors_with_config(&sd, &cfg, &path).unwrap();
    let four_heads = VitConfig {
        num_heads: 4,
        ..cfg.clone()
    };
    let opts = LoadOptions {
        config: Some(four_heads.clone()),
        checkpoint_key: None,
    };
    assert_eq!(load_weights_with(&path, &opts).unwrap().config, four_heads);
    // An explicit config is still checked against the tensors.
    let deeper = LoadOptions {
        config: Some(VitConfig {
            depth: cfg.depth + 1,
            ..cfg.clone()
        }),
        checkpoint_key: None,
    };
    assert!(matches!(
        load_weights_with(&path, &deeper),
        Err(Error::MissingKey { .. })
    ));
    // And it is the way around a broken metadata entry.
    save_with_metadata_config(&sd, "{not json", &path);
    assert_eq!(load_weights_with(&path, &opts).unwrap().config, four_heads);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_malformed_or_mismatched_metadata_config_is_a_format_error_naming_the_file() {
    let (dir, cfg, sd, path) = odd_width_case("meta-malformed");
    let three_heads = serde_json::to_string(&VitConfig {
        num_heads: 3,
        ..cfg.clone()
    })
    .unwrap();
    let deeper = serde_json::to_string(&VitConfig {
        depth: cfg.depth + 1,
        ..cfg.clone()
    })
    .unwrap();
    for (json, says) in [
        ("{not json", "not a valid VitConfig"),
        (r#"{"embed_dim": 40}"#, "missing field"),
        (three_heads.as_str(), "does not divide"),
        (deeper.as_str(), "does not match the tensors"),
    ] {
        save_with_metadata_config(&sd, json, &path);
        match load_weights(&path) {
            Err(Error::Format { path: p, reason }) => {
                assert_eq!(p, path, "{json}");
                assert!(reason.contains(CONFIG_METADATA_KEY), "{reason}");
                assert!(reason.contains(says), "{json}: {reason}");
            }
            other => panic!("{json}: expected a format error, got {other:?}"),
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn save_with_config_checks_the_backbone_and_keeps_other_tensors() {
    let (dir, cfg, mut sd, path) = odd_width_case("meta-save-check");
    let deeper = VitConfig {
        depth: cfg.depth + 1,
        ..cfg.clone()
    };
    assert!(matches!(
        save_safetensors_with_config(&sd, &deeper, &path),
        Err(Error::MissingKey { .. })
    ));
    assert!(!path.exists(), "nothing is written for a mismatched config");
    sd.remove("mask_token");
    sd.insert(
        "dino_head.last_layer.weight",
        crate::testutil::seeded(vec![8, 40], 99),
    );
    save_safetensors_with_config(&sd, &cfg, &path).unwrap();
    let w = load_weights(&path).unwrap();
    assert_eq!(w.config, cfg);
    assert!(w.state_dict.contains("mask_token"));
    assert_eq!(
        w.extra.keys().collect::<Vec<_>>(),
        vec!["dino_head.last_layer.weight"]
    );
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        1,
        "no temporary file is left behind"
    );
    std::fs::remove_dir_all(&dir).ok();
}
