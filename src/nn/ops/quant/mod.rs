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
//! most `max|x_b| / 254` per block with one 8-bit block (`/ 65024` with 16 bits, within `/ 254²`), so
//! `|y − x·deq(W)ᵀ| ≤ Σ_blocks max|x_b| / 254^digits · Σ |w_b|`; the tests check that bound.
//!
//! Kernels, picked once per process by [`kernel`] (`LMFORGE_QUANT_KERNEL=vnni|scalar` forces
//! one): `vnni` (AVX512-VNNI `vpdpbusd`, [`vnni`]) where the CPU has it, `scalar` everywhere.
//! AMX-INT8 (`tdpbusd`) is absent: the machine lmforge is developed on has no AMX to test a
//! kernel on.
//!
//! Inference only: the product has no backward (it returns an error naming the cure: load the
//! model dequantized, which training does).
//!
//! A matrix in [`QFormat::BF16`] (`--dtype bf16`) takes the same products, fused calls and
//! parallel loop, with its own dot products: [`bf16_rows`].

pub mod act;
mod bf16_rows;
mod format;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod vnni;

#[cfg(test)]
mod tests;

pub use format::{QFormat, QMatrix};

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use act::{Activations, PairLanes, Q8Block};

use super::bf16::{self, Bf16Kernel, Precision};
use super::parallel;

/// The environment variable that forces a kernel: `vnni` or `scalar`.
pub const KERNEL_ENV: &str = "LMFORGE_QUANT_KERNEL";

/// The environment variable that sets the activations' precision: `16` (the default: one
/// 16-bit value each, held as two 8-bit blocks per 32 values) or `8` (one block, as llama.cpp).
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
        Ok(_) => "16-bit activations (vpdpwssd on the 32-value formats)",
        Err(_) => "activations: see the error",
    };
    match kernel() {
        Ok(QuantKernel::Vnni) => format!("AVX512-VNNI (vpdpbusd), {activations}"),
        Ok(QuantKernel::Scalar) => format!("scalar integer dot products, {activations}"),
        Err(e) => format!("none: {e}"),
    }
}

/// `out[i] = Σ_j w[rows.start + i, j]·x_j` for a run of consecutive rows of `w` and one
/// activation row: the VNNI kernels take several rows at once, sharing the activations'
/// registers between them.
#[inline]
fn dots(kernel: QuantKernel, w: &QMatrix, rows: Range<usize>, act: Activations, digits: usize, out: &mut [f32]) {
    debug_assert_eq!(out.len(), rows.len());
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Vnni` is selected only where `vnni::available()`; `act` covers a row.
        QuantKernel::Vnni => unsafe { vnni::dots(w.format(), w.row_bytes(), w.rows_data(rows), act, digits, out) },
        _ => {
            for (o, r) in out.iter_mut().zip(rows) {
                *o = scalar::dot(w.format(), w.row(r), act.blocks, digits);
            }
        }
    }
}

/// [`act::quantize_row`] in the kernel's instructions (the same blocks, bit for bit).
#[inline]
fn quantize_row(kernel: QuantKernel, x: &[f32], out: &mut [Q8Block], digits: usize) {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Vnni` is selected only where `vnni::available()`.
        QuantKernel::Vnni => unsafe { vnni::quantize_row(x, out, digits) },
        _ => act::quantize_row(x, out, digits),
    }
}

/// Values of the weight per parallel task: tens of microseconds of work.
const TASK_VALUES: usize = 16_384;

