//! Attention forward + backward: the tiled kernel (`ops::flash_attention`) against the composed
//! path the model uses today (`nn::attention::grouped_attention` with a bias tensor).
//!
//! `cargo bench --bench ops` runs every (path, length) in its own process, so each reports its
//! own peak memory (VmHWM from /proc/self/status, reset after setup, minus the resident size
//! then). Times: best wall-clock run, and mean CPU time of all threads per run (on a shared
//! machine the wall time is inflated by other load; the CPU time much less so).
//! Shapes: B = 1, H = KV = 6, hd = 64, causal, f32; T = S in {256, 1024, 4096}.
//! Options: `-- --seqs 256,1024 --paths flash,naive --kv 6 --window 0 --alibi`.
//! `-- --torch PYTHON`: also time PyTorch's `scaled_dot_product_attention` (eager fp32, same
//! shapes and threads, causal; MHA only) in the same run, as the path `torch`.
//! `-- --others`: the other fused ops against their composed versions instead.

use std::process::Command;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Result, Tensor, Var};
use lmforge::nn::attention::grouped_attention;
use lmforge::nn::ops::{flash_attention, AttentionMask};
use lmforge::nn::positions::alibi_slopes;

const HEADS: usize = 6;
const HEAD_DIM: usize = 64;

/// The PyTorch side: prints the same four fields as `run_one` for `scaled_dot_product_attention`.
const TORCH_SDPA: &str = r#"
import resource, sys, time, torch
T, H, hd, threads = (int(x) for x in sys.argv[1:5])
torch.set_num_threads(threads)
q, k, v = (torch.randn(1, H, T, hd, requires_grad=True) for _ in range(3))
sdpa = torch.nn.functional.scaled_dot_product_attention
def timed(f):
    f()
    n, best, start, cpu = 0, float("inf"), time.perf_counter(), time.process_time()
    while n < 3 or (time.perf_counter() - start < 3 and n < 50):
        t = time.perf_counter(); f(); best = min(best, time.perf_counter() - t); n += 1
    return best * 1e3, (time.process_time() - cpu) / n * 1e3
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
fwd, _ = timed(lambda: sdpa(q, k, v, is_causal=True))
both, cpu = timed(lambda: sdpa(q, k, v, is_causal=True).sum().backward())
peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
print(f"{fwd:.2f} {both:.2f} {cpu:.1f} {peak:.1f}")
"#;

struct Config {
    seqs: Vec<usize>,
    paths: Vec<String>,
    torch: Option<String>,
    kv: usize,
    window: Option<usize>,
    alibi: bool,
}

fn parse() -> (Config, Option<(String, usize)>) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut config = Config {
        seqs: vec![256, 1024, 4096],
        paths: vec!["flash".into(), "naive".into()],
        kv: HEADS,
        window: None,
        alibi: false,
        torch: None,
    };
    let mut one = None;
    let mut i = 0;
    while i < args.len() {
        let next = |i: usize| args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--seqs" => config.seqs = next(i).split(',').filter_map(|s| s.parse().ok()).collect(),
            "--paths" => config.paths = next(i).split(',').map(String::from).collect(),
            "--kv" => config.kv = next(i).parse().unwrap_or(HEADS),
            "--torch" => config.torch = Some(next(i)),
            "--window" => config.window = next(i).parse().ok().filter(|&w| w > 0),
            "--alibi" => {
                config.alibi = true;
                i += 1;
                continue;
            }
            "--one" => one = Some((next(i), args.get(i + 2).and_then(|s| s.parse().ok()).unwrap_or(256))),
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    (config, one)
}

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// CPU time of the whole process (all threads), in seconds, from /proc/self/stat.
fn process_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at index 2 ("state").
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum());
    ticks / 100.0 // USER_HZ
}

