//! The AVX512-VNNI kernels: the math of [`super::scalar`], 32 values at a time.
//!
//! Each 32-value (sub-)block's stored values are unpacked to 32 unsigned bytes in one 256-bit
//! register, and `vpdpbusd` (`_mm256_dpbusd_epi32`: unsigned bytes × signed bytes, four
//! products summed into each of eight `i32` lanes) multiplies them with the activation block's
//! `i8`. The eight partial sums are converted to `f32` and accumulated with the block's scale
//! by one FMA, so nothing is summed across lanes until the end of the row. The offset terms
//! (`−8·Σa`, `m·Σa`, …) use the activation block's stored sums, in scalar code beside.
//!
//! `Q8_0`'s weights are signed: they are made unsigned by flipping the top bit (`q + 128`) and
//! the `128·Σa` that adds is taken off again. `Q6_K`'s sub-blocks of 16 are lanes 0–3 and 4–7
//! of the product, so their two scales ride in one vector.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::act::Q8Block;
use super::format::QFormat;
use super::scalar::scale_min_k4;

/// Whether this CPU runs these kernels (on the ISA that `LMFORGE_ISA` leaves enabled).
pub fn available() -> bool {
    crate::nn::ops::simd::isa() == crate::nn::ops::simd::Isa::Avx512
        && is_x86_feature_detected!("avx512vnni")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// `Σ_i w_i · x_i` of one weight row and its activations, as [`super::scalar::dot`].
///
/// # Safety
/// [`available`] is true; `act` holds `row`'s number of values in blocks of 32.
pub unsafe fn dot(format: QFormat, row: &[u8], act: &[Q8Block], digits: usize) -> f32 {
    // SAFETY: the caller's contract.
    unsafe {
        match format {
            QFormat::Q4_0 => dot_q4_0(row, act, digits),
            QFormat::Q4_1 => dot_q4_1(row, act, digits),
            QFormat::Q8_0 => dot_q8_0(row, act, digits),
            QFormat::Q4K => dot_q4k(row, act, digits),
            QFormat::Q6K => dot_q6k(row, act, digits),
        }
    }
}

/// `Σ w·a` per group of four bytes: eight `i32` lanes.
#[inline(always)]
unsafe fn products(weights: __m256i, a: &Q8Block) -> __m256i {
    // SAFETY: `a.qs` is 32 bytes; the caller has AVX512-VNNI/VL.
    unsafe { _mm256_dpbusd_epi32(_mm256_setzero_si256(), weights, _mm256_loadu_si256(a.qs.as_ptr().cast())) }
}

/// The 32 nibbles of 16 bytes, low nibbles first (the `Q4_0`/`Q4_1` order).
#[inline(always)]
unsafe fn nibbles16(bytes: *const u8) -> __m256i {
    // SAFETY: the caller points at 16 readable bytes.
    unsafe {
        let q = _mm_loadu_si128(bytes.cast());
        let mask = _mm_set1_epi8(15);
        _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), mask), _mm_and_si128(q, mask))
    }
}

/// The half at `bytes[at..at + 2]` as `f32`, by the F16C instruction (not `half`'s portable
/// conversion, which is not inlined into these kernels).
#[inline(always)]
unsafe fn f16_at(bytes: &[u8], at: usize) -> f32 {
    let bits = u16::from_le_bytes([bytes[at], bytes[at + 1]]);
    // SAFETY: register-only; the caller has F16C.
    unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits)))) }
}

