//! `--set path.to.field=value` overrides on any config.
//!
//! The config is edited as JSON and parsed back, so every override goes through the same
//! deserialisation and validation as a config file: typos are unknown-field errors, impossible
//! shapes are validation errors, and no override can produce a config that a file could not.

use serde_json::{Map, Value};

use super::ModelConfig;
use crate::error::{Error, Result};

/// Split `path=value`; the value is JSON when it parses as JSON (numbers, `true`, `null`,
/// `[1,2]`, `{"kind":"rms_norm"}`), otherwise a plain string (`positions=alibi`).
pub fn parse_override(text: &str) -> Result<(String, Value)> {
    let (path, raw) = text.split_once('=').ok_or_else(|| Error::Override {
        setting: text.to_string(),
        reason: "expected PATH=VALUE, e.g. attention.window=4096".into(),
    })?;
    let value = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string()));
    Ok((path.trim().to_string(), value))
}

/// Apply `path=value` settings in order and validate the result.
///
/// Setting an enum field (one whose JSON has a `kind`) to a bare name switches the variant,
/// keeping the fields the new variant shares with the old one: `ffn=gated` keeps `hidden` and
/// `act`; `positions=alibi` drops RoPE's `theta` and takes ALiBi's defaults. An unset optional
/// field set to a bare name becomes that variant with its defaults
/// (`positions.scaling=llama3`).
pub fn apply_overrides(config: &ModelConfig, settings: &[String]) -> Result<ModelConfig> {
    let mut value = serde_json::to_value(config).expect("a config always serialises");
    for setting in settings {
        let (path, new) = parse_override(setting)?;
        let fail = |reason: String| Error::Override { setting: setting.clone(), reason };
        let keys: Vec<&str> = path.split('.').collect();
        open_default_tables(&mut value, &keys);
        let slot = locate(&mut value, &keys).map_err(fail)?;
        match (&*slot, new) {
            (Value::Object(old), Value::String(kind)) if old.contains_key("kind") => {
                let candidates = switch_candidates(old, &kind);
                for (i, candidate) in candidates.iter().enumerate() {
                    *locate(&mut value, &keys).map_err(fail)? = candidate.clone();
                    if i + 1 == candidates.len() || serde_json::from_value::<ModelConfig>(value.clone()).is_ok() {
                        break;
                    }
                }
                if let Err(e) = serde_json::from_value::<ModelConfig>(value.clone()) {
                    return Err(fail(format!("{e}{}", whole_value_hint(&path, &kind))));
                }
            }
            (Value::Null, Value::String(name)) => {
                // An unset optional field: the bare name is a plain value
                // (`attention.implementation=naive`) or the variant of an enum field
                // (`positions.scaling=llama3`). Keep the plain value unless only the variant
                // parses, or the variant comes closer: its error names a missing field rather
                // than saying the field takes no map ("invalid type: map", or "unknown variant
                // `kind`" from a plain-name enum such as `ffn.router.gating`).
                *slot = Value::String(name.clone());
                if serde_json::from_value::<ModelConfig>(value.clone()).is_err() {
                    let slot = locate(&mut value, &keys).map_err(fail)?;
                    *slot = switch_variant(&Map::new(), &name);
                    if let Err(e) = serde_json::from_value::<ModelConfig>(value.clone()) {
                        let e = e.to_string();
                        if e.starts_with("invalid type: map") || e.starts_with("unknown variant `kind`") {
                            *locate(&mut value, &keys).map_err(fail)? = Value::String(name);
                        }
                    }
                }
            }
            (_, new) => *slot = new,
        }
        serde_json::from_value::<ModelConfig>(value.clone()).map_err(|e| fail(e.to_string()))?;
    }
    let mut result: ModelConfig = serde_json::from_value(value).expect("checked after each setting");
    if !settings.is_empty() && !result.name.is_empty() && !result.name.ends_with('*') {
        result.name.push('*'); // mark a modified preset in reports
    }
    result.validate()?;
    Ok(result)
}

fn switch_variant(old: &Map<String, Value>, kind: &str) -> Value {
    let mut new = old.clone();
    new.insert("kind".into(), Value::String(kind.to_string()));
    Value::Object(new)
}

/// What a bare variant name may become, in the order tried: the old fields under the new kind;
/// the fields of a variant nested in the old one (a mixture's `expert`, so `ffn=gated` on a
/// mixture of gated experts takes the expert's `hidden` and `act`); the kind alone (defaults).
fn switch_candidates(old: &Map<String, Value>, kind: &str) -> Vec<Value> {
    let mut candidates = vec![switch_variant(old, kind)];
    for nested in old.values() {
        if let Value::Object(inner) = nested {
            if inner.contains_key("kind") {
                candidates.push(switch_variant(inner, kind));
            }
        }
    }
    candidates.push(switch_variant(&Map::new(), kind));
    candidates
}

