//! The source side of an encoder–decoder model: encoding a (right-padded) batch of sources,
//! decoder logits over an encoded source, the training loss of a padded batch, and the cache
//! that decoding starts from.
//!
//! The encoder runs once per source: [`Model::encode`] gives an [`Encoded`], and
//! [`Model::start_decoding`] projects it into each decoder layer's cross-attention keys and
//! values once, so a decoding step costs the decoder alone.
//!
//! Training uses the same entry points as any model plus one loss:
//! - parameters: [`crate::model::init_weights`] (or a checkpoint) under the names of
//!   [`ModelConfig::param_specs`](crate::config::ModelConfig::param_specs) (`encoder.…` for the
//!   encoder), wrapped in `Var`s and given to [`Model::new`], as for a decoder-only model;
//! - [`Model::seq2seq_loss`]`(&batch, label_smoothing, Some(rng))`: the mean cross-entropy over
//!   the real target tokens of a right-padded [`Seq2SeqBatch`], dropout on. `rng` is the
//!   dropout stream: each dropout site of the forward draws one `u64` from it, in a fixed order,
//!   so restoring the stream's state on resume gives the same masks bit for bit;
//! - `seq2seq_loss(&batch, ε, None)`: the evaluation loss (dropout off);
//! - [`crate::generate::generate_seq2seq_batch`]: greedy or beam-search targets for a batch of
//!   sources, from `decoder_start_token_id` to `eos_token_id` (the layout's fields, which a
//!   training run sets from its tokenizer).

use candle_core::{DType, Device, Tensor};
use rand::RngCore;

use super::{Cache, Model, TrainingLoss};
use crate::config::Layout;
use crate::error::{Error, Result};
use crate::nn::{KvCache, Pass, RouterReport};

/// An encoder output: what the decoder's cross-attention reads.
#[derive(Clone)]
pub struct Encoded {
    /// `(B, S, D)`
    hidden: Tensor,
    /// Real tokens of each source in a right-padded batch (`None`: all `S`).
    lengths: Option<Vec<usize>>,
}

impl Encoded {
    /// `(B, S, D)`
    pub fn hidden(&self) -> &Tensor {
        &self.hidden
    }

    pub fn lengths(&self) -> Option<&[usize]> {
        self.lengths.as_deref()
    }

    pub fn batch_size(&self) -> usize {
        self.hidden.dim(0).unwrap_or(0)
    }

    /// Batch rows `rows` of this output (a row may repeat: one copy per beam).
    pub fn select(&self, rows: &[u32]) -> Result<Encoded> {
        let index = Tensor::new(rows, self.hidden.device())?;
        let lengths = self.lengths.as_ref().map(|l| rows.iter().map(|&r| l[r as usize]).collect());
        Ok(Encoded { hidden: self.hidden.index_select(&index, 0)?, lengths })
    }
}

/// A right-padded batch of (source, target) pairs for training or evaluation. Row `b` holds
/// `source_lengths[b]` source tokens and `target_lengths[b]` target tokens; what follows them
/// is padding (any id in the vocabulary) and never reaches the loss.
#[derive(Clone, Debug)]
pub struct Seq2SeqBatch {
    /// `(B, S)` u32
    pub source: Tensor,
    pub source_lengths: Vec<usize>,
    /// `(B, T)` u32: the decoder start token, then the target without its last token.
    pub decoder_input: Tensor,
    /// `(B, T)` u32: the target, ending with the end token; position `t` is what the decoder
    /// should predict after reading `decoder_input[..=t]`.
    pub targets: Tensor,
    /// Real tokens of `decoder_input` and of `targets` per row (the same count).
    pub target_lengths: Vec<usize>,
}

impl Seq2SeqBatch {
    /// The batch of `pairs` of (source ids, target ids without start or end token):
    /// decoder input `start + target`, targets `target + eos`, both right-padded with `pad`.
    pub fn from_pairs(pairs: &[(Vec<u32>, Vec<u32>)], start: u32, eos: u32, pad: u32, device: &Device) -> Result<Self> {
        let source_lengths: Vec<usize> = pairs.iter().map(|(s, _)| s.len()).collect();
        let target_lengths: Vec<usize> = pairs.iter().map(|(_, t)| t.len() + 1).collect();
        let (s, t) =
            (source_lengths.iter().copied().max().unwrap_or(0), target_lengths.iter().copied().max().unwrap_or(0));
        let padded = |rows: Vec<Vec<u32>>, width: usize| -> Result<Tensor> {
            let flat: Vec<u32> = rows
                .into_iter()
                .flat_map(|mut row| {
                    row.resize(width, pad);
                    row
                })
                .collect();
            Ok(Tensor::from_vec(flat, (pairs.len(), width), device)?)
        };
        let inputs = pairs.iter().map(|(_, tgt)| std::iter::once(start).chain(tgt.iter().copied()).collect()).collect();
        let targets = pairs.iter().map(|(_, tgt)| tgt.iter().copied().chain(std::iter::once(eos)).collect()).collect();
        Ok(Seq2SeqBatch {
            source: padded(pairs.iter().map(|(src, _)| src.clone()).collect(), s)?,
            source_lengths,
            decoder_input: padded(inputs, t)?,
            targets: padded(targets, t)?,
            target_lengths,
        })
    }

