//! Where a layer's weight matrix lives: an ordinary tensor, or GGUF quantized blocks (bf16
//! among them).
//!
//! One property of the weight, decided by the loader (`io::LoadOptions`: a GGUF file's
//! `Q4_0`/`Q4_1`/`Q8_0`/`Q4_K`/`Q6_K`/`BF16` matrices kept as they are, the others rounded to
//! bf16 as they are read with `--dtype bf16`); the layers that take a matrix
//! ([`super::Linear`], [`TokenEmbedding`]) dispatch on it, so there is no second model.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Device, Result, Tensor};
use candle_nn::{Embedding, Module};

use super::ops::quant::QMatrix;

/// Canonical name → a weight kept quantized (the rest of a model's weights are tensors).
pub type QuantizedWeights = HashMap<String, Arc<QMatrix>>;

/// A weight matrix `(out, in)`.
#[derive(Clone)]
pub enum Weight {
    Dense(Tensor),
    /// Inference only: its products have no backward.
    Quantized(Arc<QMatrix>),
}

impl Weight {
    /// Quantized weights are held in host memory.
    pub fn device(&self) -> Device {
        match self {
            Weight::Dense(t) => t.device().clone(),
            Weight::Quantized(_) => Device::Cpu,
        }
    }

    /// `(out, in)`
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Weight::Dense(t) => t.dims2(),
            Weight::Quantized(q) => Ok(q.dims()),
        }
    }
}

/// The token-embedding table: rows gathered from a tensor, or dequantized row by row from
/// quantized blocks (only the rows of the ids given, so the table stays quantized).
pub enum TokenEmbedding {
    Dense(Embedding),
    Quantized(Arc<QMatrix>),
}

impl TokenEmbedding {
    pub fn new(weight: Weight, d_model: usize) -> Self {
        match weight {
            Weight::Dense(t) => TokenEmbedding::Dense(Embedding::new(t, d_model)),
            Weight::Quantized(q) => TokenEmbedding::Quantized(q),
        }
    }

    /// `(B, T)` ids → `(B, T, D)`; the ids are checked by the caller.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            TokenEmbedding::Dense(e) => e.forward(ids),
            TokenEmbedding::Quantized(q) => {
                let (b, t) = ids.dims2()?;
                let rows: Vec<usize> = ids.flatten_all()?.to_vec1::<u32>()?.into_iter().map(|i| i as usize).collect();
                q.dequantize_rows(&rows)?.reshape((b, t, q.dims().1))
            }
        }
    }
}
