//! The corpus bundled into the binary, so `lmforge train` works from any directory on a fresh
//! machine: two Jane Austen novels for training and a third held out for validation (public
//! domain; see data/README.md).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// (file name, text): the training files.
const TRAIN: [(&str, &str); 2] = [
    ("prideprejudice.txt", include_str!("../../data/austen/prideprejudice.txt")),
    ("sensesensibility.txt", include_str!("../../data/austen/sensesensibility.txt")),
];

/// The held-out validation file.
pub const VAL: (&str, &str) = ("persuasion.txt", include_str!("../../data/austen/persuasion.txt"));

/// Write the bundled training files into `dir` (if not already there) and return their paths.
pub fn write_bundled(dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    TRAIN.iter().map(|(name, text)| write_once(dir, name, text)).collect()
}

/// Write the bundled validation file into `dir` and return its path.
pub fn write_bundled_val(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    write_once(dir, VAL.0, VAL.1)
}

fn write_once(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    if std::fs::metadata(&path).map(|m| m.len() as usize != text.len()).unwrap_or(true) {
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    }
    Ok(path)
}
