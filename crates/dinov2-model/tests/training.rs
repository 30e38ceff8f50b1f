//! Training readiness: gradients reach every parameter, agree with finite differences and with the
//! generic (unfused) path; the packed list forward equals separate forwards; drop path behaves officially.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use dinov2_model::rand::SeedableRng;
use dinov2_model::{DinoVisionTransformer, StateDict, VitConfig};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
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

/// A trainable model on `sd` and its `Var`s by official name, in the official order.
fn trainable(
    cfg: &VitConfig,
    sd: &StateDict,
    dtype: DType,
) -> (DinoVisionTransformer, Vec<(String, Var)>) {
    let varmap = VarMap::new();
    let model =
        DinoVisionTransformer::from_state_dict_trainable(cfg, sd, &varmap, &Device::Cpu, dtype)
            .unwrap();
    let data = varmap.data().lock().unwrap();
    let vars = model
        .named_parameters()
        .iter()
        .map(|(k, _)| (k.clone(), data[k].clone()))
        .collect();
    (model, vars)
}

fn masks(b: usize, n: usize) -> Tensor {
    let v: Vec<u8> = (0..b * n).map(|i| ((i * 7 + 3) % 5 < 2) as u8).collect();
    Tensor::from_vec(v, (b, n), &Device::Cpu).unwrap()
}

