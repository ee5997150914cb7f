//! `bench generate`: decode and prefill speed of a model against llama.cpp's `llama-bench` on
//! the same file, in the same run, with the same thread count.
//!
//! The two tests are llama-bench's: `pp512` feeds 512 prompt tokens in one forward pass into an
//! empty cache (logits of the last position only), `tg128` generates 128 tokens one at a time
//! from an empty cache (greedy here; llama-bench's own tg samples nothing either). Each is
//! repeated `--repetitions` times after one untimed warm-up, and the mean is reported, as
//! llama-bench reports `avg_ts`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use candle_core::{Device, Tensor};
use clap::Args;
use lmforge::generate::argmax;
use lmforge::io;
use lmforge::model::Model;
use lmforge::nn::ops::{parallel, quant};
use lmforge::train::bench::rss_bytes;

use super::arch::DtypeArg;

#[derive(Args)]
pub struct BenchGenerateArgs {
    /// The model (a .gguf file to compare with llama.cpp).
    #[arg(long)]
    model: PathBuf,
    /// A directory holding llama.cpp's `llama-bench` (e.g. ~/.cache/llamacpp/build/bin): also
    /// run it on the same file and report the ratios.
    #[arg(long)]
    llamacpp: Option<PathBuf>,
    /// Prompt tokens of the prefill test.
    #[arg(long, default_value_t = 512)]
    prompt: usize,
    /// Generated tokens of the decode test.
    #[arg(long, default_value_t = 128)]
    generate: usize,
    /// Timed repetitions of each test (each tool).
    #[arg(long, default_value_t = 3)]
    repetitions: usize,
    /// Load the weights dequantized to f32 (what training sees) instead of keeping a GGUF file's
    /// quantized blocks.
    #[arg(long)]
    dequantize: bool,
    #[command(flatten)]
    dtype: DtypeArg,
}

/// Tokens per second of the two tests.
#[derive(Debug)]
struct Speeds {
    prefill: f64,
    decode: f64,
}

pub fn bench_generate(a: BenchGenerateArgs) -> anyhow::Result<()> {
    let threads = parallel::threads();
    let started = Instant::now();
    let options = io::LoadOptions { keep_quantized: !a.dequantize, dtype: a.dtype.dtype };
    let loaded = io::load_model_with(&a.model, &Device::Cpu, options)
        .with_context(|| format!("loading model {}", a.model.display()))?;
    let model = loaded.build()?;
    let load_s = started.elapsed().as_secs_f64();
    let quantized_bytes: usize = loaded.quantized.values().map(|q| q.bytes()).sum();
    let bf16_bytes: usize =
        loaded.quantized.values().filter(|q| q.format() == quant::QFormat::BF16).map(|q| q.bytes()).sum();
    let file_bytes = std::fs::metadata(&a.model).map(|m| m.len()).unwrap_or(0);
    drop(loaded.weights);
    let mib = |b: f64| b / (1 << 20) as f64;
    println!(
        "model: {} ({:.1} MiB file), {} threads; loaded in {load_s:.2} s; {:.1} MiB of weights kept quantized, {:.1} MiB in bf16; resident {} MiB ({} on 2 MiB pages)",
        a.model.display(),
        mib(file_bytes as f64),
        threads,
        mib((quantized_bytes - bf16_bytes) as f64),
        mib(bf16_bytes as f64),
        rss_bytes().map_or("?".into(), |b| format!("{:.0}", mib(b as f64))),
        lmforge::host_memory::huge_page_bytes().map_or("?".into(), |b| format!("{:.0}", mib(b as f64)))
    );
    println!(
        "products: {}",
        if quantized_bytes > bf16_bytes { quant::describe() } else { lmforge::nn::ops::gemm::backend().to_string() }
    );
    if bf16_bytes > 0 {
        println!("bf16 products: {}", lmforge::nn::ops::bf16::describe());
    }
    let ours = time_lmforge(&model, &a)?;
    let theirs = match &a.llamacpp {
        Some(dir) => Some(time_llamacpp(dir, &a.model, threads, &a)?),
        None => None,
    };
    let pp = format!("pp{}", a.prompt);
    let tg = format!("tg{}", a.generate);
    println!("{:<8} {:>14} {:>14} {:>10}", "test", "lmforge tok/s", "llama.cpp tok/s", "ratio");
    for (name, mine, reference) in
        [(&pp, ours.prefill, theirs.as_ref().map(|t| t.prefill)), (&tg, ours.decode, theirs.as_ref().map(|t| t.decode))]
    {
        let (reference, ratio) = match reference {
            Some(r) => (format!("{r:.1}"), format!("{:.2}x", mine / r)),
            None => ("-".into(), "-".into()),
        };
        println!("{name:<8} {mine:>14.1} {reference:>14} {ratio:>10}");
    }
    Ok(())
}

