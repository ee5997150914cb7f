//! Encoder–decoder data through the command line: `lmforge train --parallel-file` prepares a run
//! (corpus, book split, shared tokenizer) and `lmforge eval translate` scores held-out books;
//! every kind of bad input is a clear error with a non-zero exit, never a panic.

mod command;

use command::{fails, ok, ok_stderr};
use std::path::{Path, PathBuf};

fn assert_mentions(stderr: &str, parts: &[&str]) {
    for part in parts {
        assert!(stderr.contains(part), "expected {part:?} in:\n{stderr}");
    }
}

/// Six books of made-up aligned English/Spanish lines.
fn small_tsv(dir: &Path) -> PathBuf {
    let mut text = String::from("book\tchapter\ten\tes\n");
    for (book, rows) in [("Alpha", 20), ("Beta", 12), ("Gamma", 10), ("Delta", 6), ("Epsilon", 25), ("Zeta", 5)] {
        for i in 1..=rows {
            let n = 3 + (i * 5) % 9;
            let en: Vec<String> = (0..n).map(|w| format!("word{}", (w + i) % 13)).collect();
            let es: Vec<String> = (0..n).map(|w| format!("palabra{}", (w * i) % 11)).collect();
            text.push_str(&format!("{book}\t{i}\t{}.\t{}.\n", en.join(" "), es.join(" ")));
        }
    }
    let path = dir.join("small.tsv");
    std::fs::write(&path, text).unwrap();
    path
}

/// A temporary directory holding the small corpus, and the path a run in it takes.
struct Workspace {
    dir: tempfile::TempDir,
    tsv: String,
    run: String,
}

impl Workspace {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let tsv = small_tsv(dir.path()).to_str().unwrap().to_string();
        let run = dir.path().join("run").to_str().unwrap().to_string();
        Workspace { dir, tsv, run }
    }

    /// A file of the run, as JSON.
    fn run_json(&self, file: &str) -> serde_json::Value {
        serde_json::from_str(&self.run_text(file)).unwrap()
    }

    fn run_text(&self, file: &str) -> String {
        std::fs::read_to_string(Path::new(&self.run).join(file)).unwrap()
    }
}

/// `train` arguments of an encoder–decoder run on the small corpus.
fn train_args<'a>(run: &'a str, tsv: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--no-supervisor",
        "--run",
        run,
        "--arch",
        "tiny-transformer",
        "--set",
        "vocab_size=320",
        "--set",
        "d_model=64",
        "--set",
        "ffn.hidden=128",
        "--parallel-file",
        tsv,
        "--source",
        "en",
        "--target",
        "es",
        "--books",
        "Zeta",
        "--val-books",
        "Delta",
    ]
}

#[test]
fn train_prepares_the_parallel_run_and_trains() {
    let work = Workspace::new();
    let (run, run_s) = (Path::new(&work.run), work.run.as_str());
    let mut args = train_args(run_s, &work.tsv);
    args.extend(["--label-smoothing", "0.1", "--decay", "inverse-sqrt", "--beta2", "0.98", "--batch-tokens", "512"]);
    args.extend(["--steps", "4", "--warmup-steps", "2", "--sample-every", "0"]);
    let stderr = ok_stderr(&args);
    assert_mentions(
        &stderr,
        &["en → es: 67 training pairs (4 books), 6 validation pairs (Delta), 5 test pairs (Zeta)", "step      4/4"],
    );
    assert!(run.join("checkpoints/step-000004/manifest.json").exists());

    let split = work.run_json("split.json");
    assert_eq!(split["books"]["test"], serde_json::json!(["Zeta"]));
    assert_eq!(split["pairs"]["train"], 67);
    let tokenizer = work.run_json("tokenizer.json");
    let added: Vec<&str> =
        tokenizer["added_tokens"].as_array().unwrap().iter().map(|t| t["content"].as_str().unwrap()).collect();
    assert_eq!(added, ["<pad>", "<s>", "</s>"]);
    let config = work.run_text("run.toml");
    for line in
        ["label_smoothing = 0.1", "kind = \"inverse_sqrt\"", "beta2 = 0.98", "batch_tokens = 512", "[data.parallel]"]
    {
        assert!(config.contains(line), "{line} in run.toml:\n{config}");
    }

    // Resuming may not change how the run learns or what it learns from.
    let err = fails(&["train", "--no-supervisor", "--resume", run_s, "--beta2", "0.999", "--label-smoothing", "0.2"]);
    assert_mentions(&err, &["--beta2 0.999 (the run has 0.98)", "--label-smoothing 0.2 (the run has 0.1)"]);
    let err = fails(&["train", "--no-supervisor", "--resume", run_s, "--books", "Alpha"]);
    assert_mentions(&err, &["differ from the run being resumed", "Alpha"]);

    // Evaluating the run: only on its held-out books.
    let err = fails(&["eval", "translate", "--model", run_s, "--books", "Alpha"]);
    assert_mentions(&err, &["the run trained on Alpha", "HINT: evaluate on its held-out books: Zeta"]);
    assert!(!run.join("eval").exists(), "no hypotheses file without hypotheses");
    let scores = ok(&["eval", "translate", "--model", run_s, "--beams", "1", "--max-new-tokens", "8"]);
    assert!(scores.contains("BLEU = "), "{scores}");
    assert_eq!(work.run_text("eval/en-es.txt").lines().count(), 5);
    // With the matrices (cross-attention's too) held in bf16.
    let hypotheses = work.dir.path().join("bf16.txt");
    let stderr = ok_stderr(&[
        "eval",
        "translate",
        "--model",
        run_s,
        "--beams",
        "1",
        "--max-new-tokens",
        "8",
        "--dtype",
        "bf16",
        "--out",
        hypotheses.to_str().unwrap(),
    ]);
    assert!(stderr.contains("bf16 weights"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&hypotheses).unwrap().lines().count(), 5);
    let err = fails(&["eval", "translate", "--model", run_s, "--dtype", "fp8"]);
    assert_mentions(&err, &["'fp8'", "f32, bf16"]);
}

