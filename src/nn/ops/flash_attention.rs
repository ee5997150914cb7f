//! FlashAttention on the CPU: softmax attention computed tile by tile with an online softmax,
//! so the `T × S` score matrix never exists, with the FlashAttention-2 backward.
//!
//! Why: the composed path ([`crate::nn::attention::grouped_attention`]) materialises scores,
//! biased scores and probabilities, `(B, H, T, S)` each, and autograd keeps them for the
//! backward: 400 MB per tensor at `H = 6, T = S = 4096` in f32. Here memory is `O(T·hd)`, tiles
//! that the mask hides entirely are skipped (half the work under a causal mask, most of it
//! under a sliding window), and the mask and ALiBi biases are computed from positions on the
//! fly instead of being read from a bias tensor.
//!
//! The math, per query row `i` (position `qpos_i`) and key `j` (position `kpos_j`), with
//! `[vis]` the mask (causal: `kpos ≤ qpos`; window `W`: `qpos − kpos < W`; key padding: `j` is
//! one of its batch row's first `len_b` keys):
//!
//! ```text
//! forward, over key tiles, keeping m, l, o per row     | backward (FlashAttention-2), per key tile
//!                                                       |   D_i   = Σ_d dO_id · O_id        (once)
//! s_ij  = scale·q_i·k_j + slope_h·(kpos_j − qpos_i)     |   s_ij  as in the forward
//!         (−∞ where not [vis])                          |   p_ij  = exp(s_ij − L_i)   (L saved)
//! m_i'  = max(m_i, max_j s_ij)                          |   dv_j += Σ_i p_ij · dO_i
//! l_i   = l_i·e^(m_i − m_i') + Σ_j e^(s_ij − m_i')      |   dp_ij = dO_i · v_j
//! o_i   = o_i·e^(m_i − m_i') + Σ_j e^(s_ij − m_i')·v_j  |   ds_ij = p_ij · (dp_ij − D_i)
//! at the end: O_i = o_i / l_i,  L_i = m_i + ln l_i      |   dq_i += scale · Σ_j ds_ij · k_j
//!                                                       |   dk_j += scale · Σ_i ds_ij · q_i
//! ```
//!
//! (`D_i = Σ_j p_ij·dp_ij` because `dO_i·O_i = Σ_j p_ij dO_i·v_j`; it is the softmax
//! Jacobian's correction term, computed from `O` and `dO` without any `p`.)
//!
//! Dropout on the probabilities (training) multiplies `p_ij` by `z_ij` (0, or `1/(1 − p)` when
//! kept; [`DropoutMask`], recomputed from its seed in the backward) where it meets `v`, while
//! `l_i` still sums the undropped `p`: `O_i = Σ_j p_ij z_ij v_j`. The backward then uses
//! `dv_j += Σ_i p_ij z_ij dO_i` and `ds_ij = p_ij (z_ij dp_ij − D_i)`, and `D_i = dO_i·O_i` still
//! holds because `O_i` already carries the `z`.
//!
//! The forms of attention this covers: causal self-attention (decoders), bidirectional
//! self-attention (`causal = false`: encoders), cross-attention (`causal = false`, `T ≠ S`, keys
//! from the encoder), and keys from a cache. Right-padded batches pass per-row key lengths:
//! padding keys are hidden, and tiles holding only padding are skipped like masked ones.
//!
//! Grouped queries: query head `h` reads KV head `h / (H / KV)` straight from `k`/`v`; nothing
//! is copied per query head, and the backward sums the group's `dk`/`dv` as it goes.
//!
//! A query that sees no key at all (keys from a cache that lie wholly in its future or outside
//! its window, or a batch row whose key length is 0) gets output 0 and no gradient; the
//! composed path gives NaN.
//!
//! Parallelism ([`parallel`]): the forward splits over `(batch, head, query tile)`; the backward over
//! `(batch, KV head)` and, when that is fewer than four tasks per thread, also over chunks of
//! key tiles, each with a private `dq` that is summed at the end.
//!
//! Tiles are skipped using each key tile's smallest and largest position, so contiguous keys
//! skip exactly the hidden tiles; keys in ring order (a rolling cache) still give correct
//! results but skip less.
//!
//! Measured (`benches/ops.rs`, 2 cores of an AVX-512 Xeon, B = 1, H = 6, hd = 64, causal, f32,
//! forward + backward): T = 1024 in 25 ms against 434 ms for the composed path; T = 4096 in
//! 220 ms and 48 MiB against 6.4 s and 4.7 GiB.
//!
//! Under a bf16 precision scope (`--precision bf16`) the six tile products take bf16 operands
//! and sum in `f32`, the softmax statistics and the online rescaling staying `f32`
//! ([`bf16_tiles`], which states what is rounded and the error bound); in `f32` nothing is
//! rounded.
//!
//! The backward is not itself differentiable (no second derivatives).

use std::sync::{Arc, OnceLock};

use candle_core::{bail, CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, D};

use self::bf16_tiles::{f32s, f32s_mut, Bf16Tiles, TileScratch};
use super::bf16::{self, Precision};
use super::dropout::DropoutMask;
use super::parallel::{self, Split};
use super::simd::{multiversion, Real};
use super::tile::gemm_acc;
use super::{compute_dtype, output_buffer, same_dtype, storage_slice, with_slices};

/// Queries per tile: rows of `Q`, `O`, `dO` that one task keeps in cache.
pub const QUERY_TILE: usize = 64;
/// Keys per tile: one tile of `S`/`P` is `QUERY_TILE × KEY_TILE`.
pub const KEY_TILE: usize = 64;

/// Which keys each query may see, and the ALiBi bias, described by absolute positions rather
/// than by a `(T, S)` tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionMask {
    /// Absolute position of the first query; query `i` sits at `query_start + i`.
    pub query_start: usize,
    /// Absolute position of each of the `S` keys, in the order they are stored in `k`/`v`
    /// (a rolling cache stores them in ring order, so they need not be sorted).
    pub key_positions: Vec<usize>,
    /// A query sees only keys at or before its own position.
    pub causal: bool,
    /// A query sees only keys with `query_pos − key_pos < window` (itself and the
    /// `window − 1` before it, as Mistral's sliding window).
    pub window: Option<usize>,
    /// ALiBi: one slope per query head, adding `slope_h · (key_pos − query_pos)` to the score.
    pub alibi_slopes: Option<Vec<f32>>,
    /// Right padding: batch row `b` holds only its first `key_lengths[b]` keys (in storage
    /// order); the others are hidden from every query. `None`: every key is real.
    pub key_lengths: Option<Vec<usize>>,
    /// Dropout on the attention probabilities (training), mask element `((b·H + h)·T + i)·S + j`.
    pub dropout: Option<DropoutMask>,
}

impl AttentionMask {
    /// Causal attention of queries at `query_start..` over keys at `key_positions`.
    pub fn causal(query_start: usize, key_positions: Vec<usize>) -> Self {
        AttentionMask {
            query_start,
            key_positions,
            causal: true,
            window: None,
            alibi_slopes: None,
            key_lengths: None,
            dropout: None,
        }
    }

    /// Every query sees every one of `keys` keys (encoder self-attention, cross-attention).
    pub fn bidirectional(keys: usize) -> Self {
        AttentionMask { causal: false, ..Self::causal(0, (0..keys).collect()) }
    }

    /// Causal self-attention without a cache: `len` queries and keys at `start..start + len`.
    pub fn causal_self(start: usize, len: usize) -> Self {
        Self::causal(start, (start..start + len).collect())
    }

    pub fn with_window(mut self, window: Option<usize>) -> Self {
        self.window = window;
        self
    }

    pub fn with_alibi(mut self, slopes: Option<Vec<f32>>) -> Self {
        self.alibi_slopes = slopes;
        self
    }

    pub fn with_key_lengths(mut self, lengths: Option<Vec<usize>>) -> Self {
        self.key_lengths = lengths;
        self
    }

    pub fn with_dropout(mut self, dropout: Option<DropoutMask>) -> Self {
        self.dropout = dropout;
        self
    }

    /// Whether the query at `query_pos` sees the key at `key_pos` (padding aside).
    pub fn visible(&self, query_pos: usize, key_pos: usize) -> bool {
        (!self.causal || key_pos <= query_pos)
            && self.window.is_none_or(|w| (query_pos as i128 - key_pos as i128) < w as i128)
    }

