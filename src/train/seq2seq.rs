//! Getting an encoder–decoder run ready on parallel text: its directory, the corpus split by
//! books, the shared tokenizer, the token pairs of every split, and the model config they must
//! fit.
//!
//! The training loop itself is the decoder-only one (`trainer.rs`) once the encoder–decoder
//! model exists: the same checkpoints, resume, supervisor and rollback, with a
//! [`PairSampler`](crate::data::parallel::PairSampler) in place of the window sampler and the
//! model's sequence-to-sequence loss in place of the language-model loss. Until then
//! [`train`] prepares everything and stops with an error saying so.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::json;

use super::run_config::RunConfig;
use super::setup::open_run_dir;
use super::trainer::TrainSummary;
use crate::config::{Layout, ModelConfig};
use crate::data::parallel::{
    encode_pairs, train_shared_bpe, BookSplit, ParallelCorpus, ParallelData, SpecialIds, SplitRole, TokenPairs,
};
use crate::error::{Error, Result};
use crate::io::{self, TextTokenizer};

const TOKENIZER_FILE: &str = "tokenizer.json";
/// Which books went where, and how many pairs each split has: written for people and tools
/// (`eval translate`) to read; the run config stays the source of truth.
pub const SPLIT_FILE: &str = "split.json";

/// An encoder–decoder run ready to train.
pub struct Seq2SeqPrepared {
    pub model_config: ModelConfig,
    pub tokenizer: TextTokenizer,
    pub tokenizer_file: PathBuf,
    pub specials: SpecialIds,
    pub split: BookSplit,
    pub train: Arc<TokenPairs>,
    pub val: Arc<TokenPairs>,
    /// Held-out pairs, encoded so that a source too long for the model fails now, not at
    /// evaluation; scored by `eval translate`, never trained or validated on.
    pub test: Arc<TokenPairs>,
}

/// `--source` with a decoder-only model, or an encoder–decoder model without it, is an error
/// naming the fix.
pub fn check_data_fits_layout(model: &ModelConfig, parallel: Option<&ParallelData>) -> Result<()> {
    let name = if model.name.is_empty() { "the model" } else { model.name.as_str() };
    match (&model.layout, parallel) {
        (Layout::DecoderOnly, Some(p)) => Err(Error::Input(format!(
            "--source/--target (data.parallel: {} → {}) need an encoder–decoder model, but {name} is decoder-only\nHINT: use an encoder–decoder architecture (e.g. --arch transformer-base), or train this one on text with --train-file",
            p.source, p.target
        ))),
        (Layout::EncoderDecoder { .. }, None) => Err(Error::Input(format!(
            "{name} is an encoder–decoder model: it trains on aligned pairs, not on text\nHINT: pass --parallel-file FILE.tsv --source COLUMN --target COLUMN (e.g. data/parallel/bible.tsv.gz, kjv, rv1909)"
        ))),
        _ => Ok(()),
    }
}

/// Create or reopen the run directory and prepare everything encoder–decoder training needs.
pub fn prepare_seq2seq_run(config: &RunConfig, parallel: &ParallelData, resume: bool) -> Result<Seq2SeqPrepared> {
    if let Some(init) = &config.model.init_from {
        return Err(Error::Unsupported(format!(
            "--init-from {} with parallel data: loading encoder–decoder weights is not wired yet (issue 13)\nHINT: train from scratch with --arch",
            init.display()
        )));
    }
    open_run_dir(config, resume)?;
    let run_dir = &config.run_dir;
    let model_config = io::resolve_arch(&config.model.arch, &config.model.set)?;
    check_data_fits_layout(&model_config, Some(parallel))?;

    let corpus = ParallelCorpus::read(&parallel.file, &parallel.source, &parallel.target)?;
    let split = BookSplit::new(&corpus, &parallel.test_books, &parallel.val_books, parallel.val_fraction)?;

    let tokenizer_file = run_dir.join(TOKENIZER_FILE);
    if !tokenizer_file.exists() {
        match &config.data.tokenizer {
            Some(path) => TextTokenizer::from_file(path)?.save(&tokenizer_file)?,
            None => {
                eprintln!(
                    "training a {}-token byte-level BPE shared by `{}` and `{}` on the training books",
                    model_config.vocab_size, parallel.source, parallel.target
                );
                train_shared_bpe(&corpus, &split, model_config.vocab_size)?.save(&tokenizer_file)?;
            }
        }
    }
    let tokenizer = TextTokenizer::from_file(&tokenizer_file)?;
    let specials = SpecialIds::of(&tokenizer)?;
    if tokenizer.vocab_size() > model_config.vocab_size {
        return Err(Error::Input(format!(
            "the tokenizer ({}) has {} tokens, more than the model's vocab_size {}\nHINT: --set vocab_size={}",
            tokenizer_file.display(),
            tokenizer.vocab_size(),
            model_config.vocab_size,
            tokenizer.vocab_size()
        )));
    }

    let positions = model_config.context_length;
    let encode =
        |role| encode_pairs(&corpus, split.pairs(&corpus, role), &tokenizer, specials, positions).map(Arc::new);
    let (train, val, test) = (encode(SplitRole::Train)?, encode(SplitRole::Validation)?, encode(SplitRole::Test)?);

    let summary = json!({
        "file": parallel.file,
        "source": parallel.source,
        "target": parallel.target,
        "books": {
            "train": split.books(SplitRole::Train),
            "validation": split.books(SplitRole::Validation),
            "test": split.books(SplitRole::Test),
        },
        "pairs": {"train": train.pairs.len(), "validation": val.pairs.len(), "test": test.pairs.len()},
        "tokens": {"train": train.tokens(), "validation": val.tokens(), "test": test.tokens()},
    });
    let split_path = run_dir.join(SPLIT_FILE);
    let text = serde_json::to_string_pretty(&summary).expect("split summary serialises");
    std::fs::write(&split_path, text + "\n").map_err(|e| Error::io(&split_path, e))?;

    Ok(Seq2SeqPrepared { model_config, tokenizer, tokenizer_file, specials, split, train, val, test })
}

/// Encoder–decoder training on `parallel`. Everything up to the model is real; the training
/// loop needs the encoder–decoder model and stops with an error until it is wired.
pub fn train(config: &RunConfig, parallel: &ParallelData, resume: bool) -> Result<TrainSummary> {
    let prepared = prepare_seq2seq_run(config, parallel, resume)?;
    let list = |role| prepared.split.books(role).join(", ");
    eprintln!(
        "{} → {}: {} training pairs ({} books), {} validation pairs ({}), {} test pairs ({}); {} tokens in the shared vocabulary",
        parallel.source,
        parallel.target,
        prepared.train.pairs.len(),
        prepared.split.books(SplitRole::Train).len(),
        prepared.val.pairs.len(),
        list(SplitRole::Validation),
        prepared.test.pairs.len(),
        list(SplitRole::Test),
        prepared.tokenizer.vocab_size()
    );
    // THE WIRING POINT for the training loop: `Trainer` with a `PairSampler` over
    // `prepared.train` (batch_tokens = parallel.batch_tokens), validation over
    // `SequentialPairBatches` of `prepared.val`, and the model's encoder–decoder loss with
    // `label_smoothed_cross_entropy(.., Some(specials.pad), config.train.label_smoothing)`.
    Err(Error::Unsupported(format!(
        "training {} on parallel data: the encoder–decoder model is not wired into the trainer yet (issue 13); the data in {} is prepared",
        prepared.model_config.name,
        config.run_dir.display()
    )))
}
