//! Data-parallel training across processes: the collectives the training loop needs, behind one
//! small trait, so the transport (MPI today, NCCL for GPUs later) is a detail of one file.
//!
//! The loop uses the [`Collectives`] in a few fixed places and nowhere else:
//!
//! | when | collective | why |
//! |---|---|---|
//! | start | [`Collectives::agree`] on the run config, data and starting weights | ranks that disagree would train different models; refused before the first step |
//! | start | [`Collectives::barrier`] | rank 0 alone prepares the run directory (tokenizer, token shards) |
//! | every step | [`average_gradients`] (bucketed [`Collectives::all_reduce_sum`]) | the mean gradient of the global batch, identical on every rank |
//! | every step | [`Collectives::sum_f64`] of the losses | the loss the guard judges (and rollback decides on) is the global one |
//! | every checkpoint | [`Collectives::agree`] on a weight checksum, then barriers | a drifted rank is an error, not a silently averaged model; rank 0 writes alone |
//!
//! Every rank must call the same collectives in the same order; the loop guarantees it by
//! taking every branching decision (rollback, evaluation, saving) from values that are identical
//! on every rank.

mod gradients;
#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "mpi")]
mod watchdog;

use std::time::Duration;

use crate::error::{Error, Result};

pub use gradients::{average_gradients, weights_checksum, GRADIENT_BUCKET};

/// The exit status of a rank whose collective waited past its timeout: a lost or hung peer. Not
/// 1 (a reported error, which the supervisor does not retry), so the supervisor restarts the job.
pub const LOST_PEER_EXIT: i32 = 75;

/// How long a collective may wait for its peers by default before the job is aborted.
pub const DEFAULT_COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(300);

/// How long a barrier may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// The collective timeout applies: the peers are doing what this rank did (a training step,
    /// a checkpoint save), so a long wait means a lost peer.
    Bounded,
    /// No timeout: rank 0 does one-off work the others wait for (training the tokenizer,
    /// preparing the token shards), which may take as long as the corpus needs.
    Unbounded,
}

/// The collectives of data-parallel training over `ranks()` processes.
///
/// Implementations: [`SingleProcess`] (one rank; every collective is the identity) and, with
/// the `mpi` feature, MPI (`src/distributed/mpi.rs`). A GPU transport (NCCL) implements the
/// same methods over device buffers.
pub trait Collectives {
    /// This process's rank, `0..ranks()`; rank 0 writes checkpoints and logs.
    fn rank(&self) -> usize;
    /// The number of ranks in the job (the world size).
    fn ranks(&self) -> usize;
    /// Sum `buffer` element-wise over all ranks, in place. Every rank receives the same bits:
    /// a rank that rounded differently would drift from the others.
    fn all_reduce_sum(&self, buffer: &mut [f32]) -> Result<()>;
    /// [`Collectives::all_reduce_sum`] for f64 (losses, token counts, flags).
    fn sum_f64(&self, buffer: &mut [f64]) -> Result<()>;
    /// Overwrite `bytes` on every rank with rank 0's.
    fn broadcast(&self, bytes: &mut [u8]) -> Result<()>;
    /// Wait until every rank has arrived.
    fn barrier(&self, wait: Wait) -> Result<()>;
    /// Seconds this rank has spent inside collectives so far (communication plus waiting for
    /// slower peers), for the per-step `comm_s` metric.
    fn seconds_in_collectives(&self) -> f64 {
        0.0
    }

    /// Check that every rank holds the same `value` (a hash of `what`); on any difference,
    /// every rank returns the same error naming the ranks that differ from rank 0, so none is
    /// left waiting in a later collective.
    fn agree(&self, what: &str, value: u64) -> Result<()> {
        let mut root = value.to_le_bytes();
        self.broadcast(&mut root)?;
        let mut differs = vec![0.0; self.ranks()];
        differs[self.rank()] = if u64::from_le_bytes(root) == value { 0.0 } else { 1.0 };
        self.sum_f64(&mut differs)?;
        let ranks: Vec<String> =
            differs.iter().enumerate().filter(|(_, &d)| d > 0.0).map(|(rank, _)| rank.to_string()).collect();
        if ranks.is_empty() {
            return Ok(());
        }
        Err(Error::Distributed(format!("rank(s) {} disagree with rank 0 on {what}", ranks.join(", "))))
    }
}

