//! The bf16 products against exact references, with error bounds derived from the formats:
//! bf16 keeps 8 significant bits, so rounding to it moves a value by at most `U = 2⁻⁸` of
//! itself (ties to even); an `f32` sum of `k` products moves by at most `k·2⁻²⁴` of the sum
//! of their magnitudes (the classic worst-case bound, ignoring second-order terms).

use std::cell::Cell;

use candle_core::{DType, Device, Tensor, Var};

use super::*;
use crate::nn::ops::gemm::{bf16_product, MatRef, Start};
use crate::nn::ops::linear::{composed_linear, linear, linear_then};
use crate::nn::ops::testing::{assert_close, rand_vec};
use crate::nn::ops::Epilogue;

/// Relative rounding error of bf16 (8 significant bits, round to nearest).
const U: f64 = 1.0 / 256.0;
/// Relative rounding error of f32.
const U32: f64 = 1.0 / (1u64 << 24) as f64;

thread_local! {
    /// The kernel [`kernel`] returns on this thread, when set by [`on_kernel`].
    pub(super) static FORCED: Cell<Option<Bf16Kernel>> = const { Cell::new(None) };
}

/// Run `f` with this thread's bf16 products on `kernel`.
pub(crate) fn on_kernel<R>(kernel: Bf16Kernel, f: impl FnOnce() -> R) -> R {
    let previous = FORCED.replace(Some(kernel));
    let out = f();
    FORCED.set(previous);
    out
}

/// The kernels this CPU runs. AVX512-BF16 missing is printed, and an error when
/// `LMFORGE_REQUIRE_AVX512_BF16=1` (CI on a machine that has it: a skipped kernel must not
/// pass silently there). Shared with the bf16 inference kernels' tests (`quant::bf16_rows`).
pub(crate) fn kernels_to_test() -> Vec<Bf16Kernel> {
    let mut kernels = vec![Bf16Kernel::F32];
    if avx512_bf16_available() {
        kernels.push(Bf16Kernel::Avx512Bf16);
    } else {
        assert!(
            std::env::var("LMFORGE_REQUIRE_AVX512_BF16").as_deref() != Ok("1"),
            "LMFORGE_REQUIRE_AVX512_BF16=1 but this CPU has no AVX512-BF16: its kernel is untested"
        );
        eprintln!("NOT EXERCISED: the AVX512-BF16 kernel (this CPU lacks AVX512-BF16); only the f32 path is tested");
    }
    if amx_bf16_present() {
        eprintln!("note: this CPU has AMX-BF16; lmforge has no AMX kernel, so none is tested");
    }
    kernels
}

#[test]
fn rounding_is_to_nearest_even_as_the_half_crate_does() {
    let cases: [(u32, u32); 7] = [
        (0x3F80_0000, 0x3F80_0000), // 1.0 is exact
        (0x3F80_8000, 0x3F80_0000), // tie, kept part even: down
        (0x3F81_8000, 0x3F82_0000), // tie, kept part odd: up
        (0x3F80_8001, 0x3F81_0000), // just above the tie: up
        (0x3F80_7FFF, 0x3F80_0000), // just below: down
        (0x7F7F_FFFF, 0x7F80_0000), // f32::MAX rounds past bf16's largest finite value: ∞
        (0xBF81_8000, 0xBF82_0000), // negative tie, odd: away from zero
    ];
    for (x, want) in cases {
        assert_eq!(round(f32::from_bits(x)).to_bits(), want, "{x:#010x}");
    }
    assert!(round(f32::NAN).is_nan());
    // A NaN whose payload lives only in the dropped bits must not become ∞.
    assert!(round(f32::from_bits(0x7F80_0001)).is_nan());
    assert_eq!(round(f32::INFINITY), f32::INFINITY);
    assert_eq!(round(-0.0).to_bits(), (-0.0f32).to_bits());
    // Every 997th bit pattern (NaNs included) against `half`'s independent conversion.
    for bits in (0..=u32::MAX).step_by(997) {
        let x = f32::from_bits(bits);
        let want = half::bf16::from_f32(x);
        if x.is_nan() {
            assert!(half::bf16::from_bits(round_bits(x)).is_nan());
        } else {
            assert_eq!(round_bits(x), want.to_bits(), "{bits:#010x}");
        }
    }
}

