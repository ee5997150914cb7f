//! Tests of the parallel-data pipeline on the bundled Bible corpus and on small hand-made files.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;

use super::*;
use crate::error::Error;
use crate::test_util::TempDir;

fn bundled() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/parallel/bible.tsv.gz")
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn gunzip(path: &Path) -> Vec<u8> {
    let mut text = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::MultiGzDecoder::new(std::fs::File::open(path).unwrap()), &mut text)
        .unwrap();
    text
}

fn assert_data_error<T>(result: crate::Result<T>, reason_parts: &[&str]) {
    match result {
        Err(Error::Data { reason, .. }) => {
            for part in reason_parts {
                assert!(reason.contains(part), "reason {reason:?} should contain {part:?}");
            }
        }
        Err(other) => panic!("expected a data error containing {reason_parts:?}, got: {other}"),
        Ok(_) => panic!("expected a data error containing {reason_parts:?}, got Ok"),
    }
}

/// A small corpus with several books of different sizes and verse lengths.
fn small_corpus(dir: &TempDir) -> PathBuf {
    let mut text = String::from("book\tverse\ten\tes\n");
    let books = [("Alpha", 30), ("Beta", 12), ("Gamma", 8), ("Delta", 5), ("Epsilon", 40), ("Zeta", 3)];
    for (book, verses) in books {
        for v in 1..=verses {
            let words = 2 + (v * 7) % 13;
            let en: Vec<String> = (0..words).map(|w| format!("word{} of {book}", (w * v) % 17)).collect();
            let es: Vec<String> = (0..words + v % 3).map(|w| format!("palabra{} ñandú", (w + v) % 11)).collect();
            text.push_str(&format!("{book}\t{v}\t{}.\t{}.\n", en.join(" "), es.join(" ")));
        }
    }
    dir.write("small.tsv", text)
}

fn small_pairs(dir: &TempDir) -> (ParallelCorpus, BookSplit, TokenPairs) {
    let corpus = ParallelCorpus::read(&small_corpus(dir), "en", "es").unwrap();
    let split = BookSplit::new(&corpus, &["Zeta".into()], &["Delta".into()], 0.1).unwrap();
    let tokenizer = train_shared_bpe(&corpus, &split, 400).unwrap();
    let specials = SpecialIds::of(&tokenizer).unwrap();
    let train = encode_pairs(&corpus, split.pairs(&corpus, SplitRole::Train), &tokenizer, specials, 512).unwrap();
    (corpus, split, train)
}

#[test]
fn copied_targets_are_training_targets_on_both_sides_after_the_originals() {
    let dir = TempDir::new("copied-targets");
    let mut corpus = ParallelCorpus::read(&small_corpus(&dir), "en", "es").unwrap();
    let split = BookSplit::new(&corpus, &["Zeta".into()], &["Delta".into()], 0.1).unwrap();
    let originals = corpus.pairs.clone();
    let training: Vec<TextPair> = split.pairs(&corpus, SplitRole::Train).cloned().collect();

    let added = add_copied_targets(&mut corpus, &split, 1.0);
    assert_eq!(added, training.len());
    assert_eq!(corpus.pairs[..originals.len()], originals[..], "the originals come first, unchanged");
    for (copy, pair) in corpus.pairs[originals.len()..].iter().zip(&training) {
        assert_eq!((copy.book, copy.line), (pair.book, pair.line));
        assert_eq!((&copy.source, &copy.target), (&pair.target, &pair.target));
    }
    for role in [SplitRole::Validation, SplitRole::Test] {
        assert!(split.pairs(&corpus, role).all(|p| originals.contains(p)), "no copies of {role:?} books");
    }

    let mut half = ParallelCorpus::read(&small_corpus(&dir), "en", "es").unwrap();
    let some = add_copied_targets(&mut half, &split, 0.5);
    assert!(some > 0 && some < added, "half the training pairs: {some} of {added}");
}

// ---------------------------------------------------------------- reading