    /// The equivalent additive bias for the composed path: `-inf` where hidden, the ALiBi term
    /// elsewhere; `(H or 1, T, S)`, or `(B, H or 1, T, S)` with key lengths.
    pub fn bias(&self, queries: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let slopes: &[f32] = self.alibi_slopes.as_deref().unwrap_or(&[0.0]);
        let s = self.key_positions.len();
        let lengths = self.key_lengths.clone().unwrap_or_else(|| vec![s]);
        let values = lengths.iter().flat_map(|&len| {
            slopes.iter().flat_map(move |&slope| {
                (self.query_start..self.query_start + queries).flat_map(move |qp| {
                    self.key_positions.iter().enumerate().map(move |(j, &kp)| {
                        if j < len && self.visible(qp, kp) {
                            slope as f64 * (kp as f64 - qp as f64)
                        } else {
                            f64::NEG_INFINITY
                        }
                    })
                })
            })
        });
        let mut shape = vec![slopes.len(), queries, s];
        if self.key_lengths.is_some() {
            shape.insert(0, lengths.len());
        }
        match dtype {
            DType::F64 => Tensor::from_vec(values.collect::<Vec<f64>>(), shape, device),
            _ => Tensor::from_vec(values.map(|b| b as f32).collect::<Vec<f32>>(), shape, device)?.to_dtype(dtype),
        }
    }
}

/// Softmax attention `softmax(scale·q·kᵀ + bias)·v` with the mask and ALiBi of `mask`.
///
/// `q`: `(B, H, T, hd)`, `k`/`v`: `(B, KV, S, hd)` with `H` a multiple of `KV`, `mask`
/// describing `T` queries and `S` keys → `(B, H, T, hd)`. Gradients flow to `q`, `k` and `v`.
/// On a non-CPU device this runs [`composed_attention`] instead.
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: &AttentionMask) -> Result<Tensor> {
    let plan = Plan::new(q, k, v, scale, mask)?;
    if !crate::nn::ops::route::uses_cpu_kernel(q.device()) {
        return composed_attention(q, k, v, scale, mask);
    }
    apply_kernel(q, k, v, plan, false)
}

/// Run the kernel op on CPU tensors (converted to its compute dtype and made contiguous),
/// returning the result in the inputs' dtype.
///
/// Head-major keys and values are not copied when each head's rows are already contiguous
/// ([`HeadRows`]): a KV cache hands over a view of the filled part of its larger buffer, and
/// copying it would cost a pass over the whole cache on every decoded token.
fn apply_kernel(q: &Tensor, k: &Tensor, v: &Tensor, plan: Plan, token_major: bool) -> Result<Tensor> {
    let dtype = q.dtype();
    let compute = compute_dtype("flash_attention", dtype)?;
    let contiguous = |t: &Tensor| t.to_dtype(compute)?.contiguous();
    let head_rows = |t: &Tensor| -> Result<Tensor> {
        let t = t.to_dtype(compute)?;
        if token_major || head_strides(t.layout()).is_none() {
            return t.contiguous();
        }
        Ok(t)
    };
    let (q, k, v) = (contiguous(q)?, head_rows(k)?, head_rows(v)?);
    let op = FlashAttention {
        plan: Arc::new(plan),
        token_major,
        save_lse: q.track_op() || k.track_op() || v.track_op(),
        lse: OnceLock::new(),
    };
    q.apply_op3(&k, &v, op)?.to_dtype(dtype)
}

/// [`flash_attention`] on token-major inputs, as the q/k/v projections produce them:
/// `q`: `(B, T, H·hd)`, `k`/`v`: `(B, S, KV·hd)` → `(B, T, H·hd)`, ready for the output
/// projection.
///
/// Why: splitting heads with reshape + transpose + copy puts three nodes per input (and two on
/// the output) into the autograd graph, and candle's backward pass zero-fills and adds a
/// gradient for every node. Here the kernels read the heads in place ([`HeadRows`]), only the
/// head-major results are reordered (one copy each, inside the op), and autograd sees a single
/// node.
pub fn flash_attention_tokens(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    kv_heads: usize,
    scale: f64,
    mask: &AttentionMask,
) -> Result<Tensor> {
    let split = |x: &Tensor, n: usize, name: &str| -> Result<Tensor> {
        let (b, t, width) = x.dims3().map_err(|_| {
            candle_core::Error::Msg(format!(
                "flash_attention: {name} must be (B, T, heads·head_dim), got {:?}",
                x.dims()
            ))
        })?;
        if n == 0 || width % n != 0 {
            bail!("flash_attention: {name} has width {width}, not a multiple of its {n} heads")
        }
        x.reshape((b, t, n, width / n))?.transpose(1, 2)
    };
    // The head-major views only serve to check shapes and build the plan.
    let (qh, kh, vh) = (split(q, heads, "q")?, split(k, kv_heads, "k")?, split(v, kv_heads, "v")?);
    let plan = Plan::new(&qh, &kh, &vh, scale, mask)?;
    let (b, t, width) = q.dims3()?;
    if !crate::nn::ops::route::uses_cpu_kernel(q.device()) {
        return composed_attention(&qh, &kh, &vh, scale, mask)?.transpose(1, 2)?.reshape((b, t, width));
    }
    apply_kernel(q, k, v, plan, true)
}

/// `(B, T, N, hd)` → `(B, N, T, hd)` when `to_heads`, the reverse otherwise, for contiguous
/// data: the reordering of the kernels' head-major results (output, gradients) that the
/// token-major entry points do inside the op. Each task writes one
/// contiguous chunk of the output (a head's `T` rows, or a token's `N` heads).
fn reorder_heads<T: Real>(x: &[T], b: usize, t: usize, n: usize, hd: usize, to_heads: bool) -> Vec<T> {
    // SAFETY: each task copies whole rows into its chunk, and the chunks cover `out`.
    let mut out = unsafe { output_buffer(b * t * n * hd) };
    if out.is_empty() {
        return out;
    }
    if to_heads {
        parallel::for_each_chunk(&mut out, t * hd, |bh, dst| {
            let (bi, h) = (bh / n, bh % n);
            for (ti, row) in dst.chunks_exact_mut(hd).enumerate() {
                let src = ((bi * t + ti) * n + h) * hd;
                row.copy_from_slice(&x[src..src + hd]);
            }
        });
    } else {
        parallel::for_each_chunk(&mut out, n * hd, |bt, dst| {
            let (bi, ti) = (bt / t, bt % t);
            for (h, row) in dst.chunks_exact_mut(hd).enumerate() {
                let src = ((bi * n + h) * t + ti) * hd;
                row.copy_from_slice(&x[src..src + hd]);
            }
        });
    }
    out
}

/// The same attention from composed candle ops (materialises `(B, H, T, S)`): the reference
/// the kernel is tested against, and the path for devices without a kernel. Rows that see no
/// key come out NaN here (0 in [`flash_attention`]).
pub fn composed_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: &AttentionMask) -> Result<Tensor> {
    let (b, h, t, hd) = q.dims4()?;
    let (kv, s) = (k.dim(1)?, k.dim(2)?);
    let group = h / kv;
    let q = (q.reshape((b, kv, group * t, hd))? * scale)?; // (B, KV, group·T, hd)
    let scores = q.matmul(&k.t()?.contiguous()?)?.reshape((b, h, t, s))?; // (B, H, T, S)
    let scores = scores.broadcast_add(&mask.bias(t, scores.dtype(), q.device())?)?;
    let mut probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
    if let Some(dropout) = &mask.dropout {
        probs = probs.broadcast_mul(&dropout.factors(&[b, h, t, s], q.device())?.to_dtype(probs.dtype())?)?;
    }
    probs.reshape((b, kv, group * t, s))?.matmul(&v.contiguous()?)?.reshape((b, h, t, hd))
}

