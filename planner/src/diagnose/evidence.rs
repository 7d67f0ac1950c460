//! The cause of a report, from everything it says: each fact the report states is
//! evidence for one cause with a weight; the cause with the most weight wins, the next
//! one is named too when its evidence is substantial (fragmentation and a huge tensor can
//! both be true), and the margin between them is the confidence.
//!
//! The facts, and the cause each supports:
//! - huge-tensor: the request is ≥ 20 % of the capacity (or more than all of it); a shape
//!   printed with the error that is vocabulary-sized and matches the request (a `(tokens,
//!   vocab)` tensor is logits); a failing code line naming logits or attention when the
//!   request is large;
//! - fragmentation: the cache's reserved-but-unallocated memory holds the request, or
//!   holds it together with the free memory (PyTorch has already released the cache's
//!   unused segments before it reports, so what is left is split by live blocks), or the
//!   device reports the request as free and still refuses it;
//! - other-processes: listed processes other than this one (in a container this one is
//!   listed under another PID: it is the one holding what PyTorch reserved), or memory in
//!   use that PyTorch does not hold, hold ≥ 20 % of the capacity;
//! - does-not-fit: this process's live tensors fill the device while the request is an
//!   ordinary one; the request is more than what is free; the optimizer's step, a ZeRO
//!   all-gather or weight loading failing;
//! - host-oom: the kernel's OOM killer or a SIGKILL;
//! - unknown: an error without sizes (`CUDA error: out of memory`, cuBLAS).
//!
//! The weights were set on the corpus of `tests/data/oom/real` (see docs/diagnose.md), so
//! its accuracy is measured in-sample.

use super::Hint;
use crate::oom::{Cause, HostSignal, OomReport, Source};
use serde::Serialize;

/// A fact of the report, the data a renderer turns into a sentence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Fact {
    RequestShare {
        request_bytes: u64,
        capacity_bytes: u64,
    },
    RequestAboveCapacity {
        request_bytes: u64,
        capacity_bytes: u64,
    },
    /// A printed shape: vocabulary-sized last dimension, and whether its bytes are the request.
    TensorShape {
        shape: String,
        vocab_like: bool,
        matches_request: bool,
    },
    CodeNames {
        hint: Hint,
    },
    CacheHoldsRequest {
        reserved_unallocated_bytes: u64,
        request_bytes: u64,
    },
    CacheAndFreeHoldRequest {
        reserved_unallocated_bytes: u64,
        free_bytes: u64,
        request_bytes: u64,
    },
    FreeButRefused {
        free_bytes: u64,
        request_bytes: u64,
    },
    OtherProcessesHold {
        bytes: u64,
        capacity_bytes: u64,
        processes: usize,
    },
    OutsidePytorch {
        bytes: u64,
        capacity_bytes: u64,
    },
    /// In a container: the listed process that is this one.
    ThisProcessListed {
        pid: u64,
        bytes: u64,
    },
    /// This process's in-use plus free is the capacity: no other process holds memory.
    ThisProcessHoldsDevice {
        in_use_bytes: u64,
        free_bytes: u64,
        capacity_bytes: u64,
    },
    /// Live tensors (or the device's used memory) against the capacity.
    DeviceFull {
        used_bytes: u64,
        capacity_bytes: u64,
    },
    SmallRequest {
        request_bytes: u64,
        capacity_bytes: u64,
    },
    RequestAboveFree {
        request_bytes: u64,
        free_bytes: u64,
    },
    HostKilled {
        how: HostSignal,
    },
    NoSizes {
        source: Source,
    },
}

/// One fact and the cause it supports, with its weight (0: context, no weight).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Evidence {
    pub cause: Cause,
    pub weight: u8,
    pub fact: Fact,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Confidence {
    Low,
    Medium,
    High,
}

/// The cause, the runner-up when its evidence is substantial, and the facts behind them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Assessment {
    pub cause: Cause,
    pub second: Option<Cause>,
    pub confidence: Confidence,
    pub evidence: Vec<Evidence>,
}

/// The cache's unallocated part counts as fragmentation evidence only when it is more
/// than noise: at least this much and 1 % of the capacity.
const CACHE_FLOOR: u64 = 128 << 20;

