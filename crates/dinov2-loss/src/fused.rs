//! Fused CPU kernels for the hot spots at K = 65536 (the composed candle graph makes 5–10 single-threaded
//! passes over `[rows, K]` per op; these make one or two, parallel over rows).
//!
//! Each kernel is a candle custom op **with** a backward (`CustomOp2::bwd`), so it stays on the autograd
//! graph; inputs on other devices or in other dtypes take the composed differentiable path instead. The
//! composed and fused paths are checked against each other (and the fixtures) in the tests.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Whether the fused CPU kernels apply to tensors of this dtype/device.
pub(crate) fn fused_ok(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

fn contiguous<'a, T>(v: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("fused kernel: input must be contiguous"),
    }
}

/// Element types of the kernels: f32 uses a vectorisable exp (Cephes polynomial, ≤ 2 ulp on the
/// non-positive arguments used here), f64 the libm one. Sums are accumulated in f64.
pub(crate) trait Real: Copy + Send + Sync + 'static {
    fn to64(self) -> f64;
    fn from64(v: f64) -> Self;
    /// `exp(x)` for `x <= 0` (results below ~1e-38 flush to 0 or a tiny normal).
    fn exp_nonpos(x: Self) -> Self;
    fn rsub(self, o: Self) -> Self;
    fn rmul(self, o: Self) -> Self;
    fn rmax(self, o: Self) -> Self;
    const NEG_INF: Self;
    fn wrap(v: Vec<Self>) -> CpuStorage;
    /// `x · Φ(x)` with the exact erf, computed exactly as candle's `gelu_erf` (same libm call, same
    /// operation order), so the values are bit-identical.
    fn gelu(self) -> Self;
}

#[inline(always)]
fn expf_nonpos(x: f32) -> f32 {
    // Cephes expf: x = n·ln2 + r, |r| <= ln2/2, exp(r) by a degree-7 polynomial, 2^n by exponent bits.
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0; // 1.5·2^23: round-to-nearest by addition
    let x = x.max(-87.0);
    let n = (x * LOG2E + MAGIC) - MAGIC;
    let r = x - n * C1 - n * C2;
    let r2 = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * r2 + r + 1.0;
    let bits = ((n as i32 + 127) as u32) << 23;
    y * f32::from_bits(bits)
}

