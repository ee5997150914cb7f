//! Dense matrix product `C = A·B` (or `C += A·B`, or `C = bias + A·B`: [`Start`]) for the
//! linear layers, forward and backward.
//!
//! Why our own: candle's CPU matmul (the `gemm` crate) compiles its AVX-512 kernels only behind
//! a nightly-only feature, so on stable Rust it runs a 256-bit kernel and reaches about half of
//! what this CPU does (measured 150–175 GFLOP/s against MKL's 310–340 on 2 cores). AVX-512
//! intrinsics are stable since Rust 1.89, so the kernel below uses them directly.
//!
//! The algorithm is the classic one of GotoBLAS/BLIS:
//!
//! ```text
//! for each block of NC columns of B and C                       (jc)
//!   for each group of KC blocks along k                         (pc)
//!     pack the shared operand (B's NR-wide column panels)       (all threads, then a barrier)
//!     for each unit of MR-tall row panels of A, on any thread   (ic, handed out dynamically)
//!       for each KC block of the group
//!         pack this unit's rows of A into MR-tall panels        (stays in L2)
//!         for each MR-tall panel of A                           (ir: its MR×kc panel in L1)
//!           for each NR-wide panel of B                         (jr: streamed from L2)
//!             micro-kernel: C[MR×NR] += Ap[MR×kc] · Bp[kc×NR], C held in registers
//! ```
//!
//! (The portable kernel swaps the two inner loops: its B panel stays in L1.)
//!
//! When A has too few rows to share among the threads, the roles swap: A is the shared
//! operand and the units are column panels of B.
//!
//! Packing copies each operand into the exact order the micro-kernel reads it (so any strides
//! work, a transposed weight included) and zero-pads ragged edges (so the kernel always
//! computes a full tile; only the store is partial).
//!
//! Micro-kernels: for `f32` with AVX-512, 8 rows × 48 columns (24 of the 32 `zmm` registers
//! accumulate, three hold the row of `B`, and each of the 8 values of `A` is broadcast straight
//! from memory into its FMAs). Otherwise a portable kernel whose accumulators are plain arrays,
//! compiled for AVX2+FMA where available by [`multiversion!`].
//!
//! Threads: candle's barrier pool (see [`for_each_unit`]). A single row times a transposed
//! weight (decoding) skips all this for plain dot products.
//!
//! When a CBLAS library has been loaded ([`super::blas`]), `f32` products go to it instead.

use std::cell::RefCell;

use super::bf16::{self, Bf16Kernel, Precision};
use super::parallel;
use super::simd::{isa, multiversion, Isa, Real};

/// A read-only matrix view: element `(i, j)` is `data[i·row_stride + j·col_stride]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a, T: Copy> MatRef<'a, T> {
    /// A contiguous row-major `rows × cols` matrix.
    pub fn row_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        assert!(data.len() >= rows * cols, "row_major: {} elements for {rows}×{cols}", data.len());
        MatRef { data, rows, cols, row_stride: cols, col_stride: 1 }
    }

    /// The transpose, without copying.
    pub fn t(self) -> Self {
        MatRef { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }

    /// The same view over other data of the same length (the `f32` storage of a `T` view).
    fn with_data<U>(self, data: &[U]) -> MatRef<'_, U> {
        assert_eq!(data.len(), self.data.len());
        MatRef { data, rows: self.rows, cols: self.cols, row_stride: self.row_stride, col_stride: self.col_stride }
    }

    #[cfg(test)]
    fn at(&self, i: usize, j: usize) -> T {
        self.data[i * self.row_stride + j * self.col_stride]
    }

    fn last_index(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            return 0;
        }
        (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
    }
}

/// `C = A·B`, or `C += A·B` when `accumulate`. `C` is row-major `A.rows × B.cols` with row
/// stride `ldc`. On the loaded BLAS for `f32` when there is one, else on [`builtin_gemm`].
pub fn gemm<T: Real>(a: MatRef<T>, b: MatRef<T>, c: &mut [T], ldc: usize, accumulate: bool) {
    gemm_in(Precision::F32, a, b, c, ldc, accumulate)
}

/// [`gemm`] at a chosen precision. [`Precision::Bf16`] rounds the operands of an `f32`
/// product to bf16 as they are packed and accumulates in `f32`, on the kernel
/// [`bf16::kernel`] picked (the BLAS, if loaded, is not used for it); `f64` products are
/// never rounded (they are the exact reference of the gradient checks).
///
/// # Panics
/// With [`Precision::Bf16`] for `f32`, if `LMFORGE_BF16_KERNEL` names a kernel this CPU
/// cannot run: callers check [`bf16::kernel`] first, as [`Precision::enter`] does.
pub fn gemm_in<T: Real>(precision: Precision, a: MatRef<T>, b: MatRef<T>, c: &mut [T], ldc: usize, accumulate: bool) {
    gemm_from(precision, a, b, c, ldc, Start::accumulating(accumulate))
}

/// [`gemm_in`] with `C` starting as `start` says: `C = row + A·B` for a linear layer's bias
/// ([`Start::Row`], `B.cols` values), added by the kernels' tile stores.
pub fn gemm_from<T: Real>(precision: Precision, a: MatRef<T>, b: MatRef<T>, c: &mut [T], ldc: usize, start: Start<T>) {
    check_shapes(a, b, c, ldc);
    check_start(start, b.cols);
    let is_f32 = T::DTYPE == candle_core::DType::F32;
    if is_f32 && precision == Precision::Bf16 {
        let kernel = bf16::kernel().unwrap_or_else(|e| panic!("{e}"));
        let (a32, b32) = (a.with_data(as_f32(a.data)), b.with_data(as_f32(b.data)));
        return bf16_product(kernel, a32, b32, as_f32_mut(c), ldc, start.as_f32());
    }
    if let Some(blas) = super::blas::loaded().filter(|_| is_f32 && a.rows * a.cols * b.cols > 0) {
        let (a32, b32) = (a.with_data(as_f32(a.data)), b.with_data(as_f32(b.data)));
        // The BLAS adds to C: the start row is written first.
        let start = fill_start_rows(start, a.rows, c, ldc);
        if blas.sgemm(a32, b32, as_f32_mut(c), ldc, matches!(start, Start::C)) {
            return;
        }
        return builtin_gemm_checked(a, b, c, ldc, start);
    }
    builtin_gemm_checked(a, b, c, ldc, start)
}

/// `C = start + bf16(A)·bf16(B)` with `f32` accumulation on `kernel` (shapes already checked).
pub(super) fn bf16_product(
    kernel: Bf16Kernel,
    a: MatRef<f32>,
    b: MatRef<f32>,
    c: &mut [f32],
    ldc: usize,
    start: Start<f32>,
) {
    match kernel {
        Bf16Kernel::F32 => blocked(Native::<f32>::new(true), a, b, c, ldc, start),
        #[cfg(target_arch = "x86_64")]
        Bf16Kernel::Avx512Bf16 => blocked(bf16::Pairs, a, b, c, ldc, start),
        #[cfg(not(target_arch = "x86_64"))]
        Bf16Kernel::Avx512Bf16 => unreachable!("only chosen on x86-64"),
    }
}

/// A [`Start::Row`] holds one value per column of C: the tile stores read it unchecked.
fn check_start<T>(start: Start<T>, cols: usize) {
    if let Start::Row(row) = start {
        assert_eq!(row.len(), cols, "gemm: a start row of {} values for {cols} columns", row.len());
    }
}

