//! A training step's gradients do not depend on the attention implementation: the flash path
//! (q/k/v stacked into one product, RoPE and the head split inside one attention op) and the
//! naive path (three projections, composed RoPE and softmax over materialised scores) give the
//! same loss and the same gradient for every parameter, in every family's structure.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use lmforge::config::{apply_overrides, presets, ModelConfig};
use lmforge::model::{init_weights, Model};

/// The loss of one batch and the gradient of every parameter.
fn loss_and_grads(
    preset: &str,
    settings: &[&str],
    inputs: &Tensor,
    targets: &Tensor,
) -> (f32, HashMap<String, Tensor>) {
    let settings: Vec<String> = settings.iter().map(|s| s.to_string()).collect();
    let mut config: ModelConfig = apply_overrides(&presets::get(preset).unwrap(), &settings).unwrap();
    config.vocab_size = 97;
    let vars: HashMap<String, Var> = init_weights(&config, 7, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(name, t)| (name, Var::from_tensor(&t).unwrap()))
        .collect();
    let weights = vars.iter().map(|(name, v)| (name.clone(), v.as_tensor().clone())).collect();
    let model = Model::new(&config, &weights, Path::new("test")).unwrap();
    let loss = model.loss(inputs, targets).unwrap();
    let grads = loss.backward().unwrap();
    let grads = vars
        .iter()
        .map(|(name, v)| {
            (name.clone(), grads.get(v.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}")).clone())
        })
        .collect();
    (loss.to_scalar().unwrap(), grads)
}

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
        for (name, want) in &naive {
            let got = &flash[name];
            let diff: f32 = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            let scale: f32 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            // The absolute floor is for gradients that are zero in exact arithmetic (a key bias
            // shifts every score of a row alike, which softmax ignores): both sides are noise.
            assert!(
                diff <= 1e-4 * scale + 1e-7,
                "{preset} {settings:?}: {name} differs by {diff:e} (max |grad| {scale:e})"
            );
            assert_eq!(got.dtype(), DType::F32);
        }
    }
}
