//! GGUF in and out, checked by independent producers and consumers:
//! - in: a Mixtral GGUF written by llama.cpp's own `convert_hf_to_gguf.py`
//!   (`tests/fixtures/mixtral_gguf`, made by `scripts/make_gguf_fixture.py`) loads with
//!   transformers' logits and greedy continuation;
//! - out: lmforge's f32 export of the converter's input is the converter's file, tensor for
//!   tensor and key for key; transformers' GGUF loader reads lmforge's exports with the same
//!   logits (needs `$LMFORGE_PYTHON`, a venv from `scripts/setup_python.sh`; fails instead of
//!   skipping when `LMFORGE_REQUIRE_PYTHON=1`, as in CI);
//! - bad input: architectures GGUF `llama` cannot hold, damaged files, all as errors that say
//!   what is wrong, without a backtrace.

mod command;
mod fetched;

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use lmforge::config::{presets, Ffn};
use lmforge::generate::{generate, GenerateOptions, Sampler, Sampling};
use lmforge::io::gguf::{export_gguf, gguf_problems, to_gguf_name, tokenizer_metadata, ExportOptions, Quant};
use lmforge::io::{load_model, LoadedModel};

use command::reference_python;
use fetched::smollm2;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn lmforge(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lmforge")).args(args).envs(env.iter().copied()).output().expect("run lmforge")
}

fn logits(loaded: &LoadedModel, ids: &[u32]) -> Tensor {
    let model = loaded.build().unwrap();
    let input = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    model.forward(&input, None).unwrap().squeeze(0).unwrap() // (T, V)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn read_gguf(path: &Path) -> (Content, BufReader<File>) {
    let mut reader = BufReader::new(File::open(path).unwrap());
    (Content::read(&mut reader).unwrap(), reader)
}

fn ids(tensors: &HashMap<String, Tensor>, name: &str) -> Vec<u32> {
    tensors[name].to_dtype(DType::I64).unwrap().to_vec1::<i64>().unwrap().into_iter().map(|v| v as u32).collect()
}

// --- in: llama.cpp's converter wrote it --------------------------------------------------------

#[test]
fn mixtral_gguf_from_llama_cpp_matches_transformers() {
    let dir = fixture("mixtral_gguf");
    let expected = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    let loaded = load_model(&dir.join("model.gguf"), &Device::Cpu).unwrap();
    let Ffn::Moe { experts, top_k, .. } = loaded.config.ffn else { panic!("not a mixture: {:?}", loaded.config.ffn) };
    assert_eq!((experts, top_k), (4, 2));

    let input = ids(&expected, "input_ids");
    let diff = max_abs_diff(&logits(&loaded, &input), &expected["logits"]);
    assert!(diff <= 1e-4, "max |logit difference| from transformers = {diff:e}");

    let greedy = ids(&expected, "greedy");
    let model = loaded.build().unwrap();
    let options =
        GenerateOptions { max_new_tokens: greedy.len(), prefill_chunk: None, stop: vec![], full_cache: false };
    let got = generate(&model, &input, &options, &mut Sampler::new(Sampling::Greedy).unwrap(), |_| Ok(())).unwrap();
    assert_eq!(got, greedy, "greedy continuation differs from transformers");

    // The tokenizer the converter wrote encodes as the Hugging Face one it came from.
    let from_gguf = loaded.tokenizer.expect("the converter wrote a tokenizer");
    let from_hf = load_model(&dir.join("hf"), &Device::Cpu).unwrap().tokenizer.unwrap();
    let text = "It is a truth universally acknowledged, that a single man in possession of a good fortune";
    assert_eq!(from_gguf.encode(text, false).unwrap(), from_hf.encode(text, false).unwrap());
    assert_eq!(from_gguf.chat_template(), from_hf.chat_template());
}

// --- out: what llama.cpp's tools would write --------------------------------------------------

/// Metadata lmforge writes that this converter run does not: head widths (the converter writes
/// them only when config.json has `head_dim`) and the add-BOS/EOS flags (only when
/// tokenizer_config.json has them); llama.cpp reads all four.
const EXTRA_KEYS: [&str; 4] = [
    "llama.attention.key_length",
    "llama.attention.value_length",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token",
];