/// For a path that can only overwrite or add to `C`: a [`Start::Row`] is copied into the
/// first `rows` rows of `C`, which then start as [`Start::C`]; other starts are returned as
/// they are.
fn fill_start_rows<'a, T: Real>(start: Start<'a, T>, rows: usize, c: &mut [T], ldc: usize) -> Start<'a, T> {
    let Start::Row(row) = start else { return start };
    for c_row in c.chunks_mut(ldc).take(rows) {
        c_row[..row.len()].copy_from_slice(row);
    }
    Start::C
}

/// Products of fewer FLOPs run on one thread: below ~4 MFLOP one takes well under a
/// millisecond, and a fork would cost more than it saves.
pub(super) const PARALLEL_FLOPS: usize = 1 << 22;

/// What runs the products: the loaded BLAS, or which of lmforge's kernels.
pub fn backend() -> String {
    match super::blas::loaded() {
        Some(blas) => format!("BLAS: {}", blas.description),
        None if isa() == Isa::Avx512 => format!("lmforge kernel (AVX-512, {}×{} f32 tile)", avx512::MR, avx512::NR),
        None => format!("lmforge kernel (portable, {PORTABLE_MR}×{PORTABLE_NR} tile)"),
    }
}

fn check_shapes<T: Real>(a: MatRef<T>, b: MatRef<T>, c: &[T], ldc: usize) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "gemm: A is {m}×{k} but B is {}×{n}", b.rows);
    assert!(ldc >= n, "gemm: ldc {ldc} < n {n}");
    assert!(m == 0 || n == 0 || c.len() >= (m - 1) * ldc + n, "gemm: C too short");
    assert!(a.rows * a.cols == 0 || a.last_index() < a.data.len(), "gemm: A view out of bounds");
    assert!(b.rows * b.cols == 0 || b.last_index() < b.data.len(), "gemm: B view out of bounds");
}

/// [`gemm`] on lmforge's own kernel, whether or not a BLAS is loaded (benchmarks compare the two).
pub fn builtin_gemm<T: Real>(a: MatRef<T>, b: MatRef<T>, c: &mut [T], ldc: usize, accumulate: bool) {
    check_shapes(a, b, c, ldc);
    builtin_gemm_checked(a, b, c, ldc, Start::accumulating(accumulate))
}

/// [`builtin_gemm`] once [`check_shapes`] has passed.
fn builtin_gemm_checked<T: Real>(a: MatRef<T>, b: MatRef<T>, c: &mut [T], ldc: usize, start: Start<T>) {
    if a.rows == 1 && b.row_stride == 1 && a.col_stride == 1 && a.cols > 0 && b.cols > 0 {
        // One row times a transposed weight (decoding a token): dot products straight from
        // the weight's rows; packing would copy the whole weight for one use.
        let start = fill_start_rows(start, 1, c, ldc);
        return row_times_transposed(a, b, c, matches!(start, Start::C));
    }
    blocked(Native::<T>::new(false), a, b, c, ldc, start)
}

/// The blocked product on `kernel`, which packs the operands its own way.
fn blocked<T: Real, K: Kernel<T>>(kernel: K, a: MatRef<T>, b: MatRef<T>, c: &mut [T], ldc: usize, start: Start<T>) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    // (Checked again here: `bf16_product` reaches this without `gemm_from`.)
    check_start(start, n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        match fill_start_rows(start, m, c, ldc) {
            Start::Zero => c.chunks_mut(ldc).take(m).for_each(|row| row[..n].fill(T::ZERO)),
            Start::C | Start::Row(_) => {}
        }
        return;
    }
    let s = kernel.shape();
    let (row_panels, col_panels) = (m.div_ceil(s.mr), n.div_ceil(s.nr));
    let in_parallel = 2 * m * n * k >= PARALLEL_FLOPS;
    let threads = if in_parallel { parallel::threads() } else { 1 };
    // Work is handed out in units of row panels of A (each thread packs its own rows against
    // the shared packed B), or of column panels of B when A has too few rows to share.
    let by_rows = row_panels >= 2 * threads || row_panels >= col_panels;
    let (units, unit_limit) = if by_rows { (row_panels, s.mc / s.mr) } else { (col_panels, s.nc / s.nr) };
    // As few chunks as the block limit allows, in a multiple of the thread count, so the
    // threads get equal shares (171 row panels in 11 chunks of 16 left one thread idle for a
    // twelfth of the call; large chunks also reuse each packed panel of the shared operand
    // the most). Measured on dYᵀ·X 384×2048·2048×384: 248 → 261 GFLOP/s.
    let per_thread = units.div_ceil(threads * unit_limit);
    let chunk = units.div_ceil(threads * per_thread);
    // The shared operand is packed for several KC blocks at once (up to 8 MiB), so that
    // each thread runs the whole depth of its units without a barrier per block.
    let shared_width = if by_rows { s.nc.min(n).next_multiple_of(s.nr) } else { m.next_multiple_of(s.mr) };
    let packed_bytes = std::mem::size_of::<K::Packed>() * kernel.depth(s.kc);
    let depth_limit = s.kc * ((8 << 20) / (shared_width * packed_bytes)).max(1);
    let plan = Plan { a, b, ldc, start, s, by_rows, shared_width, kernel };
    let c_ptr = SendPtr(c.as_mut_ptr());
    SHARED_PACK.with_borrow_mut(|shared| {
        for jc in (0..n).step_by(s.nc) {
            for group in (0..k).step_by(depth_limit) {
                let span = Span { jc, nc: s.nc.min(n - jc), group, depth: depth_limit.min(k - group) };
                let shared = scratch::<K::Packed>(shared, shared_width * kernel.depth(span.depth));
                // Packed by all threads, one panel at a time (it is up to k·n values: done by
                // one thread, the others would wait).
                let shared_ptr = SendPtr(shared.as_mut_ptr());
                for_each_unit(in_parallel, plan.shared_panels(span), 1, |panel, _| {
                    // SAFETY: each panel has its own slot inside `shared`.
                    unsafe { plan.pack_shared_panel(span, panel, shared_ptr.get()) }
                });
                let shared = &*shared;
                let units = if by_rows { units } else { span.nc.div_ceil(s.nr) };
                for_each_unit(in_parallel, units, chunk, |first, last| {
                    // SAFETY: units are disjoint row (or column) ranges of C, handed out once.
                    PACK.with_borrow_mut(|own| unsafe { plan.compute(span, first, last, shared, own, c_ptr.get()) })
                });
            }
        }
    });
}

/// Call `f(first, last)` for the ranges `first..last` of `chunk` units that cover `0..units`,
/// handed out dynamically to the threads of [`parallel`] when `in_parallel`.
///
/// (Measured when the products moved from rayon to candle's pool, the reason for
/// [`parallel`]: `bench train` 1070 → 940 ms per step, the products ~160 → ~195 GFLOP/s.)
fn for_each_unit(in_parallel: bool, units: usize, chunk: usize, f: impl Fn(usize, usize) + Sync) {
    let run = |c: usize| f(c * chunk, ((c + 1) * chunk).min(units));
    if in_parallel {
        parallel::for_each(units.div_ceil(chunk), run);
    } else {
        (0..units.div_ceil(chunk)).for_each(run);
    }
}