/// The software rounding (packing on the f32 path, the tests' references) equals the
/// conversion instruction the AVX512-BF16 packing uses, for normal numbers (the instruction
/// flushes subnormals to zero).
#[cfg(target_arch = "x86_64")]
#[test]
fn rounding_matches_the_conversion_instruction() {
    if !kernels_to_test().contains(&Bf16Kernel::Avx512Bf16) {
        return;
    }
    #[target_feature(enable = "avx512f,avx512bf16")]
    fn convert(x: &[f32; 16]) -> [u16; 16] {
        use std::arch::x86_64::*;
        // SAFETY: 16 values in, 16 bf16 out (the low half of the conversion).
        unsafe {
            let v = _mm512_loadu_ps(x.as_ptr());
            let both: [u16; 32] = std::mem::transmute(_mm512_cvtne2ps_pbh(v, v));
            both[..16].try_into().unwrap()
        }
    }
    let mut checked = 0;
    for start in (0..=u32::MAX - 16).step_by(65_521 * 16) {
        let values: [f32; 16] = std::array::from_fn(|i| f32::from_bits(start + 4099 * i as u32));
        // SAFETY: the CPU has AVX512-BF16 (checked above).
        let got = unsafe { convert(&values) };
        for (x, g) in values.iter().zip(got) {
            if x.is_normal() || *x == 0.0 || x.is_infinite() {
                assert_eq!(g, round_bits(*x), "{:#010x}", x.to_bits());
                checked += 1;
            } else if x.is_nan() {
                assert!(half::bf16::from_bits(g).is_nan());
            }
        }
    }
    assert!(checked > 50_000, "{checked}");
}

/// `Σ_p f(a_ip)·f(b_pj)` and `Σ_p |f(a_ip)·f(b_pj)|` in f64, for `f` the identity or bf16 rounding.
fn reference(a: MatRef<f32>, b: MatRef<f32>, f: impl Fn(f32) -> f32) -> (Vec<f64>, Vec<f64>) {
    let at = |m: &MatRef<f32>, i: usize, j: usize| f(m.data[i * m.row_stride + j * m.col_stride]) as f64;
    let (mut sum, mut magnitude) = (vec![0.0; a.rows * b.cols], vec![0.0; a.rows * b.cols]);
    for i in 0..a.rows {
        for j in 0..b.cols {
            for p in 0..a.cols {
                let product = at(&a, i, p) * at(&b, p, j);
                sum[i * b.cols + j] += product;
                magnitude[i * b.cols + j] += product.abs();
            }
        }
    }
    (sum, magnitude)
}

