//! Which training windows a step sees, deterministically from a seed, resumable from a
//! checkpoint.
//!
//! A split of `N` tokens is cut into `W` non-overlapping windows of `seq_len + 1` tokens
//! (inputs are the first `seq_len`, targets the last `seq_len`: the same tokens shifted by one).
//! Window `w` starts at `offset + w * seq_len`, so consecutive windows share one token, the
//! target of the last position. Each epoch visits all `W` windows once, in the order of a
//! seeded permutation for that epoch (a Feistel network, see `permutation.rs`: computed, not
//! stored); the next epoch uses a new permutation (and, with `random_offset`, a new `offset` in
//! `0..seq_len`, so window boundaries move between epochs).
//!
//! ```text
//! N = 10, seq_len = 3, no offset: W = (10 - 1) / 3 = 3
//! tokens   t0 t1 t2 t3 t4 t5 t6 t7 t8 t9
//! window 0 [t0 t1 t2 t3]
//! window 1          [t3 t4 t5 t6]
//! window 2                   [t6 t7 t8 t9]
//! ```
//!
//! The whole position is a [`SamplerState`] (seed, epoch, index in epoch): nothing else needs
//! saving, and `skip` is O(1) arithmetic.

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::dataset::TokenSplit;
use super::permutation::{mix, Permutation};
use crate::error::{Error, Result};

/// Everything needed to continue sampling exactly where a run left off. Store it in the
/// checkpoint; pass it back to [`Sampler::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    pub seed: u64,
    pub epoch: u64,
    /// Windows of this epoch already handed out.
    pub index_in_epoch: u64,
    /// What the position counts in: the window length and the size of the split in tokens,
    /// filled in by the sampler. Resuming with another sequence length or other data would
    /// silently point the position at different windows, so [`Sampler::new`] refuses it.
    /// 0 = not yet recorded (a fresh state).
    #[serde(default)]
    pub seq_len: u64,
    #[serde(default)]
    pub split_tokens: u64,
}

impl SamplerState {
    /// The state before the first batch of a run seeded with `seed`.
    pub fn start(seed: u64) -> Self {
        SamplerState { seed, epoch: 0, index_in_epoch: 0, seq_len: 0, split_tokens: 0 }
    }
}

/// One batch: row-major `(batch, seq_len)` token ids; `targets[b][t] = inputs[b][t + 1]`
/// within the window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub batch_size: usize,
    pub seq_len: usize,
}

impl Batch {
    /// `(inputs, targets)` as u32 tensors of shape `(B, T)`.
    pub fn to_tensors(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        let shape = (self.batch_size, self.seq_len);
        Ok((Tensor::from_slice(&self.inputs, shape, device)?, Tensor::from_slice(&self.targets, shape, device)?))
    }

    fn from_windows(windows: &[u32], batch_size: usize, seq_len: usize) -> Self {
        let mut inputs = Vec::with_capacity(batch_size * seq_len);
        let mut targets = Vec::with_capacity(batch_size * seq_len);
        for w in windows.chunks_exact(seq_len + 1) {
            inputs.extend_from_slice(&w[..seq_len]);
            targets.extend_from_slice(&w[1..]);
        }
        Batch { inputs, targets, batch_size, seq_len }
    }
}

/// Seeded, epoch-aware sampler of training windows from one split.
pub struct Sampler {
    split: TokenSplit,
    seq_len: usize,
    random_offset: bool,
    windows: u64,
    state: SamplerState,
    /// Permutation and offset of `state.epoch`, rebuilt when the epoch changes.
    perm: Permutation,
    offset: u64,
}

impl Sampler {
    /// A sampler over `split` positioned at `state` (use [`SamplerState::start`] for a new run).
    ///
    /// With `random_offset`, one window's worth of tokens is set aside so the windows can shift
    /// by a per-epoch offset: `W = (N - seq_len) / seq_len` instead of `(N - 1) / seq_len`.
    pub fn new(split: TokenSplit, seq_len: usize, random_offset: bool, state: SamplerState) -> Result<Self> {
        if seq_len == 0 {
            return Err(Error::Input("sequence length must be at least 1".into()));
        }
        let n = split.len();
        let t = seq_len as u64;
        let windows = if random_offset { n.saturating_sub(t) / t } else { n.saturating_sub(1) / t };
        if windows == 0 {
            let need = if random_offset { 2 * t } else { t + 1 };
            return Err(Error::Input(format!(
                "the {} split has {n} tokens, too few for one window of seq_len {seq_len} (needs {need}{})\nHINT: use a shorter sequence length or more data",
                split.name(),
                if random_offset { " with random_offset" } else { "" }
            )));
        }
        let recorded = |value: u64, now: u64| value == 0 || value == now;
        if !recorded(state.seq_len, t) {
            return Err(Error::Input(format!(
                "the sampler state was saved with seq_len {}, but this run uses {seq_len}\nHINT: resume with the sequence length the checkpoint was trained with, or start a new run with --init-from",
                state.seq_len
            )));
        }
        if !recorded(state.split_tokens, n) {
            return Err(Error::Input(format!(
                "the sampler state was saved over a {} split of {} tokens, but this one has {n}\nHINT: resume with the data the checkpoint was trained on, or start a new run with --init-from",
                split.name(),
                state.split_tokens
            )));
        }
        let state = SamplerState { seq_len: t, split_tokens: n, ..state };
        if state.index_in_epoch >= windows {
            return Err(Error::Input(format!(
                "sampler state is at window {} of an epoch, but the {} split has only {windows} windows of seq_len {seq_len}\nHINT: resume with the dataset and sequence length the checkpoint was trained with",
                state.index_in_epoch,
                split.name()
            )));
        }
        let mut sampler = Sampler {
            split,
            seq_len,
            random_offset,
            windows,
            state,
            perm: Permutation::new(windows, state.seed, state.epoch),
            offset: 0,
        };
        sampler.offset = sampler.epoch_offset(state.epoch);
        Ok(sampler)
    }

