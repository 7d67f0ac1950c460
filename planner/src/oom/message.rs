//! The numbers of one out-of-memory message, in each wording the allocators print.
//!
//! - PyTorch 1.0–1.3: `Tried to allocate X (GPU 0; C total capacity; A already allocated;
//!   F free; U cached)` — `cached` is the cache's unallocated part there (reserved minus
//!   allocated: the corpus's reports have `cached` far below `allocated`);
//! - PyTorch 1.4–2.0: `…; F free; R reserved in total by PyTorch)`;
//! - PyTorch 2.1+ (CUDA, ROCm's `HIP out of memory`): `GPU 0 has a total capacity of C of
//!   which F is free. Process N has P memory in use. Including non-PyTorch memory, this
//!   process has P memory in use. Of the allocated memory A is allocated by PyTorch, [with
//!   X allocated in private pools (e.g., CUDA Graphs),] and U is reserved by PyTorch but
//!   unallocated.` (2.1 spells it `total capacty`);
//! - condensed by a reporter: `GPU has 79.19 GiB total, 6.68 GiB free, 72.48 GiB in use by
//!   this process.`;
//! - MPS: `MPS backend out of memory (MPS allocated: A, other allocations: O, max allowed:
//!   M). Tried to allocate X on private pool.` MPSAllocator.mm prints KB/MB/GB computed
//!   in powers of 1024 (older releases; newer ones print KiB/MiB/GiB with the same
//!   numbers: `max allowed: 18.13 GB` and `18.13 GiB` on the same 16 GB Macs), so they are
//!   read as binary here.

use super::{parse_amount, OomReport, ProcessUse, Source};

/// Reads the numbers of one (joined) error message.
pub fn parse(m: &str, source: Source) -> OomReport {
    let mut r = OomReport {
        source,
        driver_error: source == Source::Cudarc,
        request_bytes: amount_after(m, "Tried to allocate "),
        gpu: after(m, "GPU ").and_then(leading_u32),
        ..OomReport::default()
    };
    if source == Source::Mps {
        mps(m, &mut r);
    } else if m.contains("total capacity of ") || m.contains("total capacty of ") {
        pytorch_2(m, &mut r);
    } else if m.contains(" in use by this process") {
        r.capacity_bytes = amount_before(m, " total,");
        r.free_bytes = amount_before(m, " free,");
        r.process_in_use_bytes = amount_before(m, " in use by this process");
    } else {
        pytorch_1(m, &mut r);
    }
    r.processes = processes(m);
    attribute_processes(&mut r, m.contains("this process has "));
    r
}

fn mps(m: &str, r: &mut OomReport) {
    let bin = |k: &str| after(m, k).and_then(binary_amount);
    r.allocated_bytes = bin("MPS allocated: ");
    r.other_allocations_bytes = bin("other allocations: ");
    r.capacity_bytes = bin("max allowed: ");
    r.request_bytes = bin("Tried to allocate ");
    r.process_in_use_bytes = match (r.allocated_bytes, r.other_allocations_bytes) {
        (Some(a), Some(o)) => Some(a.saturating_add(o)),
        _ => None,
    };
}

fn pytorch_2(m: &str, r: &mut OomReport) {
    r.capacity_bytes =
        amount_after(m, "total capacity of ").or_else(|| amount_after(m, "total capacty of "));
    r.free_bytes = amount_after(m, "of which ");
    r.process_in_use_bytes = amount_after(m, "this process has ");
    r.allocated_bytes = amount_after(m, "Of the allocated memory ");
    r.reserved_unallocated_bytes = amount_before(m, " is reserved by PyTorch but unallocated");
}

fn pytorch_1(m: &str, r: &mut OomReport) {
    r.capacity_bytes = amount_before(m, " total capacity");
    r.allocated_bytes = amount_before(m, " already allocated");
    r.free_bytes = amount_before(m, " free;").or_else(|| amount_before(m, " free)"));
    r.reserved_bytes = amount_before(m, " reserved in total");
    if let (Some(res), Some(a)) = (r.reserved_bytes, r.allocated_bytes) {
        r.reserved_unallocated_bytes = Some(res.saturating_sub(a));
    } else if let Some(c) = amount_before(m, " cached)") {
        // 1.0–1.3: the cache beyond the live tensors.
        r.reserved_unallocated_bytes = Some(c);
        r.reserved_bytes = r.allocated_bytes.map(|a| a.saturating_add(c));
    }
}

