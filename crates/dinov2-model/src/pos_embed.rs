//! Position-table resampling, bit-compatible with PyTorch's two bicubic kernels.
//!
//! The learned table covers an `M × M` patch grid (37 × 37 for the released 518-pixel weights). An input of
//! `H × W` pixels needs an `h × w` grid (`h = H / p`, `w = W / p`). The official `interpolate_pos_encoding`
//! resamples the grid with one of two PyTorch kernels, depending on the model family:
//!
//! * **offset path** (non-register models, `interpolate_offset = 0.1`): `F.interpolate(scale_factor = ((h + 0.1) / M,
//!   (w + 0.1) / M), mode = "bicubic", antialias = False)`. The source coordinate uses the *given* scale,
//!   `src = (dst + 0.5) · M / (h + 0.1) − 0.5`; Keys kernel with A = −0.75; the four taps are clamped to the border.
//! * **size path** (register models, offset 0): `F.interpolate(size = (h, w), mode = "bicubic", antialias = True)`,
//!   the PIL-style separable filter with A = −0.5, support `2 · max(scale, 1)`, out-of-range taps dropped and the
//!   rest renormalised, width pass first, then height.
//!
//! Both are reproduced **bit for bit** as PyTorch's CPU kernels compute them in float32 on an AVX2 machine
//! (the `AVX2` build of `aten/src/ATen/native/cpu/UpSampleKernel.cpp`, which is compiled with `-mavx2 -mfma`
//! and GCC's default floating-point contraction, so some `a * b + c` expressions became fused multiply-adds).
//! What the compiled code does (established by probing torch 2.15: one-hot inputs expose the applied weights,
//! random inputs with many channels expose the summation, matched bitwise against float32 emulations):
//!
//! * **offset path** (`upsample_bicubic2d`, generic N-d kernel, height taps outer, width taps inner):
//!   - scale `s = f32(1 / scale_factor)` (the division in f64), source index `real = fma(s, i + 0.5, -0.5)` (f32 FMA),
//!     `idx = min(floor(real), in - 1)`, `t = clamp(real - idx, 0, 1)`;
//!   - weights with A = -0.75: `w0 = c2(t + 1)`, `w1 = c1(t)`, `w2 = c1(1 - t)`, `w3 = c2((1 - t) + 1)` (f32) where
//!     `c2(x) = fma(fma(A, x, -5A), x, 8A) * x - 4A` (last step *not* fused) and
//!     `c1(x) = (fma(A + 2, x, -(A + 3)) * x) * x + 1` (last two steps not fused);
//!   - each 4-tap sum is `fma(v3, w3, fma(v2, w2, fma(v0, w0, v1 * w1)))`: note the *first* product is the
//!     fused one and the second is rounded; first along the width for each of the 4 source rows, then the same
//!     4-tap sum of those row values with the height weights. Clamped border taps are separate terms.
//! * **size path** (`_upsample_bicubic2d_aa`, separable, width pass then height pass, each skipped when that size
//!   is unchanged): PIL-style weights with the Keys filter at A = -0.5 where both pieces are fully fused
//!   (`c1(x) = fma(fma(A + 2, x, -(A + 3)) * x, x, 1)`, `c2(x) = fma(fma(fma(A, x, -5A), x, 8A), x, -4A)`),
//!   the f64/f32 mix of the index arithmetic described on `bicubic_aa_like`, renormalised by an f32 sum.
//!   The tap sum `acc = v0·w0; acc += v_j·w_j` is a loop that GCC vectorised as an in-order reduction with 4
//!   lanes: for `n` taps the first `4·⌊(n − 1) / 4⌋` additions add a rounded product, the remaining ones are
//!   fused (`acc = fma(v_j, w_j, acc)`).
//!
//! The memory layout does not matter (the official call passes a channels-last view; PyTorch gives the same bits
//! for a contiguous copy). The x86-64 wheels register no AVX-512 build of these two kernels (their `DispatchStub`
//! AVX512 slots are empty), so AVX-512 CPUs run this same AVX2 code. The portable build
//! (`ATEN_CPU_CAPABILITY=default`, no FMA) rounds differently: only 6-50% of the fixture values keep their bits
//! there and the largest difference is 5.5e-6 on values of magnitude ~3; non-x86 builds were not checked.
//! The forward is a CPU kernel (FMA via `f32::mul_add`, an exact fused operation on every target, compiled to
//! the FMA instruction when the CPU has it); the backward (and the forward on other devices) is the same linear
//! map written as two matrix products, so training can resize the table every step.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use crate::config::PosEmbedInterpolation;
use crate::error::{Error, Result};
use crate::ops::cpu_slice;

