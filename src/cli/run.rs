//! `lmforge score` and `lmforge generate`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use clap::Args;
use lmforge::generate::{generate as generate_ids, GenerateOptions, Sampler, Sampling};

use super::arch::load;

#[derive(Args)]
pub struct ScoreArgs {
    /// HF directory, .gguf file, or lmforge checkpoint/run directory.
    #[arg(long)]
    model: PathBuf,
    /// Comma-separated token ids, e.g. `3,17,91`.
    #[arg(long, value_delimiter = ',', required = true)]
    ids: Vec<u32>,
    /// Output safetensors file with one f32 tensor `logits` of shape [seq, vocab].
    #[arg(long)]
    out: PathBuf,
}

pub fn score(args: ScoreArgs) -> anyhow::Result<()> {
    let loaded = load(&args.model)?;
    let model = loaded.build()?;
    let ids = Tensor::new(args.ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let logits = model.forward(&ids, None)?.squeeze(0)?; // (T, V)
    let tensors = std::collections::HashMap::from([("logits".to_string(), logits.contiguous()?)]);
    lmforge::io::hf::write_safetensors(&tensors, &args.out)?;
    eprintln!("wrote logits [{}, {}] to {}", args.ids.len(), loaded.config.vocab_size, args.out.display());
    Ok(())
}

#[derive(Args)]
pub struct GenerateArgs {
    /// HF directory, .gguf file, or lmforge checkpoint/run directory.
    #[arg(long)]
    model: PathBuf,
    /// Prompt text (needs a tokenizer with the model).
    #[arg(long, conflicts_with = "ids", required_unless_present = "ids")]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    ids: Option<Vec<u32>>,
    /// Wrap the prompt in the model's chat template (as a user message).
    #[arg(long, requires = "prompt")]
    chat: bool,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Always take the most likely token.
    #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p"])]
    greedy: bool,
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Prompt tokens per prefill step (default: the sliding window, or 512).
    #[arg(long)]
    prefill_chunk: Option<usize>,
    /// Keep every position in the KV cache even for sliding-window layers (for comparison).
    #[arg(long)]
    full_cache: bool,
    /// Print only the new token ids, comma-separated, on one line.
    #[arg(long)]
    print_ids: bool,
}

pub fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let loaded = load(&args.model)?;
    let model = loaded.build()?;
    let tokenizer = loaded.tokenizer.as_ref();
    let prompt_ids: Vec<u32> = match (&args.ids, &args.prompt) {
        (Some(ids), _) => ids.clone(),
        (None, Some(text)) => {
            let Some(tokenizer) = tokenizer else {
                bail!("{} has no tokenizer; pass --ids instead of --prompt", args.model.display())
            };
            let text = if args.chat { tokenizer.apply_chat_template(text)? } else { text.clone() };
            tokenizer.encode(&text, !args.chat)?
        }
        (None, None) => unreachable!("clap requires --prompt or --ids"),
    };
    let sampling = if args.greedy {
        Sampling::Greedy
    } else {
        Sampling::Random { temperature: args.temperature, top_k: args.top_k, top_p: args.top_p, seed: args.seed }
    };
    let mut sampler = Sampler::new(sampling)?;
    let stop: Vec<u32> = tokenizer.map(|t| t.eos_ids().to_vec()).unwrap_or_default();

    let mut stdout = std::io::stdout().lock();
    let mut stream = tokenizer.filter(|_| !args.print_ids).map(|t| t.stream_decoder());
    let started = Instant::now();
    let mut token_times: Vec<f64> = Vec::with_capacity(args.max_new_tokens);
    let options = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        prefill_chunk: args.prefill_chunk,
        stop: stop.clone(),
        full_cache: args.full_cache,
    };
    let new_ids = generate_ids(&model, &prompt_ids, &options, &mut sampler, |id| {
        token_times.push(started.elapsed().as_secs_f64());
        if let Some(stream) = stream.as_mut() {
            if !stop.contains(&id) {
                let text = stream.push(id)?;
                write!(stdout, "{text}")
                    .and_then(|_| stdout.flush())
                    .map_err(|e| lmforge::Error::Input(e.to_string()))?;
            }
        }
        Ok(())
    })
    .context("generation failed")?;
    let elapsed = started.elapsed().as_secs_f64();
    if token_times.len() >= 1024 {
        // Decode speed at the start and the end of a long generation (flat with a rolling cache).
        let rate = |from: usize, to: usize| (to - from) as f64 / (token_times[to] - token_times[from]);
        let n = token_times.len();
        eprintln!(
            "[decode: first 512 tokens {:.1} tokens/s, last 512 tokens {:.1} tokens/s]",
            rate(1, 513),
            rate(n - 513, n - 1)
        );
    }
    if args.print_ids || tokenizer.is_none() {
        let line: Vec<String> = new_ids.iter().map(u32::to_string).collect();
        writeln!(stdout, "{}", line.join(","))?;
    } else {
        writeln!(stdout)?;
    }
    eprintln!(
        "[{} prompt tokens, {} new tokens in {:.2}s, {:.1} tokens/s]",
        prompt_ids.len(),
        new_ids.len(),
        elapsed,
        new_ids.len() as f64 / elapsed
    );
    Ok(())
}
