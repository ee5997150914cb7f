//! `lmforge plan`: adopt, adapt or invent, compared for one corpus and one compute budget.
//!
//! For each plan (see [`candidates`]) the planner answers, with the same code the rest of
//! lmforge runs:
//!
//! - **tokens**: the corpus tokenized with the tokenizer the run would use ([`corpus`]);
//! - **memory**: `lmforge show`'s accounting of weights, gradients and AdamW moments, plus
//!   activations measured on this machine at two batch sizes ([`memory`]); the batch is halved
//!   (and gradient accumulation doubled) until the peak fits the memory limit;
//! - **time**: on this machine, a rehearsal of the run's step, evaluation, checkpoint and
//!   sampling ([`calibrate`]) combined by [`time`]; on an accelerator, FLOPs over its datasheet
//!   peak at an assumed utilisation ([`device`]);
//! - **steps**: as many as the budget allows — hours through the time model, FLOPs through the
//!   training FLOPs per step (three times the forward, `ModelConfig::flops_forward_per_token`);
//! - **a loss guide**: the data-constrained Chinchilla law of Muennighoff et al. 2023
//!   ([`scaling`]), which also sizes the *adapt* plan: the parameter count it prefers for this
//!   budget and corpus.
//!
//! The recommendation is the plan with the lowest loss guide among those that fit; every figure
//! behind it and every assumption is in the report.

mod advice;
pub mod calibrate;
pub mod candidates;
pub mod commands;
pub mod corpus;
pub mod device;
pub mod memory;
pub mod scaling;
pub mod time;

use std::collections::HashMap;
use std::path::PathBuf;

use serde::Serialize;

pub use candidates::{Approach, Candidate, MoeShape, PlanSpec, Start};
pub use corpus::{PlanCorpus, TokenizedCorpus};
pub use device::PlanDevice;
pub use memory::{MemoryEstimate, MemoryModel};
pub use time::{TimeEstimate, UnitCosts};

use crate::data::{SequentialBatches, TokenDataset};
use crate::error::{Error, Result};
use calibrate::Calibration;
use scaling::MUENNIGHOFF_2023;
use time::LoopIntervals;

/// The candidates when none are given: the default training model, whose proportions the adapt
/// and invent plans resize.
pub const DEFAULT_CANDIDATES: [&str; 1] = ["tiny-llama"];

/// Tokens per parameter a checkpoint is assumed to have been pretrained on when its loss guide
/// is computed: Chinchilla's compute-optimal ratio (Hoffmann et al. 2022), the least a
/// published model gets (most get far more), so the guide understates adopting.
pub const PRETRAINED_TOKENS_PER_PARAM: f64 = 20.0;

/// How much compute the plans may spend.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Budget {
    /// Wall-clock hours on the plan's device.
    Hours { hours: f64 },
    /// Training FLOPs (forward and backward).
    Flops { flops: f64 },
}

/// Everything `lmforge plan` was asked.
#[derive(Clone, Debug)]
pub struct PlanRequest {
    /// Text files, one prepared dataset directory, or nothing for the bundled corpus.
    pub corpus: Vec<PathBuf>,
    pub budget: Budget,
    pub device: PlanDevice,
    /// Bytes; default: the device's memory.
    pub memory_limit: Option<u64>,
    /// Presets, config files or checkpoints; empty means [`DEFAULT_CANDIDATES`].
    pub candidates: Vec<String>,
    /// Sequences per optimizer step (split into micro-batches when memory is short).
    pub batch_size: usize,
    pub seq_len: usize,
    /// Experts and routing of the invented mixtures.
    pub moe: MoeShape,
    /// Tokenizers, datasets and calibrations are kept here.
    pub cache_dir: PathBuf,
    /// The lmforge binary that runs rehearsals.
    pub exe: PathBuf,
    /// Measure again even where the cache has a calibration.
    pub recalibrate: bool,
    /// Parent of the printed commands' run directories.
    pub runs_dir: PathBuf,
}