/// Every kernel, every operand layout (each of the three linear-layer products reads a
/// different one, and each packs through a different routine), sizes straddling the 8×48 tile,
/// odd depths (a half-empty last pair) and the KC blocks, threaded and not, accumulating or
/// not:
/// - against the exact product of the bf16-rounded operands, within f32 summation error
///   (this pins down round-to-nearest-even packing: truncation would miss by up to 2⁻⁸);
/// - against the exact product of the unrounded operands, within the bf16 bound
///   `(2U + U²)·Σ|a||b|` plus the summation error.
#[test]
fn each_kernel_matches_the_exact_product_within_the_bf16_bounds() {
    let sizes = [
        (1, 1, 1),
        (3, 5, 2),
        (8, 48, 16),
        (9, 49, 33),
        (17, 100, 511),
        (13, 33, 1025),
        (130, 200, 96),
        (20, 700, 300),
        (1, 300, 70),
    ];
    for kernel in kernels_to_test() {
        for &(m, n, k) in &sizes {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let a_data: Vec<f32> = rand_vec(m * k, 1).iter().map(|&x| x as f32).collect();
                let b_data: Vec<f32> = rand_vec(k * n, 2).iter().map(|&x| x as f32 * 3.0).collect();
                let a = if ta { MatRef::row_major(&a_data, k, m).t() } else { MatRef::row_major(&a_data, m, k) };
                let b = if tb { MatRef::row_major(&b_data, n, k).t() } else { MatRef::row_major(&b_data, k, n) };
                let (exact, magnitude) = reference(a, b, |x| x);
                let (rounded, rounded_magnitude) = reference(a, b, round);
                for accumulate in [false, true] {
                    let c0: Vec<f32> = rand_vec(m * n, 3).iter().map(|&x| x as f32).collect();
                    let mut got = c0.clone();
                    bf16_product(kernel, a, b, &mut got, n, Start::accumulating(accumulate));
                    for idx in 0..m * n {
                        let start = if accumulate { c0[idx] as f64 } else { 0.0 };
                        let g = got[idx] as f64;
                        let sum_error = (k as f64 + 1.0) * U32 * (rounded_magnitude[idx] + start.abs());
                        let what = format!("{kernel:?} ({m},{n},{k}) ta={ta} tb={tb} acc={accumulate} [{idx}]");
                        let tight = (g - start - rounded[idx]).abs();
                        assert!(tight <= sum_error, "{what}: {g} vs rounded-operand product {}", rounded[idx]);
                        let loose = (g - start - exact[idx]).abs();
                        assert!(
                            loose <= (2.0 * U + U * U) * magnitude[idx] + sum_error,
                            "{what}: {g} vs exact {} (bound {})",
                            exact[idx],
                            (2.0 * U + U * U) * magnitude[idx]
                        );
                    }
                }
            }
        }
    }
}

/// Views with neither stride 1 (every other element of a wider matrix: packed value by
/// value) over several panels and an odd depth: the rounded-operand product, within f32
/// summation error, on every kernel.
#[test]
fn strided_views_are_packed_exactly() {
    let (m, n, k) = (21, 53, 37);
    let a_data: Vec<f32> = rand_vec(2 * m * 2 * k, 6).iter().map(|&x| x as f32).collect();
    let b_data: Vec<f32> = rand_vec(2 * k * 2 * n, 7).iter().map(|&x| x as f32).collect();
    let a = MatRef { data: &a_data, rows: m, cols: k, row_stride: 4 * k, col_stride: 2 };
    let b = MatRef { data: &b_data, rows: k, cols: n, row_stride: 2, col_stride: 4 * k };
    let (rounded, magnitude) = reference(a, b, round);
    for kernel in kernels_to_test() {
        let mut got = vec![0f32; m * n];
        bf16_product(kernel, a, b, &mut got, n, Start::Zero);
        for idx in 0..m * n {
            let bound = (k as f64 + 1.0) * U32 * magnitude[idx];
            assert!(
                (got[idx] as f64 - rounded[idx]).abs() <= bound,
                "{kernel:?} [{idx}]: {} vs {}",
                got[idx],
                rounded[idx]
            );
        }
    }
}

/// The two kernels compute the same numbers up to the order of the f32 sums.
#[test]
fn the_kernels_agree() {
    let kernels = kernels_to_test();
    if kernels.len() < 2 {
        return;
    }
    let (m, n, k) = (70, 130, 700);
    let a_data: Vec<f32> = rand_vec(m * k, 4).iter().map(|&x| x as f32).collect();
    let b_data: Vec<f32> = rand_vec(k * n, 5).iter().map(|&x| x as f32).collect();
    let (a, b) = (MatRef::row_major(&a_data, m, k), MatRef::row_major(&b_data, n, k).t());
    let (_, magnitude) = reference(a, b, round);
    let results: Vec<Vec<f32>> = kernels
        .iter()
        .map(|&kernel| {
            let mut c = vec![0f32; m * n];
            bf16_product(kernel, a, b, &mut c, n, Start::Zero);
            c
        })
        .collect();
    for idx in 0..m * n {
        let diff = (results[0][idx] - results[1][idx]).abs() as f64;
        assert!(diff <= 2.0 * k as f64 * U32 * magnitude[idx], "[{idx}] {} vs {}", results[0][idx], results[1][idx]);
    }
}

