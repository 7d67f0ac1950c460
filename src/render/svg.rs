//! SVG plots: one step's memory over time stacked by component (with the capacity line and
//! the peak marked), and `fit`'s peak memory against micro-batch for each mode.
//! Plain SVG 1.1 that opens in any browser; every text is XML-escaped.

use std::fmt::Write;
use vramplan_planner::{ByComponent, Bytes, Candidate, Component, FitResult, Report, GIB};

const W: f64 = 1040.0;
const PANEL_H: f64 = 340.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 250.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 40.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn color(c: Component) -> &'static str {
    match c {
        Component::Weights => "#4e79a7",
        Component::WeightCopies => "#a0cbe8",
        Component::Gradients => "#f28e2b",
        Component::Optimizer => "#59a14f",
        Component::Activations => "#edc948",
        Component::Logits => "#e15759",
        Component::Temporaries => "#b07aa1",
    }
}

const RUNTIME_COLOR: &str = "#bab0ac";

fn open(out: &mut String, h: f64, title: &str) {
    let _ = writeln!(
        out,
        r#"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="sans-serif" font-size="12">
<title>{}</title>
<rect width="{W}" height="{h}" fill="white"/>"#,
        esc(title)
    );
}

/// The dashed capacity line across the plot at height `y`, labelled at its left end.
fn capacity_line(out: &mut String, y: f64, capacity: u64) {
    let _ = writeln!(
        out,
        r##"<line class="capacity" x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#222" stroke-width="2" stroke-dasharray="6,4"/><text x="{:.1}" y="{:.1}">capacity {}</text>"##,
        W - RIGHT,
        LEFT + 4.0,
        y - 6.0,
        esc(&Bytes(capacity).to_string())
    );
}

/// A y axis in GiB with about five ticks.
fn y_axis(out: &mut String, y0: f64, h: f64, max_gib: f64) {
    let step = [0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0]
        .into_iter()
        .find(|s| max_gib / s <= 6.0)
        .unwrap_or(500.0);
    let mut v = 0.0;
    while v <= max_gib + 1e-9 {
        let y = y0 + h - v / max_gib * h;
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e0e0e0"/><text x="{:.1}" y="{:.1}" text-anchor="end">{v} GiB</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0
        );
        v += step;
    }
}

/// Where a panel's columns and bytes land on the canvas.
struct Frame {
    y0: f64,
    plot_w: f64,
    cols: usize,
    scale: f64,
}

impl Frame {
    fn x(&self, i: usize) -> f64 {
        LEFT + (i as f64 + 0.5) * self.plot_w / self.cols.max(1) as f64
    }

    fn y(&self, bytes: f64) -> f64 {
        self.y0 + PANEL_H - bytes * self.scale
    }
}

/// A stacked band: its name, colour and bytes per column.
type Band<'a> = (&'a str, String, Vec<f64>);

/// One column per pixel, each the highest state inside it, so the peak is never lost.
fn sample(curve: &[ByComponent], cols: usize) -> Vec<ByComponent> {
    (0..cols)
        .map(|c| {
            let lo = c * curve.len() / cols;
            let hi = ((c + 1) * curve.len() / cols).max(lo + 1).min(curve.len());
            curve[lo..hi]
                .iter()
                .max_by_key(|s| s.total())
                .copied()
                .unwrap_or_default()
        })
        .collect()
}

/// Bands from the bottom: the CUDA context, then each component that holds memory.
fn bands(runtime: f64, samples: &[ByComponent], cols: usize) -> Vec<Band<'static>> {
    let mut bands = Vec::new();
    if runtime > 0.0 {
        bands.push((
            "runtime (CUDA context)",
            RUNTIME_COLOR.to_string(),
            vec![runtime; cols],
        ));
    }
    for c in Component::ALL.iter() {
        let vals: Vec<f64> = samples.iter().map(|s| s.get(*c).0 as f64).collect();
        if vals.iter().any(|v| *v > 0.0) {
            bands.push((c.key(), color(*c).to_string(), vals));
        }
    }
    bands
}

