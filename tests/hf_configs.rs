//! Hugging Face configs as users bring them: both layouts transformers writes, the config
//! classes' own defaults, and clear errors for a config that contradicts its weights or asks
//! for a RoPE lmforge does not compute.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use lmforge::config::{Ffn, ModelConfig, Positions, RopeScaling};
use lmforge::io::hf::{export_hf_dir, read_hf_config};
use lmforge::io::load_model;
use serde_json::{json, Value};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// A copy of fixture `name` whose config.json is edited by `edit`.
fn edited_fixture(name: &str, edit: impl FnOnce(&mut Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let path = dir.path().join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    dir
}

fn load_error(dir: &Path) -> String {
    match load_model(dir, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn rope(config: &ModelConfig) -> (f64, f64, Option<RopeScaling>) {
    match config.positions {
        Positions::Rope { theta, fraction, scaling } => (theta, fraction, scaling),
        ref other => panic!("not RoPE: {other:?}"),
    }
}

#[test]
fn the_partial_rotary_factor_is_read_from_rope_parameters() {
    // The Phi: transformers 5 writes the factor only inside `rope_parameters`.
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(fixture("phi/config.json")).unwrap()).unwrap();
    assert_eq!(saved["rope_parameters"]["partial_rotary_factor"], 0.4);
    assert!(saved.get("partial_rotary_factor").is_none());
    assert_eq!(rope(&read_hf_config(&fixture("phi")).unwrap()), (20_000.0, 0.4, None));
    assert_eq!(rope(&read_hf_config(&fixture("phi_v4")).unwrap()), (50_000.0, 0.75, None));
}

#[test]
fn a_4x_config_rewritten_in_the_5x_layout_is_the_same_model() {
    let v4 = read_hf_config(&fixture("llama_linear_v4")).unwrap();
    let v5 = edited_fixture("llama_linear_v4", |c| {
        let object = c.as_object_mut().unwrap();
        let scaling = object.remove("rope_scaling").unwrap();
        let theta = object.remove("rope_theta").unwrap();
        c["rope_parameters"] = json!({"rope_type": scaling["type"], "factor": scaling["factor"], "rope_theta": theta});
    });
    assert_eq!(rope(&v4), (20_000.0, 1.0, Some(RopeScaling::Linear { factor: 2.5 })));
    assert_eq!(read_hf_config(v5.path()).unwrap(), v4);
}

#[test]
fn defaults_are_the_config_classes_own() {
    // MixtralConfig.default_theta is 1e6, not 10 000.
    let mixtral = edited_fixture("mixtral", |c| {
        c.as_object_mut().unwrap().remove("rope_parameters");
    });
    assert_eq!(rope(&read_hf_config(mixtral.path()).unwrap()).0, 1_000_000.0);
    // MixtralConfig's other defaults: 8 experts, top-2, 8 KV heads, eps 1e-5.
    let bare = edited_fixture("mixtral", |c| {
        for key in ["num_local_experts", "num_experts_per_tok", "num_key_value_heads", "rms_norm_eps"] {
            c.as_object_mut().unwrap().remove(key);
        }
        c["num_attention_heads"] = json!(16);
    });
    let config = read_hf_config(bare.path()).unwrap();
    assert!(matches!(config.ffn, Ffn::Moe { experts: 8, top_k: 2, .. }), "{:?}", config.ffn);
    assert_eq!((config.attention.kv_heads, config.norm_eps), (8, 1e-5));
    // LlamaConfig reads no experts (a stray key builds a dense model, as in transformers), and
    // its KV heads default to the query heads.
    let llama = edited_fixture("llama_mqa", |c| {
        c.as_object_mut().unwrap().remove("num_key_value_heads");
        c["num_local_experts"] = json!(4);
    });
    let config = read_hf_config(llama.path()).unwrap();
    assert!(matches!(config.ffn, Ffn::Gated { .. }) && config.attention.kv_heads == config.attention.heads);
    // MistralConfig.sliding_window is 4096 when absent; `null` means no window.
    let absent = edited_fixture("mistral", |c| {
        c.as_object_mut().unwrap().remove("sliding_window");
    });
    assert_eq!(read_hf_config(absent.path()).unwrap().attention.window, Some(4096));
    let null = edited_fixture("mistral", |c| c["sliding_window"] = Value::Null);
    assert_eq!(read_hf_config(null.path()).unwrap().attention.window, None);
    // Phi's partial factor is 0.5 when neither layout gives one.
    let phi = edited_fixture("phi", |c| {
        c["rope_parameters"].as_object_mut().unwrap().remove("partial_rotary_factor");
    });
    assert_eq!(rope(&read_hf_config(phi.path()).unwrap()).1, 0.5);
}

#[test]
fn mpt_builds_what_transformers_builds() {
    // The fixture says expansion_ratio 3 and alibi_bias_max 4; transformers' MPT builds 4 x
    // d_model and ALiBi 8 regardless (and so the parity test passes).
    let config = read_hf_config(&fixture("mpt")).unwrap();
    assert_eq!(config.ffn, Ffn::Mlp { hidden: 4 * config.d_model, act: lmforge::config::Activation::Gelu });
    assert_eq!(config.positions, Positions::Alibi { max_bias: 8.0 });

    // An export may only claim that: other FFN widths or ALiBi slopes have no MPT export.
    let loaded = load_model(&fixture("mpt"), &Device::Cpu).unwrap();
    for setting in ["ffn.hidden=96", "positions.max_bias=4"] {
        let changed = lmforge::config::apply_overrides(&loaded.config, &[setting.to_string()]).unwrap();
        let out = tempfile::tempdir().unwrap();
        let err = export_hf_dir(&changed, &loaded.weights, None, out.path()).unwrap_err().to_string();
        assert!(err.contains("no Hugging Face family can represent this architecture"), "{setting}: {err}");
    }
}

#[test]
fn a_config_that_contradicts_its_weights_names_the_field_the_tensor_and_both_values() {
    let dir = edited_fixture("llama_gqa", |c| {
        c["intermediate_size"] = json!(96);
        c["num_key_value_heads"] = json!(3);
        c["vocab_size"] = json!(120);
    });
    let err = load_error(dir.path());
    assert!(err.contains("config.json: these fields contradict the weights"), "{err}");
    assert!(
        err.contains(
            "`vocab_size` = 120 implies 120 rows in `model.embed_tokens.weight`, which has 128 (shape [128, 48])"
        ),
        "{err}"
    );
    assert!(
        err.contains(
            "`num_key_value_heads` = 3 implies 36 rows (3 × 12) in `model.layers.0.self_attn.k_proj.weight`, \
             which has 24 (shape [24, 48]) (and 1 more tensor)"
        ),
        "{err}"
    );
    assert!(
        err.contains(
            "`intermediate_size` = 96 implies 96 rows in `model.layers.0.mlp.gate_proj.weight`, which has 64 \
             (shape [64, 48]) (and 1 more tensor)"
        ),
        "{err}"
    );
    assert!(err.contains("HINT:"), "{err}");
    // Only the fields: not a screenful of every tensor built from them.
    assert!(!err.contains("up_proj"), "{err}");

    // A field left out is named with the default it took.
    let dir = edited_fixture("gpt2", |c| c["n_inner"] = Value::Null);
    let err = load_error(dir.path());
    assert!(
        err.contains(
            "`n_inner` (not set, so 144) implies 144 columns in `transformer.h.0.mlp.c_fc.weight`, which has 80 \
             (shape [36, 80])"
        ),
        "{err}"
    );
}

#[test]
fn settings_transformers_honours_and_lmforge_cannot_are_refused() {
    let dir = edited_fixture("gpt2", |c| c["scale_attn_weights"] = json!(false));
    assert!(load_error(dir.path()).contains("field `scale_attn_weights`: false is not supported"));
    let dir = edited_fixture("mpt", |c| c["attn_config"]["clip_qkv"] = json!(6.0));
    assert!(load_error(dir.path()).contains("field `attn_config.clip_qkv`: 6.0 is not supported"));
}

#[test]
fn an_unknown_rope_type_is_named_with_the_supported_ones() {
    let dir = edited_fixture("llama_mqa", |c| {
        c["rope_parameters"] = json!({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0});
    });
    let want = "field `rope_parameters.rope_type`: \"dynamic\" is not supported; supported RoPE types: default, \
                linear, llama3, yarn";
    let err = load_error(dir.path());
    assert!(err.contains(want), "{err}");

    // The same through the command line: a message and a non-zero exit, no panic.
    let out =
        Command::new(env!("CARGO_BIN_EXE_lmforge")).args(["show", dir.path().to_str().unwrap()]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains(want) && !stderr.contains("panicked"), "{stderr}");

    let v4 = edited_fixture("llama_mqa", |c| c["rope_scaling"] = json!({"type": "longrope", "long_factor": [1.0]}));
    assert!(load_error(v4.path()).contains("field `rope_scaling.type`: \"longrope\" is not supported"));
}