/// One costed plan: a row of the table.
#[derive(Clone, Debug, Serialize)]
pub struct PlanRow {
    #[serde(flatten)]
    pub spec: PlanSpec,
    pub params_total: u64,
    pub params_active: u64,
    /// Micro-batch, micro-batches per step, and sequence length.
    pub batch_size: usize,
    pub grad_accum: usize,
    pub seq_len: usize,
    pub steps: u64,
    pub tokens_seen: u64,
    /// Training tokens of the corpus in this plan's tokenizer.
    pub tokens_available: u64,
    pub epochs: f64,
    /// What the seen tokens are worth with repeats discounted (Muennighoff et al. 2023).
    pub effective_tokens: f64,
    pub tokenizer: String,
    pub dataset: PathBuf,
    /// Training FLOPs per token at this sequence length, and for the whole plan.
    pub flops_per_token: f64,
    pub train_flops: f64,
    pub time: TimeEstimate,
    /// The evaluation, checkpoint and sample intervals the time assumes (the command's).
    pub intervals: LoopIntervals,
    pub tokens_per_second: f64,
    pub memory: MemoryEstimate,
    pub loss_guide: f64,
    /// The rehearsal measurements behind `time` and `memory`, on this machine.
    pub calibration: Option<Calibration>,
    /// What to run, in order.
    pub commands: Vec<String>,
}

/// A plan that could not be made, and why.
#[derive(Clone, Debug, Serialize)]
pub struct Excluded {
    pub label: String,
    pub reason: String,
    #[serde(flatten)]
    pub kind: Shortfall,
}

/// What a plan lacked.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "shortfall", rename_all = "snake_case")]
pub enum Shortfall {
    /// Bytes it needs at batch 1.
    Memory { needs_bytes: u64 },
    /// What one step needs: seconds (hours budget) or FLOPs.
    Budget { needs: f64 },
    /// The corpus is too short for one sequence or one validation window.
    Data,
}

/// The chosen plan.
#[derive(Clone, Debug, Serialize)]
pub struct Recommendation {
    /// Index into the rows.
    pub row: usize,
    pub why: String,
}

/// The whole answer.
#[derive(Clone, Debug, Serialize)]
pub struct PlanReport {
    pub corpus: String,
    pub budget: Budget,
    pub device: String,
    pub memory_limit: u64,
    pub batch_size: usize,
    pub seq_len: usize,
    /// The parameter count the loss guide prefers for this budget and corpus (sizes *adapt*).
    pub optimal_params: Option<f64>,
    pub rows: Vec<PlanRow>,
    pub excluded: Vec<Excluded>,
    pub recommendation: Option<Recommendation>,
    pub assumptions: Vec<String>,
}

/// Cost every plan for `request`.
pub fn plan(request: &PlanRequest) -> Result<PlanReport> {
    check_request(request)?;
    std::fs::create_dir_all(&request.cache_dir).map_err(|e| Error::io(&request.cache_dir, e))?;
    let corpus = PlanCorpus::resolve(&request.corpus, &request.cache_dir)?;
    let limit = request.memory_limit.or_else(|| request.device.memory_bytes()).ok_or_else(|| {
        Error::Input("cannot read this machine's memory size\nHINT: give the limit with --memory GiB".into())
    })?;
    let names: Vec<String> = if request.candidates.is_empty() {
        DEFAULT_CANDIDATES.iter().map(|s| s.to_string()).collect()
    } else {
        request.candidates.clone()
    };
    let candidates: Vec<Candidate> = names.iter().map(|n| Candidate::resolve(n)).collect::<Result<_>>()?;
    let mut planner = Planner { request, corpus, limit, tokenized: HashMap::new(), fastest_rate: None };

    let mut specs: Vec<PlanSpec> = Vec::new();
    for candidate in &candidates {
        specs.push(candidates::adopt(candidate));
        if let Some(upcycled) = candidates::invent_upcycled(candidate, request.moe)? {
            specs.push(upcycled);
        }
    }
    let mut outcomes: Vec<(PlanSpec, Outcome)> = Vec::new();
    for spec in specs {
        let outcome = planner.cost(&spec)?;
        outcomes.push((spec, outcome));
    }

    // Adapt and invent from the first dense candidate trained from scratch, sized by the
    // budget its adopt plan measured.
    let mut optimal_params = None;
    let base = candidates.iter().find(|c| !c.is_checkpoint() && !c.is_moe());
    if let Some(base) = base {
        let adopted = outcomes.iter().find_map(|(spec, o)| match o {
            Outcome::Row(row) if spec.label == candidates::adopt(base).label => Some(row.clone()),
            _ => None,
        });
        if let Some(adopted) = adopted {
            let flops = planner.budget_flops(&adopted);
            let n = MUENNIGHOFF_2023.optimal_params(flops, adopted.tokens_available as f64);
            optimal_params = Some(n);
            let adapted = candidates::adapt_resized(base, n)?;
            let dense = adapted.clone().unwrap_or_else(|| candidates::adopt(base));
            let invented = candidates::invent_moe(&dense, base, request.moe)?;
            for spec in adapted.into_iter().chain(invented) {
                let outcome = planner.cost(&spec)?;
                outcomes.push((spec, outcome));
            }
        }
    }

    let mut rows = Vec::new();
    let mut excluded = Vec::new();
    for (_, outcome) in outcomes {
        match outcome {
            Outcome::Row(row) => rows.push(*row),
            Outcome::Excluded(e) => excluded.push(e),
        }
    }
    if rows.is_empty() {
        return Err(advice::nothing_fits(&excluded, request, limit));
    }
    let recommendation = advice::recommend(&rows, limit);
    Ok(PlanReport {
        corpus: planner.corpus.describe(),
        budget: request.budget,
        device: request.device.describe(),
        memory_limit: limit,
        batch_size: request.batch_size,
        seq_len: request.seq_len,
        optimal_params,
        assumptions: advice::assumptions(request, &rows),
        rows,
        excluded,
        recommendation,
    })
}

