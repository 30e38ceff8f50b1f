//! Parity with the official DINOv2 code: fixtures from `tools/make_loss_fixtures.py` (values, centre
//! updates, Sinkhorn-Knopp outputs, input and parameter gradients), f32, norm-wise relative error ≤ 1e-5.

mod common;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::{assert_close, var_tensor, Fixture};
use dinov2_loss::{
    mask_indices, masks_weight, DinoHead, DinoHeadConfig, DinoLoss, DinoLossConfig, DinoV2Loss,
    DinoV2LossConfig, IbotLossConfig, IbotPatchLoss, KoLeoLoss, PackedStudentOutputs, PatchMasks,
    StateDict, StudentOutputs, TargetMode, TeacherOutputs,
};

const TOL: f64 = 1e-5;
const CPU: Device = Device::Cpu;

fn head_case(f: &Fixture, name: &str) {
    let c = f.ints(&format!("{name}.cfg"));
    let cfg = DinoHeadConfig {
        in_dim: c[0],
        out_dim: c[1],
        use_bn: c[2] == 1,
        nlayers: c[3],
        hidden_dim: c[4],
        bottleneck_dim: c[5],
        mlp_bias: c[6] == 1,
    };
    let params = f.sub(&format!("{name}.param"));
    let sd: StateDict = params.clone().into_iter().collect();
    let vm = VarMap::new();
    let head = DinoHead::from_state_dict_trainable(&cfg, &sd, "", &vm, &CPU, DType::F32).unwrap();
    let x = Var::from_tensor(&f.get(&format!("{name}.x"))).unwrap();
    let y = head.forward_train(x.as_tensor()).unwrap();
    assert_close(&y, &f.get(&format!("{name}.y")), TOL, &format!("{name} y"));
    let loss = (&y * f.get(&format!("{name}.r")))
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let gx = grads.get(x.as_tensor()).expect("grad x");
    assert_close(
        gx,
        &f.get(&format!("{name}.grad.x")),
        TOL,
        &format!("{name} grad x"),
    );
    let mut n_param_grads = 0;
    for (key, expected) in f.sub(&format!("{name}.grad")) {
        if key == "x" {
            continue;
        }
        let g = grads
            .get(&var_tensor(&vm, &key))
            .unwrap_or_else(|| panic!("{name}: no gradient for {key}"));
        if let Some(w_key) = bias_before_batchnorm(&key, &params) {
            // A bias right before a train-mode BatchNorm has an exactly zero gradient (the batch mean
            // removes it); both sides only hold rounding noise, so compare against the layer's weight
            // gradient scale instead of the noise itself.
            let wmax = f
                .get(&format!("{name}.grad.{w_key}"))
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            let wmax = wmax.to_scalar::<f32>().unwrap() as f64;
            for t in [g, &expected] {
                let m = t
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap() as f64;
                assert!(
                    m <= 1e-6 * wmax,
                    "{name} {key}: {m:e} not ~0 (weight grad {wmax:e})"
                );
            }
        } else {
            assert_close(g, &expected, TOL, &format!("{name} grad {key}"));
        }
        n_param_grads += 1;
    }
    assert_eq!(
        n_param_grads,
        DinoHead::parameter_shapes(&cfg).unwrap().len()
    );
    assert_eq!(n_param_grads, vm.all_vars().len());
    if cfg.use_bn {
        let sd = head.state_dict().unwrap();
        for (key, expected) in f.sub(&format!("{name}.after")) {
            let got = sd.get(&key).unwrap();
            assert_close(got, &expected, TOL, &format!("{name} {key}"));
        }
        let y_eval = head.forward(x.as_tensor()).unwrap();
        assert_close(
            &y_eval,
            &f.get(&format!("{name}.y_eval")),
            TOL,
            &format!("{name} eval"),
        );
    }
}

/// `mlp.{i}.weight` if `key` is `mlp.{i}.bias` and layer `i + 1` is a BatchNorm.
fn bias_before_batchnorm(
    key: &str,
    params: &std::collections::HashMap<String, Tensor>,
) -> Option<String> {
    let i: usize = key
        .strip_prefix("mlp.")?
        .strip_suffix(".bias")?
        .parse()
        .ok()?;
    params
        .contains_key(&format!("mlp.{}.running_mean", i + 1))
        .then(|| format!("mlp.{i}.weight"))
}

#[test]
fn head_matches_official() {
    let f = Fixture::load("head");
    for name in ["h3", "h1", "hbn", "h4096"] {
        head_case(&f, name);
    }
}

