//! Benchmark driver of `tools/bench_train.py`: full DINOv2 training iterations (teacher forward and targets,
//! student packed forward over masked globals + locals, every loss term, backward, per-submodule clipping,
//! AdamW, EMA) on random pixels, one JSON line per timed step.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo bench -p dinov2-train --bench bench_step -- --arch vit_small --batch 4 \
//!     --global-size 224 --local-size 98 --local-crops 8 --prototypes 65536 --drop-path 0.3 --threads 2 \
//!     --warmup 1 --steps 5
//! ```
//! On CUDA (`--features cuda`, docs/cuda.md): `--device cuda --dtype bf16` (mixed precision: bf16 backbones on
//! f32 master weights); each step is timed to the end of its device work.
//! Masks: as the official collate (half the global crops, ratios stratified in (0.1, 0.5)), seeded.

use std::time::Instant;

use candle_core::{Device, Tensor};
use dinov2_data::rand::SeedableRng;
use dinov2_data::rand_chacha::ChaCha8Rng;
use dinov2_data::MaskCollate;
use dinov2_loss::{DinoHeadConfig, DinoV2LossConfig};
use dinov2_train::meta_arch::{SslMetaArch, SslMetaArchConfig, StepBatch};
use dinov2_train::optim::AdamWConfig;
use dinov2_train::schedules::ScheduleConfig;
use dinov2_train::trainer::{OptimSettings, Trainer};

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arch: String = arg(&args, "--arch", "vit_small".to_string());
    let b: usize = arg(&args, "--batch", 4);
    let g: usize = arg(&args, "--global-size", 224);
    let l: usize = arg(&args, "--local-size", 98);
    let n_local: usize = arg(&args, "--local-crops", 8);
    let k: usize = arg(&args, "--prototypes", 65536);
    let drop_path: f64 = arg(&args, "--drop-path", 0.3);
    let threads: usize = arg(&args, "--threads", 2);
    let warmup: usize = arg(&args, "--warmup", 1);
    let steps: usize = arg(&args, "--steps", 5);
    let device: String = arg(&args, "--device", "cpu".to_string());
    let dtype: String = arg(&args, "--dtype", "f32".to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()?;

    let mut vit = match arch.as_str() {
        "vit_small" => dinov2_model::VitConfig::vit_small(),
        "vit_base" => dinov2_model::VitConfig::vit_base(),
        "vit_large" => dinov2_model::VitConfig::vit_large(),
        other => return Err(format!("unknown --arch {other}").into()),
    };
    vit.img_size = g;
    vit.layer_scale_init = Some(1e-5);
    (vit.drop_path_rate, vit.drop_path_uniform) = (drop_path, true);
    let d = vit.embed_dim;
    let cfg = SslMetaArchConfig {
        student: vit,
        dino_head: DinoHeadConfig::new(d, k),
        ibot_head: None,
        loss: DinoV2LossConfig::new(k, k),
    };
    let dev = match device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        other => return Err(format!("unknown --device {other}").into()),
    };
    let compute = match dtype.as_str() {
        "f32" => None,
        "bf16" => Some(candle_core::DType::BF16),
        "f16" => Some(candle_core::DType::F16),
        other => return Err(format!("unknown --dtype {other}").into()),
    };
    let settings = OptimSettings {
        schedules: ScheduleConfig {
            lr: 1e-3,
            epochs: 100,
            epoch_length: 1250,
            ..ScheduleConfig::official()
        },
        adamw: AdamWConfig::default(),
        layerwise_decay: 0.9,
        patch_embed_lr_mult: 0.2,
        clip_grad: 3.0,
    };
    let mut arch = SslMetaArch::new(cfg, 0, &dev)?;
    arch.set_compute_dtype(compute);
    let mut trainer = Trainer::new(arch, &settings, 0)?;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let masking = MaskCollate::official(g, 14);
    for step in 0..warmup + steps {
        let masks = masking.sample(b, &mut rng);
        let bits: Vec<u8> = masks.masks.iter().map(|&m| u8::from(m)).collect();
        let idx: Vec<u32> = masks.mask_indices.iter().map(|&i| i as u32).collect();
        let n = idx.len();
        let batch = StepBatch {
            global_crops: Tensor::randn(0f32, 1.0, (2 * b, 3, g, g), &dev)?,
            local_crops: (n_local > 0)
                .then(|| Tensor::randn(0f32, 1.0, (n_local * b, 3, l, l), &dev))
                .transpose()?,
            masks: Tensor::from_vec(bits, (masks.n_crops, masks.n_tokens), &dev)?,
            mask_indices: Tensor::from_vec(idx, n, &dev)?,
        };
        let t = Instant::now();
        let r = trainer.step(&batch)?;
        dev.synchronize()?;
        let secs = t.elapsed().as_secs_f64();
        if step >= warmup {
            println!(
                "{{\"step\": {}, \"seconds\": {secs:.4}, \"loss\": {:.5}}}",
                step - warmup,
                r.losses.total
            );
        }
    }
    Ok(())
}
