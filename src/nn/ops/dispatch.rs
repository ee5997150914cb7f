//! The three ops of a mixture-of-experts layer, with the routed rows sorted by expert:
//!
//! ```text
//! forward                                        | backward (upstream gradient G)
//! gather:  Xs[m] = X[t(m)]                       | dX[n]  = Σ_{m: t(m)=n} G[m]
//! grouped: H[m]  = ε(Xs[m]·W_{g(m)}ᵀ + b_{g(m)}) | dXs[m] = D[m]·W_{g(m)},  dW_g = D_gᵀ·Xs_g,
//!                                                |          db_g = Σ_{m∈g} D[m]   (D = ε'(pre)·G)
//! combine: Y[n]  = Σ_{m: t(m)=n} w[m]·H[m]       | dH[m]  = w[m]·G[t(m)],  dw[m] = G[t(m)]·H[m]
//! ```
//!
//! `m` is a routed slot (one (token, expert) assignment), `t(m)` its token, `g(m)` its expert
//! (group), `ε` an optional activation ([`Epilogue`]). The slots are sorted by expert, so each
//! expert's rows form one contiguous block: a layer does one gather, one product per expert on
//! its block in place, and one weighted scatter-add, and nothing is copied per expert.
//!
//! Why ops rather than `index_select` / `narrow` / `index_add`: candle's autograd gives every
//! consumer of a tensor a gradient the size of the whole tensor. E experts narrowing one sorted
//! tensor, or E gathers from the tokens, mean E zero-padded full-size gradients summed in the
//! backward, and E `index_add`s mean E full-size outputs in the forward: for 8 experts, about
//! as much memory traffic as the experts' products. Here each direction writes every output
//! element once. The backward sums run per token over that token's own slots, in slot order,
//! so they need no atomics and the result does not depend on thread timing.

use std::sync::{Arc, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};

use super::bf16::{self, Precision};
use super::gemm::{gemm_from, gemm_in, MatRef, Start};
use super::pointwise::Epilogue;
use super::simd::Real;
use super::{compute_dtype, output_buffer, parallel, same_dtype, storage_slice, with_slices};

/// Where each routed slot comes from and goes: the slots of every group (expert) side by
/// side, group 0's first, each group's in the order its assignments were given.
#[derive(Debug, Clone, PartialEq)]
pub struct Dispatch {
    tokens: usize,
    /// Token of each slot `(M)`.
    slot_token: Vec<u32>,
    /// Which input assignment each slot is `(M)`: the permutation that sorted them.
    slot_source: Vec<u32>,
    /// Slots per group `(G)`, summing to `M`.
    group_sizes: Vec<usize>,
    /// The slots of token `n` are `token_slots[token_offsets[n]..token_offsets[n + 1]]`, in
    /// increasing order.
    token_offsets: Vec<usize>,
    token_slots: Vec<u32>,
}

impl Dispatch {
    /// Sort assignments `i` (token `tokens_of[i]` to group `groups_of[i]`) by group, stably.
    pub fn sort(tokens: usize, groups: usize, tokens_of: &[u32], groups_of: &[u32]) -> Result<Self> {
        if tokens_of.len() != groups_of.len() {
            bail!("dispatch: {} tokens for {} groups", tokens_of.len(), groups_of.len())
        }
        if let Some(t) = tokens_of.iter().find(|&&t| t as usize >= tokens) {
            bail!("dispatch: token {t} of {tokens}")
        }
        if let Some(g) = groups_of.iter().find(|&&g| g as usize >= groups) {
            bail!("dispatch: group {g} of {groups}")
        }
        // Counting sort: offsets of each group, then each assignment to its group's next slot.
        let mut group_sizes = vec![0usize; groups];
        groups_of.iter().for_each(|&g| group_sizes[g as usize] += 1);
        let mut next: Vec<usize> = offsets(&group_sizes);
        let mut slot_source = vec![0u32; tokens_of.len()];
        for (i, &g) in groups_of.iter().enumerate() {
            slot_source[next[g as usize]] = i as u32;
            next[g as usize] += 1;
        }
        let slot_token: Vec<u32> = slot_source.iter().map(|&i| tokens_of[i as usize]).collect();
        let mut per_token = vec![0usize; tokens];
        slot_token.iter().for_each(|&t| per_token[t as usize] += 1);
        let token_offsets = offsets(&per_token);
        let mut next = token_offsets.clone();
        let mut token_slots = vec![0u32; slot_token.len()];
        for (m, &t) in slot_token.iter().enumerate() {
            token_slots[next[t as usize]] = m as u32;
            next[t as usize] += 1;
        }
        Ok(Dispatch { tokens, slot_token, slot_source, group_sizes, token_offsets, token_slots })
    }

