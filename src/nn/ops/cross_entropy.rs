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
//!
//! Label smoothing ε (Szegedy et al. 2016; 0.1 in Vaswani et al. 2017) trains against
//! `(1 − ε)·onehot(t) + ε/V` instead of the one-hot target, PyTorch's definition
//! (`F.cross_entropy(..., label_smoothing=ε)`, the uniform part spread over all V classes, the
//! target included). Since `Σ_j (L_n − x_nj)/V = L_n − x̄_n`, it costs one row mean:
//!
//! ```text
//! loss_n = (1 − ε)(L_n − x_{n,t_n}) + ε (L_n − x̄_n)   | dx_nj = g · (p_nj − ε/V − (1 − ε)[j = t_n]) / N'
//!        = L_n − (1 − ε) x_{n,t_n} − ε x̄_n           |
//! ```

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor, D};

use super::simd::{multiversion, Real};
use super::{compute_dtype, output_buffer, parallel, with_slices};

/// Mean cross-entropy of `logits` `(…, V)` against class ids `targets` `(…)` (u32; other
/// integer dtypes are converted), skipping rows whose target is `ignore_index`. Returns a
/// scalar; gradients flow to `logits`.
pub fn softmax_cross_entropy(logits: &Tensor, targets: &Tensor, ignore_index: Option<u32>) -> Result<Tensor> {
    label_smoothed_cross_entropy(logits, targets, ignore_index, 0.0)
}

/// [`softmax_cross_entropy`] against targets smoothed by `smoothing` = ε in `[0, 1]` (see the
/// module docs; PyTorch's `label_smoothing`). Ignored rows count for neither part.
pub fn label_smoothed_cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: Option<u32>,
    smoothing: f64,
) -> Result<Tensor> {
    const OP: &str = "softmax_cross_entropy";
    if !(0.0..=1.0).contains(&smoothing) {
        bail!("{OP}: label smoothing must be in [0, 1], got {smoothing}")
    }
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
    if !crate::nn::ops::route::uses_cpu_kernel(logits.device()) {
        return composed_cross_entropy(&logits, &targets, ignore_index, smoothing);
    }
    let compute = compute_dtype(OP, logits.dtype())?;
    let op = CrossEntropy { ignore_index, smoothing, lse: OnceLock::new(), valid: OnceLock::new() };
    logits.to_dtype(compute)?.contiguous()?.apply_op2(&targets.contiguous()?, op)
}

/// Cross-entropy from composed ops (`log_softmax`, `gather`, masked mean): the reference, and
/// the path for other devices. `logits` `(N, V)`, `targets` `(N)` u32.
pub fn composed_cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: Option<u32>,
    smoothing: f64,
) -> Result<Tensor> {
    let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let ids: Vec<u32> = targets.to_vec1()?;
    let keep: Vec<f32> = ids.iter().map(|&t| if Some(t) == ignore_index { 0.0 } else { 1.0 }).collect();
    let safe_ids: Vec<u32> = ids.iter().map(|&t| if Some(t) == ignore_index { 0 } else { t }).collect();
    let n_valid = keep.iter().sum::<f32>().max(1.0);
    let safe_ids = Tensor::new(safe_ids, logits.device())?.unsqueeze(1)?;
    let picked = log_probs.gather(&safe_ids, 1)?.squeeze(1)?; // (N)
    let uniform = log_probs.mean(D::Minus1)?; // (N): Σ_j log p_j / V
    let per_row = ((picked * (1.0 - smoothing))? + (uniform * smoothing)?)?; // (N)
    let keep = Tensor::new(keep, logits.device())?.to_dtype(logits.dtype())?;
    ((per_row * keep)?.sum_all()? * (-1.0 / n_valid as f64))?.to_dtype(logits.dtype())
}

struct CrossEntropy {
    ignore_index: Option<u32>,
    /// Label smoothing ε.
    smoothing: f64,
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
            let (ignore, eps) = (op.ignore_index, op.smoothing);
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
                            let picked = row[t as usize];
                            *sum += if eps == 0.0 {
                                (*l - picked).to_f64()
                            } else {
                                let mean = row_sum(row).to_f64() / vocab as f64;
                                l.to_f64() - (1.0 - eps) * picked.to_f64() - eps * mean
                            };
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
        let (uniform, on_target) = (coef * self.smoothing / logits.dim(1)? as f64, coef * (1.0 - self.smoothing));
        fn run<T: Real>(
            op: &CrossEntropy,
            logits: &Tensor,
            targets: &Tensor,
            lse: &Tensor,
            (coef, uniform, on_target): (f64, f64, f64),
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
                        let x = &s[0][i * vocab..][..vocab];
                        grad_row(T::of(coef), T::of(uniform), T::of(on_target), s[1][i], ids[i] as usize, x, dx);
                    }
                });
                Ok(dx)
            })?;
            Tensor::from_vec(dx, (n, vocab), &Device::Cpu)
        }
        let dx = match logits.dtype() {
            DType::F32 => run::<f32>(self, logits, targets, lse, (coef, uniform, on_target))?,
            DType::F64 => run::<f64>(self, logits, targets, lse, (coef, uniform, on_target))?,
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
    /// `Σ x` of one row, in lanes so that it vectorises.
    fn row_sum<T: Real>(x: &[T]) -> T {
        const LANES: usize = 16;
        let mut sums = [T::ZERO; LANES];
        let chunks = x.chunks_exact(LANES);
        let rest = chunks.remainder();
        for c in chunks {
            for (s, &v) in sums.iter_mut().zip(c) {
                *s += v;
            }
        }
        rest.iter().fold(T::ZERO, |a, &v| a + v) + sums.iter().fold(T::ZERO, |a, &b| a + b)
    }
}

