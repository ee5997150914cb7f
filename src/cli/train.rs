//! `lmforge train`: run a training job under a supervisor that restarts it after a crash.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};
use clap::Args;
use lmforge::data::parallel::ParallelData;
use lmforge::nn::ops::Precision;
use lmforge::plan::seconds;
use lmforge::train::checkpoint;
use lmforge::train::inject::Fault;
use lmforge::train::metrics::append_event;
use lmforge::train::run_config::RunConfig;
use lmforge::train::schedule::Decay;
use lmforge::train::setup::read_run_config;
use lmforge::train::RunTime;
use serde_json::json;

use super::data_parallel;
use super::device::DeviceArg;

/// Restarts after crashes before the supervisor gives up.
const MAX_RESTARTS: usize = 5;

#[derive(Args, Clone)]
pub struct TrainArgs {
    /// Run config (TOML); flags below override its fields.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run directory (default: runs/quickstart).
    #[arg(long)]
    run: Option<PathBuf>,
    /// Continue a run exactly from its newest valid checkpoint: `--resume RUN`, or `--resume`
    /// (= `auto`) for the run named by --run/--config.
    #[arg(long, num_args = 0..=1, default_missing_value = "auto", value_name = "RUN|auto")]
    resume: Option<String>,
    /// Architecture: preset name or config file (default: tiny-llama).
    #[arg(long)]
    arch: Option<String>,
    /// Override an architecture field, e.g. `--set layers=6`.
    #[arg(long = "set", value_name = "PATH=VALUE")]
    settings: Vec<String>,
    /// Continued pretraining: start from these weights (HF dir, .gguf, lmforge checkpoint) with a
    /// fresh optimizer and schedule.
    #[arg(long)]
    init_from: Option<PathBuf>,
    /// A dataset made by `lmforge data prepare`.
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// Training text files (default: the bundled Austen corpus).
    #[arg(long = "train-file")]
    train_files: Vec<PathBuf>,
    /// Validation text files (default: the tail of each training file).
    #[arg(long = "val-file")]
    val_files: Vec<PathBuf>,
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Aligned pairs for an encoder–decoder model: a TSV (plain or .gz) with a header line and
    /// a `book` column, e.g. data/parallel/bible.tsv.gz.
    #[arg(long, value_name = "FILE")]
    parallel_file: Option<PathBuf>,
    /// The --parallel-file column to translate from, e.g. `kjv`.
    #[arg(long, value_name = "COLUMN")]
    source: Option<String>,
    /// The --parallel-file column to translate into, e.g. `rv1909` or `web`.
    #[arg(long, value_name = "COLUMN")]
    target: Option<String>,
    /// Books held out for testing (default: Ruth,Jonah,Philemon,Jude).
    #[arg(long, value_delimiter = ',', value_name = "BOOK,...")]
    books: Option<Vec<String>>,
    /// Books held out for validation (default: chosen from the rest, about 2% of the pairs).
    #[arg(long, value_delimiter = ',', value_name = "BOOK,...")]
    val_books: Option<Vec<String>>,
    /// Most tokens of either side in a batch of pairs, padding included (default 4096).
    #[arg(long)]
    batch_tokens: Option<usize>,
    /// Share (0 to 1) of the training pairs also trained as target → target copies, which
    /// teaches the cross-attention to align (default 0; 1 suits KJV → WEB).
    #[arg(long, value_name = "SHARE")]
    copied_targets: Option<f64>,
    /// Label smoothing of the training loss, 0 <= e < 1 (default for parallel data: 0.1, as the
    /// original Transformer).
    #[arg(long)]
    label_smoothing: Option<f64>,
    /// Learning-rate decay after warmup: cosine (default), linear, constant, inverse_sqrt (the
    /// original Transformer's), or wsd (its fraction set in the run config).
    #[arg(long, value_name = "KIND")]
    decay: Option<String>,
    /// Adam's second-moment decay β₂ (default 0.95; the original Transformer: 0.98).
    #[arg(long)]
    beta2: Option<f64>,
    #[arg(long)]
    steps: Option<u64>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    seq_len: Option<usize>,
    #[arg(long)]
    grad_accum: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    warmup_steps: Option<u64>,
    #[arg(long)]
    seed: Option<u64>,
    /// Evaluate on the validation split every N steps and after the last (0 = never).
    #[arg(long, value_name = "N")]
    eval_every: Option<u64>,
    /// Validation batches per evaluation (0 = the whole split).
    #[arg(long)]
    eval_batches: Option<u64>,
    /// Write a checkpoint every N steps and after the last.
    #[arg(long, value_name = "N")]
    checkpoint_every: Option<u64>,
    /// Print a sample every N steps (0 = only the one after the last step).
    #[arg(long, value_name = "N")]
    sample_every: Option<u64>,
    /// Precision of the matrix products: f32 (default) or bf16 (bf16 operands, f32 sums;
    /// weights, optimizer and checkpoints stay f32).
    #[arg(long, value_name = "f32|bf16")]
    precision: Option<Precision>,
    #[command(flatten)]
    device: DeviceArg,
    /// Inject a fault to test recovery: `nan@step=N`, `spike@step=N`, `crash@step=N`.
    #[arg(long = "inject", value_name = "KIND@step=N")]
    inject: Vec<String>,
    /// Run in this process, without restarts after a crash.
    #[arg(long, conflicts_with = "ranks")]
    no_supervisor: bool,
    /// Data-parallel training over N processes: lmforge starts them with `mpirun -np N` (or
    /// $LMFORGE_MPIRUN) and restarts the whole job from the newest checkpoint after a crash.
    /// Needs a build with `--features mpi`.
    #[arg(long, value_name = "N")]
    ranks: Option<usize>,
    /// With --ranks: the MPI hostfile naming the machines (passed to mpirun as --hostfile).
    #[arg(long, requires = "ranks", value_name = "FILE")]
    hostfile: Option<PathBuf>,
    /// This process is one rank of a data-parallel job started by an MPI launcher
    /// (`mpirun -np N lmforge train --data-parallel ...`); no restarts after a crash.
    #[arg(long, conflicts_with_all = ["ranks", "no_supervisor"])]
    data_parallel: bool,
    /// Data-parallel: seconds a rank may wait in a collective for the others before the job is
    /// ended as hung (default 300); the supervisor of --ranks then restarts it.
    #[arg(long, value_name = "SECS")]
    collective_timeout: Option<u64>,
    /// Internal: this process is the supervised worker.
    #[arg(long, hide = true)]
    worker: bool,
}

