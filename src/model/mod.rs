//! One model for every family, composed from a [`ModelConfig`] alone.
//!
//! Families differ only in config values: GPT-2 (learned positions, LayerNorm, GELU MLP, tied
//! head), Llama/Mistral (RMSNorm, RoPE, SwiGLU, GQA, sliding window), Phi-2 (partial RoPE,
//! parallel residual, biased head), MPT (ALiBi, no biases), Mixtral (mixture of experts), and
//! the original encoder–decoder Transformer and Marian (post-norm, sinusoids, an encoder stack
//! whose output the decoder blocks attend to; [`seq2seq`]).

mod init;
mod objective;
pub mod seq2seq;
pub mod upcycle;

pub use init::init_weights;
pub use objective::TrainingLoss;
pub use seq2seq::{Encoded, Seq2SeqBatch};

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Embedding, Module};

use crate::config::{self, ModelConfig, NormPlacement, Positions, Residual};
use crate::error::{Error, Result};
use crate::nn::attention::{RopeTables, Step};
use crate::nn::ops;
use crate::nn::positions::{alibi_slopes, sinusoidal_table, Rope, CACHED_ROPE_POSITIONS};
use crate::nn::{
    Attention, CrossKv, FeedForward, FullCache, KvCache, Linear, Norm, ParamSource, Pass, QuantizedWeights,
    RollingCache, RouterReport, TokenEmbedding,
};

/// One transformer block: self-attention, cross-attention over an encoder's output (in the
/// decoder of an encoder–decoder model), feed-forward.
struct Block {
    attn_norm: Norm,
    attn: Attention,
    /// The decoder blocks of an encoder–decoder model: attention over the encoder's output.
    cross: Option<(Norm, Attention)>,
    /// Absent with a parallel residual, where one norm feeds both branches.
    ffn_norm: Option<Norm>,
    ffn: FeedForward,
    residual: Residual,
    placement: NormPlacement,
    /// Applied in training passes only.
    dropout: config::Dropout,
}

impl Block {
    /// A decoder block (causal, with cross-attention when `cross`) or an encoder block.
    fn new(config: &ModelConfig, layer: usize, params: &ParamSource, causal: bool, cross: bool) -> Self {
        let norm = |name: &str| Norm::new(config.norm, config.norm_eps, &params.pp(name));
        let attention = |name: &str, causal: bool, window: Option<usize>, alibi: Option<Vec<f32>>| {
            let att = &config.attention;
            Attention::new(
                &params.pp(name),
                att.heads,
                att.kv_heads,
                config.head_dim(),
                causal,
                window,
                alibi,
                att.implementation,
            )
        };
        let alibi = match config.positions {
            Positions::Alibi { max_bias } => Some(alibi_slopes(config.attention.heads, max_bias)),
            _ => None,
        };
        Block {
            attn_norm: norm("attn_norm"),
            attn: attention("attn", causal, config.window(layer), alibi),
            cross: cross.then(|| (norm("cross_attn_norm"), attention("cross_attn", false, None, None))),
            ffn_norm: (config.residual == Residual::Sequential).then(|| norm("ffn_norm")),
            ffn: FeedForward::new(&config.ffn, &params.pp("ffn")),
            residual: config.residual,
            placement: config.norm_placement,
            dropout: config.dropout,
        }
    }

    /// `(B, T, D)` → `(B, T, D)`. `key_lengths`: real tokens per row of a right-padded batch
    /// (self-attention keys); `memory`: this layer's view of the encoder output. Dropout and a
    /// router's jitter draw from `pass` when it is a training pass.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Tensor,
        start: usize,
        rope: Option<&RopeTables>,
        cache: Option<&mut dyn KvCache>,
        key_lengths: Option<&[usize]>,
        memory: Option<&CrossKv>,
        pass: &mut Pass,
    ) -> candle_core::Result<Tensor> {
        let (p_residual, p_attention) = (self.dropout.residual, self.dropout.attention);
        let self_step = Step { key_lengths, dropout: pass.dropout_mask(p_attention)? };
        let attend = |h: &Tensor| self.attn.forward(h, start, rope, cache, self_step);
        match (self.residual, &self.ffn_norm, self.placement) {
            (Residual::Parallel, _, _) | (_, None, _) => {
                let h = self.attn_norm.forward(x)?;
                let attn = pass.dropout(attend(&h)?, p_residual)?;
                let ffn = self.ffn.forward(&h, pass)?;
                x + attn + pass.dropout(ffn, p_residual)?
            }
            (Residual::Sequential, Some(ffn_norm), NormPlacement::Pre) => {
                let x = (x + pass.dropout(attend(&self.attn_norm.forward(x)?)?, p_residual)?)?;
                let x = match (&self.cross, memory) {
                    (Some((norm, cross)), Some(memory)) => {
                        let y = cross.cross(&norm.forward(&x)?, memory, pass.dropout_mask(p_attention)?)?;
                        (&x + pass.dropout(y, p_residual)?)?
                    }
                    _ => x,
                };
                let ffn = self.ffn.forward(&ffn_norm.forward(&x)?, pass)?;
                &x + pass.dropout(ffn, p_residual)?
            }
            (Residual::Sequential, Some(ffn_norm), NormPlacement::Post) => {
                let x = self.attn_norm.forward(&(x + pass.dropout(attend(x)?, p_residual)?)?)?;
                let x = match (&self.cross, memory) {
                    (Some((norm, cross)), Some(memory)) => {
                        let y = cross.cross(&x, memory, pass.dropout_mask(p_attention)?)?;
                        norm.forward(&(&x + pass.dropout(y, p_residual)?)?)?
                    }
                    _ => x,
                };
                let ffn = self.ffn.forward(&x, pass)?;
                ffn_norm.forward(&(&x + pass.dropout(ffn, p_residual)?)?)
            }
        }
    }
}

