//! `lmforge bench moe`: a mixture-of-experts training step against a dense step with the same
//! active parameters (or any two given models, e.g. a checkpoint and its upcycled mixture), in
//! one process, the two taking turns round by round.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use clap::Args;
use lmforge::config::{apply_overrides, presets, ModelConfig};
use lmforge::model::{init_weights, Model};
use lmforge::train::optim::{AdamW, AdamWConfig};
use lmforge::train::TrainRng;

use super::arch::load;
use lmforge::train::bench::median;

use super::bench::BenchModel;

#[derive(Args)]
pub struct BenchMoeArgs {
    #[arg(long, default_value_t = 8)]
    experts: usize,
    #[arg(long, default_value_t = 2)]
    top_k: usize,
    #[command(flatten)]
    model: BenchModel,
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Gated (SwiGLU) experts and dense block, as Mixtral; default: GELU MLPs, as `bench train`.
    #[arg(long)]
    gated: bool,
    /// Timed steps of each model per round.
    #[arg(long, default_value_t = 2)]
    steps: usize,
    /// Untimed steps of each model before the first round.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Rounds; each times both models (in alternating order), and the medians are compared.
    #[arg(long, default_value_t = 9)]
    rounds: usize,
    /// Time these two models instead (HF directory, .gguf, lmforge checkpoint or run), e.g. a
    /// dense checkpoint and its `lmforge upcycle`d mixture; the shape flags are then unused.
    #[arg(long, requires = "mixture")]
    dense: Option<PathBuf>,
    #[arg(long, requires = "dense")]
    mixture: Option<PathBuf>,
}

/// One model with its optimizer, stepping on a fixed batch.
struct Stepper {
    config: ModelConfig,
    model: Model,
    optimizer: AdamW,
    rng: TrainRng,
}

impl Stepper {
    fn new(config: ModelConfig, weights: HashMap<String, Tensor>) -> anyhow::Result<Self> {
        let vars: HashMap<String, Var> =
            weights.iter().map(|(n, t)| Ok((n.clone(), Var::from_tensor(t)?))).collect::<anyhow::Result<_>>()?;
        let tensors: HashMap<String, Tensor> = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        let model = Model::new(&config, &tensors, Path::new("bench"))?;
        let optimizer = AdamW::for_model(AdamWConfig::default(), &config, &vars)?;
        Ok(Stepper { config, model, optimizer, rng: TrainRng::seed_from(0) })
    }

    /// A training step as the trainer takes it: objective (LM + router losses), backward,
    /// clipping, AdamW.
    fn step(&mut self, inputs: &Tensor, targets: &Tensor) -> anyhow::Result<f32> {
        let loss = self.model.training_loss(inputs, targets, &mut self.rng)?;
        let mut grads = loss.objective()?.backward()?;
        self.optimizer.clip_grad_norm(&mut grads, 1.0)?;
        self.optimizer.step(&grads, 1e-3)?;
        Ok(loss.lm.to_scalar::<f32>()?)
    }

    /// Mean milliseconds per step over `steps` steps.
    fn time(&mut self, steps: usize, inputs: &Tensor, targets: &Tensor) -> anyhow::Result<f64> {
        let started = Instant::now();
        for _ in 0..steps {
            self.step(inputs, targets)?;
        }
        Ok(started.elapsed().as_secs_f64() * 1e3 / steps as f64)
    }
}

