//! How the process hands host memory back to the system.
//!
//! The `lmforge` binary keeps freed memory for reuse (`main.rs`: a training step frees and
//! allocates the same large tensors every step), so resident memory stays at its peak. Where a
//! large set of tensors is dropped for good — the `f32` weights after a model is converted to
//! bf16, a rehearsal's model after it is measured — that peak would be the wrong number to
//! keep (and to report), so those places release the free memory explicitly.

/// Hand the allocator's free memory back to the system (glibc's `malloc_trim`; a no-op
/// elsewhere).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: no arguments beyond a pad size; glibc only releases memory no one holds.
    unsafe {
        libc::malloc_trim(0);
    }
}
