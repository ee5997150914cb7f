//! Brief mutation fuzzing of the config parser and the Hugging Face loader: random byte and
//! token mutations of valid inputs must give `Ok` or a typed error, never a panic. (The GGUF
//! loader has its own truncation and byte-overwrite sweeps in `src/io/gguf/tests.rs`.)
//! Deterministic: a fixed seed, so a failure reproduces.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use candle_core::Device;
use lmforge::config::{apply_overrides, presets, ModelConfig};
use lmforge::io::load_model;

/// xorshift64*: tiny, seeded, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Overwrite, insert, delete or duplicate a few bytes, or splice in an interesting token.
fn mutate(input: &[u8], rng: &mut Rng) -> Vec<u8> {
    const TOKENS: [&[u8]; 10] =
        [b"0", b"-1", b"1e308", b"null", b"\"\"", b"[]", b"{}", b"18446744073709551615", b"\xff", b"NaN"];
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(out.len());
        match rng.below(5) {
            0 if !out.is_empty() => {
                let last = out.len() - 1;
                out[at.min(last)] = rng.next() as u8;
            }
            1 => out.insert(at, rng.next() as u8),
            2 if !out.is_empty() => {
                out.remove(at.min(out.len() - 1));
            }
            3 => {
                let token = TOKENS[rng.below(TOKENS.len())];
                out.splice(at..(at + rng.below(4)).min(out.len()), token.iter().copied());
            }
            _ => out.truncate(at),
        }
    }
    out
}

fn no_panic(what: &str, f: impl FnOnce()) {
    if catch_unwind(AssertUnwindSafe(f)).is_err() {
        panic!("panicked on {what}");
    }
}

#[test]
fn config_parser_never_panics() {
    let mut rng = Rng(0x5EED);
    let seeds: Vec<String> = ["gpt2", "mixtral-8x7b", "phi-2", "mpt-7b", "transformer-base"]
        .iter()
        .flat_map(|name| {
            let config = presets::get(name).unwrap();
            [serde_json::to_string(&config).unwrap(), toml::to_string(&config).unwrap()]
        })
        .collect();
    for i in 0..3000 {
        let seed = &seeds[i % seeds.len()];
        let mutated = String::from_utf8_lossy(&mutate(seed.as_bytes(), &mut rng)).to_string();
        no_panic(&format!("config text {mutated:?}"), || {
            if let Ok(config) = ModelConfig::from_text(&mutated, "fuzz") {
                let _ = config.report();
            }
        });
    }
    let paths = [
        "layers",
        "attention.heads",
        "attention.kv_heads",
        "attention.window",
        "ffn",
        "ffn.hidden",
        "positions",
        "norm",
        "d_model",
    ];
    let values = ["0", "-3", "1e9", "null", "\"x\"", "[1,null]", "alibi", "{\"kind\":\"moe\"}", "18446744073709551615"];
    for _ in 0..2000 {
        let setting = format!("{}={}", paths[rng.below(paths.len())], values[rng.below(values.len())]);
        no_panic(&setting, || {
            if let Ok(config) = apply_overrides(&presets::get("tiny-llama").unwrap(), std::slice::from_ref(&setting)) {
                let _ = config.report();
            }
        });
    }
}

#[test]
fn hugging_face_loader_never_panics() {
    let mut rng = Rng(0xF00D);
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for (i, family) in ["gpt2", "llama_gqa", "mixtral", "phi", "mpt"].iter().cycle().take(150).enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let config = std::fs::read(fixtures.join(family).join("config.json")).unwrap();
        let weights = std::fs::read(fixtures.join(family).join("model.safetensors")).unwrap();
        let (config, weights) =
            if i % 2 == 0 { (mutate(&config, &mut rng), weights) } else { (config, mutate(&weights, &mut rng)) };
        std::fs::write(dir.path().join("config.json"), &config).unwrap();
        std::fs::write(dir.path().join("model.safetensors"), &weights).unwrap();
        no_panic(&format!("{family} mutation {i}"), || {
            if let Ok(loaded) = load_model(dir.path(), &Device::Cpu) {
                let _ = loaded.build();
            }
        });
    }
}