/// Per-sequence decoding state: one KV cache per layer and the next absolute position, and
/// for an encoder–decoder model each decoder layer's cross-attention keys and values of the
/// source, computed once ([`Model::start_decoding`]).
pub struct Cache {
    layers: Vec<Box<dyn KvCache>>,
    next_position: usize,
    /// One per decoder layer (empty for a decoder-only model).
    cross: Vec<CrossKv>,
    device: Device,
}

impl Cache {
    /// Tokens processed so far.
    pub fn position(&self) -> usize {
        self.next_position
    }

    /// Positions held by layer `layer`'s cache (the window size for a full rolling buffer).
    pub fn layer_len(&self, layer: usize) -> usize {
        self.layers[layer].len()
    }

    /// Keep batch rows `rows`: row `i` continues the sequence of old row `rows[i]` (beam search
    /// after each step: hypotheses extended, copied or dropped).
    pub fn reorder(&mut self, rows: &[u32]) -> Result<()> {
        let index = Tensor::new(rows, &self.device)?;
        for layer in &mut self.layers {
            layer.reorder(&index)?;
        }
        self.cross = self.cross.iter().map(|kv| kv.select(rows)).collect::<candle_core::Result<_>>()?;
        Ok(())
    }
}

/// The encoder of an encoder–decoder model: bidirectional blocks over the embedded source.
struct Encoder {
    /// Its own learned position table, when positions are learned.
    pos_embeddings: Option<Embedding>,
    blocks: Vec<Block>,
    /// With pre-norm blocks only.
    final_norm: Option<Norm>,
}

/// A language model: decoder-only, or an encoder–decoder ([`seq2seq`] has the source side).
pub struct Model {
    config: ModelConfig,
    /// Shared by the encoder, the decoder and (when tied) the output head.
    tok_embeddings: TokenEmbedding,
    pos_embeddings: Option<Embedding>,
    rope: Option<Rope>,
    encoder: Option<Encoder>,
    blocks: Vec<Block>,
    /// With pre-norm blocks only (a post-norm block's output is normalised already).
    final_norm: Option<Norm>,
    /// Weight `(V, D)`: the token-embedding matrix itself when tied.
    head: Linear,
    device: Device,
}

impl Model {
    /// Build from canonical weights (checked against `config.param_specs()`); `origin` names the
    /// weights' file in errors.
    pub fn new(config: &ModelConfig, weights: &HashMap<String, Tensor>, origin: &Path) -> Result<Self> {
        Model::with_quantized(config, weights, &QuantizedWeights::new(), origin)
    }