fn check_request(r: &PlanRequest) -> Result<()> {
    let mut problems = Vec::new();
    match r.budget {
        Budget::Hours { hours } if !(hours > 0.0 && hours.is_finite()) => {
            problems.push(format!("--hours {hours}: expected a positive number"))
        }
        Budget::Flops { flops } if !(flops > 0.0 && flops.is_finite()) => {
            problems.push(format!("--flops {flops}: expected a positive number"))
        }
        _ => {}
    }
    if r.batch_size == 0 {
        problems.push("--batch-size 0: expected at least 1".into());
    }
    if r.seq_len == 0 {
        problems.push("--seq-len 0: expected at least 1".into());
    }
    if r.memory_limit == Some(0) {
        problems.push("--memory 0: expected a positive size in GiB".into());
    }
    if r.moe.experts < 2 || r.moe.top_k == 0 || r.moe.top_k > r.moe.experts {
        problems.push(format!(
            "--experts {} --top-k {}: expected at least 2 experts and 1 <= top-k <= experts",
            r.moe.experts, r.moe.top_k
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Input(problems.join("\n")))
    }
}

/// A costed plan or the reason there is none.
enum Outcome {
    Row(Box<PlanRow>),
    Excluded(Excluded),
}

struct Planner<'r> {
    request: &'r PlanRequest,
    corpus: PlanCorpus,
    limit: u64,
    /// Tokenized corpora by tokenizer (vocab size or checkpoint path).
    tokenized: HashMap<String, TokenizedCorpus>,
    /// The fastest training FLOP/s measured so far, to skip rehearsing a plan that could not
    /// take one step in the budget.
    fastest_rate: Option<f64>,
}

/// A FLOP/s this machine's CPU is not expected to beat, for the skip test before anything is
/// measured.
const OPTIMISTIC_CPU_FLOPS: f64 = 2e12;