    /// Routed slots `M`.
    pub fn slots(&self) -> usize {
        self.slot_token.len()
    }

    pub fn tokens(&self) -> usize {
        self.tokens
    }

    pub fn group_sizes(&self) -> &[usize] {
        &self.group_sizes
    }

    /// The token of each slot.
    pub fn slot_token(&self) -> &[u32] {
        &self.slot_token
    }

    /// The index of each slot's assignment in the lists given to [`sort`](Self::sort).
    pub fn slot_source(&self) -> &[u32] {
        &self.slot_source
    }

    fn slots_of(&self, token: usize) -> &[u32] {
        &self.token_slots[self.token_offsets[token]..self.token_offsets[token + 1]]
    }

    /// First row of each group, and one past the last.
    fn group_offsets(&self) -> Vec<usize> {
        offsets(&self.group_sizes)
    }
}

/// Rows of one group per task of the row-wise products (the forward and dX). Each task packs
/// its expert's whole weight for the kernel, so fewer, longer tasks copy less (`bench moe`, on
/// the busy 2-core machine: 1.19× the dense step with 128 rows, 1.15× with 512); a training
/// batch (8 × 256 tokens, top-2 of 8 experts: ~512 rows per expert) still makes 8 or more.
const TASK_ROWS: usize = 512;
/// Output features of one group per task of the weight-gradient products (each packs the
/// group's input rows once).
const TASK_FEATURES: usize = 256;

/// A block of one group's rows.
#[derive(Clone)]
struct RowTask {
    group: usize,
    rows: std::ops::Range<usize>,
}

impl Dispatch {
    /// Every group's rows in blocks of at most [`TASK_ROWS`], in order.
    ///
    /// Why tasks of blocks rather than one threaded product per group: each threaded product
    /// ends on a barrier, and a layer of E experts would wait at 2E of them in the forward and
    /// 4E in the backward, each as slow as the slowest thread (on a busy machine, a thread the
    /// OS has just descheduled). One parallel loop over all groups' blocks waits once, and
    /// hands out unequal groups evenly. The blocks depend only on the group sizes, never on
    /// the number of threads, so the results do not either.
    fn row_tasks(&self) -> Vec<RowTask> {
        let mut tasks = Vec::new();
        for (group, (&start, &size)) in self.group_offsets().iter().zip(&self.group_sizes).enumerate() {
            for first in (start..start + size).step_by(TASK_ROWS) {
                tasks.push(RowTask { group, rows: first..(first + TASK_ROWS).min(start + size) });
            }
        }
        tasks
    }
}

/// Every group's output features in blocks of at most [`TASK_FEATURES`], in order.
fn feature_tasks(groups: usize, fan_out: usize) -> Vec<(usize, std::ops::Range<usize>)> {
    (0..groups)
        .flat_map(|g| (0..fan_out).step_by(TASK_FEATURES).map(move |f| (g, f..(f + TASK_FEATURES).min(fan_out))))
        .collect()
}

/// `[0, s0, s0 + s1, …]`: the start of each block of the given sizes, and the end.
fn offsets(sizes: &[usize]) -> Vec<usize> {
    let mut out = Vec::with_capacity(sizes.len() + 1);
    let mut total = 0;
    out.push(0);
    for &s in sizes {
        total += s;
        out.push(total);
    }
    out
}

/// `x (N, D)` → `(M, D)`: each slot's token row. Gradients flow back to `x`.
pub fn gather_rows(x: &Tensor, dispatch: &Arc<Dispatch>) -> Result<Tensor> {
    let (n, _) = x.dims2()?;
    if n != dispatch.tokens {
        bail!("gather_rows: x has {n} rows but the dispatch routes {} tokens", dispatch.tokens)
    }
    if !crate::nn::ops::route::uses_cpu_kernel(x.device()) {
        return composed_gather_rows(x, dispatch);
    }
    let dtype = x.dtype();
    let compute = compute_dtype("gather_rows", dtype)?;
    x.to_dtype(compute)?.contiguous()?.apply_op1(Gather { dispatch: dispatch.clone() })?.to_dtype(dtype)
}

