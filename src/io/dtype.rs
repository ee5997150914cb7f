//! How a model loaded for inference holds its weight matrices: `--dtype f32|bf16` on
//! `generate`, `score`, `eval translate` and `bench generate` (training keeps `f32` masters;
//! its bf16 is `--precision`, which rounds operands inside the products instead).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::config::{ModelConfig, ParamKind, ParamSpec};
use crate::error::{Error, Result};
use crate::nn::ops::quant::{QFormat, QMatrix};
use crate::nn::QuantizedWeights;

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

/// How to load a model: what [`crate::io::load_model_with`] keeps of a file's own storage, and
/// how it holds the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoadOptions {
    /// Keep a GGUF file's matrices in a block format the integer kernels read (`Q4_0`, `Q4_1`,
    /// `Q8_0`, `Q4_K`, `Q6_K`, `BF16`) as they are, on the CPU: for running a model. Off, every
    /// weight is dequantized to `f32` (what training and export need). Ignored off the CPU.
    pub keep_quantized: bool,
    /// How the matrices read as `f32` are held ([`held_in_bf16`] chooses which).
    pub dtype: WeightDtype,
}

impl LoadOptions {
    /// For running a model (score, generate, bench): quantized blocks kept, the rest as `dtype`.
    pub fn inference(dtype: WeightDtype) -> Self {
        LoadOptions { keep_quantized: true, dtype }
    }
}

/// Where a loader puts each parameter as it reads it, so that `--dtype bf16` converts tensor by
/// tensor: a matrix chosen by [`held_in_bf16`] is rounded to bf16 (to nearest, ties to even)
/// the moment it arrives and its `f32` tensor dropped, so at most one `f32` matrix is alive at a
/// time and loading peaks near the bf16 model's size, not the `f32` model's. The one place that
/// decides which tensors convert; the loaders only read.
pub(crate) struct WeightSink {
    /// The names to convert: empty with [`WeightDtype::F32`].
    to_bf16: HashSet<String>,
    weights: HashMap<String, Tensor>,
    quantized: QuantizedWeights,
    source: PathBuf,
}

impl WeightSink {
    /// A sink for `config`'s parameters loaded onto `device`. With [`WeightDtype::Bf16`], an
    /// error off the CPU, or when no bf16 kernel can run (`LMFORGE_BF16_KERNEL` naming one this
    /// CPU lacks): both reported now, before any weight is read, not at the first product.
    pub(crate) fn new(config: &ModelConfig, dtype: WeightDtype, device: &Device, source: &Path) -> Result<Self> {
        if dtype == WeightDtype::Bf16 {
            if !device.is_cpu() {
                return Err(Error::Unsupported(format!(
                    "--dtype {dtype}: bf16 weights run on lmforge's CPU kernels, and this model is loaded on {device:?}\nHINT: add --device cpu, or drop --dtype"
                )));
            }
            crate::nn::ops::bf16::kernel()?;
        }
        let to_bf16 = match dtype {
            WeightDtype::F32 => HashSet::new(),
            WeightDtype::Bf16 => config.param_specs().into_iter().filter(held_in_bf16).map(|s| s.name).collect(),
        };
        Ok(WeightSink { to_bf16, weights: HashMap::new(), quantized: QuantizedWeights::new(), source: source.into() })
    }

    /// Take `tensor` (`f32`) as parameter `name`: held as it is, or rounded to bf16 now.
    pub(crate) fn put(&mut self, name: String, tensor: Tensor) -> Result<()> {
        if !self.to_bf16.contains(&name) {
            self.weights.insert(name, tensor);
            return Ok(());
        }
        let matrix = QMatrix::quantize(&tensor, QFormat::BF16)
            .map_err(|e| Error::checkpoint(&self.source, format!("tensor `{name}` to bf16: {e}")))?;
        self.quantized.insert(name, Arc::new(matrix));
        Ok(())
    }

    /// Take a matrix kept in its file's blocks, as it is.
    pub(crate) fn put_quantized(&mut self, name: String, matrix: QMatrix) {
        self.quantized.insert(name, Arc::new(matrix));
    }

    /// The tensors, and the matrices held quantized or in bf16.
    pub(crate) fn finish(self) -> (HashMap<String, Tensor>, QuantizedWeights) {
        if !self.to_bf16.is_empty() {
            // The f32 tensors dropped one by one go back to the system: the binary keeps freed
            // memory for reuse, which would leave the largest of them resident for good.
            crate::host_memory::release_free_memory();
        }
        (self.weights, self.quantized)
    }
}