#[test]
fn reads_the_bundled_corpus_by_column_name() {
    let corpus = ParallelCorpus::read(&bundled(), "kjv", "rv1909").unwrap();
    assert_eq!(corpus.pairs.len(), 31_077);
    assert_eq!(corpus.books.len(), 66);
    assert_eq!((corpus.books[0].as_str(), corpus.books[65].as_str()), ("Genesis", "Revelation of John"));
    let first = &corpus.pairs[0];
    assert_eq!(first.line, 2);
    assert_eq!(first.source, "In the beginning God created the heaven and the earth.");
    assert_eq!(first.target, "EN el principio crió Dios los cielos y la tierra.");
    let modern = ParallelCorpus::read(&bundled(), "kjv", "web").unwrap();
    assert!(modern.pairs[2].target.starts_with("God said, “Let there be light,”"), "{}", modern.pairs[2].target);

    // The same file uncompressed reads the same.
    let dir = TempDir::new("parallel");
    let plain = dir.write("bible.tsv", gunzip(&bundled()));
    let from_plain = ParallelCorpus::read(&plain, "kjv", "rv1909").unwrap();
    assert_eq!(from_plain.pairs, corpus.pairs);
    assert_eq!(from_plain.books, corpus.books);
}

#[test]
fn bad_tsv_files_are_errors_naming_line_and_column() {
    let dir = TempDir::new("parallel-bad");
    let read = |name: &str, text: &str| ParallelCorpus::read(&dir.write(name, text), "en", "es");

    assert_data_error(read("missing.tsv", "book\ten\tfr\nA\thello\tbonjour\n"), &["no column `es`", "book, en, fr"]);
    assert_data_error(
        read("nobook.tsv", "doc\ten\tes\nA\thello\thola\n"),
        &["no column `book`", "HINT: add a `book` column"],
    );
    assert_data_error(read("data.tsv", "A\thello there\thola\n"), &["no column `book`"]);
    assert_data_error(read("data2.tsv", "Genesis\t1\tIn the beginning\n"), &["line 1 looks like data"]);
    assert_data_error(read("dup.tsv", "book\ten\ten\tes\n"), &["column `en` appears twice (columns 2 and 3)"]);
    assert_data_error(read("noname.tsv", "book\t\ten\tes\n"), &["column 2 has no name"]);
    assert_data_error(read("ragged.tsv", "book\ten\tes\nA\thello\thola\nA\tbye\n"), &["line 3 has 2", "header has 3"]);
    assert_data_error(read("tab.tsv", "book\ten\tes\nA\thel\tlo\thola\n"), &["line 2 has 4"]);
    assert_data_error(
        read("empty-es.tsv", "book\ten\tes\nA\thello\thola\nA\tbye\t \n"),
        &["line 3", "`es` column (column 3) is empty"],
    );
    assert_data_error(read("empty-book.tsv", "book\ten\tes\n\thello\thola\n"), &["line 2", "`book` column"]);
    assert_data_error(read("empty.tsv", ""), &["file is empty", "header"]);
    assert_data_error(read("header-only.tsv", "book\ten\tes\n"), &["no rows"]);
    let latin1 = dir.write("latin1.tsv", b"book\ten\tes\nA\thello\tni\xf1o\n");
    assert_data_error(
        ParallelCorpus::read(&latin1, "en", "es"),
        &["line 2 is not valid UTF-8", "byte 11 of the line", "iconv"],
    );
    let mut truncated = gzip(b"book\ten\tes\nA\thello\thola\n".repeat(200).as_slice());
    truncated.truncate(truncated.len() / 2);
    let truncated = dir.write("truncated.tsv.gz", truncated);
    assert_data_error(ParallelCorpus::read(&truncated, "en", "es"), &["cannot read line", "gzip"]);
    assert!(matches!(ParallelCorpus::read(&dir.path("absent.tsv"), "en", "es"), Err(Error::Io { .. })));

    // What is fine: CRLF line ends, a byte-order mark, blank lines, gzip by content not name.
    let ok = ParallelCorpus::read(
        &dir.write("ok.txt", gzip(b"\xef\xbb\xbfbook\ten\tes\r\nA\thi\thola\r\n\nB\tyes\tsi\r\n")),
        "en",
        "es",
    )
    .unwrap();
    assert_eq!(ok.books, ["A", "B"]);
    assert_eq!((ok.pairs[1].line, ok.pairs[1].source.as_str(), ok.pairs[1].target.as_str()), (4, "yes", "si"));
}

