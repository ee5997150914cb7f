//! Batches of token pairs: bucketed by length, packed to a token budget, visited in a seeded
//! order, and resumable from a state of a few integers.
//!
//! ```text
//! every epoch:  order   = pairs sorted by length (the longer side); pairs of equal length in
//!                         an order drawn from (seed, epoch)
//!               batches = consecutive runs of `order`, each as many rows as fit
//!                         rows × longest ≤ batch_tokens
//!               visit the batches in the order of a seeded permutation for (seed, epoch)
//!
//! lengths 3 7 4 4 9, batch_tokens 12:  sorted 3 4 4 | 7 | 9   (3 × 4 = 12 fits; 2 × 7 = 14 does not)
//! ```
//!
//! Sorting by length keeps padding small: a batch's rows differ by a token or two, where random
//! batches of Bible verses (5 to 110 tokens) would be mostly padding. Packing to a budget rather
//! than a row count gives every step about the same work, as in Vaswani et al. (batches of
//! ~25,000 source and ~25,000 target tokens) and fairseq's `--max-tokens`.
//!
//! The sorted *lengths* are the same every epoch, so every epoch has the same batch shapes;
//! what changes is which pairs of equal length share a batch and the order the batches come
//! in. The whole position is a [`PairSamplerState`] (seed, epoch, batches handed out this
//! epoch): resuming rebuilds the epoch's order and continues with the next batch, exactly.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::pairs::TokenPairs;
use crate::data::permutation::{mix, Permutation};
use crate::error::{Error, Result};

/// Salts that give the per-epoch tie order and the batch order independent streams of a seed.
const TIE_STREAM: u64 = 0x7E5E_ED5A_17ED_0001;
const BATCH_STREAM: u64 = 0xBA7C_4E50_4DE4_0002;

/// Everything needed to continue batching exactly where a run left off; a checkpoint stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairSamplerState {
    pub seed: u64,
    pub epoch: u64,
    /// Batches of this epoch already handed out.
    pub index_in_epoch: u64,
    /// What the position counts in: the number of pairs, their tokens and the batch budget,
    /// filled in by the sampler (0 = a fresh state). Resuming over other data or with another
    /// budget would silently point the position at other batches, so [`PairSampler::new`]
    /// refuses it.
    #[serde(default)]
    pub pairs: u64,
    #[serde(default)]
    pub tokens: u64,
    #[serde(default)]
    pub batch_tokens: u64,
}

impl PairSamplerState {
    /// The state before the first batch of a run seeded with `seed`.
    pub fn start(seed: u64) -> Self {
        PairSamplerState { seed, epoch: 0, index_in_epoch: 0, pairs: 0, tokens: 0, batch_tokens: 0 }
    }
}

/// One batch of pairs, right-padded with `<pad>`. Row-major `(B, S)` and `(B, T)` ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairBatch {
    pub rows: usize,
    /// `S`: the longest source of the batch, `</s>` included.
    pub source_len: usize,
    /// `T`: the longest target of the batch + 1.
    pub target_len: usize,
    /// `(B, S)`: source tokens + `</s>`, then `<pad>`.
    pub source: Vec<u32>,
    /// `(B)`: real source positions of each row.
    pub source_lengths: Vec<u32>,
    /// `(B, T)`: `<s>` + target, then `<pad>`.
    pub decoder_input: Vec<u32>,
    /// `(B, T)`: target + `</s>`, then `<pad>` (the loss's `ignore_index`).
    pub decoder_target: Vec<u32>,
    /// `(B)`: real decoder positions of each row (target + 1).
    pub target_lengths: Vec<u32>,
    /// `(B)`: corpus line of each row.
    pub lines: Vec<usize>,
    /// The `<pad>` id, which fills the padding and marks targets the loss skips.
    pub pad: u32,
}

/// A [`PairBatch`] as tensors.
#[derive(Debug, Clone)]
pub struct PairTensors {
    /// `(B, S)` u32.
    pub source: Tensor,
    /// `(B, S)` u8: 1 for a token, 0 for padding. The encoder's self-attention and the decoder's
    /// cross-attention must not attend to padded keys. (The decoder's own padding needs no
    /// mask: it sits after the real tokens, which causal attention never lets them see, and its
    /// labels are `<pad>`, which the loss ignores.)
    pub source_mask: Tensor,
    /// `(B, T)` u32.
    pub decoder_input: Tensor,
    /// `(B, T)` u32.
    pub decoder_target: Tensor,
}

