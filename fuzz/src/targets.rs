//! The fuzz targets' bodies: one function per parser family, taking the raw input bytes and returning the first
//! error of its main parse (`Err` for a rejected input). They never panic on any input: that is what the
//! fuzzers check. The same file is compiled into the workspace test `tests/fuzz_regressions.rs`, which replays the
//! seed corpora and every input a fuzzer ever crashed on (`fuzz/regressions/<target>/`).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use dinov2_curate::{npy, store::Embeddings};
use dinov2_data::dataset::TarDataset;
use dinov2_data::{decode_rgb, preprocess, DecodeOptions, Preprocess};
use dinov2_data::{Dataset, FileDataset};
use dinov2_model::vit::DinoVisionTransformer;
use dinov2_model::weights::{load_weights, stored_config};
use dinov2_model::VitConfig;
use dinov2_train::TrainConfig;

/// A target: the input bytes in, the first error of its main parse out.
pub type Target = fn(&[u8]) -> Result<(), String>;

/// The targets by name, as `tools/fuzz.sh` and the replay test know them.
pub const TARGETS: &[(&str, Target)] = &[
    ("weights", weights),
    ("npy", npy),
    ("image", image),
    ("tar", tar),
    ("config", config),
    ("hf_config", hf_config),
    ("text", text_files),
];

/// A scratch directory of this process and thread, under `$DINOV2_FUZZ_SCRATCH` (which `tools/fuzz.sh` sets and
/// removes), else `/dev/shm` when it exists (to keep the disk out), else the temporary directory.
pub fn scratch_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    let base = match std::env::var_os("DINOV2_FUZZ_SCRATCH") {
        Some(d) => PathBuf::from(d),
        None if shm.is_dir() => shm.to_path_buf(),
        None => std::env::temp_dir(),
    };
    let tid = format!("{:?}", std::thread::current().id());
    let tid: String = tid.chars().filter(char::is_ascii_digit).collect();
    let dir = base.join(format!("dinov2-fuzz-{}-{tid}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("cannot create the fuzz scratch directory");
    dir
}

/// Writes `data` to `name` in the scratch directory and returns its path.
pub fn scratch_file(name: &str, data: &[u8]) -> PathBuf {
    let path = scratch_dir().join(name);
    std::fs::write(&path, data).expect("cannot write the fuzz scratch file");
    path
}

fn text<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// Weight files: container sniffing, safetensors headers and data, zip `.pth` (zip + pickle), the configuration
/// in the safetensors metadata, layout conversion, config inference, the finiteness check and the model build.
pub fn weights(data: &[u8]) -> Result<(), String> {
    let path = scratch_file("weights.bin", data);
    let _ = stored_config(&path);
    let w = load_weights(&path).map_err(text)?;
    DinoVisionTransformer::from_state_dict(&w.config, &w.state_dict, &Device::Cpu, DType::F32)
        .map_err(text)?;
    Ok(())
}

/// `.npy` files: the header parser, the whole-file readers, and the embedding store (memory-mapped f32 and
/// converted types, as `.npy` and as `.safetensors`) with its finiteness check.
pub fn npy(data: &[u8]) -> Result<(), String> {
    let _ = npy::parse_header(data, Path::new("fuzz.npy"));
    let path = scratch_file("fuzz.npy", data);
    let _ = npy::read_i64(&path);
    let _ = Embeddings::open(&scratch_file("fuzz.safetensors", data)).map(|e| e.normalized());
    let f = npy::read_f32(&path).map(|_| ());
    let e = Embeddings::open(&path).map_err(text)?;
    if e.rows() > 0 {
        let _ = e.row(e.rows() - 1);
    }
    let _ = e.normalized();
    f.map_err(text)
}

/// Images: format detection, every enabled decoder, EXIF orientation, conversion to RGB, and the evaluation
/// preprocessing that follows decoding.
pub fn image(data: &[u8]) -> Result<(), String> {
    // A smaller pixel limit than the default keeps each execution fast; the check itself is what is exercised.
    let opts = DecodeOptions {
        max_pixels: 1 << 20,
        ..DecodeOptions::default()
    };
    let img = decode_rgb(data, &opts).map_err(text)?;
    preprocess(&img, &Preprocess::eval_at(28)).map_err(text)?;
    preprocess(&img, &Preprocess::CenterPad { multiple: 14 }).map_err(text)?;
    Ok(())
}

/// Tar shards: the header scan (ustar, GNU long names, base-256 sizes, pax records), the `.cls` labels and the
/// member reads.
pub fn tar(data: &[u8]) -> Result<(), String> {
    let path = scratch_file("shard.tar", data);
    let ds = TarDataset::open([&path]).map_err(text)?;
    for i in 0..ds.entries.len().min(16) {
        ds.read_bytes(i).map_err(text)?;
    }
    match ds.warnings.first() {
        Some(w) => Err(w.clone()),
        None => Ok(()),
    }
}

/// Configurations: the training YAML (merged onto the defaults, validated, then every derived configuration), a
/// `key=value` override, and a model configuration as JSON (as stored in safetensors metadata).
pub fn config(data: &[u8]) -> Result<(), String> {
    let text_in = std::str::from_utf8(data).map_err(text)?;
    let _ = TrainConfig::default().apply_overrides(&[text_in]);
    if let Ok(v) = serde_json::from_str::<VitConfig>(text_in) {
        if v.validate().is_ok() {
            let _ = (v.ffn_hidden_dim(), v.num_pos_tokens());
        }
    }
    let cfg = TrainConfig::from_yaml_str(text_in, "fuzz.yaml").map_err(text)?;
    cfg.validate().map_err(text)?;
    cfg.student_vit().map_err(text)?;
    cfg.teacher_vit().map_err(text)?;
    cfg.augmentation().map_err(text)?;
    let _ = (cfg.masking(), cfg.loss(), cfg.max_iter(), cfg.to_yaml());
    Ok(())
}

/// The committed `transformers` fixture model (tiny), for the `config.json` target. This file is compiled from
/// `fuzz/` and from the workspace root.
fn hf_fixture() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rel = "crates/dinov2-model/tests/fixtures/plain/hf/model.safetensors";
    [here.join(rel), here.join("..").join(rel)]
        .into_iter()
        .find(|p| p.is_file())
        .expect("the transformers fixture model")
}

