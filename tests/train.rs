//! Training as a user runs it: exact resume after SIGKILL, automatic restart after a crash,
//! automatic rollback after NaN and loss spikes, and clear errors on bad runs.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use candle_core::Device;

mod command;
mod small_run;
use command::{command, fails, succeeds};
use small_run::{events, losses, metrics, write_config_with};

/// A small run config; `arch` picks the family.
fn write_config(dir: &Path, run: &Path, arch: &str, steps: u64) -> PathBuf {
    write_config_with(dir, run, arch, steps, &[])
}

fn final_val_loss(run: &Path) -> f64 {
    metrics(run).iter().rev().find_map(|v| v.get("val_loss")?.as_f64()).unwrap()
}

/// Every tensor of the two checkpoints equal bit for bit.
fn assert_same_weights(a: &Path, b: &Path) {
    let load = |p: &Path| candle_core::safetensors::load(p.join("model.safetensors"), &Device::Cpu).unwrap();
    let (a, b) = (load(a), load(b));
    assert_eq!(a.len(), b.len());
    for (name, ta) in &a {
        let va: Vec<f32> = ta.flatten_all().unwrap().to_vec1().unwrap();
        let vb: Vec<f32> = b[name].flatten_all().unwrap().to_vec1().unwrap();
        assert!(va.iter().zip(&vb).all(|(x, y)| x.to_bits() == y.to_bits()), "{name} differs");
    }
}

fn checkpoint(run: &Path, step: u64) -> PathBuf {
    run.join(format!("checkpoints/step-{step:06}"))
}

/// `write_config_with` with `train.precision` set.
fn write_config_at(dir: &Path, run: &Path, arch: &str, steps: u64, extra: &[&str], precision: &str) -> PathBuf {
    let config = write_config_with(dir, run, arch, steps, extra);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[train]\n", &format!("[train]\nprecision = \"{precision}\"\n"));
    std::fs::write(&config, text).unwrap();
    config
}

fn resume_is_bit_identical(arch: &str, extra: &[&str]) {
    resume_with_config_is_bit_identical(|dir, run| write_config_with(dir, run, arch, 48, extra));
}

/// [`resume_is_bit_identical`] with the linear layers' products at `precision`.
fn resume_at_precision_is_bit_identical(arch: &str, extra: &[&str], precision: &str) {
    resume_with_config_is_bit_identical(|dir, run| write_config_at(dir, run, arch, 48, extra, precision));
}

