//! A tokenizer as GGUF `tokenizer.*` keys: the reverse of
//! [`TextTokenizer::from_gguf_metadata`](crate::io::TextTokenizer::from_gguf_metadata).
//!
//! GGUF holds a GPT-2-style byte-level BPE as its vocabulary (`tokenizer.ggml.tokens`, one
//! string per id), a type per token, the merges in rank order, and only the *name* of the
//! pre-tokenizer (`tokenizer.ggml.pre`), which llama.cpp maps to its own split rules. So the
//! name is chosen by what the tokenizer does, not what it is called: its pre-tokenizer must be
//! exactly one of [`GGUF_PRE_TOKENIZERS`]' rules, or the export is refused (a wrong name would
//! silently change the token ids). The keys are those `convert_hf_to_gguf.py` writes
//! (`_set_vocab_gpt2`, `SpecialVocab`).

use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;

use crate::data::END_OF_TEXT;
use crate::error::{Error, Result};
use crate::io::tokenizer::GGUF_PRE_TOKENIZERS;
use crate::io::TextTokenizer;

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// The `tokenizer.*` keys for `tokenizer`, with `vocab_size` entries (the model's embedding
/// rows): ids the tokenizer does not use become `[PAD{id}]` tokens of type unused, as in
/// `convert_hf_to_gguf.py`.
pub fn tokenizer_metadata(tokenizer: &TextTokenizer, vocab_size: usize) -> Result<Vec<(String, Value)>> {
    let refuse = |reason: String| {
        Error::Unsupported(format!(
            "the tokenizer cannot be written to GGUF: {reason}\n\
             HINT: GGUF export carries GPT-2-style byte-level BPE tokenizers; for another kind, export with \
             `--to hf` and convert that directory with llama.cpp's convert_hf_to_gguf.py"
        ))
    };
    let json: Json = serde_json::from_str(&tokenizer.inner().to_string(false).map_err(|e| refuse(e.to_string()))?)
        .map_err(|e| refuse(e.to_string()))?;
    let model = &json["model"];
    if model["type"] != "BPE" {
        return Err(refuse(format!("its model is {}, not BPE", model["type"])));
    }
    if json["decoder"]["type"] != "ByteLevel" {
        return Err(refuse(format!("its decoder is {}, not ByteLevel", json["decoder"]["type"])));
    }
    if !json["normalizer"].is_null() {
        return Err(refuse(format!(
            "it has a normalizer ({}), which GGUF cannot describe",
            json["normalizer"]["type"]
        )));
    }
    let pre = pre_tokenizer_name(&json["pre_tokenizer"]).map_err(refuse)?;

    let mut tokens: Vec<Option<(String, i32)>> = vec![None; vocab_size];
    let mut place = |id: u64, token: &str, kind: i32| -> Result<()> {
        let slot = usize::try_from(id).ok().and_then(|id| tokens.get_mut(id)).ok_or_else(|| {
            refuse(format!("token `{token}` has id {id}, beyond the model's vocabulary of {vocab_size}"))
        })?;
        // An added token that is also in the BPE vocabulary keeps its added type.
        if slot.as_ref().is_none_or(|(_, k)| *k == NORMAL) {
            *slot = Some((token.to_string(), kind));
        }
        Ok(())
    };
    for (token, id) in model["vocab"].as_object().into_iter().flatten() {
        place(id.as_u64().unwrap_or(u64::MAX), token, NORMAL)?;
    }
    for added in json["added_tokens"].as_array().into_iter().flatten() {
        let kind = if added["special"] == true { CONTROL } else { USER_DEFINED };
        place(added["id"].as_u64().unwrap_or(u64::MAX), added["content"].as_str().unwrap_or_default(), kind)?;
    }
    let (tokens, types): (Vec<Value>, Vec<Value>) = tokens
        .into_iter()
        .enumerate()
        .map(|(id, token)| {
            let (token, kind) = token.unwrap_or_else(|| (format!("[PAD{id}]"), UNUSED));
            (Value::String(token), Value::I32(kind))
        })
        .unzip();
    let merges = merges(&model["merges"]).map_err(refuse)?;

    let mut keys = vec![
        ("tokenizer.ggml.model".to_string(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
    ];
    // The first EOS ends a sequence, a second one (a chat model's end of turn) is llama.cpp's
    // end-of-turn token; both stop generation there, as they do here. A tokenizer that declares
    // none (lmforge's own, trained by `tokenizer train` or `train`) ends documents with
    // `<|endoftext|>`, which lmforge's data preparation puts between them; it becomes EOS and,
    // as in GPT-2, BOS. Written out either way, because without the keys llama.cpp takes id 11
    // for both in a BPE vocabulary, whatever token that is.
    let (bos, eos) = match (tokenizer.eos_ids(), tokenizer.token_to_id(END_OF_TEXT)) {
        ([], Some(end_of_text)) => (tokenizer.bos().or(Some(end_of_text)), vec![end_of_text]),
        (declared, _) => (tokenizer.bos(), declared.to_vec()),
    };
    if let Some(bos) = bos {
        keys.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(bos)));
    }
    if let Some(&id) = eos.first() {
        keys.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(id)));
    }
    if let Some(&id) = eos.get(1) {
        keys.push(("tokenizer.ggml.eot_token_id".into(), Value::U32(id)));
    }
    // Whether encoding adds BOS/EOS, observed rather than assumed: llama.cpp's default for a
    // BPE vocabulary depends on its pre-tokenizer.
    let (adds_bos, adds_eos) = adds_special(tokenizer)?;
    keys.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(adds_bos)));
    keys.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(adds_eos)));
    if let Some(template) = tokenizer.chat_template() {
        keys.push(("tokenizer.chat_template".into(), Value::String(template.to_string())));
    }
    Ok(keys)
}