/// A micro-kernel and the packed layout it reads: [`blocked`] cuts and threads the product,
/// the kernel packs the panels and multiplies them.
pub(super) trait Kernel<T: Real>: Copy + Sync {
    /// What a packed panel holds: `T` itself, or bf16 bits.
    type Packed: Copy + Send + Sync;
    fn shape(&self) -> KernelShape;
    /// Packed values per line (row of A, column of B) of a panel `kc` steps deep.
    fn depth(&self, kc: usize) -> usize {
        kc
    }
    /// Pack `A[i0..i0+mc, p0..p0+kc]` into panels of `mr` rows, `depth(kc)·mr` values apart,
    /// zero past row `mc`.
    fn pack_a(&self, a: MatRef<T>, i0: usize, mc: usize, p0: usize, kc: usize, out: &mut [Self::Packed]);
    /// Pack `B[p0..p0+kc, j0..j0+nc]` into panels of `nr` columns, `depth(kc)·nr` values
    /// apart, zero past column `nc`.
    fn pack_b(&self, b: MatRef<T>, p0: usize, kc: usize, j0: usize, nc: usize, out: &mut [Self::Packed]);
    /// `C[rows × cols] = tile.start + Ap · Bp` for one panel of each.
    ///
    /// # Safety
    /// `a` and `b` hold a full panel each, `c` points at a `rows × cols` tile (row stride
    /// `tile.ldc`) that this thread alone accesses, and a [`TileStart::Row`] points at the
    /// tile's `cols` values.
    unsafe fn tile(&self, tile: Tile<T>, a: &[Self::Packed], b: &[Self::Packed], c: *mut T, rows: usize, cols: usize);
}

/// One call's product and how it is cut: units of rows of A against a shared packed B
/// (`by_rows`), or units of columns of B against a shared packed A.
#[derive(Clone, Copy)]
struct Plan<'a, T, K> {
    a: MatRef<'a, T>,
    b: MatRef<'a, T>,
    ldc: usize,
    start: Start<'a, T>,
    s: KernelShape,
    by_rows: bool,
    /// Lines of the packed shared operand (its columns or rows, padded).
    shared_width: usize,
    kernel: K,
}

/// Columns `jc..jc + nc` of C, and steps `group..group + depth` along k (whole KC blocks).
#[derive(Clone, Copy)]
struct Span {
    jc: usize,
    nc: usize,
    group: usize,
    depth: usize,
}

impl<T: Real, K: Kernel<T>> Plan<'_, T, K> {
    /// `(q, pc, kc)` of each KC block of the span: its index, first step and depth.
    fn blocks(&self, span: Span) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        let (kc, k) = (self.s.kc, self.a.cols);
        (span.group..span.group + span.depth).step_by(kc).enumerate().map(move |(q, pc)| (q, pc, kc.min(k - pc)))
    }

    /// Panel width and extent of the shared operand: NR columns of B's `nc`, or MR rows of A.
    fn shared_panel_shape(&self, span: Span) -> (usize, usize) {
        if self.by_rows {
            (self.s.nr, span.nc)
        } else {
            (self.s.mr, self.a.rows)
        }
    }

    fn shared_panels(&self, span: Span) -> usize {
        let (width, extent) = self.shared_panel_shape(span);
        span.depth.div_ceil(self.s.kc) * extent.div_ceil(width)
    }

    /// Where KC block `q` of the packed shared operand starts.
    fn shared_block(&self, q: usize) -> usize {
        q * self.kernel.depth(self.s.kc) * self.shared_width
    }

    /// Pack panel `unit` (block-major) of the span's shared operand into its slot: KC block
    /// `q` at [`Self::shared_block`], its panels `depth(kc)·width` apart.
    ///
    /// # Safety
    /// `shared` holds `shared_width · depth(span.depth)` values, and no other thread writes
    /// this panel.
    unsafe fn pack_shared_panel(&self, span: Span, unit: usize, shared: *mut K::Packed) {
        let (width, extent) = self.shared_panel_shape(span);
        let per_block = extent.div_ceil(width);
        let (q, first) = (unit / per_block, unit % per_block * width);
        let pc = span.group + q * self.s.kc;
        let kc = self.s.kc.min(self.a.cols - pc);
        let len = width.min(extent - first);
        let depth = self.kernel.depth(kc);
        // SAFETY: the slot lies inside `shared` (the caller's contract).
        let dst =
            unsafe { std::slice::from_raw_parts_mut(shared.add(self.shared_block(q) + first * depth), depth * width) };
        if self.by_rows {
            self.kernel.pack_b(self.b, pc, kc, span.jc + first, len, dst);
        } else {
            self.kernel.pack_a(self.a, first, len, pc, kc, dst);
        }
    }

    /// Units `first..last` of the span, over every KC block: pack this thread's own part
    /// into `own`, multiply it with the shared packed operand, store onto what C starts as.
    ///
    /// # Safety
    /// `c` is C's first element (`(m − 1)·ldc + n` values), and no other thread works on these
    /// units.
    unsafe fn compute(
        &self,
        span: Span,
        first: usize,
        last: usize,
        shared: &[K::Packed],
        own: &mut Vec<f64>,
        c: *mut T,
    ) {
        let (s, m) = (self.s, self.a.rows);
        for (q, pc, kc) in self.blocks(span) {
            // The first block along k stores onto what C starts as; the others add to C.
            let start = match self.start {
                _ if pc > 0 => TileStart::C,
                Start::Zero => TileStart::Zero,
                Start::C => TileStart::C,
                Start::Row(row) => TileStart::Row(row[span.jc..].as_ptr()),
            };
            let tile = Tile { kc, ldc: self.ldc, start };
            let depth = self.kernel.depth(kc);
            let packed = &shared[self.shared_block(q)..][..depth * self.shared_width];
            // SAFETY (both arms): the block of C is these units' rows (or columns), inside C.
            if self.by_rows {
                let (i0, rows) = (first * s.mr, ((last - first) * s.mr).min(m - first * s.mr));
                let ap = scratch::<K::Packed>(own, rows.next_multiple_of(s.mr) * depth);
                self.kernel.pack_a(self.a, i0, rows, pc, kc, ap);
                unsafe { macro_block(self.kernel, tile, ap, rows, packed, span.nc, c.add(i0 * self.ldc + span.jc)) };
            } else {
                let (j0, cols) = (first * s.nr, ((last - first) * s.nr).min(span.nc - first * s.nr));
                let bp = scratch::<K::Packed>(own, cols.next_multiple_of(s.nr) * depth);
                self.kernel.pack_b(self.b, pc, kc, span.jc + j0, cols, bp);
                let tile = tile.shifted(j0);
                unsafe { macro_block(self.kernel, tile, packed, m, bp, cols, c.add(span.jc + j0)) };
            }
        }
    }
}

