//! lmforge's own model directory: `config.json` (a [`ModelConfig`]), `model.safetensors`
//! under canonical names, and `tokenizer.json` when the model has one.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::hf::{read_safetensors_dir, write_safetensors};
use super::{LoadedModel, TextTokenizer};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::nn::params::check_weights;

pub fn load_native_dir(dir: &Path, device: &Device) -> Result<LoadedModel> {
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let weights = read_safetensors_dir(dir, device)?;
    check_weights(&config, &weights, &dir.join("model.safetensors"))?;
    let tokenizer = TextTokenizer::from_dir(dir)?;
    Ok(LoadedModel { config, weights, quantized: Default::default(), tokenizer, source: dir.to_path_buf() })
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
