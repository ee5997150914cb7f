//! SmolLM2-135M-Instruct (Q4_1, its embedding Q8_0) run on its quantized blocks, against the
//! same file dequantized to f32: the logits agree within a stated tolerance, the greedy chat
//! answer is transformers' own, and the weights held are the file's bytes. (With
//! `LMFORGE_QUANT_ACTIVATIONS=8` the answer starts "L'Étoile, la …" instead, as llama.cpp's
//! `llama-simple` does on this file; see `nn::ops::quant::act`.)

mod chunked;
mod fetched;

use candle_core::Device;
use lmforge::io::{load_model, load_model_for_inference};
use lmforge::nn::ops::quant::DEQUANTIZED_FROM_TOKENS;

use chunked::logits_in_chunks;
use fetched::{assert_answers_paris, smollm2};

#[test]
fn quantized_smollm2_matches_its_dequantized_self_and_answers_paris() {
    let Some(path) = smollm2() else { return };
    let quantized = load_model_for_inference(&path, &Device::Cpu).unwrap();
    let dense = load_model(&path, &Device::Cpu).unwrap();

    // Every matrix stays in its blocks (the 61 norm vectors are the file's f32 tensors); the
    // bytes held are the file's tensor bytes.
    assert_eq!(quantized.quantized.len(), 211, "30 layers × 7 matrices + the embedding");
    assert_eq!(quantized.weights.len(), 61);
    let held: usize = quantized.quantized.values().map(|q| q.bytes()).sum();
    let file = std::fs::metadata(&path).unwrap().len() as usize;
    assert!(held <= file && held as f64 > 0.97 * file as f64, "{held} bytes held for a {file}-byte file");

    let tokenizer = quantized.tokenizer.as_ref().unwrap();
    let prompt = tokenizer.apply_chat_template("What is the capital of France?").unwrap();
    let ids = tokenizer.encode(&prompt, false).unwrap();
    let (q_model, d_model) = (quantized.build().unwrap(), dense.build().unwrap());
    // The prompt in chunks through the KV cache: chunks shorter than DEQUANTIZED_FROM_TOKENS
    // run on the integer kernels, a whole-prompt chunk on the dequantized matrices.
    assert!(ids.len() >= DEQUANTIZED_FROM_TOKENS, "the prompt exercises both paths");
    let (q, d) =
        (logits_in_chunks(&q_model, &ids, DEQUANTIZED_FROM_TOKENS - 1), logits_in_chunks(&d_model, &ids, ids.len()));
    // Tolerance: the activations are rounded (two 8-bit blocks per 32 values, about 16 bits)
    // before every product (the weights are exact), through 30 layers. Measured: max |Δ| of
    // 0.03% of the logits' spread (≈ 0.01 of ≈ 30); allowed 0.2%, and the same top token at
    // every position.
    let mut worst = 0f32;
    for (t, (qr, dr)) in q.iter().zip(&d).enumerate() {
        let spread = dr.iter().fold(f32::MIN, |m, &v| m.max(v)) - dr.iter().fold(f32::MAX, |m, &v| m.min(v));
        for (a, b) in qr.iter().zip(dr) {
            worst = worst.max((a - b).abs() / spread);
        }
        assert_eq!(lmforge::generate::argmax(qr), lmforge::generate::argmax(dr), "top token at position {t}");
    }
    println!("max |Δlogit| / spread of the position's logits: {worst}");
    assert!(worst < 0.002, "max |Δlogit| / spread = {worst}");
    // The whole prompt at once: the f32 product of the exact dequantized weights.
    let whole = logits_in_chunks(&q_model, &ids, ids.len());
    let prefill_worst = whole.iter().flatten().zip(d.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(prefill_worst < 1e-3, "max |Δlogit| of the dequantized prefill: {prefill_worst}");

    assert_answers_paris(&q_model, tokenizer, &ids);
}
