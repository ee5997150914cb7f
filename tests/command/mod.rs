//! Running the `lmforge` binary as a user does, for the tests of the command line (each test
//! file that runs it includes this module).

// Each test file is its own crate and uses only part of this module.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

/// The binary under test, to add arguments and environment to.
pub fn command() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lmforge"))
}

/// `lmforge ARGS`, run to its end.
pub fn lmforge(args: &[&str]) -> Output {
    command().args(args).output().expect("run lmforge")
}

/// Runs `lmforge ARGS`, expects success, returns its output.
pub fn succeeds(args: &[&str]) -> Output {
    let out = lmforge(args);
    assert!(out.status.success(), "lmforge {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// The standard output of a successful `lmforge ARGS`.
pub fn ok(args: &[&str]) -> String {
    String::from_utf8(succeeds(args).stdout).expect("UTF-8 output")
}

/// The standard error of a successful `lmforge ARGS` (where the training loop reports).
pub fn ok_stderr(args: &[&str]) -> String {
    String::from_utf8_lossy(&succeeds(args).stderr).into_owned()
}

/// The standard error of `lmforge ARGS`, after checking it failed as an error does: status 1,
/// or 2 for a usage error, and not by a panic or a signal.
pub fn fails(args: &[&str]) -> String {
    let out = lmforge(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        matches!(out.status.code(), Some(1 | 2)),
        "lmforge {args:?} should fail with an error: {:?}\n{stderr}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "lmforge {args:?} panicked:\n{stderr}");
    stderr
}

/// `$LMFORGE_PYTHON`, the reference interpreter (torch, transformers, gguf: the venv of
/// `scripts/setup_python.sh`) for the tests that check lmforge against them; absent, `test` is
/// skipped with a notice, or fails when `LMFORGE_REQUIRE_PYTHON=1` (as CI sets it).
pub fn reference_python(test: &str) -> Option<PathBuf> {
    if let Some(python) = std::env::var_os("LMFORGE_PYTHON").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(python));
    }
    assert!(
        std::env::var("LMFORGE_REQUIRE_PYTHON").as_deref() != Ok("1"),
        "{test}: LMFORGE_REQUIRE_PYTHON=1 but LMFORGE_PYTHON is unset (PYTHON=$(scripts/setup_python.sh))"
    );
    eprintln!("{test}: skipped, LMFORGE_PYTHON is unset (set it to the python of scripts/setup_python.sh)");
    None
}
