//! LayerNorm and RMSNorm, written from primitive ops so gradients flow (candle's fused
//! `layer_norm`/`rms_norm` have no backward).

use candle_core::{DType, Result, Tensor, D};

use super::ParamSource;
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

    /// Normalise over the last dim. Statistics in f32 whatever the input dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let x = match self.kind {
            config::Norm::LayerNorm => {
                let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
                let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
                centred.broadcast_div(&(var + self.eps)?.sqrt()?)?
            }
            config::Norm::RmsNorm => {
                let mean_sq = x.sqr()?.mean_keepdim(D::Minus1)?;
                x.broadcast_div(&(mean_sq + self.eps)?.sqrt()?)?
            }
        };
        let x = x.to_dtype(dtype)?.broadcast_mul(&self.weight)?;
        match &self.bias {
            Some(bias) => x.broadcast_add(bias),
            None => Ok(x),
        }
    }
}
