//! One call from a model name or path to a ready model: [`load_model`].

use candle_core::{DType, Device};

use crate::error::Result;
use crate::hub::{resolve_weights, HubOptions};
use crate::vit::DinoVisionTransformer;
use crate::weights::{load_weights_with, LoadOptions, LoadedWeights};

/// A loaded backbone and what was found next to it in the checkpoint (see [`load_model_with`]).
#[derive(Debug)]
pub struct LoadedModel {
    /// The backbone.
    pub model: DinoVisionTransformer,
    /// Where the weights came from, their layout, and any non-backbone tensors (e.g. `classifier.*`).
    pub weights: LoadedWeights,
}

/// Loads a backbone from `spec`: a weights file or directory in any supported layout (official `.pth` or
/// safetensors, Hugging Face `transformers` directory, timm safetensors, official training checkpoint), an
/// official name (`dinov2_vits14`, `dinov2_vitg14_reg`), or a Hub id (`facebook/dinov2-small`), downloaded
/// once into the Hugging Face cache (environment as the Python client: `HF_ENDPOINT`, `HF_HOME`,
/// `HF_HUB_CACHE`, `HF_HUB_OFFLINE`, `HF_TOKEN`).
///
/// ```no_run
/// use candle_core::{DType, Device};
/// # fn main() -> dinov2_model::Result<()> {
/// let model = dinov2_model::load_model("dinov2_vits14_reg", &Device::Cpu, DType::F32)?;
/// assert_eq!(model.config().num_register_tokens, 4);
/// # Ok(()) }
/// ```
///
/// A local file needs no network:
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let mut cfg = dinov2_model::VitConfig::vit_small().with_registers(4);
/// # (cfg.depth, cfg.img_size) = (1, 28);
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("dinov2_tiny_reg4.safetensors");
/// # dinov2_model::weights::save_safetensors(&dinov2_model::init::init_state_dict(&cfg, 0)?, &path)?;
/// let model = dinov2_model::load_model(path.to_str().unwrap(), &Device::Cpu, DType::F32)?;
/// assert_eq!(model.config().num_register_tokens, 4);
/// assert!(model.is_fused());
/// assert_eq!(model.forward(&Tensor::zeros((1, 3, 28, 28), DType::F32, &Device::Cpu)?)?.dims(), &[1, 384]);
/// # Ok(()) }
/// ```
pub fn load_model(spec: &str, device: &Device, dtype: DType) -> Result<DinoVisionTransformer> {
    Ok(load_model_with(
        spec,
        &HubOptions::from_env(),
        &LoadOptions::default(),
        device,
        dtype,
    )?
    .model)
}

/// [`load_model`] with explicit Hub and checkpoint options, returning the checkpoint's metadata too.
///
/// ```
/// use candle_core::{DType, Device};
/// use dinov2_model::hub::HubOptions;
/// use dinov2_model::weights::{LoadOptions, WeightFormat};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mut cfg = dinov2_model::VitConfig::vit_small();
/// (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.img_size) = (32, 2, 1, 28); // not a released width
/// let dir = tempfile::tempdir()?;
/// dinov2_model::weights::save_transformers(&dinov2_model::init::init_state_dict(&cfg, 0)?, &cfg, dir.path())?;
/// let hub = HubOptions { offline: true, ..HubOptions::from_env() }; // never download
/// let loaded = dinov2_model::load_model_with(
///     dir.path().to_str().unwrap(), &hub, &LoadOptions::default(), &Device::Cpu, DType::F32)?;
/// assert_eq!(loaded.weights.format, WeightFormat::Transformers);
/// assert_eq!(loaded.model.config().num_heads, 2); // from config.json
/// # Ok(()) }
/// ```
pub fn load_model_with(
    spec: &str,
    hub: &HubOptions,
    opts: &LoadOptions,
    device: &Device,
    dtype: DType,
) -> Result<LoadedModel> {
    let path = resolve_weights(spec, hub)?;
    let weights = load_weights_with(&path, opts)?;
    let model = DinoVisionTransformer::from_state_dict(
        &weights.config,
        &weights.state_dict,
        device,
        dtype,
    )?;
    Ok(LoadedModel { model, weights })
}
