//! A `config.json` against the tensors that state its fields.
//!
//! Most fields of a config are also written in the shapes of the weights: `vocab_size` is the
//! embedding's rows, `intermediate_size` the gate projection's, `num_key_value_heads` × head_dim
//! the key projection's. When the two disagree, every tensor built from the field is off, and a
//! list of mis-shaped tensors would bury the cause; so the family tables mark which tensor dims
//! state which field ([`Witness`]), and a contradiction is reported once per field, naming the
//! field, its value, the first tensor that disagrees and its size.

use std::collections::HashMap;

use super::{HfJson, HfTensor, SafetensorsDir};

/// One dim of a checkpoint tensor that states a `config.json` field: the dim must be `value`
/// times a whole number (1 for `intermediate_size`, head_dim for `num_key_value_heads`).
pub struct Witness {
    /// 0 for rows, 1 for columns, of the tensor as the file stores it.
    pub axis: usize,
    pub field: &'static str,
    /// The field's value in the config being loaded (its default when the file leaves it out).
    pub value: usize,
}

/// One line per `config.json` field that the tensors of `file` contradict, in table order.
pub fn contradictions(
    table: &[HfTensor],
    file: &SafetensorsDir,
    specs: &HashMap<String, Vec<usize>>,
    optional_prefix: Option<&str>,
    json: &HfJson,
) -> Vec<String> {
    // (field, its line, how many more tensors disagree with it)
    let mut found: Vec<(&str, String, usize)> = Vec::new();
    for entry in table {
        let Some(actual) = super::stored_name(file, &entry.hf, optional_prefix).and_then(|name| file.dims(&name))
        else {
            continue; // reported as missing later
        };
        let expected = entry.expected_shape(specs);
        if expected.len() != actual.len() {
            continue; // not a matter of one field; reported as a shape mismatch later
        }
        for witness in &entry.witnesses {
            let (want, have) = (expected[witness.axis], actual[witness.axis]);
            if want == have {
                continue;
            }
            match found.iter_mut().find(|(field, ..)| *field == witness.field) {
                Some((_, _, more)) => *more += 1,
                None => found.push((witness.field, witness.describe(json, &entry.hf, want, actual), 0)),
            }
        }
    }
    found
        .into_iter()
        .map(|(_, line, more)| match more {
            0 => line,
            more => format!("{line} (and {more} more tensor{})", if more == 1 { "" } else { "s" }),
        })
        .collect()
}

impl Witness {
    /// "`intermediate_size` = 96 implies 96 rows in `…gate_proj.weight`, which has 128 (shape
    /// [128, 32])".
    fn describe(&self, json: &HfJson, tensor: &str, want: usize, actual: &[usize]) -> String {
        let (field, value) = (self.field, self.value);
        let stated = if json.is_set(field) {
            format!("`{field}` = {value}")
        } else {
            format!("`{field}` (not set, so {value})")
        };
        let dim = if self.axis == 0 { "rows" } else { "columns" };
        let implied = match want.checked_div(value) {
            Some(unit) if unit > 1 && unit * value == want => format!("{want} {dim} ({value} × {unit})"),
            _ => format!("{want} {dim}"),
        };
        let have = actual[self.axis];
        format!("{stated} implies {implied} in `{tensor}`, which has {have} (shape {actual:?})")
    }
}
