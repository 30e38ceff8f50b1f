//! `DINOHead` (`dinov2/layers/dino_head.py`): MLP → L2-normalise → weight-normed prototypes.
//!
//! The head follows candle's conventions, like the `dinov2-model` layers: [`DinoHead::new`] asks a
//! [`VarBuilder`] for its parameters under their official names with the official initialisation as init
//! hints, so a checkpoint (a [`StateDict`], a `.pth` / safetensors builder) gives a constant head and a
//! [`candle_nn::VarMap`] (through [`dinov2_model::init::seeded`], or [`DinoHead::from_state_dict_trainable`])
//! gives a trainable one. The official names are written in [`DinoHead::new`] only; the parameter list,
//! the strict check and the state dict are read off a build.

use std::collections::BTreeSet;
use std::sync::Mutex;

use candle_core::{DType, Device, Module, Shape, Tensor};
use candle_nn::{Init, VarBuilder, VarMap};
use dinov2_model::init::{ONES, TRUNC_NORMAL_002, ZEROS};
use dinov2_model::StateDict;

use crate::error::{Error, Result};
use crate::ops::l2_normalize;

/// Shape of a DINO/iBOT head. Defaults follow `DINOHead.__init__` (3 layers, hidden 2048, bottleneck 256,
/// no BatchNorm, MLP bias).
///
/// ```
/// use dinov2_loss::DinoHeadConfig;
/// let cfg = DinoHeadConfig::new(384, 65536); // the ViT-S/14 DINO head
/// assert_eq!((cfg.nlayers, cfg.hidden_dim, cfg.bottleneck_dim), (3, 2048, 256));
/// let vitg = DinoHeadConfig { bottleneck_dim: 384, ..DinoHeadConfig::new(1536, 131072) };
/// assert!(vitg.validate().is_ok());
/// ```
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
    ///
    /// ```
    /// let cfg = dinov2_loss::DinoHeadConfig::new(768, 65536);
    /// assert!(cfg.mlp_bias && !cfg.use_bn);
    /// ```
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

    /// Checks that every width the head uses is > 0 ([`Error::InvalidConfig`] names the first that is not).
    ///
    /// ```
    /// use dinov2_loss::{DinoHeadConfig, Error};
    /// let err = DinoHeadConfig::new(0, 10).validate().unwrap_err();
    /// assert!(matches!(err, Error::InvalidConfig { field: "in_dim", .. }));
    /// ```
    pub fn validate(&self) -> Result<()> {
        let hidden = if self.nlayers.max(1) > 1 {
            self.hidden_dim
        } else {
            1 // unused by a one-layer head
        };
        for (field, v) in [
            ("in_dim", self.in_dim),
            ("out_dim", self.out_dim),
            ("bottleneck_dim", self.bottleneck_dim),
            ("hidden_dim", hidden),
        ] {
            if v == 0 {
                return Err(Error::InvalidConfig {
                    field,
                    value: 0.0,
                    reason: "must be > 0",
                });
            }
        }
        Ok(())
    }

    /// The MLP as `(module path, layer)` in `nn.Sequential` order, as `_build_mlp` numbers it.
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
}

#[derive(Debug, Clone, Copy)]
enum Spec {
    Linear(usize, usize),
    BatchNorm(usize),
    Gelu,
}

/// BatchNorm running statistics (buffers, never trainable; f32).
#[derive(Debug, Clone)]
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
        /// Module path, e.g. `mlp.1`.
        path: String,
        weight: Tensor,
        bias: Tensor,
        stats: Mutex<BnStats>,
    },
    Gelu,
}

const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;
/// BatchNorm buffers: the running statistics, and PyTorch's step counter (accepted, not used).
const RUNNING_MEAN: &str = "running_mean";
const RUNNING_VAR: &str = "running_var";
const NUM_BATCHES_TRACKED: &str = "num_batches_tracked";
/// The weight-normed last layer: `(official name, name under torch.nn.utils.parametrizations.weight_norm)`.
const LAST_LAYER: &str = "last_layer";
const WEIGHT_G: (&str, &str) = ("weight_g", "parametrizations.weight.original0");
const WEIGHT_V: (&str, &str) = ("weight_v", "parametrizations.weight.original1");

/// `prefix.name`, or `name` for an empty prefix.
fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// The builder under `prefix` (the builder itself for an empty prefix).
fn under<'a>(vb: VarBuilder<'a>, prefix: &str) -> VarBuilder<'a> {
    if prefix.is_empty() {
        vb
    } else {
        vb.pp(prefix)
    }
}

/// The other accepted name of a last-layer parameter (`last_layer.weight_g` ↔
/// `last_layer.parametrizations.weight.original0`, same for `weight_v`).
fn alias_of(name: &str) -> Option<String> {
    let rest = name.strip_prefix(LAST_LAYER)?.strip_prefix('.')?;
    [WEIGHT_G, WEIGHT_V]
        .iter()
        .find(|(official, _)| *official == rest)
        .map(|(_, alias)| join(LAST_LAYER, alias))
}

/// The tensors a build asked for, under their names relative to the head.
struct Fetcher<'a> {
    vb: VarBuilder<'a>,
    params: Vec<(String, Tensor)>,
}

