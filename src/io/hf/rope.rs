//! RoPE in `config.json`, in both layouts transformers reads, and in the one transformers 5
//! writes. The families call these; nothing else in lmforge reads or writes RoPE keys.
//!
//! - transformers 4.x wrote top-level keys: `"rope_theta": 500000.0`, Phi's
//!   `"partial_rotary_factor": 0.4`, and `"rope_scaling": {"rope_type": "llama3", "factor": 8.0,
//!   ...}` (older files say `"type"`).
//! - transformers 5.x writes one object: `"rope_parameters": {"rope_type": "llama3",
//!   "rope_theta": 500000.0, "factor": 8.0, ...}`, with Phi's factor inside it.

use serde_json::{json, Map, Value};

use super::HfJson;
use crate::config::{Positions, RopeScaling};
use crate::error::Result;

/// What a family's transformers config class assumes when `config.json` leaves a RoPE key out.
pub struct RopeDefaults {
    /// The class's `default_theta`: 10 000, but 1 000 000 for Mixtral.
    pub theta: f64,
    /// The partial rotary factor of families whose attention reads one (Phi: 0.5, "assign
    /// default for BC"); `None` for families whose attention rotates whole heads whatever the
    /// config says (Llama, Mistral, Mixtral: their default RoPE never reads the factor).
    pub fraction: Option<f64>,
}

/// The `rope_type`s lmforge computes, as transformers names them.
fn supported_types() -> String {
    std::iter::once("default").chain(RopeScaling::KINDS).collect::<Vec<_>>().join(", ")
}

/// The RoPE of a config in either layout, merged with transformers 5's precedence
/// (`RotaryEmbeddingConfigMixin.convert_rope_params_to_dict` and `standardize_rope_params` in
/// `modeling_rope_utils.py`):
/// - the parameters are the 4.x `rope_scaling` object when it has entries, else the 5.x
///   `rope_parameters` (a file with both is read as transformers reads it: `rope_scaling` wins);
/// - `rope_theta` and `partial_rotary_factor` inside them win over the top-level keys, which win
///   over the family's defaults;
/// - `rope_type` (4.x: `type`) defaults to `default`;
/// - the scalings' `original_max_position_embeddings` comes from a top-level key first
///   (Phi-3 keeps it there), then the parameters, then `max_position_embeddings`.
pub fn read_rope(json: &HfJson, defaults: RopeDefaults, context_length: usize) -> Result<Positions> {
    let params = json.object(if json.has_entries("rope_scaling") { "rope_scaling" } else { "rope_parameters" });
    let theta = params.f64_or("rope_theta", json.f64_or("rope_theta", defaults.theta)?)?;
    let fraction = match defaults.fraction {
        Some(default) => params.f64_or("partial_rotary_factor", json.f64_or("partial_rotary_factor", default)?)?,
        None => 1.0,
    };
    let type_key = if params.is_set("rope_type") || !params.is_set("type") { "rope_type" } else { "type" };
    let rope_type = params.str_or(type_key, "default")?;
    let original_context_length = || -> Result<usize> {
        json.opt_usize("original_max_position_embeddings")?
            .map_or_else(|| params.usize_or("original_max_position_embeddings", context_length), Ok)
    };
    let scaling = match rope_type.as_str() {
        "default" => None,
        "linear" => Some(RopeScaling::Linear { factor: params.f64("factor")? }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: params.f64("factor")?,
            low_freq_factor: params.f64("low_freq_factor")?,
            high_freq_factor: params.f64("high_freq_factor")?,
            original_context_length: original_context_length()?,
        }),
        "yarn" => {
            let original = original_context_length()?;
            // transformers reads these with `or`: a missing, null or zero value takes the default.
            let or_default = |key: &str, default: f64| -> Result<f64> {
                Ok(params.opt_f64(key)?.filter(|v| *v != 0.0).unwrap_or(default))
            };
            Some(RopeScaling::Yarn {
                factor: params.opt_f64("factor")?.unwrap_or(context_length as f64 / original as f64),
                original_context_length: original,
                beta_fast: or_default("beta_fast", 32.0)?,
                beta_slow: or_default("beta_slow", 1.0)?,
                attention_factor: params.opt_f64("attention_factor")?,
                mscale: params.opt_f64("mscale")?,
                mscale_all_dim: params.opt_f64("mscale_all_dim")?,
                truncate: params.bool_or("truncate", true)?,
            })
        }
        other => {
            return Err(params
                .error(type_key, format!("\"{other}\" is not supported; supported RoPE types: {}", supported_types())))
        }
    };
    Ok(Positions::Rope { theta, fraction, scaling })
}

