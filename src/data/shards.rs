//! `prepare`: tokenize text files once into binary token shards that training memory-maps.
//!
//! Each input file is one document, followed by the end-of-text token so the model sees where
//! one text stops and the next begins (to put several documents in one file, separate them
//! with a line holding the end-of-text token itself: special tokens in the text are recognised).
//! Files are streamed in chunks of about 4 KiB (see [`TextChunks`]), encoded in parallel
//! batches, and written to shards of at most `shard_tokens` tokens, so neither the corpus nor
//! its tokens need to fit in memory.
//!
//! The validation split is either separate files, or the tail of every input file: with
//! `ValSplit::Tail(0.05)`, the last 5% of each file's *bytes* (cut at a line boundary) is
//! tokenized into `val`, so it holds close to 5% of the tokens without a second pass. Both
//! parts end with the end-of-text token.
//!
//! The output is written under a temporary name next to `out_dir` and renamed into place only
//! when complete, `manifest.json` last, so a crash never leaves something that opens as a
//! dataset.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use super::bpe::END_OF_TEXT;
use super::manifest::{
    hex, Manifest, ShardInfo, SourceInfo, SplitInfo, TokenDtype, TokenizerInfo, MAGIC, MANIFEST_FILE, TOKENIZER_FILE,
    VERSION,
};
use super::text::{check_text_file, TextChunks};
use crate::error::{Error, Result};

/// Default shard size: 8 Mi tokens (16 MiB as u16). Large enough that a dataset is a handful of
/// files, small enough that a shard is quick to checksum and to copy.
pub const DEFAULT_SHARD_TOKENS: usize = 8 << 20;

/// Text handed to the tokenizer at once. Measured on the Austen + KJV corpora: 4 KiB chunks
/// encode at ~0.85M tokens per CPU-second, 64 KiB ones at ~0.6M (the tokenizers crate's
/// per-token allocations get more expensive for big inputs: glibc `malloc_consolidate`).
const CHUNK_BYTES: usize = 4 << 10;
/// Chunks encoded per parallel batch: 1 MiB of text, enough to keep 16 threads busy.
const BATCH_CHUNKS: usize = 256;

/// Where the validation tokens come from.
#[derive(Debug, Clone, PartialEq)]
pub enum ValSplit {
    /// The last fraction (in `[0, 1)`) of every input file's bytes; `Tail(0.0)` means no
    /// validation split.
    Tail(f64),
    /// Separate files, used whole; the inputs then go entirely to `train`.
    Files(Vec<PathBuf>),
}

#[derive(Debug, Clone)]
pub struct PrepareConfig {
    /// A Hugging Face `tokenizer.json`; it is copied into the dataset.
    pub tokenizer: PathBuf,
    pub inputs: Vec<PathBuf>,
    pub val: ValSplit,
    /// Created by `prepare`; must not exist yet (an empty directory is accepted).
    pub out_dir: PathBuf,
    /// Most tokens per shard file.
    pub shard_tokens: usize,
    /// Token appended after every document; must be in the tokenizer's vocabulary.
    pub eot_token: String,
}

impl PrepareConfig {
    /// Defaults: 5% tail validation split, [`DEFAULT_SHARD_TOKENS`], `<|endoftext|>`.
    pub fn new(tokenizer: impl Into<PathBuf>, inputs: Vec<PathBuf>, out_dir: impl Into<PathBuf>) -> Self {
        PrepareConfig {
            tokenizer: tokenizer.into(),
            inputs,
            val: ValSplit::Tail(0.05),
            out_dir: out_dir.into(),
            shard_tokens: DEFAULT_SHARD_TOKENS,
            eot_token: END_OF_TEXT.to_string(),
        }
    }
}