pub fn train(args: TrainArgs) -> anyhow::Result<()> {
    let faults: Vec<Fault> = args.inject.iter().map(|f| f.parse()).collect::<Result<_, _>>()?;
    let (config, resume) = resolve(&args)?;
    if args.data_parallel || (args.worker && args.ranks.is_some()) {
        let timeout = args.collective_timeout.map(std::time::Duration::from_secs);
        return data_parallel::run_rank(&config, resume, faults, args.ranks, timeout);
    }
    if args.worker || args.no_supervisor {
        announce_kernels(&config)?;
        let summary = lmforge::train::train(&config, resume, faults)?;
        report_done(&summary);
        return Ok(());
    }
    let launcher = match args.ranks {
        Some(ranks) => data_parallel::launcher(ranks, args.hostfile.as_deref())?,
        None => vec![],
    };
    supervise(&config, resume, &launcher)
}

/// Say which kernels the matrix products run on, when not the default.
pub(super) fn announce_kernels(config: &RunConfig) -> anyhow::Result<()> {
    // Opened first, so that a device this build or machine lacks is the error, not a claim.
    let device = lmforge::device::resolve(config.train.device)?;
    if !device.is_cpu() {
        // Off the CPU the products are candle's (cuBLAS), at the run's precision.
        eprintln!("{} matrix products on {}'s cuBLAS", config.train.precision, lmforge::device::describe(&device));
    } else if config.train.precision == Precision::Bf16 {
        lmforge::nn::ops::bf16::kernel()?;
        eprintln!("bf16 matrix products on {}", lmforge::nn::ops::bf16::describe());
    } else if let Some(blas) = lmforge::nn::ops::blas::loaded() {
        eprintln!("matrix products on BLAS: {} (LMFORGE_BLAS)", blas.description);
    }
    Ok(())
}

