//! The model half of `tools/gpu_check.sh` (docs/cuda.md): correctness of the CUDA path against f32 references
//! and throughput, one JSON object per line on stdout. Runs on any device (`--device cpu` is the smoke test CI
//! could run; `--small` shrinks every size).
//!
//! ```text
//! cargo bench -p dinov2-model --features flash-attn --bench gpu_check -- --device cuda --sections a,b,c,d
//! ```
//! Sections:
//! * `a`: packed attention (2×261 + 8×54 tokens, 6 heads of 64) forward and the three gradients in f32, bf16 and f16,
//!   for every backend built (cuBLAS + softmax kernel; flash-attn varlen), against f32 attention on the same
//!   rounded inputs. Errors are max |x − ref| / max |ref| per tensor.
//! * `b`: whole-model outputs (ViT-S/14, 4 registers, 224 and a packed 2×224 + 4×98 list) on the device in f32,
//!   bf16 weights, and bf16 compute on f32 weights, against the CPU f32 forward of the same weights; and the
//!   gradients of a 4-block model in bf16 compute against the CPU f32 gradients.
//! * `c`: images/s of ViT-S/B/L/14 at 224 and 518, bf16 weights (`--rounds` interleaved with the PyTorch rows of
//!   `tools/gpu_bench_torch.py` by the shell script).
//! * `d`: one batch of 2×224 + 8×98 crops per image: packed (one sequence), per size (two forwards), padded
//!   (the local crops zero-padded to 224: what padding every sequence to the longest costs).

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarMap;
use dinov2_model::ops::{AttentionBackend, GenericAttention, SeqLayout};
use dinov2_model::{DinoVisionTransformer, VitConfig};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let device = match arg(&args, "--device", "cuda").as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        other => return Err(format!("--device {other}: cpu or cuda").into()),
    };
    let sections = arg(&args, "--sections", "a,b,c,d");
    let small = args.iter().any(|a| a == "--small");
    let rounds: usize = arg(&args, "--rounds", "1").parse()?;
    let only_models = arg(&args, "--models", "s,b,l");
    for s in sections.split(',') {
        let t = Instant::now();
        match s {
            "a" => attention_check(&device, small)?,
            "b" => model_check(&device, small)?,
            "c" => throughput(&device, small, rounds, &only_models)?,
            "d" => packing(&device, small)?,
            other => return Err(format!("unknown section {other}").into()),
        }
        eprintln!("section {s}: {:.1} s", t.elapsed().as_secs_f64());
    }
    Ok(())
}

fn max_abs(t: &Tensor) -> Res<f32> {
    Ok(t.to_dtype(DType::F32)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?)
}

/// max |a − b| / max |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> Res<f32> {
    let a = a.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let b = b.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    Ok(max_abs(&(a - &b)?)? / max_abs(&b)?.max(1e-30))
}

/// Smallest cosine similarity between corresponding rows (last dimension).
fn min_cos(a: &Tensor, b: &Tensor) -> Res<f32> {
    let a = a.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let b = b.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let d = a.dim(D::Minus1)?;
    let (a, b) = (a.reshape(((), d))?, b.reshape(((), d))?);
    let dot = (&a * &b)?.sum(1)?;
    let na = a.sqr()?.sum(1)?.sqrt()?;
    let nb = b.sqr()?.sum(1)?.sqrt()?;
    let cos = (dot / (na * nb)?)?;
    Ok(cos.min(0)?.to_scalar::<f32>()?)
}

