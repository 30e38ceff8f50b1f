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
///
/// The exponent is rounded with the 1.5·2²³ "magic number" instead of an `as i32` cast: Rust's saturating
/// float-to-int casts do not vectorise.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits
    let x = x.clamp(-87.336_54, 88.376_26);
    let t = x * LOG2E + MAGIC;
    let nf = t - MAGIC; // round(x · log2 e)
    let n = t.to_bits().wrapping_sub(MAGIC.to_bits()); // the same integer, two's complement
    let r = x - nf * 0.693_359_4 - nf * -2.121_944_4e-4;
    let z = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * z + r + 1.0;
    y * f32::from_bits(n.wrapping_add(127) << 23)
}

/// `row = exp(scale · (row − m))` and the sum of the result, with AVX2+FMA intrinsics: [`fast_exp`]'s
/// polynomial with fused multiply-adds, two vectors per step (the compiler does not contract `a * b + c` into
/// FMAs, and one vector per step leaves the polynomial's dependency chain exposed).
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_sum_avx2(row: &mut [f32], m: f32, scale: f32) -> f32 {
    use std::arch::x86_64::*;
    #[inline(always)]
    unsafe fn exp8(v: __m256, m: __m256, scale: __m256) -> __m256 {
        let x = _mm256_mul_ps(_mm256_sub_ps(v, m), scale);
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.336_54)),
            _mm256_set1_ps(88.376_26),
        );
        let magic = _mm256_set1_ps(12_582_912.0);
        let t = _mm256_fmadd_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E), magic);
        let nf = _mm256_sub_ps(t, magic);
        let n = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_castps_si256(magic));
        let r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(-2.121_944_4e-4), r);
        let z = _mm256_mul_ps(r, r);
        let mut p = _mm256_fmadd_ps(
            _mm256_set1_ps(1.987_569_1e-4),
            r,
            _mm256_set1_ps(1.398_199_9e-3),
        );
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.333_452e-3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166_579_6e-2));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.666_666_5e-1));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5));
        let y = _mm256_add_ps(_mm256_fmadd_ps(p, z, r), _mm256_set1_ps(1.0));
        let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(n, _mm256_set1_epi32(127)));
        _mm256_mul_ps(y, _mm256_castsi256_ps(pow2))
    }
    let (mv, sv) = (_mm256_set1_ps(m), _mm256_set1_ps(scale));
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut chunks = row.chunks_exact_mut(16);
    for c in &mut chunks {
        let p = c.as_mut_ptr();
        let e0 = exp8(_mm256_loadu_ps(p), mv, sv);
        let e1 = exp8(_mm256_loadu_ps(p.add(8)), mv, sv);
        _mm256_storeu_ps(p, e0);
        _mm256_storeu_ps(p.add(8), e1);
        acc0 = _mm256_add_ps(acc0, e0);
        acc1 = _mm256_add_ps(acc1, e1);
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(acc0, acc1));
    let mut tail = 0.0;
    for v in chunks.into_remainder() {
        *v = fast_exp((*v - m) * scale);
        tail += *v;
    }
    fold_lanes(lanes, tail)
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

/// Whether this CPU runs the AVX2+FMA builds of our kernels (checked once, cached by std).
#[inline]
pub(crate) fn has_avx2() -> bool {
    dinov2_kernels::sgemm::has_avx2_fma()
}