/// Tokenize `config.inputs` into a dataset directory at `config.out_dir`; returns its manifest.
pub fn prepare(config: &PrepareConfig) -> Result<Manifest> {
    let (sizes, val_sizes) = check_config(config)?;
    let tokenizer_bytes = std::fs::read(&config.tokenizer).map_err(|e| Error::io(&config.tokenizer, e))?;
    let tokenizer = Tokenizer::from_bytes(&tokenizer_bytes).map_err(|e| Error::Tokenizer {
        origin: config.tokenizer.display().to_string(),
        reason: format!("cannot load tokenizer.json: {e}"),
    })?;
    let eot_id = tokenizer.token_to_id(&config.eot_token).ok_or_else(|| Error::Tokenizer {
        origin: config.tokenizer.display().to_string(),
        reason: format!(
            "end-of-text token `{}` is not in the vocabulary\nHINT: pass the tokenizer's own end-of-document token",
            config.eot_token
        ),
    })?;
    // Ids, not the count: a vocabulary with holes still needs an embedding row per id.
    let vocab_size = tokenizer.get_vocab(true).values().max().map_or(0, |&m| m as usize + 1);
    let dtype = TokenDtype::for_vocab(vocab_size);

    let tmp = temp_dir_for(&config.out_dir);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let result = (|| {
        let tok_path = tmp.join(TOKENIZER_FILE);
        std::fs::write(&tok_path, &tokenizer_bytes).map_err(|e| Error::io(&tok_path, e))?;
        let encoder = Encoder { tokenizer: &tokenizer, origin: &config.tokenizer, eot_id };
        let mut train = ShardWriter::new(&tmp, "train", dtype, config.shard_tokens);
        let mut val = ShardWriter::new(&tmp, "val", dtype, config.shard_tokens);
        let mut sources = Vec::new();
        for (path, &bytes) in config.inputs.iter().zip(&sizes) {
            let stop = match config.val {
                // ceil, so a non-empty file always puts at least its first line in train.
                ValSplit::Tail(f) => ((bytes as f64) * (1.0 - f)).ceil() as u64,
                ValSplit::Files(_) => u64::MAX,
            };
            let mut chunks = TextChunks::open(path)?;
            let train_tokens = encoder.encode_part(&mut chunks, stop, &mut train)?;
            let val_tokens = encoder.encode_part(&mut chunks, u64::MAX, &mut val)?;
            sources.push(SourceInfo { path: path.display().to_string(), bytes, train_tokens, val_tokens });
        }
        if let ValSplit::Files(files) = &config.val {
            for (path, &bytes) in files.iter().zip(&val_sizes) {
                let val_tokens = encoder.encode_part(&mut TextChunks::open(path)?, u64::MAX, &mut val)?;
                sources.push(SourceInfo { path: path.display().to_string(), bytes, train_tokens: 0, val_tokens });
            }
        }
        let manifest = Manifest {
            magic: MAGIC.into(),
            version: VERSION,
            dtype,
            tokenizer: TokenizerInfo {
                file: TOKENIZER_FILE.into(),
                sha256: hex(&Sha256::digest(&tokenizer_bytes)),
                vocab_size,
                eot_token: config.eot_token.clone(),
                eot_id,
            },
            train: train.finish()?,
            val: val.finish()?,
            sources,
        };
        // Only end-of-text tokens: the text tokenized to nothing.
        let eots = config.inputs.len() as u64;
        if manifest.train.tokens <= eots {
            return Err(Error::data(
                &config.inputs[0],
                "the training corpus tokenized to no tokens\nHINT: pass text files with content",
            ));
        }
        let manifest_path = tmp.join(MANIFEST_FILE);
        let json = serde_json::to_string_pretty(&manifest).map_err(|e| Error::data(&manifest_path, e.to_string()))?;
        std::fs::write(&manifest_path, json).map_err(|e| Error::io(&manifest_path, e))?;
        Ok(manifest)
    })();
    let manifest = match result {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if config.out_dir.exists() {
        // check_config accepted it, so it is an empty directory.
        std::fs::remove_dir(&config.out_dir).map_err(|e| Error::io(&config.out_dir, e))?;
    }
    std::fs::rename(&tmp, &config.out_dir).map_err(|e| Error::io(&config.out_dir, e))?;
    Ok(manifest)
}

/// Validate everything that can be checked before tokenizing; returns input and val file sizes.
fn check_config(config: &PrepareConfig) -> Result<(Vec<u64>, Vec<u64>)> {
    if config.inputs.is_empty() {
        return Err(Error::Input("prepare needs at least one input text file (the corpus is empty)".into()));
    }
    if config.shard_tokens == 0 {
        return Err(Error::Input("shard size must be at least 1 token".into()));
    }
    let val_files: &[PathBuf] = match &config.val {
        ValSplit::Tail(f) if !(0.0..1.0).contains(f) => {
            return Err(Error::Input(format!("validation fraction {f} is out of range, expected 0 <= f < 1")));
        }
        ValSplit::Tail(_) => &[],
        ValSplit::Files(files) => files,
    };
    let out = &config.out_dir;
    if out.exists() {
        let empty = out.is_dir() && std::fs::read_dir(out).map_err(|e| Error::io(out, e))?.next().is_none();
        if !empty {
            return Err(Error::data(out, "output already exists\nHINT: remove it or choose another output directory"));
        }
    }
    let sizes = config.inputs.iter().map(|p| check_text_file(p)).collect::<Result<_>>()?;
    let val_sizes = val_files.iter().map(|p| check_text_file(p)).collect::<Result<_>>()?;
    Ok((sizes, val_sizes))
}

/// `<parent>/.<name>.partial`: a sibling, so the final rename stays on one filesystem.
fn temp_dir_for(out_dir: &Path) -> PathBuf {
    let name = out_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "dataset".into());
    out_dir.with_file_name(format!(".{name}.partial"))
}

