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

use std::io::IsTerminal;

use crate::data::parallel::{BookSplit, ParallelCorpus, ParallelData, SplitRole};
use crate::error::{Error, Result};
use crate::eval::{Bleu, Chrf};
use crate::generate::{generate_seq2seq_batch, Search, Seq2SeqOptions};
use crate::io::LoadedModel;

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

/// Sources decoded together: enough to keep the matrix products busy, few enough that a batch
/// of similar lengths wastes little on padding.
const SOURCES_PER_BATCH: usize = 16;

/// Translate `sources` with `loaded` (a run, one of its checkpoints, or a model directory with a
/// tokenizer; its weights held as it was loaded, `f32` or bf16), one hypothesis per source, in
/// order.
///
/// Each source is encoded as training encodes it (its tokens + `</s>`, see
/// `data::parallel::encode_pairs`), and decoded from the model's start token with `options`
/// until its end token. Sources are decoded in batches of similar length (sorted, so padding
/// stays small), and put back in their own order.
pub fn translate(loaded: &LoadedModel, sources: &[String], options: &DecodeOptions) -> Result<Vec<String>> {
    let model = &loaded.source;
    let tokenizer = loaded.tokenizer.as_ref().ok_or_else(|| {
        Error::Input(format!(
            "{} has no tokenizer.json, so its translations cannot be read\nHINT: evaluate a training run or a model directory with its tokenizer",
            model.display()
        ))
    })?;
    let model_built = loaded.build()?;
    let (Some(_), Some(eos)) = (model_built.decoder_start_token_id(), model_built.eos_token_id()) else {
        return Err(Error::Input(format!(
            "{} is not an encoder–decoder model with an end token (layout.eos_token_id); it cannot translate\nHINT: evaluate a run trained with --parallel-file",
            model.display()
        )));
    };
    let encoded: Vec<Vec<u32>> = sources
        .iter()
        .map(|text| Ok(tokenizer.encode(text, false)?.into_iter().chain(std::iter::once(eos)).collect()))
        .collect::<Result<_>>()?;
    let mut order: Vec<usize> = (0..sources.len()).collect();
    order.sort_by_key(|&i| (encoded[i].len(), i));
    let decode = Seq2SeqOptions {
        max_new_tokens: options.max_new_tokens.unwrap_or(model_built.config().context_length),
        stop: tokenizer.eos_ids().to_vec(),
    };
    let mut stop = decode.stop.clone();
    stop.push(eos);
    let mut hypotheses = vec![String::new(); sources.len()];
    let mut progress = Progress::new(sources.len());
    for (done, batch) in order.chunks(SOURCES_PER_BATCH).enumerate() {
        let batch_sources: Vec<Vec<u32>> = batch.iter().map(|&i| encoded[i].clone()).collect();
        let search = match options.beams {
            1 => Search::Greedy,
            beams => Search::Beam { beams, length_penalty: options.length_penalty },
        };
        let out = generate_seq2seq_batch(&model_built, &batch_sources, &decode, search, |_| Ok(()))?;
        for (&i, hypothesis) in batch.iter().zip(out) {
            let ids: Vec<u32> = hypothesis.ids.into_iter().filter(|id| !stop.contains(id)).collect();
            hypotheses[i] = tokenizer.decode(&ids)?.trim().to_string();
        }
        progress.report(done * SOURCES_PER_BATCH + batch.len());
    }
    progress.finish();
    Ok(hypotheses)
}

/// "translated N/M" on stderr: rewritten in place on a terminal, and in a log file (where `\r`
/// would pile every update onto one line) one line per tenth of the work.
struct Progress {
    total: usize,
    terminal: bool,
    /// Tenths of `total` already logged (non-terminal only).
    logged: usize,
}

impl Progress {
    fn new(total: usize) -> Self {
        Progress { total, terminal: std::io::stderr().is_terminal(), logged: 0 }
    }

    fn report(&mut self, done: usize) {
        if self.terminal {
            eprint!("\rtranslated {done}/{}", self.total);
        } else if done * 10 >= (self.logged + 1) * self.total {
            self.logged = done * 10 / self.total.max(1);
            eprintln!("translated {done}/{}", self.total);
        }
    }

    fn finish(&self) {
        if self.terminal && self.total > 0 {
            eprintln!();
        }
    }
}
