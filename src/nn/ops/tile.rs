//! Small dense products on tiles that sit in cache, the building block of the attention kernels.
//!
//! Every product attention needs (`Q·Kᵀ`, `P·V`, `dO·Vᵀ`, `Pᵀ·dO`, `dS·K`, `dSᵀ·Q`) is one call
//! of [`gemm_acc`] `C += A·B`, where `B`'s rows are contiguous and `A` is read through strides
//! (so `Pᵀ` and `dSᵀ` need no transposed copy). The micro-kernel keeps an `MR × NR` block of
//! `C` in registers and, per step along `k`, broadcasts `MR` values of `A` against one row of
//! `B`: `MR·NR/lanes` FMAs per `NR/lanes + MR` loads, and no horizontal sums.

use super::simd::{isa, Isa, Real};

/// `C[m×n] += A[m×k] · B[k×n]`.
///
/// `A(i, p)` is `a[i·a_row + p·a_col]`, `B(p, j)` is `b[p·ldb + j]`, `C(i, j)` is `c[i·ldc + j]`.
///
/// Register blocks: with AVX-512's 32 registers, 6 rows × 4 registers (24 accumulators + 4 for
/// the row of `B`); otherwise (AVX2's 16 registers, NEON) 4 rows × 2 registers. Edges fall
/// back to narrower blocks and finally to scalars.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn gemm_acc<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    a_row: usize,
    a_col: usize,
    b: &[T],
    ldb: usize,
    c: &mut [T],
    ldc: usize,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let wide = isa() == Isa::Avx512;
    let mut j = 0;
    if wide && T::BLOCK == 64 {
        while j + 64 <= n {
            column_block::<T, 64>(true, m, k, a, a_row, a_col, &b[j..], ldb, &mut c[j..], ldc);
            j += 64;
        }
    }
    if wide && T::BLOCK == 32 {
        while j + 32 <= n {
            column_block::<T, 32>(true, m, k, a, a_row, a_col, &b[j..], ldb, &mut c[j..], ldc);
            j += 32;
        }
    }
    if T::BLOCK == 64 {
        while j + 16 <= n {
            column_block::<T, 16>(false, m, k, a, a_row, a_col, &b[j..], ldb, &mut c[j..], ldc);
            j += 16;
        }
    }
    while j + 8 <= n {
        column_block::<T, 8>(false, m, k, a, a_row, a_col, &b[j..], ldb, &mut c[j..], ldc);
        j += 8;
    }
    while j < n {
        column_block::<T, 1>(false, m, k, a, a_row, a_col, &b[j..], ldb, &mut c[j..], ldc);
        j += 1;
    }
}

/// All rows of `C` for one block of `NR` columns: blocks of 6 rows (when `six_rows`), then 4,
/// then single rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn column_block<T: Real, const NR: usize>(
    six_rows: bool,
    m: usize,
    k: usize,
    a: &[T],
    a_row: usize,
    a_col: usize,
    b: &[T],
    ldb: usize,
    c: &mut [T],
    ldc: usize,
) {
    let mut i = 0;
    if six_rows {
        while i + 6 <= m {
            micro::<T, 6, NR>(k, &a[i * a_row..], a_row, a_col, b, ldb, &mut c[i * ldc..], ldc);
            i += 6;
        }
    }
    while i + 4 <= m {
        micro::<T, 4, NR>(k, &a[i * a_row..], a_row, a_col, b, ldb, &mut c[i * ldc..], ldc);
        i += 4;
    }
    while i < m {
        micro::<T, 1, NR>(k, &a[i * a_row..], a_row, a_col, b, ldb, &mut c[i * ldc..], ldc);
        i += 1;
    }
}

/// `C[R×W] += A[R×k] · B[k×W]` with the `R×W` block of `C` held in registers.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn micro<T: Real, const R: usize, const W: usize>(
    k: usize,
    a: &[T],
    a_row: usize,
    a_col: usize,
    b: &[T],
    ldb: usize,
    c: &mut [T],
    ldc: usize,
) {
    // Bounds checked once here, so the loop below needs none.
    let a_last = (R - 1) * a_row + (k - 1) * a_col;
    let b_last = (k - 1) * ldb + W;
    let c_last = (R - 1) * ldc + W;
    let (a, b, c) = (&a[..=a_last], &b[..b_last], &mut c[..c_last]);
    let mut acc = [[T::ZERO; W]; R];
    for (r, acc_r) in acc.iter_mut().enumerate() {
        acc_r.copy_from_slice(&c[r * ldc..r * ldc + W]);
    }
    for p in 0..k {
        // A copy, not a reference: LLVM then keeps the row in registers for all R rows
        // instead of re-reading it from memory for each (measured 55 → 80+ GFLOP/s).
        let b_row: [T; W] = b[p * ldb..p * ldb + W].try_into().expect("length W");
        for (r, acc_r) in acc.iter_mut().enumerate() {
            // SAFETY: r ≤ R − 1 and p ≤ k − 1, so the index is ≤ a_last < a.len() (the slicing
            // above checked it). Unchecked because the per-element check cost ~15% here.
            let a_rp = unsafe { *a.get_unchecked(r * a_row + p * a_col) };
            for (x, &b) in acc_r.iter_mut().zip(&b_row) {
                *x = a_rp.mul_add(b, *x);
            }
        }
    }
    for (r, acc_r) in acc.iter().enumerate() {
        c[r * ldc..r * ldc + W].copy_from_slice(acc_r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::too_many_arguments)]
    fn naive(
        m: usize,
        n: usize,
        k: usize,
        a: &[f64],
        ar: usize,
        ac: usize,
        b: &[f64],
        ldb: usize,
        c: &mut [f64],
        ldc: usize,
    ) {
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    c[i * ldc + j] += a[i * ar + p * ac] * b[p * ldb + j];
                }
            }
        }
    }

    #[test]
    fn matches_naive_product_all_edge_sizes() {
        let val = |i: usize| ((i * 7919 % 1000) as f64 / 500.0) - 1.0;
        for &(m, n, k) in &[(1, 1, 1), (5, 3, 2), (4, 64, 16), (9, 77, 13), (64, 64, 64), (3, 41, 1), (7, 100, 9)] {
            for transposed_a in [false, true] {
                let (ar, ac) = if transposed_a { (1, m) } else { (k, 1) };
                let a: Vec<f64> = (0..m * k).map(val).collect();
                let ldb = n + 3;
                let b: Vec<f64> = (0..k * ldb).map(|i| val(i + 11)).collect();
                let ldc = n + 1;
                let c0: Vec<f64> = (0..m * ldc).map(|i| val(i + 5)).collect();
                let mut want = c0.clone();
                naive(m, n, k, &a, ar, ac, &b, ldb, &mut want, ldc);
                let mut got = c0.clone();
                gemm_acc(m, n, k, &a, ar, ac, &b, ldb, &mut got, ldc);
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() < 1e-12, "({m},{n},{k}) {g} vs {w}");
                }
                let (a32, b32): (Vec<f32>, Vec<f32>) =
                    (a.iter().map(|&x| x as f32).collect(), b.iter().map(|&x| x as f32).collect());
                let mut got32: Vec<f32> = c0.iter().map(|&x| x as f32).collect();
                gemm_acc(m, n, k, &a32, ar, ac, &b32, ldb, &mut got32, ldc);
                for (g, w) in got32.iter().zip(&want) {
                    assert!((*g as f64 - w).abs() < 1e-4, "f32 ({m},{n},{k}) {g} vs {w}");
                }
            }
        }
    }
}
