//! Parity with Hugging Face `transformers` on tiny random checkpoints (made by
//! `scripts/make_fixtures.py`): logits within 1e-4 and identical greedy continuations, which run
//! through the KV cache.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use lmforge::generate::{generate, GenerateOptions, Sampler, Sampling};
use lmforge::io::hf::export_hf_dir;
use lmforge::io::load_model;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

struct Expected {
    input_ids: Vec<u32>,
    logits: Tensor,
    greedy: Vec<u32>,
}

fn expected(dir: &Path) -> Expected {
    let tensors = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    let ids = |name: &str| -> Vec<u32> {
        tensors[name]
            .to_dtype(candle_core::DType::I64)
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|v| v as u32)
            .collect()
    };
    Expected { input_ids: ids("input_ids"), logits: tensors["logits"].clone(), greedy: ids("greedy") }
}

fn check_family(name: &str) {
    let dir = fixture(name);
    let want = expected(&dir);
    let loaded = load_model(&dir, &Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"));
    let model = loaded.build().unwrap_or_else(|e| panic!("{name}: {e}"));

    let ids = Tensor::new(want.input_ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logits = model.forward(&ids, None).unwrap().squeeze(0).unwrap();
    let diff: f32 = (logits - &want.logits).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
    assert!(diff <= 1e-4, "{name}: max |logit difference| = {diff:e} > 1e-4");

    let mut sampler = Sampler::new(Sampling::Greedy).unwrap();
    let options =
        GenerateOptions { max_new_tokens: want.greedy.len(), prefill_chunk: None, stop: vec![], full_cache: false };
    let got = generate(&model, &want.input_ids, &options, &mut sampler, |_| Ok(())).unwrap();
    assert_eq!(got, want.greedy, "{name}: greedy continuation differs from transformers");
    eprintln!("{name}: max |logit diff| {diff:.2e}, {} greedy ids identical", got.len());

    // Export back to Hugging Face format and reload: same family, same logits, bit for bit.
    let out = tempfile::tempdir().unwrap();
    let family = export_hf_dir(&loaded.config, &loaded.weights, loaded.tokenizer.as_ref(), out.path()).unwrap();
    let source_type = std::fs::read_to_string(dir.join("config.json")).unwrap();
    assert!(source_type.contains(&format!("\"model_type\": \"{family}\"")), "{name}: exported as `{family}`");
    let reloaded = load_model(out.path(), &Device::Cpu).unwrap().build().unwrap();
    let again = reloaded.forward(&ids, None).unwrap().squeeze(0).unwrap();
    let diff: f32 = (again - model.forward(&ids, None).unwrap().squeeze(0).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert_eq!(diff, 0.0, "{name}: exported model gives different logits");
}

#[test]
fn gpt2_matches_transformers() {
    check_family("gpt2");
}

#[test]
fn llama_mha_matches_transformers() {
    check_family("llama_mha");
}

#[test]
fn llama_gqa_matches_transformers() {
    check_family("llama_gqa");
}

#[test]
fn llama_mqa_matches_transformers() {
    check_family("llama_mqa");
}

#[test]
fn mistral_sliding_window_matches_transformers() {
    check_family("mistral");
}

#[test]
fn mixtral_matches_transformers() {
    check_family("mixtral");
}

#[test]
fn phi_matches_transformers() {
    check_family("phi");
}

#[test]
fn mpt_matches_transformers() {
    check_family("mpt");
}

#[test]
fn mpt_with_six_heads_matches_transformers() {
    check_family("mpt_heads6");
}
