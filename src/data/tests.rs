//! Tests for the data pipeline: tokenizer training, shard preparation and reading, sampling.
//! Everything runs on small texts in a temporary directory and takes seconds in total.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use sha2::{Digest, Sha256};

use super::manifest::hex;
use super::permutation::Permutation;
use super::text::TextChunks;
use super::*;
use crate::error::Error;

use crate::test_util::TempDir;

fn bundled(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/austen").join(name)
}

fn eot() -> Vec<String> {
    vec![END_OF_TEXT.to_string()]
}

/// A few KB of text with the awkward cases: blank-line runs, indented lines, non-ASCII.
fn small_text() -> String {
    let mut s = String::new();
    for i in 0..60 {
        s.push_str(&format!("Chapter {i}\n\n\nIt is a truth universally acknowledged, that a single man,\n"));
        s.push_str("    indented line — with naïve café and 日本語 text.\n\n");
        s.push_str("\"My dear Mr. Bennet,\" said his lady to him one day.\n");
    }
    s
}

fn assert_data_error(result: Result<impl Sized, Error>, path_part: &str, reason_part: &str) {
    match result {
        Err(Error::Data { path, reason }) => {
            assert!(path.display().to_string().contains(path_part), "path {path:?} should contain {path_part:?}");
            assert!(reason.contains(reason_part), "reason {reason:?} should contain {reason_part:?}");
        }
        Err(other) => panic!("expected a data error about {path_part}, got: {other}"),
        Ok(_) => panic!("expected a data error about {path_part}, got Ok"),
    }
}

fn train_small(dir: &TempDir, vocab: usize) -> (PathBuf, tokenizers::Tokenizer) {
    let text = dir.write("small.txt", small_text());
    let tok = train_bpe(&[text], vocab, &eot(), 2).unwrap();
    let path = dir.0.join("tokenizer.json");
    save_tokenizer(&tok, &path).unwrap();
    (path, tok)
}

// ---------------------------------------------------------------- tokenizer training

#[test]
fn bpe_on_bundled_corpus_round_trips() {
    let started = Instant::now();
    let tok = train_bpe(&[bundled("prideprejudice.txt")], 512, &eot(), 2).unwrap();
    eprintln!("512-token BPE on prideprejudice.txt: {:.2?}", started.elapsed());
    assert_eq!(tok.get_vocab_size(true), 512);
    assert_eq!(tok.token_to_id(END_OF_TEXT), Some(0), "special tokens come first");

    for text in ["It is a truth universally acknowledged", "  two spaces\n\n\ttab, naïve café — 日本語 🙂\r\n", "x"]
    {
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "round trip of {text:?}");
    }
    // Merges were learned: common English compresses well below one token per byte.
    let sample = "It is a truth universally acknowledged, that a single man in possession of a good fortune";
    assert!(tok.encode(sample, false).unwrap().len() * 10 < sample.len() * 6);
    // The special token is recognised inside text, as one token.
    let ids = tok.encode(format!("the end{END_OF_TEXT}Chapter"), false).unwrap().get_ids().to_vec();
    assert!(ids.contains(&0));

    let dir = TempDir::new("data-test");
    let path = dir.0.join("tokenizer.json");
    save_tokenizer(&tok, &path).unwrap();
    let reloaded = tokenizers::Tokenizer::from_file(&path).unwrap();
    assert_eq!(reloaded.encode(sample, false).unwrap().get_ids(), tok.encode(sample, false).unwrap().get_ids());

    // On a real novel (hundreds of chunk cuts), `prepare` gives exactly the whole-text encoding.
    let novel = bundled("persuasion.txt");
    let mut config = PrepareConfig::new(&path, vec![novel.clone()], dir.0.join("ds"));
    config.val = ValSplit::Tail(0.0);
    let m = prepare(&config).unwrap();
    let whole = tok.encode(std::fs::read_to_string(&novel).unwrap(), false).unwrap().get_ids().to_vec();
    let ds = TokenDataset::open(&dir.0.join("ds")).unwrap();
    assert_eq!(m.train.tokens, whole.len() as u64 + 1);
    assert!(ds.train().window(0, whole.len()).unwrap() == whole, "chunked encoding differs from whole-text encoding");
}

