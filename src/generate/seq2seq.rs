//! Decoding a target from a source with an encoder–decoder model: greedy, sampled, or beam
//! search, for one source or a batch of them.
//!
//! Every search encodes its sources once and projects the encoder output into each decoder
//! layer's cross-attention keys and values once ([`Model::start_decoding`]); each step then
//! feeds one token per hypothesis through the decoder's incremental self-attention cache.
//!
//! Beam search keeps `N` hypotheses per source as rows of one batch. A step scores every
//! continuation of every live hypothesis (`log p` summed along the hypothesis), takes the best
//! `2N` of a source's candidates in order, finishes those that end in the end token (only while
//! among the first `N`, as transformers does) and keeps the first `N` others alive; the cache
//! rows are then reordered to follow their hypotheses. A finished hypothesis is ranked by
//! `Σ log p / len^α` (`len` counts its tokens including the end token; `α` = `length_penalty`,
//! transformers' definition). A source is done when it has `N` finished hypotheses and no live
//! one can still beat the worst of them (`best live Σ log p / len^α`, transformers'
//! `early_stopping = False`). At the length limit the live hypotheses are ranked with the
//! finished ones. With `N = 1` this is greedy decoding exactly.

use candle_core::{DType, Tensor, D};

use super::Sampler;
use crate::error::{Error, Result};
use crate::model::{Encoded, Model};

/// How the next tokens are chosen.
pub enum Search<'s> {
    /// The most likely token at each step.
    Greedy,
    /// Drawn by a sampler (temperature, top-k, top-p, seed).
    Sample(&'s mut Sampler),
    /// Beam search with `beams` hypotheses per source; finished ones are ranked by
    /// `Σ log p / len^length_penalty`.
    Beam { beams: usize, length_penalty: f64 },
}

/// The limits and stop tokens of a seq2seq generation.
#[derive(Clone, Debug)]
pub struct Seq2SeqOptions {
    /// New tokens at most (also capped by the model's positions).
    pub max_new_tokens: usize,
    /// Tokens that end a target besides the model's own end token (e.g. the tokenizer's).
    pub stop: Vec<u32>,
}

/// A generated target.
#[derive(Clone, Debug, PartialEq)]
pub struct Hypothesis {
    /// The new tokens after the decoder start token, ending with a stop token when one was
    /// produced.
    pub ids: Vec<u32>,
    /// `Σ log p` of `ids` under the model.
    pub log_prob: f64,
}

impl Hypothesis {
    /// Beam search's ranking score: `log_prob / len^α`.
    pub fn score(&self, length_penalty: f64) -> f64 {
        self.log_prob / (self.ids.len().max(1) as f64).powf(length_penalty)
    }
}

