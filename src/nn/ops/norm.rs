//! RMSNorm and LayerNorm over the last dim, fused: one pass for the statistics and one for the
//! output, forward and backward, instead of the six to eight elementwise ops (each a full
//! tensor written to memory and kept for autograd) of the composed version.
//!
//! Per row `x` of length `D`, upstream gradient `g`, weight `w`, bias `b`:
//!
//! ```text
//! RMSNorm forward                      | RMSNorm backward
//! r  = 1 / √(mean(x²) + eps)           | dw += g ∘ x̂                    (summed over rows)
//! x̂  = x · r                           | dx  = r · (g∘w − x̂ · mean(g∘w∘x̂))
//! y  = x̂ ∘ w                           |
//!                                      |
//! LayerNorm forward                    | LayerNorm backward
//! μ  = mean(x)                         | db += g                         (summed over rows)
//! r  = 1 / √(mean((x − μ)²) + eps)     | dw += g ∘ x̂
//! x̂  = (x − μ) · r                     | dx  = r · (g∘w − mean(g∘w) − x̂ · mean(g∘w∘x̂))
//! y  = x̂ ∘ w + b                       |
//! ```
//!
//! The backward recomputes `r` (and `μ`) from `x` rather than saving them: one extra read of a
//! row that is about to be read anyway.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, D};

use super::simd::{multiversion, Real};
use super::{compute_dtype, output_buffer, parallel, same_dtype, storage_slice, with_slices};

/// `x / √(mean(x²) + eps) ∘ weight` over the last dim. `x`: `(…, D)`, `weight`: `(D)`.
/// Gradients flow to both.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    check("rms_norm", x, weight, None, eps)?;
    if !crate::nn::ops::route::uses_cpu_kernel(x.device()) {
        return composed_rms_norm(x, weight, eps);
    }
    let dtype = x.dtype();
    let compute = compute_dtype("rms_norm", dtype)?;
    let op = NormOp { kind: Kind::Rms, eps };
    let contiguous = |t: &Tensor| t.to_dtype(compute)?.contiguous();
    contiguous(x)?.apply_op2(&contiguous(weight)?, op)?.to_dtype(dtype)
}

/// `(x − mean(x)) / √(var(x) + eps) ∘ weight + bias` over the last dim (biased variance, as
/// `torch.nn.LayerNorm`). `x`: `(…, D)`, `weight`, `bias`: `(D)`. Gradients flow to all.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    check("layer_norm", x, weight, bias, eps)?;
    if !crate::nn::ops::route::uses_cpu_kernel(x.device()) {
        return composed_layer_norm(x, weight, bias, eps);
    }
    let dtype = x.dtype();
    let compute = compute_dtype("layer_norm", dtype)?;
    let op = NormOp { kind: Kind::Layer, eps };
    let contiguous = |t: &Tensor| t.to_dtype(compute)?.contiguous();
    let (x, weight) = (contiguous(x)?, contiguous(weight)?);
    match bias {
        Some(bias) => x.apply_op3(&weight, &contiguous(bias)?, op)?.to_dtype(dtype),
        None => x.apply_op2(&weight, op)?.to_dtype(dtype),
    }
}

/// RMSNorm from composed ops (the reference, and the path for other devices).
pub fn composed_rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let mean_sq = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(mean_sq + eps)?.sqrt()?)?.broadcast_mul(weight)
}

/// LayerNorm from composed ops (the reference, and the path for other devices).
pub fn composed_layer_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let y = centred.broadcast_div(&(var + eps)?.sqrt()?)?.broadcast_mul(weight)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

fn check(op: &'static str, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<()> {
    let d = x.dims().last().copied().unwrap_or(0);
    if x.rank() == 0 || d == 0 {
        bail!("{op}: x must have a non-empty last dim to normalise over, got shape {:?}", x.dims())
    }
    for (name, t) in std::iter::once(("weight", weight)).chain(bias.map(|b| ("bias", b))) {
        if t.dims() != [d] {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("{op}: {name} must be (D) for x of shape {:?}", x.dims()),
                expected: Shape::from(d),
                got: t.shape().clone(),
            });
        }
    }
    let mut others = vec![("weight", weight)];
    others.extend(bias.map(|b| ("bias", b)));
    same_dtype(op, x.dtype(), &others)?;
    if !(eps >= 0.0 && eps.is_finite()) {
        bail!("{op}: eps must be finite and ≥ 0, got {eps}")
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Rms,
    Layer,
}