multiversion! {
    /// `dx = coef · exp(x − L) − uniform − on_target · onehot(t)` for one row, where
    /// `uniform = coef · ε / V` and `on_target = coef · (1 − ε)`.
    fn grad_row<T: Real>(coef: T, uniform: T, on_target: T, lse: T, target: usize, x: &[T], dx: &mut [T]) {
        for (d, &v) in dx.iter_mut().zip(x) {
            *d = coef * (v - lse).exp() - uniform;
        }
        dx[target] -= on_target;
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::nn::ops::testing::{
        assert_close, check_against_composed, check_finite_differences, rand_tensor, value_and_grads,
    };

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
                &|x: &[Tensor]| composed_cross_entropy(&x[0], &ids, ignore, 0.0),
                std::slice::from_ref(&logits),
            );
            assert_close("loss", &loss, &loss_c, 1e-5, 0.0);
            let scale = grad_c[0].abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
            assert_close("grad", &grad[0], &grad_c[0], 1e-5, 1e-5 * scale);
        }
    }

    #[test]
    fn label_smoothing_gradients_match_finite_differences_and_composed() {
        let logits = rand_tensor(&[6, 9], 5, DType::F64).affine(3.0, 0.0).unwrap();
        let ids = targets(&[0, 8, 3, 99, 3, 5]);
        for eps in [0.1, 0.5, 1.0] {
            let f = |x: &[Tensor]| label_smoothed_cross_entropy(&x[0], &ids, Some(99), eps);
            check_finite_differences(&f, std::slice::from_ref(&logits), &[0], 1e-6);
        }
        // Against the composed ops in f64 (in f32 the composed mean of 50k log-probabilities is
        // itself off by ~1e-4 relative), and the f32 kernel against the f64 one.
        for (n, vocab, ignore) in [(7usize, 13usize, None), (37, 1000, Some(0u32)), (8, 50_257, Some(7))] {
            let logits = rand_tensor(&[n, vocab], 6, DType::F64).affine(4.0, 0.0).unwrap();
            let ids: Vec<u32> = (0..n).map(|i| ((i * 7919) % vocab) as u32).collect();
            let ids = targets(&ids);
            let fused = |x: &[Tensor]| label_smoothed_cross_entropy(&x[0], &ids, ignore, 0.1);
            check_against_composed(
                "label smoothing 0.1",
                &fused,
                &|x: &[Tensor]| composed_cross_entropy(&x[0], &ids, ignore, 0.1),
                std::slice::from_ref(&logits),
                1e-10,
            );
            let (loss64, grad64) = value_and_grads(&fused, std::slice::from_ref(&logits));
            let (loss32, grad32) = value_and_grads(&fused, &[logits.to_dtype(DType::F32).unwrap()]);
            assert_close("f32 loss", &loss32, &loss64, 1e-6, 0.0);
            let scale = grad64[0].abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            assert_close("f32 grad", &grad32[0], &grad64[0], 1e-5, 1e-6 * scale);
        }
    }

    /// PyTorch's value, so "label smoothing" means what it means there:
    /// `F.cross_entropy(x, [1, 4, 99, 0], ignore_index=99, label_smoothing=0.1)` in float64 for
    /// `x[n][j] = 3 sin(0.7 n + 1.3 j)`, and `x.grad` of its row 0 (torch 2.15).
    #[test]
    fn label_smoothing_matches_pytorch() {
        let x: Vec<f64> =
            (0..4).flat_map(|n| (0..5).map(move |j| 3.0 * (0.7 * n as f64 + 1.3 * j as f64).sin())).collect();
        let logits = candle_core::Var::from_vec(x, (4, 5), &Device::Cpu).unwrap();
        let loss = label_smoothed_cross_entropy(logits.as_tensor(), &targets(&[1, 4, 99, 0]), Some(99), 0.1).unwrap();
        assert!((loss.to_scalar::<f64>().unwrap() - 1.89598949223076).abs() < 1e-13);
        let grads = loss.backward().unwrap();
        let grad: Vec<Vec<f64>> = grads.get(logits.as_tensor()).unwrap().to_vec2().unwrap();
        let torch_row0 = [
            0.007281420729414424,
            -0.055525059783695464,
            0.058819996760370245,
            -0.004894781727911516,
            -0.005681575978177763,
        ];
        for (ours, theirs) in grad[0].iter().zip(torch_row0) {
            assert!((ours - theirs).abs() < 1e-15, "{:?}", grad[0]);
        }
        assert!(grad[2].iter().all(|&g| g == 0.0), "the ignored row gets no gradient");
        // Without smoothing, the plain loss (torch: 1.7529965359727475).
        let plain = softmax_cross_entropy(logits.as_tensor(), &targets(&[1, 4, 99, 0]), Some(99)).unwrap();
        assert!((plain.to_scalar::<f64>().unwrap() - 1.7529965359727475).abs() < 1e-13);
        assert!(label_smoothed_cross_entropy(logits.as_tensor(), &targets(&[1, 4, 99, 0]), None, 1.5).is_err());
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