impl Fetcher<'_> {
    /// `vb[from]` of shape `shape` (created from `init` by a `VarMap` builder), recorded as `name`.
    fn get_as(
        &mut self,
        shape: impl Into<Shape>,
        name: String,
        from: &str,
        init: Init,
    ) -> Result<Tensor> {
        let t = self.vb.get_with_hints(shape, from, init)?;
        self.params.push((name, t.clone()));
        Ok(t)
    }

    fn get(&mut self, shape: impl Into<Shape>, name: String, init: Init) -> Result<Tensor> {
        let from = name.clone();
        self.get_as(shape, name, &from, init)
    }

    /// A BatchNorm buffer: read if the builder has it, `fill` otherwise (never a parameter).
    fn buffer(&self, c: usize, name: &str, fill: f64) -> Result<Tensor> {
        if self.vb.contains_tensor(name) {
            Ok(self.vb.get(c, name)?.detach().to_dtype(DType::F32)?)
        } else {
            Ok((Tensor::ones(c, DType::F32, self.vb.device())? * fill)?)
        }
    }
}

/// The DINO head: `mlp` → `normalize(p=2, eps)` → `last_layer` with `W = g · v / ‖v‖_row` (trainable `g`).
///
/// Built from a [`VarBuilder`] positioned at the head ([`Self::new`]): over a [`VarMap`] its parameters are
/// `Var`s and receive gradients (a student), over a checkpoint's tensors they are constants (a teacher).
/// [`Module::forward`] is the inference forward; [`Self::forward_train`] the training one (they differ only
/// for heads with BatchNorm). Works on `[..., in_dim]` inputs in any float dtype.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::VarMap;
/// use dinov2_loss::{DinoHead, DinoHeadConfig};
/// let cfg = DinoHeadConfig { hidden_dim: 32, bottleneck_dim: 8, ..DinoHeadConfig::new(16, 64) };
/// // trainable, official initialisation (seeded)
/// let varmap = VarMap::new();
/// let head = DinoHead::new(&cfg, dinov2_model::init::seeded(&varmap, 0, DType::F32, &Device::Cpu))?;
/// let x = Tensor::ones((5, 16), DType::F32, &Device::Cpu)?;
/// let y = head.forward_train(&x)?;
/// assert_eq!(y.dims(), &[5, 64]);
/// let grads = y.sum_all()?.backward()?;
/// let g = varmap.data().lock().unwrap()["last_layer.weight_g"].clone();
/// assert!(grads.get(&g).is_some()); // weight_g is trainable
/// // a constant copy (a teacher), same outputs
/// let teacher = DinoHead::from_state_dict(&cfg, &head.state_dict()?, "", &Device::Cpu, DType::F32)?;
/// let diff = (teacher.forward(&x)? - &y)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert_eq!(diff, 0.0);
/// # Ok::<(), dinov2_loss::Error>(())
/// ```
#[derive(Debug)]
pub struct DinoHead {
    cfg: DinoHeadConfig,
    mlp: Vec<Layer>,
    weight_g: Tensor,
    weight_v: Tensor,
    /// Parameters under their official names (relative to the head), as the builder handed them out.
    params: Vec<(String, Tensor)>,
    /// Whether the parameters can change in place (`Var`s, or detached views of them).
    mutable: bool,
}

impl DinoHead {
    /// Builds the head from `vb` positioned at the head (e.g. `vb.pp("dino_head")`): `mlp.*` (`mlp.{i}.weight`
    /// / `.bias` in `nn.Sequential` numbering, `mlp.weight` for one layer, BatchNorm `weight` / `bias` and,
    /// when present, `running_mean` / `running_var`), `last_layer.weight_g` `[K, 1]` and
    /// `last_layer.weight_v` `[K, bottleneck]` (or PyTorch's newer
    /// `last_layer.parametrizations.weight.original0/1`).
    ///
    /// The init hints are the official initialisation: MLP Linear weights `Randn(0, 0.02)`
    /// (`trunc_normal_(std=0.02)`), biases zeros, BatchNorm ones/zeros, `weight_v` PyTorch's default Linear
    /// init `Uniform(±1/√bottleneck)`, `weight_g` ones. A [`VarMap`] builder creates the missing parameters
    /// from them ([`dinov2_model::init::seeded`] deterministically). BatchNorm running statistics are
    /// buffers: read if the builder has them (zeros/ones otherwise), never `Var`s.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use dinov2_loss::{DinoHead, DinoHeadConfig};
    /// // the head of a training checkpoint, through candle's `.pth` reader
    /// let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/teacher_checkpoint.pth");
    /// let vb = candle_nn::VarBuilder::from_pth_with_state(path, DType::F32, "teacher", &Device::Cpu)?;
    /// let cfg = DinoHeadConfig { hidden_dim: 32, bottleneck_dim: 8, ..DinoHeadConfig::new(16, 64) };
    /// let head = DinoHead::new(&cfg, vb.pp("dino_head"))?;
    /// assert!(!head.named_parameters()[0].1.is_variable());
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn new(cfg: &DinoHeadConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let mut f = Fetcher {
            vb,
            params: Vec::new(),
        };
        let mut mlp = Vec::new();
        for (path, spec) in cfg.mlp_spec() {
            let name = |key: &str| join(&path, key);
            let layer = match spec {
                Spec::Linear(i, o) => Layer::Linear {
                    weight: f.get((o, i), name("weight"), TRUNC_NORMAL_002)?,
                    bias: if cfg.mlp_bias {
                        Some(f.get(o, name("bias"), ZEROS)?)
                    } else {
                        None
                    },
                },
                Spec::BatchNorm(c) => Layer::BatchNorm {
                    weight: f.get(c, name("weight"), ONES)?,
                    bias: f.get(c, name("bias"), ZEROS)?,
                    stats: Mutex::new(BnStats {
                        mean: f.buffer(c, &name(RUNNING_MEAN), 0.0)?,
                        var: f.buffer(c, &name(RUNNING_VAR), 1.0)?,
                    }),
                    path: path.clone(),
                },
                Spec::Gelu => Layer::Gelu,
            };
            mlp.push(layer);
        }
        let (k, b) = (cfg.out_dim, cfg.bottleneck_dim);
        let (g, v) = (join(LAST_LAYER, WEIGHT_G.0), join(LAST_LAYER, WEIGHT_V.0));
        let aliased =
            !f.vb.contains_tensor(&g) && f.vb.contains_tensor(&join(LAST_LAYER, WEIGHT_G.1));
        let source = |official: &String| match (aliased, alias_of(official)) {
            (true, Some(alias)) => alias,
            _ => official.clone(),
        };
        let (g_from, v_from) = (source(&g), source(&v));
        let weight_g = f.get_as((k, 1), g, &g_from, ONES)?;
        let bound = 1.0 / (b as f64).sqrt();
        let uniform = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let weight_v = f.get_as((k, b), v, &v_from, uniform)?;
        let mutable = f
            .params
            .iter()
            .any(|(_, t)| t.is_variable() || t.track_op());
        Ok(Self {
            cfg: cfg.clone(),
            mlp,
            weight_g,
            weight_v,
            params: f.params,
            mutable,
        })
    }