/// Shapes and the mask, checked once and laid out per key tile for the kernels.
#[derive(Debug)]
struct Plan {
    b: usize,
    h: usize,
    kv: usize,
    t: usize,
    s: usize,
    hd: usize,
    scale: f64,
    query_start: i64,
    causal: bool,
    /// `i64::MAX` when there is no window.
    window: i64,
    slopes: Option<Vec<f64>>,
    /// Key positions padded to whole tiles with [`PAD_POSITION`].
    key_pos: Vec<i64>,
    /// Per key tile: smallest and largest position, and number of keys stored (not counting
    /// the slots that pad the last tile).
    tile_min: Vec<i64>,
    tile_max: Vec<i64>,
    tile_len: Vec<usize>,
    /// Per batch row: keys that are not padding (`S` without key lengths).
    key_len: Vec<usize>,
    dropout: Option<DropoutMask>,
    /// bf16 operands in the products ([`bf16_tiles`]): `f32` data under a bf16 precision scope,
    /// read when the op is built, like the linear layers' precision, and kept for its backward.
    bf16: Option<Bf16Tiles>,
}

/// Position given to padding slots: far past any real one, yet `PAD − pos` cannot overflow.
const PAD_POSITION: i64 = i64::MAX / 4;
/// Positions are kept below 2^53 so that `kpos − qpos` is exact in `f64`.
const MAX_POSITION: usize = 1 << 53;

/// How a (query tile, key tile) pair is treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TileMask {
    /// Nothing visible: skipped.
    Hidden,
    /// Everything visible: no per-score mask.
    Open,
    /// Mixed: masked score by score.
    Partial,
}

impl Plan {
    fn new(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: &AttentionMask) -> Result<Self> {
        const OP: &str = "flash_attention";
        let (b, h, t, hd) = q.dims4().map_err(|_| shape_error("q must be (B, H, T, head_dim)", q.dims(), q.dims()))?;
        let (kb, kv, s, khd) =
            k.dims4().map_err(|_| shape_error("k must be (B, KV, S, head_dim)", q.dims(), k.dims()))?;
        if kb != b || khd != hd || kv == 0 || h % kv != 0 {
            return Err(shape_error(
                &format!(
                    "{OP}: k must be (B, KV, S, head_dim) with B and head_dim of q {:?} and KV dividing H = {h}",
                    q.dims()
                ),
                &[b, kv.max(1), s, hd],
                k.dims(),
            ));
        }
        if v.dims() != k.dims() {
            return Err(shape_error(&format!("{OP}: v must have the shape of k"), k.dims(), v.dims()));
        }
        same_dtype(OP, q.dtype(), &[("k", k), ("v", v)])?;
        if !k.device().same_device(q.device()) || !v.device().same_device(q.device()) {
            bail!("{OP}: q, k and v must be on one device")
        }
        if mask.key_positions.len() != s {
            bail!(
                "{OP}: the mask lists {} key positions but k holds S = {s} keys (k is {:?})\nHINT: pass one position per key slot, e.g. LayerKv::positions",
                mask.key_positions.len(),
                k.dims()
            )
        }
        if let Some(slopes) = &mask.alibi_slopes {
            if slopes.len() != h {
                bail!("{OP}: {} ALiBi slopes for H = {h} query heads\nHINT: one slope per query head", slopes.len())
            }
        }
        if let Some(lengths) = &mask.key_lengths {
            if lengths.len() != b {
                bail!("{OP}: the mask gives {} key lengths for a batch of B = {b}\nHINT: one length per sequence of the batch", lengths.len())
            }
            if let Some(&long) = lengths.iter().find(|&&len| len > s) {
                bail!("{OP}: key length {long} is more than the S = {s} keys of k {:?}", k.dims())
            }
        }
        if mask.window == Some(0) {
            bail!("{OP}: window = 0 hides every key\nHINT: a window of W lets a query see itself and W - 1 keys before it")
        }
        let largest = mask.key_positions.iter().copied().max().unwrap_or(0).max(mask.query_start + t);
        if largest >= MAX_POSITION {
            bail!("{OP}: position {largest} is beyond the supported 2^53")
        }
        if !scale.is_finite() {
            bail!("{OP}: scale must be finite, got {scale}")
        }
        let bf16 = match bf16::current() {
            Precision::Bf16 if compute_dtype(OP, q.dtype()).ok() == Some(DType::F32) => {
                Some(Bf16Tiles { kernel: bf16::kernel()? })
            }
            _ => None,
        };
        let tiles = s.div_ceil(KEY_TILE);
        let mut key_pos = vec![PAD_POSITION; tiles * KEY_TILE];
        for (slot, &p) in key_pos.iter_mut().zip(&mask.key_positions) {
            *slot = p as i64;
        }
        let tile_len: Vec<usize> = (0..tiles).map(|i| (s - i * KEY_TILE).min(KEY_TILE)).collect();
        let real = |i: usize| &key_pos[i * KEY_TILE..i * KEY_TILE + tile_len[i]];
        Ok(Plan {
            b,
            h,
            kv,
            t,
            s,
            hd,
            scale,
            query_start: mask.query_start as i64,
            causal: mask.causal,
            window: mask.window.map_or(i64::MAX, |w| w.min(MAX_POSITION) as i64),
            slopes: mask.alibi_slopes.as_ref().map(|s| s.iter().map(|&x| x as f64).collect()),
            tile_min: (0..tiles).map(|i| real(i).iter().copied().min().unwrap_or(PAD_POSITION)).collect(),
            tile_max: (0..tiles).map(|i| real(i).iter().copied().max().unwrap_or(PAD_POSITION)).collect(),
            tile_len,
            key_pos,
            key_len: mask.key_lengths.clone().unwrap_or_else(|| vec![s; b]),
            dropout: mask.dropout,
            bf16,
        })
    }

    fn group(&self) -> usize {
        self.h / self.kv
    }

    fn key_tiles(&self) -> usize {
        self.tile_len.len()
    }

    fn query_tiles(&self) -> usize {
        self.t.div_ceil(QUERY_TILE)
    }

    /// Keys of tile `tile` that batch row `b` holds (a prefix of the tile; 0 when the tile is
    /// all padding).
    fn keys_in_tile(&self, b: usize, tile: usize) -> usize {
        self.tile_len[tile].min(self.key_len[b].saturating_sub(tile * KEY_TILE))
    }

    /// Queries `q_lo..=q_hi` (positions) of batch row `b` against key tile `tile`.
    fn classify(&self, b: usize, q_lo: i64, q_hi: i64, tile: usize) -> TileMask {
        let (k_min, k_max) = (self.tile_min[tile], self.tile_max[tile]);
        let keys = self.keys_in_tile(b, tile);
        if keys == 0 || (self.causal && k_min > q_hi) || q_lo - k_max >= self.window {
            return TileMask::Hidden;
        }
        let open = (!self.causal || k_max <= q_lo) && q_hi - k_min < self.window && keys == KEY_TILE;
        if open {
            TileMask::Open
        } else {
            TileMask::Partial
        }
    }
}

fn shape_error(msg: &str, expected: &[usize], got: &[usize]) -> candle_core::Error {
    candle_core::Error::UnexpectedShape { msg: msg.to_string(), expected: Shape::from(expected), got: Shape::from(got) }
}