/// `y (M, D)`, `w (M)` → `(N, D)`: each token's sum of its slots' rows weighted by `w`
/// (zero for a token with no slot). Gradients flow to `y` and `w`.
pub fn combine_rows(y: &Tensor, w: &Tensor, dispatch: &Arc<Dispatch>) -> Result<Tensor> {
    let (m, _) = y.dims2()?;
    if m != dispatch.slots() || w.dims() != [m] {
        bail!("combine_rows: y {:?} and w {:?} for {} slots", y.dims(), w.dims(), dispatch.slots())
    }
    same_dtype("combine_rows", y.dtype(), &[("w", w)])?;
    if !crate::nn::ops::route::uses_cpu_kernel(y.device()) {
        return composed_combine_rows(y, w, dispatch);
    }
    let dtype = y.dtype();
    let compute = compute_dtype("combine_rows", dtype)?;
    let (y, w) = (y.to_dtype(compute)?.contiguous()?, w.to_dtype(compute)?.contiguous()?);
    y.apply_op2(&w, Combine { dispatch: dispatch.clone() })?.to_dtype(dtype)
}

/// `x (M, in)` with group `g`'s rows multiplied by its block of `weight (G·out, in)` (and
/// plus its block of `bias (G·out)`), then `epilogue`: `(M, out)`, or `(M, out / 2)` for
/// SwiGLU. Gradients flow to all three.
pub fn grouped_linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    dispatch: &Arc<Dispatch>,
    epilogue: Option<Epilogue>,
) -> Result<Tensor> {
    let groups = dispatch.group_sizes.len();
    let ((m, fan_in), (stacked, w_in)) = (x.dims2()?, weight.dims2()?);
    if m != dispatch.slots() || w_in != fan_in || groups == 0 || stacked % groups != 0 {
        bail!(
            "grouped_linear: x {:?} and weight {:?} for {} slots in {groups} groups (weight rows must be groups · out)",
            x.dims(),
            weight.dims(),
            dispatch.slots()
        )
    }
    let fan_out = stacked / groups;
    if epilogue == Some(Epilogue::SwiGlu) && !fan_out.is_multiple_of(2) {
        bail!("grouped_linear: SwiGLU needs each group's gate and up stacked, an even number of rows, got {fan_out}")
    }
    if let Some(b) = bias {
        if b.dims() != [stacked] {
            bail!("grouped_linear: bias must be ({stacked}) for weight {:?}, got {:?}", weight.dims(), b.dims())
        }
    }
    let mut others = vec![("weight", weight)];
    others.extend(bias.map(|b| ("bias", b)));
    same_dtype("grouped_linear", x.dtype(), &others)?;
    if !crate::nn::ops::route::uses_cpu_kernel(x.device()) {
        // As `linear::device_linear`: bf16 operands under a bf16 scope (the bias too, added
        // to the bf16 product), the epilogue in x's dtype.
        let bias = bias.map(bf16::autocast).transpose()?;
        let pre =
            composed_grouped_linear(&bf16::autocast(x)?, &bf16::autocast(weight)?, bias.as_ref(), dispatch, None)?
                .to_dtype(x.dtype())?;
        return match epilogue {
            Some(e) => e.composed(&pre),
            None => Ok(pre),
        };
    }
    let dtype = x.dtype();
    let compute = compute_dtype("grouped_linear", dtype)?;
    let contiguous = |t: &Tensor| t.to_dtype(compute)?.contiguous();
    let (x, weight) = (contiguous(x)?, contiguous(weight)?);
    let keep_pre_activation =
        epilogue.is_some() && (x.track_op() || weight.track_op() || bias.is_some_and(Tensor::track_op));
    let op = Grouped {
        dispatch: dispatch.clone(),
        epilogue,
        keep_pre_activation,
        pre_activation: OnceLock::new(),
        precision: bf16::current(),
    };
    match bias {
        Some(bias) => x.apply_op3(&weight, &contiguous(bias)?, op)?.to_dtype(dtype),
        None => x.apply_op2(&weight, op)?.to_dtype(dtype),
    }
}

/// [`gather_rows`] from candle ops (the reference, and the path for other devices).
pub fn composed_gather_rows(x: &Tensor, dispatch: &Dispatch) -> Result<Tensor> {
    x.index_select(&Tensor::new(dispatch.slot_token.as_slice(), x.device())?, 0)
}

/// [`combine_rows`] from candle ops.
pub fn composed_combine_rows(y: &Tensor, w: &Tensor, dispatch: &Dispatch) -> Result<Tensor> {
    let ids = Tensor::new(dispatch.slot_token.as_slice(), y.device())?;
    let zeros = Tensor::zeros((dispatch.tokens, y.dim(1)?), y.dtype(), y.device())?;
    zeros.index_add(&ids, &y.broadcast_mul(&w.unsqueeze(1)?)?, 0)
}

