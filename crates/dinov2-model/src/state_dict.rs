//! [`StateDict`]: named tensors under the official facebookresearch/dinov2 parameter names.
//!
//! Every weight format is converted to this one canonical naming (`cls_token`, `pos_embed`,
//! `register_tokens`, `mask_token`, `patch_embed.proj.*`, `blocks.{i}.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.*,ls2.gamma}.*`,
//! `norm.*`) before a model is built from it.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};

use crate::error::{Error, Result};
use crate::params::{check_shape, not_found};

/// Named tensors, sorted by name.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use dinov2_model::StateDict;
/// # fn main() -> dinov2_model::Result<()> {
/// let mut cfg = dinov2_model::VitConfig::vit_small();
/// cfg.depth = 1;
/// let sd: StateDict = dinov2_model::init::init_state_dict(&cfg, 0)?;
/// assert_eq!(sd.get("pos_embed").map(|t| t.dims().to_vec()), Some(vec![1, 1370, 384]));
/// // Any `(String, Tensor)` iterator collects into one, e.g. renamed keys.
/// let renamed: StateDict = sd.into_iter().map(|(k, t)| (format!("backbone.{k}"), t)).collect();
/// assert!(renamed.contains("backbone.blocks.0.attn.qkv.weight"));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct StateDict {
    tensors: BTreeMap<String, Tensor>,
}

