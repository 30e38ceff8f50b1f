//! Training readiness: gradients reach every parameter, agree with finite differences and with the
//! generic (unfused) path; the packed list forward equals separate forwards; drop path behaves officially.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use dinov2_model::{DinoVisionTransformer, StateDict, VitConfig};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/model")
}

fn family(name: &str) -> (VitConfig, StateDict) {
    let dir = fixtures().join(name);
    let cfg: VitConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let sd: StateDict =
        candle_core::safetensors::load(dir.join("official.safetensors"), &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
    (cfg, sd)
}

/// A loss touching every output with fixed random weights (a plain sum would zero LayerNorm gradients).
fn loss(model: &DinoVisionTransformer, x: &Tensor, masks: Option<&Tensor>, seed: u64) -> Tensor {
    let f = model.forward_features(x, masks).unwrap();
    let dev = x.device();
    let mut total = Tensor::zeros((), x.dtype(), dev).unwrap();
    for (i, t) in [
        &f.x_norm_clstoken,
        &f.x_norm_patchtokens,
        &f.x_norm_regtokens,
    ]
    .iter()
    .enumerate()
    {
        if t.elem_count() == 0 {
            continue;
        }
        let w = random_like(t, seed + i as u64);
        total = (total + (*t * w).unwrap().sum_all().unwrap()).unwrap();
    }
    total
}

fn random_like(t: &Tensor, seed: u64) -> Tensor {
    // Deterministic pseudo-random weights without a global RNG.
    let n = t.elem_count();
    let v: Vec<f64> = (0..n)
        .map(|i| {
            let h = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ seed.wrapping_mul(0xD1B5_4A32_D192_ED03);
            ((h >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, t.shape(), t.device())
        .unwrap()
        .to_dtype(t.dtype())
        .unwrap()
}

fn input(b: usize, h: usize, w: usize, seed: u64, dtype: DType) -> Tensor {
    random_like(
        &Tensor::zeros((b, 3, h, w), DType::F64, &Device::Cpu).unwrap(),
        seed,
    )
    .to_dtype(dtype)
    .unwrap()
}

fn masks(b: usize, n: usize) -> Tensor {
    let v: Vec<u8> = (0..b * n).map(|i| ((i * 7 + 3) % 5 < 2) as u8).collect();
    Tensor::from_vec(v, (b, n), &Device::Cpu).unwrap()
}

#[test]
fn every_parameter_of_every_family_gets_a_finite_nonzero_gradient() {
    for name in ["plain", "reg", "swiglu"] {
        let (cfg, sd) = family(name);
        let model =
            DinoVisionTransformer::from_state_dict_trainable(&cfg, &sd, &Device::Cpu, DType::F32)
                .unwrap();
        assert_eq!(model.vars().len(), sd.len(), "{name}: one Var per weight");
        // Rectangular input so pos_embed is resampled (its gradient then flows through the bicubic op).
        let x = input(2, 42, 70, 1, DType::F32);
        let m = masks(2, 15);
        let grads = loss(&model, &x, Some(&m), 7).backward().unwrap();
        for (k, v) in model.vars() {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient for {k}"));
            let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(
                g.iter().all(|x| x.is_finite()),
                "{name}: non-finite gradient for {k}"
            );
            assert!(g.iter().any(|&x| x != 0.0), "{name}: zero gradient for {k}");
        }
    }
}

#[test]
fn fused_f32_gradients_equal_the_generic_f64_path() {
    for name in ["plain", "reg", "swiglu"] {
        let (cfg, sd) = family(name);
        let fused =
            DinoVisionTransformer::from_state_dict_trainable(&cfg, &sd, &Device::Cpu, DType::F32)
                .unwrap();
        let generic =
            DinoVisionTransformer::from_state_dict_trainable(&cfg, &sd, &Device::Cpu, DType::F64)
                .unwrap();
        let m = masks(2, 15);
        let g32 = loss(&fused, &input(2, 42, 70, 2, DType::F32), Some(&m), 3)
            .backward()
            .unwrap();
        let g64 = loss(&generic, &input(2, 42, 70, 2, DType::F64), Some(&m), 3)
            .backward()
            .unwrap();
        for ((k, a), (_, b)) in fused.vars().iter().zip(generic.vars()) {
            let a = g32
                .get(a.as_tensor())
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap();
            let b = g64.get(b.as_tensor()).unwrap();
            let scale = b
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
                .max(1e-12);
            let err = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
                / scale;
            assert!(
                err < 2e-3,
                "{name} {k}: fused f32 vs generic f64 gradient relative error {err:e}"
            );
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    // Tiny f64 model (generic ops), central differences on a sample of coordinates of every parameter kind.
    let mut cfg = VitConfig::vit_small().with_registers(2);
    (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.img_size) = (8, 2, 2, 28);
    cfg.layer_scale_init = Some(0.5);
    let sd = dinov2_model::init::init_state_dict(&cfg, 5).unwrap();
    // Make cls/registers/mask token non-negligible so their gradients are testable.
    let mut sd2 = StateDict::new();
    for (k, t) in sd.iter() {
        let t = if matches!(k.as_str(), "cls_token" | "register_tokens" | "mask_token") {
            random_like(t, 11)
        } else {
            t.clone()
        };
        sd2.insert(k.clone(), t);
    }
    let model =
        DinoVisionTransformer::from_state_dict_trainable(&cfg, &sd2, &Device::Cpu, DType::F64)
            .unwrap();
    let x = input(2, 28, 42, 9, DType::F64); // 2x3 grid: pos_embed interpolated
    let m = masks(2, 6);
    let grads = loss(&model, &x, Some(&m), 13).backward().unwrap();
    let eps = 1e-5;
    for (k, v) in model.vars() {
        let g = grads
            .get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = v
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for idx in [0, base.len() / 2, base.len() - 1] {
            let eval = |delta: f64| {
                let mut p = base.clone();
                p[idx] += delta;
                v.set(&Tensor::from_vec(p, v.as_tensor().shape(), &Device::Cpu).unwrap())
                    .unwrap();
                loss(&model, &x, Some(&m), 13).to_scalar::<f64>().unwrap()
            };
            let fd = (eval(eps) - eval(-eps)) / (2.0 * eps);
            v.set(&Tensor::from_vec(base.clone(), v.as_tensor().shape(), &Device::Cpu).unwrap())
                .unwrap();
            let tol = 1e-6 + 1e-4 * fd.abs().max(g[idx].abs());
            assert!(
                (fd - g[idx]).abs() < tol,
                "{k}[{idx}]: finite difference {fd} vs autograd {}",
                g[idx]
            );
        }
    }
}

#[test]
fn packed_list_forward_equals_separate_forwards() {
    let (cfg, sd) = family("reg");
    let model =
        DinoVisionTransformer::from_state_dict(&cfg, &sd, &Device::Cpu, DType::F32).unwrap();
    // "global" crops 56x56 (2 images, masked) and "local" crops 28x28 (3 images), as in training.
    let g = input(2, 56, 56, 21, DType::F32);
    let l = input(3, 28, 28, 22, DType::F32);
    let m = masks(2, 16);
    let packed = model
        .forward_features_list(&[g.clone(), l.clone()], &[Some(m.clone()), None])
        .unwrap();
    let sep = [
        model.forward_features(&g, Some(&m)).unwrap(),
        model.forward_features(&l, None).unwrap(),
    ];
    for (p, s) in packed.iter().zip(sep.iter()) {
        for (a, b) in [
            (&p.x_prenorm, &s.x_prenorm),
            (&p.x_norm_clstoken, &s.x_norm_clstoken),
            (&p.x_norm_patchtokens, &s.x_norm_patchtokens),
            (&p.x_norm_regtokens, &s.x_norm_regtokens),
        ] {
            let d = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-5, "packed vs separate differ by {d}");
        }
    }
}

#[test]
fn drop_path_is_inactive_in_eval_and_random_but_seeded_in_training() {
    for rate in [0.05, 0.4] {
        let mut cfg = VitConfig::vit_small();
        (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.img_size) = (16, 2, 2, 28);
        cfg.drop_path_rate = rate;
        cfg.drop_path_uniform = true;
        let mut model =
            DinoVisionTransformer::new_random(&cfg, &Device::Cpu, DType::F32, 1).unwrap();
        let x = input(8, 28, 28, 4, DType::F32);
        let eval = model.forward_features(&x, None).unwrap().x_prenorm;
        let eval2 = model.forward_features(&x, None).unwrap().x_prenorm;
        assert_eq!(max_diff(&eval, &eval2), 0.0, "eval mode is deterministic");
        model.set_training(true);
        let a = model.forward_features(&x, None).unwrap().x_prenorm;
        let b = model.forward_features(&x, None).unwrap().x_prenorm;
        assert!(
            max_diff(&a, &b) > 0.0,
            "rate {rate}: training forwards differ"
        );
        assert!(
            max_diff(&a, &eval) > 0.0,
            "rate {rate}: some branch was dropped"
        );
        // Same seed, same draw.
        model.set_seed(42);
        let c = model.forward_features(&x, None).unwrap().x_prenorm;
        model.set_seed(42);
        let d = model.forward_features(&x, None).unwrap().x_prenorm;
        assert_eq!(max_diff(&c, &d), 0.0);
        // Gradients still reach every parameter in training mode.
        let grads = loss(&model, &x, None, 5).backward().unwrap();
        for (k, v) in model.vars() {
            if k == "mask_token" {
                continue; // only used with masks
            }
            assert!(
                grads.get(v.as_tensor()).is_some(),
                "rate {rate}: no gradient for {k}"
            );
        }
    }
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
fn trainable_weights_round_trip_through_the_state_dict() {
    let (cfg, sd) = family("swiglu");
    let model =
        DinoVisionTransformer::from_state_dict_trainable(&cfg, &sd, &Device::Cpu, DType::F32)
            .unwrap();
    let out = model.state_dict();
    assert_eq!(out.len(), sd.len());
    for (k, t) in sd.iter() {
        assert_eq!(max_diff(out.get(k).unwrap(), t), 0.0, "{k}");
    }
    // Var updates are visible to the model (training writes through Var::set).
    let (_, v) = &model.vars()[0];
    v.set(&v.as_tensor().zeros_like().unwrap()).unwrap();
    assert_eq!(
        model.named_parameters()[0]
            .1
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
}