/// `ours` holds the same tensors as `theirs`, byte for byte and type for type, and every key
/// of `theirs` with the same value (except the name the converter makes up from the directory).
fn assert_same_gguf(ours: &Path, theirs: &Path) {
    let (their_header, mut their_data) = read_gguf(theirs);
    let (our_header, mut our_data) = read_gguf(ours);
    let mut names: Vec<&String> = their_header.tensor_infos.keys().collect();
    names.sort();
    let mut our_names: Vec<&String> = our_header.tensor_infos.keys().collect();
    our_names.sort();
    assert_eq!(our_names, names, "{}", theirs.display());
    for name in names {
        let want = their_header.tensor(&mut their_data, name, &Device::Cpu).unwrap();
        let got = our_header.tensor(&mut our_data, name, &Device::Cpu).unwrap();
        assert_eq!((got.dtype(), got.shape()), (want.dtype(), want.shape()), "{name} in {}", theirs.display());
        assert!(got.data().unwrap() == want.data().unwrap(), "{name}: bytes differ from {}", theirs.display());
    }
    for (key, want) in &their_header.metadata {
        if key == "general.name" || key == "general.size_label" {
            continue;
        }
        let got = our_header.metadata.get(key).unwrap_or_else(|| panic!("lmforge does not write `{key}`"));
        assert_eq!(format!("{got:?}"), format!("{want:?}"), "`{key}` in {}", theirs.display());
    }
    let mut extra: Vec<&str> =
        our_header.metadata.keys().filter(|k| !their_header.metadata.contains_key(*k)).map(String::as_str).collect();
    extra.sort();
    assert_eq!(extra, EXTRA_KEYS, "keys only lmforge writes");
}

/// The converter's input exported by lmforge is the converter's output (f32), and each
/// `--quant` export is what `llama-quantize` makes of that (the tensor types it picks, e.g.
/// norms and router kept f32 and a Q8_0 head under Q4_0, and the blocks themselves).
#[test]
fn exports_are_what_llama_cpp_converter_and_quantizer_write() {
    let dir = fixture("mixtral_gguf");
    let source = load_model(&dir.join("hf"), &Device::Cpu).unwrap();
    let out = tempfile::tempdir().unwrap();
    for (quant, reference) in [
        (Quant::F32, "model.gguf"),
        (Quant::F16, "model.f16.gguf"),
        (Quant::Q8_0, "model.q8_0.gguf"),
        (Quant::Q4_0, "model.q4_0.gguf"),
    ] {
        let path = out.path().join(format!("{}.gguf", quant.name()));
        let options = ExportOptions { quant, ..Default::default() };
        export_gguf(&source.config, &source.weights, source.tokenizer.as_ref(), &path, &options).unwrap();
        assert_same_gguf(&path, &dir.join(reference));
        let (header, _) = read_gguf(&path);
        assert!(matches!(header.metadata["tokenizer.ggml.add_bos_token"], Value::Bool(false)));
    }
}

/// Read back, every weight of a quantized export is where it was, off by no more than its
/// type's rounding: a misplaced row, head or expert would be off by the size of the weights.
#[test]
fn quantized_exports_read_back_within_rounding() {
    let source = load_model(&fixture("mixtral_gguf").join("hf"), &Device::Cpu).unwrap();
    let out = tempfile::tempdir().unwrap();
    for quant in Quant::ALL {
        let path = out.path().join(format!("{}.gguf", quant.name()));
        let options = ExportOptions { quant, ..Default::default() };
        let written = export_gguf(&source.config, &source.weights, source.tokenizer.as_ref(), &path, &options).unwrap();
        let written: HashMap<String, GgmlDType> = written.into_iter().collect();
        let reloaded = load_model(&path, &Device::Cpu).unwrap();
        for (canonical, original) in &source.weights {
            let dtype = written[&to_gguf_name(canonical).unwrap().name];
            // Largest rounding error per type, as a fraction of the largest |weight| in a block:
            // half a step (Q8_0: max/127; Q4_0: max/8, doubled where +max clamps to 7 steps),
            // plus the f16 rounding of the block's scale times the largest quant (2^-11 · 127).
            let bound = match dtype {
                GgmlDType::F32 => 0.0,
                GgmlDType::F16 => 1.0 / 2048.0,
                GgmlDType::Q8_0 => (0.5 + 127.0 / 2048.0) / 127.0,
                GgmlDType::Q4_0 => (1.0 + 8.0 / 2048.0) / 8.0,
                other => panic!("{canonical}: unexpected {other:?}"),
            };
            let scale = original.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let diff = max_abs_diff(&reloaded.weights[canonical], original);
            assert!(
                diff <= bound * scale * 1.0001,
                "{} {canonical} ({dtype:?}): off by {diff}, bound {}",
                quant.name(),
                bound * scale
            );
        }
    }
}

