//! A CBLAS library loaded at run time (`LMFORGE_BLAS`) computes the same products and the same
//! training step as lmforge's own kernel.
//!
//! The library: `LMFORGE_TEST_BLAS` (a path or a name the dynamic loader finds), else Debian's
//! OpenBLAS (`libopenblas.so.0`) if installed. Without either the product test is skipped,
//! unless `LMFORGE_REQUIRE_BLAS` is set (CI sets it and installs OpenBLAS); a library named in
//! `LMFORGE_TEST_BLAS` must load. Loading is once per process, which is why this test has a
//! binary of its own and runs its parts in order.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use lmforge::nn::ops::blas;
use lmforge::nn::ops::gemm::{backend, builtin_gemm, gemm, MatRef};

/// Loading a missing file, or a shared library that is not a BLAS, is an error naming it,
/// and leaves nothing loaded.
#[cfg(target_os = "linux")]
fn check_load_errors() {
    let missing = blas::load(Path::new("/nonexistent/libnothing.so")).err().expect("loading a missing file");
    let message = missing.to_string();
    assert!(message.contains("/nonexistent/libnothing.so"), "{message}");

    let not_blas = blas::load(Path::new("libm.so.6")).err().expect("loading libm as a BLAS");
    let message = not_blas.to_string();
    assert!(message.contains("libm.so.6") && message.contains("cblas_sgemm"), "{message}");
    assert!(blas::loaded().is_none(), "a failed load left a library loaded");
}

/// The loss of one batch of a small Llama-style model and the gradient of every parameter.
fn loss_and_grads() -> (f32, HashMap<String, Tensor>) {
    let ids: Vec<u32> = (0..2 * 161).map(|i| ((i * 37 + 11) % 97) as u32).collect();
    let ids = Tensor::from_vec(ids, (2, 161), &Device::Cpu).unwrap();
    let (inputs, targets) = (ids.narrow(1, 0, 160).unwrap(), ids.narrow(1, 1, 160).unwrap());
    common::loss_and_grads("tiny-llama", &["layers=2"], &inputs, &targets)
}

fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n).map(|i| (((i + seed) * 7919 % 1000) as f32 / 500.0) - 1.0).collect()
}

/// `A·B` in f64, element `(i, j)` at `i·n + j`.
fn reference(a: MatRef<f32>, b: MatRef<f32>) -> Vec<f64> {
    let at = |v: &MatRef<f32>, i: usize, j: usize| v.data[i * v.row_stride + j * v.col_stride] as f64;
    let mut c = vec![0.0; a.rows * b.cols];
    for i in 0..a.rows {
        for j in 0..b.cols {
            c[i * b.cols + j] = (0..a.cols).map(|p| at(&a, i, p) * at(&b, p, j)).sum();
        }
    }
    c
}

/// `C = A·B` (or `C += A·B`) into a C of row stride `ldc` prefilled with `fill`; checks the
/// product against the f64 reference and that the gap beyond column `n` is untouched.
fn check_product(a: MatRef<f32>, b: MatRef<f32>, ldc: usize, accumulate: bool, fill: f32, what: &str) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let want = reference(a, b);
    let mut c = vec![fill; m * ldc];
    gemm(a, b, &mut c, ldc, accumulate);
    for i in 0..m {
        for j in 0..ldc {
            let got = c[i * ldc + j];
            if j >= n {
                assert!(got.to_bits() == fill.to_bits(), "{what}: gap ({i},{j}) written");
                continue;
            }
            let w = want[i * n + j] + if accumulate { fill as f64 } else { 0.0 };
            assert!((got as f64 - w).abs() <= 1e-4 * (1.0 + k as f64).sqrt(), "{what}: ({i},{j}) {got} vs {w}");
        }
    }
}

