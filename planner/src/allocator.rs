//! PyTorch's CUDA caching allocator, replayed over a step's events.
//!
//! Rules (c10/cuda/CUDACachingAllocator.cpp, default settings): requests are rounded up to
//! 512 B; blocks of at most 1 MiB come from 2 MiB segments of the small pool; larger
//! blocks from the large pool, where a request under 10 MiB gets a 20 MiB segment and a
//! larger one a segment rounded up to 2 MiB. A free block is reused best-fit within its
//! pool and split when the rest is worth keeping (≥ 512 B small, > 1 MiB large); freed
//! neighbours merge; segments are never returned during a step. `max_memory_allocated`
//! counts the rounded block sizes; `max_memory_reserved` the segments.

use crate::timeline::{ByComponent, Component, Timeline};
use crate::units::{Bytes, MIB};
use std::collections::BTreeMap;

const MIN_BLOCK: u64 = 512;
const SMALL: u64 = MIB;
const SMALL_BUFFER: u64 = 2 * MIB;
const LARGE_BUFFER: u64 = 20 * MIB;
const MIN_LARGE_ALLOC: u64 = 10 * MIB;
const ROUND_LARGE: u64 = 2 * MIB;

#[derive(Debug, Clone)]
pub struct AllocatorStats {
    pub peak_allocated: Bytes,
    pub peak_reserved: Bytes,
    /// Allocated bytes by component at the allocated peak (rounded sizes).
    pub by_component: BTreeMap<Component, Bytes>,
}

#[derive(Debug, Clone, Copy)]
struct Block {
    offset: u64,
    size: u64,
    free: bool,
}

#[derive(Debug)]
struct Segment {
    small: bool,
    blocks: Vec<Block>,
}

fn round_size(s: u64) -> u64 {
    s.max(1).div_ceil(MIN_BLOCK).saturating_mul(MIN_BLOCK)
}

fn segment_size(s: u64) -> u64 {
    if s <= SMALL {
        SMALL_BUFFER
    } else if s < MIN_LARGE_ALLOC {
        LARGE_BUFFER
    } else {
        s.div_ceil(ROUND_LARGE).saturating_mul(ROUND_LARGE)
    }
}

/// Replays the timeline through the caching allocator.
pub fn simulate(t: &Timeline) -> AllocatorStats {
    let mut segs: Vec<Segment> = Vec::new();
    let mut reserved = 0u64;
    let mut where_: Vec<Option<(usize, u64)>> = vec![None; t.tensors.len()];
    let mut live = ByComponent::default();
    let mut best = (Bytes(0), live);
    let mut peak_reserved = 0u64;
    for e in &t.events {
        let tensor = &t.tensors[e.tensor];
        if tensor.bytes.0 == 0 {
            continue;
        }
        let size = round_size(tensor.bytes.0);
        let c = tensor.component;
        if e.alloc {
            let small = size <= SMALL;
            // Best fit among free blocks of the pool.
            let mut fit: Option<(usize, usize, u64)> = None;
            for (si, seg) in segs.iter().enumerate().filter(|(_, s)| s.small == small) {
                for (bi, b) in seg.blocks.iter().enumerate() {
                    if b.free && b.size >= size && fit.is_none_or(|(_, _, fs)| b.size < fs) {
                        fit = Some((si, bi, b.size));
                    }
                }
            }
            let (si, bi) = match fit {
                Some((si, bi, _)) => (si, bi),
                None => {
                    let ss = segment_size(size);
                    reserved = reserved.saturating_add(ss);
                    segs.push(Segment {
                        small,
                        blocks: vec![Block {
                            offset: 0,
                            size: ss,
                            free: true,
                        }],
                    });
                    (segs.len() - 1, 0)
                }
            };
            let seg = &mut segs[si];
            let b = seg.blocks[bi];
            let rest = b.size - size;
            let split = if small {
                rest >= MIN_BLOCK
            } else {
                rest > SMALL
            };
            let taken = if split { size } else { b.size };
            seg.blocks[bi] = Block {
                offset: b.offset,
                size: taken,
                free: false,
            };
            if split {
                seg.blocks.insert(
                    bi + 1,
                    Block {
                        offset: b.offset + size,
                        size: rest,
                        free: true,
                    },
                );
            }
            where_[e.tensor] = Some((si, b.offset));
            live.add(c, Bytes(taken));
            let total = live.total();
            if total > best.0 {
                best = (total, live);
            }
            peak_reserved = peak_reserved.max(reserved);
        } else if let Some((si, off)) = where_[e.tensor].take() {
            let seg = &mut segs[si];
            if let Some(bi) = seg.blocks.iter().position(|b| b.offset == off) {
                live.sub(c, Bytes(seg.blocks[bi].size));
                seg.blocks[bi].free = true;
                if bi + 1 < seg.blocks.len() && seg.blocks[bi + 1].free {
                    let n = seg.blocks.remove(bi + 1);
                    seg.blocks[bi].size += n.size;
                }
                if bi > 0 && seg.blocks[bi - 1].free {
                    let c = seg.blocks.remove(bi);
                    seg.blocks[bi - 1].size += c.size;
                }
            }
        }
    }
    AllocatorStats {
        peak_allocated: best.0,
        peak_reserved: Bytes(peak_reserved.max(best.0 .0)),
        by_component: best.1.to_map(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timeline::Step;

    #[test]
    fn rounds_and_reuses_like_the_caching_allocator() {
        let mut s = Step::new();
        let a = s.alloc("a", Component::Activations, Bytes(100));
        // 100 B → 512 B block in a 2 MiB small segment.
        let b = s.alloc("b", Component::Activations, Bytes(30 * MIB + 1));
        s.free(b);
        // The 32 MiB segment is split (the 2 MiB rest is worth keeping); c reuses it.
        let c = s.alloc("c", Component::Activations, Bytes(29 * MIB));
        s.free(c);
        s.free(a);
        let st = simulate(&s.finish());
        assert_eq!(st.peak_allocated, Bytes(512 + 30 * MIB + 512));
        assert_eq!(st.peak_reserved, Bytes(2 * MIB + 32 * MIB));
    }
}