/// [`grouped_linear`] from candle ops: one narrow, product and bias per group, then a cat.
pub fn composed_grouped_linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    dispatch: &Dispatch,
    epilogue: Option<Epilogue>,
) -> Result<Tensor> {
    let fan_out = weight.dim(0)? / dispatch.group_sizes.len();
    let mut parts = Vec::new();
    for (g, (&start, &size)) in dispatch.group_offsets().iter().zip(&dispatch.group_sizes).enumerate() {
        let w = weight.narrow(0, g * fan_out, fan_out)?;
        let y = x.narrow(0, start, size)?.matmul(&w.t()?)?;
        parts.push(match bias {
            Some(b) => y.broadcast_add(&b.narrow(0, g * fan_out, fan_out)?)?,
            None => y,
        });
    }
    let pre = Tensor::cat(&parts, 0)?;
    match epilogue {
        Some(e) => e.composed(&pre),
        None => Ok(pre),
    }
}

struct Gather {
    dispatch: Arc<Dispatch>,
}

impl CustomOp1 for Gather {
    fn name(&self) -> &'static str {
        "gather_rows"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(d: &Dispatch, x: &[T], width: usize) -> Vec<T> {
            // SAFETY: every slot's row is copied whole.
            let mut out = unsafe { output_buffer(d.slots() * width) };
            let rows = parallel::rows_per_task(width);
            parallel::for_each_chunk(&mut out, rows * width, |i, block| {
                for (row, &t) in block.chunks_exact_mut(width).zip(&d.slot_token[i * rows..]) {
                    row.copy_from_slice(&x[t as usize * width..][..width]);
                }
            });
            out
        }
        let width = layout.dims()[1];
        let out = match x {
            CpuStorage::F32(_) => CpuStorage::F32(run(&self.dispatch, storage_slice("gather_rows", x, layout)?, width)),
            CpuStorage::F64(_) => CpuStorage::F64(run(&self.dispatch, storage_slice("gather_rows", x, layout)?, width)),
            _ => return Err(candle_core::Error::UnsupportedDTypeForOp(x.dtype(), "gather_rows")),
        };
        Ok((out, Shape::from((self.dispatch.slots(), width))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        fn run<T: Real>(d: &Dispatch, g: &[T], width: usize) -> Vec<T> {
            sum_slots_per_token(d, width, |m| &g[m * width..][..width], |_| T::ONE)
        }
        let width = x.dim(1)?;
        let grad = grad.to_dtype(x.dtype())?;
        let dx = match x.dtype() {
            DType::F32 => with_slices::<f32, _>("gather_rows", &[&grad], |s| Ok(run(&self.dispatch, s[0], width)))
                .and_then(|v| Tensor::from_vec(v, x.shape(), &Device::Cpu))?,
            DType::F64 => with_slices::<f64, _>("gather_rows", &[&grad], |s| Ok(run(&self.dispatch, s[0], width)))
                .and_then(|v| Tensor::from_vec(v, x.shape(), &Device::Cpu))?,
            other => return Err(candle_core::Error::UnsupportedDTypeForOp(other, "gather_rows")),
        };
        Ok(Some(dx))
    }
}

/// `(N, width)` whose row `n` is `Σ_{m ∈ slots(n)} scale(m) · row(m)`, in slot order (zero for
/// a token without slots). Each task writes whole token rows: no two tasks touch one row.
fn sum_slots_per_token<'a, T: Real>(
    d: &Dispatch,
    width: usize,
    row: impl Fn(usize) -> &'a [T] + Sync,
    scale: impl Fn(usize) -> T + Sync,
) -> Vec<T> {
    // SAFETY: every token's row is written whole (filled, then added to).
    let mut out = unsafe { output_buffer(d.tokens * width) };
    let rows = parallel::rows_per_task(width);
    parallel::for_each_chunk(&mut out, rows * width, |i, block| {
        for (j, out) in block.chunks_exact_mut(width).enumerate() {
            let token = i * rows + j;
            out.fill(T::ZERO);
            for &m in d.slots_of(token) {
                let (src, s) = (row(m as usize), scale(m as usize));
                out.iter_mut().zip(src).for_each(|(o, &v)| *o = s.mul_add(v, *o));
            }
        }
    });
    out
}

struct Combine {
    dispatch: Arc<Dispatch>,
}