#[test]
fn special_tokens_in_the_corpus_are_not_learned_as_text() {
    let dir = TempDir::new("data-test");
    let joined = format!("{}{END_OF_TEXT}\n", small_text()).repeat(3);
    let text = dir.write("joined.txt", joined);
    let specials = vec![END_OF_TEXT.to_string(), "<|pad|>".to_string()];
    let tok = train_bpe(&[text], 400, &specials, 2).unwrap();
    assert_eq!((tok.token_to_id(END_OF_TEXT), tok.token_to_id("<|pad|>")), (Some(0), Some(1)));
    let vocab = tok.get_vocab(true);
    let learned: Vec<&String> =
        vocab.keys().filter(|k| !specials.contains(k) && (k.contains("endof") || k.contains("|>"))).collect();
    assert!(learned.is_empty(), "learned pieces of a special token: {learned:?}");
    assert_eq!(vocab.len(), 400);
    assert_eq!(vocab.values().max(), Some(&399), "ids are dense");
}

#[test]
fn bpe_training_is_deterministic() {
    let dir = TempDir::new("data-test");
    let text = dir.write("t.txt", small_text());
    let specials = vec![END_OF_TEXT.to_string(), "<|pad|>".to_string()];
    let a = train_bpe(std::slice::from_ref(&text), 400, &specials, 2).unwrap().to_string(false).unwrap();
    let b = train_bpe(&[text], 400, &specials, 2).unwrap().to_string(false).unwrap();
    assert_eq!(a, b);
}

#[test]
fn bpe_rejects_bad_inputs_naming_the_file() {
    let dir = TempDir::new("data-test");
    let good = dir.write("good.txt", small_text());
    let empty = dir.write("empty.txt", "");
    let binary = dir.write("model.bin", [0x7fu8, b'E', b'L', b'F', 0, 0, 1, 2]);
    let latin1 = dir.write("latin1.txt", b"caf\xe9 au lait\n");
    // Bad byte past the first megabyte: caught while streaming, still naming the file.
    let mut late = "a line of text\n".repeat(80_000).into_bytes();
    late.extend_from_slice(b"tail \xff\n");
    let late = dir.write("late.txt", late);

    assert_data_error(train_bpe(&[good.clone(), empty], 300, &eot(), 2), "empty.txt", "empty");
    assert_data_error(train_bpe(&[binary], 300, &eot(), 2), "model.bin", "binary");
    assert_data_error(train_bpe(&[latin1], 300, &eot(), 2), "latin1.txt", "UTF-8");
    assert_data_error(train_bpe(&[late], 300, &eot(), 2), "late.txt", "byte 1200005");
    assert_data_error(train_bpe(std::slice::from_ref(&dir.0), 300, &eot(), 2), "lmforge-data-test", "directory");
    assert!(matches!(train_bpe(&[dir.0.join("missing.txt")], 300, &eot(), 2), Err(Error::Io { .. })));

    let too_small = train_bpe(std::slice::from_ref(&good), 256, &eot(), 2).unwrap_err().to_string();
    assert!(too_small.contains("257") && too_small.contains("HINT"), "{too_small}");
    let dup = vec![END_OF_TEXT.to_string(), END_OF_TEXT.to_string()];
    assert!(matches!(train_bpe(std::slice::from_ref(&good), 300, &dup, 2), Err(Error::Input(_))));
    assert!(matches!(train_bpe(&[], 300, &eot(), 2), Err(Error::Input(_))));
}

// ---------------------------------------------------------------- text chunking

#[test]
fn chunks_cover_the_file_and_cut_only_at_safe_boundaries() {
    let dir = TempDir::new("data-test");
    let text = small_text();
    let path = dir.write("t.txt", &text);
    let mut chunks = TextChunks::open(&path).unwrap();
    let mut all = Vec::new();
    while let Some(c) = chunks.next_chunk(200, u64::MAX).unwrap() {
        all.push(c);
    }
    assert!(all.len() > 10);
    assert_eq!(all.concat(), text);
    for pair in all.windows(2) {
        let first = pair[1].chars().next().unwrap();
        let before_newline = pair[0].chars().rev().nth(1).unwrap();
        assert!(
            pair[0].ends_with('\n') && !before_newline.is_whitespace() && !first.is_whitespace(),
            "unsafe cut: {:?} | {:?}",
            &pair[0][pair[0].len() - 20..],
            &pair[1][..20]
        );
    }

    // With a stop, the first part ends at the first line boundary at or after it.
    let mut chunks = TextChunks::open(&path).unwrap();
    let mut head = String::new();
    while let Some(c) = chunks.next_chunk(200, 1000).unwrap() {
        head.push_str(&c);
    }
    assert!(head.len() >= 1000 && head.ends_with('\n') && !text[..head.len() - 1].ends_with(&text[999..]));
    assert_eq!(chunks.offset(), head.len() as u64);
}