impl PairBatch {
    /// The batch of `pairs.pairs[members]`, in that row order.
    fn build(pairs: &TokenPairs, members: &[u32]) -> Self {
        let specials = pairs.specials;
        let rows = members.len();
        let pair = |i: u32| &pairs.pairs[i as usize];
        let source_len = members.iter().map(|&i| pair(i).source_len()).max().unwrap_or(0);
        let target_len = members.iter().map(|&i| pair(i).target_len()).max().unwrap_or(0);
        let mut batch = PairBatch {
            rows,
            source_len,
            target_len,
            source: vec![specials.pad; rows * source_len],
            source_lengths: Vec::with_capacity(rows),
            decoder_input: vec![specials.pad; rows * target_len],
            decoder_target: vec![specials.pad; rows * target_len],
            target_lengths: Vec::with_capacity(rows),
            lines: Vec::with_capacity(rows),
            pad: specials.pad,
        };
        for (row, &i) in members.iter().enumerate() {
            let p = pair(i);
            let n = p.target.len();
            batch.source[row * source_len..][..p.source.len()].copy_from_slice(&p.source);
            let input = &mut batch.decoder_input[row * target_len..][..n + 1];
            input[0] = specials.start;
            input[1..].copy_from_slice(&p.target);
            let target = &mut batch.decoder_target[row * target_len..][..n + 1];
            target[..n].copy_from_slice(&p.target);
            target[n] = specials.eos;
            batch.source_lengths.push(p.source_len() as u32);
            batch.target_lengths.push(p.target_len() as u32);
            batch.lines.push(p.line);
        }
        batch
    }

    /// Decoder positions that carry a label: what the loss averages over.
    pub fn target_tokens(&self) -> usize {
        self.target_lengths.iter().map(|&n| n as usize).sum()
    }

    /// Source positions that are not padding.
    pub fn source_tokens(&self) -> usize {
        self.source_lengths.iter().map(|&n| n as usize).sum()
    }

    pub fn to_tensors(&self, device: &Device) -> Result<PairTensors> {
        let (b, s, t) = (self.rows, self.source_len, self.target_len);
        Ok(PairTensors {
            source: Tensor::from_slice(&self.source, (b, s), device)?,
            source_mask: padding_mask(&self.source_lengths, s, device)?,
            decoder_input: Tensor::from_slice(&self.decoder_input, (b, t), device)?,
            decoder_target: Tensor::from_slice(&self.decoder_target, (b, t), device)?,
        })
    }
}

/// `(B, width)` u8 mask with `mask[b][j] = 1` for `j < lengths[b]` and 0 after (right padding).
pub fn padding_mask(lengths: &[u32], width: usize, device: &Device) -> Result<Tensor> {
    let mut mask = vec![0u8; lengths.len() * width];
    for (row, &n) in mask.chunks_exact_mut(width.max(1)).zip(lengths) {
        row[..(n as usize).min(width)].fill(1);
    }
    Ok(Tensor::from_vec(mask, (lengths.len(), width), device)?)
}

/// Seeded, epoch-aware batches of the training pairs.
pub struct PairSampler {
    pairs: Arc<TokenPairs>,
    batch_tokens: usize,
    state: PairSamplerState,
    /// Pair indices of `state.epoch` in length order; batches are ranges of it.
    order: Vec<u32>,
    /// The same for every epoch (see the module docs).
    batches: Vec<Range<usize>>,
    /// Order of the batches in `state.epoch`.
    perm: Permutation,
}

impl PairSampler {
    /// A sampler over `pairs` positioned at `state` (use [`PairSamplerState::start`] for a new
    /// run), with at most `batch_tokens` tokens of either side per batch, padding included.
    pub fn new(pairs: Arc<TokenPairs>, batch_tokens: usize, state: PairSamplerState) -> Result<Self> {
        check_budget(&pairs, batch_tokens)?;
        let (n, tokens) = (pairs.pairs.len() as u64, pairs.tokens());
        let refuse = |what: &str, saved: u64, now: u64| {
            Error::Input(format!(
                "the batch position was saved over {what} {saved}, but this run has {now}\nHINT: resume with the data, tokenizer and data.parallel.batch_tokens the checkpoint was trained with, or start a new run"
            ))
        };
        for (what, saved, now) in [
            ("pairs: ", state.pairs, n),
            ("tokens: ", state.tokens, tokens),
            ("batch_tokens =", state.batch_tokens, batch_tokens as u64),
        ] {
            if saved != 0 && saved != now {
                return Err(refuse(what, saved, now));
            }
        }
        let state = PairSamplerState { pairs: n, tokens, batch_tokens: batch_tokens as u64, ..state };
        let order = epoch_order(&pairs, state.seed, state.epoch);
        let batches = pack(&pairs, &order, batch_tokens);
        if state.index_in_epoch >= batches.len() as u64 {
            return Err(Error::Input(format!(
                "the batch position is at batch {} of an epoch, but the data has only {} batches\nHINT: resume with the data and batch_tokens the checkpoint was trained with",
                state.index_in_epoch,
                batches.len()
            )));
        }
        let perm = Permutation::new(batches.len() as u64, state.seed ^ BATCH_STREAM, state.epoch);
        Ok(PairSampler { pairs, batch_tokens, state, order, batches, perm })
    }

    /// Batches per epoch.
    pub fn batches_per_epoch(&self) -> u64 {
        self.batches.len() as u64
    }

