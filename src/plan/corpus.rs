//! The corpus a plan trains on, tokenized once per tokenizer the plans use.
//!
//! Tokens are counted, not guessed: each plan's corpus is prepared with the tokenizer its run
//! will use (a checkpoint's own, or the byte-level BPE `lmforge train` would train for a new
//! model), exactly as `lmforge train` would prepare it, into a dataset under the plan cache.
//! The printed commands train on that dataset (`--dataset`), so the run starts without
//! tokenizing again and sees exactly the tokens counted here.

use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::data::{prepare, save_tokenizer, train_bpe, PrepareConfig, TokenDataset, ValSplit, END_OF_TEXT};
use crate::error::{Error, Result};
use crate::io::TextTokenizer;
use crate::train::corpus as bundled;
use crate::train::setup::end_of_text_token;

/// Where the text comes from.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CorpusSource {
    /// The Austen novels bundled into the binary (`lmforge train`'s default corpus).
    Bundled,
    /// Text files; the last 5% of each is held out for validation, as `lmforge train` does.
    Files { files: Vec<PathBuf> },
    /// A dataset made by `lmforge data prepare`: its tokens, tokenized already.
    Dataset { dir: PathBuf },
}

/// The corpus of a plan request.
#[derive(Clone, Debug, Serialize)]
pub struct PlanCorpus {
    pub source: CorpusSource,
    /// Size of the text (the dataset's token files for a dataset).
    pub bytes: u64,
}

/// The corpus prepared for one tokenizer.
#[derive(Clone, Debug, Serialize)]
pub struct TokenizedCorpus {
    /// A dataset directory `lmforge train --dataset` reads.
    pub dataset: PathBuf,
    pub train_tokens: u64,
    pub val_tokens: u64,
    /// Which tokenizer, for the report: `bpe-2048 trained on the corpus`, a checkpoint's name.
    pub tokenizer: String,
}

/// `train`'s default validation share of each file (`data.val_fraction`).
const VAL_FRACTION: f64 = 0.05;

impl PlanCorpus {
    /// No paths: the bundled corpus. One directory with a `manifest.json`: a prepared dataset.
    /// Otherwise text files, each checked now (an empty file is an error naming it).
    pub fn resolve(paths: &[PathBuf], cache: &Path) -> Result<Self> {
        if paths.is_empty() {
            let bytes = sizes(&bundled::write_bundled(&cache.join("corpus").join("bundled"))?)?;
            return Ok(PlanCorpus { source: CorpusSource::Bundled, bytes });
        }
        if let [dir] = paths {
            if dir.is_dir() {
                let dataset = TokenDataset::open(dir)?;
                if dataset.train().is_empty() {
                    return Err(Error::data(
                        dir,
                        "the dataset's train split is empty\nHINT: prepare it from text with content",
                    ));
                }
                let bytes = dataset.train().len() * dataset.manifest().dtype.bytes() as u64;
                return Ok(PlanCorpus { source: CorpusSource::Dataset { dir: dir.clone() }, bytes });
            }
        }
        let bytes = sizes(paths)?;
        Ok(PlanCorpus { source: CorpusSource::Files { files: paths.to_vec() }, bytes })
    }

    /// A line for the report.
    pub fn describe(&self) -> String {
        match &self.source {
            CorpusSource::Bundled => format!("the bundled Austen corpus ({})", mib(self.bytes)),
            CorpusSource::Files { files } => {
                let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
                format!("{} ({})", names.join(", "), mib(self.bytes))
            }
            CorpusSource::Dataset { dir } => format!("dataset {}", dir.display()),
        }
    }

    /// The corpus for a model trained from scratch with `vocab_size` tokens: the byte-level
    /// BPE `lmforge train` would train on it (cached), or a dataset's own tokenizer.
    pub fn for_new_model(&self, vocab_size: usize, cache: &Path) -> Result<TokenizedCorpus> {
        if let CorpusSource::Dataset { dir } = &self.source {
            return self.existing_dataset(dir, None);
        }
        let files = self.train_files(cache)?;
        let key = self.fingerprint(&files, &format!("bpe-{vocab_size}"))?;
        let label = format!("bpe-{vocab_size}");
        let tokenizer_dir = cache.join("tokenizers").join(format!("{label}-{key}"));
        let tokenizer_file = tokenizer_dir.join("tokenizer.json");
        if !tokenizer_file.is_file() {
            eprintln!(
                "plan: training a {vocab_size}-token byte-level BPE tokenizer on the corpus (as `lmforge train` would)"
            );
            let tokenizer = train_bpe(&files, vocab_size, &[END_OF_TEXT.to_string()], 2)?;
            std::fs::create_dir_all(&tokenizer_dir).map_err(|e| Error::io(&tokenizer_dir, e))?;
            let partial = tokenizer_dir.join("tokenizer.json.partial");
            save_tokenizer(&tokenizer, &partial)?;
            std::fs::rename(&partial, &tokenizer_file).map_err(|e| Error::io(&tokenizer_file, e))?;
        }
        let label = format!("{label} trained on the corpus");
        self.prepared(&files, &tokenizer_file, END_OF_TEXT, &key, &label, cache)
    }