#[test]
fn every_parameter_of_every_family_gets_a_finite_nonzero_gradient() {
    for name in ["plain", "reg", "swiglu"] {
        let (cfg, sd) = family(name);
        let (model, vars) = trainable(&cfg, &sd, DType::F32);
        assert_eq!(vars.len(), sd.len(), "{name}: one Var per weight");
        // Rectangular input so pos_embed is resampled (its gradient then flows through the bicubic op).
        let x = input(2, 42, 70, 1, DType::F32);
        let m = masks(2, 15);
        let grads = loss(&model, &x, Some(&m), 7).backward().unwrap();
        for (k, v) in &vars {
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
        let (fused, fused_vars) = trainable(&cfg, &sd, DType::F32);
        let (generic, generic_vars) = trainable(&cfg, &sd, DType::F64);
        let m = masks(2, 15);
        let g32 = loss(&fused, &input(2, 42, 70, 2, DType::F32), Some(&m), 3)
            .backward()
            .unwrap();
        let g64 = loss(&generic, &input(2, 42, 70, 2, DType::F64), Some(&m), 3)
            .backward()
            .unwrap();
        for ((k, a), (_, b)) in fused_vars.iter().zip(&generic_vars) {
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
    let (model, vars) = trainable(&cfg, &sd2, DType::F64);
    let x = input(2, 28, 42, 9, DType::F64); // 2x3 grid: pos_embed interpolated
    let m = masks(2, 6);
    let grads = loss(&model, &x, Some(&m), 13).backward().unwrap();
    let eps = 1e-5;
    for (k, v) in &vars {
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
            // Central differences in f64 (every op of an f64 model, the position-table resampling included,
            // runs in f64): truncation h^2 |f'''| / 6 ~ 1e-11 |f'''| and round-off eps |L| / h ~ 2e-11 |L|
            // for h = 1e-5, both far below this bound for the O(1) loss and derivatives of this tiny model.
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
fn drop_path_is_inactive_in_eval_and_drawn_from_the_callers_generator_in_training() {
    for rate in [0.05, 0.4] {
        let mut cfg = VitConfig::vit_small();
        (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.img_size) = (16, 2, 2, 28);
        cfg.drop_path_rate = rate;
        cfg.drop_path_uniform = true;
        let varmap = VarMap::new();
        let model = DinoVisionTransformer::new(
            &cfg,
            dinov2_model::init::seeded(&varmap, 1, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let x = input(8, 28, 28, 4, DType::F32);
        let eval = model.forward_features(&x, None).unwrap().x_prenorm;
        let eval2 = model.forward_features(&x, None).unwrap().x_prenorm;
        assert_eq!(max_diff(&eval, &eval2), 0.0, "eval mode is deterministic");
        let mut rng = dinov2_model::rand::rngs::StdRng::seed_from_u64(42);
        let saved = rng.clone(); // a trainer checkpoints the generator
        let train = |rng: &mut dinov2_model::rand::rngs::StdRng| {
            model
                .forward_features_t(&x, None, Some(rng))
                .unwrap()
                .x_prenorm
        };
        let a = train(&mut rng);
        let b = train(&mut rng);
        assert!(
            max_diff(&a, &b) > 0.0,
            "rate {rate}: successive training forwards draw anew"
        );
        assert!(
            max_diff(&a, &eval) > 0.0,
            "rate {rate}: some branch was dropped"
        );
        // Restoring the generator replays the same draws.
        let mut restored = saved.clone();
        assert_eq!(max_diff(&train(&mut restored), &a), 0.0);
        assert_eq!(max_diff(&train(&mut restored), &b), 0.0);
        // Gradients still reach every parameter in training mode.
        let mut rng = saved.clone();
        let f = model.forward_features_t(&x, None, Some(&mut rng)).unwrap();
        let w = random_like(&f.x_norm_patchtokens, 5);
        let grads = (f.x_norm_patchtokens * w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in varmap.all_vars() {
            if v.dims() == [1, 16] {
                continue; // the mask token: only used with masks
            }
            assert!(
                grads.get(v.as_tensor()).is_some(),
                "rate {rate}: no gradient for a {:?} parameter",
                v.dims()
            );
        }
    }
}

#[test]
fn detached_forward_records_no_graph_runs_the_fused_path_and_follows_in_place_updates() {
    // A teacher on Vars: its gradient-free forward must equal, bit for bit, the fused inference model built
    // from the same weights (so it runs the same kernels), before and after the Vars are updated in place
    // (an EMA step). Rectangular input: the position table is resampled, so its cache is exercised too.
    let (cfg, sd) = family("reg");
    let (teacher, vars) = trainable(&cfg, &sd, DType::F32);
    let view = teacher.detached();
    let x = input(2, 42, 70, 31, DType::F32);
    let inference = |sd: &StateDict| {
        DinoVisionTransformer::from_state_dict(&cfg, sd, &Device::Cpu, DType::F32)
            .unwrap()
            .forward_features(&x, None)
            .unwrap()
            .x_prenorm
    };
    let before = view.forward_features(&x, None).unwrap().x_prenorm;
    assert!(!before.track_op(), "no gradient graph");
    assert_eq!(max_diff(&before, &inference(&sd)), 0.0);
    // EMA-like update of every Var in place: w <- 0.9 w + 0.1 r.
    for (i, (_, v)) in vars.iter().enumerate() {
        let r = random_like(v.as_tensor(), 100 + i as u64);
        let next = ((v.as_tensor() * 0.9).unwrap() + (r * 0.1).unwrap()).unwrap();
        v.set(&next).unwrap();
    }
    let updated: StateDict = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap()))
        .collect();
    let after = view.forward_features(&x, None).unwrap().x_prenorm;
    assert!(max_diff(&before, &after) > 1e-3, "the update is visible");
    assert_eq!(max_diff(&after, &inference(&updated)), 0.0);
    // A view made after the update and the trainable model itself agree too.
    let fresh_view = teacher
        .detached()
        .forward_features(&x, None)
        .unwrap()
        .x_prenorm;
    assert_eq!(max_diff(&fresh_view, &after), 0.0);
    let graph = teacher.forward_features(&x, None).unwrap().x_prenorm;
    assert!(graph.track_op());
    assert!(max_diff(&graph, &after) < 1e-5);
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
    let (model, vars) = trainable(&cfg, &sd, DType::F32);
    let out = model.state_dict().unwrap();
    assert_eq!(out.len(), sd.len());
    for (k, t) in sd.iter() {
        assert_eq!(max_diff(out.get(k).unwrap(), t), 0.0, "{k}");
    }
    // The Vars are copies: updating one leaves the state dict it came from alone, and is visible to the model
    // (training writes through Var::set).
    let (k, v) = &vars[0];
    v.set(&v.as_tensor().zeros_like().unwrap()).unwrap();
    assert!(
        max_diff(
            sd.get(k).unwrap(),
            &sd.get(k).unwrap().zeros_like().unwrap()
        ) > 0.0
    );
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
