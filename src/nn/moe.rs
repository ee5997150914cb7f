//! A sparse mixture-of-experts feed-forward block (Mixtral, Switch Transformer).
//!
//! ```text
//! x (N, D) ──router──▶ logits (N, E) ──route──▶ dispatch (slots sorted by expert) + weights (M)
//!   │                                                        │
//!   └──gather──▶ Xs (M, D) ──expert g's product on its rows──▶ Ys (M, D) ──weighted scatter-add──▶ (N, D)
//! ```
//!
//! [`super::router`] decides (top-k, capacity, losses); [`super::ops::dispatch`] moves the rows.
//! With enough rows the experts' weights are stacked for one grouped op per projection (a copy
//! of the weights per call, small next to the products); with few rows (decoding a token at a
//! time) that copy would cost more than the products, and each routed expert runs on its own
//! rows instead. Both give the same result.

use candle_core::{Result, Tensor};

use super::ffn::{epilogue, DenseFfn};
use super::ops::{self, Dispatch, Epilogue};
use super::router::{self, Routing};
use super::{activation, Linear, ParamSource, Pass};
use crate::config::{Activation, Ffn, Router};

pub struct MoeFfn {
    /// `(E, D)`, no bias.
    router: Linear,
    experts: Vec<DenseFfn>,
    top_k: usize,
    config: Router,
}

impl MoeFfn {
    pub(super) fn new(params: &ParamSource, experts: usize, top_k: usize, expert: &Ffn, config: Router) -> Self {
        let (gated, act) = match *expert {
            Ffn::Gated { act, .. } => (true, act),
            Ffn::Mlp { act, .. } => (false, act),
            Ffn::Moe { .. } => unreachable!("validate() rejects nested mixtures"),
        };
        MoeFfn {
            router: Linear::load(params, "router"),
            experts: (0..experts).map(|e| DenseFfn::new(&params.pp(format!("experts.{e}")), gated, act)).collect(),
            top_k,
            config,
        }
    }

    /// `(B, T, D)` → `(B, T, D)`; the routing goes to `pass`.
    pub(super) fn forward(&self, x: &Tensor, pass: &mut Pass) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let tokens = x.reshape((b * t, d))?; // (N, D)
        let router_input = match pass.noise() {
            Some(rng) if self.config.jitter > 0.0 => (&tokens * jitter(rng, &tokens, self.config.jitter)?)?,
            _ => tokens.clone(),
        };
        let logits = self.router.forward(&router_input)?; // (N, E)
        let Routing { dispatch, slot_weights, report } =
            router::route(&logits, self.top_k, &self.config, pass.is_training())?;
        pass.report_routing(report);
        let xs = ops::gather_rows(&tokens, &dispatch)?; // (M, D)
        let ys = if self.stack_weights(&xs)? {
            self.grouped_forward(&xs, &dispatch)?
        } else {
            self.per_expert_forward(&xs, &dispatch)?
        }; // (M, D)
        let out = ops::combine_rows(&ys, &slot_weights.to_dtype(ys.dtype())?, &dispatch)?; // (N, D)
        out.reshape((b, t, d))
    }

    /// Whether one grouped product over stacked weights is worth their copy: with at least as
    /// many routed rows as the experts have inputs (the rule of [`Linear::stacked`]).
    fn stack_weights(&self, xs: &Tensor) -> Result<bool> {
        Ok(xs.dim(0)? >= xs.dim(1)?)
    }

    /// Every expert's rows through one grouped op per projection.
    fn grouped_forward(&self, xs: &Tensor, dispatch: &std::sync::Arc<Dispatch>) -> Result<Tensor> {
        let first = self.experts.iter().flat_map(DenseFfn::input_projections);
        let (w_in, b_in) = stack(first)?; // (E·H or E·2H, D)
        let expert = &self.experts[0];
        let hidden = match (expert.gated(), expert.act()) {
            (true, Activation::Silu) => {
                ops::grouped_linear(xs, &w_in, b_in.as_ref(), dispatch, Some(Epilogue::SwiGlu))?
            }
            (true, act) => {
                let both = ops::grouped_linear(xs, &w_in, b_in.as_ref(), dispatch, None)?; // (M, 2H)
                let h = both.dim(1)? / 2;
                (activation::apply(act, &both.narrow(1, 0, h)?)? * both.narrow(1, h, h)?)?
            }
            (false, act) => match epilogue(act) {
                Some(e) => ops::grouped_linear(xs, &w_in, b_in.as_ref(), dispatch, Some(e))?,
                None => activation::apply(act, &ops::grouped_linear(xs, &w_in, b_in.as_ref(), dispatch, None)?)?,
            },
        }; // (M, H)
        let (w_down, b_down) = stack(self.experts.iter().map(DenseFfn::down))?; // (E·D, H)
        ops::grouped_linear(&hidden, &w_down, b_down.as_ref(), dispatch, None)
    }

    /// Each expert that has rows runs on them with its own weights.
    fn per_expert_forward(&self, xs: &Tensor, dispatch: &Dispatch) -> Result<Tensor> {
        let mut outputs = Vec::new();
        let mut start = 0;
        for (expert, &size) in self.experts.iter().zip(dispatch.group_sizes()) {
            if size > 0 {
                outputs.push(expert.forward(&xs.narrow(0, start, size)?)?);
            }
            start += size;
        }
        match outputs.len() {
            0 => xs.zeros_like(),
            _ => Tensor::cat(&outputs, 0),
        }
    }
}

