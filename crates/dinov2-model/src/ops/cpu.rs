//! Small helpers shared by the CPU kernels.

use candle_core::{bail, CpuStorage, Layout, Result, Storage, Tensor};

/// The contiguous f32 slice a layout describes.
pub(crate) fn slice_f32<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("fused kernel requires a contiguous input"),
    }
}

/// Runs `f` on the contiguous f32 data of a CPU tensor (used by backward passes, which get tensors).
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => f(slice_f32(cpu, layout)?),
        _ => bail!("fused CPU kernel called on a non-CPU tensor"),
    }
}

/// A raw pointer that may cross threads: every user writes disjoint ranges.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(pub *mut f32);
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper).
    #[inline(always)]
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Chunk length for row-parallel loops: about 4 chunks per thread, at least one row.
pub(crate) fn rows_per_chunk(rows: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    rows.div_ceil(threads * 4).max(1)
}

/// `exp` for f32, branch-free so loops over it vectorise (Cephes `expf` polynomial, about 1 ulp on [-87, 88]).
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    let x = x.clamp(-87.336_54, 88.376_26);
    let fx = x * LOG2E + 0.5;
    let mut n = fx as i32;
    n -= ((n as f32) > fx) as i32; // floor
    let nf = n as f32;
    let r = x - nf * 0.693_359_4 - nf * -2.121_944_4e-4;
    let z = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 5.000_000_1e-1;
    let y = p * z + r + 1.0;
    y * f32::from_bits(((n + 127) as u32) << 23)
}

/// `erf` for f32 as PyTorch's vectorised CPU kernels compute it (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7).
#[inline(always)]
pub(crate) fn fast_erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (0.327_591_1 * a + 1.0);
    let r =
        (((1.061_405_4 * t - 1.453_152) * t + 1.421_413_7) * t - 0.284_496_74) * t + 0.254_829_6;
    let v = 1.0 - r * t * fast_exp(-a * a);
    v.copysign(x)
}
