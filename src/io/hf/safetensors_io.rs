//! Reading and writing safetensors files, with errors that name the file and the tensor.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

/// An index's `weight_map`: each tensor's shard file, by name.
fn read_weight_map(index_path: &Path) -> Result<HashMap<String, String>> {
    let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
    let index: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::checkpoint(index_path, format!("not valid JSON: {e}")))?;
    let map = index.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| {
        Error::checkpoint(index_path, "field `weight_map`: expected an object of tensor name → shard file")
    })?;
    map.iter()
        .map(|(tensor, file)| match file.as_str() {
            Some(file) => Ok((tensor.clone(), file.to_string())),
            None => Err(Error::checkpoint(index_path, format!("weight_map[`{tensor}`]: expected a file name"))),
        })
        .collect()
}

/// The distinct shard files of a weight map, sorted (the order the shards are read in).
fn shard_files(weight_map: &HashMap<String, String>) -> Vec<String> {
    let mut files: Vec<String> = weight_map.values().cloned().collect();
    files.sort();
    files.dedup();
    files
}

/// All tensors of a model directory as f32: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`.
pub fn read_safetensors_dir(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut files = SafetensorsDir::open(dir)?;
    let mut tensors = HashMap::with_capacity(files.len());
    for name in files.names() {
        let tensor = files.take(&name, device)?.expect("a name the index just listed");
        tensors.insert(name, tensor);
    }
    Ok(tensors)
}

/// The tensors of a model directory's safetensors files, known by name and shape from the
/// files' headers, and read from the file one at a time as they are taken. A loader that
/// converts each tensor as it takes it (`--dtype bf16`) so never holds the model in `f32`; and
/// the files are read, not mapped, so their pages do not count in the process's memory either.
pub struct SafetensorsDir {
    shards: Vec<Shard>,
    /// The tensors not yet taken.
    index: HashMap<String, Entry>,
}

struct Shard {
    path: PathBuf,
    file: File,
    /// Where the tensor data starts: after the 8-byte header length and the JSON header.
    data_start: u64,
}

/// Where one tensor lies.
struct Entry {
    shard: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// Byte range inside the shard's data.
    bytes: (usize, usize),
}