    /// Windows per epoch (`W`).
    pub fn windows_per_epoch(&self) -> u64 {
        self.windows
    }

    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// The position to save: continuing from it reproduces every later batch exactly.
    pub fn state(&self) -> SamplerState {
        self.state
    }

    /// Start token of the next window, advancing the position (into the next epoch if needed).
    pub fn next_window_start(&mut self) -> u64 {
        let w = self.perm.apply(self.state.index_in_epoch);
        let start = self.offset + w * self.seq_len as u64;
        self.state.index_in_epoch += 1;
        if self.state.index_in_epoch == self.windows {
            self.set_epoch(self.state.epoch + 1, 0);
        }
        start
    }

    /// The next `batch_size` windows as a batch (a batch may span two epochs).
    pub fn next_batch(&mut self, batch_size: usize) -> Result<Batch> {
        let width = self.seq_len + 1;
        let mut windows = vec![0u32; batch_size * width];
        for row in windows.chunks_exact_mut(width) {
            let start = self.next_window_start();
            self.split.read_into(start, row)?;
        }
        Ok(Batch::from_windows(&windows, batch_size, self.seq_len))
    }

    /// Skip `batches` batches of `batch_size` without reading them (e.g. after a rollback,
    /// to step past the data that made training diverge).
    pub fn skip(&mut self, batches: u64, batch_size: usize) {
        let total = self.state.index_in_epoch as u128 + batches as u128 * batch_size as u128;
        let epochs = (total / self.windows as u128) as u64;
        let index = (total % self.windows as u128) as u64;
        if epochs == 0 {
            self.state.index_in_epoch = index;
        } else {
            self.set_epoch(self.state.epoch + epochs, index);
        }
    }

    fn set_epoch(&mut self, epoch: u64, index: u64) {
        self.state.epoch = epoch;
        self.state.index_in_epoch = index;
        self.perm = Permutation::new(self.windows, self.state.seed, epoch);
        self.offset = self.epoch_offset(epoch);
    }

    fn epoch_offset(&self, epoch: u64) -> u64 {
        if self.random_offset {
            // A different stream from the permutation's, so offset and order are independent.
            mix(mix(self.state.seed ^ 0x0FF5_E70F_F5E7_0FF5) ^ epoch) % self.seq_len as u64
        } else {
            0
        }
    }
}

/// A fixed, ordered pass over a split (validation): windows `0, seq_len, 2·seq_len, …` in
/// order, no shuffling, so every evaluation of every run scores the same tokens. The last
/// batch may be smaller than `batch_size`.
pub struct SequentialBatches {
    split: TokenSplit,
    seq_len: usize,
    batch_size: usize,
    windows: u64,
    next: u64,
}

impl SequentialBatches {
    pub fn new(split: TokenSplit, seq_len: usize, batch_size: usize) -> Result<Self> {
        if seq_len == 0 || batch_size == 0 {
            return Err(Error::Input("sequence length and batch size must be at least 1".into()));
        }
        let n = split.len();
        let windows = n.saturating_sub(1) / seq_len as u64;
        if windows == 0 {
            return Err(Error::Input(format!(
                "the {} split has {n} tokens, too few for one window of seq_len {seq_len} (needs {})\nHINT: use a shorter sequence length or a larger validation split",
                split.name(),
                seq_len + 1
            )));
        }
        Ok(SequentialBatches { split, seq_len, batch_size, windows, next: 0 })
    }

    /// Windows in one pass.
    pub fn windows(&self) -> u64 {
        self.windows
    }

    /// Batches in one pass (the last one possibly partial).
    pub fn batches(&self) -> u64 {
        self.windows.div_ceil(self.batch_size as u64)
    }
}

impl Iterator for SequentialBatches {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.next >= self.windows {
            return None;
        }
        let rows = (self.windows - self.next).min(self.batch_size as u64) as usize;
        let width = self.seq_len + 1;
        let mut windows = vec![0u32; rows * width];
        for (i, row) in windows.chunks_exact_mut(width).enumerate() {
            if let Err(e) = self.split.read_into((self.next + i as u64) * self.seq_len as u64, row) {
                self.next = self.windows;
                return Some(Err(e));
            }
        }
        self.next += rows as u64;
        Some(Ok(Batch::from_windows(&windows, rows, self.seq_len)))
    }
}