/// The op: forward saves the per-row log-sum-exp `L` for the backward.
struct FlashAttention {
    plan: Arc<Plan>,
    /// Inputs and output are `(B, T, heads·hd)` ([`flash_attention_tokens`]), not
    /// `(B, heads, T, hd)`.
    token_major: bool,
    /// Only keep `L` when some input wants a gradient.
    save_lse: bool,
    /// `(B, H, T)`, set by the forward.
    lse: OnceLock<Tensor>,
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "flash_attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(
            op: &FlashAttention,
            (q, lq): (&CpuStorage, &Layout),
            (k, lk): (&CpuStorage, &Layout),
            (v, lv): (&CpuStorage, &Layout),
        ) -> Result<(CpuStorage, Shape)> {
            let p = &op.plan;
            let q = storage_slice::<T>("flash_attention", q, lq)?;
            let (out, lse) = if op.token_major {
                let slice = |storage, layout| storage_slice::<T>("flash_attention", storage, layout);
                let (k, v) = (slice(k, lk)?, slice(v, lv)?);
                let [q, k, v] = token_major_views(p, [q, k, v]);
                let (out, lse) = forward(p, q, k, v);
                (reorder_heads(&out, p.b, p.t, p.h, p.hd, false), lse)
            } else {
                let q = HeadRows::head_major(q, p.h, p.t, p.hd);
                forward(p, q, HeadRows::of(p, k, lk)?, HeadRows::of(p, v, lv)?)
            };
            if op.save_lse {
                let lse = Tensor::from_vec(lse, (p.b, p.h, p.t), &Device::Cpu)?;
                // A fresh op runs its forward once; a second set would be a bug, not user input.
                let _ = op.lse.set(lse);
            }
            let shape =
                if op.token_major { Shape::from((p.b, p.t, p.h * p.hd)) } else { Shape::from((p.b, p.h, p.t, p.hd)) };
            Ok((T::to_cpu_storage_owned(out), shape))
        }
        match q {
            CpuStorage::F32(_) => run::<f32>(self, (q, lq), (k, lk), (v, lv)),
            CpuStorage::F64(_) => run::<f64>(self, (q, lq), (k, lk), (v, lv)),
            _ => Err(candle_core::Error::UnsupportedDTypeForOp(
                candle_core::backend::BackendStorage::dtype(q),
                "flash_attention",
            )),
        }
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(lse) = self.lse.get() else {
            bail!("flash_attention: backward without a saved forward (no input required a gradient)")
        };
        let p = &self.plan;
        let grad_out = grad_out.to_dtype(q.dtype())?;
        fn run<T: Real>(p: &Plan, token_major: bool, t: &[&Tensor]) -> Result<(Tensor, Tensor, Tensor)> {
            let lse = t[5].to_dtype(T::DTYPE)?;
            let (dq, dk, dv) = with_slices::<T, _>("flash_attention", &[t[0], t[1], t[2], t[3], t[4], &lse], |s| {
                if !token_major {
                    let queries = |x| HeadRows::head_major(x, p.h, p.t, p.hd);
                    let keys = |x| HeadRows::head_major(x, p.kv, p.s, p.hd);
                    let [q, k, v, out, dout] = [queries(s[0]), keys(s[1]), keys(s[2]), queries(s[3]), queries(s[4])];
                    return Ok(backward(p, q, k, v, out, dout, s[5]));
                }
                let [q, k, v] = token_major_views(p, [s[0], s[1], s[2]]);
                let [out, dout] = [s[3], s[4]].map(|x| HeadRows::queries_token_major(p, x));
                let (dq, dk, dv) = backward(p, q, k, v, out, dout, s[5]);
                Ok((
                    reorder_heads(&dq, p.b, p.t, p.h, p.hd, false),
                    reorder_heads(&dk, p.b, p.s, p.kv, p.hd, false),
                    reorder_heads(&dv, p.b, p.s, p.kv, p.hd, false),
                ))
            })?;
            let (q_shape, kv_shape) = if token_major {
                (Shape::from((p.b, p.t, p.h * p.hd)), Shape::from((p.b, p.s, p.kv * p.hd)))
            } else {
                (Shape::from((p.b, p.h, p.t, p.hd)), Shape::from((p.b, p.kv, p.s, p.hd)))
            };
            Ok((
                Tensor::from_vec(dq, q_shape, &Device::Cpu)?,
                Tensor::from_vec(dk, kv_shape.clone(), &Device::Cpu)?,
                Tensor::from_vec(dv, kv_shape, &Device::Cpu)?,
            ))
        }
        let tensors = [q, k, v, out, &grad_out, lse];
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => run::<f32>(p, self.token_major, &tensors)?,
            DType::F64 => run::<f64>(p, self.token_major, &tensors)?,
            other => return Err(candle_core::Error::UnsupportedDTypeForOp(other, "flash_attention")),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// Rows a strided reader asks the cache for ahead of the one it reads ([`prefetch_row`]).
const PREFETCH_ROWS: usize = 4;

/// Ask the cache for the row of `hd` values at `src[offset..]` (which may lie past `src`'s end:
/// then nothing useful is fetched, and nothing faults), a few rows before it is read. Why: a head's rows in token-major data lie whole token rows apart, often a page or
/// more, where the hardware prefetcher does not follow; the backward reads them from memory
/// (the forward wrote them long before), one latency per row without this.
#[inline(always)]
fn prefetch_row<T>(src: &[T], offset: usize, hd: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let first = src.as_ptr().wrapping_add(offset);
        let line = 64 / std::mem::size_of::<T>().max(1);
        // SAFETY: SSE is part of x86_64; a prefetch reads nothing and never faults, even past
        // the slice's end.
        unsafe {
            for i in (0..hd).step_by(line) {
                _mm_prefetch::<_MM_HINT_T0>(first.wrapping_add(i) as *const i8);
            }
            _mm_prefetch::<_MM_HINT_T0>(first.wrapping_add(hd.saturating_sub(1)) as *const i8);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (src, offset, hd);
}

/// Token-major `q` `(B, T, H·hd)`, `k` and `v` `(B, S, KV·hd)` read by head.
fn token_major_views<'a, T>(p: &Plan, [q, k, v]: [&'a [T]; 3]) -> [HeadRows<'a, T>; 3] {
    let keys = |x| HeadRows::token_major(x, p.s, p.kv * p.hd, 0, p.kv, p.hd);
    [HeadRows::queries_token_major(p, q), keys(k), keys(v)]
}

/// Rows of `hd` values, one per (batch, head, position), read in place through their strides:
/// contiguous head-major `(B, N, R, hd)` data, a KV cache's view of the filled prefix of its
/// `(B, KV, capacity, hd)` buffer, or the heads of token-major `(B, R, width)` data (a
/// projection's output, head `n` in columns `n·hd..` of each token's row).
///
/// Why: every kernel reads its operands through this, so token-major inputs (the q/k/v
/// projections, the fused `qkv`, the output gradient) are not copied into a head-major layout
/// first, and the backward reads the forward's inputs and output where they already are.
#[derive(Clone, Copy)]
struct HeadRows<'a, T> {
    /// The storage from the first element on.
    data: &'a [T],
    batch_stride: usize,
    head_stride: usize,
    /// Elements from one position's row to the next.
    row_stride: usize,
    /// Heads per batch row.
    heads: usize,
    hd: usize,
}

impl<'a, T> HeadRows<'a, T> {
    /// Contiguous `(B, heads, rows, hd)` data.
    fn head_major(data: &'a [T], heads: usize, rows: usize, hd: usize) -> Self {
        HeadRows { data, batch_stride: heads * rows * hd, head_stride: rows * hd, row_stride: hd, heads, hd }
    }

    /// `heads` heads of `hd` columns each, from column `first·hd` of each row of contiguous
    /// `(B, rows, width)` data.
    fn token_major(data: &'a [T], rows: usize, width: usize, first: usize, heads: usize, hd: usize) -> Self {
        // (Past the end only for a batch of no rows, whose rows are never asked for.)
        let data = data.get(first * hd..).unwrap_or_default();
        HeadRows { data, batch_stride: rows * width, head_stride: hd, row_stride: width, heads, hd }
    }

    /// Token-major `(B, T, H·hd)` queries (or outputs, or their gradients) of `p`, by head.
    fn queries_token_major(p: &Plan, data: &'a [T]) -> Self {
        Self::token_major(data, p.t, p.h * p.hd, 0, p.h, p.hd)
    }

    /// The data of `storage` in `layout` (checked by [`head_strides`]).
    fn of(p: &Plan, storage: &'a CpuStorage, layout: &Layout) -> Result<Self>
    where
        T: Real,
    {
        let Some((batch_stride, head_stride)) = head_strides(layout) else {
            bail!("flash_attention: internal error, keys/values are not contiguous within each head")
        };
        let data = &T::cpu_storage_as_slice(storage)?[layout.start_offset()..];
        Ok(HeadRows { data, batch_stride, head_stride, row_stride: p.hd, heads: p.kv, hd: p.hd })
    }

    /// Rows `first..first + count` of (batch, head) `g = b·heads + head`: row `i` is
    /// `[i·row_stride..][..hd]` of the slice.
    fn rows(&self, g: usize, first: usize, count: usize) -> &'a [T] {
        if count == 0 {
            return &[];
        }
        &self.data[self.offset(g, first)..][..(count - 1) * self.row_stride + self.hd]
    }

    /// Ask the cache for row `row` of (batch, head) `g` ([`prefetch_row`]); past the last head
    /// that is memory beyond the data, harmlessly.
    fn prefetch(&self, g: usize, row: usize) {
        prefetch_row(self.data, self.offset(g, row), self.hd)
    }