#[test]
fn dino_loss_matches_official() {
    let f = Fixture::load("dino");
    for name in ["d64a", "d64b", "d4096"] {
        let c = f.ints(&format!("{name}.cfg"));
        let (k, _b, ns, nt, steps) = (c[0], c[1], c[2], c[3], c[4]);
        let temps = f.f64s(&format!("{name}.temps"));
        let (tt, st, mom) = (temps[0], temps[1], temps[2]);
        let cfg = DinoLossConfig {
            out_dim: k,
            student_temp: st,
            center_momentum: mom,
        };
        let mut loss = DinoLoss::new(cfg, &CPU).unwrap();
        let mut targets = None;
        for i in 0..steps {
            let p = format!("{name}.step{i}");
            let t = f.get(&format!("{p}.t"));
            let tg = loss.softmax_center_teacher(&t, tt).unwrap();
            // the centre used at step i includes step i-1's update (lazy EMA)
            assert_close(
                loss.center().tensor(),
                &f.get(&format!("{p}.center_used")),
                TOL,
                &format!("{p} centre"),
            );
            if f.has(&format!("{p}.targets")) {
                assert_close(
                    &tg,
                    &f.get(&format!("{p}.targets")),
                    TOL,
                    &format!("{p} targets"),
                );
            }
            loss.update_center(&t).unwrap();
            assert!(loss.center().has_pending());
            targets = Some(tg);
        }
        loss.center_mut().apply_pending().unwrap();
        assert_close(
            loss.center().tensor(),
            &f.get(&format!("{name}.center_final")),
            TOL,
            &format!("{name} final centre"),
        );
        let targets = targets.unwrap();
        let s = Var::from_tensor(&f.get(&format!("{name}.s"))).unwrap();
        let students = s.as_tensor().chunk(ns, 0).unwrap();
        let teachers = targets.chunk(nt, 0).unwrap();
        let value = loss.forward(&students, &teachers).unwrap();
        assert_close(
            &value.reshape(1).unwrap(),
            &f.get(&format!("{name}.loss")),
            TOL,
            &format!("{name} loss"),
        );
        let grads = value.backward().unwrap();
        assert_close(
            grads.get(s.as_tensor()).unwrap(),
            &f.get(&format!("{name}.grad.s")),
            TOL,
            &format!("{name} grad"),
        );
        let t0 = f.get(&format!("{name}.step0.t"));
        for iters in [3, 1, 5] {
            let key = format!("{name}.sk{iters}");
            if f.has(&key) {
                let q = loss.sinkhorn_knopp_teacher(&t0, tt, iters).unwrap();
                assert_close(&q, &f.get(&key), TOL, &key);
            }
        }
    }
}

