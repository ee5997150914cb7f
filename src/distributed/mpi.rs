//! [`Collectives`] over MPI (rsmpi, on whatever MPI library the build found: OpenMPI on Debian).
//!
//! Sums are reduced in f64 to rank 0 and broadcast from there, rather than with one
//! `MPI_Allreduce`:
//! - **Same bits on every rank.** The MPI standard only *advises* that an all-reduce give every
//!   rank the same result; its algorithms (recursive doubling, rings) may add the ranks' values
//!   in a different order on each rank, and ranks that rounded differently would drift. A
//!   reduce to one rank and a broadcast of its result give every rank the same bits by
//!   construction.
//! - **Order barely matters.** Each f32 is exact in f64 and a sum of a few of them rounds in f64
//!   far below f32's precision, so the sum of N ranks' gradients is (all but always) the same
//!   f32 whatever order the reduction took; and for a given world size the order is fixed, so a
//!   resumed run is bit-identical.
//!
//! The cost: the reduce moves f64 (twice the bytes of f32), and the broadcast of the rounded
//! f32 sums is a second pass; 12 bytes per gradient value in all.

use std::cell::Cell;
use std::time::{Duration, Instant};

use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};

use super::watchdog::Watchdog;
use super::{Collectives, Wait};
use crate::error::{Error, Result};

pub struct MpiWorld {
    world: SimpleCommunicator,
    watchdog: Watchdog,
    seconds: Cell<f64>,
    /// Finalizes MPI when dropped; declared last so the communicator goes first.
    _universe: Universe,
}

/// A write to a socket whose peer has gone must be an error MPI reports (and the launcher and
/// the watchdog act on), not a signal that ends this rank silently: the binary restores
/// `SIGPIPE`'s default action for its own output, so a rank sets it back to ignored.
fn ignore_closed_sockets() {
    // SAFETY: sets a signal's disposition; called before MPI starts its threads.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

impl MpiWorld {
    /// Join the MPI job this process was started in.
    pub fn init(timeout: Duration) -> Result<Self> {
        ignore_closed_sockets();
        let universe = mpi::initialize().ok_or_else(|| Error::Distributed("MPI was already initialised".into()))?;
        let world = universe.world();
        let watchdog = Watchdog::start(world.rank() as usize, timeout);
        Ok(MpiWorld { world, watchdog, seconds: Cell::new(0.0), _universe: universe })
    }

    /// Run `collective` under the watchdog, counting its time.
    fn timed<T>(&self, what: &'static str, collective: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        let result = self.watchdog.watch(what, collective);
        self.seconds.set(self.seconds.get() + started.elapsed().as_secs_f64());
        result
    }

    /// Sum `values` to rank 0 and broadcast the sum, in place.
    fn reduce_and_broadcast(&self, values: &mut [f64]) {
        let root = self.world.process_at_rank(0);
        if self.world.rank() == 0 {
            let mut sum = vec![0.0f64; values.len()];
            root.reduce_into_root(&*values, &mut sum[..], SystemOperation::sum());
            values.copy_from_slice(&sum);
        } else {
            root.reduce_into(&*values, SystemOperation::sum());
        }
        root.broadcast_into(values);
    }
}

impl Collectives for MpiWorld {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn ranks(&self) -> usize {
        self.world.size() as usize
    }

    fn all_reduce_sum(&self, buffer: &mut [f32]) -> Result<()> {
        self.timed("gradient all-reduce", || {
            let wide: Vec<f64> = buffer.iter().map(|&x| x as f64).collect();
            let root = self.world.process_at_rank(0);
            if self.world.rank() == 0 {
                let mut sum = vec![0.0f64; wide.len()];
                root.reduce_into_root(&wide[..], &mut sum[..], SystemOperation::sum());
                for (out, sum) in buffer.iter_mut().zip(sum) {
                    *out = sum as f32;
                }
            } else {
                root.reduce_into(&wide[..], SystemOperation::sum());
            }
            // The sums as rank 0 rounded them: half the bytes of the f64 sums, same bits.
            root.broadcast_into(buffer);
        });
        Ok(())
    }

    fn sum_f64(&self, buffer: &mut [f64]) -> Result<()> {
        self.timed("all-reduce", || self.reduce_and_broadcast(buffer));
        Ok(())
    }

    fn broadcast(&self, bytes: &mut [u8]) -> Result<()> {
        self.timed("broadcast", || self.world.process_at_rank(0).broadcast_into(bytes));
        Ok(())
    }

    fn barrier(&self, wait: Wait) -> Result<()> {
        match wait {
            Wait::Bounded => self.timed("barrier", || self.world.barrier()),
            Wait::Unbounded => self.world.barrier(),
        }
        Ok(())
    }

    fn seconds_in_collectives(&self) -> f64 {
        self.seconds.get()
    }
}
