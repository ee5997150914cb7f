//! Turning the user's --model argument into a loaded model.

use std::path::Path;

use anyhow::Context;
use candle_core::Device;
use lmforge::io::{self, LoadedModel};

/// Load `--model` onto the CPU.
pub fn load(model: &Path) -> anyhow::Result<LoadedModel> {
    io::load_model(model, &Device::Cpu).with_context(|| format!("loading model {}", model.display()))
}

/// Load `--model` onto `device` to run it (score, generate): on the CPU a GGUF file's quantized
/// weights stay quantized ([`io::load_model_for_inference`]), elsewhere they are dequantized.
pub fn load_for_inference(model: &Path, device: &Device) -> anyhow::Result<LoadedModel> {
    io::load_model_for_inference(model, device).with_context(|| format!("loading model {}", model.display()))
}
