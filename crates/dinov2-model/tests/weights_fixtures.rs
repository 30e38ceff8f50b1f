//! Every weight layout of every fixture family (written by `tools/make_model_fixtures.py` from the official
//! code, `transformers` and `timm`) loads to the same canonical state dict and configuration.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use dinov2_model::weights::{
    infer_config, load_weights, load_weights_with, save_safetensors, save_transformers,
    LoadOptions, LoadedWeights, WeightFormat,
};
use dinov2_model::{Error, StateDict, VitConfig};

const FAMILIES: [&str; 3] = ["plain", "reg", "swiglu"];

fn fam(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn config_of(family: &str) -> VitConfig {
    let text = std::fs::read_to_string(fam(family).join("config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn with_config(family: &str) -> LoadOptions {
    LoadOptions {
        config: Some(config_of(family)),
        checkpoint_key: None,
    }
}

fn load_as(family: &str, file: &str) -> LoadedWeights {
    load_weights_with(fam(family).join(file), &with_config(family))
        .unwrap_or_else(|e| panic!("{family}/{file}: {e}"))
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

fn assert_same(what: &str, a: &StateDict, b: &StateDict) {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{what}: key sets"
    );
    for (k, t) in a.iter() {
        let u = b.get(k).unwrap();
        assert_eq!(t.dims(), u.dims(), "{what}: {k}");
        assert_eq!(bits(t), bits(u), "{what}: {k} differs");
    }
}

fn without(sd: &StateDict, keys: &[&str]) -> StateDict {
    sd.iter()
        .filter(|(k, _)| !keys.contains(&k.as_str()))
        .map(|(k, t)| (k.clone(), t.clone()))
        .collect()
}

/// The official safetensors file, the reference every other layout is compared to.
fn reference(family: &str) -> LoadedWeights {
    let w = load_as(family, "official.safetensors");
    assert_eq!(w.format, WeightFormat::OfficialSafetensors);
    assert!(w.extra.is_empty());
    assert!(w.state_dict.contains("mask_token"));
    w
}

#[test]
fn official_files_need_the_heads_and_infer_everything_else() {
    for f in FAMILIES {
        let cfg = config_of(f);
        for file in ["official.safetensors", "official.pth"] {
            // Widths 32 / 48 are not released sizes: the number of heads cannot be inferred.
            match load_weights(fam(f).join(file)) {
                Err(Error::InvalidConfig { field, reason }) => {
                    assert_eq!(field, "num_heads", "{f}/{file}: {reason}")
                }
                other => panic!("{f}/{file}: {other:?}"),
            }
            let w = load_as(f, file);
            assert_eq!(w.config, cfg);
            // Every other field is inferred from the tensors alone.
            let heads = serde_json::json!({ "num_attention_heads": cfg.num_heads });
            assert_eq!(
                infer_config(&w.state_dict, Some(&heads)).unwrap(),
                cfg,
                "{f}/{file}"
            );
        }
    }
}

#[test]
fn official_pth_equals_official_safetensors() {
    for f in FAMILIES {
        let r = reference(f);
        let w = load_as(f, "official.pth");
        assert_eq!(w.format, WeightFormat::OfficialPth);
        assert!(w.extra.is_empty());
        assert_same(&format!("{f} pth"), &w.state_dict, &r.state_dict);
    }
}

#[test]
fn transformers_directories_load_with_their_config() {
    for f in FAMILIES {
        let r = reference(f);
        let w = load_weights(fam(f).join("hf")).unwrap();
        assert_eq!(w.format, WeightFormat::Transformers);
        assert_eq!(
            w.config,
            config_of(f),
            "{f}: config from config.json + tensors"
        );
        assert!(w.extra.is_empty());
        assert_same(&format!("{f} hf"), &w.state_dict, &r.state_dict);
    }
    let r = reference("plain");
    let w = load_weights(fam("plain").join("hf_classifier")).unwrap();
    assert_eq!(w.format, WeightFormat::Transformers);
    assert_eq!(w.config, config_of("plain"));
    assert_same("plain hf_classifier", &w.state_dict, &r.state_dict);
    assert_eq!(
        w.extra.keys().collect::<Vec<_>>(),
        vec!["classifier.bias", "classifier.weight"]
    );
    assert_eq!(w.extra.get("classifier.weight").unwrap().dims(), &[5, 64]);
    // The classifier is the lc1 head of the fixtures.
    let head =
        candle_core::safetensors::load(fam("plain").join("lc1_head.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(
        bits(&head["weight"]),
        bits(w.extra.get("classifier.weight").unwrap())
    );
}

#[test]
fn timm_files_match_up_to_the_cls_pos_fold() {
    for f in FAMILIES {
        let r = reference(f);
        let w = load_as(f, "timm.safetensors");
        assert_eq!(w.format, WeightFormat::Timm);
        // timm drops mask_token; loading restores its official initial value, zeros.
        let mask = w.state_dict.get("mask_token").expect("mask_token restored");
        assert_eq!(mask.dims(), &[1, config_of(f).embed_dim]);
        assert!(bits(mask).iter().all(|&b| b == 0), "{f}: zero mask token");
        let mut w = w;
        w.state_dict.remove("mask_token");
        let expect = without(&r.state_dict, &["mask_token"]);
        if config_of(f).num_register_tokens == 0 {
            assert_same(&format!("{f} timm"), &w.state_dict, &expect);
            continue;
        }
        // Register models: timm stores cls + pos[0] in cls_token and no class row; only the sum matters.
        let cls_pos0 = |sd: &StateDict| {
            let pos = sd.get("pos_embed").unwrap();
            (sd.get("cls_token").unwrap() + pos.narrow(1, 0, 1).unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (a, b) = (cls_pos0(&w.state_dict), cls_pos0(&expect));
        for (x, y) in a.iter().zip(&b) {
            // timm computed the sum in f32 as we do: same operands, same rounding.
            assert_eq!(x.to_bits(), y.to_bits(), "{f}: cls + pos0");
        }
        let pos = w.state_dict.get("pos_embed").unwrap();
        let rows = pos.dims()[1];
        assert_eq!(rows, config_of(f).num_pos_tokens());
        assert!(
            bits(&pos.narrow(1, 0, 1).unwrap()).iter().all(|&b| b == 0),
            "zero class row"
        );
        let rpos = expect.get("pos_embed").unwrap();
        assert_eq!(
            bits(&pos.narrow(1, 1, rows - 1).unwrap()),
            bits(&rpos.narrow(1, 1, rows - 1).unwrap())
        );
        assert_same(
            &format!("{f} timm"),
            &without(&w.state_dict, &["cls_token", "pos_embed"]),
            &without(&expect, &["cls_token", "pos_embed"]),
        );
    }
}

#[test]
fn chunked_training_checkpoints_load_the_teacher_backbone() {
    for f in ["plain", "swiglu"] {
        let r = reference(f);
        let w = load_as(f, "train_ckpt.pth");
        assert_eq!(w.format, WeightFormat::TrainingCheckpoint);
        assert_same(&format!("{f} train"), &w.state_dict, &r.state_dict);
        assert_eq!(
            w.extra.keys().collect::<Vec<_>>(),
            vec!["dino_head.mlp.0.weight"]
        );
        // Explicit key: the same; a key the file does not have: a typed error.
        let opts = LoadOptions {
            checkpoint_key: Some("teacher".into()),
            ..with_config(f)
        };
        let t = load_weights_with(fam(f).join("train_ckpt.pth"), &opts).unwrap();
        assert_same(&format!("{f} train/teacher"), &t.state_dict, &r.state_dict);
        let opts = LoadOptions {
            checkpoint_key: Some("student".into()),
            ..with_config(f)
        };
        assert!(matches!(
            load_weights_with(fam(f).join("train_ckpt.pth"), &opts),
            Err(Error::Format { .. })
        ));
    }
}

#[test]
fn saved_files_round_trip_and_match_the_transformers_layout() {
    let tmp = tempfile::tempdir().unwrap();
    for f in FAMILIES {
        let r = reference(f);
        let cfg = config_of(f);
        let p = tmp.path().join(format!("{f}.safetensors"));
        save_safetensors(&r.state_dict, &p).unwrap();
        let back = load_weights_with(&p, &with_config(f)).unwrap();
        assert_eq!(back.format, WeightFormat::OfficialSafetensors);
        assert_same(
            &format!("{f} save_safetensors"),
            &back.state_dict,
            &r.state_dict,
        );

        let dir = tmp.path().join(format!("{f}-hf"));
        save_transformers(&r.state_dict, &cfg, &dir).unwrap();
        // For the manual cross-check with Python (`tools/check_saved_transformers.py`).
        if let Some(export) = std::env::var_os("DINOV2_WEIGHTS_EXPORT_DIR") {
            let export = PathBuf::from(export);
            save_transformers(&r.state_dict, &cfg, export.join(f).join("hf")).unwrap();
            save_safetensors(&r.state_dict, export.join(f).join("official.safetensors")).unwrap();
        }
        let back = load_weights(&dir).unwrap();
        assert_eq!(
            back.config, cfg,
            "{f}: config.json we wrote gives the config back"
        );
        assert_same(
            &format!("{f} save_transformers"),
            &back.state_dict,
            &r.state_dict,
        );

        // Same keys, shapes and values as the file transformers itself saved.
        let ours =
            candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
        let theirs =
            candle_core::safetensors::load(fam(f).join("hf/model.safetensors"), &Device::Cpu)
                .unwrap();
        let mut ko: Vec<_> = ours.keys().collect();
        let mut kt: Vec<_> = theirs.keys().collect();
        ko.sort();
        kt.sort();
        assert_eq!(ko, kt, "{f}: key sets");
        for (k, t) in &theirs {
            assert_eq!(ours[k].dims(), t.dims(), "{f}: {k}");
            assert_eq!(bits(&ours[k]), bits(t), "{f}: {k}");
        }
        let read = |p: PathBuf| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
        };
        let (ours, theirs) = (
            read(dir.join("config.json")),
            read(fam(f).join("hf/config.json")),
        );
        for field in [
            "architectures",
            "model_type",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "mlp_ratio",
            "hidden_act",
            "image_size",
            "patch_size",
            "num_channels",
            "qkv_bias",
            "layerscale_value",
            "layer_norm_eps",
            "use_swiglu_ffn",
            "num_register_tokens",
            "use_mask_token",
            "drop_path_rate",
        ] {
            assert_eq!(
                ours.get(field),
                theirs.get(field),
                "{f}: config.json field {field}"
            );
        }
    }
}

#[test]
fn broken_and_foreign_files_give_typed_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let r = reference("plain");
    let cfg = config_of("plain");

    // A missing tensor.
    let p = tmp.path().join("missing.safetensors");
    save_safetensors(&without(&r.state_dict, &["blocks.2.ls2.gamma"]), &p).unwrap();
    match load_weights_with(&p, &with_config("plain")) {
        Err(Error::MissingKey { key, expected }) => {
            assert_eq!(key, "blocks.2.ls2.gamma");
            assert_eq!(expected, vec![32]);
        }
        other => panic!("{other:?}"),
    }
    // The right file with the wrong configuration.
    let mut wrong = cfg.clone();
    wrong.embed_dim = 48;
    wrong.num_heads = 3;
    match load_weights_with(
        fam("plain").join("official.pth"),
        &LoadOptions {
            config: Some(wrong),
            checkpoint_key: None,
        },
    ) {
        Err(Error::ShapeMismatch {
            key,
            expected,
            actual,
        }) => {
            assert_eq!(key, "cls_token");
            assert_eq!(expected, vec![1, 1, 48]);
            assert_eq!(actual, vec![1, 1, 32]);
        }
        other => panic!("{other:?}"),
    }
    // A register checkpoint with a no-register configuration.
    match load_weights_with(
        fam("reg").join("official.safetensors"),
        &with_config("plain"),
    ) {
        Err(Error::UnexpectedKey { key, .. }) => assert_eq!(key, "register_tokens"),
        other => panic!("{other:?}"),
    }
    // Truncated files of both containers.
    for file in [
        "official.pth",
        "official.safetensors",
        "hf/model.safetensors",
    ] {
        let bytes = std::fs::read(fam("plain").join(file)).unwrap();
        let q = tmp.path().join(format!("trunc-{}", file.replace('/', "-")));
        std::fs::write(&q, &bytes[..bytes.len() * 2 / 3]).unwrap();
        match load_weights_with(&q, &with_config("plain")) {
            Err(Error::Format { path, .. }) => assert_eq!(path, q),
            other => panic!("{file}: {other:?}"),
        }
    }
    // Files that are not backbone weights at all.
    for file in [
        "lc1_head.safetensors",
        "lc1_head.pth",
        "outputs_28x28.safetensors",
        "config.json",
    ] {
        match load_weights(fam("plain").join(file)) {
            Err(Error::Format { path, reason }) => {
                assert_eq!(path, fam("plain").join(file));
                assert!(!reason.is_empty());
            }
            other => panic!("{file}: {other:?}"),
        }
    }
    // Directories without weights.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert!(matches!(load_weights(&empty), Err(Error::Format { path, .. }) if path == empty));
    assert!(matches!(
        load_weights(fam("plain")),
        Err(Error::Format { .. })
    ));
}
