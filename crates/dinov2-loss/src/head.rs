//! `DINOHead` (`dinov2/layers/dino_head.py`): MLP → L2-normalise → weight-normed prototypes.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

use crate::error::{Error, Result};
use crate::ops::l2_normalize;

/// Shape of a DINO/iBOT head. Defaults follow `DINOHead.__init__` (3 layers, hidden 2048, bottleneck 256,
/// no BatchNorm, MLP bias).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DinoHeadConfig {
    /// Input dimension (the backbone's embedding dimension D).
    pub in_dim: usize,
    /// Number of prototypes K (65536 default, 131072 for ViT-L/g).
    pub out_dim: usize,
    /// BatchNorm1d after each hidden Linear (off in every official config).
    pub use_bn: bool,
    /// Number of Linear layers in the MLP (values below 1 are treated as 1, as official).
    pub nlayers: usize,
    /// Hidden width (2048).
    pub hidden_dim: usize,
    /// Bottleneck width (256; 384 for the ViT-L/g DINO head).
    pub bottleneck_dim: usize,
    /// Whether the MLP Linears have a bias.
    pub mlp_bias: bool,
}

impl DinoHeadConfig {
    /// The official defaults for `in_dim` → `out_dim`.
    pub fn new(in_dim: usize, out_dim: usize) -> Self {
        Self {
            in_dim,
            out_dim,
            use_bn: false,
            nlayers: 3,
            hidden_dim: 2048,
            bottleneck_dim: 256,
            mlp_bias: true,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.in_dim == 0 || self.out_dim == 0 || self.bottleneck_dim == 0 {
            return Err(Error::Config(format!(
                "head dimensions must be > 0: {self:?}"
            )));
        }
        if self.nlayers.max(1) > 1 && self.hidden_dim == 0 {
            return Err(Error::Config("hidden_dim must be > 0".into()));
        }
        Ok(())
    }

    /// The MLP as `(module name, spec)` in `nn.Sequential` order, with official key prefixes.
    fn mlp_spec(&self) -> Vec<(String, Spec)> {
        let n = self.nlayers.max(1);
        if n == 1 {
            // `_build_mlp` returns a bare Linear: keys `mlp.weight` / `mlp.bias`.
            return vec![("mlp".into(), Spec::Linear(self.in_dim, self.bottleneck_dim))];
        }
        let mut v = Vec::new();
        let mut push = |spec: Spec| {
            let i = v.len();
            v.push((format!("mlp.{i}"), spec));
        };
        push(Spec::Linear(self.in_dim, self.hidden_dim));
        if self.use_bn {
            push(Spec::BatchNorm(self.hidden_dim));
        }
        push(Spec::Gelu);
        for _ in 0..n - 2 {
            push(Spec::Linear(self.hidden_dim, self.hidden_dim));
            if self.use_bn {
                push(Spec::BatchNorm(self.hidden_dim));
            }
            push(Spec::Gelu);
        }
        push(Spec::Linear(self.hidden_dim, self.bottleneck_dim));
        v
    }

    /// Names and shapes of the trainable parameters, with official keys (`mlp.0.weight`, …,
    /// `last_layer.weight_g`, `last_layer.weight_v`).
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        for (name, spec) in self.mlp_spec() {
            match spec {
                Spec::Linear(i, o) => {
                    out.push((format!("{name}.weight"), vec![o, i]));
                    if self.mlp_bias {
                        out.push((format!("{name}.bias"), vec![o]));
                    }
                }
                Spec::BatchNorm(c) => {
                    out.push((format!("{name}.weight"), vec![c]));
                    out.push((format!("{name}.bias"), vec![c]));
                }
                Spec::Gelu => {}
            }
        }
        out.push(("last_layer.weight_g".into(), vec![self.out_dim, 1]));
        out.push((
            "last_layer.weight_v".into(),
            vec![self.out_dim, self.bottleneck_dim],
        ));
        out
    }
}

#[derive(Debug, Clone, Copy)]
enum Spec {
    Linear(usize, usize),
    BatchNorm(usize),
    Gelu,
}

#[derive(Debug)]
struct BnStats {
    mean: Tensor,
    var: Tensor,
}

