//! Corpus BLEU (Papineni et al., 2002) exactly as sacrebleu 2.x computes it with its defaults:
//! the `13a` tokenizer (mteval-v13a, WMT's), n-grams up to 4, mixed case, exponential
//! smoothing ("exp", NIST's), and the brevity penalty, from statistics summed over the corpus.
//!
//! ```text
//! per line:  hyp, ref ──13a──▶ tokens; for n in 1..=4:
//!            total_n   += #n-grams of hyp
//!            correct_n += Σ_g min(count_hyp(g), count_ref(g))        (clipped matches)
//!            sys_len += |hyp tokens|, ref_len += |ref tokens|
//! corpus:    p_n = 100·correct_n / total_n, or 100 / (2^k · total_n) for the k-th order with
//!            no match ("exp" smoothing); a 0 when total_n = 0 (that order and the ones above)
//!            BP  = 1 if sys_len ≥ ref_len, else exp(1 − ref_len / sys_len)   (0 if sys_len = 0)
//!            BLEU = BP · exp(Σ_n ln p_n / 4), with ln 0 taken as −9999999999; 0 if nothing matched
//! ```
//!
//! Every detail here (which characters 13a splits off, Python's notion of whitespace, the
//! floored logarithm) is sacrebleu's, checked against it by `tests/metrics.rs` on real verses.
//! One reference per hypothesis.

use std::collections::HashMap;

use super::python_text::{python_split_whitespace, python_trim_end};
use crate::error::{Error, Result};

/// Highest n-gram order (sacrebleu's `MAX_NGRAM_ORDER`).
pub const MAX_ORDER: usize = 4;

/// sacrebleu's `my_log(0)`: a floor, so an order without n-grams drives BLEU to 0 without NaN.
const LOG_ZERO: f64 = -9_999_999_999.0;

/// Sufficient statistics of corpus BLEU; they add up over lines (and over shards of a corpus).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BleuStats {
    /// Hypothesis tokens (`hyp_len`).
    pub sys_len: u64,
    /// Reference tokens (`ref_len`).
    pub ref_len: u64,
    /// Clipped n-gram matches for n = 1..=4.
    pub correct: [u64; MAX_ORDER],
    /// Hypothesis n-grams for n = 1..=4.
    pub total: [u64; MAX_ORDER],
}

impl std::ops::AddAssign for BleuStats {
    fn add_assign(&mut self, other: BleuStats) {
        self.sys_len += other.sys_len;
        self.ref_len += other.ref_len;
        for n in 0..MAX_ORDER {
            self.correct[n] += other.correct[n];
            self.total[n] += other.total[n];
        }
    }
}

/// A corpus BLEU score with the numbers sacrebleu prints beside it.
#[derive(Debug, Clone, PartialEq)]
pub struct Bleu {
    /// 0–100.
    pub score: f64,
    /// n-gram precisions in percent, smoothed as described in the module docs.
    pub precisions: [f64; MAX_ORDER],
    /// Brevity penalty.
    pub bp: f64,
    pub stats: BleuStats,
}

impl Bleu {
    /// Corpus BLEU of `hypotheses` against one reference each.
    pub fn corpus<H: AsRef<str>, R: AsRef<str>>(hypotheses: &[H], references: &[R]) -> Result<Bleu> {
        if hypotheses.len() != references.len() {
            return Err(Error::Input(format!(
                "BLEU: {} hypotheses but {} references; they pair up line by line",
                hypotheses.len(),
                references.len()
            )));
        }
        let mut stats = BleuStats::default();
        for (hyp, reference) in hypotheses.iter().zip(references) {
            stats += line_stats(hyp.as_ref(), reference.as_ref());
        }
        Ok(Bleu::from_stats(stats))
    }

    /// The score of summed statistics (sacrebleu's `compute_bleu` with `smooth_method="exp"`).
    pub fn from_stats(stats: BleuStats) -> Bleu {
        let bp = if stats.sys_len >= stats.ref_len {
            1.0
        } else if stats.sys_len > 0 {
            (1.0 - stats.ref_len as f64 / stats.sys_len as f64).exp()
        } else {
            0.0
        };
        let mut precisions = [0.0; MAX_ORDER];
        if stats.correct.iter().all(|&c| c == 0) {
            return Bleu { score: 0.0, precisions, bp, stats };
        }
        let mut unmatched_orders = 0;
        for (n, precision) in precisions.iter_mut().enumerate() {
            let (correct, total) = (stats.correct[n], stats.total[n]);
            if total == 0 {
                break; // this order and the higher ones stay 0
            }
            *precision = if correct == 0 {
                unmatched_orders += 1;
                100.0 / (2f64.powi(unmatched_orders) * total as f64)
            } else {
                100.0 * correct as f64 / total as f64
            };
        }
        let log_sum: f64 = precisions.iter().map(|&p| if p == 0.0 { LOG_ZERO } else { p.ln() }).sum();
        let score = bp * (log_sum / MAX_ORDER as f64).exp();
        Bleu { score, precisions, bp, stats }
    }