// ---------------------------------------------------------------- splits

#[test]
fn splits_hold_out_whole_books_deterministically() {
    let corpus = ParallelCorpus::read(&bundled(), "kjv", "web").unwrap();
    let split = BookSplit::new(&corpus, &default_test_books(), &[], 0.02).unwrap();
    assert_eq!(split.books(SplitRole::Test), ["Ruth", "Jonah", "Philemon", "Jude"]);
    assert_eq!(split.pairs(&corpus, SplitRole::Test).count(), 182);
    let val = split.books(SplitRole::Validation);
    let val_pairs = split.pairs(&corpus, SplitRole::Validation).count();
    assert!(!val.is_empty() && val_pairs <= (0.02 * 31_077f64).ceil() as usize, "{val:?}: {val_pairs} pairs");
    assert!(
        val_pairs > 500 && val.len() >= 2,
        "the budget should be mostly used, by several books: {val:?} {val_pairs}"
    );
    // Every pair in exactly one split, and a book's pairs all in the same one.
    let mut role_of_book: HashMap<&str, SplitRole> = HashMap::new();
    let mut counted = 0;
    for role in [SplitRole::Train, SplitRole::Validation, SplitRole::Test] {
        for pair in split.pairs(&corpus, role) {
            counted += 1;
            assert_eq!(*role_of_book.entry(corpus.book_name(pair)).or_insert(role), role);
        }
    }
    assert_eq!(counted, corpus.pairs.len());
    // The same choice every time, whatever order the test books are named in.
    let again =
        BookSplit::new(&corpus, &["Jude".into(), "Ruth".into(), "Philemon".into(), "Jonah".into()], &[], 0.02).unwrap();
    assert_eq!(again, split);
    assert_eq!(split.role("Genesis"), Some(SplitRole::Train));
    assert_eq!(split.role("Hezekiah"), None);

    let named = BookSplit::new(&corpus, &["Ruth".into()], &["Titus".into(), "Obadiah".into()], 0.02).unwrap();
    assert_eq!(named.books(SplitRole::Validation), ["Obadiah", "Titus"]);
}

#[test]
fn bad_book_choices_are_errors() {
    let corpus = ParallelCorpus::read(&bundled(), "kjv", "web").unwrap();
    let err = BookSplit::new(&corpus, &["ruth".into()], &[], 0.02).unwrap_err().to_string();
    assert!(err.contains("no book `ruth`") && err.contains("did you mean `Ruth`"), "{err}");
    let err = BookSplit::new(&corpus, &["Hezekiah".into()], &[], 0.02).unwrap_err().to_string();
    assert!(err.contains("--books") && err.contains("Genesis, Exodus"), "{err}");
    let err = BookSplit::new(&corpus, &["Ruth".into()], &["Ruth".into()], 0.02).unwrap_err().to_string();
    assert!(err.contains("held out twice"), "{err}");
    let all: Vec<String> = corpus.books.clone();
    assert!(BookSplit::new(&corpus, &all, &[], 0.02).unwrap_err().to_string().contains("nothing is left to train on"));
    let all_but_one: Vec<String> = corpus.books[1..].to_vec();
    let err = BookSplit::new(&corpus, &all_but_one, &[], 0.02).unwrap_err().to_string();
    assert!(err.contains("none to validate on"), "{err}");
}

#[test]
fn validation_falls_back_to_the_smallest_book_when_none_fits() {
    let dir = TempDir::new("parallel-split");
    let corpus = ParallelCorpus::read(&small_corpus(&dir), "en", "es").unwrap();
    let split = BookSplit::new(&corpus, &[], &[], 0.001).unwrap();
    assert_eq!(split.books(SplitRole::Validation), ["Zeta"]);
}

// ---------------------------------------------------------------- vocabulary and token pairs

