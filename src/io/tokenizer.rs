//! Text ↔ token ids, the chat template, and streaming decode, over Hugging Face `tokenizers`.
//!
//! A [`TextTokenizer`] comes from one of three places, and behaves the same whichever it is:
//! - a `tokenizer.json` ([`TextTokenizer::from_file`]), with the chat template and BOS/EOS taken
//!   from the sibling `tokenizer_config.json` / `chat_template.jinja` / `generation_config.json`;
//! - GPT-2's `vocab.json` + `merges.txt` ([`TextTokenizer::from_gpt2_files`]);
//! - a GGUF file's metadata ([`TextTokenizer::from_gguf_metadata`]), which stores only the
//!   vocabulary, merges, token types and the *name* of llama.cpp's pre-tokenizer
//!   (`tokenizer.ggml.pre`). The name selects the split rules in [`GGUF_PRE_TOKENIZERS`]; those
//!   rules decide how text is cut before BPE, so a wrong choice silently changes token ids
//!   (e.g. SmolLM's "smollm" splits every digit on its own, plain GPT-2 does not).

use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value as GgufValue};
use serde::Serialize;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::{SpecialToken, TemplateProcessing};
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::gguf::{value_as_usize, value_kind};
use crate::error::{Error, Result};

/// The files beside a `tokenizer.json` that complete it: BOS/EOS and the chat template
/// (`tokenizer_config.json`), a template on its own (`chat_template.jinja`), extra EOS ids
/// (`generation_config.json`). Whoever copies a tokenizer (a checkpoint) copies these too.
pub const TOKENIZER_COMPANIONS: [&str; 3] = ["tokenizer_config.json", "chat_template.jinja", "generation_config.json"];

/// A tokenizer plus what generation needs around it: BOS, the EOS ids that end a reply, and the
/// chat template.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    bos: Option<u32>,
    /// Every id that ends generation (a chat model often has several, e.g. `<|im_end|>` and
    /// `<|endoftext|>`).
    eos: Vec<u32>,
    chat_template: Option<String>,
    /// Where it came from, for messages.
    origin: String,
}

