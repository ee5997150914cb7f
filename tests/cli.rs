//! The command line as a user runs it: outputs on real fixtures, and clear errors with a
//! non-zero exit on bad input.

mod command;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use command::{command, fails, ok};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap()
}

#[test]
fn show_reports_published_parameter_counts() {
    let gpt2 = json(&ok(&["show", "gpt2", "--json"]));
    assert_eq!(gpt2["params_total"], 124_439_808u64);
    let mixtral = json(&ok(&["show", "mixtral-8x7b", "--json"]));
    assert_eq!(mixtral["params_total"], 46_702_792_704u64);
    assert_eq!(mixtral["params_active"], 12_879_925_248u64);
    let table = ok(&["show", "llama2-7b", "--set", "layers=2"]);
    assert!(table.contains("layers.1") && !table.contains("layers.2 "), "{table}");
    let mpt = json(&ok(&["show", "mpt-7b", "--set", "bias=true", "--json"]));
    assert!(mpt["params_total"].as_u64().unwrap() > 6_649_286_656, "biases add parameters");
    assert!(ok(&["presets"]).contains("46,702,792,704"));
}

/// `lmforge presets | head`: when the reader has gone, the process ends at its first write by
/// `SIGPIPE`, as Unix tools do, instead of panicking with "Broken pipe".
#[test]
#[cfg(unix)]
fn output_to_a_closed_pipe_ends_quietly() {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::process::ExitStatusExt;
    let mut ends = [0; 2];
    // SAFETY: pipe fills two valid descriptors on success; each is owned exactly once below.
    assert_eq!(unsafe { libc::pipe(ends.as_mut_ptr()) }, 0, "pipe");
    let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };
    drop(read_end); // the reader is gone before the first write
    let out = command().arg("presets").stdout(write_end).stderr(std::process::Stdio::piped()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}: {stderr}", out.status);
}

#[test]
fn show_reads_model_directories_and_config_files() {
    let phi = json(&ok(&["show", fixture("phi").to_str().unwrap(), "--json"]));
    assert_eq!(phi["config"]["residual"], "parallel");
    let dir = tempfile::tempdir().unwrap();
    let toml_path = dir.path().join("arch.toml");
    std::fs::write(
        &toml_path,
        r#"
vocab_size = 1000
d_model = 64
layers = 2
context_length = 128
norm = { kind = "rms_norm" }
norm_eps = 1e-5
positions = { kind = "alibi" }
attention = { heads = 4, kv_heads = 1 }
ffn = { kind = "gated", hidden = 128, act = "silu" }
bias = false
tie_embeddings = true
"#,
    )
    .unwrap();
    let report = json(&ok(&["show", toml_path.to_str().unwrap(), "--json"]));
    assert_eq!(report["config"]["attention"]["kv_heads"], 1);
}