#[test]
fn shared_vocabulary_encodes_both_sides_with_frames() {
    let dir = TempDir::new("parallel-vocab");
    let (corpus, split, train) = small_pairs(&dir);
    let specials = train.specials;
    assert_eq!((specials.pad, specials.start, specials.eos), (0, 1, 2));
    assert_eq!(train.pairs.len(), split.pairs(&corpus, SplitRole::Train).count());

    let tokenizer = train_shared_bpe(&corpus, &split, 400).unwrap();
    assert_eq!(tokenizer.bos(), Some(1));
    assert_eq!(tokenizer.eos_ids(), [2]);
    let (text, tokens) = (split.pairs(&corpus, SplitRole::Train).next().unwrap(), &train.pairs[0]);
    assert_eq!(tokens.line, text.line);
    assert_eq!(*tokens.source.last().unwrap(), specials.eos);
    assert_eq!(tokenizer.decode(&tokens.source[..tokens.source.len() - 1]).unwrap(), text.source);
    assert_eq!(tokenizer.decode(&tokens.target).unwrap(), text.target, "Spanish survives the byte-level round trip");
    assert!(tokens.target.iter().chain(&tokens.source[..tokens.source.len() - 1]).all(|&id| id > 2));
    // Both sides shaped the vocabulary.
    assert!(tokenizer.token_to_id("palabra").is_some() || tokenizer.token_to_id("Ġpalabra").is_some());
    assert!(tokenizer.token_to_id("word").is_some());
    // Trained on the training books only: the held-out books' words are not merged tokens.
    assert!(tokenizer.token_to_id("Zeta").is_none() && tokenizer.token_to_id("ĠZeta").is_none());

    // A tokenizer without the special tokens is refused.
    let plain = crate::data::train_bpe_on_texts(["abc abc".to_string()].into_iter(), 260, &[], 1).unwrap();
    let plain = crate::io::TextTokenizer::new(plain, None, vec![], None, "test");
    assert!(SpecialIds::of(&plain).unwrap_err().to_string().contains("no `<pad>` token"));
}

#[test]
fn sequences_longer_than_the_model_are_errors_naming_the_line() {
    let dir = TempDir::new("parallel-long");
    let (corpus, split, train) = small_pairs(&dir);
    let tokenizer = train_shared_bpe(&corpus, &split, 400).unwrap();
    let longest = train.pairs.iter().map(|p| p.len()).max().unwrap();
    let fits = encode_pairs(&corpus, split.pairs(&corpus, SplitRole::Train), &tokenizer, train.specials, longest);
    assert!(fits.is_ok());
    let err = encode_pairs(&corpus, split.pairs(&corpus, SplitRole::Train), &tokenizer, train.specials, longest - 1)
        .unwrap_err();
    let offender = train.pairs.iter().find(|p| p.len() == longest).unwrap();
    assert_data_error(
        Err::<(), _>(err),
        &[
            &format!("line {}", offender.line),
            &format!("more than the model's {}", longest - 1),
            "--set context_length=",
        ],
    );
}

// ---------------------------------------------------------------- batches