    /// [`new`](Self::new) with some weights kept quantized (inference only): the two maps
    /// together hold the config's parameters.
    pub fn with_quantized(
        config: &ModelConfig,
        weights: &HashMap<String, Tensor>,
        quantized: &QuantizedWeights,
        origin: &Path,
    ) -> Result<Self> {
        config.validate()?;
        let params = ParamSource::checked_with_quantized(config, weights, quantized, origin)?;
        let tok = params.weight("tok_embeddings.weight");
        let device = tok.device();
        let rope = match config.positions {
            Positions::Rope { theta, scaling, .. } => Some(
                Rope::new(theta, config.rotary_dims(), scaling.as_ref())
                    .with_cached_tables(config.context_length.min(CACHED_ROPE_POSITIONS), &device)?,
            ),
            _ => None,
        };
        let head_weight = if config.tie_embeddings { tok.clone() } else { params.weight("lm_head.weight") };
        let head = Linear::from_weight(head_weight, params.get_opt("lm_head.bias"));
        let final_norm = |params: &ParamSource| {
            (config.norm_placement == NormPlacement::Pre)
                .then(|| Norm::new(config.norm, config.norm_eps, &params.pp("final_norm")))
        };
        let positions =
            |params: &ParamSource| params.get_opt("pos_embeddings.weight").map(|w| Embedding::new(w, config.d_model));
        let encoder = config.layout.is_encoder_decoder().then(|| {
            let params = params.pp("encoder");
            Encoder {
                pos_embeddings: positions(&params),
                blocks: (0..config.layout.encoder_layers())
                    .map(|i| Block::new(config, i, &params.pp(format!("layers.{i}")), false, false))
                    .collect(),
                final_norm: final_norm(&params),
            }
        });
        let cross = encoder.is_some();
        Ok(Model {
            tok_embeddings: TokenEmbedding::new(tok, config.d_model),
            pos_embeddings: positions(&params),
            rope,
            encoder,
            blocks: (0..config.layers)
                .map(|i| Block::new(config, i, &params.pp(format!("layers.{i}")), true, cross))
                .collect(),
            final_norm: final_norm(&params),
            head,
            config: config.clone(),
            device,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A fresh cache for one sequence: a rolling buffer of the window size for layers with a
    /// sliding window (constant memory), a growing full cache for the others.
    pub fn new_cache(&self) -> Cache {
        let layer_cache = |layer| -> Box<dyn KvCache> {
            match self.config.window(layer) {
                Some(window) => Box::new(RollingCache::new(window)),
                None => Box::new(FullCache::default()),
            }
        };
        Cache {
            layers: (0..self.config.layers).map(layer_cache).collect(),
            next_position: 0,
            cross: Vec::new(),
            device: self.device.clone(),
        }
    }

    /// A cache that keeps every position even in windowed layers (for comparison and
    /// benchmarks; the window still masks attention, so results are the same).
    pub fn new_full_cache(&self) -> Cache {
        Cache {
            layers: (0..self.config.layers).map(|_| Box::new(FullCache::default()) as Box<dyn KvCache>).collect(),
            next_position: 0,
            cross: Vec::new(),
            device: self.device.clone(),
        }
    }

    /// Prefill chunk used when none is given: the smallest window (so a chunk never costs more
    /// than twice the window in scores), or 512 tokens for models without one.
    pub fn default_prefill_chunk(&self) -> usize {
        (0..self.config.layers).filter_map(|l| self.config.window(l)).min().unwrap_or(512)
    }

    /// Whether positions past `context_length` are meaningful: with a sliding window in every
    /// layer, attention never spans more than the window, so generation may run on.
    pub fn unbounded_context(&self) -> bool {
        self.config.positions != Positions::Learned && (0..self.config.layers).all(|l| self.config.window(l).is_some())
    }

    /// Logits `(B, T, V)` for token ids `(B, T)`. With a cache, the ids continue the cached
    /// sequence and are appended to it (for an encoder–decoder model, a cache from
    /// [`start_decoding`](Self::start_decoding), which holds the source).
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut Cache>) -> Result<Tensor> {
        let hidden = self.forward_hidden(ids, cache)?;
        self.head(&hidden)
    }

    /// Mean next-token cross-entropy of `inputs` `(B, T)` against `targets` `(B, T)`.
    pub fn loss(&self, inputs: &Tensor, targets: &Tensor) -> Result<Tensor> {
        Ok(self.loss_and_routing(inputs, targets)?.0)
    }

    /// [`loss`](Self::loss), and each mixture-of-experts layer's routing of the batch (empty
    /// for a dense model): what an evaluation measures.
    pub fn loss_and_routing(&self, inputs: &Tensor, targets: &Tensor) -> Result<(Tensor, Vec<RouterReport>)> {
        let mut pass = Pass::inference();
        let loss = self.lm_loss(inputs, targets, &mut pass)?;
        Ok((loss, pass.into_routing()))
    }

    /// What a training step minimises, in parts: the language-model loss (the same function as
    /// [`loss`](Self::loss), with dropout on) and the routers' auxiliary losses with their
    /// weights. What the layers draw (dropout masks, a router's jitter) comes from `rng`.
    pub fn training_loss(
        &self,
        inputs: &Tensor,
        targets: &Tensor,
        rng: &mut dyn rand::RngCore,
    ) -> Result<TrainingLoss> {
        let mut pass = Pass::training(rng);
        let lm = self.lm_loss(inputs, targets, &mut pass)?;
        TrainingLoss::new(lm, &self.config.ffn, pass.into_routing())
    }

    fn lm_loss(&self, inputs: &Tensor, targets: &Tensor, pass: &mut Pass) -> Result<Tensor> {
        let logits = self.head(&self.decode(inputs, None, None, pass)?)?; // (B, T, V)
        let (b, t, v) = logits.dims3()?;
        Ok(ops::softmax_cross_entropy(&logits.reshape((b * t, v))?, &targets.flatten_all()?, None)?)
    }

    /// Output projection of final hidden states `(B, T, D)` → logits `(B, T, V)`.
    pub fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.head.forward(hidden)?)
    }

