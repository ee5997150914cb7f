//! The tile products of flash attention with bf16 operands and `f32` sums (`--precision bf16`),
//! as PyTorch's CPU autocast runs `scaled_dot_product_attention` (it is on autocast's list of
//! lower-precision ops: its flash kernel multiplies bf16 operands into `f32` accumulators and
//! keeps the softmax in `f32`).
//!
//! What is rounded (to nearest, ties to even): the operands of the six products and nothing
//! else. Forward: `q`, `scale·k` and `v`, and the probabilities `P` as they meet `v`.
//! Backward: `q`, `scale·k`, `k`, `v`, `dO`, `P` (as it meets `dO` for `dv`) and `dS` (as it
//! meets `k` and `q`). The scores, the running maxima and sums, `exp`, `L`, `D`, `dP` and
//! `dS = P∘(dP − D)` are computed in `f32` from `f32` values, and the outputs `O`, `dq`, `dk`,
//! `dv` are `f32` sums.
//!
//! The error this adds, with `U = 2⁻⁸` (bf16's relative rounding error): rounding `q` and
//! `scale·k` moves a score `s_ij` by at most `δ_ij = (2U + U²)·scale·Σ_d |q_id||k_jd|`; moving
//! a row's scores by at most `δ` moves each of its probabilities by at most a factor `e^{±2δ}`,
//! so the output by at most `(e^{2δ} − 1)·max|v|`; rounding `P` and `v` where they meet adds
//! `(2U + U²)·max|v|`. In all, `|O − O_exact| ≤ ((e^{2δ} − 1)(1 + 2U) + 2U + U²)·max|v|`, about
//! `(2δ + 2U)·max|v|`: 0.8% of `max|v|` plus 1.6% per unit of `scale·Σ_d |q_d||k_d|`
//! (`bf16_tests` checks it row by row). The gradients carry errors of the same order.
//!
//! Operands are packed as bf16 pairs: two values adjacent along the summed dimension in one
//! 32-bit lane (low half first), the layout `vdpbf16ps` reads. A product `C += A·B` over
//! `pairs` pair steps reads `A`'s pair `(i, p)` at `a[i·a_row + p·a_col]` (broadcast) and
//! `B`'s pair step `p` as the row `b[p·ldb..][..n]`; odd lengths are padded with zeros.
//!
//! Two kernels, chosen where the precision is decided ([`super::Plan`], from
//! [`crate::nn::ops::bf16::kernel`], so `LMFORGE_BF16_KERNEL` forces either):
//! - `vdpbf16ps` (AVX512-BF16): per pair `acc + a_hi·b_hi`, rounded, `+ a_lo·b_lo`, rounded.
//! - portable: the same two fused multiply-adds in that order on the widened halves. bf16
//!   products are exact in `f32`, so both give the same bits, except that `vdpbf16ps` treats
//!   subnormal inputs and results as zero.

use crate::nn::ops::bf16::{round_bits, Bf16Kernel};
use crate::nn::ops::simd::Real;

use super::{KEY_TILE, QUERY_TILE};

/// The `f32` data of a tile. bf16 products are only planned for `f32` data ([`super::Plan`]).
#[inline(always)]
pub(super) fn f32s<T: Real>(values: &[T]) -> &[f32] {
    T::as_f32(values).expect("flash attention plans bf16 products for f32 data only")
}

/// [`f32s`] for writing.
#[inline(always)]
pub(super) fn f32s_mut<T: Real>(values: &mut [T]) -> &mut [f32] {
    T::as_f32_mut(values).expect("flash attention plans bf16 products for f32 data only")
}

/// `lo` and `hi` rounded to bf16, in one lane.
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    u32::from(round_bits(lo)) | (u32::from(round_bits(hi)) << 16)
}

/// The two bf16 halves of a pair as `f32` (exact).
#[inline(always)]
fn halves(pair: u32) -> (f32, f32) {
    (f32::from_bits(pair << 16), f32::from_bits(pair & 0xFFFF_0000))
}

/// bf16 products with the kernel of one plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Bf16Tiles {
    pub kernel: Bf16Kernel,
}

