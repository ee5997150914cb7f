//! Writing a GGUF `llama` file that llama.cpp (and so ollama) and transformers' GGUF loader run.
//!
//! The file is what llama.cpp's own tools would make of the same model: the hyper-parameters
//! under the `llama.*` keys `convert_hf_to_gguf.py` writes, the tokenizer as `tokenizer.ggml.*`
//! keys ([`super::vocab`]), the q/k rows permuted for ggml's rotary embedding, the experts of a
//! mixture stacked into `*_exps` tensors, and the weights stored per [`Quant`].
//!
//! RoPE scaling, once lmforge has it, belongs in `llama.rope.scaling.type` (`linear`, `yarn`),
//! `llama.rope.scaling.factor` and `llama.rope.scaling.original_context_length` (plus the
//! `llama.rope.scaling.yarn_*` keys); Llama 3's `llama3` scaling is not a key but a
//! `rope_freqs.weight` tensor of per-frequency factors (see `LlamaModel.generate_extra_tensors`
//! in `convert_hf_to_gguf.py`). Until then [`gguf_problems`] is where an unsupported scaling
//! would be refused.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};

use super::names::{gguf_tensors, permute_rope_rows, GgufTensor};
use super::vocab::tokenizer_metadata;
use crate::config::{Activation, Ffn, Layout, ModelConfig, Norm, NormPlacement, Positions, Residual};
use crate::error::{bullet_list, without_backtrace, Error, Result};
use crate::io::TextTokenizer;

/// How the weight matrices are stored. Norm gains and the MoE router stay F32 whatever is
/// chosen, and a matrix whose rows do not split into whole blocks falls back to F16, as in
/// `convert_hf_to_gguf.py`. With `Q4_0` the output head (the token embedding when it is tied)
/// is Q6_K, or Q8_0 when its rows are not a multiple of 256, as `llama-quantize` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quant {
    F32,
    F16,
    Q8_0,
    Q4_0,
}

impl Quant {
    pub const ALL: [Quant; 4] = [Quant::F32, Quant::F16, Quant::Q8_0, Quant::Q4_0];

    /// The name users type and llama.cpp prints (`--outtype` of `convert_hf_to_gguf.py`).
    pub fn name(self) -> &'static str {
        match self {
            Quant::F32 => "f32",
            Quant::F16 => "f16",
            Quant::Q8_0 => "q8_0",
            Quant::Q4_0 => "q4_0",
        }
    }

    /// `general.file_type`: llama.cpp's `llama_ftype` (`LLAMA_FTYPE_ALL_F32`, `MOSTLY_F16`, ...).
    fn file_type(self) -> u32 {
        match self {
            Quant::F32 => 0,
            Quant::F16 => 1,
            Quant::Q4_0 => 2,
            Quant::Q8_0 => 7,
        }
    }

    fn matrix_type(self) -> GgmlDType {
        match self {
            Quant::F32 => GgmlDType::F32,
            Quant::F16 => GgmlDType::F16,
            Quant::Q8_0 => GgmlDType::Q8_0,
            Quant::Q4_0 => GgmlDType::Q4_0,
        }
    }

    /// The type `tensor` is stored as; `output_head` marks the tensor the logits come from.
    fn storage_type(self, tensor: &GgufTensor, output_head: bool) -> GgmlDType {
        if tensor.shape.len() == 1 || tensor.name.ends_with("ffn_gate_inp.weight") {
            return GgmlDType::F32;
        }
        let wanted = match self {
            Quant::Q4_0 if output_head => GgmlDType::Q6K,
            _ => self.matrix_type(),
        };
        // The first type whose blocks tile a row (F16's block is one value).
        let candidates: &[GgmlDType] = match wanted {
            GgmlDType::Q6K => &[GgmlDType::Q6K, GgmlDType::Q8_0, GgmlDType::F16],
            _ => &[wanted, GgmlDType::F16],
        };
        let row = tensor.shape.last().copied().unwrap_or(0);
        candidates.iter().copied().find(|t| row % t.block_size() == 0).unwrap_or(GgmlDType::F16)
    }
}

