//! CUDA kernels of the ops (feature `cuda`): a softmax with a real backward, reductions in f32 whatever the
//! storage type. candle-nn's `softmax_last_dim` has no backward, and its kernel exponentiates in the storage type.
//! The kernels (`kernels.cu`) are compiled to PTX by build.rs and loaded on first use.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Shape};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/dinov2_kernels.ptx"));
const MODULE: &str = "dinov2_model_ops";
/// Rows per thread block: one warp per row.
const ROWS_PER_BLOCK: u32 = 8;

fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        other => bail!("dinov2 softmax on CUDA: unsupported dtype {other:?} (f32, bf16 or f16)"),
    })
}

fn rows_config(nrows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((nrows as u32).div_ceil(ROWS_PER_BLOCK), 1, 1),
        block_dim: (32, ROWS_PER_BLOCK, 1),
        shared_mem_bytes: 0,
    }
}

fn contiguous<'a, T: CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
        None => bail!("dinov2 softmax on CUDA: the input must be contiguous"),
    }
}

fn dims(l: &Layout) -> (usize, usize) {
    let ncols = l.dims().last().copied().unwrap_or(1).max(1);
    (l.shape().elem_count() / ncols, ncols)
}

/// `softmax(x)` over the last dimension of a contiguous tensor.
pub(crate) fn softmax_fwd(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    fn run<T: CudaDType + DeviceRepr>(
        s: &CudaStorage,
        l: &Layout,
        dev: &CudaDevice,
    ) -> Result<CudaSlice<T>> {
        let (nrows, ncols) = dims(l);
        let x = contiguous::<T>(s, l)?;
        let name = format!("dinov2_softmax_fwd_{}", suffix(s.dtype())?);
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        // SAFETY: every element is written by the kernel.
        let y = unsafe { dev.alloc::<T>(nrows * ncols)? };
        let (n, c) = (nrows as i64, ncols as i32);
        let mut b = func.builder();
        b.arg(&x).arg(&y).arg(&n).arg(&c);
        // SAFETY: the argument list matches the kernel's signature; the buffers hold nrows · ncols values.
        unsafe { b.launch(rows_config(nrows)) }.w()?;
        Ok(y)
    }
    let dev = s.device.clone();
    let out = match s.dtype() {
        DType::F32 => CudaStorage::wrap_cuda_slice(run::<f32>(s, l, &dev)?, dev),
        DType::BF16 => CudaStorage::wrap_cuda_slice(run::<half::bf16>(s, l, &dev)?, dev),
        DType::F16 => CudaStorage::wrap_cuda_slice(run::<half::f16>(s, l, &dev)?, dev),
        other => bail!("dinov2 softmax on CUDA: unsupported dtype {other:?}"),
    };
    Ok((out, l.shape().clone()))
}

/// The softmax backward `y · (g − Σ g·y)` from the output `y` and the upstream gradient `g` (same shape).
pub(crate) fn softmax_bwd(
    y: &CudaStorage,
    ly: &Layout,
    g: &CudaStorage,
    lg: &Layout,
) -> Result<(CudaStorage, Shape)> {
    if ly.shape() != lg.shape() || y.dtype() != g.dtype() {
        bail!("dinov2 softmax backward: output and gradient differ in shape or dtype");
    }
    fn run<T: CudaDType + DeviceRepr>(
        y: &CudaStorage,
        ly: &Layout,
        g: &CudaStorage,
        lg: &Layout,
        dev: &CudaDevice,
    ) -> Result<CudaSlice<T>> {
        let (nrows, ncols) = dims(ly);
        let (yv, gv) = (contiguous::<T>(y, ly)?, contiguous::<T>(g, lg)?);
        let name = format!("dinov2_softmax_bwd_{}", suffix(y.dtype())?);
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        // SAFETY: every element is written by the kernel.
        let dx = unsafe { dev.alloc::<T>(nrows * ncols)? };
        let (n, c) = (nrows as i64, ncols as i32);
        let mut b = func.builder();
        b.arg(&yv).arg(&gv).arg(&dx).arg(&n).arg(&c);
        // SAFETY: as in `softmax_fwd`.
        unsafe { b.launch(rows_config(nrows)) }.w()?;
        Ok(dx)
    }
    let dev = y.device.clone();
    let out = match y.dtype() {
        DType::F32 => CudaStorage::wrap_cuda_slice(run::<f32>(y, ly, g, lg, &dev)?, dev),
        DType::BF16 => CudaStorage::wrap_cuda_slice(run::<half::bf16>(y, ly, g, lg, &dev)?, dev),
        DType::F16 => CudaStorage::wrap_cuda_slice(run::<half::f16>(y, ly, g, lg, &dev)?, dev),
        other => bail!("dinov2 softmax backward on CUDA: unsupported dtype {other:?}"),
    };
    Ok((out, ly.shape().clone()))
}
