//! Every kernel path that runs on this machine against the `f32` product of candle's
//! dequantized weights, for each of the five formats, within the bound of the module docs.

use std::sync::Arc;

use candle_core::{Device, Tensor};

use super::act::{self, Activations, PairLanes, Q8Block};
use super::*;

/// Kernels this CPU runs; the VNNI one must run where CI sets `LMFORGE_REQUIRE_VNNI`.
fn kernels() -> Vec<QuantKernel> {
    let mut kernels = vec![QuantKernel::Scalar];
    if vnni_available() {
        kernels.push(QuantKernel::Vnni);
    } else {
        assert!(
            std::env::var_os("LMFORGE_REQUIRE_VNNI").is_none(),
            "LMFORGE_REQUIRE_VNNI is set, but this CPU has no VNNI"
        );
    }
    kernels
}

/// A `(rows, cols)` matrix of varied magnitudes (some rows near zero, an outlier column).
fn values(rows: usize, cols: usize, seed: u64) -> Tensor {
    let v: Vec<f32> = (0..rows * cols)
        .map(|i| {
            let (r, c) = (i / cols, i % cols);
            let base = ((i as u64 * 2654435761 + seed * 97) % 10007) as f32 / 10007.0 - 0.5;
            let row_scale = 0.02 + (r % 5) as f32 * 0.3;
            base * row_scale * if c % 61 == 7 { 8.0 } else { 1.0 }
        })
        .collect();
    Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
}

/// `|y − x·deq(W)ᵀ|` allowed per output: half an activation step times `Σ|w|`, per block
/// (plus f32 rounding of the sums).
fn bound(x: &[f32], w: &[f32], digits: usize) -> f32 {
    let step = 254f32.powi(digits as i32);
    let rounding: f32 = x.iter().zip(w).map(|(a, b)| (a * b).abs()).sum::<f32>() * 1e-6;
    x.chunks(32)
        .zip(w.chunks(32))
        .map(|(xb, wb)| {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            amax / step * wb.iter().map(|v| v.abs()).sum::<f32>()
        })
        .sum::<f32>()
        * 1.001
        + rounding
        + 1e-6
}

fn check(format: QFormat, rows: usize, cols: usize, tokens: usize) {
    let w = QMatrix::quantize(&values(rows, cols, 1), format).unwrap();
    let deq = w.dequantize().unwrap(); // (rows, cols)
    let x = values(tokens, cols, 2);
    let reference = x.matmul(&deq.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
    let (xs, ws) = (x.to_vec2::<f32>().unwrap(), deq.to_vec2::<f32>().unwrap());
    for kernel in kernels() {
        for digits in [1, 2] {
            let mut out = vec![f32::NAN; tokens * rows];
            matmul(kernel, digits, &x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), &[&w], &mut out);
            for t in 0..tokens {
                for r in 0..rows {
                    let (got, want) = (out[t * rows + r], reference[t][r]);
                    let tol = bound(&xs[t], &ws[r], digits);
                    assert!(
                        (got - want).abs() <= tol,
                        "{format} {kernel:?} {digits} digits ({t}, {r}): {got} vs {want}, bound {tol}"
                    );
                }
            }
        }
    }
}

#[test]
fn every_format_and_kernel_matches_the_dequantized_product() {
    for format in QFormat::ALL {
        // decode (one row), a small prefill, rows not a multiple of a task
        check(format, 37, 512, 1);
        check(format, 19, 768, 5);
        if format.block_len() == 32 {
            // an odd number of blocks: the paired kernel's last block alone
            check(format, 9, 544, 2);
        }
    }
}