#[test]
fn over_long_lines_are_cut_before_a_word() {
    let dir = TempDir::new("data-test");
    let text = "word ".repeat(500_000) + "end"; // 2.5 MB, no newline
    let path = dir.write("long.txt", &text);
    let mut chunks = TextChunks::open(&path).unwrap();
    let mut pieces = Vec::new();
    while let Some(p) = chunks.next_piece().unwrap() {
        pieces.push(p);
    }
    assert!(pieces.len() >= 3 && pieces.iter().all(|p| p.len() <= 1 << 20));
    assert!(pieces[1..].iter().all(|p| p.starts_with(" w")), "cut before \" word\"");
    assert_eq!(pieces.concat(), text);
}

// ---------------------------------------------------------------- prepare + read

#[test]
fn prepare_then_read_back_exact_tokens() {
    let dir = TempDir::new("data-test");
    let (tok_path, tok) = train_small(&dir, 300);
    let a = dir.write("a.txt", small_text());
    let b = dir.write("b.txt", "A short second document.\nWith two lines.\n");
    let out = dir.0.join("ds");
    let mut config = PrepareConfig::new(&tok_path, vec![a.clone(), b.clone()], &out);
    config.val = ValSplit::Tail(0.25);
    config.shard_tokens = 7; // tiny, so windows cross many shard boundaries
    let manifest = prepare(&config).unwrap();

    // Expected streams: each file's head (lines starting before 75% of its bytes) then EOT in
    // train; its tail then EOT in val. Chunked encoding must equal whole-text encoding.
    let enc = |s: &str| tok.encode(s, false).unwrap().get_ids().to_vec();
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for text in [small_text(), std::fs::read_to_string(&b).unwrap()] {
        let stop = (text.len() as f64 * 0.75).ceil() as usize;
        let cut = text
            .char_indices()
            .map(|(i, _)| i)
            .filter(|&i| i > 0 && text.as_bytes()[i - 1] == b'\n')
            .find(|&i| i >= stop);
        let cut = cut.unwrap_or(text.len());
        train.extend(enc(&text[..cut]));
        train.push(0);
        if cut < text.len() {
            val.extend(enc(&text[cut..]));
            val.push(0);
        }
    }
    assert_eq!(manifest.train.tokens, train.len() as u64);
    assert_eq!(manifest.val.tokens, val.len() as u64);
    assert_eq!(manifest.dtype, TokenDtype::U16);
    assert_eq!(manifest.tokenizer.vocab_size, 300);
    assert!(manifest.train.shards.len() > 10 && manifest.train.shards.iter().all(|s| s.tokens <= 7));

    let ds = TokenDataset::open(&out).unwrap();
    assert_eq!(ds.train().len(), train.len() as u64);
    assert_eq!(ds.train().window(0, train.len()).unwrap(), train);
    assert_eq!(ds.val().window(0, val.len()).unwrap(), val);
    for start in [0, 5, 6, 7, 13, 20] {
        assert_eq!(ds.train().window(start as u64, 9).unwrap(), &train[start..start + 9]);
    }
    assert!(matches!(ds.train().window(train.len() as u64 - 3, 4), Err(Error::Input(_))));
    assert!(ds.train().window(train.len() as u64, 0).unwrap().is_empty());
    assert_eq!(ds.eot_id(), 0);
    assert_eq!(std::fs::read(ds.tokenizer_path()).unwrap(), std::fs::read(&tok_path).unwrap());
    check_vocab(&ds, 300).unwrap();
    let err = check_vocab(&ds, 256).unwrap_err().to_string();
    assert!(err.contains("300") && err.contains("HINT"), "{err}");
    assert_eq!(manifest.sources.len(), 2);
    assert!(!dir.0.join(".ds.partial").exists());
}

