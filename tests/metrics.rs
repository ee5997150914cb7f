//! lmforge's BLEU and chrF against sacrebleu: `tests/fixtures/sacrebleu_expected.json` holds
//! hypotheses, references and sacrebleu 2.6's results on them (made by
//! `scripts/sacrebleu_reference.py`: real verses of the held-out books, damaged copies of them,
//! and the 13a tokenizer's corner cases). Statistics must match exactly, scores to 1e-9, and the
//! printed lines character for character.

use std::path::Path;
use std::process::Command;

use lmforge::eval::{tokenize_13a, Bleu, Chrf};
use serde_json::Value;

fn expected() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sacrebleu_expected.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn strings(value: &Value) -> Vec<String> {
    value.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

fn numbers(value: &Value) -> Vec<f64> {
    value.as_array().unwrap().iter().map(|n| n.as_f64().unwrap()).collect()
}

#[test]
fn bleu_and_chrf_match_sacrebleu() {
    let expected = expected();
    assert_eq!(expected["sacrebleu_version"], "2.6.0");
    let systems = expected["systems"].as_array().unwrap();
    assert_eq!(systems.len(), 7);
    for system in systems {
        let name = system["name"].as_str().unwrap();
        let (hyps, refs) = (strings(&system["hypotheses"]), strings(&system["references"]));
        let (b, c) = (&system["bleu"], &system["chrf"]);

        let bleu = Bleu::corpus(&hyps, &refs).unwrap();
        let counts: Vec<f64> = bleu.stats.correct.iter().map(|&n| n as f64).collect();
        let totals: Vec<f64> = bleu.stats.total.iter().map(|&n| n as f64).collect();
        assert_eq!(counts, numbers(&b["counts"]), "{name}: matched n-grams");
        assert_eq!(totals, numbers(&b["totals"]), "{name}: hypothesis n-grams");
        assert_eq!(bleu.stats.sys_len, b["sys_len"].as_u64().unwrap(), "{name}: hyp_len");
        assert_eq!(bleu.stats.ref_len, b["ref_len"].as_u64().unwrap(), "{name}: ref_len");
        for (ours, theirs) in bleu.precisions.iter().zip(numbers(&b["precisions"])) {
            assert!((ours - theirs).abs() <= 1e-9, "{name}: precisions {:?} vs {}", bleu.precisions, b["precisions"]);
        }
        assert!((bleu.bp - b["bp"].as_f64().unwrap()).abs() <= 1e-12, "{name}: BP");
        assert!(
            (bleu.score - b["score"].as_f64().unwrap()).abs() <= 1e-9,
            "{name}: BLEU {} vs {}",
            bleu.score,
            b["score"]
        );
        assert_eq!(bleu.to_string(), b["line"].as_str().unwrap(), "{name}");

        let chrf = Chrf::corpus(&hyps, &refs).unwrap();
        assert!(
            (chrf.score - c["score"].as_f64().unwrap()).abs() <= 1e-9,
            "{name}: chrF {} vs {}",
            chrf.score,
            c["score"]
        );
        assert_eq!(chrf.to_string(), c["line"].as_str().unwrap(), "{name}");
    }
}

/// The copy-the-source baseline of KJV → WEB on the held-out books, as `eval translate
/// --copy-source` prints it, equals sacrebleu's line for the same texts.
#[test]
fn eval_translate_copy_source_prints_sacrebleus_scores() {
    let expected = expected();
    let copy = expected["systems"].as_array().unwrap().iter().find(|s| s["name"] == "copy_kjv_web").unwrap().clone();
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/parallel/bible.tsv.gz");
    let out = Command::new(env!("CARGO_BIN_EXE_lmforge"))
        .args(["eval", "translate", "--copy-source", "--parallel-file", corpus.to_str().unwrap()])
        .args(["--source", "kjv", "--target", "web", "--books", "Ruth,Jonah,Philemon,Jude"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines, [copy["bleu"]["line"].as_str().unwrap(), copy["chrf"]["line"].as_str().unwrap()]);
}

#[test]
fn tokenizer_13a_keeps_what_sacrebleu_keeps() {
    // Each line is what sacrebleu's Tokenizer13a returns (checked with sacrebleu 2.6.0).
    assert_eq!(
        tokenize_13a("“Let there be light,” and there was light."),
        "“Let there be light , ” and there was light ."
    );
    assert_eq!(tokenize_13a("¿Qué pasó? ¡Ayúdame!"), "¿Qué pasó ? ¡Ayúdame !");
}
