//! `vramplan diagnose [LOG | -] [--config run.toml] [--out fixed.toml] [--json]`: reads
//! the CUDA out-of-memory reports of a training log, says why each happened and ranks
//! fixes; with the run's config the fixes are re-planned and their peaks predicted.

use crate::exit::bad;
use crate::load::{self, Env, Loaded};
use anyhow::Result;
use serde::Serialize;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use vramplan::write_atomic;
use vramplan_planner::{
    classify, estimate, match_tensor, parse_log, Bytes, Cause, Checkpointing, Component, LossMode,
    Match, OomReport, RunSpec, Sharding,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The training log; "-" or nothing reads standard input.
    pub log: Option<PathBuf>,
    /// The run config of the failed run: fixes are then predicted by the planner.
    #[arg(long, value_name = "RUN.toml")]
    pub config: Option<PathBuf>,
    /// Write the best fix as a run config (needs --config).
    #[arg(long, value_name = "FIXED.toml", requires = "config")]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

/// One suggested change.
#[derive(Debug, Clone, Serialize)]
struct Fix {
    change: String,
    predicted_peak_bytes: Option<u64>,
    fits: Option<bool>,
    keeps_global_batch: bool,
    #[serde(skip)]
    spec: Option<RunSpec>,
}

impl Fix {
    fn advice(change: String) -> Fix {
        Fix {
            change,
            predicted_peak_bytes: None,
            fits: None,
            keeps_global_batch: true,
            spec: None,
        }
    }
}

#[derive(Debug, Serialize)]
struct Diagnosis {
    cause: Cause,
    #[serde(flatten)]
    report: OomReport,
    tensor: Option<String>,
    explanation: String,
    fixes: Vec<Fix>,
}

pub fn run(env: &Env, a: Args) -> Result<ExitCode> {
    let bytes = match a.log.as_deref() {
        None => read_stdin()?,
        Some(p) if p == Path::new("-") => read_stdin()?,
        Some(p) => std::fs::read(p)
            .map_err(|e| bad(&p.display().to_string(), format!("cannot read: {e}")))?,
    };
    let text = String::from_utf8_lossy(&bytes);
    let loaded = match &a.config {
        Some(p) => Some(load::load(env, Some(p))?),
        None => None,
    };
    let reports = parse_log(&text);
    let diagnoses: Vec<Diagnosis> = reports
        .into_iter()
        .map(|r| diagnose(r, loaded.as_ref()))
        .collect();
    if let (Some(out), Some(l)) = (&a.out, &loaded) {
        let best = diagnoses
            .iter()
            .flat_map(|d| d.fixes.iter())
            .find_map(|f| f.spec.as_ref());
        if let Some(spec) = best {
            write_atomic(out, &l.raw.with_spec(spec).to_toml()?)?;
        }
    }
    if a.json {
        let v = serde_json::json!({ "reports": diagnoses });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if diagnoses.is_empty() {
        println!("no CUDA out-of-memory report found");
    } else {
        print!("{}", render(&diagnoses));
        if let Some(out) = &a.out {
            println!("wrote the best fix to {}", out.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn read_stdin() -> Result<Vec<u8>> {
    let mut v = Vec::new();
    std::io::stdin()
        .read_to_end(&mut v)
        .map_err(|e| bad("standard input", format!("cannot read: {e}")))?;
    Ok(v)
}

/// What the failing code line says about the tensor, without a config.
fn hint(code: &str) -> Option<&'static str> {
    let c = code.to_ascii_lowercase();
    if c.contains(".float()") || c.contains("cross_entropy") || c.contains("lm_head") {
        Some("logits")
    } else if c.contains("scaled_dot_product_attention") || c.contains("softmax") {
        Some("attention")
    } else if c.contains("optimizer.step") || c.contains("adam") {
        Some("optimizer state")
    } else {
        None
    }
}

fn b(x: u64) -> String {
    Bytes(x).to_string()
}

fn diagnose(report: OomReport, loaded: Option<&Loaded>) -> Diagnosis {
    let cause = classify(&report);
    let matched = loaded.and_then(|l| match_tensor(&report, &estimate(&l.spec).timeline));
    let code_hint = hint(&format!(
        "{} {}",
        report.frame.as_deref().unwrap_or(""),
        report.code_line.as_deref().unwrap_or("")
    ));
    let req = report.request_bytes.unwrap_or(0);
    let explanation = match cause {
        Cause::HugeTensor => match (&matched, loaded) {
            (Some(m), Some(l)) => format!(
                "one huge tensor: {}{} during {}",
                m.name,
                formula(m, &l.spec),
                m.phase
            ),
            _ => format!(
                "one huge tensor of {}{}",
                b(req),
                code_hint.map(|h| format!(" (the {h})")).unwrap_or_default()
            ),
        },
        Cause::Fragmentation => format!(
            "fragmentation: PyTorch holds {} reserved but unallocated, more than enough for the {} request, but not in one piece",
            b(report.reserved_unallocated_bytes.unwrap_or(0)),
            b(req)
        ),
        Cause::OtherProcesses => format!(
            "other processes hold {} of the GPU's {}",
            b(report.other_processes_bytes.unwrap_or(0)),
            b(report.capacity_bytes.unwrap_or(0))
        ),
        Cause::DoesNotFit if report.driver_error => {
            "the device ran out of memory (candle/cudarc reports no sizes): the run does not fit"
                .to_string()
        }
        Cause::DoesNotFit => format!(
            "the run does not fit: {} already allocated and {} free when {} more was asked{}",
            b(report.allocated_bytes.unwrap_or(0)),
            b(report.free_bytes.unwrap_or(0)),
            b(req),
            code_hint.map(|h| format!(" (for the {h})")).unwrap_or_default()
        ),
    };
    let mut fixes = Vec::new();
    match cause {
        Cause::Fragmentation => fixes.push(Fix::advice(format!(
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True ({} reserved but unallocated ≥ {} requested)",
            b(report.reserved_unallocated_bytes.unwrap_or(0)),
            b(req)
        ))),
        Cause::OtherProcesses => fixes.push(Fix::advice(format!(
            "free the GPU: other processes hold {} (check nvidia-smi)",
            b(report.other_processes_bytes.unwrap_or(0))
        ))),
        _ => {}
    }
    match loaded {
        Some(l) => fixes.extend(planned_fixes(&l.spec)),
        None => fixes.extend(generic_fixes(
            matched
                .as_ref()
                .map(|m| m.component == Component::Logits)
                .unwrap_or(code_hint == Some("logits")),
            code_hint,
        )),
    }
    Diagnosis {
        cause,
        tensor: matched.map(|m| m.name),
        report,
        explanation,
        fixes,
    }
}

/// "20 × 3072 × 65,536 × 4 B = 15.0 GiB" when a logits tensor is tokens × vocab × width.
fn formula(m: &Match, s: &RunSpec) -> String {
    let (mb, t, v) = (s.train.micro_batch, s.train.seq_len, s.model.vocab_size);
    for w in [4u64, 2] {
        if m.component == Component::Logits
            && mb
                .checked_mul(t)
                .and_then(|x| x.checked_mul(v))
                .and_then(|x| x.checked_mul(w))
                == Some(m.bytes)
        {
            return format!(
                ", {mb} × {t} × {} × {w} B = {}",
                vramplan_planner::thousands(v),
                b(m.bytes)
            );
        }
    }
    format!(", {}", b(m.bytes))
}

fn generic_fixes(logits: bool, code_hint: Option<&str>) -> Vec<Fix> {
    let mut v = Vec::new();
    if logits {
        v.push("loss = \"chunked\"".to_string());
        v.push("loss = \"fused\"".to_string());
    }
    if code_hint == Some("optimizer state") {
        v.push("sharding = \"zero2\" (or an 8-bit optimizer)".to_string());
    }
    v.push("halve micro_batch and double grad_accum".to_string());
    v.push("checkpointing = \"full\"".to_string());
    v.into_iter().map(Fix::advice).collect()
}

/// Re-plans the run with each candidate change; fitting first, then those keeping the
/// global batch, then by predicted peak.
fn planned_fixes(spec: &RunSpec) -> Vec<Fix> {
    let mut cands: Vec<(String, RunSpec, bool)> = Vec::new();
    let t = &spec.train;
    if t.micro_batch >= 2 {
        let mut s = spec.clone();
        s.train.micro_batch = t.micro_batch / 2;
        s.train.grad_accum = t.grad_accum.saturating_mul(2);
        let keeps = t.micro_batch.is_multiple_of(2);
        let change = format!(
            "micro_batch = {}, grad_accum = {}",
            s.train.micro_batch, s.train.grad_accum
        );
        cands.push((change, s, keeps));
    }
    for (mode, name) in [(LossMode::Chunked, "chunked"), (LossMode::Fused, "fused")] {
        if t.loss != mode {
            let mut s = spec.clone();
            s.train.loss = mode;
            cands.push((format!("loss = \"{name}\""), s, true));
        }
    }
    if t.checkpointing != Checkpointing::Full {
        let mut s = spec.clone();
        s.train.checkpointing = Checkpointing::Full;
        cands.push(("checkpointing = \"full\"".into(), s, true));
    }
    if t.seq_len >= 2 {
        let mut s = spec.clone();
        s.train.seq_len = t.seq_len / 2;
        cands.push((format!("seq_len = {}", s.train.seq_len), s, false));
    }
    if spec.hardware.gpus > 1 {
        for (sh, name) in [(Sharding::Zero2, "zero2"), (Sharding::Zero3, "zero3")] {
            if spec.hardware.sharding.stage() < sh.stage() {
                let mut s = spec.clone();
                s.hardware.sharding = sh;
                cands.push((format!("sharding = \"{name}\""), s, true));
            }
        }
    }
    // Single changes rarely suffice for a run far over: also the smallest-loss setups,
    // halving the micro-batch (accumulating more) until the plan fits.
    for full in [false, true] {
        let mut s = spec.clone();
        let mut parts = Vec::new();
        if t.loss == LossMode::FloatCast {
            s.train.loss = LossMode::Chunked;
            parts.push("loss = \"chunked\"".to_string());
        }
        if full && t.checkpointing != Checkpointing::Full {
            s.train.checkpointing = Checkpointing::Full;
            parts.push("checkpointing = \"full\"".to_string());
        }
        let mut keeps = true;
        while !estimate(&s).fits && s.train.micro_batch >= 2 {
            keeps &= s.train.micro_batch.is_multiple_of(2);
            s.train.micro_batch /= 2;
            s.train.grad_accum = s.train.grad_accum.saturating_mul(2);
        }
        if s.train.micro_batch != t.micro_batch {
            parts.push(format!(
                "micro_batch = {}, grad_accum = {}",
                s.train.micro_batch, s.train.grad_accum
            ));
        }
        if parts.len() >= 2 && !cands.iter().any(|c| c.1 == s) {
            cands.push((parts.join(", "), s, keeps));
        }
    }
    let mut fixes: Vec<Fix> = cands
        .into_iter()
        .map(|(change, s, keeps)| {
            let r = estimate(&s);
            Fix {
                change,
                predicted_peak_bytes: Some(r.device_bytes),
                fits: Some(r.fits),
                keeps_global_batch: keeps,
                spec: Some(s),
            }
        })
        .collect();
    fixes.sort_by_key(|f| {
        (
            f.fits != Some(true),
            !f.keeps_global_batch,
            f.predicted_peak_bytes.unwrap_or(u64::MAX),
        )
    });
    fixes
}

fn opt(label: &str, v: Option<u64>, out: &mut String) {
    if let Some(x) = v {
        out.push_str(&format!("  {label:<28} {}\n", b(x)));
    }
}

fn render(ds: &[Diagnosis]) -> String {
    let mut out = String::new();
    for (i, d) in ds.iter().enumerate() {
        let r = &d.report;
        let who = match (r.rank, r.gpu) {
            (Some(rank), _) => format!(" on rank {rank}"),
            (None, Some(g)) => format!(" on GPU {g}"),
            _ => String::new(),
        };
        out.push_str(&format!(
            "out-of-memory {} of {} (log line {}){who}: {}\n",
            i + 1,
            ds.len(),
            r.line,
            d.cause
        ));
        opt("requested", r.request_bytes, &mut out);
        opt("capacity", r.capacity_bytes, &mut out);
        opt("free", r.free_bytes, &mut out);
        opt("allocated by PyTorch", r.allocated_bytes, &mut out);
        opt("reserved by PyTorch", r.reserved_bytes, &mut out);
        opt(
            "reserved but unallocated",
            r.reserved_unallocated_bytes,
            &mut out,
        );
        opt("this process", r.process_in_use_bytes, &mut out);
        opt("other processes", r.other_processes_bytes, &mut out);
        if let Some(c) = &r.code_line {
            out.push_str(&format!("  {:<28} {c}\n", "failed at"));
        }
        out.push_str(&format!("cause: {}\n", d.explanation));
        out.push_str("fixes, best first:\n");
        for (k, f) in d.fixes.iter().enumerate() {
            let pred = match (f.predicted_peak_bytes, f.fits) {
                (Some(p), Some(fits)) => format!(
                    " → predicted peak {}, {}{}",
                    b(p),
                    if fits { "fits" } else { "does not fit" },
                    if f.keeps_global_batch {
                        ""
                    } else {
                        " (changes the global batch)"
                    }
                ),
                _ => String::new(),
            };
            out.push_str(&format!("  {}. {}{pred}\n", k + 1, f.change));
        }
        out.push('\n');
    }
    out
}
