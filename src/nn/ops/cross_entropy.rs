//! Softmax cross-entropy from logits, fused: the loss needs one log-sum-exp per row and the
//! backward one pass that writes `softmax − onehot`, so neither the probabilities nor the
//! log-probabilities `(N, V)` are ever stored (with a 50k vocabulary they are the largest
//! activations of a small model, twice over in the composed `log_softmax` + `gather` path).
//!
//! Per row `n` with logits `x` (`V` entries), target `t_n`, and `N'` the rows whose target is
//! not `ignore_index`:
//!
//! ```text
//! forward                                    | backward (upstream gradient g, a scalar)
//! m_n = max_j x_j                            | p_nj   = exp(x_nj − L_n)         (L saved)
//! L_n = m_n + ln Σ_j exp(x_nj − m_n)         | dx_nj  = g · (p_nj − [j = t_n]) / N'
//! loss = (1/N') Σ_{n valid} (L_n − x_{n,t_n})| dx_n   = 0 for ignored rows
//! ```
//!
//! With every row ignored (`N' = 0`) the loss and its gradient are 0, not NaN: a batch with
//! nothing to learn should not trip divergence checks.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor, D};

use super::simd::{multiversion, Real};
use super::{compute_dtype, output_buffer, parallel, with_slices};

/// Mean cross-entropy of `logits` `(…, V)` against class ids `targets` `(…)` (u32; other
/// integer dtypes are converted), skipping rows whose target is `ignore_index`. Returns a
/// scalar; gradients flow to `logits`.
pub fn softmax_cross_entropy(logits: &Tensor, targets: &Tensor, ignore_index: Option<u32>) -> Result<Tensor> {
    const OP: &str = "softmax_cross_entropy";
    let dims = logits.dims();
    let Some((&vocab, rows)) = dims.split_last() else { bail!("{OP}: logits must be (…, V), got a scalar") };
    if targets.dims() != rows || vocab == 0 {
        return Err(candle_core::Error::UnexpectedShape {
            msg: format!(
                "{OP}: targets must have the leading dims of logits {dims:?}\nHINT: one class id per row of logits"
            ),
            expected: Shape::from(rows),
            got: targets.shape().clone(),
        });
    }
    let targets = match targets.dtype() {
        DType::U32 => targets.clone(),
        DType::U8 | DType::I64 => targets.to_dtype(DType::U32)?,
        other => bail!("{OP}: targets must be integer class ids, got dtype {other:?}"),
    };
    let n: usize = rows.iter().product();
    let logits = logits.reshape((n, vocab))?;
    let targets = targets.reshape(n)?;
    if !logits.device().is_cpu() {
        return composed_cross_entropy(&logits, &targets, ignore_index);
    }
    let compute = compute_dtype(OP, logits.dtype())?;
    let op = CrossEntropy { ignore_index, lse: OnceLock::new(), valid: OnceLock::new() };
    logits.to_dtype(compute)?.contiguous()?.apply_op2(&targets.contiguous()?, op)
}

/// Cross-entropy from composed ops (`log_softmax`, `gather`, masked mean): the reference, and
/// the path for other devices. `logits` `(N, V)`, `targets` `(N)` u32.
pub fn composed_cross_entropy(logits: &Tensor, targets: &Tensor, ignore_index: Option<u32>) -> Result<Tensor> {
    let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let ids: Vec<u32> = targets.to_vec1()?;
    let keep: Vec<f32> = ids.iter().map(|&t| if Some(t) == ignore_index { 0.0 } else { 1.0 }).collect();
    let safe_ids: Vec<u32> = ids.iter().map(|&t| if Some(t) == ignore_index { 0 } else { t }).collect();
    let n_valid = keep.iter().sum::<f32>().max(1.0);
    let safe_ids = Tensor::new(safe_ids, logits.device())?.unsqueeze(1)?;
    let picked = log_probs.gather(&safe_ids, 1)?.squeeze(1)?; // (N)
    let keep = Tensor::new(keep, logits.device())?.to_dtype(logits.dtype())?;
    ((picked * keep)?.sum_all()? * (-1.0 / n_valid as f64))?.to_dtype(logits.dtype())
}