/// Generate a target for one source.
pub fn generate_seq2seq(
    model: &Model,
    source: &[u32],
    options: &Seq2SeqOptions,
    search: Search,
    on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Hypothesis> {
    let mut out = generate_seq2seq_batch(model, &[source.to_vec()], options, search, on_token)?;
    Ok(out.pop().expect("one source in, one hypothesis out"))
}

/// Generate a target for each of `sources`, decoded together as one right-padded batch.
/// `on_token` sees the tokens of a one-source greedy or sampled run as they are chosen (with
/// several sources or beams, nothing is final before the end).
pub fn generate_seq2seq_batch(
    model: &Model,
    sources: &[Vec<u32>],
    options: &Seq2SeqOptions,
    search: Search,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Vec<Hypothesis>> {
    let Some(start) = model.decoder_start_token_id() else {
        return Err(Error::Input(
            "a source was given, but this is a decoder-only model\nHINT: pass the text as --prompt (or --ids) instead"
                .into(),
        ));
    };
    if sources.is_empty() {
        return Ok(Vec::new());
    }
    let context = model.config().context_length;
    for (i, source) in sources.iter().enumerate() {
        let which = if sources.len() == 1 { "the source".to_string() } else { format!("source {i}") };
        if source.is_empty() {
            return Err(Error::Input(format!("{which} is empty: give at least one token")));
        }
        if source.len() > context {
            return Err(Error::Input(format!(
                "{which} has {} tokens, more than this model's context_length = {context}\nHINT: split the text into shorter pieces",
                source.len()
            )));
        }
    }
    let mut stop = options.stop.clone();
    stop.extend(model.eos_token_id());
    // The decoder reads the start token and then each new token but the last.
    let max_new = options.max_new_tokens.min(context);
    let encoded = encode_batch(model, sources)?;
    let streaming = sources.len() == 1;
    match search {
        Search::Greedy => step_each(model, &encoded, start, &stop, max_new, argmax_rows, streaming, on_token),
        Search::Sample(sampler) => {
            let pick = |logits: &Tensor| -> Result<Vec<u32>> {
                (0..logits.dim(0)?).map(|row| sampler.pick(&logits.get(row)?)).collect()
            };
            step_each(model, &encoded, start, &stop, max_new, pick, streaming, on_token)
        }
        Search::Beam { beams, length_penalty } => {
            if beams == 0 {
                return Err(Error::Input("--beams 0: expected at least 1".into()));
            }
            if !length_penalty.is_finite() {
                return Err(Error::Input(format!("--length-penalty {length_penalty}: expected a finite number")));
            }
            let hypotheses = beam_search(model, &encoded, start, &stop, max_new, beams, length_penalty)?;
            if streaming {
                hypotheses[0].ids.iter().try_for_each(|&id| on_token(id))?;
            }
            Ok(hypotheses)
        }
    }
}

/// Encode `sources` as one right-padded batch.
fn encode_batch(model: &Model, sources: &[Vec<u32>]) -> Result<Encoded> {
    let width = sources.iter().map(Vec::len).max().unwrap_or(0);
    let lengths: Vec<usize> = sources.iter().map(Vec::len).collect();
    // Padding positions are masked, so any id serves; the first source's first token is valid.
    let pad = sources[0][0];
    let flat: Vec<u32> =
        sources.iter().flat_map(|s| s.iter().copied().chain(std::iter::repeat_n(pad, width - s.len()))).collect();
    let ids = Tensor::from_vec(flat, (sources.len(), width), model.device())?;
    let padded = lengths.iter().any(|&l| l < width);
    model.encode(&ids, padded.then_some(lengths.as_slice()))
}

/// Greedy or sampled decoding, one token per source per step, until every source has produced
/// a stop token or `max_new` tokens. `pick` chooses a token per row of logits `(B, V)`.
#[allow(clippy::too_many_arguments)]
fn step_each(
    model: &Model,
    encoded: &Encoded,
    start: u32,
    stop: &[u32],
    max_new: usize,
    mut pick: impl FnMut(&Tensor) -> Result<Vec<u32>>,
    streaming: bool,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Vec<Hypothesis>> {
    let rows = encoded.batch_size();
    let mut cache = model.start_decoding(encoded)?;
    let mut out: Vec<Hypothesis> = vec![Hypothesis { ids: Vec::new(), log_prob: 0.0 }; rows];
    let mut done = vec![false; rows];
    let mut input = vec![start; rows];
    for _ in 0..max_new {
        let ids = Tensor::from_vec(input.clone(), (rows, 1), model.device())?;
        let logits = model.forward(&ids, Some(&mut cache))?.squeeze(1)?.to_dtype(DType::F32)?; // (B, V)
        let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?.to_vec2::<f32>()?;
        let chosen = pick(&logits)?;
        for row in 0..rows {
            if done[row] {
                continue;
            }
            let id = chosen[row];
            out[row].ids.push(id);
            out[row].log_prob += log_probs[row][id as usize] as f64;
            if streaming {
                on_token(id)?;
            }
            done[row] = stop.contains(&id);
            input[row] = id;
        }
        if done.iter().all(|&d| d) {
            break;
        }
    }
    Ok(out)
}

/// Index of the largest value of each row of `(B, V)` (the first on ties, as `torch.argmax`).
fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.to_vec2::<f32>()?.iter().map(|row| super::argmax(row)).collect())
}

/// A live beam: its tokens and `Σ log p`.
#[derive(Clone)]
struct Beam {
    ids: Vec<u32>,
    log_prob: f64,
}

/// Finished hypotheses of one source, at most `beams`, best first by score.
struct Finished {
    beams: usize,
    length_penalty: f64,
    list: Vec<(f64, Hypothesis)>,
}

impl Finished {
    fn add(&mut self, hypothesis: Hypothesis) {
        let score = hypothesis.score(self.length_penalty);
        if self.list.len() == self.beams && score <= self.worst() {
            return;
        }
        let at = self.list.partition_point(|(s, _)| *s >= score);
        self.list.insert(at, (score, hypothesis));
        self.list.truncate(self.beams);
    }

    fn worst(&self) -> f64 {
        self.list.last().map_or(f64::NEG_INFINITY, |(s, _)| *s)
    }

    /// Whether no live beam, best `Σ log p` so far `best_live` at length `len`, can still make
    /// the list (transformers' `early_stopping = False` heuristic).
    fn is_done(&self, best_live: f64, len: usize) -> bool {
        self.list.len() == self.beams && self.worst() >= best_live / (len as f64).powf(self.length_penalty)
    }
}

fn beam_search(
    model: &Model,
    encoded: &Encoded,
    start: u32,
    stop: &[u32],
    max_new: usize,
    beams: usize,
    length_penalty: f64,
) -> Result<Vec<Hypothesis>> {
    let sources = encoded.batch_size();
    // Rows `b·N .. (b+1)·N` are the beams of source `b`.
    let rows: Vec<u32> = (0..sources as u32).flat_map(|b| std::iter::repeat_n(b, beams)).collect();
    let mut cache = model.start_decoding(&encoded.select(&rows)?)?;
    // At the start only beam 0 of each source is live, so the first step does not pick the
    // same token N times.
    let mut live: Vec<Vec<Beam>> = vec![vec![Beam { ids: Vec::new(), log_prob: 0.0 }]; sources];
    let mut finished: Vec<Finished> =
        (0..sources).map(|_| Finished { beams, length_penalty, list: Vec::new() }).collect();
    let mut done = vec![false; sources];
    let mut input = vec![start; sources * beams];
    for step in 1..=max_new {
        let ids = Tensor::from_vec(input.clone(), (sources * beams, 1), model.device())?;
        let logits = model.forward(&ids, Some(&mut cache))?.squeeze(1)?.to_dtype(DType::F32)?; // (B·N, V)
        let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?.to_vec2::<f32>()?;
        let mut parents: Vec<u32> = Vec::with_capacity(sources * beams);
        for b in 0..sources {
            let base = b * beams;
            if done[b] {
                parents.extend(std::iter::repeat_n(base as u32, beams));
                continue;
            }
            let candidates = best_candidates(&live[b], &log_probs[base..base + beams], 2 * beams);
            let mut next: Vec<Beam> = Vec::with_capacity(beams);
            let mut next_parents: Vec<u32> = Vec::with_capacity(beams);
            for (rank, (parent, token, log_prob)) in candidates.into_iter().enumerate() {
                let mut ids = live[b][parent].ids.clone();
                ids.push(token);
                if stop.contains(&token) {
                    if rank < beams {
                        finished[b].add(Hypothesis { ids, log_prob });
                    }
                } else {
                    next.push(Beam { ids, log_prob });
                    next_parents.push((base + parent) as u32);
                }
                if next.len() == beams {
                    break;
                }
            }
            let best_live = next.first().map_or(f64::NEG_INFINITY, |beam| beam.log_prob);
            done[b] = next.is_empty() || finished[b].is_done(best_live, step);
            for (k, beam) in next.iter().enumerate() {
                input[base + k] = *beam.ids.last().expect("a beam has a token");
            }
            // Rows without a live beam (fewer than N continuations) copy row `base`.
            next_parents.resize(beams, base as u32);
            parents.extend(next_parents);
            live[b] = next;
        }
        if done.iter().all(|&d| d) {
            break;
        }
        cache.reorder(&parents)?;
    }
    Ok(finished
        .into_iter()
        .zip(live)
        .map(|(mut finished, live)| {
            for beam in live {
                finished.add(Hypothesis { ids: beam.ids, log_prob: beam.log_prob });
            }
            finished.list.into_iter().next().map(|(_, h)| h).unwrap_or(Hypothesis { ids: Vec::new(), log_prob: 0.0 })
        })
        .collect())
}

/// The `k` best continuations `(beam, token, Σ log p)` of the live beams, best first (ties: the
/// lower beam, then the lower token). `log_probs[i]` are beam `i`'s next-token log-probs.
fn best_candidates(live: &[Beam], log_probs: &[Vec<f32>], k: usize) -> Vec<(usize, u32, f64)> {
    let mut all: Vec<(usize, u32, f64)> = Vec::with_capacity(live.len() * log_probs[0].len());
    for (i, beam) in live.iter().enumerate() {
        all.extend(log_probs[i].iter().enumerate().map(|(token, &lp)| (i, token as u32, beam.log_prob + lp as f64)));
    }
    let order =
        |a: &(usize, u32, f64), b: &(usize, u32, f64)| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)).then(a.1.cmp(&b.1));
    if all.len() > k {
        all.select_nth_unstable_by(k - 1, order);
        all.truncate(k);
    }
    all.sort_by(order);
    all
}
