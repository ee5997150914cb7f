//! Hands a model's tensors to the layers that use them, by canonical name.

use std::collections::HashMap;
use std::path::Path;
use std::sync::LazyLock;

use candle_core::Tensor;

use super::weight::{QuantizedWeights, Weight};

use crate::config::ModelConfig;
use crate::error::{bullet_list, Error, Result};

/// Named tensors with a name prefix, like `VarBuilder::pp`, so a layer asks for `"q.weight"` and
/// gets `layers.3.attn.q.weight`. Built only from a map already checked against the config.
#[derive(Clone)]
pub struct ParamSource<'a> {
    tensors: &'a HashMap<String, Tensor>,
    /// Weights kept in quantized blocks (names not in `tensors`).
    quantized: &'a QuantizedWeights,
    prefix: String,
}

static NO_QUANTIZED: LazyLock<QuantizedWeights> = LazyLock::new(QuantizedWeights::new);

impl<'a> ParamSource<'a> {
    /// Check `tensors` against `config.param_specs()` (every name present, no extras, shapes
    /// equal) and wrap them. `origin` names the file in errors.
    pub fn checked(config: &ModelConfig, tensors: &'a HashMap<String, Tensor>, origin: &Path) -> Result<Self> {
        Self::checked_with_quantized(config, tensors, &NO_QUANTIZED, origin)
    }

    /// [`checked`](Self::checked) for weights of which some are `quantized`: the two maps
    /// together must hold exactly the config's parameters.
    pub fn checked_with_quantized(
        config: &ModelConfig,
        tensors: &'a HashMap<String, Tensor>,
        quantized: &'a QuantizedWeights,
        origin: &Path,
    ) -> Result<Self> {
        let shapes = tensors
            .iter()
            .map(|(name, t)| (name.as_str(), t.dims().to_vec()))
            .chain(quantized.iter().map(|(name, q)| (name.as_str(), vec![q.dims().0, q.dims().1])));
        check_shapes(config, shapes.collect(), origin)?;
        Ok(ParamSource { tensors, quantized, prefix: String::new() })
    }

    /// The same source, one level down: `pp("attn")` turns `q.weight` into `attn.q.weight`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        ParamSource { tensors: self.tensors, quantized: self.quantized, prefix: format!("{}{name}.", self.prefix) }
    }

    pub fn get(&self, name: &str) -> Tensor {
        let full = format!("{}{name}", self.prefix);
        // Presence was checked against param_specs in `checked`; a miss here is a bug in the
        // layer code asking for a name the spec list does not have.
        self.tensors
            .get(&full)
            .unwrap_or_else(|| panic!("layer asked for `{full}`, which param_specs does not list"))
            .clone()
    }

    /// A weight matrix, quantized when the loader kept it so.
    pub fn weight(&self, name: &str) -> Weight {
        match self.quantized.get(&format!("{}{name}", self.prefix)) {
            Some(q) => Weight::Quantized(q.clone()),
            None => Weight::Dense(self.get(name)),
        }
    }

    pub fn get_opt(&self, name: &str) -> Option<Tensor> {
        self.tensors.get(&format!("{}{name}", self.prefix)).cloned()
    }
}

/// Every problem between a weight map and the config's parameter list, reported at once.
pub fn check_weights(config: &ModelConfig, tensors: &HashMap<String, Tensor>, origin: &Path) -> Result<()> {
    check_shapes(config, tensors.iter().map(|(name, t)| (name.as_str(), t.dims().to_vec())).collect(), origin)
}

/// [`check_weights`] on the names and shapes alone.
pub(crate) fn check_shapes(config: &ModelConfig, tensors: HashMap<&str, Vec<usize>>, origin: &Path) -> Result<()> {
    let specs = config.param_specs();
    let mut problems = Vec::new();
    for spec in &specs {
        match tensors.get(spec.name.as_str()) {
            None => problems.push(format!("missing tensor `{}` (expected shape {:?})", spec.name, spec.shape)),
            Some(dims) if dims != &spec.shape => {
                problems.push(format!("tensor `{}` has shape {dims:?}, expected {:?}", spec.name, spec.shape))
            }
            Some(_) => {}
        }
    }
    let expected: std::collections::HashSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    let mut extra: Vec<&&str> = tensors.keys().filter(|k| !expected.contains(*k)).collect();
    extra.sort();
    for name in extra {
        problems.push(format!("unexpected tensor `{name}` (not part of this architecture)"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::checkpoint(origin, format!("weights do not match the model config:{}", bullet_list(&problems, 12))))
    }
}