/// `C[rows × cols] = tile.start + Ã · B̃` for packed operands: every `MR` panel of `Ã` against every
/// `NR` panel of `B̃`. One operand's micro-panel stays in L1 across the inner loop while the
/// other's stream past it: `Ã`'s for the AVX-512 kernels (they prefetch the B panels they
/// stream), `B̃`'s for the portable one.
///
/// # Safety
/// `c` points at the block's first element; the `rows × cols` block (row stride `tile.ldc`)
/// is accessed by this thread alone.
unsafe fn macro_block<T: Real, K: Kernel<T>>(
    kernel: K,
    tile: Tile<T>,
    ap: &[K::Packed],
    rows: usize,
    bp: &[K::Packed],
    cols: usize,
    c: *mut T,
) {
    let (s, depth) = (kernel.shape(), kernel.depth(tile.kc));
    let run = |ir: usize, jr: usize| {
        let (a_panel, b_panel) = (&ap[ir * depth..(ir + s.mr) * depth], &bp[jr * depth..(jr + s.nr) * depth]);
        let (r, w) = (s.mr.min(rows - ir), s.nr.min(cols - jr));
        // SAFETY: a tile inside the block (the caller's contract).
        unsafe { kernel.tile(tile.shifted(jr), a_panel, b_panel, c.add(ir * tile.ldc + jr), r, w) };
    };
    if s.a_panel_in_l1 {
        for ir in (0..rows).step_by(s.mr) {
            (0..cols).step_by(s.nr).for_each(|jr| run(ir, jr));
        }
    } else {
        for jr in (0..cols).step_by(s.nr) {
            (0..rows).step_by(s.mr).for_each(|ir| run(ir, jr));
        }
    }
}

/// `buffer` viewed as at least `len` values of `P`, grown if needed.
fn scratch<P: Copy>(buffer: &mut Vec<f64>, len: usize) -> &mut [P] {
    assert!(std::mem::align_of::<P>() <= std::mem::align_of::<f64>());
    let words = (len * std::mem::size_of::<P>()).div_ceil(8);
    if buffer.len() < words {
        buffer.resize(words, 0.0);
    }
    // SAFETY: the buffer holds at least `len` values of P (a packed value: f32, f64 or bf16
    // bits, plain old data for which any bits are valid, aligned no stricter than f64, as
    // asserted), and the returned borrow keeps it from being used otherwise.
    unsafe { std::slice::from_raw_parts_mut(buffer.as_mut_ptr() as *mut P, len) }
}

multiversion! {
    /// `c[0, j] (+)= Σ_p a[0, p] · W[j, p]` for `b = Wᵀ`, `W` rows contiguous.
    pub(super) fn dot_rows<T: Real>(x: &[T], w: &[T], w_stride: usize, out: &mut [T], accumulate: bool) {
        let k = x.len();
        for (j, o) in out.iter_mut().enumerate() {
            let row = &w[j * w_stride..j * w_stride + k];
            let mut lanes = [T::ZERO; 16];
            for (xc, wc) in x.chunks_exact(16).zip(row.chunks_exact(16)) {
                for l in 0..16 {
                    lanes[l] = xc[l].mul_add(wc[l], lanes[l]);
                }
            }
            let tail = k / 16 * 16;
            let mut sum = (tail..k).fold(T::ZERO, |acc, p| x[p].mul_add(row[p], acc));
            for lane in lanes {
                sum += lane;
            }
            *o = if accumulate { *o + sum } else { sum };
        }
    }
}

/// Rows of `W` per task when one row is multiplied by `Wᵀ` (`k` values each): about 64 Ki
/// weights, enough to outweigh handing the task to the pool.
pub(super) fn one_row_task_rows(k: usize) -> usize {
    (1 << 16) / k.max(1) + 1
}

/// `C[1 × n] (+)= a[1 × k] · Wᵀ`, split over the rows of `W` in parallel.
fn row_times_transposed<T: Real>(a: MatRef<T>, b: MatRef<T>, c: &mut [T], accumulate: bool) {
    let (k, n) = (a.cols, b.cols);
    let x = &a.data[..k];
    let rows_per_task = one_row_task_rows(k);
    parallel::for_each_chunk(&mut c[..n], rows_per_task, |t, out| {
        let j0 = t * rows_per_task;
        dot_rows::<T>(x, &b.data[j0 * b.col_stride..], b.col_stride, out, accumulate);
    });
}

/// A buffer's start, shared by the pool's threads that each write their own disjoint part of
/// it (here and in [`super::blas`]).
#[derive(Clone, Copy)]
pub(super) struct SendPtr<T>(pub(super) *mut T);
// SAFETY: only used to hand disjoint parts of one buffer to the pool's threads.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    pub(super) fn get(self) -> *mut T {
        self.0
    }
}

/// Register tile and cache blocks.
#[derive(Clone, Copy)]
pub(super) struct KernelShape {
    pub mr: usize,
    pub nr: usize,
    /// Depth of a packed block: the micro-panel that stays in L1 across the inner loop of
    /// [`macro_block`] must fit there (AVX-512: A's 8 × 256 f32, 8 KiB; portable: B's
    /// 256 × 16, 16 KiB), and the shared operand's `KC × NC` block in L2.
    pub kc: usize,
    /// Which micro-panel stays in L1 in [`macro_block`]: A's (the other streams) or B's.
    pub a_panel_in_l1: bool,
    /// Rows of A packed at once (`MC × KC` in L2).
    pub mc: usize,
    /// Columns of B packed at once (`KC × NC` in L2/L3).
    pub nc: usize,
}

/// The kernels that multiply `T` panels: the AVX-512 8×48 tile for `f32` where the CPU has
/// it, the portable tile otherwise. With `round_to_bf16`, every packed value is rounded to
/// bf16 (kept in an `f32`): bf16 precision on CPUs without bf16 instructions.
#[derive(Clone, Copy)]
pub(super) struct Native<T> {
    round_to_bf16: bool,
    _t: std::marker::PhantomData<fn() -> T>,
}

impl<T: Real> Native<T> {
    pub(super) fn new(round_to_bf16: bool) -> Self {
        Native { round_to_bf16, _t: std::marker::PhantomData }
    }

    fn round(&self, panel: &mut [T]) {
        if self.round_to_bf16 {
            bf16::round_in_place(as_f32_mut(panel));
        }
    }
}

impl<T: Real> Kernel<T> for Native<T> {
    type Packed = T;

    fn shape(&self) -> KernelShape {
        if avx512_f32::<T>() {
            KernelShape { mr: avx512::MR, nr: avx512::NR, kc: 256, a_panel_in_l1: true, mc: 192, nc: 1536 }
        } else {
            KernelShape { mr: PORTABLE_MR, nr: PORTABLE_NR, kc: 256, a_panel_in_l1: false, mc: 96, nc: 1024 }
        }
    }

    fn pack_a(&self, a: MatRef<T>, i0: usize, mc: usize, p0: usize, kc: usize, out: &mut [T]) {
        pack_a(a, i0, mc, p0, kc, self.shape().mr, out);
        self.round(&mut out[..mc.next_multiple_of(self.shape().mr) * kc]);
    }

    fn pack_b(&self, b: MatRef<T>, p0: usize, kc: usize, j0: usize, nc: usize, out: &mut [T]) {
        pack_b(b, p0, kc, j0, nc, self.shape().nr, out);
        self.round(&mut out[..nc.next_multiple_of(self.shape().nr) * kc]);
    }

    #[inline(always)]
    unsafe fn tile(&self, tile: Tile<T>, a: &[T], b: &[T], c: *mut T, rows: usize, cols: usize) {
        assert!(rows > 0 && cols > 0);
        if avx512_f32::<T>() {
            #[cfg(target_arch = "x86_64")]
            {
                // SAFETY: the CPU has AVX-512 (checked by `isa`), the panels hold `kc·MR` /
                // `kc·NR` values (sliced by the caller), `c` as this function's contract says.
                unsafe { avx512::kernel(tile.cast(), as_f32(a), as_f32(b), c as *mut f32, rows, cols) };
                return;
            }
        }
        // SAFETY: as this function's contract says.
        unsafe { portable_kernel::<T>(tile, a, b, c, rows, cols) };
    }
}

