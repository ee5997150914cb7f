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
//!
//! Runs of rows ([`dots`], what the products call) of `Q4_0`, `Q4_1` and `Q8_0` take the
//! paired kernel ([`paired_rows`]) instead: two blocks per 512-bit step, four rows at a time,
//! the activations prepared once per token, the offsets in vector lanes too. It made one
//! thread's SmolLM2-135M `Q4_1` decoding 1.5× faster (README, benchmarks); the per-block
//! kernels above remain for the K formats and for a row's odd last block. With 16-bit
//! activations the paired kernel widens the weights to `i16` and takes one `vpdpwssd` per 32
//! values where the byte kernels take two `vpdpbusd` (one per byte of the activations).
//!
//! [`quantize_row`] is [`act::quantize_row`] in vector instructions, bit for bit.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::act::{self, Activations, Q8Block, WORD_MAX};
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
            QFormat::BF16 => unreachable!("bf16 rows take bf16_rows::dots"),
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

/// [`act::quantize_row`] in AVX-512 instructions: the same blocks, bit for bit (both round
/// to nearest, ties to even). Blocks of zeros, non-finite values or only subnormal ones are
/// left to the portable code.
///
/// # Safety
/// [`available`] is true.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512dq,avx512vl")]
pub unsafe fn quantize_row(x: &[f32], out: &mut [Q8Block], digits: usize) {
    debug_assert_eq!(x.len() * digits, out.len() * Q8Block::LEN);
    let infinity = _mm512_set1_ps(f32::INFINITY);
    for (blocks, values) in out.chunks_exact_mut(digits).zip(x.chunks_exact(Q8Block::LEN)) {
        // SAFETY: a chunk is 32 values.
        let v = unsafe { [_mm512_loadu_ps(values.as_ptr()), _mm512_loadu_ps(values.as_ptr().add(16))] };
        let magnitudes = [_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])];
        let finite = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(magnitudes[0], infinity)
            & _mm512_cmp_ps_mask::<_CMP_LT_OQ>(magnitudes[1], infinity);
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(magnitudes[0], magnitudes[1]));
        let limit = if digits == 1 { 127.0 } else { WORD_MAX };
        let inverse = limit / amax;
        if finite != 0xFFFF || amax == 0.0 || !inverse.is_finite() {
            act::quantize_row(values, blocks, digits);
            continue;
        }
        // (No closures: they would not inherit this function's target features.)
        let inverse = _mm512_set1_ps(inverse);
        // SAFETY: register-only from here, into `blocks`.
        unsafe {
            let q = [rounded(_mm512_mul_ps(v[0], inverse)), rounded(_mm512_mul_ps(v[1], inverse))];
            match blocks {
                [one] => *one = block_of(q, amax / 127.0),
                [hi, lo] => {
                    // `split_word`: hi = (q + 128) >> 8, lo = q − 256·hi
                    let half = _mm512_set1_epi32(128);
                    let high = [
                        _mm512_srai_epi32::<8>(_mm512_add_epi32(q[0], half)),
                        _mm512_srai_epi32::<8>(_mm512_add_epi32(q[1], half)),
                    ];
                    let low = [
                        _mm512_sub_epi32(q[0], _mm512_slli_epi32::<8>(high[0])),
                        _mm512_sub_epi32(q[1], _mm512_slli_epi32::<8>(high[1])),
                    ];
                    let scale = amax / WORD_MAX;
                    (*hi, *lo) = (block_of(high, 256.0 * scale), block_of(low, scale));
                }
                _ => unreachable!("one or two blocks per 32 values"),
            }
        }
    }
}

/// `v` rounded to the nearest integer, ties to even (`f32::round_ties_even`).
#[inline(always)]
unsafe fn rounded(v: __m512) -> __m512i {
    // SAFETY: register-only; the caller has AVX512F.
    unsafe { _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v) }
}