impl Planner<'_> {
    fn tokenized(&mut self, spec: &PlanSpec) -> Result<TokenizedCorpus> {
        let key = match &spec.tokenizer_of {
            Some(path) => path.display().to_string(),
            None => format!("bpe-{}", spec.config.vocab_size),
        };
        if let Some(t) = self.tokenized.get(&key) {
            return Ok(t.clone());
        }
        let cache = &self.request.cache_dir;
        let tokenized = match &spec.tokenizer_of {
            Some(path) => {
                let tokenizer = crate::io::read_tokenizer(path)?.ok_or_else(|| {
                    Error::checkpoint(path, "carries no tokenizer, so its corpus cannot be counted\nHINT: use a checkpoint with tokenizer.json (or a GGUF with tokenizer metadata)")
                })?;
                let name = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
                self.corpus.for_tokenizer(&tokenizer, &name, cache)?
            }
            None => self.corpus.for_new_model(spec.config.vocab_size, cache)?,
        };
        self.tokenized.insert(key, tokenized.clone());
        Ok(tokenized)
    }

    /// Cost one plan.
    fn cost(&mut self, spec: &PlanSpec) -> Result<Outcome> {
        let request = self.request;
        let config = &spec.config;
        let seq = request.seq_len.min(config.context_length);
        let excluded = |reason: String, kind: Shortfall| {
            Ok(Outcome::Excluded(Excluded { label: spec.label.clone(), reason, kind }))
        };
        let corpus = self.tokenized(spec)?;
        if corpus.train_tokens <= seq as u64 {
            return excluded(
                format!(
                    "the corpus is {} tokens in {}, fewer than one sequence of {} + 1",
                    corpus.train_tokens, corpus.tokenizer, seq
                ),
                Shortfall::Data,
            );
        }
        let dataset = TokenDataset::open(&corpus.dataset)?;
        if SequentialBatches::new(dataset.val().clone(), seq, 1).is_err() {
            return excluded(
                format!(
                    "the validation split is {} tokens, fewer than one sequence of {} + 1 (training evaluates on it)",
                    corpus.val_tokens, seq
                ),
                Shortfall::Data,
            );
        }

        // Memory first: the largest micro-batch that fits, by the tensor count.
        let analytic = MemoryModel::analytic(config, seq);
        let Some(mut batch) = analytic.largest_batch_within(request.batch_size, seq, self.limit) else {
            let needs = analytic.estimate(1, seq).peak;
            return excluded(
                format!("needs {} at batch 1 x {seq} (estimated)", gib(needs)),
                Shortfall::Memory { needs_bytes: needs },
            );
        };
        let flops_per_token = 3.0 * config.flops_forward_per_token(seq);
        let budget_seconds = match request.budget {
            Budget::Hours { hours } => Some(hours * 3600.0),
            Budget::Flops { .. } => None,
        };

        let (memory_model, costs, calibration) = match &request.device {
            PlanDevice::ThisCpu => {
                // Never rehearse what this machine cannot hold now, or what could not take a
                // single step in the budget even at an optimistic speed.
                let free = device::meminfo_bytes("MemAvailable:").unwrap_or(u64::MAX);
                let needs = analytic.estimate(batch, seq).peak;
                if needs > free {
                    return excluded(
                        format!("needs about {} at batch {batch} x {seq}; this machine has {} free now, so it was not rehearsed", gib(needs), gib(free)),
                        Shortfall::Memory { needs_bytes: needs },
                    );
                }
                let rate = self.fastest_rate.map_or(OPTIMISTIC_CPU_FLOPS, |r| 2.0 * r);
                let step_guess = flops_per_token * (batch * seq) as f64 / rate;
                if budget_seconds.is_some_and(|s| step_guess > s) {
                    return excluded(
                        format!("needs about {} or more for one step here", seconds(step_guess)),
                        Shortfall::Budget { needs: step_guess },
                    );
                }
                let init = match &spec.start {
                    Start::Continue { from } => Some(from.as_path()),
                    _ => None,
                };
                let calibrator = calibrate::Calibrator {
                    exe: &request.exe,
                    cache: &request.cache_dir,
                    recalibrate: request.recalibrate,
                };
                let rehearse = |batch| calibrator.calibrate(&spec.label, config, init, batch, seq);
                let mut calibration = rehearse(batch)?;
                let mut measured = MemoryModel::measured(config, &calibration);
                if measured.estimate(batch, seq).peak > self.limit {
                    let Some(smaller) = measured.largest_batch_within(batch, seq, self.limit) else {
                        let needs = measured.estimate(1, seq).peak;
                        return excluded(
                            format!("needs {} at batch 1 x {seq} (measured)", gib(needs)),
                            Shortfall::Memory { needs_bytes: needs },
                        );
                    };
                    batch = smaller;
                    calibration = rehearse(batch)?;
                    measured = MemoryModel::measured(config, &calibration);
                }
                let full = &calibration.full;
                let rate = flops_per_token * (batch * seq) as f64 / full.step_seconds;
                self.fastest_rate = Some(self.fastest_rate.map_or(rate, |r| r.max(rate)));
                // An upcycled model is rehearsed from random weights (their initialisation is
                // slow and nothing like reading `lmforge upcycle`'s output), so its load is left out.
                let load = if matches!(spec.start, Start::Upcycle { .. }) { 0.0 } else { full.load_seconds };
                let costs = UnitCosts {
                    startup: load + (full.first_step_seconds - full.step_seconds).max(0.0),
                    step: full.step_seconds,
                    eval_batch: full.eval_batch_seconds.unwrap_or(full.forward_seconds),
                    checkpoint: full.checkpoint_seconds.unwrap_or(0.0),
                    sample_token: full.sample_seconds_per_token.unwrap_or(0.0),
                };
                (measured, costs, Some(calibration))
            }
            PlanDevice::Accelerator { spec: accelerator, mfu } => {
                let rate = accelerator.peak_flops * mfu;
                let step = flops_per_token * (batch * seq) as f64 / rate;
                let costs =
                    UnitCosts { startup: 0.0, step, eval_batch: step / 3.0, checkpoint: 0.0, sample_token: 0.0 };
                (analytic, costs, None)
            }
        };
        let grad_accum = request.batch_size.div_ceil(batch);
        let val_batches = SequentialBatches::new(dataset.val().clone(), seq, batch)?.batches();
        let mut intervals = LoopIntervals::train_defaults(val_batches);
        let tokens_per_step = (batch * grad_accum * seq) as u64;
        let flops_per_step = flops_per_token * tokens_per_step as f64;
        let steps = match request.budget {
            Budget::Hours { hours } => fit_evaluation(&costs, &mut intervals, grad_accum as u64, hours * 3600.0),
            Budget::Flops { flops } => (flops / flops_per_step).floor() as u64,
        };
        if steps == 0 {
            let (needs, what) = match request.budget {
                Budget::Hours { .. } => {
                    let t = time::estimate(&costs, &intervals, 1, grad_accum as u64).total;
                    (
                        t,
                        format!(
                            "{} ({:.4} h) for one step of {batch} x {seq} with start-up, evaluation and checkpoints",
                            seconds(t),
                            t / 3600.0
                        ),
                    )
                }
                Budget::Flops { .. } => (
                    flops_per_step,
                    format!("{flops_per_step:.2e} FLOPs for one step of {} x {seq}", batch * grad_accum),
                ),
            };
            return excluded(format!("needs {what}"), Shortfall::Budget { needs });
        }
        let time = time::estimate(&costs, &intervals, steps, grad_accum as u64);
        let tokens_seen = steps * tokens_per_step;
        let available = corpus.train_tokens;
        let row = PlanRow {
            params_total: config.params_total() as u64,
            params_active: config.params_active() as u64,
            batch_size: batch,
            grad_accum,
            seq_len: seq,
            steps,
            tokens_seen,
            tokens_available: available,
            epochs: tokens_seen as f64 / available as f64,
            effective_tokens: MUENNIGHOFF_2023.effective_tokens(tokens_seen as f64, available as f64),
            tokenizer: corpus.tokenizer.clone(),
            dataset: corpus.dataset.clone(),
            flops_per_token,
            train_flops: flops_per_step * steps as f64,
            tokens_per_second: tokens_seen as f64 / time.training.max(f64::MIN_POSITIVE),
            memory: memory_model.estimate(batch, seq),
            loss_guide: loss_guide(spec, tokens_seen as f64, available as f64)?,
            calibration,
            commands: vec![],
            intervals,
            time,
            spec: spec.clone(),
        };
        let mut row = Box::new(row);
        row.commands = commands::commands(&row, request);
        Ok(Outcome::Row(row))
    }

    /// The training FLOPs the budget buys for the plan `row` (its measured speed on this
    /// machine, or the device's rate).
    fn budget_flops(&self, row: &PlanRow) -> f64 {
        match self.request.budget {
            Budget::Flops { flops } => flops,
            Budget::Hours { hours } => row.train_flops / row.time.training.max(f64::MIN_POSITIVE) * hours * 3600.0,
        }
    }
}

