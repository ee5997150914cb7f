//! Decoding's products with `f32` weights: one token's row `x` times several matrices of its
//! width (q, k and v; gate and up) as one parallel loop.
//!
//! Through [`super::linear`] each matrix is its own op and its own region of the thread pool,
//! with a wait at its end: seven waits per layer when decoding, where the products themselves
//! (a matrix–vector product each, bound by reading the weights) take tens of microseconds. Here
//! the rows of all the matrices are one loop, so a layer waits four times, as the quantized
//! products do ([`super::quant::qmatmul_each`]).
//!
//! Each output is the dot product the GEMM computes for a one-row product (`gemm::dot_rows`,
//! the same code on the same operands), so the outputs are bit for bit those of [`super::linear`].
//!
//! Inference only: the outputs have no backward, so the product is taken only when nothing
//! asks for a gradient (else the caller runs [`super::linear`]).

use candle_core::{CpuStorage, DType, Result, Storage, Tensor};

use super::bf16::{self, Precision};
use super::gemm::{dot_rows, one_row_task_rows, SendPtr};
use super::{blas, parallel, route};

/// `[x·Wᵢᵀ]` `(…, outᵢ)` for `x` `(…, in)` holding one row and `ws` `(outᵢ, in)`, as one parallel
/// loop; `None` where [`super::linear`] must run instead: more than one row, not `f32` on the
/// CPU, a gradient wanted, bf16 products ([`Precision::Bf16`]) or a loaded BLAS (which the
/// user chose for the `f32` products).
pub fn linear_each(x: &Tensor, ws: &[&Tensor]) -> Result<Option<Vec<Tensor>>> {
    let cols = x.dim(candle_core::D::Minus1)?;
    let dense_f32 = |t: &Tensor| t.dtype() == DType::F32 && route::uses_cpu_kernel(t.device()) && !t.track_op();
    let applies = x.elem_count() == cols
        && dense_f32(x)
        && ws.iter().all(|w| dense_f32(w) && w.is_contiguous() && w.dims2().is_ok_and(|(_, c)| c == cols))
        && bf16::current() == Precision::F32
        && blas::loaded().is_none();
    if !applies {
        return Ok(None);
    }
    let input = x.flatten_all()?.to_vec1::<f32>()?; // (in,)
    let guards: Vec<_> = ws.iter().map(|w| w.storage_and_layout()).collect();
    let mut matrices: Vec<&[f32]> = Vec::with_capacity(ws.len());
    for (storage, layout) in &guards {
        let Storage::Cpu(CpuStorage::F32(data)) = &**storage else { return Ok(None) };
        let Some((start, end)) = layout.contiguous_offsets() else { return Ok(None) };
        matrices.push(&data[start..end]);
    }
    let width: usize = matrices.iter().map(|w| w.len() / cols.max(1)).sum();
    // (matrix, its rows, where they go in the output), split as the GEMM splits one row.
    let rows_per_task = one_row_task_rows(cols);
    let mut tasks = Vec::new();
    let mut offset = 0;
    for (m, w) in matrices.iter().enumerate() {
        let rows = w.len() / cols.max(1);
        tasks.extend((0..rows).step_by(rows_per_task).map(|first| (m, first..rows.min(first + rows_per_task), offset)));
        offset += rows;
    }
    let mut out = vec![0f32; width]; // (Σ outᵢ,)
    let shared = SendPtr(out.as_mut_ptr());
    parallel::for_each(tasks.len(), |task| {
        let (m, rows, offset) = tasks[task].clone();
        // SAFETY: inside `out` (`width` values); each task writes only its own rows.
        let out = unsafe { std::slice::from_raw_parts_mut(shared.get().add(offset + rows.start), rows.len()) };
        dot_rows::<f32>(&input, &matrices[m][rows.start * cols..], cols, out, false);
    });
    drop(guards);
    let mut shape = x.dims().to_vec();
    let all = Tensor::from_vec(out, width, x.device())?;
    let mut first = 0;
    ws.iter()
        .map(|w| {
            let rows = w.dim(0)?;
            *shape.last_mut().expect("x has a last dim") = rows;
            let y = all.narrow(0, first, rows)?.reshape(shape.as_slice())?;
            first += rows;
            Ok(y)
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        (0..n).map(|i| ((i as u64 * 2654435761 + seed * 97) % 10007) as f32 / 10007.0 - 0.5).collect()
    }

    /// One row through q, k and v of different heights (one spanning several tasks): every
    /// output bit for bit the layer's own product ([`super::super::linear`]), in `x`'s leading dims.
    #[test]
    fn one_row_matches_linear_bit_for_bit() {
        let cols = 200;
        let x = Tensor::from_vec(values(cols, 1), (1, 1, cols), &Device::Cpu).unwrap();
        let heights = [7, 400, 33];
        let ws: Vec<Tensor> = heights
            .iter()
            .enumerate()
            .map(|(i, &h)| Tensor::from_vec(values(h * cols, i as u64 + 2), (h, cols), &Device::Cpu).unwrap())
            .collect();
        let refs: Vec<&Tensor> = ws.iter().collect();
        let ys = linear_each(&x, &refs).unwrap().expect("one f32 row on the CPU");
        for (y, w) in ys.iter().zip(&ws) {
            let want = super::super::linear(&x, w, None).unwrap();
            assert_eq!(y.dims(), want.dims());
            assert_eq!(
                y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
    }

    /// More than one row, a gradient wanted, bf16 products or another dtype: the caller's
    /// [`super::super::linear`] runs instead.
    #[test]
    fn declines_what_it_does_not_cover() {
        let cols = 64;
        let w = Tensor::from_vec(values(3 * cols, 1), (3, cols), &Device::Cpu).unwrap();
        let two_rows = Tensor::from_vec(values(2 * cols, 2), (2, cols), &Device::Cpu).unwrap();
        assert!(linear_each(&two_rows, &[&w]).unwrap().is_none());
        let row = Tensor::from_vec(values(cols, 3), (1, cols), &Device::Cpu).unwrap();
        let tracked = Var::from_tensor(&w).unwrap();
        assert!(linear_each(&row, &[tracked.as_tensor()]).unwrap().is_none());
        assert!(linear_each(&row.to_dtype(DType::F64).unwrap(), &[&w]).unwrap().is_none());
        let _bf16 = Precision::Bf16.enter().unwrap();
        assert!(linear_each(&row, &[&w]).unwrap().is_none());
    }
}