impl SafetensorsDir {
    /// Read the headers of `model.safetensors`, or of the shards listed in
    /// `model.safetensors.index.json`, and check them: every tensor's bytes lie inside its file,
    /// and its dtype is one lmforge reads.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let weight_map = if index_path.exists() { Some(read_weight_map(&index_path)?) } else { None };
        let files: Vec<PathBuf> = match &weight_map {
            Some(map) => shard_files(map).into_iter().map(|f| dir.join(f)).collect(),
            None if dir.join("model.safetensors").exists() => vec![dir.join("model.safetensors")],
            None => {
                return Err(Error::checkpoint(
                    dir,
                    "no weights found: expected model.safetensors or model.safetensors.index.json with its shards",
                ))
            }
        };
        let mut found = SafetensorsDir { shards: Vec::new(), index: HashMap::new() };
        for path in files {
            found.add_shard(path)?;
        }
        if let Some(map) = weight_map {
            found.check_against_index(&map, dir, &index_path)?;
        }
        Ok(found)
    }

    /// Every tensor the index lists lies in the shard it names. (A shard swapped for another
    /// download's, or a tensor listed in the wrong file, would otherwise surface later as a
    /// missing or misshapen weight, far from its cause.)
    fn check_against_index(&self, weight_map: &HashMap<String, String>, dir: &Path, index_path: &Path) -> Result<()> {
        let mut listed: Vec<(&String, &String)> = weight_map.iter().collect();
        listed.sort();
        for (tensor, file) in listed {
            let found_in = self.index.get(tensor).map(|entry| &self.shards[entry.shard].path);
            // (The shard paths were made by this same join, so equal names compare equal.)
            if found_in.is_none_or(|path| *path != dir.join(file)) {
                let where_ = found_in.map_or("in none of the shards".to_string(), |p| format!("in {}", p.display()));
                return Err(Error::checkpoint(
                    index_path,
                    format!("weight_map[`{tensor}`] names shard {file}, but the tensor is {where_}\nHINT: the index and its shards come from different downloads; fetch them again together"),
                ));
            }
        }
        Ok(())
    }

    fn add_shard(&mut self, path: PathBuf) -> Result<()> {
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        // The header is parsed from a mapping (the parser checks it against the file's length);
        // only its first pages are touched, and the mapping is dropped before any data is read.
        // SAFETY: the mapping is read-only and dropped at the end of this block; a file changed
        // underneath us would give a wrong header, not unsafety in safe code.
        let (header_len, metadata) = {
            let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
            SafeTensors::read_metadata(&mmap).map_err(|e| {
                Error::checkpoint(&path, format!("not a valid safetensors file (truncated or corrupted?): {e}"))
            })?
        };
        let shard = self.shards.len();
        for (name, info) in metadata.tensors() {
            let dtype = match info.dtype {
                Dtype::F32 => DType::F32,
                Dtype::F16 => DType::F16,
                Dtype::BF16 => DType::BF16,
                other => {
                    return Err(Error::checkpoint(
                        &path,
                        format!("tensor `{name}` has dtype {other:?}, expected F32, F16 or BF16"),
                    ))
                }
            };
            if let Some(earlier) = self.index.get(&name) {
                let earlier = &self.shards[earlier.shard].path;
                return Err(Error::checkpoint(
                    &path,
                    format!("tensor `{name}` is also in {}: each tensor must lie in one shard", earlier.display()),
                ));
            }
            let entry = Entry { shard, dtype, shape: info.shape.clone(), bytes: info.data_offsets };
            self.index.insert(name, entry);
        }
        self.shards.push(Shard { path, file, data_start: 8 + header_len as u64 });
        Ok(())
    }

    /// How many tensors are left to take.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The names of the tensors left to take, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.index.keys().cloned().collect();
        names.sort();
        names
    }

    /// The shape of tensor `name`, without reading it.
    pub fn dims(&self, name: &str) -> Option<&[usize]> {
        self.index.get(name).map(|e| e.shape.as_slice())
    }

    /// Read tensor `name` as `f32` on `device`, and forget it; `None` when there is none (left).
    pub fn take(&mut self, name: &str, device: &Device) -> Result<Option<Tensor>> {
        let Some(entry) = self.index.remove(name) else { return Ok(None) };
        let shard = &mut self.shards[entry.shard];
        let (start, end) = entry.bytes;
        let failed = |e| Error::checkpoint(&shard.path, format!("tensor `{name}`: cannot read its data: {e}"));
        shard.file.seek(SeekFrom::Start(shard.data_start + start as u64)).map_err(failed)?;
        let tensor = match entry.dtype {
            // Read straight into the f32 values: no second copy of the largest matrices.
            DType::F32 => {
                let mut values = vec![0f32; (end - start) / 4];
                // SAFETY: the bytes of initialised f32s, any pattern of which is an f32.
                let bytes =
                    unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), values.len() * 4) };
                shard.file.read_exact(bytes).map_err(failed)?;
                if cfg!(target_endian = "big") {
                    values.iter_mut().for_each(|v| *v = f32::from_bits(u32::from_le(v.to_bits())));
                }
                Tensor::from_vec(values, entry.shape, &Device::Cpu)?.to_device(device)?
            }
            dtype => {
                let mut bytes = vec![0u8; end - start];
                shard.file.read_exact(&mut bytes).map_err(failed)?;
                Tensor::from_raw_buffer(&bytes, dtype, &entry.shape, device)?.to_dtype(DType::F32)?
            }
        };
        Ok(Some(tensor))
    }
}

