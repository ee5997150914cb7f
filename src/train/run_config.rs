//! A training run as data: `RUN.toml`, or the same fields as `lmforge train` flags.
//!
//! Everything has a default, so `lmforge train` with no arguments is the quickstart: a small
//! Llama-style model on the bundled Austen corpus, a few minutes on 2 CPU cores.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::guard::GuardConfig;
use super::optim::AdamWConfig;
use super::schedule::{Decay, LrSchedule};
use crate::data::parallel::ParallelData;
use crate::device::DeviceSpec;
use crate::error::{Error, Result};
use crate::nn::ops::Precision;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The run directory: checkpoints, metrics, tokenizer and prepared data live here.
    #[serde(default = "default_run_dir")]
    pub run_dir: PathBuf,
    #[serde(default)]
    pub model: ModelSpec,
    #[serde(default)]
    pub data: DataSpec,
    #[serde(default)]
    pub train: TrainSpec,
    #[serde(default)]
    pub optimizer: AdamWConfig,
    #[serde(default)]
    pub guard: GuardConfig,
}

fn default_run_dir() -> PathBuf {
    PathBuf::from("runs/quickstart")
}

/// Which architecture, and where its first weights come from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Preset name or config file (.toml/.json). Ignored with `init_from`, which brings its own.
    #[serde(default = "default_arch")]
    pub arch: String,
    /// `--set` overrides on `arch`.
    #[serde(default)]
    pub set: Vec<String>,
    /// Continued pretraining: start from these weights (HF directory, .gguf, lmforge checkpoint)
    /// with a fresh optimizer and schedule. Distinct from resuming a run.
    #[serde(default)]
    pub init_from: Option<PathBuf>,
    /// Seed of the initial weights when training from scratch.
    #[serde(default = "default_seed")]
    pub init_seed: u64,
}

fn default_arch() -> String {
    "tiny-llama".into()
}
fn default_seed() -> u64 {
    1337
}

impl Default for ModelSpec {
    fn default() -> Self {
        ModelSpec { arch: default_arch(), set: vec![], init_from: None, init_seed: default_seed() }
    }
}

/// Where the tokens come from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// A directory made by `lmforge data prepare`. When unset, `train_files` are prepared into
    /// `RUN/data` on first start.
    #[serde(default)]
    pub dataset: Option<PathBuf>,
    /// Text files; empty means the bundled corpus.
    #[serde(default)]
    pub train_files: Vec<PathBuf>,
    /// Validation text; when empty, the last `val_fraction` of each training file.
    #[serde(default)]
    pub val_files: Vec<PathBuf>,
    #[serde(default)]
    pub val_fraction: Option<f64>,
    /// tokenizer.json to use; when unset, the model's own (with `init_from`) or a byte-level
    /// BPE of `vocab_size` trained on the training files into `RUN/tokenizer.json`.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// Aligned pairs for an encoder–decoder model, instead of the text fields above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel: Option<ParallelData>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    #[serde(default = "d_steps")]
    pub steps: u64,
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    #[serde(default = "d_seq")]
    pub seq_len: usize,
    /// Micro-batches per optimizer step (effective batch = batch_size · grad_accum).
    #[serde(default = "d_accum")]
    pub grad_accum: usize,
    #[serde(default = "d_lr")]
    pub lr: f64,
    /// Defaults to lr / 10.
    #[serde(default)]
    pub min_lr: Option<f64>,
    /// Steps of linear warmup; unset means [`default_warmup_steps`] of `steps`, so a default
    /// always fits the run it is used in. A value that cannot fit is an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<u64>,
    #[serde(default = "d_decay")]
    pub decay: Decay,
    /// Clip the global gradient norm to this (0 disables).
    #[serde(default = "d_clip")]
    pub grad_clip: f64,
    /// Label smoothing ε of the training loss (0 = none), for encoder–decoder training on
    /// `data.parallel`; unset: 0.1, as the original Transformer. Validation is unsmoothed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_smoothing: Option<f64>,
    /// Seed of the data order and every other random choice of the run.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Evaluate every N steps and after the last step; 0 = never.
    #[serde(default = "d_eval_every")]
    pub eval_every: u64,
    /// Validation batches per evaluation (0 = the whole split).
    #[serde(default = "d_eval_batches")]
    pub eval_batches: u64,
    /// Print and log a sample every N steps; one is always printed after the last step (the
    /// run's summary shows it), so 0 leaves only that one.
    #[serde(default = "d_sample_every")]
    pub sample_every: u64,
    #[serde(default = "d_prompt")]
    pub sample_prompt: String,
    #[serde(default = "d_sample_tokens")]
    pub sample_tokens: usize,
    #[serde(default = "d_ckpt")]
    pub checkpoint_every: u64,
    /// Checkpoints kept besides the best by validation loss.
    #[serde(default = "d_keep")]
    pub keep_last: usize,
    /// Print a progress line every this many steps.
    #[serde(default = "d_log")]
    pub log_every: u64,
    /// Warn at an evaluation when one expert of a mixture-of-experts layer takes more than this
    /// share of the layer's routed tokens; unset: twice the uniform share (2 / experts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_expert_share: Option<f64>,
    /// Precision of the linear layers' matrix products in training and evaluation: `f32`, or
    /// `bf16` (operands rounded to bf16, products summed in f32; the master weights, the
    /// optimizer, norms, softmax, attention and the loss stay f32; see `nn::ops::bf16`).
    /// Fixed for a run: a different value on resume is refused.
    #[serde(default)]
    pub precision: Precision,
    /// Where the run computes: `cpu`, `cuda` or `cuda:N` (`--device`); unset: the first GPU when
    /// built with the `cuda` feature and one is present, else the CPU. Not fixed for a run:
    /// checkpoints are device-independent, so a run may resume on another device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceSpec>,
}

