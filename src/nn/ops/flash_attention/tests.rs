use candle_core::{DType, Device, Tensor};

use super::*;
use crate::nn::attention::grouped_attention;
use crate::nn::ops::testing::{check_against_composed, check_finite_differences, rand_tensor, value_and_grads};
use crate::nn::ops::DropoutMask;
use crate::nn::positions::alibi_slopes;

/// `(B, H, T, hd)` queries and `(B, KV, S, hd)` keys/values, scaled up a little so the softmax
/// is not nearly uniform.
#[allow(clippy::too_many_arguments)]
fn qkv(b: usize, h: usize, kv: usize, t: usize, s: usize, hd: usize, dtype: DType, seed: u64) -> Vec<Tensor> {
    vec![
        (rand_tensor(&[b, h, t, hd], seed, dtype) * 2.0).unwrap(),
        (rand_tensor(&[b, kv, s, hd], seed + 1, dtype) * 2.0).unwrap(),
        rand_tensor(&[b, kv, s, hd], seed + 2, dtype),
    ]
}

fn flash(scale: f64, mask: AttentionMask) -> impl Fn(&[Tensor]) -> candle_core::Result<Tensor> {
    move |x: &[Tensor]| flash_attention(&x[0], &x[1], &x[2], scale, &mask)
}

/// The composed path the model's `naive` implementation runs (materialised bias, softmax,
/// dropout factors), at `scale`.
fn composed(scale: f64, mask: AttentionMask) -> impl Fn(&[Tensor]) -> candle_core::Result<Tensor> {
    move |x: &[Tensor]| composed_attention(&x[0], &x[1], &x[2], scale, &mask)
}

/// `grouped_attention` with a bias tensor (scale `1/√hd`).
fn naive(mask: AttentionMask) -> impl Fn(&[Tensor]) -> candle_core::Result<Tensor> {
    move |x: &[Tensor]| {
        let (t, hd) = (x[0].dim(2)?, x[0].dim(3)?);
        let bias = mask.bias(t, x[0].dtype(), &Device::Cpu)?;
        grouped_attention(&x[0], &x[1], &x[2], &bias, hd)
    }
}

#[test]
fn gradients_match_finite_differences() {
    // Keys from a "cache" (positions 0..7, queries at 4..9), GQA, window and ALiBi together.
    let mask = AttentionMask::causal(4, (0..9).collect())
        .with_window(Some(4))
        .with_alibi(Some(vec![0.5, 0.25, 0.125, 0.0625]));
    let inputs = qkv(2, 4, 2, 5, 9, 3, DType::F64, 1);
    check_finite_differences(&flash(0.7, mask), &inputs, &[0, 1, 2], 1e-6);
    // Several tiles each way (67 = 64 + 3), MQA, plain causal.
    let inputs = qkv(1, 2, 1, 67, 67, 2, DType::F64, 2);
    check_finite_differences(&flash(0.9, AttentionMask::causal_self(0, 67)), &inputs, &[0, 1, 2], 1e-6);
}

#[test]
fn f64_matches_composed_exactly_enough() {
    let mask = AttentionMask::causal_self(3, 70).with_alibi(Some(alibi_slopes(4, 8.0)));
    let inputs = qkv(1, 4, 2, 70, 70, 5, DType::F64, 3);
    check_against_composed("f64", &flash(1.0 / 5f64.sqrt(), mask.clone()), &naive(mask), &inputs, 1e-10);
}

