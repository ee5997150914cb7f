//! Every op on every test device: on a GPU the ops run their composed formulation (candle's
//! ops, with CUDA kernels and autograd), and each must give the CPU kernel's values and input
//! gradients. Without a GPU (or a build without the `cuda` feature) only the CPU side runs and
//! `crate::device::test_devices` prints why; `LMFORGE_REQUIRE_CUDA=1` makes that a failure.
//!
//! The products at bf16 are checked here on the CPU too: [`device_linear`] is the formulation a
//! GPU runs (bf16 operands through candle's matmul), and it must track the CPU's bf16 kernel.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, Var};

use super::linear::device_linear;
use super::testing::{assert_close, check_on_devices, rand_tensor, value_and_grads};
use super::*;
use crate::nn::positions::{alibi_slopes, Rope};

const RTOL: f64 = 1e-4;

/// `(B, H, T, hd)` queries and `(B, KV, S, hd)` keys/values.
fn qkv(b: usize, h: usize, kv: usize, t: usize, hd: usize) -> Vec<Tensor> {
    vec![
        (rand_tensor(&[b, h, t, hd], 1, DType::F32) * 2.0).unwrap(),
        (rand_tensor(&[b, kv, t, hd], 2, DType::F32) * 2.0).unwrap(),
        rand_tensor(&[b, kv, t, hd], 3, DType::F32),
    ]
}

#[test]
fn attention_on_every_device() {
    let t = 37;
    let masks = [
        ("causal GQA", AttentionMask::causal_self(0, t)),
        ("windowed", AttentionMask::causal_self(0, t).with_window(Some(8))),
        ("ALiBi", AttentionMask::causal_self(0, t).with_alibi(Some(alibi_slopes(4, 8.0)))),
        ("padded", AttentionMask::bidirectional(t).with_key_lengths(Some(vec![t, 20]))),
        ("dropout", AttentionMask::causal_self(0, t).with_dropout(Some(DropoutMask::new(0.2, 11).unwrap()))),
    ];
    for (what, mask) in masks {
        let op = |x: &[Tensor]| flash_attention(&x[0], &x[1], &x[2], 0.35, &mask);
        check_on_devices(&format!("flash attention, {what}"), &op, &qkv(2, 4, 2, t, 8), RTOL);
    }
    // The token-major entry points the model calls, RoPE fused into the second.
    let mask = AttentionMask::causal_self(0, t);
    let tokens = |x: &[Tensor]| {
        let (q, k, v) = (x[0].transpose(1, 2)?.flatten_from(2)?, x[1].transpose(1, 2)?.flatten_from(2)?, &x[2]);
        let v = v.transpose(1, 2)?.flatten_from(2)?;
        flash_attention_tokens(&q, &k, &v, 4, 2, 0.35, &mask)
    };
    check_on_devices("flash attention, token-major", &tokens, &qkv(2, 4, 2, t, 8), RTOL);
    let (cos, sin) = Rope::new(10_000.0, 8, None).tables(0, t, &Device::Cpu).unwrap();
    let fused_qkv = |x: &[Tensor]| {
        let (cos, sin) = (cos.to_device(x[0].device())?, sin.to_device(x[0].device())?);
        flash_attention_qkv(&x[0], 4, 2, 0.35, &mask, Some((&cos, &sin)))
    };
    check_on_devices(
        "flash attention, fused qkv + RoPE",
        &fused_qkv,
        &[rand_tensor(&[2, t, 8 * 8], 4, DType::F32)],
        RTOL,
    );
}