/// Weighs everything the report says.
pub fn assess(r: &OomReport) -> Assessment {
    let hint = Hint::from_report(r);
    let mut ev = Vec::new();
    match r.source {
        Source::Host => {
            let how = r.host.as_ref().map_or(HostSignal::Sigkill, |h| h.how);
            let w = if how == HostSignal::OomKiller { 6 } else { 4 };
            push(&mut ev, Cause::HostOom, w, Fact::HostKilled { how });
        }
        Source::CudaError | Source::Cublas => {
            push(
                &mut ev,
                Cause::Unknown,
                1,
                Fact::NoSizes { source: r.source },
            );
        }
        Source::Cudarc => {
            // candle has no caching allocator: nothing to fragment, and no process list.
            push(
                &mut ev,
                Cause::DoesNotFit,
                1,
                Fact::NoSizes { source: r.source },
            );
        }
        _ => sized(r, &mut ev),
    }
    if let Some(h) = hint {
        let share = share_of(r.request_bytes, r.capacity_bytes);
        match h {
            Hint::Logits | Hint::Attention if share >= 0.20 => {
                push(&mut ev, Cause::HugeTensor, 2, Fact::CodeNames { hint: h })
            }
            Hint::OptimizerState | Hint::AllGather | Hint::Loading if r.source.has_sizes() => {
                push(&mut ev, Cause::DoesNotFit, 1, Fact::CodeNames { hint: h })
            }
            _ => push(&mut ev, Cause::Unknown, 0, Fact::CodeNames { hint: h }),
        }
    }
    decide(r, ev)
}

fn push(ev: &mut Vec<Evidence>, cause: Cause, weight: u8, fact: Fact) {
    ev.push(Evidence {
        cause,
        weight,
        fact,
    });
}

fn share_of(part: Option<u64>, whole: Option<u64>) -> f64 {
    match (part, whole) {
        (Some(p), Some(w)) if w > 0 => p as f64 / w as f64,
        _ => 0.0,
    }
}

/// Facts of a report with sizes.
fn sized(r: &OomReport, ev: &mut Vec<Evidence>) {
    let req = r.request_bytes.filter(|&b| b > 0);
    let cap = r.capacity_bytes.filter(|&b| b > 0);
    let share = share_of(req, cap);
    if let (Some(q), Some(c)) = (req, cap) {
        if q > c {
            let f = Fact::RequestAboveCapacity {
                request_bytes: q,
                capacity_bytes: c,
            };
            push(ev, Cause::HugeTensor, 6, f);
        } else if share >= 0.20 {
            let w = if share >= 0.5 { 4 } else { 3 };
            let f = Fact::RequestShare {
                request_bytes: q,
                capacity_bytes: c,
            };
            push(ev, Cause::HugeTensor, w, f);
        }
    }
    shape(r, req, ev);
    fragmentation(r, req, cap, ev);
    processes(r, cap, ev);
    fullness(r, req, cap, share, ev);
}

fn shape(r: &OomReport, req: Option<u64>, ev: &mut Vec<Evidence>) {
    let Some(s) = &r.shape else { return };
    let matches_request = req.is_some_and(|q| {
        let close = |b: u64| b.abs_diff(q) <= q / 100 * 3 + 1;
        match s.bytes() {
            Some(b) => close(b),
            // No dtype printed: some element width makes it the request.
            None => s
                .dims
                .iter()
                .try_fold(1u64, |acc, d| acc.checked_mul((*d)?))
                .is_some_and(|n| [1, 2, 4, 8].iter().any(|w| close(n.saturating_mul(*w)))),
        }
    });
    let vocab_like = s.vocab_like();
    let w = match (vocab_like, matches_request) {
        (true, true) => 5,
        (true, false) => 2,
        _ => 0,
    };
    let f = Fact::TensorShape {
        shape: s.describe(),
        vocab_like,
        matches_request,
    };
    push(ev, Cause::HugeTensor, w, f);
}

fn fragmentation(r: &OomReport, req: Option<u64>, cap: Option<u64>, ev: &mut Vec<Evidence>) {
    let Some(q) = req else { return };
    if let Some(f) = r.free_bytes.filter(|&f| f >= q) {
        let fact = Fact::FreeButRefused {
            free_bytes: f,
            request_bytes: q,
        };
        return push(ev, Cause::Fragmentation, 4, fact);
    }
    let Some(ru) = r.reserved_unallocated_bytes else {
        return;
    };
    if ru < CACHE_FLOOR || cap.is_some_and(|c| ru < c / 100) {
        return;
    }
    if ru >= q {
        let w = if cap.is_some_and(|c| ru >= c / 4) {
            6
        } else {
            5
        };
        let fact = Fact::CacheHoldsRequest {
            reserved_unallocated_bytes: ru,
            request_bytes: q,
        };
        push(ev, Cause::Fragmentation, w, fact);
    } else if let Some(f) = r.free_bytes.filter(|&f| f.saturating_add(ru) >= q) {
        let fact = Fact::CacheAndFreeHoldRequest {
            reserved_unallocated_bytes: ru,
            free_bytes: f,
            request_bytes: q,
        };
        push(ev, Cause::Fragmentation, 5, fact);
    }
}

