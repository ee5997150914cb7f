//! Learning-rate schedules as data.
//!
//! A schedule is a pure function of the step ([`LrSchedule::lr_at`]), so it has no state of its
//! own: a checkpoint stores the schedule's config and the step, and a resumed run gets exactly
//! the learning rates the uninterrupted run would have used.
//!
//! Every schedule starts with a linear warmup (Adam's second-moment estimate is noisy for the
//! first few hundred steps, and large early updates can push a fresh Transformer into a region
//! it never recovers from), then follows its [`Decay`]:
//!
//! ```text
//!  lr ┤    ______________            cosine:   warmup, then half a cosine down to min_lr
//!     │   /              `--.__      linear:   warmup, then a straight line down to min_lr
//!     │  /                     `--.  constant: warmup, then lr for ever
//!     │ /                          \ wsd:      warmup, lr ("stable"), then the last
//! min ┤/                            \___       `decay_fraction` of the run decays to min_lr
//!     └──────────────────────────────┬────
//!      0   warmup_steps        total_steps
//! ```
//!
//! Warmup-stable-decay (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond
//! Fixed Training Durations"; MiniCPM) keeps the rate flat until the final stretch, so a run can
//! be extended from any stable-phase checkpoint and only the short decay is repeated.
//!
//! Inverse square root is the original Transformer's schedule (Vaswani et al. 2017, §5.3),
//! written here in its peak form. The paper's
//!
//! ```text
//! lr(s) = d_model^-0.5 · min(s^-0.5, s · warmup^-1.5)        (s = 1, 2, … the update number)
//! ```
//!
//! rises linearly to its peak `d_model^-0.5 · warmup^-0.5` at `s = warmup` and then falls as
//! `s^-0.5`. That is `lr · min(s / warmup, sqrt(warmup / s))` with `lr` the peak, which is what
//! `lr_at(step)` gives for `s = step + 1` (the warmup below is the same line). So the paper's
//! schedule is `decay = inverse_sqrt` with `lr = `[`vaswani_peak_lr`]`(d_model, warmup)`: for
//! the base model (d_model 512, 4000 warmup steps) a peak of 7.0e-4. It never reaches `min_lr`,
//! and does not use it or `total_steps`.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A learning-rate schedule. `step` counts optimizer steps already taken: `lr_at(0)` is the rate
/// of the first update.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LrSchedule {
    /// Peak learning rate, reached at the end of warmup.
    pub lr: f64,
    /// Floor the decaying schedules end at (and stay at after `total_steps`). nanoGPT and the
    /// Chinchilla runs use `lr / 10`.
    #[serde(default)]
    pub min_lr: f64,
    /// Steps of linear warmup; step `i < warmup_steps` gets `lr * (i + 1) / warmup_steps`, so the
    /// very first update is small but not zero (a zero-rate step would be wasted).
    #[serde(default)]
    pub warmup_steps: u64,
    /// Length of the run; the decay ends here.
    pub total_steps: u64,
    pub decay: Decay,
}

/// What happens after warmup.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Decay {
    /// Stay at `lr` (min_lr unused): for short fine-tunes and debugging.
    Constant,
    /// Half a cosine from `lr` to `min_lr` over `warmup_steps..total_steps` (GPT-3, Llama).
    Cosine,
    /// A straight line from `lr` to `min_lr` over `warmup_steps..total_steps`.
    Linear,
    /// Warmup-stable-decay: `lr` until the last `decay_fraction` of `total_steps`, then `shape`
    /// down to `min_lr`. 0.1–0.2 is typical.
    Wsd {
        decay_fraction: f64,
        #[serde(default)]
        shape: DecayShape,
    },
    /// `lr · sqrt(warmup_steps / (step + 1))` after warmup: Vaswani et al.'s schedule (see the
    /// module docs). Needs `warmup_steps ≥ 1`.
    InverseSqrt,
}

/// The peak learning rate of Vaswani et al.'s schedule, `d_model^-0.5 · warmup^-0.5`: with it,
/// `decay = inverse_sqrt` reproduces the paper's `lrate` exactly.
pub fn vaswani_peak_lr(d_model: usize, warmup_steps: u64) -> f64 {
    (d_model as f64 * warmup_steps as f64).powf(-0.5)
}

/// The curve of a WSD decay phase, as a function of progress `t` in `[0, 1]`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum DecayShape {
    /// `1 - t`.
    Linear,
    /// `(1 + cos(pi t)) / 2`.
    Cosine,
    /// `1 - sqrt(t)`: drops quickly at first; matched cosine in Hägele et al. 2024.
    #[default]
    OneMinusSqrt,
}

impl DecayShape {
    /// Fraction of the way from `min_lr` to `lr` at progress `t` in `[0, 1]`: 1 at 0, 0 at 1.
    fn factor(self, t: f64) -> f64 {
        match self {
            DecayShape::Linear => 1.0 - t,
            DecayShape::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * t).cos()),
            DecayShape::OneMinusSqrt => 1.0 - t.sqrt(),
        }
    }
}