/// When a variant switch cannot be completed: the whole value as the preset with the shortest
/// one writes it, so the user sees every field the variant needs.
fn whole_value_hint(path: &str, kind: &str) -> String {
    let keys: Vec<&str> = path.split('.').collect();
    let examples = super::presets::all().iter().filter_map(|preset| {
        let mut config = serde_json::to_value(preset.config()).ok()?;
        let found = locate(&mut config, &keys).ok()?.clone();
        (found.get("kind")? == kind).then_some((preset.name, found))
    });
    let example = examples.min_by_key(|(_, value)| value.to_string().len());
    match example {
        Some((preset, value)) => {
            format!("\nHINT: give the whole value, e.g. --set '{path}={}' (as in {preset})", kind_first(&value))
        }
        None => format!("\nHINT: give the whole value as JSON: --set '{path}={{\"kind\":\"{kind}\",...}}'"),
    }
}

/// Write out the tables on the way to `keys` that the config leaves out because they hold only
/// defaults (`ffn.router`), so `ffn.router.jitter=0.01` has a slot to land in. A missing key
/// that is not such a table (a typo) stays missing, for [`locate`] to report.
///
/// A key is such a table when the config parses with `{}` there and fails with a number there:
/// the second test catches keys serde ignores rather than rejects (extra fields next to the
/// `kind` of a variant without fields, e.g. `norm.x`).
fn open_default_tables(config: &mut Value, keys: &[&str]) {
    let parses_with = |config: &Value, depth: usize, value: Value| {
        let mut trial = config.clone();
        match locate(&mut trial, &keys[..depth - 1]) {
            Ok(Value::Object(parent)) => {
                parent.insert(keys[depth - 1].to_string(), value);
                serde_json::from_value::<ModelConfig>(trial.clone()).is_ok().then_some(trial)
            }
            _ => None,
        }
    };
    for depth in 1..keys.len() {
        let mut probe = config.clone();
        if locate(&mut probe, &keys[..depth]).is_ok_and(|v| !v.is_null()) {
            continue;
        }
        match parses_with(config, depth, Value::Object(Map::new())) {
            Some(opened) if parses_with(config, depth, Value::from(0)).is_none() => *config = opened,
            _ => return,
        }
    }
}

/// JSON with each object's `kind` written first, as a person would write a variant.
fn kind_first(value: &Value) -> String {
    match value {
        Value::Object(map) => {
            let kind = map.get("kind").into_iter().map(|k| format!("\"kind\":{k}"));
            let rest = map
                .iter()
                .filter(|(key, _)| *key != "kind")
                .map(|(k, v)| format!("{}:{}", Value::from(k.as_str()), kind_first(v)));
            format!("{{{}}}", kind.chain(rest).collect::<Vec<_>>().join(","))
        }
        other => other.to_string(),
    }
}

