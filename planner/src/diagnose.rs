//! From an out-of-memory report to its cause, the tensor behind it and ranked fixes.
//!
//! The planner returns data: a [`Diagnosis`] names the cause, the numbers that support it
//! ([`Explanation`]) and each fix as the config edits it makes ([`Edit`]) with the peak the
//! planner predicts for it. The sentences are written by the binary's renderers.
//!
//! Fixes depend on the run config, not on the report (only the tensor match reads the
//! report), so a [`FixPlan`] plans them once per config and every report of a log reuses
//! it: the work per report is one scan of the planned timeline's tensors.

use crate::config::{check_run, MAX_COUNT};
use crate::oom::{classify, match_tensor, Cause, Match, OomReport};
use crate::report::estimate;
use crate::spec::{Checkpointing, LossMode, RunSpec, Sharding};
use crate::timeline::{Component, Timeline};
use serde::Serialize;

/// What the failing code line says about the tensor, when no config names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Hint {
    Logits,
    Attention,
    OptimizerState,
}

impl Hint {
    /// Reads the frame and code line: `.float()`, `cross_entropy`, `lm_head` are the logits.
    pub fn from_code(code: &str) -> Option<Hint> {
        let c = code.to_ascii_lowercase();
        if c.contains(".float()") || c.contains("cross_entropy") || c.contains("lm_head") {
            Some(Hint::Logits)
        } else if c.contains("scaled_dot_product_attention") || c.contains("softmax") {
            Some(Hint::Attention)
        } else if c.contains("optimizer.step") || c.contains("adam") {
            Some(Hint::OptimizerState)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Hint::Logits => "logits",
            Hint::Attention => "attention",
            Hint::OptimizerState => "optimizer state",
        }
    }
}

/// A logits tensor that is exactly tokens × vocab × width bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LogitsShape {
    pub micro_batch: u64,
    pub seq_len: u64,
    pub vocab_size: u64,
    pub width_bytes: u64,
}

/// A report whose numbers contradict each other: it is not matched against the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Implausible {
    /// "Tried to allocate 0 bytes" (or a negative amount, which reads as none).
    NoRequest,
    /// More allocated, reserved, free or in use than the GPU's capacity.
    AboveCapacity { field: &'static str, bytes: u64 },
}

/// The numbers behind the cause.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Explanation {
    /// A huge request matched to a tensor of the planned step.
    HugeTensorMatched {
        tensor: String,
        bytes: u64,
        phase: String,
        shape: Option<LogitsShape>,
    },
    HugeTensor {
        request_bytes: u64,
        hint: Option<Hint>,
    },
    Fragmentation {
        reserved_unallocated_bytes: u64,
        request_bytes: u64,
    },
    OtherProcesses {
        other_processes_bytes: u64,
        capacity_bytes: u64,
    },
    /// candle/cudarc: no sizes in the message.
    DriverError,
    DoesNotFit {
        allocated_bytes: u64,
        free_bytes: u64,
        request_bytes: u64,
        hint: Option<Hint>,
    },
}

/// One change to the run config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "key", rename_all = "snake_case")]
pub enum Edit {
    MicroBatch { micro_batch: u64, grad_accum: u64 },
    Loss { loss: LossMode },
    Checkpointing { checkpointing: Checkpointing },
    SeqLen { seq_len: u64 },
    Sharding { sharding: Sharding },
}

/// What a fix does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum FixKind {
    /// Config edits, applied together.
    Edits {
        edits: Vec<Edit>,
    },
    /// `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`.
    ExpandableSegments {
        reserved_unallocated_bytes: u64,
        request_bytes: u64,
    },
    FreeGpu {
        other_processes_bytes: u64,
    },
    /// Without a config: halve the micro-batch, double the accumulation.
    HalveMicroBatch,
    /// Without a config: shard the optimizer state (or an 8-bit optimizer).
    ShardOptimizer,
}

