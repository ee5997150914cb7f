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
            &Sampling::Random { temperature, top_k, top_p, .. } => {
                Ok(sample(&logits, temperature, top_k, top_p, self.rng.random::<f64>()))
            }
        }
    }
}

/// The token that the uniform draw `u` in `[0, 1)` picks from the softmax of
/// `logits / temperature`, restricted to the `top_k` most likely tokens and then to the
/// smallest set of most likely tokens whose probability reaches `top_p`.
///
/// The candidates are visited most likely first, so only as many are ranked as the draw, `k`
/// or `p` need: a selection over the vocabulary (O(V)) and a sort of those few, instead of
/// sorting all 49k logits of a SmolLM2 for every token.
fn sample(logits: &[f32], temperature: f64, top_k: Option<usize>, top_p: Option<f64>, u: f64) -> u32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let weight = |id: usize| ((logits[id] as f64 - max) / temperature).exp();
    let mut ranking = Ranking::new(logits);
    let candidates = top_k.unwrap_or(logits.len()).min(logits.len());
    // The softmax's denominator over the candidates.
    let total: f64 = match top_k {
        Some(_) => (0..candidates).map(|rank| weight(ranking.id(rank))).sum(),
        None => (0..logits.len()).map(weight).sum(),
    };
    // Top-p: keep the most likely tokens while the mass before each is below p (at least one).
    let kept = match top_p {
        Some(top_p) => {
            let mut mass = 0.0;
            let mut kept = 0;
            while kept < candidates && mass < top_p {
                mass += weight(ranking.id(kept)) / total;
                kept += 1;
            }
            kept.max(1)
        }
        None => candidates,
    };
    let kept_total = match top_p {
        Some(_) => (0..kept).map(|rank| weight(ranking.id(rank))).sum(),
        None => total,
    };
    let mut draw = u * kept_total;
    for rank in 0..kept {
        let id = ranking.id(rank);
        draw -= weight(id);
        if draw <= 0.0 {
            return id as u32;
        }
    }
    ranking.id(kept - 1) as u32
}

/// Token ids from the most likely down (ties: the lower id first), ranked on demand: asking
/// for rank `r` ranks the top `max(64, 2·ranked)` at once, by a selection and a sort of those.
struct Ranking<'l> {
    logits: &'l [f32],
    ids: Vec<usize>,
    ranked: usize,
}

impl<'l> Ranking<'l> {
    fn new(logits: &'l [f32]) -> Self {
        Ranking { logits, ids: (0..logits.len()).collect(), ranked: 0 }
    }

    fn id(&mut self, rank: usize) -> usize {
        if rank >= self.ranked {
            let logits = self.logits;
            let before = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
            let n = (rank + 1).max(64).max(2 * self.ranked).min(self.ids.len());
            // The ids at ranks >= `ranked` are the unranked rest: move its best `n - ranked` to
            // the front of it, then sort those.
            let rest = &mut self.ids[self.ranked..];
            let wanted = n - self.ranked;
            if wanted < rest.len() {
                rest.select_nth_unstable_by(wanted, before);
            }
            rest[..wanted].sort_unstable_by(before);
            self.ranked = n;
        }
        self.ids[rank]
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition: sort the whole vocabulary, cut to k, renormalise, cut to p, draw.
    fn sample_by_full_sort(logits: &[f32], temperature: f64, k: Option<usize>, p: Option<f64>, u: f64) -> u32 {
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        order.truncate(k.unwrap_or(order.len()));
        let max = logits[order[0]] as f64;
        let probs: Vec<f64> = order.iter().map(|&i| ((logits[i] as f64 - max) / temperature).exp()).collect();
        let total: f64 = probs.iter().sum();
        let mut kept = order.len();
        if let Some(p) = p {
            let mut mass = 0.0;
            let below_p = |&&q: &&f64| {
                let before = mass;
                mass += q / total;
                before < p
            };
            kept = probs.iter().take_while(below_p).count().max(1);
        }
        let kept_total: f64 = probs[..kept].iter().sum();
        let mut draw = u * kept_total;
        for (&id, q) in order.iter().zip(&probs).take(kept) {
            draw -= q;
            if draw <= 0.0 {
                return id as u32;
            }
        }
        order[kept - 1] as u32
    }

    /// Random logits of a 49k vocabulary, peaked or flat, with ties.
    fn logits(rng: &mut rand::rngs::StdRng, vocab: usize, spread: f32) -> Vec<f32> {
        (0..vocab).map(|_| (rng.random::<f32>() * spread * 8.0).round() / 8.0).collect()
    }

    #[test]
    fn ranking_on_demand_samples_what_a_full_sort_samples() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut agreed = 0;
        for case in 0..200 {
            let vocab = [49_152, 1000, 70, 3][case % 4];
            let logits = logits(&mut rng, vocab, [30.0, 4.0, 0.5][case % 3]);
            let k = [None, Some(1), Some(40), Some(5000)][case % 4 / 2 + case % 2 * 2];
            let p = [None, Some(0.9), Some(0.3), Some(1.0)][(case / 3) % 4];
            let temperature = [0.7, 1.0, 1.6][case % 3];
            for _ in 0..5 {
                let u = rng.random::<f64>();
                let ours = sample(&logits, temperature, k, p, u);
                // Sums taken in another order may move a draw that lands on a boundary; the
                // draws here never do, so the tokens agree exactly.
                assert_eq!(ours, sample_by_full_sort(&logits, temperature, k, p, u), "case {case}: k {k:?} p {p:?}");
                agreed += 1;
            }
        }
        assert_eq!(agreed, 1000);
    }

    #[test]
    fn top_k_and_top_p_keep_only_the_most_likely() {
        let logits = [1.0, 5.0, 3.0, 5.0, -2.0, 4.0];
        // Top-1 is the first of the tied best (id 1), whatever the draw.
        for u in [0.0, 0.5, 0.999] {
            assert_eq!(sample(&logits, 1.0, Some(1), None, u), 1);
        }
        // Top-3 is {1, 3, 5}: the last draw lands on the least likely of them.
        assert_eq!(sample(&logits, 1.0, Some(3), None, 0.9999), 5);
        // p small: only the most likely token.
        assert_eq!(sample(&logits, 1.0, None, Some(0.01), 0.9999), 1);
        let mut seen = [0; 6];
        for i in 0..1000 {
            seen[sample(&logits, 4.0, None, None, i as f64 / 1000.0) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 0), "every token is reachable without k or p: {seen:?}");
    }
}
