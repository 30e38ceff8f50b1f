//! Parameter groups exactly as the official `utils/param_groups.py: get_params_groups_with_decay`.
//!
//! Per student submodule (backbone, DINO head, iBOT head), each parameter gets a learning-rate multiplier
//! (layer-wise decay for the backbone, `patch_embed_lr_mult` for the patch embedding), a weight-decay multiplier
//! (0 for biases, norms and LayerScale gammas; the tokens, `pos_embed` and the heads' `weight_g` *are* decayed, as
//! official) and a last-layer flag (the heads' `last_layer`, which follows the last-layer learning-rate schedule).

/// The optimisation settings of one parameter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParamGroup {
    /// Multiplies the scheduled learning rate.
    pub lr_multiplier: f64,
    /// Multiplies the scheduled weight decay.
    pub wd_multiplier: f64,
    /// Uses the last-layer learning rate (frozen for `freeze_last_layer_epochs`).
    pub is_last_layer: bool,
}

/// The official `get_vit_lr_decay_rate` for a parameter `name` of a backbone with `n_blocks` blocks (names as
/// the backbone's own `named_parameters`, unchunked `blocks.<i>.…` or chunked `blocks.<chunk>.<i>.…`).
///
/// Embeddings and tokens are layer 0, block `i` is layer `i + 1`, anything else (the final norm) is layer
/// `n_blocks + 1`; the multiplier is `decay^(n_blocks + 1 - layer)`.
///
/// ```
/// use dinov2_train::param_groups::layer_decay;
/// assert_eq!(layer_decay("norm.weight", 12, 0.9), 1.0);
/// assert_eq!(layer_decay("blocks.11.mlp.fc1.weight", 12, 0.9), 0.9);
/// assert_eq!(layer_decay("blocks.0.attn.qkv.weight", 12, 0.9), 0.9f64.powf(12.0));
/// assert_eq!(layer_decay("cls_token", 12, 0.9), 0.9f64.powf(13.0));
/// ```
pub fn layer_decay(name: &str, n_blocks: usize, decay: f64) -> f64 {
    let layer_id = backbone_layer_id(name, n_blocks);
    decay.powf((n_blocks + 1 - layer_id) as f64)
}

const LAYER_ZERO: [&str; 5] = [
    "pos_embed",
    "patch_embed",
    "mask_token",
    "cls_token",
    "register_tokens",
];

fn backbone_layer_id(name: &str, n_blocks: usize) -> usize {
    if LAYER_ZERO.iter().any(|k| name.contains(k)) {
        return 0;
    }
    if let Some(pos) = name.find("blocks.") {
        if !name.contains("residual.") {
            let mut parts = name[pos..].split('.').skip(1);
            let first = parts.next().and_then(|p| p.parse::<usize>().ok());
            let second = parts.next().and_then(|p| p.parse::<usize>().ok());
            // chunked `blocks.<chunk>.<i>` carries the global index second
            if let Some(i) = second.or(first) {
                return (i + 1).min(n_blocks + 1);
            }
        }
    }
    n_blocks + 1
}

/// The group of parameter `name` (relative to its submodule) of a submodule with `n_blocks` blocks (0 for
/// the heads, whose multiplier is then 1), as `get_params_groups_with_decay`.
///
/// ```
/// use dinov2_train::param_groups::param_group;
/// let g = param_group("patch_embed.proj.weight", 12, 0.9, 0.2);
/// assert!((g.lr_multiplier - 0.9f64.powf(13.0) * 0.2).abs() < 1e-15);
/// assert_eq!(g.wd_multiplier, 1.0);
/// assert_eq!(param_group("blocks.3.ls1.gamma", 12, 0.9, 0.2).wd_multiplier, 0.0);
/// assert_eq!(param_group("blocks.3.norm1.weight", 12, 0.9, 0.2).wd_multiplier, 0.0);
/// assert_eq!(param_group("pos_embed", 12, 0.9, 0.2).wd_multiplier, 1.0); // decayed, as official
/// let g = param_group("last_layer.weight_g", 0, 0.9, 0.2); // a head
/// assert_eq!((g.lr_multiplier, g.wd_multiplier, g.is_last_layer), (1.0, 1.0, true));
/// assert_eq!(param_group("mlp.0.bias", 0, 0.9, 0.2).wd_multiplier, 0.0);
/// ```
pub fn param_group(
    name: &str,
    n_blocks: usize,
    layerwise_decay: f64,
    patch_embed_lr_mult: f64,
) -> ParamGroup {
    let mut lr_multiplier = if n_blocks > 0 {
        layer_decay(name, n_blocks, layerwise_decay)
    } else {
        1.0
    };
    if name.contains("patch_embed") {
        lr_multiplier *= patch_embed_lr_mult;
    }
    let no_decay = name.ends_with(".bias") || name.contains("norm") || name.contains("gamma");
    ParamGroup {
        lr_multiplier,
        wd_multiplier: if no_decay { 0.0 } else { 1.0 },
        is_last_layer: name.contains("last_layer"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_and_unchunked_block_names_agree() {
        for i in 0..12 {
            let a = layer_decay(&format!("blocks.{i}.attn.proj.weight"), 12, 0.8);
            let b = layer_decay(&format!("blocks.{}.{i}.attn.proj.weight", i / 3), 12, 0.8);
            assert_eq!(a, b);
            assert_eq!(a, 0.8f64.powf((12 - i) as f64));
        }
    }

    #[test]
    fn every_vit_parameter_gets_the_official_group() {
        let cfg = {
            let mut c = dinov2_model::VitConfig::vit_small().with_registers(4);
            c.depth = 2;
            c
        };
        let shapes = dinov2_model::DinoVisionTransformer::parameter_shapes(&cfg).unwrap();
        for (name, _) in shapes {
            let g = param_group(&name, 2, 0.5, 0.2);
            let decayed =
                !(name.ends_with(".bias") || name.contains("norm") || name.ends_with("gamma"));
            assert_eq!(g.wd_multiplier == 1.0, decayed, "{name}");
            assert!(!g.is_last_layer);
            let want = if LAYER_ZERO.iter().any(|k| name.starts_with(k)) {
                0.125
                    * if name.starts_with("patch_embed") {
                        0.2
                    } else {
                        1.0
                    }
            } else if name.starts_with("blocks.0.") {
                0.25
            } else if name.starts_with("blocks.1.") {
                0.5
            } else {
                assert!(name.starts_with("norm."), "{name}");
                1.0
            };
            assert!((g.lr_multiplier - want).abs() < 1e-15, "{name}");
        }
    }
}