/// One process: every collective is the identity.
pub struct SingleProcess;

impl Collectives for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn ranks(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _: &mut [u8]) -> Result<()> {
        Ok(())
    }
    fn barrier(&self, _: Wait) -> Result<()> {
        Ok(())
    }
}

/// Which rows of every global batch this process trains on: rank `rank` of `ranks` takes the
/// `rank`-th of `ranks` equal, consecutive slices. The global batch, and so the data position,
/// is the same for any number of ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub ranks: usize,
}

impl Shard {
    /// The whole batch (one process).
    pub const WHOLE: Shard = Shard { rank: 0, ranks: 1 };

    /// The slice of `collectives`' rank.
    pub fn of(collectives: &dyn Collectives) -> Shard {
        Shard { rank: collectives.rank(), ranks: collectives.ranks() }
    }

    /// Rows of a global batch of `batch_size` this rank takes; an error unless the ranks split
    /// it evenly (unequal slices would weight some rows more than others in the mean gradient).
    pub fn rows(&self, batch_size: usize) -> Result<usize> {
        if !batch_size.is_multiple_of(self.ranks) {
            return Err(Error::Distributed(format!(
                "batch_size {batch_size} is not divisible by the {} ranks: each rank trains on an equal slice of every global batch\nHINT: use a batch_size that is a multiple of {} (it is the global batch, the same for any number of ranks)",
                self.ranks, self.ranks
            )));
        }
        Ok(batch_size / self.ranks)
    }
}

/// Whether this process was started by an MPI launcher (`mpirun`, `mpiexec`, `srun`): each
/// sets its rank in the environment. Without one, MPI would start a lone "singleton" rank and
/// `--data-parallel` would silently train alone.
pub fn launched_by_mpi() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE"].iter().any(|name| std::env::var_os(name).is_some())
}

/// The collectives of the MPI job this process is a rank of. `timeout`: how long a bounded
/// collective may wait before the job is aborted with [`LOST_PEER_EXIT`].
pub fn connect(timeout: Duration) -> Result<Box<dyn Collectives>> {
    if !launched_by_mpi() {
        return Err(Error::Distributed(
            "--data-parallel needs an MPI launcher, and this process was not started by one\nHINT: start every rank with `mpirun -np N lmforge train --data-parallel ...`, or let lmforge start them (and restart them after a crash) with `lmforge train --ranks N ...`".into(),
        ));
    }
    connect_mpi(timeout)
}

#[cfg(feature = "mpi")]
fn connect_mpi(timeout: Duration) -> Result<Box<dyn Collectives>> {
    Ok(Box::new(mpi::MpiWorld::init(timeout)?))
}

#[cfg(not(feature = "mpi"))]
fn connect_mpi(_: Duration) -> Result<Box<dyn Collectives>> {
    Err(Error::Distributed(
        "this lmforge was built without MPI support\nHINT: build it with `cargo build --release --features mpi` (needs an MPI library and libclang; on Debian: apt-get install openmpi-bin libopenmpi-dev libclang-dev)".into(),
    ))
}

/// A 64-bit FNV-1a hash of `bytes`: cheap, stable across platforms and releases, and enough to
/// tell apart configs or weights that differ (not a defence against an adversary).
pub fn fingerprint(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_process_agrees_with_itself_and_keeps_its_buffers() {
        let one = SingleProcess;
        one.agree("anything", 42).unwrap();
        let mut values = [1.5f32, -2.0];
        one.all_reduce_sum(&mut values).unwrap();
        assert_eq!(values, [1.5, -2.0]);
    }

    #[test]
    fn a_batch_must_split_evenly_across_ranks() {
        assert_eq!(Shard { rank: 1, ranks: 4 }.rows(8).unwrap(), 2);
        let error = Shard { rank: 0, ranks: 2 }.rows(5).unwrap_err().to_string();
        assert!(error.contains("batch_size 5 is not divisible by the 2 ranks") && error.contains("HINT"), "{error}");
    }

    #[test]
    fn fingerprints_differ_for_different_bytes() {
        assert_eq!(fingerprint(b"abc"), fingerprint(b"abc"));
        assert_ne!(fingerprint(b"abc"), fingerprint(b"abd"));
    }
}
