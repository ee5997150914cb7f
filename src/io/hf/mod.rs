//! Hugging Face checkpoints: `config.json` + `model.safetensors` (or shards with an index).
//!
//! Each family (`gpt2`, `llama`/`mistral`/`mixtral`, `phi`, `mpt`, `marian`) supplies two conversions
//! of `config.json` and one tensor table; the same table drives import and export, so the two
//! directions cannot drift apart. `model_type` selects the file format's family, exactly as
//! `transformers` does; the model itself never sees it.

mod families;
mod json;
mod marian;
mod rope;
mod safetensors_io;
mod shapes;

pub use families::{family_for_config, family_for_model_type, Family, HfTensor};
pub use json::HfJson;
pub use safetensors_io::{read_safetensors_dir, write_safetensors, SafetensorsDir};

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::{LoadedModel, TextTokenizer, WeightDtype, WeightSink};
use crate::config::ModelConfig;
use crate::error::{bullet_list, Error, Result};

/// The family of a directory's `config.json`, the config, and the file it was read from.
fn read_family_config(dir: &Path) -> Result<(&'static Family, ModelConfig, HfJson)> {
    let config_path = dir.join("config.json");
    let json = HfJson::read(&config_path)?;
    let model_type = json.str("model_type")?;
    let family = family_for_model_type(&model_type).ok_or_else(|| {
        Error::checkpoint(
            &config_path,
            format!(
                "model_type `{model_type}` is not supported; supported: {}",
                families::ALL.iter().map(|f| f.model_types.join("/")).collect::<Vec<_>>().join(", ")
            ),
        )
    })?;
    let config = (family.read_config)(&json)?;
    config.validate()?;
    Ok((family, config, json))
}

/// The [`ModelConfig`] of a Hugging Face directory, from `config.json` alone.
pub fn read_hf_config(dir: &Path) -> Result<ModelConfig> {
    Ok(read_family_config(dir)?.1)
}

/// Load a Hugging Face model directory, each matrix held as `dtype` says from the moment it is
/// read.
pub fn load_hf_dir(dir: &Path, device: &Device, dtype: WeightDtype) -> Result<LoadedModel> {
    let (family, config, json) = read_family_config(dir)?;
    let mut file = SafetensorsDir::open(dir)?;
    // Every layer has tensors: a layer count beyond the tensor count is a damaged config, and
    // listing its parameters could take unbounded time and memory.
    if config.layers > file.len() {
        return Err(Error::checkpoint(
            dir.join("config.json"),
            format!("{} layers, but the weights hold only {} tensors", config.layers, file.len()),
        ));
    }
    let mut sink = WeightSink::new(&config, dtype, device, dir)?;
    import_tensors(family, &config, &json, &mut file, dir, device, &mut sink)?;
    let (weights, quantized) = sink.finish();
    let tokenizer = TextTokenizer::from_dir(dir)?;
    Ok(LoadedModel { config, weights, quantized, tokenizer, source: dir.to_path_buf() })
}

/// Map a checkpoint's tensors to canonical names with the family's table, after checking that
/// the tensors agree with the fields of `json` they state and that every tensor is there with
/// its shape (from the headers, before any data is read); then read them one at a time into
/// `sink`.
fn import_tensors(
    family: &Family,
    config: &ModelConfig,
    json: &HfJson,
    file: &mut SafetensorsDir,
    origin: &Path,
    device: &Device,
    sink: &mut WeightSink,
) -> Result<()> {
    let specs: HashMap<String, Vec<usize>> = config.param_specs().into_iter().map(|s| (s.name, s.shape)).collect();
    let table = (family.tensors)(config);
    let contradicted = shapes::contradictions(&table, file, &specs, family.optional_prefix, json);
    if !contradicted.is_empty() {
        let reason = format!(
            "these fields contradict the weights:{}\nHINT: set these fields to what the weights hold (is this config.json from another model?)",
            bullet_list(&contradicted, 12)
        );
        return Err(Error::checkpoint(&json.path, reason));
    }
    let mut problems = Vec::new();
    let mut found = Vec::with_capacity(table.len());
    for entry in &table {
        match stored_name(file, &entry.hf, family.optional_prefix) {
            None => problems.push(format!("missing tensor `{}`", entry.hf)),
            Some(name) => match entry.check_shape(file.dims(&name).expect("just found"), &specs) {
                Ok(()) => found.push((entry, name)),
                Err(reason) => problems.push(reason),
            },
        }
    }
    let taken: std::collections::HashSet<&str> = found.iter().map(|(_, name)| name.as_str()).collect();
    let extra = file.names().into_iter().filter(|name| !taken.contains(name.as_str()) && !(family.ignorable)(name));
    problems.extend(extra.map(|name| format!("unexpected tensor `{name}` (not part of this architecture)")));
    if !problems.is_empty() {
        let reason = format!("tensors do not match config.json:{}", bullet_list(&problems, 12));
        return Err(Error::checkpoint(origin, reason));
    }
    for (entry, name) in found {
        let tensor = file.take(&name, device)?.ok_or_else(|| {
            Error::checkpoint(origin, format!("tensor `{name}` stands for two tensors of the table (`{}`)", entry.hf))
        })?;
        for (canonical, part) in entry.to_canonical(&tensor, &specs).map_err(|r| Error::checkpoint(origin, r))? {
            sink.put(canonical, part)?;
        }
    }
    Ok(())
}

/// The name `name` is stored under: itself, or without the family's optional prefix (GPT-2
/// checkpoints exist with and without `transformer.`).
fn stored_name(file: &SafetensorsDir, name: &str, optional_prefix: Option<&str>) -> Option<String> {
    let bare = optional_prefix.and_then(|p| name.strip_prefix(p));
    [Some(name), bare].into_iter().flatten().find(|n| file.dims(n).is_some()).map(str::to_string)
}

/// Write `weights` (canonical names) as a Hugging Face directory that `transformers` loads:
/// `config.json`, `model.safetensors` and, when given, `tokenizer.json`. Returns the
/// `model_type` written.
pub fn export_hf_dir(
    config: &ModelConfig,
    weights: &HashMap<String, Tensor>,
    tokenizer: Option<&TextTokenizer>,
    dir: &Path,
) -> Result<String> {
    let family = family_for_config(config).ok_or_else(|| {
        Error::Unsupported(format!(
            "no Hugging Face family can represent this architecture ({}); the exportable families are {}",
            config.name,
            families::ALL.iter().map(|f| f.model_types[0]).collect::<Vec<_>>().join(", ")
        ))
    })?;
    let hf_config = (family.write_config)(config).expect("family_for_config checked it");
    let mut out = HashMap::new();
    for entry in (family.tensors)(config) {
        out.insert(entry.hf.clone(), entry.from_canonical(weights)?);
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let config_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&hf_config).expect("json value serialises");
    std::fs::write(&config_path, text).map_err(|e| Error::io(&config_path, e))?;
    write_safetensors(&out, &dir.join("model.safetensors"))?;
    if let Some(tokenizer) = tokenizer {
        tokenizer.save(&dir.join("tokenizer.json"))?;
    }
    Ok(hf_config["model_type"].as_str().unwrap_or_default().to_string())
}
