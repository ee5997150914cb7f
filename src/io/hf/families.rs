//! The Hugging Face families: `config.json` ↔ [`ModelConfig`], and one tensor table each.

use std::collections::HashMap;

use candle_core::Tensor;
use serde_json::{json, Value};

use super::rope::{read_rope, write_rope, RopeDefaults};
use super::shapes::Witness;
use super::HfJson;
use crate::config::{
    Activation, Attention, Ffn, Gating, Layout, ModelConfig, Norm, NormPlacement, Positions, Residual, Router,
};
use crate::error::{Error, Result};

/// One tensor of a Hugging Face checkpoint and the canonical tensors it holds.
pub struct HfTensor {
    pub hf: String,
    /// Canonical tensors stacked along dim 0 (one for most; q, k, v for a fused QKV).
    pub parts: Vec<String>,
    /// Stored as `[in, out]` (GPT-2's `Conv1D`) rather than `[out, in]`.
    pub transpose: bool,
    /// The `config.json` fields this tensor's dims state (its rows are `intermediate_size`,
    /// ...), so that a config contradicting its weights is reported by field.
    pub witnesses: Vec<Witness>,
    /// Stored with an extra leading dim of 1 (Marian's `final_logits_bias` `[1, V]`).
    pub unit_dim: bool,
}

impl HfTensor {
    pub(super) fn new(hf: impl Into<String>, canonical: impl Into<String>) -> Self {
        HfTensor {
            hf: hf.into(),
            parts: vec![canonical.into()],
            transpose: false,
            witnesses: Vec::new(),
            unit_dim: false,
        }
    }

    /// One checkpoint tensor holding several canonical ones stacked along dim 0 (a fused QKV).
    fn fused(hf: impl Into<String>, parts: Vec<String>) -> Self {
        HfTensor { parts, ..HfTensor::new(hf, "") }
    }

    fn transposed(mut self) -> Self {
        self.transpose = true;
        self
    }

    /// Dim 0 of the checkpoint tensor is `value` of `config.json`'s `field`, times a whole
    /// number (e.g. `num_key_value_heads` × head_dim).
    fn rows(mut self, field: &'static str, value: usize) -> Self {
        self.witnesses.push(Witness { axis: 0, field, value });
        self
    }

    /// As [`rows`](Self::rows), for dim 1.
    fn cols(mut self, field: &'static str, value: usize) -> Self {
        self.witnesses.push(Witness { axis: 1, field, value });
        self
    }

    /// The shape the checkpoint tensor must have, from the canonical shapes of its parts.
    pub fn expected_shape(&self, specs: &HashMap<String, Vec<usize>>) -> Vec<usize> {
        let shapes: Vec<&Vec<usize>> = self.parts.iter().map(|p| &specs[p]).collect();
        let mut expected = shapes[0].clone();
        expected[0] = shapes.iter().map(|s| s[0]).sum();
        if self.transpose {
            expected.reverse();
        }
        if self.unit_dim {
            expected.insert(0, 1);
        }
        expected
    }

    pub(super) fn with_unit_dim(mut self) -> Self {
        self.unit_dim = true;
        self
    }

    /// Whether a checkpoint tensor of shape `dims` is this entry (before reading its data).
    pub fn check_shape(&self, dims: &[usize], specs: &HashMap<String, Vec<usize>>) -> std::result::Result<(), String> {
        let expected = self.expected_shape(specs);
        match dims == expected.as_slice() {
            true => Ok(()),
            false => Err(format!("tensor `{}` has shape {dims:?}, expected {expected:?}", self.hf)),
        }
    }

    /// Split (and un-transpose) a checkpoint tensor into its canonical parts.
    pub fn to_canonical(
        &self,
        tensor: &Tensor,
        specs: &HashMap<String, Vec<usize>>,
    ) -> std::result::Result<Vec<(String, Tensor)>, String> {
        let shapes: Vec<&Vec<usize>> = self.parts.iter().map(|p| &specs[p]).collect();
        self.check_shape(tensor.dims(), specs)?;
        let tensor = if self.unit_dim { tensor.squeeze(0).map_err(|e| e.to_string())? } else { tensor.clone() };
        let tensor = if self.transpose { tensor.t().and_then(|t| t.contiguous()) } else { Ok(tensor) };
        let tensor = tensor.map_err(|e| e.to_string())?;
        let mut offset = 0;
        let mut parts = Vec::new();
        for (name, shape) in self.parts.iter().zip(shapes) {
            let part = tensor.narrow(0, offset, shape[0]).and_then(|t| t.contiguous()).map_err(|e| e.to_string())?;
            offset += shape[0];
            parts.push((name.clone(), part));
        }
        Ok(parts)
    }

