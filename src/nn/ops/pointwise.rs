//! Fused pointwise activations: SwiGLU's `silu(gate)·up` and the two GELUs, each one pass
//! forward and one pass backward (the composed versions write and keep 3–8 temporaries).
//!
//! ```text
//! forward                                   | backward (upstream gradient g)
//! swiglu:  y = a·σ(a) · u                   | da = g · u · σ(a)·(1 + a·(1 − σ(a)))
//!                                           | du = g · a·σ(a)
//! gelu_tanh: k = √(2/π)·(x + 0.044715·x³)   |
//!          y = x·σ(2k)  (= ½x(1 + tanh k))  | dx = g · (σ(2k) + x·σ(2k)(1 − σ(2k))·2k'),
//!                                           |      k' = √(2/π)·(1 + 3·0.044715·x²)
//! gelu_erf:  y = x·Φ(x),                    | dx = g · (Φ(x) + x·φ(x)),
//!          Φ(x) = ½(1 + erf(x/√2))          |      φ(x) = e^(−x²/2)/√(2π)
//! ```
//!
//! `σ(2k)` replaces `½(1 + tanh k)` (the same function) because it has no cancellation for
//! large negative `x`, where `1 + tanh k` loses every digit.
//!
//! The backward is itself fused but has no backward of its own (no second derivatives).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Result, Shape, Tensor};

use super::simd::{multiversion, Real};
use super::{compute_dtype, output_buffer, parallel, same_dtype, with_slices};

/// Elements per parallel task.
const CHUNK: usize = parallel::TASK_ELEMENTS;

/// `silu(gate) · up`, the gated FFN's hidden activation (Llama, Mistral). Same shapes.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() {
        return Err(candle_core::Error::UnexpectedShape {
            msg: "swiglu: up must have the shape of gate".into(),
            expected: gate.shape().clone(),
            got: up.shape().clone(),
        });
    }
    same_dtype("swiglu", gate.dtype(), &[("up", up)])?;
    if !crate::nn::ops::route::uses_cpu_kernel(gate.device()) {
        return gate.silu()? * up;
    }
    let dtype = gate.dtype();
    let compute = compute_dtype("swiglu", dtype)?;
    let (gate, up) = (gate.to_dtype(compute)?.contiguous()?, up.to_dtype(compute)?.contiguous()?);
    gate.apply_op2(&up, Swiglu)?.to_dtype(dtype)
}

/// GELU with the tanh approximation (`gelu_new`, GPT-2).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    activation(x, Act::GeluTanh)
}

/// Exact GELU, `x·Φ(x)` (BERT, Phi-2's `gelu`).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    activation(x, Act::GeluErf)
}

fn activation(x: &Tensor, act: Act) -> Result<Tensor> {
    if !crate::nn::ops::route::uses_cpu_kernel(x.device()) {
        return match act {
            Act::GeluTanh => x.gelu(),
            Act::GeluErf => x.gelu_erf(),
        };
    }
    let dtype = x.dtype();
    let compute = compute_dtype(act.name(), dtype)?;
    x.to_dtype(compute)?.contiguous()?.apply_op1(Activation { act })?.to_dtype(dtype)
}

/// The activation a linear layer applies to its own output inside the op
/// ([`super::linear_then`]), saving the activation's separate autograd node and the
/// zero-fill and add of its input's gradient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Epilogue {
    GeluTanh,
    GeluErf,
    /// `silu(a)·u` of the two halves `[a | u]` of each row (the gate and up projections
    /// stacked): the output has half the width.
    SwiGlu,
}

impl Epilogue {
    /// Output columns for `width` pre-activation columns.
    pub fn width(self, width: usize) -> usize {
        match self {
            Epilogue::SwiGlu => width / 2,
            _ => width,
        }
    }

    /// The same from candle ops and this module's ops (the reference, and other devices).
    pub fn composed(self, h: &Tensor) -> Result<Tensor> {
        match self {
            Epilogue::GeluTanh => gelu_tanh(h),
            Epilogue::GeluErf => gelu_erf(h),
            Epilogue::SwiGlu => {
                let half = h.dim(candle_core::D::Minus1)? / 2;
                swiglu(&h.narrow(candle_core::D::Minus1, 0, half)?, &h.narrow(candle_core::D::Minus1, half, half)?)
            }
        }
    }