    /// Every parameter of a head of configuration `cfg`, `(official name, shape)` in the official order,
    /// read off a build (nothing is allocated for them).
    ///
    /// ```
    /// use dinov2_loss::{DinoHead, DinoHeadConfig};
    /// let shapes = DinoHead::parameter_shapes(&DinoHeadConfig::new(384, 65536))?;
    /// assert_eq!(shapes[0], ("mlp.0.weight".to_string(), vec![2048, 384]));
    /// assert_eq!(shapes[7], ("last_layer.weight_v".to_string(), vec![65536, 256]));
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn parameter_shapes(cfg: &DinoHeadConfig) -> Result<Vec<(String, Vec<usize>)>> {
        let probe = Self::probe(cfg)?;
        Ok(probe
            .params
            .iter()
            .map(|(k, t)| (k.clone(), t.dims().to_vec()))
            .collect())
    }

    /// A head of configuration `cfg` on placeholder tensors.
    fn probe(cfg: &DinoHeadConfig) -> Result<Self> {
        Self::new(
            cfg,
            dinov2_model::params::placeholders(DType::F32, &Device::Cpu),
        )
    }

    /// Strict check of the head's tensors under `prefix` in `sd` (as the official
    /// `load_state_dict(strict=True)`): every parameter present with its shape ([`Error::MissingKey`],
    /// [`Error::ShapeMismatch`]; the `parametrizations` names are accepted for the last layer), BatchNorm
    /// buffers, if present, with theirs, and no other key under `prefix` ([`Error::UnexpectedKey`]; with an
    /// empty prefix, no other key at all). Errors name the key with its prefix.
    ///
    /// ```
    /// use dinov2_loss::{DinoHead, DinoHeadConfig, Error};
    /// let cfg = DinoHeadConfig { nlayers: 1, bottleneck_dim: 4, ..DinoHeadConfig::new(6, 10) };
    /// let varmap = candle_nn::VarMap::new();
    /// let vb = dinov2_model::init::seeded(&varmap, 0, candle_core::DType::F32, &candle_core::Device::Cpu);
    /// let mut sd = DinoHead::new(&cfg, vb)?.state_dict()?;
    /// DinoHead::check_state_dict(&cfg, &sd, "")?;
    /// sd.remove("mlp.bias");
    /// let err = DinoHead::check_state_dict(&cfg, &sd, "").unwrap_err();
    /// assert!(matches!(err, Error::MissingKey { ref key, ref expected } if key == "mlp.bias" && expected == &[4]));
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn check_state_dict(cfg: &DinoHeadConfig, sd: &StateDict, prefix: &str) -> Result<()> {
        let probe = Self::probe(cfg)?;
        let mut known = BTreeSet::new();
        let check = |key: &str, expected: &[usize]| -> Result<()> {
            match sd.get(key) {
                Some(t) if t.dims() != expected => Err(Error::ShapeMismatch {
                    key: key.to_string(),
                    expected: expected.to_vec(),
                    actual: t.dims().to_vec(),
                }),
                _ => Ok(()),
            }
        };
        for (name, t) in &probe.params {
            let key = join(prefix, name);
            let found = match alias_of(name).map(|a| join(prefix, &a)) {
                Some(alias) if !sd.contains(&key) && sd.contains(&alias) => alias,
                _ => key,
            };
            if !sd.contains(&found) {
                return Err(Error::MissingKey {
                    key: found,
                    expected: t.dims().to_vec(),
                });
            }
            check(&found, t.dims())?;
            known.insert(found);
        }
        for (name, t) in probe.buffers()? {
            let key = join(prefix, &name);
            check(&key, t.dims())?;
            known.insert(key);
        }
        for path in probe.batch_norm_paths() {
            known.insert(join(prefix, &join(path, NUM_BATCHES_TRACKED)));
        }
        let mine = |k: &str| prefix.is_empty() || k.starts_with(&format!("{prefix}."));
        if let Some((key, t)) = sd.iter().find(|(k, _)| mine(k) && !known.contains(*k)) {
            return Err(Error::UnexpectedKey {
                key: key.clone(),
                shape: t.dims().to_vec(),
            });
        }
        Ok(())
    }

