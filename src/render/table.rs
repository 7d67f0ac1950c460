//! Human-readable tables (comfy-table). Tables take the terminal's width when stdout is
//! one, `COLUMNS` or 80 columns when piped ([`fit_output`], called once by the binary), and
//! a fixed [`SNAPSHOT_WIDTH`] otherwise, so the snapshot tests are stable.

use super::{prose, Render};
use crate::nvml::Detected;
use comfy_table::{presets::UTF8_FULL_CONDENSED, Cell, CellAlignment, ContentArrangement, Table};
use std::fmt::Write;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::{AtomicU16, Ordering};
use vramplan_planner::{
    thousands, Basis, Bytes, Comparison, DataSize, Device, DiagnosedLog, Diagnosis, Engine,
    FitResult, GpuSpec, HostReport, Ladder, ModelSpec, Phase, Report, RunSpec, TrainSpec,
    TrainingTime,
};

/// The human-readable format.
pub struct Text;

impl Render for Text {
    fn estimate(&self, s: &RunSpec, r: &Report) -> anyhow::Result<String> {
        Ok(estimate(s, r))
    }

    fn compare(
        &self,
        na: &str,
        a: &Report,
        nb: &str,
        b: &Report,
        c: &Comparison,
    ) -> anyhow::Result<String> {
        Ok(compare(na, a, nb, b, c))
    }

    fn fit(
        &self,
        f: &FitResult,
        _: &str,
        top: usize,
        written: Option<&Path>,
    ) -> anyhow::Result<String> {
        let mut out = fit(f, top);
        if let Some(p) = written {
            let _ = writeln!(out, "plan written to {}", p.display());
        }
        Ok(out)
    }

    fn ladder(&self, base: &RunSpec, l: &Ladder) -> anyhow::Result<String> {
        Ok(ladder(base, l))
    }

    fn diagnose(&self, log: &DiagnosedLog, written: Option<&Path>) -> anyhow::Result<String> {
        let ds = &log.diagnoses;
        if ds.is_empty() {
            return Ok("no CUDA out-of-memory report found (nor ROCm, MPS, cuBLAS, candle or a host OOM kill)\n".to_string());
        }
        let mut out = diagnose(ds);
        if log.reports > ds.len() {
            let counts: Vec<String> = log
                .by_cause
                .iter()
                .map(|(c, n)| format!("{c} {}", thousands(*n as u64)))
                .collect();
            let _ = writeln!(
                out,
                "{} more reports not shown; all {} by cause: {}",
                thousands((log.reports - ds.len()) as u64),
                thousands(log.reports as u64),
                counts.join(", ")
            );
        }
        if let Some(p) = written {
            let _ = writeln!(out, "wrote the best fix to {}", p.display());
        }
        Ok(out)
    }

    fn models(&self, ms: &[ModelSpec]) -> anyhow::Result<String> {
        Ok(models(ms))
    }

    fn gpus(
        &self,
        gs: &[GpuSpec],
        detected: &anyhow::Result<Vec<Detected>>,
    ) -> anyhow::Result<String> {
        Ok(gpus(gs) + &detected_gpus(detected))
    }
}

/// The width of the tables the snapshot tests render.
pub const SNAPSHOT_WIDTH: u16 = 100;
/// The width when stdout is not a terminal and `COLUMNS` does not say.
const PIPED_WIDTH: u16 = 80;
/// Narrower than this, a table's columns wrap into unreadable slivers; wider, lines stop
/// being scannable.
const WIDTH_RANGE: (u16, u16) = (60, 240);

static WIDTH: AtomicU16 = AtomicU16::new(SNAPSHOT_WIDTH);

/// Sets the tables' width for this process from where its output goes: the terminal's
/// width, else `COLUMNS`, else 80.
pub fn fit_output() {
    let terminal = std::io::stdout()
        .is_terminal()
        .then(|| Table::new().width())
        .flatten();
    let columns = std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse().ok());
    WIDTH.store(output_width(terminal, columns), Ordering::Relaxed);
}

