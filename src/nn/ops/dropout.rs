//! Dropout whose mask is a function of a seed and the element's index, never stored.
//!
//! ```text
//! forward                                   | backward (upstream gradient g)
//! z_i = [hash(seed, i) ≥ p·2³²] / (1 − p)   | dx_i = g_i · z_i     (z recomputed from seed)
//! y_i = x_i · z_i                           |
//! ```
//!
//! Why counter-based: the mask of element `i` is `hash(seed, i)`, so the backward recomputes
//! it instead of keeping a mask tensor alive, threads draw it in any order, and the flash
//! attention kernel drops attention probabilities tile by tile with the same rule
//! ([`DropoutMask::keeps`] at index `((b·H + h)·T + i)·S + j`) without ever holding the
//! `T × S` matrix. The caller draws one seed per dropout site from the run's random stream, so
//! a resumed run that restores that stream draws the same masks.
//!
//! The hash is SplitMix64's output function at counter `i` (a full-period, well-mixed 64-bit
//! mix; its top 32 bits are compared with `p·2³²`), so a drop probability is exact to 2⁻³².

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::simd::{multiversion, Real};
use super::{compute_dtype, output_buffer, parallel};

/// Which elements a dropout call keeps, and the factor kept ones are scaled by.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropoutMask {
    /// Drawn once per call site from the run's random stream.
    pub seed: u64,
    /// An element is dropped when the top 32 bits of its hash are below this.
    threshold: u32,
    /// `1 / (1 − p)`, so the expected value of each element is unchanged.
    scale: f64,
}

impl DropoutMask {
    /// Drop each element with probability `p` (`0 ≤ p < 1`).
    pub fn new(p: f64, seed: u64) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            bail!("dropout: probability {p} is outside 0 <= p < 1")
        }
        let threshold = (p * 4_294_967_296.0).round().min(u32::MAX as f64) as u32;
        Ok(DropoutMask { seed, threshold, scale: 1.0 / (1.0 - p) })
    }

    /// Whether element `index` is kept.
    #[inline(always)]
    pub fn keeps(&self, index: u64) -> bool {
        let mut z = self.seed.wrapping_add(index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 32) as u32 >= self.threshold
    }

    /// `1 / (1 − p)`.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// The mask factor `z` of element `index`: the scale when kept, 0 when dropped.
    #[inline(always)]
    pub fn factor<T: Real>(&self, index: u64, scale: T) -> T {
        if self.keeps(index) {
            scale
        } else {
            T::ZERO
        }
    }

    /// The factors of elements `0..n` as an f32 tensor of `shape` (the composed reference,
    /// and the path for other devices).
    pub fn factors(&self, shape: &[usize], device: &candle_core::Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let scale = self.scale as f32;
        Tensor::from_vec((0..n as u64).map(|i| self.factor(i, scale)).collect::<Vec<f32>>(), shape, device)
    }
}

/// `x` with each element zeroed with probability `p` and the rest scaled by `1 / (1 − p)`, the
/// mask given by `seed` (see the module doc). `p = 0` returns `x` itself. Gradients flow to `x`.
pub fn dropout(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    let mask = DropoutMask::new(p, seed)?;
    if p == 0.0 {
        return Ok(x.clone());
    }
    if !crate::nn::ops::route::uses_cpu_kernel(x.device()) {
        return x.broadcast_mul(&mask.factors(x.dims(), x.device())?.to_dtype(x.dtype())?);
    }
    let dtype = x.dtype();
    let compute = compute_dtype("dropout", dtype)?;
    x.to_dtype(compute)?.contiguous()?.apply_op1(Dropout { mask })?.to_dtype(dtype)
}

#[derive(Clone)]
struct Dropout {
    mask: DropoutMask,
}

multiversion! {
    /// `y[i] = x[i]·z(first + i)` for one chunk.
    fn apply_chunk<T: Real>(mask: &DropoutMask, first: u64, x: &[T], y: &mut [T]) {
        let scale = T::of(mask.scale);
        for (i, (y, &x)) in y.iter_mut().zip(x).enumerate() {
            *y = x * mask.factor(first + i as u64, scale);
        }
    }
}

impl Dropout {
    fn run<T: Real>(&self, x: &[T]) -> Vec<T> {
        // SAFETY: every task writes its chunk whole.
        let mut y = unsafe { output_buffer(x.len()) };
        let chunk = parallel::TASK_ELEMENTS;
        parallel::for_each_chunk(&mut y, chunk, |i, y| {
            apply_chunk(&self.mask, (i * chunk) as u64, &x[i * chunk..][..y.len()], y)
        });
        y
    }
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "dropout"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let shape = layout.shape().clone();
        let out = match storage {
            CpuStorage::F32(_) => CpuStorage::F32(self.run(super::storage_slice::<f32>("dropout", storage, layout)?)),
            CpuStorage::F64(_) => CpuStorage::F64(self.run(super::storage_slice::<f64>("dropout", storage, layout)?)),
            other => return Err(candle_core::Error::UnsupportedDTypeForOp(other.dtype(), "dropout")),
        };
        Ok((out, shape))
    }

    /// The op is linear in `x`: its gradient is the same mask applied to `g`.
    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        grad.contiguous()?.apply_op1(self.clone()).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::nn::ops::testing::{check_against_composed, check_finite_differences, rand_tensor};

    #[test]
    fn keeps_about_one_minus_p_and_scales_the_rest() {
        let x = Tensor::ones(200_000, DType::F32, &Device::Cpu).unwrap();
        let y: Vec<f32> = dropout(&x, 0.1, 42).unwrap().to_vec1().unwrap();
        let kept = y.iter().filter(|&&v| v != 0.0).count() as f64 / y.len() as f64;
        assert!((kept - 0.9).abs() < 0.005, "kept {kept}");
        assert!(y.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.9).abs() < 1e-6));
        // Another seed, another mask; the same seed, the same mask.
        let again: Vec<f32> = dropout(&x, 0.1, 42).unwrap().to_vec1().unwrap();
        let other: Vec<f32> = dropout(&x, 0.1, 43).unwrap().to_vec1().unwrap();
        assert_eq!(y, again);
        assert_ne!(y, other);
    }

    #[test]
    fn zero_probability_is_the_identity_and_bad_probabilities_are_errors() {
        let x = rand_tensor(&[3, 5], 1, DType::F32);
        let y = dropout(&x, 0.0, 9).unwrap();
        crate::nn::ops::testing::assert_close("p = 0", &y, &x, 0.0, 0.0);
        for p in [1.0, -0.1, f64::NAN] {
            assert!(dropout(&x, p, 1).is_err(), "p = {p}");
        }
    }

    #[test]
    fn gradients_match_finite_differences_and_the_composed_mask() {
        let x = rand_tensor(&[4, 37], 2, DType::F64);
        check_finite_differences(&|t: &[Tensor]| dropout(&t[0], 0.3, 5), &[x], &[0], 1e-8);
        // A size over several parallel chunks, against x · (mask tensor).
        let x = rand_tensor(&[3, 20_000], 3, DType::F32);
        let mask = DropoutMask::new(0.25, 11).unwrap();
        let composed = |t: &[Tensor]| t[0].mul(&mask.factors(t[0].dims(), &Device::Cpu)?);
        check_against_composed("dropout", &|t: &[Tensor]| dropout(&t[0], 0.25, 11), &composed, &[x], 1e-6);
    }
}
