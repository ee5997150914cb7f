//! Train / validation / test by whole books.
//!
//! Test books are named by the user (`--books`). Validation books are named too, or chosen
//! deterministically from the remaining books: in a fixed pseudo-random order (a hash of each
//! book's name, so it depends on nothing else), each book of at most half the budget is taken
//! if the validation set still fits within the budget, `val_fraction` of all pairs. Big books
//! are passed over, and small and medium ones from all parts of the corpus fill the budget, at
//! least two of them. The same file always gives the same split, whatever the run's seed, so
//! validation losses of different runs are comparable.

use serde::{Deserialize, Serialize};

use super::corpus::{ParallelCorpus, TextPair};
use crate::data::permutation::mix;
use crate::error::{Error, Result};

/// Which part of the corpus a book belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SplitRole {
    Train,
    Validation,
    Test,
}

/// The role of every book of a corpus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BookSplit {
    /// Book names, in corpus order (a copy of [`ParallelCorpus::books`]).
    books: Vec<String>,
    /// Role of `books[i]`.
    roles: Vec<SplitRole>,
}

impl BookSplit {
    /// Hold out `test_books` for testing and `val_books` for validation (when empty, books
    /// chosen as described in the module docs, up to `val_fraction` of the pairs). Every named
    /// book must be in the corpus, and some book must be left for training.
    pub fn new(
        corpus: &ParallelCorpus,
        test_books: &[String],
        val_books: &[String],
        val_fraction: f64,
    ) -> Result<Self> {
        let mut roles = vec![SplitRole::Train; corpus.books.len()];
        for (role, names, flag) in
            [(SplitRole::Test, test_books, "--books"), (SplitRole::Validation, val_books, "--val-books")]
        {
            for name in names {
                let at = corpus.find_book(name, flag)?;
                if roles[at] != SplitRole::Train {
                    return Err(Error::Input(format!("book `{name}` is held out twice (test and validation)")));
                }
                roles[at] = role;
            }
        }
        if val_books.is_empty() {
            choose_validation(corpus, &mut roles, val_fraction);
        }
        if !roles.contains(&SplitRole::Train) {
            return Err(Error::data(
                &corpus.path,
                "every book is held out for test or validation; nothing is left to train on\nHINT: hold out fewer books with --books / --val-books",
            ));
        }
        if !roles.contains(&SplitRole::Validation) {
            return Err(Error::data(
                &corpus.path,
                "only one book is left besides the test books: there is none to validate on\nHINT: hold out fewer test books (--books), or name validation books with --val-books",
            ));
        }
        Ok(BookSplit { books: corpus.books.clone(), roles })
    }

    /// The role of book `name`; `None` for a book the corpus does not have.
    pub fn role(&self, name: &str) -> Option<SplitRole> {
        self.books.iter().position(|b| b == name).map(|i| self.roles[i])
    }

    /// The books with `role`, in corpus order.
    pub fn books(&self, role: SplitRole) -> Vec<&str> {
        self.books.iter().zip(&self.roles).filter(|(_, &r)| r == role).map(|(b, _)| b.as_str()).collect()
    }

    /// The pairs of `corpus` (the one this split was made from) with `role`, in file order.
    pub fn pairs<'a>(&'a self, corpus: &'a ParallelCorpus, role: SplitRole) -> impl Iterator<Item = &'a TextPair> + 'a {
        corpus.pairs.iter().filter(move |p| self.roles[p.book] == role)
    }
}

/// Mark validation books among the training ones, as described in the module docs.
fn choose_validation(corpus: &ParallelCorpus, roles: &mut [SplitRole], fraction: f64) {
    let mut sizes = vec![0usize; corpus.books.len()];
    for pair in &corpus.pairs {
        sizes[pair.book] += 1;
    }
    let budget = (fraction * corpus.pairs.len() as f64).ceil() as usize;
    let mut candidates: Vec<usize> = (0..roles.len()).filter(|&b| roles[b] == SplitRole::Train).collect();
    // Sorting by name hash (and name, for the impossible tie) fixes the order for good.
    candidates.sort_by_key(|&b| (name_hash(&corpus.books[b]), corpus.books[b].clone()));
    let mut taken = 0;
    for &b in &candidates {
        if 2 * sizes[b] <= budget && taken + sizes[b] <= budget {
            roles[b] = SplitRole::Validation;
            taken += sizes[b];
        }
    }
    if taken == 0 {
        // Every remaining book is bigger than the budget: the smallest one (if it leaves any
        // training book) rather than no validation at all.
        if let Some(&b) = candidates.iter().min_by_key(|&&b| (sizes[b], b)).filter(|_| candidates.len() > 1) {
            roles[b] = SplitRole::Validation;
        }
    }
}

/// FNV-1a of the name's bytes, then mixed: a stable hash (Rust's `DefaultHasher` may change
/// between releases, and the split must not).
fn name_hash(name: &str) -> u64 {
    let fnv = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
    mix(fnv)
}
