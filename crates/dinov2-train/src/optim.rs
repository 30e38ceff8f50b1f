//! AdamW over the official parameter groups, and per-submodule gradient clipping (`clip_grad_norm_`).
//!
//! The update is PyTorch's `torch.optim.AdamW` (single-tensor / foreach formulation, `eps` 1e-8, no amsgrad),
//! with f32 moments and a per-parameter step count: a parameter without a gradient in a step is skipped
//! entirely (no decay, no moment update, its step count unchanged), as PyTorch does. On the CPU the whole update
//! of a parameter is one fused pass over its memory (decay, both moments, bias corrections, the step).

use std::sync::Mutex;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Device, InplaceOp2, Layout, Tensor, Var};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::param_groups::ParamGroup;

/// AdamW hyper-parameters (`optim.adamw_beta1`, `optim.adamw_beta2`; PyTorch's default `eps`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// 0.9
    pub beta1: f64,
    /// 0.999
    pub beta2: f64,
    /// 1e-8
    pub eps: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// The state of one parameter: f32 moments and the number of steps taken.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamState {
    /// First moment (`exp_avg`).
    pub exp_avg: Vec<f32>,
    /// Second moment (`exp_avg_sq`).
    pub exp_avg_sq: Vec<f32>,
    /// Steps taken (`step`).
    pub step: u64,
}

/// One optimised parameter.
#[derive(Debug)]
pub struct Param {
    /// Its name (`backbone.blocks.0.attn.qkv.weight`, `dino_head.last_layer.weight_g`, ...).
    pub name: String,
    /// The variable.
    pub var: Var,
    /// Its group.
    pub group: ParamGroup,
    /// Its state (`None` before its first step).
    pub state: Option<ParamState>,
}

/// The per-step learning rates and weight decay, before the group multipliers (`apply_optim_scheduler`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepSettings {
    /// Learning rate of every group but the last layers.
    pub lr: f64,
    /// Learning rate of the last layers.
    pub last_layer_lr: f64,
    /// Weight decay.
    pub weight_decay: f64,
}

/// AdamW with per-parameter groups.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use dinov2_train::optim::{AdamW, AdamWConfig, StepSettings};
/// use dinov2_train::param_groups::ParamGroup;
/// let w = Var::new(&[1f32, -2.0], &Device::Cpu)?;
/// let group = ParamGroup { lr_multiplier: 1.0, wd_multiplier: 0.0, is_last_layer: false };
/// let mut opt = AdamW::new(vec![("w".into(), w.clone(), group)], AdamWConfig::default());
/// let loss = w.as_tensor().sqr()?.sum_all()?;
/// let grads = loss.backward()?;
/// opt.step(&grads, &StepSettings { lr: 0.1, last_layer_lr: 0.0, weight_decay: 0.0 }, |_| 1.0)?;
/// // the first Adam step moves every coordinate by lr against the sign of its gradient
/// let v = w.as_tensor().to_vec1::<f32>()?;
/// assert!((v[0] - 0.9).abs() < 1e-6 && (v[1] + 1.9).abs() < 1e-6);
/// assert_eq!(opt.params()[0].state.as_ref().unwrap().step, 1);
/// # Ok::<(), dinov2_train::Error>(())
/// ```
#[derive(Debug)]
pub struct AdamW {
    params: Vec<Param>,
    cfg: AdamWConfig,
}

impl AdamW {
    /// The optimiser over `(name, var, group)` triples (state empty).
    pub fn new(params: Vec<(String, Var, ParamGroup)>, cfg: AdamWConfig) -> Self {
        let params = params
            .into_iter()
            .map(|(name, var, group)| Param {
                name,
                var,
                group,
                state: None,
            })
            .collect();
        Self { params, cfg }
    }

