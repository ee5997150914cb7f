//! The training loop. It owns no math: the model computes the loss, AdamW updates, the schedule
//! gives the rate, the sampler gives the batches, and the checkpoint stores all of their state,
//! so a resumed run continues bit for bit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::checkpoint::{self, Checkpoint, CheckpointData, CheckpointState};
use super::data_parallel;
use super::expert_load::ExpertLoad;
use super::guard::{Divergence, LossStats};
use super::inject::{Fault, FaultKind, Injector};
use super::metrics::MetricsLog;
use super::optim::{grad_norm, AdamW};
use super::rng::TrainRng;
use super::run_config::RunConfig;
use super::setup::{prepare_run, Prepared};
use super::task::{BatchShape, Task};
use super::timing::{Part, RunClock, RunTime};
use crate::config::{Ffn, ModelConfig};
use crate::distributed::{average_gradients, weights_checksum, Collectives, Shard, SingleProcess};
use crate::error::{Error, Result};
use crate::generate::{
    generate, generate_seq2seq_batch, GenerateOptions, Sampler as TokenSampler, Sampling, Search, Seq2SeqOptions,
};
use crate::io::TextTokenizer;
use crate::model::{Model, TrainingLoss};

/// State the loop keeps across rollbacks and restarts besides the tensors; stored in the
/// checkpoint's `extra`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct LoopState {
    guard: LossStats,
    /// Batch positions (as [`Task::position`]) of batches that made the run diverge; skipped
    /// when met again.
    skip: Vec<serde_json::Value>,
    /// Steps at which a rollback happened (for the "K rollbacks in a window" stop).
    rollbacks: Vec<u64>,
    /// The learning rate is lowered until this step after a rollback.
    cooldown_until: u64,
    best_val_loss: Option<f64>,
    /// Ranks of the data-parallel job that saved the checkpoint (its global batch and data
    /// position do not depend on it; the bits of its sums do).
    #[serde(default = "one_rank")]
    world_size: usize,
}

fn one_rank() -> usize {
    1
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub run_dir: PathBuf,
    pub steps: u64,
    pub final_loss: f64,
    pub val_loss: Option<f64>,
    pub sample: Option<String>,
    /// Where the wall-clock went, in the parts `plan` predicts.
    pub time: RunTime,
}

/// Everything that changes as the run goes.
struct Trainer<'a> {
    config: RunConfig,
    model_config: ModelConfig,
    tokenizer: Option<TextTokenizer>,
    tokenizer_file: Option<PathBuf>,
    vars: HashMap<String, Var>,
    model: Model,
    optimizer: AdamW,
    task: Task,
    rng: TrainRng,
    step: u64,
    tokens_seen: u64,
    state: LoopState,
    /// Rank 0's log; other ranks of a data-parallel job log nothing.
    metrics: Option<MetricsLog>,
    injector: Injector,
    clock: RunClock,
    collectives: &'a dyn Collectives,
}

/// Train (or resume) the run described by `config`. `resume`: continue from the newest valid
/// checkpoint of `config.run_dir`.
pub fn train(config: &RunConfig, resume: bool, faults: Vec<Fault>) -> Result<TrainSummary> {
    train_on(config, resume, faults, &SingleProcess)
}

/// [`train`] as one rank of a data-parallel job over `collectives`: every rank trains on its
/// slice of each global batch, and all of them take the same step from the mean gradient (see
/// `train/data_parallel.rs`). With [`SingleProcess`] this is [`train`].
pub fn train_on(
    config: &RunConfig,
    resume: bool,
    faults: Vec<Fault>,
    collectives: &dyn Collectives,
) -> Result<TrainSummary> {
    let began = Instant::now();
    config.validate()?;
    // Before any preparation, so an unusable device fails at once.
    let device = crate::device::resolve(config.train.device)?;
    let prepared = data_parallel::in_rank_order(config, collectives, || match &config.data.parallel {
        Some(parallel) => super::seq2seq::prepare_training(config, parallel, resume),
        None => prepare_run(config, resume),
    })?;
    let mut trainer = Trainer::start(config.clone(), device, prepared, faults, collectives, RunClock::new(began))?;
    trainer.run()
}

