//! Turning the user's ARCH / --model argument into a config or a loaded model.

use std::path::Path;

use anyhow::Context;
use candle_core::Device;
use lmforge::config::{apply_overrides, presets, ModelConfig};
use lmforge::io::{self, LoadedModel};

/// ARCH is a preset name, a config file (.toml/.json), a model directory or a .gguf file;
/// `--set` overrides apply on top.
pub fn resolve_config(arch: &str, settings: &[String]) -> anyhow::Result<ModelConfig> {
    let path = Path::new(arch);
    let base = if path.is_dir() || path.extension().is_some_and(|e| e == "gguf") {
        io::read_config(path)?
    } else if path.is_file() {
        ModelConfig::from_file(path)?
    } else {
        presets::get(arch).context("ARCH is neither a file nor a directory, so it was read as a preset name")?
    };
    Ok(apply_overrides(&base, settings)?)
}

/// Load `--model` onto the CPU.
pub fn load(model: &Path) -> anyhow::Result<LoadedModel> {
    io::load_model(model, &Device::Cpu).with_context(|| format!("loading model {}", model.display()))
}