impl std::str::FromStr for Quant {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Quant::ALL.into_iter().find(|q| q.name().eq_ignore_ascii_case(s)).ok_or_else(|| {
            let known: Vec<&str> = Quant::ALL.iter().map(|q| q.name()).collect();
            Error::Input(format!("unknown GGUF quantization `{s}`; expected one of {}", known.join(", ")))
        })
    }
}

/// Choices an export leaves to the user.
#[derive(Clone, Copy, Debug)]
pub struct ExportOptions {
    pub quant: Quant,
    /// Write a model with a sliding window that binds (window < context length) anyway, as
    /// full attention, the way llama.cpp's `convert_hf_to_gguf.py` converts Mistral. Outputs
    /// then match only while a sequence fits in the window.
    pub drop_sliding_window: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions { quant: Quant::F32, drop_sliding_window: false }
    }
}

/// Everything in `config` that GGUF's `llama` architecture cannot hold, each naming the field;
/// empty when the export is exact.
///
/// llama.cpp's `llama` graph is pre-norm RMSNorm → RoPE over whole heads → attention (any head
/// count, GQA, any head width) → RMSNorm → SwiGLU or a Mixtral mixture of SwiGLU experts, with
/// no biases and an optional tied head. It has no sliding window: its converter writes none for
/// `MistralForCausalLM`. A window at least as long as the context never binds and is exported
/// as it stands; a shorter one is refused unless `options.drop_sliding_window`.
pub fn gguf_problems(config: &ModelConfig, options: &ExportOptions) -> Vec<String> {
    let mut problems = Vec::new();
    let mut refuse = |field: String, why: &str| problems.push(format!("{field}: {why}"));
    if let Layout::EncoderDecoder { .. } = config.layout {
        refuse("layout = encoder_decoder".into(), "it is decoder-only");
    }
    if config.norm != Norm::RmsNorm {
        refuse("norm = layer_norm".into(), "its norms are RMSNorm");
    }
    if config.norm_placement != NormPlacement::Pre {
        refuse("norm_placement = post".into(), "it normalises before each sub-block (pre-norm)");
    }
    match config.positions {
        Positions::Rope { fraction, .. } if config.rotary_dims() != config.head_dim() => refuse(
            format!("positions.fraction = {fraction} (rotates {} of {} dims)", config.rotary_dims(), config.head_dim()),
            "its rotary embedding turns whole heads",
        ),
        // llama.cpp keeps scalings in keys of its own (`llama.rope.scaling.*`, and a
        // `rope_freqs` tensor for `llama3`) that lmforge neither writes nor reads yet.
        Positions::Rope { scaling: Some(scaling), .. } => refuse(
            format!("positions.scaling = {}", scaling.kind()),
            "lmforge writes plain RoPE only (no `llama.rope.scaling.*` keys or `rope_freqs` tensor yet)",
        ),
        Positions::Rope { .. } => {}
        Positions::Alibi { .. } => refuse("positions = alibi".into(), "its positions are rotary (RoPE) only"),
        Positions::Learned => refuse("positions = learned".into(), "its positions are rotary (RoPE) only"),
        Positions::Sinusoidal => refuse("positions = sinusoidal".into(), "its positions are rotary (RoPE) only"),
        Positions::None => refuse("positions = none".into(), "its positions are rotary (RoPE) only"),
    }
    let (dense, path) = match &config.ffn {
        Ffn::Moe { expert, .. } => (&**expert, "ffn.expert"),
        dense => (dense, "ffn"),
    };
    match dense {
        Ffn::Gated { act: Activation::Silu, .. } => {}
        Ffn::Gated { act, .. } => {
            // The activation as a config file spells it (its serde name).
            let act = serde_json::to_value(act).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
            refuse(format!("{path}.act = {act}"), "its gated feed-forward uses SiLU (SwiGLU)")
        }
        Ffn::Mlp { .. } => refuse(format!("{path} = mlp"), "its feed-forward is gated (SwiGLU)"),
        Ffn::Moe { .. } => {} // nested mixtures do not validate
    }
    if config.residual == Residual::Parallel {
        refuse("residual = parallel".into(), "attention and feed-forward run in sequence, each with its own norm");
    }
    if config.bias {
        refuse("bias = true".into(), "its projections have no bias tensors");
    }
    if config.head_bias {
        refuse("head_bias = true".into(), "its output head has no bias");
    }
    if !options.drop_sliding_window {
        // The first layer whose window binds: one that cuts off earlier tokens within the context.
        let binding = (0..config.layers)
            .find_map(|layer| config.window(layer).filter(|&w| w < config.context_length).map(|w| (layer, w)));
        if let Some((layer, window)) = binding {
            let field = match config.attention.layer_windows {
                Some(_) => format!("attention.layer_windows[{layer}] = {window}"),
                None => format!("attention.window = {window}"),
            };
            refuse(
                format!("{field} < context_length = {}", config.context_length),
                "it has no sliding window (llama.cpp's converter drops Mistral's too); every token would attend to \
                 all earlier ones",
            );
        }
    }
    problems
}