impl Real for f32 {
    fn to64(self) -> f64 {
        self as f64
    }
    fn from64(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn exp_nonpos(x: Self) -> Self {
        expf_nonpos(x)
    }
    fn rsub(self, o: Self) -> Self {
        self - o
    }
    fn rmul(self, o: Self) -> Self {
        self * o
    }
    fn rmax(self, o: Self) -> Self {
        f32::max(self, o)
    }
    const NEG_INF: Self = f32::NEG_INFINITY;
    fn wrap(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(v)
    }
    fn gelu(self) -> Self {
        (libm::erff(self * std::f32::consts::FRAC_1_SQRT_2) + 1.) * 0.5 * self
    }
}

impl Real for f64 {
    fn to64(self) -> f64 {
        self
    }
    fn from64(v: f64) -> Self {
        v
    }
    fn exp_nonpos(x: Self) -> Self {
        x.exp()
    }
    fn rsub(self, o: Self) -> Self {
        self - o
    }
    fn rmul(self, o: Self) -> Self {
        self * o
    }
    fn rmax(self, o: Self) -> Self {
        f64::max(self, o)
    }
    const NEG_INF: Self = f64::NEG_INFINITY;
    fn wrap(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F64(v)
    }
    fn gelu(self) -> Self {
        (libm::erf(self * std::f64::consts::FRAC_1_SQRT_2) + 1.) * 0.5 * self
    }
}

fn row_max<T: Real>(x: &[T]) -> T {
    x.iter().fold(T::NEG_INF, |m, &v| m.rmax(v))
}

/// Σ_k exp((x_k − m)·inv) in f64, chunked so the f32 exp vectorises.
fn sum_exp<T: Real>(x: &[T], m: T, inv: T) -> f64 {
    let mut acc = 0f64;
    for c in x.chunks(256) {
        let mut part = 0f64;
        for &v in c {
            part += T::exp_nonpos(v.rsub(m).rmul(inv)).to64();
        }
        acc += part;
    }
    acc
}

// ---------------------------------------------------------------------------------------------------
// soft cross-entropy: ce_r = Σ_k t_rk · log_softmax(s_r / τ)_k

struct SoftCe {
    temp: f64,
}

fn soft_ce_fwd<T: Real>(s: &[T], t: &[T], k: usize, temp: f64) -> Vec<T> {
    let inv = 1.0 / temp;
    s.par_chunks(k)
        .zip(t.par_chunks(k))
        .map(|(s, t)| {
            let m = row_max(s);
            let se = sum_exp(s, m, T::from64(inv));
            let (mut st, mut ts) = (0f64, 0f64);
            for (&x, &y) in s.iter().zip(t) {
                st += y.to64() * x.to64();
                ts += y.to64();
            }
            let lse = m.to64() * inv + se.ln();
            T::from64(st * inv - lse * ts)
        })
        .collect()
}

impl CustomOp2 for SoftCe {
    fn name(&self) -> &'static str {
        "dinov2-soft-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        ls: &Layout,
        t: &CpuStorage,
        lt: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = ls.shape().dims();
        if dims.len() != 2 || lt.shape().dims() != dims {
            bail!("soft cross-entropy expects equal [R, K] inputs");
        }
        let k = dims[1];
        let out = match (s, t) {
            (CpuStorage::F32(s), CpuStorage::F32(t)) => f32::wrap(soft_ce_fwd(
                contiguous(s, ls)?,
                contiguous(t, lt)?,
                k,
                self.temp,
            )),
            (CpuStorage::F64(s), CpuStorage::F64(t)) => f64::wrap(soft_ce_fwd(
                contiguous(s, ls)?,
                contiguous(t, lt)?,
                k,
                self.temp,
            )),
            _ => bail!("soft cross-entropy: f32 or f64 inputs of one dtype"),
        };
        Ok((out, Shape::from_dims(&[dims[0]])))
    }

    fn bwd(
        &self,
        s: &Tensor,
        t: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let gs = s.apply_op3_no_bwd(t, &grad.contiguous()?, &SoftCeGrad { temp: self.temp })?;
        Ok((Some(gs), None))
    }
}

/// d ce_r / d s_rk = (t_rk − softmax(s_r/τ)_k · Σ_j t_rj) / τ, times the upstream g_r.
struct SoftCeGrad {
    temp: f64,
}

fn soft_ce_bwd<T: Real>(s: &[T], t: &[T], g: &[T], k: usize, temp: f64) -> Vec<T> {
    let inv = 1.0 / temp;
    let mut out = vec![T::from64(0.0); s.len()];
    out.par_chunks_mut(k)
        .zip(s.par_chunks(k).zip(t.par_chunks(k)))
        .zip(g.par_iter())
        .for_each(|((o, (s, t)), &g)| {
            let m = row_max(s);
            let invt = T::from64(inv);
            let se = sum_exp(s, m, invt);
            let ts: f64 = t.iter().map(|v| v.to64()).sum();
            let a = T::from64(g.to64() * inv); // g/τ
            let b = T::from64(g.to64() * inv * ts / se); // g/τ · Σt / Σexp
            for ((o, &x), &y) in o.iter_mut().zip(s).zip(t) {
                let e = T::exp_nonpos(x.rsub(m).rmul(invt));
                *o = a.rmul(y).rsub(b.rmul(e));
            }
        });
    out
}

impl CustomOp3 for SoftCeGrad {
    fn name(&self) -> &'static str {
        "dinov2-soft-cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        ls: &Layout,
        t: &CpuStorage,
        lt: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = ls.shape().dims().to_vec();
        let k = dims[1];
        let out = match (s, t, g) {
            (CpuStorage::F32(s), CpuStorage::F32(t), CpuStorage::F32(g)) => f32::wrap(soft_ce_bwd(
                contiguous(s, ls)?,
                contiguous(t, lt)?,
                contiguous(g, lg)?,
                k,
                self.temp,
            )),
            (CpuStorage::F64(s), CpuStorage::F64(t), CpuStorage::F64(g)) => f64::wrap(soft_ce_bwd(
                contiguous(s, ls)?,
                contiguous(t, lt)?,
                contiguous(g, lg)?,
                k,
                self.temp,
            )),
            _ => bail!("soft cross-entropy grad: dtype mismatch"),
        };
        Ok((out, Shape::from_dims(&dims)))
    }
}

