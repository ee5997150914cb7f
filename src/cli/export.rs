//! `lmforge export`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use lmforge::io::gguf::{export_gguf, type_name, ExportOptions, Quant};

use super::arch::load;

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    /// Hugging Face directory: config.json + model.safetensors (+ tokenizer.json).
    Hf,
    /// One GGUF file (`general.architecture = llama`) for llama.cpp and ollama.
    Gguf,
}

#[derive(Args)]
pub struct ExportArgs {
    /// HF directory, .gguf file, or lmforge checkpoint/run directory.
    #[arg(long)]
    model: PathBuf,
    #[arg(long, value_enum)]
    to: Format,
    /// Output directory (`--to hf`, created) or file (`--to gguf`).
    #[arg(long)]
    out: PathBuf,
    /// GGUF only: how the weight matrices are stored: f32, f16, q8_0 or q4_0 (norms stay f32;
    /// with q4_0 the output head is q6_K, as llama-quantize does).
    #[arg(long, default_value = "f32", value_parser = str::parse::<Quant>)]
    quant: Quant,
    /// GGUF only: export a sliding window shorter than the context as full attention, as
    /// llama.cpp's own converter does for Mistral (exact while a sequence fits in the window).
    #[arg(long)]
    drop_sliding_window: bool,
}

pub fn export(args: ExportArgs) -> anyhow::Result<()> {
    let loaded = load(&args.model)?;
    match args.to {
        Format::Hf => {
            let family =
                lmforge::io::hf::export_hf_dir(&loaded.config, &loaded.weights, loaded.tokenizer.as_ref(), &args.out)?;
            eprintln!("wrote a `{family}` Hugging Face model to {}", args.out.display());
        }
        Format::Gguf => {
            let options = ExportOptions { quant: args.quant, drop_sliding_window: args.drop_sliding_window };
            let tensors = export_gguf(&loaded.config, &loaded.weights, loaded.tokenizer.as_ref(), &args.out, &options)
                .with_context(|| format!("exporting {} to {}", args.model.display(), args.out.display()))?;
            let mut by_type = BTreeMap::new();
            for (_, dtype) in &tensors {
                *by_type.entry(type_name(*dtype)).or_insert(0) += 1;
            }
            let types: Vec<String> = by_type.iter().map(|(t, n)| format!("{n} {t}")).collect();
            let bytes = std::fs::metadata(&args.out).map(|m| m.len()).unwrap_or(0);
            eprintln!(
                "wrote a `llama` GGUF ({}, {} tensors: {}; {}) to {} ({:.1} MB)",
                options.quant.name(),
                tensors.len(),
                types.join(", "),
                if loaded.tokenizer.is_some() { "with its tokenizer" } else { "no tokenizer" },
                args.out.display(),
                bytes as f64 / 1e6
            );
        }
    }
    Ok(())
}