/// A byte-level BPE with merges of whitespace runs (`ĊĊ` = "\n\n", `ĠĠ`, `čĊ` = "\r\n"), like
/// pretrained GPT-2-style tokenizers have and our line-trained ones do not.
fn tokenizer_with_newline_merges(dir: &TempDir) -> (PathBuf, tokenizers::Tokenizer) {
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort();
    let mut vocab: tokenizers::models::bpe::Vocab =
        alphabet.iter().enumerate().map(|(i, c)| (c.to_string(), i as u32 + 1)).collect();
    vocab.insert(END_OF_TEXT.into(), 0);
    vocab.insert("ĊĊ".into(), 257);
    vocab.insert("ĠĠ".into(), 258);
    vocab.insert("čĊ".into(), 259);
    let merges: Vec<(String, String)> =
        [("Ċ", "Ċ"), ("Ġ", "Ġ"), ("č", "Ċ")].iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().unwrap();
    let mut tok = tokenizers::Tokenizer::new(bpe);
    let bl = ByteLevel::new(false, true, true);
    tok.with_pre_tokenizer(Some(bl)).with_decoder(Some(bl));
    tok.add_special_tokens(&[tokenizers::AddedToken::from(END_OF_TEXT, true)]);
    assert_eq!(tok.token_to_id(END_OF_TEXT), Some(0));
    let path = dir.0.join("newline-merges.json");
    save_tokenizer(&tok, &path).unwrap();
    (path, tok)
}

#[test]
fn chunked_prepare_equals_whole_text_encoding() {
    let dir = TempDir::new("data-test");
    let (tok_path, tok) = tokenizer_with_newline_merges(&dir);
    // ~40 KB each: about ten 4 KiB chunks. LF text cuts at single line breaks; CRLF text has
    // none that are safe and is cut before spaces instead.
    let lf = small_text().repeat(4);
    let crlf = lf.replace('\n', "\r\n");
    for (name, text, merge) in [("lf.txt", lf, 257), ("crlf.txt", crlf, 259)] {
        let ids = tok.encode(text.as_str(), false).unwrap().get_ids().to_vec();
        assert!(ids.contains(&merge) && ids.contains(&258), "{name} exercises the merges");
        let input = dir.write(name, &text);
        let out = dir.0.join(format!("ds-{name}"));
        let mut config = PrepareConfig::new(&tok_path, vec![input], &out);
        config.val = ValSplit::Tail(0.0);
        prepare(&config).unwrap();
        let ds = TokenDataset::open(&out).unwrap();
        let got = ds.train().window(0, ds.train().len() as usize).unwrap();
        assert!(got[..got.len() - 1] == ids[..], "{name}: chunked encoding differs from whole-text encoding");
    }
}

#[test]
fn prepare_with_separate_val_files() {
    let dir = TempDir::new("data-test");
    let (tok_path, tok) = train_small(&dir, 300);
    let a = dir.write("a.txt", small_text());
    let v = dir.write("v.txt", "Validation text, held out.\n");
    let out = dir.0.join("empty-dir-is-fine");
    std::fs::create_dir(&out).unwrap();
    let mut config = PrepareConfig::new(&tok_path, vec![a], &out);
    config.val = ValSplit::Files(vec![v]);
    let manifest = prepare(&config).unwrap();
    let expected_val: Vec<u32> =
        tok.encode("Validation text, held out.\n", false).unwrap().get_ids().iter().copied().chain([0]).collect();
    let ds = TokenDataset::open(&out).unwrap();
    assert_eq!(ds.val().window(0, expected_val.len()).unwrap(), expected_val);
    assert_eq!(manifest.train.tokens, tok.encode(small_text(), false).unwrap().len() as u64 + 1);
    assert_eq!(manifest.train.shards.len(), 1);
}

#[test]
fn documents_joined_in_one_file_and_no_val_split() {
    let dir = TempDir::new("data-test");
    let (tok_path, tok) = train_small(&dir, 300);
    let joined = format!("First document.\n{END_OF_TEXT}\nSecond document.\n");
    let a = dir.write("joined.txt", &joined);
    let out = dir.0.join("ds");
    let mut config = PrepareConfig::new(&tok_path, vec![a], &out);
    config.val = ValSplit::Tail(0.0);
    let manifest = prepare(&config).unwrap();
    let ds = TokenDataset::open(&out).unwrap();
    let tokens = ds.train().window(0, manifest.train.tokens as usize).unwrap();
    assert_eq!(tokens.iter().filter(|&&t| t == 0).count(), 2, "written separator + appended end of text");
    assert_eq!(tokens, [tok.encode(joined.as_str(), false).unwrap().get_ids(), &[0]].concat());
    assert!(ds.val().is_empty() && manifest.val.shards.is_empty());
    assert!(SequentialBatches::new(ds.val().clone(), 4, 2).is_err());
}

