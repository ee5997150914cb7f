//! Benchmarks that compare with the reference implementations on the same machine, in the
//! same run: `bench train` against PyTorch eager on ../shared/bench's config (nanoGPT-style
//! GPT: 4 layers, 6 heads, d_model 384, seq 256, batch 8, vocab 256), in fp32 or with bf16
//! products against PyTorch's bf16 autocast, `bench matmul` against candle's matmul.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use candle_core::{Device, Tensor};
use clap::Args;
use lmforge::config::{apply_overrides, presets};
use lmforge::model::init_weights;
use lmforge::nn::ops::{bf16, Precision};
use lmforge::plan::device::{ACCELERATORS, DEFAULT_MFU};
use lmforge::plan::PlanDevice;
use lmforge::train::bench::{median, peak_rss_bytes, StepBench, StepPhases};

use super::device::DeviceArg;

/// The PyTorch side of `bench train`, embedded so the benchmark runs from any directory.
const TORCH_SCRIPT: &str = include_str!("../../scripts/torch_gpt_step.py");

/// The benchmark model: a GPT-2-style decoder, ../shared/bench's reference config by default.
#[derive(Args, Clone, Copy)]
pub struct BenchModel {
    #[arg(long, default_value_t = 4)]
    pub(super) layers: usize,
    #[arg(long, default_value_t = 6)]
    pub(super) heads: usize,
    #[arg(long, default_value_t = 384)]
    pub(super) d_model: usize,
    #[arg(long, default_value_t = 256)]
    pub(super) vocab: usize,
}

impl BenchModel {
    /// The `--set`s that make the `gpt2` preset this model at a context of `seq_len`; its
    /// feed-forward is the caller's to set.
    pub(super) fn shape_settings(&self, seq_len: usize) -> Vec<String> {
        vec![
            format!("layers={}", self.layers),
            format!("attention.heads={}", self.heads),
            format!("attention.kv_heads={}", self.heads),
            format!("d_model={}", self.d_model),
            format!("context_length={seq_len}"),
            format!("vocab_size={}", self.vocab),
        ]
    }
}

#[derive(Args)]
pub struct BenchTrainArgs {
    #[command(flatten)]
    model: BenchModel,
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Timed steps per round.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed steps before the first round.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Attention implementation: flash (tiled kernel) or naive (materialised scores).
    #[arg(long, default_value = "flash")]
    attention: String,
    /// Rounds; with --torch, each round times PyTorch and then lmforge, so both see the same
    /// machine state, and the medians over rounds are compared.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// A Python with torch installed: also run scripts/torch_gpt_step.py (the same model and
    /// step in PyTorch eager fp32, or under bf16 autocast with --precision bf16) and report
    /// the ratio.
    #[arg(long)]
    torch: Option<PathBuf>,
    /// Precision of the matrix products: f32, or bf16 (bf16 operands, f32 sums; PyTorch then
    /// runs its forward under `torch.autocast("cpu", dtype=torch.bfloat16)`).
    #[arg(long, default_value = "f32", value_name = "f32|bf16")]
    precision: Precision,
    #[command(flatten)]
    device: DeviceArg,
    /// Also print the model FLOPs utilisation against this accelerator's dense bf16 peak
    /// (a100, h100, h200: the datasheet figures `plan` uses).
    #[arg(long, value_name = "ACCELERATOR")]
    peak: Option<String>,
}

