//! `lmforge eval translate`: translate whole held-out books of a parallel corpus and score the
//! translations against the corpus's own target texts with corpus BLEU and chrF.
//!
//! ```text
//! corpus + --books ──TranslationSet::from_books──▶ sources, references (file order)
//! sources ──translate (the model) or the sources themselves (--copy-source)──▶ hypotheses
//! hypotheses, references ──score_translations──▶ BLEU, chrF
//! ```
//!
//! The copy-the-source baseline (`--copy-source`) scores the untranslated source as the
//! hypothesis. For KJV → WEB (archaic → modern English) it is high, since most words are shared:
//! a modernizer that does not beat it has not learned anything useful.

use std::path::Path;

use crate::data::parallel::{BookSplit, ParallelCorpus, ParallelData, SplitRole};
use crate::error::{Error, Result};
use crate::eval::{Bleu, Chrf};

/// The pairs of some books of a corpus, in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct TranslationSet {
    pub books: Vec<String>,
    /// File line of each pair.
    pub lines: Vec<usize>,
    pub sources: Vec<String>,
    pub references: Vec<String>,
}

impl TranslationSet {
    /// The pairs of `books` (each must be in `corpus`), in file order.
    pub fn from_books(corpus: &ParallelCorpus, books: &[String]) -> Result<Self> {
        if books.is_empty() {
            return Err(Error::Input("no books to evaluate on\nHINT: name held-out books with --books".into()));
        }
        let wanted: Vec<usize> = books.iter().map(|b| corpus.find_book(b, "--books")).collect::<Result<_>>()?;
        let pairs: Vec<_> = corpus.pairs.iter().filter(|p| wanted.contains(&p.book)).collect();
        Ok(TranslationSet {
            books: books.to_vec(),
            lines: pairs.iter().map(|p| p.line).collect(),
            sources: pairs.iter().map(|p| p.source.clone()).collect(),
            references: pairs.iter().map(|p| p.target.clone()).collect(),
        })
    }

    pub fn len(&self) -> usize {
        self.sources.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }
}

/// Refuse to evaluate a run on books it trained on: `books` must all be held out (test or
/// validation) by the run's `spec`, split the way the run split `corpus`.
pub fn check_held_out(corpus: &ParallelCorpus, spec: &ParallelData, books: &[String]) -> Result<()> {
    let split = BookSplit::new(corpus, &spec.test_books, &spec.val_books, spec.val_fraction)?;
    let trained: Vec<&str> =
        books.iter().map(String::as_str).filter(|b| split.role(b) == Some(SplitRole::Train)).collect();
    if trained.is_empty() {
        return Ok(());
    }
    Err(Error::Input(format!(
        "the run trained on {}; scores on training text say nothing about translation\nHINT: evaluate on its held-out books: {}",
        trained.join(", "),
        split.books(SplitRole::Test).join(",")
    )))
}

/// Corpus BLEU and chrF of a set of translations.
#[derive(Debug, Clone, PartialEq)]
pub struct TranslationScores {
    pub bleu: Bleu,
    pub chrf: Chrf,
    /// Hypothesis–reference pairs scored.
    pub segments: usize,
}

/// Score `hypotheses` against `references`, line by line.
pub fn score_translations<H: AsRef<str>, R: AsRef<str>>(
    hypotheses: &[H],
    references: &[R],
) -> Result<TranslationScores> {
    Ok(TranslationScores {
        bleu: Bleu::corpus(hypotheses, references)?,
        chrf: Chrf::corpus(hypotheses, references)?,
        segments: hypotheses.len(),
    })
}

/// How to decode translations.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeOptions {
    /// Beam width; 1 is greedy decoding.
    pub beams: usize,
    /// Length penalty α as in Hugging Face's `generate`: a finished beam scores
    /// `log p / length^α` (0 = raw log-probability, which favours short output).
    pub length_penalty: f64,
    /// Longest translation in tokens; `None` = the model's positions.
    pub max_new_tokens: Option<usize>,
}

/// THE WIRING POINT for encoder–decoder generation (issue 13, items 1–4): translate `sources`
/// with the model at `model` (a run or checkpoint directory), one hypothesis per source, in
/// order.
///
/// When the encoder–decoder model lands, this loads the model and its tokenizer, encodes each
/// source as tokens + `</s>` (see `data::parallel::encode_pairs`), decodes from `<s>` with
/// `options` (beam search, stopping at `</s>`), and detokenizes with special tokens skipped.
/// Until then it is an error, never a made-up result.
pub fn translate(model: &Path, sources: &[String], options: &DecodeOptions) -> Result<Vec<String>> {
    let _ = (sources, options);
    Err(Error::Unsupported(format!(
        "translating with {}: encoder–decoder generation is not wired into `eval translate` yet (issue 13)\nHINT: --copy-source scores the copy-the-source baseline, which needs no model",
        model.display()
    )))
}
