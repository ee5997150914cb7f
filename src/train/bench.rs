//! One training step, measured: the code `lmforge bench train` times and `lmforge plan`
//! calibrates with, so a plan's throughput is the benchmark's, not a second guess at it.
//!
//! A step here is what the trainer does per optimizer step at `grad_accum = 1`: the model's
//! training objective on a `(batch, seq)` batch (the language-model loss plus a mixture's
//! router losses), the backward pass, global-norm clipping and an AdamW update.
//! The tokens are a fixed pseudo-random pattern: a step's cost does not depend on their values.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{Tensor, Var};

use super::optim::{AdamW, AdamWConfig};
use super::rng::TrainRng;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::model::Model;

/// Wall-clock seconds of the three phases of one step.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepPhases {
    pub forward: f64,
    pub backward: f64,
    /// Gradient clipping and the AdamW update.
    pub update: f64,
}

impl StepPhases {
    pub fn total(&self) -> f64 {
        self.forward + self.backward + self.update
    }

    /// Add `other` phase by phase.
    pub fn accumulate(&mut self, other: StepPhases) {
        self.forward += other.forward;
        self.backward += other.backward;
        self.update += other.update;
    }
}

/// A model, its optimizer and one batch, ready to step.
pub struct StepBench {
    model: Model,
    vars: HashMap<String, Var>,
    optimizer: AdamW,
    inputs: Tensor,
    targets: Tensor,
    /// What a router's jitter draws from, as the trainer's generator.
    rng: TrainRng,
}

impl StepBench {
    /// Take `weights` (the variables copy them and the originals are dropped, as the trainer
    /// does) and build a `(batch, seq)` batch of tokens below the vocabulary size.
    pub fn new(config: &ModelConfig, weights: HashMap<String, Tensor>, batch: usize, seq: usize) -> Result<Self> {
        let vars: HashMap<String, Var> =
            weights.iter().map(|(n, t)| Ok((n.clone(), Var::from_tensor(t)?))).collect::<Result<_>>()?;
        drop(weights);
        let tensors: HashMap<String, Tensor> = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        let model = Model::new(config, &tensors, Path::new("bench"))?;
        let optimizer = AdamW::for_model(AdamWConfig::default(), config, &vars)?;
        let vocab = config.vocab_size;
        let ids: Vec<u32> = (0..batch * seq).map(|i| (i * 7919 % vocab) as u32).collect();
        let targets: Vec<u32> = (0..batch * seq).map(|i| (i * 104_729 % vocab) as u32).collect();
        let inputs = Tensor::from_vec(ids, (batch, seq), model.device())?; // (B, T)
        let targets = Tensor::from_vec(targets, (batch, seq), model.device())?; // (B, T)
        Ok(StepBench { model, vars, optimizer, inputs, targets, rng: TrainRng::seed_from(0) })
    }

    /// One training step; its phases and the language-model loss. On a GPU each phase waits
    /// for the device to finish its work before the clock is read (kernels run asynchronously).
    pub fn step(&mut self) -> Result<(StepPhases, f32)> {
        let device = self.model.device().clone();
        let t0 = Instant::now();
        let loss = self.model.training_loss(&self.inputs, &self.targets, &mut self.rng)?;
        let objective = loss.objective()?;
        device.synchronize()?;
        let t1 = Instant::now();
        let mut grads = objective.backward()?;
        device.synchronize()?;
        let t2 = Instant::now();
        self.optimizer.clip_grad_norm(&mut grads, 1.0)?;
        self.optimizer.step(&grads, 1e-3)?;
        device.synchronize()?;
        let t3 = Instant::now();
        let phases = StepPhases {
            forward: (t1 - t0).as_secs_f64(),
            backward: (t2 - t1).as_secs_f64(),
            update: (t3 - t2).as_secs_f64(),
        };
        Ok((phases, loss.lm.to_scalar::<f32>()?))
    }

    /// Seconds of one evaluation batch: the loss (and a mixture's routing) without a graph, as
    /// the trainer's evaluation.
    pub fn eval_batch(&self) -> Result<f64> {
        let started = Instant::now();
        self.model.loss_and_routing(&self.inputs.detach(), &self.targets)?.0.to_scalar::<f32>()?;
        Ok(started.elapsed().as_secs_f64())
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    /// The current weights under their parameter names (shared storage, no copy).
    pub fn weights(&self) -> HashMap<String, Tensor> {
        self.vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect()
    }
}

/// The middle of `values` (the upper one of an even count): a timing that one slow outlier,
/// another process taking the core for a moment, does not move. Sorts `values`.
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The process's peak resident memory in bytes (`VmHWM`), where `/proc` reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status_kib("VmHWM:").map(|kib| kib * 1024)
}

/// The process's resident memory now in bytes (`VmRSS`), where `/proc` reports it.
pub fn rss_bytes() -> Option<u64> {
    proc_status_kib("VmRSS:").map(|kib| kib * 1024)
}

/// Restart the peak-memory count from the current resident size (Linux 4.0+: writing `5` to
/// `/proc/self/clear_refs`), so the peak of one phase can be read on its own. `false` where
/// that is not possible.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn proc_status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