/// `Process 1734 has 41.20 GiB memory in use.`, each listed process once.
fn processes(m: &str) -> Vec<ProcessUse> {
    let mut out: Vec<ProcessUse> = Vec::new();
    let mut rest = m;
    while let Some(p) = rest.find("Process ") {
        rest = &rest[p + "Process ".len()..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let Ok(pid) = rest[..digits].parse::<u64>() else {
            continue;
        };
        if let Some(bytes) = rest[digits..].strip_prefix(" has ").and_then(parse_amount) {
            if out.len() < 64 && !out.iter().any(|x| x.pid == pid) {
                out.push(ProcessUse { pid, bytes });
            }
        }
    }
    out
}

/// Who holds the memory that is not free. With "this process has P", every listed process
/// is another one. Without it (a container, where the process sees itself under another
/// PID), the listed process that holds what PyTorch reserved — allocated plus cached,
/// within the CUDA context's size — is this one.
fn attribute_processes(r: &mut OomReport, this_process_line: bool) {
    let listed = r
        .processes
        .iter()
        .fold(0u64, |a, p| a.saturating_add(p.bytes));
    if !r.processes.is_empty() && !this_process_line {
        if let Some(res) = r.reserved_total() {
            let slack = (res / 10).max(1536 << 20);
            let me = r
                .processes
                .iter()
                .filter(|p| {
                    p.bytes.saturating_add(64 << 20) >= res && p.bytes <= res.saturating_add(slack)
                })
                .min_by_key(|p| p.bytes.abs_diff(res));
            if let Some(me) = me {
                r.self_pid = Some(me.pid);
                r.process_in_use_bytes = Some(me.bytes);
            }
        }
        let mine = r.process_in_use_bytes.unwrap_or(0);
        r.other_processes_bytes = Some(listed.saturating_sub(mine));
        return;
    }
    // An in-use figure below what PyTorch itself holds is wrong (some drivers print
    // "0 bytes"): nothing is derived from it.
    let sane = r
        .process_in_use_bytes
        .filter(|&p| r.reserved_total().is_none_or(|res| p >= res));
    r.other_processes_bytes = if r.processes.is_empty() {
        match (r.capacity_bytes, r.free_bytes, sane) {
            (Some(c), Some(f), Some(p)) => Some(c.saturating_sub(f).saturating_sub(p)),
            _ => None,
        }
    } else {
        Some(listed)
    };
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

/// MPS: KB/MB/GB are powers of 1024.
fn binary_amount(s: &str) -> Option<u64> {
    let t = s.trim_start();
    let n = t
        .bytes()
        .take_while(|b| b.is_ascii_digit() || *b == b'.' || *b == b',')
        .count();
    let unit = t[n..].trim_start();
    for (dec, bin) in [("KB", "KiB"), ("MB", "MiB"), ("GB", "GiB"), ("TB", "TiB")] {
        if let Some(tail) = unit.strip_prefix(dec) {
            if !tail.starts_with(|c: char| c.is_ascii_alphabetic()) {
                return parse_amount(&format!("{} {bin}", &t[..n]));
            }
        }
    }
    parse_amount(t)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::{GIB, MIB};

    /// Regression (found by the CLI fuzz test): sums of huge listed amounts overflowed.
    #[test]
    fn huge_amounts_saturate() {
        let m = "CUDA out of memory. Tried to allocate 1 GiB. GPU 0 has a total capacity of 2 GiB of which 1 GiB is free. Process 1 has 99999999999999999999 TiB memory in use. Process 2 has 99999999999999999999 TiB memory in use. Of the allocated memory 99999999999999999999 TiB is allocated by PyTorch, and 99999999999999999999 TiB is reserved by PyTorch but unallocated.";
        let r = parse(m, Source::PytorchCuda);
        assert_eq!(r.processes.len(), 2);
        let _ = crate::diagnose::assess(&r);
    }

    #[test]
    fn mps_units_are_binary_and_in_use_is_the_sum() {
        let r = parse("RuntimeError: MPS backend out of memory (MPS allocated: 18.02 GB, other allocations: 107.10 MB, max allowed: 18.13 GB). Tried to allocate 4.50 MB on private pool.", Source::Mps);
        assert_eq!(r.request_bytes, Some(9 * MIB / 2));
        assert_eq!(r.capacity_bytes, parse_amount("18.13 GiB"));
        assert_eq!(
            r.process_in_use_bytes,
            Some(parse_amount("18.02 GiB").unwrap() + parse_amount("107.10 MiB").unwrap())
        );
        assert_eq!(r.other_processes_bytes, None);
    }

    #[test]
    fn a_listed_process_holding_the_cache_is_this_one() {
        let m = "CUDA out of memory. Tried to allocate 2.11 GiB. GPU 0 has a total capacity of 14.74 GiB of which 1.65 GiB is free. Process 19066 has 6.79 GiB memory in use. Process 19069 has 514.00 MiB memory in use. Process 19060 has 4.93 GiB memory in use. Of the allocated memory 4.50 GiB is allocated by PyTorch, and 2.14 GiB is reserved by PyTorch but unallocated.";
        let r = parse(m, Source::PytorchCuda);
        assert_eq!(r.self_pid, Some(19066));
        assert_eq!(r.processes.len(), 3);
        let others = parse_amount("514.00 MiB").unwrap() + parse_amount("4.93 GiB").unwrap();
        assert_eq!(r.other_processes_bytes, Some(others));
        let c = parse(
            "GPU has 79.19 GiB total, 6.68 GiB free, 72.48 GiB in use by this process.",
            Source::PytorchCuda,
        );
        assert_eq!(c.capacity_bytes, parse_amount("79.19 GiB"));
        assert_eq!(c.process_in_use_bytes, parse_amount("72.48 GiB"));
        let old = parse("CUDA out of memory. Tried to allocate 158.25 MiB (GPU 0; 11.17 GiB total capacity; 10.56 GiB already allocated; 130.88 MiB free; 1.29 MiB cached)", Source::PytorchCuda);
        assert_eq!(old.reserved_unallocated_bytes, parse_amount("1.29 MiB"));
        assert!(old.capacity_bytes > Some(11 * GIB));
    }
}
