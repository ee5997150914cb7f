//! Mixed precision for the matrix products of the linear layers: bf16 operands, `f32`
//! accumulation (`train.precision = "bf16"`, `--precision bf16`).
//!
//! What is rounded, and when: inside [`super::gemm::gemm_in`] at [`Precision::Bf16`], each
//! operand of an `f32` product is rounded to bf16 (round to nearest, ties to even) as it is
//! packed for the micro-kernel, and the products are summed in `f32` registers; the result is
//! `f32`. For a linear layer `Y = X·Wᵀ + b` that is
//!
//! ```text
//! forward          Y  = bf16(X)·bf16(W)ᵀ + b      (the bias is added in f32)
//! input gradient   dX = bf16(dY)·bf16(W)
//! weight gradient  dW = bf16(dY)ᵀ·bf16(X)
//! ```
//!
//! and the six tile products inside flash attention (`Q·Kᵀ`, `P·V` and, in the backward,
//! `dO·Vᵀ`, `Pᵀ·dO`, `dS·K`, `dSᵀ·Q`: see `flash_attention::bf16_tiles`, which also states the
//! error bound), as PyTorch's CPU autocast runs `scaled_dot_product_attention`. Nothing else:
//! the tensors themselves are not changed, so the master weights, their gradients, the AdamW
//! moments, embeddings, norms, the attention's softmax, activations and the loss stay `f32`,
//! and a checkpoint holds the `f32` masters exactly. The weight is rounded
//! each time it is packed (forward and input gradient), which gives the same values as
//! rounding it once per step after the optimizer update. Backward treats the rounding as the
//! identity (the gradient of `bf16(x)` is taken to be 1, as in every mixed-precision recipe).
//! Unlike PyTorch's bf16 autocast, the outputs of the products are not rounded to bf16.
//!
//! Precision is chosen per thread by a scope ([`Precision::enter`]), like PyTorch's autocast:
//! the trainer enters it around the forward and backward passes and the evaluation. The
//! linear op, the grouped product of a mixture's experts ([`super::grouped_linear`]) and flash
//! attention read it once, when they run forward, and keep it for their backward, so the backward
//! products run at the precision of their forward whenever `backward()` is called.
//! Why a scope rather than a property of the weights: the weights stay `f32` (they are the
//! masters); what changes is how their products are computed, for one run.
//!
//! Kernels, picked once per process by [`kernel`] (`LMFORGE_BF16_KERNEL` forces one):
//! - `avx512-bf16`: the operands are packed as bf16 pairs (two k-adjacent values in one
//!   32-bit lane, the layout `vdpbf16ps` reads) and an 8 × 48 tile of `f32` accumulators is
//!   updated by `vdpbf16ps`, 32 multiply-adds per instruction against the `f32` kernel's 16.
//!   Subnormal inputs (below 1.2e-38) count as zero on this path (the instructions' DAZ).
//! - `f32`: the operands are rounded to bf16 values held in `f32` as they are packed, and
//!   multiplied by the `f32` kernel: the same numbers on any CPU, at `f32` speed.
//! - AMX (`tdpbf16ps` on 16 × 32 tiles, Sapphire Rapids and later) is detected and reported,
//!   but lmforge has no AMX kernel: the machine it is developed on has no AMX to test one on,
//!   and an untested inline-assembly kernel is not one to train on. Where a CPU has AMX-BF16
//!   the AVX512-BF16 kernel runs (every AMX CPU also has AVX512-BF16).

use std::cell::Cell;
use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

/// The environment variable that forces a bf16 kernel: `avx512-bf16`, `f32` (or `amx`, which
/// is refused: there is no AMX kernel).
pub const KERNEL_ENV: &str = "LMFORGE_BF16_KERNEL";

/// How the matrix products of the linear layers are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// `f32` operands (the default).
    #[default]
    F32,
    /// Operands rounded to bf16, products summed in `f32`.
    Bf16,
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(format!("unknown precision `{other}`; expected f32 or bf16")),
        }
    }
}

thread_local! {
    static CURRENT: Cell<Precision> = const { Cell::new(Precision::F32) };
}

/// The precision of this thread's scope ([`Precision::F32`] outside any).
pub fn current() -> Precision {
    CURRENT.get()
}

