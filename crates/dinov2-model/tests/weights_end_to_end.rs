//! End to end: a model built from each weight layout of each fixture family reproduces the official
//! `forward_features` outputs (at the native 56x56, where the position table is used as is, and at 28x28 and
//! 70x98, where it is interpolated — so the timm `cls + pos0` convention is exercised on both paths).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use dinov2_model::weights::{load_weights_with, LoadOptions};
use dinov2_model::{DinoVisionTransformer, VitConfig};

fn fam(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn every_layout_reproduces_the_official_outputs() {
    for f in ["plain", "reg", "swiglu"] {
        let cfg: VitConfig =
            serde_json::from_str(&std::fs::read_to_string(fam(f).join("config.json")).unwrap())
                .unwrap();
        let opts = LoadOptions {
            config: Some(cfg.clone()),
            checkpoint_key: None,
        };
        let mut layouts = vec![
            "official.pth",
            "official.safetensors",
            "hf",
            "timm.safetensors",
        ];
        if f != "reg" {
            layouts.push("train_ckpt.pth");
        }
        if f == "plain" {
            layouts.push("hf_classifier");
        }
        for layout in layouts {
            let w = load_weights_with(fam(f).join(layout), &opts).unwrap();
            let model = DinoVisionTransformer::from_state_dict(
                &w.config,
                &w.state_dict,
                &Device::Cpu,
                DType::F32,
            )
            .unwrap_or_else(|e| panic!("{f}/{layout}: {e}"));
            for size in ["56x56", "28x28", "70x98"] {
                let out = candle_core::safetensors::load(
                    fam(f).join(format!("outputs_{size}.safetensors")),
                    &Device::Cpu,
                )
                .unwrap();
                let got = model.forward_features(&out["input"], None).unwrap();
                for (name, t) in [
                    ("x_norm_clstoken", &got.x_norm_clstoken),
                    ("x_norm_patchtokens", &got.x_norm_patchtokens),
                ] {
                    let d = max_abs_diff(t, &out[name]);
                    // f32 kernels differ from PyTorch's in rounding only (fixture README: ~1e-4 abs).
                    assert!(d < 1e-4, "{f}/{layout} @{size}: {name} max|diff| {d}");
                }
            }
        }
    }
}
