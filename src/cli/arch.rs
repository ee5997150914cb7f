//! Turning the user's --model argument into a loaded model.

use std::path::Path;

use anyhow::Context;
use candle_core::Device;
use lmforge::io::{self, LoadedModel};

/// Load `--model` onto the CPU.
pub fn load(model: &Path) -> anyhow::Result<LoadedModel> {
    io::load_model(model, &Device::Cpu).with_context(|| format!("loading model {}", model.display()))
}

/// Load `--model` onto the CPU to run it (score, generate): a GGUF file's quantized weights
/// stay quantized ([`io::load_model_for_inference`]).
pub fn load_for_inference(model: &Path) -> anyhow::Result<LoadedModel> {
    io::load_model_for_inference(model, &Device::Cpu).with_context(|| format!("loading model {}", model.display()))
}
