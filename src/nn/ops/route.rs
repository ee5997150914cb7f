//! Which implementation of an op runs: its CPU kernel, or its composed formulation.
//!
//! Each op's kernels (forward and backward) are CPU code, a candle `CustomOp` with `cpu_fwd`
//! only. On any other device (a GPU) the op runs its composed formulation instead: the same
//! math from candle's primitives, which have CUDA kernels and candle's autograd, and which the
//! op's tests compare the kernel against. Every op asks here, at its entry point, and nowhere
//! else.
//!
//! Tests can run the composed formulation on the CPU ([`composed_scope`]), so that what a GPU
//! runs is checked against the kernel on any machine.

use candle_core::Device;

/// Whether an op on tensors of `device` runs its CPU kernel (else its composed formulation).
pub fn uses_cpu_kernel(device: &Device) -> bool {
    device.is_cpu() && !forced_composed()
}

#[cfg(not(test))]
fn forced_composed() -> bool {
    false
}

#[cfg(test)]
thread_local! {
    static FORCE_COMPOSED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[cfg(test)]
fn forced_composed() -> bool {
    FORCE_COMPOSED.get()
}

/// While alive, this thread's ops run their composed formulation on the CPU too, as on a GPU.
#[cfg(test)]
pub(crate) struct ComposedScope(bool);

#[cfg(test)]
pub(crate) fn composed_scope() -> ComposedScope {
    ComposedScope(FORCE_COMPOSED.replace(true))
}

#[cfg(test)]
impl Drop for ComposedScope {
    fn drop(&mut self) {
        FORCE_COMPOSED.set(self.0);
    }
}