fn rand_f32(dims: &[usize], seed: u64, scale: f64, rounded: bool) -> Tensor {
    let values: Vec<f32> = rand_vec(dims.iter().product(), seed)
        .iter()
        .map(|&x| (x * scale) as f32)
        .map(|x| if rounded { round(x) } else { x })
        .collect();
    Tensor::from_vec(values, dims, &Device::Cpu).unwrap()
}

/// `Σ f(x, w, b) ∘ g` for the f64 linear map, and its gradients by central differences.
fn finite_difference_gradients(inputs: &[Tensor], g: &Tensor) -> Vec<Vec<f64>> {
    let f64s: Vec<Tensor> = inputs.iter().map(|t| t.to_dtype(DType::F64).unwrap()).collect();
    let g = g.to_dtype(DType::F64).unwrap();
    let loss = |t: &[Tensor]| -> f64 {
        let y = composed_linear(&t[0], &t[1], Some(&t[2])).unwrap();
        (y * &g).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
    };
    let eps = 1e-3;
    (0..f64s.len())
        .map(|i| {
            let base: Vec<f64> = f64s[i].flatten_all().unwrap().to_vec1().unwrap();
            (0..base.len())
                .map(|e| {
                    let at = |delta: f64| {
                        let mut x = base.clone();
                        x[e] += delta;
                        let mut perturbed = f64s.clone();
                        perturbed[i] = Tensor::from_vec(x, f64s[i].dims(), &Device::Cpu).unwrap();
                        loss(&perturbed)
                    };
                    (at(eps) - at(-eps)) / (2.0 * eps)
                })
                .collect()
        })
        .collect()
}

/// The linear op at bf16 (forward, and through autograd the gradients of `x`, `w` and `b`),
/// on every kernel, against f64 finite differences of the bf16-rounded computation: the f64
/// linear map at the rounded `x` and `w`.
///
/// - Operands and upstream gradient already bf16 values: the op must equal the f64 map up to
///   f32 summation error (nothing else may be rounded: not the outputs, not the gradients).
/// - Arbitrary operands: the rounded upstream gradient `bf16(dY)` is the only difference,
///   so `dX` and `dW` are within `U·Σ|dY||·|` of the reference, and `db` (an f32 column sum)
///   within summation error.
#[test]
fn linear_gradients_match_finite_differences_of_the_rounded_computation() {
    let (rows, fan_in, fan_out) = (37, 29, 53);
    for kernel in kernels_to_test() {
        for representable in [true, false] {
            let x = rand_f32(&[rows, fan_in], 11, 1.0, representable);
            let w = rand_f32(&[fan_out, fan_in], 12, 0.5, representable);
            let b = rand_f32(&[fan_out], 13, 1.0, representable);
            let g = rand_f32(&[rows, fan_out], 14, 1.0, representable);
            let vars: Vec<Var> = [&x, &w, &b].iter().map(|t| Var::from_tensor(t).unwrap()).collect();
            let (y, grads) = on_kernel(kernel, || {
                let _bf16 = Precision::Bf16.enter().unwrap();
                let y = linear(vars[0].as_tensor(), vars[1].as_tensor(), Some(vars[2].as_tensor())).unwrap();
                let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
                (y, grads)
            });
            let rounded: Vec<Tensor> = [&x, &w]
                .iter()
                .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(round).collect::<Vec<_>>())
                .zip([&x, &w])
                .map(|(v, t)| Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap())
                .collect();
            let at_rounded = [rounded[0].clone(), rounded[1].clone(), b.clone()];
            let reference = finite_difference_gradients(&at_rounded, &g);
            let what = |name: &str| format!("{kernel:?} representable={representable}: {name}");

            let want_y = composed_linear(
                &at_rounded[0].to_dtype(DType::F64).unwrap(),
                &at_rounded[1].to_dtype(DType::F64).unwrap(),
                Some(&b.to_dtype(DType::F64).unwrap()),
            )
            .unwrap();
            // |y| ≤ Σ|x||w| + |b| ≤ fan_in·0.5 + 1: the summation bound at that scale.
            let y_tol = (fan_in as f64 + 1.0) * U32 * (fan_in as f64 * 0.5 + 1.0);
            assert_close(&what("y"), &y, &want_y, 0.0, y_tol);

            // dX = dY·W: sums of fan_out terms ≤ 0.5 each; dW = dYᵀ·X: rows terms ≤ 1; db: rows terms ≤ 1.
            let g_rounding = if representable { 0.0 } else { U };
            let bounds = [
                (fan_out as f64) * 0.5 * (g_rounding + (fan_out as f64 + 1.0) * U32),
                (rows as f64) * (g_rounding + (rows as f64 + 1.0) * U32),
                (rows as f64) * (rows as f64 + 1.0) * U32 + 1e-6,
            ];
            for (i, ((var, want), bound)) in vars.iter().zip(&reference).zip(bounds).enumerate() {
                let got = grads.get(var.as_tensor()).unwrap();
                let want = Tensor::from_vec(want.clone(), var.dims(), &Device::Cpu).unwrap();
                // The finite differences of the f64 map are exact up to ~1e-10 here.
                assert_close(&what(&format!("gradient of input {i}")), got, &want, 0.0, bound + 1e-9);
            }
        }
    }
}

