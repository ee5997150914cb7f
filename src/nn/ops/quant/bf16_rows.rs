//! Weight matrices held in bf16 ([`QFormat::BF16`]: `lmforge generate --dtype bf16`, or a GGUF
//! file's own `BF16` tensors), and their products: bf16 operands, `f32` accumulation.
//!
//! A row is its values' bf16 bits, two little-endian bytes each, one after another (GGUF's
//! `BF16` layout): half the bytes of `f32`, which is what decoding (a matrix–vector product,
//! bound by memory bandwidth) spends its time reading. Each product's input row is rounded to
//! bf16 once (round to nearest, ties to even: [`bf16::round_bits`]), then every output is one
//! dot product of two bf16 rows summed in `f32`, in the same row-parallel loop as the block
//! formats ([`super::matmul`]). Prefill-sized products instead run the `f32` GEMM at
//! [`bf16::Precision::Bf16`] on the matrix widened for the call ([`super::qmatmul_each`]): the
//! same operands, the GEMM's blocking.
//!
//! Error against the `f32` product of the unrounded operands: rounding moves each weight and
//! each input by at most 2⁻⁹ of itself, so each term `x·w` by at most `(2⁻⁸ + 2⁻¹⁸)·|x·w|`, and
//! summing `k` terms in `f32` adds at most `k·2⁻²⁴` of `Σ|x̃·w̃|` (products of two bf16 are
//! exact in `f32`):
//!
//! ```text
//! |y − x·wᵀ| ≤ (2⁻⁸ + 2⁻¹⁸)·Σ|x·w| + k·2⁻²⁴·Σ|x̃·w̃|
//! ```
//!
//! The tests check it for both kernels ([`dots`]), picked like the training GEMM's by
//! [`bf16::kernel`] (`LMFORGE_BF16_KERNEL=avx512-bf16|f32` forces one):
//! - `avx512-bf16`: `vdpbf16ps`, 32 multiply-adds per instruction, row after row: a single
//!   stream through memory, which the hardware prefetcher follows (four rows interleaved ran
//!   at 1.2–1.3× `f32` decoding, one at a time 1.7–1.9×; software prefetch made it slower).
//!   Subnormal operands (below 1.2e-38) count as zero (its DAZ).
//! - `f32`: the bf16 values widened to `f32` (exactly) and multiplied there, on any CPU.

use std::ops::Range;

use crate::nn::ops::bf16::{self, widen, Bf16Kernel};

use super::format::QMatrix;

/// `x` rounded to bf16 bits, into `out` (same length).
pub fn round_row(x: &[f32], out: &mut [u16]) {
    debug_assert_eq!(x.len(), out.len());
    out.iter_mut().zip(x).for_each(|(o, &v)| *o = bf16::round_bits(v));
}

/// The bytes of a row of `f32` values rounded to bf16 (the layout of a [`QFormat::BF16`] row).
pub fn bytes_of(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|&v| bf16::round_bits(v).to_le_bytes()).collect()
}

/// The `f32` values of bf16 bytes (exact: bf16 is the top half of an `f32`).
pub fn values_of(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(2).map(|b| widen(u16::from_le_bytes([b[0], b[1]]))).collect()
}

