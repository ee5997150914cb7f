//! Activations quantized to 8-bit blocks, the other operand of the integer dot products.
//!
//! Like llama.cpp's `q8_0`/`q8_1`, a row of activations is cut into blocks of 32 values, each
//! stored as 32 `i8` and one `f32` scale: `x ≈ scale·q` with `scale = max|x| / 127` and `q`
//! rounded to nearest, so the error of a value is at most `scale / 2`, 0.4% of the block's
//! largest magnitude. One format serves all five weight formats, including the 256-value K
//! blocks (whose sub-blocks are 32 or 16 values): per-32 scales are finer than `q8_K`'s per-256.
//!
//! One such block per 32 values is llama.cpp's precision. lmforge takes 16 bits by default:
//! each value is rounded once to `q = round(x / s)` in `±32512` (`s = max|x| / (127·256)`), and
//! `q` is held as its two bytes, `q = 256·hi + lo` with `hi` in `±127` and `lo` in
//! `−128..=127`: two blocks per 32 values, `(hi, 256·s)` and `(lo, s)`, whose values add up to
//! `s·q` exactly. The error of a value is at most `s / 2 = max|x| / 65024`. The kernels that
//! work in bytes meet each weight with both blocks (two `vpdpbusd`); the paired VNNI kernel
//! joins the bytes back into one `i16` per value ([`PairLanes`]) for one `vpdpwssd` per 32
//! values. Decoding reads the same weight bytes either way. Why 16 bits: with one block
//! SmolLM2-135M's logits move by up to ~1 against the `f32` product of the same weights, enough
//! to change its greedy answer to "What is the capital of France?" (from "The capital of
//! France is Paris." to "L'Étoile, la …", which llama.cpp's `llama-simple` also begins with on
//! that file: the top two logits of the first answer token are 0.08 apart); with two they move
//! by about 0.01. `LMFORGE_QUANT_ACTIVATIONS=8` takes llama.cpp's one block.
//!
//! Rounding is to nearest, ties to even (what the vector instructions do), so the AVX-512
//! quantizer ([`super::vnni::quantize_row`]) gives these blocks bit for bit.
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

    /// Quantize 32 values to one block (8-bit precision).
    pub fn quantize(x: &[f32]) -> Q8Block {
        debug_assert_eq!(x.len(), Self::LEN);
        let Some(amax) = magnitude(x) else {
            return Q8Block { scale: f32::NAN, ..Q8Block::ZERO };
        };
        if amax == 0.0 {
            return Q8Block::ZERO;
        }
        let inverse = 127.0 / amax;
        let mut qs = [0i8; 32];
        for (q, v) in qs.iter_mut().zip(x) {
            *q = (v * inverse).round_ties_even() as i8;
        }
        Q8Block::new(qs, amax / 127.0)
    }

    /// Quantize 32 values to 16 bits, as two blocks: `(hi, 256·s)` and `(lo, s)` (module docs).
    pub fn quantize16(x: &[f32]) -> [Q8Block; 2] {
        debug_assert_eq!(x.len(), Self::LEN);
        let Some(amax) = magnitude(x) else {
            return [Q8Block { scale: f32::NAN, ..Q8Block::ZERO }; 2];
        };
        if amax == 0.0 {
            return [Q8Block::ZERO; 2];
        }
        let inverse = WORD_MAX / amax;
        let (mut hi, mut lo) = ([0i8; 32], [0i8; 32]);
        for ((h, l), v) in hi.iter_mut().zip(&mut lo).zip(x) {
            let q = (v * inverse).round_ties_even() as i32; // ±32512
            let (high, low) = split_word(q);
            (*h, *l) = (high as i8, low as i8);
        }
        let scale = amax / WORD_MAX;
        [Q8Block::new(hi, 256.0 * scale), Q8Block::new(lo, scale)]
    }

    /// The block of `qs` and `scale`, with its half sums.
    pub fn new(qs: [i8; 32], scale: f32) -> Q8Block {
        let half = |r: std::ops::Range<usize>| qs[r].iter().map(|&q| i16::from(q)).sum::<i16>();
        Q8Block { half_sums: [half(0..16), half(16..32)], qs, scale }
    }
}

/// The largest 16-bit value of a block, `127·256`: its high byte then stays in `±127`.
pub const WORD_MAX: f32 = 32512.0;

