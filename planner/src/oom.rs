//! CUDA out-of-memory reports read from training logs, classified, and matched to a
//! tensor of the planned step.
//!
//! Understands PyTorch 1.x ("Tried to allocate X (GPU 0; C total capacity; A already
//! allocated; F free; R reserved in total by PyTorch)"), PyTorch 2.x ("GPU 0 has a total
//! capacity of C of which F is free. ... this process has P memory in use. Of the
//! allocated memory A is allocated by PyTorch, and U is reserved by PyTorch but
//! unallocated.") and candle/cudarc (`CUDA_ERROR_OUT_OF_MEMORY`, no numbers). The scan is
//! line by line with plain `str` searches, so it is linear in the log and never panics.

use crate::timeline::{Component, Name, Timeline};
use serde::Serialize;
use std::collections::HashMap;

/// One out-of-memory report found in a log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct OomReport {
    /// 1-based line of the log where the report starts.
    pub line: usize,
    pub request_bytes: Option<u64>,
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
}

impl Cause {
    pub fn name(self) -> &'static str {
        match self {
            Cause::HugeTensor => "huge-tensor",
            Cause::Fragmentation => "fragmentation",
            Cause::OtherProcesses => "other-processes",
            Cause::DoesNotFit => "does-not-fit",
        }
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Classifies a report, checking in this order:
/// - fragmentation: reserved-but-unallocated ≥ the request, or ≥ 25 % of capacity and more
///   than the free memory (the allocator holds the memory but cannot split it);
/// - other-processes: other processes hold ≥ 20 % of capacity, or ≥ the request;
/// - huge-tensor: the request alone is ≥ 25 % of capacity;
/// - does-not-fit: otherwise.
///
/// Unknown numbers never trigger a rule.
pub fn classify(r: &OomReport) -> Cause {
    let req = r.request_bytes.filter(|&b| b > 0);
    let cap = r.capacity_bytes.filter(|&b| b > 0);
    if let Some(ru) = r.reserved_unallocated_bytes.filter(|&b| b > 0) {
        let big = cap.is_some_and(|c| ru >= c / 4 && r.free_bytes.is_none_or(|f| ru > f));
        if req.is_some_and(|q| ru >= q) || big {
            return Cause::Fragmentation;
        }
    }
    if let Some(o) = r.other_processes_bytes.filter(|&b| b > 0) {
        if cap.is_some_and(|c| o >= c / 5) || req.is_some_and(|q| o >= q) {
            return Cause::OtherProcesses;
        }
    }
    if let (Some(q), Some(c)) = (req, cap) {
        if q >= c / 4 {
            return Cause::HugeTensor;
        }
    }
    Cause::DoesNotFit
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

/// Every out-of-memory report in a log, in order.
pub fn parse_log(text: &str) -> Vec<OomReport> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    // The last frame seen per rank prefix: (frame, code line).
    let mut frames: HashMap<Option<u32>, (Option<String>, Option<String>)> = HashMap::new();
    let mut i = 0;
    while i < lines.len() {
        let (prefix_rank, body) = strip_prefix(lines[i]);
        let trimmed = body.trim();
        if trimmed.starts_with("Traceback (most recent call last)") {
            frames.remove(&prefix_rank);
        } else if trimmed.starts_with("File \"") && trimmed.contains(", line ") {
            // The code line is the next line of the same rank (ranks interleave).
            let code = lines[i + 1..]
                .iter()
                .take(8)
                .map(|l| strip_prefix(l))
                .find(|(r, _)| *r == prefix_rank)
                .map(|(_, c)| c.trim())
                .filter(|c| !c.is_empty() && !is_oom(c) && !c.starts_with("File \""))
                .map(|c| clip(c, 300));
            frames.insert(prefix_rank, (Some(clip(trimmed, 300)), code));
        } else if is_oom(trimmed) {
            let mut joined = trimmed.to_string();
            let mut j = i + 1;
            while j < lines.len() && j <= i + 4 {
                let (r, b) = strip_prefix(lines[j]);
                let b = b.trim();
                if r != prefix_rank
                    || b.is_empty()
                    || is_oom(b)
                    || b.starts_with("Traceback")
                    || b.starts_with("File \"")
                {
                    break;
                }
                joined.push(' ');
                joined.push_str(b);
                j += 1;
            }
            let mut r = parse_message(&joined);
            r.line = i + 1;
            r.rank = prefix_rank.or(r.gpu);
            if let Some((f, c)) = frames.remove(&prefix_rank) {
                r.frame = f;
                r.code_line = c;
            }
            out.push(r);
            i = j;
            continue;
        }
        i += 1;
    }
    out
}

fn clip(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// An error line, not a mere mention: PyTorch's message carries an exception name or the
/// request; cudarc's carries the driver's error code.
fn is_oom(s: &str) -> bool {
    s.contains("CUDA_ERROR_OUT_OF_MEMORY")
        || (s.contains("CUDA out of memory")
            && (s.contains("Error") || s.contains("Tried to allocate")))
}

/// Splits `[rank1]: ` / `[default0]:` prefixes off a line.
fn strip_prefix(line: &str) -> (Option<u32>, &str) {
    let t = line.trim_start();
    if let Some(rest) = t.strip_prefix('[') {
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
    (None, line)
}

/// Reads the numbers of one (joined) error message.
fn parse_message(m: &str) -> OomReport {
    let mut r = OomReport {
        driver_error: m.contains("CUDA_ERROR_OUT_OF_MEMORY"),
        request_bytes: amount_after(m, "Tried to allocate "),
        gpu: after(m, "GPU ").and_then(leading_u32),
        ..OomReport::default()
    };
    if m.contains("total capacity of ") {
        // PyTorch 2.x
        r.capacity_bytes = amount_after(m, "total capacity of ");
        r.free_bytes = amount_after(m, "of which ");
        r.process_in_use_bytes = amount_after(m, "this process has ");
        r.allocated_bytes = amount_after(m, "Of the allocated memory ");
        r.reserved_unallocated_bytes = amount_before(m, " is reserved by PyTorch but unallocated");
    } else {
        r.capacity_bytes = amount_before(m, " total capacity");
        r.allocated_bytes = amount_before(m, " already allocated");
        r.free_bytes = amount_before(m, " free;").or_else(|| amount_before(m, " free)"));
        r.reserved_bytes = amount_before(m, " reserved in total");
        if let (Some(res), Some(a)) = (r.reserved_bytes, r.allocated_bytes) {
            r.reserved_unallocated_bytes = Some(res.saturating_sub(a));
        }
    }
    let mut others: Option<u64> = None;
    let mut rest = m;
    while let Some(p) = rest.find("Process ") {
        rest = &rest[p + "Process ".len()..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            continue;
        }
        if let Some(tail) = rest[digits..].strip_prefix(" has ") {
            if let Some(b) = parse_amount(tail) {
                others = Some(others.unwrap_or(0).saturating_add(b));
            }
        }
    }
    r.other_processes_bytes = others.or(
        match (r.capacity_bytes, r.free_bytes, r.process_in_use_bytes) {
            (Some(c), Some(f), Some(p)) => Some(c.saturating_sub(f).saturating_sub(p)),
            _ => None,
        },
    );
    r
}

fn after<'a>(s: &'a str, key: &str) -> Option<&'a str> {
    s.find(key).map(|p| &s[p + key.len()..])
}

fn leading_u32(s: &str) -> Option<u32> {
    let n = s.bytes().take_while(u8::is_ascii_digit).count();
    s[..n].parse().ok()
}

fn amount_after(s: &str, key: &str) -> Option<u64> {
    parse_amount(after(s, key)?)
}

/// The amount written just before `key`, as in "31.84 GiB total capacity".
fn amount_before(s: &str, key: &str) -> Option<u64> {
    let head = &s[..s.find(key)?];
    let head = head.trim_end();
    let mut it = head.rsplitn(3, char::is_whitespace);
    let unit = it.next()?;
    let num = it.next()?;
    let num = num.trim_start_matches(['(', ';', ',']);
    parse_amount(&format!("{num} {unit}"))
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
        let frag = OomReport {
            reserved_unallocated_bytes: Some(2 * GIB),
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