fn avx512_f32<T: Real>() -> bool {
    T::DTYPE == candle_core::DType::F32 && isa() == Isa::Avx512
}

thread_local! {
    /// Packing buffers reused across calls (allocating them per call would page-fault every
    /// time), as `f64` so the storage is aligned for either type. `PACK` holds what one thread
    /// packs for itself; `SHARED_PACK`, on the calling thread, the operand all threads read.
    static PACK: RefCell<Vec<f64>> = const { RefCell::new(Vec::new()) };
    static SHARED_PACK: RefCell<Vec<f64>> = const { RefCell::new(Vec::new()) };
}

/// What `C` holds before a product is added to it.
#[derive(Clone, Copy, Debug)]
pub enum Start<'a, T> {
    /// Nothing: `C = A·B` (`C` may be uninitialised memory of the right length).
    Zero,
    /// Its values: `C += A·B`.
    C,
    /// This row, in every row of `C`: `C = 1·row + A·B` (a linear layer's bias). The first
    /// block along `k` stores `row + its sum` where it would store its sum, so `C` is neither
    /// filled nor read first (one pass over `C` less than a fill then `C += A·B`, with the
    /// same bits: the same two values are added).
    Row(&'a [T]),
}

impl<'a, T: Real> Start<'a, T> {
    /// The same start over `f32` values (for a `T` that is `f32`).
    fn as_f32(self) -> Start<'a, f32> {
        match self {
            Start::Zero => Start::Zero,
            Start::C => Start::C,
            Start::Row(row) => Start::Row(as_f32(row)),
        }
    }
}

impl<T> Start<'_, T> {
    /// [`Start::C`] when `accumulate`, else [`Start::Zero`].
    pub fn accumulating(accumulate: bool) -> Self {
        if accumulate {
            Start::C
        } else {
            Start::Zero
        }
    }
}

/// What every micro-kernel call of one block shares.
#[derive(Clone, Copy)]
pub(super) struct Tile<T> {
    pub kc: usize,
    pub ldc: usize,
    /// What the tile's store adds its sums to.
    pub start: TileStart<T>,
}

/// [`Start`] for one tile: what its store adds the accumulators to.
#[derive(Clone, Copy)]
pub(super) enum TileStart<T> {
    /// Nothing: the sums are stored.
    Zero,
    /// The tile of `C` itself.
    C,
    /// This row (at the tile's first column), for every row of the tile.
    Row(*const T),
}

impl<T> Tile<T> {
    /// The same tile moved `cols` columns right (its start row moves with it).
    fn shifted(self, cols: usize) -> Self {
        let start = match self.start {
            TileStart::Row(row) => TileStart::Row(row.wrapping_add(cols)),
            other => other,
        };
        Tile { start, ..self }
    }

    /// The same tile over `U` values (the `f32` kernels called for a `T` that is `f32`).
    pub(super) fn cast<U>(self) -> Tile<U> {
        let start = match self.start {
            TileStart::Zero => TileStart::Zero,
            TileStart::C => TileStart::C,
            TileStart::Row(row) => TileStart::Row(row as *const U),
        };
        Tile { kc: self.kc, ldc: self.ldc, start }
    }
}

/// Copy `A[i0..i0+mc, p0..p0+kc]` into panels of `mr` rows: panel `r`, step `p` holds
/// `A[i0 + r·mr + (0..mr), p0 + p]` at `out[(r·kc + p)·mr ..]`, zero past row `mc`.
fn pack_a<T: Real>(a: MatRef<T>, i0: usize, mc: usize, p0: usize, kc: usize, mr: usize, out: &mut [T]) {
    for (r, panel) in out.chunks_mut(kc * mr).take(mc.div_ceil(mr)).enumerate() {
        let rows = mr.min(mc - r * mr);
        let first = (i0 + r * mr) * a.row_stride + p0 * a.col_stride;
        // Row-major A with a full panel: transpose 16×16 blocks in registers.
        #[cfg(target_arch = "x86_64")]
        if avx512_f32::<T>() && a.col_stride == 1 && rows == mr {
            // SAFETY: f32 + AVX-512 checked; rows `mr` × `kc` columns from `first` lie inside
            // `a.data` (the view was bounds-checked in `gemm`), and the panel holds `kc·mr`.
            unsafe { avx512::pack_rows(as_f32(&a.data[first..]), a.row_stride, kc, as_f32_mut(panel)) };
            continue;
        }
        strided_pack(&a.data[first..], a.row_stride, a.col_stride, rows, kc, mr, panel);
    }
}

/// Copy `B[p0..p0+kc, j0..j0+nc]` into panels of `nr` columns: panel `s`, step `p` holds
/// `B[p0 + p, j0 + s·nr + (0..nr)]` at `out[(s·kc + p)·nr ..]`, zero past column `nc`.
fn pack_b<T: Real>(b: MatRef<T>, p0: usize, kc: usize, j0: usize, nc: usize, nr: usize, out: &mut [T]) {
    for (s, panel) in out.chunks_mut(kc * nr).take(nc.div_ceil(nr)).enumerate() {
        let cols = nr.min(nc - s * nr);
        let first = p0 * b.row_stride + (j0 + s * nr) * b.col_stride;
        // Bᵀ stored row-major (a weight `(out, in)` read as `in × out`) with a full panel.
        #[cfg(target_arch = "x86_64")]
        if avx512_f32::<T>() && b.row_stride == 1 && cols == nr {
            // SAFETY: as in `pack_a`, with B's columns as the rows being transposed.
            unsafe { avx512::pack_rows(as_f32(&b.data[first..]), b.col_stride, kc, as_f32_mut(panel)) };
            continue;
        }
        strided_pack(&b.data[first..], b.col_stride, b.row_stride, cols, kc, nr, panel);
    }
}

/// The general packing loop: `lines` lines (rows of A, or columns of B) of `kc` values, line
/// `l` step `p` at `src[l·line_stride + p·step_stride]`, into `out[p·width + l]`, zero-padding
/// lines `lines..width`.
fn strided_pack<T: Real>(
    src: &[T],
    line_stride: usize,
    step_stride: usize,
    lines: usize,
    kc: usize,
    width: usize,
    out: &mut [T],
) {
    let out = &mut out[..kc * width];
    if line_stride == 1 {
        // The `lines` values of one step are contiguous.
        #[cfg(target_arch = "x86_64")]
        if avx512_f32::<T>() && lines == width {
            // SAFETY: f32 + AVX-512 checked; step p reads `width` values at p·step_stride,
            // inside `src` for every p < kc (the caller's view was bounds-checked).
            unsafe { avx512::copy_steps(as_f32(src), step_stride, kc, width, as_f32_mut(out)) };
            return;
        }
        for (p, dst) in out.chunks_exact_mut(width).enumerate() {
            dst[..lines].copy_from_slice(&src[p * step_stride..p * step_stride + lines]);
            dst[lines..].fill(T::ZERO);
        }
        return;
    }
    for (p, dst) in out.chunks_exact_mut(width).enumerate() {
        for (l, d) in dst.iter_mut().enumerate() {
            *d = if l < lines { src[l * line_stride + p * step_stride] } else { T::ZERO };
        }
    }
}

