//! Finite-difference gradient checks in f64 on tiny sizes, for the head and every loss.
//!
//! Inputs come from a [`SeededRng`] (the same numbers on every run) and every comparison uses a tolerance
//! derived from the error of central differences (see [`fd_check`]), not a fixed constant.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use common::{sum_error, SeededRng, U64};
use dinov2_loss::{
    DinoHead, DinoHeadConfig, DinoLoss, DinoLossConfig, DinoV2Loss, DinoV2LossConfig,
    IbotLossConfig, IbotPatchLoss, KoLeoLoss, PackedStudentOutputs, PatchMasks, StateDict,
    StudentOutputs, TargetMode, TeacherOutputs, TeacherTargets,
};

const CPU: Device = Device::Cpu;

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Relative rounding error of one f64 evaluation of a loss here: every graph is tiny (no tensor has more
/// than 64 elements, no path more than 64 dependent roundings), so by the probabilistic bound a value is
/// off by at most `sum_error(64, U64)` ≈ 24 ε relative to the magnitude it is computed from. The same
/// bound covers the autograd gradient, which runs through a graph of the same size.
fn eta() -> f64 {
    sum_error(64, U64)
}

/// Compares the autograd gradient of `loss()` with respect to every var with central differences of step
/// `h`, element by element, within a tolerance derived from the method's error.
///
/// For one coordinate, `D(h) = (f(x+h) − f(x−h)) / 2h` has two error sources:
/// * truncation: `D(h) − f'(x) = f'''(ξ)·h²/6 + O(h⁴)`. `f'''` is not known, but `D(2h) − D(h) =
///   f'''·(4h² − h²)/6 = f'''·h²/2`, so the truncation of `D(h)` is `T = |D(2h) − D(h)| / 3` (Richardson);
/// * round-off: each evaluation of `f` is off by at most `η·F` (`F = max |f|` over the evaluations,
///   `η` from [`eta`]), so the difference quotient is off by at most `R = 2ηF / 2h = ηF/h`; the estimate
///   `T` itself carries round-off `≤ (ηF/h + ηF/2h)/3 = R/2`.
///
/// The autograd gradient `a` is off by at most `η·S` (`S = max |a|`). So `|a − D(h)| ≤ T + R/2 + R + ηS`;
/// the check allows twice that (`f'''` varies between `h` and `2h`). Independent of the thread count and of
/// the SIMD width (AVX2 or AVX-512 kernels of candle's matmul): those only change the rounding, which `R`
/// and `ηS` bound. A tolerance above `1e-4·G` (`G`: the largest gradient entry over all the vars checked)
/// could let a wrong gradient pass: that fails too, so a badly chosen `h` cannot pass silently.
fn fd_check(name: &str, vars: &[(&str, &Var)], loss: impl Fn() -> Tensor, h: f64) {
    let grads = loss().backward().unwrap();
    let analytic: Vec<Vec<f64>> = vars
        .iter()
        .map(|(vname, var)| {
            flat(
                grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{name}: no gradient for {vname}")),
            )
        })
        .collect();
    let g_max = analytic.iter().flatten().fold(0f64, |m, v| m.max(v.abs()));
    for ((vname, var), analytic) in vars.iter().zip(&analytic) {
        let x0 = var.as_tensor().copy().unwrap();
        let base = flat(&x0);
        let mut f_max = 0f64;
        let mut diff = |i: usize, step: f64| {
            let mut eval = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, x0.shape(), &CPU).unwrap())
                    .unwrap();
                let f = scalar(&loss());
                f_max = f_max.max(f.abs());
                f
            };
            (eval(step) - eval(-step)) / (2.0 * step)
        };
        let (d1, d2): (Vec<f64>, Vec<f64>) = (0..base.len())
            .map(|i| (diff(i, h), diff(i, 2.0 * h)))
            .unzip();
        var.set(&x0).unwrap();
        let s = analytic.iter().fold(0f64, |m, v| m.max(v.abs()));
        let round_off = eta() * f_max / h;
        for i in 0..base.len() {
            let truncation = (d2[i] - d1[i]).abs() / 3.0;
            let tol = 2.0 * (truncation + 1.5 * round_off + eta() * s);
            assert!(
                tol <= 1e-4 * g_max,
                "{name}: d/d{vname}[{i}]: the finite-difference error bound {tol:.2e} is too loose for \
                 gradients of size {g_max:.2e}: choose another step than {h:e}"
            );
            let err = (analytic[i] - d1[i]).abs();
            assert!(
                err <= tol,
                "{name}: d/d{vname}[{i}] autograd {} vs central difference {} (error {err:.2e} > bound \
                 {tol:.2e}: truncation {truncation:.2e}, round-off {round_off:.2e})",
                analytic[i],
                d1[i]
            );
            if std::env::var("GRADCHECK_VERBOSE").is_ok() {
                eprintln!(
                    "V {name} {vname}[{i}] err/tol {:.3} tol/G {:.2e}",
                    err / tol,
                    tol / g_max
                );
            }
        }
    }
}

