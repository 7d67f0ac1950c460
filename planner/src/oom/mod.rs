//! Out-of-memory reports read from training logs, and matched to a tensor of the planned
//! step.
//!
//! Understands PyTorch's caching allocator in each of its wordings (1.x, 2.x, ROCm's HIP,
//! XPU, MPS, a reporter's condensed one: see [`message`]), errors without sizes (`CUDA
//! error: out of memory`, `torch.AcceleratorError`, cuBLAS's `CUBLAS_STATUS_ALLOC_FAILED`,
//! candle/cudarc's `CUDA_ERROR_OUT_OF_MEMORY`), the host's OOM killer (see [`host`]) and
//! the shapes printed near the error (see [`shape`]). The scan is line by line with plain
//! `str` searches, so it is linear in the log and never panics.

mod host;
mod message;
mod shape;

pub use host::{HostKill, HostSignal};
pub use shape::PrintedShape;

use crate::timeline::{Component, Name, Timeline};
use serde::Serialize;
use std::collections::HashMap;

/// What printed the report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// PyTorch's CUDA caching allocator: `CUDA out of memory. Tried to allocate …`.
    #[default]
    PytorchCuda,
    /// The same allocator on ROCm: `HIP out of memory`.
    PytorchHip,
    /// Intel GPUs: `XPU out of memory`.
    PytorchXpu,
    /// Apple GPUs: `MPS backend out of memory`.
    Mps,
    /// The CUDA runtime outside the caching allocator: `CUDA error: out of memory`
    /// (`RuntimeError`, or `torch.AcceleratorError` since PyTorch 2.8). No sizes.
    CudaError,
    /// cuBLAS could not allocate its handle or workspace: `CUBLAS_STATUS_ALLOC_FAILED`.
    Cublas,
    /// candle/cudarc's `DriverError(CUDA_ERROR_OUT_OF_MEMORY, …)`. No sizes.
    Cudarc,
    /// The host: the kernel's OOM killer or a SIGKILL.
    Host,
}

impl Source {
    /// Whether this kind of report ever prints sizes.
    pub fn has_sizes(self) -> bool {
        matches!(
            self,
            Source::PytorchCuda | Source::PytorchHip | Source::PytorchXpu | Source::Mps
        )
    }
}

/// A process the allocator lists: `Process 1734 has 41.20 GiB memory in use`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ProcessUse {
    pub pid: u64,
    pub bytes: u64,
}

/// One out-of-memory report found in a log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct OomReport {
    /// 1-based line of the log where the report starts.
    pub line: usize,
    pub request_bytes: Option<u64>,
    /// The device's capacity (MPS: the allocator's limit, "max allowed").
    pub capacity_bytes: Option<u64>,
    pub free_bytes: Option<u64>,
    /// Allocated by PyTorch (live tensors).
    pub allocated_bytes: Option<u64>,
    /// PyTorch 1.x: "reserved in total by PyTorch".
    pub reserved_bytes: Option<u64>,
    /// Reserved by the caching allocator but not allocated (2.x, or 1.x reserved − allocated).
    pub reserved_unallocated_bytes: Option<u64>,
    /// PyTorch 2.x: "this process has P memory in use" (including non-PyTorch memory).
    pub process_in_use_bytes: Option<u64>,
    /// Memory held by other processes on the same GPU.
    pub other_processes_bytes: Option<u64>,
    pub gpu: Option<u32>,
    pub rank: Option<u32>,
    /// The last frame before the error: `File "...", line N, in F`.
    pub frame: Option<String>,
    /// The code line of that frame, e.g. `logits = logits.float()`.
    pub code_line: Option<String>,
    /// True for candle/cudarc's `CUDA_ERROR_OUT_OF_MEMORY`.
    pub driver_error: bool,
    /// What printed the report.
    pub source: Source,
    /// The processes the allocator lists with their memory.
    pub processes: Vec<ProcessUse>,
    /// The listed process that is this one (in a container the process sees itself under
    /// another PID, and PyTorch lists it like any other).
    pub self_pid: Option<u64>,
    /// MPS: memory of this process outside the MPS allocator ("other allocations").
    pub other_allocations_bytes: Option<u64>,
    /// A shape printed in the traceback or next to the error.
    pub shape: Option<PrintedShape>,
    /// The host kill, for `source = host`.
    pub host: Option<HostKill>,
}

