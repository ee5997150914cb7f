//! A training step's gradients do not depend on the attention implementation: the flash path
//! (q/k/v stacked into one product, RoPE and the head split inside one attention op) and the
//! naive path (three projections, composed RoPE and softmax over materialised scores) give the
//! same loss and the same gradient for every parameter, in every family's structure.

mod common;

use candle_core::{Device, Tensor};
use common::{assert_same_grads, loss_and_grads};

#[test]
fn flash_and_naive_attention_give_the_same_gradients() {
    // 2 × 160 tokens: at least as many rows as the models are wide, so the flash path stacks
    // q, k and v (and gate and up) into one product.
    let ids: Vec<u32> = (0..2 * 161).map(|i| ((i * 37 + 11) % 97) as u32).collect();
    let ids = Tensor::from_vec(ids, (2, 161), &Device::Cpu).unwrap();
    let (inputs, targets) = (ids.narrow(1, 0, 160).unwrap(), ids.narrow(1, 1, 160).unwrap());
    for (preset, settings) in [
        ("tiny-llama", &["layers=2"][..]),
        ("tiny-gpt2", &["layers=2"]),
        ("tiny-mpt", &["layers=2"]),
        ("tiny-mistral", &["layers=2", "attention.window=40"]),
        ("tiny-llama", &["layers=2", "positions=alibi", "bias=true"]),
    ] {
        let (flash_loss, flash) = loss_and_grads(preset, settings, &inputs, &targets);
        let naive_settings = [settings, &["attention.implementation=naive"]].concat();
        let (naive_loss, naive) = loss_and_grads(preset, &naive_settings, &inputs, &targets);
        assert!((flash_loss - naive_loss).abs() <= 1e-5 * naive_loss.abs(), "{preset} {settings:?}: loss");
        assert_same_grads(&flash, &naive, &format!("{preset} {settings:?}"));
    }
}