/// Flash == the model's composed attention, values and dq, dk, dv, over sequence lengths around
/// the tile size, MHA/GQA/MQA, and every mask feature.
#[test]
fn matches_naive_attention_grid() {
    let hd = 16;
    let scale = 1.0 / (hd as f64).sqrt();
    for &seq in &[1usize, 7, 63, 64, 65, 130, 300] {
        for &(h, kv) in &[(8usize, 8usize), (8, 2), (8, 1)] {
            let b = if seq <= 65 { 2 } else { 1 };
            let slopes = Some(alibi_slopes(h, 8.0));
            let window = seq / 3 + 1;
            // Keys from a cache: S = seq keys at 0..seq, the last T queries of them.
            let t_cached = (seq / 4).max(1);
            let cached_start = seq - t_cached;
            // A rolling cache of `window` slots in ring order (slot = position mod window).
            let ring: Vec<usize> = {
                let end = seq;
                let first = end.saturating_sub(window);
                let n = end - first;
                let mut slots = vec![0; n];
                for p in first..end {
                    slots[p % n] = p;
                }
                slots
            };
            let t_ring = t_cached.min(ring.len());
            let cases: Vec<(&str, usize, AttentionMask)> = vec![
                ("causal", seq, AttentionMask::causal_self(0, seq)),
                ("window", seq, AttentionMask::causal_self(0, seq).with_window(Some(window))),
                ("alibi", seq, AttentionMask::causal_self(5, seq).with_alibi(slopes.clone())),
                ("cache", t_cached, AttentionMask::causal(cached_start, (0..seq).collect()).with_alibi(slopes.clone())),
                (
                    "rolling cache + window",
                    t_ring,
                    AttentionMask::causal(seq - t_ring, ring.clone()).with_window(Some(window)),
                ),
                ("bidirectional", seq, AttentionMask { causal: false, ..AttentionMask::causal_self(0, seq) }),
            ];
            for (name, t, mask) in cases {
                let s = mask.key_positions.len();
                let inputs = qkv(b, h, kv, t, s, hd, DType::F32, seq as u64 * 31 + h as u64 + kv as u64);
                let what = format!("{name}: seq {seq}, T {t}, S {s}, heads {h}/{kv}");
                check_against_composed(&what, &flash(scale, mask.clone()), &naive(mask), &inputs, 1e-5);
            }
        }
    }
}

#[test]
fn head_dims_off_the_register_width() {
    // hd = 3 and 72 exercise the scalar and mixed column blocks of the tile products.
    for hd in [3, 72] {
        let mask = AttentionMask::causal_self(0, 80).with_window(Some(50));
        let inputs = qkv(1, 4, 2, 80, 80, hd, DType::F32, hd as u64);
        check_against_composed(
            &format!("hd {hd}"),
            &flash(1.0 / (hd as f64).sqrt(), mask.clone()),
            &naive(mask),
            &inputs,
            2e-5,
        );
    }
}

