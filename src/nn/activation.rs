//! Pointwise nonlinearities, named as in the config.

use candle_core::{Result, Tensor};

use crate::config::Activation;

pub fn apply(act: Activation, x: &Tensor) -> Result<Tensor> {
    match act {
        Activation::Gelu => x.gelu_erf(),
        // candle's `gelu` is the tanh approximation ("gelu_new" in transformers).
        Activation::GeluTanh => x.gelu(),
        Activation::Silu => x.silu(),
        Activation::Relu => x.relu(),
    }
}
