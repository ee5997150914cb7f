//! How a model loaded for inference holds its weight matrices: `--dtype f32|bf16` on
//! `generate`, `score` and `bench generate` (training keeps `f32` masters; its bf16 is
//! `--precision`, which rounds operands inside the products instead).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::config::{ParamKind, ParamSpec};
use crate::error::{Error, Result};
use crate::nn::ops::quant::{QFormat, QMatrix};

use super::LoadedModel;

/// The storage of the weight matrices that are not already in a GGUF file's quantized blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightDtype {
    /// As loaded: `f32` tensors.
    #[default]
    F32,
    /// bf16 values ([`QFormat::BF16`]): half the memory, products on bf16 operands with `f32`
    /// sums (`vdpbf16ps` where the CPU has AVX512-BF16). Activations, norms, softmax,
    /// attention, KV caches and logits stay `f32`. CPU only.
    Bf16,
}

impl fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WeightDtype::F32 => "f32",
            WeightDtype::Bf16 => "bf16",
        })
    }
}

impl FromStr for WeightDtype {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" => Ok(WeightDtype::F32),
            "bf16" => Ok(WeightDtype::Bf16),
            other => Err(format!("unknown dtype `{other}`; expected one of f32, bf16")),
        }
    }
}

/// Whether `--dtype bf16` holds this parameter in bf16: every linear layer's matrix (the
/// output head included) and the token-embedding table, whose lookups then widen only the rows
/// asked for (as a quantized table's do; a tied head shares the one bf16 copy).
///
/// Left in `f32`: vectors (norms, biases: read by element-wise code), position tables (read by
/// the same code), and a mixture's experts, whose grouped product stacks their tensors.
pub fn held_in_bf16(spec: &ParamSpec) -> bool {
    match spec.kind {
        ParamKind::Weight => spec.expert.is_none() && spec.shape.len() == 2,
        ParamKind::Embedding => spec.name == "tok_embeddings.weight",
        ParamKind::Bias | ParamKind::NormGain | ParamKind::NormBias => false,
    }
}

impl LoadedModel {
    /// The same model with its matrices held as `dtype` says. With [`WeightDtype::Bf16`] each
    /// matrix chosen by [`held_in_bf16`] that is still an `f32` tensor is rounded to bf16 (to
    /// nearest, ties to even) and its tensor dropped, one at a time; a GGUF file's matrices kept
    /// in their blocks (Q4_1, …) stay as they are. An error off the CPU, or when no bf16 kernel
    /// can run.
    pub fn with_dtype(mut self, dtype: WeightDtype) -> Result<LoadedModel> {
        if dtype == WeightDtype::F32 {
            return Ok(self);
        }
        if let Some(t) = self.weights.values().find(|t| !t.device().is_cpu()) {
            return Err(Error::Unsupported(format!(
                "--dtype {dtype}: bf16 weights run on lmforge's CPU kernels, and this model is loaded on {:?}\nHINT: add --device cpu, or drop --dtype",
                t.device()
            )));
        }
        // A kernel that cannot run (`LMFORGE_BF16_KERNEL` naming one this CPU lacks) is
        // reported now, before the conversion, not at the first product.
        crate::nn::ops::bf16::kernel()?;
        for spec in self.config.param_specs().iter().filter(|s| held_in_bf16(s)) {
            let Some(tensor) = self.weights.remove(&spec.name) else { continue };
            let matrix = QMatrix::quantize(&tensor, QFormat::BF16)
                .map_err(|e| Error::checkpoint(&self.source, format!("tensor `{}` to bf16: {e}", spec.name)))?;
            self.quantized.insert(spec.name.clone(), Arc::new(matrix));
        }
        // The f32 tensors just dropped go back to the system: the binary keeps freed memory
        // for reuse, which would leave the f32 model's size resident beside its bf16 copy.
        crate::host_memory::release_free_memory();
        Ok(self)
    }
}
