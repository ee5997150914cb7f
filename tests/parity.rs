//! Parity with Hugging Face `transformers` on tiny random checkpoints (made by
//! `scripts/make_fixtures.py`): logits within 1e-4 and identical greedy continuations, which run
//! through the KV cache.

mod command;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use lmforge::generate::{generate, GenerateOptions, Sampler, Sampling};
use lmforge::io::hf::export_hf_dir;
use lmforge::io::load_model;

use command::reference_python;

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
    check_checkpoint(name, &fixture(name), &expected(&fixture(name)));
}

/// The checkpoint in `dir` against transformers' logits and greedy continuation `want`, then
/// exported and reloaded.
fn check_checkpoint(name: &str, dir: &Path, want: &Expected) {
    let loaded = load_model(dir, &Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"));
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
    // The export is written in transformers 5's layout, whichever layout it was read from (that
    // transformers loads it with these logits is `scripts/check_exports.sh`'s job, run in CI).
    let exported: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap()).unwrap();
    for key in ["rope_theta", "partial_rotary_factor", "rope_scaling"] {
        assert!(exported.get(key).is_none(), "{name}: exported config has the 4.x key `{key}`");
    }
    if let lmforge::config::Positions::Rope { .. } = loaded.config.positions {
        assert!(exported["rope_parameters"]["rope_type"].is_string(), "{name}: {exported}");
    }
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
fn gpt2_untied_odd_heads_matches_transformers() {
    check_family("gpt2");
}

#[test]
fn llama_gqa_tied_with_biases_matches_transformers() {
    check_family("llama_gqa");
}

#[test]
fn llama_mqa_matches_transformers() {
    check_family("llama_mqa");
}

#[test]
fn llama3_rope_scaling_matches_transformers() {
    check_family("llama3");
}

#[test]
fn llama_linear_rope_scaling_in_the_4x_layout_matches_transformers() {
    check_family("llama_linear_v4");
}

#[test]
fn llama_yarn_rope_scaling_matches_transformers() {
    check_family("llama_yarn");
}

#[test]
fn mistral_sliding_window_and_yarn_match_transformers() {
    check_family("mistral");
}

#[test]
fn mixtral_top3_of_5_with_window_matches_transformers() {
    check_family("mixtral");
}

/// Mixtral 8x7B and Llama 2 7B come in shards: the Mixtral fixture as transformers'
/// `save_pretrained(max_shard_size=…)` cuts it (an index and several files, tensors split
/// where transformers splits them) reads to the same logits.
#[test]
fn mixtral_sharded_by_transformers_matches_transformers() {
    let test = "mixtral_sharded_by_transformers_matches_transformers";
    let Some(python) = reference_python(test) else { return };
    let sharded = tempfile::tempdir().unwrap();
    let reshard = "import sys, torch, transformers\n\
        model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)\n\
        model.save_pretrained(sys.argv[2], max_shard_size='64KB')";
    let out = std::process::Command::new(python)
        .args(["-c", reshard])
        .arg(fixture("mixtral"))
        .arg(sharded.path())
        .output()
        .expect("run the reference python");
    assert!(out.status.success(), "{test}: resharding failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let shards = std::fs::read_dir(sharded.path())
        .unwrap()
        .filter(|f| f.as_ref().unwrap().file_name().to_string_lossy().ends_with(".safetensors"))
        .count();
    assert!(shards >= 3 && sharded.path().join("model.safetensors.index.json").exists(), "{test}: {shards} shards");
    check_checkpoint(test, sharded.path(), &expected(&fixture("mixtral")));
}

#[test]
fn phi_partial_rotary_in_rope_parameters_matches_transformers() {
    check_family("phi");
}

#[test]
fn phi_in_the_4x_layout_matches_transformers() {
    check_family("phi_v4");
}

#[test]
fn mpt_ignores_expansion_ratio_like_transformers() {
    check_family("mpt");
}

#[test]
fn mpt_with_five_heads_matches_transformers() {
    check_family("mpt_heads5");
}
