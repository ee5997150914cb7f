//! A short run works with the defaults: the default warmup fits the run it is used in, while an
//! explicit warmup that cannot fit stays an error.

mod command;

use std::path::Path;

use command::lmforge;

#[test]
fn a_16_step_continuation_trains_with_the_default_warmup() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let init = lmforge(&[
        "init",
        "tiny-llama",
        "--set",
        "layers=2",
        "--set",
        "d_model=64",
        "--set",
        "attention.heads=4",
        "--set",
        "vocab_size=512",
        "--out",
        model.to_str().unwrap(),
    ]);
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/austen/persuasion.txt");
    let run = dir.path().join("run");
    let train = |run: &Path, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--no-supervisor",
            "--run",
            run.to_str().unwrap(),
            "--init-from",
            model.to_str().unwrap(),
            "--train-file",
            corpus.to_str().unwrap(),
            "--steps",
            "16",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--sample-every",
            "0",
        ];
        args.extend_from_slice(extra);
        lmforge(&args)
    };
    let out = train(&run, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The warmup the default chose is written down for resumes: a tenth of 16 steps.
    let stored = std::fs::read_to_string(run.join("run.toml")).unwrap();
    assert!(stored.contains("warmup_steps = 1\n"), "{stored}");

    let out = train(&dir.path().join("explicit"), &["--warmup-steps", "30"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !stderr.contains("panicked"));
    assert!(stderr.contains("schedule.warmup_steps = 30 exceeds total_steps = 16"), "{stderr}");
}
