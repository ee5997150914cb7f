//! GGUF metadata values as numbers and words (shared with the tokenizer reader).

use candle_core::quantized::gguf_file::Value;

/// A metadata integer as usize (any integer width; negative values are rejected).
pub(crate) fn value_as_usize(value: &Value) -> Option<usize> {
    let v: i128 = match *value {
        Value::U8(v) => v.into(),
        Value::I8(v) => v.into(),
        Value::U16(v) => v.into(),
        Value::I16(v) => v.into(),
        Value::U32(v) => v.into(),
        Value::I32(v) => v.into(),
        Value::U64(v) => v.into(),
        Value::I64(v) => v.into(),
        _ => return None,
    };
    usize::try_from(v).ok()
}

/// A metadata number as f64. GGUF stores hyper-parameters such as `1e-5` as f32; we take the
/// f32's shortest decimal form so the config says `1e-5`, not `9.999999747378752e-6`.
pub(crate) fn value_as_f64(value: &Value) -> Option<f64> {
    match *value {
        Value::F32(v) => format!("{v}").parse().ok(),
        Value::F64(v) => Some(v),
        _ => value_as_usize(value).map(|v| v as f64),
    }
}

/// The type of a metadata value, for messages (never its contents: arrays can hold 100k items).
pub(crate) fn value_kind(value: &Value) -> &'static str {
    match value {
        Value::U8(_) => "u8",
        Value::I8(_) => "i8",
        Value::U16(_) => "u16",
        Value::I16(_) => "i16",
        Value::U32(_) => "u32",
        Value::I32(_) => "i32",
        Value::U64(_) => "u64",
        Value::I64(_) => "i64",
        Value::F32(_) => "f32",
        Value::F64(_) => "f64",
        Value::Bool(_) => "bool",
        Value::String(_) => "string",
        Value::Array(_) => "array",
    }
}

/// A short description of a scalar value, e.g. `i32 -3`, or just the kind for strings/arrays.
pub(crate) fn describe(value: &Value) -> String {
    match value {
        Value::String(_) | Value::Array(_) => format!("a {}", value_kind(value)),
        Value::Bool(b) => format!("bool {b}"),
        Value::F32(v) => format!("f32 {v}"),
        Value::F64(v) => format!("f64 {v}"),
        other => {
            format!("{} {}", value_kind(other), value_as_usize(other).map_or("<negative>".into(), |v| v.to_string()))
        }
    }
}