/// While alive, this thread's products run at the precision entered; the previous one
/// returns when it is dropped.
#[must_use = "the precision lasts only while the scope is alive"]
pub struct PrecisionScope {
    previous: Precision,
}

impl Precision {
    /// Run this thread's products at `self` until the scope is dropped. For bf16, checks first
    /// that a kernel can run it (an error when `LMFORGE_BF16_KERNEL` asks for one this CPU
    /// lacks).
    pub fn enter(self) -> candle_core::Result<PrecisionScope> {
        if self == Precision::Bf16 {
            kernel()?;
        }
        Ok(PrecisionScope { previous: CURRENT.replace(self) })
    }
}

impl Drop for PrecisionScope {
    fn drop(&mut self) {
        CURRENT.set(self.previous);
    }
}

/// An operand of a product on a device without lmforge's kernels ([`super::linear::device_linear`]):
/// cast to bf16 when this thread's precision is bf16 and it is a wider float, as it is
/// otherwise. The cast is an ordinary candle op: gradients flow through it (back in the
/// operand's own dtype).
pub fn autocast(t: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
    use candle_core::DType;
    match (current(), t.dtype()) {
        (Precision::Bf16, DType::F32 | DType::F64 | DType::F16) => t.to_dtype(DType::BF16),
        _ => Ok(t.clone()),
    }
}

/// Which kernel runs the bf16 products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// `vdpbf16ps` on bf16 pairs.
    Avx512Bf16,
    /// The `f32` kernel on operands rounded to bf16 values.
    F32,
}

/// The bf16 kernel of this process: the fastest this CPU runs, or the one `LMFORGE_BF16_KERNEL`
/// names (an error if this CPU cannot run it). Decided once.
pub fn kernel() -> candle_core::Result<Bf16Kernel> {
    #[cfg(test)]
    if let Some(kernel) = tests::FORCED.get() {
        return Ok(kernel);
    }
    static SELECTED: OnceLock<Result<Bf16Kernel, String>> = OnceLock::new();
    // `Error::Msg` itself, not `Error::msg`: the latter attaches a backtrace under
    // RUST_BACKTRACE, which the CLI would print before the message and its HINT.
    SELECTED.get_or_init(|| select(std::env::var(KERNEL_ENV).ok().as_deref())).clone().map_err(candle_core::Error::Msg)
}

/// The kernel for a forced name (`None`: the best available).
fn select(forced: Option<&str>) -> Result<Bf16Kernel, String> {
    let has_avx512_bf16 = avx512_bf16_available();
    match forced.map(|v| v.trim().to_ascii_lowercase()).filter(|v| !v.is_empty()).as_deref() {
        None if has_avx512_bf16 => Ok(Bf16Kernel::Avx512Bf16),
        None | Some("f32") => Ok(Bf16Kernel::F32),
        Some("avx512-bf16" | "avx512bf16") if has_avx512_bf16 => Ok(Bf16Kernel::Avx512Bf16),
        Some("avx512-bf16" | "avx512bf16") => Err(format!(
            "{KERNEL_ENV}=avx512-bf16, but this CPU (or LMFORGE_ISA) has no AVX512-BF16\nHINT: unset {KERNEL_ENV}, or set it to f32"
        )),
        Some("amx") => Err(format!(
            "{KERNEL_ENV}=amx, but lmforge has no AMX kernel (this CPU {} AMX-BF16)\nHINT: unset {KERNEL_ENV}: the AVX512-BF16 kernel runs where the CPU has it",
            if amx_bf16_present() { "has" } else { "lacks" }
        )),
        Some(other) => Err(format!("{KERNEL_ENV}={other}: unknown kernel\nHINT: use avx512-bf16 or f32, or unset it")),
    }
}

