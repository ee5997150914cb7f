//! Multi-head attention with grouped KV heads: causal self-attention (decoders, with RoPE or
//! ALiBi, sliding windows and an optional KV cache), bidirectional self-attention (encoders),
//! and cross-attention from a decoder onto an encoder's output. Right-padded batches pass
//! per-sequence key lengths; training passes a dropout mask for the probabilities.

use candle_core::{Result, Tensor};

use super::ops::{self, AttentionMask, DropoutMask};
use super::positions::Rope;
use super::{KvCache, LayerKv, Linear, ParamSource};
use crate::config::AttentionImpl;

/// Rotary tables for the tokens of the current step, shared by all layers.
pub struct RopeTables<'a> {
    pub rope: &'a Rope,
    /// `(T, rot)`
    pub cos: Tensor,
    /// `(T, rot)`
    pub sin: Tensor,
}

/// What varies per call besides the input: which keys are padding, and dropout.
#[derive(Clone, Copy, Default)]
pub struct Step<'a> {
    /// Right padding: batch row `b` has `key_lengths[b]` real keys. `None`: no padding.
    pub key_lengths: Option<&'a [usize]>,
    /// Dropout on the attention probabilities (training only).
    pub dropout: Option<DropoutMask>,
}

pub struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// A query sees only keys at or before its position (decoders); an encoder sees all.
    causal: bool,
    /// A token sees itself and the `window - 1` tokens before it.
    window: Option<usize>,
    /// Per-head ALiBi slopes, when positions are ALiBi.
    alibi_slopes: Option<Vec<f32>>,
    implementation: AttentionImpl,
}

/// One layer's keys and values of an encoder output, projected once per source and reused by
/// every decoding step (token-major, as the projections produce them).
#[derive(Clone)]
pub struct CrossKv {
    /// `(B, S, KV·hd)`
    k: Tensor,
    /// `(B, S, KV·hd)`
    v: Tensor,
    /// Real source tokens per batch row (`None`: all `S`).
    lengths: Option<Vec<usize>>,
}

impl CrossKv {
    /// The same keys and values for batch rows `rows` (row `i` of the result is row
    /// `rows[i]` of this one): beam search reorders its hypotheses with this.
    pub fn select(&self, rows: &[u32]) -> Result<CrossKv> {
        let index = Tensor::new(rows, self.k.device())?;
        let lengths = self.lengths.as_ref().map(|l| rows.iter().map(|&r| l[r as usize]).collect());
        Ok(CrossKv { k: self.k.index_select(&index, 0)?, v: self.v.index_select(&index, 0)?, lengths })
    }
}

