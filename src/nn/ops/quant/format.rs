//! GGUF's block formats as lmforge holds them: [`QFormat`] (the five block types the kernels
//! read) and [`QMatrix`] (a weight matrix kept in its file's blocks, row by row).
//!
//! Byte layouts (little endian, one block after another along a row; llama.cpp's `ggml-common.h`):
//!
//! ```text
//! Q4_0  32 values, 18 bytes: d f16 | qs[16]         x = d·(q − 8),     q = nibble
//! Q4_1  32 values, 20 bytes: d f16 | m f16 | qs[16] x = d·q + m
//! Q8_0  32 values, 34 bytes: d f16 | qs[32] i8      x = d·q
//! Q4_K 256 values, 144 bytes: d f16 | dmin f16 | scales[12] (eight 6-bit scale/min pairs) | qs[128]
//!                                                   x = d·sc_j·q − dmin·m_j  (sub-block j of 32)
//! Q6_K 256 values, 210 bytes: ql[128] | qh[64] | scales[16] i8 | d f16
//!                                                   x = d·sc_j·(q − 32)      (sub-block j of 16)
//! ```
//!
//! In Q4_0 / Q4_1 byte `i` holds value `i` in its low nibble and value `i + 16` in its high one;
//! the K formats' nibble and 2-bit layouts are spelled out in [`super::scalar`].
//!
//! `BF16` is no block format: each value is its two bytes of bf16 (GGUF's `BF16` type, and
//! what `--dtype bf16` holds a model's matrices in). It is kept here, beside the block formats,
//! so a bf16 matrix is a [`QMatrix`] like theirs and shares their products, fused q/k/v and
//! gate/up calls, row reordering and embedding lookups; its own dot products are
//! [`super::bf16_rows`].

use std::borrow::Cow;
use std::fmt;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{bail, Device, Result, Tensor};

/// A GGUF block type that lmforge's integer kernels read, or bf16 values (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QFormat {
    Q4_0,
    Q4_1,
    Q8_0,
    Q4K,
    Q6K,
    /// Two bytes per value, products on bf16 dot products ([`super::bf16_rows`]).
    BF16,
}

impl QFormat {
    /// The block formats (the integer kernels' five).
    pub const ALL: [QFormat; 5] = [QFormat::Q4_0, QFormat::Q4_1, QFormat::Q8_0, QFormat::Q4K, QFormat::Q6K];

    /// The format of a GGML type; `None` for the types the kernels do not read (f32, f16, …).
    pub fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_0 => Some(QFormat::Q4_0),
            GgmlDType::Q4_1 => Some(QFormat::Q4_1),
            GgmlDType::Q8_0 => Some(QFormat::Q8_0),
            GgmlDType::Q4K => Some(QFormat::Q4K),
            GgmlDType::Q6K => Some(QFormat::Q6K),
            GgmlDType::BF16 => Some(QFormat::BF16),
            _ => None,
        }
    }

    pub fn ggml(self) -> GgmlDType {
        match self {
            QFormat::Q4_0 => GgmlDType::Q4_0,
            QFormat::Q4_1 => GgmlDType::Q4_1,
            QFormat::Q8_0 => GgmlDType::Q8_0,
            QFormat::Q4K => GgmlDType::Q4K,
            QFormat::Q6K => GgmlDType::Q6K,
            QFormat::BF16 => GgmlDType::BF16,
        }
    }

    /// Values per block.
    pub fn block_len(self) -> usize {
        match self {
            QFormat::Q4_0 | QFormat::Q4_1 | QFormat::Q8_0 => 32,
            QFormat::Q4K | QFormat::Q6K => 256,
            QFormat::BF16 => 1,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            QFormat::Q4_0 => 18,
            QFormat::Q4_1 => 20,
            QFormat::Q8_0 => 34,
            QFormat::Q4K => 144,
            QFormat::Q6K => 210,
            QFormat::BF16 => 2,
        }
    }
}

impl fmt::Display for QFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            QFormat::Q4_0 => "Q4_0",
            QFormat::Q4_1 => "Q4_1",
            QFormat::Q8_0 => "Q8_0",
            QFormat::Q4K => "Q4_K",
            QFormat::Q6K => "Q6_K",
            QFormat::BF16 => "BF16",
        })
    }
}