/// The block of 32 values held in `i32` lanes (in `i8` range), with a scale.
#[inline(always)]
unsafe fn block_of(q: [__m512i; 2], scale: f32) -> Q8Block {
    let mut qs = [0i8; 32];
    // SAFETY: 16 bytes each, inside `qs`; the caller has AVX512F.
    unsafe {
        _mm_storeu_si128(qs.as_mut_ptr().cast(), _mm512_cvtepi32_epi8(q[0]));
        _mm_storeu_si128(qs.as_mut_ptr().add(16).cast(), _mm512_cvtepi32_epi8(q[1]));
        let half_sums = [_mm512_reduce_add_epi32(q[0]) as i16, _mm512_reduce_add_epi32(q[1]) as i16];
        Q8Block { qs, scale, half_sums }
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

/// Consecutive weight rows (`row_bytes` each, one after another in `rows`) times one activation
/// row: `out[i]` is [`dot`] of row `i`. `Q4_0`, `Q4_1` and `Q8_0` run the paired kernel
/// ([`paired_rows`]) on groups of four rows, reading the activations as [`PairLanes`](super::act::PairLanes); the K
/// formats run [`dot`] row by row.
///
/// # Safety
/// [`available`] is true; `a` holds a row's number of values in blocks of 32, and its pairs
/// of blocks as lanes; `rows` is `out.len()` rows.
pub unsafe fn dots(format: QFormat, row_bytes: usize, rows: &[u8], a: Activations, digits: usize, out: &mut [f32]) {
    debug_assert_eq!(rows.len(), out.len() * row_bytes);
    // SAFETY: the caller's contract.
    unsafe {
        match (format, digits) {
            (QFormat::Q4_0, 1) => paired::<Q4_0, 1>(row_bytes, rows, a, out),
            (QFormat::Q4_0, _) => paired::<Q4_0, 2>(row_bytes, rows, a, out),
            (QFormat::Q4_1, 1) => paired::<Q4_1, 1>(row_bytes, rows, a, out),
            (QFormat::Q4_1, _) => paired::<Q4_1, 2>(row_bytes, rows, a, out),
            (QFormat::Q8_0, 1) => paired::<Q8_0, 1>(row_bytes, rows, a, out),
            (QFormat::Q8_0, _) => paired::<Q8_0, 2>(row_bytes, rows, a, out),
            (QFormat::Q4K | QFormat::Q6K, _) => {
                for (o, row) in out.iter_mut().zip(rows.chunks_exact(row_bytes)) {
                    *o = dot(format, row, a.blocks, digits);
                }
            }
            (QFormat::BF16, _) => unreachable!("bf16 rows take bf16_rows::dots"),
        }
    }
}

/// Rows per step of the paired kernel: the four accumulators are independent chains, and the
/// scales of the four rows' blocks are converted from half precision in one instruction.
const ROWS: usize = 4;

/// How far ahead [`paired_rows`] prefetches the weights, in rows. (Measured on one thread of
/// SmolLM2 `Q4_1` decoding, CPU time: 8 and 32 rows were 3–5% slower than 16.)
const PREFETCH_ROWS: usize = 4 * ROWS;

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn paired<F: Paired, const D: usize>(row_bytes: usize, rows: &[u8], act: Activations, out: &mut [f32]) {
    let mut groups = rows.chunks_exact(ROWS * row_bytes);
    let mut outs = out.chunks_exact_mut(ROWS);
    for (group, out) in (&mut groups).zip(&mut outs) {
        let rows: [&[u8]; ROWS] = std::array::from_fn(|r| &group[r * row_bytes..][..row_bytes]);
        // SAFETY: the caller's contract.
        out.copy_from_slice(&unsafe { paired_rows::<F, ROWS, D>(rows, act) });
    }
    for (row, out) in groups.remainder().chunks_exact(row_bytes).zip(outs.into_remainder()) {
        // SAFETY: as above.
        *out = unsafe { paired_rows::<F, 1, D>([row], act) }[0];
    }
}

/// A 32-value block format that [`paired_rows`] reads two blocks at a time.
trait Paired {
    /// Bytes per block.
    const BYTES: usize;
    const FORMAT: QFormat;
    /// The offset of the values [`Paired::weights`] gives (`x = d·(q + offset)`).
    const OFFSET: Offset;
    /// The offset of the values [`Paired::words`] gives.
    const WORDS_OFFSET: Offset;

    /// The 64 stored values of the blocks at `b` and `b + BYTES`, in value order, as unsigned
    /// bytes (for `vpdpbusd`).
    unsafe fn weights(b: *const u8) -> __m512i;

    /// The same 64 values as `i16` (for `vpdpwssd`), in the order of 16-bit
    /// [`PairLanes`](super::act::PairLanes) ([`super::act::WORD_ORDER`]): values 0–15 of each
    /// block, then values 16–31 of each.
    unsafe fn words(b: *const u8) -> [__m512i; 2];

    /// The half-precision scales of the two blocks as the bits of four halves: `d₀ d₁ 0 0`,
    /// or `d₀ m₀ d₁ m₁` with an offset per block.
    unsafe fn scale_bits(b: *const u8) -> u64;
}

/// What a format's unpacked values are offset by.
#[derive(Clone, Copy, PartialEq)]
enum Offset {
    /// `x = d·(q + offset)` (`0`: none, and no offset term is computed).
    Fixed(f32),
    /// `x = d·q + m`, each block with its own `m`.
    PerBlock,
}

struct Q4_0;
struct Q4_1;
struct Q8_0;

impl Paired for Q4_0 {
    const BYTES: usize = 18;
    const FORMAT: QFormat = QFormat::Q4_0;
    const OFFSET: Offset = Offset::Fixed(-8.0);
    /// The `−8` is taken off the words themselves.
    const WORDS_OFFSET: Offset = Offset::Fixed(0.0);

    #[inline(always)]
    unsafe fn weights(b: *const u8) -> __m512i {
        // SAFETY: the two blocks' nibbles.
        unsafe { nibbles32(b.add(2), b.add(20)) }
    }

    #[inline(always)]
    unsafe fn words(b: *const u8) -> [__m512i; 2] {
        // SAFETY: the two blocks' nibbles; register-only from there.
        unsafe {
            let [low, high] = nibble_words(b.add(2), b.add(20));
            let eight = _mm512_set1_epi16(8);
            [_mm512_sub_epi16(low, eight), _mm512_sub_epi16(high, eight)]
        }
    }

    #[inline(always)]
    unsafe fn scale_bits(b: *const u8) -> u64 {
        // SAFETY: the two blocks' `d`.
        unsafe { u64::from(read_u16(b)) | u64::from(read_u16(b.add(18))) << 16 }
    }
}

impl Paired for Q4_1 {
    const BYTES: usize = 20;
    const FORMAT: QFormat = QFormat::Q4_1;
    const OFFSET: Offset = Offset::PerBlock;
    const WORDS_OFFSET: Offset = Offset::PerBlock;

    #[inline(always)]
    unsafe fn weights(b: *const u8) -> __m512i {
        // SAFETY: the two blocks' nibbles.
        unsafe { nibbles32(b.add(4), b.add(24)) }
    }

    #[inline(always)]
    unsafe fn words(b: *const u8) -> [__m512i; 2] {
        // SAFETY: the two blocks' nibbles.
        unsafe { nibble_words(b.add(4), b.add(24)) }
    }

    #[inline(always)]
    unsafe fn scale_bits(b: *const u8) -> u64 {
        // SAFETY: the two blocks' `(d, m)`, four bytes each.
        unsafe { u64::from(read_u32(b)) | u64::from(read_u32(b.add(20))) << 32 }
    }
}

impl Paired for Q8_0 {
    const BYTES: usize = 34;
    const FORMAT: QFormat = QFormat::Q8_0;
    /// The `+128` that makes the stored values unsigned.
    const OFFSET: Offset = Offset::Fixed(-128.0);
    /// Sign-extended, the words are the stored values.
    const WORDS_OFFSET: Offset = Offset::Fixed(0.0);

    #[inline(always)]
    unsafe fn weights(b: *const u8) -> __m512i {
        // SAFETY: the two blocks' 32 values each; `+128` makes them unsigned.
        unsafe {
            let (lo, hi) = (_mm256_loadu_si256(b.add(2).cast()), _mm256_loadu_si256(b.add(36).cast()));
            _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), _mm512_set1_epi8(-128))
        }
    }

    #[inline(always)]
    unsafe fn words(b: *const u8) -> [__m512i; 2] {
        // SAFETY: the two blocks' 32 values each (at 2 and 36), 16 at a time.
        unsafe {
            [
                _mm512_cvtepi8_epi16(two_halves(b.add(2), b.add(36))),
                _mm512_cvtepi8_epi16(two_halves(b.add(18), b.add(52))),
            ]
        }
    }

    #[inline(always)]
    unsafe fn scale_bits(b: *const u8) -> u64 {
        // SAFETY: the two blocks' `d`.
        unsafe { u64::from(read_u16(b)) | u64::from(read_u16(b.add(34))) << 16 }
    }
}

