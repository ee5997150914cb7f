//! Reading and writing safetensors files, with errors that name the file and the tensor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

/// All tensors of a model directory as f32: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`.
pub fn read_safetensors_dir(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let index_path = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index_path.exists() {
        shard_files(&index_path)?.into_iter().map(|f| dir.join(f)).collect()
    } else if dir.join("model.safetensors").exists() {
        vec![dir.join("model.safetensors")]
    } else {
        return Err(Error::checkpoint(
            dir,
            "no weights found: expected model.safetensors or model.safetensors.index.json with its shards",
        ));
    };
    let mut tensors = HashMap::new();
    for file in files {
        tensors.extend(read_safetensors(&file, device)?);
    }
    Ok(tensors)
}

/// The distinct shard files named by an index's `weight_map`, in first-seen order.
fn shard_files(index_path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
    let index: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::checkpoint(index_path, format!("not valid JSON: {e}")))?;
    let map = index.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| {
        Error::checkpoint(index_path, "field `weight_map`: expected an object of tensor name → shard file")
    })?;
    let mut files: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| Error::checkpoint(index_path, format!("weight_map[`{tensor}`]: expected a file name")))?;
        if !files.iter().any(|f| f == file) {
            files.push(file.to_string());
        }
    }
    Ok(files)
}

/// Every tensor of one safetensors file, converted to f32.
pub fn read_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the mapping is read-only and dropped before this function returns; a file changed
    // underneath us would give wrong values, not unsafety in safe code that holds no references.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let st = SafeTensors::deserialize(&mmap)
        .map_err(|e| Error::checkpoint(path, format!("not a valid safetensors file (truncated or corrupted?): {e}")))?;
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            other => {
                return Err(Error::checkpoint(
                    path,
                    format!("tensor `{name}` has dtype {other:?}, expected F32, F16 or BF16"),
                ))
            }
        };
        let tensor = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), device)?.to_dtype(DType::F32)?;
        tensors.insert(name, tensor);
    }
    Ok(tensors)
}

/// Write tensors to `path` atomically: a temporary file in the same directory, then a rename,
/// so a crash never leaves a half-written file under the final name.
pub fn write_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = path.with_extension("safetensors.tmp");
    candle_core::safetensors::save(tensors, &tmp).map_err(|e| Error::checkpoint(&tmp, format!("cannot write: {e}")))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