    /// A constant head (a teacher, or inference) from the tensors under `prefix` in `sd` (`""` for a state
    /// dict of the head alone, `"dino_head"` for the heads of a training checkpoint's `extra` tensors, see
    /// `dinov2_model::weights::load_weights`), strictly checked ([`Self::check_state_dict`]) and converted to
    /// `dtype` on `device`.
    ///
    /// ```
    /// use candle_core::{DType, Device, Module, Tensor};
    /// use dinov2_loss::{DinoHead, DinoHeadConfig, StateDict};
    /// let cfg = DinoHeadConfig { hidden_dim: 32, bottleneck_dim: 8, ..DinoHeadConfig::new(16, 64) };
    /// // an official teacher checkpoint: {"teacher": {"backbone.*", "dino_head.*"}}
    /// let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/teacher_checkpoint.pth");
    /// let sd: StateDict = candle_core::pickle::read_all_with_key(path, Some("teacher"))?.into_iter().collect();
    /// let head = DinoHead::from_state_dict(&cfg, &sd, "dino_head", &Device::Cpu, DType::F32)?;
    /// let y = head.forward(&Tensor::ones((2, 16), DType::F32, &Device::Cpu)?)?;
    /// assert_eq!(y.dims(), &[2, 64]);
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn from_state_dict(
        cfg: &DinoHeadConfig,
        sd: &StateDict,
        prefix: &str,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        Self::check_state_dict(cfg, sd, prefix)?;
        Self::new(cfg, under(sd.var_builder(dtype, device), prefix))
    }

