//! The small training run the integration tests start (2 layers of width 64 on the bundled
//! Austen text, batch 4 × 32, checkpoints every 8 steps) and the readers of its metrics, written
//! once for every test file that trains (each includes this module).

// Each test file is its own crate and uses only part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The bundled Austen text the test runs train on.
pub fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/austen/persuasion.txt")
}

/// A small run config for `arch`, with more `--set`s in `extra`, at `dir/<run name>.toml`.
pub fn write_config_with(dir: &Path, run: &Path, arch: &str, steps: u64, extra: &[&str]) -> PathBuf {
    let extra: String = extra.iter().map(|s| format!(", {s:?}")).collect();
    let text = format!(
        r#"
run_dir = "{run}"
[model]
arch = "{arch}"
set = ["layers=2", "d_model=64", "attention.heads=4", "attention.kv_heads=2", "context_length=64", "vocab_size=512"{extra}]
[data]
train_files = ["{corpus}"]
val_fraction = 0.1
[train]
steps = {steps}
batch_size = 4
seq_len = 32
warmup_steps = 4
lr = 0.003
eval_every = 8
eval_batches = 4
sample_every = 0
checkpoint_every = 8
keep_last = 10
log_every = 100
[guard]
warmup_steps = 5
"#,
        run = run.display(),
        corpus = corpus().display(),
    );
    let path = dir.join(format!("{}.toml", run.file_name().unwrap().to_str().unwrap()));
    std::fs::write(&path, text).unwrap();
    path
}

/// The JSON lines of a run's `metrics.jsonl`.
pub fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// (step, loss) of every training step, the loss as written (so equal strings = equal bits).
pub fn losses(run: &Path) -> Vec<(u64, String)> {
    metrics(run)
        .iter()
        .filter(|v| v.get("loss").is_some())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].to_string()))
        .collect()
}

/// How many `{"event": kind}` lines the run logged.
pub fn events(run: &Path, kind: &str) -> usize {
    metrics(run).iter().filter(|v| v["event"] == kind).count()
}
