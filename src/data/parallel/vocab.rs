//! One vocabulary for both sides, and the special tokens an encoder–decoder needs.
//!
//! A shared vocabulary lets the model tie the encoder's embeddings, the decoder's and the output
//! projection to one matrix (Vaswani et al. §3.4; Marian does the same), and lets names and
//! numbers be copied through unchanged. It is a byte-level BPE trained on the training pairs,
//! both sides, so no validation or test text shapes it.
//!
//! Special tokens take the first ids:
//!
//! | id | token  | role |
//! |----|--------|------|
//! | 0  | `<pad>`| fills rows up to the batch's longest sequence; ignored by attention and loss |
//! | 1  | `<s>`  | the decoder's start token: decoder input = `<s>` + target |
//! | 2  | `</s>` | end of sequence: closes every source, and is the decoder's last target |
//!
//! There is no `<unk>`: a byte-level BPE encodes every string, in any script.

use serde::{Deserialize, Serialize};

use super::corpus::ParallelCorpus;
use super::split::{BookSplit, SplitRole};
use crate::data::bpe::train_bpe_on_texts;
use crate::error::{Error, Result};
use crate::io::TextTokenizer;

pub const PAD: &str = "<pad>";
pub const START: &str = "<s>";
pub const EOS: &str = "</s>";
/// In id order.
pub const SPECIAL_TOKENS: [&str; 3] = [PAD, START, EOS];

/// A pair is merged into a token only if it occurs at least this often in the training text.
const MIN_FREQUENCY: u64 = 2;

/// The ids of the special tokens in a tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecialIds {
    pub pad: u32,
    /// The decoder's first input (`decoder_start_token_id` in Hugging Face configs).
    pub start: u32,
    pub eos: u32,
}

impl SpecialIds {
    /// Look the special tokens up by name in `tokenizer`.
    pub fn of(tokenizer: &TextTokenizer) -> Result<Self> {
        let id = |token: &str| {
            tokenizer.token_to_id(token).ok_or_else(|| Error::Tokenizer {
                origin: "encoder–decoder vocabulary".into(),
                reason: format!(
                    "no `{token}` token; an encoder–decoder tokenizer needs {}\nHINT: let `lmforge train` train one on the parallel data (leave out --tokenizer)",
                    SPECIAL_TOKENS.join(" ")
                ),
            })
        };
        Ok(SpecialIds { pad: id(PAD)?, start: id(START)?, eos: id(EOS)? })
    }
}

/// A byte-level BPE of `vocab_size` tokens (specials and bytes included) trained on both sides
/// of the training pairs of `split`, with `<s>` as BOS and `</s>` as EOS (what generation
/// starts from and stops at).
pub fn train_shared_bpe(corpus: &ParallelCorpus, split: &BookSplit, vocab_size: usize) -> Result<TextTokenizer> {
    let texts = split.pairs(corpus, SplitRole::Train).flat_map(|pair| [pair.source.clone(), pair.target.clone()]);
    let specials: Vec<String> = SPECIAL_TOKENS.map(String::from).to_vec();
    let inner = train_bpe_on_texts(texts, vocab_size, &specials, MIN_FREQUENCY)?;
    let origin = format!("shared BPE of {}", corpus.path.display());
    let ids = [START, EOS].map(|t| inner.token_to_id(t));
    let (Some(start), Some(eos)) = (ids[0], ids[1]) else {
        return Err(Error::Tokenizer { origin, reason: "trained without its special tokens".into() });
    };
    Ok(TextTokenizer::new(inner, Some(start), vec![eos], None, &origin))
}
