//! What a run learns from, behind one interface for the training loop: next-token prediction
//! over windows of a token dataset (decoder-only), or translation over aligned token pairs
//! (encoder–decoder).
//!
//! The loop asks a [`Task`] for the next step's loss, for the validation loss and for its
//! batch position; everything else (optimizer, schedule, RNG, checkpoints, resume, rollback,
//! restarts) is the same for both. The position is stored in the checkpoint as the sampler's
//! own JSON (`state.json`'s `sampler`), so a resumed or rolled-back run continues with exactly
//! the batch it would have seen.
//!
//! | | language model | translation |
//! |---|---|---|
//! | batch | `batch_size` windows of `seq_len` tokens | pairs up to `batch_tokens` per side, by length |
//! | training loss | next-token cross-entropy (+ router losses) | target cross-entropy, label-smoothed |
//! | validation loss | cross-entropy over the validation split | *unsmoothed* cross-entropy over the validation books |
//! | tokens per step (`tok/s`) | `batch_size · seq_len · grad_accum` | real target tokens (`</s>` included, padding not) |

use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde_json::Value;

use super::expert_load::ExpertLoad;
use crate::data::parallel::{PairBatch, PairSampler, PairSamplerState, SequentialPairBatches, TokenPairs};
use crate::data::{Sampler, SamplerState, SequentialBatches, TokenDataset};
use crate::distributed::Shard;
use crate::error::{Error, Result};
use crate::model::{Model, Seq2SeqBatch, TrainingLoss};

/// The data of a prepared run.
pub enum TrainData {
    /// A prepared token dataset, cut into windows.
    Text(Box<TokenDataset>),
    /// Aligned token pairs of the training and validation books.
    Pairs(PairData),
}

/// Parallel data as training consumes it.
pub struct PairData {
    pub train: Arc<TokenPairs>,
    pub val: Arc<TokenPairs>,
    /// Most tokens of either side per batch, padding included.
    pub batch_tokens: usize,
    /// ε of the training loss; validation is always unsmoothed.
    pub label_smoothing: f64,
}

/// How batches are made, fixed for the run.
#[derive(Debug, Clone, Copy)]
pub struct BatchShape {
    pub batch_size: usize,
    pub seq_len: usize,
}

/// A run's data with its live batch position.
pub enum Task {
    /// `shard`: the rows of every global batch this process trains on (data parallelism).
    Language {
        dataset: Box<TokenDataset>,
        sampler: Sampler,
        shape: BatchShape,
        shard: Shard,
    },
    Translation {
        data: PairData,
        sampler: PairSampler,
    },
}

impl Task {
    /// The task over `data`, positioned at `position` (a saved [`Task::position`]) or at the
    /// start of a run seeded with `seed`.
    pub fn new(data: TrainData, shape: BatchShape, seed: u64, position: Option<&Value>) -> Result<Self> {
        Ok(match data {
            TrainData::Text(dataset) => {
                let state = match position {
                    Some(p) => parse_position::<SamplerState>(p)?,
                    None => SamplerState::start(seed),
                };
                let sampler = Sampler::new(dataset.train().clone(), shape.seq_len, true, state)?;
                Task::Language { dataset, sampler, shape, shard: Shard::WHOLE }
            }
            TrainData::Pairs(data) => {
                let state = match position {
                    Some(p) => parse_position::<PairSamplerState>(p)?,
                    None => PairSamplerState::start(seed),
                };
                let sampler = PairSampler::new(data.train.clone(), data.batch_tokens, state)?;
                Task::Translation { data, sampler }
            }
        })
    }

    /// Train on `shard`'s slice of every global batch from now on. The position stays that of
    /// the global batch, the same on every rank and for any number of ranks.
    pub fn set_shard(&mut self, new: Shard) -> Result<()> {
        match self {
            Task::Language { shape, shard, .. } => {
                new.rows(shape.batch_size)?;
                *shard = new;
                Ok(())
            }
            Task::Translation { .. } if new.ranks == 1 => Ok(()),
            Task::Translation { .. } => Err(Error::Unsupported(
                "data-parallel training of an encoder–decoder on parallel data (its batches are cut by token count, not rows)\nHINT: train it in one process".into(),
            )),
        }
    }

    /// Move the batch position back to a saved one (rollback).
    pub fn restore(&mut self, position: &Value) -> Result<()> {
        match self {
            Task::Language { dataset, sampler, shape, .. } => {
                *sampler = Sampler::new(dataset.train().clone(), shape.seq_len, true, parse_position(position)?)?;
            }
            Task::Translation { data, sampler } => {
                *sampler = PairSampler::new(data.train.clone(), data.batch_tokens, parse_position(position)?)?;
            }
        }
        Ok(())
    }

    /// The batch position, as the checkpoint stores it.
    pub fn position(&self) -> Value {
        match self {
            Task::Language { sampler, .. } => serde_json::to_value(sampler.state()),
            Task::Translation { sampler, .. } => serde_json::to_value(sampler.state()),
        }
        .expect("sampler state serialises")
    }

    /// One line for the start of the log: what the run trains on.
    pub fn describe(&self) -> String {
        match self {
            Task::Language { dataset, shape, .. } => format!(
                "{} tokens, batches of {} windows of {} tokens",
                dataset.train().len(),
                shape.batch_size,
                shape.seq_len
            ),
            Task::Translation { data, sampler } => format!(
                "{} pairs ({} tokens), {} batches of at most {} tokens per side an epoch, label smoothing {}; tok/s counts target tokens",
                data.train.pairs.len(),
                data.train.tokens(),
                sampler.batches_per_epoch(),
                data.batch_tokens,
                data.label_smoothing
            ),
        }
    }