/// Taps of one output position along one axis: first source index of each tap and its weight.
#[derive(Debug, Clone, PartialEq)]
struct AxisTaps {
    /// For each output index: (source indices, weights), in PyTorch's summation order.
    taps: Vec<(Vec<usize>, Vec<f32>)>,
}

impl AxisTaps {
    /// Dense `[out, in]` interpolation matrix (clamped duplicate taps add up).
    fn matrix(&self, in_size: usize) -> Vec<f32> {
        let mut m = vec![0f32; self.taps.len() * in_size];
        for (o, (idx, w)) in self.taps.iter().enumerate() {
            for (&i, &wt) in idx.iter().zip(w.iter()) {
                m[o * in_size + i] += wt;
            }
        }
        m
    }
}

/// Keys cubic `(a + 2)|x|³ − (a + 3)|x|² + 1` on `[0, 1]` as PyTorch's `upsample_bicubic2d` weights compute it
/// (first step fused, then two rounded products and a rounded add).
fn cubic1_upsample(x: f32, a: f32) -> f32 {
    let t = (a + 2.0).mul_add(x, -(a + 3.0));
    t * x * x + 1.0
}

/// Keys cubic `a|x|³ − 5a|x|² + 8a|x| − 4a` on `[1, 2]` as `upsample_bicubic2d` computes it (two fused steps,
/// then a rounded product and a rounded add).
fn cubic2_upsample(x: f32, a: f32) -> f32 {
    let t = a.mul_add(x, -5.0 * a).mul_add(x, 8.0 * a);
    t * x - 4.0 * a
}

/// [`cubic1_upsample`] as the antialiased kernel's filter computes it (every step fused).
fn cubic1_aa(x: f32, a: f32) -> f32 {
    let t = (a + 2.0).mul_add(x, -(a + 3.0));
    (t * x).mul_add(x, 1.0)
}

/// [`cubic2_upsample`] as the antialiased kernel's filter computes it (every step fused).
fn cubic2_aa(x: f32, a: f32) -> f32 {
    a.mul_add(x, -5.0 * a)
        .mul_add(x, 8.0 * a)
        .mul_add(x, -4.0 * a)
}

/// `upsample_bicubic2d` (antialias = False, align_corners = False) taps along one axis.
/// `scale_factor` is the value handed to `F.interpolate` (None: size given).
fn bicubic_taps(in_size: usize, out_size: usize, scale_factor: Option<f64>) -> AxisTaps {
    let scale: f32 = match scale_factor {
        Some(s) if s > 0.0 => (1.0 / s) as f32,
        _ => in_size as f32 / out_size as f32,
    };
    const A: f32 = -0.75;
    let last = in_size as i64 - 1;
    let taps = (0..out_size)
        .map(|i| {
            // `scale * (i + 0.5) - 0.5`, contracted to one FMA by the compiler.
            let real = scale.mul_add(i as f32 + 0.5, -0.5);
            let index = (real.floor() as i64).min(last);
            let t = (real - index as f32).clamp(0.0, 1.0);
            let x2 = 1.0 - t;
            let w = vec![
                cubic2_upsample(t + 1.0, A),
                cubic1_upsample(t, A),
                cubic1_upsample(x2, A),
                cubic2_upsample(x2 + 1.0, A),
            ];
            let idx = (0..4)
                .map(|j| (index - 1 + j).clamp(0, last) as usize)
                .collect();
            (idx, w)
        })
        .collect();
    AxisTaps { taps }
}

/// `_upsample_bicubic2d_aa` taps along one axis (size given, align_corners = False).
fn bicubic_aa_taps(in_size: usize, out_size: usize) -> AxisTaps {
    AxisTaps {
        taps: bicubic_aa_like(in_size, out_size, in_size as f32 / out_size as f32),
    }
}

