//! The host side: the kernel's OOM killer and the traces it leaves in a training log.
//!
//! A process the kernel kills for host memory gets SIGKILL: no Python traceback, only
//! what is around it. Recognized, one line at a time:
//! - the kernel's own line (`dmesg`, journal): `Out of memory: Killed process 25315
//!   (python3) total-vm:…kB, anon-rss:31451456kB, …` (also `Memory cgroup out of memory`);
//! - torchrun's elastic agent: `failed (exitcode: -9) local_rank: 4 (pid: 899509)`, its
//!   `ChildFailedError` summary (`exitcode  : -9 (pid: 14750)`, `Signal 9 (SIGKILL)
//!   received by PID 14750`);
//! - a shell or IDE: a line that is only `Killed`, `exit code 137`;
//! - a data loader worker: `DataLoader worker (pid 1562937) is killed by signal: Killed`.
//!
//! Several of these lines describe one kill; the scan merges those close together.

use serde::Serialize;

/// How the log says the process died.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostSignal {
    /// A shell's bare `Killed`.
    ShellKilled,
    /// Exit code 137 (128 + SIGKILL).
    Exit137,
    /// SIGKILL / exit code -9 reported by a launcher.
    Sigkill,
    /// A data loader worker killed by a signal.
    WorkerKilled,
    /// The kernel's OOM killer names the process (dmesg).
    OomKiller,
}

/// A process killed on the host, as far as the log says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostKill {
    pub how: HostSignal,
    pub pid: Option<u64>,
    /// The process name the kernel printed, e.g. `python3`.
    pub process: Option<String>,
    /// Resident anonymous memory when it was killed (the kernel's `anon-rss`).
    pub anon_rss_bytes: Option<u64>,
    pub exit_code: Option<i64>,
    /// The launcher's rank (`local_rank: 4`, `rank2`).
    pub rank: Option<u32>,
}

impl HostKill {
    fn new(how: HostSignal) -> HostKill {
        HostKill {
            how,
            pid: None,
            process: None,
            anon_rss_bytes: None,
            exit_code: None,
            rank: None,
        }
    }

    /// Fills what `other` knows and this one does not; the strongest signal wins.
    pub fn merge(&mut self, other: HostKill) {
        self.how = self.how.max(other.how);
        self.pid = self.pid.or(other.pid);
        self.process = self.process.take().or(other.process);
        self.anon_rss_bytes = self.anon_rss_bytes.or(other.anon_rss_bytes);
        self.exit_code = self.exit_code.or(other.exit_code);
        self.rank = self.rank.or(other.rank);
    }
}

/// The host kill a line reports, if it reports one.
pub fn line(t: &str) -> Option<HostKill> {
    if let Some(p) = t.find("Killed process ") {
        if t.contains("out of memory") || t.contains("Out of memory") || t.contains("oom") {
            return Some(oom_killer(&t[p + "Killed process ".len()..]));
        }
    }
    if t.contains("is killed by signal: Killed") {
        let mut h = HostKill::new(HostSignal::WorkerKilled);
        h.pid = number_after(t, "(pid ");
        return Some(h);
    }
    if t == "Killed" || (t.ends_with(": Killed") && t.len() < 40) {
        return Some(HostKill::new(HostSignal::ShellKilled));
    }
    if t.contains("exit code 137") || t.contains("exited with code 137") {
        let mut h = HostKill::new(HostSignal::Exit137);
        h.exit_code = Some(137);
        return Some(h);
    }
    launcher(t)
}

/// torchrun's `exitcode: -9` lines and SIGKILL summaries.
fn launcher(t: &str) -> Option<HostKill> {
    let sig = t.contains("(SIGKILL)") || t.contains("Signals.SIGKILL");
    let code = exit_code(t);
    if !sig && code != Some(-9) {
        return None;
    }
    let mut h = HostKill::new(HostSignal::Sigkill);
    h.exit_code = Some(-9);
    h.pid = number_after(t, "(pid: ")
        .or_else(|| number_after(t, "received by PID "))
        .or_else(|| number_after(t, "by PID "));
    h.rank = number_after(t, "local_rank: ")
        .or_else(|| number_after(t, "(local rank: "))
        .and_then(|n| u32::try_from(n).ok());
    Some(h)
}

/// `exitcode: -9`, `exitcode  : -9`.
fn exit_code(t: &str) -> Option<i64> {
    let rest = &t[t.find("exitcode")? + "exitcode".len()..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let (neg, digits) = match rest.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, rest),
    };
    let n = digits.bytes().take_while(u8::is_ascii_digit).count();
    let v: i64 = digits[..n].parse().ok()?;
    Some(if neg { -v } else { v })
}

/// `25315 (python3) total-vm:53312244kB, anon-rss:31451456kB, …`
fn oom_killer(rest: &str) -> HostKill {
    let mut h = HostKill::new(HostSignal::OomKiller);
    h.exit_code = Some(-9);
    h.pid = leading_number(rest);
    if let (Some(a), Some(b)) = (rest.find('('), rest.find(')')) {
        if a < b {
            h.process = Some(rest[a + 1..b].chars().take(64).collect());
        }
    }
    h.anon_rss_bytes = rest.find("anon-rss:").and_then(|p| {
        let kb: String = rest[p + "anon-rss:".len()..]
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == ',')
            .filter(char::is_ascii_digit)
            .collect();
        kb.parse::<u64>().ok().map(|k| k.saturating_mul(1024))
    });
    h
}

fn leading_number(s: &str) -> Option<u64> {
    let n = s.bytes().take_while(u8::is_ascii_digit).count();
    s[..n].parse().ok()
}

fn number_after(s: &str, key: &str) -> Option<u64> {
    leading_number(&s[s.find(key)? + key.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognizes_the_kernel_the_launcher_and_the_shell() {
        let k = line("[2059991.491542] Out of memory: Killed process 25315 (python3) total-vm:53312244kB, anon-rss:31451456kB, file-rss:74816kB").unwrap();
        assert_eq!(k.how, HostSignal::OomKiller);
        assert_eq!(k.pid, Some(25315));
        assert_eq!(k.process.as_deref(), Some("python3"));
        assert_eq!(k.anon_rss_bytes, Some(31_451_456 * 1024));
        let t = line("ERROR:torch.distributed.elastic.multiprocessing.api:failed (exitcode: -9) local_rank: 4 (pid: 899509) of binary: python").unwrap();
        assert_eq!(
            (t.rank, t.pid, t.exit_code),
            (Some(4), Some(899509), Some(-9))
        );
        assert_eq!(
            line("  exitcode  : -9 (pid: 14750)").unwrap().pid,
            Some(14750)
        );
        assert!(line("failed (exitcode: 1) local_rank: 0 (pid: 2249)").is_none());
        assert_eq!(line("Killed").unwrap().how, HostSignal::ShellKilled);
        assert!(line("Killed the learning rate schedule").is_none());
        assert_eq!(
            line("Process finished with exit code 137 (interrupted by signal 9: SIGKILL)")
                .unwrap()
                .exit_code,
            Some(137)
        );
        assert!(line("exitcode: -").is_none());
    }
}