/// A file deleted when dropped, so an early error return leaves nothing behind.
struct RemovedOnDrop(PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub fn bench_train(a: BenchTrainArgs) -> anyhow::Result<()> {
    let mut settings = a.model.shape_settings(a.seq_len);
    settings.push(format!("ffn.hidden={}", 4 * a.model.d_model));
    settings.push(format!("attention.implementation={}", a.attention));
    let config = apply_overrides(&presets::get("gpt2")?, &settings)?;
    let peak = match &a.peak {
        Some(name) => match PlanDevice::parse(name, DEFAULT_MFU)? {
            PlanDevice::Accelerator { spec, .. } => Some(spec),
            PlanDevice::ThisCpu => {
                anyhow::bail!("--peak {name}: name an accelerator ({})", ACCELERATORS.map(|a| a.name).join(", "))
            }
        },
        None => None,
    };
    let device = a.device.open()?;
    let weights = init_weights(&config, 0, &Device::Cpu)?;
    let weights = weights.into_iter().map(|(n, w)| Ok((n, w.to_device(&device)?))).collect::<anyhow::Result<_>>()?;
    let mut bench = StepBench::new(&config, weights, a.batch_size, a.seq_len)?;
    println!("device: {}", lmforge::device::describe(&device));
    let mut step = |phases: &mut StepPhases| -> anyhow::Result<f32> {
        let (took, loss) = bench.step()?;
        phases.accumulate(took);
        Ok(loss)
    };
    // Every product of this thread (forward and backward) at the chosen precision.
    let _precision = a.precision.enter()?;
    for _ in 0..a.warmup {
        step(&mut StepPhases::default())?;
    }
    let script = match &a.torch {
        Some(_) => {
            let path = std::env::temp_dir().join(format!("lmforge-torch-gpt-step-{}.py", std::process::id()));
            std::fs::write(&path, TORCH_SCRIPT).with_context(|| format!("writing {}", path.display()))?;
            Some(RemovedOnDrop(path))
        }
        None => None,
    };
    match a.precision {
        Precision::F32 => println!("gemm: {}", lmforge::nn::ops::gemm::backend()),
        Precision::Bf16 => println!("gemm: bf16 products on {}", bf16::describe()),
    }
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for round in 0..a.rounds.max(1) {
        if let (Some(python), Some(script)) = (&a.torch, &script) {
            let (line, step_ms) = run_torch(python, &script.0, &a)?;
            println!("round {round}: {line}");
            theirs.push(step_ms);
            // Warm up again: our threads slept while PyTorch ran (its own 5 warm-up steps are
            // not timed either).
            for _ in 0..2 {
                step(&mut StepPhases::default())?;
            }
        }
        let mut phases = StepPhases::default();
        let started = Instant::now();
        let mut loss = 0.0;
        for _ in 0..a.steps {
            loss = step(&mut phases)?;
        }
        let step_ms = started.elapsed().as_secs_f64() * 1e3 / a.steps as f64;
        let per_step_ms = |seconds: f64| seconds * 1e3 / a.steps as f64;
        let (forward, backward, update) =
            (per_step_ms(phases.forward), per_step_ms(phases.backward), per_step_ms(phases.update));
        println!(
            "round {round}: lmforge precision={} threads={} params={} step_ms={step_ms:.2} tok_per_s={:.0} loss={loss:.4} (forward {forward:.0} ms, backward {backward:.0} ms, clip+AdamW {update:.0} ms)",
            a.precision,
            lmforge::nn::ops::parallel::threads(),
            config.params_total(),
            (a.batch_size * a.seq_len) as f64 / step_ms * 1e3,
        );
        if let Some(spec) = peak {
            // Training FLOPs: three times the forward's (PaLM's convention, as `show` counts),
            // attention over the whole sequence.
            let flops_per_step = 3.0 * config.flops_forward_per_token(a.seq_len) * (a.batch_size * a.seq_len) as f64;
            let achieved = flops_per_step / (step_ms / 1e3);
            println!(
                "round {round}: {:.1} TFLOP/s, MFU {:.1}% of the {} ({:.0} TFLOP/s dense bf16)",
                achieved / 1e12,
                100.0 * achieved / spec.peak_flops,
                spec.name,
                spec.peak_flops / 1e12
            );
        }
        ours.push(step_ms);
    }
    if let Some(peak) = peak_rss_bytes() {
        println!("peak_rss_mib={:.0}", peak as f64 / (1u64 << 20) as f64);
    }
    if !theirs.is_empty() {
        let (ours, theirs) = (median(&mut ours), median(&mut theirs));
        let reference = match a.precision {
            Precision::F32 => "PyTorch fp32",
            Precision::Bf16 => "PyTorch bf16 autocast",
        };
        println!(
            "median over {} rounds ({}): lmforge {ours:.1} ms/step, {reference} {theirs:.1} ms/step: lmforge takes {:.2}x PyTorch's time",
            a.rounds.max(1),
            a.precision,
            ours / theirs
        );
    }
    Ok(())
}

/// Run the PyTorch reference once; its output line and ms per step.
fn run_torch(python: &Path, script: &Path, a: &BenchTrainArgs) -> anyhow::Result<(String, f64)> {
    let args = [a.model.layers, a.model.heads, a.model.d_model, a.seq_len, a.batch_size, a.model.vocab, a.steps]
        .map(|x| x.to_string());
    let out = Command::new(python)
        .arg(script)
        .args(&args)
        .env("OMP_NUM_THREADS", lmforge::nn::ops::parallel::threads().to_string())
        .env("AMP", if a.precision == Precision::Bf16 { "bf16" } else { "" })
        .output()
        .with_context(|| format!("running {} {}", python.display(), script.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        anyhow::bail!(
            "the PyTorch reference failed ({}):\n{}{}\nHINT: --torch needs a Python with torch installed",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        )
    }
    let line = stdout.lines().last().unwrap_or("").to_string();
    let step_ms = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("step_ms="))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no step_ms= in the PyTorch output: {line}"))?;
    Ok((line, step_ms))
}

#[derive(Args)]
pub struct BenchMemoryArgs {
    /// Sequence lengths (batch 1).
    #[arg(long, value_delimiter = ',', default_value = "512,1024,2048,4096")]
    seqs: Vec<usize>,
    /// Attention implementations to compare.
    #[arg(long, value_delimiter = ',', default_value = "flash,naive")]
    attention: Vec<String>,
    #[command(flatten)]
    model: BenchModel,
}

/// Peak memory of one training step (forward, backward, AdamW) at batch 1 for each sequence
/// length and attention implementation, each in a fresh process so each peak is its own.
pub fn bench_memory(a: BenchMemoryArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating the lmforge executable")?;
    println!(
        "peak resident memory of one training step, batch 1 ({} layers, {} heads, d_model {}, vocab {})",
        a.model.layers, a.model.heads, a.model.d_model, a.model.vocab
    );
    println!("{:>6} {:>10} {:>14} {:>12}", "seq", "attention", "peak MiB", "step ms");
    for implementation in &a.attention {
        for &seq in &a.seqs {
            let args = [
                ("--seq-len", seq),
                ("--batch-size", 1),
                ("--steps", 1),
                ("--warmup", 1),
                ("--layers", a.model.layers),
                ("--heads", a.model.heads),
                ("--d-model", a.model.d_model),
                ("--vocab", a.model.vocab),
            ];
            let mut command = Command::new(&exe);
            command.args(["bench", "train", "--attention", implementation]);
            for (flag, value) in args {
                command.args([flag.to_string(), value.to_string()]);
            }
            let out = command.output().context("running lmforge bench train")?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            if !out.status.success() {
                anyhow::bail!(
                    "bench train at seq {seq} ({implementation}) failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            }
            let field = |name: &str| {
                stdout.split_whitespace().find_map(|w| w.strip_prefix(name)).and_then(|v| v.parse::<f64>().ok())
            };
            let (peak, ms) = (field("peak_rss_mib="), field("step_ms="));
            let show = |v: Option<f64>| v.map_or("?".to_string(), |v| format!("{v:.0}"));
            println!("{seq:>6} {implementation:>10} {:>14} {:>12}", show(peak), show(ms));
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct BenchMatmulArgs {
    /// Rows of the activations (tokens per step).
    #[arg(long, default_value_t = 2048)]
    tokens: usize,
    #[arg(long, default_value_t = 384)]
    d_model: usize,
    /// Seconds per product (shared by the implementations compared).
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
}

/// The three products of a linear layer `(in → out)` over `tokens` rows — forward `X·Wᵀ`,
/// input gradient `dY·W`, weight gradient `dYᵀ·X` — for the widths of the benchmark model,
/// through lmforge's kernel, the loaded BLAS (`LMFORGE_BLAS`) if any, candle's `matmul`, and
/// lmforge's bf16 products (bf16 operands, f32 sums: `--precision bf16`), on the same operands.
///
/// The implementations take turns call by call and each reports its median: on a shared
/// machine whose speed drifts from second to second, that is the only comparison that held
/// still here (the best of each one's own run flattered whichever ran in a quiet moment).
pub fn bench_matmul(a: BenchMatmulArgs) -> anyhow::Result<()> {
    use lmforge::nn::ops::gemm::{builtin_gemm, gemm, gemm_in, MatRef};
    let blas = lmforge::nn::ops::blas::loaded();
    // The bf16 column, unless LMFORGE_BF16_KERNEL asks for a kernel this CPU lacks (said so).
    let bf16_kernel = bf16::kernel().map_err(|e| println!("bf16: not timed: {e}")).is_ok();
    let (t, d) = (a.tokens, a.d_model);
    println!(
        "threads={}, GFLOP/s (median, the implementations taking turns call by call for {:.1} s per product)",
        lmforge::nn::ops::parallel::threads(),
        a.seconds
    );
    if let Some(blas) = blas {
        println!("BLAS: {}", blas.description);
    }
    if bf16_kernel {
        println!("bf16: {}", bf16::describe());
    }
    let blas_column = if blas.is_some() { format!(" {:>8}", "BLAS") } else { String::new() };
    let bf16_column = if bf16_kernel { format!(" {:>8}", "bf16") } else { String::new() };
    println!("{:<28} {:>8}{blas_column} {:>8}{bf16_column}", "product (m×k · k×n)", "lmforge", "candle");
    for (fan_in, fan_out) in [(d, d), (d, 4 * d), (4 * d, d)] {
        let x = random(t * fan_in, 1);
        let w = random(fan_out * fan_in, 2);
        let dy = random(t * fan_out, 3);
        let cases: [(&str, MatRef<f32>, MatRef<f32>); 3] = [
            ("X·Wᵀ", MatRef::row_major(&x, t, fan_in), MatRef::row_major(&w, fan_out, fan_in).t()),
            ("dY·W", MatRef::row_major(&dy, t, fan_out), MatRef::row_major(&w, fan_out, fan_in)),
            ("dYᵀ·X", MatRef::row_major(&dy, t, fan_out).t(), MatRef::row_major(&x, t, fan_in)),
        ];
        for (name, lhs, rhs) in cases {
            let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
            let as_tensor = |v: MatRef<f32>| -> anyhow::Result<Tensor> {
                let stored = Tensor::from_slice(
                    v.data,
                    if v.col_stride == 1 { (v.rows, v.cols) } else { (v.cols, v.rows) },
                    &Device::Cpu,
                )?;
                Ok(if v.col_stride == 1 { stored } else { stored.t()? })
            };
            let (lt, rt) = (as_tensor(lhs)?, as_tensor(rhs)?);
            let mut c = vec![0f32; m * n];
            let mut contenders: Vec<Box<dyn FnMut()>> = vec![Box::new(|| builtin_gemm(lhs, rhs, &mut c, n, false))];
            if blas.is_some() {
                let mut c = vec![0f32; m * n];
                contenders.push(Box::new(move || gemm(lhs, rhs, &mut c, n, false)));
            }
            contenders.push(Box::new(|| {
                lt.matmul(&rt).expect("candle matmul");
            }));
            if bf16_kernel {
                let mut c = vec![0f32; m * n];
                contenders.push(Box::new(move || gemm_in(Precision::Bf16, lhs, rhs, &mut c, n, false)));
            }
            let flops = 2.0 * (m * k * n) as f64;
            let gflops: Vec<String> = median_seconds_taking_turns(a.seconds, &mut contenders)
                .iter()
                .map(|s| format!(" {:>8.1}", flops / s / 1e9))
                .collect();
            println!("{:<28}{}", format!("{name} {m}×{k}·{k}×{n}"), gflops.concat());
        }
    }
    Ok(())
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

/// Median seconds per call of each of `contenders`, called in turn (after one warm-up call
/// each) until about `seconds` have passed and each has run at least 5 times.
fn median_seconds_taking_turns(seconds: f64, contenders: &mut [Box<dyn FnMut() + '_>]) -> Vec<f64> {
    contenders.iter_mut().for_each(|f| f());
    let mut times = vec![Vec::new(); contenders.len()];
    let started = Instant::now();
    while started.elapsed().as_secs_f64() < seconds || times[0].len() < 5 {
        for (f, times) in contenders.iter_mut().zip(&mut times) {
            let t = Instant::now();
            f();
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.iter_mut().map(|t| median(t)).collect()
}