/// Evaluation is kept to at most this share of a time budget: the default 20 validation batches
/// at the start and the end of a short run of a large model can otherwise take most of it.
pub const EVAL_SHARE: f64 = 0.1;

/// The most steps within `seconds`, after lowering the validation batches per evaluation (not
/// below 1) when evaluating would take more than [`EVAL_SHARE`] of the budget.
fn fit_evaluation(costs: &UnitCosts, intervals: &mut LoopIntervals, grad_accum: u64, seconds: f64) -> u64 {
    let steps = time::steps_within(costs, intervals, grad_accum, seconds);
    let evaluation = time::estimate(costs, intervals, steps.max(1), grad_accum).evaluation;
    if evaluation <= EVAL_SHARE * seconds || intervals.eval_batches <= 1 {
        return steps;
    }
    let per_batch = evaluation / intervals.eval_batches as f64;
    intervals.eval_batches = ((EVAL_SHARE * seconds / per_batch).floor() as u64).clamp(1, intervals.eval_batches);
    time::steps_within(costs, intervals, grad_accum, seconds)
}

/// The loss guide of a plan that sees `tokens` of a corpus of `unique` tokens. A continued
/// checkpoint adds its (assumed) pretraining tokens; a mixture from scratch counts its active
/// parameters; an upcycled mixture counts the dense checkpoint's, since it starts as exactly
/// that model and upcycling pays off only after a sizeable share of the original pretraining
/// compute (Komatsuzaki et al. 2022), which the guide cannot tell.
fn loss_guide(spec: &PlanSpec, tokens: f64, unique: f64) -> Result<f64> {
    let (params, pretrained) = match &spec.start {
        Start::Scratch => (spec.config.params_active() as f64, 0.0),
        Start::Continue { from } | Start::Upcycle { from, .. } => {
            let dense = crate::io::read_config(from)?.params_total() as f64;
            let params =
                if matches!(spec.start, Start::Upcycle { .. }) { dense } else { spec.config.params_active() as f64 };
            (params, PRETRAINED_TOKENS_PER_PARAM * dense)
        }
    };
    Ok(MUENNIGHOFF_2023.loss(params, pretrained + tokens, pretrained + unique))
}