/// The op keeps the precision of its forward: a backward outside the scope runs the same
/// bf16 products (identical bits), and the bf16 results differ from f32 ones.
#[test]
fn backward_keeps_the_precision_of_its_forward() {
    let x = Var::from_tensor(&rand_f32(&[64, 96], 21, 1.0, false)).unwrap();
    let w = Var::from_tensor(&rand_f32(&[80, 96], 22, 1.0, false)).unwrap();
    let g = rand_f32(&[64, 80], 23, 1.0, false);
    let grads_of = |y: &Tensor| {
        let grads = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let dx: Vec<f32> = grads.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let dw: Vec<f32> = grads.get(w.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        (dx, dw)
    };
    let (inside, y_bf16) = {
        let _bf16 = Precision::Bf16.enter().unwrap();
        let y = linear_then(x.as_tensor(), w.as_tensor(), None, Epilogue::GeluTanh).unwrap();
        (grads_of(&y), y)
    };
    let y_outside = {
        let _bf16 = Precision::Bf16.enter().unwrap();
        linear_then(x.as_tensor(), w.as_tensor(), None, Epilogue::GeluTanh).unwrap()
    };
    assert_eq!(current(), Precision::F32, "the scope ended");
    let outside = grads_of(&y_outside);
    assert_eq!(inside, outside, "a backward outside the scope changed the products");
    let y_f32 = linear_then(x.as_tensor(), w.as_tensor(), None, Epilogue::GeluTanh).unwrap();
    assert_ne!(grads_of(&y_f32), inside, "bf16 gave exactly the f32 gradients: nothing was rounded");
    // Rounding errors of ~96 products of size ~0.25: typically 0.005, the worst of 5120 ~0.02.
    assert_close("bf16 against f32", &y_bf16, &y_f32, 0.0, 0.1);
}

#[test]
fn scopes_nest_and_restore() {
    assert_eq!(current(), Precision::F32);
    {
        let _outer = Precision::Bf16.enter().unwrap();
        assert_eq!(current(), Precision::Bf16);
        {
            let _inner = Precision::F32.enter().unwrap();
            assert_eq!(current(), Precision::F32);
        }
        assert_eq!(current(), Precision::Bf16);
    }
    assert_eq!(current(), Precision::F32);
    assert_eq!("bf16".parse::<Precision>(), Ok(Precision::Bf16));
    assert_eq!(" F32 ".parse::<Precision>(), Ok(Precision::F32));
    assert!("fp16".parse::<Precision>().unwrap_err().contains("expected f32 or bf16"));
}

#[test]
fn forced_kernels_are_checked_against_the_cpu() {
    assert_eq!(select(Some("f32")), Ok(Bf16Kernel::F32));
    let amx = select(Some("amx")).unwrap_err();
    assert!(amx.contains("no AMX kernel") && amx.contains("HINT"), "{amx}");
    let unknown = select(Some("tpu")).unwrap_err();
    assert!(unknown.contains("unknown kernel") && unknown.contains("HINT"), "{unknown}");
    match select(Some("avx512-bf16")) {
        Ok(kernel) => assert!(avx512_bf16_available() && kernel == Bf16Kernel::Avx512Bf16),
        Err(e) => assert!(!avx512_bf16_available() && e.contains("no AVX512-BF16"), "{e}"),
    }
    let best = if avx512_bf16_available() { Bf16Kernel::Avx512Bf16 } else { Bf16Kernel::F32 };
    assert_eq!(select(None), Ok(best));
    assert_eq!(select(Some("")), Ok(best));
}

/// A mixture's experts multiply at the precision of their forward too: in a bf16 scope the
/// grouped products (values, and both gradients, after a backward outside the scope) are those
/// of the bf16-rounded operands summed in f32, and so differ from the f32 products.
#[test]
fn grouped_expert_products_are_bf16_in_a_bf16_scope() {
    use std::sync::Arc;

    use crate::nn::ops::{grouped_linear, Dispatch};

    let (tokens, groups, fan_in, fan_out) = (23, 3, 29, 40);
    // Every token to two experts; the third expert's share differs from the others'.
    let tokens_of: Vec<u32> = (0..tokens as u32).flat_map(|t| [t, t]).collect();
    let groups_of: Vec<u32> = (0..tokens as u32).flat_map(|t| [t % 3, (t / 2 + 1) % 3]).collect();
    let dispatch = Arc::new(Dispatch::sort(tokens, groups, &tokens_of, &groups_of).unwrap());
    let slots = dispatch.slots();
    let x = rand_f32(&[slots, fan_in], 31, 1.0, false);
    let w = rand_f32(&[groups * fan_out, fan_in], 32, 0.5, false);
    // The incoming gradient is bf16-representable, so rounding it changes nothing.
    let g = rand_f32(&[slots, fan_out], 33, 1.0, true);
    let grouped = |x: &Tensor, w: &Tensor| grouped_linear(x, w, None, &dispatch, None).unwrap();
    let rounded = |t: &Tensor| {
        let values: Vec<f32> = t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(round).collect();
        Tensor::from_vec(values, t.dims(), &Device::Cpu).unwrap().to_dtype(DType::F64).unwrap()
    };
    // The reference: the same op in f64 on the rounded operands.
    let (x64, w64) = (Var::from_tensor(&rounded(&x)).unwrap(), Var::from_tensor(&rounded(&w)).unwrap());
    let want_y = grouped(x64.as_tensor(), w64.as_tensor());
    let want = (&want_y * g.to_dtype(DType::F64).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
    let f32_y = grouped(&x, &w);
    for kernel in kernels_to_test() {
        let (xv, wv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
        let y = on_kernel(kernel, || {
            let _bf16 = Precision::Bf16.enter().unwrap();
            grouped(xv.as_tensor(), wv.as_tensor())
        });
        let grads = on_kernel(kernel, || (&y * &g).unwrap().sum_all().unwrap().backward().unwrap());
        let what = |name: &str| format!("{kernel:?}: {name}");
        // Sums of fan_in terms ≤ 0.5 (y), fan_out terms ≤ 0.5 (dX), and ≤ 2 rows per token ≤ 1 (dW).
        let bound = |terms: usize, size: f64| (terms as f64 + 1.0) * U32 * terms as f64 * size;
        assert_close(&what("y"), &y, &want_y, 0.0, bound(fan_in, 0.5) + 1e-9);
        assert_close(
            &what("dX"),
            grads.get(xv.as_tensor()).unwrap(),
            want.get(x64.as_tensor()).unwrap(),
            0.0,
            bound(fan_out, 0.5) + 1e-9,
        );
        assert_close(
            &what("dW"),
            grads.get(wv.as_tensor()).unwrap(),
            want.get(w64.as_tensor()).unwrap(),
            0.0,
            bound(slots, 1.0) + 1e-9,
        );
        let moved = (&y - &f32_y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(moved > 1e-3, "{kernel:?}: the bf16 products equal the f32 ones (max difference {moved})");
    }
}