fn d_steps() -> u64 {
    600
}
fn d_batch() -> usize {
    8
}
fn d_seq() -> usize {
    128
}
fn d_accum() -> usize {
    1
}
fn d_lr() -> f64 {
    3e-3
}
/// The default warmup of a run of `steps` optimizer steps: a tenth of the run, at least one
/// step and at most 30 (the quickstart's 600 steps get 30, as before; a 16-step continuation
/// gets 1 instead of a warmup longer than the run).
pub fn default_warmup_steps(steps: u64) -> u64 {
    (steps / 10).clamp(1, 30).min(steps)
}
fn d_decay() -> Decay {
    Decay::Cosine
}
fn d_clip() -> f64 {
    1.0
}
fn d_eval_every() -> u64 {
    100
}
fn d_eval_batches() -> u64 {
    20
}
fn d_sample_every() -> u64 {
    200
}
fn d_prompt() -> String {
    "It is a truth universally acknowledged".into()
}
fn d_sample_tokens() -> usize {
    48
}
fn d_ckpt() -> u64 {
    100
}
fn d_keep() -> usize {
    2
}
fn d_log() -> u64 {
    10
}

impl Default for TrainSpec {
    fn default() -> Self {
        toml::from_str("").expect("every field has a default")
    }
}

impl Default for RunConfig {
    fn default() -> Self {
        toml::from_str("").expect("every field has a default")
    }
}

impl RunConfig {
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        toml::from_str(&text).map_err(|e| Error::Config {
            origin: format!("run config {}", path.display()),
            problems: vec![e.to_string()],
        })
    }

    pub fn schedule(&self) -> LrSchedule {
        let t = &self.train;
        LrSchedule {
            lr: t.lr,
            min_lr: t.min_lr.unwrap_or(t.lr / 10.0),
            warmup_steps: t.warmup_steps.unwrap_or_else(|| default_warmup_steps(t.steps)),
            total_steps: t.steps,
            decay: t.decay.clone(),
        }
    }

    /// Label smoothing ε of the training loss: the configured one, or for parallel data the
    /// paper's 0.1 (Vaswani et al. §5.4); 0 for language modelling.
    pub fn label_smoothing(&self) -> f64 {
        let paper = if self.data.parallel.is_some() { 0.1 } else { 0.0 };
        self.train.label_smoothing.unwrap_or(paper)
    }

    /// Every problem at once, each with its field path.
    pub fn validate(&self) -> Result<()> {
        let t = &self.train;
        let mut problems = Vec::new();
        for (name, value) in
            [("train.batch_size", t.batch_size), ("train.seq_len", t.seq_len), ("train.grad_accum", t.grad_accum)]
        {
            if value == 0 {
                problems.push(format!("{name} = 0, expected a positive number"));
            }
        }
        if t.steps == 0 {
            problems.push("train.steps = 0, expected a positive number".into());
        }
        if t.checkpoint_every == 0 {
            problems.push("train.checkpoint_every = 0, expected a positive number".into());
        }
        if t.grad_clip.is_nan() || t.grad_clip < 0.0 {
            problems.push(format!("train.grad_clip = {}, expected >= 0", t.grad_clip));
        }
        if let Some(share) = t.max_expert_share {
            if !(share > 0.0 && share <= 1.0) {
                problems.push(format!("train.max_expert_share = {share}, expected 0 < share <= 1"));
            }
        }
        if let Some(f) = self.data.val_fraction {
            if !(0.0..1.0).contains(&f) {
                problems.push(format!("data.val_fraction = {f}, expected 0 <= f < 1"));
            }
        }
        if let Some(smoothing) = t.label_smoothing.filter(|s| !(0.0..1.0).contains(s)) {
            problems.push(format!("train.label_smoothing = {smoothing}, expected 0 <= smoothing < 1"));
        }
        match &self.data.parallel {
            Some(parallel) => {
                problems.extend(parallel.problems());
                let d = &self.data;
                if d.dataset.is_some() || !d.train_files.is_empty() || !d.val_files.is_empty() || d.val_fraction.is_some()
                {
                    problems.push("data.parallel replaces data.dataset, train_files, val_files and val_fraction; give one or the other".into());
                }
            }
            None if t.label_smoothing.is_some_and(|s| s > 0.0) => problems.push(format!(
                "train.label_smoothing = {} applies to encoder–decoder training on data.parallel; decoder-only training does not use it",
                t.label_smoothing.unwrap_or_default()
            )),
            None => {}
        }
        problems.extend(self.schedule().problems());
        problems.extend(self.optimizer.problems().into_iter().map(|p| format!("optimizer: {p}")));
        Error::check_problems("run config", problems)
    }
}
