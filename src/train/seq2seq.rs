//! Getting an encoder–decoder run ready on parallel text: its directory, the corpus split by
//! books, the shared tokenizer, the token pairs of every split, the model config they must fit
//! and its first weights.
//!
//! The training loop is the decoder-only one (`trainer.rs`): the same checkpoints, resume,
//! supervisor and rollback, with a [`PairSampler`](crate::data::parallel::PairSampler) in place
//! of the window sampler and the model's sequence-to-sequence loss in place of the
//! language-model loss (see [`super::task`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde_json::json;

use super::run_config::RunConfig;
use super::setup::{init_config, open_run_dir, Prepared};
use super::task::{PairData, TrainData};
use crate::config::{Layout, ModelConfig};
use crate::data::parallel::{
    add_copied_targets, encode_pairs, train_shared_bpe, BookSplit, ParallelCorpus, ParallelData, SpecialIds, SplitRole,
    TokenPairs, PAD,
};
use crate::error::{Error, Result};
use crate::io::{self, TextTokenizer};
use crate::model::init_weights;

const TOKENIZER_FILE: &str = "tokenizer.json";
/// Which books went where, and how many pairs each split has: written for people and tools
/// (`eval translate`) to read; the run config stays the source of truth.
pub const SPLIT_FILE: &str = "split.json";

/// An encoder–decoder run ready to train.
pub struct Seq2SeqPrepared {
    /// With `layout.decoder_start_token_id` and `eos_token_id` set to the tokenizer's `<s>`
    /// and `</s>` (a fresh model), or the pretrained model's own (`--init-from`).
    pub model_config: ModelConfig,
    /// The weights of step 0 (fresh init or `init_from`); empty when resuming.
    pub initial_weights: HashMap<String, Tensor>,
    pub tokenizer: TextTokenizer,
    pub tokenizer_file: PathBuf,
    pub specials: SpecialIds,
    pub split: BookSplit,
    /// The training pairs, [`add_copied_targets`]' copies included.
    pub train: Arc<TokenPairs>,
    /// How many of `train` are `target → target` copies.
    pub copied_targets: usize,
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
    open_run_dir(config, resume)?;
    let run_dir = &config.run_dir;
    let init = match &config.model.init_from {
        Some(path) => Some(io::load_model(path, &Device::Cpu)?),
        None => None,
    };
    let mut model_config = match &init {
        Some(loaded) => init_config(loaded, &config.model.set)?,
        None => io::resolve_arch(&config.model.arch, &config.model.set)?,
    };
    check_data_fits_layout(&model_config, Some(parallel))?;

    let mut corpus = ParallelCorpus::read(&parallel.file, &parallel.source, &parallel.target)?;
    let split = BookSplit::new(&corpus, &parallel.test_books, &parallel.val_books, parallel.val_fraction)?;
    let copied_targets = add_copied_targets(&mut corpus, &split, parallel.copied_targets);

    let tokenizer_file = run_dir.join(TOKENIZER_FILE);
    if !tokenizer_file.exists() {
        match &config.data.tokenizer {
            Some(path) => TextTokenizer::from_file(path)?.save(&tokenizer_file)?,
            None if init.is_some() => match init.as_ref().and_then(|l| l.tokenizer.as_ref()) {
                Some(tokenizer) => tokenizer.save(&tokenizer_file)?,
                None => {
                    return Err(Error::Input(format!(
                        "--init-from {} has no tokenizer.json, and a pretrained model only continues with its own vocabulary\nHINT: pass its tokenizer with --tokenizer",
                        init.as_ref().map(|l| l.source.display().to_string()).unwrap_or_default()
                    )))
                }
            },
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
    let specials = match &init {
        Some(_) => pretrained_specials(&model_config, &tokenizer)?,
        None => {
            let specials = SpecialIds::of(&tokenizer)?;
            if let Layout::EncoderDecoder { decoder_start_token_id, eos_token_id, .. } = &mut model_config.layout {
                *decoder_start_token_id = specials.start;
                *eos_token_id = Some(specials.eos);
            }
            specials
        }
    };
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
        "copied_targets": copied_targets,
        "tokens": {"train": train.tokens(), "validation": val.tokens(), "test": test.tokens()},
    });
    let split_path = run_dir.join(SPLIT_FILE);
    let text = serde_json::to_string_pretty(&summary).expect("split summary serialises");
    std::fs::write(&split_path, text + "\n").map_err(|e| Error::io(&split_path, e))?;

    let initial_weights = match init {
        Some(loaded) => loaded.weights,
        None if resume => HashMap::new(),
        None => init_weights(&model_config, config.model.init_seed, &Device::Cpu)?,
    };
    Ok(Seq2SeqPrepared {
        model_config,
        initial_weights,
        tokenizer,
        tokenizer_file,
        specials,
        split,
        train,
        copied_targets,
        val,
        test,
    })
}

/// The special ids of a pretrained encoder–decoder: start and end from its config (Marian
/// starts from `<pad>`), padding from its tokenizer.
fn pretrained_specials(model: &ModelConfig, tokenizer: &TextTokenizer) -> Result<SpecialIds> {
    let Layout::EncoderDecoder { decoder_start_token_id: start, eos_token_id: Some(eos), .. } = model.layout else {
        return Err(Error::Input(
            "the --init-from model has no layout.eos_token_id, so its targets cannot be closed\nHINT: --set layout.eos_token_id=ID (its `</s>`)".into(),
        ));
    };
    let pad = tokenizer.token_to_id(PAD).ok_or_else(|| {
        Error::Input(format!(
            "the --init-from model's tokenizer has no `{PAD}` token to pad batches with\nHINT: pass a tokenizer that has one with --tokenizer"
        ))
    })?;
    Ok(SpecialIds { pad, start, eos })
}

/// Prepare an encoder–decoder run for the training loop.
pub fn prepare_training(config: &RunConfig, parallel: &ParallelData, resume: bool) -> Result<Prepared> {
    let prepared = prepare_seq2seq_run(config, parallel, resume)?;
    let list = |role| prepared.split.books(role).join(", ");
    eprintln!(
        "{} → {}: {} training pairs ({} books{}), {} validation pairs ({}), {} test pairs ({}); {} tokens in the shared vocabulary",
        parallel.source,
        parallel.target,
        prepared.train.pairs.len(),
        prepared.split.books(SplitRole::Train).len(),
        match prepared.copied_targets {
            0 => String::new(),
            n => format!(", {n} of them copied targets"),
        },
        prepared.val.pairs.len(),
        list(SplitRole::Validation),
        prepared.test.pairs.len(),
        list(SplitRole::Test),
        prepared.tokenizer.vocab_size()
    );
    let data = PairData {
        train: prepared.train,
        val: prepared.val,
        batch_tokens: parallel.batch_tokens,
        label_smoothing: config.label_smoothing(),
    };
    Ok(Prepared {
        model_config: prepared.model_config,
        initial_weights: prepared.initial_weights,
        data: TrainData::Pairs(data),
        tokenizer: Some(prepared.tokenizer),
        tokenizer_file: Some(prepared.tokenizer_file),
        resume,
    })
}
