//! Divergence detection: non-finite values and loss spikes.
//!
//! A spike is a loss whose z-score against an exponential moving mean and variance of the recent
//! losses exceeds a threshold. The statistics only learn from accepted steps, so a spike cannot
//! raise the bar for the next one.

use serde::{Deserialize, Serialize};

/// Why a step was rejected.
#[derive(Debug, Clone, PartialEq)]
pub enum Divergence {
    NonFiniteLoss,
    NonFiniteGradients,
    Spike { loss: f64, mean: f64, std: f64, z: f64 },
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Divergence::NonFiniteLoss => write!(f, "non-finite loss"),
            Divergence::NonFiniteGradients => write!(f, "non-finite gradients"),
            Divergence::Spike { loss, mean, std, z } => {
                write!(f, "loss spike: {loss:.4} is {z:.1} standard deviations above the running mean {mean:.4} (std {std:.4})")
            }
        }
    }
}

/// Thresholds; part of the run config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GuardConfig {
    /// Reject a step whose loss is this many standard deviations above the running mean.
    #[serde(default = "default_z")]
    pub spike_zscore: f64,
    /// Accepted steps before spikes are judged (the statistics need a few samples).
    #[serde(default = "default_warmup")]
    pub warmup_steps: u64,
    /// Weight of the newest loss in the running statistics.
    #[serde(default = "default_ema")]
    pub ema: f64,
    /// Stop after this many rollbacks within `rollback_window` steps.
    #[serde(default = "default_max_rollbacks")]
    pub max_rollbacks: usize,
    #[serde(default = "default_rollback_window")]
    pub rollback_window: u64,
    /// After a rollback, multiply the learning rate by this for `cooldown_steps` steps.
    #[serde(default = "default_cooldown_factor")]
    pub cooldown_factor: f64,
    #[serde(default = "default_cooldown_steps")]
    pub cooldown_steps: u64,
}

fn default_z() -> f64 {
    6.0
}
fn default_warmup() -> u64 {
    20
}
fn default_ema() -> f64 {
    0.05
}
fn default_max_rollbacks() -> usize {
    5
}
fn default_rollback_window() -> u64 {
    1000
}
fn default_cooldown_factor() -> f64 {
    0.5
}
fn default_cooldown_steps() -> u64 {
    20
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            spike_zscore: default_z(),
            warmup_steps: default_warmup(),
            ema: default_ema(),
            max_rollbacks: default_max_rollbacks(),
            rollback_window: default_rollback_window(),
            cooldown_factor: default_cooldown_factor(),
            cooldown_steps: default_cooldown_steps(),
        }
    }
}

/// Running loss statistics; saved in checkpoints so a resumed run judges exactly as before.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LossStats {
    pub mean: f64,
    pub var: f64,
    pub count: u64,
}

impl LossStats {
    /// Judge a step; `Ok` steps should then be [`accept`](Self::accept)ed.
    pub fn check(&self, config: &GuardConfig, loss: f64, grads_finite: bool) -> Result<(), Divergence> {
        if !loss.is_finite() {
            return Err(Divergence::NonFiniteLoss);
        }
        if !grads_finite {
            return Err(Divergence::NonFiniteGradients);
        }
        if self.count >= config.warmup_steps {
            // A floor on the deviation keeps a very flat loss curve from flagging noise.
            let std = self.var.sqrt().max(1e-3 * self.mean.abs()).max(1e-6);
            let z = (loss - self.mean) / std;
            if z > config.spike_zscore {
                return Err(Divergence::Spike { loss, mean: self.mean, std, z });
            }
        }
        Ok(())
    }

    pub fn accept(&mut self, config: &GuardConfig, loss: f64) {
        if self.count == 0 {
            self.mean = loss;
            self.var = 0.0;
        } else {
            // West's exponentially weighted mean and variance.
            let alpha = config.ema.max(1.0 / (self.count + 1) as f64);
            let delta = loss - self.mean;
            self.mean += alpha * delta;
            self.var = (1.0 - alpha) * (self.var + alpha * delta * delta);
        }
        self.count += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spikes_and_non_finite_values_are_caught_after_warmup() {
        let config = GuardConfig { warmup_steps: 5, ..GuardConfig::default() };
        let mut stats = LossStats::default();
        for i in 0..50 {
            let loss = 4.0 - 0.01 * i as f64 + 0.02 * ((i * 7) % 3) as f64;
            assert_eq!(stats.check(&config, loss, true), Ok(()));
            stats.accept(&config, loss);
        }
        assert!(matches!(stats.check(&config, 9.0, true), Err(Divergence::Spike { .. })));
        assert_eq!(stats.check(&config, f64::NAN, true), Err(Divergence::NonFiniteLoss));
        assert_eq!(stats.check(&config, 3.5, false), Err(Divergence::NonFiniteGradients));
        assert_eq!(stats.check(&config, 3.6, true), Ok(()));
    }
}