impl CustomOp2 for Combine {
    fn name(&self) -> &'static str {
        "combine_rows"
    }

    fn cpu_fwd(&self, y: &CpuStorage, ly: &Layout, w: &CpuStorage, lw: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(d: &Dispatch, y: &[T], w: &[T], width: usize) -> Vec<T> {
            sum_slots_per_token(d, width, |m| &y[m * width..][..width], |m| w[m])
        }
        let width = ly.dims()[1];
        let out = match y {
            CpuStorage::F32(_) => CpuStorage::F32(run(
                &self.dispatch,
                storage_slice("combine_rows", y, ly)?,
                storage_slice("combine_rows", w, lw)?,
                width,
            )),
            CpuStorage::F64(_) => CpuStorage::F64(run(
                &self.dispatch,
                storage_slice("combine_rows", y, ly)?,
                storage_slice("combine_rows", w, lw)?,
                width,
            )),
            _ => return Err(candle_core::Error::UnsupportedDTypeForOp(y.dtype(), "combine_rows")),
        };
        Ok((out, Shape::from((self.dispatch.tokens, width))))
    }

    fn bwd(&self, y: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        fn run<T: Real>(d: &Dispatch, y: &Tensor, w: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
            let width = y.dim(1)?;
            let (dy, dw) = with_slices::<T, _>("combine_rows", &[y, w, grad], |s| {
                let (y, w, g) = (s[0], s[1], s[2]);
                // SAFETY (both): each task writes its slots' rows and weights whole.
                let mut dy = unsafe { output_buffer(d.slots() * width) };
                let mut dw = unsafe { output_buffer(d.slots()) };
                let rows = parallel::rows_per_task(width);
                parallel::for_each_chunk2(&mut dy, rows * width, &mut dw, rows, |i, dy, dw| {
                    for (j, (dy, dw)) in dy.chunks_exact_mut(width).zip(dw.iter_mut()).enumerate() {
                        let m = i * rows + j;
                        let g = &g[d.slot_token[m] as usize * width..][..width];
                        let y = &y[m * width..][..width];
                        dy.iter_mut().zip(g).for_each(|(o, &g)| *o = w[m] * g);
                        *dw = g.iter().zip(y).fold(T::ZERO, |acc, (&g, &y)| g.mul_add(y, acc));
                    }
                });
                Ok((dy, dw))
            })?;
            Ok((Tensor::from_vec(dy, y.shape(), &Device::Cpu)?, Tensor::from_vec(dw, w.shape(), &Device::Cpu)?))
        }
        let grad = grad.to_dtype(y.dtype())?;
        let (dy, dw) = match y.dtype() {
            DType::F32 => run::<f32>(&self.dispatch, y, w, &grad)?,
            DType::F64 => run::<f64>(&self.dispatch, y, w, &grad)?,
            other => return Err(candle_core::Error::UnsupportedDTypeForOp(other, "combine_rows")),
        };
        Ok((Some(dy), Some(dw)))
    }
}

struct Grouped {
    dispatch: Arc<Dispatch>,
    epilogue: Option<Epilogue>,
    /// Only keep the pre-activation when some input wants a gradient.
    keep_pre_activation: bool,
    /// The products before the epilogue `(M, out)`, for the epilogue's backward.
    pre_activation: OnceLock<Tensor>,
    /// The precision of this thread's scope when the forward ran, which the backward's
    /// products keep (as the linear op's do): the experts of a `--precision bf16` run multiply
    /// bf16 operands like every other linear layer.
    precision: Precision,
}

