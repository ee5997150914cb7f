//! Affine layer `y = x Wᵀ + b` over the last dim.
//!
//! One fused op ([`ops::linear`]) with its own backward. (candle's `Linear` broadcasts the
//! weight over the batch dims instead, and the backward pass of that broadcast materialises one
//! weight-sized gradient per batch row before summing them: 450 MB for SmolLM2's tied head at
//! batch 4.)

use candle_core::{Result, Tensor};

use super::{ops, ParamSource};

pub struct Linear {
    /// `(out, in)`
    weight: Tensor,
    /// `(out,)`
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight, bias }
    }

    /// The `name.weight` / `name.bias` pair of `params`.
    pub fn load(params: &ParamSource, name: &str) -> Self {
        let params = params.pp(name);
        Linear::new(params.get("weight"), params.get_opt("bias"))
    }

    /// `(..., in)` → `(..., out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::linear(x, &self.weight, self.bias.as_ref())
    }
}
