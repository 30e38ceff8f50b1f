//! Parity with the official PyTorch model: golden outputs written by `tools/make_model_fixtures.py`
//! (tiny plain / register / SwiGLU models, four resolutions including two rectangular ones).

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use dinov2_model::pos_embed::interpolate_pos_embed;
use dinov2_model::{
    BlockSelection, DinoVisionTransformer, IntermediateOptions, LinearClassifier,
    PosEmbedInterpolation, StateDict, VitConfig,
};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn load_st(path: PathBuf) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn family(name: &str) -> (VitConfig, DinoVisionTransformer) {
    let dir = fixtures().join(name);
    let cfg: VitConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let sd: StateDict = load_st(dir.join("official.safetensors"))
        .into_iter()
        .collect();
    let model =
        DinoVisionTransformer::from_state_dict(&cfg, &sd, &Device::Cpu, DType::F32).unwrap();
    (cfg, model)
}

/// max |a - b| / max(|b|, 1e-6 floor) — the error relative to the reference's scale.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    let diff = (&a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1e-6);
    diff / scale
}

fn check(name: &str, ours: &Tensor, reference: &Tensor, tol: f32) {
    let e = rel_err(ours, reference);
    assert!(e <= tol, "{name}: relative max error {e:e} > {tol:e}");
}

const TOL: f32 = 1e-4;
const RESOLUTIONS: [&str; 4] = ["56x56", "28x28", "70x98", "42x84"];

fn run_family(name: &str) {
    let (cfg, model) = family(name);
    let dir = fixtures().join(name);
    for res in RESOLUTIONS {
        let r = load_st(dir.join(format!("outputs_{res}.safetensors")));
        let tag = |k: &str| format!("{name} {res} {k}");
        let x = &r["input"];
        // forward_features
        let f = model.forward_features(x, None).unwrap();
        check(
            &tag("x_norm_clstoken"),
            &f.x_norm_clstoken,
            &r["x_norm_clstoken"],
            TOL,
        );
        check(
            &tag("x_norm_patchtokens"),
            &f.x_norm_patchtokens,
            &r["x_norm_patchtokens"],
            TOL,
        );
        check(&tag("x_prenorm"), &f.x_prenorm, &r["x_prenorm"], TOL);
        if cfg.num_register_tokens > 0 {
            check(
                &tag("x_norm_regtokens"),
                &f.x_norm_regtokens,
                &r["x_norm_regtokens"],
                TOL,
            );
        } else {
            assert_eq!(f.x_norm_regtokens.dims(), &[2, 0, cfg.embed_dim]);
        }
        // masks
        let masks = &r["masks"];
        let fm = model.forward_features(x, Some(masks)).unwrap();
        check(
            &tag("masked.x_norm_clstoken"),
            &fm.x_norm_clstoken,
            &r["masked.x_norm_clstoken"],
            TOL,
        );
        check(
            &tag("masked.x_norm_patchtokens"),
            &fm.x_norm_patchtokens,
            &r["masked.x_norm_patchtokens"],
            TOL,
        );
        check(
            &tag("masked.x_prenorm"),
            &fm.x_prenorm,
            &r["masked.x_prenorm"],
            TOL,
        );
        // intermediate layers: last 2, normed, with class tokens
        let inter = model
            .get_intermediate_layers(
                x,
                &BlockSelection::Last(2),
                IntermediateOptions {
                    reshape: false,
                    return_class_token: true,
                    norm: true,
                },
            )
            .unwrap();
        assert_eq!(
            inter.iter().map(|o| o.block).collect::<Vec<_>>(),
            vec![cfg.depth - 2, cfg.depth - 1]
        );
        for (j, o) in inter.iter().enumerate() {
            check(
                &tag(&format!("inter_last2.{j}.patch")),
                &o.patch_tokens,
                &r[&format!("inter_last2.{j}.patch")],
                TOL,
            );
            check(
                &tag(&format!("inter_last2.{j}.cls")),
                o.class_token.as_ref().unwrap(),
                &r[&format!("inter_last2.{j}.cls")],
                TOL,
            );
        }
        // intermediate layers: explicit indices, reshaped, not normed
        let inter = model
            .get_intermediate_layers(
                x,
                &BlockSelection::Indices(vec![2, 0]),
                IntermediateOptions {
                    reshape: true,
                    return_class_token: false,
                    norm: false,
                },
            )
            .unwrap();
        assert_eq!(
            inter.iter().map(|o| o.block).collect::<Vec<_>>(),
            vec![0, 2],
            "block order, not list order"
        );
        for (j, o) in inter.iter().enumerate() {
            assert!(o.class_token.is_none());
            check(
                &tag(&format!("inter_idx.{j}.patch")),
                &o.patch_tokens,
                &r[&format!("inter_idx.{j}.patch")],
                TOL,
            );
        }
        // attention maps of every block
        let blocks: Vec<usize> = (0..cfg.depth).collect();
        let (f2, maps) = model.forward_with_attention(x, &blocks).unwrap();
        check(
            &tag("attn-run x_prenorm"),
            &f2.x_prenorm,
            &r["x_prenorm"],
            TOL,
        );
        for (i, m) in maps {
            check(
                &tag(&format!("attn.{i}")),
                &m,
                &r[&format!("attn.{i}")],
                TOL,
            );
        }
        // linear heads (1 layer, and the n-layer recipe with n = 3 for these depth-3 models)
        for (layers, key) in [(1, "lc1"), (3, "lc3")] {
            let head_sd: StateDict = load_st(dir.join(format!("{key}_head.safetensors")))
                .into_iter()
                .collect();
            let head =
                LinearClassifier::from_state_dict(&head_sd, "", layers, cfg.embed_dim).unwrap();
            check(
                &tag(&format!("{key}.logits")),
                &head.forward(&model, x).unwrap(),
                &r[&format!("{key}.logits")],
                TOL,
            );
        }
    }
}

