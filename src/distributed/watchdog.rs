//! A deadline on blocking collectives.
//!
//! An MPI collective blocks until every rank has joined it, forever if one never does: a peer
//! that hangs (a stuck file system, a stopped process, a machine that vanished without closing
//! its sockets) would hang the whole job, and the supervisor, which restarts crashed jobs,
//! would wait with it. A thread watches the collective in progress; past the deadline it ends
//! this rank with [`LOST_PEER_EXIT`](super::LOST_PEER_EXIT), which makes the launcher (`mpirun`)
//! tear the job down and the supervisor restart it from the newest checkpoint.
//!
//! The thread never calls MPI (the main thread may be inside it); `_exit` skips the atexit
//! handlers, one of which (MPI's) could itself wait for the lost peer.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Watchdog {
    /// Milliseconds since `epoch` when the collective in progress started; 0 = none.
    since_ms: Arc<AtomicU64>,
    /// What the collective in progress is, for the message.
    what: Arc<Mutex<&'static str>>,
    epoch: Instant,
}

impl Watchdog {
    /// Start watching: a collective of rank `rank` that takes longer than `timeout` ends the
    /// process.
    pub fn start(rank: usize, timeout: Duration) -> Self {
        let since_ms = Arc::new(AtomicU64::new(0));
        let what = Arc::new(Mutex::new(""));
        let epoch = Instant::now();
        let (since, label) = (since_ms.clone(), what.clone());
        let poll = (timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        std::thread::Builder::new()
            .name("collective-watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(poll);
                let started = since.load(Ordering::Acquire);
                let now = epoch.elapsed().as_millis() as u64;
                if started != 0 && now.saturating_sub(started) > timeout.as_millis() as u64 {
                    let what = *label.lock().unwrap_or_else(|e| e.into_inner());
                    eprintln!(
                        "error: rank {rank}: the {what} waited {:.0} s for the other ranks (collective timeout {} s): a rank is lost or hung; ending this rank so the job restarts\nHINT: raise --collective-timeout if a rank legitimately takes longer (a checkpoint save on slow storage)",
                        (now - started) as f64 / 1000.0,
                        timeout.as_secs()
                    );
                    let _ = std::io::stderr().flush();
                    end_process();
                }
            })
            .expect("spawning the collective watchdog");
        Watchdog { since_ms, what, epoch }
    }

    /// Run `collective` under the deadline.
    pub fn watch<T>(&self, what: &'static str, collective: impl FnOnce() -> T) -> T {
        *self.what.lock().unwrap_or_else(|e| e.into_inner()) = what;
        let now = (self.epoch.elapsed().as_millis() as u64).max(1);
        self.since_ms.store(now, Ordering::Release);
        let result = collective();
        self.since_ms.store(0, Ordering::Release);
        result
    }
}

fn end_process() -> ! {
    #[cfg(unix)]
    // SAFETY: `_exit` ends the process at once; nothing of this process runs after it.
    unsafe {
        libc::_exit(super::LOST_PEER_EXIT)
    }
    #[cfg(not(unix))]
    std::process::exit(super::LOST_PEER_EXIT)
}