/// The `tokenizer.ggml.pre` name whose rules are exactly this pre-tokenizer (in
/// `tokenizer.json` form).
fn pre_tokenizer_name(pre: &Json) -> std::result::Result<&'static str, String> {
    for (names, rules) in GGUF_PRE_TOKENIZERS {
        let built = rules.build().map_err(|e| e.to_string())?;
        if serde_json::to_value(&built).ok().as_ref() == Some(pre) {
            return Ok(names[0]);
        }
    }
    Err(format!(
        "its pre-tokenizer {pre} is none of the splits llama.cpp names (GPT-2, digits then GPT-2, Llama 3, Qwen 2)"
    ))
}

/// Merges as `"left right"` strings in rank order (`tokenizer.json` has them as such strings
/// or, since tokenizers 0.20, as `[left, right]` pairs).
fn merges(merges: &Json) -> std::result::Result<Vec<Value>, String> {
    let Some(merges) = merges.as_array() else {
        return Ok(Vec::new());
    };
    merges
        .iter()
        .enumerate()
        .map(|(rank, merge)| match merge {
            Json::String(pair) if pair.split(' ').count() == 2 => Ok(Value::String(pair.clone())),
            Json::Array(pair) => match pair.as_slice() {
                [Json::String(left), Json::String(right)] if !left.contains(' ') && !right.contains(' ') => {
                    Ok(Value::String(format!("{left} {right}")))
                }
                _ => Err(format!("merge {rank} ({merge}) is not a pair of tokens without spaces")),
            },
            _ => Err(format!("merge {rank} ({merge}) is not a pair of tokens without spaces")),
        })
        .collect()
}

/// Whether `encode(text, add_special = true)` puts BOS in front and EOS behind.
fn adds_special(tokenizer: &TextTokenizer) -> Result<(bool, bool)> {
    let plain = tokenizer.encode("a", false)?;
    let special = tokenizer.encode("a", true)?;
    let bos = tokenizer.bos().is_some_and(|bos| special.first() == Some(&bos) && plain.first() != Some(&bos));
    let eos = tokenizer.eos_ids().first().is_some_and(|eos| special.last() == Some(eos) && plain.last() != Some(eos));
    Ok((bos, eos))
}