/// Write tensors to `path` atomically: a temporary file in the same directory, then a rename,
/// so a crash never leaves a half-written file under the final name.
pub fn write_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = path.with_extension("safetensors.tmp");
    candle_core::safetensors::save(tensors, &tmp).map_err(|e| Error::checkpoint(&tmp, format!("cannot write: {e}")))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use super::*;
    use crate::test_util::TempDir;

    /// Two shards listed by an index: the headers give every name and shape before any data is
    /// read; each tensor is read once, as `f32` (bf16 and f16 widened exactly).
    #[test]
    fn shards_listed_by_an_index_read_as_one_directory() {
        let dir = TempDir::new("shards");
        let values = [0.5f32, -1.25, 3.0, 0.0078125, 7.5, -0.0]; // exact in bf16 and f16
        let x = Tensor::new(&values, &Device::Cpu).unwrap().reshape((2, 3)).unwrap();
        let (y, z) = (x.to_dtype(DType::BF16).unwrap(), x.to_dtype(DType::F16).unwrap().reshape((3, 2)).unwrap());
        let first: HashMap<String, Tensor> = [("x".to_string(), x.clone()), ("y".to_string(), y)].into();
        candle_core::safetensors::save(&first, dir.path("model-1.safetensors")).unwrap();
        candle_core::safetensors::save(&HashMap::from([("z".to_string(), z)]), dir.path("model-2.safetensors"))
            .unwrap();
        let index =
            r#"{"weight_map": {"x": "model-1.safetensors", "y": "model-1.safetensors", "z": "model-2.safetensors"}}"#;
        dir.write("model.safetensors.index.json", index);

        let mut files = SafetensorsDir::open(&dir.0).unwrap();
        assert_eq!(files.names(), ["x", "y", "z"]);
        assert_eq!(files.dims("z"), Some(&[3, 2][..]));
        let z = files.take("z", &Device::Cpu).unwrap().unwrap();
        assert_eq!((z.dtype(), z.flatten_all().unwrap().to_vec1::<f32>().unwrap()), (DType::F32, values.to_vec()));
        assert!(files.take("z", &Device::Cpu).unwrap().is_none() && files.dims("z").is_none());
        assert_eq!(files.len(), 2);

        let all = read_safetensors_dir(&dir.0, &Device::Cpu).unwrap();
        for name in ["x", "y", "z"] {
            assert_eq!(all[name].flatten_all().unwrap().to_vec1::<f32>().unwrap(), values, "{name}");
        }
        assert_eq!(all["x"].dims(), [2, 3]);
    }

    /// Two shards of one model: `x` in the first, `y` in the second (and whatever `extra`
    /// adds to the second), with an index that maps each tensor to the shard in `weight_map`.
    fn two_shards(name: &str, extra: &[&str], weight_map: &str) -> TempDir {
        let dir = TempDir::new(name);
        let t = || Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
        let second: HashMap<String, Tensor> =
            std::iter::once("y").chain(extra.iter().copied()).map(|n| (n.to_string(), t())).collect();
        candle_core::safetensors::save(&HashMap::from([("x".to_string(), t())]), dir.path("a.safetensors")).unwrap();
        candle_core::safetensors::save(&second, dir.path("b.safetensors")).unwrap();
        dir.write("model.safetensors.index.json", format!(r#"{{"weight_map": {weight_map}}}"#));
        dir
    }

    /// A tensor in two shards is refused, naming both files: which copy wins is not ours to guess.
    #[test]
    fn a_tensor_in_two_shards_is_refused_naming_both() {
        let dir = two_shards("twice", &["x"], r#"{"x": "a.safetensors", "y": "b.safetensors"}"#);
        let err = SafetensorsDir::open(&dir.0).err().unwrap().to_string();
        assert!(err.contains("tensor `x` is also in") && err.contains("a.safetensors"), "{err}");
        assert!(err.contains("b.safetensors"), "{err}");
    }

    /// An index that names the wrong shard for a tensor, or a tensor no shard holds, is refused
    /// naming the index, the tensor and where it is.
    #[test]
    fn an_index_that_disagrees_with_its_shards_is_refused() {
        // (A shard named with a leading `./` is the same file: accepted.)
        let dir = two_shards("dotted", &[], r#"{"x": "a.safetensors", "y": "./b.safetensors"}"#);
        assert_eq!(SafetensorsDir::open(&dir.0).unwrap().names(), ["x", "y"]);

        let dir = two_shards("moved", &[], r#"{"x": "a.safetensors", "y": "a.safetensors", "z": "b.safetensors"}"#);
        let err = SafetensorsDir::open(&dir.0).err().unwrap().to_string();
        assert!(
            err.contains("model.safetensors.index.json") && err.contains("weight_map[`y`] names shard a.safetensors"),
            "{err}"
        );
        assert!(err.contains("b.safetensors") && err.contains("HINT:"), "{err}");

        let dir = two_shards("missing", &[], r#"{"x": "a.safetensors", "y": "b.safetensors", "z": "b.safetensors"}"#);
        let err = SafetensorsDir::open(&dir.0).err().unwrap().to_string();
        assert!(err.contains("weight_map[`z`]") && err.contains("in none of the shards"), "{err}");
    }

    /// A shard cut short is refused when its header is read, naming the file.
    #[test]
    fn a_truncated_shard_is_refused_naming_it() {
        let dir = TempDir::new("cut");
        let x = Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap();
        let path = dir.path("model.safetensors");
        candle_core::safetensors::save(&HashMap::from([("x".to_string(), x)]), &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
        let err = SafetensorsDir::open(&dir.0).err().unwrap().to_string();
        assert!(err.contains("model.safetensors") && err.contains("truncated or corrupted"), "{err}");
    }
}