/// Per-row `Σ_k t_k · log_softmax(s / temp)_k` for contiguous-able `[R, K]` f32/f64 CPU tensors of one
/// dtype; differentiable in `s` (`t` gets no gradient).
pub(crate) fn soft_ce_rows(s: &Tensor, t: &Tensor, temp: f64) -> candle_core::Result<Tensor> {
    s.contiguous()?
        .apply_op2(&t.detach().contiguous()?, SoftCe { temp })
}

// ---------------------------------------------------------------------------------------------------
// teacher targets: softmax((t − c) / τ) over the last dim, no gradient

struct CenteredSoftmax {
    temp: f64,
}

fn centered_softmax_rows<T: Real>(t: &[T], c: &[T], k: usize, temp: f64) -> Vec<T> {
    let inv = T::from64(1.0 / temp);
    let mut out = vec![T::from64(0.0); t.len()];
    out.par_chunks_mut(k)
        .zip(t.par_chunks(k))
        .for_each(|(o, row)| {
            // torch: (t - c) / temp, then softmax (max-subtracted)
            for ((o, &x), &cc) in o.iter_mut().zip(row).zip(c) {
                *o = x.rsub(cc).rmul(inv);
            }
            let m = row_max(o);
            let mut sum = 0f64;
            for c in o.chunks_mut(256) {
                let mut part = 0f64;
                for v in c.iter_mut() {
                    *v = T::exp_nonpos(v.rsub(m));
                    part += v.to64();
                }
                sum += part;
            }
            let s = T::from64(1.0 / sum);
            for v in o.iter_mut() {
                *v = v.rmul(s);
            }
        });
    out
}

impl CustomOp2 for CenteredSoftmax {
    fn name(&self) -> &'static str {
        "dinov2-centered-softmax"
    }

    fn cpu_fwd(
        &self,
        t: &CpuStorage,
        lt: &Layout,
        c: &CpuStorage,
        lc: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = lt.shape().dims();
        if dims.len() != 2 || lc.shape().elem_count() != dims[1] {
            bail!("centered softmax expects t [R, K] and a centre of K entries");
        }
        let k = dims[1];
        let out = match (t, c) {
            (CpuStorage::F32(t), CpuStorage::F32(c)) => f32::wrap(centered_softmax_rows(
                contiguous(t, lt)?,
                contiguous(c, lc)?,
                k,
                self.temp,
            )),
            (CpuStorage::F64(t), CpuStorage::F64(c)) => f64::wrap(centered_softmax_rows(
                contiguous(t, lt)?,
                contiguous(c, lc)?,
                k,
                self.temp,
            )),
            _ => bail!("centered softmax: f32 or f64 inputs of one dtype"),
        };
        Ok((out, Shape::from_dims(dims)))
    }
}

/// `softmax((t - c) / temp)` rows for `[R, K]` `t` and a `K`-entry centre `c` (f32/f64 CPU), no gradient.
pub(crate) fn centered_softmax(t: &Tensor, c: &Tensor, temp: f64) -> candle_core::Result<Tensor> {
    let c = c.to_dtype(t.dtype())?.contiguous()?;
    t.detach()
        .contiguous()?
        .apply_op2_no_bwd(&c, &CenteredSoftmax { temp })
}

// ---------------------------------------------------------------------------------------------------
// column sums (centre statistics), f64 accumulation, no gradient

struct ColSum;

fn col_sum_rows<T: Real>(t: &[T], k: usize) -> Vec<T> {
    const BLOCK: usize = 1024;
    let rows = t.len().checked_div(k).unwrap_or(0);
    let mut out = vec![T::from64(0.0); k];
    out.par_chunks_mut(BLOCK).enumerate().for_each(|(bi, o)| {
        let c0 = bi * BLOCK;
        let mut acc = vec![0f64; o.len()];
        for r in 0..rows {
            let row = &t[r * k + c0..r * k + c0 + o.len()];
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += v.to64();
            }
        }
        for (o, a) in o.iter_mut().zip(acc) {
            *o = T::from64(a);
        }
    });
    out
}