/// `q` (in `±32512`) as `(hi, lo)` with `q = 256·hi + lo`, `hi` in `±127` and `lo` in
/// `−128..=127`.
#[inline(always)]
pub fn split_word(q: i32) -> (i32, i32) {
    let hi = (q + 128) >> 8;
    (hi, q - 256 * hi)
}

/// `max|x|`, or `None` when a value is not finite (a zero block would hide it: the caller lets
/// NaN through the scale instead).
fn magnitude(x: &[f32]) -> Option<f32> {
    x.iter().all(|v| v.is_finite()).then(|| x.iter().fold(0f32, |m, v| m.max(v.abs())))
}

/// Quantize a row of `32·n` values into `n·digits` blocks: one 8-bit block per 32 values
/// (`digits` 1), or the two blocks of 16 bits (`digits` 2). The portable version of the AVX-512
/// one (`vnni::quantize_row`), which gives the same blocks bit for bit.
pub fn quantize_row(x: &[f32], out: &mut [Q8Block], digits: usize) {
    debug_assert_eq!(x.len() * digits, out.len() * Q8Block::LEN);
    for (blocks, values) in out.chunks_exact_mut(digits).zip(x.chunks_exact(Q8Block::LEN)) {
        match blocks {
            [one] => *one = Q8Block::quantize(values),
            two => two.copy_from_slice(&Q8Block::quantize16(values)),
        }
    }
}

/// Two consecutive blocks of activations laid out as the registers of the paired VNNI kernel's
/// step over two weight blocks, built once per token so that the rows that meet it (every row
/// of every matrix) only load it. Lanes 0–7 of `scales` and `sums` belong to the first block,
/// lanes 8–15 to the second.
///
/// - 8-bit (one block per 32 values): `values` holds the 64 `i8` in value order, then 64 unused
///   bytes; `vpdpbusd` sums four products into each `i32` lane.
/// - 16 bits (two): `values` holds the 64 values as `i16` (`256·hi + lo`) in the order of the
///   unpacked 4-bit weights: values 0–15 of each block (the low nibbles of its 16 bytes), then
///   values 16–31 (the high nibbles), [`WORD_ORDER`]; `vpdpwssd` sums two products into each
///   `i32` lane, so lanes 0–7 of both products are still the first block.
///
/// `scales` is each block's scale (of its last digit: `s` for 16 bits), and `sums` the offset
/// term's `Σ_digits scale·Σ q` of each block divided among its eight lanes (by 8, exactly).
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
pub struct PairLanes {
    pub values: [u8; 128],
    pub scales: [f32; 16],
    pub sums: [f32; 16],
}

/// Where value `i` of the first block (`i`) and of the second (`32 + i`) sit among the 64
/// `i16` of 16-bit [`PairLanes`]: the order in which the kernel unpacks two blocks' nibbles.
pub const WORD_ORDER: [usize; 64] = {
    let mut order = [0; 64];
    let mut i = 0;
    while i < 64 {
        let (block, value) = (i / 32, i % 32);
        order[i] = 32 * (value / 16) + 16 * block + value % 16;
        i += 1;
    }
    order
};

impl PairLanes {
    const ZERO: PairLanes = PairLanes { values: [0; 128], scales: [0.0; 16], sums: [0.0; 16] };