/// SmolLM2's tokenizer, read from its GGUF (written by llama.cpp's converter from the original
/// tokenizer.json) and written back: the same vocabulary, types, merges, special ids, flags
/// and chat template.
#[test]
fn smollm2_tokenizer_is_written_back_as_llama_cpp_wrote_it() {
    let Some(path) = smollm2() else { return };
    let file = lmforge::io::gguf::GgufFile::open(&path).unwrap();
    let tokenizer = file.tokenizer().unwrap().unwrap();
    let written: HashMap<String, Value> = tokenizer_metadata(&tokenizer, 49152).unwrap().into_iter().collect();
    let original = &file.content().metadata;
    for key in [
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.chat_template",
    ] {
        assert_eq!(format!("{:?}", written[key]), format!("{:?}", original[key]), "`{key}`");
    }
}

// --- out: transformers reads it ----------------------------------------------------------------

#[test]
fn gguf_exports_load_in_transformers_with_the_same_logits() {
    let Some(python) = reference_python("gguf_exports_load_in_transformers_with_the_same_logits") else { return };
    let out = tempfile::tempdir().unwrap();
    let ids = [5u32, 17, 91, 3, 44, 2, 60, 7, 8, 9];
    // (name, model, prompt ids, options): GQA with a tied head (the quickstart's shape), MHA
    // with an untied head, MQA with theta 5e5 (a transformers fixture), a sliding window dropped
    // (exact while the prompt fits in it), and the real SmolLM2. The presets get fresh weights:
    // what is checked is the file, whatever the values.
    let preset = |name: &str, settings: &[&str]| {
        let settings: Vec<String> = settings.iter().map(|s| s.to_string()).collect();
        let config = lmforge::io::resolve_arch(name, &settings).unwrap();
        let weights = lmforge::model::init_weights(&config, 7, &Device::Cpu).unwrap();
        LoadedModel { config, weights, quantized: Default::default(), tokenizer: None, source: PathBuf::from(name) }
    };
    let mut cases: Vec<(&str, LoadedModel, Vec<u32>, ExportOptions)> = vec![
        ("tiny_llama_gqa_tied", preset("tiny-llama", &[]), ids.to_vec(), ExportOptions::default()),
        (
            "tiny_llama_mha_untied",
            preset("tiny-llama", &["attention.kv_heads=6", "tie_embeddings=false"]),
            ids.to_vec(),
            ExportOptions::default(),
        ),
        ("llama_mqa", load_model(&fixture("llama_mqa"), &Device::Cpu).unwrap(), ids.to_vec(), ExportOptions::default()),
        (
            "mistral_window_dropped",
            preset("tiny-mistral", &["attention.window=6"]),
            ids[..6].to_vec(),
            ExportOptions { drop_sliding_window: true, ..Default::default() },
        ),
    ];
    match smollm2() {
        Some(path) => cases.push((
            "smollm2",
            load_model(&path, &Device::Cpu).unwrap(),
            vec![1, 9690, 198, 2683, 359, 253, 1678, 2],
            Default::default(),
        )),
        None => eprintln!("SmolLM2 not found, checking the other models only"),
    }
    let mut files = Vec::new();
    for (name, loaded, ids, options) in cases {
        if let Some(window) = loaded.config.attention.window {
            assert!(ids.len() <= window, "{name}: the prompt must fit in the dropped window");
        }
        let path = out.path().join(format!("{name}.gguf"));
        export_gguf(&loaded.config, &loaded.weights, loaded.tokenizer.as_ref(), &path, &options).unwrap();
        let expected = HashMap::from([
            (
                "input_ids".to_string(),
                Tensor::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), &Device::Cpu).unwrap(),
            ),
            ("logits".to_string(), logits(&loaded, &ids).contiguous().unwrap()),
        ]);
        let mut expected_path = path.as_os_str().to_owned();
        expected_path.push(".expected.safetensors");
        candle_core::safetensors::save(&expected, &expected_path).unwrap();
        files.push(path);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check_gguf_export.py");
    let output = Command::new(&python).arg(script).args(&files).output().expect("run python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "transformers disagrees with lmforge:\n{stdout}");
    assert_eq!(stdout.matches(": OK ").count(), files.len(), "{stdout}");
}