    /// `sys_len / ref_len` (0 without references).
    pub fn ratio(&self) -> f64 {
        if self.stats.ref_len == 0 {
            0.0
        } else {
            self.stats.sys_len as f64 / self.stats.ref_len as f64
        }
    }
}

/// sacrebleu's line: `BLEU = 38.71 66.2/45.2/32.1/23.4 (BP = 1.000 ratio = 1.059 hyp_len = 5738 ref_len = 5417)`.
impl std::fmt::Display for Bleu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let precisions: Vec<String> = self.precisions.iter().map(|p| format!("{p:.1}")).collect();
        write!(
            f,
            "BLEU = {:.2} {} (BP = {:.3} ratio = {:.3} hyp_len = {} ref_len = {})",
            self.score,
            precisions.join("/"),
            self.bp,
            self.ratio(),
            self.stats.sys_len,
            self.stats.ref_len
        )
    }
}

/// The statistics of one hypothesis line against its reference.
pub fn line_stats(hypothesis: &str, reference: &str) -> BleuStats {
    // sacrebleu strips trailing whitespace before tokenizing (`sent.rstrip()`).
    let hyp = tokenize_13a(python_trim_end(hypothesis));
    let reference = tokenize_13a(python_trim_end(reference));
    let hyp_tokens: Vec<&str> = hyp.split(' ').filter(|t| !t.is_empty()).collect();
    let ref_tokens: Vec<&str> = reference.split(' ').filter(|t| !t.is_empty()).collect();
    let ref_counts = ngram_counts(&ref_tokens);
    let mut stats =
        BleuStats { sys_len: hyp_tokens.len() as u64, ref_len: ref_tokens.len() as u64, ..Default::default() };
    for (ngram, count) in ngram_counts(&hyp_tokens) {
        let n = ngram.len() - 1;
        stats.total[n] += count;
        stats.correct[n] += count.min(ref_counts.get(ngram).copied().unwrap_or(0));
    }
    stats
}

/// Every n-gram of orders 1..=4 with its count.
fn ngram_counts<'a>(tokens: &'a [&'a str]) -> HashMap<&'a [&'a str], u64> {
    let mut counts = HashMap::new();
    for n in 1..=MAX_ORDER {
        for ngram in tokens.windows(n) {
            *counts.entry(ngram).or_insert(0) += 1;
        }
    }
    counts
}

/// sacrebleu's `13a` tokenizer (mteval-v13a.pl): tokens separated by single spaces.
///
/// ```text
/// remove "<skipped>", join "-\n" hyphenations, newlines → spaces, unescape &quot; &amp; &lt; &gt;
/// then, on " line ":
///   1. space out every ASCII punctuation except ' , - .   ({|}~ [\]^_` space!"#$%& ()*+ :;<=>? @ /)
///   2. space out . and , after a non-digit              ("a." → "a . ")
///   3. space out . and , before a non-digit             (".a" → " . a")
///   4. space out - after a digit                        ("2-" → "2 - ")
///   collapse whitespace runs (Python's whitespace) to single spaces, trim
/// ```
/// Each rule is one regex substitution in sacrebleu, applied left to right without overlaps, so
/// "a..b" becomes "a . .b" after rule 2 (the second "." was consumed as the first one's
/// neighbour), then "a . . b" after rule 3. The scans below reproduce that exactly.
pub fn tokenize_13a(line: &str) -> String {
    let mut line = line.replace("<skipped>", "").replace("-\n", "").replace('\n', " ");
    if line.contains('&') {
        line = line.replace("&quot;", "\"").replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">");
    }
    let chars: Vec<char> = format!(" {line} ").chars().collect();
    let chars = substitute(&chars, 1, |c| is_13a_punctuation(c[0]), |c, out| out.extend([' ', c[0], ' ']));
    let chars = substitute(
        &chars,
        2,
        |c| !c[0].is_ascii_digit() && matches!(c[1], '.' | ','),
        |c, out| out.extend([c[0], ' ', c[1], ' ']),
    );
    let chars = substitute(
        &chars,
        2,
        |c| matches!(c[0], '.' | ',') && !c[1].is_ascii_digit(),
        |c, out| out.extend([' ', c[0], ' ', c[1]]),
    );
    let chars =
        substitute(&chars, 2, |c| c[0].is_ascii_digit() && c[1] == '-', |c, out| out.extend([c[0], ' ', c[1], ' ']));
    let text: String = chars.into_iter().collect();
    python_split_whitespace(&text).collect::<Vec<_>>().join(" ")
}