/// [`resume_is_bit_identical`] for runs of 48 steps, checkpointed every 8, that
/// `write_config(dir, run_dir)` describes.
fn resume_with_config_is_bit_identical(write_config: impl Fn(&Path, &Path) -> PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let clean = tmp.path().join("clean");
    let killed = tmp.path().join("killed");
    let clean_config = write_config(tmp.path(), &clean);
    succeeds(&["train", "--config", clean_config.to_str().unwrap(), "--no-supervisor"]);

    let config = write_config(tmp.path(), &killed);
    let mut child = command()
        .args(["train", "--config", config.to_str().unwrap(), "--no-supervisor"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !checkpoint(&killed, 8).join("manifest.json").exists() {
        assert!(started.elapsed() < Duration::from_secs(300), "no checkpoint at step 8");
        assert!(child.try_wait().unwrap().is_none(), "worker exited before step 8");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!checkpoint(&killed, 48).exists(), "the run finished before it was killed");
    succeeds(&["train", "--resume", killed.to_str().unwrap(), "--no-supervisor"]);

    assert_same_weights(&checkpoint(&clean, 48), &checkpoint(&killed, 48));
    assert_eq!(losses(&clean), losses(&killed), "loss lines differ");
    assert_eq!(losses(&clean).len(), 48);
}

#[test]
fn llama_style_resume_after_sigkill_is_bit_identical() {
    resume_is_bit_identical("tiny-llama", &[]);
}

#[test]
fn gpt2_style_resume_after_sigkill_is_bit_identical() {
    resume_is_bit_identical("tiny-gpt2", &[]);
}

/// A mixture of experts whose router input is jittered with noise from the run's random
/// stream and whose experts drop tokens over capacity: the checkpoint carries the stream.
#[test]
fn moe_with_jitter_resume_after_sigkill_is_bit_identical() {
    resume_is_bit_identical("tiny-mixtral", &["ffn.router.jitter=0.2", "ffn.router.capacity_factor=1.0"]);
}

/// bf16 products (a tied head, GELU, learned positions): the f32 masters in the checkpoint
/// and the rounding are enough to continue bit for bit.
#[test]
fn bf16_resume_after_sigkill_is_bit_identical() {
    resume_at_precision_is_bit_identical("tiny-gpt2", &[], "bf16");
}

/// A bf16 run computes other numbers than an f32 one (the rounding is on), lands close to it,
/// keeps f32 weights in its checkpoints, and cannot switch precision on resume.
#[test]
fn bf16_training_tracks_f32_and_keeps_its_precision() {
    let tmp = tempfile::tempdir().unwrap();
    let (f32_run, bf16_run) = (tmp.path().join("f32"), tmp.path().join("bf16"));
    for (run_dir, precision) in [(&f32_run, "f32"), (&bf16_run, "bf16")] {
        let config = write_config_at(tmp.path(), run_dir, "tiny-llama", 24, &[], precision);
        succeeds(&["train", "--config", config.to_str().unwrap(), "--no-supervisor"]);
    }
    let (a, b) = (losses(&f32_run), losses(&bf16_run));
    assert_eq!(a.len(), b.len());
    assert!(a.iter().zip(&b).all(|(x, y)| x.1 != y.1), "a bf16 loss equals the f32 one bit for bit");
    let (val_f32, val_bf16) = (final_val_loss(&f32_run), final_val_loss(&bf16_run));
    assert!((val_bf16 - val_f32).abs() < 0.02 * val_f32, "validation loss: bf16 {val_bf16}, f32 {val_f32}");
    let weights = candle_core::safetensors::load(checkpoint(&bf16_run, 24).join("model.safetensors"), &Device::Cpu);
    assert!(weights.unwrap().values().all(|t| t.dtype() == candle_core::DType::F32));

    let out = command()
        .args([
            "train",
            "--resume",
            bf16_run.to_str().unwrap(),
            "--precision",
            "f32",
            "--steps",
            "32",
            "--no-supervisor",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--precision F32 (the run has Bf16)"), "{err}");
}

/// A bf16 kernel forced by name that cannot run is refused before any work, with the
/// variable named, a HINT, and no backtrace even under RUST_BACKTRACE.
#[test]
fn a_forced_bf16_kernel_that_cannot_run_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("amx");
    let config = write_config_at(tmp.path(), &run_dir, "tiny-llama", 4, &[], "bf16");
    let out = command()
        .args(["train", "--config", config.to_str().unwrap(), "--no-supervisor"])
        .env("LMFORGE_BF16_KERNEL", "amx")
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("LMFORGE_BF16_KERNEL=amx") && err.contains("HINT:"), "{err}");
    assert!(!err.contains("backtrace") && !err.contains(" 0: "), "{err}");
    assert!(!run_dir.join("checkpoints").exists());
}

/// Real verses of nine short books as a small parallel TSV (`book`, `kjv`, `web`, `rv1909`):
/// Jude is held out for testing, Philemon for validation.
fn small_bible(dir: &Path) -> PathBuf {
    use std::io::Read;
    let books = ["Ruth", "Joel", "Obadiah", "Jonah", "Nahum", "Haggai", "Titus", "Philemon", "Jude"];
    let file = std::fs::File::open(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/parallel/bible.tsv.gz")).unwrap();
    let mut text = String::new();
    flate2::read::GzDecoder::new(file).read_to_string(&mut text).unwrap();
    let mut lines = text.lines();
    let mut out = format!("{}\n", lines.next().unwrap());
    for line in lines.filter(|l| books.contains(&l.split('\t').next().unwrap())) {
        out.push_str(line);
        out.push('\n');
    }
    let path = dir.join("small-bible.tsv");
    std::fs::write(&path, out).unwrap();
    path
}

/// A tiny encoder–decoder run (dropout on) translating `target` from KJV verses.
fn write_seq2seq_config(dir: &Path, run: &Path, target: &str, steps: u64) -> PathBuf {
    let text = format!(
        r#"
run_dir = "{run}"
[model]
arch = "tiny-transformer"
set = ["layers=2", "layout.encoder_layers=2", "d_model=64", "attention.heads=4", "attention.kv_heads=4", "ffn.hidden=128", "vocab_size=512"]
[data.parallel]
file = "{tsv}"
source = "kjv"
target = "{target}"
test_books = ["Jude"]
val_books = ["Philemon"]
batch_tokens = 768
[train]
steps = {steps}
lr = 0.003
warmup_steps = 8
eval_every = 8
eval_batches = 0
sample_every = 0
checkpoint_every = 8
keep_last = 10
log_every = 100
[guard]
warmup_steps = 5
"#,
        run = run.display(),
        tsv = small_bible(dir).display(),
    );
    let path = dir.join(format!("{}.toml", run.file_name().unwrap().to_str().unwrap()));
    std::fs::write(&path, text).unwrap();
    path
}

/// Every metrics line with a validation loss: (step, val_loss).
fn val_losses(run: &Path) -> Vec<(u64, f64)> {
    metrics(run).iter().filter_map(|v| Some((v["step"].as_u64()?, v.get("val_loss")?.as_f64()?))).collect()
}

/// Encoder–decoder training on real verses: the label-smoothed training loss and the
/// unsmoothed validation loss on a held-out book both fall well below where they start, and
/// the step lines count target tokens.
#[test]
fn seq2seq_training_lowers_the_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("kjv-web");
    let config = write_seq2seq_config(tmp.path(), &run_dir, "web", 40);
    let out = succeeds(&["train", "--config", config.to_str().unwrap(), "--no-supervisor"]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("label smoothing 0.1") && log.contains("tok/s counts target tokens"), "{log}");

    let train: Vec<f64> = losses(&run_dir).iter().map(|(_, l)| l.parse().unwrap()).collect();
    assert_eq!(train.len(), 40);
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    let (first, last) = (mean(&train[..5]), mean(&train[35..]));
    assert!(last < first - 1.5, "training loss {first:.3} → {last:.3}");
    let val = val_losses(&run_dir);
    assert_eq!(val.first().unwrap().0, 0, "the starting point is evaluated");
    let (v0, v1) = (val.first().unwrap().1, val.last().unwrap().1);
    assert!(v0 > (512f64).ln() - 1.0 && v1 < v0 - 1.5, "validation loss {v0:.3} → {v1:.3}");

    // Tokens per step are the batches' real target tokens, not a fixed window count.
    let tokens: Vec<u64> = metrics(&run_dir).iter().filter_map(|v| v["tokens"].as_u64()).collect();
    let steps: std::collections::BTreeSet<u64> = tokens.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(steps.len() > 1 && steps.iter().all(|&t| t > 0 && t <= 768), "{steps:?}");
}

/// `eval translate` on a trained run translates the held-out book, writes one hypothesis per
/// verse, and prints the BLEU and chrF that `lmforge::eval` gives for the written file.
#[test]
fn eval_translate_prints_the_scores_of_its_hypotheses_file() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("kjv-web");
    let config = write_seq2seq_config(tmp.path(), &run_dir, "web", 24);
    succeeds(&["train", "--config", config.to_str().unwrap(), "--no-supervisor"]);
    let hypotheses = tmp.path().join("jude.txt");
    let out = succeeds(&[
        "eval",
        "translate",
        "--model",
        run_dir.to_str().unwrap(),
        "--beams",
        "2",
        "--max-new-tokens",
        "40",
        "--out",
        hypotheses.to_str().unwrap(),
        "--json",
    ]);
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["books"], serde_json::json!(["Jude"]));

    let corpus =
        lmforge::data::parallel::ParallelCorpus::read(&tmp.path().join("small-bible.tsv"), "kjv", "web").unwrap();
    let set = lmforge::eval::TranslationSet::from_books(&corpus, &["Jude".to_string()]).unwrap();
    let written: Vec<String> = std::fs::read_to_string(&hypotheses).unwrap().lines().map(String::from).collect();
    assert_eq!(written.len(), 25);
    assert!(written.iter().filter(|h| !h.is_empty()).count() > 20, "{written:?}");
    let bleu = lmforge::eval::Bleu::corpus(&written, &set.references).unwrap();
    let chrf = lmforge::eval::Chrf::corpus(&written, &set.references).unwrap();
    // Equal up to serde_json's float parsing (exact round trips need its `float_roundtrip`).
    let same = |printed: &serde_json::Value, computed: f64| (printed.as_f64().unwrap() - computed).abs() < 1e-12;
    assert!(same(&printed["bleu"]["score"], bleu.score), "{} vs {}", printed["bleu"]["score"], bleu.score);
    assert!(same(&printed["chrf"]["score"], chrf.score), "{} vs {}", printed["chrf"]["score"], chrf.score);
    assert!(chrf.score > 0.0, "{chrf}: no character of the references was produced");
    assert_eq!(printed["pairs"], 25);
}