// --- bad input ---------------------------------------------------------------------------------

#[test]
fn architectures_gguf_llama_cannot_hold_are_refused_by_name() {
    let strict = ExportOptions::default();
    for (preset, needles) in [
        ("tiny-gpt2", &["norm = layer_norm", "positions = learned", "ffn = mlp", "bias = true"][..]),
        ("tiny-mpt", &["positions = alibi", "ffn = mlp"][..]),
        ("phi-2", &["positions.fraction = 0.4", "residual = parallel", "norm = layer_norm", "head_bias = true"][..]),
        ("tiny-mistral", &["attention.window = 64 < context_length = 256"][..]),
        ("transformer-base", &["layout = encoder_decoder", "norm_placement = post", "positions = sinusoidal"][..]),
    ] {
        let config = presets::get(preset).unwrap();
        let problems = gguf_problems(&config, &strict).join("\n");
        for needle in needles {
            assert!(problems.contains(needle), "{preset}: missing {needle:?} in\n{problems}");
        }
    }
    let mut gelu_gate = presets::get("tiny-mixtral").unwrap();
    gelu_gate.ffn = Ffn::Moe {
        experts: 4,
        top_k: 2,
        expert: Box::new(Ffn::Gated { hidden: 256, act: lmforge::config::Activation::Gelu }),
        router: Default::default(),
    };
    assert_eq!(
        gguf_problems(&gelu_gate, &strict),
        ["ffn.expert.act = gelu: its gated feed-forward uses SiLU (SwiGLU)"]
    );
    for preset in ["tiny-llama", "tiny-mixtral", "llama2-7b", "mistral-7b", "mixtral-8x7b"] {
        let config = presets::get(preset).unwrap();
        let dropped = ExportOptions { drop_sliding_window: true, ..Default::default() };
        assert_eq!(gguf_problems(&config, &dropped), Vec::<String>::new(), "{preset}");
    }
    // Mistral 7B's window (4096) is shorter than its context (32768): refused unless dropped.
    assert!(gguf_problems(&presets::get("mistral-7b").unwrap(), &strict)[0].contains("attention.window = 4096"));
}

#[test]
fn export_of_an_unfit_architecture_fails_on_the_command_line_and_writes_nothing() {
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("mpt.gguf");
    let mpt = fixture("mpt");
    let result =
        lmforge(&["export", "--model", mpt.to_str().unwrap(), "--to", "gguf", "--out", path.to_str().unwrap()], &[]);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success() && !stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains("GGUF `llama` cannot hold this architecture") && stderr.contains("positions = alibi"),
        "{stderr}"
    );
    assert!(!path.exists() && std::fs::read_dir(out.path()).unwrap().count() == 0, "no file, not even a partial one");

    let mistral = out.path().join("tiny-mistral");
    let init = lmforge(&["init", "tiny-mistral", "--out", mistral.to_str().unwrap()], &[]);
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let args = ["export", "--model", mistral.to_str().unwrap(), "--to", "gguf", "--out", path.to_str().unwrap()];
    let result = lmforge(&args, &[]);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success() && stderr.contains("HINT: `--drop-sliding-window`"), "{stderr}");
    let result = lmforge(&[&args[..], &["--drop-sliding-window", "--quant", "q8_0"]].concat(), &[]);
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    assert!(String::from_utf8_lossy(&result.stderr).contains("wrote a `llama` GGUF (q8_0"));

    let result = lmforge(&[&args[..], &["--quant", "q5_k"]].concat(), &[]);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success() && stderr.contains("expected one of f32, f16, q8_0, q4_0"), "{stderr}");
}