struct Encoder<'a> {
    tokenizer: &'a Tokenizer,
    origin: &'a Path,
    eot_id: u32,
}

impl Encoder<'_> {
    /// Encode the chunks of `text` that start before byte `stop` into `out`, then an
    /// end-of-text token if anything was written. Returns the tokens written.
    fn encode_part(&self, text: &mut TextChunks, stop: u64, out: &mut ShardWriter) -> Result<u64> {
        let mut written = 0u64;
        loop {
            let mut batch = Vec::with_capacity(BATCH_CHUNKS);
            while batch.len() < BATCH_CHUNKS {
                match text.next_chunk(CHUNK_BYTES, stop)? {
                    Some(chunk) => batch.push(chunk),
                    None => break,
                }
            }
            if batch.is_empty() {
                break;
            }
            // `false`: no post-processor tokens (BOS etc.) inside a document.
            let encodings = self.tokenizer.encode_batch_fast(batch, false).map_err(|e| Error::Tokenizer {
                origin: self.origin.display().to_string(),
                reason: format!("encoding failed: {e}"),
            })?;
            for enc in &encodings {
                out.push(enc.get_ids())?;
                written += enc.get_ids().len() as u64;
            }
        }
        if written > 0 {
            out.push(&[self.eot_id])?;
            written += 1;
        }
        Ok(written)
    }
}

/// Appends tokens to `<split>-NNNNNN.bin` files of at most `max_tokens` each, hashing as it goes.
struct ShardWriter {
    dir: PathBuf,
    split: &'static str,
    dtype: TokenDtype,
    max_tokens: usize,
    current: Option<OpenShard>,
    done: Vec<ShardInfo>,
    buf: Vec<u8>,
}

struct OpenShard {
    path: PathBuf,
    file: BufWriter<File>,
    hasher: Sha256,
    tokens: usize,
}

impl ShardWriter {
    fn new(dir: &Path, split: &'static str, dtype: TokenDtype, max_tokens: usize) -> Self {
        ShardWriter {
            dir: dir.to_path_buf(),
            split,
            dtype,
            max_tokens,
            current: None,
            done: Vec::new(),
            buf: Vec::new(),
        }
    }

    fn push(&mut self, mut ids: &[u32]) -> Result<()> {
        while !ids.is_empty() {
            let shard = match &mut self.current {
                Some(shard) => shard,
                slot @ None => {
                    let path = self.dir.join(format!("{}-{:06}.bin", self.split, self.done.len()));
                    let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
                    let file = BufWriter::with_capacity(1 << 20, file);
                    slot.insert(OpenShard { path, file, hasher: Sha256::new(), tokens: 0 })
                }
            };
            let take = ids.len().min(self.max_tokens - shard.tokens);
            let (now, rest) = ids.split_at(take);
            self.buf.clear();
            match self.dtype {
                // Ids were checked against the vocab size that chose the dtype.
                TokenDtype::U16 => now.iter().for_each(|&t| self.buf.extend_from_slice(&(t as u16).to_le_bytes())),
                TokenDtype::U32 => now.iter().for_each(|&t| self.buf.extend_from_slice(&t.to_le_bytes())),
            }
            shard.hasher.update(&self.buf);
            shard.file.write_all(&self.buf).map_err(|e| Error::io(&shard.path, e))?;
            shard.tokens += take;
            if shard.tokens == self.max_tokens {
                self.close_current()?;
            }
            ids = rest;
        }
        Ok(())
    }

    fn close_current(&mut self) -> Result<()> {
        if let Some(mut shard) = self.current.take() {
            shard.file.flush().map_err(|e| Error::io(&shard.path, e))?;
            let file = shard.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            self.done.push(ShardInfo { file, tokens: shard.tokens as u64, sha256: hex(&shard.hasher.finalize()) });
        }
        Ok(())
    }

    fn finish(mut self) -> Result<SplitInfo> {
        self.close_current()?;
        Ok(SplitInfo { tokens: self.done.iter().map(|s| s.tokens).sum(), shards: self.done })
    }
}