#[inline(always)]
unsafe fn read_u16(p: *const u8) -> u16 {
    // SAFETY: the caller points at two readable bytes.
    unsafe { p.cast::<u16>().read_unaligned() }
}

#[inline(always)]
unsafe fn read_u32(p: *const u8) -> u32 {
    // SAFETY: the caller points at four readable bytes.
    unsafe { p.cast::<u32>().read_unaligned() }
}

/// Lane `a` of `v` in lanes 0–7 and lane `b` in lanes 8–15.
#[inline(always)]
unsafe fn spread(v: __m512, a: i32, b: i32) -> __m512 {
    // SAFETY: register-only; the caller has AVX512F.
    unsafe { _mm512_permutexvar_ps(_mm512_set_epi32(b, b, b, b, b, b, b, b, a, a, a, a, a, a, a, a), v) }
}

/// The 64 nibbles of two `Q4_0`/`Q4_1` blocks' 16 bytes each (at `a` and `b`), in value order:
/// each block's low nibbles, then its high ones.
#[inline(always)]
unsafe fn nibbles32(a: *const u8, b: *const u8) -> __m512i {
    // SAFETY: the caller points at 16 readable bytes at each; register-only from there.
    unsafe {
        let both = _mm512_castsi256_si512(_mm256_set_m128i(_mm_loadu_si128(b.cast()), _mm_loadu_si128(a.cast())));
        // 128-bit lanes (a, a, b, b), the second of each pair shifted down by a nibble.
        let doubled = _mm512_shuffle_i64x2::<0b01_01_00_00>(both, both);
        let shifted = _mm512_srlv_epi64(doubled, _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0));
        _mm512_and_si512(shifted, _mm512_set1_epi8(15))
    }
}