    /// `y = epilogue(h)` for `h` of rows of `width`.
    pub(crate) fn forward<T: Real>(self, h: &[T], width: usize) -> Vec<T> {
        match self {
            Epilogue::GeluTanh => map(h, |x, y| act_forward(Act::GeluTanh, x, y)),
            Epilogue::GeluErf => map(h, |x, y| act_forward(Act::GeluErf, x, y)),
            Epilogue::SwiGlu => {
                let (half, rows) = (width / 2, parallel::rows_per_task(width));
                // SAFETY: every task writes its rows whole.
                let mut y = unsafe { output_buffer(h.len() / 2) };
                parallel::for_each_chunk(&mut y, rows * half, |i, y| {
                    for (y, h) in y.chunks_exact_mut(half).zip(h[i * rows * width..].chunks_exact(width)) {
                        swiglu_forward(&h[..half], &h[half..], y);
                    }
                });
                y
            }
        }
    }

    /// `dh` from `h` and the output's gradient `g`.
    pub(crate) fn backward<T: Real>(self, h: &[T], g: &[T], width: usize) -> Vec<T> {
        match self {
            Epilogue::GeluTanh => map2(h, g, |x, g, d| act_backward(Act::GeluTanh, x, g, d)),
            Epilogue::GeluErf => map2(h, g, |x, g, d| act_backward(Act::GeluErf, x, g, d)),
            Epilogue::SwiGlu => {
                let (half, rows) = (width / 2, parallel::rows_per_task(width));
                // SAFETY: every task writes its rows whole.
                let mut dh = unsafe { output_buffer(h.len()) };
                parallel::for_each_chunk(&mut dh, rows * width, |i, dh| {
                    let (h, g) = (&h[i * rows * width..], &g[i * rows * half..]);
                    for ((dh, h), g) in dh.chunks_exact_mut(width).zip(h.chunks_exact(width)).zip(g.chunks_exact(half))
                    {
                        let (da, du) = dh.split_at_mut(half);
                        swiglu_backward(&h[..half], &h[half..], g, da, du);
                    }
                });
                dh
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Act {
    GeluTanh,
    GeluErf,
}

impl Act {
    fn name(self) -> &'static str {
        match self {
            Act::GeluTanh => "gelu_tanh",
            Act::GeluErf => "gelu_erf",
        }
    }
}

/// `√(2/π)` and GELU-tanh's cubic coefficient.
const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_C: f64 = 0.044_715;

struct Activation {
    act: Act,
}

impl CustomOp1 for Activation {
    fn name(&self) -> &'static str {
        self.act.name()
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("{}: internal error, input is not contiguous", self.name())
        };
        let y = match x {
            CpuStorage::F32(x) => CpuStorage::F32(map(&x[start..end], |x, y| act_forward(self.act, x, y))),
            CpuStorage::F64(x) => CpuStorage::F64(map(&x[start..end], |x, y| act_forward(self.act, x, y))),
            _ => return Err(candle_core::Error::UnsupportedDTypeForOp(x.dtype(), self.name())),
        };
        Ok((y, layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.to_dtype(x.dtype())?;
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &ActivationBackward { act: self.act })?))
    }
}

/// `(x, g) → g · act'(x)`.
struct ActivationBackward {
    act: Act,
}

impl CustomOp2 for ActivationBackward {
    fn name(&self) -> &'static str {
        "activation_backward"
    }

    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout, g: &CpuStorage, lg: &Layout) -> Result<(CpuStorage, Shape)> {
        let (Some((xs, xe)), Some((gs, ge))) = (lx.contiguous_offsets(), lg.contiguous_offsets()) else {
            bail!("{}: internal error, input is not contiguous", self.act.name())
        };
        let dx = match (x, g) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => {
                CpuStorage::F32(map2(&x[xs..xe], &g[gs..ge], |x, g, d| act_backward(self.act, x, g, d)))
            }
            (CpuStorage::F64(x), CpuStorage::F64(g)) => {
                CpuStorage::F64(map2(&x[xs..xe], &g[gs..ge], |x, g, d| act_backward(self.act, x, g, d)))
            }
            _ => return Err(candle_core::Error::UnsupportedDTypeForOp(x.dtype(), self.act.name())),
        };
        Ok((dx, lx.shape().clone()))
    }
}