#[test]
fn prepare_refuses_bad_inputs() {
    let dir = TempDir::new("data-test");
    let (tok_path, _) = train_small(&dir, 300);
    let good = dir.write("good.txt", small_text());
    let empty = dir.write("empty.txt", "");
    let binary = dir.write("img.png", [0x89u8, b'P', b'N', b'G', 0, 0]);
    let run = |inputs: Vec<PathBuf>, out: &str| prepare(&PrepareConfig::new(&tok_path, inputs, dir.0.join(out)));

    assert_data_error(run(vec![good.clone(), empty], "o1"), "empty.txt", "empty");
    assert_data_error(run(vec![binary], "o2"), "img.png", "binary");
    assert!(matches!(run(vec![], "o3"), Err(Error::Input(_))));
    assert!(!dir.0.join("o1").exists() && !dir.0.join("o2").exists());

    run(vec![good.clone()], "done").unwrap();
    assert_data_error(run(vec![good.clone()], "done"), "done", "already exists");

    let mut config = PrepareConfig::new(&tok_path, vec![good.clone()], dir.0.join("o4"));
    config.eot_token = "</s>".into();
    assert!(matches!(prepare(&config), Err(Error::Tokenizer { .. })));
    config.eot_token = END_OF_TEXT.into();
    config.val = ValSplit::Tail(1.0);
    assert!(matches!(prepare(&config), Err(Error::Input(_))));
}

#[test]
fn open_refuses_what_is_not_a_valid_dataset() {
    let dir = TempDir::new("data-test");
    let (tok_path, _) = train_small(&dir, 300);
    let good = dir.write("good.txt", small_text());
    let out = dir.0.join("ds");
    let mut config = PrepareConfig::new(&tok_path, vec![good], &out);
    config.shard_tokens = 100;
    prepare(&config).unwrap();

    assert_data_error(TokenDataset::open(&dir.0), "lmforge-data-test", "not a prepared token dataset");
    assert_data_error(TokenDataset::open(&dir.0.join("nope")), "nope", "not a directory");
    assert_data_error(TokenDataset::open(&tok_path), "tokenizer.json", "not a directory");

    // A flipped byte: caught by checksums, not by the size-only check.
    let shard = out.join("train-000001.bin");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[3] ^= 1;
    std::fs::write(&shard, &bytes).unwrap();
    assert_data_error(TokenDataset::open(&out), "train-000001.bin", "sha256 mismatch");
    TokenDataset::open_with(&out, Verify::Sizes).unwrap();
    // A truncated shard fails either way.
    std::fs::write(&shard, &bytes[..bytes.len() - 2]).unwrap();
    assert_data_error(TokenDataset::open_with(&out, Verify::Sizes), "train-000001.bin", "size is");

    let manifest_path = out.join("manifest.json");
    let text = std::fs::read_to_string(&manifest_path).unwrap();
    std::fs::write(&manifest_path, text.replace("lmforge-tokens", "something-else")).unwrap();
    assert_data_error(TokenDataset::open(&out), "manifest.json", "magic");
    std::fs::write(&manifest_path, text.replace("\"version\": 1", "\"version\": 99")).unwrap();
    assert_data_error(TokenDataset::open(&out), "manifest.json", "newer");
    std::fs::write(&manifest_path, text.replace("train-000000.bin", "../train-000000.bin")).unwrap();
    assert_data_error(TokenDataset::open(&out), "manifest.json", "plain file name");
    std::fs::write(&manifest_path, "{ not json").unwrap();
    assert_data_error(TokenDataset::open(&out), "manifest.json", "JSON");
}

