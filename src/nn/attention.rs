//! Multi-head self-attention with grouped KV heads, RoPE or ALiBi, causal and sliding-window
//! masks, and an optional KV cache.

use candle_core::{Device, Result, Tensor, D};

use super::ops::{self, AttentionMask};
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

pub struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// A token sees itself and the `window - 1` tokens before it.
    window: Option<usize>,
    /// Per-head ALiBi slopes, when positions are ALiBi.
    alibi_slopes: Option<Vec<f32>>,
    implementation: AttentionImpl,
}

impl Attention {
    pub fn new(
        params: &ParamSource,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
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
            window,
            alibi_slopes,
            implementation,
        }
    }

    /// `x`: `(B, T, D)` holding absolute positions `start..start + T` → `(B, T, D)`.
    pub fn forward(
        &self,
        x: &Tensor,
        start: usize,
        rope: Option<&RopeTables>,
        cache: Option<&mut dyn KvCache>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let mask = |key_positions: Vec<usize>| AttentionMask {
            query_start: start,
            key_positions,
            causal: true,
            window: self.window,
            alibi_slopes: self.alibi_slopes.clone(),
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
        let (q, k, v) = (self.q.forward(x)?, self.k.forward(x)?, self.v.forward(x)?); // (B, T, heads·hd)
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
        let y = match self.implementation {
            AttentionImpl::Flash => ops::flash_attention(&q, &visible.k, &visible.v, scale, &mask(visible.positions))?,
            AttentionImpl::Naive => {
                let query_positions: Vec<usize> = (start..start + t).collect();
                let bias = self.score_bias(&query_positions, &visible.positions, x.device())?;
                grouped_attention(&q, &visible.k, &visible.v, &bias, self.head_dim)?
            }
        }; // (B, H, T, hd)
        let y = y.transpose(1, 2)?.reshape((b, t, self.heads * self.head_dim))?;
        self.o.forward(&y)
    }

    /// Additive score bias `(H or 1, T, S)`: `-inf` where a query may not see a key (future, or
    /// outside the window), ALiBi's `slope_h · (key_pos − query_pos)` elsewhere.
    fn score_bias(&self, queries: &[usize], keys: &[usize], device: &Device) -> Result<Tensor> {
        let (t, s) = (queries.len(), keys.len());
        let slopes: &[f32] = self.alibi_slopes.as_deref().unwrap_or(&[0.0]);
        let mut bias = Vec::with_capacity(slopes.len() * t * s);
        for &slope in slopes {
            for &qp in queries {
                for &kp in keys {
                    let visible = kp <= qp && self.window.is_none_or(|w| qp - kp < w);
                    bias.push(if visible { slope * (kp as f32 - qp as f32) } else { f32::NEG_INFINITY });
                }
            }
        }
        Tensor::from_vec(bias, (slopes.len(), t, s), device)
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
    let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
    probs.reshape((b, kv, group * t, s))?.matmul(&v.contiguous()?)?.reshape((b, h, t, hd))
}
