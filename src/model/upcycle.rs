//! Sparse upcycling (Komatsuzaki et al. 2022, "Sparse Upcycling: Training Mixture-of-Experts
//! from Dense Checkpoints"): a dense model becomes a mixture of experts whose every expert starts
//! as a copy of the dense feed-forward block, with a new router; everything else carries over.
//!
//! With identical experts and mixing weights that sum to one (the default, renormalised
//! gating), every token's mixture equals the dense block's output whatever the router says:
//! the upcycled model computes the dense model's function, and training moves it from there.
//! `expert_noise` perturbs each copy independently, so the experts can differ from the first
//! step even where the router's gradient alone would not separate them.

use std::collections::HashMap;
use std::str::FromStr;

use candle_core::Tensor;
use rand::SeedableRng;

use super::init::standard_normal;
use crate::config::{Ffn, ModelConfig, Router};
use crate::error::{Error, Result};

/// How the new router's weights start.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RouterInit {
    /// All zeros: uniform probabilities, so the first top-k picks go by index (the lowest
    /// experts) until the router learns.
    Zeros,
    /// Normal with this standard deviation: tokens spread over the experts from the start.
    Normal(f64),
}

impl Default for RouterInit {
    /// normal(0, 0.02), the usual initialisation of a projection (GPT-2; `init_weights`).
    fn default() -> Self {
        RouterInit::Normal(0.02)
    }
}

impl FromStr for RouterInit {
    type Err = Error;

