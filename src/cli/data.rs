//! `lmforge tokenizer train` and `lmforge data prepare`.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use lmforge::data::{prepare, save_tokenizer, train_bpe, PrepareConfig, ValSplit, END_OF_TEXT};

#[derive(Subcommand)]
pub enum TokenizerCommand {
    /// Train a byte-level BPE tokenizer on text files.
    Train(TokenizerTrainArgs),
}

#[derive(Args)]
pub struct TokenizerTrainArgs {
    /// Text files to learn from.
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    /// Tokens in the vocabulary, including the 256 bytes and the special tokens.
    #[arg(long)]
    vocab_size: usize,
    /// Special tokens, given the first ids (default: <|endoftext|>).
    #[arg(long = "special")]
    special: Vec<String>,
    /// Merge a pair only if it occurs at least this often.
    #[arg(long, default_value_t = 2)]
    min_frequency: u64,
    #[arg(long)]
    out: PathBuf,
}

pub fn tokenizer(command: TokenizerCommand) -> anyhow::Result<()> {
    match command {
        TokenizerCommand::Train(args) => {
            let special = if args.special.is_empty() { vec![END_OF_TEXT.to_string()] } else { args.special };
            let started = std::time::Instant::now();
            let tokenizer = train_bpe(&args.input, args.vocab_size, &special, args.min_frequency)?;
            save_tokenizer(&tokenizer, &args.out)?;
            eprintln!(
                "wrote {} ({} tokens) in {:.1}s",
                args.out.display(),
                tokenizer.get_vocab_size(true),
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
    }
}

#[derive(Subcommand)]
pub enum DataCommand {
    /// Tokenize text files into memory-mappable token shards with a manifest.
    Prepare(PrepareArgs),
}

#[derive(Args)]
pub struct PrepareArgs {
    #[arg(long)]
    tokenizer: PathBuf,
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    #[arg(long)]
    out: PathBuf,
    /// Fraction of each input's tail held out for validation.
    #[arg(long, default_value_t = 0.05, conflicts_with = "val_input")]
    val_fraction: f64,
    /// Separate validation files (instead of a tail fraction).
    #[arg(long = "val-input")]
    val_input: Vec<PathBuf>,
    /// The end-of-document token appended after each file.
    #[arg(long, default_value = END_OF_TEXT)]
    eot_token: String,
}

pub fn data(command: DataCommand) -> anyhow::Result<()> {
    match command {
        DataCommand::Prepare(args) => {
            let mut config = PrepareConfig::new(&args.tokenizer, args.input, &args.out);
            config.val = if args.val_input.is_empty() {
                ValSplit::Tail(args.val_fraction)
            } else {
                ValSplit::Files(args.val_input)
            };
            config.eot_token = args.eot_token;
            let started = std::time::Instant::now();
            let manifest = prepare(&config)?;
            let seconds = started.elapsed().as_secs_f64();
            let total = manifest.train.tokens + manifest.val.tokens;
            eprintln!(
                "wrote {}: {} train + {} val tokens in {seconds:.1}s ({:.0} tokens/s)",
                args.out.display(),
                manifest.train.tokens,
                manifest.val.tokens,
                total as f64 / seconds
            );
            Ok(())
        }
    }
}