/// `out = x·[W₀; W₁; …]ᵀ`: the products of `x` (`tokens` rows of `cols` values) with matrices
/// `ws` of `cols` columns each, their outputs side by side in each row of `out`
/// `(tokens, Σ rows)`; `digits` activation blocks per 32 values.
///
/// `x` is quantized once for all of them, and one parallel loop runs over all their rows: when
/// decoding, q, k and v (or gate and up) are then one region of the thread pool, with one wait
/// at its end, instead of three (two), each with its own quantization and wait.
///
/// [`QFormat::BF16`] matrices meet `x` rounded to bf16 instead ([`bf16_rows`], on
/// [`bf16::kernel`]'s kernel).
pub fn matmul(kernel: QuantKernel, digits: usize, x: &[f32], ws: &[&QMatrix], out: &mut [f32]) {
    let Some(cols) = ws.first().map(|w| w.dims().1) else { return };
    debug_assert!(ws.iter().all(|w| w.dims().1 == cols), "quant::matmul: matrices of different widths");
    let width: usize = ws.iter().map(|w| w.dims().0).sum();
    let is_bf16 = |w: &&QMatrix| w.format() == QFormat::BF16;
    let blocks = if ws.iter().all(is_bf16) { 0 } else { cols / Q8Block::LEN * digits };
    let tokens = x.len() / cols;
    debug_assert_eq!(out.len(), tokens * width);
    let rounded = bf16_input(ws.iter().any(is_bf16), x);
    // Checked by `qmatmul_each` before it gets here; the portable kernel runs anywhere.
    let bf16_kernel = bf16::kernel().unwrap_or(Bf16Kernel::F32);
    let mut act = vec![Q8Block::ZERO; tokens * blocks];
    let tokens_per_task = tokens.div_ceil(parallel::threads()).max(1);
    parallel::for_each_chunk(&mut act, (tokens_per_task * blocks).max(1), |i, chunk| {
        for (t, blocks_of_t) in chunk.chunks_exact_mut(blocks).enumerate() {
            quantize_row(kernel, &x[(i * tokens_per_task + t) * cols..][..cols], blocks_of_t, digits);
        }
    });
    let lanes: Vec<PairLanes> = match kernel {
        QuantKernel::Vnni if blocks > 0 => {
            act.chunks_exact(blocks).flat_map(|a| PairLanes::of_row(a, digits)).collect()
        }
        _ => Vec::new(),
    };
    let pairs = lanes.len() / tokens.max(1);
    // (matrix, its rows, where they go in an output row), about `TASK_VALUES` weights each.
    let rows_per_task = (TASK_VALUES / cols.max(1)).max(1);
    let mut tasks = Vec::new();
    let mut offset = 0;
    for (m, w) in ws.iter().enumerate() {
        let rows = w.dims().0;
        tasks.extend((0..rows).step_by(rows_per_task).map(|first| (m, first..rows.min(first + rows_per_task), offset)));
        offset += rows;
    }
    let out = SharedOut(out.as_mut_ptr());
    parallel::for_each(tasks.len(), |task| {
        let (m, rows, offset) = tasks[task].clone();
        for t in 0..tokens {
            // SAFETY: inside `out` (`tokens × width`); each task writes only its own rows.
            let out = unsafe { out.slice(t * width + offset + rows.start, rows.len()) };
            if is_bf16(&ws[m]) {
                bf16_rows::dots(bf16_kernel, ws[m], rows.clone(), &rounded[t * cols..][..cols], out);
                continue;
            }
            let blocks = &act[t * blocks..][..blocks];
            let lanes = lanes.get(t * pairs..(t + 1) * pairs).unwrap_or_default();
            dots(kernel, ws[m], rows.clone(), Activations { blocks, lanes }, digits, out);
        }
    });
}

/// `x` rounded to bf16 once for the product, when a matrix of it is [`QFormat::BF16`] (else
/// nothing).
fn bf16_input(needed: bool, x: &[f32]) -> Vec<u16> {
    if !needed {
        return Vec::new();
    }
    let mut rounded = vec![0u16; x.len()];
    parallel::for_each_chunk(&mut rounded, parallel::TASK_ELEMENTS, |i, chunk| {
        bf16_rows::round_row(&x[i * parallel::TASK_ELEMENTS..][..chunk.len()], chunk);
    });
    rounded
}