/// What an export wrote: each tensor's GGUF name and stored type, in file order.
pub type ExportedTensors = Vec<(String, GgmlDType)>;

/// Write `config` and its `weights` (canonical names) as a GGUF `llama` file at `path`, with
/// the tokenizer's `tokenizer.*` keys when one is given (`tokenizer.ggml.model = "none"`
/// otherwise, which llama.cpp reads as "no vocabulary").
///
/// The file is written under a temporary name beside `path` and renamed into place, so a
/// failed export never leaves a partial `.gguf` behind.
pub fn export_gguf(
    config: &ModelConfig,
    weights: &HashMap<String, Tensor>,
    tokenizer: Option<&TextTokenizer>,
    path: &Path,
    options: &ExportOptions,
) -> Result<ExportedTensors> {
    let problems = gguf_problems(config, options);
    if !problems.is_empty() {
        let hint = if problems.iter().any(|p| p.contains("window")) {
            "\nHINT: `--drop-sliding-window` exports the window as full attention (exact while a sequence fits in it)"
        } else {
            ""
        };
        let name = if config.name.is_empty() { String::new() } else { format!(" ({})", config.name) };
        return Err(Error::Unsupported(format!(
            "GGUF `llama` cannot hold this architecture{name}:{}{hint}",
            bullet_list(&problems, 20)
        )));
    }
    let layout = gguf_tensors(config).map_err(|unplaced| {
        Error::Unsupported(format!("parameters with no GGUF `llama` name: {}", unplaced.join(", ")))
    })?;

    let mut metadata = model_metadata(config, options.quant, path);
    match tokenizer {
        Some(tokenizer) => metadata.extend(tokenizer_metadata(tokenizer, config.vocab_size)?),
        None => metadata.push(("tokenizer.ggml.model".into(), Value::String("none".into()))),
    }

    let mut tensors = Vec::with_capacity(layout.len());
    for tensor in &layout {
        let output_head =
            tensor.name == "output.weight" || (config.tie_embeddings && tensor.name == "token_embd.weight");
        let dtype = options.quant.storage_type(tensor, output_head);
        let data = file_layout(tensor, config, weights)?;
        let quantized = QTensor::quantize(&data, dtype).map_err(|e| {
            Error::Input(format!("export: tensor `{}` as {dtype:?}: {}", tensor.name, without_backtrace(e)))
        })?;
        tensors.push((tensor.name.clone(), quantized));
    }
    write_atomically(path, &metadata, &tensors)?;
    Ok(tensors.iter().map(|(name, t)| (name.clone(), t.dtype())).collect())
}