impl Grouped {
    fn cpu_fwd_any(&self, inputs: &[(&CpuStorage, &Layout)]) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(
            op: &Grouped,
            inputs: &[(&CpuStorage, &Layout)],
            fan_in: usize,
            fan_out: usize,
        ) -> Result<CpuStorage> {
            let slices = inputs
                .iter()
                .map(|(storage, layout)| storage_slice::<T>("grouped_linear", storage, layout))
                .collect::<Result<Vec<_>>>()?;
            let (x, w, b) = (slices[0], slices[1], slices.get(2).copied());
            let d = &op.dispatch;
            // SAFETY: each task has `gemm_from` write its rows whole (from zero or the bias).
            let mut pre = unsafe { output_buffer(d.slots() * fan_out) };
            let tasks = d.row_tasks();
            let parts = tasks.iter().map(|t| t.rows.start * fan_out..t.rows.end * fan_out).collect();
            parallel::for_each_part(parallel::Split::parts(&mut pre, parts), |i, out| {
                let RowTask { group: g, rows } = tasks[i].clone();
                let start = b.map_or(Start::Zero, |b| Start::Row(&b[g * fan_out..][..fan_out]));
                let x_rows = MatRef::row_major(&x[rows.start * fan_in..], rows.len(), fan_in);
                let w_g = MatRef::row_major(&w[g * fan_out * fan_in..], fan_out, fan_in);
                gemm_from(op.precision, x_rows, w_g.t(), out, fan_out, start);
            });
            let Some(epilogue) = op.epilogue else {
                return Ok(T::to_cpu_storage_owned(pre));
            };
            let out = epilogue.forward(&pre, fan_out);
            if op.keep_pre_activation {
                // A fresh op runs its forward once; a second set would be a bug, not user input.
                let _ = op.pre_activation.set(Tensor::from_vec(pre, (d.slots(), fan_out), &Device::Cpu)?);
            }
            Ok(T::to_cpu_storage_owned(out))
        }
        let ((x, lx), (_, lw)) = (inputs[0], inputs[1]);
        let fan_in = lx.dims()[1];
        let fan_out = lw.dims()[0] / self.dispatch.group_sizes.len();
        let storage = match x {
            CpuStorage::F32(_) => run::<f32>(self, inputs, fan_in, fan_out)?,
            CpuStorage::F64(_) => run::<f64>(self, inputs, fan_in, fan_out)?,
            _ => return Err(candle_core::Error::UnsupportedDTypeForOp(x.dtype(), "grouped_linear")),
        };
        let width = self.epilogue.map_or(fan_out, |e| e.width(fan_out));
        Ok((storage, Shape::from((self.dispatch.slots(), width))))
    }

    /// Gradients for `x`, `weight` and (when `with_bias`) `bias`.
    fn bwd_any(
        &self,
        x: &Tensor,
        weight: &Tensor,
        grad: &Tensor,
        with_bias: bool,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        fn run<T: Real>(
            op: &Grouped,
            x: &Tensor,
            weight: &Tensor,
            grad: &Tensor,
            with_bias: bool,
        ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
            let d = &op.dispatch;
            let (stacked, fan_in) = weight.dims2()?;
            let fan_out = stacked / d.group_sizes.len();
            let pre = match op.epilogue {
                Some(_) => match op.pre_activation.get() {
                    Some(pre) => Some(pre.to_dtype(T::DTYPE)?),
                    None => bail!("grouped_linear: backward without a saved forward (no input required a gradient)"),
                },
                None => None,
            };
            let mut inputs = vec![x, weight, grad];
            inputs.extend(pre.as_ref());
            let (dx, dw, db) = with_slices::<T, _>("grouped_linear", &inputs, |s| {
                let (x, w) = (s[0], s[1]);
                let dy = match op.epilogue {
                    Some(epilogue) => std::borrow::Cow::Owned(epilogue.backward(s[3], s[2], fan_out)),
                    None => std::borrow::Cow::Borrowed(s[2]),
                };
                // SAFETY (both): each task has `gemm` write its block whole (not accumulating;
                // a weight gradient of a group without rows is a product over zero rows: zeros).
                let mut dx = unsafe { output_buffer(d.slots() * fan_in) };
                let mut dw = unsafe { output_buffer(stacked * fan_in) };
                let tasks = d.row_tasks();
                let parts = tasks.iter().map(|t| t.rows.start * fan_in..t.rows.end * fan_in).collect();
                parallel::for_each_part(parallel::Split::parts(&mut dx, parts), |i, dx| {
                    let RowTask { group: g, rows } = tasks[i].clone();
                    let dy_rows = MatRef::row_major(&dy[rows.start * fan_out..], rows.len(), fan_out);
                    let w_g = MatRef::row_major(&w[g * fan_out * fan_in..], fan_out, fan_in);
                    gemm_in(op.precision, dy_rows, w_g, dx, fan_in, false);
                });
                // dW_g and db_g in blocks of output features: dW_g[o] = Σ_rows dY[row, o] · X[row].
                let tasks = feature_tasks(d.group_sizes.len(), fan_out);
                let dw_parts =
                    tasks.iter().map(|(g, f)| (g * fan_out + f.start) * fan_in..(g * fan_out + f.end) * fan_in);
                let db_parts = tasks.iter().map(|(g, f)| g * fan_out + f.start..g * fan_out + f.end);
                let mut db = vec![T::ZERO; if with_bias { stacked } else { 0 }];
                let db_parts = if with_bias { db_parts.collect() } else { vec![0..0; tasks.len()] };
                let offsets = d.group_offsets();
                parallel::for_each_part2(
                    parallel::Split::parts(&mut dw, dw_parts.collect()),
                    parallel::Split::parts(&mut db, db_parts),
                    |i, dw, db| {
                        let (g, features) = tasks[i].clone();
                        let (start, size) = (offsets[g], d.group_sizes[g]);
                        if size == 0 {
                            // No rows: a zero gradient (and no view into `dy`, which may end here).
                            dw.fill(T::ZERO);
                            return;
                        }
                        let dy_t = MatRef {
                            data: &dy[start * fan_out + features.start..],
                            rows: features.len(),
                            cols: size,
                            row_stride: 1,
                            col_stride: fan_out,
                        };
                        let x_g = MatRef::row_major(&x[start * fan_in..], size, fan_in);
                        gemm_in(op.precision, dy_t, x_g, dw, fan_in, false);
                        for row in dy[start * fan_out..(start + size) * fan_out].chunks_exact(fan_out) {
                            db.iter_mut().zip(&row[features.clone()]).for_each(|(s, &v)| *s += v);
                        }
                    },
                );
                let db = with_bias.then_some(db);
                Ok((dx, dw, db))
            })?;
            Ok((
                Tensor::from_vec(dx, x.shape(), &Device::Cpu)?,
                Tensor::from_vec(dw, weight.shape(), &Device::Cpu)?,
                db.map(|db| Tensor::from_vec(db, stacked, &Device::Cpu)).transpose()?,
            ))
        }
        let grad = grad.to_dtype(x.dtype())?;
        match x.dtype() {
            DType::F32 => run::<f32>(self, x, weight, &grad, with_bias),
            DType::F64 => run::<f64>(self, x, weight, &grad, with_bias),
            other => Err(candle_core::Error::UnsupportedDTypeForOp(other, "grouped_linear")),
        }
    }
}

