//! `manifest.json`: a checkpoint's table of contents, written last.
//!
//! It names every other file of the checkpoint with its size and SHA-256, under a magic string
//! and a format version (the llm.c habit: a file says what it is and which layout it uses).
//! A directory without a manifest is incomplete; a file whose size or hash differs from its
//! entry is damaged; either way the checkpoint is refused as a whole, so nothing is ever
//! half-read.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// First field of every manifest.
pub const MAGIC: &str = "lmforge-checkpoint";
/// Bumped whenever the layout of a checkpoint changes incompatibly.
pub const FORMAT_VERSION: u32 = 1;
pub const MANIFEST_FILE: &str = "manifest.json";

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Manifest {
    pub magic: String,
    pub format_version: u32,
    /// The training step, repeated here so a directory renamed by hand is noticed.
    pub step: u64,
    /// File name (no directories) → size and hash.
    pub files: BTreeMap<String, FileEntry>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FileEntry {
    pub size: u64,
    /// Lower-case hex.
    pub sha256: String,
}

/// Size and SHA-256 of a byte string.
pub fn entry_for(bytes: &[u8]) -> FileEntry {
    FileEntry { size: bytes.len() as u64, sha256: hex(&Sha256::digest(bytes)) }
}

/// Size and SHA-256 of a file, read in blocks (large weight files are never held in memory).
pub fn entry_for_file(path: &Path) -> Result<FileEntry> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok(FileEntry { size, sha256: hex(&hasher.finalize()) })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const DAMAGED_HINT: &str =
    "HINT: this checkpoint is damaged or incomplete; resume from an earlier one (train::checkpoint::latest_valid finds it)";

impl Manifest {
    /// Read and check `dir/manifest.json`: magic, version, and that every entry is a plain file
    /// name (the manifest comes from disk, so `../x` must not reach outside the directory).
    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::checkpoint(
                    dir,
                    format!("no {MANIFEST_FILE}: the checkpoint was not completely written (or is not an lmforge checkpoint)\n{DAMAGED_HINT}"),
                ))
            }
            Err(e) => return Err(Error::io(&path, e)),
        };
        let manifest: Manifest = serde_json::from_str(&text)
            .map_err(|e| Error::checkpoint(&path, format!("not a valid manifest: {e}\n{DAMAGED_HINT}")))?;
        if manifest.magic != MAGIC {
            return Err(Error::checkpoint(&path, format!("magic is `{}`, expected `{MAGIC}`", manifest.magic)));
        }
        if manifest.format_version != FORMAT_VERSION {
            return Err(Error::checkpoint(
                &path,
                format!(
                    "checkpoint format version {}, this lmforge reads version {FORMAT_VERSION}\nHINT: use the lmforge version that wrote it",
                    manifest.format_version
                ),
            ));
        }
        for name in manifest.files.keys() {
            let plain = Path::new(name).file_name().is_some_and(|f| f == name.as_str()) && name != MANIFEST_FILE;
            if !plain {
                return Err(Error::checkpoint(
                    &path,
                    format!("file entry `{name}` is not a plain file name in the checkpoint"),
                ));
            }
        }
        Ok(manifest)
    }

    /// The entry for `name`, or an error if the manifest does not list it.
    pub fn entry(&self, dir: &Path, name: &str) -> Result<&FileEntry> {
        self.files.get(name).ok_or_else(|| {
            Error::checkpoint(dir.join(MANIFEST_FILE), format!("does not list required file `{name}`\n{DAMAGED_HINT}"))
        })
    }

    /// Check the file on disk against its entry, streaming (for scanning many checkpoints).
    pub fn verify_file(&self, dir: &Path, name: &str) -> Result<()> {
        let path = dir.join(name);
        if !path.is_file() {
            return Err(Error::checkpoint(&path, format!("listed in the manifest but missing\n{DAMAGED_HINT}")));
        }
        let want = self.entry(dir, name)?;
        let size = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?.len();
        if size != want.size {
            return Err(size_mismatch(&path, size, want.size));
        }
        check_entry(&path, &entry_for_file(&path)?, want)
    }

    /// Read the whole file and check it against its entry; the returned bytes are exactly the
    /// ones that were checked, so a file changed after the check cannot slip through.
    pub fn read_verified(&self, dir: &Path, name: &str) -> Result<Vec<u8>> {
        let path = dir.join(name);
        let want = self.entry(dir, name)?;
        let bytes = std::fs::read(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                Error::checkpoint(&path, format!("listed in the manifest but missing\n{DAMAGED_HINT}"))
            }
            _ => Error::io(&path, e),
        })?;
        if bytes.len() as u64 != want.size {
            return Err(size_mismatch(&path, bytes.len() as u64, want.size));
        }
        check_entry(&path, &entry_for(&bytes), want)?;
        Ok(bytes)
    }
}

fn size_mismatch(path: &Path, got: u64, want: u64) -> Error {
    Error::checkpoint(
        path,
        format!("is {got} bytes, the manifest says {want} (truncated or overwritten)\n{DAMAGED_HINT}"),
    )
}

fn check_entry(path: &Path, got: &FileEntry, want: &FileEntry) -> Result<()> {
    if got.size != want.size {
        return Err(size_mismatch(path, got.size, want.size));
    }
    if got.sha256 != want.sha256 {
        return Err(Error::checkpoint(
            path,
            format!("SHA-256 {} does not match the manifest's {} (corrupted)\n{DAMAGED_HINT}", got.sha256, want.sha256),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_known_input() {
        assert_eq!(entry_for(b"abc").sha256, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn rejects_paths_outside_the_directory() {
        let dir = std::env::temp_dir().join(format!("lmforge-manifest-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for bad in ["../x", "a/b", "/etc/passwd", "manifest.json"] {
            let m = Manifest {
                magic: MAGIC.into(),
                format_version: FORMAT_VERSION,
                step: 1,
                files: [(bad.to_string(), entry_for(b""))].into_iter().collect(),
            };
            std::fs::write(dir.join(MANIFEST_FILE), serde_json::to_string(&m).unwrap()).unwrap();
            assert!(Manifest::read(&dir).is_err(), "{bad} accepted");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
