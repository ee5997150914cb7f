//! Getting a run ready: its directory, tokenizer, prepared data, model config and first weights.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::checkpoint;
use super::corpus;
use super::run_config::RunConfig;
use super::task::TrainData;
use crate::config::ModelConfig;
use crate::data::{check_vocab, prepare, train_bpe, PrepareConfig, TokenDataset, ValSplit, END_OF_TEXT};
use crate::error::{Error, Result};
use crate::io::{self, TextTokenizer};
use crate::model::init_weights;

pub const RUN_CONFIG_FILE: &str = "run.toml";
const TOKENIZER_FILE: &str = "tokenizer.json";

/// A run ready to train.
pub struct Prepared {
    pub model_config: ModelConfig,
    /// The weights of step 0 (fresh init or `init_from`); unused when resuming.
    pub initial_weights: HashMap<String, Tensor>,
    /// What the run trains on: a token dataset, or aligned pairs for an encoder–decoder.
    pub data: TrainData,
    pub tokenizer: Option<TextTokenizer>,
    pub tokenizer_file: Option<PathBuf>,
    pub resume: bool,
}

/// Create or reopen the run directory and everything training needs.
pub fn prepare_run(config: &RunConfig, resume: bool) -> Result<Prepared> {
    open_run_dir(config, resume)?;
    let run_dir = &config.run_dir;

    let init = match &config.model.init_from {
        Some(path) => Some(io::load_model(path, &Device::Cpu)?),
        None => None,
    };
    let model_config = match &init {
        Some(loaded) => init_config(loaded, &config.model.set)?,
        None => io::resolve_arch(&config.model.arch, &config.model.set)?,
    };
    super::seq2seq::check_data_fits_layout(&model_config, config.data.parallel.as_ref())?;

    let tokenizer_file = run_dir.join(TOKENIZER_FILE);
    let (dataset_dir, train_files) = match &config.data.dataset {
        Some(dir) => (dir.clone(), vec![]),
        None => (run_dir.join("data"), training_files(config)?),
    };
    if !tokenizer_file.exists() {
        if let Some(path) = &config.data.tokenizer {
            std::fs::copy(path, &tokenizer_file).map_err(|e| Error::io(path, e))?;
        } else if let Some(tokenizer) = init.as_ref().and_then(|l| l.tokenizer.as_ref()) {
            tokenizer.save(&tokenizer_file)?;
        } else if config.data.dataset.is_some() {
            let source = dataset_dir.join(TOKENIZER_FILE);
            std::fs::copy(&source, &tokenizer_file).map_err(|e| Error::io(&source, e))?;
        } else {
            eprintln!(
                "training a {}-token byte-level BPE tokenizer on {} file(s)",
                model_config.vocab_size,
                train_files.len()
            );
            let tokenizer = train_bpe(&train_files, model_config.vocab_size, &[END_OF_TEXT.to_string()], 2)?;
            // Declared as the end token (tokenizer_config.json), so generation stops there and
            // exports (GGUF, Hugging Face) carry it.
            let end = tokenizer.token_to_id(END_OF_TEXT);
            TextTokenizer::new(tokenizer, None, end.into_iter().collect(), None, "the trained BPE")
                .save(&tokenizer_file)?;
        }
    }
    let tokenizer = TextTokenizer::from_file(&tokenizer_file)?;

    if config.data.dataset.is_none() && TokenDataset::open(&dataset_dir).is_err() {
        if dataset_dir.exists() {
            // A preparation interrupted earlier: start it over.
            std::fs::remove_dir_all(&dataset_dir).map_err(|e| Error::io(&dataset_dir, e))?;
        }
        let mut prepare_config = PrepareConfig::new(&tokenizer_file, train_files, &dataset_dir);
        prepare_config.val = if !config.data.val_files.is_empty() {
            ValSplit::Files(config.data.val_files.clone())
        } else if config.data.train_files.is_empty() {
            ValSplit::Files(vec![corpus::write_bundled_val(&run_dir.join("corpus"))?])
        } else {
            ValSplit::Tail(config.data.val_fraction.unwrap_or(0.05))
        };
        prepare_config.eot_token = end_of_text_token(&tokenizer);
        eprintln!("preparing token shards in {}", dataset_dir.display());
        prepare(&prepare_config)?;
    }
    let dataset = TokenDataset::open(&dataset_dir)?;
    check_vocab(&dataset, model_config.vocab_size)?;

    let initial_weights = match init {
        Some(loaded) => loaded.weights,
        None if resume => HashMap::new(),
        None => init_weights(&model_config, config.model.init_seed, &Device::Cpu)?,
    };
    Ok(Prepared {
        model_config,
        initial_weights,
        data: TrainData::Text(Box::new(dataset)),
        tokenizer: Some(tokenizer),
        tokenizer_file: Some(tokenizer_file),
        resume,
    })
}

