//! Token generation: greedy or sampled (temperature, top-k, top-p), with the KV cache; for
//! encoder–decoder models also beam search, from a source ([`seq2seq`]).

mod seq2seq;

pub use seq2seq::{generate_seq2seq, generate_seq2seq_batch, Hypothesis, Search, Seq2SeqOptions};

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
    Random {
        temperature: f64,
        top_k: Option<usize>,
        top_p: Option<f64>,
        seed: u64,
    },
}

impl Sampling {
    pub fn validate(&self) -> Result<()> {
        if let Sampling::Random { temperature, top_k, top_p, .. } = self {
            if !(*temperature > 0.0 && temperature.is_finite()) {
                return Err(Error::Input(format!(
                    "--temperature {temperature}: expected a positive number (use --greedy for 0)"
                )));
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
                let mut probs: Vec<f64> =
                    order.iter().map(|&i| ((logits[i] as f64 - max) / temperature).exp()).collect();
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

/// How much to generate, and how to feed the prompt.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// Prompt tokens per prefill forward; bounds prefill memory by the chunk (and the window)
    /// instead of the prompt length. `None`: the model's default.
    pub prefill_chunk: Option<usize>,
    /// Ids that end the generation (included in the output).
    pub stop: Vec<u32>,
    /// Keep every position in the cache even for sliding-window layers (benchmarks).
    pub full_cache: bool,
}

/// Generate after `prompt`, calling `on_token` with each new id as soon as it is chosen.
/// Returns the new ids. For a model whose attention is not windowed in every layer, the total
/// length is capped at `context_length`; a prompt longer than that is an error.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    options: &GenerateOptions,
    sampler: &mut Sampler,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(Error::Input("the prompt is empty: give at least one token".into()));
    }
    if model.is_encoder_decoder() {
        return Err(Error::Input(
            "this is an encoder-decoder model: it generates from a source\nHINT: pass --source TEXT or --source-ids"
                .into(),
        ));
    }
    let chunk = options.prefill_chunk.unwrap_or_else(|| model.default_prefill_chunk());
    if chunk == 0 {
        return Err(Error::Input("--prefill-chunk 0: expected at least 1 token per chunk".into()));
    }
    let context = model.config().context_length;
    let limit = if model.unbounded_context() { usize::MAX } else { context };
    if prompt.len() > limit {
        return Err(Error::Input(format!(
            "the prompt has {} tokens, more than this model's context_length = {context} (and it has no sliding window in every layer)",
            prompt.len()
        )));
    }
    let device = model.device();
    let mut cache = if options.full_cache { model.new_full_cache() } else { model.new_cache() };
    let mut logits = None;
    for piece in prompt.chunks(chunk) {
        let ids = Tensor::new(piece, device)?.unsqueeze(0)?;
        let hidden = model.forward_hidden(&ids, Some(&mut cache))?; // (1, T, D)
        logits = Some(model.head(&hidden.narrow(1, piece.len() - 1, 1)?)?); // (1, 1, V)
    }
    let mut new_ids = Vec::with_capacity(options.max_new_tokens);
    let max_new = options.max_new_tokens.min(limit.saturating_sub(prompt.len()));
    while new_ids.len() < max_new {
        let last = logits.take().expect("set by prefill or the previous step").flatten_all()?;
        let id = sampler.pick(&last)?;
        new_ids.push(id);
        on_token(id)?;
        if options.stop.contains(&id) || new_ids.len() == max_new {
            break;
        }
        logits = Some(model.forward(&Tensor::new(&[id], device)?.unsqueeze(0)?, Some(&mut cache))?);
    }
    Ok(new_ids)
}
