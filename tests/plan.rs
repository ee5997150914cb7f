//! `lmforge plan` as a user runs it: the three approaches costed on real text, memory
//! predictions checked against the peak resident memory of the printed training commands, and
//! clear errors on bad input. (Time predictions are checked by hand, not here: timings on a
//! shared machine are not a test.)

mod command;
mod fetched;
mod small_run;

use std::io::Read;
use std::path::Path;
use std::process::Stdio;

use command::{command, fails, ok};
use fetched::smollm2;
use small_run::corpus;

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap()
}

fn plan(cache: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["plan", "--json", "--cache", cache.to_str().unwrap()];
    args.extend_from_slice(extra);
    json(&ok(&args))
}

/// `lmforge train …` as printed, split into words (single-quoted words kept whole).
fn words(command: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in command.chars() {
        match c {
            '\'' => quoted = !quoted,
            ' ' if !quoted => {
                if !word.is_empty() {
                    out.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        out.push(word);
    }
    out
}

/// Run `printed` (`lmforge …`) in `dir`; its exit status, stderr and peak resident memory in
/// bytes (the child's `ru_maxrss`, read when it is reaped).
#[cfg(target_os = "linux")]
#[allow(clippy::zombie_processes)] // reaped by wait4, which also reports its peak memory
fn run_measuring_peak(printed: &str, dir: &Path) -> (bool, String, u64) {
    let words = words(printed);
    assert_eq!(words[0], "lmforge");
    let mut child =
        command().args(&words[1..]).current_dir(dir).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        stderr.read_to_string(&mut text).unwrap();
        text
    });
    let mut status = 0;
    // SAFETY: plain FFI with valid pointers; the child is ours and not yet reaped.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32);
    let stderr = reader.join().unwrap();
    let success = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    (success, stderr, usage.ru_maxrss as u64 * 1024)
}

#[test]
fn plans_adopt_adapt_and_invent_on_the_bundled_corpus() {
    let cache = tempfile::tempdir().unwrap();
    let report = plan(cache.path(), &["--hours", "0.05", "--memory", "8", "--batch-size", "8", "--seq-len", "64"]);
    let rows = report["rows"].as_array().unwrap();
    let approaches: Vec<&str> = rows.iter().map(|r| r["approach"].as_str().unwrap()).collect();
    assert!(approaches.contains(&"adopt") && approaches.contains(&"invent"), "{approaches:?}");
    let budget_seconds = 0.05 * 3600.0;
    for row in rows {
        let label = row["label"].as_str().unwrap();
        let steps = row["steps"].as_u64().unwrap();
        assert!(steps > 0, "{label}");
        let per_step = row["batch_size"].as_u64().unwrap()
            * row["grad_accum"].as_u64().unwrap()
            * row["seq_len"].as_u64().unwrap();
        assert_eq!(row["tokens_seen"].as_u64().unwrap(), steps * per_step, "{label}");
        let total = row["time"]["total"].as_f64().unwrap();
        assert!(total <= budget_seconds && total > 0.5 * budget_seconds, "{label}: {total} s of {budget_seconds}");
        let memory = &row["memory"];
        assert_eq!(memory["source"], "measured");
        assert!(memory["peak"].as_u64().unwrap() <= report["memory_limit"].as_u64().unwrap());
        let parts: u64 = ["weights", "gradients", "adamw", "activations", "runtime"]
            .iter()
            .map(|k| memory[*k].as_u64().unwrap())
            .sum();
        assert_eq!(parts, memory["step_peak"].as_u64().unwrap(), "{label}");
        // 16 bytes per parameter of training state, as `show` counts it.
        assert_eq!(memory["weights"].as_u64().unwrap() * 4, 16 * row["params_total"].as_u64().unwrap(), "{label}");
        let guide = row["loss_guide"].as_f64().unwrap();
        assert!(guide.is_finite() && guide > 1.8, "{label}: {guide}");
        let command = row["commands"].as_array().unwrap().last().unwrap().as_str().unwrap();
        assert!(command.starts_with("lmforge train --run runs/plan-") && command.contains("--dataset"), "{command}");
        assert!(command.contains(&format!("--steps {steps} ")), "{command}");
    }
    // The mixture costs the dense model's compute per token and more memory.
    let dense = &rows[0];
    let moe = rows.iter().find(|r| r["approach"] == "invent").unwrap();
    assert!(moe["params_total"].as_u64() > moe["params_active"].as_u64());
    let command = moe["commands"][0].as_str().unwrap();
    assert!(command.contains("ffn={") && command.contains(r#""kind":"moe""#), "{command}");
    // The same tokenizer (bpe at the same vocabulary) counts the same tokens.
    assert_eq!(dense["tokens_available"], moe["tokens_available"]);
    let recommended = report["recommendation"]["row"].as_u64().unwrap() as usize;
    assert!(recommended < rows.len());

    // A second plan reuses the cached calibrations and datasets: the same numbers.
    let again = plan(cache.path(), &["--hours", "0.05", "--memory", "8", "--batch-size", "8", "--seq-len", "64"]);
    assert_eq!(again["rows"][0]["steps"], rows[0]["steps"]);
    assert_eq!(again["rows"][0]["memory"], rows[0]["memory"]);

    let cache_arg = cache.path().to_str().unwrap();
    let table =
        ok(&["plan", "--hours", "0.05", "--memory", "8", "--batch-size", "8", "--seq-len", "64", "--cache", cache_arg]);
    assert!(table.contains("adopt tiny-llama (from scratch)") && table.contains("recommended:"), "{table}");
    assert!(table.contains("loss guide"), "{table}");
}

/// The predicted peak memory of each tiny plan against the peak resident memory of its printed
/// command (run in-process with `--no-supervisor`, so the trainer's own process is measured).
#[cfg(target_os = "linux")]
#[test]
fn predicted_peak_memory_is_within_15_percent_of_the_run() {
    let cache = tempfile::tempdir().unwrap();
    let corpus = corpus();
    // A FLOP budget for a few dozen steps: the memory does not depend on how long the run is.
    let report = plan(
        cache.path(),
        &[
            "--corpus",
            corpus.to_str().unwrap(),
            "--flops",
            "1e11",
            "--candidates",
            "tiny-llama,tiny-mixtral",
            "--batch-size",
            "8",
            "--seq-len",
            "64",
        ],
    );
    let work = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for row in report["rows"].as_array().unwrap() {
        let label = row["label"].as_str().unwrap();
        let predicted = row["memory"]["peak"].as_u64().unwrap() as f64;
        let command = row["commands"].as_array().unwrap().last().unwrap().as_str().unwrap();
        let (success, stderr, peak) = run_measuring_peak(&format!("{command} --no-supervisor"), work.path());
        assert!(success, "{command}:\n{stderr}");
        let error = predicted / peak as f64 - 1.0;
        eprintln!(
            "{label}: predicted {:.1} MiB, measured {:.1} MiB ({:+.1}%)",
            predicted / 1048576.0,
            peak as f64 / 1048576.0,
            100.0 * error
        );
        // Known gap: the trainer holds a few MiB the rehearsal does not (its dataset, tokenizer
        // and metrics; 3-7 MiB measured), which is over 15% of the sub-million-parameter models
        // the adapt rows shrink to. Those get that allowance on top; the presets do not.
        let allowance = if predicted < 64.0 * 1048576.0 { 8.0 * 1048576.0 } else { 0.0 };
        assert!(
            (predicted - peak as f64).abs() <= 0.15 * peak as f64 + allowance,
            "{label}: predicted {predicted} bytes, the run peaked at {peak} ({:+.1}%)",
            100.0 * error
        );
        checked += 1;
    }
    assert!(checked >= 3, "adopt tiny-llama, adopt tiny-mixtral and at least one more plan");
}

#[test]
fn accelerators_are_data_and_unknown_devices_are_named() {
    let cache = tempfile::tempdir().unwrap();
    let corpus = corpus();
    let report = plan(cache.path(), &["--corpus", corpus.to_str().unwrap(), "--hours", "1", "--device", "h100"]);
    let row = &report["rows"][0];
    // One hour at 40% of 989 TFLOP/s: the whole budget goes into steps.
    let expected = 3600.0 * 989.4e12 * 0.40;
    let flops = row["train_flops"].as_f64().unwrap() + row["time"]["evaluation"].as_f64().unwrap() * 989.4e12 * 0.40;
    assert!((flops / expected - 1.0).abs() < 0.01, "{flops} vs {expected}");
    assert_eq!(row["memory"]["source"], "analytic");
    assert_eq!(report["memory_limit"].as_u64().unwrap(), 80_000_000_000);
    assert!(report["device"].as_str().unwrap().contains("H100"));

    let err = fails(&["plan", "--hours", "1", "--device", "tpu9", "--cache", cache.path().to_str().unwrap()]);
    assert!(err.contains("unknown device `tpu9`") && err.contains("this-cpu, a100, h100, h200"), "{err}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let cache = tempfile::tempdir().unwrap();
    let cache_arg = cache.path().to_str().unwrap();
    let corpus = corpus();
    let corpus = corpus.to_str().unwrap();

    let empty = cache.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let err = fails(&["plan", "--corpus", empty.to_str().unwrap(), "--hours", "1", "--cache", cache_arg]);
    assert!(err.contains("empty.txt") && err.contains("empty"), "{err}");

    let err = fails(&["plan", "--corpus", corpus, "--flops", "1000", "--cache", cache_arg]);
    assert!(
        err.contains("budget is too small") && err.contains("FLOPs for one step") && err.contains("HINT: --flops"),
        "{err}"
    );

    let err = fails(&["plan", "--corpus", corpus, "--hours", "0.00001", "--cache", cache_arg]);
    assert!(err.contains("budget is too small") && err.contains("HINT: --hours"), "{err}");

    let err = fails(&["plan", "--corpus", corpus, "--hours", "1", "--memory", "0.001", "--cache", cache_arg]);
    assert!(
        err.contains("no plan fits in 1 MiB")
            && err.contains("the smallest, adopt tiny-llama")
            && err.contains("HINT: raise --memory"),
        "{err}"
    );

    let err = fails(&["plan", "--corpus", corpus, "--hours", "1", "--candidates", "gpt5", "--cache", cache_arg]);
    assert!(err.contains("gpt5") && err.contains("known presets"), "{err}");
}

#[test]
fn show_caps_the_kv_cache_at_the_sliding_window() {
    let text = ok(&["show", "mistral-7b"]);
    let line = text.lines().find(|l| l.starts_with("KV cache")).unwrap();
    assert!(
        line.contains("full context 32768: f32 1.00 GiB")
            && line.contains("32 of 32 layers keep only their last 4096 positions"),
        "{line}"
    );
    let report = json(&ok(&["show", "mistral-7b", "--json"]));
    assert_eq!(report["kv_cache_bytes_full_context_f32"], 1u64 << 30);
    // Without a window every position is kept: 128 KiB per token x 32768.
    let full = json(&ok(&["show", "mistral-7b", "--set", "attention.window=null", "--json"]));
    assert_eq!(full["kv_cache_bytes_full_context_f32"], 8u64 << 30);
    assert!(!ok(&["show", "llama2-7b"]).contains("rolling buffer"));
}

/// With SmolLM2 (CI fetches it): a continuation and an upcycling plan, each counting the corpus
/// in SmolLM2's own tokenizer, with the upcycle command issue 14 defines.
#[test]
fn plans_continuing_and_upcycling_smollm2() {
    let Some(path) = smollm2() else { return };
    let cache = tempfile::tempdir().unwrap();
    let corpus = corpus();
    let candidates = format!("tiny-llama,{}", path.display());
    let report = plan(
        cache.path(),
        &["--corpus", corpus.to_str().unwrap(), "--hours", "2", "--device", "a100", "--candidates", &candidates],
    );
    let rows = report["rows"].as_array().unwrap();
    let find = |needle: &str| {
        rows.iter()
            .find(|r| r["label"].as_str().unwrap().contains(needle))
            .unwrap_or_else(|| panic!("no `{needle}` row in {rows:?}"))
    };
    let adopt = find("+ continue");
    assert_eq!(adopt["start"]["kind"], "continue");
    assert_eq!(adopt["params_total"], 134_515_008u64);
    let train = adopt["commands"][0].as_str().unwrap();
    assert!(train.contains(&format!("--init-from {}", path.display())) && train.contains("--lr"), "{train}");
    let upcycle = find("upcycle");
    let commands: Vec<&str> = upcycle["commands"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert!(
        commands[0].starts_with(&format!("lmforge upcycle --model {} --experts 4 --top-k 2 --out ", path.display())),
        "{commands:?}"
    );
    assert!(commands[1].contains("--init-from") && commands[1].contains("-upcycled"), "{commands:?}");
    // Every expert a full copy of the 1536-wide FFN: 3 more copies in each of 30 layers, a
    // 4 x 576 router per layer, and twice the FFN compute per token.
    let ffn = 3 * 576 * 1536;
    assert_eq!(upcycle["params_total"].as_u64().unwrap(), 134_515_008 + 30 * (3 * ffn + 4 * 576));
    assert_eq!(upcycle["params_active"].as_u64().unwrap(), 134_515_008 + 30 * (ffn + 4 * 576));
    // SmolLM2's 49k-token vocabulary cuts the text into fewer tokens than a 2k BPE.
    let scratch = find("adopt tiny-llama");
    assert!(adopt["tokens_available"].as_u64() < scratch["tokens_available"].as_u64());
}
