//! `--dtype bf16` ([`WeightDtype::Bf16`]): each family's tiny parity fixture with its matrices
//! held in bf16, against the same model in `f32`, on the fixture's prompt, all at once (the
//! prefill GEMM at bf16 precision when long enough) and a token at a time through the KV cache
//! (the bf16 row kernel); what `--dtype bf16` does to a GGUF file's matrices; a GGUF file whose
//! own matrices are BF16; and that converting each matrix as it is read is bit-identical to
//! converting the loaded `f32` model.
//!
//! Tolerance: every product's operands are rounded to bf16 (each value by at most 2⁻⁹ of
//! itself), so each layer's outputs move by up to 2⁻⁸ of `Σ|x·w|`, typically far less (the
//! roundings have random signs); through the layers that compounds. Measured on these fixtures
//! (random weights, widths of 32–64, so few terms average out): max |Δlogit| of 0.4–1.3% of the
//! logits' spread at a position. Allowed: 2⁻⁵ (3.1%). The bytes held are exactly half of
//! `f32`'s. (These prompts are shorter than `DEQUANTIZED_FROM_TOKENS`: both ways run the row
//! kernel; the prefill GEMM's bf16 path is checked on SmolLM2, `tests/smollm2_bf16.rs`.)

mod chunked;

use std::path::{Path, PathBuf};

use candle_core::Device;
use lmforge::io::{
    held_in_bf16, load_model, load_model_for_inference, load_model_with, LoadOptions, LoadedModel, WeightDtype,
};
use lmforge::nn::ops::quant::{QFormat, QMatrix};

use chunked::logits_in_chunks;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn input_ids(dir: &Path) -> Vec<u32> {
    let tensors = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    let ids = tensors["input_ids"].to_dtype(candle_core::DType::I64).unwrap().to_vec1::<i64>().unwrap();
    ids.into_iter().map(|v| v as u32).collect()
}

/// max over positions of max |Δlogit| / the spread of the `f32` logits there.
fn worst_relative(got: &[Vec<f32>], want: &[Vec<f32>]) -> f32 {
    got.iter()
        .zip(want)
        .map(|(g, w)| {
            let spread = w.iter().fold(f32::MIN, |m, &v| m.max(v)) - w.iter().fold(f32::MAX, |m, &v| m.min(v));
            g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / spread
        })
        .fold(0f32, f32::max)
}

/// Bytes of the matrices `--dtype bf16` takes, held as `f32` tensors in `loaded`.
fn f32_bytes_of_bf16_candidates(loaded: &LoadedModel) -> usize {
    let specs = loaded.config.param_specs();
    specs.iter().filter(|s| held_in_bf16(s)).map(|s| loaded.weights[&s.name].elem_count() * 4).sum()
}

/// `path` loaded for running with `--dtype bf16`.
fn load_bf16(path: &Path) -> LoadedModel {
    load_model_with(path, &Device::Cpu, LoadOptions::inference(WeightDtype::Bf16)).unwrap()
}

fn check_family(name: &str) {
    let dir = fixture(name);
    let dense = load_model(&dir, &Device::Cpu).unwrap();
    let f32_bytes = f32_bytes_of_bf16_candidates(&dense);
    let halved = load_bf16(&dir);
    let specs = dense.config.param_specs();
    let expected: Vec<&str> = specs.iter().filter(|s| held_in_bf16(s)).map(|s| s.name.as_str()).collect();
    assert!(expected.contains(&"tok_embeddings.weight") && expected.len() > 4, "{name}: {expected:?}");
    assert_eq!(halved.quantized.len(), expected.len(), "{name}: every matrix but a mixture's experts");
    assert!(halved.quantized.values().all(|q| q.format() == QFormat::BF16));
    let held: usize = halved.quantized.values().map(|q| q.bytes()).sum();
    assert_eq!(2 * held, f32_bytes, "{name}: bf16 holds half the bytes");
    assert_eq!(halved.weights.len() + halved.quantized.len(), dense.weights.len());

    let ids = input_ids(&dir);
    let (f32_model, bf16_model) = (dense.build().unwrap(), halved.build().unwrap());
    let want = logits_in_chunks(&f32_model, &ids, ids.len());
    let whole = worst_relative(&logits_in_chunks(&bf16_model, &ids, ids.len()), &want);
    let stepwise = worst_relative(&logits_in_chunks(&bf16_model, &ids, 1), &want);
    eprintln!("{name}: max |Δlogit| / spread: {whole:.2e} all at once, {stepwise:.2e} a token at a time");
    assert!(whole > 0.0 && stepwise > 0.0, "{name}: the bf16 model must differ from the f32 one somewhere");
    assert!(whole < 2f32.powi(-5) && stepwise < 2f32.powi(-5), "{name}: {whole}, {stepwise}");
}