pub(super) fn report_done(summary: &lmforge::train::TrainSummary) {
    eprintln!(
        "done: {} steps, final loss {:.4}{}; checkpoints in {}",
        summary.steps,
        summary.final_loss,
        summary.val_loss.map(|v| format!(", val loss {v:.4} (ppl {:.2})", v.exp())).unwrap_or_default(),
        summary.run_dir.join("checkpoints").display()
    );
    print_run_time(&summary.time);
}

/// Where the run's time went, in the form `plan` prints its prediction, so the two compare
/// part by part.
fn print_run_time(t: &RunTime) {
    use super::plan::duration;
    eprintln!(
        "time: start-up {} + {} steps x {} + evaluation {} + checkpoints {} + samples {} = {}",
        seconds(t.start_up),
        t.steps_taken,
        duration(t.steps / t.steps_taken.max(1) as f64),
        seconds(t.evaluation),
        seconds(t.checkpoints),
        seconds(t.samples),
        seconds(t.total)
    );
}

/// The run config from --config / --resume and the flags, and whether to resume.
fn resolve(args: &TrainArgs) -> anyhow::Result<(RunConfig, bool)> {
    let Some(resume) = &args.resume else { return Ok((requested_config(args, None)?, false)) };
    let run_dir = if resume == "auto" { base_config(args)?.run_dir } else { PathBuf::from(resume) };
    let mut stored = read_run_config(&run_dir)?;
    // Parallel-data flags on resume (e.g. --books) are read on top of the run's own section.
    let requested = requested_config(args, stored.data.parallel.clone())?;
    let model_flags =
        args.config.is_some() || args.arch.is_some() || !args.settings.is_empty() || args.init_from.is_some();
    if model_flags && requested.model != stored.model {
        bail!(
            "the model settings given differ from the run being resumed ({}):\n  run:   {:?}\n  given: {:?}\nHINT: resume without model flags, or start a new run (--init-from {} for continued pretraining)",
            run_dir.display(),
            stored.model,
            requested.model,
            run_dir.display()
        );
    }
    // Settings that shape the data, the batches or the optimisation are the run's own: a
    // different value on resume is refused rather than silently ignored.
    let mut fixed = Vec::new();
    macro_rules! same {
        ($($field:ident: $flag:literal),*) => {$(
            if args.$field.is_some() && requested.train.$field != stored.train.$field {
                fixed.push(format!("{} {:?} (the run has {:?})", $flag, requested.train.$field, stored.train.$field));
            }
        )*};
    }
    same!(batch_size: "--batch-size", seq_len: "--seq-len", grad_accum: "--grad-accum", lr: "--lr", warmup_steps: "--warmup-steps", seed: "--seed", decay: "--decay", precision: "--precision");
    if args.label_smoothing.is_some() && requested.label_smoothing() != stored.label_smoothing() {
        let (requested, stored) = (requested.label_smoothing(), stored.label_smoothing());
        fixed.push(format!("--label-smoothing {requested} (the run has {stored})"));
    }
    if args.beta2.is_some() && requested.optimizer.beta2 != stored.optimizer.beta2 {
        fixed.push(format!("--beta2 {} (the run has {})", requested.optimizer.beta2, stored.optimizer.beta2));
    }
    let data_flags = args.dataset.is_some()
        || !args.train_files.is_empty()
        || !args.val_files.is_empty()
        || args.tokenizer.is_some()
        || parallel_flags(args);
    if data_flags && requested.data != stored.data {
        fixed.push(format!("data {:?} (the run has {:?})", requested.data, stored.data));
    }
    if !fixed.is_empty() {
        bail!(
            "these settings differ from the run being resumed ({}):\n  {}\nHINT: resume with only --steps / --eval-every / --checkpoint-every / --sample-every, or start a new run (--init-from {} for continued pretraining)",
            run_dir.display(),
            fixed.join("\n  "),
            run_dir.display()
        );
    }
    // What may change on resume: how long to train, how often to report, and where (the
    // checkpoints are device-independent).
    let t = &mut stored.train;
    if args.device.spec.is_some() {
        t.device = args.device.spec;
    }
    if let Some(v) = args.steps {
        t.steps = v;
    }
    if let Some(v) = args.eval_every {
        t.eval_every = v;
    }
    if let Some(v) = args.checkpoint_every {
        t.checkpoint_every = v;
    }
    if let Some(v) = args.sample_every {
        t.sample_every = v;
    }
    Ok((stored, true))
}

