//! Cache consistency: decoding through a KV cache (full or rolling), in any prefill chunking,
//! gives the logits of one full forward over the whole sequence, including sequences much
//! longer than the sliding window.

use std::path::Path;

use candle_core::{Device, Tensor};
use lmforge::config::{apply_overrides, presets, ModelConfig};
use lmforge::model::{init_weights, Model};
use lmforge::nn::{KvCache, RollingCache};

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

/// The rolling buffer's worked example (`nn::kv_cache`), on the cache itself: a decoded token is
/// written first and sees the buffer itself, `window` slots with the position it evicted (just
/// outside its window) replaced by its own; a chunk that wraps the buffer sees the cached slots
/// and its own keys (its early queries still need what it evicts), then is stored.
#[test]
fn rolling_cache_hands_a_decoded_token_the_buffer_itself() {
    // Key/value `(1, 1, T, 2)` of positions `start..start + T`: each holds its position.
    let kv = |start: usize, len: usize| {
        let values: Vec<f32> = (start..start + len).flat_map(|p| [p as f32, -(p as f32)]).collect();
        Tensor::from_vec(values, (1, 1, len, 2), &Device::Cpu).unwrap()
    };
    let held = |t: &Tensor| -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().step_by(2).collect()
    };
    let mut cache = RollingCache::new(4);
    let prompt = kv(0, 6);
    let seen = cache.append(&prompt, &prompt, 0).unwrap();
    assert_eq!(seen.positions, [0, 1, 2, 3, 4, 5], "a chunk that wraps sees its own keys");
    let token = kv(6, 1);
    let seen = cache.append(&token, &token, 6).unwrap();
    assert_eq!(seen.positions, [4, 5, 6, 3], "slot 6 mod 4 = 2 now holds 6; 2 is gone");
    assert_eq!(held(&seen.k), [4.0, 5.0, 6.0, 3.0], "the keys are the buffer's, in slot order");
    assert_eq!(seen.v.dims(), [1, 1, 4, 2]);
    let chunk = kv(7, 3);
    let seen = cache.append(&chunk, &chunk, 7).unwrap();
    assert_eq!(seen.positions, [4, 5, 6, 3, 7, 8, 9], "position 7 still sees 4, which 8 evicts");
    assert_eq!(held(&seen.k), [4.0, 5.0, 6.0, 3.0, 7.0, 8.0, 9.0]);
    let token = kv(10, 1);
    assert_eq!(cache.append(&token, &token, 10).unwrap().positions, [8, 9, 10, 7]);
    assert_eq!(cache.len(), 4);

    let mut short = RollingCache::new(4);
    let first = kv(0, 2);
    assert_eq!(short.append(&first, &first, 0).unwrap().positions, [0, 1], "a chunk that evicts nothing");
    let second = kv(2, 2);
    assert_eq!(held(&short.append(&second, &second, 2).unwrap().k), [0.0, 1.0, 2.0, 3.0]);
}