#[test]
fn ibot_loss_matches_official() {
    let f = Fixture::load("ibot");
    let k = 64;
    let mut loss = IbotPatchLoss::new(IbotLossConfig::new(k), &CPU).unwrap();
    let mut targets = None;
    for i in 0..2 {
        let p = format!("i64.step{i}");
        let t = f.get(&format!("{p}.t")).unsqueeze(0).unwrap();
        let tg = loss
            .softmax_center_teacher(&t, 0.07)
            .unwrap()
            .squeeze(0)
            .unwrap();
        assert_close(
            loss.center().tensor(),
            &f.get(&format!("{p}.center_used")),
            TOL,
            &p,
        );
        assert_close(
            &tg,
            &f.get(&format!("{p}.targets")),
            TOL,
            &format!("{p} targets"),
        );
        loss.update_center(&t).unwrap();
        targets = Some(tg);
    }
    loss.center_mut().apply_pending().unwrap();
    assert_close(
        loss.center().tensor(),
        &f.get("i64.center_final"),
        TOL,
        "i64 final centre",
    );
    let targets = targets.unwrap();
    let masks = f.get("i64.step1.masks");
    let m = targets.dim(0).unwrap();
    let mw = masks_weight(&masks).unwrap();
    assert_close(&mw, &f.get("i64.masks_weight"), 0.0, "masks_weight");

    // padded rows + n_masked_patches truncation, explicit masks_weight
    let s = Var::from_tensor(&f.get("i64.s_pad")).unwrap();
    let padded = PatchMasks::new(&masks)
        .with_weights(&mw)
        .with_n_masked_patches(m);
    let v = loss
        .forward_masked(s.as_tensor(), &f.get("i64.t_pad"), &padded)
        .unwrap();
    assert_close(
        &v.reshape(1).unwrap(),
        &f.get("i64.loss_pad"),
        TOL,
        "ibot padded loss",
    );
    let g = v.backward().unwrap();
    assert_close(
        g.get(s.as_tensor()).unwrap(),
        &f.get("i64.grad.s_pad"),
        TOL,
        "ibot padded grad",
    );

    // masks_weight derived from the masks
    let s2 = Var::from_tensor(&f.get("i64.s_pad").narrow(0, 0, m).unwrap()).unwrap();
    let v = loss
        .forward_masked(s2.as_tensor(), &targets, &PatchMasks::new(&masks))
        .unwrap();
    assert_close(
        &v.reshape(1).unwrap(),
        &f.get("i64.loss_noweight"),
        TOL,
        "ibot loss",
    );
    let g = v.backward().unwrap();
    assert_close(
        g.get(s2.as_tensor()).unwrap(),
        &f.get("i64.grad.s_noweight"),
        TOL,
        "ibot grad",
    );

    let t_last = f.get("i64.step1.t");
    for iters in [3, 1] {
        let q = loss
            .sinkhorn_knopp_teacher(&t_last, 0.07, m, iters)
            .unwrap();
        assert_close(
            &q,
            &f.get(&format!("i64.sk{iters}")),
            TOL,
            &format!("ibot sk{iters}"),
        );
    }

    // dense variant
    let s = Var::from_tensor(&f.get("idense.s")).unwrap();
    let v = loss
        .forward(s.as_tensor(), &f.get("idense.t"), &f.get("idense.masks"))
        .unwrap();
    assert_close(
        &v.reshape(1).unwrap(),
        &f.get("idense.loss"),
        TOL,
        "dense loss",
    );
    let g = v.backward().unwrap();
    assert_close(
        g.get(s.as_tensor()).unwrap(),
        &f.get("idense.grad.s"),
        TOL,
        "dense grad",
    );

    // K = 4096
    let mut loss = IbotPatchLoss::new(IbotLossConfig::new(4096), &CPU).unwrap();
    let masks = f.get("i4096.masks");
    let t = f.get("i4096.t");
    let tg = loss
        .softmax_center_teacher(&t.unsqueeze(0).unwrap(), 0.04)
        .unwrap();
    assert_close(
        &tg.squeeze(0).unwrap(),
        &f.get("i4096.targets"),
        TOL,
        "i4096 targets",
    );
    loss.update_center(&t.unsqueeze(0).unwrap()).unwrap();
    loss.center_mut().apply_pending().unwrap();
    assert_close(
        loss.center().tensor(),
        &f.get("i4096.center_final"),
        TOL,
        "i4096 centre",
    );
    let s = Var::from_tensor(&f.get("i4096.s")).unwrap();
    let m = t.dim(0).unwrap();
    let mw = masks_weight(&masks).unwrap();
    let truncated = PatchMasks::new(&masks)
        .with_weights(&mw)
        .with_n_masked_patches(m);
    let v = loss
        .forward_masked(s.as_tensor(), &f.get("i4096.targets"), &truncated)
        .unwrap();
    assert_close(
        &v.reshape(1).unwrap(),
        &f.get("i4096.loss"),
        TOL,
        "i4096 loss",
    );
    let g = v.backward().unwrap();
    assert_close(
        g.get(s.as_tensor()).unwrap(),
        &f.get("i4096.grad.s"),
        TOL,
        "i4096 grad",
    );
    let q = loss.sinkhorn_knopp_teacher(&t, 0.04, m, 3).unwrap();
    assert_close(&q, &f.get("i4096.sk3"), TOL, "i4096 sk");
}

#[test]
fn koleo_matches_official() {
    let f = Fixture::load("koleo");
    for name in ["k2", "k3", "k8", "k16", "kzero"] {
        let x = Var::from_tensor(&f.get(&format!("{name}.x"))).unwrap();
        let v = KoLeoLoss::default().forward(x.as_tensor()).unwrap();
        assert_close(
            &v.reshape(1).unwrap(),
            &f.get(&format!("{name}.loss")),
            TOL,
            name,
        );
        let g = v.backward().unwrap();
        assert_close(
            g.get(x.as_tensor()).unwrap(),
            &f.get(&format!("{name}.grad.x")),
            TOL,
            &format!("{name} grad"),
        );
    }
}

