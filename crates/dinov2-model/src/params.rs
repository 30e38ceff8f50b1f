//! [`VarBuilder`] backends that watch a model being built: which parameters it asks for, with which shapes.
//!
//! They are how the official names stay written in one place (the layers' `new`): the list of a
//! configuration's parameters and a model's named parameters are read off a build instead of being written
//! down again. [`placeholders`] is the public one: a builder of zero-cost tensors for such dry builds.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

/// Parameters in the order a build asked for them.
pub(crate) type Requests<T> = Arc<Mutex<Vec<(String, T)>>>;

fn lock_err() -> candle_core::Error {
    candle_core::Error::Msg("parameter recorder lock poisoned".into())
}

/// candle's error for a parameter a backend does not have.
pub(crate) fn not_found(name: &str) -> candle_core::Error {
    candle_core::Error::CannotFindTensor {
        path: name.to_string(),
    }
    .bt()
}

/// candle's error unless parameter `name` (`t`) has the shape the builder asked for.
pub(crate) fn check_shape(name: &str, expected: Shape, t: &Tensor) -> candle_core::Result<()> {
    if t.shape() == &expected {
        return Ok(());
    }
    Err(candle_core::Error::UnexpectedShape {
        msg: format!("weight `{name}`"),
        expected,
        got: t.shape().clone(),
    }
    .bt())
}

/// Wraps another builder and records every tensor it hands out, under its name relative to the wrapped
/// builder's prefix.
pub(crate) struct Recorder<'a> {
    inner: VarBuilder<'a>,
    seen: Requests<Tensor>,
}

impl<'a> Recorder<'a> {
    /// A builder over `inner` (same dtype and device, names relative to `inner`'s prefix) and the list it
    /// fills.
    pub(crate) fn wrap(inner: VarBuilder<'a>) -> (VarBuilder<'a>, Requests<Tensor>) {
        let seen: Requests<Tensor> = Arc::default();
        let (dtype, device) = (inner.dtype(), inner.device().clone());
        let rec = Recorder {
            inner,
            seen: seen.clone(),
        };
        (VarBuilder::from_backend(Box::new(rec), dtype, device), seen)
    }
}

impl SimpleBackend for Recorder<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.inner.get_with_hints_dtype(s, name, h, dtype)?;
        self.seen
            .lock()
            .map_err(|_| lock_err())?
            .push((name.to_string(), t.clone()));
        Ok(t)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.inner.get_unchecked_dtype(name, dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// Hands out zero-cost placeholders (a broadcast scalar) and records each request's name and shape.
#[derive(Default)]
struct Meta {
    seen: Requests<Vec<usize>>,
}

/// A [`VarBuilder`] that hands out zero-cost placeholders of the requested shapes (a broadcast zero scalar,
/// nothing allocated): building a layer on it lists or checks its parameters without their values, for any
/// model size. Layers must not compute on their weights in `new` (none of this workspace's do).
///
/// ```
/// use candle_core::{DType, Device};
/// use dinov2_model::{layers::Linear, params::placeholders};
/// # fn main() -> dinov2_model::Result<()> {
/// let fc = Linear::new(4096, 4096, true, placeholders(DType::F32, &Device::Cpu))?;
/// assert_eq!(fc.weight().dims(), &[4096, 4096]);
/// # Ok(()) }
/// ```
pub fn placeholders(dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(Meta::default()), dtype, device.clone())
}

impl SimpleBackend for Meta {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.seen
            .lock()
            .map_err(|_| lock_err())?
            .push((name.to_string(), s.dims().to_vec()));
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        Err(not_found(name))
    }

    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

/// Runs `build` on a placeholder builder and returns the `(name, shape)` of every parameter it asked for,
/// in order. Nothing is allocated for the parameters, so this is cheap for any model size.
pub(crate) fn meta_build<T>(
    build: impl FnOnce(VarBuilder<'static>) -> crate::Result<T>,
) -> crate::Result<Vec<(String, Vec<usize>)>> {
    let seen: Requests<Vec<usize>> = Arc::default();
    let vb = VarBuilder::from_backend(
        Box::new(Meta { seen: seen.clone() }),
        DType::F32,
        Device::Cpu,
    );
    build(vb)?;
    let out = std::mem::take(&mut *seen.lock().map_err(|_| lock_err())?);
    Ok(out)
}