    /// Join canonical tensors into this checkpoint tensor.
    pub fn from_canonical(&self, weights: &HashMap<String, Tensor>) -> Result<Tensor> {
        let parts: Vec<&Tensor> = self
            .parts
            .iter()
            .map(|p| weights.get(p).ok_or_else(|| Error::Input(format!("export: missing canonical tensor `{p}`"))))
            .collect::<Result<_>>()?;
        let joined = Tensor::cat(&parts, 0)?;
        let joined = if self.transpose { joined.t()?.contiguous()? } else { joined };
        Ok(if self.unit_dim { joined.unsqueeze(0)? } else { joined })
    }
}

/// A Hugging Face architecture family.
pub struct Family {
    /// `model_type` values this family reads; the first is written on export.
    pub model_types: &'static [&'static str],
    pub read_config: fn(&HfJson) -> Result<ModelConfig>,
    /// `None` when the config uses something this family cannot express.
    pub write_config: fn(&ModelConfig) -> Option<Value>,
    pub tensors: fn(&ModelConfig) -> Vec<HfTensor>,
    /// A prefix some checkpoints of the family omit.
    pub optional_prefix: Option<&'static str>,
    /// Non-parameter tensors some checkpoints carry (buffers) that import skips.
    pub ignorable: fn(&str) -> bool,
}

pub static ALL: [Family; 5] = [
    Family {
        model_types: &["gpt2"],
        read_config: gpt2_read,
        write_config: gpt2_write,
        tensors: gpt2_tensors,
        optional_prefix: Some("transformer."),
        ignorable: |n| n.ends_with(".attn.bias") || n.ends_with(".attn.masked_bias"),
    },
    Family {
        model_types: &["llama", "mistral", "mixtral"],
        read_config: llama_read,
        write_config: llama_write,
        tensors: llama_tensors,
        optional_prefix: None,
        ignorable: |n| n.ends_with("rotary_emb.inv_freq"),
    },
    Family {
        model_types: &["phi"],
        read_config: phi_read,
        write_config: phi_write,
        tensors: phi_tensors,
        optional_prefix: None,
        ignorable: |n| n.ends_with("rotary_emb.inv_freq"),
    },
    Family {
        model_types: &["mpt"],
        read_config: mpt_read,
        write_config: mpt_write,
        tensors: mpt_tensors,
        optional_prefix: None,
        ignorable: |_| false,
    },
    super::marian::FAMILY,
];

pub fn family_for_model_type(model_type: &str) -> Option<&'static Family> {
    ALL.iter().find(|f| f.model_types.contains(&model_type))
}

/// The first family that can express `config` exactly.
pub fn family_for_config(config: &ModelConfig) -> Option<&'static Family> {
    ALL.iter().find(|f| (f.write_config)(config).is_some())
}

pub(super) fn activation_from_hf(json: &HfJson, key: &str, default: &str) -> Result<Activation> {
    let name = json.str_or(key, default)?;
    match name.as_str() {
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
        "gelu" => Ok(Activation::Gelu),
        "silu" | "swish" => Ok(Activation::Silu),
        "relu" => Ok(Activation::Relu),
        other => Err(Error::checkpoint(
            &json.path,
            format!("field `{key}` = \"{other}\" is not supported; expected gelu_new, gelu_pytorch_tanh, gelu, silu or relu"),
        )),
    }
}

pub(super) fn activation_to_hf(act: Activation) -> &'static str {
    match act {
        Activation::GeluTanh => "gelu_new",
        Activation::Gelu => "gelu",
        Activation::Silu => "silu",
        Activation::Relu => "relu",
    }
}

/// Parts of a config every family needs the same way.
struct Common {
    window_free: bool,
    mha: bool,
    default_head_dim: bool,
}