/// `general.*` and `llama.*` keys, as `convert_hf_to_gguf.py` writes them for a Llama.
fn model_metadata(config: &ModelConfig, quant: Quant, path: &Path) -> Vec<(String, Value)> {
    let u32_ = |v: usize| Value::U32(u32::try_from(v).unwrap_or(u32::MAX));
    let name = match config.name.trim() {
        "" => path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        name => name.to_string(),
    };
    let theta = match config.positions {
        Positions::Rope { theta, .. } => theta,
        _ => unreachable!("gguf_problems admits rotary positions only"),
    };
    let (hidden, experts) = match &config.ffn {
        Ffn::Gated { hidden, .. } => (*hidden, None),
        Ffn::Moe { experts, top_k, expert, .. } => match **expert {
            Ffn::Gated { hidden, .. } => (hidden, Some((*experts, *top_k))),
            _ => unreachable!("gguf_problems admits gated experts only"),
        },
        Ffn::Mlp { .. } => unreachable!("gguf_problems admits gated feed-forwards only"),
    };
    let mut metadata = vec![
        ("general.architecture".to_string(), Value::String("llama".into())),
        ("general.type".into(), Value::String("model".into())),
        ("general.name".into(), Value::String(name)),
        ("general.file_type".into(), Value::U32(quant.file_type())),
        // ggml's quantization format version (GGML_QNT_VERSION), which llama.cpp checks.
        ("general.quantization_version".into(), Value::U32(2)),
        ("llama.vocab_size".into(), u32_(config.vocab_size)),
        ("llama.context_length".into(), u32_(config.context_length)),
        ("llama.embedding_length".into(), u32_(config.d_model)),
        ("llama.block_count".into(), u32_(config.layers)),
        ("llama.feed_forward_length".into(), u32_(hidden)),
        ("llama.attention.head_count".into(), u32_(config.attention.heads)),
        ("llama.attention.head_count_kv".into(), u32_(config.attention.kv_heads)),
        ("llama.attention.key_length".into(), u32_(config.head_dim())),
        ("llama.attention.value_length".into(), u32_(config.head_dim())),
        ("llama.rope.dimension_count".into(), u32_(config.rotary_dims())),
        ("llama.rope.freq_base".into(), Value::F32(theta as f32)),
        ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(config.norm_eps as f32)),
    ];
    if let Some((experts, top_k)) = experts {
        metadata.push(("llama.expert_count".into(), u32_(experts)));
        metadata.push(("llama.expert_used_count".into(), u32_(top_k)));
    }
    metadata
}

/// The f32 data of one GGUF tensor: its canonical parts stacked (experts) and its rows
/// permuted for ggml's rotary embedding (q, k).
fn file_layout(tensor: &GgufTensor, config: &ModelConfig, weights: &HashMap<String, Tensor>) -> Result<Tensor> {
    let parts = tensor
        .parts
        .iter()
        .map(|p| weights.get(p).ok_or_else(|| Error::Input(format!("export: missing canonical tensor `{p}`"))))
        .collect::<Result<Vec<_>>>()?;
    let data = match tensor.stacked {
        true => Tensor::stack(&parts, 0)?, // (experts, out, in)
        false => parts[0].clone(),
    };
    let data = match tensor.rows.heads(config) {
        Some(heads) => permute_rope_rows(&data, heads)?,
        None => data,
    };
    if data.dims() != tensor.shape {
        return Err(Error::Input(format!(
            "export: tensor `{}` has shape {:?}, the config implies {:?}",
            tensor.name,
            data.dims(),
            tensor.shape
        )));
    }
    // A fresh buffer: candle's quantizer reads the storage from its start, so a view into a
    // larger tensor (an expert sliced from a stack, q split from a fused qkv) must be copied.
    Ok(data.to_dtype(DType::F32)?.copy()?)
}

fn write_atomically(path: &Path, metadata: &[(String, Value)], tensors: &[(String, QTensor)]) -> Result<()> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let write = || -> Result<()> {
        let file = File::create(&partial).map_err(|e| Error::io(&partial, e))?;
        let mut out = BufWriter::new(file);
        let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        gguf_file::write(&mut out, &metadata, &tensors)
            .map_err(|e| Error::Input(format!("{}: writing GGUF: {}", partial.display(), without_backtrace(e))))?;
        let file = out.into_inner().map_err(|e| Error::io(&partial, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&partial, e))?;
        std::fs::rename(&partial, path).map_err(|e| Error::io(path, e))
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&partial);
    })
}