#[test]
fn gpt2_in_bf16_is_within_tolerance_of_f32() {
    check_family("gpt2");
}

#[test]
fn llama_families_in_bf16_are_within_tolerance_of_f32() {
    for name in ["llama3", "llama_gqa", "llama_mqa", "llama_yarn", "llama_linear_v4"] {
        check_family(name);
    }
}

#[test]
fn mistral_in_bf16_is_within_tolerance_of_f32() {
    check_family("mistral");
}

/// The router and attention in bf16, the experts in `f32` (their grouped product stacks them).
#[test]
fn mixtral_in_bf16_is_within_tolerance_of_f32() {
    check_family("mixtral");
}

#[test]
fn phi_in_bf16_is_within_tolerance_of_f32() {
    check_family("phi");
    check_family("phi_v4");
}

#[test]
fn mpt_in_bf16_is_within_tolerance_of_f32() {
    check_family("mpt");
    check_family("mpt_heads5");
}

/// An encoder–decoder (Marian): the encoder's, the decoder's and the cross-attention's matrices
/// in bf16, the logits of the fixture's source and decoder input within the tolerance.
#[test]
fn marian_in_bf16_holds_cross_attention_in_bf16_within_tolerance_of_f32() {
    let dir = fixture("marian");
    let (dense, halved) = (load_model(&dir, &Device::Cpu).unwrap(), load_bf16(&dir));
    let cross: Vec<_> = halved.quantized.iter().filter(|(name, _)| name.contains("cross_attn.")).collect();
    assert!(
        cross.len() >= 4 && cross.iter().all(|(_, q)| q.format() == QFormat::BF16),
        "{:?}",
        halved.quantized.keys()
    );
    assert!(halved.quantized.keys().any(|n| n.starts_with("encoder.")));
    assert_eq!(2 * halved.quantized.values().map(|q| q.bytes()).sum::<usize>(), f32_bytes_of_bf16_candidates(&dense));

    let want = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    let ids =
        |name: &str| want[name].to_dtype(candle_core::DType::U32).unwrap().flatten_all().unwrap().unsqueeze(0).unwrap();
    let (source, decoder_input) = (ids("source_ids"), ids("decoder_input_ids"));
    let logits = |loaded: &LoadedModel| -> Vec<Vec<f32>> {
        let model = loaded.build().unwrap();
        let encoded = model.encode(&source, None).unwrap();
        model.decoder_logits(&encoded, &decoder_input).unwrap().squeeze(0).unwrap().to_vec2().unwrap()
    };
    let worst = worst_relative(&logits(&halved), &logits(&dense));
    eprintln!("marian: max |Δlogit| / spread: {worst:.2e}");
    assert!(worst > 0.0 && worst < 2f32.powi(-5), "{worst}");
}

/// A GGUF file's quantized matrices stay in their blocks under `--dtype bf16`; its f16 and f32
/// matrices (dequantized to f32 on loading) become bf16; a mixture's stacked experts stay f32.
#[test]
fn dtype_bf16_on_gguf_keeps_quantized_blocks_and_takes_the_other_matrices() {
    let dir = fixture("mixtral_gguf");
    for file in ["model.q4_0.gguf", "model.q8_0.gguf"] {
        let path = dir.join(file);
        let plain = load_model_for_inference(&path, &Device::Cpu).unwrap();
        assert!(!plain.quantized.is_empty() && plain.quantized.values().all(|q| q.format() != QFormat::BF16));
        let halved = load_bf16(&path);
        for (name, q) in &plain.quantized {
            assert_eq!(halved.quantized[name].format(), q.format(), "{file}: `{name}` stays in its blocks");
        }
        let specs = halved.config.param_specs();
        let candidates: Vec<_> = specs.iter().filter(|s| held_in_bf16(s)).collect();
        let taken = candidates.iter().filter(|s| !plain.quantized.contains_key(&s.name)).count();
        assert!(taken > 0, "{file}: some matrices were f32 in the file");
        for spec in candidates.iter().filter(|s| !plain.quantized.contains_key(&s.name)) {
            assert_eq!(halved.quantized[&spec.name].format(), QFormat::BF16, "{file}: `{}`", spec.name);
        }
        let experts: Vec<_> = specs.iter().filter(|s| s.expert.is_some()).collect();
        assert!(!experts.is_empty() && experts.iter().all(|s| halved.weights.contains_key(&s.name)));
        let ids: Vec<u32> = (1..9).collect();
        let want = logits_in_chunks(&plain.build().unwrap(), &ids, 1);
        let got = logits_in_chunks(&halved.build().unwrap(), &ids, 1);
        assert!(worst_relative(&got, &want) < 2f32.powi(-5), "{file}");
    }
    // All f16: every candidate matrix becomes bf16.
    let halved = load_bf16(&dir.join("model.f16.gguf"));
    let specs = halved.config.param_specs();
    assert_eq!(halved.quantized.len(), specs.iter().filter(|s| held_in_bf16(s)).count());
    assert!(halved.quantized.values().all(|q| q.format() == QFormat::BF16));
}

