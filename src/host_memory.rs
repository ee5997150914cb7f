//! How the process hands host memory back to the system.
//!
//! The `lmforge` binary keeps freed memory for reuse (`main.rs`: a training step frees and
//! allocates the same large tensors every step), so resident memory stays at its peak. Where a
//! large set of tensors is dropped for good — the `f32` weights after a model is converted to
//! bf16, a rehearsal's model after it is measured — that peak would be the wrong number to
//! keep (and to report), so those places release the free memory explicitly.

/// Hand the allocator's free memory back to the system (glibc's `malloc_trim`; a no-op
/// elsewhere).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: no arguments beyond a pad size; glibc only releases memory no one holds.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// 2 MiB: the size of a transparent huge page on x86-64 (and of the extents the kernel can
/// back with one).
const HUGE_PAGE: usize = 2 << 20;

/// Ask the kernel to back the given memory regions (`(address, bytes)`, e.g. a model's weight
/// buffers) with 2 MiB pages instead of 4 KiB ones, now (Linux 6.1+: `MADV_COLLAPSE` copies
/// the pages already there into huge ones) and from now on (`MADV_HUGEPAGE`). Contents are
/// unchanged; where the kernel cannot (huge pages off, too old a kernel, another system) it is
/// a no-op.
///
/// Why: decoding reads every weight once per token, a stream of 0.1–0.5 GB through the TLB.
/// On 4 KiB pages that is a page walk every 64 cache lines, and the hardware prefetchers stop
/// at each page's end. On 2 MiB pages one decoding thread of SmolLM2-135M went from 26–27 to
/// 33–34 tok/s in `f32` and from 37–38 to 65–69 in bf16 (same runs, same binary otherwise).
///
/// The cost is at loading: the kernel copies the pages into huge ones, about 0.2 s per 512 MiB
/// where fresh memory comes quickly, 1–2 s on the 2-core VM lmforge is developed on (where a
/// first touch of memory is slow). Splitting the call over the thread pool did not shorten it
/// there beyond the noise.
///
/// Regions are widened to whole 2 MiB extents (the neighbours of a small matrix are usually
/// other weights: `main.rs` keeps every allocation on one heap), so memory next to them may
/// move to huge pages too, which changes nothing but its page size.
pub fn back_with_huge_pages(regions: impl IntoIterator<Item = (usize, usize)>) {
    let mut extents: Vec<(usize, usize)> = regions
        .into_iter()
        .filter(|&(_, bytes)| bytes > 0)
        .map(|(start, bytes)| (start / HUGE_PAGE * HUGE_PAGE, (start + bytes).next_multiple_of(HUGE_PAGE)))
        .collect();
    extents.sort_unstable();
    let mut merged: Vec<(usize, usize)> = Vec::with_capacity(extents.len());
    for (start, end) in extents {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    for (start, end) in merged {
        advise_huge(start, end - start);
    }
}

/// `madvise(MADV_HUGEPAGE)` then `madvise(MADV_COLLAPSE)` on one 2 MiB-aligned extent; the
/// errors (an unmapped gap, a kernel without either) are ignored: the pages stay as they are.
fn advise_huge(start: usize, bytes: usize) {
    #[cfg(target_os = "linux")]
    {
        /// `include/uapi/asm-generic/mman-common.h` (Linux 6.1); the `libc` crate lacks it.
        const MADV_COLLAPSE: libc::c_int = 25;
        let address = start as *mut libc::c_void;
        // SAFETY: both advices only change how the pages of the range are backed, never their
        // contents, and fail harmlessly on addresses that are not mapped.
        unsafe {
            libc::madvise(address, bytes, libc::MADV_HUGEPAGE);
            libc::madvise(address, bytes, MADV_COLLAPSE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (start, bytes);
}

/// `(address, bytes)` of a tensor's elements in host memory, for [`back_with_huge_pages`];
/// `None` on a device.
pub fn tensor_region(t: &candle_core::Tensor) -> Option<(usize, usize)> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else { return None };
    let bytes = t.elem_count() * t.dtype().size_in_bytes();
    let address = match cpu {
        candle_core::CpuStorage::F32(v) => v.as_ptr() as usize,
        candle_core::CpuStorage::BF16(v) => v.as_ptr() as usize,
        candle_core::CpuStorage::F16(v) => v.as_ptr() as usize,
        _ => return None,
    };
    Some((address + layout.start_offset() * t.dtype().size_in_bytes(), bytes))
}

/// Bytes of this process's anonymous memory on 2 MiB pages (`/proc/self/smaps_rollup`'s
/// `AnonHugePages`); `None` where that is not known.
pub fn huge_page_bytes() -> Option<u64> {
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").ok()?;
    let line = rollup.lines().find(|l| l.starts_with("AnonHugePages:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The advice never changes what memory holds: a large buffer (several 2 MiB extents, not
    /// aligned to one) and a small one keep every value, and empty regions are ignored.
    #[test]
    fn huge_pages_keep_the_contents() {
        let big: Vec<f32> = (0..3 * (1 << 20) + 17).map(|i| i as f32 * 0.5).collect();
        let small: Vec<u8> = (0..1000).map(|i| (i % 251) as u8).collect();
        let (big_before, small_before) = (big.clone(), small.clone());
        let t = candle_core::Tensor::from_vec(big, (3 * (1 << 20) + 17,), &candle_core::Device::Cpu).unwrap();
        let region = tensor_region(&t).unwrap();
        assert_eq!(region.1, 4 * t.elem_count());
        back_with_huge_pages([region, (small.as_ptr() as usize, small.len()), (small.as_ptr() as usize, 0)]);
        assert_eq!(t.to_vec1::<f32>().unwrap(), big_before);
        assert_eq!(small, small_before);
        // The 12 MiB buffer holds whole 2 MiB extents: where the kernel can collapse them, the
        // process now has huge pages.
        if collapse_expected() {
            let huge = huge_page_bytes().expect("smaps_rollup on Linux");
            assert!(huge >= HUGE_PAGE as u64, "{huge} bytes on huge pages after the advice");
        }
    }

    /// Linux 6.1 or later (`MADV_COLLAPSE`) with transparent huge pages not switched off.
    fn collapse_expected() -> bool {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut numbers = release.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse::<u32>().ok());
        let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
        let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
        version >= (6, 1) && !mode.is_empty() && !mode.contains("[never]")
    }
}
