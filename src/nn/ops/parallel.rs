//! Data-parallel loops for the kernels, run on candle's barrier pool.
//!
//! Why not rayon: candle runs its own ops on this pool, and its workers spin for a while after
//! each op so the next one starts at once. A kernel on a second pool (rayon's) then shares the
//! cores with those spinning workers: on the 2-core reference machine, three threads on two
//! cores for the first ~1 ms of every norm, activation and attention call. One pool for
//! everything keeps exactly one thread per core busy.
//!
//! Tasks are handed out dynamically (a shared cursor, in small groups), so a thread slowed by
//! the OS does not hold the others at the barrier. A loop started from inside a task runs
//! inline on that thread (candle's pool cannot nest: the calling thread holds its lock while
//! it runs its share of the tasks).
//!
//! A panic inside a task poisons that lock, and every later parallel loop in the process then
//! panics too: kernels must report bad input before they start a loop, not from inside one.

use std::cell::Cell;
use std::marker::PhantomData;
use std::ops::Range;

use candle_core::utils::barrier_pool;

use super::simd::Real;

/// Elements per task for the element-wise and row-wise kernels: enough work (tens of
/// microseconds) to amortise handing out a task, small enough to balance the threads.
pub const TASK_ELEMENTS: usize = 16_384;

/// Rows of `width` per task: about [`TASK_ELEMENTS`] elements, at least one row.
pub fn rows_per_task(width: usize) -> usize {
    (TASK_ELEMENTS / width.max(1)).max(1)
}

/// Threads that run a parallel loop: the pool's workers and the calling thread.
pub fn threads() -> usize {
    barrier_pool().n_workers() + 1
}

thread_local! {
    /// Set on the calling thread while it runs its share of a loop's tasks. (candle marks its
    /// own workers, and runs loops started on them inline.)
    static IN_LOOP: Cell<bool> = const { Cell::new(false) };
}

/// `f(i)` for every `i < tasks`, in parallel.
pub fn for_each(tasks: usize, f: impl Fn(usize) + Sync) {
    if tasks <= 1 || IN_LOOP.get() {
        return (0..tasks).for_each(f);
    }
    IN_LOOP.set(true);
    /// Clears the flag however the loop ends (a task may panic).
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            IN_LOOP.set(false);
        }
    }
    let _reset = Reset;
    barrier_pool().execute_chunked(tasks, |range| range.for_each(&f));
}

/// `f(i, chunk)` for each `size`-long chunk of `out` (the last may be shorter), in parallel.
pub fn for_each_chunk<T: Send>(out: &mut [T], size: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    for_each_part(Split::chunks(out, size), f);
}

/// `f(i, a_chunk, b_chunk)` over two outputs cut into the same number of chunks (of sizes
/// `size_a` and `size_b`), in parallel.
pub fn for_each_chunk2<A: Send, B: Send>(
    a: &mut [A],
    size_a: usize,
    b: &mut [B],
    size_b: usize,
    f: impl Fn(usize, &mut [A], &mut [B]) + Sync,
) {
    for_each_part2(Split::chunks(a, size_a), Split::chunks(b, size_b), f);
}

/// `f(i, part)` for each part of a [`Split`], in parallel.
pub fn for_each_part<T: Send>(a: Split<T>, f: impl Fn(usize, &mut [T]) + Sync) {
    // SAFETY: task `i` alone borrows part `i`.
    for_each(a.len(), |i| f(i, unsafe { a.part(i) }));
}

/// `f(i, a_part, b_part)` over two splits with the same number of parts, in parallel.
pub fn for_each_part2<A: Send, B: Send>(a: Split<A>, b: Split<B>, f: impl Fn(usize, &mut [A], &mut [B]) + Sync) {
    assert_eq!(a.len(), b.len(), "parallel: the outputs have different part counts");
    // SAFETY: task `i` alone borrows part `i` of each.
    for_each(a.len(), |i| unsafe { f(i, a.part(i), b.part(i)) });
}

/// `f(i, a_part, b_part, c_part)` over three splits with the same number of parts, in parallel.
pub fn for_each_part3<A: Send, B: Send, C: Send>(
    a: Split<A>,
    b: Split<B>,
    c: Split<C>,
    f: impl Fn(usize, &mut [A], &mut [B], &mut [C]) + Sync,
) {
    assert!(a.len() == b.len() && b.len() == c.len(), "parallel: the outputs have different part counts");
    // SAFETY: task `i` alone borrows part `i` of each.
    for_each(a.len(), |i| unsafe { f(i, a.part(i), b.part(i), c.part(i)) });
}

/// [`for_each_chunk`] that also folds: see [`fold`].
pub fn fold_chunks<T: Send, A: Send>(
    out: &mut [T],
    size: usize,
    init: impl Fn() -> A + Sync,
    f: impl Fn(&mut A, usize, &mut [T]) + Sync,
) -> Vec<A> {
    let out = Split::chunks(out, size);
    // SAFETY: task `i` alone borrows part `i`.
    fold(out.len(), init, |acc, i| f(acc, i, unsafe { out.part(i) }))
}