    /// The parameters, in order.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// Mutable access to the parameters (to restore states from a checkpoint).
    pub fn params_mut(&mut self) -> &mut [Param] {
        &mut self.params
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// One step: every parameter with a gradient in `grads` is updated, its gradient first multiplied by
    /// `grad_scale(name)` (the clipping coefficient of its submodule, see [`clip_coefficients`]).
    pub fn step(
        &mut self,
        grads: &GradStore,
        settings: &StepSettings,
        grad_scale: impl Fn(&str) -> f64,
    ) -> Result<()> {
        let cfg = self.cfg;
        for p in &mut self.params {
            let Some(grad) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let base_lr = if p.group.is_last_layer {
                settings.last_layer_lr
            } else {
                settings.lr
            };
            let lr = base_lr * p.group.lr_multiplier;
            let wd = settings.weight_decay * p.group.wd_multiplier;
            let n = p.var.elem_count();
            let state = p.state.get_or_insert_with(|| ParamState {
                exp_avg: vec![0.0; n],
                exp_avg_sq: vec![0.0; n],
                step: 0,
            });
            state.step += 1;
            let step = state.step as i32;
            let bias_correction1 = 1.0 - cfg.beta1.powi(step);
            let bias_correction2 = 1.0 - cfg.beta2.powi(step);
            let kernel = AdamKernel {
                decay: (1.0 - lr * wd) as f32,
                one_minus_beta1: (1.0 - cfg.beta1) as f32,
                beta2: cfg.beta2 as f32,
                one_minus_beta2: (1.0 - cfg.beta2) as f32,
                neg_step_size: (-(lr / bias_correction1)) as f32,
                bias_correction2_sqrt: bias_correction2.sqrt() as f32,
                eps: cfg.eps as f32,
                grad_scale: grad_scale(&p.name) as f32,
                moments: Mutex::new((&mut state.exp_avg, &mut state.exp_avg_sq)),
            };
            apply_update(&p.var, grad, &kernel)?;
        }
        Ok(())
    }
}

fn apply_update(var: &Var, grad: &Tensor, kernel: &AdamKernel<'_>) -> Result<()> {
    if var.dtype() != DType::F32 {
        return Err(Error::InvalidArgument {
            name: "params",
            reason: format!("AdamW updates f32 parameters, got {:?}", var.dtype()),
        });
    }
    let grad = grad.to_dtype(DType::F32)?;
    match var.device() {
        Device::Cpu => Ok(var.as_tensor().inplace_op2(&grad.contiguous()?, kernel)?),
        dev => {
            // other devices: the same arithmetic on the host, then copied back
            let mut p = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            let g = grad.flatten_all()?.to_vec1::<f32>()?;
            let mut guard = kernel.moments.lock().map_err(|_| poisoned())?;
            let (m, v) = &mut *guard;
            kernel.run(&mut p, &g, m, v);
            drop(guard);
            var.set(&Tensor::from_vec(p, var.shape(), dev)?)?;
            Ok(())
        }
    }
}

fn poisoned() -> Error {
    Error::InvalidArgument {
        name: "optimizer",
        reason: "its state lock is poisoned (a previous update panicked)".into(),
    }
}

struct AdamKernel<'a> {
    decay: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    neg_step_size: f32,
    bias_correction2_sqrt: f32,
    eps: f32,
    grad_scale: f32,
    moments: Mutex<(&'a mut Vec<f32>, &'a mut Vec<f32>)>,
}

const CHUNK: usize = 1 << 14;

impl AdamKernel<'_> {
    /// PyTorch's AdamW, element-wise, in its order of f32 operations.
    fn run(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        let k = self;
        p.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
            .for_each(|((p, g), (m, v))| {
                for i in 0..p.len() {
                    let gi = if k.grad_scale == 1.0 {
                        g[i]
                    } else {
                        g[i] * k.grad_scale
                    };
                    let pi = p[i] * k.decay;
                    // lerp(m, g, 1 - beta1) with weight < 0.5: m + w·(g − m)
                    let mi = m[i] + k.one_minus_beta1 * (gi - m[i]);
                    let vi = v[i] * k.beta2 + k.one_minus_beta2 * gi * gi;
                    let denom = vi.sqrt() / k.bias_correction2_sqrt + k.eps;
                    p[i] = pi + k.neg_step_size * (mi / denom);
                    m[i] = mi;
                    v[i] = vi;
                }
            });
    }
}