fn as_f32<T: Real>(s: &[T]) -> &[f32] {
    assert_eq!(T::DTYPE, candle_core::DType::F32);
    // SAFETY: T is f32 (asserted).
    unsafe { std::slice::from_raw_parts(s.as_ptr() as *const f32, s.len()) }
}

fn as_f32_mut<T: Real>(s: &mut [T]) -> &mut [f32] {
    assert_eq!(T::DTYPE, candle_core::DType::F32);
    // SAFETY: T is f32 (asserted).
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr() as *mut f32, s.len()) }
}

/// The portable tile, 6 rows × 16 columns: for f32 that is 12 AVX2 registers of
/// accumulators, two for the row of B and one for the broadcast (of 16).
const PORTABLE_MR: usize = 6;
const PORTABLE_NR: usize = 16;

multiversion! {
    /// `out[MR × NR] = Ap[MR × kc] · Bp[kc × NR]` with the accumulators in plain arrays, which
    /// LLVM keeps in vector registers.
    fn portable_product<T: Real>(kc: usize, a: &[T], b: &[T], out: &mut [T]) {
        const MR: usize = PORTABLE_MR;
        const NR: usize = PORTABLE_NR;
        let mut acc = [[T::ZERO; NR]; MR];
        for p in 0..kc {
            let b_row: [T; NR] = b[p * NR..(p + 1) * NR].try_into().expect("NR values");
            let a_col: [T; MR] = a[p * MR..(p + 1) * MR].try_into().expect("MR values");
            for (acc_r, &a_rp) in acc.iter_mut().zip(&a_col) {
                for (x, &b) in acc_r.iter_mut().zip(&b_row) {
                    *x = a_rp.mul_add(b, *x);
                }
            }
        }
        for (dst, acc_r) in out.chunks_exact_mut(NR).zip(&acc) {
            dst.copy_from_slice(acc_r);
        }
    }
}

/// # Safety
/// As [`micro_kernel`].
unsafe fn portable_kernel<T: Real>(tile: Tile<T>, a: &[T], b: &[T], c: *mut T, rows: usize, cols: usize) {
    let mut acc = [T::ZERO; PORTABLE_MR * PORTABLE_NR];
    portable_product::<T>(tile.kc, a, b, &mut acc);
    for (r, acc_r) in acc.chunks_exact(PORTABLE_NR).enumerate().take(rows) {
        // SAFETY: row r of the tile, `cols` values, ours alone (the caller's contract).
        let dst = unsafe { std::slice::from_raw_parts_mut(c.add(r * tile.ldc), cols) };
        // SAFETY: the start row holds the tile's `cols` columns (the caller's contract).
        unsafe { store_row(tile.start, dst, &acc_r[..cols]) }
    }
}

