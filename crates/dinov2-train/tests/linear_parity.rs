//! `eval::linear` against the official `eval/linear.py` on a tiny random ViT (5 blocks, 2 registers):
//! `tools/make_linear_fixtures.py` wrote `tests/fixtures/linear.safetensors` with the official
//! `create_linear_input` of the four feature configurations and six steps of the official heads, SGD with
//! momentum and `CosineAnnealingLR` on fixed minibatches.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use dinov2_model::{DinoVisionTransformer, StateDict, VitConfig};
use dinov2_train::eval::linear::{
    head_names, official_grid, scaled_lr, FeatureConfig, LinearFeatures, LinearHeads,
};

struct Fixture {
    tensors: HashMap<String, Tensor>,
    meta: HashMap<String, String>,
}

fn fixture() -> Fixture {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/linear.safetensors"
    );
    let bytes = std::fs::read(path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    Fixture {
        tensors: candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap(),
        meta: header.metadata().clone().unwrap(),
    }
}

impl Fixture {
    fn t(&self, key: &str) -> &Tensor {
        &self.tensors[key]
    }

    fn meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> T {
        serde_json::from_str(&self.meta[key]).unwrap()
    }

    fn labels(&self) -> Vec<usize> {
        self.t("labels")
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|v| usize::try_from(v).unwrap())
            .collect()
    }

    fn input(&self, n: usize, avgpool: bool) -> &Tensor {
        let pool = if avgpool { "True" } else { "False" };
        self.t(&format!("input.{n}_{pool}"))
    }
}

/// max |a - b| / max(1, max |b|).
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let m = b.abs().unwrap().max_all().unwrap();
    d.to_scalar::<f32>().unwrap() / m.to_scalar::<f32>().unwrap().max(1.0)
}

const CONFIGS: [(usize, bool); 4] = [(1, false), (1, true), (4, false), (4, true)];

#[test]
fn features_match_the_official_create_linear_input() {
    let f = fixture();
    let cfg: VitConfig = f.meta("vit_config");
    let sd: StateDict = f
        .tensors
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("backbone.")?.to_string(), v.clone())))
        .collect();
    let model =
        DinoVisionTransformer::from_state_dict(&cfg, &sd, &Device::Cpu, DType::F32).unwrap();
    let ours = LinearFeatures::from_images(&model, f.t("images"), 4, f.labels()).unwrap();
    for (n, avgpool) in CONFIGS {
        let config = FeatureConfig {
            n_last_blocks: n,
            avgpool,
        };
        let x = ours.linear_input(config).unwrap();
        assert_eq!(x.dims(), &[12, config.input_dim(cfg.embed_dim)]);
        let d = rel_diff(&x, f.input(n, avgpool));
        assert!(d < 1e-5, "{}: {d}", config.describe());
    }
}

#[test]
fn sgd_steps_match_the_official_heads_optimizer_and_schedule() {
    let f = fixture();
    let d = 16;
    // the cache, rebuilt from the official inputs: [cls(d-4) .. cls(d-1)] and [cls(d-1), patch mean]
    let four = f.input(4, false);
    let class_tokens: Vec<Tensor> = (0..4).map(|i| four.narrow(1, i * d, d).unwrap()).collect();
    let patch_mean = f.input(1, true).narrow(1, d, d).unwrap();
    let features = LinearFeatures::new(class_tokens, patch_mean, f.labels()).unwrap();
    for (n, avgpool) in CONFIGS {
        let config = FeatureConfig {
            n_last_blocks: n,
            avgpool,
        };
        assert_eq!(
            rel_diff(&features.linear_input(config).unwrap(), f.input(n, avgpool)),
            0.0
        );
    }

    let n_last_blocks: Vec<usize> = f.meta("n_last_blocks");
    let learning_rates: Vec<f64> = f.meta("learning_rates");
    let batch_size: usize = f.meta("batch_size");
    let max_iter: usize = f.meta("max_iter");
    let specs = official_grid(&n_last_blocks, &learning_rates);
    let names: Vec<String> = f.meta("head_names");
    assert_eq!(head_names(&specs, batch_size), names);
    let official_lrs = f.t("scaled_lrs").to_vec1::<f64>().unwrap();
    for (spec, lr) in specs.iter().zip(&official_lrs) {
        assert_eq!(scaled_lr(spec.lr, batch_size), *lr);
    }

    let head = |stage: &str, h: usize| {
        (
            f.t(&format!("{stage}.{h}.weight")).clone(),
            f.t(&format!("{stage}.{h}.bias")).clone(),
        )
    };
    let init = (0..specs.len()).map(|h| head("init", h)).collect();
    let mut heads =
        LinearHeads::with_weights(specs.clone(), d, init, batch_size, max_iter).unwrap();
    let batches: Vec<Vec<i64>> = f.t("batches").to_vec2().unwrap();
    let losses = f.t("losses").to_vec1::<f32>().unwrap();
    for (step, rows) in batches.iter().enumerate() {
        let rows: Vec<usize> = rows.iter().map(|&r| usize::try_from(r).unwrap()).collect();
        let loss = heads.step(&features.select(&rows).unwrap()).unwrap();
        let official = f64::from(losses[step]);
        assert!(
            (loss - official).abs() < 1e-5 * official,
            "step {step}: loss {loss} vs {official}"
        );
    }
    let ours = heads.weights().unwrap();
    for (h, (w, b)) in ours.iter().enumerate() {
        let (w_ref, b_ref) = head("final", h);
        let (w0, _) = head("init", h);
        assert!(
            rel_diff(&w_ref, &w0) > 1e-2,
            "head {h} barely moved: a vacuous test"
        );
        let (dw, db) = (rel_diff(w, &w_ref), rel_diff(b, &b_ref));
        assert!(
            dw < 1e-5 && db < 1e-5,
            "{}: weight {dw}, bias {db}",
            names[h]
        );
    }
}
