//! SmolLM2-135M-Instruct with `--dtype bf16` (its Q4_1 file dequantized to f32, each matrix
//! rounded to bf16 as it is read), against the same weights in `f32`: the logits agree within a
//! stated tolerance, the greedy chat answer is unchanged (transformers' own), the matrices take
//! half the bytes, and the logits are bit-identical to rounding the loaded `f32` model.

mod chunked;
mod fetched;

use candle_core::Device;
use lmforge::generate::argmax;
use std::collections::HashMap;
use std::sync::Arc;

use lmforge::io::{held_in_bf16, load_model, load_model_with, LoadOptions, LoadedModel, WeightDtype};
use lmforge::nn::ops::quant::{QFormat, QMatrix, DEQUANTIZED_FROM_TOKENS};

use chunked::logits_in_chunks;
use fetched::{assert_answers_paris, smollm2};

#[test]
fn bf16_smollm2_matches_f32_and_answers_paris() {
    let Some(path) = smollm2() else { return };
    let dense = load_model(&path, &Device::Cpu).unwrap();
    let f32_bytes: usize = dense.weights.values().filter(|t| t.rank() == 2).map(|t| t.elem_count() * 4).sum();
    let options = LoadOptions { keep_quantized: false, dtype: WeightDtype::Bf16 };
    let halved = load_model_with(&path, &Device::Cpu, options).unwrap();
    // 30 layers × 7 matrices + the (tied) embedding, in bf16; the 61 norm vectors stay f32.
    assert_eq!(halved.quantized.len(), 211);
    assert_eq!(halved.weights.len(), 61);
    assert!(halved.quantized.values().all(|q| q.format() == QFormat::BF16));
    let held: usize = halved.quantized.values().map(|q| q.bytes()).sum();
    assert_eq!(2 * held, f32_bytes);

    let tokenizer = halved.tokenizer.as_ref().unwrap();
    let prompt = tokenizer.apply_chat_template("What is the capital of France?").unwrap();
    let ids = tokenizer.encode(&prompt, false).unwrap();
    assert!(ids.len() >= DEQUANTIZED_FROM_TOKENS, "the prompt exercises both paths");
    let (f32_model, bf16_model) = (dense.build().unwrap(), halved.build().unwrap());
    let want = logits_in_chunks(&f32_model, &ids, ids.len());
    // Tolerance: both operands of every product rounded to bf16 (2⁻⁹ of each value), through
    // 30 layers; the errors of the 576–1536 terms of each product mostly cancel. Measured: max
    // |Δlogit| of 1.4–1.5% of the logits' spread (≈ 0.45 of ≈ 30); allowed 2⁻⁵ (3.1%), and the same top token
    // at every position. Chunks shorter than DEQUANTIZED_FROM_TOKENS run the row kernel, the
    // whole prompt the GEMM at bf16 precision.
    for chunk in [DEQUANTIZED_FROM_TOKENS - 1, ids.len()] {
        let got = logits_in_chunks(&bf16_model, &ids, chunk);
        let mut worst = 0f32;
        for (t, (g, w)) in got.iter().zip(&want).enumerate() {
            let spread = w.iter().fold(f32::MIN, |m, &v| m.max(v)) - w.iter().fold(f32::MAX, |m, &v| m.min(v));
            worst = worst.max(g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / spread);
            assert_eq!(argmax(g), argmax(w), "chunks of {chunk}: top token at position {t}");
        }
        println!("chunks of {chunk}: max |Δlogit| / spread of the position's logits: {worst:.2e}");
        assert!(worst > 0.0 && worst < 2f32.powi(-5), "chunks of {chunk}: {worst}");
    }

    assert_answers_paris(&bf16_model, tokenizer, &ids);

    // The same matrices rounded after loading the whole f32 model (what `--dtype bf16` did
    // before it converted each as it is read): bit-identical logits, both product paths.
    let mut weights = dense.weights.clone();
    let mut quantized = HashMap::new();
    for spec in dense.config.param_specs().iter().filter(|s| held_in_bf16(s)) {
        let tensor = weights.remove(&spec.name).unwrap();
        quantized.insert(spec.name.clone(), Arc::new(QMatrix::quantize(&tensor, QFormat::BF16).unwrap()));
    }
    let after = LoadedModel { config: dense.config.clone(), weights, quantized, tokenizer: None, source: path.clone() };
    let after = after.build().unwrap();
    for chunk in [DEQUANTIZED_FROM_TOKENS - 1, ids.len()] {
        let (got, want) = (logits_in_chunks(&bf16_model, &ids, chunk), logits_in_chunks(&after, &ids, chunk));
        assert!(got.iter().flatten().zip(want.iter().flatten()).all(|(a, b)| a.to_bits() == b.to_bits()), "{chunk}");
    }
}
