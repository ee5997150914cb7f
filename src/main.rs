//! The `lmforge` command line: one subcommand per user verb. Each parses its arguments, calls
//! the library and prints; errors carry their context and exit non-zero.

mod cli;

use clap::Parser;

fn main() {
    let args = cli::Cli::parse();
    if let Err(error) = cli::run(args) {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}
