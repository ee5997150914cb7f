//! One decoder-only model for every family, composed from a [`ModelConfig`] alone.
//!
//! Families differ only in config values: GPT-2 (learned positions, LayerNorm, GELU MLP, tied
//! head), Llama/Mistral (RMSNorm, RoPE, SwiGLU, GQA, sliding window), Phi-2 (partial RoPE,
//! parallel residual, biased head), MPT (ALiBi, no biases), Mixtral (mixture of experts).

mod init;
mod objective;
pub mod upcycle;

pub use init::init_weights;
pub use objective::TrainingLoss;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Embedding, Module};

use crate::config::{Layout, ModelConfig, NormPlacement, Positions, Residual};
use crate::error::{Error, Result};
use crate::nn::attention::RopeTables;
use crate::nn::ops;
use crate::nn::positions::{alibi_slopes, sinusoidal_table, Rope};
use crate::nn::{
    Attention, FeedForward, FullCache, KvCache, Linear, Norm, ParamSource, Pass, RollingCache, RouterReport,
};

/// One transformer block.
struct Block {
    attn_norm: Norm,
    attn: Attention,
    /// Absent with a parallel residual, where one norm feeds both branches.
    ffn_norm: Option<Norm>,
    ffn: FeedForward,
    residual: Residual,
    placement: NormPlacement,
}

impl Block {
    fn new(config: &ModelConfig, layer: usize, params: &ParamSource) -> Self {
        let norm = |name: &str| Norm::new(config.norm, config.norm_eps, &params.pp(name));
        let alibi = match config.positions {
            Positions::Alibi { max_bias } => Some(alibi_slopes(config.attention.heads, max_bias)),
            _ => None,
        };
        Block {
            attn_norm: norm("attn_norm"),
            attn: Attention::new(
                &params.pp("attn"),
                config.attention.heads,
                config.attention.kv_heads,
                config.head_dim(),
                config.window(layer),
                alibi,
                config.attention.implementation,
            ),
            ffn_norm: (config.residual == Residual::Sequential).then(|| norm("ffn_norm")),
            ffn: FeedForward::new(&config.ffn, &params.pp("ffn")),
            residual: config.residual,
            placement: config.norm_placement,
        }
    }

    /// `(B, T, D)` → `(B, T, D)`.
    fn forward(
        &self,
        x: &Tensor,
        start: usize,
        rope: Option<&RopeTables>,
        cache: Option<&mut dyn KvCache>,
        pass: &mut Pass,
    ) -> candle_core::Result<Tensor> {
        match (self.residual, &self.ffn_norm, self.placement) {
            (Residual::Parallel, _, _) | (_, None, _) => {
                let h = self.attn_norm.forward(x)?;
                let attn = self.attn.forward(&h, start, rope, cache)?;
                x + attn + self.ffn.forward(&h, pass)?
            }
            (Residual::Sequential, Some(ffn_norm), NormPlacement::Pre) => {
                let x = (x + self.attn.forward(&self.attn_norm.forward(x)?, start, rope, cache)?)?;
                &x + self.ffn.forward(&ffn_norm.forward(&x)?, pass)?
            }
            (Residual::Sequential, Some(ffn_norm), NormPlacement::Post) => {
                let x = self.attn_norm.forward(&(x + self.attn.forward(x, start, rope, cache)?)?)?;
                ffn_norm.forward(&(&x + self.ffn.forward(&x, pass)?)?)
            }
        }
    }
}

/// Per-sequence decoding state: one KV cache per layer and the next absolute position.
pub struct Cache {
    layers: Vec<Box<dyn KvCache>>,
    next_position: usize,
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
}

/// The decoder-only language model.
pub struct Model {
    config: ModelConfig,
    tok_embeddings: Embedding,
    pos_embeddings: Option<Embedding>,
    rope: Option<Rope>,
    blocks: Vec<Block>,
    final_norm: Norm,
    /// Weight `(V, D)`: the token-embedding matrix itself when tied.
    head: Linear,
    device: Device,
}