    /// A trainable head from the tensors under `prefix` in `sd`, in one call: strictly checked
    /// ([`Self::check_state_dict`]), every parameter copied into `varmap` as a `Var` named `prefix.name`
    /// (official names, also when `sd` has the `parametrizations` ones), BatchNorm running statistics taken
    /// over as buffers, and the head built on them. Existing `varmap` entries of the same names are
    /// replaced.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_nn::VarMap;
    /// use dinov2_loss::{DinoHead, DinoHeadConfig, StateDict};
    /// let cfg = DinoHeadConfig { hidden_dim: 32, bottleneck_dim: 8, ..DinoHeadConfig::new(16, 64) };
    /// let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/teacher_checkpoint.pth");
    /// let sd: StateDict = candle_core::pickle::read_all_with_key(path, Some("teacher"))?.into_iter().collect();
    /// // resume a student head from the checkpoint's head
    /// let varmap = VarMap::new();
    /// let head = DinoHead::from_state_dict_trainable(&cfg, &sd, "dino_head", &varmap, &Device::Cpu, DType::F32)?;
    /// assert_eq!(varmap.all_vars().len(), 8);
    /// assert!(varmap.data().lock().unwrap().contains_key("dino_head.last_layer.weight_g"));
    /// let y = head.forward_train(&Tensor::ones((2, 16), DType::F32, &Device::Cpu)?)?;
    /// let grads = y.sum_all()?.backward()?;
    /// assert!(varmap.all_vars().iter().all(|v| grads.get(v.as_tensor()).is_some()));
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn from_state_dict_trainable(
        cfg: &DinoHeadConfig,
        sd: &StateDict,
        prefix: &str,
        varmap: &VarMap,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let constant = Self::from_state_dict(cfg, sd, prefix, device, dtype)?;
        let params: StateDict = constant.params.iter().cloned().collect();
        let var_prefix = if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}.")
        };
        params.to_var_map(varmap, &var_prefix, dtype, device)?;
        let head = Self::new(
            cfg,
            under(VarBuilder::from_varmap(varmap, dtype, device), prefix),
        )?;
        for (mine, theirs) in head.mlp.iter().zip(&constant.mlp) {
            if let (Layer::BatchNorm { stats, .. }, Layer::BatchNorm { stats: from_sd, .. }) =
                (mine, theirs)
            {
                *lock(stats)? = lock(from_sd)?.clone();
            }
        }
        Ok(head)
    }

    /// The head on the same parameters, detached from the gradient graph (sharing their storage): a
    /// teacher whose `Var`s an EMA updates in place records no graph in its forwards and always sees the
    /// current values. BatchNorm running statistics are copied.
    ///
    /// ```
    /// use candle_core::{DType, Device, Module, Tensor};
    /// use dinov2_loss::{DinoHead, DinoHeadConfig};
    /// let cfg = DinoHeadConfig { nlayers: 1, bottleneck_dim: 4, ..DinoHeadConfig::new(6, 10) };
    /// let varmap = candle_nn::VarMap::new();
    /// let head = DinoHead::new(&cfg, dinov2_model::init::seeded(&varmap, 0, DType::F32, &Device::Cpu))?;
    /// let x = Tensor::ones((2, 6), DType::F32, &Device::Cpu)?;
    /// assert!(head.forward(&x)?.track_op());
    /// assert!(!head.detached().forward(&x)?.track_op());
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn detached(&self) -> Self {
        let mlp = self
            .mlp
            .iter()
            .map(|l| match l {
                Layer::Linear { weight, bias } => Layer::Linear {
                    weight: weight.detach(),
                    bias: bias.as_ref().map(Tensor::detach),
                },
                Layer::BatchNorm {
                    path,
                    weight,
                    bias,
                    stats,
                } => Layer::BatchNorm {
                    path: path.clone(),
                    weight: weight.detach(),
                    bias: bias.detach(),
                    stats: Mutex::new(match stats.lock() {
                        Ok(s) => s.clone(),
                        Err(poisoned) => poisoned.into_inner().clone(),
                    }),
                },
                Layer::Gelu => Layer::Gelu,
            })
            .collect();
        Self {
            cfg: self.cfg.clone(),
            mlp,
            weight_g: self.weight_g.detach(),
            weight_v: self.weight_v.detach(),
            params: self
                .params
                .iter()
                .map(|(k, t)| (k.clone(), t.detach()))
                .collect(),
            mutable: self.mutable,
        }
    }

    /// The configuration.
    ///
    /// ```
    /// use dinov2_loss::{DinoHead, DinoHeadConfig};
    /// let cfg = DinoHeadConfig { nlayers: 1, bottleneck_dim: 4, ..DinoHeadConfig::new(6, 10) };
    /// let vb = dinov2_model::init::seeded(&candle_nn::VarMap::new(), 0, candle_core::DType::F32, &candle_core::Device::Cpu);
    /// assert_eq!(DinoHead::new(&cfg, vb)?.config(), &cfg);
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn config(&self) -> &DinoHeadConfig {
        &self.cfg
    }

    /// Parameters under their official names (relative to the head), in the official order, as the builder
    /// handed them out (`Var`s for a trainable head): what an optimiser or an EMA iterates over.
    ///
    /// ```
    /// use dinov2_loss::{DinoHead, DinoHeadConfig};
    /// let cfg = DinoHeadConfig { nlayers: 1, bottleneck_dim: 4, ..DinoHeadConfig::new(6, 10) };
    /// let vb = dinov2_model::init::seeded(&candle_nn::VarMap::new(), 0, candle_core::DType::F32, &candle_core::Device::Cpu);
    /// let names: Vec<_> = DinoHead::new(&cfg, vb)?.named_parameters().iter().map(|(n, _)| n.clone()).collect();
    /// assert_eq!(names, ["mlp.weight", "mlp.bias", "last_layer.weight_g", "last_layer.weight_v"]);
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn named_parameters(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// BatchNorm running statistics under their official names (f32 snapshots).
    fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for layer in &self.mlp {
            if let Layer::BatchNorm { path, stats, .. } = layer {
                let s = lock(stats)?;
                out.push((join(path, RUNNING_MEAN), s.mean.clone()));
                out.push((join(path, RUNNING_VAR), s.var.clone()));
            }
        }
        Ok(out)
    }

    fn batch_norm_paths(&self) -> impl Iterator<Item = &str> {
        self.mlp.iter().filter_map(|l| match l {
            Layer::BatchNorm { path, .. } => Some(path.as_str()),
            _ => None,
        })
    }

    /// The parameters and BatchNorm running statistics as a [`StateDict`] under the official names: a
    /// snapshot (for a head on `Var`s, detached copies that later in-place updates do not reach), e.g. to
    /// save a checkpoint or to make a teacher ([`Self::from_state_dict`]).
    ///
    /// ```
    /// use dinov2_loss::{DinoHead, DinoHeadConfig};
    /// let cfg = DinoHeadConfig { use_bn: true, hidden_dim: 8, bottleneck_dim: 4, ..DinoHeadConfig::new(6, 10) };
    /// let vb = dinov2_model::init::seeded(&candle_nn::VarMap::new(), 0, candle_core::DType::F32, &candle_core::Device::Cpu);
    /// let sd = DinoHead::new(&cfg, vb)?.state_dict()?;
    /// assert!(sd.contains("mlp.1.running_var") && !sd.get("mlp.0.weight").unwrap().is_variable());
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn state_dict(&self) -> Result<StateDict> {
        let mut sd = StateDict::new();
        for (k, t) in &self.params {
            let t = if self.mutable {
                t.detach().copy()?
            } else {
                t.clone()
            };
            sd.insert(k.clone(), t);
        }
        for (k, t) in self.buffers()? {
            sd.insert(k, t);
        }
        Ok(sd)
    }

    /// The effective last-layer weight `W = g · v / ‖v‖_row`, `[K, bottleneck]`.
    ///
    /// ```
    /// use dinov2_loss::{DinoHead, DinoHeadConfig};
    /// let cfg = DinoHeadConfig { nlayers: 1, bottleneck_dim: 4, ..DinoHeadConfig::new(6, 10) };
    /// let vb = dinov2_model::init::seeded(&candle_nn::VarMap::new(), 0, candle_core::DType::F32, &candle_core::Device::Cpu);
    /// let w = DinoHead::new(&cfg, vb)?.last_layer_weight()?; // g = 1: unit rows
    /// let norms = w.sqr()?.sum(1)?.sqrt()?.to_vec1::<f32>()?;
    /// assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-6));
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
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
    ///
    /// ```
    /// use dinov2_loss::{DinoHead, DinoHeadConfig};
    /// let cfg = DinoHeadConfig { nlayers: 1, bottleneck_dim: 4, ..DinoHeadConfig::new(6, 10) };
    /// let vb = dinov2_model::init::seeded(&candle_nn::VarMap::new(), 0, candle_core::DType::F64, &candle_core::Device::Cpu);
    /// let head = DinoHead::new(&cfg, vb)?;
    /// let d = (head.last_layer_weight()? - head.last_layer_weight_composed()?)?.abs()?.max_all()?;
    /// assert!(d.to_scalar::<f64>()? < 1e-15);
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn last_layer_weight_composed(&self) -> Result<Tensor> {
        let norm = self.weight_v.sqr()?.sum_keepdim(1)?.sqrt()?;
        let scale = self.weight_g.broadcast_div(&norm)?;
        Ok(self.weight_v.broadcast_mul(&scale)?)
    }

    /// The bottleneck features after the MLP and the L2 normalisation, `[..., bottleneck]`, in training
    /// (`train = true`: BatchNorm uses and updates batch statistics) or inference mode.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use dinov2_loss::{DinoHead, DinoHeadConfig};
    /// let cfg = DinoHeadConfig { nlayers: 1, bottleneck_dim: 4, ..DinoHeadConfig::new(6, 10) };
    /// let vb = dinov2_model::init::seeded(&candle_nn::VarMap::new(), 0, DType::F32, &Device::Cpu);
    /// let h = DinoHead::new(&cfg, vb)?.features_t(&Tensor::ones((3, 6), DType::F32, &Device::Cpu)?, false)?;
    /// let norms = h.sqr()?.sum(1)?.sqrt()?.to_vec1::<f32>()?;
    /// assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-6)); // unit rows
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn features_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = dims.last().copied().unwrap_or(0);
        if in_dim != self.cfg.in_dim {
            return Err(Error::shape(
                "x",
                format!("[..., {}] (the head's in_dim)", self.cfg.in_dim),
                &dims,
            ));
        }
        let rows = x.elem_count() / in_dim;
        let mut h = if x.rank() == 2 {
            x.clone()
        } else {
            x.reshape((rows, in_dim))?
        };
        for layer in &self.mlp {
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
                    ..
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

    /// The training forward: BatchNorm (if any) uses batch statistics and updates its running statistics,
    /// as `nn.BatchNorm1d` in train mode; for heads without BatchNorm the same as [`Module::forward`].
    /// `x`: `[..., in_dim]` → `[..., K]`.
    ///
    /// (Not `ModuleT::forward_t`: the head implements [`Module`], and candle's blanket `ModuleT` for every
    /// `Module` ignores the train flag.)
    ///
    /// ```
    /// use candle_core::{DType, Device, Module, Tensor};
    /// use dinov2_loss::{DinoHead, DinoHeadConfig};
    /// let cfg = DinoHeadConfig { use_bn: true, hidden_dim: 8, bottleneck_dim: 4, ..DinoHeadConfig::new(6, 10) };
    /// let vb = dinov2_model::init::seeded(&candle_nn::VarMap::new(), 0, DType::F32, &Device::Cpu);
    /// let head = DinoHead::new(&cfg, vb)?;
    /// let x = Tensor::arange(0f32, 12.0, &Device::Cpu)?.reshape((2, 6))?;
    /// let before = head.state_dict()?.get("mlp.1.running_mean").unwrap().clone();
    /// head.forward_train(&x)?; // updates the running statistics
    /// let after = head.state_dict()?.get("mlp.1.running_mean").unwrap().clone();
    /// assert!((after - before)?.abs()?.max_all()?.to_scalar::<f32>()? > 0.0);
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn forward_train(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_mode(x, true)
    }

    fn forward_mode(&self, x: &Tensor, train: bool) -> Result<Tensor> {
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

/// The inference forward (BatchNorm, if any, uses its running statistics): `[..., in_dim]` → `[..., K]`.
/// Errors of this crate (a wrong input width) come back wrapped in a candle error.
impl Module for DinoHead {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_mode(x, false).map_err(|e| match e {
            Error::Candle(e) => e,
            e => candle_core::Error::wrap(e),
        })
    }
}

fn lock(stats: &Mutex<BnStats>) -> Result<std::sync::MutexGuard<'_, BnStats>> {
    stats.lock().map_err(|_| Error::LockPoisoned {
        what: "BatchNorm running statistics",
    })
}