impl candle_core::CustomOp1 for ColSum {
    fn name(&self) -> &'static str {
        "dinov2-column-sum"
    }

    fn cpu_fwd(&self, t: &CpuStorage, lt: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = lt.shape().dims();
        if dims.len() != 2 {
            bail!("column sum expects [R, K]");
        }
        let k = dims[1];
        let out = match t {
            CpuStorage::F32(t) => f32::wrap(col_sum_rows(contiguous(t, lt)?, k)),
            CpuStorage::F64(t) => f64::wrap(col_sum_rows(contiguous(t, lt)?, k)),
            _ => bail!("column sum: f32 or f64"),
        };
        Ok((out, Shape::from_dims(&[1, k])))
    }
}

/// `t.sum_keepdim(0)` for `[R, K]` (f32/f64 CPU), parallel, f64 accumulation, no gradient.
pub(crate) fn col_sum(t: &Tensor) -> candle_core::Result<Tensor> {
    t.detach().contiguous()?.apply_op1_no_bwd(&ColSum)
}

// ---------------------------------------------------------------------------------------------------
// weight norm: W = g · v / ‖v‖_row, produced transposed (Wᵀ [b, K]) so `h · Wᵀ` needs no transpose node

struct WeightNormT;

const WN_BLOCK: usize = 64;

fn row_scales<T: Real>(v: &[T], g: &[T], b: usize) -> Vec<f64> {
    v.par_chunks(b)
        .zip(g.par_iter())
        .map(|(v, &g)| g.to64() / v.iter().map(|x| x.to64() * x.to64()).sum::<f64>().sqrt())
        .collect()
}

fn wn_t_fwd<T: Real>(v: &[T], g: &[T], b: usize) -> Vec<T> {
    let k = g.len();
    let s = row_scales(v, g, b);
    let mut out = vec![T::from64(0.0); v.len()];
    // tasks own WN_BLOCK consecutive rows j of Wᵀ and read v[k][j0..j0+WN_BLOCK] (one cache line per k)
    out.par_chunks_mut(WN_BLOCK * k)
        .enumerate()
        .for_each(|(jb, o)| {
            let j0 = jb * WN_BLOCK;
            let nj = o.len() / k;
            for (kk, &sk) in s.iter().enumerate() {
                let sk = T::from64(sk);
                let vrow = &v[kk * b + j0..kk * b + j0 + nj];
                for (jj, &x) in vrow.iter().enumerate() {
                    o[jj * k + kk] = x.rmul(sk);
                }
            }
        });
    out
}

impl CustomOp2 for WeightNormT {
    fn name(&self) -> &'static str {
        "dinov2-weight-norm-t"
    }

    fn cpu_fwd(
        &self,
        v: &CpuStorage,
        lv: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = lv.shape().dims().to_vec();
        if dims.len() != 2 || lg.shape().elem_count() != dims[0] {
            bail!("weight norm expects v [K, b] and g [K, 1]");
        }
        let (k, b) = (dims[0], dims[1]);
        let out = match (v, g) {
            (CpuStorage::F32(v), CpuStorage::F32(g)) => {
                f32::wrap(wn_t_fwd(contiguous(v, lv)?, contiguous(g, lg)?, b))
            }
            (CpuStorage::F64(v), CpuStorage::F64(g)) => {
                f64::wrap(wn_t_fwd(contiguous(v, lv)?, contiguous(g, lg)?, b))
            }
            _ => bail!("weight norm: f32 or f64 inputs of one dtype"),
        };
        Ok((out, Shape::from_dims(&[b, k])))
    }

    fn bwd(
        &self,
        v: &Tensor,
        g: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // gWᵀ: [b, K]. With n = ‖v_k‖ and a_k = Σ_j gW_kj v_kj:
        //   dg_k = a_k / n,   dv_kj = (g_k / n) · (gW_kj − v_kj · a_k / n²)
        let both = v.apply_op3_no_bwd(g, &grad.contiguous()?, &WeightNormGradT)?;
        let (_, b) = v.dims2()?;
        let dv = both.narrow(1, 0, b)?.contiguous()?;
        let dg = both.narrow(1, b, 1)?.contiguous()?.reshape(g.shape())?;
        Ok((Some(dv), Some(dg)))
    }
}