/// One suggested change, with the planner's prediction when a config was given.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fix {
    pub kind: FixKind,
    pub predicted_peak_bytes: Option<u64>,
    pub fits: Option<bool>,
    pub keeps_global_batch: bool,
    /// The fixed run, when the fix was planned.
    #[serde(skip)]
    pub spec: Option<RunSpec>,
}

impl Fix {
    fn advice(kind: FixKind) -> Fix {
        Fix {
            kind,
            predicted_peak_bytes: None,
            fits: None,
            keeps_global_batch: true,
            spec: None,
        }
    }

    fn edits(edits: Vec<Edit>) -> Fix {
        Fix::advice(FixKind::Edits { edits })
    }
}

/// One report, diagnosed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Diagnosis {
    pub cause: Cause,
    pub report: OomReport,
    pub tensor: Option<String>,
    /// The matched tensor's shape and dtype, e.g. `[20, 3072, 65536] f32`.
    pub tensor_layout: Option<String>,
    pub explanation: Explanation,
    /// Set when the report's numbers are nonsense: it was not matched against the plan.
    pub implausible: Option<Implausible>,
    pub fixes: Vec<Fix>,
}

/// A run config's planned step and its fixes, ranked: computed once, used for every report.
#[derive(Debug, Clone)]
pub struct FixPlan {
    pub spec: RunSpec,
    pub timeline: Timeline,
    pub fixes: Vec<Fix>,
}

impl FixPlan {
    pub fn new(spec: &RunSpec) -> FixPlan {
        FixPlan {
            spec: spec.clone(),
            timeline: estimate(spec).timeline,
            fixes: planned_fixes(spec),
        }
    }
}

/// Diagnoses one report, against a planned config when there is one.
pub fn diagnose(report: OomReport, plan: Option<&FixPlan>) -> Diagnosis {
    let cause = classify(&report);
    let implausible = implausible(&report);
    let matched = match (plan, implausible) {
        (Some(p), None) => match_tensor(&report, &p.timeline),
        _ => None,
    };
    let hint = Hint::from_code(&format!(
        "{} {}",
        report.frame.as_deref().unwrap_or(""),
        report.code_line.as_deref().unwrap_or("")
    ));
    let explanation = explain(&report, cause, matched.as_ref(), plan, hint);
    let mut fixes = cause_fixes(&report, cause);
    match plan {
        Some(p) => fixes.extend(p.fixes.iter().cloned()),
        None => {
            let logits = matched
                .as_ref()
                .map(|m| m.component == Component::Logits)
                .unwrap_or(hint == Some(Hint::Logits));
            fixes.extend(generic_fixes(logits, hint));
        }
    }
    Diagnosis {
        cause,
        tensor_layout: matched.as_ref().and_then(|m| m.layout.clone()),
        tensor: matched.map(|m| m.name),
        report,
        explanation,
        implausible,
        fixes,
    }
}

/// The run of the best planned fix over all reports: what `diagnose --out` writes.
pub fn best_fix(ds: &[Diagnosis]) -> Option<&RunSpec> {
    ds.iter()
        .flat_map(|d| d.fixes.iter())
        .find_map(|f| f.spec.as_ref())
}

/// Numbers no allocator prints: nothing requested, or more held than the GPU has.
pub fn implausible(r: &OomReport) -> Option<Implausible> {
    if r.request_bytes == Some(0) {
        return Some(Implausible::NoRequest);
    }
    let cap = r.capacity_bytes?;
    [
        ("allocated", r.allocated_bytes),
        ("reserved", r.reserved_bytes),
        ("free", r.free_bytes),
        ("process in use", r.process_in_use_bytes),
    ]
    .into_iter()
    .find_map(|(field, v)| {
        v.filter(|&b| b > cap)
            .map(|bytes| Implausible::AboveCapacity { field, bytes })
    })
}