impl Bf16Tiles {
    /// Pairs along each row: `dst[i·cols.div_ceil(2) + p] = (src[i·ld + 2p], src[i·ld + 2p + 1])`
    /// for `rows × cols` of `src` (an `A` operand whose rows are summed along, or a `B` whose
    /// columns are summed along, transposed).
    #[inline(always)]
    pub fn pack_rows(self, src: &[f32], rows: usize, cols: usize, ld: usize, dst: &mut [u32]) {
        let pairs = cols.div_ceil(2);
        assert!(rows == 0 || src.len() >= (rows - 1) * ld + cols, "pack_rows: source too short");
        assert!(dst.len() >= rows * pairs, "pack_rows: destination too short");
        #[cfg(target_arch = "x86_64")]
        if self.kernel == Bf16Kernel::Avx512Bf16 {
            // SAFETY: this kernel is only chosen on a CPU with AVX512-BF16; lengths checked above.
            return unsafe { vdp::pack_rows(src, rows, cols, ld, dst) };
        }
        for i in 0..rows {
            let row = &src[i * ld..][..cols];
            let out = &mut dst[i * pairs..][..pairs];
            for (o, two) in out.iter_mut().zip(row.chunks(2)) {
                *o = pair(two[0], two.get(1).copied().unwrap_or(0.0));
            }
        }
    }

    /// Pairs across rows: `dst[p·cols + j] = (src[2p·ld + j], src[(2p + 1)·ld + j])` for
    /// `rows × cols` of `src`, a zero row past the last (a `B` operand summed over its rows,
    /// or an `A` summed over its rows, i.e. transposed).
    #[inline(always)]
    pub fn pack_across(self, src: &[f32], rows: usize, cols: usize, ld: usize, dst: &mut [u32]) {
        assert!(rows == 0 || src.len() >= (rows - 1) * ld + cols, "pack_across: source too short");
        assert!(dst.len() >= rows.div_ceil(2) * cols, "pack_across: destination too short");
        #[cfg(target_arch = "x86_64")]
        if self.kernel == Bf16Kernel::Avx512Bf16 {
            // SAFETY: as in `pack_rows`.
            return unsafe { vdp::pack_across(src, rows, cols, ld, dst) };
        }
        for p in 0..rows.div_ceil(2) {
            let even = &src[2 * p * ld..][..cols];
            let out = &mut dst[p * cols..][..cols];
            if 2 * p + 1 < rows {
                let odd = &src[(2 * p + 1) * ld..][..cols];
                for ((o, &lo), &hi) in out.iter_mut().zip(even).zip(odd) {
                    *o = pair(lo, hi);
                }
            } else {
                for (o, &lo) in out.iter_mut().zip(even) {
                    *o = pair(lo, 0.0);
                }
            }
        }
    }

    /// `C[m×n] += A·B` over `pairs` pair steps (see the module docs for the layouts).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub fn product(
        self,
        m: usize,
        n: usize,
        pairs: usize,
        a: &[u32],
        a_row: usize,
        a_col: usize,
        b: &[u32],
        ldb: usize,
        c: &mut [f32],
        ldc: usize,
    ) {
        self.run::<true>(m, n, pairs, a, a_row, a_col, b, ldb, c, ldc)
    }

    /// `C[m×n] = A·B`: [`product`](Self::product) into a `C` that is not read (the score
    /// tiles), so nobody zero-fills it first. The same bits as `+=` into zeros.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub fn product_into(
        self,
        m: usize,
        n: usize,
        pairs: usize,
        a: &[u32],
        a_row: usize,
        a_col: usize,
        b: &[u32],
        ldb: usize,
        c: &mut [f32],
        ldc: usize,
    ) {
        self.run::<false>(m, n, pairs, a, a_row, a_col, b, ldb, c, ldc)
    }

    /// `C += A·B` when `ACCUMULATE`, `C = A·B` otherwise.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn run<const ACCUMULATE: bool>(
        self,
        m: usize,
        n: usize,
        pairs: usize,
        a: &[u32],
        a_row: usize,
        a_col: usize,
        b: &[u32],
        ldb: usize,
        c: &mut [f32],
        ldc: usize,
    ) {
        if m == 0 || n == 0 {
            return;
        }
        if pairs == 0 {
            if !ACCUMULATE {
                c.chunks_mut(ldc).take(m).for_each(|row| row[..n].fill(0.0));
            }
            return;
        }
        assert!(a.len() > (m - 1) * a_row + (pairs - 1) * a_col, "bf16 tile product: A too short");
        assert!(b.len() >= (pairs - 1) * ldb + n, "bf16 tile product: B too short");
        assert!(c.len() >= (m - 1) * ldc + n, "bf16 tile product: C too short");
        #[cfg(target_arch = "x86_64")]
        if self.kernel == Bf16Kernel::Avx512Bf16 {
            // SAFETY: the CPU has AVX512-BF16 (this kernel is only chosen then); every index
            // the kernel reads or writes is below the lengths checked above.
            return unsafe {
                vdp::product::<ACCUMULATE>(m, n, pairs, a.as_ptr(), a_row, a_col, b.as_ptr(), ldb, c.as_mut_ptr(), ldc)
            };
        }
        portable_product::<ACCUMULATE>(m, n, pairs, a, a_row, a_col, b, ldb, c, ldc)
    }
}