/// One row of a tile's sums `src` into `dst`, added to what [`TileStart`] says. (`start + sum`
/// in that order, as the fused stores add: the bits are the same either way.)
///
/// # Safety
/// A [`TileStart::Row`] points at `dst.len()` values.
unsafe fn store_row<T: Real>(start: TileStart<T>, dst: &mut [T], src: &[T]) {
    match start {
        TileStart::Zero => dst.copy_from_slice(src),
        TileStart::C => dst.iter_mut().zip(src).for_each(|(d, &x)| *d += x),
        TileStart::Row(row) => {
            // SAFETY: as this function's contract says.
            let row = unsafe { std::slice::from_raw_parts(row, dst.len()) };
            dst.iter_mut().zip(src).zip(row).for_each(|((d, &x), &r)| *d = r + x);
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx512 {
    use std::arch::x86_64::*;

    use super::{Tile, TileStart};
    use crate::nn::ops::simd::mask16;

    pub const MR: usize = 8;
    pub const NR: usize = 48;
    /// Registers per row of the tile.
    pub const VECTORS: usize = NR / 16;
    /// How many steps ahead the kernel prefetches its B panel (8 steps: 1.5 KiB).
    const PREFETCH_STEPS: usize = 8;

    /// `C[rows × cols] = tile.start + Ap[8 × kc] · Bp[kc × 48]`, the 8×48 tile in 24 registers.
    ///
    /// Per step: three loads of B, eight broadcasts of A straight into their FMAs — 11 loads
    /// for 24 FMAs (a 12×32 tile needs 14). [`super::macro_block`] keeps this A panel
    /// (8 KiB at KC 256) in L1 across the B panels it streams from L2, which this kernel
    /// prefetches 8 steps ahead (without that the FMAs wait on them). Each row of the C tile
    /// is 3 contiguous cache lines, 8 rows apart.
    ///
    /// Measured against the 12×32 tile it replaced (B panel in L1, A panels streamed), the
    /// two alternating call by call: on a 192×1536 block with a cold C (a fresh output, as in
    /// training) 137 → 152 GFLOP/s per core; inside a training step, the forward and input
    /// gradient products 202–214 → 226–246 GFLOP/s, the weight gradients (k = 2048) 166–197 →
    /// 189–201. With C hot in L1 both tiles run at ~172, the core's peak.
    ///
    /// # Safety
    /// The CPU must support AVX-512F; `a` holds `kc·8` values, `b` `kc·48`, `c` points at a
    /// `rows × cols` tile (row stride `ldc`) that this thread alone accesses, and a
    /// [`TileStart::Row`] points at the tile's `cols` values.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn kernel(tile: Tile<f32>, a: &[f32], b: &[f32], c: *mut f32, rows: usize, cols: usize) {
        let kc = tile.kc;
        debug_assert!(a.len() >= kc * MR && b.len() >= kc * NR);
        let (mut ap, mut bp) = (a.as_ptr(), b.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); VECTORS]; MR];
        for _ in 0..kc {
            // Past the panel's end this fetches a line that is not needed, which is harmless
            // (a prefetch never faults); `wrapping_add` keeps the address arithmetic defined.
            for v in 0..VECTORS {
                _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add(PREFETCH_STEPS * NR + 16 * v) as *const i8);
            }
            // SAFETY: kc steps of MR (resp. NR) values each, as the caller guarantees.
            unsafe {
                let b_row: [__m512; VECTORS] = std::array::from_fn(|v| _mm512_loadu_ps(bp.add(16 * v)));
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let a_r = _mm512_set1_ps(*ap.add(r));
                    for (acc_rv, b_v) in acc_r.iter_mut().zip(&b_row) {
                        *acc_rv = _mm512_fmadd_ps(a_r, *b_v, *acc_rv);
                    }
                }
                ap = ap.add(MR);
                bp = bp.add(NR);
            }
        }
        // SAFETY: as this function's contract says.
        unsafe { store(tile, &acc, c, rows, cols) }
    }

    /// Write (or add) the accumulators of an `MR × NR` tile into the `rows × cols` corner of
    /// `c`: whole registers for a full tile, through a spill buffer for a ragged one.
    ///
    /// Always inlined into the kernels (which enable AVX-512), so the accumulators stay in
    /// registers: as a call taking them by reference, the tile lived on the stack, zeroed by
    /// a `memset` of 1.5 KiB before every tile and spilled after it (2% of a bf16 training
    /// step's samples). Hence no `#[target_feature]` here (it cannot be combined with
    /// `inline(always)`); the ragged case, rare, is a call of its own.
    ///
    /// # Safety
    /// The CPU must support AVX-512F; `c` points at a `rows × cols` tile (row stride `ldc`)
    /// that this thread alone accesses; a [`TileStart::Row`] points at the tile's `cols` values.
    #[inline(always)]
    pub unsafe fn store(tile: Tile<f32>, acc: &[[__m512; VECTORS]; MR], c: *mut f32, rows: usize, cols: usize) {
        if rows == MR && cols == NR {
            for (r, acc_r) in acc.iter().enumerate() {
                for (v, &sum) in acc_r.iter().enumerate() {
                    // SAFETY: the full tile lies inside `c` (caller's guarantee), and the CPU
                    // has AVX-512F (the caller's contract).
                    unsafe {
                        let dst = c.add(r * tile.ldc + 16 * v);
                        let sum = match tile.start {
                            TileStart::Zero => sum,
                            TileStart::C => _mm512_add_ps(sum, _mm512_loadu_ps(dst)),
                            TileStart::Row(row) => _mm512_add_ps(sum, _mm512_loadu_ps(row.add(16 * v))),
                        };
                        _mm512_storeu_ps(dst, sum);
                    }
                }
            }
        } else {
            // SAFETY: as this function's contract says. A copy of the tile is passed, so the
            // caller's accumulators need no address.
            unsafe { store_ragged(tile, *acc, c, rows, cols) }
        }
    }

    /// [`store`] for a tile that `C` cuts short.
    ///
    /// # Safety
    /// As [`store`].
    #[target_feature(enable = "avx512f")]
    #[cold]
    #[inline(never)]
    unsafe fn store_ragged(tile: Tile<f32>, acc: [[__m512; VECTORS]; MR], c: *mut f32, rows: usize, cols: usize) {
        let mut spill = [0f32; MR * NR];
        for (r, acc_r) in acc.iter().enumerate() {
            for (v, &sum) in acc_r.iter().enumerate() {
                // SAFETY: `spill` holds MR rows of NR values.
                unsafe { _mm512_storeu_ps(spill.as_mut_ptr().add(r * NR + 16 * v), sum) };
            }
        }
        for r in 0..rows {
            // SAFETY: row r of the tile (the caller's contract).
            let dst = unsafe { std::slice::from_raw_parts_mut(c.add(r * tile.ldc), cols) };
            let src = &spill[r * NR..r * NR + cols];
            // SAFETY: the start row holds the tile's `cols` columns (the caller's contract).
            unsafe { super::store_row(tile.start, dst, src) }
        }
    }

    /// Transpose `width` lines (`width` = MR or NR) of `kc` values into the packed panel
    /// `out[p·width + l] = line_l[p]`, where line `l` starts at `src[l·line_stride]` and is
    /// contiguous. Blocks of 16 lines × 16 steps go through registers; a ragged tail of
    /// steps is copied one value at a time.
    ///
    /// # Safety
    /// The CPU must support AVX-512F; `src` must reach `(width − 1)·line_stride + kc` and
    /// `out` hold `kc·width` values; `width` is a multiple of 4.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn pack_rows(src: &[f32], line_stride: usize, kc: usize, out: &mut [f32]) {
        let width = out.len() / kc.max(1);
        assert!(width.is_multiple_of(4) && out.len() >= kc * width && src.len() >= (width - 1) * line_stride + kc);
        let full_steps = kc / 16 * 16;
        for l0 in (0..width).step_by(16) {
            let lines = 16.min(width - l0);
            // Lanes kept of each transposed vector: all 16, or the first `lines` (8 for an A panel, MR = 8).
            let keep = mask16(lines);
            for p0 in (0..full_steps).step_by(16) {
                // SAFETY: line l0 + l, steps p0..p0 + 16 ≤ kc, inside `src` (asserted).
                let load = |l: usize| unsafe { _mm512_loadu_ps(src.as_ptr().add((l0 + l) * line_stride + p0)) };
                // A full block unrolled, so it stays in registers (as in the bf16 packing).
                let block: [__m512; 16] = if lines == 16 {
                    std::array::from_fn(load)
                } else {
                    std::array::from_fn(|l| if l < lines { load(l) } else { _mm512_setzero_ps() })
                };
                let columns = transpose16(block);
                for (c, column) in columns.iter().enumerate() {
                    // SAFETY: step p0 + c < kc, lanes l0..l0 + lines ≤ width: inside `out`.
                    unsafe { _mm512_mask_storeu_ps(out.as_mut_ptr().add((p0 + c) * width + l0), keep, *column) };
                }
            }
        }
        for p in full_steps..kc {
            for l in 0..width {
                out[p * width + l] = src[l * line_stride + p];
            }
        }
    }

    /// `out[p·width ..][..width] = src[p·step_stride ..][..width]` for `p < kc`, in 16-lane
    /// registers (masked for the last partial register) rather than a `memcpy` call per step.
    ///
    /// # Safety
    /// The CPU must support AVX-512F; `src` must reach `(kc − 1)·step_stride + width` and
    /// `out` hold `kc·width` values.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn copy_steps(src: &[f32], step_stride: usize, kc: usize, width: usize, out: &mut [f32]) {
        assert!(kc == 0 || (src.len() >= (kc - 1) * step_stride + width && out.len() >= kc * width));
        // Steps are usually whole rows apart (a transposed operand), so each one is a new
        // page that the hardware prefetcher does not follow: fetch a few steps ahead.
        const AHEAD: usize = 8;
        for p in 0..kc {
            if p + AHEAD < kc {
                let next = src[(p + AHEAD) * step_stride..].as_ptr();
                _mm_prefetch::<_MM_HINT_T0>(next as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(width - 1) as *const i8);
            }
            for l0 in (0..width).step_by(16) {
                let lanes = 16.min(width - l0);
                let mask: __mmask16 = if lanes == 16 { 0xFFFF } else { (1u16 << lanes) - 1 };
                // SAFETY: lanes l0..l0 + lanes of step p lie inside both slices (asserted).
                unsafe {
                    let x = _mm512_maskz_loadu_ps(mask, src.as_ptr().add(p * step_stride + l0));
                    _mm512_mask_storeu_ps(out.as_mut_ptr().add(p * width + l0), mask, x);
                }
            }
        }
    }

    /// Transpose of a 16×16 block held as 16 row registers: four rounds of shuffles, pairing
    /// elements, then pairs, then 128-bit lanes, then lane pairs.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
        // Round 1: interleave rows 2i, 2i+1 → per 128-bit lane (a0 b0 a1 b1), (a2 b2 a3 b3).
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        // Round 2: lane L of u[4g + c] holds rows 4g..4g+3 of column 4L + c.
        let mut u = [_mm512_setzero_ps(); 16];
        for g in 0..4 {
            let (a, b, c, d) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
            u[4 * g] = _mm512_shuffle_ps::<0x44>(a, c);
            u[4 * g + 1] = _mm512_shuffle_ps::<0xEE>(a, c);
            u[4 * g + 2] = _mm512_shuffle_ps::<0x44>(b, d);
            u[4 * g + 3] = _mm512_shuffle_ps::<0xEE>(b, d);
        }
        // Rounds 3 and 4: gather lane L of u[c], u[4+c], u[8+c], u[12+c] into column 4L + c.
        let mut out = [_mm512_setzero_ps(); 16];
        for c in 0..4 {
            let even_01 = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]); // lanes 0, 2 of rows 0–7
            let odd_01 = _mm512_shuffle_f32x4::<0xDD>(u[c], u[4 + c]); // lanes 1, 3
            let even_23 = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
            let odd_23 = _mm512_shuffle_f32x4::<0xDD>(u[8 + c], u[12 + c]);
            out[c] = _mm512_shuffle_f32x4::<0x88>(even_01, even_23);
            out[8 + c] = _mm512_shuffle_f32x4::<0xDD>(even_01, even_23);
            out[4 + c] = _mm512_shuffle_f32x4::<0x88>(odd_01, odd_23);
            out[12 + c] = _mm512_shuffle_f32x4::<0xDD>(odd_01, odd_23);
        }
        out
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod avx512 {
    pub const MR: usize = 1;
    pub const NR: usize = 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: MatRef<f64>, b: MatRef<f64>) -> Vec<f64> {
        let mut c = vec![0.0; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                c[i * b.cols + j] = (0..a.cols).map(|p| a.at(i, p) * b.at(p, j)).sum();
            }
        }
        c
    }

    /// The view `v` has, over other data.
    fn same_view<'a>(v: MatRef<f64>, data: &'a [f32]) -> MatRef<'a, f32> {
        MatRef { data, rows: v.rows, cols: v.cols, row_stride: v.row_stride, col_stride: v.col_stride }
    }

    fn values(n: usize, seed: usize) -> Vec<f64> {
        (0..n).map(|i| (((i + seed) * 7919 % 1000) as f64 / 500.0) - 1.0).collect()
    }

    /// Every combination of transposed operands, accumulate or not, sizes straddling the tile
    /// and block edges (AVX-512 8×48 and portable 6×16 tiles, KC 256, MC 192), large enough
    /// to take the threaded path, and both ways of sharing the work.
    #[test]
    fn matches_naive_product() {
        let sizes = [
            (1, 1, 1),
            (5, 3, 2),
            (12, 32, 7),
            (8, 48, 16),
            (9, 49, 255),
            (13, 33, 257),
            (25, 70, 300),
            (200, 40, 520),
            (300, 500, 40),
            (64, 1600, 20),
            // Few rows, many columns: units are column panels, A is the shared operand.
            (20, 700, 300),
            // One row: the dot-product path when B is a transposed weight.
            (1, 300, 70),
        ];
        for &(m, n, k) in &sizes {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let a_data = values(m * k, 1);
                let b_data = values(k * n, 2);
                let a = if ta { MatRef::row_major(&a_data, k, m).t() } else { MatRef::row_major(&a_data, m, k) };
                let b = if tb { MatRef::row_major(&b_data, n, k).t() } else { MatRef::row_major(&b_data, k, n) };
                let want = naive(a, b);
                for accumulate in [false, true] {
                    let c0 = values(m * n, 3);
                    let mut got = c0.clone();
                    gemm(a, b, &mut got, n, accumulate);
                    for (idx, (g, w)) in got.iter().zip(&want).enumerate() {
                        let w = if accumulate { w + c0[idx] } else { *w };
                        assert!((g - w).abs() < 1e-9, "f64 ({m},{n},{k}) ta={ta} tb={tb}: {g} vs {w}");
                    }
                    let (a32, b32): (Vec<f32>, Vec<f32>) =
                        (a_data.iter().map(|&x| x as f32).collect(), b_data.iter().map(|&x| x as f32).collect());
                    let (a, b) = (same_view(a, &a32), same_view(b, &b32));
                    let mut got: Vec<f32> = c0.iter().map(|&x| x as f32).collect();
                    gemm(a, b, &mut got, n, accumulate);
                    for (idx, (g, w)) in got.iter().zip(&want).enumerate() {
                        let w = if accumulate { w + c0[idx] } else { *w };
                        assert!(
                            (*g as f64 - w).abs() < 1e-3 * (1.0 + k as f64).sqrt(),
                            "f32 ({m},{n},{k}): {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    /// `C = row + A·B` ([`Start::Row`], the bias added by the tile stores) has the bits of `C`
    /// filled with the row and then `C += A·B`, on every kernel (`f64`'s portable tile,
    /// `f32`'s, and each bf16 kernel), through ragged tiles, several KC blocks, both ways of
    /// sharing the work, the one-row path, and no depth at all; `ldc > n` leaves the gap alone.
    #[test]
    fn a_start_row_gives_the_bits_of_a_filled_c_plus_the_product() {
        fn check<T: Real>(
            what: &str,
            m: usize,
            n: usize,
            k: usize,
            product: impl Fn(MatRef<T>, MatRef<T>, &mut [T], Start<T>),
        ) {
            let ldc = n + 3;
            let to_t = |v: Vec<f64>| v.into_iter().map(|x| T::of(x)).collect::<Vec<T>>();
            let (a_data, w_data, row) = (to_t(values(m * k, 1)), to_t(values(n * k, 2)), to_t(values(n, 7)));
            let a = MatRef::row_major(&a_data, m, k);
            let b = MatRef::row_major(&w_data, n, k).t();
            let mut want = vec![T::of(9.0); m * ldc];
            want.chunks_mut(ldc).for_each(|r| r[..n].copy_from_slice(&row));
            product(a, b, &mut want, Start::C);
            let mut got = vec![T::of(9.0); m * ldc];
            product(a, b, &mut got, Start::Row(&row));
            let bits = |v: &[T]| v.iter().map(|x| x.to_f64().to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{what} ({m},{n},{k})");
        }
        // (3, 3200, 40) and (200, 1700, 40) pass NC: column units and row units in blocks at jc > 0.
        let sizes = [
            (1, 1, 1),
            (13, 53, 1100),
            (200, 100, 520),
            (20, 700, 300),
            (1, 300, 70),
            (9, 50, 0),
            (3, 3200, 40),
            (200, 1700, 40),
        ];
        for (m, n, k) in sizes {
            check::<f64>("f64", m, n, k, |a, b, c, start| gemm_from(Precision::F32, a, b, c, n + 3, start));
            check::<f32>("f32", m, n, k, |a, b, c, start| gemm_from(Precision::F32, a, b, c, n + 3, start));
            for kernel in bf16::tests::kernels_to_test() {
                let what = format!("{kernel:?}");
                check::<f32>(&what, m, n, k, |a, b, c, start| bf16_product(kernel, a, b, c, n + 3, start));
            }
        }
    }

    #[test]
    fn leading_dimension_wider_than_n_leaves_the_gap_alone() {
        let (m, n, k, ldc) = (30, 40, 50, 47);
        let a_data = values(m * k, 4);
        let b_data = values(k * n, 5);
        let mut c = vec![9.0f64; m * ldc];
        gemm(MatRef::row_major(&a_data, m, k), MatRef::row_major(&b_data, k, n), &mut c, ldc, false);
        let want = naive(MatRef::row_major(&a_data, m, k), MatRef::row_major(&b_data, k, n));
        for i in 0..m {
            for j in 0..ldc {
                let got = c[i * ldc + j];
                if j < n {
                    assert!((got - want[i * n + j]).abs() < 1e-9);
                } else {
                    assert_eq!(got, 9.0, "gap at ({i},{j}) written");
                }
            }
        }
    }
}
