//! The affine map of a linear layer as one op, on [`super::gemm`]:
//!
//! ```text
//! forward                  | backward (upstream gradient dY: N × out)
//! Y = X·Wᵀ + b             | dX = dY·W          (N × in)
//!   X: N × in, W: out × in | dW = dYᵀ·X         (out × in)
//!                          | db = Σ_rows dY     (out)
//! ```
//!
//! Why one op: composed from candle ops, the same layer is a transposed-weight matmul, a
//! broadcast add, and in the backward two matmuls with transposed copies plus a reduction for
//! the bias, each a separate pass over memory, and all on candle's 256-bit matmul kernel. Here
//! the three products read their operands in place through strides (the packing step of the
//! kernel absorbs the transposes) and the bias is added as the product's tiles are stored.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};

use std::sync::OnceLock;

use super::bf16::{self, Precision};
use super::gemm::{gemm_from, gemm_in, MatRef, Start};
use super::pointwise::Epilogue;
use super::simd::Real;
use super::{compute_dtype, output_buffer, parallel, same_dtype, storage_slice, with_slices};

/// `x·weightᵀ + bias` for `x`: `(…, in)`, `weight`: `(out, in)`, `bias`: `(out)` → `(…, out)`.
/// Gradients flow to all three. The leading dims are flattened inside the op, not by a
/// reshape, so autograd sees one node (every node costs a zero-fill and an add of its input's
/// gradient in candle's backward pass).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    apply(x, weight, bias, None)
}

/// `epilogue(x·weightᵀ + bias)` as one op: the activation is applied as the output leaves
/// the op, and its backward is folded into the layer's (the pre-activation is kept for it).
pub fn linear_then(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, epilogue: Epilogue) -> Result<Tensor> {
    if epilogue == Epilogue::SwiGlu && weight.dim(0)? % 2 != 0 {
        bail!("linear: SwiGLU needs the gate and up weights stacked, an even number of rows, got {:?}", weight.dims())
    }
    apply(x, weight, bias, Some(epilogue))
}

fn apply(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, epilogue: Option<Epilogue>) -> Result<Tensor> {
    check(x, weight, bias)?;
    if !crate::nn::ops::route::uses_cpu_kernel(x.device()) {
        return device_linear(x, weight, bias, epilogue);
    }
    let dtype = x.dtype();
    let compute = compute_dtype("linear", dtype)?;
    let contiguous = |t: &Tensor| t.to_dtype(compute)?.contiguous();
    let (x, weight) = (contiguous(x)?, contiguous(weight)?);
    let keep_pre_activation =
        epilogue.is_some() && (x.track_op() || weight.track_op() || bias.is_some_and(Tensor::track_op));
    let precision = bf16::current();
    let op = LinearOp { epilogue, keep_pre_activation, pre_activation: OnceLock::new(), precision };
    match bias {
        Some(bias) => x.apply_op3(&weight, &contiguous(bias)?, op)?.to_dtype(dtype),
        None => x.apply_op2(&weight, op)?.to_dtype(dtype),
    }
}

/// The layer on a device without lmforge's kernels (a GPU): candle's ops, whose product is
/// cuBLAS on CUDA, at this thread's [`Precision`]. At bf16 the operands are cast to bf16 and
/// multiplied there (f32 accumulation), the product cast back to the input's dtype; the bias
/// and the epilogue run in that dtype, as on the CPU. The casts pass gradients through, so the
/// backward products are bf16 too (`dX = bf16(dY)·bf16(W)`, `dW = bf16(dY)ᵀ·bf16(X)`). Unlike
/// the CPU kernel, each product's output is rounded to bf16 before the cast back (PyTorch's
/// autocast does the same).
pub fn device_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, epilogue: Option<Epilogue>) -> Result<Tensor> {
    let y = match bf16::current() {
        Precision::F32 => composed_linear(x, weight, None)?,
        Precision::Bf16 => composed_linear(&bf16::autocast(x)?, &bf16::autocast(weight)?, None)?.to_dtype(x.dtype())?,
    };
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    match epilogue {
        Some(e) => e.composed(&y),
        None => Ok(y),
    }
}

/// The same map from candle's ops (the reference).
pub fn composed_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let mut shape = x.dims().to_vec();
    let rows: usize = shape[..shape.len() - 1].iter().product();
    let y = x.reshape((rows, weight.dim(1)?))?.matmul(&weight.t()?)?;
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    *shape.last_mut().expect("checked rank") = weight.dim(0)?;
    y.reshape(shape)
}

