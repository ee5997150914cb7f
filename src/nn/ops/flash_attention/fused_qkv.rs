//! Self-attention straight from the fused q/k/v projection, with RoPE applied inside the op.
//!
//! ```text
//! forward                                          | backward (upstream dY)
//! q, k, v = split(qkv);  q', k' = R·q, R·k  (RoPE) | dq', dk', dv = flash backward(q', k', v, dY)
//! y = flash(q', k', v)  (token-major)              | d(qkv) = join(Rᵀ·dq', Rᵀ·dk', dv)
//! ```
//!
//! Why: the training step otherwise has three projections, two RoPE ops and the attention as
//! separate autograd nodes, and candle's backward pass zero-fills and adds a gradient for every
//! one of their inputs (the normed activations alone got three). Here one product fills `qkv`
//! and one node turns it into the attention output. The kernels read `q`, `k` and `v` by head
//! straight from `qkv`'s token rows (the split copies nothing), and the backward reads them
//! there again, with the output gradient and the op's own output (for `D`) where they lie.
//! Only with RoPE is anything copied: the rotated `q` and `k`, head-major, made in the one pass
//! that rotates them and kept for the backward (`(H + KV)·hd` floats per token and layer).

use std::sync::{Arc, OnceLock};

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};

use super::{backward, forward, reorder_heads, AttentionMask, HeadRows, Plan};
use crate::nn::ops::rope::{check_tables, rotate_rows};
use crate::nn::ops::simd::Real;
use crate::nn::ops::{compute_dtype, output_buffer, parallel, storage_slice, with_slices};

/// Causal self-attention of `qkv` `(B, T, (H + 2·KV)·hd)`, each token's row holding its `H`
/// query heads, then `KV` key heads, then `KV` value heads (as one projection with the three
/// weights stacked produces them) → `(B, T, H·hd)`, ready for the output projection.
///
/// `rope`: the `(T, rot)` cos/sin tables of the T positions, applied to q and k first.
/// `mask` must describe self-attention: `T` keys, those of the queries. Gradients flow to `qkv`.
pub fn flash_attention_qkv(
    qkv: &Tensor,
    heads: usize,
    kv_heads: usize,
    scale: f64,
    mask: &AttentionMask,
    rope: Option<(&Tensor, &Tensor)>,
) -> Result<Tensor> {
    let (b, t, width) = qkv.dims3().map_err(|_| {
        candle_core::Error::Msg(format!(
            "flash_attention: qkv must be (B, T, (H + 2·KV)·head_dim), got {:?}",
            qkv.dims()
        ))
    })?;
    let all_heads = heads + 2 * kv_heads;
    if kv_heads == 0 || width % all_heads != 0 {
        bail!("flash_attention: qkv has width {width}, not a multiple of its {heads} + 2·{kv_heads} heads")
    }
    let hd = width / all_heads;
    // Head-major views of the three parts, to check shapes (and for other devices). Split the
    // heads before narrowing: a reshape of the narrowed (strided) width would copy it.
    let by_head = qkv.reshape((b, t, all_heads, hd))?;
    let part = |first: usize, n: usize| -> Result<Tensor> { by_head.narrow(2, first, n)?.transpose(1, 2) };
    let (q, k, v) = (part(0, heads)?, part(heads, kv_heads)?, part(heads + kv_heads, kv_heads)?);
    if let Some((cos, sin)) = rope {
        check_tables(&q, cos, sin)?;
    }
    let plan = Plan::new(&q, &k, &v, scale, mask)?;
    if !crate::nn::ops::route::uses_cpu_kernel(qkv.device()) {
        let (q, k) = match rope {
            Some((cos, sin)) => (crate::nn::ops::rope(&q, cos, sin)?, crate::nn::ops::rope(&k, cos, sin)?),
            None => (q, k),
        };
        let y = super::composed_attention(&q, &k, &v, scale, mask)?;
        return y.transpose(1, 2)?.reshape((b, t, heads * hd));
    }
    let dtype = qkv.dtype();
    let compute = compute_dtype("flash_attention", dtype)?;
    let contiguous = |t: &Tensor| t.to_dtype(compute)?.contiguous();
    let qkv = contiguous(qkv)?;
    let op = FusedAttention { plan: Arc::new(plan), save_for_backward: qkv.track_op(), saved: OnceLock::new() };
    let y = match rope {
        Some((cos, sin)) => qkv.apply_op3(&contiguous(cos)?, &contiguous(sin)?, op)?,
        None => qkv.apply_op1(op)?,
    };
    y.to_dtype(dtype)
}

struct FusedAttention {
    plan: Arc<Plan>,
    /// Only keep [`Saved`] when `qkv` wants a gradient.
    save_for_backward: bool,
    /// Set by the forward.
    saved: OnceLock<Saved>,
}

