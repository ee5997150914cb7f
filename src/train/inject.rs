//! Fault injection, so tests can prove that each recovery path works: `nan@step=40` makes the
//! loss of step 40 NaN, `spike@step=50` multiplies it by 10, `crash@step=60` aborts the worker
//! process, `hang@step=70` stops the worker (a rank that never reaches the next collective).
//! In data-parallel training a fault fires on rank 0 unless one is named: `nan@step=40,rank=1`.
//! Each fault fires once per run: before acting, it is recorded in `RUN/injections.json`
//! (`RUN/injections.rank-R.json` for rank R > 0), so the step that is replayed after recovery
//! runs clean.

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
    Hang,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Fault {
    pub kind: FaultKind,
    pub step: u64,
    /// The data-parallel rank it fires on.
    #[serde(default)]
    pub rank: usize,
}

impl FromStr for Fault {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let bad = || {
            Error::Input(format!(
                "--inject {text}: expected KIND@step=N or KIND@step=N,rank=R with KIND one of nan, spike, crash, hang"
            ))
        };
        let (kind, at) = text.split_once('@').ok_or_else(bad)?;
        let kind = match kind {
            "nan" => FaultKind::Nan,
            "spike" => FaultKind::Spike,
            "crash" => FaultKind::Crash,
            "hang" => FaultKind::Hang,
            _ => return Err(bad()),
        };
        let (step, rank) = match at.split_once(',') {
            Some((step, rank)) => (step, rank.strip_prefix("rank=").and_then(|r| r.parse().ok()).ok_or_else(bad)?),
            None => (at, 0),
        };
        let step = step.strip_prefix("step=").and_then(|n| n.parse().ok()).ok_or_else(bad)?;
        Ok(Fault { kind, step, rank })
    }
}

/// The faults planned for one rank of a run and the record of those already fired.
pub struct Injector {
    planned: Vec<Fault>,
    rank: usize,
    record: PathBuf,
    fired: BTreeSet<Fault>,
}

impl Injector {
    /// The faults of `planned` that fire on `rank` (0 in one process).
    pub fn new(planned: Vec<Fault>, run_dir: &Path, rank: usize) -> Result<Self> {
        let record = match rank {
            0 => run_dir.join("injections.json"),
            r => run_dir.join(format!("injections.rank-{r}.json")),
        };
        let fired = match std::fs::read_to_string(&record) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| Error::checkpoint(&record, format!("not a valid injection record: {e}")))?,
            Err(_) => BTreeSet::new(),
        };
        Ok(Injector { planned, rank, record, fired })
    }

    /// The fault to apply at `step`, if one is planned and has not fired; marks it fired.
    pub fn take(&mut self, kind: FaultKind, step: u64) -> Result<bool> {
        let fault = Fault { kind, step, rank: self.rank };
        if !self.planned.contains(&fault) || self.fired.contains(&fault) {
            return Ok(false);
        }
        self.fired.insert(fault);
        let text = serde_json::to_string(&self.fired).expect("faults serialise");
        std::fs::write(&self.record, text).map_err(|e| Error::io(&self.record, e))?;
        Ok(true)
    }
}
