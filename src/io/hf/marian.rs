//! Marian (`MarianMTModel`, the Helsinki-NLP opus-mt translators): an encoder–decoder
//! Transformer with post-norm blocks, Marian's sinusoid layout (sines then cosines), token
//! embeddings shared by encoder, decoder and (when tied) the head, optionally scaled by
//! `√d_model`, and an output bias (`final_logits_bias`, a `[1, V]` buffer).
//!
//! What transformers 5 builds from `config.json` (`modeling_marian.py`): LayerNorms with the
//! default epsilon 1e-5 (the config has no field for it), biases on every projection, one
//! head count and one FFN width for both stacks per layer kind, no final norms, the decoder
//! starting from `decoder_start_token_id`. Configs it builds otherwise are refused by name: a
//! separate decoder vocabulary, unshared embeddings, different widths or head counts in encoder
//! and decoder, and `tie_word_embeddings = false`, with which transformers 5 ties nothing at
//! all (`get_expanded_tied_weights_keys`): encoder, decoder and head each get their own matrix. `activation_dropout` and the layer-drop rates only act in training and
//! have no lmforge counterpart; they are not carried.

use serde_json::{json, Value};

use super::families::{activation_from_hf, activation_to_hf, linear, Family, HfTensor};
use super::HfJson;
use crate::config::{
    Attention, Dropout, Ffn, Layout, ModelConfig, Norm, NormPlacement, Positions, Residual, SinusoidLayout,
};
use crate::error::{Error, Result};

/// `nn.LayerNorm`'s default, which every Marian LayerNorm uses.
const LAYER_NORM_EPS: f64 = 1e-5;

pub(super) const FAMILY: Family = Family {
    model_types: &["marian"],
    read_config: read,
    write_config: write,
    tensors,
    optional_prefix: None,
    // The sinusoid tables are rebuilt at load; checkpoints may also carry the tied copies of the
    // shared embedding, which transformers re-ties to it on load.
    ignorable: |n| {
        n.ends_with("embed_positions.weight")
            || n == "model.encoder.embed_tokens.weight"
            || n == "model.decoder.embed_tokens.weight"
            || n == "lm_head.weight"
    },
};

fn read(json: &HfJson) -> Result<ModelConfig> {
    let refuse = |reason: String| Error::checkpoint(&json.path, reason);
    let vocab_size = json.usize("vocab_size")?;
    let decoder_vocab = json.usize_or("decoder_vocab_size", vocab_size)?;
    if decoder_vocab != vocab_size {
        return Err(refuse(format!(
            "fields `decoder_vocab_size` = {decoder_vocab} and `vocab_size` = {vocab_size} differ: lmforge's encoder-decoder shares one vocabulary"
        )));
    }
    for key in ["share_encoder_decoder_embeddings", "tie_word_embeddings"] {
        if !json.bool_or(key, true)? {
            return Err(refuse(format!(
                "field `{key}` = false: transformers then builds separate encoder and decoder embeddings, but lmforge's encoder-decoder shares one embedding matrix"
            )));
        }
    }
    let same = |encoder: &str, decoder: &str| -> Result<usize> {
        let (e, d) = (json.usize(encoder)?, json.usize(decoder)?);
        if e != d {
            return Err(refuse(format!(
                "fields `{encoder}` = {e} and `{decoder}` = {d} differ: lmforge builds both stacks with one value"
            )));
        }
        Ok(e)
    };
    let heads = same("encoder_attention_heads", "decoder_attention_heads")?;
    let hidden = same("encoder_ffn_dim", "decoder_ffn_dim")?;
    let dropout = json.f64_or("dropout", 0.1)?;
    Ok(ModelConfig {
        name: json.value.get("_name_or_path").and_then(Value::as_str).unwrap_or("").to_string(),
        layout: Layout::EncoderDecoder {
            encoder_layers: json.usize("encoder_layers")?,
            decoder_start_token_id: token_id(json, "decoder_start_token_id")?.unwrap_or(58100),
            eos_token_id: token_id(json, "eos_token_id")?,
        },
        vocab_size,
        d_model: json.usize("d_model")?,
        layers: json.usize("decoder_layers")?,
        context_length: json.usize_or("max_position_embeddings", 1024)?,
        norm: Norm::LayerNorm,
        norm_placement: NormPlacement::Post,
        norm_eps: LAYER_NORM_EPS,
        positions: Positions::Sinusoidal { layout: SinusoidLayout::Halves },
        attention: Attention::new(heads, heads),
        ffn: Ffn::Mlp { hidden, act: activation_from_hf(json, "activation_function", "gelu")? },
        residual: Residual::Sequential,
        bias: true,
        head_bias: true,
        tie_embeddings: true,
        scale_embeddings: json.bool_or("scale_embedding", false)?,
        dropout: Dropout { embeddings: dropout, residual: dropout, attention: json.f64_or("attention_dropout", 0.0)? },
    })
}