#[test]
fn large_vocab_uses_u32_shards() {
    let dir = TempDir::new("data-test");
    let tokens: Vec<u32> = (0..50).map(|i| 70_000 + i).collect();
    let out = synthetic_dataset(&dir, &tokens, 70_100, 16);
    let ds = TokenDataset::open(&out).unwrap();
    assert_eq!(ds.manifest().dtype, TokenDtype::U32);
    assert_eq!(ds.train().window(10, 30).unwrap(), &tokens[10..40]);
}

/// A dataset written by hand (not by `prepare`), so the tokens are known: handy for sampler tests.
fn synthetic_dataset(dir: &TempDir, tokens: &[u32], vocab_size: usize, shard_tokens: usize) -> PathBuf {
    let out = dir.0.join(format!("synthetic-{}", tokens.len()));
    std::fs::create_dir_all(&out).unwrap();
    let dtype = TokenDtype::for_vocab(vocab_size);
    let tok_bytes = b"{}";
    std::fs::write(out.join("tokenizer.json"), tok_bytes).unwrap();
    let mut shards = Vec::new();
    for (i, chunk) in tokens.chunks(shard_tokens).enumerate() {
        let bytes: Vec<u8> = match dtype {
            TokenDtype::U16 => chunk.iter().flat_map(|&t| (t as u16).to_le_bytes()).collect(),
            TokenDtype::U32 => chunk.iter().flat_map(|&t| t.to_le_bytes()).collect(),
        };
        let file = format!("train-{i:06}.bin");
        std::fs::write(out.join(&file), &bytes).unwrap();
        shards.push(manifest::ShardInfo { file, tokens: chunk.len() as u64, sha256: hex(&Sha256::digest(&bytes)) });
    }
    let m = Manifest {
        magic: manifest::MAGIC.into(),
        version: manifest::VERSION,
        dtype,
        tokenizer: manifest::TokenizerInfo {
            file: "tokenizer.json".into(),
            sha256: hex(&Sha256::digest(tok_bytes)),
            vocab_size,
            eot_token: END_OF_TEXT.into(),
            eot_id: 0,
        },
        train: manifest::SplitInfo { tokens: tokens.len() as u64, shards },
        val: manifest::SplitInfo::default(),
        sources: vec![],
    };
    std::fs::write(out.join("manifest.json"), serde_json::to_string(&m).unwrap()).unwrap();
    out
}

// ---------------------------------------------------------------- sampling

/// Dataset whose token at position i is i (so a window's first token is its start).
fn counting_split(dir: &TempDir, n: u32) -> TokenSplit {
    let tokens: Vec<u32> = (0..n).collect();
    let out = synthetic_dataset(dir, &tokens, n as usize, 97);
    TokenDataset::open(&out).unwrap().train().clone()
}

#[test]
fn permutation_is_a_bijection() {
    for n in [1u64, 2, 3, 4, 5, 17, 64, 1000, 4097] {
        for seed in [0, 1, 42] {
            let p = Permutation::new(n, seed, 7);
            let seen: HashSet<u64> = (0..n).map(|i| p.apply(i)).collect();
            assert_eq!(seen.len() as u64, n);
            assert!(seen.iter().all(|&x| x < n));
        }
    }
    // Different seeds and streams give different orders; not the identity.
    let order = |seed, stream| (0..1000).map(|i| Permutation::new(1000, seed, stream).apply(i)).collect::<Vec<_>>();
    assert_ne!(order(1, 0), order(2, 0));
    assert_ne!(order(1, 0), order(1, 1));
    assert_ne!(order(1, 0), (0..1000).collect::<Vec<_>>());
}

#[test]
fn sampler_batches_are_shifted_windows() {
    let dir = TempDir::new("data-test");
    let split = counting_split(&dir, 1000);
    let mut s = Sampler::new(split, 8, false, SamplerState::start(3)).unwrap();
    assert_eq!(s.windows_per_epoch(), 999 / 8);
    let b = s.next_batch(4).unwrap();
    for row in 0..4 {
        let inp = &b.inputs[row * 8..row * 8 + 8];
        let tgt = &b.targets[row * 8..row * 8 + 8];
        assert_eq!(inp[0] % 8, 0, "windows start on the seq_len grid");
        assert!((0..8).all(|t| inp[t] == inp[0] + t as u32 && tgt[t] == inp[t] + 1));
    }
    let (x, y) = b.to_tensors(&candle_core::Device::Cpu).unwrap();
    assert_eq!(x.dims(), &[4, 8]);
    assert_eq!(y.dtype(), candle_core::DType::U32);
    assert_eq!(y.to_vec2::<u32>().unwrap()[0], tgt_row(&b, 0));
}