fn check(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<()> {
    let (Some(&fan_in), true, Ok((fan_out, w_in))) = (x.dims().last(), x.rank() >= 2, weight.dims2()) else {
        bail!(
            "linear: x must be (…, in) with at least 2 dims and weight (out, in), got {:?} and {:?}",
            x.dims(),
            weight.dims()
        )
    };
    if fan_in != w_in {
        bail!("linear: x has {fan_in} features but weight {:?} expects {w_in}", weight.dims())
    }
    if let Some(b) = bias {
        if b.dims() != [fan_out] {
            bail!("linear: bias must be ({fan_out}) for weight {:?}, got {:?}", weight.dims(), b.dims())
        }
    }
    let mut others = vec![("weight", weight)];
    others.extend(bias.map(|b| ("bias", b)));
    same_dtype("linear", x.dtype(), &others)
}

struct LinearOp {
    epilogue: Option<Epilogue>,
    /// Only keep the pre-activation when some input wants a gradient.
    keep_pre_activation: bool,
    /// `x·weightᵀ + bias` `(rows, out)`, kept by the forward for the epilogue's backward.
    pre_activation: OnceLock<Tensor>,
    /// The precision of this thread's scope when the forward ran; the backward's products
    /// use it too, wherever `backward()` is called ([`bf16`]).
    precision: Precision,
}

impl LinearOp {
    /// Runs [`forward`] on `[x, w]` or `[x, w, b]`, then the epilogue.
    fn cpu_fwd_any(&self, inputs: &[(&CpuStorage, &Layout)]) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(
            op: &LinearOp,
            inputs: &[(&CpuStorage, &Layout)],
            rows: usize,
            fan_in: usize,
            fan_out: usize,
        ) -> Result<CpuStorage> {
            let slices = inputs
                .iter()
                .map(|(storage, layout)| storage_slice::<T>("linear", storage, layout))
                .collect::<Result<Vec<_>>>()?;
            let y = forward(op.precision, slices[0], slices[1], slices.get(2).copied(), rows, fan_in, fan_out);
            let Some(epilogue) = op.epilogue else {
                return Ok(T::to_cpu_storage_owned(y));
            };
            let out = epilogue.forward(&y, fan_out);
            if op.keep_pre_activation {
                // A fresh op runs its forward once; a second set would be a bug, not user input.
                let _ = op.pre_activation.set(Tensor::from_vec(y, (rows, fan_out), &Device::Cpu)?);
            }
            Ok(T::to_cpu_storage_owned(out))
        }
        let ((x, lx), (_, lw)) = (inputs[0], inputs[1]);
        let (fan_out, fan_in) = lw.shape().dims2()?;
        let rows = lx.shape().elem_count() / fan_in.max(1);
        let storage = match x {
            CpuStorage::F32(_) => run::<f32>(self, inputs, rows, fan_in, fan_out)?,
            CpuStorage::F64(_) => run::<f64>(self, inputs, rows, fan_in, fan_out)?,
            _ => return Err(candle_core::Error::UnsupportedDTypeForOp(BackendStorage::dtype(x), "linear")),
        };
        let mut dims = lx.dims().to_vec();
        *dims.last_mut().expect("checked rank") = self.epilogue.map_or(fan_out, |e| e.width(fan_out));
        Ok((storage, Shape::from(dims)))
    }

    /// Gradients for `x`, `weight` and (when `with_bias`) `bias`.
    fn bwd_any(
        &self,
        x: &Tensor,
        weight: &Tensor,
        grad: &Tensor,
        with_bias: bool,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        fn run<T: Real>(
            op: &LinearOp,
            x: &Tensor,
            weight: &Tensor,
            grad: &Tensor,
            with_bias: bool,
        ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
            let (fan_out, fan_in) = weight.dims2()?;
            let rows = x.elem_count() / fan_in.max(1);
            let (dx, dw, db) = match op.epilogue {
                None => with_slices::<T, _>("linear", &[x, weight, grad], |s| {
                    Ok(backward(op.precision, s[0], s[1], s[2], rows, fan_in, fan_out, with_bias))
                })?,
                Some(epilogue) => {
                    let Some(pre) = op.pre_activation.get() else {
                        bail!("linear: backward without a saved forward (no input required a gradient)")
                    };
                    let pre = pre.to_dtype(T::DTYPE)?;
                    with_slices::<T, _>("linear", &[x, weight, grad, &pre], |s| {
                        let dy = epilogue.backward(s[3], s[2], fan_out);
                        Ok(backward(op.precision, s[0], s[1], &dy, rows, fan_in, fan_out, with_bias))
                    })?
                }
            };
            Ok((
                Tensor::from_vec(dx, x.shape(), &Device::Cpu)?,
                Tensor::from_vec(dw, (fan_out, fan_in), &Device::Cpu)?,
                db.map(|db| Tensor::from_vec(db, fan_out, &Device::Cpu)).transpose()?,
            ))
        }
        let grad = grad.to_dtype(x.dtype())?;
        match x.dtype() {
            DType::F32 => run::<f32>(self, x, weight, &grad, with_bias),
            DType::F64 => run::<f64>(self, x, weight, &grad, with_bias),
            other => Err(candle_core::Error::UnsupportedDTypeForOp(other, "linear")),
        }
    }
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout, w: &CpuStorage, lw: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu_fwd_any(&[(x, lx), (w, lw)])
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.bwd_any(x, weight, grad, false)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu_fwd_any(&[(x, lx), (w, lw), (b, lb)])
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = self.bwd_any(x, weight, grad, true)?;
        Ok((Some(dx), Some(dw), db))
    }
}

