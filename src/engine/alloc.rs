//! A counting global allocator: live heap bytes and their high-water mark, for the
//! engine to measure itself against the planner's prediction.
//!
//! It counts the whole process (every thread), which on CPU is what a training step's
//! tensors are: candle's CPU storage is plain `Vec`s on this heap. It also keeps the same
//! two numbers for tensors alone, leaving out allocations aligned to 64 bytes or more:
//! gemm's packing buffers (cache-line aligned scratch, made and freed inside each CPU
//! matmul), which a GPU's matmul does not have; candle's `Vec`s are aligned to at most 8.
//!
//! For calibration it can also take a census (`VRAMPLAN_MEM_DEBUG=census`): which tensor
//! allocations are live at each stage's high-water mark, by size, so that what a stage's
//! peak holds can be matched to the shapes of the step.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

pub struct Counting;

/// Keeps freed heap pages in the process for the next tensors, where the C library is
/// glibc. A step frees and makes the same tensors again; by default glibc gives the top of
/// the heap back to the kernel when more than about twice the last mmapped size is free
/// and serves large tensors by `mmap`, so every step faulted in and zeroed fresh pages
/// (page faults, `memset` and the kernel's page lists were a fifth of a small model's
/// profile). Here tensors up to 32 MiB come from the heap, the heap keeps up to 128 MiB
/// free at its top and grows by 64 MiB at a time (measured side by side in
/// docs/performance.md). It changes no byte this allocator counts.
pub fn keep_freed_pages() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only sets the allocator's tunables, under the allocator's own
    // lock; a value glibc rejects is left at its default.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

static CURRENT: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);
static TENSORS: AtomicU64 = AtomicU64::new(0);
static TENSORS_PEAK: AtomicU64 = AtomicU64::new(0);

/// Allocations aligned to this or more are matmul scratch, not tensors.
const SCRATCH_ALIGN: usize = 64;

/// The census: tensor allocations of at least `CENSUS_MIN` bytes, by address, and their
/// sizes as they were at the last high-water mark of the tensors' bytes.
const SLOTS: usize = 16_384;
const CENSUS_MIN: usize = 4096;
static CENSUS: AtomicBool = AtomicBool::new(false);
static PTRS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static SIZES: [AtomicU64; SLOTS] = [const { AtomicU64::new(0) }; SLOTS];
static AT_PEAK: [AtomicU64; SLOTS] = [const { AtomicU64::new(0) }; SLOTS];

fn counted(layout: Layout) -> bool {
    CENSUS.load(Ordering::Relaxed) && layout.align() < SCRATCH_ALIGN && layout.size() >= CENSUS_MIN
}

/// Records a live allocation in a free slot (none is lost silently: a full table leaves
/// the allocation out of the census only).
fn enter(p: *mut u8, size: usize) {
    for (ptr, bytes) in PTRS.iter().zip(&SIZES) {
        if ptr
            .compare_exchange(0, p as usize, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            bytes.store(size as u64, Ordering::Release);
            return;
        }
    }
}

fn leave(p: *mut u8) {
    for (ptr, bytes) in PTRS.iter().zip(&SIZES) {
        if ptr.load(Ordering::Acquire) == p as usize {
            bytes.store(0, Ordering::Release);
            ptr.store(0, Ordering::Release);
            return;
        }
    }
}

/// Copies the live sizes as the high-water mark's.
fn snapshot() {
    for (now, at_peak) in SIZES.iter().zip(&AT_PEAK) {
        at_peak.store(now.load(Ordering::Acquire), Ordering::Relaxed);
    }
}

fn grow(layout: Layout, n: u64) {
    let now = CURRENT.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
    if layout.align() < SCRATCH_ALIGN {
        let now = TENSORS.fetch_add(n, Ordering::Relaxed) + n;
        let before = TENSORS_PEAK.fetch_max(now, Ordering::Relaxed);
        if now > before && CENSUS.load(Ordering::Relaxed) {
            snapshot();
        }
    }
}

fn shrink(layout: Layout, n: u64) {
    CURRENT.fetch_sub(n, Ordering::Relaxed);
    if layout.align() < SCRATCH_ALIGN {
        TENSORS.fetch_sub(n, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded to `System` unchanged; the counters only observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            if counted(layout) {
                enter(p, layout.size());
            }
            grow(layout, layout.size() as u64);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            if counted(layout) {
                enter(p, layout.size());
            }
            grow(layout, layout.size() as u64);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) };
        if counted(layout) {
            leave(ptr);
        }
        shrink(layout, layout.size() as u64);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if counted(layout) {
                leave(ptr);
            }
            if CENSUS.load(Ordering::Relaxed) {
                let grown = Layout::from_size_align(new_size, layout.align()).unwrap_or(layout);
                if counted(grown) {
                    enter(p, new_size);
                }
            }
            shrink(layout, layout.size() as u64);
            grow(layout, new_size as u64);
        }
        p
    }
}

/// Live heap bytes now.
pub fn current() -> u64 {
    CURRENT.load(Ordering::Relaxed)
}

/// The most live bytes since the last [`reset_peak`].
pub fn peak() -> u64 {
    PEAK.load(Ordering::Relaxed)
}

/// Live bytes of tensors (no matmul scratch) now.
pub fn tensors_current() -> u64 {
    TENSORS.load(Ordering::Relaxed)
}

/// The most live bytes of tensors since the last [`reset_peak`].
pub fn tensors_peak() -> u64 {
    TENSORS_PEAK.load(Ordering::Relaxed)
}

/// Starts new high-water marks at the current levels.
pub fn reset_peak() {
    PEAK.store(current(), Ordering::Relaxed);
    TENSORS_PEAK.store(tensors_current(), Ordering::Relaxed);
    if CENSUS.load(Ordering::Relaxed) {
        snapshot();
    }
}

/// Starts (or stops) the census of live tensor allocations. Allocations made before it
/// started are not in it.
pub fn census(on: bool) {
    CENSUS.store(on, Ordering::Relaxed);
}

/// The tensor allocations of at least 4 KiB live at the tensors' last high-water mark:
/// (size in bytes, how many), largest total first.
pub fn census_at_peak() -> Vec<(u64, u64)> {
    let mut by_size = std::collections::BTreeMap::new();
    for bytes in AT_PEAK.iter().map(|b| b.load(Ordering::Relaxed)) {
        if bytes > 0 {
            *by_size.entry(bytes).or_insert(0u64) += 1;
        }
    }
    let mut out: Vec<(u64, u64)> = by_size.into_iter().collect();
    out.sort_by_key(|&(size, n)| std::cmp::Reverse(size * n));
    out
}