/// AVX512-BF16 with the AVX-512 base the kernel's packing and stores use, on the ISA that
/// `LMFORGE_ISA` leaves enabled.
fn avx512_bf16_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::simd::isa() == super::simd::Isa::Avx512 && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the CPU reports AMX-BF16 (CPUID leaf 7: EDX bit 22). Only reported: see the module
/// docs. (`is_x86_feature_detected!("amx-bf16")` is not stable Rust yet.)
fn amx_bf16_present() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // Leaf 7 exists where the maximum leaf (leaf 0's EAX) reaches it, checked first.
        use std::arch::x86_64::__cpuid_count;
        __cpuid_count(0, 0).eax >= 7 && __cpuid_count(7, 0).edx & (1 << 22) != 0
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// What runs the bf16 products, in words (for `bench` and `train` to print).
pub fn describe() -> String {
    let amx = if amx_bf16_present() { "; this CPU has AMX-BF16, for which lmforge has no kernel" } else { "" };
    let forced = std::env::var(KERNEL_ENV).ok().filter(|v| !v.trim().is_empty());
    let forced = forced.map(|v| format!(", forced by {KERNEL_ENV}={v}")).unwrap_or_default();
    match kernel() {
        Ok(Bf16Kernel::Avx512Bf16) => {
            format!("AVX512-BF16 (vdpbf16ps, {MR}×{NR} tile of f32 accumulators over bf16 pairs{forced}){amx}")
        }
        Ok(Bf16Kernel::F32) => {
            let why = if forced.is_empty() { ", no AVX512-BF16 on this CPU".to_string() } else { forced };
            format!("f32 kernel on operands rounded to bf16 ({why}){amx}", why = why.trim_start_matches(", "))
        }
        Err(e) => format!("none: {e}"),
    }
}

/// `x` rounded to the nearest bf16 (ties to even), returned as the `f32` of equal value: the
/// high 16 bits of the result are the bf16. NaN stays NaN (quieted); values that round past
/// bf16's largest finite value become ±∞, as in `vcvtne2ps2bf16`.
#[inline(always)]
pub fn round(x: f32) -> f32 {
    widen(round_bits(x))
}

/// The `f32` value of a bf16's bits (exact: a bf16 is the top half of an `f32`).
#[inline(always)]
pub fn widen(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// The bf16 nearest `x` (ties to even), as its bits.
#[inline(always)]
pub fn round_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        // Keep the sign and set the quiet bit, so the truncated payload cannot become ∞.
        return ((bits >> 16) | 0x0040) as u16;
    }
    // Add half a unit of the 16 bits dropped, minus one unless the kept part is odd: the
    // carry then rounds to nearest with ties to even.
    let rounding = 0x7FFF + ((bits >> 16) & 1);
    ((bits + rounding) >> 16) as u16
}

/// Round every value of a packed `f32` panel to bf16 (the [`Bf16Kernel::F32`] path).
pub(super) fn round_in_place(values: &mut [f32]) {
    values.iter_mut().for_each(|x| *x = round(*x));
}

#[cfg(target_arch = "x86_64")]
pub(super) use pairs::{Pairs, MR, NR};

/// Placeholders where the AVX512-BF16 kernel cannot exist.
#[cfg(not(target_arch = "x86_64"))]
const MR: usize = 0;
#[cfg(not(target_arch = "x86_64"))]
const NR: usize = 0;

/// The AVX512-BF16 kernel: packing into bf16 pairs and the `vdpbf16ps` tile.
#[cfg(target_arch = "x86_64")]
mod pairs {
    use std::arch::x86_64::*;

    use super::super::gemm::{avx512, Kernel, KernelShape, MatRef, Tile};
    use super::round_bits;
    use crate::nn::ops::simd::mask16;

    /// The tile: 8 rows × 48 columns, as the `f32` kernel's (24 accumulator registers, 3 for
    /// the row of B, broadcasts of A straight from memory).
    pub const MR: usize = avx512::MR;
    pub const NR: usize = avx512::NR;
    const VECTORS: usize = avx512::VECTORS;
    /// How many pair steps ahead the kernel prefetches its B panel (8 steps: 1.5 KiB).
    const PREFETCH_STEPS: usize = 8;
    /// How many pair steps before the end of the loop the kernel prefetches its tile of C
    /// (32 steps: about 800 cycles, a miss to memory and back).
    const C_PREFETCH_STEPS: usize = 32;

    /// Panels of bf16 pairs: for a panel of `width` lines (rows of A, columns of B), pair
    /// step `p` of line `l` is the 32-bit lane `p·width + l`, holding the line's values at
    /// steps `2p` (low half) and `2p + 1` (high half), zero past the last step and line.
    /// The tile then reads one broadcast lane of A and one row of 16 lanes of B per
    /// `vdpbf16ps`, which adds both products of the pair into each `f32` lane.
    ///
    /// Only made by [`super::super::gemm::gemm_in`] after [`super::kernel`] chose it, i.e.
    /// on a CPU with AVX-512 (F, BW) and AVX512-BF16.
    #[derive(Clone, Copy)]
    pub struct Pairs;