struct Swiglu;

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, a: &CpuStorage, la: &Layout, u: &CpuStorage, lu: &Layout) -> Result<(CpuStorage, Shape)> {
        let (Some((as_, ae)), Some((us, ue))) = (la.contiguous_offsets(), lu.contiguous_offsets()) else {
            bail!("swiglu: internal error, input is not contiguous")
        };
        let y = match (a, u) {
            (CpuStorage::F32(a), CpuStorage::F32(u)) => CpuStorage::F32(map2(&a[as_..ae], &u[us..ue], swiglu_forward)),
            (CpuStorage::F64(a), CpuStorage::F64(u)) => CpuStorage::F64(map2(&a[as_..ae], &u[us..ue], swiglu_forward)),
            _ => return Err(candle_core::Error::UnsupportedDTypeForOp(a.dtype(), "swiglu")),
        };
        Ok((y, la.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        fn run<T: Real>(gate: &Tensor, up: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
            let (da, du) = with_slices::<T, _>("swiglu", &[gate, up, grad], |s| {
                // SAFETY (both): `swiglu_backward` writes its chunks whole, which cover them.
                let mut da = unsafe { output_buffer(s[0].len()) };
                let mut du = unsafe { output_buffer(s[0].len()) };
                parallel::for_each_chunk2(&mut da, CHUNK, &mut du, CHUNK, |i, da, du| {
                    let part = i * CHUNK..i * CHUNK + da.len();
                    swiglu_backward(&s[0][part.clone()], &s[1][part.clone()], &s[2][part], da, du)
                });
                Ok((da, du))
            })?;
            Ok((Tensor::from_vec(da, gate.shape(), &Device::Cpu)?, Tensor::from_vec(du, gate.shape(), &Device::Cpu)?))
        }
        let grad = grad.to_dtype(gate.dtype())?;
        let (da, du) = match gate.dtype() {
            DType::F32 => run::<f32>(gate, up, &grad)?,
            DType::F64 => run::<f64>(gate, up, &grad)?,
            other => return Err(candle_core::Error::UnsupportedDTypeForOp(other, "swiglu")),
        };
        Ok((Some(da), Some(du)))
    }
}

/// Apply an element-wise chunk kernel `f(x, y)` in parallel.
fn map<T: Real>(x: &[T], f: impl Fn(&[T], &mut [T]) + Sync) -> Vec<T> {
    // SAFETY: every chunk kernel writes its chunk whole (each is an elementwise map).
    let mut y = unsafe { output_buffer(x.len()) };
    parallel::for_each_chunk(&mut y, CHUNK, |i, y| f(&x[i * CHUNK..][..y.len()], y));
    y
}

/// Apply an element-wise chunk kernel `f(a, b, y)` in parallel.
fn map2<T: Real>(a: &[T], b: &[T], f: impl Fn(&[T], &[T], &mut [T]) + Sync) -> Vec<T> {
    // SAFETY: every chunk kernel writes its chunk whole (each is an elementwise map).
    let mut y = unsafe { output_buffer(a.len()) };
    parallel::for_each_chunk(&mut y, CHUNK, |i, y| f(&a[i * CHUNK..][..y.len()], &b[i * CHUNK..][..y.len()], y));
    y
}

multiversion! {
    fn act_forward<T: Real>(act: Act, x: &[T], y: &mut [T]) {
        match act {
            Act::GeluTanh => {
                let (c0, c1) = (T::of(2.0 * SQRT_2_OVER_PI), T::of(2.0 * SQRT_2_OVER_PI * GELU_C));
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = x * (x * (c0 + c1 * x * x)).sigmoid(); // x·σ(2k)
                }
            }
            Act::GeluErf => {
                let inv_sqrt2 = T::of(std::f64::consts::FRAC_1_SQRT_2);
                let half = T::of(0.5);
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = half * x * (T::ONE + (x * inv_sqrt2).erf());
                }
            }
        }
    }
}

