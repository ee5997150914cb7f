//! `manifest.json`: the description of a prepared token dataset, written last by
//! [`prepare`](super::prepare) and checked first by [`TokenDataset::open`](super::TokenDataset::open).
//!
//! A dataset directory holds:
//!
//! ```text
//! manifest.json        this file
//! tokenizer.json       a copy of the tokenizer the tokens came from
//! train-000000.bin     token shards: raw little-endian u16 or u32, no header
//! train-000001.bin     (the manifest carries what a header would: dtype, counts, checksums)
//! val-000000.bin
//! ```

use serde::{Deserialize, Serialize};

/// Identifies the directory as an lmforge token dataset (and not, say, a checkpoint).
pub const MAGIC: &str = "lmforge-tokens";
/// Bumped on any change a reader of the previous version would misread.
pub const VERSION: u32 = 1;
pub const MANIFEST_FILE: &str = "manifest.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Storage type of the shards: the smallest that holds every token id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenDtype {
    U16,
    U32,
}

impl TokenDtype {
    /// `u16` when every id fits (vocab ≤ 65,536), halving disk and page-cache use.
    pub fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size <= 1 << 16 {
            TokenDtype::U16
        } else {
            TokenDtype::U32
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            TokenDtype::U16 => 2,
            TokenDtype::U32 => 4,
        }
    }

    /// Largest vocabulary this dtype can store.
    pub fn max_vocab(self) -> u64 {
        match self {
            TokenDtype::U16 => 1 << 16,
            TokenDtype::U32 => 1 << 32,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub magic: String,
    pub version: u32,
    pub dtype: TokenDtype,
    pub tokenizer: TokenizerInfo,
    pub train: SplitInfo,
    pub val: SplitInfo,
    /// Where the tokens came from, for provenance; not needed to read the dataset.
    pub sources: Vec<SourceInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenizerInfo {
    /// File name inside the dataset directory.
    pub file: String,
    /// sha256 of that file, so a dataset cannot silently be paired with another tokenizer.
    pub sha256: String,
    /// One past the largest token id (added tokens included): the smallest model vocabulary
    /// that can embed every token of the dataset.
    pub vocab_size: usize,
    pub eot_token: String,
    pub eot_id: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitInfo {
    pub tokens: u64,
    pub shards: Vec<ShardInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// File name inside the dataset directory (never a path).
    pub file: String,
    pub tokens: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// The input path as given to `prepare`.
    pub path: String,
    pub bytes: u64,
    /// Tokens this file contributed to each split, end-of-text tokens included.
    pub train_tokens: u64,
    pub val_tokens: u64,
}

/// Lowercase hex of a sha256 digest.
pub(crate) fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}