/// `f(acc_i, i)` for every `i < tasks` in parallel, each task with its own accumulator from
/// `init`; returns them in task order for the caller to combine, and at least one (an `init`
/// value when there are no tasks), so that a combined sum always has its full width.
///
/// Why one per task rather than per thread: which tasks a thread runs depends on timing, so
/// per-thread partial sums would add up in a different order from run to run, and a resumed
/// training run would no longer be bit-identical to an uninterrupted one.
pub fn fold<A: Send>(tasks: usize, init: impl Fn() -> A + Sync, f: impl Fn(&mut A, usize) + Sync) -> Vec<A> {
    let mut accumulators: Vec<A> = (0..tasks.max(1)).map(|_| init()).collect();
    for_each_chunk(&mut accumulators[..tasks], 1, |i, acc| f(&mut acc[0], i));
    accumulators
}

/// The element-wise sum of equally long parts (the accumulators of a [`fold`]).
pub fn sum_parts<T: Real>(parts: Vec<Vec<T>>) -> Vec<T> {
    let mut parts = parts.into_iter();
    let mut sum = parts.next().unwrap_or_default();
    for part in parts {
        sum.iter_mut().zip(&part).for_each(|(s, &x)| *s += x);
    }
    sum
}

/// A mutable slice cut into disjoint parts, for parallel tasks to borrow one each.
pub struct Split<'a, T> {
    ptr: *mut T,
    parts: Vec<Range<usize>>,
    _borrow: PhantomData<&'a mut [T]>,
}

// SAFETY: hands out only disjoint parts (checked in `new`), each to one task.
unsafe impl<T: Send> Sync for Split<'_, T> {}

impl<'a, T> Split<'a, T> {
    /// `slice` in `size`-long chunks, the last possibly shorter.
    pub fn chunks(slice: &'a mut [T], size: usize) -> Self {
        assert!(size > 0 || slice.is_empty(), "parallel: chunk size 0");
        let len = slice.len();
        let parts = (0..len).step_by(size.max(1)).map(|start| start..len.min(start + size)).collect();
        Split { ptr: slice.as_mut_ptr(), parts, _borrow: PhantomData }
    }

    /// `slice` in the given parts, which must be in order, disjoint and inside the slice.
    pub fn parts(slice: &'a mut [T], parts: Vec<Range<usize>>) -> Self {
        let mut end = 0;
        for part in &parts {
            assert!(part.start >= end && part.start <= part.end, "parallel: parts {part:?} overlap or run backwards");
            end = part.end;
        }
        assert!(end <= slice.len(), "parallel: a part ends at {end}, past the slice's {}", slice.len());
        Split { ptr: slice.as_mut_ptr(), parts, _borrow: PhantomData }
    }

    pub fn len(&self) -> usize {
        self.parts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// # Safety
    /// No other borrow of part `i` is alive.
    #[allow(clippy::mut_from_ref)]
    unsafe fn part(&self, i: usize) -> &'a mut [T] {
        let Range { start, end } = self.parts[i].clone();
        // SAFETY: inside the slice and disjoint from the other parts (checked at
        // construction); exclusive by the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), end - start) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_is_visited_once_with_its_index() {
        for (len, size) in [(0, 3), (1, 3), (10, 3), (12, 3), (1000, 7)] {
            let mut a = vec![0usize; len];
            let mut b = vec![0usize; len.div_ceil(size)];
            for_each_chunk2(&mut a, size, &mut b, 1, |i, a, b| {
                a.iter_mut().for_each(|x| *x += i + 1);
                b[0] += a.len();
            });
            assert!(a.iter().enumerate().all(|(j, &x)| x == j / size + 1), "{len}/{size}");
            assert_eq!(b.iter().sum::<usize>(), len);
        }
    }

    #[test]
    fn fold_returns_each_tasks_accumulator_in_order() {
        for tasks in [1, 2, 100] {
            let parts = fold(tasks, Vec::new, |acc: &mut Vec<usize>, i| acc.push(i));
            assert_eq!(parts, (0..tasks).map(|i| vec![i]).collect::<Vec<_>>());
        }
        // No tasks: one untouched accumulator, so sums keep their width.
        assert_eq!(fold(0, || vec![0.0f32; 3], |_, _| unreachable!()), vec![vec![0.0; 3]]);
    }

    #[test]
    fn a_loop_inside_a_task_runs_inline() {
        let mut out = vec![0usize; 64];
        for_each_chunk(&mut out, 8, |i, chunk| {
            for_each_chunk(chunk, 2, |j, pair| pair.fill(10 * i + j));
        });
        assert!(out.iter().enumerate().all(|(k, &x)| x == 10 * (k / 8) + (k % 8) / 2));
    }

    /// A caller that waits past the pool's spinning parks, and the worker that finishes wakes
    /// it: with one task sleeping far longer than the spin limit, whichever thread the other
    /// task lands on, every loop still ends with each task run once. (A lost wake-up hangs.)
    #[test]
    fn a_loop_whose_task_outlasts_the_spinning_ends() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let ran = [AtomicUsize::new(0), AtomicUsize::new(0)];
        let rounds = 10;
        for _ in 0..rounds {
            for_each(2, |i| {
                if i == 1 {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                ran[i].fetch_add(1, Ordering::Relaxed);
            });
        }
        assert!(ran.iter().all(|r| r.load(Ordering::Relaxed) == rounds));
    }

    #[test]
    #[should_panic(expected = "overlap")]
    fn overlapping_parts_are_refused() {
        let mut x = [0; 10];
        Split::parts(&mut x, vec![0..5, 4..10]);
    }
}