multiversion! {
    fn act_backward<T: Real>(act: Act, x: &[T], g: &[T], dx: &mut [T]) {
        match act {
            Act::GeluTanh => {
                let (c0, c1) = (T::of(2.0 * SQRT_2_OVER_PI), T::of(2.0 * SQRT_2_OVER_PI * GELU_C));
                let c1x3 = T::of(3.0) * c1;
                for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
                    let s = (x * (c0 + c1 * x * x)).sigmoid(); // σ(2k)
                    let dk2 = c0 + c1x3 * x * x; // (2k)'
                    *dx = g * (s + x * s * (T::ONE - s) * dk2);
                }
            }
            Act::GeluErf => {
                let inv_sqrt2 = T::of(std::f64::consts::FRAC_1_SQRT_2);
                let inv_sqrt_2pi = T::of(0.398_942_280_401_432_7);
                let half = T::of(0.5);
                for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
                    let cdf = half * (T::ONE + (x * inv_sqrt2).erf());
                    let pdf = inv_sqrt_2pi * (-half * x * x).exp();
                    *dx = g * (cdf + x * pdf);
                }
            }
        }
    }
}

multiversion! {
    fn swiglu_forward<T: Real>(a: &[T], u: &[T], y: &mut [T]) {
        for ((y, &a), &u) in y.iter_mut().zip(a).zip(u) {
            *y = a * a.sigmoid() * u;
        }
    }
}

multiversion! {
    fn swiglu_backward<T: Real>(a: &[T], u: &[T], g: &[T], da: &mut [T], du: &mut [T]) {
        for ((((da, du), &a), &u), &g) in da.iter_mut().zip(du.iter_mut()).zip(a).zip(u).zip(g) {
            let s = a.sigmoid();
            *da = g * u * s * (T::ONE + a * (T::ONE - s));
            *du = g * a * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Tensor};

    use super::*;
    use crate::nn::ops::testing::{check_against_composed, check_finite_differences, rand_tensor};

    fn wide(dims: &[usize], seed: u64, dtype: DType) -> Tensor {
        // Spread over [-8, 8] to reach both tails.
        rand_tensor(dims, seed, dtype).affine(8.0, 0.0).unwrap()
    }

    #[test]
    fn gradients_match_finite_differences() {
        let x = wide(&[3, 11], 1, DType::F64);
        let u = wide(&[3, 11], 2, DType::F64);
        check_finite_differences(&|x: &[Tensor]| gelu_tanh(&x[0]), std::slice::from_ref(&x), &[0], 1e-6);
        check_finite_differences(&|x: &[Tensor]| gelu_erf(&x[0]), std::slice::from_ref(&x), &[0], 1e-6);
        check_finite_differences(&|x: &[Tensor]| swiglu(&x[0], &x[1]), &[x, u], &[0, 1], 1e-6);
    }

    #[test]
    fn match_composed_ops() {
        // 40_000 elements: several parallel chunks and a ragged last one.
        let x = wide(&[8, 5000], 3, DType::F32);
        let u = wide(&[8, 5000], 4, DType::F32);
        check_against_composed(
            "gelu_tanh",
            &|x: &[Tensor]| gelu_tanh(&x[0]),
            &|x: &[Tensor]| x[0].gelu(),
            std::slice::from_ref(&x),
            1e-5,
        );
        check_against_composed(
            "gelu_erf",
            &|x: &[Tensor]| gelu_erf(&x[0]),
            &|x: &[Tensor]| x[0].gelu_erf(),
            std::slice::from_ref(&x),
            1e-5,
        );
        check_against_composed(
            "swiglu",
            &|x: &[Tensor]| swiglu(&x[0], &x[1]),
            &|x: &[Tensor]| x[0].silu()? * &x[1],
            &[x, u],
            1e-5,
        );
    }

    #[test]
    fn shape_mismatch_is_an_error() {
        let x = wide(&[2, 3], 1, DType::F32);
        assert!(swiglu(&x, &x.t().unwrap()).is_err());
        assert!(swiglu(&x, &x.to_dtype(DType::F64).unwrap()).is_err());
        assert!(gelu_erf(&x.to_dtype(DType::U8).unwrap()).is_err());
    }
}