    /// Final hidden states `(B, T, D)` (after the final norm).
    pub fn forward_hidden(&self, ids: &Tensor, cache: Option<&mut Cache>) -> Result<Tensor> {
        self.decode(ids, cache, None, &mut Pass::inference())
    }

    /// The decoder stack: ids `(B, T)` → final hidden states `(B, T, D)`. The cross-attention
    /// of an encoder–decoder model reads the source from the cache when decoding, from
    /// `encoded` otherwise. (Self-attention needs no padding lengths here: a causal query never
    /// sees the right padding after it.)
    fn decode(
        &self,
        ids: &Tensor,
        mut cache: Option<&mut Cache>,
        encoded: Option<&Encoded>,
        pass: &mut Pass,
    ) -> Result<Tensor> {
        let has_source = encoded.is_some() || cache.as_ref().is_some_and(|c| !c.cross.is_empty());
        if self.encoder.is_some() && !has_source {
            return Err(Error::Input(
                "this is an encoder-decoder model: its decoder needs a source\nHINT: encode the source (Model::encode) and decode with Model::decoder_logits or Model::seq2seq_loss, or with a cache from Model::start_decoding".into(),
            ));
        }
        let (_, t) = ids.dims2()?;
        let start = cache.as_ref().map_or(0, |c| c.next_position);
        let mut x = self.embed(ids, start, self.pos_embeddings.as_ref(), pass)?; // (B, T, D)
        let rope = match &self.rope {
            Some(rope) => {
                let (cos, sin) = rope.tables(start, t, &self.device)?;
                Some(RopeTables { rope, cos, sin })
            }
            None => None,
        };
        for (i, block) in self.blocks.iter().enumerate() {
            let memory = match (&cache, encoded, &block.cross) {
                (Some(cache), _, _) if !cache.cross.is_empty() => Some(cache.cross[i].clone()),
                (_, Some(encoded), Some((_, cross))) => Some(cross.cross_kv(encoded.hidden(), encoded.lengths())?),
                _ => None,
            };
            let layer_cache = cache.as_mut().map(|c| c.layers[i].as_mut() as &mut dyn KvCache);
            x = block.forward(&x, start, rope.as_ref(), layer_cache, None, memory.as_ref(), pass)?;
        }
        if let Some(cache) = cache {
            cache.next_position += t;
        }
        Ok(match &self.final_norm {
            Some(norm) => norm.forward(&x)?,
            None => x,
        })
    }

    /// Token embeddings (scaled by √d_model when the config says so) plus positions
    /// `start..start + T` from `table` or the sinusoids, with embedding dropout in training.
    /// Checks the ids first. `(B, T)` → `(B, T, D)`.
    fn embed(&self, ids: &Tensor, start: usize, table: Option<&Embedding>, pass: &mut Pass) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        self.check_ids(ids, start + t)?;
        let mut x = self.tok_embeddings.forward(ids)?; // (B, T, D)
        if self.config.scale_embeddings {
            x = (x * (self.config.d_model as f64).sqrt())?;
        }
        match self.config.positions {
            Positions::Learned => {
                let positions = Tensor::arange(start as u32, (start + t) as u32, &self.device)?;
                let table = table.expect("learned positions have a table");
                x = x.broadcast_add(&table.forward(&positions)?)?;
            }
            Positions::Sinusoidal { layout } => {
                let table = sinusoidal_table(start, t, self.config.d_model, layout, &self.device)?;
                x = x.broadcast_add(&table.to_dtype(x.dtype())?)?;
            }
            _ => {}
        }
        Ok(pass.dropout(x, self.config.dropout.embeddings)?)
    }

    /// Reject ids outside the vocabulary, and sequences longer than the model's positions: a
    /// learned table's rows, or for an encoder–decoder model (trained on sequences of at most
    /// `context_length`, as Marian's position table is) any kind.
    fn check_ids(&self, ids: &Tensor, end_position: usize) -> Result<()> {
        let vocab = self.config.vocab_size;
        if let Some(bad) =
            ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?.into_iter().find(|&id| id as usize >= vocab)
        {
            return Err(Error::Input(format!("token id {bad} is outside the vocabulary (0..{vocab})")));
        }
        let bounded = self.config.positions == Positions::Learned || self.encoder.is_some();
        if bounded && end_position > self.config.context_length {
            return Err(Error::Input(format!(
                "sequence reaches position {end_position}, but this model's positions end at context_length = {}",
                self.config.context_length
            )));
        }
        Ok(())
    }
}