fn explain(
    r: &OomReport,
    cause: Cause,
    matched: Option<&Match>,
    plan: Option<&FixPlan>,
    hint: Option<Hint>,
) -> Explanation {
    let req = r.request_bytes.unwrap_or(0);
    match cause {
        Cause::HugeTensor => match (matched, plan) {
            (Some(m), Some(p)) => Explanation::HugeTensorMatched {
                tensor: m.name.clone(),
                bytes: m.bytes,
                phase: m.phase.clone(),
                shape: logits_shape(m, &p.spec),
            },
            _ => Explanation::HugeTensor {
                request_bytes: req,
                hint,
            },
        },
        Cause::Fragmentation => Explanation::Fragmentation {
            reserved_unallocated_bytes: r.reserved_unallocated_bytes.unwrap_or(0),
            request_bytes: req,
        },
        Cause::OtherProcesses => Explanation::OtherProcesses {
            other_processes_bytes: r.other_processes_bytes.unwrap_or(0),
            capacity_bytes: r.capacity_bytes.unwrap_or(0),
        },
        Cause::DoesNotFit if r.driver_error => Explanation::DriverError,
        Cause::DoesNotFit => Explanation::DoesNotFit {
            allocated_bytes: r.allocated_bytes.unwrap_or(0),
            free_bytes: r.free_bytes.unwrap_or(0),
            request_bytes: req,
            hint,
        },
    }
}

/// The shape of a logits tensor that is exactly micro-batch × seq × vocab × 4 (or 2) bytes.
pub fn logits_shape(m: &Match, s: &RunSpec) -> Option<LogitsShape> {
    let (mb, t, v) = (s.train.micro_batch, s.train.seq_len, s.model.vocab_size);
    if m.component != Component::Logits {
        return None;
    }
    [4u64, 2].into_iter().find_map(|w| {
        let bytes = mb.checked_mul(t)?.checked_mul(v)?.checked_mul(w)?;
        (bytes == m.bytes).then_some(LogitsShape {
            micro_batch: mb,
            seq_len: t,
            vocab_size: v,
            width_bytes: w,
        })
    })
}

/// The fix the cause itself calls for, before any config change.
fn cause_fixes(r: &OomReport, cause: Cause) -> Vec<Fix> {
    match cause {
        Cause::Fragmentation => vec![Fix::advice(FixKind::ExpandableSegments {
            reserved_unallocated_bytes: r.reserved_unallocated_bytes.unwrap_or(0),
            request_bytes: r.request_bytes.unwrap_or(0),
        })],
        Cause::OtherProcesses => vec![Fix::advice(FixKind::FreeGpu {
            other_processes_bytes: r.other_processes_bytes.unwrap_or(0),
        })],
        _ => Vec::new(),
    }
}

/// Without a config: the usual savers, the loss first when the logits are to blame.
pub fn generic_fixes(logits: bool, hint: Option<Hint>) -> Vec<Fix> {
    let mut v = Vec::new();
    if logits {
        for loss in [LossMode::Chunked, LossMode::Fused] {
            v.push(Fix::edits(vec![Edit::Loss { loss }]));
        }
    }
    if hint == Some(Hint::OptimizerState) {
        v.push(Fix::advice(FixKind::ShardOptimizer));
    }
    v.push(Fix::advice(FixKind::HalveMicroBatch));
    v.push(Fix::edits(vec![Edit::Checkpointing {
        checkpointing: Checkpointing::Full,
    }]));
    v
}

/// Whether a changed run stays within what a config may say (halving the micro-batch
/// doubles the accumulation, which has its own bound).
fn writable(s: &RunSpec) -> bool {
    s.train.grad_accum <= MAX_COUNT && check_run(s).is_ok()
}

/// A candidate change: its edits, the run it gives, and whether it keeps the global batch.
type Candidate = (Vec<Edit>, RunSpec, bool);

fn halve_micro_batch(s: &mut RunSpec) -> Edit {
    s.train.micro_batch /= 2;
    s.train.grad_accum = s.train.grad_accum.saturating_mul(2);
    Edit::MicroBatch {
        micro_batch: s.train.micro_batch,
        grad_accum: s.train.grad_accum,
    }
}

