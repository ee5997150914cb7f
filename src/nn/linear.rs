//! Affine layer `y = x Wᵀ + b` over the last dim.
//!
//! One fused op ([`ops::linear`]) with its own backward. (candle's `Linear` broadcasts the
//! weight over the batch dims instead, and the backward pass of that broadcast materialises one
//! weight-sized gradient per batch row before summing them: 450 MB for SmolLM2's tied head at
//! batch 4.) A weight kept in GGUF's quantized blocks runs on integer dot products instead
//! ([`ops::quant::qmatmul`], inference only).

use candle_core::{bail, Result, Tensor};

use super::{ops, ParamSource, Weight};

pub struct Linear {
    /// `(out, in)`
    weight: Weight,
    /// `(out,)`
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear::from_weight(Weight::Dense(weight), bias)
    }

    pub fn from_weight(weight: Weight, bias: Option<Tensor>) -> Self {
        Linear { weight, bias }
    }

    /// The `name.weight` / `name.bias` pair of `params`.
    pub fn load(params: &ParamSource, name: &str) -> Self {
        let params = params.pp(name);
        Linear::from_weight(params.weight("weight"), params.get_opt("bias"))
    }

    /// One layer computing `layers` side by side for the input `x` (weights stacked along
    /// `out`, as GPT-2's fused `c_attn`), so one product serves them all; `None` when only
    /// some have a bias, when a weight is quantized, or when `x` has fewer rows than the layers
    /// have inputs.
    ///
    /// Why the row limit: the stacking copies the weights on every call (an autograd op: their
    /// gradients are split back). Next to a product over at least `in` rows that copy costs a
    /// few percent; decoding one token at a time it would cost more than the products.
    pub fn stacked(layers: &[&Linear], x: &Tensor) -> Result<Option<Linear>> {
        let Some(weights) = layers.iter().map(|l| l.dense_weight()).collect::<Option<Vec<&Tensor>>>() else {
            return Ok(None);
        };
        let fan_in = weights.first().map_or(Ok(0), |w| w.dim(1))?;
        let rows = x.elem_count() / fan_in.max(1);
        if rows < fan_in {
            return Ok(None);
        }
        let biases: Vec<&Tensor> = layers.iter().filter_map(|l| l.bias.as_ref()).collect();
        let bias = match biases.len() {
            0 => None,
            n if n == layers.len() => Some(Tensor::cat(&biases, 0)?),
            _ => return Ok(None),
        };
        Ok(Some(Linear::new(Tensor::cat(&weights, 0)?, bias)))
    }

    /// `[layer(x) for layer in layers]`: when every weight is quantized, as one product
    /// ([`ops::quant::qmatmul_each`]: `x` quantized once, one parallel region for all of them,
    /// which is what decoding a token spends its time waiting on); for one token's row and
    /// `f32` weights, one parallel region too ([`ops::gemv::linear_each`]); else one layer at a
    /// time.
    pub fn forward_each(layers: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        let quantized = layers.iter().map(|l| l.quantized_weight().cloned()).collect::<Option<Vec<_>>>();
        let dense = layers.iter().map(|l| l.dense_weight()).collect::<Option<Vec<_>>>();
        let together = match (quantized, dense) {
            (Some(weights), _) => Some(ops::quant::qmatmul_each(x, &weights)?),
            (None, Some(weights)) => ops::gemv::linear_each(x, &weights)?,
            (None, None) => None,
        };
        match together {
            Some(ys) => ys.into_iter().zip(layers).map(|(y, l)| l.add_bias(y)).collect(),
            None => layers.iter().map(|l| l.forward(x)).collect(),
        }
    }

    /// `y + bias`, for the products that do not add it themselves (the quantized ones).
    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    fn quantized_weight(&self) -> Option<&std::sync::Arc<ops::quant::QMatrix>> {
        match &self.weight {
            Weight::Quantized(q) => Some(q),
            Weight::Dense(_) => None,
        }
    }

    /// `(out, in)`; an error for a quantized weight (which has no tensor).
    pub fn weight(&self) -> Result<&Tensor> {
        match &self.weight {
            Weight::Dense(w) => Ok(w),
            Weight::Quantized(q) => bail!("this layer's weight is quantized ({q:?}), not a tensor"),
        }
    }

    fn dense_weight(&self) -> Option<&Tensor> {
        match &self.weight {
            Weight::Dense(w) => Some(w),
            Weight::Quantized(_) => None,
        }
    }

    /// `(out,)`
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `(..., in)` → `(..., out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => ops::linear(x, w, self.bias.as_ref()),
            Weight::Quantized(q) => self.add_bias(ops::quant::qmatmul(x, q)?),
        }
    }

    /// `(..., in)` → `epilogue` of `(..., out)`, in one op ([`ops::linear_then`]).
    pub fn forward_then(&self, x: &Tensor, epilogue: ops::Epilogue) -> Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => ops::linear_then(x, w, self.bias.as_ref(), epilogue),
            Weight::Quantized(_) => epilogue.composed(&self.forward(x)?),
        }
    }
}