/// The width to render at, given the terminal's (when stdout is one) and `COLUMNS`.
fn output_width(terminal: Option<u16>, columns: Option<u16>) -> u16 {
    let w = terminal.or(columns).unwrap_or(PIPED_WIDTH);
    w.clamp(WIDTH_RANGE.0, WIDTH_RANGE.1)
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_width(WIDTH.load(Ordering::Relaxed))
        .force_no_tty()
        .set_header(header.iter().map(Cell::new));
    t
}

fn right(t: &mut Table, cols: std::ops::Range<usize>) {
    for i in cols {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
}

fn pct(part: u64, whole: u64) -> String {
    if whole == 0 {
        "-".into()
    } else {
        format!("{:.0} %", part as f64 * 100.0 / whole as f64)
    }
}

/// The torch engine's implementation and compile state: " (hf, eager)".
fn code(t: &TrainSpec) -> String {
    match t.engine {
        Engine::Torch => format!(
            " ({}, {})",
            t.implementation,
            if t.compile { "compiled" } else { "eager" }
        ),
        Engine::Candle => String::new(),
    }
}

/// One line: what is run, where.
pub fn headline(s: &RunSpec) -> String {
    let t = &s.train;
    let dev = match &s.hardware.device {
        Device::Gpu(g) => format!("{} × {} ({})", s.hardware.gpus, g.name, g.display),
        // The candle engine's CPU working sets depend on its matmul kernels.
        Device::Cpu { kernels, .. } if t.engine == Engine::Candle => {
            format!("cpu ({kernels} kernels)")
        }
        Device::Cpu { .. } => "cpu".into(),
    };
    // On the CPU, gpus = N is N processes on one host (FSDP2 over gloo).
    let ranks = if s.hardware.device.is_cuda() {
        "GPU(s)"
    } else {
        "process(es)"
    };
    format!(
        "{} on {}, {} engine{}\nmicro-batch {} × seq {} × accumulation {} × {} {ranks} = {} tokens per step\n{}, {}, checkpointing {}, loss {}, attention {}, {}\n",
        s.model.name,
        dev,
        t.engine,
        code(t),
        t.micro_batch,
        t.seq_len,
        t.grad_accum,
        s.hardware.gpus,
        s.global_batch_tokens(),
        t.precision,
        t.optimizer,
        t.checkpointing,
        t.loss,
        t.attention,
        s.hardware.sharding
    )
}

pub fn verdict(r: &Report) -> String {
    let cap = Bytes(r.capacity_bytes);
    let dev = Bytes(r.device_bytes);
    if r.fits {
        format!(
            "fits: {dev} of {cap}, {} ({}) to spare",
            Bytes(r.headroom_bytes.max(0) as u64),
            pct(r.headroom_bytes.max(0) as u64, r.capacity_bytes)
        )
    } else {
        format!(
            "does NOT fit: needs {dev} of {cap}, {} over",
            Bytes(r.headroom_bytes.unsigned_abs())
        )
    }
}

pub fn estimate(s: &RunSpec, r: &Report) -> String {
    let mut out = headline(s);
    let _ = writeln!(out, "regime: {}", r.regime);
    let mut t = table(&["component at the peak", "memory", "share"]);
    for (k, v) in &r.components {
        if *v > 0 {
            t.add_row(vec![
                k.replace('_', " "),
                Bytes(*v).to_string(),
                pct(*v, r.device_bytes),
            ]);
        }
    }
    t.add_row(vec![
        "total".to_string(),
        Bytes(r.device_bytes).to_string(),
        "100 %".to_string(),
    ]);
    right(&mut t, 1..3);
    let _ = writeln!(out, "{t}");
    let _ = writeln!(
        out,
        "peak: {} during {} (at: {})",
        Bytes(r.peak_allocated_bytes),
        r.peak_phase,
        r.peak_tensor
    );
    if s.hardware.device.is_cuda() {
        let _ = writeln!(
            out,
            "allocated {}, reserved {}, device {} (with the CUDA context) of {}",
            Bytes(r.peak_allocated_bytes),
            Bytes(r.peak_reserved_bytes),
            Bytes(r.device_bytes),
            Bytes(r.capacity_bytes)
        );
    }
    if r.paged_bytes > 0 {
        let _ = writeln!(
            out,
            "paged optimizer state: {} in CUDA managed memory (on the card, not in the allocated peak)",
            Bytes(r.paged_bytes)
        );
    }
    let activations = r.host_bytes.saturating_sub(r.offloaded_state_bytes);
    if activations > 0 {
        let _ = writeln!(
            out,
            "offloaded to host memory: {} of saved activations",
            Bytes(activations)
        );
    }
    if r.offloaded_state_bytes > 0 {
        let _ = writeln!(
            out,
            "offloaded to host memory: {} of DeepSpeed optimizer/parameter state per GPU (modelled from DeepSpeed's source, not measured on a GPU)",
            Bytes(r.offloaded_state_bytes)
        );
    }
    let _ = writeln!(out, "{}", verdict(r));
    let _ = writeln!(
        out,
        "estimated {:.0} tokens/s over all GPUs ({:.2} s per step; an estimate at an assumed utilization, see docs/model.md)",
        r.est_tokens_per_second, r.est_step_seconds
    );
    if let Some(h) = &r.host {
        out += &host(h);
    }
    if let Some(t) = &r.time {
        out += &time(t);
    }
    for w in &r.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    out
}

/// Host RAM per process and per machine, term by term, against the machine's RAM.
pub fn host(h: &HostReport) -> String {
    let machine = Bytes(h.per_machine_bytes);
    let verdict = match (h.capacity_bytes, &h.capacity_source, h.headroom_bytes()) {
        (Some(c), Some(src), Some(room)) if room >= 0 => format!(
            "of {} ({src}): fits, {} to spare",
            Bytes(c),
            Bytes(room as u64)
        ),
        (Some(c), Some(src), Some(room)) => format!(
            "of {} ({src}): does NOT fit, {} over (the kernel's OOM killer ends a process: \"Killed\")",
            Bytes(c),
            Bytes(room.unsigned_abs())
        ),
        _ => "(the machine's RAM is unknown: pass --host-ram GIB)".to_string(),
    };
    let mut out = format!(
        "host RAM: {} per process, {machine} per machine for {} process(es) at its peak (during {}) {verdict}\n",
        Bytes(h.per_process_bytes),
        h.processes,
        if h.peak_phase == "load" { "the model load" } else { "training" },
    );
    let mut t = table(&[
        "host memory of one process",
        "memory",
        "held",
        "pages",
        "basis",
    ]);
    for term in &h.terms {
        t.add_row(vec![
            term.name.to_string(),
            Bytes(term.bytes).to_string(),
            match term.phase {
                Phase::Load => "loading",
                Phase::Train => "training",
                Phase::Both => "always",
            }
            .to_string(),
            if term.shared { "shared" } else { "private" }.to_string(),
            match term.basis {
                Basis::Measured => "measured",
                Basis::Modelled => "modelled",
                Basis::Cited => "cited",
            }
            .to_string(),
        ]);
    }
    right(&mut t, 1..2);
    let _ = writeln!(out, "{t}");
    out
}

/// Seconds as minutes, hours or days.
fn duration(s: f64) -> String {
    match s {
        s if s < 120.0 => format!("{s:.0} s"),
        s if s < 7200.0 => format!("{:.0} min", s / 60.0),
        s if s < 172_800.0 => format!("{:.1} h", s / 3600.0),
        s => format!("{:.1} days", s / 86_400.0),
    }
}

/// Steps and time per epoch, labelled as the estimate they are.
pub fn time(t: &TrainingTime) -> String {
    let u = &t.utilization;
    let at = if u.low == u.high {
        format!("{:.0} %", u.low * 100.0)
    } else {
        format!("{:.0}–{:.0} %", u.low * 100.0, u.high * 100.0)
    };
    let data = match t.data {
        DataSize::Samples(n) => format!("{} samples", thousands(n)),
        DataSize::Tokens(n) => format!("{} tokens", thousands(n)),
    };
    let range = |fast: f64, slow: f64| {
        if u.low == u.high {
            String::new()
        } else {
            format!(" ({}–{})", duration(fast), duration(slow))
        }
    };
    format!(
        "time: {} steps per epoch ({data}, {} tokens per step), {:.2} s per step; {} per epoch{}, {} for {} epoch(s){}\n  an estimate at {at} model FLOPs utilization of {:.0} TFLOP/s peak, not a measurement\n",
        thousands(t.steps_per_epoch),
        thousands(t.tokens_per_step),
        t.step_seconds,
        duration(t.epoch_seconds),
        range(t.epoch_seconds_fast, t.epoch_seconds_slow),
        duration(t.total_seconds),
        t.epochs,
        range(t.total_seconds_fast, t.total_seconds_slow),
        t.peak_flops / 1e12,
    )
}

pub fn compare(na: &str, a: &Report, nb: &str, b: &Report, c: &Comparison) -> String {
    let mut out = format!("regime A: {}\nregime B: {}\n", a.regime, b.regime);
    if !c.config.is_empty() {
        let mut t = table(&["config", na, nb]);
        for d in &c.config {
            t.add_row(vec![d.key.clone(), d.a.clone(), d.b.clone()]);
        }
        let _ = writeln!(out, "{t}");
    }
    let mut t = table(&["component at the peak", "A", "B", "A / B"]);
    for d in &c.components {
        if d.a_bytes == 0 && d.b_bytes == 0 {
            continue;
        }
        t.add_row(vec![
            d.component.replace('_', " "),
            Bytes(d.a_bytes).to_string(),
            Bytes(d.b_bytes).to_string(),
            d.ratio
                .map(|r| format!("{r:.2}×"))
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    for (label, x, y) in [
        ("allocated", a.peak_allocated_bytes, b.peak_allocated_bytes),
        ("reserved", a.peak_reserved_bytes, b.peak_reserved_bytes),
        ("device", a.device_bytes, b.device_bytes),
        ("capacity", a.capacity_bytes, b.capacity_bytes),
    ] {
        let ratio = if y > 0 {
            format!("{:.2}×", x as f64 / y as f64)
        } else {
            "-".into()
        };
        t.add_row(vec![
            label.to_string(),
            Bytes(x).to_string(),
            Bytes(y).to_string(),
            ratio,
        ]);
    }
    right(&mut t, 1..4);
    let _ = writeln!(out, "{t}");
    let _ = writeln!(
        out,
        "A ({na}): {}; peak during {}",
        verdict(a),
        a.peak_phase
    );
    let _ = writeln!(
        out,
        "B ({nb}): {}; peak during {}",
        verdict(b),
        b.peak_phase
    );
    let _ = writeln!(out, "largest single tensor — {}", c.largest_tensor);
    let _ = writeln!(out, "component that changed most — {}", c.why);
    out
}

pub fn fit(f: &FitResult, top: usize) -> String {
    let mut out = headline(&f.best.spec);
    let mut t = table(&[
        "micro",
        "seq",
        "accum",
        "checkpointing",
        "loss",
        "device",
        "fits",
        "est. tokens/s",
    ]);
    for c in f.candidates.iter().take(top) {
        t.add_row(vec![
            c.micro_batch.to_string(),
            c.seq_len.to_string(),
            c.grad_accum.to_string(),
            c.checkpointing.to_string(),
            c.loss_label(),
            Bytes(c.report.device_bytes).to_string(),
            if c.fits { "yes" } else { "no" }.to_string(),
            format!("{:.0}", c.report.est_tokens_per_second),
        ]);
    }
    right(&mut t, 0..3);
    right(&mut t, 5..8);
    let _ = writeln!(out, "{t}");
    for m in &f.longer {
        let _ = writeln!(out, "does not fit: {}", prose::miss(m));
    }
    let b = &f.best;
    let _ = writeln!(
        out,
        "choice: micro-batch {} × accumulation {} at seq {}, checkpointing {}, loss {}: {} (margin {:.0} %)",
        b.micro_batch,
        b.grad_accum,
        b.seq_len,
        b.checkpointing,
        b.loss_label(),
        verdict(&b.report),
        f.margin * 100.0
    );
    match (&f.baseline, f.speedup) {
        (Some(base), Some(s)) => {
            let _ = writeln!(
                out,
                "vs micro-batch 1 with full checkpointing ({:.0} tokens/s, {}): {:.2}× the estimated throughput",
                base.report.est_tokens_per_second,
                Bytes(base.report.device_bytes),
                s
            );
        }
        (Some(base), None) => {
            let _ = writeln!(
                out,
                "micro-batch 1 with full checkpointing does not fit ({})",
                Bytes(base.report.device_bytes)
            );
        }
        _ => {}
    }
    out
}

/// `fit` when nothing fits: why, then one row per lever tried, nearest first.
pub fn ladder(base: &RunSpec, l: &Ladder) -> String {
    let mut out: String = headline(base).lines().take(1).collect();
    let t = &base.train;
    let tuning = match &base.lora {
        Some(lora) => format!("LoRA rank {}", lora.rank),
        None => "full fine-tuning".to_string(),
    };
    let _ = writeln!(
        out,
        "\nas asked: {tuning}, {}, {}, attention {}, {}",
        t.precision, t.optimizer, t.attention, base.hardware.sharding
    );
    for m in &l.misses {
        let _ = writeln!(out, "does not fit: {}", prose::miss(m));
    }
    if let Some(line) = shorter(l) {
        let _ = writeln!(out, "{line}");
    }
    let mut t = table(&[
        "lever",
        "plan",
        "device",
        "fits",
        "est. tokens/s",
        "gives up",
    ]);
    for a in &l.alternatives {
        let shown = a
            .best
            .as_ref()
            .or(a.miss.as_ref().and_then(|m| m.smallest.as_ref()));
        let (plan, device) = match shown {
            Some(c) => (
                format!(
                    "{} × {}, {}, {}",
                    c.micro_batch,
                    c.grad_accum,
                    c.checkpointing,
                    c.loss_label()
                ),
                Bytes(c.report.device_bytes).to_string(),
            ),
            None => ("-".into(), "-".into()),
        };
        let speed = match &a.best {
            Some(c) => format!("{:.0}", c.report.est_tokens_per_second),
            None => "-".into(),
        };
        t.add_row(vec![
            prose::lever_flags(&a.levers),
            plan,
            device,
            if a.fits { "yes" } else { "no" }.into(),
            speed,
            prose::gives_up(&a.levers, base, shown),
        ]);
    }
    right(&mut t, 2..5);
    let _ = writeln!(out, "{t}");
    match l.nearest().next() {
        Some(a) => {
            let _ = writeln!(
                out,
                "nothing fits as asked (exit 3); nearest plan: {} ({}); rows that do not fit show their smallest candidate",
                prose::lever_flags(&a.levers),
                a.best.as_ref().map(prose::candidate).unwrap_or_default()
            );
        }
        None => {
            let _ = writeln!(
                out,
                "nothing fits as asked (exit 3), and no lever fits alone: a smaller model, a shorter sequence or a GPU with more memory"
            );
        }
    }
    out
}

/// The ladder's one line on shorter lengths: the longest halving of a fixed length that
/// fits as asked, or that none down to the shortest tried does; nothing when the length
/// was searched.
fn shorter(l: &Ladder) -> Option<String> {
    let asked = l.misses.last()?.seq_len?;
    Some(match &l.shorter {
        Some(s) => format!(
            "shorter: seq {} fits as asked (micro-batch {} × accumulation {}, checkpointing {}, loss {}): {} allocated, {} device",
            s.seq_len,
            s.micro_batch,
            s.grad_accum,
            s.checkpointing,
            vramplan_planner::loss_label(s.loss, s.loss_chunk),
            Bytes(s.peak_allocated_bytes),
            Bytes(s.device_bytes)
        ),
        None => format!(
            "shorter: no halving of seq {asked} down to {} fits as asked",
            vramplan_planner::MIN_SHORTER_SEQ
        ),
    })
}

pub fn models(ms: &[ModelSpec]) -> String {
    let mut t = table(&[
        "name", "arch", "params", "hidden", "layers", "heads/kv", "ffn", "vocab", "tied",
    ]);
    for m in ms {
        let layers = if m.num_decoder_layers > 0 {
            format!("{}+{}", m.num_layers, m.num_decoder_layers)
        } else {
            m.num_layers.to_string()
        };
        t.add_row(vec![
            m.name.clone(),
            m.arch.to_string(),
            format!("{:.1} M", vramplan_planner::param_count(m) as f64 / 1e6),
            m.hidden_size.to_string(),
            layers,
            format!("{}/{}", m.num_heads, m.num_kv_heads),
            m.intermediate_size.to_string(),
            m.vocab_size.to_string(),
            if m.tie_embeddings { "yes" } else { "no" }.to_string(),
        ]);
    }
    right(&mut t, 2..8);
    format!("{t}\n")
}

pub fn gpus(gs: &[GpuSpec]) -> String {
    let mut t = table(&["name", "gpu", "memory", "context", "bf16 TFLOP/s", "GB/s"]);
    for g in gs {
        t.add_row(vec![
            g.name.clone(),
            g.display.clone(),
            format!("{} ({:.1} GB)", g.capacity, g.capacity.gb()),
            g.context.to_string(),
            format!("{:.1}", g.bf16_tflops),
            format!("{:.0}", g.bandwidth_gbs),
        ]);
    }
    right(&mut t, 2..6);
    format!("{t}\n")
}

/// What NVML found, after the preset table.
pub fn detected_gpus(detected: &anyhow::Result<Vec<Detected>>) -> String {
    let mut out = String::new();
    match detected {
        Ok(d) if d.is_empty() => out.push_str("\nNVML found no GPU.\n"),
        Ok(d) => {
            out.push_str("\nDetected through NVML (use gpu = \"auto\" for device 0):\n");
            for g in d {
                let _ = writeln!(
                    out,
                    "  {}: {}: {} total, {} for PyTorch ({}), {} used, {} free (nearest preset: {})",
                    g.index,
                    g.spec.display,
                    g.total,
                    g.spec.capacity,
                    g.capacity_source,
                    g.used,
                    g.free,
                    g.preset.as_deref().unwrap_or("none")
                );
            }
        }
        Err(e) => {
            let _ = writeln!(
                out,
                "\nNo GPU detected through NVML ({}). Name a preset, or gpu = \"cpu\".",
                e.root_cause()
            );
        }
    }
    out
}

fn opt(label: &str, v: Option<u64>, out: &mut String) {
    if let Some(x) = v {
        let _ = writeln!(out, "  {label:<28} {}", Bytes(x));
    }
}

fn diagnosis_numbers(r: &vramplan_planner::OomReport, out: &mut String) {
    if let Some(h) = &r.host {
        if let Some(pid) = h.pid {
            let _ = writeln!(out, "  {:<28} {pid}", "killed process");
        }
        opt("host memory (anon-rss)", h.anon_rss_bytes, out);
        if let Some(c) = h.exit_code {
            let _ = writeln!(out, "  {:<28} {c}", "exit code");
        }
    } else if !r.has_sizes() {
        let _ = writeln!(
            out,
            "  {:<28} none printed ({})",
            "sizes",
            prose::source(r.source)
        );
    }
    opt("requested", r.request_bytes, out);
    opt("capacity", r.capacity_bytes, out);
    opt("free", r.free_bytes, out);
    opt("allocated by PyTorch", r.allocated_bytes, out);
    opt("reserved by PyTorch", r.reserved_bytes, out);
    opt(
        "reserved but unallocated",
        r.reserved_unallocated_bytes,
        out,
    );
    opt("this process", r.process_in_use_bytes, out);
    if let Some(pid) = r.self_pid {
        let _ = writeln!(out, "  {:<28} {pid}", "this process is listed as");
    }
    opt("other processes", r.other_processes_bytes, out);
    opt("other allocations (MPS)", r.other_allocations_bytes, out);
    if let Some(s) = &r.shape {
        let _ = writeln!(out, "  {:<28} {}", "printed shape", s.describe());
    }
    if let Some(c) = &r.code_line {
        let _ = writeln!(out, "  {:<28} {c}", "failed at");
    }
}

/// The facts weighed, strongest first; context (weight 0) last.
fn evidence_lines(d: &Diagnosis, out: &mut String) {
    let mut ev: Vec<_> = d.evidence.iter().collect();
    ev.sort_by_key(|e| std::cmp::Reverse(e.weight));
    out.push_str("evidence:\n");
    for e in ev {
        let mark = if e.weight == 0 {
            "·".to_string()
        } else {
            format!("+{}", e.weight)
        };
        let _ = writeln!(
            out,
            "  {mark:<3} {:<16} {}",
            e.cause.name(),
            prose::fact(&e.fact)
        );
    }
}

fn fix_line(k: usize, f: &vramplan_planner::Fix) -> String {
    let pred = match (f.predicted_peak_bytes, f.fits) {
        (Some(p), Some(fits)) => format!(
            " → predicted peak {}, {}{}",
            Bytes(p),
            if fits { "fits" } else { "does not fit" },
            if f.keeps_global_batch {
                ""
            } else {
                " (changes the global batch)"
            }
        ),
        _ => String::new(),
    };
    format!("  {}. {}{pred}\n", k + 1, prose::change(&f.kind))
}

fn confidence(c: vramplan_planner::Confidence) -> &'static str {
    match c {
        vramplan_planner::Confidence::High => "high",
        vramplan_planner::Confidence::Medium => "medium",
        vramplan_planner::Confidence::Low => "low",
    }
}

/// Each report: where it is, its numbers, the cause and the fixes, best first.
pub fn diagnose(ds: &[Diagnosis]) -> String {
    let mut out = String::new();
    for (i, d) in ds.iter().enumerate() {
        let r = &d.report;
        let who = match (r.rank, r.gpu) {
            (Some(rank), _) => format!(" on rank {rank}"),
            (None, Some(g)) => format!(" on GPU {g}"),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "out-of-memory {} of {} (log line {}){who}: {} (confidence {})",
            i + 1,
            ds.len(),
            r.line,
            d.cause,
            confidence(d.confidence)
        );
        diagnosis_numbers(r, &mut out);
        if let (Some(t), Some(l)) = (&d.tensor, &d.tensor_layout) {
            let _ = writeln!(out, "  {:<28} {t} {l}", "tensor");
        }
        if let Some(why) = &d.implausible {
            let _ = writeln!(out, "note: {}", prose::implausible(why));
        }
        let _ = writeln!(out, "cause: {}", prose::explanation(&d.explanation));
        if let Some(c) = d.second_cause {
            let _ = writeln!(out, "also consistent with: {c}");
        }
        evidence_lines(d, &mut out);
        for c in &d.plan_checks {
            let _ = writeln!(out, "against the plan: {}", prose::plan_check(c));
        }
        out.push_str("fixes, best first:\n");
        for (k, f) in d.fixes.iter().enumerate() {
            out.push_str(&fix_line(k, f));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The terminal's width wins, then `COLUMNS`, then 80; clamped to a readable range.
    #[test]
    fn the_width_follows_the_output() {
        for (terminal, columns, want) in [
            (Some(132), Some(90), 132),
            (None, Some(90), 90),
            (None, None, 80),
            (Some(20), None, 60),
            (None, Some(1000), 240),
        ] {
            assert_eq!(
                output_width(terminal, columns),
                want,
                "{terminal:?} {columns:?}"
            );
        }
    }
}
