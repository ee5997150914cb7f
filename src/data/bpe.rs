//! Training a GPT-2 style byte-level BPE tokenizer on text files.
//!
//! Byte-level means the base alphabet is the 256 byte values (each mapped to a printable
//! character, GPT-2's trick), so any input, in any script, encodes without an unknown token,
//! and decoding gives back the exact bytes. `add_prefix_space` is off: the first word of a text
//! is encoded as written, which keeps `decode(encode(x)) == x` byte for byte.
//!
//! Training streams the files one line at a time through the `tokenizers` crate's
//! [`BpeTrainer`], so only the word counts (not the corpus) are held in memory. It needs no
//! optional crate feature: the trainer is always compiled in, and `progressbar` (off here) only
//! draws a progress bar.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder, TokenizerImpl};

use super::text::{check_text_file, TextChunks};
use crate::error::{Error, Result};

/// The end-of-text token GPT-2 uses between documents; the default (and only) special token.
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// Number of byte tokens every byte-level vocabulary starts with.
pub const BYTE_ALPHABET: usize = 256;

/// Train a byte-level BPE tokenizer with `vocab_size` tokens (special tokens and the 256 byte
/// tokens included) on `inputs`, streamed line by line.
///
/// `special_tokens` get the first ids, in order (so `<|endoftext|>` first means id 0, as in the
/// tokenizers lmforge imports). A pair is merged only if it occurs at least `min_frequency`
/// times; on a small corpus training may stop below `vocab_size` once no pair qualifies, so
/// read the real size from `tokenizer.get_vocab_size(true)`.
///
/// Training is deterministic: the same files and settings give the same `tokenizer.json`.
pub fn train_bpe(
    inputs: &[PathBuf],
    vocab_size: usize,
    special_tokens: &[String],
    min_frequency: u64,
) -> Result<Tokenizer> {
    if inputs.is_empty() {
        return Err(Error::Input("tokenizer training needs at least one input text file".into()));
    }
    check_settings(vocab_size, special_tokens)?;
    for path in inputs {
        check_text_file(path)?;
    }
    // The trainer takes an infallible iterator of lines; a read error (bad UTF-8 deep in a
    // file) stops the stream and is reported after training returns.
    let mut failure: Option<Error> = None;
    let lines = FileLines { files: inputs, next_file: 0, current: None, failure: &mut failure };
    let trained = train_bpe_on_texts(lines, vocab_size, special_tokens, min_frequency);
    if let Some(e) = failure {
        return Err(e);
    }
    trained
}

/// [`train_bpe`] on texts in memory (e.g. both sides of a parallel corpus), one piece of text
/// (a line, a sentence) per item.
pub fn train_bpe_on_texts<I>(
    texts: I,
    vocab_size: usize,
    special_tokens: &[String],
    min_frequency: u64,
) -> Result<Tokenizer>
where
    I: Iterator<Item = String> + Send,
{
    check_settings(vocab_size, special_tokens)?;
    let byte_level = ByteLevel::new(false, true, true);
    let mut tokenizer: TokenizerImpl<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel> = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(byte_level))
        .with_post_processor(Some(byte_level))
        .with_decoder(Some(byte_level))
        .build()
        .map_err(|e| tokenizer_error(format!("cannot build an empty BPE tokenizer: {e}")))?;

    let mut trainer = BpeTrainer::builder()
        .vocab_size(vocab_size)
        .min_frequency(min_frequency)
        .show_progress(false)
        .special_tokens(special_tokens.iter().map(|t| AddedToken::from(t.clone(), true)).collect())
        // All 256 bytes, seen in the corpus or not, so nothing is ever out of vocabulary.
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let pieces = WithoutSpecials { texts, specials: special_tokens, queue: VecDeque::new() };
    tokenizer.train(&mut trainer, pieces).map_err(|e| tokenizer_error(format!("BPE training failed: {e}")))?;
    Ok(Tokenizer::from(tokenizer))
}

/// Write `tokenizer` as a Hugging Face `tokenizer.json` (pretty-printed, so diffs are readable).
pub fn save_tokenizer(tokenizer: &Tokenizer, path: &Path) -> Result<()> {
    tokenizer.save(path, true).map_err(|e| Error::Tokenizer {
        origin: path.display().to_string(),
        reason: format!("cannot write tokenizer.json: {e}"),
    })
}

fn check_settings(vocab_size: usize, special_tokens: &[String]) -> Result<()> {
    for (i, t) in special_tokens.iter().enumerate() {
        if t.is_empty() {
            return Err(Error::Input(format!("special token #{i} is empty")));
        }
        if special_tokens[..i].contains(t) {
            return Err(Error::Input(format!("special token `{t}` is listed twice")));
        }
    }
    let minimum = BYTE_ALPHABET + special_tokens.len();
    if vocab_size < minimum {
        return Err(Error::Input(format!(
            "vocab size {vocab_size} is too small: a byte-level BPE needs {BYTE_ALPHABET} byte tokens + {} special token(s) = {minimum} before any merge\nHINT: use a vocab size of at least {minimum} (a few thousand for real use)",
            special_tokens.len()
        )));
    }
    Ok(())
}

fn tokenizer_error(reason: String) -> Error {
    Error::Tokenizer { origin: "BPE training".into(), reason }
}

/// Every line of every file, in order; stops at the first read error and parks it in `failure`.
struct FileLines<'a> {
    files: &'a [PathBuf],
    next_file: usize,
    current: Option<TextChunks>,
    failure: &'a mut Option<Error>,
}

impl Iterator for FileLines<'_> {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        if self.failure.is_some() {
            return None;
        }
        loop {
            if self.current.is_none() {
                let path = self.files.get(self.next_file)?;
                self.next_file += 1;
                match TextChunks::open(path) {
                    Ok(c) => self.current = Some(c),
                    Err(e) => {
                        *self.failure = Some(e);
                        return None;
                    }
                }
            }
            match self.current.as_mut().map(TextChunks::next_piece) {
                Some(Ok(Some(line))) => return Some(line),
                Some(Ok(None)) | None => self.current = None,
                Some(Err(e)) => {
                    *self.failure = Some(e);
                    return None;
                }
            }
        }
    }
}

/// The texts with special tokens cut out.
///
/// Why: the trainer sees special tokens in the text (documents joined by `<|endoftext|>` lines)
/// as ordinary words, even when registered, and would spend merges on pieces like `ext|>`. A
/// line `a<|endoftext|>b` is fed as `a` and `b`.
struct WithoutSpecials<'a, I> {
    texts: I,
    specials: &'a [String],
    /// Pieces of a text that held special tokens, not yet handed out.
    queue: VecDeque<String>,
}

impl<I: Iterator<Item = String>> Iterator for WithoutSpecials<'_, I> {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        loop {
            if let Some(piece) = self.queue.pop_front() {
                return Some(piece);
            }
            let line = self.texts.next()?;
            if !self.specials.iter().any(|s| line.contains(s.as_str())) {
                return Some(line);
            }
            let mut rest = line.as_str();
            // Earliest occurrence of any special token, repeatedly.
            while let Some((at, len)) =
                self.specials.iter().filter_map(|s| rest.find(s.as_str()).map(|at| (at, s.len()))).min()
            {
                if at > 0 {
                    self.queue.push_back(rest[..at].to_string());
                }
                rest = &rest[at + len..];
            }
            if !rest.is_empty() {
                self.queue.push_back(rest.to_string());
            }
        }
    }
}