/// The whole DINOv2 objective against `SSLMetaArch.forward_backward` (real heads, stub backbones).
#[test]
fn dinov2_combination_matches_ssl_meta_arch() {
    let f = Fixture::load("ssl");
    for case in ["ssl_c", "ssl_sk"] {
        let c = f.ints(&format!("{case}.cfg"));
        let (b, n_local, d, n_patches, k, k_ibot, steps, separate, sk) = (
            c[0],
            c[1],
            c[2],
            c[3],
            c[4],
            c[5],
            c[6],
            c[7] == 1,
            c[8] == 1,
        );
        let head_cfg = |out| DinoHeadConfig {
            hidden_dim: 32,
            bottleneck_dim: 8,
            ..DinoHeadConfig::new(d, out)
        };
        // the student's heads trainable in one VarMap, the teacher's constant, from the checkpoint layout
        let student: StateDict = f.sub(&format!("{case}.student")).into_iter().collect();
        let teacher: StateDict = f.sub(&format!("{case}.teacher")).into_iter().collect();
        let vm = VarMap::new();
        let trainable = |out, prefix| {
            DinoHead::from_state_dict_trainable(
                &head_cfg(out),
                &student,
                prefix,
                &vm,
                &CPU,
                DType::F32,
            )
            .unwrap()
        };
        let constant = |out, prefix| {
            DinoHead::from_state_dict(&head_cfg(out), &teacher, prefix, &CPU, DType::F32).unwrap()
        };
        let s_head = trainable(k, "dino_head");
        let t_head = constant(k, "dino_head");
        let (s_ihead, t_ihead) = if separate {
            (
                Some(trainable(k_ibot, "ibot_head")),
                Some(constant(k_ibot, "ibot_head")),
            )
        } else {
            (None, None)
        };
        let cfg = DinoV2LossConfig {
            target_mode: if sk {
                TargetMode::SinkhornKnopp { n_iterations: 3 }
            } else {
                TargetMode::Centering
            },
            ..DinoV2LossConfig::new(k, k_ibot)
        };
        let mut loss = DinoV2Loss::new(cfg, &CPU).unwrap();
        for step in 0..steps {
            let p = format!("{case}.step{step}");
            let masks = f.get(&format!("{p}.masks"));
            let idx = mask_indices(&masks).unwrap();
            // teacher
            let t_cls = f.get(&format!("{p}.t_cls"));
            let t_patch = f
                .get(&format!("{p}.t_patch"))
                .reshape((2 * b * n_patches, d))
                .unwrap()
                .index_select(&idx, 0)
                .unwrap();
            let t_logits = t_head.forward(&t_cls).unwrap();
            let t_masked = t_ihead
                .as_ref()
                .unwrap_or(&t_head)
                .forward(&t_patch)
                .unwrap();
            let teacher_out = TeacherOutputs {
                cls_logits: &t_logits,
                masked_patch_logits: Some(&t_masked),
            };
            let targets = loss.teacher_targets(&teacher_out, 0.05).unwrap();
            // student
            let g_cls = Var::from_tensor(&f.get(&format!("{p}.g_cls"))).unwrap();
            let g_patch = Var::from_tensor(&f.get(&format!("{p}.g_patch"))).unwrap();
            let l_cls = Var::from_tensor(&f.get(&format!("{p}.l_cls"))).unwrap();
            assert_eq!(l_cls.dim(0).unwrap(), n_local * b);
            let s_global = s_head.forward_train(g_cls.as_tensor()).unwrap();
            let s_local = s_head.forward_train(l_cls.as_tensor()).unwrap();
            let s_patch = g_patch
                .as_tensor()
                .reshape((2 * b * n_patches, d))
                .unwrap()
                .index_select(&idx, 0)
                .unwrap();
            let s_masked = s_ihead
                .as_ref()
                .unwrap_or(&s_head)
                .forward_train(&s_patch)
                .unwrap();
            let student_out = StudentOutputs {
                global_cls_logits: &s_global,
                local_cls_logits: Some(&s_local),
                masked_patch_logits: Some(&s_masked),
                global_cls_tokens: Some(g_cls.as_tensor()),
                masks: Some(PatchMasks::new(&masks)),
            };
            let terms = loss.forward(&student_out, &targets).unwrap();
            let check = |terms: &dinov2_loss::LossTerms, how: &str| {
                let r1 = |t: &Tensor| t.reshape(1).unwrap();
                let twice = |key: &str| (f.get(key) * 2.0).unwrap();
                let expect = [
                    (
                        "dino_local",
                        terms.dino_local.as_ref(),
                        f.get(&format!("{p}.dino_local")),
                    ),
                    (
                        "dino_global",
                        terms.dino_global.as_ref(),
                        f.get(&format!("{p}.dino_global")),
                    ),
                    (
                        "koleo",
                        terms.koleo.as_ref(),
                        twice(&format!("{p}.koleo_logged")),
                    ),
                    (
                        "ibot",
                        terms.ibot.as_ref(),
                        twice(&format!("{p}.ibot_logged")),
                    ),
                    ("total", Some(&terms.total), f.get(&format!("{p}.total"))),
                ];
                for (name, got, want) in expect {
                    assert_close(&r1(got.unwrap()), &want, TOL, &format!("{p} {how} {name}"));
                }
                let grads = terms.total.backward().unwrap();
                for (key, var) in [("g_cls", &g_cls), ("g_patch", &g_patch), ("l_cls", &l_cls)] {
                    assert_close(
                        grads.get(var.as_tensor()).unwrap(),
                        &f.get(&format!("{p}.grad.{key}")),
                        TOL,
                        &format!("{p} {how} grad {key}"),
                    );
                }
                let head_grads = f.sub(&format!("{p}.grad"));
                let mut n = 0;
                for (key, expected) in head_grads.iter().filter(|(k, _)| k.contains("_head.")) {
                    let g = grads.get(&var_tensor(&vm, key)).unwrap();
                    assert_close(g, expected, TOL, &format!("{p} {how} grad {key}"));
                    n += 1;
                }
                assert_eq!(n, vm.all_vars().len());
            };
            check(&terms, "separate calls");
            if !separate {
                // one packed head call + forward_packed, as SSLMetaArch runs it
                let s_in =
                    Tensor::cat(&[l_cls.as_tensor(), g_cls.as_tensor(), &s_patch], 0).unwrap();
                let packed = s_head.forward_train(&s_in).unwrap();
                let packed_out = PackedStudentOutputs {
                    logits: &packed,
                    n_local_crops: n_local,
                    global_cls_tokens: Some(g_cls.as_tensor()),
                    masks: Some(PatchMasks::new(&masks)),
                };
                let terms = loss.forward_packed(&packed_out, &targets).unwrap();
                check(&terms, "packed");
            }
        }
        if !sk {
            let dl = loss.dino_loss_mut();
            dl.center_mut().apply_pending().unwrap();
            assert_close(
                dl.center().tensor(),
                &f.get(&format!("{case}.dino_center_final")),
                TOL,
                "dino centre",
            );
            let il = loss.ibot_loss_mut().unwrap();
            il.center_mut().apply_pending().unwrap();
            assert_close(
                il.center().tensor(),
                &f.get(&format!("{case}.ibot_center_final")),
                TOL,
                "ibot centre",
            );
        }
    }
}