#[test]
fn query_that_sees_nothing_gets_zero_and_no_nan() {
    // Keys at 10..20 but queries at 0..3: every key is in the future.
    let mask = AttentionMask::causal(0, (10..20).collect());
    let inputs = qkv(1, 2, 2, 3, 10, 4, DType::F32, 9);
    let (out, grads) = value_and_grads(&flash(0.5, mask), &inputs);
    assert_eq!(out.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    for g in grads {
        assert_eq!(g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }
}

#[test]
fn half_precision_inputs_run_in_f32() {
    let mask = AttentionMask::causal_self(0, 20);
    let inputs = qkv(1, 2, 1, 20, 20, 8, DType::F32, 4);
    let half: Vec<Tensor> = inputs.iter().map(|t| t.to_dtype(DType::BF16).unwrap()).collect();
    let out = flash_attention(&half[0], &half[1], &half[2], 0.35, &mask).unwrap();
    assert_eq!(out.dtype(), DType::BF16);
    let reference = flash_attention(&inputs[0], &inputs[1], &inputs[2], 0.35, &mask).unwrap();
    crate::nn::ops::testing::assert_close("bf16", &out, &reference, 2e-2, 2e-2);
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let x = qkv(1, 4, 2, 5, 6, 8, DType::F32, 5);
    let ok = AttentionMask::causal(1, (0..6).collect());
    assert!(flash_attention(&x[0], &x[1], &x[2], 0.3, &ok).is_ok());
    let three_heads = rand_tensor(&[1, 3, 6, 8], 1, DType::F32);
    assert!(flash_attention(&x[0], &three_heads, &three_heads, 0.3, &ok).is_err()); // 4 % 3 != 0
    assert!(flash_attention(&x[0], &x[1], &x[1].narrow(3, 0, 4).unwrap(), 0.3, &ok).is_err());
    assert!(flash_attention(&x[0], &x[1], &x[2], 0.3, &AttentionMask::causal(0, vec![0, 1])).is_err());
    assert!(flash_attention(&x[0], &x[1], &x[2], 0.3, &ok.clone().with_alibi(Some(vec![1.0]))).is_err());
    assert!(flash_attention(&x[0], &x[1], &x[2], 0.3, &ok.clone().with_window(Some(0))).is_err());
    assert!(flash_attention(&x[0], &x[1], &x[2], f64::NAN, &ok).is_err());
    let ids = Tensor::zeros((1, 4, 5, 8), DType::U32, &Device::Cpu).unwrap();
    assert!(flash_attention(&ids, &x[1], &x[2], 0.3, &ok).is_err());
    assert!(flash_attention(&x[0].flatten_all().unwrap(), &x[1], &x[2], 0.3, &ok).is_err());
}

#[test]
fn non_contiguous_inputs() {
    // q as a transposed view, the way the model produces it before `.contiguous()`.
    let mask = AttentionMask::causal_self(0, 9);
    let x = qkv(1, 2, 2, 9, 9, 4, DType::F32, 6);
    let q_view = x[0].transpose(1, 2).unwrap().contiguous().unwrap().transpose(1, 2).unwrap();
    assert!(!q_view.is_contiguous());
    let a = flash_attention(&q_view, &x[1], &x[2], 0.5, &mask).unwrap();
    let b = flash_attention(&x[0], &x[1], &x[2], 0.5, &mask).unwrap();
    crate::nn::ops::testing::assert_close("view", &a, &b, 0.0, 0.0);
}

/// Keys and values read in place from a larger buffer, as a KV cache hands them over (the
/// filled prefix of `(B, KV, capacity, hd)`, strided between heads), give bit-identical output
/// and gradients to contiguous copies of the same values.
#[test]
fn keys_in_a_larger_buffer_are_read_in_place() {
    let bits = |t: &Tensor| -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
    };
    for (b, h, kv, t, s, capacity) in [(2, 4, 2, 1, 70, 128), (1, 6, 3, 5, 9, 64), (2, 2, 1, 1, 1, 8)] {
        let x = qkv(b, h, kv, t, s, 8, DType::F32, 40 + s as u64);
        let in_buffer = |x: &Tensor| {
            let buffer = Tensor::zeros((b, kv, capacity, 8), DType::F32, &Device::Cpu).unwrap();
            buffer.slice_set(x, 2, 0).unwrap();
            buffer
        };
        let mask = AttentionMask::causal(s - t, (0..s).collect()).with_alibi(Some(alibi_slopes(h, 8.0)));
        let contiguous = flash(0.4, mask.clone());
        let (contiguous_out, contiguous_grads) = value_and_grads(&contiguous, &x);
        // The inputs are the whole buffers; the op sees views of their first `s` slots.
        let prefix = |x: &Tensor| x.narrow(2, 0, s);
        let viewed = |x: &[Tensor]| {
            let (k, v) = (prefix(&x[1])?, prefix(&x[2])?);
            assert!(!k.is_contiguous() && head_strides(k.layout()).is_some());
            contiguous(&[x[0].clone(), k, v])
        };
        let buffers = [x[0].clone(), in_buffer(&x[1]), in_buffer(&x[2])];
        let (view_out, view_grads) = value_and_grads(&viewed, &buffers);
        assert_eq!(bits(&view_out), bits(&contiguous_out), "output, B={b} S={s}");
        assert_eq!(bits(&view_grads[0]), bits(&contiguous_grads[0]), "dq, B={b} S={s}");
        for i in [1, 2] {
            assert_eq!(bits(&prefix(&view_grads[i]).unwrap()), bits(&contiguous_grads[i]), "gradient {i}, B={b} S={s}");
        }
    }
}

#[test]
fn empty_dims_do_not_panic() {
    // No keys: every query sees nothing → zeros, and no gradient. No queries: an empty output.
    let x = qkv(1, 2, 1, 3, 0, 4, DType::F32, 8);
    let (out, grads) = value_and_grads(&flash(0.5, AttentionMask::causal(0, vec![])), &x);
    assert_eq!(out.dims(), &[1, 2, 3, 4]);
    assert_eq!(out.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    assert_eq!(grads[0].abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    let x = qkv(1, 2, 1, 0, 5, 4, DType::F32, 8);
    let (out, grads) = value_and_grads(&flash(0.5, AttentionMask::causal(0, (0..5).collect())), &x);
    assert_eq!(out.dims(), &[1, 2, 0, 4]);
    assert_eq!(grads[1].abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
}

/// The token-major entry point `(B, T, heads·hd)` gives exactly the head-major results, values
/// and every gradient, with GQA, a window, ALiBi and keys from a "cache" (S ≠ T).
#[test]
fn token_major_matches_head_major() {
    let (b, h, kv, t, s, hd) = (2, 4, 2, 70, 75, 5);
    let mask = AttentionMask::causal(5, (0..s).collect()).with_window(Some(33)).with_alibi(Some(alibi_slopes(h, 8.0)));
    let heads = qkv(b, h, kv, t, s, hd, DType::F64, 9);
    // The same data token-major.
    let tokens: Vec<Tensor> =
        heads.iter().map(|x| x.transpose(1, 2).unwrap().flatten_from(2).unwrap().contiguous().unwrap()).collect();
    let (want, want_grads) = value_and_grads(&flash(0.4, mask.clone()), &heads);
    let token_major = |x: &[Tensor]| flash_attention_tokens(&x[0], &x[1], &x[2], h, kv, 0.4, &mask);
    // Viewed head-major again, so both runs get the same upstream gradient.
    let viewed = |x: &[Tensor]| token_major(x)?.reshape((b, t, h, hd))?.transpose(1, 2);
    let (got, got_grads) = value_and_grads(&viewed, &tokens);
    let as_tokens = |x: &Tensor| x.transpose(1, 2).unwrap().flatten_from(2).unwrap();
    crate::nn::ops::testing::assert_close("value", &got, &want, 1e-12, 1e-12);
    for (i, (g, w)) in got_grads.iter().zip(&want_grads).enumerate() {
        crate::nn::ops::testing::assert_close(&format!("grad {i}"), g, &as_tokens(w), 1e-12, 1e-12);
    }
    let short = [tokens[0].narrow(1, 0, 3), tokens[1].narrow(1, 0, 8), tokens[2].narrow(1, 0, 8)]
        .map(|x| x.unwrap().contiguous().unwrap());
    let short_mask =
        AttentionMask::causal(5, (0..8).collect()).with_window(Some(4)).with_alibi(mask.alibi_slopes.clone());
    let short_fn = |x: &[Tensor]| flash_attention_tokens(&x[0], &x[1], &x[2], h, kv, 0.4, &short_mask);
    check_finite_differences(&short_fn, &short, &[0, 1, 2], 1e-6);
    // Widths that are not a whole number of heads are errors, not panics.
    assert!(flash_attention_tokens(&tokens[0], &tokens[1], &tokens[2], 3, kv, 0.4, &mask).is_err());
}

/// The fused entry point (`qkv` in one tensor, RoPE inside) gives the results of the separate
/// path it replaces (narrow, `rope_tokens` on q and k, `flash_attention_tokens`): values and
/// the gradient of `qkv`, with GQA, a window, partial rotary dims, and without RoPE (ALiBi).
#[test]
fn fused_qkv_matches_separate_projections() {
    use crate::nn::ops::{flash_attention_qkv, rope_tokens};
    let (b, h, kv, t, hd, rot) = (2, 4, 2, 70, 6, 4);
    let width = (h + 2 * kv) * hd;
    let qkv = (rand_tensor(&[b, t, width], 11, DType::F64) * 2.0).unwrap();
    let angles = rand_tensor(&[t, rot], 12, DType::F64);
    let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
    for (rope, alibi) in [(true, None), (false, Some(alibi_slopes(h, 8.0)))] {
        let mask = AttentionMask::causal_self(3, t).with_window(Some(33)).with_alibi(alibi);
        let tables = rope.then_some((&cos, &sin));
        let fused = |x: &[Tensor]| flash_attention_qkv(&x[0], h, kv, 0.4, &mask, tables);
        let separate = |x: &[Tensor]| {
            let part = |first: usize, n: usize| x[0].narrow(2, first * hd, n * hd);
            let (mut q, mut k, v) = (part(0, h)?, part(h, kv)?, part(h + kv, kv)?);
            if rope {
                (q, k) = (rope_tokens(&q, &cos, &sin, hd)?, rope_tokens(&k, &cos, &sin, hd)?);
            }
            flash_attention_tokens(&q, &k, &v, h, kv, 0.4, &mask)
        };
        let inputs = [qkv.clone()];
        let (got, got_grads) = value_and_grads(&fused, &inputs);
        let (want, want_grads) = value_and_grads(&separate, &inputs);
        crate::nn::ops::testing::assert_close("value", &got, &want, 1e-12, 1e-12);
        crate::nn::ops::testing::assert_close("d(qkv)", &got_grads[0], &want_grads[0], 1e-12, 1e-12);
        let short = [qkv.narrow(1, 0, 9).unwrap().contiguous().unwrap()];
        let short_mask = AttentionMask::causal_self(3, 9).with_window(Some(4)).with_alibi(mask.alibi_slopes.clone());
        let short_tables = (cos.narrow(0, 0, 9).unwrap(), sin.narrow(0, 0, 9).unwrap());
        let short_fn = |x: &[Tensor]| {
            flash_attention_qkv(&x[0], h, kv, 0.4, &short_mask, rope.then_some((&short_tables.0, &short_tables.1)))
        };
        check_finite_differences(&short_fn, &short, &[0], 1e-6);
    }
    // A width that is not a whole number of heads, or tables for other positions, are errors.
    let mask = AttentionMask::causal_self(0, t);
    assert!(flash_attention_qkv(&qkv, 3, kv, 0.4, &mask, None).is_err());
    let wrong = cos.narrow(0, 0, 5).unwrap();
    assert!(flash_attention_qkv(&qkv, h, kv, 0.4, &mask, Some((&wrong, &wrong))).is_err());
}

/// Right-padded key lengths (one row with every key, one short, one empty), with bidirectional
/// attention, cross-attention (`T ≠ S`) and causal attention: gradients against f64 finite
/// differences, across tile boundaries.
#[test]
fn key_padding_gradients_match_finite_differences() {
    let cases = [
        ("bidirectional", 6, 6, AttentionMask::bidirectional(6)),
        ("cross", 4, 9, AttentionMask::bidirectional(9)),
        ("causal", 7, 7, AttentionMask::causal_self(0, 7)),
    ];
    for (name, t, s, mask) in cases {
        let mask = mask.with_key_lengths(Some(vec![s, s - 3, 0]));
        let inputs = qkv(3, 2, 1, t, s, 3, DType::F64, 21);
        check_finite_differences(&flash(0.6, mask), &inputs, &[0, 1, 2], 1e-6);
        eprintln!("{name}: ok");
    }
    // Two key tiles with a row that ends in the first one: its second tile is skipped whole.
    let mask = AttentionMask::bidirectional(70).with_key_lengths(Some(vec![70, 5]));
    check_finite_differences(&flash(0.5, mask), &qkv(2, 2, 2, 3, 70, 2, DType::F64, 22), &[0, 1, 2], 1e-6);
}

/// Padding against the composed path (which materialises the `-inf` bias), values and every
/// gradient, over sizes around the tile and every kind of attention.
#[test]
fn key_padding_matches_naive_attention() {
    for &(t, s) in &[(1usize, 7usize), (63, 64), (65, 130), (130, 65), (200, 200)] {
        let lengths = vec![s, (s / 3).max(1), s - 1];
        let cases = [
            ("bidirectional/cross", AttentionMask::bidirectional(s)),
            ("causal", AttentionMask::causal(s.saturating_sub(t), (0..s).collect())),
        ];
        for (name, mask) in cases {
            let mask = mask.with_key_lengths(Some(lengths.clone()));
            let inputs = qkv(3, 4, 2, t, s, 8, DType::F32, (t * 7 + s) as u64);
            let what = format!("{name}: T {t}, S {s}, lengths {lengths:?}");
            check_against_composed(&what, &flash(0.35, mask.clone()), &composed(0.35, mask), &inputs, 1e-5);
        }
    }
}

/// Dropout on the probabilities: the kernel's masks are the composed path's (one hash of the
/// element index), the gradients match finite differences with the mask held fixed, and the
/// output is the undropped attention's in expectation.
#[test]
fn attention_dropout_matches_the_composed_mask_and_finite_differences() {
    let drop = |seed| Some(DropoutMask::new(0.3, seed).unwrap());
    let small = AttentionMask::bidirectional(9).with_key_lengths(Some(vec![9, 4])).with_dropout(drop(3));
    check_finite_differences(&flash(0.6, small), &qkv(2, 2, 1, 5, 9, 3, DType::F64, 31), &[0, 1, 2], 1e-6);
    let causal = AttentionMask::causal_self(0, 70).with_dropout(drop(4));
    check_finite_differences(&flash(0.6, causal), &qkv(1, 2, 2, 70, 70, 2, DType::F64, 32), &[0, 1, 2], 1e-6);
    for (name, mask) in [
        ("causal", AttentionMask::causal_self(0, 130).with_alibi(Some(alibi_slopes(4, 8.0)))),
        ("cross", AttentionMask::bidirectional(70).with_key_lengths(Some(vec![70, 33]))),
    ] {
        let mask = mask.with_dropout(drop(5));
        let t = if name == "cross" { 100 } else { 130 };
        let inputs = qkv(2, 4, 2, t, mask.key_positions.len(), 8, DType::F32, 33);
        check_against_composed(name, &flash(0.35, mask.clone()), &composed(0.35, mask), &inputs, 1e-5);
    }
    // Averaged over many masks, dropout leaves the output unbiased.
    let inputs = qkv(1, 1, 1, 4, 6, 4, DType::F64, 34);
    let plain = flash_attention(&inputs[0], &inputs[1], &inputs[2], 0.5, &AttentionMask::bidirectional(6)).unwrap();
    let mut mean = plain.zeros_like().unwrap();
    let draws = 4000;
    for seed in 0..draws {
        let mask = AttentionMask::bidirectional(6).with_dropout(drop(seed));
        mean = (mean + flash_attention(&inputs[0], &inputs[1], &inputs[2], 0.5, &mask).unwrap()).unwrap();
    }
    let mean = (mean / draws as f64).unwrap();
    crate::nn::ops::testing::assert_close("mean over masks", &mean, &plain, 0.0, 0.03);
}

/// Bidirectional self-attention with padding and dropout through the fused q/k/v entry point
/// (the encoder's training path) gives what the separate projections give.
#[test]
fn fused_qkv_with_padding_and_dropout_matches_separate_projections() {
    use crate::nn::ops::flash_attention_qkv;
    let (b, h, kv, t, hd) = (3, 4, 2, 70, 6);
    let qkv_input = (rand_tensor(&[b, t, (h + 2 * kv) * hd], 41, DType::F64) * 2.0).unwrap();
    let mask = AttentionMask::bidirectional(t)
        .with_key_lengths(Some(vec![70, 12, 65]))
        .with_dropout(Some(DropoutMask::new(0.2, 9).unwrap()));
    let fused = |x: &[Tensor]| flash_attention_qkv(&x[0], h, kv, 0.4, &mask, None);
    let separate = |x: &[Tensor]| {
        let part = |first: usize, n: usize| x[0].narrow(2, first * hd, n * hd);
        flash_attention_tokens(&part(0, h)?, &part(h, kv)?, &part(h + kv, kv)?, h, kv, 0.4, &mask)
    };
    let inputs = [qkv_input];
    let (got, got_grads) = value_and_grads(&fused, &inputs);
    let (want, want_grads) = value_and_grads(&separate, &inputs);
    crate::nn::ops::testing::assert_close("value", &got, &want, 1e-12, 1e-12);
    crate::nn::ops::testing::assert_close("d(qkv)", &got_grads[0], &want_grads[0], 1e-12, 1e-12);
}

#[test]
fn bad_key_lengths_are_errors() {
    let x = qkv(2, 2, 2, 3, 5, 4, DType::F32, 50);
    let run = |lengths: Vec<usize>| {
        flash_attention(&x[0], &x[1], &x[2], 0.5, &AttentionMask::bidirectional(5).with_key_lengths(Some(lengths)))
    };
    assert!(run(vec![5, 2]).is_ok());
    let err = run(vec![5]).unwrap_err().to_string();
    assert!(err.contains("1 key lengths for a batch of B = 2"), "{err}");
    let err = run(vec![5, 6]).unwrap_err().to_string();
    assert!(err.contains("key length 6"), "{err}");
}