    /// The training loss of the next batch whose position is not in `skip`, with the tokens
    /// it counts (windows: every input token; pairs: the real target tokens). `rng` drives
    /// dropout and router jitter.
    pub fn next_loss(
        &mut self,
        model: &Model,
        skip: &[Value],
        rng: &mut dyn rand::RngCore,
    ) -> Result<(TrainingLoss, u64)> {
        while skip.contains(&self.position()) {
            match self {
                Task::Language { sampler, shape, .. } => sampler.skip(1, shape.batch_size),
                Task::Translation { sampler, .. } => sampler.skip(1),
            }
        }
        match self {
            Task::Language { sampler, shape, shard, .. } => {
                // This rank's rows of the global batch: the windows of the ranks before it are
                // skipped, its own read, the ranks' after it skipped.
                let rows = shard.rows(shape.batch_size)?;
                sampler.skip(1, shard.rank * rows);
                let batch = sampler.next_batch(rows)?;
                sampler.skip(1, (shard.ranks - 1 - shard.rank) * rows);
                let (inputs, targets) = batch.to_tensors(model.device())?;
                let tokens = inputs.elem_count() as u64;
                Ok((model.training_loss(&inputs, &targets, rng)?, tokens))
            }
            Task::Translation { data, sampler } => {
                let batch = seq2seq_batch(&sampler.next_batch(), model.device())?;
                let loss = model.seq2seq_training_loss(&batch, data.label_smoothing, rng)?;
                Ok((loss, batch.target_tokens() as u64))
            }
        }
    }

    /// Mean validation loss over the first `limit` batches of the validation split in a fixed
    /// order (`0`: all of it), and a mixture's expert load on them. For pairs: the unsmoothed
    /// cross-entropy per target token over the validation books.
    pub fn evaluate(&self, model: &Model, limit: u64) -> Result<(f64, ExpertLoad)> {
        let limit = if limit == 0 { usize::MAX } else { limit as usize };
        let mut load = ExpertLoad::default();
        match self {
            Task::Language { dataset, shape, .. } => {
                let batches = SequentialBatches::new(dataset.val().clone(), shape.seq_len, shape.batch_size)?;
                let (mut sum, mut count) = (0.0, 0u64);
                for batch in batches.take(limit) {
                    let (inputs, targets) = batch?.to_tensors(model.device())?;
                    let (loss, routing) = model.loss_and_routing(&inputs.detach(), &targets)?;
                    sum += loss.to_scalar::<f32>()? as f64;
                    load.add(&routing);
                    count += 1;
                }
                if count == 0 {
                    return Err(Error::Input(format!(
                        "the validation split has fewer than seq_len + 1 = {} tokens\nHINT: give more validation text or a shorter seq_len",
                        shape.seq_len + 1
                    )));
                }
                Ok((sum / count as f64, load))
            }
            Task::Translation { data, .. } => {
                // Weighted by target tokens, so the mean is per token whatever the batching.
                let (mut sum, mut tokens) = (0.0, 0usize);
                for batch in SequentialPairBatches::new(data.val.clone(), data.batch_tokens)?.take(limit) {
                    let batch = seq2seq_batch(&batch, model.device())?;
                    let (loss, routing) = model.seq2seq_loss_and_routing(&batch)?;
                    let loss = loss.to_scalar::<f32>()? as f64;
                    load.add(&routing);
                    sum += loss * batch.target_tokens() as f64;
                    tokens += batch.target_tokens();
                }
                Ok((sum / tokens.max(1) as f64, load))
            }
        }
    }

    /// The `n` shortest validation sources (token ids with `</s>`), for printing sample
    /// translations. Empty for a language model.
    pub fn sample_sources(&self, n: usize) -> Vec<Vec<u32>> {
        let Task::Translation { data, .. } = self else { return vec![] };
        let mut pairs: Vec<_> = data.val.pairs.iter().collect();
        pairs.sort_by_key(|p| (p.len(), p.line));
        pairs.iter().take(n).map(|p| p.source.clone()).collect()
    }
}

fn parse_position<T: serde::de::DeserializeOwned>(position: &Value) -> Result<T> {
    serde_json::from_value(position.clone()).map_err(|e| {
        Error::Input(format!(
            "the saved batch position {position} is not this run's kind of data: {e}\nHINT: resume with the data the checkpoint was trained on"
        ))
    })
}

/// A [`PairBatch`] as the model's training batch.
pub fn seq2seq_batch(batch: &PairBatch, device: &Device) -> Result<Seq2SeqBatch> {
    let (b, s, t) = (batch.rows, batch.source_len, batch.target_len);
    let lengths = |l: &[u32]| l.iter().map(|&n| n as usize).collect();
    Ok(Seq2SeqBatch {
        source: Tensor::from_slice(&batch.source, (b, s), device)?,
        source_lengths: lengths(&batch.source_lengths),
        decoder_input: Tensor::from_slice(&batch.decoder_input, (b, t), device)?,
        targets: Tensor::from_slice(&batch.decoder_target, (b, t), device)?,
        target_lengths: lengths(&batch.target_lengths),
    })
}