/// [`Bf16Tiles::product`] on the widened halves: blocks of 4 rows × 16 columns, in the caller's
/// SIMD features (it is inlined into the multiversioned attention kernels).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn portable_product<const ACCUMULATE: bool>(
    m: usize,
    n: usize,
    pairs: usize,
    a: &[u32],
    a_row: usize,
    a_col: usize,
    b: &[u32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
) {
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn block<const ACCUMULATE: bool, const R: usize, const W: usize>(
        i: usize,
        j: usize,
        pairs: usize,
        a: &[u32],
        a_row: usize,
        a_col: usize,
        b: &[u32],
        ldb: usize,
        c: &mut [f32],
        ldc: usize,
    ) {
        let mut acc = [[0f32; W]; R];
        if ACCUMULATE {
            for (r, acc_r) in acc.iter_mut().enumerate() {
                acc_r.copy_from_slice(&c[(i + r) * ldc + j..][..W]);
            }
        }
        for p in 0..pairs {
            let row: &[u32; W] = b[p * ldb + j..][..W].try_into().expect("W pairs");
            let (lo, hi): ([f32; W], [f32; W]) =
                (std::array::from_fn(|x| halves(row[x]).0), std::array::from_fn(|x| halves(row[x]).1));
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let (a_lo, a_hi) = halves(a[(i + r) * a_row + p * a_col]);
                for x in 0..W {
                    acc_r[x] = a_hi.mul_add(hi[x], acc_r[x]);
                    acc_r[x] = a_lo.mul_add(lo[x], acc_r[x]);
                }
            }
        }
        for (r, acc_r) in acc.iter().enumerate() {
            c[(i + r) * ldc + j..][..W].copy_from_slice(acc_r);
        }
    }
    let mut j = 0;
    while j < n {
        let wide = n - j >= 16;
        let mut i = 0;
        while i < m {
            match (m - i >= 4, wide) {
                (true, true) => block::<ACCUMULATE, 4, 16>(i, j, pairs, a, a_row, a_col, b, ldb, c, ldc),
                (false, true) => block::<ACCUMULATE, 1, 16>(i, j, pairs, a, a_row, a_col, b, ldb, c, ldc),
                (true, false) => block::<ACCUMULATE, 4, 1>(i, j, pairs, a, a_row, a_col, b, ldb, c, ldc),
                (false, false) => block::<ACCUMULATE, 1, 1>(i, j, pairs, a, a_row, a_col, b, ldb, c, ldc),
            }
            i += if m - i >= 4 { 4 } else { 1 };
        }
        j += if wide { 16 } else { 1 };
    }
}

/// Pair buffers of one task's tiles, reused from tile to tile.
pub(super) struct TileScratch {
    /// `(QUERY_TILE, KEY_TILE / 2)`: `P` or `dS` paired along keys.
    pub along_keys: Vec<u32>,
    /// `(QUERY_TILE / 2, KEY_TILE)`: `P` or `dS` paired across queries.
    pub across_queries: Vec<u32>,
}

impl TileScratch {
    pub fn new() -> Self {
        TileScratch {
            along_keys: vec![0; QUERY_TILE * KEY_TILE / 2],
            across_queries: vec![0; QUERY_TILE * KEY_TILE / 2],
        }
    }
}

/// The AVX512-BF16 kernel and packing.
#[cfg(target_arch = "x86_64")]
mod vdp {
    use std::arch::x86_64::*;

    use crate::nn::ops::simd::mask16;