impl Model {
    /// Build from canonical weights (checked against `config.param_specs()`); `origin` names the
    /// weights' file in errors.
    pub fn new(config: &ModelConfig, weights: &HashMap<String, Tensor>, origin: &Path) -> Result<Self> {
        config.validate()?;
        if let Layout::EncoderDecoder { .. } = config.layout {
            return Err(Error::Unsupported(format!(
                "{}: encoder-decoder models can be described and counted (`lmforge show`) but not yet built",
                origin.display()
            )));
        }
        let params = ParamSource::checked(config, weights, origin)?;
        let tok = params.get("tok_embeddings.weight");
        let device = tok.device().clone();
        let rope = match config.positions {
            Positions::Rope { theta, scaling, .. } => Some(Rope::new(theta, config.rotary_dims(), scaling.as_ref())),
            _ => None,
        };
        let head_weight = if config.tie_embeddings { tok.clone() } else { params.get("lm_head.weight") };
        let head = Linear::new(head_weight, params.get_opt("lm_head.bias"));
        Ok(Model {
            tok_embeddings: Embedding::new(tok, config.d_model),
            pos_embeddings: params.get_opt("pos_embeddings.weight").map(|w| Embedding::new(w, config.d_model)),
            rope,
            blocks: (0..config.layers).map(|i| Block::new(config, i, &params.pp(format!("layers.{i}")))).collect(),
            final_norm: Norm::new(config.norm, config.norm_eps, &params.pp("final_norm")),
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
        Cache { layers: (0..self.config.layers).map(layer_cache).collect(), next_position: 0 }
    }

    /// A cache that keeps every position even in windowed layers (for comparison and
    /// benchmarks; the window still masks attention, so results are the same).
    pub fn new_full_cache(&self) -> Cache {
        Cache {
            layers: (0..self.config.layers).map(|_| Box::new(FullCache::default()) as Box<dyn KvCache>).collect(),
            next_position: 0,
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
    /// sequence and are appended to it.
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
    /// [`loss`](Self::loss)) and the routers' auxiliary losses with their weights. Noise the
    /// layers draw (a router's jitter) comes from `rng`.
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
        let logits = self.head(&self.forward_hidden_in(inputs, None, pass)?)?; // (B, T, V)
        let (b, t, v) = logits.dims3()?;
        Ok(ops::softmax_cross_entropy(&logits.reshape((b * t, v))?, &targets.flatten_all()?, None)?)
    }

    /// Output projection of final hidden states `(B, T, D)` → logits `(B, T, V)`.
    pub fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.head.forward(hidden)?)
    }

    /// Final hidden states `(B, T, D)` (after the final norm).
    pub fn forward_hidden(&self, ids: &Tensor, cache: Option<&mut Cache>) -> Result<Tensor> {
        self.forward_hidden_in(ids, cache, &mut Pass::inference())
    }

    fn forward_hidden_in(&self, ids: &Tensor, mut cache: Option<&mut Cache>, pass: &mut Pass) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let start = cache.as_ref().map_or(0, |c| c.next_position);
        self.check_ids(ids, start + t)?;
        let mut x = self.tok_embeddings.forward(ids)?; // (B, T, D)
        match self.config.positions {
            Positions::Learned => {
                let positions = Tensor::arange(start as u32, (start + t) as u32, &self.device)?;
                let table = self.pos_embeddings.as_ref().expect("learned positions have a table");
                x = x.broadcast_add(&table.forward(&positions)?)?;
            }
            Positions::Sinusoidal => {
                let table = sinusoidal_table(start, t, self.config.d_model, &self.device)?;
                x = x.broadcast_add(&table.to_dtype(x.dtype())?)?;
            }
            _ => {}
        }
        let rope = match &self.rope {
            Some(rope) => {
                let (cos, sin) = rope.tables(start, t, &self.device)?;
                Some(RopeTables { rope, cos, sin })
            }
            None => None,
        };
        for (i, block) in self.blocks.iter().enumerate() {
            let layer_cache = cache.as_mut().map(|c| c.layers[i].as_mut() as &mut dyn KvCache);
            x = block.forward(&x, start, rope.as_ref(), layer_cache, pass)?;
        }
        if let Some(cache) = cache {
            cache.next_position += t;
        }
        Ok(match self.config.norm_placement {
            NormPlacement::Pre => self.final_norm.forward(&x)?,
            NormPlacement::Post => x,
        })
    }

    /// Reject ids outside the vocabulary and sequences a learned position table cannot hold.
    fn check_ids(&self, ids: &Tensor, end_position: usize) -> Result<()> {
        let vocab = self.config.vocab_size;
        if let Some(bad) =
            ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?.into_iter().find(|&id| id as usize >= vocab)
        {
            return Err(Error::Input(format!("token id {bad} is outside the vocabulary (0..{vocab})")));
        }
        if self.config.positions == Positions::Learned && end_position > self.config.context_length {
            return Err(Error::Input(format!(
                "sequence reaches position {end_position}, but this model's learned position table holds context_length = {}",
                self.config.context_length
            )));
        }
        Ok(())
    }
}