/// A GGUF file whose own matrices are BF16 (model.gguf rewritten by the `gguf` Python package,
/// `scripts/make_gguf_fixture.py`): loaded to run, each matrix is held as the file's bf16 bytes
/// (not widened to `f32`), with the q/k rows in lmforge's order; a mixture's stacked experts are
/// widened (their grouped product runs on tensors); the logits are within the tolerance of the
/// same weights in `f32`.
#[test]
fn a_gguf_file_of_bf16_matrices_is_held_in_bf16_within_tolerance_of_f32() {
    let dir = fixture("mixtral_gguf");
    let f32_model = load_model_for_inference(&dir.join("model.gguf"), &Device::Cpu).unwrap();
    let bf16_file = load_model_for_inference(&dir.join("model.bf16.gguf"), &Device::Cpu).unwrap();
    let specs = bf16_file.config.param_specs();
    let matrices: Vec<_> = specs.iter().filter(|s| held_in_bf16(s)).collect();
    assert_eq!(bf16_file.quantized.len(), matrices.len());
    for spec in &matrices {
        let held = &bf16_file.quantized[&spec.name];
        assert_eq!(held.format(), QFormat::BF16, "`{}`", spec.name);
        let rounded = QMatrix::quantize(&f32_model.weights[&spec.name], QFormat::BF16).unwrap();
        assert_eq!(held.rows_data(0..held.dims().0), rounded.rows_data(0..rounded.dims().0), "`{}`", spec.name);
    }
    let experts: Vec<_> = specs.iter().filter(|s| s.expert.is_some()).collect();
    assert!(!experts.is_empty() && experts.iter().all(|s| bf16_file.weights.contains_key(&s.name)));
    // Asking for bf16 changes nothing: the matrices already are.
    let asked = load_bf16(&dir.join("model.bf16.gguf"));
    assert!(asked
        .quantized
        .iter()
        .all(|(name, q)| q.rows_data(0..q.dims().0) == bf16_file.quantized[name].rows_data(0..q.dims().0)));

    let ids: Vec<u32> = (1..12).collect();
    let (want_model, got_model) = (f32_model.build().unwrap(), bf16_file.build().unwrap());
    for chunk in [1, ids.len()] {
        let worst =
            worst_relative(&logits_in_chunks(&got_model, &ids, chunk), &logits_in_chunks(&want_model, &ids, chunk));
        eprintln!("model.bf16.gguf, chunks of {chunk}: max |Δlogit| / spread: {worst:.2e}");
        assert!(worst > 0.0 && worst < 2f32.powi(-5), "chunks of {chunk}: {worst}");
    }
}

/// `--dtype f32` changes nothing.
#[test]
fn dtype_f32_is_the_model_as_loaded() {
    let options = LoadOptions::inference(WeightDtype::F32);
    let loaded = load_model_with(&fixture("llama3"), &Device::Cpu, options).unwrap();
    assert!(loaded.quantized.is_empty());
}

/// `model` loaded in `f32`, then each matrix [`held_in_bf16`] chooses rounded to bf16 afterwards:
/// what `--dtype bf16` did before it converted each matrix as it is read.
fn converted_after_loading(path: &Path) -> LoadedModel {
    let mut loaded = load_model(path, &Device::Cpu).unwrap();
    for spec in loaded.config.param_specs().iter().filter(|s| held_in_bf16(s)) {
        let tensor = loaded.weights.remove(&spec.name).unwrap();
        loaded.quantized.insert(spec.name.clone(), QMatrix::quantize(&tensor, QFormat::BF16).unwrap().into());
    }
    loaded
}