#[test]
fn norms_rope_and_activations_on_every_device() {
    let x = rand_tensor(&[3, 5, 24], 1, DType::F32);
    let w = (rand_tensor(&[24], 2, DType::F32) + 1.0).unwrap();
    let b = rand_tensor(&[24], 3, DType::F32);
    check_on_devices("rms_norm", &|x: &[Tensor]| rms_norm(&x[0], &x[1], 1e-5), &[x.clone(), w.clone()], RTOL);
    check_on_devices(
        "layer_norm",
        &|x: &[Tensor]| layer_norm(&x[0], &x[1], Some(&x[2]), 1e-5),
        &[x.clone(), w, b],
        RTOL,
    );

    let (cos, sin) = Rope::new(10_000.0, 8, None).tables(3, 7, &Device::Cpu).unwrap();
    let q = rand_tensor(&[2, 3, 7, 12], 4, DType::F32);
    check_on_devices("rope (partial rotary)", &|x: &[Tensor]| rope(&x[0], &x[1], &x[2]), &[q, cos, sin], RTOL);

    let (gate, up) = (rand_tensor(&[4, 33], 5, DType::F32), rand_tensor(&[4, 33], 6, DType::F32));
    check_on_devices("swiglu", &|x: &[Tensor]| swiglu(&x[0], &x[1]), &[gate, up], RTOL);
    let h = (rand_tensor(&[4, 33], 7, DType::F32) * 3.0).unwrap();
    check_on_devices("gelu_tanh", &|x: &[Tensor]| gelu_tanh(&x[0]), std::slice::from_ref(&h), RTOL);
    check_on_devices("gelu_erf", &|x: &[Tensor]| gelu_erf(&x[0]), &[h], RTOL);
    check_on_devices("dropout", &|x: &[Tensor]| dropout(&x[0], 0.3, 9), &[x], RTOL);
}

#[test]
fn cross_entropy_on_every_device() {
    let logits = (rand_tensor(&[2, 6, 50], 1, DType::F32) * 4.0).unwrap();
    let targets = Tensor::new(&[[1u32, 7, 49, 0, 3, 3], [8, 9, 10, 0, 22, 41]], &Device::Cpu).unwrap();
    for (ignore, smoothing) in [(None, 0.0), (Some(0), 0.0), (Some(3), 0.1)] {
        let op =
            |x: &[Tensor]| label_smoothed_cross_entropy(&x[0], &targets.to_device(x[0].device())?, ignore, smoothing);
        check_on_devices(
            &format!("cross-entropy, ignore {ignore:?}, smoothing {smoothing}"),
            &op,
            std::slice::from_ref(&logits),
            RTOL,
        );
    }
}

#[test]
fn products_on_every_device_at_both_precisions() {
    let x = rand_tensor(&[2, 5, 24], 1, DType::F32);
    let w = rand_tensor(&[32, 24], 2, DType::F32);
    let b = rand_tensor(&[32], 3, DType::F32);
    // bf16 operands: the GPU's rounding of each product's output to bf16 is not the CPU's.
    for (precision, rtol) in [(Precision::F32, RTOL), (Precision::Bf16, 2e-2)] {
        let _scope = precision.enter().unwrap();
        let plain = |x: &[Tensor]| linear(&x[0], &x[1], Some(&x[2]));
        check_on_devices(&format!("linear at {precision}"), &plain, &[x.clone(), w.clone(), b.clone()], rtol);
        let gated = |x: &[Tensor]| linear_then(&x[0], &x[1], None, Epilogue::SwiGlu);
        check_on_devices(&format!("linear + SwiGLU at {precision}"), &gated, &[x.clone(), w.clone()], rtol);

        // A mixture's experts: 7 tokens sorted into 3 groups (one of them empty).
        let dispatch = Arc::new(Dispatch::sort(7, 3, &[0, 1, 2, 3, 4, 5, 6], &[2, 0, 2, 0, 2, 2, 0]).unwrap());
        let rows = rand_tensor(&[7, 24], 4, DType::F32);
        let stacked = rand_tensor(&[3 * 16, 24], 5, DType::F32);
        let grouped = |x: &[Tensor]| grouped_linear(&x[0], &x[1], None, &dispatch, Some(Epilogue::GeluTanh));
        check_on_devices(&format!("grouped_linear at {precision}"), &grouped, &[rows, stacked], rtol);
    }
}