impl<'a> Trainer<'a> {
    fn start(
        config: RunConfig,
        device: Device,
        mut prepared: Prepared,
        faults: Vec<Fault>,
        collectives: &'a dyn Collectives,
        clock: RunClock,
    ) -> Result<Self> {
        let run_dir = config.run_dir.clone();
        let latest = checkpoint::latest_valid(&run_dir)?;
        for skipped in &latest.skipped {
            eprintln!("skipping checkpoint {}: {}", skipped.path.display(), skipped.reason);
        }
        let resumed = if prepared.resume { latest.latest.clone() } else { None };
        let (weights, checkpoint) = match &resumed {
            Some(dir) => {
                let ckpt = checkpoint::load(dir, &device)?;
                if ckpt.state.model.param_specs() != prepared.model_config.param_specs() {
                    return Err(Error::checkpoint(
                        dir,
                        "the checkpoint's architecture differs from the run's model config\nHINT: resume with the run's own settings, or start a new run with --init-from",
                    ));
                }
                (ckpt.model.clone(), Some(ckpt))
            }
            // Taken, not cloned: the variables copy them, and a second copy of the weights
            // would stay resident for the whole run.
            None => (std::mem::take(&mut prepared.initial_weights), None),
        };
        // Fresh weights are drawn on the host (the same initial model whatever the device) and
        // uploaded; a checkpoint's were loaded onto the device already.
        let vars: HashMap<String, Var> = weights
            .iter()
            .map(|(name, t)| Ok((name.clone(), Var::from_tensor(&t.to_device(&device)?)?)))
            .collect::<Result<_>>()?;
        drop(weights);
        let Prepared { model_config, data, tokenizer, tokenizer_file, .. } = prepared;
        let model = build_model(&model_config, &vars)?;
        let mut optimizer = AdamW::for_model(config.optimizer, &model_config, &vars)?;
        let (step, tokens_seen, position, rng, state) = match &checkpoint {
            Some(ckpt) => {
                optimizer.load_state(&ckpt.optimizer)?;
                let (position, rng, state) = restored_state(ckpt)?;
                (ckpt.state.step, ckpt.state.tokens_seen, Some(position), rng, state)
            }
            None => (0, 0, None, TrainRng::seed_from(config.train.seed), LoopState::default()),
        };
        let shape = BatchShape { batch_size: config.train.batch_size, seq_len: config.train.seq_len };
        let mut task = Task::new(data, shape, config.train.seed, position.as_ref())?;
        task.set_shard(Shard::of(collectives))?;
        let leader = collectives.rank() == 0;
        let metrics = match leader {
            true => Some(MetricsLog::open(&run_dir, checkpoint.as_ref().map(|c| c.state.step))?),
            false => None,
        };
        let injector = Injector::new(faults, &run_dir, collectives.rank())?;
        if let (Some(dir), true) = (&resumed, leader) {
            eprintln!("resumed from {} (step {step})", dir.display());
            data_parallel::note_world_size_change(state.world_size, collectives.ranks());
        }
        let mut trainer = Trainer {
            config,
            model_config,
            tokenizer,
            tokenizer_file,
            vars,
            model,
            optimizer,
            task,
            rng,
            step,
            tokens_seen,
            state,
            metrics,
            injector,
            clock,
            collectives,
        };
        data_parallel::agree_on_start(collectives, trainer.step, &trainer.task.position(), &trainer.sorted_vars())?;
        if resumed.is_none() {
            // A checkpoint before the first update, so even an early divergence can roll back.
            let saving = Instant::now();
            trainer.save_checkpoint(None)?;
            trainer.clock.add(Part::Checkpoints, saving);
        }
        Ok(trainer)
    }

