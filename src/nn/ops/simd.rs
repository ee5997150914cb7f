//! The numeric layer under the fused kernels: one float trait for `f32`/`f64`, math functions
//! the compiler can vectorise, and runtime dispatch to AVX-512 / AVX2+FMA code.
//!
//! Why dispatch at runtime: the crate is built for the baseline x86-64 target (SSE2, no FMA),
//! so plain Rust loops compile to 4-wide SSE. [`multiversion!`] compiles a kernel entry point
//! a second and third time inside functions with `#[target_feature(enable = "avx512f,…")]` /
//! `"avx2,fma"`; every helper is `#[inline(always)]`, so the whole body is compiled for the
//! wide registers, and the entry point picks one by [`isa`] at run time.
//! On other architectures (or old x86) the same code runs unchanged; there `mul_add` may be a
//! libm call on x86 CPUs without FMA (pre-2013): correct, several times slower.
//! `LMFORGE_ISA=avx2` or `=baseline` forces a narrower path, to test or compare them.

use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

use candle_core::WithDType;

/// `f32` or `f64`: what every kernel is generic over.
pub trait Real:
    WithDType
    + Default
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    /// Columns per register block in [`super::tile`]'s micro-kernel: four 512-bit registers.
    const BLOCK: usize;

    fn of(x: f64) -> Self;
    /// `self * a + b`; one instruction where FMA is enabled.
    fn mul_add(self, a: Self, b: Self) -> Self;
    /// `e^self`. For `f32` a branch-free polynomial (≤ 2 ulp) that vectorises; `f64` uses libm.
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn erf(self) -> Self;
    /// Branch-free maximum (a select, so it vectorises; NaN in `other` is ignored).
    #[inline(always)]
    fn maximum(self, other: Self) -> Self {
        if other > self {
            other
        } else {
            self
        }
    }
    /// `1 / (1 + e^-self)`.
    #[inline(always)]
    fn sigmoid(self) -> Self {
        Self::ONE / (Self::ONE + (-self).exp())
    }
    /// The same values as `f32`, when `Self` is `f32`: how generic kernels reach code that
    /// exists for `f32` only (the bf16 products of flash attention).
    fn as_f32(values: &[Self]) -> Option<&[f32]>;
    /// [`Real::as_f32`] for writing.
    fn as_f32_mut(values: &mut [Self]) -> Option<&mut [f32]>;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INFINITY: Self = f32::NEG_INFINITY;
    const BLOCK: usize = 64;

    fn as_f32(values: &[Self]) -> Option<&[f32]> {
        Some(values)
    }
    fn as_f32_mut(values: &mut [Self]) -> Option<&mut [f32]> {
        Some(values)
    }

    #[inline(always)]
    fn of(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        f32::mul_add(self, a, b)
    }
    #[inline(always)]
    fn exp(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f32::ln(self)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn erf(self) -> Self {
        candle_core::cpu::erf::erf_f32(self)
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INFINITY: Self = f64::NEG_INFINITY;
    const BLOCK: usize = 32;

    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
    fn as_f32_mut(_: &mut [Self]) -> Option<&mut [f32]> {
        None
    }

    #[inline(always)]
    fn of(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        f64::mul_add(self, a, b)
    }
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f64::ln(self)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    #[inline(always)]
    fn erf(self) -> Self {
        candle_core::cpu::erf::erf_f64(self)
    }
}

/// `e^x` for `f32` without a libm call, so loops over it vectorise (libm's `expf` is a scalar
/// call and would dominate softmax). Cephes' `expf`: `x = n·ln2 + r` with `|r| ≤ ln2/2`, a
/// degree-6 polynomial for `e^r`, and `2^n` built in the exponent bits. Relative error ≤ 2 ulp
/// on `[-87, 88]`; below `-87` it returns 0 (true value < 1.7e-38), above 88 it returns `+inf`
/// (true overflow is at 88.72), NaN stays NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LO: f32 = -87.0;
    const HI: f32 = 88.0;
    // 1.5·2^23: adding it rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(LO, HI);
    let t = xc.mul_add(std::f32::consts::LOG2_E, ROUND);
    let n = t - ROUND;
    // ln 2 split in two so that `n·ln2` is exact in the first part (Cody–Waite).
    let r = n.mul_add(-0.693_359_4, xc);
    let r = n.mul_add(2.121_944_4e-4, r);
    let z = r * r;
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let y = p.mul_add(z, r) + 1.0;
    let n_int = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let scale = f32::from_bits(((n_int + 127) << 23) as u32);
    let e = y * scale;
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        e
    }
}

/// Lanes `0..n` of a 16-lane AVX-512 mask (all 16 from `n = 16` on): the edge of a row that
/// does not fill a register.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub fn mask16(n: usize) -> std::arch::x86_64::__mmask16 {
    if n >= 16 {
        0xFFFF
    } else {
        (1u16 << n) - 1
    }
}

/// Which instruction set [`multiversion!`] compiles kernels for on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2Fma,
    Baseline,
}

/// Detected once; `LMFORGE_ISA=baseline|avx2` forces a narrower path (for comparing them).
pub fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        let forced = std::env::var("LMFORGE_ISA").ok();
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            let avx512 = avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512bw");
            match forced.as_deref() {
                Some("baseline") => Isa::Baseline,
                Some("avx2") if avx2 => Isa::Avx2Fma,
                _ if avx512 => Isa::Avx512,
                _ if avx2 => Isa::Avx2Fma,
                _ => Isa::Baseline,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = forced;
            Isa::Baseline
        }
    })
}

/// Define a kernel entry point `fn name<T: Real>(args) -> R` compiled three times (AVX-512,
/// AVX2+FMA, baseline) and dispatched on [`isa`] at each call. The body and everything it calls
/// must be `#[inline(always)]` so the wide code reaches them (a closure handed to a
/// `#[target_feature]` function is not reliably inlined, and then its `mul_add`s become libm
/// calls: measured 0.3 GFLOP/s instead of ~60).
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident<$t:ident: Real>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name<$t: $crate::nn::ops::simd::Real>($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn portable<$t: $crate::nn::ops::simd::Real>($($arg: $ty),*) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
            #[allow(clippy::too_many_arguments)]
            fn avx512<$t: $crate::nn::ops::simd::Real>($($arg: $ty),*) $(-> $ret)? {
                portable::<$t>($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
            #[allow(clippy::too_many_arguments)]
            fn avx2<$t: $crate::nn::ops::simd::Real>($($arg: $ty),*) $(-> $ret)? {
                portable::<$t>($($arg),*)
            }

            match $crate::nn::ops::simd::isa() {
                // SAFETY: `isa()` checked that this CPU has the enabled features.
                #[cfg(target_arch = "x86_64")]
                $crate::nn::ops::simd::Isa::Avx512 => unsafe { avx512::<$t>($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                $crate::nn::ops::simd::Isa::Avx2Fma => unsafe { avx2::<$t>($($arg),*) },
                _ => portable::<$t>($($arg),*),
            }
        }
    };
}
pub(crate) use multiversion;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_matches_libm() {
        let mut worst = 0f64;
        for i in 0..200_001 {
            let x = -87.0 + 175.0 * i as f64 / 200_000.0;
            let got = exp_f32(x as f32) as f64;
            let want = (x as f32 as f64).exp();
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 3.0 * f32::EPSILON as f64, "worst relative error {worst}");
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(1000.0), f32::INFINITY);
    }
}
