//! Flash attention with bf16 products (a bf16 precision scope) against exact references, on
//! every bf16 kernel this CPU runs.
//!
//! The bound on the output, derived in the module docs of [`super::bf16_tiles`]: rounding `q`
//! and `scale·k` to bf16 (relative error `U = 2⁻⁸` each) moves the score `s_ij` by at most
//! `δ_ij = (2U + U²)·scale·Σ_d |q_id||k_jd|`; moving every score of a row by at most `δ` moves
//! each probability by at most a factor `e^{±2δ}`, so the output by at most
//! `(e^{2δ} − 1)·max|v|`; rounding `P` and `v` where they meet adds `(2U + U²)·max|v|`.

use candle_core::{DType, Device, Tensor, Var};

use super::*;
use crate::nn::ops::bf16::tests::{kernels_to_test, on_kernel};
use crate::nn::ops::bf16::Precision;
use crate::nn::ops::testing::{rand_tensor, value_and_grads, weighted_sum};
use crate::nn::positions::alibi_slopes;

/// Relative rounding error of bf16 (8 significant bits, to nearest).
const U: f64 = 1.0 / 256.0;

fn inputs(h: usize, kv: usize, t: usize, hd: usize, seed: u64) -> Vec<Tensor> {
    vec![
        (rand_tensor(&[1, h, t, hd], seed, DType::F32) * 2.0).unwrap(),
        (rand_tensor(&[1, kv, t, hd], seed + 1, DType::F32) * 2.0).unwrap(),
        rand_tensor(&[1, kv, t, hd], seed + 2, DType::F32),
    ]
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// `f` run with this thread's products at bf16 on `kernel`.
fn at_bf16<R>(kernel: bf16::Bf16Kernel, f: impl FnOnce() -> R) -> R {
    on_kernel(kernel, || {
        let _bf16 = Precision::Bf16.enter().unwrap();
        f()
    })
}

#[test]
fn output_is_within_the_derived_bound_of_the_exact_attention() {
    // GQA, ALiBi and a causal mask over three key tiles; a scale that is not a power of two,
    // so that scale·k is rounded too; head_dim 5 leaves half a pair.
    for (hd, scale) in [(16, 0.3), (5, 0.45)] {
        let (h, kv, t) = (4, 2, 150);
        let mask = AttentionMask::causal_self(0, t).with_alibi(Some(alibi_slopes(h, 8.0)));
        let x = inputs(h, kv, t, hd, 21);
        let x64: Vec<Tensor> = x.iter().map(|t| t.to_dtype(DType::F64).unwrap()).collect();
        let exact = flat(&flash_attention(&x64[0], &x64[1], &x64[2], scale, &mask).unwrap());
        let (q, k, v) = (flat(&x[0]), flat(&x[1]), flat(&x[2]));
        let f32_out = flat(&flash_attention(&x[0], &x[1], &x[2], scale, &mask).unwrap());
        let mut outputs = Vec::new();
        for kernel in kernels_to_test() {
            let out = flat(&at_bf16(kernel, || flash_attention(&x[0], &x[1], &x[2], scale, &mask).unwrap()));
            for head in 0..h {
                let g = head / (h / kv);
                let v_max = v[g * t * hd..][..t * hd].iter().fold(0f64, |m, x| m.max(x.abs()));
                for i in 0..t {
                    let q_i = &q[(head * t + i) * hd..][..hd];
                    let delta = (0..=i)
                        .map(|j| q_i.iter().zip(&k[(g * t + j) * hd..][..hd]).map(|(a, b)| (a * b).abs()).sum::<f64>())
                        .fold(0f64, f64::max)
                        * scale
                        * (2.0 * U + U * U);
                    // f32 sums and exp add far less than 1e-5 at these sizes.
                    let bound = v_max * ((2.0 * delta).exp_m1() * (1.0 + 2.0 * U) + 2.0 * U + U * U) + 1e-5;
                    for d in 0..hd {
                        let at = (head * t + i) * hd + d;
                        let err = (out[at] - exact[at]).abs();
                        assert!(
                            err <= bound,
                            "{kernel:?} hd={hd} head {head} row {i}: error {err:.3e} > bound {bound:.3e}"
                        );
                    }
                }
            }
            outputs.push(out);
        }
        // The products really are bf16: the result moved away from the f32 one by far more
        // than f32 rounding.
        let moved = outputs[0].iter().zip(&f32_out).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
        assert!(moved > 1e-3, "bf16 attention is within {moved:e} of f32: were the products rounded?");
        for out in &outputs[1..] {
            assert!(out == &outputs[0], "the bf16 kernels disagree on the attention output");
        }
    }
}

/// Gradients at bf16 against central differences of the exact (f64) attention, normwise:
/// to first order each gradient is a sum of products of two rounded operands (`2U`), one of
/// them carrying a rounded `P` or `dS` computed from scores moved by at most `δ` (`P` by a
/// factor `e^{±2δ}`), so every element is within `(4U + 4δ)` of the largest gradient of its
/// tensor, with `δ` the largest score perturbation (as in the output test).
#[test]
fn gradients_are_within_a_first_order_bound_of_finite_differences() {
    let (h, kv, t, hd, scale) = (2, 1, 67, 5, 0.4);
    let mask = AttentionMask::causal_self(0, t).with_window(Some(40));
    let x = inputs(h, kv, t, hd, 31);
    let x64: Vec<Tensor> = x.iter().map(|t| t.to_dtype(DType::F64).unwrap()).collect();
    let loss = |inputs: &[Tensor]| -> f64 {
        let out = flash_attention(&inputs[0], &inputs[1], &inputs[2], scale, &mask).unwrap();
        weighted_sum(&out, 7).unwrap().to_scalar::<f64>().unwrap()
    };
    let eps = 1e-5;
    let finite_differences: Vec<Vec<f64>> = (0..3)
        .map(|i| {
            let base = flat(&x64[i]);
            (0..base.len())
                .map(|e| {
                    let at = |delta: f64| {
                        let mut values = base.clone();
                        values[e] += delta;
                        let mut perturbed = x64.clone();
                        perturbed[i] = Tensor::from_vec(values, x64[i].dims(), &Device::Cpu).unwrap();
                        loss(&perturbed)
                    };
                    (at(eps) - at(-eps)) / (2.0 * eps)
                })
                .collect()
        })
        .collect();
    let (q, k) = (flat(&x[0]), flat(&x[1]));
    let q_max = q.iter().fold(0f64, |m, x| m.max(x.abs()));
    let k_max = k.iter().fold(0f64, |m, x| m.max(x.abs()));
    let delta = hd as f64 * q_max * k_max * scale * (2.0 * U + U * U);
    let flash_fn = |x: &[Tensor]| flash_attention(&x[0], &x[1], &x[2], scale, &mask);
    let mut all = Vec::new();
    for kernel in kernels_to_test() {
        let (_, grads) = at_bf16(kernel, || value_and_grads(&flash_fn, &x));
        for (i, (got, want)) in grads.iter().zip(&finite_differences).enumerate() {
            let got = flat(got);
            let largest = want.iter().fold(0f64, |m, x| m.max(x.abs()));
            let bound = (4.0 * U + 4.0 * delta) * largest + 1e-6;
            let worst = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
            assert!(
                worst <= bound,
                "{kernel:?} input {i}: error {worst:.3e} > bound {bound:.3e} (largest {largest:.3e})"
            );
            all.push(got);
        }
    }
    // The kernels give the same bits for the same gradients.
    for (n, grads) in all.iter().enumerate().skip(3) {
        assert!(grads == &all[n % 3], "the bf16 kernels disagree on the gradient of input {}", n % 3);
    }
}

/// The precision is read when the op runs forward and kept for its backward, wherever
/// `backward()` is then called; f32 outside a scope is untouched by any of this.
#[test]
fn backward_keeps_the_precision_of_its_forward() {
    let (h, kv, t, hd) = (2, 2, 70, 8);
    let mask = AttentionMask::causal_self(0, t);
    let x = inputs(h, kv, t, hd, 41);
    let vars: Vec<Var> = x.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let forward =
        || flash_attention(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor(), 0.35, &mask).unwrap();
    let kernel = bf16::kernel().unwrap();
    let out = at_bf16(kernel, forward);
    let outside = weighted_sum(&out, 7).unwrap().backward().unwrap();
    let inside = at_bf16(kernel, || weighted_sum(&forward(), 7).unwrap().backward().unwrap());
    let f32_grads = weighted_sum(&forward(), 7).unwrap().backward().unwrap();
    for var in &vars {
        let (a, b, c) = (
            flat(outside.get(var.as_tensor()).unwrap()),
            flat(inside.get(var.as_tensor()).unwrap()),
            flat(f32_grads.get(var.as_tensor()).unwrap()),
        );
        assert!(a == b, "a backward outside the bf16 scope ran other products than its forward");
        assert!(a != c, "bf16 and f32 gradients are identical: were the products rounded?");
    }
}

/// No keys, or no queries, at bf16: zeros and no gradient, or an empty output, as in `f32`.
#[test]
fn empty_dims_do_not_panic() {
    for kernel in kernels_to_test() {
        let x = inputs(2, 1, 3, 4, 8);
        let no_keys: Vec<Tensor> = vec![x[0].clone(), x[1].narrow(2, 0, 0).unwrap(), x[2].narrow(2, 0, 0).unwrap()];
        let mask = AttentionMask::causal(0, vec![]);
        let flash_fn = |x: &[Tensor]| flash_attention(&x[0], &x[1], &x[2], 0.5, &mask);
        let (out, grads) = at_bf16(kernel, || value_and_grads(&flash_fn, &no_keys));
        assert_eq!(out.dims(), &[1, 2, 3, 4]);
        assert!(flat(&out).iter().chain(&flat(&grads[0])).all(|&x| x == 0.0), "{kernel:?}: no keys");
        let no_queries = vec![x[0].narrow(2, 0, 0).unwrap(), x[1].clone(), x[2].clone()];
        let mask = AttentionMask::causal(0, (0..3).collect());
        let flash_fn = |x: &[Tensor]| flash_attention(&x[0], &x[1], &x[2], 0.5, &mask);
        let (out, grads) = at_bf16(kernel, || value_and_grads(&flash_fn, &no_queries));
        assert_eq!(out.dims(), &[1, 2, 0, 4]);
        assert!(flat(&grads[1]).iter().all(|&x| x == 0.0), "{kernel:?}: no queries");
    }
}