/// A damaged file is reported in a few lines with a hint, even with `RUST_BACKTRACE=1` (candle
/// used to print its captured backtrace as part of the message).
#[test]
fn damaged_gguf_is_a_short_error_without_backtrace() {
    let source = fixture("mixtral_gguf").join("model.gguf");
    let bytes = std::fs::read(&source).unwrap();
    let (content, _) = read_gguf(&source);
    let header_end = content.tensor_data_offset as usize;
    let dir = tempfile::tempdir().unwrap();
    // Cut inside the metadata, inside the tensor infos, and inside the data.
    for (what, len) in [("metadata", 300), ("tensor infos", header_end - 40), ("data", bytes.len() - 1000)] {
        let path = dir.path().join(format!("cut-{len}.gguf"));
        std::fs::write(&path, &bytes[..len]).unwrap();
        let out = lmforge(
            &["score", "--model", path.to_str().unwrap(), "--ids", "1,2", "--out", "/dev/null"],
            &[("RUST_BACKTRACE", "1"), ("RUST_LIB_BACKTRACE", "1")],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: loaded a truncated file");
        assert!(stderr.contains("truncated or corrupted") && stderr.contains("HINT"), "{what}:\n{stderr}");
        assert!(!stderr.contains("backtrace") && !stderr.contains("panicked"), "{what}:\n{stderr}");
        assert!(stderr.lines().count() <= 4, "{what}: {} lines:\n{stderr}", stderr.lines().count());
    }
}

/// A file whose tensors disagree with its own metadata: a missing expert, a mis-shaped tensor,
/// a tensor the metadata has no place for, a type whose blocks do not tile the rows.
#[test]
fn gguf_tensors_that_disagree_with_the_metadata_are_listed() {
    let source = load_model(&fixture("mixtral_gguf").join("model.gguf"), &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ok.gguf");
    export_gguf(&source.config, &source.weights, None, &path, &ExportOptions::default()).unwrap();
    let (content, _) = read_gguf(&path);
    let bytes = std::fs::read(&path).unwrap();

    // The metadata claims 3 experts, the stacks hold 4; and one more layer than the file has.
    let mut config = source.config.clone();
    let Ffn::Moe { experts, .. } = &mut config.ffn else { unreachable!() };
    *experts = 3;
    let file = lmforge::io::gguf::GgufFile::open(&path).unwrap();
    let err = file.weights(&config, &Device::Cpu).err().unwrap().to_string();
    assert!(
        err.contains("tensor `blk.0.ffn_gate_exps.weight` (lmforge `layers.0.ffn.experts.0.gate.weight` … `layers.0.ffn.experts.2.gate.weight`) has shape [4, 64, 32], expected [3, 64, 32]"),
        "{err}"
    );
    config.layers = 3;
    let err = file.weights(&config, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("missing tensor `blk.2.attn_q.weight`"), "{err}");

    // The header's tensor count one too high: the tensor infos run into the data.
    let mut copy = bytes.clone();
    copy[8..16].copy_from_slice(&(content.tensor_infos.len() as u64 + 1).to_le_bytes());
    let bad = dir.path().join("count.gguf");
    std::fs::write(&bad, &copy).unwrap();
    let err = load_model(&bad, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("corrupted header: a tensor has an empty name"), "{err}");

    // A tensor stored as Q8_0 (blocks of 32) whose rows claim 24 values: the shape says 24,
    // the type says a multiple of 32.
    let name = b"output_norm.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let mut copy = bytes.clone();
    copy[at + 4..at + 12].copy_from_slice(&24u64.to_le_bytes()); // the one dim
    copy[at + 12..at + 16].copy_from_slice(&8u32.to_le_bytes()); // GGML_TYPE_Q8_0
    let bad = dir.path().join("type.gguf");
    std::fs::write(&bad, &copy).unwrap();
    let err = load_model(&bad, &Device::Cpu).err().unwrap().to_string();
    assert!(
        err.contains("tensor `output_norm.weight` has shape [24], which is not a whole number of Q8_0 blocks of 32"),
        "{err}"
    );
}
