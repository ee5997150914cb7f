//! Rotary position embedding in the Hugging Face "rotate half" layout, fused: one pass that
//! reads `x` once and writes the output once, instead of narrow / neg / cat / two products /
//! add / cat.
//!
//! Per head row `x` (`hd` dims) at position `t`, the first `rot = 2·half` dims are rotated,
//! dim `i` paired with `i + half`; the rest pass through. With `c = cos[t]`, `s = sin[t]`
//! (`rot` entries each; in the usual tables `c[i] = c[i + half]`):
//!
//! ```text
//! forward (rotate by +θ)                | backward (rotate by −θ: the transpose)
//! y[i]      = x[i]·c[i] − x[i+h]·s[i]    | dx[i]      = g[i]·c[i] + g[i+h]·s[i+h]
//! y[i+h]    = x[i+h]·c[i+h] + x[i]·s[i+h]| dx[i+h]    = g[i+h]·c[i+h] − g[i]·s[i]
//! y[rot..]  = x[rot..]                   | dx[rot..]  = g[rot..]
//!                                        | dcos, dsin = Σ_{B,H} g∘x, g∘rotate_half(x)
//! ```
//!
//! (`h = half`.) The backward is the same kernel in "transposed" mode, itself an op whose
//! backward is the forward, so gradients of gradients work for `x`. Gradients for the tables are
//! computed (with composed ops) only when a table is itself tracked, which the model's are not.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};

use super::simd::{multiversion, Real};
use super::{compute_dtype, output_buffer, parallel, same_dtype, storage_slice};

/// Rotate the first `rot = 2·cos.dim(1)` dims of each head of `x` `(B, H, T, hd)` by the angles
/// whose cosines and sines are `cos`, `sin` `(T, rot)`, in the rotate-half layout; dims past
/// `rot` pass through (partial rotary, as Phi-2). Gradients flow to `x` (and to the tables if
/// they are tracked).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    check_tables(x, cos, sin)?;
    if !crate::nn::ops::route::uses_cpu_kernel(x.device()) {
        return composed_rope(x, cos, sin);
    }
    let dtype = x.dtype();
    let compute = compute_dtype("rope", dtype)?;
    let contiguous = |t: &Tensor| t.to_dtype(compute)?.contiguous();
    let (x, cos, sin) = (contiguous(x)?, contiguous(cos)?, contiguous(sin)?);
    x.apply_op3(&cos, &sin, RopeOp { transpose: false, token_major_heads: None })?.to_dtype(dtype)
}

/// `x` is `(B, H, T, hd)` and `cos`, `sin` are `(T, rot)` tables of one dtype, `rot` even and
/// at most `hd`.
pub(crate) fn check_tables(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<()> {
    let (_, _, t, hd) = x
        .dims4()
        .map_err(|_| candle_core::Error::Msg(format!("rope: x must be (B, H, T, head_dim), got {:?}", x.dims())))?;
    let rot = cos.dims().get(1).copied().unwrap_or(0);
    if cos.dims() != [t, rot] || sin.dims() != [t, rot] || rot % 2 != 0 || rot == 0 || rot > hd {
        return Err(candle_core::Error::UnexpectedShape {
            msg: format!(
                "rope: cos and sin must both be (T, rot) with T = {t} and rot even, 0 < rot ≤ head_dim = {hd} (sin is {:?})\nHINT: build them with Rope::tables for this step's positions",
                sin.dims()
            ),
            expected: Shape::from((t, rot)),
            got: cos.shape().clone(),
        });
    }
    same_dtype("rope", cos.dtype(), &[("sin", sin)])
}

/// [`rope`] on token-major `x` `(B, T, H·hd)`, as the q/k projections produce it, with heads
/// of `head_dim`: one autograd node instead of a reshape, a transpose and a copy around it.
pub fn rope_tokens(x: &Tensor, cos: &Tensor, sin: &Tensor, head_dim: usize) -> Result<Tensor> {
    let (b, t, width) = x
        .dims3()
        .map_err(|_| candle_core::Error::Msg(format!("rope: x must be (B, T, heads·head_dim), got {:?}", x.dims())))?;
    if head_dim == 0 || width % head_dim != 0 {
        bail!("rope: x has width {width}, not a multiple of head_dim {head_dim}")
    }
    let heads = width / head_dim;
    // Shapes and dtypes are checked on the head-major view.
    let view = x.reshape((b, t, heads, head_dim))?.transpose(1, 2)?;
    if !crate::nn::ops::route::uses_cpu_kernel(x.device()) {
        return rope(&view, cos, sin)?.transpose(1, 2)?.reshape((b, t, width));
    }
    check_tables(&view, cos, sin)?;
    let dtype = x.dtype();
    let compute = compute_dtype("rope", dtype)?;
    let contiguous = |t: &Tensor| t.to_dtype(compute)?.contiguous();
    let (x, cos, sin) = (contiguous(x)?, contiguous(cos)?, contiguous(sin)?);
    x.apply_op3(&cos, &sin, RopeOp { transpose: false, token_major_heads: Some(heads) })?.to_dtype(dtype)
}

/// Rotate-half RoPE from composed ops (the reference, and the path for other devices).
pub fn composed_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (rot, hd) = (cos.dim(1)?, x.dim(D::Minus1)?);
    let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
    let x_rot = x.narrow(D::Minus1, 0, rot)?;
    let out = (x_rot.broadcast_mul(&cos)? + rotate_half(&x_rot)?.broadcast_mul(&sin)?)?;
    if rot == hd {
        Ok(out)
    } else {
        Tensor::cat(&[&out, &x.narrow(D::Minus1, rot, hd - rot)?], D::Minus1)
    }
}

