//! Setup shared by the data-parallel equivalence tests: a tiny `SslMetaArch`, its optimiser settings, and
//! deterministic per-rank halves of each step's batch (with their concatenation into the global batch of 2B).
//!
//! Compiled into both `crates/dinov2-train/tests/data_parallel.rs` (ranks as threads) and `tests/mpi_train.rs`
//! (ranks as MPI processes) via `#[path]`; as a file in a subdirectory of `tests/`, Cargo does not build it as a
//! test target of its own.

use candle_core::{DType, Device, Tensor};
use dinov2_loss::{DinoHeadConfig, DinoV2LossConfig, TargetMode};
use dinov2_train::meta_arch::{SslMetaArch, SslMetaArchConfig, StepBatch};
use dinov2_train::optim::AdamWConfig;
use dinov2_train::schedules::ScheduleConfig;
use dinov2_train::trainer::{OptimSettings, Trainer};

/// Images per rank and step.
pub const B: usize = 2;
/// Training steps of an equivalence run.
pub const STEPS: u64 = 3;

/// 32 wide, 2 blocks, patch 14, 28-pixel globals, 14-pixel locals; KoLeo off (its nearest neighbour is
/// searched within each rank's batch, as official, so it is not batch-split invariant) and no stochastic depth
/// (its masks are drawn per rank). iBOT shares the DINO head (64 prototypes) unless `separate_ibot` (its own
/// head of 48).
pub fn arch(seed: u64, separate_ibot: bool, target_mode: TargetMode) -> SslMetaArch {
    let mut vit = dinov2_model::VitConfig::vit_small();
    (vit.embed_dim, vit.depth, vit.num_heads, vit.img_size) = (32, 2, 2, 28);
    vit.drop_path_rate = 0.0;
    vit.layer_scale_init = Some(1e-5);
    let head = |k| DinoHeadConfig {
        hidden_dim: 32,
        bottleneck_dim: 16,
        ..DinoHeadConfig::new(32, k)
    };
    let loss = DinoV2LossConfig {
        koleo_loss_weight: 0.0,
        target_mode,
        ..DinoV2LossConfig::new(64, if separate_ibot { 48 } else { 64 })
    };
    let cfg = SslMetaArchConfig {
        student: vit,
        dino_head: head(64),
        ibot_head: separate_ibot.then(|| head(48)),
        loss,
    };
    SslMetaArch::new(cfg, seed, &Device::Cpu).unwrap()
}

/// lr 1e-3 after a one-epoch warmup of 3 iterations, no clipping that would hide differences (a large norm).
pub fn settings() -> OptimSettings {
    OptimSettings {
        schedules: ScheduleConfig {
            lr: 1e-3,
            epochs: 4,
            epoch_length: 3,
            warmup_epochs: 1,
            warmup_teacher_temp_epochs: 2,
            ..ScheduleConfig::official()
        },
        adamw: AdamWConfig::default(),
        layerwise_decay: 0.9,
        patch_embed_lr_mult: 0.2,
        clip_grad: 3.0,
    }
}

/// Rank `rank`'s half of step `step`: B images, 2 global crops, 2 local crops (crop-major), masks.
pub fn half(rank: usize, step: u64) -> (Tensor, Tensor, Tensor) {
    let dev = Device::Cpu;
    let img = |n: usize, s: usize, phase: f64| {
        Tensor::arange(0f32, (n * 3 * s * s) as f32, &dev)
            .unwrap()
            .affine(0.011 * (1.0 + step as f64 + 0.37 * rank as f64), phase)
            .unwrap()
            .sin()
            .unwrap()
            .reshape((n, 3, s, s))
            .unwrap()
    };
    // as many masked patches on both ranks (the official iBOT centre is the mean over ranks of each rank's
    // mean over its masked patches: the global batch's mean only when the counts agree), placed differently,
    // and an image without any
    let extra = (step % 2) as u8;
    let rows: [[u8; 4]; 4] = if rank == 0 {
        [[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, extra], [0, 1, 0, 1]]
    } else {
        [[0, 0, 0, 1], [1, 0, 1, 0], [extra, 0, 0, 0], [1, 0, 0, 1]]
    };
    let masks = Tensor::new(&rows, &dev).unwrap();
    (
        img(2 * B, 28, 0.1 * step as f64 + rank as f64),
        img(2 * B, 14, 1.0 + rank as f64),
        masks,
    )
}

/// The trainer's batch of these crops and masks (with the masks' indices).
pub fn step_batch(global: Tensor, local: Tensor, masks: Tensor) -> StepBatch {
    let idx = dinov2_loss::mask_indices(&masks).unwrap();
    StepBatch {
        global_crops: global,
        local_crops: Some(local),
        masks,
        mask_indices: idx.to_dtype(DType::U32).unwrap(),
    }
}

/// The two halves as one batch of 2B: every crop-major block of B rows is rank 0's then rank 1's.
pub fn global_batch(step: u64) -> StepBatch {
    let (g0, l0, m0) = half(0, step);
    let (g1, l1, m1) = half(1, step);
    let interleave = |a: &Tensor, b: &Tensor| {
        let n_crops = a.dim(0).unwrap() / B;
        let parts: Vec<Tensor> = (0..n_crops)
            .flat_map(|c| {
                [
                    a.narrow(0, c * B, B).unwrap(),
                    b.narrow(0, c * B, B).unwrap(),
                ]
            })
            .collect();
        Tensor::cat(&parts, 0).unwrap()
    };
    step_batch(
        interleave(&g0, &g1),
        interleave(&l0, &l1),
        interleave(&m0, &m1),
    )
}

/// Named flat values.
pub type State = Vec<(String, Vec<f32>)>;

/// Student, teacher and centres (after their pending update), by name: the student's parameters, the
/// teacher's, `dino_center`, then `ibot_center` where there is one.
pub fn state(t: &mut Trainer) -> State {
    let (dino, ibot) = t.centers_after_update().unwrap();
    let flat = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut out = Vec::new();
    for (p, params) in [
        ("student.", t.arch().student_parameters()),
        ("teacher.", t.arch().teacher_parameters()),
    ] {
        out.extend(
            params
                .into_iter()
                .map(|(k, v)| (format!("{p}{k}"), flat(v.as_tensor()))),
        );
    }
    out.push(("dino_center".into(), flat(&dino)));
    if let Some(c) = ibot {
        out.push(("ibot_center".into(), flat(&c)));
    }
    out
}