/// What the forward leaves for the backward (which reads `qkv` and the output themselves).
struct Saved {
    /// `(B, H, T)`: the log-sum-exp `L` of each query row.
    lse: Tensor,
    /// With RoPE: the rotated `q` `(B, H, T, hd)` and `k` `(B, KV, T, hd)`.
    rotated: Option<(Tensor, Tensor)>,
}

/// The rotated `(q, k)` head-major (`(B, H, T, hd)`, `(B, KV, T, hd)`) from token-major `qkv`
/// and the `(T, rot)` tables. One task per (batch, head) writes that head's `T` rows.
fn rotate<T: Real>(p: &Plan, qkv: &[T], (cos, sin): (&[T], &[T])) -> (Vec<T>, Vec<T>) {
    let (t, hd) = (p.t, p.hd);
    let all_heads = p.h + 2 * p.kv;
    let rot = cos.len() / t.max(1);
    let q_len = p.b * p.h * t * hd;
    // SAFETY: the tasks write every head's rows whole, and together cover the buffer.
    let mut heads: Vec<T> = unsafe { output_buffer(q_len + p.b * p.kv * t * hd) };
    parallel::for_each_chunk(&mut heads, t * hd, |i, dst| {
        // Chunk `i` is a head of batch `b` in q or k; `column` is its slot in a token's row.
        let (b, column) = if i < p.b * p.h {
            (i / p.h, i % p.h)
        } else {
            let j = i - p.b * p.h;
            (j / p.kv, p.h + j % p.kv)
        };
        for (ti, row) in dst.chunks_exact_mut(hd).enumerate() {
            let src = &qkv[((b * t + ti) * all_heads + column) * hd..][..hd];
            rotate_rows(false, hd, 1, src, &cos[ti * rot..][..rot], &sin[ti * rot..][..rot], row)
        }
    });
    let k = heads.split_off(q_len);
    (heads, k)
}

/// `q` `(B, H, T, hd)`, `k` and `v` `(B, KV, T, hd)` as the kernels read them: `v`, and `q`
/// and `k` without `rotated` ones, by head from `qkv`'s token rows.
fn views<'a, T>(p: &Plan, qkv: &'a [T], rotated: Option<(&'a [T], &'a [T])>) -> [HeadRows<'a, T>; 3] {
    let width = (p.h + 2 * p.kv) * p.hd;
    let part = |first, heads| HeadRows::token_major(qkv, p.t, width, first, heads, p.hd);
    let v = part(p.h + p.kv, p.kv);
    match rotated {
        Some((q, k)) => [HeadRows::head_major(q, p.h, p.t, p.hd), HeadRows::head_major(k, p.kv, p.t, p.hd), v],
        None => [part(0, p.h), part(p.h, p.kv), v],
    }
}

/// The inverse of the split [`views`] reads, for gradients: `d(qkv)` token-major from
/// head-major `dq`, `dk`, `dv`, the q and k parts rotated back (`Rᵀ`) when tables are given.
/// One task per token.
fn join<T: Real>(p: &Plan, dq: &[T], dk: &[T], dv: &[T], tables: Option<(&[T], &[T])>) -> Vec<T> {
    let (t, hd) = (p.t, p.hd);
    let all_heads = p.h + 2 * p.kv;
    let rot = tables.map_or(0, |(cos, _)| cos.len() / t.max(1));
    // SAFETY: each task writes its token's row whole.
    let mut dqkv: Vec<T> = unsafe { output_buffer(p.b * t * all_heads * hd) };
    parallel::for_each_chunk(&mut dqkv, all_heads * hd, |bt, dst| {
        let (b, ti) = (bt / t, bt % t);
        for (column, row) in dst.chunks_exact_mut(hd).enumerate() {
            let (src, n, h, rotated) = if column < p.h {
                (dq, p.h, column, true)
            } else if column < p.h + p.kv {
                (dk, p.kv, column - p.h, true)
            } else {
                (dv, p.kv, column - p.h - p.kv, false)
            };
            let src = &src[((b * n + h) * t + ti) * hd..][..hd];
            match tables {
                Some((cos, sin)) if rotated => {
                    rotate_rows(true, hd, 1, src, &cos[ti * rot..][..rot], &sin[ti * rot..][..rot], row)
                }
                _ => row.copy_from_slice(src),
            }
        }
    });
    dqkv
}