/// Dropout draws from the run's RNG and batches come from the pair sampler: both are in the
/// checkpoint, so a killed and resumed run is the uninterrupted one bit for bit.
#[test]
fn seq2seq_resume_after_sigkill_is_bit_identical() {
    resume_with_config_is_bit_identical(|dir, run| write_seq2seq_config(dir, run, "rv1909", 48));
}

/// `--init-from` an encoder–decoder run continues from its weights, tokenizer and special ids.
#[test]
fn seq2seq_init_from_a_run_continues_from_its_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let first = tmp.path().join("first");
    let config = write_seq2seq_config(tmp.path(), &first, "web", 24);
    succeeds(&["train", "--config", config.to_str().unwrap(), "--no-supervisor"]);
    let trained = *val_losses(&first).last().unwrap();

    let second = tmp.path().join("second");
    let config = write_seq2seq_config(tmp.path(), &second, "web", 8);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[model]\n", &format!("[model]\ninit_from = \"{}\"\n", first.display()));
    std::fs::write(&config, text).unwrap();
    succeeds(&["train", "--config", config.to_str().unwrap(), "--no-supervisor"]);
    let start = val_losses(&second)[0];
    assert_eq!(start, (0, trained.1), "step 0 of the new run is the first run's last model");
    assert_eq!(
        std::fs::read(first.join("tokenizer.json")).unwrap(),
        std::fs::read(second.join("tokenizer.json")).unwrap()
    );
}

