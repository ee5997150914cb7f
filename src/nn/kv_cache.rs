//! Key/value caches for incremental decoding.
//!
//! A model is shared and immutable; a cache belongs to one sequence and is passed `&mut` into
//! each forward. A layer's cache takes the keys/values of the new tokens and returns everything
//! those tokens may attend to, together with each key's absolute position, so attention builds
//! its mask (causal, sliding window) and ALiBi biases from positions, whatever order the cache
//! stores its slots in.

use candle_core::{Result, Tensor};

/// What one step's queries may attend to in one layer.
pub struct LayerKv {
    /// `(B, kv_heads, S, head_dim)`
    pub k: Tensor,
    /// `(B, kv_heads, S, head_dim)`
    pub v: Tensor,
    /// Absolute position of each of the `S` key slots.
    pub positions: Vec<usize>,
}

/// One layer's cache.
pub trait KvCache: Send {
    /// Store keys/values `(B, kv_heads, T, head_dim)` of absolute positions `start..start + T`
    /// and return all keys/values the new queries may see (the cached ones and the new ones).
    fn append(&mut self, k: &Tensor, v: &Tensor, start: usize) -> Result<LayerKv>;

    /// Positions currently held.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Keeps every position: memory grows with the sequence.
#[derive(Default)]
pub struct FullCache {
    kv: Option<(Tensor, Tensor)>,
    positions: Vec<usize>,
}

impl KvCache for FullCache {
    fn append(&mut self, k: &Tensor, v: &Tensor, start: usize) -> Result<LayerKv> {
        let new_tokens = k.dim(2)?;
        let (k, v) = match self.kv.take() {
            None => (k.contiguous()?, v.contiguous()?),
            Some((k_old, v_old)) => (Tensor::cat(&[&k_old, k], 2)?, Tensor::cat(&[&v_old, v], 2)?),
        };
        self.positions.extend(start..start + new_tokens);
        self.kv = Some((k.clone(), v.clone()));
        Ok(LayerKv { k, v, positions: self.positions.clone() })
    }

    fn len(&self) -> usize {
        self.positions.len()
    }
}