/// `rope_parameters` as transformers 5 writes it; `fraction` only for families that read it.
pub fn write_rope(theta: f64, fraction: Option<f64>, scaling: Option<&RopeScaling>) -> Value {
    let mut params = Map::new();
    let mut set = |key: &str, value: Value| {
        params.insert(key.to_string(), value);
    };
    set("rope_theta", json!(theta));
    if let Some(fraction) = fraction {
        set("partial_rotary_factor", json!(fraction));
    }
    match scaling {
        None => set("rope_type", json!("default")),
        Some(&RopeScaling::Linear { factor }) => {
            set("rope_type", json!("linear"));
            set("factor", json!(factor));
        }
        Some(&RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_context_length }) => {
            set("rope_type", json!("llama3"));
            set("factor", json!(factor));
            set("low_freq_factor", json!(low_freq_factor));
            set("high_freq_factor", json!(high_freq_factor));
            set("original_max_position_embeddings", json!(original_context_length));
        }
        Some(&RopeScaling::Yarn {
            factor,
            original_context_length,
            beta_fast,
            beta_slow,
            attention_factor,
            mscale,
            mscale_all_dim,
            truncate,
        }) => {
            set("rope_type", json!("yarn"));
            set("factor", json!(factor));
            set("original_max_position_embeddings", json!(original_context_length));
            set("beta_fast", json!(beta_fast));
            set("beta_slow", json!(beta_slow));
            set("truncate", json!(truncate));
            for (key, value) in
                [("attention_factor", attention_factor), ("mscale", mscale), ("mscale_all_dim", mscale_all_dim)]
            {
                if let Some(value) = value {
                    set(key, json!(value));
                }
            }
        }
    }
    Value::Object(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(config: Value, defaults: RopeDefaults) -> Result<Positions> {
        let json = HfJson::from_value("config.json", config);
        read_rope(&json, defaults, 4096)
    }

    fn llama() -> RopeDefaults {
        RopeDefaults { theta: 10_000.0, fraction: None }
    }

    fn phi() -> RopeDefaults {
        RopeDefaults { theta: 10_000.0, fraction: Some(0.5) }
    }

    fn rope(theta: f64, fraction: f64, scaling: Option<RopeScaling>) -> Positions {
        Positions::Rope { theta, fraction, scaling }
    }

    #[test]
    fn both_layouts_give_the_same_rope() {
        let llama3 = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_context_length: 8192,
        };
        let v4 = json!({"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}});
        let v5 = json!({"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}});
        assert_eq!(read(v4, llama()).unwrap(), rope(500_000.0, 1.0, Some(llama3)));
        assert_eq!(read(v5, llama()).unwrap(), rope(500_000.0, 1.0, Some(llama3)));

        // The Phi: 5.x keeps the partial factor inside `rope_parameters`.
        let v5 =
            json!({"rope_parameters": {"partial_rotary_factor": 0.4, "rope_theta": 10000.0, "rope_type": "default"}});
        assert_eq!(read(v5, phi()).unwrap(), rope(10_000.0, 0.4, None));
        let v4 = json!({"partial_rotary_factor": 0.4, "rope_theta": 20000.0});
        assert_eq!(read(v4, phi()).unwrap(), rope(20_000.0, 0.4, None));
    }

    #[test]
    fn precedence_follows_transformers() {
        // Inside the parameters beats top level beats the family default.
        let both = json!({"rope_theta": 1.0e6, "partial_rotary_factor": 0.25,
            "rope_parameters": {"rope_theta": 5.0e5, "partial_rotary_factor": 0.75}});
        assert_eq!(read(both, phi()).unwrap(), rope(500_000.0, 0.75, None));
        let top = json!({"rope_theta": 1.0e6, "rope_parameters": {"rope_type": "default"}});
        assert_eq!(read(top, phi()).unwrap(), rope(1_000_000.0, 0.5, None));
        let mixtral = RopeDefaults { theta: 1.0e6, fraction: None };
        assert_eq!(read(json!({}), mixtral).unwrap(), rope(1_000_000.0, 1.0, None));
        // Llama's attention rotates the whole head: a stray factor is ignored, as transformers does.
        let stray = json!({"rope_parameters": {"rope_theta": 1.0e4, "partial_rotary_factor": 0.5}});
        assert_eq!(read(stray, llama()).unwrap(), rope(10_000.0, 1.0, None));
        // A non-empty `rope_scaling` replaces `rope_parameters` whole; `null` or `{}` does not.
        let scaled = json!({"rope_scaling": {"type": "linear", "factor": 2.0},
            "rope_parameters": {"rope_type": "default", "rope_theta": 3.0e4}});
        assert_eq!(read(scaled, llama()).unwrap(), rope(10_000.0, 1.0, Some(RopeScaling::Linear { factor: 2.0 })));
        let empty = json!({"rope_scaling": {}, "rope_parameters": {"rope_theta": 3.0e4}});
        assert_eq!(read(empty, llama()).unwrap(), rope(30_000.0, 1.0, None));
    }

    #[test]
    fn yarn_defaults_and_original_context() {
        let config = json!({"original_max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 0, "original_max_position_embeddings": 1024}});
        let want = RopeScaling::Yarn {
            factor: 4.0,
            original_context_length: 2048, // top level first
            beta_fast: 32.0,               // 0 reads as unset
            beta_slow: 1.0,
            attention_factor: None,
            mscale: None,
            mscale_all_dim: None,
            truncate: true,
        };
        assert_eq!(read(config, llama()).unwrap(), rope(10_000.0, 1.0, Some(want)));
        // No factor: the ratio of the two context lengths; no original: max_position_embeddings.
        let config = json!({"rope_parameters": {"rope_type": "yarn", "original_max_position_embeddings": 1024}});
        let Positions::Rope { scaling: Some(scaling), .. } = read(config, llama()).unwrap() else { panic!() };
        assert_eq!(scaling.factor(), 4.0);
    }

    #[test]
    fn written_parameters_read_back() {
        let scalings = [
            None,
            Some(RopeScaling::Linear { factor: 2.5 }),
            Some(RopeScaling::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.5,
                high_freq_factor: 3.0,
                original_context_length: 64,
            }),
            Some(RopeScaling::Yarn {
                factor: 4.0,
                original_context_length: 16,
                beta_fast: 8.0,
                beta_slow: 2.0,
                attention_factor: Some(1.25),
                mscale: Some(0.5),
                mscale_all_dim: Some(1.5),
                truncate: false,
            }),
        ];
        for scaling in scalings {
            let config = json!({ "rope_parameters": write_rope(25_000.0, Some(0.75), scaling.as_ref()) });
            assert_eq!(read(config, phi()).unwrap(), rope(25_000.0, 0.75, scaling));
        }
    }

    #[test]
    fn unknown_types_and_bad_fields_are_named() {
        let err = read(json!({"rope_scaling": {"type": "dynamic", "factor": 2.0}}), llama()).unwrap_err().to_string();
        assert!(err.contains("`rope_scaling.type`: \"dynamic\" is not supported"), "{err}");
        assert!(err.contains("default, linear, llama3, yarn"), "{err}");
        let err = read(json!({"rope_parameters": {"rope_type": "longrope"}}), llama()).unwrap_err().to_string();
        assert!(err.contains("`rope_parameters.rope_type`: \"longrope\""), "{err}");
        let err = read(json!({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}), llama()).unwrap_err();
        assert!(err.to_string().contains("`rope_parameters.low_freq_factor`: expected a number"), "{err}");
        let err = read(json!({"rope_parameters": {"rope_theta": "big"}}), llama()).unwrap_err().to_string();
        assert!(err.contains("`rope_parameters.rope_theta`: expected a number, found \"big\""), "{err}");
    }
}