impl CustomOp2 for Grouped {
    fn name(&self) -> &'static str {
        "grouped_linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout, w: &CpuStorage, lw: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu_fwd_any(&[(x, lx), (w, lw)])
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.bwd_any(x, w, grad, false)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for Grouped {
    fn name(&self) -> &'static str {
        "grouped_linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu_fwd_any(&[(x, lx), (w, lw), (b, lb)])
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = self.bwd_any(x, w, grad, true)?;
        Ok((Some(dx), Some(dw), db))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Tensor};

    use super::*;
    use crate::nn::ops::testing::{check_against_composed, check_finite_differences, rand_tensor};

    /// 7 tokens, 3 groups: token 4 has no slot, group 1 none, token 2 two.
    fn small() -> Arc<Dispatch> {
        let tokens_of = [0, 2, 1, 3, 5, 6, 2, 0];
        let groups_of = [2, 0, 2, 0, 2, 0, 2, 0];
        Arc::new(Dispatch::sort(7, 3, &tokens_of, &groups_of).unwrap())
    }

    /// A bigger one in the shape a layer makes: `tokens` tokens, each to `k` distinct groups.
    fn routed(tokens: usize, groups: usize, k: usize) -> Arc<Dispatch> {
        let (mut tokens_of, mut groups_of) = (Vec::new(), Vec::new());
        for t in 0..tokens {
            for r in 0..k {
                tokens_of.push(t as u32);
                groups_of.push(((t * 7 + r * (1 + t % 3)) % groups) as u32);
            }
        }
        Arc::new(Dispatch::sort(tokens, groups, &tokens_of, &groups_of).unwrap())
    }

    #[test]
    fn sorting_groups_slots_by_group_in_input_order() {
        let d = small();
        assert_eq!(d.group_sizes(), &[4, 0, 4]);
        assert_eq!(d.slot_source(), &[1, 3, 5, 7, 0, 2, 4, 6]);
        assert_eq!(d.slot_token(), &[2, 3, 6, 0, 0, 1, 5, 2]);
        assert_eq!(d.slots_of(2), &[0, 7]);
        assert!(d.slots_of(4).is_empty());
        assert!(Dispatch::sort(3, 2, &[0, 3], &[0, 1]).unwrap_err().to_string().contains("token 3 of 3"));
        assert!(Dispatch::sort(3, 2, &[0, 1], &[0, 2]).unwrap_err().to_string().contains("group 2 of 2"));
    }

    #[test]
    fn gather_and_combine_match_finite_differences_and_composed_ops() {
        let d = small();
        let gather = |t: &[Tensor]| gather_rows(&t[0], &d);
        check_finite_differences(&gather, &[rand_tensor(&[7, 5], 1, DType::F64)], &[0], 1e-6);
        let combine = |t: &[Tensor]| combine_rows(&t[0], &t[1], &d);
        let inputs = [rand_tensor(&[8, 5], 2, DType::F64), rand_tensor(&[8], 3, DType::F64)];
        check_finite_differences(&combine, &inputs, &[0, 1], 1e-6);

        let d = routed(300, 8, 2);
        let (fused, composed) = (|t: &[Tensor]| gather_rows(&t[0], &d), |t: &[Tensor]| composed_gather_rows(&t[0], &d));
        check_against_composed("gather_rows", &fused, &composed, &[rand_tensor(&[300, 96], 4, DType::F32)], 1e-5);
        let fused = |t: &[Tensor]| combine_rows(&t[0], &t[1], &d);
        let composed = |t: &[Tensor]| composed_combine_rows(&t[0], &t[1], &d);
        let inputs = [rand_tensor(&[600, 96], 5, DType::F32), rand_tensor(&[600], 6, DType::F32)];
        check_against_composed("combine_rows", &fused, &composed, &inputs, 1e-5);
    }

