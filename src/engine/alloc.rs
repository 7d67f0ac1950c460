//! A counting global allocator: live heap bytes and their high-water mark, for the
//! engine to measure itself against the planner's prediction.
//!
//! It counts the whole process (every thread), which on CPU is what a training step's
//! tensors are: candle's CPU storage is plain `Vec`s on this heap. It also keeps the same
//! two numbers for tensors alone, leaving out allocations aligned to 64 bytes or more:
//! gemm's packing buffers (cache-line aligned scratch, made and freed inside each CPU
//! matmul), which a GPU's matmul does not have; candle's `Vec`s are aligned to at most 8.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

pub struct Counting;

static CURRENT: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);
static TENSORS: AtomicU64 = AtomicU64::new(0);
static TENSORS_PEAK: AtomicU64 = AtomicU64::new(0);

/// Allocations aligned to this or more are matmul scratch, not tensors.
const SCRATCH_ALIGN: usize = 64;

fn grow(layout: Layout, n: u64) {
    let now = CURRENT.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
    if layout.align() < SCRATCH_ALIGN {
        let now = TENSORS.fetch_add(n, Ordering::Relaxed) + n;
        TENSORS_PEAK.fetch_max(now, Ordering::Relaxed);
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
            grow(layout, layout.size() as u64);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grow(layout, layout.size() as u64);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) };
        shrink(layout, layout.size() as u64);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
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
}