/// A token id field: a number, the first of a list (transformers allows several end tokens),
/// or nothing.
fn token_id(json: &HfJson, key: &str) -> Result<Option<u32>> {
    let value = match json.value.get(key) {
        Some(Value::Array(ids)) => ids.first(),
        other => other,
    };
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .map(Some)
            .ok_or_else(|| Error::checkpoint(&json.path, format!("field `{key}`: expected a token id, found {v}"))),
    }
}

fn write(c: &ModelConfig) -> Option<Value> {
    let Layout::EncoderDecoder { encoder_layers, decoder_start_token_id, eos_token_id } = c.layout else {
        return None;
    };
    let Ffn::Mlp { hidden, act } = c.ffn else {
        return None;
    };
    let att = &c.attention;
    let ok = c.norm == Norm::LayerNorm
        && c.norm_placement == NormPlacement::Post
        && c.norm_eps == LAYER_NORM_EPS
        && c.positions == (Positions::Sinusoidal { layout: SinusoidLayout::Halves })
        && att.heads == att.kv_heads
        && c.head_dim() * att.heads == c.d_model
        && c.bias
        && c.head_bias
        && c.tie_embeddings
        && c.residual == Residual::Sequential
        && c.dropout.embeddings == c.dropout.residual;
    ok.then(|| {
        json!({
            "model_type": "marian", "architectures": ["MarianMTModel"], "is_encoder_decoder": true,
            "vocab_size": c.vocab_size, "decoder_vocab_size": c.vocab_size, "d_model": c.d_model,
            "encoder_layers": encoder_layers, "decoder_layers": c.layers,
            "encoder_attention_heads": att.heads, "decoder_attention_heads": att.heads,
            "encoder_ffn_dim": hidden, "decoder_ffn_dim": hidden,
            "max_position_embeddings": c.context_length, "activation_function": activation_to_hf(act),
            "scale_embedding": c.scale_embeddings, "share_encoder_decoder_embeddings": true,
            "tie_word_embeddings": true,
            "dropout": c.dropout.residual, "attention_dropout": c.dropout.attention, "activation_dropout": 0.0,
            "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0,
            // Marian decodes from its pad token; transformers only uses the pad id to fill labels.
            "decoder_start_token_id": decoder_start_token_id, "pad_token_id": decoder_start_token_id,
            "eos_token_id": eos_token_id, "forced_eos_token_id": eos_token_id,
        })
    })
}

fn tensors(c: &ModelConfig) -> Vec<HfTensor> {
    let mut out = vec![HfTensor::new("model.shared.weight", "tok_embeddings.weight")];
    let attention = |out: &mut Vec<HfTensor>, hf: &str, ours: &str| {
        for (p, q) in [("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("out_proj", "o")] {
            linear(out, &format!("{hf}.{p}"), &format!("{ours}.{q}"), true);
        }
    };
    let block = |out: &mut Vec<HfTensor>, hf: &str, ours: &str, cross: bool| {
        attention(out, &format!("{hf}.self_attn"), &format!("{ours}.attn"));
        linear(out, &format!("{hf}.self_attn_layer_norm"), &format!("{ours}.attn_norm"), true);
        if cross {
            attention(out, &format!("{hf}.encoder_attn"), &format!("{ours}.cross_attn"));
            linear(out, &format!("{hf}.encoder_attn_layer_norm"), &format!("{ours}.cross_attn_norm"), true);
        }
        linear(out, &format!("{hf}.fc1"), &format!("{ours}.ffn.up"), true);
        linear(out, &format!("{hf}.fc2"), &format!("{ours}.ffn.down"), true);
        linear(out, &format!("{hf}.final_layer_norm"), &format!("{ours}.ffn_norm"), true);
    };
    for i in 0..c.layout.encoder_layers() {
        block(&mut out, &format!("model.encoder.layers.{i}"), &format!("encoder.layers.{i}"), false);
    }
    for i in 0..c.layers {
        block(&mut out, &format!("model.decoder.layers.{i}"), &format!("layers.{i}"), true);
    }
    out.push(HfTensor::new("final_logits_bias", "lm_head.bias").with_unit_dim());
    out
}