fn common(c: &ModelConfig) -> Common {
    Common {
        window_free: c.attention.window.is_none() && c.attention.layer_windows.is_none(),
        mha: c.attention.heads == c.attention.kv_heads,
        default_head_dim: c.head_dim() * c.attention.heads == c.d_model,
    }
}

fn decoder(json: &HfJson) -> ModelConfig {
    ModelConfig {
        name: json.value.get("_name_or_path").and_then(Value::as_str).unwrap_or("").to_string(),
        layout: Layout::DecoderOnly,
        vocab_size: 0,
        d_model: 0,
        layers: 0,
        context_length: 0,
        norm: Norm::LayerNorm,
        norm_placement: NormPlacement::Pre,
        norm_eps: 1e-5,
        positions: Positions::None,
        attention: Attention::new(0, 0),
        ffn: Ffn::Mlp { hidden: 0, act: Activation::Gelu },
        residual: Residual::Sequential,
        bias: true,
        head_bias: false,
        tie_embeddings: false,
        scale_embeddings: false,
        dropout: Default::default(),
    }
}

fn layer_tensors(config: &ModelConfig, mut per_layer: impl FnMut(usize, &str, &mut Vec<HfTensor>)) -> Vec<HfTensor> {
    let mut out = Vec::new();
    for i in 0..config.layers {
        per_layer(i, &format!("layers.{i}"), &mut out);
    }
    out
}

/// `name.weight` (and `name.bias` when `bias`) mapped one to one.
pub(super) fn linear(out: &mut Vec<HfTensor>, hf: &str, canonical: &str, bias: bool) {
    linear_stating(out, hf, canonical, bias, None);
}