fn tgt_row(b: &Batch, row: usize) -> Vec<u32> {
    b.targets[row * b.seq_len..(row + 1) * b.seq_len].to_vec()
}

#[test]
fn an_epoch_visits_every_window_once() {
    let dir = TempDir::new("data-test");
    let split = counting_split(&dir, 2000);
    for random_offset in [false, true] {
        let mut s = Sampler::new(split.clone(), 10, random_offset, SamplerState::start(11)).unwrap();
        let w = s.windows_per_epoch();
        let mut offsets = HashSet::new();
        for epoch in 0..3 {
            let starts: Vec<u64> = (0..w).map(|_| s.next_window_start()).collect();
            let offset = starts[0] % 10;
            offsets.insert(offset);
            let windows: HashSet<u64> = starts.iter().map(|&st| (st - offset) / 10).collect();
            assert_eq!(windows.len() as u64, w, "epoch {epoch}: no repeats");
            assert!(starts.iter().all(|&st| st % 10 == offset && st + 11 <= 2000));
            let want = SamplerState { seed: 11, epoch: epoch + 1, index_in_epoch: 0, seq_len: 10, split_tokens: 2000 };
            assert_eq!(s.state(), want);
        }
        assert_eq!(offsets.len() > 1, random_offset, "offsets {offsets:?}");
    }
}

#[test]
fn sampler_is_deterministic_and_resumes_exactly() {
    let dir = TempDir::new("data-test");
    let split = counting_split(&dir, 3000);
    let run = |state: SamplerState, batches: usize| {
        let mut s = Sampler::new(split.clone(), 16, true, state).unwrap();
        let out: Vec<Batch> = (0..batches).map(|_| s.next_batch(5).unwrap()).collect();
        (out, s.state())
    };
    let (full, _) = run(SamplerState::start(7), 100); // 500 windows: crosses epochs (W = 186)
    let (again, _) = run(SamplerState::start(7), 100);
    assert_eq!(full, again);
    let (other_seed, _) = run(SamplerState::start(8), 100);
    assert_ne!(full, other_seed);

    // Save the state mid-epoch, through JSON as a checkpoint would, and continue.
    let (first, state) = run(SamplerState::start(7), 37);
    let state: SamplerState = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
    let (rest, _) = run(state, 63);
    assert_eq!([first, rest].concat(), full);

    // skip(n) lands where reading n batches would.
    let mut s = Sampler::new(split.clone(), 16, true, SamplerState::start(7)).unwrap();
    s.skip(37, 5);
    assert_eq!(s.state(), run(SamplerState::start(7), 37).1);
    assert_eq!(s.next_batch(5).unwrap(), full[37]);
    s.skip(0, 5);
    s.skip(60, 5);
    assert_eq!(s.next_batch(5).unwrap(), full[98]);
}

#[test]
fn sampler_refuses_impossible_settings() {
    let dir = TempDir::new("data-test");
    let split = counting_split(&dir, 100);
    assert!(matches!(Sampler::new(split.clone(), 0, false, SamplerState::start(0)), Err(Error::Input(_))));
    Sampler::new(split.clone(), 99, false, SamplerState::start(0)).unwrap();
    let err = Sampler::new(split.clone(), 100, false, SamplerState::start(0)).err().unwrap().to_string();
    assert!(err.contains("100 tokens") && err.contains("HINT"), "{err}");
    assert!(Sampler::new(split.clone(), 60, true, SamplerState::start(0)).is_err());
    let stale = SamplerState { index_in_epoch: 50, ..SamplerState::start(0) };
    assert!(matches!(Sampler::new(split.clone(), 10, false, stale), Err(Error::Input(_))));
    // A position saved with another window length, or over other data, is refused by name.
    let saved = Sampler::new(split.clone(), 10, false, SamplerState::start(0)).unwrap().state();
    let err = Sampler::new(split.clone(), 12, false, saved).err().unwrap().to_string();
    assert!(err.contains("seq_len 10") && err.contains("uses 12"), "{err}");
    let other_data = SamplerState { split_tokens: 5000, ..saved };
    let err = Sampler::new(split, 10, false, other_data).err().unwrap().to_string();
    assert!(err.contains("5000 tokens") && err.contains("has 100"), "{err}");
}