impl FusedAttention {
    fn fwd<T: Real>(&self, qkv: &[T], tables: Option<(&[T], &[T])>) -> Result<(CpuStorage, Shape)> {
        let p = &self.plan;
        let rotated = tables.map(|tables| rotate(p, qkv, tables));
        let [q, k, v] = views(p, qkv, rotated.as_ref().map(|(q, k)| (&q[..], &k[..])));
        let (out, lse) = forward(p, q, k, v);
        let tokens = reorder_heads(&out, p.b, p.t, p.h, p.hd, false);
        if self.save_for_backward {
            let heads = |x: Vec<T>, n: usize| Tensor::from_vec(x, (p.b, n, p.t, p.hd), &Device::Cpu);
            let saved = Saved {
                lse: Tensor::from_vec(lse, (p.b, p.h, p.t), &Device::Cpu)?,
                rotated: rotated
                    .map(|(q, k)| Ok::<_, candle_core::Error>((heads(q, p.h)?, heads(k, p.kv)?)))
                    .transpose()?,
            };
            // A fresh op runs its forward once; a second set would be a bug, not user input.
            let _ = self.saved.set(saved);
        }
        Ok((T::to_cpu_storage_owned(tokens), Shape::from((p.b, p.t, p.h * p.hd))))
    }

    fn cpu_fwd_any(&self, inputs: &[(&CpuStorage, &Layout)]) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(op: &FusedAttention, inputs: &[(&CpuStorage, &Layout)]) -> Result<(CpuStorage, Shape)> {
            let s = inputs
                .iter()
                .map(|(storage, layout)| storage_slice::<T>("flash_attention", storage, layout))
                .collect::<Result<Vec<_>>>()?;
            op.fwd(s[0], (s.len() == 3).then(|| (s[1], s[2])))
        }
        match inputs[0].0 {
            CpuStorage::F32(_) => run::<f32>(self, inputs),
            CpuStorage::F64(_) => run::<f64>(self, inputs),
            other => Err(candle_core::Error::UnsupportedDTypeForOp(
                candle_core::backend::BackendStorage::dtype(other),
                "flash_attention",
            )),
        }
    }

    /// `d(qkv)` for the saved forward, whose output was `out` `(B, T, H·hd)`.
    fn bwd_any(&self, qkv: &Tensor, tables: Option<(&Tensor, &Tensor)>, out: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let Some(saved) = self.saved.get() else {
            bail!("flash_attention: backward without a saved forward (qkv required no gradient)")
        };
        fn run<T: Real>(p: &Plan, tensors: &[&Tensor]) -> Result<Tensor> {
            let lse = tensors[1].to_dtype(T::DTYPE)?;
            let mut inputs = vec![tensors[0], &lse];
            inputs.extend(&tensors[2..]);
            let dqkv = with_slices::<T, _>("flash_attention", &inputs, |s| {
                let (grad, lse, qkv, out) = (s[0], s[1], s[2], s[3]);
                // Then the rotated q and k, and the tables, with RoPE.
                let (rotated, tables) = match s.len() {
                    8 => (Some((s[4], s[5])), Some((s[6], s[7]))),
                    _ => (None, None),
                };
                let [q, k, v] = views(p, qkv, rotated);
                let [out, dout] = [out, grad].map(|x| HeadRows::queries_token_major(p, x));
                let (dq, dk, dv) = backward(p, q, k, v, out, dout, lse);
                Ok(join(p, &dq, &dk, &dv, tables))
            })?;
            Tensor::from_vec(dqkv, qkv_shape(p), &Device::Cpu)
        }
        let grad = grad.to_dtype(qkv.dtype())?;
        let out = out.to_dtype(qkv.dtype())?;
        let mut tensors = vec![&grad, &saved.lse, qkv, &out];
        match (&saved.rotated, tables) {
            (Some((q, k)), Some((cos, sin))) => tensors.extend([q, k, cos, sin]),
            (None, None) => {}
            _ => bail!("flash_attention: internal error, the backward's rotary tables differ from the forward's"),
        }
        match qkv.dtype() {
            DType::F32 => run::<f32>(&self.plan, &tensors),
            DType::F64 => run::<f64>(&self.plan, &tensors),
            other => Err(candle_core::Error::UnsupportedDTypeForOp(other, "flash_attention")),
        }
    }
}

fn qkv_shape(p: &Plan) -> Shape {
    Shape::from((p.b, p.t, (p.h + 2 * p.kv) * p.hd))
}

impl CustomOp1 for FusedAttention {
    fn name(&self) -> &'static str {
        "flash_attention"
    }

    fn cpu_fwd(&self, qkv: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu_fwd_any(&[(qkv, layout)])
    }

    fn bwd(&self, qkv: &Tensor, out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        self.bwd_any(qkv, None, out, grad).map(Some)
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "flash_attention"
    }

    fn cpu_fwd(
        &self,
        qkv: &CpuStorage,
        lq: &Layout,
        cos: &CpuStorage,
        lc: &Layout,
        sin: &CpuStorage,
        ls: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu_fwd_any(&[(qkv, lq), (cos, lc), (sin, ls)])
    }

    /// The rotary tables are constants of the positions: no gradient.
    fn bwd(
        &self,
        qkv: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((Some(self.bwd_any(qkv, Some((cos, sin)), out, grad)?), None, None))
    }
}