/// A `transformers` directory: `config.json` (the input) next to a fixed tiny `model.safetensors`, loaded as a
/// directory: the JSON parse, the check that it describes a DINOv2, and the config inference that trusts its
/// fields (sizes, heads, registers, layer-norm eps, ...), then the model build.
pub fn hf_config(data: &[u8]) -> Result<(), String> {
    let dir = scratch_dir().join("hf");
    std::fs::create_dir_all(&dir).map_err(text)?;
    let model = dir.join("model.safetensors");
    if !model.is_file() {
        std::fs::copy(hf_fixture(), &model).map_err(text)?;
    }
    std::fs::write(dir.join("config.json"), data).map_err(text)?;
    let w = load_weights(&dir).map_err(text)?;
    DinoVisionTransformer::from_state_dict(&w.config, &w.state_dict, &Device::Cpu, DType::F32)
        .map_err(text)?;
    Ok(())
}

/// Text files users hand over: image lists (`.txt` and `.csv`, with labels and headers), the row-to-path map
/// of curation, and `training_metrics.jsonl` read and drawn by the loss plot (axis ranges from any numbers).
pub fn text_files(data: &[u8]) -> Result<(), String> {
    let _ = dinov2_curate::store::read_paths(&scratch_file("paths.txt", data));
    for name in ["list.txt", "list.csv"] {
        if let Ok(ds) = FileDataset::file_list(scratch_file(name, data)) {
            for i in 0..ds.len().min(4) {
                let _ = (ds.label(i), ds.describe(i));
            }
        }
    }
    let series =
        dinov2_train::plot::read_loss_series(scratch_file("metrics.jsonl", data)).map_err(text)?;
    let _ = dinov2_train::plot::render(&series, "fuzz", 160, 100);
    if series.is_empty() {
        return Err("no loss series".into());
    }
    Ok(())
}