    fn run(&mut self) -> Result<TrainSummary> {
        let total = self.config.train.steps;
        let leader = self.collectives.rank() == 0;
        let ranks = self.collectives.ranks();
        if leader {
            eprintln!(
                "training {} ({} parameters) on {} for {total} steps of {} micro-batch(es) on {}; run dir {}",
                self.model_config.name,
                self.model_config.params_total(),
                crate::device::describe(self.model.device()),
                self.config.train.grad_accum,
                self.task.describe(),
                self.config.run_dir.display()
            );
            if ranks > 1 {
                let batch = self.config.train.batch_size;
                eprintln!(
                    "data-parallel over {ranks} ranks: each trains on {} of the {batch} windows of every batch",
                    batch / ranks
                );
            }
        }
        if self.step == 0 && self.config.train.eval_every > 0 {
            // The starting point: for continued pretraining, the pretrained model's loss on the
            // new domain.
            let evaluating = Instant::now();
            self.evaluate_and_log()?;
            self.clock.add(Part::Evaluation, evaluating);
        }
        let started = Instant::now();
        let (first_step, first_tokens) = (self.step, self.tokens_seen);
        let mut last_loss = f64::NAN;
        let mut val_loss = None;
        while self.step < total {
            let step_started = Instant::now();
            let batch_start = self.task.position();
            let (mut step_loss, mut grads) = self.forward_backward()?;
            if self.injector.take(FaultKind::Nan, self.step + 1)? {
                step_loss.lm = f64::NAN;
            }
            if self.injector.take(FaultKind::Spike, self.step + 1)? {
                step_loss.lm *= 10.0;
            }
            if self.injector.take(FaultKind::Crash, self.step + 1)? {
                eprintln!("injected crash at step {}", self.step + 1);
                std::process::abort();
            }
            if self.injector.take(FaultKind::Hang, self.step + 1)? {
                eprintln!("injected hang at step {}", self.step + 1);
                loop {
                    std::thread::park();
                }
            }
            // From here on every value is the global batch's, the same bits on every rank: the
            // mean gradient, its norm and the mean loss, so every rank takes the same decision
            // (step or roll back) and the same step.
            let comm_started = self.collectives.seconds_in_collectives();
            self.reduce_across_ranks(&mut step_loss, &mut grads)?;
            let tokens_per_step = step_loss.tokens;
            let loss = step_loss.lm;
            let norm = if self.config.train.grad_clip > 0.0 {
                self.optimizer.clip_grad_norm(&mut grads, self.config.train.grad_clip)?
            } else {
                grad_norm(&grads, self.vars.values())?
            };
            let verdict = self.state.guard.check(&self.config.guard, loss, norm.is_finite());
            if ranks > 1 {
                // Equal by construction; checked, because ranks that decided differently would
                // wait in different collectives for ever.
                let what = format!("the divergence guard's decision at step {}", self.step + 1);
                self.collectives.agree(&what, verdict.is_err() as u64)?;
            }
            if let Err(divergence) = verdict {
                self.roll_back(divergence, batch_start)?;
                self.clock.add(Part::Steps, step_started);
                continue;
            }
            self.state.guard.accept(&self.config.guard, loss);
            let lr = self.lr();
            self.optimizer.step(&grads, lr)?;
            // The gradients (and whatever of the step's graph they hold) go before evaluating
            // or saving, so those do not stack on top of them.
            drop(grads);
            self.step += 1;
            self.tokens_seen += tokens_per_step;
            last_loss = loss;
            let step_time = step_started.elapsed().as_secs_f64();
            let mut record = json!({
                "step": self.step, "loss": loss, "lr": lr, "grad_norm": norm,
                "tokens": self.tokens_seen, "tok_per_s": tokens_per_step as f64 / step_time,
            });
            step_loss.add_router_fields(&mut record, &self.model_config);
            if ranks > 1 {
                record["comm_s"] = json!(self.collectives.seconds_in_collectives() - comm_started);
            }
            self.log(record)?;
            if leader && (self.step.is_multiple_of(self.config.train.log_every) || self.step == total) {
                let done = (self.step - first_step) as f64;
                let per_step = started.elapsed().as_secs_f64() / done.max(1.0);
                let eta = per_step * (total - self.step) as f64;
                eprintln!(
                    "step {:>6}/{total} | loss {loss:.4} | lr {lr:.2e} | {:>8.0} tok/s | ETA {}",
                    self.step,
                    (self.tokens_seen - first_tokens) as f64 / started.elapsed().as_secs_f64(),
                    format_duration(eta)
                );
            }
            self.clock.add(Part::Steps, step_started);
            let at_end = self.step == total;
            let eval_now =
                self.config.train.eval_every > 0 && (self.step.is_multiple_of(self.config.train.eval_every) || at_end);
            if eval_now {
                let evaluating = Instant::now();
                val_loss = Some(self.evaluate_and_log()?);
                self.clock.add(Part::Evaluation, evaluating);
            }
            if leader
                && self.config.train.sample_every > 0
                && self.step.is_multiple_of(self.config.train.sample_every)
                && !at_end
            {
                let sampling = Instant::now();
                self.sample()?;
                self.clock.add(Part::Samples, sampling);
            }
            if self.step.is_multiple_of(self.config.train.checkpoint_every) || at_end {
                let saving = Instant::now();
                self.save_checkpoint(if eval_now { val_loss } else { None })?;
                self.clock.add(Part::Checkpoints, saving);
            }
        }
        let sampling = Instant::now();
        let sample = if leader { self.sample()? } else { None };
        self.clock.add(Part::Samples, sampling);
        let time = self.clock.so_far();
        self.log(json!({"event": "time", "step": self.step, "seconds": time}))?;
        Ok(TrainSummary {
            run_dir: self.config.run_dir.clone(),
            steps: self.step,
            final_loss: last_loss,
            val_loss,
            sample,
            time,
        })
    }