/// A resampling of an `in_h × in_w` grid of D-vectors to `out_h × out_w`.
///
/// ```
/// use std::sync::Arc;
/// use candle_core::{DType, Device, Tensor};
/// use dinov2_model::{pos_embed::GridResampler, VitConfig};
/// # fn main() -> dinov2_model::Result<()> {
/// // The released 37 x 37 table resampled for a 16 x 16 patch grid (224-pixel inputs), register-model mode.
/// let mode = VitConfig::vit_small().with_registers(4).interpolation;
/// let resampler = Arc::new(GridResampler::new(37, 16, 16, mode)?);
/// let table = Tensor::ones((37 * 37, 8), DType::F32, &Device::Cpu)?;
/// let out = resampler.apply(&table)?;
/// assert_eq!(out.dims(), &[16 * 16, 8]);
/// // Renormalised taps: a constant table stays constant.
/// assert!((out - 1.0)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? < 1e-6);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct GridResampler {
    in_h: usize,
    in_w: usize,
    out_h: usize,
    out_w: usize,
    antialias: bool,
    rows: AxisTaps,
    cols: AxisTaps,
}

impl GridResampler {
    /// The resampling the official code applies to an `m × m` table for an `h × w` patch grid. Empty grids
    /// are an [`Error::InvalidArgument`]; an offset that does not give back an `h × w` grid (the official
    /// code's assertion) an [`Error::InvalidConfig`].
    ///
    /// ```
    /// use dinov2_model::{pos_embed::GridResampler, Error, PosEmbedInterpolation};
    /// let offset = PosEmbedInterpolation { offset: 0.1, antialias: false }; // the non-register models
    /// assert!(GridResampler::new(37, 16, 23, offset).is_ok()); // a 224 x 322 input
    /// assert!(matches!(GridResampler::new(0, 16, 16, offset), Err(Error::InvalidArgument { .. })));
    /// let bad = PosEmbedInterpolation { offset: 1.5, antialias: false }; // scale (16 + 1.5) / 37 floors to 17 rows
    /// assert!(matches!(GridResampler::new(37, 16, 16, bad), Err(Error::InvalidConfig { .. })));
    /// ```
    pub fn new(m: usize, h: usize, w: usize, mode: PosEmbedInterpolation) -> Result<Self> {
        if m == 0 || h == 0 || w == 0 {
            return Err(Error::invalid(
                "grid",
                format!("cannot resample a {m}x{m} position grid to {h}x{w}"),
            ));
        }
        let (rows, cols) = if mode.offset != 0.0 {
            let sh = (h as f64 + mode.offset) / m as f64;
            let sw = (w as f64 + mode.offset) / m as f64;
            // PyTorch derives the output size from the scale factor; the official code asserts it is (h, w).
            let (oh, ow) = (
                (m as f64 * sh).floor() as usize,
                (m as f64 * sw).floor() as usize,
            );
            if (oh, ow) != (h, w) {
                return Err(Error::config(
                    "interpolation",
                    format!(
                        "interpolate_offset {} gives a {oh}x{ow} grid instead of {h}x{w}",
                        mode.offset
                    ),
                ));
            }
            if mode.antialias {
                // scale_factor + antialias: the AA kernel with the given scale (not used by released models).
                (aa_taps_with_scale(m, h, sh), aa_taps_with_scale(m, w, sw))
            } else {
                (bicubic_taps(m, h, Some(sh)), bicubic_taps(m, w, Some(sw)))
            }
        } else if mode.antialias {
            (bicubic_aa_taps(m, h), bicubic_aa_taps(m, w))
        } else {
            (bicubic_taps(m, h, None), bicubic_taps(m, w, None))
        };
        Ok(GridResampler {
            in_h: m,
            in_w: m,
            out_h: h,
            out_w: w,
            antialias: mode.antialias,
            rows,
            cols,
        })
    }

    /// Resamples `grid` (`[in_h · in_w, D]`, row-major over the grid) to `[out_h · out_w, D]`. Differentiable.
    ///
    /// Computed in f32 as the official code (`pos_embed.float()`), except for f64 tables, which stay f64 (a
    /// more exact resampling for f64 models, whose use is gradient checking).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use candle_core::{DType, Device, Var};
    /// use dinov2_model::{pos_embed::GridResampler, PosEmbedInterpolation};
    /// # fn main() -> dinov2_model::Result<()> {
    /// let mode = PosEmbedInterpolation { offset: 0.1, antialias: false };
    /// let resampler = Arc::new(GridResampler::new(2, 3, 4, mode)?); // 2 x 2 → 3 x 4
    /// let table = Var::ones((2 * 2, 5), DType::F32, &Device::Cpu)?;
    /// let out = resampler.apply(table.as_tensor())?;
    /// assert_eq!(out.dims(), &[3 * 4, 5]);
    /// // Differentiable: each output's weights sum to one, so the gradient of the sum adds up to 12 x 5.
    /// let grad = out.sum_all()?.backward()?.get(&table).unwrap().sum_all()?.to_scalar::<f32>()?;
    /// assert!((grad - 60.0).abs() < 1e-4);
    /// # Ok(()) }
    /// ```
    pub fn apply(self: &Arc<Self>, grid: &Tensor) -> Result<Tensor> {
        if grid.dtype() == DType::F64 {
            return self.apply_matrices(grid);
        }
        let grid = grid.to_dtype(DType::F32)?;
        if crate::ops::use_cpu_kernel(&grid) {
            Ok(grid
                .contiguous()?
                .apply_op1_arc(Arc::new(Box::new(ResampleOp(self.clone()))))?)
        } else {
            self.apply_matrices(&grid)
        }
    }

