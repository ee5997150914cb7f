//! RoPE scaling: how a model stretches its rotary frequencies to reach past the context it was
//! pretrained on. Pure data and its validation; the frequencies themselves are computed where
//! the cos/sin tables are made (`nn::positions::Rope`).

use serde::{Deserialize, Serialize};

/// A published way of rescaling RoPE's inverse frequencies `1 / theta^(2i / rot)`.
///
/// The field names follow lmforge's (`original_context_length` is the `context_length` the
/// model was pretrained with); `io::hf` maps them to and from `rope_parameters`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RopeScaling {
    /// Position interpolation (Chen et al. 2023): every frequency divided by `factor`, so
    /// position `p` rotates like `p / factor` did in pretraining.
    Linear { factor: f64 },
    /// Llama 3.1's scaling (also SmolLM3): wavelengths longer than `original_context_length /
    /// low_freq_factor` are stretched by `factor`, those shorter than `original_context_length
    /// / high_freq_factor` are kept (they resolve nearby tokens), and the band between is
    /// blended linearly in `original_context_length / wavelength`. Defaults are Llama 3.1's.
    Llama3 {
        #[serde(default = "llama3_factor")]
        factor: f64,
        #[serde(default = "llama3_low_freq_factor")]
        low_freq_factor: f64,
        #[serde(default = "llama3_high_freq_factor")]
        high_freq_factor: f64,
        #[serde(default = "llama3_original_context_length")]
        original_context_length: usize,
    },
    /// YaRN (Peng et al. 2023): dims that rotate fewer than `beta_slow` times over the original
    /// context are interpolated by `factor`, dims that rotate more than `beta_fast` times are
    /// kept, with a linear ramp between; cos and sin are then scaled by an attention factor
    /// (`attention_factor` if set, else derived from `factor` and `mscale` / `mscale_all_dim`
    /// as in transformers), which sharpens attention to make up for the longer context.
    Yarn {
        factor: f64,
        original_context_length: usize,
        #[serde(default = "yarn_beta_fast")]
        beta_fast: f64,
        #[serde(default = "yarn_beta_slow")]
        beta_slow: f64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attention_factor: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mscale: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mscale_all_dim: Option<f64>,
        /// Round the ramp's ends to whole dims (the paper's choice; gpt-oss turns it off).
        #[serde(default = "yarn_truncate")]
        truncate: bool,
    },
}

fn llama3_factor() -> f64 {
    8.0
}
fn llama3_low_freq_factor() -> f64 {
    1.0
}
fn llama3_high_freq_factor() -> f64 {
    4.0
}
fn llama3_original_context_length() -> usize {
    8192
}
fn yarn_beta_fast() -> f64 {
    32.0
}
fn yarn_beta_slow() -> f64 {
    1.0
}
fn yarn_truncate() -> bool {
    true
}

impl RopeScaling {
    /// The names of the variants, as config files and `rope_type` spell them.
    pub const KINDS: [&'static str; 3] = ["linear", "llama3", "yarn"];

    /// This variant's name, as config files and `rope_type` spell it.
    pub fn kind(&self) -> &'static str {
        match self {
            RopeScaling::Linear { .. } => Self::KINDS[0],
            RopeScaling::Llama3 { .. } => Self::KINDS[1],
            RopeScaling::Yarn { .. } => Self::KINDS[2],
        }
    }

    pub fn factor(&self) -> f64 {
        match *self {
            RopeScaling::Linear { factor } | RopeScaling::Llama3 { factor, .. } | RopeScaling::Yarn { factor, .. } => {
                factor
            }
        }
    }