struct NormOp {
    kind: Kind,
    eps: f64,
}

impl NormOp {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Rms => "rms_norm",
            Kind::Layer => "layer_norm",
        }
    }

    fn forward<T: Real>(&self, x: &[T], w: &[T], b: Option<&[T]>) -> Vec<T> {
        let d = w.len();
        // SAFETY: `forward_rows` writes each of its rows whole, and the chunks cover `y`.
        let mut y = unsafe { output_buffer(x.len()) };
        let rows = parallel::rows_per_task(d);
        parallel::for_each_chunk(&mut y, rows * d, |i, y| {
            forward_rows(self.kind == Kind::Layer, T::of(self.eps), &x[i * rows * d..][..y.len()], w, b, y);
        });
        y
    }

    /// `(dx, dw, db)`.
    fn backward<T: Real>(&self, x: &[T], w: &[T], g: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) {
        let d = w.len();
        // SAFETY: `backward_rows` writes each of its rows whole, and the chunks cover `dx`.
        let mut dx = unsafe { output_buffer(x.len()) };
        let rows = parallel::rows_per_task(d);
        // Each group of tasks sums its rows' dw, db into its own buffer `[dw | db]`.
        let block = rows * d;
        let parts = parallel::fold_chunks(
            &mut dx,
            block,
            || vec![T::ZERO; 2 * d],
            |acc, i, dx| {
                let rows = i * block..i * block + dx.len();
                backward_rows(self.kind == Kind::Layer, T::of(self.eps), &x[rows.clone()], w, &g[rows], dx, acc);
            },
        );
        let sums = parallel::sum_parts(parts);
        let (dw, db) = sums.split_at(d);
        (dx, dw.to_vec(), db.to_vec())
    }

    fn cpu_fwd_any(&self, inputs: &[(&CpuStorage, &Layout)]) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(op: &NormOp, inputs: &[(&CpuStorage, &Layout)]) -> Result<CpuStorage> {
            let slices = inputs
                .iter()
                .map(|(storage, layout)| storage_slice::<T>(op.name(), storage, layout))
                .collect::<Result<Vec<_>>>()?;
            Ok(T::to_cpu_storage_owned(op.forward(slices[0], slices[1], slices.get(2).copied())))
        }
        let (x, layout) = inputs[0];
        let storage = match x {
            CpuStorage::F32(_) => run::<f32>(self, inputs)?,
            CpuStorage::F64(_) => run::<f64>(self, inputs)?,
            _ => return Err(candle_core::Error::UnsupportedDTypeForOp(BackendStorage::dtype(x), self.name())),
        };
        Ok((storage, layout.shape().clone()))
    }

    /// Gradients for `x`, `weight` and (when `with_bias`) `bias`.
    fn bwd_any(&self, x: &Tensor, weight: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        fn run<T: Real>(op: &NormOp, x: &Tensor, weight: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
            let (dx, dw, db) =
                with_slices::<T, _>(op.name(), &[x, weight, grad], |s| Ok(op.backward(s[0], s[1], s[2])))?;
            let d = dw.len();
            Ok((
                Tensor::from_vec(dx, x.shape(), &Device::Cpu)?,
                Tensor::from_vec(dw, d, &Device::Cpu)?,
                Tensor::from_vec(db, d, &Device::Cpu)?,
            ))
        }
        let grad = grad.to_dtype(x.dtype())?;
        match x.dtype() {
            DType::F32 => run::<f32>(self, x, weight, &grad),
            DType::F64 => run::<f64>(self, x, weight, &grad),
            other => Err(candle_core::Error::UnsupportedDTypeForOp(other, self.name())),
        }
    }
}