/// Defines a kernel function whose body is compiled twice: for the baseline target and with AVX2+FMA
/// enabled, picking the latter at run time when the CPU has it. Results are identical (no FMA contraction).
macro_rules! simd_kernel {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])* $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    body($($arg),*)
                }
                if $crate::ops::cpu::has_avx2() {
                    // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
                    unsafe { avx2($($arg),*) };
                    return;
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use simd_kernel;

/// Sum with 8 independent accumulators (lets the compiler vectorise; order differs from a serial sum).
#[inline(always)]
pub(crate) fn sum_lanes(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let rem = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    fold_lanes(acc, rem.iter().sum())
}

/// The sum of 8 lane accumulators (pairwise, in a fixed order) and a tail.
#[inline(always)]
fn fold_lanes(acc: [f32; 8], tail: f32) -> f32 {
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// `row = exp(scale · (row − m))` and its sum, in one pass: [`exp_sum_avx2`] on CPUs with AVX2+FMA, else 8
/// independent accumulators over [`fast_exp`].
#[inline(always)]
pub(crate) fn exp_sum(row: &mut [f32], m: f32, scale: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked at run time).
        return unsafe { exp_sum_avx2(row, m, scale) };
    }
    let mut acc = [0f32; 8];
    let mut chunks = row.chunks_exact_mut(8);
    for c in &mut chunks {
        for i in 0..8 {
            let e = fast_exp((c[i] - m) * scale);
            c[i] = e;
            acc[i] += e;
        }
    }
    let mut tail = 0.0;
    for v in chunks.into_remainder() {
        *v = fast_exp((*v - m) * scale);
        tail += *v;
    }
    fold_lanes(acc, tail)
}

/// Maximum with 8 independent lanes.
#[inline(always)]
pub(crate) fn max_lanes(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = xs.chunks_exact(8);
    let rem = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let mut m = rem.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for a in acc {
        m = m.max(a);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn exp_sum_avx2_matches_f64() {
        if !has_avx2() {
            return;
        }
        // 37 values (two 16-wide steps and a tail of 5) at or below the maximum, as in a softmax: exponents
        // from about -205 (clamped to -87.3) to 0.
        let row: Vec<f32> = (0..37).map(|i| i as f32 * 6.0 - 110.0).collect();
        let (m, scale) = (106.0f32, 0.95f32);
        let mut got = row.clone();
        // SAFETY: AVX2 and FMA checked above.
        let sum = unsafe { exp_sum_avx2(&mut got, m, scale) };
        let mut want_sum = 0f64;
        for (&x, &g) in row.iter().zip(&got) {
            let want = (((x - m) * scale) as f64)
                .clamp(-87.336_54, 88.376_26)
                .exp();
            want_sum += want;
            assert!(
                ((g as f64 - want) / want).abs() < 3e-7,
                "exp({x}): {g} vs {want}"
            );
        }
        assert!(
            ((sum as f64 - want_sum) / want_sum).abs() < 1e-6,
            "{sum} vs {want_sum}"
        );
    }

    #[test]
    fn fast_exp_and_erf_are_accurate() {
        let mut worst_exp = 0f64;
        let mut worst_erf = 0f64;
        for i in -20000..=20000 {
            let x = i as f32 * 0.0043;
            let e = (x as f64).exp();
            worst_exp = worst_exp.max(((fast_exp(x) as f64 - e) / e).abs());
            let t = 1.0 / (1.0 + 0.5 * (x as f64).abs());
            // erfc via Numerical Recipes' Chebyshev fit (|rel err| < 1.2e-7), as an independent reference.
            let y = t
                * (-(x as f64) * (x as f64) - 1.26551223
                    + t * (1.00002368
                        + t * (0.37409196
                            + t * (0.09678418
                                + t * (-0.18628806
                                    + t * (0.27886807
                                        + t * (-1.13520398
                                            + t * (1.48851587
                                                + t * (-0.82215223 + t * 0.17087277)))))))))
                    .exp();
            let erf = if x >= 0.0 { 1.0 - y } else { y - 1.0 };
            worst_erf = worst_erf.max((fast_erf(x) as f64 - erf).abs());
        }
        assert!(worst_exp < 3e-7, "exp relative error {worst_exp:e}");
        assert!(worst_erf < 4e-7, "erf absolute error {worst_erf:e}");
        assert!(fast_exp(-200.0) < 1e-37 && fast_exp(f32::NEG_INFINITY) < 1e-37);
        assert!(fast_exp(f32::NAN).is_nan());
    }
}