/// The run config from --config (or the defaults) and --run.
fn base_config(args: &TrainArgs) -> anyhow::Result<RunConfig> {
    let mut c = match &args.config {
        Some(path) => RunConfig::from_file(path)?,
        None => RunConfig::default(),
    };
    if let Some(v) = &args.run {
        c.run_dir = v.clone();
    }
    Ok(c)
}

/// The run config the flags ask for; parallel-data flags apply on top of the config's own
/// section, else on top of `parallel_base`.
fn requested_config(args: &TrainArgs, parallel_base: Option<ParallelData>) -> anyhow::Result<RunConfig> {
    let mut c = base_config(args)?;
    if let Some(v) = &args.arch {
        c.model.arch = v.clone();
    }
    c.model.set.extend(args.settings.iter().cloned());
    if let Some(v) = &args.init_from {
        c.model.init_from = Some(v.clone());
    }
    if let Some(v) = &args.dataset {
        c.data.dataset = Some(v.clone());
    }
    if !args.train_files.is_empty() {
        c.data.train_files = args.train_files.clone();
    }
    if !args.val_files.is_empty() {
        c.data.val_files = args.val_files.clone();
    }
    if let Some(v) = &args.tokenizer {
        c.data.tokenizer = Some(v.clone());
    }
    if parallel_flags(args) {
        c.data.parallel = Some(parallel_data(args, c.data.parallel.take().or(parallel_base))?);
    }
    if let Some(v) = &args.decay {
        c.train.decay = parse_decay(v)?;
    }
    if let Some(v) = args.beta2 {
        c.optimizer.beta2 = v;
    }
    if let Some(v) = args.label_smoothing {
        c.train.label_smoothing = Some(v);
    }
    let t = &mut c.train;
    macro_rules! set {
        ($($field:ident),*) => { $( if let Some(v) = args.$field { t.$field = v; } )* };
    }
    set!(
        steps,
        batch_size,
        seq_len,
        grad_accum,
        lr,
        seed,
        eval_every,
        eval_batches,
        checkpoint_every,
        sample_every,
        precision
    );
    if let Some(v) = args.warmup_steps {
        t.warmup_steps = Some(v);
    }
    if args.device.spec.is_some() {
        t.device = args.device.spec;
    }
    Ok(c)
}

fn parallel_flags(args: &TrainArgs) -> bool {
    args.parallel_file.is_some()
        || args.source.is_some()
        || args.target.is_some()
        || args.books.is_some()
        || args.val_books.is_some()
        || args.batch_tokens.is_some()
        || args.copied_targets.is_some()
}