/// The slot at `keys`, creating a missing last key (so optional fields can be set).
fn locate<'v>(mut value: &'v mut Value, keys: &[&str]) -> std::result::Result<&'v mut Value, String> {
    for (depth, key) in keys.iter().enumerate() {
        let here = keys[..depth].join(".");
        let last = depth + 1 == keys.len();
        value = match value {
            Value::Object(map) => {
                if last {
                    map.entry(key.to_string()).or_insert(Value::Null)
                } else {
                    let parent = if here.is_empty() { "config" } else { &here };
                    map.get_mut(*key)
                        .filter(|v| !v.is_null())
                        .ok_or_else(|| format!("`{parent}` has no field `{key}`"))?
                }
            }
            Value::Array(items) => {
                let index: usize = key.parse().map_err(|_| format!("`{here}` is a list; `{key}` is not an index"))?;
                let len = items.len();
                items
                    .get_mut(index)
                    .ok_or_else(|| format!("`{here}` has {len} entries; index {index} is out of range"))?
            }
            _ => return Err(format!("`{here}` is a value, not a table; it has no field `{key}`")),
        };
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{presets, Ffn, Positions, RopeScaling};

    fn set(preset: &str, settings: &[&str]) -> Result<ModelConfig> {
        let settings: Vec<String> = settings.iter().map(|s| s.to_string()).collect();
        apply_overrides(&presets::get(preset).unwrap(), &settings)
    }

    #[test]
    fn numbers_options_and_variant_switches() {
        let c = set("llama2-7b", &["layers=12", "attention.window=4096", "positions=alibi", "ffn=mlp"]).unwrap();
        assert_eq!(c.layers, 12);
        assert_eq!(c.attention.window, Some(4096));
        assert_eq!(c.positions, Positions::Alibi { max_bias: 8.0 });
        assert!(matches!(c.ffn, Ffn::Mlp { hidden: 11008, .. }));
        assert_eq!(c.name, "llama2-7b*");
    }

    #[test]
    fn rope_scaling_is_set_by_name_json_or_field() {
        let rope = |c: &ModelConfig| match c.positions {
            Positions::Rope { scaling, .. } => scaling,
            _ => panic!("not rope"),
        };
        let llama31 = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_context_length: 8192,
        };
        assert_eq!(rope(&set("llama2-7b", &["positions.scaling=llama3"]).unwrap()), Some(llama31));
        let c = set("llama2-7b", &["positions.scaling=llama3", "positions.scaling.factor=32"]).unwrap();
        assert_eq!(rope(&c).map(|s| s.factor()), Some(32.0));
        let c = set("llama2-7b", &[r#"positions.scaling={"kind":"linear","factor":2}"#]).unwrap();
        assert_eq!(rope(&c), Some(RopeScaling::Linear { factor: 2.0 }));
        let c = set("llama2-7b", &["positions.scaling=llama3", "positions.scaling=null"]).unwrap();
        assert_eq!(rope(&c), None);

        // Plain values in unset optional fields are still plain values.
        let c = set("llama2-7b", &["attention.implementation=naive", "attention.window=64"]).unwrap();
        assert_eq!((c.attention.implementation, c.attention.window), (crate::config::AttentionImpl::Naive, Some(64)));
        let err = set("llama2-7b", &["attention.window=wide"]).unwrap_err().to_string();
        assert!(err.contains("invalid type: string \"wide\", expected usize"), "{err}");

        let err = set("llama2-7b", &["positions.scaling=linear"]).unwrap_err().to_string();
        assert!(err.contains("missing field `factor`"), "{err}");
        let err = set("llama2-7b", &["positions.scaling=ntk"]).unwrap_err().to_string();
        assert!(err.contains("unknown variant `ntk`") && err.contains("`yarn`"), "{err}");
        let err = set("llama2-7b", &["positions.scaling=llama3", "positions.scaling.high_freq_factor=0.5"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("positions.scaling.high_freq_factor = 0.5 must exceed"), "{err}");
        let err = set("llama2-7b", &[r#"positions.scaling={"kind":"yarn","factor":-4,"original_context_length":0}"#])
            .unwrap_err()
            .to_string();
        assert!(err.contains("positions.scaling.factor = -4, expected a positive number"), "{err}");
        assert!(err.contains("positions.scaling.original_context_length = 0"), "{err}");
    }

    #[test]
    fn dense_from_a_mixture_takes_the_expert_and_a_mixture_needs_its_whole_value() {
        let c = set("tiny-mixtral", &["ffn=gated"]).unwrap();
        assert_eq!(c.ffn, Ffn::Gated { hidden: 256, act: crate::config::Activation::Silu });
        let c = set("tiny-mixtral", &["ffn=mlp"]).unwrap();
        assert_eq!(c.ffn, Ffn::Mlp { hidden: 256, act: crate::config::Activation::Silu });
        let err = set("tiny-llama", &["ffn=moe"]).unwrap_err().to_string();
        assert!(err.contains("missing field `experts`") && err.contains("HINT: give the whole value"), "{err}");
        // The value the hint shows works.
        let hint = err.split("--set '").nth(1).unwrap().split("' (as in").next().unwrap().to_string();
        assert!(set("tiny-llama", &[&hint]).is_ok(), "{hint}");
        let c = set("tiny-mixtral", &["ffn.router.capacity_factor=1.25", "ffn.router.gating=softmax"]).unwrap();
        let Ffn::Moe { router, .. } = c.ffn else { panic!() };
        assert_eq!((router.capacity_factor, router.gating), (Some(1.25), crate::config::Gating::Softmax));
    }

    #[test]
    fn errors_name_the_setting_and_the_problem() {
        let err = set("gpt2", &["attention.windw=3"]).unwrap_err().to_string();
        assert!(err.contains("attention.windw") && err.contains("unknown field"), "{err}");
        let err = set("gpt2", &["attention.kv_heads=5"]).unwrap_err().to_string();
        assert!(err.contains("attention.kv_heads = 5 does not divide attention.heads = 12"), "{err}");
        let err = set("gpt2", &["layers"]).unwrap_err().to_string();
        assert!(err.contains("PATH=VALUE"), "{err}");
        let err = set("gpt2", &["norm.x.y=1"]).unwrap_err().to_string();
        assert!(err.contains("norm.x"), "{err}");
    }
}