/// Prompt ids that any vocabulary has: `1, 2, …` (the content does not change the work).
fn prompt_ids(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| (1 + i % (vocab - 1)) as u32).collect()
}

fn time_lmforge(model: &Model, a: &BenchGenerateArgs) -> anyhow::Result<Speeds> {
    let vocab = model.config().vocab_size;
    let prompt = prompt_ids(a.prompt, vocab);
    let prefill = || -> anyhow::Result<f64> {
        let mut cache = model.new_cache();
        let started = Instant::now();
        let ids = Tensor::new(prompt.as_slice(), model.device())?.unsqueeze(0)?;
        let hidden = model.forward_hidden(&ids, Some(&mut cache))?; // (1, T, D)
        let logits = model.head(&hidden.narrow(1, prompt.len() - 1, 1)?)?; // (1, 1, V)
        argmax(&logits.flatten_all()?.to_vec1::<f32>()?);
        Ok(started.elapsed().as_secs_f64())
    };
    let decode = || -> anyhow::Result<f64> {
        let mut cache = model.new_cache();
        let mut id = 1u32;
        let started = Instant::now();
        for _ in 0..a.generate {
            let logits = model.forward(&Tensor::new(&[id], model.device())?.unsqueeze(0)?, Some(&mut cache))?;
            id = argmax(&logits.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(started.elapsed().as_secs_f64())
    };
    let mean_rate = |tokens: usize, run: &dyn Fn() -> anyhow::Result<f64>| -> anyhow::Result<f64> {
        run()?; // warm-up
        let mut rates = Vec::new();
        for _ in 0..a.repetitions.max(1) {
            rates.push(tokens as f64 / run()?);
        }
        Ok(rates.iter().sum::<f64>() / rates.len() as f64)
    };
    Ok(Speeds { prefill: mean_rate(a.prompt, &prefill)?, decode: mean_rate(a.generate, &decode)? })
}

fn time_llamacpp(dir: &Path, model: &Path, threads: usize, a: &BenchGenerateArgs) -> anyhow::Result<Speeds> {
    let exe = dir.join("llama-bench");
    let out = Command::new(&exe)
        .args(["-m".as_ref(), model.as_os_str()])
        .args(["-p", &a.prompt.to_string(), "-n", &a.generate.to_string()])
        .args(["-t", &threads.to_string(), "-r", &a.repetitions.max(1).to_string(), "-o", "json"])
        .output()
        .with_context(|| {
            format!("running {}\nHINT: --llamacpp names the directory holding llama-bench", exe.display())
        })?;
    if !out.status.success() {
        anyhow::bail!("{} failed ({}):\n{}", exe.display(), out.status, String::from_utf8_lossy(&out.stderr));
    }
    parse_llama_bench(&String::from_utf8_lossy(&out.stdout))
        .with_context(|| format!("reading the JSON output of {}", exe.display()))
}

/// `avg_ts` of the prompt-only test and of the generation-only test of `llama-bench -o json`.
fn parse_llama_bench(json: &str) -> anyhow::Result<Speeds> {
    let records: Vec<serde_json::Value> = serde_json::from_str(json).context("not a JSON array")?;
    let rate = |prompt: bool| -> anyhow::Result<f64> {
        records
            .iter()
            .find(|r| {
                let n = |k: &str| r.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
                if prompt {
                    n("n_prompt") > 0 && n("n_gen") == 0
                } else {
                    n("n_gen") > 0 && n("n_prompt") == 0
                }
            })
            .and_then(|r| r.get("avg_ts")?.as_f64())
            .with_context(|| format!("no {} test with an avg_ts", if prompt { "prompt" } else { "generation" }))
    };
    Ok(Speeds { prefill: rate(true)?, decode: rate(false)? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_llama_bench_json() {
        let json = r#"[{"n_prompt": 512, "n_gen": 0, "avg_ts": 812.5, "n_threads": 2},
                       {"n_prompt": 0, "n_gen": 128, "avg_ts": 151.25, "n_threads": 2}]"#;
        let speeds = parse_llama_bench(json).unwrap();
        assert_eq!((speeds.prefill, speeds.decode), (812.5, 151.25));
        let err = parse_llama_bench(r#"[{"n_prompt": 512, "n_gen": 0, "avg_ts": 1.0}]"#).unwrap_err();
        assert!(err.to_string().contains("no generation test"), "{err}");
        assert!(parse_llama_bench("llama-bench: error").is_err());
    }
}