#[test]
fn batches_are_framed_padded_and_within_budget() {
    let dir = TempDir::new("parallel-batch");
    let (_, _, train) = small_pairs(&dir);
    let pairs = Arc::new(train);
    let budget = 200;
    let mut sampler = PairSampler::new(pairs.clone(), budget, PairSamplerState::start(7)).unwrap();
    let per_epoch = sampler.batches_per_epoch();
    let mut seen = vec![0; pairs.pairs.len()];
    let by_line: HashMap<usize, usize> = pairs.pairs.iter().enumerate().map(|(i, p)| (p.line, i)).collect();
    for _ in 0..per_epoch {
        let b = sampler.next_batch();
        assert!(
            b.rows * b.source_len <= budget && b.rows * b.target_len <= budget,
            "{} x ({}, {})",
            b.rows,
            b.source_len,
            b.target_len
        );
        for row in 0..b.rows {
            let pair = &pairs.pairs[by_line[&b.lines[row]]];
            seen[by_line[&b.lines[row]]] += 1;
            let (s, t) = (pair.source.len(), pair.target.len());
            let source = &b.source[row * b.source_len..][..b.source_len];
            assert_eq!(&source[..s], pair.source.as_slice());
            assert!(source[s..].iter().all(|&id| id == b.pad));
            let input = &b.decoder_input[row * b.target_len..][..b.target_len];
            let target = &b.decoder_target[row * b.target_len..][..b.target_len];
            assert_eq!(input[0], pairs.specials.start);
            assert_eq!(&input[1..=t], pair.target.as_slice());
            assert_eq!(&target[..t], pair.target.as_slice());
            assert_eq!(target[t], pairs.specials.eos);
            assert!(input[t + 1..].iter().chain(&target[t + 1..]).all(|&id| id == b.pad));
            assert_eq!((b.source_lengths[row] as usize, b.target_lengths[row] as usize), (s, t + 1));
        }
        let tensors = b.to_tensors(&Device::Cpu).unwrap();
        assert_eq!(tensors.source.dims(), [b.rows, b.source_len]);
        assert_eq!(tensors.decoder_target.dims(), [b.rows, b.target_len]);
        let mask: Vec<Vec<u8>> = tensors.source_mask.to_vec2().unwrap();
        for (row, m) in mask.iter().enumerate() {
            let real = b.source_lengths[row] as usize;
            assert!(m[..real].iter().all(|&x| x == 1) && m[real..].iter().all(|&x| x == 0));
        }
    }
    assert!(seen.iter().all(|&n| n == 1), "an epoch visits every pair once: {seen:?}");
    assert_eq!(sampler.state().epoch, 1);
}

#[test]
fn length_bucketing_keeps_padding_small_on_real_verses() {
    // A few books and a small vocabulary keep the test fast; the lengths are still real verses.
    let mut corpus = ParallelCorpus::read(&bundled(), "kjv", "rv1909").unwrap();
    let books = ["Ruth", "Jonah", "Philemon", "Jude", "Mark"];
    corpus.pairs.retain(|p| books.contains(&corpus.books[p.book].as_str()));
    let split = BookSplit::new(&corpus, &[], &["Ruth".into()], 0.02).unwrap();
    let tokenizer = train_shared_bpe(&corpus, &split, 500).unwrap();
    let specials = SpecialIds::of(&tokenizer).unwrap();
    let pairs = encode_pairs(&corpus, split.pairs(&corpus, SplitRole::Train), &tokenizer, specials, 1024).unwrap();
    let pairs = Arc::new(pairs);
    let batches: Vec<PairBatch> = SequentialPairBatches::new(pairs.clone(), 4096).unwrap().collect();
    let real: usize = batches.iter().map(|b| b.source_tokens() + b.target_tokens()).sum();
    let padded: usize = batches.iter().map(|b| b.rows * (b.source_len + b.target_len)).sum();
    let rows: usize = batches.iter().map(|b| b.rows).sum();
    assert_eq!(rows, pairs.pairs.len());
    // Sorted by the longer side only, so the other side still pads a little. (Measured on the
    // whole training split, 8000-token BPE: 5% padding at 4096 tokens per batch, 57% with
    // batches of the same size drawn at random.)
    let padding = 1.0 - real as f64 / padded as f64;
    assert!(padding < 0.2, "padding {padding:.3} over {} batches", batches.len());
}

