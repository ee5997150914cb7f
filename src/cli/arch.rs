//! Turning the user's --model argument into a loaded model.

use std::path::Path;

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use lmforge::io::{self, LoadedModel, WeightDtype};

/// Load `--model` onto the CPU.
pub fn load(model: &Path) -> anyhow::Result<LoadedModel> {
    io::load_model(model, &Device::Cpu).with_context(|| format!("loading model {}", model.display()))
}

/// Load `--model` onto `device` to run it (score, generate): on the CPU a GGUF file's quantized
/// weights stay quantized, elsewhere they are dequantized; the other matrices are held as
/// `dtype` says, each converted as it is read ([`io::LoadOptions`]).
pub fn load_for_inference(model: &Path, device: &Device, dtype: DtypeArg) -> anyhow::Result<LoadedModel> {
    io::load_model_with(model, device, io::LoadOptions::inference(dtype.dtype))
        .with_context(|| format!("loading model {}", model.display()))
}

/// `--dtype`, shared by the commands that load a model to run it, not to train it.
#[derive(Args, Clone, Copy, Debug, Default)]
pub struct DtypeArg {
    /// How the weight matrices (linear layers, output head, token table) are held: f32, or bf16
    /// (half the memory; bf16 products summed in f32; activations, norms, attention, KV cache
    /// and logits stay f32; CPU only). A GGUF file's quantized matrices stay quantized either way.
    #[arg(long = "dtype", value_name = "f32|bf16", default_value_t)]
    pub dtype: WeightDtype,
}