fn backends() -> Vec<(&'static str, Box<dyn AttentionBackend>)> {
    #[allow(unused_mut)]
    let mut v: Vec<(&'static str, Box<dyn AttentionBackend>)> =
        vec![("cublas+softmax", Box::new(GenericAttention))];
    #[cfg(feature = "flash-attn")]
    v.push(("flash-attn", Box::new(dinov2_model::ops::FlashAttention)));
    v
}

/// Section a: packed attention forward and gradients in half precision against f32.
fn attention_check(dev: &Device, small: bool) -> Res<()> {
    let (g, l) = if small { (13, 5) } else { (261, 54) };
    let lens: Vec<usize> = [vec![g; 2], vec![l; 8]].concat();
    let layout = SeqLayout::from_lengths(&lens);
    let (heads, hd) = (6, 64);
    let d = heads * hd;
    let rows = layout.total_rows();
    let scale = 1.0 / (hd as f64).sqrt();
    let qkv = Tensor::randn(0f32, 1.0, (rows, 3 * d), dev)?;
    let up = Tensor::randn(0f32, 1.0, (rows, d), dev)?;
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        // the reference sees the same rounded inputs, so the errors are the kernels' own
        let rounded = qkv.to_dtype(dtype)?;
        // ... computed on the CPU in f32 (composed softmax), independent of every CUDA kernel
        let x_ref = Var::from_tensor(&rounded.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)?;
        let out_ref = GenericAttention.attention(x_ref.as_tensor(), &layout, heads, scale)?;
        let g_ref = (&out_ref * up.to_device(&Device::Cpu)?)?
            .sum_all()?
            .backward()?;
        let dx_ref = g_ref
            .get(x_ref.as_tensor())
            .ok_or("no reference gradient")?;
        for (name, backend) in backends() {
            if dtype == DType::F32 && name != "cublas+softmax" {
                continue; // flash-attn takes bf16/f16 only (f32 falls back to the cuBLAS path)
            }
            let x = Var::from_tensor(&rounded)?;
            let t = Instant::now();
            let out = backend.attention(x.as_tensor(), &layout, heads, scale)?;
            let grads = (out.to_dtype(DType::F32)? * &up)?.sum_all()?.backward()?;
            dev.synchronize()?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            let dx = grads.get(x.as_tensor()).ok_or("no gradient")?;
            let part = |t: &Tensor, i: usize| t.narrow(1, i * d, d);
            let errs = [
                rel_err(&out, &out_ref)?,
                rel_err(&part(dx, 0)?, &part(dx_ref, 0)?)?,
                rel_err(&part(dx, 1)?, &part(dx_ref, 1)?)?,
                rel_err(&part(dx, 2)?, &part(dx_ref, 2)?)?,
            ];
            // bf16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3), f16 11 (4.9e-4). The output is a
            // sum of hundreds of rounded products: a few units of roundoff relative to the largest value, 2e-2
            // (bf16) and 4e-3 (f16). The gradients go through the probabilities rounded to the storage type
            // before dV = Pᵀ·dO and dS = P∘(dP − D) (flash-attn's backward does so): twice that. f32 against the
            // CPU's f32 (another summation order): 1e-5.
            let (tol, grad_tol) = match dtype {
                DType::BF16 => (2e-2, 4e-2),
                DType::F16 => (4e-3, 8e-3),
                _ => (1e-5, 1e-5),
            };
            let pass = errs[0] <= tol && errs[1..].iter().all(|&e| e <= grad_tol);
            println!(
                "{{\"section\": \"a\", \"backend\": \"{name}\", \"dtype\": \"{dtype:?}\", \"lengths\": \"2x{g}+8x{l}\", \
                 \"out\": {:.3e}, \"dq\": {:.3e}, \"dk\": {:.3e}, \"dv\": {:.3e}, \"tol\": {tol:.0e}, \"grad_tol\": {grad_tol:.0e}, \"pass\": {pass}, \
                 \"first_call_ms\": {ms:.2}}}",
                errs[0], errs[1], errs[2], errs[3]
            );
        }
    }
    Ok(())
}

fn vit(arch: &str, img: usize, small: bool) -> VitConfig {
    let mut cfg = match arch {
        "b" => VitConfig::vit_base(),
        "l" => VitConfig::vit_large(),
        _ => VitConfig::vit_small(),
    };
    cfg.img_size = img;
    if small {
        (cfg.depth, cfg.embed_dim, cfg.num_heads) = (2, 128, 2);
    }
    cfg
}

fn images(n: usize, size: usize, seed: f64, dev: &Device) -> candle_core::Result<Tensor> {
    Tensor::arange(0f32, (n * 3 * size * size) as f32, dev)?
        .affine(0.013, seed)?
        .sin()?
        .reshape((n, 3, size, size))
}

