//! Corpus chrF (Popović, 2015) exactly as sacrebleu 2.x computes it with its defaults (chrF2):
//! character n-grams of orders 1..=6 with whitespace removed, no word n-grams, β = 2, mixed
//! case, statistics summed over the corpus, and sacrebleu's "effective order" averaging.
//!
//! ```text
//! per line:  h, r = the line with all whitespace removed, as characters
//!            for n in 1..=6:  hyp_n   += #n-grams of h   (0 when r has no n-gram of that order)
//!                             ref_n   += #n-grams of r
//!                             match_n += Σ_g min(count_h(g), count_r(g))
//! corpus:    over the orders with hyp_n > 0 and ref_n > 0 (the "effective" orders):
//!            P = mean of match_n / hyp_n,  R = mean of match_n / ref_n
//!            chrF = 100 · (1 + β²) P R / (β² P + R)     (0 when P + R = 0 or no order counts)
//! ```
//!
//! Characters are Unicode scalar values (Python's `str` indexing), so "ñ" is one character
//! whether or not accents are stripped elsewhere. Checked against sacrebleu by `tests/metrics.rs`.

use std::collections::HashMap;

use super::python_text::python_split_whitespace;
use crate::error::{Error, Result};

/// Highest character n-gram order (sacrebleu's `CHAR_ORDER`).
pub const CHAR_ORDER: usize = 6;

/// Recall weighs β times as much as precision (sacrebleu's `BETA`).
pub const BETA: f64 = 2.0;

/// Per order: hypothesis n-grams, reference n-grams, matches. They add up over lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChrfStats {
    pub hyp: [u64; CHAR_ORDER],
    pub reference: [u64; CHAR_ORDER],
    pub matches: [u64; CHAR_ORDER],
}

impl std::ops::AddAssign for ChrfStats {
    fn add_assign(&mut self, other: ChrfStats) {
        for n in 0..CHAR_ORDER {
            self.hyp[n] += other.hyp[n];
            self.reference[n] += other.reference[n];
            self.matches[n] += other.matches[n];
        }
    }
}

/// A corpus chrF2 score.
#[derive(Debug, Clone, PartialEq)]
pub struct Chrf {
    /// 0–100.
    pub score: f64,
    pub stats: ChrfStats,
}

impl Chrf {
    /// Corpus chrF2 of `hypotheses` against one reference each.
    pub fn corpus<H: AsRef<str>, R: AsRef<str>>(hypotheses: &[H], references: &[R]) -> Result<Chrf> {
        if hypotheses.len() != references.len() {
            return Err(Error::Input(format!(
                "chrF: {} hypotheses but {} references; they pair up line by line",
                hypotheses.len(),
                references.len()
            )));
        }
        let mut stats = ChrfStats::default();
        for (hyp, reference) in hypotheses.iter().zip(references) {
            stats += line_stats(hyp.as_ref(), reference.as_ref());
        }
        Ok(Chrf::from_stats(stats))
    }

    /// The score of summed statistics (sacrebleu's `_compute_f_score` without eps smoothing).
    pub fn from_stats(stats: ChrfStats) -> Chrf {
        let (mut precision, mut recall, mut orders) = (0.0, 0.0, 0);
        for n in 0..CHAR_ORDER {
            let (hyp, reference, matches) = (stats.hyp[n], stats.reference[n], stats.matches[n]);
            if hyp > 0 && reference > 0 {
                precision += matches as f64 / hyp as f64;
                recall += matches as f64 / reference as f64;
                orders += 1;
            }
        }
        if orders > 0 {
            precision /= orders as f64;
            recall /= orders as f64;
        }
        let factor = BETA * BETA;
        let score = if precision + recall > 0.0 {
            100.0 * (1.0 + factor) * precision * recall / (factor * precision + recall)
        } else {
            0.0
        };
        Chrf { score, stats }
    }
}

/// sacrebleu's line: `chrF2 = 63.43`.
impl std::fmt::Display for Chrf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "chrF{} = {:.2}", BETA as u32, self.score)
    }
}

/// The statistics of one hypothesis line against its reference.
pub fn line_stats(hypothesis: &str, reference: &str) -> ChrfStats {
    let hyp: Vec<char> = python_split_whitespace(hypothesis).flat_map(str::chars).collect();
    let reference: Vec<char> = python_split_whitespace(reference).flat_map(str::chars).collect();
    let mut stats = ChrfStats::default();
    for n in 1..=CHAR_ORDER {
        let hyp_counts = ngram_counts(&hyp, n);
        let ref_counts = ngram_counts(&reference, n);
        let hyp_total: u64 = hyp_counts.values().sum();
        let ref_total: u64 = ref_counts.values().sum();
        let matches: u64 =
            hyp_counts.iter().map(|(g, &count)| count.min(ref_counts.get(g).copied().unwrap_or(0))).sum();
        // sacrebleu: "Don't count hits if no reference exists for that n-gram" order.
        stats.hyp[n - 1] = if ref_total > 0 { hyp_total } else { 0 };
        stats.reference[n - 1] = ref_total;
        stats.matches[n - 1] = matches;
    }
    stats
}

fn ngram_counts(chars: &[char], n: usize) -> HashMap<&[char], u64> {
    let mut counts = HashMap::new();
    for ngram in chars.windows(n) {
        *counts.entry(ngram).or_insert(0) += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_is_100_disjoint_is_0() {
        let lines = ["Y dijo Dios: Sea la luz: y fué la luz."];
        assert!((Chrf::corpus(&lines, &lines).unwrap().score - 100.0).abs() < 1e-9);
        assert_eq!(Chrf::corpus(&["xyz"], &["abc"]).unwrap().score, 0.0);
        assert_eq!(Chrf::corpus(&[""], &["abc"]).unwrap().score, 0.0);
        assert!(Chrf::corpus(&["a"], &["a", "b"]).is_err());
    }

    #[test]
    fn whitespace_is_ignored_and_accents_are_characters() {
        let spaced = Chrf::corpus(&["fu é"], &["fué"]).unwrap();
        assert!((spaced.score - 100.0).abs() < 1e-9, "{spaced}");
        let stripped = line_stats("fue", "fué");
        assert_eq!((stripped.hyp[0], stripped.reference[0], stripped.matches[0]), (3, 3, 2));
    }

    #[test]
    fn recall_weighs_more_than_precision() {
        // Hypothesis a prefix of the reference: precision 1 at every order, recall below 1.
        let short = Chrf::corpus(&["abcdefgh"], &["abcdefghijklmnop"]).unwrap();
        let long = Chrf::corpus(&["abcdefghijklmnop"], &["abcdefgh"]).unwrap();
        assert!(short.score < long.score, "{short} vs {long}");
        assert_eq!(format!("{short}"), format!("chrF2 = {:.2}", short.score));
    }
}