    fn matrices(&self, device: &candle_core::Device, dtype: DType) -> Result<(Tensor, Tensor)> {
        let ay = Tensor::from_vec(self.rows.matrix(self.in_h), (self.out_h, self.in_h), device)?;
        let ax = Tensor::from_vec(self.cols.matrix(self.in_w), (self.out_w, self.in_w), device)?;
        Ok((ay.to_dtype(dtype)?, ax.to_dtype(dtype)?))
    }

    /// The same linear map as two matrix products (any device; also the backward).
    fn apply_matrices(&self, grid: &Tensor) -> Result<Tensor> {
        let d = grid.dim(1)?;
        let (ay, ax) = self.matrices(grid.device(), grid.dtype())?;
        let g = grid.reshape((self.in_h, self.in_w, d))?;
        let t = ax
            .unsqueeze(0)?
            .broadcast_as((self.in_h, self.out_w, self.in_w))?
            .matmul(&g)?; // [in_h, out_w, d]
        let out = ay.matmul(&t.reshape((self.in_h, self.out_w * d))?)?;
        Ok(out.reshape((self.out_h * self.out_w, d))?)
    }

    /// Transposed map, `[out_h · out_w, D]` → `[in_h · in_w, D]`.
    fn apply_transposed(&self, g: &Tensor) -> Result<Tensor> {
        let d = g.dim(1)?;
        let (ay, ax) = self.matrices(g.device(), g.dtype())?;
        let t = ay
            .t()?
            .matmul(&g.reshape((self.out_h, self.out_w * d))?)?
            .reshape((self.in_h, self.out_w, d))?;
        let out = ax
            .t()?
            .unsqueeze(0)?
            .broadcast_as((self.in_h, self.in_w, self.out_w))?
            .matmul(&t)?;
        Ok(out.reshape((self.in_h * self.in_w, d))?)
    }