    /// Where row `row` of (batch, head) `g` starts in the data.
    fn offset(&self, g: usize, row: usize) -> usize {
        (g / self.heads) * self.batch_stride + (g % self.heads) * self.head_stride + row * self.row_stride
    }
}

/// `(batch stride, head stride)` of a `(B, KV, S, hd)` layout whose rows are contiguous within
/// each head (what [`HeadRows`] reads), `None` otherwise.
fn head_strides(layout: &Layout) -> Option<(usize, usize)> {
    let (dims, stride) = (layout.dims(), layout.stride());
    let &[_, _, s, hd] = dims else { return None };
    let rows_contiguous = (hd <= 1 || stride[3] == 1) && (s <= 1 || stride[2] == hd);
    rows_contiguous.then_some((stride[0], stride[1]))
}

/// Read-only inputs of the forward kernels.
struct Fwd<'a, T> {
    plan: &'a Plan,
    /// `(B, H, T, hd)` by head, read where it lies (head- or token-major).
    q: HeadRows<'a, T>,
    /// `scale·k`, transposed per key tile and zero-padded: `(B, KV, tiles, hd, KEY_TILE)`
    /// (empty with bf16 products).
    kt: &'a [T],
    /// `(B, KV, S, hd)` by head, read where it lies.
    v: HeadRows<'a, T>,
    /// With bf16 products: `scale·kᵀ` paired along `hd`, `(B, KV, tiles, hd/2, KEY_TILE)`,
    /// and `v` paired along keys, `(B, KV, tiles, KEY_TILE/2, hd)`; empty otherwise.
    kt_pairs: &'a [u32],
    v_pairs: &'a [u32],
}

/// Returns `O` `(B, H, T, hd)` and `L` `(B, H, T)` for `q` `(B, H, T, hd)` and `k`, `v`
/// `(B, KV, S, hd)`.
fn forward<T: Real>(p: &Plan, q: HeadRows<'_, T>, k: HeadRows<'_, T>, v: HeadRows<'_, T>) -> (Vec<T>, Vec<T>) {
    let (t, hd) = (p.t, p.hd);
    // SAFETY (both): `forward_query_tile` zeroes its rows of `out` first and writes each
    // row's `lse`; the tiles cover both.
    let mut out = unsafe { output_buffer(p.b * p.h * t * hd) };
    let mut lse = unsafe { output_buffer(p.b * p.h * t) };
    if out.is_empty() {
        lse.fill(T::NEG_INFINITY); // (only with head_dim 0) nothing seen
        return (out, lse);
    }
    // Kᵀ once per KV head (shared by the whole query group), with the scale folded in.
    let tile_elems = hd * KEY_TILE;
    let tiles = p.b * p.kv * p.key_tiles();
    let scale = T::of(p.scale);
    // Tile `i` of all (batch, KV head, key tile): its rows (at `x.row_stride`) and their number.
    fn key_tile<'a, T>(p: &Plan, x: HeadRows<'a, T>, i: usize) -> (&'a [T], usize) {
        let (g, tile) = (i / p.key_tiles(), i % p.key_tiles());
        (x.rows(g, tile * KEY_TILE, p.tile_len[tile]), p.tile_len[tile])
    }
    let (mut kt, mut kt_pairs, mut v_pairs) = (Vec::new(), Vec::new(), Vec::new());
    match p.bf16 {
        None => {
            // SAFETY: `transpose_tile` fills each tile whole.
            kt = unsafe { output_buffer(tiles * tile_elems) };
            if !kt.is_empty() {
                parallel::for_each_chunk(&mut kt, tile_elems, |i, dst| {
                    let (rows, keys) = key_tile(p, k, i);
                    transpose_tile(rows, keys, k.row_stride, hd, scale, dst)
                });
            }
        }
        Some(bf16) => {
            let pair_elems = hd.div_ceil(2) * KEY_TILE;
            kt_pairs = vec![0; tiles * pair_elems];
            parallel::for_each_chunk(&mut kt_pairs, pair_elems, |i, dst| {
                let mut kt = vec![T::ZERO; tile_elems];
                let (rows, keys) = key_tile(p, k, i);
                transpose_tile(rows, keys, k.row_stride, hd, scale, &mut kt);
                bf16.pack_across(f32s(&kt), hd, KEY_TILE, KEY_TILE, dst);
            });
            v_pairs = vec![0; tiles * tile_elems / 2];
            parallel::for_each_chunk(&mut v_pairs, tile_elems / 2, |i, dst| {
                let (rows, keys) = key_tile(p, v, i);
                bf16.pack_across(f32s(rows), keys, hd, v.row_stride, dst);
            });
        }
    }
    let inputs = Fwd { plan: p, q, kt: &kt, v, kt_pairs: &kt_pairs, v_pairs: &v_pairs };
    // One task per (batch, head, query tile): the rows `bh·T + q0 ..` of `lse`, times hd of `out`.
    let tiles = p.query_tiles();
    let rows: Vec<_> = (0..p.b * p.h * tiles)
        .map(|i| {
            let first = (i / tiles) * t + (i % tiles) * QUERY_TILE;
            first..first + QUERY_TILE.min(t - (i % tiles) * QUERY_TILE)
        })
        .collect();
    let values = rows.iter().map(|r| r.start * hd..r.end * hd).collect();
    parallel::for_each_part2(Split::parts(&mut out, values), Split::parts(&mut lse, rows), |i, out, lse| {
        forward_query_tile(&inputs, i / tiles, i % tiles, out, lse)
    });
    (out, lse)
}

/// `dst[d·KEY_TILE + j] = scale · src[j·ld + d]` for `keys` keys of `hd` values, zero beyond.
#[inline(always)]
fn transpose_tile<T: Real>(src: &[T], keys: usize, ld: usize, hd: usize, scale: T, dst: &mut [T]) {
    if keys < KEY_TILE {
        dst.fill(T::ZERO); // a full tile writes every element below
    }
    for j in 0..keys {
        prefetch_row(src, (j + PREFETCH_ROWS) * ld, hd);
        for (d, &x) in src[j * ld..][..hd].iter().enumerate() {
            dst[d * KEY_TILE + j] = scale * x;
        }
    }
}

