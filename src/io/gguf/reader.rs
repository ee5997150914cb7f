//! Reading a GGUF file: the header checked against the file, a [`ModelConfig`] from the
//! metadata, and every tensor dequantized under its canonical name.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::{DType, Device, Tensor};

use super::header::{check_magic, explain_header_error, type_name, unsupported_type, SUPPORTED_TYPES};
use super::metadata::{describe, value_as_f64, value_as_usize, value_kind};
use super::names::{from_gguf_name, gguf_tensors, unpermute_rope_rows, GgufTensor};
use super::SUPPORTED_ARCHITECTURES;
use crate::config::{
    Activation, Attention, Ffn, Layout, ModelConfig, Norm, NormPlacement, Positions, Residual, Router,
};
use crate::error::{bullet_list, without_backtrace, Error, Result};
use crate::io::tokenizer::TextTokenizer;
use crate::io::{LoadOptions, WeightSink};
use crate::nn::ops::quant::{QFormat, QMatrix};
use crate::nn::QuantizedWeights;

/// An opened GGUF file whose header has been read and checked; the steps of
/// [`load_gguf`](super::load_gguf).
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
        let content = Content::read(&mut reader).map_err(|e| explain_header_error(path, e))?;
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
            positions: Positions::Rope { theta, fraction, scaling: None },
            attention: Attention {
                heads,
                kv_heads,
                head_dim,
                window: None,
                layer_windows: None,
                implementation: Default::default(),
            },
            ffn: self.ffn(arch)?,
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
            Error::Config { problems, .. } => {
                Error::Config { origin: format!("model config ({})", self.path.display()), problems }
            }
            other => other,
        })?;
        Ok(config)
    }

    /// SwiGLU, or a Mixtral-style mixture of SwiGLU experts when `{arch}.expert_count` > 0
    /// (llama.cpp's `llama` graph: softmax router, top `expert_used_count`, weights renormalised).
    fn ffn(&self, arch: &str) -> Result<Ffn> {
        let key = |k: &str| format!("{arch}.{k}");
        let dense = Ffn::Gated { hidden: self.meta_usize(&key("feed_forward_length"))?, act: Activation::Silu };
        match self.meta_usize_opt(&key("expert_count"))? {
            None | Some(0) => Ok(dense),
            // The file holds no training settings: the router takes lmforge's defaults.
            Some(experts) => Ok(Ffn::Moe {
                experts,
                top_k: self.meta_usize(&key("expert_used_count"))?,
                expert: Box::new(dense),
                router: Router::default(),
            }),
        }
    }

    /// Every parameter of `config`, dequantized to f32 on `device`, under its canonical name.
    ///
    /// All names, shapes and types are checked against `config.param_specs()` first, and every
    /// problem is reported at once, before any data is read.
    pub fn weights(&self, config: &ModelConfig, device: &Device) -> Result<HashMap<String, Tensor>> {
        Ok(self.load_weights(config, device, LoadOptions::default())?.0)
    }

    /// Every parameter of `config`, as [`weights`](Self::weights) but as `options` say: on the
    /// CPU with `keep_quantized`, each matrix stored in a format lmforge's kernels read
    /// ([`QFormat`]) kept in its blocks; with `dtype` bf16, each other matrix rounded to bf16 as
    /// it is read. A mixture's experts, stored stacked in one tensor, are dequantized (their
    /// grouped product runs on `f32` tensors).
    pub fn load_weights(
        &self,
        config: &ModelConfig,
        device: &Device,
        options: LoadOptions,
    ) -> Result<(HashMap<String, Tensor>, QuantizedWeights)> {
        let plan = self.plan(config)?;
        let mut sink = WeightSink::new(config, options.dtype, device, &self.path)?;
        let keep_quantized = options.keep_quantized && device.is_cpu();
        let file = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let mut reader = BufReader::new(file);
        for tensor in plan {
            let info = &self.content.tensor_infos[&tensor.name];
            let described = |e: candle_core::Error| {
                let e = without_backtrace(e);
                self.err(format!("tensor `{}` ({}): {e}", tensor.name, type_name(info.ggml_dtype)))
            };
            let kept = QFormat::from_ggml(info.ggml_dtype).filter(|_| keep_quantized && !tensor.stacked);
            if let (Some(format), [name]) = (kept, tensor.parts.as_slice()) {
                if info.shape.rank() == 2 {
                    let q =
                        self.read_quantized(&mut reader, info, format, tensor.rows.heads(config)).map_err(described)?;
                    sink.put_quantized(name.clone(), q);
                    continue;
                }
            }
            let read = |reader: &mut BufReader<File>| -> candle_core::Result<Vec<Tensor>> {
                let w = info.read(reader, self.content.tensor_data_offset, &Device::Cpu)?.dequantize(&Device::Cpu)?;
                let w = w.to_dtype(DType::F32)?;
                let w = match tensor.rows.heads(config) {
                    Some(heads) => unpermute_rope_rows(&w, heads)?,
                    None => w,
                };
                let parts = match tensor.stacked {
                    // (experts, out, in) → one (out, in) per expert
                    true => (0..tensor.parts.len()).map(|e| w.get(e)).collect::<candle_core::Result<_>>()?,
                    false => vec![w],
                };
                parts.into_iter().map(|p| p.to_device(device)).collect()
            };
            let parts = read(&mut reader).map_err(described)?;
            for (name, part) in tensor.parts.into_iter().zip(parts) {
                sink.put(name, part)?;
            }
        }
        Ok(sink.finish())
    }

    /// One `(out, in)` matrix's blocks as they are in the file, with the q/k rows put back in
    /// lmforge's order (the same reordering [`unpermute_rope_rows`] makes, applied to whole rows).
    fn read_quantized(
        &self,
        reader: &mut BufReader<File>,
        info: &TensorInfo,
        format: QFormat,
        rope_heads: Option<usize>,
    ) -> candle_core::Result<QMatrix> {
        let q = info.read(reader, self.content.tensor_data_offset, &Device::Cpu)?;
        let (rows, cols) = q.shape().dims2()?;
        let matrix = QMatrix::new(format, rows, cols, q.data()?.into_owned())?;
        match rope_heads {
            Some(heads) => {
                let order = Tensor::arange(0u32, rows as u32, &Device::Cpu)?.reshape((rows, 1))?;
                let order = unpermute_rope_rows(&order, heads)?.flatten_all()?.to_vec1::<u32>()?;
                matrix.select_rows(&order.into_iter().map(|r| r as usize).collect::<Vec<_>>())
            }
            None => Ok(matrix),
        }
    }

    /// The tokenizer stored in the metadata; `None` when the file carries none.
    pub fn tokenizer(&self) -> Result<Option<TextTokenizer>> {
        // llama.cpp's spellings of "no vocabulary" (what lmforge writes for a model without one).
        match self.content.metadata.get("tokenizer.ggml.model") {
            None => return Ok(None),
            Some(Value::String(model)) if model == "none" || model == "no_vocab" => return Ok(None),
            Some(_) => {}
        }
        TextTokenizer::from_gguf_metadata(&self.content).map(Some).map_err(|e| match e {
            Error::Tokenizer { reason, .. } => Error::Tokenizer { origin: self.path.display().to_string(), reason },
            other => other,
        })
    }

    /// The GGUF tensors that feed `config`'s parameters, after checking that the file holds
    /// exactly these, each with the shape the metadata implies.
    pub(crate) fn plan(&self, config: &ModelConfig) -> Result<Vec<GgufTensor>> {
        if config.layers > self.content.tensor_infos.len() {
            return Err(self.err(format!(
                "the config has {} layers, but the file holds only {} tensors",
                config.layers,
                self.content.tensor_infos.len()
            )));
        }
        let expected = gguf_tensors(config).map_err(|unplaced| {
            Error::Unsupported(format!(
                "{}: parameters with no GGUF `llama` name: {}",
                self.path.display(),
                unplaced.join(", ")
            ))
        })?;
        let mut problems = Vec::new();
        for tensor in &expected {
            let Some(info) = self.tensor_info(&tensor.name) else {
                problems.push(format!(
                    "missing tensor `{}` (lmforge {}, shape {:?})",
                    tensor.name,
                    describe_parts(tensor),
                    tensor.shape
                ));
                continue;
            };
            let found = info.shape.dims();
            if found != tensor.shape {
                problems.push(format!(
                    "tensor `{}` (lmforge {}) has shape {found:?}, expected {:?}",
                    tensor.name,
                    describe_parts(tensor),
                    tensor.shape
                ));
            }
        }
        let wanted: HashSet<&str> = expected.iter().map(|t| t.name.as_str()).collect();
        let mut extra: Vec<&String> =
            self.content.tensor_infos.keys().filter(|k| !wanted.contains(k.as_str())).collect();
        extra.sort();
        for name in extra {
            let hint = match from_gguf_name(name) {
                Some((canonical, _)) => format!("(would be lmforge `{canonical}`, which this config does not have)"),
                None => "(no lmforge equivalent)".to_string(),
            };
            problems.push(format!("unexpected tensor `{name}` {hint}"));
        }
        if problems.is_empty() {
            Ok(expected)
        } else {
            Err(self.err(format!(
                "tensors do not match the config in its metadata ({} layers, d_model {}{}):{}",
                config.layers,
                config.d_model,
                match &config.ffn {
                    Ffn::Moe { experts, .. } => format!(", {experts} experts"),
                    _ => String::new(),
                },
                bullet_list(&problems, 20)
            )))
        }
    }

    /// Every tensor must have a name, a type we read, and bytes that lie inside the file.
    fn check_tensor_ranges(&self) -> Result<()> {
        let mut infos: Vec<(&String, &TensorInfo)> = self.content.tensor_infos.iter().collect();
        infos.sort_by_key(|(_, info)| info.offset);
        for (name, info) in infos {
            if name.is_empty() {
                // What a wrong tensor count in the header typically yields: data read as names.
                return Err(self.err(
                    "corrupted header: a tensor has an empty name (is the tensor count right?)\n\
                     HINT: fetch the file again and check its sha256",
                ));
            }
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

/// The lmforge tensors a GGUF tensor holds, for messages: one name, or the range of experts.
fn describe_parts(tensor: &GgufTensor) -> String {
    match tensor.parts.as_slice() {
        [one] => format!("`{one}`"),
        parts => format!("`{}` … `{}`", parts[0], parts[parts.len() - 1]),
    }
}