    /// Target tokens that count in the loss.
    pub fn target_tokens(&self) -> usize {
        self.target_lengths.iter().sum()
    }
}

/// Target id that the loss skips (padding).
const IGNORED: u32 = u32::MAX;

impl Model {
    pub fn is_encoder_decoder(&self) -> bool {
        self.encoder.is_some()
    }

    /// The first decoder input of an encoder–decoder model.
    pub fn decoder_start_token_id(&self) -> Option<u32> {
        match self.config.layout {
            Layout::EncoderDecoder { decoder_start_token_id, .. } => Some(decoder_start_token_id),
            Layout::DecoderOnly => None,
        }
    }

    /// The token that ends a target of an encoder–decoder model, if it has one.
    pub fn eos_token_id(&self) -> Option<u32> {
        match self.config.layout {
            Layout::EncoderDecoder { eos_token_id, .. } => eos_token_id,
            Layout::DecoderOnly => None,
        }
    }

    /// Encode source ids `(B, S)` (u32), right-padded to `lengths` when given → `(B, S, D)`.
    /// Padding positions are hidden from every attention; their own outputs are meaningless.
    pub fn encode(&self, source: &Tensor, lengths: Option<&[usize]>) -> Result<Encoded> {
        self.run_encoder(source, lengths, &mut Pass::inference())
    }

    fn run_encoder(&self, source: &Tensor, lengths: Option<&[usize]>, pass: &mut Pass) -> Result<Encoded> {
        let Some(encoder) = &self.encoder else {
            return Err(Error::Input(
                "this model has no encoder: a source is only for encoder-decoder models\nHINT: give the text as the prompt instead"
                    .into(),
            ));
        };
        let (b, s) = source.dims2()?;
        if let Some(lengths) = lengths {
            check_lengths("source", lengths, b, s)?;
        }
        let context = self.config.context_length;
        if s > context {
            return Err(Error::Input(format!(
                "the source has {s} tokens, more than this model's context_length = {context}\nHINT: split the text into shorter pieces"
            )));
        }
        let mut x = self.embed(source, 0, encoder.pos_embeddings.as_ref(), pass)?; // (B, S, D)
        for block in &encoder.blocks {
            x = block.forward(&x, 0, None, None, lengths, None, pass)?;
        }
        let hidden = match &encoder.final_norm {
            Some(norm) => norm.forward(&x)?,
            None => x,
        };
        Ok(Encoded { hidden, lengths: lengths.map(<[usize]>::to_vec) })
    }

    /// Decoder logits `(B, T, V)` of decoder inputs `(B, T)` over `encoded`, in one pass
    /// without a cache (scoring, evaluation).
    pub fn decoder_logits(&self, encoded: &Encoded, decoder_input: &Tensor) -> Result<Tensor> {
        self.check_source_batch(encoded, decoder_input)?;
        let hidden = self.decode(decoder_input, None, Some(encoded), &mut Pass::inference())?;
        self.head(&hidden)
    }

