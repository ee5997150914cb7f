//! The real pretrained model end to end: SmolLM2-135M-Instruct from its GGUF (fetched by
//! `scripts/fetch_smollm2.sh`), against `transformers`' reference in
//! `tests/fixtures/smollm2_reference.json`. Skipped with a notice when the file is absent,
//! unless `LMFORGE_REQUIRE_SMOLLM2` is set (as in CI).

mod fetched;

use std::path::Path;
use std::process::Command;

use candle_core::{Device, Tensor};
use lmforge::generate::{generate, GenerateOptions, Sampler, Sampling};
use lmforge::io::load_model;

use fetched::smollm2;

fn reference() -> serde_json::Value {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_reference.json"))
            .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(value: &serde_json::Value) -> Vec<u32> {
    value.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

#[test]
fn smollm2_matches_transformers_and_answers_paris() {
    let Some(path) = smollm2() else { return };
    let want = reference();
    let loaded = load_model(&path, &Device::Cpu).unwrap();
    let tokenizer = loaded.tokenizer.as_ref().expect("the GGUF carries its tokenizer");
    let prompt = tokenizer.apply_chat_template("What is the capital of France?").unwrap();
    assert_eq!(prompt, want["prompt"].as_str().unwrap());
    let prompt_ids = tokenizer.encode(&prompt, false).unwrap();
    assert_eq!(prompt_ids, ids(&want["prompt_ids"]));

    let model = loaded.build().unwrap();
    let input = Tensor::new(prompt_ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logits = model.forward(&input, None).unwrap().squeeze(0).unwrap();
    let last: Vec<f32> = logits.get(prompt_ids.len() - 1).unwrap().to_vec1().unwrap();
    for pair in want["last_logits_top"].as_array().unwrap() {
        let (id, value) = (pair[0].as_u64().unwrap() as usize, pair[1].as_f64().unwrap() as f32);
        assert!((last[id] - value).abs() < 1e-3, "logit of {id}: {} vs transformers {value}", last[id]);
    }

    let options = GenerateOptions {
        max_new_tokens: 20,
        prefill_chunk: None,
        stop: tokenizer.eos_ids().to_vec(),
        full_cache: false,
    };
    let new =
        generate(&model, &prompt_ids, &options, &mut Sampler::new(Sampling::Greedy).unwrap(), |_| Ok(())).unwrap();
    assert_eq!(new, ids(&want["greedy_ids"]));
    assert!(tokenizer.decode(&new).unwrap().starts_with("The capital of France is Paris."));
}

#[test]
fn cli_answers_paris() {
    let Some(path) = smollm2() else { return };
    let out = Command::new(env!("CARGO_BIN_EXE_lmforge"))
        .args([
            "generate",
            "--model",
            path.to_str().unwrap(),
            "--chat",
            "--prompt",
            "What is the capital of France?",
            "--greedy",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "The capital of France is Paris.");
}
