//! Pointwise nonlinearities, named as in the config.

use candle_core::{Result, Tensor};

use super::ops;
use crate::config::Activation;

pub fn apply(act: Activation, x: &Tensor) -> Result<Tensor> {
    match act {
        Activation::Gelu => ops::gelu_erf(x),
        // The tanh approximation ("gelu_new" in transformers).
        Activation::GeluTanh => ops::gelu_tanh(x),
        Activation::Silu => x.silu(),
        Activation::Relu => x.relu(),
    }
}
