//! `lmforge plan`: compare adopt, adapt and invent for a corpus and a compute budget.

use std::path::PathBuf;

use clap::Args;
use lmforge::plan::candidates::short_count;
use lmforge::plan::device::DEFAULT_MFU;
use lmforge::plan::{gib, seconds, Budget, MoeShape, PlanDevice, PlanReport, PlanRequest, PlanRow};
use lmforge::train::run_config::TrainSpec;

#[derive(Args)]
pub struct PlanArgs {
    /// Training text files, or one dataset directory from `lmforge data prepare` (default: the
    /// bundled Austen corpus).
    #[arg(long, num_args = 1..)]
    corpus: Vec<PathBuf>,
    /// Budget: wall-clock hours on --device.
    #[arg(long, conflicts_with = "flops", required_unless_present_any = ["flops", "rehearse"])]
    hours: Option<f64>,
    /// Budget: training FLOPs (forward + backward), e.g. 1e15.
    #[arg(long)]
    flops: Option<f64>,
    /// `this-cpu` (measured now) or an accelerator from its datasheet: a100, h100, h200.
    #[arg(long, default_value = "this-cpu")]
    device: String,
    /// Model FLOPs utilisation assumed on an accelerator.
    #[arg(long, default_value_t = DEFAULT_MFU)]
    mfu: f64,
    /// Memory limit in GiB (default: the device's memory; this machine's RAM for this-cpu).
    #[arg(long, value_name = "GiB")]
    memory: Option<f64>,
    /// Comma-separated presets, config files and checkpoints (HF directory, .gguf, lmforge run)
    /// to plan from (default: tiny-llama, with adapt and invent plans sized to the budget).
    #[arg(long, value_delimiter = ',')]
    candidates: Vec<String>,
    /// Sequences per optimizer step (default: lmforge train's).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Tokens per sequence (default: lmforge train's).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Experts of the invented mixtures.
    #[arg(long, default_value_t = 4)]
    experts: usize,
    /// Experts routed per token in the invented mixtures.
    #[arg(long, default_value_t = 2)]
    top_k: usize,
    /// Where tokenizers, tokenized corpora and calibrations are kept (default:
    /// $LMFORGE_CACHE/plan, else ~/.cache/lmforge/plan).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Rehearse again even where the cache has a measurement.
    #[arg(long)]
    recalibrate: bool,
    /// Parent directory of the printed commands' runs.
    #[arg(long, default_value = "runs")]
    runs: PathBuf,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Internal: run one rehearsal (a JSON spec) and print its measurements.
    #[arg(long, hide = true, value_name = "SPEC")]
    rehearse: Option<PathBuf>,
}

pub fn plan(args: PlanArgs) -> anyhow::Result<()> {
    if let Some(spec) = &args.rehearse {
        return rehearse(spec);
    }
    let budget = match (args.hours, args.flops) {
        (Some(hours), _) => Budget::Hours { hours },
        (None, Some(flops)) => Budget::Flops { flops },
        (None, None) => anyhow::bail!("give a budget: --hours H or --flops F"),
    };
    let memory_limit = match args.memory {
        Some(g) if g > 0.0 && g.is_finite() => Some((g * (1u64 << 30) as f64) as u64),
        Some(g) => anyhow::bail!("--memory {g}: expected a positive size in GiB"),
        None => None,
    };
    let defaults = TrainSpec::default();
    let request = PlanRequest {
        corpus: args.corpus,
        budget,
        device: PlanDevice::parse(&args.device, args.mfu)?,
        memory_limit,
        candidates: args.candidates,
        batch_size: args.batch_size.unwrap_or(defaults.batch_size),
        seq_len: args.seq_len.unwrap_or(defaults.seq_len),
        moe: MoeShape { experts: args.experts, top_k: args.top_k },
        cache_dir: args.cache.unwrap_or_else(default_cache),
        exe: std::env::current_exe()?,
        recalibrate: args.recalibrate,
        runs_dir: args.runs,
    };
    let report = lmforge::plan::plan(&request)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

/// The child side of a rehearsal: measure and print one JSON line.
fn rehearse(spec: &std::path::Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(spec)?;
    let spec: lmforge::plan::calibrate::RehearsalSpec = serde_json::from_str(&text)?;
    let rehearsal = lmforge::plan::calibrate::rehearse(&spec)?;
    println!("{}", serde_json::to_string(&rehearsal)?);
    Ok(())
}

fn default_cache() -> PathBuf {
    match std::env::var_os("LMFORGE_CACHE").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("plan"),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/lmforge/plan"),
    }
}