/// The kernels differ only in summation order: they agree to f32 rounding, not just the bound.
/// (Rows one at a time and in runs, which the VNNI kernel takes four at a time.)
#[test]
fn kernels_agree_with_each_other() {
    let kernels = kernels();
    for format in QFormat::ALL {
        // an odd number of blocks where the format has blocks of 32
        let cols = if format.block_len() == 32 { 288 } else { 256 };
        let rows = 11;
        let w = QMatrix::quantize(&values(rows, cols, 3), format).unwrap();
        let x = values(1, cols, 4).flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for digits in [1, 2] {
            let mut acts = vec![Q8Block::ZERO; cols / 32 * digits];
            act::quantize_row(&x, &mut acts, digits);
            let reference: Vec<f32> = (0..rows).map(|r| scalar::dot(format, w.row(r), &acts, digits)).collect();
            let lanes = PairLanes::of_row(&acts, digits);
            for &kernel in &kernels {
                let act = Activations { blocks: &acts, lanes: if kernel == QuantKernel::Vnni { &lanes } else { &[] } };
                let mut run = vec![f32::NAN; rows - 1];
                dots(kernel, &w, 1..rows, act, digits, &mut run);
                for r in 0..rows {
                    let close = |got: f32| (got - reference[r]).abs() <= 1e-5 * (1.0 + reference[r].abs());
                    let mut one = [f32::NAN];
                    dots(kernel, &w, r..r + 1, act, digits, &mut one);
                    let got = one[0];
                    assert!(close(got), "{format} {kernel:?} row {r}: {got} vs {}", reference[r]);
                    if r > 0 {
                        assert!(
                            close(run[r - 1]),
                            "{format} {kernel:?} run, row {r}: {} vs {}",
                            run[r - 1],
                            reference[r]
                        );
                    }
                }
            }
        }
    }
}