impl LrSchedule {
    /// The learning rate for the update taken at `step` (0-based). Pure: depends only on `self`
    /// and `step`. Past `total_steps`, decaying schedules stay at `min_lr`.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let (start, shape) = match self.decay {
            Decay::Constant => return self.lr,
            Decay::InverseSqrt => return self.lr * (self.warmup_steps as f64 / (step + 1) as f64).sqrt(),
            Decay::Cosine => (self.warmup_steps, DecayShape::Cosine),
            Decay::Linear => (self.warmup_steps, DecayShape::Linear),
            Decay::Wsd { shape, .. } => (self.total_steps - self.decay_steps(), shape),
        };
        if step < start {
            return self.lr; // WSD's stable phase
        }
        if step >= self.total_steps {
            return self.min_lr;
        }
        let t = (step - start) as f64 / (self.total_steps - start) as f64;
        self.min_lr + (self.lr - self.min_lr) * shape.factor(t)
    }

    /// Length of the decay phase in steps: `total - warmup` for cosine/linear, the rounded
    /// `decay_fraction * total_steps` for WSD, 0 for constant and inverse square root (which
    /// decays for ever, with no phase of its own).
    pub fn decay_steps(&self) -> u64 {
        match self.decay {
            Decay::Constant | Decay::InverseSqrt => 0,
            Decay::Cosine | Decay::Linear => self.total_steps.saturating_sub(self.warmup_steps),
            Decay::Wsd { decay_fraction, .. } => {
                let steps = (decay_fraction * self.total_steps as f64).round();
                (steps.max(0.0) as u64).min(self.total_steps)
            }
        }
    }

    /// Every problem with the settings, each naming its field.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            problems.push(format!("schedule.lr = {}, expected a positive number", self.lr));
        }
        if !(self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            problems.push(format!("schedule.min_lr = {}, expected 0 <= min_lr <= lr = {}", self.min_lr, self.lr));
        }
        if self.total_steps == 0 {
            problems.push("schedule.total_steps = 0, expected a positive number".into());
        }
        if self.warmup_steps > self.total_steps {
            problems.push(format!(
                "schedule.warmup_steps = {} exceeds total_steps = {}",
                self.warmup_steps, self.total_steps
            ));
        }
        if self.decay == Decay::InverseSqrt && self.warmup_steps == 0 {
            problems.push(
                "schedule.warmup_steps = 0, but inverse_sqrt decays as sqrt(warmup_steps / step) and needs at least 1\nHINT: the original Transformer used 4000 warmup steps".into(),
            );
        }
        if let Decay::Wsd { decay_fraction, .. } = self.decay {
            if !(decay_fraction > 0.0 && decay_fraction <= 1.0) {
                problems.push(format!("schedule.decay.decay_fraction = {decay_fraction}, expected 0 < fraction <= 1"));
            } else if self.warmup_steps + self.decay_steps() > self.total_steps {
                problems.push(format!(
                    "schedule: warmup_steps ({}) + decay phase ({} = {decay_fraction} x total_steps) exceed total_steps = {}\nHINT: lower decay_fraction or warmup_steps, or raise total_steps",
                    self.warmup_steps,
                    self.decay_steps(),
                    self.total_steps
                ));
            }
        }
        problems
    }

    /// `Ok` when [`problems`](Self::problems) is empty, otherwise one error listing them all.
    pub fn validate(&self) -> Result<()> {
        Error::check_problems("learning-rate schedule", self.problems())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(decay: Decay) -> LrSchedule {
        LrSchedule { lr: 1e-3, min_lr: 1e-4, warmup_steps: 10, total_steps: 110, decay }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1e-12)
    }

    #[test]
    fn warmup_is_linear_and_reaches_peak_on_its_last_step() {
        for decay in [
            Decay::Constant,
            Decay::Cosine,
            Decay::Linear,
            Decay::Wsd { decay_fraction: 0.2, shape: DecayShape::Linear },
        ] {
            let s = schedule(decay);
            assert!(close(s.lr_at(0), 1e-4), "{s:?}");
            assert!(close(s.lr_at(4), 5e-4));
            assert!(close(s.lr_at(9), 1e-3));
            assert!(close(s.lr_at(10), 1e-3), "first post-warmup step is the peak: {s:?}");
        }
    }

    #[test]
    fn no_warmup_starts_at_peak() {
        let s = LrSchedule { warmup_steps: 0, ..schedule(Decay::Cosine) };
        assert!(close(s.lr_at(0), 1e-3));
    }

    #[test]
    fn cosine_hits_midpoint_and_floor() {
        let s = schedule(Decay::Cosine);
        assert!(close(s.lr_at(60), 0.5 * (1e-3 + 1e-4)), "half way: {}", s.lr_at(60));
        assert!(s.lr_at(109) > 1e-4 && s.lr_at(109) < 1.01e-4);
        assert_eq!(s.lr_at(110), 1e-4);
        assert_eq!(s.lr_at(10_000), 1e-4);
        let lrs: Vec<f64> = (10..=110).map(|i| s.lr_at(i)).collect();
        assert!(lrs.windows(2).all(|w| w[1] <= w[0]), "cosine decay is monotone");
    }

    #[test]
    fn linear_decays_in_a_straight_line() {
        let s = schedule(Decay::Linear);
        assert!(close(s.lr_at(35), 1e-3 - 0.25 * 9e-4));
        assert!(close(s.lr_at(60), 5.5e-4));
        assert_eq!(s.lr_at(110), 1e-4);
    }

    #[test]
    fn constant_never_decays() {
        let s = schedule(Decay::Constant);
        assert_eq!(s.lr_at(50), 1e-3);
        assert_eq!(s.lr_at(1_000_000), 1e-3);
    }

    #[test]
    fn wsd_is_flat_until_the_decay_phase() {
        // 110 steps, fraction 0.2 -> 22 decay steps: decay starts at step 88.
        let s = schedule(Decay::Wsd { decay_fraction: 0.2, shape: DecayShape::Linear });
        assert_eq!(s.decay_steps(), 22);
        assert_eq!(s.lr_at(10), 1e-3);
        assert_eq!(s.lr_at(87), 1e-3);
        assert!(close(s.lr_at(88), 1e-3));
        assert!(close(s.lr_at(99), 1e-4 + 9e-4 * 0.5));
        assert!(s.lr_at(109) < 1.5e-4);
        assert_eq!(s.lr_at(110), 1e-4);
        let sqrt = schedule(Decay::Wsd { decay_fraction: 0.2, shape: DecayShape::OneMinusSqrt });
        assert!(close(sqrt.lr_at(99), 1e-4 + 9e-4 * (1.0 - 0.5f64.sqrt())));
        let cos = schedule(Decay::Wsd { decay_fraction: 0.2, shape: DecayShape::Cosine });
        assert!(close(cos.lr_at(99), 5.5e-4));
    }

    #[test]
    fn inverse_sqrt_is_the_papers_schedule() {
        // Vaswani et al. 2017, eq. (3), for the base model: d_model 512, 4000 warmup steps.
        let (d_model, warmup) = (512usize, 4000u64);
        let s = LrSchedule {
            lr: vaswani_peak_lr(d_model, warmup),
            min_lr: 0.0,
            warmup_steps: warmup,
            total_steps: 100_000,
            decay: Decay::InverseSqrt,
        };
        let paper = |step: u64| {
            let n = (step + 1) as f64; // the paper counts updates from 1
            (d_model as f64).powf(-0.5) * n.powf(-0.5).min(n * (warmup as f64).powf(-1.5))
        };
        for step in [0, 1, 999, 3998, 3999, 4000, 4001, 10_000, 99_999, 1_000_000] {
            let (ours, theirs) = (s.lr_at(step), paper(step));
            assert!((ours - theirs).abs() <= 1e-15 * theirs, "step {step}: {ours} vs {theirs}");
        }
        assert!((s.lr_at(3999) - 6.987712429686843e-4).abs() < 1e-15, "the base model's peak");
        assert_eq!(s.decay_steps(), 0);
        assert!(s.validate().is_ok());
        let no_warmup = LrSchedule { warmup_steps: 0, ..s };
        assert!(no_warmup.validate().unwrap_err().to_string().contains("inverse_sqrt"));
        let parsed: Decay = serde_json::from_str(r#"{"kind": "inverse_sqrt"}"#).unwrap();
        assert_eq!(parsed, Decay::InverseSqrt);
    }

    #[test]
    fn serde_round_trip_and_defaults() {
        let text = r#"{"lr": 0.001, "total_steps": 100, "decay": {"kind": "wsd", "decay_fraction": 0.1}}"#;
        let s: LrSchedule = serde_json::from_str(text).unwrap();
        assert_eq!(s.decay, Decay::Wsd { decay_fraction: 0.1, shape: DecayShape::OneMinusSqrt });
        assert_eq!((s.min_lr, s.warmup_steps), (0.0, 0));
        let back: LrSchedule = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        assert!(serde_json::from_str::<LrSchedule>(
            r#"{"lr": 1, "total_steps": 1, "decay": {"kind": "cosine"}, "typo": 1}"#
        )
        .is_err());
    }

    #[test]
    fn validation_names_fields() {
        let bad = LrSchedule { lr: -1.0, min_lr: 0.0, warmup_steps: 50, total_steps: 40, decay: Decay::Cosine };
        let msg = bad.validate().unwrap_err().to_string();
        assert!(msg.contains("schedule.lr") && msg.contains("schedule.warmup_steps"), "{msg}");
        let wsd =
            LrSchedule { warmup_steps: 95, ..schedule(Decay::Wsd { decay_fraction: 0.2, shape: DecayShape::Linear }) };
        assert!(wsd.validate().unwrap_err().to_string().contains("HINT"));
        assert!(schedule(Decay::Wsd { decay_fraction: 0.0, shape: DecayShape::Linear }).validate().is_err());
        assert!(schedule(Decay::Cosine).validate().is_ok());
    }
}
