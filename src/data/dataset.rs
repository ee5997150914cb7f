//! Reading a prepared token dataset: the manifest is validated against the files on disk once,
//! at open, and the shards are memory-mapped, so reading a window costs a copy of its tokens
//! and the OS page cache does the rest.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use sha2::{Digest, Sha256};

use super::manifest::{hex, Manifest, SplitInfo, TokenDtype, MAGIC, MANIFEST_FILE, VERSION};
use crate::error::{Error, Result};

/// How much [`TokenDataset::open_with`] checks beyond the manifest and file sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Manifest, file presence and sizes only: instant, for very large datasets.
    Sizes,
    /// Also the sha256 of every shard and of `tokenizer.json` (about 1 GB/s).
    Checksums,
}

/// Which part of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

/// A prepared dataset directory (see [`prepare`](super::prepare)), opened and validated.
pub struct TokenDataset {
    dir: PathBuf,
    manifest: Manifest,
    train: TokenSplit,
    val: TokenSplit,
}

impl TokenDataset {
    /// Open and fully verify `dir` (checksums included).
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with(dir, Verify::Checksums)
    }

    pub fn open_with(dir: &Path, verify: Verify) -> Result<Self> {
        let manifest = read_manifest(dir)?;
        let manifest_path = dir.join(MANIFEST_FILE);
        let tok = &manifest.tokenizer;
        if tok.vocab_size as u64 > manifest.dtype.max_vocab() {
            return Err(Error::data(
                &manifest_path,
                format!("vocab_size {} does not fit dtype {:?}", tok.vocab_size, manifest.dtype),
            ));
        }
        if tok.eot_id as usize >= tok.vocab_size {
            return Err(Error::data(
                &manifest_path,
                format!("eot_id {} is outside the vocabulary (vocab_size {})", tok.eot_id, tok.vocab_size),
            ));
        }
        if manifest.train.tokens == 0 {
            return Err(Error::data(&manifest_path, "the train split is empty"));
        }
        let tok_path = dir.join(safe_file_name(&manifest_path, &tok.file)?);
        if verify == Verify::Checksums {
            let bytes = std::fs::read(&tok_path).map_err(|e| Error::io(&tok_path, e))?;
            check_sha(&tok_path, &bytes, &tok.sha256)?;
        } else if !tok_path.is_file() {
            return Err(Error::data(&tok_path, "missing: the dataset's tokenizer.json is listed in the manifest"));
        }
        let train = TokenSplit::open(dir, &manifest_path, "train", &manifest.train, manifest.dtype, verify)?;
        let val = TokenSplit::open(dir, &manifest_path, "val", &manifest.val, manifest.dtype, verify)?;
        Ok(TokenDataset { dir: dir.to_path_buf(), manifest, train, val })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// One past the largest token id: a model needs at least this many embedding rows.
    pub fn vocab_size(&self) -> usize {
        self.manifest.tokenizer.vocab_size
    }

    pub fn eot_id(&self) -> u32 {
        self.manifest.tokenizer.eot_id
    }

    /// The dataset's own copy of the tokenizer it was made with.
    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.tokenizer.file)
    }

    pub fn split(&self, split: Split) -> &TokenSplit {
        match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
        }
    }

    pub fn train(&self) -> &TokenSplit {
        &self.train
    }

    pub fn val(&self) -> &TokenSplit {
        &self.val
    }
}

/// Refuse to train a model whose embedding has fewer rows than the dataset has token ids:
/// the first out-of-range id would fail deep inside an index op, mid-run.
pub fn check_vocab(dataset: &TokenDataset, model_vocab: usize) -> Result<()> {
    let need = dataset.vocab_size();
    if need > model_vocab {
        return Err(Error::data(
            dataset.dir(),
            format!(
                "the dataset's tokenizer has {need} token ids but the model's vocabulary has {model_vocab}\nHINT: set the model's vocab_size to at least {need} (e.g. --set vocab_size={need}), or prepare the data with the model's own tokenizer"
            ),
        ));
    }
    Ok(())
}

fn read_manifest(dir: &Path) -> Result<Manifest> {
    if !dir.is_dir() {
        return Err(Error::data(dir, "not a directory; expected a prepared token dataset"));
    }
    let path = dir.join(MANIFEST_FILE);
    if !path.is_file() {
        return Err(Error::data(
            dir,
            "not a prepared token dataset: no manifest.json\nHINT: create one with `lmforge prepare` (data::prepare)",
        ));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::data(&path, format!("not valid JSON: {e}")))?;
    if value.get("magic").and_then(|m| m.as_str()) != Some(MAGIC) {
        return Err(Error::data(
            &path,
            format!("not an lmforge token dataset manifest (expected \"magic\": \"{MAGIC}\")"),
        ));
    }
    match value.get("version").and_then(|v| v.as_u64()) {
        Some(v) if v == VERSION as u64 => {}
        Some(v) if v > VERSION as u64 => {
            return Err(Error::data(
                &path,
                format!("dataset format version {v} is newer than this build reads ({VERSION})\nHINT: upgrade lmforge or prepare the data again"),
            ))
        }
        other => return Err(Error::data(&path, format!("unsupported dataset format version {other:?}, expected {VERSION}"))),
    }
    serde_json::from_value(value).map_err(|e| Error::data(&path, format!("malformed manifest: {e}")))
}

