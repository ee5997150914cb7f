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

    /// One layer computing `layers` side by side for the input `x` (weights stacked along
    /// `out`, as GPT-2's fused `c_attn`), so one product serves them all; `None` when only
    /// some have a bias, or when `x` has fewer rows than the layers have inputs.
    ///
    /// Why the row limit: the stacking copies the weights on every call (an autograd op: their
    /// gradients are split back). Next to a product over at least `in` rows that copy costs a
    /// few percent; decoding one token at a time it would cost more than the products.
    pub fn stacked(layers: &[&Linear], x: &Tensor) -> Result<Option<Linear>> {
        let fan_in = layers.first().map_or(Ok(0), |l| l.weight.dim(1))?;
        let rows = x.elem_count() / fan_in.max(1);
        if rows < fan_in {
            return Ok(None);
        }
        let weights: Vec<&Tensor> = layers.iter().map(|l| &l.weight).collect();
        let biases: Vec<&Tensor> = layers.iter().filter_map(|l| l.bias.as_ref()).collect();
        let bias = match biases.len() {
            0 => None,
            n if n == layers.len() => Some(Tensor::cat(&biases, 0)?),
            _ => return Ok(None),
        };
        Ok(Some(Linear::new(Tensor::cat(&weights, 0)?, bias)))
    }

    /// `(out, in)`
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `(out,)`
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `(..., in)` → `(..., out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::linear(x, &self.weight, self.bias.as_ref())
    }

    /// `(..., in)` → `epilogue` of `(..., out)`, in one op ([`ops::linear_then`]).
    pub fn forward_then(&self, x: &Tensor, epilogue: ops::Epilogue) -> Result<Tensor> {
        ops::linear_then(x, &self.weight, self.bias.as_ref(), epilogue)
    }
}