pub fn bench_moe(a: BenchMoeArgs) -> anyhow::Result<()> {
    let expert_hidden = 4 * a.model.d_model / a.top_k;
    let kind = if a.gated { "gated" } else { "mlp" };
    let act = if a.gated { "silu" } else { "gelu_tanh" };
    let base = a.model.shape_settings(a.seq_len);
    let with = |ffn: String| -> anyhow::Result<ModelConfig> {
        let settings: Vec<String> = base.iter().cloned().chain([ffn]).collect();
        Ok(apply_overrides(&presets::get("gpt2")?, &settings)?)
    };
    let dense_ffn = format!(r#"ffn={{"kind":"{kind}","hidden":{},"act":"{act}"}}"#, a.top_k * expert_hidden);
    let moe_ffn = format!(
        r#"ffn={{"kind":"moe","experts":{},"top_k":{},"expert":{{"kind":"{kind}","hidden":{expert_hidden},"act":"{act}"}}}}"#,
        a.experts, a.top_k
    );
    let (mut dense, mut moe) = match (&a.dense, &a.mixture) {
        (Some(dense), Some(mixture)) => {
            let (dense, mixture) = (load(dense)?, load(mixture)?);
            (Stepper::new(dense.config, dense.weights)?, Stepper::new(mixture.config, mixture.weights)?)
        }
        _ => {
            let fresh = |config: ModelConfig| -> anyhow::Result<Stepper> {
                let weights = init_weights(&config, 0, &Device::Cpu)?;
                Stepper::new(config, weights)
            };
            (fresh(with(dense_ffn)?)?, fresh(with(moe_ffn)?)?)
        }
    };
    for (label, stepper) in [("dense", &dense), ("mixture", &moe)] {
        let c = &stepper.config;
        let ffn = serde_json::to_string(&c.ffn)?;
        println!(
            "{label}: {}, {} parameters, {} active per token, ffn {ffn}",
            c.name,
            c.params_total(),
            c.params_active()
        );
    }
    let vocab = dense.config.vocab_size.min(moe.config.vocab_size);
    println!(
        "threads={}, gemm: {}, batch {} × seq {}",
        lmforge::nn::ops::parallel::threads(),
        lmforge::nn::ops::gemm::backend(),
        a.batch_size,
        a.seq_len
    );
    let n = a.batch_size * a.seq_len;
    let ids: Vec<u32> = (0..n).map(|i| (i * 7919 % vocab) as u32).collect();
    let targets: Vec<u32> = (0..n).map(|i| (i * 104_729 % vocab) as u32).collect();
    let inputs = Tensor::from_vec(ids, (a.batch_size, a.seq_len), &Device::Cpu)?;
    let targets = Tensor::from_vec(targets, (a.batch_size, a.seq_len), &Device::Cpu)?;
    for _ in 0..a.warmup {
        dense.step(&inputs, &targets)?;
        moe.step(&inputs, &targets)?;
    }
    let (mut dense_ms, mut moe_ms, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..a.rounds.max(1) {
        // Alternate which goes first, so a trend in the machine's speed favours neither.
        let (d, m) = if round % 2 == 0 {
            let d = dense.time(a.steps, &inputs, &targets)?;
            (d, moe.time(a.steps, &inputs, &targets)?)
        } else {
            let m = moe.time(a.steps, &inputs, &targets)?;
            (dense.time(a.steps, &inputs, &targets)?, m)
        };
        println!("round {round}: dense {d:.1} ms/step, mixture {m:.1} ms/step, ratio {:.3}", m / d);
        dense_ms.push(d);
        moe_ms.push(m);
        ratios.push(m / d);
    }
    let spread = |v: &[f64]| {
        let (lo, hi) = v.iter().fold((f64::INFINITY, 0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        (lo, hi, 100.0 * (hi - lo) / lo)
    };
    let (lo, hi, _) = spread(&ratios);
    let (dense_spread, moe_spread) = (spread(&dense_ms).2, spread(&moe_ms).2);
    let (d, m, ratio) = (median(&mut dense_ms), median(&mut moe_ms), median(&mut ratios));
    println!(
        "median over {} rounds: dense {d:.1} ms/step ({:.0} tok/s), mixture {m:.1} ms/step ({:.0} tok/s)",
        a.rounds.max(1),
        n as f64 / d * 1e3,
        n as f64 / m * 1e3,
    );
    println!(
        "the mixture's step takes {ratio:.3}x the dense step's time (median of the per-round ratios, which ranged {lo:.3}–{hi:.3}; {:.3}x between the medians); step times ranged {dense_spread:.0}% (dense) and {moe_spread:.0}% (mixture) across rounds",
        m / d
    );
    Ok(())
}
