//! The one place that knows file formats and checkpoint tensor names.
//!
//! Every loader produces a [`LoadedModel`]: a validated [`ModelConfig`], the weights under
//! lmforge's canonical parameter names (see [`ModelConfig::param_specs`]), and the tokenizer
//! when the source carries one.

mod dtype;
pub mod gguf;
pub mod hf;
pub mod native;
pub mod tokenizer;

pub(crate) use dtype::WeightSink;
pub use dtype::{held_in_bf16, LoadOptions, WeightDtype};
pub use tokenizer::{StreamDecoder, TextTokenizer};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::nn::QuantizedWeights;

/// A model read from disk, ready to build.
pub struct LoadedModel {
    pub config: ModelConfig,
    /// Canonical name → tensor (f32): with `quantized`, exactly the names of
    /// `config.param_specs()`.
    pub weights: HashMap<String, Tensor>,
    /// Weights kept in GGUF quantized blocks or in bf16 (as [`LoadOptions`] asked: for running
    /// a model); empty otherwise, so training and export see every weight as a tensor.
    pub quantized: QuantizedWeights,
    pub tokenizer: Option<TextTokenizer>,
    /// Where it came from, for messages.
    pub source: PathBuf,
}

impl LoadedModel {
    /// The model, its weights moved onto 2 MiB pages ([`crate::host_memory::back_with_huge_pages`]:
    /// decoding streams them all every token).
    pub fn build(&self) -> Result<Model> {
        let model = Model::with_quantized(&self.config, &self.weights, &self.quantized, &self.source)?;
        let dense = self.weights.values().filter_map(crate::host_memory::tensor_region);
        let blocks = self.quantized.values().map(|q| q.region());
        crate::host_memory::back_with_huge_pages(dense.chain(blocks));
        Ok(model)
    }
}

/// What kind of model source a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Gguf,
    /// `config.json` with a `model_type` + safetensors.
    HuggingFace,
    /// lmforge's own directory: `config.json` holding a [`ModelConfig`] + `model.safetensors`
    /// (a training checkpoint is one).
    Native,
    /// A training run directory: its newest valid checkpoint.
    Run,
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
    if !config_path.exists() && path.join(crate::train::checkpoint::CHECKPOINTS_DIR).is_dir() {
        return Ok(SourceKind::Run);
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

/// Load any supported model source: `.gguf`, Hugging Face directory, or lmforge directory,
/// every weight an `f32` tensor (for training and export).
pub fn load_model(path: &Path, device: &Device) -> Result<LoadedModel> {
    load_model_with(path, device, LoadOptions::default())
}

/// [`load_model`] for running a model, not training it: a GGUF file's quantized matrices
/// (`Q4_0`, `Q4_1`, `Q8_0`, `Q4_K`, `Q6_K`, `BF16`) stay in their blocks on the CPU and run on
/// lmforge's kernels ([`crate::nn::ops::quant`]), so memory holds about the file's size; other
/// sources load as [`load_model`] does.
pub fn load_model_for_inference(path: &Path, device: &Device) -> Result<LoadedModel> {
    load_model_with(path, device, LoadOptions::inference(WeightDtype::F32))
}

/// Load a model source as `options` say. With [`WeightDtype::Bf16`] each matrix is converted
/// as it is read, so loading never holds the model in `f32`.
pub fn load_model_with(path: &Path, device: &Device, options: LoadOptions) -> Result<LoadedModel> {
    match source_kind(path)? {
        SourceKind::Gguf => gguf::load_gguf(path, device, options),
        SourceKind::HuggingFace => hf::load_hf_dir(path, device, options.dtype),
        SourceKind::Native => native::load_native(path, device, options.dtype),
        SourceKind::Run => native::load_native(&newest_checkpoint(path)?, device, options.dtype),
    }
}

/// The architecture of a model source without reading its weights where the format allows.
pub fn read_config(path: &Path) -> Result<ModelConfig> {
    match source_kind(path)? {
        SourceKind::Gguf => gguf::GgufFile::open(path)?.config(),
        SourceKind::HuggingFace => hf::read_hf_config(path),
        SourceKind::Native => ModelConfig::from_file(&path.join("config.json")),
        SourceKind::Run => ModelConfig::from_file(&newest_checkpoint(path)?.join("config.json")),
    }
}

/// The tokenizer a model source carries, without reading its weights; `None` when it has none.
pub fn read_tokenizer(path: &Path) -> Result<Option<TextTokenizer>> {
    match source_kind(path)? {
        SourceKind::Gguf => gguf::GgufFile::open(path)?.tokenizer(),
        SourceKind::HuggingFace | SourceKind::Native => TextTokenizer::from_dir(path),
        SourceKind::Run => TextTokenizer::from_dir(&newest_checkpoint(path)?),
    }
}

/// The newest checkpoint of a run that passes verification.
fn newest_checkpoint(run_dir: &Path) -> Result<PathBuf> {
    let latest = crate::train::checkpoint::latest_valid(run_dir)?;
    latest.latest.ok_or_else(|| {
        let why: Vec<String> = latest.skipped.iter().map(|s| format!("{}: {}", s.path.display(), s.reason)).collect();
        Error::checkpoint(
            run_dir,
            format!(
                "this run has no valid checkpoint{}",
                if why.is_empty() { String::new() } else { format!(":\n  - {}", why.join("\n  - ")) }
            ),
        )
    })
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