#[test]
fn gather_and_combine_rows_on_every_device() {
    let dispatch = Arc::new(Dispatch::sort(4, 2, &[0, 0, 1, 2, 3, 3], &[0, 1, 1, 0, 0, 1]).unwrap());
    let x = rand_tensor(&[4, 8], 1, DType::F32);
    check_on_devices("gather_rows", &|x: &[Tensor]| gather_rows(&x[0], &dispatch), &[x], RTOL);
    let y = rand_tensor(&[6, 8], 2, DType::F32);
    let weights = rand_tensor(&[6], 3, DType::F32);
    check_on_devices("combine_rows", &|x: &[Tensor]| combine_rows(&x[0], &x[1], &dispatch), &[y, weights], RTOL);
}

/// The formulation a GPU runs at bf16 (bf16 operands through candle's matmul) tracks the CPU's
/// bf16 kernel, values and gradients, and differs from f32 by bf16 rounding, not more.
#[test]
fn the_device_formulation_at_bf16_tracks_the_cpu_kernel() {
    let inputs = [
        rand_tensor(&[3, 7, 48], 1, DType::F32),
        rand_tensor(&[40, 48], 2, DType::F32),
        rand_tensor(&[40], 3, DType::F32),
    ];
    let _bf16 = Precision::Bf16.enter().unwrap();
    let (kernel, kernel_grads) = value_and_grads(&|x: &[Tensor]| linear(&x[0], &x[1], Some(&x[2])), &inputs);
    let (device, device_grads) =
        value_and_grads(&|x: &[Tensor]| device_linear(&x[0], &x[1], Some(&x[2]), None), &inputs);
    assert_close("bf16 product: value", &device, &kernel, 2e-2, 2e-2);
    for (i, (d, k)) in device_grads.iter().zip(&kernel_grads).enumerate() {
        assert_close(&format!("bf16 product: grad of input {i}"), d, k, 2e-2, 2e-2);
    }
    // And it is really at bf16: not the f32 product.
    drop(_bf16);
    let (f32_value, _) = value_and_grads(&|x: &[Tensor]| device_linear(&x[0], &x[1], Some(&x[2]), None), &inputs);
    let differs = (&f32_value - &device).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(differs > 1e-5, "the bf16 scope did not change the device product ({differs})");
}

/// AdamW with the global-norm clip on each device (the tensor-op kernel off the CPU) takes the
/// CPU's fused steps.
#[test]
fn adamw_with_clipping_on_every_device() {
    use crate::train::optim::{AdamW, AdamWConfig, Param};
    let run = |device: &Device| -> Result<Vec<Vec<f32>>> {
        let vars: Vec<Var> = (0..3)
            .map(|i| Var::from_tensor(&rand_tensor(&[5 + i, 3], 10 + i as u64, DType::F32).to_device(device)?))
            .collect::<Result<_>>()?;
        let params = vars
            .iter()
            .enumerate()
            .map(|(i, v)| Param { name: format!("p{i}"), var: v.clone(), decay: i != 1 })
            .collect();
        let mut optimizer =
            AdamW::new(AdamWConfig::default(), params).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        for step in 0..4u64 {
            // A loss whose gradient norm is above the clip in the first steps.
            let loss = vars
                .iter()
                .enumerate()
                .map(|(i, v)| (v.as_tensor().sqr()? * (3.0 + (i as u64 + step) as f64))?.sum_all())
                .collect::<Result<Vec<_>>>()?;
            let mut grads = Tensor::stack(&loss, 0)?.sum_all()?.backward()?;
            optimizer.clip_grad_norm(&mut grads, 1.0).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            optimizer.step(&grads, 1e-2).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        }
        vars.iter().map(|v| v.as_tensor().flatten_all()?.to_vec1::<f32>()).collect()
    };
    let on_cpu = run(&Device::Cpu).unwrap();
    for device in crate::device::test_devices().into_iter().filter(|d| !d.is_cpu()) {
        let on_device = run(&device).unwrap();
        for (a, b) in on_device.iter().flatten().zip(on_cpu.iter().flatten()) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "AdamW on {device:?}: {a} vs {b} on the CPU");
        }
    }
}
