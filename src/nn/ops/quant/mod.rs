//! Products with weights kept in GGUF's quantized blocks, on integer dot products.
//!
//! `y = x·Wᵀ` with `W` a [`QMatrix`] (`Q4_0`, `Q4_1`, `Q8_0`, `Q4_K`, `Q6_K`, the file's bytes
//! as they are): each row of `x` is first quantized to 8-bit blocks ([`act`]; two per 32 values
//! by default, see [`activation_digits`]), then every output
//! is one dot product of a weight row with an activation row, summed in integers per block and
//! scaled in `f32` (the math in [`scalar`]). Decoding (one row of `x`) and prefill (many) run
//! the same loop, parallel over groups of weight rows; in a prefill each group's rows stay in L1
//! while every activation row passes by, so the weights are read from memory once per product.
//!
//! Error against the `f32` product of the dequantized weights: the weights are exact (the
//! blocks' values are what dequantization gives), and only the activations are rounded, by at
//! most `max|x_b| / 254` per block with one 8-bit block (`/ 254²` with two), so
//! `|y − x·deq(W)ᵀ| ≤ Σ_blocks max|x_b| / 254^digits · Σ |w_b|`; the tests check that bound.
//!
//! Kernels, picked once per process by [`kernel`] (`LMFORGE_QUANT_KERNEL=vnni|scalar` forces
//! one): `vnni` (AVX512-VNNI `vpdpbusd`, [`vnni`]) where the CPU has it, `scalar` everywhere.
//! AMX-INT8 (`tdpbusd`) is absent: the machine lmforge is developed on has no AMX to test a
//! kernel on.
//!
//! Inference only: the product has no backward (it returns an error naming the cure: load the
//! model dequantized, which training does).

pub mod act;
mod format;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod vnni;

#[cfg(test)]
mod tests;

pub use format::{QFormat, QMatrix};

use std::sync::{Arc, OnceLock};

use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use act::Q8Block;

use super::parallel;

/// The environment variable that forces a kernel: `vnni` or `scalar`.
pub const KERNEL_ENV: &str = "LMFORGE_QUANT_KERNEL";

/// The environment variable that sets the activations' precision: `16` (two 8-bit blocks per
/// 32 values, the default) or `8` (one, as llama.cpp).
pub const ACTIVATIONS_ENV: &str = "LMFORGE_QUANT_ACTIVATIONS";

/// 8-bit activation blocks per 32 values: 2 (about 16-bit precision: the greedy answers of the
/// `f32` product), or 1 with `LMFORGE_QUANT_ACTIVATIONS=8` (llama.cpp's precision and speed).
/// Decided once.
pub fn activation_digits() -> Result<usize> {
    static DIGITS: OnceLock<std::result::Result<usize, String>> = OnceLock::new();
    let parse = |v: Option<String>| match v.as_deref().map(str::trim) {
        None | Some("") | Some("16") => Ok(2),
        Some("8") => Ok(1),
        Some(other) => Err(format!("{ACTIVATIONS_ENV}={other}: expected 8 or 16\nHINT: unset it for 16")),
    };
    DIGITS.get_or_init(|| parse(std::env::var(ACTIVATIONS_ENV).ok())).clone().map_err(candle_core::Error::Msg)
}

/// Which kernel runs the quantized products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantKernel {
    /// AVX512-VNNI `vpdpbusd`, 32 values per instruction.
    Vnni,
    /// Portable integer code.
    Scalar,
}

/// The kernel of this process: the fastest this CPU runs, or the one `LMFORGE_QUANT_KERNEL`
/// names (an error if this CPU cannot run it). Decided once.
pub fn kernel() -> Result<QuantKernel> {
    static SELECTED: OnceLock<std::result::Result<QuantKernel, String>> = OnceLock::new();
    SELECTED.get_or_init(|| select(std::env::var(KERNEL_ENV).ok().as_deref())).clone().map_err(candle_core::Error::Msg)
}

fn vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        vnni::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The kernel for a forced name (`None`: the best available).
fn select(forced: Option<&str>) -> std::result::Result<QuantKernel, String> {
    let vnni = vnni_available();
    match forced.map(|v| v.trim().to_ascii_lowercase()).filter(|v| !v.is_empty()).as_deref() {
        None if vnni => Ok(QuantKernel::Vnni),
        None | Some("scalar") => Ok(QuantKernel::Scalar),
        Some("vnni") if vnni => Ok(QuantKernel::Vnni),
        Some("vnni") => Err(format!(
            "{KERNEL_ENV}=vnni, but this CPU (or LMFORGE_ISA) has no AVX512-VNNI\nHINT: unset {KERNEL_ENV}, or set it to scalar"
        )),
        Some(other) => Err(format!("{KERNEL_ENV}={other}: unknown kernel\nHINT: use vnni or scalar, or unset it")),
    }
}

/// What runs the quantized products, in words (for `bench` to print).
pub fn describe() -> String {
    let activations = match activation_digits() {
        Ok(1) => "8-bit activations (one block per 32 values, as llama.cpp)",
        Ok(_) => "16-bit activations (two 8-bit blocks per 32 values)",
        Err(_) => "activations: see the error",
    };
    match kernel() {
        Ok(QuantKernel::Vnni) => format!("AVX512-VNNI (vpdpbusd), {activations}"),
        Ok(QuantKernel::Scalar) => format!("scalar integer dot products, {activations}"),
        Err(e) => format!("none: {e}"),
    }
}