    impl Kernel<f32> for Pairs {
        type Packed = u16;

        /// KC 512 pair steps' worth of k: A's 8 × 512 panel is 8 KiB of bf16, the same bytes
        /// as the `f32` kernel's 8 × 256 (measured on `bench matmul`; see the README).
        fn shape(&self) -> KernelShape {
            KernelShape { mr: MR, nr: NR, kc: 512, a_panel_in_l1: true, mc: 192, nc: 1536 }
        }

        fn depth(&self, kc: usize) -> usize {
            kc.next_multiple_of(2)
        }

        fn pack_a(&self, a: MatRef<f32>, i0: usize, mc: usize, p0: usize, kc: usize, out: &mut [u16]) {
            let first = i0 * a.row_stride + p0 * a.col_stride;
            pack_pairs::<MR>(&a.data[first..], a.row_stride, a.col_stride, mc, kc, out);
        }

        fn pack_b(&self, b: MatRef<f32>, p0: usize, kc: usize, j0: usize, nc: usize, out: &mut [u16]) {
            let first = p0 * b.row_stride + j0 * b.col_stride;
            pack_pairs::<NR>(&b.data[first..], b.col_stride, b.row_stride, nc, kc, out);
        }

        unsafe fn tile(&self, tile: Tile<f32>, a: &[u16], b: &[u16], c: *mut f32, rows: usize, cols: usize) {
            assert!(rows > 0 && cols > 0 && a.len() >= self.depth(tile.kc) * MR && b.len() >= self.depth(tile.kc) * NR);
            // SAFETY: the CPU has AVX512-BF16 (this kernel is only chosen then), the panels
            // were checked above, and `c` is as this function's contract says.
            unsafe { kernel(tile, a, b, c, rows, cols) }
        }
    }

