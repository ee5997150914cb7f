//! Helpers shared by the integration tests (each test file includes this module).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor, Var};
use lmforge::config::{apply_overrides, presets, ModelConfig};
use lmforge::model::{init_weights, Model};

/// The loss of one batch and the gradient of every parameter.
pub fn loss_and_grads(
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

/// Every gradient in `got` equals the one in `want` to 1e-4 of its largest magnitude, and is
/// f32. The absolute floor is for gradients that are zero in exact arithmetic (a key bias
/// shifts every score of a row alike, which softmax ignores): both sides are then noise.
pub fn assert_same_grads(got: &HashMap<String, Tensor>, want: &HashMap<String, Tensor>, context: &str) {
    for (name, want) in want {
        let got = &got[name];
        let diff: f32 = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        let scale: f32 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(diff <= 1e-4 * scale + 1e-7, "{context}: {name} differs by {diff:e} (max |grad| {scale:e})");
        assert_eq!(got.dtype(), candle_core::DType::F32, "{context}: {name}");
    }
}
