//! GGUF (llama.cpp's single-file format) ↔ lmforge.
//!
//! A GGUF file holds three things: metadata (the architecture's hyper-parameters under
//! `{arch}.*` keys, and the tokenizer under `tokenizer.*`), tensor infos (name, GGML type, shape,
//! offset) and the tensor data. candle parses and writes the container and (de)quantizes; this
//! module decides what the numbers mean for lmforge:
//! - `names`: one table of lmforge ↔ GGUF tensor names ([`LLAMA_TENSOR_NAMES`]) and the list of
//!   GGUF tensors a config has ([`gguf_tensors`]), used in both directions, plus the one layout
//!   change llama.cpp makes to the weights (see [`unpermute_rope_rows`]);
//! - [`GgufFile`] (reading): a [`ModelConfig`](crate::config::ModelConfig) from the metadata, every name and shape checked
//!   against the config *before* any data is read, each tensor dequantized to f32;
//! - [`export_gguf`] (writing): the config as `llama.*` keys, the tokenizer as `tokenizer.ggml.*`
//!   keys, the weights quantized as llama.cpp's own tools would ([`Quant`]).
//!
//! Only `general.architecture = llama` is mapped (Llama 1/2/3, Mistral, Mixtral, SmolLM,
//! TinyLlama and the many other models llama.cpp stores under that name). Every other input is
//! refused with an error naming the file and what is wrong, never a panic: candle's header
//! reader is bounds checked, and we check each tensor's byte range against the file length
//! ourselves.

mod header;
mod metadata;
mod names;
mod reader;
mod vocab;
mod writer;

#[cfg(test)]
mod tests;

pub use header::{type_name, SUPPORTED_TYPES};
pub(crate) use metadata::{value_as_usize, value_kind};
pub use names::{
    from_gguf_name, gguf_tensors, permute_rope_rows, to_gguf_name, unpermute_rope_rows, GgufSlot, GgufTensor, RowOrder,
    TensorName, LLAMA_TENSOR_NAMES,
};
pub use reader::GgufFile;
pub use vocab::tokenizer_metadata;
pub use writer::{export_gguf, gguf_problems, ExportOptions, Quant};

use std::path::Path;

use candle_core::Device;

use super::{LoadOptions, LoadedModel};
use crate::error::Result;

/// Architectures whose metadata and tensor names this module maps.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama"];

/// Read a GGUF file: config from its metadata, every tensor under its canonical name (as
/// `options` say: dequantized to f32, or kept in its blocks, or rounded to bf16 as it is read),
/// and the tokenizer it carries.
///
/// Fails (without panicking) on a file that is not GGUF, is truncated or corrupted, has an
/// architecture other than [`SUPPORTED_ARCHITECTURES`], a tensor type outside
/// [`SUPPORTED_TYPES`], missing metadata, missing/extra/mis-shaped tensors, or a tokenizer we
/// cannot rebuild (use [`GgufFile`] directly to load the weights without it).
pub fn load_gguf(path: &Path, device: &Device, options: LoadOptions) -> Result<LoadedModel> {
    let file = GgufFile::open(path)?;
    let config = file.config()?;
    let (weights, quantized) = file.load_weights(&config, device, options)?;
    let tokenizer = file.tokenizer()?;
    Ok(LoadedModel { config, weights, quantized, tokenizer, source: path.to_path_buf() })
}
