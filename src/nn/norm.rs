//! LayerNorm and RMSNorm, written from primitive ops so gradients flow (candle's fused
//! `layer_norm`/`rms_norm` have no backward).

use candle_core::{Result, Tensor};

use super::{ops, ParamSource};
use crate::config;

pub struct Norm {
    kind: config::Norm,
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f64,
}

impl Norm {
    pub fn new(kind: config::Norm, eps: f64, params: &ParamSource) -> Self {
        Norm { kind, weight: params.get("weight"), bias: params.get_opt("bias"), eps }
    }

    /// Normalise over the last dim (fused kernels with a backward, statistics in f32).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.kind {
            config::Norm::LayerNorm => ops::layer_norm(x, &self.weight, self.bias.as_ref(), self.eps),
            config::Norm::RmsNorm => ops::rms_norm(x, &self.weight, self.eps),
        }
    }
}
