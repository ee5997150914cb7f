//! `lmforge export`.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use super::arch::load;

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    /// Hugging Face directory: config.json + model.safetensors (+ tokenizer.json).
    Hf,
}

#[derive(Args)]
pub struct ExportArgs {
    /// HF directory, .gguf file, or lmforge checkpoint/run directory.
    #[arg(long)]
    model: PathBuf,
    #[arg(long, value_enum)]
    to: Format,
    /// Output directory (created).
    #[arg(long)]
    out: PathBuf,
}

pub fn export(args: ExportArgs) -> anyhow::Result<()> {
    let loaded = load(&args.model)?;
    match args.to {
        Format::Hf => {
            let family =
                lmforge::io::hf::export_hf_dir(&loaded.config, &loaded.weights, loaded.tokenizer.as_ref(), &args.out)?;
            eprintln!("wrote a `{family}` Hugging Face model to {}", args.out.display());
        }
    }
    Ok(())
}