/// `(N, out)` for `x`: `(N, in)`, `w`: `(out, in)`; `b` is added to every row first.
fn forward<T: Real>(
    precision: Precision,
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    rows: usize,
    fan_in: usize,
    fan_out: usize,
) -> Vec<T> {
    // SAFETY: written whole by `gemm_from`, which starts it as zero or the bias rows.
    let mut y = unsafe { output_buffer(rows * fan_out) };
    let x = MatRef::row_major(x, rows, fan_in);
    let w_t = MatRef::row_major(w, fan_out, fan_in).t();
    // The bias is added by the product's first store into each tile, not copied into every
    // row beforehand (one pass over Y less).
    let start = b.map_or(Start::Zero, Start::Row);
    gemm_from(precision, x, w_t, &mut y, fan_out, start);
    y
}

/// `(dX, dW, db)`; `db` only when `with_bias`.
#[allow(clippy::too_many_arguments)]
fn backward<T: Real>(
    precision: Precision,
    x: &[T],
    w: &[T],
    dy: &[T],
    rows: usize,
    fan_in: usize,
    fan_out: usize,
    with_bias: bool,
) -> (Vec<T>, Vec<T>, Option<Vec<T>>) {
    let dy_m = MatRef::row_major(dy, rows, fan_out);
    // SAFETY (both): written whole by `gemm`, which does not accumulate here.
    let mut dx = unsafe { output_buffer(rows * fan_in) };
    gemm_in(precision, dy_m, MatRef::row_major(w, fan_out, fan_in), &mut dx, fan_in, false);
    let mut dw = unsafe { output_buffer(fan_out * fan_in) };
    gemm_in(precision, dy_m.t(), MatRef::row_major(x, rows, fan_in), &mut dw, fan_in, false);
    let db = with_bias.then(|| column_sums(dy, fan_out));
    (dx, dw, db)
}