    /// The CPU forward: on x86-64 CPUs with AVX2 and FMA the same code compiled with those features (the
    /// fused multiply-adds become single instructions and the loops over D vectorise), elsewhere the portable
    /// build. Both give identical bits: every fused step is `f32::mul_add`, which is exact on every target.
    fn forward_cpu(&self, src: &[f32], d: usize) -> Vec<f32> {
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn forward_avx2(r: &GridResampler, src: &[f32], d: usize) -> Vec<f32> {
                r.forward_portable(src, d)
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                return unsafe { forward_avx2(self, src, d) };
            }
        }
        self.forward_portable(src, d)
    }

    #[inline(always)]
    fn forward_portable(&self, src: &[f32], d: usize) -> Vec<f32> {
        let (ih, iw, oh, ow) = (self.in_h, self.in_w, self.out_h, self.out_w);
        let mut out = vec![0f32; oh * ow * d];
        let row = |y: usize, x: usize| &src[(y * iw + x) * d..(y * iw + x + 1) * d];
        if !self.antialias {
            // upsample_bicubic2d: out[oy, ox] = S(S(src[y_i, x_j], wx), wy) with the 4-tap sum S of `sum4`, the width
            // sums inner. Those do not depend on oy, so they are computed once per (source row, ox): same bits.
            let mut inner = vec![0f32; ih * ow * d];
            for y in 0..ih {
                for (ox, (xi, xw)) in self.cols.taps.iter().enumerate() {
                    sum4(
                        &mut inner[(y * ow + ox) * d..(y * ow + ox + 1) * d],
                        [row(y, xi[0]), row(y, xi[1]), row(y, xi[2]), row(y, xi[3])],
                        [xw[0], xw[1], xw[2], xw[3]],
                    );
                }
            }
            let at = |y: usize, ox: usize| &inner[(y * ow + ox) * d..(y * ow + ox + 1) * d];
            for (oy, (yi, yw)) in self.rows.taps.iter().enumerate() {
                for ox in 0..ow {
                    sum4(
                        &mut out[(oy * ow + ox) * d..(oy * ow + ox + 1) * d],
                        [at(yi[0], ox), at(yi[1], ox), at(yi[2], ox), at(yi[3], ox)],
                        [yw[0], yw[1], yw[2], yw[3]],
                    );
                }
            }
            return out;
        }
        // _upsample_bicubic2d_aa: width pass first (skipped when the width is unchanged), then height.
        let horizontal: Vec<f32>;
        let tmp: &[f32] = if ow != iw {
            let mut t = vec![0f32; ih * ow * d];
            for y in 0..ih {
                for (ox, (xi, xw)) in self.cols.taps.iter().enumerate() {
                    let o = &mut t[(y * ow + ox) * d..(y * ow + ox + 1) * d];
                    sum_aa(o, xi.iter().zip(xw).map(|(&x, &w)| (row(y, x), w)));
                }
            }
            horizontal = t;
            &horizontal
        } else {
            src
        };
        if oh != ih {
            for (oy, (yi, yw)) in self.rows.taps.iter().enumerate() {
                for ox in 0..ow {
                    let o = &mut out[(oy * ow + ox) * d..(oy * ow + ox + 1) * d];
                    sum_aa(
                        o,
                        yi.iter()
                            .zip(yw)
                            .map(|(&y, &w)| (&tmp[(y * ow + ox) * d..(y * ow + ox + 1) * d], w)),
                    );
                }
            }
        } else {
            out.copy_from_slice(&tmp[..oh * ow * d]);
        }
        out
    }
}

/// `upsample_bicubic2d`'s 4-tap sum as PyTorch's AVX2 build computes it:
/// `o = fma(v3, w3, fma(v2, w2, fma(v0, w0, v1 · w1)))` (the second product rounded, the others fused).
#[inline(always)]
fn sum4(o: &mut [f32], v: [&[f32]; 4], w: [f32; 4]) {
    let n = o.len();
    let (v0, v1, v2, v3) = (&v[0][..n], &v[1][..n], &v[2][..n], &v[3][..n]);
    for k in 0..n {
        let acc = v0[k].mul_add(w[0], v1[k] * w[1]);
        let acc = v2[k].mul_add(w[2], acc);
        o[k] = v3[k].mul_add(w[3], acc);
    }
}

/// `_upsample_bicubic2d_aa`'s tap sum `o = v0·w0; o += v_j·w_j` as PyTorch's AVX2 build computes it: the loop
/// over the taps is vectorised as an in-order reduction with 4 lanes, so for `n` taps the first
/// `4·⌊(n − 1) / 4⌋` additions add a rounded product and the remaining (scalar epilogue) ones are fused.
#[inline(always)]
fn sum_aa<'a>(o: &mut [f32], taps: impl ExactSizeIterator<Item = (&'a [f32], f32)>) {
    let n = taps.len();
    let rounded = (n.saturating_sub(1) / 4) * 4;
    for (j, (s, w)) in taps.enumerate() {
        let s = &s[..o.len()];
        if j == 0 {
            o.iter_mut().zip(s).for_each(|(a, &v)| *a = v * w);
        } else if j <= rounded {
            o.iter_mut().zip(s).for_each(|(a, &v)| *a += v * w);
        } else {
            o.iter_mut()
                .zip(s)
                .for_each(|(a, &v)| *a = v.mul_add(w, *a));
        }
    }
    if n == 0 {
        o.fill(0.0);
    }
}

/// AA taps when a scale factor (not a size) is given: PyTorch then uses `1 / scale_factor` as the scale.
fn aa_taps_with_scale(in_size: usize, out_size: usize, scale_factor: f64) -> AxisTaps {
    AxisTaps {
        taps: bicubic_aa_like(in_size, out_size, (1.0 / scale_factor) as f32),
    }
}

