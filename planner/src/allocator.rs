//! PyTorch's CUDA caching allocator, replayed over a step's events.
//!
//! Rules (c10/cuda/CUDACachingAllocator.cpp, default settings): requests are rounded up to
//! 512 B; blocks of at most 1 MiB come from 2 MiB segments of the small pool; larger
//! blocks from the large pool, where a request under 10 MiB gets a 20 MiB segment and a
//! larger one a segment rounded up to 2 MiB. A free block is reused best-fit within its
//! pool and split when the rest is worth keeping (≥ 512 B small, > 1 MiB large); freed
//! neighbours merge; segments are never returned during a step. `max_memory_allocated`
//! counts the rounded block sizes; `max_memory_reserved` the segments.

use crate::timeline::{ByComponent, Component, Event, Timeline};
use crate::units::{Bytes, MIB};
use std::cell::RefCell;
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

/// No block: the end of a segment's list.
const NONE: u32 = u32::MAX;

/// A block of a segment. The blocks of a segment tile it in address order, linked by
/// `prev` and `next` (indices into [`Pools::blocks`]), so a freed block finds its
/// neighbours without a search.
#[derive(Debug, Clone, Copy)]
struct Block {
    seg: u32,
    off: u64,
    size: u64,
    free: bool,
    prev: u32,
    next: u32,
}

/// Where a free block lies: `(size, segment, offset)`. Ordered this way, the first entry
/// at or above a request is the caching allocator's best fit, and among equal sizes the
/// block of the oldest segment at the lowest offset (the order a linear scan meets them).
type FreeKey = (u64, u32, u64);

/// One pool's free blocks, grouped by size: the sizes ascending, each with its blocks as
/// `(segment, offset, block)` in descending order, so the best fit of a size is its last
/// entry. A step frees hundreds of blocks but of few sizes (a 24-layer model at
/// micro-batch 8: about 500 free blocks of 7 to 10 sizes), so every search is over a
/// short vector. An emptied group's vector is kept for the next new size.
#[derive(Debug, Default, Clone)]
struct FreeBlocks {
    by_size: Vec<(u64, SizeGroup)>,
    spare: Vec<SizeGroup>,
}

/// The free blocks of one size as `(segment, offset, block)`, descending.
type SizeGroup = Vec<(u32, u64, u32)>;

impl FreeBlocks {
    /// Removes and returns the best fit for `size`: the smallest key at or above it.
    fn take_best(&mut self, size: u64) -> Option<u32> {
        let g = self.by_size.partition_point(|(s, _)| *s < size);
        let (_, blocks) = self.by_size.get_mut(g)?;
        let found = blocks.pop().map(|(_, _, b)| b);
        if blocks.is_empty() {
            self.retire(g);
        }
        found
    }

    /// The best fit for `size`, left in place.
    fn best(&self, size: u64) -> Option<u32> {
        let g = self.by_size.partition_point(|(s, _)| *s < size);
        self.by_size.get(g)?.1.last().map(|(_, _, b)| *b)
    }

    fn insert(&mut self, (size, seg, off): FreeKey, block: u32) {
        let g = match self.by_size.binary_search_by(|(s, _)| s.cmp(&size)) {
            Ok(g) => g,
            Err(g) => {
                let v = self.spare.pop().unwrap_or_default();
                self.by_size.insert(g, (size, v));
                g
            }
        };
        let blocks = &mut self.by_size[g].1;
        // Most frees land at either end of their size's list: check those first.
        match blocks.last() {
            None => blocks.push((seg, off, block)),
            Some(&(s, o, _)) if (s, o) > (seg, off) => blocks.push((seg, off, block)),
            _ if blocks[0].0 < seg || (blocks[0].0 == seg && blocks[0].1 < off) => {
                blocks.insert(0, (seg, off, block))
            }
            _ => {
                let at = blocks.partition_point(|(s, o, _)| (*s, *o) > (seg, off));
                blocks.insert(at, (seg, off, block));
            }
        }
    }

    fn remove(&mut self, (size, seg, off): FreeKey) {
        let Ok(g) = self.by_size.binary_search_by(|(s, _)| s.cmp(&size)) else {
            return;
        };
        let blocks = &mut self.by_size[g].1;
        if let Ok(at) = blocks.binary_search_by(|(s, o, _)| (seg, off).cmp(&(*s, *o))) {
            blocks.remove(at);
        }
        if blocks.is_empty() {
            self.retire(g);
        }
    }