fn var(t: Tensor) -> Var {
    Var::from_tensor(&t).unwrap()
}

fn head_check(rng: &mut SeededRng, cfg: DinoHeadConfig, rows: usize) {
    // parameters off their init (non-zero biases, g ≠ 1) in f64
    let mut sd = StateDict::new();
    for (name, shape) in DinoHead::parameter_shapes(&cfg).unwrap() {
        // weight_g and BatchNorm weights around 1, everything else around 0
        let around_one =
            name.ends_with("weight_g") || (shape.len() == 1 && name.contains(".weight"));
        let t = if around_one {
            rng.normal(&shape, 1.0, 0.2, DType::F64)
        } else {
            rng.normal(&shape, 0.0, 0.5, DType::F64)
        };
        sd.insert(name, t);
    }
    let vm = VarMap::new();
    let head = DinoHead::from_state_dict_trainable(&cfg, &sd, "", &vm, &CPU, DType::F64).unwrap();
    let x = var(rng.normal(&[rows, cfg.in_dim], 0.0, 1.0, DType::F64));
    let r = rng.normal(&[rows, cfg.out_dim], 0.0, 1.0, DType::F64);
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
            (head.forward_train(x.as_tensor()).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
        },
        1e-5,
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
    let mut rng = SeededRng::new(1);
    head_check(&mut rng, small(3, false, true), 3);
    head_check(&mut rng, small(1, false, true), 2);
    head_check(&mut rng, small(2, true, true), 4);
    head_check(&mut rng, small(3, false, false), 3);
}

#[test]
fn dino_loss_gradients() {
    let mut rng = SeededRng::new(2);
    let loss = DinoLoss::new(DinoLossConfig::new(6), &CPU).unwrap();
    let s = var(rng.normal(&[6, 6], 0.0, 0.5, DType::F64)); // 3 student chunks of 2 rows
    let teachers = [
        rng.softmax_rows(&[2, 6], DType::F64),
        rng.softmax_rows(&[2, 6], DType::F64),
    ];
    fd_check(
        "dino",
        &[("s", &s)],
        || {
            let chunks = s.as_tensor().chunk(3, 0).unwrap();
            loss.forward(&chunks, &teachers).unwrap()
        },
        1e-5,
    );
}

#[test]
fn ibot_loss_gradients() {
    let mut rng = SeededRng::new(3);
    let cfg = IbotLossConfig {
        student_temp: 0.2,
        ..IbotLossConfig::new(5)
    };
    let loss = IbotPatchLoss::new(cfg, &CPU).unwrap();
    let masks = Tensor::new(&[[1u8, 0, 1], [0, 0, 0], [0, 1, 1]], &CPU).unwrap();
    let s = var(rng.normal(&[5, 5], 0.0, 0.5, DType::F64)); // 4 masked patches + 1 padding row
    let t = rng.softmax_rows(&[5, 5], DType::F64);
    fd_check(
        "ibot forward_masked",
        &[("s", &s)],
        || {
            let masks = PatchMasks::new(&masks).with_n_masked_patches(4);
            loss.forward_masked(s.as_tensor(), &t, &masks).unwrap()
        },
        1e-5,
    );
    let sd = var(rng.normal(&[3, 3, 5], 0.0, 0.5, DType::F64));
    let td = rng.softmax_rows(&[3, 3, 5], DType::F64);
    fd_check(
        "ibot dense",
        &[("s", &sd)],
        || loss.forward(sd.as_tensor(), &td, &masks).unwrap(),
        1e-5,
    );
}