/// One path at one length, in this process: prints `fwd_ms fwd_bwd_ms fwd_bwd_cpu_ms peak_mib`.
fn run_one(config: &Config, path: &str, seq: usize) -> Result<()> {
    let dev = Device::Cpu;
    let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, HEADS, seq, HEAD_DIM), &dev)?)?;
    let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, config.kv, seq, HEAD_DIM), &dev)?)?;
    let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, config.kv, seq, HEAD_DIM), &dev)?)?;
    let mask = AttentionMask::causal_self(0, seq)
        .with_window(config.window)
        .with_alibi(config.alibi.then(|| alibi_slopes(HEADS, 8.0)));
    // The composed path reads the mask as a bias tensor; it is built once, outside the timing
    // (the model builds it on every forward).
    let bias = if path == "naive" { Some(mask.bias(seq, DType::F32, &dev)?) } else { None };
    let scale = 1.0 / (HEAD_DIM as f64).sqrt();
    let forward = |q: &Tensor| -> Result<Tensor> {
        match &bias {
            None => flash_attention(q, k.as_tensor(), v.as_tensor(), scale, &mask),
            Some(bias) => grouped_attention(q, k.as_tensor(), v.as_tensor(), bias, HEAD_DIM),
        }
    };
    let verbose = std::env::var_os("BENCH_VERBOSE").is_some();
    // Best wall time, and mean process CPU time per run.
    let time = |f: &dyn Fn() -> Result<()>| -> Result<(f64, f64)> {
        f()?; // warm-up
        let (mut n, mut best, start, cpu0) = (0, f64::INFINITY, Instant::now(), process_cpu_s());
        while n < 3 || (start.elapsed() < Duration::from_secs(3) && n < 50) {
            let t = Instant::now();
            f()?;
            best = best.min(t.elapsed().as_secs_f64());
            n += 1;
        }
        let cpu = (process_cpu_s() - cpu0) / n as f64;
        if verbose {
            eprintln!(
                "{n} runs in {:.2} s, best {:.2} ms, cpu {:.2} ms/run",
                start.elapsed().as_secs_f64(),
                best * 1e3,
                cpu * 1e3
            );
        }
        Ok((best * 1e3, cpu * 1e3))
    };
    // Reset the high-water mark to the current resident size (Linux ≥ 4.0), so the peak below
    // is what the attention itself adds.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let baseline = status_kib("VmRSS");
    let (fwd_ms, _) = time(&|| forward(q.as_tensor()).map(|_| ()))?;
    let (both_ms, both_cpu_ms) = time(&|| {
        let grads = forward(q.as_tensor())?.sum_all()?.backward()?;
        std::hint::black_box(grads.get(q.as_tensor()));
        Ok(())
    })?;
    let peak_mib = (status_kib("VmHWM").saturating_sub(baseline)) as f64 / 1024.0;
    println!("{fwd_ms:.2} {both_ms:.2} {both_cpu_ms:.1} {peak_mib:.1}");
    Ok(())
}