/// Output `[K, b + 1]`: `dv` in the first `b` columns, `dg` in the last; reads gWᵀ in k-blocks.
struct WeightNormGradT;

fn wn_t_bwd<T: Real>(v: &[T], g: &[T], gwt: &[T], b: usize) -> Vec<T> {
    let k = g.len();
    let mut out = vec![T::from64(0.0); k * (b + 1)];
    out.par_chunks_mut(WN_BLOCK * (b + 1))
        .enumerate()
        .for_each(|(kb, o)| {
            let k0 = kb * WN_BLOCK;
            let nk = o.len() / (b + 1);
            // tile[kk][j] = gWᵀ[j][k0 + kk]
            let mut tile = vec![T::from64(0.0); nk * b];
            for j in 0..b {
                let src = &gwt[j * k + k0..j * k + k0 + nk];
                for (kk, &x) in src.iter().enumerate() {
                    tile[kk * b + j] = x;
                }
            }
            for kk in 0..nk {
                let kg = k0 + kk;
                let vrow = &v[kg * b..(kg + 1) * b];
                let grow = &tile[kk * b..(kk + 1) * b];
                let (mut n2, mut a) = (0f64, 0f64);
                for (&x, &d) in vrow.iter().zip(grow) {
                    n2 += x.to64() * x.to64();
                    a += x.to64() * d.to64();
                }
                let n = n2.sqrt();
                let s = T::from64(g[kg].to64() / n);
                let c = T::from64(a / n2);
                let orow = &mut o[kk * (b + 1)..(kk + 1) * (b + 1)];
                for ((o, &x), &d) in orow.iter_mut().zip(vrow).zip(grow) {
                    *o = s.rmul(d.rsub(x.rmul(c)));
                }
                orow[b] = T::from64(a / n);
            }
        });
    out
}

impl CustomOp3 for WeightNormGradT {
    fn name(&self) -> &'static str {
        "dinov2-weight-norm-t-grad"
    }

    fn cpu_fwd(
        &self,
        v: &CpuStorage,
        lv: &Layout,
        g: &CpuStorage,
        lg: &Layout,
        gw: &CpuStorage,
        lw: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = lv.shape().dims();
        let (k, b) = (dims[0], dims[1]);
        let out = match (v, g, gw) {
            (CpuStorage::F32(v), CpuStorage::F32(g), CpuStorage::F32(w)) => f32::wrap(wn_t_bwd(
                contiguous(v, lv)?,
                contiguous(g, lg)?,
                contiguous(w, lw)?,
                b,
            )),
            (CpuStorage::F64(v), CpuStorage::F64(g), CpuStorage::F64(w)) => f64::wrap(wn_t_bwd(
                contiguous(v, lv)?,
                contiguous(g, lg)?,
                contiguous(w, lw)?,
                b,
            )),
            _ => bail!("weight norm grad: dtype mismatch"),
        };
        Ok((out, Shape::from_dims(&[k, b + 1])))
    }
}

/// `Wᵀ = (g · v / ‖v‖_row)ᵀ`, `[b, K]`, for `v [K, b]`, `g [K, 1]` (f32/f64 CPU), differentiable in both.
pub(crate) fn weight_norm_t(v: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
    v.contiguous()?.apply_op2(&g.contiguous()?, WeightNormT)
}

// ---------------------------------------------------------------------------------------------------
// GELU (erf form) with an exact backward

/// `gelu_erf` whose backward uses the exact `1/√(2π)`: candle's own `gelu_erf` backward writes it as
/// `0.398942`, a relative error of 7·10⁻⁷ in the `x·φ(x)` term of every GELU derivative, which is what
/// made the f64 gradient check of the head fail at a 10⁻⁶ tolerance. The forward is candle's, bit for bit.
struct GeluErf;

fn gelu_fwd<T: Real>(x: &[T]) -> Vec<T> {
    x.par_chunks(4096)
        .flat_map_iter(|c| c.iter().map(|&v| v.gelu()))
        .collect()
}

