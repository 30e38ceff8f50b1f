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
//! Both are reproduced here with PyTorch's f32 arithmetic, including the places where PyTorch computes an
//! intermediate in f64 before rounding, and the same accumulation order. The forward is a CPU kernel; the
//! backward (and the forward on other devices) is the same linear map written as two matrix products, so
//! training can resize the table every step.

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

fn cubic1(x: f32, a: f32) -> f32 {
    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
}

fn cubic2(x: f32, a: f32) -> f32 {
    ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
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
            let real = scale * (i as f32 + 0.5) - 0.5;
            let index = (real.floor() as i64).min(last);
            let t = (real - index as f32).clamp(0.0, 1.0);
            let x2 = 1.0 - t;
            let w = vec![
                cubic2(t + 1.0, A),
                cubic1(t, A),
                cubic1(x2, A),
                cubic2(x2 + 1.0, A),
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
    /// The resampling the official code applies to an `m × m` table for an `h × w` patch grid.
    pub fn new(m: usize, h: usize, w: usize, mode: PosEmbedInterpolation) -> Result<Self> {
        if m == 0 || h == 0 || w == 0 {
            return Err(Error::invalid(format!(
                "cannot resample a {m}x{m} position grid to {h}x{w}"
            )));
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
                return Err(Error::invalid(format!(
                    "interpolate_offset {} gives a {oh}x{ow} grid instead of {h}x{w}",
                    mode.offset
                )));
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
    pub fn apply(self: &Arc<Self>, grid: &Tensor) -> Result<Tensor> {
        let grid = grid.to_dtype(DType::F32)?;
        if crate::ops::use_cpu_kernel(&grid) {
            Ok(grid
                .contiguous()?
                .apply_op1_arc(Arc::new(Box::new(ResampleOp(self.clone()))))?)
        } else {
            self.apply_matrices(&grid)
        }
    }

    fn matrices(&self, device: &candle_core::Device) -> Result<(Tensor, Tensor)> {
        let ay = Tensor::from_vec(self.rows.matrix(self.in_h), (self.out_h, self.in_h), device)?;
        let ax = Tensor::from_vec(self.cols.matrix(self.in_w), (self.out_w, self.in_w), device)?;
        Ok((ay, ax))
    }

    /// The same linear map as two matrix products (any device; also the backward).
    fn apply_matrices(&self, grid: &Tensor) -> Result<Tensor> {
        let d = grid.dim(1)?;
        let (ay, ax) = self.matrices(grid.device())?;
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
        let (ay, ax) = self.matrices(g.device())?;
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

    fn forward_cpu(&self, src: &[f32], d: usize) -> Vec<f32> {
        let (ih, iw, oh, ow) = (self.in_h, self.in_w, self.out_h, self.out_w);
        let mut out = vec![0f32; oh * ow * d];
        if !self.antialias {
            // upsample_bicubic2d: out = Σ_i wy_i · (Σ_j wx_j · src[y_i, x_j]), height taps outermost.
            let mut inner = vec![0f32; d];
            for (oy, (yi, yw)) in self.rows.taps.iter().enumerate() {
                for (ox, (xi, xw)) in self.cols.taps.iter().enumerate() {
                    let o = &mut out[(oy * ow + ox) * d..(oy * ow + ox + 1) * d];
                    for (ti, (&y, &wy)) in yi.iter().zip(yw.iter()).enumerate() {
                        for (tj, (&x, &wx)) in xi.iter().zip(xw.iter()).enumerate() {
                            let s = &src[(y * iw + x) * d..(y * iw + x + 1) * d];
                            if tj == 0 {
                                inner.iter_mut().zip(s).for_each(|(a, &v)| *a = v * wx);
                            } else {
                                inner.iter_mut().zip(s).for_each(|(a, &v)| *a += v * wx);
                            }
                        }
                        if ti == 0 {
                            o.iter_mut().zip(&inner).for_each(|(a, &v)| *a = v * wy);
                        } else {
                            o.iter_mut().zip(&inner).for_each(|(a, &v)| *a += v * wy);
                        }
                    }
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
                    accumulate(
                        o,
                        xi.iter()
                            .zip(xw)
                            .map(|(&x, &w)| (&src[(y * iw + x) * d..(y * iw + x + 1) * d], w)),
                    );
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
                    accumulate(
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

/// `o = s0·w0; o += s_j·w_j` in order (PyTorch's per-tap accumulation).
fn accumulate<'a>(o: &mut [f32], taps: impl Iterator<Item = (&'a [f32], f32)>) {
    let mut first = true;
    for (s, w) in taps {
        if first {
            o.iter_mut().zip(s).for_each(|(a, &v)| *a = v * w);
            first = false;
        } else {
            o.iter_mut().zip(s).for_each(|(a, &v)| *a += v * w);
        }
    }
    if first {
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
            cubic1(x, A)
        } else if x < 2.0 {
            cubic2(x, A)
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
        return Err(Error::invalid(format!(
            "pos_embed of shape {:?} is not [1, 1 + M², D]",
            pos_embed.dims()
        )));
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
    let out = Tensor::cat(&[&class_pos.to_dtype(DType::F32)?, &resampled], 1)?;
    Ok(out.to_dtype(pos_embed.dtype())?)
}

/// Cache of resamplers per (M, h, w, mode): the taps are computed once per grid size.
#[derive(Debug, Default)]
pub struct ResamplerCache {
    map: Mutex<HashMap<(usize, usize, usize, u64, bool), Arc<GridResampler>>>,
}

impl ResamplerCache {
    /// The resampler for this grid size, computed on first use.
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
    use candle_core::Device;

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
        let dev = Device::Cpu;
        for mode in [OFFSET, AA] {
            for (h, w) in [(16, 16), (5, 9), (40, 30), (1, 1)] {
                let r = Arc::new(GridResampler::new(6, h, w, mode)?);
                let grid = Tensor::randn(0f32, 1.0, (36, 3), &dev)?;
                let a = r.apply(&grid)?;
                let b = r.apply_matrices(&grid)?;
                let diff = (a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(diff < 1e-5, "{mode:?} {h}x{w}: {diff}");
                // <A g, c> == <g, Aᵀ c>
                let c = Tensor::randn(0f32, 1.0, (h * w, 3), &dev)?;
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
    fn gradient_flows_through_resampling() -> Result<()> {
        let dev = Device::Cpu;
        let var = candle_core::Var::randn(0f32, 1.0, (1, 17, 4), &dev)?;
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
        let t = Tensor::randn(0f32, 1.0, (1, 17, 4), &Device::Cpu)?;
        let out = interpolate_pos_embed(&t, (4, 4), (56, 56), OFFSET, None)?;
        assert_eq!((out - &t)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        // Same patch count but not square: resampled.
        let r = interpolate_pos_embed(&t, (2, 8), (28, 112), OFFSET, None)?;
        assert_eq!(r.dims(), &[1, 17, 4]);
        Ok(())
    }
}
