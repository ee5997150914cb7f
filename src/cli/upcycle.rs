//! `lmforge upcycle`: a dense model becomes a mixture of experts (sparse upcycling).

use std::path::PathBuf;

use clap::Args;
use lmforge::model::upcycle::{upcycle as upcycle_weights, RouterInit, Upcycle};

use super::arch::load;

#[derive(Args)]
pub struct UpcycleArgs {
    /// The dense model: HF directory, .gguf file, or lmforge checkpoint/run directory.
    #[arg(long)]
    model: PathBuf,
    /// Experts per layer, each starting as a copy of the dense feed-forward block.
    #[arg(long)]
    experts: usize,
    /// Experts each token is routed to.
    #[arg(long)]
    top_k: usize,
    /// The new router's weights: `zeros` or `normal:SIGMA`.
    #[arg(long, default_value = "normal:0.02")]
    router_init: RouterInit,
    /// Standard deviation of normal noise added to each expert's copy (0: exact copies, whose
    /// mixture computes the dense model's logits).
    #[arg(long, default_value_t = 0.0)]
    expert_noise: f64,
    /// Seed of the router's initialisation and the experts' noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory (lmforge format, with the tokenizer and chat template): `lmforge train
    /// --init-from DIR` continues from it.
    #[arg(long)]
    out: PathBuf,
}

pub fn upcycle(args: UpcycleArgs) -> anyhow::Result<()> {
    let dense = load(&args.model)?;
    let how = Upcycle {
        experts: args.experts,
        top_k: args.top_k,
        router_init: args.router_init,
        expert_noise: args.expert_noise,
        seed: args.seed,
    };
    let (config, weights) = upcycle_weights(&dense.config, &dense.weights, &how)?;
    lmforge::io::native::save_native_dir(&config, &weights, dense.tokenizer.as_ref(), &args.out)?;
    eprintln!(
        "wrote {} to {}: {} experts, top-{}, {} parameters ({} active; the dense model has {})",
        config.name,
        args.out.display(),
        args.experts,
        args.top_k,
        config.params_total(),
        config.params_active(),
        dense.config.params_total()
    );
    Ok(())
}
