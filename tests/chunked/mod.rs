//! Logits of a prompt fed through the KV cache in pieces, for the tests that compare a model's
//! weights in one storage against another (each test file that does includes this module).

use candle_core::{Device, Tensor};
use lmforge::model::Model;

/// `(T, V)` logits of `ids`, fed in pieces of `chunk` tokens through one cache: a piece's
/// length decides which product path runs (row kernels below `DEQUANTIZED_FROM_TOKENS`, the
/// GEMM from there on).
pub fn logits_in_chunks(model: &Model, ids: &[u32], chunk: usize) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache();
    let mut rows = Vec::new();
    for piece in ids.chunks(chunk) {
        let input = Tensor::new(piece, &Device::Cpu).unwrap().unsqueeze(0).unwrap(); // (1, t)
        rows.extend(model.forward(&input, Some(&mut cache)).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap());
    }
    rows
}