    /// # Safety
    /// AVX512-BF16; `src` holds `rows × cols` at row stride `ld`, `dst` `rows × cols.div_ceil(2)`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn pack_rows(src: &[f32], rows: usize, cols: usize, ld: usize, dst: &mut [u32]) {
        let pairs = cols.div_ceil(2);
        for i in 0..rows {
            super::super::prefetch_row(src, (i + super::super::PREFETCH_ROWS) * ld, cols);
            for c0 in (0..cols).step_by(32) {
                let (lo, hi) = (mask16(cols - c0), mask16(cols.saturating_sub(c0 + 16)));
                // SAFETY: lanes past `cols` are masked off (never read or written); the row
                // and its pairs are inside `src` and `dst` (the caller's contract).
                unsafe {
                    let line = src.as_ptr().add(i * ld + c0);
                    let x0 = _mm512_maskz_loadu_ps(lo, line);
                    let x1 = _mm512_maskz_loadu_ps(hi, line.wrapping_add(16));
                    let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(x1, x0));
                    _mm512_mask_storeu_epi32(
                        dst.as_mut_ptr().add(i * pairs + c0 / 2) as *mut _,
                        mask16(pairs - c0 / 2),
                        both,
                    );
                }
            }
        }
    }

    /// # Safety
    /// AVX512-BF16; `src` holds `rows × cols` at row stride `ld`, `dst` `rows.div_ceil(2) × cols`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn pack_across(src: &[f32], rows: usize, cols: usize, ld: usize, dst: &mut [u32]) {
        // Word 2i of the result is word i of the converted pair (the even row), word 2i + 1 is
        // word 16 + i (the odd row).
        let interleave = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17,
            1, 16, 0,
        );
        for p in 0..rows.div_ceil(2) {
            for row in [2 * p, 2 * p + 1] {
                super::super::prefetch_row(src, (row + super::super::PREFETCH_ROWS) * ld, cols);
            }
            for c0 in (0..cols).step_by(16) {
                let lanes = mask16(cols - c0);
                // SAFETY: lanes past `cols` are masked off; rows 2p and 2p + 1 (when < rows)
                // and pair row p are inside `src` and `dst` (the caller's contract).
                unsafe {
                    let x0 = _mm512_maskz_loadu_ps(lanes, src.as_ptr().add(2 * p * ld + c0));
                    let x1 = if 2 * p + 1 < rows {
                        _mm512_maskz_loadu_ps(lanes, src.as_ptr().add((2 * p + 1) * ld + c0))
                    } else {
                        _mm512_setzero_ps()
                    };
                    let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(x1, x0));
                    let pairs = _mm512_permutexvar_epi16(interleave, both);
                    _mm512_mask_storeu_epi32(dst.as_mut_ptr().add(p * cols + c0) as *mut _, lanes, pairs);
                }
            }
        }
    }

    /// `C[m×n] += A·B` (`= A·B` without `ACCUMULATE`): blocks of 6 rows × 64 columns (24
    /// accumulators, 4 registers for the row of B), then narrower, the last 16 columns masked.
    ///
    /// # Safety
    /// AVX512-BF16; every `a[i·a_row + p·a_col]`, `b[p·ldb + j]`, `c[i·ldc + j]` for
    /// `i < m`, `p < pairs`, `j < n` is valid.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn product<const ACCUMULATE: bool>(
        m: usize,
        n: usize,
        pairs: usize,
        a: *const u32,
        a_row: usize,
        a_col: usize,
        b: *const u32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        let mut j = 0;
        while j < n {
            let vectors = ((n - j) / 16).min(4);
            let last = if vectors == 0 { mask16(n - j) } else { 0xFFFF };
            // SAFETY (all): blocks inside m × n, as this function's contract says.
            j += unsafe {
                match vectors {
                    4 => columns::<ACCUMULATE, 4>(m, j, pairs, a, a_row, a_col, b, ldb, c, ldc, last),
                    2 | 3 => columns::<ACCUMULATE, 2>(m, j, pairs, a, a_row, a_col, b, ldb, c, ldc, last),
                    _ => columns::<ACCUMULATE, 1>(m, j, pairs, a, a_row, a_col, b, ldb, c, ldc, last),
                }
            };
        }
    }

    /// All `m` rows of the `V·16` columns from `j` (the last 16 masked by `last`): blocks of 6
    /// rows, then 4, then single rows. Returns the columns done.
    ///
    /// # Safety
    /// As [`product`], for these columns.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn columns<const ACCUMULATE: bool, const V: usize>(
        m: usize,
        j: usize,
        pairs: usize,
        a: *const u32,
        a_row: usize,
        a_col: usize,
        b: *const u32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        last: __mmask16,
    ) -> usize {
        let mut i = 0;
        // SAFETY: rows below m, columns as the caller's contract says.
        unsafe {
            while i + 6 <= m {
                micro::<ACCUMULATE, 6, V>(i, j, pairs, a, a_row, a_col, b, ldb, c, ldc, last);
                i += 6;
            }
            // A 64-row tile ends in 4 rows: one block rather than four single rows.
            while i + 4 <= m {
                micro::<ACCUMULATE, 4, V>(i, j, pairs, a, a_row, a_col, b, ldb, c, ldc, last);
                i += 4;
            }
            while i < m {
                micro::<ACCUMULATE, 1, V>(i, j, pairs, a, a_row, a_col, b, ldb, c, ldc, last);
                i += 1;
            }
        }
        16 * V
    }

    /// `C[i.., j..]` (`R` rows × `V` vectors of 16 columns, the last masked by `last`) `+= A·B`
    /// (`= A·B` without `ACCUMULATE`).
    ///
    /// # Safety
    /// As [`product`], for this block.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn micro<const ACCUMULATE: bool, const R: usize, const V: usize>(
        i: usize,
        j: usize,
        pairs: usize,
        a: *const u32,
        a_row: usize,
        a_col: usize,
        b: *const u32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        last: __mmask16,
    ) {
        let mask = |v: usize| if v + 1 == V { last } else { 0xFFFF };
        // SAFETY: every access is inside the block, as the caller's contract says; masked-off
        // lanes are neither read nor written.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); V]; R];
            if ACCUMULATE {
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    for (v, acc_rv) in acc_r.iter_mut().enumerate() {
                        *acc_rv = _mm512_maskz_loadu_ps(mask(v), c.add((i + r) * ldc + j + 16 * v));
                    }
                }
            }
            for p in 0..pairs {
                let row: [__m512bh; V] = std::array::from_fn(|v| {
                    std::mem::transmute(_mm512_maskz_loadu_epi32(mask(v), b.add(p * ldb + j + 16 * v) as *const _))
                });
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let a_r: __m512bh =
                        std::mem::transmute(_mm512_set1_epi32(*a.add((i + r) * a_row + p * a_col) as i32));
                    for (acc_rv, b_v) in acc_r.iter_mut().zip(&row) {
                        *acc_rv = _mm512_dpbf16_ps(*acc_rv, a_r, *b_v);
                    }
                }
            }
            for (r, acc_r) in acc.iter().enumerate() {
                for (v, acc_rv) in acc_r.iter().enumerate() {
                    _mm512_mask_storeu_ps(c.add((i + r) * ldc + j + 16 * v), mask(v), *acc_rv);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::ops::bf16::round;
    use crate::nn::ops::bf16::tests::kernels_to_test;
    use crate::nn::ops::testing::rand_vec;

    /// Relative error of an `f32` addition.
    const U32: f64 = 1.0 / (1u64 << 24) as f64;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        rand_vec(n, seed).iter().map(|&x| (3.0 * x) as f32).collect()
    }

    /// Both packings, on every kernel, give the bf16 of each value (ties to even) at its place,
    /// and zeros where a pair runs past the data.
    #[test]
    fn packing_rounds_each_value_into_its_pair() {
        for kernel in kernels_to_test() {
            let tiles = Bf16Tiles { kernel };
            for &(rows, cols) in &[(1, 1), (3, 5), (7, 33), (64, 64), (5, 40)] {
                let ld = cols + 3;
                let src = values(rows * ld, 1);
                let at = |i: usize, j: usize| if i < rows && j < cols { round(src[i * ld + j]) } else { 0.0 };
                let mut along = vec![u32::MAX; rows * cols.div_ceil(2)];
                tiles.pack_rows(&src, rows, cols, ld, &mut along);
                for i in 0..rows {
                    for p in 0..cols.div_ceil(2) {
                        let (lo, hi) = halves(along[i * cols.div_ceil(2) + p]);
                        assert_eq!((lo, hi), (at(i, 2 * p), at(i, 2 * p + 1)), "{kernel:?} along ({i}, {p})");
                    }
                }
                let mut across = vec![u32::MAX; rows.div_ceil(2) * cols];
                tiles.pack_across(&src, rows, cols, ld, &mut across);
                for p in 0..rows.div_ceil(2) {
                    for j in 0..cols {
                        let (lo, hi) = halves(across[p * cols + j]);
                        assert_eq!((lo, hi), (at(2 * p, j), at(2 * p + 1, j)), "{kernel:?} across ({p}, {j})");
                    }
                }
            }
        }
    }

    /// `C0 + A·B` on every kernel against the f64 product of the rounded operands, within the
    /// `f32` summation bound (`2k` roundings of at most `2⁻²⁴` of `Σ|a||b| + |c0|`); `A` read
    /// both along its rows and transposed. The kernels agree bit for bit (no subnormals here).
    #[test]
    fn products_match_the_rounded_product_and_agree_between_kernels() {
        for &(m, n, k) in &[(1, 1, 1), (5, 17, 3), (6, 64, 64), (13, 80, 7), (64, 64, 64), (64, 33, 64), (7, 15, 2)] {
            let (a, b, c0) = (values(m * k, 2), values(k * n, 3), values(m * n, 4));
            let (kp, ldc) = (k.div_ceil(2), n);
            let mut results = Vec::new();
            for kernel in kernels_to_test() {
                let tiles = Bf16Tiles { kernel };
                let mut b_pairs = vec![0; kp * n];
                tiles.pack_across(&b, k, n, n, &mut b_pairs);
                let mut a_rows = vec![0; m * kp];
                tiles.pack_rows(&a, m, k, k, &mut a_rows);
                // Aᵀ stored (k, m), paired across its rows: A(i, p) at p·m + i.
                let a_t: Vec<f32> = (0..k * m).map(|x| a[(x % m) * k + x / m]).collect();
                let mut a_cols = vec![0; kp * m];
                tiles.pack_across(&a_t, k, m, m, &mut a_cols);
                for (name, a_pairs, a_row, a_col) in [("rows", &a_rows, kp, 1), ("transposed", &a_cols, 1, m)] {
                    let mut c = c0.clone();
                    tiles.product(m, n, kp, a_pairs, a_row, a_col, &b_pairs, n, &mut c, ldc);
                    for i in 0..m {
                        for j in 0..n {
                            let terms = (0..k).map(|p| round(a[i * k + p]) as f64 * round(b[p * n + j]) as f64);
                            let want = c0[i * n + j] as f64 + terms.clone().sum::<f64>();
                            let magnitude = c0[i * n + j].abs() as f64 + terms.map(f64::abs).sum::<f64>();
                            let got = c[i * ldc + j] as f64;
                            assert!(
                                (got - want).abs() <= 2.0 * (k + 1) as f64 * U32 * magnitude,
                                "{kernel:?} {name} ({m},{n},{k}) [{i},{j}]: {got} vs {want}"
                            );
                        }
                    }
                    results.push((kernel, name, c));
                }
            }
            // `C = A·B` into a C full of garbage gives the bits of `C += A·B` into zeros.
            for kernel in kernels_to_test() {
                let tiles = Bf16Tiles { kernel };
                let (mut a_pairs, mut b_pairs) = (vec![0; m * kp], vec![0; kp * n]);
                tiles.pack_rows(&a, m, k, k, &mut a_pairs);
                tiles.pack_across(&b, k, n, n, &mut b_pairs);
                let (mut added, mut written) = (vec![0.0; m * n], vec![f32::NAN; m * n]);
                tiles.product(m, n, kp, &a_pairs, kp, 1, &b_pairs, n, &mut added, ldc);
                tiles.product_into(m, n, kp, &a_pairs, kp, 1, &b_pairs, n, &mut written, ldc);
                assert!(
                    added.iter().zip(&written).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{kernel:?} ({m},{n},{k}): product_into differs from product into zeros"
                );
            }
            for (kernel, name, c) in &results[1..] {
                assert!(
                    c == &results[0].2,
                    "({m},{n},{k}) {kernel:?} {name} differs from {:?} {}",
                    results[0].0,
                    results[0].1
                );
            }
        }
    }
}