/// `(x1, x2) → (−x2, x1)` over the last dim.
fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    Tensor::cat(&[&x.narrow(D::Minus1, half, half)?.neg()?, &x.narrow(D::Minus1, 0, half)?], D::Minus1)
}

/// The rotation (`transpose == false`) or its transpose, the rotation by `−θ`.
struct RopeOp {
    transpose: bool,
    /// `Some(H)` for token-major `x` `(B, T, H·hd)`; `None` for `(B, H, T, hd)`.
    token_major_heads: Option<usize>,
}

impl CustomOp3 for RopeOp {
    fn name(&self) -> &'static str {
        if self.transpose {
            "rope_backward"
        } else {
            "rope"
        }
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        cos: &CpuStorage,
        lc: &Layout,
        sin: &CpuStorage,
        ls: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(op: &RopeOp, inputs: [(&CpuStorage, &Layout); 3]) -> Result<CpuStorage> {
            let s = inputs
                .iter()
                .map(|(storage, layout)| storage_slice::<T>("rope", storage, layout))
                .collect::<Result<Vec<_>>>()?;
            let t = inputs[1].1.dims()[0];
            let dims = inputs[0].1.dims();
            // SAFETY: `rotate_rows` writes each of its rows whole, and the chunks cover `y`.
            let mut y = unsafe { output_buffer(s[0].len()) };
            if y.is_empty() {
                return Ok(T::to_cpu_storage_owned(y));
            }
            let (x, cos, sin) = (s[0], s[1], s[2]);
            // One task per (batch, head) of T rows, or per batch row of T·H rows (each table
            // row serving the H heads of one token).
            let (hd, rows_per_position) = match op.token_major_heads {
                Some(heads) => (dims[2] / heads, heads),
                None => (dims[3], 1),
            };
            let chunk = t * rows_per_position * hd;
            parallel::for_each_chunk(&mut y, chunk, |i, y| {
                rotate_rows(op.transpose, hd, rows_per_position, &x[i * chunk..][..y.len()], cos, sin, y);
            });
            Ok(T::to_cpu_storage_owned(y))
        }
        let inputs = [(x, lx), (cos, lc), (sin, ls)];
        let y = match x {
            CpuStorage::F32(_) => run::<f32>(self, inputs)?,
            CpuStorage::F64(_) => run::<f64>(self, inputs)?,
            _ => return Err(candle_core::Error::UnsupportedDTypeForOp(x.dtype(), "rope")),
        };
        Ok((y, lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.to_dtype(x.dtype())?.contiguous()?;
        let dx = grad.apply_op3(cos, sin, RopeOp { transpose: !self.transpose, ..*self })?;
        if self.transpose || !(cos.track_op() || sin.track_op()) {
            return Ok((Some(dx), None, None));
        }
        // The table gradients below read x and the gradient head-major.
        let (x, grad) = match self.token_major_heads {
            Some(heads) => {
                let (b, t, width) = x.dims3()?;
                let split = |y: &Tensor| y.reshape((b, t, heads, width / heads))?.transpose(1, 2);
                (split(x)?, split(&grad)?)
            }
            None => (x.clone(), grad),
        };
        // y = x∘c + rotate_half(x)∘s on the rotated dims, so the tables' gradients are these
        // products summed over batch and heads.
        let rot = cos.dim(1)?;
        let x_rot = x.narrow(D::Minus1, 0, rot)?;
        let g_rot = grad.narrow(D::Minus1, 0, rot)?;
        let dcos = (&g_rot * &x_rot)?.sum(0)?.sum(0)?;
        let dsin = (&g_rot * rotate_half(&x_rot)?)?.sum(0)?.sum(0)?;
        Ok((Some(dx), Some(dcos), Some(dsin)))
    }
}

multiversion! {
    /// `T·rows_per_position` rows of `hd`, the `rows_per_position` rows of position `t` using
    /// table row `t`: `x`, `y` `(T, rows_per_position, hd)`, `cos`, `sin` `(T, rot)`.
    pub(crate) fn rotate_rows<T: Real>(transpose: bool, hd: usize, rows_per_position: usize, x: &[T], cos: &[T], sin: &[T], y: &mut [T]) {
        let rot = cos.len() / (x.len() / (hd * rows_per_position));
        let half = rot / 2;
        let tables = cos.chunks_exact(rot).zip(sin.chunks_exact(rot)).flat_map(|cs| std::iter::repeat_n(cs, rows_per_position));
        for ((x, y), (c, s)) in x.chunks_exact(hd).zip(y.chunks_exact_mut(hd)).zip(tables) {
            let (x1, rest) = x.split_at(half);
            let (x2, pass) = rest.split_at(half);
            let (y1, rest) = y.split_at_mut(half);
            let (y2, y_pass) = rest.split_at_mut(half);
            let (c1, c2) = c.split_at(half);
            let (s1, s2) = s.split_at(half);
            if transpose {
                for i in 0..half {
                    y1[i] = x1[i] * c1[i] + x2[i] * s2[i];
                    y2[i] = x2[i] * c2[i] - x1[i] * s1[i];
                }
            } else {
                for i in 0..half {
                    y1[i] = x1[i] * c1[i] - x2[i] * s1[i];
                    y2[i] = x2[i] * c2[i] + x1[i] * s2[i];
                }
            }
            y_pass.copy_from_slice(pass);
        }
    }
}

/// The tables' gradients are computed only when requested; this lets tests ask for them.
#[cfg(test)]
fn tracked(t: &Tensor) -> Tensor {
    candle_core::Var::from_tensor(t).unwrap().as_tensor().clone()
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::nn::ops::testing::{check_against_composed, check_finite_differences, rand_tensor};
    use crate::nn::positions::Rope;

    fn tables(t: usize, rot: usize, dtype: DType) -> (Tensor, Tensor) {
        let (cos, sin) = Rope::new(10_000.0, rot, None).tables(3, t, &Device::Cpu).unwrap();
        (cos.to_dtype(dtype).unwrap(), sin.to_dtype(dtype).unwrap())
    }

    #[test]
    fn gradients_for_x_and_tables() {
        for (hd, rot) in [(6, 6), (10, 4)] {
            let x = rand_tensor(&[2, 3, 5, hd], 1, DType::F64);
            // Random (not rotation) tables make the table gradients distinguishable.
            let (cos, sin) = (rand_tensor(&[5, rot], 2, DType::F64), rand_tensor(&[5, rot], 3, DType::F64));
            let f = |x: &[Tensor]| rope(&x[0], &x[1], &x[2]);
            check_finite_differences(&f, &[x, tracked(&cos), tracked(&sin)], &[0, 1, 2], 1e-6);
        }
    }

    #[test]
    fn matches_composed_rope_and_the_model_layer() {
        for (hd, rot) in [(64, 64), (80, 32), (16, 8)] {
            let x = rand_tensor(&[2, 4, 33, hd], 4, DType::F32);
            let (cos, sin) = tables(33, rot, DType::F32);
            let f = |x: &[Tensor]| rope(&x[0], &x[1], &x[2]);
            let composed = |x: &[Tensor]| composed_rope(&x[0], &x[1], &x[2]);
            check_against_composed(
                &format!("hd {hd}, rot {rot}"),
                &f,
                &composed,
                &[x.clone(), cos.clone(), sin.clone()],
                1e-5,
            );
            let layer = Rope::new(10_000.0, rot, None).apply(&x, &cos, &sin).unwrap();
            crate::nn::ops::testing::assert_close("vs Rope::apply", &rope(&x, &cos, &sin).unwrap(), &layer, 1e-6, 1e-6);
        }
    }

    #[test]
    fn token_major_matches_head_major() {
        let (b, t, h, hd) = (2, 7, 3, 8);
        let x = rand_tensor(&[b, t, h * hd], 8, DType::F64);
        let (cos, sin) = (rand_tensor(&[t, 6], 2, DType::F64), rand_tensor(&[t, 6], 3, DType::F64));
        let tokens = |x: &[Tensor]| rope_tokens(&x[0], &x[1], &x[2], hd);
        let heads = |x: &[Tensor]| {
            let view = x[0].reshape((b, t, h, hd))?.transpose(1, 2)?;
            rope(&view, &x[1], &x[2])?.transpose(1, 2)?.reshape((b, t, h * hd))
        };
        check_finite_differences(&tokens, &[x.clone(), tracked(&cos), tracked(&sin)], &[0, 1, 2], 1e-6);
        let inputs = [x, tracked(&cos), tracked(&sin)];
        let (want, want_grads) = crate::nn::ops::testing::value_and_grads(&heads, &inputs);
        let (got, got_grads) = crate::nn::ops::testing::value_and_grads(&tokens, &inputs);
        crate::nn::ops::testing::assert_close("value", &got, &want, 1e-12, 1e-12);
        for (g, w) in got_grads.iter().zip(&want_grads) {
            crate::nn::ops::testing::assert_close("grad", g, w, 1e-12, 1e-12);
        }
        assert!(rope_tokens(&inputs[0], &inputs[1], &inputs[2], 5).is_err());
    }

    #[test]
    fn non_contiguous_input() {
        // q as the model produces it: (B, T, H, hd) transposed to (B, H, T, hd).
        let x = rand_tensor(&[2, 9, 3, 8], 6, DType::F32).transpose(1, 2).unwrap();
        assert!(!x.is_contiguous());
        let (cos, sin) = tables(9, 8, DType::F32);
        let fused = rope(&x, &cos, &sin).unwrap();
        crate::nn::ops::testing::assert_close("view", &fused, &composed_rope(&x, &cos, &sin).unwrap(), 1e-6, 1e-6);
    }

    #[test]
    fn backward_is_rotation_by_minus_angle() {
        // Rotating by θ then by −θ is the identity (up to the f32 rounding of the tables).
        let x = rand_tensor(&[1, 2, 9, 8], 5, DType::F64);
        let (cos, sin) = tables(9, 8, DType::F64);
        let back = rope(&x, &cos, &sin)
            .unwrap()
            .apply_op3(&cos, &sin, RopeOp { transpose: true, token_major_heads: None })
            .unwrap();
        crate::nn::ops::testing::assert_close("round trip", &back, &x, 1e-6, 1e-6);
    }

    #[test]
    fn bad_tables_are_errors() {
        let x = rand_tensor(&[1, 2, 9, 8], 5, DType::F32);
        let (cos, sin) = tables(9, 8, DType::F32);
        assert!(rope(&x, &cos.narrow(0, 0, 8).unwrap(), &sin).is_err());
        assert!(rope(&x.narrow(3, 0, 6).unwrap(), &cos, &sin).is_err()); // rot > hd
        assert!(rope(&x.flatten_all().unwrap(), &cos, &sin).is_err());
        assert!(rope(&x, &cos.narrow(1, 0, 3).unwrap(), &sin.narrow(1, 0, 3).unwrap()).is_err()); // odd rot
        assert!(rope(&x, &cos, &sin.to_dtype(DType::F64).unwrap()).is_err());
        // No tokens: an empty result, not a panic.
        let empty =
            rope(&x.narrow(2, 0, 0).unwrap(), &cos.narrow(0, 0, 0).unwrap(), &sin.narrow(0, 0, 0).unwrap()).unwrap();
        assert_eq!(empty.dims(), &[1, 2, 0, 8]);
    }
}