#[test]
fn supervisor_restarts_a_crashed_worker_and_finishes_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let clean = tmp.path().join("clean");
    let crashed = tmp.path().join("crashed");
    succeeds(&[
        "train",
        "--config",
        write_config(tmp.path(), &clean, "tiny-llama", 24).to_str().unwrap(),
        "--no-supervisor",
    ]);
    let config = write_config(tmp.path(), &crashed, "tiny-llama", 24);
    succeeds(&["train", "--config", config.to_str().unwrap(), "--inject", "crash@step=13"]);
    assert_eq!(events(&crashed, "restart"), 1);
    assert_same_weights(&checkpoint(&clean, 24), &checkpoint(&crashed, 24));
}

#[test]
fn nan_and_spike_roll_back_and_the_run_converges_like_a_clean_one() {
    let tmp = tempfile::tempdir().unwrap();
    let clean = tmp.path().join("clean");
    let faulty = tmp.path().join("faulty");
    succeeds(&[
        "train",
        "--config",
        write_config(tmp.path(), &clean, "tiny-llama", 40).to_str().unwrap(),
        "--no-supervisor",
    ]);
    let config = write_config(tmp.path(), &faulty, "tiny-llama", 40);
    succeeds(&["train", "--config", config.to_str().unwrap(), "--inject", "nan@step=11", "--inject", "spike@step=30"]);
    assert_eq!(events(&faulty, "rollback"), 2, "one rollback for the NaN, one for the spike");
    let (a, b) = (final_val_loss(&clean), final_val_loss(&faulty));
    assert!((a - b).abs() < 0.1, "final validation loss {b} vs clean {a}");
    assert_eq!(losses(&faulty).last().unwrap().0, 40);

    let png = tmp.path().join("loss.png");
    succeeds(&["plot", faulty.to_str().unwrap(), "--out", png.to_str().unwrap()]);
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 900 * 500 * 3);
}