impl OomReport {
    /// Allocated plus cached: all this process's PyTorch holds.
    pub fn reserved_total(&self) -> Option<u64> {
        match (self.allocated_bytes, self.reserved_unallocated_bytes) {
            (Some(a), Some(u)) => Some(a.saturating_add(u)),
            _ => self.reserved_bytes,
        }
    }

    /// Memory in use on the device that this process's PyTorch does not hold, when the
    /// report says nothing about processes (1.x, ROCm): the CUDA context, other libraries,
    /// other processes.
    pub fn outside_pytorch_bytes(&self) -> Option<u64> {
        if self.process_in_use_bytes.is_some() || !self.processes.is_empty() {
            return None;
        }
        let used = self.capacity_bytes?.checked_sub(self.free_bytes?)?;
        Some(used.saturating_sub(self.reserved_total()?))
    }

    /// The sizes a renderer can show: none for errors that print none.
    pub fn has_sizes(&self) -> bool {
        self.request_bytes.is_some() || self.capacity_bytes.is_some()
    }
}

/// Why the allocation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cause {
    /// One request is a large share of the GPU.
    HugeTensor,
    /// The caching allocator holds enough memory, but not in one piece.
    Fragmentation,
    /// Other processes hold a large share of the GPU.
    OtherProcesses,
    /// Many ordinary tensors together exceed the GPU.
    DoesNotFit,
    /// The host ran out of memory: the kernel killed the process.
    HostOom,
    /// The report prints no sizes and nothing else tells the cause.
    Unknown,
}

impl Cause {
    /// Every cause, in the order reports list them.
    pub const ALL: [Cause; 6] = [
        Cause::HugeTensor,
        Cause::Fragmentation,
        Cause::OtherProcesses,
        Cause::DoesNotFit,
        Cause::HostOom,
        Cause::Unknown,
    ];

    /// Reads a name as [`Cause::name`] writes it.
    pub fn from_name(s: &str) -> Option<Cause> {
        Cause::ALL.into_iter().find(|c| c.name() == s)
    }
}