/// Section b: whole-model outputs and gradients on the device against the CPU in f32.
fn model_check(dev: &Device, small: bool) -> Res<()> {
    let (g, l) = if small { (28, 14) } else { (224, 98) };
    let mut cfg = vit("s", g, small);
    cfg.num_register_tokens = 4;
    // LayerScale at 1e-5 would make every block nearly the identity; 0.1 makes each block count
    cfg.layer_scale_init = Some(0.1);
    let sd = dinov2_model::init::init_state_dict(&cfg, 7)?;
    let cpu = Device::Cpu;
    let reference = DinoVisionTransformer::from_state_dict(&cfg, &sd, &cpu, DType::F32)?;
    let x = images(2, g, 0.0, &cpu)?;
    let crops = [images(2, g, 0.3, &cpu)?, images(4, l, 0.7, &cpu)?];
    let none = [None, None];
    let r = reference.forward_features(&x, None)?;
    let r_list = reference.forward_features_list(&crops, &none)?;
    let variants: [(&str, DType, Option<DType>); 4] = [
        ("f32", DType::F32, None),
        ("bf16 weights", DType::BF16, None),
        ("f16 weights", DType::F16, None),
        ("bf16 compute, f32 weights", DType::F32, Some(DType::BF16)),
    ];
    for (name, wdtype, compute) in variants {
        let mut m = DinoVisionTransformer::from_state_dict(&cfg, &sd, dev, wdtype)?;
        m.set_compute_dtype(compute);
        let o = m.forward_features(&x.to_device(dev)?, None)?;
        let dev_crops = [crops[0].to_device(dev)?, crops[1].to_device(dev)?];
        let o_list = m.forward_features_list(&dev_crops, &none)?;
        println!(
            "{{\"section\": \"b\", \"model\": \"ViT-S/14 reg4\", \"variant\": \"{name}\", \
             \"cls_rel_err\": {:.3e}, \"patch_rel_err\": {:.3e}, \"patch_min_cos\": {:.6}, \
             \"packed_global_cls_rel_err\": {:.3e}, \"packed_local_patch_rel_err\": {:.3e}, \"packed_local_min_cos\": {:.6}}}",
            rel_err(&o.x_norm_clstoken, &r.x_norm_clstoken)?,
            rel_err(&o.x_norm_patchtokens, &r.x_norm_patchtokens)?,
            min_cos(&o.x_norm_patchtokens, &r.x_norm_patchtokens)?,
            rel_err(&o_list[0].x_norm_clstoken, &r_list[0].x_norm_clstoken)?,
            rel_err(&o_list[1].x_norm_patchtokens, &r_list[1].x_norm_patchtokens)?,
            min_cos(&o_list[1].x_norm_patchtokens, &r_list[1].x_norm_patchtokens)?,
        );
    }
    // gradients: 4 blocks, bf16 compute on f32 Vars vs the CPU in f32, through the packed list forward
    cfg.depth = 4;
    let grads = |dev: &Device, compute: Option<DType>| -> Res<Vec<(String, Tensor)>> {
        let vm = VarMap::new();
        let mut m =
            DinoVisionTransformer::new(&cfg, dinov2_model::init::seeded(&vm, 3, DType::F32, dev))?;
        m.set_compute_dtype(compute);
        let dev_crops = [crops[0].to_device(dev)?, crops[1].to_device(dev)?];
        let out = m.forward_features_list(&dev_crops, &none)?;
        let w = Tensor::arange(0f32, cfg.embed_dim as f32, dev)?
            .affine(0.01, -1.0)?
            .sin()?;
        let mut loss = Tensor::zeros((), DType::F32, dev)?;
        for f in &out {
            let cls = f.x_norm_clstoken.to_dtype(DType::F32)?;
            let patches = f.x_norm_patchtokens.to_dtype(DType::F32)?.mean(1)?;
            loss = (loss
                + cls.broadcast_mul(&w)?.sum_all()?
                + patches.broadcast_mul(&w)?.sqr()?.sum_all()?)?;
        }
        let g = loss.backward()?;
        let mut named: Vec<(String, Tensor)> = vm
            .data()
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(k, v)| g.get(v.as_tensor()).map(|t| (k.clone(), t.clone())))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(named)
    };
    let reference = grads(&cpu, None)?;
    for (name, compute) in [
        ("f32", None),
        ("bf16 compute, f32 weights", Some(DType::BF16)),
    ] {
        let got = grads(dev, compute)?;
        let (mut worst, mut worst_name, mut sum) = (0f32, String::new(), 0f32);
        for ((k, a), (_, b)) in got.iter().zip(&reference) {
            let a = a.to_device(&cpu)?.flatten_all()?;
            let b = b.flatten_all()?;
            // relative L2 error of the whole gradient tensor
            let e = ((&a - &b)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?)
                / b.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?.max(1e-30);
            sum += e;
            if e > worst {
                (worst, worst_name) = (e, k.clone());
            }
        }
        println!(
            "{{\"section\": \"b\", \"check\": \"gradients\", \"model\": \"ViT-S/14 reg4, 4 blocks, packed 2x{g}+4x{l}\", \
             \"variant\": \"{name}\", \"params\": {}, \"same_params\": {}, \"mean_rel_l2\": {:.3e}, \"max_rel_l2\": {worst:.3e}, \
             \"worst\": \"{worst_name}\"}}",
            got.len(),
            got.len() == reference.len(),
            sum / got.len().max(1) as f32
        );
    }
    Ok(())
}

