//! Measuring a plan on this machine: a short rehearsal of its training run.
//!
//! A rehearsal builds the plan's model (loading the checkpoint a continuation starts from),
//! takes training steps with [`StepBench`] — the code `lmforge bench train` times — and then
//! does once each of the other things the training loop does: an evaluation batch, a
//! checkpoint (with the real [`checkpoint::save`]) and a generated sample. It reports the time
//! of each and the peak resident memory of the steps and of the checkpoint separately.
//!
//! Each rehearsal runs in its own process (`lmforge plan --rehearse SPEC`), so its peak memory
//! is its own; a plan is rehearsed at two batch sizes, which gives the activation memory per
//! token (the slope) apart from what every process holds (the intercept). Results are cached
//! per architecture shape under `CACHE/calibration/`, keyed by everything that changes them:
//! the config, the starting checkpoint, batch, sequence, threads, matrix backend and the
//! lmforge binary itself.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use candle_core::Device;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::corpus::hex16;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::generate::{generate, GenerateOptions, Sampler, Sampling};
use crate::train::bench::{median, peak_rss_bytes, reset_peak_rss, StepBench};
use crate::train::checkpoint::{self, CheckpointData, CheckpointState};
use crate::train::schedule::{Decay, LrSchedule};

/// What to rehearse; written as JSON for the child process.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RehearsalSpec {
    pub config: ModelConfig,
    /// Continued pretraining starts from these weights (loaded as `train --init-from` loads
    /// them); a new model starts from random ones.
    pub init_from: Option<PathBuf>,
    pub batch: usize,
    pub seq: usize,
    /// Keep stepping until this many seconds have been timed (at least `min_steps` steps).
    pub timed_seconds: f64,
    pub min_steps: usize,
    /// Also time an evaluation batch, a checkpoint and `sample_tokens` of generation.
    pub full: bool,
    pub sample_tokens: usize,
    /// Where the rehearsal checkpoint is written (and removed again).
    pub scratch_dir: PathBuf,
}

/// What a rehearsal measured, in seconds and bytes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Rehearsal {
    /// Building the starting weights: reading a checkpoint or initialising.
    pub load_seconds: f64,
    /// The first step (allocations, thread start) and the median of the steady ones after it.
    pub first_step_seconds: f64,
    pub step_seconds: f64,
    pub steps_timed: usize,
    /// The fastest and slowest timed step: how steady the machine was while measured.
    pub step_seconds_range: (f64, f64),
    pub forward_seconds: f64,
    pub backward_seconds: f64,
    pub update_seconds: f64,
    /// Peak resident memory up to the end of the steps.
    pub step_peak_bytes: u64,
    pub eval_batch_seconds: Option<f64>,
    pub checkpoint_seconds: Option<f64>,
    /// Peak resident memory while evaluating, writing the checkpoint and sampling, counted
    /// from the resident size after the steps (None where the peak cannot be reset).
    pub checkpoint_peak_bytes: Option<u64>,
    pub sample_seconds_per_token: Option<f64>,
}

