//! Two runs side by side: what differs in their configs, every component with its ratio,
//! and one sentence naming the component that changed most and why.

use crate::report::Report;
use crate::spec::{LossMode, RunSpec};
use crate::units::{thousands, Bytes, GIB};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct ConfigDiff {
    pub key: String,
    pub a: String,
    pub b: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ComponentDiff {
    pub component: String,
    pub a_bytes: u64,
    pub b_bytes: u64,
    /// a / b (None when b is zero).
    pub ratio: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub config: Vec<ConfigDiff>,
    pub components: Vec<ComponentDiff>,
    /// The component whose bytes differ most.
    pub largest: String,
    pub why: String,
    /// The largest single tensor of each run's step, described.
    pub largest_tensor: String,
}

fn fields(s: &RunSpec) -> Vec<(&'static str, String)> {
    let t = &s.train;
    vec![
        ("model", s.model.name.clone()),
        ("micro_batch", t.micro_batch.to_string()),
        ("seq_len", t.seq_len.to_string()),
        ("grad_accum", t.grad_accum.to_string()),
        ("precision", t.precision.to_string()),
        ("optimizer", t.optimizer.to_string()),
        ("checkpointing", t.checkpointing.to_string()),
        ("loss", t.loss.to_string()),
        ("attention", t.attention.to_string()),
        ("engine", t.engine.to_string()),
        ("gpu", s.hardware.device.name().to_string()),
        ("gpus", s.hardware.gpus.to_string()),
        ("sharding", s.hardware.sharding.to_string()),
    ]
}

/// GiB with two decimals (3.75 GiB reads better than 3.8 here).
pub fn gib2(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / GIB as f64)
}

/// The full fp32 logits of a run: micro_batch × seq_len × vocab × 4 B.
pub fn fp32_logits(s: &RunSpec) -> Bytes {
    Bytes::of(
        s.train
            .tokens_per_micro_batch()
            .saturating_mul(s.model.vocab_size),
        4,
    )
}

fn logits_formula(s: &RunSpec) -> String {
    format!(
        "{} × {} × {} × 4 B = {}",
        s.train.micro_batch,
        s.train.seq_len,
        thousands(s.model.vocab_size),
        gib2(fp32_logits(s).0)
    )
}

pub fn compare(sa: &RunSpec, a: &Report, sb: &RunSpec, b: &Report) -> Comparison {
    let fa = fields(sa);
    let fb = fields(sb);
    let config = fa
        .iter()
        .zip(&fb)
        .filter(|(x, y)| x.1 != y.1)
        .map(|(x, y)| ConfigDiff {
            key: x.0.to_string(),
            a: x.1.clone(),
            b: y.1.clone(),
        })
        .collect();
    let mut names: Vec<&String> = a.components.keys().chain(b.components.keys()).collect();
    names.sort();
    names.dedup();
    let components: Vec<ComponentDiff> = names
        .iter()
        .map(|n| {
            let x = a.components.get(*n).copied().unwrap_or(0);
            let y = b.components.get(*n).copied().unwrap_or(0);
            ComponentDiff {
                component: n.to_string(),
                a_bytes: x,
                b_bytes: y,
                ratio: (y > 0).then(|| x as f64 / y as f64),
            }
        })
        .collect();
    let largest = components
        .iter()
        .max_by_key(|c| c.a_bytes.abs_diff(c.b_bytes))
        .map(|c| c.component.clone())
        .unwrap_or_default();
    let why = explain(&largest, sa, a, sb, b);
    let largest_tensor = largest_tensor(sa, a, sb, b);
    Comparison {
        config,
        components,
        largest,
        why,
        largest_tensor,
    }
}

/// The largest allocation of the step, labelled with its shape and dtype where known
/// (`logits ([20, 3072, 65536] f32, 15.00 GiB)`), its bytes, and how many tensors that
/// large are live at the peak.
fn biggest(r: &Report) -> (String, u64, usize) {
    let t = r.timeline.tensors.iter().max_by_key(|t| t.bytes);
    let bytes = t.map(|t| t.bytes.0).unwrap_or(0);
    let label = t
        .map(|t| match t.describe() {
            Some(d) => format!("{} ({d}, {})", t.name, gib2(bytes)),
            None => format!("{} ({})", t.name, gib2(bytes)),
        })
        .unwrap_or_default();
    let at_peak = r
        .timeline
        .live_at_peak()
        .iter()
        .filter(|t| t.bytes.0 == bytes)
        .count();
    (label, bytes, at_peak)
}

fn largest_tensor(sa: &RunSpec, a: &Report, sb: &RunSpec, b: &Report) -> String {
    let (na, ba, ka) = biggest(a);
    let (nb, bb, kb) = biggest(b);
    let is_logits =
        |s: &RunSpec, bytes: u64| s.train.loss == LossMode::FloatCast && bytes == fp32_logits(s).0;
    if is_logits(sa, ba) && is_logits(sb, bb) {
        format!(
            "the fp32 logits (`logits.float()`): {} vs {}; the loss holds {} vs {} tensors of that size at the peak",
            logits_formula(sa),
            logits_formula(sb),
            ka,
            kb
        )
    } else {
        format!("{na} vs {nb}")
    }
}

fn explain(largest: &str, sa: &RunSpec, a: &Report, sb: &RunSpec, b: &Report) -> String {
    let (ta, tb) = (
        sa.train.tokens_per_micro_batch(),
        sb.train.tokens_per_micro_batch(),
    );
    let get = |r: &Report| r.components.get(largest).copied().unwrap_or(0);
    let head = format!("{largest}: {} vs {}", Bytes(get(a)), Bytes(get(b)));
    match largest {
        "logits" => {
            let mode = |s: &RunSpec| match s.train.loss {
                LossMode::FloatCast => "the full logits are cast to fp32",
                LossMode::Chunked => "the loss is chunked",
                LossMode::Fused => "the loss is fused",
            };
            format!(
                "{head}. The fp32 logits grow with micro-batch × sequence × vocabulary: {} vs {} ({} and {}), and the loss keeps several tensors of that size at once.",
                logits_formula(sa),
                logits_formula(sb),
                mode(sa),
                mode(sb)
            )
        }
        "activations" | "temporaries" | "weight_copies" => format!(
            "{head}. Saved activations grow with tokens per micro-batch ({} vs {}) and with checkpointing ({} vs {}).",
            ta, tb, sa.train.checkpointing, sb.train.checkpointing
        ),
        "optimizer" | "gradients" | "weights" => format!(
            "{head}. Model states grow with parameters ({} vs {}) and shrink with sharding ({} on {} GPUs vs {} on {}); optimizer {} vs {}.",
            a.params, b.params, sa.hardware.sharding, sa.hardware.gpus, sb.hardware.sharding, sb.hardware.gpus,
            sa.train.optimizer, sb.train.optimizer
        ),
        _ => head,
    }
}
