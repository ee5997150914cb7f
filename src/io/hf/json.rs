//! Typed access to a `config.json`, with errors that name the file and the field.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

pub struct HfJson {
    pub path: PathBuf,
    pub value: Value,
    /// Where `value` sits in the file (`"attn_config."`, empty at the top), for error messages.
    prefix: String,
}

impl HfJson {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value = serde_json::from_str(&text).map_err(|e| Error::checkpoint(path, format!("not valid JSON: {e}")))?;
        Ok(Self::from_value(path, value))
    }

    /// `value` as the contents of the file at `path` (which names it in errors).
    pub fn from_value(path: impl Into<PathBuf>, value: Value) -> Self {
        HfJson { path: path.into(), value, prefix: String::new() }
    }

    fn field(&self, key: &str) -> Option<&Value> {
        self.value.get(key).filter(|v| !v.is_null())
    }

    /// Whether `key` has a value (`null` counts as unset).
    pub fn is_set(&self, key: &str) -> bool {
        self.field(key).is_some()
    }

    /// Whether `key` appears at all, even as `null` (which some families read differently from
    /// an absent key: Mistral's absent `sliding_window` is 4096, its `null` is none).
    pub fn contains(&self, key: &str) -> bool {
        self.value.get(key).is_some()
    }

    /// `key` as the file spells it, e.g. `rope_parameters.factor`.
    fn name(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// An error about field `key`.
    pub fn error(&self, key: &str, reason: impl std::fmt::Display) -> Error {
        Error::checkpoint(&self.path, format!("field `{}`: {reason}", self.name(key)))
    }

    fn bad(&self, key: &str, expected: &str) -> Error {
        let found = match self.value.get(key) {
            None | Some(Value::Null) => "nothing".to_string(),
            Some(v) => v.to_string(),
        };
        self.error(key, format!("expected {expected}, found {found}"))
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        self.field(key)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| self.bad(key, "a non-negative integer"))
    }

    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        if self.field(key).is_none() {
            Ok(default)
        } else {
            self.usize(key)
        }
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        if self.field(key).is_none() {
            Ok(None)
        } else {
            self.usize(key).map(Some)
        }
    }

    pub fn f64(&self, key: &str) -> Result<f64> {
        self.field(key).and_then(Value::as_f64).ok_or_else(|| self.bad(key, "a number"))
    }

    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        Ok(self.opt_f64(key)?.unwrap_or(default))
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.field(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.bad(key, "a number")),
        }
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.field(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.bad(key, "true or false")),
        }
    }

    pub fn str(&self, key: &str) -> Result<String> {
        self.field(key).and_then(Value::as_str).map(str::to_string).ok_or_else(|| self.bad(key, "a string"))
    }

    pub fn str_or(&self, key: &str, default: &str) -> Result<String> {
        if self.field(key).is_none() {
            Ok(default.to_string())
        } else {
            self.str(key)
        }
    }

    /// A nested object (e.g. MPT's `attn_config`) as its own `HfJson`, empty when absent.
    pub fn object(&self, key: &str) -> HfJson {
        HfJson {
            path: self.path.clone(),
            value: self.field(key).cloned().unwrap_or(Value::Object(Default::default())),
            prefix: format!("{}.", self.name(key)),
        }
    }

    /// Whether `key` holds an object with at least one entry (transformers treats `{}` and
    /// `null` alike: as unset).
    pub fn has_entries(&self, key: &str) -> bool {
        self.field(key).and_then(Value::as_object).is_some_and(|map| !map.is_empty())
    }

    /// Fail when a field this loader cannot honour is set (e.g. `qk_layernorm`).
    pub fn reject_if_set(&self, key: &str, why: &str) -> Result<()> {
        match self.field(key) {
            Some(v) if v != &Value::Bool(false) => Err(self.error(key, format!("{v} is not supported: {why}"))),
            _ => Ok(()),
        }
    }
}