/// Run a rehearsal in this process (the child side of [`rehearse_in_child`]).
pub fn rehearse(spec: &RehearsalSpec) -> Result<Rehearsal> {
    let started = Instant::now();
    let weights = match &spec.init_from {
        Some(path) => {
            let loaded = crate::io::load_model(path, &Device::Cpu)?;
            if loaded.config.param_specs() != spec.config.param_specs() {
                return Err(Error::checkpoint(path, "its shapes differ from the plan's model config"));
            }
            loaded.weights
        }
        None => crate::model::init_weights(&spec.config, 0, &Device::Cpu)?,
    };
    let mut bench = StepBench::new(&spec.config, weights, spec.batch, spec.seq)?;
    let load_seconds = started.elapsed().as_secs_f64();

    let first_step_seconds = bench.step()?.0.total();
    let mut timed = crate::train::bench::StepPhases::default();
    let mut step_times = Vec::new();
    let timing = Instant::now();
    while step_times.len() < spec.min_steps || timing.elapsed().as_secs_f64() < spec.timed_seconds {
        let started = Instant::now();
        timed.accumulate(bench.step()?.0);
        step_times.push(started.elapsed().as_secs_f64());
    }
    let steps = step_times.len();
    let range = step_times.iter().fold((f64::INFINITY, 0f64), |(lo, hi), &t| (lo.min(t), hi.max(t)));
    // The median, not the mean: on a shared machine a few seconds of another process taking
    // the cores would otherwise speak for the whole run (a tiny-llama rehearsal's mean once came
    // out 30% above the run that followed; the medians of rehearsal and run agree within 2%).
    let step_seconds = median(&mut step_times);
    let step_peak_bytes = peak_rss_bytes().unwrap_or(0);
    let mut rehearsal = Rehearsal {
        load_seconds,
        first_step_seconds,
        step_seconds,
        steps_timed: steps,
        step_seconds_range: range,
        forward_seconds: timed.forward / steps as f64,
        backward_seconds: timed.backward / steps as f64,
        update_seconds: timed.update / steps as f64,
        step_peak_bytes,
        eval_batch_seconds: None,
        checkpoint_seconds: None,
        checkpoint_peak_bytes: None,
        sample_seconds_per_token: None,
    };
    if !spec.full {
        return Ok(rehearsal);
    }
    // From here on the peak is counted afresh: what evaluating, checkpointing and sampling
    // add to what the steps left live. The memory the steps freed goes back to the system
    // first: a long run's allocator may have returned it by the time it saves (and a run
    // measured so did), and a checkpoint that happened to fit in it would read too low.
    crate::host_memory::release_free_memory();
    let can_reset = reset_peak_rss();
    // The first evaluation after the steps pays for memory handed back above; the median of
    // the next few is what the run's evaluations (many batches in a row) cost each.
    bench.eval_batch()?;
    let mut eval_times = (0..3).map(|_| bench.eval_batch()).collect::<Result<Vec<f64>>>()?;
    rehearsal.eval_batch_seconds = Some(median(&mut eval_times));

    let started = Instant::now();
    write_checkpoint(&bench, spec)?;
    rehearsal.checkpoint_seconds = Some(started.elapsed().as_secs_f64());

    if spec.sample_tokens > 0 {
        let options = GenerateOptions {
            max_new_tokens: spec.sample_tokens,
            prefill_chunk: None,
            stop: vec![],
            full_cache: false,
        };
        let mut sampler = Sampler::new(Sampling::Random { temperature: 0.8, top_k: Some(40), top_p: None, seed: 0 })?;
        let started = Instant::now();
        let ids = generate(bench.model(), &[1, 2, 3], &options, &mut sampler, |_| Ok(()))?;
        rehearsal.sample_seconds_per_token = Some(started.elapsed().as_secs_f64() / ids.len().max(1) as f64);
    }
    rehearsal.checkpoint_peak_bytes = if can_reset { peak_rss_bytes() } else { None };
    Ok(rehearsal)
}

/// Save a checkpoint of the rehearsal's weights and optimizer state, as the trainer does, into
/// a scratch run directory that is removed afterwards.
fn write_checkpoint(bench: &StepBench, spec: &RehearsalSpec) -> Result<()> {
    let run_dir = spec.scratch_dir.join(format!("rehearsal-{}", std::process::id()));
    let optimizer = bench.optimizer().state()?;
    let state = CheckpointState {
        step: 1,
        tokens_seen: (spec.batch * spec.seq) as u64,
        schedule: LrSchedule { lr: 1e-3, min_lr: 1e-4, warmup_steps: 0, total_steps: 1, decay: Decay::Cosine },
        optimizer: optimizer.meta.clone(),
        sampler: serde_json::Value::Null,
        rng: Default::default(),
        model: spec.config.clone(),
        tokenizer: None,
        val_loss: None,
        extra: serde_json::Value::Null,
    };
    let weights = bench.weights();
    let data = CheckpointData { state: &state, model: &weights, optimizer: &optimizer.tensors, tokenizer_file: None };
    let saved = checkpoint::save(&run_dir, &data);
    let _ = std::fs::remove_dir_all(&run_dir);
    saved.map(|_| ())
}

/// Run [`rehearse`] in a fresh `lmforge plan --rehearse` process of `exe`.
pub fn rehearse_in_child(exe: &Path, spec: &RehearsalSpec) -> Result<Rehearsal> {
    std::fs::create_dir_all(&spec.scratch_dir).map_err(|e| Error::io(&spec.scratch_dir, e))?;
    let spec_path = spec.scratch_dir.join(format!("spec-{}.json", std::process::id()));
    let text = serde_json::to_string(spec).expect("a rehearsal spec serialises");
    std::fs::write(&spec_path, text).map_err(|e| Error::io(&spec_path, e))?;
    let output = Command::new(exe).args(["plan", "--rehearse"]).arg(&spec_path).output();
    let _ = std::fs::remove_file(&spec_path);
    let output = output.map_err(|e| Error::io(exe, e))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(Error::Input(format!(
            "rehearsing {} at batch {} x {} failed ({}):\n{}",
            spec.config.name,
            spec.batch,
            spec.seq,
            output.status,
            String::from_utf8_lossy(&output.stderr).trim_end()
        )));
    }
    serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .map_err(|e| Error::Input(format!("a rehearsal printed no result ({e}): {stdout}")))
}

