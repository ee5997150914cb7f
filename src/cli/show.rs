//! `lmforge presets` and `lmforge show`.

use clap::Args;
use lmforge::config::{presets, ArchReport, ModelConfig};

#[derive(Args)]
pub struct ShowArgs {
    /// Preset name, config file (.toml/.json), model directory or .gguf file.
    arch: String,
    /// Override a config field, e.g. `--set layers=12 --set attention.window=4096`.
    #[arg(long = "set", value_name = "PATH=VALUE")]
    settings: Vec<String>,
    /// Print one JSON object (the config and every figure) instead of the table.
    #[arg(long)]
    json: bool,
}

pub fn presets() -> anyhow::Result<()> {
    println!("{:<18} {:>16} {:>16}  source", "preset", "params", "active");
    for preset in presets::all() {
        let config = preset.config();
        println!(
            "{:<18} {:>16} {:>16}  {}",
            preset.name,
            group(config.params_total()),
            group(config.params_active()),
            preset.source
        );
    }
    Ok(())
}

pub fn show(args: ShowArgs) -> anyhow::Result<()> {
    let config = lmforge::io::resolve_arch(&args.arch, &args.settings)?;
    let report = config.report();
    if args.json {
        let mut value = serde_json::to_value(&report)?;
        value["config"] = serde_json::to_value(&config)?;
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print_report(&config, &report);
    }
    Ok(())
}

fn print_report(config: &ModelConfig, r: &ArchReport) {
    println!("{}", if r.name.is_empty() { "(unnamed architecture)" } else { &r.name });
    println!("{}", toml::to_string(config).unwrap_or_default().trim_end());
    println!();
    println!("{:<26} {:>16} {:>16}", "block", "params", "active/token");
    for row in &r.rows {
        println!("{:<26} {:>16} {:>16}", row.name, group(row.params), group(row.active_params));
    }
    println!("{:<26} {:>16} {:>16}", "total", group(r.params_total), group(r.params_active));
    println!();
    println!(
        "parameters        total {}  active {}  embeddings {}",
        group(r.params_total),
        group(r.params_active),
        group(r.params_embedding)
    );
    println!(
        "FLOPs per token   forward {:.3e}  training {:.3e}  (at context {})",
        r.flops_forward_per_token, r.flops_train_per_token, config.context_length
    );
    println!("weights           f32 {}  bf16 {}", bytes(r.weights_bytes_f32), bytes(r.weights_bytes_bf16));
    println!(
        "KV cache / token  f32 {}  bf16 {}  (full context {}: f32 {}{})",
        bytes(r.kv_cache_bytes_per_token_f32),
        bytes(r.kv_cache_bytes_per_token_bf16),
        config.context_length,
        bytes(r.kv_cache_bytes_full_context_f32),
        rolling_buffer_note(config, r)
    );
    println!(
        "training state    f32 {}  bf16 {}  (weights + grads + 2 AdamW moments, activations excluded)",
        bytes(r.training_bytes_f32),
        bytes(r.training_bytes_bf16)
    );
}

/// Why the full-context KV cache is smaller than per-token × context, when it is.
fn rolling_buffer_note(config: &ModelConfig, r: &ArchReport) -> String {
    if r.kv_cache_capped_layers == 0 {
        return String::new();
    }
    let windows: Vec<usize> =
        (0..config.layers).filter_map(|l| config.window(l)).filter(|&w| w < config.context_length).collect();
    let (min, max) = (windows.iter().min().copied().unwrap_or(0), windows.iter().max().copied().unwrap_or(0));
    let span = if min == max { format!("{min}") } else { format!("{min}-{max}") };
    format!(
        "; rolling buffer: {} of {} layers keep only their last {span} positions (sliding window)",
        r.kv_cache_capped_layers, config.layers
    )
}

/// `124439808` → `124,439,808`.
pub fn group(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Bytes in binary units.
pub fn bytes(n: usize) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.2} {}", units[unit])
    }
}
