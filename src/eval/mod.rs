//! Evaluating translations: corpus BLEU and chrF computed as sacrebleu computes them, and the
//! `eval translate` workflow (held-out books → hypotheses → scores).
//!
//! The metrics are lmforge's own so that evaluation needs no Python, and they are pinned to
//! sacrebleu 2.6's defaults by `tests/metrics.rs`, which compares them with scores that
//! `scripts/sacrebleu_reference.py` computed with sacrebleu on real verses.
//!
//! ```
//! use lmforge::eval::{Bleu, Chrf};
//! let hypotheses = ["God said, Let there be light: and there was light."];
//! let references = ["God said, “Let there be light,” and there was light."];
//! let bleu = Bleu::corpus(&hypotheses, &references).unwrap();
//! let chrf = Chrf::corpus(&hypotheses, &references).unwrap();
//! println!("{bleu}\n{chrf}"); // BLEU = … 76.9/… (BP = …)   chrF2 = …
//! # assert!(bleu.score > 30.0 && chrf.score > 70.0);
//! ```

pub mod bleu;
pub mod chrf;
mod python_text;
pub mod translate;

pub use bleu::{tokenize_13a, Bleu, BleuStats};
pub use chrf::{Chrf, ChrfStats};
pub use translate::{score_translations, translate, DecodeOptions, TranslationScores, TranslationSet};