    /// Every problem with these values, each starting with its field path under `path`.
    pub fn problems(&self, path: &str) -> Vec<String> {
        let mut problems = Vec::new();
        let mut positive = |field: &str, value: f64| {
            if !(value > 0.0 && value.is_finite()) {
                problems.push(format!("{path}.{field} = {value}, expected a positive number"));
            }
        };
        positive("factor", self.factor());
        match *self {
            RopeScaling::Linear { .. } => {}
            RopeScaling::Llama3 { low_freq_factor, high_freq_factor, .. } => {
                positive("low_freq_factor", low_freq_factor);
                positive("high_freq_factor", high_freq_factor);
                if high_freq_factor <= low_freq_factor {
                    problems.push(format!(
                        "{path}.high_freq_factor = {high_freq_factor} must exceed {path}.low_freq_factor = {low_freq_factor}"
                    ));
                }
            }
            RopeScaling::Yarn { beta_fast, beta_slow, attention_factor, mscale, mscale_all_dim, .. } => {
                positive("beta_fast", beta_fast);
                positive("beta_slow", beta_slow);
                if let Some(value) = attention_factor {
                    positive("attention_factor", value);
                }
                for (field, value) in [("mscale", mscale), ("mscale_all_dim", mscale_all_dim)] {
                    if let Some(value) = value.filter(|v| !v.is_finite()) {
                        problems.push(format!("{path}.{field} = {value}, expected a finite number"));
                    }
                }
            }
        }
        if let RopeScaling::Llama3 { original_context_length, .. } | RopeScaling::Yarn { original_context_length, .. } =
            *self
        {
            if original_context_length == 0 {
                problems.push(format!("{path}.original_context_length = 0, expected a positive number"));
            } else if original_context_length > 1 << 24 {
                problems.push(format!(
                    "{path}.original_context_length = {original_context_length} is beyond lmforge's limit of {}",
                    1 << 24
                ));
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{presets, ModelConfig, Positions};

    #[test]
    fn configs_with_a_scaling_round_trip_and_configs_without_one_still_parse() {
        let mut config = presets::get("tiny-llama").unwrap();
        let yarn = RopeScaling::Yarn {
            factor: 4.0,
            original_context_length: 64,
            beta_fast: 16.0,
            beta_slow: 2.0,
            attention_factor: None,
            mscale: Some(0.8),
            mscale_all_dim: Some(0.6),
            truncate: false,
        };
        config.positions = Positions::Rope { theta: 30_000.0, fraction: 1.0, scaling: Some(yarn) };
        let json = serde_json::to_string(&config).unwrap();
        assert_eq!(ModelConfig::from_text(&json, "json").unwrap(), config);
        let toml = toml::to_string(&config).unwrap();
        assert_eq!(ModelConfig::from_text(&toml, "toml").unwrap(), config);

        // A config written before scalings existed.
        let mut value = serde_json::to_value(&config).unwrap();
        value["positions"] = serde_json::json!({"kind": "rope", "theta": 10000.0, "fraction": 1.0});
        let old = ModelConfig::from_text(&value.to_string(), "old").unwrap();
        assert_eq!(old.positions, Positions::Rope { theta: 10_000.0, fraction: 1.0, scaling: None });
    }

    #[test]
    fn problems_name_the_field_path() {
        let llama3 = RopeScaling::Llama3 {
            factor: 0.0,
            low_freq_factor: 4.0,
            high_freq_factor: 1.0,
            original_context_length: 0,
        };
        let problems = llama3.problems("positions.scaling");
        assert_eq!(
            problems,
            [
                "positions.scaling.factor = 0, expected a positive number",
                "positions.scaling.high_freq_factor = 1 must exceed positions.scaling.low_freq_factor = 4",
                "positions.scaling.original_context_length = 0, expected a positive number",
            ]
        );
        let yarn = RopeScaling::Yarn {
            factor: 2.0,
            original_context_length: 1 << 25,
            beta_fast: f64::NAN,
            beta_slow: 1.0,
            attention_factor: Some(-1.0),
            mscale: Some(f64::INFINITY),
            mscale_all_dim: None,
            truncate: true,
        };
        let problems = yarn.problems("positions.scaling");
        assert_eq!(problems.len(), 4, "{problems:?}");
        for field in ["beta_fast", "attention_factor", "mscale", "original_context_length"] {
            assert!(problems.iter().any(|p| p.starts_with(&format!("positions.scaling.{field} = "))), "{problems:?}");
        }
        assert!(RopeScaling::Linear { factor: 2.0 }.problems("positions.scaling").is_empty());
    }
}
