//! Activations quantized to 8-bit blocks, the other operand of the integer dot products.
//!
//! Like llama.cpp's `q8_0`/`q8_1`, a row of activations is cut into blocks of 32 values, each
//! stored as 32 `i8` and one `f32` scale: `x ≈ scale·q` with `scale = max|x| / 127` and `q`
//! rounded to nearest, so the error of a value is at most `scale / 2`, 0.4% of the block's
//! largest magnitude. One format serves all five weight formats, including the 256-value K
//! blocks (whose sub-blocks are 32 or 16 values): per-32 scales are finer than `q8_K`'s per-256.
//!
//! One such block per 32 values is llama.cpp's precision. lmforge takes two by default: the
//! second quantizes what the first left over (`x − scale·q`, at most `scale / 2`), so
//! `x ≈ scale₁·q₁ + scale₂·q₂` to within `max|x| / 254²`, about 16-bit precision. The weights'
//! unpacked values then meet two activation blocks, two `vpdpbusd` instead of one; decoding
//! reads the same weight bytes. Why: with one block SmolLM2-135M's logits move by up to ~1
//! against the `f32` product of the same weights, enough to change its greedy answer to
//! "What is the capital of France?" (from "The capital of France is Paris." to "L'Étoile, la …",
//! which llama.cpp's `llama-simple` also begins with on that file: the top two logits of the
//! first answer token are 0.08 apart); with two they move by
//! about 0.01. `LMFORGE_QUANT_ACTIVATIONS=8` takes llama.cpp's one block.
//!
//! The sums of the `q` over each half block are kept too: the weight formats with an offset
//! (`Q4_0`'s `−8`, `Q4_1`'s `+m`, `Q4_K`'s `−m_j`, `Q6_K`'s `−32`, and the `+128` that makes
//! `Q8_0`'s signed values unsigned for `vpdpbusd`) then cost one multiply per block instead of
//! one per value.

/// 32 activations as `scale · qs[i]`.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct Q8Block {
    pub qs: [i8; 32],
    pub scale: f32,
    /// `Σ qs[0..16]`, `Σ qs[16..32]`
    pub half_sums: [i16; 2],
}

impl Q8Block {
    pub const LEN: usize = 32;
    pub const ZERO: Q8Block = Q8Block { qs: [0; 32], scale: 0.0, half_sums: [0; 2] };

    /// `Σ qs`
    #[inline(always)]
    pub fn sum(&self) -> i32 {
        i32::from(self.half_sums[0]) + i32::from(self.half_sums[1])
    }

    /// Quantize 32 values.
    pub fn quantize(x: &[f32]) -> Q8Block {
        debug_assert_eq!(x.len(), Self::LEN);
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        if amax == 0.0 || x.iter().any(|v| !v.is_finite()) {
            // Non-finite input: a zero block would hide it, so let NaN through the scale.
            let scale = if amax == 0.0 { 0.0 } else { f32::NAN };
            return Q8Block { scale, ..Q8Block::ZERO };
        }
        let scale = amax / 127.0;
        let inverse = 127.0 / amax;
        let mut qs = [0i8; 32];
        for (q, v) in qs.iter_mut().zip(x) {
            *q = (v * inverse).round() as i8;
        }
        let half = |r: std::ops::Range<usize>| qs[r].iter().map(|&q| i16::from(q)).sum::<i16>();
        Q8Block { half_sums: [half(0..16), half(16..32)], qs, scale }
    }
}

/// Quantize a row of `32·n` values into `n·digits` blocks: for each 32 values, `digits`
/// blocks in a row, each quantizing what the ones before it left over (their values add up).
pub fn quantize_row(x: &[f32], out: &mut [Q8Block], digits: usize) {
    debug_assert_eq!(x.len() * digits, out.len() * Q8Block::LEN);
    for (blocks, values) in out.chunks_exact_mut(digits).zip(x.chunks_exact(Q8Block::LEN)) {
        let mut rest = [0f32; Q8Block::LEN];
        rest.copy_from_slice(values);
        for block in blocks {
            *block = Q8Block::quantize(&rest);
            for (r, q) in rest.iter_mut().zip(&block.qs) {
                *r -= block.scale * f32::from(*q);
            }
        }
    }
}

/// Two consecutive blocks of activations laid out as the registers of the VNNI kernel's step
/// over two weight blocks (lanes 0–7: the first block, 8–15: the second): for each digit the
/// 64 values and each block's scale in its eight lanes, and the offset term's
/// `Σ_digits scale·Σ q` of each block divided among its eight lanes (by 8, exactly). Built once
/// per token, so the rows that meet it (every row of every matrix) only load it.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
pub struct PairLanes {
    pub values: [[i8; 64]; 2],
    pub scales: [[f32; 16]; 2],
    pub sums: [f32; 16],
}