fn print_report(r: &PlanReport) {
    let budget = match r.budget {
        Budget::Hours { hours } => format!("{hours} h"),
        Budget::Flops { flops } => format!("{flops:.2e} training FLOPs"),
    };
    println!("corpus   {}", r.corpus);
    println!("budget   {budget} on {}", r.device);
    println!("memory   {} limit; batch {} x {} tokens per step", gib(r.memory_limit), r.batch_size, r.seq_len);
    if let Some(n) = r.optimal_params {
        println!("size     the loss guide prefers about {} parameters for this budget and corpus", short_count(n));
    }
    println!();
    let width = r.rows.iter().map(|row| row.spec.label.len()).max().unwrap_or(4).max(4);
    println!(
        "{:>2}  {:<width$}  {:>7} {:>7}  {:>9} {:>8}  {:>21} {:>6}  {:>9}  {:>7}  {:>9}  {:>5}",
        "#",
        "plan",
        "params",
        "active",
        "batch",
        "steps",
        "tokens seen / corpus",
        "epochs",
        "FLOPs",
        "time",
        "peak mem",
        "loss*"
    );
    for (i, row) in r.rows.iter().enumerate() {
        let batch = if row.grad_accum > 1 {
            format!("{}x{}x{}", row.grad_accum, row.batch_size, row.seq_len)
        } else {
            format!("{}x{}", row.batch_size, row.seq_len)
        };
        println!(
            "{:>2}  {:<width$}  {:>7} {:>7}  {:>9} {:>8}  {:>21} {:>6.2}  {:>9.2e}  {:>7}  {:>9}  {:>5.2}",
            i + 1,
            row.spec.label,
            short_count(row.params_total as f64),
            short_count(row.params_active as f64),
            batch,
            row.steps,
            format!("{} / {}", short_count(row.tokens_seen as f64), short_count(row.tokens_available as f64)),
            row.epochs,
            row.train_flops,
            seconds(row.time.total),
            gib(row.memory.peak),
            row.loss_guide
        );
    }
    println!(
        "* loss guide: a data-constrained Chinchilla estimate for comparing rows (see assumptions), not a prediction"
    );
    if !r.excluded.is_empty() {
        println!();
        println!("not possible:");
        for e in &r.excluded {
            println!("  - {}: {}", e.label, e.reason);
        }
    }
    for (i, row) in r.rows.iter().enumerate() {
        println!();
        print_details(i + 1, row);
    }
    if let Some(rec) = &r.recommendation {
        let row = &r.rows[rec.row];
        println!();
        println!("recommended: {}. {}", rec.row + 1, row.spec.label);
        println!("  why: {}", rec.why);
        for command in &row.commands {
            println!("  {command}");
        }
    }
    println!();
    println!("assumptions:");
    for a in &r.assumptions {
        println!("  - {a}");
    }
}

fn print_details(number: usize, row: &PlanRow) {
    let m = &row.memory;
    let source = match m.source {
        lmforge::plan::memory::MemorySource::Measured => "measured",
        lmforge::plan::memory::MemorySource::Analytic => "counted",
    };
    println!("{number}. {}", row.spec.label);
    println!(
        "   data     {} training tokens in {}; {} seen = {:.2} epochs, worth {} new tokens",
        short_count(row.tokens_available as f64),
        row.tokenizer,
        short_count(row.tokens_seen as f64),
        row.epochs,
        short_count(row.effective_tokens)
    );
    println!(
        "   memory   weights {} + gradients {} + AdamW {} + activations {} ({}x{}, {source}) + runtime {} = {}; checkpoint, evaluation and sample {}; KV cache for generation at full context {}",
        gib(m.weights),
        gib(m.gradients),
        gib(m.adamw),
        gib(m.activations),
        row.batch_size,
        row.seq_len,
        gib(m.runtime),
        gib(m.step_peak),
        gib(m.checkpoint_peak),
        gib(m.kv_cache_full_context)
    );
    let t = &row.time;
    let per_step = t.training / row.steps.max(1) as f64;
    println!(
        "   time     start-up {} + {} steps x {} + evaluation {} + checkpoints {} + samples {} = {} ({:.0} tokens/s{})",
        seconds(t.startup),
        row.steps,
        duration(per_step),
        seconds(t.evaluation),
        seconds(t.checkpoints),
        seconds(t.samples),
        seconds(t.total),
        row.tokens_per_second,
        match &row.calibration {
            Some(c) => format!(
                "; measured {}, steps took {}-{}",
                if c.cached { "earlier (cached)" } else { "now" },
                duration(c.full.step_seconds_range.0),
                duration(c.full.step_seconds_range.1)
            ),
            None => String::new(),
        }
    );
    for command in &row.commands {
        println!("   run      {command}");
    }
}

/// Milliseconds below a second, else [`seconds`].
/// Seconds as `350 ms` below one second, else as [`seconds`].
pub(super) fn duration(s: f64) -> String {
    if s < 1.0 {
        format!("{:.0} ms", s * 1e3)
    } else {
        seconds(s)
    }
}