impl CustomOp2 for NormOp {
    fn name(&self) -> &'static str {
        NormOp::name(self)
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
        let (dx, dw, _) = self.bwd_any(x, weight, grad)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for NormOp {
    fn name(&self) -> &'static str {
        NormOp::name(self)
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
        let (dx, dw, db) = self.bwd_any(x, weight, grad)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// `Σ_i f(rows[0][i], …, rows[K−1][i])` over rows of one length, with 16 independent lanes
/// (lane `l` sums the `i ≡ l` of the whole chunks of 16 in order, then the tail and the lanes
/// are added in order), so the loop vectorises.
///
/// The rows come as whole chunks of 16 rather than as indices `f(i)` into them: with an index
/// per element the bounds checks kept the lanes scalar (`vaddss`, measured), and
/// `norm::backward_rows` cost twice what it should.
#[inline(always)]
fn sum<T: Real, const K: usize>(rows: [&[T]; K], f: impl Fn([T; K]) -> T) -> T {
    let n = rows.first().map_or(0, |r| r.len());
    assert!(rows.iter().all(|r| r.len() == n), "norm: rows of one length");
    let whole = n / 16 * 16;
    let mut lanes = [T::ZERO; 16];
    for c in (0..whole).step_by(16) {
        let chunks: [&[T; 16]; K] = std::array::from_fn(|k| rows[k][c..c + 16].try_into().expect("16 lanes"));
        for (l, lane) in lanes.iter_mut().enumerate() {
            *lane += f(std::array::from_fn(|k| chunks[k][l]));
        }
    }
    let rest = (whole..n).fold(T::ZERO, |a, i| a + f(std::array::from_fn(|k| rows[k][i])));
    lanes.iter().fold(rest, |a, &b| a + b)
}

/// `(μ, r)` of one row (`μ = 0` for RMSNorm).
#[inline(always)]
fn stats<T: Real>(layer: bool, eps: T, x: &[T]) -> (T, T) {
    let n = T::of(x.len() as f64);
    let mu = if layer { sum([x], |[x]| x) / n } else { T::ZERO };
    let var = sum([x], |[x]| (x - mu) * (x - mu)) / n;
    (mu, T::ONE / (var + eps).sqrt())
}

multiversion! {
    fn forward_rows<T: Real>(layer: bool, eps: T, x: &[T], w: &[T], b: Option<&[T]>, y: &mut [T]) {
        let d = w.len();
        for (x, y) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            let (mu, r) = stats(layer, eps, x);
            match b {
                Some(b) => {
                    for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
                        *y = ((x - mu) * r).mul_add(w, b);
                    }
                }
                None => {
                    for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                        *y = (x - mu) * r * w;
                    }
                }
            }
        }
    }
}