multiversion! {
    /// One query tile of one head: the online-softmax loop over key tiles.
    fn forward_query_tile<T: Real>(inputs: &Fwd<'_, T>, bh: usize, tile: usize, out: &mut [T], lse: &mut [T]) {
        let p = inputs.plan;
        let hd = p.hd;
        let rows = lse.len();
        let (b, h) = (bh / p.h, bh % p.h);
        let g = b * p.kv + h / p.group(); // (batch, KV head) this head reads
        let q0 = tile * QUERY_TILE;
        let (q, ldq) = (inputs.q.rows(bh, q0, rows), inputs.q.row_stride); // (rows, hd)
        // With bf16 products: q paired along hd (rows, hd/2), and the probabilities' pairs.
        let (hd_pairs, mut q_pairs, mut scratch) = (hd.div_ceil(2), Vec::new(), None);
        if let Some(bf16) = p.bf16 {
            q_pairs = vec![0; rows * hd_pairs];
            bf16.pack_rows(f32s(q), rows, hd, ldq, &mut q_pairs);
            scratch = Some(TileScratch::new());
        }
        let q_lo = p.query_start + q0 as i64;
        let q_hi = q_lo + rows as i64 - 1;
        let slope = p.slopes.as_ref().map(|s| T::of(s[h]));

        let mut s = vec![T::ZERO; rows * KEY_TILE]; // (rows, KEY_TILE): scores, then probabilities
        let mut m = vec![T::NEG_INFINITY; rows]; // running max
        let mut l = vec![T::ZERO; rows]; // running sum of exp(s − m)
        let mut m_new = vec![T::NEG_INFINITY; rows];
        let mut alpha = vec![T::ONE; rows];
        out.fill(T::ZERO); // running Σ exp(s − m)·v, (rows, hd)
        for key_tile in 0..p.key_tiles() {
            let mask = p.classify(b, q_lo, q_hi, key_tile);
            if mask == TileMask::Hidden {
                continue;
            }
            let len = p.keys_in_tile(b, key_tile);
            let tile = g * p.key_tiles() + key_tile; // (batch, KV head, key tile)
            let scores = &mut s[..rows * KEY_TILE];
            match p.bf16 {
                None => {
                    scores.fill(T::ZERO);
                    let kt = &inputs.kt[tile * hd * KEY_TILE..][..hd * KEY_TILE];
                    gemm_acc(rows, KEY_TILE, hd, q, ldq, 1, kt, KEY_TILE, scores, KEY_TILE); // S = Q·(scale·K)ᵀ
                }
                Some(bf16) => {
                    let kt = &inputs.kt_pairs[tile * hd_pairs * KEY_TILE..][..hd_pairs * KEY_TILE];
                    bf16.product_into(rows, KEY_TILE, hd_pairs, &q_pairs, hd_pairs, 1, kt, KEY_TILE, f32s_mut(scores), KEY_TILE)
                }
            }
            mask_scores(p, rows, q_lo, key_tile, len, mask, slope, &mut s);
            // New running maxima and the factors that rescale what was summed so far.
            for (i, row) in s.chunks_exact(KEY_TILE).enumerate() {
                let row: &[T; KEY_TILE] = row.try_into().expect("one row");
                m_new[i] = m[i].maximum(row_max(row));
            }
            for i in 0..rows {
                // exp(-inf − m) = 0 when the row had nothing visible before.
                alpha[i] = if m_new[i] == T::NEG_INFINITY { T::ONE } else { (m[i] - m_new[i]).exp() };
            }
            for (i, row) in s.chunks_exact_mut(KEY_TILE).enumerate() {
                let row: &mut [T; KEY_TILE] = row.try_into().expect("one row");
                if m_new[i] == T::NEG_INFINITY {
                    row.fill(T::ZERO); // nothing visible to this row yet
                    continue;
                }
                for x in row.iter_mut() {
                    *x = (*x - m_new[i]).exp();
                }
                l[i] = l[i] * alpha[i] + row_sum(row);
                m[i] = m_new[i];
                if alpha[i] != T::ONE {
                    for o in &mut out[i * hd..][..hd] {
                        *o *= alpha[i];
                    }
                }
            }
            if let Some(dropout) = &p.dropout {
                // After the sum: the normaliser counts every probability, `v` meets the kept ones.
                let first = key_tile * KEY_TILE;
                drop_probabilities(p, dropout, bh, q0, first, rows, &mut s);
            }
            match (p.bf16, &mut scratch) {
                (Some(bf16), Some(scratch)) => {
                    let p_pairs = &mut scratch.along_keys[..rows * KEY_TILE / 2];
                    bf16.pack_rows(f32s(&s), rows, KEY_TILE, KEY_TILE, p_pairs);
                    let v_tile = &inputs.v_pairs[tile * KEY_TILE / 2 * hd..][..KEY_TILE / 2 * hd];
                    let pairs = len.div_ceil(2);
                    bf16.product(rows, hd, pairs, p_pairs, KEY_TILE / 2, 1, v_tile, hd, f32s_mut(out), hd); // o += P·V
                }
                _ => {
                    let v_tile = inputs.v.rows(g, key_tile * KEY_TILE, len); // (len, hd)
                    gemm_acc(rows, hd, len, &s, KEY_TILE, 1, v_tile, inputs.v.row_stride, out, hd); // o += P·V
                }
            }
        }
        for i in 0..rows {
            if l[i] > T::ZERO {
                let inv = T::ONE / l[i];
                for o in &mut out[i * hd..][..hd] {
                    *o *= inv;
                }
                lse[i] = m[i] + l[i].ln();
            } else {
                lse[i] = T::NEG_INFINITY; // out stays 0
            }
        }
    }
}

/// Multiply the probabilities `s` `(rows, KEY_TILE)` of query rows `q0..` of head `bh` and the
/// keys `first..` by their dropout factors `z`.
#[inline(always)]
fn drop_probabilities<T: Real>(
    p: &Plan,
    dropout: &DropoutMask,
    bh: usize,
    q0: usize,
    first: usize,
    rows: usize,
    s: &mut [T],
) {
    let scale = T::of(dropout.scale());
    for (i, row) in s.chunks_exact_mut(KEY_TILE).take(rows).enumerate() {
        let base = ((bh * p.t + q0 + i) * p.s + first) as u64;
        for (j, x) in row.iter_mut().enumerate() {
            *x *= dropout.factor(base + j as u64, scale);
        }
    }
}

/// Add ALiBi to the scores `s = q·(scale·k)ᵀ` `(rows, KEY_TILE)` and set hidden ones to `-inf`;
/// keys `len..` of the tile are hidden (padding).
///
/// (The product that makes `s` stays in the caller, not in a closure passed here: a closure
/// is compiled without the SIMD features of the multiversioned kernel around it.)
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn mask_scores<T: Real>(
    p: &Plan,
    rows: usize,
    q_lo: i64,
    key_tile: usize,
    len: usize,
    mask: TileMask,
    slope: Option<T>,
    s: &mut [T],
) {
    let s = &mut s[..rows * KEY_TILE];
    let key_pos: &[i64; KEY_TILE] = p.key_pos[key_tile * KEY_TILE..][..KEY_TILE].try_into().expect("one tile");
    for (i, row) in s.chunks_exact_mut(KEY_TILE).enumerate() {
        let qp = q_lo + i as i64;
        if let Some(slope) = slope {
            for (x, &kp) in row.iter_mut().zip(key_pos) {
                *x += slope * T::of((kp - qp) as f64);
            }
        }
        if mask == TileMask::Partial {
            for (j, (x, &kp)) in row.iter_mut().zip(key_pos).enumerate() {
                let visible = (j < len) & (!p.causal | (kp <= qp)) & (qp - kp < p.window);
                if !visible {
                    *x = T::NEG_INFINITY;
                }
            }
        }
    }
}

/// Lanes for the row reductions: independent accumulators the compiler keeps in one register.
const LANES: usize = 16;

/// Maximum of a `KEY_TILE` row: lane-wise, then a tree over the lanes (a chain of 16 scalar
/// steps would cost more latency than the row's share of the tile products).
#[inline(always)]
fn row_max<T: Real>(row: &[T; KEY_TILE]) -> T {
    let mut acc = [T::NEG_INFINITY; LANES];
    for c in row.chunks_exact(LANES) {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = a.maximum(x);
        }
    }
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            acc[i] = acc[i].maximum(acc[i + width]);
        }
        width /= 2;
    }
    acc[0]
}

/// Sum of a `KEY_TILE` row, reduced like [`row_max`].
#[inline(always)]
fn row_sum<T: Real>(row: &[T; KEY_TILE]) -> T {
    let mut acc = [T::ZERO; LANES];
    for c in row.chunks_exact(LANES) {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            acc[i] += acc[i + width];
        }
        width /= 2;
    }
    acc[0]
}

/// Read-only inputs of the backward kernels.
struct Bwd<'a, T> {
    plan: &'a Plan,
    /// `q`, `dout` `(B, H, T, hd)` and `k`, `v` `(B, KV, S, hd)`, by head, each read where it
    /// lies (head- or token-major: [`HeadRows`]).
    q: HeadRows<'a, T>,
    k: HeadRows<'a, T>,
    v: HeadRows<'a, T>,
    dout: HeadRows<'a, T>,
    /// `(B, H, T)`: `L_i` from the forward.
    lse: &'a [T],
    /// `(B, H, T)`: `D_i = dO_i · O_i`.
    d: &'a [T],
    /// With bf16 products, `q` and `dO` as pair operands ([`QueryPairs`]); `None` otherwise.
    q_pairs: Option<QueryPairs>,
    dout_pairs: Option<QueryPairs>,
}

/// Queries (or their output gradients) `(B, H, T, hd)` as bf16 pair operands, made once per
/// backward: paired along `hd` (`A` of `Q·Kᵀ` and `dO·Vᵀ`) and, per query tile, paired across
/// its rows (`B` of `dSᵀ·Q` and `Pᵀ·dO`).
struct QueryPairs {
    /// `(B, H, T, hd/2)`
    along: Vec<u32>,
    /// `(B, H, query tiles, QUERY_TILE/2, hd)`
    across: Vec<u32>,
}