/// A manifest file entry must be a bare file name: a manifest must not point outside its directory.
fn safe_file_name<'a>(manifest_path: &Path, name: &'a str) -> Result<&'a str> {
    let bare = !name.is_empty() && Path::new(name).file_name().is_some_and(|n| n == name) && name != "..";
    if bare {
        Ok(name)
    } else {
        Err(Error::data(manifest_path, format!("file entry `{name}` is not a plain file name")))
    }
}

fn check_sha(path: &Path, bytes: &[u8], expected: &str) -> Result<()> {
    let actual = hex(&Sha256::digest(bytes));
    if actual != expected {
        return Err(Error::data(
            path,
            format!("sha256 mismatch: manifest says {expected}, file has {actual} (corrupted or modified?)\nHINT: prepare the dataset again"),
        ));
    }
    Ok(())
}

/// One split of a dataset as a single sequence of tokens, spread over memory-mapped shards.
/// Cheap to clone (shares the mappings), so samplers can own one.
#[derive(Clone)]
pub struct TokenSplit {
    inner: Arc<SplitInner>,
}

struct SplitInner {
    name: &'static str,
    dtype: TokenDtype,
    shards: Vec<Mmap>,
    /// `starts[i]` = index of the first token of shard `i`; one extra entry holds the total.
    starts: Vec<u64>,
}

impl TokenSplit {
    fn open(
        dir: &Path,
        manifest_path: &Path,
        name: &'static str,
        info: &SplitInfo,
        dtype: TokenDtype,
        verify: Verify,
    ) -> Result<Self> {
        let mut shards = Vec::with_capacity(info.shards.len());
        let mut starts = vec![0u64];
        for shard in &info.shards {
            let path = dir.join(safe_file_name(manifest_path, &shard.file)?);
            if shard.tokens == 0 {
                return Err(Error::data(manifest_path, format!("shard `{}` lists 0 tokens", shard.file)));
            }
            let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
            let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
            let expected = shard.tokens.checked_mul(dtype.bytes() as u64);
            if expected != Some(len) {
                return Err(Error::data(
                    &path,
                    format!(
                        "size is {len} bytes, expected {} tokens × {} bytes (truncated or from another dataset?)",
                        shard.tokens,
                        dtype.bytes()
                    ),
                ));
            }
            // SAFETY: read-only mapping of a file the dataset owns. If another process truncates
            // it while mapped, reads may fault (SIGBUS); modifying a prepared dataset in place is
            // not supported, and sizes and checksums were verified at open.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
            if verify == Verify::Checksums {
                check_sha(&path, &map, &shard.sha256)?;
            }
            shards.push(map);
            starts.push(starts[starts.len() - 1] + shard.tokens);
        }
        let total = starts[starts.len() - 1];
        if total != info.tokens {
            return Err(Error::data(
                manifest_path,
                format!("{name} split lists {} tokens but its shards hold {total}", info.tokens),
            ));
        }
        Ok(TokenSplit { inner: Arc::new(SplitInner { name, dtype, shards, starts }) })
    }

    /// `"train"` or `"val"`, for messages.
    pub fn name(&self) -> &'static str {
        self.inner.name
    }

    /// Number of tokens.
    pub fn len(&self) -> u64 {
        self.inner.starts[self.inner.starts.len() - 1]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens `start .. start + len`, read across shard boundaries as one sequence.
    pub fn window(&self, start: u64, len: usize) -> Result<Vec<u32>> {
        let mut out = vec![0u32; len];
        self.read_into(start, &mut out)?;
        Ok(out)
    }

    /// Fill `out` with tokens `start .. start + out.len()`.
    pub fn read_into(&self, start: u64, out: &mut [u32]) -> Result<()> {
        let end = start.checked_add(out.len() as u64);
        if end.is_none_or(|end| end > self.len()) {
            return Err(Error::Input(format!(
                "token window {start}..{start}+{} is outside the {} split ({} tokens)",
                out.len(),
                self.name(),
                self.len()
            )));
        }
        let inner = &*self.inner;
        let width = inner.dtype.bytes();
        // Last shard starting at or before `start`.
        let mut shard = inner.starts.partition_point(|&s| s <= start) - 1;
        let mut pos = start;
        let mut filled = 0;
        while filled < out.len() {
            let local = (pos - inner.starts[shard]) as usize;
            let available = (inner.starts[shard + 1] - pos) as usize;
            let n = available.min(out.len() - filled);
            let bytes = &inner.shards[shard][local * width..(local + n) * width];
            let dst = &mut out[filled..filled + n];
            match inner.dtype {
                TokenDtype::U16 => {
                    for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(2)) {
                        *d = u16::from_le_bytes([b[0], b[1]]) as u32;
                    }
                }
                TokenDtype::U32 => {
                    for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
                        *d = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    }
                }
            }
            filled += n;
            pos += n as u64;
            shard += 1;
        }
        Ok(())
    }
}