/// `Σ_rows m` for a row-major matrix of `cols` columns: each task sums a block of rows.
fn column_sums<T: Real>(m: &[T], cols: usize) -> Vec<T> {
    let block = parallel::rows_per_task(cols) * cols;
    let parts = parallel::fold(
        m.len().div_ceil(block),
        || vec![T::ZERO; cols],
        |acc, i| {
            for row in m[i * block..].chunks_exact(cols).take(block / cols) {
                acc.iter_mut().zip(row).for_each(|(a, &x)| *a += x);
            }
        },
    );
    parallel::sum_parts(parts)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Tensor};

    use super::*;
    use crate::nn::ops::testing::{check_against_composed, check_finite_differences, rand_tensor};

    fn inputs(rows: usize, fan_in: usize, fan_out: usize, dtype: DType) -> Vec<Tensor> {
        vec![
            rand_tensor(&[rows, fan_in], 1, dtype),
            rand_tensor(&[fan_out, fan_in], 2, dtype),
            rand_tensor(&[fan_out], 3, dtype),
        ]
    }

    #[test]
    fn gradients_match_finite_differences() {
        for (rows, fan_in, fan_out) in [(1, 1, 1), (5, 7, 3), (13, 4, 33)] {
            let with_bias = |t: &[Tensor]| linear(&t[0], &t[1], Some(&t[2]));
            check_finite_differences(&with_bias, &inputs(rows, fan_in, fan_out, DType::F64), &[0, 1, 2], 1e-6);
            let without = |t: &[Tensor]| linear(&t[0], &t[1], None);
            check_finite_differences(&without, &inputs(rows, fan_in, fan_out, DType::F64)[..2], &[0, 1], 1e-6);
        }
    }

    /// f32 through the AVX-512 kernel where the CPU has it, at sizes that take the threaded
    /// path and ragged tiles.
    #[test]
    fn matches_composed_ops() {
        for (rows, fan_in, fan_out) in [(3, 5, 2), (130, 96, 200), (515, 300, 77), (64, 1000, 40)] {
            let fused = |t: &[Tensor]| linear(&t[0], &t[1], Some(&t[2]));
            let composed = |t: &[Tensor]| composed_linear(&t[0], &t[1], Some(&t[2]));
            check_against_composed("linear", &fused, &composed, &inputs(rows, fan_in, fan_out, DType::F32), 1e-4);
            let fused = |t: &[Tensor]| linear(&t[0], &t[1], None);
            let composed = |t: &[Tensor]| composed_linear(&t[0], &t[1], None);
            check_against_composed(
                "linear, no bias",
                &fused,
                &composed,
                &inputs(rows, fan_in, fan_out, DType::F32)[..2],
                1e-4,
            );
        }
    }

    #[test]
    fn leading_dims_are_kept() {
        let x = rand_tensor(&[2, 3, 5, 4], 1, DType::F64);
        let (w, b) = (rand_tensor(&[6, 4], 2, DType::F64), rand_tensor(&[6], 3, DType::F64));
        let y = linear(&x, &w, Some(&b)).unwrap();
        assert_eq!(y.dims(), &[2, 3, 5, 6]);
        let f = |t: &[Tensor]| linear(&t[0], &t[1], Some(&t[2]));
        check_finite_differences(&f, &[x, w, b], &[0, 1, 2], 1e-6);
    }

    /// The activation inside the op == the layer followed by the activation's own op: values and
    /// all three gradients, in f64 against finite differences and in f32 through the threaded
    /// kernels (205 × 160 outputs: several parallel tasks of the epilogue).
    #[test]
    fn epilogues_match_the_layer_then_the_activation() {
        for epilogue in [Epilogue::GeluTanh, Epilogue::GeluErf, Epilogue::SwiGlu] {
            let fused = |t: &[Tensor]| linear_then(&t[0], &t[1], Some(&t[2]), epilogue);
            let composed = |t: &[Tensor]| epilogue.composed(&composed_linear(&t[0], &t[1], Some(&t[2]))?);
            let wide = |t: Vec<Tensor>| vec![(&t[0] * 3.0).unwrap(), t[1].clone(), t[2].clone()];
            check_finite_differences(&fused, &wide(inputs(5, 7, 6, DType::F64)), &[0, 1, 2], 1e-6);
            check_against_composed("epilogue", &fused, &composed, &wide(inputs(205, 96, 160, DType::F32)), 1e-4);
            let without = |t: &[Tensor]| linear_then(&t[0], &t[1], None, epilogue);
            check_finite_differences(&without, &inputs(3, 4, 8, DType::F64)[..2], &[0, 1], 1e-6);
        }
        let t = inputs(4, 3, 5, DType::F32);
        let err = linear_then(&t[0], &t[1], None, Epilogue::SwiGlu).unwrap_err().to_string();
        assert!(err.contains("even number of rows"), "{err}");
    }

    /// No rows: an empty output, and gradients of the right shapes (zeros for the weight and
    /// bias), with and without an epilogue.
    #[test]
    fn zero_rows_give_zero_gradients() {
        let t = inputs(0, 3, 4, DType::F64);
        for epilogue in [None, Some(Epilogue::GeluErf), Some(Epilogue::SwiGlu)] {
            let f = |t: &[Tensor]| match epilogue {
                Some(e) => linear_then(&t[0], &t[1], Some(&t[2]), e),
                None => linear(&t[0], &t[1], Some(&t[2])),
            };
            let (out, grads) = crate::nn::ops::testing::value_and_grads(&f, &t);
            assert_eq!(out.dims()[0], 0);
            assert_eq!(grads[1].dims(), &[4, 3]);
            assert_eq!(grads[2].dims(), &[4]);
            for g in &grads[1..] {
                assert_eq!(g.abs().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap(), 0.0);
            }
        }
    }

    #[test]
    fn bad_shapes_are_named() {
        let t = inputs(4, 3, 2, DType::F32);
        let err = linear(&t[0], &t[1].t().unwrap(), None).unwrap_err().to_string();
        assert!(err.contains("expects 2"), "{err}");
        let err = linear(&t[0], &t[1], Some(&t[0])).unwrap_err().to_string();
        assert!(err.contains("bias must be (2)"), "{err}");
        let err = linear(&t[0].flatten_all().unwrap(), &t[1], None).unwrap_err().to_string();
        assert!(err.contains("at least 2 dims"), "{err}");
    }
}
