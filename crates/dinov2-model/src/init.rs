//! The official initialisation (`DinoVisionTransformer.init_weights` and PyTorch module defaults).
//!
//! * `pos_embed`: truncated normal, std 0.02, truncated at ±2 (absolute, as `torch.nn.init.trunc_normal_`);
//! * `cls_token`, `register_tokens`: normal, std 1e-6; `mask_token`: zeros;
//! * every Linear: truncated normal std 0.02, zero bias (`init_weights_vit_timm`);
//! * the patch-embedding convolution keeps PyTorch's default (kaiming-uniform with a = √5: U(±1/√fan_in) for
//!   weight and bias);
//! * LayerNorm: ones and zeros; LayerScale `gamma`: `layer_scale_init`.

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

use crate::config::{FfnKind, VitConfig};
use crate::error::{Error, Result};
use crate::state_dict::StateDict;

struct Init {
    rng: StdRng,
}

impl Init {
    fn normal(&mut self, shape: &[usize], std: f64) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let dist = Normal::new(0.0, std).map_err(|e| Error::Config(e.to_string()))?;
        let v: Vec<f32> = (0..n).map(|_| dist.sample(&mut self.rng) as f32).collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }
    fn trunc_normal(&mut self, shape: &[usize], std: f64) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let dist = Normal::new(0.0, std).map_err(|e| Error::Config(e.to_string()))?;
        let v: Vec<f32> = (0..n)
            .map(|_| loop {
                let s: f64 = dist.sample(&mut self.rng);
                if (-2.0..=2.0).contains(&s) {
                    break s as f32;
                }
            })
            .collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }
    fn uniform(&mut self, shape: &[usize], bound: f64) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| self.rng.random_range(-bound..bound) as f32)
            .collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }
    fn constant(shape: &[usize], value: f64) -> Result<Tensor> {
        Ok(Tensor::full(value as f32, shape, &Device::Cpu)?)
    }
}

/// A freshly initialised state dict for `cfg` (f32, CPU), deterministic in `seed`.
pub fn init_state_dict(cfg: &VitConfig, seed: u64) -> Result<StateDict> {
    cfg.validate()?;
    let mut g = Init {
        rng: StdRng::seed_from_u64(seed),
    };
    let (d, p, c) = (cfg.embed_dim, cfg.patch_size, cfg.in_chans);
    let mut sd = StateDict::new();
    sd.insert("cls_token", g.normal(&[1, 1, d], 1e-6)?);
    sd.insert(
        "pos_embed",
        g.trunc_normal(&[1, cfg.num_pos_tokens(), d], 0.02)?,
    );
    if cfg.num_register_tokens > 0 {
        sd.insert(
            "register_tokens",
            g.normal(&[1, cfg.num_register_tokens, d], 1e-6)?,
        );
    }
    sd.insert("mask_token", Init::constant(&[1, d], 0.0)?);
    let bound = 1.0 / ((c * p * p) as f64).sqrt();
    sd.insert("patch_embed.proj.weight", g.uniform(&[d, c, p, p], bound)?);
    sd.insert("patch_embed.proj.bias", g.uniform(&[d], bound)?);
    let mut linear =
        |sd: &mut StateDict, name: String, out: usize, inp: usize, bias: bool| -> Result<()> {
            sd.insert(format!("{name}.weight"), g.trunc_normal(&[out, inp], 0.02)?);
            if bias {
                sd.insert(format!("{name}.bias"), Init::constant(&[out], 0.0)?);
            }
            Ok(())
        };
    let h = cfg.ffn_hidden_dim();
    for i in 0..cfg.depth {
        let b = format!("blocks.{i}");
        for n in ["norm1", "norm2"] {
            sd.insert(format!("{b}.{n}.weight"), Init::constant(&[d], 1.0)?);
            sd.insert(format!("{b}.{n}.bias"), Init::constant(&[d], 0.0)?);
        }
        linear(&mut sd, format!("{b}.attn.qkv"), 3 * d, d, cfg.qkv_bias)?;
        linear(&mut sd, format!("{b}.attn.proj"), d, d, cfg.proj_bias)?;
        match cfg.ffn {
            FfnKind::Mlp => {
                linear(&mut sd, format!("{b}.mlp.fc1"), h, d, cfg.ffn_bias)?;
                linear(&mut sd, format!("{b}.mlp.fc2"), d, h, cfg.ffn_bias)?;
            }
            FfnKind::Swiglu => {
                linear(&mut sd, format!("{b}.mlp.w12"), 2 * h, d, cfg.ffn_bias)?;
                linear(&mut sd, format!("{b}.mlp.w3"), d, h, cfg.ffn_bias)?;
            }
        }
        if let Some(v) = cfg.layer_scale_init {
            sd.insert(format!("{b}.ls1.gamma"), Init::constant(&[d], v)?);
            sd.insert(format!("{b}.ls2.gamma"), Init::constant(&[d], v)?);
        }
    }
    sd.insert("norm.weight", Init::constant(&[d], 1.0)?);
    sd.insert("norm.bias", Init::constant(&[d], 0.0)?);
    Ok(sd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_init_statistics() -> Result<()> {
        let mut cfg = VitConfig::vit_small();
        cfg.depth = 2;
        cfg.layer_scale_init = Some(1e-5);
        let cfg = cfg.with_registers(4);
        let sd = init_state_dict(&cfg, 3)?;
        let std = |k: &str| -> f32 {
            let t = sd.get(k).unwrap().flatten_all().unwrap();
            let m = t.mean_all().unwrap().to_scalar::<f32>().unwrap();
            ((t - m as f64)
                .unwrap()
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap())
            .sqrt()
        };
        assert!((std("blocks.0.attn.qkv.weight") - 0.02).abs() < 5e-4);
        assert!((std("pos_embed") - 0.02).abs() < 5e-4);
        assert!(std("cls_token") < 1e-5 && std("cls_token") > 0.0);
        assert_eq!(
            sd.get("mask_token")
                .unwrap()
                .abs()?
                .sum_all()?
                .to_scalar::<f32>()?,
            0.0
        );
        assert_eq!(
            sd.get("blocks.1.ls2.gamma")
                .unwrap()
                .max_all()?
                .to_scalar::<f32>()?,
            1e-5
        );
        let bound = 1.0 / (3.0f32 * 14.0 * 14.0).sqrt();
        assert!(
            sd.get("patch_embed.proj.weight")
                .unwrap()
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?
                <= bound
        );
        // Same seed, same weights.
        let again = init_state_dict(&cfg, 3)?;
        let a = sd.get("pos_embed").unwrap();
        let b = again.get("pos_embed").unwrap();
        assert_eq!((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }
}