impl Cause {
    pub fn name(self) -> &'static str {
        match self {
            Cause::HugeTensor => "huge-tensor",
            Cause::Fragmentation => "fragmentation",
            Cause::OtherProcesses => "other-processes",
            Cause::DoesNotFit => "does-not-fit",
            Cause::HostOom => "host-oom",
            Cause::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The cause the report's evidence points to (see [`crate::diagnose::assess`]).
pub fn classify(r: &OomReport) -> Cause {
    crate::diagnose::assess(r).cause
}

/// A tensor of the planned step that matches the failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Match {
    pub name: String,
    pub component: Component,
    pub phase: String,
    pub bytes: u64,
    /// Its shape and dtype, e.g. `[20, 3072, 65536] f32`, where the inventory knows them.
    pub layout: Option<String>,
}

/// The timeline tensor whose size is closest to the request, within 3 % (PyTorch prints
/// sizes rounded to two decimals of the unit). Logits and activations are preferred,
/// then names that share a word with the failing code line (`float`, `softmax`, ...).
pub fn match_tensor(report: &OomReport, timeline: &Timeline) -> Option<Match> {
    let req = report.request_bytes.filter(|&b| b > 0)?;
    let tol = req / 100 * 3 + 1;
    let code = report
        .code_line
        .as_deref()
        .unwrap_or("")
        .to_ascii_lowercase();
    let hinted = |name: &str| {
        let n = name.to_ascii_lowercase();
        [
            ("float", "float"),
            ("float", "fp32"),
            ("softmax", "softmax"),
            ("attention", "attention"),
        ]
        .iter()
        .any(|(c, w)| code.contains(c) && n.contains(w))
    };
    let best = timeline
        .tensors
        .iter()
        .enumerate()
        .filter(|(_, t)| t.bytes.0.abs_diff(req) <= tol)
        .min_by_key(|(i, t)| {
            let preferred = matches!(t.component, Component::Logits | Component::Activations);
            (
                !preferred,
                !hinted(&t.name.text()),
                t.bytes.0.abs_diff(req),
                *i,
            )
        })?
        .1;
    Some(Match {
        name: best.name.to_string(),
        component: best.component,
        phase: timeline
            .phases
            .get(best.phase)
            .map(Name::to_string)
            .unwrap_or_default(),
        bytes: best.bytes.0,
        layout: best.describe(),
    })
}

/// Lines after a report that may still belong to it: a shape printed below the error.
const TRAILER_LINES: usize = 12;
/// Host-kill lines this close to the previous one describe the same kill.
const HOST_EPISODE_LINES: usize = 60;

/// The scan's state: the last frame and shape seen per rank prefix, and the reports.
#[derive(Default)]
struct Scan {
    frames: HashMap<Option<u32>, (Option<String>, Option<String>)>,
    shapes: HashMap<Option<u32>, PrintedShape>,
    out: Vec<OomReport>,
    /// Index in `out` and end line of the last host report.
    last_host: Option<(usize, usize)>,
}

/// Every out-of-memory report in a log, in order.
pub fn parse_log(text: &str) -> Vec<OomReport> {
    let lines: Vec<&str> = text.lines().collect();
    let mut st = Scan::default();
    let mut i = 0;
    while i < lines.len() {
        let (rank, body) = strip_prefix(lines[i]);
        let t = body.trim();
        if t.starts_with("Traceback (most recent call last)") {
            st.frames.remove(&rank);
            st.shapes.remove(&rank);
        } else if t.starts_with("File \"") && t.contains(", line ") {
            let code = code_after(&lines[i + 1..], rank);
            if let Some(s) = code.as_deref().and_then(shape::find) {
                st.shapes.insert(rank, s);
            }
            st.frames.insert(rank, (Some(clip(t, 300)), code));
        } else if let Some(src) = source_of(t) {
            i = st.gpu_report(&lines, i, rank, t, src);
            continue;
        } else if let Some(h) = host::line(t) {
            st.host_report(i, rank, h);
        } else if let Some(s) = shape::find(t) {
            st.shape_line(i, rank, s);
        }
        i += 1;
    }
    st.out
}

/// The code line of a frame: the next line of the same rank (ranks interleave).
fn code_after(next: &[&str], rank: Option<u32>) -> Option<String> {
    next.iter()
        .take(8)
        .map(|l| strip_prefix(l))
        .find(|(r, _)| *r == rank)
        .map(|(_, c)| c.trim())
        .filter(|c| !c.is_empty() && source_of(c).is_none() && !c.starts_with("File \""))
        .map(|c| clip(c, 300))
}

impl Scan {
    /// Reads the report starting at line `i` (joined with its continuation lines) and
    /// returns the line after it.
    fn gpu_report(
        &mut self,
        lines: &[&str],
        i: usize,
        rank: Option<u32>,
        t: &str,
        src: Source,
    ) -> usize {
        let mut joined = t.to_string();
        let mut j = i + 1;
        // A message with sizes may wrap; one without has nothing to continue.
        let last = if src.has_sizes() { i + 4 } else { i };
        while j < lines.len() && j <= last {
            let (r, b) = strip_prefix(lines[j]);
            let b = b.trim();
            if r != rank
                || b.is_empty()
                || source_of(b).is_some()
                || host::line(b).is_some()
                || b.starts_with("Traceback")
                || b.starts_with("File \"")
            {
                break;
            }
            joined.push(' ');
            joined.push_str(b);
            j += 1;
        }
        let mut r = message::parse(&joined, src);
        r.line = i + 1;
        r.rank = rank.or(r.gpu);
        if let Some((f, c)) = self.frames.remove(&rank) {
            r.frame = f;
            r.code_line = c;
        }
        r.shape = self.shapes.remove(&rank);
        if !self.repeats(&r) {
            self.out.push(r);
        }
        j
    }