    #[test]
    fn grouped_linear_matches_finite_differences_and_composed_ops() {
        for epilogue in [None, Some(Epilogue::GeluTanh), Some(Epilogue::SwiGlu)] {
            let d = small();
            let (fan_in, fan_out) = (3, 4);
            let inputs = vec![
                rand_tensor(&[8, fan_in], 1, DType::F64),
                rand_tensor(&[3 * fan_out, fan_in], 2, DType::F64),
                rand_tensor(&[3 * fan_out], 3, DType::F64),
            ];
            let with_bias = |t: &[Tensor]| grouped_linear(&t[0], &t[1], Some(&t[2]), &d, epilogue);
            check_finite_differences(&with_bias, &inputs, &[0, 1, 2], 1e-6);
            let without = |t: &[Tensor]| grouped_linear(&t[0], &t[1], None, &d, epilogue);
            check_finite_differences(&without, &inputs[..2], &[0, 1], 1e-6);

            // Threaded products and ragged groups, in f32.
            let d = routed(260, 5, 2);
            let (fan_in, fan_out) = (96, 130);
            let inputs = vec![
                rand_tensor(&[520, fan_in], 4, DType::F32),
                rand_tensor(&[5 * fan_out, fan_in], 5, DType::F32),
                rand_tensor(&[5 * fan_out], 6, DType::F32),
            ];
            let fused = |t: &[Tensor]| grouped_linear(&t[0], &t[1], Some(&t[2]), &d, epilogue);
            let composed = |t: &[Tensor]| composed_grouped_linear(&t[0], &t[1], Some(&t[2]), &d, epilogue);
            check_against_composed("grouped_linear", &fused, &composed, &inputs, 1e-4);
        }
    }

    /// A group with no rows still gets a weight gradient, of zeros: first, in the middle or
    /// last, with more output features than one task takes.
    #[test]
    fn an_empty_group_has_a_zero_weight_gradient() {
        let d = small();
        let inputs = [rand_tensor(&[8, 3], 1, DType::F64), rand_tensor(&[12, 3], 2, DType::F64)];
        let f = |t: &[Tensor]| grouped_linear(&t[0], &t[1], None, &d, None);
        let (_, grads) = crate::nn::ops::testing::value_and_grads(&f, &inputs);
        let group1: Vec<f64> = grads[1].narrow(0, 4, 4).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(group1.iter().all(|&g| g == 0.0), "{group1:?}");

        let fan_out = TASK_FEATURES + 44;
        for groups_of in [[1u32, 1, 2, 1, 2], [0, 1, 0, 1, 0], [1, 2, 1, 2, 2]] {
            let d = Arc::new(Dispatch::sort(5, 3, &[0, 1, 2, 3, 4], &groups_of).unwrap());
            let inputs = [
                rand_tensor(&[5, 4], 1, DType::F32),
                rand_tensor(&[3 * fan_out, 4], 2, DType::F32),
                rand_tensor(&[3 * fan_out], 3, DType::F32),
            ];
            let fused = |t: &[Tensor]| grouped_linear(&t[0], &t[1], Some(&t[2]), &d, Some(Epilogue::SwiGlu));
            let composed =
                |t: &[Tensor]| composed_grouped_linear(&t[0], &t[1], Some(&t[2]), &d, Some(Epilogue::SwiGlu));
            check_against_composed(&format!("groups {groups_of:?}"), &fused, &composed, &inputs, 1e-5);
        }
    }

    #[test]
    fn bad_shapes_are_named() {
        let d = small();
        let err = gather_rows(&rand_tensor(&[6, 2], 1, DType::F32), &d).unwrap_err().to_string();
        assert!(err.contains("6 rows") && err.contains("7 tokens"), "{err}");
        let err = combine_rows(&rand_tensor(&[8, 2], 1, DType::F32), &rand_tensor(&[7], 1, DType::F32), &d)
            .unwrap_err()
            .to_string();
        assert!(err.contains("8 slots"), "{err}");
        let (x, w) = (rand_tensor(&[8, 3], 1, DType::F32), rand_tensor(&[10, 3], 2, DType::F32));
        let err = grouped_linear(&x, &w, None, &d, None).unwrap_err().to_string();
        assert!(err.contains("groups · out"), "{err}");
        let w = rand_tensor(&[9, 3], 2, DType::F32);
        let err = grouped_linear(&x, &w, None, &d, Some(Epilogue::SwiGlu)).unwrap_err().to_string();
        assert!(err.contains("even number"), "{err}");
    }
}