/// `Σ_i w_i·x_i` of weight row `row` and one activation row, on `kernel`.
#[inline]
fn dot(kernel: QuantKernel, format: QFormat, row: &[u8], act: &[Q8Block], digits: usize) -> f32 {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Vnni` is selected only where `vnni::available()`; `act` covers the row.
        QuantKernel::Vnni => unsafe { vnni::dot(format, row, act, digits) },
        _ => scalar::dot(format, row, act, digits),
    }
}

/// Values of the weight per parallel task: tens of microseconds of work.
const TASK_VALUES: usize = 16_384;

/// `out = x·Wᵀ` for `x` of `tokens` rows of `w.cols` values; `out` is `(tokens, w.rows)`;
/// `digits` activation blocks per 32 values.
pub fn matmul(kernel: QuantKernel, digits: usize, x: &[f32], w: &QMatrix, out: &mut [f32]) {
    let (rows, cols) = w.dims();
    let blocks = cols / Q8Block::LEN * digits;
    let tokens = x.len() / cols;
    debug_assert_eq!(out.len(), tokens * rows);
    let mut act = vec![Q8Block::ZERO; tokens * blocks];
    let tokens_per_task = tokens.div_ceil(parallel::threads()).max(1);
    parallel::for_each_chunk(&mut act, tokens_per_task * blocks, |i, chunk| {
        for (t, blocks_of_t) in chunk.chunks_exact_mut(blocks).enumerate() {
            act::quantize_row(&x[(i * tokens_per_task + t) * cols..][..cols], blocks_of_t, digits);
        }
    });
    let rows_per_task = (TASK_VALUES / cols).clamp(1, rows.max(1));
    let out = SharedOut(out.as_mut_ptr());
    parallel::for_each(rows.div_ceil(rows_per_task), |task| {
        let first = task * rows_per_task;
        let last = (first + rows_per_task).min(rows);
        for (t, act) in act.chunks_exact(blocks).enumerate() {
            for r in first..last {
                // SAFETY: `(t, r)` is inside `out` (`tokens × rows`), and each task writes only
                // its own rows `first..last`.
                unsafe { out.write(t * rows + r, dot(kernel, w.format(), w.row(r), act, digits)) };
            }
        }
    });
}

/// The output of [`matmul`], written by all tasks at once (each to its own rows).
struct SharedOut(*mut f32);
// SAFETY: the tasks write disjoint elements, and the loop ends before `out` is used again.
unsafe impl Sync for SharedOut {}
impl SharedOut {
    /// # Safety
    /// `i` is in bounds, and no other thread touches it.
    unsafe fn write(&self, i: usize, value: f32) {
        // SAFETY: the caller's contract.
        unsafe { *self.0.add(i) = value };
    }
}

/// `(…, in)` → `(…, out)`: `x·Wᵀ` for a quantized `W` `(out, in)`, on this process's
/// [`kernel`]. `x` is computed in `f32` (half types are converted); CPU only.
pub fn qmatmul(x: &Tensor, w: &Arc<QMatrix>) -> Result<Tensor> {
    let (_, cols) = w.dims();
    if x.dim(candle_core::D::Minus1)? != cols {
        bail!(
            "quantized linear: input has {} features, the weight {:?} expects {cols}",
            x.dim(candle_core::D::Minus1)?,
            w
        )
    }
    let dtype = x.dtype();
    let tokens = x.elem_count() / cols.max(1);
    if tokens >= DEQUANTIZED_FROM_TOKENS {
        let y = super::linear(&x.to_dtype(DType::F32)?, &w.dequantize()?, None)?;
        return y.to_dtype(dtype);
    }
    let (kernel, digits) = (kernel()?, activation_digits()?);
    let y = x.to_dtype(DType::F32)?.contiguous()?.apply_op1(QMatMul { w: w.clone(), kernel, digits })?;
    y.to_dtype(dtype)
}

/// From this many tokens in one product (a prefill chunk), [`qmatmul`] dequantizes the matrix
/// for the call and runs the `f32` GEMM: unpacking it once costs about as much as a few tokens'
/// integer dot products, and the GEMM reuses each weight from cache across tokens. The integer
/// kernels take one dot product per (token, row) and unpack every weight block again for each
/// token. On SmolLM2 Q4_1, 512-token prefill ran at 113 tok/s on the integer kernels; the
/// dequantized GEMM ran at 760. Only the one matrix being multiplied is ever held in `f32`.
pub const DEQUANTIZED_FROM_TOKENS: usize = 32;

struct QMatMul {
    w: Arc<QMatrix>,
    kernel: QuantKernel,
    digits: usize,
}

impl CustomOp1 for QMatMul {
    fn name(&self) -> &'static str {
        "quantized-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::storage_slice::<f32>("quantized linear", storage, layout)?;
        let (rows, _) = self.w.dims();
        let mut dims = layout.shape().dims().to_vec();
        *dims.last_mut().expect("checked: the input has a feature dim") = rows;
        let shape = Shape::from(dims);
        // SAFETY: `matmul` writes every output.
        let mut out = unsafe { super::output_buffer::<f32>(shape.elem_count()) };
        matmul(self.kernel, self.digits, x, &self.w, &mut out);
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, _dy: &Tensor) -> Result<Option<Tensor>> {
        Err(candle_core::Error::Msg(format!(
            "a quantized ({}) weight has no gradient: quantized models are for inference\n\
             HINT: training loads a GGUF file dequantized to f32 (`lmforge train --init-from FILE.gguf`)",
            self.w.format()
        )))
    }
}
