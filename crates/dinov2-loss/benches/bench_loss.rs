//! Benchmark driver for `tools/bench_loss.py`: one DINOv2 head + loss training step (teacher head and
//! targets, student head, DINO local/global + KoLeo + iBOT, backward) per `step` line read on stdin.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo bench -p dinov2-loss --bench bench_loss -- \
//!     [--k 65536] [--b 4] [--n-local 8] [--d 384] [--patches 256]
//! ```
//! (`cargo bench` builds with the `bench` profile, i.e. `release`, and passes `--bench`, which is ignored.)
//! stdin commands: `step` (prints one JSON line with phase timings in ms), `quit`.
//! Mask layout: 4 of the 2B global crops masked with 15/25/35/45 % of their patches (as the collate's
//! `mask_probability 0.5`, `mask_ratio (0.1, 0.5)` for B = 4).

use std::io::{BufRead, Write};
use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::VarMap;
use dinov2_loss::{
    mask_indices, DinoHead, DinoHeadConfig, DinoV2Loss, DinoV2LossConfig, PackedStudentOutputs,
    PatchMasks, TeacherOutputs,
};

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (k, b, n_local, d, n_patches) = (
        arg(&args, "--k", 65536),
        arg(&args, "--b", 4),
        arg(&args, "--n-local", 8),
        arg(&args, "--d", 384),
        arg(&args, "--patches", 256),
    );
    let dev = Device::Cpu;
    let cfg = DinoHeadConfig::new(d, k);
    let vm = VarMap::new();
    let s_head = DinoHead::new(&cfg, dinov2_model::init::seeded(&vm, 0, DType::F32, &dev))?;
    // the teacher starts as a constant copy of the student, as official
    let t_head = DinoHead::from_state_dict(&cfg, &s_head.state_dict()?, "", &dev, DType::F32)?;
    let mut loss = DinoV2Loss::new(DinoV2LossConfig::new(k, k), &dev)?;

    // masks: images 0, 2, 4, 6 (of 2B) with 15/25/35/45 % of their patches masked
    let mut mask = vec![0u8; 2 * b * n_patches];
    for (j, ratio) in [0.15, 0.25, 0.35, 0.45].iter().enumerate() {
        let img = (2 * j) % (2 * b);
        let count = (n_patches as f64 * ratio) as usize;
        for p in 0..count {
            mask[img * n_patches + (p * 7) % n_patches] = 1;
        }
    }
    let masks = Tensor::from_vec(mask, (2 * b, n_patches), &dev)?;
    let idx = mask_indices(&masks)?;
    let m = idx.dim(0)?;
    eprintln!(
        "bench_loss: K={k} B={b} locals={n_local} D={d} N={n_patches} masked M={m} threads={}",
        candle_core::utils::get_num_threads()
    );
    if std::env::var("BENCH_PROFILE").is_ok() {
        return profile(&s_head, &mut loss, &masks, &idx, b, n_local, d, n_patches);
    }
    println!("ready");
    std::io::stdout().flush()?;

    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line?;
        if line.trim() == "quit" {
            break;
        }
        // fresh backbone outputs each step (not timed)
        let t_cls = Tensor::randn(0f32, 1.0, (2 * b, d), &dev)?;
        let t_patch = Tensor::randn(0f32, 1.0, (2 * b * n_patches, d), &dev)?;
        let g_cls = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2 * b, d), &dev)?)?;
        let g_patch = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2 * b * n_patches, d), &dev)?)?;
        let l_cls = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n_local * b, d), &dev)?)?;

        let t0 = Instant::now();
        // teacher: one packed head call on [2B + M] rows, then targets
        let t_in = Tensor::cat(&[t_cls.clone(), t_patch.index_select(&idx, 0)?], 0)?;
        let t_out = t_head.forward(&t_in)?;
        let teacher_head_ms = ms(t0);
        let t1 = Instant::now();
        let targets = loss.teacher_targets(
            &TeacherOutputs {
                cls_logits: &t_out.narrow(0, 0, 2 * b)?,
                masked_patch_logits: Some(&t_out.narrow(0, 2 * b, m)?),
            },
            0.07,
        )?;
        let targets_ms = ms(t1);
        // student: one packed head call on [n_local·B + 2B + M] rows
        let t2 = Instant::now();
        let s_in = Tensor::cat(
            &[
                l_cls.as_tensor().clone(),
                g_cls.as_tensor().clone(),
                g_patch.as_tensor().index_select(&idx, 0)?,
            ],
            0,
        )?;
        let s_out = s_head.forward_train(&s_in)?;
        let student_head_ms = ms(t2);
        let t3 = Instant::now();
        // rows: local CLS, global CLS, masked patches (the official packing)
        let terms = loss.forward_packed(
            &PackedStudentOutputs {
                logits: &s_out,
                n_local_crops: n_local,
                global_cls_tokens: Some(g_cls.as_tensor()),
                masks: Some(PatchMasks::new(&masks)),
            },
            &targets,
        )?;
        let total = terms.total.to_scalar::<f32>()?;
        let loss_ms = ms(t3);
        let t4 = Instant::now();
        let grads = terms.total.backward()?;
        let backward_ms = ms(t4);
        let total_ms = ms(t0);
        let n_grads = vm
            .all_vars()
            .iter()
            .filter(|v| grads.get(v.as_tensor()).is_some())
            .count();
        println!(
            "{{\"total_ms\":{total_ms:.3},\"teacher_head_ms\":{teacher_head_ms:.3},\"targets_ms\":{targets_ms:.3},\"student_head_ms\":{student_head_ms:.3},\"loss_ms\":{loss_ms:.3},\"backward_ms\":{backward_ms:.3},\"loss\":{total},\"param_grads\":{n_grads}}}"
        );
        std::io::stdout().flush()?;
    }
    Ok(())
}

