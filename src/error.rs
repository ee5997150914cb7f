//! Typed errors for the library. Each names the file, field or tensor involved and what was
//! expected, so the CLI can print it as-is; `HINT:` lines say what to do about it.

use std::path::{Path, PathBuf};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    /// `origin` says what was checked, e.g. `model config (tiny-llama)` or `run config runs/x/run.toml`.
    #[error("invalid {origin}:\n  - {}", problems.join("\n  - "))]
    Config { origin: String, problems: Vec<String> },

    #[error("--set {setting}: {reason}")]
    Override { setting: String, reason: String },

    #[error("unknown preset `{name}`; known presets: {known}")]
    UnknownPreset { name: String, known: String },

    /// A weights file (safetensors, GGUF, checkpoint) that does not fit the model or is damaged.
    #[error("{}: {reason}", path.display())]
    Checkpoint { path: PathBuf, reason: String },

    /// A corpus file or prepared token dataset that is missing, damaged or unusable.
    #[error("{}: {reason}", path.display())]
    Data { path: PathBuf, reason: String },

    #[error("tokenizer ({origin}): {reason}")]
    Tokenizer { origin: String, reason: String },

    /// Bad user input that is not a file (token ids, sampling settings, ...).
    #[error("{0}")]
    Input(String),

    /// Training stopped because it kept diverging.
    #[error("training diverged: {0}")]
    Diverged(String),

    #[error("not supported: {0}")]
    Unsupported(String),

    /// Data-parallel training: no launcher, ranks that disagree, a batch that does not split.
    #[error("data-parallel training: {0}")]
    Distributed(String),

    /// A tensor operation failed (its backtrace, if candle captured one, removed: see
    /// [`without_backtrace`]).
    #[error(transparent)]
    Candle(candle_core::Error),
}

impl From<candle_core::Error> for Error {
    fn from(error: candle_core::Error) -> Self {
        Error::Candle(without_backtrace(error))
    }
}

/// `error` without the backtraces candle attaches to it.
///
/// candle captures a backtrace in every error it raises with `bail!` or `Error::msg` whenever
/// `RUST_BACKTRACE` (or `RUST_LIB_BACKTRACE`) is set, and its `Display` prints that backtrace
/// as part of the message: a truncated GGUF file then printed fifteen lines of stack frames
/// before the reason. A backtrace says where in candle the check failed, which is no use to
/// someone whose file is damaged; the message says what is wrong. Every candle error that
/// reaches a user goes through here (the `From` impl, and the places that quote one in a
/// message of their own).
pub fn without_backtrace(error: candle_core::Error) -> candle_core::Error {
    use candle_core::Error as E;
    match error {
        E::WithBacktrace { inner, .. } => without_backtrace(*inner),
        E::Context { inner, context } => E::Context { inner: Box::new(without_backtrace(*inner)), context },
        E::WithPath { inner, path } => E::WithPath { inner: Box::new(without_backtrace(*inner)), path },
        other => other,
    }
}

/// The first `limit` problems as an indented list (`\n  - ...`), with a count of the rest.
pub fn bullet_list(problems: &[String], limit: usize) -> String {
    let mut list: String = problems.iter().take(limit).map(|p| format!("\n  - {p}")).collect();
    if problems.len() > limit {
        list.push_str(&format!("\n  - ... and {} more", problems.len() - limit));
    }
    list
}

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().to_path_buf(), source }
    }

    pub fn data(path: impl AsRef<Path>, reason: impl Into<String>) -> Self {
        Error::Data { path: path.as_ref().to_path_buf(), reason: reason.into() }
    }

    /// `Ok` when `problems` is empty, otherwise one [`Error::Config`] listing them all.
    pub fn check_problems(origin: impl Into<String>, problems: Vec<String>) -> Result<()> {
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Config { origin: origin.into(), problems })
        }
    }

    pub fn checkpoint(path: impl AsRef<Path>, reason: impl Into<String>) -> Self {
        Error::Checkpoint { path: path.as_ref().to_path_buf(), reason: reason.into() }
    }
}