/// Draws the bands stacked; returns the stack's top per column.
fn draw_bands(out: &mut String, f: &Frame, bands: &[Band]) -> Vec<f64> {
    let mut below = vec![0.0f64; f.cols];
    let _ = writeln!(out, r#"<g class="series">"#);
    for (name, col, vals) in bands {
        let mut d = String::new();
        for i in 0..f.cols {
            let _ = write!(
                d,
                "{}{:.1},{:.1} ",
                if i == 0 { "M" } else { "L" },
                f.x(i),
                f.y(below[i] + vals[i])
            );
        }
        for i in (0..f.cols).rev() {
            let _ = write!(d, "L{:.1},{:.1} ", f.x(i), f.y(below[i]));
        }
        let _ = writeln!(
            out,
            r#"<path data-series="{}" d="{}Z" fill="{col}" stroke="none"/>"#,
            esc(name),
            d.trim_end()
        );
        for i in 0..f.cols {
            below[i] += vals[i];
        }
    }
    let _ = writeln!(out, "</g>");
    below
}

/// The capacity line, the device peak when it differs, and the live peak's dot.
fn marks(out: &mut String, f: &Frame, r: &Report, top: &[f64]) {
    let cap = r.capacity_bytes as f64;
    if cap * f.scale <= PANEL_H * 1.05 {
        capacity_line(out, f.y(cap), r.capacity_bytes);
    }
    let device = r.device_bytes as f64;
    if r.peak_reserved_bytes != r.peak_allocated_bytes && device * f.scale <= PANEL_H * 1.05 {
        let _ = writeln!(
            out,
            r##"<line class="device" x1="{LEFT}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#777" stroke-dasharray="2,3"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#555">device peak {} (reserved + context)</text>"##,
            f.y(device),
            W - RIGHT,
            f.y(device),
            W - RIGHT - 4.0,
            f.y(device) - 5.0,
            esc(&Bytes(r.device_bytes).to_string())
        );
    }
    let (pi, ptotal) = top
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, v)| (i, *v))
        .unwrap_or((0, 0.0));
    let _ = writeln!(
        out,
        r##"<circle class="peak" cx="{:.1}" cy="{:.1}" r="4" fill="#000"/><text x="{:.1}" y="{:.1}" text-anchor="middle">peak {} live, during {}</text>"##,
        f.x(pi),
        f.y(ptotal),
        f.x(pi),
        (f.y(ptotal) - 8.0).max(f.y0 - 4.0),
        esc(&Bytes(ptotal as u64).to_string()),
        esc(&r.peak_phase)
    );
}

fn legend(out: &mut String, y0: f64, bands: &[Band]) {
    for (k, (name, col, _)) in bands.iter().enumerate() {
        let ly = y0 + 10.0 + k as f64 * 18.0;
        let _ = writeln!(
            out,
            r#"<rect x="{:.1}" y="{:.1}" width="12" height="12" fill="{col}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            W - RIGHT + 16.0,
            ly,
            W - RIGHT + 32.0,
            ly + 10.0,
            esc(&name.replace('_', " "))
        );
    }
}

/// One panel: the step's live bytes by component, stacked, sampled to one column per pixel.
fn panel(out: &mut String, r: &Report, y0: f64, max_gib: f64, label: &str) {
    let curve = r.timeline.curve();
    let plot_w = W - LEFT - RIGHT;
    let cols = (plot_w as usize).min(curve.len().max(1));
    let runtime = r.components.get("runtime").copied().unwrap_or(0) as f64;
    let f = Frame {
        y0,
        plot_w,
        cols,
        scale: PANEL_H / (max_gib * GIB as f64),
    };
    let bands = bands(runtime, &sample(&curve, cols), cols);
    let top = draw_bands(out, &f, &bands);
    marks(out, &f, r, &top);
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="{:.1}" font-weight="bold">{}</text>"#,
        y0 - 10.0,
        esc(label)
    );
    y_axis(out, y0, PANEL_H, max_gib);
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">one training step: forward → loss → backward → optimizer</text>"#,
        LEFT + plot_w / 2.0,
        y0 + PANEL_H + 20.0
    );
    legend(out, y0, &bands);
}

fn top_gib(rs: &[&Report]) -> f64 {
    let m = rs
        .iter()
        .map(|r| {
            let peak = r.timeline.peak.total.0 + r.components.get("runtime").copied().unwrap_or(0);
            peak.max(r.capacity_bytes.min(peak.saturating_mul(2)))
        })
        .max()
        .unwrap_or(GIB);
    (m as f64 / GIB as f64 * 1.08).max(0.01)
}

/// `estimate --plot`
pub fn timeline(r: &Report, title: &str) -> String {
    let h = TOP + PANEL_H + BOTTOM;
    let mut out = String::new();
    open(&mut out, h, title);
    panel(&mut out, r, TOP, top_gib(&[r]), title);
    out.push_str("</svg>\n");
    out
}

/// `compare --plot`: both runs on the same scale, one above the other.
pub fn compare(a: &Report, na: &str, b: &Report, nb: &str) -> String {
    let h = 2.0 * (TOP + PANEL_H + BOTTOM);
    let mut out = String::new();
    open(&mut out, h, &format!("{na} vs {nb}"));
    let max = top_gib(&[a, b]);
    panel(&mut out, a, TOP, max, &format!("A: {na}"));
    panel(
        &mut out,
        b,
        TOP + PANEL_H + BOTTOM + TOP,
        max,
        &format!("B: {nb}"),
    );
    out.push_str("</svg>\n");
    out
}