impl QueryPairs {
    fn new<T: Real>(p: &Plan, bf16: Bf16Tiles, x: HeadRows<'_, T>) -> Self {
        let (t, hd) = (p.t, p.hd);
        let hd_pairs = hd.div_ceil(2);
        let mut along = vec![0; p.b * p.h * t * hd_pairs];
        parallel::for_each_chunk(&mut along, t * hd_pairs, |bh, dst| {
            bf16.pack_rows(f32s(x.rows(bh, 0, t)), t, hd, x.row_stride, dst)
        });
        let tile_elems = QUERY_TILE / 2 * hd;
        let mut across = vec![0; p.b * p.h * p.query_tiles() * tile_elems];
        parallel::for_each_chunk(&mut across, tile_elems, |i, dst| {
            let (bh, q0) = (i / p.query_tiles(), i % p.query_tiles() * QUERY_TILE);
            let rows = (t - q0).min(QUERY_TILE);
            bf16.pack_across(f32s(x.rows(bh, q0, rows)), rows, hd, x.row_stride, dst)
        });
        QueryPairs { along, across }
    }

    /// Rows `q0..q0 + rows` of head `bh` paired along `hd`: `(rows, hd/2)`.
    fn along(&self, p: &Plan, bh: usize, q0: usize, rows: usize) -> &[u32] {
        let hd_pairs = p.hd.div_ceil(2);
        &self.along[(bh * p.t + q0) * hd_pairs..][..rows * hd_pairs]
    }

    /// Query tile `q0 / QUERY_TILE` of head `bh` paired across rows: `(QUERY_TILE/2, hd)`.
    fn across(&self, p: &Plan, bh: usize, q0: usize) -> &[u32] {
        let tile_elems = QUERY_TILE / 2 * p.hd;
        &self.across[(bh * p.query_tiles() + q0 / QUERY_TILE) * tile_elems..][..tile_elems]
    }
}

/// Returns `(dq, dk, dv)`.
///
/// `q`, `out`, `dout`: `(B, H, T, hd)`; `k`, `v`: `(B, KV, S, hd)`, each read in place; `dq`,
/// `dk`, `dv` come out head-major and contiguous.
#[allow(clippy::too_many_arguments)]
fn backward<T: Real>(
    p: &Plan,
    q: HeadRows<'_, T>,
    k: HeadRows<'_, T>,
    v: HeadRows<'_, T>,
    out: HeadRows<'_, T>,
    dout: HeadRows<'_, T>,
    lse: &[T],
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (t, s, hd, group) = (p.t, p.s, p.hd, p.group());
    // SAFETY (all three): zeroed below by the task that owns each part, before it accumulates
    // (in parallel, and while the part is about to be in its cache).
    let mut dq = unsafe { output_buffer(p.b * p.h * t * hd) };
    let mut dk = unsafe { output_buffer(p.b * p.kv * s * hd) };
    let mut dv = unsafe { output_buffer(p.b * p.kv * s * hd) };
    if dq.is_empty() || dk.is_empty() {
        // No queries or no keys (T, S or head_dim 0): nothing flows anywhere.
        for part in [&mut dq, &mut dk, &mut dv] {
            part.fill(T::ZERO);
        }
        return (dq, dk, dv);
    }
    // D = rowsum(dO ∘ O), one value per query row.
    let rows = parallel::rows_per_task(hd);
    // SAFETY: each task writes its rows whole.
    let mut d = unsafe { output_buffer(p.b * p.h * t) };
    parallel::for_each_chunk(&mut d, rows, |i, d| {
        for (row, d) in (i * rows..).zip(d.iter_mut()) {
            let ahead = row + PREFETCH_ROWS;
            out.prefetch(ahead / t, ahead % t);
            dout.prefetch(ahead / t, ahead % t);
            let (o, g) = (out.rows(row / t, row % t, 1), dout.rows(row / t, row % t, 1));
            *d = o.iter().zip(g).fold(T::ZERO, |acc, (&o, &g)| acc + o * g);
        }
    });
    let (q_pairs, dout_pairs) = match p.bf16 {
        Some(bf16) => (Some(QueryPairs::new(p, bf16, q)), Some(QueryPairs::new(p, bf16, dout))),
        None => (None, None),
    };
    let inputs = Bwd { plan: p, q, k, v, dout, lse, d: &d, q_pairs, dout_pairs };
    let scale = T::of(p.scale);
    let dq_len = group * t * hd;

    // Enough tasks to keep every thread busy even with one KV head (MQA) and batch 1.
    let tasks_wanted = 4 * parallel::threads();
    let chunks = tasks_wanted.div_ceil(p.b * p.kv).clamp(1, p.key_tiles());
    let tiles_per_chunk = p.key_tiles().div_ceil(chunks);
    let chunks = p.key_tiles().div_ceil(tiles_per_chunk);
    if chunks == 1 {
        // One task per (batch, KV head), adding straight into its heads' `dq`.
        let (dq_parts, dk_parts, dv_parts) =
            (Split::chunks(&mut dq, dq_len), Split::chunks(&mut dk, s * hd), Split::chunks(&mut dv, s * hd));
        parallel::for_each_part3(dq_parts, dk_parts, dv_parts, |g, dq, dk, dv| {
            for part in [&mut *dq, &mut *dk, &mut *dv] {
                part.fill(T::ZERO);
            }
            backward_key_chunk(&inputs, g, 0, dq, dk, dv);
            dq.iter_mut().for_each(|x| *x *= scale);
        });
        return (dq, dk, dv);
    }
    // One task per (batch, KV head, chunk of key tiles), each with a private `dq`, added into
    // `dq` in chunk order (so the sum does not depend on scheduling). The chunks run in waves
    // of one per thread, so at most that many private copies of `dq` exist at once.
    dq.fill(T::ZERO);
    let chunk_len = tiles_per_chunk * KEY_TILE * hd;
    let wave = parallel::threads();
    for first in (0..chunks).step_by(wave) {
        let in_wave = wave.min(chunks - first);
        // Task `i` of the wave: (batch, KV head) `i / in_wave`, chunk `first + i % in_wave`.
        let keys: Vec<_> = (0..p.b * p.kv * in_wave)
            .map(|i| {
                let (g, c) = (i / in_wave, first + i % in_wave);
                g * s * hd + c * chunk_len..(g * s * hd + (c + 1) * chunk_len).min((g + 1) * s * hd)
            })
            .collect();
        let mut partial_dq = vec![Vec::new(); keys.len()];
        let parts =
            (Split::parts(&mut dk, keys.clone()), Split::parts(&mut dv, keys), Split::chunks(&mut partial_dq, 1));
        parallel::for_each_part3(parts.0, parts.1, parts.2, |i, dk, dv, dq_part| {
            dk.fill(T::ZERO);
            dv.fill(T::ZERO);
            dq_part[0] = vec![T::ZERO; dq_len];
            let (g, c) = (i / in_wave, first + i % in_wave);
            backward_key_chunk(&inputs, g, c * tiles_per_chunk, &mut dq_part[0], dk, dv);
        });
        parallel::for_each_chunk(&mut dq, dq_len, |g, dq| {
            for part in &partial_dq[g * in_wave..(g + 1) * in_wave] {
                dq.iter_mut().zip(part).for_each(|(x, &y)| *x += y * scale);
            }
        });
    }
    (dq, dk, dv)
}

