//! Shared helpers of the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;

#[path = "../../src/testutil.rs"]
mod testutil;
#[allow(unused_imports)] // not every test binary uses them
pub use testutil::*;

pub struct Fixture {
    pub name: String,
    pub map: HashMap<String, Tensor>,
}

impl Fixture {
    pub fn load(name: &str) -> Self {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(format!("{name}.safetensors"));
        let map = candle_core::safetensors::load(&path, &Device::Cpu)
            .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()));
        Self {
            name: name.into(),
            map,
        }
    }

    pub fn get(&self, key: &str) -> Tensor {
        self.map
            .get(key)
            .unwrap_or_else(|| panic!("{}: missing fixture tensor {key}", self.name))
            .clone()
    }

    pub fn has(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    pub fn ints(&self, key: &str) -> Vec<usize> {
        self.get(key)
            .to_dtype(DType::I64)
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|v| v as usize)
            .collect()
    }

    pub fn f64s(&self, key: &str) -> Vec<f64> {
        self.get(key)
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    }

    pub fn scalar(&self, key: &str) -> f64 {
        self.f64s(key)[0]
    }

    /// All tensors under `prefix.` with the prefix stripped.
    pub fn sub(&self, prefix: &str) -> HashMap<String, Tensor> {
        let p = format!("{prefix}.");
        self.map
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(&p).map(|s| (s.to_string(), v.clone())))
            .collect()
    }
}

fn flat64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Norm-wise relative error `max|a - b| / max|b|` (with `max|b|` floored at 1e-30).
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (flat64(a), flat64(b));
    assert_eq!(a.len(), b.len(), "element counts differ");
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    let diff = a.iter().zip(&b).fold(0f64, |m, (x, y)| {
        if x.is_nan() || y.is_nan() {
            f64::INFINITY
        } else {
            m.max((x - y).abs())
        }
    });
    diff / scale
}

/// Asserts `rel_err(actual, expected) <= tol` and equal shapes.
pub fn assert_close(actual: &Tensor, expected: &Tensor, tol: f64, what: &str) {
    assert_eq!(
        actual.dims(),
        expected.dims(),
        "{what}: shape {:?} vs expected {:?}",
        actual.dims(),
        expected.dims()
    );
    let e = rel_err(actual, expected);
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.1e}");
}

pub fn var_tensor(vm: &VarMap, name: &str) -> Tensor {
    vm.data().lock().unwrap()[name].as_tensor().clone()
}