/// PIL-style antialiased bicubic taps (A = -0.5, support 2·max(scale, 1), renormalised), PyTorch's f32/f64 mix.
fn bicubic_aa_like(in_size: usize, out_size: usize, scale: f32) -> Vec<(Vec<usize>, Vec<f32>)> {
    const A: f32 = -0.5;
    let filter = |x: f32| {
        let x = x.abs();
        if x < 1.0 {
            cubic1_aa(x, A)
        } else if x < 2.0 {
            cubic2_aa(x, A)
        } else {
            0.0
        }
    };
    let support: f32 = if scale >= 1.0 { 2.0 * scale } else { 2.0 };
    let invscale: f32 = if scale >= 1.0 {
        (1.0 / scale as f64) as f32
    } else {
        1.0
    };
    let max_taps = (support.ceil() as i64) * 2 + 1;
    (0..out_size)
        .map(|i| {
            let center = (scale as f64 * (i as f64 + 0.5)) as f32;
            let xmin = (((center - support) as f64 + 0.5) as i64).max(0);
            let xmax = (((center + support) as f64 + 0.5) as i64).min(in_size as i64);
            let n = (xmax - xmin).clamp(0, max_taps);
            let mut w: Vec<f32> = (0..n)
                .map(|j| {
                    filter(((((j + xmin) as f32 - center) as f64 + 0.5) * invscale as f64) as f32)
                })
                .collect();
            let total: f32 = w.iter().fold(0.0, |acc, &v| acc + v);
            if total != 0.0 {
                w.iter_mut().for_each(|v| *v /= total);
            }
            ((0..n).map(|j| (xmin + j) as usize).collect(), w)
        })
        .collect()
}

struct ResampleOp(Arc<GridResampler>);

