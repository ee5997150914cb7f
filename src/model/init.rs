//! Fresh weights for training from scratch.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

use crate::config::{ModelConfig, ParamKind};
use crate::error::Result;

/// GPT-2's initialisation: normal(0, 0.02) for matrices and embeddings, with the projections
/// that write into the residual stream (`attn.o`, `ffn.down`) scaled by `1/sqrt(2·layers)` so the
/// stream's variance does not grow with depth; norm gains one, biases zero. Deterministic in
/// `seed`, independent of the device.
pub fn init_weights(config: &ModelConfig, seed: u64, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let residual_scale = 1.0 / (2.0 * config.layers as f64).sqrt();
    let mut weights = HashMap::new();
    for spec in config.param_specs() {
        let n = spec.numel();
        let values: Vec<f32> = match spec.kind {
            ParamKind::NormGain => vec![1.0; n],
            ParamKind::Bias | ParamKind::NormBias => vec![0.0; n],
            ParamKind::Embedding | ParamKind::Weight => {
                let writes_residual = spec.name.ends_with("attn.o.weight") || spec.name.ends_with("down.weight");
                let std = 0.02 * if writes_residual { residual_scale } else { 1.0 };
                (0..n).map(|_| (standard_normal(&mut rng) * std) as f32).collect()
            }
        };
        weights.insert(spec.name.clone(), Tensor::from_vec(values, spec.shape.clone(), device)?);
    }
    Ok(weights)
}

/// Box–Muller, so the stream of numbers depends only on the seed.
pub(super) fn standard_normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}