#[test]
fn plain_family_matches_official() {
    run_family("plain");
}

#[test]
fn register_family_matches_official() {
    run_family("reg");
}

#[test]
fn swiglu_family_matches_official() {
    run_family("swiglu");
}

#[test]
fn pos_embed_kernels_match_pytorch_at_released_scale() {
    // Both bicubic kernels must reproduce PyTorch's float32 CPU (AVX2 build) results bit for bit: the fixture
    // was made by the official `interpolate_pos_encoding` on torch 2.15 (37 × 37 table, 8 channels).
    let r = load_st(fixtures().join("pos_embed.safetensors"));
    let table = &r["table"];
    let modes = [
        (
            "offset",
            PosEmbedInterpolation {
                offset: 0.1,
                antialias: false,
            },
        ),
        (
            "aa",
            PosEmbedInterpolation {
                offset: 0.0,
                antialias: true,
            },
        ),
    ];
    let grids = [
        (16, 16),
        (7, 7),
        (37, 37),
        (37, 20),
        (40, 30),
        (1, 1),
        (23, 11),
        (74, 74),
        (5, 60),
    ];
    let mut total = 0usize;
    for (name, mode) in modes {
        for (h, w) in grids {
            let out = interpolate_pos_embed(table, (h, w), (h * 14, w * 14), mode, None).unwrap();
            let reference = &r[&format!("{name}.{h}x{w}")];
            assert_eq!(out.dims(), reference.dims(), "{name} {h}x{w}: shape");
            let a = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = reference.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let differing: Vec<(usize, f32, f32)> = a
                .iter()
                .zip(&b)
                .enumerate()
                .filter(|(_, (x, y))| x.to_bits() != y.to_bits())
                .map(|(i, (&x, &y))| (i, x, y))
                .collect();
            assert!(
                differing.is_empty(),
                "{name} {h}x{w}: {} of {} values differ from PyTorch in their bits (relative error {:e}); first: {:?}",
                differing.len(),
                a.len(),
                rel_err(&out, reference),
                &differing[..differing.len().min(5)]
            );
            total += a.len();
        }
    }
    eprintln!("pos-embed: all {total} values bit-identical to PyTorch");
}

#[test]
fn pos_embed_gradients_match_pytorch() {
    let r = load_st(fixtures().join("pos_embed.safetensors"));
    for (name, mode, h, w) in [
        (
            "offset",
            PosEmbedInterpolation {
                offset: 0.1,
                antialias: false,
            },
            16,
            16,
        ),
        (
            "offset",
            PosEmbedInterpolation {
                offset: 0.1,
                antialias: false,
            },
            40,
            30,
        ),
        (
            "aa",
            PosEmbedInterpolation {
                offset: 0.0,
                antialias: true,
            },
            16,
            16,
        ),
        (
            "aa",
            PosEmbedInterpolation {
                offset: 0.0,
                antialias: true,
            },
            23,
            11,
        ),
    ] {
        let var = candle_core::Var::from_tensor(&r["table"]).unwrap();
        let out =
            interpolate_pos_embed(var.as_tensor(), (h, w), (h * 14, w * 14), mode, None).unwrap();
        let cot = &r[&format!("{name}.{h}x{w}.cot")];
        let grads = (out * cot).unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads.get(var.as_tensor()).unwrap();
        check(
            &format!("{name}.{h}x{w}.grad"),
            g,
            &r[&format!("{name}.{h}x{w}.grad")],
            1e-5,
        );
    }
}
