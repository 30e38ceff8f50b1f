//! Seeded test inputs (tests never draw from an unseeded generator).

use candle_core::{Device, Shape, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// f32 values uniform in [-1, 1), deterministic in `seed`.
pub(crate) fn seeded<S: Into<Shape>>(shape: S, seed: u64) -> Tensor {
    let shape = shape.into();
    let mut rng = StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..shape.elem_count())
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("shape matches")
}