/// A `(rows, cols)` weight matrix held in GGUF blocks: each row is `cols / block_len` blocks,
/// rows one after another, exactly the bytes of the file (so resident memory is the file's).
pub struct QMatrix {
    format: QFormat,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl QMatrix {
    /// Wrap the blocks of a `(rows, cols)` matrix, checking that `data` is exactly that many.
    pub fn new(format: QFormat, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self> {
        if !cols.is_multiple_of(format.block_len()) {
            bail!("a {format} row holds whole blocks of {} values, got {cols} columns", format.block_len())
        }
        let expected = rows * cols / format.block_len() * format.block_bytes();
        if data.len() != expected {
            bail!("a ({rows}, {cols}) {format} matrix is {expected} bytes, got {}", data.len())
        }
        Ok(QMatrix { format, rows, cols, data })
    }

    /// Quantize an `f32` `(rows, cols)` tensor the way llama.cpp's tools do (candle's
    /// quantizers): for tests and for making small quantized models.
    pub fn quantize(w: &Tensor, format: QFormat) -> Result<Self> {
        let (rows, cols) = w.dims2()?;
        if format == QFormat::BF16 {
            let values = w.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            return QMatrix::new(format, rows, cols, super::bf16_rows::bytes_of(&values));
        }
        let q = QTensor::quantize(w, format.ggml())?;
        QMatrix::new(format, rows, cols, q.data()?.into_owned())
    }

    /// The `f32` values, by candle's dequantizer (the reference the kernels are tested against,
    /// and what training from a quantized file starts from). `(rows, cols)`
    pub fn dequantize(&self) -> Result<Tensor> {
        if self.format == QFormat::BF16 {
            return Tensor::from_vec(super::bf16_rows::values_of(&self.data), (self.rows, self.cols), &Device::Cpu);
        }
        let storage = QStorage::from_data(Cow::Borrowed(&self.data), &Device::Cpu, self.format.ggml())?;
        QTensor::new(storage, (self.rows, self.cols))?.dequantize(&Device::Cpu)
    }

    /// Rows `rows` (any order, repeats allowed) as `f32` `(rows.len(), cols)`, by candle's
    /// dequantizer: an embedding lookup.
    pub fn dequantize_rows(&self, rows: &[usize]) -> Result<Tensor> {
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.rows) {
            bail!("row {bad} of a matrix of {} rows", self.rows)
        }
        let data: Vec<u8> = rows.iter().flat_map(|&r| self.row(r).iter().copied()).collect();
        QMatrix::new(self.format, rows.len(), self.cols, data)?.dequantize()
    }

    pub fn format(&self) -> QFormat {
        self.format
    }

    /// `(rows, cols)`
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Bytes held (the blocks only).
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    pub fn row_bytes(&self) -> usize {
        self.cols / self.format.block_len() * self.format.block_bytes()
    }

    /// `(address, bytes)` of the blocks in memory (for [`crate::host_memory::back_with_huge_pages`]).
    pub fn region(&self) -> (usize, usize) {
        (self.data.as_ptr() as usize, self.data.len())
    }

    /// The blocks of row `r`.
    pub fn row(&self, r: usize) -> &[u8] {
        let n = self.row_bytes();
        &self.data[r * n..(r + 1) * n]
    }

    /// The blocks of rows `rows`, one row after another.
    pub fn rows_data(&self, rows: std::ops::Range<usize>) -> &[u8] {
        let n = self.row_bytes();
        &self.data[rows.start * n..rows.end * n]
    }

    /// The same matrix with its rows reordered: row `i` of the result is row `order[i]` of
    /// `self` (blocks never straddle rows, so this is a copy of byte ranges).
    pub fn select_rows(&self, order: &[usize]) -> Result<Self> {
        if order.len() != self.rows || order.iter().any(|&r| r >= self.rows) {
            bail!("row order of {} entries does not index the {} rows", order.len(), self.rows)
        }
        let data = order.iter().flat_map(|&r| self.row(r).iter().copied()).collect();
        QMatrix::new(self.format, self.rows, self.cols, data)
    }
}

impl fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "QMatrix({}, {}×{}, {} bytes)", self.format, self.rows, self.cols, self.data.len())
    }
}

/// An IEEE half (the blocks' scales) as `f32`.
#[inline]
pub(super) fn f16_at(bytes: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}