#[test]
fn koleo_gradients() {
    let mut rng = SeededRng::new(4);
    for (n, d) in [(2, 3), (5, 4)] {
        let x = var(rng.normal(&[n, d], 0.0, 1.0, DType::F64));
        fd_check(
            "koleo",
            &[("x", &x)],
            || KoLeoLoss::default().forward(x.as_tensor()).unwrap(),
            1e-5,
        );
    }
}

/// Targets from seeded teacher logits: `two_b` global CLS rows and `m` masked patches.
fn teacher_targets(
    loss: &mut DinoV2Loss,
    rng: &mut SeededRng,
    two_b: usize,
    m: usize,
) -> TeacherTargets {
    let k = loss.config().dino.out_dim;
    let t_cls = rng.normal(&[two_b, k], 0.0, 0.5, DType::F64);
    let t_masked = rng.normal(&[m, k], 0.0, 0.5, DType::F64);
    let teacher = TeacherOutputs {
        cls_logits: &t_cls,
        masked_patch_logits: Some(&t_masked),
    };
    loss.teacher_targets(&teacher, 0.07).unwrap()
}

#[test]
fn combination_gradients() {
    let mut rng = SeededRng::new(5);
    for target_mode in [
        TargetMode::Centering,
        TargetMode::SinkhornKnopp { n_iterations: 3 },
    ] {
        let (k, b, d, m) = (5, 2, 3, 3);
        let cfg = DinoV2LossConfig {
            target_mode,
            ..DinoV2LossConfig::new(k, k)
        };
        let mut loss = DinoV2Loss::new(cfg, &CPU).unwrap();
        let masks = Tensor::new(&[[1u8, 1, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0]], &CPU).unwrap();
        let targets = teacher_targets(&mut loss, &mut rng, 2 * b, m);
        let global = var(rng.normal(&[2 * b, k], 0.0, 0.5, DType::F64));
        let local = var(rng.normal(&[2 * b, k], 0.0, 0.5, DType::F64)); // 2 local crops
        let masked = var(rng.normal(&[m, k], 0.0, 0.5, DType::F64));
        let cls = var(rng.normal(&[2 * b, d], 0.0, 1.0, DType::F64));
        fd_check(
            &format!("combination {target_mode:?}"),
            &[
                ("global", &global),
                ("local", &local),
                ("masked", &masked),
                ("cls", &cls),
            ],
            || {
                let student = StudentOutputs {
                    global_cls_logits: global.as_tensor(),
                    local_cls_logits: Some(local.as_tensor()),
                    masked_patch_logits: Some(masked.as_tensor()),
                    global_cls_tokens: Some(cls.as_tensor()),
                    masks: Some(PatchMasks::new(&masks)),
                };
                loss.forward(&student, &targets).unwrap().total
            },
            1e-5,
        );
    }
}

#[test]
fn packed_combination_gradients() {
    let mut rng = SeededRng::new(6);
    let (k, b, d, m, n_local) = (5, 2, 3, 3, 2);
    let mut loss = DinoV2Loss::new(DinoV2LossConfig::new(k, k), &CPU).unwrap();
    let masks = Tensor::new(&[[1u8, 1, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0]], &CPU).unwrap();
    let targets = teacher_targets(&mut loss, &mut rng, 2 * b, m);
    let packed = var(rng.normal(&[n_local * b + 2 * b + m, k], 0.0, 0.5, DType::F64));
    let cls = var(rng.normal(&[2 * b, d], 0.0, 1.0, DType::F64));
    fd_check(
        "packed combination",
        &[("packed", &packed), ("cls", &cls)],
        || {
            let student = PackedStudentOutputs {
                logits: packed.as_tensor(),
                n_local_crops: n_local,
                global_cls_tokens: Some(cls.as_tensor()),
                masks: Some(PatchMasks::new(&masks)),
            };
            loss.forward_packed(&student, &targets).unwrap().total
        },
        1e-5,
    );
}
