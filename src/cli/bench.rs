//! `lmforge bench train`: time the training step of ../shared/bench's reference config
//! (nanoGPT-style GPT: 4 layers, 6 heads, d_model 384, seq 256, batch 8, vocab 256), to compare
//! with `torch_gpt_step.py 4 6 384 256 8 256` run on the same machine.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use clap::Args;
use lmforge::config::{apply_overrides, presets};
use lmforge::model::{init_weights, Model};
use lmforge::train::optim::{AdamW, AdamWConfig};

#[derive(Args)]
pub struct BenchTrainArgs {
    #[arg(long, default_value_t = 4)]
    layers: usize,
    #[arg(long, default_value_t = 6)]
    heads: usize,
    #[arg(long, default_value_t = 384)]
    d_model: usize,
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 256)]
    vocab: usize,
    /// Timed steps (after 5 warm-up steps).
    #[arg(long, default_value_t = 10)]
    steps: usize,
}

pub fn bench_train(a: BenchTrainArgs) -> anyhow::Result<()> {
    let settings: Vec<String> = [
        format!("layers={}", a.layers),
        format!("attention.heads={}", a.heads),
        format!("attention.kv_heads={}", a.heads),
        format!("d_model={}", a.d_model),
        format!("ffn.hidden={}", 4 * a.d_model),
        format!("context_length={}", a.seq_len),
        format!("vocab_size={}", a.vocab),
    ]
    .into();
    let config = apply_overrides(&presets::get("gpt2")?, &settings)?;
    let weights = init_weights(&config, 0, &Device::Cpu)?;
    let vars: HashMap<String, Var> =
        weights.iter().map(|(n, t)| Ok((n.clone(), Var::from_tensor(t)?))).collect::<anyhow::Result<_>>()?;
    let tensors: HashMap<String, Tensor> = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    let model = Model::new(&config, &tensors, Path::new("bench"))?;
    let mut optimizer = AdamW::for_model(AdamWConfig::default(), &config, &vars)?;
    let ids: Vec<u32> = (0..a.batch_size * a.seq_len).map(|i| (i * 7919 % a.vocab) as u32).collect();
    let targets: Vec<u32> = (0..a.batch_size * a.seq_len).map(|i| (i * 104_729 % a.vocab) as u32).collect();
    let inputs = Tensor::from_vec(ids, (a.batch_size, a.seq_len), &Device::Cpu)?;
    let targets = Tensor::from_vec(targets, (a.batch_size, a.seq_len), &Device::Cpu)?;
    let mut step = || -> anyhow::Result<f32> {
        let loss = model.loss(&inputs, &targets)?;
        let mut grads = loss.backward()?;
        optimizer.clip_grad_norm(&mut grads, 1.0)?;
        optimizer.step(&grads, 1e-3)?;
        Ok(loss.to_scalar::<f32>()?)
    };
    for _ in 0..5 {
        step()?;
    }
    let started = Instant::now();
    let mut loss = 0.0;
    for _ in 0..a.steps {
        loss = step()?;
    }
    let per_step = started.elapsed().as_secs_f64() / a.steps as f64;
    let tokens = (a.batch_size * a.seq_len) as f64;
    println!(
        "lmforge params={} threads={} step_ms={:.2} tok_per_s={:.0} loss={loss:.4}",
        config.params_total(),
        candle_core::utils::get_num_threads(),
        per_step * 1e3,
        tokens / per_step
    );
    Ok(())
}
