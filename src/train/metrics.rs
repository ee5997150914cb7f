//! `RUN/metrics.jsonl`: one JSON object per line, per step, evaluation, sample and event.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

pub const METRICS_FILE: &str = "metrics.jsonl";

pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Append to the run's log. On resume, lines past the resumed step (written by the run that
    /// crashed after its last checkpoint) are dropped first, so the log reads as one clean run.
    pub fn open(run_dir: &Path, resumed_step: Option<u64>) -> Result<Self> {
        let path = run_dir.join(METRICS_FILE);
        if let Some(step) = resumed_step {
            if let Ok(text) = std::fs::read_to_string(&path) {
                let kept: Vec<&str> = text
                    .lines()
                    .filter(|line| {
                        let value: Value = serde_json::from_str(line).unwrap_or(Value::Null);
                        // Events (crash, restart, rollback) stay: they are the run's history.
                        value.get("event").is_some()
                            || value.get("step").and_then(Value::as_u64).is_none_or(|s| s <= step)
                    })
                    .collect();
                let mut text = kept.join("\n");
                if !text.is_empty() {
                    text.push('\n');
                }
                std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
            }
        }
        let file =
            std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(|e| Error::io(&path, e))?;
        Ok(MetricsLog { path, file })
    }

    pub fn write(&mut self, record: Value) -> Result<()> {
        writeln!(self.file, "{record}").map_err(|e| Error::io(&self.path, e))
    }
}

/// Append one event line without holding the log open (used by the supervisor).
pub fn append_event(run_dir: &Path, record: Value) -> Result<()> {
    let path = run_dir.join(METRICS_FILE);
    let mut file =
        std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(|e| Error::io(&path, e))?;
    writeln!(file, "{record}").map_err(|e| Error::io(&path, e))
}
