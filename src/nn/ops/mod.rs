//! Fused ops with hand-written CPU kernels, each with its backward pass.
//!
//! Why these exist: candle's own fused ops (`softmax_last_dim`, `rms_norm`, `layer_norm`,
//! `rotary_emb::rope*`) have no backward and silently cut gradients, and the composed-op
//! versions used in [`super`] materialise every intermediate (attention builds the full
//! `T × S` score matrix three times over). Each op here is a candle `CustomOp{1,2,3}` whose
//! `cpu_fwd` runs a fused kernel and whose `bwd` computes the input gradients with another fused
//! kernel, so `Tensor::backward` works through them. The math of each forward and backward is
//! written side by side in the op's doc comment (llm.c style).
//!
//! Conventions shared by all ops:
//! - `f32` and `f64` run natively; `f16`/`bf16` inputs are converted to `f32` around the kernel
//!   (the conversion is an ordinary candle op, so gradients still flow); other dtypes are an error.
//! - Kernels run on the CPU. On another device the public functions fall back to the composed
//!   candle ops (same math, more memory) rather than failing; [`route`] decides, in one place.
//! - Inputs need not be contiguous (they are made so first).
//! - Every op is tested against central finite differences in `f64` and against the composed
//!   version in `f32` (values and every input gradient).

pub mod bf16;
pub mod blas;
pub mod cross_entropy;
pub mod dispatch;
pub mod dropout;
pub mod flash_attention;
pub mod gemm;
pub mod gemv;
pub mod linear;
pub mod norm;
pub mod parallel;
pub mod pointwise;
pub mod quant;
pub mod rope;
pub mod route;
mod simd;
mod tile;

#[cfg(test)]
mod device_tests;
#[cfg(test)]
pub(crate) mod testing;

pub use bf16::Precision;
pub use cross_entropy::{label_smoothed_cross_entropy, softmax_cross_entropy};
pub use dispatch::{combine_rows, gather_rows, grouped_linear, Dispatch};
pub use dropout::{dropout, DropoutMask};
pub use flash_attention::{flash_attention, flash_attention_qkv, flash_attention_tokens, AttentionMask};
pub use linear::{linear, linear_then};
pub use norm::{layer_norm, rms_norm};
pub use pointwise::{gelu_erf, gelu_tanh, swiglu, Epilogue};
pub use rope::{rope, rope_tokens};

use candle_core::{bail, CpuStorage, DType, Layout, Result, Storage, Tensor};

use simd::Real;

/// The data of a contiguous CPU storage as a slice of `T`, inside a `cpu_fwd` (whose public
/// entry point made its inputs contiguous).
fn storage_slice<'a, T: Real>(op: &str, storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&T::cpu_storage_as_slice(storage)?[start..end]),
        None => bail!("{op}: internal error, input is not contiguous"),
    }
}

/// A buffer of `len` values for a kernel to fill, not zeroed first.
///
/// Why: outputs are megabytes, and zeroing them is a serial `memset` on the calling thread
/// before the parallel kernel starts (measured: ~5% of a training step's CPU time, with the
/// binary keeping freed memory so that `calloc` cannot hand out fresh zero pages). Kernels that
/// write every element do not need it.
///
/// # Safety
/// The caller writes every element before any is read (as candle's own CPU backend does with
/// its uninitialised allocations).
#[allow(clippy::uninit_vec)] // deliberately: see above
unsafe fn output_buffer<T: Real>(len: usize) -> Vec<T> {
    let mut buffer = Vec::with_capacity(len);
    // SAFETY: capacity is `len`; the values are plain floats, written before use (the
    // caller's contract).
    unsafe { buffer.set_len(len) };
    buffer
}

/// Borrow the data of CPU tensors (made contiguous first) as slices for the duration of `f`.
fn with_slices<T: Real, R>(op: &'static str, tensors: &[&Tensor], f: impl FnOnce(&[&[T]]) -> Result<R>) -> Result<R> {
    let tensors = tensors.iter().map(|t| t.contiguous()).collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        let Storage::Cpu(cpu) = &**storage else {
            bail!("{op}: the fused kernel runs on the CPU, got a tensor on another device")
        };
        let start = layout.start_offset();
        slices.push(&T::cpu_storage_as_slice(cpu)?[start..start + layout.shape().elem_count()]);
    }
    f(&slices)
}

/// The dtype a kernel computes in for inputs of `dtype`: itself for `f32`/`f64`, `f32` for the
/// half types, an error otherwise.
fn compute_dtype(op: &'static str, dtype: DType) -> Result<DType> {
    match dtype {
        DType::F32 | DType::F64 => Ok(dtype),
        DType::F16 | DType::BF16 => Ok(DType::F32),
        other => Err(candle_core::Error::UnsupportedDTypeForOp(other, op)),
    }
}

/// Check that every tensor has `dtype` (naming the offender), so kernels can assume one type.
fn same_dtype(op: &'static str, dtype: DType, tensors: &[(&str, &Tensor)]) -> Result<()> {
    for (name, t) in tensors {
        if t.dtype() != dtype {
            bail!(
                "{op}: {name} has dtype {:?} but the first input has {dtype:?}\nHINT: convert both to one float dtype",
                t.dtype()
            )
        }
    }
    Ok(())
}