/// Each saver alone.
fn single_changes(spec: &RunSpec) -> Vec<Candidate> {
    let mut cands = Vec::new();
    let t = &spec.train;
    let with = |f: &dyn Fn(&mut RunSpec) -> Edit| {
        let mut s = spec.clone();
        let e = f(&mut s);
        (vec![e], s)
    };
    if t.micro_batch >= 2 {
        let (e, s) = with(&halve_micro_batch);
        cands.push((e, s, t.micro_batch.is_multiple_of(2)));
    }
    for loss in [LossMode::Chunked, LossMode::Fused] {
        if t.loss != loss {
            let (e, s) = with(&|s| {
                s.train.loss = loss;
                Edit::Loss { loss }
            });
            cands.push((e, s, true));
        }
    }
    if t.checkpointing != Checkpointing::Full {
        let (e, s) = with(&|s| {
            s.train.checkpointing = Checkpointing::Full;
            Edit::Checkpointing {
                checkpointing: Checkpointing::Full,
            }
        });
        cands.push((e, s, true));
    }
    if t.seq_len >= 2 {
        let (e, s) = with(&|s| {
            s.train.seq_len /= 2;
            Edit::SeqLen {
                seq_len: s.train.seq_len,
            }
        });
        cands.push((e, s, false));
    }
    if spec.hardware.gpus > 1 {
        for sharding in [Sharding::Zero2, Sharding::Zero3] {
            if spec.hardware.sharding.stage() < sharding.stage() {
                let (e, s) = with(&|s| {
                    s.hardware.sharding = sharding;
                    Edit::Sharding { sharding }
                });
                cands.push((e, s, true));
            }
        }
    }
    cands
}

/// Single changes rarely suffice for a run far over: also the smallest-loss setups,
/// halving the micro-batch (accumulating more) until the plan fits.
fn combined(spec: &RunSpec, full: bool) -> Candidate {
    let t = &spec.train;
    let mut s = spec.clone();
    let mut edits = Vec::new();
    if t.loss == LossMode::FloatCast {
        s.train.loss = LossMode::Chunked;
        edits.push(Edit::Loss {
            loss: LossMode::Chunked,
        });
    }
    if full && t.checkpointing != Checkpointing::Full {
        s.train.checkpointing = Checkpointing::Full;
        edits.push(Edit::Checkpointing {
            checkpointing: Checkpointing::Full,
        });
    }
    let mut keeps = true;
    let mut last = None;
    while !estimate(&s).fits && s.train.micro_batch >= 2 {
        keeps &= s.train.micro_batch.is_multiple_of(2);
        last = Some(halve_micro_batch(&mut s));
    }
    edits.extend(last);
    (edits, s, keeps)
}

