//! Typed errors of the crate: [`Error`] and [`Result`].

/// Everything that can go wrong while building a head or computing a loss.
///
/// Variants name what a caller can act on: the configuration field or argument and its value, the input
/// and its expected and actual shape, the checkpoint key.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use dinov2_loss::{DinoLoss, DinoLossConfig, Error};
/// let err = DinoLoss::new(DinoLossConfig { student_temp: 0.0, ..DinoLossConfig::new(8) }, &Device::Cpu)
///     .unwrap_err();
/// assert!(matches!(err, Error::InvalidConfig { field: "student_temp", .. }));
///
/// let mut loss = DinoLoss::new(DinoLossConfig::new(8), &Device::Cpu).unwrap();
/// let wrong = Tensor::zeros((2, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
/// let err = loss.update_center(&wrong).unwrap_err();
/// assert!(matches!(err, Error::InputShape { input: "teacher logits", ref actual, .. } if actual == &[2, 5]));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An error from candle (a failed op, a device error, a missing tensor in a `VarBuilder`, ...).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// An error from `dinov2-model` (copying a [`crate::StateDict`] into a `VarMap`).
    #[error(transparent)]
    Model(#[from] dinov2_model::Error),

    /// A configuration field outside its domain.
    #[error("invalid configuration: `{field}` = {value}: {reason}")]
    InvalidConfig {
        /// The field of the configuration struct.
        field: &'static str,
        /// Its value (sizes as floats).
        value: f64,
        /// What the value must be.
        reason: &'static str,
    },

    /// A scalar argument outside its domain (a temperature, an iteration or sample count, ...).
    #[error("invalid argument `{name}` = {value}: {reason}")]
    InvalidArgument {
        /// The argument.
        name: &'static str,
        /// Its value (counts as floats).
        value: f64,
        /// What the value must be.
        reason: &'static str,
    },

    /// An input tensor with the wrong shape.
    #[error("`{input}` has shape {actual:?}, expected {expected}")]
    InputShape {
        /// The input, as the method's documentation names it.
        input: &'static str,
        /// The shape expected, with the sizes known from the configuration and the other inputs filled in.
        expected: String,
        /// The shape given.
        actual: Vec<usize>,
    },

    /// An input the configuration needs was not given.
    #[error("missing input `{input}`: {reason}")]
    MissingInput {
        /// The input (a field of the inputs struct, or an argument).
        input: &'static str,
        /// Why it is needed.
        reason: &'static str,
    },

    /// The operation is undefined for so few rows (KoLeo and a train-mode BatchNorm need two).
    #[error("{what} needs at least {needed} rows per batch, got {rows}")]
    DegenerateBatch {
        /// The operation.
        what: &'static str,
        /// Rows given.
        rows: usize,
        /// Rows needed.
        needed: usize,
    },

    /// Every term of the combined loss is switched off for these inputs.
    #[error(
        "every loss term is disabled (no local crops, and dino_loss_weight, koleo_loss_weight and \
         ibot_loss_weight give nothing to add): set a weight above 0"
    )]
    NoLossTerm,

    /// A parameter of the head is absent from the state dict.
    #[error("missing weight `{key}` (the head expects shape {expected:?})")]
    MissingKey {
        /// The key, prefix included.
        key: String,
        /// The shape the head expects.
        expected: Vec<usize>,
    },

    /// A parameter or buffer of the head has another shape in the state dict.
    #[error(
        "weight `{key}` has shape {actual:?} in the state dict but the head expects {expected:?}"
    )]
    ShapeMismatch {
        /// The key, prefix included.
        key: String,
        /// The shape the head expects.
        expected: Vec<usize>,
        /// The shape found.
        actual: Vec<usize>,
    },

    /// A tensor under the head's prefix that this configuration does not have (strict loading, as the
    /// official `load_state_dict`).
    #[error(
        "unexpected weight `{key}` with shape {shape:?} under the head's prefix: the state dict does not \
         match the head configuration (layers, hidden/bottleneck width, BatchNorm, MLP bias)"
    )]
    UnexpectedKey {
        /// The key, prefix included.
        key: String,
        /// Its shape.
        shape: Vec<usize>,
    },

    /// A collective operation (a global-batch sum over the ranks) failed; see [`dinov2_dist::Error`].
    #[error(transparent)]
    Dist(#[from] dinov2_dist::Error),

    /// A lock was poisoned by a thread that panicked while holding it.
    #[error("the {what} lock is poisoned: a thread panicked while holding it")]
    LockPoisoned {
        /// What the lock guards.
        what: &'static str,
    },
}

/// Result alias of the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::InputShape`] for `input` of shape `actual`.
    pub(crate) fn shape(
        input: &'static str,
        expected: impl Into<String>,
        actual: &[usize],
    ) -> Self {
        Error::InputShape {
            input,
            expected: expected.into(),
            actual: actual.to_vec(),
        }
    }
}
