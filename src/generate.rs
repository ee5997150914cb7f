//! Token generation: greedy or sampled (temperature, top-k, top-p), with the KV cache.

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::model::Model;

/// How the next token is picked from the logits.
#[derive(Clone, Debug)]
pub enum Sampling {
    Greedy,
    /// Softmax of `logits / temperature`, restricted to the `top_k` most likely tokens (if set)
    /// and then to the smallest set whose probability reaches `top_p`.
    Random { temperature: f64, top_k: Option<usize>, top_p: Option<f64>, seed: u64 },
}

impl Sampling {
    pub fn validate(&self) -> Result<()> {
        if let Sampling::Random { temperature, top_k, top_p, .. } = self {
            if !(*temperature > 0.0 && temperature.is_finite()) {
                return Err(Error::Input(format!("--temperature {temperature}: expected a positive number (use --greedy for 0)")));
            }
            if *top_k == Some(0) {
                return Err(Error::Input("--top-k 0: expected at least 1".into()));
            }
            if let Some(p) = top_p {
                if !(*p > 0.0 && *p <= 1.0) {
                    return Err(Error::Input(format!("--top-p {p}: expected 0 < p <= 1")));
                }
            }
        }
        Ok(())
    }
}

/// Picks tokens; owns the random stream so a seed reproduces a generation exactly.
pub struct Sampler {
    sampling: Sampling,
    rng: rand::rngs::StdRng,
}

impl Sampler {
    pub fn new(sampling: Sampling) -> Result<Self> {
        sampling.validate()?;
        let seed = match sampling {
            Sampling::Random { seed, .. } => seed,
            Sampling::Greedy => 0,
        };
        Ok(Sampler { sampling, rng: rand::rngs::StdRng::seed_from_u64(seed) })
    }

    /// Next token from logits `(V,)`.
    pub fn pick(&mut self, logits: &Tensor) -> Result<u32> {
        let logits: Vec<f32> = logits.to_dtype(DType::F32)?.to_vec1()?;
        match &self.sampling {
            Sampling::Greedy => Ok(argmax(&logits)),
            Sampling::Random { temperature, top_k, top_p, .. } => {
                let mut order: Vec<usize> = (0..logits.len()).collect();
                order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
                order.truncate(top_k.unwrap_or(order.len()));
                let max = logits[order[0]] as f64;
                let mut probs: Vec<f64> = order.iter().map(|&i| ((logits[i] as f64 - max) / temperature).exp()).collect();
                let total: f64 = probs.iter().sum();
                probs.iter_mut().for_each(|p| *p /= total);
                if let Some(top_p) = top_p {
                    let mut mass = 0.0;
                    let keep = probs.iter().take_while(|&&p| {
                        let before = mass;
                        mass += p;
                        before < *top_p
                    });
                    let keep = keep.count().max(1);
                    order.truncate(keep);
                    probs.truncate(keep);
                }
                let total: f64 = probs.iter().sum();
                let mut draw = self.rng.random::<f64>() * total;
                for (&id, p) in order.iter().zip(&probs) {
                    draw -= p;
                    if draw <= 0.0 {
                        return Ok(id as u32);
                    }
                }
                Ok(*order.last().expect("at least one candidate") as u32)
            }
        }
    }
}

/// Index of the largest value; the first one on ties, as `torch.argmax`.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// Generate up to `max_new` tokens after `prompt`, calling `on_token` with each new id as soon
/// as it is chosen; stops early at any id in `stop`. Returns the new ids.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    max_new: usize,
    sampler: &mut Sampler,
    stop: &[u32],
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(Error::Input("the prompt is empty: give at least one token".into()));
    }
    let device = model.device();
    let mut cache = model.new_cache();
    let mut input = Tensor::new(prompt, device)?.unsqueeze(0)?;
    let mut new_ids = Vec::with_capacity(max_new);
    for _ in 0..max_new {
        let logits = model.forward(&input, Some(&mut cache))?; // (1, T, V)
        let last = logits.squeeze(0)?.get(logits.dim(1)? - 1)?;
        let id = sampler.pick(&last)?;
        new_ids.push(id);
        on_token(id)?;
        if stop.contains(&id) {
            break;
        }
        input = Tensor::new(&[id], device)?.unsqueeze(0)?;
    }
    Ok(new_ids)
}