/// Several matrices in one product give each matrix's own product, bit for bit.
#[test]
fn a_product_with_several_matrices_is_each_product() {
    let formats = [QFormat::Q4_1, QFormat::Q8_0, QFormat::Q4_0, QFormat::Q4K];
    let ws: Vec<Arc<QMatrix>> = formats
        .iter()
        .enumerate()
        .map(|(i, &f)| Arc::new(QMatrix::quantize(&values(5 + 7 * i, 256, 10 + i as u64), f).unwrap()))
        .collect();
    for tokens in [1, 3] {
        let x = values(tokens, 256, 20).reshape((1, tokens, 256)).unwrap();
        let each = qmatmul_each(&x, &ws).unwrap();
        assert_eq!(each.len(), ws.len());
        for (y, w) in each.iter().zip(&ws) {
            let alone = qmatmul(&x, w).unwrap();
            assert_eq!(y.dims(), &[1, tokens, w.dims().0]);
            assert_eq!(
                y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                alone.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
    }
    let narrow = Arc::new(QMatrix::quantize(&values(4, 128, 30), QFormat::Q8_0).unwrap());
    let err = qmatmul_each(&values(1, 256, 0), &[ws[0].clone(), narrow]).unwrap_err().to_string();
    assert!(err.contains("input has 256 features") && err.contains("expects 128"), "{err}");
}

#[test]
fn the_op_keeps_leading_dims_and_refuses_gradients() {
    let w = Arc::new(QMatrix::quantize(&values(6, 64, 5), QFormat::Q8_0).unwrap());
    let x = candle_core::Var::from_tensor(&values(6, 64, 6).reshape((2, 3, 64)).unwrap()).unwrap();
    let y = qmatmul(&x, &w).unwrap();
    assert_eq!(y.dims(), &[2, 3, 6]);
    let err = y.sum_all().unwrap().backward().unwrap_err().to_string();
    assert!(err.contains("quantized (Q8_0) weight has no gradient") && err.contains("HINT"), "{err}");
    let err = qmatmul(&values(1, 32, 0), &w).unwrap_err().to_string();
    assert!(err.contains("input has 32 features"), "{err}");
}

#[test]
fn rows_are_selected_as_whole_blocks() {
    let t = values(4, 256, 7);
    let w = QMatrix::quantize(&t, QFormat::Q4K).unwrap();
    let swapped = w.select_rows(&[2, 0, 3, 1]).unwrap().dequantize().unwrap();
    let deq = w.dequantize().unwrap();
    let expected =
        Tensor::cat(&[deq.get(2).unwrap(), deq.get(0).unwrap(), deq.get(3).unwrap(), deq.get(1).unwrap()], 0)
            .unwrap()
            .reshape((4, 256))
            .unwrap();
    assert_eq!(swapped.to_vec2::<f32>().unwrap(), expected.to_vec2::<f32>().unwrap());
    assert!(w.select_rows(&[0, 1]).is_err());
    assert!(QMatrix::new(QFormat::Q4_0, 2, 64, vec![0; 71]).unwrap_err().to_string().contains("72 bytes"));
}

#[test]
fn a_forced_kernel_this_cpu_lacks_is_an_error() {
    assert_eq!(select(Some("scalar")), Ok(QuantKernel::Scalar));
    assert!(select(Some("amx")).unwrap_err().contains("unknown kernel"));
    match vnni_available() {
        true => assert_eq!(select(None), Ok(QuantKernel::Vnni)),
        false => assert!(select(Some("vnni")).unwrap_err().contains("HINT")),
    }
}

#[test]
fn a_prefill_sized_product_runs_on_the_dequantized_matrix() {
    let w = Arc::new(QMatrix::quantize(&values(48, 256, 8), QFormat::Q4_1).unwrap());
    let tokens = super::DEQUANTIZED_FROM_TOKENS;
    let x = values(tokens, 256, 9).reshape((1, tokens, 256)).unwrap();
    let want = x.broadcast_matmul(&w.dequantize().unwrap().t().unwrap()).unwrap(); // (1, T, 48)
    let got = qmatmul(&x, &w).unwrap();
    let diff = (&got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    // The f32 GEMM on the exact dequantized weights: only summation order differs.
    assert!(diff <= 1e-5 * scale, "{diff} vs scale {scale}");
    // One token fewer takes the integer kernels, whose 8-bit activations differ more.
    let short = qmatmul(&x.narrow(1, 0, tokens - 1).unwrap(), &w).unwrap();
    let short_diff = (&short - &want.narrow(1, 0, tokens - 1).unwrap()).unwrap().abs().unwrap();
    assert!(short_diff.max_all().unwrap().to_scalar::<f32>().unwrap() > diff);
}

/// The kernel's quantizer (AVX-512 for `vnni`) gives the portable one's blocks bit for bit, at
/// both precisions: on varied rows, on ties (which both round to even), and on the blocks it
/// leaves to the portable code (zeros, NaN, infinity, only subnormals).
#[test]
fn each_kernels_quantizer_gives_the_portable_blocks_bit_for_bit() {
    let mut x = values(1, 32 * 24, 11).flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let ties: Vec<f32> = (0..32).map(|i| if i == 0 { 127.0 } else { i as f32 - 16.5 }).collect();
    let word_ties: Vec<f32> = (0..32).map(|i| if i == 0 { 32512.0 } else { (i * 1000) as f32 - 0.5 }).collect();
    let mut special = vec![0.0f32; 32 * 4];
    special[32 + 5] = f32::NAN;
    special[64 + 9] = f32::NEG_INFINITY;
    special[96..].fill(1e-45);
    x.extend(ties.iter().chain(&word_ties).chain(&special));
    let bits = |b: &Q8Block| (b.qs, b.scale.to_bits(), b.half_sums);
    for kernel in kernels() {
        for digits in [1, 2] {
            let mut want = vec![Q8Block::ZERO; x.len() / 32 * digits];
            act::quantize_row(&x, &mut want, digits);
            let mut got = vec![Q8Block::ZERO; want.len()];
            super::quantize_row(kernel, &x, &mut got, digits);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(bits(g), bits(w), "{kernel:?}, {digits} digits, block {i}");
            }
        }
    }
}
