//! Where a run's wall-clock went, in the parts `lmforge plan` predicts (`plan::time`): start-up,
//! steps, evaluation, checkpoints and samples. The trainer prints it at the end and logs it, so
//! a plan's prediction can be checked part by part against the run it printed the command for.

use std::time::Instant;

use serde::Serialize;

/// Seconds spent in each part of a run. Start-up is what the other parts leave of the whole:
/// preparing the data, building or loading the weights, and everything before the first step
/// that is not an evaluation or a checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RunTime {
    pub start_up: f64,
    /// Every optimizer step (forward, backward, clipping, update, the metrics line), including
    /// steps a rollback discarded.
    pub steps: f64,
    /// Steps this process took (a resumed run's earlier ones are not here).
    pub steps_taken: u64,
    pub evaluation: f64,
    pub checkpoints: f64,
    pub samples: f64,
    pub total: f64,
}

/// Accumulates a [`RunTime`] from the moment the run began.
#[derive(Clone, Debug)]
pub struct RunClock {
    began: Instant,
    spent: RunTime,
}

/// The part of the run a stretch of time belongs to.
#[derive(Clone, Copy, Debug)]
pub enum Part {
    Steps,
    Evaluation,
    Checkpoints,
    Samples,
}

impl RunClock {
    pub fn new(began: Instant) -> Self {
        RunClock { began, spent: RunTime::default() }
    }

    /// Count the time since `since` towards `part`.
    pub fn add(&mut self, part: Part, since: Instant) {
        let seconds = since.elapsed().as_secs_f64();
        let slot = match part {
            Part::Steps => {
                self.spent.steps_taken += 1;
                &mut self.spent.steps
            }
            Part::Evaluation => &mut self.spent.evaluation,
            Part::Checkpoints => &mut self.spent.checkpoints,
            Part::Samples => &mut self.spent.samples,
        };
        *slot += seconds;
    }

    /// The run so far, with start-up the remainder of the elapsed time.
    pub fn so_far(&self) -> RunTime {
        let total = self.began.elapsed().as_secs_f64();
        let s = &self.spent;
        let counted = s.steps + s.evaluation + s.checkpoints + s.samples;
        RunTime { start_up: (total - counted).max(0.0), total, ..s.clone() }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn start_up_is_what_the_counted_parts_leave() {
        let began = Instant::now() - Duration::from_secs(10);
        let mut clock = RunClock::new(began);
        clock.add(Part::Steps, Instant::now() - Duration::from_secs(6));
        clock.add(Part::Evaluation, Instant::now() - Duration::from_secs(1));
        clock.add(Part::Checkpoints, Instant::now() - Duration::from_secs(1));
        clock.add(Part::Samples, Instant::now() - Duration::from_millis(500));
        let t = clock.so_far();
        assert!((t.steps - 6.0).abs() < 0.05 && (t.samples - 0.5).abs() < 0.05, "{t:?}");
        assert!((t.total - 10.0).abs() < 0.05, "{t:?}");
        assert!((t.start_up - 1.5).abs() < 0.1, "{t:?}");
        assert_eq!(t.steps_taken, 1);
    }
}