#[test]
fn validation_pass_is_ordered_and_complete() {
    let dir = TempDir::new("data-test");
    let split = counting_split(&dir, 105);
    let pass = SequentialBatches::new(split.clone(), 10, 4).unwrap();
    assert_eq!((pass.windows(), pass.batches()), (10, 3));
    let batches: Vec<Batch> = pass.map(|b| b.unwrap()).collect();
    assert_eq!(batches.iter().map(|b| b.batch_size).collect::<Vec<_>>(), [4, 4, 2]);
    let inputs: Vec<u32> = batches.iter().flat_map(|b| b.inputs.clone()).collect();
    assert_eq!(inputs, (0..100).collect::<Vec<u32>>());
    let again: Vec<Batch> = SequentialBatches::new(split.clone(), 10, 4).unwrap().map(|b| b.unwrap()).collect();
    assert_eq!(batches, again);
    assert!(SequentialBatches::new(split, 200, 4).is_err());
}

/// Not part of the suite (`cargo test --release -- --ignored --nocapture measure`): BPE
/// training time and `prepare` throughput on the bundled corpus, and on the full shared
/// corpora (`$LMFORGE_CORPORA`, default `/work/shared/corpora`) when present.
#[test]
#[ignore]
fn measure_bpe_and_prepare() {
    let dir = TempDir::new("data-test");
    let bundled_train = vec![bundled("prideprejudice.txt"), bundled("sensesensibility.txt")];
    let (t, cpu) = (Instant::now(), cpu_seconds());
    let tok = train_bpe(&bundled_train, 2048, &eot(), 2).unwrap();
    eprintln!(
        "BPE vocab 2048 on bundled train files (1.36 MB): {:.2?} wall, {:.2}s CPU",
        t.elapsed(),
        cpu_seconds() - cpu
    );
    let tok_path = dir.0.join("tok.json");
    save_tokenizer(&tok, &tok_path).unwrap();

    let shared = PathBuf::from(std::env::var("LMFORGE_CORPORA").unwrap_or_else(|_| "/work/shared/corpora".into()));
    let bundled_val = ValSplit::Files(vec![bundled("persuasion.txt")]);
    let mut sets = vec![("bundled (persuasion = val)", bundled_train.clone(), bundled_val)];
    if shared.exists() {
        let mut all: Vec<PathBuf> =
            std::fs::read_dir(shared.join("austen")).unwrap().map(|e| e.unwrap().path()).collect();
        all.sort();
        all.push(shared.join("kjv.txt"));
        sets.push(("all Austen + KJV (5% tail = val)", all, ValSplit::Tail(0.05)));
    }
    for (i, (name, files, val)) in sets.into_iter().enumerate() {
        let mut bytes: u64 = files.iter().map(|f| std::fs::metadata(f).unwrap().len()).sum();
        if let ValSplit::Files(v) = &val {
            bytes += v.iter().map(|f| std::fs::metadata(f).unwrap().len()).sum::<u64>();
        }
        let mut config = PrepareConfig::new(&tok_path, files, dir.0.join(format!("ds{i}")));
        config.val = val;
        let (t, cpu) = (Instant::now(), cpu_seconds());
        let m = prepare(&config).unwrap();
        let (secs, cpu) = (t.elapsed().as_secs_f64(), cpu_seconds() - cpu);
        let tokens = m.train.tokens + m.val.tokens;
        eprintln!(
            "prepare {name}: {:.1} MB -> {tokens} tokens in {secs:.2}s wall = {:.0} tokens/s; {cpu:.2}s CPU = {:.0} tokens/CPU-s",
            bytes as f64 / 1e6,
            tokens as f64 / secs,
            tokens as f64 / cpu
        );
        eprintln!("  train {} tokens, val {} tokens", m.train.tokens, m.val.tokens);
        let t = Instant::now();
        TokenDataset::open(&dir.0.join(format!("ds{i}"))).unwrap();
        eprintln!("  open with checksums: {:.2?}", t.elapsed());
    }
}

/// User + system CPU time of this process so far (Linux; 0 elsewhere), to report costs that
/// do not depend on how busy a shared machine is.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (field(11) + field(12)) / 100.0
}