impl Attention {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        params: &ParamSource,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        causal: bool,
        window: Option<usize>,
        alibi_slopes: Option<Vec<f32>>,
        implementation: AttentionImpl,
    ) -> Self {
        Attention {
            q: Linear::load(params, "q"),
            k: Linear::load(params, "k"),
            v: Linear::load(params, "v"),
            o: Linear::load(params, "o"),
            heads,
            kv_heads,
            head_dim,
            causal,
            window,
            alibi_slopes,
            implementation,
        }
    }

    fn scale(&self) -> f64 {
        1.0 / (self.head_dim as f64).sqrt()
    }

    /// Self-attention. `x`: `(B, T, D)` holding absolute positions `start..start + T` →
    /// `(B, T, D)`.
    pub fn forward(
        &self,
        x: &Tensor,
        start: usize,
        rope: Option<&RopeTables>,
        cache: Option<&mut dyn KvCache>,
        step: Step,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let scale = self.scale();
        let mask = |key_positions: Vec<usize>| AttentionMask {
            query_start: start,
            key_positions,
            causal: self.causal,
            window: self.window,
            alibi_slopes: self.alibi_slopes.clone(),
            key_lengths: step.key_lengths.map(<[usize]>::to_vec),
            dropout: step.dropout,
        };
        let positions = || (start..start + t).collect();
        // Training and cache-free prefill take the token-major flash path.
        let token_major = cache.is_none() && self.implementation == AttentionImpl::Flash;
        if token_major {
            // One product for q, k and v, and one op from there to the attention output (RoPE
            // and the head split inside), so autograd sees two nodes rather than three
            // projections, two rotations and the attention.
            if let Some(qkv) = Linear::stacked(&[&self.q, &self.k, &self.v], x)? {
                let tables = rope.map(|r| (&r.cos, &r.sin));
                let y = ops::flash_attention_qkv(
                    &qkv.forward(x)?,
                    self.heads,
                    self.kv_heads,
                    scale,
                    &mask(positions()),
                    tables,
                )?;
                return self.o.forward(&y);
            }
        }
        let [q, k, v]: [Tensor; 3] =
            Linear::forward_each(&[&self.q, &self.k, &self.v], x)?.try_into().expect("one output per layer"); // (B, T, heads·hd)
        if token_major {
            // Too few tokens to stack the weights: separate projections, still token-major end
            // to end, so autograd sees one node per op rather than reshapes, transposes and
            // copies around each.
            let (q, k) = match rope {
                Some(r) => (
                    ops::rope_tokens(&q, &r.cos, &r.sin, self.head_dim)?,
                    ops::rope_tokens(&k, &r.cos, &r.sin, self.head_dim)?,
                ),
                None => (q, k),
            };
            let y = ops::flash_attention_tokens(&q, &k, &v, self.heads, self.kv_heads, scale, &mask(positions()))?;
            return self.o.forward(&y);
        }
        let split_heads = |y: Tensor, n: usize| y.reshape((b, t, n, self.head_dim))?.transpose(1, 2)?.contiguous();
        let mut q = split_heads(q, self.heads)?; // (B, H, T, hd)
        let mut k = split_heads(k, self.kv_heads)?; // (B, KV, T, hd)
        let v = split_heads(v, self.kv_heads)?; // (B, KV, T, hd)
        if let Some(r) = rope {
            q = ops::rope(&q, &r.cos, &r.sin)?;
            k = ops::rope(&k, &r.cos, &r.sin)?;
        }
        let visible = match cache {
            Some(cache) => cache.append(&k, &v, start)?,
            None => LayerKv { k, v, positions: positions() },
        };
        let mask = mask(visible.positions);
        let y = match self.implementation {
            AttentionImpl::Flash => ops::flash_attention(&q, &visible.k, &visible.v, scale, &mask)?,
            AttentionImpl::Naive => ops::flash_attention::composed_attention(&q, &visible.k, &visible.v, scale, &mask)?,
        }; // (B, H, T, hd)
        let y = y.transpose(1, 2)?.reshape((b, t, self.heads * self.head_dim))?;
        self.o.forward(&y)
    }

    /// Keys and values of an encoder output `memory` `(B, S, D)` for [`cross`](Self::cross),
    /// with the real length of each source when the batch is right-padded.
    pub fn cross_kv(&self, memory: &Tensor, lengths: Option<&[usize]>) -> Result<CrossKv> {
        Ok(CrossKv { k: self.k.forward(memory)?, v: self.v.forward(memory)?, lengths: lengths.map(<[usize]>::to_vec) })
    }

    /// Cross-attention: queries from the decoder stream `x` `(B, T, D)`, keys and values from
    /// the encoder output → `(B, T, D)`. Every query sees every real source token.
    pub fn cross(&self, x: &Tensor, memory: &CrossKv, dropout: Option<DropoutMask>) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let s = memory.k.dim(1)?;
        let mask = AttentionMask::bidirectional(s).with_key_lengths(memory.lengths.clone()).with_dropout(dropout);
        let q = self.q.forward(x)?; // (B, T, H·hd)
        let y = match self.implementation {
            AttentionImpl::Flash => {
                ops::flash_attention_tokens(&q, &memory.k, &memory.v, self.heads, self.kv_heads, self.scale(), &mask)?
            }
            AttentionImpl::Naive => {
                let split = |y: &Tensor, len: usize, n: usize| {
                    y.reshape((b, len, n, self.head_dim))?.transpose(1, 2)?.contiguous()
                };
                let (q, k, v) = (
                    split(&q, t, self.heads)?,
                    split(&memory.k, s, self.kv_heads)?,
                    split(&memory.v, s, self.kv_heads)?,
                );
                let y = ops::flash_attention::composed_attention(&q, &k, &v, self.scale(), &mask)?;
                y.transpose(1, 2)?.reshape((b, t, self.heads * self.head_dim))?
            }
        };
        self.o.forward(&y)
    }
}

/// Softmax attention where `H / KV` query heads share each KV head, without copying K or V:
/// the query heads of one group are stacked along the sequence axis, so one matmul per KV head
/// serves the whole group. Query head `h` uses KV head `h / (H / KV)`, as `repeat_kv` does.
///
/// `q`: `(B, H, T, hd)`, `k`/`v`: `(B, KV, S, hd)`, `bias`: broadcastable to `(B, H, T, S)`.
pub fn grouped_attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, head_dim: usize) -> Result<Tensor> {
    let (b, h, t, hd) = q.dims4()?;
    let (kv, s) = (k.dim(1)?, k.dim(2)?);
    let group = h / kv;
    let q = (q.reshape((b, kv, group * t, hd))? * (1.0 / (head_dim as f64).sqrt()))?;
    let scores = q.matmul(&k.t()?.contiguous()?)?.reshape((b, h, t, s))?; // (B, H, T, S)
    let scores = scores.broadcast_add(&bias.to_dtype(scores.dtype())?)?;
    let probs = candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?;
    probs.reshape((b, kv, group * t, s))?.matmul(&v.contiguous()?)?.reshape((b, h, t, hd))
}
