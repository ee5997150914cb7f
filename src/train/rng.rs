//! The training loop's random numbers: a xoshiro256** generator whose whole state is four `u64`s.
//!
//! Why not `rand::rngs::StdRng`: its algorithm may change between `rand` releases and its state
//! cannot be read out, so a checkpoint could not store it. Here the state is plain data
//! ([`RngState`]), written into `state.json` and restored exactly, which is what makes
//! "N steps + resume N steps == 2N steps" hold for data sampling and dropout-like noise.
//!
//! xoshiro256** (Blackman & Vigna, 2018) is fast, passes BigCrush, and has a `jump` that yields
//! 2^128 non-overlapping streams, used by [`TrainRng::split`] to give each consumer (data
//! sampler, dropout, ...) its own stream so that drawing more numbers in one does not shift the
//! other. Seeds are expanded with SplitMix64, as the authors recommend, so nearby seeds give
//! unrelated states.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A generator's complete state, serialised as four 16-digit hex strings (JSON numbers above
/// 2^53 are silently rounded by many readers, e.g. `jq` and JavaScript).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    #[serde(with = "hex_words")]
    pub s: [u64; 4],
}

/// Deterministic, serialisable random numbers for training. Not for cryptography.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrainRng {
    s: [u64; 4],
}

/// One SplitMix64 step: advances `state` and returns a well-mixed output.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl TrainRng {
    /// A generator for `seed`; the same seed always gives the same stream, on every platform.
    pub fn seed_from(seed: u64) -> Self {
        let mut sm = seed;
        // SplitMix64 never outputs four zeros in a row, so the state is always valid.
        Self { s: [splitmix64(&mut sm), splitmix64(&mut sm), splitmix64(&mut sm), splitmix64(&mut sm)] }
    }

    /// Restore a generator saved with [`state`](Self::state).
    pub fn from_state(state: RngState) -> Result<Self> {
        if state.s == [0; 4] {
            return Err(Error::Input(
                "rng state is all zeros, which xoshiro256** cannot leave\nHINT: the saved state is damaged; reseed with TrainRng::seed_from".into(),
            ));
        }
        Ok(Self { s: state.s })
    }

    /// The complete state: `from_state(rng.state())` continues exactly where `rng` is.
    pub fn state(&self) -> RngState {
        RngState { s: self.s }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// The next 32 random bits (the high half, which is the better-mixed one).
    pub fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[0, 1)` with 24 random bits.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// Uniform in `0..n`, without modulo bias (Lemire's multiply-and-reject). `n = 0` is an
    /// input error rather than a panic because `n` often comes from a data set's size.
    pub fn below(&mut self, n: u64) -> Result<u64> {
        if n == 0 {
            return Err(Error::Input("rng: cannot draw from an empty range 0..0".into()));
        }
        let threshold = n.wrapping_neg() % n; // 2^64 mod n
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            if (m as u64) >= threshold {
                return Ok((m >> 64) as u64);
            }
        }
    }

    /// Shuffle in place (Fisher–Yates), the same permutation for the same state.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            // `i + 1 > 0`, so `below` cannot fail.
            let j = self.below(i as u64 + 1).unwrap_or(0) as usize;
            items.swap(i, j);
        }
    }

    /// Advance by 2^128 draws: the skipped-over range is a stream no other `jump` will reach.
    pub fn jump(&mut self) {
        const JUMP: [u64; 4] =
            [0x180e_c6d3_3cfd_0aba, 0xd5a6_1266_f0c9_392c, 0xa958_2618_e03f_c9aa, 0x39ab_dc45_29b1_661c];
        let mut acc = [0u64; 4];
        for word in JUMP {
            for bit in 0..64 {
                if word & (1u64 << bit) != 0 {
                    for (a, s) in acc.iter_mut().zip(self.s) {
                        *a ^= s;
                    }
                }
                self.next_u64();
            }
        }
        self.s = acc;
    }

    /// A new independent stream for another consumer: the child continues from this state, and
    /// this generator jumps 2^128 ahead, so their outputs never overlap. Deterministic, so a
    /// run that splits in the same order after a restore gets the same streams.
    pub fn split(&mut self) -> TrainRng {
        let child = self.clone();
        self.jump();
        child
    }
}

/// So `rand`'s distributions and helpers can draw from a [`TrainRng`].
impl rand::RngCore for TrainRng {
    fn next_u32(&mut self) -> u32 {
        TrainRng::next_u32(self)
    }

    fn next_u64(&mut self) -> u64 {
        TrainRng::next_u64(self)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            let bytes = TrainRng::next_u64(self).to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// `[u64; 4]` as `["0123456789abcdef", ...]`.
mod hex_words {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(words: &[u64; 4], ser: S) -> Result<S::Ok, S::Error> {
        let hex: Vec<String> = words.iter().map(|w| format!("{w:016x}")).collect();
        ser.collect_seq(hex)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<[u64; 4], D::Error> {
        let hex = Vec::<String>::deserialize(de)?;
        if hex.len() != 4 {
            return Err(D::Error::custom(format!("rng state: expected 4 hex words, found {}", hex.len())));
        }
        let mut words = [0u64; 4];
        for (word, text) in words.iter_mut().zip(&hex) {
            *word = u64::from_str_radix(text, 16)
                .map_err(|e| D::Error::custom(format!("rng state: `{text}` is not a 64-bit hex word: {e}")))?;
        }
        Ok(words)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_reference_output() {
        // First output of the reference C implementation for seed 0.
        let mut state = 0u64;
        assert_eq!(splitmix64(&mut state), 0xe220_a839_7b1d_cdaf);
    }

    #[test]
    fn xoshiro256starstar_matches_reference_outputs() {
        // Reference C implementation (prng.di.unimi.it) from state {1, 2, 3, 4}.
        let mut rng = TrainRng::from_state(RngState { s: [1, 2, 3, 4] }).unwrap();
        let got: Vec<u64> = (0..4).map(|_| rng.next_u64()).collect();
        assert_eq!(got, [11520, 0, 1509978240, 1215971899390074240]);
    }

    #[test]
    fn state_round_trips_through_json_exactly() {
        let mut rng = TrainRng::seed_from(42);
        for _ in 0..1000 {
            rng.next_u64();
        }
        let json = serde_json::to_string(&rng.state()).unwrap();
        let mut restored = TrainRng::from_state(serde_json::from_str(&json).unwrap()).unwrap();
        for _ in 0..100 {
            assert_eq!(rng.next_u64(), restored.next_u64());
        }
    }

    #[test]
    fn bad_states_are_errors_not_panics() {
        assert!(TrainRng::from_state(RngState { s: [0; 4] }).is_err());
        assert!(serde_json::from_str::<RngState>(r#"{"s":["1","2","3"]}"#).is_err());
        assert!(serde_json::from_str::<RngState>(r#"{"s":["1","2","3","xyz"]}"#).is_err());
        assert!(TrainRng::seed_from(1).below(0).is_err());
    }

    #[test]
    fn split_streams_differ_and_are_reproducible() {
        let mut a = TrainRng::seed_from(7);
        let mut b = TrainRng::seed_from(7);
        let (mut a1, mut b1) = (a.split(), b.split());
        assert_eq!(a1.next_u64(), b1.next_u64());
        assert_eq!(a.next_u64(), b.next_u64());
        let mut c = TrainRng::seed_from(7);
        let mut c1 = c.split();
        assert_ne!(c1.next_u64(), c.next_u64());
    }

    #[test]
    fn below_is_in_range_and_roughly_uniform() {
        let mut rng = TrainRng::seed_from(3);
        let mut counts = [0u32; 6];
        for _ in 0..60_000 {
            counts[rng.below(6).unwrap() as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (9_000..11_000).contains(&c)), "{counts:?}");
        let x = rng.next_f64();
        assert!((0.0..1.0).contains(&x));
        let y = rng.next_f32();
        assert!((0.0..1.0).contains(&y));
    }

    #[test]
    fn shuffle_is_a_permutation() {
        let mut v: Vec<u32> = (0..100).collect();
        TrainRng::seed_from(5).shuffle(&mut v);
        let mut sorted = v.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_ne!(v, sorted);
    }
}