impl candle_core::CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "dinov2-gelu-erf"
    }

    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match x {
            CpuStorage::F32(x) => f32::wrap(gelu_fwd(contiguous(x, lx)?)),
            CpuStorage::F64(x) => f64::wrap(gelu_fwd(contiguous(x, lx)?)),
            _ => bail!("gelu: f32 or f64"),
        };
        Ok((out, lx.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &GeluGrad)?))
    }
}

/// `grad · (Φ(x) + x·φ(x))`, computed in f64.
struct GeluGrad;

fn gelu_bwd<T: Real>(x: &[T], g: &[T]) -> Vec<T> {
    const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7; // 1/√(2π)
    x.par_chunks(4096)
        .zip(g.par_chunks(4096))
        .flat_map_iter(|(x, g)| {
            x.iter().zip(g).map(|(&x, &g)| {
                let x = x.to64();
                let cdf = 0.5 * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2));
                let pdf = INV_SQRT_2PI * (-0.5 * x * x).exp();
                T::from64(g.to64() * (cdf + x * pdf))
            })
        })
        .collect()
}

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "dinov2-gelu-erf-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match (x, g) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => {
                f32::wrap(gelu_bwd(contiguous(x, lx)?, contiguous(g, lg)?))
            }
            (CpuStorage::F64(x), CpuStorage::F64(g)) => {
                f64::wrap(gelu_bwd(contiguous(x, lx)?, contiguous(g, lg)?))
            }
            _ => bail!("gelu grad: f32 or f64 inputs of one dtype"),
        };
        Ok((out, lx.shape().clone()))
    }
}

