//! A DINOv2 training step written out by hand from the model, loss and data crates (no `dinov2-train`): the
//! starting point for a recipe of your own. Student and EMA teacher (ViT + DINO head), multi-crop augmentation,
//! iBOT masks, the DINO (class token, cross-view), iBOT (masked patches) and KoLeo (spread) losses, backward,
//! an AdamW step, the teacher's EMA update; it prints the loss terms of each step.
//!
//! ```text
//! cargo run --release --example custom_ssl_step -- [--steps 5] [--batch-size 8]
//! ```
//! To start from released weights, fill both `VarMap`s before `build`: with `w = dinov2::model::weights::
//! load_weights(dinov2::model::hub::resolve_weights("dinov2_vits14", &HubOptions::from_env())?)?`,
//! `w.state_dict.to_var_map(&vars, "backbone.", DType::F32, &dev)?` and `vit = w.config` (the seeded builder
//! keeps parameters already in the map; the heads start random). The full official recipe (schedules,
//! layer-wise lr decay, gradient clipping, the last head layer frozen in epoch 0, checkpoints, resume) is
//! `dinov2_train::trainer::Trainer`, which `dinov2 train` runs.

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use clap::Parser;
use dinov2::data::rand::SeedableRng;
use dinov2::data::{collate, rand_chacha::ChaCha8Rng, synthetic::SyntheticShapes};
use dinov2::data::{CropsConfig, DataAugmentationDino, MaskCollate};
use dinov2::loss::{DinoHead, DinoHeadConfig, DinoLoss, DinoLossConfig, PatchMasks};
use dinov2::loss::{IbotLossConfig, IbotPatchLoss, KoLeoLoss};
use dinov2::model::{init, DinoVisionTransformer, VitConfig};

#[derive(Parser, Debug)]
pub struct Args {
    /// Training steps.
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Images per step (at least 2: KoLeo needs a nearest neighbour in the batch).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
}

const K: usize = 128; // prototypes of the head (65536 officially)
const N_LOCAL: usize = 2; // local crops per image (8 officially)
const TEACHER_TEMP: f64 = 0.04; // sharpening of the teacher's softmax
const MOMENTUM: f64 = 0.99; // of the teacher's EMA