impl InplaceOp2 for AdamKernel<'_> {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (p, g) = f32_slices("adamw", s1, l1, s2, l2)?;
        let mut guard = self
            .moments
            .lock()
            .map_err(|_| candle_core::Error::Msg("adamw: poisoned state".into()))?;
        let (m, v) = &mut *guard;
        if m.len() != p.len() {
            candle_core::bail!("adamw: parameter and state sizes differ");
        }
        self.run(p, g, m, v);
        Ok(())
    }
}

/// The contiguous f32 data of an in-place op's destination and source, of equal length.
pub(crate) fn f32_slices<'a>(
    op: &str,
    s1: &'a mut CpuStorage,
    l1: &Layout,
    s2: &'a CpuStorage,
    l2: &Layout,
) -> candle_core::Result<(&'a mut [f32], &'a [f32])> {
    let (CpuStorage::F32(a), CpuStorage::F32(b)) = (s1, s2) else {
        candle_core::bail!("{op}: f32 tensors expected");
    };
    let (Some((a0, a1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
    else {
        candle_core::bail!("{op}: contiguous tensors expected");
    };
    if a1 - a0 != b1 - b0 {
        candle_core::bail!("{op}: tensors of {} and {} elements", a1 - a0, b1 - b0);
    }
    Ok((&mut a[a0..a1], &b[b0..b1]))
}

/// The clipping coefficients of `clip_grad_norm_(max_norm)` applied to each submodule separately: for every
/// group of parameters (a submodule), the total L2 norm of their gradients and `min(1, max_norm / (norm +
/// 1e-6))`. Returns `(total_norm, coefficient)` per group, in order.
///
/// ```
/// use candle_core::{Device, Var};
/// use dinov2_train::optim::clip_coefficients;
/// let (a, b) = (Var::new(&[3f32], &Device::Cpu)?, Var::new(&[4f32], &Device::Cpu)?);
/// let grads = (a.as_tensor().sqr()? * 0.5)?.sum_all()?.add(&(b.as_tensor().sqr()? * 0.5)?.sum_all()?)?.backward()?;
/// // one submodule with both: gradients (3, 4), norm 5, clipped to 1
/// let c = clip_coefficients(&grads, &[vec![a.as_tensor().clone(), b.as_tensor().clone()]], 1.0)?;
/// assert!((c[0].0 - 5.0).abs() < 1e-12 && (c[0].1 - 1.0 / (5.0 + 1e-6)).abs() < 1e-12);
/// # Ok::<(), dinov2_train::Error>(())
/// ```
pub fn clip_coefficients(
    grads: &GradStore,
    groups: &[Vec<Tensor>],
    max_norm: f64,
) -> Result<Vec<(f64, f64)>> {
    groups
        .iter()
        .map(|params| {
            let mut sq = 0f64;
            for p in params {
                if let Some(g) = grads.get(p) {
                    // per-tensor norm, then the norm of the norms (torch's order)
                    let n = tensor_norm(g)?;
                    sq += n * n;
                }
            }
            let norm = sq.sqrt();
            let coef = (max_norm / (norm + 1e-6)).min(1.0);
            Ok((norm, coef))
        })
        .collect()
}

fn tensor_norm(g: &Tensor) -> Result<f64> {
    let g = g.to_dtype(DType::F32)?.flatten_all()?;
    let sq: f64 = match g.device() {
        Device::Cpu => {
            let (storage, layout) = g.storage_and_layout();
            let candle_core::Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
                return Err(Error::InvalidArgument {
                    name: "grads",
                    reason: "f32 gradients expected".into(),
                });
            };
            match layout.contiguous_offsets() {
                Some((a, b)) => sum_sq(&data[a..b]),
                None => {
                    drop(storage);
                    sum_sq(&g.contiguous()?.to_vec1::<f32>()?)
                }
            }
        }
        _ => g
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?,
    };
    Ok(sq.sqrt())
}

/// Sum of squares with a fixed chunking (deterministic whatever the thread count).
fn sum_sq(x: &[f32]) -> f64 {
    let parts: Vec<f64> = x
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>())
        .collect();
    parts.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same update written with candle ops in PyTorch's formulation.
    #[test]
    fn fused_kernel_matches_the_reference_formula_over_steps() -> Result<()> {
        let dev = Device::Cpu;
        let n = 3 * CHUNK + 17;
        let init: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin()).collect();
        let w = Var::from_vec(init.clone(), n, &dev)?;
        let group = ParamGroup {
            lr_multiplier: 0.5,
            wd_multiplier: 1.0,
            is_last_layer: false,
        };
        let cfg = AdamWConfig::default();
        let mut opt = AdamW::new(vec![("w".into(), w.clone(), group)], cfg);
        let (mut p, mut m, mut v) = (
            Tensor::from_vec(init, n, &dev)?,
            Tensor::zeros(n, DType::F32, &dev)?,
            Tensor::zeros(n, DType::F32, &dev)?,
        );
        let settings = StepSettings {
            lr: 0.01,
            last_layer_lr: 0.0,
            weight_decay: 0.1,
        };
        for step in 1..=3i32 {
            let target = Tensor::arange(0f32, n as f32, &dev)?
                .affine(0.001 * step as f64, 0.0)?
                .cos()?;
            let loss = (w.as_tensor() * &target)?.sqr()?.sum_all()?;
            let grads = loss.backward()?;
            let g = (grads.get(w.as_tensor()).unwrap() * 0.5)?;
            opt.step(&grads, &settings, |_| 0.5)?;
            let (lr, wd) = (0.005, 0.1);
            p = (p * (1.0 - lr * wd))?;
            m = (&m + ((&g - &m)? * 0.1)?)?;
            v = ((v * 0.999)? + (g.sqr()? * 0.001)?)?;
            let bc1 = 1.0 - 0.9f64.powi(step);
            let bc2 = (1.0 - 0.999f64.powi(step)).sqrt();
            let denom = ((v.sqrt()? / bc2)? + 1e-8)?;
            p = (&p + ((&m / denom)? * (-lr / bc1))?)?;
            let diff = (w.as_tensor() - &p)?.abs()?.max(0)?.to_scalar::<f32>()?;
            assert!(diff < 1e-7, "step {step}: {diff}");
        }
        let st = opt.params()[0].state.as_ref().unwrap();
        assert_eq!(st.step, 3);
        assert_eq!(st.exp_avg, m.to_vec1::<f32>()?);
        Ok(())
    }

    #[test]
    fn a_parameter_without_gradient_is_skipped() -> Result<()> {
        let dev = Device::Cpu;
        let (a, b) = (Var::new(&[1f32], &dev)?, Var::new(&[1f32], &dev)?);
        let g = ParamGroup {
            lr_multiplier: 1.0,
            wd_multiplier: 1.0,
            is_last_layer: false,
        };
        let mut opt = AdamW::new(
            vec![("a".into(), a.clone(), g), ("b".into(), b.clone(), g)],
            AdamWConfig::default(),
        );
        let grads = a.as_tensor().sqr()?.sum_all()?.backward()?;
        let s = StepSettings {
            lr: 0.1,
            last_layer_lr: 0.1,
            weight_decay: 0.5,
        };
        opt.step(&grads, &s, |_| 1.0)?;
        assert!(opt.params()[1].state.is_none());
        assert_eq!(b.as_tensor().to_vec1::<f32>()?, [1.0]); // not even decayed
        assert_ne!(a.as_tensor().to_vec1::<f32>()?, [1.0]);
        Ok(())
    }
}