/// The config of a pretrained model with `settings` applied; only settings that keep every
/// parameter's shape can change a pretrained model.
pub(crate) fn init_config(loaded: &io::LoadedModel, settings: &[String]) -> Result<ModelConfig> {
    let changed = crate::config::apply_overrides(&loaded.config, settings)?;
    if changed.param_specs() != loaded.config.param_specs() {
        return Err(Error::Input(format!(
            "--set on --init-from {} changes the parameter shapes; only shape-preserving settings (window, positions' theta, eps, ...) can change a pretrained model",
            loaded.source.display()
        )));
    }
    Ok(changed)
}

/// Create the run directory and write its `run.toml` for a new run, or check that there is a
/// run to resume; a new run never starts over an old one's checkpoints.
pub(crate) fn open_run_dir(config: &RunConfig, resume: bool) -> Result<()> {
    let run_dir = &config.run_dir;
    let has_checkpoints = checkpoint::latest_valid(run_dir).map(|l| l.latest.is_some()).unwrap_or(false);
    if resume && !has_checkpoints {
        return Err(Error::checkpoint(
            run_dir,
            "not a run with a valid checkpoint to resume\nHINT: start it without --resume, or pass the directory of an existing run",
        ));
    }
    if !resume && has_checkpoints {
        return Err(Error::checkpoint(
            run_dir,
            "this run directory already has checkpoints\nHINT: continue it with `lmforge train --resume RUN`, or choose a new --run directory",
        ));
    }
    std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
    // Partial saves of killed workers cost a checkpoint of disk each; a run that is complete
    // never saves again, so clean up on every start and resume, not only at the next save.
    for stale in checkpoint::cleanup_partial(run_dir)? {
        eprintln!("removed {}: the unfinished save of a process that is gone", stale.display());
    }
    let run_config_path = run_dir.join(RUN_CONFIG_FILE);
    if !resume {
        // The warmup a default gave this run is written down, so a resume with more --steps
        // keeps the warmup the run started with.
        let mut stored = config.clone();
        stored.train.warmup_steps = Some(config.schedule().warmup_steps);
        let text = toml::to_string_pretty(&stored).expect("run config serialises");
        std::fs::write(&run_config_path, text).map_err(|e| Error::io(&run_config_path, e))?;
    }
    Ok(())
}

/// The configured training files, or the bundled corpus written into the run directory.
fn training_files(config: &RunConfig) -> Result<Vec<PathBuf>> {
    if !config.data.train_files.is_empty() {
        return Ok(config.data.train_files.clone());
    }
    corpus::write_bundled(&config.run_dir.join("corpus"))
}

/// The tokenizer's end-of-document token: `<|endoftext|>` when it has one, else its EOS.
pub fn end_of_text_token(tokenizer: &TextTokenizer) -> String {
    if tokenizer.token_to_id(END_OF_TEXT).is_some() {
        return END_OF_TEXT.to_string();
    }
    tokenizer.eos_ids().first().and_then(|&id| tokenizer.id_to_token(id)).unwrap_or_else(|| END_OF_TEXT.to_string())
}

/// Read `RUN/run.toml` for `--resume RUN`.
pub fn read_run_config(run_dir: &Path) -> Result<RunConfig> {
    let path = run_dir.join(RUN_CONFIG_FILE);
    if !path.exists() {
        return Err(Error::checkpoint(run_dir, format!("not a run directory: no {RUN_CONFIG_FILE}\nHINT: pass the --run directory of an earlier `lmforge train`")));
    }
    let mut config = RunConfig::from_file(&path)?;
    config.run_dir = run_dir.to_path_buf();
    Ok(config)
}