/// `BENCH_PROFILE=1`: where the time of a step goes (3 runs each, medians printed to stderr).
#[allow(clippy::too_many_arguments)]
fn profile(
    s_head: &DinoHead,
    loss: &mut DinoV2Loss,
    masks: &Tensor,
    idx: &Tensor,
    b: usize,
    n_local: usize,
    d: usize,
    n_patches: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let m = idx.dim(0)?;
    let rows = n_local * b + 2 * b + m;
    let k = s_head.config().out_dim;
    let med = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let mut rec: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    for _ in 0..3 {
        // 1. head alone: forward, backward of sum(y * r)
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, d), &dev)?)?;
        let r = Tensor::randn(0f32, 1.0, (rows, k), &dev)?;
        let t = Instant::now();
        let w = s_head.last_layer_weight()?;
        rec.entry("head: weight-norm fwd").or_default().push(ms(t));
        let t = Instant::now();
        let feats = s_head.features_t(x.as_tensor(), true)?;
        rec.entry("head: mlp+normalize fwd")
            .or_default()
            .push(ms(t));
        let t = Instant::now();
        let y = feats.matmul(&w.t()?)?;
        rec.entry("head: last matmul fwd").or_default().push(ms(t));
        let t = Instant::now();
        let l = (y * &r)?.sum_all()?;
        rec.entry("head: y*r sum").or_default().push(ms(t));
        let t = Instant::now();
        let _g = l.backward()?;
        rec.entry("head: backward (all)").or_default().push(ms(t));
        // 1b. the last matmul alone: backward of sum(y*r) wrt feats and w (leaf vars)
        let f = Var::from_tensor(&feats.detach())?;
        let wv = Var::from_tensor(&w.detach())?;
        let y = f.as_tensor().matmul(&wv.as_tensor().t()?)?;
        let l = (y * &r)?.sum_all()?;
        let t = Instant::now();
        let _g = l.backward()?;
        rec.entry("matmul-only backward (incl. y*r)")
            .or_default()
            .push(ms(t));
        // 2. losses alone on a packed leaf [rows, K]
        let t_cls = Tensor::randn(0f32, 0.3, (2 * b, k), &dev)?;
        let t_m = Tensor::randn(0f32, 0.3, (m, k), &dev)?;
        let t = Instant::now();
        let teacher = TeacherOutputs {
            cls_logits: &t_cls,
            masked_patch_logits: Some(&t_m),
        };
        let targets = loss.teacher_targets(&teacher, 0.07)?;
        rec.entry("targets (centre+softmax)")
            .or_default()
            .push(ms(t));
        let s_out = Var::from_tensor(&Tensor::randn(0f32, 0.3, (rows, k), &dev)?)?;
        let cls = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2 * b, d), &dev)?)?;
        let t = Instant::now();
        let terms = loss.forward_packed(
            &PackedStudentOutputs {
                logits: s_out.as_tensor(),
                n_local_crops: n_local,
                global_cls_tokens: Some(cls.as_tensor()),
                masks: Some(PatchMasks::new(masks)),
            },
            &targets,
        )?;
        rec.entry("losses fwd").or_default().push(ms(t));
        let t = Instant::now();
        let _g = terms.total.backward()?;
        rec.entry("losses backward (to packed logits)")
            .or_default()
            .push(ms(t));
        let _ = n_patches;
    }
    for (k, v) in rec {
        eprintln!("{k:40} {:9.1} ms", med(v));
    }
    Ok(())
}