/// Runs the example; returns `[total, dino_local, dino_global, koleo, ibot]` of every step.
pub fn run(args: &Args) -> Result<Vec<[f32; 5]>> {
    let (dev, b) = (Device::Cpu, args.batch_size);
    // A tiny ViT on 32-pixel images (4x4 patches of 8) and its DINO head (shared with iBOT, as official).
    let vit = VitConfig {
        embed_dim: 64,
        num_heads: 2,
        depth: 2,
        patch_size: 8,
        img_size: 32,
        ..VitConfig::vit_small()
    };
    let head = DinoHeadConfig {
        hidden_dim: 128,
        bottleneck_dim: 32,
        ..DinoHeadConfig::new(64, K)
    };
    // Student and teacher from the same seeded official initialisation (keyed by name): they start equal.
    let build = |vars: &VarMap| -> Result<(DinoVisionTransformer, DinoHead)> {
        let vb = init::seeded(vars, 0, DType::F32, &dev);
        let backbone = DinoVisionTransformer::new(&vit, vb.pp("backbone"))?;
        Ok((backbone, DinoHead::new(&head, vb.pp("dino_head"))?))
    };
    let (student_vars, teacher_vars) = (VarMap::new(), VarMap::new());
    let (student, student_head) = build(&student_vars)?;
    let (teacher, teacher_head) = build(&teacher_vars)?;
    // the teacher runs on detached views of its Vars: no gradient graph; the EMA writes show through
    let (teacher, teacher_head) = (teacher.detached(), teacher_head.detached());
    let vars = |m: &VarMap| m.data().lock().unwrap().clone(); // name -> Var (shared storage)
    let (student_vars, teacher_vars) = (vars(&student_vars), vars(&teacher_vars));
    let params = ParamsAdamW {
        lr: 1e-3,
        weight_decay: 0.04,
        ..Default::default()
    };
    let mut opt = AdamW::new(student_vars.values().cloned().collect(), params)?;

    // Data: generated shapes; per image 2 global crops of 32 px and N_LOCAL local crops of 16 px; iBOT masks.
    let images = SyntheticShapes::new(args.steps * b, 0).with_class_colours();
    let crops = CropsConfig {
        global_crops_size: 32,
        local_crops_size: 16,
        local_crops_number: N_LOCAL,
        ..Default::default()
    };
    let augment = DataAugmentationDino::new(crops, Default::default())?;
    let mask_gen = MaskCollate::official(32, 8);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut dino = DinoLoss::new(DinoLossConfig::new(K), &dev)?;
    let mut ibot = IbotPatchLoss::new(IbotLossConfig::new(K), &dev)?;
    let koleo = KoLeoLoss::default();

    let mut history = Vec::new();
    println!("step      total dino_local dino_global      koleo       ibot");
    for step in 0..args.steps {
        let samples = (step * b..(step + 1) * b)
            .map(|i| Ok(augment.apply(&images.render(i)?, &mut rng)))
            .collect::<Result<Vec<_>>>()?;
        let batch = collate(
            &samples,
            (0..b).collect(),
            vec![None; b],
            &mask_gen,
            &mut rng,
        );
        // crop-major: [2B, 3, 32, 32] (first crops of all images, then second crops), [N_LOCAL·B, 3, 16, 16]
        let globals = Tensor::from_slice(&batch.global_crops, &batch.global_shape, &dev)?;
        let locals = Tensor::from_slice(&batch.local_crops, &batch.local_shape, &dev)?;
        let m = &batch.masks;
        let masks: Vec<u8> = m.masks.iter().map(|&x| x as u8).collect();
        let masks = Tensor::from_vec(masks, (m.n_crops, m.n_tokens), &dev)?; // [2B, N]
        let idx: Vec<u32> = m.mask_indices.iter().map(|&i| i as u32).collect();
        let idx = Tensor::from_vec(idx, m.mask_indices.len(), &dev)?;
        // [2B, N, D] tokens -> [M, D] rows of the masked patches
        let masked_rows = |tokens: &Tensor| tokens.flatten(0, 1)?.index_select(&idx, 0);

        // Teacher: unmasked global crops. Each global crop learns from the *other* view: swap the halves.
        let t = teacher.forward_features(&globals, None)?;
        let t_cls = teacher_head.forward(&t.x_norm_clstoken)?;
        let t_cls = Tensor::cat(&[t_cls.narrow(0, b, b)?, t_cls.narrow(0, 0, b)?], 0)?;
        let t_patch = teacher_head.forward(&masked_rows(&t.x_norm_patchtokens)?)?;
        let dino_targets = dino.softmax_center_teacher(&t_cls, TEACHER_TEMP)?; // centred, sharpened
        dino.update_center(&t_cls)?;
        let ibot_targets = ibot.softmax_center_teacher(&t_patch, TEACHER_TEMP)?;
        ibot.update_center(&t_patch)?;

        // Student: masked global crops and local crops in one packed forward (block-diagonal attention).
        let s = student.forward_features_list(&[globals, locals], &[Some(masks.clone()), None])?;
        let g_cls = &s[0].x_norm_clstoken;
        let s_global = student_head.forward_train(g_cls)?;
        let s_local = student_head
            .forward_train(&s[1].x_norm_clstoken)?
            .chunk(N_LOCAL, 0)?;
        let s_patch = student_head.forward_train(&masked_rows(&s[0].x_norm_patchtokens)?)?;

        // Losses, weighted as the official SSLMetaArch (dinov2::loss::DinoV2Loss packages exactly this).
        let n_terms = (2 + 2 * N_LOCAL) as f64; // (global, other global) + (local, global) pairs
        let dino_global =
            (dino.forward(&[s_global], std::slice::from_ref(&dino_targets))? * (2.0 / n_terms))?;
        let dino_local = (dino.forward(&s_local, &dino_targets.chunk(2, 0)?)? / n_terms)?;
        let koleo_term =
            (koleo.forward(&g_cls.narrow(0, 0, b)?)? + koleo.forward(&g_cls.narrow(0, b, b)?)?)?;
        let koleo_term = (koleo_term * 0.1)?;
        let ibot_term = ibot.forward_masked(&s_patch, &ibot_targets, &PatchMasks::new(&masks))?;
        let total = (((&dino_local + &dino_global)? + &koleo_term)? + &ibot_term)?;

        // Backward and AdamW on the student; then teacher <- m * teacher + (1 - m) * student.
        opt.backward_step(&total)?;
        for (name, s) in &student_vars {
            let t = &teacher_vars[name];
            t.set(&((t.as_tensor() * MOMENTUM)? + (s.as_tensor() * (1.0 - MOMENTUM))?)?)?;
        }
        let terms = [&total, &dino_local, &dino_global, &koleo_term, &ibot_term];
        let v = terms.map(|t| t.to_scalar::<f32>().unwrap_or(f32::NAN));
        println!("{step:4} {}", v.map(|x| format!("{x:10.3}")).join(" "));
        history.push(v);
    }
    Ok(history)
}

fn main() -> Result<()> {
    run(&Args::parse()).map(drop)
}