/// One left-to-right, non-overlapping substitution of a fixed-width pattern (what Python's
/// `re.sub` does for these patterns): where `matches` holds for the `width` characters at the
/// cursor, `replace` writes their replacement and the cursor jumps past them.
fn substitute(
    chars: &[char],
    width: usize,
    matches: impl Fn(&[char]) -> bool,
    replace: impl Fn(&[char], &mut Vec<char>),
) -> Vec<char> {
    let mut out = Vec::with_capacity(chars.len() + chars.len() / 2);
    let mut i = 0;
    while i < chars.len() {
        if i + width <= chars.len() && matches(&chars[i..i + width]) {
            replace(&chars[i..i + width], &mut out);
            i += width;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

/// The character class of 13a's first rule, `[\{-\~\[-\` -\&\(-\+\:-\@\/]`: ASCII
/// punctuation (and the space) except `'`, `,`, `-` and `.`, which have rules of their own or
/// none.
fn is_13a_punctuation(c: char) -> bool {
    matches!(c, '{'..='~' | '['..='`' | ' '..='&' | '('..='+' | ':'..='@' | '/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_splits_like_mteval_13a() {
        assert_eq!(tokenize_13a("Hello, world."), "Hello , world .");
        assert_eq!(tokenize_13a("It cost 3.14 or 1,000, 2-3 times."), "It cost 3.14 or 1,000 , 2 - 3 times .");
        assert_eq!(tokenize_13a("a..b"), "a . . b");
        assert_eq!(tokenize_13a("don't (hi) x-y"), "don't ( hi ) x-y");
        assert_eq!(tokenize_13a("&amp;lt; &quot;q&quot;"), "< \" q \"");
        assert_eq!(tokenize_13a("  "), "");
    }

    #[test]
    fn identical_text_scores_100_and_nothing_scores_0() {
        let lines = ["In the beginning God created the heaven and the earth."];
        let bleu = Bleu::corpus(&lines, &lines).unwrap();
        assert!((bleu.score - 100.0).abs() < 1e-9, "{bleu}");
        assert_eq!(bleu.stats.correct, bleu.stats.total);
        let none = Bleu::corpus(&["x y z w"], &lines).unwrap();
        assert_eq!(none.score, 0.0);
        assert!(Bleu::corpus(&["a"], &["a", "b"]).is_err());
    }

    #[test]
    fn unmatched_orders_are_smoothed_exponentially() {
        // 5 tokens, unigrams all match, no longer n-gram does: p = 100, 100/(2·4), 100/(4·3), 100/(8·2).
        let bleu = Bleu::corpus(&["a b c d e"], &["e d c b a"]).unwrap();
        assert_eq!(bleu.stats.correct, [5, 0, 0, 0]);
        let expected = [100.0, 100.0 / 8.0, 100.0 / 12.0, 100.0 / 16.0];
        for (p, e) in bleu.precisions.iter().zip(expected) {
            assert!((p - e).abs() < 1e-12, "{:?}", bleu.precisions);
        }
        let geometric_mean = expected.iter().map(|p: &f64| p.ln()).sum::<f64>() / 4.0;
        assert!((bleu.score - geometric_mean.exp()).abs() < 1e-9);
    }

    #[test]
    fn brevity_penalty_applies_to_short_output() {
        let bleu = Bleu::corpus(&["a b c d"], &["a b c d e f g h"]).unwrap();
        assert!((bleu.bp - (1.0f64 - 2.0).exp()).abs() < 1e-12);
        assert_eq!(
            format!("{bleu}"),
            format!(
                "BLEU = {:.2} 100.0/100.0/100.0/100.0 (BP = 0.368 ratio = 0.500 hyp_len = 4 ref_len = 8)",
                bleu.score
            )
        );
    }
}