impl CustomOp1 for ResampleOp {
    fn name(&self) -> &'static str {
        "dinov2-pos-embed-bicubic"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = cpu_slice(s, l)?;
        let (n, d) = l.shape().dims2()?;
        let r = &self.0;
        if n != r.in_h * r.in_w {
            candle_core::bail!("pos-embed grid has {n} rows, expected {}", r.in_h * r.in_w);
        }
        let out = r.forward_cpu(src, d);
        Ok((CpuStorage::F32(out), Shape::from((r.out_h * r.out_w, d))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.0
            .apply_transposed(g)
            .map(Some)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}

/// Resamples a `[1, 1 + M², D]` position table for an input of `pixel_h × pixel_w` pixels with an
/// `h × w` patch grid, exactly as the official `interpolate_pos_encoding` (including its shortcut: the
/// table is returned unchanged when the image is square and the patch count equals `M²`).
///
/// `cache` keeps the resampling taps per grid size for the next call ([`ResamplerCache`]).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use dinov2_model::pos_embed::{interpolate_pos_embed, ResamplerCache};
/// use dinov2_model::VitConfig;
/// # fn main() -> dinov2_model::Result<()> {
/// let dev = Device::Cpu;
/// let mode = VitConfig::vit_small().interpolation;
/// // A 2 x 2 table (M = 2) with a class row of 7s and patch rows of 1s.
/// let pos = Tensor::cat(&[Tensor::full(7f32, (1, 1, 8), &dev)?, Tensor::ones((1, 4, 8), DType::F32, &dev)?], 1)?;
/// let same = interpolate_pos_embed(&pos, (2, 2), (28, 28), mode, None)?;
/// assert_eq!(same.dims(), &[1, 5, 8]); // the official shortcut: returned as is
/// let cache = ResamplerCache::default();
/// let wide = interpolate_pos_embed(&pos, (2, 3), (28, 42), mode, Some(&cache))?;
/// assert_eq!(wide.dims(), &[1, 1 + 6, 8]);
/// assert_eq!(wide.narrow(1, 0, 1)?.flatten_all()?.to_vec1::<f32>()?, [7.0; 8]); // class row untouched
/// let bad = Tensor::zeros((1, 6, 8), DType::F32, &dev)?; // 5 patch rows: not a square grid
/// assert!(interpolate_pos_embed(&bad, (2, 2), (28, 28), mode, None).is_err());
/// # Ok(()) }
/// ```
pub fn interpolate_pos_embed(
    pos_embed: &Tensor,
    grid: (usize, usize),
    pixels: (usize, usize),
    mode: PosEmbedInterpolation,
    cache: Option<&ResamplerCache>,
) -> Result<Tensor> {
    let (one, rows, _) = pos_embed.dims3()?;
    let m = ((rows.saturating_sub(1)) as f64).sqrt() as usize;
    if one != 1 || m * m + 1 != rows {
        return Err(Error::invalid(
            "pos_embed",
            format!("shape {:?} is not [1, 1 + M², D]", pos_embed.dims()),
        ));
    }
    let (h, w) = grid;
    if h * w == m * m && pixels.0 == pixels.1 {
        return Ok(pos_embed.clone());
    }
    let resampler = match cache {
        Some(c) => c.get(m, h, w, mode)?,
        None => Arc::new(GridResampler::new(m, h, w, mode)?),
    };
    let class_pos = pos_embed.narrow(1, 0, 1)?;
    let table = pos_embed.narrow(1, 1, m * m)?.squeeze(0)?;
    let resampled = resampler.apply(&table)?.unsqueeze(0)?;
    let out = Tensor::cat(&[&class_pos.to_dtype(resampled.dtype())?, &resampled], 1)?;
    Ok(out.to_dtype(pos_embed.dtype())?)
}

/// Cache key: (M, h, w, offset bits, antialias).
type ResamplerKey = (usize, usize, usize, u64, bool);

/// Cache of resamplers per (M, h, w, mode): the taps are computed once per grid size.
///
/// ```
/// use std::sync::Arc;
/// use dinov2_model::{pos_embed::ResamplerCache, VitConfig};
/// # fn main() -> dinov2_model::Result<()> {
/// let cache = ResamplerCache::default();
/// let mode = VitConfig::vit_small().interpolation;
/// let first = cache.get(37, 16, 16, mode)?;
/// assert!(Arc::ptr_eq(&first, &cache.get(37, 16, 16, mode)?)); // computed once
/// assert!(!Arc::ptr_eq(&first, &cache.get(37, 16, 20, mode)?)); // another grid, another resampler
/// # Ok(()) }
/// ```
#[derive(Debug, Default)]
pub struct ResamplerCache {
    map: Mutex<HashMap<ResamplerKey, Arc<GridResampler>>>,
}

impl ResamplerCache {
    /// The resampler for this grid size, computed on first use (errors as [`GridResampler::new`]).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use candle_core::{DType, Device, Tensor};
    /// use dinov2_model::{pos_embed::ResamplerCache, VitConfig};
    /// # fn main() -> dinov2_model::Result<()> {
    /// let cache = ResamplerCache::default();
    /// let mode = VitConfig::vit_small().with_registers(4).interpolation;
    /// let r = cache.get(4, 2, 3, mode)?; // a 4 x 4 grid → 2 x 3
    /// assert_eq!(r.apply(&Tensor::zeros((16, 8), DType::F32, &Device::Cpu)?)?.dims(), &[6, 8]);
    /// assert!(cache.get(4, 0, 3, mode).is_err());
    /// # Ok(()) }
    /// ```
    pub fn get(
        &self,
        m: usize,
        h: usize,
        w: usize,
        mode: PosEmbedInterpolation,
    ) -> Result<Arc<GridResampler>> {
        let key = (m, h, w, mode.offset.to_bits(), mode.antialias);
        if let Ok(map) = self.map.lock() {
            if let Some(r) = map.get(&key) {
                return Ok(r.clone());
            }
        }
        let r = Arc::new(GridResampler::new(m, h, w, mode)?);
        if let Ok(mut map) = self.map.lock() {
            map.insert(key, r.clone());
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFFSET: PosEmbedInterpolation = PosEmbedInterpolation {
        offset: 0.1,
        antialias: false,
    };
    const AA: PosEmbedInterpolation = PosEmbedInterpolation {
        offset: 0.0,
        antialias: true,
    };

    #[test]
    fn taps_sum_to_one() {
        for (m, n) in [(37, 16), (37, 7), (4, 9), (37, 74), (37, 1)] {
            for t in [
                bicubic_taps(m, n, Some((n as f64 + 0.1) / m as f64)),
                bicubic_aa_taps(m, n),
            ] {
                for (_, w) in &t.taps {
                    let s: f32 = w.iter().sum();
                    assert!((s - 1.0).abs() < 1e-5, "{m}->{n}: weights sum to {s}");
                }
            }
        }
    }

    #[test]
    fn cpu_kernel_equals_matrix_form_and_backward_is_its_transpose() -> Result<()> {
        for mode in [OFFSET, AA] {
            for (h, w) in [(16, 16), (5, 9), (40, 30), (1, 1)] {
                let r = Arc::new(GridResampler::new(6, h, w, mode)?);
                let grid = crate::testutil::seeded((36, 3), 1);
                let a = r.apply(&grid)?;
                let b = r.apply_matrices(&grid)?;
                let diff = (a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(diff < 1e-5, "{mode:?} {h}x{w}: {diff}");
                // <A g, c> == <g, Aᵀ c>
                let c = crate::testutil::seeded((h * w, 3), 2);
                let lhs = (b * &c)?.sum_all()?.to_scalar::<f32>()?;
                let rhs = (grid * r.apply_transposed(&c)?)?
                    .sum_all()?
                    .to_scalar::<f32>()?;
                assert!(
                    (lhs - rhs).abs() < 1e-3 * lhs.abs().max(1.0),
                    "{lhs} vs {rhs}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn dispatched_and_portable_kernels_agree_bitwise() -> Result<()> {
        // The AVX2+FMA build and the portable build must give the same bits (fused steps are exact `mul_add`s).
        let grid = crate::testutil::seeded((37 * 37, 5), 3);
        let src = grid.flatten_all()?.to_vec1::<f32>()?;
        for mode in [OFFSET, AA] {
            for (h, w) in [(16, 16), (74, 5), (7, 40)] {
                let r = GridResampler::new(37, h, w, mode)?;
                let a = r.forward_cpu(&src, 5);
                let b = r.forward_portable(&src, 5);
                assert!(
                    a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{mode:?} {h}x{w}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn aa_sum_follows_the_four_lane_reduction() {
        // Independent check of the summation rule: with n taps, additions 1..=4*floor((n-1)/4) add a rounded
        // product, later ones are fused (computed here in f64, where the product of two f32 is exact, then
        // rounded once). 256 random lanes per tap count, so the rule is told apart from "all rounded" and "all
        // fused" (asserted below, so the test cannot pass vacuously).
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 40) as f32) / (1u64 << 23) as f32 - 1.0
        };
        let lanes = 256;
        let rows: Vec<Vec<f32>> = (0..11)
            .map(|_| (0..lanes).map(|_| next()).collect())
            .collect();
        let w: Vec<f32> = (0..11).map(|_| next()).collect();
        let fused = |acc: f32, v: f32, w: f32| (v as f64 * w as f64 + acc as f64) as f32;
        for n in 1..=11 {
            let mut o = vec![0f32; lanes];
            sum_aa(
                &mut o,
                rows[..n]
                    .iter()
                    .map(|r| r.as_slice())
                    .zip(w[..n].iter().copied()),
            );
            let (mut rule_differs_from_rounded, mut rule_differs_from_fused) = (false, false);
            for (k, &got) in o.iter().enumerate() {
                let (mut want, mut rounded, mut all_fused) = (rows[0][k] * w[0], 0f32, 0f32);
                rounded += want;
                all_fused += want;
                for j in 1..n {
                    let v = rows[j][k];
                    want = if j <= (n - 1) / 4 * 4 {
                        want + v * w[j]
                    } else {
                        fused(want, v, w[j])
                    };
                    rounded += v * w[j];
                    all_fused = fused(all_fused, v, w[j]);
                }
                assert_eq!(got.to_bits(), want.to_bits(), "{n} taps, lane {k}");
                rule_differs_from_rounded |= want.to_bits() != rounded.to_bits();
                rule_differs_from_fused |= want.to_bits() != all_fused.to_bits();
            }
            assert_eq!(
                rule_differs_from_rounded,
                n >= 2 && (n - 1) % 4 != 0,
                "{n} taps"
            );
            assert_eq!(rule_differs_from_fused, n >= 5, "{n} taps");
        }
    }

    #[test]
    fn gradient_flows_through_resampling() -> Result<()> {
        let var = candle_core::Var::from_tensor(&crate::testutil::seeded((1, 17, 4), 4))?;
        let out = interpolate_pos_embed(var.as_tensor(), (3, 5), (42, 70), OFFSET, None)?;
        let grads = out.sqr()?.sum_all()?.backward()?;
        let g = grads
            .get(var.as_tensor())
            .expect("pos_embed receives a gradient");
        assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        Ok(())
    }

    #[test]
    fn square_shortcut_returns_the_table() -> Result<()> {
        let t = crate::testutil::seeded((1, 17, 4), 5);
        let out = interpolate_pos_embed(&t, (4, 4), (56, 56), OFFSET, None)?;
        assert_eq!((out - &t)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        // Same patch count but not square: resampled.
        let r = interpolate_pos_embed(&t, (2, 8), (28, 112), OFFSET, None)?;
        assert_eq!(r.dims(), &[1, 17, 4]);
        Ok(())
    }
}