/// `out[i] = Σ_j w[rows.start + i, j]·x_j` for a run of rows of a [`QFormat::BF16`] matrix and
/// one input row `x` already rounded to bf16 ([`round_row`]), summed in `f32` by `kernel`.
pub fn dots(kernel: Bf16Kernel, w: &QMatrix, rows: Range<usize>, x: &[u16], out: &mut [f32]) {
    debug_assert_eq!(out.len(), rows.len());
    debug_assert_eq!(x.len(), w.dims().1);
    let data = w.rows_data(rows);
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Avx512Bf16` is selected only where the CPU has AVX512-BF16 (and AVX512F/BW);
        // `data` holds `out.len()` rows of `x.len()` values.
        Bf16Kernel::Avx512Bf16 => unsafe { avx512::dots(data, x, out) },
        _ => portable_dots(data, x, out),
    }
}

/// [`dots`] in plain code: eight partial sums per row, which the compiler vectorizes.
fn portable_dots(data: &[u8], x: &[u16], out: &mut [f32]) {
    let xs: Vec<f32> = x.iter().map(|&b| widen(b)).collect();
    for (o, row) in out.iter_mut().zip(data.chunks_exact(2 * x.len())) {
        let mut acc = [0f32; 8];
        let (w_main, w_tail) = row.split_at(row.len() / 16 * 16);
        for (w, x) in w_main.chunks_exact(16).zip(xs.chunks_exact(8)) {
            for lane in 0..8 {
                acc[lane] += widen(u16::from_le_bytes([w[2 * lane], w[2 * lane + 1]])) * x[lane];
            }
        }
        let x_tail = &xs[xs.len() / 8 * 8..];
        let tail: f32 =
            w_tail.chunks_exact(2).zip(x_tail).map(|(w, x)| widen(u16::from_le_bytes([w[0], w[1]])) * x).sum();
        *o = acc.iter().sum::<f32>() + tail;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Independent sums per row: `vdpbf16ps` takes several cycles, so one chain would wait on
    /// itself; four keep a row's loads streaming.
    const CHAINS: usize = 4;

    /// # Safety
    /// The CPU has AVX512F, AVX512BW and AVX512-BF16; `data` holds `out.len()` rows of
    /// `x.len()` bf16 values.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn dots(data: &[u8], x: &[u16], out: &mut [f32]) {
        let row_bytes = 2 * x.len();
        debug_assert_eq!(data.len(), out.len() * row_bytes);
        for (r, o) in out.iter_mut().enumerate() {
            // SAFETY: row r is in `data`.
            *o = unsafe { row(data.as_ptr().add(r * row_bytes), x) };
        }
    }

    /// One row at `w` dotted with `x`: `CHAINS` steps of 32 values at a time, then the rest
    /// 32 at a time, the last partial step under a mask (masked-off lanes are zero).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn row(w: *const u8, x: &[u16]) -> f32 {
        let cols = x.len();
        let (xp, wp) = (x.as_ptr(), w.cast::<u16>());
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        let mut j = 0;
        // SAFETY (all loads): `j + 32 ≤ cols` in the unmasked steps, and the mask keeps the
        // last one inside `x` and the row.
        unsafe {
            while j + 32 * CHAINS <= cols {
                for (c, acc) in acc.iter_mut().enumerate() {
                    let xv: __m512bh = std::mem::transmute(_mm512_loadu_si512(xp.add(j + 32 * c).cast()));
                    let wv: __m512bh = std::mem::transmute(_mm512_loadu_si512(wp.add(j + 32 * c).cast()));
                    *acc = _mm512_dpbf16_ps(*acc, wv, xv);
                }
                j += 32 * CHAINS;
            }
            while j < cols {
                let mask: __mmask32 = if cols - j >= 32 { !0 } else { (1u32 << (cols - j)) - 1 };
                let xv: __m512bh = std::mem::transmute(_mm512_maskz_loadu_epi16(mask, xp.add(j).cast()));
                let wv: __m512bh = std::mem::transmute(_mm512_maskz_loadu_epi16(mask, wp.add(j).cast()));
                acc[0] = _mm512_dpbf16_ps(acc[0], wv, xv);
                j += 32;
            }
        }
        let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        _mm512_reduce_add_ps(sum)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use candle_core::{Device, Tensor};

    use super::super::{matmul, qmatmul, qmatmul_each, QFormat, QuantKernel, DEQUANTIZED_FROM_TOKENS};
    use super::*;
    use crate::nn::ops::bf16::tests::kernels_to_test;

    /// `(rows, cols)` values of varied magnitudes and signs, none exact in bf16.
    fn values(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| {
                let base = ((i as u64 * 2654435761 + seed * 97) % 10007) as f32 / 10007.0 - 0.5;
                base * (0.02 + (i / cols % 5) as f32 * 0.3) * if i % cols % 61 == 7 { 8.0 } else { 1.0 }
            })
            .collect()
    }

    /// The module docs' bound on `|y − x·wᵀ|` for one output, with the `f32` sum's term taken
    /// on the unrounded magnitudes (larger by at most 2⁻⁸, covered by the factor).
    fn bound(x: &[f32], w: &[f32]) -> f64 {
        let magnitude: f64 = x.iter().zip(w).map(|(a, b)| f64::from(*a) * f64::from(*b)).map(f64::abs).sum();
        let (u, k) = (2f64.powi(-9), x.len() as f64);
        ((2.0 * u + u * u) + k * 2f64.powi(-24) * 1.01) * magnitude + 1e-30
    }

    fn exact(x: &[f32], w: &[f32]) -> f64 {
        x.iter().zip(w).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum()
    }

    #[test]
    fn rows_round_to_nearest_even_and_widen_exactly() {
        // 1 + 2⁻⁸ is a tie between 1 and 1 + 2⁻⁷: the even one, 1. 1 + 3·2⁻⁸: up to 1 + 2⁻⁶.
        let values = [1.0, 1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8), -2.5, 0.0, f32::INFINITY];
        let back = values_of(&bytes_of(&values));
        assert_eq!(back, [1.0, 1.0, 1.0 + 2f32.powi(-6), -2.5, 0.0, f32::INFINITY]);
        let w = Tensor::from_vec(values.to_vec(), (2, 3), &Device::Cpu).unwrap();
        let q = QMatrix::quantize(&w, QFormat::BF16).unwrap();
        assert_eq!((q.dims(), q.bytes(), q.row_bytes()), ((2, 3), 12, 6));
        assert_eq!(q.dequantize().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), back);
        assert_eq!(q.dequantize_rows(&[1, 1]).unwrap().to_vec2::<f32>().unwrap(), [&back[3..], &back[3..]]);
    }

    /// Each kernel, for runs of rows of several widths (a multiple of 32, a tail, fewer than
    /// 32), within the bound of the unrounded product, and agreeing with each other to the
    /// `f32` sum's rounding.
    #[test]
    fn each_kernel_is_within_the_bound_of_the_unrounded_product() {
        for (rows, cols) in [(11, 576), (6, 100), (5, 17)] {
            let w = values(rows, cols, 1);
            let x = values(1, cols, 2);
            let q = QMatrix::quantize(&Tensor::from_vec(w.clone(), (rows, cols), &Device::Cpu).unwrap(), QFormat::BF16)
                .unwrap();
            let mut rounded = vec![0; cols];
            round_row(&x, &mut rounded);
            let outputs: Vec<Vec<f32>> = kernels_to_test()
                .into_iter()
                .map(|kernel| {
                    let mut out = vec![f32::NAN; rows];
                    dots(kernel, &q, 0..rows, &rounded, &mut out);
                    let mut last = [f32::NAN];
                    dots(kernel, &q, rows - 1..rows, &rounded, &mut last);
                    assert_eq!(last[0], out[rows - 1], "{kernel:?}: a row alone and in a run");
                    for (r, got) in out.iter().enumerate() {
                        let (want, row) = (exact(&x, &w[r * cols..][..cols]), &w[r * cols..][..cols]);
                        let err = (f64::from(*got) - want).abs();
                        assert!(err <= bound(&x, row), "{kernel:?} ({rows}, {cols}) row {r}: {got} vs {want}");
                    }
                    out
                })
                .collect();
            for other in &outputs[1..] {
                for (r, (a, b)) in outputs[0].iter().zip(other).enumerate() {
                    let magnitude = bound(&x, &w[r * cols..][..cols]) / 2f64.powi(-8);
                    assert!(
                        f64::from((a - b).abs()) <= cols as f64 * 2f64.powi(-23) * magnitude,
                        "row {r}: {a} vs {b}"
                    );
                }
            }
        }
    }

    /// Through the op: decode-sized products (the row loop, fused with a block-format matrix)
    /// and prefill-sized ones (the GEMM at bf16 precision) are both within the bound.
    #[test]
    fn the_op_keeps_the_bound_for_decode_and_prefill_and_fuses_with_block_formats() {
        let (cols, rows) = (96, 13);
        let w = values(rows, cols, 3);
        let bf16 = Arc::new(
            QMatrix::quantize(&Tensor::from_vec(w.clone(), (rows, cols), &Device::Cpu).unwrap(), QFormat::BF16)
                .unwrap(),
        );
        let q8 = Arc::new(
            QMatrix::quantize(&Tensor::from_vec(values(7, cols, 4), (7, cols), &Device::Cpu).unwrap(), QFormat::Q8_0)
                .unwrap(),
        );
        for tokens in [1, 3, DEQUANTIZED_FROM_TOKENS + 1] {
            let x = values(tokens, cols, 5);
            let input = Tensor::from_vec(x.clone(), (1, tokens, cols), &Device::Cpu).unwrap();
            let y = qmatmul(&input, &bf16).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap(); // (T, rows)
            for (t, row) in y.iter().enumerate() {
                let xt = &x[t * cols..][..cols];
                for (r, got) in row.iter().enumerate() {
                    let wr = &w[r * cols..][..cols];
                    let err = (f64::from(*got) - exact(xt, wr)).abs();
                    assert!(err <= bound(xt, wr), "{tokens} tokens, ({t}, {r}): {got} vs {}", exact(xt, wr));
                }
            }
            let each = qmatmul_each(&input, &[bf16.clone(), q8.clone()]).unwrap();
            assert_eq!(each[0].squeeze(0).unwrap().to_vec2::<f32>().unwrap(), y, "{tokens} tokens, fused");
            let alone = qmatmul(&input, &q8).unwrap();
            let diff = (&each[1] - &alone).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(diff, 0.0, "{tokens} tokens: the Q8_0 product beside a bf16 one");
        }
        // The prefill GEMM rounds the input as the row loop does: the two agree to the sums'
        // rounding, far closer than either is to the product of the unrounded input.
        let tokens = DEQUANTIZED_FROM_TOKENS + 1;
        let input = Tensor::from_vec(values(tokens, cols, 9), (1, tokens, cols), &Device::Cpu).unwrap();
        let prefill = qmatmul(&input, &bf16).unwrap().narrow(1, 0, 2).unwrap();
        let decode = qmatmul(&input.narrow(1, 0, 2).unwrap(), &bf16).unwrap();
        let unrounded =
            input.narrow(1, 0, 2).unwrap().broadcast_matmul(&bf16.dequantize().unwrap().t().unwrap()).unwrap();
        let max_diff =
            |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let (same_rounding, unrounded_input) = (max_diff(&prefill, &decode), max_diff(&prefill, &unrounded));
        assert!(same_rounding * 20.0 < unrounded_input, "{same_rounding} vs {unrounded_input}");
        // The row loop on its own, each token against its own rows.
        let x = values(2, cols, 6);
        let mut out = vec![f32::NAN; 2 * rows];
        matmul(QuantKernel::Scalar, 2, &x, &[&bf16], &mut out);
        assert!(out.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn a_bf16_weight_refuses_gradients_naming_training_precision() {
        let w = Tensor::from_vec(values(4, 32, 7), (4, 32), &Device::Cpu).unwrap();
        let q = Arc::new(QMatrix::quantize(&w, QFormat::BF16).unwrap());
        let x = candle_core::Var::from_tensor(&Tensor::from_vec(values(2, 32, 8), (1, 2, 32), &Device::Cpu).unwrap())
            .unwrap();
        let err = qmatmul(&x, &q).unwrap().sum_all().unwrap().backward().unwrap_err().to_string();
        assert!(err.contains("bf16 for inference") && err.contains("--precision bf16"), "{err}");
    }
}
