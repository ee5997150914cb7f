//! The command line with an encoder–decoder model, as a user runs it: `score` and `generate`
//! from a source on the Marian fixture (against transformers' outputs), and clear errors for a
//! source given to a decoder-only model, a missing source, and a source longer than the
//! model's positions.

mod command;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use command::{fails, ok};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn expected(name: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("expected.safetensors"), &Device::Cpu).unwrap()
}

fn csv(t: &Tensor) -> String {
    let ids: Vec<i64> = t.to_dtype(DType::I64).unwrap().to_vec1().unwrap();
    ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
}

#[test]
fn score_writes_the_decoder_logits_of_a_source() {
    let want = expected("marian");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("logits.safetensors");
    let model = fixture("marian");
    let (source, input) = (csv(&want["source_ids"]), csv(&want["decoder_input_ids"]));
    ok(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--source-ids",
        &source,
        "--ids",
        &input,
        "--out",
        out.to_str().unwrap(),
    ]);
    let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let diff: f32 = (&got["logits"] - &want["logits"]).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
    assert!(diff <= 1e-4, "max |diff| {diff}");
}

#[test]
fn generate_translates_from_the_decoder_start_token() {
    let want = expected("marian");
    let model = fixture("marian");
    let source = csv(&want["source_ids"]);
    let greedy = csv(&want["greedy"]);
    let base = ["generate", "--model", model.to_str().unwrap(), "--source-ids", &source, "--max-new-tokens", "24"];
    let run = |extra: &[&str]| ok(&[&base[..], extra].concat()).trim().to_string();
    assert_eq!(run(&["--greedy"]), greedy);
    assert_eq!(run(&["--beams", "1"]), greedy, "one beam is greedy");
    let beam = run(&["--beams", "4", "--length-penalty", "0.6"]);
    assert!(!beam.is_empty() && beam.split(',').all(|id| id.parse::<u32>().is_ok()), "{beam}");
    let sampled = run(&["--temperature", "0.7", "--seed", "3"]);
    assert_eq!(sampled, run(&["--temperature", "0.7", "--seed", "3"]), "a seed reproduces a sample");
}

#[test]
fn source_errors_name_the_problem() {
    let marian = fixture("marian");
    let gpt2 = fixture("gpt2");
    let (marian, gpt2) = (marian.to_str().unwrap(), gpt2.to_str().unwrap());

    let err = fails(&["generate", "--model", gpt2, "--source-ids", "1,2,3"]);
    assert!(err.contains("decoder-only") && err.contains("--prompt"), "{err}");
    let err = fails(&["generate", "--model", gpt2, "--source", "In the beginning"]);
    assert!(err.contains("decoder-only"), "{err}");
    let err = fails(&["score", "--model", gpt2, "--source-ids", "1", "--ids", "1,2", "--out", "/dev/null"]);
    assert!(err.contains("decoder-only"), "{err}");
    let err = fails(&["generate", "--model", gpt2, "--ids", "1,2", "--beams", "2"]);
    assert!(err.contains("--beams"), "{err}");

    let err = fails(&["generate", "--model", marian, "--ids", "3,4"]);
    assert!(err.contains("encoder-decoder") && err.contains("--source"), "{err}");
    let err = fails(&["score", "--model", marian, "--ids", "95,3", "--out", "/dev/null"]);
    assert!(err.contains("--source-ids") && err.contains("95"), "{err}");
    let err = fails(&["generate", "--model", marian, "--source", "no tokenizer here"]);
    assert!(err.contains("no tokenizer") && err.contains("--source-ids"), "{err}");

    // The fixture's positions end at 40.
    let long: Vec<String> = (0..41).map(|i| (3 + i % 90).to_string()).collect();
    let long = long.join(",");
    let err = fails(&["generate", "--model", marian, "--source-ids", &long]);
    assert!(err.contains("41 tokens") && err.contains("context_length = 40"), "{err}");
    let err = fails(&["score", "--model", marian, "--source-ids", &long, "--ids", "95", "--out", "/dev/null"]);
    assert!(err.contains("41 tokens") && err.contains("context_length = 40"), "{err}");
    let err = fails(&["generate", "--model", marian, "--source-ids", "3,400"]);
    assert!(err.contains("400") && err.contains("vocabulary"), "{err}");
    let err = fails(&["generate", "--model", marian, "--source-ids", "3,4", "--beams", "0"]);
    assert!(err.contains("--beams 0"), "{err}");
}