impl PairLanes {
    const ZERO: PairLanes = PairLanes { values: [[0; 64]; 2], scales: [[0.0; 16]; 2], sums: [0.0; 16] };

    /// The lanes of a row's blocks (`digits` per 32 values), two blocks per entry; an odd last
    /// block is left out (the kernels take it alone).
    pub fn of_row(act: &[Q8Block], digits: usize) -> Vec<PairLanes> {
        act.chunks_exact(2 * digits)
            .map(|two| {
                let mut lanes = PairLanes::ZERO;
                for (half, blocks) in two.chunks_exact(digits).enumerate() {
                    let lanes_of_block = 8 * half..8 * half + 8;
                    for (k, a) in blocks.iter().enumerate() {
                        lanes.values[k][32 * half..32 * half + 32].copy_from_slice(&a.qs);
                        lanes.scales[k][lanes_of_block.clone()].fill(a.scale);
                    }
                    let sum: f32 = blocks.iter().map(|a| a.scale * a.sum() as f32).sum();
                    lanes.sums[lanes_of_block].fill(sum / 8.0);
                }
                lanes
            })
            .collect()
    }
}

/// One activation row: its blocks, and the same as [`PairLanes`] for the VNNI kernel (empty
/// for the scalar one).
#[derive(Clone, Copy)]
pub struct Activations<'a> {
    pub blocks: &'a [Q8Block],
    pub lanes: &'a [PairLanes],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_value_is_within_half_a_step() {
        let x: Vec<f32> = (0..32).map(|i| ((i as f32) * 0.37).sin() * (1.0 + i as f32)).collect();
        let b = Q8Block::quantize(&x);
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!((b.scale - amax / 127.0).abs() < 1e-7);
        for (q, v) in b.qs.iter().zip(&x) {
            assert!((f32::from(*q) * b.scale - v).abs() <= b.scale / 2.0 + 1e-6, "{q} vs {v}");
        }
        assert_eq!(b.sum(), b.qs.iter().map(|&q| i32::from(q)).sum::<i32>());
        assert_eq!(i32::from(b.half_sums[0]), b.qs[..16].iter().map(|&q| i32::from(q)).sum::<i32>());
        assert_eq!(b.qs.iter().map(|q| q.unsigned_abs()).max(), Some(127));
    }

    #[test]
    fn a_second_digit_takes_the_error_to_sixteen_bits() {
        let x: Vec<f32> = (0..64).map(|i| ((i as f32) * 0.91).cos() * (0.5 + (i % 7) as f32)).collect();
        let mut blocks = [Q8Block::ZERO; 4];
        quantize_row(&x, &mut blocks, 2);
        for (values, pair) in x.chunks(32).zip(blocks.chunks(2)) {
            let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (i, v) in values.iter().enumerate() {
                let back = pair[0].scale * f32::from(pair[0].qs[i]) + pair[1].scale * f32::from(pair[1].qs[i]);
                assert!((back - v).abs() <= amax / (254.0 * 254.0) * 1.01, "{back} vs {v}");
            }
        }
    }

    #[test]
    fn pair_lanes_hold_each_blocks_values_scale_and_sum_in_its_half() {
        let x: Vec<f32> = (0..96).map(|i| ((i as f32) * 0.53).sin() * (1.0 + (i % 5) as f32)).collect();
        let mut blocks = [Q8Block::ZERO; 6];
        quantize_row(&x, &mut blocks, 2);
        let lanes = PairLanes::of_row(&blocks, 2);
        assert_eq!(lanes.len(), 1, "three blocks of 32: one pair, the odd one left out");
        for (half, pair) in blocks[..4].chunks(2).enumerate() {
            for (k, block) in pair.iter().enumerate() {
                assert_eq!(&lanes[0].values[k][32 * half..32 * half + 32], &block.qs);
                assert!(lanes[0].scales[k][8 * half..8 * half + 8].iter().all(|&s| s == block.scale));
            }
            let sum: f32 = pair.iter().map(|b| b.scale * b.sum() as f32).sum();
            let spread: f32 = lanes[0].sums[8 * half..8 * half + 8].iter().sum();
            assert!((spread - sum).abs() <= 1e-6 * sum.abs().max(1.0), "{spread} vs {sum}");
        }
    }

    #[test]
    fn zeros_and_non_finite_values() {
        let b = Q8Block::quantize(&[0.0; 32]);
        assert_eq!((b.scale, b.sum()), (0.0, 0));
        let mut x = [1.0f32; 32];
        x[3] = f32::NAN;
        assert!(Q8Block::quantize(&x).scale.is_nan());
        x[3] = f32::INFINITY;
        assert!(Q8Block::quantize(&x).scale.is_nan());
    }
}