    /// Drops the emptied group `g`, keeping its vector for the next new size.
    #[cold]
    fn retire(&mut self, g: usize) {
        let (_, v) = self.by_size.remove(g);
        self.spare.push(v);
    }
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

/// The allocator's blocks in one flat arena and, per pool, its free blocks grouped by
/// size for best fit: a request is two short searches, a free two link updates and at
/// most three removals or insertions (docs/performance.md, "planner speed": the
/// ordered maps this replaces were 63 % of `fit`'s instructions). Blocks merged away stay
/// in the arena, unlinked; a step allocates at most two blocks per request.
#[derive(Debug, Default, Clone)]
struct Pools {
    blocks: Vec<Block>,
    /// Whether each segment belongs to the small pool.
    small_seg: Vec<bool>,
    /// Free blocks of the small pool (`[0]`) and the large pool (`[1]`).
    free: [FreeBlocks; 2],
    reserved: u64,
}

impl Pools {
    fn with_capacity(requests: usize) -> Pools {
        Pools {
            blocks: Vec::with_capacity(requests.saturating_mul(2)),
            ..Pools::default()
        }
    }

    fn key(&self, b: u32) -> FreeKey {
        let b = &self.blocks[b as usize];
        (b.size, b.seg, b.off)
    }

    fn insert_free(&mut self, pool: usize, b: u32) {
        let key = self.key(b);
        self.free[pool].insert(key, b);
    }

    fn remove_free(&mut self, pool: usize, b: u32) {
        let key = self.key(b);
        self.free[pool].remove(key);
    }

    /// A new segment of `ss` bytes in the pool, as one free block (not yet indexed).
    fn new_segment(&mut self, ss: u64, small: bool) -> u32 {
        self.reserved = self.reserved.saturating_add(ss);
        self.small_seg.push(small);
        self.blocks.push(Block {
            seg: (self.small_seg.len() - 1) as u32,
            off: 0,
            size: ss,
            free: true,
            prev: NONE,
            next: NONE,
        });
        (self.blocks.len() - 1) as u32
    }

    /// Places a request of `size` (already rounded): best fit among free blocks of its
    /// pool, else a new segment; splits when the rest is worth keeping. Returns the block
    /// and the bytes it takes.
    fn alloc(&mut self, size: u64) -> (u32, u64) {
        let small = size <= SMALL;
        let pool = usize::from(!small);
        let bi = match self.free[pool].take_best(size) {
            Some(b) => b,
            None => self.new_segment(segment_size(size), small),
        };
        let b = self.blocks[bi as usize];
        let rest = b.size - size;
        let split = if small {
            rest >= MIN_BLOCK
        } else {
            rest > SMALL
        };
        if split {
            let ri = self.blocks.len() as u32;
            self.blocks.push(Block {
                seg: b.seg,
                off: b.off + size,
                size: rest,
                free: true,
                prev: bi,
                next: b.next,
            });
            if b.next != NONE {
                self.blocks[b.next as usize].prev = ri;
            }
            let blk = &mut self.blocks[bi as usize];
            blk.next = ri;
            blk.size = size;
            self.insert_free(pool, ri);
        }
        self.blocks[bi as usize].free = false;
        (bi, self.blocks[bi as usize].size)
    }

    /// A request of `size` (already rounded) freed again before any other request: the
    /// bytes it takes, leaving the pools as its allocation and free would. The best fit
    /// is split and merged back (its neighbours were not free, or it would have merged
    /// with them), so only a new segment remains, as one free block.
    fn transient(&mut self, size: u64) -> u64 {
        let small = size <= SMALL;
        let pool = usize::from(!small);
        let (bi, new) = match self.free[pool].best(size) {
            Some(b) => (b, false),
            None => (self.new_segment(segment_size(size), small), true),
        };
        let held = self.blocks[bi as usize].size;
        if new {
            self.insert_free(pool, bi);
        }
        let rest = held - size;
        let split = if small {
            rest >= MIN_BLOCK
        } else {
            rest > SMALL
        };
        if split {
            size
        } else {
            held
        }
    }