/// The presets count what gets built, and a fresh `tiny-transformer` runs end to end and
/// exports as a Marian model.
#[test]
fn tiny_transformer_initialises_generates_and_exports() {
    let base: serde_json::Value = serde_json::from_str(&ok(&["show", "transformer-base", "--json"])).unwrap();
    assert_eq!(base["params_total"], 63_082_496u64);
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let model = model.to_str().unwrap();
    ok(&[
        "init",
        "tiny-transformer",
        "--set",
        "layout.eos_token_id=2",
        "--set",
        "layout.decoder_start_token_id=1",
        "--out",
        model,
    ]);
    let ids = ok(&["generate", "--model", model, "--source-ids", "5,6,7", "--greedy", "--max-new-tokens", "5"]);
    assert!(ids.trim().split(',').count() <= 5, "{ids}");
    let hf = dir.path().join("hf");
    ok(&["export", "--model", model, "--to", "hf", "--out", hf.to_str().unwrap()]);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "marian");
    assert_eq!(config["decoder_start_token_id"], 1);
    assert_eq!(config["eos_token_id"], 2);
    // The paper's layout of the sinusoids has no Marian equivalent: a clear refusal.
    let paper = dir.path().join("paper");
    ok(&["init", "tiny-transformer", "--set", "positions.layout=interleaved", "--out", paper.to_str().unwrap()]);
    let err = fails(&[
        "export",
        "--model",
        paper.to_str().unwrap(),
        "--to",
        "hf",
        "--out",
        dir.path().join("x").to_str().unwrap(),
    ]);
    assert!(err.contains("no Hugging Face family"), "{err}");
}

/// `--source TEXT` is encoded as translation pairs are: the tokenizer's tokens, closed by the
/// model's end token (a model whose output depends on its source, so the test can tell).
#[test]
fn source_text_is_closed_by_the_end_token() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, "In the beginning God created the heaven and the earth.\n".repeat(20)).unwrap();
    let tokenizer_path = dir.path().join("tokenizer.json");
    let special = ["--special", "<pad>", "--special", "<s>", "--special", "</s>"];
    let train = ["tokenizer", "train", "--input", text.to_str().unwrap(), "--vocab-size", "300"];
    ok(&[&train[..], &special, &["--out", tokenizer_path.to_str().unwrap()]].concat());
    let tokenizer = lmforge::io::TextTokenizer::from_file(&tokenizer_path).unwrap();

    let settings: Vec<String> =
        ["vocab_size=300", "d_model=32", "layers=2", "layout.encoder_layers=2", "ffn.hidden=64"]
            .iter()
            .chain(&["layout.decoder_start_token_id=1", "layout.eos_token_id=2", "tie_embeddings=false"])
            .map(|s| s.to_string())
            .collect();
    let config =
        lmforge::config::apply_overrides(&lmforge::config::presets::get("tiny-transformer").unwrap(), &settings)
            .unwrap();
    let weights: std::collections::HashMap<String, Tensor> = lmforge::model::init_weights(&config, 3, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(name, w)| {
            let w = if w.rank() == 2 && name != "tok_embeddings.weight" { (w * 8.0).unwrap() } else { w };
            (name, w)
        })
        .collect();
    let model_dir = dir.path().join("model");
    lmforge::io::native::save_native_dir(&config, &weights, Some(&tokenizer), &model_dir).unwrap();
    let model = model_dir.to_str().unwrap();

    let tokens = tokenizer.encode("God created", false).unwrap();
    let ids = |tail: &[u32]| tokens.iter().chain(tail).map(u32::to_string).collect::<Vec<_>>().join(",");
    let decode = ["--greedy", "--max-new-tokens", "6", "--print-ids"];
    let from_text = ok(&[&["generate", "--model", model, "--source", "God created"][..], &decode].concat());
    let closed = ok(&[&["generate", "--model", model, "--source-ids", &ids(&[2])][..], &decode].concat());
    let bare = ok(&[&["generate", "--model", model, "--source-ids", &ids(&[])][..], &decode].concat());
    assert_eq!(from_text, closed);
    assert_ne!(from_text, bare, "the end token changes the encoding, so the test can tell");
}