struct CrossEntropy {
    ignore_index: Option<u32>,
    /// `(N)` log-sum-exp per row, saved by the forward.
    lse: OnceLock<Tensor>,
    /// Rows that count (`N'`).
    valid: OnceLock<usize>,
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "softmax_cross_entropy"
    }

    fn cpu_fwd(
        &self,
        logits: &CpuStorage,
        ll: &Layout,
        targets: &CpuStorage,
        lt: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(op: &CrossEntropy, logits: &[T], targets: &[u32], vocab: usize) -> Result<CpuStorage> {
            let ignore = op.ignore_index;
            if let Some((row, &bad)) =
                targets.iter().enumerate().find(|(_, &t)| t as usize >= vocab && Some(t) != ignore)
            {
                bail!("softmax_cross_entropy: target {bad} of row {row} is outside the vocabulary (0..{vocab})\nHINT: check the tokenizer's vocabulary size against the model's, or pass ignore_index for padding")
            }
            // Each task: the log-sum-exp of a block of rows, and their loss sum and count.
            const ROWS: usize = 64;
            // SAFETY: each task writes its rows' `lse` whole.
            let mut lse: Vec<T> = unsafe { output_buffer(targets.len()) };
            let parts = parallel::fold_chunks(
                &mut lse,
                ROWS,
                || (0.0, 0),
                |(sum, valid): &mut (f64, usize), i, lse| {
                    for (j, l) in lse.iter_mut().enumerate() {
                        let (row, t) = (&logits[(i * ROWS + j) * vocab..][..vocab], targets[i * ROWS + j]);
                        *l = row_lse(row);
                        if Some(t) != ignore {
                            *sum += (*l - row[t as usize]).to_f64();
                            *valid += 1;
                        }
                    }
                },
            );
            let (sum, valid) = parts.into_iter().fold((0.0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
            let loss = if valid == 0 { 0.0 } else { sum / valid as f64 };
            let _ = op.lse.set(Tensor::from_vec(lse, targets.len(), &Device::Cpu)?);
            let _ = op.valid.set(valid);
            Ok(T::to_cpu_storage_owned(vec![T::of(loss)]))
        }
        let (Some((ls, le)), Some((ts, te))) = (ll.contiguous_offsets(), lt.contiguous_offsets()) else {
            bail!("softmax_cross_entropy: internal error, input is not contiguous")
        };
        let vocab = ll.dims()[1];
        let targets = &targets.as_slice::<u32>()?[ts..te];
        let loss = match logits {
            CpuStorage::F32(x) => run::<f32>(self, &x[ls..le], targets, vocab)?,
            CpuStorage::F64(x) => run::<f64>(self, &x[ls..le], targets, vocab)?,
            _ => return Err(candle_core::Error::UnsupportedDTypeForOp(logits.dtype(), "softmax_cross_entropy")),
        };
        Ok((loss, Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (Some(lse), Some(&valid)) = (self.lse.get(), self.valid.get()) else {
            bail!("softmax_cross_entropy: backward without a saved forward")
        };
        let g = grad.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let coef = if valid == 0 { 0.0 } else { g / valid as f64 };
        fn run<T: Real>(
            op: &CrossEntropy,
            logits: &Tensor,
            targets: &Tensor,
            lse: &Tensor,
            coef: f64,
        ) -> Result<Tensor> {
            let ids: Vec<u32> = targets.to_vec1()?;
            let (n, vocab) = logits.dims2()?;
            let lse = lse.to_dtype(T::DTYPE)?;
            let dx = with_slices::<T, _>("softmax_cross_entropy", &[logits, &lse], |s| {
                // SAFETY: each row is written whole by `grad_row`, or zeroed when ignored.
                let mut dx = unsafe { output_buffer(n * vocab) };
                parallel::for_each_chunk(&mut dx, vocab, |i, dx| {
                    if Some(ids[i]) == op.ignore_index {
                        dx.fill(T::ZERO);
                    } else {
                        grad_row(T::of(coef), s[1][i], ids[i] as usize, &s[0][i * vocab..][..vocab], dx);
                    }
                });
                Ok(dx)
            })?;
            Tensor::from_vec(dx, (n, vocab), &Device::Cpu)
        }
        let dx = match logits.dtype() {
            DType::F32 => run::<f32>(self, logits, targets, lse, coef)?,
            DType::F64 => run::<f64>(self, logits, targets, lse, coef)?,
            other => return Err(candle_core::Error::UnsupportedDTypeForOp(other, "softmax_cross_entropy")),
        };
        Ok((Some(dx), None))
    }
}

multiversion! {
    /// `L = m + ln Σ exp(x − m)` of one row.
    fn row_lse<T: Real>(x: &[T]) -> T {
        const LANES: usize = 16;
        let mut lanes = [T::NEG_INFINITY; LANES];
        let chunks = x.chunks_exact(LANES);
        let rest = chunks.remainder();
        for c in chunks {
            for (m, &v) in lanes.iter_mut().zip(c) {
                *m = m.maximum(v);
            }
        }
        let m = rest.iter().chain(&lanes).fold(T::NEG_INFINITY, |a, &b| a.maximum(b));
        if m == T::NEG_INFINITY {
            return m;
        }
        let mut sums = [T::ZERO; LANES];
        let chunks = x.chunks_exact(LANES);
        let rest = chunks.remainder();
        for c in chunks {
            for (s, &v) in sums.iter_mut().zip(c) {
                *s += (v - m).exp();
            }
        }
        let total = rest.iter().fold(T::ZERO, |a, &v| a + (v - m).exp()) + sums.iter().fold(T::ZERO, |a, &b| a + b);
        m + total.ln()
    }
}

multiversion! {
    /// `dx = coef · (exp(x − L) − onehot(t))` for one row.
    fn grad_row<T: Real>(coef: T, lse: T, target: usize, x: &[T], dx: &mut [T]) {
        for (d, &v) in dx.iter_mut().zip(x) {
            *d = coef * (v - lse).exp();
        }
        dx[target] -= coef;
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::nn::ops::testing::{assert_close, check_finite_differences, rand_tensor, value_and_grads};

    fn targets(ids: &[u32]) -> Tensor {
        Tensor::new(ids, &Device::Cpu).unwrap()
    }

    #[test]
    fn gradients_match_finite_differences() {
        let logits = rand_tensor(&[5, 7], 1, DType::F64).affine(3.0, 0.0).unwrap();
        let ids = targets(&[0, 6, 3, 99, 3]);
        let f = |x: &[Tensor]| softmax_cross_entropy(&x[0], &ids, Some(99));
        check_finite_differences(&f, &[logits], &[0], 1e-6);
    }

    #[test]
    fn matches_composed_loss_and_gradient() {
        for (n, vocab, ignore) in [(6usize, 11usize, None), (37, 1000, Some(0u32)), (8, 50_257, Some(7))] {
            let logits = rand_tensor(&[n, vocab], 2, DType::F32).affine(4.0, 0.0).unwrap();
            let ids: Vec<u32> = (0..n).map(|i| ((i * 7919) % vocab) as u32).collect();
            let ids = targets(&ids);
            let (loss, grad) = value_and_grads(
                &|x: &[Tensor]| softmax_cross_entropy(&x[0], &ids, ignore),
                std::slice::from_ref(&logits),
            );
            let (loss_c, grad_c) = value_and_grads(
                &|x: &[Tensor]| composed_cross_entropy(&x[0], &ids, ignore),
                std::slice::from_ref(&logits),
            );
            assert_close("loss", &loss, &loss_c, 1e-5, 0.0);
            let scale = grad_c[0].abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
            assert_close("grad", &grad[0], &grad_c[0], 1e-5, 1e-5 * scale);
        }
    }

    #[test]
    fn leading_dims_and_all_ignored() {
        let logits = rand_tensor(&[2, 3, 5], 3, DType::F32);
        let ids = Tensor::new(&[[1u32, 2, 3], [4, 0, 1]], &Device::Cpu).unwrap();
        let flat = softmax_cross_entropy(&logits.reshape((6, 5)).unwrap(), &ids.flatten_all().unwrap(), None).unwrap();
        let batched = softmax_cross_entropy(&logits, &ids, None).unwrap();
        assert_close("batched", &batched, &flat, 0.0, 0.0);
        let (loss, grads) = value_and_grads(
            &|x: &[Tensor]| softmax_cross_entropy(&x[0], &targets(&[9, 9]), Some(9)),
            &[rand_tensor(&[2, 5], 4, DType::F32)],
        );
        assert_eq!(loss.to_scalar::<f32>().unwrap(), 0.0);
        assert_eq!(grads[0].abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn bad_targets_are_errors() {
        let logits = rand_tensor(&[2, 5], 3, DType::F32);
        assert!(softmax_cross_entropy(&logits, &targets(&[1, 5]), None).is_err()); // 5 ≥ V
        assert!(softmax_cross_entropy(&logits, &targets(&[1, 2, 3]), None).is_err());
        assert!(softmax_cross_entropy(&logits, &logits.narrow(1, 0, 1).unwrap().squeeze(1).unwrap(), None).is_err());
        let ok = softmax_cross_entropy(&logits, &targets(&[1, 4]).to_dtype(DType::I64).unwrap(), None);
        assert!(ok.is_ok());
    }
}