/// A head loaded from a checkpoint in the official trainer's layout (`teacher_checkpoint.pth`:
/// `{"teacher": {"backbone.*", "dino_head.*"}}`) gives the official output: through candle's `.pth`
/// builder, and from the checkpoint's state dict (constant, and trainable in one call).
#[test]
fn head_loads_from_an_official_checkpoint_layout() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/teacher_checkpoint.pth");
    let vb = VarBuilder::from_pth_with_state(&path, DType::F32, "teacher", &CPU).unwrap();
    let cfg = DinoHeadConfig {
        hidden_dim: 32,
        bottleneck_dim: 8,
        ..DinoHeadConfig::new(16, 64)
    };
    let head = DinoHead::new(&cfg, vb.pp("dino_head")).unwrap();
    let f = Fixture::load("checkpoint");
    let y = head.forward(&f.get("x")).unwrap();
    assert_close(&y, &f.get("y"), TOL, "checkpoint head");
    let sd: StateDict = candle_core::pickle::read_all_with_key(&path, Some("teacher"))
        .unwrap()
        .into_iter()
        .collect();
    let constant = DinoHead::from_state_dict(&cfg, &sd, "dino_head", &CPU, DType::F32).unwrap();
    let y = constant.forward(&f.get("x")).unwrap();
    assert_close(&y, &f.get("y"), TOL, "checkpoint head, state dict");
    let vm = VarMap::new();
    let trainable =
        DinoHead::from_state_dict_trainable(&cfg, &sd, "dino_head", &vm, &CPU, DType::F32).unwrap();
    let y = trainable.forward_train(&f.get("x")).unwrap();
    assert_close(&y, &f.get("y"), TOL, "checkpoint head, trainable");
    assert_eq!(vm.all_vars().len(), 8);
}
