//! What one forward pass is for, and what its layers report back.
//!
//! A model is shared (`&self`) and a KV cache is per sequence; a [`Pass`] is per forward call.
//! It tells the layers whether they are training, and so may draw noise (dropout masks, a
//! router's jitter) from the run's random stream, and it collects what they report: each
//! mixture-of-experts layer's routing, from which the model builds the auxiliary losses and the
//! trainer the expert load. Inference passes draw nothing, so scoring, generation and
//! validation are deterministic functions of the weights.
//!
//! Where dropout applies and how much is the config's ([`crate::config::Dropout`], held by the
//! layers); the randomness is the pass's. Each dropout site draws one 64-bit seed from the
//! stream, in the fixed order of the forward pass, and its mask follows from the seed
//! ([`ops::dropout`]): the masks of a step depend only on the stream's state, so a resumed run
//! that restores the stream draws the same masks, bit for bit.

use candle_core::Tensor;
use rand::RngCore;

use super::ops::{self, DropoutMask};
use super::router::RouterReport;

pub struct Pass<'r> {
    /// The run's random stream while training; `None` for inference.
    noise: Option<&'r mut dyn RngCore>,
    routing: Vec<RouterReport>,
}

impl<'r> Pass<'r> {
    /// A pass for scoring, generation and validation: no noise, no auxiliary losses.
    pub fn inference() -> Self {
        Pass { noise: None, routing: Vec::new() }
    }

    /// A training pass drawing its noise from `rng` (whose state a checkpoint stores, so a
    /// resumed run draws the same numbers).
    pub fn training(rng: &'r mut dyn RngCore) -> Self {
        Pass { noise: Some(rng), routing: Vec::new() }
    }

    pub fn is_training(&self) -> bool {
        self.noise.is_some()
    }

    /// The random stream, in a training pass.
    pub fn noise(&mut self) -> Option<&mut dyn RngCore> {
        match &mut self.noise {
            Some(rng) => Some(&mut **rng),
            None => None,
        }
    }

    /// A fresh dropout mask for probability `p` in a training pass; none (and no draw) in an
    /// inference pass or when `p` is 0.
    pub fn dropout_mask(&mut self, p: f64) -> candle_core::Result<Option<DropoutMask>> {
        match self.noise() {
            Some(rng) if p > 0.0 => DropoutMask::new(p, rng.next_u64()).map(Some),
            _ => Ok(None),
        }
    }

    /// `x` with dropout `p` in a training pass, `x` itself otherwise.
    pub fn dropout(&mut self, x: Tensor, p: f64) -> candle_core::Result<Tensor> {
        match self.dropout_mask(p)? {
            Some(mask) => ops::dropout(&x, p, mask.seed),
            None => Ok(x),
        }
    }

    /// Called by each mixture-of-experts layer, in layer order.
    pub fn report_routing(&mut self, report: RouterReport) {
        self.routing.push(report);
    }

    /// The routing reports, one per mixture-of-experts layer in layer order.
    pub fn into_routing(self) -> Vec<RouterReport> {
        self.routing
    }
}