    /// `C[rows × cols] = tile.start + Ap · Bp` over `kc.div_ceil(2)` pair steps: per step three rows of
    /// 16 pairs of B, and for each of the 8 rows one broadcast pair of A into three
    /// `vdpbf16ps` (11 loads for 24 instructions of 32 multiply-adds).
    ///
    /// # Safety
    /// The CPU must support AVX-512F/BW and AVX512-BF16; `a` holds `depth·8` values, `b`
    /// `depth·48`, `c` and `tile.start` as [`Kernel::tile`] says.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn kernel(tile: Tile<f32>, a: &[u16], b: &[u16], c: *mut f32, rows: usize, cols: usize) {
        let pairs = tile.kc.div_ceil(2);
        let (mut ap, mut bp) = (a.as_ptr() as *const i32, b.as_ptr() as *const i32);
        let mut acc = [[_mm512_setzero_ps(); VECTORS]; MR];
        let fetch_c_at = pairs.saturating_sub(C_PREFETCH_STEPS);
        for step in 0..pairs {
            for v in 0..VECTORS {
                // A prefetch past the panel's end is harmless (it never faults).
                _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add(PREFETCH_STEPS * NR + 16 * v) as *const i8);
            }
            if step == fetch_c_at {
                // The tile of C is read (or written) only after the loop; fetched now, its
                // misses overlap the last steps instead of stalling the store.
                for r in 0..rows {
                    for v in 0..VECTORS {
                        _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(r * tile.ldc + 16 * v) as *const i8);
                    }
                }
            }
            // SAFETY: `pairs` steps of MR (resp. NR) lanes each, inside the panels (checked
            // by the caller).
            unsafe {
                let b_row: [__m512bh; VECTORS] =
                    std::array::from_fn(|v| std::mem::transmute(_mm512_loadu_si512(bp.add(16 * v) as *const _)));
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let a_r: __m512bh = std::mem::transmute(_mm512_set1_epi32(ap.add(r).read_unaligned()));
                    for (acc_rv, b_v) in acc_r.iter_mut().zip(&b_row) {
                        *acc_rv = _mm512_dpbf16_ps(*acc_rv, a_r, *b_v);
                    }
                }
                ap = ap.add(MR);
                bp = bp.add(NR);
            }
        }
        // SAFETY: as this function's contract says.
        unsafe { avx512::store(tile, &acc, c, rows, cols) }
    }

    /// Pack `lines` lines of `kc` steps — line `l`, step `p` at `src[l·line_stride +
    /// p·step_stride]` — into consecutive pair panels of `WIDTH` lines each (see [`Pairs`]),
    /// the last one zero-padded: all of an operand's panels in one pass, so that the vector
    /// routines always work on 16 lines at once, across two A panels of 8 rows where needed.
    fn pack_pairs<const WIDTH: usize>(
        src: &[f32],
        line_stride: usize,
        step_stride: usize,
        lines: usize,
        kc: usize,
        out: &mut [u16],
    ) {
        assert!(lines > 0 && kc > 0 && WIDTH.is_multiple_of(8));
        assert!(src.len() > (lines - 1) * line_stride + (kc - 1) * step_stride, "pack_pairs: source too short");
        let panels = Panels::<WIDTH>::new(out, lines, kc.div_ceil(2));
        if step_stride == 1 {
            // SAFETY: the CPU has the features (only this kernel packs pairs); `src` was
            // checked above, `panels` checked its own length.
            return unsafe { pack_line_pairs(src, line_stride, lines, kc, panels) };
        }
        if line_stride == 1 {
            // SAFETY: as above.
            return unsafe { pack_step_pairs(src, step_stride, lines, kc, panels) };
        }
        for l in 0..panels.padded {
            for p in 0..panels.pairs {
                let half = |step: usize| {
                    let inside = l < lines && step < kc;
                    if inside {
                        u32::from(round_bits(src[l * line_stride + step * step_stride]))
                    } else {
                        0
                    }
                };
                // SAFETY: line l < padded, pair p < pairs: inside the panels.
                unsafe { panels.ptr(l, p).write_unaligned(half(2 * p) | half(2 * p + 1) << 16) };
            }
        }
    }

    /// Consecutive pair panels of `WIDTH` lines, `pairs` steps deep, `padded` lines in all (a
    /// multiple of `WIDTH`): where the 32-bit pair of line `l`, step `p` goes. (The width is
    /// a constant so that finding a line's panel is no division.)
    #[derive(Clone, Copy)]
    struct Panels<const WIDTH: usize> {
        out: *mut u32,
        pairs: usize,
        padded: usize,
    }

    impl<const WIDTH: usize> Panels<WIDTH> {
        /// The panels of `lines` lines in `out`, which must hold them all.
        fn new(out: &mut [u16], lines: usize, pairs: usize) -> Self {
            let padded = lines.next_multiple_of(WIDTH);
            assert!(
                out.len() >= 2 * pairs * padded,
                "pack_pairs: {} values for {padded} lines of {pairs} pairs",
                out.len()
            );
            Panels { out: out.as_mut_ptr() as *mut u32, pairs, padded }
        }

        /// Where the pair `p` of line `l` goes.
        ///
        /// # Safety
        /// `l < padded` and `p < pairs`.
        unsafe fn ptr(&self, l: usize, p: usize) -> *mut u32 {
            // SAFETY: inside the panels (the caller's contract, checked length in `new`).
            unsafe { self.out.add((l / WIDTH * self.pairs + p) * WIDTH + l % WIDTH) }
        }

        /// Store the pairs `p` of lines `l0..l0 + 16` (`l0` a multiple of 16): two runs of 8
        /// lanes, each inside one panel (`WIDTH` is a multiple of 8); the second is dropped
        /// past the last panel.
        ///
        /// # Safety
        /// AVX-512F; `l0 < padded`, `p < pairs`.
        #[target_feature(enable = "avx512f")]
        unsafe fn store16(&self, l0: usize, p: usize, lanes: __m512i) {
            // SAFETY: lines l0.. and l0 + 8.. (when < padded) of pair p are inside the panels.
            unsafe {
                _mm256_storeu_si256(self.ptr(l0, p) as *mut __m256i, _mm512_castsi512_si256(lanes));
                if l0 + 8 < self.padded {
                    _mm256_storeu_si256(self.ptr(l0 + 8, p) as *mut __m256i, _mm512_extracti64x4_epi64::<1>(lanes));
                }
            }
        }
    }

    /// [`pack_pairs`] when each line's steps are contiguous (a row-major A, or a transposed
    /// weight as B): a line's 32 values convert to 16 pairs in one register, and blocks of
    /// 16 lines × 16 pairs are transposed in registers.
    ///
    /// # Safety
    /// AVX-512F/BW and AVX512-BF16; `src` reaches `(lines − 1)·line_stride + kc`, `panels`
    /// are `kc.div_ceil(2)` pairs deep and hold `lines`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pack_line_pairs<const WIDTH: usize>(
        src: &[f32],
        line_stride: usize,
        lines: usize,
        kc: usize,
        panels: Panels<WIDTH>,
    ) {
        let pairs = panels.pairs;
        for l0 in (0..panels.padded).step_by(16) {
            let real_lines = lines.saturating_sub(l0).min(16);
            for q0 in (0..pairs).step_by(16) {
                let s0 = 2 * q0;
                let (lo, hi) = (mask16(kc - s0), mask16(kc.saturating_sub(s0 + 16)));
                // SAFETY: steps s0.. of line l0 + l; lanes past kc are masked off (a masked-off
                // lane is never read), so only `src`'s own values are read.
                let convert = |l: usize| unsafe {
                    let line = src.as_ptr().add((l0 + l) * line_stride + s0);
                    let x0 = _mm512_maskz_loadu_ps(lo, line);
                    let x1 = _mm512_maskz_loadu_ps(hi, line.wrapping_add(16));
                    std::mem::transmute::<__m512bh, __m512>(_mm512_cvtne2ps_pbh(x1, x0))
                };
                // All 16 lines (the usual case) unrolled, so the block stays in registers.
                let block: [__m512; 16] = if real_lines == 16 {
                    std::array::from_fn(convert)
                } else {
                    std::array::from_fn(|l| if l < real_lines { convert(l) } else { _mm512_setzero_ps() })
                };
                let columns = avx512::transpose16(block);
                for (c, column) in columns.iter().enumerate().take(pairs - q0) {
                    // SAFETY: pair q0 + c < pairs, l0 < padded.
                    unsafe { panels.store16(l0, q0 + c, _mm512_castps_si512(*column)) };
                }
            }
        }
    }

    /// [`pack_pairs`] when each step's lines are contiguous (a row-major B, or a transposed
    /// A): two steps of 16 lines convert in one instruction and one permutation interleaves
    /// them into pairs.
    ///
    /// # Safety
    /// As [`pack_line_pairs`], with `src` reaching `(kc − 1)·step_stride + lines`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pack_step_pairs<const WIDTH: usize>(
        src: &[f32],
        step_stride: usize,
        lines: usize,
        kc: usize,
        panels: Panels<WIDTH>,
    ) {
        // Word 2i of the result is word i of the converted pair (step 2p), word 2i + 1 is
        // word 16 + i (step 2p + 1).
        let interleave = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17,
            1, 16, 0,
        );
        // Steps are usually whole rows apart, each a new page the hardware prefetcher does
        // not follow: fetch a few pairs ahead, every cache line of the step's lines.
        const AHEAD: usize = 4;
        for p in 0..panels.pairs {
            let (even, odd) = (2 * p, 2 * p + 1);
            if odd + 2 * AHEAD < kc {
                for step in [even, odd] {
                    let next = src.as_ptr().wrapping_add((step + 2 * AHEAD) * step_stride);
                    for l in (0..lines).step_by(16) {
                        _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(l) as *const i8);
                    }
                    _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(lines - 1) as *const i8);
                }
            }
            for l0 in (0..panels.padded).step_by(16) {
                let load = mask16(lines.saturating_sub(l0));
                // SAFETY: lanes l0 + i < lines of steps `even` and `odd` < kc (a step past kc
                // is not loaded); masked-off lanes are never read. Pair p < pairs, l0 < padded.
                unsafe {
                    let x0 = _mm512_maskz_loadu_ps(load, src.as_ptr().wrapping_add(even * step_stride + l0));
                    let x1 = if odd < kc {
                        _mm512_maskz_loadu_ps(load, src.as_ptr().wrapping_add(odd * step_stride + l0))
                    } else {
                        _mm512_setzero_ps()
                    };
                    let both = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(x1, x0));
                    panels.store16(l0, p, _mm512_permutexvar_epi16(interleave, both));
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