#[derive(Debug)]
enum Layer {
    Linear {
        weight: Tensor,
        bias: Option<Tensor>,
    },
    BatchNorm {
        weight: Tensor,
        bias: Tensor,
        stats: Mutex<BnStats>,
    },
    Gelu,
}

const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;

/// The DINO head: `mlp` → `normalize(p=2, eps)` → `last_layer` with `W = g · v / ‖v‖_row` (trainable `g`).
///
/// Parameters are plain tensors taken from a [`VarBuilder`]; built from a [`VarMap`] (see
/// [`DinoHead::init`]) they are `Var`s and receive gradients, built from a checkpoint's tensors they are
/// constants (a teacher). Works on `[..., in_dim]` inputs in any float dtype.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::VarMap;
/// use dinov2_loss::{DinoHead, DinoHeadConfig};
/// let cfg = DinoHeadConfig { hidden_dim: 32, bottleneck_dim: 8, ..DinoHeadConfig::new(16, 64) };
/// let varmap = VarMap::new();
/// let head = DinoHead::init(&cfg, &varmap, "", 0, DType::F32, &Device::Cpu).unwrap();
/// let x = Tensor::randn(0f32, 1.0, (5, 16), &Device::Cpu).unwrap();
/// let y = head.forward(&x).unwrap();
/// assert_eq!(y.dims(), &[5, 64]);
/// let grads = y.sum_all().unwrap().backward().unwrap();
/// let g = varmap.data().lock().unwrap()["last_layer.weight_g"].clone();
/// assert!(grads.get(&g).is_some()); // weight_g is trainable
/// ```
#[derive(Debug)]
pub struct DinoHead {
    cfg: DinoHeadConfig,
    mlp: Vec<(String, Layer)>,
    weight_g: Tensor,
    weight_v: Tensor,
}

struct Init {
    rng: StdRng,
}

impl Init {
    fn trunc_normal(&mut self, shape: &[usize], std: f64) -> Result<Vec<f32>> {
        let n: usize = shape.iter().product();
        let dist = Normal::new(0.0, std).map_err(|e| Error::Config(e.to_string()))?;
        // torch.nn.init.trunc_normal_ truncates at the absolute bounds ±2.
        Ok((0..n)
            .map(|_| loop {
                let s: f64 = dist.sample(&mut self.rng);
                if (-2.0..=2.0).contains(&s) {
                    break s as f32;
                }
            })
            .collect())
    }
    fn uniform(&mut self, shape: &[usize], bound: f64) -> Vec<f32> {
        let n: usize = shape.iter().product();
        (0..n)
            .map(|_| self.rng.random_range(-bound..bound) as f32)
            .collect()
    }
}