multiversion! {
    /// `dx` for these rows; adds their `dw` and `db` into `acc = [dw | db]`.
    fn backward_rows<T: Real>(layer: bool, eps: T, x: &[T], w: &[T], g: &[T], dx: &mut [T], acc: &mut [T]) {
        let d = w.len();
        let n = T::of(d as f64);
        let (dw, db) = acc.split_at_mut(d);
        for ((x, g), dx) in x.chunks_exact(d).zip(g.chunks_exact(d)).zip(dx.chunks_exact_mut(d)) {
            let (mu, r) = stats(layer, eps, x);
            // mean(g∘w) and mean(g∘w∘x̂)
            let mean_gw = if layer { sum([g, w], |[g, w]| g * w) / n } else { T::ZERO };
            let mean_gwx = sum([g, w, x], |[g, w, x]| g * w * (x - mu)) * r / n;
            for (((dx, &x), &g), &w) in dx.iter_mut().zip(x).zip(g).zip(w) {
                let xhat = (x - mu) * r;
                *dx = r * (g * w - mean_gw - xhat * mean_gwx);
            }
            for (((dw, db), &x), &g) in dw.iter_mut().zip(db.iter_mut()).zip(x).zip(g) {
                *dw = ((x - mu) * r).mul_add(g, *dw);
                *db += g;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Tensor};

    use super::*;
    use crate::nn::ops::testing::{check_against_composed, check_finite_differences, rand_tensor};

    fn inputs(dims: &[usize], dtype: DType) -> Vec<Tensor> {
        let d = *dims.last().unwrap();
        vec![
            rand_tensor(dims, 1, dtype).affine(3.0, 0.5).unwrap(),
            (rand_tensor(&[d], 2, dtype) + 1.0).unwrap(),
            rand_tensor(&[d], 3, dtype),
        ]
    }

    #[test]
    fn rms_norm_gradients() {
        let f = |x: &[Tensor]| rms_norm(&x[0], &x[1], 1e-5);
        check_finite_differences(&f, &inputs(&[3, 2, 7], DType::F64), &[0, 1], 1e-6);
        for dims in [[4usize, 5, 7], [3, 2, 130], [2, 1, 1000]] {
            let composed = |x: &[Tensor]| composed_rms_norm(&x[0], &x[1], 1e-5);
            check_against_composed(&format!("rms {dims:?}"), &f, &composed, &inputs(&dims, DType::F32)[..2], 1e-5);
        }
    }

    #[test]
    fn layer_norm_gradients() {
        let with_bias = |x: &[Tensor]| layer_norm(&x[0], &x[1], Some(&x[2]), 1e-5);
        let without = |x: &[Tensor]| layer_norm(&x[0], &x[1], None, 1e-5);
        let f64_inputs = inputs(&[3, 2, 7], DType::F64);
        check_finite_differences(&with_bias, &f64_inputs, &[0, 1, 2], 1e-6);
        check_finite_differences(&without, &f64_inputs[..2], &[0, 1], 1e-6);
        for dims in [[4usize, 5, 7], [3, 2, 130], [2, 1, 1000]] {
            let composed = |x: &[Tensor]| composed_layer_norm(&x[0], &x[1], Some(&x[2]), 1e-5);
            check_against_composed(&format!("layer {dims:?}"), &with_bias, &composed, &inputs(&dims, DType::F32), 1e-5);
            let composed = |x: &[Tensor]| composed_layer_norm(&x[0], &x[1], None, 1e-5);
            check_against_composed(
                &format!("layer, no bias {dims:?}"),
                &without,
                &composed,
                &inputs(&dims, DType::F32)[..2],
                1e-5,
            );
        }
    }

    #[test]
    fn many_rows_sum_weight_gradients_across_tasks() {
        // 3000 rows of 64: several parallel tasks each accumulate part of dw, db.
        let x = inputs(&[3000, 64], DType::F32);
        let f = |x: &[Tensor]| layer_norm(&x[0], &x[1], Some(&x[2]), 1e-6);
        let composed = |x: &[Tensor]| composed_layer_norm(&x[0], &x[1], Some(&x[2]), 1e-6);
        check_against_composed("3000 rows", &f, &composed, &x, 2e-5);
    }

    #[test]
    fn non_contiguous_input() {
        // x as a transposed view (the model's attention output before its reshape).
        let x = rand_tensor(&[5, 3, 8], 6, DType::F32).transpose(0, 1).unwrap();
        assert!(!x.is_contiguous());
        let w = rand_tensor(&[8], 7, DType::F32);
        let fused = rms_norm(&x, &w, 1e-5).unwrap();
        let composed = composed_rms_norm(&x, &w, 1e-5).unwrap();
        crate::nn::ops::testing::assert_close("rms view", &fused, &composed, 1e-5, 1e-6);
        let fused = layer_norm(&x, &w, Some(&w), 1e-5).unwrap();
        let composed = composed_layer_norm(&x, &w, Some(&w), 1e-5).unwrap();
        crate::nn::ops::testing::assert_close("layer view", &fused, &composed, 1e-5, 1e-6);
    }

    /// No rows: gradients of the weight (and bias) of the right width, all zero.
    #[test]
    fn zero_rows_give_zero_gradients() {
        let x = inputs(&[0, 5], DType::F64);
        let (_, grads) =
            crate::nn::ops::testing::value_and_grads(&|t: &[Tensor]| layer_norm(&t[0], &t[1], Some(&t[2]), 1e-5), &x);
        for g in &grads[1..] {
            assert_eq!(g.dims(), &[5]);
            assert_eq!(g.abs().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap(), 0.0);
        }
        let (_, grads) =
            crate::nn::ops::testing::value_and_grads(&|t: &[Tensor]| rms_norm(&t[0], &t[1], 1e-5), &x[..2]);
        assert_eq!(grads[1].dims(), &[5]);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let x = inputs(&[2, 4], DType::F32);
        assert!(rms_norm(&x[0], &Tensor::ones(3, DType::F32, &candle_core::Device::Cpu).unwrap(), 1e-5).is_err());
        assert!(layer_norm(&x[0], &x[1], Some(&x[2].to_dtype(DType::F64).unwrap()), 1e-5).is_err());
        assert!(rms_norm(&x[0], &x[1], f64::NAN).is_err());
        assert!(rms_norm(&x[0].to_dtype(DType::U32).unwrap(), &x[1].to_dtype(DType::U32).unwrap(), 1e-5).is_err());
        let half = rms_norm(&x[0].to_dtype(DType::BF16).unwrap(), &x[1].to_dtype(DType::BF16).unwrap(), 1e-5).unwrap();
        assert_eq!(half.dtype(), DType::BF16);
    }
}
