//! Peak memory of a training run: the accounting `lmforge show` prints, plus activations.
//!
//! ```text
//! step peak       = weights + gradients + 2 AdamW moments      (16 bytes per parameter in f32:
//!                                                                ArchReport::training_bytes_f32)
//!                 + activations · batch · seq                   (bytes per token, see below)
//!                 + runtime                                     (the process itself: code,
//!                                                                tokenizer, allocator slack)
//! checkpoint peak = what evaluating, saving a checkpoint (its moments are copied out before
//!                   they are written) and sampling hold on top of what the steps left resident
//! peak            = max(step peak, checkpoint peak)
//! ```
//!
//! On this machine the activation bytes per token and the runtime are *measured*: a rehearsal
//! at two batch sizes gives two peaks, whose slope over the batch's tokens is the activations'
//! and whose intercept, less the training state, the runtime's (see `calibrate`). Elsewhere
//! (an accelerator from a datasheet) they come from [`analytic_activation_bytes_per_token`],
//! a count of the tensors the backward pass keeps.
//!
//! The KV cache is not part of training (the whole sequence is processed at once); it is
//! reported beside the peak for generating with the trained model: one sequence at full
//! context, with the rolling buffer of sliding-window layers capping it at the window.

use serde::Serialize;

use super::calibrate::Calibration;
use crate::config::{Ffn, ModelConfig};

/// How the activation figures were obtained.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MemorySource {
    /// From rehearsals on this machine.
    Measured,
    /// From the tensor count (no rehearsal).
    Analytic,
}

/// A plan's memory, in bytes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MemoryEstimate {
    pub weights: u64,
    pub gradients: u64,
    pub adamw: u64,
    pub activations: u64,
    pub runtime: u64,
    /// During a training step: everything above.
    pub step_peak: u64,
    /// While evaluating, writing a checkpoint and sampling between steps.
    pub checkpoint_peak: u64,
    /// The larger of the two: what the run needs.
    pub peak: u64,
    /// Generating one sequence at full context after training (not part of `peak`).
    pub kv_cache_full_context: u64,
    pub source: MemorySource,
}

/// Activation memory as a function of the batch, for one model at one sequence length.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MemoryModel {
    /// Weights + gradients + moments ([`crate::config::ArchReport::training_bytes_f32`]).
    pub training_state: u64,
    pub weights: u64,
    pub activation_bytes_per_token: f64,
    pub runtime: u64,
    /// The checkpoint's peak when measured (it does not depend on the batch).
    pub checkpoint_peak: Option<u64>,
    pub kv_cache_full_context: u64,
    pub source: MemorySource,
}

impl MemoryModel {
    /// From the tensor count alone.
    pub fn analytic(config: &ModelConfig, seq: usize) -> Self {
        let report = config.report();
        MemoryModel {
            training_state: report.training_bytes_f32 as u64,
            weights: report.weights_bytes_f32 as u64,
            activation_bytes_per_token: analytic_activation_bytes_per_token(config, seq),
            runtime: 0,
            checkpoint_peak: None,
            kv_cache_full_context: report.kv_cache_bytes_full_context_f32 as u64,
            source: MemorySource::Analytic,
        }
    }

    /// From two rehearsals: the slope between their step peaks is the activations per token,
    /// the intercept less the training state the runtime.
    pub fn measured(config: &ModelConfig, calibration: &Calibration) -> Self {
        let analytic = Self::analytic(config, calibration.seq);
        let seq = calibration.seq as f64;
        let (b1, p1) = (calibration.small_batch as f64, calibration.small.step_peak_bytes as f64);
        let (b2, p2) = (calibration.batch as f64, calibration.full.step_peak_bytes as f64);
        // Peaks are noisy by a page or an allocator arena: never a negative slope.
        let per_token = ((p2 - p1) / ((b2 - b1) * seq)).max(0.0);
        let intercept = p2 - per_token * b2 * seq;
        let runtime = (intercept - analytic.training_state as f64).max(0.0) as u64;
        MemoryModel {
            activation_bytes_per_token: per_token,
            runtime,
            checkpoint_peak: calibration.full.checkpoint_peak_bytes,
            source: MemorySource::Measured,
            ..analytic
        }
    }

    /// The estimate at `batch × seq` tokens per micro-batch.
    pub fn estimate(&self, batch: usize, seq: usize) -> MemoryEstimate {
        let activations = (self.activation_bytes_per_token * (batch * seq) as f64) as u64;
        let step_peak = self.training_state + activations + self.runtime;
        // Unmeasured: the state, plus the copied moments, plus the runtime.
        let checkpoint_peak = self
            .checkpoint_peak
            .unwrap_or(self.training_state + (self.training_state - self.weights) / 2 + self.runtime);
        MemoryEstimate {
            weights: self.weights,
            gradients: self.weights,
            adamw: self.training_state - 2 * self.weights,
            activations,
            runtime: self.runtime,
            step_peak,
            checkpoint_peak,
            peak: step_peak.max(checkpoint_peak),
            kv_cache_full_context: self.kv_cache_full_context,
            source: self.source.clone(),
        }
    }

    /// The largest batch (at most `want`) whose estimate fits `limit`; `None` if not even 1.
    pub fn largest_batch_within(&self, want: usize, seq: usize, limit: u64) -> Option<usize> {
        (1..=want.max(1)).rev().find(|&b| self.estimate(b, seq).peak <= limit)
    }
}

/// f32 bytes per token the backward pass keeps, counted from what lmforge's graph saves:
/// per layer the block input and its norm, q/k/v and the attention output (plus the flash
/// kernel's per-head log-sum-exp), the output projection and residual, the second norm, and the
/// feed-forward's inputs and hidden activations (per routed expert for a mixture); at the top
/// the final norm and the logits, which the cross-entropy keeps with their gradient.
pub fn analytic_activation_bytes_per_token(config: &ModelConfig, seq: usize) -> f64 {
    let d = config.d_model as f64;
    let hd = config.head_dim() as f64;
    let (heads, kv) = (config.attention.heads as f64, config.attention.kv_heads as f64);
    let attention = (heads + 2.0 * kv) * hd + heads * hd + heads;
    let ffn = ffn_floats(&config.ffn, d);
    let per_layer = 6.0 * d + attention + ffn;
    let naive_scores = match config.attention.implementation {
        // Scores and probabilities, (B, H, T, T): per token, 2 · heads · T.
        crate::config::AttentionImpl::Naive => 2.0 * heads * seq as f64,
        crate::config::AttentionImpl::Flash => 0.0,
    };
    let head = 2.0 * d + 2.0 * config.vocab_size as f64;
    4.0 * (config.layers as f64 * (per_layer + naive_scores) + head)
}

/// Floats per token an FFN keeps: its hidden activations (gate and up for a gated block) and
/// output; a mixture keeps them per routed expert, plus the gathered inputs and router logits.
fn ffn_floats(ffn: &Ffn, d: f64) -> f64 {
    match ffn {
        Ffn::Mlp { hidden, .. } => 2.0 * *hidden as f64 + d,
        Ffn::Gated { hidden, .. } => 3.0 * *hidden as f64 + d,
        Ffn::Moe { experts, top_k, expert, .. } => *top_k as f64 * (ffn_floats(expert, d) + d) + 2.0 * *experts as f64,
    }
}
