//! Mixed precision (`set_compute_dtype`): f32 master weights computing in bf16/f16, on the CPU (the same code
//! runs on CUDA, where tools/gpu_check.sh section b checks it against the CPU).

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use dinov2_model::{ops, DinoVisionTransformer, VitConfig};

fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    let m = |t: &Tensor| {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    m(&(a - &b).unwrap()) / m(&b).max(1e-30)
}

fn wave(shape: &[usize], phase: f64) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::arange(0f32, n as f32, &Device::Cpu)
        .unwrap()
        .affine(0.37, phase)
        .unwrap()
        .sin()
        .unwrap()
        .reshape(shape)
        .unwrap()
}

#[test]
fn half_precision_layer_norm_keeps_f32_statistics_and_f32_weight_gradients() {
    let x = wave(&[6, 48], 0.0).affine(3.0, 100.0).unwrap(); // a large mean: naive half-precision variance fails
    let w = Var::from_tensor(&wave(&[48], 1.0)).unwrap();
    let b = Var::from_tensor(&wave(&[48], 2.0)).unwrap();
    for dtype in [DType::BF16, DType::F16] {
        let xh = x.to_dtype(dtype).unwrap();
        let y = ops::layer_norm(&xh, w.as_tensor(), b.as_tensor(), 1e-6).unwrap();
        assert_eq!(y.dtype(), dtype);
        // the reference normalises the same rounded input in f32
        let r = ops::layer_norm_generic(
            &xh.to_dtype(DType::F32).unwrap(),
            w.as_tensor(),
            b.as_tensor(),
            1e-6,
        )
        .unwrap();
        let tol = if dtype == DType::BF16 { 8e-3 } else { 1e-3 }; // one rounding of the output
        assert!(rel_err(&y, &r) < tol, "{dtype:?}: {}", rel_err(&y, &r));
        let g = y
            .to_dtype(DType::F32)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&w, &b] {
            let gv = g
                .get(v.as_tensor())
                .expect("gradient reaches the f32 weight");
            assert_eq!(gv.dtype(), DType::F32);
        }
    }
}

#[test]
fn linear_weights_follow_the_input_dtype() {
    let x = wave(&[5, 16], 0.0).to_dtype(DType::BF16).unwrap();
    let w = Var::from_tensor(&wave(&[8, 16], 1.0)).unwrap();
    let b = Var::from_tensor(&wave(&[8], 2.0)).unwrap();
    let y = ops::linear(&x, w.as_tensor(), Some(b.as_tensor())).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    let r = ops::linear_generic(
        &x.to_dtype(DType::F32).unwrap(),
        w.as_tensor(),
        Some(b.as_tensor()),
    )
    .unwrap();
    assert!(rel_err(&y, &r) < 1.6e-2, "{}", rel_err(&y, &r));
    let g = y
        .to_dtype(DType::F32)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(g.get(w.as_tensor()).unwrap().dtype(), DType::F32);
    assert_eq!(g.get(b.as_tensor()).unwrap().dtype(), DType::F32);
}

fn tiny() -> VitConfig {
    let mut cfg = VitConfig::vit_small();
    (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.img_size) = (64, 2, 3, 28);
    cfg.num_register_tokens = 4;
    cfg.layer_scale_init = Some(0.1); // blocks that count (1e-5 would make them the identity)
    cfg
}

/// The packed list forward (2 crops of 28 and 4 of 14 pixels) and the gradients of a scalar of its outputs.
fn run(compute: Option<DType>) -> (Vec<Tensor>, Vec<(String, Tensor)>) {
    let cfg = tiny();
    let vm = VarMap::new();
    let mut m = DinoVisionTransformer::new(
        &cfg,
        dinov2_model::init::seeded(&vm, 5, DType::F32, &Device::Cpu),
    )
    .unwrap();
    m.set_compute_dtype(compute);
    let crops = [wave(&[2, 3, 28, 28], 0.0), wave(&[4, 3, 14, 14], 0.5)];
    let out = m.forward_features_list(&crops, &[None, None]).unwrap();
    let w = wave(&[cfg.embed_dim], 3.0);
    let mut loss = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
    let mut outs = Vec::new();
    for f in &out {
        let cls = f.x_norm_clstoken.to_dtype(DType::F32).unwrap();
        let patches = f.x_norm_patchtokens.to_dtype(DType::F32).unwrap();
        loss = (loss + cls.broadcast_mul(&w).unwrap().sum_all().unwrap()).unwrap();
        loss = (loss
            + patches
                .mean(1)
                .unwrap()
                .broadcast_mul(&w)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap())
        .unwrap();
        outs.push(f.x_norm_clstoken.clone());
        outs.push(f.x_norm_patchtokens.clone());
    }
    let g = loss.backward().unwrap();
    let mut grads: Vec<(String, Tensor)> = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.as_str() != "mask_token") // no masks in this forward
        .map(|(k, v)| {
            (
                k.clone(),
                g.get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{k}: no gradient"))
                    .clone(),
            )
        })
        .collect();
    grads.sort_by(|a, b| a.0.cmp(&b.0));
    (outs, grads)
}

#[test]
fn half_precision_compute_on_f32_weights_tracks_f32() {
    let (ref_out, ref_grads) = run(None);
    // bf16: 8 significant bits; through 3 blocks the outputs stay within a few roundings, and each gradient
    // tensor within a few percent in L2 (measured: at most 1.5 % on ViT-S 4 blocks, 0.8 % on average)
    for (dtype, out_tol, grad_tol) in [(DType::BF16, 4e-2, 6e-2), (DType::F16, 6e-3, 1e-2)] {
        let (out, grads) = run(Some(dtype));
        for (o, r) in out.iter().zip(&ref_out) {
            assert_eq!(o.dtype(), dtype);
            assert!(
                rel_err(o, r) < out_tol,
                "{dtype:?} outputs: {}",
                rel_err(o, r)
            );
        }
        assert_eq!(grads.len(), ref_grads.len());
        for ((k, g), (_, r)) in grads.iter().zip(&ref_grads) {
            assert_eq!(g.dtype(), DType::F32, "{k}");
            let l2 = |t: &Tensor| {
                t.sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .sqrt()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            let e = l2(&(g - r).unwrap()) / l2(r).max(1e-30);
            assert!(e < grad_tol, "{dtype:?} {k}: relative L2 error {e}");
        }
    }
}

#[test]
fn compute_dtype_survives_detached_and_defaults_to_the_weights() {
    let cfg = tiny();
    let sd = dinov2_model::init::init_state_dict(&cfg, 0).unwrap();
    let mut m =
        DinoVisionTransformer::from_state_dict(&cfg, &sd, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(m.compute_dtype(), DType::F32);
    m.set_compute_dtype(Some(DType::BF16));
    assert_eq!(m.detached().compute_dtype(), DType::BF16);
    let f = m
        .forward_features(&wave(&[1, 3, 28, 28], 0.0), None)
        .unwrap();
    assert_eq!(f.x_norm_patchtokens.dtype(), DType::BF16);
    let h = DinoVisionTransformer::from_state_dict(&cfg, &sd, &Device::Cpu, DType::F16).unwrap();
    assert_eq!(h.compute_dtype(), DType::F16);
}