/// One chat turn, as chat templates expect it.
#[derive(Clone, Debug, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl TextTokenizer {
    /// Wrap an existing `tokenizers::Tokenizer`.
    pub fn new(inner: Tokenizer, bos: Option<u32>, eos: Vec<u32>, chat_template: Option<String>, origin: &str) -> Self {
        Self { inner, bos, eos, chat_template, origin: origin.to_string() }
    }

    /// The tokenizer in a model directory: `tokenizer.json`, else GPT-2's `vocab.json` +
    /// `merges.txt`; `None` when the directory has neither.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let json = dir.join("tokenizer.json");
        if json.is_file() {
            return Self::from_file(&json).map(Some);
        }
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if vocab.is_file() && merges.is_file() {
            let mut tokenizer = Self::from_gpt2_files(&vocab, &merges)?;
            tokenizer.read_sibling_configs(dir)?;
            return Ok(Some(tokenizer));
        }
        Ok(None)
    }

    /// Read a Hugging Face `tokenizer.json`. When present next to it, `tokenizer_config.json`
    /// supplies the chat template and BOS/EOS tokens, `chat_template.jinja` (newer repos) the
    /// template, and `generation_config.json` extra EOS ids.
    pub fn from_file(path: &Path) -> Result<Self> {
        let origin = path.display().to_string();
        let inner = Tokenizer::from_file(path).map_err(|e| tok_err(&origin, format!("cannot read: {e}")))?;
        let mut tokenizer = Self { inner, bos: None, eos: Vec::new(), chat_template: None, origin };
        tokenizer.read_sibling_configs(path.parent().unwrap_or(Path::new(".")))?;
        Ok(tokenizer)
    }

    /// Take BOS/EOS and the chat template from the Hugging Face files in `dir`, where present;
    /// what they do not mention is left as it is.
    fn read_sibling_configs(&mut self, dir: &Path) -> Result<()> {
        let [config_file, jinja_file, generation_file] = TOKENIZER_COMPANIONS;
        let config = read_json_opt(&dir.join(config_file))?;
        let generation = read_json_opt(&dir.join(generation_file))?;
        let token_id = |field: &str| -> Result<Option<u32>> {
            let Some(token) = config.as_ref().and_then(|c| token_content(c.get(field)?)) else {
                return Ok(None);
            };
            self.inner
                .token_to_id(token)
                .map(Some)
                .ok_or_else(|| self.err(format!("tokenizer_config.json: {field} `{token}` is not in the vocabulary")))
        };
        let bos = token_id("bos_token")?;
        let mut eos: Vec<u32> = token_id("eos_token")?.into_iter().collect();
        if bos.is_some() {
            self.bos = bos;
        }
        match generation.as_ref().and_then(|g| g.get("eos_token_id")) {
            Some(serde_json::Value::Number(n)) => eos.extend(n.as_u64().and_then(|n| u32::try_from(n).ok())),
            Some(serde_json::Value::Array(ids)) => {
                eos.extend(ids.iter().filter_map(|n| n.as_u64().and_then(|n| u32::try_from(n).ok())))
            }
            _ => {}
        }
        if !eos.is_empty() {
            dedup_in_order(&mut eos);
            self.eos = eos;
        }
        let jinja = dir.join(jinja_file);
        if jinja.is_file() {
            self.chat_template = Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?);
        } else if let Some(template) = config.as_ref().and_then(|c| chat_template_field(c.get("chat_template")?)) {
            self.chat_template = Some(template);
        }
        Ok(())
    }

    /// GPT-2's byte-level BPE from `vocab.json` and `merges.txt`; `<|endoftext|>`, when in the
    /// vocabulary, is registered as a special token and used as both BOS and EOS (as GPT-2 does).
    pub fn from_gpt2_files(vocab: &Path, merges: &Path) -> Result<Self> {
        let origin = format!("{} + {}", vocab.display(), merges.display());
        let (vocab_path, merges_path) = (vocab.display().to_string(), merges.display().to_string());
        let bpe = BPE::from_file(&vocab_path, &merges_path)
            .build()
            .map_err(|e| tok_err(&origin, format!("cannot build BPE: {e}")))?;
        let mut inner = byte_level_tokenizer(bpe, PreTokenizer::Gpt2)?;
        let eot = inner.token_to_id("<|endoftext|>");
        if eot.is_some() {
            inner.add_special_tokens(&[AddedToken::from("<|endoftext|>", true)]);
        }
        Ok(Self { inner, bos: eot, eos: eot.into_iter().collect(), chat_template: None, origin })
    }

    /// Rebuild the tokenizer a GGUF file describes (`tokenizer.ggml.model = "gpt2"`: byte-level
    /// BPE). Control tokens (`token_type == 3`) become special added tokens, user-defined ones
    /// (`4`) plain added tokens; the pre-tokenizer follows `tokenizer.ggml.pre`.
    pub fn from_gguf_metadata(content: &Content) -> Result<Self> {
        let origin = "GGUF metadata";
        let meta = GgufMeta { content, origin };
        let model = meta.string("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(tok_err(
                origin,
                format!(
                    "tokenizer.ggml.model = `{model}` is not supported; supported: gpt2 (byte-level BPE)\n\
                     HINT: load the weights alone with GgufFile::open(..)?.weights(..) and the tokenizer from \
                     the original tokenizer.json"
                ),
            ));
        }
        let pre_name = meta.string("tokenizer.ggml.pre")?;
        let pre = GGUF_PRE_TOKENIZERS.iter().find(|(names, _)| names.contains(&pre_name)).map(|(_, p)| *p);
        let Some(pre) = pre else {
            let known: Vec<&str> = GGUF_PRE_TOKENIZERS.iter().flat_map(|(names, _)| names.iter().copied()).collect();
            return Err(tok_err(
                origin,
                format!("tokenizer.ggml.pre = `{pre_name}` is not supported; supported: {}", known.join(", ")),
            ));
        };

        let tokens = meta.strings("tokenizer.ggml.tokens")?;
        let merges = meta.strings("tokenizer.ggml.merges")?;
        let types = match content.metadata.get("tokenizer.ggml.token_type") {
            None => vec![1; tokens.len()],
            Some(_) => meta.ints("tokenizer.ggml.token_type")?,
        };
        if types.len() != tokens.len() {
            return Err(tok_err(
                origin,
                format!(
                    "tokenizer.ggml.token_type has {} entries, tokenizer.ggml.tokens {}",
                    types.len(),
                    tokens.len()
                ),
            ));
        }

        let mut vocab = Vocab::default();
        for (id, token) in tokens.iter().enumerate() {
            // A repeated token keeps its first id, as in llama.cpp's text → id map.
            vocab.entry(token.to_string()).or_insert(id as u32);
        }
        let mut pairs = Vec::with_capacity(merges.len());
        for (i, merge) in merges.iter().enumerate() {
            let Some((a, b)) = merge.split_once(' ') else {
                return Err(tok_err(origin, format!("tokenizer.ggml.merges[{i}] = `{merge}` is not two tokens")));
            };
            pairs.push((a.to_string(), b.to_string()));
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, pairs)
            .ignore_merges(pre.ignore_merges())
            .build()
            .map_err(|e| tok_err(origin, format!("cannot build BPE: {e}")))?;
        let mut inner = byte_level_tokenizer(bpe, pre)?;

        let added = |wanted: i64, special: bool| -> Vec<AddedToken> {
            tokens
                .iter()
                .zip(&types)
                .filter(|(_, &t)| t == wanted)
                .map(|(tok, _)| AddedToken::from(tok.to_string(), special).normalized(false))
                .collect()
        };
        inner.add_special_tokens(&added(3, true));
        inner.add_tokens(&added(4, false));

        let id = |key: &str| -> Result<Option<u32>> {
            let Some(value) = content.metadata.get(key) else { return Ok(None) };
            match value_as_usize(value) {
                Some(id) if id < tokens.len() => Ok(Some(id as u32)),
                _ => Err(tok_err(origin, format!("{key} is not a token id below {}", tokens.len()))),
            }
        };
        let bos = id("tokenizer.ggml.bos_token_id")?;
        let eos: Vec<u32> =
            id("tokenizer.ggml.eos_token_id")?.into_iter().chain(id("tokenizer.ggml.eot_token_id")?).collect();
        let flag = |key: &str, default: bool| match content.metadata.get(key) {
            Some(GgufValue::Bool(b)) => *b,
            _ => default,
        };
        let add_bos = flag("tokenizer.ggml.add_bos_token", pre.adds_bos());
        let add_eos = flag("tokenizer.ggml.add_eos_token", false);
        let boundary =
            |add: bool, id: Option<u32>| add.then_some(id).flatten().map(|id| (id, tokens[id as usize].to_string()));
        if let Some(template) = template_processor(boundary(add_bos, bos), boundary(add_eos, eos.first().copied())) {
            inner.with_post_processor(Some(template));
        }

        let chat_template = match content.metadata.get("tokenizer.chat_template") {
            Some(GgufValue::String(t)) => Some(t.clone()),
            _ => None,
        };
        let mut eos = eos;
        dedup_in_order(&mut eos);
        Ok(Self { inner, bos, eos, chat_template, origin: origin.to_string() })
    }

    /// Token ids of `text`; `add_special` adds what the tokenizer adds around a sequence (e.g. a
    /// BOS), never needed for text that came out of [`apply_chat_template`](Self::apply_chat_template).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, add_special).map_err(|e| self.err(format!("encode: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens included (so `decode(encode(prompt))` gives the prompt back).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.decode_with(ids, false)
    }

    /// Text of `ids`, optionally leaving out special tokens (for showing a reply).
    pub fn decode_with(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        // A lookup per id, not `vocab_size()`: tokenizers counts the vocabulary by building a
        // map of all of it (49k entries for SmolLM2), which per streamed token cost a decode
        // ~7 ms.
        if let Some(&bad) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            return Err(Error::Input(format!(
                "token id {bad} is out of range for the tokenizer ({}) with {} tokens",
                self.origin,
                self.vocab_size()
            )));
        }
        self.inner.decode(ids, skip_special).map_err(|e| self.err(format!("decode: {e}")))
    }

    /// Number of ids, added tokens included. Not cheap: tokenizers builds a map of the whole
    /// vocabulary to count it.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// Ids that end generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos.contains(&id)
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The wrapped `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// The prompt for a single user message: the model's chat template rendered with
    /// `messages = [{role: "user", content}]` and `add_generation_prompt = true`.
    pub fn apply_chat_template(&self, user_message: &str) -> Result<String> {
        let message = ChatMessage { role: "user".into(), content: user_message.into() };
        self.render_chat(&[message], true)
    }

    /// Render the chat template the way `transformers` does (Jinja with `trim_blocks` and
    /// `lstrip_blocks`, `bos_token`/`eos_token` variables, a `raise_exception` function).
    pub fn render_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let Some(template) = &self.chat_template else {
            return Err(self.err(
                "no chat template (GGUF `tokenizer.chat_template` or tokenizer_config.json `chat_template`)\n\
                 HINT: give the prompt as plain text instead",
            ));
        };
        let token = |id: Option<u32>| id.and_then(|id| self.inner.id_to_token(id));
        let ctx = minijinja::context! {
            messages => minijinja::Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => token(self.bos),
            eos_token => token(self.eos.first().copied()),
        };
        chat_environment().render_str(template, ctx).map_err(|e| self.err(format!("chat template: {e:#}")))
    }

    /// Write the tokenizer as a Hugging Face `tokenizer.json` at `path`, plus a
    /// `tokenizer_config.json` beside it with the chat template and BOS/EOS tokens, so that
    /// [`from_file`](Self::from_file) reads back the same tokenizer.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner.save(path, false).map_err(|e| tok_err(&path.display().to_string(), format!("cannot write: {e}")))?;
        let token = |id: Option<u32>| id.and_then(|id| self.inner.id_to_token(id));
        let mut config = serde_json::Map::new();
        if let Some(bos) = token(self.bos) {
            config.insert("bos_token".into(), bos.into());
        }
        if let Some(eos) = token(self.eos.first().copied()) {
            config.insert("eos_token".into(), eos.into());
        }
        if let Some(template) = &self.chat_template {
            config.insert("chat_template".into(), template.clone().into());
        }
        let config_path = path.parent().unwrap_or(Path::new(".")).join("tokenizer_config.json");
        let text = serde_json::to_string_pretty(&config).unwrap_or_default();
        std::fs::write(&config_path, text).map_err(|e| Error::io(&config_path, e))
    }

    /// A decoder for ids produced one at a time; special tokens are shown.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        self.stream_decoder_with(false)
    }

    /// A decoder for ids produced one at a time, optionally hiding special tokens.
    pub fn stream_decoder_with(&self, skip_special: bool) -> StreamDecoder<'_> {
        StreamDecoder { tokenizer: self, skip_special, ids: Vec::new(), prefix: String::new(), prefix_ids: 0 }
    }

    fn err(&self, reason: impl Into<String>) -> Error {
        tok_err(&self.origin, reason)
    }
}

/// Turns ids into text as they are generated.
///
/// Decoding one id at a time is wrong twice over: a byte-level token can hold part of a UTF-8
/// character (decoding it alone gives U+FFFD), and some decoders change a token's text depending
/// on what precedes it. So we decode a short window of recent ids, emit only what extends the
/// text already emitted, and hold output back while the window ends in an incomplete character.
pub struct StreamDecoder<'t> {
    tokenizer: &'t TextTokenizer,
    skip_special: bool,
    /// The window: `ids[..prefix_ids]` decode to `prefix` (already emitted), the rest is pending.
    ids: Vec<u32>,
    prefix: String,
    prefix_ids: usize,
}

impl StreamDecoder<'_> {
    /// Add one id; returns the newly completed text (empty while a character is incomplete).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.tokenizer.decode_with(&self.ids, self.skip_special)?;
        if text.len() <= self.prefix.len() || text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let Some(new) = text.strip_prefix(self.prefix.as_str()) else {
            return Err(self.tokenizer.err(format!(
                "stream decode: text of ids {:?} no longer starts with the text already emitted ({:?})",
                self.ids, self.prefix
            )));
        };
        let new = new.to_string();
        // Slide the window: keep only the ids just decoded as the new prefix.
        self.ids.drain(..self.prefix_ids);
        self.prefix_ids = self.ids.len();
        self.prefix = self.tokenizer.decode_with(&self.ids, self.skip_special)?;
        Ok(new)
    }

    /// Text still held back (an incomplete character at the end of generation), decoded lossily.
    pub fn finish(self) -> Result<String> {
        let text = self.tokenizer.decode_with(&self.ids, self.skip_special)?;
        Ok(text.strip_prefix(self.prefix.as_str()).unwrap_or("").to_string())
    }
}

// ---------------------------------------------------------------------------------------------
// Pre-tokenizers named by `tokenizer.ggml.pre`
// ---------------------------------------------------------------------------------------------

/// How a byte-level BPE vocabulary cuts text before merging, as llama.cpp defines them in
/// `llama-vocab.cpp` (`llm_tokenizer_bpe`), expressed with the same `tokenizers` pieces the
/// models' own `tokenizer.json` files use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreTokenizer {
    /// GPT-2's regex (`'s|'t|...| ?\p{L}+| ?\p{N}+|...`).
    Gpt2,
    /// Every digit alone (`\p{N}`), then GPT-2's regex: StarCoder and SmolLM vocabularies.
    DigitsThenGpt2,
    /// Llama 3's regex: digits in groups of up to three, case-insensitive contractions.
    Llama3,
    /// Qwen 2's regex: like Llama 3's but single digits.
    Qwen2,
}

/// `tokenizer.ggml.pre` values → the pre-tokenizer they stand for. A name missing here is
/// refused rather than guessed: the wrong split gives different ids without any error.
pub const GGUF_PRE_TOKENIZERS: &[(&[&str], PreTokenizer)] = &[
    (&["gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "trillion", "granite-docling"], PreTokenizer::Gpt2),
    (
        &["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"],
        PreTokenizer::DigitsThenGpt2,
    ),
    (&["llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"], PreTokenizer::Llama3),
    (&["qwen2", "deepseek-r1-qwen", "megrez"], PreTokenizer::Qwen2),
];

/// The `Split` regexes of the models' own `tokenizer.json` files (llama.cpp spells the same
/// patterns without `(?i:...)`, which its regex engine lacks).
const LLAMA3_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
const QWEN2_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

impl PreTokenizer {
    /// The rules as a `tokenizers` pre-tokenizer (the GGUF exporter also compares a tokenizer's
    /// own pre-tokenizer against these to name it).
    pub(crate) fn build(self) -> Result<PreTokenizerWrapper> {
        let gpt2 = || PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true));
        let split_then_bytes = |regex: &str| -> Result<PreTokenizerWrapper> {
            let split = Split::new(SplitPattern::Regex(regex.to_string()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| tok_err("pre-tokenizer", format!("regex {regex:?}: {e}")))?;
            Ok(PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Split(split),
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
            ])))
        };
        Ok(match self {
            PreTokenizer::Gpt2 => gpt2(),
            PreTokenizer::DigitsThenGpt2 => PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                gpt2(),
            ])),
            PreTokenizer::Llama3 => split_then_bytes(LLAMA3_SPLIT)?,
            PreTokenizer::Qwen2 => split_then_bytes(QWEN2_SPLIT)?,
        })
    }

    /// llama.cpp's default for `add_bos` when the file has no `tokenizer.ggml.add_bos_token`.
    fn adds_bos(self) -> bool {
        self == PreTokenizer::Llama3
    }

    /// Whether a whole pre-token found in the vocabulary skips the merges (Llama 3).
    fn ignore_merges(self) -> bool {
        self == PreTokenizer::Llama3
    }
}

/// A byte-level BPE tokenizer: pre-tokenizer `pre`, ByteLevel decoder and offsets trimming.
fn byte_level_tokenizer(bpe: BPE, pre: PreTokenizer) -> Result<Tokenizer> {
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre.build()?));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    tokenizer.with_post_processor(Some(PostProcessorWrapper::ByteLevel(ByteLevel::new(false, true, true))));
    Ok(tokenizer)
}

/// Adds BOS and/or EOS around every encoded sequence (when the file asks for it).
fn template_processor(bos: Option<(u32, String)>, eos: Option<(u32, String)>) -> Option<PostProcessorWrapper> {
    if bos.is_none() && eos.is_none() {
        return None;
    }
    let mut single = Vec::new();
    let mut specials = Vec::new();
    for (label, token) in [("bos", &bos), ("eos", &eos)] {
        if let Some((id, text)) = token {
            specials.push(SpecialToken::new(label.to_string(), vec![*id], vec![text.clone()]).ok()?);
        }
    }
    if bos.is_some() {
        single.push("bos");
    }
    single.push("$A");
    if eos.is_some() {
        single.push("eos");
    }
    let mut pair = single.clone();
    pair.push("$B:1");
    TemplateProcessing::builder()
        .try_single(single)
        .ok()?
        .try_pair(pair)
        .ok()?
        .special_tokens(specials)
        .build()
        .ok()
        .map(PostProcessorWrapper::Template)
}

// ---------------------------------------------------------------------------------------------
// Chat templates
// ---------------------------------------------------------------------------------------------

/// A Jinja environment configured like `transformers`' chat-template renderer.
fn chat_environment() -> minijinja::Environment<'static> {
    use minijinja::{Error as JinjaError, ErrorKind};
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.add_function("raise_exception", |message: String| -> std::result::Result<String, JinjaError> {
        Err(JinjaError::new(ErrorKind::InvalidOperation, format!("the template raised: {message}")))
    });
    env.add_filter("tojson", |value: minijinja::Value| -> std::result::Result<String, JinjaError> {
        serde_json::to_string(&value).map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e.to_string()))
    });
    env.set_unknown_method_callback(python_methods);
    env
}

/// The Python `str`/`dict` methods chat templates call (`.strip()`, `.items()`, ...), which
/// Jinja2 gets for free from Python and minijinja does not have.
fn python_methods(
    state: &minijinja::State,
    value: &minijinja::Value,
    method: &str,
    args: &[minijinja::Value],
) -> std::result::Result<minijinja::Value, minijinja::Error> {
    use minijinja::value::{from_args, ValueKind};
    use minijinja::{Error as JinjaError, ErrorKind, Value};
    if let Some(s) = value.as_str() {
        let chars_or_space = |chars: Option<&str>, c: char| chars.map_or(c.is_whitespace(), |set| set.contains(c));
        return match method {
            "strip" | "lstrip" | "rstrip" => {
                let (chars,): (Option<&str>,) = from_args(args)?;
                let out = match method {
                    "strip" => s.trim_matches(|c| chars_or_space(chars, c)),
                    "lstrip" => s.trim_start_matches(|c| chars_or_space(chars, c)),
                    _ => s.trim_end_matches(|c| chars_or_space(chars, c)),
                };
                Ok(Value::from(out))
            }
            "startswith" | "endswith" => {
                let (affix,): (&str,) = from_args(args)?;
                Ok(Value::from(if method == "startswith" { s.starts_with(affix) } else { s.ends_with(affix) }))
            }
            "upper" | "lower" | "title" | "capitalize" | "replace" | "split" => {
                let mut filter_args = vec![value.clone()];
                filter_args.extend_from_slice(args);
                state.apply_filter(method, &filter_args)
            }
            _ => Err(JinjaError::from(ErrorKind::UnknownMethod)),
        };
    }
    if value.kind() == ValueKind::Map {
        return match method {
            "items" => state.apply_filter("items", std::slice::from_ref(value)),
            "keys" | "values" => {
                let keys: Vec<Value> = value.try_iter()?.collect();
                if method == "keys" {
                    return Ok(Value::from(keys));
                }
                keys.iter().map(|k| value.get_item(k)).collect::<std::result::Result<Vec<_>, _>>().map(Value::from)
            }
            "get" => {
                let (key, default): (Value, Option<Value>) = from_args(args)?;
                let found = value.get_item(&key)?;
                Ok(if found.is_undefined() { default.unwrap_or(Value::from(())) } else { found })
            }
            _ => Err(JinjaError::from(ErrorKind::UnknownMethod)),
        };
    }
    Err(JinjaError::from(ErrorKind::UnknownMethod))
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

fn tok_err(origin: &str, reason: impl Into<String>) -> Error {
    Error::Tokenizer { origin: origin.to_string(), reason: reason.into() }
}

fn dedup_in_order(ids: &mut Vec<u32>) {
    let mut seen = std::collections::HashSet::new();
    ids.retain(|id| seen.insert(*id));
}

fn read_json_opt(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| tok_err(&path.display().to_string(), format!("invalid JSON: {e}")))
}

/// A special token in tokenizer_config.json: a string, or an AddedToken object with `content`.
fn token_content(value: &serde_json::Value) -> Option<&str> {
    match value {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Object(o) => o.get("content")?.as_str(),
        _ => None,
    }
}

/// `chat_template` is a string, or a list of `{name, template}` of which we take "default".
fn chat_template_field(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => {
            let named = |want: &str| {
                list.iter().find(|t| t.get("name").and_then(|n| n.as_str()) == Some(want))?.get("template")?.as_str()
            };
            named("default").or_else(|| list.first()?.get("template")?.as_str()).map(str::to_string)
        }
        _ => None,
    }
}

/// Typed reads of the `tokenizer.*` metadata, with errors naming the key.
struct GgufMeta<'a> {
    content: &'a Content,
    origin: &'a str,
}

impl<'a> GgufMeta<'a> {
    fn get(&self, key: &str) -> Result<&'a GgufValue> {
        self.content.metadata.get(key).ok_or_else(|| tok_err(self.origin, format!("missing metadata key `{key}`")))
    }

    fn string(&self, key: &str) -> Result<&'a str> {
        match self.get(key)? {
            GgufValue::String(s) => Ok(s),
            other => Err(tok_err(self.origin, format!("`{key}` is a {}, expected a string", value_kind(other)))),
        }
    }

    fn array(&self, key: &str) -> Result<&'a [GgufValue]> {
        match self.get(key)? {
            GgufValue::Array(items) => Ok(items),
            other => Err(tok_err(self.origin, format!("`{key}` is a {}, expected an array", value_kind(other)))),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<&'a str>> {
        self.array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                GgufValue::String(s) => Ok(s.as_str()),
                other => {
                    Err(tok_err(self.origin, format!("`{key}[{i}]` is a {}, expected a string", value_kind(other))))
                }
            })
            .collect()
    }

    fn ints(&self, key: &str) -> Result<Vec<i64>> {
        self.array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| match *v {
                GgufValue::I32(x) => Ok(x.into()),
                GgufValue::U32(x) => Ok(x.into()),
                GgufValue::I8(x) => Ok(x.into()),
                GgufValue::U8(x) => Ok(x.into()),
                ref other => {
                    Err(tok_err(self.origin, format!("`{key}[{i}]` is a {}, expected an integer", value_kind(other))))
                }
            })
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::VersionedMagic;
    use std::collections::HashMap;

    /// GPT-2's byte → printable-char table (`bytes_to_unicode`), which byte-level vocabularies
    /// are spelled in.
    pub(crate) fn byte_chars() -> Vec<char> {
        let mut bytes: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
        let mut chars = bytes.clone();
        let mut extra = 0;
        for b in 0..256 {
            if !bytes.contains(&b) {
                bytes.push(b);
                chars.push(256 + extra);
                extra += 1;
            }
        }
        let mut table = vec![' '; 256];
        for (b, c) in bytes.iter().zip(chars) {
            table[*b as usize] = char::from_u32(c).unwrap();
        }
        table
    }

    /// A toy byte-level vocabulary: 3 control tokens, the 256 bytes, and 5 merges.
    pub(crate) fn toy_vocab() -> (Vec<String>, Vec<i32>, Vec<String>) {
        let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(String::from).to_vec();
        let mut types = vec![3; 3];
        tokens.extend(byte_chars().iter().map(|c| c.to_string()));
        types.extend([1; 256]);
        let merges = ["Ġ w", "h e", "l l", "he ll", "hell o"];
        for m in merges {
            tokens.push(m.replace(' ', ""));
            types.push(1);
        }
        (tokens, types, merges.map(String::from).to_vec())
    }

    pub(crate) const TOY_TEMPLATE: &str = concat!(
        "{% for message in messages %}",
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'].strip() + '<|im_end|>' + '\n'}}",
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    );

    /// The `tokenizer.*` metadata a GGUF converter writes for the toy vocabulary.
    pub(crate) fn toy_gguf_metadata(pre: &str) -> Vec<(String, GgufValue)> {
        let (tokens, types, merges) = toy_vocab();
        let strings = |v: Vec<String>| GgufValue::Array(v.into_iter().map(GgufValue::String).collect());
        vec![
            ("tokenizer.ggml.model".into(), GgufValue::String("gpt2".into())),
            ("tokenizer.ggml.pre".into(), GgufValue::String(pre.into())),
            ("tokenizer.ggml.tokens".into(), strings(tokens)),
            ("tokenizer.ggml.token_type".into(), GgufValue::Array(types.into_iter().map(GgufValue::I32).collect())),
            ("tokenizer.ggml.merges".into(), strings(merges)),
            ("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(1)),
            ("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(2)),
            ("tokenizer.ggml.add_bos_token".into(), GgufValue::Bool(false)),
            ("tokenizer.chat_template".into(), GgufValue::String(TOY_TEMPLATE.into())),
        ]
    }

    fn content(metadata: Vec<(String, GgufValue)>) -> Content {
        Content {
            magic: VersionedMagic::GgufV3,
            metadata: metadata.into_iter().collect(),
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        }
    }

    fn toy(pre: &str) -> TextTokenizer {
        TextTokenizer::from_gguf_metadata(&content(toy_gguf_metadata(pre))).unwrap()
    }

    use crate::test_util::TempDir;

    const SAMPLES: &[&str] = &[
        "hello world",
        "  leading spaces and trailing  ",
        "héllo wörld — naïve café 😀 🇫🇷 日本語",
        "digits 1234567 and 3.14",
        "<|im_start|>user\nhi<|im_end|>\n",
        "tabs\tand\nnewlines\r\n",
        "",
    ];

    #[test]
    fn decoding_an_id_outside_the_vocabulary_names_it() {
        let tok = toy("smollm");
        assert_eq!(tok.decode(&[5, 263]).unwrap(), tok.decode(&[5]).unwrap() + &tok.decode(&[263]).unwrap());
        let err = tok.decode(&[5, 264]).unwrap_err().to_string();
        assert!(err.contains("token id 264 is out of range") && err.contains("with 264 tokens"), "{err}");
    }

    #[test]
    fn gguf_tokenizer_round_trips_text() {
        let tok = toy("smollm");
        assert_eq!(tok.vocab_size(), 264);
        for text in SAMPLES {
            let ids = tok.encode(text, true).unwrap();
            assert_eq!(&tok.decode(&ids).unwrap(), text, "ids {ids:?}");
        }
        // Merges apply, control tokens are single ids, and no BOS is added (add_bos_token=false).
        let (tokens, _, _) = toy_vocab();
        let id = |t: &str| tokens.iter().position(|x| x == t).unwrap() as u32;
        assert_eq!(tok.encode("hello world", true).unwrap()[..2], [id("hello"), id("Ġw")]);
        assert_eq!(tok.encode("<|im_start|>hello<|im_end|>", true).unwrap(), vec![1, id("hello"), 2]);
        assert_eq!(tok.bos(), Some(1));
        assert_eq!(tok.eos_ids(), &[2]);
        assert_eq!(tok.decode_with(&[1, id("hello"), 2], true).unwrap(), "hello");
    }

    #[test]
    fn pre_tokenizer_follows_tokenizer_ggml_pre() {
        // "smollm" (llama.cpp: `\p{N}` first, then GPT-2) cuts every digit alone; "gpt-2" keeps
        // " 123" together, so the byte pieces differ even with no digit merges in the vocabulary.
        let smollm = toy("smollm").encode(" 123", false).unwrap();
        let gpt2 = toy("gpt-2").encode(" 123", false).unwrap();
        assert_eq!(smollm.len(), 4);
        assert_eq!(gpt2.len(), 4);
        // With a merge "1 2" the difference shows: only the GPT-2 split can apply it.
        let mut meta = toy_gguf_metadata("gpt-2");
        add_merge(&mut meta, "1 2");
        assert_eq!(TextTokenizer::from_gguf_metadata(&content(meta)).unwrap().encode(" 123", false).unwrap().len(), 3);
        let mut meta = toy_gguf_metadata("smollm");
        add_merge(&mut meta, "1 2");
        assert_eq!(TextTokenizer::from_gguf_metadata(&content(meta)).unwrap().encode(" 123", false).unwrap().len(), 4);
        // Every supported name builds.
        for (names, _) in GGUF_PRE_TOKENIZERS {
            for name in *names {
                let tok = toy(name);
                assert_eq!(tok.decode(&tok.encode(SAMPLES[2], false).unwrap()).unwrap(), SAMPLES[2], "{name}");
            }
        }
    }

    fn add_merge(meta: &mut [(String, GgufValue)], merge: &str) {
        for (key, value) in meta.iter_mut() {
            if let GgufValue::Array(items) = value {
                match key.as_str() {
                    "tokenizer.ggml.tokens" => items.push(GgufValue::String(merge.replace(' ', ""))),
                    "tokenizer.ggml.token_type" => items.push(GgufValue::I32(1)),
                    "tokenizer.ggml.merges" => items.push(GgufValue::String(merge.into())),
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn add_bos_token_prepends_bos_only_when_asked() {
        let mut meta = toy_gguf_metadata("smollm");
        for (key, value) in meta.iter_mut() {
            if key == "tokenizer.ggml.add_bos_token" {
                *value = GgufValue::Bool(true);
            }
        }
        let tok = TextTokenizer::from_gguf_metadata(&content(meta)).unwrap();
        assert_eq!(tok.encode("he", true).unwrap()[0], 1);
        assert_ne!(tok.encode("he", false).unwrap()[0], 1);
    }

    #[test]
    fn unsupported_gguf_tokenizers_are_named() {
        let mut meta = toy_gguf_metadata("smollm");
        meta[0].1 = GgufValue::String("llama".into());
        let err = TextTokenizer::from_gguf_metadata(&content(meta)).err().unwrap().to_string();
        assert!(err.contains("`llama`") && err.contains("gpt2"), "{err}");

        let err =
            TextTokenizer::from_gguf_metadata(&content(toy_gguf_metadata("no-such-pre"))).err().unwrap().to_string();
        assert!(err.contains("`no-such-pre`") && err.contains("smollm"), "{err}");

        let mut meta = toy_gguf_metadata("smollm");
        meta.retain(|(k, _)| k != "tokenizer.ggml.merges");
        let err = TextTokenizer::from_gguf_metadata(&content(meta)).err().unwrap().to_string();
        assert!(err.contains("missing metadata key `tokenizer.ggml.merges`"), "{err}");
    }

    #[test]
    fn stream_decoder_holds_back_incomplete_characters() {
        let tok = toy("smollm");
        for text in SAMPLES {
            let ids = tok.encode(text, false).unwrap();
            let mut stream = tok.stream_decoder();
            let mut out = String::new();
            for &id in &ids {
                let piece = stream.push(id).unwrap();
                assert!(!piece.contains('\u{FFFD}'), "{text:?}: piece {piece:?}");
                out.push_str(&piece);
            }
            out.push_str(&stream.finish().unwrap());
            assert_eq!(&out, text);
        }
        // "😀" is four byte tokens: nothing comes out until the last one.
        let ids = tok.encode("😀", false).unwrap();
        assert_eq!(ids.len(), 4);
        let mut stream = tok.stream_decoder();
        let pieces: Vec<String> = ids.iter().map(|&id| stream.push(id).unwrap()).collect();
        assert_eq!(pieces, ["", "", "", "😀"]);
        // Cut off mid-character: finish() gives the lossy remainder instead of dropping it.
        let mut stream = tok.stream_decoder();
        stream.push(ids[0]).unwrap();
        assert_eq!(stream.finish().unwrap(), "\u{FFFD}");
        // Out-of-range ids are an input error, not a panic.
        assert!(matches!(tok.stream_decoder().push(99_999), Err(Error::Input(_))));
    }

    #[test]
    fn chat_template_renders_like_transformers() {
        let tok = toy("smollm");
        assert_eq!(
            tok.apply_chat_template("  What is 2+2?\n").unwrap(),
            "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        );
        // trim_blocks + lstrip_blocks, raise_exception, bos_token, Python string methods.
        let template = concat!(
            "{% if messages[0]['role'] != 'user' %}\n",
            "    {{ raise_exception('first message must be from the user') }}\n",
            "{% endif %}\n",
            "{{ bos_token }}{% for m in messages %}\n",
            "  {% if m.content.startswith('x') %}X{% endif %}{{ m['content'].upper() }}{{ {'a': 1}.get('b', '-') }}\n",
            "{% endfor %}"
        );
        let tok = TextTokenizer { chat_template: Some(template.into()), ..tok };
        // Expected output checked with Python jinja2 (trim_blocks, lstrip_blocks).
        assert_eq!(tok.apply_chat_template("xyz").unwrap(), "<|im_start|>XXYZ-\n");
        let err = tok
            .render_chat(&[ChatMessage { role: "system".into(), content: "hi".into() }], true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("first message must be from the user"), "{err}");
        let none = TextTokenizer { chat_template: None, ..tok };
        assert!(none.apply_chat_template("hi").unwrap_err().to_string().contains("no chat template"));
    }

    #[test]
    fn gpt2_files_and_save_round_trip() {
        let dir = TempDir::new("gpt2");
        let (tokens, _, merges) = toy_vocab();
        let vocab: serde_json::Map<String, serde_json::Value> =
            tokens.iter().enumerate().map(|(i, t)| (t.clone(), serde_json::Value::from(i))).collect();
        std::fs::write(dir.0.join("vocab.json"), serde_json::to_string(&vocab).unwrap()).unwrap();
        std::fs::write(dir.0.join("merges.txt"), format!("#version: 0.2\n{}\n", merges.join("\n"))).unwrap();
        let config = r#"{"eos_token": {"content": "<|im_end|>"},
            "chat_template": [{"name": "default", "template": "T:{{ messages[0].content }}"}]}"#;
        std::fs::write(dir.0.join("tokenizer_config.json"), config).unwrap();
        let gpt2 = TextTokenizer::from_dir(&dir.0).unwrap().expect("vocab.json + merges.txt");
        let reference = toy("gpt-2");
        for text in SAMPLES.iter().filter(|t| !t.contains("<|")) {
            assert_eq!(gpt2.encode(text, false).unwrap(), reference.encode(text, false).unwrap(), "{text:?}");
        }
        assert_eq!(gpt2.eos_ids(), &[2]);
        assert_eq!(gpt2.apply_chat_template("q").unwrap(), "T:q");

        let saved = TempDir::new("saved");
        let original = toy("smollm");
        original.save(&saved.0.join("tokenizer.json")).unwrap();
        let loaded = TextTokenizer::from_dir(&saved.0).unwrap().expect("tokenizer.json");
        for text in SAMPLES {
            assert_eq!(loaded.encode(text, true).unwrap(), original.encode(text, true).unwrap(), "{text:?}");
        }
        assert_eq!(
            (loaded.bos(), loaded.eos_ids(), loaded.chat_template()),
            (original.bos(), original.eos_ids(), original.chat_template())
        );
        assert!(TextTokenizer::from_dir(&std::env::temp_dir().join("lmforge-no-such-dir")).unwrap().is_none());
    }
}