/// `x · Φ(x)` (exact-erf GELU) for f32/f64 CPU tensors, differentiable with the exact derivative.
pub(crate) fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(GeluErf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{sum_error, SeededRng, U32, U64};
    use candle_core::{Var, D};

    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        let flat = |t: &Tensor| -> Vec<f64> {
            let t = t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
            t.to_vec1().unwrap()
        };
        let (a, b) = (flat(a), flat(b));
        let scale = b.iter().fold(1e-30f64, |m, v| m.max(v.abs()));
        a.iter()
            .zip(&b)
            .fold(0f64, |m, (x, y)| m.max((x - y).abs()))
            / scale
    }

    #[test]
    fn fast_expf_is_accurate_on_nonpositive_arguments() {
        let mut worst = 0f64;
        for i in 0..200_000 {
            let x = -(i as f32) * 4.35e-4; // [0, -87]
            let got = expf_nonpos(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
        }
        // the Cephes polynomial is within 2 ulp of exp, plus the final rounding: 3 ulp = 3·2u
        assert!(worst <= 6.0 * U32, "relative error {worst:e}");
    }

    /// The fused kernels against the composed candle graphs, values and gradients, f32 and f64.
    ///
    /// Both sides compute the same formulas and differ only in rounding: the kernels accumulate their
    /// length-`n` sums in f64, candle's ops sum in the tensor dtype, and either side rounds each element
    /// a few more times around the sums. A length-`n` sum is off by at most [`sum_error`]`(n, u)`
    /// (relative, no cancellation here: the summed terms share a sign or the result is normalised by
    /// them), so the two sides differ by at most twice that; the factor 2 more covers the few
    /// element-wise roundings (≤ 8 per element on either side, i.e. ≤ √8·6u ≪ one sum's bound).
    #[test]
    fn fused_equals_composed() {
        let mut rng = SeededRng::new(0x5eed_f05e);
        let (rows, k, b) = (5, 700, 70);
        for (dt, u) in [(DType::F32, U32), (DType::F64, U64)] {
            let tol = |n: usize| 4.0 * sum_error(n, u);
            let s = Var::from_tensor(&rng.normal(&[rows, k], 0.0, 2.0, dt)).unwrap();
            let t = rng.softmax_rows(&[rows, k], dt);
            let t = (&t * 3.0).unwrap(); // several teacher rows summed, as the packed loss does
            let w = rng.normal(&[rows], 0.0, 1.0, dt);
            let fused = soft_ce_rows(s.as_tensor(), &t, 0.1).unwrap();
            let composed = crate::ops::soft_cross_entropy_composed(&t, s.as_tensor(), 0.1).unwrap();
            let e = max_rel(&fused, &composed);
            assert!(e <= tol(k), "{dt:?} soft-ce {e:e} > {:e}", tol(k));
            let gf = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (composed * &w).unwrap();
            let gc = gc.sum_all().unwrap().backward().unwrap();
            let e = max_rel(
                gf.get(s.as_tensor()).unwrap(),
                gc.get(s.as_tensor()).unwrap(),
            );
            assert!(e <= tol(k), "{dt:?} soft-ce grad {e:e} > {:e}", tol(k));

            let c = rng.normal(&[1, k], 0.0, 0.3, DType::F32);
            let x = rng.normal(&[rows, k], 0.0, 0.5, dt);
            let fused = centered_softmax(&x, &c, 0.04).unwrap();
            let shifted = (x.broadcast_sub(&c.to_dtype(dt).unwrap()).unwrap() / 0.04).unwrap();
            let composed = candle_nn::ops::softmax(&shifted, D::Minus1).unwrap();
            let e = max_rel(&fused, &composed);
            assert!(e <= tol(k), "{dt:?} centred softmax {e:e} > {:e}", tol(k));

            let v = Var::from_tensor(&rng.normal(&[130, b], 0.0, 1.0, dt)).unwrap();
            let g = Var::from_tensor(&rng.normal(&[130, 1], 1.0, 0.2, dt)).unwrap();
            let r = rng.normal(&[130, b], 0.0, 1.0, dt);
            let fused = weight_norm_t(v.as_tensor(), g.as_tensor()).unwrap();
            let fused = fused.t().unwrap();
            let norm = v.as_tensor().sqr().unwrap().sum_keepdim(1).unwrap();
            let scale = g.as_tensor().broadcast_div(&norm.sqrt().unwrap()).unwrap();
            let composed = v.as_tensor().broadcast_mul(&scale).unwrap();
            let e = max_rel(&fused, &composed);
            assert!(e <= tol(b), "{dt:?} weight norm {e:e} > {:e}", tol(b));
            let gf = (fused * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (composed * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for p in [&v, &g] {
                let e = max_rel(
                    gf.get(p.as_tensor()).unwrap(),
                    gc.get(p.as_tensor()).unwrap(),
                );
                assert!(e <= tol(b), "{dt:?} weight-norm grad {e:e} > {:e}", tol(b));
            }
        }
    }

    /// The GELU forward is candle's `gelu_erf` bit for bit; its gradient is `Φ(x) + x·φ(x)` evaluated
    /// with candle ops in f64 (a handful of element-wise roundings: ≤ 16 f64 ulps).
    #[test]
    fn gelu_is_candles_forward_with_the_exact_derivative() {
        let mut rng = SeededRng::new(7);
        for dt in [DType::F32, DType::F64] {
            let x = Var::from_tensor(&rng.normal(&[3, 1000], 0.0, 2.0, dt)).unwrap();
            let ours = gelu_erf(x.as_tensor()).unwrap();
            let candle = x.as_tensor().gelu_erf().unwrap();
            assert_eq!(max_rel(&ours, &candle), 0.0, "{dt:?} forward");
            let grad = ours.sum_all().unwrap().backward().unwrap();
            let grad = grad.get(x.as_tensor()).unwrap();
            let x64 = x.as_tensor().to_dtype(DType::F64).unwrap();
            let cdf = (((&x64 * std::f64::consts::FRAC_1_SQRT_2)
                .unwrap()
                .erf()
                .unwrap()
                + 1.0)
                .unwrap()
                * 0.5)
                .unwrap();
            let pdf = ((x64.sqr().unwrap() * -0.5).unwrap().exp().unwrap()
                * (0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2))
                .unwrap();
            let want = (cdf + (&x64 * pdf).unwrap()).unwrap();
            // f32 gradients are rounded once to f32 at the end
            let tol = if dt == DType::F32 { U32 } else { 16.0 * U64 };
            let e = max_rel(grad, &want);
            assert!(e <= tol, "{dt:?} gelu grad {e:e}");
        }
    }
}