#[test]
fn bad_runs_fail_with_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let not_a_run = tmp.path().join("nothing");
    std::fs::create_dir_all(&not_a_run).unwrap();
    let err = fails(&["train", "--resume", not_a_run.to_str().unwrap()]);
    assert!(err.contains("not a run directory"), "{err}");

    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let run_dir = tmp.path().join("r");
    let err = fails(&[
        "train",
        "--run",
        run_dir.to_str().unwrap(),
        "--train-file",
        empty.to_str().unwrap(),
        "--no-supervisor",
    ]);
    assert!(err.contains("empty.txt"), "{err}");

    // A finished run cannot be restarted from scratch by accident, nor resumed with another model.
    let done = tmp.path().join("done");
    let config = write_config(tmp.path(), &done, "tiny-llama", 8);
    succeeds(&["train", "--config", config.to_str().unwrap(), "--no-supervisor"]);
    let err = fails(&["train", "--config", config.to_str().unwrap(), "--no-supervisor"]);
    assert!(err.contains("already has checkpoints"), "{err}");
    let err = fails(&["train", "--resume", done.to_str().unwrap(), "--set", "layers=3", "--no-supervisor"]);
    assert!(err.contains("differ from the run being resumed"), "{err}");
}

/// ALiBi has no position table: a model trained on 64-token windows scores 256 tokens.
#[test]
fn alibi_model_trained_at_64_evaluates_at_256() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("alibi");
    let config = write_config(tmp.path(), &run_dir, "tiny-mpt", 8);
    let text = std::fs::read_to_string(&config).unwrap().replace("seq_len = 32", "seq_len = 64");
    std::fs::write(&config, text).unwrap();
    succeeds(&["train", "--config", config.to_str().unwrap(), "--no-supervisor"]);

    let loaded = lmforge::io::load_model(&run_dir, &Device::Cpu).unwrap();
    assert_eq!(loaded.config.context_length, 64);
    let model = loaded.build().unwrap();
    let ids: Vec<u32> = (0..257u32).map(|i| (i * 31 + 7) % 512).collect();
    let input = candle_core::Tensor::new(&ids[..256], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let target = candle_core::Tensor::new(&ids[1..], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let loss: f32 = model.loss(&input, &target).unwrap().to_scalar().unwrap();
    assert!(loss.is_finite() && loss > 0.0, "loss at 256 tokens: {loss}");
}

/// Partial saves left by killed workers are removed when a run starts or resumes, even a run
/// that is complete and so never saves again.
#[test]
fn resuming_a_complete_run_removes_stale_partial_saves() {
    let tmp = tempfile::tempdir().unwrap();
    let done = tmp.path().join("done");
    let config = write_config(tmp.path(), &done, "tiny-llama", 8);
    succeeds(&["train", "--config", config.to_str().unwrap(), "--no-supervisor"]);
    // Above Linux's largest pid (2^22), so no such process can exist.
    let stale = [".step-000009.tmp-99999999", ".step-000008.deleting-99999999", ".step-000008.replaced-99999999"]
        .map(|name| done.join("checkpoints").join(name));
    for dir in &stale {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("model.safetensors"), b"half a checkpoint").unwrap();
    }
    let out = succeeds(&["train", "--resume", done.to_str().unwrap(), "--no-supervisor"]);
    for dir in &stale {
        assert!(!dir.exists(), "{} survived the resume", dir.display());
    }
    assert!(String::from_utf8_lossy(&out.stderr).contains("the unfinished save of a process that is gone"));
    assert!(checkpoint(&done, 8).join("manifest.json").exists(), "the finished checkpoint is kept");
    // The BPE trained for the run declares its end token, for generation and exports.
    let tokenizer_config = std::fs::read_to_string(done.join("tokenizer_config.json")).unwrap();
    let tokenizer_config: serde_json::Value = serde_json::from_str(&tokenizer_config).unwrap();
    assert_eq!(tokenizer_config["eos_token"], "<|endoftext|>");
    assert_eq!(losses(&done).len(), 8, "a complete run trains no further");
}
