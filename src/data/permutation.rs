//! A seeded random permutation of `0..n` that is computed, not stored.
//!
//! Why: a dataset of 10^10 tokens at sequence length 1024 has ~10^7 windows; a shuffled index
//! array would be 40–80 MB rebuilt every epoch and would have to be saved in (or recomputed for)
//! every checkpoint. Instead `apply(i)` computes the `i`-th element directly, so the sampler's
//! whole position is two integers.
//!
//! How: a balanced Feistel network over `2k`-bit integers is a bijection on `0..4^k` for any
//! round function (each round `(L, R) → (R, L ^ F(R))` is invertible). Pick the smallest
//! `4^k ≥ n`; to map into `0..n`, re-apply the network until the value lands below `n`
//! ("cycle walking"). Following the cycle that `i < n` lies on must return below `n`, so this is
//! a bijection on `0..n`; since `4^k < 4n`, it takes fewer than 4 steps on average.
//!
//! Worked example, n = 5: k = 2, the domain is 0..16. If the network maps 3 → 12 → 7 → 1,
//! then `apply(3)` walks 12 (≥ 5), 7 (≥ 5) and returns 1.

/// Rounds of the network. Four already give a pseudo-random permutation in theory
/// (Luby–Rackoff); six give visibly better mixing on tiny domains.
const ROUNDS: usize = 6;

#[derive(Debug, Clone)]
pub(crate) struct Permutation {
    n: u64,
    half_bits: u32,
    keys: [u64; ROUNDS],
}

impl Permutation {
    /// The permutation of `0..n` for `(seed, stream)`: different streams (e.g. epochs) give
    /// unrelated permutations.
    pub fn new(n: u64, seed: u64, stream: u64) -> Self {
        // Bits needed for n - 1, rounded up to an even number ≥ 2.
        let bits = (64 - n.saturating_sub(1).leading_zeros()).max(2);
        let half_bits = bits.div_ceil(2);
        let mut state = mix(seed ^ mix(stream.wrapping_add(0x9E37_79B9_7F4A_7C15)));
        let keys = std::array::from_fn(|_| {
            state = mix(state.wrapping_add(0x9E37_79B9_7F4A_7C15));
            state
        });
        Permutation { n, half_bits, keys }
    }

    /// The element at position `i` (`i < n`) of the permutation.
    pub fn apply(&self, i: u64) -> u64 {
        debug_assert!(i < self.n, "permutation index {i} out of range 0..{}", self.n);
        let mut x = i;
        loop {
            x = self.feistel(x);
            if x < self.n {
                return x;
            }
        }
    }

    fn feistel(&self, x: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut left, mut right) = (x >> self.half_bits, x & mask);
        for &key in &self.keys {
            (left, right) = (right, left ^ (mix(right ^ key) & mask));
        }
        (left << self.half_bits) | right
    }
}

/// SplitMix64's finalizer: a fast, well-mixing bijection on u64.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