multiversion! {
    /// The key tiles `first_tile..` covered by `dk`/`dv` (`(keys, hd)` each) of one
    /// (batch, KV head) `g`, against every query of the heads in its group. Adds `Σ ds·k` (without
    /// the scale) into `dq` `(group, T, hd)`; writes `dk` (scaled) and `dv`.
    fn backward_key_chunk<T: Real>(inputs: &Bwd<'_, T>, g: usize, first_tile: usize, dq: &mut [T], dk: &mut [T], dv: &mut [T]) {
        let p = inputs.plan;
        let (hd, t) = (p.hd, p.t);
        let b = g / p.kv;
        let kv_head = g % p.kv;
        let (ldq, ldk, ldv, ldo) =
            (inputs.q.row_stride, inputs.k.row_stride, inputs.v.row_stride, inputs.dout.row_stride);
        let tiles = dk.len().div_ceil(KEY_TILE * hd);

        let mut kt = vec![T::ZERO; hd * KEY_TILE]; // scale·Kᵀ of the tile
        let mut vt = vec![T::ZERO; hd * KEY_TILE]; // Vᵀ of the tile
        let mut s = vec![T::ZERO; QUERY_TILE * KEY_TILE]; // scores, then P
        let mut dp = [T::ZERO; QUERY_TILE * KEY_TILE]; // dP, then dS
        // P∘Z, with dropout only.
        let mut pz = if p.dropout.is_some() { vec![T::ZERO; QUERY_TILE * KEY_TILE] } else { Vec::new() };
        let scale = T::of(p.scale);
        // With bf16 products: the tile's scale·Kᵀ and Vᵀ paired along hd, K paired along keys.
        let hd_pairs = hd.div_ceil(2);
        let (mut kt_pairs, mut vt_pairs, mut k_pairs) = (Vec::new(), Vec::new(), Vec::new());
        let mut scratch = None;
        if p.bf16.is_some() {
            kt_pairs = vec![0; hd_pairs * KEY_TILE];
            vt_pairs = vec![0; hd_pairs * KEY_TILE];
            k_pairs = vec![0; KEY_TILE / 2 * hd];
            scratch = Some(TileScratch::new());
        }
        for key_tile in first_tile..first_tile + tiles {
            let len = p.keys_in_tile(b, key_tile);
            if len == 0 {
                continue; // padding only: no query sees these keys
            }
            let k_tile = inputs.k.rows(g, key_tile * KEY_TILE, len); // (len, hd)
            let v_tile = inputs.v.rows(g, key_tile * KEY_TILE, len);
            transpose_tile(k_tile, len, ldk, hd, scale, &mut kt);
            transpose_tile(v_tile, len, ldv, hd, T::ONE, &mut vt);
            if let Some(bf16) = p.bf16 {
                bf16.pack_across(f32s(&kt), hd, KEY_TILE, KEY_TILE, &mut kt_pairs);
                bf16.pack_across(f32s(&vt), hd, KEY_TILE, KEY_TILE, &mut vt_pairs);
                bf16.pack_across(f32s(k_tile), len, hd, ldk, &mut k_pairs);
            }
            let local = (key_tile - first_tile) * KEY_TILE * hd;
            let dk_tile = &mut dk[local..][..len * hd];
            let dv_tile = &mut dv[local..][..len * hd];
            for member in 0..p.group() {
                let h = kv_head * p.group() + member;
                let bh = b * p.h + h;
                let slope = p.slopes.as_ref().map(|s| T::of(s[h]));
                for query_tile in 0..p.query_tiles() {
                    let q0 = query_tile * QUERY_TILE;
                    let rows = (t - q0).min(QUERY_TILE);
                    let q_lo = p.query_start + q0 as i64;
                    let mask = p.classify(b, q_lo, q_lo + rows as i64 - 1, key_tile);
                    if mask == TileMask::Hidden {
                        continue;
                    }
                    let q = inputs.q.rows(bh, q0, rows); // (rows, hd)
                    let dout = inputs.dout.rows(bh, q0, rows);
                    let lse = &inputs.lse[bh * t + q0..][..rows];
                    let d = &inputs.d[bh * t + q0..][..rows];
                    // With bf16 products: the pair operands of these rows, and the tile's scratch.
                    let mut bf16 = match (p.bf16, &inputs.q_pairs, &inputs.dout_pairs, scratch.as_mut()) {
                        (Some(bf16), Some(q_pairs), Some(dout_pairs), Some(scratch)) => {
                            Some((bf16, q_pairs, dout_pairs, scratch))
                        }
                        _ => None,
                    };
                    let scores = &mut s[..rows * KEY_TILE];
                    match &bf16 {
                        None => {
                            scores.fill(T::ZERO);
                            gemm_acc(rows, KEY_TILE, hd, q, ldq, 1, &kt, KEY_TILE, scores, KEY_TILE) // S = Q·(scale·K)ᵀ
                        }
                        Some((bf16, q_pairs, ..)) => {
                            let q = q_pairs.along(p, bh, q0, rows);
                            bf16.product_into(rows, KEY_TILE, hd_pairs, q, hd_pairs, 1, &kt_pairs, KEY_TILE, f32s_mut(scores), KEY_TILE)
                        }
                    }
                    mask_scores(p, rows, q_lo, key_tile, len, mask, slope, &mut s);
                    for (row, &l) in s.chunks_exact_mut(KEY_TILE).take(rows).zip(lse) {
                        if l == T::NEG_INFINITY {
                            row.fill(T::ZERO); // a row that saw nothing has no gradient
                        } else {
                            for x in row.iter_mut() {
                                *x = (*x - l).exp();
                            }
                        }
                    }
                    let s = &s[..rows * KEY_TILE];
                    let first = key_tile * KEY_TILE;
                    // With dropout, v met P∘Z in the forward; dS below still uses P.
                    let p_seen_by_v = match &p.dropout {
                        None => s,
                        Some(dropout) => {
                            let pz = &mut pz[..rows * KEY_TILE];
                            pz.copy_from_slice(s);
                            drop_probabilities(p, dropout, bh, q0, first, rows, pz);
                            pz
                        }
                    };
                    let dp = &mut dp[..rows * KEY_TILE];
                    let query_pairs = rows.div_ceil(2);
                    match &mut bf16 {
                        None => {
                            dp.fill(T::ZERO);
                            gemm_acc(len, hd, rows, p_seen_by_v, 1, KEY_TILE, dout, ldo, dv_tile, hd); // dv += (P∘Z)ᵀ·dO
                            gemm_acc(rows, KEY_TILE, hd, dout, ldo, 1, &vt, KEY_TILE, dp, KEY_TILE); // dP = dO·Vᵀ
                        }
                        Some((bf16, _, dout_pairs, scratch)) => {
                            let pt = &mut scratch.across_queries;
                            bf16.pack_across(f32s(p_seen_by_v), rows, KEY_TILE, KEY_TILE, pt);
                            let dout = dout_pairs.across(p, bh, q0);
                            bf16.product(len, hd, query_pairs, pt, 1, KEY_TILE, dout, hd, f32s_mut(dv_tile), hd); // dv += (P∘Z)ᵀ·dO
                            let dout = dout_pairs.along(p, bh, q0, rows);
                            bf16.product_into(rows, KEY_TILE, hd_pairs, dout, hd_pairs, 1, &vt_pairs, KEY_TILE, f32s_mut(dp), KEY_TILE); // dP = dO·Vᵀ
                        }
                    }
                    if let Some(dropout) = &p.dropout {
                        drop_probabilities(p, dropout, bh, q0, first, rows, dp); // Z∘dP
                    }
                    for ((dp_row, p_row), &d) in dp.chunks_exact_mut(KEY_TILE).zip(s.chunks_exact(KEY_TILE)).zip(d) {
                        for (x, &pij) in dp_row.iter_mut().zip(p_row) {
                            *x = pij * (*x - d); // dS
                        }
                    }
                    let dq_tile = &mut dq[(member * t + q0) * hd..][..rows * hd];
                    match bf16 {
                        None => {
                            gemm_acc(rows, hd, len, dp, KEY_TILE, 1, k_tile, ldk, dq_tile, hd); // dq += dS·K
                            gemm_acc(len, hd, rows, dp, 1, KEY_TILE, q, ldq, dk_tile, hd); // dk += dSᵀ·Q
                        }
                        Some((bf16, q_pairs, _, scratch)) => {
                            let ds = f32s(dp);
                            bf16.pack_rows(ds, rows, KEY_TILE, KEY_TILE, &mut scratch.along_keys);
                            let key_pairs = len.div_ceil(2);
                            bf16.product(rows, hd, key_pairs, &scratch.along_keys, KEY_TILE / 2, 1, &k_pairs, hd, f32s_mut(dq_tile), hd); // dq += dS·K
                            bf16.pack_across(ds, rows, KEY_TILE, KEY_TILE, &mut scratch.across_queries);
                            let q = q_pairs.across(p, bh, q0);
                            bf16.product(len, hd, query_pairs, &scratch.across_queries, 1, KEY_TILE, q, hd, f32s_mut(dk_tile), hd); // dk += dSᵀ·Q
                        }
                    }
                }
            }
        }
        for x in dk.iter_mut() {
            *x *= scale;
        }
    }
}

#[cfg(test)]
mod bf16_tests;
mod bf16_tiles;
mod fused_qkv;
#[cfg(test)]
mod tests;

pub use fused_qkv::flash_attention_qkv;
