//! The official initialisation, as [`VarBuilder`] init hints, and a seeded builder that honours them.
//!
//! Every layer asks its [`VarBuilder`] for its parameters with the official initialisation as the
//! [`candle_nn::Init`] hint (`DinoVisionTransformer.init_weights` and PyTorch's module defaults):
//!
//! * `pos_embed` and every Linear weight: `Randn { mean: 0, stdev: 0.02 }` (official `trunc_normal_`);
//!   Linear biases: zeros (`init_weights_vit_timm`);
//! * `cls_token`, `register_tokens`: `Randn { stdev: 1e-6 }`; `mask_token`: zeros;
//! * the patch-embedding convolution: PyTorch's default, `Uniform(±1/√fan_in)` for weight and bias;
//! * LayerNorm: ones and zeros; LayerScale `gamma`: `Const(layer_scale_init)`.
//!
//! A plain [`VarBuilder::from_varmap`] samples these hints with candle's unseeded CPU generator. [`seeded`]
//! builds a [`VarMap`]-backed builder that samples them deterministically from a seed: each parameter from
//! its own stream keyed by `(seed, full name)`, so the values do not depend on the order the parameters are
//! created in. Normal hints are truncated to `[-2, 2]`, exactly `torch.nn.init.trunc_normal_`'s default
//! bounds (at the standard deviations used here, 0.02 and 1e-6, truncation never triggers, so this is also
//! the plain normal the official code draws for the class token and registers).
//!
//! ```
//! use candle_core::{DType, Device};
//! use candle_nn::VarMap;
//! use dinov2_model::{DinoVisionTransformer, VitConfig};
//! # fn main() -> dinov2_model::Result<()> {
//! let mut cfg = VitConfig::vit_small();
//! (cfg.depth, cfg.img_size) = (1, 56);
//! let varmap = VarMap::new();
//! let vb = dinov2_model::init::seeded(&varmap, 0, DType::F32, &Device::Cpu);
//! let model = DinoVisionTransformer::new(&cfg, vb)?;
//! assert_eq!(varmap.all_vars().len(), model.named_parameters().len()); // every parameter is a Var
//! # Ok(()) }
//! ```

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

use crate::config::VitConfig;
use crate::error::Result;
use crate::params::{check_shape, not_found};
use crate::state_dict::StateDict;
use crate::vit::DinoVisionTransformer;

/// Init hint of Linear weights and `pos_embed` (official `trunc_normal_(std=0.02)`; also the DINO head's MLP).
///
/// ```
/// assert!(matches!(dinov2_model::init::TRUNC_NORMAL_002, candle_nn::Init::Randn { stdev, .. } if stdev == 0.02));
/// ```
pub const TRUNC_NORMAL_002: Init = Init::Randn {
    mean: 0.0,
    stdev: 0.02,
};
/// Init hint of the class token and registers (official `normal_(std=1e-6)`).
pub const NORMAL_1E6: Init = Init::Randn {
    mean: 0.0,
    stdev: 1e-6,
};
/// Zeros (biases, the mask token).
pub const ZEROS: Init = Init::Const(0.0);
/// Ones (LayerNorm weights).
pub const ONES: Init = Init::Const(1.0);

/// A [`VarBuilder`] over `varmap` whose missing parameters are created as `Var`s from their init hints,
/// deterministically in `seed` (see the [module docs](self)). Parameters already in `varmap` are returned
/// as they are (their shape is checked), as with [`VarBuilder::from_varmap`].
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::VarMap;
/// use dinov2_model::layers::Linear;
/// # fn main() -> dinov2_model::Result<()> {
/// let weights = |seed| -> dinov2_model::Result<Vec<Vec<f32>>> {
///     let varmap = VarMap::new();
///     let vb = dinov2_model::init::seeded(&varmap, seed, DType::F32, &Device::Cpu);
///     let fc = Linear::new(8, 4, true, vb.pp("fc"))?;
///     assert_eq!(fc.bias().unwrap().to_vec1::<f32>()?, [0.0; 4]); // official zero bias
///     Ok(fc.weight().to_vec2()?)
/// };
/// assert_eq!(weights(7)?, weights(7)?); // deterministic in the seed
/// assert_ne!(weights(7)?, weights(8)?);
/// # Ok(()) }
/// ```
pub fn seeded(varmap: &VarMap, seed: u64, dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(SeededInit {
            varmap: varmap.clone(),
            seed,
        }),
        dtype,
        device.clone(),
    )
}

/// The official initialisation of `cfg` as a state dict (f32, CPU), deterministic in `seed`: the parameters
/// a [`seeded`] builder creates.
///
/// ```
/// let mut cfg = dinov2_model::VitConfig::vit_small();
/// cfg.depth = 1;
/// let sd = dinov2_model::init::init_state_dict(&cfg, 3)?;
/// assert_eq!(sd.len(), 3 + 2 + 14 + 2); // tokens, patch embedding, one block, final norm
/// # Ok::<(), dinov2_model::Error>(())
/// ```
pub fn init_state_dict(cfg: &VitConfig, seed: u64) -> Result<StateDict> {
    let varmap = VarMap::new();
    let model = DinoVisionTransformer::new(cfg, seeded(&varmap, seed, DType::F32, &Device::Cpu))?;
    let names: Vec<String> = model
        .named_parameters()
        .iter()
        .map(|(k, _)| k.clone())
        .collect();
    drop(model);
    // The VarMap is private and dropped here: its storage is handed over, not copied (peak memory 1x the
    // model, not 2x as `state_dict` of a model on Vars would take).
    let vars = std::mem::take(
        &mut *varmap
            .data()
            .lock()
            .map_err(|_| crate::Error::invalid("varmap", "its lock is poisoned"))?,
    );
    Ok(names
        .into_iter()
        .filter_map(|k| vars.get(&k).map(|v| (k, v.as_tensor().detach())))
        .collect())
}