/// As [`linear`], with the weight's rows stating `config.json`'s `field` = `value`.
fn linear_stating(out: &mut Vec<HfTensor>, hf: &str, canonical: &str, bias: bool, rows: Option<(&'static str, usize)>) {
    let weight = HfTensor::new(format!("{hf}.weight"), format!("{canonical}.weight"));
    out.push(match rows {
        Some((field, value)) => weight.rows(field, value),
        None => weight,
    });
    if bias {
        out.push(HfTensor::new(format!("{hf}.bias"), format!("{canonical}.bias")));
    }
}

// ---------------------------------------------------------------------------------------------
// GPT-2: learned positions, LayerNorm, GELU(tanh) MLP, fused c_attn stored as Conv1D [in, out].

fn gpt2_read(json: &HfJson) -> Result<ModelConfig> {
    let d = json.usize("n_embd")?;
    let heads = json.usize("n_head")?;
    json.reject_if_set("scale_attn_by_inverse_layer_idx", "lmforge scales scores by 1/sqrt(head_dim) only")?;
    if !json.bool_or("scale_attn_weights", true)? {
        return Err(
            json.error("scale_attn_weights", "false is not supported: lmforge scales scores by 1/sqrt(head_dim)")
        );
    }
    Ok(ModelConfig {
        vocab_size: json.usize("vocab_size")?,
        d_model: d,
        layers: json.usize("n_layer")?,
        context_length: json.usize("n_positions")?,
        norm_eps: json.f64_or("layer_norm_epsilon", 1e-5)?,
        positions: Positions::Learned,
        attention: Attention::new(heads, heads),
        ffn: Ffn::Mlp {
            hidden: json.usize_or("n_inner", 4 * d)?,
            act: activation_from_hf(json, "activation_function", "gelu_new")?,
        },
        tie_embeddings: json.bool_or("tie_word_embeddings", true)?,
        ..decoder(json)
    })
}

fn gpt2_write(c: &ModelConfig) -> Option<Value> {
    let k = common(c);
    let Ffn::Mlp { hidden, act } = c.ffn else {
        return None;
    };
    let ok = c.layout == Layout::DecoderOnly
        && c.norm == Norm::LayerNorm
        && c.norm_placement == NormPlacement::Pre
        && c.positions == Positions::Learned
        && c.residual == Residual::Sequential
        && c.bias
        && !c.head_bias
        && k.window_free
        && k.mha
        && k.default_head_dim;
    ok.then(|| {
        json!({
            "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "vocab_size": c.vocab_size, "n_embd": c.d_model, "n_layer": c.layers, "n_head": c.attention.heads,
            "n_positions": c.context_length, "n_inner": hidden, "activation_function": activation_to_hf(act),
            "layer_norm_epsilon": c.norm_eps, "tie_word_embeddings": c.tie_embeddings,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        })
    })
}

fn gpt2_tensors(c: &ModelConfig) -> Vec<HfTensor> {
    let mut out = vec![
        HfTensor::new("transformer.wte.weight", "tok_embeddings.weight")
            .rows("vocab_size", c.vocab_size)
            .cols("n_embd", c.d_model),
        HfTensor::new("transformer.wpe.weight", "pos_embeddings.weight").rows("n_positions", c.context_length),
    ];
    let hidden = c.ffn.hidden();
    out.extend(layer_tensors(c, |i, l, out| {
        let h = format!("transformer.h.{i}");
        linear(out, &format!("{h}.ln_1"), &format!("{l}.attn_norm"), true);
        for part in ["weight", "bias"] {
            let qkv = ["q", "k", "v"].iter().map(|p| format!("{l}.attn.{p}.{part}")).collect();
            let c_attn = HfTensor::fused(format!("{h}.attn.c_attn.{part}"), qkv);
            out.push(if part == "weight" { c_attn.transposed().rows("n_embd", c.d_model) } else { c_attn });
        }
        out.push(HfTensor::new(format!("{h}.attn.c_proj.weight"), format!("{l}.attn.o.weight")).transposed());
        out.push(HfTensor::new(format!("{h}.attn.c_proj.bias"), format!("{l}.attn.o.bias")));
        linear(out, &format!("{h}.ln_2"), &format!("{l}.ffn_norm"), true);
        out.push(
            HfTensor::new(format!("{h}.mlp.c_fc.weight"), format!("{l}.ffn.up.weight"))
                .transposed()
                .cols("n_inner", hidden),
        );
        out.push(HfTensor::new(format!("{h}.mlp.c_fc.bias"), format!("{l}.ffn.up.bias")));
        out.push(HfTensor::new(format!("{h}.mlp.c_proj.weight"), format!("{l}.ffn.down.weight")).transposed());
        out.push(HfTensor::new(format!("{h}.mlp.c_proj.bias"), format!("{l}.ffn.down.bias")));
    }));
    linear(&mut out, "transformer.ln_f", "final_norm", true);
    if !c.tie_embeddings {
        out.push(HfTensor::new("lm_head.weight", "lm_head.weight").rows("vocab_size", c.vocab_size));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Llama, Mistral (sliding window), Mixtral (mixture of experts): RMSNorm, RoPE, SwiGLU.

/// What transformers' `LlamaConfig`, `MistralConfig` and `MixtralConfig` assume for a key that
/// `config.json` leaves out, and what each class reads at all.
struct LlamaClass {
    /// `None`: as many as the query heads.
    kv_heads: Option<usize>,
    /// `None`: the class has no window. `Some(default)`: it reads `sliding_window`, taking
    /// `default` when the key is absent (`null` means no window).
    window: Option<Option<usize>>,
    theta: f64,
    rms_norm_eps: f64,
    /// `Some((experts, top_k))` defaults for the mixture-of-experts class.
    experts: Option<(usize, usize)>,
}

fn llama_class(model_type: &str) -> LlamaClass {
    match model_type {
        "mistral" => LlamaClass {
            kv_heads: Some(8),
            window: Some(Some(4096)),
            theta: 10_000.0,
            rms_norm_eps: 1e-6,
            experts: None,
        },
        "mixtral" => LlamaClass {
            kv_heads: Some(8),
            window: Some(None),
            theta: 1_000_000.0,
            rms_norm_eps: 1e-5,
            experts: Some((8, 2)),
        },
        _ => LlamaClass { kv_heads: None, window: None, theta: 10_000.0, rms_norm_eps: 1e-6, experts: None },
    }
}

fn llama_read(json: &HfJson) -> Result<ModelConfig> {
    let class = llama_class(&json.str("model_type")?);
    let d = json.usize("hidden_size")?;
    let heads = json.usize("num_attention_heads")?;
    let attention_bias = json.bool_or("attention_bias", false)?;
    if attention_bias != json.bool_or("mlp_bias", false)? {
        return Err(Error::checkpoint(
            &json.path,
            "fields `attention_bias` and `mlp_bias` differ; lmforge's `bias` switch covers both together",
        ));
    }
    let act = activation_from_hf(json, "hidden_act", "silu")?;
    let hidden = json.usize("intermediate_size")?;
    let dense = Ffn::Gated { hidden, act };
    let ffn = match class.experts {
        Some((experts, top_k)) => {
            let top_k = json.usize_or("num_experts_per_tok", top_k)?;
            Ffn::Moe {
                experts: json.usize_or("num_local_experts", experts)?,
                top_k,
                expert: Box::new(dense),
                router: mixtral_router_read(json, top_k)?,
            }
        }
        None => dense,
    };
    let window = match class.window {
        Some(default) if !json.contains("sliding_window") => default,
        Some(_) => json.opt_usize("sliding_window")?,
        None => None,
    };
    let context_length = json.usize("max_position_embeddings")?;
    Ok(ModelConfig {
        vocab_size: json.usize("vocab_size")?,
        d_model: d,
        layers: json.usize("num_hidden_layers")?,
        context_length,
        norm: Norm::RmsNorm,
        norm_eps: json.f64_or("rms_norm_eps", class.rms_norm_eps)?,
        positions: read_rope(json, RopeDefaults { theta: class.theta, fraction: None }, context_length)?,
        attention: Attention {
            heads,
            kv_heads: json.usize_or("num_key_value_heads", class.kv_heads.unwrap_or(heads))?,
            head_dim: json.opt_usize("head_dim")?.filter(|hd| hd * heads != d),
            window,
            layer_windows: None,
            implementation: Default::default(),
        },
        ffn,
        bias: attention_bias,
        tie_embeddings: json.bool_or("tie_word_embeddings", false)?,
        ..decoder(json)
    })
}

fn llama_write(c: &ModelConfig) -> Option<Value> {
    let (model_type, arch, expert) = match &c.ffn {
        Ffn::Gated { .. } if c.attention.window.is_none() => ("llama", "LlamaForCausalLM", &c.ffn),
        Ffn::Gated { .. } => ("mistral", "MistralForCausalLM", &c.ffn),
        Ffn::Moe { expert, .. } => ("mixtral", "MixtralForCausalLM", &**expert),
        Ffn::Mlp { .. } => return None,
    };
    let Ffn::Gated { hidden, act } = *expert else {
        return None;
    };
    let Positions::Rope { theta, fraction, scaling } = c.positions else {
        return None;
    };
    let ok = c.layout == Layout::DecoderOnly
        && c.norm == Norm::RmsNorm
        && c.norm_placement == NormPlacement::Pre
        && fraction == 1.0
        && c.residual == Residual::Sequential
        && !c.head_bias
        && c.attention.layer_windows.is_none()
        && (model_type == "llama" || !c.bias);
    if !ok {
        return None;
    }
    let mut v = json!({
        "model_type": model_type, "architectures": [arch],
        "vocab_size": c.vocab_size, "hidden_size": c.d_model, "intermediate_size": hidden,
        "num_hidden_layers": c.layers, "num_attention_heads": c.attention.heads,
        "num_key_value_heads": c.attention.kv_heads, "head_dim": c.head_dim(),
        "max_position_embeddings": c.context_length, "rms_norm_eps": c.norm_eps,
        "rope_parameters": write_rope(theta, None, scaling.as_ref()),
        "hidden_act": activation_to_hf(act), "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": c.bias, "mlp_bias": c.bias,
    });
    if model_type != "llama" {
        v["sliding_window"] = json!(c.attention.window);
    }
    if let Ffn::Moe { experts, top_k, router, .. } = &c.ffn {
        if router.gating != Gating::Renormalized {
            return None; // Mixtral always renormalises its top-k weights.
        }
        v["num_local_experts"] = json!(experts);
        v["num_experts_per_tok"] = json!(top_k);
        v["router_aux_loss_coef"] = json!(router.balance_loss_coef / *top_k as f64);
        v["router_jitter_noise"] = json!(router.jitter);
    }
    Some(v)
}

/// Mixtral's router settings. transformers' balance loss counts all k choices of a token, so
/// it is k times lmforge's: its `router_aux_loss_coef` c is lmforge's `k · c`. Its
/// `router_jitter_noise` multiplies the block's input, lmforge's the router's input only (as the
/// Switch Transformer did); both are off in the published checkpoints. Mixtral has no z-loss and
/// no capacity limit (dropless): those keep lmforge's defaults.
fn mixtral_router_read(json: &HfJson, top_k: usize) -> Result<Router> {
    let defaults = Router::default();
    Ok(Router {
        balance_loss_coef: json.f64_or("router_aux_loss_coef", defaults.balance_loss_coef / top_k as f64)?
            * top_k as f64,
        jitter: json.f64_or("router_jitter_noise", 0.0)?,
        ..defaults
    })
}

fn llama_tensors(c: &ModelConfig) -> Vec<HfTensor> {
    let mut out = vec![HfTensor::new("model.embed_tokens.weight", "tok_embeddings.weight")
        .rows("vocab_size", c.vocab_size)
        .cols("hidden_size", c.d_model)];
    let att = &c.attention;
    let hidden = c.ffn.hidden();
    out.extend(layer_tensors(c, |i, l, out| {
        let h = format!("model.layers.{i}");
        out.push(HfTensor::new(format!("{h}.input_layernorm.weight"), format!("{l}.attn_norm.weight")));
        for (p, rows) in [
            ("q", Some(("num_attention_heads", att.heads))),
            ("k", Some(("num_key_value_heads", att.kv_heads))),
            ("v", None),
            ("o", None),
        ] {
            linear_stating(out, &format!("{h}.self_attn.{p}_proj"), &format!("{l}.attn.{p}"), c.bias, rows);
        }
        out.push(HfTensor::new(format!("{h}.post_attention_layernorm.weight"), format!("{l}.ffn_norm.weight")));
        let width = Some(("intermediate_size", hidden));
        match &c.ffn {
            Ffn::Moe { experts, .. } => {
                let moe = format!("{h}.block_sparse_moe");
                out.push(
                    HfTensor::new(format!("{moe}.gate.weight"), format!("{l}.ffn.router.weight"))
                        .rows("num_local_experts", *experts),
                );
                for e in 0..*experts {
                    for (hf, ours) in [("w1", "gate"), ("w2", "down"), ("w3", "up")] {
                        let (hf, ours) = (format!("{moe}.experts.{e}.{hf}"), format!("{l}.ffn.experts.{e}.{ours}"));
                        linear_stating(out, &hf, &ours, c.bias, width.filter(|_| ours.ends_with("gate")));
                    }
                }
            }
            _ => {
                for p in ["gate", "up", "down"] {
                    let (hf, ours) = (format!("{h}.mlp.{p}_proj"), format!("{l}.ffn.{p}"));
                    linear_stating(out, &hf, &ours, c.bias, width.filter(|_| p == "gate"));
                }
            }
        }
    }));
    out.push(HfTensor::new("model.norm.weight", "final_norm.weight"));
    if !c.tie_embeddings {
        out.push(HfTensor::new("lm_head.weight", "lm_head.weight").rows("vocab_size", c.vocab_size));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Phi-2: partial RoPE, one LayerNorm feeding parallel attention and MLP, biases, biased head.

fn phi_read(json: &HfJson) -> Result<ModelConfig> {
    let heads = json.usize("num_attention_heads")?;
    json.reject_if_set("qk_layernorm", "query/key LayerNorm is not implemented")?;
    let context_length = json.usize("max_position_embeddings")?;
    Ok(ModelConfig {
        vocab_size: json.usize("vocab_size")?,
        d_model: json.usize("hidden_size")?,
        layers: json.usize("num_hidden_layers")?,
        context_length,
        norm_eps: json.f64_or("layer_norm_eps", 1e-5)?,
        positions: read_rope(json, RopeDefaults { theta: 10_000.0, fraction: Some(0.5) }, context_length)?,
        attention: Attention {
            heads,
            kv_heads: json.usize_or("num_key_value_heads", heads)?,
            head_dim: None,
            window: None,
            layer_windows: None,
            implementation: Default::default(),
        },
        ffn: Ffn::Mlp {
            hidden: json.usize("intermediate_size")?,
            act: activation_from_hf(json, "hidden_act", "gelu_new")?,
        },
        residual: Residual::Parallel,
        head_bias: true,
        tie_embeddings: json.bool_or("tie_word_embeddings", false)?,
        ..decoder(json)
    })
}

fn phi_write(c: &ModelConfig) -> Option<Value> {
    let k = common(c);
    let Ffn::Mlp { hidden, act } = c.ffn else {
        return None;
    };
    let Positions::Rope { theta, fraction, scaling } = c.positions else {
        return None;
    };
    let ok = c.layout == Layout::DecoderOnly
        && c.norm == Norm::LayerNorm
        && c.residual == Residual::Parallel
        && c.bias
        && c.head_bias
        && k.window_free
        && k.default_head_dim;
    ok.then(|| {
        json!({
            "model_type": "phi", "architectures": ["PhiForCausalLM"],
            "vocab_size": c.vocab_size, "hidden_size": c.d_model, "intermediate_size": hidden,
            "num_hidden_layers": c.layers, "num_attention_heads": c.attention.heads,
            "num_key_value_heads": c.attention.kv_heads, "max_position_embeddings": c.context_length,
            "layer_norm_eps": c.norm_eps, "rope_parameters": write_rope(theta, Some(fraction), scaling.as_ref()),
            "hidden_act": activation_to_hf(act), "tie_word_embeddings": c.tie_embeddings,
            "qk_layernorm": false, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attention_dropout": 0.0,
        })
    })
}

fn phi_tensors(c: &ModelConfig) -> Vec<HfTensor> {
    let mut out = vec![HfTensor::new("model.embed_tokens.weight", "tok_embeddings.weight")
        .rows("vocab_size", c.vocab_size)
        .cols("hidden_size", c.d_model)];
    let hidden = c.ffn.hidden();
    out.extend(layer_tensors(c, |i, l, out| {
        let h = format!("model.layers.{i}");
        linear(out, &format!("{h}.input_layernorm"), &format!("{l}.attn_norm"), true);
        for (hf, ours, rows) in [
            ("q_proj", "q", Some(("num_attention_heads", c.attention.heads))),
            ("k_proj", "k", Some(("num_key_value_heads", c.attention.kv_heads))),
            ("v_proj", "v", None),
            ("dense", "o", None),
        ] {
            linear_stating(out, &format!("{h}.self_attn.{hf}"), &format!("{l}.attn.{ours}"), true, rows);
        }
        linear_stating(out, &format!("{h}.mlp.fc1"), &format!("{l}.ffn.up"), true, Some(("intermediate_size", hidden)));
        linear(out, &format!("{h}.mlp.fc2"), &format!("{l}.ffn.down"), true);
    }));
    linear(&mut out, "model.final_layernorm", "final_norm", true);
    if !c.tie_embeddings {
        out.push(HfTensor::new("lm_head.weight", "lm_head.weight").rows("vocab_size", c.vocab_size));
    }
    out.push(HfTensor::new("lm_head.bias", "lm_head.bias"));
    out
}

// ---------------------------------------------------------------------------------------------
// MPT: ALiBi, no biases (norms included), exact GELU, fused Wqkv stored [3D, D].
//
// transformers' MPT (`modeling_mpt.py`, 5.x) builds one architecture whatever some of its config
// fields say, and lmforge builds the same so that every checkpoint transformers loads, loads:
// - the FFN is always 4 × d_model: `MptMLP` makes `nn.Linear(hidden_size, 4 * hidden_size)` and
//   never reads `expansion_ratio`;
// - ALiBi is always on with a maximum bias of 8: `MptModel.forward` calls
//   `build_mpt_alibi_tensor(num_heads, max_seq_len)` without `alibi_bias_max`, and nothing
//   reads `attn_config.alibi` or `learned_pos_emb`;
// - there are no biases: every `nn.Linear` has `bias=False`, the norms' biases are deleted, and
//   `no_bias` is never read;
// - `attn_config.qk_ln` and `attn_type` are never read either.
// A file whose tensors do not fit that (a MosaicML original with biases or learned positions)
// is refused tensor by tensor, where transformers would drop them silently.

/// The FFN width of transformers' MPT.
const MPT_FFN_RATIO: usize = 4;
/// The ALiBi maximum bias of transformers' MPT.
const MPT_ALIBI_MAX_BIAS: f64 = 8.0;

fn mpt_read(json: &HfJson) -> Result<ModelConfig> {
    let d = json.usize("d_model")?;
    let heads = json.usize("n_heads")?;
    let attn = json.object("attn_config");
    attn.reject_if_set("clip_qkv", "QKV clipping is not implemented")?;
    attn.reject_if_set("softmax_scale", "only the default 1/sqrt(head_dim) scale is implemented")?;
    Ok(ModelConfig {
        vocab_size: json.usize("vocab_size")?,
        d_model: d,
        layers: json.usize("n_layers")?,
        context_length: json.usize("max_seq_len")?,
        norm_eps: json.f64_or("layer_norm_epsilon", 1e-5)?,
        positions: Positions::Alibi { max_bias: MPT_ALIBI_MAX_BIAS },
        attention: Attention::new(heads, heads),
        ffn: Ffn::Mlp { hidden: MPT_FFN_RATIO * d, act: Activation::Gelu },
        bias: false,
        tie_embeddings: json.bool_or("tie_word_embeddings", true)?,
        ..decoder(json)
    })
}

/// Only what transformers' MPT builds (see above): an export claiming more would load as a
/// different model.
fn mpt_write(c: &ModelConfig) -> Option<Value> {
    let k = common(c);
    let Ffn::Mlp { hidden, act: Activation::Gelu } = c.ffn else {
        return None;
    };
    let ok = c.layout == Layout::DecoderOnly
        && c.norm == Norm::LayerNorm
        && c.norm_placement == NormPlacement::Pre
        && c.positions == (Positions::Alibi { max_bias: MPT_ALIBI_MAX_BIAS })
        && hidden == MPT_FFN_RATIO * c.d_model
        && c.residual == Residual::Sequential
        && !c.bias
        && !c.head_bias
        && k.window_free
        && k.mha
        && k.default_head_dim;
    ok.then(|| {
        json!({
            "model_type": "mpt", "architectures": ["MptForCausalLM"],
            "vocab_size": c.vocab_size, "d_model": c.d_model, "n_layers": c.layers, "n_heads": c.attention.heads,
            "max_seq_len": c.context_length, "expansion_ratio": MPT_FFN_RATIO, "no_bias": true,
            "layer_norm_epsilon": c.norm_eps, "tie_word_embeddings": c.tie_embeddings,
            // transformers' MptAttentionConfig wants an integer here.
            "attn_config": { "alibi": true, "alibi_bias_max": MPT_ALIBI_MAX_BIAS as i64 },
            "learned_pos_emb": false, "resid_pdrop": 0.0, "emb_pdrop": 0.0,
        })
    })
}

fn mpt_tensors(c: &ModelConfig) -> Vec<HfTensor> {
    let mut out = vec![HfTensor::new("transformer.wte.weight", "tok_embeddings.weight")
        .rows("vocab_size", c.vocab_size)
        .cols("d_model", c.d_model)];
    out.extend(layer_tensors(c, |i, l, out| {
        let h = format!("transformer.blocks.{i}");
        out.push(HfTensor::new(format!("{h}.norm_1.weight"), format!("{l}.attn_norm.weight")));
        let qkv = ["q", "k", "v"].iter().map(|p| format!("{l}.attn.{p}.weight")).collect();
        out.push(HfTensor::fused(format!("{h}.attn.Wqkv.weight"), qkv).cols("d_model", c.d_model));
        out.push(HfTensor::new(format!("{h}.attn.out_proj.weight"), format!("{l}.attn.o.weight")));
        out.push(HfTensor::new(format!("{h}.norm_2.weight"), format!("{l}.ffn_norm.weight")));
        out.push(
            HfTensor::new(format!("{h}.ffn.up_proj.weight"), format!("{l}.ffn.up.weight")).rows("d_model", c.d_model),
        );
        out.push(HfTensor::new(format!("{h}.ffn.down_proj.weight"), format!("{l}.ffn.down.weight")));
    }));
    out.push(HfTensor::new("transformer.norm_f.weight", "final_norm.weight"));
    if !c.tie_embeddings {
        out.push(HfTensor::new("lm_head.weight", "lm_head.weight").rows("vocab_size", c.vocab_size));
    }
    out
}