impl DinoHead {
    /// The official initial parameters, by official key: MLP Linears trunc-normal(0.02) with zero bias,
    /// BatchNorm ones/zeros, `weight_v` PyTorch's default Linear init (kaiming-uniform a=√5, i.e.
    /// U(±1/√bottleneck)), `weight_g` = 1. Deterministic in `seed` (not PyTorch's RNG stream).
    pub fn init_tensors(
        cfg: &DinoHeadConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<HashMap<String, Tensor>> {
        cfg.validate()?;
        let mut g = Init {
            rng: StdRng::seed_from_u64(seed),
        };
        let mut out = HashMap::new();
        let mk = |v: Vec<f32>, shape: &[usize]| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?)
        };
        for (name, spec) in cfg.mlp_spec() {
            match spec {
                Spec::Linear(i, o) => {
                    out.insert(
                        format!("{name}.weight"),
                        mk(g.trunc_normal(&[o, i], 0.02)?, &[o, i])?,
                    );
                    if cfg.mlp_bias {
                        out.insert(format!("{name}.bias"), mk(vec![0.0; o], &[o])?);
                    }
                }
                Spec::BatchNorm(c) => {
                    out.insert(format!("{name}.weight"), mk(vec![1.0; c], &[c])?);
                    out.insert(format!("{name}.bias"), mk(vec![0.0; c], &[c])?);
                }
                Spec::Gelu => {}
            }
        }
        let (k, b) = (cfg.out_dim, cfg.bottleneck_dim);
        let bound = 1.0 / (b as f64).sqrt();
        out.insert(
            "last_layer.weight_v".into(),
            mk(g.uniform(&[k, b], bound), &[k, b])?,
        );
        out.insert("last_layer.weight_g".into(), mk(vec![1.0; k], &[k, 1])?);
        Ok(out)
    }

    /// Creates the official initial parameters as `Var`s in `varmap` (under `prefix`, e.g. `""` or
    /// `"dino_head"`) and builds the head on them. Existing entries of the same name are replaced.
    pub fn init(
        cfg: &DinoHeadConfig,
        varmap: &VarMap,
        prefix: &str,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let tensors = Self::init_tensors(cfg, seed, dtype, device)?;
        {
            let mut data = varmap
                .data()
                .lock()
                .map_err(|_| Error::Config("VarMap lock poisoned".into()))?;
            for (name, t) in tensors {
                let full = if prefix.is_empty() {
                    name
                } else {
                    format!("{prefix}.{name}")
                };
                data.insert(full, Var::from_tensor(&t)?);
            }
        }
        let vb = VarBuilder::from_varmap(varmap, dtype, device);
        let vb = if prefix.is_empty() { vb } else { vb.pp(prefix) };
        Self::new(cfg, vb)
    }

    /// Builds the head from official keys in `vb` (a training checkpoint's `student.dino_head.*` after
    /// `vb.pp("student.dino_head")`, a safetensors file, a [`VarMap`], ...). The newer PyTorch
    /// `last_layer.parametrizations.weight.original0/1` names are accepted too. BatchNorm running statistics
    /// are read if present (zeros/ones otherwise) and are never trainable.
    pub fn new(cfg: &DinoHeadConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let mut mlp = Vec::new();
        for (name, spec) in cfg.mlp_spec() {
            let layer = match spec {
                Spec::Linear(i, o) => Layer::Linear {
                    weight: vb.get((o, i), &format!("{name}.weight"))?,
                    bias: if cfg.mlp_bias {
                        Some(vb.get(o, &format!("{name}.bias"))?)
                    } else {
                        None
                    },
                },
                Spec::BatchNorm(c) => {
                    let stat = |key: &str, fill: f64| -> Result<Tensor> {
                        let full = format!("{name}.{key}");
                        if vb.contains_tensor(&full) {
                            Ok(vb.get(c, &full)?.detach().to_dtype(DType::F32)?)
                        } else {
                            Ok((Tensor::ones(c, DType::F32, vb.device())? * fill)?)
                        }
                    };
                    Layer::BatchNorm {
                        weight: vb.get(c, &format!("{name}.weight"))?,
                        bias: vb.get(c, &format!("{name}.bias"))?,
                        stats: Mutex::new(BnStats {
                            mean: stat("running_mean", 0.0)?,
                            var: stat("running_var", 1.0)?,
                        }),
                    }
                }
                Spec::Gelu => Layer::Gelu,
            };
            mlp.push((name, layer));
        }
        let (k, b) = (cfg.out_dim, cfg.bottleneck_dim);
        let (g_key, v_key) = if !vb.contains_tensor("last_layer.weight_g")
            && vb.contains_tensor("last_layer.parametrizations.weight.original0")
        {
            (
                "last_layer.parametrizations.weight.original0",
                "last_layer.parametrizations.weight.original1",
            )
        } else {
            ("last_layer.weight_g", "last_layer.weight_v")
        };
        Ok(Self {
            cfg: cfg.clone(),
            mlp,
            weight_g: vb.get((k, 1), g_key)?,
            weight_v: vb.get((k, b), v_key)?,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &DinoHeadConfig {
        &self.cfg
    }

    /// All tensors by official key (parameters, and BatchNorm running statistics), e.g. to save a
    /// checkpoint or to drive a teacher EMA.
    pub fn state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (name, layer) in &self.mlp {
            match layer {
                Layer::Linear { weight, bias } => {
                    out.push((format!("{name}.weight"), weight.clone()));
                    if let Some(b) = bias {
                        out.push((format!("{name}.bias"), b.clone()));
                    }
                }
                Layer::BatchNorm {
                    weight,
                    bias,
                    stats,
                } => {
                    out.push((format!("{name}.weight"), weight.clone()));
                    out.push((format!("{name}.bias"), bias.clone()));
                    let s = stats
                        .lock()
                        .map_err(|_| Error::Config("BatchNorm state lock poisoned".into()))?;
                    out.push((format!("{name}.running_mean"), s.mean.clone()));
                    out.push((format!("{name}.running_var"), s.var.clone()));
                }
                Layer::Gelu => {}
            }
        }
        out.push(("last_layer.weight_g".into(), self.weight_g.clone()));
        out.push(("last_layer.weight_v".into(), self.weight_v.clone()));
        Ok(out)
    }

    /// The effective last-layer weight `W = g · v / ‖v‖_row`, `[K, bottleneck]`.
    pub fn last_layer_weight(&self) -> Result<Tensor> {
        Ok(self.last_layer_weight_t()?.t()?)
    }

    /// `Wᵀ`, `[bottleneck, K]` (contiguous on the fused CPU path, so `h · Wᵀ` needs no transpose node).
    fn last_layer_weight_t(&self) -> Result<Tensor> {
        if crate::fused::fused_ok(&self.weight_v) && self.weight_g.dtype() == self.weight_v.dtype()
        {
            return Ok(crate::fused::weight_norm_t(&self.weight_v, &self.weight_g)?);
        }
        Ok(self.last_layer_weight_composed()?.t()?)
    }

    /// [`Self::last_layer_weight`] from primitive candle ops (any device/dtype; the reference for the
    /// fused CPU kernel).
    pub fn last_layer_weight_composed(&self) -> Result<Tensor> {
        let norm = self.weight_v.sqr()?.sum_keepdim(1)?.sqrt()?;
        let scale = self.weight_g.broadcast_div(&norm)?;
        Ok(self.weight_v.broadcast_mul(&scale)?)
    }

    /// Inference forward (BatchNorm, if any, uses its running statistics). `x`: `[..., in_dim]` →
    /// `[..., K]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, false)
    }

    /// The bottleneck features after the MLP and the L2 normalisation, `[..., bottleneck]`.
    pub fn features_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = dims.last().copied().unwrap_or(0);
        if in_dim != self.cfg.in_dim {
            return Err(Error::Input(format!(
                "head expects [..., {}] inputs, got {:?}",
                self.cfg.in_dim, dims
            )));
        }
        let rows = x.elem_count() / in_dim;
        let mut h = if x.rank() == 2 {
            x.clone()
        } else {
            x.reshape((rows, in_dim))?
        };
        for (_, layer) in &self.mlp {
            h = match layer {
                Layer::Linear { weight, bias } => {
                    let y = h.matmul(&weight.t()?)?;
                    match bias {
                        Some(b) => y.broadcast_add(b)?,
                        None => y,
                    }
                }
                Layer::Gelu if crate::fused::fused_ok(&h) => crate::fused::gelu_erf(&h)?,
                Layer::Gelu => h.gelu_erf()?,
                Layer::BatchNorm {
                    weight,
                    bias,
                    stats,
                } => batch_norm(&h, weight, bias, stats, train)?,
            };
        }
        let eps = if h.dtype() == DType::F16 { 1e-6 } else { 1e-12 };
        let h = l2_normalize(&h, eps)?;
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = self.cfg.bottleneck_dim;
        }
        if h.dims() == out_dims.as_slice() {
            return Ok(h);
        }
        Ok(h.reshape(out_dims)?)
    }

    /// Forward in training (`train = true`: BatchNorm uses batch statistics and updates its running
    /// statistics, as `nn.BatchNorm1d` in train mode) or inference mode. Heads without BatchNorm behave the
    /// same in both.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.features_t(x, train)?;
        let mut dims = h.dims().to_vec();
        let b = self.cfg.bottleneck_dim;
        let rows = h.elem_count() / b;
        let wt = self.last_layer_weight_t()?;
        // (reshape nodes are skipped for 2-D inputs: each node on the [rows, K] path costs extra passes
        // in candle's backward)
        let h2 = if h.rank() == 2 {
            h
        } else {
            h.reshape((rows, b))?
        };
        let y = h2.matmul(&wt)?;
        if let Some(last) = dims.last_mut() {
            *last = self.cfg.out_dim;
        }
        if y.dims() == dims.as_slice() {
            return Ok(y);
        }
        Ok(y.reshape(dims)?)
    }
}

