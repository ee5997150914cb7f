//! Cache consistency: decoding through a KV cache (full or rolling), in any prefill chunking,
//! gives the logits of one full forward over the whole sequence, including sequences much
//! longer than the sliding window.

use std::path::Path;

use candle_core::{Device, Tensor};
use lmforge::config::{apply_overrides, presets, ModelConfig};
use lmforge::model::{init_weights, Model};

const WINDOW: usize = 6;

fn model(preset: &str, settings: &[&str]) -> Model {
    let settings: Vec<String> = settings.iter().map(|s| s.to_string()).collect();
    let mut config: ModelConfig = apply_overrides(&presets::get(preset).unwrap(), &settings).unwrap();
    config.vocab_size = 97;
    let weights = init_weights(&config, 7, &Device::Cpu).unwrap();
    // Larger weights than the training init, so attention patterns are far from uniform.
    let weights = weights.into_iter().map(|(k, v)| (k, if v.rank() == 2 { (v * 10.0).unwrap() } else { v })).collect();
    Model::new(&config, &weights, Path::new("test")).unwrap()
}

fn ids(n: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 37 + 11) % 97) as u32).collect()
}

fn full_logits(model: &Model, ids: &[u32]) -> Tensor {
    let input = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    model.forward(&input, None).unwrap().squeeze(0).unwrap() // (T, V)
}

/// Logits of every position when `ids` are fed through a cache in pieces of `chunk`.
fn cached_logits(model: &Model, ids: &[u32], chunk: usize) -> Tensor {
    let mut cache = model.new_cache();
    let pieces: Vec<Tensor> = ids
        .chunks(chunk)
        .map(|piece| {
            let input = Tensor::new(piece, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            model.forward(&input, Some(&mut cache)).unwrap().squeeze(0).unwrap()
        })
        .collect();
    assert_eq!(cache.position(), ids.len());
    Tensor::cat(&pieces, 0).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

fn assert_cache_matches(model: &Model, len: usize, chunks: &[usize]) {
    let sequence = ids(len);
    let reference = full_logits(model, &sequence);
    // f32 rounding differs between one long and many short reductions: compare relative to the
    // largest logit (the 10x-scaled test weights make logits reach the hundreds).
    let scale: f32 = reference.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
    for &chunk in chunks {
        let diff = max_diff(&cached_logits(model, &sequence, chunk), &reference);
        assert!(
            diff <= 2e-5 * scale.max(1.0),
            "chunk {chunk}: max |diff| {diff:e} against one full forward (max |logit| {scale})"
        );
    }
}

#[test]
fn rolling_cache_token_by_token_matches_full_forward_past_the_window() {
    let m = model("tiny-llama", &[&format!("attention.window={WINDOW}"), "layers=2"]);
    assert_cache_matches(&m, 40, &[1]);
}

#[test]
fn chunked_prefill_matches_one_shot_for_every_chunk_size() {
    let m = model("tiny-llama", &[&format!("attention.window={WINDOW}"), "layers=2"]);
    assert_cache_matches(&m, 40, &[1, 3, WINDOW, WINDOW + 1, 17, 64]);
}

#[test]
fn per_layer_windows_mix_rolling_and_full_caches() {
    let m = model("tiny-llama", &["layers=3", "attention.layer_windows=[4, null, 9]"]);
    assert_cache_matches(&m, 30, &[1, 5, 30]);
}

#[test]
fn full_cache_matches_full_forward() {
    for preset in ["tiny-llama", "tiny-gpt2", "tiny-mpt", "tiny-mixtral"] {
        let m = model(preset, &["layers=2"]);
        assert_cache_matches(&m, 33, &[1, 4, 33]);
    }
}

#[test]
fn alibi_with_window_uses_true_distances_in_the_rolling_buffer() {
    let m = model("tiny-mpt", &["layers=2", "attention.window=5"]);
    assert_cache_matches(&m, 25, &[1, 2, 7]);
}

#[test]
fn rolling_cache_holds_exactly_the_window() {
    let m = model("tiny-llama", &[&format!("attention.window={WINDOW}"), "layers=1"]);
    let mut cache = m.new_cache();
    let input = Tensor::new(ids(50).as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    m.forward(&input, Some(&mut cache)).unwrap();
    assert_eq!(cache.layer_len(0), WINDOW);
}

#[test]
fn naive_and_flash_attention_give_the_same_model() {
    for settings in [&["layers=2"][..], &["layers=2", "attention.window=5"], &["layers=2", "positions=alibi"]] {
        let flash = model("tiny-llama", settings);
        let naive = model("tiny-llama", &[settings, &["attention.implementation=naive"]].concat());
        let sequence = ids(40);
        let (a, b) = (full_logits(&flash, &sequence), full_logits(&naive, &sequence));
        let scale: f32 = a.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(max_diff(&a, &b) <= 1e-5 * scale, "{settings:?}");
    }
}