/// The weights of `layers` stacked along their outputs, and their biases when they have them.
fn stack<'a>(layers: impl Iterator<Item = &'a Linear>) -> Result<(Tensor, Option<Tensor>)> {
    let layers: Vec<&Linear> = layers.collect();
    let weights = layers.iter().map(|l| l.weight()).collect::<Result<Vec<&Tensor>>>()?;
    let biases: Vec<&Tensor> = layers.iter().filter_map(|l| l.bias()).collect();
    let bias = if biases.len() == layers.len() { Some(Tensor::cat(&biases, 0)?) } else { None };
    Ok((Tensor::cat(&weights, 0)?, bias))
}

/// Factors `U(1 − ε, 1 + ε)` of the shape of `x`, from the run's random stream, in row-major
/// order.
fn jitter(rng: &mut dyn rand::RngCore, x: &Tensor, epsilon: f64) -> Result<Tensor> {
    let (low, span) = ((1.0 - epsilon) as f32, (2.0 * epsilon) as f32);
    let values: Vec<f32> =
        (0..x.elem_count()).map(|_| low + span * ((rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32)).collect();
    Tensor::from_vec(values, x.shape(), x.device())?.to_dtype(x.dtype())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use candle_core::{DType, Device, Var};

    use super::*;
    use crate::config::{apply_overrides, presets, ModelConfig};
    use crate::model::init_weights;
    use crate::nn::ops::testing::{assert_close, rand_tensor};
    use crate::train::TrainRng;

    fn layer(settings: &[&str]) -> (ModelConfig, HashMap<String, Var>) {
        let mut settings: Vec<String> = settings.iter().map(|s| s.to_string()).collect();
        settings.extend(["d_model=16".into(), "attention.heads=2".into(), "attention.kv_heads=2".into()]);
        let config = apply_overrides(&presets::get("tiny-mixtral").unwrap(), &settings).unwrap();
        let vars = init_weights(&config, 3, &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(n, t)| (n, Var::from_tensor(&(t * 20.0).unwrap()).unwrap()))
            .collect();
        (config, vars)
    }

    /// The grouped path (stacked weights) and the per-expert path give the same output and
    /// the same gradients, for each kind of expert.
    #[test]
    fn grouped_and_per_expert_paths_agree() {
        for settings in [
            &["ffn.expert.act=silu"][..],
            &["ffn.expert.act=relu"],
            &["ffn.expert.kind=mlp", "ffn.expert.act=gelu_tanh", "bias=true"],
            &["ffn.expert.kind=mlp", "ffn.expert.act=relu"],
        ] {
            let (config, vars) = layer(settings);
            let weights: HashMap<String, Tensor> =
                vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
            let params = ParamSource::checked(&config, &weights, Path::new("test")).unwrap();
            let Ffn::Moe { experts, top_k, expert, router } = &config.ffn else { panic!() };
            let moe = MoeFfn::new(&params.pp("layers.0.ffn"), *experts, *top_k, expert, router.clone());
            let x = rand_tensor(&[40, 16], 5, DType::F32);
            let routing = router::route(&moe.router.forward(&x).unwrap(), *top_k, router, false).unwrap();
            let dispatch = routing.dispatch;
            let xs = ops::gather_rows(&x, &dispatch).unwrap();
            let grouped = moe.grouped_forward(&xs, &dispatch).unwrap();
            let per_expert = moe.per_expert_forward(&xs, &dispatch).unwrap();
            assert_close(&format!("{settings:?}"), &grouped, &per_expert, 1e-5, 1e-5);
            let g1 = (&grouped * &grouped).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&per_expert * &per_expert).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, var) in &vars {
                if let (Some(a), Some(b)) = (g1.get(var.as_tensor()), g2.get(var.as_tensor())) {
                    let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
                    assert_close(&format!("{settings:?} {name}"), a, b, 1e-4, 1e-4 * scale);
                }
            }
        }
    }

    /// Jitter is drawn only in training passes, from the given stream: the same stream gives the
    /// same routing, inference draws nothing.
    #[test]
    fn jitter_comes_from_the_training_stream_only() {
        let (config, vars) = layer(&["ffn.router.jitter=0.5"]);
        let weights: HashMap<String, Tensor> = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        let params = ParamSource::checked(&config, &weights, Path::new("test")).unwrap();
        let Ffn::Moe { experts, top_k, expert, router } = &config.ffn else { panic!() };
        let moe = MoeFfn::new(&params.pp("layers.0.ffn"), *experts, *top_k, expert, router.clone());
        let x = rand_tensor(&[2, 30, 16], 9, DType::F32);
        let run = |seed: Option<u64>| {
            let mut rng = seed.map(TrainRng::seed_from);
            let (y, chosen) = {
                let mut pass = match rng.as_mut() {
                    Some(rng) => Pass::training(rng),
                    None => Pass::inference(),
                };
                let y: Vec<f32> = moe.forward(&x, &mut pass).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                (y, pass.into_routing()[0].chosen.clone())
            };
            (y, chosen, rng.map(|r| r.state()))
        };
        let (a, b, c) = (run(Some(1)), run(Some(1)), run(Some(2)));
        assert_eq!(a, b);
        assert_ne!(a.0, c.0, "another stream, other noise");
        assert_ne!(a.2, Some(TrainRng::seed_from(1).state()), "the stream advanced");
        assert_eq!(run(None).0, run(None).0);
        assert_ne!(run(None).0, a.0, "inference has no jitter");
    }
}
