//! `lmforge score` and `lmforge generate`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::Tensor;
use clap::Args;
use lmforge::generate::{
    generate as generate_ids, generate_seq2seq, GenerateOptions, Sampler, Sampling, Search, Seq2SeqOptions,
};
use lmforge::model::Model;

use super::arch::{load_for_inference, DtypeArg};
use super::device::DeviceArg;

#[derive(Args)]
pub struct ScoreArgs {
    /// HF directory, .gguf file, or lmforge checkpoint/run directory.
    #[arg(long)]
    model: PathBuf,
    /// Comma-separated token ids, e.g. `3,17,91`; for an encoder-decoder model the decoder
    /// input, starting with its decoder_start_token_id.
    #[arg(long, value_delimiter = ',', required = true)]
    ids: Vec<u32>,
    /// Source token ids (comma-separated) for an encoder-decoder model.
    #[arg(long, value_delimiter = ',')]
    source_ids: Option<Vec<u32>>,
    /// Output safetensors file with one f32 tensor `logits` of shape [seq, vocab].
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    device: DeviceArg,
    #[command(flatten)]
    dtype: DtypeArg,
}

pub fn score(args: ScoreArgs) -> anyhow::Result<()> {
    let device = args.device.open()?;
    let loaded = load_for_inference(&args.model, &device, args.dtype)?;
    let model = loaded.build()?;
    let ids = Tensor::new(args.ids.as_slice(), &device)?.unsqueeze(0)?;
    let logits = match (&args.source_ids, model.decoder_start_token_id()) {
        (None, None) => model.forward(&ids, None)?,
        (Some(source), Some(_)) => {
            let encoded = model.encode(&Tensor::new(source.as_slice(), &device)?.unsqueeze(0)?, None)?;
            model.decoder_logits(&encoded, &ids)?
        }
        (Some(_), None) => bail!("--source-ids: {} is a decoder-only model, it has no source", args.model.display()),
        (None, Some(start)) => bail!(
            "{} is an encoder-decoder model: pass --source-ids, with --ids as the decoder input (starting with its decoder_start_token_id = {start})",
            args.model.display()
        ),
    }
    .squeeze(0)?; // (T, V)
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
    #[arg(long, conflicts_with = "ids", required_unless_present_any = ["ids", "source", "source_ids"])]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    ids: Option<Vec<u32>>,
    /// Source text to translate, for an encoder-decoder model (needs a tokenizer with the model;
    /// encoded as translation pairs are, closed by the model's end token).
    #[arg(long, conflicts_with_all = ["source_ids", "prompt", "ids", "chat"])]
    source: Option<String>,
    /// Source as comma-separated token ids, for an encoder-decoder model.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["prompt", "ids", "chat"])]
    source_ids: Option<Vec<u32>>,
    /// Beam search with N hypotheses per source (encoder-decoder models).
    #[arg(long, value_name = "N", conflicts_with_all = ["greedy", "temperature", "top_k", "top_p"])]
    beams: Option<usize>,
    /// α in `Σ log p / length^α`, how beam search ranks finished hypotheses (transformers'
    /// definition; above 0 favours longer ones).
    #[arg(long, value_name = "ALPHA", default_value_t = 1.0, requires = "beams")]
    length_penalty: f64,
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
    #[command(flatten)]
    device: DeviceArg,
    #[command(flatten)]
    dtype: DtypeArg,
}

pub fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let loaded = load_for_inference(&args.model, &args.device.open()?, args.dtype)?;
    let model = loaded.build()?;
    let tokenizer = loaded.tokenizer.as_ref();
    let given_source = args.source.is_some() || args.source_ids.is_some();
    if model.is_encoder_decoder() {
        if !given_source {
            bail!(
                "{} is an encoder-decoder model: it translates a source\nHINT: pass --source TEXT or --source-ids IDS instead of --prompt/--ids",
                args.model.display()
            );
        }
        return translate(&args, &model, tokenizer);
    }
    if given_source {
        bail!(
            "--source: {} is a decoder-only model, it has no source\nHINT: pass the text as --prompt (or --ids)",
            args.model.display()
        );
    }
    if args.beams.is_some() {
        bail!("--beams: beam search is implemented for encoder-decoder models; use --greedy or sampling");
    }
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
    let mut sampler = Sampler::new(sampling(&args))?;
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

fn sampling(args: &GenerateArgs) -> Sampling {
    if args.greedy {
        Sampling::Greedy
    } else {
        Sampling::Random { temperature: args.temperature, top_k: args.top_k, top_p: args.top_p, seed: args.seed }
    }
}

/// `generate` for an encoder-decoder model: the target of `--source` / `--source-ids`, from the
/// decoder start token, greedy, sampled or by beam search.
fn translate(args: &GenerateArgs, model: &Model, tokenizer: Option<&lmforge::io::TextTokenizer>) -> anyhow::Result<()> {
    let source: Vec<u32> = match (&args.source_ids, &args.source) {
        (Some(ids), _) => ids.clone(),
        (None, Some(text)) => {
            let Some(tokenizer) = tokenizer else {
                bail!("{} has no tokenizer; pass --source-ids instead of --source", args.model.display())
            };
            // As translation pairs are encoded, by lmforge's parallel data and by Marian's
            // tokenizer: the text's tokens, closed by the end token.
            let mut ids = tokenizer.encode(text, true)?;
            if let Some(eos) = model.eos_token_id().filter(|&eos| ids.last() != Some(&eos)) {
                ids.push(eos);
            }
            ids
        }
        (None, None) => unreachable!("checked by the caller"),
    };
    let mut sampler = Sampler::new(sampling(args))?;
    let search = match args.beams {
        Some(beams) => Search::Beam { beams, length_penalty: args.length_penalty },
        None if args.greedy => Search::Greedy,
        None => Search::Sample(&mut sampler),
    };
    let stop: Vec<u32> = tokenizer.map(|t| t.eos_ids().to_vec()).unwrap_or_default();
    let options = Seq2SeqOptions { max_new_tokens: args.max_new_tokens, stop: stop.clone() };
    let mut stdout = std::io::stdout().lock();
    let mut stream = tokenizer.filter(|_| !args.print_ids).map(|t| t.stream_decoder());
    let started = Instant::now();
    let hypothesis = generate_seq2seq(model, &source, &options, search, |id| {
        if let Some(stream) = stream.as_mut() {
            if !stop.contains(&id) && Some(id) != model.eos_token_id() {
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
    if args.print_ids || tokenizer.is_none() {
        let line: Vec<String> = hypothesis.ids.iter().map(u32::to_string).collect();
        writeln!(stdout, "{}", line.join(","))?;
    } else {
        writeln!(stdout)?;
    }
    eprintln!(
        "[{} source tokens, {} new tokens in {:.2}s, {:.1} tokens/s, log p {:.3}]",
        source.len(),
        hypothesis.ids.len(),
        elapsed,
        hypothesis.ids.len() as f64 / elapsed,
        hypothesis.log_prob
    );
    Ok(())
}