const GIB: f64 = (1u64 << 30) as f64;

/// Bytes as GiB, or MiB / KiB below one of the unit.
pub fn gib(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= GIB {
        format!("{:.2} GiB", b / GIB)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.0} MiB", b / (1u64 << 20) as f64)
    } else {
        format!("{:.0} KiB", b / 1024.0)
    }
}

/// Seconds as `1h02m`, `3m05s` or `4.2 s`.
pub fn seconds(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1} s")
    } else if s < 3600.0 {
        let whole = s.round() as u64;
        format!("{}m{:02}s", whole / 60, whole % 60)
    } else {
        let minutes = (s / 60.0).round() as u64;
        format!("{}h{:02}m", minutes / 60, minutes % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evaluation_is_cut_to_its_share_of_a_short_budget() {
        // A large model: a step of 10 s, an evaluation batch of 4 s. With 20 batches at the
        // start and the end, a 10-minute run would evaluate for 160 s.
        let costs = UnitCosts { startup: 5.0, step: 10.0, eval_batch: 4.0, checkpoint: 2.0, sample_token: 0.1 };
        let mut intervals = LoopIntervals::train_defaults(1000);
        assert_eq!(intervals.eval_batches, 20);
        let steps = fit_evaluation(&costs, &mut intervals, 1, 600.0);
        let t = time::estimate(&costs, &intervals, steps, 1);
        assert!(intervals.eval_batches < 20 && intervals.eval_batches >= 1);
        assert!(t.evaluation <= EVAL_SHARE * 600.0 && t.total <= 600.0, "{t:?}");
        // A cheap evaluation is left alone.
        let mut cheap = LoopIntervals::train_defaults(1000);
        fit_evaluation(&UnitCosts { eval_batch: 0.01, ..costs }, &mut cheap, 1, 600.0);
        assert_eq!(cheap.eval_batches, 20);
    }
}