impl StateDict {
    /// An empty state dict.
    ///
    /// ```
    /// let sd = dinov2_model::StateDict::new();
    /// assert!(sd.is_empty());
    /// ```
    pub fn new() -> Self {
        Self::default()
    }
    /// Inserts (or replaces) a tensor; returns the one it replaced.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// # fn main() -> dinov2_model::Result<()> {
    /// let mut sd = dinov2_model::StateDict::new();
    /// assert!(sd.insert("norm.bias", Tensor::zeros(4, DType::F32, &Device::Cpu)?).is_none());
    /// let old = sd.insert("norm.bias", Tensor::ones(4, DType::F32, &Device::Cpu)?).unwrap();
    /// assert_eq!(old.to_vec1::<f32>()?, [0.0; 4]);
    /// # Ok(()) }
    /// ```
    pub fn insert(&mut self, key: impl Into<String>, t: Tensor) -> Option<Tensor> {
        self.tensors.insert(key.into(), t)
    }
    /// The tensor called `key`.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// # fn main() -> dinov2_model::Result<()> {
    /// let mut sd = dinov2_model::StateDict::new();
    /// sd.insert("mask_token", Tensor::zeros((1, 8), DType::F32, &Device::Cpu)?);
    /// assert_eq!(sd.get("mask_token").unwrap().dims(), &[1, 8]);
    /// assert!(sd.get("cls_token").is_none());
    /// # Ok(()) }
    /// ```
    pub fn get(&self, key: &str) -> Option<&Tensor> {
        self.tensors.get(key)
    }
    /// Removes and returns the tensor called `key`.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// # fn main() -> dinov2_model::Result<()> {
    /// let mut sd = dinov2_model::StateDict::new();
    /// sd.insert("head.weight", Tensor::zeros((10, 8), DType::F32, &Device::Cpu)?);
    /// assert_eq!(sd.remove("head.weight").unwrap().dims(), &[10, 8]);
    /// assert!(sd.remove("head.weight").is_none() && sd.is_empty());
    /// # Ok(()) }
    /// ```
    pub fn remove(&mut self, key: &str) -> Option<Tensor> {
        self.tensors.remove(key)
    }
    /// Whether `key` is present.
    ///
    /// ```
    /// # fn main() -> dinov2_model::Result<()> {
    /// let mut cfg = dinov2_model::VitConfig::vit_small().with_registers(4);
    /// cfg.depth = 1;
    /// let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
    /// assert!(sd.contains("register_tokens") && !sd.contains("blocks.1.norm1.weight"));
    /// # Ok(()) }
    /// ```
    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }
    /// Names, sorted.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// # fn main() -> dinov2_model::Result<()> {
    /// let mut sd = dinov2_model::StateDict::new();
    /// for k in ["pos_embed", "cls_token", "norm.weight"] {
    ///     sd.insert(k, Tensor::zeros(1, DType::F32, &Device::Cpu)?);
    /// }
    /// assert_eq!(sd.keys().collect::<Vec<_>>(), ["cls_token", "norm.weight", "pos_embed"]);
    /// # Ok(()) }
    /// ```
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }
    /// (name, tensor) pairs, sorted by name.
    ///
    /// ```
    /// # fn main() -> dinov2_model::Result<()> {
    /// let mut cfg = dinov2_model::VitConfig::vit_small();
    /// cfg.depth = 1;
    /// let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
    /// let elements: usize = sd.iter().map(|(_, t)| t.elem_count()).sum();
    /// assert_eq!(elements, 2_529_024); // a one-block ViT-S/14 with its 37 x 37 position table
    /// # Ok(()) }
    /// ```
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.tensors.iter()
    }
    /// Number of tensors.
    ///
    /// ```
    /// # fn main() -> dinov2_model::Result<()> {
    /// let mut cfg = dinov2_model::VitConfig::vit_small();
    /// cfg.depth = 2;
    /// let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
    /// assert_eq!(sd.len(), 3 + 2 + 2 * 14 + 2); // tokens, patch embedding, blocks, final norm
    /// # Ok(()) }
    /// ```
    pub fn len(&self) -> usize {
        self.tensors.len()
    }
    /// Whether there are no tensors.
    ///
    /// ```
    /// assert!(dinov2_model::StateDict::default().is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
    /// The underlying map.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// # fn main() -> dinov2_model::Result<()> {
    /// let mut sd = dinov2_model::StateDict::new();
    /// sd.insert("cls_token", Tensor::zeros((1, 1, 8), DType::F32, &Device::Cpu)?);
    /// let map: std::collections::BTreeMap<String, Tensor> = sd.into_inner();
    /// assert_eq!(map["cls_token"].dims(), &[1, 1, 8]);
    /// # Ok(()) }
    /// ```
    pub fn into_inner(self) -> BTreeMap<String, Tensor> {
        self.tensors
    }

    /// The tensor `key`, checked against `expected` shape: a typed error naming the key and both shapes otherwise
    /// ([`Error::MissingKey`], [`Error::ShapeMismatch`]).
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use dinov2_model::{Error, StateDict};
    /// # fn main() -> dinov2_model::Result<()> {
    /// let mut sd = StateDict::new();
    /// sd.insert("norm.weight", Tensor::ones(384, DType::F32, &Device::Cpu)?);
    /// assert_eq!(sd.get_shaped("norm.weight", &[384])?.dims(), &[384]);
    /// let err = sd.get_shaped("norm.weight", &[768]).unwrap_err();
    /// assert!(matches!(err, Error::ShapeMismatch { ref actual, .. } if actual == &[384]));
    /// assert!(matches!(sd.get_shaped("norm.bias", &[384]), Err(Error::MissingKey { .. })));
    /// # Ok(()) }
    /// ```
    pub fn get_shaped(&self, key: &str, expected: &[usize]) -> Result<&Tensor> {
        let t = self.tensors.get(key).ok_or_else(|| Error::MissingKey {
            key: key.to_string(),
            expected: expected.to_vec(),
        })?;
        if t.dims() != expected {
            return Err(Error::ShapeMismatch {
                key: key.to_string(),
                expected: expected.to_vec(),
                actual: t.dims().to_vec(),
            });
        }
        Ok(t)
    }
}