#[test]
fn sampler_is_seeded_and_resumes_exactly() {
    let dir = TempDir::new("parallel-resume");
    let (_, _, train) = small_pairs(&dir);
    let pairs = Arc::new(train);
    let draw = |sampler: &mut PairSampler, n: usize| (0..n).map(|_| sampler.next_batch()).collect::<Vec<_>>();
    let mut full = PairSampler::new(pairs.clone(), 150, PairSamplerState::start(11)).unwrap();
    let per_epoch = full.batches_per_epoch() as usize;
    assert!(per_epoch >= 4, "{per_epoch}");
    let all = draw(&mut full, 3 * per_epoch);

    // Stop mid-epoch, save the state as a checkpoint would, resume.
    let mut first = PairSampler::new(pairs.clone(), 150, PairSamplerState::start(11)).unwrap();
    let head = draw(&mut first, per_epoch + 2);
    let saved: PairSamplerState = serde_json::from_str(&serde_json::to_string(&first.state()).unwrap()).unwrap();
    let mut resumed = PairSampler::new(pairs.clone(), 150, saved).unwrap();
    let tail = draw(&mut resumed, 2 * per_epoch - 2);
    assert_eq!([head, tail].concat(), all);

    // skip(n) lands where drawing n batches does.
    let mut skipper = PairSampler::new(pairs.clone(), 150, PairSamplerState::start(11)).unwrap();
    skipper.skip(per_epoch as u64 + 3);
    assert_eq!(skipper.next_batch(), all[per_epoch + 3]);

    // Epochs: same shapes, other batch-mates among equal lengths, other order; seeds differ.
    let shapes = |batches: &[PairBatch]| {
        let mut s: Vec<(usize, usize)> = batches.iter().map(|b| (b.rows, b.source_len.max(b.target_len))).collect();
        s.sort();
        s
    };
    let (epoch0, epoch1) = (&all[..per_epoch], &all[per_epoch..2 * per_epoch]);
    assert_eq!(shapes(epoch0), shapes(epoch1));
    assert_ne!(epoch0, epoch1);
    let mut other = PairSampler::new(pairs.clone(), 150, PairSamplerState::start(12)).unwrap();
    assert_ne!(draw(&mut other, per_epoch), epoch0);
}

#[test]
fn sampler_refuses_a_state_from_other_data_or_budget() {
    let dir = TempDir::new("parallel-refuse");
    let (_, _, train) = small_pairs(&dir);
    let pairs = Arc::new(train);
    let mut sampler = PairSampler::new(pairs.clone(), 150, PairSamplerState::start(3)).unwrap();
    sampler.next_batch();
    let state = sampler.state();
    let err = PairSampler::new(pairs.clone(), 300, state).err().unwrap().to_string();
    assert!(err.contains("batch_tokens = 150") && err.contains("HINT"), "{err}");
    let mut fewer = (*pairs).clone();
    fewer.pairs.pop();
    let err = PairSampler::new(Arc::new(fewer), 150, state).err().unwrap().to_string();
    assert!(err.contains("pairs"), "{err}");
    let beyond = PairSamplerState { index_in_epoch: 10_000, ..state };
    assert!(PairSampler::new(pairs.clone(), 150, beyond).is_err());
    let longest = pairs.pairs.iter().map(|p| p.len()).max().unwrap();
    let err = PairSampler::new(pairs.clone(), longest - 1, PairSamplerState::start(3)).err().unwrap().to_string();
    assert!(err.contains(&format!("at least {longest}")), "{err}");
}

#[test]
fn validation_batches_cover_every_pair_once_in_a_fixed_order() {
    let dir = TempDir::new("parallel-val");
    let (_, _, train) = small_pairs(&dir);
    let pairs = Arc::new(train);
    let first: Vec<PairBatch> = SequentialPairBatches::new(pairs.clone(), 120).unwrap().collect();
    let second: Vec<PairBatch> = SequentialPairBatches::new(pairs.clone(), 120).unwrap().collect();
    assert_eq!(first, second);
    let mut lines: Vec<usize> = first.iter().flat_map(|b| b.lines.clone()).collect();
    lines.sort();
    let mut expected: Vec<usize> = pairs.pairs.iter().map(|p| p.line).collect();
    expected.sort();
    assert_eq!(lines, expected);
}

#[test]
fn run_config_section_reports_every_problem() {
    let ok = ParallelData::new("x.tsv", "kjv", "web");
    assert!(ok.problems().is_empty());
    let bad = ParallelData {
        source: "kjv".into(),
        target: "kjv".into(),
        val_books: vec!["Ruth".into(), " ".into()],
        val_fraction: 1.5,
        batch_tokens: 0,
        copied_targets: 1.5,
        ..ok
    };
    let problems = bad.problems().join("\n");
    for part in [
        "both `kjv`",
        "val_books has an empty",
        "`Ruth` is in both",
        "val_fraction = 1.5",
        "batch_tokens = 0",
        "copied_targets = 1.5",
    ] {
        assert!(problems.contains(part), "{problems}");
    }
}
