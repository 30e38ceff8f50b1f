//! CUDA kernels of the ops (feature `cuda`): a softmax with a real backward, reductions in f32 whatever the
//! storage type. candle-nn's `softmax_last_dim` has no backward, and its kernel exponentiates in the storage type.
//! The kernels (`kernels.cu`) are compiled to PTX by build.rs and loaded on first use.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/dinov2_kernels.ptx"));
const MODULE: &str = "dinov2_model_ops";
/// Rows per thread block: one warp per row.
const ROWS_PER_BLOCK: u32 = 8;

/// Runs the row kernel `{name}_{f32|bf16|f16}(inputs..., out, nrows, ncols)` over the last dimension of
/// contiguous inputs of one shape and dtype; returns its output, of that shape and dtype.
fn row_kernel(name: &str, inputs: &[(&CudaStorage, &Layout)]) -> Result<(CudaStorage, Shape)> {
    fn run<T: CudaDType + DeviceRepr>(
        name: &str,
        inputs: &[(&CudaStorage, &Layout)],
        suffix: &str,
    ) -> Result<CudaStorage> {
        let (first, layout) = inputs[0];
        let dev = first.device.clone();
        let ncols = layout.dims().last().copied().unwrap_or(1).max(1);
        let nrows = layout.shape().elem_count() / ncols;
        let views = inputs
            .iter()
            .map(|&(s, l)| match l.contiguous_offsets() {
                Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
                None => bail!("{name} on CUDA: the inputs must be contiguous"),
            })
            .collect::<Result<Vec<CudaView<'_, T>>>>()?;
        let func = dev.get_or_load_custom_func(&format!("{name}_{suffix}"), MODULE, PTX)?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(nrows * ncols)? };
        let (n, c) = (nrows as i64, ncols as i32);
        let mut b = func.builder();
        for v in &views {
            b.arg(v);
        }
        b.arg(&out).arg(&n).arg(&c);
        let cfg = LaunchConfig {
            grid_dim: ((nrows as u32).div_ceil(ROWS_PER_BLOCK), 1, 1),
            block_dim: (32, ROWS_PER_BLOCK, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the argument list matches the kernel's signature; every buffer holds nrows · ncols values.
        unsafe { b.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
    let (first, layout) = inputs[0];
    if inputs[1..]
        .iter()
        .any(|(s, l)| l.shape() != layout.shape() || s.dtype() != first.dtype())
    {
        bail!("{name} on CUDA: the inputs differ in shape or dtype");
    }
    let out = match first.dtype() {
        DType::F32 => run::<f32>(name, inputs, "f32")?,
        DType::BF16 => run::<half::bf16>(name, inputs, "bf16")?,
        DType::F16 => run::<half::f16>(name, inputs, "f16")?,
        other => bail!("{name} on CUDA: unsupported dtype {other:?} (f32, bf16 or f16)"),
    };
    Ok((out, layout.shape().clone()))
}

/// `softmax(x)` over the last dimension of a contiguous tensor.
pub(crate) fn softmax_fwd(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    row_kernel("dinov2_softmax_fwd", &[(s, l)])
}

/// The softmax backward `y · (g − Σ g·y)` from the output `y` and the upstream gradient `g` (same shape).
pub(crate) fn softmax_bwd(
    y: &CudaStorage,
    ly: &Layout,
    g: &CudaStorage,
    lg: &Layout,
) -> Result<(CudaStorage, Shape)> {
    row_kernel("dinov2_softmax_bwd", &[(y, ly), (g, lg)])
}