    /// Unlinks `b`'s next block (merged into `b`), returning its size.
    fn absorb_next(&mut self, b: u32) -> u64 {
        let n = self.blocks[b as usize].next;
        let nb = self.blocks[n as usize];
        self.blocks[b as usize].next = nb.next;
        if nb.next != NONE {
            self.blocks[nb.next as usize].prev = b;
        }
        nb.size
    }

    /// Frees block `bi`, merging it with free neighbours. Returns the bytes it held.
    fn free(&mut self, bi: u32) -> u64 {
        let b = self.blocks[bi as usize];
        let pool = usize::from(!self.small_seg[b.seg as usize]);
        let mut size = b.size;
        if b.next != NONE && self.blocks[b.next as usize].free {
            self.remove_free(pool, b.next);
            size += self.absorb_next(bi);
        }
        let mut start = bi;
        if b.prev != NONE && self.blocks[b.prev as usize].free {
            self.remove_free(pool, b.prev);
            start = b.prev;
            size += self.blocks[start as usize].size;
            self.absorb_next(start);
        }
        let blk = &mut self.blocks[start as usize];
        blk.size = size;
        blk.free = true;
        self.insert_free(pool, start);
        b.size
    }
}

/// The replay's state part-way through a step.
#[derive(Debug, Clone)]
struct Replay {
    pools: Pools,
    /// Each tensor's block while it is live.
    where_: Vec<u32>,
    live: ByComponent,
    /// The allocated peak so far and the bytes by component there.
    best: (Bytes, ByComponent),
    peak_reserved: u64,
}

/// A step's leading allocations of persistent tensors (weights, optimizer state,
/// accumulated gradients) as (bytes, component), and the replay's state after them.
type Prefix = (Vec<(u64, Component)>, Replay);

thread_local! {
    /// The last step's prefix: the candidates of a fit share it, so each replays only
    /// what follows it.
    static LAST_PREFIX: RefCell<Option<Prefix>> = const { RefCell::new(None) };
}

impl Replay {
    fn new(tensors: usize) -> Replay {
        Replay {
            pools: Pools::with_capacity(tensors),
            where_: vec![NONE; tensors],
            live: ByComponent::default(),
            best: (Bytes(0), ByComponent::default()),
            peak_reserved: 0,
        }
    }

    /// A copy of a state after the first `n` tensors (only those have blocks), with room
    /// for a step of `tensors` as [`Replay::new`] makes.
    fn resume(&self, n: usize, tensors: usize) -> Replay {
        let room = tensors.saturating_mul(2).max(self.pools.blocks.len());
        let mut blocks = Vec::with_capacity(room);
        blocks.extend_from_slice(&self.pools.blocks);
        let mut where_ = Vec::with_capacity(tensors.max(n));
        where_.extend_from_slice(&self.where_[..n]);
        Replay {
            pools: Pools {
                blocks,
                small_seg: self.pools.small_seg.clone(),
                free: self.pools.free.clone(),
                reserved: self.pools.reserved,
            },
            where_,
            live: self.live,
            best: self.best,
            peak_reserved: self.peak_reserved,
        }
    }

    /// Replays `events` of `t`.
    fn play(&mut self, t: &Timeline, events: &[Event]) {
        let mut events = events.iter().peekable();
        while let Some(e) = events.next() {
            let tensor = &t.tensors[e.tensor];
            if tensor.bytes.0 == 0 {
                continue;
            }
            let c = tensor.component;
            if e.alloc {
                // Freed at once (a buffer inside one op): placed and released in one step.
                let transient = events
                    .next_if(|n| n.tensor == e.tensor && !n.alloc)
                    .is_some();
                let taken = if transient {
                    self.pools.transient(round_size(tensor.bytes.0))
                } else {
                    let (bi, taken) = self.pools.alloc(round_size(tensor.bytes.0));
                    self.where_[e.tensor] = bi;
                    taken
                };
                self.live.add(c, Bytes(taken));
                let total = self.live.total();
                if total > self.best.0 {
                    self.best = (total, self.live);
                }
                self.peak_reserved = self.peak_reserved.max(self.pools.reserved);
                if transient {
                    self.live.sub(c, Bytes(taken));
                }
            } else {
                let bi = std::mem::replace(&mut self.where_[e.tensor], NONE);
                if bi != NONE {
                    self.live.sub(c, Bytes(self.pools.free(bi)));
                }
            }
        }
    }

