//! The portable kernels: one dot product of a weight row (GGUF blocks) with a row of
//! [`Q8Block`] activations, per format, in plain integer arithmetic. They define the math the
//! SIMD kernels ([`super::vnni`]) must reproduce, and run where those cannot.
//!
//! Each block's contribution is an integer dot product of the weight's stored unsigned
//! values with the activations' `i8`, scaled once in `f32`:
//!
//! ```text
//! Q4_0  d·s·(Σ q·a − 8·Σ a)
//! Q4_1  d·s·Σ q·a + m·s·Σ a
//! Q8_0  d·s·Σ q·a                                  (q signed)
//! Q4_K  s·(d·sc_j·Σ q·a − dmin·m_j·Σ a)           per sub-block j of 32
//! Q6_K  d·s·sc_j·(Σ q·a − 32·Σ a)                  per sub-block j of 16
//! ```
//!
//! with `s` the activation block's scale. The K formats' layouts (llama.cpp's
//! `dequantize_row_q4_K` / `_q6_K`):
//! - `Q4_K`: the 128 bytes of `qs` are four runs of 32; run `c` holds sub-block `2c` in its low
//!   nibbles and `2c + 1` in its high ones. `scales` packs eight 6-bit `(sc, m)` pairs
//!   ([`scale_min_k4`]).
//! - `Q6_K`: two halves of 128 values; in half `h`, 32-value group `k` (0..4) takes its low 4 bits
//!   from `ql[64h + 32·(k mod 2) + i]` (low nibble for `k < 2`, high for `k ≥ 2`) and its high 2
//!   bits from bits `2k, 2k+1` of `qh[32h + i]`; its two sub-blocks of 16 have the scales
//!   `scales[8h + 2k]`, `scales[8h + 2k + 1]`.

use super::act::Q8Block;
use super::format::{f16_at, QFormat};

/// `Σ_i w_i · x_i` of one weight row (`format` blocks) and its activations, `digits` blocks
/// per 32 values ([`super::act`]: their contributions add).
pub fn dot(format: QFormat, row: &[u8], act: &[Q8Block], digits: usize) -> f32 {
    match format {
        QFormat::Q4_0 => dot_q4_0(row, act, digits),
        QFormat::Q4_1 => dot_q4_1(row, act, digits),
        QFormat::Q8_0 => dot_q8_0(row, act, digits),
        QFormat::Q4K => dot_q4k(row, act, digits),
        QFormat::Q6K => dot_q6k(row, act, digits),
        QFormat::BF16 => unreachable!("bf16 rows take bf16_rows::dots"),
    }
}

/// `Σ q·a` over 32 values, with the `q` given by `weight(i)`.
#[inline(always)]
fn idot(a: &Q8Block, weight: impl Fn(usize) -> i32) -> i32 {
    (0..32).map(|i| weight(i) * i32::from(a.qs[i])).sum()
}

fn dot_q4_0(row: &[u8], act: &[Q8Block], digits: usize) -> f32 {
    let mut sum = 0.0;
    for (block, act) in row.chunks_exact(18).zip(act.chunks_exact(digits)) {
        let qs = &block[2..18];
        for a in act {
            let dot = idot(a, |i| i32::from(if i < 16 { qs[i] & 15 } else { qs[i - 16] >> 4 }));
            sum += f16_at(block, 0) * a.scale * (dot - 8 * a.sum()) as f32;
        }
    }
    sum
}

fn dot_q4_1(row: &[u8], act: &[Q8Block], digits: usize) -> f32 {
    let mut sum = 0.0;
    for (block, act) in row.chunks_exact(20).zip(act.chunks_exact(digits)) {
        let qs = &block[4..20];
        for a in act {
            let dot = idot(a, |i| i32::from(if i < 16 { qs[i] & 15 } else { qs[i - 16] >> 4 }));
            sum += a.scale * (f16_at(block, 0) * dot as f32 + f16_at(block, 2) * a.sum() as f32);
        }
    }
    sum
}

fn dot_q8_0(row: &[u8], act: &[Q8Block], digits: usize) -> f32 {
    let mut sum = 0.0;
    for (block, act) in row.chunks_exact(34).zip(act.chunks_exact(digits)) {
        for a in act {
            let dot = idot(a, |i| i32::from(block[2 + i] as i8));
            sum += f16_at(block, 0) * a.scale * dot as f32;
        }
    }
    sum
}

/// The 6-bit scale and min of sub-block `j` (0..8) from a `Q4_K` block's 12 scale bytes.
#[inline(always)]
pub(super) fn scale_min_k4(j: usize, scales: &[u8]) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        ((scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4), (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4))
    }
}

fn dot_q4k(row: &[u8], act: &[Q8Block], digits: usize) -> f32 {
    let mut sum = 0.0;
    for (block, act) in row.chunks_exact(144).zip(act.chunks_exact(8 * digits)) {
        let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
        let (scales, qs) = (&block[4..16], &block[16..144]);
        for (i, a) in act.iter().enumerate() {
            let j = i / digits;
            let (sc, m) = scale_min_k4(j, scales);
            let run = &qs[32 * (j / 2)..][..32];
            let shift = 4 * (j % 2);
            let dot = idot(a, |i| i32::from((run[i] >> shift) & 15));
            sum += a.scale * (d * f32::from(sc) * dot as f32 - dmin * f32::from(m) * a.sum() as f32);
        }
    }
    sum
}

fn dot_q6k(row: &[u8], act: &[Q8Block], digits: usize) -> f32 {
    let mut sum = 0.0;
    for (block, act) in row.chunks_exact(210).zip(act.chunks_exact(8 * digits)) {
        let (ql, qh, scales, d) = (&block[..128], &block[128..192], &block[192..208], f16_at(block, 208));
        for (i, a) in act.iter().enumerate() {
            let g = i / digits;
            let (h, k) = (g / 4, g % 4);
            let low = &ql[64 * h + 32 * (k % 2)..][..32];
            let high = &qh[32 * h..][..32];
            let q = |i: usize| i32::from(((low[i] >> (4 * (k / 2))) & 15) | (((high[i] >> (2 * k)) & 3) << 4));
            let half = |r: std::ops::Range<usize>| r.map(|i| q(i) * i32::from(a.qs[i])).sum::<i32>();
            let (sc_lo, sc_hi) = (scales[8 * h + 2 * k] as i8, scales[8 * h + 2 * k + 1] as i8);
            let lo = half(0..16) - 32 * i32::from(a.half_sums[0]);
            let hi = half(16..32) - 32 * i32::from(a.half_sums[1]);
            sum += d * a.scale * (i32::from(sc_lo) * lo + i32::from(sc_hi) * hi) as f32;
        }
    }
    sum
}
