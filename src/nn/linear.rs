//! Affine layer `y = x Wᵀ + b` over the last dim.
//!
//! Inputs are flattened to 2-D before the product: candle's `Linear` broadcasts the weight over
//! the batch dims instead, and the backward pass of that broadcast materialises one weight-sized
//! gradient per batch row before summing them (450 MB for SmolLM2's tied head at batch 4).

use candle_core::{Result, Tensor, D};

use super::ParamSource;

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
        let mut shape = x.dims().to_vec();
        let rows: usize = shape[..shape.len() - 1].iter().product();
        let y = x.reshape((rows, x.dim(D::Minus1)?))?.matmul(&self.weight.t()?)?; // (N, out)
        let y = match &self.bias {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        };
        *shape.last_mut().expect("at least 1-d") = self.weight.dim(0)?;
        y.reshape(shape)
    }
}
