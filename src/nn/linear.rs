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

    /// One layer computing `layers` side by side (weights stacked along `out`, as GPT-2's fused
    /// `c_attn`), so one product serves them all; `None` when only some have a bias.
    ///
    /// The stacking is an autograd op on the parameters (a copy of the weights per call, and
    /// their gradients split back), cheap next to the product it saves for a batch of tokens,
    /// but not for decoding one token at a time.
    pub fn stacked(layers: &[&Linear]) -> Result<Option<Linear>> {
        let weights: Vec<&Tensor> = layers.iter().map(|l| &l.weight).collect();
        let biases: Vec<&Tensor> = layers.iter().filter_map(|l| l.bias.as_ref()).collect();
        let bias = match biases.len() {
            0 => None,
            n if n == layers.len() => Some(Tensor::cat(&biases, 0)?),
            _ => return Ok(None),
        };
        Ok(Some(Linear::new(Tensor::cat(&weights, 0)?, bias)))
    }

    /// `(..., in)` → `(..., out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::linear(x, &self.weight, self.bias.as_ref())
    }
}
