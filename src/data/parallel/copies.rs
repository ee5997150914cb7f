//! Copied targets: training pairs whose source is their own target (`target → target`).
//!
//! An encoder–decoder learns its target language long before its cross-attention learns which
//! source position to read: until then it writes fluent text about something else, and the
//! loss sits on a plateau (`encoder_decoder_learns_to_copy` shows the same plateau on a pure
//! copy task). A pair whose source *is* its target has that alignment as its whole content, so
//! mixing copies of the training targets into the training pairs is a cheap way off the
//! plateau. This is Currey, Miceli Barone and Heafield (2017), "Copied Monolingual Data
//! Improves Low-Resource Neural Machine Translation", with the training pairs' own targets as
//! the monolingual data. It suits tasks whose output shares most words with the input, such as
//! modernising the KJV into the WEB, where copying is most of the job.
//!
//! Copies are made only of training pairs, after the books are split, so validation and test
//! text never appears on either side; each copy keeps its pair's book and line. They follow the
//! originals in the pair list, so they also count in the shared vocabulary's training text, as
//! they count in training.

use super::corpus::{ParallelCorpus, TextPair};
use super::split::{BookSplit, SplitRole};
use crate::data::permutation::mix;

/// Append a `target → target` copy of `share` (0..=1) of the training pairs of `corpus` to it,
/// and return how many were added. Which pairs is decided by a hash of their line, so the same
/// file and share always copy the same pairs, whatever the run's seed.
pub fn add_copied_targets(corpus: &mut ParallelCorpus, split: &BookSplit, share: f64) -> usize {
    let copied: Vec<TextPair> = split
        .pairs(corpus, SplitRole::Train)
        .filter(|pair| is_copied(pair.line, share))
        .map(|pair| TextPair { source: pair.target.clone(), ..pair.clone() })
        .collect();
    let added = copied.len();
    corpus.pairs.extend(copied);
    added
}

/// Whether the pair on `line` is among the `share` that are copied.
fn is_copied(line: usize, share: f64) -> bool {
    // The hash's top 53 bits as a uniform number in [0, 1): share 0 copies none, share 1 all.
    let uniform = (mix(line as u64) >> 11) as f64 / (1u64 << 53) as f64;
    uniform < share
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_share_copies_about_that_share_of_lines_and_the_same_ones_each_time() {
        for share in [0.0, 0.25, 0.5] {
            let copied = (0..20_000).filter(|&line| is_copied(line, share)).count();
            assert!((copied as f64 / 20_000.0 - share).abs() < 0.01, "share {share}: copied {copied} of 20000");
        }
        assert!((0..1000).all(|line| is_copied(line, 1.0)));
        let quarter: Vec<usize> = (0..1000).filter(|&line| is_copied(line, 0.25)).collect();
        let half: Vec<usize> = (0..1000).filter(|&line| is_copied(line, 0.5)).collect();
        assert!(quarter.iter().all(|line| half.contains(line)), "a larger share copies a superset");
    }
}
