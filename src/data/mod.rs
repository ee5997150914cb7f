//! Training data: from text files to batches of token windows.
//!
//! ```text
//! *.txt ──train_bpe──▶ tokenizer.json
//! *.txt + tokenizer.json ──prepare──▶ dataset dir (manifest.json, tokenizer.json, *.bin shards)
//! dataset dir ──TokenDataset::open──▶ TokenSplit (mmap) ──Sampler──▶ Batch (B, T) inputs/targets
//! ```
//!
//! Tokenizing is done once, ahead of training, so a training step only copies tokens out of a
//! memory map; the sampler's position is a small [`SamplerState`] a checkpoint stores, so a
//! resumed run sees exactly the batches the uninterrupted run would have.
//!
//! ```no_run
//! use lmforge::data::*;
//! # fn main() -> lmforge::Result<()> {
//! let train = vec!["data/austen/prideprejudice.txt".into(), "data/austen/sensesensibility.txt".into()];
//! let tokenizer = train_bpe(&train, 2048, &[END_OF_TEXT.to_string()], 2)?;
//! save_tokenizer(&tokenizer, "runs/tokenizer.json".as_ref())?;
//!
//! let mut config = PrepareConfig::new("runs/tokenizer.json", train, "runs/austen-data");
//! config.val = ValSplit::Files(vec!["data/austen/persuasion.txt".into()]);
//! prepare(&config)?;
//!
//! let dataset = TokenDataset::open("runs/austen-data".as_ref())?;
//! check_vocab(&dataset, 2048)?;
//! let mut sampler = Sampler::new(dataset.train().clone(), 256, true, SamplerState::start(1337))?;
//! let batch = sampler.next_batch(8)?; // inputs, targets: (8, 256)
//! let saved = sampler.state(); // goes into the checkpoint
//! for val_batch in SequentialBatches::new(dataset.val().clone(), 256, 8)? {
//!     let (x, y) = val_batch?.to_tensors(&candle_core::Device::Cpu)?;
//! }
//! # let _ = (batch, saved);
//! # Ok(())
//! # }
//! ```

pub mod bpe;
pub mod dataset;
pub mod manifest;
pub mod parallel;
mod permutation;
pub mod sampler;
pub mod shards;
pub mod text;

#[cfg(test)]
mod tests;

pub use bpe::{save_tokenizer, train_bpe, train_bpe_on_texts, END_OF_TEXT};
pub use dataset::{check_vocab, Split, TokenDataset, TokenSplit, Verify};
pub use manifest::{Manifest, TokenDtype};
pub use sampler::{Batch, Sampler, SamplerState, SequentialBatches};
pub use shards::{prepare, PrepareConfig, ValSplit, DEFAULT_SHARD_TOKENS};