/// A plan measured at two batch sizes: `small` for the memory slope only, `full` at the
/// plan's batch for everything.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Calibration {
    pub small_batch: usize,
    pub small: Rehearsal,
    pub batch: usize,
    pub full: Rehearsal,
    pub seq: usize,
    /// True when read from the cache rather than measured by this run.
    #[serde(skip)]
    pub cached: bool,
}

/// Everything a cached calibration depends on.
#[derive(Serialize)]
struct CacheKey<'a> {
    config: &'a ModelConfig,
    init_from: Option<FileStamp>,
    batch: usize,
    seq: usize,
    threads: usize,
    gemm: String,
    blas: Option<String>,
    version: &'static str,
    exe: Option<FileStamp>,
}

/// A file's identity for a cache key: path, size and modification time.
#[derive(Serialize)]
struct FileStamp {
    path: String,
    len: u64,
    modified: Option<u64>,
}

impl FileStamp {
    fn of(path: &Path) -> Option<Self> {
        let meta = std::fs::metadata(path).ok()?;
        let modified = meta.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_secs());
        Some(FileStamp { path: path.display().to_string(), len: meta.len(), modified })
    }
}

/// Where and how rehearsals run: the lmforge binary, the cache, and whether to ignore it.
pub struct Calibrator<'a> {
    pub exe: &'a Path,
    pub cache: &'a Path,
    /// Measure again even where the cache has a calibration.
    pub recalibrate: bool,
}

impl Calibrator<'_> {
    /// Measure `config` (starting from `init_from`, if given) at `batch × seq` and at a
    /// second, smaller batch, or read both from the cache. `label` names the plan in progress
    /// messages.
    pub fn calibrate(
        &self,
        label: &str,
        config: &ModelConfig,
        init_from: Option<&Path>,
        batch: usize,
        seq: usize,
    ) -> Result<Calibration> {
        let (exe, cache, recalibrate) = (self.exe, self.cache, self.recalibrate);
        let mut anonymous = config.clone();
        anonymous.name.clear(); // a label, not part of the shape
        let key = CacheKey {
            config: &anonymous,
            init_from: init_from.and_then(FileStamp::of),
            batch,
            seq,
            threads: crate::nn::ops::parallel::threads(),
            gemm: crate::nn::ops::gemm::backend().to_string(),
            blas: crate::nn::ops::blas::loaded().map(|b| b.description.clone()),
            version: env!("CARGO_PKG_VERSION"),
            exe: FileStamp::of(exe),
        };
        let key_json = serde_json::to_string(&key).expect("a cache key serialises");
        let dir = cache.join("calibration");
        let path = dir.join(format!("{}.json", hex16(&Sha256::digest(key_json.as_bytes()))));
        if !recalibrate {
            if let Some(mut calibration) =
                std::fs::read_to_string(&path).ok().and_then(|t| serde_json::from_str::<Calibration>(&t).ok())
            {
                calibration.cached = true;
                return Ok(calibration);
            }
        }
        // The memory slope needs two batch sizes; below the plan's when it has room.
        let small_batch = if batch >= 2 { batch / 2 } else { 2 };
        let spec = |batch: usize, full: bool| RehearsalSpec {
            config: config.clone(),
            init_from: init_from.map(Path::to_path_buf),
            batch,
            seq,
            // Long enough to average over some of the swings of a shared machine's load.
            timed_seconds: if full { 10.0 } else { 0.0 },
            min_steps: if full { 3 } else { 1 },
            full,
            sample_tokens: crate::train::run_config::TrainSpec::default().sample_tokens,
            scratch_dir: cache.join("scratch"),
        };
        eprintln!("plan: rehearsing `{label}` at batch {small_batch} and {batch} x {seq} on this machine");
        let small = rehearse_in_child(exe, &spec(small_batch, false))?;
        let full = rehearse_in_child(exe, &spec(batch, true))?;
        let calibration = Calibration { small_batch, small, batch, full, seq, cached: false };
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let text = serde_json::to_string_pretty(&calibration).expect("a calibration serialises");
        let partial = path.with_extension("json.partial");
        std::fs::write(&partial, text).map_err(|e| Error::io(&partial, e))?;
        std::fs::rename(&partial, &path).map_err(|e| Error::io(&path, e))?;
        Ok(calibration)
    }
}
