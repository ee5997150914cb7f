//! Text pairs as token ids, checked against the model's positions.
//!
//! A source is encoded as its tokens + `</s>`; a target is kept bare, and each batch adds the
//! decoder's `<s>` in front (decoder input) and `</s>` behind (decoder target), so both are
//! `target + 1` long.
//!
//! A sequence longer than the model's positions is an error naming its line, not a silent cut.
//! Cutting a target teaches the model to stop mid-sentence and cutting a source teaches it to
//! invent the missing part; both damage a translator without a trace in the loss. Tools that do
//! cut (Hugging Face `truncation=True`) leave users to find out from bad output; fairseq, like
//! this, refuses unless told to skip. The error says how long the longest sequence is, so
//! raising `context_length` is a one-line fix.

use std::path::PathBuf;

use super::corpus::{ParallelCorpus, TextPair};
use super::vocab::SpecialIds;
use crate::error::{Error, Result};
use crate::io::TextTokenizer;

/// One pair in token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenPair {
    /// Line of the corpus file, for messages and for putting translations back in order.
    pub line: usize,
    /// Source tokens followed by `</s>`.
    pub source: Vec<u32>,
    /// Target tokens, without `<s>` or `</s>`.
    pub target: Vec<u32>,
}

impl TokenPair {
    /// Encoder positions this pair takes (`</s>` included).
    pub fn source_len(&self) -> usize {
        self.source.len()
    }

    /// Decoder positions this pair takes: `<s>` + target as input, target + `</s>` as labels.
    pub fn target_len(&self) -> usize {
        self.target.len() + 1
    }

    /// Positions on the longer side: what a batch's token budget counts.
    pub fn len(&self) -> usize {
        self.source_len().max(self.target_len())
    }

    /// Never true (a source holds at least `</s>`); for clippy's `len` convention.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// The token pairs of one split, with the ids that batches pad and frame them with.
#[derive(Debug, Clone)]
pub struct TokenPairs {
    pub pairs: Vec<TokenPair>,
    pub specials: SpecialIds,
    /// The corpus file, for messages.
    pub path: PathBuf,
}

impl TokenPairs {
    /// Source plus target tokens over all pairs (`</s>` of sources included, decoder frames
    /// not): a fingerprint of the data that resumed runs are checked against.
    pub fn tokens(&self) -> u64 {
        self.pairs.iter().map(|p| (p.source.len() + p.target.len()) as u64).sum()
    }
}

/// Encode `pairs` of `corpus` with `tokenizer`, and check that every source and target fits in
/// `max_positions` (the model's `context_length`).
pub fn encode_pairs<'a>(
    corpus: &ParallelCorpus,
    pairs: impl Iterator<Item = &'a TextPair>,
    tokenizer: &TextTokenizer,
    specials: SpecialIds,
    max_positions: usize,
) -> Result<TokenPairs> {
    let mut encoded = Vec::new();
    let mut too_long: Vec<(usize, &str, usize)> = Vec::new(); // (line, column, positions)
    for pair in pairs {
        let mut source = tokenizer.encode(&pair.source, false)?;
        source.push(specials.eos);
        let target = tokenizer.encode(&pair.target, false)?;
        let token_pair = TokenPair { line: pair.line, source, target };
        for (column, positions) in [
            (corpus.source_column.as_str(), token_pair.source_len()),
            (corpus.target_column.as_str(), token_pair.target_len()),
        ] {
            if positions > max_positions {
                too_long.push((pair.line, column, positions));
            }
        }
        encoded.push(token_pair);
    }
    if let Some(&(line, column, positions)) = too_long.first() {
        let longest = too_long.iter().map(|t| t.2).max().unwrap_or(positions);
        let others = match too_long.len() - 1 {
            0 => String::new(),
            n => format!(" (and {n} more sequence(s), the longest {longest} positions)"),
        };
        return Err(Error::data(
            &corpus.path,
            format!(
                "line {line}: the `{column}` text takes {positions} positions with its start/end token, more than the model's {max_positions} (context_length){others}\nHINT: give the model more positions, e.g. --set context_length={}, or remove the line",
                longest.next_power_of_two()
            ),
        ));
    }
    Ok(TokenPairs { pairs: encoded, specials, path: corpus.path.clone() })
}