/// Times `f` (synchronised): warm-up, then repeats until `min_secs`; seconds per call (median of 5 groups).
fn time(dev: &Device, min_secs: f64, mut f: impl FnMut() -> Res<()>) -> Res<f64> {
    for _ in 0..2 {
        f()?;
    }
    dev.synchronize()?;
    let t = Instant::now();
    f()?;
    dev.synchronize()?;
    let once = t.elapsed().as_secs_f64().max(1e-6);
    let per_group = ((min_secs / 5.0 / once).ceil() as usize).max(1);
    let mut groups = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..per_group {
            f()?;
        }
        dev.synchronize()?;
        groups.push(t.elapsed().as_secs_f64() / per_group as f64);
    }
    groups.sort_by(f64::total_cmp);
    Ok(groups[2])
}

/// Section c: images/s of ViT-S/B/L/14 at 224 and 518 in bf16.
fn throughput(dev: &Device, small: bool, rounds: usize, models: &str) -> Res<()> {
    let dtype = if dev.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    };
    for round in 0..rounds {
        for arch in models.split(',') {
            for (img, batch) in [(224usize, 64usize), (518, 8)] {
                let (img, batch) = if small {
                    (img / 8 / 14 * 14, 2)
                } else {
                    (img, batch)
                };
                let cfg = vit(arch, img, small);
                let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
                let m = DinoVisionTransformer::from_state_dict(&cfg, &sd, dev, dtype)?;
                let x = images(batch, img, 0.0, dev)?.to_dtype(dtype)?;
                let secs = time(dev, if small { 0.05 } else { 2.0 }, || {
                    m.forward_features(&x, None)?;
                    Ok(())
                })?;
                println!(
                    "{{\"section\": \"c\", \"impl\": \"dinov2-rs\", \"round\": {round}, \"arch\": \"{arch}\", \"img\": {img}, \
                     \"batch\": {batch}, \"dtype\": \"{dtype:?}\", \"ms\": {:.3}, \"images_per_s\": {:.1}}}",
                    secs * 1e3,
                    batch as f64 / secs
                );
            }
        }
    }
    Ok(())
}

/// Section d: packed vs per-size vs padded for 2×224 + 8×98 crops per image.
fn packing(dev: &Device, small: bool) -> Res<()> {
    let dtype = if dev.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    };
    let (g, l, b) = if small { (28, 14, 1) } else { (224, 98, 32) };
    for arch in ["s", "b"] {
        let cfg = vit(arch, g, small);
        let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
        let m = DinoVisionTransformer::from_state_dict(&cfg, &sd, dev, dtype)?;
        let globals = images(2 * b, g, 0.0, dev)?.to_dtype(dtype)?;
        let locals = images(8 * b, l, 0.5, dev)?.to_dtype(dtype)?;
        let padded = locals
            .pad_with_zeros(2, 0, g - l)?
            .pad_with_zeros(3, 0, g - l)?;
        let all_padded = Tensor::cat(&[&globals, &padded], 0)?;
        let crops = [globals.clone(), locals.clone()];
        let none = [None, None];
        let min = if small { 0.05 } else { 2.0 };
        let packed = time(dev, min, || {
            m.forward_features_list(&crops, &none)?;
            Ok(())
        })?;
        let per_size = time(dev, min, || {
            m.forward_features(&globals, None)?;
            m.forward_features(&locals, None)?;
            Ok(())
        })?;
        let pad = time(dev, min, || {
            m.forward_features(&all_padded, None)?;
            Ok(())
        })?;
        println!(
            "{{\"section\": \"d\", \"arch\": \"{arch}\", \"images\": {b}, \"crops\": \"2x{g}+8x{l}\", \"dtype\": \"{dtype:?}\", \
             \"packed_ms\": {:.3}, \"per_size_ms\": {:.3}, \"padded_ms\": {:.3}}}",
            packed * 1e3,
            per_size * 1e3,
            pad * 1e3
        );
    }
    Ok(())
}
