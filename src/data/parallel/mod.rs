//! Parallel text for encoder–decoder training: from a TSV of aligned texts to padded batches of
//! token pairs.
//!
//! ```text
//! bible.tsv(.gz) ──ParallelCorpus::read(source, target)──▶ text pairs, each with its book and line
//!   ──BookSplit::new──▶ train / validation / test, by whole books
//!   ──add_copied_targets (optional)──▶ + target → target copies of training pairs
//!   ──train_shared_bpe (training pairs, both sides)──▶ one tokenizer: <pad> <s> </s> + bytes + merges
//!   ──encode_pairs──▶ TokenPairs: source + </s>, target (lengths checked against the model)
//!   ──PairSampler (length-sorted, token budget, seeded, resumable)──▶ PairBatch (B, S) / (B, T)
//! ```
//!
//! Test and validation hold out whole books, never verses of books the model trained on: a
//! verse's neighbours share names, phrases and often whole clauses with it, so a random verse
//! split measures recall of the training text rather than translation.
//!
//! ```no_run
//! use std::sync::Arc;
//! use lmforge::data::parallel::*;
//! # fn main() -> lmforge::Result<()> {
//! let corpus = ParallelCorpus::read("data/parallel/bible.tsv.gz".as_ref(), "kjv", "rv1909")?;
//! let split = BookSplit::new(&corpus, &default_test_books(), &[], 0.02)?;
//! let tokenizer = train_shared_bpe(&corpus, &split, 8000)?;
//! let specials = SpecialIds::of(&tokenizer)?;
//! let train = encode_pairs(&corpus, split.pairs(&corpus, SplitRole::Train), &tokenizer, specials, 256)?;
//! let mut sampler = PairSampler::new(Arc::new(train), 4096, PairSamplerState::start(1337))?;
//! let batch = sampler.next_batch(); // source (B, S), decoder input / target (B, T), lengths
//! let saved = sampler.state(); // goes into the checkpoint
//! # let _ = (batch, saved);
//! # Ok(())
//! # }
//! ```

mod batches;
mod copies;
mod corpus;
mod pairs;
mod split;
mod vocab;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use batches::{padding_mask, PairBatch, PairSampler, PairSamplerState, PairTensors, SequentialPairBatches};
pub use copies::add_copied_targets;
pub use corpus::{ParallelCorpus, TextPair, BOOK_COLUMN};
pub use pairs::{encode_pairs, TokenPair, TokenPairs};
pub use split::{BookSplit, SplitRole};
pub use vocab::{train_shared_bpe, SpecialIds, EOS, PAD, SPECIAL_TOKENS, START};

/// The parallel-data section of a run config (`[data.parallel]`, or `--parallel-file FILE
/// --source COL --target COL` and friends).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ParallelData {
    /// A TSV with a header line naming its columns, plain or gzip-compressed (detected from the
    /// content, not the name), with a `book` column to split on.
    pub file: PathBuf,
    /// Column of the texts to translate from.
    pub source: String,
    /// Column of the texts to translate into.
    pub target: String,
    /// Books held out for testing (`--books`): never seen in training or validation. The
    /// default is the bundled corpus's (see `data/parallel/README.md`); name a TSV's own books
    /// for any other file.
    #[serde(default = "default_test_books")]
    pub test_books: Vec<String>,
    /// Books held out for validation; empty = chosen by [`BookSplit::new`] from the rest.
    #[serde(default)]
    pub val_books: Vec<String>,
    /// Most pairs the automatically chosen validation books may hold, as a share of all pairs.
    #[serde(default = "default_val_fraction")]
    pub val_fraction: f64,
    /// Most tokens of either side in a training batch, padding included: rows × the longest
    /// source and rows × the longest target both stay within it. Vaswani et al. used ~25,000.
    #[serde(default = "default_batch_tokens")]
    pub batch_tokens: usize,
    /// Share (0 to 1) of the training pairs also trained as `target → target` copies
    /// (`--copied-targets`), which teaches the cross-attention to align: see
    /// [`add_copied_targets`]. 0, the default, trains on the pairs as they are.
    #[serde(default)]
    pub copied_targets: f64,
}

/// Ruth, Jonah, Philemon and Jude: four short books (182 verses) from different parts of the
/// Bible (narrative, prophecy, two letters), held out of every run on the bundled corpus.
pub fn default_test_books() -> Vec<String> {
    ["Ruth", "Jonah", "Philemon", "Jude"].map(String::from).to_vec()
}

fn default_val_fraction() -> f64 {
    0.02
}

fn default_batch_tokens() -> usize {
    4096
}

impl ParallelData {
    /// The section with defaults for everything but the file and the two columns.
    pub fn new(file: impl Into<PathBuf>, source: &str, target: &str) -> Self {
        ParallelData {
            file: file.into(),
            source: source.into(),
            target: target.into(),
            test_books: default_test_books(),
            val_books: vec![],
            val_fraction: default_val_fraction(),
            batch_tokens: default_batch_tokens(),
            copied_targets: 0.0,
        }
    }

    /// Every problem with the settings, each naming its field (the file itself is checked when
    /// it is read).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (field, column) in [("source", &self.source), ("target", &self.target)] {
            if column.trim().is_empty() {
                problems
                    .push(format!("data.parallel.{field} is empty, expected a column name of {}", self.file.display()));
            }
        }
        if self.source == self.target && !self.source.is_empty() {
            problems.push(format!(
                "data.parallel.source and .target are both `{}`; a model learns nothing translating a column into itself",
                self.source
            ));
        }
        for (field, books) in [("test_books", &self.test_books), ("val_books", &self.val_books)] {
            if books.iter().any(|b| b.trim().is_empty()) {
                problems.push(format!("data.parallel.{field} has an empty book name"));
            }
        }
        if let Some(both) = self.val_books.iter().find(|b| self.test_books.contains(b)) {
            problems.push(format!("book `{both}` is in both data.parallel.test_books and val_books"));
        }
        if !(self.val_fraction > 0.0 && self.val_fraction < 1.0) {
            problems.push(format!("data.parallel.val_fraction = {}, expected 0 < fraction < 1", self.val_fraction));
        }
        if self.batch_tokens == 0 {
            problems.push("data.parallel.batch_tokens = 0, expected a positive number".into());
        }
        if !(0.0..=1.0).contains(&self.copied_targets) {
            problems.push(format!(
                "data.parallel.copied_targets = {}, expected a share of the training pairs, 0 <= share <= 1",
                self.copied_targets
            ));
        }
        problems
    }
}

#[cfg(test)]
mod tests;