#[inline(always)]
unsafe fn horizontal_sum(v: __m256) -> f32 {
    // SAFETY: register-only arithmetic.
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn dot_q4_0(row: &[u8], act: &[Q8Block], digits: usize) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut offset = 0.0;
    for (block, act) in row.chunks_exact(18).zip(act.chunks_exact(digits)) {
        // SAFETY: bytes 2..18 of the block.
        let weights = unsafe { nibbles16(block.as_ptr().add(2)) };
        for a in act {
            let ds = f16_at(block, 0) * a.scale;
            // SAFETY: as above.
            let p = unsafe { products(weights, a) };
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(ds), acc);
            offset -= ds * (8 * a.sum()) as f32;
        }
    }
    // SAFETY: as above.
    unsafe { horizontal_sum(acc) + offset }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn dot_q4_1(row: &[u8], act: &[Q8Block], digits: usize) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut offset = 0.0;
    for (block, act) in row.chunks_exact(20).zip(act.chunks_exact(digits)) {
        // SAFETY: bytes 4..20 of the block.
        let weights = unsafe { nibbles16(block.as_ptr().add(4)) };
        let (d, m) = (f16_at(block, 0), f16_at(block, 2));
        for a in act {
            // SAFETY: as above.
            let p = unsafe { products(weights, a) };
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * a.scale), acc);
            offset += m * a.scale * a.sum() as f32;
        }
    }
    // SAFETY: as above.
    unsafe { horizontal_sum(acc) + offset }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn dot_q8_0(row: &[u8], act: &[Q8Block], digits: usize) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut offset = 0.0;
    let flip = _mm256_set1_epi8(-128);
    for (block, act) in row.chunks_exact(34).zip(act.chunks_exact(digits)) {
        // SAFETY: bytes 2..34 of the block.
        let w = unsafe { _mm256_xor_si256(_mm256_loadu_si256(block.as_ptr().add(2).cast()), flip) };
        for a in act {
            let ds = f16_at(block, 0) * a.scale;
            // SAFETY: as above.
            let p = unsafe { products(w, a) };
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(ds), acc);
            offset -= ds * (128 * a.sum()) as f32;
        }
    }
    // SAFETY: as above.
    unsafe { horizontal_sum(acc) + offset }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn dot_q4k(row: &[u8], act: &[Q8Block], digits: usize) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut offset = 0.0;
    let mask = _mm256_set1_epi8(15);
    for (block, act) in row.chunks_exact(144).zip(act.chunks_exact(8 * digits)) {
        let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
        let scales = &block[4..16];
        for c in 0..4 {
            // SAFETY: run `c` is bytes 16 + 32c .. 48 + 32c of the block.
            let run = unsafe { _mm256_loadu_si256(block.as_ptr().add(16 + 32 * c).cast()) };
            let halves = [_mm256_and_si256(run, mask), _mm256_and_si256(_mm256_srli_epi16(run, 4), mask)];
            for (t, weights) in halves.into_iter().enumerate() {
                let j = 2 * c + t;
                let (sc, m) = scale_min_k4(j, scales);
                for a in &act[j * digits..(j + 1) * digits] {
                    // SAFETY: as above.
                    let p = unsafe { products(weights, a) };
                    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * f32::from(sc) * a.scale), acc);
                    offset -= dmin * f32::from(m) * a.scale * a.sum() as f32;
                }
            }
        }
    }
    // SAFETY: as above.
    unsafe { horizontal_sum(acc) + offset }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn dot_q6k(row: &[u8], act: &[Q8Block], digits: usize) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut offset = 0.0;
    let (low4, low2) = (_mm256_set1_epi8(15), _mm256_set1_epi8(3));
    for (block, act) in row.chunks_exact(210).zip(act.chunks_exact(8 * digits)) {
        let d = f16_at(block, 208);
        let scales = &block[192..208];
        for h in 0..2 {
            // SAFETY: ql is bytes 0..128, qh 128..192 of the block.
            let (l0, l1, high) = unsafe {
                let p = block.as_ptr();
                (
                    _mm256_loadu_si256(p.add(64 * h).cast()),
                    _mm256_loadu_si256(p.add(64 * h + 32).cast()),
                    _mm256_loadu_si256(p.add(128 + 32 * h).cast()),
                )
            };
            let lows = [
                _mm256_and_si256(l0, low4),
                _mm256_and_si256(l1, low4),
                _mm256_and_si256(_mm256_srli_epi16(l0, 4), low4),
                _mm256_and_si256(_mm256_srli_epi16(l1, 4), low4),
            ];
            let highs = [
                _mm256_and_si256(high, low2),
                _mm256_and_si256(_mm256_srli_epi16(high, 2), low2),
                _mm256_and_si256(_mm256_srli_epi16(high, 4), low2),
                _mm256_and_si256(_mm256_srli_epi16(high, 6), low2),
            ];
            for k in 0..4 {
                let weights = _mm256_or_si256(lows[k], _mm256_slli_epi16(highs[k], 4));
                let (lo, hi) = (f32::from(scales[8 * h + 2 * k] as i8), f32::from(scales[8 * h + 2 * k + 1] as i8));
                let scale = _mm256_setr_ps(lo, lo, lo, lo, hi, hi, hi, hi);
                let g = 4 * h + k;
                for a in &act[g * digits..(g + 1) * digits] {
                    let ds = d * a.scale;
                    // SAFETY: as above.
                    let p = unsafe { products(weights, a) };
                    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(scale, _mm256_set1_ps(ds)), acc);
                    offset -= ds * 32.0 * (lo * f32::from(a.half_sums[0]) + hi * f32::from(a.half_sums[1]));
                }
            }
        }
    }
    // SAFETY: as above.
    unsafe { horizontal_sum(acc) + offset }
}