    pub fn batch_tokens(&self) -> usize {
        self.batch_tokens
    }

    /// The position to save: continuing from it reproduces every later batch exactly.
    pub fn state(&self) -> PairSamplerState {
        self.state
    }

    /// The next batch, advancing the position (into the next epoch after the last one).
    pub fn next_batch(&mut self) -> PairBatch {
        let range = self.batches[self.perm.apply(self.state.index_in_epoch) as usize].clone();
        let batch = PairBatch::build(&self.pairs, &self.order[range]);
        self.state.index_in_epoch += 1;
        if self.state.index_in_epoch == self.batches_per_epoch() {
            self.set_epoch(self.state.epoch + 1, 0);
        }
        batch
    }

    /// Skip `batches` batches without building them (e.g. past the batch that made a run
    /// diverge).
    pub fn skip(&mut self, batches: u64) {
        let per_epoch = self.batches_per_epoch() as u128;
        let total = self.state.index_in_epoch as u128 + batches as u128;
        let (epochs, index) = ((total / per_epoch) as u64, (total % per_epoch) as u64);
        if epochs == 0 {
            self.state.index_in_epoch = index;
        } else {
            self.set_epoch(self.state.epoch + epochs, index);
        }
    }

    fn set_epoch(&mut self, epoch: u64, index: u64) {
        self.state.epoch = epoch;
        self.state.index_in_epoch = index;
        self.order = epoch_order(&self.pairs, self.state.seed, epoch);
        self.perm = Permutation::new(self.batches.len() as u64, self.state.seed ^ BATCH_STREAM, epoch);
    }
}

/// A fixed pass over a split in length order (validation): every pair once, the same batches
/// every time, so every evaluation of every run scores the same thing.
pub struct SequentialPairBatches {
    pairs: Arc<TokenPairs>,
    order: Vec<u32>,
    batches: Vec<Range<usize>>,
    next: usize,
}

impl SequentialPairBatches {
    pub fn new(pairs: Arc<TokenPairs>, batch_tokens: usize) -> Result<Self> {
        check_budget(&pairs, batch_tokens)?;
        let mut order: Vec<u32> = (0..pairs.pairs.len() as u32).collect();
        order.sort_by_key(|&i| pairs.pairs[i as usize].len());
        let batches = pack(&pairs, &order, batch_tokens);
        Ok(SequentialPairBatches { pairs, order, batches, next: 0 })
    }

    /// Batches in one pass.
    pub fn batches(&self) -> usize {
        self.batches.len()
    }
}

impl Iterator for SequentialPairBatches {
    type Item = PairBatch;

    fn next(&mut self) -> Option<PairBatch> {
        let range = self.batches.get(self.next)?.clone();
        self.next += 1;
        Some(PairBatch::build(&self.pairs, &self.order[range]))
    }
}

/// Pairs and a budget that every pair fits in on its own.
fn check_budget(pairs: &TokenPairs, batch_tokens: usize) -> Result<()> {
    if pairs.pairs.is_empty() {
        return Err(Error::data(&pairs.path, "no pairs to batch (the split is empty)"));
    }
    if let Some(p) = pairs.pairs.iter().find(|p| p.len() > batch_tokens) {
        let longest = pairs.pairs.iter().map(|p| p.len()).max().unwrap_or(0);
        return Err(Error::data(
            &pairs.path,
            format!(
                "line {}: the pair takes {} positions on its longer side, more than a whole batch's budget of {batch_tokens} tokens\nHINT: raise data.parallel.batch_tokens (--batch-tokens) to at least {longest}, the longest pair",
                p.line,
                p.len()
            ),
        ));
    }
    Ok(())
}

/// Pair indices sorted by length, pairs of equal length in an order drawn from (seed, epoch).
fn epoch_order(pairs: &TokenPairs, seed: u64, epoch: u64) -> Vec<u32> {
    let salt = mix(seed ^ TIE_STREAM ^ mix(epoch));
    let mut order: Vec<u32> = (0..pairs.pairs.len() as u32).collect();
    order.sort_unstable_by_key(|&i| (pairs.pairs[i as usize].len(), mix(salt ^ i as u64), i));
    order
}

/// Cut `order` (ascending length) into consecutive batches with rows × longest ≤ `batch_tokens`.
/// Every pair fits alone ([`check_budget`]), so no batch is empty or over budget.
fn pack(pairs: &TokenPairs, order: &[u32], batch_tokens: usize) -> Vec<Range<usize>> {
    let mut batches = Vec::new();
    let mut start = 0;
    for (i, &p) in order.iter().enumerate() {
        // Ascending order: this pair is the longest of the batch it would join.
        let rows = i + 1 - start;
        if rows > 1 && rows * pairs.pairs[p as usize].len() > batch_tokens {
            batches.push(start..i);
            start = i;
        }
    }
    if start < order.len() {
        batches.push(start..order.len());
    }
    batches
}
