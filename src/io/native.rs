//! lmforge's own model directory: `config.json` (a [`ModelConfig`]), `model.safetensors`
//! under canonical names, and `tokenizer.json` when the model has one.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::hf::{write_safetensors, SafetensorsDir};
use super::{LoadedModel, TextTokenizer, WeightDtype, WeightSink};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::nn::params::check_shapes;

/// Load an lmforge model directory (a training checkpoint is one), every weight `f32`.
pub fn load_native_dir(dir: &Path, device: &Device) -> Result<LoadedModel> {
    load_native(dir, device, WeightDtype::F32)
}

/// [`load_native_dir`] with each matrix held as `dtype` says from the moment it is read; the
/// names and shapes are checked against the config before any data is read.
pub fn load_native(dir: &Path, device: &Device, dtype: WeightDtype) -> Result<LoadedModel> {
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let mut file = SafetensorsDir::open(dir)?;
    let names = file.names();
    let shapes = names.iter().map(|n| (n.as_str(), file.dims(n).expect("listed").to_vec())).collect();
    check_shapes(&config, shapes, &dir.join("model.safetensors"))?;
    let mut sink = WeightSink::new(&config, dtype, device, dir)?;
    for name in names {
        let tensor = file.take(&name, device)?.expect("listed");
        sink.put(name, tensor)?;
    }
    let (weights, quantized) = sink.finish();
    let tokenizer = TextTokenizer::from_dir(dir)?;
    Ok(LoadedModel { config, weights, quantized, tokenizer, source: dir.to_path_buf() })
}

/// Write config, weights and tokenizer into `dir` (created if needed).
pub fn save_native_dir(
    config: &ModelConfig,
    weights: &HashMap<String, Tensor>,
    tokenizer: Option<&TextTokenizer>,
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let config_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(config).expect("config serialises");
    std::fs::write(&config_path, text).map_err(|e| Error::io(&config_path, e))?;
    write_safetensors(weights, &dir.join("model.safetensors"))?;
    if let Some(tokenizer) = tokenizer {
        tokenizer.save(&dir.join("tokenizer.json"))?;
    }
    Ok(())
}