fn batch_norm(
    h: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stats: &Mutex<BnStats>,
    train: bool,
) -> Result<Tensor> {
    let n = h.dim(0)?;
    let (mean, var) = if train {
        if n < 2 {
            return Err(Error::DegenerateBatch {
                what: "BatchNorm in training mode",
                rows: n,
                needed: 2,
            });
        }
        let mean = h.mean_keepdim(0)?;
        let centered = h.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(0)?;
        {
            let mut s = lock(stats)?;
            let m = mean.detach().squeeze(0)?.to_dtype(DType::F32)?;
            let unbiased =
                (var.detach().squeeze(0)?.to_dtype(DType::F32)? * (n as f64 / (n - 1) as f64))?;
            s.mean = ((&s.mean * (1.0 - BN_MOMENTUM))? + (m * BN_MOMENTUM)?)?;
            s.var = ((&s.var * (1.0 - BN_MOMENTUM))? + (unbiased * BN_MOMENTUM)?)?;
        }
        (mean, var)
    } else {
        let s = lock(stats)?;
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
    use std::collections::HashMap;

    use super::*;
    use crate::testutil::{sum_error, SeededRng, U16};

    fn stats(t: &Tensor) -> (f64, f64, f64) {
        let v: Vec<f64> = t
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        let maxabs = v.iter().fold(0f64, |m, x| m.max(x.abs()));
        (mean, var.sqrt(), maxabs)
    }

    fn seeded(cfg: &DinoHeadConfig, seed: u64, dtype: DType) -> (DinoHead, VarMap) {
        let vm = VarMap::new();
        let vb = dinov2_model::init::seeded(&vm, seed, dtype, &Device::Cpu);
        (DinoHead::new(cfg, vb).unwrap(), vm)
    }

    fn small(nlayers: usize, use_bn: bool) -> DinoHeadConfig {
        DinoHeadConfig {
            nlayers,
            use_bn,
            hidden_dim: 8,
            bottleneck_dim: 4,
            ..DinoHeadConfig::new(6, 10)
        }
    }

    #[test]
    fn official_keys_and_shapes() {
        let cfg = DinoHeadConfig::new(384, 65536);
        let names = |cfg: &DinoHeadConfig| -> Vec<String> {
            let shapes = DinoHead::parameter_shapes(cfg).unwrap();
            shapes.into_iter().map(|(n, _)| n).collect()
        };
        assert_eq!(
            names(&cfg),
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
        let bn = names(&DinoHeadConfig {
            use_bn: true,
            ..cfg.clone()
        });
        assert!(bn.contains(&"mlp.1.weight".to_string()));
        assert!(bn.contains(&"mlp.6.weight".to_string()));
        let one = DinoHeadConfig {
            nlayers: 0, // clamped to 1 as official
            ..cfg
        };
        let shapes = DinoHead::parameter_shapes(&one).unwrap();
        assert_eq!(shapes[0], ("mlp.weight".to_string(), vec![256, 384]));
        assert_eq!(
            shapes[2],
            ("last_layer.weight_g".to_string(), vec![65536, 1])
        );
    }

    /// The init hints sampled by the seeded builder: trunc-normal(0.02) weights, zero biases, `g = 1`,
    /// `v ~ U(±1/√bottleneck)`. Sample moments of n draws are within 6 standard errors (σ/√n for the
    /// mean, σ/√(2n) for the standard deviation of a normal, ≈ σ·0.89/√n for a uniform's).
    #[test]
    fn official_init_distribution() {
        let cfg = DinoHeadConfig {
            hidden_dim: 512,
            bottleneck_dim: 64,
            ..DinoHeadConfig::new(128, 4096)
        };
        let (head, _) = seeded(&cfg, 7, DType::F32);
        let t: HashMap<String, Tensor> = head.named_parameters().iter().cloned().collect();
        let w = &t["mlp.2.weight"];
        let n = w.elem_count() as f64;
        let (m, s, _) = stats(w);
        assert!(m.abs() < 6.0 * 0.02 / n.sqrt(), "trunc normal mean {m}");
        assert!(
            (s - 0.02).abs() < 6.0 * 0.02 / (2.0 * n).sqrt(),
            "trunc normal std {s}"
        );
        assert_eq!(stats(&t["mlp.0.bias"]).2, 0.0);
        let (m, s, maxabs) = stats(&t["last_layer.weight_g"]);
        assert_eq!((m, s, maxabs), (1.0, 0.0, 1.0));
        let bound = 1.0 / 8.0;
        let v = &t["last_layer.weight_v"];
        let n = v.elem_count() as f64;
        let (m, s, maxabs) = stats(v);
        let std = bound / 3f64.sqrt();
        assert!(maxabs <= bound && maxabs > (1.0 - 10.0 / n) * bound);
        assert!(m.abs() < 6.0 * std / n.sqrt());
        assert!((s - std).abs() < 6.0 * 0.9 * std / n.sqrt());
        // deterministic in the seed
        let (again, _) = seeded(&cfg, 7, DType::F32);
        let d = (&t["mlp.0.weight"] - &again.named_parameters()[0].1).unwrap();
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
        let vb = dinov2_model::init::seeded(&vm, 0, DType::F32, &Device::Cpu);
        let head = DinoHead::new(&cfg, vb.pp("dino_head")).unwrap();
        let x = candle_core::Var::zeros((3, 8), DType::F32, &Device::Cpu).unwrap();
        let y = head.forward_train(x.as_tensor()).unwrap();
        assert_eq!(stats(&y).2, 0.0);
        let grads = y.sum_all().unwrap().backward().unwrap();
        for v in vm.all_vars() {
            let g = grads.get(v.as_tensor()).unwrap();
            assert!(stats(g).2.is_finite());
        }
        assert!(vm
            .data()
            .lock()
            .unwrap()
            .contains_key("dino_head.last_layer.weight_g"));
    }

    #[test]
    fn parametrizations_keys_and_half_precision() {
        let cfg = small(1, false);
        let (head, _) = seeded(&cfg, 1, DType::F32);
        let sd = head.state_dict().unwrap();
        let renamed: StateDict = sd
            .iter()
            .map(|(k, t)| (alias_of(k).unwrap_or(k.clone()), t.clone()))
            .collect();
        assert!(renamed.contains("last_layer.parametrizations.weight.original1"));
        let cpu = Device::Cpu;
        let new_keys = DinoHead::from_state_dict(&cfg, &renamed, "", &cpu, DType::F32).unwrap();
        let x = SeededRng::new(3).normal(&[2, 6], 0.0, 1.0, DType::F32);
        let d = (new_keys.forward(&x).unwrap() - head.forward(&x).unwrap()).unwrap();
        assert_eq!(stats(&d).2, 0.0);
        // official names in the VarMap even when the state dict has the parametrizations ones
        let vm = VarMap::new();
        let prefixed: StateDict = renamed
            .iter()
            .map(|(k, t)| (format!("h.{k}"), t.clone()))
            .collect();
        DinoHead::from_state_dict_trainable(&cfg, &prefixed, "h", &vm, &cpu, DType::F32).unwrap();
        assert!(vm
            .data()
            .lock()
            .unwrap()
            .contains_key("h.last_layer.weight_v"));
        // f16 weights and inputs (normalisation eps 1e-6): close to the f32 head
        let h16 = DinoHead::from_state_dict(&cfg, &sd, "", &cpu, DType::F16).unwrap();
        let y = h16.forward(&x.to_dtype(DType::F16).unwrap()).unwrap();
        let err = stats(&(y.to_dtype(DType::F32).unwrap() - head.forward(&x).unwrap()).unwrap()).2;
        // |y| ≤ g = 1; the f16 head rounds inputs, weights and every op's output to f16: a chain of at
        // most 16 roundings (or a sum of ≤ 16 terms) of relative size U16
        let tol = 2.0 * sum_error(16, U16);
        assert!(err <= tol, "f16 head deviates by {err} > {tol}");
    }

    #[test]
    fn wrong_inputs_and_state_dicts_are_typed_errors() {
        let cfg = small(1, false);
        let (h, _) = seeded(&cfg, 1, DType::F32);
        let x = Tensor::zeros((2, 5), DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(
            h.forward_train(&x),
            Err(Error::InputShape { input: "x", .. })
        ));
        assert!(h.forward(&x).is_err());
        let zero = DinoHeadConfig::new(0, 10);
        assert!(matches!(
            DinoHead::parameter_shapes(&zero),
            Err(Error::InvalidConfig {
                field: "in_dim",
                ..
            })
        ));
        // strict check under a prefix: other prefixes are not the head's business
        let sd: StateDict = h
            .state_dict()
            .unwrap()
            .into_iter()
            .map(|(k, t)| (format!("student.dino_head.{k}"), t))
            .chain([(
                "student.backbone.x".to_string(),
                Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
            )])
            .collect();
        DinoHead::check_state_dict(&cfg, &sd, "student.dino_head").unwrap();
        let mut extra = sd.clone();
        extra.insert(
            "student.dino_head.mlp.9.weight",
            Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap(),
        );
        assert!(matches!(
            DinoHead::check_state_dict(&cfg, &extra, "student.dino_head"),
            Err(Error::UnexpectedKey { ref key, .. }) if key == "student.dino_head.mlp.9.weight"
        ));
        let mut wrong = sd.clone();
        wrong.insert(
            "student.dino_head.last_layer.weight_g",
            Tensor::zeros(10, DType::F32, &Device::Cpu).unwrap(),
        );
        assert!(matches!(
            DinoHead::check_state_dict(&cfg, &wrong, "student.dino_head"),
            Err(Error::ShapeMismatch { ref expected, .. }) if expected == &[10, 1]
        ));
    }

    /// A trainable head from a state dict with BatchNorm statistics: the same outputs as the constant
    /// head, its parameters in the VarMap (not the statistics), and a detached view that follows
    /// in-place updates of the Vars.
    #[test]
    fn trainable_from_state_dict_and_detached() {
        let cfg = small(2, true);
        let (head, _) = seeded(&cfg, 5, DType::F32);
        let x = SeededRng::new(4).normal(&[4, 6], 0.0, 1.0, DType::F32);
        head.forward_train(&x).unwrap(); // non-trivial running statistics
        let sd = head.state_dict().unwrap();
        let vm = VarMap::new();
        let cpu = Device::Cpu;
        let trainable =
            DinoHead::from_state_dict_trainable(&cfg, &sd, "", &vm, &cpu, DType::F32).unwrap();
        assert_eq!(vm.all_vars().len(), trainable.named_parameters().len());
        let d = (trainable.forward(&x).unwrap() - head.forward(&x).unwrap()).unwrap();
        assert_eq!(stats(&d).2, 0.0);
        let teacher = trainable.detached();
        let before = teacher.forward(&x).unwrap();
        assert!(!before.track_op());
        let g = vm.data().lock().unwrap()["last_layer.weight_g"].clone();
        g.set(&(g.as_tensor() * 2.0).unwrap()).unwrap();
        // g → 2g doubles W and every output exactly (a power of two commutes with every rounding)
        let after = teacher.forward(&x).unwrap();
        let doubled = (before * 2.0).unwrap();
        assert_eq!(stats(&(after - doubled).unwrap()).2, 0.0);
    }
}
