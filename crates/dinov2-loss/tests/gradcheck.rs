//! Finite-difference gradient checks in f64 on tiny sizes, for the head and every loss.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use dinov2_loss::{
    Centering, DinoHead, DinoHeadConfig, DinoLoss, DinoV2Loss, DinoV2LossConfig, IbotPatchLoss,
    KoLeoLoss, StudentOutputs,
};

const CPU: Device = Device::Cpu;

fn randn(shape: &[usize], std: f64) -> Tensor {
    Tensor::randn(0f64, std, shape, &CPU).unwrap()
}

fn softmax_rows(shape: &[usize]) -> Tensor {
    candle_nn::ops::softmax(&randn(shape, 1.0), candle_core::D::Minus1).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// Compares the autograd gradient of `loss()` w.r.t. every var with central differences (step `h`),
/// norm-wise relative error ≤ `tol` per var.
fn fd_check(name: &str, vars: &[(&str, &Var)], loss: impl Fn() -> Tensor, h: f64, tol: f64) {
    let grads = loss().backward().unwrap();
    for (vname, var) in vars {
        let analytic: Vec<f64> = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient for {vname}"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let x0 = var.as_tensor().copy().unwrap();
        let base: Vec<f64> = x0.flatten_all().unwrap().to_vec1().unwrap();
        let mut numeric = vec![0f64; base.len()];
        for i in 0..base.len() {
            let eval = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, x0.shape(), &CPU).unwrap())
                    .unwrap();
                scalar(&loss())
            };
            numeric[i] = (eval(h) - eval(-h)) / (2.0 * h);
        }
        var.set(&x0).unwrap();
        // absolute below 1e-3 (a gradient that is exactly zero, e.g. a bias before a train-mode BatchNorm)
        let scale = numeric.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-3);
        let err = analytic
            .iter()
            .zip(&numeric)
            .fold(0f64, |m, (a, n)| m.max((a - n).abs()))
            / scale;
        assert!(
            err <= tol,
            "{name}: d/d{vname} relative error {err:.2e} > {tol:.0e}\nanalytic {analytic:?}\nnumeric {numeric:?}"
        );
    }
}

fn var(t: Tensor) -> Var {
    Var::from_tensor(&t).unwrap()
}