    /// Mean losses over `grad_accum` micro-batches and the summed gradients of the mean
    /// objective (the language-model loss plus the weighted router losses).
    fn forward_backward(&mut self) -> Result<(StepLoss, GradStore)> {
        let accum = self.config.train.grad_accum;
        let _precision = self.config.train.precision.enter()?;
        let mut step = StepLoss::default();
        let mut summed: Option<GradStore> = None;
        for _ in 0..accum {
            let (loss, tokens) = match self.collectives.ranks() {
                1 => self.task.next_loss(&self.model, &self.state.skip, &mut self.rng)?,
                // Each rank its own dropout stream, drawn from the shared one: the run's RNG
                // advances the same on every rank, so the checkpoint's is every rank's.
                _ => {
                    let seed =
                        self.rng.next_u64() ^ (self.collectives.rank() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                    self.task.next_loss(&self.model, &self.state.skip, &mut TrainRng::seed_from(seed))?
                }
            };
            step.add(&loss, accum)?;
            step.tokens += tokens;
            let grads = (loss.objective()? / accum as f64)?.backward()?;
            summed = Some(match summed {
                None => grads,
                Some(mut acc) => {
                    for var in self.vars.values() {
                        if let (Some(a), Some(g)) = (acc.get(var.as_tensor()), grads.get(var.as_tensor())) {
                            let sum = (a + g)?;
                            acc.insert(var.as_tensor(), sum);
                        }
                    }
                    acc
                }
            });
        }
        Ok((step, summed.expect("grad_accum >= 1")))
    }

    /// The step's losses and gradients averaged over the ranks (token counts summed); a no-op
    /// in one process.
    fn reduce_across_ranks(&self, step: &mut StepLoss, grads: &mut GradStore) -> Result<()> {
        let ranks = self.collectives.ranks();
        if ranks == 1 {
            return Ok(());
        }
        let mut sums = [step.lm, step.balance, step.z, step.tokens as f64];
        self.collectives.sum_f64(&mut sums)?;
        let mean = |sum: f64| sum / ranks as f64;
        (step.lm, step.balance, step.z, step.tokens) = (mean(sums[0]), mean(sums[1]), mean(sums[2]), sums[3] as u64);
        average_gradients(self.collectives, &self.sorted_vars(), grads)
    }

    /// The trained variables in name order: the order every rank reduces and checksums them in.
    fn sorted_vars(&self) -> Vec<&Var> {
        let mut named: Vec<(&String, &Var)> = self.vars.iter().collect();
        named.sort_by(|a, b| a.0.cmp(b.0));
        named.into_iter().map(|(_, var)| var).collect()
    }

    /// Append `record` to the run's metrics (rank 0 only).
    fn log(&mut self, record: serde_json::Value) -> Result<()> {
        match &mut self.metrics {
            Some(metrics) => metrics.write(record),
            None => Ok(()),
        }
    }

    fn lr(&self) -> f64 {
        let lr = self.config.schedule().lr_at(self.step);
        if self.step < self.state.cooldown_until {
            lr * self.config.guard.cooldown_factor
        } else {
            lr
        }
    }

    /// Go back to the newest valid checkpoint, remember the offending batch so it is skipped,
    /// and lower the learning rate for a while.
    fn roll_back(&mut self, divergence: Divergence, bad_batch: serde_json::Value) -> Result<()> {
        let failed_step = self.step + 1;
        let guard = &self.config.guard.clone();
        self.state.rollbacks.retain(|&s| s + guard.rollback_window > failed_step);
        self.state.rollbacks.push(failed_step);
        if self.state.rollbacks.len() > guard.max_rollbacks {
            self.log(json!({"event": "stopped", "step": failed_step, "reason": divergence.to_string()}))?;
            return Err(Error::Diverged(format!(
                "{} rollbacks within {} steps (last at step {failed_step}: {divergence})\nHINT: lower the learning rate, raise guard.spike_zscore, or check the data",
                self.state.rollbacks.len(),
                guard.rollback_window
            )));
        }
        let latest = checkpoint::latest_valid(&self.config.run_dir)?.latest.ok_or_else(|| {
            Error::Diverged(format!("{divergence} at step {failed_step} and no checkpoint to roll back to"))
        })?;
        let ckpt = checkpoint::load(&latest, self.model.device())?;
        for (name, var) in &self.vars {
            var.set(&ckpt.model[name])?;
        }
        self.optimizer.load_state(&ckpt.optimizer)?;
        let (position, rng, restored) = restored_state(&ckpt)?;
        self.task.restore(&position)?;
        self.rng = rng;
        self.state.guard = restored.guard;
        self.state.skip.push(bad_batch);
        self.state.cooldown_until = failed_step + guard.cooldown_steps;
        self.step = ckpt.state.step;
        self.tokens_seen = ckpt.state.tokens_seen;
        if self.collectives.rank() == 0 {
            eprintln!("step {failed_step}: {divergence}; rolled back to step {} and will skip that batch", self.step);
        }
        self.log(json!({
            "event": "rollback", "step": failed_step, "reason": divergence.to_string(),
            "to_step": self.step, "lr_factor": guard.cooldown_factor, "until_step": self.state.cooldown_until,
        }))
    }

    /// Evaluate, print and log the validation loss (and a mixture's expert load, with a
    /// warning when one expert takes too much); returns the loss.
    fn evaluate_and_log(&mut self) -> Result<f64> {
        let (v, load) = self.evaluate()?;
        if self.collectives.rank() != 0 {
            return Ok(v);
        }
        eprintln!("step {:>6} | val loss {v:.4} | val ppl {:.2}", self.step, v.exp());
        let mut record = json!({"step": self.step, "val_loss": v, "val_ppl": v.exp()});
        if !load.is_empty() {
            record["expert_load"] = load.to_json();
            if let Some(warning) = load.warning(self.config.train.max_expert_share) {
                let coef = match &self.model_config.ffn {
                    Ffn::Moe { router, .. } => router.balance_loss_coef,
                    _ => 0.0,
                };
                eprintln!(
                    "warning: step {}: {warning}\nHINT: a larger ffn.router.balance_loss_coef (now {coef}) spreads the load",
                    self.step
                );
                record["expert_warning"] = json!(warning);
            }
        }
        self.log(record)?;
        Ok(v)
    }

    /// Mean loss over the validation split (the first `eval_batches` batches, in order), and
    /// the expert load of those batches (empty for a dense model).
    fn evaluate(&self) -> Result<(f64, ExpertLoad)> {
        let _precision = self.config.train.precision.enter()?;
        self.task.evaluate(&self.model, self.config.train.eval_batches)
    }

    /// Generate a sample from the configured prompt, print it and log it.
    fn sample(&mut self) -> Result<Option<String>> {
        if self.model.is_encoder_decoder() {
            return self.sample_translation();
        }
        let Some(tokenizer) = &self.tokenizer else { return Ok(None) };
        let prompt = tokenizer.encode(&self.config.train.sample_prompt, false)?;
        if prompt.is_empty() {
            return Ok(None);
        }
        // Its own seeded stream, so sampling never perturbs the training randomness.
        let sampling = Sampling::Random { temperature: 0.8, top_k: Some(40), top_p: None, seed: self.step };
        let options = GenerateOptions {
            max_new_tokens: self.config.train.sample_tokens,
            prefill_chunk: None,
            stop: tokenizer.eos_ids().to_vec(),
            full_cache: false,
        };
        let ids = generate(&self.model, &prompt, &options, &mut TokenSampler::new(sampling)?, |_| Ok(()))?;
        let text = format!("{}{}", self.config.train.sample_prompt, tokenizer.decode(&ids)?);
        eprintln!("sample at step {}: {text}", self.step);
        self.log(json!({"step": self.step, "sample": text}))?;
        Ok(Some(text))
    }

    /// Translate the shortest validation source greedily, print it and log it.
    fn sample_translation(&mut self) -> Result<Option<String>> {
        let (Some(tokenizer), [source]) = (&self.tokenizer, &self.task.sample_sources(1)[..]) else { return Ok(None) };
        let options = Seq2SeqOptions { max_new_tokens: self.config.train.sample_tokens, stop: vec![] };
        let out =
            generate_seq2seq_batch(&self.model, std::slice::from_ref(source), &options, Search::Greedy, |_| Ok(()))?;
        let text = format!("{} → {}", tokenizer.decode_with(source, true)?, tokenizer.decode_with(&out[0].ids, true)?);
        eprintln!("sample at step {}: {text}", self.step);
        self.log(json!({"step": self.step, "sample": text}))?;
        Ok(Some(text))
    }

    /// Save a checkpoint: rank 0 writes it, once every rank has arrived and holds the same
    /// weights (the checksum agreement is the barrier: rank 0 cannot finish it before every rank
    /// has joined). The others go on to the next step and wait for rank 0 in its all-reduce.
    fn save_checkpoint(&mut self, val_loss: Option<f64>) -> Result<()> {
        self.state.world_size = self.collectives.ranks();
        if self.collectives.ranks() > 1 {
            let what = format!(
                "the weights at step {} (checksum): the ranks have drifted apart\nHINT: this is a bug (or faulty hardware) on the ranks named; resume from the last checkpoint",
                self.step
            );
            self.collectives.agree(&what, weights_checksum(&self.sorted_vars())?)?;
        }
        if let Some(v) = val_loss {
            if self.state.best_val_loss.is_none_or(|best| v < best) {
                self.state.best_val_loss = Some(v);
            }
        }
        if self.collectives.rank() != 0 {
            return Ok(());
        }
        let weights: HashMap<String, Tensor> =
            self.vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        let optimizer = self.optimizer.state()?;
        let state = CheckpointState {
            step: self.step,
            tokens_seen: self.tokens_seen,
            schedule: self.config.schedule(),
            optimizer: optimizer.meta.clone(),
            sampler: self.task.position(),
            rng: [("run".to_string(), self.rng.state())].into_iter().collect(),
            model: self.model_config.clone(),
            tokenizer: self.tokenizer_file.as_ref().map(|p| p.display().to_string()),
            val_loss,
            extra: serde_json::to_value(&self.state).expect("loop state serialises"),
        };
        let data = CheckpointData {
            state: &state,
            model: &weights,
            optimizer: &optimizer.tensors,
            tokenizer_file: self.tokenizer_file.as_deref(),
        };
        checkpoint::save(&self.config.run_dir, &data)?;
        checkpoint::prune(&self.config.run_dir, self.config.train.keep_last)?;
        Ok(())
    }
}

/// One step's losses, each the mean over its micro-batches, and its routing.
#[derive(Default)]
struct StepLoss {
    lm: f64,
    /// Tokens the step trained on (see [`Task::next_loss`]).
    tokens: u64,
    balance: f64,
    z: f64,
    load: ExpertLoad,
}

impl StepLoss {
    fn add(&mut self, loss: &TrainingLoss, accum: usize) -> Result<()> {
        let value = |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?) };
        self.lm += value(&loss.lm)? / accum as f64;
        if let Some(router) = &loss.router {
            self.balance += value(&router.balance)? / accum as f64;
            self.z += value(&router.z)? / accum as f64;
        }
        self.load.add(&loss.routing);
        Ok(())
    }

    /// A mixture's router losses (unweighted), and the share of assignments a capacity limit
    /// dropped when there is one, beside the language-model loss in a step's metrics line.
    fn add_router_fields(&self, record: &mut serde_json::Value, model: &ModelConfig) {
        let Ffn::Moe { router, .. } = &model.ffn else { return };
        record["balance_loss"] = json!(self.balance);
        record["z_loss"] = json!(self.z);
        if router.capacity_factor.is_some() {
            record["dropped"] = json!(self.load.dropped_share());
        }
    }
}

/// The loop's non-tensor state from a checkpoint: data position, RNG, guard and skip list.
fn restored_state(ckpt: &Checkpoint) -> Result<(serde_json::Value, TrainRng, LoopState)> {
    let sampler = ckpt.state.sampler.clone();
    let rng = ckpt.state.rng.get("run").ok_or_else(|| Error::checkpoint(&ckpt.dir, "state.json: no `run` RNG"))?;
    let state = serde_json::from_value(ckpt.state.extra.clone()).unwrap_or_default();
    Ok((sampler, TrainRng::from_state(*rng)?, state))
}

fn build_model(model_config: &ModelConfig, vars: &HashMap<String, Var>) -> Result<Model> {
    let tensors: HashMap<String, Tensor> = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    Model::new(model_config, &tensors, Path::new("training weights"))
}

fn format_duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// The tokenizer of a prepared run, for callers that only have the run directory.
pub fn run_tokenizer(run_dir: &Path) -> Result<Option<TextTokenizer>> {
    let path = run_dir.join("tokenizer.json");
    if path.exists() {
        Ok(Some(TextTokenizer::from_file(&path)?))
    } else {
        Ok(None)
    }
}
