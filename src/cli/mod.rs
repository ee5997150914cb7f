//! Subcommand definitions and dispatch.

mod arch;
mod bench;
mod bench_generate;
mod bench_moe;
mod data;
mod data_parallel;
mod device;
mod eval;
mod export;
mod plan;
mod run;
mod show;
mod train;
mod upcycle;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "lmforge",
    version,
    about = "Define, adopt, adapt and train LLM architectures",
    after_help = "Environment:\n  LMFORGE_BLAS=LIBRARY  run the f32 matrix products on a CBLAS library (MKL's libmkl_rt.so.3, \
                  OpenBLAS's libopenblas.so.0) instead of lmforge's own kernel; scripts/fetch_mkl.sh fetches MKL"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the built-in architectures with their parameter counts.
    Presets,
    /// Describe an architecture: layers, parameters, FLOPs and memory.
    Show(show::ShowArgs),
    /// Create a model directory with freshly initialised weights for any architecture.
    Init {
        /// Preset name or config file.
        arch: String,
        #[arg(long = "set", value_name = "PATH=VALUE")]
        settings: Vec<String>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output directory (lmforge format; `lmforge export` converts it).
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Write the logits of a token sequence to a safetensors file.
    Score(run::ScoreArgs),
    /// Generate text (streamed) or token ids from a model.
    Generate(run::GenerateArgs),
    /// Convert a model to another format (Hugging Face directory, GGUF file).
    Export(export::ExportArgs),
    /// Turn a dense model into a mixture of experts whose experts start as copies of its FFN.
    Upcycle(upcycle::UpcycleArgs),
    /// Draw a run's training/validation loss, learning rate and rollbacks to a PNG.
    Plot {
        /// The run directory.
        run: std::path::PathBuf,
        /// Output PNG (default: RUN/loss.png).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Tokenizer tools.
    #[command(subcommand)]
    Tokenizer(data::TokenizerCommand),
    /// Dataset tools.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Train a model from scratch or continue pretraining; restarts itself after a crash.
    Train(Box<train::TrainArgs>),
    /// Evaluate a model on held-out data.
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// Compare adopt, adapt and invent plans for a corpus and a compute budget.
    Plan(Box<plan::PlanArgs>),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Time one training step (forward, backward, clipping, AdamW) of the reference GPT config.
    Train(bench::BenchTrainArgs),
    /// GFLOP/s of the matrix products of a training step: lmforge's kernel against candle's.
    Matmul(bench::BenchMatmulArgs),
    /// Peak memory of one training step per sequence length, flash against naive attention.
    Memory(bench::BenchMemoryArgs),
    /// A mixture-of-experts training step against a dense one with the same active parameters.
    Moe(bench_moe::BenchMoeArgs),
    /// Prefill and decode speed of a model, against llama.cpp's llama-bench on the same file.
    Generate(bench_generate::BenchGenerateArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    load_blas_from_env()?;
    match cli.command {
        Command::Presets => show::presets(),
        Command::Show(args) => show::show(args),
        Command::Init { arch, settings, seed, out } => {
            let config = lmforge::io::resolve_arch(&arch, &settings)?;
            let weights = lmforge::model::init_weights(&config, seed, &candle_core::Device::Cpu)?;
            lmforge::io::native::save_native_dir(&config, &weights, None, &out)?;
            eprintln!("wrote {} ({} parameters) to {}", config.name, config.params_total(), out.display());
            Ok(())
        }
        Command::Score(args) => run::score(args),
        Command::Generate(args) => run::generate(args),
        Command::Export(args) => export::export(args),
        Command::Upcycle(args) => upcycle::upcycle(args),
        Command::Train(args) => train::train(*args),
        Command::Plan(args) => plan::plan(*args),
        Command::Plot { run, out } => {
            let out = out.unwrap_or_else(|| run.join("loss.png"));
            lmforge::plot::plot_run(&run, &out)?;
            eprintln!("wrote {}", out.display());
            Ok(())
        }
        Command::Bench(BenchCommand::Train(args)) => bench::bench_train(args),
        Command::Bench(BenchCommand::Matmul(args)) => bench::bench_matmul(args),
        Command::Bench(BenchCommand::Memory(args)) => bench::bench_memory(args),
        Command::Bench(BenchCommand::Moe(args)) => bench_moe::bench_moe(args),
        Command::Bench(BenchCommand::Generate(args)) => bench_generate::bench_generate(args),
        Command::Tokenizer(command) => data::tokenizer(command),
        Command::Data(command) => data::data(command),
        Command::Eval(command) => eval::eval(command),
    }
}

/// `LMFORGE_BLAS`: a CBLAS library to run the `f32` products on (`lmforge::nn::ops::blas`).
/// An environment variable rather than a flag because every command multiplies matrices, and
/// a restarted training run inherits it.
fn load_blas_from_env() -> anyhow::Result<()> {
    use anyhow::Context;
    if let Some(library) = std::env::var_os("LMFORGE_BLAS").filter(|v| !v.is_empty()) {
        lmforge::nn::ops::blas::load(std::path::Path::new(&library)).context("LMFORGE_BLAS")?;
    }
    Ok(())
}
