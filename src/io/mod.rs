//! The one place that knows file formats and checkpoint tensor names.
//!
//! Every loader produces a [`LoadedModel`]: a validated [`ModelConfig`], the weights under
//! lmforge's canonical parameter names (see [`ModelConfig::param_specs`]), and the tokenizer
//! when the source carries one.

pub mod hf;
pub mod native;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::Model;

/// A model read from disk, ready to build.
pub struct LoadedModel {
    pub config: ModelConfig,
    /// Canonical name → tensor (f32), exactly the names of `config.param_specs()`.
    pub weights: HashMap<String, Tensor>,
    pub tokenizer: Option<TextTokenizer>,
    /// Where it came from, for messages.
    pub source: PathBuf,
}

impl LoadedModel {
    pub fn build(&self) -> Result<Model> {
        Model::new(&self.config, &self.weights, &self.source)
    }
}

/// What kind of model source a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Gguf,
    /// `config.json` with a `model_type` + safetensors.
    HuggingFace,
    /// lmforge's own directory: `config.json` holding a [`ModelConfig`] + `model.safetensors`.
    Native,
}

/// Decide what `path` holds, without reading the weights.
pub fn source_kind(path: &Path) -> Result<SourceKind> {
    if path.is_file() {
        return if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
            Ok(SourceKind::Gguf)
        } else {
            Err(Error::checkpoint(path, "expected a .gguf file or a model directory"))
        };
    }
    let config_path = path.join("config.json");
    if !path.is_dir() {
        return Err(Error::checkpoint(path, "no such file or directory"));
    }
    if !config_path.exists() {
        return Err(Error::checkpoint(
            path,
            "not a model directory: no config.json\nHINT: pass a Hugging Face model directory, an lmforge checkpoint or run directory, or a .gguf file",
        ));
    }
    let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::checkpoint(&config_path, format!("not valid JSON: {e}")))?;
    Ok(if json.get("model_type").is_some() { SourceKind::HuggingFace } else { SourceKind::Native })
}

/// Load any supported model source: `.gguf`, Hugging Face directory, or lmforge directory.
pub fn load_model(path: &Path, device: &Device) -> Result<LoadedModel> {
    match source_kind(path)? {
        SourceKind::Gguf => Err(Error::Unsupported("GGUF loading is not wired in yet".into())),
        SourceKind::HuggingFace => hf::load_hf_dir(path, device),
        SourceKind::Native => native::load_native_dir(path, device),
    }
}

/// The architecture of a model source without reading its weights where the format allows.
pub fn read_config(path: &Path) -> Result<ModelConfig> {
    match source_kind(path)? {
        SourceKind::Gguf => Ok(load_model(path, &Device::Cpu)?.config),
        SourceKind::HuggingFace => hf::read_hf_config(path),
        SourceKind::Native => ModelConfig::from_file(&path.join("config.json")),
    }
}

/// An architecture named by the user: a preset name, a config file (.toml/.json), a model
/// directory or a .gguf file, with `--set` overrides applied.
pub fn resolve_arch(arch: &str, settings: &[String]) -> Result<ModelConfig> {
    let path = Path::new(arch);
    let base = if path.is_dir() || path.extension().is_some_and(|e| e == "gguf") {
        read_config(path)?
    } else if path.is_file() {
        ModelConfig::from_file(path)?
    } else {
        crate::config::presets::get(arch).map_err(|e| match e {
            Error::UnknownPreset { name, known } => Error::Input(format!(
                "`{name}` is neither a file, a directory nor a preset name; known presets: {known}"
            )),
            other => other,
        })?
    };
    crate::config::apply_overrides(&base, settings)
}

/// Placeholder until the tokenizer module lands.
pub struct TextTokenizer;

impl TextTokenizer {
    pub fn from_dir(_dir: &std::path::Path) -> crate::Result<Option<Self>> {
        Ok(None)
    }
    pub fn save(&self, _path: &std::path::Path) -> crate::Result<()> {
        Ok(())
    }
    pub fn encode(&self, _t: &str, _s: bool) -> crate::Result<Vec<u32>> {
        Ok(vec![])
    }
    pub fn apply_chat_template(&self, _t: &str) -> crate::Result<String> {
        Ok(String::new())
    }
    pub fn eos_ids(&self) -> &[u32] {
        &[]
    }
    pub fn stream_decoder(&self) -> StreamDecoder {
        StreamDecoder
    }
}
pub struct StreamDecoder;
impl StreamDecoder {
    pub fn push(&mut self, _id: u32) -> crate::Result<String> {
        Ok(String::new())
    }
}
