//! Test helpers shared by the ops: deterministic random tensors, gradients through autograd,
//! central finite differences, and closeness checks that name the worst element.

use candle_core::{DType, Device, Result, Tensor, Var};

/// Deterministic values in `[-1, 1)` (splitmix64), so failures reproduce.
pub fn rand_vec(n: usize, seed: u64) -> Vec<f64> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(0x1234_5678);
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect()
}

pub fn rand_tensor(dims: &[usize], seed: u64, dtype: DType) -> Tensor {
    let n = dims.iter().product();
    Tensor::from_vec(rand_vec(n, seed), dims, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

/// The scalar `Σ out ∘ w` for fixed random weights `w`, so every output element gets a distinct
/// upstream gradient (a plain sum would hide errors that cancel).
pub fn weighted_sum(out: &Tensor, seed: u64) -> Result<Tensor> {
    let w = rand_tensor(out.dims(), seed ^ 0xABCD, out.dtype()).to_device(out.device())?;
    (out * w)?.sum_all()
}

/// Value of `f` and the gradient of `Σ f(inputs) ∘ w` with respect to each input.
pub fn value_and_grads(f: &dyn Fn(&[Tensor]) -> Result<Tensor>, inputs: &[Tensor]) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&tensors).unwrap();
    let grads = weighted_sum(&out, 7).unwrap().backward().unwrap();
    let grads = tensors.iter().map(|t| grads.get(t).cloned().unwrap_or_else(|| t.zeros_like().unwrap())).collect();
    (out.detach(), grads)
}

/// Check autograd against central differences of `Σ f(inputs) ∘ w` in f64 for the inputs
/// listed in `check` (the others are held fixed).
pub fn check_finite_differences(f: &dyn Fn(&[Tensor]) -> Result<Tensor>, inputs: &[Tensor], check: &[usize], tol: f64) {
    let (_, grads) = value_and_grads(f, inputs);
    let eps = 1e-6;
    for &i in check {
        let base: Vec<f64> = inputs[i].flatten_all().unwrap().to_vec1().unwrap();
        let analytic: Vec<f64> = grads[i].flatten_all().unwrap().to_vec1().unwrap();
        for e in 0..base.len() {
            let loss_at = |delta: f64| {
                let mut x = base.clone();
                x[e] += delta;
                let mut perturbed = inputs.to_vec();
                perturbed[i] = Tensor::from_vec(x, inputs[i].dims(), &Device::Cpu).unwrap();
                weighted_sum(&f(&perturbed).unwrap(), 7).unwrap().to_scalar::<f64>().unwrap()
            };
            let numeric = (loss_at(eps) - loss_at(-eps)) / (2.0 * eps);
            let err = (numeric - analytic[e]).abs();
            assert!(
                err <= tol * (1.0 + numeric.abs()),
                "input {i} element {e}: autograd {} vs finite difference {numeric} (error {err:e})",
                analytic[e]
            );
        }
    }
}

/// `|a − b| ≤ atol + rtol·|b|` elementwise, NaN-aware; panics naming the worst element.
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, rtol: f64, atol: f64) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
    let a: Vec<f64> = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f64> = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let mut worst: Option<(usize, f64)> = None;
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let excess = (x - y).abs() - (atol + rtol * y.abs());
        if (excess > 0.0 || x.is_nan() != y.is_nan()) && worst.is_none_or(|(_, w)| excess > w) {
            worst = Some((i, excess));
        }
    }
    if let Some((i, _)) = worst {
        panic!("{what}: element {i}: {} vs {} (rtol {rtol}, atol {atol})", a[i], b[i]);
    }
}

/// Values and all input gradients of `fused` and `composed` agree (f32 inputs).
pub fn check_against_composed(
    what: &str,
    fused: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    composed: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    rtol: f64,
) {
    let (out_f, grads_f) = value_and_grads(fused, inputs);
    let (out_c, grads_c) = value_and_grads(composed, inputs);
    assert_same_results(what, (&out_f, &grads_f), (&out_c, &grads_c), rtol);
}

/// What `op` runs off the CPU agrees with its CPU kernel, in value and every input gradient
/// (f32 inputs, given on the CPU): its composed formulation on the CPU ([`route::composed_scope`]),
/// and `op` itself on every other test device ([`crate::device::test_devices`]; on a machine
/// without a GPU that helper says why there is none).
///
/// [`route::composed_scope`]: super::route::composed_scope
pub fn check_on_devices(what: &str, op: &dyn Fn(&[Tensor]) -> Result<Tensor>, inputs: &[Tensor], rtol: f64) {
    let (out, grads) = value_and_grads(op, inputs);
    {
        let _composed = super::route::composed_scope();
        let (out_c, grads_c) = value_and_grads(op, inputs);
        assert_same_results(&format!("{what}, composed on the CPU"), (&out_c, &grads_c), (&out, &grads), rtol);
    }
    for device in crate::device::test_devices().into_iter().filter(|d| !d.is_cpu()) {
        let uploaded: Vec<Tensor> = inputs.iter().map(|t| t.to_device(&device).unwrap()).collect();
        let (out_d, grads_d) = value_and_grads(op, &uploaded);
        assert!(out_d.device().same_device(&device), "{what}: the output left {device:?}");
        let host = |t: &Tensor| t.to_device(&Device::Cpu).unwrap();
        let grads_d: Vec<Tensor> = grads_d.iter().map(host).collect();
        let what = format!("{what} on {}", crate::device::describe(&device));
        assert_same_results(&what, (&host(&out_d), &grads_d), (&out, &grads), rtol);
    }
}

/// Values and gradients `a` close to `b`.
fn assert_same_results(what: &str, a: (&Tensor, &[Tensor]), b: (&Tensor, &[Tensor]), rtol: f64) {
    let ((out_f, grads_f), (out_c, grads_c)) = (a, b);
    // Absolute floor relative to the typical magnitude, so near-zero elements do not fail on
    // rounding noise (and not below 0.1·rtol: a gradient that is exactly 0 in one version, e.g.
    // attention over a single key, is rounding noise of order 1e-7 in the other).
    let scale = |t: &Tensor| {
        t.abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap().max(0.1)
    };
    assert_close(&format!("{what}: value"), out_f, out_c, rtol, rtol * scale(out_c));
    for (i, (gf, gc)) in grads_f.iter().zip(grads_c).enumerate() {
        assert_close(&format!("{what}: grad of input {i}"), gf, gc, rtol, rtol * scale(gc));
    }
}