fn batch_norm(
    h: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stats: &Mutex<BnStats>,
    train: bool,
) -> Result<Tensor> {
    let lock_err = |_| Error::Config("BatchNorm state lock poisoned".into());
    let n = h.dim(0)?;
    let (mean, var) = if train {
        if n < 2 {
            return Err(Error::DegenerateBatch(format!(
                "BatchNorm in training mode needs more than one row, got {n}"
            )));
        }
        let mean = h.mean_keepdim(0)?;
        let centered = h.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(0)?;
        {
            let mut s = stats.lock().map_err(lock_err)?;
            let m = mean.detach().squeeze(0)?.to_dtype(DType::F32)?;
            let unbiased =
                (var.detach().squeeze(0)?.to_dtype(DType::F32)? * (n as f64 / (n - 1) as f64))?;
            s.mean = ((&s.mean * (1.0 - BN_MOMENTUM))? + (m * BN_MOMENTUM)?)?;
            s.var = ((&s.var * (1.0 - BN_MOMENTUM))? + (unbiased * BN_MOMENTUM)?)?;
        }
        (mean, var)
    } else {
        let s = stats.lock().map_err(lock_err)?;
        (
            s.mean.to_dtype(h.dtype())?.unsqueeze(0)?,
            s.var.to_dtype(h.dtype())?.unsqueeze(0)?,
        )
    };
    let xhat = h
        .broadcast_sub(&mean)?
        .broadcast_div(&(var + BN_EPS)?.sqrt()?)?;
    Ok(xhat
        .broadcast_mul(&weight.unsqueeze(0)?)?
        .broadcast_add(&bias.unsqueeze(0)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(t: &Tensor) -> (f64, f64, f64) {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        let maxabs = v.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
        (mean, var.sqrt(), maxabs)
    }

    #[test]
    fn official_keys_and_shapes() {
        let cfg = DinoHeadConfig::new(384, 65536);
        let names: Vec<_> = cfg.parameter_shapes().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "mlp.0.weight",
                "mlp.0.bias",
                "mlp.2.weight",
                "mlp.2.bias",
                "mlp.4.weight",
                "mlp.4.bias",
                "last_layer.weight_g",
                "last_layer.weight_v"
            ]
        );
        let bn = DinoHeadConfig {
            use_bn: true,
            ..cfg.clone()
        };
        let names: Vec<_> = bn.parameter_shapes().into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"mlp.1.weight".to_string()));
        assert!(names.contains(&"mlp.6.weight".to_string()));
        let one = DinoHeadConfig {
            nlayers: 0, // clamped to 1 as official
            ..cfg
        };
        let shapes = one.parameter_shapes();
        assert_eq!(shapes[0], ("mlp.weight".to_string(), vec![256, 384]));
        assert_eq!(
            shapes[2],
            ("last_layer.weight_g".to_string(), vec![65536, 1])
        );
    }

    #[test]
    fn official_init_distribution() {
        let cfg = DinoHeadConfig {
            hidden_dim: 512,
            bottleneck_dim: 64,
            ..DinoHeadConfig::new(128, 4096)
        };
        let t = DinoHead::init_tensors(&cfg, 7, DType::F32, &Device::Cpu).unwrap();
        let (m, s, _) = stats(&t["mlp.2.weight"]);
        assert!(
            m.abs() < 1e-3 && (s - 0.02).abs() < 0.02 * 0.02,
            "trunc normal: {m} {s}"
        );
        assert_eq!(stats(&t["mlp.0.bias"]).2, 0.0);
        let (m, s, maxabs) = stats(&t["last_layer.weight_g"]);
        assert_eq!((m, s, maxabs), (1.0, 0.0, 1.0));
        // kaiming-uniform(a=√5): U(±1/√fan_in), std = bound/√3
        let bound = 1.0 / 8.0;
        let (m, s, maxabs) = stats(&t["last_layer.weight_v"]);
        assert!(maxabs <= bound && maxabs > 0.99 * bound);
        assert!(m.abs() < 1e-3 && (s - bound / 3f64.sqrt()).abs() < 0.01 * bound);
        // deterministic in the seed
        let t2 = DinoHead::init_tensors(&cfg, 7, DType::F32, &Device::Cpu).unwrap();
        let d = (&t["mlp.0.weight"] - &t2["mlp.0.weight"]).unwrap();
        assert_eq!(stats(&d).2, 0.0);
    }

    #[test]
    fn zero_rows_give_finite_outputs_and_gradients() {
        // The official student/teacher head inputs are padded with zero rows (the `upperbound` buffer);
        // with zero biases they reach the normalisation as exact zeros.
        let cfg = DinoHeadConfig {
            hidden_dim: 16,
            bottleneck_dim: 4,
            ..DinoHeadConfig::new(8, 32)
        };
        let vm = VarMap::new();
        let head = DinoHead::init(&cfg, &vm, "dino_head", 0, DType::F32, &Device::Cpu).unwrap();
        let x =
            Var::from_tensor(&Tensor::zeros((3, 8), DType::F32, &Device::Cpu).unwrap()).unwrap();
        let y = head.forward_t(x.as_tensor(), true).unwrap();
        assert_eq!(stats(&y).2, 0.0);
        let grads = y.sum_all().unwrap().backward().unwrap();
        for v in vm.all_vars() {
            let g = grads.get(v.as_tensor()).unwrap();
            let sum = g
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(sum.is_finite());
        }
        assert!(vm
            .data()
            .lock()
            .unwrap()
            .contains_key("dino_head.last_layer.weight_g"));
    }

    #[test]
    fn parametrizations_keys_and_half_precision() {
        let cfg = DinoHeadConfig {
            nlayers: 1,
            bottleneck_dim: 4,
            ..DinoHeadConfig::new(6, 10)
        };
        let mut t = DinoHead::init_tensors(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
        let g = t.remove("last_layer.weight_g").unwrap();
        let v = t.remove("last_layer.weight_v").unwrap();
        let a = DinoHead::init_tensors(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
        t.insert("last_layer.parametrizations.weight.original0".into(), g);
        t.insert("last_layer.parametrizations.weight.original1".into(), v);
        let new_keys =
            DinoHead::new(&cfg, VarBuilder::from_tensors(t, DType::F32, &Device::Cpu)).unwrap();
        let old_keys =
            DinoHead::new(&cfg, VarBuilder::from_tensors(a, DType::F32, &Device::Cpu)).unwrap();
        let x = crate::testutil::SeededRng::new(3).normal(&[2, 6], 0.0, 1.0, DType::F32);
        let d = (new_keys.forward(&x).unwrap() - old_keys.forward(&x).unwrap()).unwrap();
        assert_eq!(stats(&d).2, 0.0);
        // f16 weights and inputs (normalisation eps 1e-6): close to the f32 head
        let a16 = DinoHead::init_tensors(&cfg, 1, DType::F16, &Device::Cpu).unwrap();
        let h16 = DinoHead::new(
            &cfg,
            VarBuilder::from_tensors(a16, DType::F16, &Device::Cpu),
        )
        .unwrap();
        let y = h16.forward(&x.to_dtype(DType::F16).unwrap()).unwrap();
        let y32 = old_keys.forward(&x).unwrap();
        let err = stats(&(y.to_dtype(DType::F32).unwrap() - y32).unwrap()).2;
        // |y| ≤ g = 1; the f16 head rounds inputs, weights and every op's output to f16: a chain of at
        // most 16 roundings (or a sum of ≤ 16 terms) of relative size U16
        let tol = 2.0 * crate::testutil::sum_error(16, crate::testutil::U16);
        assert!(err <= tol, "f16 head deviates by {err} > {tol}");
    }

    #[test]
    fn wrong_input_width_is_an_error() {
        let cfg = DinoHeadConfig {
            nlayers: 1,
            bottleneck_dim: 4,
            ..DinoHeadConfig::new(6, 10)
        };
        let t = DinoHead::init_tensors(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
        let h = DinoHead::new(&cfg, VarBuilder::from_tensors(t, DType::F32, &Device::Cpu)).unwrap();
        let x = Tensor::zeros((2, 5), DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(h.forward(&x), Err(Error::Input(_))));
        assert!(
            DinoHead::init_tensors(&DinoHeadConfig::new(0, 10), 0, DType::F32, &Device::Cpu)
                .is_err()
        );
    }
}