/// Converting each matrix as it is read (so loading never holds the model in `f32`) gives the
/// same bf16 bytes, the same `f32` tensors and bit-identical logits as converting the loaded
/// `f32` model: for a Hugging Face directory with fused, transposed QKV (gpt2), one with a
/// mixture's experts (mixtral), an lmforge directory, and GGUF files in f32 and f16.
#[test]
fn converting_as_read_is_bit_identical_to_converting_after_loading() {
    let native = tempfile::tempdir().unwrap();
    let llama = load_model(&fixture("llama_gqa"), &Device::Cpu).unwrap();
    lmforge::io::native::save_native_dir(&llama.config, &llama.weights, None, native.path()).unwrap();
    let gguf = fixture("mixtral_gguf");
    for path in [
        fixture("gpt2"),
        fixture("mixtral"),
        native.path().to_path_buf(),
        gguf.join("model.gguf"),
        gguf.join("model.f16.gguf"),
    ] {
        let (after, as_read) = (converted_after_loading(&path), load_bf16(&path));
        let shown = path.display();
        assert!(!as_read.quantized.is_empty(), "{shown}");
        assert_eq!(as_read.quantized.len(), after.quantized.len(), "{shown}");
        for (name, want) in &after.quantized {
            let got = &as_read.quantized[name];
            assert_eq!(got.format(), QFormat::BF16, "{shown}: `{name}`");
            assert_eq!(got.rows_data(0..got.dims().0), want.rows_data(0..want.dims().0), "{shown}: `{name}`");
        }
        assert_eq!(as_read.weights.len(), after.weights.len(), "{shown}");
        for (name, want) in &after.weights {
            let got = &as_read.weights[name];
            let flat = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(flat(got), flat(want), "{shown}: `{name}`");
        }
        let ids: Vec<u32> = (1..12).collect();
        for chunk in [1, ids.len()] {
            let want = logits_in_chunks(&after.build().unwrap(), &ids, chunk);
            let got = logits_in_chunks(&as_read.build().unwrap(), &ids, chunk);
            assert!(
                got.iter().flatten().zip(want.iter().flatten()).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{shown}"
            );
        }
    }
}

fn lmforge(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_lmforge")).args(args).output().expect("run lmforge")
}

/// `score --dtype bf16` and `--dtype f32` from the command line: logits within the tolerance,
/// not equal; `generate --dtype bf16` runs; an unknown dtype is clap's error naming the choices.
#[test]
fn the_cli_takes_dtype_on_score_and_generate() {
    let model = fixture("llama_gqa");
    let m = model.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let scored = |dtype: &str| -> Vec<Vec<f32>> {
        let out = dir.path().join(format!("{dtype}.safetensors"));
        let run =
            lmforge(&["score", "--model", m, "--ids", "3,17,91,5", "--out", out.to_str().unwrap(), "--dtype", dtype]);
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        let tensors = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
        tensors["logits"].to_vec2::<f32>().unwrap()
    };
    let (f32_logits, bf16_logits) = (scored("f32"), scored("bf16"));
    let worst = worst_relative(&bf16_logits, &f32_logits);
    assert!(worst > 0.0 && worst < 2f32.powi(-5), "{worst}");

    let run = lmforge(&[
        "generate",
        "--model",
        m,
        "--ids",
        "3,17",
        "--greedy",
        "--max-new-tokens",
        "4",
        "--print-ids",
        "--dtype",
        "bf16",
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(String::from_utf8_lossy(&run.stdout).trim().split(',').count(), 4);

    let run = lmforge(&["generate", "--model", m, "--ids", "3", "--dtype", "fp8"]);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && err.contains("'fp8'") && err.contains("f32, bf16"), "{err}");
    // A forced kernel this CPU cannot run is reported at loading, with its cure.
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_lmforge"))
        .args(["score", "--model", m, "--ids", "3", "--out", "/tmp/never.safetensors", "--dtype", "bf16"])
        .env("LMFORGE_BF16_KERNEL", "amx")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        !run.status.success() && err.contains("loading model") && err.contains("HINT") && !err.contains("panicked"),
        "{err}"
    );
    let run = lmforge(&["train", "--dtype", "bf16"]);
    assert!(!run.status.success() && String::from_utf8_lossy(&run.stderr).contains("--dtype"));
}
