//! Dropout in training: where it applies comes from the config ([`config::Dropout`]); the
//! randomness comes from the caller.
//!
//! Each dropout site draws one 64-bit seed from the caller's stream, in the fixed order of the
//! forward pass, and the mask follows from the seed ([`ops::dropout`]). So the masks of a step
//! depend only on the stream's state: a resumed run that restores the stream draws the same
//! masks, bit for bit. A forward without a `Dropout` is the evaluation forward.

use candle_core::{Result, Tensor};
use rand::RngCore;

use super::ops::{self, DropoutMask};
use crate::config;

pub struct Dropout<'r> {
    rates: config::Dropout,
    rng: &'r mut dyn RngCore,
}

impl<'r> Dropout<'r> {
    pub fn new(rates: config::Dropout, rng: &'r mut dyn RngCore) -> Self {
        Dropout { rates, rng }
    }

    /// A fresh mask for probability `p`, or none (and no draw) when `p` is 0.
    fn mask(&mut self, p: f64) -> Result<Option<DropoutMask>> {
        if p == 0.0 {
            return Ok(None);
        }
        DropoutMask::new(p, self.rng.next_u64()).map(Some)
    }

    fn apply(&mut self, x: Tensor, p: f64) -> Result<Tensor> {
        match self.mask(p)? {
            Some(mask) => ops::dropout(&x, p, mask.seed),
            None => Ok(x),
        }
    }

    /// Dropout on the embedded input of a stack.
    pub fn embeddings(&mut self, x: Tensor) -> Result<Tensor> {
        self.apply(x, self.rates.embeddings)
    }

    /// Dropout on a sub-layer's output, before the residual add.
    pub fn residual(&mut self, x: Tensor) -> Result<Tensor> {
        self.apply(x, self.rates.residual)
    }

    /// The mask for one attention call's probabilities.
    pub fn attention(&mut self) -> Result<Option<DropoutMask>> {
        self.mask(self.rates.attention)
    }
}