    /// The lanes of a row's blocks (`digits` per 32 values), two blocks per entry; an odd last
    /// block is left out (the kernels take it alone).
    pub fn of_row(act: &[Q8Block], digits: usize) -> Vec<PairLanes> {
        act.chunks_exact(2 * digits)
            .map(|two| {
                let mut lanes = PairLanes::ZERO;
                for (half, blocks) in two.chunks_exact(digits).enumerate() {
                    let lanes_of_block = 8 * half..8 * half + 8;
                    match blocks {
                        [a] => {
                            for (v, &q) in lanes.values[32 * half..32 * half + 32].iter_mut().zip(&a.qs) {
                                *v = q as u8;
                            }
                        }
                        [hi, lo] => {
                            for i in 0..32 {
                                let word = 256 * i16::from(hi.qs[i]) + i16::from(lo.qs[i]);
                                let at = 2 * WORD_ORDER[32 * half + i];
                                lanes.values[at..at + 2].copy_from_slice(&word.to_le_bytes());
                            }
                        }
                        _ => unreachable!("one or two blocks per 32 values"),
                    }
                    let last = blocks.last().expect("a block per 32 values");
                    lanes.scales[lanes_of_block.clone()].fill(last.scale);
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
    fn sixteen_bits_are_one_rounding_held_as_two_bytes() {
        let x: Vec<f32> = (0..64).map(|i| ((i as f32) * 0.91).cos() * (0.5 + (i % 7) as f32)).collect();
        let mut blocks = [Q8Block::ZERO; 4];
        quantize_row(&x, &mut blocks, 2);
        for (values, pair) in x.chunks(32).zip(blocks.chunks(2)) {
            let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = pair[1].scale;
            assert_eq!((s, pair[0].scale), (amax / WORD_MAX, 256.0 * s));
            for (i, v) in values.iter().enumerate() {
                let (hi, lo) = (i32::from(pair[0].qs[i]), i32::from(pair[1].qs[i]));
                assert!(hi.abs() <= 127, "{hi}");
                let word = 256 * hi + lo;
                assert!((word as f32 - v / s).abs() <= 0.5 + 1e-3, "value {i}: {word} for {}", v / s);
                // within the 8-bit-pair bound the tests of the products use, amax / 254²
                let back = pair[0].scale * hi as f32 + pair[1].scale * lo as f32;
                assert!((back - v).abs() <= amax / 65024.0 * 1.001, "{back} vs {v}");
                assert!((back - v).abs() <= amax / (254.0 * 254.0), "{back} vs {v}");
            }
        }
        // The extremes: the high byte stays in ±127, the low one in −128..=127.
        for q in [-32512, -32385, -32384, -129, -128, -1, 0, 127, 128, 32383, 32384, 32512] {
            let (hi, lo) = split_word(q);
            assert!((-127..=127).contains(&hi) && (-128..=127).contains(&lo) && 256 * hi + lo == q, "{q}");
        }
    }

    #[test]
    fn pair_lanes_hold_each_blocks_values_scale_and_sum_in_its_half() {
        let x: Vec<f32> = (0..96).map(|i| ((i as f32) * 0.53).sin() * (1.0 + (i % 5) as f32)).collect();
        for digits in [1, 2] {
            let mut blocks = vec![Q8Block::ZERO; 3 * digits];
            quantize_row(&x, &mut blocks, digits);
            let lanes = PairLanes::of_row(&blocks, digits);
            assert_eq!(lanes.len(), 1, "three blocks of 32: one pair, the odd one left out");
            let words: Vec<i16> = lanes[0].values.chunks(2).map(|b| i16::from_le_bytes([b[0], b[1]])).collect();
            for (half, block) in blocks[..2 * digits].chunks(digits).enumerate() {
                for i in 0..32 {
                    let (got, want) = match block {
                        [a] => (i32::from(lanes[0].values[32 * half + i] as i8), i32::from(a.qs[i])),
                        [hi, lo] => (
                            i32::from(words[WORD_ORDER[32 * half + i]]),
                            256 * i32::from(hi.qs[i]) + i32::from(lo.qs[i]),
                        ),
                        _ => unreachable!(),
                    };
                    assert_eq!(got, want, "{digits} digits, block {half}, value {i}");
                }
                let scale = block[digits - 1].scale;
                assert!(lanes[0].scales[8 * half..8 * half + 8].iter().all(|&s| s == scale));
                let sum: f32 = block.iter().map(|b| b.scale * b.sum() as f32).sum();
                let spread: f32 = lanes[0].sums[8 * half..8 * half + 8].iter().sum();
                assert!((spread - sum).abs() <= 1e-6 * sum.abs().max(1.0), "{spread} vs {sum}");
            }
        }
        // Each of the 64 places is taken once.
        let mut seen = WORD_ORDER.to_vec();
        seen.sort_unstable();
        assert_eq!(seen, (0..64).collect::<Vec<_>>());
    }

    #[test]
    fn zeros_and_non_finite_values() {
        let b = Q8Block::quantize(&[0.0; 32]);
        assert_eq!((b.scale, b.sum()), (0.0, 0));
        assert!(Q8Block::quantize16(&[0.0; 32]).iter().all(|b| b.scale == 0.0 && b.sum() == 0));
        let mut x = [1.0f32; 32];
        for bad in [f32::NAN, f32::INFINITY] {
            x[3] = bad;
            assert!(Q8Block::quantize(&x).scale.is_nan());
            assert!(Q8Block::quantize16(&x).iter().all(|b| b.scale.is_nan()));
        }
        // A NaN among zeros is not hidden by a zero scale.
        let mut zeros = [0.0f32; 32];
        zeros[0] = f32::NAN;
        assert!(Q8Block::quantize(&zeros).scale.is_nan());
    }
}
