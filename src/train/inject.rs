//! Fault injection, so tests can prove that each recovery path works: `nan@step=40` makes the
//! loss of step 40 NaN, `spike@step=50` multiplies it by 10, `crash@step=60` aborts the worker
//! process. Each fault fires once per run: before acting, it is recorded in
//! `RUN/injections.json`, so the step that is replayed after recovery runs clean.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    Nan,
    Spike,
    Crash,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Fault {
    pub kind: FaultKind,
    pub step: u64,
}

impl FromStr for Fault {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let bad = || Error::Input(format!("--inject {text}: expected KIND@step=N with KIND one of nan, spike, crash"));
        let (kind, at) = text.split_once('@').ok_or_else(bad)?;
        let kind = match kind {
            "nan" => FaultKind::Nan,
            "spike" => FaultKind::Spike,
            "crash" => FaultKind::Crash,
            _ => return Err(bad()),
        };
        let step = at.strip_prefix("step=").and_then(|n| n.parse().ok()).ok_or_else(bad)?;
        Ok(Fault { kind, step })
    }
}

/// The faults planned for a run and the record of those already fired.
pub struct Injector {
    planned: Vec<Fault>,
    record: PathBuf,
    fired: BTreeSet<Fault>,
}

impl Injector {
    pub fn new(planned: Vec<Fault>, run_dir: &Path) -> Result<Self> {
        let record = run_dir.join("injections.json");
        let fired = match std::fs::read_to_string(&record) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| Error::checkpoint(&record, format!("not a valid injection record: {e}")))?,
            Err(_) => BTreeSet::new(),
        };
        Ok(Injector { planned, record, fired })
    }

    /// The fault to apply at `step`, if one is planned and has not fired; marks it fired.
    pub fn take(&mut self, kind: FaultKind, step: u64) -> Result<bool> {
        let fault = Fault { kind, step };
        if !self.planned.contains(&fault) || self.fired.contains(&fault) {
            return Ok(false);
        }
        self.fired.insert(fault);
        let text = serde_json::to_string(&self.fired).expect("faults serialise");
        std::fs::write(&self.record, text).map_err(|e| Error::io(&self.record, e))?;
        Ok(true)
    }
}