/// Re-plans the run with each candidate change; fitting first, then those keeping the
/// global batch, then by predicted peak.
pub fn planned_fixes(spec: &RunSpec) -> Vec<Fix> {
    let mut cands = single_changes(spec);
    for full in [false, true] {
        let c = combined(spec, full);
        if c.0.len() >= 2 && !cands.iter().any(|x| x.1 == c.1) {
            cands.push(c);
        }
    }
    let mut fixes: Vec<Fix> = cands
        .into_iter()
        // A fix is a plan `--out` may write: it must be one `estimate` reads back.
        .filter(|(_, s, _)| writable(s))
        .map(|(edits, s, keeps)| {
            let r = estimate(&s);
            Fix {
                kind: FixKind::Edits { edits },
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oom::parse_log;
    use crate::presets::Presets;
    use crate::units::GIB;

    const V1: &str = "  File \"gpt.py\", line 301, in forward\n    logits = logits.float()\nRuntimeError: CUDA out of memory. Tried to allocate 15.00 GiB (GPU 0; 31.84 GiB total capacity; 12.10 GiB already allocated; 3.20 GiB free; 14.00 GiB reserved in total by PyTorch)";

    fn seed_spec() -> RunSpec {
        let text = include_str!("../../presets/examples/nanochat-d16-failed.toml");
        let raw = crate::config::RawConfig::from_toml(text).expect("parses");
        let presets = Presets::builtin().expect("presets");
        raw.resolve(&presets, &crate::config::Context::default())
            .expect("resolves")
    }

    /// Regression: halving the micro-batch doubled an accumulation already at its bound,
    /// so `diagnose --out` could write a plan that `estimate` refuses.
    #[test]
    fn every_planned_fix_is_a_plan_the_config_accepts() {
        let mut spec = seed_spec();
        spec.train.grad_accum = MAX_COUNT;
        let fixes = planned_fixes(&spec);
        assert!(!fixes.is_empty());
        for f in &fixes {
            let s = f.spec.as_ref().expect("planned fixes carry their run");
            assert!(s.train.grad_accum <= MAX_COUNT, "{:?}", f.kind);
        }
        assert!(!fixes.iter().any(|f| matches!(
            &f.kind,
            FixKind::Edits { edits } if edits.iter().any(|e| matches!(e, Edit::MicroBatch { .. }))
        )));
    }

    #[test]
    fn without_a_config_the_code_line_names_the_logits() {
        let d = diagnose(parse_log(V1)[0].clone(), None);
        assert_eq!(d.cause, Cause::HugeTensor);
        assert_eq!(
            d.explanation,
            Explanation::HugeTensor {
                request_bytes: 15 * GIB,
                hint: Some(Hint::Logits)
            }
        );
        let kinds: Vec<_> = d.fixes.iter().map(|f| &f.kind).collect();
        assert_eq!(
            kinds[0],
            &FixKind::Edits {
                edits: vec![Edit::Loss {
                    loss: LossMode::Chunked
                }]
            }
        );
        assert!(d.fixes.iter().all(|f| f.predicted_peak_bytes.is_none()));
    }

    #[test]
    fn hints_table() {
        for (code, hint) in [
            ("logits = logits.float()", Some(Hint::Logits)),
            ("F.cross_entropy(x, y)", Some(Hint::Logits)),
            (
                "F.scaled_dot_product_attention(q, k, v)",
                Some(Hint::Attention),
            ),
            ("optimizer.step()", Some(Hint::OptimizerState)),
            ("x = y + 1", None),
        ] {
            assert_eq!(Hint::from_code(code), hint, "{code}");
        }
    }

    #[test]
    fn nonsense_numbers_are_not_matched() {
        let mut r = parse_log(V1)[0].clone();
        r.allocated_bytes = Some(40 * GIB);
        assert_eq!(
            implausible(&r),
            Some(Implausible::AboveCapacity {
                field: "allocated",
                bytes: 40 * GIB
            })
        );
        r.allocated_bytes = None;
        assert_eq!(implausible(&r), None);
        r.request_bytes = Some(0);
        assert_eq!(implausible(&r), Some(Implausible::NoRequest));
    }

    #[test]
    fn a_plan_ranks_fitting_fixes_first_and_is_reused() {
        let spec = seed_spec();
        let plan = FixPlan::new(&spec);
        assert!(!plan.fixes.is_empty());
        // Reference: seed 002, the fp32 copy of 10 × 1536 × 65,536 logits is 3.75 GiB.
        let d = diagnose(parse_log(V1)[0].clone(), Some(&plan));
        assert_eq!(d.fixes[..], plan.fixes[..]);
        let first_non_fit = plan.fixes.iter().position(|f| f.fits != Some(true));
        if let Some(k) = first_non_fit {
            assert!(plan.fixes[k..].iter().all(|f| f.fits != Some(true)));
        }
        assert!(plan.fixes.iter().all(|f| f.spec.is_some()));
    }

    #[test]
    fn an_implausible_report_with_a_plan_keeps_the_fixes() {
        let plan = FixPlan::new(&seed_spec());
        let mut r = parse_log(V1)[0].clone();
        r.free_bytes = Some(u64::MAX);
        let d = diagnose(r, Some(&plan));
        assert!(d.implausible.is_some());
        assert_eq!(d.tensor, None);
        assert_eq!(d.fixes.len(), plan.fixes.len());
    }
}