    /// The same failure printed again (a logger echoing the exception, a re-raise).
    fn repeats(&self, r: &OomReport) -> bool {
        self.out.last().is_some_and(|p| {
            let same = OomReport {
                line: p.line,
                frame: p.frame.clone(),
                code_line: p.code_line.clone(),
                shape: p.shape.clone(),
                ..r.clone()
            };
            r.line <= p.line + 50 && same == *p
        })
    }

    fn host_report(&mut self, i: usize, rank: Option<u32>, mut h: HostKill) {
        h.rank = h.rank.or(rank);
        if let Some((k, end)) = self.last_host {
            if i <= end + HOST_EPISODE_LINES {
                if let Some(prev) = self.out.get_mut(k).and_then(|r| r.host.as_mut()) {
                    prev.merge(h);
                    self.last_host = Some((k, i));
                    return;
                }
            }
        }
        let r = OomReport {
            line: i + 1,
            rank: h.rank,
            source: Source::Host,
            host: Some(h),
            ..OomReport::default()
        };
        self.last_host = Some((self.out.len(), i));
        self.out.push(r);
    }

    /// A shape below the error belongs to it; above, to the next one of the rank.
    fn shape_line(&mut self, i: usize, rank: Option<u32>, s: PrintedShape) {
        if let Some(last) = self.out.last_mut() {
            let near = i < last.line + TRAILER_LINES;
            if near
                && last.rank == rank.or(last.rank)
                && last.shape.is_none()
                && last.source.has_sizes()
            {
                last.shape = Some(s);
                return;
            }
        }
        self.shapes.insert(rank, s);
    }
}

fn clip(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// An error line, not a mere mention: PyTorch's message carries an exception name or the
/// request; the others carry their error code.
fn source_of(s: &str) -> Option<Source> {
    if s.contains("CUDA_ERROR_OUT_OF_MEMORY") {
        return Some(Source::Cudarc);
    }
    if s.contains("MPS backend out of memory") {
        return Some(Source::Mps);
    }
    let error = s.contains("Error") || s.contains("Tried to allocate");
    for (what, src) in [
        ("CUDA out of memory", Source::PytorchCuda),
        ("HIP out of memory", Source::PytorchHip),
        ("XPU out of memory", Source::PytorchXpu),
    ] {
        if s.contains(what) && error {
            return Some(src);
        }
    }
    if s.contains("CUDA error: out of memory") || s.contains("CUDA error:out of memory") {
        return Some(Source::CudaError);
    }
    if s.contains("CUBLAS_STATUS_ALLOC_FAILED") {
        return Some(Source::Cublas);
    }
    None
}

/// Splits `[rank1]: ` / `[default0]:` / `rank4]: ` / a DeepSpeed `host: ` prefix off a line.
fn strip_prefix(line: &str) -> (Option<u32>, &str) {
    let t = line.trim_start();
    let inner_rest = t
        .strip_prefix('[')
        .or_else(|| t.starts_with("rank").then_some(t));
    if let Some(rest) = inner_rest {
        if let Some(end) = rest.find(']') {
            let inner = &rest[..end];
            let digits = inner
                .strip_prefix("rank")
                .or_else(|| inner.strip_prefix("default"));
            if let Some(d) = digits {
                if let Ok(n) = d.parse::<u32>() {
                    let after = &rest[end + 1..];
                    let after = after.strip_prefix(':').unwrap_or(after);
                    return (Some(n), after.strip_prefix(' ').unwrap_or(after));
                }
            }
        }
    }
    (None, host_prefix(line))
}

/// DeepSpeed's multi-node launcher prefixes each line with `hostname: `.
fn host_prefix(line: &str) -> &str {
    let Some(p) = line.find(": ") else {
        return line;
    };
    let host = &line[..p];
    let plain = !host.is_empty()
        && host.len() <= 64
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        && host.bytes().any(|b| b == b'-')
        && !host.bytes().all(|b| b.is_ascii_digit() || b == b'-');
    if plain {
        &line[p + 2..]
    } else {
        line
    }
}
/// Bytes in a unit: binary for KiB/MiB/GiB/TiB, decimal for KB/MB/GB/TB.
fn unit_bytes(u: &str) -> Option<u128> {
    Some(match u {
        "B" | "bytes" | "byte" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return None,
    })
}

/// Parses "15.00 GiB" (exactly, in integers: bytes rounded to the nearest one) at the
/// start of `s`, saturating at `u64::MAX`.
pub fn parse_amount(s: &str) -> Option<u64> {
    let s = s.trim_start();
    let int_len = s
        .bytes()
        .take_while(|b| b.is_ascii_digit() || *b == b',')
        .count();
    let int_part = &s[..int_len];
    let mut rest = &s[int_len..];
    let mut frac = "";
    if let Some(r) = rest.strip_prefix('.') {
        let n = r.bytes().take_while(u8::is_ascii_digit).count();
        frac = &r[..n];
        rest = &r[n..];
    }
    if !int_part.bytes().any(|b| b.is_ascii_digit()) && frac.is_empty() {
        return None;
    }
    let rest = rest.trim_start();
    let ulen = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
    let unit = unit_bytes(&rest[..ulen])?;
    let mut int: u128 = 0;
    for b in int_part.bytes().filter(u8::is_ascii_digit) {
        int = int.saturating_mul(10).saturating_add(u128::from(b - b'0'));
    }
    let frac = &frac[..frac.len().min(12)];
    let mut f: u128 = 0;
    let mut denom: u128 = 1;
    for b in frac.bytes() {
        f = f * 10 + u128::from(b - b'0');
        denom *= 10;
    }
    let total = int
        .saturating_mul(unit)
        .saturating_add((f * unit + denom / 2) / denom);
    Some(u64::try_from(total).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::{Bytes, GIB, MIB};
    use proptest::prelude::*;

    const V1: &str = "Traceback (most recent call last):\n  File \"train.py\", line 88, in <module>\n    loss = model(x, y)\n  File \"gpt.py\", line 301, in forward\n    logits = logits.float()\nRuntimeError: CUDA out of memory. Tried to allocate 15.00 GiB (GPU 0; 31.84 GiB total capacity; 12.10 GiB already allocated; 3.20 GiB free; 14.00 GiB reserved in total by PyTorch) If reserved memory is >> allocated memory try setting max_split_size_mb to avoid fragmentation.";

    // Reference: the message format of PyTorch 2.4's c10/cuda/CUDACachingAllocator.cpp.
    const V2: &str = "[rank1]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 15.00 GiB. GPU 1 has a total capacity of 31.36 GiB of which 2.93 GiB is free. Process 4242 has 1.00 GiB memory in use. Including non-PyTorch memory, this process has 27.42 GiB memory in use. Of the allocated memory 26.50 GiB is allocated by PyTorch, and 412.00 MiB is reserved by PyTorch but unallocated. If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.";

    #[test]
    fn reads_pytorch_1() {
        let r = &parse_log(V1)[0];
        assert_eq!(r.request_bytes, Some(15 * GIB));
        assert_eq!(r.allocated_bytes, Some(parse_amount("12.10 GiB").unwrap()));
        assert_eq!(r.free_bytes, Some(parse_amount("3.20 GiB").unwrap()));
        assert_eq!(r.reserved_bytes, Some(14 * GIB));
        assert_eq!(r.gpu, Some(0));
        assert_eq!(r.code_line.as_deref(), Some("logits = logits.float()"));
        assert_eq!(classify(r), Cause::HugeTensor);
    }

    #[test]
    fn reads_pytorch_2_with_rank() {
        let v = parse_log(V2);
        assert_eq!(v.len(), 1);
        let r = &v[0];
        assert_eq!(r.rank, Some(1));
        assert_eq!(r.reserved_unallocated_bytes, Some(412 * MIB));
        assert_eq!(
            r.process_in_use_bytes,
            Some(parse_amount("27.42 GiB").unwrap())
        );
        assert_eq!(r.other_processes_bytes, Some(GIB));
        assert_eq!(classify(r), Cause::HugeTensor);
    }

    #[test]
    fn reads_candle() {
        let r = &parse_log("Error: DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")")[0];
        assert!(r.driver_error);
        assert!(parse_log("WARNING: CUDA out of memory handling is off").is_empty());
        assert_eq!(classify(r), Cause::DoesNotFit);
    }

    #[test]
    fn units() {
        for (s, b) in [
            ("1 KB", 1000),
            ("2 KiB", 2048),
            ("1.5 MiB", 3 * MIB / 2),
            ("20 bytes", 20),
            ("1,024 B", 1024),
            ("3 GB", 3_000_000_000),
        ] {
            assert_eq!(parse_amount(s), Some(b), "{s}");
        }
        assert_eq!(parse_amount("GiB"), None);
        assert_eq!(parse_amount("99999999999999999999999 TiB"), Some(u64::MAX));
    }

    #[test]
    fn classify_table() {
        let base = OomReport {
            request_bytes: Some(GIB),
            capacity_bytes: Some(40 * GIB),
            free_bytes: Some(GIB / 2),
            ..OomReport::default()
        };
        // The cache holds 30 % of the device: more than the request, but not in one piece.
        let frag = OomReport {
            reserved_unallocated_bytes: Some(12 * GIB),
            ..base.clone()
        };
        let other = OomReport {
            other_processes_bytes: Some(10 * GIB),
            ..base.clone()
        };
        let huge = OomReport {
            request_bytes: Some(12 * GIB),
            ..base.clone()
        };
        assert_eq!(classify(&frag), Cause::Fragmentation);
        assert_eq!(classify(&other), Cause::OtherProcesses);
        assert_eq!(classify(&huge), Cause::HugeTensor);
        assert_eq!(classify(&base), Cause::DoesNotFit);
    }

    #[test]
    fn matches_the_closest_logits_tensor() {
        let mut s = crate::timeline::Step::new();
        s.persistent("wte", Component::Weights, Bytes(15 * GIB));
        s.phase("loss");
        s.alloc("logits", Component::Logits, Bytes(15 * GIB / 2));
        s.alloc("log_softmax", Component::Logits, Bytes(15 * GIB));
        s.alloc(
            "logits.float() (fp32 copy)",
            Component::Logits,
            Bytes(15 * GIB),
        );
        let t = s.finish();
        let mut r = parse_log(V1)[0].clone();
        let m = match_tensor(&r, &t).unwrap();
        assert_eq!(m.name, "logits.float() (fp32 copy)");
        assert_eq!(m.phase, "loss");
        r.code_line = None;
        assert_eq!(match_tensor(&r, &t).unwrap().name, "log_softmax");
        r.request_bytes = Some(14 * GIB);
        assert_eq!(match_tensor(&r, &t), None);
    }

    /// Regression: a kill right after a sizeless error was read as its continuation.
    #[test]
    fn a_kill_after_a_sizeless_error_is_its_own_report() {
        let log = "RuntimeError: CUDA error: out of memory\nstep 5 | loss 2.31\n[5.49] Out of memory: Killed process 1005 (python3) total-vm:1kB, anon-rss:2kB\n";
        let v = parse_log(log);
        assert_eq!(v.len(), 2);
        assert_eq!(
            (v[0].source, v[1].source),
            (Source::CudaError, Source::Host)
        );
        assert_eq!(
            v[1].host.as_ref().and_then(|h| h.anon_rss_bytes),
            Some(2048)
        );
    }

    #[test]
    fn interleaved_ranks_and_big_logs() {
        let log = "[rank1]:   File \"a.py\", line 1, in f\n[rank0]:   File \"b.py\", line 2, in g\n[rank1]:     x = y.float()\n[rank0]:     z = w\n[rank0]: RuntimeError: CUDA out of memory. Tried to allocate 1.00 GiB\n";
        let v = parse_log(log);
        assert_eq!(v[0].rank, Some(0));
        assert_eq!(v[0].code_line.as_deref(), Some("z = w"));
        let big = "step 1 | loss 2.0 | Tried to allocate nothing (GPU 7;\n".repeat(200_000) + V1;
        assert_eq!(parse_log(&big).len(), 1);
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC*") {
            let _ = parse_log(&s);
        }

        /// Any amounts in any wording: parsed and diagnosed without a panic.
        #[test]
        fn diagnosing_any_amounts_never_panics(v in proptest::collection::vec(any::<u64>(), 8), k in 0usize..6) {
            let a = |i: usize| format!("{} B", v[i]);
            let msgs = [
                format!("CUDA out of memory. Tried to allocate {}. GPU 0 has a total capacity of {} of which {} is free. Process 7 has {} memory in use. Process 8 has {} memory in use. Of the allocated memory {} is allocated by PyTorch, and {} is reserved by PyTorch but unallocated.", a(0), a(1), a(2), a(3), a(4), a(5), a(6)),
                format!("RuntimeError: CUDA out of memory. Tried to allocate {} (GPU 0; {} total capacity; {} already allocated; {} free; {} cached)", a(0), a(1), a(2), a(3), a(4)),
                format!("MPS backend out of memory (MPS allocated: {}, other allocations: {}, max allowed: {}). Tried to allocate {} on private pool.", a(0), a(1), a(2), a(3)),
                format!("GPU has {} total, {} free, {} in use by this process. torch.OutOfMemoryError: CUDA out of memory. Tried to allocate {}", a(0), a(1), a(2), a(3)),
                format!("Out of memory: Killed process {} (python3) anon-rss:{}kB", v[0], v[1]),
                format!("buf = empty_strided_cuda(({}, {}), (1, 1), torch.float32)\nRuntimeError: CUDA out of memory. Tried to allocate {}", v[0], v[1], a(2)),
            ];
            for r in parse_log(&msgs[k]) {
                let _ = crate::diagnose::diagnose(r, None);
            }
        }

        #[test]
        fn pytorch_2_round_trips(req in 0u64..100_000, cap in 0u64..100_000, free in 0u64..100_000,
                                 used in 0u64..100_000, alloc in 0u64..100_000, ru in 0u64..100_000,
                                 gpu in 0u32..64) {
            let f = |c: u64| format!("{}.{:02} GiB", c / 100, c % 100);
            let b = |c: u64| parse_amount(&f(c)).unwrap();
            let msg = format!("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate {}. GPU {gpu} has a total capacity of {} of which {} is free. Including non-PyTorch memory, this process has {} memory in use. Of the allocated memory {} is allocated by PyTorch, and {} is reserved by PyTorch but unallocated.", f(req), f(cap), f(free), f(used), f(alloc), f(ru));
            let v = parse_log(&msg);
            prop_assert_eq!(v.len(), 1);
            let r = &v[0];
            prop_assert_eq!(r.request_bytes, Some(b(req)));
            prop_assert_eq!(r.capacity_bytes, Some(b(cap)));
            prop_assert_eq!(r.free_bytes, Some(b(free)));
            prop_assert_eq!(r.process_in_use_bytes, Some(b(used)));
            prop_assert_eq!(r.allocated_bytes, Some(b(alloc)));
            prop_assert_eq!(r.reserved_unallocated_bytes, Some(b(ru)));
            prop_assert_eq!(r.gpu, Some(gpu));
            prop_assert_eq!(b(req), (req * GIB + 50) / 100);
        }
    }
}
