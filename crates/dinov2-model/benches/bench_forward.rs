//! Forward-pass timing of a randomly initialised official architecture, for `tools/bench_model.py`.
//!
//! `cargo run --profile bench-release -p dinov2-model --example bench_forward -- <arch s|b|l|g> <size> <batch> <iters> [warmup]`
//! prints one JSON line per timed iteration: `{"seconds": ...}`. Thread count comes from `RAYON_NUM_THREADS`.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use dinov2_model::{Arch, DinoVisionTransformer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        eprintln!("usage: bench_forward <s|b|l|g> <size> <batch> <iters> [warmup]");
        std::process::exit(2);
    }
    let arch = match args[1].as_str() {
        "s" => Arch::Small,
        "b" => Arch::Base,
        "l" => Arch::Large,
        "g" => Arch::Giant,
        other => return Err(format!("unknown arch {other}").into()),
    };
    let size: usize = args[2].parse()?;
    let batch: usize = args[3].parse()?;
    let iters: usize = args[4].parse()?;
    let warmup: usize = args.get(5).map(|s| s.parse()).transpose()?.unwrap_or(1);
    let cfg = arch.config();
    let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
    let model = DinoVisionTransformer::from_state_dict(&cfg, &sd, &Device::Cpu, DType::F32)?;
    let x = Tensor::randn(0f32, 1.0, (batch, 3, size, size), &Device::Cpu)?;
    for _ in 0..warmup {
        model.forward_features(&x, None)?;
    }
    for _ in 0..iters {
        let t = Instant::now();
        let f = model.forward_features(&x, None)?;
        let _ = f.x_norm_clstoken.sum_all()?.to_scalar::<f32>()?;
        println!("{{\"seconds\": {}}}", t.elapsed().as_secs_f64());
    }
    Ok(())
}
