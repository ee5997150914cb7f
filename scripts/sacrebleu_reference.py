#!/usr/bin/env python3
"""Expected corpus BLEU and chrF from sacrebleu, for lmforge's metric test (tests/metrics.rs).

lmforge computes BLEU and chrF itself (src/eval/), so that `lmforge eval translate` needs no
Python; this script pins down what "the same as sacrebleu" means. It scores several systems with
sacrebleu's defaults -- BLEU: 13a tokenizer, 4-grams, exponential smoothing, brevity penalty,
mixed case; chrF2: character 6-grams, no word n-grams, beta 2, whitespace removed -- and writes
the hypotheses, the references and sacrebleu's results (statistics, scores, and the lines
sacrebleu prints) to one JSON file that the Rust test reads:

    PYTHON=$(scripts/setup_python.sh)
    $PYTHON scripts/sacrebleu_reference.py            # -> tests/fixtures/sacrebleu_expected.json

Systems (all from the bundled corpus data/parallel/bible.tsv.gz, on the books held out by
default, Ruth, Jonah, Philemon and Jude, 182 verses):

- copy_kjv_web:     KJV verses as the hypotheses of WEB (the copy-the-source baseline of the
                    KJV -> WEB modernisation task);
- copy_kjv_rv1909:  KJV as hypotheses of Reina-Valera 1909 (a near-zero score);
- noisy_rv1909, noisy_web: each reference verse damaged in a seeded way (accents stripped,
                    words dropped, swapped, replaced or lower-cased, the verse truncated or
                    emptied), Spanish accents and curly quotes included;
- edge_cases:       hand-made lines for the 13a tokenizer's corners (HTML entities, `<skipped>`,
                    numbers with . , -, Unicode whitespace, an empty reference, ...);
- short_lines:      lines of at most 3 tokens: no hypothesis has a 4-gram, which sacrebleu scores
                    as log(0) floored to -9999999999, i.e. BLEU 0 whatever the other precisions;
- empty_hypotheses: every hypothesis empty (BLEU 0, chrF 0).

Deterministic: the perturbations use random.Random(2017); the output is byte-identical across
runs with sacrebleu 2.6.0 (pinned in scripts/python-requirements.txt).
"""

import argparse
import gzip
import json
import random
import unicodedata
from pathlib import Path

import sacrebleu
from sacrebleu.metrics import BLEU, CHRF

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data" / "parallel" / "bible.tsv.gz"
TEST_BOOKS = ["Ruth", "Jonah", "Philemon", "Jude"]


def read_test_rows():
    with gzip.open(CORPUS, "rt", encoding="utf-8", newline="\n") as f:
        header = f.readline().rstrip("\n").split("\t")
        rows = [dict(zip(header, line.rstrip("\n").split("\t"))) for line in f]
    rows = [r for r in rows if r["book"] in TEST_BOOKS]
    assert len(rows) == 182, len(rows)
    return rows


def strip_accents(text):
    decomposed = unicodedata.normalize("NFD", text)
    return unicodedata.normalize("NFC", "".join(c for c in decomposed if unicodedata.category(c) != "Mn"))


