//! `lmforge train --data-parallel` (one rank, started by an MPI launcher) and the launcher
//! command of `lmforge train --ranks N`.

use std::path::Path;
use std::time::Duration;

use anyhow::bail;
use lmforge::distributed::{self, DEFAULT_COLLECTIVE_TIMEOUT};
use lmforge::train::inject::Fault;
use lmforge::train::run_config::RunConfig;

use super::train::{announce_kernels, report_done};

/// Train as one rank of the MPI job this process belongs to. `expected_ranks`: the job's size
/// as `--ranks` asked for it.
pub fn run_rank(
    config: &RunConfig,
    resume: bool,
    faults: Vec<Fault>,
    expected_ranks: Option<usize>,
    timeout: Option<Duration>,
) -> anyhow::Result<()> {
    let collectives = distributed::connect(timeout.unwrap_or(DEFAULT_COLLECTIVE_TIMEOUT))?;
    if let Some(n) = expected_ranks.filter(|&n| n != collectives.ranks()) {
        end_rank(anyhow::anyhow!("--ranks {n}, but the MPI launcher started {} ranks", collectives.ranks()));
    }
    let leader = collectives.rank() == 0;
    if leader {
        if let Err(error) = announce_kernels(config) {
            end_rank(error);
        }
    }
    match lmforge::train::train_on(config, resume, faults, collectives.as_ref()) {
        Ok(summary) if leader => report_done(&summary),
        Ok(_) => {}
        Err(error) => end_rank(error.into()),
    }
    // Dropping the collectives finalizes MPI, which waits for every rank: all got here.
    drop(collectives);
    Ok(())
}

/// Report `error` and end this rank at once. Not by returning it: that would finalize MPI on the
/// way out, which waits for ranks that may never get there (they wait in a collective for this
/// one); the launcher ends them when it sees this rank fail.
fn end_rank(error: anyhow::Error) -> ! {
    eprintln!("error: {error:#}");
    std::process::exit(1)
}

/// The command that starts `ranks` ranks: `$LMFORGE_MPIRUN` (split at spaces, e.g.
/// `mpirun --oversubscribe`) or `mpirun`, then `-np N` and the hostfile.
pub fn launcher(ranks: usize, hostfile: Option<&Path>) -> anyhow::Result<Vec<String>> {
    if ranks == 0 {
        bail!("--ranks 0: a job needs at least one rank");
    }
    let base = std::env::var("LMFORGE_MPIRUN").unwrap_or_else(|_| "mpirun".into());
    let mut command: Vec<String> = base.split_whitespace().map(String::from).collect();
    if command.is_empty() {
        bail!("LMFORGE_MPIRUN is set but empty\nHINT: unset it, or set it to the MPI launcher, e.g. `mpirun --oversubscribe`");
    }
    command.extend(["-np".into(), ranks.to_string()]);
    if let Some(file) = hostfile {
        command.extend(["--hostfile".into(), file.display().to_string()]);
    }
    Ok(command)
}