#[test]
fn copied_targets_train_each_training_target_also_as_its_own_source() {
    let work = Workspace::new();
    let mut args = train_args(&work.run, &work.tsv);
    args.extend(["--copied-targets", "1", "--batch-tokens", "512", "--steps", "2", "--warmup-steps", "1"]);
    args.extend(["--sample-every", "0"]);
    let stderr = ok_stderr(&args);
    assert_mentions(&stderr, &["en → es: 134 training pairs (4 books, 67 of them copied targets), 6 validation pairs"]);
    let split = work.run_json("split.json");
    assert_eq!((split["pairs"]["train"].as_u64(), split["copied_targets"].as_u64()), (Some(134), Some(67)));
    assert_eq!(split["pairs"]["validation"], 6, "validation pairs are never copied");
    let config = work.run_text("run.toml");
    assert!(config.contains("copied_targets = 1.0"), "{config}");

    let err = fails(&["train", "--no-supervisor", "--resume", &work.run, "--copied-targets", "0.5"]);
    assert_mentions(&err, &["differ from the run being resumed"]);
}

#[test]
fn layout_and_data_must_agree() {
    let work = Workspace::new();
    let (run_s, tsv_s) = (work.run.as_str(), work.tsv.as_str());
    // --source given to a decoder-only model.
    let err = fails(&[
        "train",
        "--no-supervisor",
        "--run",
        run_s,
        "--arch",
        "tiny-llama",
        "--parallel-file",
        tsv_s,
        "--source",
        "en",
        "--target",
        "es",
        "--books",
        "Zeta",
    ]);
    assert_mentions(&err, &["need an encoder–decoder model", "decoder-only", "HINT"]);
    // An encoder–decoder model without --source.
    let other = work.dir.path().join("run2");
    let err = fails(&["train", "--no-supervisor", "--run", other.to_str().unwrap(), "--arch", "transformer-base"]);
    assert_mentions(
        &err,
        &["is an encoder–decoder model", "HINT: pass --parallel-file FILE.tsv --source COLUMN --target COLUMN"],
    );
    // --source without the file, and label smoothing for a decoder-only run.
    let err = fails(&["train", "--no-supervisor", "--run", run_s, "--source", "en"]);
    assert_mentions(&err, &["missing --parallel-file, --target"]);
    let err = fails(&["train", "--no-supervisor", "--run", run_s, "--label-smoothing", "0.1"]);
    assert_mentions(&err, &["train.label_smoothing = 0.1 applies to encoder–decoder training"]);
    let err = fails(&["train", "--no-supervisor", "--run", run_s, "--decay", "exponential"]);
    assert_mentions(&err, &["--decay exponential: unknown schedule"]);
    let err = fails(&["train", "--no-supervisor", "--run", run_s, "--decay", "inverse_sqrt", "--warmup-steps", "0"]);
    assert_mentions(&err, &["inverse_sqrt", "warmup_steps"]);
}

#[test]
fn bad_parallel_files_are_errors_naming_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let run_s = run.to_str().unwrap();
    let attempt = |name: &str, text: &str, extra: &[&str]| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let path_s = path.to_str().unwrap().to_string();
        let mut args = train_args(run_s, &path_s);
        args.extend(extra);
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let _ = std::fs::remove_dir_all(&run);
        (fails(&args), path_s)
    };
    let (err, path) = attempt("nocol.tsv", "book\ten\tfr\nZeta\ta\tb\n", &[]);
    assert_mentions(&err, &[&path, "no column `es`", "book, en, fr"]);
    let (err, path) = attempt("ragged.tsv", "book\ten\tes\nZeta\ta\tb\nDelta\tc\n", &[]);
    assert_mentions(&err, &[&path, "line 3 has 2 tab-separated fields, but the header has 3"]);
    let (err, _) = attempt("empty-side.tsv", "book\ten\tes\nZeta\ta\tb\nDelta\t\td\n", &[]);
    assert_mentions(&err, &["line 3: the `en` column (column 2) is empty"]);

    // A source longer than the model's positions.
    let tsv = small_tsv(dir.path());
    let long = format!(
        "{}Alpha\t99\t{}\tcorto.\n",
        std::fs::read_to_string(&tsv).unwrap(),
        vec!["word1 word2 word3"; 30].join(" ")
    );
    let (err, path) = attempt("long.tsv", &long, &["--set", "context_length=64"]);
    assert_mentions(
        &err,
        &[&path, "line 80: the `en` text takes", "more than the model's 64 (context_length)", "--set context_length="],
    );
}

#[test]
fn eval_translate_needs_its_data_named() {
    let err = fails(&["eval", "translate", "--copy-source", "--source", "kjv"]);
    assert_mentions(&err, &["--parallel-file, --source and --target are needed"]);
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/parallel/bible.tsv.gz");
    let err = fails(&[
        "eval",
        "translate",
        "--copy-source",
        "--parallel-file",
        corpus.to_str().unwrap(),
        "--source",
        "kjv",
        "--target",
        "web",
        "--books",
        "Hezekiah",
    ]);
    assert_mentions(&err, &["no book `Hezekiah`", "Genesis"]);
    let err = fails(&["eval", "translate", "--model", "nowhere", "--copy-source"]);
    assert_mentions(&err, &["cannot be used with"]);
}
