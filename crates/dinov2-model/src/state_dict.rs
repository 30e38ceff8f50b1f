//! [`StateDict`]: named tensors under the official facebookresearch/dinov2 parameter names.
//!
//! Every weight format is converted to this one canonical naming (`cls_token`, `pos_embed`,
//! `register_tokens`, `mask_token`, `patch_embed.proj.*`, `blocks.{i}.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.*,ls2.gamma}.*`,
//! `norm.*`) before a model is built from it.

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::error::{Error, Result};

/// Named tensors, sorted by name.
#[derive(Debug, Clone, Default)]
pub struct StateDict {
    tensors: BTreeMap<String, Tensor>,
}

impl StateDict {
    /// An empty state dict.
    pub fn new() -> Self {
        Self::default()
    }
    /// Inserts (or replaces) a tensor.
    pub fn insert(&mut self, key: impl Into<String>, t: Tensor) -> Option<Tensor> {
        self.tensors.insert(key.into(), t)
    }
    /// The tensor called `key`.
    pub fn get(&self, key: &str) -> Option<&Tensor> {
        self.tensors.get(key)
    }
    /// Removes and returns the tensor called `key`.
    pub fn remove(&mut self, key: &str) -> Option<Tensor> {
        self.tensors.remove(key)
    }
    /// Whether `key` is present.
    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }
    /// Names, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }
    /// (name, tensor) pairs, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.tensors.iter()
    }
    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }
    /// Whether there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
    /// The underlying map.
    pub fn into_inner(self) -> BTreeMap<String, Tensor> {
        self.tensors
    }

    /// The tensor `key`, checked against `expected` shape: a typed error naming the key and both shapes otherwise.
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