fn head_check(cfg: DinoHeadConfig, rows: usize) {
    // parameters off their init (non-zero biases, g ≠ 1) in f64
    let mut tensors = HashMap::new();
    for (name, shape) in cfg.parameter_shapes() {
        // weight_g and BatchNorm weights around 1, everything else around 0
        let around_one =
            name.ends_with("weight_g") || (shape.len() == 1 && name.contains(".weight"));
        let t = if around_one {
            (randn(&shape, 0.2) + 1.0).unwrap()
        } else {
            randn(&shape, 0.5)
        };
        tensors.insert(name, t);
    }
    let vm = VarMap::new();
    {
        let mut d = vm.data().lock().unwrap();
        for (k, t) in &tensors {
            d.insert(k.clone(), var(t.clone()));
        }
    }
    let head = DinoHead::new(&cfg, VarBuilder::from_varmap(&vm, DType::F64, &CPU)).unwrap();
    let x = var(randn(&[rows, cfg.in_dim], 1.0));
    let r = randn(&[rows, cfg.out_dim], 1.0);
    let vars_owned: Vec<(String, Var)> = {
        let d = vm.data().lock().unwrap();
        let mut v: Vec<_> = d.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let mut vars: Vec<(&str, &Var)> = vars_owned.iter().map(|(k, v)| (k.as_str(), v)).collect();
    vars.push(("x", &x));
    let name = format!("head {cfg:?}");
    fd_check(
        &name,
        &vars,
        || {
            (head.forward_t(x.as_tensor(), true).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
        },
        1e-6,
        1e-6,
    );
}

#[test]
fn head_gradients() {
    let small = |nlayers, use_bn, mlp_bias| DinoHeadConfig {
        in_dim: 4,
        out_dim: 5,
        use_bn,
        nlayers,
        hidden_dim: 6,
        bottleneck_dim: 3,
        mlp_bias,
    };
    head_check(small(3, false, true), 3);
    head_check(small(1, false, true), 2);
    head_check(small(2, true, true), 4);
    head_check(small(3, false, false), 3);
}

#[test]
fn dino_loss_gradients() {
    let loss = DinoLoss::with_params(6, 0.1, 0.9, &CPU).unwrap();
    let s = var(randn(&[6, 6], 0.5)); // 3 student chunks of 2 rows
    let teachers = [softmax_rows(&[2, 6]), softmax_rows(&[2, 6])];
    fd_check(
        "dino",
        &[("s", &s)],
        || {
            let chunks = s.as_tensor().chunk(3, 0).unwrap();
            loss.forward(&chunks, &teachers).unwrap()
        },
        1e-6,
        1e-6,
    );
}

#[test]
fn ibot_loss_gradients() {
    let loss = IbotPatchLoss::with_params(5, 0.2, 0.9, &CPU).unwrap();
    let masks = Tensor::new(&[[1u8, 0, 1], [0, 0, 0], [0, 1, 1]], &CPU).unwrap();
    let s = var(randn(&[5, 5], 0.5)); // 4 masked patches + 1 padding row
    let t = softmax_rows(&[5, 5]);
    fd_check(
        "ibot forward_masked",
        &[("s", &s)],
        || {
            loss.forward_masked(s.as_tensor(), &t, &masks, Some(4), None)
                .unwrap()
        },
        1e-6,
        1e-6,
    );
    let sd = var(randn(&[3, 3, 5], 0.5));
    let td = softmax_rows(&[3, 3, 5]);
    fd_check(
        "ibot dense",
        &[("s", &sd)],
        || loss.forward(sd.as_tensor(), &td, &masks).unwrap(),
        1e-6,
        1e-6,
    );
}

#[test]
fn koleo_gradients() {
    for (n, d) in [(2, 3), (5, 4)] {
        let x = var(randn(&[n, d], 1.0));
        fd_check(
            "koleo",
            &[("x", &x)],
            || KoLeoLoss::default().forward(x.as_tensor()).unwrap(),
            1e-7,
            1e-5,
        );
    }
}

#[test]
fn combination_gradients() {
    for centering in [
        Centering::Centering,
        Centering::SinkhornKnopp { n_iterations: 3 },
    ] {
        let (k, b, d, m) = (5, 2, 3, 3);
        let cfg = DinoV2LossConfig {
            centering,
            ..Default::default()
        };
        let mut loss = DinoV2Loss::new(cfg, k, Some(k), &CPU).unwrap();
        let masks = Tensor::new(&[[1u8, 1, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0]], &CPU).unwrap();
        let targets = loss
            .teacher_targets(&randn(&[2 * b, k], 0.5), Some(&randn(&[m, k], 0.5)), 0.07)
            .unwrap();
        let global = var(randn(&[2 * b, k], 0.5));
        let local = var(randn(&[2 * b, k], 0.5)); // 2 local crops
        let masked = var(randn(&[m, k], 0.5));
        let cls = var(randn(&[2 * b, d], 1.0));
        fd_check(
            &format!("combination {centering:?}"),
            &[
                ("global", &global),
                ("local", &local),
                ("masked", &masked),
                ("cls", &cls),
            ],
            || {
                loss.forward(
                    &StudentOutputs {
                        global_cls_logits: global.as_tensor(),
                        local_cls_logits: Some(local.as_tensor()),
                        masked_patch_logits: Some(masked.as_tensor()),
                        global_cls_tokens: Some(cls.as_tensor()),
                    },
                    &targets,
                    Some(&masks),
                    None,
                )
                .unwrap()
                .total
            },
            1e-7,
            1e-5,
        );
    }
}

#[test]
fn packed_combination_gradients() {
    let (k, b, d, m, n_local) = (5, 2, 3, 3, 2);
    let mut loss = DinoV2Loss::new(DinoV2LossConfig::default(), k, Some(k), &CPU).unwrap();
    let masks = Tensor::new(&[[1u8, 1, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0]], &CPU).unwrap();
    let targets = loss
        .teacher_targets(&randn(&[2 * b, k], 0.5), Some(&randn(&[m, k], 0.5)), 0.07)
        .unwrap();
    let packed = var(randn(&[n_local * b + 2 * b + m, k], 0.5));
    let cls = var(randn(&[2 * b, d], 1.0));
    fd_check(
        "packed combination",
        &[("packed", &packed), ("cls", &cls)],
        || {
            loss.forward_packed(
                packed.as_tensor(),
                n_local,
                &targets,
                Some(cls.as_tensor()),
                Some(&masks),
                None,
            )
            .unwrap()
            .total
        },
        1e-7,
        1e-5,
    );
}