#[test]
fn bad_configs_name_every_problem() {
    let err = fails(&["show", "gpt2", "--set", "attention.kv_heads=5", "--set", "attention.window=0"]);
    assert!(err.contains("attention.kv_heads = 5 does not divide attention.heads = 12"), "{err}");
    assert!(err.contains("attention.window = 0"), "{err}");
    let err = fails(&["show", "gpt2", "--set", "atention.heads=3"]);
    assert!(err.contains("atention"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.json");
    std::fs::write(&path, r#"{"vocab_size": 10, "unknown_key": 1}"#).unwrap();
    let err = fails(&["show", path.to_str().unwrap()]);
    assert!(err.contains("unknown field `unknown_key`") && err.contains("bad.json"), "{err}");
}

#[test]
fn score_writes_logits_and_generate_prints_ids() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("logits.safetensors");
    let model = fixture("llama_gqa");
    ok(&["score", "--model", model.to_str().unwrap(), "--ids", "3,17,91", "--out", out.to_str().unwrap()]);
    let logits = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    assert_eq!(logits["logits"].dims(), &[3, 128]);

    let expected = candle_core::safetensors::load(model.join("expected.safetensors"), &Device::Cpu).unwrap();
    let as_csv = |t: &Tensor| t.to_vec1::<i64>().unwrap().iter().map(i64::to_string).collect::<Vec<_>>().join(",");
    let prompt = as_csv(&expected["input_ids"]);
    let printed = ok(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--ids",
        &prompt,
        "--greedy",
        "--max-new-tokens",
        "24",
        "--print-ids",
    ]);
    assert_eq!(printed.trim(), as_csv(&expected["greedy"]));
}

#[test]
fn bad_model_inputs_fail_cleanly() {
    let model = fixture("gpt2");
    let m = model.to_str().unwrap();
    let err = fails(&["score", "--model", m, "--ids", "1,96", "--out", "/tmp/never.safetensors"]);
    assert!(err.contains("token id 96 is outside the vocabulary (0..96)"), "{err}");
    let err = fails(&["generate", "--model", m, "--ids", "1,2", "--prefill-chunk", "0"]);
    assert!(err.contains("--prefill-chunk 0"), "{err}");
    let long: Vec<String> = (0..70).map(|i| (i % 90).to_string()).collect();
    let err = fails(&["generate", "--model", m, "--ids", &long.join(","), "--greedy"]);
    assert!(err.contains("context_length = 64"), "{err}");
    let err = fails(&["generate", "--model", m, "--prompt", "hello"]);
    assert!(err.contains("no tokenizer"), "{err}");
    let err = fails(&["score", "--model", "/nonexistent/model", "--ids", "1", "--out", "/tmp/x.safetensors"]);
    assert!(err.contains("/nonexistent/model"), "{err}");
}

#[test]
fn damaged_checkpoints_name_the_file_and_tensor() {
    // Truncated safetensors.
    let dir = copy_fixture("llama_mqa");
    let weights = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let d = dir.path().to_str().unwrap();
    let err = fails(&["score", "--model", d, "--ids", "1", "--out", "/tmp/x.safetensors"]);
    assert!(err.contains("model.safetensors") && err.contains("truncated or corrupted"), "{err}");

    // A missing tensor, a mis-shaped one, an extra one, and a wrong dtype.
    let dir = copy_fixture("llama_mqa");
    let path = dir.path().join("model.safetensors");
    let mut tensors: HashMap<String, Tensor> = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    tensors.remove("model.layers.1.mlp.up_proj.weight");
    tensors.insert("model.norm.weight".into(), Tensor::zeros(7, candle_core::DType::F32, &Device::Cpu).unwrap());
    tensors.insert("model.extra.weight".into(), Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = fails(&["score", "--model", dir.path().to_str().unwrap(), "--ids", "1", "--out", "/tmp/x.safetensors"]);
    assert!(err.contains("missing tensor `model.layers.1.mlp.up_proj.weight`"), "{err}");
    assert!(err.contains("tensor `model.norm.weight` has shape [7], expected [32]"), "{err}");
    assert!(err.contains("unexpected tensor `model.extra.weight`"), "{err}");

    tensors = candle_core::safetensors::load(fixture("llama_mqa").join("model.safetensors"), &Device::Cpu).unwrap();
    tensors.insert("model.norm.weight".into(), Tensor::zeros(32, candle_core::DType::I64, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = fails(&["score", "--model", dir.path().to_str().unwrap(), "--ids", "1", "--out", "/tmp/x.safetensors"]);
    assert!(err.contains("`model.norm.weight` has dtype I64"), "{err}");

    // An unsupported model_type and a config field of the wrong type.
    let config = dir.path().join("config.json");
    let original = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, original.replace("\"model_type\": \"llama\"", "\"model_type\": \"bert\"")).unwrap();
    let err = fails(&["score", "--model", dir.path().to_str().unwrap(), "--ids", "1", "--out", "/tmp/x.safetensors"]);
    assert!(err.contains("model_type `bert` is not supported"), "{err}");
    std::fs::write(&config, original.replace("\"hidden_size\": 32", "\"hidden_size\": \"wide\"")).unwrap();
    let err = fails(&["score", "--model", dir.path().to_str().unwrap(), "--ids", "1", "--out", "/tmp/x.safetensors"]);
    assert!(err.contains("field `hidden_size`: expected a non-negative integer, found \"wide\""), "{err}");
}

#[test]
fn export_writes_a_loadable_hugging_face_directory() {
    let out = tempfile::tempdir().unwrap();
    let target = out.path().join("exported");
    ok(&["export", "--model", fixture("phi").to_str().unwrap(), "--to", "hf", "--out", target.to_str().unwrap()]);
    let config = json(&std::fs::read_to_string(target.join("config.json")).unwrap());
    assert_eq!(config["model_type"], "phi");
    let shown = json(&ok(&["show", target.to_str().unwrap(), "--json"]));
    let original = json(&ok(&["show", fixture("phi").to_str().unwrap(), "--json"]));
    assert_eq!(shown["params_total"], original["params_total"]);
}

#[test]
#[cfg(target_os = "linux")]
fn an_unusable_blas_library_is_a_clear_error() {
    // LC_ALL=C: the first message is the dynamic loader's, in the user's language.
    for (library, expected) in [("/nonexistent/libcblas.so", "No such file"), ("libm.so.6", "cblas_sgemm")] {
        let out = command().env("LMFORGE_BLAS", library).env("LC_ALL", "C").arg("presets").output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "LMFORGE_BLAS={library} should fail");
        assert!(out.stdout.is_empty(), "LMFORGE_BLAS={library}: the command ran anyway");
        assert!(
            stderr.contains("LMFORGE_BLAS") && stderr.contains(library) && stderr.contains(expected),
            "LMFORGE_BLAS={library}: {stderr}"
        );
    }
}