    /// The corpus in `tokenizer` (a checkpoint's own), named `name` in the report.
    pub fn for_tokenizer(&self, tokenizer: &TextTokenizer, name: &str, cache: &Path) -> Result<TokenizedCorpus> {
        if let CorpusSource::Dataset { dir } = &self.source {
            return self.existing_dataset(dir, Some((tokenizer, name)));
        }
        let files = self.train_files(cache)?;
        let serialized = tokenizer
            .inner()
            .to_string(false)
            .map_err(|e| Error::Tokenizer { origin: name.to_string(), reason: format!("cannot serialise: {e}") })?;
        let tokenizer_key = hex16(&Sha256::digest(serialized.as_bytes()));
        let key = self.fingerprint(&files, &tokenizer_key)?;
        let tokenizer_dir = cache.join("tokenizers").join(format!("{}-{tokenizer_key}", slug(name)));
        let tokenizer_file = tokenizer_dir.join("tokenizer.json");
        if !tokenizer_file.is_file() {
            std::fs::create_dir_all(&tokenizer_dir).map_err(|e| Error::io(&tokenizer_dir, e))?;
            tokenizer.save(&tokenizer_file)?;
        }
        let eot = end_of_text_token(tokenizer);
        self.prepared(&files, &tokenizer_file, &eot, &key, &format!("{name}'s own"), cache)
    }

    /// A prepared dataset, used as it is; with a checkpoint's tokenizer it must be the one the
    /// dataset was tokenized with.
    fn existing_dataset(&self, dir: &Path, tokenizer: Option<(&TextTokenizer, &str)>) -> Result<TokenizedCorpus> {
        let dataset = TokenDataset::open(dir)?;
        if let Some((tokenizer, name)) = tokenizer {
            let theirs = TextTokenizer::from_file(&dataset.tokenizer_path())?;
            if theirs.inner().get_vocab(true) != tokenizer.inner().get_vocab(true) {
                return Err(Error::data(
                    dir,
                    format!("this dataset was tokenized with another tokenizer than {name}'s\nHINT: pass the text files as --corpus, so each plan's corpus is tokenized with its own tokenizer"),
                ));
            }
        }
        Ok(TokenizedCorpus {
            dataset: dir.to_path_buf(),
            train_tokens: dataset.train().len(),
            val_tokens: dataset.val().len(),
            tokenizer: format!("the dataset's ({} tokens)", dataset.vocab_size()),
        })
    }

    /// Tokenize `files` with `tokenizer_file` into the cache, unless done before.
    fn prepared(
        &self,
        files: &[PathBuf],
        tokenizer_file: &Path,
        eot: &str,
        key: &str,
        label: &str,
        cache: &Path,
    ) -> Result<TokenizedCorpus> {
        let stem = match &self.source {
            CorpusSource::Bundled => "austen".to_string(),
            _ => files.first().and_then(|f| f.file_stem()).map(|s| slug(&s.to_string_lossy())).unwrap_or_default(),
        };
        let dir = cache.join("datasets").join(format!("{stem}-{key}"));
        if TokenDataset::open(&dir).is_err() {
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            }
            std::fs::create_dir_all(dir.parent().unwrap_or(cache)).map_err(|e| Error::io(cache, e))?;
            eprintln!("plan: tokenizing the corpus with {label} into {}", dir.display());
            let mut config = PrepareConfig::new(tokenizer_file, files.to_vec(), &dir);
            config.val = match &self.source {
                CorpusSource::Bundled => {
                    ValSplit::Files(vec![bundled::write_bundled_val(&cache.join("corpus").join("bundled"))?])
                }
                _ => ValSplit::Tail(VAL_FRACTION),
            };
            config.eot_token = eot.to_string();
            prepare(&config)?;
        }
        let dataset = TokenDataset::open(&dir)?;
        Ok(TokenizedCorpus {
            dataset: dir,
            train_tokens: dataset.train().len(),
            val_tokens: dataset.val().len(),
            tokenizer: label.to_string(),
        })
    }

    fn train_files(&self, cache: &Path) -> Result<Vec<PathBuf>> {
        match &self.source {
            CorpusSource::Bundled => bundled::write_bundled(&cache.join("corpus").join("bundled")),
            CorpusSource::Files { files } => Ok(files.clone()),
            CorpusSource::Dataset { dir } => Ok(vec![dir.clone()]),
        }
    }

    /// A short hash of the files (path, size, modification time) and the tokenizer: a cached
    /// tokenizer or dataset is reused only for the same text and tokenizer.
    fn fingerprint(&self, files: &[PathBuf], tokenizer_key: &str) -> Result<String> {
        let mut hasher = Sha256::new();
        hasher.update(tokenizer_key.as_bytes());
        for file in files {
            let meta = std::fs::metadata(file).map_err(|e| Error::io(file, e))?;
            let absolute = std::fs::canonicalize(file).unwrap_or_else(|_| file.clone());
            let modified = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
            hasher.update(format!("{}\0{}\0{:?}\0", absolute.display(), meta.len(), modified).as_bytes());
        }
        Ok(hex16(&hasher.finalize()))
    }
}

/// Total size of text files, each checked to be non-empty UTF-8 text.
fn sizes(files: &[PathBuf]) -> Result<u64> {
    files.iter().map(|f| crate::data::text::check_text_file(f)).sum()
}

/// The first 16 hex digits of a digest: short enough for a directory name, long enough that
/// two cached entries never meet.
pub(crate) fn hex16(digest: &[u8]) -> String {
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// A name safe in a path: letters, digits, `-`, `.`; anything else becomes `-`.
pub(crate) fn slug(name: &str) -> String {
    let mut s = String::new();
    for c in name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '-' }) {
        if !(c == '-' && (s.is_empty() || s.ends_with('-'))) {
            s.push(c);
        }
    }
    s.trim_end_matches('-').to_string()
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}