/// The output of [`matmul`], written by all tasks at once (each to its own rows).
struct SharedOut(*mut f32);
// SAFETY: the tasks write disjoint elements, and the loop ends before `out` is used again.
unsafe impl Sync for SharedOut {}
impl SharedOut {
    /// # Safety
    /// `start..start + len` is in bounds, and no other thread touches it.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, start: usize, len: usize) -> &mut [f32] {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

/// `(…, in)` → `(…, out)`: `x·Wᵀ` for a quantized `W` `(out, in)`, on this process's
/// [`kernel`]. `x` is computed in `f32` (half types are converted); CPU only.
pub fn qmatmul(x: &Tensor, w: &Arc<QMatrix>) -> Result<Tensor> {
    let mut y = qmatmul_each(x, std::slice::from_ref(w))?;
    Ok(y.pop().expect("one output per matrix"))
}

/// `(…, in)` → `[(…, out₀), (…, out₁), …]`: `x·Wᵢᵀ` for several quantized matrices of `x`'s
/// width (q, k and v; gate and up) as one product ([`matmul`]: `x` quantized once, one
/// parallel loop). Below [`DEQUANTIZED_FROM_TOKENS`] the outputs are views of one tensor.
pub fn qmatmul_each(x: &Tensor, ws: &[Arc<QMatrix>]) -> Result<Vec<Tensor>> {
    let features = x.dim(candle_core::D::Minus1)?;
    if ws.is_empty() {
        return Ok(Vec::new());
    }
    if let Some(w) = ws.iter().find(|w| w.dims().1 != features) {
        bail!("quantized linear: input has {features} features, the weight {w:?} expects {}", w.dims().1)
    }
    let dtype = x.dtype();
    let tokens = x.elem_count() / features.max(1);
    if ws.iter().any(|w| w.format() == QFormat::BF16) {
        bf16::kernel()?;
    }
    if tokens >= DEQUANTIZED_FROM_TOKENS {
        let x = x.to_dtype(DType::F32)?;
        return ws
            .iter()
            .map(|w| {
                // A bf16 matrix keeps its bf16 products: the GEMM rounds `x` as it packs it.
                let _scope = (w.format() == QFormat::BF16).then(|| Precision::Bf16.enter()).transpose()?;
                super::linear(&x, &w.dequantize()?, None)?.to_dtype(dtype)
            })
            .collect();
    }
    let (kernel, digits) = (kernel()?, activation_digits()?);
    let op = QMatMul { ws: ws.to_vec(), kernel, digits };
    let y = x.to_dtype(DType::F32)?.contiguous()?.apply_op1(op)?.to_dtype(dtype)?; // (…, Σ out)
    let mut start = 0;
    ws.iter()
        .map(|w| {
            let rows = w.dims().0;
            start += rows;
            y.narrow(candle_core::D::Minus1, start - rows, rows)
        })
        .collect()
}

/// From this many tokens in one product (a prefill chunk), [`qmatmul`] dequantizes the matrix
/// for the call and runs the `f32` GEMM: unpacking it once costs about as much as a few tokens'
/// integer dot products, and the GEMM reuses each weight from cache across tokens. The integer
/// kernels take one dot product per (token, row) and unpack every weight block again for each
/// token. On SmolLM2 Q4_1, 512-token prefill ran at 113 tok/s on the integer kernels; the
/// dequantized GEMM ran at 760. Only the one matrix being multiplied is ever held in `f32`.
pub const DEQUANTIZED_FROM_TOKENS: usize = 32;

struct QMatMul {
    ws: Vec<Arc<QMatrix>>,
    kernel: QuantKernel,
    digits: usize,
}

impl CustomOp1 for QMatMul {
    fn name(&self) -> &'static str {
        "quantized-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::storage_slice::<f32>("quantized linear", storage, layout)?;
        let rows = self.ws.iter().map(|w| w.dims().0).sum();
        let mut dims = layout.shape().dims().to_vec();
        *dims.last_mut().expect("checked: the input has a feature dim") = rows;
        let shape = Shape::from(dims);
        // SAFETY: `matmul` writes every output.
        let mut out = unsafe { super::output_buffer::<f32>(shape.elem_count()) };
        let ws: Vec<&QMatrix> = self.ws.iter().map(|w| &**w).collect();
        matmul(self.kernel, self.digits, x, &ws, &mut out);
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, _dy: &Tensor) -> Result<Option<Tensor>> {
        if self.ws.iter().any(|w| w.format() == QFormat::BF16) {
            return Err(candle_core::Error::Msg(
                "a weight held in bf16 for inference (`--dtype bf16`) has no gradient\n\
                 HINT: training holds f32 weights; for bf16 products there, use `lmforge train --precision bf16`"
                    .to_string(),
            ));
        }
        Err(candle_core::Error::Msg(format!(
            "a quantized ({}) weight has no gradient: quantized models are for inference\n\
             HINT: training loads a GGUF file dequantized to f32 (`lmforge train --init-from FILE.gguf`)",
            self.ws[0].format()
        )))
    }
}