/// The parallel-data section from the flags, on top of the run config's own if it has one.
fn parallel_data(args: &TrainArgs, from_config: Option<ParallelData>) -> anyhow::Result<ParallelData> {
    let mut spec = match (from_config, &args.parallel_file, &args.source, &args.target) {
        (_, Some(file), Some(source), Some(target)) => ParallelData::new(file, source, target),
        (Some(spec), ..) => spec,
        (None, file, source, target) => {
            let missing: Vec<&str> =
                [("--parallel-file", file.is_some()), ("--source", source.is_some()), ("--target", target.is_some())]
                    .into_iter()
                    .filter_map(|(flag, given)| (!given).then_some(flag))
                    .collect();
            bail!(
                "parallel data needs --parallel-file, --source and --target together; missing {}\nHINT: e.g. --parallel-file data/parallel/bible.tsv.gz --source kjv --target rv1909",
                missing.join(", ")
            )
        }
    };
    if let Some(v) = &args.parallel_file {
        spec.file = v.clone();
    }
    if let Some(v) = &args.source {
        spec.source = v.clone();
    }
    if let Some(v) = &args.target {
        spec.target = v.clone();
    }
    if let Some(v) = &args.books {
        spec.test_books = v.clone();
    }
    if let Some(v) = &args.val_books {
        spec.val_books = v.clone();
    }
    if let Some(v) = args.batch_tokens {
        spec.batch_tokens = v;
    }
    if let Some(v) = args.copied_targets {
        spec.copied_targets = v;
    }
    Ok(spec)
}

/// `--decay KIND`: the kinds of the run config's `[train.decay]`, `-` or `_` alike.
fn parse_decay(kind: &str) -> anyhow::Result<Decay> {
    let kind = kind.replace('-', "_");
    if kind == "wsd" {
        bail!("--decay wsd needs its decay_fraction; set it in the run config: [train.decay] kind = \"wsd\", decay_fraction = 0.1");
    }
    serde_json::from_value(json!({ "kind": kind })).map_err(|_| {
        anyhow::anyhow!("--decay {kind}: unknown schedule; expected cosine, linear, constant, inverse_sqrt or wsd")
    })
}

/// Run the worker as a child process; after a crash (panic, abort, kill), restart it from the
/// newest valid checkpoint. A clean error (bad input, divergence stop) is not retried.
/// `launcher`: the command that starts the worker's ranks (`mpirun -np N`), empty for one
/// process; the launcher ends the whole job when one rank fails, and passes on its status.
fn supervise(config: &RunConfig, mut resume: bool, launcher: &[String]) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating the lmforge executable")?;
    let mut worker_args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--worker").collect();
    worker_args.push("--worker".into());
    let mut restarts = 0;
    loop {
        let mut command = match launcher.split_first() {
            Some((program, launcher_args)) => {
                let mut command = Command::new(program);
                command.args(launcher_args).arg(&exe);
                command
            }
            None => Command::new(&exe),
        };
        command.args(&worker_args);
        if resume && !worker_args.iter().any(|a| a == "--resume") {
            command.args(["--resume", &config.run_dir.display().to_string()]);
        }
        let status = command.status().with_context(|| match launcher.first() {
            Some(program) => format!(
                "starting the training job with `{program}`\nHINT: install an MPI launcher (Debian: apt-get install openmpi-bin), or name yours in LMFORGE_MPIRUN"
            ),
            None => "starting the training worker".into(),
        })?;
        if status.success() {
            return Ok(());
        }
        // Exit code 1: the worker reported an error itself (bad input, divergence); 2: usage.
        if matches!(status.code(), Some(1) | Some(2)) {
            std::process::exit(status.code().unwrap_or(1));
        }
        let latest = checkpoint::latest_valid(&config.run_dir)?.latest;
        let Some(latest) = latest else { bail!("the training worker crashed ({status}) before its first checkpoint") };
        restarts += 1;
        append_event(
            &config.run_dir,
            json!({"event": "restart", "reason": status.to_string(), "from": latest.display().to_string(), "restart": restarts}),
        )?;
        if restarts > MAX_RESTARTS {
            bail!("the training worker crashed {restarts} times; giving up (last: {status})");
        }
        eprintln!("training worker crashed ({status}); restarting from {}", latest.display());
        resume = true;
    }
}