fn processes(r: &OomReport, cap: Option<u64>, ev: &mut Vec<Evidence>) {
    if let (Some(pid), Some(bytes)) = (r.self_pid, r.process_in_use_bytes) {
        push(
            ev,
            Cause::OtherProcesses,
            0,
            Fact::ThisProcessListed { pid, bytes },
        );
    }
    let Some(c) = cap else { return };
    let others = r.other_processes_bytes.unwrap_or(0);
    if others >= c / 5 && others > 0 {
        let w = if others >= c / 10 * 4 { 6 } else { 5 };
        let fact = Fact::OtherProcessesHold {
            bytes: others,
            capacity_bytes: c,
            processes: r
                .processes
                .len()
                .saturating_sub(usize::from(r.self_pid.is_some())),
        };
        return push(ev, Cause::OtherProcesses, w, fact);
    }
    if let (Some(p), Some(f)) = (r.process_in_use_bytes, r.free_bytes) {
        if r.processes.is_empty() && p.saturating_add(f).abs_diff(c) <= c / 50 {
            let fact = Fact::ThisProcessHoldsDevice {
                in_use_bytes: p,
                free_bytes: f,
                capacity_bytes: c,
            };
            push(ev, Cause::DoesNotFit, 0, fact);
        }
    }
    if let Some(o) = r.outside_pytorch_bytes() {
        if o >= (c / 4).max(1 << 30) {
            let w = if o >= c / 2 { 6 } else { 5 };
            push(
                ev,
                Cause::OtherProcesses,
                w,
                Fact::OutsidePytorch {
                    bytes: o,
                    capacity_bytes: c,
                },
            );
        }
    }
}

/// This process's live tensors against the capacity, for an ordinary request.
fn fullness(r: &OomReport, req: Option<u64>, cap: Option<u64>, share: f64, ev: &mut Vec<Evidence>) {
    let Some(c) = cap else { return };
    let live = r
        .allocated_bytes
        .or_else(|| {
            r.process_in_use_bytes
                .map(|p| p.saturating_sub(r.reserved_unallocated_bytes.unwrap_or(0)))
        })
        .or_else(|| {
            let quiet = r.processes.is_empty() && r.outside_pytorch_bytes().is_none();
            r.free_bytes.filter(|_| quiet).map(|f| c.saturating_sub(f))
        });
    if let Some(u) = live {
        let fill = u as f64 / c as f64;
        let w = match fill {
            x if x > 1.0 => 5,
            x if share < 0.20 && x >= 0.90 => 3,
            x if share < 0.20 && x >= 0.75 => 2,
            _ => 0,
        };
        let f = Fact::DeviceFull {
            used_bytes: u,
            capacity_bytes: c,
        };
        push(ev, Cause::DoesNotFit, w, f);
    }
    if let Some(q) = req {
        if share < 0.10 {
            let f = Fact::SmallRequest {
                request_bytes: q,
                capacity_bytes: c,
            };
            push(ev, Cause::DoesNotFit, 1, f);
        }
        if let Some(f) = r.free_bytes.filter(|&f| f < q) {
            let fact = Fact::RequestAboveFree {
                request_bytes: q,
                free_bytes: f,
            };
            push(ev, Cause::DoesNotFit, 1, fact);
        }
    }
}

/// Ties go to the earlier cause: a huge tensor or another process explain the rest; between
/// a full device and fragmentation, the change to the run comes first and the allocator
/// setting (cheap to try) second.
const TIE_ORDER: [Cause; 6] = [
    Cause::HugeTensor,
    Cause::OtherProcesses,
    Cause::DoesNotFit,
    Cause::Fragmentation,
    Cause::HostOom,
    Cause::Unknown,
];

/// Sums the weights per cause and ranks the causes.
fn decide(r: &OomReport, ev: Vec<Evidence>) -> Assessment {
    let score = |c: Cause| -> u32 {
        ev.iter()
            .filter(|e| e.cause == c)
            .map(|e| u32::from(e.weight))
            .sum()
    };
    let mut ranked: Vec<(Cause, u32)> = TIE_ORDER.iter().map(|&c| (c, score(c))).collect();
    ranked.sort_by_key(|&(_, s)| std::cmp::Reverse(s));
    let (mut cause, top) = ranked[0];
    if top == 0 {
        cause = if r.source.has_sizes() {
            Cause::DoesNotFit
        } else {
            Cause::Unknown
        };
    }
    let (next, runner) = ranked[1];
    let second = (runner >= 3 && runner * 2 >= top).then_some(next);
    let margin = top - runner;
    let confidence = if top >= 5 && margin >= 3 {
        Confidence::High
    } else if top >= 3 && margin >= 1 {
        Confidence::Medium
    } else {
        Confidence::Low
    };
    Assessment {
        cause,
        second,
        confidence,
        evidence: ev,
    }
}