/// One test, in this order, because loading is once per process: errors first (nothing
/// loaded), the builtin kernel's training step, then the BLAS and everything it must match.
#[test]
#[cfg(target_os = "linux")]
fn a_loaded_blas_runs_the_f32_products_with_the_same_results() {
    check_load_errors();
    // Before loading: the builtin kernel's training step, the reference for the one after.
    let (builtin_loss, builtin_grads) = loss_and_grads();
    let requested = std::env::var("LMFORGE_TEST_BLAS").ok();
    let library = requested.clone().unwrap_or_else(|| "libopenblas.so.0".to_string());
    let loaded = match blas::load(Path::new(&library)) {
        Ok(loaded) => loaded,
        Err(e) if requested.is_none() && std::env::var_os("LMFORGE_REQUIRE_BLAS").is_none() => {
            eprintln!("skipping: no BLAS to test ({e}); set LMFORGE_TEST_BLAS=/path/to/libopenblas.so.0");
            return;
        }
        Err(e) => panic!("the BLAS to test did not load: {e}"),
    };
    assert!(backend().starts_with("BLAS: "), "{}", backend());
    let again = blas::load(Path::new(&library)).err().expect("a second load");
    assert!(again.to_string().contains("already loaded"), "{again}");

    // Shapes around CBLAS's edge cases and both ways of cutting C among threads: tall (by
    // rows) and wide (by columns), each large enough (≥ 4 MFLOP) to be cut.
    let sizes = [(1, 1, 1), (1, 300, 70), (5, 3, 2), (13, 33, 257), (300, 500, 40), (20, 700, 300), (700, 20, 300)];
    let before = loaded.products();
    let mut calls = 0;
    for &(m, n, k) in &sizes {
        let (a_data, b_data) = (values(m * k, 1), values(k * n, 2));
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let a = if ta { MatRef::row_major(&a_data, k, m).t() } else { MatRef::row_major(&a_data, m, k) };
            let b = if tb { MatRef::row_major(&b_data, n, k).t() } else { MatRef::row_major(&b_data, k, n) };
            let what = format!("({m},{n},{k}) ta={ta} tb={tb}");
            check_product(a, b, n, true, 0.25, &format!("{what} accumulate"));
            // Overwriting never reads C: NaN there must not reach the result.
            check_product(a, b, n + 3, false, f32::NAN, &format!("{what} overwrite, ldc = n + 3"));
            calls += 2;
        }
    }
    assert_eq!(loaded.products() - before, calls, "every f32 product went through the BLAS");

    // A view neither row- nor column-major (every other element) does not fit CBLAS: the
    // builtin kernel computes it.
    let (m, n, k) = (30, 40, 50);
    let (a_data, b_data) = (values(2 * m * k, 3), values(k * n, 4));
    let strided = MatRef { data: &a_data, rows: m, cols: k, row_stride: 2 * k, col_stride: 2 };
    let before = loaded.products();
    check_product(strided, MatRef::row_major(&b_data, k, n), n, false, 0.0, "strided A");
    assert_eq!(loaded.products(), before, "a strided view went to the BLAS");

    // f64 stays on the builtin kernel.
    let (a64, b64) = (vec![1.5f64; 4 * 3], vec![2.0f64; 3 * 2]);
    let mut c64 = vec![0.0f64; 4 * 2];
    gemm(MatRef::row_major(&a64, 4, 3), MatRef::row_major(&b64, 3, 2), &mut c64, 2, false);
    assert_eq!(c64, vec![9.0; 8]);
    assert_eq!(loaded.products(), before, "an f64 product went to the BLAS");

    // The builtin kernel is still there for comparison.
    let (a_data, b_data) = (values(64 * 32, 5), values(32 * 48, 6));
    let (a, b) = (MatRef::row_major(&a_data, 64, 32), MatRef::row_major(&b_data, 32, 48));
    let (mut ours, mut theirs) = (vec![0f32; 64 * 48], vec![0f32; 64 * 48]);
    builtin_gemm(a, b, &mut ours, 48, false);
    gemm(a, b, &mut theirs, 48, false);
    assert_eq!(loaded.products(), before + 1);
    assert!(ours.iter().zip(&theirs).all(|(x, y)| (x - y).abs() <= 1e-5 * (1.0 + y.abs())));

    // A whole training step: the same loss and gradients as on the builtin kernel.
    let before = loaded.products();
    let (loss, grads) = loss_and_grads();
    assert!(loaded.products() > before, "the training step's products did not use the BLAS");
    assert!((loss - builtin_loss).abs() <= 1e-5 * builtin_loss.abs(), "loss {loss} vs {builtin_loss}");
    common::assert_same_grads(&grads, &builtin_grads, "BLAS against the builtin kernel");
}