    /// `zeros` or `normal:σ`.
    fn from_str(text: &str) -> Result<Self> {
        let bad =
            || Error::Input(format!("router init `{text}`: expected `zeros` or `normal:SIGMA` (e.g. normal:0.02)"));
        match text.split_once(':') {
            None if text == "zeros" => Ok(RouterInit::Zeros),
            Some(("normal", sigma)) => match sigma.parse::<f64>() {
                Ok(s) if s >= 0.0 && s.is_finite() => Ok(RouterInit::Normal(s)),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

/// What to turn the dense model into.
#[derive(Debug, Clone)]
pub struct Upcycle {
    pub experts: usize,
    pub top_k: usize,
    pub router_init: RouterInit,
    /// Standard deviation of the normal noise added to each expert's copy (0: exact copies).
    pub expert_noise: f64,
    /// Seed of the router's initialisation and the experts' noise.
    pub seed: u64,
}

/// The config of `dense` upcycled to `experts` experts routed `top_k` per token: every expert
/// the dense feed-forward block, a default router. `upcycle` writes weights for it; `lmforge
/// plan` costs it before anything is written.
pub fn upcycled_config(dense: &ModelConfig, experts: usize, top_k: usize) -> Result<ModelConfig> {
    if let Ffn::Moe { experts, top_k, .. } = &dense.ffn {
        return Err(Error::Input(format!(
            "{} is already a mixture of experts ({experts} experts, top-{top_k}); upcycling starts from a dense model\nHINT: train it directly with `lmforge train --init-from`",
            label(dense)
        )));
    }
    let mut config = dense.clone();
    config.ffn = Ffn::Moe { experts, top_k, expert: Box::new(dense.ffn.clone()), router: Router::default() };
    config.name = format!("{}-upcycled-{}x-top{}", label(dense), experts, top_k);
    config.validate()?;
    Ok(config)
}

/// The upcycled config and weights (canonical names) of a dense model.
pub fn upcycle(
    dense: &ModelConfig,
    weights: &HashMap<String, Tensor>,
    how: &Upcycle,
) -> Result<(ModelConfig, HashMap<String, Tensor>)> {
    if !(how.expert_noise >= 0.0 && how.expert_noise.is_finite()) {
        return Err(Error::Input(format!("expert noise {}: expected a standard deviation >= 0", how.expert_noise)));
    }
    let config = upcycled_config(dense, how.experts, how.top_k)?;

    // New tensors take the dtype and device of the dense model's.
    let like = weights.values().next().ok_or_else(|| Error::Input(format!("{}: no weights", label(dense))))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(how.seed);
    let mut normal = |shape: &[usize], std: f64| -> Result<Tensor> {
        let values: Vec<f32> = (0..shape.iter().product()).map(|_| (standard_normal(&mut rng) * std) as f32).collect();
        Ok(Tensor::from_vec(values, shape, like.device())?.to_dtype(like.dtype())?)
    };
    let mut out = HashMap::new();
    for spec in config.param_specs() {
        let source = match spec.expert {
            Some(e) => spec.name.replacen(&format!("ffn.experts.{e}."), "ffn.", 1),
            None => spec.name.clone(),
        };
        let tensor = if spec.name.ends_with("ffn.router.weight") {
            match how.router_init {
                RouterInit::Zeros => Tensor::zeros(spec.shape.as_slice(), like.dtype(), like.device())?,
                RouterInit::Normal(std) => normal(&spec.shape, std)?,
            }
        } else {
            let Some(tensor) = weights.get(&source) else {
                let what = if spec.expert.is_some() { "feed-forward weight to copy" } else { "weight" };
                return Err(Error::Input(format!(
                    "{}: no {what} `{source}` (expected shape {:?})",
                    label(dense),
                    spec.shape
                )));
            };
            match spec.expert {
                Some(_) if how.expert_noise > 0.0 => (tensor + normal(&spec.shape, how.expert_noise)?)?,
                _ => tensor.clone(),
            }
        };
        out.insert(spec.name, tensor);
    }
    Ok((config, out))
}

fn label(config: &ModelConfig) -> &str {
    if config.name.is_empty() {
        "the model"
    } else {
        config.name.trim_end_matches('*')
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::presets;
    use crate::model::{init_weights, Model};

    fn dense() -> (ModelConfig, HashMap<String, Tensor>) {
        let config = crate::config::apply_overrides(
            &presets::get("tiny-llama").unwrap(),
            &["layers=2".into(), "vocab_size=97".into()],
        )
        .unwrap();
        let weights = init_weights(&config, 1, &candle_core::Device::Cpu).unwrap();
        (config, weights)
    }

    fn how(experts: usize, top_k: usize) -> Upcycle {
        Upcycle { experts, top_k, router_init: RouterInit::Normal(0.5), expert_noise: 0.0, seed: 3 }
    }

    /// The invariant: with exact copies the upcycled model computes the dense one's logits.
    #[test]
    fn exact_copies_compute_the_dense_logits() {
        let (config, weights) = dense();
        let ids = Tensor::new(&[[5u32, 17, 91, 3, 44, 2, 60, 7]], &candle_core::Device::Cpu).unwrap();
        let want = Model::new(&config, &weights, "dense".as_ref()).unwrap().forward(&ids, None).unwrap();
        for (experts, top_k) in [(4, 2), (3, 1), (8, 8)] {
            let (moe, moe_weights) = upcycle(&config, &weights, &how(experts, top_k)).unwrap();
            assert_eq!(moe.params_total() - config.params_total(), {
                let ffn = 3 * 192 * 512;
                2 * ((experts - 1) * ffn + experts * 192)
            });
            let got = Model::new(&moe, &moe_weights, "moe".as_ref()).unwrap().forward(&ids, None).unwrap();
            let diff: f32 = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            assert!(diff <= 1e-5, "{experts}x top-{top_k}: logits differ by {diff}");
        }
        // With noise the experts differ, and so do the logits (a little).
        let (moe, moe_weights) = upcycle(&config, &weights, &Upcycle { expert_noise: 0.01, ..how(4, 2) }).unwrap();
        let got = Model::new(&moe, &moe_weights, "moe".as_ref()).unwrap().forward(&ids, None).unwrap();
        let diff: f32 = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(diff > 1e-4, "{diff}");
    }

    #[test]
    fn bad_requests_are_errors() {
        let (config, weights) = dense();
        let (moe, moe_weights) = upcycle(&config, &weights, &how(4, 2)).unwrap();
        let err = upcycle(&moe, &moe_weights, &how(4, 2)).unwrap_err().to_string();
        assert!(err.contains("already a mixture of experts"), "{err}");
        let err = upcycle(&config, &weights, &how(2, 3)).unwrap_err().to_string();
        assert!(err.contains("ffn.top_k = 3, expected 1..=2"), "{err}");
        let err = upcycle(&config, &weights, &how(0, 1)).unwrap_err().to_string();
        assert!(err.contains("ffn.experts = 0"), "{err}");
        let mut no_ffn = weights.clone();
        no_ffn.retain(|name, _| !name.starts_with("layers.1.ffn."));
        let err = upcycle(&config, &no_ffn, &how(4, 2)).unwrap_err().to_string();
        assert!(err.contains("no feed-forward weight to copy `layers.1.ffn.gate.weight`"), "{err}");
        assert_eq!("zeros".parse::<RouterInit>().unwrap(), RouterInit::Zeros);
        assert_eq!("normal:0.1".parse::<RouterInit>().unwrap(), RouterInit::Normal(0.1));
        for bad in ["normal", "normal:-1", "uniform:1", "zero"] {
            assert!(bad.parse::<RouterInit>().is_err(), "{bad}");
        }
    }
}
