//! Wall-clock of a training run, from the cost of each thing the training loop does.
//!
//! ```text
//! total = startup                                  (build or load the weights, first-step warm-up)
//!       + steps · grad_accum · step                (forward, backward, clip, AdamW)
//!       + evaluations · eval_batches · eval_batch  (at step 0, every eval_every, and at the end)
//!       + checkpoints · checkpoint                 (at step 0, every checkpoint_every, at the end)
//!       + samples · sample_tokens · token          (every sample_every, and after the last step)
//! ```
//!
//! The counts follow the training loop (`train::trainer`) with `lmforge train`'s default
//! intervals (`train::run_config::TrainSpec`), which the printed commands keep. On this machine
//! each cost is measured by a rehearsal; on an accelerator, steps and evaluations cost their
//! FLOPs at the assumed utilisation and the rest is not estimated.

use serde::Serialize;

use crate::train::run_config::TrainSpec;

/// Seconds each part of the loop costs once.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UnitCosts {
    /// Loading or initialising the weights, and the first step's extra time.
    pub startup: f64,
    /// One micro-batch step (forward, backward and, once per optimizer step, the update).
    pub step: f64,
    pub eval_batch: f64,
    pub checkpoint: f64,
    pub sample_token: f64,
}

/// How often the loop evaluates, checkpoints and samples: `lmforge train`'s defaults.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LoopIntervals {
    pub eval_every: u64,
    /// Validation batches per evaluation: the default, or fewer when the split is smaller.
    pub eval_batches: u64,
    pub checkpoint_every: u64,
    pub sample_every: u64,
    pub sample_tokens: u64,
}

impl LoopIntervals {
    /// `lmforge train`'s defaults, with `val_batches` the batches in one pass over the split.
    pub fn train_defaults(val_batches: u64) -> Self {
        let t = TrainSpec::default();
        LoopIntervals {
            eval_every: t.eval_every,
            eval_batches: if t.eval_batches == 0 { val_batches } else { t.eval_batches.min(val_batches) },
            checkpoint_every: t.checkpoint_every,
            sample_every: t.sample_every,
            sample_tokens: t.sample_tokens as u64,
        }
    }
}

/// Predicted seconds, part by part.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TimeEstimate {
    pub startup: f64,
    pub training: f64,
    pub evaluation: f64,
    pub checkpoints: f64,
    pub samples: f64,
    pub total: f64,
}

/// Times an event happens in a run of `steps`: at every multiple of `every` and at the end
/// (once if the end is a multiple), plus once before the first step when `at_start`.
fn occurrences(steps: u64, every: u64, at_start: bool) -> u64 {
    if every == 0 {
        return 0;
    }
    let end_extra = u64::from(steps > 0 && !steps.is_multiple_of(every));
    u64::from(at_start) + steps / every + end_extra
}

/// The time of a run of `steps` optimizer steps of `grad_accum` micro-batches.
pub fn estimate(costs: &UnitCosts, intervals: &LoopIntervals, steps: u64, grad_accum: u64) -> TimeEstimate {
    let evaluations = occurrences(steps, intervals.eval_every, true);
    let checkpoints = occurrences(steps, intervals.checkpoint_every, true);
    // Samples at multiples of sample_every before the end, and always one after the last step.
    let samples = steps.saturating_sub(1).checked_div(intervals.sample_every).unwrap_or(0) + u64::from(steps > 0);
    let startup = costs.startup;
    let training = (steps * grad_accum) as f64 * costs.step;
    let evaluation = (evaluations * intervals.eval_batches) as f64 * costs.eval_batch;
    let checkpoint_time = checkpoints as f64 * costs.checkpoint;
    let sample_time = (samples * intervals.sample_tokens) as f64 * costs.sample_token;
    TimeEstimate {
        startup,
        training,
        evaluation,
        checkpoints: checkpoint_time,
        samples: sample_time,
        total: startup + training + evaluation + checkpoint_time + sample_time,
    }
}

/// The most optimizer steps whose run fits in `seconds` (0 when not even one does).
pub fn steps_within(costs: &UnitCosts, intervals: &LoopIntervals, grad_accum: u64, seconds: f64) -> u64 {
    // The total grows with the steps, so bisect; 2^50 steps is beyond any budget.
    let fits = |steps: u64| estimate(costs, intervals, steps, grad_accum).total <= seconds;
    if !fits(1) {
        return 0;
    }
    let (mut lo, mut hi) = (1u64, 1u64 << 50);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intervals() -> LoopIntervals {
        LoopIntervals { eval_every: 100, eval_batches: 20, checkpoint_every: 100, sample_every: 200, sample_tokens: 48 }
    }

    #[test]
    fn counts_follow_the_training_loop() {
        // 250 steps: evaluations at 0, 100, 200, 250; checkpoints likewise; samples at 200 and
        // after the end.
        let costs = UnitCosts { startup: 1.0, step: 0.5, eval_batch: 0.1, checkpoint: 2.0, sample_token: 0.01 };
        let t = estimate(&costs, &intervals(), 250, 2);
        assert_eq!(t.training, 250.0);
        assert!((t.evaluation - 4.0 * 20.0 * 0.1).abs() < 1e-9, "{t:?}");
        assert_eq!(t.checkpoints, 8.0);
        assert!((t.samples - 2.0 * 48.0 * 0.01).abs() < 1e-9);
        // A multiple of the interval ends on its regular evaluation: no extra one.
        assert!((estimate(&costs, &intervals(), 200, 1).evaluation - 3.0 * 2.0).abs() < 1e-9);
        assert_eq!(estimate(&costs, &intervals(), 0, 1).total, 1.0 + 20.0 * 0.1 + 2.0);
    }

    #[test]
    fn steps_within_is_the_largest_run_that_fits() {
        let costs = UnitCosts { startup: 3.0, step: 0.25, eval_batch: 0.05, checkpoint: 1.0, sample_token: 0.0 };
        let budget = 600.0;
        let steps = steps_within(&costs, &intervals(), 1, budget);
        assert!(estimate(&costs, &intervals(), steps, 1).total <= budget);
        assert!(estimate(&costs, &intervals(), steps + 1, 1).total > budget);
        assert_eq!(steps_within(&costs, &intervals(), 1, 2.0), 0);
    }
}