/// Fused op against its composed version, forward + backward, at shapes of a ~1B model.
fn run_others() -> Result<()> {
    use lmforge::nn::ops::{self, norm, rope};
    let dev = Device::Cpu;
    let var = |dims: &[usize]| Var::from_tensor(&Tensor::randn(0f32, 1.0, dims, &dev).unwrap()).unwrap();
    let time = |f: &dyn Fn() -> Result<Tensor>| -> Result<f64> {
        let run = || -> Result<()> {
            std::hint::black_box(f()?.sum_all()?.backward()?);
            Ok(())
        };
        run()?;
        let (mut n, mut best, start) = (0, f64::INFINITY, Instant::now());
        while n < 3 || (start.elapsed() < Duration::from_secs(2) && n < 30) {
            let t = Instant::now();
            run()?;
            best = best.min(t.elapsed().as_secs_f64());
            n += 1;
        }
        Ok(best * 1e3)
    };
    let report = |name: &str, fused: f64, composed: f64| {
        println!("{name:<44} {fused:>9.2} {composed:>12.2} {:>8.1}x", composed / fused);
    };
    println!("{:<44} {:>9} {:>12} {:>9}", "op (fwd+bwd, f32)", "fused ms", "composed ms", "speedup");
    let x = var(&[4, 512, 2048]);
    let (w, b) = (var(&[2048]), var(&[2048]));
    let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
    report(
        "rms_norm (4, 512, 2048)",
        time(&|| ops::rms_norm(xt, wt, 1e-5))?,
        time(&|| norm::composed_rms_norm(xt, wt, 1e-5))?,
    );
    report(
        "layer_norm (4, 512, 2048) + bias",
        time(&|| ops::layer_norm(xt, wt, Some(bt), 1e-5))?,
        time(&|| norm::composed_layer_norm(xt, wt, Some(bt), 1e-5))?,
    );
    let q = var(&[4, 16, 512, 128]);
    let (cos, sin) = lmforge::nn::positions::Rope::new(10_000.0, 128, None).tables(0, 512, &dev)?;
    report(
        "rope (4, 16, 512, 128)",
        time(&|| ops::rope(q.as_tensor(), &cos, &sin))?,
        time(&|| rope::composed_rope(q.as_tensor(), &cos, &sin))?,
    );
    let (gate, up) = (var(&[4, 512, 5632]), var(&[4, 512, 5632]));
    report(
        "swiglu (4, 512, 5632)",
        time(&|| ops::swiglu(gate.as_tensor(), up.as_tensor()))?,
        time(&|| gate.as_tensor().silu()? * up.as_tensor())?,
    );
    report("gelu_tanh (4, 512, 5632)", time(&|| ops::gelu_tanh(gate.as_tensor()))?, time(&|| gate.as_tensor().gelu())?);
    report(
        "gelu_erf (4, 512, 5632)",
        time(&|| ops::gelu_erf(gate.as_tensor()))?,
        time(&|| gate.as_tensor().gelu_erf())?,
    );
    let logits = var(&[1024, 32_000]);
    let targets = Tensor::arange(0u32, 1024, &dev)?;
    report(
        "cross-entropy (1024, 32000) vs candle_nn",
        time(&|| ops::softmax_cross_entropy(logits.as_tensor(), &targets, None))?,
        time(&|| candle_nn::loss::cross_entropy(logits.as_tensor(), &targets))?,
    );
    Ok(())
}

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--others") {
        return run_others();
    }
    let (config, one) = parse();
    if let Some((path, seq)) = one {
        return run_one(&config, &path, seq);
    }
    let exe = std::env::current_exe().expect("own path");
    let forwarded: Vec<String> = std::env::args().skip(1).collect();
    println!(
        "attention fwd+bwd, B=1 H={HEADS} KV={} hd={HEAD_DIM} f32 causal{}{}, {} threads; best of repeated runs",
        config.kv,
        config.window.map_or(String::new(), |w| format!(" window {w}")),
        if config.alibi { " alibi" } else { "" },
        lmforge::nn::ops::parallel::threads()
    );
    println!(
        "{:>6} {:>6} {:>9} {:>12} {:>18} {:>14}",
        "path", "seq", "fwd ms", "fwd+bwd ms", "fwd+bwd CPU-ms", "peak MiB (Δ)"
    );
    let mut paths = config.paths.clone();
    if config.torch.is_some() {
        paths.push("torch".into());
    }
    for &seq in &config.seqs {
        for path in &paths {
            let out = match (path.as_str(), &config.torch) {
                ("torch", Some(python)) => Command::new(python)
                    .args(["-c", TORCH_SDPA])
                    .args([seq, HEADS, HEAD_DIM, lmforge::nn::ops::parallel::threads()].map(|x| x.to_string()))
                    .output()
                    .expect("run python"),
                _ => Command::new(&exe)
                    .args(&forwarded)
                    .args(["--one", path, &seq.to_string()])
                    .output()
                    .expect("run child"),
            };
            let text = String::from_utf8_lossy(&out.stdout);
            let fields: Vec<&str> = text.split_whitespace().collect();
            if !out.status.success() || fields.len() != 4 {
                println!(
                    "{path:>6} {seq:>6} failed: {}",
                    String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")
                );
                continue;
            }
            println!("{path:>6} {seq:>6} {:>9} {:>12} {:>18} {:>14}", fields[0], fields[1], fields[2], fields[3]);
        }
    }
    Ok(())
}
