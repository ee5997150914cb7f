//! `lmforge eval translate`: translate held-out books and print BLEU and chrF.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use lmforge::data::parallel::{default_test_books, ParallelCorpus, ParallelData};
use lmforge::eval::translate::check_held_out;
use lmforge::eval::{score_translations, translate, DecodeOptions, TranslationScores, TranslationSet};
use lmforge::train::run_config::RunConfig;
use lmforge::train::setup::RUN_CONFIG_FILE;
use serde_json::json;

use super::arch::{load_for_inference, DtypeArg};
use super::device::DeviceArg;

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Translate whole held-out books of a parallel corpus; write the hypotheses and print corpus
    /// BLEU and chrF (computed as sacrebleu does with its defaults).
    Translate(TranslateArgs),
}

#[derive(Args)]
pub struct TranslateArgs {
    /// The model: a training run or one of its checkpoints. A run supplies the defaults of the
    /// options below, and only books it held out may be scored.
    #[arg(long, required_unless_present = "copy_source", conflicts_with = "copy_source")]
    model: Option<PathBuf>,
    /// Score the untranslated source as the hypothesis: the baseline a model must beat (high for
    /// KJV → WEB, where most words are shared). Needs no model.
    #[arg(long)]
    copy_source: bool,
    /// A TSV (plain or .gz) with a header line and a `book` column.
    #[arg(long, value_name = "FILE")]
    parallel_file: Option<PathBuf>,
    /// The column to translate from.
    #[arg(long, value_name = "COLUMN")]
    source: Option<String>,
    /// The column of the reference translations.
    #[arg(long, value_name = "COLUMN")]
    target: Option<String>,
    /// Books to translate (default: the run's test books, or Ruth,Jonah,Philemon,Jude).
    #[arg(long, value_delimiter = ',', value_name = "BOOK,...")]
    books: Option<Vec<String>>,
    /// Write the hypotheses here, one per line in corpus order (default with --model:
    /// RUN/eval/SOURCE-TARGET.txt).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Beam width (1 = greedy).
    #[arg(long, default_value_t = 4)]
    beams: usize,
    /// Length penalty α: a finished hypothesis scores log p / length^α (as in Hugging Face's
    /// `generate`, whose default is also 1).
    #[arg(long, default_value_t = 1.0)]
    length_penalty: f64,
    /// Longest translation in tokens (default: the model's positions).
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Print the scores as one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceArg,
    #[command(flatten)]
    dtype: DtypeArg,
}

pub fn eval(command: EvalCommand) -> anyhow::Result<()> {
    match command {
        EvalCommand::Translate(args) => eval_translate(args),
    }
}

fn eval_translate(args: TranslateArgs) -> anyhow::Result<()> {
    if args.beams == 0 {
        bail!("--beams 0: at least one beam is needed (1 = greedy)");
    }
    if !(args.length_penalty.is_finite() && args.length_penalty >= 0.0) {
        bail!("--length-penalty {}: expected a number >= 0", args.length_penalty);
    }
    let run = match &args.model {
        Some(model) => run_parallel_data(model)?,
        None => None,
    };
    let from_run = |field: fn(&ParallelData) -> String| run.as_ref().map(field);
    let (Some(file), Some(source), Some(target)) = (
        args.parallel_file.clone().or_else(|| run.as_ref().map(|r| r.file.clone())),
        args.source.clone().or_else(|| from_run(|r| r.source.clone())),
        args.target.clone().or_else(|| from_run(|r| r.target.clone())),
    ) else {
        bail!(
            "--parallel-file, --source and --target are needed{}\nHINT: e.g. --parallel-file data/parallel/bible.tsv.gz --source kjv --target web",
            if args.model.is_some() { " (the model is not a run trained on parallel data)" } else { "" }
        )
    };
    let books =
        args.books.clone().or_else(|| run.as_ref().map(|r| r.test_books.clone())).unwrap_or_else(default_test_books);

    let corpus = ParallelCorpus::read(&file, &source, &target)?;
    if let Some(run) = &run {
        check_held_out(&corpus, run, &books)?;
    }
    let set = TranslationSet::from_books(&corpus, &books)?;
    let (system, hypotheses) = match &args.model {
        None => ("copy of the source".to_string(), set.sources.clone()),
        Some(model) => {
            let options = DecodeOptions {
                beams: args.beams,
                length_penalty: args.length_penalty,
                max_new_tokens: args.max_new_tokens,
            };
            let loaded = load_for_inference(model, &args.device.open()?, args.dtype)?;
            let hypotheses = translate(&loaded, &set.sources, &options)?;
            let how =
                format!("beams {}, length penalty {}, {} weights", args.beams, args.length_penalty, args.dtype.dtype);
            (format!("{} ({how})", model.display()), hypotheses)
        }
    };
    let out = args
        .out
        .clone()
        .or_else(|| args.model.as_ref().map(|m| run_dir_of(m).join("eval").join(format!("{source}-{target}.txt"))));
    if let Some(out) = &out {
        write_lines(out, &hypotheses)?;
    }
    let scores = score_translations(&hypotheses, &set.references)?;
    eprintln!("{source} → {target}: {} pairs of {} ({}), {system}", set.len(), books.join(", "), file.display());
    if let Some(out) = &out {
        eprintln!("hypotheses written to {}", out.display());
    }
    print_scores(&scores, args.json, &source, &target, &books, out.as_deref())
}

/// The parallel-data section of the run that `model` is (or is a checkpoint of), if any.
fn run_parallel_data(model: &Path) -> anyhow::Result<Option<ParallelData>> {
    let path = run_dir_of(model).join(RUN_CONFIG_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    Ok(RunConfig::from_file(&path)
        .with_context(|| format!("reading the run config of {}", model.display()))?
        .data
        .parallel)
}

/// A run directory, for a run or for one of its checkpoints (`RUN/checkpoints/step-N`).
fn run_dir_of(model: &Path) -> PathBuf {
    match model.parent().and_then(Path::parent) {
        Some(run) if model.parent().and_then(Path::file_name) == Some("checkpoints".as_ref()) => run.to_path_buf(),
        _ => model.to_path_buf(),
    }
}

/// One hypothesis per line: a line break inside one would shift every later line.
fn write_lines(path: &Path, lines: &[String]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let text: String = lines.iter().map(|l| l.replace(['\n', '\r'], " ") + "\n").collect();
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn print_scores(
    scores: &TranslationScores,
    as_json: bool,
    source: &str,
    target: &str,
    books: &[String],
    hypotheses: Option<&Path>,
) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    let (bleu, chrf) = (&scores.bleu, &scores.chrf);
    if as_json {
        let value = json!({
            "source": source,
            "target": target,
            "books": books,
            "pairs": scores.segments,
            "hypotheses": hypotheses,
            "bleu": {
                "score": bleu.score,
                "precisions": bleu.precisions,
                "bp": bleu.bp,
                "ratio": bleu.ratio(),
                "hyp_len": bleu.stats.sys_len,
                "ref_len": bleu.stats.ref_len,
                "signature": "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp",
            },
            "chrf": {"score": chrf.score, "signature": "nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no"},
        });
        writeln!(stdout, "{}", serde_json::to_string_pretty(&value)?)?;
    } else {
        writeln!(stdout, "{bleu}\n{chrf}")?;
    }
    Ok(())
}