    /// A decoding cache for the sources of `encoded`: each decoder layer's cross-attention keys
    /// and values, computed here once, and empty self-attention caches. Feed it the decoder
    /// start token first ([`Model::forward`] with the cache).
    pub fn start_decoding(&self, encoded: &Encoded) -> Result<Cache> {
        if self.encoder.is_none() {
            return Err(Error::Input("start_decoding: this model has no encoder".into()));
        }
        let mut cross = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            let (_, attention) = block.cross.as_ref().expect("encoder-decoder decoder blocks have cross-attention");
            cross.push(attention.cross_kv(encoded.hidden(), encoded.lengths())?);
        }
        let layers = (0..self.config.layers).map(|_| Box::new(crate::nn::FullCache::default()) as Box<dyn KvCache>);
        Ok(Cache { layers: layers.collect(), next_position: 0, cross, device: self.device.clone() })
    }

    /// Mean cross-entropy of a padded batch over its real target tokens, with `label_smoothing`
    /// (0 for none; PyTorch's definition). With `rng`, a training forward: dropout on, its
    /// masks drawn from `rng`; without, the evaluation loss.
    pub fn seq2seq_loss(
        &self,
        batch: &Seq2SeqBatch,
        label_smoothing: f64,
        rng: Option<&mut dyn RngCore>,
    ) -> Result<Tensor> {
        let mut pass = match rng {
            Some(rng) => Pass::training(rng),
            None => Pass::inference(),
        };
        self.seq2seq_pass(batch, label_smoothing, &mut pass)
    }

    /// What a training step on `batch` minimises, in parts: [`seq2seq_loss`](Self::seq2seq_loss)
    /// with dropout drawn from `rng`, and, for mixture-of-experts layers (encoder and decoder
    /// alike), the routers' auxiliary losses, as [`Model::training_loss`] for a language model.
    pub fn seq2seq_training_loss(
        &self,
        batch: &Seq2SeqBatch,
        label_smoothing: f64,
        rng: &mut dyn RngCore,
    ) -> Result<TrainingLoss> {
        let mut pass = Pass::training(rng);
        let loss = self.seq2seq_pass(batch, label_smoothing, &mut pass)?;
        TrainingLoss::new(loss, &self.config.ffn, pass.into_routing())
    }

    /// The evaluation loss of `batch` (no dropout, no smoothing) and each mixture-of-experts
    /// layer's routing of it (empty for a dense model).
    pub fn seq2seq_loss_and_routing(&self, batch: &Seq2SeqBatch) -> Result<(Tensor, Vec<RouterReport>)> {
        let mut pass = Pass::inference();
        let loss = self.seq2seq_pass(batch, 0.0, &mut pass)?;
        Ok((loss, pass.into_routing()))
    }

    fn seq2seq_pass(&self, batch: &Seq2SeqBatch, label_smoothing: f64, pass: &mut Pass) -> Result<Tensor> {
        let (b, s) = batch.source.dims2()?;
        check_lengths("source", &batch.source_lengths, b, s)?;
        let (tb, t) = batch.decoder_input.dims2()?;
        if tb != b || batch.targets.dims() != [b, t] {
            return Err(Error::Input(format!(
                "seq2seq batch: source {:?}, decoder input {:?} and targets {:?} must share the batch size, and targets the decoder input's shape",
                batch.source.dims(),
                batch.decoder_input.dims(),
                batch.targets.dims()
            )));
        }
        check_lengths("target", &batch.target_lengths, b, t)?;
        let encoded = self.run_encoder(&batch.source, Some(&batch.source_lengths), pass)?;
        let hidden = self.decode(&batch.decoder_input, None, Some(&encoded), pass)?;
        let logits = self.head(&hidden)?; // (B, T, V)
        token_cross_entropy(&logits, &batch.targets, &batch.target_lengths, label_smoothing)
    }

    /// Both sides of a decoder input must come from the same batch of sources.
    fn check_source_batch(&self, encoded: &Encoded, decoder_input: &Tensor) -> Result<()> {
        let (b, _) = decoder_input.dims2()?;
        if b != encoded.batch_size() {
            return Err(Error::Input(format!(
                "decoder input has batch size {b} but the encoded source has {}",
                encoded.batch_size()
            )));
        }
        Ok(())
    }
}

fn check_lengths(side: &str, lengths: &[usize], batch: usize, width: usize) -> Result<()> {
    if lengths.len() != batch {
        return Err(Error::Input(format!("{} {side} lengths for a batch of {batch}", lengths.len())));
    }
    if let Some((row, &len)) = lengths.iter().enumerate().find(|(_, &len)| len > width) {
        return Err(Error::Input(format!("{side} length {len} of row {row} exceeds the padded width {width}")));
    }
    Ok(())
}

/// Mean token cross-entropy of `logits` `(B, T, V)` against `targets` `(B, T)` over the first
/// `lengths[b]` positions of each row, with label smoothing `ε` as PyTorch defines it:
/// `(1 − ε)·(L − x_t) + ε·(L − mean_j x_j)` per token (`L` the log-sum-exp), which is the plain
/// cross-entropy plus `ε·(x_t − mean_j x_j)`. The plain part runs through the fused op (padding
/// as its ignored index); the smoothing term through composed ops.
pub fn token_cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    lengths: &[usize],
    label_smoothing: f64,
) -> Result<Tensor> {
    if !(0.0..1.0).contains(&label_smoothing) {
        return Err(Error::Input(format!("label smoothing {label_smoothing}: expected 0 <= ε < 1")));
    }
    let (b, t, v) = logits.dims3()?;
    let ids = targets.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    let real = |row: usize, col: usize| col < lengths[row];
    let masked: Vec<u32> = (0..b)
        .flat_map(|row| (0..t).map(move |col| (row, col)))
        .map(|(r, c)| if real(r, c) { ids[r][c] } else { IGNORED })
        .collect();
    let flat = logits.reshape((b * t, v))?; // (N, V)
    let device = logits.device();
    let loss =
        crate::nn::ops::softmax_cross_entropy(&flat, &Tensor::from_vec(masked.clone(), b * t, device)?, Some(IGNORED))?;
    if label_smoothing == 0.0 {
        return Ok(loss);
    }
    let count = masked.iter().filter(|&&id| id != IGNORED).count();
    if count == 0 {
        return Ok(loss);
    }
    let weights: Vec<f32> = masked.iter().map(|&id| if id == IGNORED { 0.0 } else { 1.0 / count as f32 }).collect();
    let safe: Vec<u32> = masked.iter().map(|&id| if id == IGNORED { 0 } else { id }).collect();
    let picked = flat.gather(&Tensor::from_vec(safe, (b * t, 1), device)?, 1)?.squeeze(1)?; // (N)
    let mean = flat.mean_keepdim(1)?.squeeze(1)?; // (N)
    let weights = Tensor::from_vec(weights, b * t, device)?.to_dtype(flat.dtype())?;
    let smoothing = ((picked - mean)? * weights)?.sum_all()?;
    Ok((loss + (smoothing * label_smoothing)?)?)
}