struct SeededInit {
    varmap: VarMap,
    seed: u64,
}

/// FNV-1a: a hash of the parameter name that is stable across Rust releases.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Samples `hint` for `shape` from `rng` (f32 values).
fn sample(hint: Init, shape: &Shape, rng: &mut StdRng) -> candle_core::Result<Vec<f32>> {
    let n = shape.elem_count();
    let normal = |mean: f64, std: f64, rng: &mut StdRng| -> candle_core::Result<Vec<f32>> {
        let dist = Normal::new(mean, std).map_err(candle_core::Error::wrap)?;
        Ok((0..n)
            .map(|_| loop {
                let s: f64 = dist.sample(rng);
                if (-2.0..=2.0).contains(&s) {
                    break s as f32;
                }
            })
            .collect())
    };
    let uniform = |lo: f64, up: f64, rng: &mut StdRng| -> Vec<f32> {
        (0..n).map(|_| rng.random_range(lo..up) as f32).collect()
    };
    Ok(match hint {
        Init::Const(v) => vec![v as f32; n],
        Init::Randn { mean, stdev } => normal(mean, stdev, rng)?,
        Init::Uniform { lo, up } => uniform(lo, up, rng),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                candle_nn::init::NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    uniform(-bound, bound, rng)
                }
                candle_nn::init::NormalOrUniform::Normal => normal(0.0, std, rng)?,
            }
        }
    })
}

impl SimpleBackend for SeededInit {
    fn get(
        &self,
        s: Shape,
        name: &str,
        hint: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        if let Some(v) = data.get(name) {
            check_shape(name, s, v.as_tensor())?;
            return Ok(v.as_tensor().clone());
        }
        let mut rng = StdRng::seed_from_u64(self.seed ^ name_hash(name));
        let values = sample(hint, &s, &mut rng)?;
        let v = if dtype == DType::F32 && dev.is_cpu() {
            Var::from_vec(values, s, dev)? // no copy
        } else {
            let t = Tensor::from_vec(values, s, &Device::Cpu)?;
            Var::from_tensor(&t.to_dtype(dtype)?.to_device(dev)?)?
        };
        let out = v.as_tensor().clone();
        data.insert(name.to_string(), v);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        match data.get(name) {
            Some(v) => v.as_tensor().to_device(dev)?.to_dtype(dtype),
            None => Err(not_found(name)),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .map(|d| d.contains_key(name))
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn std_of(t: &Tensor) -> f32 {
        let t = t.flatten_all().unwrap();
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
    }

    #[test]
    fn official_init_statistics() -> Result<()> {
        let mut cfg = VitConfig::vit_small();
        cfg.depth = 2;
        cfg.layer_scale_init = Some(1e-5);
        let cfg = cfg.with_registers(4);
        let sd = init_state_dict(&cfg, 3)?;
        let std = |k: &str| std_of(sd.get(k).unwrap());
        // 442,368 and 524,288 draws: the sample std is within 5e-4 of 0.02 with overwhelming probability, and
        // the seed is fixed.
        assert!((std("blocks.0.attn.qkv.weight") - 0.02).abs() < 5e-4);
        assert!((std("pos_embed") - 0.02).abs() < 5e-4);
        assert!(std("cls_token") < 1e-5 && std("cls_token") > 0.0);
        let sum = |k: &str| -> f32 {
            sd.get(k)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        assert_eq!(sum("mask_token"), 0.0);
        assert_eq!(sum("blocks.0.attn.qkv.bias"), 0.0);
        assert_eq!(sum("norm.weight"), 384.0);
        assert_eq!(
            sd.get("blocks.1.ls2.gamma")
                .unwrap()
                .max_all()?
                .to_scalar::<f32>()?,
            1e-5
        );
        let bound = 1.0 / (3.0f32 * 14.0 * 14.0).sqrt();
        let w = sd.get("patch_embed.proj.weight").unwrap().abs()?;
        assert!(w.max_all()?.to_scalar::<f32>()? <= bound);
        assert!(w.max_all()?.to_scalar::<f32>()? > 0.99 * bound);
        // Same seed, same weights; another seed, other weights.
        let again = init_state_dict(&cfg, 3)?;
        let other = init_state_dict(&cfg, 4)?;
        let diff = |a: &StateDict, k: &str| -> f32 {
            (sd.get(k).unwrap() - a.get(k).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        assert_eq!(diff(&again, "pos_embed"), 0.0);
        assert!(diff(&other, "pos_embed") > 0.0);
        Ok(())
    }

    #[test]
    fn values_depend_on_the_name_not_on_the_creation_order() -> Result<()> {
        let shape = (3, 4);
        let make = |names: &[&str]| -> Vec<Vec<f32>> {
            let vm = VarMap::new();
            let vb = seeded(&vm, 9, DType::F32, &Device::Cpu);
            for n in names {
                vb.get_with_hints(shape, n, TRUNC_NORMAL_002).unwrap();
            }
            let data = vm.data().lock().unwrap();
            ["a", "b"]
                .iter()
                .map(|n| {
                    data[*n]
                        .as_tensor()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap()
                })
                .collect()
        };
        assert_eq!(make(&["a", "b"]), make(&["b", "a"]));
        let vm = VarMap::new();
        let vb = seeded(&vm, 9, DType::F32, &Device::Cpu);
        let first = vb.get_with_hints(shape, "a", TRUNC_NORMAL_002)?;
        let again = vb.get_with_hints(shape, "a", ZEROS)?; // existing Var returned, not re-created
        assert_eq!((first - again)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        assert!(vb.get_with_hints((4, 3), "a", ZEROS).is_err());
        Ok(())
    }
}