impl StateDict {
    /// A [`VarBuilder`] over these tensors as constants (converted to `dtype` on `device` when taken; detached
    /// from any gradient graph, and copied if they are `Var`s, whose storage can change in place), for
    /// [`DinoVisionTransformer::new`](crate::DinoVisionTransformer::new) and every layer's `new`. A missing
    /// name or a wrong shape is a candle error naming the key; check the whole dict first with
    /// [`DinoVisionTransformer::check_state_dict`](crate::DinoVisionTransformer::check_state_dict) for typed errors.
    ///
    /// ```
    /// use candle_core::{DType, Device, Module, Tensor};
    /// use dinov2_model::layers::LayerNorm;
    /// use dinov2_model::StateDict;
    /// # fn main() -> dinov2_model::Result<()> {
    /// let mut sd = StateDict::new();
    /// sd.insert("norm.weight", Tensor::ones(4, DType::F32, &Device::Cpu)?);
    /// sd.insert("norm.bias", Tensor::zeros(4, DType::F32, &Device::Cpu)?);
    /// let norm = LayerNorm::new(4, 1e-6, sd.var_builder(DType::F32, &Device::Cpu).pp("norm"))?;
    /// let y = norm.forward(&Tensor::new(&[[1f32, 2., 3., 4.]], &Device::Cpu)?)?;
    /// assert!(y.sum_all()?.to_scalar::<f32>()?.abs() < 1e-5);
    /// # Ok(()) }
    /// ```
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(
            Box::new(Constants(Arc::new(self.tensors.clone()))),
            dtype,
            device.clone(),
        )
    }

    /// Puts every tensor into `varmap` as a trainable [`Var`] called `{prefix}{key}` (converted to `dtype` on
    /// `device`), replacing entries of the same name. A builder over the `VarMap`
    /// ([`VarBuilder::from_varmap`], [`crate::init::seeded`]) then hands out these `Var`s.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_nn::VarMap;
    /// # fn main() -> dinov2_model::Result<()> {
    /// let mut sd = dinov2_model::StateDict::new();
    /// sd.insert("cls_token", Tensor::zeros((1, 1, 8), DType::F32, &Device::Cpu)?);
    /// let varmap = VarMap::new();
    /// sd.to_var_map(&varmap, "backbone.", DType::F32, &Device::Cpu)?;
    /// assert!(varmap.data().lock().unwrap().contains_key("backbone.cls_token"));
    /// # Ok(()) }
    /// ```
    pub fn to_var_map(
        &self,
        varmap: &VarMap,
        prefix: &str,
        dtype: DType,
        device: &Device,
    ) -> Result<()> {
        let mut vars = Vec::with_capacity(self.len());
        for (k, t) in self.iter() {
            // `detach` first: `Var::from_tensor` of a `Var` would share its storage instead of copying it.
            let t = t.detach().to_device(device)?.to_dtype(dtype)?;
            vars.push((format!("{prefix}{k}"), Var::from_tensor(&t)?));
        }
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| Error::invalid("varmap", "its lock is poisoned"))?;
        data.extend(vars);
        Ok(())
    }
}

/// `t` as a constant: no gradient graph, and never the storage of a `Var` (which can change in place).
fn constant(t: &Tensor, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
    let t = if t.is_variable() {
        t.detach().copy()?
    } else {
        t.detach()
    };
    t.to_device(dev)?.to_dtype(dtype)
}

/// The constant backend of [`StateDict::var_builder`].
struct Constants(Arc<BTreeMap<String, Tensor>>);

impl Constants {
    fn find(&self, name: &str) -> candle_core::Result<&Tensor> {
        self.0.get(name).ok_or_else(|| not_found(name))
    }
}

impl SimpleBackend for Constants {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.find(name)?;
        check_shape(name, s, t)?;
        constant(t, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        constant(self.find(name)?, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
}

impl FromIterator<(String, Tensor)> for StateDict {
    fn from_iter<I: IntoIterator<Item = (String, Tensor)>>(iter: I) -> Self {
        StateDict {
            tensors: iter.into_iter().collect(),
        }
    }
}

impl IntoIterator for StateDict {
    type Item = (String, Tensor);
    type IntoIter = std::collections::btree_map::IntoIter<String, Tensor>;
    fn into_iter(self) -> Self::IntoIter {
        self.tensors.into_iter()
    }
}