/// The 16 bytes at `a`, then the 16 at `b`.
#[inline(always)]
unsafe fn two_halves(a: *const u8, b: *const u8) -> __m256i {
    // SAFETY: the caller points at 16 readable bytes at each.
    unsafe { _mm256_set_m128i(_mm_loadu_si128(b.cast()), _mm_loadu_si128(a.cast())) }
}

/// The 64 nibbles of two `Q4_0`/`Q4_1` blocks' 16 bytes each (at `a` and `b`) as `i16`, in the
/// order of 16-bit [`PairLanes`](super::act::PairLanes): the low nibbles of `a` then of `b`,
/// and the high nibbles of `a` then of `b`.
#[inline(always)]
unsafe fn nibble_words(a: *const u8, b: *const u8) -> [__m512i; 2] {
    // SAFETY: the caller points at 16 readable bytes at each; register-only from there.
    unsafe {
        let bytes = _mm512_cvtepu8_epi16(two_halves(a, b));
        [_mm512_and_si512(bytes, _mm512_set1_epi16(15)), _mm512_srli_epi16::<4>(bytes)]
    }
}

/// [`dot`] of `N` (at most [`ROWS`]) rows of a paired format with one activation row of `D`
/// blocks per 32 values, two weight blocks (64 values) per step.
///
/// Per step, the activations come ready in [`PairLanes`](super::act::PairLanes): the two
/// blocks' values (64 bytes, or 64 words with 16-bit activations), their scales, and the offset
/// term's sums, each a 512-bit load shared by the `N` rows. The `N` rows' block scales are
/// converted from half precision together. Per row, the integer products of the step are one
/// `vpdpbusd` on the weights as bytes (8-bit activations) or two `vpdpwssd` on the weights
/// widened to `i16` (16-bit: the same work as 8-bit per value, where two bytes per activation
/// would take two `vpdpbusd` per 32 values, each with its own conversion and FMA). They are
/// scaled by one multiply; one FMA adds `d·products` and another the offset (`m·Σx`, or
/// `−8·d·Σx` …, absent where the words carry it), each into the row's own accumulators: no
/// scalar arithmetic and nothing summed across lanes until the end of the row.
#[inline(always)]
unsafe fn paired_rows<F: Paired, const N: usize, const D: usize>(rows: [&[u8]; N], act: Activations) -> [f32; N] {
    debug_assert!(N <= ROWS && (D == 1 || D == 2));
    let blocks = rows[0].len() / F::BYTES;
    debug_assert!(act.blocks.len() >= blocks * D && act.lanes.len() >= blocks / 2);
    let offset = if D == 1 { F::OFFSET } else { F::WORDS_OFFSET };
    // SAFETY: every load below is inside a row (`2p + 1 < blocks`), `act.blocks` or
    // `act.lanes`; the caller has AVX512-VNNI and F16C.
    unsafe {
        // (No closures here: a closure does not inherit the caller's target features, and
        // the intrinsics in it would stay calls.)
        let mut acc = [_mm512_setzero_ps(); N];
        let mut offsets = [_mm512_setzero_ps(); N];
        for (p, lanes) in act.lanes[..blocks / 2].iter().enumerate() {
            let mut bits = [0u64; ROWS];
            for r in 0..N {
                bits[r] = F::scale_bits(rows[r].as_ptr().add(2 * p * F::BYTES));
            }
            // Row r's two blocks' scales in lanes 4r..4r + 4.
            let halves =
                _mm512_cvtph_ps(_mm256_set_epi64x(bits[3] as i64, bits[2] as i64, bits[1] as i64, bits[0] as i64));
            let sums = _mm512_load_ps(lanes.sums.as_ptr());
            let scales = _mm512_load_ps(lanes.scales.as_ptr());
            let values = [
                _mm512_load_si512(lanes.values.as_ptr().cast()),
                _mm512_load_si512(lanes.values.as_ptr().add(64).cast()),
            ];
            for r in 0..N {
                let b = rows[r].as_ptr().add(2 * p * F::BYTES);
                // The same bytes `PREFETCH_ROWS` rows on (rows lie one after another): the
                // hardware prefetcher alone left the loads of the weights waiting on memory.
                // Into L2 (`T1`), not L1: one thread's reads of the weights are bound by how
                // many lines it has in flight, and prefetches into L1 hold L1's few miss
                // buffers (one thread decoding: 6% less CPU time than with `T0`; one more `T0`
                // per step for `Q8_0`'s lines made it 8% slower).
                _mm_prefetch::<_MM_HINT_T1>(b.wrapping_add(PREFETCH_ROWS * rows[0].len()).cast());
                let products = if D == 1 {
                    _mm512_dpbusd_epi32(_mm512_setzero_si512(), F::weights(b), values[0])
                } else {
                    let [low, high] = F::words(b);
                    _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(_mm512_setzero_si512(), low, values[0]), high, values[1])
                };
                let v = _mm512_mul_ps(_mm512_cvtepi32_ps(products), scales);
                let i = 4 * r as i32;
                match offset {
                    Offset::Fixed(offset) => {
                        let d = spread(halves, i, i + 1);
                        acc[r] = _mm512_fmadd_ps(d, v, acc[r]);
                        if offset != 0.0 {
                            offsets[r] = _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(offset)), sums, offsets[r]);
                        }
                    }
                    Offset::PerBlock => {
                        acc[r] = _mm512_fmadd_ps(spread(halves, i, i + 2), v, acc[r]);
                        offsets[r] = _mm512_fmadd_ps(spread(halves, i + 1, i + 3), sums, offsets[r]);
                    }
                }
            }
        }
        let mut out = [0.0; N];
        for r in 0..N {
            out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r], offsets[r]));
            if blocks % 2 == 1 {
                let last = blocks - 1;
                out[r] += dot(F::FORMAT, &rows[r][last * F::BYTES..], &act.blocks[last * D..], D);
            }
        }
        out
    }
}
