//! Turning the user's --model argument into a loaded model.

use std::path::Path;

use anyhow::Context;
use candle_core::Device;
use lmforge::io::{self, LoadedModel};

/// Load `--model` onto the CPU.
pub fn load(model: &Path) -> anyhow::Result<LoadedModel> {
    io::load_model(model, &Device::Cpu).with_context(|| format!("loading model {}", model.display()))
}