    fn stats(&self) -> AllocatorStats {
        AllocatorStats {
            peak_allocated: self.best.0,
            peak_reserved: Bytes(self.peak_reserved.max(self.best.0 .0)),
            by_component: self.best.1.to_map(),
        }
    }
}

/// Replays the timeline through the caching allocator, from the last step's state after
/// the persistent tensors when this step allocates the same ones first.
pub fn simulate(t: &Timeline) -> AllocatorStats {
    // Before any free, event i allocates tensor i: the persistent tensors come first.
    let n = t
        .events
        .iter()
        .take_while(|e| e.alloc && t.tensors[e.tensor].persistent)
        .count();
    let prefix = || t.tensors[..n].iter().map(|x| (x.bytes.0, x.component));
    let cached = LAST_PREFIX.with(|last| match &*last.borrow() {
        Some((k, r)) if k.iter().copied().eq(prefix()) => Some(r.resume(n, t.tensors.len())),
        _ => None,
    });
    let mut r = cached.unwrap_or_else(|| {
        let mut r = Replay::new(t.tensors.len());
        r.play(t, &t.events[..n]);
        LAST_PREFIX.with(|last| *last.borrow_mut() = Some((prefix().collect(), r.clone())));
        r
    });
    r.where_.resize(t.tensors.len(), NONE);
    r.play(t, &t.events[n..]);
    r.stats()
}

/// [`simulate`] from an empty allocator, without the shared prefix: the reference its
/// test holds it to.
#[cfg(test)]
fn simulate_afresh(t: &Timeline) -> AllocatorStats {
    let mut r = Replay::new(t.tensors.len());
    r.play(t, &t.events);
    r.stats()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timeline::Step;
    use proptest::prelude::*;

    /// The first port, kept as the reference the indexed pools must agree with: every
    /// block of every segment in a vector, best fit by a linear scan.
    /// A block as (offset, size, free).
    type LinearBlock = (u64, u64, bool);

    #[derive(Default)]
    struct LinearPools {
        /// (small pool?, its blocks in address order).
        segs: Vec<(bool, Vec<LinearBlock>)>,
        reserved: u64,
    }

    impl LinearPools {
        fn alloc(&mut self, size: u64) -> (usize, u64, u64) {
            let small = size <= SMALL;
            let mut fit: Option<(usize, usize, u64)> = None;
            for (si, (_, blocks)) in self.segs.iter().enumerate().filter(|(_, s)| s.0 == small) {
                for (bi, &(_, bsize, free)) in blocks.iter().enumerate() {
                    if free && bsize >= size && fit.is_none_or(|(_, _, fs)| bsize < fs) {
                        fit = Some((si, bi, bsize));
                    }
                }
            }
            let (si, bi) = match fit {
                Some((si, bi, _)) => (si, bi),
                None => {
                    let ss = segment_size(size);
                    self.reserved = self.reserved.saturating_add(ss);
                    self.segs.push((small, vec![(0, ss, true)]));
                    (self.segs.len() - 1, 0)
                }
            };
            let blocks = &mut self.segs[si].1;
            let (off, bsize, _) = blocks[bi];
            let rest = bsize - size;
            let split = if small {
                rest >= MIN_BLOCK
            } else {
                rest > SMALL
            };
            let taken = if split { size } else { bsize };
            blocks[bi] = (off, taken, false);
            if split {
                blocks.insert(bi + 1, (off + size, rest, true));
            }
            (si, off, taken)
        }

        fn free(&mut self, si: usize, off: u64) -> Option<u64> {
            let blocks = &mut self.segs[si].1;
            let bi = blocks.iter().position(|b| b.0 == off)?;
            let held = blocks[bi].1;
            blocks[bi].2 = true;
            if bi + 1 < blocks.len() && blocks[bi + 1].2 {
                let n = blocks.remove(bi + 1);
                blocks[bi].1 += n.1;
            }
            if bi > 0 && blocks[bi - 1].2 {
                let c = blocks.remove(bi);
                blocks[bi - 1].1 += c.1;
            }
            Some(held)
        }
    }

    /// Every segment's blocks in address order, walked along the links, as the linear
    /// scan stores them: (small pool?, [(offset, size, free)]).
    fn tiling(p: &Pools) -> Vec<(bool, Vec<LinearBlock>)> {
        let mut segs = vec![(false, Vec::new()); p.small_seg.len()];
        // A segment's first block (offset 0) is never merged away: only a block with a
        // block before it is.
        for (head, b) in p.blocks.iter().enumerate().filter(|(_, b)| b.off == 0) {
            let mut i = head as u32;
            let seg = &mut segs[b.seg as usize];
            seg.0 = p.small_seg[b.seg as usize];
            while i != NONE {
                let b = p.blocks[i as usize];
                seg.1.push((b.off, b.size, b.free));
                i = b.next;
            }
        }
        segs
    }

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

    /// A fit's candidates in turn (same persistent tensors, then other ones): replayed
    /// from the shared prefix, each gives what a replay from an empty allocator gives.
    #[test]
    fn replays_from_the_shared_prefix_match_replays_afresh() {
        let presets = crate::Presets::builtin().unwrap();
        let mut hits = 0;
        for hardware in ["", "gpus = 2\nsharding = \"zero3\""] {
            for (mb, accum, ck) in [
                (1, 1, "none"),
                (4, 1, "full"),
                (2, 4, "none"),
                (8, 2, "selective"),
            ] {
                let toml = format!(
                    "[model]\npreset = \"smollm2-135m\"\n[train]\nmicro_batch = {mb}\ngrad_accum = {accum}\nseq_len = 512\ncheckpointing = \"{ck}\"\n[hardware]\ngpu = \"h100-80gb\"\n{hardware}\n"
                );
                let spec = crate::RawConfig::from_toml(&toml)
                    .unwrap()
                    .resolve(&presets, &crate::Context::default())
                    .unwrap();
                let t = crate::torch::play(&spec);
                let before = LAST_PREFIX.with(|l| l.borrow().as_ref().map(|p| p.0.clone()));
                let (got, want) = (simulate(&t), simulate_afresh(&t));
                let after = LAST_PREFIX.with(|l| l.borrow().as_ref().map(|p| p.0.clone()));
                hits += usize::from(before.is_some() && before == after);
                assert_eq!(got.peak_allocated, want.peak_allocated, "{toml}");
                assert_eq!(got.peak_reserved, want.peak_reserved, "{toml}");
                assert_eq!(got.by_component, want.by_component, "{toml}");
            }
        }
        // The prefix was reused (accumulation adds persistent gradients, so not always).
        assert!(hits >= 2, "{hits}");
    }

    proptest! {
        /// Every request lands in the same segment at the same offset, takes the same
        /// bytes and reserves the same segments as in the linear scan; a transient (placed
        /// and freed at once) takes the same bytes and leaves the same tiling.
        #[test]
        fn indexed_pools_place_blocks_like_the_linear_scan(
            ops in prop::collection::vec(
                (any::<bool>(), prop::sample::select(vec![1u64, 512, 513, 100_000, MIB, MIB + 1, 3 * MIB, 10 * MIB, 10 * MIB + 7, 45 * MIB]), any::<usize>()),
                1..400,
            ),
        ) {
            let (mut new, mut old) = (Pools::default(), LinearPools::default());
            let mut live = Vec::new();
            for (alloc, bytes, pick) in ops {
                if pick % 5 == 0 {
                    // A transient: placed and freed at once.
                    let size = round_size(bytes);
                    let (si, off, old_taken) = old.alloc(size);
                    prop_assert!(old.free(si, off).is_some());
                    prop_assert_eq!(new.transient(size), old_taken);
                } else if alloc || live.is_empty() {
                    let size = round_size(bytes);
                    let (bi, taken) = new.alloc(size);
                    let b = new.blocks[bi as usize];
                    let (si, off, old_taken) = old.alloc(size);
                    prop_assert_eq!((b.seg as usize, b.off, taken), (si, off, old_taken));
                    live.push((bi, si, off));
                } else {
                    let (bi, si, off) = live.swap_remove(pick % live.len());
                    prop_assert_eq!(Some(new.free(bi)), old.free(si, off));
                }
                prop_assert_eq!(new.reserved, old.reserved);
                prop_assert_eq!(tiling(&new), old.segs.clone());
            }
        }
    }
}
