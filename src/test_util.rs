//! Helpers shared by the unit tests of several modules.

use std::path::PathBuf;

/// A fresh directory under the system temp dir (via `tempfile`), removed when dropped. `.0` is
/// its path.
pub struct TempDir(pub PathBuf, #[allow(dead_code)] tempfile::TempDir);

impl TempDir {
    /// `tag` only names the directory, to tell tests' leftovers apart when debugging.
    pub fn new(tag: &str) -> Self {
        let dir = tempfile::Builder::new().prefix(&format!("lmforge-{tag}-")).tempdir().expect("temp dir");
        TempDir(dir.path().to_path_buf(), dir)
    }

    /// The path of `file` inside the directory.
    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }

    /// Write `bytes` to `name` inside the directory; its path.
    pub fn write(&self, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, bytes).expect("write test file");
        path
    }
}