/// `fit --plot`: device peak against micro-batch, one line per (checkpointing, loss) mode,
/// at the chosen sequence length.
pub fn fit(f: &FitResult) -> String {
    let h = TOP + PANEL_H + BOTTOM + 20.0;
    let mut out = String::new();
    let title = format!("peak memory vs micro-batch at seq {}", f.best.seq_len);
    open(&mut out, h, &title);
    let modes = fit_modes(f);
    let axes = FitAxes::new(f);
    y_axis(&mut out, TOP, PANEL_H, axes.max_gib);
    let _ = writeln!(out, r#"<g class="series">"#);
    for (k, (name, cs)) in modes.iter().enumerate() {
        fit_series(&mut out, &axes, k, name, cs);
    }
    let _ = writeln!(out, "</g>");
    let cap = f.best.report.capacity_bytes;
    capacity_line(&mut out, axes.y(cap as f64), cap);
    fit_x_axis(&mut out, &axes, &title);
    out.push_str("</svg>\n");
    out
}

/// The candidates at the best's sequence length, by mode in first-seen order, each
/// sorted by micro-batch.
fn fit_modes(f: &FitResult) -> Vec<(String, Vec<&Candidate>)> {
    let mut modes: Vec<(String, Vec<&Candidate>)> = Vec::new();
    for c in f.candidates.iter().filter(|c| c.seq_len == f.best.seq_len) {
        let key = format!("checkpointing {}, loss {}", c.checkpointing, c.loss);
        match modes.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(c),
            None => modes.push((key, vec![c])),
        }
    }
    for (_, v) in modes.iter_mut() {
        v.sort_by_key(|c| c.micro_batch);
    }
    modes
}

/// Micro-batch on a log scale across the plot; device bytes up to twice the capacity.
struct FitAxes {
    max_mb: f64,
    max_gib: f64,
    plot_w: f64,
}

impl FitAxes {
    fn new(f: &FitResult) -> FitAxes {
        let max_mb = f
            .candidates
            .iter()
            .map(|c| c.micro_batch)
            .max()
            .unwrap_or(1)
            .max(2) as f64;
        let cap = f.best.report.capacity_bytes as f64;
        let max_bytes = f
            .candidates
            .iter()
            .map(|c| c.report.device_bytes as f64)
            .fold(cap, f64::max)
            .min(cap * 2.0);
        FitAxes {
            max_mb,
            max_gib: max_bytes / GIB as f64 * 1.08,
            plot_w: W - LEFT - RIGHT,
        }
    }

    fn x(&self, mb: u64) -> f64 {
        LEFT + (mb as f64).log2() / self.max_mb.log2() * self.plot_w
    }

    fn y(&self, bytes: f64) -> f64 {
        TOP + PANEL_H - (bytes / GIB as f64).min(self.max_gib) / self.max_gib * PANEL_H
    }
}

const PALETTE: [&str; 9] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f",
];

/// One mode: its line, a point per candidate with its peak, and its legend entry.
fn fit_series(out: &mut String, a: &FitAxes, k: usize, name: &str, cs: &[&Candidate]) {
    let col = PALETTE[k % PALETTE.len()];
    let at = |c: &Candidate| (a.x(c.micro_batch), a.y(c.report.device_bytes as f64));
    let pts: Vec<String> = cs
        .iter()
        .map(|c| {
            let (x, y) = at(c);
            format!("{x:.1},{y:.1}")
        })
        .collect();
    let _ = writeln!(
        out,
        r#"<polyline data-series="{}" points="{}" fill="none" stroke="{col}" stroke-width="2"/>"#,
        esc(name),
        pts.join(" ")
    );
    for c in cs {
        let (x, y) = at(c);
        let _ = writeln!(
            out,
            r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{col}"><title>micro-batch {}: {}</title></circle>"#,
            c.micro_batch,
            esc(&Bytes(c.report.device_bytes).to_string())
        );
    }
    let ly = TOP + 10.0 + k as f64 * 18.0;
    let _ = writeln!(
        out,
        r#"<rect x="{:.1}" y="{:.1}" width="12" height="3" fill="{col}"/><text x="{:.1}" y="{:.1}" font-size="11">{}</text>"#,
        W - RIGHT + 6.0,
        ly + 4.0,
        W - RIGHT + 22.0,
        ly + 8.0,
        esc(name)
    );
}

/// Powers of two along the micro-batch axis, the axis label and the title.
fn fit_x_axis(out: &mut String, a: &FitAxes, title: &str) {
    let mut mb = 1u64;
    while (mb as f64) <= a.max_mb {
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{mb}</text>"#,
            a.x(mb),
            TOP + PANEL_H + 16.0
        );
        mb *= 2;
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">micro-batch (log scale); device peak per mode</text><text x="{LEFT}" y="{:.1}" font-weight="bold">{}</text>"#,
        LEFT + a.plot_w / 2.0,
        TOP + PANEL_H + 34.0,
        TOP - 12.0,
        esc(title)
    );
}