def damage(line, rng, vocabulary):
    """One seeded perturbation of a reference line: a plausible imperfect translation."""
    words = line.split(" ")
    kind = rng.randrange(9)
    if kind == 0:
        return strip_accents(line)
    if kind == 1 and len(words) > 1:
        del words[rng.randrange(len(words))]
    elif kind == 2 and len(words) > 1:
        i = rng.randrange(len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
    elif kind == 3:
        words = words[: max(1, len(words) // 2)]
    elif kind == 4:
        words[rng.randrange(len(words))] = rng.choice(vocabulary)
    elif kind == 5:
        return line.lower()
    elif kind == 6:
        return "" if rng.random() < 0.3 else line
    elif kind == 7:
        # Several edits at once: a weak system.
        for _ in range(3):
            words[rng.randrange(len(words))] = rng.choice(vocabulary)
        words = words[: max(1, 2 * len(words) // 3)]
    return " ".join(words)


def noisy(references, rng):
    vocabulary = sorted({w for line in references for w in line.split()})
    return [damage(line, rng, vocabulary) for line in references]


EDGE_CASES = [
    # (hypothesis, reference)
    ("The cat &amp; the dog &quot;ran&quot; &lt;fast&gt; &amp;lt;", 'The cat & the dog "ran" <fast> <'),
    ("It cost 3.14 or 1,000 dollars, 2-3 times.", "It cost 3.14 or 1,000 dollars; 2 - 3 times."),
    ("a.b a..b a,b 1.b a.1 x-1 1-x (hi) [ok] {x} ~y~ `z` @me #tag $5 %p ^c |p| \\s",
     "a. b a..b a, b 1. b a .1 x-1 1-x ( hi ) [ok] {x} ~y~ `z` @me #tag $5 %p ^c |p| \\s"),
    ("<skipped> hyphen-\nated line\nbreak", "hyphenated line break"),
    ("\u201cCurly\u201d quotes \u2018and\u2019 dashes \u2014 ellipsis\u2026", '"Curly" quotes \'and\' dashes - ellipsis...'),
    ("no\u00a0break\u2009thin\u3000ideographic\x85nel\x1cfs\x1fus\u200bzero-width", "no break thin ideographic nel fs us zero-width"),
    ("\ttabs\tand   runs  of spaces   ", "tabs and runs of spaces"),
    ("¿Qué pasó? ¡Ayúdame! Año, niño, pingüino, Ñandú.", "¿Qué pasó? ¡Ayúdame! Ano, nino, pinguino, Nandu."),
    ("emoji \U0001F600 and CJK 漢字かな交じり文", "emoji \U0001F600 and CJK 漢字 かな 交じり 文"),
    ("something", ""),
    ("", "an unmatched reference"),
    ("repeat repeat repeat repeat repeat", "repeat once"),
    ("Tokenized period at the end .", "Tokenized period at the end."),
]

SHORT_LINES = [
    ("Amen.", "Amen."),
    ("Jesus wept.", "Jesus wept."),
    ("Selah", "Selah."),
    ("Rejoice evermore.", "Rejoice always."),
    ("Pray always.", "Pray without ceasing."),
]


def score(name, hypotheses, references):
    assert len(hypotheses) == len(references)
    bleu = BLEU()
    chrf = CHRF()
    b = bleu.corpus_score(hypotheses, [references])
    c = chrf.corpus_score(hypotheses, [references])
    return {
        "name": name,
        "hypotheses": hypotheses,
        "references": references,
        "bleu": {
            "score": b.score,
            "counts": b.counts,
            "totals": b.totals,
            "precisions": b.precisions,
            "bp": b.bp,
            "sys_len": b.sys_len,
            "ref_len": b.ref_len,
            "line": str(b),
            "signature": str(bleu.get_signature()),
        },
        "chrf": {"score": c.score, "line": str(c), "signature": str(chrf.get_signature())},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "sacrebleu_expected.json")
    args = parser.parse_args()

    rows = read_test_rows()
    kjv = [r["kjv"] for r in rows]
    web = [r["web"] for r in rows]
    rv1909 = [r["rv1909"] for r in rows]
    rng = random.Random(2017)
    systems = [
        score("copy_kjv_web", kjv, web),
        score("copy_kjv_rv1909", kjv, rv1909),
        score("noisy_rv1909", noisy(rv1909, rng), rv1909),
        score("noisy_web", noisy(web, rng), web),
        score("edge_cases", [h for h, _ in EDGE_CASES], [r for _, r in EDGE_CASES]),
        score("short_lines", [h for h, _ in SHORT_LINES], [r for _, r in SHORT_LINES]),
        score("empty_hypotheses", ["" for _ in web[:20]], web[:20]),
    ]
    out = {
        "sacrebleu_version": sacrebleu.__version__,
        "made_by": "scripts/sacrebleu_reference.py",
        "test_books": TEST_BOOKS,
        "systems": systems,
    }
    args.out.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    for s in systems:
        print(f"{s['name']:18} {s['bleu']['line']}\n{'':18} {s['chrf']['line']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
